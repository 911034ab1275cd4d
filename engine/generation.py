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
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from .chord_planner import ChordPlanner
from .conditioning import Conditioning
from .constraints import (
    ChordsFitMelody,
    ChordsOnBeats,
    ChordTones,
    Constraint,
    EndNotBefore,
    GivenMarks,
    MaxDuration,
    Parts,
    Programs,
    StartParts,
    TimeLimit,
)
from .live import Done, Event, EventCallback, LiveSession, SamplingParams, Scheduler, Token
from .tokenizer import Note, Notes, Tokenizer
from .tokenizer.chord_plan import melody_weights, plan_chords
from .tokenizer.decode import ChordChange, NoteOff, NoteOn, OpenNotes, TokenDecoder
from .tokenizer.encode import mark_events, quantize
from .tokenizer.harmony import CHORD, Marks, chord_label
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
    start_tick: int = 0  # session tick where the generated span begins (what `seconds` counts)
    redraw_waits: bool = False  # LiveSession.generate(redraw_waits=): infill's given parts
    done: Done | None = None  # how it ended (set by `run`)


class Sessions(Protocol):
    """What a host gives offline jobs: the model's vocabulary and tokenizer, its limits, and
    engine sessions (an async context manager: the session is closed, and any capacity it took
    released, on the way out)."""

    vocab: Vocab
    tokenizer: Tokenizer
    max_len: int  # tokens a session's context holds
    max_note_seconds: float
    chord_planner: ChordPlanner | None  # the checkpoint's; None: the HMM plan

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
        if hasattr(self.scheduler.decoder, "row_invariant"):  # a seed gives the same notes
            self.scheduler.decoder.row_invariant = True  # whatever else runs (onnx_backend)
        self.vocab: Vocab = engine.vocab
        self.tokenizer: Tokenizer = engine.tokenizer
        self.max_len = self.scheduler.max_len
        self.max_note_seconds = max_note_seconds
        self.chord_planner: ChordPlanner | None = engine.chord_planner

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
        rid = s.generate(  # forced while the request runs (docs/engine-live.md)
            max_tokens=req.max_tokens,
            until_tick=req.until_tick,
            redraw_waits=req.redraw_waits,
            forced=req.forced,
        )
        while True:
            ev = await queue.get()
            if isinstance(ev, Token) and ev.request == rid:
                yield ev
            elif isinstance(ev, Done) and ev.request == rid:
                req.done = ev
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
        self.chords: list[tuple[float, int]] = []  # (seconds, chord index): the model's own plan

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
            elif isinstance(ev, ChordChange):
                if not self.chords or self.chords[-1][1] != ev.chord:
                    self.chords.append((self._sec(ev.tick), ev.chord))
                    out.append(
                        {
                            "type": "chord",
                            "time": self._sec(ev.tick),
                            "label": chord_label(ev.chord),
                        }
                    )
        return out

    def finish(self, tick: int) -> list[dict[str, Any]]:
        return [self._close(on, tick) for on in self._open.finish()]

    def result(self) -> Notes:
        return Notes.from_list(self.notes)

    def chord_marks(self) -> Marks:
        t = [c[0] for c in self.chords]
        return Marks.build(t, [CHORD] * len(t), [c[1] for c in self.chords])


def time_ticks(vocab: Vocab, ids: Sequence[int]) -> int:
    return sum(vocab.shift_ticks(t) for t in ids)


def part_programs(notes: Notes) -> dict[int, int]:
    """The first program each part plays in `notes` (the default for generated notes)."""
    out: dict[int, int] = {}
    for part, prog in zip(notes.part.tolist(), notes.program.tolist(), strict=True):
        out.setdefault(int(part), int(prog))
    return out


def asked_programs(vocab: Vocab, programs: dict[str, int] | None) -> dict[int, int]:
    """Part index -> program of the programs a request asks for. The header states them and the
    Programs constraint allows no other, so the model need not say them again; the builder sees
    only sampled tokens, so it starts from them (else those notes came out as program 0)."""
    return {vocab.part_index[k]: x for k, x in (programs or {}).items() if k in vocab.part_index}


@dataclass
class Job:
    """A prepared request and how to turn its tokens into the output."""

    request: Request
    given: Notes  # the notes that come back unchanged
    builder: NoteBuilder
    end_tick: int  # session tick where generation stops (open notes end here)
    cond: Conditioning = field(default_factory=Conditioning)
    parts: tuple[str, ...] = ()  # the parts asked for by name (reported if they stay silent)

    def outcome(self) -> tuple[float, str]:
        """(seconds generated, why it stopped): "complete" when the whole span asked for was
        generated, else the reason (e.g. "max_tokens": the request's token cap)."""
        req, tps = self.request, self.builder.v.ticks_per_second
        done = req.done
        if done is None:
            return 0.0, "not run"
        reached = min(max(done.tick, req.start_tick), self.end_tick)
        seconds = round(float(reached - req.start_tick) / tps, 3)
        if done.reason == "until_tick" or reached >= self.end_tick:
            return seconds, "complete"
        if done.reason == "max_tokens":
            return seconds, f"max_tokens: the request's cap of {req.max_tokens} tokens was reached"
        return seconds, done.reason

    def chords(self) -> Marks:
        """The output's chords (file time): the given ones, else the model's own plan."""
        if self.cond.chords is not None:
            return self.cond.chords
        return self.builder.chord_marks()


