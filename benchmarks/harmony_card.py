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
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import SHARED_DATA, command_line, machine, write_section
from model_card import song_paths, window  # the card's own songs and windows
from music_metrics import (
    above_melody_share,
    chord_tone_share_marks,
    eighth_grid_share,
    note_density,
    polyphony,
    summary,
)

from improv.engine.conditioning import Conditioning
from improv.engine.generation import ACCOMPANY_WAIT_TEMPERATURE
from improv.engine.tokenizer import Notes
from improv.engine.tokenizer.harmony import CHORD, read_beat_list, read_lab
from improv.engine.tokenizer.tempo import TempoMap

log = logging.getLogger("harmony_card")


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
    ap.add_argument("--temperature", type=float, default=1.0, help="the server's default")
    ap.add_argument("--top-p", type=float, default=0.95, help="the server's default")
    ap.add_argument("--backend", default="auto", help="engine backend (auto: onnx-int8 on CPU)")
    ap.add_argument("--out", type=Path, default=None, help="quality-harmony.json folder")
    ap.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        help="also bits/note on this dataset (data-plain/valid: music without chords or beats)",
    )
    ap.add_argument("--card", action="store_true", help="write the checkpoint's README section")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from improv.engine.engine import Engine
    from improv.engine.generation import (
        SchedulerSessions,
        plan_accompany,
        plan_continue,
        plan_infill,
    )
    from improv.engine.live import SamplingParams

    engine = Engine.load(str(args.checkpoint), device="cpu", backend=args.backend)
    if not engine.vocab.harmony:
        raise SystemExit(f"{args.checkpoint} has no harmony tokens: nothing to measure here")
    sessions = SchedulerSessions(engine, max_sessions=2 * args.songs)
    tok, v = sessions.tokenizer, sessions.vocab
    harmony, bass, drums = (v.part_index[x] for x in ("harmony", "bass", "drums"))
    songs = song_paths(args.data, args.songs)
    jobs: dict[str, list] = {k: [] for k in VARIANTS}
    jobs.update(band=[], fill=[], cont_1=[], cont_2=[])
    refs = []
    for i, path in enumerate(songs):
        notes = tok.read_notes(path)
        beats = read_beat_list((path.parent / "beat_midi.txt").read_text())
        chords = read_lab((path.parent / "chord_midi.txt").read_text())
        tempo = TempoMap.from_midi(path)
        a_lo = float(notes.start[notes.part == v.lead].min())
        a_hi = a_lo + args.seconds
        lead = window(notes, a_lo, a_hi)
        lead = lead.select(lead.part == v.lead)
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, seed=args.seed + i
        )
        for name, (with_chords, chord_tones, eighths, waits) in VARIANTS.items():
            cond = Conditioning(beats, chords if with_chords else None, tempo, chord_tones)
            jobs[name].append(
                plan_accompany(
                    sessions,
                    lead,
                    replace(sampling, wait_temperature=waits),
                    ["harmony"],
                    tail_seconds=0.0,
                    cond=cond,
                    eighths=eighths,
                )
            )
        both = Conditioning(beats, chords, tempo)
        jobs["band"].append(
            plan_accompany(
                sessions, lead, sampling, ["harmony", "bass", "drums"], tail_seconds=0.0, cond=both
            )
        )
        mid = a_lo + args.seconds / 2
        song_window = window(notes, a_lo - 10.0, a_hi)
        jobs["fill"].append(
            plan_infill(sessions, song_window, mid - 3.0, mid + 3.0, sampling, ["lead"], both)
        )
        # (e) continuation of plain music: no chords, no beats (a file without annotations)
        t0 = float(notes.start.min())
        prompt = window(notes, t0, t0 + 20.0)
        for k, seed in (("cont_1", args.seed), ("cont_2", args.seed + 1000)):
            jobs[k].append(
                plan_continue(
                    sessions,
                    prompt,
                    args.seconds,
                    SamplingParams(args.temperature, top_p=args.top_p, seed=seed + i),
                )
            )
        refs.append((notes, a_lo, a_hi, beats, chords, tempo, mid, t0 + 20.0))

    outs: dict[str, list[Notes]] = {}
    seconds: dict[str, float] = {}
    with sessions:
        for name, js in jobs.items():
            t = time.perf_counter()
            outs[name] = asyncio.run(_run(sessions, js))
            seconds[name] = time.perf_counter() - t

    report: dict = {
        "checkpoint": str(args.checkpoint),
        "songs": [p.parent.name for p in songs],
        "seconds": args.seconds,
        "seeds": f"{args.seed} + song index",
        "temperature": args.temperature,
        "top_p": args.top_p,
        "wait_temperature": ACCOMPANY_WAIT_TEMPERATURE,
        "n": len(songs),
        "chord_planner": "learned" if sessions.chord_planner else "hmm",
    }
    for name in VARIANTS:
        rows: dict[str, list[float]] = {}

        def add(key: str, x: float, rows: dict[str, list[float]] = rows) -> None:
            rows.setdefault(key, []).append(x)

        for k, (notes, a_lo, a_hi, beats, chords, _, _, _) in enumerate(refs):
            real = window(notes, a_lo, a_hi)
            piano = real.select(real.part == harmony)
            melody = real.select(real.part == v.lead)
            g = window(outs[name][k], a_lo, a_hi)
            g = g.select(g.part == harmony)
            own = jobs[name][k].chords()
            bt = beats.time[(beats.time >= a_lo - 1) & (beats.time < a_hi + 1)]
            add("chord_tones", chord_tone_share_marks(g, chords, a_hi))
            add("real_chord_tones", chord_tone_share_marks(piano, chords, a_hi))
            add("own_chord_tones", chord_tone_share_marks(g, own, a_hi))
            add("own_changes", float((own.kind == CHORD).sum()))
            add("grid", eighth_grid_share(g, bt))
            add("real_grid", eighth_grid_share(piano, bt))
            add("density", note_density(g, args.seconds))
            add("real_density", note_density(piano, args.seconds))
            add("polyphony", polyphony(g))
            add("real_polyphony", polyphony(piano))
            add("above", above_melody_share(g, melody))
            add("real_above", above_melody_share(piano, melody))
        report[name] = {k: mean(x) for k, x in rows.items()}

    report["again_identical"] = sum(
        bool(
            len(a) == len(b)
            and all(
                np.array_equal(getattr(a, f), getattr(b, f))
                for f in ("start", "end", "pitch", "velocity", "part")
            )
        )
        for a, b in zip(outs["guarded"], outs["again"], strict=True)
    )
    all_three = tempo_equal = 0
    fill_gen, fill_real = [], []
    cont: dict[str, list[dict[str, float]]] = {"cont_1": [], "cont_2": [], "real": []}
    for k, (notes, a_lo, a_hi, _, _, tempo, mid, p_end) in enumerate(refs):
        b = window(outs["band"][k], a_lo, a_hi)
        all_three += all((b.part == p).any() for p in (harmony, bass, drums))
        job = jobs["band"][k]
        midi = tok.notes_to_midi(outs["band"][k], tempo=job.cond.tempo, chords=job.chords())
        buf = io.BytesIO()
        midi.save(file=buf)
        back = TempoMap.from_midi(buf.getvalue())
        tempo_equal += bool(
            back is not None
            and tempo is not None
            and back.tpq == tempo.tpq
            and back.tempo_mspq.tolist() == tempo.tempo_mspq.tolist()
            and back.tempo_ticks.tolist() == tempo.tempo_ticks.tolist()
        )
        for dst, src in ((fill_gen, outs["fill"][k]), (fill_real, notes)):
            in_span = (src.part == v.lead) & (src.start >= mid - 3) & (src.start < mid + 3)
            dst.append(float(in_span.sum()))
        for key in ("cont_1", "cont_2"):
            cont[key].append(
                summary(window(outs[key][k], p_end, p_end + args.seconds), args.seconds, drums)
            )
        cont["real"].append(
            summary(window(notes, p_end, p_end + args.seconds), args.seconds, drums)
        )
    real_cont = {s: mean([r[s] for r in cont["real"]]) for s in cont["real"][0]}
    report["continuation"] = {
        key: {
            s: {
                "generated": mean([r[s] for r in cont[key]]),
                "real": real_cont[s],
                "rel_diff": abs(mean([r[s] for r in cont[key]]) - real_cont[s]) / abs(real_cont[s]),
            }
            for s in real_cont
        }
        for key in ("cont_1", "cont_2")
    }
    report["f_all_three"] = all_three
    report["f_tempo_maps_equal"] = tempo_equal
    report["g_fill"] = {"generated": mean(fill_gen), "real": mean(fill_real)}
    n_music = args.seconds * len(songs)
    report["speed"] = {
        "music_seconds": n_music,
        "wall_seconds": round(seconds["guarded"], 1),
        "x_real_time": round(n_music / seconds["guarded"], 2),
    }
    if args.eval_data is not None:
        from improv.trainer.eval import eval_checkpoint

        r = eval_checkpoint(args.checkpoint, args.eval_data)
        report["e_eval"] = {
            "data": str(args.eval_data),
            "bits_per_note": r["bits_per_note"],
            "nats_per_token": r["nats_per_token"],
            "tokens": r["tokens"],
        }
    report["machine"] = machine()
    report["command"] = command_line()
    out = args.out or args.checkpoint
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-harmony.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.card:
        write_section("harmony", card_section(report), args.checkpoint / "README.md")


