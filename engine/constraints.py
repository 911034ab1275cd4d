"""User-facing constraints: which parts, programs, pitches, how dense, how long, until when, on
which grid.

    cs = ConstraintSet(vocab, [Parts(accompaniment_parts(vocab)), NoteDensity(8.0)], n_rows=4)

A constraint is an immutable spec (a frozen dataclass): its settings never change, so one spec
can configure any number of sessions and cross threads freely. A changed setting is a new spec,
swapped in with `ConstraintSet.replace` (a live session does it when a queued command asks,
`LiveSession.set_constraint`). What a constraint needs per set lives in the `ConstraintSet`: `init`
returns it (tables derived from the settings, and per-row arrays); `row_fields` names the
per-row arrays, which snapshots copy and rollback restores.

Each constraint only removes candidates (`restrict`); the grammar (improv.engine.grammar)
closes the pairs, so a row never has nothing to sample. Time limits are ceilings, not masks
(see improv.engine.constraint_set).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from .grammar import NO_LIMIT, Candidates, GrammarState
from .tokenizer.vocab import Vocab

Own = dict[str, Any]  # a constraint's tables and per-row arrays in one ConstraintSet


class Constraint:
    """A user constraint: removes candidates; sees every token (sampled or given).

    Subclasses are frozen dataclasses (the settings) overriding `restrict` and, if they keep
    per-row state, `init`, `observe` and `row_fields`.
    """

    hard = False  # hard constraints still apply when a row falls back (time limits)
    passable = False  # a time ceiling a drawn wait may pass (`ConstraintSet.clip(pass_end=True)`)
    row_fields: tuple[str, ...] = ()  # keys of `init`'s per-row arrays (B, ...) (snapshots)

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        """What this constraint needs in a set of n_rows rows: tables and per-row arrays."""
        return {}

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        """AND this constraint into the candidate sets (in place)."""

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab, own: Own) -> None:
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


def _set(obj: object, **values: Any) -> None:
    """Normalize a frozen dataclass's fields in __post_init__ (lists -> tuples)."""
    for k, val in values.items():
        object.__setattr__(obj, k, val)


def _parts_tuple(parts: Iterable[str | int] | None) -> tuple[str | int, ...] | None:
    return None if parts is None else tuple(parts)


def part_indices(vocab: Vocab, parts: Iterable[str | int] | None) -> list[int]:
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


def part_mask(vocab: Vocab, parts: Iterable[str | int] | None) -> np.ndarray:
    """(P,) bool: the parts named (None: all)."""
    m = np.zeros(vocab.n_parts, dtype=bool)
    m[part_indices(vocab, parts)] = True
    return m


def accompaniment_parts(vocab: Vocab) -> list[str]:
    """Every part but the lead: what the model may play while a player plays the lead."""
    return [p for p in vocab.config.parts if p != "lead"]


@dataclass(frozen=True)
class GivenMarks(Constraint):
    """The beats (`beats`) and/or the chords (`chords`) are given, forced at their times: the
    model does not write BAR/BEAT or CHORD tokens of its own. (Without it, a harmony model
    writes its own meter and harmonic plan, as it learned to.) `hard`: a row that falls back
    still never invents a chord over given ones."""

    beats: bool = True
    chords: bool = True
    hard = True

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        b = len(cand.end_ok)
        if self.beats:
            cand.meter_ok = np.zeros((b, 1), dtype=bool)
        if self.chords:
            cand.chord_ok = np.zeros((b, 1), dtype=bool)


@dataclass(frozen=True)
class Parts(Constraint):
    """Only these parts may play: masks ON, OFF and PART of every other part.

    OFF is masked too so the model never ends a note the player holds (accompaniment).
    """

    allowed: tuple[str | int, ...]

    def __post_init__(self) -> None:
        _set(self, allowed=tuple(self.allowed))

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        return {"part_mask": part_mask(vocab, self.allowed)}  # (P,)

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        m = own["part_mask"]
        cand.on_ok &= m[None, :, None]
        cand.off_ok &= m[None, :, None]
        cand.part_ok &= m[None, :]


