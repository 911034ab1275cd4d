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
