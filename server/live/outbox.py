"""The outbox of one live connection: every message it sends goes through here, in send-time
order, on one sender task.

Generated events go out `lookahead_ms` before their time, woken by the runtime's `SendClock`
(asyncio's own timers wake up to 1 ms late) and spun on the loop for the last fraction of a ms.
Nothing enqueued after a retract goes out before it (`raise_floor`): the client would drop it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..runtime import SendClock
from .clock import SessionClock
from .stats import LiveStats

logger = logging.getLogger(__name__)

Send = Callable[[Any], Awaitable[None]]


@dataclass(eq=False)
class Outgoing:
    """One outgoing message, queued until its send time."""

    send_at: float  # session ms
    msg: Any  # a ServerMessage
    time_ms: float | None = None  # generated midi: when it sounds
    at_once: bool = False  # a note-off sent the moment it is decided (stop, interrupt): never late
    sent: bool = False
    cancelled: bool = False
    enqueued: float = 0.0  # session ms


class Outbox:
    def __init__(
        self, clock: SessionClock, send_clock: SendClock, send: Send, stats: LiveStats, name: str
    ) -> None:
        self.clock = clock
        self._send_clock = send_clock
        self._send = send
        self.stats = stats
        self.name = name  # the session id, for the log
        self._heap: list[tuple[float, int, Outgoing]] = []
        self._seq = itertools.count()
        self._floor = -1e18  # no message is sent before the latest retract (session ms)
        self._wake: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    def start(self, on_failure: Callable[[], None]) -> None:
        """Start the sender; `on_failure()` when a send fails (the peer is gone)."""
        self._sender = asyncio.create_task(
            self._send_loop(on_failure), name=f"live-{self.name}-send"
        )

    def put(self, item: Outgoing) -> Outgoing:
        """Queue `item` (never before the latest retract)."""
        item.send_at = max(item.send_at, self._floor)
        item.enqueued = self.clock.now_ms()
        heapq.heappush(self._heap, (item.send_at, next(self._seq), item))
        if self._heap[0][2] is item:
            self._wake_sender()
        return item

    def message(self, msg: Any, send_at: float | None = None) -> Outgoing:
        """A message due now (or at `send_at`)."""
        return self.put(Outgoing(self.clock.now_ms() if send_at is None else send_at, msg))

    def raise_floor(self) -> float:
        """A retract goes out now: everything enqueued from now on goes out after it."""
        self._floor = self.clock.now_ms()
        return self._floor

    def reschedule(self, lookahead_ms: float) -> None:
        """Queued generated events go out `lookahead_ms` before their time, under the current
        value. Events of one time must go out in the order they were made (a note's off after
        its on, an off before the same key's next on): queued under two lookaheads, the one
        made later could go first."""
        for i, (_, seq, e) in enumerate(self._heap):
            if e.time_ms is not None and not e.at_once:
                e.send_at = max(e.time_ms - lookahead_ms, self._floor)
                self._heap[i] = (e.send_at, seq, e)
        heapq.heapify(self._heap)
        self._wake_sender()  # the earliest may be earlier now

    async def flush(self) -> None:
        """Send everything queued now, in order (stop: note-offs must not wait for their
        time). The sender is stopped: what follows goes out with `send_now`."""
        self._stop_sender()
        while self._heap:
            _, _, e = heapq.heappop(self._heap)
            if not e.cancelled:
                await self._deliver(e, self.clock.now_ms())

    async def send_now(self, msg: Any) -> None:
        """Send `msg` at once, past the queue (the last message, after `flush`)."""
        await self._send(msg)

    def close(self) -> None:
        self._stop_sender()
        self._heap.clear()

    # --- the sender task ------------------------------------------------------------------------
    def _stop_sender(self) -> None:
        task, self._sender = self._sender, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _wake_sender(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _send_loop(self, on_failure: Callable[[], None]) -> None:
        try:
            while True:
                if not self._heap:
                    await self._sleep(None)
                    continue
                send_at, _, e = self._heap[0]
                if e.cancelled:
                    heapq.heappop(self._heap)
                    continue
                now = self.clock.now_ms()
                if send_at > now:
                    clock, deadline = self._send_clock, self.clock.deadline(send_at)
                    if deadline - time.perf_counter() > clock.SPIN_S:
                        await self._sleep(deadline - clock.SPIN_S)  # then spin the rest
                    elif not clock.spin_until(deadline):  # over the spin budget
                        await self._sleep(deadline)
                    continue
                heapq.heappop(self._heap)
                await self._deliver(e, now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer is gone or send failed: end the session
            logger.info("session %s: send failed (%s); closing", self.name, exc)
            on_failure()

    async def _sleep(self, deadline: float | None) -> None:
        """Until `deadline` (perf_counter seconds; the runtime's precise clock) or a message
        due earlier (`put` resolves `_wake`)."""
        self._wake = fut = asyncio.get_running_loop().create_future()
        if deadline is not None:
            self._send_clock.wake_at(deadline, fut)
        try:
            await fut
        finally:
            self._wake = None

    async def _deliver(self, e: Outgoing, now: float) -> None:
        e.sent = True
        if e.time_ms is not None and getattr(e.msg, "type", "midi") == "midi":  # not chord/beat
            self.stats.events_sent += 1
            if now > e.time_ms + 0.5 and not e.at_once:  # late (0.5 ms: the clock's rounding)
                self.stats.late_events += 1
                logger.debug(
                    "session %s: late by %.1f ms (queued %.1f ms after its time): %s",
                    self.name, now - e.time_ms, e.enqueued - e.time_ms, e.msg,
                )  # fmt: skip
            if e.send_at > e.enqueued:  # it waited for its send time: the jitter counts
                self.stats.jitter_ms.append(now - e.send_at)
        await self._send(e.msg)
