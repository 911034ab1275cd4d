"""MIDI ports for live sessions: server-side ports (`improv serve --midi-*`) and the pieces the
DAW bridge (`improv bridge`) shares with them.

- `MidoBackend` opens real ports through mido; the rtmidi API is chosen the mido way
  (`MIDO_BACKEND=mido.backends.rtmidi/UNIX_JACK` selects JACK). mido loads python-rtmidi only
  when a port is first listed or opened, so the server runs on machines without MIDI.
  `MemoryBackend` is the in-memory twin the unit tests use (ports can vanish and come back).
- `OutputPort` / `InputPort` resolve a name (exact, else a unique case-insensitive substring),
  reopen a port that vanished when it comes back, and the output keeps the set of sounding notes:
  every note-on it sends gets a note-off on every exit path (close, vanish, silence()).
- `Player` plays generated events at their session time and honours `retract`.
- `TempoFollower` turns MIDI clock (24 per quarter note) into a tempo.
- `PortSession` drives a `LiveConnection` in process from an input and an output port.

This module imports no torch: the bridge (a client) uses it too; the server pieces are imported
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import mido

if TYPE_CHECKING:
    from improv.server.live import LiveConnection
    from improv.server.runtime import Runtime

logger = logging.getLogger(__name__)

SERVER_CLIENT = "improv"  # JACK/ALSA client name of the server's virtual ports
SERVER_IN, SERVER_OUT = "improv in", "improv out"
WATCH_S = 1.0  # how often a named port is checked for vanishing / coming back
# What the player's input forwards to a session (clock and sysex are handled or dropped here).
FORWARDED = {"note_on", "note_off", "control_change", "program_change"}
CLOCK_TYPES = {"clock", "start", "continue", "stop"}


class PortError(RuntimeError):
    """A port name matches nothing or several ports, or a port cannot be opened."""


# --- backends ---------------------------------------------------------------------------------
class Backend(Protocol):
    name: str

    def input_names(self) -> list[str]: ...
    def output_names(self) -> list[str]: ...
    def open_input(
        self, name: str, virtual: bool, client: str | None, callback: Callable[[mido.Message], None]
    ) -> Any: ...
    def open_output(self, name: str, virtual: bool, client: str | None) -> Any: ...


class MidoBackend:
    """Real ports through mido (MIDO_BACKEND picks the backend and the rtmidi API)."""

    def __init__(self, name: str | None = None) -> None:
        self._b = mido.Backend(name, load=False)  # None: $MIDO_BACKEND, else mido's default
        self.name = f"{self._b.name}/{self._b.api}" if self._b.api else self._b.name

    def _kw(self, client: str | None, virtual: bool) -> dict[str, Any]:
        # client_name names the JACK/ALSA client of a virtual port ("improv:improv in"); mido
        # makes any port given a client_name virtual, and other backends do not know it.
        return {"client_name": client} if virtual and client and "rtmidi" in self.name else {}

    def input_names(self) -> list[str]:
        return list(self._b.get_input_names())

    def output_names(self) -> list[str]:
        return list(self._b.get_output_names())

    def open_input(
        self, name: str, virtual: bool, client: str | None, callback: Callable[[mido.Message], None]
    ) -> Any:
        return self._b.open_input(
            name, virtual=virtual, callback=callback, **self._kw(client, virtual)
        )

    def open_output(self, name: str, virtual: bool, client: str | None) -> Any:
        return self._b.open_output(name, virtual=virtual, **self._kw(client, virtual))


class MemoryBackend:
    """In-memory ports for tests. `outputs[name]` collects what was sent to an output port;
    `play(name, msg)` delivers a message to the input port of that name (as rtmidi would, on
    another thread if asked); `vanish(name)` / `restore(name)` simulate a device unplugged."""

    name = "memory"

    def __init__(self, inputs: Iterable[str] = (), outputs: Iterable[str] = ()) -> None:
        self.available_in = list(inputs)
        self.available_out = list(outputs)
        self.sent: dict[str, list[mido.Message]] = {n: [] for n in self.available_out}
        self._callbacks: dict[str, Callable[[mido.Message], None]] = {}
        self.lock = threading.Lock()

    def input_names(self) -> list[str]:
        return list(self.available_in)

    def output_names(self) -> list[str]:
        return list(self.available_out)

    def open_input(
        self, name: str, virtual: bool, client: str | None, callback: Callable[[mido.Message], None]
    ) -> Any:
        if virtual:
            self.available_in.append(name)
        elif name not in self.available_in:
            raise OSError(f"unknown port {name!r}")
        self._callbacks[name] = callback
        backend = self

        class _In:
            closed = False

            def close(self) -> None:
                self.closed = True
                backend._callbacks.pop(name, None)

        return _In()

    def open_output(self, name: str, virtual: bool, client: str | None) -> Any:
        if virtual:
            self.available_out.append(name)
        elif name not in self.available_out:
            raise OSError(f"unknown port {name!r}")
        log = self.sent.setdefault(name, [])
        backend = self

        class _Out:
            closed = False

            def send(self, msg: mido.Message) -> None:
                if name in backend.available_out:  # a vanished device receives nothing
                    with backend.lock:
                        log.append(msg)

            def close(self) -> None:
                self.closed = True

        return _Out()

    def play(self, name: str, msg: mido.Message, thread: bool = False) -> None:
        cb = self._callbacks.get(name)
        if cb is None:
            raise OSError(f"input {name!r} is not open")
        if thread:  # like rtmidi: the callback runs on a foreign thread
            t = threading.Thread(target=cb, args=(msg,))
            t.start()
            t.join()
        else:
            cb(msg)

    def vanish(self, name: str) -> None:
        for names in (self.available_in, self.available_out):
            if name in names:
                names.remove(name)

    def restore(self, name: str, output: bool) -> None:
        (self.available_out if output else self.available_in).append(name)


def default_backend() -> Backend:
    return MidoBackend()


def resolve(names: list[str], query: str, kind: str) -> str:
    """The one port `query` names: an exact name, else a unique case-insensitive substring."""
    if query in names:
        return query
    hits = [n for n in names if query.lower() in n.lower()]
    if len(hits) == 1:
        return hits[0]
    available = ", ".join(repr(n) for n in names) or "none"
    if not hits:
        raise PortError(f"no MIDI {kind} matches {query!r}; available: {available}")
    raise PortError(
        f"MIDI {kind} {query!r} matches {len(hits)} ports: "
        f"{', '.join(repr(n) for n in hits)}; give more of the name"
    )


def list_ports(backend: Backend | None = None) -> tuple[list[str], list[str]]:
    """(inputs, outputs) as the backend names them."""
    b = backend or default_backend()
    return b.input_names(), b.output_names()


# --- ports ---------------------------------------------------------------------------------------
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
                port.close()

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


# --- playing generated events ---------------------------------------------------------------------
class Player:
    """Generated events on an output, each at its session time (`now()` = the session clock as
    seen here); late ones play at once. `retract(after)` drops queued events later than
    `after`; the server then sends note-offs for notes sounding, and `silence()` (on stop,
    drop, error) ends whatever still sounds."""

    def __init__(self, out: OutputPort, now: Callable[[], float]) -> None:
        self.out = out
        self.now = now
        self._heap: list[tuple[float, int, list[int]]] = []
        self._seq = itertools.count()
        self._wake: asyncio.Event = asyncio.Event()
        self.played = 0
        self.late_ms: deque[float] = deque(maxlen=1000)

    def push(self, data: list[int], time_ms: float) -> None:
        heapq.heappush(self._heap, (time_ms, next(self._seq), list(data)))
        self._wake.set()

    def retract(self, after: float) -> None:
        kept = [e for e in self._heap if e[0] <= after]
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept
        self._wake.set()

    def pending(self) -> int:
        return len(self._heap)

    def silence(self) -> None:
        self._heap.clear()
        self.out.silence()

    def play_due(self) -> float | None:
        """Play everything due; return ms until the next event (None: queue empty)."""
        now = self.now()
        while self._heap and self._heap[0][0] <= now:
            t, _, data = heapq.heappop(self._heap)
            self.late_ms.append(now - t)
            try:
                self.out.send(data)
            except (ValueError, TypeError) as e:
                logger.warning("dropped bad generated event %s: %s", data, e)
            self.played += 1
        return None if not self._heap else self._heap[0][0] - now

    async def run(self) -> None:
        """Play events at their times until cancelled (a task)."""
        while True:
            wait = self.play_due()
            self._wake.clear()
            if wait is None:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait / 1000.0)


class TempoFollower:
    """MIDI clock (0xF8, 24 per quarter note) -> tempo and beat phase.

    `on_tempo(bpm, beat_ms)` is called when the tempo has moved by `min_change` bpm (at most
    every `min_interval_ms`), and on every `report_beats`-th beat to re-anchor the grid.
    `beat_ms` is the time of the latest beat, known only after a start (0xFA: the first clock
    that follows is beat 1); None after a continue (the song position is not tracked) or a stop,
    which keeps the last tempo but ends the grid: nobody keeps time then."""

    def __init__(
        self,
        on_tempo: Callable[[float, float | None], None],
        min_change: float = 0.5,
        min_interval_ms: float = 250.0,
        window: int = 24,
        report_beats: int = 4,
    ) -> None:
        self.on_tempo = on_tempo
        self.min_change = min_change
        self.min_interval_ms = min_interval_ms
        self.report_beats = report_beats
        self.ticks: deque[float] = deque(maxlen=window + 1)
        self.bpm: float | None = None  # last reported
        self.beat_ms: float | None = None  # the latest beat, when the phase is known
        self.running = False
        self._count: int | None = None  # clocks since start (None: phase unknown)
        self._last_report = -1e18
        self._phase_sent = False  # a report carried the current beat phase

    def feed(self, kind: str, t_ms: float) -> None:
        if kind in ("start", "continue"):
            self.running = True
            self.ticks.clear()
            self._count = -1 if kind == "start" else None
            self.beat_ms = None
        elif kind == "stop":
            self.running = False
            self.ticks.clear()
            self._count = None
            if self.beat_ms is not None:
                self.beat_ms = None
                if self.bpm is not None:
                    self._report(self.bpm, t_ms)
        elif kind == "clock":
            self.ticks.append(t_ms)
            anchor = False
            if self._count is not None:
                self._count += 1
                if self._count % 24 == 0:
                    self.beat_ms = t_ms
                    beat = self._count // 24
                    anchor = not self._phase_sent or beat % self.report_beats == 0
            if len(self.ticks) < 7:  # a quarter of a beat: enough for a first estimate
                return
            span = self.ticks[-1] - self.ticks[0]
            if span <= 0:
                return
            bpm = 60_000.0 / (span / (len(self.ticks) - 1) * 24)
            bpm = min(300.0, max(20.0, round(bpm, 1)))  # the protocol's range
            moved = self.bpm is None or abs(bpm - self.bpm) >= self.min_change
            if moved and t_ms - self._last_report >= self.min_interval_ms:
                self._report(bpm, t_ms)
            elif self.beat_ms is not None and (anchor or not self._phase_sent):
                self._report(self.bpm if self.bpm is not None else bpm, t_ms)

    def _report(self, bpm: float, t_ms: float) -> None:
        self.bpm = bpm
        self._last_report = t_ms
        self._phase_sent = self.beat_ms is not None
        self.on_tempo(bpm, self.beat_ms)


# --- server-side session ----------------------------------------------------------------------
@dataclass
class MidiConfig:
    """What `improv serve --midi-*` asked for."""

    midi_in: str | None = None
    midi_out: str | None = None
    virtual: bool = False
    start: dict[str, Any] = field(default_factory=lambda: {"mode": "respond"})

    def check(self) -> None:
        if self.virtual and (self.midi_in or self.midi_out):
            raise PortError("use either --midi-virtual or --midi-in/--midi-out, not both")
        if not self.virtual and not (self.midi_in and self.midi_out):
            raise PortError("--midi-in and --midi-out go together (or use --midi-virtual)")


class PortSession:
    """A live session on MIDI ports, driven in process: the player's input goes to a
    `LiveConnection`, its generated events to the output at their times. The session is
    reopened if it ends on its own (an error); ports that vanish are reopened when back."""

    def __init__(
        self, runtime: Runtime, config: MidiConfig, backend: Backend | None = None
    ) -> None:
        config.check()
        self.rt = runtime
        self.config = config
        self.backend = backend or default_backend()
        self.conn: LiveConnection | None = None
        self.out: OutputPort | None = None
        self.inp: InputPort | None = None
        self.player: Player | None = None
        self.tempo = TempoFollower(self._on_tempo)
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        self.started = asyncio.Event()
        self.sessions = 0

    def _clock(self) -> float:
        conn = self.conn
        return conn.now_ms() if conn is not None else 0.0

    async def open(self) -> None:
        """Open the ports (PortError if a name is wrong) and start the session."""
        c, loop = self.config, asyncio.get_running_loop()
        self.out = OutputPort(
            self.backend, SERVER_OUT if c.virtual else c.midi_out or "", c.virtual, SERVER_CLIENT
        )
        self.inp = InputPort(
            self.backend,
            SERVER_IN if c.virtual else c.midi_in or "",
            loop,
            self._on_input,
            self._clock,
            c.virtual,
            SERVER_CLIENT,
        )
        try:
            self.out.open()
            self.inp.open()
        except PortError:
            self.out.close()
            self.inp.close()
            raise
        self.inp.on_change = self._input_changed
        self.player = Player(self.out, self._clock)
        await self._open_connection()
        self._tasks = [
            asyncio.create_task(self.player.run(), name="midi-player"),
            asyncio.create_task(self._pump(), name="midi-in"),
            asyncio.create_task(self._supervise(), name="midi-session"),
            asyncio.create_task(self.out.watch(), name="midi-out-watch"),
            asyncio.create_task(self.inp.watch(), name="midi-in-watch"),
        ]

    async def _open_connection(self) -> None:
        from improv.server.live import LiveConnection

        start = {"type": "start", "lookahead_ms": 0, **self.config.start}
        if self.tempo.bpm is not None:
            start["tempo_bpm"] = self.tempo.bpm
            start["beat_time"] = self.tempo.beat_ms
        self.conn = LiveConnection(self.rt, self._send, session_id=f"midi-{self.sessions}")
        self.sessions += 1
        await self.conn.open()
        await self.conn.handle(start)

    async def _send(self, msg: Any) -> None:
        """The session's messages (awaited in time order by its sender)."""
        assert self.player is not None
        if msg.type == "midi":
            self.player.push(msg.data, msg.time)
            self.player.play_due()  # lookahead 0: it is due now; don't wait for the task
        elif msg.type == "retract":
            self.player.retract(msg.after)
        elif msg.type == "started":
            logger.info("MIDI session %s: %s %s", msg.session, msg.mode, msg.params)
            self.started.set()
        elif msg.type == "error":
            logger.warning("MIDI session: %s: %s", msg.code, msg.message)
        elif msg.type == "stopped":
            logger.info("MIDI session stopped (%s)", msg.reason)

    def _on_input(self, msg: mido.Message, t: float) -> None:
        if msg.type in CLOCK_TYPES:
            self.tempo.feed(msg.type, t)
        elif msg.type in FORWARDED:
            self._inbox.put_nowait({"type": "midi", "data": msg.bytes(), "time": t})

    def _on_tempo(self, bpm: float, beat_ms: float | None) -> None:
        logger.debug("MIDI clock: %.1f bpm, beat at %s ms", bpm, beat_ms)
        self._inbox.put_nowait({"type": "params", "tempo_bpm": bpm, "beat_time": beat_ms})

    def _input_changed(self, present: bool) -> None:
        if not present and self.inp is not None:
            self.inp.release_held()  # a respond session would otherwise wait for key-ups

    async def _pump(self) -> None:
        """Input messages to the session, one at a time, in arrival order."""
        while True:
            m = await self._inbox.get()
            conn = self.conn
            if conn is not None and not conn.closed:
                await conn.handle(m)

    async def _supervise(self) -> None:
        while not self._closing:
            assert self.conn is not None
            await self.conn.wait_closed()
            if self._closing or self.conn.close_reason == "shutdown":
                return
            logger.warning("MIDI session ended (%s); starting a new one", self.conn.close_reason)
            assert self.player is not None
            self.player.silence()
            await asyncio.sleep(1.0)
            if not self._closing:
                await self._open_connection()

    async def close(self) -> None:
        """End the session (its note-offs), then silence and close the ports. Safe twice."""
        if self._closing:
            return
        self._closing = True
        if self.conn is not None:
            await self.conn.close("stop")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.player is not None:
            self.player.play_due()  # the session's final note-offs, due now
            self.player.silence()
        if self.inp is not None:
            self.inp.close()
        if self.out is not None:
            self.out.close()


