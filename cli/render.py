"""`improv render SONG.mid -o SONG.png`: a piano roll, one colour per part."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

PART_COLOURS = {
    "lead": "#d62728",
    "counter": "#ff7f0e",
    "harmony": "#1f77b4",
    "bass": "#2ca02c",
    "drums": "#7f7f7f",
}


def render_piano_roll(
    notes: object,
    parts: tuple[str, ...],
    out: str | Path,
    title: str | None = None,
    start: float | None = None,
    end: float | None = None,
    width: float = 14.0,
) -> None:
    """Draw notes (improv.engine.tokenizer.Notes) as a piano roll PNG: time across, pitch up,
    velocity as opacity; drums as ticks on their own lane below the pitched range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    n = notes
    lo = float(n.start.min()) if start is None and len(n) else (start or 0.0)
    hi = float(n.end.max()) if end is None and len(n) else (end or 1.0)
    fig, ax = plt.subplots(figsize=(width, 5), dpi=110)
    drums = parts.index("drums") if "drums" in parts else -1
    pitched = n.part != drums
    pmin = int(n.pitch[pitched].min()) - 2 if pitched.any() else 48
    pmax = int(n.pitch[pitched].max()) + 2 if pitched.any() else 84
    handles = []
    for idx, name in enumerate(parts):
        sel = np.flatnonzero((n.part == idx) & (n.start < hi) & (n.end > lo))
        if len(sel) == 0:
            continue
        colour = PART_COLOURS.get(name, "#9467bd")
        if idx == drums:
            y = pmin - 4 + (n.pitch[sel] % 4)  # a compact lane under the pitched range
            ax.scatter(n.start[sel], y, marker="|", s=40, c=colour)
        else:
            s, e, p = n.start[sel], np.maximum(n.end[sel], n.start[sel] + 0.02), n.pitch[sel]
            boxes = np.stack(
                [
                    np.stack([s, p - 0.4], 1),
                    np.stack([e, p - 0.4], 1),
                    np.stack([e, p + 0.4], 1),
                    np.stack([s, p + 0.4], 1),
                ],
                axis=1,
            )  # (N, 4 corners, xy)
            alpha = 0.35 + 0.65 * n.velocity[sel] / 127
            ax.add_collection(
                PolyCollection(
                    boxes,
                    facecolors=[(*matplotlib.colors.to_rgb(colour), a) for a in alpha],
                    edgecolors="none",
                )
            )
        handles.append(Patch(color=colour, label=name))
    ax.set_xlim(lo, hi)
    ax.set_ylim(pmin - (6 if drums >= 0 and (n.part == drums).any() else 0), pmax)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MIDI pitch")
    ax.grid(axis="x", alpha=0.2)
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def command() -> tuple[
    str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]
]:
    help_ = "draw a MIDI file as a piano roll PNG, parts in different colours"

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("midi", help="MIDI file")
        p.add_argument("-o", "--out", required=True, help="PNG to write")
        p.add_argument("--start", type=float, help="first second to draw")
        p.add_argument("--end", type=float, help="last second to draw")
        p.add_argument("--title", help="title (default: the file name)")

    def run(args: argparse.Namespace) -> int:
        from improv.engine.tokenizer import MidiReadError, Tokenizer

        tok = Tokenizer()
        try:
            notes = tok.read_notes(args.midi)
        except MidiReadError as e:
            raise SystemExit(f"improv render: {args.midi}: {e}") from e
        if len(notes) == 0:
            raise SystemExit(f"improv render: {args.midi} has no notes")
        render_piano_roll(
            notes, tok.parts, args.out, args.title or Path(args.midi).name, args.start, args.end
        )
        return 0

    return help_, add_arguments, run
