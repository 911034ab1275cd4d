"""Live capacity (#23): many accompany sessions on one server, live sessions beside a full HTTP
generation queue, two replicas behind HAProxy.

    .venv/bin/python benchmarks/bench_capacity.py sessions [--sessions 16,32]
    .venv/bin/python benchmarks/bench_capacity.py mixed [--live 8] [--http-clients 20]
    .venv/bin/python benchmarks/bench_capacity.py replicas [--sessions 32] [--sigterm]
    .venv/bin/python benchmarks/bench_capacity.py workers [--sessions 16,32] [--tokens 64]
  sessions: [--horizon-ms 300]
  common: [--checkpoint models/default] [--seconds 20] [--label NAME] [--serve-args "..."]
          [--env IMPROV_X=1 ...] [--python OTHER/.venv/bin/python] [--no-write]

Each scenario starts its own `improv serve` process(es) with the default settings (plus
--serve-args / --env), the clients run in this process: the accompany sessions of
bench_server.py (a POP909 valid song's MELODY at real time, lookahead 100 ms, horizon 300 ms,
8 notes/s cap, `rest_ms: null`). Late = an event sent after its time (server count) / received
more than 1 ms after it (client), and more than 10 ms after it (client: #23's targets). The
scheduler's own figures (tokens/s, forwards per step, notes rejected, tokens per decode CPU
second, the share of sampled tokens a rollback cut) come from the server's /metrics, before
and after (absent on servers without it); the 1-minute load average is kept with each run. --python runs another checkout's server (its .venv), for the run side by side with the
previous commit: rows are kept per --label in the BENCHMARKS.md section `capacity`. `mixed`
runs benchmarks/rt_probe.py beside it: how late the machine wakes a real-time thread meanwhile.

`workers` is in-process, no server: the "both cores" alternatives on the decode alone, N
sessions at a live context (prompts of 600..1,400 tokens) each sampling --tokens tokens, wall
tokens/s, for one scheduler thread with 1 or 2 intra-op threads and for 2 decode workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from bench_server import (
    free_port,
    melodies,
    open_client,
    play,
    small_random_checkpoint,
    start_server,
)
from common import BENCHMARKS, ROOT, SHARED_DATA, command_line, machine, write_section

# --- the server's figures ---------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """/metrics as {name: value}; {} for a server without it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split(" ")
            out[name] = float(value)
    return out


def scheduler_figures(a: dict, b: dict, seconds: float) -> dict:
    """What the scheduler did between two scrapes."""
    if not a or not b:
        return {}
    d = {k: b[k] - a.get(k, 0.0) for k in b}
    steps = max(d["improv_steps_total"], 1.0)
    out = {
        "tokens_s": d["improv_tokens_total"] / seconds,
        "forwards_step": d["improv_forwards_total"] / steps,
        "prefill_forwards_step": d.get("improv_prefill_forwards_total", 0.0) / steps,
        "shadow_forwards_step": d.get("improv_shadow_forwards_total", 0.0) / steps,
        "rejected_min": d["improv_notes_rejected_total"] * 60 / seconds,
        "backoffs_min": d["improv_backoffs_total"] * 60 / seconds,
        "busy_pct": 100 * d["improv_busy_seconds_total"] / seconds,
        "rows_step": d["improv_tokens_total"] / steps,
        "workers": b.get("improv_decode_workers", 1),
    }
    if "improv_decode_cpu_seconds_total" in d:  # (servers before #23's second pass: none)
        cpu = max(d["improv_decode_cpu_seconds_total"], 1e-9)
        out |= {
            # CPU time (not wall): what a shared machine's load does not inflate
            "cpu_pct": 100 * cpu / seconds,
            "tokens_cpu_s": d["improv_tokens_total"] / cpu,
            "forward_cpu_ms": 1000
            * d["improv_forward_cpu_seconds_total"]
            / max(d["improv_forwards_total"], 1.0),
            # the rest of the server's processes: the event loop (receiving, sending), the
            # send clock, the live worker process's reader
            "other_cpu_pct": 100
            * (
                d["improv_process_cpu_seconds_total"]
                + d.get("improv_live_process_cpu_seconds_total", 0.0)
                - cpu
            )
            / seconds,
            # of the tokens sampled, the share a rollback removed again (a player's event
            # before the model's time: the horizon's price)
            "cut_share": d["improv_tokens_cut_total"] / max(d["improv_tokens_total"], 1.0),
        }
    return out


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.load(r)


