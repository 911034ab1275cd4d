"""improv.midi: MIDI ports shared by the server (`improv serve --midi-*`) and the DAW bridge.

- `backends`: the `Backend` protocol, `MidoBackend` (real ports through mido; python-rtmidi loads
  only when a port is listed or opened) and `MemoryBackend`, the in-memory twin for tests.
- `ports`: `OutputPort` / `InputPort` by name, reopened when a vanished port comes back; the output
  keeps every note balanced.
- `player`: `Player` plays generated events at their session time and honours `retract`.
- `tempo`: `TempoFollower` turns MIDI clock into a tempo and a beat phase.

Imports no torch, and neither the server nor the clients.
"""

from .backends import (
    Backend,
    MemoryBackend,
    MidiUnavailable,
    MidoBackend,
    PortError,
    default_backend,
    list_ports,
    resolve,
)
from .player import Player
from .ports import CLOCK_TYPES, FORWARDED, InputPort, OutputPort, note_balance, open_both
from .tempo import TempoFollower

__all__ = [
    "CLOCK_TYPES",
    "FORWARDED",
    "Backend",
    "InputPort",
    "MidiUnavailable",
    "MemoryBackend",
    "MidoBackend",
    "OutputPort",
    "Player",
    "PortError",
    "TempoFollower",
    "default_backend",
    "list_ports",
    "note_balance",
    "open_both",
    "resolve",
]
