"""Beats and chords: labels, charts, beat lists, tempo maps, and their tokens."""

from __future__ import annotations

import mido
import numpy as np
import pytest

from improv.engine.tokenizer import Note, Notes, Tokenizer, TokenizerConfig
from improv.engine.tokenizer.annotations import midi_beats, read_annotations
from improv.engine.tokenizer.dataset import BuildOptions, TokenDataset, build_dataset
from improv.engine.tokenizer.harmony import (
    BAR,
    BEAT,
    CHORD,
    Marks,
    chord_label,
    chord_tones,
    parse_chart,
    parse_label,
    parse_symbol,
    read_beat_list,
    read_lab,
    steady_beats,
)

from midi_factory import TPB, midi_bytes, notes_track


@pytest.mark.parametrize(
    ("label", "want"),
    [
        ("A:min7", "A:min7"),
        ("C:maj/5", "C:maj"),  # the slash bass is dropped
        ("Bb:sus4(b7)", "Bb:7sus4"),
        ("D:min9", "D:min7"),  # rare qualities fold to the nearest
        ("E:9", "E:7"),
        ("F#:hdim7", "F#:hdim7"),
        ("G", "G:maj"),
        ("N", "N"),
    ],
)
def test_harte_labels_map_to_the_chord_vocabulary(label: str, want: str) -> None:
    assert chord_label(parse_label(label)) == want


@pytest.mark.parametrize(
    ("symbol", "want"),
    [("Am", "A:min"), ("F#m7", "F#:min7"), ("Bbmaj7", "Bb:maj7"), ("G7", "G:7"), ("C/E", "C:maj")],
)
def test_chart_symbols(symbol: str, want: str) -> None:
    assert chord_label(parse_symbol(symbol)) == want


def test_bad_chords_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not a chord"):
        parse_symbol("H7")
    with pytest.raises(ValueError, match="chord line 2"):
        read_lab("0 1 C:maj\n1.0 oops\n")
    with pytest.raises(ValueError, match="bpm must be in 20..400"):
        steady_beats(1000, 4, 0, 10)


def test_chord_tones() -> None:
    assert chord_tones(parse_label("A:min")) == {9, 0, 4}
    assert chord_tones(parse_label("N")) == frozenset()


def test_a_lab_file_keeps_only_the_changes() -> None:
    m = read_lab("0.0 1.0 C:maj\n1.0 2.0 C:maj\n2.0 3.0 A:min\n3.0 4.0 N\n")
    assert m.time.tolist() == [0.0, 2.0, 3.0]
    assert [chord_label(v) for v in m.value] == ["C:maj", "A:min", "N"]


def test_a_chart_is_laid_on_the_bars() -> None:
    beats = steady_beats(120, 4, 1.0, 9.0)  # bars at 1, 3, 5, 7 s
    m = parse_chart("| C | Am F | G7 |", beats)
    assert m.time.tolist() == [1.0, 3.0, 4.0, 5.0]  # Am F split the bar on its beats
    assert [chord_label(v) for v in m.value] == ["C:maj", "A:min", "F:maj", "G:7"]
    looped = parse_chart("C G", beats, loop_until=9.0)
    assert [chord_label(v) for v in looped.value] == ["C:maj", "G:maj", "C:maj", "G:maj"]


def test_beat_lists_read_the_downbeat_column() -> None:
    m = read_beat_list("0.5 1.0 1.0\n1.0 0.0 0.0\n1.5 1.0 0.0\n2.0 0.0 0.0\n2.5 1 1\n")
    assert m.kind.tolist() == [BAR, BEAT, BEAT, BEAT, BAR]


def test_marks_window_restates_the_sounding_chord() -> None:
    m = Marks.concat([read_lab("0 4 C:maj\n4 8 G:maj\n"), steady_beats(60, 4, 0, 8)])
    w = m.window(5.0, 7.0)
    assert w.chords.time.tolist() == [0.0] and chord_label(w.chords.value[0]) == "G:maj"
    assert (w.time[w.kind != CHORD] == [0.0, 1.0]).all()
    # cut a hair before a change (float time): the change is the chord at the start, alone
    w = m.window(4.0 - 7e-8, 7.0)
    assert [chord_label(c) for c in w.chords.value] == ["G:maj"]