# --- live sessions -----------------------------------------------------------------------------------


async def alone_rate(
    url: str, n: int, seconds: float, seed0: int = 0, horizon_ms: int = 300,
    parts: list[str] | None = None, start: dict | None = None,
) -> float:  # fmt: skip
    """Events/s per session of sessions_at_once's sessions played one at a time: what each
    plays with the server to itself (the demand), so thinning under load shows apart from the
    model's own density."""
    songs = melodies(n, seconds)
    solo = [await play(url, s, seed0 + i, horizon_ms, parts, start) for i, s in enumerate(songs)]
    return sum(r["sent"] for r in solo) / n / seconds


def piano_rate(n: int, seconds: float) -> float:
    """Events/s per session the real pianist played under the same melodies (POP909's PIANO
    track, the same windows): the density a musician expects of an accompaniment."""
    return sum(len(p) for p in melodies(n, seconds, "PIANO")) / n / seconds


async def sessions_at_once(
    url: str, n: int, seconds: float, seed0: int = 0, horizon_ms: int = 300,
    parts: list[str] | None = None, start: dict | None = None,
) -> dict:  # fmt: skip
    """n accompany sessions at once; refused ones (the server full) counted apart."""
    songs = melodies(n, seconds)
    res = await asyncio.gather(
        *(play(url, s, seed0 + i, horizon_ms, parts, start) for i, s in enumerate(songs)),
        return_exceptions=True,
    )
    ok = [r for r in res if isinstance(r, dict)]
    sent = sum(r["sent"] for r in ok)
    # The server's own send jitter (send call - intended send, events sent ahead), per session.
    server_p99 = [r["server_jitter_p99"] for r in ok if r["server_jitter_p99"] is not None]
    return {
        "sessions": n,
        "accepted": len(ok),
        "events": sent,
        "per_session_s": sent / max(1, len(ok)) / seconds,
        "late_pct": 100 * sum(r["late"] for r in ok) / max(1, sent),
        "late_client_pct": 100 * sum(r["late_client"] for r in ok) / max(1, sent),
        "late_10ms_pct": 100 * sum(r.get("late_10ms", 0) for r in ok) / max(1, sent),
        # generated events taken back by a rollback (a player's note): work thrown away
        "retracts_per_sent": sum(r["retracts"] for r in ok) / max(1, sent),
        # ms the clock floor pushed the model's time, per ms of music (the model's own events
        # can't sound there: after each player's event, and when it is behind real time;
        # pushes a rollback undid count too, so it can pass 100%: ~100% is saturated)
        "floor_pushed_pct": 100 * sum(r["lag_ms"] for r in ok) / max(1, len(ok)) / seconds / 1000,
        "jitter_server_p99_max": max(server_p99) if server_p99 else None,
        "jitter_server_p99_median": float(np.median(server_p99)) if server_p99 else None,
    }


async def http_load(url: str, clients: int, stop: asyncio.Event, seconds: float) -> dict:
    """`clients` loops of POST /v1/continue (a POP909 song, `seconds` more), each retrying a
    refused one (429/503) after its Retry-After, else after 1 s, until `stop`: the generation
    slots stay full. (Today a refused request is parsed and planned before it is refused: a
    client retrying every 50 ms made 1,409 of them in 25 s and 33% of the live events late.)"""
    import httpx

    ids = (SHARED_DATA / "pop909" / "splits" / "valid.txt").read_text().split()
    song = (SHARED_DATA / "pop909" / ids[0] / f"{ids[0]}.mid").read_bytes()
    counts = {"ok": 0, "busy": 0, "failed": 0}

    async def one(c: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            files = {"file": ("song.mid", song, "audio/midi")}
            data = {"seconds": str(seconds), "seed": str(i)}
            try:
                r = await c.post(url + "/v1/continue", files=files, data=data)
            except httpx.HTTPError:
                counts["failed"] += 1
                await asyncio.sleep(0.1)
                continue
            if r.status_code == 200:
                counts["ok"] += 1
            elif r.status_code in (429, 503):
                counts["busy"] += 1
                # (no Retry-After: once a second, about one request outstanding per client)
                await asyncio.sleep(float(r.headers.get("Retry-After", 1.0)))
            else:
                counts["failed"] += 1
                await asyncio.sleep(0.1)

    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*(one(c, i) for i in range(clients)))
    return counts


