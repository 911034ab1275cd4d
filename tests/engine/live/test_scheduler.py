"""Live sessions: batched == one-by-one, rollback == fresh, append == prompt, forced events,
cancel, close, context overflow, the background thread. Random-weight tiny models in float64
(so batch composition can't flip a near-tie between two tokens)."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time

import pytest
import torch
from fake_decoders import Fixed as _Fixed
from fake_decoders import Opinionated as _Opinionated

from improv.engine.constraint_set import ConstraintSet
from improv.engine.constraints import (
    BeatGrid,
    Constraint,
    MaxDuration,
    NoteDensity,
    Parts,
    accompaniment_parts,
)
from improv.engine.engine import Engine
from improv.engine.live import (
    Done,
    Rollback,
    SamplingParams,
    Scheduler,
    SchedulerFull,
    Token,
    contiguous_runs,
    opens_pair,
    policy,
    scheduler,
    state,
)
from improv.engine.live.pool import SchedulerPool, auto_workers
from improv.engine.tokenizer.vocab import TokenizerConfig, TokenType, Vocab

V = Vocab(TokenizerConfig())


LEAD, COUNTER, HARMONY, BASS, DRUMS = range(5)
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=1.0, top_k=64, seed=7)


@pytest.fixture
def engine(make_model):
    return Engine.from_model(make_model(seed=1).double())


def make_prompt(n_events: int, task: int = V.TASK_CONTINUE) -> list[int]:
    """A valid prompt of about n_events events: a bass line with shifts."""
    out = [V.BOS, task, V.part(BASS), V.program(33)]
    for i in range(n_events):
        k = 36 + (i * 5) % 24
        out += [
            V.velocity(16 + i % 8),
            V.note_on(BASS, k),
            V.shift(10 + i % 30),
            V.note_off(BASS, k),
        ]
    return out


def drain(s) -> list:
    out = []
    while True:
        try:
            out.append(s.events.get_nowait())
        except queue.Empty:
            return out


def tokens_of(events: list, request: int | None = None) -> list[int]:
    return [e.token for e in events if isinstance(e, Token) and request in (None, e.request)]


def solo(engine, prompt: list[int], sampling: SamplingParams, n: int, **kw) -> list[int]:
    sched = Scheduler(engine, max_sessions=1, **kw)
    s = sched.open_session(prompt, sampling=sampling)
    s.generate(max_tokens=n)
    sched.run_until_idle()
    return tokens_of(drain(s))


def test_contiguous_runs():
    assert contiguous_runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (3, 5), (5, 6)]
    assert contiguous_runs([]) == []


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batched_equals_one_by_one_with_joins_and_leaves(engine, sampling):
    prompts = [make_prompt(n) for n in (0, 3, 9, 1, 6)]
    n = 24
    want = [solo(engine, p, sampling, n) for p in prompts]
    assert len({tuple(w) for w in want}) > 1  # the prompts matter

    sched = Scheduler(engine, max_sessions=4)
    first = [sched.open_session(p, sampling=sampling) for p in prompts[:3]]
    for s in first:
        s.generate(max_tokens=n)
    for _ in range(5):
        sched.step()
    first[1].close()  # leaves mid-run; its slot is free after the next step
    sched.step()
    late = [sched.open_session(p, sampling=sampling) for p in prompts[3:]]  # join mid-run
    for s in late:
        s.generate(max_tokens=n)
    for _ in range(3):
        sched.step()
    with pytest.raises(SchedulerFull):
        sched.open_session(prompts[0])
    sched.run_until_idle()
    got = [tokens_of(drain(s)) for s in first + late]
    assert got[0] == want[0] and got[2] == want[2]
    assert got[3] == want[3] and got[4] == want[4]
    assert 0 < len(got[1]) < n and got[1] == want[1][: len(got[1])]  # closed: a prefix
    assert sched.steps < 2 * (n + 5)  # batched: about one forward per token, not one per session


def test_rollback_then_regenerate_equals_fresh(engine):
    prompt = make_prompt(4)
    sched = Scheduler(engine, max_sessions=2)
    s = sched.open_session(prompt, sampling=SEEDED)
    s.generate(max_tokens=40)
    sched.run_until_idle()
    first = s.tokens()
    cut = len(prompt) + 15
    thrown = sched.stats["tokens_cut"]
    s.crop(cut)
    sched.run_until_idle()
    evs = drain(s)
    rb = [e for e in evs if isinstance(e, Rollback)][-1]
    assert rb.position <= cut and s.position == rb.position
    assert sched.stats["tokens_cut"] - thrown == len(first) - rb.position  # work thrown away
    s.generate(max_tokens=25)
    sched.run_until_idle()
    regen = tokens_of(drain(s))
    fresh = solo(engine, first[: rb.position], SEEDED, 25)
    assert regen == fresh
    # Position-keyed noise: the same prefix gives the same continuation as before the cut.
    assert s.tokens()[: len(first)] == first[: len(s.tokens())]

    # rollback_to_tick keeps exactly the tokens whose time is <= tick (whole events only).
    before = s.tokens()
    t = s.tick // 2
    s.rollback_to_tick(t)
    sched.run_until_idle()
    kept = s.tokens()
    assert kept == before[: len(kept)] and s.tick <= t
    assert s.tick == sum(V.shift_ticks(x) for x in kept)
    nxt = before[len(kept)]
    assert s.tick + V.shift_ticks(nxt) > t or opens_pair(V, nxt)


def test_append_equals_prompt(engine):
    p = make_prompt(5)
    extra = [V.velocity(20), V.note_on(HARMONY, 64), V.shift(12), V.note_off(HARMONY, 64)]
    sched = Scheduler(engine, max_sessions=2)
    a = sched.open_session(p, sampling=SEEDED)
    sched.run_until_idle()  # prompt prefilled first
    a.append(extra)
    a.generate(max_tokens=20)
    sched.run_until_idle()
    assert tokens_of(drain(a)) == solo(engine, p + extra, SEEDED, 20)


def test_a_wait_past_a_forced_event_lands_on_it_instead_of_becoming_notes(engine, monkeypatch):
    """A model that wants to wait 2 s, under melody notes every 150 ms: its shift is clipped
    to land on each note, and it plays nothing. Masking the shift instead would hand its
    probability to note events (the accompaniment would play on every melody note)."""
    make = engine.new_decoder
    monkeypatch.setattr(
        engine, "new_decoder", lambda *a, **k: _Opinionated(make(*a, **k), V.long(2), 40.0)
    )
    sched = Scheduler(engine, max_sessions=1)
    s = sched.open_session(
        [V.BOS, V.TASK_ACCOMPANY], constraints=[Parts(accompaniment_parts(V))], sampling=SEEDED
    )
    s.generate(until_tick=1500)
    for i, tick in enumerate(range(150, 1500, 150)):
        s.insert(tick, [V.velocity(20), V.note_on(LEAD, 60 + i)])
        s.insert(tick + 100, [V.note_off(LEAD, 60 + i)])
    sched.run_until_idle()
    sampled = tokens_of(drain(s))
    assert sampled and all(V.shift_base <= t < V.part_base for t in sampled), [
        V.name(t) for t in sampled
    ]
    # The last wait, a LONG one, is cut at the request's end (a SHIFT would go past it).
    assert s.tick == 1500 and ConstraintSet(V).check(s.tokens()) is None


def test_forced_events_handed_with_the_request_are_inserts_checked_first(engine):
    """`generate(forced=...)` is `generate` then `insert` for each, in one hand-over; a bad
    forced event is refused before a request is issued (the next request runs as usual)."""
    forced = [(150 * k, [V.velocity(20), V.note_on(LEAD, 60 + k)]) for k in range(1, 4)]
    runs = []
    for together in (False, True):
        sched = Scheduler(engine, max_sessions=1)
        s = sched.open_session([V.BOS, V.TASK_CONTINUE], sampling=SEEDED)
        if together:
            with pytest.raises(ValueError, match="tick must be >= 0"):
                s.generate(until_tick=600, forced=[(-5, [])])
            s.generate(until_tick=600, forced=forced)
        else:
            s.generate(until_tick=600)
            for tick, toks in forced:
                s.insert(tick, toks)
        sched.run_until_idle()
        events = drain(s)
        assert [e.reason for e in events if isinstance(e, Done)] == ["until_tick"]
        runs.append(s.tokens())
    assert runs[0] == runs[1]


def _accompanists(sched: Scheduler, n: int = 4, parts: list[str] | None = None) -> list:
    """n sessions playing only `parts` (default: the accompaniment), seeds 0..n-1."""
    return [
        sched.open_session(
            [V.BOS, V.TASK_ACCOMPANY],
            constraints=[Parts(parts or accompaniment_parts(V))],
            sampling=SamplingParams(temperature=1.0, seed=seed),
        )
        for seed in range(n)
    ]


def _accompaniment_notes(engine, max_retries: int, monkeypatch) -> tuple[int, list[Token]]:
    monkeypatch.setattr(policy, "MAX_NOTE_RETRIES", max_retries)
    sched = Scheduler(engine, max_sessions=4)
    sessions = _accompanists(sched)
    for s in sessions:
        s.generate(max_tokens=300)
    sched.run_until_idle()
    toks = [e for s in sessions for e in drain(s) if isinstance(e, Token)]
    return sum(V.on_base <= e.token < V.off_base for e in toks), toks


def test_a_note_the_constraints_forbid_is_not_turned_into_another_note(engine, monkeypatch):
    """A model that mostly wants melody notes, asked for accompaniment only: the melody notes
    it draws are rejected (VEL and ON) and drawn again, so it plays few notes, where masking
    the ON alone would turn each of them into an accompaniment note."""
    make = engine.new_decoder
    lead_ons = list(range(V.note_on(LEAD, 0), V.note_on(LEAD, 127) + 1))
    monkeypatch.setattr(
        engine, "new_decoder", lambda *a, **k: _Opinionated(make(*a, **k), lead_ons, 6.0)
    )
    rejecting, toks = _accompaniment_notes(engine, 8, monkeypatch)
    masking, _ = _accompaniment_notes(engine, 0, monkeypatch)
    assert masking > 20 and rejecting < masking / 2, (rejecting, masking)
    # A VEL is sent with its ON, never alone (its note may still be rejected).
    for a, b in zip(toks, toks[1:], strict=False):
        if V.vel_base <= a.token < V.on_base:
            assert V.on_base <= b.token < V.off_base and b.position == a.position + 1


def _under_a_melody(engine, monkeypatch, logits: torch.Tensor, backoffs: int) -> int:
    """Accompaniment notes (4 seeds) under a forced melody note every 50 ticks, held 40, from a
    model whose logits are `logits`."""
    monkeypatch.setattr(policy, "MAX_BACKOFFS", backoffs)
    melody = []
    for i, tick in enumerate(range(50, 1000, 50)):
        melody.append((tick, [V.velocity(20), V.note_on(LEAD, 72 + i % 12)]))
        melody.append((tick + 40, [V.note_off(LEAD, 72 + i % 12)]))
    return len(_onsets(engine, monkeypatch, logits, melody)[0])


@pytest.mark.parametrize("expects", ["melody notes", "melody note-offs"])
def test_a_melody_event_expected_after_a_wait_draws_the_wait_again(engine, monkeypatch, expects):
    """A model that waits 10 ticks, then expects a melody event (a note, or a note's end) more
    than it plays a harmony note, asked for accompaniment under a melody that comes every 50:
    the melody event it draws after a wait is not there, so the wait is drawn again, longer.
    Drawing another event in its place (the mask) would turn each melody event it expects
    into an accompaniment note."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    x[V.shift(10)] = 0.0
    x[V.velocity(16)] = 0.0
    x[[V.note_on(HARMONY, k) for k in range(48, 60)]] = -2.5
    x[[V.note_off(HARMONY, k) for k in range(48, 60)]] = 2.0
    if expects == "melody notes":
        x[[V.note_on(LEAD, k) for k in range(60, 72)]] = 0.0
    else:
        x[[V.note_off(LEAD, k) for k in range(72, 84)]] = 3.0
    waiting = _under_a_melody(engine, monkeypatch, x, policy.MAX_BACKOFFS)
    masking = _under_a_melody(engine, monkeypatch, x, 0)
    assert masking > 20 and waiting < masking / 2, (waiting, masking)


def _onsets(engine, monkeypatch, logits: torch.Tensor, forced: list[tuple[int, list[int]]]):
    """(ON ticks, ticks of the OFFs drawn right after a wait) of the accompaniment (4 seeds, until tick 1000) from a model whose
    logits are `logits`, with `forced` inserted up front."""
    make = engine.new_decoder
    monkeypatch.setattr(engine, "new_decoder", lambda *a, **k: _Fixed(make(*a, **k), logits))
    sched = Scheduler(engine, max_sessions=4)
    sessions = _accompanists(sched)
    for s in sessions:
        s.generate(until_tick=1000)
        for tick, toks in forced:
            s.insert(tick, toks)
    sched.run_until_idle()
    evs = [[e for e in drain(s) if isinstance(e, Token)] for s in sessions]
    on = [e.tick for ev in evs for e in ev if V.type_of(e.token) is TokenType.NOTE_ON]
    assert on and all(V.note_of(e.token)[0] == HARMONY for ev in evs for e in ev if e.token >= 306)
    # the ends drawn right after a wait
    ends = [
        b.tick
        for ev in evs
        for a, b in itertools.pairwise(ev)
        if V.type_of(a.token) is TokenType.TIME and V.type_of(b.token) is TokenType.NOTE_OFF
    ]
    return on, ends


def test_a_melody_note_drawn_after_a_wait_waits_for_the_melody(engine, monkeypatch):
    """A model that waits 10 ticks, then expects a melody note, with the melody's next note
    forced at tick 50: the wait is sent back to be drawn again at least to tick 50 (where the
    melody plays: the model waits for it and decides again there), not one tick longer (its
    waits crept 11, 12, ... until the back-offs ran out, and the mask drew a note at whatever
    tick that was)."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    x[V.shift(10)] = 0.0
    x[V.velocity(16)] = 0.0
    x[[V.note_on(LEAD, k) for k in range(60, 72)]] = 0.0
    make = engine.new_decoder
    monkeypatch.setattr(engine, "new_decoder", lambda *a, **k: _Fixed(make(*a, **k), x))
    sched = Scheduler(engine, max_sessions=1)
    (s,) = _accompanists(sched, n=1)
    s.generate(until_tick=1000)
    s.insert(50, [V.velocity(20), V.note_on(LEAD, 72)])
    st = None
    for _ in range(10):
        sched.step()
        st = sched.state(s)
        if st.marks.min_wait is not None:
            break
    assert st is not None and st.marks.min_wait is not None
    assert st.tick == 0 and st.marks.min_wait[1] == 50


def test_at_a_decision_point_a_melody_note_drawn_is_not_a_wait_sent_back(engine, monkeypatch):
    """Decision points (forced events with no tokens) at ticks 25, 125, ...: a model that waits
    10 ticks, then most wants a melody note, reaches them by a cut wait. A melody note it draws
    there is not a wait it chose (the cut chose the time) and the melody does not play there
    (it would have been forced): the draw is the masked one, a harmony note at the decision
    point, where sending the wait on would have skipped it."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    x[V.shift(10)] = 0.0
    x[V.velocity(16)] = 0.0
    x[[V.note_on(HARMONY, k) for k in range(48, 60)]] = -1.0
    x[[V.note_off(HARMONY, k) for k in range(48, 60)]] = 0.0
    x[[V.note_on(LEAD, k) for k in range(60, 72)]] = 2.0
    cuts = list(range(25, 1000, 100))
    on, _ = _onsets(engine, monkeypatch, x, [(t, []) for t in cuts])
    assert sum(t in cuts for t in on) >= len(cuts), (sorted(on), cuts)


def test_at_a_decision_point_no_note_ends(engine, monkeypatch):
    """A model that waits 10 ticks and then most wants to end a note: at the decision points
    (25, 125, ...) it reaches by a cut wait it ends none (the cut chose that time, not the
    model); it ends them after its own waits."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    x[V.shift(10)] = 0.0
    x[V.velocity(16)] = 0.0
    x[[V.note_on(HARMONY, k) for k in range(48, 60)]] = -1.0
    x[[V.note_off(HARMONY, k) for k in range(48, 60)]] = 3.0
    cuts = list(range(25, 1000, 100))
    _, ends = _onsets(engine, monkeypatch, x, [(t, []) for t in cuts])
    assert ends and not set(ends) & set(cuts), sorted(set(ends) & set(cuts))


def test_redraw_waits_draws_a_wait_again_afresh_not_longer(engine, monkeypatch):
    """An infill of the lead under given chords (`generate(redraw_waits=True)`): a model that
    waits 10 ticks, then expects a chord note more than it plays a lead note. The chord note it
    draws after a wait is known not to come then (given events are all inserted up front), so
    the (wait, note) pair is drawn again as it was: every wait stays 10 ticks, and the lead
    plays. Drawn longer (the back-off), the waits stretch past the lead's notes."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    x[V.shift(10)] = 0.0
    x[V.velocity(16)] = 0.0
    x[[V.note_on(HARMONY, k) for k in range(48, 60)]] = 0.0
    x[[V.note_on(LEAD, k) for k in range(60, 72)]] = -1.5
    x[[V.note_off(LEAD, k) for k in range(60, 72)]] = 2.0
    make = engine.new_decoder
    monkeypatch.setattr(engine, "new_decoder", lambda *a, **k: _Fixed(make(*a, **k), x))

    def lead(redraw: bool) -> tuple[int, set[int]]:
        sched = Scheduler(engine, max_sessions=4)
        sessions = _accompanists(sched, parts=["lead"])
        for s in sessions:
            s.generate(until_tick=1000, redraw_waits=redraw)
            for i, tick in enumerate(range(100, 1000, 100)):  # a chord note every second
                s.insert(tick, [V.velocity(20), V.note_on(HARMONY, 48 + i % 12)])
                s.insert(tick + 90, [V.note_off(HARMONY, 48 + i % 12)])
        sched.run_until_idle()
        evs = [e for s in sessions for e in drain(s) if isinstance(e, Token)]
        notes = [V.note_of(e.token) for e in evs if V.type_of(e.token) is TokenType.NOTE_ON]
        assert notes and all(part == LEAD for part, _ in notes)
        waits = {V.shift_ticks(e.token) for e in evs if V.type_of(e.token) is TokenType.TIME}
        return len(notes), waits

    (redrawn, redrawn_waits), (longer, longer_waits) = lead(True), lead(False)
    assert max(redrawn_waits) <= 10 < max(longer_waits), (redrawn_waits, longer_waits)
    assert redrawn > 2 * longer, (redrawn, longer)


def test_a_note_drawn_while_it_sounds_after_a_wait_draws_the_wait_again(engine, monkeypatch):
    """A model that strikes C4 over and over without ending it: C4 sounds already, so after a
    wait nothing new would be heard; the wait is drawn again, longer. Drawing another note in
    its place (as without a wait before it) would fill the time with the notes the model
    rarely wants (here, the rest of the octave)."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    x[V.shift(25)] = 0.0
    x[V.velocity(16)] = 3.0  # a note, mostly: then C4
    x[V.note_on(HARMONY, 60)] = 0.0
    x[[V.note_on(HARMONY, k) for k in range(61, 72)]] = -6.0  # the rest of the octave, rarely
    x[[V.note_off(HARMONY, k) for k in range(61, 72)]] = 0.0

    def notes(backoffs: int) -> list[tuple[int, int]]:
        monkeypatch.setattr(policy, "MAX_BACKOFFS", backoffs)
        make = engine.new_decoder
        monkeypatch.setattr(engine, "new_decoder", lambda *a, **k: _Fixed(make(*a, **k), x))
        sched = Scheduler(engine, max_sessions=1)
        s = sched.open_session([V.BOS, V.TASK_CONTINUE], sampling=SEEDED)
        s.generate(until_tick=1000)
        sched.run_until_idle()
        toks = [e.token for e in drain(s) if isinstance(e, Token)]
        return [V.note_of(t) for t in toks if V.type_of(t) is TokenType.NOTE_ON]

    waiting, masking = notes(policy.MAX_BACKOFFS), notes(0)
    assert waiting[0] == (HARMONY, 60) and len(masking) > 20
    assert len(waiting) < len(masking) / 2, (waiting, masking)


def test_a_wait_passes_the_end_of_a_request(engine, monkeypatch):
    """Live accompaniment moves its request's end every few ticks: a wait the model draws
    goes past the end as drawn, so the model's history never holds a wait cut into pieces
    (SHIFT_5 SHIFT_5 ...: never in training, and a choice the model did not make)."""
    make = engine.new_decoder
    monkeypatch.setattr(
        engine, "new_decoder", lambda *a, **k: _Opinionated(make(*a, **k), V.shift(50), 8.0)
    )
    sched = Scheduler(engine, max_sessions=1)
    s = sched.open_session(make_prompt(2, V.TASK_ACCOMPANY), sampling=SEEDED)
    start = s.tick
    dones = []
    for until in range(start + 5, start + 600, 5):
        s.generate(until_tick=until)
        sched.run_until_idle()
        dones += [e for e in drain(s) if isinstance(e, Done)]
    toks = s.tokens()[len(make_prompt(2, V.TASK_ACCOMPANY)) :]
    waits = [t for t in toks if V.shift_base <= t < V.part_base]
    # (cut at each end, every wait would be 5 ticks or less)
    assert len(waits) > 5 and sum(V.shift_ticks(t) > 5 for t in waits) > 0.8 * len(waits), [
        V.name(t) for t in waits
    ]
    assert all(d.tick <= start + 600 for d in dones)  # a Done's tick never passes its end
    assert {d.reason for d in dones} == {"until_tick"}


def test_a_rejected_note_draws_again_from_kept_logits(engine, monkeypatch):
    """A retry samples again from the logits the cache gave before the rejected VEL, without
    re-running a token: the same tokens as re-running it, in fewer forwards."""
    make = engine.new_decoder
    lead_ons = list(range(V.note_on(LEAD, 0), V.note_on(LEAD, 127) + 1))
    monkeypatch.setattr(
        engine, "new_decoder", lambda *a, **k: _Opinionated(make(*a, **k), lead_ons, 3.0)
    )

    monkeypatch.setattr(policy, "MAX_BACKOFFS", 0)  # every rejection a retry of the note

    def run(kept: int) -> tuple[list[tuple[int, int]], int, int]:
        monkeypatch.setattr(state, "LOGITS_KEPT", kept)
        sched = Scheduler(engine, max_sessions=2)
        s = sched.open_session(
            [V.BOS, V.TASK_ACCOMPANY],
            constraints=[Parts(accompaniment_parts(V))],
            sampling=SamplingParams(temperature=1.0, seed=5),
        )
        s.generate(max_tokens=150)
        sched.run_until_idle()
        toks = [(e.token, e.position) for e in drain(s) if isinstance(e, Token)]
        return toks, sched.steps, sched.stats["notes_rejected"]

    kept, kept_steps, rejected = run(2)
    rerun, rerun_steps, _ = run(0)
    assert rejected > 10
    assert kept == rerun
    assert kept_steps < rerun_steps - rejected


def test_a_held_vel_is_sent_with_its_on_under_the_request_that_accepts_it(engine):
    """A request superseded between a VEL and its ON (accompaniment renews its lookahead
    request all the time): the pair reaches the listener together, under the new request."""
    sched = Scheduler(engine, max_sessions=1)
    s = sched.open_session(make_prompt(2), sampling=SEEDED)
    s.generate(max_tokens=400)
    for _ in range(400):
        sched.step()
        if sched.state(s).vel_held():
            break
    assert sched.state(s).vel_held(), "no VEL sampled"
    rid = s.generate(max_tokens=20)
    sched.run_until_idle()
    toks = [e for e in drain(s) if isinstance(e, Token)]
    for a, b in zip(toks, toks[1:], strict=False):
        if V.vel_base <= a.token < V.on_base:
            assert V.on_base <= b.token < V.off_base and a.request == b.request
    assert any(V.vel_base <= e.token < V.on_base and e.request == rid for e in toks)


def test_beat_grid_puts_generated_events_on_the_grid_except_at_forced_events(engine):
    grid = {round(7 + k * 12.5 + 1e-9) for k in range(200)}  # 16ths at 120 bpm from 70 ms
    forced = {101: [V.velocity(20), V.note_on(LEAD, 60)], 183: [V.note_off(LEAD, 60)]}
    prompt = make_prompt(3)
    start = sum(V.shift_ticks(t) for t in prompt)
    sched = Scheduler(engine, max_sessions=5)
    sessions = []
    for seed in range(5):  # a random tiny model plays few notes: several takes
        sp = SamplingParams(temperature=1.0, top_k=64, seed=seed)
        cons = [BeatGrid(12.5, 7), MaxDuration(8.0)]  # as the server's live sessions
        s = sched.open_session(prompt, constraints=cons, sampling=sp)
        for tick, toks in forced.items():
            s.insert(tick, toks)
        sessions.append(s)
    for horizon in [*range(90, 2000, 90), 2000]:  # lookahead requests: time stops off grid
        for s in sessions:
            s.generate(until_tick=horizon)
        sched.run_until_idle()
    times = []
    for s in sessions:
        # Where generated notes start and end (a clipped shift may pass through an off-grid
        # tick inside its own time tokens, but nothing happens there).
        times += [e.tick for e in drain(s) if isinstance(e, Token) and e.token >= V.on_base]
        assert s.tick >= 2000 and ConstraintSet(V).check(s.tokens()) is None
    assert len(times) > 10
    # On the grid, or at a forced event (a ceiling), or where generation started.
    assert set(times) <= grid | set(forced) | {start}, sorted(set(times) - grid)
    # The session's own copy, to move the grid while it runs (the tempo changed).
    assert s.constraint(BeatGrid).grid == (12.5, 7.0) and s.constraint(NoteDensity) is None


def test_forced_events_land_at_their_ticks_and_rollback_when_late(make_model):
    engine = Engine.from_model(make_model(seed=1, max_seq_len=1024).double())
    sched = Scheduler(engine, max_sessions=2)
    acc = [Parts(accompaniment_parts(V)), NoteDensity(10.0)]  # density: keeps the test short
    s = sched.open_session([V.BOS, V.TASK_ACCOMPANY], constraints=acc, sampling=SEEDED)
    s.generate(until_tick=300)
    forced = {100: [V.velocity(20), V.note_on(LEAD, 60)], 180: [V.note_off(LEAD, 60)]}
    for tick, toks in forced.items():
        s.insert(tick, toks)
    sched.run_until_idle()
    evs = drain(s)
    assert [(e.reason, e.tick) for e in evs if isinstance(e, Done)] == [("until_tick", 300)]
    assert s.tick >= 300  # its last wait may pass the end (a later event rolls it back)
    toks = s.tokens()
    assert ConstraintSet(V).check(toks) is None  # the whole sequence is grammatical
    at = _tick_index(toks)
    for tick, ft in forced.items():
        i = _find(toks, ft)
        assert at[i] == tick, (tick, at[i])
    sampled = tokens_of(evs)
    assert not any(V.on_base + LEAD * 128 <= t < V.on_base + (LEAD + 1) * 128 for t in sampled)
    assert not any(e.token in forced[100] + forced[180] for e in evs if isinstance(e, Token))

    # A player event the model already ran past: roll back to it, insert, continue.
    late = [V.velocity(25), V.note_on(LEAD, 67)]
    s.generate(until_tick=400)
    s.insert(250, late)
    sched.run_until_idle()
    evs = drain(s)
    rb = [e for e in evs if isinstance(e, Rollback)]
    assert len(rb) == 1 and rb[0].tick <= 250
    toks = s.tokens()
    i = _find(toks, late)
    assert _tick_index(toks)[i] == 250 and i >= rb[0].position
    assert s.tick >= 400 and ConstraintSet(V).check(toks) is None
    assert s.window_start == 0  # no slide in this test: s.tokens() is the whole sequence


def test_clock_floor_never_places_an_event_before_now(make_model):
    engine = Engine.from_model(make_model(seed=1, max_seq_len=1024).double())
    sched = Scheduler(engine, max_sessions=1)
    acc = [Parts(accompaniment_parts(V)), NoteDensity(10.0)]
    # seed 5: without the floor, this model answers the player's note at its own tick (120)
    seeded = SamplingParams(temperature=1.0, top_k=64, seed=5)
    s = sched.open_session([V.BOS, V.TASK_ACCOMPANY], constraints=acc, sampling=seeded)
    now = {"tick": 200.0}
    s.set_clock(lambda: now["tick"])
    lead = [V.velocity(20), V.note_on(LEAD, 60)]
    s.insert(120, lead)  # the player's event, before the clock's now: given where it was played
    s.generate(until_tick=400)
    sched.run_until_idle()
    evs = drain(s)
    toks = s.tokens()
    at = _tick_index(toks)
    assert at[_find(toks, lead)] == 120
    sampled = [e for e in evs if isinstance(e, Token)]
    events = [e for e in sampled if V.type_of(e.token) is not TokenType.TIME]
    assert events and min(e.tick for e in events) >= 200
    assert s.lag["pushes"] >= 1 and s.lag["ticks"] >= 200 - 120
    assert ConstraintSet(V).check(toks) is None and s.tick >= 400

    # The floor moves with the clock; a rollback to a late player event undoes the waits it
    # put in, like any sampled token.
    now["tick"] = 500.0
    s.generate(until_tick=600)
    s.insert(450, [V.note_off(LEAD, 60)])
    sched.run_until_idle()
    evs = drain(s)
    events = [e for e in evs if isinstance(e, Token) and V.type_of(e.token) is not TokenType.TIME]
    assert all(
        e.tick >= 500 for e in events if e.position > _find(s.tokens(), [V.note_off(LEAD, 60)])
    )
    toks = s.tokens()
    assert _tick_index(toks)[_find(toks, [V.note_off(LEAD, 60)])] == 450
    assert ConstraintSet(V).check(toks) is None and s.tick >= 600

    # No request running: the clock does nothing.
    before = dict(s.lag)
    now["tick"] = 5000.0
    s.insert(650, [V.velocity(20), V.note_on(LEAD, 62)])
    sched.run_until_idle()
    assert s.lag == before and s.tick == 650


@pytest.mark.parametrize("seed", [5, 6, 7, 8, 9, 10])
def test_behind_the_clock_the_model_draws_at_its_own_time(make_model, seed):
    """The player's event comes late (the model's time rolled back to it, the clock 80 ticks
    on): the model draws right after it, at its own time. An event it draws (it plays with the
    player) goes out at the floor; a wait it draws ends at the floor or after it, in its own
    rhythm. Time was pushed to the floor first before, and the model drew there, a few ms after
    the player's event, off any grid (the default model on a POP909 song, in virtual time: 2.7x
    the offline note count)."""
    engine = Engine.from_model(make_model(seed=1, max_seq_len=1024).double())
    sched = Scheduler(engine, max_sessions=1)
    acc = [Parts(accompaniment_parts(V)), NoteDensity(10.0)]
    s = sched.open_session(
        [V.BOS, V.TASK_ACCOMPANY], constraints=acc, sampling=SamplingParams(top_k=64, seed=seed)
    )
    s.set_clock(lambda: 200.0)
    lead = [V.velocity(20), V.note_on(LEAD, 60)]
    s.insert(120, lead)
    s.generate(until_tick=400)
    sched.run_until_idle()
    toks = s.tokens()
    i = _find(toks, lead) + len(lead)
    sampled = {e.position: e for e in drain(s) if isinstance(e, Token)}
    if i in sampled:  # the model's own wait, from the player's event past the floor
        assert V.type_of(toks[i]) is TokenType.TIME and V.shift_ticks(toks[i]) >= 200 - 120
    else:  # the floor's wait, then the event the model drew there (not a wait from the floor)
        assert V.type_of(toks[i + 1]) is not TokenType.TIME
        assert sampled[i + 1].tick >= 200
    assert s.lag["pushes"] >= 1
    assert ConstraintSet(V).check(toks) is None


def _assert_cache_is_the_context(engine, sched, s) -> None:
    """The session's cache == a fresh prefill of its context (head + tokens): same logits."""
    ctx = s.context()
    assert sched.decoder.length(s.slot) == len(ctx)
    probe = V.shift(7)
    got = sched.decoder.extend([s.slot], [[probe]])[0]
    sched.decoder.crop(s.slot, len(ctx))
    ref = engine.new_decoder(1).extend([0], [ctx + [probe]])[0]
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


