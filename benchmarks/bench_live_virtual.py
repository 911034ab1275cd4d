"""The live path against the offline plan, in virtual time: one POP909 melody with a chart and a
clock, accompanied (a) offline (`plan_accompany`: the melody and the marks forced at their
ticks) and (b) by a live session driven as the server drives one (the melody inserted when its
time comes, a request `horizon_ms` past now every 50 ms, the clock floor), on a clock that moves
`step_ms` per scheduler step instead of the wall clock: what the live machinery does to the
music, without a loaded machine's noise (bench_live_harmony.py measures the real thing).

    .venv/bin/python benchmarks/bench_live_virtual.py --checkpoint models/default --song 001

Prints, per path: harmony notes, their chord-tone share against the annotated chords, and the
share of onsets within 30 ms of an eighth position of the clock (bench_live_harmony's figures).
About 15 s for 20 s of one song on this 2-core CPU, idle (one session, one step at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import mido
from bench_live_harmony import chart_of, clock_beats, load_song, melody_events
from music_metrics import chord_tone_share_marks, eighth_grid_share

from improv.engine.conditioning import Conditioning
from improv.engine.constraints import BeatGrid, ChordTones, GivenMarks, MaxDuration, Parts
from improv.engine.engine import Engine
from improv.engine.generation import NoteBuilder, SchedulerSessions, execute, plan_accompany
from improv.engine.live import SamplingParams, Scheduler
from improv.engine.tokenizer import Notes
from improv.engine.tokenizer.encode import mark_events
from improv.engine.tokenizer.harmony import CHORD, Marks, steady_beats
from improv.engine.tokenizer.vocab import TokenType

REQUEST_EVERY_MS = 50.0  # the server's ACCOMPANY_TICK_S


def live_notes(engine: Engine, song, marks: Marks, args: argparse.Namespace) -> tuple[Notes, dict]:
    """The accompaniment a live session keeps (its history: what a rollback removed was never
    heard), tick 0 at the first downbeat."""
    v = engine.vocab
    now = [0.0]  # virtual ms since the downbeat
    sched = Scheduler(engine, max_sessions=1)
    sched.now = lambda: now[0] / 1000.0
    # what the server gives an accompany session with a chart and a clock (grid off)
    cons = [Parts(["harmony"]), MaxDuration(8.0, ["harmony"]), GivenMarks(True, True)]
    cons += [ChordTones()] if args.chord_tones else []
    s = sched.open_session(
        [v.BOS, v.TASK_ACCOMPANY],
        [*cons, BeatGrid(None)],
        SamplingParams(seed=args.seed),
        clock=lambda: now[0] / 10.0,
    )
    # the floor's lead as the real one would measure it: two steps and the send
    sched.timing.lead_s = lambda: 2 * args.step_ms / 1000.0 + 0.002
    ticks, toks = mark_events(marks, v, 0)
    sched_marks: dict[int, list[int]] = {}
    for t, x in zip(ticks, toks, strict=True):
        sched_marks.setdefault(int(t), []).append(x)
    s.schedule(0, sorted(sched_marks.items()))
    enc = engine.tokenizer.stream_encoder(part="lead", program=0)
    events = sorted(melody_events(song), key=lambda e: (e[0], e[1][0] == 0x90))
    i, last_request, heard = 0, -1e9, False
    while now[0] < args.seconds * 1000.0:
        while i < len(events) and events[i][0] * 1000.0 <= now[0]:
            t, data = events[i]
            i += 1
            got = enc.feed(mido.Message.from_bytes(data), t, None, None)
            event = [x for x in got if v.type_of(x) is not TokenType.TIME]
            if event:
                s.insert(round(t * v.ticks_per_second), event)
            heard |= data[0] == 0x90
        if heard and now[0] - last_request >= REQUEST_EVERY_MS:
            last_request = now[0]
            s.generate(until_tick=round((now[0] + args.horizon_ms) / 10.0))
        sched.step()
        now[0] += args.step_ms
    builder, tick = NoteBuilder(v, {}, 0), 0
    for x in s.tokens():
        tick += v.shift_ticks(x)
        builder.feed(x, tick)
    builder.finish(tick)
    return builder.result(), {"lag": s.lag, **{k: sched.stats[k] for k in ("backoffs",)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--song", default="001", help="a POP909 song id")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--step-ms", type=float, default=10.0, help="virtual time of one step")
    ap.add_argument("--horizon-ms", type=float, default=300.0, help="the server's default")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-chord-tones", dest="chord_tones", action="store_false")
    ap.add_argument("--live-only", action="store_true")
    args = ap.parse_args()

    engine = Engine.load(args.checkpoint, device="cpu")
    v = engine.vocab
    song = load_song(args.song, args.seconds)
    if song is None:
        raise SystemExit(f"song {args.song}: no melody or too few beats")
    beats = steady_beats(song.bpm, song.per_bar, 0.0, args.seconds)
    _, changes = chart_of(song, args.seconds)
    chords = Marks.build([t for t, _ in changes], [CHORD] * len(changes), [c for _, c in changes])
    grid = clock_beats(song, args.seconds)

    def report(name: str, notes: Notes, extra: str = "") -> None:
        acc = notes.select(notes.part == v.part_index["harmony"])
        tones = chord_tone_share_marks(acc, song.chords, args.seconds)
        on_grid = eighth_grid_share(acc, grid, 0.03)
        print(f"{name}: {len(acc)} notes, chord tones {tones:.1%}, grid {on_grid:.1%} {extra}")

    if not args.live_only:
        with SchedulerSessions(engine, 1) as sessions:
            cond = Conditioning(beats, chords, None, args.chord_tones)
            job = plan_accompany(
                sessions, song.melody, SamplingParams(seed=args.seed), ["harmony"],
                tail_seconds=0.0, cond=cond,
            )  # fmt: skip
            report("offline", asyncio.run(execute(sessions, job)))
    t0 = time.perf_counter()
    notes, stats = live_notes(engine, song, Marks.concat([beats, chords]), args)
    report("live", notes, f"{stats} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