async def mixed(url: str, http_url: str, live: int, clients: int, seconds: float) -> dict:
    stop = asyncio.Event()
    load = asyncio.create_task(http_load(http_url, clients, stop, 8.0))
    await asyncio.sleep(3.0)  # the queue fills first
    res = await sessions_at_once(url, live, seconds)
    stop.set()
    res["http"] = await load
    return res


def start_probe() -> subprocess.Popen:
    """rt_probe.py beside the run: how late the machine itself wakes a real-time thread."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rt_probe.py")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def stop_probe(proc: subprocess.Popen) -> dict | None:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return json.loads(out) if out.strip() else None


# --- replicas behind HAProxy -------------------------------------------------------------------------


def haproxy_config(front: int, stats: int, replicas: list[int]) -> str:
    """deploy/haproxy.cfg, its frontend and stats ports moved, one server line per replica."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = text.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{front}")
    text = text.replace("bind 127.0.0.1:8404", f"bind 127.0.0.1:{stats}")
    lines = [f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(replicas, 1)]
    return re.sub(r"(    server r\d+ 127\.0\.0\.1:\d+ check\n)+", "\n".join(lines) + "\n", text)


def sounding_left(c) -> int:
    """Notes a client was left with: its midi in arrival order, retracts applied."""
    queue: list[dict] = []
    for m in sorted([m for _, m in c.midi] + c.other, key=lambda m: m.get("_seq", 0)):
        if m["type"] == "retract":
            queue = [x for x in queue if x["time"] <= m["after"]]
        elif m["type"] == "midi":
            queue.append(m)
    ring: dict[tuple[int, int], int] = {}
    for m in sorted(queue, key=lambda m: m["time"]):
        st, key, vel = m["data"][0], m["data"][1], m["data"][2] if len(m["data"]) > 2 else 0
        k = (st & 0x0F, key)
        if st & 0xF0 == 0x90 and vel > 0:
            ring[k] = ring.get(k, 0) + 1
        elif st & 0xF0 in (0x80, 0x90):
            ring[k] = max(0, ring.get(k, 0) - 1)
    return sum(1 for v in ring.values() if v)


async def replica_session(url: str, song, seed: int, seconds: float) -> dict:
    """One accompany session through the balancer; survives its replica going away."""
    c, task = await open_client(url)
    replica = c.ws.response.headers.get("X-Improv-Replica", "?")
    seq = 0
    orig_reader = c.reader

    async def reader() -> None:  # number the messages in arrival order (retracts vs midi)
        nonlocal seq
        async for raw in c.ws:
            t, m = c.now(), json.loads(raw)
            seq += 1
            m["_seq"] = seq
            (c.midi.append((t, m)) if m["type"] == "midi" else c.other.append(m))

    task.cancel()
    del orig_reader
    task = asyncio.create_task(reader())
    await c.send({"type": "start", "mode": "accompany", "lookahead_ms": 100, "seed": seed,
                  "max_notes_per_second": 8, "horizon_ms": 300, "rest_ms": None})  # fmt: skip
    start = c.now() + 200
    try:
        for t, data in song:
            if any(m["type"] == "stopped" for m in c.other):
                break
            delay = (start + t - c.now()) / 1000
            if delay > 0:
                await asyncio.sleep(delay)
            await c.send({"type": "midi", "data": data})
        await asyncio.sleep(0.3)
        if not any(m["type"] == "stopped" for m in c.other):
            await c.send({"type": "stop"})
    except Exception:  # the replica went away: what it sent before is what we judge
        pass
    try:
        await asyncio.wait_for(task, 30)
    except (TimeoutError, Exception):
        task.cancel()
    stopped = next((m for m in c.other if m["type"] == "stopped"), None)
    return {
        "replica": replica,
        "stopped": stopped["reason"] if stopped else None,
        "sent": stopped["events_sent"] if stopped else len(c.midi),
        "late": stopped["late_events"] if stopped else 0,
        "jitter_p99": stopped.get("jitter_p99_ms") if stopped else None,
        "stuck": sounding_left(c),
    }


