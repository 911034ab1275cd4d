"""The README's shell commands and its HTTP-client example run as written.

Every line of the README's ```sh blocks (a backslash-continued command joined into one line) runs
in bash, in a folder holding the files the lines name (song.mid and melody.mid built by
tests/midi_factory.py, song.lab written here), with this venv's bin first on PATH. The lines are
read from README.md when the tests are collected: a changed README runs its new text, and a line
of a shape this file does not know how to run fails `test_every_readme_line_is_run`. The few
lines that cannot run here are in NOT_RUN with the reason.

The servers are the README's own lines (`make serve`, `improv serve --token SECRET ...`), started
as subprocesses on free loopback ports. The README addresses them as 127.0.0.1:8000 or
server:8000: client lines and the `Client` example run with that address rewritten to the port
the server got (`at()`), and a server line gets its port through the environment (PORT for the
Makefile, IMPROV_PORT for `improv serve`) so that its text stays as written.

MIDI lines run twice: without a MIDI system (they must say so in one line and exit 2, as the
README promises) and on a private JACK server with the dummy driver (tests/jack_midi.py; skipped
where jackd is missing, as the other JACK tests are), prefixed as the README says for JACK.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mido
import pytest
from jack_midi import Recorder, jack_server, play_phrase, wait_port

from improv.midi import note_balance

from midi_factory import midi_bytes, notes_track, simple_song

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent

# Lines (by how they start) that no test runs, and why. Each must still start a README line
# (test_not_run_lines_are_still_in_the_readme), so the list cannot outlive what it excuses.
NOT_RUN = {
    "docker ": "no Docker engine runs on CI machines (the README says so); the image's steps "
    "mirror the Makefile's, and `make serve` runs here",
    "make test": "the test suite itself: running it from a test would recurse",
}


def sh_lines() -> list[str]:
    """Every command line of the README's ```sh blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        lines += [ln.strip() for ln in re.sub(r"\\\n\s*", " ", block).splitlines() if ln.strip()]
    return lines


def client_example() -> str:
    """The README's ```python block that talks to a running server."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    found = [b for b in blocks if "from improv.clients import" in b]
    assert len(found) == 1, "expected one Client example in README.md"
    return found[0]


def kind(line: str) -> str | None:
    """How a README line is run (None: this file does not know; see the module docstring)."""
    argv = shlex.split(line, comments=True)
    if not argv:
        return "comment"
    if any(line.startswith(p) for p in NOT_RUN):
        return "not run"
    if argv[:2] == ["make", "serve"]:
        return "server"
    if argv[:2] == ["improv", "ports"] or argv[:2] == ["improv", "bridge"]:
        return "midi"
    if argv[:2] == ["improv", "serve"]:
        return "midi" if any(a.startswith("--midi-") for a in argv) else "server"
    if argv[0] == "curl":
        return "http"
    if argv[0] == "improv" and "-o" in argv:  # an offline command that writes a file
        return "cli"
    return None


def lines_of(k: str) -> list[str]:
    return [ln for ln in sh_lines() if kind(ln) == k]


def line_id(line: str) -> str:
    """A test id: the command without its comment, spaces folded."""
    return " ".join(shlex.split(line, comments=True))


def token_of(text: str) -> str | None:
    """The token a server line sets or a client line sends (None: no token)."""
    m = re.search(r"--token[ =](\S+)|Bearer (\w+)", text)
    return (m.group(1) or m.group(2)) if m else None


def written_files(line: str) -> list[str]:
    """The files a line writes: curl's and improv's `-o FILE`."""
    argv = shlex.split(line, comments=True)
    return [a for prev, a in zip(argv, argv[1:], strict=False) if prev == "-o"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def at(text: str, port: int) -> str:
    """The text with the README's server address (127.0.0.1:8000, server:8000) rewritten to the
    test server's port; the address must be there, so the command cannot reach elsewhere."""
    out, n = re.subn(r"\b(?:127\.0\.0\.1|server):8000\b", f"127.0.0.1:{port}", text)
    assert n, f"no server address in {text!r}"
    return out


def base_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def shell(line: str, cwd: Path, env: dict[str, str], timeout: float = 120):
    """Run one README line in bash; its output on failure says what happened."""
    t0 = time.monotonic()
    r = subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    logger.info("%.1f s, exit %d: %s", time.monotonic() - t0, r.returncode, line)
    return r


