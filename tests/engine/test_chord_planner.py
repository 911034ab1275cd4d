"""The learned chord planner (engine/chord_planner.py): files, transposition, long melodies, and
the plan an accompaniment without chords follows."""

from __future__ import annotations

import numpy as np
import torch

from improv.engine.chord_planner import ChordPlanner, LiveFollow, PlannerConfig, features
from improv.engine.conditioning import Conditioning
from improv.engine.constraints import ChordsFitMelody
from improv.engine.engine import Engine
from improv.engine.generation import SchedulerSessions, plan_accompany
from improv.engine.live import SamplingParams
from improv.engine.tokenizer import Note, Notes
from improv.engine.tokenizer.chord_plan import TRIADS
from improv.engine.tokenizer.harmony import chord_of
from improv.engine.tokenizer.vocab import TokenizerConfig


def _planner(seed: int = 0, **cfg: int) -> ChordPlanner:
    torch.manual_seed(seed)
    return ChordPlanner(PlannerConfig(hidden=16, **cfg)).eval()


def _melody_weights(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.random((n, 12)) * (rng.random((n, 12)) < 0.2)
    return w, np.arange(n) % 4, np.full(n, 4)


def test_saved_and_loaded_it_plans_the_same(tmp_path) -> None:
    planner = _planner(change_cost=(0.1, 0.2, 0.3))
    planner.meta = {"steps": 3}
    planner.save(tmp_path)
    again = ChordPlanner.load(tmp_path)
    assert again is not None and again.config == planner.config and again.meta == {"steps": 3}
    w, pos, per_bar = _melody_weights(40)
    np.testing.assert_array_equal(
        again.membership(w, pos, per_bar), planner.membership(w, pos, per_bar)
    )
    assert ChordPlanner.load(tmp_path / "nothing") is None


def test_a_transposed_melody_gets_the_transposed_plan() -> None:
    """The network is shared over the 12 rotations: it hears intervals, not keys."""
    planner = _planner()
    w, pos, per_bar = _melody_weights(24)
    m = planner.membership(w, pos, per_bar)
    for k in (1, 5, 11):
        shifted = planner.membership(np.roll(w, k, axis=1), pos, per_bar)
        np.testing.assert_allclose(shifted, np.roll(m, k, axis=1), atol=1e-5)
        plan, plan_k = (
            planner.plan(w, pos, per_bar),
            planner.plan(np.roll(w, k, axis=1), pos, per_bar),
        )
        for a, b in zip(plan.tolist(), plan_k.tolist(), strict=True):
            (ra, qa), (rb, qb) = chord_of(a), chord_of(b)  # type: ignore[misc]
            assert ((ra + k) % 12, qa) == (rb, qb)


def test_a_long_melody_is_planned_in_windows_with_context() -> None:
    planner = _planner(window_beats=8, margin_beats=4)
    w, pos, per_bar = _melody_weights(30)
    m = planner.membership(w, pos, per_bar)
    assert m.shape == (30, 12) and ((m > 0) & (m < 1)).all()
    # beats 8..15 are read with beats 4..19 around them, and nothing else
    x, p = features(w[4:20], pos[4:20], per_bar[4:20])
    with torch.no_grad():
        alone = torch.sigmoid(planner(x[None], p[None]))[0].numpy()
    np.testing.assert_allclose(m[8:16], alone[4:12], atol=1e-6)
    plan = planner.plan(w, pos, per_bar)
    assert len(plan) == 30 and set(plan.tolist()) <= set(TRIADS.tolist())
    assert len(planner.plan(np.zeros((0, 12)), np.zeros(0, int), np.zeros(0, int))) == 0


def test_an_accompaniment_without_chords_follows_the_planner_of_its_checkpoint(make_model) -> None:
    """Engine.load reads `chord_planner.*` beside the model; plan_accompany's chord plan is that
    planner's, beat for beat (without one: the HMM's)."""
    engine = Engine.from_model(make_model(vocab_size=1771), TokenizerConfig(harmony=True))
    engine.chord_planner = planner = _planner(seed=3)
    melody = Notes.from_list(
        [Note(0.25 * i, 0.25 * i + 0.2, 60 + (i * 7) % 12, 90, 0, 0) for i in range(24)]
    )
    cond = Conditioning.parse(bpm=120, beats_per_bar=4, until=6.0)
    with SchedulerSessions(engine, max_sessions=1) as sessions:
        assert sessions.chord_planner is planner
        job = plan_accompany(sessions, melody, SamplingParams(seed=1), ["harmony"], cond=cond)
    fits = next(c for c in job.request.constraints if isinstance(c, ChordsFitMelody)).fits
    assert len(fits) == 12
    beats = np.arange(13) * 0.5  # the melody's 12 beats and the edge after them
    from improv.engine.tokenizer.chord_plan import melody_weights

    w = melody_weights(melody.pitch, melody.start, melody.end, beats) / 0.5
    want = planner.plan(w, np.arange(12) % 4, np.full(12, 4))
    assert [c for _, (c,) in fits] == want.tolist()
    assert [t for t, _ in fits] == [50 * i for i in range(12)]


def test_the_live_twin_stepped_beat_by_beat_reads_as_it_does_all_at_once() -> None:
    """`LiveFollow` keeps the GRU's state and steps it once a beat; its decision equals
    `ChordPlanner.follow` over the same beats read at once, also after its state restarts."""
    follower = _planner(seed=5, causal=True)
    rng = np.random.default_rng(2)
    n = 40
    whole = rng.random((n, 12)) * (rng.random((n, 12)) < 0.25)
    heads = whole * rng.random((n, 12))
    pos, per_bar = np.arange(n) % 4, np.full(n, 4)
    for restart in (64, 8):
        live = LiveFollow(follower, restart=restart)
        for b in range(n):
            for heard in (False, True):
                got, member = live.decide(
                    b, whole[b - 1] if b else np.zeros(12), heads[b], heard, b % 4, 4
                )
                start = live.chains[0].start if live.chains else b
                flags = np.ones(b + 1 - start)
                flags[-1] = heard
                want, want_member = follower.follow(
                    whole[start : b + 1], heads[start : b + 1], flags, pos[start : b + 1],
                    per_bar[start : b + 1],
                )  # fmt: skip
                assert got == want, (restart, b, heard)
                np.testing.assert_allclose(member, want_member, atol=1e-5)
            live.commit(b, whole[b - 1] if b else np.zeros(12), heads[b], b % 4, 4)
        # the state restarted: its memory is restart..2*restart beats
        assert restart == 64 or restart <= n - live.chains[0].start < 2 * restart
    # a note struck just after a beat already in the state reads it from the beat before
    again, _ = live.decide(n - 1, whole[n - 2], heads[n - 1], True, (n - 1) % 4, 4)
    start = live.chains[0].start
    flags = np.ones(n - start)
    assert (
        again
        == follower.follow(whole[start:], heads[start:], flags, pos[start:], per_bar[start:])[0]
    )
