"""Harmony and meter quality of a checkpoint on POP909 validation songs (issue #20's figures), for
the model card's "harmony" section.

For N validation songs (fixed order, fixed seeds), the first 30 s of each song's melody, with
the song's annotated beats (beat_midi.txt) and chords (chord_midi.txt):

- (a) chords + beats given: the harmony part generated under the melody; share of its notes that
  are tones of the annotated chord (real PIANO alongside);
- (b) beats given, no chords: the model plans its own chords; share of its notes that are tones of
  the annotated chord, and of its own chord at that time;
- (c) the share of accompaniment onsets within 30 ms of an eighth-note position of the song's
  beats (no grid snapping), against the real PIANO's share;
- (d) density and polyphony against the real PIANO, and the share of notes above the melody note
  sounding at their onset;
- (f) harmony + bass + drums asked for: how many accompaniments contain all three; the output
  MIDI's tempo map against the input's;
- (g) the lead regenerated over a 6 s span in the melody's middle (infill): note count against the
  real lead's there;
- speed: the accompaniments of (a) in one batch, against the music's length.

    .venv/bin/python benchmarks/harmony_card.py runs/harmony/final [--songs 20] [--card]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
from common import SHARED_DATA, command_line, machine, write_section
from music_metrics import (
    above_melody_share,
    chord_tone_share_marks,
    eighth_grid_share,
    note_density,
    polyphony,
)

from improv.engine.conditioning import Conditioning
from improv.engine.tokenizer import Notes
from improv.engine.tokenizer.harmony import CHORD, read_beat_list, read_lab
from improv.engine.tokenizer.tempo import TempoMap

log = logging.getLogger("harmony_card")


def window(notes: Notes, lo: float, hi: float) -> Notes:
    sel = notes.select((notes.start >= lo) & (notes.start < hi))
    sel.end = np.minimum(sel.end, hi)
    return sel


def song_paths(data: Path, n: int) -> list[Path]:
    ids = (data / "pop909" / "splits" / "valid.txt").read_text().split()
    return [data / "pop909" / i / f"{i}.mid" for i in sorted(ids)[:n]]


def mean(xs: list[float]) -> float:
    a = np.asarray(xs, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


async def _run(sessions: object, jobs: list) -> list[Notes]:
    from improv.engine.generation import execute

    return await asyncio.gather(*(execute(sessions, j) for j in jobs))  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=SHARED_DATA)
    ap.add_argument("--songs", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1000, help="song i samples with seed + i")
    ap.add_argument("--backend", default="auto", help="engine backend (auto: onnx-int8 on CPU)")
    ap.add_argument("--out", type=Path, default=None, help="quality-harmony.json folder")
    ap.add_argument("--card", action="store_true", help="write the checkpoint's README section")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from improv.engine.engine import Engine
    from improv.engine.generation import SchedulerSessions, plan_accompany, plan_infill
    from improv.engine.live import SamplingParams

    engine = Engine.load(str(args.checkpoint), device="cpu", backend=args.backend)
    if not engine.vocab.harmony:
        raise SystemExit(f"{args.checkpoint} has no harmony tokens: nothing to measure here")
    sessions = SchedulerSessions(engine, max_sessions=args.songs)
    tok, v = sessions.tokenizer, sessions.vocab
    harmony, bass, drums = (v.part_index[x] for x in ("harmony", "bass", "drums"))
    songs = song_paths(args.data, args.songs)
    given, own, band, fill, refs = [], [], [], [], []
    for i, path in enumerate(songs):
        notes = tok.read_notes(path)
        beats = read_beat_list((path.parent / "beat_midi.txt").read_text())
        chords = read_lab((path.parent / "chord_midi.txt").read_text())
        tempo = TempoMap.from_midi(path)
        a_lo = float(notes.start[notes.part == v.lead].min())
        a_hi = a_lo + args.seconds
        lead = window(notes, a_lo, a_hi)
        lead = lead.select(lead.part == v.lead)
        sampling = SamplingParams(seed=args.seed + i)
        both = Conditioning(beats, chords, tempo)
        given.append(
            plan_accompany(sessions, lead, sampling, ["harmony"], tail_seconds=0.0, cond=both)
        )
        beats_only = Conditioning(beats, None, tempo)
        own.append(
            plan_accompany(sessions, lead, sampling, ["harmony"], tail_seconds=0.0, cond=beats_only)
        )
        band.append(
            plan_accompany(
                sessions, lead, sampling, ["harmony", "bass", "drums"], tail_seconds=0.0, cond=both
            )
        )
        mid = a_lo + args.seconds / 2
        song_window = window(notes, a_lo - 10.0, a_hi)
        fill.append(
            plan_infill(sessions, song_window, mid - 3.0, mid + 3.0, sampling, ["lead"], both)
        )
        refs.append((path, notes, a_lo, a_hi, beats, chords, tempo, mid))

    with sessions:
        t = time.perf_counter()
        out_given = asyncio.run(_run(sessions, given))
        t_given = time.perf_counter() - t
        out_own = asyncio.run(_run(sessions, own))
        out_band = asyncio.run(_run(sessions, band))
        out_fill = asyncio.run(_run(sessions, fill))

    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "a_chord_tones",
            "real_chord_tones",
            "b_chord_tones_annotated",
            "b_chord_tones_own",
            "b_own_changes",
            "c_grid_given",
            "c_grid_own",
            "c_grid_real",
            "d_density_gen",
            "d_density_real",
            "d_poly_gen",
            "d_poly_real",
            "d_above_gen",
            "d_above_real",
            "g_fill_gen",
            "g_fill_real",
        )
    }
    all_three = tempo_equal = 0
    for k, (_, notes, a_lo, a_hi, beats, chords, tempo, mid) in enumerate(refs):
        real = window(notes, a_lo, a_hi)
        piano = real.select(real.part == harmony)
        melody = real.select(real.part == v.lead)
        g = window(out_given[k], a_lo, a_hi)
        g = g.select(g.part == harmony)
        o = window(out_own[k], a_lo, a_hi)
        o = o.select(o.part == harmony)
        own_chords = own[k].chords()
        rows["a_chord_tones"].append(chord_tone_share_marks(g, chords, a_hi))
        rows["real_chord_tones"].append(chord_tone_share_marks(piano, chords, a_hi))
        rows["b_chord_tones_annotated"].append(chord_tone_share_marks(o, chords, a_hi))
        rows["b_chord_tones_own"].append(chord_tone_share_marks(o, own_chords, a_hi))
        rows["b_own_changes"].append(float((own_chords.kind == CHORD).sum()))
        bt = beats.time[(beats.time >= a_lo - 1) & (beats.time < a_hi + 1)]
        rows["c_grid_given"].append(eighth_grid_share(g, bt))
        rows["c_grid_own"].append(eighth_grid_share(o, bt))
        rows["c_grid_real"].append(eighth_grid_share(piano, bt))
        rows["d_density_gen"].append(note_density(g, args.seconds))
        rows["d_density_real"].append(note_density(piano, args.seconds))
        rows["d_poly_gen"].append(polyphony(g))
        rows["d_poly_real"].append(polyphony(piano))
        rows["d_above_gen"].append(above_melody_share(g, melody))
        rows["d_above_real"].append(above_melody_share(piano, melody))
        b = window(out_band[k], a_lo, a_hi)
        all_three += all((b.part == p).any() for p in (harmony, bass, drums))
        midi = tok.notes_to_midi(out_band[k], tempo=band[k].cond.tempo, chords=band[k].chords())
        buf = io.BytesIO()
        midi.save(file=buf)
        back = TempoMap.from_midi(buf.getvalue())
        tempo_equal += (
            back is not None
            and tempo is not None
            and back.tempo_mspq.tolist() == tempo.tempo_mspq.tolist()
            and back.tempo_ticks.tolist() == tempo.tempo_ticks.tolist()
            and back.tpq == tempo.tpq
        )
        f = out_fill[k]
        for key, src in (("g_fill_gen", f), ("g_fill_real", notes)):
            in_span = (src.part == v.lead) & (src.start >= mid - 3) & (src.start < mid + 3)
            rows[key].append(float(in_span.sum()))

    m = {k: mean(x) for k, x in rows.items()}
    report = {
        "checkpoint": str(args.checkpoint),
        "songs": [p.parent.name for p in songs],
        "seconds": args.seconds,
        "seeds": f"{args.seed} + song index",
        "means": m,
        "f_all_three": all_three,
        "f_tempo_maps_equal": tempo_equal,
        "n": len(songs),
        "speed": {
            "music_seconds": args.seconds * len(songs),
            "wall_seconds": round(t_given, 1),
            "x_real_time": round(args.seconds * len(songs) / t_given, 2),
        },
        "g_fill_count_rel_diff": abs(m["g_fill_gen"] - m["g_fill_real"])
        / max(m["g_fill_real"], 1e-9),
        "machine": machine(),
        "command": command_line(),
    }
    out = args.out or args.checkpoint
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-harmony.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.card:
        write_section("harmony", card_section(report), args.checkpoint / "README.md")


def card_section(q: dict) -> str:
    m, n = q["means"], q["n"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def rel(a: float, b: float) -> str:
        return f"{100 * (a - b) / b:+.0f}%" if b else "n/a"

    sp = q["speed"]
    return f"""{n} POP909 validation songs (the first {n} of splits/valid.txt, sorted), the first
{q["seconds"]:.0f} s of each song's melody with its annotated beats (beat_midi.txt) and chords
(chord_midi.txt), seeds {q["seeds"]}, the default sampling (temperature 1, top-p 0.95), no grid
snapping, through the offline planners and scheduler (benchmarks/harmony_card.py; metrics in
benchmarks/music_metrics.py). The harmony part alone is generated, against the real PIANO.

