"""Decoder-only transformer over the event vocabulary.

Choices, and why:
- Decoder-only, next-token loss: continuation, accompaniment (forced lead tokens) and infill
  (fill-in-the-middle layout) are all one left-to-right stream, so one model serves every task.
- Pre-norm with RMSNorm: pre-norm trains stably without warm-up tricks at these depths; RMSNorm is
  LayerNorm without the mean, one fewer reduction per step on the CPU decode path.
- Rotary positions (RoPE): a key's position is baked into the cached key itself, so the cache can be
  cropped (rollback) and rows of one batch can sit at different positions; there is no learned
  table to fall off at the context end (the engine re-encodes a window when it slides).
- SwiGLU MLP: better loss per parameter than GELU at equal width (8/3 * d_model keeps the count).
- Grouped-query attention (n_kv_head < n_head): the KV cache, the memory a live session holds and
  the bytes each decode step reads, shrinks by n_head / n_kv_head at a negligible quality cost.
- Tied embeddings: the vocabulary is small but the embedding is still ~6% of the `small` model;
  tying halves it and the input/output token geometry is shared.
- No biases: fewer ops per decode step, no measurable loss.

Two attention paths share the weights:
- no cache: plain causal attention over the sequence (training, full recompute);
- `cache=`: writes keys/values into a preallocated `KVCache` in place and attends over its prefix
  with a position mask, so rows of one batch may have different lengths.
The ONNX backend writes the same step from these weights with onnxruntime's fused ops
(`onnx_backend.build_onnx`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .config import ModelConfig

# Cached forwards with at most this many new tokens per row (decode steps, short appends) use
# matmul + softmax attention; longer ones (prefill) use SDPA.
DECODE_MAX_T = 8

# attend(q (B,T,H,D), k (B,T,Hkv,D), v (B,T,Hkv,D)) -> y (B,T,H,D), for one layer. Token-major
# (the layout the qkv projection produces): no transposes before RoPE and the cache write.
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalized in float32 (under bf16 autocast too), scaled in the input's dtype.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return y.to(x.dtype) * self.weight


def rope_tables(
    max_seq: int, head_dim: int, base: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin tables, each (max_seq, head_dim // 2), float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    t = torch.arange(max_seq, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (S, D/2)
    return freqs.cos(), freqs.sin()


def full_width(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(S, D/2) tables -> (S, D) tables for `apply_rope`: cos|cos and -sin|sin."""
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x (..., D); cos, sin full-width tables (see `full_width`) broadcast
    to x. Equals cat(x1*cos - x2*sin, x2*cos + x1*sin) bit for bit (negation is exact) in 4
    ops instead of 9: it runs once per layer on q and k together."""
    d = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, d)).flip(-2).flatten(-2)  # x2|x1
    return x * cos + swapped * sin


def group_queries(q: Tensor, n_kv_head: int) -> Tensor:
    """(B, T, H, D) -> (B, Hkv, R*T, D) with R = H / Hkv queries per key head.

    Lets grouped-query attention run against the cache as stored (B, Hkv, S, D): no
    repeat_interleave of the cache, i.e. no copy of it per step. Head h = kv * R + r.
    """
    B, T, H, D = q.shape
    return q.transpose(1, 2).reshape(B, n_kv_head, (H // n_kv_head) * T, D)  # (B, Hkv, R*T, D)


def ungroup(y: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, R*T, D) -> (B, T, H, D): the inverse of `group_queries` (a view when T == 1)."""
    B, Hkv, RT, D = y.shape
    T = RT // n_rep
    return y.view(B, Hkv, n_rep, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hkv * n_rep, D)


