"""What a fuzzer and a security probe found (#22 items 1-5), against a real uvicorn server on
loopback: hostile uploads don't stall the server, malformed frames don't kill a session or
leave a note sounding, abandoned requests stop, tokens are checked safely and never logged."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from improv.server.settings import Settings

from midi_factory import absurd_deltas, many_notes, midi_bytes, notes_track, simple_song


def post(server, path, file: bytes, data=None, headers=None, timeout=60):
    files = {"file": ("x.mid", file, "audio/midi")}
    return httpx.post(
        server.url + path, files=files, data=data or {}, headers=headers, timeout=timeout
    )


# --- item 3: absurd delta times ----------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/continue", "/v1/infill", "/v1/accompany"])
def test_absurd_delta_times_are_a_4xx_not_a_500(server, path):
    """8 notes at delta 0x0FFFFFFF: the 32-bit tick count wraps to negative times."""
    r = post(server, path, absurd_deltas(8), {"start": "0", "end": "1", "seconds": "1"})
    assert r.status_code == 422, r.text
    assert "delta times" in r.json()["detail"]


# --- item 1: cheap checks first, bounded work, /health stays responsive -----------------------
def test_the_37_byte_file_is_refused_at_once(server):
    """One note at delta 0x0FFFFFFF, division 1: refused before any planning."""
    body = absurd_deltas(1)
    assert len(body) == 37
    t0 = time.perf_counter()
    r = post(server, "/v1/accompany", body)
    assert r.status_code == 422 and time.perf_counter() - t0 < 2.0, r.text


def test_note_count_and_length_are_checked_before_the_work(server, runtime):
    cap = runtime.settings.max_upload_notes
    t0 = time.perf_counter()
    r = post(server, "/v1/continue", many_notes(cap + 1), {"seconds": "1"})
    assert r.status_code == 422 and f"at most {cap}" in r.json()["detail"], r.text
    assert time.perf_counter() - t0 < 5.0
    # a melody longer than the accompaniment limit: refused as it is read
    limit = runtime.settings.max_accompany_seconds
    long_melody = midi_bytes(
        [notes_track("MELODY", [(0, 100, 60, 90), (int(limit) * 960, 100, 62, 90)])]
    )
    r = post(server, "/v1/accompany", long_melody)
    assert r.status_code == 422 and f"at most {limit:g} s" in r.json()["detail"], r.text


POLL = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
lat, end = [], time.perf_counter() + seconds
while time.perf_counter() < end:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert r.status == 200
    lat.append(time.perf_counter() - t0)
    time.sleep(0.01)
print(json.dumps(lat))
"""


