"""Train the learned chord planner (`improv.engine.chord_planner`) on POP909's melodies and chords.

    python -m improv.trainer.chord_planner --shared ../shared/data --out models/default

Examples are 30 s windows of each song's melody (the accompaniment planner's setting: the
harmony card asks for the first 30 s), read with its annotated beats (beat_midi.txt); a beat's
target is the pitch-class set of the annotated chord at its middle (chord_midi.txt; beats
under N are not scored). Training windows start at the melody's first note and every 10 s
after; the validation split's first window of each song is what the figures report: the share
of the planned triads' tones that are annotated chord tones, for this planner and for the HMM
(`chord_plan.plan_chords`), on the model card's 20 songs and on the other 39. They go into the
planner's JSON ("training"). About 17 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from improv.engine.chord_planner import (
    FOLLOWER,
    HEARD_S,
    PLANNER,
    ChordPlanner,
    PlannerConfig,
    causal_features,
    confident_tones,
    features,
)
from improv.engine.tokenizer import Notes, Tokenizer
from improv.engine.tokenizer.chord_plan import follow_chord, melody_weights, plan_chords
from improv.engine.tokenizer.harmony import chord_tones

from .chords import Chord, read_chords

log = logging.getLogger(__name__)

WINDOW_S = 30.0


@dataclass
class Window:
    weights: np.ndarray  # (N, 12) melody time per pitch class within each beat, in beats
    bar_pos: np.ndarray  # (N,) the beat's index in its bar
    beats_per_bar: np.ndarray  # (N,)
    lengths: np.ndarray  # (N,) seconds
    tones: np.ndarray  # (N, 12) the annotated chord's pitch classes
    scored: np.ndarray  # (N,) bool: a chord (not N) is annotated there
    heard: np.ndarray  # (N, 12) as `weights`, the first HEARD_S of each beat (the live twin's)


def song_window(
    melody: Notes, beats: np.ndarray, chords: list[Chord], lo: float, hi: float
) -> Window | None:
    """The beats of [lo, hi) with the melody heard there; `beats` (B, 2) time, is a downbeat."""
    sel = melody.select((melody.start >= lo) & (melody.start < hi))
    inside = (beats[:, 0] >= lo - 1e-6) & (beats[:, 0] < hi)
    t, down = beats[inside, 0], beats[inside, 1] > 0
    if len(t) < 2:
        return None
    edges = np.append(t, t[-1] + (t[-1] - t[-2]))  # (N+1,) the last beat as long
    end = np.minimum(sel.end, hi)
    w = melody_weights(sel.pitch, sel.start, end, edges) / np.diff(edges)[:, None]
    early = np.stack([t, t + HEARD_S], axis=1).ravel()  # (2N,) [beat, beat + HEARD_S] spans
    heard = melody_weights(sel.pitch, sel.start, end, early)[::2] / np.diff(edges)[:, None]
    bar_pos = np.arange(len(t)) - np.maximum.accumulate(np.where(down, np.arange(len(t)), 0))
    bars = np.cumsum(down)
    per_bar = np.bincount(bars)[bars]
    per_bar = np.where(per_bar < 2, 4, per_bar)
    mids = (edges[:-1] + edges[1:]) / 2
    tones = np.zeros((len(t), 12), dtype=np.float32)
    starts = np.array([c.start for c in chords])
    idx = np.searchsorted(starts, mids, side="right") - 1
    for i, j in enumerate(idx.tolist()):
        if j >= 0 and mids[i] < chords[j].end:
            tones[i, list(chords[j].tones)] = 1.0
    return Window(w, bar_pos, per_bar, np.diff(edges), tones, tones.any(axis=1), heard)


def read_song(tok: Tokenizer, folder: Path) -> tuple[Notes, np.ndarray, list[Chord]]:
    """A POP909 song's melody, beats (time, is a downbeat) and chords."""
    notes = tok.read_notes(folder / f"{folder.name}.mid")
    melody = notes.select(notes.part == tok.vocab.lead)
    rows = [r.split() for r in (folder / "beat_midi.txt").read_text().splitlines() if r.strip()]
    beats = np.array([[float(r[0]), float(r[-1])] for r in rows], dtype=np.float64).reshape(-1, 2)
    return melody, beats, read_chords(folder / "chord_midi.txt")


def windows(
    tok: Tokenizer, pop909: Path, ids: list[str], offsets: tuple[float, ...], first_only: bool
) -> list[Window]:
    """Windows of WINDOW_S from each song's first melody note: only the first, or every one
    (each also started `offsets` later)."""
    out = []
    for i in ids:
        melody, beats, chords = read_song(tok, pop909 / i)
        if not len(melody) or not chords:
            continue
        first, last = float(melody.start.min()), float(melody.end.max())
        for off in offsets:
            lo = first + off
            while lo < last - 8.0:
                if (w := song_window(melody, beats, chords, lo, lo + WINDOW_S)) is not None:
                    out.append(w)
                if first_only:
                    break
                lo += WINDOW_S
    return out


