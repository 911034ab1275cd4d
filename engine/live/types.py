"""Values that cross the live engine's thread boundary: sampling settings, events, commands.

Everything here is immutable or handed over whole (a `Request` travels in its `Generate`
command and belongs to the scheduler thread from then on).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..constraints import Constraint

if TYPE_CHECKING:
    from .state import SessionState

ClockFn = Callable[
    [], float
]  # the token time it is now (float ticks), read on the scheduler thread


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus mass
    min_p: float | None = None  # drop tokens below min_p * the top probability
    seed: int | None = None  # None: a random seed, fixed for the session's life
    # The waits' own temperature (SHIFT tokens, among themselves: `sampling.temper_span`);
    # None: 1, but accompaniment at the eighths' decision points sets its own
    # (`generation.ACCOMPANY_WAIT_TEMPERATURE`).
    wait_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.wait_temperature is not None and not 0 < self.wait_temperature <= 10:
            raise ValueError(f"wait_temperature must be in (0, 10], got {self.wait_temperature}")


# --- events (scheduler thread -> the session's callback or queue) ---------------------------------
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


@dataclass(frozen=True)
class Status:
    """A session as of the scheduler's last step, published whole (readers on any thread)."""

    slot: int
    position: int = 0
    tick: int = 0
    window_start: int = 0  # position of the first token still held (0 until the context slid)
    generating: bool = False
    closed: bool = False
    lag_pushes: int = 0  # times the clock floor moved the model's time forward
    lag_ticks: int = 0  # and by how many ticks in all


class SchedulerFull(RuntimeError):
    """Every session slot is taken."""


# --- requests and commands (any thread -> the scheduler thread, in call order) ---------------------
@dataclass
class Request:
    id: int
    max_tokens: int | None
    until_tick: int | None
    start_tick: int | None = None  # generate(start_tick=): time up to here first (then None)
    lead_in: int | None = None  # lead_in: no time, OFF or end before an ON at or after this tick
    lead_in_asked: bool = False  # generate(lead_in=True): set at the request's start
    redraw_waits: bool = False  # generate(redraw_waits=True): policy, "Waits drawn again afresh"
    n: int = 0  # tokens sampled so far
    redraws: dict[int, int] = field(default_factory=dict)  # position -> waits drawn again there


@dataclass(frozen=True)
class Open:
    state: SessionState  # built by open_session, owned by the scheduler thread from here on


@dataclass(frozen=True)
class Append:
    tokens: list[int]


@dataclass(frozen=True)
class Insert:
    tick: int
    tokens: list[int]


@dataclass(frozen=True)
class Generate:
    request: Request


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class Crop:
    position: int


@dataclass(frozen=True)
class RollbackTo:
    tick: int


@dataclass(frozen=True)
class Reset:
    prompt: list[int] | None


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class SetConstraint:
    """Swap in a new spec for the session's constraint of its class (added if none)."""

    spec: Constraint


@dataclass(frozen=True)
class SetSampling:
    sampling: SamplingParams


@dataclass(frozen=True)
class SetClock:
    clock: ClockFn | None


@dataclass(frozen=True)
class Schedule:
    """Marks (BAR/BEAT/CHORD tokens) to force at their ticks from `from_tick` on, replacing
    those scheduled there before (`LiveSession.schedule`)."""

    from_tick: int
    marks: tuple[tuple[int, tuple[int, ...]], ...]  # (tick, tokens), sorted by tick


Command = (
    Open | Append | Insert | Generate | Cancel | Crop | RollbackTo | Reset | Close
    | SetConstraint | SetSampling | SetClock | Schedule
)  # fmt: skip


class CancelFence:
    """The one synchronous path from a session's handle to its state: `cancel()` must stop
    delivery at once, not at the next step. The state delivers under `lock` and drops tokens
    of requests at or below the cancelled mark; re-entrant (an event callback may cancel)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._issued = -1  # the latest request id handed out
        self._cancelled = -1  # requests up to this id deliver nothing more

    def issue(self, rid: int) -> None:
        with self.lock:
            self._issued = rid

    def cancel(self) -> None:
        with self.lock:
            self._cancelled = self._issued

    def live(self, rid: int) -> bool:
        return rid > self._cancelled
