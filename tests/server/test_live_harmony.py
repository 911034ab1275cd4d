"""Harmony and meter in a live accompany session (issue #21): a chart laid on the clock's bars,
the left hand's chords, the model's own chords and beats; `chord` and `beat` messages; a model
without harmony tokens still gives the client the chart and the clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from live_session import open_in_process

from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.generation import ACCOMPANY_WAIT_TEMPERATURE
from improv.engine.model import Transformer
from improv.engine.tokenizer.harmony import chord_index, chord_label, parse_label
from improv.engine.tokenizer.vocab import TokenizerConfig, Vocab
from improv.server.live import LiveConnection

HARMONY = TokenizerConfig(harmony=True)
V = Vocab(HARMONY)


def write_harmony_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny model with the harmony vocabulary (waits damped, as the server tests' own,
    so it plays enough to judge in a few seconds)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", max_seq_len=2048, vocab_size=V.size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if name == "tok_emb.weight" else 0.3 / p.shape[1] ** 0.5 * 4)
        model.lm_head.weight[V.shift_base : V.part_base] *= 0.1
    return save_checkpoint(path, model.eval(), HARMONY, {"note": "random weights, for tests"})


@pytest.fixture(scope="module")
def harmony_runtime(tmp_path_factory, server_factory):
    _, make_runtime = server_factory
    rt = make_runtime(write_harmony_checkpoint(tmp_path_factory.mktemp("harmony") / "ckpt"))
    yield rt
    rt.close()


def of(out: list, kind: str) -> list[Any]:
    return [m for m in out if m.type == kind]


def client_view(out: list, kind: str) -> list[Any]:
    """What a client holds of `kind` after applying every retract in order."""
    held: list[Any] = []
    for m in out:
        if m.type == kind:
            held.append(m)
        elif m.type == "retract":
            held = [x for x in held if x.time <= m.after]
    return held


def balanced(out: list) -> bool:
    """Every note-on the client plays (retracts applied) has its note-off."""
    midi = client_view(out, "midi")
    ons = sum(1 for m in midi if m.data[0] & 0xF0 == 0x90 and m.data[2] > 0)
    offs = sum(1 for m in midi if m.data[0] & 0xF0 == 0x80)
    return ons == offs


def marks_at(tokens: list[int]) -> list[tuple[int, int]]:
    """(tick, token) of the BAR/BEAT/CHORD tokens of a history."""
    out, tick = [], 0
    for t in tokens:
        tick += V.shift_ticks(t)
        if t in (V.BAR, V.BEAT) or V.chord_base <= t < V.HEADER:
            out.append((tick, t))
    return out


async def play_melody(conn: LiveConnection, start: float, n: int, step: float = 250.0) -> None:
    for i in range(n):
        t = start + i * step
        await asyncio.sleep(max(0.0, (t - conn.now_ms()) / 1000.0))
        await conn.handle({"type": "midi", "data": [144, 72 + i % 5, 90], "time": t})
        await asyncio.sleep(0.2 * step / 1000.0)
        await conn.handle({"type": "midi", "data": [128, 72 + i % 5, 0]})


async def _start_chart(conn, down: float) -> None:
    """An accompany session along C Am F G at 120 bpm, its first bar at `down`."""
    await conn.handle({"type": "start", "mode": "accompany", "seed": 3, "lookahead_ms": 50,
                       "chord_source": "chart", "chords": "C Am F G", "tempo_bpm": 120,
                       "beat_time": down, "rest_ms": None})  # fmt: skip


def test_a_chart_on_the_clock_is_forced_and_announced(harmony_runtime):
    """C Am F G at 120 bpm from a downbeat: a chord event a bar (2 s), beat events every 500 ms
    with the downbeats flagged, the CHORD and BAR/BEAT tokens in the model's history at their
    ticks and none of the model's own; nothing left sounding, no error."""

    async def main():
        conn, out = await open_in_process(harmony_runtime)
        down = conn.now_ms() + 200.0
        await _start_chart(conn, down)
        await play_melody(conn, down, 18)  # 4.5 s: three bars are past when it stops
        await asyncio.sleep(0.3)
        tokens = conn.active.session.tokens()
        assert conn.active.session.window_start == 0  # (ticks are read from the first token)
        origin = conn.clock.origin
        await conn.close()
        return out, tokens, down, origin

    out, tokens, down, origin = asyncio.run(main())
    assert of(out, "started")[0].harmony is True
    assert not of(out, "error")
    # the whole piece continued, the player's part named with the model's (docs/engine-live.md)
    assert tokens[1:3] == [V.TASK_CONTINUE, V.HEADER] and V.part(0) in tokens[3:5]
    chords = client_view(out, "chord")  # (a retract re-sends what survives it)
    want = ["C:maj", "A:min", "F:maj"]  # (G's bar comes after the stop: retracted)
    assert [c.label for c in chords] == want and {c.source for c in chords} == {"chart"}
    for i, c in enumerate(chords):
        assert c.time == pytest.approx(down + 2000.0 * i)
    beats = client_view(out, "beat")
    assert len(beats) >= 6
    for b in beats:
        k = round((b.time - down) / 500.0)
        assert b.time == pytest.approx(down + 500.0 * k) and b.bar == (k % 4 == 0)
        assert b.source == "clock" and b.tempo_bpm == 120.0
    marks = marks_at(tokens)
    tick = lambda ms: round((ms - origin) / 10.0)  # noqa: E731
    forced_chords = [(t, x) for t, x in marks if x >= V.chord_base]
    assert forced_chords[0] == (tick(down), V.chord(chord_index(0, "maj")))
    assert (tick(down + 2000.0), V.chord(chord_index(9, "min"))) in forced_chords
    assert len(forced_chords) == len({t for t, _ in forced_chords})  # the model wrote none
    beat_ticks = [t for t, x in marks if x in (V.BAR, V.BEAT)]
    assert beat_ticks[:4] == [tick(down + 500.0 * k) for k in range(4)]
    assert balanced(out)