async def replicas_run(url: str, ports: dict[str, int], n: int, seconds: float, sigterm, procs):
    songs = melodies(n, seconds)
    tasks = [asyncio.create_task(replica_session(url, s, i, seconds)) for i, s in enumerate(songs)]
    await asyncio.sleep(min(5.0, seconds / 2))
    spread = {name: health(p)["live_sessions"] for name, p in ports.items()}
    if sigterm:
        procs["r1"].send_signal(signal.SIGTERM)
    res = await asyncio.gather(*tasks)
    by = {name: [r for r in res if r["replica"] == name] for name in ports}
    j = [r["jitter_p99"] for r in res if r["jitter_p99"] is not None]
    sent = sum(r["sent"] for r in res)
    return {
        "sessions": n,
        "spread": spread,
        "late_pct": 100 * sum(r["late"] for r in res) / max(1, sent),
        "per_session_s": sent / max(1, n) / seconds,
        "stopped": {name: sorted({str(r["stopped"]) for r in v}) for name, v in by.items()},
        "stuck_notes": sum(r["stuck"] for r in res),
        "jitter_server_p99_max": max(j, default=None),
        "jitter_server_p99_median": float(np.median(j)) if j else None,
    }


def start_haproxy(ports: list[int], tmp: Path) -> tuple[subprocess.Popen, int]:
    if shutil.which("haproxy") is None:
        sys.exit("haproxy is not installed: apt-get install haproxy")
    front, stats = free_port(), free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(haproxy_config(front, stats, ports))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL)
    time.sleep(3.0)  # health checks: rise 2 x 1 s
    return proc, front


# --- decode workers vs intra-op threads (in-process) ---------------------------------------------


