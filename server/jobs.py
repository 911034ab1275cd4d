"""HTTP generation jobs: a request's file and fields -> a planned job -> the answer's bytes.

What `/v1/continue|infill|accompany` do after their cheap field checks, as plain functions on a
host (engine/generation.py's `Sessions`, plus the server's limits): `prepare` reads the file,
its chords and beats and plans the job; `answer` encodes the result (MIDI or JSON). `LocalJobs`
runs them in this process, on a host's scheduler; server/job_process.py runs the same
`LocalJobs` in a worker process of its own (the default: live sessions then never share the
GIL, or a niced core, with file requests). Both speak `Jobs`, the one interface http.py uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from improv.engine import generation as gen
from improv.engine.conditioning import Conditioning, ConditioningError
from improv.engine.live import SamplingParams, SchedulerFull
from improv.engine.tokenizer import MidiReadError, Notes

from .settings import Settings

logger = logging.getLogger(__name__)

Kind = Literal["continue", "infill", "accompany"]


class JobError(Exception):
    """What the client is told: an HTTP status and a detail that says what is wrong."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


@dataclass
class Fields:
    """A generation request's fields, checked (http.py), with the defaults of the form."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    parts: list[str] | None = None
    programs: dict[str, int] | None = None
    chords: str | None = None
    beats: str | None = None
    bpm: float | None = None
    beats_per_bar: int | None = None
    chord_tones: bool | None = None
    seconds: float = 8.0  # continue
    start: float = 0.0  # infill
    end: float = 0.0  # infill


@dataclass
class Answer:
    body: bytes
    media_type: str
    headers: dict[str, str]


# --- the work (plain functions: a thread of the host's pool runs them) --------------------------
def read_notes(
    host: gen.Sessions,
    settings: Settings,
    data: bytes,
    parts: str | None = None,
    max_seconds: float | None = None,
) -> Notes:
    """The file's notes; the note count and length are checked on the parsed arrays, before
    any per-note work (the bound on a request's memory: IMPROV_MAX_UPLOAD_NOTES)."""
    try:
        notes = host.tokenizer.read_notes(data, parts, (), settings.max_upload_notes, max_seconds)
    except MidiReadError as e:  # its message says what is wrong, once
        msg = str(e)
        raise JobError(422, msg if "MIDI" in msg else f"not a readable MIDI file: {msg}") from e
    except Exception as e:  # a parser failing on garbage is still the input's fault
        raise JobError(422, f"not a readable MIDI file: {type(e).__name__}: {e}") from e
    if len(notes) == 0:
        raise JobError(422, "the MIDI file has no notes")
    return notes


def conditioning(data: bytes, f: Fields, until: float) -> Conditioning:
    """The request's chords, beats and output tempo map (engine/conditioning.py)."""
    try:
        return Conditioning.parse(
            data, f.chords, f.beats, f.bpm, f.beats_per_bar, until, chord_tones=f.chord_tones
        )
    except ConditioningError as e:
        raise JobError(422, str(e)) from e


def prepare(host: gen.Sessions, settings: Settings, kind: Kind, data: bytes, f: Fields) -> gen.Job:
    """Read, parse and plan one request (JobError: what is wrong with it)."""
    if kind == "continue":
        notes = read_notes(host, settings, data)
        cond = conditioning(data, f, float(notes.end.max()) + f.seconds)
        return gen.plan_continue(host, notes, f.seconds, f.sampling, f.parts, f.programs, cond)
    if kind == "infill":
        notes = read_notes(host, settings, data)
        length = float(notes.end.max())
        if f.start >= length:
            raise JobError(
                422, f"start must be before the end of the music ({length:.2f} s), got {f.start}"
            )
        cond = conditioning(data, f, max(length, f.end))
        try:
            return gen.plan_infill(host, notes, f.start, f.end, f.sampling, f.parts, cond)
        except gen.GenerationError as e:
            raise JobError(422, str(e)) from e
    if kind == "accompany":
        assert f.parts  # http.py gives the default
        # the length is checked as the file is read, before any per-note work: cheap first
        limit = settings.max_accompany_seconds
        notes = read_notes(host, settings, data, max_seconds=limit)
        if not (notes.part == host.vocab.lead).any():
            notes = read_notes(host, settings, data, "lead", max_seconds=limit)
            if not (notes.part == host.vocab.lead).any():
                raise JobError(422, "no melody found: the file has only drums")
        cond = conditioning(data, f, float(notes.end.max()) + 1.0)
        return gen.plan_accompany(host, notes, f.sampling, f.parts, f.programs, 1.0, cond)
    raise ValueError(f"unknown job kind {kind!r}")


def notes_json(host: gen.Sessions, notes: Notes, job: gen.Job) -> dict[str, Any]:
    parts = host.vocab.config.parts
    generated = {tuple(n) for n in job.builder.notes}
    return {
        "notes": [
            {
                "start": round(n.start, 4),
                "end": round(n.end, 4),
                "pitch": n.pitch,
                "velocity": n.velocity,
                "part": parts[n.part],
                "program": n.program,
                "generated": tuple(n) in generated,
            }
            for n in notes.to_list()
        ],
        "chords": gen.chords_json(job.chords()),
        "missing_parts": gen.missing_parts(host.vocab, job, notes),
        "generated_seconds": job.outcome()[0],
        "stop_reason": job.outcome()[1],
    }


def answer(host: gen.Sessions, job: gen.Job, notes: Notes, as_json: bool) -> Answer:
    """The finished job as MIDI (or JSON), with the headers that say how it ended."""
    missing = gen.missing_parts(host.vocab, job, notes)
    seconds, why = job.outcome()
    headers = {"X-Improv-Generated-Seconds": f"{seconds:g}", "X-Improv-Stop-Reason": why}
    if missing:
        headers["X-Improv-Missing-Parts"] = ",".join(missing)
    if as_json:
        body = json.dumps(notes_json(host, notes, job)).encode()
        return Answer(body, "application/json", headers)
    buf = io.BytesIO()
    host.tokenizer.notes_to_midi(notes, job.cond.tempo, job.chords()).save(file=buf)
    return Answer(buf.getvalue(), "audio/midi", headers)


# --- where it runs -------------------------------------------------------------------------------
class Jobs(Protocol):
    """Prepared jobs by id: `prepare` then one of `result` / `stream` (or `drop`). A cancelled
    `result` or `stream` stops the generation and forgets the job."""

    async def prepare(self, kind: Kind, data: bytes, fields: Fields) -> int: ...
    async def result(self, jid: int, as_json: bool) -> Answer: ...
    def stream(self, jid: int) -> AsyncIterator[dict[str, Any]]: ...
    def drop(self, jid: int) -> None: ...
    def held(self) -> int: ...  # jobs prepared or running
    def running(self) -> int: ...  # jobs generating (an engine session open)
    def tokens(self) -> float: ...  # sampled for jobs so far
    def close(self) -> None: ...


class LocalJobs:
    """Jobs in this process: the CPU work in `pool`'s threads, the tokens from `host`'s
    scheduler (the server's own, or the worker process's)."""

    def __init__(
        self,
        host: gen.Sessions,
        settings: Settings,
        pool: Executor,
        tokens: Callable[[], float],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.host = host
        self.tokens = tokens  # the host scheduler's count of the jobs' tokens
        self.on_change = on_change  # called when `running()` changes
        self.settings = settings
        self.pool = pool
        self._jobs: dict[int, gen.Job] = {}
        self._running = 0
        self._ids = itertools.count(1)

    async def _off(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def prepare(self, kind: Kind, data: bytes, fields: Fields, jid: int | None = None) -> int:
        """`jid`: the id to file it under (the worker process takes its parent's)."""
        job = await self._off(prepare, self.host, self.settings, kind, data, fields)
        jid = next(self._ids) if jid is None else jid
        self._jobs[jid] = job
        return jid

    def _take(self, jid: int) -> gen.Job:
        job = self._jobs.pop(jid, None)
        if job is None:
            raise JobError(500, f"no prepared job {jid}")
        return job

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        """A job generates inside (counted; `on_change` told); a full scheduler is a 503."""
        self._running += 1
        self.on_change()
        try:
            yield
        except SchedulerFull as e:  # a backstop: the gate bounds the jobs running
            raise JobError(503, f"every generation slot is in use ({e})") from e
        finally:
            self._running -= 1
            self.on_change()

    async def result(self, jid: int, as_json: bool) -> Answer:
        job = self._take(jid)
        with self._generating():
            notes = await gen.execute(self.host, job)
        # encoded off the loop: a song's MIDI file took the loop ~6 ms (mido), its JSON ~3
        return await self._off(answer, self.host, job, notes, as_json)

    async def stream(self, jid: int) -> AsyncIterator[dict[str, Any]]:
        job = self._take(jid)
        with self._generating():
            async for ev in gen.stream_events(self.host, job):
                yield ev

    def drop(self, jid: int) -> None:
        self._jobs.pop(jid, None)

    def held(self) -> int:
        return len(self._jobs) + self._running

    def running(self) -> int:
        return self._running

    def close(self) -> None:
        self._jobs.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
