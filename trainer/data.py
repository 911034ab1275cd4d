"""Training examples: note-level windows, augmentation, the three objectives, batches.

Every example is built from notes, not from stored tokens: take a random window of a file's notes,
shift it to start near 0, augment it (transpose, tempo stretch, velocity scale), then encode it in
one of the three task layouts (docs/training.md). Encoding a minute of music costs well under a
millisecond, so this runs on the fly.

Batches are a pure function of (seed, rank, micro-batch index): the data position of a run is just
its step counter, which makes resume exact and lets DataLoader workers build batches in any order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from improv.engine.tokenizer.dataset import TokenDataset
from improv.engine.tokenizer.encode import encode_events
from improv.engine.tokenizer.harmony import CHORD, Marks
from improv.engine.tokenizer.layouts import clip_notes, make_accompany, make_infill, token_parts
from improv.engine.tokenizer.notes import Notes
from improv.engine.tokenizer.vocab import Vocab

log = logging.getLogger(__name__)

IGNORE = -100  # target id that carries no loss (F.cross_entropy ignore_index)
OBJECTIVES = ("continue", "infill", "accompany")


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 1024  # tokens per example (the model sees seq_len inputs, seq_len targets)
    # objective mix: relative weights, drawn per example
    mix: dict[str, float] = field(
        default_factory=lambda: {"continue": 0.5, "infill": 0.25, "accompany": 0.25}
    )
    transpose: int = 5  # pitched parts move by a uniform -transpose..+transpose semitones
    stretch: float = 0.1  # tempo factor uniform in [1 - stretch, 1 + stretch]
    velocity: float = 0.2  # velocities scaled by a uniform [1 - velocity, 1 + velocity]
    augment: bool = True  # off for validation
    infill_max_seconds: float = 8.0  # longest infill gap
    infill_subset_p: float = 0.5  # chance the gap regenerates only a subset of its parts
    pack: bool = True  # continuation: fill the rest of a short example with another piece
    # continuation: chance a multi-part window keeps one part alone. Live call and response
    # hands the model a melody with nothing under it; a model that has only heard full
    # arrangements keeps reaching for the piano there.
    solo: float = 0.0
    # the parts a solo window may keep (empty: any part present). A piano intro cut to its own
    # window teaches "a piano alone stays alone", and the song's melody never comes in.
    solo_parts: tuple[str, ...] = ()
    # accompaniment: chance an example's accompaniment plays, over a stretch of `swap_seconds`,
    # what the same window's accompaniment plays elsewhere (in key, in style, on the wrong
    # chords), without loss there. Taught only on real histories, the model leans on its own
    # accompaniment more than on the melody: sampled freely, it drifts off the chords and stays
    # off. After a swapped stretch, the real accompaniment goes back to following the melody.
    swap: float = 0.0
    swap_seconds: tuple[float, float] = (2.0, 8.0)
    # every objective: chance a window loses its bass part. With `prepare --chord-bass` every
    # POP909 song has one, but prompts and melodies often come without: heard only with a bass,
    # the model played thinner continuations over a bassless prompt (polyphony -28%).
    drop_bass: float = 0.0
    # Harmony and meter (tokenizers with harmony tokens): the chance a window loses its chord
    # marks, its beat marks, its instrumentation header (each independently), so the model
    # plays well with any of them missing; and the chance a header names programs too.
    strip_chords: float = 0.25
    strip_beats: float = 0.25
    strip_header: float = 0.3
    header_programs: float = 0.7
    # chance a window with beats and no drums gets a drum part: a Groove window of the same
    # number of beats, laid beat by beat on the window's beats (POP909 has no drums, so a band
    # of harmony + bass + drums is never heard otherwise)
    drum_overlay: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
        if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"objective weights must be >= 0 with a positive sum, got {self.mix}")
        if self.seq_len < 16:
            raise ValueError(f"seq_len must be >= 16, got {self.seq_len}")
        if not 0.0 <= self.solo <= 1.0:
            raise ValueError(f"solo must be in [0, 1], got {self.solo}")
        if not 0.0 <= self.swap <= 1.0:
            raise ValueError(f"swap must be in [0, 1], got {self.swap}")
        for name in (
            "drop_bass",
            "strip_chords",
            "strip_beats",
            "strip_header",
            "header_programs",
            "drum_overlay",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.swap_seconds
        if not 0.0 < lo <= hi:
            raise ValueError(f"swap_seconds must be (lo, hi) with 0 < lo <= hi, got {lo, hi}")


def parse_mix(spec: str) -> dict[str, float]:
    """'continue=2,infill=1,accompany=1' -> {'continue': 2.0, ...}."""
    out: dict[str, float] = {}
    for piece in spec.split(","):
        name, sep, value = piece.strip().partition("=")
        if not sep or name not in OBJECTIVES:
            raise ValueError(
                f"objective mix is NAME=WEIGHT,... with NAME in {OBJECTIVES}: {spec!r}"
            )
        out[name] = float(value)
    return out


@dataclass
class Example:
    ids: np.ndarray  # (L,) int64 token ids, L <= seq_len + 1
    loss: np.ndarray  # (L,) bool: predict ids[j] with loss (ids[0] never has one)
    objective: str
    # (L,) bool: ids[j] is a wait cut short by a forced event; scored as "at least this long"
    censor: np.ndarray | None = None


def censored_waits(vocab: Vocab, ids: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """(L,) bool: the time tokens whose run of time tokens ends at a `stops` token.

    At inference, forced events (the given lead, an infill's given parts, the gap's end) are
    ceilings: a wait the model samples past one is cut there (`ConstraintSet.clip`). The time
    before a forced event is therefore censored, not chosen: the model only decides that it
    waits at least that long. Trained as a point target instead, the model learns to wait
    exactly until the lead's next event, and at inference, where the lead does not play at
    the time it guessed, it fills the moment with an accompaniment note (the accompaniment
    played about 4x the real density). See `trainer.loss.token_nll`.
    """
    is_time = (ids >= vocab.shift_base) & (ids < vocab.part_base)
    L = len(ids)
    first_event = np.where(is_time, L, np.arange(L))  # (L,) the next non-time token, or L
    nxt = np.minimum.accumulate(first_event[::-1])[::-1]
    return is_time & np.append(stops, False)[nxt]


# --- note-level helpers ---------------------------------------------------------------------------


def window(notes: Notes, start: float, seconds: float) -> Notes:
    """Notes starting in [start, start + seconds), ends clipped there, shifted to start at 0."""
    return clip_notes(notes, start, start + seconds).shifted(-start)


def augment(notes: Notes, vocab: Vocab, cfg: DataConfig, rng: np.random.Generator) -> Notes:
    """Random transposition (not drums), tempo stretch and velocity scaling."""
    return augment_marked(notes, Marks.empty(), vocab, cfg, rng)[0]


def augment_marked(
    notes: Notes, marks: Marks, vocab: Vocab, cfg: DataConfig, rng: np.random.Generator
) -> tuple[Notes, Marks]:
    """`augment`, with the window's beats stretched and its chords transposed alike."""
    n = notes.select(slice(None))
    if cfg.transpose:
        k = int(rng.integers(-cfg.transpose, cfg.transpose + 1))
        pitched = n.part != vocab.drums
        pitch = np.where(pitched, n.pitch + k, n.pitch)
        n.pitch = pitch.astype(np.int16)
        n = n.select((n.pitch >= 0) & (n.pitch <= 127))  # the few that fall off the keyboard
        marks = marks.transposed(k)
    if cfg.stretch:
        f = rng.uniform(1 - cfg.stretch, 1 + cfg.stretch)
        n.start, n.end = n.start * f, n.end * f
        marks = Marks(marks.time * f, marks.kind, marks.value)
    if cfg.velocity:
        f = rng.uniform(1 - cfg.velocity, 1 + cfg.velocity)
        n.velocity = np.clip(np.rint(n.velocity * f), 1, 127).astype(np.int16)
    return n, marks