def test_a_chart_without_a_clock_starts_at_the_first_note(harmony_runtime):
    async def main():
        conn, out = await open_in_process(harmony_runtime)
        await conn.handle({"type": "start", "mode": "accompany", "seed": 1, "lookahead_ms": 0,
                           "chord_source": "chart", "chords": "| Dm7 G7 | Cmaj7 |",
                           "tempo_bpm": 100, "beats_per_bar": 4})  # fmt: skip
        await asyncio.sleep(0.1)
        assert not of(out, "beat") and not of(out, "chord")  # nothing before the player
        first = conn.now_ms()
        await play_melody(conn, first, 10, step=300.0)
        await conn.close()
        return out, first

    out, first = asyncio.run(main())
    chords = client_view(out, "chord")
    assert [c.label for c in chords[:3]] == ["D:min7", "G:7", "C:maj7"]
    assert [c.time for c in chords[:3]] == pytest.approx([first, first + 1200.0, first + 2400.0])
    beat = client_view(out, "beat")[0]
    assert beat.time == pytest.approx(first) and beat.bar


def test_left_hand_chords_are_read_forced_and_announced(harmony_runtime):
    """Block chords below the split: each is read (with inversions), announced at its time and
    given to the model as a CHORD token before the keys; the model plays no bass."""
    v = V

    async def main():
        conn, out = await open_in_process(harmony_runtime)
        await conn.handle({"type": "start", "mode": "accompany", "seed": 2, "lookahead_ms": 0,
                           "chord_source": "left_hand", "rest_ms": None})  # fmt: skip
        t = conn.now_ms()
        for i, keys in enumerate(([48, 52, 55], [45, 48, 52], [41, 45, 48])):  # C, Am, F/C
            at = t + 600.0 * i
            await asyncio.sleep(max(0.0, (at - conn.now_ms()) / 1000.0))
            for k in keys:
                await conn.handle({"type": "midi", "data": [144, k, 80], "time": at})
            await conn.handle({"type": "midi", "data": [144, 76, 90], "time": at})
            await asyncio.sleep(0.4)
            for k in [*keys, 76]:
                await conn.handle({"type": "midi", "data": [128, k, 0]})
        await asyncio.sleep(0.2)
        tokens = conn.active.session.tokens()
        params = conn.params
        await conn.close()
        return out, tokens, t, params

    out, tokens, t, params = asyncio.run(main())
    assert params.bass_split == 60  # left_hand's default split
    chords = [c for c in client_view(out, "chord") if c.source == "left_hand"]
    final = {}
    for c in chords:  # a later chord at the same time replaces it
        final[round(c.time)] = c.label
    assert list(final.values())[-3:] == ["C:maj", "A:min", "F:maj"]
    assert [round(x) for x in final][-3:] == [round(t + 600.0 * i) for i in range(3)]
    want = [v.chord(chord_index(r, q)) for r, q in ((0, "maj"), (9, "min"), (5, "maj"))]
    got = [x for _, x in marks_at(tokens) if x >= v.chord_base]
    assert got[-3:] == want
    bass = v.part_index["bass"]
    gen_bass = [m for m in of(out, "midi") if m.part == "bass"]
    assert not gen_bass and v.note_on(bass, 48) in tokens
    assert balanced(out)