# name -> (chords given, ChordTones: None = the planners' default (on in accompaniment), False,
# the eighth-note decision points, the waits' temperature: None = accompaniment's default)
VARIANTS = {
    "guarded": (True, None, True, None),
    "model": (True, False, True, None),
    "own_guarded": (False, None, True, None),
    "own_model": (False, False, True, None),
    "no_cuts": (True, None, False, None),
    "untempered": (True, None, True, 1.0),
    "again": (True, None, True, None),  # "guarded" again: a seed gives the same notes
}


def card_section(q: dict) -> str:
    n = q["n"]
    g, m, og, om, nc, ut = (
        q[k] for k in ("guarded", "model", "own_guarded", "own_model", "no_cuts", "untempered")
    )

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def rel(a: float, b: float) -> str:
        return f"{100 * (a - b) / b:+.0f}%" if b else "n/a"

    stat_rows = []
    for s_, name in (
        ("pitch_class_entropy", "pitch-class entropy"),
        ("scale_consistency", "scale consistency"),
        ("note_density", "note density"),
        ("polyphony", "polyphony"),
    ):
        a, b = q["continuation"]["cont_1"][s_], q["continuation"]["cont_2"][s_]
        stat_rows.append(
            f"| {name} | {a['generated']:.3f} ({100 * a['rel_diff']:.0f}%) | "
            f"{b['generated']:.3f} ({100 * b['rel_diff']:.0f}%) | {a['real']:.3f} |"
        )
    cont_table = "\n".join(stat_rows)
    sp, fill = q["speed"], q["g_fill"]
    ev = q.get("e_eval")
    bits = (
        f"bits/note on `{ev['data']}` ({ev['tokens']:,} tokens of music without chords or beats; "
        f"the harmony tokens are not counted): **{ev['bits_per_note']:.2f}** (target: no worse "
        "than the previous default model's 12.56 on the same music)."
        if ev
        else "bits/note: not measured in this run (--eval-data)."
    )
    plan = (
        "the checkpoint's learned chord planner,\na GRU over the beats that gives each pitch "
        "class's chance to be a chord tone there,\nthe triads with the most expected chord "
        "tones: `engine/chord_planner.py`"
        if q.get("chord_planner") == "learned"
        else "an HMM over the\nbeats: `engine/tokenizer/chord_plan.py`"
    )
    return f"""{n} POP909 validation songs (the first {n} of splits/valid.txt, sorted), the first
{q["seconds"]:.0f} s of each song's melody with its annotated beats (beat_midi.txt) and, where
given, chords (chord_midi.txt); seeds {q["seeds"]}; temperature {q["temperature"]}, top-p
{q["top_p"]} (the server's defaults); no grid snapping; the offline planners and scheduler (benchmarks/harmony_card.py, metrics
in benchmarks/music_metrics.py). The harmony part is generated alone, against the real PIANO,
as the server does it: the model continues the piece with the melody given, and draws again at
each eighth between the beats (docs/engine-live.md, "Accompaniment as continuation"), its
waits tempered at {q["wait_temperature"]} among themselves there (`wait_temperature`).
"guarded" is what the server does by default: harmony and bass start only on tones of the
sounding chord (`ChordTones`), the model's own chord changes fall on beats (`ChordsOnBeats`) and,
without chords, follow a chord plan read from the whole melody (a triad a beat; {plan};
`ChordsFitMelody`); "model alone" turns `ChordTones` and
`ChordsFitMelody` off (`chord_tones=false`, `--no-chord-tones`).

| | guarded (default) | model alone | real PIANO | target |
|---|---|---|---|---|
| (a) chord tones, chords + beats given | **{pct(g["chord_tones"])}** | {pct(m["chord_tones"])} | {pct(g["real_chord_tones"])} | >= 85% |
| (b) chord tones, beats only, vs the annotated chord | **{pct(og["chord_tones"])}** | {pct(om["chord_tones"])} | | >= 66% |
| (b) chord tones of the model's own chord | **{pct(og["own_chord_tones"])}** | {pct(om["own_chord_tones"])} | | >= 85% |
| (b) the model's chord changes a song | {og["own_changes"]:.1f} | {om["own_changes"]:.1f} | | |
| (c) onsets within 30 ms of an eighth, chords + beats | **{pct(g["grid"])}** | {pct(m["grid"])} | {pct(g["real_grid"])} | >= real - 5 points |
| (c) the same, beats only | {pct(og["grid"])} | {pct(om["grid"])} | {pct(g["real_grid"])} | |
| (d) density (notes/s) | {g["density"]:.2f} ({rel(g["density"], g["real_density"])}) | {m["density"]:.2f} ({rel(m["density"], g["real_density"])}) | {g["real_density"]:.2f} | within 15% |
| (d) polyphony | {g["polyphony"]:.2f} ({rel(g["polyphony"], g["real_polyphony"])}) | {m["polyphony"]:.2f} ({rel(m["polyphony"], g["real_polyphony"])}) | {g["real_polyphony"]:.2f} | within 15% |
| (d) notes above the melody | {pct(g["above"])} | {pct(m["above"])} | {pct(g["real_above"])} | within 10 points |

Without the decision points at the eighths between the beats (`eighths=False`; guarded, chords
and beats given): onsets on the eighth grid {pct(nc["grid"])}, density {nc["density"]:.2f}
({rel(nc["density"], nc["real_density"])}), polyphony {nc["polyphony"]:.2f}
({rel(nc["polyphony"], nc["real_polyphony"])}), chord tones {pct(nc["chord_tones"])}.
With the model's own waits (`wait_temperature` 1; guarded, chords and beats given): onsets on
the eighth grid {pct(ut["grid"])}, density {ut["density"]:.2f}
({rel(ut["density"], ut["real_density"])}), polyphony {ut["polyphony"]:.2f}
({rel(ut["polyphony"], ut["real_polyphony"])}), chord tones {pct(ut["chord_tones"])}. The
guarded accompaniments generated again in this run, other songs beside them in each step: the
same notes in {q["again_identical"]} of {n} (a seed gives the same notes under any load:
`row_invariant`, docs/engine.md).

(e) {bits}

Continuation of plain music (no chords, no beats: a 20 s prompt from each song's start, 30 s
generated), statistics against the real next 30 s (relative difference), at two seed sets:

| statistic | seeds {q["seeds"]} | seeds +1000 | real |
|---|---|---|---|
{cont_table}

(f) harmony + bass + drums asked for (chords and beats given): {q["f_all_three"]} of {n}
accompaniments contain all three; output tempo maps equal to the input's: {q["f_tempo_maps_equal"]}
of {n}.

(g) The lead regenerated over a 6 s span in the middle of each 30 s (infill, chords and beats
given): {fill["generated"]:.1f} notes against the real lead's {fill["real"]:.1f}
({rel(fill["generated"], fill["real"])}; target within 25%).

Speed: the {n} guarded accompaniments of (a) in one batch: {sp["music_seconds"]:.0f} s of music
in {sp["wall_seconds"]} s ({sp["x_real_time"]}x real time) on this CPU.

Command: `{q["command"]}` ({q["machine"]})."""


if __name__ == "__main__":
    main()
