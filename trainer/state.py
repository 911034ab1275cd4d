"""Training state on disk, without pickle: optimizer and RNG tensors in safetensors, the rest JSON.

A step checkpoint folder holds what the engine loads (model.safetensors + config.json, written by
`improv.engine.checkpoint.save_checkpoint`) and, beside it:

    optimizer.safetensors   every tensor of the optimizer state, keyed "<param index>.<name>"
    optimizer.json          param_groups and non-tensor state
    rng.safetensors         torch CPU (and CUDA) generator states
    trainer_state.json      step, tokens seen, elapsed time, the TrainConfig
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(folder / "optimizer.safetensors"))
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    (folder / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(opt: torch.optim.Optimizer, folder: Path, device: torch.device) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    # AdamW keeps `step` on the CPU unless capturable/fused: match what a fresh optimizer does.
    for st in state.values():
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"] = st["step"].cpu()
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(folder: Path) -> None:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"torch_cuda_{i}"] = s
    save_file(t, str(folder / "rng.safetensors"))


def load_rng(folder: Path) -> None:
    path = folder / "rng.safetensors"
    if not path.exists():
        return
    t = load_file(str(path))
    torch.set_rng_state(t["torch_cpu"])
    cuda = [t[k] for k in sorted(t) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def step_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints (those with a trainer state) under `out`, by step."""
    found: list[tuple[int, Path]] = []
    if not out.is_dir():
        return found
    for p in out.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint to resume from: the highest step, `final` included."""
    cands = step_dirs(out)
    final = out / "final"
    if (final / STATE_FILE).exists():
        cands.append((read_state(final)["step"], final))
    return max(cands, key=lambda c: c[0])[1] if cands else None


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def publish(tmp: Path, dest: Path) -> None:
    """Move a fully written folder into place (an interruption never leaves half a checkpoint)."""
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def prune(out: Path, keep: int) -> None:
    """Keep the `keep` newest step checkpoints (0: keep all)."""
    if keep <= 0:
        return
    for _, p in step_dirs(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed old checkpoint %s", p)
