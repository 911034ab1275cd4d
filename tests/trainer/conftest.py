"""Small datasets built in code: a few MIDI files with lead, harmony, bass and drums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from improv.engine.tokenizer import Note, Tokenizer
from improv.engine.tokenizer.dataset import build_dataset


def song(seed: int, seconds: float = 12.0) -> list[Note]:
    """A simple repetitive song: a lead line over chords, a bass and a drum beat."""
    rng = np.random.default_rng(seed)
    root = 48 + int(rng.integers(0, 12))
    beat = 0.5
    notes: list[Note] = []
    scale = [0, 2, 4, 5, 7, 9, 11, 12]
    for b in range(int(seconds / beat)):
        t = b * beat
        notes.append(Note(t, t + 0.4, root + 12 + scale[b % 8], 90, 0, 73))  # lead, flute
        if b % 4 == 0:
            for k in (0, 4, 7):
                notes.append(Note(t, t + 1.9, root + k, 60, 2, 0))  # harmony, piano
            notes.append(Note(t, t + 1.0, root - 12, 80, 3, 33))  # bass
        notes.append(Note(t, t + 0.1, 36 if b % 2 == 0 else 38, 100, 4, 0))  # drums
    return notes


def write_midi(folder: Path, n: int, seed: int = 0) -> list[Path]:
    tok = Tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"song{i}.mid"
        tok.notes_to_midi(song(seed + i)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(name="song")
def song_fixture():
    """song(seed, seconds=12.0) -> list[Note]."""
    return song


@pytest.fixture(scope="session")
def midi_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("midi")
    write_midi(folder, 4)
    return folder


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory, midi_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("ds") / "train"
    build_dataset(sorted(midi_folder.glob("*.mid")), out, Tokenizer(), workers=1, progress=False)
    return out
