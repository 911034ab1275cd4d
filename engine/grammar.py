"""The token grammar as a state machine over B rows: phases, transitions, mask assembly.

Where a row stands (phase, infill section, sounding notes, token time) decides which token
families may come next (docs/tokens.md). The rules sit in one table, `RULES`: for each family,
the phases it may come in and the phase it leads to. The transitions (`advance`, `advance_one`)
and the mask assembly (`assemble`, `assemble_one`) read it; only the families with more to
them than a row of the table (PART in infill targets, the specials) are written out.

Adding a token family: its ids in `family_ids`, a `Rule`, its candidate set in `Candidates`
(and in `family_candidates` / `one_candidates`), and the type in `TokenType`. The harmony
families (BAR/BEAT, CHORD) are events like any other, allowed at a boundary, leaving the row
there; they exist only in vocabularies with `harmony`. The instrumentation header (HEADER ...
HEADER_END) is only ever given in a prompt, never sampled: its tokens move the row through
the HEADER phase, where PART and PROGRAM name parts without starting events.

User constraints (improv.engine.constraints) only remove candidates; `ConstraintSet`
(improv.engine.constraint_set) combines them with this grammar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .tokenizer.vocab import TokenType, Vocab

NO_LIMIT = np.iinfo(np.int64).max // 4  # "no time limit"; /4 so tick + shift never overflows


class Phase(IntEnum):
    """Where a row stands in the grammar: which token family may come next."""

    START = 0  # expect BOS
    TASK = 1  # expect a TASK token
    TARGETS_FIRST = 2  # infill: expect the first target PART
    TARGETS = 3  # infill: more target PARTs, or the prefix begins
    BODY = 4  # any event; an event boundary (insertion of forced events is safe here)
    AFTER_PART = 5  # expect PROGRAM
    AFTER_VEL = 6  # expect ON
    DONE = 7  # after EOS / FILL_END
    HEADER = 8  # inside an instrumentation header (given, never sampled)


class Section(IntEnum):
    """Infill sections; continuation and accompaniment stay in NONE."""

    NONE = 0
    PREFIX = 1
    SUFFIX = 2
    MIDDLE = 3


# Plain ints for the single-row hot path (IntEnum attribute lookups cost microseconds).
_START, _TASK, _TARGETS_FIRST, _TARGETS, _BODY, _AFTER_PART, _AFTER_VEL, _DONE, _HEADER = range(9)
_NONE = int(Section.NONE)
BOUNDARY = (Phase.BODY, Phase.TARGETS)  # event boundaries: an event may start here


@dataclass(frozen=True)
class Rule:
    """A token family's place in the grammar."""

    at: tuple[Phase, ...]  # the phases it may come in
    then: Phase  # the phase after it


# The grammar of the event families (the specials are written out in `advance`/`assemble`).
# PART in infill targets (TARGETS_FIRST/TARGETS) is the one exception to its row.
RULES: dict[TokenType, Rule] = {
    TokenType.TIME: Rule(BOUNDARY, Phase.BODY),
    TokenType.PART: Rule((Phase.BODY,), Phase.AFTER_PART),
    TokenType.PROGRAM: Rule((Phase.AFTER_PART,), Phase.BODY),
    TokenType.VELOCITY: Rule(BOUNDARY, Phase.AFTER_VEL),
    TokenType.NOTE_ON: Rule((Phase.AFTER_VEL,), Phase.BODY),
    TokenType.NOTE_OFF: Rule((Phase.BODY,), Phase.BODY),
    TokenType.METER: Rule(BOUNDARY, Phase.BODY),
    TokenType.CHORD: Rule(BOUNDARY, Phase.BODY),
}


def family_ids(vocab: Vocab) -> dict[TokenType, slice]:
    """The ids of each event family (a contiguous range; OFF is not assumed to be the last)."""
    v = vocab
    ids = {
        TokenType.TIME: slice(v.shift_base, v.part_base),
        TokenType.PART: slice(v.part_base, v.program_base),
        TokenType.PROGRAM: slice(v.program_base, v.vel_base),
        TokenType.VELOCITY: slice(v.vel_base, v.on_base),
        TokenType.NOTE_ON: slice(v.on_base, v.off_base),
        TokenType.NOTE_OFF: slice(v.off_base, v.off_base + 128 * v.n_parts),
    }
    if v.harmony:
        ids[TokenType.METER] = slice(v.BAR, v.BEAT + 1)
        ids[TokenType.CHORD] = slice(v.chord_base, v.HEADER)
    return ids


def family_at(ty: TokenType, phase: int) -> bool:
    return ty in RULES and phase in RULES[ty].at


