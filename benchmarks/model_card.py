"""Quality report for a checkpoint, measured on POP909 validation songs (for the model card).

For 20 validation songs (fixed order, fixed seeds): a 20 s prompt, then a 30 s continuation
compared with the real next 30 s; and accompaniment generated under the real melody of a 30 s
window compared with the real accompaniment (statistics, and the share of notes that are chord
tones of the annotated chord, against the real PIANO part); and the respond setting: 15 s of a
song's melody alone continued for 10 s as the lead alone, counting the notes the model drew in
another part (rejected by the constraints and drawn again: steps a live answer waits for).
Writes quality.json and piano
rolls to --out, and with --card the "quality" section of the model card (the checkpoint's
README.md, between its markers).

    .venv/bin/python benchmarks/model_card.py models/default [--songs 20] [--card]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path

import numpy as np
from common import SHARED_DATA, command_line, machine, write_section
from music_metrics import chord_tone_share, melody_triad_share, summary

from improv.engine.tokenizer import Notes
from improv.trainer.chords import add_chord_bass, read_chords

log = logging.getLogger("model_card")


def window(notes: Notes, lo: float, hi: float) -> Notes:
    sel = notes.select((notes.start >= lo) & (notes.start < hi))
    sel.end = np.minimum(sel.end, hi)
    return sel


def song_paths(data: Path, n: int) -> list[Path]:
    ids = (data / "pop909" / "splits" / "valid.txt").read_text().split()
    return [data / "pop909" / i / f"{i}.mid" for i in sorted(ids)[:n]]


def mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def compare(gen: dict[str, float], real: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        k: {
            "generated": gen[k],
            "real": real[k],
            "rel_diff": abs(gen[k] - real[k]) / abs(real[k]) if real[k] else float("nan"),
        }
        for k in gen
    }


async def _run_jobs(rt: object, jobs: list) -> list[Notes]:
    from improv.engine.generation import execute

    return await asyncio.gather(*(execute(rt, j) for j in jobs))  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=SHARED_DATA)
    ap.add_argument("--songs", type=int, default=20)
    ap.add_argument("--prompt-seconds", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--temperature", type=float, default=1.0)  # the defaults' value
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=1000, help="song i samples with seed + i")
    ap.add_argument(
        "--parts",
        default="counter,harmony",
        help="accompaniment parts to generate (a bass, which POP909 has not, is left out of the "
        "statistics and reported on its own)",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for JSON + PNGs (default: the checkpoint)"
    )
    ap.add_argument("--card", action="store_true", help="write the checkpoint's README section")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from improv.cli.render import render_piano_roll
    from improv.engine.engine import Engine
    from improv.engine.generation import SchedulerSessions, plan_accompany, plan_continue
    from improv.engine.live import SamplingParams

    out = args.out or args.checkpoint
    engine = Engine.load(str(args.checkpoint), device="cpu")
    rt = SchedulerSessions(engine, max_sessions=2 * args.songs)  # closes lag a step
    rt.scheduler.start()  # stopped below
    tok = rt.tokenizer
    v = tok.vocab
    harmony, counter, bass = (v.part_index[x] for x in ("harmony", "counter", "bass"))
    acc_parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    songs = song_paths(args.data, args.songs)
    cont_jobs, acc_jobs, given_jobs, solo_jobs, refs = [], [], [], [], []
    for i, path in enumerate(songs):
        notes = tok.read_notes(path)
        t0 = float(notes.start.min())
        p_lo, p_hi, c_hi = t0, t0 + args.prompt_seconds, t0 + args.prompt_seconds + args.seconds
        prompt = window(notes, p_lo, p_hi)
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, seed=args.seed + i
        )
        cont_jobs.append(plan_continue(rt, prompt, args.seconds, sampling))
        # accompaniment: the first `seconds` of the melody
        a_lo = float(notes.start[notes.part == v.lead].min())
        a_hi = a_lo + args.seconds
        melody = window(notes, a_lo, a_hi)
        lead = melody.select(melody.part == v.lead)
        acc_jobs.append(plan_accompany(rt, lead, sampling, acc_parts, tail_seconds=0.0))
        # the same melody with a given bass: the chords' roots (what a bass track or the
        # player's left hand, `bass_split`, gives), counter + harmony generated over both
        with_bass = window(add_chord_bass(str(path), notes, bass), a_lo, a_hi)
        given_jobs.append(
            plan_accompany(rt, with_bass, sampling, ["counter", "harmony"], tail_seconds=0.0)
        )
        refs.append(
            (path, notes, p_hi, c_hi, a_lo, a_hi, read_chords(path.parent / "chord_midi.txt"))
        )
        # the respond setting: 15 s of the melody alone, continued as the lead alone
        solo = window(lead, a_lo + 10.0, a_lo + 25.0)
        solo_jobs.append(plan_continue(rt, solo, 10.0, sampling, parts=["lead"]))

    t = time.perf_counter()
    try:
        cont = asyncio.run(_run_jobs(rt, cont_jobs))
        t_cont = time.perf_counter() - t
        t = time.perf_counter()
        acc = asyncio.run(_run_jobs(rt, acc_jobs))
        t_acc = time.perf_counter() - t
        over_bass = asyncio.run(_run_jobs(rt, given_jobs))
        rejected = rt.scheduler.stats["notes_rejected"]
        solo = asyncio.run(_run_jobs(rt, solo_jobs))
        rejected = rt.scheduler.stats["notes_rejected"] - rejected
    finally:
        rt.scheduler.stop()
    solo_notes = sum(len(o) - len(j.given) for o, j in zip(solo, solo_jobs, strict=True))

    cont_gen, cont_real, acc_gen, acc_real, chord_gen, chord_real = [], [], [], [], [], []
    chord_gen_harmony, chord_bass, bass_notes = [], [], {"continuation": 0, "accompaniment": 0}
    lead_notes = {"generated": 0, "real": 0}  # continuation: does the song's melody come in?
    given_gen, chord_given, chord_melody, chord_triads = [], [], [], []
    for (_, notes, p_hi, c_hi, a_lo, a_hi, chords), c, a, g in zip(
        refs, cont, acc, over_bass, strict=True
    ):
        gen = window(c, p_hi, c_hi)
        bass_notes["continuation"] += int((gen.part == bass).sum())
        real = window(notes, p_hi, c_hi)
        lead_notes["generated"] += int((gen.part == v.lead).sum())
        lead_notes["real"] += int((real.part == v.lead).sum())
        gen = gen.select(gen.part != bass)  # POP909 has no bass: compare the parts it has
        cont_gen.append(summary(gen, args.seconds, v.drums))
        cont_real.append(summary(real, args.seconds, v.drums))
        gen_acc = window(a, a_lo, a_hi)
        gen_bass = gen_acc.select(gen_acc.part == bass)
        bass_notes["accompaniment"] += len(gen_bass)
        chord_bass.append(chord_tone_share(gen_bass, chords))
        gen_acc = gen_acc.select((gen_acc.part != v.lead) & (gen_acc.part != bass))
        real = window(notes, a_lo, a_hi)
        real_acc = real.select(np.isin(real.part, [harmony, counter]))
        acc_gen.append(summary(gen_acc, args.seconds, v.drums))
        acc_real.append(summary(real_acc, args.seconds, v.drums))
        chord_gen.append(chord_tone_share(gen_acc, chords))
        chord_gen_harmony.append(chord_tone_share(gen_acc.select(gen_acc.part == harmony), chords))
        chord_real.append(chord_tone_share(real.select(real.part == harmony), chords))
        melody = real.select(real.part == v.lead)
        chord_melody.append(chord_tone_share(melody, chords))
        chord_triads.append(melody_triad_share(melody, chords))
        g = window(g, a_lo, a_hi)
        g = g.select(np.isin(g.part, [harmony, counter]))
        given_gen.append(summary(g, args.seconds, v.drums))
        chord_given.append(chord_tone_share(g, chords))

    report = {
        "checkpoint": str(args.checkpoint),
        "songs": [p.parent.name for p in songs],
        "sampling": {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seeds": f"{args.seed} + song index",
        },
        "continuation": compare(mean_stats(cont_gen), mean_stats(cont_real)),
        "continuation_lead_notes": lead_notes,
        "accompaniment": compare(mean_stats(acc_gen), mean_stats(acc_real)),
        "accompaniment_given_bass": compare(mean_stats(given_gen), mean_stats(acc_real)),
        "chord_tone_share": {
            "generated": float(np.nanmean(chord_gen)),
            "real_piano": float(np.nanmean(chord_real)),
            "generated_harmony": float(np.nanmean(chord_gen_harmony)),
            "generated_given_bass": float(np.nanmean(chord_given)),
            "real_melody": float(np.nanmean(chord_melody)),
            "melody_triads": float(np.nanmean(chord_triads)),
            "generated_bass": float(np.nanmean(chord_bass))
            if bass_notes["accompaniment"]
            else None,
        },
        "accompaniment_parts": acc_parts,
        "bass_notes": bass_notes,
        "respond_solo": {
            "generated_notes": solo_notes,
            "rejected_draws": rejected,
            "rejected_per_note": rejected / max(solo_notes, 1),
        },
        "generation_seconds": {"continuation": round(t_cont, 1), "accompaniment": round(t_acc, 1)},
        "machine": machine(),
        "command": command_line(),
    }
    report["chord_tone_share"]["rel_diff"] = (
        abs(report["chord_tone_share"]["generated"] - report["chord_tone_share"]["real_piano"])
        / report["chord_tone_share"]["real_piano"]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    for k, (path, _, p_hi, c_hi, a_lo, a_hi, _) in enumerate(refs[:2]):
        title = f"{path.name}: real prompt to {p_hi:.0f} s, then generated"
        render_piano_roll(
            cont[k], tok.parts, out / f"example-continue-{k + 1}.png", title, p_hi - 10, c_hi
        )
        title = f"{path.name}: real melody (red), generated accompaniment"
        render_piano_roll(
            acc[k], tok.parts, out / f"example-accompany-{k + 1}.png", title, a_lo, a_hi
        )
    print(json.dumps(report, indent=2))
    if args.card:
        write_section("quality", card_section(report, len(songs)), args.checkpoint / "README.md")


STAT_NAMES = {
    "pitch_class_entropy": "pitch-class entropy (bits)",
    "scale_consistency": "scale consistency",
    "note_density": "note density (notes/s)",
    "polyphony": "polyphony (notes sounding)",
}


def card_section(q: dict, n_songs: int) -> str:
    """The model card's quality report, from the report dict."""

    def table(section: str) -> str:
        rows = [
            "| statistic | generated | real | difference | within 20% |",
            "|---|---|---|---|---|",
        ]
        for k, name in STAT_NAMES.items():
            x = q[section][k]
            ok = "yes" if x["rel_diff"] <= 0.2 else "no"
            rows.append(
                f"| {name} | {x['generated']:.3f} | {x['real']:.3f} | "
                f"{100 * x['rel_diff']:.0f}% | {ok} |"
            )
        return "\n".join(rows)

    ct, gs, sp, rs = (
        q["chord_tone_share"],
        q["generation_seconds"],
        q["sampling"],
        q["respond_solo"],
    )
    bass = ""
    if ct.get("generated_bass") is not None:
        bn = q["bass_notes"]
        bass = (
            f"\nThe generated bass ({bn['accompaniment'] / (30 * n_songs):.2f} notes/s; POP909 has "
            f"no bass part, so it is left out of the table): {100 * ct['generated_bass']:.1f}% "
            "chord tones."
        )
    return f"""{n_songs} POP909 validation songs (the first {n_songs} of splits/valid.txt, sorted), seeds
{sp["seeds"].replace(" + song index", "")} + index, temperature {sp["temperature"]}, top-p {sp["top_p"]}, through the server's own
planners and scheduler with its defaults (the `MaxDuration` guard: no generated note longer than
8 s). Statistics are MusPy's definitions over pitched notes (benchmarks/music_metrics.py), the
mean over the songs. Target: each within 20% of the real music.

**Continuation**: a 20 s prompt from the song's start, 30 s generated, against the real next
30 s:

{table("continuation")}

Most prompts are a song's intro, before its melody: the real next 30 s hold
{q["continuation_lead_notes"]["real"]} melody (lead) notes in all, the generated ones
{q["continuation_lead_notes"]["generated"]}.

**Accompaniment**: {" + ".join(q["accompaniment_parts"])} generated under the real melody of the song's
first 30 s of melody; counter + harmony against the real BRIDGE + PIANO:

{table("accompaniment")}

Share of accompaniment notes that are tones of the annotated chord (chord_midi.txt): generated
**{100 * ct["generated"]:.1f}%**, real PIANO **{100 * ct["real_piano"]:.1f}%** (the generated harmony
part alone, the role of POP909's PIANO: {100 * ct["generated_harmony"]:.1f}%).{bass}
For scale, what the melody alone tells: its own notes are {100 * ct["real_melody"]:.1f}% chord
tones, and playing only the major or minor triad that best fits the melody under each annotated
chord (the chord changes given; `melody_triad_share`) would score {100 * ct["melody_triads"]:.1f}%.

**Accompaniment over a given bass**: the same melodies with the chords' roots as a bass part
(from chord_midi.txt, struck on the strong beats: what a bass track in the file, or the
player's left hand with `bass_split`, gives), counter + harmony generated:

{table("accompaniment_given_bass")}

Chord tones of the generated counter + harmony: **{100 * ct["generated_given_bass"]:.1f}%**.

**Respond setting**: 15 s of each song's melody alone, continued for 10 s as the lead alone (what
live call and response asks): {rs["generated_notes"]} notes generated; the model drew
{rs["rejected_draws"]} notes in another part, which the constraints rejected and drew again
(**{rs["rejected_per_note"]:.2f} per generated note**; each is a step a live answer waits for).

Generation time on this CPU (all songs batched on one scheduler): continuation
{gs["continuation"]} s for {30 * n_songs} s of music, accompaniment {gs["accompaniment"]} s.

Command: `{q["command"]}` ({q["machine"]})."""


if __name__ == "__main__":
    main()
