"""Live encoding and decoding, one event or token at a time.

`StreamEncoder` turns live MIDI messages into tokens the moment they arrive (a held note is a
token as soon as its note-on comes in). Fed a file's messages in time order, it writes exactly
what `Tokenizer.encode` writes for that file (tests/engine/tokenizer/test_stream.py).

`StreamDecoder` turns tokens into timed MIDI messages as soon as each is determined (the token
language is decoded by `decode.TokenDecoder`; this only makes MIDI messages of its events).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import mido

from .decode import NoteOff, NoteOn, OpenNotes, ProgramChange, TokenDecoder
from .notes import Note
from .vocab import TokenType, Vocab

DRUM_CHANNEL = 9
SUSTAIN_CC = 64


def part_channel(part: int, drums: int) -> int:
    """Output channel of a part: drums on channel 10 (index 9), the others in order, skipping 9."""
    if part == drums:
        return DRUM_CHANNEL
    return part if part < DRUM_CHANNEL else part + 1


class StreamEncoder:
    """Live MIDI messages -> tokens.

    Parts come from the message channel (`channel_parts`, channel 10 -> drums by default) or the
    `part` given to `feed`, else the encoder's default part (the player's part: lead).
    Times are seconds on the session clock and must not go backwards; a late message is written
    at the current time (live input can jitter by a millisecond).
    """

    def __init__(
        self,
        vocab: Vocab,
        part: str = "lead",
        channel_parts: Mapping[int, str] | None = None,
        program: int = 0,
        start_tick: int = 0,
    ) -> None:
        self.vocab = vocab
        self.default_part = vocab.part_index[part]
        self.channel_parts = {DRUM_CHANNEL: vocab.drums}
        for ch, p in (channel_parts or {}).items():
            self.channel_parts[ch] = vocab.part_index[p]
        self.default_program = program
        self.tick = start_tick  # time of the last token written
        self._tps = vocab.ticks_per_second
        self._channel_program: dict[int, int] = {}
        self._part_program: dict[int, int] = {}  # program last written for each part
        self._held: dict[tuple[int, int], int] = {}  # (part, pitch) -> keys down
        self._sounding: set[tuple[int, int]] = set()
        self._pedal: dict[int, bool] = {}
        # channel -> {key the pedal holds: when its tail ends (seconds)}
        self._deferred: dict[int, dict[tuple[int, int], float]] = {}
        self._max_sustain = vocab.config.max_sustain_ms / 1000
        self._drum_map = vocab.config.drum_map

    # --- state shared with the session -----------------------------------------------------------
    @property
    def sounding(self) -> frozenset[tuple[int, int]]:
        """(part, pitch) of every note whose note-on was written and note-off not yet."""
        return frozenset(self._sounding)

    def observe(self, tokens: list[int]) -> None:
        """Track tokens written by someone else into the same stream (the model's own notes in a
        live session), so time and per-part programs stay in step."""
        pending_part = None
        v = self.vocab
        for tok in tokens:
            t = v.type_of(tok)
            if t is TokenType.TIME:
                self.tick += v.shift_ticks(tok)
            elif t is TokenType.PART:
                pending_part = tok - v.part_base
            elif t is TokenType.PROGRAM and pending_part is not None:
                self._part_program[pending_part] = tok - v.program_base

    # --- feeding ---------------------------------------------------------------------------------
    def feed(
        self, msg: mido.Message, time: float, part: str | None = None, program: int | None = None
    ) -> list[int]:
        """Tokens for one message at `time` seconds ([] for messages that write nothing now);
        `program` (a note-on's) instead of its channel's."""
        kind = msg.type
        if kind == "program_change":
            self._channel_program[msg.channel] = msg.program
            return []
        if kind == "control_change" and msg.control == SUSTAIN_CC:
            down = msg.value >= 64
            if down or not self._pedal.get(msg.channel, False):
                out = self._expire(time, inclusive=True)
                self._pedal[msg.channel] = down
                return out
            return self._pedal_up(msg.channel, time)
        is_on = kind == "note_on" and msg.velocity > 0
        if not is_on and kind not in ("note_on", "note_off"):
            return []
        # held notes whose tail ended before this message (at its instant too, unless it is a
        # note-off: at one instant key releases come before pedal tails, as in the file encoder)
        out = self._expire(time, inclusive=is_on)
        p = (
            self.vocab.part_index[part]
            if part is not None
            else self.channel_parts.get(msg.channel, self.default_part)
        )
        if is_on:
            return out + self._note_on(p, msg.note, msg.velocity, msg.channel, time, program)
        return out + self._note_off(p, msg.note, msg.channel, time)

    def advance(self, time: float) -> list[int]:
        """Note-offs for pedal-held notes whose tail ended before `time` (a live session calls
        this as time passes; feeding a message does it too)."""
        return self._expire(time, inclusive=False)

    def release_all(self, time: float) -> list[int]:
        """Note-offs for every sounding note (the session ends or the player's part is reset)."""
        out = self._advance(time)
        for key in sorted(self._sounding):
            out.append(self.vocab.note_off(*key))
        self._sounding.clear()
        self._held.clear()
        self._deferred.clear()
        return out

    # --- internals ---------------------------------------------------------------------------------
    def _advance(self, time: float) -> list[int]:
        tick = math.floor(time * self._tps + 0.5)
        if tick <= self.tick:
            return []
        out = self.vocab.time_tokens(tick - self.tick)
        self.tick = tick
        return out

    def _note_on(
        self,
        part: int,
        pitch: int,
        velocity: int,
        channel: int,
        time: float,
        program: int | None = None,
    ) -> list[int]:
        v = self.vocab
        out = self._advance(time)
        if program is None:
            program = self._channel_program.get(channel, self.default_program)
        if part == v.drums:
            pitch = self._drum_map.get(pitch, pitch)
        else:
            key = (part, pitch)
            if key in self._sounding:  # struck again while sounding: end the old one first
                out.append(v.note_off(part, pitch))
                for keys in self._deferred.values():
                    keys.pop(key, None)
            self._held[key] = self._held.get(key, 0) + 1
            self._sounding.add(key)
        if self._part_program.get(part) != program:
            self._part_program[part] = program
            out += (v.part(part), v.program(program))
        out += (v.velocity(v.velocity_bin(velocity)), v.note_on(part, pitch))
        return out

    def _note_off(self, part: int, pitch: int, channel: int, time: float) -> list[int]:
        key = (part, pitch)
        held = self._held.get(key, 0)
        if part == self.vocab.drums or held == 0:
            return []  # drum hits have no note-off token; a stray note-off changes nothing
        if held > 1:
            self._held[key] = held - 1
            return []
        del self._held[key]
        if self._pedal.get(channel, False):
            self._deferred.setdefault(channel, {})[key] = time + self._max_sustain
            return []
        out = self._advance(time)
        out.append(self.vocab.note_off(part, pitch))
        self._sounding.discard(key)
        return out

    def _expire(self, time: float, inclusive: bool) -> list[int]:
        """Note-offs, each at its own time, for held notes whose tail ends before `time`."""
        due = [
            (until, key, ch)
            for ch, keys in self._deferred.items()
            for key, until in keys.items()
            if until < time or (inclusive and until == time)
        ]
        out: list[int] = []
        for until, key, ch in sorted(due):
            del self._deferred[ch][key]
            out += self._advance(until)
            out.append(self.vocab.note_off(*key))
            self._sounding.discard(key)
        return out

    def _pedal_up(self, channel: int, time: float) -> list[int]:
        out = self._expire(time, inclusive=False)
        self._pedal[channel] = False
        # tails ending at this instant and the notes the pedal releases: one batch, by key
        released = set(self._deferred.pop(channel, {}))
        for keys in self._deferred.values():
            for key, until in list(keys.items()):
                if until == time:
                    released.add(key)
                    del keys[key]
        if not released:
            return out
        out += self._advance(time)
        for key in sorted(released):
            out.append(self.vocab.note_off(*key))
            self._sounding.discard(key)
        return out


class TimedMessage(NamedTuple):
    time: float  # seconds on the stream clock
    message: mido.Message
    part: int


class StreamDecoder:
    """Tokens -> timed MIDI messages, each as soon as it is determined (the events of
    `TokenDecoder`, on the channels of `part_channel`).

    A note-on is emitted at its ON token; its note-off at its OFF token (drum hits: together with
    the note-on, `drum_note_ms` later). `finish()` closes whatever still sounds, so a consumer that
    forwards everything never leaves a note hanging.
    """

    def __init__(self, vocab: Vocab, start_tick: int = 0) -> None:
        self.vocab = vocab
        self._dec = TokenDecoder(vocab, tick=start_tick)
        self._open = OpenNotes()
        self.notes: list[Note] = []  # completed notes, for file decoding

    @property
    def tick(self) -> int:
        return self._dec.tick

    @property
    def time(self) -> float:
        return self.tick / self.vocab.ticks_per_second

    @property
    def sounding(self) -> frozenset[tuple[int, int]]:
        return frozenset(self._open.open)

    def _msg(self, tick: int, part: int, **kw: int | str) -> TimedMessage:
        ch = part_channel(part, self.vocab.drums)
        return TimedMessage(
            tick / self.vocab.ticks_per_second, mido.Message(channel=ch, **kw), part
        )

    def _close(self, on: NoteOn, tick: int) -> TimedMessage:
        tps = self.vocab.ticks_per_second
        self.notes.append(
            Note(on.tick / tps, tick / tps, on.pitch, on.velocity, on.part, on.program)
        )
        return self._msg(tick, on.part, type="note_off", note=on.pitch, velocity=0)

    def feed(self, tok: int) -> list[TimedMessage]:
        out: list[TimedMessage] = []
        for ev in self._dec.feed(tok):
            if isinstance(ev, ProgramChange):
                out.append(self._msg(ev.tick, ev.part, type="program_change", program=ev.program))
            elif isinstance(ev, NoteOn):
                if (ended := self._open.start(ev)) is not None:
                    out.append(self._close(ended, ev.tick))
                out.append(
                    self._msg(ev.tick, ev.part, type="note_on", note=ev.pitch, velocity=ev.velocity)
                )
            elif isinstance(ev, NoteOff) and (on := self._open.end(ev)) is not None:
                out.append(self._close(on, ev.tick))
        return out

    def finish(self) -> list[TimedMessage]:
        """Note-offs, at the current time, for every note still sounding."""
        return [self._close(on, self.tick) for on in self._open.finish()]