def test_shadow_slide_swaps_in_the_slid_context_without_blocking(engine):
    sched = Scheduler(engine, max_sessions=2, max_len=128, keep_len=64, shadow_chunk=8)
    assert sched.shadow_len == 96
    s = sched.open_session(make_prompt(20), sampling=SEEDED)  # 84 tokens
    s.generate(max_tokens=150)
    sched.run_until_idle()
    toks = [e for e in drain(s) if isinstance(e, Token)]
    assert [e.position for e in toks] == list(range(84, 84 + 150))
    assert sched.stats["slides"] >= 2 and sched.stats["blocking_slides"] == 0
    assert s.window_start > 0 and sched.decoder.length(s.slot) <= 128
    assert ConstraintSet(V).check(s.context()) is None
    _assert_cache_is_the_context(engine, sched, s)


def test_an_idle_session_past_shadow_len_slides_in_the_background(engine):
    sched = Scheduler(engine, max_sessions=1, max_len=128, keep_len=64, shadow_chunk=8)
    s = sched.open_session(make_prompt(25), sampling=SEEDED)  # 104 tokens, no request
    sched.run_until_idle()
    assert sched.stats["slides"] == 1 and sched.stats["blocking_slides"] == 0
    assert s.window_start > 0 and s.position == 104
    _assert_cache_is_the_context(engine, sched, s)


