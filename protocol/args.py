"""Command-line options for a live session's parameters, shared by `improv serve --midi-*` and
`improv bridge`: --mode, --temperature and --param KEY=VALUE (any field of `start`)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """`--param key=value` pairs; values are JSON when they parse (0.8, true, ["bass"]), else
    strings. The server validates them (and says the valid range)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def add_live_arguments(parser: argparse.ArgumentParser | Any, prefix: str = "") -> None:
    """--mode, --temperature, --param: the live session's parameters (a parser or a group)."""
    parser.add_argument(
        f"--{prefix}mode", choices=["respond", "accompany"], default="respond", help="live mode"
    )
    parser.add_argument(f"--{prefix}temperature", type=float, help="sampling temperature")
    parser.add_argument(
        f"--{prefix}param",
        action="append",
        metavar="KEY=VALUE",
        help="any live parameter of docs/protocol.md, e.g. gap_ms=400, drums=true, "
        'parts=["bass"] (repeatable)',
    )


def live_start(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The `start` fields from add_live_arguments' options."""
    g = vars(args)
    params = parse_params(g.get(f"{prefix}param"))
    if g.get(f"{prefix}temperature") is not None:
        params["temperature"] = g[f"{prefix}temperature"]
    return {"mode": g[f"{prefix}mode"], **params}
