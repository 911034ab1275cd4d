"""Live sessions: one `LiveConnection` per session (connection.py) runs a mode (respond.py,
accompany.py, on mode.py) whose tokens playback.py turns into MIDI events that outbox.py sends.
docs/architecture.md draws the picture."""

from .connection import LiveConnection

__all__ = ["LiveConnection"]
