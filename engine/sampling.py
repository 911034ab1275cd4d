"""Sampling: small pure functions from logits (B, V) to token ids (B,).

    logits = apply_mask(logits, mask)                      # grammar / user constraints
    probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
    next_ids = sample(probs, seeds=seeds, positions=positions)   # (B,), no host sync

Sampling is an exponential race: argmax(p / q), q ~ Exp(1) per token, which samples exactly
from p. Reproducibility: row b's noise is a pure function of (seeds[b], positions[b]) (a
counter-based generator, `counter_exponentials`), so a row's tokens depend only on its seed and
position, never on which other rows share the batch: batched == one-by-one with the same seeds.
No generator state, so one vectorized call draws for every row (reseeding a `torch.Generator`
per row cost ~66 us/row). `sample(probs, generators)` (per-row `torch.Generator`s, or the
global RNG) is kept for callers that hold generators.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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
        probs = nucleus(probs, top_p)
    if min_p is not None and min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.where(greedy, onehot, probs)


def temper_span(logits: Tensor, lo: int, hi: int, temperature: float) -> Tensor:
    """(B, V) logits with the ids [lo, hi) tempered among themselves: their log-probabilities
    divided by `temperature` and renormalized to the mass they had (the rest unchanged: when a
    token of the span is drawn stays as likely; which one changes). Written into `logits` and
    returned; rows with the whole span masked are left as they are."""
    span = logits[:, lo:hi]
    mass = torch.logsumexp(span, dim=-1, keepdim=True)  # (B, 1)
    t = span / temperature
    t = t - torch.logsumexp(t, dim=-1, keepdim=True) + mass
    logits[:, lo:hi] = torch.where(torch.isfinite(mass), t, span)
    return logits


NUCLEUS_FIRST_K = 64  # nucleus: the most likely tokens ranked first (a full sort if too few)
NUCLEUS_MARGIN = 1e-6  # ... enough when their mass passes top_p by this (float rounding)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """(B, V) probabilities -> the smallest set of most likely tokens with mass >= top_p kept,
    the rest 0 (the first token always stays); not renormalized.

    Ranks the NUCLEUS_FIRST_K most likely tokens (`topk`) and sorts only the rows whose top k
    fall short of top_p: torch's CPU sort of 16 rows of 1,771 took 1.2 ms, most of
    `logits_to_probs` and ~4% of a live scheduler step, for a nucleus that is a few dozen
    tokens (in a 16-session accompany run, 2.3% of the rows needed more than 64). The kept
    values are the full sort's: the same cumulative sums over the same ranked prefix, and the
    tokens past a row's top k are all dropped (the mass before each >= top_p)."""
    k = min(NUCLEUS_FIRST_K, probs.shape[-1])
    ranked, order = torch.topk(probs, k, dim=-1)  # (B, k), descending
    out = torch.zeros_like(probs).scatter_(-1, order, _keep_nucleus(ranked, top_p))
    if k < probs.shape[-1]:
        wide = torch.nonzero(ranked.sum(-1) < top_p + NUCLEUS_MARGIN).flatten()  # (W,)
        if len(wide):
            ranked, order = torch.sort(probs[wide], dim=-1, descending=True)  # (W, V)
            kept = _keep_nucleus(ranked, top_p)
            out[wide] = torch.zeros_like(ranked).scatter_(-1, order, kept)
    return out


def _keep_nucleus(ranked: Tensor, top_p: float) -> Tensor:
    """Probabilities ranked descending -> 0 where the mass strictly before reaches top_p."""
    return ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)