@dataclass(frozen=True)
class Programs(Constraint):
    """Allowed GM programs per part, e.g. {"bass": [32, 33], "harmony": range(0, 8)}.

    Parts not named keep every program.
    """

    programs: Mapping[str | int, tuple[int, ...]]

    def __post_init__(self) -> None:
        progs = {k: tuple(v) for k, v in self.programs.items()}
        bad = [x for v in progs.values() for x in v if not 0 <= x < 128]
        if bad:
            raise ValueError(f"programs must be in 0..127, got {bad}")
        _set(self, programs=MappingProxyType(progs))

    def __reduce__(self) -> tuple[Any, ...]:
        return Programs, (dict(self.programs),)  # (a read-only view does not pickle)

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        mask = np.ones((vocab.n_parts, 128), dtype=bool)  # (P, 128)
        for part, progs in self.programs.items():
            (i,) = part_indices(vocab, [part])
            mask[i] = False
            mask[i, list(progs)] = True
        return {"mask": mask}

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        cand.program_ok &= own["mask"][None]


@dataclass(frozen=True)
class PitchRange(Constraint):
    """Note-ons only within [low, high] (inclusive) for the given parts (default: all)."""

    low: int
    high: int
    parts: tuple[str | int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high <= 127:
            raise ValueError(
                f"pitch range must satisfy 0 <= low <= high <= 127, got {self.low}..{self.high}"
            )
        _set(self, parts=_parts_tuple(self.parts))

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        mask = np.ones((vocab.n_parts, 128), dtype=bool)  # (P, 128)
        for i in part_indices(vocab, self.parts):
            mask[i] = False
            mask[i, self.low : self.high + 1] = True
        return {"mask": mask}

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        cand.on_ok &= own["mask"][None]


@dataclass(frozen=True)
class NoteDensity(Constraint):
    """At most `max_per_second * window_s` note-ons in any window of `window_s` token-time seconds.

    Counts the note-ons of `parts` (default: all), including given (player) tokens; once the
    budget is used, note-ons of those parts are masked until time advances past the oldest one.
    Per row, a ring of the last N note-on ticks: a note-on is allowed iff the oldest of them is
    at least one window old.
    """

    max_per_second: float
    window_s: float = 1.0
    parts: tuple[str | int, ...] | None = None
    row_fields = ("ring", "ptr")

    def __post_init__(self) -> None:
        if self.max_per_second < 0 or self.window_s <= 0:
            raise ValueError(
                f"max_per_second must be >= 0 and window_s > 0, "
                f"got {self.max_per_second}, {self.window_s}"
            )
        _set(self, parts=_parts_tuple(self.parts))

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        n = int(self.max_per_second * self.window_s)
        return {
            "n": n,
            "window": max(1, round(self.window_s * vocab.ticks_per_second)),
            "parts": part_mask(vocab, self.parts),  # (P,)
            "rows": np.arange(n_rows),
            "ring": np.full((n_rows, max(n, 1)), -NO_LIMIT, dtype=np.int64),  # (B, N)
            "ptr": np.zeros(n_rows, dtype=np.int64),  # (B,) index of the oldest entry
        }

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        parts = own["parts"][None, :, None]  # (1, P, 1)
        if own["n"] == 0:
            cand.on_ok &= ~parts
            return
        oldest = own["ring"][own["rows"], own["ptr"]]  # (B,)
        full = oldest > state.tick - own["window"]  # (B,) budget used in the current window
        cand.on_ok &= ~(full[:, None, None] & parts)

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab, own: Own) -> None:
        ring, ptr, n = own["ring"], own["ptr"], own["n"]
        if len(tokens) == 1:  # one row (a live session's set): scalars, ~1 us instead of ~6
            t = int(tokens[0])
            if t == vocab.FILL_SUFFIX or t == vocab.FILL_MIDDLE:
                ring[0] = -NO_LIMIT
            elif (
                n
                and vocab.on_base <= t < vocab.off_base
                and own["parts"][(t - vocab.on_base) // 128]
            ):
                ring[0, ptr[0]] = before.tick[0]
                ptr[0] = (ptr[0] + 1) % n
            return
        # A new infill section restarts time at another origin: forget its note-ons.
        restart = (tokens == vocab.FILL_SUFFIX) | (tokens == vocab.FILL_MIDDLE)
        if restart.any():
            ring[restart] = -NO_LIMIT
        is_on = (tokens >= vocab.on_base) & (tokens < vocab.off_base)
        if not is_on.any() or n == 0:
            return
        part = (tokens - vocab.on_base) // 128
        rows = np.nonzero(is_on & own["parts"][np.clip(part, 0, vocab.n_parts - 1)])[0]
        ring[rows, ptr[rows]] = before.tick[rows]
        ptr[rows] = (ptr[rows] + 1) % n


@dataclass(frozen=True)
class MaxDuration(Constraint):
    """No note of `parts` (default: all) sounds longer than `seconds` of token time.

    Time may not carry a row past the earliest deadline of its sounding notes (a time ceiling);
    once a note is due, time, new notes and program changes are masked until the row closes it.
    A guard for live play: a note whose note-off the model never writes would otherwise hang.
    """

    seconds: float
    parts: tuple[str | int, ...] | None = None
    row_fields = ("onset",)

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"max note duration must be > 0 seconds, got {self.seconds}")
        _set(self, parts=_parts_tuple(self.parts))

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        return {
            "max_ticks": max(1, round(self.seconds * vocab.ticks_per_second)),
            "parts": part_mask(vocab, self.parts),  # (P,)
            "onset": np.zeros((n_rows, vocab.n_parts, 128), dtype=np.int64),  # (B, P, 128)
        }

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        watched = state.sounding & own["parts"][None, :, None]  # (B, P, 128)
        if not watched.any():
            return
        deadline = np.where(watched, own["onset"] + own["max_ticks"], NO_LIMIT).min(axis=(1, 2))
        np.minimum(cand.ceiling, deadline, out=cand.ceiling)  # (B,)
        due = (state.tick >= deadline)[:, None]  # (B, 1)
        cand.on_ok &= ~due[:, :, None]
        cand.part_ok &= ~due

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab, own: Own) -> None:
        if len(tokens) == 1:  # one row (a live session's set): scalars, ~1 us instead of ~3
            t = int(tokens[0])
            if vocab.on_base <= t < vocab.off_base:
                part, pitch = divmod(t - vocab.on_base, 128)
                own["onset"][0, part, pitch] = before.tick[0]
            return
        is_on = (tokens >= vocab.on_base) & (tokens < vocab.off_base)
        if not is_on.any():
            return
        rows = np.nonzero(is_on)[0]
        part, pitch = np.divmod(tokens[rows] - vocab.on_base, 128)
        own["onset"][rows, part, pitch] = before.tick[rows]


