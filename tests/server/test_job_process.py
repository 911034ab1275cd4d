"""HTTP generations in the worker process (server/job_process.py, the default) against the same
generations in the server's own threads (`http_worker="thread"`): the same answers, and a worker
that dies costs its requests a 503, not the server."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from midi_factory import midi_bytes, notes_track, simple_song


def post(server, path: str, file: bytes, data=None, headers=None) -> httpx.Response:
    return httpx.post(
        server.url + "/v1" + path,
        files={"file": ("in.mid", file, "audio/midi")},
        data=data or {},
        headers=headers or {},
        timeout=60,
    )


MELODY = midi_bytes([notes_track("MELODY", [(i * 240, 200, 60 + i % 7, 90) for i in range(16)])])


@pytest.mark.parametrize(
    ("path", "file", "fields"),
    [
        ("/continue", simple_song(2.0), {"seconds": "2", "seed": "3"}),
        ("/infill", simple_song(4.0), {"start": "1", "end": "2.5", "seed": "4"}),
        ("/accompany", MELODY, {"seed": "5", "chords": "C Am F G", "bpm": "120"}),
    ],
)
def test_the_worker_process_answers_as_the_servers_threads_do(
    server, thread_server, path, file, fields
):
    """process == thread: one request, one seed, the same model: the same notes, chords and
    headers (JSON), the same MIDI bytes, the same NDJSON stream."""
    as_json = {"Accept": "application/json"}
    a, b = (
        post(server, path, file, fields, as_json),
        post(thread_server, path, file, fields, as_json),
    )
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json() == b.json()
    assert any(n["generated"] for n in a.json()["notes"])
    for h in ("X-Improv-Generated-Seconds", "X-Improv-Stop-Reason"):
        assert a.headers[h] == b.headers[h]
    a, b = post(server, path, file, fields), post(thread_server, path, file, fields)
    assert a.content == b.content and a.headers["content-type"] == "audio/midi"
    assert 'filename="' in a.headers["content-disposition"]
    stream = {**fields, "stream": "true"}
    a, b = post(server, path, file, stream), post(thread_server, path, file, stream)
    lines = [json.loads(x) for x in a.text.splitlines()]
    assert lines == [json.loads(x) for x in b.text.splitlines()]
    assert lines[-1]["type"] == "done"


def test_a_broken_file_is_still_a_422_that_says_why(server):
    r = post(server, "/continue", b"MThd not really")
    assert r.status_code == 422 and "MIDI" in r.json()["detail"], r.text
    r = post(server, "/infill", simple_song(2.0), {"start": "5", "end": "6"})
    assert r.status_code == 422 and "start must be before the end" in r.json()["detail"]
    r = post(server, "/accompany", MELODY, {"chords": "C Xq:zz"})
    assert r.status_code == 422, r.text


def test_a_worker_that_dies_costs_its_requests_a_503_and_the_next_gets_a_new_one(
    tiny_ckpt, server_factory
):
    start_server, make_runtime = server_factory
    rt = make_runtime(tiny_ckpt, http_sessions=2)
    srv = start_server(rt)
    try:
        assert rt.jobs.ready.wait(60), "the worker process did not start"
        # ~40 s of a dense melody: an accompaniment of it takes the tiny model several seconds
        melody = midi_bytes(
            [notes_track("MELODY", [(i * 120, 100, 60 + i % 12, 90) for i in range(320)])]
        )
        answers: list[httpx.Response] = []
        t = threading.Thread(target=lambda: answers.append(post(srv, "/accompany", melody)))
        t.start()
        deadline = time.monotonic() + 30
        while rt.jobs.running() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rt.jobs.running() == 1, "the generation did not start"
        os.kill(rt.jobs.pid, signal.SIGKILL)
        t.join(30)
        assert answers[0].status_code == 503, answers[0].text
        assert "worker process stopped" in answers[0].json()["detail"]
        assert int(answers[0].headers["Retry-After"]) >= 1
        assert rt.jobs.held() == 0 and rt.jobs.running() == 0
        r = post(srv, "/continue", simple_song(2.0), {"seconds": "0.5", "seed": "1"})
        assert r.status_code == 200, r.text  # a new worker process served it
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    finally:
        srv.stop()
        rt.close()
