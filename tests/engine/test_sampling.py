"""Small pure sampling functions (engine/sampling.py)."""

from __future__ import annotations

import numpy as np
import torch

from improv.engine.sampling import pool_chords


def test_pool_chords_moves_the_other_chords_mass_onto_the_pool_in_proportion():
    logits = torch.tensor([0.0, 1.0, 2.0, float("-inf"), 0.5], dtype=torch.float64)
    pool = np.array([False, True, False, True, True])  # (C,); chord 3 is masked already
    for t in (1.0, 0.7):
        x = logits.clone()
        pool_chords(x, pool, t)
        before, after = torch.exp(logits / t), torch.exp(x / t)
        assert torch.isclose(after.sum(), before[torch.isfinite(logits)].sum())  # same mass
        assert after[0] == 0 and after[2] == 0 and after[3] == 0
        assert torch.isclose(after[1] / after[4], before[1] / before[4])  # same proportions


def test_pool_chords_greedy_picks_the_best_pool_chord_and_no_pool_leaves_it_alone():
    x = torch.tensor([3.0, 1.0, 2.0])
    pool_chords(x, np.array([False, True, True]), 0.0)
    assert int(x.argmax()) == 2 and x[2] == 3.0 and x[0] == float("-inf")
    y = torch.tensor([3.0, float("-inf")])
    pool_chords(y, np.array([False, True]), 1.0)  # no allowed pool chord: unchanged
    assert y.tolist() == [3.0, float("-inf")]
