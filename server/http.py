"""HTTP routers: health, model info, offline generation (continue / infill / accompany) and the
`/v1/live` WebSocket (a thin adapter around `LiveConnection`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    Header,
    HTTPException,
    Request,
    UploadFile,
    WebSocket,
)
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.websockets import WebSocketDisconnect, WebSocketState

from improv.engine.live import SamplingParams
from improv.protocol import messages as p

from . import auth
from .admission import Busy, GenerationGate, Lease, release_intake
from .gm import GM_PROGRAMS
from .jobs import Fields, JobError, Kind
from .live import LiveConnection
from .runtime import Runtime, SessionLimit
from .settings import Settings

logger = logging.getLogger(__name__)

PARTS = ("lead", "counter", "harmony", "bass", "drums")
PartName = Literal["lead", "counter", "harmony", "bass", "drums"]


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _token_ok(settings: Settings, given: bytes | None) -> bool:
    want = settings.token
    return auth.token_ok(None if want is None else want.get_secret_value(), given)


def require_token(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    if not _token_ok(request.app.state.settings, auth.bearer(authorization)):
        raise HTTPException(
            401,
            "missing or wrong token: send Authorization: Bearer TOKEN",
            {"WWW-Authenticate": "Bearer"},
        )


def get_gate(request: Request) -> GenerationGate:
    """The generation slots and their queue (sized by the runtime's settings: it owns the
    engine's HTTP slots), made on first use."""
    st = request.app.state
    if getattr(st, "generations", None) is None:
        s = st.runtime.settings
        st.generations = GenerationGate(s.http_sessions, s.generation_queue, s.generation_wait_s)
    return st.generations


GateDep = Annotated[GenerationGate, Depends(get_gate)]


class Error(BaseModel):
    """Every error answer: `detail` says what is wrong (and the valid range)."""

    detail: str
    errors: list[dict[str, Any]] | None = None  # 422 from form validation: pydantic's list


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": Error, "description": description}
    if headers:
        out["headers"] = headers
    return out


# Documented on every /v1 operation (schemathesis checks the answers against them).
ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("missing or wrong token (Authorization: Bearer TOKEN)"),
}
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("the body is not valid multipart/form-data"),
    413: _error("the file is larger than the upload limit"),
    422: _error("a field or the file is invalid; detail names it and the valid range"),
    503: _error(
        "every generation slot is taken and the queue is full (or the wait ran out)",
        {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    ),
}

public = APIRouter()
api = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=ERRORS)
ws_router = APIRouter()


# --- info -----------------------------------------------------------------------------------------
@public.get("/health")
def health(rt: RuntimeDep) -> dict[str, Any]:
    return {"status": "ok", "live_sessions": rt.sessions_open(), "max_sessions": rt.max_sessions}


@api.get("/model")
def model_info(rt: RuntimeDep) -> dict[str, Any]:
    s = rt.settings
    return {
        "checkpoint": s.checkpoint,
        "backend": rt.engine.backend,
        "device": str(rt.engine.device),
        "config": rt.engine.config.to_dict(),
        "training": rt.engine.meta.get("training", rt.engine.meta),
        "tokenizer": {"tick_ms": rt.vocab.config.tick_ms, "vocab_size": rt.vocab.size},
        "parts": list(rt.vocab.config.parts),
        "instruments": {str(i): name for i, name in enumerate(GM_PROGRAMS)},
        "capabilities": {
            "http": ["continue", "infill", "accompany"],
            "live_modes": ["respond", "accompany"],
            "outputs": ["audio/midi", "application/json", "application/x-ndjson (stream=true)"],
        },
        "limits": {
            "max_sessions": rt.max_sessions,
            "live_sessions_open": rt.sessions_open(),
            "http_sessions": s.http_sessions,
            "max_upload_bytes": s.max_upload_bytes,
            "max_upload_notes": s.max_upload_notes,
            "max_generations": s.http_sessions,
            "generation_queue": s.generation_queue,
            "generation_wait_s": s.generation_wait_s,
            "max_generate_seconds": s.max_generate_seconds,
            "max_infill_seconds": s.max_infill_seconds,
            "max_accompany_seconds": s.max_accompany_seconds,
            "context_tokens": rt.scheduler.max_len,
            "max_lookahead_ms": p.MAX_LOOKAHEAD_MS,
        },
    }


# --- shared input handling ------------------------------------------------------------------------
async def read_upload(rt: Runtime, file: UploadFile) -> bytes:
    limit = rt.settings.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"file too large: more than {limit} bytes (limit {limit})")
    if not data:
        raise HTTPException(422, "file is empty: send a MIDI file (.mid) in the field 'file'")
    return data


