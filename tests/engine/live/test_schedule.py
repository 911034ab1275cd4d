"""The session's schedule (`LiveSession.schedule`): a clock's and a chart's marks forced at their
ticks while a request runs, written before a player's event after them, rolled back with what
follows them and written again, replaced from a tick on."""

from __future__ import annotations

import pytest

from improv.engine.constraints import GivenMarks, Parts
from improv.engine.engine import Engine
from improv.engine.live import SamplingParams, Scheduler
from improv.engine.tokenizer.harmony import chord_index
from improv.engine.tokenizer.vocab import TokenizerConfig, Vocab

HARMONY = TokenizerConfig(harmony=True)
V = Vocab(HARMONY)
C, AM = V.chord(chord_index(0, "maj")), V.chord(chord_index(9, "min"))


@pytest.fixture(scope="module")
def engine(make_model):
    return Engine.from_model(make_model(seed=2, vocab_size=V.size), HARMONY)


def open_session(engine):
    sched = Scheduler(engine, max_sessions=1)
    s = sched.open_session(
        [V.BOS, V.TASK_ACCOMPANY],
        [Parts(["harmony"]), GivenMarks(beats=True, chords=True)],
        SamplingParams(seed=5),
    )
    return sched, s


def mark_ticks(tokens: list[int]) -> list[tuple[int, int]]:
    """(tick, token) of every mark in a token list."""
    out, tick = [], 0
    for t in tokens:
        tick += V.shift_ticks(t)
        if t in (V.BAR, V.BEAT) or V.chord_base <= t < V.chord_base + 181:
            out.append((tick, t))
    return out


def beats(n: int, step: int = 50, first: int = 0, shift: int = 0) -> list[tuple[int, list[int]]]:
    """Beats `first`..`first + n - 1` of a 4/4 clock, `shift` ticks late."""
    return [(i * step + shift, [V.BAR if i % 4 == 0 else V.BEAT]) for i in range(first, first + n)]


def test_marks_are_forced_at_their_ticks_and_the_model_writes_none(engine):
    sched, s = open_session(engine)
    marks = beats(8)
    marks[0] = (0, [V.BAR, C])
    marks[4] = (200, [V.BAR, AM])
    s.schedule(0, marks)
    s.generate(until_tick=380)
    sched.run_until_idle()
    got = mark_ticks(s.tokens())
    want = [(t, x) for t, toks in marks for x in toks]
    assert got == want  # each at its tick, in order, nothing of the model's own


def test_a_player_event_before_a_written_mark_goes_before_it(engine):
    """The model ran past two beats; the player's note comes between them: the later beat is
    rolled back with the model's tokens, the note goes at its tick, the beat is written again."""
    sched, s = open_session(engine)
    s.schedule(0, beats(4))
    s.generate(until_tick=160)
    sched.run_until_idle()
    assert [t for t, _ in mark_ticks(s.tokens())] == [0, 50, 100, 150]
    s.insert(70, [V.velocity(20), V.note_on(0, 60)])
    s.generate(until_tick=200)
    sched.run_until_idle()
    toks = s.tokens()
    assert [t for t, _ in mark_ticks(toks)] == [0, 50, 100, 150]
    # the player's note is at its own tick (not pushed after the beat at 100)
    tick = 0
    for t in toks:
        tick += V.shift_ticks(t)
        if t == V.note_on(0, 60):
            assert tick == 70
            break
    else:
        raise AssertionError("the player's note is missing")


def test_marks_wait_for_a_request_or_a_given_event(engine):
    """With no request running, a mark is not written ahead of real time: it comes before the
    next given event after it."""
    sched, s = open_session(engine)
    s.schedule(0, [(40, [V.BAR, C])])
    sched.run_until_idle()
    assert mark_ticks(s.tokens()) == []
    s.insert(90, [V.velocity(20), V.note_on(0, 62)])
    sched.run_until_idle()
    assert mark_ticks(s.tokens()) == [(40, V.BAR), (40, C)]
    assert s.tick == 90


def test_a_new_schedule_rolls_back_moved_marks_and_keeps_the_same_ones(engine):
    sched, s = open_session(engine)
    s.schedule(0, beats(6))
    s.generate(until_tick=260)
    sched.run_until_idle()
    before = s.tokens()
    s.schedule(100, beats(4, first=2))  # a re-anchor on the same beats: nothing moves
    sched.step()
    assert s.tokens() == before
    s.schedule(100, beats(4, first=2, shift=10))  # the tempo moved: rolled back to 110, rewritten
    s.generate(until_tick=300)
    sched.run_until_idle()
    ticks = [t for t, _ in mark_ticks(s.tokens())]
    assert ticks == [0, 50, 110, 160, 210, 260]


def test_schedule_checks_its_arguments(engine):
    _, s = open_session(engine)
    with pytest.raises(ValueError, match="from_tick"):
        s.schedule(-1, [])
    with pytest.raises(ValueError, match="before from_tick"):
        s.schedule(10, [(5, [V.BEAT])])


def onsets_in_chord(tokens: list[int]) -> list[bool]:
    """For each harmony or bass note-on: whether its pitch is a tone of the chord sounding then
    (the last CHORD token before it)."""
    from improv.engine.tokenizer.harmony import chord_tones

    out, chord = [], 0
    parts = {V.part_index["harmony"], V.part_index["bass"]}
    for t in tokens:
        if V.chord_base <= t < V.HEADER:
            chord = t - V.chord_base
        elif V.on_base <= t < V.off_base and chord:
            part, pitch = divmod(t - V.on_base, 128)
            if part in parts:
                out.append(pitch % 12 in chord_tones(chord))
    return out


@pytest.fixture(scope="module")
def busy_engine(make_model):
    """The tiny model with its waits damped: it plays enough notes to judge in a few bars."""
    import torch

    model = make_model(seed=2, vocab_size=V.size)
    with torch.no_grad():
        model.lm_head.weight[V.shift_base : V.part_base] *= 0.1
    return Engine.from_model(model, HARMONY)


@pytest.mark.parametrize("tones", [True, False])
def test_chord_tones_keep_live_harmony_and_bass_in_the_scheduled_chord(busy_engine, tones):
    """A live session with ChordTones (what the server gives accompany sessions that know the
    chord): every harmony and bass note starts on a tone of the forced chord, through the
    schedule's changes and a rollback by a player's note; the same model without it leaves the
    chord (the test can fail)."""
    from improv.engine.constraints import ChordTones

    cons = [Parts(["harmony", "bass"]), GivenMarks(beats=True, chords=True)]
    sched = Scheduler(busy_engine, max_sessions=1)
    s = sched.open_session(
        [V.BOS, V.TASK_ACCOMPANY], cons + ([ChordTones()] if tones else []), SamplingParams(seed=5)
    )
    marks = beats(16)
    marks[0] = (0, [V.BAR, C])
    marks[4] = (200, [V.BAR, AM])
    marks[8] = (400, [V.BAR, V.chord(chord_index(5, "maj"))])
    s.schedule(0, marks)
    s.generate(until_tick=500)
    sched.run_until_idle()
    s.insert(230, [V.velocity(20), V.note_on(0, 76)])  # rolls back into Am's bar
    s.generate(until_tick=760)
    sched.run_until_idle()
    in_chord = onsets_in_chord(s.tokens())
    assert len(in_chord) >= 5
    assert all(in_chord) if tones else not all(in_chord)
