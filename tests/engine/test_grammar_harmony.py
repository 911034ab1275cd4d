"""The grammar with harmony tokens: beats and chords at event boundaries, the header given in
prompts and never sampled, and GivenMarks keeping the model from writing its own."""

from __future__ import annotations

import numpy as np
import pytest

from improv.engine.constraint_set import ConstraintSet
from improv.engine.constraints import GivenMarks, Parts
from improv.engine.grammar import Phase
from improv.engine.tokenizer.harmony import parse_label
from improv.engine.tokenizer.vocab import TokenizerConfig, TokenType, Vocab

V = Vocab(TokenizerConfig(harmony=True))
LEAD, HARMONY, BASS = 0, 2, 3
AM = V.chord(parse_label("A:min"))


def _header() -> list[int]:
    return [V.HEADER, V.part(HARMONY), V.program(0), V.part(BASS), V.HEADER_END]


def test_header_then_marks_then_notes() -> None:
    cs = ConstraintSet(V)
    toks = [V.BOS, V.TASK_ACCOMPANY, *_header(), V.BAR, AM, V.velocity(20), V.note_on(HARMONY, 57)]
    toks += [V.shift(50), V.BEAT, V.note_off(HARMONY, 57)]
    assert cs.check(toks) is None
    assert cs.phase[0] == Phase.BODY
    # the header named PART_bass without a PROGRAM: that started no event
    assert cs.state.sounding[0, HARMONY].sum() == 0


def test_marks_only_at_event_boundaries_and_the_header_never_sampled() -> None:
    cs = ConstraintSet(V)
    cs.feed([V.BOS, V.TASK_CONTINUE])
    m = cs.allowed()[0]
    assert m[V.BAR] and m[V.BEAT] and m[AM] and m[V.chord(0)]
    assert not m[V.HEADER] and not m[V.HEADER_END]
    cs.feed([V.velocity(10)])  # between VEL and ON: no mark may cut in
    m = cs.allowed()[0]
    assert not m[V.BAR] and not m[AM] and m[V.note_on(LEAD, 60)]
    cs.feed([V.note_on(LEAD, 60), V.part(HARMONY)])  # between PART and PROGRAM: neither
    assert not cs.allowed()[0, V.BEAT]


def test_given_marks_keep_the_model_from_writing_its_own() -> None:
    for beats, chords in ((True, False), (False, True), (True, True)):
        cs = ConstraintSet(V, [GivenMarks(beats=beats, chords=chords), Parts(["harmony"])])
        cs.feed([V.BOS, V.TASK_ACCOMPANY])
        m = cs.allowed()[0]
        assert m[V.BAR] != beats and m[V.BEAT] != beats
        assert m[AM] != chords
        # given marks are observed all the same (forced tokens are fed, not sampled)
        cs.feed([V.BAR, AM, V.shift(10)])
        assert cs.phase[0] == Phase.BODY and cs.tick[0] == 10


def test_an_older_vocabulary_has_no_harmony_families() -> None:
    old = Vocab(TokenizerConfig())
    cs = ConstraintSet(old, [GivenMarks()])
    cs.feed([old.BOS, old.TASK_CONTINUE])
    assert cs.allowed().shape == (1, old.size)


@pytest.mark.parametrize("prompt", [[V.BOS, V.TASK_CONTINUE], [V.BOS, V.TASK_ACCOMPANY]])
def test_single_row_path_equals_vectorized_with_marks(prompt: list[int]) -> None:
    rng = np.random.default_rng(0)
    rows = 3
    batch = ConstraintSet(V, [Parts(["harmony", "bass"])], n_rows=rows)
    singles = [ConstraintSet(V, [Parts(["harmony", "bass"])]) for _ in range(rows)]
    for r in range(rows):
        batch.feed(prompt + _header(), row=r)
        singles[r].feed(prompt + _header())
    seen: set[TokenType] = set()
    for _ in range(300):
        m = batch.allowed()
        for r in range(rows):
            assert np.array_equal(singles[r].allowed()[0], m[r])
        nxt = np.array([rng.choice(np.flatnonzero(m[r])) for r in range(rows)])
        seen |= {V.type_of(int(t)) for t in nxt}
        batch.observe(nxt)
        for r in range(rows):
            singles[r].observe([nxt[r]])
    assert {TokenType.METER, TokenType.CHORD} <= seen


def test_the_context_slide_keeps_the_header_and_restates_the_chord() -> None:
    from improv.engine.context import slide_context

    ctx = [V.BOS, V.TASK_ACCOMPANY, *_header(), V.BAR, AM]
    for k in range(40):
        ctx += [V.velocity(20), V.note_on(HARMONY, 57 + k % 3), V.shift(10)]
        ctx += [V.note_off(HARMONY, 57 + k % 3), V.BEAT]
    out = slide_context(ctx, V, 60)
    assert len(out) <= 60
    assert out[: 2 + len(_header())] == ctx[: 2 + len(_header())]
    assert AM in out[2 + len(_header()) :]  # the sounding chord, though its change was cut
    assert ConstraintSet(V).check(out) is None


