"""Stream == file: a file's messages fed to the stream encoder in time order give exactly
`encode()` of that file; the stream decoder gives the same notes as `decode()`."""

import mido
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from improv.engine.tokenizer import Tokenizer
from improv.engine.tokenizer.notes import ticks_to_seconds

from midi_factory import TPB, midi_bytes, track_from_events

TOK = Tokenizer()
V = TOK.vocab
# track name -> (channel, program); names map to parts through the default rules
TRACKS = {"melody": (0, 73), "bridge": (1, 0), "piano": (2, 0), "bass": (3, 33), "drums": (9, 0)}
PART_OF = {
    "melody": "lead",
    "bridge": "counter",
    "piano": "harmony",
    "bass": "bass",
    "drums": "drums",
}
CLASS = {"program_change": -1, "note_off": 0, "control_change": 1, "note_on": 2}


@st.composite
def songs(draw):
    tracks = {}
    for name in draw(
        st.lists(st.sampled_from(sorted(TRACKS)), min_size=1, max_size=5, unique=True)
    ):
        ch, prog = TRACKS[name]
        pitches = [36, 38, 42, 22, 46] if name == "drums" else list(range(40, 84, 3))
        notes = draw(
            st.lists(
                st.tuples(
                    st.integers(0, 8 * TPB),
                    st.integers(1, 2 * TPB),
                    st.sampled_from(pitches),
                    st.integers(1, 127),
                ),
                max_size=25,
            )
        )
        # same key struck twice within one 10 ms tick merges in the file encoder (documented);
        # keep onsets of one key at least ~20 ms apart
        notes.sort()
        kept, last = [], {}
        for n in notes:
            if n[0] - last.get(n[2], -(10**9)) >= 20:
                kept.append(n)
                last[n[2]] = n[0]
        events = [(0, mido.Message("program_change", channel=ch, program=prog))]
        for start, dur, pitch, vel in kept:
            events.append((start, mido.Message("note_on", channel=ch, note=pitch, velocity=vel)))
            events.append((start + dur, mido.Message("note_off", channel=ch, note=pitch)))
        if name == "piano":
            for down, length in draw(
                st.lists(st.tuples(st.integers(0, 8 * TPB), st.integers(1, TPB)), max_size=4)
            ):
                events.append(
                    (down, mido.Message("control_change", channel=ch, control=64, value=127))
                )
                events.append(
                    (down + length, mido.Message("control_change", channel=ch, control=64, value=0))
                )
        tracks[name] = events
    tempos = [(0, draw(st.integers(300_000, 900_000)))]
    if draw(st.booleans()):
        tempos.append((draw(st.integers(1, 6 * TPB)), draw(st.integers(300_000, 900_000))))
    return tracks, tempos


def feed_in_time_order(tracks, tempos):
    """Every message with its time in seconds and part, in the canonical order at equal times:
    program changes, note-offs, pedal changes, note-ons (each by part, then pitch)."""
    t_ticks = np.array([t for t, _ in tempos])
    t_us = np.array([u for _, u in tempos])
    rows = []
    for name, events in tracks.items():
        ticks = np.array([t for t, _ in events])
        secs = ticks_to_seconds(ticks, t_ticks, t_us, TPB)
        for (_, msg), sec in zip(events, secs, strict=True):
            kind = "note_off" if msg.type == "note_on" and msg.velocity == 0 else msg.type
            part = V.part_index[PART_OF[name]]
            pitch = getattr(msg, "note", 0)
            if name == "drums":  # ties order by the key the tokens use (GM-mapped)
                pitch = V.config.drum_map.get(pitch, pitch)
            rows.append((sec, CLASS[kind], part, pitch, msg, PART_OF[name]))
    rows.sort(key=lambda r: r[:4])
    return rows


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(songs())
def test_stream_encoder_equals_file_encoder(song):
    tracks, tempos = song
    data = midi_bytes([track_from_events(name, ev) for name, ev in tracks.items()], tempos)
    enc = TOK.stream_encoder()
    streamed = [V.BOS, V.TASK_CONTINUE]
    for sec, _, _, _, msg, part in feed_in_time_order(tracks, tempos):
        streamed += enc.feed(msg, sec, part=part)
    streamed.append(V.EOS)
    assert streamed == TOK.encode(data)