def header_parts(
    notes: Notes, programs: bool, exclude: Sequence[int] = ()
) -> list[tuple[int, int | None]]:
    """(part, program of its first note, or None) of every part that plays, but `exclude`."""
    out: list[tuple[int, int | None]] = []
    for part in np.unique(notes.part).tolist():
        if part in exclude:
            continue
        first = int(np.argmin(np.where(notes.part == part, notes.start, np.inf)))
        out.append((int(part), int(notes.program[first]) if programs else None))
    return out


def lay_on_beats(drums: Notes, src_beats: np.ndarray, dst_beats: np.ndarray) -> Notes:
    """Drum hits moved from one beat grid onto another, beat by beat (piecewise linear); hits
    outside the source grid's span are dropped."""
    inside = (drums.start >= src_beats[0]) & (drums.start < src_beats[-1])
    d = drums.select(inside)
    d.start = np.interp(d.start, src_beats, dst_beats)
    d.end = np.interp(np.minimum(d.end, src_beats[-1]), src_beats, dst_beats)
    d.end = np.maximum(d.end, d.start)
    return d


def solo(notes: Notes, rng: np.random.Generator, allowed: Sequence[int] = ()) -> Notes:
    """One of the parts present (of `allowed`, if given), chosen uniformly, alone (unchanged if
    only one plays, or none of `allowed` does)."""
    present = np.unique(notes.part)
    if len(present) < 2:
        return notes
    if len(allowed):
        present = present[np.isin(present, allowed)]
        if len(present) == 0:
            return notes
    return notes.select(notes.part == present[int(rng.integers(len(present)))])


