"""The clocks of one live connection: session time (ms since the connection opened, what every
message carries) and the running mode's token time (ticks from the mode's start, `origin`)."""

from __future__ import annotations

import time
from dataclasses import dataclass


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

    def engine_clock(self) -> EngineClock:
        """Token time now (a float tick), for the engine's clock floor. Called on the scheduler
        thread: it reads values copied now, nothing this object may change later."""
        return EngineClock(self.t0, self.origin, self.tick_ms)


@dataclass(frozen=True)
class EngineClock:
    """A mode's token time as a value: it crosses to the live worker process (perf_counter is
    the system's monotonic clock, the same in both)."""

    t0: float  # session time 0 (perf_counter seconds)
    origin: float  # session ms of tick 0
    tick_ms: float

    def __call__(self) -> float:
        return ((time.perf_counter() - self.t0) * 1000.0 - self.origin) / self.tick_ms
