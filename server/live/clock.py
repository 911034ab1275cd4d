"""The clocks of one live connection: session time (ms since the connection opened, what every
message carries) and the running mode's token time (ticks from the mode's start, `origin`)."""

from __future__ import annotations

import time
from collections.abc import Callable


class SessionClock:
    def __init__(self, tick_ms: float) -> None:
        self.tick_ms = tick_ms
        self.t0 = time.perf_counter()  # session time 0 (perf_counter seconds)
        self.origin = 0.0  # session ms of tick 0 of the running mode's engine session

    def restart(self) -> None:
        """Session time 0 is now (the connection opens)."""
        self.t0 = time.perf_counter()

    def now_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    def deadline(self, ms: float) -> float:
        """Session time `ms` as a perf_counter deadline (seconds)."""
        return self.t0 + ms / 1000.0

    def tick(self, ms: float) -> int:
        """The nearest tick of session time `ms`."""
        return max(0, int(round((ms - self.origin) / self.tick_ms)))

    def tick_at_or_before(self, ms: float) -> int:
        return max(0, int((ms - self.origin) // self.tick_ms))

    def ms(self, tick: int) -> float:
        return self.origin + tick * self.tick_ms

    def engine_clock(self) -> Callable[[], float]:
        """Token time now (a float tick), for the engine's clock floor. Called on the scheduler
        thread: it reads values copied now, nothing this object may change later."""
        t0, origin, tick_ms = self.t0, self.origin, self.tick_ms
        return lambda: ((time.perf_counter() - t0) * 1000.0 - origin) / tick_ms
