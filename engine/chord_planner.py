"""A learned chord plan from a melody known ahead: which pitch classes the song's chord holds at
each beat, and the triads that follow from it.

`chord_plan.plan_chords` (a hand-tuned HMM) names the triad that the melody's own tones fit. A
song's chord is more than its melody's tones: a held note is the third of one chord and the
fifth of the next, a phrase leans on the progressions pop songs use. This model learns that
from POP909's annotated chords (trainer/chord_planner.py): a two-layer GRU over the beats (both
directions: offline accompaniment hears the whole melody before it plays) reads each beat's
melody time per pitch class, the melody's key profile and where the beat falls in the bar, and
gives, for every pitch class, the probability that it is a tone of the song's chord there. The
network is shared over the 12 transpositions (it reads the input rotated to each pitch class
in turn), so it hears intervals, not keys. The plan is then the triad a beat with the most
expected chord tones (what an accompaniment playing the plan's tones scores), through the same
Viterbi as the HMM with small costs for a change off the downbeat.

Measured (the first 30 s of melody, the share of the planned triads' tones that are tones of
the annotated chord): figures in the checkpoint's `chord_planner.json` ("training"), written by
`python -m improv.trainer.chord_planner`.

Live play has no melody ahead: its twin (`causal=True`, the files `chord_follower.*`) reads
the beats one way only and names a beat's chord from the beats before it and, where the player
struck a note at the beat, the first `HEARD_S` of it (`follow`). Read so, a chord is often a
guess; `confident_tones` keeps the tones of it the twin is sure of (a live session plays only
those: `ChordTones.hedges`).

Files: `chord_planner.safetensors` + `chord_planner.json` beside a checkpoint's model (and
`chord_follower.*`); a checkpoint without them plans with the HMM (`chord_plan`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .tokenizer.chord_plan import TRIADS, change_cost, mid_bar, viterbi
from .tokenizer.harmony import chord_tones

logger = logging.getLogger(__name__)

PLANNER, FOLLOWER = "chord_planner", "chord_follower"  # file names: offline, live
POSITIONS = 6  # downbeat, mid-bar, other beat; 3 beats a bar, 4, other
HEARD_S = 0.08  # a live beat's chord hears this much of its melody (a note struck at the beat)
_ROT = torch.tensor([[(p + r) % 12 for p in range(12)] for r in range(12)])  # (R, 12)
_TRIAD_TONES = torch.tensor(
    [[p in chord_tones(int(c)) for p in range(12)] for c in TRIADS], dtype=torch.float32
)  # (S, 12)
_STATE = {int(c): s for s, c in enumerate(TRIADS)}  # chord index -> its row


@dataclass(frozen=True)
class PlannerConfig:
    hidden: int = 96
    layers: int = 2
    dropout: float = 0.1
    change_cost: tuple[float, float, float] = (0.02, 0.08, 0.2)  # downbeat, mid-bar, other beat
    window_beats: int = 64  # beats planned at once (the training windows are 30 s, ~60 beats)
    margin_beats: int = 16  # context read on each side of a window
    causal: bool = False  # the live twin: the beats before, and what is heard of this one

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlannerConfig:
        d = dict(d)
        if "change_cost" in d:
            d["change_cost"] = tuple(d["change_cost"])
        return cls(**d)


def positions(bar_pos: np.ndarray, beats_per_bar: np.ndarray) -> np.ndarray:
    """(N, P) where each beat falls: downbeat, mid-bar (of an even bar of 4 or more), other;
    the bar's length 3, 4, other."""
    half = mid_bar(beats_per_bar)
    return np.stack(
        [
            bar_pos == 0,
            bar_pos == half,
            (bar_pos != 0) & (bar_pos != half),
            beats_per_bar == 3,
            beats_per_bar == 4,
            (beats_per_bar != 3) & (beats_per_bar != 4),
        ],
        axis=1,
    ).astype(np.float32)


def _profile(w: np.ndarray) -> np.ndarray:
    return w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-9)


