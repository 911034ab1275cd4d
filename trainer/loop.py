"""The training loop: one process, or one of several under torch.distributed.run (DDP).

AdamW, linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast,
periodic validation, checkpoints every N steps and at the end, exact resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from improv.engine.checkpoint import load_checkpoint, save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer, num_params
from improv.engine.tokenizer import Tokenizer
from improv.engine.tokenizer.dataset import TokenDataset

from . import state as st
from .data import IGNORE, BatchSource, DataConfig, batch_loader, eval_chunks
from .eval import evaluate, open_eval_data
from .loss import token_nll

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str  # dataset folder (`improv tokenize`) or a folder of MIDI files
    out: str  # run folder: step-XXXXXX/, final/, metrics.jsonl, curves.png
    valid: str | None = None  # validation dataset or MIDI folder
    preset: str = "small"  # ModelConfig preset (ignored with --init or on resume)
    init: str | None = None  # fine-tune this checkpoint (keeps its tokenizer and model config)
    max_steps: int = 1000  # optimizer steps; also the length of the cosine schedule
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 1024  # tokens per sequence
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW, on matrices and embeddings only
    beta2: float = 0.95  # AdamW second-moment decay (0.95: stabler at small batch)
    clip: float = 1.0  # gradient-norm clip (0: off)
    bf16: bool = True  # bf16 autocast (CPU and GPU); weights and optimizer stay fp32
    mix: dict[str, float] = field(
        default_factory=lambda: {"continue": 0.5, "infill": 0.25, "accompany": 0.25}
    )
    augment: bool = True  # transposition, tempo stretch, velocity scaling
    solo: float = 0.0  # continuation windows that keep one part alone (DataConfig.solo)
    solo_parts: tuple[str, ...] = ()  # the parts they may keep (empty: any)
    swap: float = 0.0  # accompaniment examples with a swapped stretch (DataConfig.swap)
    drop_bass: float = 0.0  # windows without their bass part (DataConfig.drop_bass)
    strip_chords: float = 0.25  # DataConfig.strip_chords
    strip_beats: float = 0.25  # DataConfig.strip_beats
    strip_header: float = 0.3  # DataConfig.strip_header
    header_programs: float = 0.7  # DataConfig.header_programs
    drum_overlay: float = 0.0  # DataConfig.drum_overlay
    ckpt_every: int = 500  # steps between checkpoints (and at the end)
    eval_every: int = 250  # steps between validations (0: only at the end)
    eval_tokens: int = 65536  # validation budget (tokens scored)
    keep: int = 3  # step checkpoints kept (0: all)
    log_every: int = 10  # steps per metrics.jsonl line
    seed: int = 0
    workers: int = 1  # DataLoader worker processes building batches (0: in the loop)
    device: str = "auto"  # auto: cuda:LOCAL_RANK if available, else cpu
    threads: int | None = None  # torch CPU threads (None: torch's default, all cores)
    resume: bool = True  # continue from the newest checkpoint in `out` if there is one
    stop_at: int | None = None  # stop after this step as if interrupted (tests, benchmarks)


# The TrainConfig fields that are DataConfig's (same names): the trainer passes them on.
_HARMONY_FIELDS = ("strip_chords", "strip_beats", "strip_header", "header_programs", "drum_overlay")
_DATA_FIELDS = sorted({f.name for f in fields(DataConfig)} & {f.name for f in fields(TrainConfig)})


# --- distributed ----------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (env:// rendezvous), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_pref == "auto":
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("rank %d/%d on %s", d.rank, world, device)
    return d, device


# --- schedule, optimizer --------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: decaying them hurts
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


# --- metrics --------------------------------------------------------------------------------------


class Metrics:
    """Appends JSON lines to out/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **row: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


# --- the trainer ----------------------------------------------------------------------------------


def _dataset(path: str, tok: Tokenizer | None, workdir: Path) -> TokenDataset:
    """A dataset folder, or a MIDI folder tokenized into `workdir` (once: reused on resume)."""
    p = Path(path)
    if (p / "index.json").exists() or tok is None:
        return TokenDataset(p)
    if (workdir / "index.json").exists():
        return TokenDataset(workdir)
    log.info("tokenizing MIDI in %s into %s", p, workdir)
    return open_eval_data(p, tok, workdir)