def test_health_stays_responsive_during_hostile_uploads(server, runtime):
    """20 hostile uploads at once (note counts past the cap, absurd times, garbage, a file at
    the cap) while /health is polled from another process: every upload is a 4xx, and /health
    answers quickly throughout."""
    cap = runtime.settings.max_upload_notes
    bodies = [many_notes(cap + 1), absurd_deltas(8), b"MThd" + b"\xff" * 5000, many_notes(cap)]
    statuses: list[int] = []

    def upload(i: int) -> None:
        body = bodies[i % len(bodies)]
        data = {"seconds": "1", "parts": "tuba"} if i % 4 == 3 else {"seconds": "1"}
        statuses.append(post(server, "/v1/continue", body, data, timeout=120).status_code)

    poller = subprocess.Popen(
        [sys.executable, "-c", POLL, server.url, "4"], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.5)
    threads = [threading.Thread(target=upload, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    out, _ = poller.communicate(timeout=60)
    lat = json.loads(out)
    assert len(statuses) == 20 and all(400 <= s < 500 for s in statuses), statuses
    p99 = float(np.percentile(lat, 99))
    # a shared CI machine: a loose bound here (before: seconds; BENCHMARKS.md has the figure)
    assert len(lat) > 20 and p99 < 0.5, f"/health p99 {p99 * 1000:.0f} ms over {len(lat)} polls"


# --- item 2: malformed frames ------------------------------------------------------------------
MALFORMED = [
    "[" * 30000,  # under the 64 KiB limit: RecursionError in the JSON decoder
    "{" + '"a":{' * 5000 + "}" * 5001,
    "1",
    "null",
    "[]",
    '"start"',
    "true",
    "{",
    '{"type": 7}',
]


def test_malformed_frames_get_an_error_and_the_session_goes_on(server, make_player, caplog):
    pl = make_player(server.ws)
    pl.send({"type": "start", "mode": "accompany", "seed": 1, "lookahead_ms": 0, "rest_ms": None})
    assert pl.until(lambda m: m["type"] == "started")
    for i in range(6):  # the model plays along
        pl.note(60 + i, True)
        time.sleep(0.05)
    pl.until(lambda m: m["type"] == "midi", timeout=10)
    caplog.set_level(logging.INFO)
    errors = 0
    for frame in MALFORMED:
        pl.send(frame)
        m = pl.until(lambda m: m["type"] == "error", timeout=5)
        assert m is not None, f"no error frame for {frame[:20]!r}"
        assert m["code"] in ("bad_json", "bad_message"), m
        errors += 1
    # many more: the session survives (error replies are rate-limited), the log stays short
    for _ in range(300):
        pl.send(MALFORMED[2 + _ % 3])
    pl.send({"type": "ping", "time": 1.0})
    assert pl.until(lambda m: m["type"] == "pong", timeout=10), "the session died"
    for i in range(6):
        pl.note(60 + i, False)
    pl.send({"type": "stop"})
    assert pl.until(lambda m: m["type"] == "stopped", timeout=10)
    pl.drain(5)
    assert pl.closed_code == 1000
    assert not pl.sounding(), "a note was left sounding"
    assert errors == len(MALFORMED)
    lines = [r for r in caplog.records if r.name.startswith("improv.server")]
    assert not any(r.exc_info for r in lines), "a traceback was logged for bad input"
    assert len(lines) < 20, [r.getMessage() for r in lines]


def test_a_reader_that_fails_still_ends_the_notes(server, make_player, monkeypatch):
    """Should anything escape `handle`, the session ends with its note-offs and `stopped`
    (not close 1006 with notes on)."""
    from improv.server.live import LiveConnection

    pl = make_player(server.ws)
    pl.send({"type": "start", "mode": "accompany", "seed": 2, "lookahead_ms": 0, "rest_ms": None})
    assert pl.until(lambda m: m["type"] == "started")
    for i in range(4):
        pl.note(64 + i, True)
        time.sleep(0.05)
    pl.until(lambda m: m["type"] == "midi", timeout=10)

    async def boom(self, message):
        raise RuntimeError("a bug")

    monkeypatch.setattr(LiveConnection, "handle", boom)
    pl.send({"type": "ping", "time": 0})
    stopped = pl.until(lambda m: m["type"] == "stopped", timeout=10)
    assert stopped is not None and stopped["reason"] == "error"
    pl.drain(5)
    assert not pl.sounding()


# --- item 4: abandoned requests stop ---------------------------------------------------------
def _raw_post(url: str, path: str, body: bytes, fields: dict[str, str]) -> socket.socket:
    """A multipart POST on a raw socket (left open: the caller abandons it)."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "xHOSTILEx"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.mid"\r\n'
        "Content-Type: audio/midi\r\n\r\n".encode()
        + body
        + b"\r\n"
    )
    payload = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
        f"boundary={boundary}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(head + payload)
    return s


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_stops_when_its_client_goes_away(server, runtime, stream):
    # ~40 s of a dense melody: an accompaniment of it takes the tiny model several seconds
    melody = midi_bytes(
        [notes_track("MELODY", [(i * 120, 100, 60 + i % 12, 90) for i in range(320)])]
    )
    fields = {"seed": "1", "stream": "true" if stream else "false"}
    socks = [_raw_post(server.url, "/v1/accompany", melody, fields) for _ in range(2)]
    # (running: engine sessions open for jobs, in the worker process by default)
    assert _wait(lambda: runtime.jobs.running() == 2, 20), "the generations did not start"
    t0 = time.monotonic()
    for s in socks:
        s.close()
    assert _wait(lambda: runtime.jobs.running() == 0 and runtime.jobs.held() == 0, 3.0), (
        "an abandoned generation kept its slot"
    )
    assert time.monotonic() - t0 < 3.0
    # the slots are free: the next request is served, not a 503
    r = post(server, "/v1/continue", simple_song(2.0), {"seconds": "0.5", "seed": "1"})
    assert r.status_code == 200, r.text


# --- item 5: tokens ----------------------------------------------------------------------------
def test_an_empty_token_is_refused():
    with pytest.raises(ValueError, match="must not be empty"):
        Settings(token="")
    with pytest.raises(ValueError, match="must not be empty"):
        Settings(token="  ")


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def test_tokens_non_ascii_header_subprotocol_and_no_token_in_the_log(runtime, server_factory):
    start_server, _ = server_factory
    srv = start_server(runtime, token="sésame")
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    grab = Grab()
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addHandler(grab)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        # a non-ASCII Bearer: 401, not a 500 (hmac refuses to compare non-ASCII str)
        r = httpx.get(srv.url + "/v1/model", headers={"Authorization": "Bearer é".encode()})
        assert r.status_code == 401, r.text
        ok = httpx.get(srv.url + "/v1/model", headers={"Authorization": "Bearer sésame".encode()})
        assert ok.status_code == 200, ok.text
        # the WebSocket: header, subprotocol (what the page uses), query
        hello = json.dumps({"type": "ping", "time": 1})
        for kw in (
            # header values go out as ISO-8859-1: the UTF-8 bytes of the token, as curl sends
            {
                "additional_headers": {
                    "Authorization": "Bearer " + "sésame".encode().decode("latin-1")
                }
            },
            {"subprotocols": ["improv", "improv.bearer." + _b64("sésame")]},
        ):
            with connect(srv.ws, open_timeout=10, **kw) as ws:
                ws.send(hello)
                assert json.loads(ws.recv(timeout=5))["type"] == "pong"
                if "subprotocols" in kw:
                    assert ws.subprotocol == "improv"
        with connect(srv.ws + "?token=s%C3%A9same", open_timeout=10) as ws:
            ws.send(hello)
            assert json.loads(ws.recv(timeout=5))["type"] == "pong"
        for bad in ({"subprotocols": ["improv", "improv.bearer." + _b64("nope")]},
                    {"subprotocols": ["improv", "improv.bearer.!!"]}):  # fmt: skip
            with connect(srv.ws, open_timeout=10, **bad) as ws:
                with pytest.raises(Exception):  # noqa: B017 - closed 1008
                    ws.recv(timeout=5)
                assert ws.close_code == 1008
    finally:
        srv.stop()
        for name in ("uvicorn.access", "uvicorn.error"):
            logging.getLogger(name).removeHandler(grab)
    joined = "\n".join(records)
    assert "token=***" in joined, joined  # the query's request was logged, redacted
    assert "s%C3%A9same" not in joined and "sésame" not in joined


# --- item 8: a queue before the 503, Retry-After ----------------------------------------------
def test_generations_queue_then_503_with_retry_after(tiny_ckpt, server_factory):
    start_server, make_runtime = server_factory
    rt = make_runtime(tiny_ckpt, http_sessions=1, generation_queue=1, generation_wait_s=1.5)
    srv = start_server(rt)
    try:
        melody = midi_bytes(
            [notes_track("MELODY", [(i * 120, 100, 60 + i % 12, 90) for i in range(320)])]
        )
        long_one = _raw_post(srv.url, "/v1/accompany", melody, {"seed": "1"})
        assert _wait(lambda: rt.jobs.running() == 1, 20), "the first generation did not start"
        song, data = simple_song(2.0), {"seconds": "0.5", "seed": "1"}
        queued: list[httpx.Response] = []
        t = threading.Thread(target=lambda: queued.append(post(srv, "/v1/continue", song, data)))
        t.start()
        time.sleep(0.3)  # it waits in the queue; the queue (1) is full now
        full = post(srv, "/v1/continue", song, data)
        assert full.status_code == 503, full.text
        assert int(full.headers["Retry-After"]) >= 1 and "queue is full" in full.json()["detail"]
        t.join(30)
        assert queued[0].status_code == 503 and "within 1.5 s" in queued[0].json()["detail"]
        assert int(queued[0].headers["Retry-After"]) >= 1
        long_one.close()  # the slot comes free: a queued request is served
        assert _wait(lambda: rt.jobs.running() == 0, 5)
        assert post(srv, "/v1/continue", song, data).status_code == 200
    finally:
        srv.stop()
        rt.close()


def test_a_body_that_trickles_in_does_not_hold_the_intake(server, monkeypatch):
    """Slow clients (headers sent, the body never finished) give up their place in the intake
    (a few requests read and planned at once) after IntakeLimit.BODY_TIMEOUT_S."""
    from improv.server.admission import IntakeLimit

    monkeypatch.setattr(IntakeLimit, "BODY_TIMEOUT_S", 1.0)
    host, port = server.url.removeprefix("http://").split(":")
    slow = []
    for _ in range(4):  # more than the intake's places
        s = socket.create_connection((host, int(port)))
        s.sendall(
            b"POST /v1/continue HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        )
        slow.append(s)
    time.sleep(0.2)
    t0 = time.perf_counter()
    r = post(server, "/v1/continue", simple_song(2.0), {"seconds": "0.5", "seed": "1"}, timeout=30)
    assert r.status_code == 200, r.text
    assert time.perf_counter() - t0 < 10
    for s in slow:
        s.close()
