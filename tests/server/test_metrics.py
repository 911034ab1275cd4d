"""`/metrics` (Prometheus text) and HTTP generations at batch priority, on a real server."""

from __future__ import annotations

import httpx
import pytest

from improv.server.metrics import TokenRate, render

from midi_factory import simple_song

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


def scrape(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split(" ")
            out[name] = float(value)
    return out


def test_metrics_count_sessions_tokens_and_events(server, runtime, make_player):
    before = scrape(server.url)
    assert before["improv_live_sessions"] == 0 and before["improv_live_sessions_max"] == 4
    assert before["improv_decode_workers"] == runtime.scheduler.n_workers
    pl = make_player(server.ws)
    pl.send({"type": "start", "mode": "respond", "gap_ms": 5000, "response_seconds": 1.0})
    assert pl.until(lambda m: m["type"] == "started") is not None
    pl.note(64, True)
    pl.note(64, False)
    pl.send({"type": "trigger"})
    assert pl.until(lambda m: m["type"] == "midi", timeout=5) is not None
    during = scrape(server.url)
    assert during["improv_live_sessions"] == 1
    assert during["improv_tokens_total"] > before["improv_tokens_total"]
    pl.send({"type": "stop"})
    stopped = pl.until(lambda m: m["type"] == "stopped")
    assert stopped is not None
    pl.drain(5)
    sent = stopped["events_sent"]
    after = scrape(server.url)
    assert after["improv_live_sessions"] == 0
    # a closed connection's counters stay in the totals
    assert after["improv_live_events_sent_total"] - before["improv_live_events_sent_total"] == sent
    assert after["improv_steps_total"] > before["improv_steps_total"]
    # The decode thread's CPU time: spent, and at most its wall time busy (one thread each).
    cpu = after["improv_decode_cpu_seconds_total"] - before["improv_decode_cpu_seconds_total"]
    fwd = after["improv_forward_cpu_seconds_total"] - before["improv_forward_cpu_seconds_total"]
    assert 0 < fwd <= cpu
    proc = after["improv_process_cpu_seconds_total"] - before["improv_process_cpu_seconds_total"]
    assert proc >= cpu


def test_http_generations_are_counted(server, runtime):
    """(In the generation worker process: its tokens reach /metrics.)"""
    before = scrape(server.url)
    files = {"file": ("x.mid", simple_song(2.0), "audio/midi")}
    r = httpx.post(server.url + "/v1/continue", files=files, data={"seconds": "1", "seed": "1"})
    assert r.status_code == 200, r.text
    after = scrape(server.url)
    assert after["improv_batch_tokens_total"] > before["improv_batch_tokens_total"]
    assert after["improv_http_generations"] == 0


def test_extra_metrics_hook_and_format(runtime):
    runtime.extra_metrics["improv_http_queue_length"] = ("gauge", "Requests waiting.", lambda: 3)
    try:
        from improv.server.metrics import samples

        text = render(samples(runtime, TokenRate()))
    finally:
        del runtime.extra_metrics["improv_http_queue_length"]
    assert "# TYPE improv_http_queue_length gauge\nimprov_http_queue_length 3\n" in text
    assert "# TYPE improv_tokens_total counter" in text
    for line in text.splitlines():  # name value, or a comment
        assert line.startswith("# ") or len(line.split(" ")) == 2


def test_two_decode_workers_serve_live_and_http_together(tiny_ckpt, server_factory, make_player):
    """The server with two decode workers: live sessions land on both, an HTTP generation runs
    beside them, and every session ends with its notes ended."""
    start_server, make_runtime = server_factory
    # (in this process, to see where each session is placed)
    rt = make_runtime(
        tiny_ckpt, max_sessions=4, http_sessions=1, decode_workers=2, live_worker="thread"
    )
    srv = start_server(rt)
    try:
        assert len(rt.scheduler.workers) == 2
        players = [make_player(srv.ws) for _ in range(4)]
        for i, pl in enumerate(players):
            pl.send({"type": "start", "mode": "accompany", "seed": i, "lookahead_ms": 50})
            assert pl.until(lambda m: m["type"] == "started") is not None
            pl.note(60 + i, True)
        assert [w.n_open for w in rt.scheduler.workers] == [2, 2]
        files = {"file": ("x.mid", simple_song(2.0), "audio/midi")}
        r = httpx.post(
            srv.url + "/v1/continue", files=files, data={"seconds": "1", "seed": "1"}, timeout=60
        )
        assert r.status_code == 200, r.text
        for pl in players:
            assert pl.until(lambda m: m["type"] == "midi", timeout=10) is not None
            pl.send({"type": "stop"})
            assert pl.until(lambda m: m["type"] == "stopped") is not None
            pl.drain(5)
            assert not pl.sounding()
        assert scrape(srv.url)["improv_decode_workers"] == 2
    finally:
        srv.stop()
        rt.close()