def test_the_models_own_chords_are_announced_and_retracted_with_it(harmony_runtime):
    """chord_source model: every CHORD token the model keeps (its Token, not rolled back) is
    announced (source model) at its time; one a rollback removed is retracted for the client;
    beats without a clock are the model's."""
    from improv.engine.live import Rollback, Token

    async def main():
        conn, out = await open_in_process(harmony_runtime)
        await conn.handle({"type": "start", "mode": "accompany", "seed": 5, "lookahead_ms": 0,
                           "rest_ms": None, "horizon_ms": 600})  # fmt: skip
        kept: dict[int, tuple[int, int]] = {}  # position -> (tick, token): the model's chords
        mode, dispatch = conn.active, conn.active._dispatch_engine_event

        def spy(ev) -> None:  # noqa: ANN001 (the engine's events, as the mode handles them)
            if isinstance(ev, Token) and V.chord_base <= ev.token < V.HEADER:
                kept[ev.position] = (ev.tick, ev.token)
            elif isinstance(ev, Rollback):
                for pos in [x for x in kept if x >= ev.position]:
                    del kept[pos]
            dispatch(ev)

        mode._dispatch_engine_event = spy
        await play_melody(conn, conn.now_ms(), 16, step=200.0)
        await asyncio.sleep(0.3)
        end = conn.now_ms()  # the stop retracts what is planned past this
        origin = conn.clock.origin
        await conn.close()
        return out, kept, origin, end

    out, kept, origin, end = asyncio.run(main())
    assert of(out, "started")[0].params.chord_source == "model"
    chords = {(round(origin + 10.0 * t), chord_label(x - V.chord_base)) for t, x in kept.values()
              if origin + 10.0 * t < end}  # fmt: skip
    assert chords, "the random model wrote no chord: pick another seed"
    announced = {(round(c.time), c.label) for c in client_view(out, "chord")}
    assert chords <= announced, sorted(chords - announced)
    assert all(c.source == "model" for c in of(out, "chord"))
    assert all(b.source == "model" for b in of(out, "beat"))
    assert balanced(out)


def test_bad_harmony_parameters_get_an_error_naming_the_problem(harmony_runtime):
    async def main():
        conn, out = await open_in_process(harmony_runtime)
        await conn.handle({"type": "start", "mode": "accompany", "chord_source": "chart"})
        await conn.handle({"type": "start", "mode": "accompany", "chord_source": "chart",
                           "chords": "C Xm7 G"})  # fmt: skip
        await conn.handle({"type": "start", "mode": "accompany", "beats_per_bar": 0})
        await conn.handle({"type": "start", "mode": "accompany", "chord_source": "jazz"})
        await conn.handle({"type": "start", "mode": "accompany"})
        await conn.handle({"type": "params", "chords": "C | |"})
        await conn.handle({"type": "params", "chord_source": "chart", "chords": "C H7"})
        mode = conn.mode
        await conn.close()
        return out, mode

    out, mode = asyncio.run(main())
    errors = [m.message for m in of(out, "error")]
    assert len(errors) == 6, errors
    assert "needs chords" in errors[0]
    assert "Xm7" in errors[1]
    assert "beats_per_bar" in errors[2] and "1" in errors[2]
    assert "chart" in errors[3] and "left_hand" in errors[3]
    assert "H7" in errors[5]
    assert mode == "accompany" and len(of(out, "started")) == 1