@dataclass(frozen=True)
class ChordsOnBeats(Constraint):
    """The model's own chord changes fall on strong beats: a CHORD token only right after a
    BAR, or a BEAT an even number of beats into the bar (beats 1 and 3 of a 4/4 bar), at that
    beat's tick, once. A harmonic plan that changes on the beat, as the songs it learned from
    do, rather than whenever sampling wanders into a CHORD token (a young model wrote ~2 a
    second). Rows that have heard no beat are left alone."""

    strong_only: bool = True  # False: any beat
    row_fields = ("beat_tick", "beat_n", "chord_tick")

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        return {
            "beat_tick": np.full(n_rows, -1, dtype=np.int64),  # (B,) the last BAR/BEAT's tick
            "beat_n": np.zeros(n_rows, dtype=np.int64),  # (B,) beats since the last BAR
            "chord_tick": np.full(n_rows, -1, dtype=np.int64),  # (B,) the last CHORD's tick
        }

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        heard = own["beat_tick"] >= 0
        if not vocab.harmony or not heard.any():
            return
        on_beat = state.tick == own["beat_tick"]
        if self.strong_only:
            on_beat &= own["beat_n"] % 2 == 0
        ok = ~heard | (on_beat & (own["chord_tick"] != state.tick))  # (B,)
        prev = np.ones((len(ok), 1), dtype=bool) if cand.chord_ok is None else cand.chord_ok
        cand.chord_ok = prev & ok[:, None]

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab, own: Own) -> None:
        if not vocab.harmony:
            return
        bar, beat = tokens == vocab.BAR, tokens == vocab.BEAT
        own["beat_n"][bar] = 0
        own["beat_n"][beat] += 1
        meter = bar | beat
        own["beat_tick"][meter] = before.tick[meter]
        chord = (tokens >= vocab.chord_base) & (tokens < vocab.HEADER)
        own["chord_tick"][chord] = before.tick[chord]


