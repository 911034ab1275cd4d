"""Tokens -> note events: what the token language means, written once.

`TokenDecoder.feed(token)` gives the events one token determines, each with its tick: a note-on
at its `ON` (with the velocity of the `VEL` before it and its part's program), a note-off at its
`OFF`, a drum hit's note-off `drum_note_ms` after its note-on (drums have no `OFF` tokens), and a
program change at a pitched part's `PART p PROGRAM x` pair (a drum part's program names its kit:
no MIDI program change). Time comes from the time tokens, or from the caller where it knows
better (a live session's `Token.tick`: the engine may have clipped or moved a wait).

Its users: `StreamDecoder` (timed MIDI messages, whole files), the offline note builder
(improv.engine.generation) and the live server's playback. `OpenNotes` is the note bookkeeping
the first two share (the live playback keeps its own: a rollback reopens notes).

A harmony vocabulary's `BAR`/`BEAT` and `CHORD` tokens are `Beat` and `ChordChange` events;
consumers skip the events they do not play. Header tokens (given in prompts) determine nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from .vocab import TokenType, Vocab


class NoteOn(NamedTuple):
    tick: int
    part: int
    pitch: int
    velocity: int  # 1..127
    program: int  # the part's GM program when the note starts


class NoteOff(NamedTuple):
    tick: int
    part: int
    pitch: int


class ProgramChange(NamedTuple):
    tick: int
    part: int  # never the drums
    program: int


class Beat(NamedTuple):
    tick: int
    bar: bool  # a downbeat


class ChordChange(NamedTuple):
    tick: int
    chord: int  # harmony.chord_index (0: no chord)


NoteEvent = NoteOn | NoteOff | ProgramChange | Beat | ChordChange


class TokenDecoder:
    """One token at a time -> `NoteEvent`s. `programs`: part -> program until the stream sets
    one (default 0)."""

    def __init__(self, vocab: Vocab, programs: Mapping[int, int] | None = None, tick: int = 0):
        self.vocab = vocab
        self.tick = tick  # token time after the last token fed
        self.programs = dict(programs or {})
        self.velocity = 64
        self.pending_part: int | None = None  # a PART waiting for its PROGRAM
        self.drum_ticks = max(1, round(vocab.config.drum_note_ms / vocab.config.tick_ms))

    def feed(self, tok: int, tick: int | None = None) -> list[NoteEvent]:
        """The events `tok` determines. `tick`: the token time after it as the caller knows it
        (None: counted here from the time tokens)."""
        v = self.vocab
        ty = v.type_of(tok)
        if tick is not None:
            self.tick = tick
        elif ty is TokenType.TIME:
            self.tick += v.shift_ticks(tok)
        if ty is TokenType.PART:
            self.pending_part = tok - v.part_base
        elif ty is TokenType.PROGRAM:
            part, self.pending_part = self.pending_part, None
            if part is not None:
                self.programs[part] = program = tok - v.program_base
                if part != v.drums:
                    return [ProgramChange(self.tick, part, program)]
        elif ty is TokenType.VELOCITY:
            self.velocity = max(1, v.bin_velocity(tok - v.vel_base))
        elif ty is TokenType.NOTE_ON:
            part, pitch = v.note_of(tok)
            on = NoteOn(self.tick, part, pitch, self.velocity, self.programs.get(part, 0))
            if part == v.drums:
                return [on, NoteOff(self.tick + self.drum_ticks, part, pitch)]
            return [on]
        elif ty is TokenType.NOTE_OFF:
            part, pitch = v.note_of(tok)
            return [NoteOff(self.tick, part, pitch)]
        elif ty is TokenType.METER:
            return [Beat(self.tick, tok == v.BAR)]
        elif ty is TokenType.CHORD:
            return [ChordChange(self.tick, tok - v.chord_base)]
        return []

    def drop_pending(self) -> None:
        """Forget a `PART` whose `PROGRAM` was rolled back."""
        self.pending_part = None


class OpenNotes:
    """The notes sounding in a decoded stream. An `ON` for a key already sounding ends that note
    first (ungrammatical, but the output stays balanced); an `OFF` for a key not sounding ends
    nothing (a note of someone else's, or one already ended)."""

    def __init__(self) -> None:
        self.open: dict[tuple[int, int], NoteOn] = {}

    def start(self, on: NoteOn) -> NoteOn | None:
        """Open `on`; the note it ends (a re-strike of its key), if any."""
        key = (on.part, on.pitch)
        ended = self.open.pop(key, None)
        self.open[key] = on
        return ended

    def end(self, off: NoteOff) -> NoteOn | None:
        """The note `off` ends, if it sounds."""
        return self.open.pop((off.part, off.pitch), None)

    def finish(self) -> list[NoteOn]:
        """Every note still sounding (by key), now ended."""
        out = [self.open[k] for k in sorted(self.open)]
        self.open.clear()
        return out
