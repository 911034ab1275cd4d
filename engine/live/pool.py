"""Decode workers: several schedulers, one thread and one decoder (model + KV cache) each; a new
session goes to the least loaded.

A session lives on one worker for its whole life, so sessions that share a worker still share
its batched forward. The forward (onnxruntime, torch) runs without the GIL, so on a machine with
two or more cores the workers decode at the same time; the Python parts of a step (masks,
sampling, the sessions' state) still take turns with each other and with the event loop.
Why workers and not intra-op threads or processes: docs/engine-live.md, "Decode workers".
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from ..constraints import Constraint
from .handle import LiveSession
from .scheduler import EngineLike, Priority, Scheduler
from .types import ClockFn, EventCallback, SamplingParams, SchedulerFull


def auto_workers(max_sessions: int, per_worker: int = 8, cores: int | None = None) -> int:
    """One worker per core this process may run on, but one on more than 2 cores (the event
    loop's: it receives and sends on time, and waits for no decode), while each keeps at least
    `per_worker` sessions to batch.

    On 2 cores both decode: one worker can't take more than one core (~550 tokens per CPU
    second at 16 sessions, below what 16 accompany sessions at 12 events/s ask), and the event
    loop and send clock used 6-9% of a core there (/metrics, improv_process_cpu_seconds_total
    less the workers'); the workers' lower CPU priority (`nice`) hands the loop a core when it
    wakes. On more cores one core left to the loop costs less, and more threads contend for
    the GIL (each worker's Python part is ~25% of its step)."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    return max(1, min(cores if cores <= 2 else cores - 1, max_sessions // per_worker))


class SchedulerPool:
    """`Scheduler`'s session API over `workers` schedulers.

    max_sessions: slots per worker (a runtime that admits N sessions in all gives each worker
    room for its share and some slack: placement is by load, and closes are uneven).
    """

    def __init__(self, engine: EngineLike, workers: int = 1, **kw: Any) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ids = itertools.count()  # session ids unique over the workers
        self.workers = [
            Scheduler(
                engine, name=f"improv-scheduler-{i}" if i else "improv-scheduler", ids=ids, **kw
            )
            for i in range(workers)
        ]
        self._where: weakref.WeakKeyDictionary[LiveSession, int] = weakref.WeakKeyDictionary()
        first = self.workers[0]
        self.vocab = first.vocab
        self.max_len, self.keep_len = first.max_len, first.keep_len

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> SchedulerPool:
        for w in self.workers:
            w.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        for w in self.workers:
            w.stop(timeout)

    def __enter__(self) -> SchedulerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Step every worker until none has anything left (tests, offline use, warm-up)."""
        return sum(w.run_until_idle(max_steps) for w in self.workers)

    def reset_timing(self) -> None:
        for w in self.workers:
            w.reset_timing()

    def warm_up(self, prompt: list[int], tokens: int = 8) -> None:
        """A short generation on each worker before it serves (call before `start`): the
        decoder's first runs (onnxruntime plans its memory per input shape) took ~50-100 ms,
        which the first player's first answer paid. Counters and timing start again after."""
        for w in self.workers:
            s = w.open_session(prompt, sampling=SamplingParams(seed=0))
            s.generate(max_tokens=tokens)
            w.run_until_idle()
            s.close()
            w.run_until_idle()
        self.reset_stats()
        self.reset_timing()  # first runs are slow: not what the clock floor expects

    # --- sessions -----------------------------------------------------------------------------
    def open_session(
        self,
        prompt: Iterable[int],
        constraints: Sequence[Constraint] = (),
        sampling: SamplingParams | None = None,
        on_event: EventCallback | None = None,
        allow_end: bool = False,
        clock: ClockFn | None = None,
        priority: Priority = "live",
    ) -> LiveSession:
        """A new session on the least loaded worker (fewest sessions open; the first on a tie).
        Raises SchedulerFull when every worker is full."""
        prompt = list(prompt)
        for i in sorted(range(len(self.workers)), key=lambda i: self.workers[i].n_open):
            try:
                s = self.workers[i].open_session(
                    prompt, constraints, sampling, on_event, allow_end, clock, priority
                )
            except SchedulerFull:
                continue
            self._where[s] = i
            return s
        raise SchedulerFull(f"all {self.max_sessions} session slots are in use")

    def worker_of(self, session: LiveSession) -> int:
        """The index of the worker a session runs on (diagnostics, tests)."""
        return self._where[session]

    # --- figures ------------------------------------------------------------------------------
    @property
    def max_sessions(self) -> int:
        return sum(w.max_sessions for w in self.workers)

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def n_open(self) -> int:
        return sum(w.n_open for w in self.workers)

    @property
    def steps(self) -> int:
        return sum(w.steps for w in self.workers)

    @property
    def stats(self) -> dict[str, float]:
        """The workers' counters, summed (a copy: `reset_stats` zeroes them)."""
        out: dict[str, float] = {}
        for w in self.workers:
            for k, v in w.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def reset_stats(self) -> None:
        for w in self.workers:
            for k in w.stats:
                w.stats[k] = 0

    def queue_length(self) -> int:
        """Commands queued for the workers, not yet applied."""
        return sum(w.queue_length() for w in self.workers)

    @property
    def event_lead_s(self) -> float:
        return max(w.event_lead_s for w in self.workers)
