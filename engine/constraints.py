"""Logit masks from the token grammar and from user constraints, with per-row state.

A `ConstraintSet` tracks, for each of B rows, where the row stands in the grammar of
docs/tokens.md (phase, sounding notes, token time) and combines any number of user constraints
into one boolean "allowed" mask, or one additive logit mask, per decode step:

    cs = ConstraintSet(vocab, [Parts(accompaniment_parts(vocab)), NoteDensity(8.0)], n_rows=4)
    cs.feed(prompt_tokens, row=0)          # prompt / player tokens: observed, never masked
    mask = cs.logit_mask()                  # (B, V) float, 0 or -inf
    ...sample next (B,) tokens with the mask added to the logits...
    cs.observe(next_tokens)                 # advance every row by one token

How constraints compose: the grammar builds, per row, candidate sets for each token family
(note-ons, note-offs, programs per part, time tokens, part tokens, end tokens); each user
constraint only *removes* candidates; the grammar then closes the pairs, so `VEL` is allowed only
if some `ON` is still allowed, and `PART p` only if some `PROGRAM` is allowed for p. That closure
is what keeps a row from ever reaching a state with nothing to sample. If a row still has nothing
allowed (e.g. a time limit reached with no note allowed), it falls back to `SHIFT_1` when the hard
constraints allow it, else to the end token of its section.

Time limits (a forced event ahead, the end of a request, a note's longest duration) are
*ceilings*, not masks. Masking the time tokens that overshoot a ceiling would hand their
probability to note events: a model that wants to wait 2 s before a melody note 200 ms away
would be pushed into playing something. With `clip_time=True` such tokens stay allowed and the
caller passes each sampled token through `clip`, which shortens an overshooting shift to land
exactly on the ceiling: "wait past the melody note" becomes "wait until the melody note", the
same draw with the same probability. The live sessions sample that way. Without it (the
default, for loops that cannot substitute tokens) overshooting time tokens are masked.

State lives in small numpy arrays (B rows), updated and masked with vectorized ops: a mask for 64
rows costs tens of microseconds (benchmarks/bench_sessions.py prints the figure), far below a
decode step. Constraints are specs: a `ConstraintSet` deep-copies the ones it is given, so one
list can configure many sessions.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from .tokenizer.vocab import TokenType, Vocab

logger = logging.getLogger(__name__)

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


class Section(IntEnum):
    """Infill sections; continuation and accompaniment stay in NONE."""

    NONE = 0
    PREFIX = 1
    SUFFIX = 2
    MIDDLE = 3


# Plain ints for the single-row hot path (IntEnum attribute lookups cost microseconds).
_START, _TASK, _TARGETS_FIRST, _TARGETS, _BODY, _AFTER_PART, _AFTER_VEL = range(7)
_NONE = int(Section.NONE)


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
    wait_ceiling: np.ndarray | None = None  # (B,) the same without passable TimeLimits


class GrammarState:
    """Per-row grammar state (vectorized over B rows). Read-only for constraints."""

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

    def get_state(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).copy() for k in self._fields}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        for k in self._fields:
            getattr(self, k)[...] = state[k]


class Constraint:
    """A user constraint: removes candidates; sees every token (sampled or given).

    Subclasses override `restrict` and, if they keep per-row state, `bind`, `observe` and
    `_state_fields` (names of numpy attributes copied by snapshots).
    """

    hard: bool = False  # hard constraints still apply when a row falls back (time limits)
    _state_fields: tuple[str, ...] = ()

    def bind(self, vocab: Vocab, n_rows: int) -> None:
        """Allocate per-row state for n_rows rows."""

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        """AND this constraint into the candidate sets (in place)."""

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab) -> None:
        """Update per-row state for tokens (B,), one per row; `before` is the grammar state
        before these tokens (it is updated right after this call)."""

    def retime(self, now: int, target: int) -> int:
        """Where a sampled shift from `now` to `target` should land instead (> now); only with
        `ConstraintSet(clip_time=True)`, applied by `clip` before the time ceiling."""
        return target

    def event_tick(self, now: int) -> int:
        """When a note start or end sampled at `now` should happen instead (>= now); as
        `retime`."""
        return now

    def get_state(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).copy() for k in self._state_fields}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        for k in self._state_fields:
            getattr(self, k)[...] = state[k]


def _part_indices(vocab: Vocab, parts: Iterable[str | int] | None) -> list[int]:
    """Part names or indices -> indices, checked. None -> every part."""
    if parts is None:
        return list(range(vocab.n_parts))
    out = []
    for p in parts:
        if isinstance(p, str):
            if p not in vocab.part_index:
                raise ValueError(f"unknown part {p!r}; parts are {vocab.config.parts}")
            out.append(vocab.part_index[p])
        else:
            if not 0 <= int(p) < vocab.n_parts:
                raise ValueError(f"part index must be in 0..{vocab.n_parts - 1}, got {p}")
            out.append(int(p))
    return out


def accompaniment_parts(vocab: Vocab) -> list[str]:
    """Every part but the lead: what the model may play while a player plays the lead."""
    return [p for p in vocab.config.parts if p != "lead"]


class Parts(Constraint):
    """Only these parts may play: masks ON, OFF and PART of every other part.

    OFF is masked too so the model never ends a note the player holds (accompaniment).
    """

    def __init__(self, allowed: Iterable[str | int]) -> None:
        self.allowed = list(allowed)
        self.part_mask: np.ndarray | None = None  # (P,) bool once bound: the parts allowed

    def bind(self, vocab: Vocab, n_rows: int) -> None:
        self.part_mask = np.zeros(vocab.n_parts, dtype=bool)  # (P,)
        self.part_mask[_part_indices(vocab, self.allowed)] = True

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        m = self.part_mask
        cand.on_ok &= m[None, :, None]
        cand.off_ok &= m[None, :, None]
        cand.part_ok &= m[None, :]


class Programs(Constraint):
    """Allowed GM programs per part, e.g. {"bass": [32, 33], "harmony": range(0, 8)}.

    Parts not named keep every program.
    """

    def __init__(self, programs: Mapping[str | int, Iterable[int]]) -> None:
        self.programs = {k: list(v) for k, v in programs.items()}
        self._mask: np.ndarray | None = None

    def bind(self, vocab: Vocab, n_rows: int) -> None:
        self._mask = np.ones((vocab.n_parts, 128), dtype=bool)  # (P, 128)
        for part, progs in self.programs.items():
            (i,) = _part_indices(vocab, [part])
            bad = [x for x in progs if not 0 <= x < 128]
            if bad:
                raise ValueError(f"programs must be in 0..127, got {bad}")
            self._mask[i] = False
            self._mask[i, progs] = True

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        cand.program_ok &= self._mask[None]


class PitchRange(Constraint):
    """Note-ons only within [low, high] (inclusive) for the given parts (default: all)."""

    def __init__(self, low: int, high: int, parts: Iterable[str | int] | None = None) -> None:
        if not 0 <= low <= high <= 127:
            raise ValueError(f"pitch range must satisfy 0 <= low <= high <= 127, got {low}..{high}")
        self.low, self.high, self.parts = low, high, None if parts is None else list(parts)
        self._mask: np.ndarray | None = None

    def bind(self, vocab: Vocab, n_rows: int) -> None:
        self._mask = np.ones((vocab.n_parts, 128), dtype=bool)  # (P, 128)
        for i in _part_indices(vocab, self.parts):
            self._mask[i] = False
            self._mask[i, self.low : self.high + 1] = True

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        cand.on_ok &= self._mask[None]


class NoteDensity(Constraint):
    """At most `max_per_second * window_s` note-ons in any window of `window_s` token-time seconds.

    Counts the note-ons of `parts` (default: all), including given (player) tokens; once the
    budget is used, note-ons of those parts are masked until time advances past the oldest one.
    Per row, a ring of the last N note-on ticks: a note-on is allowed iff the oldest of them is
    at least one window old.
    """

    def __init__(
        self,
        max_per_second: float,
        window_s: float = 1.0,
        parts: Iterable[str | int] | None = None,
    ) -> None:
        if max_per_second < 0 or window_s <= 0:
            raise ValueError(
                f"max_per_second must be >= 0 and window_s > 0, got {max_per_second}, {window_s}"
            )
        self.max_per_second, self.window_s = max_per_second, window_s
        self.parts = None if parts is None else list(parts)

    _state_fields = ("ring", "ptr")

    def bind(self, vocab: Vocab, n_rows: int) -> None:
        self.n = int(self.max_per_second * self.window_s)
        self.window = max(1, round(self.window_s * vocab.ticks_per_second))
        self._parts = np.zeros(vocab.n_parts, dtype=bool)  # (P,)
        self._parts[_part_indices(vocab, self.parts)] = True
        self.ring = np.full((n_rows, max(self.n, 1)), -NO_LIMIT, dtype=np.int64)  # (B, N)
        self.ptr = np.zeros(n_rows, dtype=np.int64)  # (B,) index of the oldest entry
        self._rows = np.arange(n_rows)

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        if self.n == 0:
            cand.on_ok &= ~self._parts[None, :, None]
            return
        oldest = self.ring[self._rows, self.ptr]  # (B,)
        full = oldest > state.tick - self.window  # (B,) budget used in the current window
        cand.on_ok &= ~(full[:, None, None] & self._parts[None, :, None])

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab) -> None:
        # A new infill section restarts time at another origin: forget its note-ons.
        restart = (tokens == vocab.FILL_SUFFIX) | (tokens == vocab.FILL_MIDDLE)
        if restart.any():
            self.ring[restart] = -NO_LIMIT
        is_on = (tokens >= vocab.on_base) & (tokens < vocab.off_base)
        if not is_on.any() or self.n == 0:
            return
        part = (tokens - vocab.on_base) // 128
        rows = np.nonzero(is_on & self._parts[np.clip(part, 0, vocab.n_parts - 1)])[0]
        self.ring[rows, self.ptr[rows]] = before.tick[rows]
        self.ptr[rows] = (self.ptr[rows] + 1) % self.n


class MaxDuration(Constraint):
    """No note of `parts` (default: all) sounds longer than `seconds` of token time.

    Time may not carry a row past the earliest deadline of its sounding notes (a time ceiling);
    once a note is due, time, new notes and program changes are masked until the row closes it.
    A guard for live play: a note whose note-off the model never writes would otherwise hang.
    """

    _state_fields = ("onset",)

    def __init__(self, seconds: float, parts: Iterable[str | int] | None = None) -> None:
        if seconds <= 0:
            raise ValueError(f"max note duration must be > 0 seconds, got {seconds}")
        self.seconds = seconds
        self.parts = None if parts is None else list(parts)

    def bind(self, vocab: Vocab, n_rows: int) -> None:
        self.max_ticks = max(1, round(self.seconds * vocab.ticks_per_second))
        self._parts = np.zeros(vocab.n_parts, dtype=bool)  # (P,)
        self._parts[_part_indices(vocab, self.parts)] = True
        self.onset = np.zeros((n_rows, vocab.n_parts, 128), dtype=np.int64)  # (B, P, 128)

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        watched = state.sounding & self._parts[None, :, None]  # (B, P, 128)
        if not watched.any():
            return
        deadline = np.where(watched, self.onset + self.max_ticks, NO_LIMIT).min(axis=(1, 2))  # (B,)
        np.minimum(cand.ceiling, deadline, out=cand.ceiling)
        due = (state.tick >= deadline)[:, None]  # (B, 1)
        cand.on_ok &= ~due[:, :, None]
        cand.part_ok &= ~due

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab) -> None:
        is_on = (tokens >= vocab.on_base) & (tokens < vocab.off_base)
        if not is_on.any():
            return
        rows = np.nonzero(is_on)[0]
        part, pitch = np.divmod(tokens[rows] - vocab.on_base, 128)
        self.onset[rows, part, pitch] = before.tick[rows]


class TimeLimit(Constraint):
    """A row's time may not pass `max_tick` (absolute ticks of token time): a time ceiling.

    Hard: still applied when a row falls back. `set(max_tick, rows)` moves the limit; the live
    scheduler uses one to stop the model exactly at the next forced event. `passable`: a wait
    drawn may still pass it when asked (`ConstraintSet.clip(pass_end=True)`): the end of a live
    request, where the model's time is its own to choose.
    """

    hard = True
    _state_fields = ("max_tick",)

    def __init__(self, max_tick: int | None = None, passable: bool = False) -> None:
        self.initial = NO_LIMIT if max_tick is None else int(max_tick)
        self.passable = passable

    def bind(self, vocab: Vocab, n_rows: int) -> None:
        self.max_tick = np.full(n_rows, self.initial, dtype=np.int64)  # (B,)

    def set(self, max_tick: int | None, rows: np.ndarray | slice | int = slice(None)) -> None:
        self.max_tick[rows] = NO_LIMIT if max_tick is None else int(max_tick)

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        np.minimum(cand.ceiling, self.max_tick, out=cand.ceiling)


class BeatGrid(Constraint):
    """Sampled time lands on a beat grid: generated notes start (and end) on the grid of a tempo
    someone else keeps (a DAW's MIDI clock), so the accompaniment stays with it.

    The grid: `origin_tick + k * step_ticks` (float ticks, rounded), e.g. 16ths at 120 bpm are
    12.5 ticks of 10 ms. A sampled shift is moved to the grid point nearest to where it would
    land, never to now or before (the next point then). The model's rhythm is kept, quantized.
    Works through `ConstraintSet(clip_time=True)` (live sessions); `set` moves the grid while a
    session runs (the tempo changed), `set(None)` turns it off.
    """

    def __init__(self, step_ticks: float | None = None, origin_tick: float = 0.0) -> None:
        self.set(step_ticks, origin_tick)

    def set(self, step_ticks: float | None, origin_tick: float = 0.0) -> None:
        """Move the grid (any thread: one attribute swap, read once per `retime`)."""
        if step_ticks is not None and step_ticks < 1.0:
            raise ValueError(f"a grid step must be at least 1 tick, got {step_ticks}")
        self.grid = None if step_ticks is None else (float(step_ticks), float(origin_tick))

    def retime(self, now: int, target: int) -> int:
        grid = self.grid
        if grid is None:
            return target
        step, origin = grid
        k = math.floor((target - origin) / step + 0.5)  # the nearest point (half up)
        while (snapped := math.floor(origin + k * step + 0.5)) <= now:
            k += 1  # a shift always moves time forward: the next point
        return snapped

    def event_tick(self, now: int) -> int:
        # Off the grid (time stopped at a request's end, or a player's event): the next point.
        grid = self.grid
        if grid is None:
            return now
        step, origin = grid
        k = math.ceil((now - origin) / step - 1e-9)
        while (point := math.floor(origin + k * step + 0.5)) < now:
            k += 1
        return point


class ConstraintSet:
    """The grammar plus user constraints, for n_rows rows; one combined mask per step."""

    def __init__(
        self,
        vocab: Vocab,
        constraints: Sequence[Constraint] = (),
        n_rows: int = 1,
        allow_end: bool = True,
        clip_time: bool = False,
    ) -> None:
        if n_rows < 1:
            raise ValueError(f"n_rows must be >= 1, got {n_rows}")
        self.vocab, self.n_rows, self.allow_end = vocab, n_rows, allow_end
        self.clip_time = clip_time
        self.ceiling = np.full(n_rows, NO_LIMIT, dtype=np.int64)  # (B,) as of the last mask
        self.wait_ceiling = self.ceiling.copy()  # (B,) the same, passable limits passed
        self.constraints: list[Constraint] = [copy.deepcopy(c) for c in constraints]
        for c in self.constraints:
            c.bind(vocab, n_rows)
        # Applied last, after the ceiling without them is noted (`wait_ceiling`).
        self._passable = [c for c in self.constraints if getattr(c, "passable", False)]
        self._firm = [c for c in self.constraints if c not in self._passable]
        self.state = GrammarState(vocab, n_rows)
        self._build_tables()

    # --- tables -------------------------------------------------------------------------------
    def _build_tables(self) -> None:
        v = self.vocab
        self.type_table = np.array([v.type_of(t) for t in range(v.size)], dtype=np.int8)  # (V,)
        self.ticks_table = v.ticks_table
        self._time_ticks = self.ticks_table[v.shift_base : v.part_base]  # (T,)
        self._type_list = [TokenType(x) for x in self.type_table.tolist()]
        self._ticks_list = self.ticks_table.tolist()
        self.n_time = v.part_base - v.shift_base
        self.drums_mask = np.zeros(v.n_parts, dtype=bool)
        self.drums_mask[v.drums] = True
        self._end_by_section = np.array(
            [v.EOS, v.FILL_SUFFIX, v.FILL_MIDDLE, v.FILL_END], dtype=np.int64
        )  # (4,) the closing token of each Section

    # --- state --------------------------------------------------------------------------------
    @property
    def phase(self) -> np.ndarray:
        """(B,) Phase per row."""
        return self.state.phase

    @property
    def tick(self) -> np.ndarray:
        """(B,) token time per row, in ticks (since the infill section start for infill)."""
        return self.state.tick

    def at_boundary(self, row: int = 0) -> bool:
        """True when an event may be inserted here (not inside PART/PROGRAM or VEL/ON)."""
        return int(self.state.phase[row]) in (Phase.BODY, Phase.TARGETS)

    def find(self, kind: type[Constraint]) -> Constraint | None:
        """The first constraint of this class, to move its settings (e.g. a TimeLimit)."""
        return next((c for c in self.constraints if isinstance(c, kind)), None)

    def snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        """A copy of all per-row state, for rollback with `restore`."""
        snap = {"grammar": self.state.get_state()}
        for i, c in enumerate(self.constraints):
            snap[f"c{i}"] = c.get_state()
        return snap

    def restore(self, snap: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.state.set_state(snap["grammar"])
        for i, c in enumerate(self.constraints):
            c.set_state(snap[f"c{i}"])

    def reset(self) -> None:
        """Back to before BOS, every row; constraint settings (limits) are kept."""
        self.state = GrammarState(self.vocab, self.n_rows)
        for c in self.constraints:
            keep = {k: getattr(c, k).copy() for k in ("max_tick",) if hasattr(c, k)}
            c.bind(self.vocab, self.n_rows)
            for k, val in keep.items():
                setattr(c, k, val)

    # --- advancing ----------------------------------------------------------------------------
    def observe(self, tokens: np.ndarray | Sequence[int] | torch.Tensor) -> None:
        """Advance every row by one token; tokens: (B,) ids."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        tok = np.asarray(tokens, dtype=np.int64).reshape(self.n_rows)  # (B,)
        for c in self.constraints:
            c.observe(tok, self.state, self.vocab)
        if self.n_rows == 1:
            self._advance_one(int(tok[0]))
        else:
            _advance(
                self.state, tok, self.vocab, self.type_table, self.ticks_table, self.drums_mask
            )

    def _advance_one(self, t: int) -> None:
        """`_advance` for a single row with plain ints (the live sessions' hot path; equivalence
        with `_advance` is tested)."""
        v, s = self.vocab, self.state
        ty = self._type_list[t]
        ph = int(s.phase[0])
        if ty == TokenType.TIME:
            s.tick[0] += self._ticks_list[t]
            s.phase[0] = _BODY
        elif ty == TokenType.NOTE_ON or ty == TokenType.NOTE_OFF:
            on = ty == TokenType.NOTE_ON
            p, k = divmod(t - (v.on_base if on else v.off_base), 128)
            if not (on and p == v.drums):
                s.sounding[0, p, k] = on
            s.phase[0] = _BODY
        elif ty == TokenType.VELOCITY:
            s.phase[0] = _AFTER_VEL
        elif ty == TokenType.PART:
            s.last_part[0] = t - v.part_base
            if ph == _TARGETS_FIRST or ph == _TARGETS:
                s.n_targets[0] += 1
                s.phase[0] = _TARGETS
            else:
                s.phase[0] = _AFTER_PART
        elif ty == TokenType.PROGRAM:
            if ph == _TARGETS:
                s.n_targets[0] -= 1  # the last PART began the prefix
            s.phase[0] = _BODY
        elif t != v.PAD:  # the other specials are rare: the vectorized transition
            _advance(s, np.array([t]), v, self.type_table, self.ticks_table, self.drums_mask)

    def feed(self, tokens: Iterable[int], row: int = 0) -> None:
        """Advance one row by several tokens (prompt or player tokens); other rows get PAD."""
        pad = np.full(self.n_rows, self.vocab.PAD, dtype=np.int64)
        for t in tokens:
            pad[row] = t
            self.observe(pad)
        # PAD leaves every state unchanged, so the other rows did not move.

    # --- masks --------------------------------------------------------------------------------
    def _candidates(self, hard_only: bool = False) -> Candidates:
        v, s = self.vocab, self.state
        b, p = self.n_rows, v.n_parts
        off_ok = s.sounding & ~self.drums_mask[None, :, None]
        cand = Candidates(
            on_ok=~s.sounding,
            off_ok=off_ok,
            program_ok=np.ones((b, p, 128), dtype=bool),
            part_ok=np.ones((b, p), dtype=bool),
            time_ok=np.ones((b, self.n_time), dtype=bool),
            end_ok=np.full(b, self.allow_end, dtype=bool),
            ceiling=np.full(b, NO_LIMIT, dtype=np.int64),
        )
        for c in self._firm:
            if c.hard or not hard_only:
                c.restrict(cand, s, v)
        cand.wait_ceiling = cand.ceiling.copy()
        for c in self._passable:  # TimeLimits: hard
            c.restrict(cand, s, v)
        room = cand.ceiling - s.tick  # (B,) ticks time may still advance
        if self.clip_time:  # any shift will do while there is room: `clip` shortens it
            cand.time_ok &= (room > 0)[:, None]
        else:
            cand.time_ok &= self._time_ticks[None, :] <= room[:, None]
        return cand

    def _assemble(self, cand: Candidates) -> np.ndarray:
        """Candidates + phase -> (B, V) allowed, with the VEL->ON and PART->PROGRAM closure."""
        v, s = self.vocab, self.state
        b = self.n_rows
        ph = s.phase
        mask = np.zeros((b, v.size), dtype=bool)  # (B, V)
        infill = s.task == v.TASK_INFILL

        # PART p needs some PROGRAM for p; VEL needs some ON.
        part_ok = cand.part_ok & cand.program_ok.any(axis=2)  # (B, P)
        vel_ok = cand.on_ok.reshape(b, -1).any(axis=1)  # (B,)
        # Infill sections must close in order, and infill never ends with EOS.
        end_tok = self._end_by_section[s.section]  # (B,)
        end_ok = cand.end_ok & ((s.section != Section.NONE) | ~infill)

        body = ph == Phase.BODY
        targets = ph == Phase.TARGETS
        ev = body | targets  # rows at an event boundary
        mask[ev, v.shift_base : v.part_base] = cand.time_ok[ev]
        mask[body, v.part_base : v.program_base] = part_ok[body]
        mask[ev, v.vel_base : v.on_base] = vel_ok[ev, None]
        mask[body, v.off_base : v.size] = cand.off_ok[body].reshape(-1, v.n_parts * 128)
        er = np.nonzero(ev & end_ok)[0]
        mask[er, end_tok[er]] = True

        # Infill targets: one PART token per target part (any part); the prefix may begin with
        # PART p PROGRAM x, so PROGRAM after a PART is allowed once another target is kept.
        tf = (ph == Phase.TARGETS_FIRST) | targets
        mask[tf, v.part_base : v.program_base] = True
        tp = np.nonzero(targets & (s.n_targets >= 2))[0]
        lp = s.last_part[tp]
        mask[tp, v.program_base : v.vel_base] = (
            cand.program_ok[tp, lp] & cand.part_ok[tp, lp][:, None]
        )

        ap = np.nonzero(ph == Phase.AFTER_PART)[0]
        mask[ap, v.program_base : v.vel_base] = cand.program_ok[ap, s.last_part[ap]]
        av = ph == Phase.AFTER_VEL
        mask[av, v.on_base : v.off_base] = cand.on_ok[av].reshape(-1, v.n_parts * 128)

        mask[ph == Phase.START, v.BOS] = True
        mask[ph == Phase.TASK, v.TASK_CONTINUE : v.TASK_INFILL + 1] = True
        done = ph == Phase.DONE
        mask[done, v.EOS] = True
        mask[done, v.PAD] = True
        return mask

    def _assemble_one(self, cand: Candidates) -> np.ndarray:
        """`_assemble` for a single row, with plain ints and slices: the live sessions' hot
        path (one ConstraintSet per session), about 3x cheaper than the vectorized one.
        Equivalence with `_assemble` is tested."""
        v, s = self.vocab, self.state
        ph = int(s.phase[0])
        mask = np.zeros((1, v.size), dtype=bool)  # (1, V)
        m = mask[0]
        if ph == _BODY or ph == _TARGETS:
            m[v.shift_base : v.part_base] = cand.time_ok[0]
            if cand.on_ok.any():
                m[v.vel_base : v.on_base] = True
            section = int(s.section[0])
            if cand.end_ok[0] and (section != _NONE or int(s.task[0]) != v.TASK_INFILL):
                m[self._end_by_section[section]] = True
            if ph == _BODY:
                m[v.part_base : v.program_base] = cand.part_ok[0] & cand.program_ok[0].any(axis=1)
                m[v.off_base : v.size] = cand.off_ok[0].reshape(-1)
            else:
                m[v.part_base : v.program_base] = True
                if s.n_targets[0] >= 2:
                    lp = int(s.last_part[0])
                    m[v.program_base : v.vel_base] = cand.program_ok[0, lp] & cand.part_ok[0, lp]
        elif ph == _AFTER_PART:
            m[v.program_base : v.vel_base] = cand.program_ok[0, int(s.last_part[0])]
        elif ph == _AFTER_VEL:
            m[v.on_base : v.off_base] = cand.on_ok[0].reshape(-1)
        elif ph == _TARGETS_FIRST:
            m[v.part_base : v.program_base] = True
        elif ph == _START:
            m[v.BOS] = True
        elif ph == _TASK:
            m[v.TASK_CONTINUE : v.TASK_INFILL + 1] = True
        else:  # DONE
            m[v.EOS] = m[v.PAD] = True
        return mask

    def allowed(self) -> np.ndarray:
        """(B, V) bool: tokens each row may sample now. Never an all-False row."""
        cand = self._candidates()
        self.ceiling, self.wait_ceiling = cand.ceiling, cand.wait_ceiling
        mask = self._assemble_one(cand) if self.n_rows == 1 else self._assemble(cand)
        empty = ~mask.any(axis=1)
        if empty.any():
            mask[empty] = self._fallback(np.nonzero(empty)[0])
        return mask

    def _fallback(self, rows: np.ndarray) -> np.ndarray:
        """Rows with nothing allowed: SHIFT_1 if the hard constraints allow it, else the end token."""
        v = self.vocab
        hard = self._assemble(self._candidates(hard_only=True))[rows]  # (R, V)
        out = np.zeros_like(hard)
        end_tok = self._end_by_section[self.state.section[rows]]
        for i, r in enumerate(rows):
            if hard[i, v.shift(1)]:
                out[i, v.shift(1)] = True
            elif self.state.phase[r] in (Phase.BODY, Phase.TARGETS, Phase.DONE):
                out[i, end_tok[i] if self.state.phase[r] != Phase.DONE else v.EOS] = True
            elif hard[i].any():
                out[i] = hard[i]
            else:
                out[i, v.EOS] = True
            logger.debug("row %d: nothing allowed, falling back", r)
        return out

    def clip(
        self, token: int, row: int = 0, onset_free: bool = False, pass_end: bool = False
    ) -> list[int]:
        """The tokens a sampled `token` stands for (with `clip_time`; else itself): a time token
        becomes the time tokens that end where the constraints move it (`retime`, e.g. a
        BeatGrid), never past the row's time ceiling (as of the last `allowed`): a shift that
        would pass it ends on it. A `VEL` (a note starts) or `OFF` is moved to its `event_tick`
        (time tokens first); if the ceiling comes before that, only the time up to the ceiling:
        the row decides again there. `onset_free`: notes may start or end now whatever the
        constraints say (the live session's "now" is a player's event: playing with the player
        beats the grid). `pass_end`: a time token may pass passable limits (`TimeLimit`)."""
        v = self.vocab
        if not self.clip_time:
            return [token]
        now = int(self.state.tick[row])
        if v.vel_base <= token < v.on_base or token >= v.off_base:  # a note starts or ends
            if onset_free:
                return [token]
            start = max([now] + [c.event_tick(now) for c in self.constraints])
            if start == now:
                return [token]
            end = min(start, int(self.ceiling[row]))
            if end == now:  # at the ceiling already: the note can't move
                return [token]
            return v.time_tokens(end - now) + ([token] if end == start else [])
        if not v.shift_base <= token < v.part_base:
            return [token]
        target = want = now + self._ticks_list[token]
        for c in self.constraints:
            target = c.retime(now, target)
        ceiling = self.wait_ceiling if pass_end else self.ceiling
        target = min(target, int(ceiling[row]))
        if target == want or target <= now:
            # target <= now: the fallback's SHIFT_1 when the constraints conflict (a deadline
            # already past that another constraint won't let a note-off meet): time goes on.
            return [token]
        return v.time_tokens(target - now)

    def logit_mask(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(B, V) additive mask: 0 where allowed, -inf elsewhere."""
        allowed = torch.from_numpy(self.allowed())
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, float("-inf"))
        return mask.to(device)

    def check(self, tokens: Iterable[int], row: int = 0) -> int | None:
        """Feed tokens to one row, masking each first; index of the first disallowed, or None."""
        for i, t in enumerate(tokens):
            if not self.allowed()[row, t]:
                return i
            pad = np.full(self.n_rows, self.vocab.PAD, dtype=np.int64)
            pad[row] = t
            self.observe(pad)
        return None


def _advance(
    s: GrammarState,
    tok: np.ndarray,
    v: Vocab,
    type_table: np.ndarray,
    ticks_table: np.ndarray,
    drums_mask: np.ndarray,
) -> None:
    """The grammar's transition for one token per row (vectorized, in place).

    Lenient: a token the grammar would not allow still moves the state the natural way (given
    tokens are observed, not masked).
    """
    ty = type_table[tok]  # (B,)
    ph = s.phase

    # Specials.
    bos = tok == v.BOS
    ph[bos] = Phase.TASK
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

    # Time.
    is_time = ty == TokenType.TIME
    s.tick += ticks_table[tok]
    ph[is_time] = Phase.BODY

    # PART / PROGRAM.
    is_part = ty == TokenType.PART
    if is_part.any():
        in_targets = is_part & ((ph == Phase.TARGETS_FIRST) | (ph == Phase.TARGETS))
        s.n_targets[in_targets] += 1
        s.last_part[is_part] = tok[is_part] - v.part_base
        ph[in_targets] = Phase.TARGETS
        ph[is_part & ~in_targets] = Phase.AFTER_PART
    is_prog = ty == TokenType.PROGRAM
    if is_prog.any():
        # After target PARTs, a PROGRAM shows the last PART began the prefix.
        s.n_targets[is_prog & (ph == Phase.TARGETS)] -= 1
        ph[is_prog] = Phase.BODY

    # VEL / ON / OFF.
    ph[ty == TokenType.VELOCITY] = Phase.AFTER_VEL
    is_on = ty == TokenType.NOTE_ON
    is_off = ty == TokenType.NOTE_OFF
    if is_on.any() or is_off.any():
        note = np.where(is_on, tok - v.on_base, tok - v.off_base)  # (B,) part*128 + pitch
        part, pitch = note // 128, note % 128
        r_on = np.nonzero(is_on & ~drums_mask[np.clip(part, 0, v.n_parts - 1)])[0]
        s.sounding[r_on, part[r_on], pitch[r_on]] = True
        r_off = np.nonzero(is_off)[0]
        s.sounding[r_off, part[r_off], pitch[r_off]] = False
        ph[is_on | is_off] = Phase.BODY
