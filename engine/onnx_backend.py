"""ONNX graph of the cached decode step, built from the weights, and an onnxruntime decoder.

The graph is written op by op with `onnx.helper` (not traced with torch.onnx.export), so each
block is a handful of fused onnxruntime CPU kernels:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   RMSNorm (+ the residual add)
    MatMul (fused q|k|v weight)
    com.microsoft.GroupQueryAttention                                   RoPE, KV-cache write, attention
    MatMul, MatMul (fused gate|up), Split, Sigmoid, Mul, Mul, MatMul    output projection, SwiGLU

About 90 nodes for 8 layers; the traced graph had ~1,950 (~780 after onnxruntime's own fusions),
most of them shape plumbing, and a decode step cost about as much as torch eager.

    inputs   tokens (B, T) int64; seqlens_k (B,) int32: each row's past length + T - 1;
             total_sequence_length () int32: max over rows of past length + T;
             past_k_i, past_v_i (B, Hkv, P, D) float32 for each layer i
    outputs  logits (B, T, V); present_k_i, present_v_i (B, Hkv, P, D)

GroupQueryAttention (contrib op, CPU): when present_k_i is bound to the same memory as past_k_i
it writes the new keys/values into that buffer at each row's own position (seqlens_k) and
attends over that row's prefix only (exact masking, no padded scores). RoPE is applied inside
it (non-interleaved, i.e. rotate-half, as `model.apply_rope`) from cos/sin tables of
(max_seq, D/2). Its limits: head_dim a multiple of 16 (with rotary); several new tokens per row
after a past only at batch 1 (the decoder runs such a batch as one batched step of every row's
first token and one-row runs of the rest: `OnnxDecoder.extend`).

`OnnxDecoder` keeps the cache in numpy buffers (L, max_batch, Hkv, max_seq, D) and binds the
rows' slices as both past and present (IO binding): onnxruntime reads and extends the cache
where it lies, nothing copies it per step. The buffers are allocated whole, once: np.zeros
pages are zero-filled by the OS on first touch, so memory grows with what is written, and the
step time does not depend on the buffer's length (measured: 1.47 vs 1.79 ms at batch 1, 7.99
vs 8.22 ms at 16 rows, 2048 vs 256-768 positions). (Growing it in chunks instead copied every
slot's cache at each chunk: 0.5-1.2 s stalls in a server with 34 slots.)
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .cache import SlotLengths
from .config import ModelConfig
from .decoder import pad_batch
from .model import Transformer, rope_tables

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
# int8 weights: one scale per block of this many input features (see quantize_int8)
INT8_BLOCK = 32
OPSET = 17
REUSE_MAX_T = 8  # IO bindings of packed rows with at most this many new tokens are kept
# ... at most this many, least recently used dropped first. A live server's steps use one per
# (first slot, rows, tokens): batched steps of 1..N rows, and each session's slot with the few
# tokens after a player's event (one-row runs). With 32 kept, a 16-session server rebuilt
# bindings every few steps (py-spy: 3.8% of the scheduler thread in `_Binding.__init__`). A
# binding holds its logits (rows x tokens x vocab floats, ~7 KB per row and token).
REUSE_MAX_BINDINGS = 512
MS_DOMAIN = "com.microsoft"
# Stored in the model's metadata: a model.onnx of another graph layout (e.g. the earlier traced
# torch.onnx.export of the old functional step) is re-exported by `ensure_onnx`, refused by `OnnxDecoder`.
FORMAT_KEY, FORMAT = "improv_decode_step", "gqa-1"


def check_supported(cfg: ModelConfig) -> None:
    """GroupQueryAttention with rotary needs head_dim % 16 == 0 (every preset: 16, 32, 64)."""
    if cfg.head_dim % 16:
        raise ValueError(
            f"the ONNX backend needs head_dim (d_model / n_head) to be a multiple of 16, "
            f"got {cfg.head_dim}"
        )


def build_onnx(model: Transformer) -> onnx.ModelProto:
    """The decode step of `model` (fp32) as an ONNX model (see the module docstring)."""
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    check_supported(cfg)
    H, Hkv, D, L = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_layer
    nodes, inits = [], []

    def weight(name: str, t: Tensor | np.ndarray, transpose: bool = False) -> str:
        a = t.detach().float().cpu().numpy() if isinstance(t, Tensor) else t
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a.T if transpose else a), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **kw: object) -> str:
        nodes.append(helper.make_node(op, inputs, outputs, **kw))
        return outputs[0]

    def linear(x: str, lin: torch.nn.Linear, name: str) -> str:  # x @ W.T, W stored (in, out)
        return node("MatMul", [x, weight(f"{name}.wT", lin.weight, transpose=True)], [name])

    def add_norm(y: str, x: str, norm: torch.nn.Module, name: str) -> tuple[str, str]:
        """x + y and RMSNorm(x + y): one kernel. -> (normed, sum)."""
        ins = [y, x, weight(f"{name}.weight", norm.weight)]
        node("SkipSimplifiedLayerNormalization", ins, [name, "", "", f"{name}.sum"],
             domain=MS_DOMAIN, epsilon=cfg.norm_eps)  # fmt: skip
        return name, f"{name}.sum"

    cos, sin = rope_tables(cfg.max_seq_len, D, cfg.rope_base)  # (S, D/2) each
    rope = [weight("rope_cos", cos), weight("rope_sin", sin)]
    ff_split = weight("ff_split", np.array([cfg.d_ff, cfg.d_ff], np.int64))
    blocks = list(model.blocks)
    x = node("Gather", [weight("tok_emb", model.tok_emb.weight), "tokens"], ["x0"])  # (B, T, C)
    h = node("SimplifiedLayerNormalization", [x, weight("b0.attn_norm.weight",
             blocks[0].attn_norm.weight)], ["b0.attn_norm"], axis=-1, epsilon=cfg.norm_eps,
             stash_type=1)  # fmt: skip
    for i, blk in enumerate(blocks):
        p = f"b{i}"
        qkv = linear(h, blk.attn.wqkv, f"{p}.qkv")  # (B, T, (H + 2 Hkv) D): q | k | v heads
        past = [f"past_k_{i}", f"past_v_{i}", "seqlens_k", "total_sequence_length"]
        y = node("GroupQueryAttention", [qkv, "", "", *past, *rope],
                 [f"{p}.attn", f"present_k_{i}", f"present_v_{i}"], domain=MS_DOMAIN,
                 num_heads=H, kv_num_heads=Hkv, do_rotary=1, rotary_interleaved=0,
                 scale=1.0 / math.sqrt(D))  # (B, T, H D)  # fmt: skip
        h, x = add_norm(linear(y, blk.attn.wo, f"{p}.wo"), x, blk.mlp_norm, f"{p}.mlp_norm")
        gate, up = f"{p}.gate", f"{p}.up"
        node("Split", [linear(h, blk.mlp.w13, f"{p}.w13"), ff_split], [gate, up], axis=-1)
        silu = node("Mul", [gate, node("Sigmoid", [gate], [f"{p}.sig"])], [f"{p}.silu"])
        y = linear(node("Mul", [silu, up], [f"{p}.act"]), blk.mlp.w2, f"{p}.w2")  # (B, T, C)
        if i + 1 < len(blocks):
            h, x = add_norm(y, x, blocks[i + 1].attn_norm, f"b{i + 1}.attn_norm")
        else:
            h, x = add_norm(y, x, model.norm, "norm")
    linear(h, model.lm_head, "logits")  # (B, T, V)

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    cache = ["B", Hkv, "P", D]
    inputs = [
        helper.make_tensor_value_info("tokens", i64, ["B", "T"]),
        helper.make_tensor_value_info("seqlens_k", i32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["B", "T", cfg.vocab_size])]
    for i in range(L):
        for kv in "kv":
            inputs.append(helper.make_tensor_value_info(f"past_{kv}_{i}", f32, cache))
            outputs.append(helper.make_tensor_value_info(f"present_{kv}_{i}", f32, cache))
    graph = helper.make_graph(nodes, "improv_decode_step", inputs, outputs, inits)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    )
    onnx_model.ir_version = 8  # onnxruntime reads it; newer onnx defaults may be ahead of it
    helper.set_model_props(onnx_model, {FORMAT_KEY: FORMAT})
    return onnx_model


def export_onnx(model: Transformer, path: str | Path) -> Path:
    """Write the decode step of `model` (fp32, CPU) to `path`."""
    with torch.no_grad():
        graph = build_onnx(model)
    _save(graph, Path(path))
    logger.info("exported ONNX decode step to %s", path)
    return Path(path)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """The decode step at `src` with 8-bit weights, written to `dst`.

    Every MatMul becomes a MatMulNBits: symmetric int8 weights with one scale per INT8_BLOCK
    input features, computed in int8 (accuracy_level 4: activations quantized per row and
    block, int8 dot products). A quarter of the weight bytes to read per step, and a row's
    result does not depend on the other rows of its batch (onnxruntime's dynamic quantization,
    one activation scale per tensor, breaks batched == one-by-one). Measured on the default
    model: validation loss +0.0001 nats/token (BENCHMARKS.md).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    cfg = DefaultWeightOnlyQuantConfig(
        block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, bits=8
    )
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = qlog.level
    qlog.setLevel(logging.WARNING)  # one INFO line per weight otherwise
    try:
        q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=cfg)
        q.process()
    finally:
        qlog.setLevel(level)
    _save(q.model.model, Path(dst))
    logger.info("wrote the int8 decode step to %s", dst)
    return Path(dst)


