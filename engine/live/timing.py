"""The scheduler's timings that the clock floor reads: a decode step's wall time and how long
an event takes to go out after its floor is checked (scheduler thread only)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

# Clock floor (LiveSession.set_clock): an event is due this long after the floor is checked, plus
# CLOCK_SLACK_S (the send): the EVENT_LEAD_Q quantile of that time as measured over the last
# EVENT_LEAD_N events of every clocked session, and at least CLOCK_STEPS scheduler steps (an EMA
# of their wall time: its VEL and ON are still to draw). The quantile counts what the average
# step misses: a rollback's prefill in the same step, redrawn notes, a PART/PROGRAM pair first.
CLOCK_STEPS = 2
CLOCK_SLACK_S = 0.002
EVENT_LEAD_Q = 0.95
EVENT_LEAD_N = 256
MAX_STEP_S = 0.1  # a longer step counts as this long in the step-time average


class Timing:
    def __init__(self) -> None:
        self.now: Callable[[], float] = time.perf_counter  # the wall clock (tests: a fake)
        self.step_s_ema = 0.0  # wall time of a decode step (moving average)
        self.event_lead_s = 0.0  # the clock floor's event lead (seconds; see EVENT_LEAD_Q)
        self._waits: deque[float] = deque(maxlen=EVENT_LEAD_N)
        self._new = 0

    def lead_s(self) -> float:
        """How far ahead of the clock an event must be placed to go out in time."""
        return max(CLOCK_STEPS * self.step_s_ema, self.event_lead_s) + CLOCK_SLACK_S

    def decode_step(self, seconds: float) -> None:
        """A decode step (no prefill in it) took `seconds`. Each counts at most MAX_STEP_S: the
        clock floor reads this as the time to the next event, and one prefill or stall must not
        hold every session's events back for the many steps the average takes to forget it."""
        self.step_s_ema += 0.1 * (min(seconds, MAX_STEP_S) - self.step_s_ema)

    def event_out(self, wait_s: float) -> None:
        """A clocked session's ON or OFF went out `wait_s` after its clock floor's check."""
        self._waits.append(wait_s)
        self._new += 1
        if self._new >= 16 or len(self._waits) < 16:
            self._new = 0
            self.event_lead_s = float(np.quantile(self._waits, EVENT_LEAD_Q))

    def reset(self) -> None:
        """Forget step and event timings (after a warm-up: first runs are slow, not what the
        clock floor should expect)."""
        self.step_s_ema = self.event_lead_s = 0.0
        self._waits.clear()
        self._new = 0
