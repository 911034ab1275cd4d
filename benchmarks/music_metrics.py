"""Statistics of generated vs real music (MusPy's definitions), and chord-tone share against
POP909's chord annotations. Pitched notes only: drums are left out of every statistic."""

from __future__ import annotations

import numpy as np

from improv.engine.tokenizer import Notes
from improv.engine.tokenizer.harmony import Marks
from improv.trainer.chords import Chord

MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
MINOR = np.array([0, 2, 3, 5, 7, 8, 10])


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


def chord_tone_share(notes: Notes, chords: list[Chord]) -> float:
    """Share of notes (onsets under an annotated chord) whose pitch class is a chord tone."""
    starts = np.array([c.start for c in chords])
    hits = total = 0
    for onset, pitch in zip(notes.start.tolist(), notes.pitch.tolist(), strict=True):
        i = int(np.searchsorted(starts, onset, side="right")) - 1
        if i < 0 or onset >= chords[i].end:
            continue
        total += 1
        hits += (pitch % 12) in chords[i].tones
    return hits / total if total else float("nan")


def summary(notes: Notes, seconds: float, drums: int) -> dict[str, float]:
    p = pitched(notes, drums)
    return {
        "pitch_class_entropy": pitch_class_entropy(p),
        "scale_consistency": scale_consistency(p),
        "note_density": note_density(p, seconds),
        "polyphony": polyphony(p),
    }


TRIADS = [(r, (r + third) % 12, (r + 7) % 12) for third in (4, 3) for r in range(12)]  # maj, min


def melody_triad_share(melody: Notes, chords: list[Chord]) -> float:
    """A reference for accompaniment made from the melody alone: under each annotated chord's
    span (the chord changes given), the major or minor triad that covers the most melody time
    (plus a key prior: the melody's pitch-class time over the whole window, weight 0.3); the
    share of its tones that are tones of the annotated chord, weighted by the span's length.
    An accompaniment playing only those triads would score this chord-tone share."""
    hits = total = 0.0
    pc = melody.pitch.astype(np.int64) % 12
    key = np.bincount(pc, weights=melody.end - melody.start, minlength=12)
    key = key / max(key.sum(), 1e-9)
    for c in chords:
        sounding = np.clip(
            np.minimum(melody.end, c.end) - np.maximum(melody.start, c.start), 0, None
        )
        if sounding.sum() == 0:
            continue
        time_per_pc = np.bincount(pc, weights=sounding, minlength=12)
        prior = 0.3 * time_per_pc.sum()
        best = max(TRIADS, key=lambda t: time_per_pc[list(t)].sum() + prior * key[list(t)].sum())
        hits += (c.end - c.start) * len(set(best) & set(c.tones)) / 3
        total += c.end - c.start
    return hits / total if total else float("nan")


# --- harmony and meter (the model card's figures for issue #20) -----------------------------------


def chord_tone_share_marks(notes: Notes, chords: Marks, end: float) -> float:
    """Share of notes whose pitch class is a tone of the chord sounding at their onset, over
    onsets under a chord (not N) before `end`."""
    from improv.engine.tokenizer.harmony import chord_tones

    ch = chords.chords
    if len(notes) == 0 or len(ch) == 0:
        return float("nan")
    at = ch.chord_at(notes.start)
    ok = (at > 0) & (notes.start >= ch.time[0]) & (notes.start < end)
    if not ok.any():
        return float("nan")
    tones = {int(c): chord_tones(int(c)) for c in np.unique(at[ok])}
    hits = [int(p) % 12 in tones[int(c)] for p, c in zip(notes.pitch[ok], at[ok], strict=True)]
    return float(np.mean(hits))


def eighth_positions(beats: np.ndarray) -> np.ndarray:
    """Beat times and the midpoints between consecutive beats: the eighth-note grid."""
    b = np.sort(np.asarray(beats, np.float64))
    if len(b) < 2:
        return b
    return np.sort(np.concatenate([b, (b[:-1] + b[1:]) / 2]))


def eighth_grid_share(notes: Notes, beats: np.ndarray, tol: float = 0.03) -> float:
    """Share of onsets (inside the beats' span) within `tol` s of an eighth-note position."""
    grid = eighth_positions(beats)
    if len(grid) < 2 or len(notes) == 0:
        return float("nan")
    on = notes.start[(notes.start >= grid[0] - tol) & (notes.start <= grid[-1] + tol)]
    if len(on) == 0:
        return float("nan")
    i = np.clip(np.searchsorted(grid, on), 1, len(grid) - 1)
    near = np.minimum(np.abs(on - grid[i - 1]), np.abs(on - grid[i]))
    return float((near <= tol).mean())


def above_melody_share(acc: Notes, melody: Notes) -> float:
    """Share of accompaniment notes above the melody note sounding at their onset (over the
    notes that start while a melody note sounds): how much the accompaniment sits over the tune."""
    if len(acc) == 0 or len(melody) == 0:
        return float("nan")
    above = total = 0
    for t, p in zip(acc.start.tolist(), acc.pitch.tolist(), strict=True):
        sounding = (melody.start <= t) & (melody.end > t)
        if not sounding.any():
            continue
        total += 1
        above += p > int(melody.pitch[sounding].max())
    return above / total if total else float("nan")