@dataclass
class Candidates:
    """Per-row candidate sets, before the grammar assembles the mask. Constraints AND into them."""

    on_ok: np.ndarray  # (B, P, 128) bool: ON(p, k) allowed if a VEL precedes it
    off_ok: np.ndarray  # (B, P, 128) bool: OFF(p, k) allowed
    program_ok: np.ndarray  # (B, P, 128) bool: PROGRAM x allowed right after PART p
    part_ok: np.ndarray  # (B, P) bool: PART p allowed (also needs some program_ok[p])
    time_ok: np.ndarray  # (B, T) bool: the T time tokens, SHIFT_1.. then LONG_1..
    end_ok: np.ndarray  # (B,) bool: EOS, or the infill section's closing token
    # (B,) int64: the latest tick time may reach (NO_LIMIT: none). Constraints lower it instead of
    # masking time tokens, so the set can clip a sampled shift rather than bias the draw.
    ceiling: np.ndarray
    wait_ceiling: np.ndarray | None = None  # (B,) the same without passable limits
    # (B, 2) BAR, BEAT allowed; (B, C) CHORD(index) allowed (harmony vocabularies). Off where
    # the beats or chords are given: the model hears them, it does not write its own.
    meter_ok: np.ndarray | None = None
    chord_ok: np.ndarray | None = None


class GrammarState:
    """Per-row grammar state (vectorized over B rows). Read-only for constraints."""

    _fields = (
        "phase",
        "task",
        "section",
        "last_part",
        "n_targets",
        "tick",
        "sounding",
        "saved_sounding",
        "saved_tick",
    )

    def __init__(self, vocab: Vocab, n_rows: int) -> None:
        b, p = n_rows, vocab.n_parts
        self.phase = np.full(b, Phase.START, dtype=np.int8)  # (B,)
        self.task = np.full(b, -1, dtype=np.int16)  # (B,) TASK token id, -1 before it
        self.section = np.zeros(b, dtype=np.int8)  # (B,) Section
        self.last_part = np.zeros(b, dtype=np.int16)  # (B,) part of the latest PART token
        self.n_targets = np.zeros(b, dtype=np.int16)  # (B,) infill target PARTs so far
        self.tick = np.zeros(b, dtype=np.int64)  # (B,) token time, ticks since the section start
        self.sounding = np.zeros((b, p, 128), dtype=bool)  # (B, P, 128) notes on, drums never
        self.saved_sounding = np.zeros((b, p, 128), dtype=bool)  # prefix state at FILL_SUFFIX
        self.saved_tick = np.zeros(b, dtype=np.int64)

    def get_state(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).copy() for k in self._fields}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        for k in self._fields:
            getattr(self, k)[...] = state[k]


class Tables:
    """Per-vocabulary lookup tables of the grammar (built once per ConstraintSet)."""

    def __init__(self, vocab: Vocab) -> None:
        v = self.vocab = vocab
        self.ids = family_ids(v)
        self.type_table = np.array([v.type_of(t) for t in range(v.size)], dtype=np.int8)  # (V,)
        self.ticks_table = v.ticks_table  # (V,)
        self.time_ticks = self.ticks_table[self.ids[TokenType.TIME]]  # (T,)
        self.type_list = [TokenType(x) for x in self.type_table.tolist()]
        self.ticks_list = self.ticks_table.tolist()
        self.n_time = self.time_ticks.shape[0]
        self.drums_mask = np.zeros(v.n_parts, dtype=bool)  # (P,)
        self.drums_mask[v.drums] = True
        self.end_by_section = np.array(
            [v.EOS, v.FILL_SUFFIX, v.FILL_MIDDLE, v.FILL_END], dtype=np.int64
        )  # (4,) the closing token of each Section
        # (8 phases,) the phase after each event family, as plain ints (hot path)
        self.rules = {ty: r for ty, r in RULES.items() if ty in self.ids}  # this vocab's
        self.then = {ty: int(r.then) for ty, r in self.rules.items()}
        self.at_phase = [
            [ty for ty, r in self.rules.items() if ph in r.at] for ph in range(len(Phase))
        ]  # the event families allowed in each phase