async def prepare(request: Request, rt: Runtime, kind: Kind, data: bytes, fields: Fields) -> int:
    """Read, parse and plan the request off this loop (server/jobs.py: in the generation
    worker process by default), a few requests at once (admission.IntakeLimit)."""
    try:
        return await rt.jobs.prepare(kind, data, fields)
    except JobError as e:
        raise HTTPException(e.status, e.detail) from e
    finally:
        release_intake(request.scope)


def sampling(temperature: float, top_p: float, seed: int | None) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed)


def parse_parts(value: str | None, field: str) -> list[str] | None:
    """A comma-separated list of part names (form fields are flat)."""
    if value is None or not value.strip():
        return None
    parts = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        raise HTTPException(
            422, f"{field}: unknown part {bad[0]!r}; choose from {', '.join(PARTS)}"
        )
    return parts


def parse_programs(value: str | None) -> dict[str, int] | None:
    """`bass=33,harmony=0`: a GM program per part."""
    if value is None or not value.strip():
        return None
    out: dict[str, int] = {}
    for item in value.split(","):
        name, _, prog = item.partition("=")
        name = name.strip()
        if name not in PARTS or not prog.strip().isdigit() or not 0 <= int(prog) <= 127:
            raise HTTPException(
                422,
                f"programs: expected part=program pairs like 'bass=33' (program 0..127), got {item!r}",
            )
        out[name] = int(prog)
    return out


def wants_json(accept: str | None) -> bool:
    return accept is not None and "application/json" in accept and "audio/midi" not in accept


