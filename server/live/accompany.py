"""Accompany mode: the model plays along with the player, sampling `horizon_ms` past now.

It starts with the player's first note, hears the player's keys below `bass_split` as a bass
line, and rests (its notes off) when the player has been silent `rest_ms`. Its harmony and meter
(a chart, the left hand's chords, a clock, or the model's own) are `Harmony`'s.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import mido

from improv.engine.constraints import Constraint
from improv.engine.generation import ACCOMPANY_WAIT_TEMPERATURE
from improv.engine.live import LiveSession, Rollback, SamplingParams
from improv.engine.tokenizer.decode import Beat, ChordChange
from improv.engine.tokenizer.stream import DRUM_CHANNEL
from improv.protocol import messages as p

from .harmony import Harmony
from .mode import Mode, ModeContext

ACCOMPANY_TICK_S = 0.05  # how often accompany extends its sampling horizon


class Accompany(Mode):
    name = "accompany"

    def __init__(self, ctx: ModeContext, params: p.LiveParams) -> None:
        super().__init__(ctx, params)
        self.lead_heard = False  # the player has played a note (the model waits for it)
        self._horizon_tick = -1
        self._bass_keys: set[tuple[int, int]] = set()  # (channel, key) held as the bass part
        self._low_held: set[int] = set()  # keys held as the bass (the left hand's chord)
        self._timer: asyncio.Task[None] | None = None
        self.harmony = Harmony(
            self.vocab, self.clock, self.playback, params, follower=self.rt.chord_follower
        )

    def _default_parts(self) -> list[str]:
        return p.ACCOMPANY_PARTS + (["drums"] if self.params.drums else [])

    async def open(self, now: float) -> None:
        await super().open(now)
        self._timer = asyncio.create_task(self._run(), name=f"live-{self.ctx.session_id}-acc")

    def release(self) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        self._timer = None
        super().release()

    def _start(self) -> list[int]:
        """On a clock (or a chart's), a harmony model continues the whole piece, the player's
        parts given, as offline accompaniment does (`engine.generation.plan_accompany`;
        docs/engine-live.md, "Accompaniment as continuation")."""
        v, pr = self.vocab, self.params
        if not (v.harmony and pr.clocked()):
            return super()._start()
        # the player's parts with the programs they are heard in (`_player_part`), as offline
        # accompaniment names the given parts' programs
        given = {"lead": pr.player_program}
        if pr.bass_split is not None:
            given["bass"] = p.PLAYER_BASS_PROGRAM
        programs = {**(pr.programs or {}), **given}
        parts = [*given, *(x for x in self._gen_parts() if x not in given)]
        head = v.header([(v.part_index[x], programs.get(x)) for x in parts])
        return [v.BOS, v.TASK_CONTINUE, *head]

    def _sampling(self) -> SamplingParams:
        """On a clock (decision points at its eighths), the waits tempered as offline
        accompaniment's (`engine.generation.ACCOMPANY_WAIT_TEMPERATURE`)."""
        sampling = super()._sampling()
        if self.vocab.harmony and self.params.clocked():
            return replace(sampling, wait_temperature=ACCOMPANY_WAIT_TEMPERATURE)
        return sampling

    def _new_engine_session(self) -> None:
        self._horizon_tick = -1
        if self._timer is not None:  # (a reopen; at the start, `Harmony` waits for the lead)
            self.harmony.new_engine_session(self.session, self.clock.now_ms())

    def _mode_constraints(self) -> list[Constraint]:
        return self.harmony.constraints(self.params)

    def _clock_changed(self, old: p.LiveParams, new: p.LiveParams) -> None:
        keys = ("chord_source", "chords", "beats_per_bar", "tempo_bpm", "beat_time")
        if any(getattr(old, k) != getattr(new, k) for k in keys):
            self.harmony.retime(self.session, new, self.clock.now_ms())
        else:
            self.harmony.params = new  # (chord_hedge, chord_tones: from the next beat read)

    async def _run(self) -> None:
        """Keep the model sampling `horizon_ms` past now (a new request replaces the old one)."""
        while True:
            s = self.session
            self.harmony.advance(s, self.clock.now_ms())
            self.harmony.follow_beats(s, self.clock.now_ms())
            # Not before the player's first note: an intro would be in a key the model can
            # only guess, and it would hold to it when the player comes in.
            if s is not None and self.lead_heard:
                pr, now = self.params, self.clock.now_ms()
                if (
                    pr.rest_ms is not None
                    and not self.enc.sounding
                    and now - self.last_player_ms >= pr.rest_ms
                ):
                    self._rest(s, now)
                else:
                    horizon = max(pr.horizon_ms, pr.lookahead_ms + 50)
                    until = self.clock.tick(now + horizon)
                    if until > self._horizon_tick:
                        self._horizon_tick = until
                        self.request = s.generate(until_tick=until)
            await asyncio.sleep(ACCOMPANY_TICK_S)

    def _rest(self, s: LiveSession, now: float) -> None:
        """The player stopped (`rest_ms`): the accompaniment ends now, its notes off for the
        listener and the model (what it sampled past now was never heard), and waits for the
        player's next note, as at the start."""
        s.insert(self.clock.tick(now), self.interrupt(now))
        self.harmony.rest()
        self.lead_heard = False
        self._horizon_tick = -1

    # --- the player -----------------------------------------------------------------------------
    def _before_player(self, msg: mido.Message, t: float, now: float) -> list[int]:
        if not self.lead_heard and msg.type == "note_on" and msg.velocity > 0:
            self.lead_heard = True
            self.harmony.begin(self.session, t)  # the chart's first bar, the engine's marks
        return []

    def _player_marks(self, msg: mido.Message, part: str | None, t: float) -> list[int]:
        """A chord change read from the left hand (the keys held below the split), or on a
        clock from the melody (`Harmony.melody_note`)."""
        if msg.type not in ("note_on", "note_off") or msg.channel == DRUM_CHANNEL:
            return []
        on = msg.type == "note_on" and msg.velocity > 0
        if part != "bass":
            return self.harmony.melody_note(self.session, msg.note, t, on, self.clock.now_ms())
        if not on:
            self._low_held.discard(msg.note)
            return []
        self._low_held.add(msg.note)
        if self.params.chord_source != "left_hand":
            return []
        return self.harmony.left_hand(sorted(self._low_held), t)

    # --- the model's own marks --------------------------------------------------------------------
    def _model_marks(self, marks: list[Beat | ChordChange], position: int | None) -> None:
        self.harmony.model_marks(marks, position)

    def _rolled_back(self, ev: Rollback) -> None:
        self.harmony.rollback(ev.position)

    def _player_part(self, msg: mido.Message) -> tuple[str | None, int | None]:
        """With `bass_split`, keys below it are the bass; a note-off goes where its note-on
        went, whatever the split is now. (None, None): the encoder's default, the lead."""
        if msg.type not in ("note_on", "note_off") or msg.channel == DRUM_CHANNEL:
            return None, None
        key = (msg.channel, msg.note)
        bass = self.vocab.part_index["bass"]
        # a key struck again while it sounds as the bass stays the bass (the encoder ends the
        # old note first), else that note would sound on in the model's history
        restrike = key in self._bass_keys and (bass, msg.note) in self.enc.sounding
        if msg.type == "note_on" and msg.velocity > 0 and not restrike:
            split = self.params.bass_split
            if split is not None and msg.note < split:
                self._bass_keys.add(key)
            else:
                self._bass_keys.discard(key)
        if key in self._bass_keys:
            return "bass", p.PLAYER_BASS_PROGRAM
        return None, None
