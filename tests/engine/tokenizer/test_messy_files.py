"""Real files are messy: each case built in code."""

import struct

import mido
import pytest

from improv.engine.tokenizer import MidiReadError, Tokenizer

from midi_factory import TPB, midi_bytes, notes_track, simple_song, track_from_events

TOK = Tokenizer()
V = TOK.vocab


def names(ids):
    return [V.name(t) for t in ids]


def raw_midi(track_data: bytes, fmt: int = 0, ntracks: int = 1, division: int = TPB) -> bytes:
    """A file from hand-written track bytes (to get running status, which mido never writes)."""
    header = b"MThd" + struct.pack(">IHHH", 6, fmt, ntracks, division)
    return header + b"MTrk" + struct.pack(">I", len(track_data)) + track_data


def test_running_status_and_velocity_zero_note_off():
    # delta, status 0x90 once, then running status; a note-on with velocity 0 ends each note
    track = bytes(
        [0x00, 0x90, 60, 100,  # note-on C4
         0x83, 0x60, 60, 0,  # +480 ticks, running status, velocity 0 = note-off
         0x00, 62, 90,  # running status: note-on D4
         0x83, 0x60, 62, 0,  # +480: off
         0x00, 0xFF, 0x2F, 0x00]  # end of track
    )  # fmt: skip
    notes = TOK.read_notes(raw_midi(track))
    assert notes.pitch.tolist() == [60, 62]
    assert notes.start.tolist() == [0.0, 0.5] and notes.end.tolist() == [0.5, 1.0]


def test_overlapping_notes_of_one_pitch_are_retriggered():
    # C4 struck at 0 and again at 0.25 s while still held; both released later
    data = midi_bytes([notes_track("melody", [(0, 480, 60, 90), (240, 480, 60, 70)])])
    out = names(TOK.encode(data))
    on1, on2 = out.index("ON_lead_60"), len(out) - 1 - out[::-1].index("ON_lead_60")
    assert on1 < on2 and out[on1 + 1 : on2].count("OFF_lead_60") == 1  # the old note ends first
    assert out.count("OFF_lead_60") == 2


def test_tempo_changes_are_followed():
    # 120 bpm for one beat (0.5 s), then 60 bpm: the note at beat 2 is at 0.5 + 1.0 = 1.5 s
    data = midi_bytes(
        [notes_track("melody", [(0, 100, 60, 90), (2 * TPB, 100, 62, 90)])],
        tempo_events=[(0, 500_000), (TPB, 1_000_000)],
    )
    assert TOK.read_notes(data).start.tolist() == [0.0, 1.5]


def test_type0_and_type1_give_the_same_tokens():
    tracks = [
        notes_track("", [(0, 200, 60, 90), (480, 200, 64, 90)], channel=0),
        notes_track("", [(0, 100, 36, 100), (240, 100, 38, 100)], channel=9),
    ]
    assert TOK.encode(midi_bytes(tracks, type_=0)) == TOK.encode(midi_bytes(tracks, type_=1))


def test_notes_never_turned_off_are_dropped_and_the_rest_kept():
    ev = [
        (0, mido.Message("note_on", note=60, velocity=90)),  # never released
        (100, mido.Message("note_on", note=64, velocity=90)),
        (300, mido.Message("note_off", note=64)),
    ]
    notes = TOK.read_notes(midi_bytes([track_from_events("melody", ev)]))
    assert notes.pitch.tolist() == [64]  # documented limit (docs/tokens.md)


def test_data_bytes_out_of_range_are_clamped_not_fatal():
    track = bytes([0x00, 0x90, 60, 0xC8, 0x83, 0x60, 0x80, 60, 0x40, 0x00, 0xFF, 0x2F, 0x00])
    notes = TOK.read_notes(raw_midi(track))
    assert notes.pitch.tolist() == [60] and 1 <= notes.velocity[0] <= 127


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not a midi file at all", "not a readable MIDI file"),
        (simple_song()[:60], "not a readable MIDI file"),  # truncated
        (
            b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\xff\xff\xff\xff\x00\x90",
            "not a readable MIDI file",
        ),
    ],
)
def test_unreadable_files_raise_one_documented_error(data, reason):
    with pytest.raises(MidiReadError, match=reason):
        TOK.encode(data)


def test_missing_path_is_a_read_error(tmp_path):
    with pytest.raises(MidiReadError, match="cannot read"):
        TOK.encode(tmp_path / "nope.mid")


def test_encode_accepts_path_bytes_and_mido(tmp_path):
    data = simple_song(seconds=4)
    path = tmp_path / "song.mid"
    path.write_bytes(data)
    mf = mido.MidiFile(path)
    assert TOK.encode(path) == TOK.encode(str(path)) == TOK.encode(data) == TOK.encode(mf)


def test_part_overrides():
    data = simple_song(seconds=4)
    all_lead = TOK.read_notes(data, parts="lead")
    assert set(all_lead.part.tolist()) == {V.lead}
    by_name = TOK.read_notes(data, parts={"MELODY": "counter", "PIANO": "bass"})
    assert set(by_name.part.tolist()) == {V.part_index["counter"], V.part_index["bass"]}
    with pytest.raises(ValueError, match="unknown part"):
        TOK.read_notes(data, parts="vocals")
