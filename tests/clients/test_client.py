"""Client (HTTP) and LiveClient (WebSocket) against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import io

import mido
import pytest

from improv.clients import Client, ImprovError, LiveClient, LiveError
from improv.clients.live import live_url

from midi_factory import simple_song


def test_live_url():
    assert live_url("ws://h:1") == "ws://h:1/v1/live"
    assert live_url("http://h:1/", "s e") == "ws://h:1/v1/live?token=s+e"
    assert live_url("https://h/v1/live") == "wss://h/v1/live"
    assert live_url("127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/live"


def test_continue_infill_accompany(server):
    song = simple_song(4.0)
    with Client(server.url) as c:
        assert c.health()["status"] == "ok"
        out = c.continue_(song, seconds=2.0, seed=1)
        assert isinstance(out, mido.MidiFile) and out.length > 3.5
        filled = c.infill(mido.MidiFile(file=io.BytesIO(song)), start=1.0, end=2.0, seed=2)
        assert isinstance(filled, mido.MidiFile) and len(filled.tracks) >= 1
        acc = c.accompany(song, parts=["bass"], programs={"bass": 33}, seed=3)
        assert isinstance(acc, mido.MidiFile)


def test_errors_carry_the_servers_message(server, tmp_path):
    path = tmp_path / "song.mid"
    path.write_bytes(simple_song(2.0))
    with Client(server.url) as c:
        with pytest.raises(ImprovError) as e:
            c.infill(path, start=2.0, end=1.0)
        assert e.value.status == 422 and "end must be after start" in e.value.message
        with pytest.raises(ImprovError) as e:
            c.continue_(b"not midi")
        assert e.value.status == 422 and e.value.message


def test_token_refused(runtime, start_server):
    s = start_server(runtime, token="sesame")
    try:
        with Client(s.url) as c, pytest.raises(ImprovError) as e:
            c.model()
        assert e.value.status == 401 and "token" in e.value.message
        with Client(s.url, token="sesame") as c:
            assert "config" in c.model()
    finally:
        s.stop()


@pytest.mark.asyncio
async def test_live_client_respond(server):
    async with LiveClient(server.url) as live:
        offset = await live.sync_clock()
        assert offset == live.offset and live.rtt_ms is not None and live.rtt_ms < 500
        assert 0 <= live.server_now() < 5000  # the session clock started at connect
        started = await live.start("respond", gap_ms=100, response_seconds=1.0, seed=7)
        assert started.params.gap_ms == 100
        for k in (60, 64, 67):
            await live.send_midi([0x90, k, 90], live.server_now())
            await asyncio.sleep(0.05)
            await live.send_midi([0x80, k, 0], live.server_now())
        first = None
        while first is None:
            msg = await live.next(timeout=10)
            if msg.type == "midi" and msg.data[0] & 0xF0 == 0x90:
                first = msg
        assert first.part == "lead"
        await live.params(temperature=0.5)
        stopped = await live.stop()
        assert stopped is not None and stopped.reason == "stop"
        received = [m async for m in live]
    sounding: dict[tuple[int, int], float] = {}  # note -> its note-on time
    for m in [first, *received]:
        if m.type == "retract":  # events after `after` are cancelled: those notes never sound
            sounding = {k: t for k, t in sounding.items() if t <= m.after}
        elif m.type == "midi" and m.data[0] & 0xF0 == 0x90 and m.data[2] > 0:
            sounding[(m.data[0] & 15, m.data[1])] = m.time
        elif m.type == "midi" and m.data[0] & 0xF0 in (0x80, 0x90):
            sounding.pop((m.data[0] & 15, m.data[1]), None)
    # Everything after `first` was queued; the stop's note-offs (or its retract of what had not
    # sounded yet) end whatever still sounded (before `first` only a program change can come).
    assert not sounding


@pytest.mark.asyncio
async def test_live_client_bad_params_raise(server):
    async with LiveClient(server.url) as live:
        with pytest.raises(LiveError, match="temperature"):
            await live.start("respond", temperature=9)
