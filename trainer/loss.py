"""The training loss: next-token NLL, with censored waits scored as "at least this long"."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE


def token_nll(
    logits: torch.Tensor, target: torch.Tensor, censor: torch.Tensor, time_ids: tuple[int, int]
) -> torch.Tensor:
    """(N,) NLL per target (0 where target is IGNORE).

    logits (N, V) float, target (N,), censor (N,) bool. `time_ids` = [lo, hi): the time tokens,
    whose ids increase with the time they stand for (SHIFT_1..SHIFT_max, LONG_1..). A censored
    target t (a wait cut short by a forced event: trainer.data.censored_waits) scores
    -log P(a time token >= t), the mass of every wait at least that long: the cut wait's
    likelihood, which is what sampling then clipping at the forced event draws from.
    """
    nll = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")  # (N,)
    rows = censor.nonzero().squeeze(1)  # (M,)
    if rows.numel() == 0:
        return nll
    lo, hi = time_ids
    lg = logits[rows]  # (M, V)
    k = target[rows] - lo  # (M,) the wait's index among the time tokens
    waits = lg[:, lo:hi]  # (M, K)
    at_least = torch.logcumsumexp(waits.flip(-1), -1).flip(-1)  # [m, j] = lse(waits[m, j:])
    cens = torch.logsumexp(lg, -1) - at_least.gather(1, k[:, None]).squeeze(1)  # (M,)
    return nll.index_put((rows,), cens)
