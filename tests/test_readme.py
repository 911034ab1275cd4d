"""The README's in-process Python examples run as written (in a folder holding the files they
name: the default model, a MIDI file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from midi_factory import simple_song

ROOT = Path(__file__).resolve().parent.parent


def in_process_examples() -> list[str]:
    """The README's ```python blocks that use the engine in-process (not the HTTP client)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if "from improv.engine" in b]


def test_readme_shows_in_process_examples():
    assert len(in_process_examples()) >= 2


@pytest.mark.parametrize("i", range(len(in_process_examples())))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    code = in_process_examples()[i]
    (tmp_path / "models").symlink_to(ROOT / "models")
    for name in ("melody.mid", "song.mid"):
        (tmp_path / name).write_bytes(simple_song(seconds=4.0, seed=i))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md example {i}", "exec"), {})
    if "continued.mid" in code:
        assert (tmp_path / "continued.mid").stat().st_size > 0
