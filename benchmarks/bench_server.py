"""Server benchmark over loopback: trigger latency, send jitter, concurrent accompany sessions.

    .venv/bin/python benchmarks/bench_server.py [--checkpoint models/default] [--trials 100]
        [--sessions 1,4,16,32] [--seconds 20] [--no-write]

Starts `improv serve` in a subprocess (the client runs in this process, so the two don't share a
GIL), then measures over WebSocket:
(a) trigger -> first generated note-on received, p50/p99 over `trials` responses, the trigger
    30 ms after the player's note-off (as fast as a player presses "answer now") and 300 ms
    after it; and the gap's end (gap_ms 300) -> first note-on;
(b) send jitter: receive time minus intended send time (event time - lookahead), for events the
    server scheduled ahead (an accompany session sampling 1 s ahead after one player note); the
    client-side figure includes the loopback transfer; the server's own (Stopped.jitter_*) too;
(c) N concurrent accompany sessions, each fed a POP909 valid song's MELODY at real time: share of
    generated events sent after their time (server count) and received after it (client).
Without models/default, a random-weight `small` checkpoint is written to a temp folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from common import ROOT, SHARED_DATA, command_line, machine, write_section
from websockets.asyncio.client import connect


def small_random_checkpoint(folder: Path) -> Path:
    import torch

    from improv.engine.checkpoint import save_checkpoint
    from improv.engine.config import ModelConfig
    from improv.engine.model import Transformer
    from improv.engine.tokenizer.vocab import TokenizerConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("small"))
    return save_checkpoint(folder / "small", model, TokenizerConfig(), {"note": "random weights"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    ckpt: Path,
    port: int,
    max_sessions: int | None,
    log: Path,
    *extra: str,
    verbose: bool = False,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`improv serve` in a subprocess (max_sessions None: the server's default; python: another
    checkout's interpreter, to run its code side by side; env: added IMPROV_* settings)."""
    cmd = [python, "-m", "improv.cli", *(["-v"] if verbose else []), "serve"]
    cmd += ["--checkpoint", str(ckpt), "--port", str(port), "--device", "cpu", *extra]
    if max_sessions is not None:
        cmd += ["--max-sessions", str(max_sessions)]
    # Its log goes to a file: a pipe nobody reads fills up and then blocks the server.
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