def test_a_model_without_harmony_tokens_still_sends_the_chart_and_the_clock(runtime):
    """The bundled model's vocabulary has no CHORD or BEAT: the session runs as before, the
    client still gets the chart's chords and the clock's beats (started.harmony is false)."""

    async def main():
        conn, out = await open_in_process(runtime)
        down = conn.now_ms() + 100.0
        await conn.handle({"type": "start", "mode": "accompany", "seed": 3, "lookahead_ms": 0,
                           "chord_source": "chart", "chords": "Am F", "tempo_bpm": 150,
                           "beat_time": down, "beats_per_bar": 3})  # fmt: skip
        await play_melody(conn, down, 10, step=200.0)
        await conn.close()
        return out, down

    out, down = asyncio.run(main())
    assert of(out, "started")[0].harmony is False
    assert not of(out, "error")
    chords = client_view(out, "chord")
    assert [c.label for c in chords[:2]] == ["A:min", "F:maj"]
    assert chords[1].time == pytest.approx(down + 3 * 400.0)
    assert [b.bar for b in client_view(out, "beat")[:4]] == [True, False, False, True]
    assert balanced(out)


def test_a_chart_chosen_while_playing_starts_then_and_a_clock_keeps_its_count(harmony_runtime):
    """A chart sent with `params` while the player plays starts its first bar then; a clock
    given later (a count-in's beat_time) starts it again, bar 1 on its downbeat; a new chart
    states its chord at once; no error, nothing left sounding."""

    async def main():
        conn, out = await open_in_process(harmony_runtime)
        await conn.handle({"type": "start", "mode": "accompany", "seed": 6, "lookahead_ms": 0,
                           "rest_ms": None, "tempo_bpm": 120})  # fmt: skip
        t0 = conn.now_ms()
        melody = asyncio.create_task(play_melody(conn, t0, 16, step=250.0))
        await asyncio.sleep(0.5)
        switched = conn.now_ms()
        await conn.handle({"type": "params", "chord_source": "chart", "chords": "Dm G"})
        await asyncio.sleep(1.2)
        down = conn.now_ms() + 300.0
        await conn.handle({"type": "params", "beat_time": down})
        await asyncio.sleep(0.8)
        new_chart = conn.now_ms()
        await conn.handle({"type": "params", "chords": "F"})  # a new chart: its chord now
        await melody
        tokens = conn.active.session.tokens()
        await conn.close()
        return out, switched, down, new_chart, tokens

    out, switched, down, new_chart, tokens = asyncio.run(main())
    assert not of(out, "error")
    chords = [c for c in client_view(out, "chord") if c.source == "chart"]
    assert chords[0].label == "D:min" and switched <= chords[0].time < switched + 100.0
    later = [c for c in chords if c.time >= down]
    assert later and later[0].time == pytest.approx(down) and later[0].label == "D:min"
    last = [c for c in chords if c.time >= new_chart - 1.0]
    assert [c.label for c in last][:1] == ["F:maj"] and last[0].time < new_chart + 100.0
    assert any(V.chord_base <= t < V.HEADER for t in tokens)
    assert balanced(out)


def test_accompaniment_keeps_to_the_chords_unless_chord_tones_is_off(harmony_runtime):
    """chord_tones (default true): the engine session has ChordTones (what it does there:
    tests/engine/live/test_schedule.py); `params` chord_tones false reopens it without."""
    from improv.engine.constraints import ChordTones

    async def main():
        conn, out = await open_in_process(harmony_runtime)
        down = conn.now_ms() + 100.0
        await _start_chart(conn, down)
        await play_melody(conn, down, 3)
        had = conn.active.session.constraint(ChordTones)
        await conn.handle({"type": "params", "chord_tones": False})
        off = conn.active.session.constraint(ChordTones)
        await conn.close()
        return out, had, off

    out, had, off = asyncio.run(main())
    assert not of(out, "error")
    assert had is not None and off is None


@pytest.mark.parametrize("source", ["chart", "left_hand", "model"])
def test_every_chord_source_binds_harmony_and_bass_to_the_chord(source):
    """As offline accompaniment: ChordTones wherever the session knows the chord (the model's
    own plan too, whose changes then fall on a beat), none with chord_tones false."""
    from improv.engine.constraints import ChordsOnBeats, ChordTones, GivenMarks
    from improv.protocol import messages as p
    from improv.server.live.harmony import Harmony

    chart = {"chords": "C Am"} if source == "chart" else {}
    pr = p.LiveParams(chord_source=source, **chart)
    h = Harmony(V, None, None, pr)  # type: ignore[arg-type]  # (constraints need neither)
    kinds = {type(c) for c in h.constraints(pr)}
    assert ChordTones in kinds
    assert (ChordsOnBeats in kinds) == (source == "model")
    assert (GivenMarks in kinds) == (source != "model")
    off = pr.model_copy(update={"chord_tones": False})
    assert ChordTones not in {type(c) for c in h.constraints(off)}


