"""`improv generate`, `improv infill`, `improv accompany`: offline generation on this machine.

The same planners and scheduler path as the HTTP API (improv.engine.generation), on a scheduler
of this command's own (no server runtime), so a file made here is what the server would send
back; `--variations K` runs K takes as one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PART_CHOICES = {"lead": ["lead"], "accompaniment": None, "all": None}
ACCOMPANY_PARTS = ("counter", "harmony", "bass", "drums")


def _common(p: argparse.ArgumentParser, seconds: bool = True) -> None:
    p.add_argument("-o", "--out", required=True, help="MIDI file to write")
    p.add_argument(
        "--checkpoint", default="models/default", help="model folder (default models/default)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (0 = greedy; default 1.0, as the server's: the model card "
        "measured 0.9 and 0.7 playing denser, further from real music)",
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible takes)")
    p.add_argument(
        "--variations", type=int, default=1, help="K takes in one batch: OUT-1.mid .. OUT-K.mid"
    )
    if seconds:
        p.add_argument(
            "--seconds", type=float, default=30.0, help="length to generate (default 30)"
        )
    g = p.add_argument_group("harmony and meter (models with chord and beat tokens)")
    g.add_argument(
        "--chords",
        help="a chart laid on the beats ('C Am F G', '| C | Am F |') or chord-lab lines "
        "'start end label' (seconds, Harte: C:maj, A:min7), inline or a file; default: the "
        "model plans its own (written as MIDI markers)",
    )
    g.add_argument(
        "--beats",
        help="beat times, lines 'seconds [1 if downbeat]', inline or a file (overrides the "
        "file's tempo map)",
    )
    g.add_argument("--bpm", type=float, help="steady beats from time 0 (and the output's tempo)")
    g.add_argument("--beats-per-bar", type=int, help="with --bpm or --beats (default 4)")
    g.add_argument(
        "--no-chord-tones",
        dest="chord_tones",
        action="store_false",
        default=None,
        help="let harmony and bass leave the chord (they keep to it where chords are given, "
        "and in accompaniment)",
    )


def _check(args: argparse.Namespace, name: str) -> None:
    if not 0 <= args.temperature <= 5:
        raise SystemExit(f"improv {name}: --temperature must be in 0..5, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"improv {name}: --top-p must be in (0, 1], got {args.top_p}")
    if not 1 <= args.variations <= 64:
        raise SystemExit(f"improv {name}: --variations must be in 1..64, got {args.variations}")
    if getattr(args, "seconds", 1.0) is not None and not 0 < getattr(args, "seconds", 1.0) <= 600:
        raise SystemExit(f"improv {name}: --seconds must be in (0, 600], got {args.seconds}")


def _text(value: str | None) -> str | None:
    """An inline value, or the text of the file it names."""
    if value is not None and "\n" not in value and Path(value).is_file():
        return Path(value).read_text()
    return value


def _conditioning(args: argparse.Namespace, name: str, midi: str | None, until: float) -> object:
    """--chords/--beats/--bpm/--beats-per-bar (and the input file's tempo map)."""
    from improv.engine.conditioning import Conditioning, ConditioningError

    try:
        return Conditioning.parse(
            Path(midi).read_bytes() if midi else None,
            _text(args.chords),
            _text(args.beats),
            args.bpm,
            args.beats_per_bar,
            until,
            chord_tones=args.chord_tones,
        )
    except ConditioningError as e:
        raise SystemExit(f"improv {name}: {e}") from e


def _outputs(out: str, k: int) -> list[Path]:
    path = Path(out)
    if k == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.mid'}") for i in range(1, k + 1)]


_READ_CACHE: dict[tuple[str, str | None], object] = {}


def _read(tok: object, path: str, name: str, parts: str | None = None) -> object:
    """The file's notes, parsed once however many variations are planned from them."""
    from improv.engine.tokenizer import MidiReadError

    key = (path, parts)
    if key not in _READ_CACHE:
        try:
            _READ_CACHE[key] = tok.read_notes(path, parts=parts)  # type: ignore[attr-defined]
        except MidiReadError as e:
            raise SystemExit(f"improv {name}: {path}: {e}") from e
    return _READ_CACHE[key]


def _run(
    args: argparse.Namespace,
    name: str,
    plan: Callable[[object, object, object], object],
    music_seconds: Callable[[object], float],
) -> int:
    """Load the model, plan K jobs with seeds seed..seed+K-1, run them as one batch, write files."""
    from improv.engine.engine import Engine
    from improv.engine.generation import (
        GenerationError,
        SchedulerSessions,
        execute,
        missing_parts,
    )
    from improv.engine.live import SamplingParams

    _check(args, name)
    for attr in ("prompt", "song", "melody"):  # fail before the model loads
        path = getattr(args, attr, None)
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"improv {name}: no such file: {path}")
    from improv.engine.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)  # the bundled model from any directory
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"improv {name}: no checkpoint at {ckpt} (a folder with config.json)")
    engine = Engine.load(ckpt, device=args.device)
    k = args.variations
    _READ_CACHE.clear()  # one command, one read of its input
    tok = engine.tokenizer
    with SchedulerSessions(engine, max_sessions=k) as sessions:
        jobs = []
        for i in range(k):
            seed = None if args.seed is None else args.seed + i
            sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=seed)
            try:
                jobs.append(plan(sessions, tok, sampling))
            except GenerationError as e:
                raise SystemExit(f"improv {name}: {e}") from e

        async def all_jobs() -> list:
            return await asyncio.gather(*(execute(sessions, j) for j in jobs))

        t0 = time.perf_counter()
        results = asyncio.run(all_jobs())
        elapsed = time.perf_counter() - t0
    for path, notes, job in zip(_outputs(args.out, k), results, jobs, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.notes_to_midi(notes, job.cond.tempo, job.chords()).save(path)
        silent = missing_parts(tok.vocab, job, notes)
        missing = f"; asked-for parts that stayed silent: {', '.join(silent)}" if silent else ""
        log.info("wrote %s (%d notes%s)", path, len(notes), missing)
    made = sum(music_seconds(n) for n in results)
    log.info(
        "generated %.1f s of music in %.1f s (%.1fx real time)",
        made,
        elapsed,
        made / max(elapsed, 1e-9),
    )
    return 0


def generate_command() -> tuple[str, Callable, Callable]:
    help_ = "continue a MIDI file, or compose from scratch without one"

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("prompt", nargs="?", help="MIDI file to continue (optional)")
        _common(p)

    def run(args: argparse.Namespace) -> int:
        from improv.engine.generation import plan_continue
        from improv.engine.tokenizer import Notes

        def plan(sessions: object, tok: object, sampling: object) -> object:
            notes = _read(tok, args.prompt, "generate") if args.prompt else Notes.empty()
            until = (notes.duration if len(notes) else 0.0) + args.seconds  # type: ignore[attr-defined]
            cond = _conditioning(args, "generate", args.prompt, until)
            return plan_continue(sessions, notes, args.seconds, sampling, cond=cond)  # type: ignore[arg-type]

        return _run(args, "generate", plan, lambda n: args.seconds)

    return help_, add_arguments, run


def infill_command() -> tuple[str, Callable, Callable]:
    help_ = "regenerate a time span of a MIDI file (a new melody, new accompaniment, or both)"

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("song", help="MIDI file")
        p.add_argument("--start", type=float, required=True, help="gap start, seconds")
        p.add_argument("--end", type=float, required=True, help="gap end, seconds")
        p.add_argument(
            "--parts",
            choices=sorted(PART_CHOICES),
            default="all",
            help="which parts to regenerate in the gap (default all)",
        )
        _common(p, seconds=False)

    def run(args: argparse.Namespace) -> int:
        from improv.engine.generation import plan_infill

        if not 0 <= args.start < args.end:
            raise SystemExit(
                f"improv infill: need 0 <= --start < --end, got {args.start}, {args.end}"
            )

        def plan(sessions: object, tok: object, sampling: object) -> object:
            notes = _read(tok, args.song, "infill")
            parts = PART_CHOICES[args.parts]
            if args.parts == "accompaniment":
                parts = [p for p in tok.parts if p != "lead"]  # type: ignore[attr-defined]
            cond = _conditioning(args, "infill", args.song, max(notes.duration, args.end))  # type: ignore[attr-defined]
            return plan_infill(sessions, notes, args.start, args.end, sampling, parts, cond)  # type: ignore[arg-type]

        return _run(args, "infill", plan, lambda n: args.end - args.start)

    return help_, add_arguments, run


def accompany_command() -> tuple[str, Callable, Callable]:
    help_ = (
        "add accompaniment parts under a melody (the file's lead track, or every pitched track "
        "if none is named as one; its other parts are kept and played along with)"
    )

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("melody", help="MIDI file with the melody")
        p.add_argument(
            "--parts",
            default="harmony",
            help="accompaniment parts among counter, harmony, bass, drums (default harmony: the "
            "default model's piano; it has never heard a bass)",
        )
        _common(p, seconds=False)

    def run(args: argparse.Namespace) -> int:
        from improv.engine.generation import plan_accompany

        parts = [s.strip() for s in args.parts.split(",") if s.strip()]
        bad = [p for p in parts if p not in ACCOMPANY_PARTS]
        if bad or not parts:  # before the model loads
            raise SystemExit(
                f"improv accompany: --parts must be among {', '.join(ACCOMPANY_PARTS)}; got {bad}"
            )

        def plan(sessions: object, tok: object, sampling: object) -> object:
            v = tok.vocab  # type: ignore[attr-defined]
            notes = _read(tok, args.melody, "accompany")
            if not (notes.part == v.lead).any():  # type: ignore[attr-defined]
                notes = _read(tok, args.melody, "accompany", parts="lead")
            if not (notes.part == v.lead).any():  # type: ignore[attr-defined]
                raise SystemExit(f"improv accompany: {args.melody} has no melody notes")
            cond = _conditioning(args, "accompany", args.melody, notes.duration + 1.0)  # type: ignore[attr-defined]
            return plan_accompany(sessions, notes, sampling, parts, cond=cond)  # type: ignore[arg-type]

        return _run(args, "accompany", plan, lambda n: n.duration)

    return help_, add_arguments, run
