"""The DAW bridge: in-memory ports against a real uvicorn server (respond, accompany with
retracts, MIDI clock -> tempo_bpm, reconnect after the server goes away), and the real thing:
`improv bridge --virtual` as a subprocess on a private JACK server, killed with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mido
import pytest
from jack_midi import Recorder, graph_stalled, jack_server, play_phrase, wait_port

from improv.clients.bridge import Bridge
from improv.midi import MemoryBackend, note_balance
from improv.midi.backends import close_port


def on(note: int, vel: int = 90) -> mido.Message:
    return mido.Message("note_on", note=note, velocity=vel)


def off(note: int) -> mido.Message:
    return mido.Message("note_off", note=note)


async def until(pred, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return False


async def phrase(b: MemoryBackend, pitches=(60, 64, 67), dur: float = 0.06) -> None:  # noqa: ANN001
    for k in pitches:
        b.play("daw out", on(k), thread=True)
        await asyncio.sleep(dur)
        b.play("daw out", off(k), thread=True)


def make_bridge(url: str, mode: str = "respond", **params) -> tuple[Bridge, MemoryBackend]:
    b = MemoryBackend(inputs=["daw out"], outputs=["daw in"])
    bridge = Bridge(url, mode=mode, params=params, in_port="daw out", out_port="daw in", backend=b)
    return bridge, b


@pytest.mark.asyncio
async def test_bridge_respond_then_stop(server, runtime):
    bridge, b = make_bridge(server.url, gap_ms=100, response_seconds=1.0, seed=11)
    task = asyncio.create_task(bridge.run())
    try:
        assert await until(bridge.connected.is_set, 10)
        await phrase(b)
        assert await until(lambda: note_balance(b.sent["daw in"])[0] > 0, 10)
        # The player's notes reached the session at their (clock-mapped) times.
        conn = next(iter(runtime.connections))
        assert conn.mode == "respond"
    finally:
        bridge.request_stop()
        await asyncio.wait_for(task, 10)
    ons, offs = note_balance(b.sent["daw in"])
    assert ons == offs and ons > 0
    assert bridge.player is not None and max(bridge.player.late_ms) < 1000


@pytest.mark.asyncio
async def test_bridge_accompany_follows_clock_and_stays_balanced(server, runtime):
    bridge, b = make_bridge(server.url, mode="accompany", seed=12, horizon_ms=400)
    task = asyncio.create_task(bridge.run())
    try:
        assert await until(bridge.connected.is_set, 10)
        b.play("daw out", mido.Message("start"))
        t_next = time.perf_counter()
        for _ in range(60):  # MIDI clock at 100 bpm: 24 per quarter note = 25 ms apart
            t_next += 0.025
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            b.play("daw out", mido.Message("clock"))
        await phrase(b, (62, 65, 69, 72, 74), dur=0.1)  # unforeseen notes: retracts
        conn = next(iter(runtime.connections))
        assert await until(lambda: conn.params.tempo_bpm != 120.0, 5)
        assert 80 < conn.params.tempo_bpm < 120, conn.params.tempo_bpm
        # After the start, the DAW's beats on the session clock: the grid for generated notes.
        assert await until(lambda: conn.params.beat_time is not None, 5)
        assert 0 < conn.params.beat_time <= conn.now_ms() and conn.params.grid_step_ms()
        # The player plays on until the (random) model answers: its waits may be long, and
        # each note of the player's rolls them back.
        for _ in range(20):
            if await until(lambda: note_balance(b.sent["daw in"])[0] > 0, 0.5):
                break
            await phrase(b, (62, 65, 69), dur=0.1)
        assert note_balance(b.sent["daw in"])[0] > 0
    finally:
        bridge.request_stop()
        await asyncio.wait_for(task, 10)
    ons, offs = note_balance(b.sent["daw in"])
    assert ons == offs and ons > 0


@pytest.mark.asyncio
async def test_bridge_reconnects_and_silences_on_drop(runtime, start_server, restart_server):
    s = start_server(runtime)
    # rest_ms None: the player plays one note; the (random) model may take a while to answer
    bridge, b = make_bridge(s.url, mode="accompany", seed=13, rest_ms=None)
    task = asyncio.create_task(bridge.run())
    try:
        assert await until(bridge.connected.is_set, 10)
        await phrase(b, (60,), dur=0.1)  # the accompaniment starts with the player
        assert await until(lambda: bool(bridge.out and bridge.out.sounding), 10)
        await asyncio.to_thread(s.stop)  # the server goes away mid-accompaniment
        assert await until(lambda: not bridge.connected.is_set(), 10)
        ons, offs = note_balance(b.sent["daw in"])
        assert ons == offs and not bridge.out.sounding  # notes off on the drop
        assert bridge.drops == 1
        await asyncio.sleep(1.0)  # a failed attempt or two (backoff)
        s = await asyncio.to_thread(restart_server, runtime, s.url)
        assert await until(lambda: bridge.sessions == 2 and bridge.connected.is_set(), 20)
    finally:
        bridge.request_stop()
        await asyncio.wait_for(task, 10)
        await asyncio.to_thread(s.stop)
    ons, offs = note_balance(b.sent["daw in"])
    assert ons == offs


def test_bridge_needs_ports():
    with pytest.raises(ValueError, match="--virtual"):
        Bridge("ws://x", virtual=True, in_port="a")
    with pytest.raises(ValueError):
        Bridge("ws://x", in_port="a")


@dataclass
class JackBridge:
    proc: subprocess.Popen
    rec: Recorder
    sender: mido.ports.BaseOutput
    log_path: Path  # the bridge's stdout and stderr, readable while it runs

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sigterm(self) -> None:
        """SIGTERM; the bridge must end cleanly within 20 s (its own limit is 12 s: then it
        exits 1 with every thread's stack in the log)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, (rc, self.log[-6000:])


@contextlib.contextmanager
def jack_bridge(server, runtime, tmp: Path, mode: str, *args: str) -> Iterator[JackBridge]:  # noqa: ANN001
    """`improv bridge URL --virtual ARGS` as a subprocess on a private JACK server, once its
    session (in `mode`) has started: the recorder on `improv bridge out`, a sender into
    `improv bridge in`. Killed at the end if still running; its output in `.log` while the
    block runs. Started again (on a new JACK server) if the JACK graph stalls as it starts
    (jack_midi.graph_stalled says why)."""
    for attempt in range(3):
        with _jack_bridge(server, runtime, tmp, mode, *args) as jb:
            if jb is not None:
                yield jb
                return
        logging.warning("the JACK graph stalled as the bridge started (attempt %d)", attempt + 1)
    raise AssertionError("the JACK graph stalled at every bridge start")


@contextlib.contextmanager
def _jack_bridge(
    server,
    runtime,
    tmp: Path,
    mode: str,
    *args: str,  # noqa: ANN001
) -> Iterator[JackBridge | None]:
    with jack_server() as env:
        cmd = [sys.executable, "-m", "improv.cli", "bridge", server.ws.rsplit("/v1", 1)[0],
               "--virtual", *args]  # fmt: skip
        earlier = {id(c) for c in list(runtime.connections)}  # (a stalled attempt's, closing)
        log_path = tmp / "bridge.log"
        with log_path.open("wb") as log:  # a file, not a pipe: nothing blocks on a full pipe
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        rec = sender = None
        try:
            in_name = wait_port("input", "improv bridge in")
            rec = Recorder(wait_port("output", "improv bridge out"))
            sender = mido.Backend(env["MIDO_BACKEND"]).open_output(in_name)
            # Wait for the session to have started: the bridge drops what was played before
            # (stale), so a phrase sent while it syncs its clock would get no answer.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(
                c.mode == mode and id(c) not in earlier for c in list(runtime.connections)
            ):
                time.sleep(0.05)
            # the bridge's own start handling (it drains its inbox then), and a look at JACK
            stalled = graph_stalled(env, 0.5)
            yield None if stalled else JackBridge(proc, rec, sender, log_path)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if sender is not None:
                close_port(sender)
            if rec is not None:
                rec.close()


