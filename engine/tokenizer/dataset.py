"""Dataset build (`improv tokenize`) and the reader the trainer streams from.

A dataset is a folder:

    tokenizer.json   the TokenizerConfig the tokens were made with
    tokens.bin       uint16, every file's `BOS TASK_CONTINUE events EOS`, back to back
    notes.npy        structured array of every file's notes (for infill/accompaniment layouts and
                     note-level augmentation, which re-encode windows on the fly)
    marks.npy        structured array of every file's beats and chord changes (annotations.py);
                     absent in datasets built before them (read as none)
    index.json       per file: path, token, note and mark offsets and counts, duration in seconds
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from . import Notes

log = logging.getLogger(__name__)

NOTE_DTYPE = np.dtype(
    [
        ("start", "<f8"),
        ("end", "<f8"),
        ("pitch", "u1"),
        ("velocity", "u1"),
        ("part", "u1"),
        ("program", "u1"),
        ("sustained", "?"),
    ]
)


@dataclass(frozen=True)
class BuildOptions:
    min_notes: int = 1  # files with fewer notes (after filters) are skipped
    keep_parts: tuple[str, ...] | None = None  # None: all parts
    programs: frozenset[int] | None = None  # None: all GM programs (drums are kept by part)
    part_rules: tuple[tuple[str, str], ...] = ()  # (track-name regex, part), before the defaults
    parts: str | None = None  # force one part for every pitched track
    # (path, notes) -> notes, after reading: annotations beside a file (e.g. the trainer's bass
    # from POP909's chords); a module-level function or a partial of one (workers pickle it)
    annotate: Callable[[str, Notes], Notes] | None = None
    # beats and chords (annotations.read_annotations): written as tokens when the tokenizer has
    # harmony tokens, and stored for the trainer's windows either way
    marks: bool = True
    tempo_beats: bool = True  # beats from the file's tempo map where no beat file is beside it


MARK_DTYPE = np.dtype([("time", "<f8"), ("kind", "i1"), ("value", "<i2")])


def _notes_to_records(notes: object) -> np.ndarray:
    rec = np.empty(len(notes), dtype=NOTE_DTYPE)  # type: ignore[arg-type]
    for name in NOTE_DTYPE.names:
        rec[name] = getattr(notes, name)
    return rec


def records_to_notes(rec: np.ndarray) -> object:
    from . import Notes

    return Notes(
        start=rec["start"].astype(np.float64),
        end=rec["end"].astype(np.float64),
        pitch=rec["pitch"].astype(np.int16),
        velocity=rec["velocity"].astype(np.int16),
        part=rec["part"].astype(np.int16),
        program=rec["program"].astype(np.int16),
        sustained=rec["sustained"].copy(),
    )


# Per-process tokenizer, set up once by the pool initializer.
_WORKER: dict = {}


def _init_worker(config_json: str, options: BuildOptions) -> None:
    from . import Tokenizer, TokenizerConfig

    _WORKER["tok"] = Tokenizer(TokenizerConfig.from_dict(json.loads(config_json)))
    _WORKER["options"] = options


def records_to_marks(rec: np.ndarray) -> object:
    from .harmony import Marks

    return Marks(
        rec["time"].astype(np.float64), rec["kind"].astype(np.int8), rec["value"].astype(np.int16)
    )


_Result = tuple[str, np.ndarray | None, np.ndarray | None, np.ndarray | None, str | None]


def _process(path: str) -> _Result:
    from . import MidiReadError
    from .annotations import read_annotations
    from .harmony import Marks

    tok = _WORKER["tok"]
    opt: BuildOptions = _WORKER["options"]
    try:
        notes = tok.read_notes(path, parts=opt.parts, rules=opt.part_rules)
        if opt.annotate is not None:
            notes = opt.annotate(path, notes)
        marks = read_annotations(path, opt.tempo_beats) if opt.marks else Marks.empty()
    except MidiReadError as e:
        return path, None, None, None, str(e)
    except Exception as e:  # a parser bug (or a broken annotation) must not stop a long build
        return path, None, None, None, f"{type(e).__name__}: {e}"
    keep = np.ones(len(notes), dtype=bool)
    if opt.keep_parts is not None:
        idx = [tok.vocab.part_index[p] for p in opt.keep_parts]
        keep &= np.isin(notes.part, idx)
    if opt.programs is not None:
        keep &= np.isin(notes.program, list(opt.programs)) | (notes.part == tok.vocab.drums)
    notes = notes.select(keep)
    if len(notes) < opt.min_notes:
        return path, None, None, None, f"{len(notes)} notes (minimum {opt.min_notes})"
    if len(marks):  # no beats or chords past the music
        marks = marks.select(marks.time < float(notes.end.max()))
    ids = tok.encode_notes(notes, marks=marks)
    rec = np.empty(len(marks), dtype=MARK_DTYPE)
    rec["time"], rec["kind"], rec["value"] = marks.time, marks.kind, marks.value
    return path, np.asarray(ids, dtype=np.uint16), _notes_to_records(notes), rec, None


def _name(f: Callable | None) -> str | None:
    """A function's (or a partial's) name, for the dataset's summary."""
    if f is None:
        return None
    inner = getattr(f, "func", f)
    return f"{inner.__module__}.{inner.__qualname__}"


