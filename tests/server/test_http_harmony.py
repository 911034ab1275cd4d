"""/v1/continue|infill|accompany with chords, beats and bpm, through the Python client, against a
real uvicorn server with a random-weight harmony model."""

from __future__ import annotations

import io
import json

import httpx
import mido
import pytest
import torch

from improv.clients import Client, ImprovError
from improv.engine.checkpoint import save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer import TempoMap, TokenizerConfig

from midi_factory import TPB, midi_bytes, notes_track


@pytest.fixture(scope="module")
def harmony_server(tmp_path_factory, server_factory):
    start_server, make_runtime = server_factory
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", max_seq_len=1024, vocab_size=1771))
    path = tmp_path_factory.mktemp("harmony") / "ckpt"
    save_checkpoint(path, model, TokenizerConfig(harmony=True), {})
    rt = make_runtime(path, max_sessions=2, http_sessions=2)
    server = start_server(rt)
    yield server
    server.stop()
    rt.close()


def _melody(beats: int = 12, tempo_us: int = 500_000) -> bytes:
    track = notes_track("MELODY", [(b * TPB, TPB - 20, 60 + b % 7, 90) for b in range(beats)])
    return midi_bytes([track], tempo_events=((0, tempo_us),))


def _markers(mf: mido.MidiFile) -> list[str]:
    return [m.text for m in mf.tracks[0] if m.type == "marker"]


def test_chart_and_bpm_come_back_as_markers_and_tempo(harmony_server) -> None:
    with Client(harmony_server.url) as c:
        out = c.accompany(
            _melody(), parts=["harmony", "bass"], chords="| C | Am F |", bpm=90, seed=1
        )
    assert _markers(out)[:3] == ["C:maj", "A:min", "F:maj"]
    tempo = [m.tempo for m in out.tracks[0] if m.type == "set_tempo"]
    assert tempo == [666_667]  # 90 bpm


def test_json_has_the_chords_and_the_input_tempo_map_is_kept(harmony_server) -> None:
    song = _melody(tempo_us=750_000)  # 80 bpm in the file
    r = httpx.post(
        f"{harmony_server.url}/v1/continue",
        files={"file": ("s.mid", song, "audio/midi")},
        data={"seconds": "2", "chords": "0 3 D:min7\n3 6 G:7\n", "seed": "3"},
        headers={"Accept": "application/json"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["label"] for c in body["chords"]] == ["D:min7", "G:7"]
    m = httpx.post(
        f"{harmony_server.url}/v1/continue",
        files={"file": ("s.mid", song, "audio/midi")},
        data={"seconds": "2", "seed": "3"},
        timeout=60,
    )
    assert TempoMap.from_midi(m.content).tempo_mspq.tolist() == [750_000]


def test_the_stream_carries_given_chords_first(harmony_server) -> None:
    with httpx.stream(
        "POST",
        f"{harmony_server.url}/v1/accompany",
        files={"file": ("s.mid", _melody(), "audio/midi")},
        data={"stream": "true", "chords": "C G", "bpm": "120", "parts": "harmony", "seed": "4"},
        timeout=60,
    ) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0] == {"type": "chord", "time": 0.0, "label": "C:maj"}
    assert events[-1]["type"] == "done"


def test_chord_tones_false_lets_the_model_leave_the_chord(harmony_server) -> None:
    """`chord_tones` (form field, as the CLI's --no-chord-tones): by default in accompaniment
    every generated harmony note is a tone of the given chord; with false, a random model's
    are not."""

    def harmony_pitch_classes(extra: dict[str, str]) -> list[int]:
        r = httpx.post(
            f"{harmony_server.url}/v1/accompany",
            files={"file": ("s.mid", _melody(), "audio/midi")},
            data={"chords": "C", "bpm": "120", "parts": "harmony", "seed": "5", **extra},
            headers={"Accept": "application/json"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        notes = r.json()["notes"]
        return [n["pitch"] % 12 for n in notes if n["generated"] and n["part"] == "harmony"]

    guarded, free = harmony_pitch_classes({}), harmony_pitch_classes({"chord_tones": "false"})
    assert guarded and set(guarded) <= {0, 4, 7}
    assert free and not set(free) <= {0, 4, 7}
    with Client(harmony_server.url) as c:  # the client's keyword sends it: the same notes
        out = c.accompany(_melody(), "harmony", chords="C", bpm=120, seed=5, chord_tones=False)
    track = next(t for t in out.tracks if "harmony" in t.name.lower())
    assert sorted(m.note % 12 for m in track if m.type == "note_on" and m.velocity) == sorted(free)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"chords": "C Am"}, "chord chart"),  # no beats to lay it on: the file has no tempo
        ({"chords": "C Xm", "bpm": "100"}, "not a chord"),
        ({"bpm": "900"}, "less than or equal to 400"),
        ({"beats_per_bar": "40", "bpm": "100"}, "less than or equal to 16"),
        ({"beats": "0.5\nsoon\n"}, "beat line 2"),
    ],
)
def test_bad_harmony_fields_get_a_422_that_says_why(harmony_server, fields, message) -> None:
    mf = mido.MidiFile(ticks_per_beat=TPB)  # no tempo events: no beats of its own
    mf.tracks.append(notes_track("MELODY", [(0, TPB, 60, 90), (TPB, TPB, 62, 90)]))
    buf = io.BytesIO()
    mf.save(file=buf)
    with Client(harmony_server.url) as c:
        with pytest.raises(ImprovError) as e:
            c._generate("/v1/accompany", buf.getvalue(), **fields)
    assert e.value.status == 422 and message in str(e.value.message)


def test_the_melody_comes_back_note_for_note(harmony_server) -> None:
    """Re-struck keys under the sustain pedal (folded into long, overlapping notes when read)
    come back as the same notes at the same onsets (7% were lost before: overlapping notes of
    one key on one channel)."""
    ev = [(0, mido.Message("control_change", control=64, value=127))]
    for b in range(16):  # C D C D ... under a held pedal: every key struck again while it rings
        pitch = 60 + 2 * (b % 2)
        ev.append((b * TPB // 2, mido.Message("note_on", note=pitch, velocity=90)))
        ev.append((b * TPB // 2 + 60, mido.Message("note_off", note=pitch, velocity=0)))
    ev.append((8 * TPB, mido.Message("control_change", control=64, value=0)))
    from midi_factory import track_from_events

    song = midi_bytes([track_from_events("MELODY", ev)])
    with Client(harmony_server.url) as c:
        out = c.accompany(song, parts=["harmony"], seed=5)
    buf = io.BytesIO()
    out.save(file=buf)
    from improv.engine.tokenizer import Tokenizer

    tok = Tokenizer()
    sent, back = tok.read_notes(song), tok.read_notes(buf.getvalue())
    sent_lead, back_lead = sent.select(sent.part == 0), back.select(back.part == 0)
    assert len(back_lead) == len(sent_lead) == 16
    assert abs(back_lead.start - sent_lead.start).max() < 0.002
