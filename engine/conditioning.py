"""Chords and beats for a generation call: parsed from what a user gives, laid on the file's time.

    cond = Conditioning.parse(midi_bytes, chords="C Am F G", bpm=96, until=40.0)

- `chords`: chord-lab text (lines `start end label`, seconds, Harte labels: POP909's and MIREX's
  format), or a chart read on the beats: `C Am F G` (a chord a bar) or `| C | Am F | G7 |` (a
  bar's chords split it). Given chords are forced at their times; without them a harmony model
  writes its own harmonic plan (CHORD tokens), returned as the output's chords.
- `beats`: lines `seconds [1 if downbeat]`; or `bpm` (with `beats_per_bar`), beat 0 at the
  file's time 0 (where a DAW export starts); default: the input file's own tempo map and time
  signatures, where it has any. Explicit beats override the file's (a file saved at a default
  120 bpm may not be in time with it).
- The output's tempo map: the input file's, else a steady one at the bpm asked for (or at the
  given beats' median tempo), else none (120 bpm, as before).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tokenizer.harmony import (
    BAR,
    CHORD,
    Marks,
    parse_chart,
    read_beat_list,
    read_lab,
    steady_beats,
)
from .tokenizer.notes import MidiLike
from .tokenizer.tempo import TempoMap

MAX_MARKS = 20_000  # beats and chords in one request (a 600 s piece at 300 bpm is 3,000 beats)


class ConditioningError(ValueError):
    """Chords or beats that cannot be read; the message says what is wrong (a 4xx)."""


def _is_lab(text: str) -> bool:
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            float(parts[0])
            return True
        except ValueError:
            return False
    return False


@dataclass(frozen=True)
class Conditioning:
    beats: Marks | None = None  # BAR/BEAT marks in file time (s), None: no known beat
    chords: Marks | None = None  # CHORD marks in file time (s), None: the model plans its own
    tempo: TempoMap | None = None  # the output file's tempo map and meter
    # harmony and bass start only on chord tones (constraints.ChordTones). None: where chords
    # are given, and in accompaniment (the model's own plan then binds its comping too)
    chord_tones: bool | None = None

    def wants_chord_tones(self, accompany: bool) -> bool:
        if self.chord_tones is not None:
            return self.chord_tones
        return accompany or self.chords is not None

    @property
    def marks(self) -> Marks:
        return Marks.concat([m for m in (self.beats, self.chords) if m is not None])

    @classmethod
    def parse(
        cls,
        midi: MidiLike | None = None,
        chords: str | None = None,
        beats: str | None = None,
        bpm: float | None = None,
        beats_per_bar: int | None = None,
        until: float = 600.0,
        file_beats: bool = True,
        chord_tones: bool | None = None,
    ) -> Conditioning:
        """The chords, beats and tempo map of a request (see the module docstring). `until`:
        how far the beats run (the end of the output). Raises ConditioningError."""
        if beats_per_bar is not None and not 1 <= beats_per_bar <= 16:
            raise ConditioningError(f"beats_per_bar must be in 1..16, got {beats_per_bar}")
        if bpm is not None and not 20 <= bpm <= 400:
            raise ConditioningError(f"bpm must be in 20..400, got {bpm}")
        file_tempo = TempoMap.from_midi(midi) if midi is not None else None
        tempo: TempoMap | None = file_tempo
        beat_marks: Marks | None = None
        try:
            if beats is not None and beats.strip():
                beat_marks = read_beat_list(beats)
                if beats_per_bar is not None:  # the count: a downbeat every beats_per_bar
                    kinds = np.where(np.arange(len(beat_marks)) % beats_per_bar == 0, BAR, 1)
                    beat_marks = Marks(beat_marks.time, kinds.astype(np.int8), beat_marks.value)
                if tempo is None and len(beat_marks) >= 2:
                    step = float(np.median(np.diff(beat_marks.time)))
                    tempo = TempoMap.steady(
                        min(max(60.0 / max(step, 1e-3), 20), 400), beats_per_bar or 4
                    )
            elif bpm is not None:
                beat_marks = steady_beats(bpm, beats_per_bar or 4, 0.0, until)
                tempo = TempoMap.steady(bpm, beats_per_bar or 4)
            elif file_tempo is not None and file_beats:
                beat_marks = file_tempo.beats(until)
            chord_marks = None
            if chords is not None and chords.strip():
                if _is_lab(chords):
                    chord_marks = read_lab(chords)
                else:
                    if beat_marks is None or not (beat_marks.kind == BAR).any():
                        raise ConditioningError(
                            "a chord chart (e.g. 'C Am F G') is laid on the bars: give bpm or "
                            "beats, or a file with a tempo map (or give chords as lab lines "
                            "'start end label')"
                        )
                    chord_marks = parse_chart(chords, beat_marks, loop_until=until)
                chord_marks = chord_marks.select(chord_marks.kind == CHORD)
        except ValueError as e:
            raise ConditioningError(str(e)) from None
        for name, m in (("beats", beat_marks), ("chords", chord_marks)):
            if m is not None and len(m) > MAX_MARKS:
                raise ConditioningError(f"at most {MAX_MARKS} {name} in one request, got {len(m)}")
        return cls(beat_marks, chord_marks, tempo, chord_tones)
