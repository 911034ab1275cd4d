"""`improv serve`: the HTTP + WebSocket server (uvicorn underneath)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from improv.protocol.args import add_live_arguments, live_start

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults come from Settings (and IMPROV_* environment variables): None = not given here.
    parser.add_argument("--host", help="bind address (default 127.0.0.1; others need --token)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--checkpoint", help="checkpoint folder (default models/default)")
    parser.add_argument("--device", help="auto | cpu | cuda[:N] (default auto)")
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx", "onnx-int8"],
        help="decode backend (default auto: onnx-int8 on the CPU, torch on CUDA)",
    )
    parser.add_argument("--max-sessions", type=int, help="live sessions at once (default 32)")
    parser.add_argument(
        "--decode-workers",
        type=int,
        help="scheduler threads decoding at once (default: one per core, but one on more than 2 "
        "cores; >= 8 sessions each)",
    )
    parser.add_argument(
        "--max-generations",
        type=int,
        help="HTTP generations at once (default 4); more wait in a queue (--generation-queue, "
        "default 16, at most --generation-wait seconds, default 30), beyond it 503 + Retry-After",
    )
    parser.add_argument(
        "--http-worker",
        choices=["process", "thread"],
        help="where HTTP generations run: a worker process of their own, at a lower CPU "
        "priority (default: live sessions never wait behind them), or the live decode threads",
    )
    parser.add_argument(
        "--live-worker",
        choices=["process", "thread"],
        help="where live sessions decode: a worker process of their own (default: the server's "
        "event loop never waits for their Python), or decode threads in the server's process",
    )
    parser.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        default=None,
        help="keep the event loop and the send clock at normal priority (default: real-time "
        "priority where the OS allows it, so live sends go out on time on a busy machine)",
    )
    parser.add_argument(
        "--generation-queue", type=int, help="requests that may wait for a generation (16)"
    )
    parser.add_argument(
        "--generation-wait", type=float, help="seconds a request may wait for one (30)"
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        help="tokens of context a session keeps (default: the model's, 2048 for the default "
        "model); fewer serve more sessions in real time, each hearing less of the past",
    )
    parser.add_argument(
        "--token",
        help="require this token (Authorization: Bearer; for ws also a subprotocol or ?token=)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    add_midi_arguments(parser)


def add_midi_arguments(parser: argparse.ArgumentParser) -> None:
    """The --midi-* options of `improv serve` (and --mode / --temperature / --param for the
    session on those ports)."""
    g = parser.add_argument_group("MIDI ports (a live session on this machine's ports)")
    g.add_argument("--midi-in", metavar="NAME", help="input port to play from (substring)")
    g.add_argument("--midi-out", metavar="NAME", help="output port for the model (substring)")
    g.add_argument(
        "--midi-virtual",
        action="store_true",
        help="create ports 'improv in' / 'improv out' for other software to connect to",
    )
    add_live_arguments(g)


def setup_midi(app: Any, args: argparse.Namespace) -> int | None:
    """Attach a port session when --midi-* was given; an exit code if the ports are wrong."""
    if not (getattr(args, "midi_in", None) or getattr(args, "midi_out", None)) and not getattr(
        args, "midi_virtual", False
    ):
        return None
    from improv.midi import MidoBackend, PortError

    from .port_session import MidiConfig, attach_midi, check_ports

    try:
        config = MidiConfig(args.midi_in, args.midi_out, args.midi_virtual, live_start(args))
        MidoBackend().probe()  # no MIDI system: one line (MidiUnavailable), before the model
        check_ports(config)
    except (PortError, ValueError) as e:
        logger.error("%s", e)
        return 2
    except Exception as e:  # no rtmidi / no ALSA or JACK on this machine
        logger.error("MIDI is unavailable here (%s): %s", MidoBackend().name, e)
        return 2
    attach_midi(app, config)
    return None


def settings_from_args(args: argparse.Namespace) -> Any:
    from .settings import Settings

    given = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "checkpoint": args.checkpoint,
            "device": args.device,
            "backend": args.backend,
            "max_sessions": args.max_sessions,
            "decode_workers": getattr(args, "decode_workers", None),
            "context_tokens": args.context_tokens,
            "token": args.token,
            "threads": args.threads,
            "http_sessions": getattr(args, "max_generations", None),
            "http_worker": getattr(args, "http_worker", None),
            "live_worker": getattr(args, "live_worker", None),
            "realtime": getattr(args, "realtime", None),
            "generation_queue": getattr(args, "generation_queue", None),
            "generation_wait_s": getattr(args, "generation_wait", None),
        }.items()
        if v is not None
    }
    return Settings(**given)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn
    from pydantic import ValidationError

    from improv.engine.checkpoint import resolve_checkpoint

    from .app import create_app
    from .settings import is_loopback

    try:
        settings = settings_from_args(args)
        settings.check_bind()
        if settings.token is None and not is_loopback(settings.host):
            logger.warning(
                "serving %s without a token (IMPROV_ALLOW_OPEN): anyone who reaches the port can "
                "use the server; set IMPROV_TOKEN when it is published beyond this machine",
                settings.host,
            )
    except ValidationError as e:  # one line per bad setting, not pydantic's block
        for err in e.errors():
            logger.error("--%s: %s", "-".join(str(x) for x in err["loc"]), err["msg"])
        return 2
    except ValueError as e:
        logger.error("%s", e)
        return 2
    # The bundled model from any directory (models/default is the repo's path to it).
    settings.checkpoint = str(resolve_checkpoint(settings.checkpoint))
    if not (Path(settings.checkpoint) / "config.json").is_file():
        logger.error(
            "no checkpoint at %s (expected config.json + model.safetensors); train one "
            "(improv train) or pass --checkpoint",
            settings.checkpoint,
        )
        return 2
    app = create_app(settings)
    if (code := setup_midi(app, args)) is not None:  # --midi-*: a live session on MIDI ports
        return code
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_ping_interval=20,
    )
    graceful_server(config).run()
    return 0


def graceful_server(config: Any) -> Any:
    """A uvicorn.Server whose shutdown (SIGTERM, SIGINT) first stops listening, then ends every
    live session (note-offs and `stopped` sent), then lets uvicorn close the rest: stopping the
    server never leaves a note sounding, and behind a balancer new sessions go to another
    replica at once (its health check and connections are refused here; docs/deploy.md)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:  # no new connections (uvicorn closes them again: fine)
                server.close()
            rt = getattr(config.app.state, "runtime", None)
            if rt is not None:
                await rt.close_connections("shutdown")
            await super().shutdown(sockets)

    return GracefulServer(config)


def serve_command() -> tuple[str, Callable[[argparse.ArgumentParser], None], Callable]:
    return "run the HTTP + WebSocket server", add_arguments, run
