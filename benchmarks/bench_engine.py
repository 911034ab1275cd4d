"""Engine benchmark: `small` preset, random weights, CPU.

    .venv/bin/python benchmarks/bench_engine.py [--threads 2] [--no-compile] [--no-write]

Measures, in one run: (1) KV-cached vs full-recompute generation of 256 tokens after a
1024-token prompt; (2) batch-1 decode step p50/p99 for torch eager fp32, torch eager bf16,
torch.compile, onnxruntime fp32 and int8-weight, and the floor (reading the weight bytes once);
(3) one decode step of 1, 16 and 32 rows at a live session's context (~1,000-1,500 tokens) for the
onnxruntime decoders; (4) KV-cache bytes per session at full context. Writes its section of
BENCHMARKS.md between the engine markers.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from improv.engine.config import ModelConfig
from improv.engine.decoder import Decoder, TorchDecoder
from improv.engine.model import Transformer, num_params
from improv.engine.onnx_backend import INT8_FILE, OnnxDecoder, export_onnx, quantize_int8

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- engine:start -->", "<!-- engine:end -->"
PROMPT_LEN, NEW_TOKENS, STEP_CONTEXT = 1024, 256, 512
ROWS, ROW_CONTEXT = (1, 16, 32), (1000, 1500)  # (3): a live server's sessions, context spread


def pct(times: list[float]) -> tuple[float, float]:
    a = np.array(times) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def time_steps(dec, ctx: list[int], n: int, warmup: int = 10) -> list[float]:
    """Decode steps at a constant context: extend one token, then crop it back."""
    dec.reset(0)
    dec.extend([0], [ctx])
    L = len(ctx)
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        dec.extend([0], [[ctx[i % L]]])
        dt = time.perf_counter() - t0
        dec.crop(0, L)
        if i >= warmup:
            out.append(dt)
    return out


def rows_step(dec: OnnxDecoder, rows: int, n: int = 30, warmup: int = 5) -> float:
    """p50 ms of one batched decode step over `rows` slots at contexts spread over ROW_CONTEXT
    (prefilled first): extend one token per row, then crop it back."""
    g = np.random.default_rng(0)
    lengths = np.linspace(*ROW_CONTEXT, rows).astype(int) if rows > 1 else [ROW_CONTEXT[0]]
    for s, L in enumerate(lengths):
        dec.reset(s)
        dec.extend([s], [g.integers(9, dec.vocab_size, int(L)).tolist()])
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        dec.extend(list(range(rows)), [[int(t)] for t in g.integers(9, dec.vocab_size, rows)])
        dt = time.perf_counter() - t0
        for s in range(rows):
            dec.crop(s, dec.length(s) - 1)
        if i >= warmup:
            out.append(dt)
    return float(np.percentile(np.array(out) * 1e3, 50))


def weight_read_floor(model: Transformer, n: int = 50, bytes_per_weight: int = 4) -> list[float]:
    """Time to read every weight byte once (a sum over one flat copy of the weights; with
    bytes_per_weight < 4, over as many bytes as weights stored that narrow would take)."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    flat = flat[: len(flat) * bytes_per_weight // 4].clone()
    out = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        flat.sum()
        if i >= 5:
            out.append(time.perf_counter() - t0)
    return out


