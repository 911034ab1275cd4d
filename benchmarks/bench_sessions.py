"""Live sessions benchmark: many sessions batched by one Scheduler vs the same work one by one.

    .venv/bin/python benchmarks/bench_sessions.py [--threads 2] [--tokens 64] [--no-write]

`small` preset, random weights, CPU, fp32. For N in 1, 4, 16, 64 sessions (prompts of 64..448
tokens, so rows sit at different positions), each session generates `--tokens` tokens with the
grammar mask on (seeded sampling):
- batched: one Scheduler with N sessions, every step one forward for all of them;
- one by one: the same sessions, each run alone to completion on a 1-session Scheduler.
Aggregate tokens/s counts sampled tokens over the decode phase (prompts prefilled beforehand).
Also: the mask + constraint-state cost per sampled token vs the forward per step, and the
process's resident memory with 64 sessions open (KV cache for max_len 2048).
Writes its section of BENCHMARKS.md between the sessions markers.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import command_line, machine, write_section

from improv.engine.config import ModelConfig
from improv.engine.engine import Engine
from improv.engine.live import SamplingParams, Scheduler
from improv.engine.model import Transformer, num_params
from improv.engine.tokenizer.vocab import TokenizerConfig, Vocab

COUNTS = (1, 4, 16, 64)


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_prompt(v: Vocab, length: int, seed: int) -> list[int]:
    """A grammatical prompt of about `length` tokens: a bass line with rests."""
    out = [v.BOS, v.TASK_ACCOMPANY, v.part(3), v.program(33)]
    i = 0
    while len(out) + 4 <= length:
        k = 36 + (i * 7 + seed) % 24
        out += [v.velocity(18), v.note_on(3, k), v.shift(10 + (i + seed) % 40), v.note_off(3, k)]
        i += 1
    return out


def prompt_lengths(n: int) -> list[int]:
    return [64 + (i * 97) % 385 for i in range(n)]  # 64..448, spread


def run_batched(engine: Engine, n: int, tokens: int) -> tuple[float, Scheduler]:
    """Seconds to sample `tokens` tokens in each of n sessions advanced together."""
    v = engine.vocab
    sched = Scheduler(engine, max_sessions=n)
    sessions = [
        sched.open_session(make_prompt(v, L, i), sampling=SamplingParams(seed=i))
        for i, L in enumerate(prompt_lengths(n))
    ]
    sched.run_until_idle()  # prefill every prompt
    for k in sched.stats:
        sched.stats[k] = 0
    t0 = time.perf_counter()
    for s in sessions:
        s.generate(max_tokens=tokens)
    sched.run_until_idle()
    dt = time.perf_counter() - t0
    got = sum(1 for s in sessions for e in _drain(s) if type(e).__name__ == "Token")
    assert got == n * tokens, (got, n * tokens)
    return dt, sched


def run_one_by_one(engine: Engine, n: int, tokens: int) -> float:
    """Seconds to do the same work with each session alone (decode phase only)."""
    v = engine.vocab
    sched = Scheduler(engine, max_sessions=1)
    total = 0.0
    for i, L in enumerate(prompt_lengths(n)):
        s = sched.open_session(make_prompt(v, L, i), sampling=SamplingParams(seed=i))
        sched.run_until_idle()
        t0 = time.perf_counter()
        s.generate(max_tokens=tokens)
        sched.run_until_idle()
        total += time.perf_counter() - t0
        s.close()
        sched.run_until_idle()
    return total


def _drain(s) -> list:
    out = []
    while not s.events.empty():
        out.append(s.events.get_nowait())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens sampled per session")
    ap.add_argument("--solo-max", type=int, default=16, help="one-by-one runs up to this N")
    ap.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("small")
    model = Transformer(cfg).eval()
    engine = Engine.from_model(model, TokenizerConfig())
    base_rss = rss_mb()

    rows = []
    solo_rate = None
    mem_line = ""
    counts = sorted(args.counts)
    for n in counts:
        dt, sched = run_batched(engine, n, args.tokens)
        st = sched.stats
        rate = n * args.tokens / dt
        if n == max(counts):
            cache_mb = sched.decoder.cache.nbytes_per_slot() * (n + 1) / 2**20
            used = sum(sched.decoder.length(s) for s in range(n + 1))
            mem_line = (
                f"Resident memory with {n} sessions open (prompts 64..448 + {args.tokens} tokens "
                f"each, {used:,} cached positions): **{rss_mb():,.0f} MiB** "
                f"(process RSS; {base_rss:,.0f} MiB before any session). The KV cache is "
                f"preallocated for {n + 1} slots x 2048 positions = {cache_mb:,.0f} MiB of "
                f"virtual memory, resident only where written (zero pages), i.e. about "
                f"{sched.decoder.cache.nbytes_per_slot(1) / 1024:.0f} KiB per cached position."
            )
        if n <= args.solo_max:
            solo_dt = run_one_by_one(engine, n, args.tokens)
            solo = n * args.tokens / solo_dt
            solo_rate = solo if n == 1 else solo_rate
        else:
            solo = solo_rate  # one-by-one throughput does not grow with N: reuse the N=1 rate
        mask_us = st["mask_s"] / max(st["tokens"], 1) * 1e6
        fwd_ms = st["forward_s"] / max(sched.steps, 1) * 1e3
        rows.append((n, rate, solo, rate / solo, fwd_ms, mask_us, n == 1 or n <= args.solo_max))
        print(
            f"N={n:3d} batched {rate:8.1f} tok/s  one-by-one {solo:7.1f} tok/s  "
            f"x{rate / solo:5.1f}  forward/step {fwd_ms:6.1f} ms  mask+state/token {mask_us:5.0f} us"
        )
    print(mem_line)

    lines = [
        "## Live sessions (batched scheduler)",
        "",
        f"`small` preset ({num_params(model) / 1e6:.1f}M parameters), random weights, fp32, CPU, "
        f"`torch.set_num_threads({args.threads})`. Each session samples {args.tokens} tokens "
        "(seeded, grammar mask on) after a prompt of 64..448 tokens (rows at different "
        "positions). *Batched*: one `Scheduler` advances all N sessions, one forward per step. "
        "*One by one*: each session alone on a 1-session scheduler. Decode phase only "
        "(prompts prefilled before timing).",
        "",
        "| sessions | batched tok/s | one-by-one tok/s | speed-up | forward per step | "
        "mask + state per token |",
        "|---|---|---|---|---|---|",
    ]
    for n, rate, solo, ratio, fwd_ms, mask_us, measured in rows:
        solo_s = f"{solo:,.1f}" + ("" if measured else " (N=1 rate)")
        lines.append(
            f"| {n} | {rate:,.1f} | {solo_s} | {ratio:.1f}x | {fwd_ms:.1f} ms | {mask_us:.0f} us |"
        )
    ratio16 = next((r[3] for r in rows if r[0] == 16), float("nan"))
    lines += [
        "",
        f"Target >= 8x at 16 sessions: **{'met' if ratio16 >= 8 else 'not met'}** "
        f"({ratio16:.1f}x).",
        "",
        mem_line,
        "",
        f"Machine: {machine()}, torch {torch.__version__}; shared with other jobs during the run. "
        f"Command: `{command_line()}`",
    ]
    if not args.no_write:
        write_section("sessions", "\n".join(lines))


if __name__ == "__main__":
    main()