def swap_stretch(
    notes: Notes, vocab: Vocab, seconds: float, rng: np.random.Generator
) -> tuple[Notes, float, float] | None:
    """The accompaniment (pitched parts but the lead) of a random stretch [a, b) of `seconds`
    replaced by that of another stretch of the same notes, moved there and ended before b.
    Returns (notes, a, b); None if the notes are too short for two stretches a second apart."""
    span = float(notes.end.max()) if len(notes) else 0.0
    tick = 1.0 / vocab.ticks_per_second
    if span < seconds + 1.0:
        return None
    a, src = rng.uniform(0.0, span - seconds, size=2)
    if abs(a - src) < 1.0:
        src = a + 1.0 if a + 1.0 <= span - seconds else a - 1.0
    b = a + seconds
    acc = (notes.part != vocab.lead) & (notes.part != vocab.drums)

    def stretch(lo: float) -> np.ndarray:  # notes whose onset tick is inside [lo, lo + seconds)
        return acc & (notes.start >= lo) & (notes.start < lo + seconds - tick)

    moved = notes.select(stretch(src)).shifted(a - src)
    moved.end = np.maximum(np.minimum(moved.end, b - tick), moved.start + tick / 2)
    return Notes.concat([notes.select(~stretch(a)), moved]).sorted(), float(a), float(b)


# --- examples -------------------------------------------------------------------------------------