class Client:
    """One session: a clock mapped to the server's, and the received generated events."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.offset = 0.0  # server session ms - local perf ms
        self.midi: list[tuple[float, dict]] = []  # (local receive time on the session clock, msg)
        self.other: list[dict] = []
        self.waiters: list[tuple[callable, asyncio.Future]] = []

    def now(self) -> float:
        return time.perf_counter() * 1000.0 + self.offset

    async def sync(self, n: int = 20) -> None:
        best = None
        for _ in range(n):
            t0 = time.perf_counter() * 1000.0
            await self.ws.send(json.dumps({"type": "ping", "time": t0}))
            while True:
                m = json.loads(await self.ws.recv())
                if m["type"] == "pong":
                    break
            t1 = time.perf_counter() * 1000.0
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, m["server_time"] - (t0 + t1) / 2)
        self.offset = best[1]

    async def reader(self) -> None:
        async for raw in self.ws:
            t = self.now()
            m = json.loads(raw)
            if m["type"] == "midi":
                self.midi.append((t, m))
            else:
                self.other.append(m)
            for pred, fut in list(self.waiters):
                if not fut.done() and pred(m):
                    fut.set_result((t, m))

    async def wait(self, pred, timeout: float = 10.0):
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((pred, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiters.remove((pred, fut))

    async def send(self, msg: dict) -> None:
        await self.ws.send(json.dumps(msg))


def is_on(m: dict) -> bool:
    return m["type"] == "midi" and m["data"][0] & 0xF0 == 0x90 and m["data"][2] > 0


async def open_client(url: str) -> tuple[Client, asyncio.Task]:
    ws = await connect(url, max_size=None, ping_interval=None)
    c = Client(ws)
    await c.sync()
    return c, asyncio.create_task(c.reader())


async def stop(c: Client, task: asyncio.Task) -> dict:
    await c.send({"type": "stop"})
    _, m = await c.wait(lambda m: m["type"] == "stopped", 30)
    await task
    return m


async def bench_latency(url: str, trials: int, silence_ms: float = 30, gap_ms: int = 0) -> dict:
    """Each trial: a 30 ms note, `silence_ms` of silence, then `trigger`; latency = trigger ->
    first generated note-on received. gap_ms > 0: no trigger, the gap answers; latency = the
    release + gap_ms -> first note-on received."""
    c, task = await open_client(url)
    await c.send({"type": "start", "mode": "respond", "gap_ms": gap_ms or 10000,
                  "response_seconds": 0.3, "lookahead_ms": 0, "seed": 1})  # fmt: skip
    await c.wait(lambda m: m["type"] == "started")
    lat = []
    for i in range(trials):
        await c.send({"type": "midi", "data": [0x90, 60 + i % 12, 90]})
        await asyncio.sleep(0.03)
        t_off = time.perf_counter()
        await c.send({"type": "midi", "data": [0x80, 60 + i % 12, 0]})
        if gap_ms:
            t0 = t_off + gap_ms / 1000
        else:
            await asyncio.sleep(silence_ms / 1000)
            t0 = time.perf_counter()
            await c.send({"type": "trigger"})
        await c.wait(is_on)
        lat.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.35)  # the response plays out
    await stop(c, task)
    a = np.array(lat)
    slow = np.argsort(a)[-5:]
    logging.getLogger("bench").info(
        "slowest trials (ms, trial index): %s", [(round(a[i], 1), int(i)) for i in slow]
    )
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


async def bench_jitter(url: str, seconds: float) -> dict:
    c, task = await open_client(url)
    lookahead = 100
    # The density cap of (c): without it the model falls behind its horizon on a loaded CPU,
    # and events sent late (at once, when sampled) would count as jitter.
    await c.send({"type": "start", "mode": "accompany", "lookahead_ms": lookahead,
                  "horizon_ms": 1000, "seed": 2, "drums": True,
                  "max_notes_per_second": 8, "rest_ms": None})  # fmt: skip
    await c.wait(lambda m: m["type"] == "started")
    # One note: the accompaniment starts with the player's first note, then plays on its own
    # (rest_ms None: it does not stop when the player does).
    await c.send({"type": "midi", "data": [0x90, 60, 90]})
    await c.send({"type": "midi", "data": [0x80, 60, 0]})
    await asyncio.sleep(seconds)
    st = await stop(c, task)
    # Events sent ahead of time: intended send = time - lookahead, in the future when generated.
    # (Skip the first second: the model starts behind the horizon.) Events received after their
    # own time were sampled too late to wait at all: they measure the model's speed, not the
    # sender's timing, and are counted apart.
    ev = [(t, m) for t, m in c.midi if m["time"] > 1500]
    j = [t - (m["time"] - lookahead) for t, m in ev if t <= m["time"]]
    a = np.array(j) if j else np.zeros(1)
    return {
        "n": len(j),
        "late_received": len(ev) - len(j),
        "client_p50": float(np.percentile(a, 50)),
        "client_p99": float(np.percentile(a, 99)),
        "server_p50": st.get("jitter_p50_ms"),
        "server_p99": st.get("jitter_p99_ms"),
        "late": st["late_events"],
        "sent": st["events_sent"],
    }


def _track_events(mf, index: int) -> list[tuple[float, list[int]]]:
    """A track's note events as (time ms, bytes), timed by the tempo map of track 0."""
    import mido

    t, tempo, events = 0.0, 500000, []
    for msg in mido.merge_tracks([mf.tracks[0], mf.tracks[index]]):
        t += mido.tick2second(msg.time, mf.ticks_per_beat, tempo) * 1000
        if msg.type == "set_tempo":
            tempo = msg.tempo
        elif msg.type in ("note_on", "note_off"):
            events.append((t, [b for b in msg.bytes()]))
    return events