def test_the_clocks_eighths_are_decision_points_for_a_harmony_model():
    """Between the clock's beats, a mark with no tokens at each eighth: the model's waits are
    cut there (engine.generation.eighth_cuts); none for a model without harmony tokens."""
    from improv.protocol import messages as p
    from improv.server.live.clock import SessionClock
    from improv.server.live.harmony import Harmony

    pr = p.LiveParams(tempo_bpm=120.0, beat_time=1000.0)
    for vocab, eighths in ((V, True), (Vocab(TokenizerConfig()), False)):
        h = Harmony(vocab, SessionClock(10.0), None, pr)  # type: ignore[arg-type]
        marks = h._marks(900.0, 3000.0)
        beats = [m.time for m in marks if m.beat is not None]
        cuts = [m.time for m in marks if m.beat is None and m.chord is None]
        assert beats == [1000.0 + 500.0 * k for k in range(4)]
        assert cuts == ([1250.0 + 500.0 * k for k in range(4)] if eighths else [])
        assert all(h._tokens(m) == [] for m in marks if m.time in cuts)


def test_a_clock_that_comes_or_goes_restarts_the_history_with_its_task(harmony_runtime):
    """Accompaniment is a continuation only on a clock (its first tokens: TASK_CONTINUE and
    the header): a clock set while playing, then taken away, reopens the engine session with
    the task of each, not on the old history's first tokens."""

    async def main():
        conn, out = await open_in_process(harmony_runtime)
        await conn.handle({"type": "start", "mode": "accompany", "seed": 3, "rest_ms": None})
        await play_melody(conn, conn.now_ms() + 50.0, 3)
        firsts = [conn.active.session.tokens()[:2]]
        waits = [conn.active._sampling().wait_temperature]
        await conn.handle({"type": "params", "tempo_bpm": 120, "beat_time": conn.now_ms()})
        await play_melody(conn, conn.now_ms() + 50.0, 3)
        firsts.append(conn.active.session.tokens()[:3])
        waits.append(conn.active._sampling().wait_temperature)
        await conn.handle({"type": "params", "beat_time": None})
        await play_melody(conn, conn.now_ms() + 50.0, 3)
        firsts.append(conn.active.session.tokens()[:2])
        waits.append(conn.active._sampling().wait_temperature)
        await conn.close()
        return out, firsts, waits

    out, firsts, waits = asyncio.run(main())
    assert not of(out, "error")
    # on the clock (its eighths are decision points) the waits are tempered as offline
    assert waits == [None, ACCOMPANY_WAIT_TEMPERATURE, None]
    assert firsts == [
        [V.BOS, V.TASK_ACCOMPANY],
        [V.BOS, V.TASK_CONTINUE, V.HEADER],
        [V.BOS, V.TASK_ACCOMPANY],
    ]
    assert balanced(out)


def _melody_on_clock(rt, seed: int, notes: list[tuple[float, tuple[int, ...]]]) -> tuple:
    """An accompany session on a 120-bpm clock (`chord_source: model`), `notes` played as
    (ms after its first downbeat, keys struck together, held 300 ms). Returns (messages, the
    engine's tokens, the downbeat, the clock's origin)."""

    async def main():
        conn, out = await open_in_process(rt)
        down = conn.now_ms() + 200.0
        await conn.handle({"type": "start", "mode": "accompany", "seed": seed, "tempo_bpm": 120,
                           "beat_time": down, "rest_ms": None})  # fmt: skip
        for dt, keys in notes:
            await asyncio.sleep(max(0.0, (down + dt - conn.now_ms()) / 1000.0))
            for key in keys:
                await conn.handle({"type": "midi", "data": [144, key, 90], "time": down + dt})
            await asyncio.sleep(0.3)
            for key in keys:
                await conn.handle({"type": "midi", "data": [128, key, 0]})
        await asyncio.sleep(0.3)
        tokens = conn.active.session.tokens()
        origin = conn.clock.origin
        await conn.close()
        return out, tokens, down, origin

    return asyncio.run(main())


