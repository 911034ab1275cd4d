"""improv generate / accompany with chords and beats, on a random-weight harmony checkpoint."""

import mido
import pytest
import torch

from improv.cli import main
from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer import TempoMap, TokenizerConfig

from midi_factory import TPB, midi_bytes, notes_track


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", max_seq_len=1024, vocab_size=1771))
    cfg = TokenizerConfig(harmony=True)
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, cfg, {}))


def _markers(path) -> list[str]:
    return [m.text for m in mido.MidiFile(path).tracks[0] if m.type == "marker"]


def test_accompany_with_a_chart_and_bpm(tmp_path, ckpt):
    melody = tmp_path / "melody.mid"
    melody.write_bytes(
        midi_bytes([notes_track("MELODY", [(b * TPB, TPB - 20, 64, 90) for b in range(16)])])
    )
    out = tmp_path / "out.mid"
    args = ["accompany", str(melody), "-o", str(out), "--checkpoint", ckpt, "--seed", "1"]
    assert main([*args, "--bpm", "96", "--chords", "C Am F G", "--parts", "harmony,bass"]) == 0
    assert _markers(out)[:4] == ["C:maj", "A:min", "F:maj", "G:maj"]
    tempo = TempoMap.from_midi(out)
    assert tempo is not None and round(tempo.bpm_at(0.0)) == 96


def test_the_input_tempo_map_comes_back(tmp_path, ckpt):
    sig = mido.MetaMessage("time_signature", numerator=3, denominator=4, time=0)
    track = notes_track("MELODY", [(b * TPB, TPB - 20, 60 + b % 5, 90) for b in range(9)])
    track.insert(1, sig)
    song = tmp_path / "waltz.mid"
    song.write_bytes(midi_bytes([track], tempo_events=((0, 750_000),)))  # 80 bpm
    out = tmp_path / "more.mid"
    chords = tmp_path / "song.lab"
    chords.write_text("0 2.25 C:maj\n2.25 4.5 G:7\n")
    args = ["generate", str(song), "-o", str(out), "--checkpoint", ckpt, "--seconds", "3"]
    assert main([*args, "--chords", str(chords), "--seed", "2"]) == 0
    back, src = TempoMap.from_midi(out), TempoMap.from_midi(song)
    assert back.tempo_mspq.tolist() == src.tempo_mspq.tolist()
    assert (back.sig_num.tolist(), back.sig_den.tolist()) == ([3], [4])
    assert _markers(out) == ["C:maj", "G:7"]


def test_bad_chords_fail_with_a_clear_message(tmp_path, ckpt, capsys):
    out = tmp_path / "x.mid"
    with pytest.raises(SystemExit, match="chord chart"):
        main(["generate", "-o", str(out), "--checkpoint", ckpt, "--chords", "C Am"])
