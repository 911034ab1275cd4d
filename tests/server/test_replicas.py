"""Two `improv serve` replicas behind HAProxy (deploy/haproxy.cfg as shipped, its ports moved to
free ones), real processes on loopback: sessions spread and stay on their replica, HTTP spreads,
and a replica's SIGTERM ends its sessions cleanly while new ones go to the other. Also: the
Kubernetes manifests load and carry what `kubectl apply` and the autoscaler need."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


def haproxy_config(front: int, stats: int, replicas: list[int]) -> str:
    """deploy/haproxy.cfg with its ports replaced."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = text.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{front}")
    text = text.replace("bind 127.0.0.1:8404", f"bind 127.0.0.1:{stats}")
    for i, port in enumerate(replicas, 1):
        text = text.replace(f"127.0.0.1:{8000 + i} check", f"127.0.0.1:{port} check")
    assert all(f":{p} check" in text for p in replicas)
    return text


def servers_up(stats_url: str) -> dict[str, str]:
    """HAProxy's view: server name -> status (UP / DOWN ...)."""
    text = httpx.get(stats_url + ";csv", timeout=2).text.lstrip("# ")
    return {
        r["svname"]: r["status"]
        for r in csv.DictReader(io.StringIO(text))
        if r["pxname"] == "replicas" and r["svname"] not in ("FRONTEND", "BACKEND")
    }


@pytest.fixture
def replicas(tiny_ckpt, tmp_path) -> Iterator[dict]:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    ports = [free_port(), free_port()]
    front, stats = free_port(), free_port()
    procs: dict[str, subprocess.Popen] = {}
    logs = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, port in zip(("r1", "r2"), ports, strict=True):
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        cmd = [sys.executable, "-m", "improv.cli", "serve", "--checkpoint", str(tiny_ckpt)]
        cmd += ["--port", str(port), "--device", "cpu", "--max-sessions", "8"]
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(front, stats, ports))
    procs["haproxy"] = subprocess.Popen(
        ["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    stats_url = f"http://127.0.0.1:{stats}/stats"
    try:
        for port in ports:
            wait_for(
                lambda p=port: httpx.get(f"http://127.0.0.1:{p}/health").status_code == 200,
                120,
                f"replica on {port} did not start",
            )
        wait_for(
            lambda: set(servers_up(stats_url).values()) == {"UP"}, 20, "haproxy: replicas not UP"
        )
        yield {
            "url": f"http://127.0.0.1:{front}",
            "ws": f"ws://127.0.0.1:{front}/v1/live",
            "ports": dict(zip(("r1", "r2"), ports, strict=True)),
            "procs": procs,
            "stats": stats_url,
            "logs": tmp_path,
        }
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


def live_sessions(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/health").json()["live_sessions"]


def open_session(make_player, url: str, seed: int) -> tuple[Any, str]:
    pl = make_player(url)
    replica = pl.ws.response.headers["X-Improv-Replica"]
    pl.send({"type": "start", "mode": "accompany", "seed": seed, "lookahead_ms": 100,
             "max_notes_per_second": 8, "rest_ms": None})  # fmt: skip
    assert pl.until(lambda m: m["type"] == "started", timeout=20) is not None
    return pl, replica


def test_two_replicas_behind_haproxy_spread_and_drain_on_sigterm(replicas, make_player):
    url, ws, ports = replicas["url"], replicas["ws"], replicas["ports"]
    # HTTP spreads over both.
    seen = {httpx.get(url + "/health").headers["X-Improv-Replica"] for _ in range(6)}
    assert seen == {"r1", "r2"}

    # Live sessions spread (leastconn) and stay on their replica.
    players = [open_session(make_player, ws, seed) for seed in range(8)]
    on = {name: [pl for pl, r in players if r == name] for name in ("r1", "r2")}
    assert {len(v) for v in on.values()} == {4}, {k: len(v) for k, v in on.items()}
    assert live_sessions(ports["r1"]) == 4 and live_sessions(ports["r2"]) == 4
    for i, (pl, _) in enumerate(players):  # the player plays: the model accompanies
        pl.note(60 + i, True)
    for pl, _ in players:
        assert pl.until(lambda m: m["type"] == "midi", timeout=20) is not None

    # SIGTERM r1 mid-run: its sessions end with `stopped`, every note ended.
    replicas["procs"]["r1"].send_signal(signal.SIGTERM)
    for pl in on["r1"]:
        m = pl.until(lambda m: m["type"] == "stopped", timeout=20)
        assert m is not None and m["reason"] == "shutdown", (m, pl.received[-5:])
        pl.drain(5)
        assert pl.closed_code in (1001, 1012)
        assert not pl.sounding(), "a note left sounding"
        ons, offs = pl.counts()
        assert ons == offs
    # (uvicorn re-raises the signal once it has shut down cleanly: exit status -SIGTERM)
    assert replicas["procs"]["r1"].wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (replicas["logs"] / "r1.log").read_text()

    # The others are unaffected: still open, still playing.
    for pl in on["r2"]:
        n = len(pl.received)
        assert pl.until(lambda m: m["type"] == "midi", timeout=10) is not None
        assert all(m["type"] != "stopped" for m in pl.received[n:])
    # New sessions go to the remaining replica (at once: r1 no longer listens).
    fresh = [open_session(make_player, ws, 100 + i) for i in range(2)]
    assert {r for _, r in fresh} == {"r2"}
    assert live_sessions(ports["r2"]) == 6
    assert {httpx.get(url + "/health").headers["X-Improv-Replica"] for _ in range(4)} == {"r2"}
    wait_for(lambda: servers_up(replicas["stats"])["r1"].startswith("DOWN"), 10, "r1 not DOWN")

    for pl, _ in players + fresh:
        if pl.closed_code is None:
            pl.send({"type": "stop"})
            m = pl.until(lambda m: m["type"] == "stopped", timeout=20)
            assert m is not None
            pl.drain(5)
            assert not pl.sounding()


def test_kubernetes_manifests_load_with_what_apply_and_autoscaling_need():
    docs = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service"} <= set(kinds)
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
    dep = kinds["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] and c["readinessProbe"]["httpGet"]["path"] == "/health"
    port = c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"]["port"] in (port, c["ports"][0].get("name"))
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("IMPROV_HOST") == "0.0.0.0"
    # SIGTERM ends the sessions cleanly; the pod is given the time to.
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 10
    svc = kinds["Service"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in (port, c["ports"][0].get("name"))
    # The session count for autoscaling: /metrics scraped, an HPA on improv_live_sessions.
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/path"] == "/metrics"
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "improv_live_sessions"
