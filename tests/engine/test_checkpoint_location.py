"""The bundled model is found from any working directory (issue: a new user's `improv generate`
outside the repository failed with "no checkpoint at models/default")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from improv.engine.checkpoint import BUNDLED, read_config, resolve_checkpoint


def test_the_default_names_resolve_to_the_bundled_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no models/ here
    for name in (None, "default", "models/default"):
        assert resolve_checkpoint(name) == BUNDLED
    assert (BUNDLED / "config.json").is_file()
    model_cfg, _, _ = read_config("models/default")
    assert model_cfg.vocab_size > 0
    assert resolve_checkpoint(tmp_path / "mine") == tmp_path / "mine"  # others are taken as given


def test_a_local_models_default_folder_wins(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "models" / "default").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("models/default") == Path("models/default")


def test_the_cli_finds_it_from_another_directory(tmp_path: Path) -> None:
    code = "from improv.engine.checkpoint import read_config; print(read_config(None)[0].n_layer)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) > 0
