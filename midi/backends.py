"""MIDI backends: what opens real ports, and the in-memory twin the tests use.

`MidoBackend` opens real ports through mido; the rtmidi API is chosen the mido way
(`MIDO_BACKEND=mido.backends.rtmidi/UNIX_JACK` selects JACK). mido loads python-rtmidi only when
a port is first listed or opened, so nothing here needs MIDI hardware or rtmidi at import.
`MemoryBackend` is the in-memory twin (ports can vanish and come back).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import mido


class PortError(RuntimeError):
    """A port name matches nothing or several ports, or a port cannot be opened."""


class MidiUnavailable(PortError):
    """This machine has no MIDI system the backend can use (no ALSA sequencer, no JACK server,
    no python-rtmidi); the message says what is missing and how to get it, in one line."""


HOW_TO_GET_MIDI = (
    "ALSA needs /dev/snd/seq (the snd-seq kernel module; in a container: --device /dev/snd); "
    "or run a JACK server (e.g. `jackd -d dummy`) and set "
    "MIDO_BACKEND=mido.backends.rtmidi/UNIX_JACK"
)


# --- backends ---------------------------------------------------------------------------------
class Backend(Protocol):
    name: str

    def input_names(self) -> list[str]: ...
    def output_names(self) -> list[str]: ...
    def open_input(
        self, name: str, virtual: bool, client: str | None, callback: Callable[[mido.Message], None]
    ) -> Any: ...
    def open_output(self, name: str, virtual: bool, client: str | None) -> Any: ...


class MidoBackend:
    """Real ports through mido (MIDO_BACKEND picks the backend and the rtmidi API)."""

    def __init__(self, name: str | None = None) -> None:
        self._b = mido.Backend(name, load=False)  # None: $MIDO_BACKEND, else mido's default
        self.name = f"{self._b.name}/{self._b.api}" if self._b.api else self._b.name

    def _kw(self, client: str | None, virtual: bool) -> dict[str, Any]:
        # client_name names the JACK/ALSA client of a virtual port ("improv:improv in"); mido
        # makes any port given a client_name virtual, and other backends do not know it.
        return {"client_name": client} if virtual and client and "rtmidi" in self.name else {}

    def probe(self) -> None:
        """Raise MidiUnavailable unless the MIDI system answers (listing ports makes a client,
        as opening one would). The C libraries' own complaints on stderr are kept out."""
        try:
            with _quiet_stderr():
                self._b.get_input_names()
        except ImportError as e:
            raise MidiUnavailable(
                f"MIDI is unavailable here: {e} (pip install python-rtmidi)"
            ) from None
        except Exception as e:  # rtmidi's SystemError / RuntimeError: no ALSA or JACK
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MidiUnavailable(
                f"MIDI is unavailable here ({self.name}: {first}). {HOW_TO_GET_MIDI}"
            ) from None

    def input_names(self) -> list[str]:
        return list(self._b.get_input_names())

    def output_names(self) -> list[str]:
        return list(self._b.get_output_names())

    def open_input(
        self, name: str, virtual: bool, client: str | None, callback: Callable[[mido.Message], None]
    ) -> Any:
        return self._b.open_input(
            name, virtual=virtual, callback=callback, **self._kw(client, virtual)
        )

    def open_output(self, name: str, virtual: bool, client: str | None) -> Any:
        return self._b.open_output(name, virtual=virtual, **self._kw(client, virtual))


CALLBACK_DRAIN_S = 0.1  # after an input's callback is cancelled: one in flight finishes