def test_stream_parts_come_from_channels_by_default():
    enc = TOK.stream_encoder(channel_parts={1: "harmony"})
    out = enc.feed(mido.Message("note_on", channel=0, note=60, velocity=100), 0.0)
    out += enc.feed(mido.Message("note_on", channel=1, note=48, velocity=100), 0.0)
    out += enc.feed(mido.Message("note_on", channel=9, note=36, velocity=100), 0.0)
    names = [V.name(t) for t in out]
    assert "ON_lead_60" in names and "ON_harmony_48" in names and "ON_drums_36" in names
    assert enc.sounding == {(0, 60), (2, 48)}  # drums never sound: no note-off token


def test_note_on_is_a_token_the_moment_it_arrives():
    enc = TOK.stream_encoder()
    out = enc.feed(mido.Message("note_on", note=64, velocity=90), 1.234)
    assert [V.name(t) for t in out] == [
        "LONG_1s",
        "SHIFT_23",
        "PART_lead",
        "PROGRAM_0",
        "VEL_22",
        "ON_lead_64",
    ]


def test_sustain_pedal_defers_note_offs_until_release():
    enc = TOK.stream_encoder()
    on = mido.Message("note_on", note=60, velocity=80)
    assert enc.feed(mido.Message("control_change", control=64, value=127), 0.0) == []
    enc.feed(on, 0.1)
    assert enc.feed(mido.Message("note_off", note=60), 0.3) == []  # pedal holds it
    out = enc.feed(mido.Message("control_change", control=64, value=0), 1.0)
    assert [V.name(t) for t in out] == ["SHIFT_90", "OFF_lead_60"]
    assert enc.sounding == frozenset()


def test_a_held_note_rings_at_most_max_sustain():
    enc = TOK.stream_encoder()
    enc.feed(mido.Message("control_change", control=64, value=127), 0.0)
    enc.feed(mido.Message("note_on", note=60, velocity=80), 0.1)
    assert enc.feed(mido.Message("note_off", note=60), 0.2) == []
    assert enc.advance(1.6) == []  # the tail ends at 0.2 + 1.5 = 1.7 s
    out = enc.advance(1.8)
    assert [V.name(t) for t in out] == ["LONG_1s", "SHIFT_60", "OFF_lead_60"]  # at 1.7 s
    # the file encoder agrees: a pedal that never lifts (broken CC64 data) holds 1.5 s at most
    ev = [
        (0, mido.Message("control_change", control=64, value=100)),
        (0, mido.Message("note_on", note=60, velocity=80)),
        (TPB, mido.Message("note_off", note=60)),
        (40 * TPB, mido.Message("note_on", note=62, velocity=80)),
        (41 * TPB, mido.Message("note_off", note=62)),
    ]
    notes = TOK.read_notes(midi_bytes([track_from_events("piano", ev)]))
    assert notes.end.tolist() == [0.5 + 1.5, 20.5 + 1.5]


def test_release_all_closes_every_note():
    enc = TOK.stream_encoder()
    for p in (60, 64, 67):
        enc.feed(mido.Message("note_on", note=p, velocity=80), 0.0)
    out = enc.release_all(0.5)
    assert [V.name(t) for t in out][-3:] == ["OFF_lead_60", "OFF_lead_64", "OFF_lead_67"]
    assert enc.sounding == frozenset()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(songs())
def test_stream_decoder_equals_file_decoder(song):
    tracks, tempos = song
    data = midi_bytes([track_from_events(name, ev) for name, ev in tracks.items()], tempos)
    ids = TOK.encode(data)
    dec = TOK.stream_decoder()
    msgs = []
    for tok in ids:
        msgs += dec.feed(tok)
    msgs += dec.finish()
    ons = sum(1 for m in msgs if m.message.type == "note_on")
    offs = sum(1 for m in msgs if m.message.type == "note_off")
    assert ons == offs  # every note-on gets its note-off
    # messages are emitted in time order except drum note-offs (known at the hit)
    times = [m.time for m in msgs if not (m.message.type == "note_off" and m.message.channel == 9)]
    assert times == sorted(times)
    file_notes = TOK.decode_notes(ids)
    assert sorted(dec.notes) == sorted(file_notes.to_list())
