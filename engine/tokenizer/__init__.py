"""The MIDI tokenizer shared by the engine, the trainer and the live server.

    tok = Tokenizer()
    ids = tok.encode("song.mid")            # [BOS, TASK_CONTINUE, events..., EOS]
    midi = tok.decode(ids)                  # mido.MidiFile
    enc = tok.stream_encoder()              # live: enc.feed(msg, time) -> tokens
    dec = tok.stream_decoder()              # live: dec.feed(token) -> timed messages

Vocabulary, grammar and task layouts: docs/tokens.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import mido

from .encode import encode_events, quantize
from .harmony import Marks
from .notes import (
    MidiLike,
    MidiReadError,
    Note,
    Notes,
    TrackInfo,
    notes_to_midi,
    read_notes,
)
from .stream import StreamDecoder, StreamEncoder, TimedMessage
from .tempo import TempoMap
from .vocab import TokenizerConfig, TokenType, Vocab

__all__ = [
    "Marks",
    "MidiReadError",
    "Note",
    "Notes",
    "StreamDecoder",
    "TempoMap",
    "StreamEncoder",
    "TimedMessage",
    "TokenType",
    "Tokenizer",
    "TokenizerConfig",
    "TrackInfo",
    "Vocab",
]

TASKS = {
    "continue": Vocab.TASK_CONTINUE,
    "accompany": Vocab.TASK_ACCOMPANY,
    "infill": Vocab.TASK_INFILL,
}


class Tokenizer:
    def __init__(self, config: TokenizerConfig | None = None) -> None:
        self.config = config or TokenizerConfig()
        self.vocab = Vocab(self.config)

    # --- persistence -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def parts(self) -> tuple[str, ...]:
        return self.config.parts

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.config.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(TokenizerConfig.from_dict(json.loads(Path(path).read_text())))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, parts={list(self.parts)})"

    # --- files -----------------------------------------------------------------------------------
    def read_notes(
        self,
        midi: MidiLike,
        parts: str | Mapping[str | int, str] | None = None,
        rules: Sequence[tuple[str, str]] = (),
        max_notes: int | None = None,
        max_seconds: float | None = None,
    ) -> Notes:
        """Notes of a MIDI file (path, bytes or mido.MidiFile) with their parts.

        `parts`: one part for every pitched track (e.g. "lead"), or {track index or name: part};
        default: the rules in `notes.assign_parts`. Raises MidiReadError if the file is unreadable
        (or beyond `max_notes` / `max_seconds`).
        """
        notes, _, _ = read_notes(midi, self.config, parts, rules, max_notes, max_seconds)
        return notes

    def encode(
        self,
        midi: MidiLike,
        task: str = "continue",
        bos: bool = True,
        eos: bool = True,
        parts: str | Mapping[str | int, str] | None = None,
    ) -> list[int]:
        """Token ids of a MIDI file: `BOS TASK events EOS` (a prompt: `eos=False`)."""
        return self.encode_notes(self.read_notes(midi, parts), task=task, bos=bos, eos=eos)

    def encode_notes(
        self,
        notes: Notes | Iterable[Note],
        task: str | None = "continue",
        bos: bool = True,
        eos: bool = True,
        start_tick: int = 0,
        marks: Marks | None = None,
    ) -> list[int]:
        """`BOS TASK events EOS` of notes (and of beats and chords, `marks`, where the
        vocabulary has harmony tokens)."""
        if not isinstance(notes, Notes):
            notes = Notes.from_list(notes)
        self._check_notes(notes)
        head: list[int] = []
        if bos:
            head.append(self.vocab.BOS)
        if task is not None:
            if task not in TASKS:
                raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
            head.append(TASKS[task])
        ids = head + encode_events(notes, self.vocab, start_tick, marks)
        if eos:
            ids.append(self.vocab.EOS)
        return ids

    def _check_notes(self, notes: Notes) -> None:
        if len(notes) == 0:
            return
        if notes.pitch.min() < 0 or notes.pitch.max() > 127:
            raise ValueError("note pitch must be in 0..127")
        if notes.part.min() < 0 or notes.part.max() >= len(self.parts):
            raise ValueError(f"note part must be in 0..{len(self.parts) - 1}")
        if notes.program.min() < 0 or notes.program.max() > 127:
            raise ValueError("note program must be in 0..127")

    def decode_notes(self, ids: Iterable[int], start_tick: int = 0) -> Notes:
        """Notes of a token sequence (unterminated notes end at the last time)."""
        dec = StreamDecoder(self.vocab, start_tick)
        for tok in ids:
            dec.feed(int(tok))
        dec.finish()
        return Notes.from_list(dec.notes)

    def decode(self, ids: Iterable[int]) -> mido.MidiFile:
        """Token ids -> a type-1 MIDI file, one track per part."""
        return self.notes_to_midi(self.decode_notes(ids))

    def notes_to_midi(
        self,
        notes: Notes | Iterable[Note],
        tempo: TempoMap | None = None,
        chords: Marks | None = None,
    ) -> mido.MidiFile:
        """Notes -> type-1 MIDI (with `tempo`: that tempo map and meter; `chords`: markers)."""
        if not isinstance(notes, Notes):
            notes = Notes.from_list(notes)
        return notes_to_midi(notes, self.config, self.config.tick_ms / 1000, tempo, chords)

    # --- live ------------------------------------------------------------------------------------
    def stream_encoder(
        self,
        part: str = "lead",
        channel_parts: Mapping[int, str] | None = None,
        program: int = 0,
        start_tick: int = 0,
    ) -> StreamEncoder:
        """Live messages -> tokens; see `StreamEncoder.feed`."""
        return StreamEncoder(self.vocab, part, channel_parts, program, start_tick)

    def stream_decoder(self, start_tick: int = 0) -> StreamDecoder:
        """Tokens -> timed MIDI messages; see `StreamDecoder.feed`."""
        return StreamDecoder(self.vocab, start_tick)

    # --- time ------------------------------------------------------------------------------------
    def seconds_to_ticks(self, seconds: float) -> int:
        return int(quantize(seconds, self.vocab.ticks_per_second))

    def ticks_to_seconds(self, ticks: int) -> float:
        return ticks / self.vocab.ticks_per_second
