"""`Engine`: load a checkpoint, generate, stream and score token sequences.

    eng = Engine.load("runs/small/ckpt", device="auto", backend="torch")
    ids = eng.generate([BOS, TASK_CONTINUE], max_new_tokens=256, temperature=1.0, seed=0)
    for tok in eng.stream(prompt, 64): ...
    logps = eng.score(ids)

One `Engine` is not thread-safe: it owns one decoder (model + KV cache) for generate/stream/
score. Live sessions use their own decoder (`Engine.new_decoder`, or improv.engine.live).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_checkpoint, resolve_checkpoint
from .chord_planner import FOLLOWER, ChordPlanner
from .config import ModelConfig
from .context import slide_context
from .decoder import Decoder, TorchDecoder
from .model import Transformer
from .sampling import apply_mask, logits_to_probs, make_seeds, sample
from .tokenizer.vocab import TokenizerConfig, Vocab

logger = logging.getLogger(__name__)

# processor(tokens_so_far, logits) -> mask or None. tokens_so_far[b] is row b's whole sequence
# (prompt + generated); logits (B, V) float32 for every row of the batch (rows already finished
# get zeros). The mask is (B, V): bool (True = allowed) or float (0 / -inf, added to the logits).
LogitsProcessor = Callable[[list[list[int]], Tensor], Tensor | None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU (bf16 measured no faster there for these small matmuls and
    costs accuracy; see BENCHMARKS.md)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# torch; onnxruntime (CPU, fp32); onnxruntime with 8-bit weights (`onnx_backend.quantize_int8`)
BACKENDS = ("torch", "onnx", "onnx-int8")


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer_config: TokenizerConfig | None = None,
        backend: str = "torch",
        meta: dict[str, Any] | None = None,
        max_batch: int = 8,
        onnx_path: str | Path | None = None,
        compile: bool = False,
        chord_planner: ChordPlanner | None = None,
        chord_follower: ChordPlanner | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.tokenizer_config = tokenizer_config or TokenizerConfig()
        self.vocab = Vocab(self.tokenizer_config)
        if self.vocab.size != self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab.size} ids but the model {self.config.vocab_size}"
            )
        self.backend, self.meta, self.onnx_path = backend, meta or {}, onnx_path
        self.compile = compile
        # plan chords from a melody where none are given, offline and live (None: the HMM's)
        self.chord_planner, self.chord_follower = chord_planner, chord_follower
        self.device = next(model.parameters()).device
        self._tokenizer = None
        self._decoder: Decoder | None = None
        self._max_batch = max_batch

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        backend: str = "torch",
        dtype: torch.dtype | None = None,
        max_batch: int = 8,
        compile: bool = False,
    ) -> Engine:
        """Load a checkpoint folder. device "auto": CUDA when present, else CPU.

        dtype defaults to bf16 on CUDA, fp32 on CPU. backend "onnx" runs the decode step with
        onnxruntime (CPU, fp32), exporting `model.onnx` next to the checkpoint if absent;
        "onnx-int8" the same with 8-bit weights (`model.int8.onnx`, made from it); "auto":
        onnx-int8 on the CPU (its decode step is several times torch eager's speed there, at
        no measurable cost in validation loss: BENCHMARKS.md), torch on CUDA.
        `compile=True` wraps the torch forward in torch.compile (meant for CUDA; untested there).
        """
        dev = resolve_device(device)
        if backend == "auto":
            backend = "onnx-int8" if dev.type == "cpu" else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        model, _, tok_cfg, meta = load_checkpoint(path, dev)
        folder = resolve_checkpoint(path)
        model = model.to(dtype or default_dtype(dev))
        onnx_path = None
        if backend != "torch":
            from .onnx_backend import ensure_onnx

            model = model.float().cpu()
            onnx_path = ensure_onnx(folder, model, int8=backend == "onnx-int8")
        planner, follower = ChordPlanner.load(folder), ChordPlanner.load(folder, FOLLOWER)
        return cls(model, tok_cfg, backend, meta, max_batch, onnx_path, compile, planner, follower)

    @classmethod
    def from_model(
        cls,
        model: Transformer,
        tokenizer_config: TokenizerConfig | None = None,
        backend: str = "torch",
        max_batch: int = 8,
    ) -> Engine:
        """An engine around an in-memory model (tests, random weights)."""
        onnx_path = None
        if backend != "torch":
            from .onnx_backend import INT8_FILE, export_onnx, quantize_int8, temp_onnx_path

            onnx_path = export_onnx(model, temp_onnx_path())
            if backend == "onnx-int8":
                onnx_path = quantize_int8(onnx_path, onnx_path.with_name(INT8_FILE))
        return cls(model, tokenizer_config, backend, None, max_batch, onnx_path)

    @property
    def tokenizer(self) -> Any:
        """`improv.engine.tokenizer.Tokenizer` for the checkpoint's tokenizer config (lazy:
        importing it pulls in the MIDI libraries)."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.tokenizer_config)
        return self._tokenizer

    def new_decoder(self, max_batch: int, max_seq: int | None = None) -> Decoder:
        """A fresh decoder (model + its own KV cache of max_batch slots) on this backend."""
        if self.backend != "torch":
            from .onnx_backend import OnnxDecoder

            return OnnxDecoder(self.onnx_path, self.config, max_batch, max_seq)
        return TorchDecoder(self.model, max_batch, max_seq, compile=self.compile)

    def _decoder_for(self, batch: int) -> Decoder:
        if self._decoder is None or self._decoder.max_batch < batch:
            self._decoder = self.new_decoder(max(batch, self._max_batch))
        self._decoder.reset()
        return self._decoder

    # --- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: Sequence[int] | Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | Sequence[int | None] | None = None,
        use_cache: bool = True,
        stop_tokens: Sequence[int] = (Vocab.EOS, Vocab.FILL_END),
        logits_processor: LogitsProcessor | None = None,
        keep_len: int | None = None,
    ) -> list[int] | list[list[int]]:
        """Sample up to max_new_tokens after each prompt; returns the new tokens only.

        prompt: one list of ids (returns a list) or a list of lists (a batch: returns a list of
        lists; prompts may differ in length). A row stops after a stop token, which is included
        as its last token. seed: int (row b uses seed + b), one seed per row, or None (global
        RNG). use_cache=False recomputes the whole context every step (the reference path).
        Past the context length the context slides (`slide_context`, keep_len default
        max_seq_len // 2).
        """
        batched = len(prompt) > 0 and isinstance(prompt[0], Sequence)
        prompts = [list(p) for p in prompt] if batched else [list(prompt)]
        out: list[list[int]] = [[] for _ in prompts]
        for b, tok in self._run(
            prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, use_cache,
            stop_tokens, logits_processor, keep_len,
        ):  # fmt: skip
            out[b].append(tok)
        return out if batched else out[0]

    def stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        stop_tokens: Sequence[int] = (Vocab.EOS, Vocab.FILL_END),
        logits_processor: LogitsProcessor | None = None,
        keep_len: int | None = None,
    ) -> Iterator[int]:
        """`generate` for one prompt, yielding each token as soon as it is sampled."""
        for _, tok in self._run(
            [list(prompt)], max_new_tokens, temperature, top_k, top_p, min_p, seed, use_cache,
            stop_tokens, logits_processor, keep_len,
        ):  # fmt: skip
            yield tok

    @torch.inference_mode()
    def _run(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        min_p: float | None,
        seed: int | Sequence[int | None] | None,
        use_cache: bool,
        stop_tokens: Sequence[int],
        logits_processor: LogitsProcessor | None,
        keep_len: int | None,
    ) -> Iterator[tuple[int, int]]:
        """Yields (row, token) in sampling order. The one generation loop."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS, TASK_CONTINUE)")
        bad = [t for p in prompts for t in p if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}, got {bad[0]}")
        if max_new_tokens <= 0:
            return
        B, V = len(prompts), self.config.vocab_size
        max_seq = self.config.max_seq_len
        keep = keep_len or max_seq // 2
        stops = set(stop_tokens)
        seeds = make_seeds(seed, B)
        seqs = [list(p) for p in prompts]  # whole sequences, for the processor
        ctxs = [self._fit(p, max_seq, keep) for p in prompts]  # what the model sees
        n_new = [0] * B
        active = list(range(B))  # kept in slot order: slot_of[active[i]] == i (contiguous)
        dec = self._decoder_for(B) if use_cache else None
        if dec is not None:
            slot_of = {b: b for b in range(B)}
            logits = dec.extend(list(range(B)), ctxs)  # (B, V) prefill, rows padded
        else:
            logits = self._recompute(ctxs)
        while active:
            if logits_processor is not None:
                full = torch.zeros(B, V, device=logits.device)
                full[active] = logits
                mask = logits_processor(seqs, full)
                logits = apply_mask(logits, None if mask is None else mask[active])
            probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
            # Counter-based draws: row b's token at position p depends on (seeds[b], p) only.
            toks = sample(
                probs, seeds=[seeds[b] for b in active], positions=[len(seqs[b]) for b in active]
            ).tolist()  # the one host sync
            still = []
            for b, t in zip(active, toks, strict=True):
                seqs[b].append(t)
                ctxs[b].append(t)
                n_new[b] += 1
                yield b, t
                if t not in stops and n_new[b] < max_new_tokens:
                    still.append(b)
            active = still
            if not active:
                break
            slid = set()
            for b in active:  # context full: slide; the cache re-encodes the new window
                if len(ctxs[b]) > max_seq:
                    ctxs[b] = slide_context(ctxs[b], self.vocab, keep)
                    slid.add(b)
                    logger.debug("row %d: context slid to %d tokens", b, len(ctxs[b]))
            if dec is None:
                logits = self._recompute([ctxs[b] for b in active])
                continue
            for i, b in enumerate(active):  # compact: finished rows leave holes in the slots
                if slot_of[b] != i:
                    dec.move(slot_of[b], i)
                    slot_of[b] = i
            step = [b for b in active if b not in slid]
            by_row = {}
            if step:  # one batched forward for every row that just appends its token
                step_logits = dec.extend([slot_of[b] for b in step], [[ctxs[b][-1]] for b in step])
                by_row = dict(zip(step, step_logits, strict=True))
            for b in slid:
                dec.reset(slot_of[b])
                by_row[b] = dec.extend([slot_of[b]], [ctxs[b]])[0]
            logits = torch.stack([by_row[b] for b in active])  # (B_active, V)

    def _fit(self, ctx: list[int], max_seq: int, keep: int) -> list[int]:
        return ctx if len(ctx) <= max_seq else slide_context(ctx, self.vocab, keep)

    def _recompute(self, ctxs: list[list[int]]) -> Tensor:
        """Reference path: each row's whole context through the model, no cache. (B, V)."""
        rows = []
        for ctx in ctxs:
            x = torch.tensor([ctx], device=self.device)  # (1, T)
            rows.append(self.model(x)[0, -1].float())
        return torch.stack(rows)

    # --- scoring ------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, ids: Sequence[int], keep_len: int | None = None) -> list[float]:
        """Log-probability (natural log) of each token given the ones before it.

        The first token has no context: its entry is 0.0. Sequences longer than the context
        are scored with the same sliding window as generation.
        """
        ids = list(ids)
        if not ids:
            return []
        max_seq = self.config.max_seq_len
        keep = keep_len or max_seq // 2
        dec = self._decoder_for(1)
        out = [0.0]
        ctx = ids[:1]
        last = dec.extend([0], [ctx])  # (1, V) logits predicting ids[1]
        i = 1
        while i < len(ids):
            room = max_seq - len(ctx)
            if room == 0:
                ctx = slide_context(ctx, self.vocab, keep)
                dec.reset(0)
                last = dec.extend([0], [ctx])
                continue
            chunk = ids[i : i + room]
            logits = dec.extend([0], [chunk], all_logits=True)[0]  # (n, V)
            preds = torch.cat([last, logits[:-1]])  # (n, V): logits before each chunk token
            logp = F.log_softmax(preds, dim=-1)
            out += logp.gather(1, torch.tensor(chunk, device=logp.device)[:, None])[:, 0].tolist()
            last = logits[-1:]
            ctx += chunk
            i += len(chunk)
        return out
