"""Playback: the model's tokens -> outgoing MIDI events; a rollback -> retractions.

Tokens are decoded by the tokenizer's `TokenDecoder`; this turns its events into timed
`ServerMidi` messages in the outbox and keeps what a rollback needs: every generated event with
the token position it came from, and the model's notes with their note-on and note-off events. A
program change goes out with its part's next note (alone it sounds nothing). A rollback cancels
the events of the tokens it removed; those already sent are retracted, and the events after the
retract that survive are sent again (the client drops everything after it).

Every note-on gets its note-off: `cut` ends what sounds (a stop, an interrupt, a new history).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from improv.engine.live import Rollback
from improv.engine.tokenizer.decode import (
    Beat,
    ChordChange,
    NoteOff,
    NoteOn,
    ProgramChange,
    TokenDecoder,
)
from improv.engine.tokenizer.stream import part_channel
from improv.engine.tokenizer.vocab import Vocab
from improv.protocol import messages as p

from .clock import SessionClock
from .outbox import Outbox, Outgoing
from .stats import LiveStats

logger = logging.getLogger(__name__)

RETRACT_EPS_MS = 0.001  # a retract just before an event's time drops that event too
FORGET_AFTER_MS = 2000.0  # events this long past are forgotten (a rollback can't reach them)
KEEP_EVENTS = 256  # ... once there are more than this many


@dataclass(eq=False)
class Generated(Outgoing):
    """A generated MIDI event."""

    time_ms: float = 0.0  # when it sounds (session ms)
    position: int | None = None  # the token position it came from (None: given, never rolled back)
    # a program change: (part, program, position of its PROGRAM token); it goes with a note
    program: tuple[int, int, int | None] | None = None
    # a `chord` or `beat` of the session's schedule (clock, chart, left hand): an interrupt's
    # cut leaves it (the beat goes on while the band rests); the mode's end cancels it
    scheduled: bool = False

    @property
    def is_midi(self) -> bool:
        return isinstance(self.msg, p.ServerMidi)


@dataclass(eq=False)
class Note:
    key: tuple[int, int]  # (part, pitch)
    on: Generated
    off: Generated | None = None
    drum: bool = False


class Playback:
    def __init__(self, vocab: Vocab, clock: SessionClock, outbox: Outbox, stats: LiveStats) -> None:
        self.vocab = vocab
        self.clock = clock
        self.outbox = outbox
        self.stats = stats
        self.lookahead_ms = 100.0  # events go out this long before their time
        self.decoder = TokenDecoder(vocab)
        self.events: list[Generated] = []  # generated midi not yet long past
        self.open: dict[tuple[int, int], Note] = {}  # the model's sounding notes, by key
        self.notes: list[Note] = []  # notes whose note-off is not yet sent
        # Notes a finished response ended for the listener that the model still hears sounding:
        # their OFF tokens are given with the player's next event (respond).
        self.model_sounding: dict[tuple[int, int], Note] = {}
        # part -> (program, token position): a generated program change, sent with the part's
        # next note-on
        self.program_due: dict[int, tuple[int, int | None]] = {}

    def set_lookahead(self, ms: float) -> None:
        if ms != self.lookahead_ms:
            self.lookahead_ms = ms
            self.outbox.reschedule(ms)

    # --- tokens -> events -----------------------------------------------------------------------
    def play(self, tok: int, tick: int, position: int | None) -> list[Beat | ChordChange]:
        """A generated token at token time `tick` (position None: given, never rolled back).
        Returns the model's own marks (a beat, a chord) for the mode to announce."""
        self._forget_past()
        marks: list[Beat | ChordChange] = []
        for ev in self.decoder.feed(tok, tick):
            t = self.clock.ms(ev.tick)
            if isinstance(ev, ProgramChange):
                # Sent with the part's next note, at its time: alone it sounds nothing, and at
                # its own token's time it went out late whenever the clock floor moved the note
                # after it.
                self.program_due[ev.part] = (ev.program, position)
            elif isinstance(ev, NoteOn):
                key = (ev.part, ev.pitch)
                ch = part_channel(ev.part, self.vocab.drums)
                if key in self.open:  # cannot happen with the grammar; keep MIDI balanced anyway
                    self._note_off(self.open.pop(key), t, position)
                if (due := self.program_due.pop(ev.part, None)) is not None:
                    # the note's position: if the note is rolled back, so is the change
                    pc = self.emit(t, [0xC0 | ch, due[0]], ev.part, position)
                    pc.program = (ev.part, *due)
                on = self.emit(t, [0x90 | ch, ev.pitch, ev.velocity], ev.part, position)
                note = Note(key, on, drum=ev.part == self.vocab.drums)
                self.notes.append(note)
                self.open[key] = note  # a drum hit's NoteOff follows at once
            elif isinstance(ev, NoteOff):
                note = self.open.pop((ev.part, ev.pitch), None)
                if note is not None:  # else: a note of the player's, or one already closed
                    self._note_off(note, t, position)
            elif isinstance(ev, Beat | ChordChange):
                marks.append(ev)
        return marks

    def announce(
        self,
        msg: p.Chord | p.Beat,
        position: int | None = None,
        at_once: bool = False,
        scheduled: bool = False,
    ) -> Generated:
        """A `chord` or `beat` message for session time `msg.time`: sent `lookahead_ms` before
        it, or at once (`at_once`: what comes next, shown ahead). `position`: the model's token
        (a rollback retracts it); None: the schedule's (`scheduled`) or the player's."""
        now = self.clock.now_ms()
        send_at = now if at_once else msg.time - self.lookahead_ms
        e = Generated(send_at, msg, time_ms=msg.time, position=position, scheduled=scheduled)
        e.at_once = at_once
        self.outbox.put(e)
        self.events.append(e)
        return e

    def withdraw(self, after: float) -> None:
        """The schedule changed from `after` on (a moved clock, a new chart): its announcements
        after then are cancelled, retracted if sent (what else survives is sent again)."""
        any_sent = False
        for e in self.events:
            if e.scheduled and not e.cancelled and e.time_ms > after:
                e.cancelled = True
                any_sent |= e.sent
        if any_sent:
            self._retract(after)

    def emit(self, t: float, data: list[int], part: int, position: int | None) -> Generated:
        """A generated event sounding at session time `t`."""
        msg = p.ServerMidi(data=data, time=t, part=self.vocab.config.parts[part])
        e = Generated(t - self.lookahead_ms, msg, time_ms=t, position=position)
        self.outbox.put(e)
        self.events.append(e)
        return e

    def _note_off(self, note: Note, t: float, position: int | None, at_once: bool = False) -> None:
        ch = part_channel(note.key[0], self.vocab.drums)
        note.off = self.emit(
            max(t, note.on.time_ms), [0x80 | ch, note.key[1], 0], note.key[0], position
        )
        note.off.at_once = at_once

    def _forget_past(self) -> None:
        if len(self.events) <= KEEP_EVENTS:
            return
        cutoff = self.clock.now_ms() - FORGET_AFTER_MS
        if self.events[0].time_ms < cutoff:
            self.events = [x for x in self.events if x.time_ms >= cutoff or not x.sent]
            self.notes = [
                n for n in self.notes if n.off is None or not n.off.sent or n.off.time_ms >= cutoff
            ]

    # --- rollback and ends ------------------------------------------------------------------------
    def rollback(self, ev: Rollback) -> None:
        """Tokens from `ev.position` on are gone: cancel their events; a note whose ON stays but
        whose OFF went is sounding again (the regenerated stream will end it)."""
        after = self.clock.ms(ev.tick)
        any_sent = False
        self.program_due = {
            k: d for k, d in self.program_due.items() if d[1] is None or d[1] < ev.position
        }
        for e in self.events:
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
                    self.program_due.setdefault(prog[0], prog[1:])
        for n in list(self.notes):
            if n.on.cancelled:
                self.notes.remove(n)
                if self.open.get(n.key) is n:
                    del self.open[n.key]
            elif n.off is not None and n.off.cancelled and not n.drum:
                n.off = None
                self.open[n.key] = n
        self.decoder.drop_pending()
        if any_sent or any(e.sent and e.time_ms > after for e in self.events if not e.cancelled):
            self._retract(after)

    def end_response(self, tick: int) -> None:
        """A response ended at `tick`: its notes end with it for the listener; the model hears
        them end with the player's next event (`model_offs`)."""
        t = self.clock.ms(tick)
        for key, note in self.open.items():
            self._note_off(note, t, None)
            self.model_sounding[key] = note
        self.open.clear()

    def model_offs(self, tick: int) -> list[int]:
        """OFF tokens, at `tick`, for the notes a finished response left sounding in the model's
        view (they ended for the listener with the response)."""
        offs = [
            self.vocab.note_off(*key)
            for key, n in self.model_sounding.items()
            if not n.on.cancelled and self.clock.tick(n.on.time_ms) <= tick
        ]
        self.model_sounding.clear()
        return offs

    def cut(self, t: float, scheduled: bool = False) -> list[Note]:
        """Cancel every generated event after `t` (and the schedule's announcements too if
        `scheduled`); note-offs at `t` for the notes sounding then. Returns those notes."""
        any_sent = False
        for e in self.events:
            if not e.cancelled and e.time_ms > t and (scheduled or not e.scheduled):
                e.cancelled = True
                any_sent |= e.sent
        if any_sent:
            self._retract(t)
        closed = []
        for n in list(self.notes):
            if n.on.cancelled:  # never heard: the model's OFF for it must find nothing open
                self.notes.remove(n)
                if self.open.get(n.key) is n:
                    del self.open[n.key]
            elif n.off is None or n.off.cancelled:
                self._note_off(n, t, None, at_once=True)
                closed.append(n)
        self.open = {k: n for k, n in self.open.items() if n.off is None}
        return closed

    def new_history(self, now: float) -> None:
        """The engine session starts a fresh token history: the model would never end a note it
        played before (it is not in it), so they end now; and its positions start again, so a
        rollback in it must not reach the events of the one before."""
        self.cut(now)
        self.model_sounding.clear()
        for e in self.events:
            e.position = None
        self.program_due = {part: (prog, None) for part, (prog, _) in self.program_due.items()}

    def stop(self, now: float) -> None:
        """The mode ends: what has not sounded is retracted, what sounds ends now."""
        self.cut(now, scheduled=True)
        self.open.clear()
        self.model_sounding.clear()

    # --- queries ----------------------------------------------------------------------------------
    def sounding_later(self, now: float) -> bool:
        """A generated event is still to sound (a response generated ahead of real time)."""
        return any(not e.cancelled and e.time_ms > now and e.is_midi for e in self.events)

    def sounded_floor(self, now: float) -> float:
        """Time of the latest generated event that has already sounded (0 if none)."""
        times = [
            e.time_ms for e in self.events if not e.cancelled and e.time_ms <= now and e.is_midi
        ]
        return max(times, default=0.0)

    # --- retract ----------------------------------------------------------------------------------
    def _retract(self, after: float) -> None:
        """Retract after `after`, then re-send the surviving events the client will drop."""
        self.stats.retracts += 1
        # Everything enqueued from now on goes out after the retract (else the client would
        # drop it); the surviving events after `after`, sent or still queued, go again after it.
        floor = self.outbox.raise_floor()
        self.outbox.message(p.Retract(after=after), floor)
        for e in list(self.events):
            if not e.cancelled and e.time_ms > after:
                e.cancelled = True
                again = Generated(
                    # (an announcement sent at once goes again at once: what comes next)
                    floor if e.at_once else e.time_ms - self.lookahead_ms,
                    e.msg,
                    time_ms=e.time_ms,
                    at_once=e.at_once,
                    position=e.position,
                    program=e.program,
                    scheduled=e.scheduled,
                )
                self.outbox.put(again)
                self.events.append(again)
                for n in self.notes:
                    if n.off is e:
                        n.off = again
                    if n.on is e:
                        n.on = again
