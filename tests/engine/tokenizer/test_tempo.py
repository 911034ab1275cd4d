"""Tempo maps: read from a file, written back; chord markers; re-struck keys; absurd times."""

from __future__ import annotations

import io

import mido
import numpy as np
import pytest

from improv.engine.tokenizer import MidiReadError, Note, Notes, Tokenizer
from improv.engine.tokenizer.harmony import read_lab
from improv.engine.tokenizer.tempo import TempoMap

from midi_factory import TPB, midi_bytes, notes_track


def _tempo_change_song() -> bytes:
    """90 bpm for 4 beats, then 140 bpm; 3/4 from the start."""
    track = notes_track("MELODY", [(b * TPB, TPB // 2, 60 + b, 90) for b in range(10)])
    track.insert(1, mido.MetaMessage("time_signature", numerator=3, denominator=4, time=0))
    return midi_bytes([track], tempo_events=((0, 666_667), (4 * TPB, 428_571)))


def test_seconds_and_ticks_invert_each_other() -> None:
    tm = TempoMap.from_midi(_tempo_change_song())
    assert tm is not None
    ticks = np.array([0, 100, 4 * TPB, 4 * TPB + 7, 9 * TPB])
    assert (tm.ticks(tm.seconds(ticks)) == ticks).all()
    assert tm.bpm_at(0.5) == pytest.approx(90, abs=0.01)
    assert tm.bpm_at(3.0) == pytest.approx(140, abs=0.01)


def test_output_midi_keeps_the_input_tempo_map_and_meter() -> None:
    tok = Tokenizer()
    src = _tempo_change_song()
    tm = TempoMap.from_midi(src)
    notes = tok.read_notes(src)
    mf = tok.notes_to_midi(notes, tempo=tm)
    out = TempoMap.from_midi(_bytes(mf))
    assert out is not None and out.tpq == tm.tpq
    assert out.tempo_ticks.tolist() == tm.tempo_ticks.tolist()
    assert out.tempo_mspq.tolist() == tm.tempo_mspq.tolist()
    assert (out.sig_num.tolist(), out.sig_den.tolist()) == ([3], [4])
    back = tok.read_notes(_bytes(mf))
    assert np.abs(back.start - notes.start).max() < 1e-3  # the notes land where they were


def test_steady_tempo_from_scratch_and_chord_markers() -> None:
    tok = Tokenizer()
    notes = Notes.from_list([Note(0.0, 0.5, 60, 90, 0, 0)])
    chords = read_lab("0 1 A:min\n1 2 F:maj\n")
    mf = tok.notes_to_midi(notes, tempo=TempoMap.steady(90, 3), chords=chords)
    metas = [m for m in mf.tracks[0] if m.is_meta]
    assert [m.text for m in metas if m.type == "marker"] == ["A:min", "F:maj"]
    tempo = [m.tempo for m in metas if m.type == "set_tempo"]
    assert tempo == [666_667]
    with pytest.raises(ValueError, match="bpm must be in 20..400"):
        TempoMap.steady(5)


def test_a_re_struck_key_ends_the_note_that_still_sounds() -> None:
    tok = Tokenizer()
    notes = Notes.from_list([Note(0.0, 2.0, 60, 90, 2, 0), Note(1.0, 1.5, 60, 90, 2, 0)])
    mf = tok.notes_to_midi(notes)
    sounding, worst = 0, 0
    for msg in mido.merge_tracks(mf.tracks):
        if msg.type == "note_on" and msg.velocity:
            sounding += 1
        elif msg.type in ("note_off", "note_on"):
            sounding -= 1
        worst = max(worst, sounding)
    assert worst == 1  # never two of one key on one channel


def test_absurd_delta_times_are_refused() -> None:
    tr = mido.MidiTrack()
    for _ in range(8):
        tr.append(mido.Message("note_on", note=60, velocity=90, time=0x0FFFFFFF))
        tr.append(mido.Message("note_off", note=60, velocity=0, time=10))
    mf = mido.MidiFile(ticks_per_beat=480)
    mf.tracks.append(tr)
    with pytest.raises(MidiReadError, match="note times must be within 0..4 h"):
        Tokenizer().read_notes(_bytes(mf))


def _bytes(mf: mido.MidiFile) -> bytes:
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()
