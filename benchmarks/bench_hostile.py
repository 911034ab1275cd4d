"""Hostile clients against a real `improv serve` (#22): a fuzzer's uploads and frames.

    .venv/bin/python benchmarks/bench_hostile.py [--checkpoint models/default] [--concurrent 20]
        [--uploads 2000] [--frames 1000] [--examples 20] [--no-write]

Starts `improv serve` in a subprocess (the clients run in this process), then:
(a) /health every 10 ms while `concurrent` clients upload hostile files over and over (a note
    count past the cap, absurd delta times, 4 MiB of garbage, a file at the note cap): p50/p99;
(b) `uploads` mutated MIDI files (seeded) to /v1/continue, /v1/infill, /v1/accompany: statuses
    (a 5xx is a failure);
(c) `frames` malformed WebSocket frames (deep nesting, non-objects, broken JSON, bad fields) into
    4 accompany sessions while they play: sessions that died (no pong, no `stopped`) and notes
    left sounding after `stop` (a note-on without its note-off);
(d) schemathesis on every operation (`examples` per operation, seed 1): failures;
(e) the server's RSS before (a) and after (d).
Test MIDI is built in code (tests/midi_factory.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent import futures as concurrent_futures
from pathlib import Path

import httpx
import numpy as np
from bench_server import free_port, small_random_checkpoint, start_server
from common import ROOT, command_line, machine, write_section
from websockets.asyncio.client import connect

sys.path.insert(0, str(ROOT / "tests"))  # the shared test MIDI builders (no package)
from midi_factory import (  # noqa: E402
    absurd_deltas,
    many_notes,
    midi_bytes,
    mutate,
    notes_track,
    simple_song,
    sounding,
)

MALFORMED = [
    "[" * 30000,
    "{" + '"a":{' * 5000 + "}" * 5001,
    "1",
    "null",
    "[]",
    '"start"',
    "{",
    '{"type": 7}',
    '{"type": "midi", "data": [999, -1]}',
    '{"type": "midi", "data": [144, 60, 100], "time": -5}',
    '{"type": "params", "temperature": "hot"}',
    '{"type": "start", "mode": "sing"}',
]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def poll_health(url: str, seconds: float) -> list[float]:
    """/health every 10 ms for `seconds`: latencies, ms."""
    lat = []
    with httpx.Client(timeout=30) as c:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.01)
    return lat


async def bench_health(url: str, concurrent: int, seconds: float, cap: int) -> dict:
    bodies = [
        ("/v1/continue", many_notes(cap + 1)),
        ("/v1/accompany", absurd_deltas(1)),
        ("/v1/continue", absurd_deltas(8)),
        ("/v1/continue", b"MThd" + bytes(random.Random(1).randbytes(4 * 1024 * 1024 - 8))),
        ("/v1/infill", many_notes(cap)),
    ]
    statuses: dict[int, int] = {}
    stop = asyncio.Event()

    async def upload(c: httpx.AsyncClient, i: int) -> None:
        k = i
        while not stop.is_set():
            path, body = bodies[k % len(bodies)]
            k += concurrent
            data = {"seconds": "1", "start": "0", "end": "1"}
            r = await c.post(url + path, files={"file": ("x.mid", body)}, data=data)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrent + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        tasks = [asyncio.create_task(upload(c, i)) for i in range(concurrent)]
        await asyncio.sleep(1.0 if concurrent else 0.0)  # every upload under way
        # the poller is a process of its own: this one's loop is busy with the uploads
        with concurrent_futures.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            lat = await asyncio.wrap_future(ex.submit(poll_health, url, seconds))
        stop.set()
        await asyncio.gather(*tasks)
    return {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "max": max(lat),
        "polls": len(lat),
        "statuses": statuses,
    }


async def bench_mutated(url: str, n: int, concurrent: int = 8) -> dict:
    rng = random.Random(22)
    songs = [simple_song(3.0, seed=s) for s in range(4)]
    melody = midi_bytes(
        [notes_track("MELODY", [(i * 240, 200, 60 + i % 7, 90) for i in range(12)])]
    )
    jobs = []
    for i in range(n):
        path = ("/v1/continue", "/v1/infill", "/v1/accompany")[i % 3]
        base = melody if path == "/v1/accompany" else songs[i % len(songs)]
        data = {"seconds": "0.5", "start": "0.5", "end": "1.0", "seed": str(i)}
        jobs.append((path, mutate(base, rng), data))
    statuses: dict[int, int] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)

    async def worker(c: httpx.AsyncClient) -> None:
        while not queue.empty():
            path, body, data = queue.get_nowait()
            r = await c.post(url + path, files={"file": ("x.mid", body)}, data=data)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    async with httpx.AsyncClient(timeout=300) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrent)))
    return {"statuses": statuses, "5xx": sum(v for k, v in statuses.items() if k >= 500)}


async def bench_frames(ws_url: str, n: int, sessions: int = 4) -> dict:
    rng = random.Random(5)
    per = n // sessions

    async def one(k: int) -> tuple[bool, int, int]:
        queue: list[dict] = []
        got: list[dict] = []
        async with connect(ws_url, max_size=2**22) as ws:

            async def reader() -> None:
                async for raw in ws:
                    m = json.loads(raw)
                    got.append(m)
                    if m["type"] == "midi":
                        queue.append(m)
                    elif m["type"] == "retract":
                        queue[:] = [e for e in queue if e["time"] <= m["after"]]

            task = asyncio.create_task(reader())
            start = {"type": "start", "mode": "accompany", "seed": k, "lookahead_ms": 0}
            await ws.send(json.dumps({**start, "rest_ms": None}))
            held: list[int] = []
            for i in range(per):
                if i % 10 == 0:  # the player plays on between bad frames
                    if held:
                        await ws.send(json.dumps({"type": "midi", "data": [128, held.pop(), 0]}))
                    key = 55 + rng.randrange(20)
                    held.append(key)
                    await ws.send(json.dumps({"type": "midi", "data": [144, key, 90]}))
                frame = MALFORMED[rng.randrange(len(MALFORMED))]
                if rng.random() < 0.2:  # random bytes as text
                    frame = rng.randbytes(rng.randrange(1, 64)).decode("latin-1")
                await ws.send(frame)
                await asyncio.sleep(0.002)
            for key in held:
                await ws.send(json.dumps({"type": "midi", "data": [128, key, 0]}))
            await ws.send(json.dumps({"type": "ping", "time": 1}))
            await asyncio.sleep(0.5)
            alive = any(m["type"] == "pong" for m in got)
            await ws.send(json.dumps({"type": "stop"}))
            try:
                await asyncio.wait_for(task, 15)
            except (TimeoutError, Exception):
                task.cancel()
        alive = alive and any(m["type"] == "stopped" for m in got)
        ons = sum(1 for m in queue if m["data"][0] & 0xF0 == 0x90 and m["data"][2] > 0)
        return alive, len(sounding(queue)), ons

    res = await asyncio.gather(*(one(k) for k in range(sessions)))
    return {
        "frames": per * sessions,
        "sessions": sessions,
        "dead": sum(1 for a, _, _ in res if not a),
        "stuck": sum(s for _, s, _ in res),
        "model_notes": sum(o for _, _, o in res),
    }


def warm_up(url: str, port: int) -> None:
    """Valid requests of each kind, 8 at once (the batch sizes the run will see: onnxruntime
    plans memory per shape), and 4 live sessions."""
    song = simple_song(3.0)
    kinds = (
        ("/v1/continue", {"seconds": "1"}),
        ("/v1/infill", {"start": "0.5", "end": "1.5"}),
        ("/v1/accompany", {}),
    )

    async def run() -> None:
        async with httpx.AsyncClient(timeout=300) as c:
            await asyncio.gather(
                *(
                    c.post(url + path, files={"file": ("x.mid", song)}, data=data)
                    for path, data in kinds * 3
                )
            )

    asyncio.run(run())
    asyncio.run(bench_frames(f"ws://127.0.0.1:{port}/v1/live", 40))
    time.sleep(1.0)


def bench_schemathesis(url: str, examples: int) -> dict:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [st, "--config-file", str(ROOT / "schemathesis.toml"), "run", url + "/openapi.json"]
        cmd += ["--max-examples", str(examples), "--seed", "1", "--no-color"]
        cmd += ["--report-dir", tmp]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        out = r.stdout + r.stderr
    tested = next((ln.split(":")[1].strip() for ln in out.splitlines() if "Tested:" in ln), "?")
    cases = next((ln.strip() for ln in out.splitlines() if " generated, " in ln), "?")
    return {
        "rc": r.returncode,
        "tested": tested,
        "cases": cases,
        "seconds": time.perf_counter() - t0,
        "tail": out[-1500:] if r.returncode else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: models/default (random if absent)")
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0, help="(a): how long /health is polled")
    ap.add_argument("--uploads", type=int, default=2000)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--examples", type=int, default=20, help="schemathesis examples per operation")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    ckpt = Path(args.checkpoint) if args.checkpoint else ROOT / "models" / "default"
    if not (ckpt / "config.json").exists():
        ckpt = small_random_checkpoint(tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(ckpt, port, 4, tmp / "server.log")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        cap = httpx.get(url + "/v1/model").json()["limits"]["max_upload_notes"]
        rss_up = rss_mb(proc.pid)
        warm_up(url, port)  # "before": a server that has served what the run will ask
        load0 = load()
        rss0 = rss_mb(proc.pid)
        print(f"server up (RSS {rss_up:.0f}, warm {rss0:.0f} MiB, load {load0})", flush=True)
        quiet = asyncio.run(bench_health(url, 0, min(args.seconds, 5.0), cap))
        print("health, no uploads", quiet, flush=True)
        health = asyncio.run(bench_health(url, args.concurrent, args.seconds, cap))
        print("health", health, f"RSS {rss_mb(proc.pid):.0f}", flush=True)
        mutated = asyncio.run(bench_mutated(url, args.uploads))
        print("mutated", mutated, f"RSS {rss_mb(proc.pid):.0f}", flush=True)
        frames = asyncio.run(bench_frames(f"ws://127.0.0.1:{port}/v1/live", args.frames))
        print("frames", frames, f"RSS {rss_mb(proc.pid):.0f}", flush=True)
        schema = bench_schemathesis(url, args.examples)
        print("schemathesis", {k: v for k, v in schema.items() if k != "tail"}, schema["tail"])
        time.sleep(2.0)  # let the last requests' memory go
        rss1 = rss_mb(proc.pid)
        load1 = load()
        alive = proc.poll() is None and httpx.get(url + "/health").status_code == 200
        print(f"RSS {rss0:.0f} -> {rss1:.0f} MiB; server alive: {alive}; load {load1}")
    finally:
        proc.terminate()
        proc.wait(30)
    drift = (rss1 - rss0) / rss0 * 100
    ok = lambda b: "met" if b else "**NOT met**"  # noqa: E731
    body = f"""## Hostile clients (`benchmarks/bench_hostile.py`)

