"""The chord plan of a melody known ahead (engine/tokenizer/chord_plan.py)."""

from __future__ import annotations

import numpy as np

from improv.engine.tokenizer.chord_plan import plan_chords
from improv.engine.tokenizer.harmony import chord_label


def _beats(*bars: dict[int, float]) -> np.ndarray:
    """(N, 12) weights, four beats per bar: each bar's pitch classes and their beats of time,
    spread evenly over the bar."""
    w = np.zeros((4 * len(bars), 12))
    for b, bar in enumerate(bars):
        for pc, beats in bar.items():
            w[4 * b : 4 * b + 4, pc] += beats / 4
    return w


def _plan(w: np.ndarray) -> list[str]:
    n = len(w)
    return [chord_label(int(c)) for c in plan_chords(w, np.arange(n) % 4, np.full(n, 4))]


def test_a_bar_of_each_chord_is_planned_bar_by_bar() -> None:
    C, G, Am, F = ({0: 1, 4: 1, 7: 1}, {7: 1, 11: 1, 2: 1}, {9: 1, 0: 1, 4: 1}, {5: 1, 9: 1, 0: 1})
    assert _plan(_beats(C, G, Am, F)) == [
        c for c in ("C:maj", "G:maj", "A:min", "F:maj") for _ in "1234"
    ]


def test_a_passing_note_does_not_move_the_harmony() -> None:
    w = _beats({0: 1.5, 4: 1.5, 7: 1.0})
    w[1, 2] += 0.5  # a D on beat 2: in G's triad, not in C's
    assert _plan(w) == ["C:maj"] * 4


def test_the_key_decides_between_equal_readings() -> None:
    """C and E alone fit C major and A minor equally; in a melody in F (with B flat), F's
    neighbourhood wins: the triad outside the key (E minor's B) pays."""
    w = _beats({0: 1, 4: 1})
    assert _plan(w)[0] in ("C:maj", "A:min")
    bb = _beats({10: 2, 5: 2}, {0: 1, 4: 1}, {10: 2, 5: 2})
    assert set(_plan(bb)[4:8]) <= {"C:maj", "A:min"}


def test_changes_fall_on_downbeats_rather_than_off_beats() -> None:
    """A melody whose C-to-G move is smeared over beat 4: the plan changes on the downbeat."""
    w = _beats({0: 1, 4: 1, 7: 1}, {7: 1, 11: 1, 2: 1})
    w[3] = 0.0
    w[3, [7, 0]] = 0.5  # beat 4: G and C, either chord's
    assert _plan(w) == ["C:maj"] * 4 + ["G:maj"] * 4


def test_nothing_to_plan() -> None:
    assert len(plan_chords(np.zeros((0, 12)), np.zeros(0, int), np.zeros(0, int))) == 0


def test_melody_weights_are_each_pitch_class_time_in_each_span() -> None:
    from improv.engine.tokenizer.chord_plan import melody_weights

    # C4 over 0-1.5, E5 over 1-2, C5 over 1.5-1.75: spans 0-1 and 1-2
    pitch, start, end = (
        np.array([60, 76, 72]),
        np.array([0.0, 1.0, 1.5]),
        np.array([1.5, 2.0, 1.75]),
    )
    w = melody_weights(pitch, start, end, np.array([0.0, 1.0, 2.0]))
    assert w.shape == (2, 12)
    assert w[0, 0] == 1.0 and w[1, 0] == 0.75 and w[1, 4] == 1.0 and w.sum() == 2.75
    assert melody_weights(np.zeros(0), np.zeros(0), np.zeros(0), np.array([0.0, 1.0])).sum() == 0
