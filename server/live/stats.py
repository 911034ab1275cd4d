"""A live connection's counters, reported in `stopped` (diagnostics)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LiveStats:
    events_sent: int = 0
    late_events: int = 0
    retracts: int = 0
    lag_pushes: int = 0  # times the engine's clock floor moved the model's time forward
    lag_ticks: int = 0  # by this many ticks in all
    jitter_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def add_lag(self, lag: dict[str, int]) -> None:
        """An engine session's `lag`, at its close."""
        self.lag_pushes += lag["pushes"]
        self.lag_ticks += lag["ticks"]

    def report(self, tick_ms: float) -> dict[str, float | int]:
        """The counters of `Stopped`."""
        out: dict[str, float | int] = {
            "events_sent": self.events_sent,
            "late_events": self.late_events,
            "retracts": self.retracts,
            "lag_pushes": self.lag_pushes,
            "lag_ms": round(self.lag_ticks * tick_ms, 1),
        }
        if self.jitter_ms:
            q = np.percentile(np.fromiter(self.jitter_ms, float), [50, 99])
            out["jitter_p50_ms"] = round(float(q[0]), 3)
            out["jitter_p99_ms"] = round(float(q[1]), 3)
        return out
