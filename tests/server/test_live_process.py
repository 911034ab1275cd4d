"""The live worker process (server/live_process.py): the same sessions as in-process decode
workers, over a socket pair to a child process."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from improv.engine.engine import Engine
from improv.engine.live import Done, SamplingParams, SchedulerFull, Token
from improv.server import realtime
from improv.server.live_process import ProcessScheduler, pool_for
from improv.server.settings import Settings


@pytest.fixture(scope="module")
def settings(tiny_ckpt) -> Settings:
    return Settings(checkpoint=str(tiny_ckpt), device="cpu", max_sessions=2, decode_workers=1)


@pytest.fixture(scope="module")
def engine(settings) -> Engine:
    return Engine.load(settings.checkpoint, device="cpu", backend=settings.backend)


@pytest.fixture()
def remote(settings, engine) -> Iterator[ProcessScheduler]:
    sched = ProcessScheduler(settings, engine.vocab)
    sched.wait_ready()
    yield sched
    sched.stop()


def run(sched, engine, forced=(), max_tokens=40, seed=3) -> tuple[list[int], Done]:
    """A seeded request (with `forced` events handed over with it) on `sched`: its tokens and
    how it ended."""
    v = engine.vocab
    events: queue.Queue = queue.Queue()
    s = sched.open_session(
        [v.BOS, v.TASK_CONTINUE], sampling=SamplingParams(seed=seed), on_event=events.put
    )
    s.generate(max_tokens=max_tokens, until_tick=400 if forced else None, forced=forced)
    toks = []
    while not isinstance(ev := events.get(timeout=30), Done):
        if isinstance(ev, Token):
            toks.append(ev.token)
    s.close()
    return toks, ev


def test_a_session_in_the_worker_process_samples_what_it_samples_here(remote, settings, engine):
    """Equivalence: the same seeded request, with a forced player's note, gives the same
    tokens through the child process as on decode workers in this process."""
    v = engine.vocab
    forced = [(60 * k, [v.velocity(20), v.note_on(v.lead, 60 + k)]) for k in range(1, 4)]
    local = pool_for(settings, engine).start()
    try:
        here = run(local, engine, forced)
    finally:
        local.stop()
    there = run(remote, engine, forced)
    assert len(here[0]) > 10
    assert there[0] == here[0]
    assert (there[1].reason, there[1].position) == (here[1].reason, here[1].position)


def test_nothing_of_a_cancelled_request_arrives_after_cancel_returns(remote, engine):
    v = engine.vocab
    got: list = []
    first, done = threading.Event(), threading.Event()

    def on_event(ev) -> None:  # the reader thread
        got.append(ev)
        if isinstance(ev, Token):
            first.set()
        elif isinstance(ev, Done):
            done.set()

    s = remote.open_session(
        [v.BOS, v.TASK_CONTINUE], sampling=SamplingParams(seed=1), on_event=on_event
    )
    rid = s.generate(max_tokens=100_000)
    assert first.wait(30)
    s.cancel()
    n = len(got)
    assert done.wait(30)  # the child samples on until it reads the cancel
    time.sleep(0.1)
    late = [ev for ev in got[n:] if isinstance(ev, Token) and ev.request == rid]
    assert late == []
    assert [ev.reason for ev in got[n:] if isinstance(ev, Done)] == ["cancelled"]
    s.close()


def test_tokens_are_read_from_the_child(remote, engine):
    v = engine.vocab
    events: queue.Queue = queue.Queue()
    s = remote.open_session(
        [v.BOS, v.TASK_CONTINUE], sampling=SamplingParams(seed=2), on_event=events.put
    )
    s.generate(max_tokens=12)
    toks = []
    while not isinstance(ev := events.get(timeout=30), Done):
        toks.append(ev.token)
    assert s.tokens() == [v.BOS, v.TASK_CONTINUE, *toks]
    s.close()


def test_slots_are_held_until_the_child_closes_them(remote, engine):
    v = engine.vocab
    a = remote.open_session([v.BOS, v.TASK_CONTINUE])
    b = remote.open_session([v.BOS, v.TASK_CONTINUE])
    with pytest.raises(SchedulerFull):
        remote.open_session([v.BOS, v.TASK_CONTINUE])
    with pytest.raises(ValueError, match="token ids must be in"):
        remote.open_session([v.size])
    a.close()
    b.close()
    deadline = time.monotonic() + 10
    while remote.n_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert remote.n_open == 0
    assert a.closed and b.closed


def test_a_dead_worker_process_ends_its_requests_and_another_serves(remote, engine):
    v = engine.vocab
    events: queue.Queue = queue.Queue()
    s = remote.open_session(
        [v.BOS, v.TASK_CONTINUE], sampling=SamplingParams(seed=4), on_event=events.put
    )
    rid = s.generate(max_tokens=100_000)
    assert isinstance(events.get(timeout=30), Token)
    pid = remote.pid
    os.kill(pid, signal.SIGKILL)
    while not isinstance(ev := events.get(timeout=30), Done):
        pass
    assert (ev.request, ev.reason) == (rid, "error")
    assert remote.n_open == 0 and s.closed
    remote.wait_ready(60)
    assert remote.pid != pid
    toks, done = run(remote, engine, max_tokens=5)
    assert len(toks) == 5 and done.reason == "max_tokens"


def test_realtime_priority_is_the_calling_threads_alone():
    """Where the OS allows it, the promoted thread runs SCHED_FIFO and a thread it starts does
    not; restore puts it back. Elsewhere promote says no (None) and nothing changes."""
    seen: list[int] = []
    before = os.sched_getscheduler(0)
    prev = realtime.promote("the test")
    try:
        t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
        t.start()
        t.join()
        if prev is not None:
            assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
        assert seen == [before]
    finally:
        realtime.restore(prev)
    assert os.sched_getscheduler(0) == before


def test_a_live_session_goes_on_when_the_worker_process_dies(
    tiny_ckpt, server_factory, make_player
):
    """On a real server: the live worker process is killed mid-session; the player gets an
    error frame, the session opens a fresh engine session in the next worker process and plays
    on, and when it stops every note-on has its note-off."""
    start_server, make_runtime = server_factory
    rt = make_runtime(tiny_ckpt, max_sessions=2, http_sessions=1)
    srv = start_server(rt)
    try:
        pl = make_player(srv.ws)
        pl.send({"type": "start", "mode": "accompany", "seed": 5, "lookahead_ms": 50})
        assert pl.until(lambda m: m["type"] == "started") is not None
        pl.note(60, True)
        assert pl.until(lambda m: m["type"] == "midi", timeout=10) is not None
        pid = rt.scheduler.pid
        os.kill(pid, signal.SIGKILL)
        err = pl.until(lambda m: m["type"] == "error", timeout=10)
        assert err is not None and err["code"] == "internal"
        rt.scheduler.wait_ready(60)
        assert rt.scheduler.pid != pid
        n = len(pl.received)
        pl.note(60, False)
        pl.note(64, True)
        assert pl.until(lambda m: m["type"] == "midi", timeout=15) is not None
        assert len(pl.received) > n
        pl.note(64, False)
        pl.send({"type": "stop"})
        assert pl.until(lambda m: m["type"] == "stopped") is not None
        pl.drain(5)
        ons, offs = pl.counts()
        assert ons == offs and not pl.sounding()
    finally:
        srv.stop()
        rt.close()
