"""Constraint masks: sampled tokens never break an active constraint, checked by an independent
reference checker (which is itself shown to catch violations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from improv.engine.constraint_set import ConstraintSet
from improv.engine.constraints import (
    BeatGrid,
    ChordTones,
    MaxDuration,
    NoteDensity,
    Parts,
    PitchRange,
    Programs,
    TimeLimit,
    accompaniment_parts,
)
from improv.engine.decoder import TorchDecoder
from improv.engine.grammar import Phase
from improv.engine.tokenizer.vocab import TokenizerConfig, TokenType, Vocab

V = Vocab(TokenizerConfig())


# --- an independent reference checker ----------------------------------------------------------
def reference_check(
    tokens: list[int],
    *,
    parts: set[int] | None = None,
    pitch: tuple[int, int] | None = None,
    density: tuple[int, int] | None = None,  # (max note-ons, window ticks)
    programs: dict[int, set[int]] | None = None,
    max_tick: int | None = None,
    allow_end: bool = True,
) -> tuple[int, str] | None:
    """(index, reason) of the first token that breaks the grammar or a rule, else None.

    Plain Python, written from docs/tokens.md, sharing no code with the masks.
    """
    expect = "BOS"
    task = None
    section = None  # infill: "prefix", "suffix", "middle"
    targets = 0
    sounding: set[tuple[int, int]] = set()
    saved: tuple[set[tuple[int, int]], int] = (set(), 0)
    tick = 0
    ons: list[int] = []
    last_part = -1
    for i, t in enumerate(tokens):
        ty = V.type_of(t)
        prev = expect
        if prev == "BOS":
            if t != V.BOS:
                return i, "first token must be BOS"
            expect = "TASK"
            continue
        if prev == "TASK":
            if ty is not TokenType.SPECIAL or not V.TASK_CONTINUE <= t <= V.TASK_INFILL:
                return i, "TASK must follow BOS"
            task = t
            expect = "TARGET1" if t == V.TASK_INFILL else "BODY"
            section = "prefix" if t == V.TASK_INFILL else None
            continue
        if prev == "DONE":
            if t not in (V.EOS, V.PAD):
                return i, "token after the end"
            continue
        if prev == "PROGRAM":
            if ty is not TokenType.PROGRAM:
                return i, "PART not followed by PROGRAM"
        if prev == "ON" and ty is not TokenType.NOTE_ON:
            return i, "VEL not followed by ON"
        if prev == "TARGET1" and ty is not TokenType.PART:
            return i, "infill needs a target PART first"
        if ty is TokenType.PROGRAM and prev != "PROGRAM":
            if prev == "TARGETS" and targets >= 2:
                targets -= 1  # the PART before began the prefix
            else:
                return i, "PROGRAM not after PART"
        if ty is TokenType.NOTE_ON and prev != "ON":
            return i, "ON not after VEL"
        # Token rules.
        if ty is TokenType.SPECIAL:
            if t in (V.BOS, V.PAD) or V.TASK_CONTINUE <= t <= V.TASK_INFILL:
                return i, "special token inside the body"
            if t == V.EOS:
                if task == V.TASK_INFILL or not allow_end:
                    return i, "EOS not allowed"
                expect = "DONE"
                continue
            order = {V.FILL_SUFFIX: "prefix", V.FILL_MIDDLE: "suffix", V.FILL_END: "middle"}
            if task != V.TASK_INFILL or order[t] != section or not allow_end:
                return i, "FILL token out of order"
            if t == V.FILL_SUFFIX:
                saved, sounding, tick, section = (set(sounding), tick), set(), 0, "suffix"
            elif t == V.FILL_MIDDLE:
                sounding, tick, section = set(saved[0]), saved[1], "middle"
            else:
                expect = "DONE"
                continue
            ons = []
            expect = "BODY"
        elif ty is TokenType.TIME:
            tick += V.shift_ticks(t)
            if max_tick is not None and tick > max_tick:
                return i, "time past the limit"
            expect = "BODY"
        elif ty is TokenType.PART:
            p = t - V.part_base
            if prev in ("TARGET1", "TARGETS"):
                targets += 1
                expect = "TARGETS"
            else:
                if parts is not None and p not in parts:
                    return i, "PART of a disallowed part"
                expect = "PROGRAM"
            last_part = p
        elif ty is TokenType.PROGRAM:
            if programs is not None and last_part in programs:
                if t - V.program_base not in programs[last_part]:
                    return i, "program not allowed"
            if parts is not None and last_part not in parts:
                return i, "PART of a disallowed part"
            expect = "BODY"
        elif ty is TokenType.VELOCITY:
            expect = "ON"
        elif ty is TokenType.NOTE_ON:
            p, k = V.note_of(t)
            if (p, k) in sounding:
                return i, "ON of a sounding note"
            if parts is not None and p not in parts:
                return i, "ON of a disallowed part"
            if pitch is not None and not pitch[0] <= k <= pitch[1]:
                return i, "pitch out of range"
            if density is not None:
                if sum(1 for x in ons if x > tick - density[1]) >= density[0]:
                    return i, "density exceeded"
                ons.append(tick)
            if p != V.drums:
                sounding.add((p, k))
            expect = "BODY"
        elif ty is TokenType.NOTE_OFF:
            p, k = V.note_of(t)
            if p == V.drums:
                return i, "OFF for drums"
            if (p, k) not in sounding:
                return i, "OFF of a silent note"
            if parts is not None and p not in parts:
                return i, "OFF of a disallowed part"
            sounding.discard((p, k))
            expect = "BODY"
    return None


LEAD, COUNTER, HARMONY, BASS, DRUMS = range(5)
ACC = {COUNTER, HARMONY, BASS, DRUMS}


def seq(*events: list[int]) -> list[int]:
    return [t for e in events for t in e]


def on(p: int, k: int, vel: int = 20) -> list[int]:
    return [V.velocity(vel), V.note_on(p, k)]


GOOD = seq(
    [V.BOS, V.TASK_ACCOMPANY, V.part(HARMONY), V.program(0)],
    on(HARMONY, 60),
    [V.shift(50)],
    on(DRUMS, 36),
    [V.note_off(HARMONY, 60), V.shift(10)],
)


@pytest.mark.parametrize(
    ("bad", "rules", "index", "reason"),
    [
        (GOOD[:2] + [V.program(3)], {}, 2, "PROGRAM not after PART"),
        (GOOD[:3] + [V.shift(1)], {}, 3, "PART not followed by PROGRAM"),
        (GOOD[:4] + [V.velocity(3), V.shift(1)], {}, 5, "VEL not followed by ON"),
        (GOOD[:4] + [V.note_on(HARMONY, 60)], {}, 4, "ON not after VEL"),
        (GOOD[:6] + on(HARMONY, 60), {}, 7, "ON of a sounding note"),
        (GOOD[:4] + [V.note_off(BASS, 40)], {}, 4, "OFF of a silent note"),
        (GOOD[:9] + [V.note_off(DRUMS, 36)], {}, 9, "OFF for drums"),
        (GOOD[:4] + on(LEAD, 70), {"parts": ACC}, 5, "ON of a disallowed part"),
        (GOOD[:4] + [V.part(LEAD)], {"parts": ACC}, 4, "PART of a disallowed part"),
        (GOOD, {"pitch": (61, 100)}, 5, "pitch out of range"),
        (GOOD, {"programs": {HARMONY: {1, 2}}}, 3, "program not allowed"),
        (GOOD, {"max_tick": 40}, 6, "time past the limit"),
        (GOOD[:6] + on(BASS, 40), {"density": (1, 100)}, 7, "density exceeded"),
        ([V.BOS, V.TASK_INFILL, V.shift(1)], {}, 2, "infill needs a target PART first"),
        ([V.BOS, V.TASK_INFILL, V.part(0), V.FILL_MIDDLE], {}, 3, "FILL token out of order"),
        (GOOD + [V.EOS], {"allow_end": False}, len(GOOD), "EOS not allowed"),
        ([V.TASK_CONTINUE], {}, 0, "first token must be BOS"),
    ],
)
def test_violations_are_caught_by_both_checkers(bad, rules, index, reason):
    assert reference_check(GOOD) is None
    assert reference_check(bad, **rules) == (index, reason)
    cs = ConstraintSet(V, _constraints(**rules), allow_end=rules.get("allow_end", True))
    # With the note budget used, the masks refuse the VEL already (no ON could follow it).
    assert cs.check(bad) == index - (reason == "density exceeded")


def _constraints(
    parts=None, pitch=None, density=None, programs=None, max_tick=None, allow_end=True
) -> list:
    out = []
    if parts is not None:
        out.append(Parts(parts))
    if pitch is not None:
        out.append(PitchRange(*pitch))
    if density is not None:
        out.append(NoteDensity(density[0], window_s=density[1] / V.ticks_per_second))
    if programs is not None:
        out.append(Programs(programs))
    if max_tick is not None:
        out.append(TimeLimit(max_tick))
    return out


def test_infill_layout_is_accepted():
    toks = seq(
        [V.BOS, V.TASK_INFILL, V.part(LEAD), V.part(LEAD), V.program(0)],
        on(LEAD, 60),
        [V.shift(40), V.note_off(LEAD, 60), V.FILL_SUFFIX, V.part(LEAD), V.program(0)],
        on(LEAD, 67),
        [V.shift(50), V.note_off(LEAD, 67), V.FILL_MIDDLE],
        on(LEAD, 62),
        [V.shift(50), V.note_off(LEAD, 62), V.FILL_END],
    )
    assert reference_check(toks) is None
    cs = ConstraintSet(V)
    assert cs.check(toks) is None
    assert cs.phase[0] == Phase.DONE


def test_vel_is_masked_when_no_note_on_can_follow():
    cs = ConstraintSet(V, [Parts(["bass"]), PitchRange(40, 40), NoteDensity(2)])
    cs.feed([V.BOS, V.TASK_CONTINUE, V.part(BASS), V.program(33)])
    assert cs.allowed()[0, V.velocity(5)]
    cs.feed(on(BASS, 40))  # the only allowed pitch now sounds
    m = cs.allowed()[0]
    assert not m[V.vel_base : V.on_base].any()
    assert m[V.note_off(BASS, 40)] and m[V.shift(1)]
    cs.feed([V.note_off(BASS, 40)] + on(BASS, 40) + [V.note_off(BASS, 40)])  # 2 ons: budget used
    assert not cs.allowed()[0, V.vel_base : V.on_base].any()
    cs.feed([V.shift(99)])
    assert not cs.allowed()[0, V.vel_base : V.on_base].any()  # both ons still in the window
    cs.feed([V.shift(1)])
    assert cs.allowed()[0, V.vel_base : V.on_base].all()  # the oldest left the window


def test_time_limit_stops_exactly_and_falls_back():
    cs = ConstraintSet(V, [TimeLimit(250), Parts(["bass"]), NoteDensity(0)], allow_end=False)
    cs.feed([V.BOS, V.TASK_CONTINUE, V.long(2)])
    m = cs.allowed()[0]
    assert m[V.shift(50)] and not m[V.shift(51)] and not m[V.long(1)]
    cs.feed([V.shift(50)])
    m = cs.allowed()[0]
    assert not m[V.shift_base : V.part_base].any()
    assert np.flatnonzero(m).tolist() == [V.part(BASS)]  # PART bass (then PROGRAM) remains
    # With no program allowed either, nothing remains: the fallback is the end token.
    cs2 = ConstraintSet(
        V, [TimeLimit(0), Parts(["bass"]), Programs({"bass": []}), NoteDensity(0)], allow_end=False
    )
    cs2.feed([V.BOS, V.TASK_CONTINUE])
    assert np.flatnonzero(cs2.allowed()[0]).tolist() == [V.EOS]
    cs2.replace(TimeLimit(None))
    m2 = cs2.allowed()[0]
    assert m2[V.shift(1)] and not m2[V.EOS]


def test_clip_time_shortens_a_shift_to_land_on_the_ceiling():
    """clip_time: overshooting shifts stay allowed (no probability moves to notes) and `clip`
    turns them into the time tokens that end exactly on the ceiling."""
    cs = ConstraintSet(V, [TimeLimit(250)], clip_time=True)
    cs.feed([V.BOS, V.TASK_CONTINUE])
    m = cs.allowed()[0]
    assert m[V.shift_base : V.part_base].all()
    assert cs.clip(V.shift(40)) == [V.shift(40)]  # fits: unchanged
    assert cs.clip(V.long(3)) == [V.long(2), V.shift(50)]  # 3 s -> exactly 2.5 s
    assert cs.clip(V.note_on(BASS, 40)) == [V.note_on(BASS, 40)]  # only time is clipped
    cs.feed([V.long(2)])
    cs.allowed()
    assert cs.clip(V.long(1)) == [V.shift(50)]
    cs.feed([V.shift(50)])
    assert not cs.allowed()[0, V.shift_base : V.part_base].any()  # at the ceiling: no time
    # Without clip_time the same limit masks what overshoots (and `clip` is the identity).
    strict = ConstraintSet(V, [TimeLimit(250)])
    strict.feed([V.BOS, V.TASK_CONTINUE, V.long(2)])
    m = strict.allowed()[0]
    assert m[V.shift(50)] and not m[V.shift(51)] and strict.clip(V.shift(99)) == [V.shift(99)]


def test_clip_time_max_duration_deadline():
    cs = ConstraintSet(V, [MaxDuration(1.0)], clip_time=True)
    cs.feed([V.BOS, V.TASK_CONTINUE, V.part(BASS), V.program(33), V.velocity(10)])
    cs.feed([V.note_on(BASS, 40), V.shift(30)])
    assert cs.allowed()[0, V.long(5)]
    assert cs.clip(V.long(5)) == [V.shift(70)]  # the note is due at 1 s
    cs.feed([V.shift(70)])
    m = cs.allowed()[0]
    assert not m[V.shift_base : V.part_base].any() and m[V.note_off(BASS, 40)]


def test_beat_grid_moves_a_shift_to_the_nearest_grid_point_then_the_ceiling_clips():
    grid = BeatGrid(12.5, origin_tick=3)  # 16ths at 120 bpm, the beat at 30 ms
    cs = ConstraintSet(V, [grid, TimeLimit(200)], clip_time=True)
    cs.feed([V.BOS, V.TASK_CONTINUE])
    cs.allowed()
    assert cs.clip(V.shift(4)) == [V.shift(3)]  # 4 -> the point at 3
    assert cs.clip(V.shift(3)) == [V.shift(3)]  # already on it: unchanged
    assert cs.clip(V.shift(2)) == [V.shift(3)]
    cs.feed([V.shift(3)])
    cs.allowed()
    assert cs.clip(V.shift(4)) == [V.shift(13)]  # never now: the next point (3 + 12.5 -> 16)
    assert cs.clip(V.shift(40)) == [V.shift(38)]  # 43 -> 3 + 3 x 12.5 = 40.5 -> 41 (rounded)
    assert cs.clip(V.long(3)) == [V.long(1), V.shift(97)]  # past the ceiling: ends on 200
    # A note sampled off the grid starts at the next point (time tokens first), unless the
    # caller says now is free (a player's event), or the ceiling comes first (then only time).
    assert cs.clip(V.velocity(9)) == [V.velocity(9)]  # at 3: on the grid
    cs.feed([V.shift(5)])  # at 8: off the grid (as after a request that stopped there)
    cs.allowed()
    assert cs.clip(V.velocity(9)) == [V.shift(8), V.velocity(9)]  # to 16
    assert cs.clip(V.velocity(9), onset_free=True) == [V.velocity(9)]
    cs.replace(TimeLimit(12))
    cs.allowed()
    assert cs.clip(V.velocity(9)) == [V.shift(4)]  # the ceiling (12) before the point (16)
    cs.replace(TimeLimit(8))
    cs.allowed()
    assert cs.clip(V.velocity(9)) == [V.velocity(9)]  # at the ceiling: it can't move
    cs.replace(TimeLimit(200))
    cs.allowed()
    cs.replace(BeatGrid(None))  # off: shifts are the model's own again
    assert cs.clip(V.shift(4)) == [V.shift(4)]
    with pytest.raises(ValueError, match="at least 1 tick"):
        BeatGrid(0.5)


def test_snapshot_restore_roundtrip():
    cs = ConstraintSet(V, [NoteDensity(3)])
    cs.feed(GOOD[:6])
    snap = cs.snapshot()
    before = cs.allowed().copy()
    cs.feed(GOOD[6:] + on(BASS, 50))
    assert not np.array_equal(cs.allowed(), before)
    cs.restore(snap)
    assert np.array_equal(cs.allowed(), before)


def _sample_rows(model, sets: list[tuple[ConstraintSet, list[int], dict]], steps: int, seed: int):
    """Sample `steps` tokens for every row of every set, masked; return rows' token lists."""
    n_rows = sum(cs.n_rows for cs, _, _ in sets)
    dec = TorchDecoder(model, max_batch=n_rows)
    gen = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    for cs, prompt, _ in sets:
        for r in range(cs.n_rows):
            cs.feed(prompt, row=r)
            rows.append(list(prompt))
    logits = dec.extend(list(range(n_rows)), rows)  # (B, V)
    for _ in range(steps):
        mask = torch.cat([cs.logit_mask() for cs, _, _ in sets])  # (B, V)
        probs = torch.softmax(logits * 3.0 + mask, dim=-1)  # sharpen: random weights are flat
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (B,)
        i = 0
        for cs, _, _ in sets:
            cs.observe(nxt[i : i + cs.n_rows])
            i += cs.n_rows
        for r, t in enumerate(nxt.tolist()):
            rows[r].append(t)
        logits = dec.extend(list(range(n_rows)), [[t] for t in nxt.tolist()])
    return rows


