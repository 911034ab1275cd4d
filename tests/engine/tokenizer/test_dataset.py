import json

import numpy as np

from improv.cli import main
from improv.engine.tokenizer import Tokenizer
from improv.engine.tokenizer.dataset import TokenDataset

from midi_factory import midi_bytes, notes_track, simple_song


def make_folder(root):
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.mid").write_bytes(simple_song(6, seed=1))
    (root / "a" / "two.MID").write_bytes(simple_song(6, seed=2))
    (root / "three.mid").write_bytes(simple_song(6, seed=3))
    (root / "broken.mid").write_bytes(b"MThd garbage")
    (root / "tiny.mid").write_bytes(midi_bytes([notes_track("melody", [(0, 100, 60, 90)])]))
    (root / "notes.txt").write_text("not midi, not matched by the glob")


def test_tokenize_cli_builds_a_dataset_and_skips_bad_files(tmp_path, caplog):
    make_folder(tmp_path / "in")
    out = tmp_path / "ds"
    assert (
        main(
            ["tokenize", str(tmp_path / "in"), "-o", str(out), "--min-notes", "4", "--workers", "2"]
        )
        == 0
    )
    meta = json.loads((out / "index.json").read_text())
    assert meta["summary"]["files"] == 3 and meta["summary"]["skipped"] == 2
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in meta["skipped"]}
    assert "not a readable MIDI file" in reasons["broken.mid"]
    assert "minimum 4" in reasons["tiny.mid"]
    assert "skipped" in caplog.text

    ds = TokenDataset(out)
    tok = Tokenizer()
    assert len(ds) == 3 and ds.tokenizer.config == tok.config
    for i, f in enumerate(ds.files):
        assert ds.file_tokens(i).tolist() == tok.encode(f["path"])
        notes = ds.file_notes(i)
        assert len(notes) == f["note_count"]
        assert np.allclose(notes.start, tok.read_notes(f["path"]).start)
    assert ds.summary["tokens"] == len(ds.tokens)


def test_tokenize_filters(tmp_path):
    make_folder(tmp_path / "in")
    (tmp_path / "list.txt").write_text("a\n")
    out = tmp_path / "ds"
    args = ["tokenize", str(tmp_path / "in"), "-o", str(out), "--list", str(tmp_path / "list.txt")]
    assert main([*args, "--keep-parts", "lead", "--min-notes", "4", "--workers", "1"]) == 0
    ds = TokenDataset(out)
    assert len(ds) == 2  # only the files under a/
    assert all(set(ds.file_notes(i).part.tolist()) == {0} for i in range(len(ds)))