@pytest.mark.parametrize("where", ["after_start", "inside_window", "before_window"])
def test_a_rollback_during_the_shadow_prefill_keeps_it_right(engine, where):
    sched = Scheduler(engine, max_sessions=1, max_len=128, keep_len=64, shadow_chunk=8)
    s = sched.open_session(make_prompt(20), sampling=SEEDED)
    s.generate(max_tokens=40)
    while sched.slider.owner is None:  # run until a shadow prefill is under way
        assert sched.step()
    sh = sched.state(s).shadow
    while sh.fed == 0:  # fed once the session nears overflow (it samples all along)
        assert sched.step()
    assert sched.state(s).shadow is sh
    target = {
        "after_start": s.position - 2,
        "inside_window": sh.start - 4,
        "before_window": sh.start - sh.kept - 2,
    }[where]
    s.crop(target)
    sched.step()
    # cut inside the shadow's window: it is cut too; before it: dropped (made again later)
    assert (sched.state(s).shadow is None) == (where == "before_window")
    s.generate(max_tokens=60)
    sched.run_until_idle()
    assert sched.stats["blocking_slides"] == 0
    assert ConstraintSet(V).check(s.context()) is None
    _assert_cache_is_the_context(engine, sched, s)


def _tick_index(toks: list[int]) -> list[int]:
    """Token time at each index (before the token's own shift)."""
    out, t = [], 0
    for tok in toks:
        out.append(t)
        t += V.shift_ticks(tok)
    return out


