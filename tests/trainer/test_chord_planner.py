"""Training the chord planner (trainer/chord_planner.py): windows from a song's melody, beats and
chords, and a planner that learns a progression it is shown."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from improv.engine.chord_planner import ChordPlanner, PlannerConfig
from improv.engine.tokenizer import Note, Notes
from improv.trainer.chord_planner import follow_share, share, song_window, train
from improv.trainer.chords import parse_chord

PROGRESSIONS = [("C:maj", "A:min", "F:maj", "G:maj"), ("A:min", "F:maj", "C:maj", "G:maj")]


@pytest.fixture
def one_thread():
    """Small GRU steps: one thread is several times faster than two that wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _song(progression: tuple[str, ...], key: int, bars: int, rng: np.random.Generator):
    """A melody over a bar a chord (2 s bars of 4 beats): on each beat a chord tone, now and
    then a passing note a step above; its beats and chords."""
    chords, notes = [], []
    for b in range(bars):
        c = parse_chord(progression[b % 4], 2.0 * b, 2.0 * b + 2.0)
        assert c is not None
        root = (c.root + key) % 12
        c = c._replace(root=root, tones=tuple(sorted((t + key) % 12 for t in c.tones)))
        chords.append(c)
        for k in range(4):
            t = 2.0 * b + 0.5 * k
            pc = int(rng.choice(c.tones)) if rng.random() < 0.8 else (c.tones[0] + 2) % 12
            notes.append(Note(t, t + 0.45, 60 + pc, 90, 0, 0))
    beats = np.array([[0.5 * i, float(i % 4 == 0)] for i in range(4 * bars)])
    return Notes.from_list(notes), beats, chords


def test_a_window_holds_each_beat_melody_and_its_chord() -> None:
    melody, beats, chords = _song(PROGRESSIONS[0], 0, 4, np.random.default_rng(0))
    w = song_window(melody, beats, chords, 2.0, 6.0)
    assert w is not None and len(w.weights) == 8
    np.testing.assert_array_equal(w.bar_pos, [0, 1, 2, 3, 0, 1, 2, 3])
    assert set(np.flatnonzero(w.tones[0])) == {9, 0, 4}  # bar 2: A minor
    assert set(np.flatnonzero(w.tones[4])) == {5, 9, 0}  # bar 3: F major
    np.testing.assert_allclose(w.weights.sum(axis=1), 0.9)  # 0.45 s of a 0.5 s beat
    assert w.scored.all()


def test_a_planner_learns_the_chords_under_a_melody(one_thread: None) -> None:
    rng = np.random.default_rng(1)
    songs = [_song(PROGRESSIONS[i % 2], int(rng.integers(12)), 8, rng) for i in range(40)]
    windows = [song_window(m, b, c, 0.0, 16.0) for m, b, c in songs]
    train_set, valid_set = windows[:32], windows[32:]
    torch.manual_seed(0)
    planner = ChordPlanner(PlannerConfig(hidden=16))
    before = share(planner, valid_set)
    train(planner, train_set, valid_set, steps=160, batch=8, lr=1e-2)
    after = share(planner, valid_set)
    assert after > 0.9 > before, (before, after)


def test_the_live_twin_learns_to_name_a_beat_chord_from_the_beats_before_it(one_thread) -> None:
    rng = np.random.default_rng(1)
    songs = [_song(PROGRESSIONS[i % 2], int(rng.integers(12)), 8, rng) for i in range(40)]
    windows = [song_window(m, b, c, 0.0, 16.0) for m, b, c in songs]
    torch.manual_seed(0)
    follower = ChordPlanner(PlannerConfig(hidden=16, causal=True))
    before = follow_share(follower, windows[32:], is_heard=True)
    train(follower, windows[:32], windows[32:], steps=160, batch=8, lr=1e-2)
    assert follow_share(follower, windows[32:], is_heard=True) > before + 0.3
    # hedged: a chance of ~0 keeps every tone (the same share, 3 tones a beat), 1 the likeliest
    whole = follow_share(follower, windows[32:], is_heard=True)
    assert follow_share(follower, windows[32:], True, hedge=1e-9) == (whole, 3.0)
    sure, tones = follow_share(follower, windows[32:], True, hedge=1.0)
    assert tones == 1.0 and sure >= whole
    # (the HMM's twin on the same: about as good; POP909's figures are in the trainer's JSON)


def test_songs_are_read_in_pop909s_layout(tmp_path) -> None:
    """`windows` reads a song folder as POP909 lays it out (NNN/NNN.mid with a MELODY track,
    beat_midi.txt, chord_midi.txt): 30 s windows from the melody's first note, each beat's
    melody and the annotated chord there."""
    from improv.engine.tokenizer import Tokenizer
    from improv.trainer.chord_planner import windows

    from midi_factory import midi_bytes, notes_track

    folder = tmp_path / "pop909" / "001"
    folder.mkdir(parents=True)
    # 120 bpm (480 ticks a beat): a melody note a beat from beat 4 (2 s) for 64 beats,
    # C E G over two bars of C, then A C E over two bars of A minor, again and again
    arps = [60, 64, 67, 64] * 2 + [69, 72, 76, 72] * 2
    melody = [(480 * (4 + i), 400, arps[i % 16], 90) for i in range(64)]
    (folder / "001.mid").write_bytes(midi_bytes([notes_track("MELODY", melody)]))
    (folder / "beat_midi.txt").write_text(
        "".join(f"{0.5 * i:.3f} {int(i % 2 == 0)} {int(i % 4 == 0)}\n" for i in range(80))
    )
    (folder / "chord_midi.txt").write_text(
        "0.000 2.000 N\n"
        + "".join(f"{2.0 + 4.0 * k:.3f} {6.0 + 4.0 * k:.3f} {'C:maj' if k % 2 == 0 else 'A:min'}\n"
                  for k in range(9))
    )  # fmt: skip
    ws = windows(Tokenizer(), tmp_path / "pop909", ["001"], (0.0, 10.0), first_only=False)
    # 2-32 s, and 10 s later 12-42 s (a window starts while 8 s of melody are left; it ends at 34 s)
    assert [len(w.weights) for w in ws] == [60, 56]
    first = ws[0]
    assert first.bar_pos[0] == 0 and first.beats_per_bar[0] == 4
    assert set(np.flatnonzero(first.tones[0])) == {0, 4, 7}
    assert set(np.flatnonzero(first.tones[8])) == {9, 0, 4}
    assert first.weights[0].argmax() == 0 and first.weights[8].argmax() == 9
    np.testing.assert_allclose(first.heard[0, 0], 0.08 / 0.5)  # its first 80 ms, in beats
    assert first.scored.all()
    assert len(windows(Tokenizer(), tmp_path / "pop909", ["001"], (0.0,), first_only=True)) == 1
