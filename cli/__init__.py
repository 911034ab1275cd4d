"""The `improv` command: one entry point, one subcommand per task.

Each subcommand lives in the package that owns it and registers itself here through
`COMMANDS`: a name, a one-line help, a function that adds its arguments to a parser, and
a function that runs it. Heavy imports (torch, the server) happen inside the run functions,
so `improv --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

# name -> "module:function" that returns (help, add_arguments, run)
COMMANDS: dict[str, str] = {
    "tokenize": "improv.engine.tokenizer.dataset:command",
    "render": "improv.cli.render:command",
    "generate": "improv.cli.generate:generate_command",
    "infill": "improv.cli.generate:infill_command",
    "accompany": "improv.cli.generate:accompany_command",
    "train": "improv.trainer.cli:train_command",
    "eval": "improv.trainer.cli:eval_command",
    "export-onnx": "improv.engine.cli:export_onnx_command",
    "serve": "improv.server.cli:serve_command",
    "bridge": "improv.clients.cli:bridge_command",
    "ports": "improv.clients.cli:ports_command",
}


def _load(spec: str) -> tuple[str, Callable[[argparse.ArgumentParser], None], Callable]:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)()


def _unavailable(name: str, error: ImportError) -> tuple[str, Callable, Callable]:
    def run(_: argparse.Namespace) -> int:
        raise SystemExit(f"improv {name}: unavailable here ({error})")

    return f"(unavailable: {error})", lambda p: None, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="improv", description="Realtime MIDI improvisation server and tools."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        try:
            help_, add_arguments, run = _load(spec)
        except ImportError as e:  # one broken optional dependency must not take the others down
            help_, add_arguments, run = _unavailable(name, e)
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    result = args._run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
