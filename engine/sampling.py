"""Sampling: small pure functions from logits (B, V) to token ids (B,).

    logits = apply_mask(logits, mask)                      # grammar / user constraints
    probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
    next_ids = sample(probs, generators)                   # (B,) on the device: no host sync

Reproducibility: each row draws its noise from its own `torch.Generator` (exponential race:
argmax(p / q), q ~ Exp(1), which samples exactly from p), so a row's tokens depend only on its
seed, never on which other rows share the batch: batched == one-by-one with the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = Sequence[torch.Generator | None] | torch.Generator | None


def apply_mask(logits: Tensor, mask: Tensor | None) -> Tensor:
    """mask (B, V) or (V,): bool (True = allowed) or float (0 / -inf, added)."""
    if mask is None:
        return logits
    mask = mask.to(logits.device)
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.to(logits.dtype)


def logits_to_probs(
    logits: Tensor,
    temperature: float | Tensor = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> Tensor:
    """(B, V) logits -> (B, V) float32 probabilities.

    temperature: float or (B,) per row; 0 = greedy (a one-hot at the argmax).
    top_k: keep the k most likely; top_p: keep the smallest set with mass >= p (nucleus);
    min_p: drop tokens whose probability is below min_p * the row's top probability.
    """
    logits = logits.float()
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
    greedy = t <= 0  # (B, 1) or (1, 1)
    onehot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / torch.where(greedy, torch.ones_like(t), t)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)  # (B, V)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if min_p is not None and min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.where(greedy, onehot, probs)


def sample(probs: Tensor, generators: Generators = None) -> Tensor:
    """(B, V) probabilities -> (B,) token ids, one generator per row (None: the global RNG)."""
    B = probs.shape[0]
    if generators is None or isinstance(generators, torch.Generator):
        generators = [generators] * B
    if len(generators) != B:
        raise ValueError(f"{len(generators)} generators for {B} rows")
    q = torch.empty_like(probs)  # (B, V)
    for b, g in enumerate(generators):  # per-row streams: a row's draw ignores its batch mates
        q[b].exponential_(generator=g)
    return torch.argmax(probs / q, dim=-1)  # (B,)


def make_generators(
    seeds: int | Sequence[int | None] | None, batch: int, device: torch.device | str = "cpu"
) -> list[torch.Generator | None]:
    """Per-row generators: seed s gives rows s, s+1, ...; a list gives one seed per row."""
    if seeds is None:
        return [None] * batch
    if isinstance(seeds, int):
        seeds = [seeds + b for b in range(batch)]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
    gens: list[torch.Generator | None] = []
    for s in seeds:
        gens.append(None if s is None else torch.Generator(device=device).manual_seed(int(s)))
    return gens
