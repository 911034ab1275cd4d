"""Training throughput: the trainer vs a plain reference loop, and 2-process gloo DDP.

    .venv/bin/python benchmarks/bench_train.py --data data/train --preset small --steps 6

- trainer: `improv.trainer.loop.train` (bf16 autocast, on-the-fly examples, clipping, ...);
- reference: the same model and batches in a plain fp32 loop (forward, loss, backward, AdamW step);
- ddp2: `improv train --nproc-per-node 2` (torch.distributed.run, gloo, 1 thread per process).
Tokens/s counts non-padding input tokens, after `--warmup` steps. Prints a JSON object and a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.trainer.data import IGNORE, BatchSource, DataConfig
from improv.trainer.loop import TrainConfig, train


def rate_from_metrics(run: Path, warmup: int) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens" in r and "elapsed" in r]
    a = next(r for r in rows if r["step"] == warmup)
    b = rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"])


def bench_trainer(args, tmp: Path) -> float:
    run = tmp / "trainer"
    cfg = TrainConfig(
        data=args.data,
        out=str(run),
        preset=args.preset,
        max_steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=0,
        ckpt_every=0,
        log_every=1,
        workers=args.workers,
        threads=args.threads,
    )
    train(cfg)
    return rate_from_metrics(run, args.warmup)


def bench_reference(args) -> float:
    """Same model and batches, fp32, no autocast, no clipping, no scheduling."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = json.loads((Path(args.data) / "tokenizer.json").read_text())
    from improv.engine.tokenizer import Tokenizer, TokenizerConfig

    V = Tokenizer(TokenizerConfig.from_dict(vocab)).vocab_size
    model = Transformer(ModelConfig.from_preset(args.preset, vocab_size=V))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    src = BatchSource(args.data, DataConfig(seq_len=args.seq_len), args.batch_size, 0, 0)
    batches = [src[k] for k in range(args.warmup + args.steps)]  # built outside the timing
    tokens, t = 0, 0.0
    for k, b in enumerate(batches):
        t0 = time.perf_counter()
        logits = model(b["input"])  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, V), b["target"].view(-1), ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if k >= args.warmup:
            t += time.perf_counter() - t0
            tokens += int((b["input"] != 0).sum())
    return tokens / t


def bench_ddp(args, tmp: Path) -> float:
    run = tmp / "ddp"
    cmd = [sys.executable, "-m", "improv.cli", "train", "--nproc-per-node", "2"]
    cmd += ["--data", args.data, "--out", str(run), "--preset", args.preset]
    cmd += ["--max-steps", str(args.warmup + args.steps), "--batch-size", str(args.batch_size)]
    cmd += ["--seq-len", str(args.seq_len), "--eval-every", "0", "--ckpt-every", "0"]
    cmd += ["--log-every", "1", "--workers", str(args.workers)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return rate_from_metrics(run, args.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/train", help="dataset folder")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--no-ddp", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        res = {"reference_fp32": bench_reference(args), "trainer_bf16": bench_trainer(args, tmp)}
        if not args.no_ddp:
            res["ddp2_gloo_bf16"] = bench_ddp(args, tmp)
    res["trainer_vs_reference"] = res["trainer_bf16"] / res["reference_fp32"]
    res["config"] = {k: v for k, v in vars(args).items()}
    res["torch_threads"] = torch.get_num_threads()
    print(json.dumps(res, indent=1))
    print("\n| loop | tokens/s |\n|---|---|")
    for k in ("reference_fp32", "trainer_bf16", "ddp2_gloo_bf16"):
        if k in res:
            print(f"| {k} | {res[k]:,.0f} |")


if __name__ == "__main__":
    main()
