"""Training and validation curves from metrics.jsonl, as a PNG (matplotlib, Agg: no display)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: str | Path, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    valid = [
        (r["step"], r["valid_loss"], r["valid_bits_per_note"]) for r in rows if "valid_loss" in r
    ]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train (all objectives)", lw=1)
    if valid:
        s, v, _ = zip(*valid, strict=True)
        ax.plot(s, v, "o-", label="valid (continuation)", lw=1.5)
        bx.plot(s, [b for *_, b in valid], "o-", color="C1")
    ax.set(xlabel="step", ylabel="nats / token", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    bx.set(xlabel="step", ylabel="bits / note", title="validation bits per note")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
