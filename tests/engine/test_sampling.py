"""Small pure sampling functions (engine/sampling.py)."""

from __future__ import annotations

import numpy as np
import torch

from improv.engine.sampling import pool_chords, temper_span


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


def test_temper_span_reshapes_the_waits_among_themselves_and_keeps_their_mass():
    """`SamplingParams.wait_temperature`: which wait is drawn changes, not whether one is."""
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    logits[1, 2:6] = float("-inf")  # no wait allowed in this row: left alone
    logits[2, 3] = float("-inf")  # one masked wait stays masked
    before = torch.softmax(logits, -1)
    after = torch.softmax(temper_span(logits.clone(), 2, 6, 2.0), -1)
    torch.testing.assert_close(after[:, 2:6].sum(-1), before[:, 2:6].sum(-1))
    torch.testing.assert_close(after[:, :2], before[:, :2])
    torch.testing.assert_close(after[1], before[1])
    assert after[2, 3] == 0
    for row in (0, 2):  # flatter: the likeliest wait loses share, the least likely gains
        b, a = before[row, 2:6], after[row, 2:6]
        ok = b > 0
        assert a[ok].max() / a[ok].sum() < b[ok].max() / b[ok].sum()
        assert a[ok].min() / a[ok].sum() > b[ok].min() / b[ok].sum()
    sharp = torch.softmax(temper_span(logits.clone(), 2, 6, 0.5), -1)
    assert sharp[0, 2:6].max() > before[0, 2:6].max()
