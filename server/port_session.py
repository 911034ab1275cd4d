"""A live session on this machine's MIDI ports (`improv serve --midi-*`), driven in process.

Light at import (mido and improv.midi only): `improv serve --help` must not load torch; the live
connection is imported when the session opens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mido

from improv.midi import (
    CLOCK_TYPES,
    FORWARDED,
    Backend,
    InputPort,
    OutputPort,
    Player,
    PortError,
    TempoFollower,
    default_backend,
    open_both,
    resolve,
)

if TYPE_CHECKING:
    from .live import LiveConnection
    from .runtime import Runtime

logger = logging.getLogger(__name__)

SERVER_CLIENT = "improv"  # JACK/ALSA client name of the server's virtual ports
SERVER_IN, SERVER_OUT = "improv in", "improv out"


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
        open_both(self.out, self.inp)
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
        from .live import LiveConnection

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
