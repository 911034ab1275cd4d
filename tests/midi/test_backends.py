"""midi/backends.py: closing an rtmidi input never leaves Python callable from the MIDI
system's thread while rtmidi's close waits on the server (the order is the fix; a real JACK
close is exercised by tests/clients/test_bridge.py)."""

from __future__ import annotations

from improv.midi import backends
from improv.midi.backends import close_port


class FakeRt:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def cancel_callback(self) -> None:
        self.log.append("cancel_callback")

    def set_callback(self, fn) -> None:  # noqa: ANN001
        self.log.append("set_callback")

    def close_port(self) -> None:
        self.log.append("close_port")

    def delete(self) -> None:
        self.log.append("delete")


class FakeMidoInput:
    """mido 1.3's rtmidi Input: its own close re-registers its Python callback first."""

    def __init__(self, log: list[str]) -> None:
        self._rt = FakeRt(log)
        self.closed = False
        self.log = log

    def close(self) -> None:
        self._rt.cancel_callback()
        self._rt.set_callback(None)
        self._rt.close_port()
        self._rt.delete()
        self.closed = True


def test_an_rtmidi_input_is_closed_with_its_callback_cancelled_first(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(backends.time, "sleep", slept.append)
    log: list[str] = []
    port = FakeMidoInput(log)
    close_port(port)
    assert log == ["cancel_callback", "close_port", "delete"]  # no callback set again
    assert slept == [backends.CALLBACK_DRAIN_S] and port.closed
    close_port(port)  # twice: nothing more
    assert log == ["cancel_callback", "close_port", "delete"]


def test_other_ports_close_their_own_way():
    closed = []

    class Out:
        closed = False

        def close(self) -> None:
            closed.append(True)

    close_port(Out())
    assert closed == [True]
