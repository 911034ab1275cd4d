"""improv generate / infill / accompany / render on a random-weight tiny checkpoint."""

import numpy as np
import pytest
import torch

from improv.cli import main
from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer import Tokenizer, TokenizerConfig

from midi_factory import simple_song

TOK = Tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", max_seq_len=1024))
    return str(
        save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, TokenizerConfig(), {})
    )


@pytest.fixture
def song(tmp_path):
    path = tmp_path / "song.mid"
    path.write_bytes(simple_song(8))
    return path


def test_generate_variations_are_different_takes(tmp_path, song, ckpt):
    out = tmp_path / "take.mid"
    args = [
        "generate",
        str(song),
        "-o",
        str(out),
        "--checkpoint",
        ckpt,
        "--seconds",
        "2",
        "--seed",
        "3",
    ]
    assert main([*args, "--variations", "3"]) == 0
    takes = [TOK.read_notes(tmp_path / f"take-{i}.mid") for i in (1, 2, 3)]
    prompt = TOK.read_notes(song)
    for t in takes:
        assert len(t) >= len(prompt)  # the prompt comes back, followed by the continuation
    assert len({tuple(np.round(t.start, 3)) for t in takes}) > 1
    # seeds reproduce: take 1 again with the same seed
    assert main([*args, "-o", str(tmp_path / "again.mid")]) == 0
    again = TOK.read_notes(tmp_path / "again.mid")
    assert np.array_equal(again.pitch, takes[0].pitch) and np.allclose(again.start, takes[0].start)


def test_generate_from_scratch(tmp_path, ckpt):
    assert (
        main(["generate", "-o", str(tmp_path / "new.mid"), "--checkpoint", ckpt, "--seconds", "2"])
        == 0
    )
    assert (tmp_path / "new.mid").exists()


def test_infill_keeps_every_note_outside_the_gap(tmp_path, song, ckpt):
    out = tmp_path / "filled.mid"
    assert (
        main(
            [
                "infill",
                str(song),
                "--start",
                "2",
                "--end",
                "4",
                "--parts",
                "lead",
                "-o",
                str(out),
                "--checkpoint",
                ckpt,
                "--seed",
                "1",
            ]
        )
        == 0
    )
    before, after = TOK.read_notes(song), TOK.read_notes(out)
    keep = ~((before.start >= 2) & (before.start < 4) & (before.part == 0))
    kept = sorted(
        zip(before.start[keep].round(4), before.pitch[keep], before.part[keep], strict=True)
    )
    got = sorted(zip(after.start.round(4), after.pitch, after.part, strict=True))
    missing = [n for n in kept if n not in got]
    assert not missing
    new = after.select(~np.isin(np.round(after.start, 4), [k[0] for k in kept]) | (after.part != 0))
    assert np.all((new.part != 0) | ((new.start >= 2 - 1e-6) & (new.start < 4)))


def test_accompany_adds_parts_under_the_melody(tmp_path, song, ckpt):
    out = tmp_path / "acc.mid"
    assert (
        main(
            [
                "accompany",
                str(song),
                "-o",
                str(out),
                "--checkpoint",
                ckpt,
                "--parts",
                "harmony,bass",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    notes = TOK.read_notes(out)
    given = TOK.read_notes(song)  # MELODY (the lead) and PIANO (harmony, generated anew here)
    melody = given.select(given.part == 0)
    lead = notes.select(notes.part == 0)
    assert np.array_equal(np.sort(lead.pitch), np.sort(melody.pitch))
    assert set(notes.part.tolist()) <= {
        0,
        TOK.vocab.part_index["harmony"],
        TOK.vocab.part_index["bass"],
    }
    # A part of the file that is not generated is kept, and played along with.
    out2 = tmp_path / "acc2.mid"
    assert (
        main(["accompany", str(song), "-o", str(out2), "--checkpoint", ckpt, "--parts", "bass"])
        == 0
    )
    harmony = TOK.vocab.part_index["harmony"]
    kept = TOK.read_notes(out2)
    kept, piano = kept.select(kept.part == harmony), given.select(given.part == harmony)
    assert len(piano) > 0
    assert np.array_equal(kept.pitch, piano.pitch) and np.allclose(kept.start, piano.start)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "missing.mid", "-o", "x.mid"], "no such file"),
        (["generate", "-o", "x.mid", "--temperature", "-1"], "--temperature must be in 0..5"),
        (
            ["infill", "{song}", "--start", "3", "--end", "1", "-o", "x.mid"],
            "need 0 <= --start < --end",
        ),
    ],
)
def test_bad_arguments_say_what_is_wrong(song, ckpt, argv, message):
    argv = [a.replace("{song}", str(song)) for a in argv] + ["--checkpoint", ckpt]
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_render_writes_a_png(tmp_path, song):
    out = tmp_path / "roll.png"
    assert main(["render", str(song), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _improv(args, cwd):
    import subprocess
    import sys
    import time
    from pathlib import Path

    t0 = time.monotonic()
    r = subprocess.run(
        [str(Path(sys.executable).parent / "improv"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return r, time.monotonic() - t0


def test_generate_with_the_bundled_model_from_another_directory(tmp_path):
    """#22 item 7: "no checkpoint at models/default" outside the repository root, no more."""
    r, _ = _improv(["generate", "-o", "out.mid", "--seconds", "1", "--seed", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.mid").stat().st_size > 20


def test_arguments_are_checked_before_the_model_loads(tmp_path, song):
    for args, needle in (
        (["accompany", str(song), "--parts", "tuba", "-o", "x.mid"], "--parts must be among"),
        (["generate", "--temperature", "9", "-o", "x.mid"], "--temperature must be in"),
        (["infill", str(song), "--start", "3", "--end", "2", "-o", "x.mid"], "--start < --end"),
    ):
        r, took = _improv(args, tmp_path)
        assert r.returncode != 0 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and took < 20  # the model takes ~7 s to load