def test_on_a_clock_the_models_chords_are_read_from_the_melody(harmony_runtime):
    """`chord_source: model` on a clock: a bar of C E G, then a bar of A C E, a note or two a
    beat, as a player plays them (some a little late, the second bar's first a little early): a
    `chord` (source model) on each bar's first beat, C:maj then A:min, its CHORD token at the
    beat (given with the note, or laid into the schedule for a note before it); the model
    writes none of its own."""
    bars = [((60,), (64,), (67,), (64,)), ((76, 69), (72,), (76,), (72,))]  # (E first: C has it)
    early = {(1, 0): -30.0}  # ms
    notes = [(2000.0 * b + 500.0 * k + early.get((b, k), 30.0 if k % 2 else 0.0), keys)
             for b, beats in enumerate(bars) for k, keys in enumerate(beats)]  # fmt: skip
    out, tokens, down, origin = _melody_on_clock(harmony_runtime, 5, notes)
    assert not of(out, "error")
    chords = client_view(out, "chord")
    assert [(c.label, c.source) for c in chords] == [("C:maj", "model"), ("A:min", "model")]
    assert [c.time for c in chords] == pytest.approx([down, down + 2000.0])
    tick = lambda ms: round((ms - origin) / 10.0)  # noqa: E731
    given = [(t, x) for t, x in marks_at(tokens) if x >= V.chord_base]
    assert given == [(tick(down), V.chord(chord_index(0, "maj"))),
                     (tick(down + 2000.0), V.chord(chord_index(9, "min")))]  # fmt: skip
    assert balanced(out)


def test_on_a_clock_a_beat_without_a_note_gets_its_chord_from_the_melody_before_it(
    harmony_runtime,
):
    """A bar of A C E on the beats, then F A C played between them (no note near a beat): the
    change to F is read ahead of a beat from what was heard, announced at that beat and forced
    there (`Harmony.follow_beats`)."""
    notes = [(500.0 * k, (key,)) for k, key in enumerate((69, 72, 76, 72))]
    notes += [(2250.0 + 500.0 * k, (key,)) for k, key in enumerate((65, 69, 72, 65, 69))]
    out, tokens, down, origin = _melody_on_clock(harmony_runtime, 6, notes)
    assert not of(out, "error")
    chords = [c for c in client_view(out, "chord") if c.time > down + 2000.0]
    assert chords and chords[0].label == "F:maj" and chords[0].source == "model", chords
    k = (chords[0].time - down) / 500.0
    assert k == pytest.approx(round(k)), chords[0]  # on a beat, though no note was there
    tick = round((chords[0].time - origin) / 10.0)
    assert (tick, V.chord(chord_index(5, "maj"))) in marks_at(tokens)
    assert balanced(out)


def test_on_a_clock_the_first_chord_is_the_melodys_own(harmony_runtime):
    """A melody that starts on an A minor triad, after the downbeat: its first chord is A:min,
    none is made up for a beat before the first note (an empty melody reads as C major)."""
    notes = [(60.0, (69, 72, 76)), (500.0, (72,)), (1000.0, (76,)), (1500.0, (69,))]
    out, tokens, down, _ = _melody_on_clock(harmony_runtime, 7, notes)
    assert not of(out, "error")
    chords = client_view(out, "chord")
    assert chords and chords[-1].label == "A:min", chords
    assert all(c.time >= down + 60.0 - 1e-6 and c.label != "C:maj" for c in chords), chords
    given = [x for _, x in marks_at(tokens) if x >= V.chord_base]
    assert given and given[-1] == V.chord(chord_index(9, "min"))
    assert balanced(out)


def test_a_clock_that_stops_and_starts_again_reads_chords_on_its_new_count(harmony_runtime):
    """The chords read for a count's beats go with it: after the clock stops and starts again
    (its beats numbered from 0 again), a bar of A minor is read as A:min on the new count."""

    async def main():
        conn, out = await open_in_process(harmony_runtime)
        down = conn.now_ms() + 200.0
        await conn.handle({"type": "start", "mode": "accompany", "seed": 8, "tempo_bpm": 240,
                           "beat_time": down, "rest_ms": None})  # fmt: skip
        await play_melody(conn, down, 12, step=250.0)  # 3 s: 12 beats of the first count
        await conn.handle({"type": "params", "beat_time": None})
        await asyncio.sleep(0.2)
        again = conn.now_ms() + 200.0
        await conn.handle({"type": "params", "tempo_bpm": 240, "beat_time": again})
        for k, key in enumerate((69, 72, 76, 72, 69, 76)):
            t = again + 250.0 * k
            await asyncio.sleep(max(0.0, (t - conn.now_ms()) / 1000.0))
            await conn.handle({"type": "midi", "data": [144, key, 90], "time": t})
            await asyncio.sleep(0.15)
            await conn.handle({"type": "midi", "data": [128, key, 0]})
        await conn.close()
        return out, again

    out, again = asyncio.run(main())
    assert not of(out, "error")
    later = [c for c in client_view(out, "chord") if c.time >= again - 1e-6]
    assert later and later[-1].label == "A:min" and later[-1].source == "model", later
    assert balanced(out)


