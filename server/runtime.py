"""What the server holds for its whole life: the engine, the decode workers, the open sessions.

Created in the app's lifespan (`app.state.runtime`) or directly by an in-process driver (MIDI
ports, tests): `Runtime.load(settings)` ... `runtime.close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from improv.engine.live import SamplingParams, SchedulerFull
from improv.engine.live.pool import SchedulerPool
from improv.engine.live.scheduler import Priority, lower_thread_priority

from . import realtime
from .job_process import ProcessJobs
from .jobs import Jobs, LocalJobs
from .live_process import ProcessScheduler, pool_for
from .settings import Settings

if TYPE_CHECKING:
    from improv.engine.engine import Engine
    from improv.engine.live import EventCallback, LiveSession

    from .live import LiveConnection

logger = logging.getLogger(__name__)

JOBS_START_S = 60.0  # Runtime.load waits this long for the generation worker process


class SessionLimit(RuntimeError):
    """No room for another session of this kind."""


class SendClock:
    """Wakes asyncio waiters at a `time.perf_counter()` deadline, within ~0.1 ms.

    asyncio's own timers wake up to 1 ms late (the selector's timeout is whole milliseconds,
    rounded up), which is most of the live sessions' send jitter. One thread for every session
    sleeps on a condition variable (nanosecond timeout) until the earliest deadline and resolves
    that waiter's future through `call_soon_threadsafe`, which wakes the loop at once.
    """

    # The last stretch before a deadline is spun on the loop (see `spin_until`), at most this
    # long per wait and this share of the loop's time: a wake through the thread and the loop's
    # self-pipe lands ~0.3 ms late, and later when the loop or the GIL is busy then.
    SPIN_S = 0.0006
    SPIN_BUDGET = 0.02  # of each second

    def __init__(self, realtime: bool = False) -> None:
        self._realtime = realtime  # its thread at real-time priority (server/realtime.py)
        self._spent = 0.0  # spin seconds in the current second
        self._second = 0.0
        self._heap: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="improv-send-clock", daemon=True)
        self._thread.start()

    def wake_at(self, deadline: float, fut: asyncio.Future[None]) -> None:
        """Resolve `fut` (of the running loop) at `deadline` (perf_counter seconds), unless it
        is done by then."""
        loop = asyncio.get_running_loop()
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), loop, fut))
            if self._heap[0][3] is fut:
                self._cond.notify()

    def spin_until(self, deadline: float) -> bool:
        """Busy-wait on the calling (loop) thread until `deadline` (perf_counter seconds), if it
        is at most SPIN_S away and the spin budget allows; False: wait with `wake_at`."""
        now = time.perf_counter()
        if now - self._second >= 1.0:
            self._second, self._spent = now, 0.0
        wait = deadline - now
        if wait > self.SPIN_S or self._spent + wait > self.SPIN_BUDGET:
            return False
        while time.perf_counter() < deadline:
            pass
        self._spent += wait
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(1.0)

    def _run(self) -> None:
        if self._realtime:
            realtime.promote("the send clock")
        while True:
            with self._cond:
                while not self._stop:
                    if self._heap:
                        wait = self._heap[0][0] - time.perf_counter()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._stop:
                    return
                _, _, loop, fut = heapq.heappop(self._heap)
            if not fut.done():
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # the loop is closed: its session is gone
                    pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Connections(set["LiveConnection"]):
    """The live connections open, and the counters of those closed since the start (`/metrics`:
    a connection's `LiveStats` are added up when it leaves)."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = [0, 0, 0]  # events sent, late events, retracts

    def discard(self, conn: LiveConnection) -> None:
        if conn in self:
            st = conn.stats
            for i, n in enumerate((st.events_sent, st.late_events, st.retracts)):
                self._closed[i] += n
        super().discard(conn)

    def totals(self) -> tuple[int, int, int]:
        """(events sent, late events, retracts) over every connection, open or closed."""
        out = list(self._closed)
        for c in self:
            st = c.stats
            out[0] += st.events_sent
            out[1] += st.late_events
            out[2] += st.retracts
        return out[0], out[1], out[2]


class Runtime:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.vocab = engine.vocab
        self.chord_planner, self.chord_follower = engine.chord_planner, engine.chord_follower
        self.max_sessions = settings.max_sessions
        # Decode workers (one scheduler thread each; docs/engine-live.md, "Decode workers"), in
        # a worker process of their own (server/live_process.py: this process keeps its GIL
        # for the event loop and the send clock) or here. With `http_worker="thread"`, live
        # sessions and offline HTTP generations share a worker's batched forward, live ones
        # first, and each worker has room for its share of the live sessions and all the HTTP
        # ones, so HTTP never takes a live slot. A session goes to the least loaded worker.
        in_process = settings.http_worker == "thread"
        self.scheduler: SchedulerPool | ProcessScheduler
        if settings.live_worker == "process":
            self.scheduler = ProcessScheduler(settings, engine.vocab)
        else:
            self.scheduler = pool_for(settings, engine)
            v = self.vocab
            self.scheduler.warm_up([v.BOS, v.TASK_CONTINUE])
        # HTTP generations (server/jobs.py): in a worker process of their own, or here, their
        # CPU work (parse the file, plan, write the MIDI back) in threads as low in priority as
        # the decode workers' (the default executor's threads competed with the event loop).
        self.jobs: Jobs
        if in_process:
            pool = ThreadPoolExecutor(
                max_workers=max(2, settings.http_sessions),
                thread_name_prefix="improv-offline",
                initializer=lower_thread_priority if settings.decode_nice else None,
                initargs=(settings.decode_nice,) if settings.decode_nice else (),
            )
            self.jobs = LocalJobs(
                self, settings, pool, lambda: self.scheduler.stats["batch_tokens"]
            )
        else:
            self.jobs = ProcessJobs(settings)
        self.scheduler.start()
        self.clock = SendClock(realtime=settings.realtime)
        self._lock = threading.Lock()
        self._live = 0
        self._http = 0
        self.connections = Connections()
        # More `/metrics` figures: name -> (type, help, fn) (server/metrics.py). The HTTP
        # request queue registers its length here, e.g.
        # rt.extra_metrics["improv_http_queue_length"] = ("gauge", "...", queue.qsize)
        self.extra_metrics: dict[str, tuple[str, str, Callable[[], float]]] = {}

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        import torch

        from improv.engine.engine import Engine

        torch.set_num_threads(settings.threads)
        engine = Engine.load(settings.checkpoint, device=settings.device, backend=settings.backend)
        # Everything loaded so far (torch, the app, the model) lives as long as the process: keep
        # the collector from scanning it again (a full collection of it took 230-390 ms, with
        # every thread stopped, in the middle of live sessions).
        gc.collect()
        gc.freeze()
        # The scheduler thread and the event loop share the GIL: a thread that wants it waits at
        # most this long for one holding it in Python code (default 5 ms).
        sys.setswitchinterval(settings.switch_interval_ms / 1000.0)
        logger.info(
            "loaded %s (%s, %s): %s",
            settings.checkpoint,
            engine.device,
            engine.backend,
            engine.config,
        )
        rt = cls(engine, settings)
        if isinstance(rt.scheduler, ProcessScheduler):
            rt.scheduler.wait_ready()
        logger.info("%d decode worker(s)", rt.scheduler.n_workers)
        # Ready means ready for file requests too (a balancer's readiness probe is /health):
        # the generation worker process loads the model beside this one's warm-up.
        if isinstance(rt.jobs, ProcessJobs) and not rt.jobs.ready.wait(JOBS_START_S):
            logger.warning(
                "the generation worker process is not ready after %.0f s; HTTP generations "
                "wait for it",
                JOBS_START_S,
            )
        return rt

    def close(self) -> None:
        self.jobs.close()
        self.scheduler.stop()
        self.clock.close()

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
        priority: Priority = "live",
    ) -> LiveSession:
        """An engine session; a slot freed by a close in the same breath is released at the
        scheduler's next step, so wait a little for it rather than failing."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                return self.scheduler.open_session(
                    prompt, constraints, sampling, on_event, allow_end=allow_end, priority=priority
                )
            except SchedulerFull:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.005)

    async def session_tokens(self, s: LiveSession) -> list[int]:
        """An engine session's tokens from its window start (`LiveSession.tokens`, wherever
        its scheduler runs)."""
        if isinstance(self.scheduler, ProcessScheduler):
            return await self.scheduler.tokens(s)
        return s.tokens()

    # --- offline jobs (improv.engine.generation.Sessions) -------------------------------------------
    @property
    def max_len(self) -> int:
        return self.scheduler.max_len

    @property
    def max_note_seconds(self) -> float:
        return self.settings.max_note_seconds

    @contextlib.asynccontextmanager
    async def session(
        self,
        prompt: list[int],
        constraints: list[Any],
        sampling: SamplingParams,
        on_event: EventCallback,
    ) -> AsyncIterator[LiveSession]:
        """An engine session for an offline job, in one of the HTTP slots (SessionLimit when
        they are all taken), at batch priority (live sessions' tokens go first); closed and its
        slot released on the way out."""
        self.acquire_http()
        s = None
        try:
            s = await self.open_session(prompt, constraints, sampling, on_event, priority="batch")
            yield s
        finally:
            if s is not None:
                s.close()
            self.release_http()

    async def close_connections(self, reason: str) -> None:
        """Server shutdown: every live session sends its note-offs and `stopped`."""
        await asyncio.gather(
            *(c.close(reason) for c in list(self.connections)), return_exceptions=True
        )