def test_ten_thousand_sampled_steps_never_violate(make_model):
    model = make_model(seed=3, max_seq_len=640)
    acc = {V.part_index[p] for p in accompaniment_parts(V)}
    rules_a = dict(
        parts=acc,
        pitch=(36, 84),
        density=(6, 100),
        programs={BASS: set(range(32, 40))},
        max_tick=60_000,
        allow_end=False,
    )
    rules_b = dict(density=(3, 50), max_tick=3_000)
    sets = [
        (ConstraintSet(V, _constraints(**rules_a), n_rows=6, allow_end=False), [V.BOS], rules_a),
        (ConstraintSet(V, _constraints(**rules_b), n_rows=4), [V.BOS, V.TASK_INFILL], rules_b),
        (ConstraintSet(V, [], n_rows=6), [V.BOS, V.TASK_CONTINUE], {}),
    ]
    steps = 10_000 // 16 + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: far faster on one thread of a busy shared CPU
    try:
        rows = _sample_rows(model, sets, steps, seed=0)
    finally:
        torch.set_num_threads(threads)
    r = 0
    kinds: set[TokenType] = set()
    for cs, _, rules in sets:
        for _ in range(cs.n_rows):
            assert reference_check(rows[r], **rules) is None, (r, [V.name(t) for t in rows[r]])
            kinds |= {V.type_of(t) for t in rows[r]}
            r += 1
    assert len(rows) * steps >= 10_000
    assert kinds == {V.type_of(t) for t in range(V.size)}  # every token family was exercised