def test_chord_tones_keep_harmony_and_bass_in_the_sounding_chord() -> None:
    from improv.engine.constraints import ChordTones

    cs = ConstraintSet(V, [ChordTones()])
    cs.feed([V.BOS, V.TASK_ACCOMPANY, V.velocity(20)])
    assert cs.allowed()[0, V.note_on(HARMONY, 61)]  # no chord yet: anything
    cs.feed([V.note_on(HARMONY, 61), AM, V.velocity(20)])
    m = cs.allowed()[0]
    a_minor = {9, 0, 4}
    for pitch in range(40, 80):
        assert m[V.note_on(HARMONY, pitch)] == (pitch % 12 in a_minor)
        assert m[V.note_on(BASS, pitch)] == (pitch % 12 in a_minor)
        assert m[V.note_on(LEAD, pitch)]  # the lead (and counter) keep their passing tones
    cs.feed([V.note_on(HARMONY, 57), V.chord(0), V.velocity(20)])  # CHORD_N: free again
    assert cs.allowed()[0, V.note_on(HARMONY, 62)]
    snap = cs.snapshot()
    cs.feed([V.chord(parse_label("C:maj")), V.velocity(20)])
    assert not cs.allowed()[0, V.note_on(HARMONY, 57)]  # A is not in C major
    cs.restore(snap)  # rollback restores the sounding chord
    assert cs.allowed()[0, V.note_on(HARMONY, 62)]


def test_a_hedged_chord_keeps_harmony_to_the_tones_its_reader_is_sure_of() -> None:
    """`ChordTones.hedges` (a chord read live from the melody): from its tick, while its chord
    sounds, only the tones it names; before it, or under another chord, the whole chord."""
    from improv.engine.chord_planner import confident_tones
    from improv.engine.constraints import ChordTones

    am, c_maj = parse_label("A:min"), parse_label("C:maj")
    member = np.zeros(12)
    member[[9, 4]] = 0.9  # sure of A and E, not of C
    bits = confident_tones(member, am, 0.5)
    assert bits == (1 << 9) | (1 << 4)
    assert confident_tones(np.zeros(12), am, 0.5).bit_count() == 1  # always the likeliest

    def on(cs: ConstraintSet) -> set[int]:
        m = cs.allowed()[0]
        return {p % 12 for p in range(40, 80) if m[V.note_on(HARMONY, p)]}

    cs = ConstraintSet(V, [ChordTones()])
    cs.feed([V.BOS, V.TASK_ACCOMPANY, AM, V.velocity(20)])
    cs.replace(ChordTones(hedges=((48, am, bits), (96, c_maj, 1 << 0))))  # a later one: C
    assert on(cs) == {9, 0, 4}  # tick 0: not yet
    cs.feed([V.shift(48), V.velocity(20)])
    assert on(cs) == {9, 4}  # sure of A and E only; the sounding chord (A minor) is kept
    cs.feed([V.shift(48), V.velocity(20)])
    assert on(cs) == {9, 0, 4}  # the hedge from tick 96 is for C major: the whole A minor
    cs.feed([V.chord(c_maj), V.velocity(20)])
    assert on(cs) == {0}
    assert ChordTones(hedges=((5, am, 1), (5, am, 2))).hedges == ((5, am, 2),)  # the last wins


def test_the_models_own_chords_change_on_strong_beats() -> None:
    from improv.engine.constraints import ChordsOnBeats

    cs = ConstraintSet(V, [ChordsOnBeats()])
    cs.feed([V.BOS, V.TASK_ACCOMPANY])
    assert cs.allowed()[0, AM]  # no beat heard yet: free
    cs.feed([V.BAR])
    assert cs.allowed()[0, AM]  # on the downbeat
    cs.feed([AM])
    assert not cs.allowed()[0, V.chord(parse_label("F:maj"))]  # once a beat
    cs.feed([V.shift(10)])
    assert not cs.allowed()[0, AM]  # off the beat
    cs.feed([V.shift(40), V.BEAT])
    assert not cs.allowed()[0, AM]  # beat 2: weak
    cs.feed([V.shift(50), V.BEAT])
    assert cs.allowed()[0, AM]  # beat 3: strong


def test_a_silent_part_asked_for_plays_at_the_next_downbeat() -> None:
    from improv.engine.constraints import StartParts

    cs = ConstraintSet(V, [StartParts(("harmony", "bass"), after_ticks=100)])
    cs.feed([V.BOS, V.TASK_ACCOMPANY, V.BAR, V.velocity(20), V.note_on(HARMONY, 60)])
    assert cs.allowed()[0, V.shift(50)]  # not due yet
    cs.feed([V.shift(100)])
    assert cs.allowed()[0, V.shift(1)]  # due, but between downbeats: time may pass
    cs.feed([V.velocity(20), V.note_on(HARMONY, 62), V.shift(20), V.BAR])  # harmony plays on
    m = cs.allowed()[0]
    assert not m[V.shift_base : V.long_base].any()  # at the downbeat: a note first
    cs.feed([V.velocity(20)])
    m = cs.allowed()[0]
    assert m[V.note_on(BASS, 40)] and not m[V.note_on(HARMONY, 64)]  # of the silent part
    cs.feed([V.note_on(BASS, 40)])
    assert cs.allowed()[0, V.shift(1)]  # it plays: time goes on
