"""The DAW bridge: MIDI ports <-> a live session on a (possibly remote) server.

The DAW's MIDI goes to the session stamped with the session clock (local time + the ping/pong
offset), so network jitter does not move the player's notes. Generated events arrive up to the
session's `lookahead_ms` early and are played at their session time mapped to the local clock:
jitter smaller than the lookahead becomes no delay at all, larger jitter a late note, never a
reordering. `retract` drops queued events; the output port keeps every note balanced; a dropped
connection silences the output and reconnects with backoff. MIDI clock from the DAW sets the
session's `tempo_bpm`, and after a MIDI start its `beat_time` (the DAW's beats on the session
clock): the server then puts generated notes on the DAW's grid (`grid`, 16ths by default) and
forces the bars and beats (and a chart's chords, `--chords`) at their times.

The session's chords reach the DAW on request: `chord_sysex` sends each as a SysEx text message
at its time on the output port (`F0 7D` (the non-commercial ID), ASCII `impv:` and the Harte
label, `F7`; a retract drops it like a note), and `chord_markers` writes them as marker meta
events into a MIDI file when the bridge stops (on the DAW's tempo, 0 = the first chord): MIDI
meta events exist only in files, not on a live port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import mido

from improv.midi import (
    CLOCK_TYPES,
    FORWARDED,
    Backend,
    InputPort,
    OutputPort,
    Player,
    TempoFollower,
    default_backend,
    open_both,
)

from .live import LiveClient, local_ms

logger = logging.getLogger(__name__)

BRIDGE_CLIENT = "improv bridge"
BRIDGE_IN, BRIDGE_OUT = "improv bridge in", "improv bridge out"
PING_EVERY_S = 2.0
CHORD_SYSEX_HEAD = [0xF0, 0x7D, *b"impv:"]  # a chord as SysEx: head + ASCII label + F7
BACKOFF_S = (0.5, 10.0)  # first and longest wait between reconnection attempts
CLOSE_PORTS_S = 4.0  # the MIDI system's time to close the ports at the end


class Bridge:
    """`await bridge.run()` until `bridge.request_stop()` (or cancel). `in_port`/`out_port`:
    names (substring match) of existing ports, or None with `virtual=True` for the bridge's own
    ports `improv bridge in` / `improv bridge out`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        mode: str = "respond",
        params: dict[str, Any] | None = None,
        in_port: str | None = None,
        out_port: str | None = None,
        virtual: bool = False,
        backend: Backend | None = None,
        lookahead_ms: int = 80,
        chord_sysex: bool = False,
        chord_markers: str | Path | None = None,
    ) -> None:
        if virtual == bool(in_port or out_port) or (not virtual and not (in_port and out_port)):
            raise ValueError("give --virtual, or both --in and --out")
        self.url, self.token, self.mode = url, token, mode
        self.params = {"lookahead_ms": lookahead_ms, **(params or {})}
        self.backend = backend or default_backend()
        self.virtual = virtual
        self.in_query = BRIDGE_IN if virtual else in_port or ""
        self.out_query = BRIDGE_OUT if virtual else out_port or ""
        self.client: LiveClient | None = None
        self.out: OutputPort | None = None
        self.inp: InputPort | None = None
        self.player: Player | None = None
        self.tempo = TempoFollower(self._on_tempo)
        self.tempo_bpm: float | None = None
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self.connected = asyncio.Event()  # set while a session runs
        self.sessions = 0  # sessions started (reconnects + 1)
        self.drops = 0
        self.error: str | None = None  # why the bridge gave up (a refused token)
        self.ports_stuck = False  # the MIDI system did not close the ports in time
        self.chord_sysex = chord_sysex
        self.chord_markers = Path(chord_markers) if chord_markers is not None else None
        self.chords: list[tuple[float, str]] = []  # (local ms, label): retracts applied

    # --- clocks -----------------------------------------------------------------------------------
    def session_now(self) -> float:
        c = self.client
        if c is None or c.offset is None:
            return float("-inf")  # nothing is due without a session
        return local_ms() + c.offset

    # --- ports ------------------------------------------------------------------------------------
    def open_ports(self) -> None:
        loop = asyncio.get_running_loop()
        self.out = OutputPort(self.backend, self.out_query, self.virtual, BRIDGE_CLIENT)
        self.inp = InputPort(
            self.backend, self.in_query, loop, self._on_input, local_ms, self.virtual, BRIDGE_CLIENT
        )
        open_both(self.out, self.inp)
        self.player = Player(self.out, self.session_now)

    def _on_input(self, msg: mido.Message, t_local: float) -> None:
        if msg.type in CLOCK_TYPES:
            self.tempo.feed(msg.type, t_local)
        elif msg.type in FORWARDED:
            self._inbox.put_nowait({"data": msg.bytes(), "t": t_local})

    def _on_tempo(self, bpm: float, beat_ms: float | None) -> None:
        if bpm != self.tempo_bpm:
            logger.info("DAW tempo %.1f bpm", bpm)
        self.tempo_bpm = bpm
        self._inbox.put_nowait({"tempo_bpm": bpm, "beat": beat_ms})  # beat: local clock

    # --- running ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """A stop was asked for (or the bridge gave up)."""
        return self._stop.is_set()

    async def run(self) -> None:
        """Connect, play, reconnect on drops, until `request_stop()`; ports closed at the end."""
        if self.out is None:
            self.open_ports()
        assert self.player is not None and self.out is not None and self.inp is not None
        tasks = [
            asyncio.create_task(self.player.run(), name="bridge-player"),
            asyncio.create_task(self.out.watch(), name="bridge-out-watch"),
            asyncio.create_task(self.inp.watch(), name="bridge-in-watch"),
        ]
        backoff = BACKOFF_S[0]
        try:
            while not self._stop.is_set():
                ok = await self._session()
                if self._stop.is_set():
                    break
                backoff = BACKOFF_S[0] if ok else min(backoff * 2, BACKOFF_S[1])
                logger.info("reconnecting to %s in %.1f s", self.url, backoff)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.player.play_due()
            self.player.silence()
            # The user's file before the MIDI system's teardown: a CI run's bridge hung right
            # after closing its JACK ports (every stack in the log: the main thread stalled
            # in this write, a JACK callback thread inside Python's GIL), the file unwritten.
            if self.chord_markers is not None:
                write_chord_markers(self.chord_markers, self.chords, self.tempo_bpm or 120.0)
            await self._close_ports()

    async def _close_ports(self) -> None:
        """Close both ports, giving the MIDI system CLOSE_PORTS_S. The note-offs are sent by
        now; closing a JACK port waits for them to go out (rtmidi flushes the output, up to
        1 s), then for the JACK server, which may stall (a stalled JACK graph was seen in
        tests): `ports_stuck` then tells the CLI to end the process without the C libraries'
        teardown. (The bound needs the GIL back: a close that blocks holding it is left to
        the CLI's faulthandler deadline, which needs no GIL.)"""
        assert self.inp is not None and self.out is not None
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def close() -> None:  # its own daemon thread: a stuck one must not hold the exit
            try:
                self.out.close()  # the output first: its note-offs are flushed
                self.inp.close()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=close, name="bridge-close-ports", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), CLOSE_PORTS_S)
        except TimeoutError:
            self.ports_stuck = True
            logger.warning(
                "the MIDI system did not close the ports within %.0f s; leaving them to it",
                CLOSE_PORTS_S,
            )

    async def _session(self) -> bool:
        """One connection: returns True if a session ran (resets the backoff)."""
        assert self.player is not None
        client = LiveClient(self.url, self.token)
        ran = False
        try:
            await client.connect()
            self.client = client
            await client.sync_clock()
            params = dict(self.params)
            if self.tempo_bpm is not None:
                params["tempo_bpm"] = self.tempo_bpm
                beat = self.tempo.beat_ms
                params["beat_time"] = None if beat is None else beat + client.offset
            started = await client.start(self.mode, **params)
            logger.info("session %s: %s", started.session, started.mode)
            ran = True
            self.sessions += 1
            self._drain_inbox()  # what was played while disconnected is stale
            self.connected.set()
            recv = asyncio.create_task(self._receive(client))
            tasks = {
                recv,
                asyncio.create_task(self._forward(client)),
                asyncio.create_task(self._clock(client)),
            }
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({*tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                # Stop: the server's final note-offs arrive before the socket closes.
                await client.stop()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(recv), 2.0)
            else:
                stop.cancel()
                self.drops += 1
                logger.warning(
                    "connection to %s dropped (%s %s)",
                    self.url,
                    client.close_code,
                    client.close_reason,
                )
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        except Exception as e:  # OSError, LiveError, timeouts: unreachable or refused
            if client.close_code == 1008:  # a wrong token will not get better by retrying
                self.error = f"the server refused the token ({client.close_reason})"
                logger.error("%s", self.error)
                self._stop.set()
            else:
                logger.warning("cannot reach %s: %s", self.url, e)
        finally:
            self.connected.clear()
            self.player.play_due()
            self.player.silence()  # notes-off on drop: nothing may hang while away
            await client.close()
        return ran

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            m = self._inbox.get_nowait()
            if "tempo_bpm" in m:
                self.tempo_bpm = m["tempo_bpm"]

    async def _receive(self, client: LiveClient) -> None:
        assert self.player is not None
        heard: dict[float, str] = {}  # this session's chords by time (session ms), retracts applied
        async for msg in client:
            if msg.type == "midi":
                self.player.push(msg.data, msg.time)
            elif msg.type == "retract":
                self.player.retract(msg.after)
                # (a chord played already stays: the server may send it again after a retract)
                after = max(msg.after, self.session_now())
                heard = {t: c for t, c in heard.items() if t <= after}
                self.chords = [c for c in self.chords if c[0] <= after - (client.offset or 0.0)]
            elif msg.type == "chord" and heard.get(msg.time) != msg.label:
                heard[msg.time] = msg.label  # a later chord at the same time replaces it
                t = msg.time - (client.offset or 0.0)  # local: reconnects keep one timeline
                self.chords = [c for c in self.chords if abs(c[0] - t) > 0.5] + [(t, msg.label)]
                if self.chord_sysex:
                    self.player.push(chord_sysex(msg.label), msg.time)
            elif msg.type == "error":
                logger.warning("server: %s: %s", msg.code, msg.message)
            elif msg.type == "stopped":
                logger.info("session stopped (%s)", msg.reason)
            self.player.play_due()

    async def _forward(self, client: LiveClient) -> None:
        while True:
            m = await self._inbox.get()
            if "tempo_bpm" in m:
                beat = m["beat"]
                assert client.offset is not None
                await client.params(
                    tempo_bpm=m["tempo_bpm"],
                    beat_time=None if beat is None else beat + client.offset,
                )
            else:
                assert client.offset is not None
                await client.send_midi(m["data"], m["t"] + client.offset)

    async def _clock(self, client: LiveClient) -> None:
        """Keep the offset fresh (clocks drift; the fastest round trips win)."""
        while True:
            await asyncio.sleep(PING_EVERY_S)
            await client.ping()


def chord_sysex(label: str) -> list[int]:
    """A chord label as the bridge's SysEx text message."""
    text = [b for b in label.encode("ascii", "replace") if b < 0x80]
    return [*CHORD_SYSEX_HEAD, *text, 0xF7]


def write_chord_markers(path: Path, chords: list[tuple[float, str]], bpm: float) -> None:
    """The chords as marker meta events in a one-track MIDI file (0 = the first chord)."""
    tempo = mido.bpm2tempo(bpm)
    mf = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=tempo)])
    mf.tracks.append(track)
    chords = sorted(chords)
    t0 = chords[0][0] if chords else 0.0
    last = 0
    for t, label in chords:
        tick = int(round(mido.second2tick((t - t0) / 1000.0, 480, tempo)))
        track.append(mido.MetaMessage("marker", text=label, time=tick - last))
        last = tick
    mf.save(path)
    logger.info("%d chord markers written to %s", len(chords), path)
