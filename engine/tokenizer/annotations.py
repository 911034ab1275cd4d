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

from .harmony import BAR, BEAT, Marks, beats_from_tempo_map, read_beat_list, read_lab
from .notes import MidiLike, MidiReadError, _load_bytes, ticks_to_seconds


def midi_beats(midi: MidiLike, until: float | None = None) -> Marks | None:
    """BAR/BEAT marks from a MIDI file's tempo map and time signatures (4/4 if it has a tempo
    but no time signature); None if it has neither, or cannot be read. Beats run to the file's
    last event (or `until` seconds)."""
    from symusic import Score

    try:
        data = _load_bytes(midi)
        score = Score.from_midi(data, sanitize_data=True)
    except (MidiReadError, Exception):  # unreadable files have no beats; the notes say why
        return None
    # symusic reports a default 120 bpm for a file without tempo events: look for the meta
    # events themselves (set_tempo FF 51 03, time_signature FF 58 04)
    if b"\xff\x51\x03" not in data and b"\xff\x58\x04" not in data:
        return None
    tempos = score.tempos.numpy()
    sigs = score.time_signatures.numpy()
    tpq = int(score.ticks_per_quarter)
    if tpq <= 0:
        return None
    t_ticks = tempos["time"].astype(np.int64)
    t_mspq = np.where(tempos["mspq"] > 0, tempos["mspq"], 500_000).astype(np.int64)
    order = np.argsort(t_ticks, kind="stable")
    t_ticks, t_mspq = t_ticks[order], t_mspq[order]
    s_order = np.argsort(sigs["time"], kind="stable")
    end_tick = int(score.end())
    if until is not None:
        sec_per_tick_min = float(t_mspq.min() if len(t_mspq) else 500_000) * 1e-6 / tpq
        end_tick = max(end_tick, int(until / max(sec_per_tick_min, 1e-9)))
    rows = beats_from_tempo_map(
        tpq,
        sigs["time"][s_order].astype(np.int64),
        sigs["numerator"][s_order].astype(np.int64),
        sigs["denominator"][s_order].astype(np.int64),
        end_tick,
    )
    if len(rows) == 0:
        return None
    seconds = ticks_to_seconds(rows[:, 0], t_ticks, t_mspq, tpq)
    if until is not None:
        keep = seconds < until
        seconds, rows = seconds[keep], rows[keep]
    kinds = np.where(rows[:, 1] > 0, BAR, BEAT)
    return Marks.build(seconds, kinds, np.zeros(len(seconds)))


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