def _find(toks: list[int], sub: list[int]) -> int:
    for i in range(len(toks) - len(sub) + 1):
        if toks[i : i + len(sub)] == sub:
            return i
    raise AssertionError(f"{sub} not in tokens")


def test_cancel_stops_at_the_next_step_and_close_frees(engine):
    sched = Scheduler(engine, max_sessions=2)
    s = sched.open_session(make_prompt(2), sampling=SEEDED)
    rid = s.generate(max_tokens=500)
    for _ in range(6):
        sched.step()
    before = tokens_of(drain(s))
    s.cancel()
    sched.step()
    sched.step()
    after = drain(s)
    assert tokens_of(after) == []
    assert [(e.request, e.reason) for e in after if isinstance(e, Done)] == [(rid, "cancelled")]
    assert 0 < len(before) < 500
    assert sched.n_open == 1
    s.close()
    s.close()  # safe twice
    sched.step()
    assert sched.n_open == 0 and s.closed
    s.generate(max_tokens=3)  # after close: ignored
    sched.step()
    assert tokens_of(drain(s)) == []
    t = sched.open_session([V.BOS, V.TASK_CONTINUE])
    assert t.slot in (0, 1)


class NotesOnly(Constraint):
    """Only a note may start next (no time, no note-off): the server's respond lead-in."""

    def restrict(self, cand, state, vocab, own) -> None:
        cand.time_ok[:] = False
        cand.off_ok[:] = False
        cand.end_ok[:] = False


