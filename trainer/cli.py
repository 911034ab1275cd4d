"""`improv train` and `improv eval`. Light at import: torch is imported inside the run functions.

improv train --data data/train --valid data/valid --preset small --out runs/NAME
improv train --nproc-per-node 2 ...          # the same, through torch.distributed.run (DDP)
torchrun --nproc-per-node 2 -m improv.cli train ...   # equivalent, started by torchrun
improv eval runs/NAME/final --data data/valid --json
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

_LAUNCH_ONLY = {"nproc_per_node"}  # options the launcher consumes, not passed to the workers


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, help="training dataset folder, or a MIDI folder")
    g.add_argument("--valid", help="validation dataset folder, or a MIDI folder")
    g.add_argument("--out", required=True, help="run folder (checkpoints, metrics, plot)")
    g.add_argument("--preset", default="small", help="model size preset (default small)")
    g.add_argument(
        "--init", help="fine-tune this checkpoint (keeps its tokenizer and model config)"
    )
    g.add_argument(
        "--mix",
        default="continue=0.5,infill=0.25,accompany=0.25",
        help="objective weights, NAME=W,... with NAME in continue, infill, accompany",
    )
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation")
    g.add_argument(
        "--solo",
        type=float,
        default=0.0,
        help="share of continuation windows cut to one part alone, e.g. a melody (default 0)",
    )
    g.add_argument(
        "--solo-parts",
        default="",
        help="comma-separated parts a solo window may keep, e.g. 'lead' (default: any part)",
    )
    g.add_argument(
        "--swap",
        type=float,
        default=0.0,
        help="share of accompaniment examples whose accompaniment plays another stretch's notes "
        "for 2-8 s, without loss there (default 0)",
    )
    g.add_argument(
        "--drop-bass",
        type=float,
        default=0.0,
        help="share of windows (every objective) without their bass part, e.g. with a bass from "
        "`prepare --chord-bass` (default 0)",
    )
    for flag, default, what in (
        ("--strip-chords", 0.25, "windows without their chord marks"),
        ("--strip-beats", 0.25, "windows without their beat marks"),
        ("--strip-header", 0.3, "examples without an instrumentation header"),
        ("--header-programs", 0.7, "headers that name the parts' programs too"),
        ("--drum-overlay", 0.0, "windows with beats and no drums given a Groove drum part"),
    ):
        g.add_argument(
            flag,
            type=float,
            default=default,
            help=f"share of {what} (harmony tokenizers; default {default})",
        )
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (schedule length)")
    g.add_argument(
        "--batch-size", type=int, default=8, help="sequences per micro-batch per process"
    )
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=1e-4, help="final learning rate")
    g.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (no autocast)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="steps between validations")
    g.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens scored")
    g.add_argument("--keep", type=int, default=3, help="step checkpoints kept (0: all)")
    g.add_argument("--log-every", type=int, default=10, help="steps per metrics line")
    g.add_argument("--workers", type=int, default=1, help="batch-building processes (0: inline)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    g.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over even if --out has checkpoints (default: resume from the newest)",
    )
    g.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        help="resume from the newest checkpoint in --out (the default)",
    )
    g.add_argument("--stop-at", type=int, help="stop after this step as if interrupted")
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="processes: >1 relaunches this command through torch.distributed.run (DDP)",
    )


def _worker_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The options of `args` that differ from their defaults, as a command line."""
    argv: list[str] = []
    for a in parser._actions:  # argparse has no public iterator over actions
        if not a.option_strings or a.dest in _LAUNCH_ONLY or a.dest == "help":
            continue
        value = getattr(args, a.dest, a.default)
        if value == parser.get_default(a.dest):
            continue
        if isinstance(a, argparse._StoreTrueAction | argparse._StoreFalseAction):
            # --resume/--no-resume share a dest: emit the one whose const is the value
            if a.const == value:
                argv.append(a.option_strings[0])
            continue
        argv += [a.option_strings[0], str(value)]
    return argv


def launch(nproc: int, train_argv: list[str]) -> int:
    """Run `improv train` on `nproc` processes with torch.distributed.run (one node)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "improv.cli",
        "train",
        *train_argv,
    ]
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)

    def forward(signum: int, frame: object) -> None:
        # `kill PID` of this launcher reaches torchrun, which passes it on to the workers: they
        # save a checkpoint after the current step and exit.
        proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def config_from_args(args: argparse.Namespace) -> object:
    from .data import parse_mix
    from .loop import TrainConfig

    return TrainConfig(
        data=args.data,
        out=args.out,
        valid=args.valid,
        preset=args.preset,
        init=args.init,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip=args.clip,
        bf16=args.bf16,
        mix=parse_mix(args.mix),
        augment=args.augment,
        solo=args.solo,
        solo_parts=tuple(x.strip() for x in args.solo_parts.split(",") if x.strip()),
        swap=args.swap,
        drop_bass=args.drop_bass,
        strip_chords=args.strip_chords,
        strip_beats=args.strip_beats,
        strip_header=args.strip_header,
        header_programs=args.header_programs,
        drum_overlay=args.drum_overlay,
        ckpt_every=args.ckpt_every,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        keep=args.keep,
        log_every=args.log_every,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        threads=args.threads,
        resume=args.resume,
        stop_at=args.stop_at,
    )


def train_command() -> Command:
    help_ = "train a model (or fine-tune one with --init) on a tokenized dataset or MIDI folder"
    holder: dict[str, argparse.ArgumentParser] = {}

    def add_arguments(p: argparse.ArgumentParser) -> None:
        holder["parser"] = p
        _add_train_arguments(p)

    def run(args: argparse.Namespace) -> int:
        if args.nproc_per_node > 1:
            return launch(args.nproc_per_node, _worker_argv(holder["parser"], args))
        from .loop import train

        result = train(config_from_args(args))  # type: ignore[arg-type]
        log.info("done: step %s", result.get("step"))
        return 0

    return help_, add_arguments, run


def eval_command() -> Command:
    help_ = "evaluate a checkpoint: nats/token, bits/note, loss by token type"

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="checkpoint folder (model.safetensors + config.json)")
        p.add_argument("--data", required=True, help="dataset folder, or a folder of MIDI files")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("--max-tokens", type=int, help="score at most about this many tokens")
        p.add_argument(
            "--seq-len",
            type=int,
            help="window length (default: the training sequence length, else the model's context)",
        )
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--device", default="cpu")
        p.add_argument("--bf16", action="store_true", help="bf16 autocast")

    def run(args: argparse.Namespace) -> int:
        from .eval import eval_checkpoint

        r = eval_checkpoint(
            args.checkpoint,
            args.data,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            device=args.device,
            bf16=args.bf16,
        )
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"{r['checkpoint']} on {r['data']}: {r['tokens']:,} tokens, {r['notes']:,} notes")
        print(f"  {r['nats_per_token']:.4f} nats/token, {r['bits_per_note']:.3f} bits/note")
        for name, t in r["by_type"].items():
            if t["tokens"]:
                print(f"  {name:<9} {t['tokens']:>9,} tokens  {t['nats_per_token']:.4f} nats/token")
        return 0

    return help_, add_arguments, run