def _given_marks(cond: Conditioning, vocab: Vocab, accompany: bool = False) -> list[Constraint]:
    """The model writes no beats or chords of its own where they are given; harmony and bass
    keep to the chord where `cond` asks (harmony vocabularies)."""
    if not vocab.harmony:
        return []
    out: list[Constraint] = []
    if cond.beats is not None or cond.chords is not None:
        out.append(GivenMarks(beats=cond.beats is not None, chords=cond.chords is not None))
    if cond.chords is None:
        out.append(ChordsOnBeats(strong_only=False))
    if cond.wants_chord_tones(accompany):
        out.append(ChordTones())
    return out


def _header(
    vocab: Vocab, parts: Sequence[str] | None, programs: dict[str, int] | None
) -> list[int]:
    """The instrumentation header for the parts asked for (none if none are named)."""
    if not parts:
        return []
    programs = programs or {}
    return vocab.header(
        [(vocab.part_index[p], programs.get(p)) for p in parts if p in vocab.part_index]
    )


def _forced_marks(
    vocab: Vocab, marks: Marks, lo: float, hi: float, shift: int
) -> list[tuple[int, tuple[int, ...]]]:
    """(session tick, (token,)) of the marks in [lo, hi) s of file time, in the order the
    encoder writes them (by tick: the meter, then the chord); `shift`: the session tick of file
    time 0."""
    if not vocab.harmony or len(marks) == 0:
        return []
    w = marks.select((marks.time >= lo) & (marks.time < hi))
    ticks, toks = mark_events(w, vocab, -(10**9))  # annotations a hair apart share a tick
    return [(int(t) + shift, (tok,)) for t, tok in zip(ticks, toks, strict=True)]


def plan_continue(
    sessions: Sessions,
    notes: Notes,
    seconds: float,
    sampling: SamplingParams,
    parts: list[str] | None = None,
    programs: dict[str, int] | None = None,
    cond: Conditioning | None = None,
) -> Job:
    """`seconds` more of `notes`; with `cond`, its beats and chords (in file time) are heard in
    the prompt and forced in the continuation."""
    v, tok = sessions.vocab, sessions.tokenizer
    cond = cond or Conditioning()
    # The model hears the prompt from its first note (training examples open on a note, not on
    # a file's leading silence); the output is moved back to the file's time.
    first = int(quantize(float(notes.start.min()), v.ticks_per_second)) if len(notes) else 0
    t0 = first / v.ticks_per_second
    marks = cond.marks
    p_end = float(notes.end.max()) if len(notes) else 0.0
    head = _header(v, parts, programs)
    window = marks.window(t0, p_end) if len(marks) else None
    ids = tok.encode_notes(notes.shifted(-t0), task="continue", eos=False, marks=window)
    body = ids[2:]
    prompt = [*ids[:2], *head, *body]
    p_ticks = time_ticks(v, prompt)
    end = p_ticks + int(round(seconds * v.ticks_per_second))
    forced = _forced_marks(
        v, marks, t0 + p_ticks / v.ticks_per_second, t0 + end / v.ticks_per_second, -first
    )
    forced = [f for f in forced if f[0] > p_ticks or (f[0] == p_ticks and not body)]
    cons: list[Constraint] = [MaxDuration(sessions.max_note_seconds, parts), *_given_marks(cond, v)]
    if parts:
        cons.append(Parts(parts))
    if programs:
        cons.append(Programs({k: [x] for k, x in programs.items()}))
    req = Request(prompt, end, cons, sampling, forced, max_tokens=_cap(seconds), start_tick=p_ticks)
    builder = NoteBuilder(
        v, {**part_programs(notes), **asked_programs(v, programs)}, tick_offset=-first
    )
    return Job(req, notes, builder, end, cond, tuple(parts or ()))