def read_midi(path: Path) -> mido.MidiFile:
    """A file a command wrote: non-empty MIDI with notes in it (an HTTP error body is not)."""
    assert path.is_file() and path.stat().st_size > 0, f"{path.name} was not written"
    try:
        mf = mido.MidiFile(path)
    except Exception as e:
        raise AssertionError(f"{path.name} is not MIDI ({e}): {path.read_bytes()[:300]!r}") from e
    assert any(m.type == "note_on" and m.velocity > 0 for t in mf.tracks for m in t), path.name
    return mf


def markers(mf: mido.MidiFile) -> list[str]:
    return [m.text for t in mf.tracks for m in t if m.type == "marker"]


def check_written(line: str, cwd: Path) -> None:
    """Each file the line wrote is MIDI with notes; given chords, it carries them as markers
    (README, "Chords and beats")."""
    names = written_files(line)
    assert names, f"no -o in {line!r}: nothing to check"
    for name in names:
        mf = read_midi(cwd / name)
        if "--chords" in line or "chords=" in line:
            assert markers(mf), f"{name}: no chord markers"


def clear(names: list[str], cwd: Path) -> None:
    """Outputs of an earlier line (several lines write more.mid) must not pass for this one's."""
    for name in names:
        (cwd / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The folder the lines run in, with the files they name."""
    d = tmp_path_factory.mktemp("readme")
    # 16 s: the infill line regenerates 8..12 s of it.
    (d / "song.mid").write_bytes(simple_song(seconds=16.0, seed=3))
    tune = [(i * 480, 440, p, 90) for i, p in enumerate([60, 64, 67, 65, 64, 62, 60, 62] * 2)]
    (d / "melody.mid").write_bytes(midi_bytes([notes_track("MELODY", tune)]))
    # Chord-lab lines (`start end label`, seconds), as the README describes them.
    labels = ["C:maj", "A:min", "F:maj", "G:maj"]
    (d / "song.lab").write_text(
        "".join(f"{2 * i}.0 {2 * i + 2}.0 {c}\n" for i, c in enumerate(labels))
    )
    return d


# --- background processes --------------------------------------------------------------------
@dataclass
class Background:
    """A README line running in bash in its own process group (so make's child and the like
    stop with it), its output in a file."""

    line: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, line: str, cwd: Path, env: dict[str, str], log: Path) -> Background:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["bash", "-c", line], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return cls(line, proc, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60) -> None:
        """Until the output matches `pattern` (a regex); fails if the command ends first."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output()):
            assert self.proc.poll() is None, f"{self.line!r} ended:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"no {pattern!r} from {self.line!r}:\n{self.output()[-3000:]}"
            )
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the group (what Ctrl-C or a supervisor would send); the exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(
                    f"{self.line!r} ignored SIGTERM:\n{self.output()[-3000:]}"
                ) from None
        return self.proc.returncode


# A SIGTERM'd command: its own clean exit, or bash's / make's report of the signal.
STOPPED = (0, -signal.SIGTERM, 128 + signal.SIGTERM, 2)


def get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=auth, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class Server:
    port: int
    bg: Background

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.bg.proc.poll() is None, (
                f"{self.bg.line!r} ended:\n{self.bg.output()[-3000:]}"
            )
            try:
                if get(f"http://127.0.0.1:{self.port}/health")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"{self.bg.line!r} never answered /health"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def servers(work) -> Iterator[dict[str | None, Server]]:
    """The README's server lines, running, by their token; each stopped gracefully at the end."""
    started: dict[str | None, Server] = {}
    try:
        for line in lines_of("server"):
            cwd = ROOT if line.startswith("make") else work  # the Makefile is at the root
            if line.startswith("make"):
                stamp = f"{sys.prefix}/.installed"
                stale = subprocess.run(["make", "-q", f"VENV={sys.prefix}", stamp], cwd=ROOT)
                if stale.returncode != 0:  # make serve would pip-install first: not in a test
                    pytest.skip(f"{stamp} is older than pyproject.toml: run `make install`")
            port = free_port()
            # The port through the environment, the line's text as written: PORT for the
            # Makefile (`PORT ?= 8000`), IMPROV_PORT for `improv serve`; VENV: this venv.
            env = base_env(PORT=str(port), IMPROV_PORT=str(port), VENV=sys.prefix)
            bg = Background.start(line, cwd, env, work / f"server-{port}.log")
            started[token_of(line)] = Server(port, bg)
        for s in started.values():  # started together: the model loads overlap
            s.wait_healthy()
        yield started
    finally:
        for s in started.values():
            rc = s.bg.stop()
            assert rc in STOPPED, (rc, s.bg.output()[-3000:])
            assert "Application shutdown complete" in s.bg.output(), s.bg.output()[-3000:]


