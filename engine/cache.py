"""Preallocated key/value cache with per-slot lengths.

Layout: per layer, k and v buffers of shape (max_batch, n_kv_head, max_seq, head_dim), allocated
once. A *slot* is one row of those buffers: one sequence (a generate() row, a live session). Every
slot has its own length, so one batched forward can advance rows at different positions: each row
writes its new keys at its own positions and attends to its own prefix through a position mask
(see `Transformer.forward`).

No step allocates cache memory or copies the cache: writes are in-place `index_put_`, reads are
views of the first `kv_len` positions. When the rows of a forward are a contiguous run of slots
(`slots=[3, 4, 5]`), the read is a view; any other order gathers those rows (a copy), so a
scheduler should keep its active slots packed (`move()` relocates one slot).

Rollback is `crop(slot, n)`: positions >= n become invalid (masked out until overwritten).
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Sequence

import torch
from torch import Tensor

from .config import ModelConfig

logger = logging.getLogger(__name__)

Rows = slice | Tensor  # resolved slots of one forward: a slice of the buffers, or a (B,) index


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A zero-filled buffer; on CPU its pages become resident only when first written.

    Zeros, not `torch.empty`: a row attends over the batch's longest prefix (`kv_len`), so it
    reads positions of its own slot that were never written. They are masked, but a masked
    score still multiplies its value (probability 0 x value), and 0 x NaN/inf is NaN: a stale
    non-finite value from reused memory would poison the row. `torch.zeros` writes every byte
    (a 64-session cache was resident up front); an anonymous mmap gets zero pages from the
    kernel that are backed only once written (calloc would memset reused heap chunks).
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # The tensor keeps the mmap alive; it is unmapped when the last view is freed.
    return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype).view(shape)


class SlotLengths:
    """Per-slot valid lengths, kept on the host (reading them never syncs a device)."""

    def __init__(self, max_batch: int, max_seq: int) -> None:
        self.max_batch, self.max_seq = max_batch, max_seq
        self.lengths = [0] * max_batch

    def get_seq_length(self, slot: int = 0) -> int:
        return self.lengths[slot]

    def crop(self, slot: int, n: int) -> None:
        """Roll slot back to its first n positions (n <= current length)."""
        if not 0 <= n <= self.lengths[slot]:
            raise ValueError(f"crop length must be in 0..{self.lengths[slot]}, got {n}")
        self.lengths[slot] = n

    def reset(self, slot: int | None = None) -> None:
        """Empty one slot (or all). Buffers are not cleared: stale entries are masked out."""
        if slot is None:
            self.lengths = [0] * self.max_batch
        else:
            self.lengths[slot] = 0


class KVCache(SlotLengths):
    def __init__(
        self,
        n_layer: int,
        max_batch: int,
        max_seq: int,
        n_kv_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(max_batch, max_seq)
        shape = (max_batch, n_kv_head, max_seq, head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(n_layer)]
        self.v = [_zeros(shape, dtype, device) for _ in range(n_layer)]
        self.positions = torch.arange(max_seq, device=device)  # key positions, for masks
        self._row_ids = torch.arange(max_batch, device=device)

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        max_batch: int,
        max_seq: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """A cache shaped for a `ModelConfig` (max_seq defaults to its context length)."""
        return cls(
            config.n_layer,
            max_batch,
            max_seq or config.max_seq_len,
            config.n_kv_head,
            config.head_dim,
            dtype,
            device,
        )

    def move(self, src: int, dst: int) -> None:
        """Relocate slot src's valid prefix to slot dst (to keep active slots contiguous)."""
        n = self.lengths[src]
        for buf in (*self.k, *self.v):
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def nbytes_per_slot(self, seq: int | None = None) -> int:
        """Bytes of k+v one slot holds at `seq` positions (default: the full context)."""
        per_pos = sum(b[0, :, 0].numel() * b.element_size() for b in (*self.k, *self.v))
        return per_pos * (self.max_seq if seq is None else seq)

    # --- used by the model's forward ----------------------------------------------------------
    def rows(self, slots: Sequence[int] | None, batch: int) -> Rows:
        """Resolve a forward's slots: a slice when they are a contiguous ascending run."""
        if slots is None:
            return slice(0, batch)
        slots = list(slots)
        if len(slots) != batch:
            raise ValueError(f"got {len(slots)} slots for a batch of {batch}")
        start = slots[0]
        if slots == list(range(start, start + batch)):
            return slice(start, start + batch)
        return torch.tensor(slots, device=self.positions.device)

    def write_index(self, rows: Rows, input_pos: Tensor) -> Tensor:
        """Flat row indices into a layer's buffer viewed as (max_batch*Hkv*max_seq, D) for the
        new keys of a forward, ordered (B, T, Hkv) like the projection's output: `write`
        stores them with one index_copy_ (an index_put_ with broadcast indices cost ~5x)."""
        _, Hkv, S, _ = self.k[0].shape
        row_ids = self._row_ids[rows] if isinstance(rows, slice) else rows  # (B,)
        heads = torch.arange(Hkv, device=input_pos.device)
        idx = (row_ids[:, None, None] * Hkv + heads) * S + input_pos[:, :, None]  # (B, T, Hkv)
        return idx.flatten()

    def write(
        self, layer: int, rows: Rows, index: Tensor, k: Tensor, v: Tensor, kv_len: int
    ) -> tuple[Tensor, Tensor]:
        """Store k, v (B, T, Hkv, D) at `index` (from `write_index`); return the rows'
        (B, Hkv, kv_len, D) views (copies when rows is an index tensor)."""
        kb, vb = self.k[layer], self.v[layer]
        D = kb.shape[-1]
        kb.view(-1, D).index_copy_(0, index, k.reshape(-1, D).to(kb.dtype))
        vb.view(-1, D).index_copy_(0, index, v.reshape(-1, D).to(vb.dtype))
        return kb[rows, :, :kv_len], vb[rows, :, :kv_len]