def decode_throughput(ckpt: Path, n: int, tokens: int, workers: int, threads: int) -> dict:
    """Wall tokens/s of n sessions sampling `tokens` each, decode phase only."""
    import torch
    from bench_sessions import make_prompt

    from improv.engine.engine import Engine
    from improv.engine.live import SamplingParams, Token
    from improv.engine.live.pool import SchedulerPool

    torch.set_num_threads(threads)  # the onnx decoder's intra-op threads follow it
    engine = Engine.load(str(ckpt), device="cpu", backend="onnx-int8")
    pool = SchedulerPool(engine, workers, max_sessions=-(-n // workers))
    v = engine.vocab
    sessions = [
        pool.open_session(make_prompt(v, 600 + (i * 211) % 800, i), sampling=SamplingParams(seed=i))
        for i in range(n)
    ]
    pool.run_until_idle()  # prefill every prompt
    pool.reset_stats()
    steps0 = pool.steps
    with pool:
        t0, c0 = time.perf_counter(), time.process_time()
        for s in sessions:
            s.generate(max_tokens=tokens)
        for s in sessions:
            got = 0
            while got < tokens:
                got += isinstance(s.events.get(timeout=600), Token)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = pool.stats
    return {
        "sessions": n,
        "workers": workers,
        "threads": threads,
        "tokens_s": n * tokens / wall,
        "cpu_per_wall": cpu / wall,
        "forwards_step": st["forwards"] / max(1, pool.steps - steps0),
    }


# --- BENCHMARKS.md -----------------------------------------------------------------------------------

DATA_RE = re.compile(r"<!-- capacity-data (.*?) -->", re.S)


def load_rows() -> dict:
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    m = DATA_RE.search(text)
    return json.loads(m.group(1)) if m else {}


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def probe_cell(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['late_2ms']} of {p['wakes']} ({p['max_ms']:.1f} ms){'' if p['realtime'] else ', not real-time'}"


def head(title: str, columns: list[str]) -> list[str]:
    """A table's title and header lines (markdown)."""
    return [f"### {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def commands(runs: dict) -> str:
    return "Commands: " + "; ".join(f"`{r['command']}`" for r in runs.values())


def render(rows: dict) -> str:
    """The section from every row kept (scenario -> label -> result)."""
    out = [
        "## Live capacity (#23)",
        "",
        f"Machine: {machine()}. Commands under each table; rows are kept per `--label` (one run",
        "each; the side-by-side run with the previous commit uses `--python` on its checkout).",
        "",
    ]
    s = rows.get("sessions", {})
    if s:
        out += head(
            "Accompany sessions on one server (default settings unless the label says)",
            ["label", "sessions", "accepted", "events/s per session",
             "events/s per session, each alone", "real piano's events/s, same songs",
             "late (server)",
             "late (client)", "late > 10 ms (client)", "tokens/s", "tokens per decode CPU s",
             "forwards/step", "notes rejected/min", "decode workers", "busy % (all workers)",
             "load (start, end)"],
        )  # fmt: skip
        for label, runs in s.items():
            for r in runs["results"]:
                g = r.get("scheduler", {})
                load = "-" if "load" not in r else "{:.1f}, {:.1f}".format(*r["load"])
                out.append(
                    f"| {label} | {r['sessions']} | {r['accepted']} | {r['per_session_s']:.1f} "
                    f"| {fmt(r.get('alone_per_session_s'))} | {fmt(r.get('piano_per_session_s'))} "
                    f"| {r['late_pct']:.2f}% | {r['late_client_pct']:.2f}% "
                    f"| {fmt(r.get('late_10ms_pct'), '.2f')}{'%' * ('late_10ms_pct' in r)} "
                    f"| {fmt(g.get('tokens_s'), '.0f')} | {fmt(g.get('tokens_cpu_s'), '.0f')} "
                    f"| {fmt(g.get('forwards_step'), '.2f')} "
                    f"| {fmt(g.get('rejected_min'), '.0f')} | {fmt(g.get('workers'), '.0f')} "
                    f"| {fmt(g.get('busy_pct'), '.0f')} | {load} |"
                )
        out += [
            "",
            "Targets: 16 sessions < 1% late at >= 12 events/s each; 32 accepted, < 2% late.",
        ]
        out += [commands(s), ""]
    m = rows.get("mixed", {})
    if m:
        out += head(
            "Live sessions while HTTP clients keep the generation queue full",
            ["label", "live sessions", "HTTP clients", "late (server)", "late (client)",
             "late > 10 ms (client)", "send jitter p99 (server; worst session / median session)",
             "a real-time probe's wakes > 2 ms late (its max)",
             "generations done / refused busy", "load (start, end)"],
        )  # fmt: skip
        for label, r in m.items():
            h = r["http"]
            load = "-" if "load" not in r else "{:.1f}, {:.1f}".format(*r["load"])
            out.append(
                f"| {label} | {r['sessions']} | {r['clients']} | {r['late_pct']:.2f}% "
                f"| {r['late_client_pct']:.2f}% "
                f"| {fmt(r.get('late_10ms_pct'), '.2f')}{'%' * ('late_10ms_pct' in r)} "
                f"| {fmt(r['jitter_server_p99_max'], '.2f')} / "
                f"{fmt(r['jitter_server_p99_median'], '.2f')} ms | {probe_cell(r.get('probe'))} "
                f"| {h['ok']} / {h['busy']} "
                f"| {load} |"
            )
        out += [
            "",
            "Target: live late < 1%, send jitter p99 <= 2 ms. The probe (benchmarks/rt_probe.py, "
            "a process of its own at the server's real-time priority sleeping 1 ms at a time) "
            "shows how late the machine itself wakes such a thread during the run.",
        ]
        out += [commands(m), ""]
    w = rows.get("workers", {})
    if w:
        out += head(
            "Both cores: decode workers vs intra-op threads (in-process, decode only)",
            ["label", "sessions", "scheduler threads x intra-op threads", "tokens/s (wall)",
             "CPU s per wall s", "forwards/step"],
        )  # fmt: skip
        for label, runs in w.items():
            for r in runs["results"]:
                out.append(
                    f"| {label} | {r['sessions']} | {r['workers']} x {r['threads']} "
                    f"| {r['tokens_s']:.0f} | {r['cpu_per_wall']:.2f} "
                    f"| {r['forwards_step']:.2f} |"
                )
        out += ["", commands(w), ""]
    rp = rows.get("replicas", {})
    if rp:
        out += head(
            "Two replicas behind HAProxy (deploy/haproxy.cfg), loopback",
            ["label", "sessions", "spread", "late (server)", "events/s per session",
             "sessions ended (SIGTERM to r1 with --sigterm)", "stuck notes"],
        )  # fmt: skip
        for label, r in rp.items():
            spread = " / ".join(f"{k} {v}" for k, v in r["spread"].items())
            ended = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["stopped"].items())
            out.append(
                f"| {label} | {r['sessions']} | {spread} | {r['late_pct']:.2f}% "
                f"| {r['per_session_s']:.1f} | {ended} | {r['stuck_notes']} |"
            )
        out += [
            "",
            "Target: 16/16 (+-4); the SIGTERMed replica's sessions end `shutdown`, 0 stuck.",
        ]
        out += [commands(rp), ""]
    out.append(f"<!-- capacity-data {json.dumps(rows)} -->")
    return "\n".join(out)


# --- main --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["sessions", "mixed", "replicas", "workers"])
    ap.add_argument("--tokens", type=int, default=64, help="workers: tokens per session")
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "default"))
    ap.add_argument("--sessions", default="16,32", help="sessions: counts; replicas: one count")
    ap.add_argument("--live", type=int, default=8, help="mixed: live sessions")
    ap.add_argument("--http-clients", type=int, default=20, help="mixed: HTTP clients")
    ap.add_argument("--seconds", type=float, default=20.0, help="melody length per session")
    ap.add_argument(
        "--horizon-ms", type=int, default=300, help="sessions: accompany's horizon_ms (its default)"
    )
    ap.add_argument(
        "--parts",
        help="sessions: the parts the model plays, comma-separated (default: the server's)",
    )
    ap.add_argument(
        "--start",
        help="sessions: more `start` fields as JSON, e.g. '{\"temperature\": 1.2}'",
    )
    ap.add_argument(
        "--alone",
        action="store_true",
        help="sessions: play the same sessions one at a time first (events/s alone: the demand)",
    )
    ap.add_argument("--sigterm", action="store_true", help="replicas: SIGTERM r1 mid-run")
    ap.add_argument("--serve-args", default="", help="extra `improv serve` arguments")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server(s)")
    ap.add_argument("--python", default=sys.executable, help="the server's interpreter")
    ap.add_argument("--label", default="this branch")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        ckpt = small_random_checkpoint(Path(tmp.name))
    env = dict(kv.split("=", 1) for kv in args.env)
    extra = args.serve_args.split()
    counts = [int(x) for x in args.sessions.split(",")]
    serve = dict(python=args.python, env=env)
    procs: dict[str, subprocess.Popen] = {}
    result: object
    try:
        if args.scenario == "workers":
            result = []
            for n in counts:
                for workers, threads in ((1, 1), (1, 2), (2, 1)):
                    r = decode_throughput(ckpt, n, args.tokens, workers, threads)
                    print("workers", r, flush=True)
                    result.append(r)
        elif args.scenario == "replicas":
            ports = {"r1": free_port(), "r2": free_port()}
            for name, port in ports.items():
                log = Path(tmp.name) / f"{name}.log"
                procs[name] = start_server(ckpt, port, None, log, *extra, **serve)
            procs["haproxy"], front = start_haproxy(list(ports.values()), Path(tmp.name))
            url = f"ws://127.0.0.1:{front}/v1/live"
            result = asyncio.run(
                replicas_run(url, ports, counts[0], args.seconds, args.sigterm, procs)
            )
            print("replicas", result, flush=True)
        else:
            port = free_port()
            log = Path(tmp.name) / "server.log"
            procs["server"] = start_server(ckpt, port, None, log, *extra, **serve)
            url = f"ws://127.0.0.1:{port}/v1/live"
            if args.scenario == "sessions":
                result = []
                parts = args.parts.split(",") if args.parts else None
                start = json.loads(args.start) if args.start else None
                for n in counts:
                    alone = (
                        asyncio.run(
                            alone_rate(url, n, args.seconds, 0, args.horizon_ms, parts, start)
                        )
                        if args.alone
                        else None
                    )
                    # the scheduler's figures cover the concurrent run only
                    a, t0, load0 = scrape(port), time.monotonic(), os.getloadavg()[0]
                    r = asyncio.run(
                        sessions_at_once(url, n, args.seconds, 0, args.horizon_ms, parts, start)
                    )
                    r["alone_per_session_s"] = alone
                    r["piano_per_session_s"] = piano_rate(n, args.seconds) if args.alone else None
                    r["scheduler"] = scheduler_figures(a, scrape(port), time.monotonic() - t0)
                    r["load"] = [load0, os.getloadavg()[0]]  # 1-minute load average: a shared CPU
                    print("sessions", r, flush=True)
                    result.append(r)
            else:
                a, t0, load0 = scrape(port), time.monotonic(), os.getloadavg()[0]
                http_url = f"http://127.0.0.1:{port}"
                probe = start_probe()
                try:
                    result = asyncio.run(
                        mixed(url, http_url, args.live, args.http_clients, args.seconds)
                    )
                finally:  # a failed run leaves no real-time process behind
                    probed = stop_probe(probe)
                result["probe"] = probed
                result["clients"] = args.http_clients
                result["scheduler"] = scheduler_figures(a, scrape(port), time.monotonic() - t0)
                result["load"] = [load0, os.getloadavg()[0]]
                print("mixed", result, flush=True)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    if args.no_write:
        return
    rows = load_rows()
    listed = args.scenario in ("sessions", "workers")
    entry = {"results": result} if listed else dict(result)  # type: ignore[arg-type]
    entry["command"] = command_line()
    rows.setdefault(args.scenario, {})[args.label] = entry
    write_section("capacity", render(rows))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