def melodies(n: int, seconds: float, track: str = "MELODY") -> list[list[tuple[float, list[int]]]]:
    """MELODY tracks of POP909 valid songs as (time ms, bytes) from their first note; `track`:
    another track of the same songs in the same window (PIANO: what the real pianist played)."""
    import mido

    ids = (SHARED_DATA / "pop909" / "splits" / "valid.txt").read_text().split()
    out = []
    for sid in ids:
        if len(out) == n:
            break
        mf = mido.MidiFile(SHARED_DATA / "pop909" / sid / f"{sid}.mid")
        names = [next((m.name for m in t if m.type == "track_name"), "") for t in mf.tracks]
        if "MELODY" not in names:
            continue
        melody = _track_events(mf, names.index("MELODY"))
        if not melody:
            continue
        t0 = melody[0][0]
        events = melody if track == "MELODY" else []
        if not events and track in names:
            events = _track_events(mf, names.index(track))
        out.append([(tt - t0, b) for tt, b in events if 0 <= tt - t0 <= seconds * 1000])
    while len(out) < n:  # fewer valid songs than sessions: reuse them
        out.append(out[len(out) % max(1, len(out))])
    return out


async def play(
    url: str, song: list[tuple[float, list[int]]], seed: int, horizon_ms: int,
    parts: list[str] | None = None, extra: dict | None = None,
) -> dict:  # fmt: skip
    """One accompany session playing `song`; `extra`: more start fields (over the ones here)."""
    c, task = await open_client(url)
    # A density cap like a trained model's accompaniment: random weights otherwise play ~50
    # notes/s (1,280 of the 1,586 ids are note tokens), which no CPU keeps up with.
    # rest_ms None: the load stays on through a melody's long rests (comparable across runs).
    await c.send({"type": "start", "mode": "accompany", "lookahead_ms": 100, "seed": seed,
                  "max_notes_per_second": 8, "horizon_ms": horizon_ms,
                  "rest_ms": None, "parts": parts, **(extra or {})})  # fmt: skip
    await c.wait(lambda m: m["type"] == "started")
    start = c.now() + 200
    for t, data in song:
        delay = (start + t - c.now()) / 1000
        if delay > 0:
            await asyncio.sleep(delay)
        await c.send({"type": "midi", "data": data})  # stamped on arrival, like a live player
    await asyncio.sleep(0.3)
    st = await stop(c, task)
    late_client = sum(1 for t, m in c.midi if t > m["time"] + 1.0)
    # #23's targets count an event late at more than 10 ms (the counts above: 0.5 and 1 ms)
    late_10ms = sum(1 for t, m in c.midi if t > m["time"] + 10.0)
    return {"sent": st["events_sent"], "late": st["late_events"], "retracts": st["retracts"],
            "late_client": late_client, "late_10ms": late_10ms, "received": len(c.midi),
            "lag_pushes": st.get("lag_pushes", 0), "lag_ms": st.get("lag_ms", 0.0),
            "server_jitter_p99": st.get("jitter_p99_ms")}  # fmt: skip


