"""The wheel holds every subpackage under `improv.*` and nothing named `engine`/`server` at the top
(an unlisted subpackage works in editable mode but is missing from the wheel)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_every_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("improv-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {
        n.split("/")[0] for n in names if not n.endswith(".dist-info/") and ".dist-info" not in n
    }
    assert tops == {"improv"}, tops
    assert "improv/server/static/index.html" in names  # the browser page ships as package data
    assert "improv/models/default/model.safetensors" in names  # so does the default model
    # every folder with an __init__.py in the source tree must be in the wheel
    for src, pkg in {
        "engine": "improv/engine",
        "server": "improv/server",
        "clients": "improv/clients",
        "trainer": "improv/trainer",
        "cli": "improv/cli",
        "models": "improv/models",
        "protocol": "improv/protocol",
        "midi": "improv/midi",
    }.items():
        for init in (ROOT / src).rglob("__init__.py"):
            rel = init.relative_to(ROOT / src).as_posix()
            assert f"{pkg}/{rel}" in names, (
                f"{pkg}/{rel} missing from the wheel: list it in pyproject.toml"
            )
        for mod in (ROOT / src).rglob("*.py"):
            rel = mod.relative_to(ROOT / src).as_posix()
            assert f"{pkg}/{rel}" in names, f"{pkg}/{rel} missing from the wheel"


def test_console_script_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "improv.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "tokenize" in out