class ExampleBuilder:
    """Random training examples from one dataset, by objective."""

    def __init__(self, dataset: TokenDataset, cfg: DataConfig) -> None:
        self.ds = dataset
        self.cfg = cfg
        self.vocab = dataset.tokenizer.vocab
        unknown = set(cfg.solo_parts) - set(self.vocab.part_index)
        if unknown:
            raise ValueError(
                f"solo_parts: unknown parts {sorted(unknown)}; choose from {list(self.vocab.part_index)}"
            )
        self._solo_parts = [self.vocab.part_index[p] for p in cfg.solo_parts]
        counts = np.array([f["token_count"] for f in dataset.files], dtype=np.float64)
        if len(counts) == 0:
            raise ValueError(f"dataset {dataset.path} has no files")
        # Files drawn in proportion to their tokens: every token is about equally likely to be seen.
        self.file_p = counts / counts.sum()
        durations = np.array([max(f["duration"], 1e-3) for f in dataset.files])
        self.density = counts / durations  # tokens per second, per file
        names = [k for k in OBJECTIVES if cfg.mix.get(k, 0) > 0]
        w = np.array([cfg.mix[k] for k in names])
        self.objectives, self.objective_p = names, w / w.sum()
        # drum files with a beat grid, for the drum overlay
        self._drum_files: list[int] = []
        if cfg.drum_overlay > 0:
            for i in range(len(dataset)):
                n, m = dataset.file_notes(i), dataset.file_marks(i)
                if len(n) and (n.part == self.vocab.drums).all() and (m.kind != CHORD).sum() >= 8:
                    self._drum_files.append(i)

    def _pick(self, rng: np.random.Generator, seconds_for: float) -> tuple[int, Notes, Marks, bool]:
        """A random file and a window of about `seconds_for` x (seq_len worth of time).

        Returns (file, window notes and marks shifted to 0 and augmented, some marks stripped,
        whether the window reaches the end).
        """
        i = int(rng.choice(len(self.file_p), p=self.file_p))
        notes = self.ds.file_notes(i)
        dur = self.ds.files[i]["duration"]
        seconds = seconds_for * self.cfg.seq_len / self.density[i]
        # Start at the very beginning sometimes (the model must learn how pieces open).
        start = 0.0 if rng.random() < 0.1 else rng.uniform(0.0, max(dur - 0.5 * seconds, 0.0))
        if start > 0.0 and len(notes):
            # Snap to the next onset so the window does not open on silence.
            starts = np.sort(notes.start)
            start = float(starts[min(int(np.searchsorted(starts, start)), len(starts) - 1)])
        w = window(notes, start, seconds)
        m = self.ds.file_marks(i).window(start, start + seconds)
        if self.cfg.augment:
            w, m = augment_marked(w, m, self.vocab, self.cfg, rng)
        if self.cfg.drop_bass and rng.random() < self.cfg.drop_bass:
            w = w.select(w.part != self.vocab.part_index["bass"])
        if self._drum_files and rng.random() < self.cfg.drum_overlay:
            w = self._overlay_drums(w, m, rng)
        if rng.random() < self.cfg.strip_chords:
            m = m.select(m.kind != CHORD)
        if rng.random() < self.cfg.strip_beats:
            m = m.select(m.kind == CHORD)
        return i, w, m, start + seconds >= dur

    def _overlay_drums(self, w: Notes, m: Marks, rng: np.random.Generator) -> Notes:
        """A Groove window laid on this window's beats (unchanged if it has drums or < 4 beats)."""
        dst = m.time[m.kind != CHORD]
        if len(dst) < 4 or (w.part == self.vocab.drums).any():
            return w
        f = self._drum_files[int(rng.integers(len(self._drum_files)))]
        marks = self.ds.file_marks(f)
        src = marks.time[marks.kind != CHORD]
        n = min(len(dst), len(src))
        s = int(rng.integers(0, len(src) - n + 1))
        # start on one of the source's downbeats when the window starts on one
        downs = np.flatnonzero(marks.kind[marks.kind != CHORD] == 0)
        if len(downs) and m.kind[m.kind != CHORD][0] == 0:
            ok = downs[downs <= len(src) - n]
            if len(ok):
                s = int(ok[int(rng.integers(len(ok)))])
        drums = lay_on_beats(self.ds.file_notes(f), src[s : s + n], dst[:n])
        return Notes.concat([w, drums]).sorted()

    def _header(self, w: Notes, rng: np.random.Generator, exclude: Sequence[int] = ()) -> list[int]:
        if not self.vocab.harmony or rng.random() < self.cfg.strip_header:
            return []
        programs = rng.random() < self.cfg.header_programs
        return self.vocab.header(header_parts(w, programs, exclude))

    def sample(self, rng: np.random.Generator) -> Example:
        kind = self.objectives[int(rng.choice(len(self.objectives), p=self.objective_p))]
        if kind == "infill":
            ex = self.infill(rng)
        elif kind == "accompany":
            ex = self.accompany(rng)
        else:
            ex = None
        return ex or self.continuation(rng)

    def continuation(self, rng: np.random.Generator) -> Example:
        """`BOS TASK_CONTINUE events [EOS]`, all targets with loss; short pieces are packed."""
        v, L = self.vocab, self.cfg.seq_len + 1
        ids: list[int] = []
        no_loss: list[int] = []  # the headers: given, not predicted
        while len(ids) < L:
            _, w, m, at_end = self._pick(rng, 1.5)  # 1.5x: local density varies, crop the excess
            if self.cfg.solo and rng.random() < self.cfg.solo:
                w = solo(w, rng, self._solo_parts)
            head = self._header(w, rng)
            no_loss += range(len(ids) + 2, len(ids) + 2 + len(head))
            ids += [v.BOS, v.TASK_CONTINUE, *head, *encode_events(w, v, 0, m)]
            if at_end:
                ids.append(v.EOS)
            if not self.cfg.pack or not at_end:
                break
        ids = ids[:L]
        loss = np.ones(len(ids), dtype=bool)
        loss[0] = False
        loss[[j for j in no_loss if j < len(ids)]] = False
        return Example(np.asarray(ids, dtype=np.int64), loss, "continue")

    def infill(self, rng: np.random.Generator) -> Example | None:
        """Fill-in-the-middle: loss on the middle's generated tokens (and FILL_END) only."""
        v, L = self.vocab, self.cfg.seq_len + 1
        _, w, m, _ = self._pick(rng, 0.9)
        if len(w) < 4:
            return None
        span = float(w.end.max())
        for _ in range(4):  # shrink the context until prompt + middle fit
            gap = rng.uniform(0.5, max(0.6, min(self.cfg.infill_max_seconds, 0.5 * span)))
            start = rng.uniform(0.0, max(span - gap, 0.0))
            present = sorted(set(w.part[(w.start >= start) & (w.start < start + gap)].tolist()))
            parts: list[int] | None = None
            if present and rng.random() < self.cfg.infill_subset_p:
                k = int(rng.integers(1, len(present) + 1))
                parts = sorted(rng.choice(present, size=k, replace=False).tolist())
            ex = make_infill(v, w, start, start + gap, parts, marks=m)
            ids = ex.prompt + ex.middle
            if len(ids) <= L:
                break
            lo = max(0.0, start - 0.3 * span)
            w, m = window(w, lo, 0.6 * span + gap), m.window(lo, lo + 0.6 * span + gap)
            span = float(w.end.max()) if len(w) else 0.0
            if len(w) < 4:
                return None
        targets = list(range(v.n_parts)) if parts is None else parts
        loss = np.zeros(len(ids), dtype=bool)
        mid = np.arange(len(ex.prompt), len(ids))
        owner = token_parts(v, ex.middle)  # -1: time/special, else the part
        # Given (non-target) parts' events inside the gap are forced at inference: no loss on them.
        loss[mid] = (owner < 0) | np.isin(owner, targets)
        arr = np.asarray(ids, dtype=np.int64)
        stops = np.zeros(len(arr), dtype=bool)  # the given events in the gap, and its end
        stops[mid] = ~loss[mid] | (arr[mid] == v.FILL_END)
        censor = censored_waits(v, arr, stops)
        n = min(len(arr), L)  # rare: a dense gap alone overflows; keep what fits
        return Example(arr[:n], loss[:n], "infill", censor[:n])

    def accompany(self, rng: np.random.Generator) -> Example | None:
        """`BOS TASK_ACCOMPANY` + all parts: loss on everything but the (forced) lead's tokens."""
        v, L = self.vocab, self.cfg.seq_len + 1
        _, w, m, at_end = self._pick(rng, 1.5)
        is_lead = w.part == v.lead
        if not is_lead.any() or is_lead.all():
            return None  # drums-only or lead-only file: nothing to accompany
        swapped = None
        if self.cfg.swap and rng.random() < self.cfg.swap:
            swapped = swap_stretch(w, v, rng.uniform(*self.cfg.swap_seconds), rng)
            if swapped is not None:
                w = swapped[0]
        head = self._header(w, rng, exclude=[v.lead])
        ids, _ = make_accompany(v, w, marks=m, header=head)
        if at_end:
            ids.append(v.EOS)
        ids = np.asarray(ids[:L], dtype=np.int64)
        owner = token_parts(v, ids)
        loss = owner != v.lead
        loss[0] = False
        loss[2 : 2 + len(head)] = False  # the header: given, like the lead
        if swapped is not None:  # no loss inside the stretch: those are not the notes to learn
            tick = np.cumsum(v.ticks_table[ids])  # (L,) time after each token
            lo, hi = (round(x * v.ticks_per_second) for x in swapped[1:])
            loss &= (tick < lo) | (tick >= hi)
        return Example(ids, loss, "accompany", censored_waits(v, ids, owner == v.lead))


