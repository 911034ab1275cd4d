"""Admission for HTTP work: generation slots with a bounded wait queue, and a bound on the
requests being read, parsed and planned before a generation.

`GenerationGate`: at most `slots` generations at once (`--max-generations`); up to `queue` more
requests wait, first come first served, at most `wait_s` each; beyond that (or after the wait)
`Busy`, which the endpoint answers 503 with `Retry-After` (an estimate from the recent
generation times). A request whose client goes away stops waiting (its task is cancelled) and
releases its place. All on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import memory

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """No generation slot within the wait; `retry_after`: seconds to suggest."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Lease:
    """One generation slot; `release()` is safe twice (a stream's end and its cleanup)."""

    def __init__(self, gate: GenerationGate) -> None:
        self._gate: GenerationGate | None = gate
        self._t0 = time.monotonic()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release(time.monotonic() - self._t0)


class GenerationGate:
    def __init__(self, slots: int, queue: int, wait_s: float) -> None:
        self.slots = slots
        self.queue = queue
        self.wait_s = wait_s
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._mean_s = 5.0  # moving average of a generation's time (for Retry-After)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for a request arriving now (1..120)."""
        rounds = math.ceil((len(self._waiters) + 1) / self.slots)
        return int(min(max(math.ceil(self._mean_s * rounds), 1), 120))

    def _busy(self, why: str) -> Busy:
        return Busy(
            f"busy: {self.slots} generations running (--max-generations) and {why}; "
            f"retry in about {self.retry_after()} s",
            self.retry_after(),
        )

    async def acquire(self) -> Lease:
        """A slot: at once, or after waiting in the queue; raises Busy."""
        if self.running < self.slots and not self._waiters:
            self.running += 1
            return Lease(self)
        if len(self._waiters) >= self.queue:
            raise self._busy(f"{self.queue} waiting (the queue is full)")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait({fut}, timeout=self.wait_s)
        except asyncio.CancelledError:  # the client went away while waiting
            if fut.done():
                self._release(None)  # handed a slot in the same breath: pass it on
            else:
                self._waiters.remove(fut)
                fut.cancel()
            raise
        if not fut.done():
            self._waiters.remove(fut)
            fut.cancel()
            raise self._busy(f"no slot came free within {self.wait_s:g} s")
        return Lease(self)

    def _release(self, seconds: float | None) -> None:
        if seconds is not None:
            self._mean_s = 0.8 * self._mean_s + 0.2 * seconds
        while self._waiters:  # hand the slot to the first still waiting
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1


class IntakeLimit:
    """ASGI middleware: at most `n` generation requests are being read, parsed and planned at
    once; the others wait before their body is read (it waits in the socket, costing nothing).

    Reading a multipart body, parsing the MIDI and planning run partly on the event loop and
    partly in threads; twenty at once made every step of the loop (/health, the live sessions)
    wait behind twenty others, and held twenty files' worth of memory. The endpoint calls
    `release_intake(request)` when its job is planned (before it waits for a generation slot);
    the middleware releases on the way out otherwise. A body must arrive within
    BODY_TIMEOUT_S of admission (a client trickling bytes can't hold a place). When a burst is over, the memory its
    files took goes back to the system (server/memory.py)."""

    PATHS = ("/v1/continue", "/v1/infill", "/v1/accompany")
    KEY = "improv.release_intake"
    TRIM_AFTER_S = 1.0
    BODY_TIMEOUT_S = 20.0  # from admission to the body's last byte (4 MiB at 200 KB/s)
    TRIM_EVERY_S = 10.0

    def __init__(self, app: ASGIApp, n: int = 2) -> None:
        self.app = app
        self.n = n
        self._sem: asyncio.Semaphore | None = None
        self._inside = 0
        self._trimmed = -self.TRIM_EVERY_S

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.n)
        sem = self._sem
        self._inside += 1  # waiting, being read, or generating
        try:
            await sem.acquire()
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    sem.release()

            scope[self.KEY] = release
            deadline = asyncio.get_running_loop().time() + self.BODY_TIMEOUT_S

            async def receive_in_time() -> Message:
                """A body that trickles in must not hold a place (slowloris): past the
                deadline the request is treated as abandoned (FastAPI answers 400)."""
                if released:  # planned: what is left is waiting for the client to go
                    return await receive()
                try:
                    async with asyncio.timeout(deadline - asyncio.get_running_loop().time()):
                        return await receive()
                except TimeoutError:
                    logger.info("%s: body not received in %g s", scope["path"], self.BODY_TIMEOUT_S)
                    return {"type": "http.disconnect"}

            try:
                await self.app(scope, receive_in_time, send)
            finally:
                release()
        finally:
            self._inside -= 1
            if self._inside == 0:
                asyncio.get_running_loop().call_later(self.TRIM_AFTER_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        """A second after the last of a burst, if none came since: give the freed memory back
        (malloc_trim locks each arena while it walks it: never while requests are being
        read, at most every TRIM_EVERY_S)."""
        now = time.monotonic()
        if self._inside == 0 and now - self._trimmed >= self.TRIM_EVERY_S:
            self._trimmed = now
            asyncio.get_running_loop().run_in_executor(None, memory.trim)


def release_intake(scope: Scope) -> None:
    """The request is planned: let the next one in (see IntakeLimit)."""
    release = scope.get(IntakeLimit.KEY)
    if release is not None:
        release()
