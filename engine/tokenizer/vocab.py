"""The token vocabulary: one config dataclass and the id layout derived from it.

Layout (default config, ids in order):

    PAD BOS EOS                              specials
    TASK_CONTINUE TASK_ACCOMPANY TASK_INFILL  task markers (second token of every sequence)
    FILL_SUFFIX FILL_MIDDLE FILL_END          fill-in-the-middle markers
    SHIFT_1 .. SHIFT_100                      advance time by k ticks (1 tick = 10 ms)
    LONG_1 .. LONG_32                         advance time by k whole seconds (long gaps)
    PART_lead .. PART_drums                   next token sets that part's GM program
    PROGRAM_0 .. PROGRAM_127                  GM program of the part named just before
    VEL_0 .. VEL_31                           velocity bin of the note-on that follows
    ON(part, pitch)                           note-on, one per part x 128 pitches
    OFF(part, pitch)                          note-off, one per part x 128 pitches
    BAR BEAT                                  a downbeat / a beat falls at this time  (harmony)
    CHORD_N CHORD(root, quality)              from now the harmony is this            (harmony)
    HEADER HEADER_END                         the instrumentation header's bounds     (harmony)

The last three groups exist when `TokenizerConfig.harmony` is on (older checkpoints' configs lack
the key and keep their vocabulary). See docs/tokens.md for the grammar and the task layouts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from functools import cached_property

import numpy as np

from .harmony import BAR, BEAT, N_CHORDS, chord_label

# Non-GM drum notes seen in real kits (Roland TD-11 in Groove MIDI) folded to the GM drum class
# that sounds like them, so the model learns one token per drum sound.
DEFAULT_DRUM_MAP: dict[int, int] = {
    22: 42,  # hi-hat closed (edge)
    26: 46,  # hi-hat open (edge)
    58: 43,  # tom 3 rim -> high floor tom
    55: 49,  # splash -> crash 1
    52: 57,  # china -> crash 2
}


class TokenType(IntEnum):
    """Coarse token classes, for grammar masks and per-type loss reports."""

    SPECIAL = 0
    TIME = 1
    PART = 2
    PROGRAM = 3
    VELOCITY = 4
    NOTE_ON = 5
    NOTE_OFF = 6
    METER = 7  # BAR, BEAT
    CHORD = 8  # CHORD_N, CHORD(root, quality)
    HEADER = 9  # HEADER, HEADER_END


@dataclass(frozen=True)
class TokenizerConfig:
    tick_ms: int = (
        10  # time resolution; onsets are quantized on absolute time, so error never accumulates
    )
    max_shift_ticks: int = 100  # SHIFT_1..SHIFT_N: gaps up to 1 s in one token
    max_long_seconds: int = 32  # LONG_1..LONG_N whole seconds: a 30 s gap is 2 tokens
    velocity_bins: int = 32  # dynamics: 32 bins of 4 velocity steps
    parts: tuple[str, ...] = ("lead", "counter", "harmony", "bass", "drums")  # roles, not sounds
    drum_note_ms: int = 100  # drum note-offs are not tokens; decoded drum hits last this long
    # A key released under the sustain pedal rings until the pedal lifts, at most this long: a
    # piano's tail, and a bound on broken CC64 data (some POP909 tracks never lift the pedal).
    max_sustain_ms: int = 1500
    drum_map: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_DRUM_MAP))
    # BAR/BEAT, CHORD and the instrumentation header (docs/tokens.md). A config written before
    # they existed has no such key and loads with False: its checkpoints keep their vocabulary.
    # Off by default until every generation path speaks it; the trainer turns it on.
    harmony: bool = False

    def __post_init__(self) -> None:
        if self.tick_ms < 1 or self.tick_ms > 10:
            raise ValueError(f"tick_ms must be in 1..10, got {self.tick_ms}")
        if not 16 <= self.velocity_bins <= 128:
            raise ValueError(f"velocity_bins must be in 16..128, got {self.velocity_bins}")
        if self.max_sustain_ms < 0:
            raise ValueError(f"max_sustain_ms must be >= 0, got {self.max_sustain_ms}")
        if self.max_shift_ticks < 1 or self.max_long_seconds < 1:
            raise ValueError("max_shift_ticks and max_long_seconds must be >= 1")
        if "lead" not in self.parts or "drums" not in self.parts or len(self.parts) < 3:
            raise ValueError(
                f"parts must include 'lead', 'drums' and an accompaniment part: {self.parts}"
            )
        if len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts must be unique: {self.parts}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts"] = list(self.parts)
        d["drum_map"] = {str(k): v for k, v in self.drum_map.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        d = dict(d)
        d["parts"] = tuple(d.get("parts", cls.parts))
        d.setdefault("harmony", False)
        if "drum_map" in d:
            d["drum_map"] = {int(k): int(v) for k, v in d["drum_map"].items()}
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown tokenizer config keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class Vocab:
    """Token ids derived from a TokenizerConfig. All id arithmetic lives here."""

    PAD = 0
    BOS = 1
    EOS = 2
    TASK_CONTINUE = 3
    TASK_ACCOMPANY = 4
    TASK_INFILL = 5
    FILL_SUFFIX = 6
    FILL_MIDDLE = 7
    FILL_END = 8
    N_SPECIAL = 9
    SPECIAL_NAMES = (
        "PAD",
        "BOS",
        "EOS",
        "TASK_CONTINUE",
        "TASK_ACCOMPANY",
        "TASK_INFILL",
        "FILL_SUFFIX",
        "FILL_MIDDLE",
        "FILL_END",
    )

    def __init__(self, config: TokenizerConfig) -> None:
        self.config = config
        self.n_parts = len(config.parts)
        self.part_index = {p: i for i, p in enumerate(config.parts)}
        self.lead = self.part_index["lead"]
        self.drums = self.part_index["drums"]
        self.shift_base = self.N_SPECIAL  # SHIFT_k = shift_base + k - 1
        self.long_base = self.shift_base + config.max_shift_ticks  # LONG_s = long_base + s - 1
        self.part_base = self.long_base + config.max_long_seconds
        self.program_base = self.part_base + self.n_parts
        self.vel_base = self.program_base + 128
        self.on_base = self.vel_base + config.velocity_bins
        self.off_base = self.on_base + 128 * self.n_parts
        self.notes_end = self.off_base + 128 * self.n_parts
        self.harmony = config.harmony
        # BAR BEAT, CHORD_N CHORD(root, quality)..., HEADER HEADER_END (appended, so a model
        # without them keeps every id it knows)
        self.BAR = self.notes_end
        self.BEAT = self.BAR + 1
        self.chord_base = self.BEAT + 1  # CHORD(index) = chord_base + index; index 0 is N
        self.HEADER = self.chord_base + N_CHORDS
        self.HEADER_END = self.HEADER + 1
        self.size = self.HEADER_END + 1 if config.harmony else self.notes_end

    @cached_property
    def ticks_table(self) -> np.ndarray:
        """(V,) int64: the ticks each token advances (`shift_ticks`; 0 for non-time tokens)."""
        return np.array([self.shift_ticks(t) for t in range(self.size)], dtype=np.int64)

    # --- constructors -------------------------------------------------------------------------
    def shift(self, ticks: int) -> int:
        return self.shift_base + ticks - 1

    def long(self, seconds: int) -> int:
        return self.long_base + seconds - 1

    def part(self, part: int) -> int:
        return self.part_base + part

    def program(self, program: int) -> int:
        return self.program_base + program

    def velocity(self, bin_: int) -> int:
        return self.vel_base + bin_

    def note_on(self, part: int, pitch: int) -> int:
        return self.on_base + part * 128 + pitch

    def note_off(self, part: int, pitch: int) -> int:
        return self.off_base + part * 128 + pitch

    def chord(self, index: int) -> int:
        """CHORD token of a chord index (harmony.chord_index; 0 is N)."""
        return self.chord_base + index

    def mark(self, kind: int, value: int) -> int:
        """The token of a mark (harmony.BAR/BEAT/CHORD)."""
        if kind == BAR:
            return self.BAR
        if kind == BEAT:
            return self.BEAT
        return self.chord(value)

    def header(self, parts: Sequence[tuple[int, int | None]]) -> list[int]:
        """`HEADER PART_p [PROGRAM_x] ... HEADER_END`: the parts (and programs) to play."""
        if not self.harmony:
            return []
        out = [self.HEADER]
        for part, program in parts:
            out.append(self.part(part))
            if program is not None:
                out.append(self.program(program))
        out.append(self.HEADER_END)
        return out

    # --- velocity bins ------------------------------------------------------------------------
    def velocity_bin(self, velocity: int) -> int:
        """MIDI velocity 1..127 -> bin 0..velocity_bins-1."""
        v = min(max(int(velocity), 1), 127)
        return (v - 1) * self.config.velocity_bins // 127

    def bin_velocity(self, bin_: int) -> int:
        """Bin -> the velocity at the bin's centre."""
        n = self.config.velocity_bins
        lo = -(-bin_ * 127 // n) + 1  # smallest velocity in the bin
        hi = -(-(bin_ + 1) * 127 // n)  # largest
        return (lo + hi) // 2

    # --- classification -----------------------------------------------------------------------
    def type_of(self, tok: int) -> TokenType:
        if tok < self.shift_base:
            return TokenType.SPECIAL
        if tok < self.part_base:
            return TokenType.TIME
        if tok < self.program_base:
            return TokenType.PART
        if tok < self.vel_base:
            return TokenType.PROGRAM
        if tok < self.on_base:
            return TokenType.VELOCITY
        if tok < self.off_base:
            return TokenType.NOTE_ON
        if tok < self.notes_end:
            return TokenType.NOTE_OFF
        if tok >= self.size:
            pass
        elif tok < self.chord_base:
            return TokenType.METER
        elif tok < self.HEADER:
            return TokenType.CHORD
        else:
            return TokenType.HEADER
        raise ValueError(f"token id must be in 0..{self.size - 1}, got {tok}")

    def shift_ticks(self, tok: int) -> int:
        """Ticks a time token advances (0 for any other token)."""
        if self.shift_base <= tok < self.long_base:
            return tok - self.shift_base + 1
        if self.long_base <= tok < self.part_base:
            return (tok - self.long_base + 1) * self.ticks_per_second
        return 0

    @property
    def ticks_per_second(self) -> int:
        return 1000 // self.config.tick_ms

    def note_of(self, tok: int) -> tuple[int, int]:
        """(part, pitch) of a NOTE_ON or NOTE_OFF token."""
        base = self.on_base if tok < self.off_base else self.off_base
        return divmod(tok - base, 128)

    def time_tokens(self, ticks: int) -> list[int]:
        """Shortest canonical time tokens for a gap: whole seconds as LONG, the rest as SHIFT."""
        out: list[int] = []
        if ticks <= 0:
            return out
        if ticks <= self.config.max_shift_ticks:
            return [self.shift(ticks)]
        seconds, rest = divmod(ticks, self.ticks_per_second)
        while seconds > 0:
            s = min(seconds, self.config.max_long_seconds)
            out.append(self.long(s))
            seconds -= s
        if rest:
            out.append(self.shift(rest))
        return out

    def name(self, tok: int) -> str:
        t = self.type_of(tok)
        if t is TokenType.METER:
            return "BAR" if tok == self.BAR else "BEAT"
        if t is TokenType.CHORD:
            return "CHORD_" + chord_label(tok - self.chord_base)
        if t is TokenType.HEADER:
            return "HEADER" if tok == self.HEADER else "HEADER_END"
        if t is TokenType.SPECIAL:
            return self.SPECIAL_NAMES[tok]
        if t is TokenType.TIME:
            if tok < self.long_base:
                return f"SHIFT_{self.shift_ticks(tok)}"
            return f"LONG_{tok - self.long_base + 1}s"
        if t is TokenType.PART:
            return f"PART_{self.config.parts[tok - self.part_base]}"
        if t is TokenType.PROGRAM:
            return f"PROGRAM_{tok - self.program_base}"
        if t is TokenType.VELOCITY:
            return f"VEL_{tok - self.vel_base}"
        part, pitch = self.note_of(tok)
        kind = "ON" if t is TokenType.NOTE_ON else "OFF"
        return f"{kind}_{self.config.parts[part]}_{pitch}"
