"""One `LiveConnection` per live session: it parses the client's messages, dispatches them to the
running mode, and cleans up.

The connection owns everything the session allocated (its runtime slot, the outbox and its
sender task, the running mode with its engine session and timers, the generated notes) and
releases it in `close()`, whose `finally` every exit path reaches: every generated note gets its
note-off. It is transport-free: it takes an async `send(ServerMessage)` and exposes
`handle(message)`; the WebSocket endpoint (http.py) and the MIDI-port session are thin adapters.
Protocol: docs/protocol.md. Engine contract: docs/engine-live.md. Layers and threads:
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from typing import Any

from pydantic import ValidationError

from improv.engine.tokenizer.vocab import Vocab
from improv.protocol import messages as p

from ..runtime import Runtime, SessionLimit
from . import harmony
from .accompany import Accompany
from .clock import SessionClock
from .mode import Mode, ModeContext
from .outbox import Outbox, Send
from .playback import Playback
from .respond import Respond
from .stats import LiveStats

logger = logging.getLogger(__name__)

MAX_ERRORS_PER_S = 20  # error replies per second; more bad frames are dropped (no amplification)
MAX_JSON_DEPTH = 900  # json's C decoder gives up (RecursionError) near the interpreter's limit
LOG_EVERY_S = 10.0  # tracebacks of failed messages and counts of dropped errors, at most this often
MODES: dict[str, type[Mode]] = {"respond": Respond, "accompany": Accompany}
CLIENT_MESSAGES = (p.Start, p.Params, p.Ping, p.ClientMidi, p.Trigger, p.Stop)  # p.ClientMessage


class LiveConnection:
    """A live session. `await open()`, `await handle(msg)` per client message, `await close()`."""

    def __init__(self, runtime: Runtime, send: Send, session_id: str | None = None) -> None:
        self.rt = runtime
        self.vocab: Vocab = runtime.vocab
        self.id = session_id or uuid.uuid4().hex[:12]
        self.clock = SessionClock(self.vocab.config.tick_ms)
        self.stats = LiveStats()
        self.outbox = Outbox(self.clock, runtime.clock, send, self.stats, self.id)
        self.playback = Playback(self.vocab, self.clock, self.outbox, self.stats)
        self.active: Mode | None = None  # the running mode (None before `start`)
        self.close_reason: str | None = None
        self._closed = asyncio.Event()
        self._closing = False
        self._acquired = False
        self._errors: deque[float] = deque()
        self._dropped_errors = 0
        self._last_drop_log = -LOG_EVERY_S
        self._last_failure_log = -LOG_EVERY_S
        self._failures_unlogged = 0

    def now_ms(self) -> float:
        """The session clock (ms since `open`)."""
        return self.clock.now_ms()

    @property
    def mode(self) -> str | None:
        """The running mode's name (None before `start`, after `stop`)."""
        return self.active.name if self.active is not None else None

    @property
    def params(self) -> p.LiveParams:
        """The running mode's parameters."""
        return self.active.params if self.active is not None else p.LiveParams()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # --- lifecycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        """Take a session slot (raises SessionLimit), start the clock and the sender."""
        self.rt.acquire_live()
        self._acquired = True
        self.clock.restart()
        loop = asyncio.get_running_loop()
        self.outbox.start(on_failure=lambda: loop.create_task(self.close("disconnect")))
        self.rt.connections.add(self)
        logger.info("live session %s opened (%d open)", self.id, self.rt.sessions_open())

    async def close(self, reason: str = "stop") -> None:
        """End the session: note-offs for every generated note sounding, `stopped` (unless the
        peer is gone), free everything. Safe to call twice and from any exit path."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.close_reason = reason
        try:
            self._end_mode(self.now_ms())
            if reason != "disconnect":
                await self.outbox.flush()
                stats = self.stats.report(self.vocab.config.tick_ms)
                await self.outbox.send_now(p.Stopped(reason=reason, **stats))
        except Exception:  # the peer may be gone mid-flush; cleanup goes on regardless
            logger.debug("session %s: flush on close failed", self.id, exc_info=True)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        self.outbox.close()
        if self.active is not None:  # _end_mode failed half way
            self.active.release()
        self.rt.connections.discard(self)
        if self._acquired:
            self._acquired = False
            self.rt.release_live()
        self._closed.set()
        st = self.stats
        logger.info(
            "live session %s closed (%s): %d events, %d late, %d retracts",
            self.id, self.close_reason, st.events_sent, st.late_events, st.retracts,
        )  # fmt: skip

    def _end_mode(self, now: float) -> None:
        mode, self.active = self.active, None
        if mode is not None:
            try:
                mode.end(now)
            finally:
                mode.release()

    # --- client messages --------------------------------------------------------------------------
    async def handle(self, message: Any) -> None:
        """One client message: a protocol model, a dict or a JSON text. Never raises for bad
        input: answers with an `error` message."""
        if self._closing:
            return
        if isinstance(message, str | bytes):
            if len(message) > p.MAX_FRAME_BYTES:
                self.error(
                    "too_large", f"frame of {len(message)} bytes; at most {p.MAX_FRAME_BYTES}"
                )
                return
            try:
                message = json.loads(message)
            except RecursionError:  # "[[[[..." under the size limit: the decoder's stack
                self.error("bad_json", f"JSON nested too deeply: at most {MAX_JSON_DEPTH} levels")
                return
            except ValueError as e:
                self.error("bad_json", f"not JSON: {e}")
                return
        if isinstance(message, dict):
            try:
                message = p.client_adapter.validate_python(message)
            except (ValidationError, RecursionError) as e:
                why = p.explain(e) if isinstance(e, ValidationError) else "nested too deeply"
                self.error("bad_message", why)
                return
        elif not isinstance(message, CLIENT_MESSAGES):  # 1, null, [], "text": not a message
            self.error(
                "bad_message",
                f"a frame is one JSON object with a 'type' (got {type(message).__name__})",
            )
            return
        try:
            await self._dispatch(message)
        except SessionLimit as e:
            self.error("internal", str(e))
        except Exception:
            self._log_failure(getattr(message, "type", "?"))
            self.error("internal", "the server failed on this message; the session goes on")

    def _log_failure(self, what: str) -> None:
        """The traceback of a failed message, at most once every LOG_EVERY_S (a client
        repeating a failing frame must not flood the log); the ones left out are counted."""
        now = time.monotonic()
        if now - self._last_failure_log < LOG_EVERY_S:
            self._failures_unlogged += 1
            return
        self._last_failure_log, skipped, self._failures_unlogged = now, self._failures_unlogged, 0
        logger.exception("session %s: failed on %s (%d more not logged)", self.id, what, skipped)

    async def _dispatch(self, m: Any) -> None:
        if isinstance(m, p.Ping):
            now = self.now_ms()
            self.outbox.message(p.Pong(time=m.time, server_time=now), now)
        elif isinstance(m, p.Start):
            await self._start(m)
        elif isinstance(m, p.Stop):
            await self.close("stop")
        elif self.active is None:
            self.error("not_started", f"send start first (got {m.type})")
        elif isinstance(m, p.ClientMidi):
            self.active.player_midi(m)
        elif isinstance(m, p.Trigger):
            self.active.trigger()
        elif isinstance(m, p.Params):
            await self.active.update_params(m)
        else:  # pragma: no cover - the union is closed
            self.error("bad_message", f"unexpected {m.type}")

    async def _start(self, m: p.Start) -> None:
        """Start a mode; a running one ends first (all its notes off); the clock goes on."""
        params = p.LiveParams.model_validate(m.model_dump(exclude={"type", "mode"}))
        if (err := harmony.check(params)) is not None:
            self.error("bad_message", err)  # the running mode goes on
            return
        now = self.now_ms()
        self._end_mode(now)
        ctx = ModeContext(self.rt, self.clock, self.playback, self.stats, self.error, self.id)
        self.active = mode = MODES[m.mode](ctx, params)
        await mode.open(now)
        self.outbox.message(
            p.Started(
                session=self.id,
                mode=mode.name,
                params=params,
                server_time=now,
                harmony=self.vocab.harmony,
            ),
            now,
        )

    def error(self, code: str, message: str) -> None:
        """An `error` reply, at most MAX_ERRORS_PER_S a second (more bad frames are dropped)."""
        now = time.monotonic()
        while self._errors and now - self._errors[0] > 1.0:
            self._errors.popleft()
        if len(self._errors) >= MAX_ERRORS_PER_S:
            self._dropped_errors += 1
            if now - self._last_drop_log >= LOG_EVERY_S:
                self._last_drop_log = now
                logger.warning("session %s: bad frames dropped (%d)", self.id, self._dropped_errors)
            return
        self._errors.append(now)
        self.outbox.message(p.ErrorMessage(code=code, message=message), self.now_ms())