def test_unmasked_sampling_would_fail_the_checker(make_model):
    """The same loop without masks breaks the grammar at once: the test above can fail."""
    model = make_model(seed=3)
    sets = [(ConstraintSet(V, [], n_rows=4), [V.BOS, V.TASK_CONTINUE], {})]

    class NoMask(ConstraintSet):
        def logit_mask(self, device="cpu", dtype=torch.float32):
            return torch.zeros(self.n_rows, self.vocab.size, dtype=dtype)

    nm = NoMask(V, [], n_rows=4)
    sets = [(nm, [V.BOS, V.TASK_CONTINUE], {})]
    rows = _sample_rows(model, sets, 40, seed=0)
    assert all(reference_check(r) is not None for r in rows)


@pytest.mark.parametrize(
    ("constraints", "prompt"),
    [
        ([Parts(["bass", "drums"]), NoteDensity(4), TimeLimit(2_000)], [V.BOS]),
        ([PitchRange(50, 70), Programs({"harmony": [0, 1]})], [V.BOS, V.TASK_INFILL]),
        (
            [
                MaxDuration(0.2, parts=["harmony", "bass"]),
                Parts(["harmony", "bass"]),
                NoteDensity(8),
            ],
            [V.BOS, V.TASK_ACCOMPANY],
        ),
    ],
)
def test_single_row_path_equals_vectorized(constraints, prompt):
    """A 1-row ConstraintSet (the live sessions' fast path) gives the masks of the B-row one."""
    rng = np.random.default_rng(0)
    rows, steps = 4, 300
    batch = ConstraintSet(V, constraints, n_rows=rows)
    singles = [ConstraintSet(V, constraints) for _ in range(rows)]
    for r in range(rows):
        batch.feed(prompt, row=r)
        singles[r].feed(prompt)
    for _ in range(steps):
        m = batch.allowed()  # (B, V)
        for r in range(rows):
            assert np.array_equal(singles[r].allowed()[0], m[r])
        nxt = np.array([rng.choice(np.flatnonzero(m[r])) for r in range(rows)])
        batch.observe(nxt)
        for r in range(rows):
            singles[r].observe([nxt[r]])
    assert np.array_equal(batch.tick, np.concatenate([s.tick for s in singles]))


def test_specs_pickle_to_equal_specs():
    """Specs cross to the server's live worker process pickled (Programs keeps a read-only
    view of its mapping, which does not pickle by itself)."""
    import pickle

    specs = [
        Parts(["bass", "harmony"]),
        Programs({"bass": [32, 33], "harmony": range(0, 8)}),
        PitchRange(30, 90, parts=["harmony"]),
        NoteDensity(8.0, parts=["bass"]),
        MaxDuration(8.0, ["bass"]),
        BeatGrid(12.5, 7.0),
        TimeLimit(480),
        ChordTones(hedges=((96, 3, 0b10001), (48, 3, 0b1))),
    ]
    for spec in specs:
        back = pickle.loads(pickle.dumps(spec))
        assert back == spec and type(back) is type(spec)
    assert dict(pickle.loads(pickle.dumps(specs[1])).programs) == {
        "bass": (32, 33),
        "harmony": tuple(range(8)),
    }
