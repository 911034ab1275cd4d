"""POP909 chord annotations -> the trainer's root bass (trainer/chords.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

from improv.engine.tokenizer import Note, Tokenizer
from improv.engine.tokenizer.dataset import BuildOptions, TokenDataset, build_dataset
from improv.engine.tokenizer.vocab import TokenType
from improv.trainer.chords import (
    BASS_LOW,
    add_chord_bass,
    chord_bass,
    parse_chord,
    read_chords,
    read_strong_beats,
)

BASS = Tokenizer().vocab.part_index["bass"]


@pytest.mark.parametrize(
    ("label", "root", "bass", "tones"),
    [
        ("C:maj", 0, 0, (0, 4, 7)),
        ("A:min7", 9, 9, (0, 4, 7, 9)),
        ("Bb:maj/3", 10, 2, (2, 5, 10)),  # first inversion: D in the bass
        ("F#:min/b3", 6, 9, (1, 6, 9)),
        ("G:sus4(b7)", 7, 7, (0, 2, 5, 7)),
        ("E:hdim7", 4, 4, (2, 4, 7, 10)),
    ],
)
def test_parse_chord(label: str, root: int, bass: int, tones: tuple[int, ...]) -> None:
    c = parse_chord(label, 1.0, 2.0)
    assert c is not None
    assert (c.start, c.end, c.root, c.bass, c.tones) == (1.0, 2.0, root, bass, tones)


def test_parse_chord_none_and_garbage() -> None:
    assert parse_chord("N") is None
    with pytest.raises(ValueError, match="not a chord label"):
        parse_chord("H:maj")


def write_annotations(folder: Path) -> None:
    # 4/4 at 120 bpm: a beat every 0.5 s, strong beats (1 and 3) every 1 s
    (folder / "chord_midi.txt").write_text(
        "0.0\t1.0\tN\n1.0\t3.0\tC:maj\n3.0\t4.0\tA:min/b3\n4.0\t6.0\tG:7\n"
    )
    (folder / "beat_midi.txt").write_text(
        "".join(f"{0.5 * i} {float(i % 2 == 0)} {float(i % 4 == 0)}\n" for i in range(14))
    )


def test_chord_bass_strikes_each_strong_beat_in_range(tmp_path: Path) -> None:
    write_annotations(tmp_path)
    chords = read_chords(tmp_path / "chord_midi.txt")
    beats = read_strong_beats(tmp_path / "beat_midi.txt")
    np.testing.assert_allclose(beats, np.arange(7.0))
    bass = chord_bass(chords, beats, BASS)
    # C from 1 s (struck at 1 and 2), A minor over C from 3, G7 from 4 (struck at 4 and 5)
    np.testing.assert_allclose(bass.start, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert (bass.pitch % 12).tolist() == [0, 0, 0, 7, 7]
    assert ((bass.pitch >= BASS_LOW) & (bass.pitch < BASS_LOW + 12)).all()
    # held to the next strike, with a gap so a repeated note is struck again
    np.testing.assert_allclose(bass.end, [1.97, 2.97, 3.97, 4.97, 5.97])
    assert (bass.part == BASS).all()


def test_add_chord_bass_only_beside_annotations_and_without_a_bass(tmp_path: Path) -> None:
    tok = Tokenizer()
    lead = [Note(1.0, 1.5, 72, 90, tok.vocab.lead, 0)]
    bare = tmp_path / "bare"
    bare.mkdir()
    path = bare / "a.mid"
    tok.notes_to_midi(lead).save(path)
    notes = tok.read_notes(path)
    assert len(add_chord_bass(str(path), notes, BASS)) == 1  # no annotations: unchanged
    song = tmp_path / "song"
    song.mkdir()
    write_annotations(song)
    path = song / "a.mid"
    tok.notes_to_midi(lead).save(path)
    with_bass = add_chord_bass(str(path), tok.read_notes(path), BASS)
    assert (with_bass.part == BASS).sum() == 5
    has_bass = tok.read_notes(path)
    one = with_bass.select(with_bass.part == BASS)
    has_bass = type(has_bass).concat([has_bass, one.select(one.start == one.start.min())])
    assert len(add_chord_bass(str(path), has_bass, BASS)) == len(has_bass)  # a bass already


def test_build_dataset_annotates(tmp_path: Path) -> None:
    tok = Tokenizer()
    song = tmp_path / "001"
    song.mkdir()
    write_annotations(song)
    notes = [Note(1.0 + 0.5 * i, 1.4 + 0.5 * i, 72 + i, 90, tok.vocab.lead, 0) for i in range(10)]
    tok.notes_to_midi(notes).save(song / "001.mid")
    opts = BuildOptions(annotate=partial(add_chord_bass, bass_part=BASS))
    build_dataset([song / "001.mid"], tmp_path / "ds", tok, opts, workers=1, progress=False)
    ds = TokenDataset(tmp_path / "ds")
    got = ds.file_notes(0)
    assert (got.part == BASS).sum() == 5 and (got.part == tok.vocab.lead).sum() == 10
    v = tok.vocab
    ids = ds.file_tokens(0).tolist()
    ons = [v.note_of(t) for t in ids if v.type_of(t) is TokenType.NOTE_ON]
    assert sum(part == BASS for part, _ in ons) == 5
