"""Offline generation: continue, infill, accompany a MIDI file's notes.

A planner (`plan_continue`, `plan_infill`, `plan_accompany`) turns the notes and the request into
a `Job`: the prompt, the given events to force at their ticks, the constraints, and a
`NoteBuilder` that turns the sampled tokens back into notes. `execute` (the whole result) and
`stream_events` (note events as they come) run a job as one session of a live `Scheduler` (so the
server batches it with the live sessions), opened through `Sessions`, the one thing a host
provides: the server's runtime (the shared scheduler, its HTTP slots) or `SchedulerSessions` (a
scheduler of its own: `improv generate`, benchmarks). Files are reassembled at the note level:
every note that was not regenerated comes back exactly as it was read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .constraints import (
    Candidates,
    Constraint,
    GrammarState,
    MaxDuration,
    Parts,
    Programs,
    TimeLimit,
)
from .live import Done, Event, EventCallback, LiveSession, SamplingParams, Scheduler, Token
from .tokenizer import Note, Notes, Tokenizer
from .tokenizer.decode import NoteOff, NoteOn, OpenNotes, TokenDecoder
from .tokenizer.encode import quantize
from .tokenizer.layouts import make_accompany, make_infill
from .tokenizer.vocab import Vocab

logger = logging.getLogger(__name__)

MAX_TOKENS_PER_SECOND = 400  # safety cap on one request (dense piano is ~50 tokens/s)
MAX_NOTE_SECONDS = 8.0  # no generated note sounds longer (the server's IMPROV_MAX_NOTE_SECONDS)


class GenerationError(ValueError):
    """The request can't be served as asked (the message says why; the server answers 422)."""


@dataclass
class Request:
    prompt: list[int]
    until_tick: int
    constraints: list[Constraint]
    sampling: SamplingParams
    forced: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (tick, tokens)
    max_tokens: int | None = None


class Sessions(Protocol):
    """What a host gives offline jobs: the model's vocabulary and tokenizer, its limits, and
    engine sessions (an async context manager: the session is closed, and any capacity it took
    released, on the way out)."""

    vocab: Vocab
    tokenizer: Tokenizer
    max_len: int  # tokens a session's context holds
    max_note_seconds: float

    def session(
        self,
        prompt: list[int],
        constraints: list[Constraint],
        sampling: SamplingParams,
        on_event: EventCallback,
    ) -> AbstractAsyncContextManager[LiveSession]: ...


class SchedulerSessions:
    """`Sessions` on a scheduler of its own, for `max_sessions` jobs at once (the CLI, benchmarks):
    `with SchedulerSessions(engine, k) as sessions: asyncio.run(execute(sessions, job))`."""

    def __init__(
        self, engine: Any, max_sessions: int = 1, max_note_seconds: float = MAX_NOTE_SECONDS
    ) -> None:
        self.scheduler = Scheduler(engine, max_sessions=max_sessions)
        self.vocab: Vocab = engine.vocab
        self.tokenizer: Tokenizer = engine.tokenizer
        self.max_len = self.scheduler.max_len
        self.max_note_seconds = max_note_seconds

    def __enter__(self) -> SchedulerSessions:
        self.scheduler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.scheduler.stop()

    @asynccontextmanager
    async def session(
        self,
        prompt: list[int],
        constraints: list[Constraint],
        sampling: SamplingParams,
        on_event: EventCallback,
    ) -> AsyncIterator[LiveSession]:
        s = self.scheduler.open_session(prompt, constraints, sampling, on_event)
        try:
            yield s
        finally:
            s.close()