def played_until(jb: JackBridge, play, pred, tries: int = 4, wait_s: float = 8.0) -> bool:  # noqa: ANN001
    """`play(jb.sender)` until the recorder's messages satisfy `pred` (at most `tries` times,
    `wait_s` apart): a JACK client that misses its cycle on a loaded machine loses that
    cycle's MIDI (jackd's log: "client ... was not finished"), a phrase with it."""
    for _ in range(tries):
        play(jb.sender)
        if jb.rec.wait(pred, wait_s):
            return True
    return False


@pytest.mark.jack
def test_bridge_virtual_on_jack_sigterm(server, runtime, tmp_path):
    """`improv bridge --virtual` as a subprocess on JACK: a phrase into `improv bridge in`
    comes back as generated notes on `improv bridge out`; SIGTERM leaves nothing sounding."""
    with jack_bridge(server, runtime, tmp_path, "respond", "--param", "gap_ms=100", "--param",
                     "response_seconds=3", "--param", "seed=21") as jb:  # fmt: skip
        # a response starts with a note (played again if it gets none: on a loaded machine a
        # JACK client that misses its cycle loses that cycle's MIDI)
        assert played_until(jb, play_phrase, lambda ms: note_balance(ms)[0] >= 1), (
            [
                (c.mode, c.stats.events_sent, c.stats.late_events) for c in runtime.connections
            ],  # did the server hear and answer?
            jb.log[-2000:],
        )
        jb.sigterm()  # mid-response (3 s long)
        time.sleep(0.3)
    ons, offs = note_balance(jb.rec.snapshot())
    assert ons > 0 and ons == offs, (ons, offs, jb.log[-2000:])
    assert "session stopped (stop)" in jb.log, jb.log[-2000:]


