"""Model equivalences: cached == recompute, functional (ONNX) step == cached, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from improv.engine.cache import KVCache
from improv.engine.checkpoint import load_checkpoint, save_checkpoint
from improv.engine.config import PRESETS, ModelConfig
from improv.engine.model import Transformer, num_params
from improv.engine.tokenizer.vocab import TokenizerConfig, Vocab


def test_vocab_default_matches_tokenizer():
    assert ModelConfig().vocab_size == Vocab(TokenizerConfig()).size


def test_preset_sizes():
    sizes = {}
    for name in PRESETS:
        with torch.device("meta"):
            sizes[name] = num_params(Transformer(ModelConfig.from_preset(name)))
    assert sizes["tiny"] < 1e6
    assert 5e6 <= sizes["small"] <= 10e6 and PRESETS["small"].max_seq_len >= 2048
    assert 30e6 <= sizes["base"] <= 60e6
    assert sizes["large"] >= 100e6


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=8, n_kv_head=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"n_layers": 3})
    assert ModelConfig.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]


@torch.no_grad()
@pytest.mark.parametrize("n_kv_head", [2, 4])  # GQA and plain multi-head
def test_cached_equals_recompute(make_model, n_kv_head):
    model = make_model(n_kv_head=n_kv_head)
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    ref = model(x)  # (B, T, V) full causal recompute
    cache = KVCache.for_model(cfg, max_batch=3)
    pos = torch.arange(24).expand(2, 24)
    outs = [model(x[:, :10], pos[:, :10], cache, [1, 2], kv_len=10)]  # prefill
    for t in range(10, 24):  # one token at a time
        outs.append(model(x[:, t : t + 1], pos[:, t : t + 1], cache, [1, 2], kv_len=t + 1))
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rows_at_different_positions_and_scattered_slots(tiny_model):
    """One forward advances rows of different lengths living in non-contiguous slots."""
    cfg = tiny_model.config
    a = torch.randint(0, cfg.vocab_size, (1, 15))
    b = torch.randint(0, cfg.vocab_size, (1, 9))
    ref_a, ref_b = tiny_model(a)[0, -1], tiny_model(b)[0, -1]
    cache = KVCache.for_model(cfg, max_batch=4)
    tiny_model(a[:, :14], torch.arange(14)[None], cache, [3])
    tiny_model(b[:, :8], torch.arange(8)[None], cache, [0])
    step = torch.cat([a[:, 14:], b[:, 8:]])  # (2, 1)
    pos = torch.tensor([[14], [8]])
    out = tiny_model(step, pos, cache, [3, 0])  # full-cache kv_len: fixed shapes path
    torch.testing.assert_close(out[0, -1], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, -1], ref_b, atol=1e-5, rtol=1e-5)


def test_training_forward_backward(tiny_model):
    tiny_model.train()
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    logits = tiny_model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert tiny_model.tok_emb.weight.grad is not None
    assert tiny_model.lm_head.weight is tiny_model.tok_emb.weight  # tied


@torch.no_grad()
def test_checkpoint_roundtrip(tmp_path, tiny_model):
    tok_cfg = TokenizerConfig(velocity_bins=16)
    save_checkpoint(tmp_path / "ck", tiny_model, tok_cfg, {"step": 7})
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert set(meta) == {"model", "tokenizer", "training"}
    model, mcfg, tcfg, training = load_checkpoint(tmp_path / "ck")
    assert mcfg == tiny_model.config and tcfg == tok_cfg and training == {"step": 7}
    assert model.lm_head.weight is model.tok_emb.weight
    x = torch.randint(0, mcfg.vocab_size, (1, 10))
    torch.testing.assert_close(model(x), tiny_model(x), atol=0, rtol=0)


def test_checkpoint_untied(tmp_path, make_model):
    model = make_model(tie_embeddings=False)
    save_checkpoint(tmp_path / "ck", model, TokenizerConfig())
    loaded, *_ = load_checkpoint(tmp_path / "ck")
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight is not loaded.tok_emb.weight
