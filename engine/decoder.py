"""Decoders: a model plus its KV cache behind one small, host-side API.

`extend(slots, tokens)` appends tokens to any set of cache slots in one forward and returns the
logits after each row's last new token. Rows may have different lengths and append different
numbers of tokens (shorter rows are padded; padding is written past the row's length, where it
is masked out and later overwritten). `Engine` (generate/stream/score) and the live scheduler
drive a model only through this API, so the torch and ONNX backends are interchangeable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from .cache import KVCache
from .model import Transformer

logger = logging.getLogger(__name__)


class ContextFull(ValueError):
    """Raised when an extend would run a slot past the cache's max_seq."""


class Decoder(Protocol):
    max_batch: int
    max_seq: int
    vocab_size: int
    device: torch.device

    def extend(
        self, slots: Sequence[int], tokens: Sequence[Sequence[int]], all_logits: bool = False
    ) -> Tensor: ...

    def length(self, slot: int) -> int: ...

    def crop(self, slot: int, n: int) -> None: ...

    def reset(self, slot: int | None = None) -> None: ...

    def move(self, src: int, dst: int) -> None: ...

    def nbytes_per_slot(self, seq: int | None = None) -> int:
        """Bytes of keys + values one slot holds at `seq` positions (default: max_seq)."""
        ...


def pad_batch(
    lengths: Sequence[int], tokens: Sequence[Sequence[int]], max_seq: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """Padded token rows, their positions and the attended prefix length (kv_len)."""
    if len(lengths) != len(tokens):
        raise ValueError(f"{len(lengths)} slots but {len(tokens)} token rows")
    if not tokens or min(len(t) for t in tokens) == 0:
        raise ValueError("extend needs at least one token in every row")
    T = max(len(t) for t in tokens)
    toks, pos = [], []
    for L, row in zip(lengths, tokens, strict=True):
        if L + len(row) > max_seq:
            raise ContextFull(f"slot at length {L} + {len(row)} tokens exceeds max_seq {max_seq}")
        toks.append(list(row) + [0] * (T - len(row)))
        pos.append([min(L + j, max_seq - 1) for j in range(T)])  # padding: past the row's end
    kv_len = max(L + len(row) for L, row in zip(lengths, tokens, strict=True))
    return toks, pos, kv_len


class TorchDecoder:
    """A `Transformer` with a `KVCache` of `max_batch` slots."""

    def __init__(
        self,
        model: Transformer,
        max_batch: int = 1,
        max_seq: int | None = None,
        compile: bool = False,
    ) -> None:
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        if self.device.type == "cpu" and self.dtype == torch.float32 and not compile:
            model.use_input_major_weights()  # same values: faster MKL matmuls on CPU
        self.max_batch = max_batch
        self.max_seq = min(max_seq or model.config.max_seq_len, model.config.max_seq_len)
        self.vocab_size = model.config.vocab_size
        self.cache = KVCache.for_model(
            model.config, max_batch, self.max_seq, self.dtype, self.device
        )
        # Optional compiled forward (fixed-size kv_len would be needed for CUDA graphs; eager
        # slices the cache to the attended prefix instead).
        self._forward = torch.compile(model, dynamic=True) if compile else model

    def length(self, slot: int) -> int:
        return self.cache.get_seq_length(slot)

    def crop(self, slot: int, n: int) -> None:
        self.cache.crop(slot, n)

    def reset(self, slot: int | None = None) -> None:
        self.cache.reset(slot)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def nbytes_per_slot(self, seq: int | None = None) -> int:
        return self.cache.nbytes_per_slot(self.max_seq if seq is None else seq)

    @torch.inference_mode()
    def extend(
        self, slots: Sequence[int], tokens: Sequence[Sequence[int]], all_logits: bool = False
    ) -> Tensor:
        """Append tokens[b] to slot slots[b]; logits float32 (B, V), or (B, T, V) if all_logits."""
        lengths = [self.cache.lengths[s] for s in slots]
        toks, pos, kv_len = pad_batch(lengths, tokens, self.max_seq)
        tok_t = torch.tensor(toks, device=self.device)  # (B, T)
        pos_t = torch.tensor(pos, device=self.device)  # (B, T)
        logits = self._forward(tok_t, pos_t, self.cache, slots, kv_len)  # (B, T, V)
        for s, L, row in zip(slots, lengths, tokens, strict=True):
            self.cache.lengths[s] = L + len(row)
        if all_logits:
            return logits.float()
        last = torch.tensor([len(row) - 1 for row in tokens], device=self.device)  # (B,)
        return logits[torch.arange(len(toks), device=self.device), last].float()  # (B, V)
