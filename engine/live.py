"""Live sessions and the scheduler that advances them all in one batched forward per step.

    sched = Scheduler(engine, max_sessions=16)
    sched.start()                                           # one background thread
    s = sched.open_session([BOS, TASK_ACCOMPANY], constraints=[Parts(accompaniment_parts(v))],
                           sampling=SamplingParams(seed=1), on_event=callback)
    s.generate(until_tick=now + lookahead)                  # Token events stream out
    s.insert(tick, player_tokens)                           # roll back / force, then continue
    s.close()

Threading: the scheduler thread owns the decoder (model + KV cache) and every session's state.
Session methods, callable from any thread, only queue commands, applied in call order at the
start of the next step; events go to the session's callback (on the scheduler thread) or to its
`events` queue. Full design: docs/engine-live.md.

Sampling noise is keyed on (seed, position): the token at position p is drawn with a generator
seeded from the session seed and p, so a session's tokens depend only on its own prefix, never on
its batch mates, on how its tokens were split between prompt and appends, or on what it sampled
before a rollback (rollback then generate == fresh generation from the same prefix).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from .constraints import Constraint, ConstraintSet, Parts, TimeLimit
from .context import slide_context
from .decoder import Decoder
from .sampling import apply_mask, logits_to_probs, sample
from .tokenizer.vocab import TokenType, Vocab

C = TypeVar("C", bound=Constraint)
T = TypeVar("T")
logger = logging.getLogger(__name__)

SNAPSHOT_EVERY = 16  # constraint-state snapshots every N positions (at event boundaries)
MAX_NOTE_RETRIES = 8  # draws of a note the constraints forbid, then the masked draw
MAX_BACKOFFS = 8  # times a wait is drawn longer at one position, then the masked draw
REPORT_EVERY_S = 10.0  # the scheduler's load line in the log, while it works
LOGITS_KEPT = 40  # logits kept per session: a note's retries, one per VEL drawn (32 bins)
# Clock floor (LiveSession.clock): an event is due this long after the floor is checked, plus
# CLOCK_SLACK_S (the send): the EVENT_LEAD_Q quantile of that time as measured over the last
# EVENT_LEAD_N events of every clocked session, and at least CLOCK_STEPS scheduler steps (an EMA
# of their wall time: its VEL and ON are still to draw). The quantile counts what the average
# step misses: a rollback's prefill in the same step, redrawn notes, a PART/PROGRAM pair first.
CLOCK_STEPS = 2
CLOCK_SLACK_S = 0.002
EVENT_LEAD_Q = 0.95
EVENT_LEAD_N = 256
MAX_STEP_S = 0.1  # a longer step counts as this long in the step-time average


# --- public value types ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus mass
    min_p: float | None = None  # drop tokens below min_p * the top probability
    seed: int | None = None  # None: a random seed, fixed for the session's life

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")


@dataclass(frozen=True)
class Token:
    """A sampled token. position: its index in the session; tick: token time after it."""

    session: int
    request: int
    token: int
    position: int
    tick: int


@dataclass(frozen=True)
class Rollback:
    """Every token at index >= position is gone; retract generated events after `tick`."""

    session: int
    position: int
    tick: int


@dataclass(frozen=True)
class Done:
    """A request ended. reason: max_tokens, until_tick, eos, cancelled, superseded, reset,
    closed, error."""

    session: int
    request: int
    reason: str
    position: int
    tick: int


Event = Token | Rollback | Done
EventCallback = Callable[[Event], None]


@dataclass
class _Shadow:
    """A session's slid context, prefilled in the scheduler's shadow slot while it plays on."""

    new: list[int]  # slide_context at `start`: header + state + the window's tokens
    kept: int  # how many of new's last tokens are the session's own tokens before `start`
    start: int  # the session's position when it was made
    fed: int = 0  # tokens of `_shadow_tokens()` already in the shadow slot's cache


class SchedulerFull(RuntimeError):
    """Every session slot is taken."""


class EngineLike(Protocol):
    vocab: Vocab

    def new_decoder(self, max_batch: int, max_seq: int | None = None) -> Decoder: ...


@dataclass
class _Request:
    id: int
    max_tokens: int | None
    until_tick: int | None
    n: int = 0  # tokens sampled so far
    start_tick: int | None = None  # generate(start_tick=): time up to here first (then None)


# --- small pure helpers -----------------------------------------------------------------------------
def contiguous_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted slots -> [(start index, end index)) of runs of consecutive slot numbers."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def opens_pair(vocab: Vocab, tok: int) -> bool:
    """PART and VEL must be followed by their partner: no event boundary right after them."""
    return vocab.type_of(tok) in (TokenType.PART, TokenType.VELOCITY)


def kept_suffix(vocab: Vocab, new: Sequence[int], hist: Sequence[int]) -> int:
    """How many of hist's last tokens end `new` (a slid context), at an event boundary.

    `slide_context` returns header + state + a suffix of the old context; the longest common
    suffix is that window (or a little more, where the state's last tokens happen to equal the
    tokens before the cut: the token sequence is the same either way), shortened until the
    token before it closes its pair.
    """
    k, n = 0, min(len(new), len(hist))
    while k < n and new[-k - 1] == hist[-k - 1]:
        k += 1
    while 0 < k < len(new) and opens_pair(vocab, new[-k - 1]):
        k -= 1
    return k


# --- the session ------------------------------------------------------------------------------------
class LiveSession:
    """One live player's sequence: a cache slot, constraint state, requests, forced events.

    Public methods queue commands (any thread); underscored ones run on the scheduler thread.
    """

    def __init__(
        self,
        sched: Scheduler,
        sid: int,
        slot: int,
        prompt: list[int],
        constraints: Sequence[Constraint],
        sampling: SamplingParams,
        on_event: EventCallback | None,
        allow_end: bool,
    ) -> None:
        self._sched, self.id, self.slot = sched, sid, slot
        self._vocab = sched.vocab
        self.sampling = sampling
        self.seed = sampling.seed if sampling.seed is not None else random.getrandbits(62)
        self.events: queue.Queue[Event] = queue.Queue()
        self._on_event = on_event
        self._prompt = prompt
        self._limit = TimeLimit(passable=True)  # the running request's end
        self._next_forced = TimeLimit()
        # clip_time: a shift past the next forced event / the request's end is shortened to land
        # on it instead of being masked (masking would push the model into playing notes).
        self._cs = ConstraintSet(
            self._vocab,
            [*constraints, self._next_forced, self._limit],
            allow_end=allow_end,
            clip_time=True,
        )
        self._next_forced, self._limit = self._cs.constraints[-2:]  # the bound copies
        # (P,) parts this session's requests never play (a player's, or none): their events are
        # what a wait may have been waiting for (`_back_off`).
        self._foreign = np.zeros(self._vocab.n_parts, dtype=bool)
        for c in self._cs.constraints:
            if isinstance(c, Parts) and c.part_mask is not None:
                self._foreign |= ~c.part_mask
        # (P,) the foreign parts whose notes end with an OFF (not drums), or None if none
        off_parts = self._foreign & ~self._cs.drums_mask
        self._foreign_offs = off_parts if off_parts.any() else None
        self._state_lock = threading.Lock()  # guards the token lists against tokens() readers
        # Held while a token is checked and delivered, and by cancel(): once cancel() returns,
        # no Token of the cancelled request is delivered. Re-entrant: callbacks may cancel.
        self._deliver_lock = threading.RLock()
        self.closed = False
        self._close_sent = False
        # Scheduler-thread state.
        self._req: _Request | None = None
        self._forced: list[tuple[int, int, list[int]]] = []  # heap of (tick, seq, tokens)
        self._forced_seq = itertools.count()
        self._retry_at, self._retries = -1, 0  # rejected notes at a position (Scheduler._sample)
        self._shadow: _Shadow | None = None  # the slid context being prefilled beside this one
        # Real time, for a session that plays along with someone: the token time (ticks, a
        # float) it is now. With it, a request never places an event before it could be heard
        # (see _clock_floor). A plain attribute, read by the scheduler thread.
        self.clock: Callable[[], float] | None = None
        # Times the clock floor moved the model's time forward, and the ticks it moved in all.
        self.lag = {"pushes": 0, "ticks": 0}
        self._clear()
        # Published state (plain attributes: atomic reads from any thread).
        self.generating = False

    # --- public API (any thread) ----------------------------------------------------------------
    def append(self, tokens: Iterable[int]) -> None:
        """Given tokens at the end (they carry their own time). Cancels a running request."""
        toks = self._sched._check_tokens(tokens)
        self._sched._cancel_now(self)
        self._sched._submit(self, "append", toks)

    def insert(self, tick: int, tokens: Iterable[int] = ()) -> None:
        """A given event at absolute `tick` (see docs/engine-live.md: rollback or force)."""
        if tick < 0:
            raise ValueError(f"tick must be >= 0, got {tick}")
        self._sched._submit(self, "insert", (int(tick), self._sched._check_tokens(tokens)))

    def generate(
        self,
        max_tokens: int | None = None,
        until_tick: int | None = None,
        start_tick: int | None = None,
    ) -> int:
        """Sample up to max_tokens tokens / up to token time until_tick; returns the request id.

        Replaces a running request (it ends with reason "superseded"). `start_tick`: sample from
        that token time on: the time tokens up to it are appended first, in the same forward,
        as sampled (not given) tokens without Token events, so an insert before it rolls them
        back like the rest (the server's respond mode samples a response ahead of its start).
        """
        if max_tokens is None and until_tick is None:
            raise ValueError("generate needs max_tokens or until_tick (or both)")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if start_tick is not None and start_tick < 0:
            raise ValueError(f"start_tick must be >= 0, got {start_tick}")
        rid = self._sched._next_request_id()
        req = _Request(rid, max_tokens, until_tick, start_tick=start_tick)
        self._sched._submit(self, "generate", req)
        return rid

    def cancel(self) -> None:
        """Stop the running request; no further Token of it is delivered after this returns."""
        self._sched._cancel_now(self)
        self._sched._submit(self, "cancel", None)

    def crop(self, position: int) -> None:
        """Keep the first `position` tokens (moved back to an event boundary)."""
        self._sched._submit(self, "crop", int(position))

    def rollback_to_tick(self, tick: int) -> None:
        """Keep the tokens whose token time is <= tick."""
        self._sched._submit(self, "rollback", int(tick))

    def reset(self, prompt: Iterable[int] | None = None) -> None:
        """Empty the session and start again from `prompt` (default: the opening prompt)."""
        toks = None if prompt is None else self._sched._check_tokens(prompt)
        if toks is not None and not toks:
            raise ValueError("the prompt needs at least one token, e.g. [BOS, TASK_CONTINUE]")
        self._sched._cancel_now(self)
        self._sched._submit(self, "reset", toks)

    def close(self) -> None:
        """Cancel, then free the cache slot (at the next step). Safe to call twice."""
        with self._sched._lock:
            if self._close_sent:
                return
            self._close_sent = True
        self._sched._cancel_now(self)
        self._sched._submit(self, "close", None)

    def tokens(self) -> list[int]:
        """A copy of the tokens from the window start (all of them until the context slid)."""
        with self._state_lock:
            return list(self._hist)

    @property
    def window_start(self) -> int:
        """Position of the first token still held (0 until the context slid)."""
        return self._base

    def constraint(self, kind: type[C]) -> C | None:
        """This session's own copy of its first constraint of `kind`, to move a setting while
        it runs; only for settings made thread-safe for that (`BeatGrid.set`)."""
        c = self._cs.find(kind)
        return c if isinstance(c, kind) else None

    # --- scheduler-thread internals -------------------------------------------------------------
    def _clear(self) -> None:
        # Sampled tokens not sent yet: a VEL until its ON is accepted, a wait (time tokens) until
        # the event after it is (either may still be drawn again: `_back_off`).
        self._held: list[Token] = []
        # (p, ticks): the token at position p is a wait of `ticks` the model chose (drawn, or
        # the clock floor's push), nothing sent after it; it is the latest token, or a held VEL
        # follows it. The event drawn after it may send the wait back (`_back_off`).
        self._backoff: tuple[int, int] | None = None
        # When the clock floor was last checked (Scheduler.now), until the next ON or OFF goes
        # out: that wait is the event lead the floor must allow for.
        self._floor_at: float | None = None
        # (p, ticks, n): the draw at position p must wait at least `ticks` (its n-th back-off).
        self._min_wait: tuple[int, int, int] | None = None
        # The last LOGITS_KEPT logits (V,) the model gave, by (position, token before it). A
        # rejected note draws its VEL again from the logits before it, and the ON after a VEL
        # drawn before comes from that VEL's logits: most retries cost no forward (the VEL is
        # then fed with its ON). A new request samples where the last one left off.
        self._logits: dict[tuple[int, int], Tensor] = {}
        with self._state_lock:
            self._hist: list[int] = []  # tokens from position _base on
            self._ticks: list[int] = []  # token time after each of them
            self._head: list[int] = []  # header the slid context starts with (cache only)
            self._base = 0
            self._base_tick = 0
            self._given_upto = 0  # position after the last given token: inserts keep it
            self._given_tick = 0  # token time there
            self._cs.reset()
            self._snaps: dict[int, Any] = {0: self._cs.snapshot()}
            self._snap_keys: list[int] = [0]
            self.position = 0
            self.tick = 0

    def _emit(self, ev: Event) -> None:
        if self._on_event is None:
            self.events.put(ev)
            return
        try:
            self._on_event(ev)
        except Exception:  # a broken callback must not stop the other sessions
            logger.exception("session %d: on_event callback failed", self.id)

    def _ctx_len(self) -> int:
        return len(self._head) + len(self._hist)

    def _pending(self) -> int:
        return self._ctx_len() - self._sched.decoder.length(self.slot)

    def _pending_tokens(self) -> list[int]:
        n = self._sched.decoder.length(self.slot)
        h = len(self._head)
        if n >= h:
            return self._hist[n - h :]
        return self._head[n:] + self._hist

    def _logits_key(self) -> tuple[int, int]:
        return self.position, self._hist[-1] if self._hist else -1

    def _keep_logits(self, row: Tensor) -> Tensor:
        """Keep the logits (V,) at the current position (a copy: a decoder may reuse its
        output buffer), dropping the oldest beyond LOGITS_KEPT."""
        self._logits[self._logits_key()] = row = row.clone()
        while len(self._logits) > LOGITS_KEPT:
            del self._logits[next(iter(self._logits))]
        return row

    def _kept_logits(self) -> Tensor | None:
        """The logits at the current position, if kept: no forward needed to sample."""
        return self._logits.get(self._logits_key())

    def _tick_at(self, position: int) -> int:
        """Token time after the first `position` tokens (position >= _base)."""
        i = position - self._base
        return self._base_tick if i == 0 else self._ticks[i - 1]

    def _at_boundary(self) -> bool:
        return not self._hist or not opens_pair(self._vocab, self._hist[-1])

    def _push(self, tokens: Sequence[int], given: bool) -> None:
        """Append tokens to the sequence (the cache catches up at the next forward)."""
        v = self._vocab
        with self._state_lock:
            for t in tokens:
                self.tick += v.shift_ticks(t)
                self._hist.append(t)
                self._ticks.append(self.tick)
                self._cs.observe(np.array([t]))
                self.position += 1
                if self.position % SNAPSHOT_EVERY == 0 and not opens_pair(v, t):
                    self._snaps[self.position] = self._cs.snapshot()
                    self._snap_keys.append(self.position)
            if given:
                self._given_upto, self._given_tick = self.position, self.tick

    def _cut(self, position: int, keep_given: bool = False, quiet: bool = False) -> None:
        """Roll back to `position` (clamped to the window, and to the given tokens if
        keep_given; moved back to an event boundary); emits Rollback if anything was removed
        (unless quiet: nothing the listener saw was removed)."""
        floor = max(self._base, 1, self._given_upto if keep_given else 0)
        p = min(max(position, floor), self.position)
        while p > max(self._base, 1) and opens_pair(self._vocab, self._hist[p - 1 - self._base]):
            p -= 1
        if p >= self.position:
            return
        with self._state_lock:
            keep = p - self._base
            del self._hist[keep:], self._ticks[keep:]
            self.position, self.tick = p, self._tick_at(p)
            if self._given_upto > p:
                self._given_upto, self._given_tick = p, self.tick
            dec = self._sched.decoder
            ctx_len = self._ctx_len()
            if dec.length(self.slot) > ctx_len:
                dec.crop(self.slot, ctx_len)
            if self._shadow is not None and not self._cut_shadow(p):
                self._sched._drop_shadow(self)
            elif self._shadow is not None:  # the shadow slot holds nothing past the cut either
                n = self._shadow_len()
                if self._shadow.fed > n:
                    dec.crop(self._sched._shadow_slot, n)
                    self._shadow.fed = n
            # Logits at q depend on the tokens before q: kept up to q = p + 1, whose key names
            # the token at p (another token pushed there misses).
            for k in [k for k in self._logits if k[0] > p + 1]:
                del self._logits[k]
            # Constraint state: nearest snapshot at or before p, then replay the rest.
            i = bisect.bisect_right(self._snap_keys, p)
            for k in self._snap_keys[i:]:
                del self._snaps[k]
            del self._snap_keys[i:]
            q = self._snap_keys[-1]
            self._cs.restore(self._snaps[q])
            self._cs.feed(self._hist[q - self._base : keep])
            self._held = [h for h in self._held if h.position < p]
            self._backoff = self._min_wait = None
        if not quiet:
            self._emit(Rollback(self.id, p, self.tick))

    def _rollback_tick(self, tick: int, keep_given: bool = False) -> None:
        # tokens whose time-after is <= tick stay: ticks are non-decreasing, so bisect.
        self._cut(self._base + bisect.bisect_right(self._ticks, tick), keep_given)

    def _to_boundary(self) -> None:
        if not self._at_boundary():
            self._cut(self.position - 1)

    def _finish(self, reason: str) -> None:
        if self._req is None:
            return
        req, self._req = self._req, None
        self.generating = False
        if reason == "cancelled":
            self._held = []  # nothing of a cancelled request is sent
        elif reason != "superseded":  # (the next request sends them with its first event)
            for h in self._held:
                if not self._vocab.vel_base <= h.token < self._vocab.on_base:
                    self._emit(h)
            self._held = []
        tick = self.tick
        if reason == "until_tick" and req.until_tick is not None:
            tick = min(tick, req.until_tick)  # the last wait drawn may pass the end (_deliver)
        self._emit(Done(self.id, req.id, reason, self.position, tick))

    def _insert_now(self, tick: int, tokens: list[int]) -> None:
        """At an event boundary with time <= tick: time tokens up to tick, then the tokens."""
        gap = tick - self.tick  # <= 0 only when clamped at the window start: inserted late
        self._push(self._vocab.time_tokens(gap) + tokens, given=True)

    def _apply(self, name: str, arg: Any) -> None:
        if name == "open":
            self._sched.decoder.reset(self.slot)
            self._push(self._prompt, given=True)
        elif name == "append":
            self._finish("cancelled")
            self._to_boundary()
            self._push(arg, given=True)
        elif name == "insert":
            tick, tokens = arg
            tick = max(tick, self._given_tick)  # never before an earlier given event
            if tick < self.tick:  # the model ran past it: cut there, the gap stays silent
                self._rollback_tick(tick, keep_given=True)
                self._to_boundary()
                self._insert_now(tick, tokens)
            elif self._req is not None:  # force it when the generated time reaches it
                heapq.heappush(self._forced, (tick, next(self._forced_seq), tokens))
            else:
                self._to_boundary()
                self._insert_now(tick, tokens)
        elif name == "generate":
            self._finish("superseded")
            self._req = arg
            self.generating = True
        elif name == "cancel":
            self._finish("cancelled")
            self._to_boundary()
        elif name == "crop":
            self._cut(arg)
        elif name == "rollback":
            self._rollback_tick(arg)
        elif name == "reset":
            self._finish("reset")
            self._sched._drop_shadow(self)
            self._forced.clear()
            self._clear()
            self._sched.decoder.reset(self.slot)
            self._push(self._prompt if arg is None else arg, given=True)
        elif name == "close":
            self._finish("closed")
            self._sched._drop_shadow(self)
            self._forced.clear()
            self.closed = True
        else:  # pragma: no cover - internal
            raise ValueError(f"unknown command {name!r}")

    def _prepare(self) -> None:
        """Before the step's forward: forced events due, stop conditions, overflow."""
        req = self._req
        if self._at_boundary():
            floor = self._clock_floor()
            if req is not None and self.clock is not None:
                self._floor_at = self._sched.now()
            while self._forced and (req is None or self._forced[0][0] <= floor):
                tick, _, tokens = heapq.heappop(self._forced)
                self._insert_now(max(tick, self.tick), tokens)
            if req is not None and req.start_tick is not None:  # generate(start_tick=)
                start, req.start_tick = req.start_tick, None
                self._push(self._vocab.time_tokens(start - self.tick), given=False)
            mw = self._min_wait
            if floor > self.tick and not (mw is not None and mw[0] == self.position):
                # The model's own wait (a rollback undoes it; the event drawn after it may still
                # send it back to be drawn longer). Not while a wait is being drawn again here:
                # that one is longer than the push it replaces.
                gap = floor - self.tick
                self.lag["pushes"] += 1
                self.lag["ticks"] += gap
                wait = self._vocab.time_tokens(gap)
                self._push(wait, given=False)
                if len(wait) == 1:
                    self._backoff = (self.position - 1, gap)
            if req is not None:
                if req.until_tick is not None and self.tick >= req.until_tick:
                    self._finish("until_tick")
                elif req.max_tokens is not None and req.n >= req.max_tokens:
                    self._finish("max_tokens")
        if self._ctx_len() > self._sched.max_len:  # the slid context was not ready in time
            self._slide()
        dec = self._sched.decoder
        if self._req is not None and self._pending() == 0 and self._kept_logits() is None:
            dec.crop(self.slot, dec.length(self.slot) - 1)  # re-run the last token for logits

    def _clock_floor(self) -> int:
        """The earliest token time the running request may place its next event at: the
        clock's now plus the time to draw and send that event (before the request's end).
        Without it, a model behind real time (after a rollback to a player's event, or under
        load) writes events into the past: they sound late, and its history says otherwise."""
        req, clock = self._req, self.clock
        if req is None or clock is None:
            return self.tick
        sched = self._sched
        lead_s = max(CLOCK_STEPS * sched.step_s_ema, sched.event_lead_s) + CLOCK_SLACK_S
        floor = int(np.ceil(clock() + lead_s * self._vocab.ticks_per_second))
        if req.until_tick is not None:  # room for one event: a response is never pushed empty
            floor = min(floor, req.until_tick - 1)
        return max(floor, self.tick)

    def _slide(self) -> None:
        """Context overflow: header + the last keep_len tokens, prefilled from position 0 (at
        once: this session waits for it; the shadow prefill normally spares it that)."""
        self._sched._drop_shadow(self)
        self._sched.stats["blocking_slides"] += 1
        new = slide_context(self._head + self._hist, self._vocab, self._sched.keep_len)
        kept = kept_suffix(self._vocab, new, self._hist)
        self._rebase(new[: len(new) - kept], self.position - kept)
        self._sched.decoder.reset(self.slot)
        logger.info("session %d: context full, slid at once (it waits for the prefill)", self.id)

    def _start_shadow(self) -> _Shadow:
        """The slid context as it would be now, to prefill in the scheduler's shadow slot while
        this session goes on; tokens it adds meanwhile are fed there too (`_shadow_tokens`)."""
        new = slide_context(self._head + self._hist, self._vocab, self._sched.keep_len)
        self._shadow = _Shadow(new, kept_suffix(self._vocab, new, self._hist), self.position)
        return self._shadow

    def _shadow_tokens(self, lo: int = 0, hi: int | None = None) -> list[int]:
        """What the shadow slot must hold, [lo:hi]: the slid context, then every token since."""
        sh = self._shadow
        assert sh is not None
        return (sh.new + self._hist[sh.start - self._base :])[lo:hi]

    def _shadow_len(self) -> int:
        sh = self._shadow
        assert sh is not None
        return len(sh.new) + self.position - sh.start

    def _swap_in_shadow(self, shadow_slot: int) -> None:
        """The shadow slot holds `_shadow_tokens()`: it becomes this session's context."""
        sh = self._shadow
        assert sh is not None
        self._shadow = None
        self._rebase(sh.new[: len(sh.new) - sh.kept], sh.start - sh.kept)
        self._sched.decoder.move(shadow_slot, self.slot)
        logger.info(
            "session %d: slid context swapped in, window from position %d", self.id, self._base
        )

    def _cut_shadow(self, p: int) -> bool:
        """A rollback to position p: the shadow loses what came after p too. False if it can't
        (p is before its window): it is dropped."""
        sh = self._shadow
        assert sh is not None
        if p >= sh.start:
            return True
        drop = sh.start - p
        if drop > sh.kept:
            return False
        sh.new, sh.kept, sh.start = sh.new[: len(sh.new) - drop], sh.kept - drop, p
        return True

    def _rebase(self, head: list[int], new_base: int) -> None:
        """The context becomes `head` + the tokens from position new_base on."""
        with self._state_lock:
            # A snapshot at the new window start, so rollback can still reach it.
            i = bisect.bisect_right(self._snap_keys, new_base) - 1
            q = self._snap_keys[i]
            live = self._cs.snapshot()
            self._cs.restore(self._snaps[q])
            self._cs.feed(self._hist[q - self._base : new_base - self._base])
            start_snap = self._cs.snapshot()
            self._cs.restore(live)
            self._snap_keys = [new_base] + [k for k in self._snap_keys if k > new_base]
            self._snaps = {k: self._snaps[k] for k in self._snap_keys[1:]}
            self._snaps[new_base] = start_snap
            self._base_tick = self._tick_at(new_base)
            drop = new_base - self._base
            del self._hist[:drop], self._ticks[:drop]
            self._head = head
            self._base = new_base
            self._logits.clear()  # another context: other logits

    def _mask(self) -> np.ndarray:
        """(V,) bool: what the running request may sample now."""
        req = self._req
        assert req is not None
        self._limit.set(req.until_tick)
        self._next_forced.set(self._forced[0][0] if self._forced else None)
        m = self._cs.allowed()[0]
        mw = self._min_wait
        if mw is not None and mw[0] == self.position:  # a wait sent back: drawn longer
            # (a SHIFT: at most a second more at a time, so an accompaniment stays ready; and
            # not ending before the clock floor, which has moved on meanwhile)
            v = self._vocab
            need = max(mw[1], self._clock_floor() - self.tick)
            longer = np.zeros_like(m)
            longer[v.shift_base : v.long_base] = m[v.shift_base : v.long_base] & (
                self._cs._time_ticks[: v.long_base - v.shift_base] >= need
            )
            if longer.any():
                m = longer
        if req.max_tokens is not None and req.max_tokens - req.n == 1:
            # The last token must not open a pair (the request would end mid-event).
            v = self._vocab
            closed = m.copy()
            closed[v.part_base : v.program_base] = False
            closed[v.vel_base : v.on_base] = False
            if closed.any():
                m = closed
        return m

    def _deliver(self, tok: int) -> None:
        """A token sampled for the running request (dropped if it was cancelled meanwhile)."""
        with self._deliver_lock:
            self._deliver_locked(tok)

    def _deliver_locked(self, tok: int) -> None:
        req = self._req
        if req is None or req.id <= self._sched._cancelled_upto.get(self.id, -1):
            return
        if tok == self._vocab.EOS:
            self._finish("eos")
            return
        v = self._vocab
        # A shift past the time ceiling ends on it; a note may move to a BeatGrid point,
        # unless it sounds with a player's event (given tokens at this tick).
        onset_free = self._given_tick == self.tick
        toks = self._cs.clip(tok, onset_free=onset_free)
        is_wait = v.shift_base <= tok < v.part_base
        if v.shift_base <= tok < v.long_base and req.until_tick is not None and toks != [tok]:
            # A wait cut at the request's end would leave the model at a time it did not choose
            # (the next request draws there: a live accompaniment's horizon moves every 50 ms);
            # a SHIFT drawn goes past the end instead (not past the next forced event, or a
            # note's deadline; a LONG wait is still cut: a model's time never runs more than a
            # second past its request). A player's event before its end rolls it back, as for
            # any token sampled ahead.
            if self.tick + sum(v.shift_ticks(t) for t in toks) == req.until_tick:
                toks = self._cs.clip(tok, onset_free=onset_free, pass_end=True)
        for t in toks:
            self._push([t], given=False)
            req.n += 1
            ev = Token(self.id, req.id, t, self.position - 1, self.tick)
            if v.vel_base <= t < v.on_base or v.shift_base <= t < v.part_base:
                self._held.append(ev)  # sent with the event after it: it may be drawn again
                continue
            for h in self._held:  # accepted: sent under the running request
                self._emit(dataclasses.replace(h, request=req.id))
            self._held = []
            self._emit(ev)
            if self._floor_at is not None and t >= v.on_base:  # an ON or OFF: a sound
                self._sched._event_out(self._sched.now() - self._floor_at)
                self._floor_at = None
        if is_wait and len(toks) == 1:  # (a time token clips to time tokens)
            self._backoff = (self.position - 1, v.shift_ticks(toks[0]))
        if self._at_boundary():
            if req.max_tokens is not None and req.n >= req.max_tokens:
                self._finish("max_tokens")
            elif req.until_tick is not None and self.tick >= req.until_tick:
                self._finish("until_tick")

    def _retries_here(self) -> int:
        """Notes rejected so far at the event starting at the current position (or at the VEL
        just sampled)."""
        return self._retries if self._retry_at in (self.position, self.position - 1) else 0

    def _draw_seed(self) -> int:
        """The seed of this step's draw: the session's, or a fresh one for each retry of a
        rejected note (the draw depends on (seed, position) only, so a retry with the same
        seed would draw the same note again)."""
        r = self._retries_here()
        return self.seed if r == 0 else (self.seed + r * 0x9E3779B97F4A7C15) & 0x7FFFFFFFFFFFFFFF

    def _vel_held(self) -> bool:
        """The last token is a sampled VEL, not sent yet (its ON is drawn next)."""
        if not self._held:
            return False
        last = self._held[-1]
        v = self._vocab
        return last.position == self.position - 1 and v.vel_base <= last.token < v.on_base

    def _reject_note(self, tok: int) -> None:
        """The event drawn (`tok`) is one the constraints forbid (an ON after a sampled VEL, or
        an OFF after a wait). If a wait came before it and it is another part's event, or a
        note that sounds already (the model lost track of it: nothing new would be heard),
        draw the wait again (`_back_off`); else drop the VEL too (no event was sent for it)
        and draw again before it (Scheduler._sample)."""
        with self._deliver_lock:
            req = self._req
            if req is None or req.id <= self._sched._cancelled_upto.get(self.id, -1):
                return  # cancelled meanwhile: the cancel cuts the VEL
            vel = self._vel_held()
            part, pitch = self._vocab.note_of(tok)
            waited = self._foreign[part] or self._cs.state.sounding[0, part, pitch]
            if waited and self._can_back_off(self.position - 1 if vel else self.position):
                self._back_off()
                return
            r = self._retries_here()
            if vel:
                self._cut(self.position - 1, quiet=True)
                req.n -= 1
            # (an OFF that can't send its wait back: drawn again too, with the next seed; a
            # draw depends on (seed, position) only, so returning here would repeat it forever)
            self._retry_at, self._retries = self.position, r + 1

    def _can_back_off(self, at: int) -> bool:
        """The event drawn at position `at` directly follows a wait that may be drawn again."""
        b, mw = self._backoff, self._min_wait
        if b is None or b[0] + 1 != at or b[1] >= self._vocab.config.max_shift_ticks:
            return False
        return (mw[2] if mw is not None and mw[0] == b[0] else 0) < MAX_BACKOFFS

    def _back_off(self) -> None:
        """The event drawn after a wait is one the constraints forbid (a melody note, under
        "accompaniment only"): the model waited for that event. It did not come, so the wait
        is drawn again, longer. Drawing another event in its place instead (the mask) would
        turn every melody note the model expects into an accompaniment note; waiting longer
        thins the melody out of the model's stream (competing events: the accompaniment's next
        event is later than the melody's the model expected). Nothing after the wait was sent
        (held), so the cut is quiet, unless the wait itself was (an earlier request ended
        with it)."""
        assert self._backoff is not None
        p, ticks = self._backoff
        mw = self._min_wait
        n = mw[2] + 1 if mw is not None and mw[0] == p else 1
        removed = self.position - p
        self._cut(p, quiet=any(h.position == p for h in self._held))
        self._min_wait = (p, ticks + 1, n)
        if self._req is not None:
            self._req.n = max(0, self._req.n - removed)
        self._sched.stats["backoffs"] += 1


# --- the scheduler ----------------------------------------------------------------------------------
class Scheduler:
    """Advances many live sessions with one batched forward per step, on one thread."""

    def __init__(
        self,
        engine: EngineLike,
        max_sessions: int = 16,
        max_len: int | None = None,
        keep_len: int | None = None,
        prefill_chunk: int = 256,
        shadow_chunk: int = 32,
        max_batch_pad: int = 8,
        idle_wait_s: float = 0.05,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.vocab: Vocab = engine.vocab
        # Two spare slots: the scratch space for swapping two sessions' slots, and the shadow,
        # where a session's slid context is prefilled while it plays on.
        self.decoder: Decoder = engine.new_decoder(max_sessions + 2, max_len)
        self.device = self.decoder.device
        self.max_sessions = max_sessions
        self.max_len = self.decoder.max_seq
        self.keep_len = keep_len or self.max_len // 2
        if not 8 <= self.keep_len < self.max_len:
            raise ValueError(f"keep_len must be in 8..{self.max_len - 1}, got {self.keep_len}")
        self.prefill_chunk, self.max_batch_pad = prefill_chunk, max_batch_pad
        self.idle_wait_s = idle_wait_s
        self._scratch, self._shadow_slot = max_sessions, max_sessions + 1
        self._shadow_owner: LiveSession | None = None
        # A session past shadow_len tokens gets its slid context prefilled in the shadow slot,
        # shadow_chunk tokens per step, then swapped in: a slide (~1,000 tokens, hundreds of ms
        # on a CPU) never stalls it or the others. Blocking slides only on overflow.
        self.shadow_len = max(self.keep_len + 1, self.max_len - self.max_len // 4)
        self.shadow_urgent = self.max_len // 8
        self.shadow_chunk = shadow_chunk
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._commands: deque[tuple[LiveSession, str, Any]] = deque()
        self._free = list(range(max_sessions - 1, -1, -1))  # pop() gives the lowest slot
        self._sessions: dict[int, LiveSession] = {}  # open, as seen by the scheduler thread
        self._ids = itertools.count()
        self._rids = itertools.count()
        self._cancelled_upto: dict[int, int] = {}  # session id -> highest cancelled request id
        self._last_rid: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0  # steps that ran a forward
        self.now = time.perf_counter  # the wall clock of step and event timings (tests: fake)
        self.step_s_ema = 0.0  # wall time of a decode step (moving average; see step)
        # The clock floor's event lead (seconds; see EVENT_LEAD_Q) and the waits it is taken of.
        self.event_lead_s = 0.0
        self._event_waits: deque[float] = deque(maxlen=EVENT_LEAD_N)
        self._event_new = 0
        # Cumulative seconds in the step's phases and tokens sampled (benchmarks, server metrics).
        self.stats = {
            "forward_s": 0.0,
            "mask_s": 0.0,
            "sample_s": 0.0,
            "tokens": 0,
            "notes_rejected": 0,
            "backoffs": 0,
            "forwards": 0,  # decoder calls (a step runs one per contiguous run of slots)
            "slides": 0,  # slid contexts swapped in from the shadow slot
            "blocking_slides": 0,  # overflows before one was ready (the session waited)
        }

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="improv-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        last_t, last = time.monotonic(), dict(self.stats, steps=self.steps)
        while not self._stop.is_set():
            if (now := time.monotonic()) - last_t >= REPORT_EVERY_S and self.steps > last["steps"]:
                self._report(now - last_t, last)
                last_t, last = now, dict(self.stats, steps=self.steps)
            try:
                busy = self.step()
            except Exception:
                logger.exception("scheduler step failed; ending every running request")
                for s in list(self._sessions.values()):
                    s._finish("error")
                busy = False
            if not busy:
                with self._wake:
                    if not self._commands and not self._stop.is_set():
                        self._wake.wait(self.idle_wait_s)

    def _report(self, seconds: float, last: dict[str, float]) -> None:
        """One log line on the scheduler's load since `last` (operators; the benchmarks)."""
        st = self.stats
        steps = self.steps - last["steps"]
        tokens = st["tokens"] - last["tokens"]
        logger.info(
            "scheduler: %d sessions, %.0f steps/s, %.0f tokens/s, %.1f rows/step, "
            "%.1f forwards/step, forward %.2f ms/step, %.0f%% busy, %d notes rejected, "
            "event lead %.1f ms",
            len(self._sessions),
            steps / seconds,
            tokens / seconds,
            tokens / max(steps, 1),
            (st["forwards"] - last["forwards"]) / max(steps, 1),
            1000 * (st["forward_s"] - last["forward_s"]) / max(steps, 1),
            100 * sum(st[k] - last[k] for k in ("forward_s", "mask_s", "sample_s")) / seconds,
            st["notes_rejected"] - last["notes_rejected"],
            1000 * self.event_lead_s,
        )

    # --- sessions ---------------------------------------------------------------------------------
    def open_session(
        self,
        prompt: Iterable[int],
        constraints: Sequence[Constraint] = (),
        sampling: SamplingParams | None = None,
        on_event: EventCallback | None = None,
        allow_end: bool = False,
    ) -> LiveSession:
        """A new session on a free cache slot; its prompt is prefilled at the next steps.

        allow_end: let the model sample EOS (it then ends the request and is not appended).
        """
        toks = self._check_tokens(prompt)
        if not toks:
            raise ValueError("the prompt needs at least one token, e.g. [BOS, TASK_CONTINUE]")
        with self._lock:
            if not self._free:
                raise SchedulerFull(f"all {self.max_sessions} session slots are in use")
            slot = self._free.pop()
            sid = next(self._ids)
        s = LiveSession(
            self, sid, slot, toks, constraints, sampling or SamplingParams(), on_event, allow_end
        )
        self._submit(s, "open", None)
        return s

    @property
    def n_open(self) -> int:
        """Sessions holding a slot (closed ones free theirs at the next step)."""
        with self._lock:
            return self.max_sessions - len(self._free)

    # --- command plumbing (any thread) ------------------------------------------------------------
    def _check_tokens(self, tokens: Iterable[int]) -> list[int]:
        toks = [int(t) for t in tokens]
        bad = [t for t in toks if not 0 <= t < self.vocab.size]
        if bad:
            raise ValueError(f"token ids must be in 0..{self.vocab.size - 1}, got {bad[0]}")
        return toks

    def _next_request_id(self) -> int:
        with self._lock:
            return next(self._rids)

    def _submit(self, s: LiveSession, name: str, arg: Any) -> None:
        with self._wake:
            if name == "generate":
                self._last_rid[s.id] = arg.id
            self._commands.append((s, name, arg))
            self._wake.notify()

    def _cancel_now(self, s: LiveSession) -> None:
        """Every request issued so far stops delivering at once (checked at delivery)."""
        with s._deliver_lock, self._lock:
            self._cancelled_upto[s.id] = self._last_rid.get(s.id, -1)

    # --- the step (scheduler thread) --------------------------------------------------------------
    def step(self) -> bool:
        """Apply queued commands, advance every session by one forward; True if work was done."""
        t_step = self.now()
        with self._lock:
            cmds = list(self._commands)
            self._commands.clear()
        for s, name, arg in cmds:
            if s.id not in self._sessions and name != "open":
                if not s.closed:
                    logger.debug("session %d: %s after close, ignored", s.id, name)
                continue
            if name == "open":
                self._sessions[s.id] = s
            s._apply(name, arg)
            if name == "close":
                self._release(s)
        sessions = list(self._sessions.values())
        for s in sessions:
            self._guarded(s, s._prepare)
        self._pack(sessions)
        t0 = time.perf_counter()
        logits, n_forwards, prefilled = self._forward(sessions)
        shadow = self._shadow_step(sessions)
        n_forwards += shadow
        self.stats["forwards"] += n_forwards
        self.stats["forward_s"] += time.perf_counter() - t0
        rows = [s for s in sessions if s._req is not None and s.id in logits]
        t0 = time.perf_counter()
        masks = {s.id: m for s in rows if (m := self._guarded(s, s._mask)) is not None}
        self.stats["mask_s"] += time.perf_counter() - t0
        rows = [s for s in rows if s.id in masks]
        if rows:
            self._sample(
                rows, torch.stack([logits[s.id] for s in rows]), [masks[s.id] for s in rows]
            )
        if n_forwards:
            self.steps += 1
        if n_forwards and not prefilled and not shadow:
            # Decode steps only, each counted at most MAX_STEP_S: the clock floor reads this as
            # the time to the next event, and one prefill or stall must not hold every
            # session's events back for the many steps the average takes to forget it.
            dt = min(self.now() - t_step, MAX_STEP_S)
            self.step_s_ema += 0.1 * (dt - self.step_s_ema)
        return bool(cmds) or n_forwards > 0 or bool(rows)

    def _event_out(self, wait_s: float) -> None:
        """A clocked session's ON or OFF went out `wait_s` after its clock floor's check."""
        self._event_waits.append(wait_s)
        self._event_new += 1
        if self._event_new >= 16 or len(self._event_waits) < 16:
            self._event_new = 0
            self.event_lead_s = float(np.quantile(self._event_waits, EVENT_LEAD_Q))

    def reset_timing(self) -> None:
        """Forget step and event timings (after a warm-up: first runs are slow, not what the
        clock floor should expect)."""
        self.step_s_ema = self.event_lead_s = 0.0
        self._event_waits.clear()
        self._event_new = 0

    def _guarded(self, s: LiveSession, fn: Callable[..., T], *args: Any) -> T | None:
        """fn(*args) for one session; if it raises, that session's request ends with "error"
        (logged) and the other sessions go on. None if it raised."""
        try:
            return fn(*args)
        except Exception:
            logger.exception("session %d: step failed; its request ends", s.id)
            s._finish("error")
            return None

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Step until nothing is left to do (tests, offline use); returns the steps taken."""
        for i in range(max_steps):
            if not self.step():
                return i
        raise RuntimeError(f"still busy after {max_steps} steps")

    def _shadow_step(self, sessions: list[LiveSession]) -> int:
        """Feed the shadow slot one chunk; swap it in once it holds its session's context.
        Returns the forwards run (0 or 1)."""
        s = self._shadow_owner
        if s is None:
            over = [x for x in sessions if x._ctx_len() > self.shadow_len and x._at_boundary()]
            if not over:
                return 0
            s = max(over, key=lambda x: x._ctx_len())
            self._shadow_owner = s
            self.decoder.reset(self._shadow_slot)
            s._start_shadow()
        sh = s._shadow
        assert sh is not None
        total = s._shadow_len()
        n = 0
        # A chunk makes this step slower for every session sampling in it (a response's first
        # notes wait for it): feed it in steps where no one samples, or once its session is
        # within shadow_urgent tokens of overflowing (sessions that always sample: accompany).
        sampling = any(x._req is not None for x in sessions)
        urgent = s._ctx_len() > self.max_len - self.shadow_urgent
        if sh.fed < total and (urgent or not sampling):
            chunk = s._shadow_tokens(sh.fed, sh.fed + self.shadow_chunk)
            self.decoder.extend([self._shadow_slot], [chunk])
            sh.fed += len(chunk)
            n = 1
        if sh.fed == total:  # caught up with the session: it becomes the session's cache
            self._shadow_owner = None
            s._swap_in_shadow(self._shadow_slot)
            self.stats["slides"] += 1
            self.decoder.reset(self._shadow_slot)
        return n

    def _drop_shadow(self, s: LiveSession) -> None:
        if s._shadow is not None:
            s._shadow = None
            if self._shadow_owner is s:
                self._shadow_owner = None
                self.decoder.reset(self._shadow_slot)

    def _release(self, s: LiveSession) -> None:
        self.decoder.reset(s.slot)
        del self._sessions[s.id]
        with self._lock:
            self._free.append(s.slot)
            self._free.sort(reverse=True)
            self._cancelled_upto.pop(s.id, None)
            self._last_rid.pop(s.id, None)

    def _pack(self, sessions: list[LiveSession]) -> None:
        """Keep sessions with a running request in the lowest slots, so that their batched
        forward reads the cache as a view (a gather would copy every row's cache each step)."""
        active = [s for s in sessions if s._req is not None]
        n = len(active)
        by_slot = {s.slot: s for s in sessions}
        movers = [s for s in active if s.slot >= n]
        if not movers:
            return
        with self._lock:
            # Idle sessions' slots, or free ones (not slots of sessions still being opened).
            targets = [
                j
                for j in range(n)
                if (j in by_slot and by_slot[j]._req is None)
                or (j not in by_slot and j in self._free)
            ]
            for s, j in zip(movers, targets, strict=False):
                other = by_slot.get(j)
                src = s.slot
                if other is None:  # a free slot
                    self.decoder.move(src, j)
                    self._free.remove(j)
                    self._free.append(src)
                    self._free.sort(reverse=True)
                else:  # swap with an idle session through the scratch slot
                    self.decoder.move(src, self._scratch)
                    self.decoder.move(j, src)
                    self.decoder.move(self._scratch, j)
                    other.slot = src
                    by_slot[src] = other
                s.slot = j
                by_slot[j] = s

    def _forward(self, sessions: list[LiveSession]) -> tuple[dict[int, Tensor], int, bool]:
        """Feed every session's pending tokens: logits (V,) of sessions now fully fed, the
        number of forwards run, and whether one was a long append's prefill chunk."""
        out: dict[int, Tensor] = {}
        n = 0
        for s in sessions:  # logits kept: the pending tokens are fed with the next ones
            if s._req is not None and (kept := s._kept_logits()) is not None:
                out[s.id] = kept
        small = sorted(
            (s for s in sessions if 0 < s._pending() <= self.max_batch_pad and s.id not in out),
            key=lambda s: s.slot,
        )
        slots = [s.slot for s in small]
        for a, b in contiguous_runs(slots):
            run = small[a:b]
            logits = self.decoder.extend(slots[a:b], [s._pending_tokens() for s in run])  # (B, V)
            n += 1
            for s, row in zip(run, logits, strict=True):
                out[s.id] = s._keep_logits(row)
        prefilled = False
        for s in sessions:
            if s._pending() > self.max_batch_pad and s.id not in out:
                chunk = s._pending_tokens()[: self.prefill_chunk]
                logits = self.decoder.extend([s.slot], [chunk])  # (1, V)
                n, prefilled = n + 1, True
                if s._pending() == 0:
                    out[s.id] = s._keep_logits(logits[0])
        return out, n, prefilled

    def _sample(self, rows: list[LiveSession], logits: Tensor, masks: list[np.ndarray]) -> None:
        """logits (B, V) of sessions with a running request, and their masks (V,) -> one token
        each."""
        t0 = time.perf_counter()
        masks_np = np.stack(masks)  # (B, V) bool
        # The ON after a sampled VEL is drawn from every ON; one the constraints forbid rejects
        # the whole note (VEL too) and the row draws again. Masking it instead would turn the
        # note the model meant (a melody note, under "accompaniment only") into another one:
        # accompaniment on every melody note. Bounded: after MAX_NOTE_RETRIES, the mask.
        # Greedy rows keep the mask: a retry would draw the same note again.
        v = self.vocab
        # Likewise the event after a wait may end a note of a forbidden part (the melody note
        # the model expects to end): then the wait is drawn again, longer (_back_off).
        strict: dict[int, np.ndarray] = {}
        for i, s in enumerate(rows):
            if s.sampling.temperature <= 0:
                continue
            if s._vel_held() and s._retries_here() < MAX_NOTE_RETRIES:
                strict[i] = masks_np[i].copy()
                masks_np[i, v.on_base : v.off_base] = True
            elif (
                s._foreign_offs is not None
                and s._can_back_off(s.position)
                and s._cs.at_boundary()
                and s._retries_here() < MAX_NOTE_RETRIES
            ):
                strict[i] = masks_np[i].copy()
                sounding = s._cs.state.sounding[0] & s._foreign_offs[:, None]  # (P, 128)
                masks_np[i, v.off_base :] |= sounding.reshape(-1)
        masks = torch.from_numpy(masks_np)  # (B, V) bool
        t1 = time.perf_counter()
        logits = apply_mask(logits, masks)
        probs = torch.empty_like(logits)  # (B, V)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(rows):  # rows sharing sampling settings share one call
            p = s.sampling
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
        for (temp, top_k, top_p, min_p), idx in groups.items():
            probs[idx] = logits_to_probs(logits[idx], temp, top_k, top_p, min_p)
        # Counter-based draws from (seed, position): one vectorized call for every row, no
        # per-row generator to reseed (that was ~66 us/row), still batch-invariant.
        seeds, positions = [s._draw_seed() for s in rows], [s.position for s in rows]
        toks = sample(probs, seeds=seeds, positions=positions).tolist()  # the one host sync
        t2 = time.perf_counter()
        for i, (s, t) in enumerate(zip(rows, toks, strict=True)):
            if i in strict and not strict[i][t]:
                self._guarded(s, s._reject_note, t)
                self.stats["notes_rejected"] += 1
            else:
                self._guarded(s, s._deliver, t)
        st = self.stats
        st["mask_s"] += t1 - t0 + time.perf_counter() - t2  # masks + state updates
        st["sample_s"] += t2 - t1
        st["tokens"] += len(rows)
