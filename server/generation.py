"""Offline generation for the HTTP API: continue, infill, accompany.

Each request runs as one session on the shared scheduler (so it is batched with the live
sessions and never blocks the event loop): the prompt is prefilled, given events are inserted at
their ticks (`LiveSession.insert` forces them while the model generates), and the sampled tokens
come back as events, turned into notes here. Files are reassembled at the note level: every
note that was not regenerated comes back exactly as it was read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from improv.engine.constraints import Constraint, MaxDuration, Parts, Programs, TimeLimit
from improv.engine.live import Done, Event, SamplingParams, Token
from improv.engine.tokenizer import Note, Notes
from improv.engine.tokenizer.encode import quantize
from improv.engine.tokenizer.layouts import make_accompany, make_infill
from improv.engine.tokenizer.vocab import TokenType, Vocab

from .runtime import Runtime

logger = logging.getLogger(__name__)

MAX_TOKENS_PER_SECOND = 400  # safety cap on one request (dense piano is ~50 tokens/s)


class GenerationError(ValueError):
    """The request can't be served as asked (the message says why): a 422."""


@dataclass
class Request:
    prompt: list[int]
    until_tick: int
    constraints: list[Constraint]
    sampling: SamplingParams
    forced: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (tick, tokens)
    max_tokens: int | None = None


