"""The grammar plus user constraints, for B rows: one combined mask per decode step.

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
decode step. Constraints are immutable specs (improv.engine.constraints): the set keeps what
each needs per row beside it, so one list of specs can configure many sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from .constraints import ChordsFitMelody, Constraint, Own, restrict_lead_in
from .grammar import (
    BOUNDARY,
    NO_LIMIT,
    Candidates,
    GrammarState,
    Phase,
    Tables,
    advance,
    advance_one,
    assemble,
    assemble_one,
)
from .tokenizer.vocab import TokenType, Vocab

logger = logging.getLogger(__name__)


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
        self.tables = Tables(vocab)
        self.drums_mask = self.tables.drums_mask  # (P,)
        self.ceiling = np.full(n_rows, NO_LIMIT, dtype=np.int64)  # (B,) as of the last mask
        self.wait_ceiling = self.ceiling.copy()  # (B,) the same, passable limits passed
        self.constraints: list[Constraint] = list(constraints)
        self._own: list[Own] = [c.init(vocab, n_rows) for c in self.constraints]
        self.state = GrammarState(vocab, n_rows)

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
        return int(self.state.phase[row]) in BOUNDARY

    def chord_pool(self, row: int = 0) -> np.ndarray | None:
        """(C,) bool: the chords a row's own chord change may be drawn among now (a
        `ChordsFitMelody`), or None: any the mask allows."""
        for c, own in zip(self.constraints, self._own, strict=True):
            if isinstance(c, ChordsFitMelody):
                return c.pool(int(self.state.tick[row]), own)
        return None

    def find(self, kind: type[Constraint]) -> Constraint | None:
        """The first constraint of this class (a spec: read its settings)."""
        return next((c for c in self.constraints if isinstance(c, kind)), None)

    def replace(self, spec: Constraint) -> None:
        """Swap in a new spec for the first constraint of its class (added if there is none):
        a setting changed. Per-row state is kept (it must keep its shapes)."""
        own = spec.init(self.vocab, self.n_rows)
        i = next((i for i, c in enumerate(self.constraints) if type(c) is type(spec)), None)
        if i is None:
            self.constraints.append(spec)
            self._own.append(own)
            return
        old = self._own[i]
        for k in spec.row_fields:
            if old[k].shape != own[k].shape:
                raise ValueError(
                    f"{type(spec).__name__}: the new settings change the per-row state's "
                    f"shape ({k}: {old[k].shape} -> {own[k].shape}); open a new session instead"
                )
            own[k] = old[k]
        self.constraints[i], self._own[i] = spec, own

    def snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        """A copy of all per-row state, for rollback with `restore`."""
        snap = {"grammar": self.state.get_state()}
        for i, (c, own) in enumerate(zip(self.constraints, self._own, strict=True)):
            snap[f"c{i}"] = {k: own[k].copy() for k in c.row_fields}
        return snap

    def restore(self, snap: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.state.set_state(snap["grammar"])
        for i, own in enumerate(self._own):
            for k, val in snap.get(f"c{i}", {}).items():  # (one added since has none)
                own[k][...] = val

    def reset(self) -> None:
        """Back to before BOS, every row (the constraints' settings are kept)."""
        self.state = GrammarState(self.vocab, self.n_rows)
        self._own = [c.init(self.vocab, self.n_rows) for c in self.constraints]

    # --- advancing ----------------------------------------------------------------------------
    def observe(self, tokens: np.ndarray | Sequence[int] | torch.Tensor) -> None:
        """Advance every row by one token; tokens: (B,) ids."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        tok = np.asarray(tokens, dtype=np.int64).reshape(self.n_rows)  # (B,)
        for c, own in zip(self.constraints, self._own, strict=True):
            c.observe(tok, self.state, self.vocab, own)
        if self.n_rows == 1:
            advance_one(self.state, int(tok[0]), self.tables)
        else:
            advance(self.state, tok, self.tables)

    def feed(self, tokens: Iterable[int], row: int = 0) -> None:
        """Advance one row by several tokens (prompt or player tokens); other rows get PAD."""
        pad = np.full(self.n_rows, self.vocab.PAD, dtype=np.int64)
        for t in tokens:
            pad[row] = t
            self.observe(pad)
        # PAD leaves every state unchanged, so the other rows did not move.

    # --- masks --------------------------------------------------------------------------------
    def _candidates(
        self,
        hard_only: bool = False,
        limit: int | None = None,
        end: int | None = None,
        lead_in: bool = False,
    ) -> Candidates:
        v, s, t = self.vocab, self.state, self.tables
        b, p = self.n_rows, v.n_parts
        cand = Candidates(
            on_ok=~s.sounding,
            off_ok=s.sounding & ~t.drums_mask[None, :, None],
            program_ok=np.ones((b, p, 128), dtype=bool),
            part_ok=np.ones((b, p), dtype=bool),
            time_ok=np.ones((b, t.n_time), dtype=bool),
            end_ok=np.full(b, self.allow_end, dtype=bool),
            ceiling=np.full(b, NO_LIMIT, dtype=np.int64),
        )
        passable = []
        for c, own in zip(self.constraints, self._own, strict=True):
            if c.passable:
                passable.append((c, own))
            elif c.hard or not hard_only:
                c.restrict(cand, s, v, own)
        if limit is not None:
            np.minimum(cand.ceiling, limit, out=cand.ceiling)
        if lead_in and not hard_only:
            restrict_lead_in(cand)
        cand.wait_ceiling = cand.ceiling.copy()
        for c, own in passable:  # time limits: hard
            c.restrict(cand, s, v, own)
        if end is not None:
            np.minimum(cand.ceiling, end, out=cand.ceiling)
        room = cand.ceiling - s.tick  # (B,) ticks time may still advance
        if self.clip_time:  # any shift will do while there is room: `clip` shortens it
            cand.time_ok &= (room > 0)[:, None]
        else:
            cand.time_ok &= t.time_ticks[None, :] <= room[:, None]
        return cand

    def allowed(
        self, limit: int | None = None, end: int | None = None, lead_in: bool = False
    ) -> np.ndarray:
        """(B, V) bool: tokens each row may sample now. Never an all-False row.

        Per-call settings of a live request: `limit`, a hard time ceiling (the next forced
        event); `end`, a passable one (the request's end); `lead_in`: only a note may come next
        (`restrict_lead_in`)."""
        cand = self._candidates(False, limit, end, lead_in)
        self.ceiling, self.wait_ceiling = cand.ceiling, cand.wait_ceiling
        if self.n_rows == 1:
            mask = assemble_one(cand, self.state, self.tables)
        else:
            mask = assemble(cand, self.state, self.tables)
        empty = ~mask.any(axis=1)
        if empty.any():
            mask[empty] = self._fallback(np.nonzero(empty)[0], limit, end)
        return mask

    def _fallback(self, rows: np.ndarray, limit: int | None, end: int | None) -> np.ndarray:
        """Rows with nothing allowed: SHIFT_1 if the hard constraints allow it, else the end token."""
        v, s = self.vocab, self.state
        hard = assemble(self._candidates(True, limit, end), s, self.tables)[rows]  # (R, V)
        out = np.zeros_like(hard)
        end_tok = self.tables.end_by_section[s.section[rows]]
        for i, r in enumerate(rows):
            if hard[i, v.shift(1)]:
                out[i, v.shift(1)] = True
            elif s.phase[r] in (Phase.BODY, Phase.TARGETS, Phase.DONE):
                out[i, end_tok[i] if s.phase[r] != Phase.DONE else v.EOS] = True
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
        v, t = self.vocab, self.tables
        if not self.clip_time:
            return [token]
        now = int(self.state.tick[row])
        ty = t.type_list[token]
        if ty == TokenType.VELOCITY or ty == TokenType.NOTE_OFF:  # a note starts or ends
            if onset_free:
                return [token]
            start = max([now] + [c.event_tick(now) for c in self.constraints])
            if start == now:
                return [token]
            stop = min(start, int(self.ceiling[row]))
            if stop == now:  # at the ceiling already: the note can't move
                return [token]
            return v.time_tokens(stop - now) + ([token] if stop == start else [])
        if ty != TokenType.TIME:
            return [token]
        target = want = now + t.ticks_list[token]
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
        """Feed tokens to one row, masking each first; index of the first disallowed, or None.

        An instrumentation header right after the task token is accepted: it is given in
        prompts, never sampled, so the masks never allow it."""
        v = self.vocab
        prev = -1
        for i, t in enumerate(tokens):
            in_header = self.phase[row] == Phase.HEADER or (
                t == v.HEADER and v.harmony and v.TASK_CONTINUE <= prev <= v.TASK_ACCOMPANY
            )
            if not in_header and not self.allowed()[row, t]:
                return i
            prev = t
            pad = np.full(self.n_rows, self.vocab.PAD, dtype=np.int64)
            pad[row] = t
            self.observe(pad)
        return None
