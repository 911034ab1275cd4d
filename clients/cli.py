"""`improv bridge` (a DAW's MIDI <-> a live session) and `improv ports` (list MIDI ports).

Light at import: mido, websockets and the bridge load inside `run`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable

from improv.protocol.args import add_live_arguments, live_start

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # SIGTERM/SIGINT: how long the server gets to end the session
STOP_DEADLINE_S = 12.0  # then the process ends regardless, with its stacks on stderr


# --- improv bridge -----------------------------------------------------------------------------
def add_bridge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the server, e.g. ws://127.0.0.1:8000")
    parser.add_argument("--token", help="the server's token (or IMPROV_TOKEN)")
    ports = parser.add_argument_group("ports (one of)")
    ports.add_argument(
        "--virtual",
        action="store_true",
        help="create ports 'improv bridge in' / 'improv bridge out' for the DAW to connect to",
    )
    ports.add_argument("--in", dest="in_port", metavar="NAME", help="input port (substring)")
    ports.add_argument("--out", dest="out_port", metavar="NAME", help="output port (substring)")
    parser.add_argument(
        "--lookahead-ms",
        type=int,
        default=80,
        help="the server sends events this early; network jitter below it costs nothing "
        "(default 80)",
    )
    add_live_arguments(parser)
    parser.add_argument(
        "--chord-sysex",
        action="store_true",
        help="send the session's chords to the DAW as SysEx text (F0 7D 'impv:' LABEL F7) at "
        "their times",
    )
    parser.add_argument(
        "--chord-markers",
        metavar="FILE.mid",
        help="write the session's chords as MIDI marker events into FILE.mid when the bridge "
        "stops (a DAW imports them as markers)",
    )


def run_bridge(args: argparse.Namespace) -> int:
    import asyncio
    import faulthandler
    import os
    import signal
    import sys

    from improv.midi import MidoBackend, PortError

    from .bridge import Bridge

    try:
        params = live_start(args)
        mode = params.pop("mode")
        bridge = Bridge(
            args.url,
            token=args.token or os.environ.get("IMPROV_TOKEN"),
            mode=mode,
            params=params,
            in_port=args.in_port,
            out_port=args.out_port,
            virtual=args.virtual,
            lookahead_ms=args.lookahead_ms,
            chord_sysex=args.chord_sysex,
            chord_markers=args.chord_markers,
        )
    except ValueError as e:
        logger.error("%s", e)
        return 2
    try:  # before anything else: one line saying what is missing, not rtmidi's traceback
        if isinstance(bridge.backend, MidoBackend):
            bridge.backend.probe()
    except PortError as e:
        logger.error("%s", e)
        return 2

    async def main() -> int:
        loop = asyncio.get_running_loop()
        try:
            bridge.open_ports()
        except PortError as e:
            logger.error("%s", e)
            return 2
        assert bridge.inp is not None and bridge.out is not None
        logger.info("bridge: %r -> %s -> %r", bridge.inp.name, args.url, bridge.out.name)
        run = asyncio.create_task(bridge.run())

        def on_signal() -> None:
            # A stop is bounded: a server that does not answer gets STOP_GRACE_S, then the run
            # is cancelled (its `finally` still silences the output). faulthandler's own thread
            # (no GIL needed) dumps every stack and exits if even that hangs (a MIDI system's
            # close): the log then says where. (Once: a second Ctrl-C moves neither.)
            if not bridge.stopping:
                bridge.request_stop()
                loop.call_later(STOP_GRACE_S, run.cancel)
                faulthandler.dump_traceback_later(STOP_DEADLINE_S, exit=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await run
        except asyncio.CancelledError:
            logger.warning("the server did not end the session in %.0f s; stopped", STOP_GRACE_S)
        finally:
            faulthandler.cancel_dump_traceback_later()
        return 1 if bridge.error else 0

    rc = asyncio.run(main())
    if bridge.ports_stuck:  # the C libraries' teardown at exit would wait on them again
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def bridge_command() -> tuple[str, Callable[[argparse.ArgumentParser], None], Callable]:
    return (
        "bridge a DAW's MIDI ports to a live session on a server",
        add_bridge_arguments,
        run_bridge,
    )


# --- improv ports ------------------------------------------------------------------------------
def add_ports_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print {'inputs': [...], 'outputs': [...]}"
    )


def run_ports(args: argparse.Namespace) -> int:
    from improv.midi import MidoBackend, PortError, list_ports

    backend = MidoBackend()
    try:
        # No rtmidi, no ALSA or JACK: one line saying what is missing and exit 2, as `improv
        # serve --midi-*` and `improv bridge` do (the README promises it for all three); the
        # probe also keeps ALSA's and JACK's own complaints off stderr.
        backend.probe()
        inputs, outputs = list_ports(backend)
    except PortError as e:
        logger.error("%s", e)
        return 2
    except Exception as e:  # the system answered the probe, then failed: still no traceback
        logger.error("cannot list MIDI ports with %s: %s", backend.name, e)
        return 1
    if args.json:
        print(json.dumps({"backend": backend.name, "inputs": inputs, "outputs": outputs}))
        return 0
    print(f"MIDI backend: {backend.name}  (choose with MIDO_BACKEND)")
    for title, names in (("inputs", inputs), ("outputs", outputs)):
        print(f"{title}:")
        for n in names or ["(none)"]:
            print(f"  {n}")
    return 0


def ports_command() -> tuple[str, Callable[[argparse.ArgumentParser], None], Callable]:
    return "list MIDI input and output ports", add_ports_arguments, run_ports
