"""The beats and chords of a MIDI file: from annotation files beside it, or its tempo map.

Where they come from, in order:
- chords: `song.lab` beside `song.mid` (chord-lab text), else POP909's `chord_midi.txt` in the
  song's folder;
- beats: POP909's `beat_midi.txt` in the song's folder, else the file's own tempo map and time
  signatures, where it has any (a file with neither has no known beat: a default 120 bpm would
  be a guess, not a meter).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .harmony import Marks, read_beat_list, read_lab
from .notes import MidiLike, _load_bytes
from .tempo import TempoMap


def midi_beats(midi: MidiLike, until: float | None = None) -> Marks | None:
    """BAR/BEAT marks from a MIDI file's tempo map and time signatures (4/4 if it has a tempo
    but no time signature) to its last event (or `until` s); None if it has neither."""
    from symusic import Score

    tempo = TempoMap.from_midi(midi)
    if tempo is None:
        return None
    if until is None:
        score = Score.from_midi(_load_bytes(midi), sanitize_data=True)
        until = float(tempo.seconds(np.array([int(score.end())]))[0]) + 1e-6
    return tempo.beats(until)


def chord_file(path: str | Path) -> Path | None:
    """The chord-lab file that annotates a MIDI file, if there is one."""
    p = Path(path)
    for cand in (p.with_suffix(".lab"), p.parent / "chord_midi.txt"):
        if cand.exists():
            return cand
    return None


def read_annotations(path: str | Path, tempo_beats: bool = True) -> Marks:
    """Beats and chords of the MIDI file at `path` (see the module's docstring)."""
    p = Path(path)
    parts: list[Marks] = []
    lab = chord_file(p)
    if lab is not None:
        parts.append(read_lab(lab.read_text()))
    beat_file = p.parent / "beat_midi.txt"
    if beat_file.exists():
        parts.append(read_beat_list(beat_file.read_text()))
    elif tempo_beats and (beats := midi_beats(p)) is not None:
        parts.append(beats)
    return Marks.concat(parts)