# --- the lists -------------------------------------------------------------------------------
def test_every_readme_line_is_run():
    assert len(sh_lines()) >= 15
    unknown = [ln for ln in sh_lines() if kind(ln) is None]
    assert not unknown, f"README lines no test runs (teach kind() about them): {unknown}"


@pytest.mark.parametrize("prefix", sorted(NOT_RUN))
def test_not_run_lines_are_still_in_the_readme(prefix):
    assert any(ln.startswith(prefix) for ln in sh_lines()), f"{prefix!r}: drop it from NOT_RUN"


# --- the usage table --------------------------------------------------------------------------
def usage_rows() -> list[tuple[str, str]]:
    """(command name, the row's text) of each row of the README's `| command | ... |` table."""
    rows = re.findall(r"^\| `improv ([a-z-]+)[^`]*` \|.*$", README, flags=re.M)
    lines = re.findall(r"^\| `improv [a-z-]+[^`]*` \|.*$", README, flags=re.M)
    return list(zip(rows, lines, strict=True))


def test_usage_table_lists_every_command():
    r = shell("improv --help", ROOT, base_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"^    ([a-z][a-z-]+)\s", r.stdout, flags=re.M))
    assert listed and {name for name, _ in usage_rows()} == listed, r.stdout


# The rows are synopses with placeholders (`improv generate [PROMPT.mid] -o OUT.mid`), not
# commands: what runs is the README's `improv COMMAND --help`, and every option a row names
# must be one the command takes.
@pytest.mark.parametrize(("name", "row"), usage_rows(), ids=[n for n, _ in usage_rows()])
def test_usage_row_names_real_options(name, row, tmp_path):
    r = shell(f"improv {name} --help", tmp_path, base_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    named = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", row))
    missing = [o for o in sorted(named) if not re.search(rf"{o}(?![\w-])", r.stdout)]
    assert not missing, f"`improv {name}` takes no {missing}:\n{r.stdout}"


# --- servers, HTTP, the client, offline commands ---------------------------------------------
@pytest.mark.parametrize("line", lines_of("server"), ids=line_id)
def test_server_line(line, servers):
    s = servers[token_of(line)]
    status, body = get(f"http://127.0.0.1:{s.port}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    if (token := token_of(line)) is not None:  # with a token, nothing is served without it
        url = f"http://127.0.0.1:{s.port}/v1/continue"
        assert get(url, method="POST")[0] == 401
        assert get(url, "not-" + token, method="POST")[0] == 401


@pytest.mark.parametrize("line", lines_of("http"), ids=line_id)
def test_http_line(line, servers, work):
    token = token_of(line)
    assert token in servers, f"no README server line serves token {token!r}"
    clear(written_files(line), work)
    r = shell(at(line, servers[token].port), work, base_env())
    assert r.returncode == 0, r.stderr
    check_written(line, work)


def test_client_example(servers, work):
    code = client_example()
    saved = re.findall(r"\.save\(\"([^\"]+)\"\)", code)
    assert saved, "the example saves nothing: nothing to check"
    clear(saved, work)
    r = subprocess.run(
        [sys.executable, "-c", at(code, servers[None].port)],
        cwd=work, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    files = {name: read_midi(work / name) for name in saved}
    # Each instrument asked for is the program of its part's track (output tracks are named
    # after the parts): `programs={"bass": 33}` gives a bass track in program 33.
    for part, program in re.findall(r"programs=\{\"(\w+)\": (\d+)\}", code):
        tracks = [t for mf in files.values() for t in mf.tracks if t.name == part]
        assert tracks, f"no {part} track in {saved}"
        got = {m.program for t in tracks for m in t if m.type == "program_change"}
        assert got == {int(program)}, (part, program, got)


@pytest.mark.parametrize("line", lines_of("cli"), ids=line_id)
def test_offline_line(line, work):
    clear(written_files(line), work)
    r = shell(line, work, base_env())
    assert r.returncode == 0, r.stderr
    check_written(line, work)


# --- MIDI lines ------------------------------------------------------------------------------
# A JACK client looking for a server that is not there (and never starting one): no MIDI system.
NO_MIDI = {
    "MIDO_BACKEND": "mido.backends.rtmidi/UNIX_JACK",
    "JACK_DEFAULT_SERVER": "improv-no-such-jack",
    "JACK_NO_START_SERVER": "1",
}


def midi_line(line: str, port: int) -> str:
    """A MIDI line ready to run: a bridge's server address rewritten (a server line takes its
    port from IMPROV_PORT)."""
    return at(line, port) if "improv bridge" in line else line


@pytest.mark.parametrize("line", lines_of("midi"), ids=line_id)
def test_midi_line_without_a_midi_system_says_so(line, work):
    """README: without ALSA or a JACK server these commands say so in one line and exit 2."""
    port = free_port()  # nothing listens there: the command must stop before using it
    r = shell(midi_line(line, port), work, base_env(IMPROV_PORT=str(port), **NO_MIDI), timeout=60)
    assert r.returncode == 2, r.stderr
    said = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(said) == 1 and "MIDI is unavailable here" in said[0], r.stderr
    assert "JACK" in said[0] and "ALSA" in said[0]


@pytest.fixture
def jack() -> Iterator[dict[str, str]]:
    """A fresh JACK server per line: a command that wedged one (seen under load) cannot fail
    the next. 1024-frame cycles (21 ms): with 256 (5 ms), on a loaded 2-core machine, cycles
    were missed and MIDI lost in them (note-offs without their note-ons, a note-off short)."""
    with jack_server(period=1024) as env:
        yield env


def jack_command(line: str) -> str:
    """The line with the prefix the README gives for JACK."""
    m = re.search(r"For JACK, prefix with `([^`]+)`", README)
    assert m, "README no longer says how to use JACK"
    return f"{m.group(1)} {line}"


def jack_env(jack: dict[str, str], **extra: str) -> dict[str, str]:
    """The private JACK server's environment (jack_server() put it in os.environ), but without
    MIDO_BACKEND: only the README's prefix may select JACK."""
    env = base_env(JACK_DEFAULT_SERVER=jack["JACK_DEFAULT_SERVER"], **extra)
    return {k: v for k, v in env.items() if k != "MIDO_BACKEND"}


def option(line: str, name: str) -> str:
    argv = shlex.split(line, comments=True)
    return argv[argv.index(name) + 1]


Heard = Callable[[], list[mido.Message]]  # what the model has played so far


# How a live session's start and end read in `improv serve`'s and `improv bridge`'s logs.
SESSION_STARTED = r"session \S+: (respond|accompany)"
SESSION_STOPPED = "session stopped"


def play_until_answered(heard: Heard, sender: mido.ports.BaseOutput, bg: Background) -> None:
    """Phrases into the session until the model plays a note (respond answers after a pause,
    accompany plays along)."""
    for _ in range(10):
        play_phrase(sender, dur=0.15)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if note_balance(heard())[0] >= 1:
                return
            time.sleep(0.05)
    raise AssertionError(f"no note from {bg.line!r}:\n{bg.output()[-3000:]}")


def stop_and_check(bg: Background, heard: Heard, stopped: str) -> None:
    """SIGTERM ends the command gracefully (its log says `stopped`) and leaves no note hanging:
    every note-on it sent got its note-off (its output port keeps them paired)."""
    assert bg.stop() in STOPPED, bg.output()[-3000:]
    assert stopped in bg.output(), bg.output()[-3000:]
    time.sleep(0.3)  # the last note-offs on their way through JACK
    msgs = heard()
    ons, offs = note_balance(msgs)
    notes = [(m.type, m.channel, m.note, m.velocity) for m in msgs if m.type.startswith("note")]
    assert ons > 0 and ons == offs, f"{ons} on, {offs} off: {notes}\n{bg.output()[-3000:]}"


def run_ports_line(line: str, jack: dict[str, str], work: Path) -> None:
    be = mido.Backend(jack["MIDO_BACKEND"])
    port = be.open_output("listed", client_name="readme")
    try:
        r = shell(jack_command(line), work, jack_env(jack), timeout=60)
    finally:
        port.close()
    assert r.returncode == 0, r.stderr
    assert "readme:listed" in r.stdout and "UNIX_JACK" in r.stdout, r.stdout


def run_named_ports_line(line: str, jack: dict[str, str], work: Path) -> None:
    """`--midi-in NAME --midi-out NAME`: first with no such ports (a one-line error, exit 2),
    then with a keyboard and a synth of those names on JACK: play, hear the model, stop."""
    cmd, port = jack_command(line), free_port()
    env = jack_env(jack, IMPROV_PORT=str(port))
    r = shell(cmd, work, env, timeout=60)
    said = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(said) == 1, r.stderr
    assert f"no MIDI input matches {option(line, '--midi-in')!r}" in said[0], r.stderr

    be = mido.Backend(jack["MIDO_BACKEND"])
    keyboard = be.open_output(option(line, "--midi-in"), client_name=option(line, "--midi-in"))
    synth = be.open_input(option(line, "--midi-out"), client_name=option(line, "--midi-out"))
    got: list[mido.Message] = []
    synth.callback = got.append  # rtmidi's thread appends; list.append is atomic
    bg = Background.start(cmd, work, env, work / f"midi-{port}.log")
    try:
        Server(port, bg).wait_healthy()
        bg.wait_for(SESSION_STARTED)
        time.sleep(0.5)  # what is played while the session syncs its clock is dropped
        play_until_answered(lambda: list(got), keyboard, bg)
        stop_and_check(bg, lambda: list(got), SESSION_STOPPED)
    finally:
        bg.stop()
        keyboard.close()
        synth.close()


def play_through_virtual_ports(bg: Background, jack: dict[str, str], name: str, line: str) -> None:
    """`NAME out` recorded and `NAME in` played into once the session has started, until the
    model answers; then SIGTERM, and nothing left sounding."""
    rec = sender = None
    try:
        rec = Recorder(wait_port("output", f"{name} out"))
        sender = mido.Backend(jack["MIDO_BACKEND"]).open_output(wait_port("input", f"{name} in"))
        bg.wait_for(SESSION_STARTED)  # (a bridge: connected, and let in with its token)
        time.sleep(0.5)  # what is played while the session syncs its clock is dropped
        play_until_answered(rec.snapshot, sender, bg)
        if "--chord-sysex" in line:  # the chart's chords reach the DAW as SysEx
            assert rec.wait(lambda ms: any(m.type == "sysex" for m in ms), 10), bg.output()[-3000:]
        stop_and_check(bg, rec.snapshot, SESSION_STOPPED)
    finally:
        bg.stop()
        for p in (sender, rec):
            if p is not None:
                p.close()


def run_virtual_line(line: str, jack: dict[str, str], work: Path) -> None:
    """`--midi-virtual`: ports "improv in" / "improv out" appear; play into one, hear the other."""
    cmd, port = jack_command(line), free_port()
    bg = Background.start(cmd, work, jack_env(jack, IMPROV_PORT=str(port)), work / f"v-{port}.log")
    try:
        Server(port, bg).wait_healthy()
        play_through_virtual_ports(bg, jack, "improv", line)
    finally:
        bg.stop()


def run_bridge_line(line: str, jack: dict[str, str], servers: dict, work: Path) -> None:
    """`improv bridge ws://server:8000 ... --virtual` against the README's server with the
    line's token: ports "improv bridge in/out" appear, the session starts, the model answers."""
    token = token_of(line)
    assert token in servers, f"no README server line serves token {token!r}"
    cmd = jack_command(at(line, servers[token].port))
    bg = Background.start(cmd, work, jack_env(jack), work / f"bridge-{free_port()}.log")
    play_through_virtual_ports(bg, jack, "improv bridge", line)


@pytest.mark.jack
@pytest.mark.parametrize("line", lines_of("midi"), ids=line_id)
def test_midi_line_on_jack(line, jack, servers, work):
    argv = shlex.split(line, comments=True)
    if argv[:2] == ["improv", "ports"]:
        run_ports_line(line, jack, work)
    elif "--midi-virtual" in argv:
        run_virtual_line(line, jack, work)
    elif "--midi-in" in argv and "--midi-out" in argv:
        run_named_ports_line(line, jack, work)
    elif argv[:2] == ["improv", "bridge"] and "--virtual" in argv:
        run_bridge_line(line, jack, servers, work)
    else:
        pytest.fail(f"no JACK run for {line!r}: teach test_midi_line_on_jack about it")
