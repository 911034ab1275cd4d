"""ONNX export of the cached decode step, and an onnxruntime decoder.

The exported graph is `Transformer.forward_past`:

    inputs   tokens (B, T) int64, input_pos (B, T) int64,
             past_k_i, past_v_i (B, Hkv, P, D) float32 for each layer i
    outputs  logits (B, T, V), new_k, new_v (L, B, Hkv, T, D)

B, T and P are dynamic. Row b's valid past is its first input_pos[b, 0] positions; the rest of
the P positions is masked, so the cache buffer can be larger than what is valid.

`OnnxDecoder` keeps the cache in numpy buffers (L, max_batch, Hkv, capacity, D) and binds the
rows' slices to the inputs by pointer (IO binding): onnxruntime reads the cache where it lies,
nothing copies it per step. Only the new keys/values (T positions) are written back. Capacity
grows in chunks of 256 positions (one copy per chunk), so a short context does not pay for
reading a max_seq-long buffer.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .cache import SlotLengths
from .config import ModelConfig
from .decoder import pad_batch
from .model import Transformer

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPSET = 17
CAPACITY_CHUNK = 256


class _DecodeStep(nn.Module):
    """forward_past with flat inputs, the shape torch.onnx.export wants."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.n_layer = model.config.n_layer

    def forward(self, tokens: Tensor, input_pos: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        return self.model.forward_past(
            tokens, input_pos, past[: self.n_layer], past[self.n_layer :]
        )


def input_names(n_layer: int) -> list[str]:
    return (
        ["tokens", "input_pos"]
        + [f"past_k_{i}" for i in range(n_layer)]
        + [f"past_v_{i}" for i in range(n_layer)]
    )


def export_onnx(model: Transformer, path: str | Path) -> Path:
    """Export the decode step of `model` (fp32, CPU) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model = model.float().cpu().eval()
    B, T, P = 1, 2, 8  # example sizes; all three are dynamic in the graph
    past = [torch.zeros(B, cfg.n_kv_head, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    tokens = torch.zeros(B, T, dtype=torch.long)
    input_pos = torch.tensor([[3, 4]])
    names = input_names(cfg.n_layer)
    dynamic = {"tokens": {0: "B", 1: "T"}, "input_pos": {0: "B", 1: "T"}}
    dynamic |= {n: {0: "B", 2: "P"} for n in names[2:]}
    dynamic |= {"logits": {0: "B", 1: "T"}, "new_k": {1: "B", 3: "T"}, "new_v": {1: "B", 3: "T"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose
        torch.onnx.export(
            _DecodeStep(model),
            (tokens, input_pos, *past),
            str(path),
            input_names=names,
            output_names=["logits", "new_k", "new_v"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: about a second for this graph
        )
    logger.info("exported ONNX decode step to %s", path)
    return path


def temp_onnx_path() -> Path:
    return Path(tempfile.mkdtemp(prefix="improv-onnx-")) / ONNX_FILE


def ensure_onnx(checkpoint: Path, model: Transformer) -> Path:
    """checkpoint/model.onnx if present and newer than the weights; else export it (there, or
    to a temp dir if the checkpoint folder is read-only)."""
    path = checkpoint / ONNX_FILE
    weights = checkpoint / "model.safetensors"
    if path.is_file() and (not weights.exists() or path.stat().st_mtime >= weights.stat().st_mtime):
        return path
    try:
        return export_onnx(model, path)
    except OSError:
        return export_onnx(model, temp_onnx_path())


class OnnxDecoder(SlotLengths):
    """Same API as `TorchDecoder` (improv.engine.decoder.Decoder), run by onnxruntime on CPU."""

    def __init__(
        self,
        path: str | Path,
        config: ModelConfig,
        max_batch: int = 1,
        max_seq: int | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Default: torch's intra-op thread count, not onnxruntime's one-per-core. The decode
        # step's kernels are small; extra threads spin against other processes on a shared CPU
        # (docs/engine-live.md, "CPU note").
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        super().__init__(max_batch, min(max_seq or config.max_seq_len, config.max_seq_len))
        self.config = config
        self.vocab_size = config.vocab_size
        self.device = torch.device("cpu")
        self.names = input_names(config.n_layer)
        self.capacity = 0
        self.k = self.v = np.zeros(0, dtype=np.float32)
        self._grow(CAPACITY_CHUNK)

    def _grow(self, needed: int) -> None:
        cap = min(self.max_seq, -(-needed // CAPACITY_CHUNK) * CAPACITY_CHUNK)
        if cap <= self.capacity:
            return
        c = self.config
        shape = (c.n_layer, self.max_batch, c.n_kv_head, cap, c.head_dim)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        if self.capacity:
            k[..., : self.capacity, :] = self.k
            v[..., : self.capacity, :] = self.v
        self.k, self.v, self.capacity = k, v, cap
        logger.debug("onnx cache capacity -> %d", cap)

    # --- bookkeeping: crop / reset / get_seq_length come from SlotLengths ---------------------
    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def nbytes_per_slot(self, seq: int | None = None) -> int:
        c = self.config
        return 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * (seq or self.max_seq)

    # --- the step -----------------------------------------------------------------------------
    def extend(
        self, slots: Sequence[int], tokens: Sequence[Sequence[int]], all_logits: bool = False
    ) -> Tensor:
        """Append tokens[b] to slot slots[b]; logits float32 (B, V), or (B, T, V) if all_logits."""
        slots = list(slots)
        lengths = [self.lengths[s] for s in slots]
        toks, pos, kv_len = pad_batch(lengths, tokens, self.max_seq)
        self._grow(kv_len)
        B = len(slots)
        start = slots[0]
        if slots == list(range(start, start + B)):
            k_rows, v_rows = self.k[:, start : start + B], self.v[:, start : start + B]  # views
        else:  # scattered slots: gather (a copy); keep slots packed to avoid it
            k_rows, v_rows = self.k[:, slots], self.v[:, slots]
        binding = self.session.io_binding()
        tok_np = np.asarray(toks, dtype=np.int64)  # (B, T)
        pos_np = np.asarray(pos, dtype=np.int64)  # (B, T)
        binding.bind_cpu_input("tokens", tok_np)
        binding.bind_cpu_input("input_pos", pos_np)
        L = self.config.n_layer
        bound = []  # keeps any gathered copies alive until the run
        for i in range(L):  # packed slots: each layer's (B, Hkv, cap, D) slice is contiguous
            for name, arr in ((f"past_k_{i}", k_rows[i]), (f"past_v_{i}", v_rows[i])):
                arr = np.ascontiguousarray(arr)  # no-op for the in-place views
                bound.append(arr)
                binding.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        for name in ("logits", "new_k", "new_v"):
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, new_k, new_v = binding.copy_outputs_to_cpu()  # (B,T,V), (L,B,Hkv,T,D) x2
        for b, (s, n0, row) in enumerate(zip(slots, lengths, tokens, strict=True)):
            n = len(row)
            self.k[:, s, :, n0 : n0 + n] = new_k[:, b, :, :n]
            self.v[:, s, :, n0 : n0 + n] = new_v[:, b, :, :n]
            self.lengths[s] = n0 + n
        out = torch.from_numpy(logits)
        if all_logits:
            return out
        last = torch.tensor([len(row) - 1 for row in tokens])
        return out[torch.arange(B), last]  # (B, V)
