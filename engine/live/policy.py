"""Musical policy between masking and sampling: which drawn notes to reject, and back-off.

The ON after a sampled VEL is drawn from every ON of a part the constraints close entirely (the
melody, under "accompaniment only") and every key that sounds already; such a note rejects the
whole note (VEL too) and the row draws again. A part they only narrow (a pitch range, the chord's
tones) draws among its allowed notes. Masking it instead would turn the note the model meant
(a melody note, under "accompaniment only") into another one: accompaniment on every melody
note. Bounded: after MAX_NOTE_RETRIES, the mask. Greedy rows keep the mask (a retry would draw
the same note again).

With `Scheduler(note_share=True)` (off by default: a trained model's velocity depends on the
part, docs/engine-live.md, "Fewer wasted steps"),
one rejection is enough to mask the rest at a place no wait leads to (a note drawn at the time
of another event, a player's or its own): the rejected ON's draw gives the share of its
distribution the constraints allow (`share`, assumed the same whatever the velocity), so the
event is drawn again with the VELs' probability scaled by it and the ON after such a VEL is
drawn from the allowed ONs only: one rejected draw instead of up to MAX_NOTE_RETRIES, each a
step of that session's time.

Right after a wait the model drew, a rejected event means the model waited *for* it: if it is
another part's (a melody note or its end) or a note that sounds already, the wait is drawn
again, longer (`SessionState.reject(back_off=True)`; for another part's event, to the next
forced event or mark at least), up to MAX_BACKOFFS times at one place.

At a decision point (`SessionState.at_cut`: an eighth-note position a wait was cut at, docs/
engine-live.md, "Accompaniment as continuation") the draw is the masked one: the cut chose that
time, not the model, and a given part does not play there (it would have been forced).

Waits drawn again afresh (`generate(redraw_waits=True)`, infill): where every given event is
inserted before the request runs, a given part's event the model drew after its wait is known
not to come then (it would have been inserted at its time), so nothing says the model's own
next event comes later. The (wait, event) pair is drawn again from the same distribution (a
fresh seed), up to MAX_BACKOFFS times at one place: rejection sampling of the pair. Drawn
longer instead, the waits of a lead infilled under its song's other parts stretched past its
notes: 16 notes where six validation songs have 66 (redrawn: 58). Accompaniment keeps the
back-off: redrawn, its density went from +43% to +119% of the real piano's (same six songs).
Full reasoning and measurements: docs/engine-live.md.

The scheduler calls, per row: `draw(state, mask)` before sampling (the mask the draw uses, and
the constraints' own mask when it is wider), `rejected(draw, token)` after, and for a rejected
token `backs_off(state, token)`: the state does what it says. `Marks` is the policy's per-session
data (held by the session's state; a rollback clears the wait marks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..tokenizer.vocab import TokenType

if TYPE_CHECKING:
    from .state import SessionState

MAX_NOTE_RETRIES = 8  # draws of a note the constraints forbid, then the masked draw
MAX_BACKOFFS = 8  # times a wait is drawn longer at one position, then the masked draw
MIN_SHARE = 1e-6  # the smallest allowed share a redrawn note's VELs are scaled by


@dataclass
class Marks:
    """Where the policy stands in one session."""

    retry_at: int = -1  # position of the event whose note was rejected `retries` times
    retries: int = 0
    # (p, ticks): the token at position p is a wait of `ticks` the model chose (drawn, or the
    # clock floor's push), nothing sent after it; the event drawn after it may send it back.
    backoff: tuple[int, int] | None = None
    # (p, ticks, n): the draw at position p must wait at least `ticks` (its n-th back-off).
    min_wait: tuple[int, int, int] | None = None
    # The share of the last rejected ON's draw (at retry_at + 1) that the constraints allow.
    share: float | None = None
    salt: int = 0  # waits drawn again afresh so far: moves every later draw's seed

    def retries_here(self, position: int) -> int:
        """Notes rejected so far at the event starting at `position` (or at the VEL just
        sampled)."""
        return self.retries if self.retry_at in (position, position - 1) else 0

    def share_at(self, position: int, vel_held: bool) -> float | None:
        """The allowed share to draw with at `position`: the VEL's place after a rejected note
        there (the event drawn again), or the ON's after it (the ON then masked)."""
        if self.share is None or self.retry_at != position - (1 if vel_held else 0):
            return None
        return self.share

    def redrawing_wait(self, position: int) -> bool:
        """A wait sent back is being drawn again at `position`."""
        return self.min_wait is not None and self.min_wait[0] == position

    def clear_waits(self) -> None:
        self.backoff = self.min_wait = None


@dataclass
class Draw:
    """One row's draw: `mask` is what it may pick; `strict`, the constraints' mask where the
    policy widened it (a token outside it is rejected)."""

    mask: np.ndarray  # (V,) bool
    strict: np.ndarray | None = None  # (V,) bool
    vel_log_share: float = 0.0  # added to the VELs' log-probabilities (a note drawn again)
    # (C,) bool: a chord change is drawn among these chords, with the mass of all the chords
    # the mask allows (`ChordsFitMelody`)
    chord_pool: np.ndarray | None = None


