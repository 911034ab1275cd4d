"""Build the default model's datasets from ../shared/data: POP909 + Groove, train and valid splits.

    python -m improv.trainer.prepare --shared ../shared/data --out data

POP909's track names (MELODY, BRIDGE, PIANO) map to lead, counter, harmony by the tokenizer's
default part rules; Groove's channel-10 kits become drums (TD-11 notes folded to GM classes).
"""

from __future__ import annotations

import argparse
import csv
import logging
from functools import partial
from pathlib import Path

from improv.engine.tokenizer import Tokenizer, TokenizerConfig
from improv.engine.tokenizer.dataset import BuildOptions, build_dataset

from .chords import add_chord_bass

log = logging.getLogger(__name__)

# Our split name -> (POP909 list file, Groove info.csv split value)
SPLITS = {"train": ("train.txt", "train"), "valid": ("valid.txt", "validation")}


def pop909_files(root: Path, list_name: str) -> list[Path]:
    ids = [s.strip() for s in (root / "splits" / list_name).read_text().split() if s.strip()]
    files = [root / i / f"{i}.mid" for i in ids]
    missing = [f for f in files if not f.exists()]
    if missing:
        log.warning(
            "%d POP909 files of %s are missing, e.g. %s", len(missing), list_name, missing[0]
        )
    return [f for f in files if f.exists()]


def groove_files(root: Path, split: str) -> list[Path]:
    with open(root / "info.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [root / r["midi_filename"] for r in rows if r["split"] == split]


def prepare(
    shared: Path,
    out: Path,
    workers: int | None = None,
    min_notes: int = 16,
    chord_bass: bool = False,
    harmony: bool = True,
    marks: bool = True,
) -> dict:
    tok = Tokenizer(TokenizerConfig(harmony=harmony))
    bass = partial(add_chord_bass, bass_part=tok.vocab.part_index["bass"]) if chord_bass else None
    # POP909's beats and chords from its annotation files; Groove's beats from its tempo map
    opts = BuildOptions(min_notes=min_notes, annotate=bass, marks=harmony and marks)
    summaries = {}
    for name, (pop_list, groove_split) in SPLITS.items():
        files = pop909_files(shared / "pop909", pop_list) + groove_files(
            shared / "groove", groove_split
        )
        log.info("%s: %d files", name, len(files))
        summaries[name] = build_dataset(files, out / name, tok, opts, workers, progress=False)
        log.info("%s: %s", name, summaries[name])
    return summaries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default="../shared/data", help="the shared data folder")
    p.add_argument("--out", default="data", help="writes OUT/train and OUT/valid")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument(
        "--chord-bass",
        action="store_true",
        help="add a root bass part to POP909 songs from their chord annotations (trainer/chords.py)",
    )
    p.add_argument(
        "--no-harmony",
        dest="harmony",
        action="store_false",
        help="the tokenizer without BAR/BEAT/CHORD/header tokens (the models before them)",
    )
    p.add_argument(
        "--no-marks",
        dest="marks",
        action="store_false",
        help="the harmony tokenizer, but no beats or chords written (to score a model on music "
        "without annotations)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    prepare(
        Path(args.shared),
        Path(args.out),
        args.workers,
        chord_bass=args.chord_bass,
        harmony=args.harmony,
        marks=args.marks,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
