"""Chords from held keys: a pitch-class-set template matcher (the player's left hand).

Every chord of the vocabulary (12 roots x harmony.QUALITIES) is a pitch-class set; the held
keys' set is scored against each: tones covered count for, template tones missing and keys
outside the template count against. Ties go to the chord whose root is the lowest key (root
position over an inversion reading: E G C is C major in first inversion, not an E chord), then
to the smaller template (a triad over a seventh chord that the keys do not prove). Why not
music21 or mingus: both name a chord from its notes, but neither scores near misses (a left hand
that drops the fifth, or adds a passing tone) against a fixed vocabulary, which is what a CHORD
token needs; the whole matcher is a 180 x 12 table.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .harmony import N_CHORDS, QUALITIES, QUALITY_TONES, chord_index

# (N_CHORDS, 12) bool: template pitch classes of every chord index (row 0, N, is empty)
_TEMPLATES = np.zeros((N_CHORDS, 12), dtype=bool)
_ROOTS = np.full(N_CHORDS, -1, dtype=np.int64)
for _root in range(12):
    for _q in QUALITIES:
        _i = chord_index(_root, _q)
        _TEMPLATES[_i, [(_root + t) % 12 for t in QUALITY_TONES[_q]]] = True
        _ROOTS[_i] = _root
_SIZES = _TEMPLATES.sum(axis=1)


def match_chord(keys: Iterable[int], min_keys: int = 2) -> int:
    """Chord index (harmony.chord_index) of the held MIDI keys; 0 (N) for fewer than `min_keys`
    distinct pitch classes or nothing that fits (at least two template tones must be held)."""
    keys = sorted(set(int(k) for k in keys))
    pcs = np.zeros(12, dtype=bool)
    pcs[[k % 12 for k in keys]] = True
    if pcs.sum() < min_keys:
        return 0
    hit = (_TEMPLATES & pcs).sum(axis=1)  # (N_CHORDS,)
    missing = _SIZES - hit
    extra = pcs.sum() - hit
    score = 2.0 * hit - 1.0 * missing - 1.5 * extra
    score[0] = -np.inf
    score[hit < 2] = -np.inf
    if not np.isfinite(score).any():
        return 0
    bass = keys[0] % 12
    # tie-breaks, worth less than one tone: root in the bass, then the smaller template
    score = score + 0.5 * (_ROOTS == bass) - 0.01 * _SIZES
    return int(np.argmax(score))
