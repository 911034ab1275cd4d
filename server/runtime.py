"""What the server holds for its whole life: the engine, the one scheduler, the open sessions.

Created in the app's lifespan (`app.state.runtime`) or directly by an in-process driver (MIDI
ports, tests): `Runtime.load(settings)` ... `runtime.close()`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

from improv.engine.live import SamplingParams, Scheduler, SchedulerFull

from .settings import Settings

if TYPE_CHECKING:
    from improv.engine.engine import Engine
    from improv.engine.live import EventCallback, LiveSession

    from .live import LiveConnection

logger = logging.getLogger(__name__)


class SessionLimit(RuntimeError):
    """No room for another session of this kind."""


class Runtime:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.vocab = engine.vocab
        self.max_sessions = settings.max_sessions
        # One scheduler for everything: live sessions and offline HTTP generations share its
        # batched forward; the extra slots are the HTTP ones, so HTTP never takes a live slot.
        self.scheduler = Scheduler(
            engine, max_sessions=settings.max_sessions + settings.http_sessions
        )
        self.scheduler.start()
        self._lock = threading.Lock()
        self._live = 0
        self._http = 0
        self.connections: set[LiveConnection] = set()

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        import torch

        from improv.engine.engine import Engine

        torch.set_num_threads(settings.threads)
        engine = Engine.load(settings.checkpoint, device=settings.device, backend=settings.backend)
        logger.info(
            "loaded %s (%s, %s): %s",
            settings.checkpoint,
            engine.device,
            settings.backend,
            engine.config,
        )
        return cls(engine, settings)

    def close(self) -> None:
        self.scheduler.stop()

    # --- capacity -----------------------------------------------------------------------------
    def sessions_open(self) -> int:
        return self._live

    def acquire_live(self) -> None:
        with self._lock:
            if self._live >= self.max_sessions:
                raise SessionLimit(
                    f"server full: {self.max_sessions} live sessions (--max-sessions)"
                )
            self._live += 1

    def release_live(self) -> None:
        with self._lock:
            self._live -= 1

    def acquire_http(self) -> None:
        with self._lock:
            if self._http >= self.settings.http_sessions:
                raise SessionLimit(
                    f"busy: {self.settings.http_sessions} generations running; retry shortly"
                )
            self._http += 1

    def release_http(self) -> None:
        with self._lock:
            self._http -= 1

    async def open_session(
        self,
        prompt: list[int],
        constraints: list[Any],
        sampling: SamplingParams,
        on_event: EventCallback,
        allow_end: bool = False,
        wait_s: float = 1.0,
    ) -> LiveSession:
        """An engine session; a slot freed by a close in the same breath is released at the
        scheduler's next step, so wait a little for it rather than failing."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                return self.scheduler.open_session(
                    prompt, constraints, sampling, on_event, allow_end=allow_end
                )
            except SchedulerFull:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.005)

    async def close_connections(self, reason: str) -> None:
        """Server shutdown: every live session sends its note-offs and `stopped`."""
        await asyncio.gather(
            *(c.close(reason) for c in list(self.connections)), return_exceptions=True
        )