class Explodes(Constraint):
    def restrict(self, cand, state, vocab, own) -> None:
        raise RuntimeError("boom")


def test_conflicting_constraints_fall_back_without_an_error(engine):
    """A note past its MaxDuration deadline while another constraint forbids its note-off (and
    time): nothing is allowed, and the fallback's SHIFT_1 is sampled although the time ceiling
    (the deadline) is behind: time goes on, the request doesn't fail (it used to raise in clip
    and end every session's request)."""
    sched = Scheduler(engine, max_sessions=1)
    prompt = [V.BOS, V.TASK_CONTINUE, V.velocity(20), V.note_on(LEAD, 60)]
    s = sched.open_session(prompt, [MaxDuration(0.5, ["lead"]), NotesOnly()], SEEDED)
    s.generate(max_tokens=5, start_tick=200)  # 2 s after the note began: deadline passed
    sched.run_until_idle()
    done = [e for e in drain(s) if isinstance(e, Done)]
    assert [d.reason for d in done] == ["max_tokens"]


def test_a_failing_session_ends_alone(engine):
    """One session's step raising ends its own request with "error"; the others go on."""
    sched = Scheduler(engine, max_sessions=2)
    good = sched.open_session(make_prompt(2), sampling=SEEDED)
    bad = sched.open_session(make_prompt(2), [Explodes()], SEEDED)
    rg, rb = good.generate(max_tokens=20), bad.generate(max_tokens=20)
    sched.run_until_idle()
    g, b = drain(good), drain(bad)
    assert [(e.request, e.reason) for e in b if isinstance(e, Done)] == [(rb, "error")]
    assert [(e.request, e.reason) for e in g if isinstance(e, Done)] == [(rg, "max_tokens")]
    assert len(tokens_of(g)) == 20