def find_midi(inputs: Sequence[str | Path], pattern: str = "*.mid*") -> list[Path]:
    """Files under the given folders (recursively) matching the glob, plus files given directly."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(
                sorted(
                    q
                    for q in p.rglob("*")
                    if q.is_file() and fnmatch.fnmatch(q.name.lower(), pattern.lower())
                )
            )
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out


def filter_by_list(files: list[Path], list_file: str | Path) -> list[Path]:
    """Keep files named in a list (one entry per line: a path suffix, a folder name or a stem)."""
    wanted = {line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()}

    def hit(p: Path) -> bool:
        posix = p.as_posix()
        return (
            p.stem in wanted
            or any(part in wanted for part in p.parts)
            or any(posix.endswith("/" + w) or posix == w for w in wanted)
        )

    return [p for p in files if hit(p)]


def build_dataset(
    files: Sequence[str | Path],
    out: str | Path,
    tokenizer: object | None = None,
    options: BuildOptions | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `files` into a dataset folder; returns a summary dict (also in index.json)."""
    from tqdm import tqdm

    from . import Tokenizer

    tok = tokenizer or Tokenizer()
    options = options or BuildOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    paths = [str(f) for f in files]
    t0 = time.perf_counter()
    results: list[_Result] = []
    init_args = (tok.config.to_json(), options)
    chunksize = max(1, min(64, len(paths) // (workers * 8) or 1))
    bar = tqdm(total=len(paths), unit="file", disable=not progress, desc="tokenize")
    if workers == 1:
        _init_worker(*init_args)
        for p in paths:
            results.append(_process(p))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init_args) as pool:
            for r in pool.map(_process, paths, chunksize=chunksize):
                results.append(r)
                bar.update()
    bar.close()

    index: list[dict] = []
    skipped: list[dict] = []
    tok_off = note_off = mark_off = 0
    mark_chunks: list[np.ndarray] = []
    with open(out / "tokens.bin", "wb") as ft:
        note_chunks: list[np.ndarray] = []
        for path, ids, rec, marks, err in results:
            if err is not None:
                log.warning("skipped %s: %s", path, err)
                skipped.append({"path": path, "reason": err})
                continue
            assert ids is not None and rec is not None and marks is not None
            ft.write(ids.tobytes())
            index.append(
                {
                    "path": path,
                    "token_offset": tok_off,
                    "token_count": len(ids),
                    "note_offset": note_off,
                    "note_count": len(rec),
                    "mark_offset": mark_off,
                    "mark_count": len(marks),
                    "duration": float(rec["end"].max()),
                }
            )
            tok_off += len(ids)
            note_off += len(rec)
            mark_off += len(marks)
            note_chunks.append(rec)
            mark_chunks.append(marks)
    notes = np.concatenate(note_chunks) if note_chunks else np.empty(0, dtype=NOTE_DTYPE)
    np.save(out / "notes.npy", notes)
    np.save(
        out / "marks.npy",
        np.concatenate(mark_chunks) if mark_chunks else np.empty(0, dtype=MARK_DTYPE),
    )
    tok.save(out / "tokenizer.json")
    elapsed = time.perf_counter() - t0
    summary = {
        "files": len(index),
        "skipped": len(skipped),
        "tokens": tok_off,
        "notes": note_off,
        "seconds": round(elapsed, 3),
        "options": {
            "min_notes": options.min_notes,
            "keep_parts": options.keep_parts,
            "programs": sorted(options.programs) if options.programs is not None else None,
            "part_rules": options.part_rules,
            "parts": options.parts,
            "annotate": _name(options.annotate),
            "marks": options.marks,
            "tempo_beats": options.tempo_beats,
        },
    }
    (out / "index.json").write_text(
        json.dumps({"summary": summary, "files": index, "skipped": skipped}, indent=1)
    )
    return summary


class TokenDataset:
    """Read side of a dataset folder: memory-mapped tokens, notes on demand."""

    def __init__(self, path: str | Path) -> None:
        from . import Tokenizer

        self.path = Path(path)
        if not (self.path / "index.json").exists():
            raise FileNotFoundError(
                f"{self.path} is not a dataset folder (no index.json); build one with `improv tokenize`"
            )
        meta = json.loads((self.path / "index.json").read_text())
        self.files: list[dict] = meta["files"]
        self.summary: dict = meta["summary"]
        self.tokenizer = Tokenizer.load(self.path / "tokenizer.json")
        if (self.path / "tokens.bin").stat().st_size == 0:
            self.tokens = np.zeros(0, dtype=np.uint16)  # mmap cannot map an empty file
        else:
            self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.uint16, mode="r")
        self._notes = np.load(self.path / "notes.npy", mmap_mode="r")
        marks = self.path / "marks.npy"
        self._marks = np.load(marks) if marks.exists() else np.empty(0, dtype=MARK_DTYPE)

    def __len__(self) -> int:
        return len(self.files)

    def file_tokens(self, i: int) -> np.ndarray:
        f = self.files[i]
        return self.tokens[f["token_offset"] : f["token_offset"] + f["token_count"]]

    def file_notes(self, i: int) -> object:
        f = self.files[i]
        return records_to_notes(self._notes[f["note_offset"] : f["note_offset"] + f["note_count"]])

    def file_marks(self, i: int) -> object:
        """The file's beats and chord changes (harmony.Marks; none in older datasets)."""
        f = self.files[i]
        lo = f.get("mark_offset", 0)
        return records_to_marks(self._marks[lo : lo + f.get("mark_count", 0)])


