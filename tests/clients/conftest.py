"""Client fixtures: the server tests' tiny checkpoint, runtime and real uvicorn server
(tests/server/conftest.py, loaded by path: conftest modules are not importable by name)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location(
    "improv_tests_server_conftest", Path(__file__).parent.parent / "server" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
srv: Any = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = srv  # dataclasses look their module up
_spec.loader.exec_module(srv)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return srv.write_tiny_checkpoint(tmp_path_factory.mktemp("clients") / "ckpt")


@pytest.fixture(scope="module")
def runtime(tiny_ckpt) -> Iterator[Any]:
    rt = srv.make_runtime(tiny_ckpt, max_sessions=4, http_sessions=2)
    yield rt
    rt.close()


@pytest.fixture
def server(runtime) -> Iterator[Any]:
    s = srv.start_server(runtime)
    yield s
    s.stop()


@pytest.fixture
def start_server() -> Any:
    """start_server(runtime, **settings) -> a LiveServer (stop() it)."""
    return srv.start_server


@pytest.fixture
def restart_server() -> Any:
    """restart_server(runtime, url) -> a new LiveServer on the port of `url` (a server that
    came back)."""

    def restart(rt: Any, url: str) -> Any:
        port = int(url.rsplit(":", 1)[1])
        free_port = srv.free_port
        srv.free_port = lambda: port  # start_server picks its port through this
        try:
            return srv.start_server(rt)
        finally:
            srv.free_port = free_port

    return restart
