"""Server fixtures: a random-weight tiny checkpoint, a runtime on it, a real uvicorn server."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer.vocab import TokenizerConfig, Vocab
from improv.server.app import create_app
from improv.server.cli import graceful_server
from improv.server.runtime import Runtime
from improv.server.settings import Settings

from midi_factory import sounding


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random tiny model; larger-than-init weights so the samples are varied (as the engine
    tests do), and a 1024-token context so offline requests fit."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", max_seq_len=1024)).eval()
    v = Vocab(TokenizerConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if name == "tok_emb.weight" else 0.3 / p.shape[1] ** 0.5 * 4)
        # Waits less likely than at random (they are most of the choices after an event): the
        # model plays enough notes for the live tests to judge in a few seconds.
        model.lm_head.weight[v.shift_base : v.part_base] *= 0.1
    return save_checkpoint(path, model, TokenizerConfig(), {"note": "random weights, for tests"})


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("server") / "ckpt")


def make_runtime(ckpt: Path, **kw) -> Runtime:
    return Runtime.load(Settings(checkpoint=str(ckpt), device="cpu", **kw))


@pytest.fixture(scope="session")
def runtime(tiny_ckpt) -> Iterator[Runtime]:
    rt = make_runtime(tiny_ckpt, max_sessions=4, http_sessions=2)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def thread_runtime(tiny_ckpt) -> Iterator[Runtime]:
    """Live sessions and HTTP generations in this process's decode workers (`live_worker` and
    `http_worker` "thread"), not in worker processes: for tests that patch the engine in this
    process, and process == thread."""
    rt = make_runtime(
        tiny_ckpt, max_sessions=4, http_sessions=2, http_worker="thread", live_worker="thread"
    )
    yield rt
    rt.close()


@pytest.fixture
def thread_server(thread_runtime) -> Iterator[LiveServer]:
    s = start_server(thread_runtime)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _no_leaks(request):
    """Every test leaves the shared runtime as it found it: no live session, no engine slot."""
    yield
    for name in ("runtime", "thread_runtime"):
        if name in request.fixturenames:
            _check_nothing_leaked(request.getfixturevalue(name))


def _check_nothing_leaked(rt: Runtime) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        rt.sessions_open() or rt.scheduler.n_open or rt.jobs.held() or rt.jobs.running()
    ):
        time.sleep(0.02)
    assert rt.sessions_open() == 0, "a live session leaked"
    assert rt.scheduler.n_open == 0, "an engine session leaked"
    assert rt.jobs.held() == 0 and rt.jobs.running() == 0, "an HTTP generation leaked"
    assert not rt.connections


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    ws: str  # ws://127.0.0.1:PORT/v1/live
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_server(rt: Runtime, **settings) -> LiveServer:
    port = free_port()
    app = create_app(Settings(checkpoint="unused", port=port, **settings), runtime=rt)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = graceful_server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    return LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/live", server, thread)


@pytest.fixture
def server(runtime) -> Iterator[LiveServer]:
    s = start_server(runtime)
    yield s
    s.stop()


# --- a WebSocket test client -----------------------------------------------------------------


class Player:
    def __init__(self, url: str, **kw: Any) -> None:
        self.ws = connect(url, open_timeout=10, **kw)
        self.t0 = time.perf_counter()
        self.received: list[dict] = []
        self.queue: list[dict] = []  # generated midi, retracts applied
        self.closed_code: int | None = None

    def send(self, msg: dict | str) -> None:
        self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    def recv(self, timeout: float = 5.0) -> dict | None:
        try:
            raw = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except ConnectionClosed as e:
            self.closed_code = e.rcvd.code if e.rcvd else 1006
            return None
        msg = json.loads(raw)
        self.received.append(msg)
        if msg["type"] == "midi":
            self.queue.append(msg)
        elif msg["type"] == "retract":
            self.queue = [m for m in self.queue if m["time"] <= msg["after"]]
        return msg

    def until(self, pred, timeout: float = 10.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.recv(max(0.01, deadline - time.monotonic()))
            if m is not None and pred(m):
                return m
            if self.closed_code is not None:
                return None
        return None

    def drain(self, timeout: float = 10.0) -> None:
        """Read until the server closes the socket."""
        self.until(lambda m: False, timeout)

    def note(self, pitch: int, on: bool, time_ms: float | None = None) -> None:
        msg: dict = {"type": "midi", "data": [0x90 if on else 0x80, pitch, 100 if on else 0]}
        if time_ms is not None:
            msg["time"] = time_ms
        self.send(msg)

    def counts(self) -> tuple[int, int]:
        ons = sum(1 for m in self.queue if m["data"][0] & 0xF0 == 0x90 and m["data"][2] > 0)
        offs = sum(
            1
            for m in self.queue
            if m["data"][0] & 0xF0 == 0x80 or (m["data"][0] & 0xF0 == 0x90 and m["data"][2] == 0)
        )
        return ons, offs

    def sounding(self) -> set[tuple[int, int]]:
        """Play the queue in time order (ties: arrival order): what is left sounding."""
        return sounding(self.queue)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def make_player():
    """Factory: make_player(url) -> Player; all closed at the end."""
    made: list[Player] = []

    def make(url: str) -> Player:
        pl = Player(url)
        made.append(pl)
        return pl

    yield make
    for pl in made:
        try:
            pl.close()
        except Exception:
            pass


@pytest.fixture(scope="session")
def server_factory():
    """start_server(runtime, **settings) and make_runtime(ckpt, **settings) for tests that need
    their own limits."""
    return start_server, make_runtime