# --- command line ---------------------------------------------------------------------------------


def _parse_programs(spec: str) -> frozenset[int]:
    out: set[int] = set()
    for piece in spec.split(","):
        lo, _, hi = piece.partition("-")
        a, b = int(lo), int(hi or lo)
        if not (0 <= a <= b <= 127):
            raise argparse.ArgumentTypeError(f"programs must be in 0..127, got {piece!r}")
        out.update(range(a, b + 1))
    return frozenset(out)


def _parse_rule(spec: str) -> tuple[str, str]:
    pattern, sep, part = spec.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"a part rule is REGEX=PART, got {spec!r}")
    re.compile(pattern)
    return pattern, part


def command() -> tuple[
    str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]
]:
    help_ = "tokenize a folder tree of MIDI into a training dataset"

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", help="MIDI files or folders (searched recursively)")
        p.add_argument("-o", "--out", required=True, help="output dataset folder")
        p.add_argument(
            "--glob", default="*.mid*", help="file name pattern in folders (default *.mid*)"
        )
        p.add_argument(
            "--list",
            dest="list_file",
            help="keep only files named in this list (paths, folder names or stems)",
        )
        p.add_argument(
            "--min-notes", type=int, default=16, help="skip files with fewer notes (default 16)"
        )
        p.add_argument(
            "--keep-parts", help="comma-separated parts to keep, e.g. lead,harmony (default all)"
        )
        p.add_argument(
            "--programs",
            type=_parse_programs,
            help="GM programs to keep, e.g. 0-7,32-39 (drums always kept)",
        )
        p.add_argument(
            "--part-rule",
            action="append",
            type=_parse_rule,
            default=[],
            metavar="REGEX=PART",
            help="map track names matching REGEX to PART (repeatable; tried before the defaults)",
        )
        p.add_argument(
            "--parts", help="put every pitched track in this part (e.g. lead for melody files)"
        )
        p.add_argument("--tokenizer", help="tokenizer.json to use (default: the default config)")
        p.add_argument(
            "--no-tempo-beats",
            dest="tempo_beats",
            action="store_false",
            help="no beats from the files' tempo maps (beat files beside them still count)",
        )
        p.add_argument(
            "--no-marks",
            dest="marks",
            action="store_false",
            help="neither beats nor chords (chord .lab / chord_midi.txt files are ignored)",
        )
        p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    def run(args: argparse.Namespace) -> int:
        from . import Tokenizer

        tok = Tokenizer.load(args.tokenizer) if args.tokenizer else Tokenizer()
        keep = tuple(s.strip() for s in args.keep_parts.split(",")) if args.keep_parts else None
        for name in (
            *(keep or ()),
            *(r[1] for r in args.part_rule),
            *([args.parts] if args.parts else []),
        ):
            if name not in tok.parts:
                raise SystemExit(
                    f"improv tokenize: unknown part {name!r}; parts are {', '.join(tok.parts)}"
                )
        files = find_midi(args.inputs, args.glob)
        if args.list_file:
            files = filter_by_list(files, args.list_file)
        if not files:
            raise SystemExit("improv tokenize: no MIDI files found")
        opts = BuildOptions(
            min_notes=args.min_notes,
            keep_parts=keep,
            programs=args.programs,
            part_rules=tuple(args.part_rule),
            parts=args.parts,
            marks=args.marks,
            tempo_beats=args.tempo_beats,
        )
        s = build_dataset(files, args.out, tok, opts, args.workers)
        log.info(
            "%d files -> %s: %d tokens, %d notes, %d skipped, %.1f s",
            s["files"],
            args.out,
            s["tokens"],
            s["notes"],
            s["skipped"],
            s["seconds"],
        )
        return 0

    return help_, add_arguments, run