def test_context_overflow_slides_and_keeps_positions(engine):
    # keep_len 64: room for the state header of a random model holding a dozen notes (a state
    # that can't fit is truncated, and then the window is no longer a valid sequence).
    sched = Scheduler(engine, max_sessions=2, max_len=96, keep_len=64)
    s = sched.open_session(make_prompt(3), sampling=SEEDED)
    s.generate(max_tokens=150)
    sched.run_until_idle()
    evs = drain(s)
    toks = [e for e in evs if isinstance(e, Token)]
    assert [e.position for e in toks] == list(range(toks[0].position, toks[0].position + 150))
    assert s.window_start > 0 and sched.decoder.length(s.slot) <= 96
    ctx = s.context()
    assert ctx[:2] == [V.BOS, V.TASK_CONTINUE]
    assert ConstraintSet(V).check(ctx) is None  # the slid context is a valid sequence
    # Rollback can't reach before the window start: clamped there.
    s.crop(1)
    sched.run_until_idle()
    assert s.position >= s.window_start
    # It keeps generating after the cut and another slide.
    s.generate(max_tokens=80)
    sched.run_until_idle()
    assert len(tokens_of(drain(s))) == 80


def test_background_thread_callbacks_and_cancel_from_another_thread(engine, monkeypatch, caplog):
    monkeypatch.setattr(scheduler, "REPORT_EVERY_S", 0.0)  # the load line, at every loop
    caplog.set_level("INFO", logger="improv.engine.live")
    got: list[tuple[bool, object]] = []
    cancelled = threading.Event()
    done = threading.Event()
    started = threading.Event()

    def on_event(ev):
        got.append((cancelled.is_set(), ev))
        if isinstance(ev, Token) and ev.position > 20:
            started.set()
        if isinstance(ev, Done):
            done.set()

    with Scheduler(engine, max_sessions=3) as sched:
        others = [sched.open_session(make_prompt(i), sampling=GREEDY) for i in (1, 2)]
        for o in others:
            o.generate(max_tokens=10)
        s = sched.open_session(make_prompt(1), sampling=SEEDED, on_event=on_event)
        s.generate(max_tokens=100_000)
        assert started.wait(20)
        s.cancel()
        cancelled.set()
        assert done.wait(20)
        s.close()
    assert not any(after and isinstance(ev, Token) for after, ev in got)
    assert [ev.reason for _, ev in got if isinstance(ev, Done)] == ["cancelled"]
    for o in others:
        assert len(tokens_of(drain(o))) == 10
    assert any(
        "scheduler: " in r.getMessage() and "tokens/s" in r.getMessage() for r in caplog.records
    )