def features(
    weights: np.ndarray, bar_pos: np.ndarray, beats_per_bar: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2, 12) each beat's melody time per pitch class (in beats) and the key profile (the
    whole span's, normalized); (N, P) the beat's place in the bar."""
    prof = np.repeat(_profile(weights.sum(axis=0, keepdims=True)), len(weights), axis=0)
    x = np.stack([weights, prof], axis=1).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(positions(bar_pos, beats_per_bar))


def causal_features(
    weights: np.ndarray,
    heard: np.ndarray,
    is_heard: np.ndarray,
    bar_pos: np.ndarray,
    beats_per_bar: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The live twin's input at each beat i: (N, 3, 12) the whole melody of beat i-1, what is
    heard of beat i (`heard`, zero where `is_heard` is false: decided before the beat) and the
    key profile until then; (N, P+1) the beat's place in the bar and `is_heard`."""
    heard = heard * is_heard[:, None]
    before = np.concatenate([np.zeros((1, 12)), weights[:-1]])  # (N, 12)
    prof = _profile(np.cumsum(before, axis=0) + heard)
    x = np.stack([before, heard, prof], axis=1).astype(np.float32)
    pos = np.concatenate([positions(bar_pos, beats_per_bar), is_heard[:, None]], axis=1)
    return torch.from_numpy(x), torch.from_numpy(pos.astype(np.float32))


