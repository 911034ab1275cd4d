"""Shared fixtures: a tiny random-weight model and a checkpoint folder written from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer.vocab import TokenizerConfig


def make_tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()


def write_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight `tiny` checkpoint (also used by benchmarks and other helpers' tests)."""
    model = make_tiny_model(seed, **overrides)
    return save_checkpoint(path, model, TokenizerConfig(), {"note": "random weights, for tests"})


@pytest.fixture
def make_model():
    """Factory fixture: make_model(seed=0, **config_overrides) -> tiny Transformer."""
    return make_tiny_model


@pytest.fixture
def tiny_model() -> Transformer:
    return make_tiny_model()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "ckpt")