A real `improv serve` (subprocess, {ckpt.name} checkpoint, CPU) against a fuzzer's traffic from a
second process (#22). Machine: {machine()}; load average {load0} at the start, {load1} at the end
(the machine is shared: latencies move with it).

| check | result | target |
|---|---|---|
| /health with no other traffic ({quiet["polls"]} polls) | p50 {quiet["p50"]:.1f} ms, p99 {quiet["p99"]:.1f} ms | (the machine's floor) |
| /health while {args.concurrent} hostile uploads run at once ({health["polls"]} polls over {args.seconds:g} s) | p50 {health["p50"]:.1f} ms, p99 **{health["p99"]:.1f} ms**, max {health["max"]:.0f} ms | p99 <= 50 ms: {ok(health["p99"] <= 50)} |
| their answers | {", ".join(f"{k}: {v}" for k, v in sorted(health["statuses"].items()))} | 4xx only |
| {args.uploads} mutated MIDI uploads (continue, infill, accompany) | {", ".join(f"{k}: {v}" for k, v in sorted(mutated["statuses"].items()))}; **{mutated["5xx"]} 5xx** | 0 5xx: {ok(mutated["5xx"] == 0)} |
| {frames["frames"]} malformed WebSocket frames into {frames["sessions"]} playing accompany sessions ({frames["model_notes"]} model notes) | **{frames["dead"]} dead sessions, {frames["stuck"]} stuck notes** | 0 and 0: {ok(frames["dead"] == 0 and frames["stuck"] == 0)} |
| schemathesis, every operation ({schema["tested"]} tested, {args.examples} examples each, seed 1) | {schema["cases"]}; exit {schema["rc"]} | 0 failures: {ok(schema["rc"] == 0)} |
| server RSS before -> after (before: warmed up by 9 valid requests at once and 4 live sessions; {rss_up:.0f} MiB at startup) | {rss0:.0f} -> {rss1:.0f} MiB ({drift:+.1f}%) | within 10%: {ok(abs(drift) <= 10)} |

Hostile uploads: {cap + 1} notes (the cap is {cap}), one note at delta 0x0FFFFFFF (division 1),
8 such notes, 4 MiB of garbage after `MThd`, a file at the cap. Command: `{command_line()}`
"""
    print(body)
    if not args.no_write:
        write_section("hostile", body)


if __name__ == "__main__":
    main()
