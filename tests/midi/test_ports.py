"""MIDI ports: name resolution, balanced outputs, vanishing ports (in-memory twin), the timed
player and retract, MIDI clock."""

from __future__ import annotations

import asyncio
import time

import mido
import pytest

from improv.midi import (
    InputPort,
    MemoryBackend,
    OutputPort,
    Player,
    PortError,
    TempoFollower,
    note_balance,
    resolve,
)


def on(note: int, ch: int = 0, vel: int = 90) -> mido.Message:
    return mido.Message("note_on", channel=ch, note=note, velocity=vel)


def off(note: int, ch: int = 0) -> mido.Message:
    return mido.Message("note_off", channel=ch, note=note)


# --- names ---------------------------------------------------------------------------------------
def test_resolve_exact_substring_none_several():
    names = ["Keystation 49 MIDI 1", "Midi Through Port-0", "Keystation 49 MIDI 2"]
    assert resolve(names, "Midi Through Port-0", "input") == "Midi Through Port-0"
    assert resolve(names, "through", "input") == "Midi Through Port-0"
    with pytest.raises(PortError, match=r"no MIDI input matches 'piano'; available: 'Keystation"):
        resolve(names, "piano", "input")
    with pytest.raises(PortError, match=r"matches 2 ports: 'Keystation 49 MIDI 1', 'Keystation"):
        resolve(names, "keystation", "input")
    with pytest.raises(PortError, match="available: none"):
        resolve([], "x", "output")


# --- outputs ---------------------------------------------------------------------------------------
def test_output_keeps_notes_balanced_and_closes_twice():
    b = MemoryBackend(outputs=["synth"])
    out = OutputPort(b, "syn")
    out.open()
    out.send(on(60))
    out.send(on(60))  # again while sounding: the first is ended first
    out.send(off(61))  # never started: dropped
    out.send([0x91, 40, 100])  # raw bytes are validated by mido
    with pytest.raises(ValueError):
        out.send([0x90, 200, 1])
    assert out.sounding == {(0, 60), (1, 40)}
    out.close()
    out.close()
    out.send(on(70))  # after close: ignored
    ons, offs = note_balance(b.sent["synth"])
    assert ons == offs == 3
    assert not out.sounding


def test_vanished_output_reopens_when_back():
    b = MemoryBackend(outputs=["synth"])
    out = OutputPort(b, "synth")
    out.open()
    out.send(on(60))
    b.vanish("synth")
    out.check()
    assert not out.present and not out.sounding  # the device took its notes with it
    out.send(on(62))  # nowhere to go, but bookkept
    b.restore("synth", output=True)
    out.check()
    assert out.present
    out.close()
    ons, offs = note_balance(b.sent["synth"])
    assert ons == 1  # only the note sent while present reached the device


@pytest.mark.asyncio
async def test_vanished_input_releases_held_keys():
    b = MemoryBackend(inputs=["keys"])
    got: list[mido.Message] = []
    inp = InputPort(
        b, "keys", asyncio.get_running_loop(), lambda m, t: got.append(m), time.monotonic
    )
    inp.open()
    b.play("keys", on(60), thread=True)  # rtmidi calls back on its own thread
    b.play("keys", on(64), thread=True)
    b.play("keys", off(60), thread=True)
    await asyncio.sleep(0.05)
    assert [m.type for m in got] == ["note_on", "note_on", "note_off"]
    changes: list[bool] = []
    inp.on_change = changes.append
    b.vanish("keys")
    inp.check()
    inp.release_held()
    assert changes == [False] and got[-1] == off(64)
    b.restore("keys", output=False)
    inp.check()
    assert changes == [False, True] and inp.present
    inp.close()
    inp.close()


# --- player ------------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_player_plays_at_times_and_honours_retract():
    b = MemoryBackend(outputs=["o"])
    out = OutputPort(b, "o")
    out.open()
    t0 = time.perf_counter() * 1000

    def now() -> float:
        return time.perf_counter() * 1000 - t0

    pl = Player(out, now)
    task = asyncio.create_task(pl.run())
    pl.push([0x90, 60, 80], 0)
    pl.push([0x80, 60, 0], 300)  # will be retracted
    pl.push([0x90, 62, 80], 80)
    pl.push([0x80, 62, 0], 120)
    pl.push([0x90, 64, 80], 400)  # will be retracted
    await asyncio.sleep(0.05)
    assert [m.note for m in b.sent["o"]] == [60]
    pl.retract(200)  # drops the two events after 200 ms; the server sends the note-off
    pl.push([0x80, 60, 0], 200)
    await asyncio.sleep(0.5)
    notes = [(m.type, m.note) for m in b.sent["o"]]
    assert notes == [("note_on", 60), ("note_on", 62), ("note_off", 62), ("note_off", 60)]
    assert pl.pending() == 0 and max(pl.late_ms) < 30
    task.cancel()
    out.close()
    assert note_balance(b.sent["o"]) == (2, 2)


@pytest.mark.asyncio
async def test_player_silence_ends_sounding_notes():
    b = MemoryBackend(outputs=["o"])
    out = OutputPort(b, "o")
    out.open()
    pl = Player(out, lambda: 1000.0)
    pl.push([0x92, 50, 80], 0)
    pl.push([0x82, 50, 0], 5000)
    pl.play_due()
    pl.silence()  # a drop: the queued note-off is gone, the note still ends
    assert pl.pending() == 0 and note_balance(b.sent["o"]) == (1, 1)


# --- MIDI clock ------------------------------------------------------------------------------------
def test_tempo_follower_tracks_clock_and_beats():
    seen: list[tuple[float, float | None]] = []
    tf = TempoFollower(lambda bpm, beat: seen.append((bpm, beat)))
    tf.feed("start", 0)
    t, clocks = 0.0, []
    for _ in range(48):  # two beats at 120 bpm: 24 ticks per 500 ms; the first clock is beat 1
        t += 500 / 24
        clocks.append(t)
        tf.feed("clock", t)
    assert seen and abs(seen[-1][0] - 120) < 0.5
    assert seen[0][1] == clocks[0]  # the phase from the first report on
    for _ in range(96):  # then 90 bpm
        t += 60_000 / 90 / 24
        clocks.append(t)
        tf.feed("clock", t)
    assert abs(seen[-1][0] - 90) < 0.5
    assert (len(clocks) - 1 - clocks.index(seen[-1][1])) < 24 * 4  # a recent beat...
    assert clocks.index(seen[-1][1]) % 24 == 0  # ...on a beat
    n = len(seen)
    for _ in range(24 * 8):  # steady: only the re-anchoring every 4 beats
        t += 60_000 / 90 / 24
        clocks.append(t)
        tf.feed("clock", t)
    assert len(seen) == n + 2 and all(abs(b - 90) < 0.5 for b, _ in seen[n:])
    assert all(clocks.index(beat) % 96 == 0 for _, beat in seen[n:])  # on the bar
    tf.feed("stop", t)
    assert not tf.running and tf.bpm == seen[-1][0] and seen[-1][1] is None  # grid ends
    tf.feed("continue", t)
    for _ in range(48):  # continue: the song position is unknown, so no phase
        t += 60_000 / 90 / 24
        tf.feed("clock", t)
    assert tf.beat_ms is None and seen[-1][1] is None
