"""What both live modes share: one engine session, the player's input, the engine's events.

A `Mode` runs from `start` to the next `start` or the session's end. It owns its engine session
(opened with the constraints its parameters ask for, reopened when they change) and the
player's stream encoder; the connection owns the clock, the outbox and the playback, which
outlive modes. Everything here runs on the event loop; engine events arrive on the scheduler
thread and are handed over with `loop.call_soon_threadsafe`, nothing else crosses threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mido
from pydantic import ValidationError

from improv.engine.constraints import (
    BeatGrid,
    Constraint,
    MaxDuration,
    NoteDensity,
    Parts,
    PitchRange,
    Programs,
)
from improv.engine.live import Done, Event, LiveSession, Rollback, SamplingParams, Token
from improv.engine.tokenizer.decode import Beat, ChordChange
from improv.engine.tokenizer.stream import StreamEncoder
from improv.engine.tokenizer.vocab import TokenType
from improv.protocol import messages as p

from ..runtime import Runtime
from . import harmony
from .clock import SessionClock
from .playback import Playback
from .stats import LiveStats

logger = logging.getLogger(__name__)

CANCELLED_ALL = 1 << 62  # a cancel floor above every request id


@dataclass(frozen=True)
class ModeContext:
    """What the connection lends a mode."""

    runtime: Runtime
    clock: SessionClock
    playback: Playback
    stats: LiveStats
    error: Callable[[str, str], None]  # (code, message): an `error` reply, rate-limited
    session_id: str


class Mode:
    name: str  # the protocol's mode

    def __init__(self, ctx: ModeContext, params: p.LiveParams) -> None:
        self.ctx = ctx
        self.rt = ctx.runtime
        self.vocab = ctx.runtime.vocab
        self.clock = ctx.clock
        self.playback = ctx.playback
        self.params = params
        self.session: LiveSession | None = None  # the engine session
        # the player's events -> tokens (the model's own are observed: time, programs)
        self.enc: StreamEncoder = self.rt.tokenizer.stream_encoder(
            part="lead", program=params.player_program
        )
        self.cancel_floor = -1  # Tokens of requests <= this are dropped (cancelled)
        self.request: int | None = None  # respond: the running response; accompany: the latest
        self.last_player_ms = 0.0
        self.ended = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reopening: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------------
    async def open(self, now: float) -> None:
        """Start at session time `now` (tick 0 of the engine session)."""
        self._loop = asyncio.get_running_loop()
        self.clock.origin = now
        self.last_player_ms = now
        self.playback.lookahead_ms = self.params.lookahead_ms
        await self._open_engine(prompt=None)

    def end(self, now: float) -> None:
        """Leave the mode: cancel generation, retract what has not sounded, note-offs now."""
        self.release()
        self.playback.stop(now)

    def release(self) -> None:
        """Stop the timers, cancel generation and close the engine session. Safe twice."""
        self.ended = True
        s, self.session = self.session, None
        if s is not None:
            s.cancel()
            self.cancel_floor = CANCELLED_ALL
            s.close()
            self.ctx.stats.add_lag(s.lag)

    async def _open_engine(self, prompt: list[int] | None) -> None:
        """(Re)open the engine session with the current parameters; `prompt`: the history to
        keep (a parameter change that alters the constraints), else a fresh start."""
        s, self.session = self.session, None
        if s is not None:
            s.close()
            self.ctx.stats.add_lag(s.lag)
        loop = self._loop
        assert loop is not None

        def on_event(ev: Event) -> None:  # scheduler thread: hand over, nothing else
            try:
                loop.call_soon_threadsafe(self._on_engine_event, ev)
            except RuntimeError:  # loop closed: the session is gone
                pass

        if prompt is None:
            self.playback.new_history(self.clock.now_ms())
        self.session = await self.rt.open_session(
            prompt or self._start(), self._constraints(), self._sampling(), on_event
        )
        self.session.set_clock(self.clock.engine_clock())
        self.cancel_floor = -1
        self.request = None
        self._new_engine_session()

    def _start(self) -> list[int]:
        """A fresh engine session's first tokens."""
        v = self.vocab
        return [v.BOS, v.TASK_CONTINUE if self.name == "respond" else v.TASK_ACCOMPANY]

    def _new_engine_session(self) -> None:
        """Hook: a new engine session runs no request yet."""

    # --- constraints and sampling ---------------------------------------------------------------
    def _gen_parts(self) -> list[str]:
        """The parts the model plays."""
        return list(self.params.parts) if self.params.parts is not None else self._default_parts()

    def _default_parts(self) -> list[str]:
        raise NotImplementedError

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
        cs += self._mode_constraints()
        cs.append(BeatGrid(*self._grid()))
        return cs

    def _mode_constraints(self) -> list[Constraint]:
        return []

    def _grid(self) -> tuple[float | None, float]:
        """The BeatGrid setting (step, origin) in engine ticks: the grid of the tempo someone
        else keeps (beat_time + tempo_bpm, e.g. a DAW's MIDI clock), or none."""
        step_ms = self.params.grid_step_ms()
        if step_ms is None or self.params.beat_time is None:
            return None, 0.0
        tick_ms = self.clock.tick_ms
        return step_ms / tick_ms, (self.params.beat_time - self.clock.origin) / tick_ms

    def _sampling(self) -> SamplingParams:
        pr = self.params
        return SamplingParams(temperature=pr.temperature, top_p=pr.top_p, seed=pr.seed)

    async def update_params(self, m: Any) -> None:
        changes = m.model_dump(exclude_unset=True, exclude={"type"})
        try:
            new = p.LiveParams.model_validate({**self.params.model_dump(), **changes})
        except ValidationError as e:
            self.ctx.error("bad_message", p.explain(e))
            return
        if (err := harmony.check(new)) is not None:
            self.ctx.error("bad_message", err)
            return
        old, self.params = self.params, new
        self.playback.set_lookahead(new.lookahead_ms)
        s = self.session
        if s is None:
            return
        s.set_grid(*self._grid())  # the DAW's tempo or beat moved: no reopen needed
        self._clock_changed(old, new)
        if (
            changes.keys() <= {"tempo_bpm", "beat_time", "grid"}
            and new.response_beats is None
            and _constraint_keys(old) == _constraint_keys(new)
        ):
            return  # only the grid moved (the bridge re-anchors every 4 beats)
        self._drop_ahead()  # sampled with the old parameters
        if _constraint_keys(old) != _constraint_keys(new):
            # Constraints are fixed per engine session: reopen it on the same history, unless
            # its task is another now (a clock that came or went turns accompaniment into
            # continuation and back; a header that names other parts keeps the history).
            hist = await self.rt.session_tokens(s) if s.window_start == 0 else None
            task = self._start()[:2]
            await self._open_engine(hist if hist and hist[:2] == task else None)
        else:
            s.set_sampling(self._sampling())  # a seed of None keeps the session's
        self._params_changed()

    def _clock_changed(self, old: p.LiveParams, new: p.LiveParams) -> None:
        """Hook: new parameters (the clock's, a chart's may have moved)."""

    def _drop_ahead(self) -> None:
        """Hook: drop what was sampled ahead with the old parameters."""

    def _params_changed(self) -> None:
        """Hook: the parameters changed (after the engine session took them)."""

    # --- the player -----------------------------------------------------------------------------
    def player_midi(self, m: p.ClientMidi) -> None:
        now = self.clock.now_ms()
        t = now if m.time is None else m.time
        if t > now + p.MAX_TIME_AHEAD_MS:
            self.ctx.error(
                "bad_time",
                f"time {t:.1f} ms is {t - now:.0f} ms past the server clock "
                f"(at most {p.MAX_TIME_AHEAD_MS} ms; sync with ping)",
            )
            return
        try:
            msg = mido.Message.from_bytes(m.data)
        except (ValueError, TypeError) as e:
            self.ctx.error("bad_message", f"not a MIDI message: {m.data}: {e}")
            return
        # Never before what has already sounded: the model's history stays what was heard.
        t = max(t, self.last_player_ms, self.playback.sounded_floor(now))
        offs = self._before_player(msg, t, now)
        self.last_player_ms = t
        part, program = self._player_part(msg)
        toks = self.enc.feed(msg, (t - self.clock.origin) / 1000.0, part, program)
        event = [x for x in toks if self.vocab.type_of(x) is not TokenType.TIME]
        marks = self._player_marks(msg, part, t)
        if (event or offs or marks) and self.session is not None:
            self.session.insert(self.clock.tick(t), marks + offs + event)
        self._after_player(msg, event)

    def _before_player(self, msg: mido.Message, t: float, now: float) -> list[int]:
        """Hook: the player plays at `t`; OFF tokens to give before the player's event."""
        return []

    def _player_marks(self, msg: mido.Message, part: str | None, t: float) -> list[int]:
        """Hook: marks the player's event gives (a left-hand chord), before its tokens."""
        return []

    def _after_player(self, msg: mido.Message, event: list[int]) -> None:
        """Hook: the player's event (its tokens) was given to the model."""

    def _player_part(self, msg: mido.Message) -> tuple[str | None, int | None]:
        """The part (and program) a player's note is heard as; (None, None): the encoder's
        default, the lead."""
        return None, None

    def trigger(self) -> None:
        """`trigger`: respond answers now; accompany ignores it."""

    def interrupt(self, t: float) -> list[int]:
        """Stop the running request (the player plays during a response; accompany rests),
        retract what has not sounded, note-offs now. Returns the OFF tokens that tell the model
        those notes ended."""
        assert self.session is not None
        self.session.cancel()  # no Token of the response is delivered after this returns
        if self.request is not None:
            self.cancel_floor = max(self.cancel_floor, self.request)
        self._request_stopped()
        self.request = None
        closed = self.playback.cut(t)
        return [self.vocab.note_off(*n.key) for n in closed if not n.drum]

    def _request_stopped(self) -> None:
        """Hook: the running request was cancelled (`interrupt`)."""

    # --- engine events (loop thread) ------------------------------------------------------------
    def _on_engine_event(self, ev: Event) -> None:
        if self.session is None or ev.session != self.session.id:
            return  # a closed or replaced engine session
        if not self._held(ev):
            self._dispatch_engine_event(ev)

    def _held(self, ev: Event) -> bool:
        """Hook: keep `ev` back (respond holds a speculation's events)."""
        return False

    def _dispatch_engine_event(self, ev: Event) -> None:
        try:
            if isinstance(ev, Token):
                if ev.request > self.cancel_floor:
                    self._play(ev.token, ev.tick, ev.position)
            elif isinstance(ev, Rollback):
                self.playback.rollback(ev)
                self._rolled_back(ev)
            elif isinstance(ev, Done):
                self._on_done(ev)
        except Exception:
            logger.exception("session %s: engine event %s failed", self.ctx.session_id, ev)

    def _play(self, tok: int, tick: int, position: int | None) -> None:
        self.enc.observe([tok])  # keeps the player's PART/PROGRAM bookkeeping in step
        if marks := self.playback.play(tok, tick, position):
            self._model_marks(marks, position)

    def _model_marks(self, marks: list[Beat | ChordChange], position: int | None) -> None:
        """Hook: the model wrote its own beat or chord."""

    def _rolled_back(self, ev: Rollback) -> None:
        """Hook: the engine rolled back (after the playback's retractions)."""

    def _on_done(self, ev: Done) -> None:
        if ev.reason == "error":
            self.ctx.error("internal", "generation failed; the session goes on")
            s = self.session
            if s is not None and s.closed and not self.ended and self._reopening is None:
                # Its engine session is gone with the live worker process: a fresh one (what
                # the old one played ends now: `new_history`).
                self._reopening = asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        try:
            await self._open_engine(prompt=None)
            if self.ended:  # released meanwhile: the new one goes too
                self.release()
        except Exception:
            logger.exception("session %s: reopening the engine session failed", self.ctx.session_id)
            self.ctx.error("internal", "generation stopped; start the session again")
        finally:
            self._reopening = None


def _constraint_keys(pr: p.LiveParams) -> tuple:
    return (
        pr.parts, pr.drums, pr.programs, pr.pitch_low, pr.pitch_high, pr.max_notes_per_second,
        pr.chord_source, pr.beat_time is not None,  # which marks are given (GivenMarks)
        pr.chord_tones,
    )  # fmt: skip
