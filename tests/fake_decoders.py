"""Decoders that wrap a real one and bend its logits: models whose choices a test sets."""

from __future__ import annotations

from typing import Any

import torch


class Opinionated:
    """A decoder whose logits favour one token (or several) by `bias`: a model with a strong
    opinion."""

    def __init__(self, inner: Any, token: int | list[int], bias: float) -> None:
        self.inner, self.token, self.bias = inner, token, bias

    def extend(self, slots: list[int], tokens: list[list[int]], all_logits: bool = False):
        out = self.inner.extend(slots, tokens, all_logits).clone()
        out[..., self.token] += self.bias
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Fixed(Opinionated):
    """A decoder whose logits are always `logits` (V,): a model whose every choice the test
    sets (the cache still works underneath)."""

    def __init__(self, inner: Any, logits: torch.Tensor) -> None:
        self.inner, self.logits = inner, logits

    def extend(self, slots: list[int], tokens: list[list[int]], all_logits: bool = False):
        out = self.inner.extend(slots, tokens, all_logits)
        return self.logits.to(out.dtype).expand_as(out).clone()