async def bench_concurrent(url: str, n: int, seconds: float, horizon_ms: int) -> dict:
    songs = melodies(n, seconds)
    res = await asyncio.gather(*(play(url, s, i, horizon_ms) for i, s in enumerate(songs)))
    sent = sum(r["sent"] for r in res)
    return {
        "sessions": n,
        "events": sent,
        "late_pct": 100 * sum(r["late"] for r in res) / max(1, sent),
        "late_client_pct": 100 * sum(r["late_client"] for r in res) / max(1, sent),
        "retracts": sum(r["retracts"] for r in res),
        "per_session_s": sent / n / seconds,
        "lag_pushes": sum(r["lag_pushes"] for r in res),
        "lag_ms_mean": sum(r["lag_ms"] for r in res) / max(1, sum(r["lag_pushes"] for r in res)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "default"))
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--sessions", default="1,4,16,32")
    ap.add_argument("--seconds", type=float, default=20.0, help="melody length per session")
    ap.add_argument("--horizon-ms", type=int, default=300, help="accompany: horizon_ms sent")
    ap.add_argument(
        "--jitter-seconds", type=float, default=30.0, help="(b): how long the model plays"
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--log", default="", help="keep the server's log here")
    ap.add_argument(
        "--verbose", action="store_true", help="server debug log (e.g. each late event, why)"
    )
    ap.add_argument("--serve-args", default="", help="extra `improv serve` arguments")
    ap.add_argument(
        "--only",
        choices=["latency", "jitter", "concurrent"],
        help="only part (a), (b) or (c), not written",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint)
    model_note = f"`{ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt}`"
    if not (ckpt / "config.json").is_file():
        ckpt = small_random_checkpoint(Path(tmp.name))
        model_note = "a random-weight `small` checkpoint (models/default did not exist yet)"
    sessions = [int(x) for x in args.sessions.split(",")]
    port = free_port()
    log = Path(args.log or Path(tmp.name) / "server.log")
    proc = start_server(
        ckpt, port, max(sessions) + 2, log, *args.serve_args.split(), verbose=args.verbose
    )
    url = f"ws://127.0.0.1:{port}/v1/live"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/model") as r:
        backend = json.load(r)["backend"]
    try:
        if args.only == "concurrent":
            for n in sessions:
                print(
                    "concurrent",
                    asyncio.run(bench_concurrent(url, n, args.seconds, args.horizon_ms)),
                    flush=True,
                )
            return
        if args.only == "jitter":
            print("jitter", asyncio.run(bench_jitter(url, args.jitter_seconds)), flush=True)
            return
        lat = asyncio.run(bench_latency(url, args.trials))
        print("latency", lat, flush=True)
        if args.only == "latency":
            return
        lat300 = asyncio.run(bench_latency(url, args.trials // 2, silence_ms=300))
        print("latency, trigger after 300 ms", lat300, flush=True)
        gap = asyncio.run(bench_latency(url, args.trials // 2, gap_ms=300))
        print("latency, gap", gap, flush=True)
        jit = asyncio.run(bench_jitter(url, args.jitter_seconds))
        print("jitter", jit, flush=True)
        conc = []
        for n in sessions:
            conc.append(asyncio.run(bench_concurrent(url, n, args.seconds, args.horizon_ms)))
            print("concurrent", conc[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    rows = "\n".join(
        f"| {c['sessions']} | {c['events']} ({c['per_session_s']:.1f}/s per session) | {c['late_pct']:.2f}% | {c['late_client_pct']:.2f}% | {c['retracts']} | {c['lag_pushes']} ({c['lag_ms_mean']:.0f} ms) |"
        for c in conc
    )
    body = f"""## Server (loopback, {machine()})

Model: {model_note}, CPU, {backend} backend; server in its own process (`improv serve`), clients in
another, over WebSocket on 127.0.0.1. The machine is shared: other agents' jobs may have been running.

| measure | p50 | p99 | target |
|---|---|---|---|
| (a) `trigger` 30 ms after the player's note-off -> first generated note-on received, {args.trials} trials | {lat["p50"]:.1f} ms | {lat["p99"]:.1f} ms (max {lat["max"]:.1f}) | p99 <= 20 ms |
| (a) `trigger` 300 ms after the note-off, {args.trials // 2} trials | {lat300["p50"]:.1f} ms | {lat300["p99"]:.1f} ms (max {lat300["max"]:.1f}) | p99 <= 20 ms |
| (a) no trigger, `gap_ms` 300: note-off + 300 ms -> first note-on received, {args.trials // 2} trials | {gap["p50"]:.1f} ms | {gap["p99"]:.1f} ms (max {gap["max"]:.1f}) | p99 <= 20 ms |
| (b) send jitter, client side (receive - intended send, incl. loopback), {jit["n"]} events ({jit["late_received"]} received after their time left out: sampled too late) | {jit["client_p50"]:.2f} ms | {jit["client_p99"]:.2f} ms | p99 <= 1 ms |
| (b) send jitter, server side (send call - intended send); {jit["late"]} of {jit["sent"]} events sampled too late to wait | {jit["server_p50"]} ms | {jit["server_p99"]} ms | |

(c) Concurrent `accompany` sessions, each fed a POP909 valid song's MELODY (first {args.seconds:.0f} s) at
real time, events stamped on arrival, lookahead 100 ms, horizon {args.horizon_ms} ms, `rest_ms: null`, `max_notes_per_second: 8`
(a density cap; an untrained model plays ~50 notes/s). "Late" = a generated event
sent after its own time (server count; the note-offs sent at the stop, which have no earlier
time, are not counted) / received after it by more than 1 ms (client clock, synced by ping;
every event).
"Clock floor": times the model was behind real time and its next event was moved to when it
could still be sent on time (mean move in brackets); under overload the accompaniment thins
out there instead of arriving late, so read it with the events per session:

| sessions | generated events | late (server) | late (client) | retracts | clock floor moves |
|---|---|---|---|---|---|
{rows}

Command: `{command_line()}` (the target for 32 sessions is < 1% late).
"""
    print(body)
    if not args.no_write:
        write_section("server", body)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
