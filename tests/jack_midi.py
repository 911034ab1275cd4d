"""A private JACK server for integration tests, and test-side MIDI ports on it.

`jack_server()` starts `jackd -n <unique> -d dummy` (no sound card needed) and points this
process (JACK_DEFAULT_SERVER, MIDO_BACKEND) at it; tests skip with a reason when jackd or the
rtmidi JACK API is missing. Used by tests/server/test_ports.py and tests/clients/test_bridge.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mido
import pytest

from improv.midi.backends import close_port

JACK_BACKEND = "mido.backends.rtmidi/UNIX_JACK"


def realtime_flags() -> list[str]:
    """jackd's scheduling: real time where this process may use it (root in a container, or
    an rtprio limit), else none. Without it, on a loaded machine JACK's threads miss their
    cycles ("client ... was not finished") and lose that cycle's MIDI, or stall the graph."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError):
        return ["--no-realtime"]
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return ["--realtime"]


@contextmanager
def jack_server(period: int = 256) -> Iterator[dict[str, str]]:
    """Yields the environment for subprocesses; os.environ is set for this process too.
    `period`: frames per JACK cycle at 48 kHz (a longer cycle misses fewer deadlines on a
    loaded machine, and a missed cycle drops that cycle's MIDI)."""
    if shutil.which("jackd") is None:
        pytest.skip("jackd is not installed (apt-get install jackd2)")
    try:
        import rtmidi
    except ImportError:
        pytest.skip("python-rtmidi is not installed")
    if rtmidi.API_UNIX_JACK not in rtmidi.get_compiled_api():
        pytest.skip("python-rtmidi was built without JACK")
    name = f"improv-test-{uuid.uuid4().hex[:8]}"
    env = {
        "JACK_DEFAULT_SERVER": name,
        "JACK_NO_START_SERVER": "1",  # never autostart a default server behind our back
        "MIDO_BACKEND": JACK_BACKEND,
    }
    # jackd's complaints (xruns on a loaded machine) go to a file: an unread pipe fills, and a
    # jackd blocked on its stderr stalls every client's close. `graph_stalled` reads it.
    err_file = tempfile.NamedTemporaryFile(prefix="jackd-", suffix=".log")  # noqa: SIM115
    env["IMPROV_TEST_JACKD_LOG"] = err_file.name
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    proc = subprocess.Popen(
        ["jackd", *realtime_flags(), "-n", name, "-d", "dummy", "-r", "48000", "-p", str(period)],
        stdout=subprocess.DEVNULL,
        stderr=err_file,
    )
    try:
        ok = subprocess.run(
            ["jack_wait", "-w", "-t", "10"], env={**os.environ}, capture_output=True
        )
        if ok.returncode != 0 or proc.poll() is not None:
            err_file.seek(0)
            err = err_file.read().decode(errors="replace")
            pytest.skip(f"jackd did not start: {err.strip()[-300:]}")
        yield {**os.environ}
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # A killed jackd (or one whose clients died) leaves its shared memory behind; enough of
        # those and the next jackd refuses to start ("Too many servers already active").
        for leftover in Path("/dev/shm").glob(f"jack*{name}*"):
            leftover.unlink(missing_ok=True)
        err_file.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def graph_stalled(env: dict[str, str], seconds: float = 1.0) -> bool:
    """True if the JACK graph stopped running: over `seconds`, jackd reports a failed
    cycle in most periods (a client that never finishes its cycle stalls every client).

    Seen with python-rtmidi's bundled libjack against Debian's jackd 1.9.21, about one bridge
    start in ten on a loaded machine: the bridge's second client (its input) waited forever in
    its first cycle (gdb: JackClient::DummyCycle), the server reporting it "not finished"
    every period; no MIDI moved for anyone. A test that sees it starts over."""

    def errors() -> int:
        return Path(env["IMPROV_TEST_JACKD_LOG"]).read_text(errors="replace").count("Process error")

    before = errors()
    time.sleep(seconds)
    return errors() - before > seconds * 48000 / 256 / 2


def jack_ports(timeout: float = 5.0) -> list[tuple[str, str]]:
    """(name, properties) of every port on the test's JACK server, from `jack_lsp -p`.

    A subprocess with a timeout: polling through rtmidi creates and deletes a JACK client per
    poll, and a client deletion was seen to hang on a loaded machine.
    """
    try:
        out = subprocess.run(
            ["jack_lsp", "-p"], capture_output=True, text=True, timeout=timeout
        ).stdout
    except subprocess.TimeoutExpired:
        return []
    ports: list[tuple[str, str]] = []
    for line in out.splitlines():
        if line.startswith(("\t", " ")):
            if ports and "properties:" in line:
                ports[-1] = (ports[-1][0], line.split("properties:", 1)[1].strip())
        elif line.strip():
            ports.append((line.strip(), ""))
    return ports


def wait_port(kind: str, part: str, timeout: float = 20.0) -> str:
    """The full name of a JACK port containing `part` ('input' = we send to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [n for n, props in jack_ports() if part in n and props.startswith(kind)]
        if hits:
            return hits[0]
        time.sleep(0.1)
    raise AssertionError(f"no JACK {kind} port {part!r} appeared")


class Recorder:
    """Receives from a port (rtmidi's thread), keeps every message."""

    def __init__(self, name: str) -> None:
        self.messages: list[mido.Message] = []
        self._lock = threading.Lock()
        self.port = mido.Backend(JACK_BACKEND).open_input(name, callback=self._on)

    def _on(self, msg: mido.Message) -> None:
        with self._lock:
            self.messages.append(msg)

    def snapshot(self) -> list[mido.Message]:
        with self._lock:
            return list(self.messages)

    def note_ons(self) -> int:
        return sum(1 for m in self.snapshot() if m.type == "note_on" and m.velocity > 0)

    def wait(self, pred, timeout: float) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.snapshot()):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        close_port(self.port)  # its callback cancelled first (midi/backends.py says why)


def play_phrase(out: mido.ports.BaseOutput, pitches=(60, 64, 67), dur: float = 0.08) -> None:  # noqa: ANN001
    for k in pitches:
        out.send(mido.Message("note_on", note=k, velocity=90))
        time.sleep(dur)
        out.send(mido.Message("note_off", note=k, velocity=0))