async def run(sessions: Sessions, req: Request) -> AsyncIterator[Token]:
    """The sampled tokens of one request, as they come (a session on the host's scheduler)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(ev: Event) -> None:  # scheduler thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # loop gone
            pass

    async with sessions.session(req.prompt, req.constraints, req.sampling, on_event) as s:
        rid = s.generate(max_tokens=req.max_tokens, until_tick=req.until_tick)
        for tick, toks in req.forced:  # forced while the request runs (docs/engine-live.md)
            s.insert(tick, toks)
        while True:
            ev = await queue.get()
            if isinstance(ev, Token) and ev.request == rid:
                yield ev
            elif isinstance(ev, Done) and ev.request == rid:
                if ev.reason == "error":
                    raise RuntimeError("generation failed in the scheduler")
                return


class NoteBuilder:
    """Sampled (token, tick) -> notes (the events of `TokenDecoder`); `feed` returns note events
    for streaming, `notes` the notes when done. A note lasts at least one tick."""

    def __init__(self, vocab: Vocab, programs: dict[int, int], tick_offset: int = 0) -> None:
        self.v = vocab
        self.offset = tick_offset  # session tick of time 0 of the output
        self.notes: list[Note] = []
        # programs: part -> program until the model sets one
        self._dec = TokenDecoder(vocab, programs)
        self._open = OpenNotes()

    def _sec(self, tick: int) -> float:
        return (tick - self.offset) / self.v.ticks_per_second

    def _close(self, on: NoteOn, tick: int) -> dict[str, Any]:
        tick = max(tick, on.tick + 1)
        self.notes.append(
            Note(self._sec(on.tick), self._sec(tick), on.pitch, on.velocity, on.part, on.program)
        )
        return {
            "type": "note_off",
            "time": self._sec(tick),
            "pitch": on.pitch,
            "part": self._name(on.part),
        }

    def _name(self, part: int) -> str:
        return self.v.config.parts[part]

    def feed(self, tok: int, tick: int) -> list[dict[str, Any]]:
        out = []
        for ev in self._dec.feed(tok, tick):
            if isinstance(ev, NoteOn):
                if (ended := self._open.start(ev)) is not None:
                    out.append(self._close(ended, ev.tick))
                out.append(
                    {
                        "type": "note_on",
                        "time": self._sec(ev.tick),
                        "pitch": ev.pitch,
                        "velocity": ev.velocity,
                        "part": self._name(ev.part),
                        "program": ev.program,
                    }
                )
            elif isinstance(ev, NoteOff) and (on := self._open.end(ev)) is not None:
                out.append(self._close(on, ev.tick))
        return out

    def finish(self, tick: int) -> list[dict[str, Any]]:
        return [self._close(on, tick) for on in self._open.finish()]

    def result(self) -> Notes:
        return Notes.from_list(self.notes)


def time_ticks(vocab: Vocab, ids: Sequence[int]) -> int:
    return sum(vocab.shift_ticks(t) for t in ids)


def part_programs(notes: Notes) -> dict[int, int]:
    """The first program each part plays in `notes` (the default for generated notes)."""
    out: dict[int, int] = {}
    for part, prog in zip(notes.part.tolist(), notes.program.tolist(), strict=True):
        out.setdefault(int(part), int(prog))
    return out


@dataclass
class Job:
    """A prepared request and how to turn its tokens into the output."""

    request: Request
    given: Notes  # the notes that come back unchanged
    builder: NoteBuilder
    end_tick: int  # session tick where generation stops (open notes end here)


def plan_continue(
    sessions: Sessions,
    notes: Notes,
    seconds: float,
    sampling: SamplingParams,
    parts: list[str] | None = None,
    programs: dict[str, int] | None = None,
) -> Job:
    v, tok = sessions.vocab, sessions.tokenizer
    # The model hears the prompt from its first note (training examples open on a note, not on
    # a file's leading silence); the output is moved back to the file's time.
    first = int(quantize(float(notes.start.min()), v.ticks_per_second)) if len(notes) else 0
    prompt = tok.encode_notes(
        notes.shifted(-first / v.ticks_per_second), task="continue", eos=False
    )
    end = time_ticks(v, prompt) + int(round(seconds * v.ticks_per_second))
    cons: list[Constraint] = [MaxDuration(sessions.max_note_seconds, parts)]
    if parts:
        cons.append(Parts(parts))
    if programs:
        cons.append(Programs({k: [x] for k, x in programs.items()}))
    req = Request(prompt, end, cons, sampling, max_tokens=_cap(seconds))
    return Job(req, notes, NoteBuilder(v, part_programs(notes), tick_offset=-first), end)


class GapTimes(Constraint):
    """Infill middle: time never passes the next given event's tick or the gap's end, in the
    grammar's own (section) time: a time ceiling. Needed because LiveSession's time limit counts
    the suffix's time tokens too (its ticks are cumulative over the whole prompt)."""

    hard = True

    def __init__(self, forced_ticks: Sequence[int], end_tick: int) -> None:
        self.forced = np.array(sorted(t for t in set(forced_ticks) if t < end_tick), dtype=np.int64)
        self._limits = np.append(self.forced, end_tick)  # each given event's tick, then the end

    def restrict(self, cand: Candidates, state: GrammarState, vocab: Vocab) -> None:
        i = np.searchsorted(self.forced, state.tick, side="right")  # (B,) next given event
        np.minimum(cand.ceiling, self._limits[i], out=cand.ceiling)


