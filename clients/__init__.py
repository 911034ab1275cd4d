"""improv.clients: the HTTP `Client`, the WebSocket `LiveClient` and the DAW `Bridge`."""

from __future__ import annotations

from typing import Any

__all__ = ["Bridge", "Client", "ImprovError", "LiveClient", "LiveError"]


def __getattr__(name: str) -> Any:
    # Lazy: `import improv.clients` stays light (the bridge pulls in mido ports).
    if name in ("Client", "ImprovError"):
        from . import client

        return getattr(client, name)
    if name in ("LiveClient", "LiveError"):
        from . import live

        return getattr(live, name)
    if name == "Bridge":
        from .bridge import Bridge

        return Bridge
    raise AttributeError(name)