@dataclass(frozen=True)
class ChordsFitMelody(Constraint):
    """The model's own chord at a beat is one of `fits` there: offline accompaniment without
    chords names, at every beat, the chord of the plan `tokenizer.chord_plan.plan_chords` makes
    from the melody (known ahead; a causal model writes a bar's chord before it hears the bar's
    melody, and guessed other harmony than the songs': 38% of its notes in the annotated chord,
    6 validation songs). Where its sounding chord is not allowed it changes now (a CHORD before
    anything else); among several allowed the scheduler moves the mass of the others onto them
    (`pool`, policy.Draw.chord_pool: masking them instead made the model change chords 0.7
    times a song). Ticks not named are left alone."""

    fits: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (tick, chord indices allowed there)
    row_fields = ("chord", "chord_tick")

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        from .tokenizer.harmony import N_CHORDS

        table = {}
        for tick, idx in self.fits:
            ok = np.zeros(N_CHORDS, dtype=bool)  # (C,)
            ok[list(idx)] = True
            table[int(tick)] = ok
        return {
            "table": table,
            "chord": np.zeros(n_rows, dtype=np.int64),  # (B,) the sounding chord, 0: none
            "chord_tick": np.full(n_rows, -1, dtype=np.int64),  # (B,) the last CHORD's tick
        }

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        # Where the sounding chord is not allowed, it changes now: a chord held on (the model
        # changed every ~5 s, the songs every bar or two) was the rest of the distance to the
        # annotated harmony.
        if not vocab.harmony or not own["table"]:
            return
        for b, t in enumerate(state.tick.tolist()):
            ok = own["table"].get(t)
            if ok is None or own["chord_tick"][b] == t or ok[own["chord"][b]]:
                continue
            cand.time_ok[b] = False
            cand.end_ok[b] = False
            cand.off_ok[b] = False
            cand.on_ok[b] = False
            cand.part_ok[b] = False
            if cand.meter_ok is not None:
                cand.meter_ok[b] = False

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab, own: Own) -> None:
        if not vocab.harmony:
            return
        is_chord = (tokens >= vocab.chord_base) & (tokens < vocab.HEADER)
        own["chord"][is_chord] = tokens[is_chord] - vocab.chord_base
        own["chord_tick"][is_chord] = before.tick[is_chord]

    def pool(self, tick: int, own: Own) -> np.ndarray | None:
        """(C,) bool: the chords that fit at this (grammar) tick, or None (no narrowing)."""
        return own["table"].get(int(tick))


