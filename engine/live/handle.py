"""`LiveSession`: the handle a caller holds on a live session. Thread-safe and small: every
method checks its arguments and queues a command (applied in call order at the start of the
scheduler's next step); reads return what the scheduler last published (`Status`)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from ..constraints import BeatGrid, Constraint
from .history import History
from .types import (
    Append,
    Cancel,
    CancelFence,
    ClockFn,
    Close,
    Command,
    Crop,
    Event,
    EventCallback,
    Generate,
    Insert,
    Request,
    Reset,
    RollbackTo,
    SamplingParams,
    Schedule,
    SetClock,
    SetConstraint,
    SetSampling,
    Status,
)

logger = logging.getLogger(__name__)


class Commands(Protocol):
    """The scheduler's ordered command queue, as a handle sees it."""

    def put(self, sid: int, cmd: Command) -> None: ...
    def put_many(self, sid: int, cmds: Sequence[Command]) -> None: ...


class LiveSession:
    """One live player's session. Every method may be called from any thread."""

    def __init__(
        self,
        sid: int,
        status: Status,
        commands: Commands,
        check_tokens: Callable[[Iterable[int]], list[int]],
        next_request_id: Callable[[], int],
        constraints: list[Constraint],
        history: History,
        on_event: EventCallback | None,
    ) -> None:
        self.id = sid
        self.events: queue.Queue[Event] = queue.Queue()  # events, without an on_event callback
        self.fence = CancelFence()
        self._status = status
        self._commands, self._submit = commands, commands.put
        self._check, self._next_rid = check_tokens, next_request_id
        self._specs = constraints  # as set through this handle (specs are immutable)
        self._history = history  # read only through its locked copies
        self._on_event = on_event
        self._lock = threading.Lock()
        self._close_sent = False

    # --- commands -------------------------------------------------------------------------------
    def append(self, tokens: Iterable[int]) -> None:
        """Given tokens at the end (they carry their own time). Cancels a running request."""
        toks = self._check(tokens)
        self.fence.cancel()
        self._submit(self.id, Append(toks))

    def insert(self, tick: int, tokens: Iterable[int] = ()) -> None:
        """A given event at absolute `tick` (see docs/engine-live.md: rollback or force)."""
        self._submit(self.id, self._insert(tick, tokens))

    def _insert(self, tick: int, tokens: Iterable[int]) -> Insert:
        if tick < 0:
            raise ValueError(f"tick must be >= 0, got {tick}")
        return Insert(int(tick), self._check(tokens))

    def generate(
        self,
        max_tokens: int | None = None,
        until_tick: int | None = None,
        start_tick: int | None = None,
        lead_in: bool = False,
        redraw_waits: bool = False,
        forced: Sequence[tuple[int, Iterable[int]]] = (),
    ) -> int:
        """Sample up to max_tokens tokens / up to token time until_tick; returns the request id.

        Replaces a running request (it ends with reason "superseded"). `start_tick`: sample from
        that token time on: the time tokens up to it are appended first, in the same forward,
        as sampled (not given) tokens without Token events, so an insert before it rolls them
        back like the rest (the server's respond mode samples a response ahead of its start).
        `lead_in`: the request's first event is a note: no time token, note-off or end until
        a note-on at or after its start (a response starts when the player's silence ends).
        `redraw_waits`: a wait the model drew *for* a given part's event is drawn again afresh,
        not longer (policy, "Waits drawn again afresh"; for infill, where every given event is
        inserted before the request runs).
        `forced`: (tick, tokens) events inserted as `insert` does, handed over with the request
        (the scheduler takes them together, so no step samples between the request and its
        forced events: with a seed, the same tokens every time).
        """
        if max_tokens is None and until_tick is None:
            raise ValueError("generate needs max_tokens or until_tick (or both)")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if start_tick is not None and start_tick < 0:
            raise ValueError(f"start_tick must be >= 0, got {start_tick}")
        inserts = [self._insert(t, toks) for t, toks in forced]  # checked before an id is issued
        with self.fence.lock:  # a cancel from another thread sees the id and its command both
            rid = self._next_rid()
            self.fence.issue(rid)
            req = Request(
                rid, max_tokens, until_tick, start_tick, lead_in_asked=lead_in,
                redraw_waits=redraw_waits,
            )  # fmt: skip
            self._commands.put_many(self.id, [Generate(req), *inserts])
        return rid

    def cancel(self) -> None:
        """Stop the running request; no further Token of it is delivered after this returns."""
        self.fence.cancel()
        self._submit(self.id, Cancel())

    def crop(self, position: int) -> None:
        """Keep the first `position` tokens (moved back to an event boundary)."""
        self._submit(self.id, Crop(int(position)))

    def rollback_to_tick(self, tick: int) -> None:
        """Keep the tokens whose token time is <= tick."""
        self._submit(self.id, RollbackTo(int(tick)))

    def reset(self, prompt: Iterable[int] | None = None) -> None:
        """Empty the session and start again from `prompt` (default: the opening prompt)."""
        toks = None if prompt is None else self._check(prompt)
        if toks is not None and not toks:
            raise ValueError("the prompt needs at least one token, e.g. [BOS, TASK_CONTINUE]")
        self.fence.cancel()
        self._submit(self.id, Reset(toks))

    def close(self) -> None:
        """Cancel, then free the cache slot (at the next step). Safe to call twice."""
        with self._lock:
            if self._close_sent:
                return
            self._close_sent = True
        self.fence.cancel()
        self._submit(self.id, Close())

    def schedule(self, from_tick: int, marks: Iterable[tuple[int, Iterable[int]]]) -> None:
        """Marks the session's clock and chart give ahead of time (`(tick, [BAR|BEAT|CHORD
        tokens])`), forced at their ticks: a running request's time stops at the next one, the
        mark is written there and sampling goes on; with no request running, they are written
        before a given event after them. Unlike `insert`, they are the schedule, not the
        player: a player's event before one goes before it, and a mark a rollback removes is
        written again when the model's time comes back to it. Replaces what was scheduled at
        `from_tick` or later (those already written from there on are rolled back)."""
        if from_tick < 0:
            raise ValueError(f"from_tick must be >= 0, got {from_tick}")
        out = []
        for tick, toks in marks:
            if tick < from_tick:
                raise ValueError(f"a mark at tick {tick} is before from_tick {from_tick}")
            out.append((int(tick), tuple(self._check(toks))))
        out.sort(key=lambda m: m[0])
        self._submit(self.id, Schedule(int(from_tick), tuple(out)))

    def set_grid(self, step_ticks: float | None, origin_tick: float = 0.0) -> None:
        """Move the BeatGrid (the tempo someone else keeps changed); `None`: no grid."""
        self.set_constraint(BeatGrid(step_ticks, origin_tick))

    def set_constraint(self, spec: Constraint) -> None:
        """Swap in `spec` for the session's constraint of its class (added if there is none),
        from the next draw on; its per-row state goes on (`ConstraintSet.replace`)."""
        with self._lock:
            self._specs = [c for c in self._specs if type(c) is not type(spec)] + [spec]
        self._submit(self.id, SetConstraint(spec))

    def set_sampling(self, sampling: SamplingParams) -> None:
        """New sampling settings from the next draw on (a seed of None keeps the session's)."""
        self._submit(self.id, SetSampling(sampling))

    def set_clock(self, clock: ClockFn | None) -> None:
        """The token time it is now (float ticks), called on the scheduler thread: a running
        request never places an event before it could be heard (docs/engine-live.md, "Clock
        floor"). None: no clock."""
        self._submit(self.id, SetClock(clock))

    # --- reads ----------------------------------------------------------------------------------
    def constraint(self, kind: type[Constraint]) -> Constraint | None:
        """The spec of this session's first constraint of `kind` (immutable: read it)."""
        with self._lock:
            return next((c for c in self._specs if isinstance(c, kind)), None)

    def tokens(self) -> list[int]:
        """A copy of the tokens from the window start (all of them until the context slid)."""
        return self._history.tokens()

    def context(self) -> list[int]:
        """A copy of what the model sees: a slid context's header, then `tokens()`."""
        return self._history.context()

    @property
    def status(self) -> Status:
        return self._status

    @property
    def position(self) -> int:
        return self._status.position

    @property
    def tick(self) -> int:
        return self._status.tick

    @property
    def window_start(self) -> int:
        """Position of the first token still held (0 until the context slid)."""
        return self._status.window_start

    @property
    def generating(self) -> bool:
        return self._status.generating

    @property
    def closed(self) -> bool:
        return self._status.closed

    @property
    def slot(self) -> int:
        return self._status.slot

    @property
    def lag(self) -> dict[str, int]:
        """What the clock floor moved: {"pushes", "ticks"}."""
        st = self._status
        return {"pushes": st.lag_pushes, "ticks": st.lag_ticks}

    # --- the scheduler thread's side -------------------------------------------------------------
    def _publish(self, status: Status) -> None:
        self._status = status  # one reference swap: readers see a whole Status

    def _emit(self, ev: Event) -> None:
        if self._on_event is None:
            self.events.put(ev)
            return
        try:
            self._on_event(ev)
        except Exception:  # a broken callback must not stop the other sessions
            logger.exception("session %d: on_event callback failed", self.id)
