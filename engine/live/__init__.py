"""Live sessions and the scheduler that advances them all in one batched forward per step.

    sched = Scheduler(engine, max_sessions=16)
    sched.start()                                           # one background thread
    s = sched.open_session([BOS, TASK_ACCOMPANY], constraints=[Parts(accompaniment_parts(v))],
                           sampling=SamplingParams(seed=1), on_event=callback, clock=now_ticks)
    s.generate(until_tick=now + lookahead)                  # Token events stream out
    s.insert(tick, player_tokens)                           # roll back / force, then continue
    s.close()

Modules, one job each: `types` (values that cross threads: settings, events, commands),
`handle` (`LiveSession`: queues commands, any thread), `state` (`SessionState`: one session,
scheduler thread only), `history` (its tokens and rollback), `policy` (which drawn notes to
reject, back-off), `shadow` (the context slide), `timing` (the clock floor's measurements),
`scheduler` (the step). Design: docs/engine-live.md.

Sampling noise is keyed on (seed, position): a session's tokens depend only on its own prefix,
never on its batch mates, on how its tokens were split between prompt and appends, or on what
it sampled before a rollback (rollback then generate == fresh generation from the same prefix).
"""

from .handle import LiveSession
from .history import opens_pair
from .scheduler import EngineLike, Scheduler, contiguous_runs
from .types import (
    ClockFn,
    Done,
    Event,
    EventCallback,
    Rollback,
    SamplingParams,
    SchedulerFull,
    Status,
    Token,
)

__all__ = [
    "ClockFn",
    "Done",
    "EngineLike",
    "Event",
    "EventCallback",
    "LiveSession",
    "Rollback",
    "SamplingParams",
    "Scheduler",
    "SchedulerFull",
    "Status",
    "Token",
    "contiguous_runs",
    "opens_pair",
]
