"""Shared fixtures: a tiny random-weight model and a checkpoint folder written from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer.vocab import TokenizerConfig


def make_tiny_model(seed: int = 0, std: float = 0.3, **overrides) -> Transformer:
    """Random tiny model. std 0.3 (not the 0.02 training init) makes the logits peaked and
    position-dependent, so greedy decoding is not one token repeated and comparisons bite."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, std if name == "tok_emb.weight" else std / p.shape[1] ** 0.5 * 4)
    return model


def write_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight `tiny` checkpoint (also used by benchmarks and other helpers' tests)."""
    model = make_tiny_model(seed, **overrides)
    return save_checkpoint(path, model, TokenizerConfig(), {"note": "random weights, for tests"})


@pytest.fixture(scope="session")
def make_model():
    """Factory fixture: make_model(seed=0, **config_overrides) -> tiny Transformer."""
    return make_tiny_model


@pytest.fixture
def tiny_model() -> Transformer:
    return make_tiny_model()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "ckpt")