@dataclass(frozen=True)
class StartParts(Constraint):
    """Every part asked for plays: a part of `parts` silent for `after_ticks` (since the
    request began, or since its last note) plays at the next downbeat (the next event boundary
    if the row hears no beats): there, time may not pass until a note of a silent part starts.

    The model hears the instrumentation header, but a part it has not begun (a bass, drums
    laid over a song that never had them) stays unlikely at every later chance: asked for
    harmony, bass and drums, it played the bass in almost none of 20 songs. The note is the
    model's choice (with ChordTones: a chord tone); a part that plays on its own is untouched."""

    parts: tuple[str | int, ...]
    after_ticks: int = 200
    row_fields = ("last_on", "bar_tick")

    def __post_init__(self) -> None:
        _set(self, parts=tuple(self.parts))

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        return {
            "want": part_mask(vocab, self.parts),  # (P,)
            # (B, P) tick of each part's last note-on (or of the request's first token)
            "last_on": np.full((n_rows, vocab.n_parts), -1, dtype=np.int64),
            "bar_tick": np.full(n_rows, -1, dtype=np.int64),  # (B,) the last BAR's tick
        }

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        last = own["last_on"]
        silent = own["want"][None, :] & (last >= 0)
        silent &= state.tick[:, None] >= last + self.after_ticks  # (B, P)
        heard_bar = own["bar_tick"] >= 0
        due = silent.any(axis=1) & (~heard_bar | (own["bar_tick"] == state.tick))
        if not due.any():
            return
        rows = np.nonzero(due)[0]
        cand.time_ok[rows] = False
        cand.end_ok[rows] = False
        cand.off_ok[rows] = False
        cand.on_ok[rows] &= silent[rows][:, :, None]
        cand.part_ok[rows] &= silent[rows]

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab, own: Own) -> None:
        last = own["last_on"]
        new = last[:, 0] < 0
        last[new] = before.tick[new, None]
        on = (tokens >= vocab.on_base) & (tokens < vocab.off_base)
        if on.any():
            rows = np.nonzero(on)[0]
            last[rows, (tokens[rows] - vocab.on_base) // 128] = before.tick[rows]
        if vocab.harmony:
            bar = tokens == vocab.BAR
            own["bar_tick"][bar] = before.tick[bar]


@dataclass(frozen=True)
class ChordTones(Constraint):
    """Notes of `parts` (default harmony and bass) start only on tones of the sounding chord:
    the last CHORD token of the row's history, given (a chart, the player's left hand) or the
    model's own plan. Where no chord sounds (none yet, or CHORD_N), nothing is removed.

    A small model hears a chord and mostly plays in it; this makes "mostly" "always" for the
    parts whose job is the harmony (a comping piano, a bass), as a player reading a chart
    would. The counter-melody and the lead keep their passing tones. Harmony vocabularies only.

    `hedges` narrow a chord read live from the melody to the tones its reader is sure of (a
    player who does not know the song plays the root and fifth, not a guessed third): each
    `(tick, chord, pitch classes as 12 bits)` holds from its tick while that chord sounds,
    until the next one; where it names another chord than the sounding one, the whole chord's
    tones are allowed.
    """

    parts: tuple[str | int, ...] = ("harmony", "bass")
    hedges: tuple[tuple[int, int, int], ...] = ()
    row_fields = ("chord",)

    def __post_init__(self) -> None:
        by_tick = {int(t): (int(c), int(bits)) for t, c, bits in self.hedges}  # the last wins
        _set(self, parts=tuple(self.parts), hedges=tuple((t, *by_tick[t]) for t in sorted(by_tick)))

    def init(self, vocab: Vocab, n_rows: int) -> Own:
        tones = chord_tone_table()
        h = np.array(self.hedges, dtype=np.int64).reshape(-1, 3)  # (H, 3) by tick
        pcs = (h[:, 2:3] >> np.arange(12)) & 1  # (H, 12)
        ok = tones[h[:, 1]] & pcs[:, np.arange(128) % 12].astype(bool)  # (H, 128)
        ok[~ok.any(axis=1)] = tones[h[~ok.any(axis=1), 1]]  # none of its tones: the whole chord
        return {
            "tones": tones,
            "parts": part_mask(vocab, self.parts),  # (P,)
            "chord": np.zeros(n_rows, dtype=np.int64),  # (B,) the sounding chord, 0: none
            "hedge_tick": h[:, 0],  # (H,)
            "hedge_chord": h[:, 1],  # (H,)
            "hedge_ok": ok,  # (H, 128)
        }

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        chord = own["chord"]
        if not vocab.harmony or not chord.any():
            return
        ok = own["tones"][chord]  # (B, 128); row 0 of the table (no chord) is all False
        if len(own["hedge_tick"]):
            i = np.searchsorted(own["hedge_tick"], state.tick, side="right") - 1  # (B,)
            hedged = (i >= 0) & (own["hedge_chord"][np.maximum(i, 0)] == chord)
            ok[hedged] = own["hedge_ok"][i[hedged]]
        ok[chord == 0] = True
        cand.on_ok[:, own["parts"], :] &= ok[:, None, :]

    def observe(self, tokens: np.ndarray, before: GrammarState, vocab: Vocab, own: Own) -> None:
        if not vocab.harmony:
            return
        is_chord = (tokens >= vocab.chord_base) & (tokens < vocab.HEADER)
        own["chord"][is_chord] = tokens[is_chord] - vocab.chord_base


@functools.cache
def chord_tone_table() -> np.ndarray:
    """(C, 128) bool, read-only: the pitches of each chord's tones (row 0, N: none)."""
    from .tokenizer.harmony import N_CHORDS, chord_tones

    tones = np.zeros((N_CHORDS, 128), dtype=bool)
    for c in range(1, N_CHORDS):
        tones[c] = np.isin(np.arange(128) % 12, list(chord_tones(c)))
    tones.flags.writeable = False
    return tones


@dataclass(frozen=True)
class TimeLimit(Constraint):
    """A row's time may not pass `max_tick` (ticks of token time; None: no limit): a ceiling.

    Hard: still applied when a row falls back. `passable`: a wait drawn may still pass it when
    asked (`ConstraintSet.clip(pass_end=True)`): the end of a live request, where the model's
    time is its own to choose. A new limit is a new spec (`ConstraintSet.replace`).
    """

    max_tick: int | None = None
    passable: bool = False
    hard = True

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        if self.max_tick is not None:
            np.minimum(cand.ceiling, self.max_tick, out=cand.ceiling)


@dataclass(frozen=True)
class EndNotBefore(Constraint):
    """The closing token (EOS, an infill section's end) not before `tick` of token time: an
    infill's middle runs to the gap's end, not to where the model first thinks of stopping (a
    middle closed early came back with a third of the real melody's notes)."""

    tick: int
    hard = True

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab, own: Own) -> None:
        cand.end_ok &= state.tick >= self.tick


