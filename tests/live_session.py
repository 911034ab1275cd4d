"""A live connection in process (no WebSocket), for the server's live tests."""

from __future__ import annotations

from typing import Any


async def open_in_process(runtime: Any) -> tuple[Any, list]:
    """A live connection driven without a WebSocket (as the MIDI-port bridge does), opened, and
    the list the messages it sends go to."""
    from improv.server.live import LiveConnection

    out: list = []

    async def send(msg: Any) -> None:
        out.append(msg)

    conn = LiveConnection(runtime, send)
    await conn.open()
    return conn, out