def _late_sounds(make_model, measured_lead: bool) -> tuple[int, int]:
    """(ONs and OFFs that went out after their time, all of them) for an accompanist behind
    real time on a fake clock: each forward takes 4 ms, every 4th 40 ms (a rollback's
    prefill, a stall), and the model plays a harmony note or ends one every 20 ms."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    # (a wait drawn past the clock floor: the shortest the model allows, mostly)
    x[[V.shift(k) for k in range(3, 101)]] = -4.0 - torch.arange(3, 101, dtype=torch.float64)
    x[V.shift(2)] = x[V.velocity(20)] = 0.0
    for pitch in range(48, 60):
        x[V.note_on(HARMONY, pitch)] = x[V.note_off(HARMONY, pitch)] = 0.0
    engine = Engine.from_model(make_model(seed=1, max_seq_len=1024).double())
    t = {"now": 0.0, "calls": 0}

    class Slow(_Fixed):
        def extend(self, slots, tokens, all_logits: bool = False):
            t["calls"] += 1
            t["now"] += 0.040 if t["calls"] % 4 == 0 else 0.004
            return super().extend(slots, tokens, all_logits)

    make = engine.new_decoder
    engine.new_decoder = lambda *a, **k: Slow(make(*a, **k), x)
    sched = Scheduler(engine, max_sessions=1)
    sched.now = lambda: t["now"]
    if not measured_lead:
        sched.timing.event_out = lambda wait_s: None
    out: list[tuple[Token, float]] = []
    s = sched.open_session(
        [V.BOS, V.TASK_ACCOMPANY],
        constraints=[Parts(accompaniment_parts(V))],
        sampling=SamplingParams(seed=3),
        on_event=lambda ev: out.append((ev, t["now"])) if isinstance(ev, Token) else None,
    )
    tps = V.ticks_per_second
    s.set_clock(lambda: t["now"] * tps)
    s.generate(until_tick=500)
    sched.run_until_idle()
    sounds = [(ev, at) for ev, at in out if ev.token >= V.on_base]
    return sum(at > ev.tick / tps for ev, at in sounds), len(sounds)


def test_clock_floor_allows_for_the_measured_event_lead(make_model):
    """The floor leaves room for the time an event really takes to go out after it is checked
    (its quantile over recent events), not for two average steps: with uneven steps, events
    placed by the average alone go out late."""
    late, n = _late_sounds(make_model, measured_lead=True)
    late_avg, n_avg = _late_sounds(make_model, measured_lead=False)
    assert n >= 20 and n_avg >= 20
    assert late / n < 0.1
    assert late_avg / n_avg > 3 * late / n


def test_a_chord_due_to_end_behind_the_clock_ends_at_the_floor(make_model):
    """A chord past its MaxDuration deadline, the player's note sounding, the model behind the
    clock: no time may pass until the chord ends, so the floor's wait is pushed and every OFF
    goes after it. The model expects the player's note to end: that OFF drawn after the push
    sent the push back to be drawn longer, but no wait may be drawn there, and the OFFs were
    drawn at the old tick, behind the clock, one a step (bench_live_harmony's late note-offs)."""
    x = torch.full((V.size,), -30.0, dtype=torch.float64)
    x[V.note_off(LEAD, 72)] = 0.0  # the player's note ending: what the model expects most
    x[[V.note_off(HARMONY, k) for k in (48, 52, 55, 59)]] = -1.0
    x[[V.shift(k) for k in range(1, 101)]] = -3.0
    engine = Engine.from_model(make_model(seed=1, max_seq_len=1024).double())
    make = engine.new_decoder
    engine.new_decoder = lambda *a, **k: _Fixed(make(*a, **k), x)
    sched = Scheduler(engine, max_sessions=1)
    sched.now = lambda: 0.0  # no step time: the floor is the clock (+ the send's 2 ms)
    chord = [t for k in (48, 52, 55, 59) for t in (V.velocity(20), V.note_on(HARMONY, k))]
    prompt = [V.BOS, V.TASK_ACCOMPANY, *chord, V.velocity(20), V.note_on(LEAD, 72), V.shift(50)]
    acc = [Parts(accompaniment_parts(V)), MaxDuration(0.3, ["harmony"])]  # due at tick 30
    s = sched.open_session(prompt, constraints=acc, sampling=SamplingParams(seed=3))
    s.set_clock(lambda: 70.0)  # 20 ticks ahead of the model's time (50)
    s.generate(until_tick=120)
    sched.run_until_idle()
    offs = [e for e in drain(s) if isinstance(e, Token) and e.token >= V.off_base]
    assert {V.note_of(e.token) for e in offs} >= {(HARMONY, k) for k in (48, 52, 55, 59)}
    assert min(e.tick for e in offs) >= 70


# --- musicians first, and decode workers -----------------------------------------------------


def _record_feeds(sched: Scheduler) -> list[dict[int, int]]:
    """Per decoder call: {slot: tokens fed}; the caller splits them by step."""
    calls: list[dict[int, int]] = []
    extend = sched.decoder.extend

    def recording(slots, toks):
        calls.append({s: len(t) for s, t in zip(slots, toks, strict=True)})
        return extend(slots, toks)

    sched.decoder.extend = recording  # type: ignore[method-assign]
    return calls


def test_live_tokens_go_out_every_step_while_batch_work_fills_the_budget(engine):
    budget = 2  # fewer tokens than batch sessions: they take turns
    sched = Scheduler(engine, max_sessions=6, batch_tokens=budget)
    big = sched.open_session(make_prompt(120), sampling=SEEDED, priority="batch")  # ~480 tokens
    decoders = [
        sched.open_session(make_prompt(2), sampling=SEEDED, priority="batch") for _ in range(3)
    ]
    for s in decoders:
        s.generate(max_tokens=200)
    big.generate(max_tokens=20)
    sched.step()  # the batch sessions' own start (no live session yet: unlimited)
    live = sched.open_session(make_prompt(3), sampling=SEEDED)
    live.generate(max_tokens=40)
    sched.step()  # the live prompt's prefill (never limited)
    calls = _record_feeds(sched)
    batch_ids = {s.id for s in [big, *decoders]}
    for _ in range(30):
        before = dict(sched.stats)
        calls.clear()
        sched.step()
        live_sampled = (sched.stats["tokens"] - before["tokens"]) - (
            sched.stats["batch_tokens"] - before["batch_tokens"]
        )
        assert live_sampled == 1  # the live session draws in every step
        batch_slots = {sched.state(s).slot for s in [big, *decoders] if s.id in batch_ids}
        fed = sum(n for c in calls for slot, n in c.items() if slot in batch_slots)
        assert fed <= budget  # a 256-token prefill chunk would have been fed without priority
    st = sched.state(big)
    assert 0 < st.cached < len(make_prompt(120))  # the prefill moved on, a little at a time
    assert sched.stats["batch_deferred"] > 0
    # Every batch session had turns (least recently served first): none starved.
    assert all(len(tokens_of(drain(s))) > 0 for s in decoders)
    live.close()
    sched.run_until_idle()  # no live work: the batch sessions run unlimited to the end
    assert len(tokens_of(drain(big))) > 0


def test_batch_sessions_alone_run_as_before(engine):
    """With no live session, priority changes nothing: the same tokens as one by one."""
    prompts = [make_prompt(n) for n in (1, 5, 9)]
    want = [solo(engine, p, GREEDY, 16) for p in prompts]
    sched = Scheduler(engine, max_sessions=3, batch_tokens=1)
    ss = [sched.open_session(p, sampling=GREEDY, priority="batch") for p in prompts]
    for s in ss:
        s.generate(max_tokens=16)
    sched.run_until_idle()
    assert [tokens_of(drain(s)) for s in ss] == want


def test_priority_is_checked_at_the_call(engine):
    sched = Scheduler(engine, max_sessions=1)
    with pytest.raises(ValueError, match="priority"):
        sched.open_session([V.BOS, V.TASK_CONTINUE], priority="urgent")  # type: ignore[arg-type]


def test_workers_place_sessions_on_the_least_loaded_and_sample_as_one(engine):
    prompts = [make_prompt(n) for n in (0, 3, 9, 1)]
    want = [solo(engine, p, SEEDED, 24) for p in prompts]
    pool = SchedulerPool(engine, workers=2, max_sessions=2)
    ss = [pool.open_session(p, sampling=SEEDED) for p in prompts]
    assert [pool.worker_of(s) for s in ss] == [0, 1, 0, 1]
    assert len({s.id for s in ss}) == 4  # ids unique over the workers
    with pytest.raises(SchedulerFull):
        pool.open_session(prompts[0])
    with pool:  # both threads decode
        for s in ss:
            s.generate(max_tokens=24)
        got = []
        for s in ss:
            got.append([])
            while len(got[-1]) < 24:
                ev = s.events.get(timeout=30)
                if type(ev).__name__ == "Token":
                    got[-1].append(ev.token)
        ss[2].close()
        ss[0].close()
        for w in pool.workers:  # the closes free their slots at the workers' next steps
            w._queue.wake()
        deadline = time.monotonic() + 10
        while pool.n_open > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        again = pool.open_session(prompts[0])
        assert pool.worker_of(again) == 0  # the emptier worker
        for s in (again, ss[1], ss[3]):
            s.close()
    assert got == want
    assert pool.stats["tokens"] >= 4 * 24
    assert pool.max_sessions == 4


def test_auto_workers_keep_sessions_to_batch():
    assert auto_workers(4, cores=16) == 1  # too few sessions to split
    assert auto_workers(32, cores=2) == 2  # both cores decode (the loop needs < 10% of one)
    assert auto_workers(8, cores=2) == 1 and auto_workers(32, cores=1) == 1
    assert auto_workers(32, cores=8) == 4 and auto_workers(64, cores=8) == 7


def test_note_share_draws_a_rejected_note_again_masked(engine, monkeypatch):
    """note_share: after one rejected ON (no wait before it), the event is drawn again with the
    VELs scaled by the allowed share and the ON masked: fewer rejections, still only allowed
    notes, a VEL still sent with its ON."""
    make = engine.new_decoder
    lead_ons = list(range(V.note_on(LEAD, 0), V.note_on(LEAD, 127) + 1))
    monkeypatch.setattr(
        engine, "new_decoder", lambda *a, **k: _Opinionated(make(*a, **k), lead_ons, 3.0)
    )
    monkeypatch.setattr(policy, "MAX_BACKOFFS", 0)  # every rejection a retry of the note

    def run(share: bool) -> tuple[list[Token], int]:
        sched = Scheduler(engine, max_sessions=4, note_share=share)
        sessions = _accompanists(sched)
        for s in sessions:
            s.generate(max_tokens=150)
        sched.run_until_idle()
        return [e for s in sessions for e in drain(s) if isinstance(e, Token)], sched.stats[
            "notes_rejected"
        ]

    retried, n_retried = run(False)
    shared, n_shared = run(True)
    assert n_shared < n_retried, (n_shared, n_retried)
    for toks in (retried, shared):
        ons = [V.note_of(e.token) for e in toks if V.type_of(e.token) is TokenType.NOTE_ON]
        assert ons and all(part != LEAD for part, _ in ons)
    for a, b in zip(shared, shared[1:], strict=False):
        if V.vel_base <= a.token < V.on_base:
            assert V.on_base <= b.token < V.off_base and b.position == a.position + 1


def test_a_batch_row_over_the_budget_still_gets_its_turn(engine):
    """A budget smaller than a batch row's pending tokens: the first in line goes anyway (over
    the budget), so no batch session waits forever behind live ones."""
    sched = Scheduler(engine, max_sessions=2, batch_tokens=1)
    batch = sched.open_session(make_prompt(2), sampling=SEEDED, priority="batch")
    live = sched.open_session(make_prompt(2), sampling=SEEDED)
    live.generate(max_tokens=200)
    for _ in range(3):
        sched.step()
    batch.append([V.shift(5), V.shift(7)])  # two tokens to feed: more than the budget
    batch.generate(max_tokens=5)
    for _ in range(40):
        sched.step()
    assert len(tokens_of(drain(batch))) == 5
    live.close()
    batch.close()
    sched.run_until_idle()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux's")
def test_a_niced_scheduler_thread_lowers_its_own_priority_only(engine):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with Scheduler(engine, max_sessions=1, nice=3) as sched:
        deadline = time.monotonic() + 5
        tid = sched._thread.native_id
        while os.getpriority(os.PRIO_PROCESS, tid) == base and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(base + 3, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling thread is untouched
