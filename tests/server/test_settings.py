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