def _batch(
    items: list[Window], causal: bool = False, rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """Padded (x, pos, target, scored) of windows; for the live twin, each beat's first HEARD_S
    is heard or not at random (`rng`; None: heard), as live decides before a beat and again
    when a note is struck at it."""
    n = max(len(w.weights) for w in items)
    xs, ps, ys, ms = [], [], [], []
    for w in items:
        if causal:
            is_heard = rng.random(len(w.weights)) < 0.5 if rng else np.ones(len(w.weights))
            x, p = causal_features(w.weights, w.heard, is_heard, w.bar_pos, w.beats_per_bar)
        else:
            x, p = features(w.weights, w.bar_pos, w.beats_per_bar)
        pad = n - len(w.weights)
        xs.append(torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)))
        ps.append(torch.nn.functional.pad(p, (0, 0, 0, pad)))
        ys.append(torch.nn.functional.pad(torch.from_numpy(w.tones), (0, 0, 0, pad)))
        ms.append(torch.nn.functional.pad(torch.from_numpy(w.scored), (0, pad)))
    return torch.stack(xs), torch.stack(ps), torch.stack(ys), torch.stack(ms)


def loss_of(planner: ChordPlanner, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, p, y, m = batch
    bce = torch.nn.functional.binary_cross_entropy_with_logits(planner(x, p), y, reduction="none")
    return (bce.mean(-1) * m).sum() / m.sum().clamp(min=1)


def train(
    planner: ChordPlanner,
    train_set: list[Window],
    valid_set: list[Window],
    steps: int,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """AdamW with a one-cycle schedule over random batches of windows; the final validation
    loss."""
    gen = torch.Generator().manual_seed(seed)
    rng, causal = np.random.default_rng(seed), planner.config.causal
    opt = torch.optim.AdamW(planner.parameters(), lr / 3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    valid = _batch(valid_set, causal, np.random.default_rng(1)) if valid_set else None
    t0 = time.perf_counter()
    vl = float("nan")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train_set), (batch,), generator=gen).tolist()
        loss = loss_of(planner.train(), _batch([train_set[i] for i in idx], causal, rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if valid is not None and (step % 250 == 0 or step == steps):
            with torch.no_grad():
                vl = float(loss_of(planner.eval(), valid))
            log.info(
                "step %d train %.4f valid %.4f (%.0f s)",
                step,
                loss.item(),
                vl,
                time.perf_counter() - t0,
            )
    planner.eval()
    return vl


def plan_share(
    plan: np.ndarray, w: Window, played: list[int] | None = None
) -> tuple[float, float, float]:
    """(hits, total, tones played x total) of the planned chords' tones on annotated tones,
    weighted by beat length; `played` (N,): each beat's tones played as 12 bits (a hedge),
    else the whole chord's."""
    hits = total = n_played = 0.0
    for i, (c, tones, length, ok) in enumerate(
        zip(plan.tolist(), w.tones, w.lengths, w.scored, strict=True)
    ):
        if ok and c:  # (no chord yet: a live twin that has heard nothing)
            mine = sorted(chord_tones(int(c)))
            if played is not None:
                mine = [pc for pc in range(12) if played[i] >> pc & 1]
            hits += length * float(tones[mine].mean())
            total += length
            n_played += length * len(mine)
    return hits, total, n_played


def share(planner: ChordPlanner | None, ws: list[Window]) -> float:
    h = t = 0.0
    for w in ws:
        plan = (planner.plan if planner else plan_chords)(w.weights, w.bar_pos, w.beats_per_bar)
        a, b, _ = plan_share(plan, w)
        h, t = h + a, t + b
    return round(h / t, 4) if t else float("nan")


def follow_share(
    follower: ChordPlanner | None,
    ws: list[Window],
    is_heard: bool,
    beats: int = 32,
    hedge: float = 0.0,
) -> float | tuple[float, float]:
    """As `share`, live: each beat's chord decided from the `beats` before it and, if
    `is_heard`, its first HEARD_S (the HMM's twin `follow_chord` for None), the chord held on
    unless the decision changes it. `hedge` > 0: only the chord's tones the follower gives at
    least that chance are played (`confident_tones`); (share, tones played per beat)."""
    h = t = n = 0.0
    for w in ws:
        plan, played, chord = [], [], 0
        for i in range(len(w.weights)):
            lo = max(0, i - beats)
            pos, per_bar = w.bar_pos[lo : i + 1], w.beats_per_bar[lo : i + 1]
            heard = w.heard[lo : i + 1].copy()
            flags = np.ones(len(heard))
            if not is_heard:
                heard[-1], flags[-1] = 0.0, 0.0
            if follower is None:
                rows = np.concatenate([w.weights[lo:i], heard[-1:]])
                chord = follow_chord(rows, pos, per_bar) if rows.any() else chord
            else:
                chord, member = follower.follow(
                    w.weights[lo : i + 1], heard, flags, pos, per_bar, chord
                )
                played.append(confident_tones(member, chord, hedge) if hedge and chord else 0)
            plan.append(chord)
        a, b, k = plan_share(np.array(plan), w, played if hedge else None)
        h, t, n = h + a, t + b, n + k
    if not hedge:
        return round(h / t, 4) if t else float("nan")
    return (round(h / t, 4), round(n / t, 2)) if t else (float("nan"), float("nan"))


HEDGE = 0.5  # the live sessions' default chord_hedge (protocol.messages.LiveParams)


def figures(planner: ChordPlanner, card: list[Window], other: list[Window]) -> dict:
    """The planner's (or live twin's) figures against the HMM's, for its JSON."""
    if planner.config.causal:
        what = (
            "live: each beat's chord from the beats before it; ahead: decided before the "
            f"beat, heard: with its first {HEARD_S} s; hedged_{HEDGE}: only the chord's tones "
            f"the follower gives at least {HEDGE} (confident_tones) are played, and how many "
            "a beat"
        )
        out: dict = {}
        for name, songs in (("card_songs", card), ("other_songs", other)):
            for heard in ("ahead", "heard"):
                is_heard = heard == "heard"
                hedged, tones = follow_share(planner, songs, is_heard, hedge=HEDGE)
                out[f"{name}_{heard}"] = {
                    "planner": follow_share(planner, songs, is_heard),
                    "hmm": follow_share(None, songs, is_heard),
                    f"planner_hedged_{HEDGE}": hedged,
                    f"tones_played_hedged_{HEDGE}": tones,
                }
    else:
        what = "the whole melody"
        out = {
            name: {"planner": share(planner, songs), "hmm": share(None, songs)}
            for name, songs in (("card_songs", card), ("other_songs", other))
        }
    return {
        "what": "share of the planned triads' tones that are annotated chord tones, "
        f"first 30 s of melody, POP909 validation songs ({what})",
        **out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to write it to")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--card-songs", type=int, default=20, help="the model card's songs (first n)")
    ap.add_argument("--causal", action="store_true", help="the live twin (chord_follower.*)")
    ap.add_argument(
        "--evaluate",
        action="store_true",
        help="no training: measure the one saved in --out again (its JSON's figures)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    pop909 = args.shared / "pop909"
    ids = {
        s: sorted((pop909 / "splits" / f"{s}.txt").read_text().split()) for s in ("train", "valid")
    }
    tok = Tokenizer()
    valid_set = windows(tok, pop909, ids["valid"], (0.0,), first_only=True)
    card, other = valid_set[: args.card_songs], valid_set[args.card_songs :]
    if args.evaluate:
        planner = ChordPlanner.load(args.out, FOLLOWER if args.causal else PLANNER)
        if planner is None:
            raise SystemExit(
                f"no {'chord_follower' if args.causal else 'chord_planner'} in {args.out}"
            )
        planner.meta["plan_share"] = figures(planner, card, other)
        planner.meta["evaluated"] = " ".join(
            ["python -m improv.trainer.chord_planner", "--evaluate"]
            + (["--causal"] if args.causal else [])
        )
        log.info("%s", planner.meta["plan_share"])
        planner.save(args.out)
        return
    train_set = windows(tok, pop909, ids["train"], (0.0, 10.0, 20.0), first_only=False)
    log.info("%d training windows, %d validation", len(train_set), len(valid_set))
    planner = ChordPlanner(PlannerConfig(causal=args.causal))
    t0 = time.perf_counter()
    vl = train(planner, train_set, valid_set, args.steps)
    planner.meta = {
        "command": "python -m improv.trainer.chord_planner"
        + f" --steps {args.steps}{' --causal' if args.causal else ''}",
        "data": f"POP909 train split ({len(ids['train'])} songs), {len(train_set)} windows of 30 s",
        "steps": args.steps,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "valid_loss": round(vl, 4),
        "plan_share": figures(planner, card, other),
    }
    log.info("%s", planner.meta["plan_share"])
    planner.save(args.out)


if __name__ == "__main__":
    main()
