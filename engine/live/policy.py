"""Musical policy between masking and sampling: which drawn notes to reject, and back-off.

The ON after a sampled VEL is drawn from every ON of a part the constraints close entirely (the
melody, under "accompaniment only") and every key that sounds already; such a note rejects the
whole note (VEL too) and the row draws again. A part they only narrow (a pitch range, the chord's
tones) draws among its allowed notes. Masking it instead would turn the note the model meant
(a melody note, under "accompaniment only") into another one: accompaniment on every melody
note. Bounded: after MAX_NOTE_RETRIES, the mask. Greedy rows keep the mask (a retry would draw
the same note again).

Right after a wait the model drew, a rejected event means the model waited *for* it: if it is
another part's (a melody note or its end) or a note that sounds already, the wait is drawn
again, longer (`SessionState.reject(back_off=True)`), up to MAX_BACKOFFS times at one place.
Full reasoning and measurements: docs/engine-live.md.

The scheduler calls, per row: `draw(state, mask)` before sampling (the mask the draw uses, and
the constraints' own mask when it is wider), `rejected(draw, token)` after, and for a rejected
token `backs_off(state, token)`: the state does what it says. `Marks` is the policy's per-session
data (held by the session's state; a rollback clears the wait marks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..tokenizer.vocab import TokenType

if TYPE_CHECKING:
    from .state import SessionState

MAX_NOTE_RETRIES = 8  # draws of a note the constraints forbid, then the masked draw
MAX_BACKOFFS = 8  # times a wait is drawn longer at one position, then the masked draw


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

    def retries_here(self, position: int) -> int:
        """Notes rejected so far at the event starting at `position` (or at the VEL just
        sampled)."""
        return self.retries if self.retry_at in (position, position - 1) else 0

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


def draw_seed(seed: int, marks: Marks, position: int) -> int:
    """The seed of this step's draw: the session's, or a fresh one for each retry of a rejected
    note (the draw depends on (seed, position) only, so a retry with the same seed would draw
    the same note again)."""
    r = marks.retries_here(position)
    return seed if r == 0 else (seed + r * 0x9E3779B97F4A7C15) & 0x7FFFFFFFFFFFFFFF


def can_back_off(st: SessionState, at: int) -> bool:
    """The event drawn at position `at` directly follows a wait that may be drawn again."""
    m = st.marks
    b, mw = m.backoff, m.min_wait
    if b is None or b[0] + 1 != at or b[1] >= st.vocab.config.max_shift_ticks:
        return False
    return (mw[2] if mw is not None and mw[0] == b[0] else 0) < MAX_BACKOFFS


def draw(st: SessionState, mask: np.ndarray) -> Draw:
    """The mask a row draws from (`mask`: what its constraints allow, (V,) bool)."""
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
    if st.sampling.temperature <= 0 or m.retries_here(pos) >= MAX_NOTE_RETRIES:
        return Draw(mask)
    if st.vel_held():  # the ON after a VEL: from every ON of the parts it may not play
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
        return Draw(wide, mask)
    return Draw(mask)


def rejected(d: Draw, token: int) -> bool:
    return d.strict is not None and not d.strict[token]


def backs_off(st: SessionState, token: int) -> bool:
    """A rejected `token` (an ON after a sampled VEL, or an OFF after a wait): if a wait came
    before it and it is another part's event, or a note that sounds already (the model lost
    track of it: nothing new would be heard), the wait is drawn again; else the note is drawn
    again before it."""
    part, pitch = st.vocab.note_of(token)
    waited = bool(st.foreign[part] or st.sounding()[part, pitch])
    return waited and can_back_off(st, st.position - 1 if st.vel_held() else st.position)
