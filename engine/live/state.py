"""One live session's state: its sequence, constraint state, requests and forced events.

Touched by the scheduler thread only, through a small interface: `apply(command)`, `prepare()`
before the forward, `pending_tokens()`/`fed(n)` for the cache, `mask()`, then `accept(token)` or
`reject(token, back_off)` for the token drawn. The scheduler owns the decoder: the state only
counts how many of its context tokens the cache holds (`cached`); the scheduler crops the cache
to that count before it forwards.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

from ..constraints import Parts, part_mask
from ..context import slide_context
from ..tokenizer.vocab import TokenType, Vocab
from . import policy
from .history import History
from .shadow import Shadow, kept_suffix
from .timing import Timing
from .types import (
    Append,
    Cancel,
    CancelFence,
    ClockFn,
    Close,
    Command,
    Crop,
    Done,
    Event,
    Generate,
    Insert,
    Open,
    Request,
    Reset,
    Rollback,
    RollbackTo,
    SamplingParams,
    Schedule,
    SetClock,
    SetConstraint,
    SetSampling,
    Status,
    Token,
)

logger = logging.getLogger(__name__)

LOGITS_KEPT = 40  # logits kept per session: a note's retries, one per VEL drawn (32 bins)
MARKS_KEPT = 512  # written marks kept for rollback (the oldest are forgotten past this)


@dataclasses.dataclass
class ScheduledMark:
    """A mark of the session's schedule (`LiveSession.schedule`): its tokens are forced at
    `tick`; `at` is the position its tokens were written at (None: not written yet, or rolled
    back: written again when the model's time comes back to it)."""

    tick: int
    tokens: list[int]
    at: int | None = None


class SessionState:
    """A live session as the scheduler thread sees it."""

    def __init__(
        self,
        sid: int,
        slot: int,
        vocab: Vocab,
        history: History,
        prompt: list[int],
        sampling: SamplingParams,
        seed: int,
        clock: ClockFn | None,
        fence: CancelFence,
        emit: Callable[[Event], None],
        publish: Callable[[Status], None],
        timing: Timing,
        batch: bool = False,
    ) -> None:
        cs = history.cs
        # An offline job's session: the scheduler serves it after the live ones (`_admit`).
        self.batch, self.served_step = batch, -1
        self.id, self.slot, self.vocab, self.cs = sid, slot, vocab, cs
        self.tables = cs.tables
        self.sampling, self.seed, self.clock = sampling, seed, clock
        self._prompt = prompt
        self._fence, self._emit, self._publish, self._timing = fence, emit, publish, timing
        # (P,) parts this session's requests never play (a player's, or none): their events are
        # what a wait may have been waiting for (`policy.backs_off`).
        self.foreign = np.zeros(vocab.n_parts, dtype=bool)
        for c in cs.constraints:
            if isinstance(c, Parts):
                self.foreign |= ~part_mask(vocab, c.allowed)
        # (P,) the foreign parts whose notes end with an OFF (not drums), or None if none
        off_parts = self.foreign & ~cs.drums_mask
        self.foreign_offs = off_parts if off_parts.any() else None
        self.history = history
        self.closed = False
        self.req: Request | None = None
        self._forced: list[tuple[int, int, list[int]]] = []  # heap of (tick, seq, tokens)
        self._forced_seq = itertools.count()
        self._sched: list[ScheduledMark] = []  # the schedule, by tick (written ones first)
        self._unwritten = 0  # _sched[:_unwritten] are written (a hint: `_next_mark` moves it)
        self.marks = policy.Marks()
        self.shadow: Shadow | None = None  # the slid context being prefilled (ContextSlider)
        self.cached = 0  # tokens of the context the cache holds (the scheduler syncs to it)
        self.lag = [0, 0]  # the clock floor's pushes and the ticks they added
        # Tokens removed by rollbacks (a player's event before the model's time, crop; not a
        # rejected note's quiet cut): work thrown away. The scheduler adds them to
        # stats["tokens_cut"] and zeroes this.
        self.tokens_cut = 0
        # (position, gap, wait): the draw at `position` is behind the clock floor by `gap`
        # ticks; a wait drawn there must last `wait` (prepare, _accept)
        self._floor_draw: tuple[int, int, int] | None = None
        self._lead_s = 0.0  # the clock floor's lead this step (Timing.lead_s)
        self._clear()

    # --- reads (scheduler thread) -----------------------------------------------------------------
    @property
    def position(self) -> int:
        return self.history.position

    @property
    def tick(self) -> int:
        return self.history.tick

    def ctx_len(self) -> int:
        return self.history.ctx_len()

    def at_boundary(self) -> bool:
        """No pair is left open at the end (an event may be inserted, the context slid)."""
        return self.history.at_boundary()

    def grammar_boundary(self) -> bool:
        return self.history.grammar_boundary()

    def sounding(self) -> np.ndarray:
        """(P, 128) bool: the notes sounding now."""
        return self.cs.state.sounding[0]

    def vel_held(self) -> bool:
        """The last token is a sampled VEL, not sent yet (its ON is drawn next)."""
        if not self._held:
            return False
        last = self._held[-1]
        return last.position == self.position - 1 and self._is(last.token, TokenType.VELOCITY)

    def draw_seed(self) -> int:
        return policy.draw_seed(self.seed, self.marks, self.position)

    def status(self) -> Status:
        h = self.history
        return Status(
            self.slot, h.position, h.tick, h.base, self.req is not None, self.closed, *self.lag
        )

    def _is(self, tok: int, ty: TokenType) -> bool:
        return self.tables.type_list[tok] == ty

    # --- the cache --------------------------------------------------------------------------------
    def pending(self) -> int:
        """Context tokens the cache does not hold yet."""
        return self.ctx_len() - self.cached

    def pending_tokens(self) -> list[int]:
        return self.history.context_from(self.cached)

    def fed(self, n: int) -> None:
        """The scheduler fed n pending tokens to the cache."""
        self.cached += n

    def _logits_key(self) -> tuple[int, int]:
        return self.position, self.history.last()

    def keep_logits(self, row: Tensor) -> Tensor:
        """Keep the logits (V,) at the current position (a copy: a decoder may reuse its output
        buffer), dropping the oldest beyond LOGITS_KEPT. A rejected note draws its VEL again from
        the logits before it, and the ON after a VEL drawn before comes from that VEL's logits:
        most retries cost no forward (the VEL is then fed with its ON)."""
        self._logits[self._logits_key()] = row = row.clone()
        while len(self._logits) > LOGITS_KEPT:
            del self._logits[next(iter(self._logits))]
        return row

    def kept_logits(self) -> Tensor | None:
        """The logits at the current position, if kept: no forward needed to sample."""
        return self._logits.get(self._logits_key())

    # --- commands ---------------------------------------------------------------------------------
    def apply(self, cmd: Command) -> None:
        """A command from the session's handle, in call order."""
        match cmd:
            case Open():
                self.cached = 0
                self._push(self._prompt, given=True)
            case Append(tokens):
                self.finish("cancelled")
                self._to_boundary()
                self._push(tokens, given=True)
            case Insert(tick, tokens):
                tick = max(tick, self.history.given_tick)  # never before an earlier given event
                if tick < self.tick:  # the model ran past it: cut there, the gap stays silent
                    self._cut(self.history.position_after_tick(tick), keep_given=True)
                    self._to_boundary()
                    self._insert_now(tick, tokens)
                elif self.req is not None:  # force it when the generated time reaches it
                    heapq.heappush(self._forced, (tick, next(self._forced_seq), tokens))
                else:
                    self._to_boundary()
                    self._insert_now(tick, tokens)
            case Generate(req):
                self.finish("superseded")
                if req.lead_in_asked:
                    req.lead_in = req.start_tick if req.start_tick is not None else self.tick
                self.req = req
            case Cancel():
                self.finish("cancelled")
                self._to_boundary()
            case Crop(position):
                self._cut(position)
            case RollbackTo(tick):
                self._cut(self.history.position_after_tick(tick))
            case Reset(prompt):
                self.finish("reset")
                self.shadow = None
                self._forced.clear()
                self._clear()
                for m in self._sched:
                    m.at = None
                self._unwritten = 0
                self.cached = 0
                self._push(self._prompt if prompt is None else prompt, given=True)
            case Close():
                self.finish("closed")
                self.shadow = None
                self._forced.clear()
                self._sched.clear()
                self._unwritten = 0
                self.closed = True
            case SetConstraint(spec):
                self.cs.replace(spec)
            case SetSampling(sampling):
                self.sampling = sampling
                if sampling.seed is not None:
                    self.seed = sampling.seed
            case SetClock(clock):
                self.clock = clock
            case Schedule(from_tick, marks):
                self._schedule(from_tick, marks)
            case _:  # pragma: no cover - the union is closed
                raise ValueError(f"unknown command {cmd!r}")

    def publish(self) -> None:
        self._publish(self.status())

    # --- the step ---------------------------------------------------------------------------------
    def prepare(self, max_len: int, keep_len: int) -> bool:
        """Before the step's forward: forced events due, stop conditions, overflow. True if the
        context slid at once (it overflowed before its shadow was ready)."""
        req = self.req
        self._lead_s = self._timing.lead_s()
        if self.at_boundary():
            floor = self.clock_floor()
            if req is not None and self.clock is not None:
                self._floor_at = self._timing.now()
            while self._forced and (req is None or self._forced[0][0] <= floor):
                tick, _, tokens = heapq.heappop(self._forced)
                if not tokens:  # a decision point: the wait that reached it was cut there
                    self._cut_tick = tick
                    continue
                self._insert_now(max(tick, self.tick), tokens)
            if req is not None:  # marks due before the floor (without a request: with an event)
                self._write_marks(floor)
            if req is not None and req.start_tick is not None:  # generate(start_tick=)
                start, req.start_tick = req.start_tick, None
                self._push(self.vocab.time_tokens(start - self.tick), given=False)
            if (
                floor > self.tick
                and not self.marks.redrawing_wait(self.position)
                and not self._waited_for_floor()
            ):
                # Not while a wait is being drawn again here (it is drawn past the floor), nor
                # right after one was: the floor's lead allowed for the event after it.
                gap = floor - self.tick
                self.lag[0] += 1
                self.lag[1] += gap
                # (one step more than a push: the wait takes a step of its own to draw)
                step = int(np.ceil(self._timing.step_s_ema * self.vocab.ticks_per_second))
                longest = self._longest_wait()
                if longest >= gap + step:
                    # The model draws here, at its own time: an event it draws (it plays with
                    # the player's event just heard) goes out at the floor, as soon as it can
                    # be heard; a wait it draws ends at the floor or after it (drawn again if
                    # shorter: `_accept`), in its rhythm (the next beat or eighth). Pushed to
                    # the floor first instead, it drew there, a few ms after the player's
                    # event: at every rollback to one, a note off the grid.
                    self._floor_draw = (self.position, gap, gap + step)
                else:  # (a wait that long can't be drawn, or no time may pass: a lead-in)
                    # The model's own wait (a rollback undoes it; the event drawn after it may
                    # still send it back to be drawn longer, where a longer one may be drawn:
                    # where no time may pass, a chord due to end, every OFF was drawn again
                    # here, behind the floor, one a step).
                    wait = self.vocab.time_tokens(gap)
                    self._push(wait, given=False)
                    if len(wait) == 1 and longest > gap:
                        self.marks.backoff = (self.position - 1, gap)
            if req is not None:
                if req.until_tick is not None and self.tick >= req.until_tick:
                    self.finish("until_tick")
                elif req.max_tokens is not None and req.n >= req.max_tokens:
                    self.finish("max_tokens")
        slid = self.ctx_len() > max_len
        if slid:  # the slid context was not ready in time
            self._slide(keep_len)
        if self.req is not None and self.pending() == 0 and self.kept_logits() is None:
            self.cached -= 1  # re-run the last token for its logits
        return slid

    def _waited_for_floor(self) -> bool:
        """The last token is a wait drawn to end at or after the clock floor (`min_wait`)."""
        mw = self.marks.min_wait
        return mw is not None and mw[0] == self.position - 1

    def _longest_wait(self) -> int:
        """The longest single wait (ticks) the running request may draw now (at a boundary; 0:
        none, no time may pass)."""
        v = self.vocab
        shifts = self.mask()[v.shift_base : v.long_base]  # (n_shift,) bool
        ticks = self.tables.time_ticks[: v.long_base - v.shift_base]  # (n_shift,)
        return int(ticks[shifts].max(initial=0))

    def clock_floor(self) -> int:
        """The earliest token time the running request may place its next event at: the clock's
        now plus the time to draw and send that event (before the request's end). Without it, a
        model behind real time (after a rollback to a player's event, or under load) writes
        events into the past: they sound late, and its history says otherwise."""
        req, clock = self.req, self.clock
        if req is None or clock is None:
            return self.tick
        floor = int(np.ceil(clock() + self._lead_s * self.vocab.ticks_per_second))
        if req.until_tick is not None:  # room for one event: a response is never pushed empty
            floor = min(floor, req.until_tick - 1)
        return max(floor, self.tick)

    def mask(self) -> np.ndarray:
        """(V,) bool: what the running request may sample now."""
        req = self.req
        assert req is not None
        # The session's ticks run on over infill sections; the grammar's restart with each:
        # limits are moved to the grammar's time.
        offset = self.tick - int(self.cs.tick[0])
        stop = self._next_stop()
        limit = None if stop is None else stop - offset
        end = None if req.until_tick is None else req.until_tick - offset
        m = self.cs.allowed(limit, end, lead_in=req.lead_in is not None)[0]
        if req.max_tokens is not None and req.max_tokens - req.n == 1:
            # The last token must not open a pair (the request would end mid-event).
            closed = m.copy()
            closed[self.tables.ids[TokenType.PART]] = False
            closed[self.tables.ids[TokenType.VELOCITY]] = False
            if closed.any():
                m = closed
        if self.at_cut() and not self.vel_held():
            # At a decision point, no note ends: the model reads the cut wait as its own choice
            # to act there, and ends drawn there are the cut's (20-song card: polyphony -3% and
            # -6% in two runs with this rule, -14% without; near an eighth 78.7%, 77.4%, 76.1%).
            # (A wait of the model's own that ends there counts too: it was so measured.)
            keep = m.copy()
            keep[self.tables.ids[TokenType.NOTE_OFF]] = False
            if keep.any():
                m = keep
        return m

    def at_cut(self) -> bool:
        """The event drawn now starts at a decision point its wait was cut at (no event of
        any part there yet; the VEL of a note counts as not yet)."""
        if self._cut_tick != self.tick:
            return False
        back = 2 if self.vel_held() else 1
        if self.position - back < self.history.base:
            return False
        return self._is(self.history.since(self.position - back)[0], TokenType.TIME)

    def _next_stop(self) -> int | None:
        """The tick of the next forced event or scheduled mark: a wait drawn ends there."""
        ahead = [self._forced[0][0]] if self._forced else []
        if (m := self._next_mark()) is not None:
            ahead.append(m.tick)
        return min(ahead) if ahead else None

    def accept(self, tok: int) -> None:
        """A token drawn for the running request (dropped if it was cancelled meanwhile)."""
        with self._fence.lock:
            self._accept(tok)

    def reject(self, tok: int, back_off: bool) -> bool:
        """The event drawn (`tok`) is one the constraints forbid (policy.rejected): draw the
        wait before it again, longer (`back_off`), or else the note again (its held VEL is cut:
        no event was sent for it). False if the request was cancelled meanwhile."""
        with self._fence.lock:
            req = self.req
            if req is None or not self._fence.live(req.id):
                return False  # cancelled meanwhile: the cancel cuts the VEL
            if back_off:
                self._back_off(bool(self.foreign[self.vocab.note_of(tok)[0]]))
                return True
            r = self.marks.retries_here(self.position)
            if self.vel_held():
                self._cut(self.position - 1, quiet=True)
                req.n -= 1
            # (an OFF that can't send its wait back: drawn again too, with the next seed; a
            # draw depends on (seed, position) only, so returning here would repeat it forever)
            self.marks.retry_at, self.marks.retries = self.position, r + 1
            return True

    def finish(self, reason: str) -> None:
        """End the running request (if any) with `reason`."""
        if self.req is None:
            return
        req, self.req = self.req, None
        if reason == "cancelled":
            self._held = []  # nothing of a cancelled request is sent
        elif reason != "superseded":  # (the next request sends them with its first event)
            for h in self._held:
                if not self._is(h.token, TokenType.VELOCITY):
                    self._emit(h)
            self._held = []
        tick = self.tick
        if reason == "until_tick" and req.until_tick is not None:
            tick = min(tick, req.until_tick)  # the last wait drawn may pass the end (_accept)
        self._emit(Done(self.id, req.id, reason, self.position, tick))

    def adopt_shadow(self, sh: Shadow) -> None:
        """The shadow slot holds `sh.tokens()`: it becomes this session's context (the
        scheduler moves it into this session's slot)."""
        self.shadow = None
        self._rebase(sh.head(), sh.base())
        self.cached = self.ctx_len()

    # --- internals --------------------------------------------------------------------------------
    def _clear(self) -> None:
        # Sampled tokens not sent yet: a VEL until its ON is accepted, a wait (time tokens) until
        # the event after it is (either may still be drawn again: policy).
        self._held: list[Token] = []
        self.marks.clear_waits()
        # When the clock floor was last checked (Timing.now), until the next ON or OFF goes out:
        # that wait is the event lead the floor must allow for.
        self._floor_at: float | None = None
        # The last LOGITS_KEPT logits (V,) the model gave, by (position, token before it).
        self._logits: dict[tuple[int, int], Tensor] = {}
        # The tick of the last decision point reached (a forced event with no tokens: an
        # eighth-note position, `generation.eighth_cuts`; `at_cut`)
        self._cut_tick = -1
        self.history.clear()

    def _push(self, tokens: Sequence[int], given: bool) -> None:
        req = self.req
        if req is not None and req.lead_in is not None:  # an ON at or after it ends the lead-in
            tick = self.tick
            for t in tokens:
                if self._is(t, TokenType.NOTE_ON) and tick >= req.lead_in:
                    req.lead_in = None
                    break
                tick += self.vocab.shift_ticks(t)
        self.history.push(tokens, given)

    def _cut(self, position: int, keep_given: bool = False, quiet: bool = False) -> None:
        """Roll back to `position` (clamped to the window, and to the given tokens if
        keep_given; moved back to an event boundary); emits Rollback if anything was removed
        (unless quiet: nothing the listener saw was removed)."""
        h = self.history
        floor = max(h.base, 1, h.given_upto if keep_given else 0)
        p = min(max(position, floor), h.position)
        p = h.boundary_before(p, max(h.base, 1))
        if p >= h.position:
            return
        if not quiet:  # (a rejected note's quiet cut is notes_rejected's)
            self.tokens_cut += h.position - p
        h.truncate(p)
        for m in self._sched:  # marks cut away are written again when their time comes back
            if m.at is not None and m.at >= p:
                m.at = None
        self._unwritten = 0
        self.cached = min(self.cached, self.ctx_len())
        if self.shadow is not None and not self.shadow.cut(p):
            self.shadow = None  # dropped: made again later
        # Logits at q depend on the tokens before q: kept up to q = p + 1, whose key names the
        # token at p (another token pushed there misses).
        for k in [k for k in self._logits if k[0] > p + 1]:
            del self._logits[k]
        self._held = [x for x in self._held if x.position < p]
        self.marks.clear_waits()
        self._floor_draw = None
        if not quiet:
            self._emit(Rollback(self.id, p, self.tick))

    def _to_boundary(self) -> None:
        if not self.at_boundary():
            self._cut(self.position - 1)

    def _insert_now(self, tick: int, tokens: list[int]) -> None:
        """At an event boundary with time <= tick: the marks due up to tick, time tokens up to
        tick, then the tokens."""
        self._write_marks(tick)
        gap = tick - self.tick  # <= 0 only when clamped at the window start: inserted late
        self._push(self.vocab.time_tokens(gap) + tokens, given=True)

    # --- the schedule (marks of the session's clock and chart) --------------------------------
    def _next_mark(self) -> ScheduledMark | None:
        # (from the hint: a scan of every kept mark, up to MARKS_KEPT, ran at every step)
        sched, i = self._sched, self._unwritten
        while i < len(sched) and sched[i].at is not None:
            i += 1
        self._unwritten = i
        return sched[i] if i < len(sched) else None

    def _write_marks(self, upto: int) -> None:
        """Write the scheduled marks due at or before `upto` (at an event boundary), each at its
        tick (or now, if the model's time is past it). Not given: a player's event before one
        rolls it back, and it is written again."""
        while (m := self._next_mark()) is not None and m.tick <= upto:
            self._push(self.vocab.time_tokens(max(m.tick - self.tick, 0)), given=False)
            m.at = self.position
            self._push(m.tokens, given=False)
            if not m.tokens and m.tick == self.tick:  # a decision point (an eighth): the
                self._cut_tick = m.tick  # wait that reached it was cut (one written late: not)
        if self._unwritten > 2 * MARKS_KEPT:  # the oldest written marks are forgotten
            drop = self._unwritten - MARKS_KEPT
            del self._sched[:drop]
            self._unwritten -= drop

    def _schedule(self, from_tick: int, marks: tuple[tuple[int, tuple[int, ...]], ...]) -> None:
        """Replace the schedule from `from_tick` on; what the model wrote after a mark that
        moves (or comes before its time) is rolled back to it."""
        # A mark the new schedule keeps as it was stays written (a clock re-anchored on the
        # same beats rolls nothing back).
        old = {(m.tick, tuple(m.tokens)): m.at for m in self._sched if m.tick >= from_tick}
        new = [ScheduledMark(t, list(toks), old.pop((t, tuple(toks)), None)) for t, toks in marks]
        self._sched = [m for m in self._sched if m.tick < from_tick] + new
        self._unwritten = 0
        # (a decision point, no tokens, that moved or came late rolls nothing back: it wrote
        # nothing, and the model's waits are cut at the next one)
        cut = [at for (_, toks), at in old.items() if at is not None and toks]
        late = [m.tick for m in new if m.at is None and m.tick < self.tick and m.tokens]
        if late:
            cut.append(self.history.position_after_tick(min(late)))
        if cut:
            self._cut(min(cut), keep_given=True)
            self._to_boundary()

    def _slide(self, keep_len: int) -> None:
        """Context overflow: header + the last keep_len tokens, prefilled from position 0 (at
        once: this session waits for it; the shadow prefill normally spares it that)."""
        self.shadow = None
        h = self.history
        new = slide_context(h.head + h.hist, self.vocab, keep_len)
        kept = kept_suffix(self.vocab, new, h.hist)
        self._rebase(new[: len(new) - kept], self.position - kept)
        self.cached = 0
        logger.info("session %d: context full, slid at once (it waits for the prefill)", self.id)

    def _rebase(self, head: list[int], new_base: int) -> None:
        self.history.rebase(head, new_base)
        self._logits.clear()  # another context: other logits

    def _accept(self, tok: int) -> None:
        req = self.req
        if req is None or not self._fence.live(req.id):
            return
        v = self.vocab
        if tok == v.EOS:
            self.finish("eos")
            return
        if (fd := self._floor_draw) is not None and fd[0] == self.position:
            self._floor_draw = None
            if self.tables.type_list[tok] == TokenType.TIME:
                if v.shift_ticks(tok) < fd[2]:  # drawn again, past the floor (policy.draw)
                    self.marks.min_wait = (self.position, fd[2], 0)
                    return
            else:  # an event: at the floor (the wait it adds may still be sent back)
                wait = v.time_tokens(fd[1])
                self._push(wait, given=False)
                if len(wait) == 1:
                    self.marks.backoff = (self.position - 1, fd[1])
        # A shift past the time ceiling ends on it; a note may move to a BeatGrid point, unless
        # it sounds with a player's event (given tokens at this tick).
        onset_free = self.history.given_tick == self.tick
        toks = self.cs.clip(tok, onset_free=onset_free)
        is_wait = self.tables.type_list[tok] == TokenType.TIME
        if is_wait and tok < v.long_base and req.until_tick is not None and toks != [tok]:
            # A wait cut at the request's end would leave the model at a time it did not choose
            # (the next request draws there: a live accompaniment's horizon moves every 50 ms);
            # a SHIFT drawn goes past the end instead (not past the next forced event, or a
            # note's deadline; a LONG wait is still cut: a model's time never runs more than a
            # second past its request). A player's event before its end rolls it back, as for
            # any token sampled ahead.
            if self.tick + sum(v.shift_ticks(t) for t in toks) == req.until_tick:
                toks = self.cs.clip(tok, onset_free=onset_free, pass_end=True)
        for t in toks:
            self._push([t], given=False)
            req.n += 1
            ev = Token(self.id, req.id, t, self.position - 1, self.tick)
            tt = self.tables.type_list[t]
            if tt == TokenType.VELOCITY or tt == TokenType.TIME:
                self._held.append(ev)  # sent with the event after it: it may be drawn again
                continue
            for x in self._held:  # accepted: sent under the running request
                self._emit(dataclasses.replace(x, request=req.id))
            self._held = []
            self._emit(ev)
            if self._floor_at is not None and tt in (TokenType.NOTE_ON, TokenType.NOTE_OFF):
                self._timing.event_out(self._timing.now() - self._floor_at)
                self._floor_at = None
        if is_wait and len(toks) == 1:  # (a time token clips to time tokens)
            self.marks.backoff = (self.position - 1, v.shift_ticks(toks[0]))
        if self.at_boundary():
            if req.max_tokens is not None and req.n >= req.max_tokens:
                self.finish("max_tokens")
            elif req.until_tick is not None and self.tick >= req.until_tick:
                self.finish("until_tick")

    def _back_off(self, foreign: bool) -> None:
        """The event drawn after a wait is one the constraints forbid (a melody note, under
        "accompaniment only"; `foreign`: another part's): the model waited for that event. It
        did not come, so the wait is drawn again, longer: for another part's event, to the next
        forced event or mark at least (the player's next note, a beat, an eighth-note decision
        point, where known: the model waits for the player to play, and decides again there;
        one tick longer at a time, it drew the player's note again and again, and when
        MAX_BACKOFFS ran out, the mask drew a note at whatever time that was). Drawing another event in its place instead (the mask) would turn
        every melody note the model expects into an accompaniment note; waiting longer thins the
        melody out of the model's stream (competing events: the accompaniment's next event is
        later than the melody's the model expected). Nothing after the wait was sent (held), so
        the cut is quiet, unless the wait itself was (an earlier request ended with it).
        Under `generate(redraw_waits=True)` (infill) the wait is drawn again from the same
        distribution instead, with a fresh seed (policy, "Waits drawn again afresh")."""
        m, req = self.marks, self.req
        assert m.backoff is not None
        p, ticks = m.backoff
        mw = m.min_wait
        n = mw[2] + 1 if mw is not None and mw[0] == p else 1
        removed = self.position - p
        self._cut(p, quiet=any(x.position == p for x in self._held))
        if req is not None and req.redraw_waits:
            req.redraws[p] = req.redraws.get(p, 0) + 1
            m.salt += 1
        else:
            need = ticks + 1
            if foreign and (stop := self._next_stop()) is not None:
                need = max(need, min(stop - self.tick, self.vocab.config.max_shift_ticks))
            m.min_wait = (p, need, n)
        if req is not None:
            req.n = max(0, req.n - removed)