_M64 = (1 << 64) - 1
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(x: int) -> int:
    """One splitmix64 step: a bijective, well-mixed 64-bit hash (Steele et al., 2014)."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * _MIX1) & _M64
    x = ((x ^ (x >> 27)) * _MIX2) & _M64
    return x ^ (x >> 31)


def counter_exponentials(
    seeds: Sequence[int], positions: Sequence[int], vocab_size: int
) -> np.ndarray:
    """(B, V) float32 Exp(1) noise; row b is a pure function of (seeds[b], positions[b]).

    Row b is the splitmix64 stream keyed by hash(seed, position), one draw per token id, in
    numpy uint64 (wrapping multiplies are defined there, unlike torch's signed int64).
    """
    keys = np.array(
        [
            _splitmix64(_splitmix64(s & _M64) ^ (p & _M64))
            for s, p in zip(seeds, positions, strict=True)
        ],
        dtype=np.uint64,
    )
    with np.errstate(over="ignore"):
        x = keys[:, None] + np.arange(1, vocab_size + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
        x ^= x >> np.uint64(31)
    return exponentials_from_bits(x >> np.uint64(40))  # (B, V)


def exponentials_from_bits(bits: np.ndarray) -> np.ndarray:
    """24-bit integers -> float32 Exp(1) draws, all finite and > 0.

    u = (k + 0.5) / 2**24 lies in (0, 1); it is formed in float64, where it is exact: in float32
    the top value, 2**24 - 0.5, rounds up to 2**24, u to 1 and q to 0, and then a token the
    mask gave p = 0 wins the race (0 / 0 is NaN, which argmax takes for the largest).
    """
    u = (bits.astype(np.float64) + 0.5) * 2.0**-24
    return (-np.log(u)).astype(np.float32)


def sample(
    probs: Tensor,
    generators: Generators = None,
    *,
    seeds: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Tensor:
    """(B, V) probabilities -> (B,) token ids, by exponential race: argmax(p / q), q ~ Exp(1).

    With seeds and positions: q is `counter_exponentials(seeds, positions)`, one vectorized
    draw for every row. Otherwise one generator per row (None: the global RNG).
    """
    B = probs.shape[0]
    if seeds is not None or positions is not None:
        if seeds is None or positions is None or len(seeds) != B or len(positions) != B:
            raise ValueError(f"need one seed and one position for each of {B} rows")
        q = torch.from_numpy(counter_exponentials(seeds, positions, probs.shape[1]))
        # The race, not inverse CDF: a CDF sums float error over the whole vocabulary, so
        # float noise between two equal-in-theory paths (cached vs recompute) flips a draw
        # ~V times more often than in the race, where only the winner's margin counts.
        return _race(probs, q.to(probs.device))
    if generators is None or isinstance(generators, torch.Generator):
        generators = [generators] * B
    if len(generators) != B:
        raise ValueError(f"{len(generators)} generators for {B} rows")
    q = torch.empty_like(probs)  # (B, V)
    for b, g in enumerate(generators):  # per-row streams: a row's draw ignores its batch mates
        q[b].exponential_(generator=g)
    return _race(probs, q)


def _race(probs: Tensor, q: Tensor) -> Tensor:
    """argmax(p / q) per row, (B,). A token with p = 0 (masked) never wins, whatever q is."""
    return torch.argmax((probs / q).masked_fill_(probs <= 0, -1.0), dim=-1)


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


def make_seeds(seeds: int | Sequence[int | None] | None, batch: int) -> list[int]:
    """Per-row seeds for `sample(..., seeds=)`: seed s gives rows s, s+1, ...; a list gives one
    per row; None (alone or in the list) draws one from torch's global RNG (so
    torch.manual_seed still reproduces an unseeded run)."""
    if isinstance(seeds, int):
        return [seeds + b for b in range(batch)]
    if seeds is None:
        seeds = [None] * batch
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
    return [int(torch.randint(0, 2**62, ())) if s is None else int(s) for s in seeds]


def pool_chords(chord_logits: Tensor, pool: np.ndarray, temperature: float) -> None:
    """In place, one row's (C,) CHORD logits (masked ones at -inf): the chords outside `pool`
    give their probability (at `temperature`) to those in it, in proportion: a chord change
    stays as likely, drawn among the pool (`ChordsFitMelody`). Nothing if no pool chord is
    allowed."""
    keep = torch.from_numpy(pool).to(chord_logits.device) & torch.isfinite(chord_logits)
    if not keep.any():
        return
    if temperature <= 0:  # greedy: the best pool chord takes the best chord's place
        best = chord_logits.max()
        top = torch.where(keep, chord_logits, float("-inf")).argmax()
        chord_logits[~keep] = float("-inf")
        chord_logits[top] = best
        return
    t = temperature
    lift = t * (torch.logsumexp(chord_logits / t, 0) - torch.logsumexp(chord_logits[keep] / t, 0))
    chord_logits[keep] += lift
    chord_logits[~keep] = float("-inf")