| | generated | real PIANO | target |
|---|---|---|---|
| (a) chord tones, chords + beats given | **{pct(m["a_chord_tones"])}** | {pct(m["real_chord_tones"])} | >= 85% |
| (b) chord tones, beats only (vs the annotated chord) | **{pct(m["b_chord_tones_annotated"])}** | {pct(m["real_chord_tones"])} | >= 66% |
| (b) chord tones of the model's own chord | **{pct(m["b_chord_tones_own"])}** ({m["b_own_changes"]:.1f} changes a song) | | >= 85% |
| (c) onsets within 30 ms of an eighth, chords + beats given | **{pct(m["c_grid_given"])}** | {pct(m["c_grid_real"])} | >= real - 5 points |
| (c) the same, beats only | {pct(m["c_grid_own"])} | {pct(m["c_grid_real"])} | |
| (d) density (notes/s) | {m["d_density_gen"]:.2f} ({rel(m["d_density_gen"], m["d_density_real"])}) | {m["d_density_real"]:.2f} | within 15% |
| (d) polyphony | {m["d_poly_gen"]:.2f} ({rel(m["d_poly_gen"], m["d_poly_real"])}) | {m["d_poly_real"]:.2f} | within 15% |
| (d) notes above the melody | {pct(m["d_above_gen"])} | {pct(m["d_above_real"])} | within 10 points |
| (g) lead infill, notes in a 6 s span | {m["g_fill_gen"]:.1f} ({rel(m["g_fill_gen"], m["g_fill_real"])}) | {m["g_fill_real"]:.1f} (real lead) | within 25% |

(f) harmony + bass + drums asked for (chords and beats given): {q["f_all_three"]} of {n}
accompaniments contain all three; output tempo maps equal to the input's: {q["f_tempo_maps_equal"]}
of {n}.

Speed: the {n} accompaniments of (a) in one batch, {sp["music_seconds"]:.0f} s of music in
{sp["wall_seconds"]} s ({sp["x_real_time"]}x real time) on this CPU.

Command: `{q["command"]}` ({q["machine"]})."""


if __name__ == "__main__":
    main()
