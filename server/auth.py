"""The server's token: how a client sends it, how it is compared, and keeping it out of the logs.

HTTP: `Authorization: Bearer TOKEN`. WebSocket `/v1/live`: the same header (scripts, the bridge),
the subprotocol `improv.bearer.<base64url(TOKEN)>` offered next to `improv` (browsers can set no
header: `new WebSocket(url, ["improv", "improv.bearer." + b64url(token)])`), or `?token=TOKEN`
(kept for old clients; uvicorn's log lines show it as `token=***`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
from collections.abc import Mapping, Sequence

SUBPROTOCOL = "improv"  # the protocol a client offers (and the server answers) with a token one
BEARER_PREFIX = "improv.bearer."

_TOKEN_IN_URL = re.compile(r"((?:^|[?&])token=)[^&\s\"]*")


def token_ok(want: str | None, given: bytes | None) -> bool:
    """`given` (the raw bytes the client sent) is the configured token (or none is needed).
    Compared as bytes: a non-ASCII str would make hmac refuse to compare (a 500)."""
    if want is None:
        return True
    return given is not None and hmac.compare_digest(given, want.encode("utf-8"))


def bearer(authorization: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` header. ASGI servers decode header bytes
    as latin-1: encoding back gives the bytes sent."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    return authorization[7:].strip().encode("latin-1", "replace")


def from_subprotocols(offered: Sequence[str]) -> bytes | None:
    """The token of an `improv.bearer.<base64url>` subprotocol (None if none or not base64)."""
    for proto in offered:
        if proto.startswith(BEARER_PREFIX):
            raw = proto[len(BEARER_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            except (binascii.Error, ValueError):
                return b""
    return None


def answer_subprotocol(offered: Sequence[str]) -> str | None:
    """The subprotocol to accept with: browsers fail a handshake that answers none of those
    they offered. `improv` when offered; else a lone bearer one is echoed."""
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return next((x for x in offered if x.startswith(BEARER_PREFIX)), None)


def websocket_token(headers: Mapping[str, str], query: Mapping[str, str]) -> bytes | None:
    """The token a WebSocket client sent: header, subprotocol or query (first found)."""
    if (tok := bearer(headers.get("authorization"))) is not None:
        return tok
    offered = [x.strip() for x in headers.get("sec-websocket-protocol", "").split(",") if x]
    if (tok := from_subprotocols(offered)) is not None:
        return tok
    q = query.get("token")
    return None if q is None else q.encode("utf-8")


def redact(text: str) -> str:
    """`token=SECRET` in a URL -> `token=***`."""
    return _TOKEN_IN_URL.sub(r"\1***", text)


class RedactTokens(logging.Filter):
    """Rewrites `token=...` in a record's arguments (uvicorn logs the path with its query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(a, str) and "token=" in a for a in record.args
        ):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = redact(record.msg)
        return True


_FILTER = RedactTokens()


def redact_server_logs() -> None:
    """Install the filter on uvicorn's loggers (idempotent): the access log and the WebSocket
    `[accepted]` lines carry the request's query."""
    for name in ("uvicorn.access", "uvicorn.error"):
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)
