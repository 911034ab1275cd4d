"""Respond mode (call and response): the model answers when the player has been silent `gap_ms`
(or at once on `trigger`), and stops when the player plays again.

The response is sampled ahead while the player is silent (a `Speculation`) and held; the gap's
end commits it as it was sampled, so the first note costs no forward at all.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import mido

from improv.engine.constraints import Constraint
from improv.engine.live import Done, Event, Rollback, Token
from improv.engine.tokenizer.vocab import TokenType
from improv.protocol import messages as p

from .mode import Mode, ModeContext

RESPONSE_MAX_TOKENS = 4096  # safety cap on one response


@dataclass(eq=False)
class Speculation:
    """The response, sampled while the player is silent, before it is due.

    It starts when the player has released every key: one ordinary response request, sampled
    from the gap's end (`LiveSession.generate(start_tick=...)` writes the time up to it as
    sampled tokens), so it is token for token the response the gap's end would start. Its events
    are held, not sent. The gap's end commits it as it is. A `trigger` before then plays its
    opening (its first note) at once, at the trigger's time, and the response goes on from that
    note (if the opening is still being sampled, as soon as it is: sooner than sampling another).
    The player playing again drops it: nothing held was ever sent, so no note can be left
    sounding, and the engine rolls its tokens back at the player's event.
    """

    request: int
    start: int  # tick the response starts at (the gap's end)
    held: list[Event] = field(default_factory=list)
    opening: list[int] | None = None  # tokens of its first event through the first note-on
    trigger: int | None = None  # a trigger came before the opening was sampled: its tick


class Respond(Mode):
    name = "respond"

    def __init__(self, ctx: ModeContext, params: p.LiveParams) -> None:
        super().__init__(ctx, params)
        self.responding = False
        self.player_dirty = False  # the player played since the last response
        self.spec: Speculation | None = None  # the response sampled ahead
        self._gap_handle: asyncio.TimerHandle | None = None
        self._gap_due = 0.0  # session ms the gap ends at (the response's start)

    def release(self) -> None:
        if self._gap_handle is not None:
            self._gap_handle.cancel()
            self._gap_handle = None
        super().release()
        self.spec = None  # its held events were never sent: nothing to end
        self.responding = False

    def _new_engine_session(self) -> None:
        self.responding = False
        self.spec = None

    def _default_parts(self) -> list[str]:
        return ["lead"]

    def _mode_constraints(self) -> list[Constraint]:
        return []  # the lead-in is a per-request option (`generate(lead_in=True)`)

    # --- the player -----------------------------------------------------------------------------
    def _before_player(self, msg: mido.Message, t: float, now: float) -> list[int]:
        self._drop_ahead()  # the player plays on: the response sampled ahead is not wanted
        offs: list[int] = []
        if self.responding or self.playback.sounding_later(now):
            offs = self.interrupt(t)
        # Notes a finished response left sounding in the model's view end here for it too.
        return offs + [x for x in self.playback.model_offs(self.clock.tick(t)) if x not in offs]

    def _after_player(self, msg: mido.Message, event: list[int]) -> None:
        if msg.type in ("note_on", "note_off", "control_change"):
            self.player_dirty = self.player_dirty or bool(event)
            self._arm_gap()

    def _params_changed(self) -> None:
        if self._gap_handle is not None:
            self._arm_gap()  # speculate again, with the new parameters

    # --- the gap ----------------------------------------------------------------------------------
    def _arm_gap(self) -> None:
        if self._gap_handle is not None:
            self._gap_handle.cancel()
            self._gap_handle = None
        if self.enc.sounding or not self.player_dirty:
            return
        assert self._loop is not None
        self._gap_due = self.last_player_ms + self.params.gap_ms
        self._speculate(self.clock.tick(self._gap_due))
        if self.spec is not None:
            # Committed when its first note is due to be sent (its start tick, lookahead_ms
            # early), like any generated event.
            fire = self.clock.ms(self.spec.start) - self.params.lookahead_ms
        else:
            fire = self._gap_due
        delay = max(0.0, fire - self.clock.now_ms()) / 1000.0
        self._gap_handle = self._loop.call_later(delay, self._on_gap)

    def _on_gap(self) -> None:
        self._gap_handle = None
        if self.ended or self.enc.sounding or not self.player_dirty:
            return
        if self.spec is not None:
            self._commit(self.spec)
            return
        wait = self._gap_due - self.clock.now_ms()
        if wait > 0.5:  # the speculation was dropped (e.g. `params`): wait for the gap's end
            assert self._loop is not None
            self._gap_handle = self._loop.call_later(wait / 1000.0, self._on_gap)
            return
        self.trigger()

    # --- responses --------------------------------------------------------------------------------
    def _response_ticks(self) -> int:
        return int(round(self.params.response_length_seconds() * self.vocab.ticks_per_second))

    def trigger(self) -> None:
        """`trigger` (or the gap's end without a speculation): the response starts now."""
        s = self.session
        if s is None or self.responding:
            return
        # The tick at or before now (not the nearest): the first note is due at once, not up to
        # half a tick later.
        start = self.clock.tick_at_or_before(self.clock.now_ms())
        spec = self.spec
        if spec is not None:
            if start >= spec.start:  # its start has come: it is the response
                self._commit(spec)
                return
            if spec.opening is not None:  # play its first note now
                self._commit_at(spec, start)
            elif spec.trigger is None:  # its first note is being sampled: play it when it is
                spec.trigger = start  # (sooner than sampling another from scratch)
            return
        self.player_dirty = False
        # Time up to now, the response starts here; the notes an earlier response left sounding
        # in the model's view end here for it (the player played nothing since to end them).
        s.insert(start, self.playback.model_offs(start))
        self.request = s.generate(
            max_tokens=RESPONSE_MAX_TOKENS,
            until_tick=start + self._response_ticks(),
            lead_in=True,  # its first event is a note, at `start`
        )
        self.responding = True

    def _speculate(self, start: int) -> None:
        """The player went silent: sample the response the gap's end would start (at tick
        `start`), holding its events (see `Speculation`)."""
        s = self.session
        if s is None or self.responding or self.spec is not None:
            return
        rid = s.generate(
            max_tokens=RESPONSE_MAX_TOKENS,
            until_tick=start + self._response_ticks(),
            start_tick=start,
            lead_in=True,
        )
        self.spec = Speculation(rid, start)

    def _drop_ahead(self) -> None:
        """Forget the speculation: no held event was sent; the engine drops its tokens at the
        next insert (the player's event, or the response's start)."""
        spec, self.spec = self.spec, None
        if spec is None:
            return
        assert self.session is not None
        self.session.cancel()
        self.cancel_floor = max(self.cancel_floor, spec.request)

    def _commit(self, spec: Speculation) -> None:
        """The gap's end: the speculation is the response, exactly as sampled."""
        self.spec = None
        self.player_dirty = False
        self.request = spec.request
        self.responding = True
        for ev in spec.held:
            self._dispatch_engine_event(ev)

    def _commit_at(self, spec: Speculation, start: int) -> None:
        """A trigger before the gap's end: the speculation's first note plays at `start` (the
        model's history records it there, as heard), and the response goes on from it."""
        s = self.session
        opening = spec.opening
        assert s is not None and opening is not None
        self._drop_ahead()
        s.insert(start, opening)  # rolls the speculation back; the opening is given at `start`
        for tok in opening:
            self._play(tok, start, None)  # None: given tokens are never rolled back
        self.player_dirty = False
        self.request = s.generate(
            max_tokens=RESPONSE_MAX_TOKENS, until_tick=start + self._response_ticks()
        )
        self.responding = True

    def _request_stopped(self) -> None:
        self.responding = False

    # --- engine events ----------------------------------------------------------------------------
    def _held(self, ev: Event) -> bool:
        spec = self.spec
        if spec is None or isinstance(ev, Rollback) or ev.request != spec.request:
            return False
        self._hold(spec, ev)  # sent when committed, or dropped
        return True

    def _hold(self, spec: Speculation, ev: Token | Done) -> None:
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

    def _on_done(self, ev: Done) -> None:
        if ev.request != self.request:
            super()._on_done(ev)
            return
        # The response ended: its notes end with it, for the listener and for the model.
        self.responding = False
        self.request = None
        # The model's OFF tokens are given with the player's next event (at its time: giving
        # them now, at the response's end tick, would pin the player's next event after it).
        self.playback.end_response(ev.tick)
