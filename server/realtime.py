"""Real-time CPU priority for the threads that keep live time: the event loop (it sends every
message), the send clock (it wakes the loop at each send time), and the threads that relay the
worker processes' messages (they hold the GIL the loop waits for, and the garbage collector
runs on whichever thread allocates: one preempted mid-collection stopped the loop for 11 ms).

On a busy 2-core machine a woken thread waits for a core behind the decode workers, the HTTP
worker process and any client on the machine: live sends went out 2-5 ms after their time at
the 99th percentile whatever their nice values. At SCHED_FIFO 1 (the lowest real-time
priority) they take a core the moment they wake, and hold it only for the little they do
(BENCHMARKS.md, "Live capacity"). Threads and processes they start don't inherit it
(SCHED_RESET_ON_FORK). Linux only, and only where allowed (root, CAP_SYS_NICE, or an
RLIMIT_RTPRIO of 1 or more: `docker run --ulimit rtprio=1`, docs/deploy.md); elsewhere the
thread keeps its priority and the server says so once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PRIORITY = 1
_warned = False


@dataclass(frozen=True)
class Previous:
    """A thread's scheduling before `promote` (to put it back)."""

    policy: int
    priority: int


def promote(what: str) -> Previous | None:
    """The calling thread at SCHED_FIFO PRIORITY; None where the OS does not allow it."""
    global _warned
    try:
        before = Previous(os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
        policy = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(PRIORITY))
    except (AttributeError, OSError) as e:  # not Linux, or not allowed
        if not _warned:
            _warned = True
            logger.warning(
                "%s: real-time priority not allowed here (%s); live sends may be later on a "
                "busy machine (docs/deploy.md)",
                what, e,
            )  # fmt: skip
        return None
    logger.info("%s at real-time priority (SCHED_FIFO %d)", what, PRIORITY)
    return before


def restore(previous: Previous | None) -> None:
    """The calling thread back to what `promote` found."""
    if previous is None:
        return
    try:
        os.sched_setscheduler(0, previous.policy, os.sched_param(previous.priority))
    except OSError as e:  # (dropping a priority is always allowed; be quiet if not)
        logger.debug("could not restore the thread's priority: %s", e)
