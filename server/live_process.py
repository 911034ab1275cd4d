"""Live decoding in a worker process of its own.

With the decode workers in the server's process, the event loop and the send clock waited for
the GIL behind the workers' Python (sampling, constraints: ~75% of the time the GIL was held,
in stretches the switch interval only cuts at 0.5 ms, passed between four threads): live sends
went out 2-4 ms after their time at the 99th percentile, with the cores half idle
(BENCHMARKS.md, "Live capacity"). Here the server's `ProcessScheduler` stands in for the
`SchedulerPool` it would run: each engine session's handle is a `LiveSession` as in-process
(its checks, request ids and cancel fence are the server's own), whose commands go over a
socket pair to a child process, `python -m improv.server.live_process FD`, that runs the
`SchedulerPool` (its threads niced, as in-process); the sessions' events come back and are
delivered under the handle's fence. The server's process keeps only the event loop, the send
clock and the reader of the events: short holders of its GIL.

The two talk with multiprocessing's Connection (pickled tuples between two processes of this
program, nothing read from elsewhere). Parent -> child: ("open", sid, prompt, constraints,
sampling, allow_end, priority, clock), ("cmd", sid, [Command]), ("tokens", qid, sid),
("figures", qid), ("reset_stats",). Child -> parent: ("ready", info), ("evs", [(sid, Event),
...]) (a decode worker's step), ("status", sid, Status) (when more than its position moved),
("failed", sid, why), ("answer", qid, value), ("stats", figures) every STATS_S. If the child
dies, a new one starts and each open session ends with its request ("error"); a live mode then
opens a fresh one there (server/live/mode.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from improv.engine.constraints import Constraint
from improv.engine.live import Done, Event, EventCallback, LiveSession, SamplingParams, Status
from improv.engine.live.pool import SchedulerPool, auto_workers
from improv.engine.live.scheduler import Priority, check_open, check_tokens
from improv.engine.live.types import (
    Append,
    Cancel,
    ClockFn,
    Close,
    Command,
    Generate,
    Reset,
    SchedulerFull,
    Token,
)

from . import realtime
from .settings import Settings

logger = logging.getLogger(__name__)

STATUS_S = 0.02  # the child's look at its sessions' Status (closes free the parent's slots)
STATS_S = 0.5  # the child's counters (/metrics)
READY_S = 120.0  # the child loads the model
ASK_S = 10.0  # an answer from the child (a session's tokens, the counters)
GONE = "the live decode process stopped"


def pool_for(
    settings: Settings, engine: Any, after_step: Callable[[], None] | None = None
) -> SchedulerPool:
    """The decode workers the settings ask for (here, or in the live worker process)."""
    in_process = settings.http_worker == "thread"
    workers = settings.decode_workers or auto_workers(settings.max_sessions)
    return SchedulerPool(
        engine,
        workers,
        max_sessions=math.ceil(settings.max_sessions / workers)
        + (settings.http_sessions if in_process else 0),
        max_len=settings.context_tokens,
        batch_tokens=settings.http_step_tokens,
        note_share=settings.note_share,
        nice=settings.decode_nice,
        after_step=after_step,
    )


class RemoteSession(LiveSession):
    """A `LiveSession` whose scheduler is in the live worker process. Its commands, checks,
    request ids and fence are the in-process ones; `tokens()` asks the child and waits (on an
    event loop, `await ProcessScheduler.tokens(session)` instead)."""

    def __init__(self, sched: ProcessScheduler, *args: Any) -> None:
        super().__init__(*args)
        self._sched = sched

    def tokens(self) -> list[int]:
        return self._sched.tokens_now(self)

    def context(self) -> list[int]:
        raise RuntimeError("a session in the live worker process: its context stays there")

    def _deliver(self, ev: Event) -> None:
        """An event from the child, under the fence as the state delivers them: nothing of a
        request cancelled here is delivered, whatever the child sampled meanwhile."""
        with self.fence.lock:
            if isinstance(ev, Token) and not self.fence.live(ev.request):
                return
            self._emit(ev)


class ProcessScheduler:
    """`SchedulerPool`'s session API (what the server uses of it) over a child process."""

    def __init__(self, settings: Settings, vocab: Any) -> None:
        self.settings = settings
        self.vocab = vocab
        self._lock = threading.Lock()  # guards the handles, the count and the child's handles
        self._send_lock = threading.Lock()
        self._handles: dict[int, RemoteSession] = {}
        self._open = 0  # sessions holding a slot there (until the child says closed)
        self._ids = itertools.count()
        self._rids = itertools.count()
        self._queries = itertools.count()
        self._waiting: dict[int, Callable[[Any], None]] = {}
        self._figures: dict[str, Any] = {"stats": {}, "steps": 0, "queue": 0, "lead": 0.0}
        self.ready = threading.Event()
        self._info: dict[str, Any] = {}
        self._closed = False
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._start()

    # --- the child ----------------------------------------------------------------------------
    def _start(self) -> None:
        mine, theirs = socket.socketpair()
        env = {**os.environ, "IMPROV_LIVE_SETTINGS": self.settings.model_dump_json()}
        proc = subprocess.Popen(
            [sys.executable, "-m", "improv.server.live_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        conn = Connection(mine.detach())
        self._proc, self._conn = proc, conn
        self.ready.clear()
        threading.Thread(
            target=self._read_loop, args=(conn, proc), name="improv-live-read", daemon=True
        ).start()
        logger.info("live decode process %d starting", proc.pid)

    def wait_ready(self, timeout: float = READY_S) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"the live decode process is not ready after {timeout:.0f} s")

    def _send(self, msg: tuple) -> None:
        """Written at once, from the caller's thread (commands are small; the socket's buffer
        holds far more than a step's worth while the child is busy)."""
        with self._send_lock:
            conn = self._conn
            if conn is None:
                return  # stopped
            try:
                conn.send(msg)  # (pickled whole before a byte is written)
            except OSError:
                pass  # the reader sees it die

    def _read_loop(self, conn: Connection, proc: subprocess.Popen) -> None:
        if self.settings.realtime:  # it holds the GIL the loop wants: not preempted then
            realtime.promote("the live worker process's reader")
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            op = msg[0]
            if op == "evs":
                for sid, ev in msg[1]:
                    h = self._handles.get(sid)
                    if h is not None:
                        h._deliver(ev)
            elif op == "status":
                self._status(msg[1], msg[2])
            elif op == "stats":
                self._figures = msg[1]
            elif op == "answer":
                with self._lock:
                    answer = self._waiting.pop(msg[1], None)
                if answer is not None:
                    answer(msg[2])
            elif op == "failed":
                logger.error("live session %d could not open there: %s", msg[1], msg[2])
                self._end(msg[1], "error")
            elif op == "ready":
                self._info = msg[1]
                self.ready.set()
                logger.info("live decode process %d ready", proc.pid)
        conn.close()
        rc = proc.wait()
        with self._send_lock:
            if self._closed:
                return
            logger.error("live decode process %d stopped (exit %s); starting another", proc.pid, rc)
            # The sessions it ran end; the next process starts in the same breath (under the
            # send lock: every session opened from now on is opened there, and what these
            # sessions' ends lead to, a mode opening a fresh one, waits in its socket).
            with self._lock:
                ended, waiting, self._waiting = list(self._handles), self._waiting, {}
            self._start()
        for sid in ended:
            self._end(sid, "error")
        for answer in waiting.values():
            answer(RuntimeError(GONE))

    def _status(self, sid: int, st: Status) -> None:
        h = self._handles.get(sid)
        if h is None:
            return
        h._publish(st)
        if st.closed:
            with self._lock:
                if self._handles.pop(sid, None) is not None:
                    self._open -= 1

    def _end(self, sid: int, reason: str) -> None:
        """A session the child no longer runs: its request ends, its slot is free."""
        with self._lock:
            h = self._handles.pop(sid, None)
            if h is not None:
                self._open -= 1
        if h is None:
            return
        st = h.status
        h._publish(dataclasses.replace(st, closed=True, generating=False))
        with h.fence.lock:
            rid = h.fence._issued
        h._emit(Done(sid, rid, reason, st.position, st.tick))

    # --- SchedulerPool's API --------------------------------------------------------------------
    def start(self) -> ProcessScheduler:
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        self._closed = True
        with self._send_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(conn.fileno()))
                sock.shutdown(socket.SHUT_WR)  # the child reads EOF and exits
                sock.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()

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
        """As `SchedulerPool.open_session`; SchedulerFull when every slot there is held."""
        toks = check_open(self.vocab, prompt, priority)
        with self._lock:
            if self._open >= self.max_sessions:
                raise SchedulerFull(f"all {self.max_sessions} session slots are in use")
            self._open += 1
            sid = next(self._ids)
            h = RemoteSession(
                self, sid, Status(-1), _Commands(self), self.check_tokens, self._next_rid,
                list(constraints), None, on_event,  # type: ignore[arg-type]
            )  # fmt: skip
            self._handles[sid] = h
        try:
            self._send(("open", sid, toks, list(constraints), sampling, allow_end, priority, clock))
        except Exception:  # a value that does not pickle: nothing was sent
            with self._lock:
                del self._handles[sid]
                self._open -= 1
            raise
        return h

    async def tokens(self, session: LiveSession) -> list[int]:
        """The session's tokens from its window start, as the child's handle has them."""
        tokens: list[int] = await self._ask_async("tokens", session.id)
        return tokens

    def tokens_now(self, session: LiveSession) -> list[int]:
        """`tokens`, waiting on this thread (tests, tools; not on an event loop)."""
        done, box = threading.Event(), []

        def answer(value: Any) -> None:
            box.append(value)
            done.set()

        self._ask(answer, "tokens", session.id)
        if not done.wait(ASK_S):
            raise TimeoutError("the live decode process did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return list(box[0])

    async def refresh(self) -> None:
        """The child's counters now (`/metrics`), not as last sent (every STATS_S)."""
        with contextlib.suppress(Exception):  # (gone, or slow: the last ones stand)
            self._figures = await self._ask_async("figures")

    async def _ask_async(self, op: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def answer(value: Any) -> None:  # the reader thread
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(_settle, fut, value)

        self._ask(answer, op, *args)
        return await asyncio.wait_for(fut, ASK_S)

    def _ask(self, answer: Callable[[Any], None], op: str, *args: Any) -> None:
        """(op, qid, *args) to the child; `answer(value)` on the reader thread with its
        ("answer", qid, value), or with an exception if the child dies first."""
        with self._lock:
            qid = next(self._queries)
            self._waiting[qid] = answer
        self._send((op, qid, *args))

    def check_tokens(self, tokens: Iterable[int]) -> list[int]:
        return check_tokens(self.vocab, tokens)

    def _next_rid(self) -> int:
        with self._lock:
            return next(self._rids)

    def reset_stats(self) -> None:
        self._send(("reset_stats",))

    def reset_timing(self) -> None:
        """(The child's workers start from its warm-up's reset.)"""

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    @property
    def max_sessions(self) -> int:
        return int(self._info.get("max_sessions", self.settings.max_sessions))

    @property
    def max_len(self) -> int:
        return int(self._info["max_len"])

    @property
    def keep_len(self) -> int:
        return int(self._info["keep_len"])

    @property
    def n_workers(self) -> int:
        return int(self._info.get("workers", 0))

    @property
    def n_open(self) -> int:
        with self._lock:
            return self._open

    @property
    def steps(self) -> int:
        return int(self._figures["steps"])

    @property
    def stats(self) -> dict[str, float]:
        """The workers' counters, as the child last sent them (every STATS_S)."""
        return dict(self._figures["stats"])

    def queue_length(self) -> int:
        return int(self._figures["queue"])

    @property
    def event_lead_s(self) -> float:
        return float(self._figures["lead"])

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the worker process (its decode workers and its reader)."""
        return float(self._figures.get("cpu_s", 0.0))


class _Commands:
    """A handle's ordered command queue, over the socket (`handle.Commands`)."""

    def __init__(self, sched: ProcessScheduler) -> None:
        self._sched = sched

    def put(self, sid: int, cmd: Command) -> None:
        self._sched._send(("cmd", sid, [cmd]))

    def put_many(self, sid: int, cmds: Sequence[Command]) -> None:
        self._sched._send(("cmd", sid, list(cmds)))


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


# --- the child ---------------------------------------------------------------------------------
class _Child:
    """The worker process: the decode workers, and one thread reading the parent's commands
    (in order) that also looks at the sessions' Status every STATUS_S."""

    def __init__(self, conn: Connection, settings: Settings) -> None:
        import torch

        from improv.engine.engine import Engine

        self.conn = conn
        torch.set_num_threads(settings.threads)
        engine = Engine.load(settings.checkpoint, device=settings.device, backend=settings.backend)
        self._steps = threading.local()  # each decode worker's events of its current step
        self.pool = pool_for(settings, engine, self._flush)
        v = engine.vocab
        self.pool.warm_up([v.BOS, v.TASK_CONTINUE])
        gc.collect()  # as the server's process: what is loaded lives as long as this one
        gc.freeze()
        self.sessions: dict[int, LiveSession] = {}
        self._said: dict[int, Status] = {}
        self._send_lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self._send_lock:  # the decode workers' events and this thread's replies
            self.conn.send(msg)

    def run(self) -> None:
        pool = self.pool
        pool.start()
        info = {
            "max_sessions": pool.max_sessions,
            "max_len": pool.max_len,
            "keep_len": pool.keep_len,
            "workers": len(pool.workers),
        }
        self.send(("ready", info))
        now = time.monotonic()
        next_status, next_stats = now + STATUS_S, now + STATS_S
        try:
            while True:
                if self.conn.poll(max(0.0, next_status - time.monotonic())):
                    try:
                        msg = self.conn.recv()
                    except (EOFError, OSError):
                        return
                    self._do(msg)
                now = time.monotonic()
                if now < next_status:
                    continue
                next_status = now + STATUS_S
                self._statuses()
                if now >= next_stats:
                    next_stats = now + STATS_S
                    self.send(("stats", self._figures()))
        finally:
            pool.stop()

    def _do(self, msg: tuple) -> None:
        op = msg[0]
        if op == "cmd":
            s = self.sessions.get(msg[1])
            if s is not None:
                _apply(s, msg[2])
        elif op == "open":
            sid, prompt, constraints, sampling, allow_end, priority, clock = msg[1:]
            try:
                self.sessions[sid] = self.pool.open_session(
                    prompt, constraints, sampling, self._on_event(sid), allow_end, clock, priority
                )
            except Exception as e:  # SchedulerFull (the parent counts as we do), a bad value
                self.send(("failed", sid, f"{type(e).__name__}: {e}"))
        elif op == "tokens":
            s = self.sessions.get(msg[2])
            self.send(("answer", msg[1], s.tokens() if s is not None else []))
        elif op == "figures":
            self.send(("answer", msg[1], self._figures()))
        elif op == "reset_stats":
            self.pool.reset_stats()

    def _on_event(self, sid: int) -> EventCallback:
        steps = self._steps

        def on_event(ev: Event) -> None:  # a decode worker's thread, in a step
            if ev.session != sid:  # (the child numbers its sessions itself)
                ev = dataclasses.replace(ev, session=sid)
            if (out := getattr(steps, "events", None)) is None:
                out = steps.events = []
            out.append((sid, ev))

        return on_event

    def _flush(self) -> None:
        """A decode worker's step ended: its events go in one message (one pickle, one write
        here, one read and one wake of the server's loop there, not one each)."""
        out = getattr(self._steps, "events", None)
        if out:
            self._steps.events = []
            with contextlib.suppress(OSError):  # the parent is gone: we are ending too
                self.send(("evs", out))

    def _statuses(self) -> None:
        """Say each session's Status when more than its position moved (a close, a slide,
        a request's start or end, the clock floor's pushes)."""
        for sid, s in list(self.sessions.items()):
            st, said = s.status, self._said.get(sid)
            if said is None or _moved(said, st):
                self._said[sid] = st
                self.send(("status", sid, st))
            if st.closed:
                del self.sessions[sid]
                self._said.pop(sid, None)

    def _figures(self) -> dict[str, Any]:
        p = self.pool
        return {
            "stats": p.stats,
            "steps": p.steps,
            "queue": p.queue_length(),
            "lead": p.event_lead_s,
            "cpu_s": time.process_time(),
        }


def _moved(a: Status, b: Status) -> bool:
    return (a.closed, a.generating, a.window_start, a.lag_pushes, a.slot) != (
        b.closed, b.generating, b.window_start, b.lag_pushes, b.slot,
    )  # fmt: skip


def _apply(s: LiveSession, cmds: list[Command]) -> None:
    """The parent's commands, queued as its handle did, with this side's fence kept as the
    parent's: a request issued, a cancel (the handle's append, cancel, reset and close)."""
    with s.fence.lock:
        for c in cmds:
            if isinstance(c, Generate):
                s.fence.issue(c.request.id)
            elif isinstance(c, Append | Cancel | Reset | Close):
                s.fence.cancel()
        s._commands.put_many(s.id, cmds)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    settings = Settings.model_validate_json(os.environ["IMPROV_LIVE_SETTINGS"])
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the server's to handle
    # The decode workers and this reader share a GIL here, not the server's event loop.
    sys.setswitchinterval(settings.switch_interval_ms / 1000.0)
    _Child(conn, settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
