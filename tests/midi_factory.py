"""Test MIDI built in code (tests never depend on ../shared)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import mido

TPB = 480


def track_from_events(
    name: str | None, events: Sequence[tuple[int, mido.Message]]
) -> mido.MidiTrack:
    """A track from (absolute tick, message) pairs (sorted stably by tick)."""
    track = mido.MidiTrack()
    if name is not None:
        track.append(mido.MetaMessage("track_name", name=name, time=0))
    last = 0
    for tick, msg in sorted(events, key=lambda e: e[0]):
        track.append(msg.copy(time=tick - last))
        last = tick
    return track


def midi_bytes(
    tracks: Sequence[mido.MidiTrack],
    tempo_events: Sequence[tuple[int, int]] = ((0, 500_000),),
    type_: int = 1,
) -> bytes:
    mf = mido.MidiFile(type=type_, ticks_per_beat=TPB)
    tempo = track_from_events(
        None, [(t, mido.MetaMessage("set_tempo", tempo=us)) for t, us in tempo_events]
    )
    if type_ == 0:
        merged = mido.merge_tracks([tempo, *tracks])
        mf.tracks.append(merged)
    else:
        mf.tracks.append(tempo)
        mf.tracks.extend(tracks)
    buf = io.BytesIO()
    mf.save(file=buf)
    return buf.getvalue()


def notes_track(
    name: str, notes: Sequence[tuple[int, int, int, int]], channel: int = 0, program: int = 0
) -> mido.MidiTrack:
    """(start tick, duration ticks, pitch, velocity) notes on one channel."""
    ev: list[tuple[int, mido.Message]] = [
        (0, mido.Message("program_change", channel=channel, program=program))
    ]
    for start, dur, pitch, vel in notes:
        ev.append((start, mido.Message("note_on", channel=channel, note=pitch, velocity=vel)))
        ev.append((start + dur, mido.Message("note_off", channel=channel, note=pitch, velocity=0)))
    return track_from_events(name, ev)


def simple_song(seconds: float = 8.0, seed: int = 0) -> bytes:
    """A small two-part song: a melody and piano chords, 120 bpm."""
    import random

    rng = random.Random(seed)
    beat = TPB
    melody, chords = [], []
    scale = [60, 62, 64, 65, 67, 69, 71, 72]
    n_beats = int(seconds * 2)
    for b in range(n_beats):
        melody.append((b * beat, beat - 40, rng.choice(scale), rng.randint(70, 110)))
        if b % 4 == 0:
            root = rng.choice([48, 53, 55, 57])
            for iv in (0, 4, 7):
                chords.append((b * beat, 4 * beat - 20, root + iv, 60))
    return midi_bytes([notes_track("MELODY", melody), notes_track("PIANO", chords, channel=1)])


# --- raw bytes: files mido would refuse to write (hostile inputs) ---------------------------------
def vlq(n: int) -> bytes:
    """A MIDI variable-length quantity."""
    out = [n & 0x7F]
    while n := n >> 7:
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def raw_track(events: Sequence[tuple[int, bytes]]) -> bytes:
    """An MTrk chunk of (delta ticks, message bytes), ended by End of Track."""
    body = b"".join(vlq(d) + m for d, m in events) + b"\x00\xff\x2f\x00"
    return b"MTrk" + len(body).to_bytes(4, "big") + body


def raw_smf(tracks: Sequence[bytes], division: int = TPB, fmt: int = 1) -> bytes:
    head = fmt.to_bytes(2, "big") + len(tracks).to_bytes(2, "big") + division.to_bytes(2, "big")
    return b"MThd\x00\x00\x00\x06" + head + b"".join(tracks)


def absurd_deltas(n_notes: int = 8, delta: int = 0x0FFFFFFF, division: int = 1) -> bytes:
    """Notes whose delta times are years long (the tick count overflows 32 bits): #22 item 3.
    One note at division 1 is the 37-byte file of item 1."""
    events = []
    for i in range(n_notes):
        events += [(delta, bytes([0x90, 60 + i % 12, 100])), (1, bytes([0x80, 60 + i % 12, 0]))]
    return raw_smf([raw_track(events)], division=division, fmt=0)


def many_notes(n: int, pitches: int = 24) -> bytes:
    """`n` short notes, one tick apart (a few bytes each: a small file, a huge note count)."""
    ev = b"".join(
        b"\x00\x90" + bytes([48 + i % pitches, 90]) + b"\x01\x80" + bytes([48 + i % pitches, 0])
        for i in range(n)
    )
    body = ev + b"\x00\xff\x2f\x00"
    return raw_smf([b"MTrk" + len(body).to_bytes(4, "big") + body], fmt=0)


def mutate(data: bytes, rng) -> bytes:
    """A MIDI file damaged the ways files are: bytes flipped, cut short, spliced, lengths off."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.4 and b:  # flip a few bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind < 0.6:  # cut short
            del b[rng.randrange(len(b) + 1) :]
        elif kind < 0.8 and b:  # a run of junk in the middle
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        else:  # a chunk length wrong (header or track)
            for tag in (b"MThd", b"MTrk"):
                i = b.find(tag)
                if i >= 0 and i + 8 <= len(b):
                    b[i + 4 : i + 8] = rng.randrange(1 << 32).to_bytes(4, "big")
    return bytes(b)


def sounding(events: Sequence[dict]) -> set[tuple[int, int]]:
    """(channel, key) left sounding after playing live `midi` messages ({"data", "time"}, the
    retracted ones taken out) in time order (ties: arrival order)."""
    ring: dict[tuple[int, int], int] = {}
    for m in sorted(events, key=lambda m: m["time"]):  # stable: arrival order on ties
        st, *rest = m["data"]
        key = (st & 0x0F, rest[0] if rest else -1)
        if st & 0xF0 == 0x90 and rest[1] > 0:
            ring[key] = ring.get(key, 0) + 1
        elif st & 0xF0 in (0x80, 0x90):
            ring[key] = max(0, ring.get(key, 0) - 1)
    return {k for k, v in ring.items() if v}
