"""Statistics of generated vs real music (MusPy's definitions), and chord-tone share against
POP909's chord annotations. Pitched notes only: drums are left out of every statistic."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from improv.engine.tokenizer import Notes

MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
CHORD_TONES: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "maj6": (0, 4, 7, 9),
    "min6": (0, 3, 7, 9),
    "dim": (0, 3, 6),
    "dim7": (0, 3, 6, 9),
    "hdim7": (0, 3, 6, 10),
    "aug": (0, 4, 8),
    "minmaj7": (0, 3, 7, 11),
    "sus4(b7)": (0, 5, 7, 10),
    "9": (0, 4, 7, 10, 2),
    "maj9": (0, 4, 7, 11, 2),
    "min9": (0, 3, 7, 10, 2),
}
ROOTS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
DEGREES = {"1": 0, "2": 2, "3": 4, "4": 5, "5": 7, "6": 9, "7": 11, "9": 2, "11": 5, "13": 9}


def pitched(notes: Notes, drums: int) -> Notes:
    return notes.select(notes.part != drums)


def pitch_class_entropy(notes: Notes) -> float:
    """Entropy in bits of the pitch-class histogram of note onsets (MusPy)."""
    if len(notes) == 0:
        return float("nan")
    hist = np.bincount(notes.pitch.astype(np.int64) % 12, minlength=12).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def scale_consistency(notes: Notes) -> float:
    """Largest share of notes in one major or minor scale over the 24 scales (MusPy)."""
    if len(notes) == 0:
        return float("nan")
    hist = np.bincount(notes.pitch.astype(np.int64) % 12, minlength=12)
    best = 0
    for root in range(12):
        for scale in (MAJOR, MINOR):
            best = max(best, int(hist[(scale + root) % 12].sum()))
    return best / len(notes)


def note_density(notes: Notes, seconds: float) -> float:
    """Note onsets per second."""
    return len(notes) / seconds if seconds > 0 else float("nan")


def polyphony(notes: Notes, step: float = 0.01) -> float:
    """Mean number of sounding pitches over the time steps where at least one sounds (MusPy)."""
    if len(notes) == 0:
        return float("nan")
    t0 = float(notes.start.min())
    n_steps = int(np.ceil((float(notes.end.max()) - t0) / step)) + 1
    delta = np.zeros(n_steps + 1, dtype=np.int64)
    s = np.floor((notes.start - t0) / step).astype(np.int64)
    e = np.maximum(np.floor((notes.end - t0) / step).astype(np.int64), s + 1)
    np.add.at(delta, s, 1)
    np.add.at(delta, np.minimum(e, n_steps), -1)
    sounding = np.cumsum(delta)[:n_steps]
    on = sounding > 0
    return float(sounding[on].mean()) if on.any() else float("nan")


def parse_chord(label: str) -> tuple[int, ...] | None:
    """Harte label ('A:min7', 'C:maj/5', 'N') -> pitch classes, None for no chord."""
    if label in ("N", "X", ""):
        return None
    root_s, _, rest = label.partition(":")
    root = ROOTS[root_s[0]] + root_s[1:].count("#") - root_s[1:].count("b")
    quality, _, bass = (rest or "maj").partition("/")
    tones = set(
        CHORD_TONES.get(quality, CHORD_TONES["min" if quality.startswith("min") else "maj"])
    )
    if bass:
        m = re.fullmatch(r"([b#]*)(\d+)", bass)
        if m:
            tones.add(DEGREES.get(m.group(2), 0) + m.group(1).count("#") - m.group(1).count("b"))
    return tuple(sorted((root + t) % 12 for t in tones))


def read_chords(path: str | Path) -> list[tuple[float, float, tuple[int, ...] | None]]:
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((float(parts[0]), float(parts[1]), parse_chord(parts[2])))
    return out


def chord_tone_share(
    notes: Notes, chords: list[tuple[float, float, tuple[int, ...] | None]]
) -> float:
    """Share of notes (onsets under an annotated chord) whose pitch class is a chord tone."""
    starts = np.array([c[0] for c in chords])
    hits = total = 0
    for onset, pitch in zip(notes.start.tolist(), notes.pitch.tolist(), strict=True):
        i = int(np.searchsorted(starts, onset, side="right")) - 1
        if i < 0 or onset >= chords[i][1] or chords[i][2] is None:
            continue
        total += 1
        hits += (pitch % 12) in chords[i][2]
    return hits / total if total else float("nan")


def summary(notes: Notes, seconds: float, drums: int) -> dict[str, float]:
    p = pitched(notes, drums)
    return {
        "pitch_class_entropy": pitch_class_entropy(p),
        "scale_consistency": scale_consistency(p),
        "note_density": note_density(p, seconds),
        "polyphony": polyphony(p),
    }