def check_ports(config: MidiConfig, backend: Backend | None = None) -> None:
    """Fail early, with the available names, before the server loads the model."""
    config.check()
    if config.virtual:
        return
    b = backend or default_backend()
    resolve(b.input_names(), config.midi_in or "", "input")
    resolve(b.output_names(), config.midi_out or "", "output")


def attach_midi(app: Any, config: MidiConfig, backend: Backend | None = None) -> None:
    """Run a `PortSession` for the app's lifetime (inside its lifespan, on its runtime)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            session = PortSession(a.state.runtime, config, backend)
            await session.open()
            a.state.midi_session = session
            try:
                yield state
            finally:
                await session.close()

    app.router.lifespan_context = lifespan


def note_balance(messages: Iterable[mido.Message]) -> tuple[int, int]:
    """(note-ons, note-offs) in a message list; a note-on with velocity 0 is a note-off."""
    on = off = 0
    for m in messages:
        if m.type == "note_on" and m.velocity > 0:
            on += 1
        elif m.type in ("note_on", "note_off"):
            off += 1
    return on, off


def monotonic_ms() -> float:
    return time.perf_counter() * 1000.0


# --- improv serve --midi-* ----------------------------------------------------------------------
def add_midi_arguments(parser: argparse.ArgumentParser) -> None:
    """The --midi-* options of `improv serve` (and --mode / --temperature / --param for the
    session on those ports)."""
    from improv.clients.cli import add_live_arguments

    g = parser.add_argument_group("MIDI ports (a live session on this machine's ports)")
    g.add_argument("--midi-in", metavar="NAME", help="input port to play from (substring)")
    g.add_argument("--midi-out", metavar="NAME", help="output port for the model (substring)")
    g.add_argument(
        "--midi-virtual",
        action="store_true",
        help=f"create ports {SERVER_IN!r} / {SERVER_OUT!r} for other software to connect to",
    )
    add_live_arguments(g)


def setup_midi(app: Any, args: argparse.Namespace) -> int | None:
    """Attach a port session when --midi-* was given; an exit code if the ports are wrong."""
    if not (getattr(args, "midi_in", None) or getattr(args, "midi_out", None)) and not getattr(
        args, "midi_virtual", False
    ):
        return None
    from improv.clients.cli import live_start

    try:
        config = MidiConfig(args.midi_in, args.midi_out, args.midi_virtual, live_start(args))
        check_ports(config)
    except (PortError, ValueError) as e:
        logger.error("%s", e)
        return 2
    except Exception as e:  # no rtmidi / no ALSA or JACK on this machine
        logger.error("MIDI is unavailable here (%s): %s", MidoBackend().name, e)
        return 2
    attach_midi(app, config)
    return None
