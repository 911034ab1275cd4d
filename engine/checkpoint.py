"""Checkpoints: a folder with `model.safetensors` and `config.json`.

config.json = {"model": ModelConfig dict, "tokenizer": TokenizerConfig dict, "training": {...}}.
Weights are safetensors only: loading never unpickles anything (no torch.load).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import Transformer
from .tokenizer.vocab import TokenizerConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_TIED_KEY = "lm_head.weight"  # not stored when tied: it is tok_emb.weight
# The bundled model: models/default beside engine/ in a checkout, improv/models/default in a wheel
# (the same relative place), so every command finds it from any working directory.
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "default"
_DEFAULT_NAMES = ("default", "models/default", "models/default/")


def resolve_checkpoint(path: str | Path | None) -> Path:
    """A checkpoint folder: `path`, or the bundled default model for None, "default", or a
    "models/default" that is not a folder here (the README's name, run from elsewhere)."""
    if path is None or (str(path) in _DEFAULT_NAMES and not Path(path).is_dir()):
        return BUNDLED
    return Path(path)


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    tokenizer_config: TokenizerConfig | dict[str, Any],
    training_meta: dict[str, Any] | None = None,
) -> Path:
    """Write `path/model.safetensors` and `path/config.json`; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer_config, TokenizerConfig):
        tokenizer_config = tokenizer_config.to_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop(_TIED_KEY, None)
    save_file(state, str(path / WEIGHTS_FILE))
    meta = {
        "model": model.config.to_dict(),
        "tokenizer": tokenizer_config,
        "training": training_meta or {},
    }
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("saved checkpoint to %s", path)
    return path


def read_config(path: str | Path) -> tuple[ModelConfig, TokenizerConfig, dict[str, Any]]:
    """(model config, tokenizer config, training metadata) of a checkpoint folder."""
    path = resolve_checkpoint(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"not a checkpoint folder (no {CONFIG_FILE}): {path}")
    meta = json.loads(cfg_file.read_text())
    return (
        ModelConfig.from_dict(meta["model"]),
        TokenizerConfig.from_dict(meta.get("tokenizer", {})),
        meta.get("training", {}),
    )


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Transformer, ModelConfig, TokenizerConfig, dict[str, Any]]:
    """Rebuild the model from its config and load its weights; returns it in eval mode."""
    path = resolve_checkpoint(path)
    model_cfg, tok_cfg, meta = read_config(path)
    # Build on the meta device (no init work, no memory) and adopt the loaded tensors as-is.
    with torch.device("meta"):
        model = Transformer(model_cfg)
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {_TIED_KEY} if model_cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.init_rope(device)
    model.eval()
    logger.info("loaded checkpoint %s (%s)", path, device)
    return model, model_cfg, tok_cfg, meta
