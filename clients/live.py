"""`LiveClient`: a live session over the WebSocket protocol (docs/protocol.md), with asyncio.

    async with LiveClient("ws://127.0.0.1:8000") as live:
        await live.sync_clock()                       # ping/pong: live.offset
        await live.start("respond", temperature=0.9)
        await live.send_midi([0x90, 60, 100]); await live.send_midi([0x80, 60, 0])
        async for msg in live:                        # midi / retract / error / stopped
            if msg.type == "midi": print(msg.time, msg.data, msg.part)

Messages are the protocol's pydantic models (`improv.protocol.messages`, which imports no torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets

from improv.protocol import messages as p

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # the closing handshake's wait (websockets' default 10 s stalls a stop)


class LiveError(RuntimeError):
    """The session could not be started or the server closed the connection."""


def live_url(url: str, token: str | None = None) -> str:
    """ws://HOST:PORT[/v1/live][?token=T] from a ws://, wss://, http:// or https:// URL."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/live"
    query = parts.query
    if token:
        query = "&".join(x for x in (query, urlencode({"token": token})) if x)
    return urlunsplit((scheme, parts.netloc, path, query, ""))


def local_ms() -> float:
    """The local clock the offsets refer to (monotonic, ms)."""
    return time.perf_counter() * 1000.0


class LiveClient:
    """One live session. `offset`: server session time minus local time (ms), from ping/pong;
    `server_now()` is the session clock as seen here."""

    def __init__(self, url: str, token: str | None = None, open_timeout: float = 5.0) -> None:
        self.url = live_url(url)  # the token goes in a header: URLs end up in logs
        self.token = token
        self.open_timeout = open_timeout
        self.offset: float | None = None
        self.rtt_ms: float | None = None
        self.started: p.Started | None = None
        self.stopped: p.Stopped | None = None
        self.close_code: int | None = None
        self.close_reason: str = ""
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pongs: dict[float, asyncio.Future[tuple[float, float]]] = {}
        self._started_fut: asyncio.Future[p.Started] | None = None
        self._samples: list[tuple[float, float]] = []  # (rtt, offset)

    # --- connection -----------------------------------------------------------------------------
    async def connect(self) -> LiveClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await websockets.connect(
            self.url,
            additional_headers=headers,
            open_timeout=self.open_timeout,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=2**20,
            ping_interval=20,
        )
        self._reader = asyncio.create_task(self._read(), name="live-client-read")
        return self

    async def __aenter__(self) -> LiveClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def close(self) -> None:
        """Close the socket (the server then ends the session with its note-offs)."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 2.0)

    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                try:
                    msg = p.server_adapter.validate_json(frame)
                except ValueError:
                    logger.warning("unexpected frame from server: %.200s", frame)
                    continue
                if msg.type == "pong":
                    fut = self._pongs.pop(msg.time, None)
                    if fut is not None and not fut.done():
                        fut.set_result((msg.server_time, local_ms()))
                    continue
                if msg.type == "started":
                    self.started = msg
                    if self._started_fut is not None and not self._started_fut.done():
                        self._started_fut.set_result(msg)
                elif msg.type == "stopped":
                    self.stopped = msg
                elif msg.type == "error" and self._started_fut and not self._started_fut.done():
                    self._started_fut.set_exception(LiveError(f"{msg.code}: {msg.message}"))
                self._queue.put_nowait(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            ws = self._ws
            self.close_code = getattr(ws, "close_code", None)
            self.close_reason = getattr(ws, "close_reason", "") or ""
            err = LiveError(f"connection closed ({self.close_code} {self.close_reason})".strip())
            for fut in [*self._pongs.values(), self._started_fut]:
                if fut is not None and not fut.done():
                    fut.set_exception(err)
            self._pongs.clear()
            self._queue.put_nowait(None)  # ends iteration

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws is None:
            raise LiveError("not connected")
        await self._ws.send(json.dumps(message))

    # --- session --------------------------------------------------------------------------------
    async def start(self, mode: str = "respond", timeout: float = 10.0, **params: Any) -> p.Started:
        """Start (or restart in another mode) and wait for `started` (LiveError on an error)."""
        self._started_fut = asyncio.get_running_loop().create_future()
        await self.send({"type": "start", "mode": mode, **params})
        return await asyncio.wait_for(self._started_fut, timeout)

    async def params(self, **changes: Any) -> None:
        """Change parameters while running (e.g. tempo_bpm=96, temperature=0.8)."""
        await self.send({"type": "params", **changes})

    async def send_midi(self, data: list[int] | bytes, time_ms: float | None = None) -> None:
        """A player event; `time_ms` on the session clock (None: stamped on arrival)."""
        msg: dict[str, Any] = {"type": "midi", "data": list(data)}
        if time_ms is not None:
            msg["time"] = max(0.0, time_ms)
        await self.send(msg)

    async def trigger(self) -> None:
        await self.send({"type": "trigger"})

    async def stop(self, timeout: float = 5.0) -> p.Stopped | None:
        """Send `stop` and wait for the socket to close; every generated message (the final
        note-offs included) stays queued for iteration. Returns `stopped`."""
        with contextlib.suppress(Exception):
            await self.send({"type": "stop"})
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.stopped

    # --- clock ----------------------------------------------------------------------------------
    async def ping(self, timeout: float = 2.0) -> tuple[float, float]:
        """One ping: (rtt ms, offset ms) with offset = server_time - (t_send + t_recv) / 2."""
        t0 = local_ms()
        fut: asyncio.Future[tuple[float, float]] = asyncio.get_running_loop().create_future()
        self._pongs[t0] = fut
        await self.send({"type": "ping", "time": t0})
        server_time, t1 = await asyncio.wait_for(fut, timeout)
        sample = (t1 - t0, server_time - (t0 + t1) / 2.0)
        # The offset from the fastest recent round trips: a slow one has an uncertain middle.
        self._samples = (self._samples + [sample])[-16:]
        best = sorted(self._samples)[: max(1, len(self._samples) // 4)]
        self.rtt_ms = sample[0]
        self.offset = sum(o for _, o in best) / len(best)
        return sample

    async def sync_clock(self, n: int = 5) -> float:
        """A few pings; returns the offset (server session ms - local ms)."""
        for _ in range(n):
            await self.ping()
        assert self.offset is not None
        return self.offset

    def server_now(self) -> float:
        """The session clock now, as estimated here."""
        if self.offset is None:
            raise LiveError("no clock offset yet: call sync_clock() first")
        return local_ms() + self.offset

    def to_local(self, session_ms: float) -> float:
        assert self.offset is not None
        return session_ms - self.offset

    # --- receiving ------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[Any]:
        return self.events()

    async def events(self) -> AsyncIterator[Any]:
        """Server messages (started, midi, retract, error, stopped) until the socket closes."""
        while True:
            msg = await self._queue.get()
            if msg is None:
                self._queue.put_nowait(None)  # later iterators end too
                return
            yield msg

    async def next(self, timeout: float | None = None) -> Any:
        """The next message (None once closed)."""
        msg = await asyncio.wait_for(self._queue.get(), timeout)
        if msg is None:
            self._queue.put_nowait(None)
        return msg
