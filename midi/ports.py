"""MIDI ports by name: resolved (exact, else a unique case-insensitive substring), watched, and
reopened when a port that vanished comes back. The output keeps the set of sounding notes: every
note-on it sends gets a note-off on every exit path (close, vanish, `silence()`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import mido

from .backends import Backend, PortError, close_port, resolve

logger = logging.getLogger(__name__)

WATCH_S = 1.0  # how often a named port is checked for vanishing / coming back
# What a player's input forwards to a session (clock and sysex are handled or dropped here).
FORWARDED = {"note_on", "note_off", "control_change", "program_change"}
CLOCK_TYPES = {"clock", "start", "continue", "stop"}


class _Port:
    """A port by name: opened on `open()`, watched for vanishing, reopened when it comes back.
    A virtual port is ours: it cannot vanish."""

    kind = "port"

    def __init__(
        self, backend: Backend, query: str, virtual: bool = False, client: str | None = None
    ) -> None:
        self.backend = backend
        self.query = query
        self.virtual = virtual
        self.client = client
        self.name: str | None = None
        self._port: Any = None
        self._lock = threading.Lock()
        self.closed = False
        self.on_change: Callable[[bool], None] | None = None  # called with present=False/True

    def _names(self) -> list[str]:
        raise NotImplementedError

    def _open_port(self, name: str) -> Any:
        raise NotImplementedError

    def open(self) -> None:
        with self._lock:
            if self.closed:
                raise PortError(f"{self.kind} {self.query!r} is closed")
            if self.virtual:
                self.name = self.query
            else:
                self.name = resolve(self._names(), self.query, self.kind)
            try:
                self._port = self._open_port(self.name)
            except Exception as e:  # rtmidi raises its own error classes (not OSError)
                raise PortError(f"cannot open MIDI {self.kind} {self.name!r}: {e}") from e
        logger.info("MIDI %s %r open%s", self.kind, self.name, " (virtual)" if self.virtual else "")

    @property
    def present(self) -> bool:
        return self._port is not None

    def check(self) -> None:
        """Notice a vanished port (close it) or a returning one (reopen it)."""
        if self.virtual or self.closed:
            return
        try:
            names = self._names()
        except Exception:  # the MIDI system itself is gone (JACK stopped): treat as vanished
            logger.debug("listing MIDI ports failed", exc_info=True)
            names = []
        if self._port is not None and self.name not in names:
            logger.warning("MIDI %s %r vanished; waiting for it to come back", self.kind, self.name)
            self._lost()
            if self.on_change:
                self.on_change(False)
        elif self._port is None:
            try:
                self.open()
            except PortError:
                return
            logger.warning("MIDI %s %r is back", self.kind, self.name)
            if self.on_change:
                self.on_change(True)

    def _lost(self) -> None:
        with self._lock:
            port, self._port = self._port, None
        if port is not None:
            with contextlib.suppress(Exception):
                close_port(port)

    def close(self) -> None:
        """Close (safe twice); a closed port is not reopened."""
        with self._lock:
            self.closed = True
        self._lost()

    async def watch(self) -> None:
        """Check the port every WATCH_S until closed (a task)."""
        while not self.closed:
            await asyncio.sleep(WATCH_S)
            await asyncio.get_running_loop().run_in_executor(None, self.check)


class OutputPort(_Port):
    """An output that keeps its notes balanced: note-offs for unknown notes are dropped, a
    repeated note-on ends the sounding one first, and `silence()` / `close()` end every
    sounding note. So every note-on sent here is followed by exactly one note-off."""

    kind = "output"

    def __init__(
        self, backend: Backend, query: str, virtual: bool = False, client: str | None = None
    ) -> None:
        super().__init__(backend, query, virtual, client)
        self.sounding: set[tuple[int, int]] = set()  # (channel, note)
        self.counts = {"note_on": 0, "note_off": 0}

    def _names(self) -> list[str]:
        return self.backend.output_names()

    def _open_port(self, name: str) -> Any:
        return self.backend.open_output(name, self.virtual, self.client)

    def send(self, msg: mido.Message | list[int] | bytes) -> None:
        """Validate (mido checks types and ranges) and send, under the port lock."""
        if not isinstance(msg, mido.Message):
            msg = mido.Message.from_bytes(list(msg))
        with self._lock:
            if self.closed:
                return
            if msg.type == "note_on" and msg.velocity > 0:
                key = (msg.channel, msg.note)
                if key in self.sounding:
                    self._raw(mido.Message("note_off", channel=msg.channel, note=msg.note))
                self.sounding.add(key)
            elif msg.type in ("note_on", "note_off"):
                key = (msg.channel, msg.note)
                if key not in self.sounding:
                    return  # nothing to end: keeps on/off counts equal
                self.sounding.discard(key)
                msg = mido.Message("note_off", channel=msg.channel, note=msg.note, velocity=0)
            self._raw(msg)

    def _raw(self, msg: mido.Message) -> None:
        if msg.type in self.counts:
            self.counts[msg.type] += 1
        if self._port is None:  # vanished: the device is gone, nothing sounds on it
            return
        try:
            self._port.send(msg)
        except Exception as e:
            logger.warning("MIDI output %r: send failed (%s)", self.name, e)

    def silence(self) -> None:
        """Note-off for every sounding note (stop, disconnect, error, retract fallback)."""
        with self._lock:
            for ch, note in sorted(self.sounding):
                self._raw(mido.Message("note_off", channel=ch, note=note, velocity=0))
            self.sounding.clear()

    def _lost(self) -> None:
        super()._lost()
        with self._lock:
            self.sounding.clear()  # the device went away with its notes

    def close(self) -> None:
        """Note-offs for what sounds, then close. Safe twice."""
        if not self.closed:
            self.silence()
        super().close()


class InputPort(_Port):
    """An input whose messages are handed to the asyncio loop (rtmidi calls back on its own
    thread) as `on_message(msg, t)`, `t` from `clock()` taken on arrival. It remembers the keys
    held, so a vanished keyboard's held notes can be released (`release_held()`)."""

    kind = "input"

    def __init__(
        self,
        backend: Backend,
        query: str,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[mido.Message, float], None],
        clock: Callable[[], float],
        virtual: bool = False,
        client: str | None = None,
    ) -> None:
        super().__init__(backend, query, virtual, client)
        self.loop = loop
        self.on_message = on_message
        self.clock = clock
        self.held: set[tuple[int, int]] = set()  # loop thread only

    def _names(self) -> list[str]:
        return self.backend.input_names()

    def _open_port(self, name: str) -> Any:
        return self.backend.open_input(name, self.virtual, self.client, self._callback)

    def _callback(self, msg: mido.Message) -> None:  # rtmidi's thread
        t = self.clock()  # stamp now: the loop may be busy for a moment
        try:
            self.loop.call_soon_threadsafe(self._deliver, msg, t)
        except RuntimeError:  # loop closed: shutting down
            pass

    def _deliver(self, msg: mido.Message, t: float) -> None:
        if self.closed:
            return
        if msg.type == "note_on" and msg.velocity > 0:
            self.held.add((msg.channel, msg.note))
        elif msg.type in ("note_on", "note_off"):
            self.held.discard((msg.channel, msg.note))
        self.on_message(msg, t)

    def release_held(self) -> None:
        """Note-offs (to `on_message`) for the keys held: the keyboard went away mid-phrase."""
        t = self.clock()
        for ch, note in sorted(self.held):
            self.on_message(mido.Message("note_off", channel=ch, note=note), t)
        self.held.clear()


def open_both(out: OutputPort, inp: InputPort) -> None:
    """Open an output and an input, or neither (the first error is raised)."""
    try:
        out.open()
        inp.open()
    except Exception:
        out.close()
        inp.close()
        raise


def note_balance(messages: Iterable[mido.Message]) -> tuple[int, int]:
    """(note-ons, note-offs) in a message list; a note-on with velocity 0 is a note-off."""
    on = off = 0
    for m in messages:
        if m.type == "note_on" and m.velocity > 0:
            on += 1
        elif m.type in ("note_on", "note_off"):
            off += 1
    return on, off
