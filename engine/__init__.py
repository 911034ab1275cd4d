"""improv.engine: the model, its decoders, constraints, and live sessions.

`from improv.engine import Engine` (README). Loaded on first use: `improv.engine.tokenizer`
and the other light modules import without torch's model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
