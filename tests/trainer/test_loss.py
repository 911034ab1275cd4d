"""The training loss: plain NLL, and censored waits scored as the mass of every longer wait."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from improv.engine.tokenizer.vocab import TokenizerConfig, Vocab
from improv.trainer.data import IGNORE
from improv.trainer.loss import token_nll


def test_token_nll_plain_censored_and_ignored() -> None:
    v = Vocab(TokenizerConfig())
    lo, hi = v.shift_base, v.part_base
    torch.manual_seed(0)
    logits = torch.randn(6, v.size, dtype=torch.float64)
    target = torch.tensor([v.shift(7), v.shift(7), v.long(3), v.vel_base, IGNORE, v.shift(1)])
    censor = torch.tensor([False, True, True, False, False, True])
    nll = token_nll(logits, target, censor, (lo, hi))
    p = logits.softmax(-1)
    plain = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    assert torch.allclose(nll[[0, 3, 4]], plain[[0, 3, 4]]) and nll[4] == 0
    # censored: -log P(a wait at least that long), time tokens ordered by length
    for row in (1, 2, 5):
        t = int(target[row])
        assert torch.allclose(nll[row], -p[row, t:hi].sum().log())
    # "at least 10 ms" is every wait: P = the whole time mass
    assert torch.allclose(nll[5], -p[5, lo:hi].sum().log())
    assert (nll[[1, 2]] < plain[[1, 2]]).all()


def test_token_nll_gradient_flows_through_censored_rows() -> None:
    v = Vocab(TokenizerConfig())
    logits = torch.zeros(1, v.size, requires_grad=True)
    token_nll(
        logits, torch.tensor([v.shift(50)]), torch.tensor([True]), (v.shift_base, v.part_base)
    ).sum().backward()
    g = logits.grad[0]
    assert (g[v.shift(50) : v.part_base] < 0).all()  # longer waits pushed up
    assert (g[: v.shift(50)] > 0).all() and (g[v.part_base :] > 0).all()
