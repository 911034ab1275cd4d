"""The OpenAPI schema agrees with the answers (#22 item 6): a bounded schemathesis pass over every
operation of a real server on loopback (a few examples each, a fixed seed: seconds, not minutes),
and the error answers it found undocumented, checked by hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def test_schemathesis_finds_no_failure_on_any_operation(server, tmp_path):
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a dev dependency (pyproject.toml)"
    cmd = [st, "--config-file", str(ROOT / "schemathesis.toml"), "run"]
    cmd += [server.url + "/openapi.json", "--max-examples", "8", "--seed", "1", "--workers", "1"]
    cmd += ["--report-dir", str(tmp_path), "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Tested: 5" in out, out[-3000:]  # every operation


def test_error_answers_are_in_the_schema(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    op = spec["paths"]["/v1/continue"]["post"]
    for code in ("400", "401", "413", "422", "503"):
        assert code in op["responses"], code
    err = spec["components"]["schemas"]["Error"]
    assert err["properties"]["detail"]["type"] == "string"
    assert "Retry-After" in op["responses"]["503"]["headers"]
    # the answers have that shape: a 422 from form validation, a 400 from a broken body
    r = httpx.post(server.url + "/v1/continue", data={"seconds": "x"})
    assert r.status_code == 422 and isinstance(r.json()["detail"], str), r.text
    r = httpx.post(
        server.url + "/v1/continue",
        content=b"--b\r\nbroken",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code in (400, 422) and isinstance(r.json()["detail"], str), r.text
