"""Offline generation with chords and beats: forced at their times, the model's own plan when
none are given, the instrumentation header, the output's chords."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from improv.engine.conditioning import Conditioning, ConditioningError
from improv.engine.engine import Engine
from improv.engine.generation import (
    ACCOMPANY_WAIT_TEMPERATURE,
    SchedulerSessions,
    eighth_cuts,
    execute,
    plan_accompany,
    plan_continue,
    plan_infill,
)
from improv.engine.live import SamplingParams
from improv.engine.tokenizer import Note, Notes
from improv.engine.tokenizer.harmony import CHORD, chord_label, parse_label
from improv.engine.tokenizer.vocab import TokenizerConfig

HARMONY = TokenizerConfig(harmony=True)


@pytest.fixture(scope="module")
def sessions(make_model):
    model = make_model(vocab_size=1771)
    with SchedulerSessions(Engine.from_model(model, HARMONY), max_sessions=2) as s:
        yield s


def _melody(seconds: float = 6.0) -> Notes:
    return Notes.from_list(
        [Note(0.5 * i, 0.5 * i + 0.4, 60 + i % 5, 90, 0, 0) for i in range(int(seconds * 2))]
    )


def _history(sessions, job) -> list[int]:
    """The tokens the engine session saw: run the job, then read them back."""
    seen: list[list[int]] = []
    orig = sessions.session

    def spy(*a, **k):
        cm = orig(*a, **k)

        class Wrap:
            async def __aenter__(self):
                self.s = await cm.__aenter__()
                return self.s

            async def __aexit__(self, *exc):
                seen.append(self.s.tokens())
                return await cm.__aexit__(*exc)

        return Wrap()

    sessions.session = spy
    try:
        asyncio.run(execute(sessions, job))
    finally:
        sessions.session = orig
    return seen[0]


def test_accompaniment_hears_the_given_chords_at_their_times(sessions) -> None:
    v = sessions.vocab
    cond = Conditioning.parse(chords="C Am F G", bpm=120, beats_per_bar=4, until=8.0)
    job = plan_accompany(
        sessions, _melody(), SamplingParams(seed=1), ["harmony", "bass"], cond=cond
    )
    assert job.request.prompt[2] == v.HEADER  # the parts asked for are named
    toks = _history(sessions, job)
    names = [v.name(t) for t in toks]
    chords = [n for n in names if n.startswith("CHORD_")]
    assert chords[:4] == ["CHORD_C:maj", "CHORD_A:min", "CHORD_F:maj", "CHORD_G:maj"]
    assert names.count("BAR") >= 3
    # the chords sit at their bars: tick of each CHORD
    tick, at = 0, []
    for t in toks:
        tick += v.shift_ticks(t)
        if v.type_of(t).name == "CHORD":
            at.append(tick)
    assert at[:4] == [0, 200, 400, 600]  # 2 s bars at 120 bpm, from the first note
    assert [chord_label(c) for c in job.chords().value[:2]] == ["C:maj", "A:min"]


def test_a_harmony_model_accompanies_as_a_continuation_with_decision_points(sessions) -> None:
    """The whole piece continued, the melody given and named in the header with the parts
    asked for; a forced event with no tokens at each eighth between the beats."""
    v = sessions.vocab
    cond = Conditioning.parse(bpm=120, beats_per_bar=4, until=8.0)  # beats every 50 ticks
    job = plan_accompany(sessions, _melody(), SamplingParams(seed=1), ["harmony"], cond=cond)
    req = job.request
    assert [v.name(t) for t in req.prompt] == [
        "BOS",
        "TASK_CONTINUE",
        "HEADER",
        "PART_lead",
        "PROGRAM_0",
        "PART_harmony",
        "HEADER_END",
    ]
    beats = [t for t, toks in req.forced if toks and toks[0] in (v.BAR, v.BEAT)]
    cuts = [t for t, toks in req.forced if not toks]
    assert beats[:3] == [0, 50, 100] and cuts[:3] == [25, 75, 125]
    assert len(cuts) == len(beats)  # one after each beat, the last's too (before the end)
    none = plan_accompany(
        sessions, _melody(), SamplingParams(seed=1), ["harmony"], cond=cond, eighths=False
    )
    assert all(toks for _, toks in none.request.forced)
    # the waits are tempered where the decision points are, unless the caller chose
    assert req.sampling.wait_temperature == ACCOMPANY_WAIT_TEMPERATURE
    assert none.request.sampling.wait_temperature is None
    own = SamplingParams(seed=1, wait_temperature=1.0)
    job_own = plan_accompany(sessions, _melody(), own, ["harmony"], cond=cond)
    assert job_own.request.sampling.wait_temperature == 1.0
    notes = asyncio.run(execute(sessions, job))
    assert (notes.part == v.part_index["harmony"]).any()


def test_eighth_cuts() -> None:
    assert eighth_cuts([0, 60, 120], 200) == [(30, ()), (90, ()), (150, ())]
    assert eighth_cuts([0, 60, 120], 150) == [(30, ()), (90, ())]
    assert eighth_cuts([0], 100) == [] and eighth_cuts([], 100) == []


def test_without_chords_the_model_writes_its_own_plan(sessions) -> None:
    cond = Conditioning.parse(bpm=120, until=8.0)  # beats only
    job = plan_continue(
        sessions, _melody(3.0), 4.0, SamplingParams(seed=3, temperature=1.5), cond=cond
    )
    notes = asyncio.run(execute(sessions, job))
    assert len(notes) >= len(_melody(3.0))
    own = job.chords()
    # random weights: whatever chords it wrote come back, in order, inside the continuation
    assert (own.kind == CHORD).all() and (np.diff(own.time) >= 0).all()


def test_infill_with_chords(sessions) -> None:
    song = _melody(8.0)
    cond = Conditioning.parse(chords="0 4 C:maj\n4 8 G:7\n", until=8.0)
    job = plan_infill(sessions, song, 2.0, 5.0, SamplingParams(seed=2), ["lead"], cond=cond)
    assert parse_label("G:7") in job.cond.chords.value
    toks = _history(sessions, job)
    assert sessions.vocab.chord(parse_label("G:7")) in toks


def test_notes_are_in_the_programs_asked_for_without_the_model_restating_them(sessions) -> None:
    """The header names the programs asked for; a note the model plays with no PROGRAM token of
    its own is in that program (it came out as 0: README's `programs={"bass": 33}`)."""
    v = sessions.vocab
    bass, lead = v.part_index["bass"], v.part_index["lead"]
    acc = plan_accompany(
        sessions, _melody(), SamplingParams(seed=1), ["harmony", "bass"], {"bass": 33}
    )
    cont = plan_continue(sessions, _melody(), 2.0, SamplingParams(seed=1), ["lead"], {"lead": 73})
    # (no beats: the accompaniment task, with the parts and programs asked for in its header)
    want = v.header([(v.part_index["harmony"], None), (bass, 33)])
    assert acc.request.prompt == [v.BOS, v.TASK_ACCOMPANY, *want]
    assert [e["program"] for e in acc.builder.feed(v.note_on(bass, 40), 5)] == [33]
    assert [e["program"] for e in cont.builder.feed(v.note_on(lead, 72), 5)] == [73]
    # a part with no program asked for: the model's choice, 0 until it names one
    harmony = v.part_index["harmony"]
    assert [e["program"] for e in acc.builder.feed(v.note_on(harmony, 60), 6)] == [0]


def test_bad_chords_and_beats_get_clear_errors() -> None:
    with pytest.raises(ConditioningError, match="chord chart"):
        Conditioning.parse(chords="C Am F G")  # no beats to lay it on
    with pytest.raises(ConditioningError, match="bpm must be in 20..400"):
        Conditioning.parse(bpm=1000)
    with pytest.raises(ConditioningError, match="not a chord"):
        Conditioning.parse(chords="C Hm", bpm=100)
    with pytest.raises(ConditioningError, match="chord line 1"):
        Conditioning.parse(chords="0.0 zz")


def test_without_chords_an_accompaniment_plays_the_chord_plan_of_the_melody(sessions) -> None:
    """Beats only, a melody that arpeggiates C, Am, F, G, a half bar each: the model's chords
    are the plan's (`chord_plan.plan_chords`, through `ChordsFitMelody`), changing where the
    melody does, though a random model left alone rarely would."""
    v = sessions.vocab
    arps = [(60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62)] * 2
    melody = Notes.from_list(
        [
            Note(1.0 * i + k / 3, 1.0 * i + (k + 1) / 3, p, 90, 0, 0)
            for i, arp in enumerate(arps)
            for k, p in enumerate(arp)
        ]
    )
    cond = Conditioning.parse(bpm=120, beats_per_bar=4, until=8.0)
    job = plan_accompany(
        sessions, melody, SamplingParams(seed=4, temperature=1.5), ["harmony"], cond=cond
    )
    toks = _history(sessions, job)
    tick, changes = 0, []
    for t in toks:
        tick += v.shift_ticks(t)
        label = chord_label(t - v.chord_base) if v.type_of(t).name == "CHORD" else None
        if label is not None and (not changes or changes[-1][1] != label):
            changes.append((tick, label))
    want = ["C:maj", "A:min", "F:maj", "G:maj"] * 2
    assert changes == [(100 * i, c) for i, c in enumerate(want)], changes