class ChordPlanner(torch.nn.Module):
    def __init__(self, config: PlannerConfig | None = None, meta: dict | None = None) -> None:
        super().__init__()
        self.config = c = config or PlannerConfig()
        self.meta = meta or {}
        self.channels, self.extra = (3, POSITIONS + 1) if c.causal else (2, POSITIONS)
        self.inp = torch.nn.Linear(self.channels * 12 + self.extra, c.hidden)
        self.gru = torch.nn.GRU(
            c.hidden, c.hidden, c.layers, batch_first=True, bidirectional=not c.causal,
            dropout=c.dropout,
        )  # fmt: skip
        self.out = torch.nn.Sequential(
            torch.nn.Linear((2 if c.causal else 3) * c.hidden, c.hidden),
            torch.nn.GELU(),
            torch.nn.Linear(c.hidden, 1),
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, N, C, 12), pos (B, N, P) -> (B, N, 12) logits: pitch class p is a chord tone."""
        return self.run(x, pos)[0]

    def run(
        self, x: torch.Tensor, pos: torch.Tensor, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` from the GRU state `h0` (None: zeros); also the state after the last beat,
        (L, B*12, H) (the live twin steps it beat by beat: `LiveFollow`)."""
        b, n, c = x.shape[:3]
        xr = x[:, :, :, _ROT].permute(0, 3, 1, 2, 4).reshape(b * 12, n, c * 12)  # to each pc
        pr = pos[:, None].expand(b, 12, n, self.extra).reshape(b * 12, n, self.extra)
        z = torch.nn.functional.gelu(self.inp(torch.cat([xr, pr], dim=-1)))  # (B*R, N, H)
        h, hn = self.gru(z, h0)  # (B*R, N, H or 2H)
        logits = self.out(torch.cat([h, z], dim=-1)).squeeze(-1)  # (B*R, N)
        return logits.reshape(b, 12, n).transpose(1, 2), hn

    @torch.no_grad()
    def membership(
        self, weights: np.ndarray, bar_pos: np.ndarray, beats_per_bar: np.ndarray
    ) -> np.ndarray:
        """(N, 12) the probability that each pitch class is a tone of the chord at each beat;
        arguments as `plan`. Long melodies go in windows of `window_beats` (the model learned
        30 s windows), each read with `margin_beats` of context on both sides."""
        c, n = self.config, len(weights)
        out = np.zeros((n, 12), dtype=np.float32)
        for lo in range(0, n, c.window_beats):
            a, b = max(0, lo - c.margin_beats), min(n, lo + c.window_beats + c.margin_beats)
            x, pos = features(weights[a:b], bar_pos[a:b], beats_per_bar[a:b])
            p = torch.sigmoid(self(x[None], pos[None]))[0].numpy()  # (b-a, 12)
            hi = min(n, lo + c.window_beats)
            out[lo:hi] = p[lo - a : hi - a]
        return out

    def plan(
        self, weights: np.ndarray, bar_pos: np.ndarray, beats_per_bar: np.ndarray
    ) -> np.ndarray:
        """(N,) chord indices (triads), one per beat, as `chord_plan.plan_chords`: `weights` (N, 12)
        the melody's time on each pitch class within each beat, in beats; `bar_pos` (N,) the
        beat's index in its bar; `beats_per_bar` (N,) its bar's length."""
        if len(weights) == 0:
            return np.zeros(0, dtype=np.int64)
        m = self.membership(weights, bar_pos, beats_per_bar)
        expected = m @ _TRIAD_TONES.numpy().T / 3  # (N, S) expected share of chord tones
        cost = change_cost(bar_pos, beats_per_bar, self.config.change_cost)
        return TRIADS[viterbi(expected, cost)]

    @torch.no_grad()
    def follow(
        self,
        weights: np.ndarray,
        heard: np.ndarray,
        is_heard: np.ndarray,
        bar_pos: np.ndarray,
        beats_per_bar: np.ndarray,
        current: int = 0,
    ) -> tuple[int, np.ndarray]:
        """The live twin (`causal`): the chord (a triad's index) of the last of N beats, and
        each pitch class's chance of being its tone (12,). `weights` (N, 12) each beat's melody
        in beats (the last row is not read: that beat is still being played), `heard` (N, 12)
        the first HEARD_S of each beat, `is_heard` (N,) whether that was heard yet; the
        `current` chord is kept unless another has more expected chord tones by the cost of a
        change there."""
        x, pos = causal_features(weights, heard, is_heard, bar_pos, beats_per_bar)
        m = torch.sigmoid(self(x[None], pos[None]))[0, -1].numpy()  # (12,)
        return self.choose(m, int(bar_pos[-1]), int(beats_per_bar[-1]), current), m

    def choose(self, member: np.ndarray, bar_pos: int, beats_per_bar: int, current: int) -> int:
        """The triad with the most expected chord tones under `member` (12,) at a beat, unless
        the `current` chord has as many less the cost of a change there."""
        expected = _TRIAD_TONES.numpy() @ member / 3  # (S,)
        best = int(np.argmax(expected))
        if current in _STATE:
            cost = change_cost(
                np.array([bar_pos]), np.array([beats_per_bar]), self.config.change_cost
            )[0]
            if expected[best] - expected[_STATE[current]] <= cost:
                return current
        return int(TRIADS[best])

    # --- files ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return FOLLOWER if self.config.causal else PLANNER

    def save(self, folder: str | Path) -> Path:
        """`folder/chord_planner.safetensors` and `.json` (the live twin: `chord_follower.*`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / f"{self.name}.safetensors"))
        doc = {"planner": asdict(self.config), "training": self.meta}
        (folder / f"{self.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, name: str = PLANNER) -> ChordPlanner | None:
        """The planner saved in `folder` under `name` (PLANNER or FOLLOWER); None if none."""
        folder = Path(folder)
        if not (folder / f"{name}.safetensors").exists():
            return None
        doc = json.loads((folder / f"{name}.json").read_text())
        planner = cls(PlannerConfig.from_dict(doc["planner"]), doc.get("training", {}))
        planner.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        logger.info("loaded %s of %s", name, folder)
        return planner.eval()


@dataclass
class _Chain:
    start: int  # the beat it began at
    h: torch.Tensor | None  # (L, 12, H) the GRU state after its latest beat
    key: np.ndarray  # (12,) the melody's time per pitch class since `start`, in beats
    before: tuple[torch.Tensor | None, np.ndarray] | None = None  # (h, key) a beat earlier


class LiveFollow:
    """A live session's chord follower, stepped once a beat: `ChordPlanner.follow` reads the
    last beats again at each decision (~2 ms on the event loop for 16 beats); this keeps the
    GRU's state and runs one step a decision. The state restarts every `restart` beats (a new
    chain warms up beside the old one, which decides until the new one has `restart` beats), so
    its memory is 1-2x `restart` beats, as long as the 30 s windows it learned from.

    Beat i's step reads the whole melody of beat i-1 and the first HEARD_S of beat i: `commit`
    beat i once both are known; `decide` beat i from the state after beat i-1 (committed), with
    what is known of both so far."""

    def __init__(self, follower: ChordPlanner, restart: int = 32) -> None:
        assert follower.config.causal, "LiveFollow steps the live twin (causal=True)"
        self.f, self.restart = follower, restart
        self.chains: list[_Chain] = []  # oldest first
        self.next_beat: int | None = None  # the next beat to commit
        self.origin: int | None = None  # the first beat it was asked about

    def pending(self, beat: int, back: int) -> int:
        """The first beat to commit before deciding `beat`: the next one not in the state (at
        most `back` beats before `beat`), or before any, the first beat asked about."""
        if self.origin is None:
            self.origin = beat
        return max(self.origin if self.next_beat is None else self.next_beat, beat - back)

    @staticmethod
    def _input(
        start: int, key: np.ndarray, beat: int, before: np.ndarray, first: np.ndarray,
        is_heard: bool, bar_pos: int, per_bar: int,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:  # fmt: skip
        before = before if beat > start else np.zeros(12)
        key = key + before
        heard = first * is_heard
        x = np.stack([before, heard, _profile(key + heard)])[None, None].astype(np.float32)
        pos = positions(np.array([bar_pos]), np.array([per_bar]))  # (1, P)
        pos = np.append(pos, [[float(is_heard)]], axis=1)[None].astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(pos), key

    @torch.no_grad()
    def commit(
        self, beat: int, before: np.ndarray, first: np.ndarray, bar_pos: int, per_bar: int
    ) -> None:
        """Beat `beat` is in the state: `before` (12,) the whole melody of the beat before it,
        `first` (12,) its own first HEARD_S (both in beats)."""
        if self.next_beat is not None and beat != self.next_beat:
            self.chains, self.next_beat = [], None  # a gap: start again
        if not self.chains or beat - self.chains[-1].start >= self.restart:
            self.chains.append(_Chain(beat, None, np.zeros(12)))
        for c in self.chains:
            c.before = (c.h, c.key)
            x, pos, c.key = self._input(c.start, c.key, beat, before, first, True, bar_pos, per_bar)
            c.h = self.f.run(x, pos, c.h)[1]
        if len(self.chains) > 1 and beat - self.chains[1].start >= self.restart - 1:
            self.chains.pop(0)  # the younger chain has a whole memory now
        self.next_beat = beat + 1

    @torch.no_grad()
    def decide(
        self, beat: int, before: np.ndarray, first: np.ndarray, is_heard: bool, bar_pos: int,
        per_bar: int, current: int = 0,
    ) -> tuple[int, np.ndarray]:  # fmt: skip
        """The chord of beat `beat`, as `ChordPlanner.follow`: from the state after the beat
        before it (committed; or `beat` itself just committed, a note struck just after it),
        else from nothing; and the membership it was chosen from, (12,)."""
        c = self.chains[0] if self.chains else None
        if c is not None and beat == self.next_beat:
            start, h, key = c.start, c.h, c.key
        elif c is not None and c.before is not None and beat == self.next_beat - 1 > c.start:
            start, (h, key) = c.start, c.before
        else:
            start, h, key = beat, None, np.zeros(12)
        x, pos, _ = self._input(start, key, beat, before, first, is_heard, bar_pos, per_bar)
        logits, _ = self.f.run(x, pos, h)
        member = torch.sigmoid(logits)[0, -1].numpy()
        return self.f.choose(member, bar_pos, per_bar, current), member


def confident_tones(member: np.ndarray, chord: int, threshold: float) -> int:
    """The tones of `chord` that `member` (12,) gives at least `threshold` (the chance each
    is a tone of the song's chord), as 12 bits (pitch class p: bit p); at least the likeliest
    of them. What it keeps, and the share of its tones that are the song's: the follower's
    JSON ("hedged_0.5"), `python -m improv.trainer.chord_planner --causal --evaluate`."""
    tones = sorted(chord_tones(chord))
    keep = [pc for pc in tones if member[pc] >= threshold] or [max(tones, key=lambda q: member[q])]
    return sum(1 << pc for pc in keep)