def collate(examples: Sequence[Example], seq_len: int) -> dict[str, torch.Tensor]:
    """Examples -> inputs, targets and censored-target flags, each (B, T), padded with PAD /
    IGNORE / False."""
    B = len(examples)
    x = np.full((B, seq_len), Vocab.PAD, dtype=np.int64)
    y = np.full((B, seq_len), IGNORE, dtype=np.int64)
    c = np.zeros((B, seq_len), dtype=bool)
    for b, ex in enumerate(examples):
        n = len(ex.ids) - 1
        x[b, :n] = ex.ids[:-1]
        y[b, :n] = np.where(ex.loss[1:], ex.ids[1:], IGNORE)
        if ex.censor is not None:
            c[b, :n] = ex.censor[1:] & ex.loss[1:]
    return {
        "input": torch.from_numpy(x),
        "target": torch.from_numpy(y),
        "censor": torch.from_numpy(c),
    }


class BatchSource(torch.utils.data.Dataset):
    """Map-style: item k is micro-batch k of this rank, built from rng(seed, rank, k).

    Used with a DataLoader (batch_size=None) whose sampler starts at the resume position.
    """

    def __init__(
        self, dataset_path: str, cfg: DataConfig, batch_size: int, seed: int, rank: int
    ) -> None:
        self.path, self.cfg, self.batch_size, self.seed, self.rank = (
            dataset_path,
            cfg,
            batch_size,
            seed,
            rank,
        )
        self._builder: ExampleBuilder | None = None  # opened lazily, once per worker

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if self._builder is None:
            self._builder = ExampleBuilder(TokenDataset(self.path), self.cfg)
        rng = np.random.default_rng([self.seed, self.rank, k])
        exs = [self._builder.sample(rng) for _ in range(self.batch_size)]
        return collate(exs, self.cfg.seq_len)