# --- transitions -----------------------------------------------------------------------------------
def advance(s: GrammarState, tok: np.ndarray, t: Tables) -> None:
    """The grammar's transition for one token per row (vectorized, in place).

    Lenient: a token the grammar would not allow still moves the state the natural way (given
    tokens are observed, not masked).
    """
    v = t.vocab
    ty = t.type_table[tok]  # (B,)
    ph = s.phase

    # Specials.
    ph[tok == v.BOS] = Phase.TASK
    task = (tok >= v.TASK_CONTINUE) & (tok <= v.TASK_INFILL)
    if task.any():
        s.task[task] = tok[task]
        inf = task & (tok == v.TASK_INFILL)
        ph[task & ~inf] = Phase.BODY
        ph[inf] = Phase.TARGETS_FIRST
        s.section[inf] = Section.PREFIX
        s.n_targets[inf] = 0
    fs = tok == v.FILL_SUFFIX
    if fs.any():
        s.saved_sounding[fs] = s.sounding[fs]
        s.saved_tick[fs] = s.tick[fs]
        s.sounding[fs] = False
        s.tick[fs] = 0  # the suffix is timed from the gap's end
        s.section[fs] = Section.SUFFIX
        ph[fs] = Phase.BODY
    fm = tok == v.FILL_MIDDLE
    if fm.any():
        s.sounding[fm] = s.saved_sounding[fm]  # the middle continues from the gap's start
        s.tick[fm] = s.saved_tick[fm]
        s.section[fm] = Section.MIDDLE
        ph[fm] = Phase.BODY
    ph[(tok == v.EOS) | (tok == v.FILL_END)] = Phase.DONE
    head = ty == TokenType.HEADER
    in_header = (ph == Phase.HEADER) & ~head  # PART/PROGRAM named in a header start nothing
    if head.any():
        ph[head & (tok == v.HEADER)] = Phase.HEADER
        ph[head & (tok != v.HEADER)] = Phase.BODY

    s.tick += t.ticks_table[tok]

    # PART: in infill targets it counts a target; a PROGRAM after targets shows the last PART
    # began the prefix.
    is_part = ty == TokenType.PART
    in_targets = is_part & ((ph == Phase.TARGETS_FIRST) | (ph == Phase.TARGETS))
    if is_part.any():
        s.n_targets[in_targets] += 1
        s.last_part[is_part] = tok[is_part] - v.part_base
    is_prog = ty == TokenType.PROGRAM
    if is_prog.any():
        s.n_targets[is_prog & (ph == Phase.TARGETS)] -= 1

    is_on = ty == TokenType.NOTE_ON
    is_off = ty == TokenType.NOTE_OFF
    if is_on.any() or is_off.any():
        note = np.where(is_on, tok - v.on_base, tok - v.off_base)  # (B,) part*128 + pitch
        part, pitch = note // 128, note % 128
        r_on = np.nonzero(is_on & ~t.drums_mask[np.clip(part, 0, v.n_parts - 1)])[0]
        s.sounding[r_on, part[r_on], pitch[r_on]] = True
        r_off = np.nonzero(is_off)[0]
        s.sounding[r_off, part[r_off], pitch[r_off]] = False

    for fam, rule in t.rules.items():  # the phase after each event family
        ph[ty == fam] = rule.then
    ph[in_targets] = Phase.TARGETS
    ph[in_header] = Phase.HEADER


def advance_one(s: GrammarState, tok: int, t: Tables) -> None:
    """`advance` for a single row with plain ints (the live sessions' hot path; equivalence
    with `advance` is tested)."""
    v = t.vocab
    ty = t.type_list[tok]
    if ty == TokenType.SPECIAL or ty == TokenType.HEADER:
        if tok != v.PAD:  # the specials are rare: the vectorized transition
            advance(s, np.array([tok]), t)
        return
    ph = int(s.phase[0])
    if ph == _HEADER:  # PART/PROGRAM inside a header: only a PART is remembered
        if ty == TokenType.PART:
            s.last_part[0] = tok - v.part_base
        return
    if ty == TokenType.TIME:
        s.tick[0] += t.ticks_list[tok]
    elif ty == TokenType.NOTE_ON or ty == TokenType.NOTE_OFF:
        on = ty == TokenType.NOTE_ON
        p, k = divmod(tok - (v.on_base if on else v.off_base), 128)
        if not (on and p == v.drums):
            s.sounding[0, p, k] = on
    elif ty == TokenType.PART:
        s.last_part[0] = tok - v.part_base
        if ph == _TARGETS_FIRST or ph == _TARGETS:
            s.n_targets[0] += 1
            s.phase[0] = _TARGETS
            return
    elif ty == TokenType.PROGRAM and ph == _TARGETS:
        s.n_targets[0] -= 1  # the last PART began the prefix
    s.phase[0] = t.then[ty]


# --- mask assembly -------------------------------------------------------------------------------
def family_candidates(cand: Candidates, s: GrammarState) -> dict[TokenType, np.ndarray]:
    """(B, n) per event family: which of its ids each row's candidates allow, with the pair
    closure (PART p needs some PROGRAM for p; VEL needs some ON); (B, 1) broadcasts."""
    b = cand.on_ok.shape[0]
    rows = np.arange(b)
    return {
        TokenType.TIME: cand.time_ok,
        TokenType.PART: cand.part_ok & cand.program_ok.any(axis=2),
        TokenType.PROGRAM: cand.program_ok[rows, s.last_part],
        TokenType.VELOCITY: cand.on_ok.reshape(b, -1).any(axis=1)[:, None],
        TokenType.NOTE_ON: cand.on_ok.reshape(b, -1),
        TokenType.NOTE_OFF: cand.off_ok.reshape(b, -1),
        TokenType.METER: _or_all(cand.meter_ok, b),
        TokenType.CHORD: _or_all(cand.chord_ok, b),
    }