@dataclass(frozen=True)
class BeatGrid(Constraint):
    """Sampled time lands on a beat grid: generated notes start (and end) on the grid of a tempo
    someone else keeps (a DAW's MIDI clock), so the accompaniment stays with it.

    The grid: `origin_tick + k * step_ticks` (float ticks, rounded), e.g. 16ths at 120 bpm are
    12.5 ticks of 10 ms. A sampled shift is moved to the grid point nearest to where it would
    land, never to now or before (the next point then). The model's rhythm is kept, quantized.
    Works through `ConstraintSet(clip_time=True)` (live sessions); a live session moves its grid
    with `LiveSession.set_grid` (the tempo changed), `BeatGrid(None)` is no grid.
    """

    step_ticks: float | None = None
    origin_tick: float = 0.0
    grid: tuple[float, float] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.step_ticks is not None and self.step_ticks < 1.0:
            raise ValueError(f"a grid step must be at least 1 tick, got {self.step_ticks}")
        step = self.step_ticks
        _set(self, grid=None if step is None else (float(step), float(self.origin_tick)))

    def retime(self, now: int, target: int) -> int:
        if self.grid is None:
            return target
        step, origin = self.grid
        k = math.floor((target - origin) / step + 0.5)  # the nearest point (half up)
        while (snapped := math.floor(origin + k * step + 0.5)) <= now:
            k += 1  # a shift always moves time forward: the next point
        return snapped

    def event_tick(self, now: int) -> int:
        # Off the grid (time stopped at a request's end, or a player's event): the next point.
        if self.grid is None:
            return now
        step, origin = self.grid
        k = math.ceil((now - origin) / step - 1e-9)
        while (point := math.floor(origin + k * step + 0.5)) < now:
            k += 1
        return point


def restrict_lead_in(cand: Candidates) -> None:
    """A response's lead-in (`LiveSession.generate(lead_in=True)`): no time token, note-off or
    end before its first note-on, so the response starts at its start tick (the gap before it
    was the player's silence). Not hard: a row with nothing else falls back as usual."""
    cand.time_ok[:] = False
    cand.off_ok[:] = False
    cand.end_ok[:] = False