def draw_seed(seed: int, marks: Marks, position: int) -> int:
    """The seed of this step's draw: the session's, or a fresh one for each retry of a rejected
    note (the draw depends on (seed, position) only, so a retry with the same seed would draw
    the same note again)."""
    r = marks.retries_here(position) + marks.salt
    return seed if r == 0 else (seed + r * 0x9E3779B97F4A7C15) & 0x7FFFFFFFFFFFFFFF


def waited_before(st: SessionState, at: int) -> bool:
    """The event drawn at position `at` directly follows a wait the model chose."""
    b = st.marks.backoff
    return b is not None and b[0] + 1 == at


def can_back_off(st: SessionState, at: int) -> bool:
    """The event drawn at position `at` directly follows a wait that may be drawn again."""
    m = st.marks
    b, mw = m.backoff, m.min_wait
    if b is None or not waited_before(st, at):
        return False
    if (req := st.req) is not None and req.redraw_waits:  # drawn again afresh, not longer
        return req.redraws.get(b[0], 0) < MAX_BACKOFFS
    if b[1] >= st.vocab.config.max_shift_ticks:
        return False
    return (mw[2] if mw is not None and mw[0] == b[0] else 0) < MAX_BACKOFFS


def draw(st: SessionState, mask: np.ndarray) -> Draw:
    """The mask a row draws from (`mask`: what its constraints allow, (V,) bool)."""
    d = _draw(st, mask)
    if not st.vel_held():
        d.chord_pool = st.cs.chord_pool()
    return d


def _draw(st: SessionState, mask: np.ndarray) -> Draw:
    v, m, pos = st.vocab, st.marks, st.position
    mw = m.min_wait
    if mw is not None and mw[0] == pos:  # a wait sent back: drawn longer
        # (a SHIFT: at most a second more at a time, so an accompaniment stays ready; and not
        # ending before the clock floor, which has moved on meanwhile)
        need = max(mw[1], st.clock_floor() - st.tick)
        n_shift = v.long_base - v.shift_base
        longer = np.zeros_like(mask)
        longer[v.shift_base : v.long_base] = mask[v.shift_base : v.long_base] & (
            st.tables.time_ticks[:n_shift] >= need
        )
        if longer.any():
            mask = longer
    if st.sampling.temperature <= 0 or m.retries_here(pos) >= MAX_NOTE_RETRIES or st.at_cut():
        return Draw(mask)
    held = st.vel_held()
    share = m.share_at(pos, held)
    if held and share is not None:  # its VEL was drawn with the allowed share: masked
        return Draw(mask)
    bias = math.log(max(share, MIN_SHARE)) if share is not None else 0.0
    if held:  # the ON after a VEL: from every ON of the parts it may not play
        on = st.tables.ids[TokenType.NOTE_ON]
        ons = mask[on].reshape(v.n_parts, 128)  # (P, 128)
        closed = ~ons.any(axis=1)  # (P,) parts with no allowed note: another's (the melody)
        # ...and keys that sound already (the model lost track of them: a rejected one sends
        # the wait back). A part that may play some notes (a pitch range, the chord's tones)
        # draws among them: the note it meant, moved into the chord, rather than none at all.
        wide = mask.copy()
        wide[on] = (ons | closed[:, None] | st.sounding()).reshape(-1)
        return Draw(wide, mask)
    foreign_offs = st.foreign_offs
    if foreign_offs is not None and can_back_off(st, pos) and st.grammar_boundary():
        # The event after a wait may end a note of a forbidden part (the melody note the model
        # expects to end): drawn, to send the wait back.
        sounding = st.sounding() & foreign_offs[:, None]  # (P, 128)
        wide = mask.copy()
        wide[st.tables.ids[TokenType.NOTE_OFF]] |= sounding.reshape(-1)
        return Draw(wide, mask, bias)
    return Draw(mask, None, bias)


def rejected(d: Draw, token: int) -> bool:
    return d.strict is not None and not d.strict[token]


def masks_after(st: SessionState) -> bool:
    """A rejected ON (its VEL held) that is drawn again masked, with the allowed share: not
    one right after a wait the model chose (what it waited for is the wait's to answer:
    back-off, or, when that is spent, a plain retry)."""
    return st.vel_held() and not waited_before(st, st.position - 1)


def remember_share(st: SessionState, share: float) -> None:
    """After a rejected ON (its VEL cut, `SessionState.reject`): the share of that ON's draw
    the constraints allowed, for drawing the event again."""
    st.marks.share = share


def backs_off(st: SessionState, token: int) -> bool:
    """A rejected `token` (an ON after a sampled VEL, or an OFF after a wait): if a wait came
    before it and it is another part's event, or a note that sounds already (the model lost
    track of it: nothing new would be heard), the wait is drawn again; else the note is drawn
    again before it."""
    part, pitch = st.vocab.note_of(token)
    waited = bool(st.foreign[part] or st.sounding()[part, pitch])
    return waited and can_back_off(st, st.position - 1 if st.vel_held() else st.position)
