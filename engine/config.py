"""Model configuration: one dataclass, named size presets.

A checkpoint stores `ModelConfig.to_dict()` and the loader rebuilds with `ModelConfig.from_dict`,
so a model is always reconstructed from exactly the config it was trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

DEFAULT_VOCAB_SIZE = 1586  # Vocab(TokenizerConfig()).size; checkpoints store their own


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = DEFAULT_VOCAB_SIZE  # token ids 0..vocab_size-1 (from the tokenizer config)
    n_layer: int = 8  # transformer blocks
    n_head: int = 8  # query heads
    n_kv_head: int | None = None  # key/value heads (GQA); None = n_head; must divide n_head
    d_model: int = 256  # residual stream width; head_dim = d_model // n_head
    d_ff: int | None = None  # MLP hidden width; None = 8/3 * d_model rounded up to 64 (SwiGLU)
    max_seq_len: int = 2048  # context length: KV-cache size and RoPE table length
    rope_base: float = 10000.0  # RoPE frequency base
    dropout: float = 0.0  # dropout on attention output and MLP output (training only)
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self) -> None:
        # Derived fields: frozen dataclass, so set through object.__setattr__.
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", _round_up(8 * self.d_model // 3, 64))
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})"
            )
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.d_model // self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        for name in ("vocab_size", "n_layer", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Parameter counts are for the default vocabulary (1,586 ids), embeddings counted once (tied).
PRESETS: dict[str, ModelConfig] = {
    # ~0.2M: unit tests; GQA on so the grouped path is always tested.
    "tiny": ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=256),
    # ~6.3M: the CPU real-time default (weights ~25 MB fp32: one decode step reads them once).
    "small": ModelConfig(n_layer=8, n_head=8, n_kv_head=4, d_model=256, max_seq_len=2048),
    # ~42M: better quality, still CPU-usable at batch 1.
    "base": ModelConfig(n_layer=14, n_head=8, n_kv_head=4, d_model=512, max_seq_len=2048),
    # ~102M: GPU.
    "large": ModelConfig(n_layer=16, n_head=12, n_kv_head=4, d_model=768, max_seq_len=4096),
}
