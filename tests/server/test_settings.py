"""Settings: environment variables, the no-token bind refusal, `improv serve` arguments."""

from __future__ import annotations

import pytest

from improv.cli import build_parser
from improv.server.settings import Settings, is_loopback


def test_env_vars(monkeypatch):
    monkeypatch.setenv("IMPROV_PORT", "9123")
    monkeypatch.setenv("IMPROV_MAX_SESSIONS", "3")
    s = Settings()
    assert s.port == 9123 and s.max_sessions == 3 and s.host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_non_loopback_without_token_is_refused(host):
    with pytest.raises(ValueError, match="without a token"):
        Settings(host=host).check_bind()
    Settings(host=host, token="x").check_bind()
    Settings(host=host, allow_open=True).check_bind()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host):
    assert is_loopback(host)
    Settings(host=host).check_bind()


def test_serve_refuses_open_bind_before_loading_anything(tmp_path):
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--checkpoint", str(tmp_path)])
    assert args._run(args) == 2


def test_serve_missing_checkpoint_is_a_clear_error(tmp_path, caplog):
    args = build_parser().parse_args(["serve", "--checkpoint", str(tmp_path / "nope")])
    assert args._run(args) == 2
    assert "no checkpoint" in caplog.text


def test_context_tokens_sizes_every_session_and_is_checked(tiny_ckpt):
    from tests.server.conftest import make_runtime

    with pytest.raises(ValueError, match="greater than or equal to 256"):
        Settings(context_tokens=100)
    args = build_parser().parse_args(["serve", "--context-tokens", "300"])
    from improv.server.cli import settings_from_args

    assert settings_from_args(args).context_tokens == 300
    rt = make_runtime(tiny_ckpt, max_sessions=1, http_sessions=1, context_tokens=300)
    try:
        assert rt.scheduler.max_len == 300 and rt.scheduler.keep_len == 150
    finally:
        rt.close()


# --- `improv serve` checks its arguments before the model loads (#22 items 5, 7, 8, 11) ---------
NO_MIDI = {"MIDO_BACKEND": "mido.backends.rtmidi/UNIX_JACK", "JACK_DEFAULT_SERVER": "no-such-jack"}


def improv(args: list[str], cwd, env: dict[str, str] | None = None, timeout: float = 60):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = Path(sys.executable).parent / "improv"
    t0 = time.monotonic()
    r = subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r, time.monotonic() - t0


def test_serve_from_another_directory_finds_the_model_and_says_midi_is_missing(tmp_path):
    """From a folder with no models/: the bundled model is found (no "no checkpoint"), and
    --midi-virtual without ALSA or JACK is one line and exit 2, before the model loads."""
    r, took = improv(["serve", "--midi-virtual", "--port", "1"], tmp_path, NO_MIDI)
    assert r.returncode == 2, r.stderr
    assert "no checkpoint" not in r.stderr
    assert "MIDI is unavailable here" in r.stderr and "JACK" in r.stderr and "ALSA" in r.stderr
    assert "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if "ERROR" in ln] and took < 30


def test_serve_refuses_an_empty_token_at_once(tmp_path):
    r, took = improv(["serve", "--token", ""], tmp_path)
    assert r.returncode == 2 and "must not be empty" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and took < 30


def test_max_generations_flag():
    from improv.server.cli import settings_from_args

    args = build_parser().parse_args(["serve", "--max-generations", "2"])
    s = settings_from_args(args)
    assert s.http_sessions == 2 and s.generation_queue == 16 and s.generation_wait_s == 30


def test_http_worker_flag(monkeypatch):
    from improv.server.cli import settings_from_args

    monkeypatch.delenv("IMPROV_HTTP_WORKER", raising=False)
    assert settings_from_args(build_parser().parse_args(["serve"])).http_worker == "process"
    args = build_parser().parse_args(["serve", "--http-worker", "thread"])
    assert settings_from_args(args).http_worker == "thread"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--http-worker", "fork"])


def test_live_worker_and_realtime_flags(monkeypatch):
    from improv.server.cli import settings_from_args

    for name in ("IMPROV_LIVE_WORKER", "IMPROV_REALTIME"):
        monkeypatch.delenv(name, raising=False)
    s = settings_from_args(build_parser().parse_args(["serve"]))
    assert (s.live_worker, s.realtime) == ("process", True)
    args = build_parser().parse_args(["serve", "--live-worker", "thread", "--no-realtime"])
    s = settings_from_args(args)
    assert (s.live_worker, s.realtime) == ("thread", False)
    monkeypatch.setenv("IMPROV_REALTIME", "0")
    assert settings_from_args(build_parser().parse_args(["serve"])).realtime is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--live-worker", "fork"])


def test_the_default_runtime_decodes_live_sessions_in_a_worker_process(runtime, thread_runtime):
    from improv.server.live_process import ProcessScheduler

    assert isinstance(runtime.scheduler, ProcessScheduler) and runtime.scheduler.pid
    assert runtime.scheduler.n_workers >= 1 and runtime.scheduler.max_len > 0
    assert not isinstance(thread_runtime.scheduler, ProcessScheduler)
