"""KV cache: in-place layout, rollback, reset, move; the decoder's host-side bookkeeping."""

from __future__ import annotations

import pytest
import torch

from improv.engine.cache import KVCache
from improv.engine.decoder import ContextFull, TorchDecoder


def test_buffers_are_preallocated_and_views_are_returned(tiny_model):
    cfg = tiny_model.config
    cache = KVCache.for_model(cfg, max_batch=2, max_seq=32)
    ptrs = [b.data_ptr() for b in (*cache.k, *cache.v)]
    with torch.no_grad():
        tiny_model(torch.randint(0, 100, (2, 5)), torch.arange(5).expand(2, 5), cache, [0, 1], 5)
    assert [b.data_ptr() for b in (*cache.k, *cache.v)] == ptrs
    rows = cache.rows([0, 1], 2)
    index = cache.write_index(rows, torch.tensor([[5], [5]]))
    new = torch.ones(2, 1, cfg.n_kv_head, cfg.head_dim)  # (B, T, Hkv, D)
    k, _ = cache.write(0, rows, index, new, new, 6)
    assert (k[:, :, 5] == 1).all() and k.shape == (2, cfg.n_kv_head, 6, cfg.head_dim)
    assert k.data_ptr() == cache.k[0].data_ptr()  # contiguous slots: a view, not a copy
    assert cache.nbytes_per_slot() == 2 * cfg.n_layer * cfg.n_kv_head * 32 * cfg.head_dim * 4


def test_crop_then_regenerate_equals_fresh(tiny_model):
    dec = TorchDecoder(tiny_model, max_batch=2)
    seq = torch.randint(0, 500, (20,)).tolist()
    dec.extend([0], [seq[:12]])
    dec.extend([0], [[7, 8, 9]])  # a branch to roll back
    dec.crop(0, 12)
    assert dec.length(0) == 12
    rolled = dec.extend([0], [seq[12:]])
    fresh = dec.extend([1], [seq])
    torch.testing.assert_close(rolled, fresh, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="crop length"):
        dec.crop(0, 99)


def test_reset_and_move(tiny_model):
    dec = TorchDecoder(tiny_model, max_batch=3)
    seq = torch.randint(0, 500, (10,)).tolist()
    ref = dec.extend([0], [seq])
    dec.reset(0)
    assert dec.length(0) == 0
    torch.testing.assert_close(dec.extend([0], [seq]), ref)
    dec.cache.move(0, 2)
    assert dec.length(0) == 0 and dec.length(2) == 10
    nxt = dec.extend([2], [[5]])
    dec.reset(1)
    dec.extend([1], [seq])
    torch.testing.assert_close(dec.extend([1], [[5]]), nxt, atol=1e-5, rtol=1e-5)


def test_extend_mixed_lengths_equals_one_by_one(tiny_model):
    rows = [torch.randint(0, 500, (n,)).tolist() for n in (3, 11, 6)]
    one = TorchDecoder(tiny_model, max_batch=1)
    refs = []
    for r in rows:
        one.reset(0)
        refs.append(one.extend([0], [r[:-2]]))
        refs.append(one.extend([0], [r[-2:]]))
    dec = TorchDecoder(tiny_model, max_batch=3)
    first = dec.extend([2, 0, 1], [r[:-2] for r in rows])  # scattered slots, padded rows
    second = dec.extend([2, 0, 1], [r[-2:] for r in rows])
    for b in range(3):
        torch.testing.assert_close(first[b], refs[2 * b][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second[b], refs[2 * b + 1][0], atol=1e-5, rtol=1e-5)


def test_context_full_raises(tiny_model):
    dec = TorchDecoder(tiny_model, max_batch=1, max_seq=8)
    dec.extend([0], [[1] * 8])
    with pytest.raises(ContextFull):
        dec.extend([0], [[1]])