def test_marks_come_before_the_notes_of_their_time() -> None:
    tok = Tokenizer(TokenizerConfig(harmony=True))
    v = tok.vocab
    notes = Notes.from_list([Note(0.5, 1.0, 60, 90, 0, 0), Note(1.0, 1.5, 62, 90, 0, 0)])
    marks = Marks.concat([steady_beats(120, 2, 0.0, 1.5), read_lab("1.0 2.0 A:min\n")])
    names = [v.name(t) for t in tok.encode_notes(notes, marks=marks, eos=False)]
    assert names == [
        "BOS",
        "TASK_CONTINUE",
        "BAR",
        "SHIFT_50",
        "BEAT",
        "PART_lead",
        "PROGRAM_0",
        "VEL_22",
        "ON_lead_60",
        "SHIFT_50",
        "BAR",  # the meter, then the chord, then the notes
        "CHORD_A:min",
        "OFF_lead_60",
        "VEL_22",
        "ON_lead_62",
        "SHIFT_50",
        "OFF_lead_62",
    ]
    # the notes decode as if the marks were not there
    assert tok.decode_notes(tok.encode_notes(notes, marks=marks)).to_list() == notes.to_list()


def test_an_older_vocabulary_ignores_marks() -> None:
    old = Tokenizer()
    notes = Notes.from_list([Note(0.5, 1.0, 60, 90, 0, 0)])
    marks = steady_beats(120, 4, 0.0, 2.0)
    assert old.encode_notes(notes, marks=marks) == old.encode_notes(notes)


def _waltz(tmp_path, tempo_us: int = 666_667) -> object:
    sig = mido.MetaMessage("time_signature", numerator=3, denominator=4, time=0)
    track = notes_track("MELODY", [(b * TPB, TPB - 20, 60 + b, 90) for b in range(12)])
    track.insert(1, sig)
    p = tmp_path / "waltz.mid"
    p.write_bytes(midi_bytes([track], tempo_events=((0, tempo_us),)))
    return p


def test_beats_from_the_tempo_map_and_time_signature(tmp_path) -> None:
    m = midi_beats(_waltz(tmp_path))  # 90 bpm, 3/4
    assert m is not None
    assert np.allclose(np.diff(m.time[:6]), 60 / 90, atol=1e-6)
    assert m.kind[:7].tolist() == [BAR, BEAT, BEAT, BAR, BEAT, BEAT, BAR]


def test_a_file_without_tempo_or_meter_has_no_beats(tmp_path) -> None:
    mf = mido.MidiFile(ticks_per_beat=TPB)
    mf.tracks.append(notes_track("MELODY", [(0, TPB, 60, 90)]))
    p = tmp_path / "bare.mid"
    mf.save(p)
    assert midi_beats(p) is None


def test_the_dataset_stores_a_songs_chords_and_beats(tmp_path) -> None:
    p = _waltz(tmp_path)
    p.with_suffix(".lab").write_text("0.0 2.0 C:maj\n2.0 6.0 G:7\n")
    tok = Tokenizer(TokenizerConfig(harmony=True))
    build_dataset([p], tmp_path / "ds", tok, BuildOptions(), workers=1, progress=False)
    ds = TokenDataset(tmp_path / "ds")
    m = ds.file_marks(0)
    assert [chord_label(v) for v in m.chords.value] == ["C:maj", "G:7"]
    assert len(m.beats) == len(read_annotations(p).beats)
    names = {tok.vocab.name(int(t)) for t in ds.file_tokens(0)}
    assert {"BAR", "BEAT", "CHORD_C:maj", "CHORD_G:7"} <= names
    build_dataset(
        [p], tmp_path / "plain", tok, BuildOptions(marks=False), workers=1, progress=False
    )
    assert len(TokenDataset(tmp_path / "plain").file_marks(0)) == 0