class _From(torch.utils.data.Sampler[int]):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self):  # noqa: ANN204
        k = self.start
        while True:
            yield k
            k += 1

    def __len__(self) -> int:
        return 2**62


def batch_loader(source: BatchSource, start: int, workers: int) -> torch.utils.data.DataLoader:
    """An endless loader of micro-batches start, start+1, ... (prefetched by `workers`)."""
    return torch.utils.data.DataLoader(
        source,
        batch_size=None,
        sampler=_From(start),
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


# --- evaluation windows ---------------------------------------------------------------------------


def eval_chunks(
    dataset: TokenDataset, seq_len: int, max_chunks: int | None = None, seed: int = 0
) -> list[np.ndarray]:
    """Each file's stored tokens cut into consecutive (seq_len + 1)-token chunks overlapping by one,
    so every token after the first is scored exactly once. Deterministic: no augmentation.

    With `max_chunks`, a fixed random sample (by `seed`) of all chunks: a capped validation covers
    every kind of file and every part of a piece, not only openings.
    """
    out: list[np.ndarray] = []
    for i in range(len(dataset)):
        t = np.asarray(dataset.file_tokens(i), dtype=np.int64)
        out += [t[s : s + seq_len + 1] for s in range(0, max(len(t) - 1, 1), seq_len)]
    out = [c for c in out if len(c) > 1]
    if max_chunks is not None and len(out) > max_chunks:
        pick = np.random.default_rng(seed).permutation(len(out))[:max_chunks]
        out = [out[j] for j in sorted(pick)]
    return out
