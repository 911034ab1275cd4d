"""Evaluation: loss in nats/token, bits per note, loss by token type.

Bits per note = total NLL in bits / number of notes (NOTE_ON targets scored): it compares models
with different tokenizations, where nats/token does not.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from improv.engine.tokenizer import Tokenizer
from improv.engine.tokenizer.dataset import BuildOptions, TokenDataset, build_dataset, find_midi
from improv.engine.tokenizer.vocab import TokenType, Vocab

from .data import eval_chunks

log = logging.getLogger(__name__)

TYPE_NAMES = {t: t.name.lower() for t in TokenType}  # "time", "note_on", ...
# Beats, chords and the header are not counted in bits/note: a figure comparable across
# vocabularies with and without them (a file without annotations has none of them anyway).
HARMONY_TYPES = (TokenType.METER, TokenType.CHORD, TokenType.HEADER)


def type_table(vocab: Vocab) -> torch.Tensor:
    """(V,) int64: TokenType of every id."""
    return torch.tensor([int(vocab.type_of(i)) for i in range(vocab.size)], dtype=torch.int64)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    chunks: Sequence[np.ndarray],
    vocab: Vocab,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    batch_size: int = 8,
) -> dict:
    """Score every token after the first of each chunk (chunks: (L,) int arrays, L <= T + 1)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    types = type_table(vocab).to(device)
    n_types = len(TokenType)
    nll_by_type = torch.zeros(n_types, dtype=torch.float64, device=device)
    count_by_type = torch.zeros(n_types, dtype=torch.float64, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    for b0 in range(0, len(chunks), batch_size):
        group = chunks[b0 : b0 + batch_size]
        T = max(len(c) for c in group) - 1
        x = torch.full((len(group), T), Vocab.PAD, dtype=torch.int64)
        y = torch.full((len(group), T), -100, dtype=torch.int64)
        for i, c in enumerate(group):
            t = torch.as_tensor(np.asarray(c, dtype=np.int64))
            x[i, : len(t) - 1] = t[:-1]
            y[i, : len(t) - 1] = t[1:]
        x, y = x.to(device), y.to(device)
        with amp:
            logits = model(x)  # (B, T, V)
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none"
        )  # (B*T,)
        valid = y.flatten() != -100
        t = types[y.flatten().clamp(min=0)]
        nll_by_type.index_add_(0, t[valid], nll[valid].double())
        count_by_type.index_add_(0, t[valid], torch.ones_like(nll[valid], dtype=torch.float64))
    model.train(was_training)
    return summarize(nll_by_type.cpu().numpy(), count_by_type.cpu().numpy())


def summarize(nll_by_type: np.ndarray, count_by_type: np.ndarray) -> dict:
    """Totals per TokenType -> the report dict."""
    tokens = int(count_by_type.sum())
    total = float(nll_by_type.sum())
    harmony = [int(t) for t in HARMONY_TYPES]
    music = total - float(nll_by_type[harmony].sum())
    notes = int(count_by_type[int(TokenType.NOTE_ON)])
    by_type = {
        TYPE_NAMES[t]: {
            "tokens": int(count_by_type[int(t)]),
            "nats_per_token": float(nll_by_type[int(t)] / count_by_type[int(t)])
            if count_by_type[int(t)]
            else None,
        }
        for t in TokenType
        if t not in HARMONY_TYPES or count_by_type[int(t)]
    }
    return {
        "nats_per_token": total / tokens if tokens else float("nan"),
        "bits_per_note": music / math.log(2) / notes if notes else float("nan"),
        "tokens": tokens,
        "notes": notes,
        "by_type": by_type,
    }


def open_eval_data(
    path: str | Path, tokenizer: Tokenizer, workdir: str | Path | None = None
) -> TokenDataset:
    """A dataset folder as is, or a folder of MIDI files tokenized with `tokenizer` into `workdir`
    (a temporary folder if None: the caller keeps the returned dataset's folder alive)."""
    path = Path(path)
    if (path / "index.json").exists():
        ds = TokenDataset(path)
        if ds.tokenizer.config.to_dict() != tokenizer.config.to_dict():
            raise ValueError(
                f"dataset {path} was tokenized with a different tokenizer than the model's; "
                "rebuild it with `improv tokenize --tokenizer` or pass the MIDI folder"
            )
        return ds
    files = find_midi([path])
    if not files:
        raise FileNotFoundError(f"no dataset (index.json) and no MIDI files in {path}")
    out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="improv-eval-"))
    build_dataset(files, out, tokenizer, BuildOptions(min_notes=1), workers=1, progress=False)
    return TokenDataset(out)


def eval_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str = "cpu",
    bf16: bool = False,
) -> dict:
    """Load a checkpoint and evaluate it on a dataset or a MIDI folder."""
    from improv.engine.checkpoint import load_checkpoint

    model, cfg, tok_cfg, meta = load_checkpoint(checkpoint, device)
    tok = Tokenizer(tok_cfg)
    # Default window: the length the model was trained on (longer ones test extrapolation).
    seq_len = min(seq_len or meta.get("seq_len") or cfg.max_seq_len, cfg.max_seq_len)
    with tempfile.TemporaryDirectory(prefix="improv-eval-") as tmp:
        ds = open_eval_data(data, tok, Path(tmp) / "data")
        cap = None if max_tokens is None else max(1, max_tokens // seq_len)
        chunks = eval_chunks(ds, seq_len, cap)
        log.info("evaluating %s on %d chunks of <= %d tokens", checkpoint, len(chunks), seq_len)
        result = evaluate(model, chunks, tok.vocab, device, bf16, batch_size)
    result["checkpoint"] = str(checkpoint)
    result["data"] = str(data)
    return result
