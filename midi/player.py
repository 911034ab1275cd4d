"""`Player`: generated events played on an output at their session time, honouring `retract`."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable

from .ports import OutputPort

logger = logging.getLogger(__name__)


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