def plan_infill(
    sessions: Sessions,
    notes: Notes,
    start: float,
    end: float,
    sampling: SamplingParams,
    parts: list[str] | None = None,
) -> Job:
    v = sessions.vocab
    idx = [v.part_index[x] for x in parts] if parts else None
    max_len = sessions.max_len
    ex = None
    # The whole example must fit the context (sliding would cut the fill-in-the-middle layout):
    # shrink the context around the gap until it does.
    for ctx in (None, 120.0, 60.0, 30.0, 15.0, 8.0, 4.0, 2.0):
        ex = make_infill(v, notes, start, end, parts=idx, context_seconds=ctx)
        if len(ex.prompt) + 2 * len(ex.middle) + 64 <= max_len:
            break
    else:
        raise GenerationError(
            f"the gap [{start}, {end}) s holds too many notes for the model's context "
            f"({max_len} tokens); choose a shorter gap"
        )
    assert ex is not None
    shift = time_ticks(v, ex.prompt) - ex.start_tick  # session tick - gap tick in the middle
    forced = [(e.tick + shift, e.tokens) for e in ex.forced]
    targets = parts or list(v.config.parts)
    cons: list[Constraint] = [
        Parts(targets),
        MaxDuration(sessions.max_note_seconds, targets),
        GapTimes([e.tick for e in ex.forced], ex.end_tick),
        TimeLimit(ex.end_tick),
    ]
    req = Request(
        ex.prompt, ex.end_tick + shift, cons, sampling, forced, max_tokens=_cap(end - start)
    )
    return Job(
        req, ex.kept, NoteBuilder(v, part_programs(notes), tick_offset=shift), ex.end_tick + shift
    )


def plan_accompany(
    sessions: Sessions,
    notes: Notes,
    sampling: SamplingParams,
    parts: list[str],
    programs: dict[str, int] | None = None,
    tail_seconds: float = 1.0,
) -> Job:
    """`parts` generated along with `notes`' other parts (the lead, and a bass line, say), which
    are given: forced at their times and returned unchanged."""
    v = sessions.vocab
    lead = notes.select(~np.isin(notes.part, [v.part_index[x] for x in parts]))
    _, events = make_accompany(v, lead, lead_parts=sorted(set(lead.part.tolist())))
    # The accompaniment starts with the lead: an intro over the silence before it would be in
    # a key the model can only guess (it then holds to it when the melody comes in). The model
    # hears the lead from its first note at time 0, as every training example opens on a note
    # (a file's leading silence, seconds of it before a song's melody, is not what it learned
    # to accompany); the output is moved back to the file's time.
    first = events[0].tick if events else 0
    end = (events[-1].tick - first if events else 0) + int(round(tail_seconds * v.ticks_per_second))
    cons: list[Constraint] = [Parts(parts), MaxDuration(sessions.max_note_seconds, parts)]
    if programs:
        cons.append(Programs({k: [x] for k, x in programs.items() if k in parts}))
    seconds = end / v.ticks_per_second
    req = Request(
        [v.BOS, v.TASK_ACCOMPANY],
        end,
        cons,
        sampling,
        [(e.tick - first, e.tokens) for e in events],
        max_tokens=_cap(seconds),
    )
    return Job(req, lead, NoteBuilder(v, {}, tick_offset=-first), end)


def _cap(seconds: float) -> int:
    return int(max(seconds, 1.0) * MAX_TOKENS_PER_SECOND) + 256


async def execute(sessions: Sessions, job: Job) -> Notes:
    """Run a job to the end; the given notes plus the generated ones."""
    async for ev in run(sessions, job.request):
        job.builder.feed(ev.token, ev.tick)
    job.builder.finish(job.end_tick)
    return Notes.concat([job.given, job.builder.result()]).sorted()


async def stream_events(sessions: Sessions, job: Job) -> AsyncIterator[dict[str, Any]]:
    """Newline-JSON events as the notes are generated, then a `done` event."""
    n = 0
    async for ev in run(sessions, job.request):
        for out in job.builder.feed(ev.token, ev.tick):
            n += out["type"] == "note_on"
            yield out
    for out in job.builder.finish(job.end_tick):
        yield out
    yield {"type": "done", "generated_notes": n}