def _or_all(ok: np.ndarray | None, b: int) -> np.ndarray:
    return np.ones((b, 1), dtype=bool) if ok is None else ok


def one_candidates(ty: TokenType, cand: Candidates, s: GrammarState) -> np.ndarray | bool:
    """`family_candidates` for row 0 and one family (the 1-row hot path)."""
    if ty == TokenType.TIME:
        return cand.time_ok[0]
    if ty == TokenType.PART:
        return cand.part_ok[0] & cand.program_ok[0].any(axis=1)
    if ty == TokenType.PROGRAM:
        return cand.program_ok[0, int(s.last_part[0])]
    if ty == TokenType.VELOCITY:
        return bool(cand.on_ok.any())
    if ty == TokenType.NOTE_ON:
        return cand.on_ok[0].reshape(-1)
    if ty == TokenType.NOTE_OFF:
        return cand.off_ok[0].reshape(-1)
    ok = cand.meter_ok if ty == TokenType.METER else cand.chord_ok
    return True if ok is None else ok[0]


def assemble(cand: Candidates, s: GrammarState, t: Tables) -> np.ndarray:
    """Candidates + phase -> (B, V) allowed, with the VEL->ON and PART->PROGRAM closure."""
    v = t.vocab
    b = cand.on_ok.shape[0]
    ph = s.phase
    mask = np.zeros((b, v.size), dtype=bool)  # (B, V)
    fam = family_candidates(cand, s)
    for ty, rule in t.rules.items():
        rows = np.isin(ph, rule.at)
        mask[rows, t.ids[ty]] = fam[ty][rows]

    # Infill sections must close in order, and infill never ends with EOS.
    infill = s.task == v.TASK_INFILL
    end_tok = t.end_by_section[s.section]  # (B,)
    end_ok = cand.end_ok & ((s.section != Section.NONE) | ~infill)
    targets = ph == Phase.TARGETS
    er = np.nonzero(((ph == Phase.BODY) | targets) & end_ok)[0]
    mask[er, end_tok[er]] = True

    # Infill targets: one PART token per target part (any part); the prefix may begin with
    # PART p PROGRAM x, so PROGRAM after a PART is allowed once another target is kept.
    tf = (ph == Phase.TARGETS_FIRST) | targets
    mask[tf, t.ids[TokenType.PART]] = True
    tp = np.nonzero(targets & (s.n_targets >= 2))[0]
    lp = s.last_part[tp]
    mask[tp, t.ids[TokenType.PROGRAM]] = cand.program_ok[tp, lp] & cand.part_ok[tp, lp][:, None]

    mask[ph == Phase.START, v.BOS] = True
    mask[ph == Phase.TASK, v.TASK_CONTINUE : v.TASK_INFILL + 1] = True
    done = ph == Phase.DONE
    mask[done, v.EOS] = True
    mask[done, v.PAD] = True
    return mask


def assemble_one(cand: Candidates, s: GrammarState, t: Tables) -> np.ndarray:
    """`assemble` for a single row, with plain ints and slices: the live sessions' hot path
    (one ConstraintSet per session), about 3x cheaper than the vectorized one. Equivalence
    with `assemble` is tested."""
    v = t.vocab
    ph = int(s.phase[0])
    mask = np.zeros((1, v.size), dtype=bool)  # (1, V)
    m = mask[0]
    for ty in t.at_phase[ph]:
        m[t.ids[ty]] = one_candidates(ty, cand, s)
    if ph == _BODY or ph == _TARGETS:
        section = int(s.section[0])
        if cand.end_ok[0] and (section != _NONE or int(s.task[0]) != v.TASK_INFILL):
            m[t.end_by_section[section]] = True
    if ph == _TARGETS or ph == _TARGETS_FIRST:
        m[t.ids[TokenType.PART]] = True
        if ph == _TARGETS and s.n_targets[0] >= 2:
            lp = int(s.last_part[0])
            m[t.ids[TokenType.PROGRAM]] = cand.program_ok[0, lp] & cand.part_ok[0, lp]
    elif ph == _START:
        m[v.BOS] = True
    elif ph == _TASK:
        m[v.TASK_CONTINUE : v.TASK_INFILL + 1] = True
    elif ph == _DONE:
        m[v.EOS] = m[v.PAD] = True
    return mask
