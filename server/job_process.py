"""HTTP generation in a worker process of its own.

Live sessions and file requests in one process shared the GIL: under 20 HTTP clients the
decode threads held it ~45% of the time for the HTTP rows' Python, and every live send waited
for it (BENCHMARKS.md, "Live sessions while HTTP clients keep the generation queue full").
Here the server's `ProcessJobs` hands each request (its file and checked fields) to a child
process, `python -m improv.server.job_process FD`, which loads the same checkpoint and runs
server/jobs.py's `LocalJobs` on a scheduler of its own at a lower CPU priority (nice): the
live process keeps its GIL and, when the machine is full, the cores.

The two talk over a socket pair with multiprocessing's Connection (pickled tuples between
two processes of this program, nothing read from elsewhere). Parent -> child:
("prepare", jid, kind, data, fields), ("result", jid, as_json), ("stream", jid),
("drop", jid). Child -> parent: ("ready",), ("prepared", jid), ("answer", jid, Answer),
("event", jid, dict), ("end", jid), ("error", jid, status, detail), and ("stats", 0, running,
tokens) when a job starts or ends and every STATS_S while any runs (`running()`, `tokens()`:
/metrics and tests). If the child dies, every
waiting request gets a 503 and the next one starts a new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from . import realtime
from .jobs import Answer, Fields, JobError, Kind, LocalJobs
from .settings import Settings

logger = logging.getLogger(__name__)

STATS_S = 1.0  # the child's figures, while it generates
GONE = "the generation worker process stopped; try again"


class ProcessJobs:
    """`Jobs` (server/jobs.py) served by a child process. Calls come from event loops (any
    number, one at a time per job); a sender thread writes the pipe, a reader thread hands each
    answer to the loop and queue of the job it names."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # guards _waiters and the child's handles
        self._waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple]]] = {}
        self._next = 0
        self._running = 0  # as the child last said
        self._tokens = 0.0  # sampled by every child so far
        self._child_tokens = 0.0  # by the current one
        self._closed = False
        self.ready = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._out: queue.SimpleQueue[tuple | None] | None = None
        self._start()

    # --- the child --------------------------------------------------------------------------
    def _start(self) -> None:
        mine, theirs = socket.socketpair()
        env = {**os.environ, "IMPROV_JOB_SETTINGS": self.settings.model_dump_json()}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "improv.server.job_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        conn = Connection(mine.detach())
        out: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._out = out
        self.ready.clear()
        threading.Thread(
            target=self._send_loop, args=(conn, out), name="improv-jobs-send", daemon=True
        ).start()
        threading.Thread(
            target=self._read_loop, args=(conn, self._proc), name="improv-jobs-read", daemon=True
        ).start()
        logger.info("generation worker process %d starting", self._proc.pid)

    def _send_loop(self, conn: Connection, out: queue.SimpleQueue[tuple | None]) -> None:
        if self.settings.realtime:  # (as the reader)
            realtime.promote("the generation worker process's sender")
        while (msg := out.get()) is not None:
            try:
                conn.send(msg)
            except OSError:  # the child is gone: the reader reports it
                return
        # The end (close(), or the child gone): our side of the socket shut for writing, so
        # the child reads EOF and exits (the reader thread still holds the socket open).
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=os.dup(conn.fileno()))
            sock.shutdown(socket.SHUT_WR)
            sock.close()

    def _read_loop(self, conn: Connection, proc: subprocess.Popen) -> None:
        if self.settings.realtime:  # it holds the GIL the event loop wants: not preempted then
            realtime.promote("the generation worker process's reader")
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "ready":
                self.ready.set()
                logger.info("generation worker process %d ready", proc.pid)
                continue
            if msg[0] == "stats":
                self._running, self._child_tokens = msg[2], msg[3]
                continue
            with self._lock:
                w = self._waiters.get(msg[1])
            if w is not None:
                with contextlib.suppress(RuntimeError):  # its loop closed
                    w[0].call_soon_threadsafe(w[1].put_nowait, msg)
        conn.close()
        rc = proc.wait()
        self._running = 0
        self._tokens, self._child_tokens = self._tokens + self._child_tokens, 0.0
        with self._lock:
            if self._proc is proc:
                self._proc = None
                if self._out is not None:
                    self._out.put(None)
                self._out = None
            waiters = list(self._waiters.items())
        if not self._closed:
            logger.error("generation worker process %d stopped (exit %s)", proc.pid, rc)
        for jid, (loop, q) in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(q.put_nowait, ("error", jid, 503, GONE))

    def _send(self, msg: tuple) -> None:
        with self._lock:
            if self._proc is None and not self._closed:
                self._start()
            out = self._out
        if out is None:
            raise JobError(503, GONE)
        out.put(msg)

    # --- Jobs ---------------------------------------------------------------------------------
    def _register(self, jid: int) -> asyncio.Queue[tuple]:
        q: asyncio.Queue[tuple] = asyncio.Queue()
        with self._lock:
            self._waiters[jid] = (asyncio.get_running_loop(), q)
        return q

    def _forget(self, jid: int) -> None:
        with self._lock:
            self._waiters.pop(jid, None)

    @staticmethod
    def _check(msg: tuple) -> tuple:
        if msg[0] == "error":
            raise JobError(msg[2], msg[3])
        return msg

    async def prepare(self, kind: Kind, data: bytes, fields: Fields) -> int:
        with self._lock:
            self._next += 1
            jid = self._next
        q = self._register(jid)
        try:
            self._send(("prepare", jid, kind, data, fields))
            self._check(await q.get())
        except BaseException:
            self.drop(jid)
            raise
        return jid

    async def result(self, jid: int, as_json: bool) -> Answer:
        q = self._waiters[jid][1]
        try:
            self._send(("result", jid, as_json))
            answer: Answer = self._check(await q.get())[2]
            return answer
        finally:
            self.drop(jid)

    async def stream(self, jid: int) -> AsyncIterator[dict[str, Any]]:
        q = self._waiters[jid][1]
        try:
            self._send(("stream", jid))
            while (msg := self._check(await q.get()))[0] == "event":
                yield msg[2]
        finally:
            self.drop(jid)

    def drop(self, jid: int) -> None:
        """Forget the job here and there (a running one is stopped, its engine session
        closed). Safe twice."""
        with self._lock:
            known = self._waiters.pop(jid, None) is not None
            out = self._out
        if known and out is not None:
            out.put(("drop", jid))

    def held(self) -> int:
        with self._lock:
            return len(self._waiters)

    def running(self) -> int:
        return self._running

    def tokens(self) -> float:
        return self._tokens + self._child_tokens

    @property
    def pid(self) -> int | None:
        """The worker process's (None between one that died and the next request)."""
        proc = self._proc
        return None if proc is None else proc.pid

    def close(self) -> None:
        self._closed = True
        with self._lock:
            proc, out = self._proc, self._out
        if out is not None:
            out.put(None)  # the child reads EOF and exits
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- the child ---------------------------------------------------------------------------------
class _Child:
    """The worker process: one event loop, the jobs' tasks on it, a reader thread feeding it."""

    def __init__(self, conn: Connection, settings: Settings) -> None:
        import torch

        from improv.engine import generation as gen
        from improv.engine.engine import Engine

        self.conn = conn
        torch.set_num_threads(settings.threads)
        engine = Engine.load(settings.checkpoint, device=settings.device, backend=settings.backend)
        # Twice the generations the parent lets run at once: a finished job's engine session
        # closes on the scheduler's thread a moment after its answer went out, when the next
        # request may already be opening one (500s under 20 clients without the room).
        self.sessions = gen.SchedulerSessions(
            engine, 2 * settings.http_sessions, settings.max_note_seconds
        )
        pool = ThreadPoolExecutor(max(2, settings.http_sessions), "improv-job")
        stats = self.sessions.scheduler.stats
        self.jobs = LocalJobs(
            self.sessions, settings, pool, lambda: stats["tokens"], self._say_running
        )
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._send_lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self._send_lock:  # the loop's tasks; large answers are written whole
            self.conn.send(msg)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple | None] = asyncio.Queue()

        def read() -> None:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    msg = None
                loop.call_soon_threadsafe(inbox.put_nowait, msg)
                if msg is None:
                    return

        threading.Thread(target=read, name="improv-job-read", daemon=True).start()
        with self.sessions:
            self.send(("ready",))
            stats = asyncio.create_task(self._stats())
            while (msg := await inbox.get()) is not None:
                op, jid = msg[0], msg[1]
                if op == "drop":  # the parent's ids are the jobs' ids here
                    self.jobs.drop(jid)
                    if (t := self.tasks.pop(jid, None)) is not None:
                        t.cancel()
                    continue
                self.tasks[jid] = asyncio.create_task(self._do(op, jid, *msg[2:]))
            stats.cancel()
            for t in self.tasks.values():
                t.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _do(self, op: str, jid: int, *args: Any) -> None:
        try:
            if op == "prepare":
                kind, data, fields = args
                await self.jobs.prepare(kind, data, fields, jid)
                self.send(("prepared", jid))
            elif op == "result":
                self.send(("answer", jid, await self.jobs.result(jid, *args)))
            elif op == "stream":
                async for ev in self.jobs.stream(jid):
                    self.send(("event", jid, ev))
                self.send(("end", jid))
        except asyncio.CancelledError:
            raise
        except JobError as e:
            self.send(("error", jid, e.status, e.detail))
        except Exception as e:
            logger.exception("job %d (%s) failed", jid, op)
            self.send(("error", jid, 500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            if self.tasks.get(jid) is asyncio.current_task():
                del self.tasks[jid]

    def _say_running(self) -> None:
        with contextlib.suppress(OSError):  # the parent is gone: we are ending too
            self.send(("stats", 0, self.jobs.running(), self.jobs.tokens()))

    async def _stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_S)
            if self.jobs.running():
                self._say_running()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    settings = Settings.model_validate_json(os.environ["IMPROV_JOB_SETTINGS"])
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the server's to handle
    child = _Child(conn, settings)
    with contextlib.suppress(OSError):  # loaded at the server's priority, then behind it
        os.nice(settings.http_nice)
    asyncio.run(child.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
