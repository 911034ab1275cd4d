"""Command-line options for a live session's parameters, shared by `improv serve --midi-*` and
`improv bridge`: --mode, --temperature, --chords, --chord-source and --param KEY=VALUE (any
field of `start`)."""

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
    """--mode, --temperature, --chords, --chord-source, --param: the live session's parameters
    (a parser or a group)."""
    parser.add_argument(
        f"--{prefix}mode",
        choices=["respond", "accompany"],
        help="live mode (default: respond; accompany with --chords or --chord-source)",
    )
    parser.add_argument(
        f"--{prefix}chords",
        metavar="CHART",
        help="accompany along a chord chart, looped: 'C Am F G' (a chord a bar) or "
        "'| C | Am F |' (chord_source chart)",
    )
    parser.add_argument(
        f"--{prefix}chord-source",
        choices=["chart", "left_hand", "model"],
        help="accompany: where the harmony comes from (default: chart with --chords, else "
        "model); left_hand: the keys below bass_split (default 60) name the chords",
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
    chords, source = g.get(f"{prefix}chords"), g.get(f"{prefix}chord_source")
    if chords is not None:
        params["chords"] = chords
        params.setdefault("chord_source", source or "chart")
    elif source is not None:
        params["chord_source"] = source
    mode = g.get(f"{prefix}mode") or ("accompany" if "chord_source" in params else "respond")
    return {"mode": mode, **params}