T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection: its work was stopped."""


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the form is read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (its engine session closed, its slot freed) if the client goes away
    first: an abandoned request must not hold a generation slot."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone()
    finally:
        watch.cancel()
        task.cancel()


def _busy(e: Busy) -> HTTPException:
    return HTTPException(503, str(e), {"Retry-After": str(e.retry_after)})


async def respond(
    request: Request,
    rt: Runtime,
    gate: GenerationGate,
    jid: int,
    accept: str | None,
    stream: bool,
    filename: str,
) -> Response:
    """Wait for a generation slot (503 + Retry-After past the queue), run the job unless the
    client goes away, answer MIDI, JSON or an NDJSON stream."""
    try:
        try:
            lease = await unless_gone(request, gate.acquire())
        except Busy as e:
            raise _busy(e) from e
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
    except BaseException:
        rt.jobs.drop(jid)
        raise
    if stream:
        return _stream(rt, jid, lease)
    try:
        answer = await unless_gone(request, rt.jobs.result(jid, wants_json(accept)))
    except ClientGone:
        logger.info("%s: the client went away; its generation was stopped", request.url.path)
        return Response(status_code=499)
    except SessionLimit as e:  # the engine's own slots (a backstop behind the gate)
        raise HTTPException(503, str(e), {"Retry-After": str(gate.retry_after())}) from e
    except JobError as e:
        headers = {"Retry-After": str(gate.retry_after())} if e.status == 503 else None
        raise HTTPException(e.status, e.detail, headers) from e
    finally:
        lease.release()
        rt.jobs.drop(jid)
    headers = dict(answer.headers)
    if answer.media_type == "audio/midi":
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return Response(answer.body, media_type=answer.media_type, headers=headers)


def _stream(rt: Runtime, jid: int, lease: Lease) -> StreamingResponse:
    """NDJSON events as they come; the slot is released when the stream ends, is cancelled
    (the client went away: Starlette cancels it) or never starts."""

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for ev in rt.jobs.stream(jid):
                yield (json.dumps(ev) + "\n").encode()
        except JobError as e:  # the status line is sent: the stream says it last
            yield (
                json.dumps({"type": "error", "status": e.status, "detail": e.detail}) + "\n"
            ).encode()
        finally:
            lease.release()
            rt.jobs.drop(jid)

    def never_started() -> None:
        lease.release()
        rt.jobs.drop(jid)

    return StreamingResponse(
        lines(), media_type="application/x-ndjson", background=BackgroundTask(never_started)
    )


Temperature = Annotated[float, Form(ge=0.0, le=2.0, description="0 = greedy")]
TopP = Annotated[float, Form(gt=0.0, le=1.0)]
Seed = Annotated[int | None, Form(ge=0, le=2**62)]
Accept = Annotated[str | None, Header()]
Stream = Annotated[bool, Form(description="newline-delimited JSON events as they are generated")]
Chords = Annotated[
    str | None,
    Form(
        description="chord-lab lines 'start end label' (s, Harte: C:maj, A:min7, N), or a chart "
        "laid on the beats: 'C Am F G' (a chord a bar) or '| C | Am F |'; none: the model plans "
        "its own (returned as markers / JSON chords)"
    ),
]
Beats = Annotated[
    str | None,
    Form(description="lines 'seconds [1 if downbeat]'; overrides the file's tempo map"),
]
Bpm = Annotated[
    float | None,
    Form(ge=20, le=400, description="steady beats from the file's time 0 (and the output tempo)"),
]
BeatsPerBar = Annotated[int | None, Form(ge=1, le=16, description="with bpm or beats; default 4")]
ChordTonesField = Annotated[
    bool | None,
    Form(
        description="harmony and bass keep to the chord's tones, and an accompaniment without "
        "chords changes to chords that fit the melody (default: true where chords are given and "
        "in accompaniment); false lets the model alone choose"
    ),
]


# --- generation -----------------------------------------------------------------------------------
# The generation endpoints answer a MIDI file, JSON notes or an NDJSON stream (by Accept/stream).
MIDI_RESPONSES: dict[int | str, dict] = {
    200: {
        "content": {"audio/midi": {}, "application/json": {}, "application/x-ndjson": {}},
        "headers": {
            "X-Improv-Generated-Seconds": {
                "description": "seconds generated (as asked, unless X-Improv-Stop-Reason says)",
                "schema": {"type": "number"},
            },
            "X-Improv-Stop-Reason": {
                "description": "complete, or why less was generated than asked",
                "schema": {"type": "string"},
            },
        },
    },
    **GENERATION_ERRORS,
}


@api.post(
    "/continue",
    response_class=Response,
    responses=MIDI_RESPONSES,
)
async def continue_(
    request: Request,
    rt: RuntimeDep,
    gate: GateDep,
    file: Annotated[UploadFile, File(description="a MIDI file: the prompt")],
    seconds: Annotated[float, Form(gt=0.0, description="length of the continuation")] = 8.0,
    temperature: Temperature = 1.0,
    top_p: TopP = 0.95,
    seed: Seed = None,
    parts: Annotated[
        str | None, Form(description="comma-separated parts the model may play")
    ] = None,
    programs: Annotated[str | None, Form(description="GM programs, e.g. 'lead=73,bass=33'")] = None,
    chords: Chords = None,
    beats: Beats = None,
    bpm: Bpm = None,
    beats_per_bar: BeatsPerBar = None,
    chord_tones: ChordTonesField = None,
    stream: Stream = False,
    accept: Accept = None,
) -> Response:
    """The prompt followed by the continuation."""
    if seconds > rt.settings.max_generate_seconds:
        raise HTTPException(
            422, f"seconds must be in (0, {rt.settings.max_generate_seconds}], got {seconds}"
        )
    chosen, progs = parse_parts(parts, "parts"), parse_programs(programs)  # cheap checks first
    data = await read_upload(rt, file)
    fields = Fields(
        sampling(temperature, top_p, seed), chosen, progs, chords=chords, beats=beats, bpm=bpm,
        beats_per_bar=beats_per_bar, chord_tones=chord_tones, seconds=seconds,
    )  # fmt: skip
    jid = await prepare(request, rt, "continue", data, fields)
    return await respond(request, rt, gate, jid, accept, stream, "continued.mid")


@api.post(
    "/infill",
    response_class=Response,
    responses=MIDI_RESPONSES,
)
async def infill(
    request: Request,
    rt: RuntimeDep,
    gate: GateDep,
    file: Annotated[UploadFile, File(description="a MIDI file")],
    start: Annotated[float, Form(ge=0.0, description="gap start, seconds")],
    end: Annotated[float, Form(gt=0.0, description="gap end, seconds")],
    parts: Annotated[
        str | None, Form(description="comma-separated parts to regenerate (default all)")
    ] = None,
    temperature: Temperature = 1.0,
    top_p: TopP = 0.95,
    seed: Seed = None,
    chords: Chords = None,
    beats: Beats = None,
    bpm: Bpm = None,
    beats_per_bar: BeatsPerBar = None,
    chord_tones: ChordTonesField = None,
    stream: Stream = False,
    accept: Accept = None,
) -> Response:
    """The file with [start, end) regenerated; every note outside the span is unchanged."""
    lim = rt.settings.max_infill_seconds
    if not end > start:
        raise HTTPException(422, f"end must be after start, got start={start} end={end}")
    if end - start > lim:
        raise HTTPException(422, f"the gap must be at most {lim} s long, got {end - start:.3f}")
    chosen = parse_parts(parts, "parts")
    data = await read_upload(rt, file)
    fields = Fields(
        sampling(temperature, top_p, seed), chosen, chords=chords, beats=beats, bpm=bpm,
        beats_per_bar=beats_per_bar, chord_tones=chord_tones, start=start, end=end,
    )  # fmt: skip
    jid = await prepare(request, rt, "infill", data, fields)
    return await respond(request, rt, gate, jid, accept, stream, "infilled.mid")


@api.post(
    "/accompany",
    response_class=Response,
    responses=MIDI_RESPONSES,
)
async def accompany(
    request: Request,
    rt: RuntimeDep,
    gate: GateDep,
    file: Annotated[UploadFile, File(description="a melody (or any lead part) as MIDI")],
    parts: Annotated[
        str | None, Form(description="accompaniment parts (default harmony; drums=true adds drums)")
    ] = None,
    drums: Annotated[bool, Form(description="add drums (when parts is not given)")] = False,
    programs: Annotated[
        str | None, Form(description="GM programs, e.g. 'bass=33,harmony=0'")
    ] = None,
    temperature: Temperature = 1.0,
    top_p: TopP = 0.95,
    seed: Seed = None,
    chords: Chords = None,
    beats: Beats = None,
    bpm: Bpm = None,
    beats_per_bar: BeatsPerBar = None,
    chord_tones: ChordTonesField = None,
    stream: Stream = False,
    accept: Accept = None,
) -> Response:
    """The melody plus generated accompaniment (the melody forced at its times).

    The lead is the file's lead part (a track named melody/lead/vocal..., or its only pitched
    track); if none is found, every pitched track is taken as the lead. The file's other parts
    that are not generated (a bass line, say) are kept, and the model plays along with them."""
    chosen = parse_parts(parts, "parts") or (p.ACCOMPANY_PARTS + (["drums"] if drums else []))
    if "lead" in chosen:
        raise HTTPException(
            422, "parts: the lead is given; choose from counter, harmony, bass, drums"
        )
    progs = parse_programs(programs)
    data = await read_upload(rt, file)
    fields = Fields(
        sampling(temperature, top_p, seed), chosen, progs, chords=chords, beats=beats, bpm=bpm,
        beats_per_bar=beats_per_bar, chord_tones=chord_tones,
    )  # fmt: skip
    jid = await prepare(request, rt, "accompany", data, fields)
    return await respond(request, rt, gate, jid, accept, stream, "accompanied.mid")


# --- live -----------------------------------------------------------------------------------------
@ws_router.websocket("/v1/live")
async def live(ws: WebSocket) -> None:
    """A live session: JSON text frames (docs/protocol.md)."""
    rt: Runtime = ws.app.state.runtime
    offered = list(ws.scope.get("subprotocols") or [])
    await ws.accept(subprotocol=auth.answer_subprotocol(offered))
    if not _token_ok(ws.app.state.settings, auth.websocket_token(ws.headers, ws.query_params)):
        await ws.close(
            code=p.CLOSE_POLICY,
            reason="missing or wrong token: Authorization: Bearer, subprotocol improv.bearer.* "
            "or ?token=",
        )
        return

    async def send(msg: Any) -> None:
        await ws.send_text(msg.model_dump_json(exclude_none=msg.type != "started"))

    conn = LiveConnection(rt, send)
    try:
        await conn.open()
    except SessionLimit as e:
        await ws.close(code=p.CLOSE_TRY_LATER, reason=str(e)[:120])
        return
    reader = asyncio.create_task(_read(ws, conn))
    closed = asyncio.create_task(conn.wait_closed())
    try:
        await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        reader.cancel()
        closed.cancel()
        if not conn.closed:
            # the reader ends on the peer's close; one that failed leaves the peer connected:
            # it gets its note-offs and `stopped`
            failed = reader.done() and not reader.cancelled() and reader.exception() is not None
            peer_gone = ws.client_state != WebSocketState.CONNECTED or (
                reader.done() and not failed
            )
            if failed:
                logger.error("session %s: reader failed", conn.id, exc_info=reader.exception())
            await conn.close("disconnect" if peer_gone else "error")
    code = {"stop": p.CLOSE_NORMAL, "shutdown": p.CLOSE_GOING_AWAY}.get(
        conn.close_reason or "", 1011
    )
    if ws.client_state == WebSocketState.CONNECTED and conn.close_reason != "disconnect":
        try:
            await ws.close(code=code)
        except RuntimeError:  # closed meanwhile
            pass


async def _read(ws: WebSocket, conn: LiveConnection) -> None:
    try:
        while not conn.closed:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                conn.error("bad_message", "binary frames are not used: send JSON text frames")
                continue
            await conn.handle(text)
    except WebSocketDisconnect:
        return
