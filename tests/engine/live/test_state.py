"""A session's settings and options as queued commands (set_grid, set_sampling, set_clock,
generate(lead_in=True)), and the forced-event ceiling in the grammar's own time (infill)."""

from __future__ import annotations

import pytest
from fake_decoders import Opinionated

from improv.engine.constraints import BeatGrid, Parts, TimeLimit
from improv.engine.engine import Engine
from improv.engine.live import SamplingParams, Scheduler, Token
from improv.engine.tokenizer.vocab import TokenizerConfig, TokenType, Vocab

V = Vocab(TokenizerConfig())
LEAD, HARMONY = 0, 2


@pytest.fixture
def engine(make_model):
    return Engine.from_model(make_model(seed=1).double())


def sampled(s) -> list[Token]:
    out = []
    while not s.events.empty():
        if isinstance(ev := s.events.get_nowait(), Token):
            out.append(ev)
    return out


def test_settings_change_through_queued_commands_in_order(engine):
    sched = Scheduler(engine, max_sessions=1)
    s = sched.open_session([V.BOS, V.TASK_CONTINUE], [BeatGrid(12.5, 7)], SamplingParams(seed=3))
    s.set_grid(25.0, 1.0)
    s.set_sampling(SamplingParams(temperature=0.5))  # no seed: the session keeps its own
    assert s.constraint(BeatGrid).grid == (25.0, 1.0)  # the handle's view: at once
    sched.step()
    st = sched.state(s)
    assert st.cs.find(BeatGrid).grid == (25.0, 1.0)  # the session's: at the next step
    assert st.sampling.temperature == 0.5 and st.seed == 3
    s.set_sampling(SamplingParams(seed=9))
    s.set_clock(lambda: 123.0)
    sched.step()
    assert st.seed == 9 and st.clock is not None and st.clock() == 123.0


def test_lead_in_makes_a_request_start_with_a_note(engine, monkeypatch):
    """A model that would rather wait: under lead_in its first event is a note, at the
    request's start; a request without it waits first."""
    make = engine.new_decoder
    monkeypatch.setattr(
        engine, "new_decoder", lambda *a, **k: Opinionated(make(*a, **k), V.shift(40), 8.0)
    )

    def tokens(lead_in: bool) -> list[Token]:
        sched = Scheduler(engine, max_sessions=1)
        s = sched.open_session([V.BOS, V.TASK_CONTINUE], sampling=SamplingParams(seed=2))
        s.generate(max_tokens=30, start_tick=50, lead_in=lead_in)
        sched.run_until_idle()
        return sampled(s)

    led = tokens(True)
    assert V.type_of(led[0].token) in (TokenType.VELOCITY, TokenType.PART)
    assert led[0].tick == 50
    assert V.type_of(tokens(False)[0].token) is TokenType.TIME  # (it waits first)


def test_forced_events_of_an_infill_middle_land_at_their_gap_ticks(engine, monkeypatch):
    """Infill: the session's ticks run on over prefix, suffix and middle; the grammar's restart.
    A model that wants to wait 2 s still meets each given event of the gap at its tick (its
    waits are clipped there, in the middle's own time)."""
    make = engine.new_decoder
    monkeypatch.setattr(
        engine, "new_decoder", lambda *a, **k: Opinionated(make(*a, **k), V.long(2), 40.0)
    )
    prefix = [V.velocity(20), V.note_on(LEAD, 60), V.shift(50), V.note_off(LEAD, 60), V.shift(50)]
    suffix = [V.velocity(20), V.note_on(LEAD, 64), V.shift(30), V.note_off(LEAD, 64)]
    prompt = [V.BOS, V.TASK_INFILL, V.part(HARMONY), *prefix, V.FILL_SUFFIX, *suffix]
    prompt.append(V.FILL_MIDDLE)
    gap_start, gap_end, suffix_ticks = 100, 300, 30  # grammar ticks; the suffix's length
    forced = {180: [V.velocity(20), V.note_on(LEAD, 62)], 240: [V.note_off(LEAD, 62)]}
    sched = Scheduler(engine, max_sessions=1)
    s = sched.open_session(
        prompt, [Parts(["harmony"]), TimeLimit(gap_end)], SamplingParams(seed=1), allow_end=True
    )
    s.generate(until_tick=gap_end + suffix_ticks, max_tokens=200)
    for tick, toks in forced.items():
        s.insert(tick + suffix_ticks, toks)  # session ticks
    sched.run_until_idle()
    middle = s.tokens()[len(prompt) :]
    at, t = {}, gap_start
    for i, tok in enumerate(middle):
        at.setdefault(i, t)
        t += V.shift_ticks(tok)
    for tick, toks in forced.items():
        i = next(i for i in range(len(middle)) if middle[i : i + len(toks)] == toks)
        assert at[i] == tick, (tick, at[i], [V.name(x) for x in middle])
