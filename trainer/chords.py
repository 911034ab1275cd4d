"""POP909's chord and beat annotations, and the bass part the default model learns from them.

POP909 has no bass track: its PIANO part carries the harmony, and the chords are annotated
beside each song (`chord_midi.txt`: start, end, Harte label, seconds; `beat_midi.txt`: time,
strong-beat flag, downbeat flag). `chord_bass` turns the chords into a plain root bass (the
chord's bass note on each strong beat and at each change), which the trainer adds as the
`bass` part. Why: sampled freely, the model's accompaniment lost the chords within a bar or two
(40% chord tones against the real piano's 95%, about what notes in the key give by chance);
a bass part is the accompaniment's harmonic plan, one note per half bar that names the chord,
so every chord change is a token the model is scored on and the piano part can follow.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from improv.engine.tokenizer import Notes

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
BASS_LOW = 31  # G1: root notes fall in G1..F#2, a bass guitar's lower octave
BASS_PROGRAM = 33  # GM Electric Bass (finger)
BASS_VELOCITY = 84


class Chord(NamedTuple):
    start: float  # seconds
    end: float
    root: int  # pitch class
    bass: int  # pitch class of the lowest note (the root unless a slash chord says otherwise)
    tones: tuple[int, ...]  # pitch classes, sorted


def parse_chord(label: str, start: float = 0.0, end: float = 0.0) -> Chord | None:
    """A Harte label ('A:min7', 'C:maj/5', 'N') -> a Chord; None for no chord."""
    if label in ("N", "X", ""):
        return None
    root_s, _, rest = label.partition(":")
    if not root_s or root_s[0] not in ROOTS:
        raise ValueError(f"not a chord label: {label!r}")
    root = (ROOTS[root_s[0]] + root_s[1:].count("#") - root_s[1:].count("b")) % 12
    quality, _, slash = (rest or "maj").partition("/")
    tones = set(
        CHORD_TONES.get(quality, CHORD_TONES["min" if quality.startswith("min") else "maj"])
    )
    bass = 0
    if slash:
        m = re.fullmatch(r"([b#]*)(\d+)", slash)
        if m:
            bass = DEGREES.get(m.group(2), 0) + m.group(1).count("#") - m.group(1).count("b")
            tones.add(bass)
    return Chord(
        start, end, root, (root + bass) % 12, tuple(sorted((root + t) % 12 for t in tones))
    )


def read_chords(path: str | Path) -> list[Chord]:
    """`chord_midi.txt` -> its chords in time order; no-chord spans (N) are left out."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and (c := parse_chord(parts[2], float(parts[0]), float(parts[1]))):
            out.append(c)
    return out


def read_strong_beats(path: str | Path) -> np.ndarray:
    """`beat_midi.txt` -> times (s) of the strong beats (the file's second column: beats 1 and
    3 in 4/4)."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    return np.array([float(r[0]) for r in rows if len(r) >= 2 and float(r[1]) > 0], np.float64)


def chord_bass(chords: list[Chord], strong_beats: np.ndarray, part: int) -> Notes:
    """A root bass: each chord's bass note struck at its start and on each strong beat inside
    it, held to the next strike (a 30 ms gap before it, so a repeated note re-strikes)."""
    starts, ends, pitches = [], [], []
    for c in chords:
        if c.end <= c.start:
            continue
        inside = strong_beats[(strong_beats > c.start + 0.05) & (strong_beats < c.end - 0.05)]
        hits = np.concatenate([[c.start], inside, [c.end]])
        pitch = BASS_LOW + (c.bass - BASS_LOW) % 12
        for a, b in zip(hits[:-1], hits[1:], strict=True):
            starts.append(a)
            ends.append(max(a + 0.05, b - 0.03))
            pitches.append(pitch)
    n = len(starts)
    return Notes(
        start=np.asarray(starts, np.float64),
        end=np.asarray(ends, np.float64),
        pitch=np.asarray(pitches, np.int16),
        velocity=np.full(n, BASS_VELOCITY, np.int16),
        part=np.full(n, part, np.int16),
        program=np.full(n, BASS_PROGRAM, np.int16),
        sustained=np.zeros(n, bool),
    )


def add_chord_bass(path: str, notes: Notes, bass_part: int) -> Notes:
    """`notes` of the MIDI file at `path` plus a root bass from the chord annotations beside it
    (POP909's layout); unchanged where there are none or the file has a bass part already."""
    folder = Path(path).parent
    if not (folder / "chord_midi.txt").exists() or (notes.part == bass_part).any():
        return notes
    beats_file = folder / "beat_midi.txt"
    beats = read_strong_beats(beats_file) if beats_file.exists() else np.zeros(0)
    bass = chord_bass(read_chords(folder / "chord_midi.txt"), beats, bass_part)
    return Notes.concat([notes, bass]).sorted()