def _save(graph: onnx.ModelProto, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then renamed: another process loading the same checkpoint (two servers,
    # a test beside a server) never reads a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(graph, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def temp_onnx_path() -> Path:
    return Path(tempfile.mkdtemp(prefix="improv-onnx-")) / ONNX_FILE


def onnx_format(path: str | Path) -> str | None:
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    return next((p.value for p in props if p.key == FORMAT_KEY), None)


def ensure_onnx(checkpoint: Path, model: Transformer, int8: bool = False) -> Path:
    """checkpoint/model.onnx (int8: model.int8.onnx) if present, of this graph format and newer
    than what it is made from; else export (and quantize) it there, or in a temp dir if the
    checkpoint folder is read-only."""
    path = checkpoint / ONNX_FILE
    if not _fresh(path, checkpoint / "model.safetensors"):
        try:
            path = export_onnx(model, path)
        except OSError:
            path = export_onnx(model, temp_onnx_path())
    if not int8:
        return path
    q = path.parent / INT8_FILE
    if _fresh(q, path):
        return q
    try:
        return quantize_int8(path, q)
    except OSError:
        return quantize_int8(path, temp_onnx_path().with_name(INT8_FILE))


def _fresh(path: Path, source: Path) -> bool:
    return (
        path.is_file()
        and (not source.exists() or path.stat().st_mtime >= source.stat().st_mtime)
        and onnx_format(path) == FORMAT
    )


class OnnxDecoder(SlotLengths):
    """Same API as `TorchDecoder` (improv.engine.decoder.Decoder), run by onnxruntime on CPU."""

    def __init__(
        self,
        path: str | Path,
        config: ModelConfig,
        max_batch: int = 1,
        max_seq: int | None = None,
        threads: int | None = None,
        profile_prefix: str | None = None,
    ) -> None:
        import onnxruntime as ort

        # Each row's several new tokens fed the same way whoever shares the step (its first in
        # the batched step, the rest in a one-row run), so its logits never depend on its batch
        # mates: offline jobs (`generation.SchedulerSessions`) give a seed the same notes under
        # any load. Off (live), a lone row's tokens go in one run (its answer a forward sooner),
        # and int8's logits move by ~1e-5 with the path.
        self.row_invariant = False
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix is not None:  # onnxruntime's per-node trace (session.end_profiling())
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        # Default: torch's intra-op thread count, not onnxruntime's one-per-core. The decode
        # step's kernels are small; extra threads spin against other processes on a shared CPU
        # (docs/engine-live.md, "CPU note").
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        fmt = self.session.get_modelmeta().custom_metadata_map.get(FORMAT_KEY)
        if fmt != FORMAT:
            raise ValueError(
                f"{path} is not an improv decode step of format {FORMAT!r} (found {fmt!r}); "
                "export it again with `improv export-onnx`"
            )
        super().__init__(max_batch, min(max_seq or config.max_seq_len, config.max_seq_len))
        self.config = config
        self.vocab_size = config.vocab_size
        self.device = torch.device("cpu")
        c = config
        shape = (c.n_layer, self.max_batch, c.n_kv_head, self.max_seq, c.head_dim)
        self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self._io: OrderedDict[tuple[int, int, int], _Binding] = OrderedDict()  # (LRU order)

    # --- bookkeeping: crop / reset / get_seq_length come from SlotLengths ---------------------
    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def nbytes_per_slot(self, seq: int | None = None) -> int:
        per_position = self.k[:, 0, :, 0].nbytes + self.v[:, 0, :, 0].nbytes  # (L, Hkv, D) each
        return per_position * (self.max_seq if seq is None else seq)

    # --- the step -----------------------------------------------------------------------------
    def extend(
        self, slots: Sequence[int], tokens: Sequence[Sequence[int]], all_logits: bool = False
    ) -> Tensor:
        """Append tokens[b] to slot slots[b]; logits float32 (B, V), or (B, T, V) if all_logits."""
        slots = list(slots)
        lengths = [self.lengths[s] for s in slots]
        toks, _, _ = pad_batch(lengths, tokens, self.max_seq)  # checks; positions: seqlens_k
        B, T = len(toks), len(toks[0])
        multi = [] if T == 1 else [b for b, row in enumerate(tokens) if len(row) > 1]
        if T == 1 or (not self.row_invariant and (B == 1 or not any(lengths))):
            logits = self._run(slots, lengths, toks)  # (B, T, V)
        else:  # GroupQueryAttention takes several new tokens after a past only at batch 1
            # Every row's first token in one batched step, then the longer rows' other tokens
            # one row at a time (a live step: a sampled token each, some with a player's event
            # or the clock floor's wait). Running such a batch row by row when over a third of
            # the rows had several (the rule until session 16) measured no better live, and
            # worse offline (BENCHMARKS.md, "Live capacity"; the harmony card's speed).
            logits = torch.zeros(B, T, self.vocab_size)
            logits[:, 0] = self._run(slots, lengths, [[row[0]] for row in tokens])[:, 0]
            for b in multi:
                row = list(tokens[b])
                logits[b, 1 : len(row)] = self._run([slots[b]], [lengths[b] + 1], [row[1:]])[0]
        for s, n0, row in zip(slots, lengths, tokens, strict=True):
            self.lengths[s] = n0 + len(row)
        if all_logits:
            return logits
        last = torch.tensor([len(row) - 1 for row in tokens])
        return logits[torch.arange(B), last]  # (B, V)

    def _run(self, slots: list[int], lengths: list[int], toks: list[list[int]]) -> Tensor:
        """One session run over padded rows at `lengths`; writes their keys/values into the
        cache (it does not update self.lengths)."""
        B, T = len(toks), len(toks[0])
        total = max(lengths) + T  # every row's new tokens sit at lengths[b] .. lengths[b] + T - 1
        start = slots[0]
        packed = slots == list(range(start, start + B))
        reuse = packed and T <= REUSE_MAX_T
        if packed:  # views: each layer's (B, Hkv, max_seq, D) slice is contiguous
            k_rows, v_rows = self.k[:, start : start + B], self.v[:, start : start + B]
        else:  # scattered slots: gather (a copy) of the positions in use, written back below
            k_rows = np.ascontiguousarray(self.k[:, slots, :, :total])  # (fancy indexing may
            v_rows = np.ascontiguousarray(self.v[:, slots, :, :total])  # not be contiguous)
        key = (start, B, T)
        io = self._io.get(key) if reuse else None
        if io is not None:
            self._io.move_to_end(key)
        else:
            io = _Binding(self, k_rows, v_rows, T)
            if reuse:
                if len(self._io) >= REUSE_MAX_BINDINGS:
                    self._io.popitem(last=False)
                self._io[key] = io
        io.tokens[:] = toks
        io.seqlens_k[:] = lengths
        io.seqlens_k += T - 1
        io.total[...] = total
        self.session.run_with_iobinding(io.binding)
        if not packed:
            for b, (s, n0) in enumerate(zip(slots, lengths, strict=True)):
                self.k[:, s, :, n0 : n0 + T] = k_rows[:, b, :, n0 : n0 + T]
                self.v[:, s, :, n0 : n0 + T] = v_rows[:, b, :, n0 : n0 + T]
        return torch.from_numpy(io.logits.copy() if reuse else io.logits)  # (B, T, V)


class _Binding:
    """An IO binding of every input and output to numpy memory, reusable across runs: the
    caller writes tokens/seqlens_k/total in place. Each layer's cache rows (B, Hkv, max_seq, D) are
    bound as both past and present, so GroupQueryAttention appends to them in place."""

    def __init__(self, dec: OnnxDecoder, k_rows: np.ndarray, v_rows: np.ndarray, T: int) -> None:
        B = k_rows.shape[1]
        self.k_rows, self.v_rows = k_rows, v_rows  # keep alive while bound
        self.tokens = np.zeros((B, T), np.int64)
        self.seqlens_k = np.zeros(B, np.int32)
        self.total = np.zeros((), np.int32)
        self.logits = np.empty((B, T, dec.vocab_size), np.float32)
        io = self.binding = dec.session.io_binding()
        for name, arr in (("tokens", self.tokens), ("seqlens_k", self.seqlens_k),
                          ("total_sequence_length", self.total)):  # fmt: skip
            io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for i in range(dec.config.n_layer):
            for kv, arr in (("k", k_rows[i]), ("v", v_rows[i])):
                assert arr.flags.c_contiguous
                shape, ptr = list(arr.shape), arr.ctypes.data
                io.bind_input(f"past_{kv}_{i}", "cpu", 0, np.float32, shape, ptr)
                io.bind_output(f"present_{kv}_{i}", "cpu", 0, np.float32, shape, ptr)
        io.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape),
                       self.logits.ctypes.data)  # fmt: skip