async def run(rt: Runtime, req: Request) -> AsyncIterator[Token]:
    """The sampled tokens of one request, as they come (a session on the shared scheduler)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(ev: Event) -> None:  # scheduler thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # loop gone
            pass

    rt.acquire_http()
    s = None
    try:
        s = await rt.open_session(req.prompt, req.constraints, req.sampling, on_event)
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
    finally:
        if s is not None:
            s.close()
        rt.release_http()


class NoteBuilder:
    """Sampled (token, tick) -> notes; `events` for streaming, `notes` when done."""

    def __init__(self, vocab: Vocab, programs: dict[int, int], tick_offset: int = 0) -> None:
        self.v = vocab
        self.programs = dict(programs)  # part -> program until the model sets one
        self.offset = tick_offset  # session tick of time 0 of the output
        self.open: dict[tuple[int, int], tuple[int, int, int]] = {}  # key -> tick, vel, program
        self.notes: list[Note] = []
        self._part: int | None = None
        self._vel = 64
        self._drum_ticks = max(1, round(vocab.config.drum_note_ms / vocab.config.tick_ms))

    def _sec(self, tick: int) -> float:
        return (tick - self.offset) / self.v.ticks_per_second

    def _close(self, key: tuple[int, int], tick: int) -> dict[str, Any]:
        start, vel, prog = self.open.pop(key)
        tick = max(tick, start + 1)
        self.notes.append(Note(self._sec(start), self._sec(tick), key[1], vel, key[0], prog))
        return {
            "type": "note_off",
            "time": self._sec(tick),
            "pitch": key[1],
            "part": self._name(key[0]),
        }

    def _name(self, part: int) -> str:
        return self.v.config.parts[part]

    def feed(self, tok: int, tick: int) -> list[dict[str, Any]]:
        v = self.v
        ty = v.type_of(tok)
        if ty is TokenType.PART:
            self._part = tok - v.part_base
        elif ty is TokenType.PROGRAM and self._part is not None:
            self.programs[self._part] = tok - v.program_base
            self._part = None
        elif ty is TokenType.VELOCITY:
            self._vel = max(1, v.bin_velocity(tok - v.vel_base))
        elif ty is TokenType.NOTE_ON:
            part, pitch = key = v.note_of(tok)
            out = [self._close(key, tick)] if key in self.open else []
            prog = self.programs.get(part, 0)
            self.open[key] = (tick, self._vel, prog)
            out.append(
                {
                    "type": "note_on",
                    "time": self._sec(tick),
                    "pitch": pitch,
                    "velocity": self._vel,
                    "part": self._name(part),
                    "program": prog,
                }
            )
            if part == v.drums:
                out.append(self._close(key, tick + self._drum_ticks))
            return out
        elif ty is TokenType.NOTE_OFF:
            key = v.note_of(tok)
            if key in self.open:
                return [self._close(key, tick)]
        return []

    def finish(self, tick: int) -> list[dict[str, Any]]:
        return [self._close(k, tick) for k in sorted(self.open)]

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
    rt: Runtime,
    notes: Notes,
    seconds: float,
    sampling: SamplingParams,
    parts: list[str] | None = None,
    programs: dict[str, int] | None = None,
) -> Job:
    v, tok = rt.vocab, rt.tokenizer
    # The model hears the prompt from its first note (training examples open on a note, not on
    # a file's leading silence); the output is moved back to the file's time.
    first = int(quantize(float(notes.start.min()), v.ticks_per_second)) if len(notes) else 0
    prompt = tok.encode_notes(
        notes.shifted(-first / v.ticks_per_second), task="continue", eos=False
    )
    end = time_ticks(v, prompt) + int(round(seconds * v.ticks_per_second))
    cons: list[Constraint] = [MaxDuration(rt.settings.max_note_seconds, parts)]
    if parts:
        cons.append(Parts(parts))
    if programs:
        cons.append(Programs({k: [x] for k, x in programs.items()}))
    req = Request(prompt, end, cons, sampling, max_tokens=_cap(seconds))
    return Job(req, notes, NoteBuilder(v, part_programs(notes), tick_offset=-first), end)


def plan_infill(
    rt: Runtime,
    notes: Notes,
    start: float,
    end: float,
    sampling: SamplingParams,
    parts: list[str] | None = None,
) -> Job:
    v = rt.vocab
    idx = [v.part_index[x] for x in parts] if parts else None
    max_len = rt.scheduler.max_len
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
        MaxDuration(rt.settings.max_note_seconds, targets),
        # The gap's end in the grammar's own (section) time; forced events are time ceilings
        # in it too (the engine moves them there).
        TimeLimit(ex.end_tick),
    ]
    req = Request(
        ex.prompt, ex.end_tick + shift, cons, sampling, forced, max_tokens=_cap(end - start)
    )
    return Job(
        req, ex.kept, NoteBuilder(v, part_programs(notes), tick_offset=shift), ex.end_tick + shift
    )


def plan_accompany(
    rt: Runtime,
    notes: Notes,
    sampling: SamplingParams,
    parts: list[str],
    programs: dict[str, int] | None = None,
    tail_seconds: float = 1.0,
) -> Job:
    """`parts` generated along with `notes`' other parts (the lead, and a bass line, say), which
    are given: forced at their times and returned unchanged."""
    v = rt.vocab
    lead = notes.select(~np.isin(notes.part, [v.part_index[x] for x in parts]))
    _, events = make_accompany(v, lead, lead_parts=sorted(set(lead.part.tolist())))
    # The accompaniment starts with the lead: an intro over the silence before it would be in
    # a key the model can only guess (it then holds to it when the melody comes in). The model
    # hears the lead from its first note at time 0, as every training example opens on a note
    # (a file's leading silence, seconds of it before a song's melody, is not what it learned
    # to accompany); the output is moved back to the file's time.
    first = events[0].tick if events else 0
    end = (events[-1].tick - first if events else 0) + int(round(tail_seconds * v.ticks_per_second))
    cons: list[Constraint] = [Parts(parts), MaxDuration(rt.settings.max_note_seconds, parts)]
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


async def execute(rt: Runtime, job: Job) -> Notes:
    """Run a job to the end; the given notes plus the generated ones."""
    async for ev in run(rt, job.request):
        job.builder.feed(ev.token, ev.tick)
    job.builder.finish(job.end_tick)
    return Notes.concat([job.given, job.builder.result()]).sorted()


async def stream_events(rt: Runtime, job: Job) -> AsyncIterator[dict[str, Any]]:
    """Newline-JSON events as the notes are generated, then a `done` event."""
    n = 0
    async for ev in run(rt, job.request):
        for out in job.builder.feed(ev.token, ev.tick):
            n += out["type"] == "note_on"
            yield out
    for out in job.builder.finish(job.end_tick):
        yield out
    yield {"type": "done", "generated_notes": n}