def close_port(port: Any) -> None:
    """Close a port opened by a backend; an rtmidi input stops calling Python first.

    rtmidi calls an input's callback from the MIDI system's thread (JACK's process thread),
    which then needs the GIL; python-rtmidi's close holds the GIL while it waits for the JACK
    server, and the server waits for that thread's cycle: a message arriving during the close
    can deadlock both (the likely cause of a bridge that did not exit after SIGTERM in CI; not
    reproduced). mido's
    own close re-registers its Python callback just before closing (mido 1.3, Input._close),
    so an rtmidi input is closed here: callback cancelled, the GIL let go for a moment so a
    call already under way finishes, then the port closed with nothing left to call."""
    if getattr(port, "closed", False):
        return
    rt = getattr(port, "_rt", None)
    if rt is None or not hasattr(rt, "cancel_callback"):
        port.close()
        return
    try:
        rt.cancel_callback()
        time.sleep(CALLBACK_DRAIN_S)
        rt.close_port()
        rt.delete()
    finally:
        port.closed = True


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """fd 2 to /dev/null for a moment (ALSA and JACK print to it from C)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class MemoryBackend:
    """In-memory ports for tests. `outputs[name]` collects what was sent to an output port;
    `play(name, msg)` delivers a message to the input port of that name (as rtmidi would, on
    another thread if asked); `vanish(name)` / `restore(name)` simulate a device unplugged."""

    name = "memory"

    def __init__(self, inputs: Iterable[str] = (), outputs: Iterable[str] = ()) -> None:
        self.available_in = list(inputs)
        self.available_out = list(outputs)
        self.sent: dict[str, list[mido.Message]] = {n: [] for n in self.available_out}
        self._callbacks: dict[str, Callable[[mido.Message], None]] = {}
        self.lock = threading.Lock()

    def input_names(self) -> list[str]:
        return list(self.available_in)

    def output_names(self) -> list[str]:
        return list(self.available_out)

    def open_input(
        self, name: str, virtual: bool, client: str | None, callback: Callable[[mido.Message], None]
    ) -> Any:
        if virtual:
            self.available_in.append(name)
        elif name not in self.available_in:
            raise OSError(f"unknown port {name!r}")
        self._callbacks[name] = callback
        backend = self

        class _In:
            closed = False

            def close(self) -> None:
                self.closed = True
                backend._callbacks.pop(name, None)

        return _In()

    def open_output(self, name: str, virtual: bool, client: str | None) -> Any:
        if virtual:
            self.available_out.append(name)
        elif name not in self.available_out:
            raise OSError(f"unknown port {name!r}")
        log = self.sent.setdefault(name, [])
        backend = self

        class _Out:
            closed = False

            def send(self, msg: mido.Message) -> None:
                if name in backend.available_out:  # a vanished device receives nothing
                    with backend.lock:
                        log.append(msg)

            def close(self) -> None:
                self.closed = True

        return _Out()

    def play(self, name: str, msg: mido.Message, thread: bool = False) -> None:
        cb = self._callbacks.get(name)
        if cb is None:
            raise OSError(f"input {name!r} is not open")
        if thread:  # like rtmidi: the callback runs on a foreign thread
            t = threading.Thread(target=cb, args=(msg,))
            t.start()
            t.join()
        else:
            cb(msg)

    def vanish(self, name: str) -> None:
        for names in (self.available_in, self.available_out):
            if name in names:
                names.remove(name)

    def restore(self, name: str, output: bool) -> None:
        (self.available_out if output else self.available_in).append(name)


def default_backend() -> Backend:
    return MidoBackend()


def resolve(names: list[str], query: str, kind: str) -> str:
    """The one port `query` names: an exact name, else a unique case-insensitive substring."""
    if query in names:
        return query
    hits = [n for n in names if query.lower() in n.lower()]
    if len(hits) == 1:
        return hits[0]
    available = ", ".join(repr(n) for n in names) or "none"
    if not hits:
        raise PortError(f"no MIDI {kind} matches {query!r}; available: {available}")
    raise PortError(
        f"MIDI {kind} {query!r} matches {len(hits)} ports: "
        f"{', '.join(repr(n) for n in hits)}; give more of the name"
    )


def list_ports(backend: Backend | None = None) -> tuple[list[str], list[str]]:
    """(inputs, outputs) as the backend names them."""
    b = backend or default_backend()
    return b.input_names(), b.output_names()