def chord_labels(ms: list[mido.Message]) -> list[str]:
    """The bridge's chord SysEx messages, in order: their labels."""
    head = b"\x7dimpv:"
    return [bytes(m.data[6:]).decode() for m in ms
            if m.type == "sysex" and bytes(m.data[:6]) == head]  # fmt: skip


@pytest.mark.jack
def test_bridge_sends_chart_chords_to_the_daw_on_jack(server, runtime, tmp_path):
    """`improv bridge --chords "C Am F G" --chord-sysex --chord-markers FILE`: accompany along the
    chart (from the player's first note, no DAW clock here); each chord reaches the DAW's port
    as SysEx text at its time, and the markers file holds them when the bridge stops."""
    markers = tmp_path / "chords.mid"
    with jack_bridge(server, runtime, tmp_path, "accompany", "--chords", "C Am F G", "--chord-sysex",
                     "--chord-markers", str(markers), "--param", "tempo_bpm=240",
                     "--param", "seed=22") as jb:  # fmt: skip

        def phrases(sender: mido.ports.BaseOutput) -> None:
            for _ in range(3):  # 1 s bars at 240 bpm: two chords within the phrases
                play_phrase(sender, dur=0.15)

        assert played_until(jb, phrases, lambda ms: chord_labels(ms)[:2] == ["C:maj", "A:min"]), (
            chord_labels(jb.rec.snapshot()),
            len(jb.rec.snapshot()),
            [
                (c.mode, c.stats.events_sent, c.stats.late_events) for c in runtime.connections
            ],  # did the server hear and answer?
            jb.log[-2000:],
        )
        jb.sigterm()
    ons, offs = note_balance(jb.rec.snapshot())
    assert ons == offs, (ons, offs, jb.log[-2000:])
    texts = [m.text for m in mido.MidiFile(markers).tracks[0] if m.type == "marker"]
    assert texts[:2] == ["C:maj", "A:min"], jb.log[-2000:]


def test_bridge_without_a_midi_system_is_one_line_and_exit_2(tmp_path):
    """#22 item 11: no JACK server (and no ALSA): what is missing and how to get it, no
    traceback."""
    import os

    env = {
        **os.environ,
        "MIDO_BACKEND": "mido.backends.rtmidi/UNIX_JACK",
        "JACK_DEFAULT_SERVER": "no-such-jack",
    }
    exe = Path(sys.executable).parent / "improv"
    for ports in (["--in", "x", "--out", "y"], ["--virtual"]):
        r = subprocess.run(
            [str(exe), "bridge", "ws://127.0.0.1:9", *ports],
            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]
        assert len(errors) == 1 and "MIDI is unavailable here" in errors[0], r.stderr
        assert "JACK" in errors[0] and "ALSA" in errors[0]


@contextlib.contextmanager
def deaf_server() -> Iterator[str]:
    """A WebSocket server that starts sessions and answers pings but never ends one: `stop`
    goes unanswered and the socket stays open (a hung server). Yields its ws:// URL."""
    import threading

    from websockets.sync.server import serve

    from improv.protocol import messages as p

    done = threading.Event()

    def handle(ws) -> None:  # noqa: ANN001
        for frame in ws:
            m = json.loads(frame)
            if m["type"] == "ping":
                ws.send(p.Pong(time=m["time"], server_time=0.0).model_dump_json())
            elif m["type"] == "start":
                params = p.LiveParams.model_validate({k: v for k, v in m.items()
                                                      if k not in ("type", "mode")})  # fmt: skip
                started = p.Started(session="deaf", mode=m["mode"], params=params, server_time=0)
                ws.send(started.model_dump_json())
        done.wait(60)  # the peer closed: answer nothing, not even the close

    with serve(handle, "127.0.0.1", 0) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            yield f"ws://127.0.0.1:{srv.socket.getsockname()[1]}"
        finally:
            done.set()
            srv.shutdown()


@pytest.mark.jack
def test_bridge_stops_in_bounded_time_when_the_server_does_not_answer(tmp_path):
    """SIGTERM with a server that never ends the session: the bridge gives it its grace time,
    then stops anyway (its run cancelled, the output silenced in its `finally`) with exit 0,
    and says why."""
    from improv.clients.cli import STOP_GRACE_S

    with deaf_server() as url, jack_server() as env:
        log_path = tmp_path / "bridge.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "improv.cli", "bridge", url,
                                     "--virtual"], env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while "session deaf" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "session deaf" in log_path.read_text(), log_path.read_text()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_path.read_text()
    assert rc == 0, log
    assert STOP_GRACE_S - 0.5 < took < STOP_GRACE_S + 5, (took, log)
    assert "did not end the session" in log, log
