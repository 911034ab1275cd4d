"""The training loop on the tiny preset: learning, exact resume, eval, fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from improv.cli import main
from improv.engine.checkpoint import load_checkpoint, read_config, save_checkpoint
from improv.engine.config import ModelConfig
from improv.engine.model import Transformer
from improv.engine.tokenizer import Tokenizer, TokenizerConfig
from improv.trainer.loop import TrainConfig, lr_at, train

FAST = dict(
    preset="tiny",
    batch_size=2,
    seq_len=64,
    warmup=2,
    eval_every=0,
    ckpt_every=0,
    workers=0,
    log_every=1,
    threads=1,
)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_loss_goes_down(dataset: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        data=str(dataset),
        out=str(tmp_path / "run"),
        max_steps=40,
        lr=3e-3,
        min_lr=3e-3,
        augment=False,
        mix={"continue": 1.0},
        **FAST,
    )
    train(cfg)
    by_step = losses(tmp_path / "run")
    first = sum(by_step[s] for s in range(1, 6)) / 5
    last = sum(by_step[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").exists() and (final / "optimizer.safetensors").exists()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    model, mcfg, tok_cfg, meta = load_checkpoint(final)  # the engine loads it as is
    assert mcfg.n_layer == ModelConfig.from_preset("tiny").n_layer and meta["step"] == 40


def test_resume_is_exact(dataset: Path, tmp_path: Path) -> None:
    base = dict(data=str(dataset), max_steps=6, **{**FAST, "ckpt_every": 3})
    train(TrainConfig(out=str(tmp_path / "a"), **base))
    r = train(TrainConfig(out=str(tmp_path / "b"), stop_at=2, **base))  # "interrupted" at 2
    assert r["step"] == 2 and (tmp_path / "b" / "step-000002").exists()
    train(TrainConfig(out=str(tmp_path / "b"), **base))  # same command: resumes from step 2
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a == b  # every step's loss, 3..6 included, is bit-identical
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_file(str(tmp_path / "a" / "final" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "b" / "final" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(data="", out="", lr=1.0, min_lr=0.1, warmup=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_eval_json(dataset: Path, midi_folder: Path, tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(
        tmp_path / "ckpt", Transformer(ModelConfig.from_preset("tiny")), TokenizerConfig()
    )
    for data in (dataset, midi_folder):  # a dataset, or MIDI tokenized on the fly
        assert main(["eval", str(ckpt), "--data", str(data), "--json", "--seq-len", "64"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert {"nats_per_token", "bits_per_note", "tokens", "notes", "by_type"} <= r.keys()
        assert r["tokens"] > 0 and r["notes"] > 0
        by = r["by_type"]
        assert set(by) == {"special", "time", "part", "program", "velocity", "note_on", "note_off"}
        assert sum(t["tokens"] for t in by.values()) == r["tokens"]
        total = sum(t["tokens"] * t["nats_per_token"] for t in by.values() if t["tokens"])
        assert total / r["tokens"] == pytest.approx(r["nats_per_token"])
        assert r["bits_per_note"] == pytest.approx(total / 0.6931471805599453 / r["notes"])
        assert 5.0 < r["nats_per_token"] < 9.0  # random weights: about ln(1586) = 7.4


def test_init_finetune_keeps_tokenizer(midi_folder: Path, dataset: Path, tmp_path: Path) -> None:
    tok = Tokenizer(TokenizerConfig(velocity_bins=16))  # not the default: must survive
    mcfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1)
    ckpt = save_checkpoint(tmp_path / "base", Transformer(mcfg), tok.config)
    run = tmp_path / "ft"
    cfg = TrainConfig(data=str(midi_folder), out=str(run), init=str(ckpt), max_steps=3, **FAST)
    train(cfg)
    m2, t2, _ = read_config(run / "final")
    assert t2.to_dict() == tok.config.to_dict()
    assert m2 == mcfg  # the checkpoint's config, not the preset's
    assert Tokenizer.load(run / "data-train" / "tokenizer.json").config == tok.config
    # a dataset tokenized with another tokenizer is refused
    bad = TrainConfig(data=str(dataset), out=str(tmp_path / "bad"), init=str(ckpt), **FAST)
    with pytest.raises(ValueError, match="tokenizer"):
        train(bad)


def test_sigterm_saves_and_resumes(dataset: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "improv.cli", "train", "--data", str(dataset), "--out", str(run)]
    cmd += ["--preset", "tiny", "--max-steps", "100000", "--batch-size", "2", "--seq-len", "64"]
    cmd += ["--eval-every", "0", "--ckpt-every", "0", "--workers", "0", "--log-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    steps = sorted(run.glob("step-*"))
    assert len(steps) == 1 and not (run / "final").exists()
    stopped_at = json.loads((steps[0] / "trainer_state.json").read_text())["step"]
    cfg = TrainConfig(data=str(dataset), out=str(run), max_steps=stopped_at + 2, **FAST)
    assert train(cfg)["step"] == stopped_at + 2  # the same run continues
