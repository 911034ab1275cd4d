"""Two CPU processes with gloo, launched through torch.distributed.run by `improv train`."""

from __future__ import annotations

import json
from pathlib import Path

from improv.cli import main


def test_two_process_gloo_ranks_stay_in_sync(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    argv = ["train", "--nproc-per-node", "2", "--data", str(dataset), "--out", str(run)]
    argv += ["--preset", "tiny", "--max-steps", "4", "--batch-size", "2", "--seq-len", "64"]
    argv += ["--warmup", "2", "--eval-every", "0", "--workers", "0", "--grad-accum", "2"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    end = [r for r in rows if r.get("event") == "end"]
    assert len(end) == 1
    digests = end[0]["param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical parameters on both ranks
    state = json.loads((run / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    # the ranks drew different data: 2 ranks x 2 micro-batches x 2 sequences per step
    assert state["tokens"] > 0