def adds_harmony(tok: Tokenizer, ds: TokenDataset) -> bool:
    """The dataset's tokenizer is the model's plus the harmony tokens."""
    new = ds.tokenizer.config.to_dict()
    return (
        new.pop("harmony")
        and not tok.config.harmony
        and new == {k: v for k, v in tok.config.to_dict().items() if k != "harmony"}
    )


@torch.no_grad()
def grow_vocab(model: nn.Module, size: int) -> None:
    """Append rows to the (tied) embedding and output layer: the mean embedding plus a little
    noise, so new tokens start as likely as an average one and apart from each other."""
    old = model.tok_emb.weight  # (V, D)
    V, D = old.shape
    if size <= V:
        return
    extra = old.mean(0, keepdim=True) + 0.02 * torch.randn(size - V, D, device=old.device)
    emb = nn.Embedding(size, D, device=old.device, dtype=old.dtype)
    emb.weight.copy_(torch.cat([old, extra.to(old.dtype)]))
    model.tok_emb = emb
    head = nn.Linear(D, size, bias=False, device=old.device, dtype=old.dtype)
    if model.config.tie_embeddings:
        head.weight = emb.weight
    else:
        head.weight.copy_(torch.cat([model.lm_head.weight, extra.to(old.dtype)]))
    model.lm_head = head
    model.config = type(model.config).from_dict({**model.config.to_dict(), "vocab_size": size})


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            # On a CPU shared with other work, fewer threads avoid stalls at every op's barrier.
            torch.set_num_threads(cfg.threads)
        self.d, self.device = init_distributed(cfg.device)
        self.out = Path(cfg.out)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(self.out / "metrics.jsonl", self.d.main)
        self._stop = False
        self._stop_time = 0.0

        resume_from = st.latest_checkpoint(self.out) if cfg.resume else None
        # The model (and its tokenizer) come from: the run's own checkpoint, --init, or a preset.
        if resume_from is not None:
            model, _, tok_cfg, _ = load_checkpoint(resume_from, self.device)
            self.tok = Tokenizer(tok_cfg)
        elif cfg.init is not None:
            model, _, tok_cfg, _ = load_checkpoint(cfg.init, self.device)
            self.tok = Tokenizer(tok_cfg)
            log.info("fine-tuning %s (its tokenizer and model config are kept)", cfg.init)
        else:
            self.tok = None
        self.train_path = self._prepare_data(cfg.data, "data-train")
        self.train_ds = TokenDataset(self.train_path)
        if self.tok is None:
            self.tok = self.train_ds.tokenizer
        elif cfg.init is not None and resume_from is None and adds_harmony(self.tok, self.train_ds):
            # a model from before the harmony tokens, fine-tuned on data that has them: the
            # same ids plus new rows (every id it knew keeps its meaning: vocab.py)
            self.tok = self.train_ds.tokenizer
            grow_vocab(model, self.tok.vocab_size)
            log.info("vocabulary grown to %d ids (harmony tokens)", self.tok.vocab_size)
        elif self.train_ds.tokenizer.config.to_dict() != self.tok.config.to_dict():
            raise ValueError(
                f"{cfg.data} was tokenized with another tokenizer than the model's; pass the MIDI "
                "folder instead (it is tokenized with the model's tokenizer)"
            )
        if resume_from is None and cfg.init is None:
            torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
            mcfg = ModelConfig.from_preset(cfg.preset, vocab_size=self.tok.vocab_size)
            if cfg.seq_len > mcfg.max_seq_len:
                mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "max_seq_len": cfg.seq_len})
            model = Transformer(mcfg).to(self.device)
        model.train()
        if cfg.seq_len > model.config.max_seq_len:
            raise ValueError(
                f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}"
            )
        self.model = model
        self.opt = make_optimizer(model, cfg)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        if resume_from is not None:
            self._restore(resume_from)
        self.ddp: nn.Module = model
        if self.d.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)

        self.valid_chunks = None
        if cfg.valid and self.d.main:
            vds = _dataset(cfg.valid, self.tok, self.out / "data-valid")
            self.valid_chunks = eval_chunks(
                vds, cfg.seq_len, max(1, cfg.eval_tokens // cfg.seq_len)
            )
        self.data_cfg = DataConfig(**{k: getattr(cfg, k) for k in _DATA_FIELDS})

    def _prepare_data(self, path: str, name: str) -> str:
        """Dataset path to train on; a MIDI folder is tokenized (rank 0) into out/<name>."""
        p = Path(path)
        if (p / "index.json").exists():
            return str(p)
        work = self.out / name
        if self.d.main:
            _dataset(path, self.tok or Tokenizer(), work)
        if self.d.world > 1:
            dist.barrier()
        return str(work)

    # --- checkpoints ------------------------------------------------------------------------------
    def _restore(self, folder: Path) -> None:
        s = st.read_state(folder)
        st.load_optimizer(self.opt, folder, self.device)
        st.load_rng(folder)
        self.step, self.tokens_seen, self.elapsed = s["step"], s["tokens"], s["elapsed"]
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", folder, self.step)

    def save(self, name: str) -> Path | None:
        if not self.d.main:
            return None
        tmp = self.out / f".{name}.tmp"
        meta = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "data": self.cfg.data,
            "preset": self.cfg.preset,
            "init": self.cfg.init,
            "objectives": self.cfg.mix,
            "solo": self.cfg.solo,
            "solo_parts": list(self.cfg.solo_parts),
            "swap": self.cfg.swap,
            "drop_bass": self.cfg.drop_bass,
            **{k: getattr(self.cfg, k) for k in _HARMONY_FIELDS},
            "seq_len": self.cfg.seq_len,
        }
        save_checkpoint(tmp, self.model, self.tok.config, meta)
        st.save_optimizer(self.opt, tmp)
        st.save_rng(tmp)
        state = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "elapsed": self.elapsed,
            "world_size": self.d.world,
            "config": asdict(self.cfg),
        }
        (tmp / st.STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        dest = self.out / name
        st.publish(tmp, dest)
        st.prune(self.out, self.cfg.keep)
        log.info("checkpoint %s (step %d)", dest, self.step)
        return dest

    # --- validation -------------------------------------------------------------------------------
    def validate(self) -> dict | None:
        if not self.valid_chunks:
            return None
        r = evaluate(
            self.model, self.valid_chunks, self.tok.vocab, self.device, self.cfg.bf16, batch_size=8
        )
        self.metrics.write(
            step=self.step,
            valid_loss=r["nats_per_token"],
            valid_bits_per_note=r["bits_per_note"],
            valid_tokens=r["tokens"],
        )
        log.info(
            "step %d: valid %.4f nats/token, %.3f bits/note",
            self.step,
            r["nats_per_token"],
            r["bits_per_note"],
        )
        return r

    # --- the loop ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        # Ctrl-C under torchrun reaches a worker twice (terminal + torchrun's SIGTERM): only a
        # second signal seconds later means "stop now, without saving".
        if self._stop and now - self._stop_time > 5.0:
            raise KeyboardInterrupt
        if not self._stop:
            log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)
            self._stop, self._stop_time = True, now

    def fit(self) -> dict:
        cfg, d = self.cfg, self.d
        if self.step >= cfg.max_steps:
            log.info(
                "%s is already at step %d (max_steps %d): nothing to do",
                cfg.out,
                self.step,
                cfg.max_steps,
            )
            return {"step": self.step}
        if d.main:
            n = num_params(self.model)
            log.info(
                "model %s params, %d files, seq %d x batch %d x accum %d x %d proc",
                f"{n:,}",
                len(self.train_ds),
                cfg.seq_len,
                cfg.batch_size,
                cfg.grad_accum,
                d.world,
            )
        old_handlers = {}
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        source = BatchSource(self.train_path, self.data_cfg, cfg.batch_size, cfg.seed, d.rank)
        loader = iter(batch_loader(source, self.step * cfg.grad_accum, cfg.workers))
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
        V = self.model.config.vocab_size
        vocab = self.tok.vocab
        time_ids = (vocab.shift_base, vocab.part_base)
        bar = _progress(cfg.max_steps, self.step, d.main)
        window = {"loss": 0.0, "tok": 0, "n": 0, "t": time.perf_counter()}
        last_valid: dict | None = None
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(self.step, cfg)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                micro = [next(loader) for _ in range(cfg.grad_accum)]
                n_target = sum(int((m["target"] != IGNORE).sum()) for m in micro)
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                n_input = 0
                for j, m in enumerate(micro):
                    x = m["input"].to(self.device, non_blocking=True)  # (B, T)
                    y = m["target"].to(self.device, non_blocking=True)  # (B, T)
                    c = m["censor"].to(self.device, non_blocking=True)  # (B, T)
                    n_input += int((x != 0).sum())
                    sync = d.world == 1 or j == len(micro) - 1
                    ctx = nullcontext() if sync else self.ddp.no_sync()
                    with ctx:
                        with amp:
                            logits = self.ddp(x)  # (B, T, V)
                        loss = token_nll(
                            logits.float().view(-1, V), y.view(-1), c.view(-1), time_ids
                        ).sum()
                        (loss / max(n_target, 1)).backward()
                    loss_sum += loss.detach().double()
                if cfg.clip > 0:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip))
                else:
                    gnorm = float("nan")
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                # One small all-reduce: loss, counts and the stop flag agree on every rank.
                stats = torch.tensor(
                    [float(loss_sum), n_target, n_input, float(self._stop)], dtype=torch.float64
                )
                if d.world > 1:
                    stats = stats.to(self.device)
                    dist.all_reduce(stats)
                    stats = stats.cpu()
                step_loss = float(stats[0] / max(stats[1], 1))
                self.tokens_seen += int(stats[2])
                dt = time.perf_counter() - t0
                self.elapsed += dt
                window["loss"] += step_loss
                window["tok"] += int(stats[2])
                window["n"] += 1
                if d.main:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{stats[2] / dt:,.0f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    self.metrics.write(
                        step=self.step,
                        loss=window["loss"] / window["n"],
                        lr=lr,
                        grad_norm=gnorm,
                        tokens=self.tokens_seen,
                        tokens_per_s=window["tok"] / max(now - window["t"], 1e-9),
                        elapsed=round(self.elapsed, 2),
                    )
                    window = {"loss": 0.0, "tok": 0, "n": 0, "t": now}
                done = self.step >= cfg.max_steps
                stop = bool(stats[3] > 0) or (cfg.stop_at is not None and self.step >= cfg.stop_at)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not done:
                    last_valid = self.validate() or last_valid
                periodic = cfg.ckpt_every and self.step % cfg.ckpt_every == 0
                if not done and (periodic or stop):  # the end saves below
                    self.save(f"step-{self.step:06d}")
                    self._plot()
                if stop and not done:
                    log.info("stopped at step %d; the same command resumes", self.step)
                    return {"step": self.step, "stopped": True}
            last_valid = self.validate() or last_valid
            self.save(f"step-{self.step:06d}")
            self.save("final")
            self._plot()
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        return {"step": self.step, "valid": last_valid}

    def _plot(self) -> None:
        if not self.d.main:
            return
        from .plot import plot_metrics

        try:
            plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")
        except Exception as e:  # a plot must never stop a training run
            log.warning("plot failed: %s", e)

    def param_digest(self) -> list[str]:
        """sha256 of every rank's parameters (gathered): equal on all ranks when in sync."""
        import hashlib

        h = hashlib.sha256()
        for p in self.model.parameters():
            h.update(p.detach().float().cpu().numpy().tobytes())
        mine = h.hexdigest()
        if self.d.world == 1:
            return [mine]
        out: list[Any] = [None] * self.d.world
        dist.all_gather_object(out, mine)
        return out

    def close(self, finished: bool = False) -> None:
        if dist.is_initialized():
            if finished:
                # Together: a rank that tore its group down while the other was still writing
                # left the other's gloo threads to die at exit (SIGABRT, "terminate called
                # without an active exception"; seen in CI, rarely). Not after an error: the
                # other rank may never come.
                dist.barrier()
            dist.destroy_process_group()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(total: int, initial: int, enabled: bool):  # noqa: ANN202 - tqdm type
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if tty else 30.0,  # a log file gets a line every 30 s, not a flood
    )


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training; returns a summary (rank 0's view)."""
    trainer = Trainer(cfg)
    finished = False
    try:
        result = trainer.fit()
        digests = trainer.param_digest()
        result["param_sha256"] = digests
        trainer.metrics.write(step=trainer.step, event="end", param_sha256=digests)
        finished = True
        return result
    finally:
        trainer.close(finished)