def weight_matmuls_ort(model: Transformer, n: int = 200) -> list[float]:
    """One batch-1 pass of the step's 33 weight matmuls alone (each linear weight once, lm_head
    included) through onnxruntime's MLAS kernels: the best GEMV this CPU offers, nothing else.
    The gap between this and the floor is kernel speed, not graph overhead."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    ws = [m.weight.detach().float().contiguous().numpy() for m in model.modules()
          if isinstance(m, torch.nn.Linear)]  # fmt: skip
    dims = sorted({w.shape[1] for w in ws})
    inputs = [helper.make_tensor_value_info(f"x{d}", TensorProto.FLOAT, [1, d]) for d in dims]
    nodes, inits, outputs = [], [], []
    for i, w in enumerate(ws):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))  # (in, out)
        nodes.append(helper.make_node("MatMul", [f"x{w.shape[1]}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, w.shape[0]]))
    graph = helper.make_graph(nodes, "weight_matmuls", inputs, outputs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(
        onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    feed = {f"x{d}": np.random.default_rng(0).standard_normal((1, d), np.float32) for d in dims}
    out = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if i >= 10:
            out.append(time.perf_counter() - t0)
    return out


@torch.inference_mode()
def greedy_cached(dec: Decoder, prompt: list[int]) -> tuple[list[int], float, float]:
    """Prefill + NEW_TOKENS greedy steps on a decoder: (tokens, wall s, process CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    logits = dec.extend([0], [prompt])
    toks = []
    for _ in range(NEW_TOKENS):
        tok = int(logits.argmax(-1))
        toks.append(tok)
        logits = dec.extend([0], [[tok]])
    return toks, time.perf_counter() - t0, time.process_time() - c0


@torch.inference_mode()
def cached_vs_recompute(model: Transformer, prompt: list[int], sample_steps: int) -> dict:
    """Greedy generation both ways. Recompute is timed on `sample_steps` evenly spaced steps
    (each a full forward over that step's context) and summed over all steps by interpolation.
    Both on process CPU time: on a shared machine the wall clock moves with other jobs' load
    between the two measurements (wall time is reported too)."""
    toks, cached_s, cached_cpu = greedy_cached(TorchDecoder(model, max_batch=1), prompt)
    seq = prompt + toks
    steps = np.linspace(0, NEW_TOKENS - 1, sample_steps).astype(int)
    step_times, step_cpu = [], []
    for s in steps:
        x = torch.tensor([seq[: PROMPT_LEN + s]])
        t1, c1 = time.perf_counter(), time.process_time()
        model(x)
        step_times.append(time.perf_counter() - t1)
        step_cpu.append(time.process_time() - c1)
    every = np.arange(NEW_TOKENS)
    return {
        "cached_s": cached_s,
        "cached_cpu": cached_cpu,
        "recompute_s": float(np.interp(every, steps, step_times).sum()),
        "recompute_cpu": float(np.interp(every, steps, step_cpu).sum()),
        "sampled_steps": sample_steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200, help="decode steps timed per backend")
    ap.add_argument("--recompute-samples", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--load", default="", help="what else ran, for the text (e.g. a training job)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("small")
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(9, cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    ctx = prompt[:STEP_CONTEXT]
    res: dict[str, tuple[float, float] | str] = {}

    print("cached vs recompute ...", file=sys.stderr)
    cvr = cached_vs_recompute(model, prompt, args.recompute_samples)

    print("decode steps ...", file=sys.stderr)
    res["floor: read weights once"] = pct(weight_read_floor(model))
    res["floor: read int8 weights once"] = pct(weight_read_floor(model, bytes_per_weight=1))
    res["33 weight matmuls alone (onnxruntime MLAS)"] = pct(weight_matmuls_ort(model))
    with torch.inference_mode():
        res["torch eager fp32"] = pct(time_steps(TorchDecoder(model), ctx, args.steps))
        bf16 = Transformer(cfg).eval()
        bf16.load_state_dict(model.state_dict())
        bf16 = bf16.to(torch.bfloat16)
        res["torch eager bf16"] = pct(time_steps(TorchDecoder(bf16), ctx, args.steps))
        if args.no_compile:
            res["torch.compile fp32"] = "skipped (--no-compile)"
        else:
            try:
                dec = TorchDecoder(model, compile=True)
                t0 = time.perf_counter()
                dec.extend([0], [ctx[:8]])
                dec.extend([0], [[1]])
                compile_s = time.perf_counter() - t0
                res["torch.compile fp32"] = pct(time_steps(dec, ctx, args.steps))
                res["torch.compile fp32 (compile time s)"] = f"{compile_s:.0f} s"
            except Exception as e:  # inductor needs a C++ toolchain; report, don't fail
                res["torch.compile fp32"] = f"failed: {type(e).__name__}"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - t0
        onnx_nodes = len(onnx.load(str(path)).graph.node)
        ort_dec = OnnxDecoder(path, cfg, threads=args.threads)
        res["onnxruntime fp32"] = pct(time_steps(ort_dec, ctx, args.steps))
        _, cvr["onnx_cached_s"], cvr["onnx_cached_cpu"] = greedy_cached(
            OnnxDecoder(path, cfg, threads=args.threads), prompt
        )
        q = quantize_int8(path, Path(tmp) / INT8_FILE)
        res["onnxruntime int8 weights"] = pct(
            time_steps(OnnxDecoder(q, cfg, threads=args.threads), ctx, args.steps)
        )
        _, cvr["int8_cached_s"], cvr["int8_cached_cpu"] = greedy_cached(
            OnnxDecoder(q, cfg, threads=args.threads), prompt
        )
        print("rows at a live context ...", file=sys.stderr)
        rows: dict[str, list[float]] = {}
        for name, f in (("onnxruntime fp32", path), ("onnxruntime int8 weights", q)):
            dec = OnnxDecoder(f, cfg, max_batch=max(ROWS), threads=args.threads)
            rows[name] = [rows_step(dec, n) for n in ROWS]
    kv_bytes = TorchDecoder(model).nbytes_per_slot()

    cmd = "OMP_NUM_THREADS=... .venv/bin/python benchmarks/bench_engine.py " + " ".join(
        sys.argv[1:]
    )
    cmd = cmd.replace("OMP_NUM_THREADS=... ", "")
    md = render(cfg, model, cvr, res, kv_bytes, export_s, args, cmd, onnx_nodes, rows)
    print(md)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", md)
    return 0


def render(cfg, model, cvr, res, kv_bytes, export_s, args, cmd, onnx_nodes, rows) -> str:
    floor = res["floor: read weights once"][0]
    eager = res["torch eager fp32"][0]
    timed = {k: v for k, v in res.items() if isinstance(v, tuple)}
    backends = {
        k: v
        for k, v in timed.items()
        if not k.startswith(("floor", "33 weight", "onnxruntime int8"))
    }
    floor8 = res["floor: read int8 weights once"][0]
    int8 = res["onnxruntime int8 weights"][0]
    int8_ratio = cvr["recompute_cpu"] / cvr["int8_cached_cpu"]
    best_name, best = min(((k, v[0]) for k, v in backends.items()), key=lambda kv: kv[1])
    gemv = res["33 weight matmuls alone (onnxruntime MLAS)"][0]
    ratio = cvr["recompute_cpu"] / cvr["cached_cpu"]
    wall_ratio = cvr["recompute_s"] / cvr["cached_s"]
    ort_ratio = cvr["recompute_cpu"] / cvr["onnx_cached_cpu"]
    ort = res["onnxruntime fp32"][0]
    lines = [
        "## Engine (decode path)",
        "",
        f"`small` preset ({num_params(model) / 1e6:.1f}M params, {cfg.n_layer} layers, d_model {cfg.d_model}, "
        f"{cfg.n_head} heads / {cfg.n_kv_head} KV heads, context {cfg.max_seq_len}), random weights, "
        f"CPU, torch.set_num_threads({args.threads}), {platform.machine()}, torch {torch.__version__}. "
        "One run, all figures side by side. The machine is shared"
        + (f" ({args.load} ran during the run)" if args.load else "")
        + ", so absolute times are noisy; ratios within the run are the figures to read.",
        "",
        f"Command: `{cmd}`",
        "",
        f"### KV cache vs full recompute ({NEW_TOKENS} new tokens after a {PROMPT_LEN}-token prompt, greedy)",
        "",
        "| path | CPU time | ratio | wall time | ratio (wall) |",
        "|---|---|---|---|---|",
        f"| KV cache (prefill + {NEW_TOKENS} steps) | {cvr['cached_cpu']:.2f} s | 1x | "
        f"{cvr['cached_s']:.2f} s | 1x |",
        f"| full recompute every step | {cvr['recompute_cpu']:.1f} s | **{ratio:.0f}x** slower | "
        f"{cvr['recompute_s']:.1f} s | {wall_ratio:.0f}x |",
        f"| KV cache, onnxruntime decoder, fp32 | "
        f"{cvr['onnx_cached_cpu']:.2f} s | recompute is **{ort_ratio:.0f}x** slower | "
        f"{cvr['onnx_cached_s']:.2f} s | {cvr['recompute_s'] / cvr['onnx_cached_s']:.0f}x |",
        f"| KV cache, onnxruntime decoder, int8 weights (the server's default on the CPU) | "
        f"{cvr['int8_cached_cpu']:.2f} s | recompute is **{int8_ratio:.0f}x** slower | "
        f"{cvr['int8_cached_s']:.2f} s | {cvr['recompute_s'] / cvr['int8_cached_s']:.0f}x |",
        "",
        f"Recompute is timed on {cvr['sampled_steps']} evenly spaced steps (a full forward over that "
        f"step's context each) and summed over all {NEW_TOKENS} steps by linear interpolation. "
        "The ratio is taken on process CPU time (the wall clock of a shared machine moves "
        f"with other jobs' load between the two measurements); target >= 50x: "
        f"{'met' if ratio >= 50 else 'NOT met'} with the torch cache ({ratio:.0f}x), "
        f"{'met' if ort_ratio >= 50 else 'NOT met'} with the onnxruntime one ({ort_ratio:.0f}x); "
        "recompute is torch's full forward either way.",
        "",
        f"### Batch-1 decode step (context {STEP_CONTEXT} tokens, {args.steps} steps each)",
        "",
        "| backend | p50 ms | p99 ms | p50 / floor |",
        "|---|---|---|---|",
    ]
    for k, v in res.items():
        if isinstance(v, tuple):
            lines.append(f"| {k} | {v[0]:.2f} | {v[1]:.2f} | {v[0] / floor:.1f}x |")
        else:
            lines.append(f"| {k} | {v} | | |")
    lines += [
        "",
        f"- onnxruntime vs torch eager fp32: {eager / ort:.2f}x "
        f"({'faster' if ort < eager else 'NOT faster'}; target: faster).",
        f"- best fp32 backend ({best_name}) vs floor: {best / floor:.1f}x (target: within 2x: "
        f"{'met' if best <= 2 * floor else 'NOT met'}).",
        f"- onnxruntime with int8 weights (`onnx-int8`, the server's default on the CPU): "
        f"{int8:.2f} ms, {ort / int8:.1f}x faster than fp32 onnxruntime and {int8 / floor:.2f}x "
        f"the fp32 weights' floor ({int8 / floor8:.1f}x the floor of its own int8 bytes). Its "
        "weights are 8-bit (one scale per 32 inputs), so it is not the same function: on the "
        "default model's validation chunks its loss is within 0.0001 nats/token of fp32 (see "
        "the notes below the sections).",
        f"- ONNX export of the decode step took {export_s:.1f} s; the graph has {onnx_nodes} "
        "nodes (fused onnxruntime kernels: GroupQueryAttention with RoPE and the in-place "
        "KV-cache write, SkipSimplifiedLayerNormalization, one MatMul per weight).",
        "- The floor is one pass over the fp32 weights (a sum over a flat copy, read back to back: "
        "25 MB, mostly resident in this CPU's 32 MiB L3). It is not reachable within 2x by a "
        f"decode step here: the step's 33 weight matmuls *alone*, through onnxruntime's MLAS "
        f"(prepacked weights, the fastest GEMV measured on this CPU), take {gemv:.2f} ms = "
        f"{gemv / floor:.1f}x the floor, before attention over the 512 cached positions (4 MiB of "
        "keys/values), RoPE, norms and softmax. torch's MKL GEMV is slower still "
        "on this AMD CPU (the 33 linears ~3.3-3.9 ms in isolation; ~2.5 ms with input-major "
        "weights, which the torch decoder now uses).",
        "",
        f"### One decode step of many rows at a live session's context ({ROW_CONTEXT[0]:,}-{ROW_CONTEXT[1]:,} tokens)",
        "",
        "A live server's sessions hold long contexts (they grow to the full 2,048 and slide "
        "back to 1,024). p50 of one batched step, ms; per row in brackets:",
        "",
        "| decoder | " + " | ".join(f"{n} row{'s' if n > 1 else ''}" for n in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
        *(
            f"| {name} | "
            + " | ".join(f"{t:.2f} ({t / n:.2f})" for t, n in zip(ts, ROWS, strict=True))
            + " |"
            for name, ts in rows.items()
        ),
        "",
        "Attention over the cached keys/values is per row and grows with the context; the "
        "weights are read once per step whatever the rows. At these lengths attention is most "
        "of a many-row step, which int8 weights do not shrink.",
        "",
        "### KV cache per session",
        "",
        f"{kv_bytes / 2**20:.1f} MiB per session at the full {cfg.max_seq_len}-token context (fp32; "
        f"2 x {cfg.n_layer} layers x {cfg.n_kv_head} KV heads x {cfg.head_dim} dims x 4 bytes "
        "per position); grouped-query attention halves it vs 8 KV heads. Preallocated once per slot.",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, md: str) -> None:
    block = f"{START}\n{md}{END}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