def group_mask(mask: Tensor, n_rep: int) -> Tensor:
    """(B, 1, T, S) -> (B, 1, R*T, S), the mask repeated for each query of a group."""
    B, _, T, S = mask.shape
    return mask[:, :, None].expand(B, 1, n_rep, T, S).reshape(B, 1, n_rep * T, S)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # One fused q|k|v projection: one matmul per decode step instead of three.
        self.wqkv = nn.Linear(
            cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False
        )
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: AttendFn) -> Tensor:
        """x (B, T, C); cos, sin (B, T, 1, D) full-width RoPE tables."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, D)  # (B, T, H+2Hkv, D): q | k | v heads
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)  # (B, T, H+Hkv, D): q and k at once
        y = attend(qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv :])  # (B, T, H, D)
        y = self.wo(y.reshape(B, T, H * D))  # (B, T, C)
        # Eval skips the dropout modules: one Python call fewer per use on the decode path.
        return self.resid_drop(y) if self.training else y


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_ff = cfg.d_ff
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # gate | up, one matmul
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.d_ff, dim=-1)  # (B, T, d_ff) each
        y = self.w2(F.silu(gate) * up)
        return self.drop(y) if self.training else y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: AttendFn) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attend)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables; needed after a meta-device init."""
        if device is None:
            device = self.tok_emb.weight.device
        device = torch.device(device)
        if device.type == "meta":
            device = torch.device("cpu")
        cfg = self.config
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_base, device)
        self.rope_cos, self.rope_sin = full_width(cos, sin)  # (S, D) each

    @torch.no_grad()
    def use_input_major_weights(self) -> None:
        """Store each block's linear weights (out, in) input-major in memory: the same tensor
        values and shapes, but `F.linear` then hands MKL a plain (in, out) matrix, which its
        CPU GEMV/GEMM reads ~10% faster per decode step than the transposed default (measured
        on the `small` preset, AMD EPYC). Idempotent; checkpoints save contiguous copies.
        The tied lm_head/embedding keeps its layout (embedding lookups read its rows)."""
        for block in self.blocks:
            for lin in (block.attn.wqkv, block.attn.wo, block.mlp.w13, block.mlp.w2):
                w = lin.weight
                if w.is_contiguous():
                    lin.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)

    def _rope(self, input_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos = self.rope_cos[input_pos].unsqueeze(2).to(dtype)  # (B, T, 1, D)
        sin = self.rope_sin[input_pos].unsqueeze(2).to(dtype)  # (B, T, 1, D)
        return cos, sin

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        cache: KVCache | None = None,
        slots: Sequence[int] | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, V).

        input_pos (B, T): each token's position (default 0..T-1 for every row).
        Without `cache`: causal attention within `tokens` (training, full recompute).
        With `cache`: row b is cache slot `slots[b]` (default b); its keys/values are written at
        `input_pos[b]` and it attends to every cached position <= its own, so rows may sit at
        different positions. `kv_len` bounds the cache prefix read (> every input_pos; default
        the whole cache: fixed shapes, for compile/graphs). Bookkeeping of slot lengths is the
        caller's (see `improv.engine.decoder.TorchDecoder`).
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.tok_emb(tokens)  # (B, T, C)
        if self.training:
            x = self.drop(x)
        cos, sin = self._rope(input_pos, x.dtype)
        if cache is None:
            attend_fns = [self._attend_causal] * len(self.blocks)
        else:
            attend_fns = self._cache_attend_fns(cache, slots, B, input_pos, kv_len)
        for block, attend in zip(self.blocks, attend_fns, strict=True):
            x = block(x, cos, sin, attend)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _attend_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n_rep = self.config.n_head // self.config.n_kv_head
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, ·, T, D)
        if n_rep > 1:  # fresh activations, not a cache: repeating them is cheap
            k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
            v = v.repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
        p = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, D)
        return y.transpose(1, 2)  # (B, T, H, D)

    def _cache_attend_fns(
        self,
        cache: KVCache,
        slots: Sequence[int] | None,
        batch: int,
        input_pos: Tensor,
        kv_len: int | None,
    ) -> list[AttendFn]:
        cfg = self.config
        n_rep = cfg.n_head // cfg.n_kv_head
        kv_len = cache.max_seq if kv_len is None else kv_len
        rows = cache.rows(slots, batch)
        index = cache.write_index(rows, input_pos)  # (B*T*Hkv,), shared by every layer
        key_pos = cache.positions[:kv_len]  # (S,)
        mask = (key_pos[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # (B, 1, T, S)
        mask = group_mask(mask, n_rep)  # (B, 1, R*T, S)
        decode = input_pos.shape[1] <= DECODE_MAX_T
        Hkv, D = cfg.n_kv_head, cfg.head_dim
        if decode:
            # Additive mask per (row, KV head), built once per forward and shared by every
            # layer: it is baddbmm's `input`, so scale, scores and mask are one op per layer.
            bias = torch.zeros(mask.shape, dtype=self.tok_emb.weight.dtype, device=mask.device)
            bias.masked_fill_(~mask, float("-inf"))  # (B, 1, R*T, S)
            bias = bias.expand(-1, Hkv, -1, -1).reshape(batch * Hkv, -1, kv_len)  # (B*Hkv,R*T,S)
        scale = 1.0 / math.sqrt(D)

        def make(layer: int) -> AttendFn:
            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                k_all, v_all = cache.write(layer, rows, index, k, v, kv_len)  # (B, Hkv, S, D)
                qg = group_queries(q, Hkv)  # (B, Hkv, R*T, D)
                if not decode:  # prefill: SDPA's blocked kernel wins on long query runs
                    y = F.scaled_dot_product_attention(qg, k_all, v_all, attn_mask=mask)
                    return ungroup(y, n_rep)  # (B, T, H, D)
                # Decode (a few queries per row): SDPA with a boolean mask was ~45% of a
                # 16-row CPU step; baddbmm + softmax + bmm with the additive mask, over kv_len
                # only. (B, Hkv) merge into one batch dim: a view of the cache's rows.
                k3 = k_all.reshape(-1, kv_len, D)  # (B*Hkv, S, D)
                s = torch.baddbmm(bias, qg.reshape(-1, qg.shape[2], D), k3.transpose(1, 2),
                                  alpha=scale)  # fmt: skip
                y = torch.bmm(torch.softmax(s, dim=-1), v_all.reshape(-1, kv_len, D))
                return ungroup(y.view(qg.shape), n_rep)  # (B, T, H, D)

            return attend

        return [make(i) for i in range(len(self.blocks))]


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count; shared (tied) tensors are counted once."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings and isinstance(model, Transformer):
        n -= model.tok_emb.weight.numel()
    return n
