"""Harmony and meter beside the notes: chord labels, beats, and the timed marks they become.

A song's beats and chords are not notes: they are *marks* on the timeline, written as `BAR`,
`BEAT` and `CHORD(root, quality)` tokens just before the note events of their time
(docs/tokens.md). This module holds the chord vocabulary (Harte labels as POP909 and MIREX write
them), the parsers for chord-lab text, beat lists and charts (`C Am F G`), beats from a MIDI
file's tempo map, and `Marks`: the column layout the encoder, the dataset and the trainer share.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

# The qualities a CHORD token names, in id order: the ones POP909 annotates. Rarer Harte
# qualities fold into the nearest of these (QUALITY_ALIASES); a slash bass is dropped (the
# token names the harmony; the bass part plays the bass).
QUALITIES: tuple[str, ...] = (
    "maj",
    "min",
    "7",
    "maj7",
    "min7",
    "dim",
    "dim7",
    "hdim7",
    "aug",
    "sus2",
    "sus4",
    "7sus4",
    "maj6",
    "min6",
    "minmaj7",
)
QUALITY_TONES: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "dim": (0, 3, 6),
    "dim7": (0, 3, 6, 9),
    "hdim7": (0, 3, 6, 10),
    "aug": (0, 4, 8),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
    "7sus4": (0, 5, 7, 10),
    "maj6": (0, 4, 7, 9),
    "min6": (0, 3, 7, 9),
    "minmaj7": (0, 3, 7, 11),
}
QUALITY_ALIASES: dict[str, str] = {
    "": "maj",
    "sus4(b7)": "7sus4",
    "9": "7",
    "11": "7",
    "13": "7",
    "maj9": "maj7",
    "maj11": "maj7",
    "maj13": "maj7",
    "min9": "min7",
    "min11": "min7",
    "min13": "min7",
    "minmaj9": "minmaj7",
    "5": "maj",
    "1": "maj",
    "6": "maj6",
    "m": "min",
    "m7": "min7",
    "m6": "min6",
    "M7": "maj7",
    "dom7": "7",
    "+": "aug",
    "o": "dim",
    "o7": "dim7",
    "m7b5": "hdim7",
    "ø": "hdim7",
    "ø7": "hdim7",
    "sus": "sus4",
    "7sus": "7sus4",
    "mmaj7": "minmaj7",
}
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_LETTERS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
N_CHORDS = 1 + 12 * len(QUALITIES)  # chord index 0 is N (no chord)

# Mark kinds, in the order marks of one time are written: the meter, then the harmony.
BAR, BEAT, CHORD = 0, 1, 2


def chord_index(root: int, quality: str) -> int:
    """(pitch class, quality) -> chord index 1..N_CHORDS-1 (0 is N)."""
    return 1 + (root % 12) * len(QUALITIES) + QUALITIES.index(quality)


def chord_of(index: int) -> tuple[int, str] | None:
    """Chord index -> (root pitch class, quality); None for N."""
    if index == 0:
        return None
    root, q = divmod(index - 1, len(QUALITIES))
    return root, QUALITIES[q]


def chord_label(index: int) -> str:
    """Chord index -> Harte label ('A:min', 'N')."""
    c = chord_of(index)
    return "N" if c is None else f"{NOTE_NAMES[c[0]]}:{c[1]}"


def chord_tones(index: int) -> frozenset[int]:
    """Pitch classes of a chord index (empty for N)."""
    c = chord_of(index)
    if c is None:
        return frozenset()
    return frozenset((c[0] + t) % 12 for t in QUALITY_TONES[c[1]])


def transpose_chord(index: int, semitones: int) -> int:
    c = chord_of(index)
    return index if c is None else chord_index(c[0] + semitones, c[1])


def _root(text: str, label: str) -> int:
    if not text or text[0].upper() not in _LETTERS:
        raise ValueError(f"not a chord label: {label!r} (expected e.g. 'C:maj', 'A:min7', 'N')")
    acc = text[1:]
    if acc.strip("#b"):
        raise ValueError(f"not a chord root: {text!r} in {label!r}")
    return (_LETTERS[text[0].upper()] + acc.count("#") - acc.count("b")) % 12


def parse_label(label: str) -> int:
    """A Harte label ('A:min7', 'C:maj/5', 'Bb', 'N') -> chord index (0 for N or X).

    Qualities outside QUALITIES fold to the nearest one (QUALITY_ALIASES, else by their first
    three letters: 'min...' -> min); a slash bass is dropped."""
    label = label.strip()
    if label in ("N", "X", ""):
        return 0
    root_s, _, rest = label.partition(":")
    root = _root(root_s, label)
    quality = rest.partition("/")[0]
    quality = re.sub(r"\(.*\)$", "", quality) if quality not in QUALITY_ALIASES else quality
    quality = QUALITY_ALIASES.get(quality, quality)
    if quality not in QUALITY_TONES:
        quality = "min" if quality.startswith("min") else "maj"
    return chord_index(root, quality)


# Chart symbols ('Am7', 'F#m', 'Bbmaj7', 'Gsus4', 'C/E') -> chord index.
_CHART = re.compile(r"^([A-Ga-g][#b]*)([^/]*)(?:/.*)?$")


def parse_symbol(symbol: str) -> int:
    """A lead-sheet chord symbol ('Am7', 'F#m', 'C/E', 'N.C.') or a Harte label -> chord index."""
    s = symbol.strip()
    if s.upper() in ("N", "N.C.", "NC", "X", "%"):
        return 0
    if ":" in s:
        return parse_label(s)
    m = _CHART.match(s)
    if not m:
        raise ValueError(f"not a chord symbol: {symbol!r} (expected e.g. 'C', 'Am7', 'F#m', 'G7')")
    q = m.group(2)
    q = {"": "maj", "maj": "maj", "min": "min", "mi": "min", "-": "min"}.get(q, q)
    q = QUALITY_ALIASES.get(q, q)
    if q not in QUALITY_TONES:
        if q.startswith(("m", "-")) and not q.startswith("maj"):
            q = "min7" if "7" in q else "min"
        elif q.startswith("maj"):
            q = "maj7"
        else:
            raise ValueError(f"unknown chord quality {m.group(2)!r} in {symbol!r}")
    return chord_index(_root(m.group(1), symbol), q)


@dataclass
class Marks:
    """Beats and chord changes on the timeline, as parallel arrays sorted by time."""

    time: np.ndarray  # (M,) float64 seconds
    kind: np.ndarray  # (M,) int8: BAR, BEAT or CHORD
    value: np.ndarray  # (M,) int16: the chord index for CHORD, 0 otherwise

    @classmethod
    def empty(cls) -> Marks:
        return cls(np.zeros(0), np.zeros(0, np.int8), np.zeros(0, np.int16))

    @classmethod
    def build(cls, time: Sequence[float], kind: Sequence[int], value: Sequence[int]) -> Marks:
        return cls(
            np.asarray(time, np.float64), np.asarray(kind, np.int8), np.asarray(value, np.int16)
        ).sorted()

    @classmethod
    def concat(cls, parts: Sequence[Marks]) -> Marks:
        if not parts:
            return cls.empty()
        return cls(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls))
        ).sorted()

    def __len__(self) -> int:
        return len(self.time)

    def select(self, mask: np.ndarray) -> Marks:
        return Marks(self.time[mask], self.kind[mask], self.value[mask])

    def sorted(self) -> Marks:
        return self.select(np.lexsort((self.kind, self.time)))

    def shifted(self, seconds: float) -> Marks:
        return Marks(self.time + seconds, self.kind.copy(), self.value.copy())

    @property
    def beats(self) -> Marks:
        return self.select(self.kind != CHORD)

    @property
    def chords(self) -> Marks:
        return self.select(self.kind == CHORD)

    def window(self, start: float, end: float) -> Marks:
        """Marks in [start, end), shifted to start at 0; the chord sounding at `start` (if any
        changes before it) is restated at 0, as a song cut there would need it. A change within
        a millisecond of `start` is the chord at it: a window cut at a change's time, computed
        in floats, had the chord before it restated for 70 ns."""
        inside = self.select((self.time >= start) & (self.time < end))
        before = self.select((self.kind == CHORD) & (self.time < start))
        at_start = (inside.kind == CHORD) & (inside.time <= start + 1e-3)
        if len(before) and not at_start.any():
            head = Marks(np.array([start]), np.array([CHORD], np.int8), before.value[-1:].copy())
            inside = Marks.concat([head, inside])
        return inside.shifted(-start)

    def transposed(self, semitones: int) -> Marks:
        value = self.value.copy()
        for i in np.flatnonzero(self.kind == CHORD):
            value[i] = transpose_chord(int(value[i]), semitones)
        return Marks(self.time.copy(), self.kind.copy(), value)

    def chord_at(self, t: np.ndarray) -> np.ndarray:
        """(K,) chord index sounding at each time in `t` (0 before the first change)."""
        ch = self.chords
        idx = np.searchsorted(ch.time, np.asarray(t, np.float64), side="right") - 1
        return np.where(idx >= 0, ch.value[np.maximum(idx, 0)], 0)


# --- readers ---------------------------------------------------------------------------------------


def read_lab(text: str) -> Marks:
    """Chord-lab text (lines `start end label`, seconds; POP909's chord_midi.txt, MIREX .lab) ->
    chord marks at each change."""
    times, values = [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 3:
            raise ValueError(f"chord line {n}: expected 'start end label', got {line.strip()!r}")
        try:
            start = float(parts[0])
        except ValueError:
            raise ValueError(f"chord line {n}: start {parts[0]!r} is not a number") from None
        if not np.isfinite(start) or start < 0:
            raise ValueError(f"chord line {n}: start must be a time >= 0 s, got {parts[0]}")
        times.append(start)
        values.append(parse_label(parts[2]))
    return chord_changes(times, values)


def chord_changes(times: Sequence[float], values: Sequence[int]) -> Marks:
    """Chord marks at the times the chord changes (repeats of the sounding chord dropped)."""
    order = np.argsort(np.asarray(times, np.float64), kind="stable")
    keep_t, keep_v = [], []
    for i in order:
        if keep_v and keep_v[-1] == values[i]:
            continue
        if keep_t and keep_t[-1] == times[i]:  # two labels at one time: the later wins
            keep_v[-1] = values[i]
            continue
        keep_t.append(float(times[i]))
        keep_v.append(int(values[i]))
    return Marks.build(keep_t, [CHORD] * len(keep_t), keep_v)


def read_beat_list(text: str) -> Marks:
    """Beat text: lines `seconds [downbeat]` (POP909's beat_midi.txt: `seconds strong downbeat`,
    the last column is the downbeat flag) -> BAR/BEAT marks."""
    times, kinds = [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            t = float(parts[0])
            down = float(parts[-1]) > 0 if len(parts) > 1 else False
        except ValueError:
            raise ValueError(f"beat line {n}: expected 'seconds [1 if downbeat]'") from None
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"beat line {n}: time must be >= 0 s, got {parts[0]}")
        times.append(t)
        kinds.append(BAR if down else BEAT)
    return Marks.build(times, kinds, [0] * len(times))


def steady_beats(bpm: float, beats_per_bar: int, start: float, end: float) -> Marks:
    """BAR/BEAT marks at a steady tempo from `start` (a downbeat) to `end`."""
    if not 20 <= bpm <= 400:
        raise ValueError(f"bpm must be in 20..400, got {bpm}")
    if not 1 <= beats_per_bar <= 16:
        raise ValueError(f"beats_per_bar must be in 1..16, got {beats_per_bar}")
    step = 60.0 / bpm
    n = max(0, int(np.ceil((end - start) / step)))
    t = start + step * np.arange(n)
    kinds = np.where(np.arange(n) % beats_per_bar == 0, BAR, BEAT)
    return Marks.build(t, kinds, np.zeros(n))


def chart_bars(chart: str) -> list[list[int]]:
    """A chord chart's bars, each the chord indices that share it: `C Am F G` (one chord a bar)
    or `| C | Am F | G7 |`. Raises ValueError naming what is wrong."""
    text = chart.strip()
    if not text:
        raise ValueError("chord chart is empty")
    if "|" in text:
        bars = [b.split() for b in text.strip("|").split("|")]
    else:
        bars = [[s] for s in text.split()]
    if any(not b for b in bars):
        raise ValueError(f"chord chart has an empty bar: {chart!r}")
    return [[parse_symbol(s) for s in b] for b in bars]


def parse_chart(chart: str, beats: Marks, loop_until: float | None = None) -> Marks:
    """A chord chart laid on `beats`: `C Am F G` (one chord a bar) or `| C | Am F | G7 |` (a bar's
    chords split it evenly, by beats where they divide it). The first bar starts at the first
    BAR mark. With `loop_until`, the chart repeats until that time."""
    symbols = chart_bars(chart)
    downs = beats.time[beats.kind == BAR]
    if len(downs) == 0:
        raise ValueError("a chord chart needs beats with at least one downbeat (bpm or beats)")
    all_beats = beats.time[beats.kind != CHORD]
    times, values = [], []
    end = loop_until if loop_until is not None else np.inf
    for k, t0 in enumerate(downs):
        if t0 >= end or (loop_until is None and k >= len(symbols)):
            break
        bar = symbols[k % len(symbols)]
        t1 = downs[k + 1] if k + 1 < len(downs) else t0 + (t0 - downs[k - 1] if k else 2.0)
        inner = all_beats[(all_beats >= t0) & (all_beats < t1)]
        for j, v in enumerate(bar):
            if len(inner) and len(inner) % len(bar) == 0:
                t = inner[j * len(inner) // len(bar)]
            else:
                t = t0 + (t1 - t0) * j / len(bar)
            times.append(float(t))
            values.append(v)
    return chord_changes(times, values)


def beats_from_tempo_map(
    tpq: int,
    ts_ticks: np.ndarray,
    ts_num: np.ndarray,
    ts_den: np.ndarray,
    end_tick: int,
) -> np.ndarray:
    """(B, 2) ticks and downbeat flags of every beat up to `end_tick` from a time-signature map
    (4/4 where there is none); the caller converts ticks to seconds."""
    if len(ts_ticks) == 0 or ts_ticks[0] > 0:
        ts_ticks = np.concatenate([[0], ts_ticks])
        ts_num = np.concatenate([[4], ts_num])
        ts_den = np.concatenate([[4], ts_den])
    rows: list[tuple[int, int]] = []
    for i in range(len(ts_ticks)):
        lo = int(ts_ticks[i])
        hi = int(ts_ticks[i + 1]) if i + 1 < len(ts_ticks) else end_tick + 1
        num = max(int(ts_num[i]), 1)
        den = max(int(ts_den[i]), 1)
        step = tpq * 4 // den if den <= 4 * tpq else 1
        if num % 3 == 0 and num > 3 and den == 8:  # 6/8, 12/8: the beat is the dotted quarter
            step, num = step * 3, num // 3
        t, k = lo, 0
        while t < hi and len(rows) < 200_000:
            rows.append((t, int(k % num == 0)))
            t += max(step, 1)
            k += 1
    return np.asarray(rows, np.int64).reshape(-1, 2)
