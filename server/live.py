"""One `LiveConnection` per live session: respond and accompany modes over the engine scheduler.

The connection owns everything the session allocated (its engine session, its sender task, its
timers, its generated notes) and releases it in `close()`, which every exit path reaches. It is
transport-free: it takes an async `send(ServerMessage)` and exposes `handle(message)`; the
WebSocket endpoint (http.py) and the MIDI-port bridge are thin adapters. Protocol:
docs/protocol.md. Engine contract: docs/engine-live.md.

Threading: all state here lives on the asyncio loop; engine events arrive on the scheduler thread
and are handed over with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import mido
import numpy as np
from pydantic import ValidationError

from improv.engine.constraints import (
    BeatGrid,
    Candidates,
    Constraint,
    GrammarState,
    MaxDuration,
    NoteDensity,
    Parts,
    PitchRange,
    Programs,
)
from improv.engine.live import Done, Event, LiveSession, Rollback, SamplingParams, Token
from improv.engine.tokenizer.stream import DRUM_CHANNEL, part_channel
from improv.engine.tokenizer.vocab import TokenType, Vocab
from improv.protocol import messages as p

from .runtime import Runtime, SessionLimit

logger = logging.getLogger(__name__)

Send = Callable[[Any], Awaitable[None]]

ACCOMPANY_TICK_S = 0.05  # how often accompany extends its sampling horizon
RETRACT_EPS_MS = 0.001  # a retract just before an event's time drops that event too
MAX_ERRORS_PER_S = 20  # error replies per second; more bad frames are dropped (no amplification)
RESPONSE_MAX_TOKENS = 4096  # safety cap on one response


@dataclass(eq=False)
class _Out:
    """One outgoing message, queued until its send time."""

    send_at: float  # session ms
    msg: Any  # a ServerMessage
    time_ms: float | None = None  # generated midi: when it sounds
    position: int | None = None  # generated midi: token position it came from (None: forced)
    sent: bool = False
    cancelled: bool = False
    enqueued: float = 0.0  # session ms
    at_once: bool = False  # a note-off sent the moment it is decided (stop, interrupt): never late
    # a program change: (part, program, position of its PROGRAM token); it goes with a note
    program: tuple[int, int, int | None] | None = None


@dataclass(eq=False)
class _Note:
    key: tuple[int, int]  # (part, pitch)
    on: _Out
    off: _Out | None = None
    drum: bool = False


@dataclass
class _Stats:
    events_sent: int = 0
    late_events: int = 0
    retracts: int = 0
    lag_pushes: int = 0  # times the engine's clock floor moved the model's time forward
    lag_ticks: int = 0  # by this many ticks in all
    jitter_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def jitter(self) -> dict[str, float]:
        if not self.jitter_ms:
            return {}
        q = np.percentile(np.fromiter(self.jitter_ms, float), [50, 99])
        return {"jitter_p50_ms": round(float(q[0]), 3), "jitter_p99_ms": round(float(q[1]), 3)}


class LeadIn(Constraint):
    """respond: no time token (and no note-off) before the response's first note-on, so the
    response starts at its start tick; the gap before it was the player's silence.

    Shared, not copied, with the session's ConstraintSet: the server arms it from the event loop
    (plain attribute writes are atomic; `start` is written before `armed`) and the scheduler
    thread reads it.
    """

    def __init__(self) -> None:
        self.armed = False
        self.start = 0  # tick the armed response starts at

    def __deepcopy__(self, memo: dict) -> LeadIn:
        return self

    def arm(self, start: int) -> None:
        self.start = start
        self.armed = True

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        if self.armed:
            cand.time_ok[:] = False
            cand.off_ok[:] = False
            cand.end_ok[:] = False

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab) -> None:
        # Only a note at or after the start disarms: a rollback replays older history (the
        # player's notes) through observe while the response is armed.
        if not self.armed:
            return
        on = (tokens >= vocab.on_base) & (tokens < vocab.off_base)
        if (on & (before.tick >= self.start)).any():
            self.armed = False


@dataclass(eq=False)
class _Speculation:
    """respond: the response, sampled while the player is silent, before it is due.

    It starts when the player has released every key: one ordinary response request, sampled
    from the gap's end (`LiveSession.generate(start_tick=...)` writes the time up to it as sampled tokens),
    so it is token for token the response the gap's end would start. Its events are held, not
    sent. The gap's end commits it as it is. A `trigger` before then plays its opening (its
    first note) at once, at the trigger's time, and the response goes on from that note (if the
    opening is still being sampled, as soon as it is: sooner than sampling another). The player
    playing again drops it: nothing held was ever sent, so no note can be left sounding, and the
    engine rolls its tokens back at the player's event.
    """

    request: int
    start: int  # tick the response starts at (the gap's end)
    held: list[Event] = field(default_factory=list)
    opening: list[int] | None = None  # tokens of its first event through the first note-on
    trigger: int | None = None  # a trigger came before the opening was sampled: its tick


class LiveConnection:
    """A live session. `await open()`, `await handle(msg)` per client message, `await close()`."""

    def __init__(self, runtime: Runtime, send: Send, session_id: str | None = None) -> None:
        self.rt = runtime
        self.vocab: Vocab = runtime.vocab
        self.id = session_id or uuid.uuid4().hex[:12]
        self._send = send
        self._t0 = time.perf_counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: list[tuple[float, int, _Out]] = []
        self._seq = itertools.count()
        self._floor = -1e18  # no message is sent before the latest retract (session ms)
        self._wake: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._closing = False
        self.close_reason: str | None = None
        self.stats = _Stats()
        self._errors: deque[float] = deque()
        self._dropped_errors = 0
        self._acquired = False
        # The running mode (None before `start`).
        self.mode: str | None = None
        self.params = p.LiveParams()
        self._s: LiveSession | None = None
        self._origin = 0.0  # session ms of tick 0 of the engine session
        self._enc: Any = None  # StreamEncoder for the player
        self._bass_keys: set[tuple[int, int]] = set()  # (channel, key) held as the bass part
        self._lead_in: LeadIn | None = None
        self._cancel_floor = -1  # Tokens of requests <= this are dropped (cancelled)
        self._request: int | None = None  # the running response; accompany: the latest request
        self._responding = False
        self._player_dirty = False  # respond: the player played since the last response
        self._lead_heard = False  # accompany: the player has played a note (the model waits)
        self._gap_handle: asyncio.TimerHandle | None = None
        self._gap_due = 0.0  # session ms the gap ends at (the response's start)
        self._spec: _Speculation | None = None  # respond: the response sampled ahead
        self._last_player_ms = 0.0
        self._horizon_tick = -1
        # Generated notes and events.
        self._events: list[_Out] = []  # generated midi entries not yet long past
        self._open: dict[tuple[int, int], _Note] = {}  # the model's sounding notes, by key
        self._notes: list[_Note] = []  # notes whose note-off is not yet sent
        self._model_sounding: dict[tuple[int, int], _Note] = {}  # closed for the listener only
        self._pending_part: int | None = None
        # part -> (program, token position): a generated program change, sent with the part's
        # next note-on (see _play)
        self._program_due: dict[int, tuple[int, int | None]] = {}
        self._velocity = 64

    # --- clock ------------------------------------------------------------------------------------
    def now_ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000.0

    def _tick(self, ms: float) -> int:
        return max(0, int(round((ms - self._origin) / self.vocab.config.tick_ms)))

    def _ms(self, tick: int) -> float:
        return self._origin + tick * self.vocab.config.tick_ms

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # --- lifecycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        """Take a session slot (raises SessionLimit), start the clock and the sender."""
        self.rt.acquire_live()
        self._acquired = True
        self._loop = asyncio.get_running_loop()
        self._t0 = time.perf_counter()
        self._sender = asyncio.create_task(self._send_loop(), name=f"live-{self.id}-send")
        self.rt.connections.add(self)
        logger.info("live session %s opened (%d open)", self.id, self.rt.sessions_open())

    async def close(self, reason: str = "stop") -> None:
        """End the session: note-offs for every generated note sounding, `stopped` (unless the
        peer is gone), free everything. Safe to call twice and from any exit path."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.close_reason = reason
        try:
            self._end_mode(self.now_ms())
            if reason != "disconnect":
                await self._flush()
                stopped = p.Stopped(
                    reason=reason,
                    events_sent=self.stats.events_sent,
                    late_events=self.stats.late_events,
                    retracts=self.stats.retracts,
                    **self._lag(),
                    **self.stats.jitter(),
                )
                await self._send(stopped)
        except Exception:  # the peer may be gone mid-flush; cleanup goes on regardless
            logger.debug("session %s: flush on close failed", self.id, exc_info=True)
        finally:
            self._cleanup()

    def _close_engine(self) -> None:
        s, self._s = self._s, None
        if s is not None:
            s.close()
            self.stats.lag_pushes += s.lag["pushes"]
            self.stats.lag_ticks += s.lag["ticks"]

    def _lag(self) -> dict[str, float | int]:
        st = self.stats
        return {
            "lag_pushes": st.lag_pushes,
            "lag_ms": round(st.lag_ticks * self.vocab.config.tick_ms, 1),
        }

    def _cleanup(self) -> None:
        for task in (self._sender, self._timer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._gap_handle is not None:
            self._gap_handle.cancel()
        self._close_engine()
        self._heap.clear()
        self.rt.connections.discard(self)
        if self._acquired:
            self._acquired = False
            self.rt.release_live()
        self._closed.set()
        logger.info(
            "live session %s closed (%s): %d events, %d late, %d retracts",
            self.id,
            self.close_reason,
            self.stats.events_sent,
            self.stats.late_events,
            self.stats.retracts,
        )

    # --- client messages --------------------------------------------------------------------------
    async def handle(self, message: Any) -> None:
        """One client message: a protocol model, a dict or a JSON text. Never raises for bad
        input: answers with an `error` message."""
        if self._closing:
            return
        if isinstance(message, str | bytes):
            if len(message) > p.MAX_FRAME_BYTES:
                self.error(
                    "too_large", f"frame of {len(message)} bytes; at most {p.MAX_FRAME_BYTES}"
                )
                return
            try:
                message = json.loads(message)
            except ValueError as e:
                self.error("bad_json", f"not JSON: {e}")
                return
        if isinstance(message, dict):
            try:
                message = p.client_adapter.validate_python(message)
            except ValidationError as e:
                self.error("bad_message", _explain(e))
                return
        try:
            await self._dispatch(message)
        except SessionLimit as e:
            self.error("internal", str(e))
        except Exception:
            logger.exception("session %s: failed on %s", self.id, getattr(message, "type", "?"))
            self.error("internal", "the server failed on this message; the session goes on")

    async def _dispatch(self, m: Any) -> None:
        if isinstance(m, p.Ping):
            self._enqueue(p.Pong(time=m.time, server_time=self.now_ms()), self.now_ms())
        elif isinstance(m, p.Start):
            await self._start(m)
        elif isinstance(m, p.Stop):
            await self.close("stop")
        elif self.mode is None:
            self.error("not_started", f"send start first (got {m.type})")
        elif isinstance(m, p.ClientMidi):
            self._player_midi(m)
        elif isinstance(m, p.Trigger):
            if self.mode == "respond":
                self._respond()
        elif isinstance(m, p.Params):
            await self._update_params(m)
        else:  # pragma: no cover - the union is closed
            self.error("bad_message", f"unexpected {m.type}")

    def error(self, code: str, message: str) -> None:
        now = time.monotonic()
        while self._errors and now - self._errors[0] > 1.0:
            self._errors.popleft()
        if len(self._errors) >= MAX_ERRORS_PER_S:
            self._dropped_errors += 1
            if self._dropped_errors % 100 == 1:
                logger.warning("session %s: bad frames dropped (%d)", self.id, self._dropped_errors)
            return
        self._errors.append(now)
        self._enqueue(p.ErrorMessage(code=code, message=message), self.now_ms())

    # --- modes --------------------------------------------------------------------------------------
    async def _start(self, m: p.Start) -> None:
        now = self.now_ms()
        if self.mode is not None:
            self._end_mode(now)
        self.mode = m.mode
        self.params = p.LiveParams.model_validate(m.model_dump(exclude={"type", "mode"}))
        self._origin = now
        self._lead_heard = False
        self._enc = self.rt.tokenizer.stream_encoder(
            part="lead", program=self.params.player_program
        )
        self._bass_keys.clear()
        self._last_player_ms = now
        await self._open_engine(prompt=None)
        if self.mode == "accompany":
            self._timer = asyncio.create_task(self._accompany_loop(), name=f"live-{self.id}-acc")
        self._enqueue(
            p.Started(session=self.id, mode=self.mode, params=self.params, server_time=now), now
        )

    def _gen_parts(self) -> list[str]:
        pr = self.params
        if pr.parts is not None:
            return list(pr.parts)
        if self.mode == "respond":
            return ["lead"]
        return p.ACCOMPANY_PARTS + (["drums"] if pr.drums else [])

    def _constraints(self) -> list[Constraint]:
        pr, parts = self.params, self._gen_parts()
        cs: list[Constraint] = [Parts(parts), MaxDuration(self.rt.settings.max_note_seconds, parts)]
        if pr.programs:
            cs.append(Programs({k: [v] for k, v in pr.programs.items() if k in parts}))
        pitched = [x for x in parts if x != "drums"]
        if pitched and (pr.pitch_low > 0 or pr.pitch_high < 127):
            cs.append(PitchRange(pr.pitch_low, pr.pitch_high, parts=pitched))
        if pr.max_notes_per_second is not None:
            cs.append(NoteDensity(pr.max_notes_per_second, parts=parts))
        if self.mode == "respond":
            self._lead_in = LeadIn()
            cs.append(self._lead_in)
        cs.append(BeatGrid(*self._grid()))
        return cs

    def _grid(self) -> tuple[float | None, float]:
        """The BeatGrid setting (step, origin) in engine ticks: the grid of the tempo someone
        else keeps (beat_time + tempo_bpm, e.g. a DAW's MIDI clock), or none."""
        step_ms = self.params.grid_step_ms()
        if step_ms is None or self.params.beat_time is None:
            return None, 0.0
        tick_ms = self.vocab.config.tick_ms
        return step_ms / tick_ms, (self.params.beat_time - self._origin) / tick_ms

    def _sampling(self) -> SamplingParams:
        pr = self.params
        return SamplingParams(temperature=pr.temperature, top_p=pr.top_p, seed=pr.seed)

    async def _open_engine(self, prompt: list[int] | None) -> None:
        """(Re)open the engine session with the current parameters; `prompt`: the history to
        keep (a parameter change that alters the constraints), else a fresh start."""
        self._close_engine()
        v = self.vocab
        task = v.TASK_CONTINUE if self.mode == "respond" else v.TASK_ACCOMPANY
        loop = self._loop
        assert loop is not None

        def on_event(ev: Event) -> None:  # scheduler thread: hand over, nothing else
            try:
                loop.call_soon_threadsafe(self._on_engine_event, ev)
            except RuntimeError:  # loop closed: the session is gone
                pass

        if prompt is None:
            # A fresh token history: the model would never end a note it played before (it is
            # not in it), so they end now; and its positions start again, so a rollback in it
            # must not reach the events of the one before.
            self._cut(self.now_ms())
            self._model_sounding.clear()
            for e in self._events:
                e.position = None
            self._program_due = {
                part: (prog, None) for part, (prog, _) in self._program_due.items()
            }
        self._s = await self.rt.open_session(
            prompt or [v.BOS, task], self._constraints(), self._sampling(), on_event
        )
        tick_ms = v.config.tick_ms
        self._s.clock = lambda: (self.now_ms() - self._origin) / tick_ms
        self._cancel_floor = -1
        self._request = None
        self._responding = False
        self._spec = None
        self._horizon_tick = -1

    def _end_mode(self, now: float) -> None:
        """Leave the running mode: cancel generation, retract what has not sounded, note-offs."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._gap_handle is not None:
            self._gap_handle.cancel()
            self._gap_handle = None
        if self._s is not None:
            self._s.cancel()
            self._cancel_floor = 1 << 62
            self._close_engine()
        self._spec = None  # its held events were never sent: nothing to end
        self._cut(now)
        self._open.clear()
        self._model_sounding.clear()
        self.mode = None
        self._responding = False

    async def _update_params(self, m: Any) -> None:
        changes = m.model_dump(exclude_unset=True, exclude={"type"})
        try:
            new = p.LiveParams.model_validate({**self.params.model_dump(), **changes})
        except ValidationError as e:
            self.error("bad_message", _explain(e))
            return
        old, self.params = self.params, new
        if new.lookahead_ms != old.lookahead_ms:
            self._reschedule()
        s = self._s
        if s is None:
            return
        grid = s.constraint(BeatGrid)
        if grid is not None:
            grid.set(*self._grid())  # the DAW's tempo or beat moved: no reopen needed
        if changes.keys() <= {"tempo_bpm", "beat_time", "grid"} and new.response_beats is None:
            return  # only the grid moved (the bridge re-anchors every 4 beats)
        self._drop_spec()  # sampled with the old parameters
        if _constraint_keys(old) != _constraint_keys(new):
            # Constraints are fixed per engine session: reopen it on the same history.
            hist = s.tokens() if s.window_start == 0 else None
            await self._open_engine(hist)
        else:
            s.sampling = self._sampling()  # read by the scheduler at each step
            if new.seed is not None:
                s.seed = new.seed
        if self.mode == "respond" and self._gap_handle is not None:
            self._arm_gap()  # speculate again, with the new parameters

    # --- the player -----------------------------------------------------------------------------
    def _player_midi(self, m: p.ClientMidi) -> None:
        now = self.now_ms()
        t = now if m.time is None else m.time
        if t > now + p.MAX_TIME_AHEAD_MS:
            self.error(
                "bad_time",
                f"time {t:.1f} ms is {t - now:.0f} ms past the server clock "
                f"(at most {p.MAX_TIME_AHEAD_MS} ms; sync with ping)",
            )
            return
        try:
            msg = mido.Message.from_bytes(m.data)
        except (ValueError, TypeError) as e:
            self.error("bad_message", f"not a MIDI message: {m.data}: {e}")
            return
        # Never before what has already sounded: the model's history stays what was heard.
        t = max(t, self._last_player_ms, self._sounded_floor(now))
        self._drop_spec()  # the player plays on: the response sampled ahead is not wanted
        interrupt_offs: list[int] = []
        if self.mode == "respond":
            if self._responding or self._sounding_later(now):
                interrupt_offs = self._interrupt(t)
            # Notes a finished response left sounding in the model's view end here for it too.
            interrupt_offs += [
                x for x in self._model_offs(self._tick(t)) if x not in interrupt_offs
            ]
        self._last_player_ms = t
        self._lead_heard = self._lead_heard or (msg.type == "note_on" and msg.velocity > 0)
        part, program = self._player_part(msg)
        toks = self._enc.feed(msg, (t - self._origin) / 1000.0, part, program)
        event = [x for x in toks if self.vocab.type_of(x) is not TokenType.TIME]
        if (event or interrupt_offs) and self._s is not None:
            self._s.insert(self._tick(t), interrupt_offs + event)
        if self.mode == "respond" and msg.type in ("note_on", "note_off", "control_change"):
            self._player_dirty = self._player_dirty or bool(event)
            self._arm_gap()

    def _player_part(self, msg: mido.Message) -> tuple[str | None, int | None]:
        """The part (and program) a player's note is heard as: with `bass_split` (accompany),
        keys below it are the bass; a note-off goes where its note-on went, whatever the split
        is now. (None, None): the encoder's default, the lead."""
        if msg.type not in ("note_on", "note_off") or msg.channel == DRUM_CHANNEL:
            return None, None
        key = (msg.channel, msg.note)
        bass = self.vocab.part_index["bass"]
        # a key struck again while it sounds as the bass stays the bass (the encoder ends the
        # old note first), else that note would sound on in the model's history
        restrike = key in self._bass_keys and (bass, msg.note) in self._enc.sounding
        if msg.type == "note_on" and msg.velocity > 0 and not restrike:
            split = self.params.bass_split if self.mode == "accompany" else None
            if split is not None and msg.note < split:
                self._bass_keys.add(key)
            else:
                self._bass_keys.discard(key)
        if key in self._bass_keys:
            return "bass", p.PLAYER_BASS_PROGRAM
        return None, None

    def _arm_gap(self) -> None:
        if self._gap_handle is not None:
            self._gap_handle.cancel()
            self._gap_handle = None
        if self._enc.sounding or not self._player_dirty:
            return
        assert self._loop is not None
        self._gap_due = self._last_player_ms + self.params.gap_ms
        self._speculate(self._tick(self._gap_due))
        if self._spec is not None:
            # Committed when its first note is due to be sent (its start tick, lookahead_ms
            # early), like any generated event.
            fire = self._ms(self._spec.start) - self.params.lookahead_ms
        else:
            fire = self._gap_due
        delay = max(0.0, fire - self.now_ms()) / 1000.0
        self._gap_handle = self._loop.call_later(delay, self._on_gap)

    def _on_gap(self) -> None:
        self._gap_handle = None
        if self.mode != "respond" or self._enc.sounding or not self._player_dirty:
            return
        if self._spec is not None:
            self._commit(self._spec)
            return
        wait = self._gap_due - self.now_ms()
        if wait > 0.5:  # the speculation was dropped (e.g. `params`): wait for the gap's end
            assert self._loop is not None
            self._gap_handle = self._loop.call_later(wait / 1000.0, self._on_gap)
            return
        self._respond()

    # --- respond ------------------------------------------------------------------------------------
    def _response_ticks(self) -> int:
        return int(round(self.params.response_length_seconds() * self.vocab.ticks_per_second))

    def _respond(self) -> None:
        """`trigger` (or the gap's end without a speculation): the response starts now."""
        s = self._s
        if s is None or self._responding:
            return
        now = self.now_ms()
        # The tick at or before now (not the nearest): the first note is due at once, not up to
        # half a tick later.
        start = max(0, int((now - self._origin) // self.vocab.config.tick_ms))
        spec = self._spec
        if spec is not None:
            if start >= spec.start:  # its start has come: it is the response
                self._commit(spec)
                return
            if spec.opening is not None:  # play its first note now
                self._commit_at(spec, start)
            elif spec.trigger is None:  # its first note is being sampled: play it when it is
                spec.trigger = start  # (sooner than sampling another from scratch)
            return
        self._player_dirty = False
        # Time up to now, the response starts here; the notes an earlier response left sounding
        # in the model's view end here for it (the player played nothing since to end them).
        s.insert(start, self._model_offs(start))
        assert self._lead_in is not None
        self._lead_in.arm(start)
        self._request = s.generate(
            max_tokens=RESPONSE_MAX_TOKENS, until_tick=start + self._response_ticks()
        )
        self._responding = True

    def _model_offs(self, tick: int) -> list[int]:
        """OFF tokens, at `tick`, for the notes a finished response left sounding in the model's
        view (they ended for the listener with the response)."""
        offs = [
            self.vocab.note_off(*key)
            for key, n in self._model_sounding.items()
            if not n.on.cancelled and self._tick(n.on.time_ms or 0) <= tick
        ]
        self._model_sounding.clear()
        return offs

    def _speculate(self, start: int) -> None:
        """The player went silent: sample the response the gap's end would start (at tick
        `start`), holding its events (see `_Speculation`)."""
        s, lead_in = self._s, self._lead_in
        if s is None or lead_in is None or self._responding or self._spec is not None:
            return
        lead_in.arm(start)
        rid = s.generate(
            max_tokens=RESPONSE_MAX_TOKENS,
            until_tick=start + self._response_ticks(),
            start_tick=start,
        )
        self._spec = _Speculation(rid, start)

    def _drop_spec(self) -> None:
        """Forget the speculation: no held event was sent; the engine drops its tokens at the
        next insert (the player's event, or the response's start)."""
        spec, self._spec = self._spec, None
        if spec is None:
            return
        assert self._s is not None
        self._s.cancel()  # first: no token sampled without the lead-in can be delivered
        self._cancel_floor = max(self._cancel_floor, spec.request)
        if self._lead_in is not None:
            self._lead_in.armed = False

    def _commit(self, spec: _Speculation) -> None:
        """The gap's end: the speculation is the response, exactly as sampled."""
        self._spec = None
        self._player_dirty = False
        self._request = spec.request
        self._responding = True
        for ev in spec.held:
            self._dispatch_engine_event(ev)

    def _commit_at(self, spec: _Speculation, start: int) -> None:
        """A trigger before the gap's end: the speculation's first note plays at `start` (the
        model's history records it there, as heard), and the response goes on from it."""
        s = self._s
        opening = spec.opening
        assert s is not None and opening is not None
        self._drop_spec()
        s.insert(start, opening)  # rolls the speculation back; the opening is given at `start`
        for tok in opening:
            self._play(tok, start, None)  # None: given tokens are never rolled back
        self._player_dirty = False
        self._request = s.generate(
            max_tokens=RESPONSE_MAX_TOKENS, until_tick=start + self._response_ticks()
        )
        self._responding = True

    def _hold(self, spec: _Speculation, ev: Event) -> None:
        spec.held.append(ev)
        if spec.opening is not None or not isinstance(ev, Token):
            return
        if self.vocab.type_of(ev.token) is TokenType.NOTE_ON:
            toks = [e.token for e in spec.held if isinstance(e, Token)]
            first = next(
                i for i, x in enumerate(toks) if self.vocab.type_of(x) is not TokenType.TIME
            )
            spec.opening = toks[first:]
            if spec.trigger is not None:
                self._commit_at(spec, spec.trigger)

    def _interrupt(self, t: float) -> list[int]:
        """Stop the running request (the player plays during a response; accompany rests),
        retract what has not sounded, note-offs now. Returns the OFF tokens that tell the model
        those notes ended."""
        assert self._s is not None
        self._s.cancel()  # no Token of the response is delivered after this returns
        if self._request is not None:
            self._cancel_floor = max(self._cancel_floor, self._request)
        if self._lead_in is not None:
            self._lead_in.armed = False
        self._responding = False
        self._request = None
        closed = self._cut(t)
        return [self.vocab.note_off(*n.key) for n in closed if not n.drum]

    # --- accompany ----------------------------------------------------------------------------------
    async def _accompany_loop(self) -> None:
        """Keep the model sampling `horizon_ms` past now (a new request replaces the old one)."""
        while True:
            s = self._s
            # Not before the player's first note: an intro would be in a key the model can
            # only guess, and it would hold to it when the player comes in.
            if s is not None and self._lead_heard:
                pr, now = self.params, self.now_ms()
                if (
                    pr.rest_ms is not None
                    and not self._enc.sounding
                    and now - self._last_player_ms >= pr.rest_ms
                ):
                    self._rest(s, now)
                else:
                    horizon = max(pr.horizon_ms, pr.lookahead_ms + 50)
                    until = self._tick(now + horizon)
                    if until > self._horizon_tick:
                        self._horizon_tick = until
                        self._request = s.generate(until_tick=until)
            await asyncio.sleep(ACCOMPANY_TICK_S)

    def _rest(self, s: LiveSession, now: float) -> None:
        """The player stopped (`rest_ms`): the accompaniment ends now, its notes off for the
        listener and the model (what it sampled past now was never heard), and waits for the
        player's next note, as at the start."""
        s.insert(self._tick(now), self._interrupt(now))
        self._lead_heard = False
        self._horizon_tick = -1

    # --- engine events (loop thread) ------------------------------------------------------------
    def _on_engine_event(self, ev: Event) -> None:
        if self._closing or self._s is None or ev.session != self._s.id:
            return  # a closed or replaced engine session
        spec = self._spec
        if spec is not None and not isinstance(ev, Rollback) and ev.request == spec.request:
            self._hold(spec, ev)  # sent when committed, or dropped
            return
        self._dispatch_engine_event(ev)

    def _dispatch_engine_event(self, ev: Event) -> None:
        try:
            if isinstance(ev, Token):
                if ev.request > self._cancel_floor:
                    self._on_token(ev)
            elif isinstance(ev, Rollback):
                self._on_rollback(ev)
            elif isinstance(ev, Done):
                self._on_done(ev)
        except Exception:
            logger.exception("session %s: engine event %s failed", self.id, ev)

    def _on_token(self, ev: Token) -> None:
        self._play(ev.token, ev.tick, ev.position)

    def _play(self, tok: int, tick: int, position: int | None) -> None:
        """A generated token at token time `tick` (position None: given, never rolled back)."""
        v = self.vocab
        self._enc.observe([tok])  # keeps the player's PART/PROGRAM bookkeeping in step
        ty = v.type_of(tok)
        t = self._ms(tick)
        if ty is TokenType.PART:
            self._pending_part = tok - v.part_base
        elif ty is TokenType.PROGRAM:
            part, self._pending_part = self._pending_part, None
            if part is not None and part != v.drums:
                # Sent with the part's next note, at its time: alone it sounds nothing, and at
                # its own token's time it went out late whenever the clock floor moved the note
                # after it.
                self._program_due[part] = (tok - v.program_base, position)
        elif ty is TokenType.VELOCITY:
            self._velocity = max(1, v.bin_velocity(tok - v.vel_base))
        elif ty is TokenType.NOTE_ON:
            part, pitch = v.note_of(tok)
            key = (part, pitch)
            ch = part_channel(part, v.drums)
            if key in self._open:  # cannot happen with the grammar; keep MIDI balanced anyway
                self._note_off(self._open.pop(key), t, position)
            if (due := self._program_due.pop(part, None)) is not None:
                # the note's position: if the note is rolled back, so is the change (_on_rollback)
                pc = self._gen(t, [0xC0 | ch, due[0]], part, position)
                pc.program = (part, *due)
            on = self._gen(t, [0x90 | ch, pitch, self._velocity], part, position)
            note = _Note(key, on, drum=part == v.drums)
            self._notes.append(note)
            if note.drum:
                self._note_off(note, t + v.config.drum_note_ms, position)
            else:
                self._open[key] = note
        elif ty is TokenType.NOTE_OFF:
            note = self._open.pop(v.note_of(tok), None)
            if note is not None:  # else: a note of the player's, or one already closed
                self._note_off(note, t, position)

    def _on_rollback(self, ev: Rollback) -> None:
        """Tokens from `ev.position` on are gone: cancel their events; a note whose ON stays but
        whose OFF went is sounding again (the regenerated stream will end it)."""
        after = self._ms(ev.tick)
        any_sent = False
        self._program_due = {
            k: d for k, d in self._program_due.items() if d[1] is None or d[1] < ev.position
        }
        for e in self._events:
            if e.position is not None and e.position >= ev.position and not e.cancelled:
                e.cancelled = True
                if e.sent:
                    any_sent = True
                    # A retract drops what is strictly after its time: an event the model made
                    # at the rollback's own tick (after the insertion, a chord's later notes)
                    # must be dropped too.
                    after = min(after, e.time_ms - RETRACT_EPS_MS)
                prog = e.program
                if prog is not None and (prog[2] is None or prog[2] < ev.position):
                    # its note is gone, its PROGRAM token stays: it goes with the part's next note
                    self._program_due.setdefault(prog[0], prog[1:])
        for n in list(self._notes):
            if n.on.cancelled:
                self._notes.remove(n)
                if self._open.get(n.key) is n:
                    del self._open[n.key]
            elif n.off is not None and n.off.cancelled and not n.drum:
                n.off = None
                self._open[n.key] = n
        self._pending_part = None
        if any_sent or any(e.sent and e.time_ms > after for e in self._events if not e.cancelled):
            self._send_retract(after)

    def _on_done(self, ev: Done) -> None:
        if self.mode != "respond" or ev.request != self._request:
            if ev.reason == "error":
                self.error("internal", "generation failed; the session goes on")
            return
        # The response ended: its notes end with it, for the listener and for the model.
        self._responding = False
        self._request = None
        if self._lead_in is not None:
            self._lead_in.armed = False
        # The model's OFF tokens are given with the player's next event (at its time: giving
        # them now, at the response's end tick, would pin the player's next event after it).
        t = self._ms(ev.tick)
        for key, note in self._open.items():
            self._note_off(note, t, None)
            self._model_sounding[key] = note
        self._open.clear()

    # --- generated events -----------------------------------------------------------------------
    def _gen(self, t: float, data: list[int], part: int, position: int | None) -> _Out:
        name = self.vocab.config.parts[part]
        msg = p.ServerMidi(data=data, time=t, part=name)
        e = self._enqueue(msg, t - self.params.lookahead_ms, time_ms=t, position=position)
        self._events.append(e)
        return e

    def _note_off(self, note: _Note, t: float, position: int | None, at_once: bool = False) -> None:
        ch = part_channel(note.key[0], self.vocab.drums)
        note.off = self._gen(
            max(t, note.on.time_ms or t), [0x80 | ch, note.key[1], 0], note.key[0], position
        )
        note.off.at_once = at_once

    def _sounding_later(self, now: float) -> bool:
        """A generated event is still to sound (a response generated ahead of real time)."""
        return any(not e.cancelled and e.time_ms > now for e in self._events)

    def _sounded_floor(self, now: float) -> float:
        """Time of the latest generated event that has already sounded (0 if none)."""
        times = [e.time_ms for e in self._events if not e.cancelled and e.time_ms <= now]
        return max(times, default=0.0)

    def _cut(self, t: float) -> list[_Note]:
        """Cancel every generated event after `t`; note-offs at `t` for the notes sounding then.
        Returns those notes."""
        any_sent = False
        for e in self._events:
            if not e.cancelled and e.time_ms > t:
                e.cancelled = True
                any_sent |= e.sent
        if any_sent:
            self._send_retract(t)
        closed = []
        for n in list(self._notes):
            if n.on.cancelled:  # never heard: the model's OFF for it must find nothing open
                self._notes.remove(n)
                if self._open.get(n.key) is n:
                    del self._open[n.key]
            elif n.off is None or n.off.cancelled:
                self._note_off(n, t, None, at_once=True)
                closed.append(n)
        self._open = {k: n for k, n in self._open.items() if n.off is None}
        return closed

    def _send_retract(self, after: float) -> None:
        """Retract after `after`, then re-send the surviving events the client will drop."""
        self.stats.retracts += 1
        # Everything enqueued from now on goes out after the retract (else the client would
        # drop it); the surviving events after `after`, sent or still queued, go again after it.
        self._floor = self.now_ms()
        self._enqueue(p.Retract(after=after), self._floor)
        for e in list(self._events):
            if not e.cancelled and e.time_ms > after and e.msg.type == "midi":
                e.cancelled = True
                again = self._enqueue(
                    e.msg, e.time_ms - self.params.lookahead_ms, e.time_ms, e.position
                )
                again.at_once, again.program = e.at_once, e.program
                self._events.append(again)
                for n in self._notes:
                    if n.off is e:
                        n.off = again
                    if n.on is e:
                        n.on = again

    def _reschedule(self) -> None:
        """Queued generated events go out `lookahead_ms` before their time, under the current
        value. Events of one time must go out in the order they were made (a note's off after
        its on, an off before the same key's next on): queued under two lookaheads, the one
        made later could go first."""
        for i, (_, seq, e) in enumerate(self._heap):
            if e.time_ms is not None and not e.at_once:
                e.send_at = max(e.time_ms - self.params.lookahead_ms, self._floor)
                self._heap[i] = (e.send_at, seq, e)
        heapq.heapify(self._heap)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)  # the earliest may be earlier now

    # --- sending --------------------------------------------------------------------------------
    def _enqueue(
        self, msg: Any, send_at: float, time_ms: float | None = None, position: int | None = None
    ) -> _Out:
        send_at = max(send_at, self._floor)
        e = _Out(send_at, msg, time_ms, position, enqueued=self.now_ms())
        heapq.heappush(self._heap, (send_at, next(self._seq), e))
        if self._heap[0][2] is e and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return e

    async def _send_loop(self) -> None:
        try:
            while True:
                if not self._heap:
                    await self._sleep(None)
                    continue
                send_at, _, e = self._heap[0]
                if e.cancelled:
                    heapq.heappop(self._heap)
                    continue
                now = self.now_ms()
                if send_at > now:
                    clock, deadline = self.rt.clock, self._t0 + send_at / 1000.0
                    if deadline - time.perf_counter() > clock.SPIN_S:
                        await self._sleep(deadline - clock.SPIN_S)  # then spin the rest
                    elif not clock.spin_until(deadline):  # over the spin budget
                        await self._sleep(deadline)
                    continue
                heapq.heappop(self._heap)
                await self._deliver(e, now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer is gone or send failed: end the session
            logger.info("session %s: send failed (%s); closing", self.id, exc)
            asyncio.get_running_loop().create_task(self.close("disconnect"))

    async def _sleep(self, deadline: float | None) -> None:
        """Until `deadline` (perf_counter seconds; the runtime's precise clock) or a new message
        due earlier (`_enqueue` resolves `_wake`)."""
        self._wake = fut = asyncio.get_running_loop().create_future()
        if deadline is not None:
            self.rt.clock.wake_at(deadline, fut)
        try:
            await fut
        finally:
            self._wake = None

    async def _deliver(self, e: _Out, now: float) -> None:
        e.sent = True
        if e.time_ms is not None:
            self.stats.events_sent += 1
            if now > e.time_ms + 0.5 and not e.at_once:  # late (0.5 ms: the clock's rounding)
                self.stats.late_events += 1
                logger.debug(
                    "session %s: late by %.1f ms (queued %.1f ms after its time): %s",
                    self.id, now - e.time_ms, e.enqueued - e.time_ms, e.msg,
                )  # fmt: skip
            if e.send_at > e.enqueued:  # it waited for its send time: the jitter counts
                self.stats.jitter_ms.append(now - e.send_at)
            cutoff = now - 2000.0  # forget events long past (rollback can't reach them)
            if len(self._events) > 256 and self._events[0].time_ms < cutoff:
                self._events = [x for x in self._events if x.time_ms >= cutoff or not x.sent]
                self._notes = [
                    n
                    for n in self._notes
                    if n.off is None or not n.off.sent or n.off.time_ms >= cutoff
                ]
        await self._send(e.msg)

    async def _flush(self) -> None:
        """Send everything queued now, in order (stop: note-offs must not wait for their time)."""
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        while self._heap:
            _, _, e = heapq.heappop(self._heap)
            if not e.cancelled:
                await self._deliver(e, self.now_ms())


def _constraint_keys(pr: p.LiveParams) -> tuple:
    return (pr.parts, pr.drums, pr.programs, pr.pitch_low, pr.pitch_high, pr.max_notes_per_second)


def _explain(e: ValidationError) -> str:
    """A short message: where, and what (pydantic's text names the valid range)."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"][1:]) or str(err["loc"][0]) if err["loc"] else ""
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)