def plan_infill(
    sessions: Sessions,
    notes: Notes,
    start: float,
    end: float,
    sampling: SamplingParams,
    parts: list[str] | None = None,
    cond: Conditioning | None = None,
) -> Job:
    v = sessions.vocab
    cond = cond or Conditioning()
    marks = cond.marks if len(cond.marks) else None
    idx = [v.part_index[x] for x in parts] if parts else None
    max_len = sessions.max_len
    ex = None
    # The whole example must fit the context (sliding would cut the fill-in-the-middle layout):
    # shrink the context around the gap until it does.
    for ctx in (None, 120.0, 60.0, 30.0, 15.0, 8.0, 4.0, 2.0):
        ex = make_infill(v, notes, start, end, parts=idx, context_seconds=ctx, marks=marks)
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
        *_given_marks(cond, v),
        # The gap's end in the grammar's own (section) time; forced events are time ceilings
        # in it too (the engine moves them there). The middle closes there, not before.
        TimeLimit(ex.end_tick),
        EndNotBefore(ex.end_tick),
    ]
    req = Request(
        ex.prompt, ex.end_tick + shift, cons, sampling, forced, max_tokens=_cap(end - start),
        start_tick=ex.start_tick + shift, redraw_waits=True,
    )  # fmt: skip
    builder = NoteBuilder(v, part_programs(notes), tick_offset=shift)
    return Job(req, ex.kept, builder, ex.end_tick + shift, cond, tuple(parts or ()))


def plan_accompany(
    sessions: Sessions,
    notes: Notes,
    sampling: SamplingParams,
    parts: list[str],
    programs: dict[str, int] | None = None,
    tail_seconds: float = 1.0,
    cond: Conditioning | None = None,
    eighths: bool = True,
) -> Job:
    """`parts` generated along with `notes`' other parts (the lead, and a bass line, say), which
    are given: forced at their times and returned unchanged. With `cond`, its beats and chords
    are forced too. Where beats are known, a harmony model continues the whole piece (the
    instrumentation header names the given parts and `parts`), with decision points at the
    eighths between the beats (`eighth_cuts`; `eighths=False`: none)."""
    v = sessions.vocab
    cond = cond or Conditioning()
    lead = notes.select(~np.isin(notes.part, [v.part_index[x] for x in parts]))
    _, events = make_accompany(v, lead, lead_parts=sorted(set(lead.part.tolist())))
    # The accompaniment starts with the lead: an intro over the silence before it would be in
    # a key the model can only guess (it then holds to it when the melody comes in). The model
    # hears the lead from its first note at time 0, as every training example opens on a note
    # (a file's leading silence, seconds of it before a song's melody, is not what it learned
    # to accompany); the output is moved back to the file's time.
    first = events[0].tick if events else 0
    end = (events[-1].tick - first if events else 0) + int(round(tail_seconds * v.ticks_per_second))
    forced = [(e.tick - first, e.tokens) for e in events]
    marks = cond.marks
    if len(marks):  # the chord sounding at the first note is stated there
        t0 = first / v.ticks_per_second
        w = marks.window(t0, t0 + end / v.ticks_per_second)
        forced = sorted(_forced_marks(v, w, 0.0, np.inf, 0) + forced, key=lambda f: f[0])
    cons: list[Constraint] = [
        Parts(parts),
        MaxDuration(sessions.max_note_seconds, parts),
        *_given_marks(cond, v, accompany=True),
    ]
    meter = [(t, toks[0] == v.BAR) for t, toks in forced if toks[0] in (v.BAR, v.BEAT)]
    beats = [t for t, _ in meter] if v.harmony else []
    if v.harmony and cond.chords is None and cond.wants_chord_tones(True):
        melody = lead.shifted(-first / v.ticks_per_second)
        cons.append(_melody_fits(v, melody, meter, sessions.chord_planner))
    if v.harmony:  # every part asked for plays (a harmony model)
        cons.append(StartParts(parts))
    programs = {k: x for k, x in (programs or {}).items() if k in parts}  # the given keep theirs
    if programs:
        cons.append(Programs({k: [x] for k, x in programs.items()}))
    seconds = end / v.ticks_per_second
    task, head = v.TASK_ACCOMPANY, _header(v, parts, programs)
    if v.harmony and beats:  # the piece continued, the given parts forced: docs/engine-live.md
        task = v.TASK_CONTINUE
        given = [(int(p), x) for p, x in sorted(part_programs(lead).items())]
        head = v.header(given + [(v.part_index[p], programs.get(p)) for p in parts])
        if eighths:
            forced = sorted(forced + eighth_cuts(beats, end), key=lambda f: f[0])
            if sampling.wait_temperature is None:
                sampling = replace(sampling, wait_temperature=ACCOMPANY_WAIT_TEMPERATURE)
    req = Request([v.BOS, task, *head], end, cons, sampling, forced, max_tokens=_cap(seconds))
    builder = NoteBuilder(v, asked_programs(v, programs), tick_offset=-first)
    return Job(req, lead, builder, end, cond, tuple(parts))


