"""The left hand's chord: template matching with inversions and near misses."""

from __future__ import annotations

import pytest

from improv.engine.tokenizer.chord_match import match_chord
from improv.engine.tokenizer.harmony import chord_label


@pytest.mark.parametrize(
    ("keys", "want"),
    [
        ([48, 52, 55], "C:maj"),  # root position
        ([52, 55, 60], "C:maj"),  # first inversion: the lowest key is not the root
        ([43, 48, 52], "C:maj"),  # second inversion
        ([45, 48, 52], "A:min"),
        ([48, 52, 55, 58], "C:7"),
        ([41, 45, 48, 52], "F:maj7"),
        ([50, 53, 57, 60], "D:min7"),
        ([48, 55], "C:maj"),  # a bare fifth: the simplest chord on the bass
        ([48, 52], "C:maj"),  # a third over the root
        ([47, 50, 53], "B:dim"),
        ([48, 50, 55], "C:sus2"),
        ([43, 47, 50, 53], "G:7"),
        ([55, 59, 62, 65, 69], "G:7"),  # a ninth folds to its seventh chord
    ],
)
def test_left_hand_chords(keys: list[int], want: str) -> None:
    assert chord_label(match_chord(keys)) == want


def test_too_few_keys_is_no_chord() -> None:
    assert match_chord([]) == 0
    assert match_chord([48]) == 0
    assert match_chord([48, 60]) == 0  # an octave is one pitch class
