"""Server fixtures: a random-weight tiny checkpoint, a runtime on it, a real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import uvicorn

from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer.vocab import TokenizerConfig
from improv.server.app import create_app
from improv.server.cli import graceful_server
from improv.server.runtime import Runtime
from improv.server.settings import Settings


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random tiny model; larger-than-init weights so the samples are varied (as the engine
    tests do), and a 1024-token context so offline requests fit."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", max_seq_len=1024)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if name == "tok_emb.weight" else 0.3 / p.shape[1] ** 0.5 * 4)
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


@pytest.fixture(autouse=True)
def _no_leaks(request):
    """Every test leaves the shared runtime as it found it: no live session, no engine slot."""
    yield
    if "runtime" not in request.fixturenames:
        return
    rt = request.getfixturevalue("runtime")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (rt.sessions_open() or rt.scheduler.n_open):
        time.sleep(0.02)
    assert rt.sessions_open() == 0, "a live session leaked"
    assert rt.scheduler.n_open == 0, "an engine session leaked"
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