# The waits' temperature (`SamplingParams.wait_temperature`) where accompaniment has decision
# points at the eighths: a wait that ends just short of the next eighth is the model's estimate
# of the eighth's length falling short; flattened a little, more of its waits reach the eighth
# (and are cut there: it draws again). The card's 20 songs, near an eighth: 1: 77.7-80.1%
# (6 runs, before runs were reproducible), 1.3: 79.5-82.6% (4), real piano 83.5%
# (docs/engine-live.md has the sweep).
ACCOMPANY_WAIT_TEMPERATURE = 1.3


def eighth_cuts(beat_ticks: list[int], end: int) -> list[tuple[int, tuple[int, ...]]]:
    """Decision points at the eighth-note positions between `beat_ticks` (and after the last,
    before `end`): forced events with no tokens. A wait the model draws is cut there, as a beat
    cuts it, and it draws again: its long waits (a note a beat or more away) pass no eighth
    undecided. Without them, the accompaniment played 1.7 notes/s where the real piano plays
    3.3 (8 validation songs), most of it on the grid; with them, 3.7 and still on it."""
    cuts = [(a + b) // 2 for a, b in itertools.pairwise(beat_ticks)]
    if len(beat_ticks) > 1:
        cuts.append(beat_ticks[-1] + (beat_ticks[-1] - beat_ticks[-2]) // 2)
    return [(t, ()) for t in cuts if t < end]


def _melody_fits(
    vocab: Vocab, melody: Notes, beats: list[tuple[int, bool]], planner: ChordPlanner | None
) -> ChordsFitMelody:
    """The model's chord at each beat (tick, is a downbeat): the plan of the learned `planner`
    (or, without one, of the HMM `chord_plan.plan_chords`) from the melody (session time)
    sounding in each beat."""
    if not len(melody := melody.select(melody.part != vocab.drums)) or len(beats) < 2:
        return ChordsFitMelody()
    tps = vocab.ticks_per_second
    ticks = np.array([t for t, _ in beats], dtype=np.float64)  # (N,)
    edges = np.append(ticks, ticks[-1] + (ticks[-1] - ticks[-2]))  # (N+1,) the last beat as long
    weights = melody_weights(melody.pitch, melody.start * tps, melody.end * tps, edges)
    weights /= np.diff(edges)[:, None]  # (N, 12) in beats
    downbeat = np.array([d for _, d in beats])
    bar_pos = np.arange(len(beats)) - np.maximum.accumulate(
        np.where(downbeat, np.arange(len(beats)), 0)
    )
    bars = np.cumsum(downbeat)  # (N,) the bar each beat is in (0: before the first downbeat)
    beats_per_bar = np.bincount(bars)[bars]
    beats_per_bar = np.where(beats_per_bar < 2, 4, beats_per_bar)
    plan = (planner.plan if planner else plan_chords)(weights, bar_pos, beats_per_bar)
    return ChordsFitMelody(tuple((int(t), (int(c),)) for t, c in zip(ticks, plan, strict=True)))


def _cap(seconds: float) -> int:
    return int(max(seconds, 1.0) * MAX_TOKENS_PER_SECOND) + 256


def missing_parts(vocab: Vocab, job: Job, notes: Notes) -> list[str]:
    """The parts asked for by name that play no generated note (a response says so)."""
    played = {vocab.config.parts[n.part] for n in job.builder.notes}
    return [p for p in job.parts if p not in played]


def chords_json(chords: Marks) -> list[dict[str, Any]]:
    """[{"time": s, "label": "A:min"}] of chord marks."""
    ch = chords.select(chords.kind == CHORD)
    return [
        {"time": round(float(t), 4), "label": chord_label(int(c))}
        for t, c in zip(ch.time.tolist(), ch.value.tolist(), strict=True)
    ]


async def execute(sessions: Sessions, job: Job) -> Notes:
    """Run a job to the end; the given notes plus the generated ones."""
    async for ev in run(sessions, job.request):
        job.builder.feed(ev.token, ev.tick)
    job.builder.finish(job.end_tick)
    return Notes.concat([job.given, job.builder.result()]).sorted()


async def stream_events(sessions: Sessions, job: Job) -> AsyncIterator[dict[str, Any]]:
    """Newline-JSON events as the notes are generated (given chords first, the model's own as
    it writes them), then a `done` event."""
    n = 0
    played: set[str] = set()
    if job.cond.chords is not None:
        for c in chords_json(job.cond.chords):
            yield {"type": "chord", **c}
    async for ev in run(sessions, job.request):
        for out in job.builder.feed(ev.token, ev.tick):
            if out["type"] == "note_on":
                n += 1
                played.add(out["part"])
            yield out
    for out in job.builder.finish(job.end_tick):
        yield out
    seconds, why = job.outcome()
    done: dict[str, Any] = {
        "type": "done",
        "generated_notes": n,
        "generated_seconds": seconds,
        "stop_reason": why,
    }
    if missing := [p for p in job.parts if p not in played]:
        done["missing_parts"] = missing
    yield done