@pytest.fixture(scope="module")
def follower_runtime(tmp_path_factory, server_factory):
    """A harmony checkpoint with a learned live chord follower beside it (random weights)."""
    from improv.engine.chord_planner import ChordPlanner, PlannerConfig

    _, make_runtime = server_factory
    path = write_harmony_checkpoint(tmp_path_factory.mktemp("follower") / "ckpt", seed=3)
    torch.manual_seed(4)
    ChordPlanner(PlannerConfig(hidden=16, causal=True)).save(path)
    rt = make_runtime(path)
    yield rt
    rt.close()


def test_with_a_learned_follower_the_chords_read_from_the_melody_are_its(follower_runtime):
    """The checkpoint's `chord_follower` reads the melody's chords on a clock (stepped a beat at
    a time: `LiveFollow`): each chord it names is announced on a beat (source model) and forced
    there, and its state holds every beat up to the last one read."""
    assert follower_runtime.chord_follower is not None

    async def main():
        conn, out = await open_in_process(follower_runtime)
        down = conn.now_ms() + 200.0
        await conn.handle({"type": "start", "mode": "accompany", "seed": 9, "tempo_bpm": 240,
                           "beat_time": down, "rest_ms": None})  # fmt: skip
        await play_melody(conn, down, 16, step=250.0)
        harmony = conn.active.harmony
        tokens = conn.active.session.tokens()
        origin = conn.clock.origin
        await conn.close()
        return out, harmony, tokens, down, origin

    out, harmony, tokens, down, origin = asyncio.run(main())
    assert not of(out, "error") and balanced(out)
    chords = client_view(out, "chord")
    assert chords and all(c.source == "model" for c in chords), chords
    forced = marks_at(tokens)
    for c in chords:
        k = (c.time - down) / 250.0
        assert k == pytest.approx(round(k), abs=1e-6), c  # on a beat
        tick = round((c.time - origin) / 10.0)
        assert (tick, V.chord(parse_label(c.label))) in forced, c
    lf = harmony.live_follow
    assert lf is not None and lf.chains and lf.next_beat >= harmony.followed_beat - 1


@pytest.mark.parametrize("hedge", [0.5, 0.0])
def test_a_chord_read_from_the_melody_is_hedged_to_the_tones_the_follower_is_sure_of(
    follower_runtime, hedge
):
    """`chord_hedge`: the session's ChordTones holds, for the latest beats read, the tones of
    each beat's chord the follower gives at least that chance (`confident_tones`), from the
    beat's tick; 0: none (the whole chord)."""
    from improv.engine.constraints import ChordTones
    from improv.engine.tokenizer.harmony import chord_tones

    async def main():
        conn, out = await open_in_process(follower_runtime)
        down = conn.now_ms() + 200.0
        await conn.handle({"type": "start", "mode": "accompany", "seed": 9, "tempo_bpm": 240,
                           "beat_time": down, "rest_ms": None, "chord_hedge": hedge})  # fmt: skip
        await play_melody(conn, down, 16, step=250.0)
        spec = conn.active.session.constraint(ChordTones)
        origin = conn.clock.origin
        await conn.close()
        return out, spec, down, origin

    out, spec, down, origin = asyncio.run(main())
    assert not of(out, "error") and balanced(out)
    assert spec is not None
    if hedge == 0.0:
        assert spec.hedges == ()
        return
    assert 1 <= len(spec.hedges) <= 4, spec.hedges
    for tick, chord, bits in spec.hedges:
        k = (origin + tick * 10.0 - down) / 250.0
        assert k == pytest.approx(round(k), abs=0.05), tick  # a beat's tick
        tones = sum(1 << pc for pc in chord_tones(chord))
        assert bits and bits & ~tones == 0, (chord, bits)
