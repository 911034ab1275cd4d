"""How late this machine wakes a real-time thread: the floor under the server's send jitter.

    .venv/bin/python benchmarks/rt_probe.py        # until SIGTERM / Ctrl-C, then one JSON line

A process of its own (no GIL shared with the server) at the priority the server's event loop and
send clock ask for (improv.server.realtime.promote: SCHED_FIFO 1), sleeps 1 ms at a time and records how much later than asked
it woke. A late wake here is the OS or the hypervisor (a vCPU taken away), not the server: what
the server's real-time threads cannot get under either. Without the right to real-time priority
it runs at normal priority and says so (`realtime: false`).
"""

from __future__ import annotations

import json
import signal
import sys
import time

from improv.server import realtime

SLEEP_S = 0.001
LATE_MS = 2.0  # #23's send jitter target


def main() -> None:
    promoted = realtime.promote("rt_probe") is not None
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    late: list[float] = []  # ms past the asked wake-up, every wake
    while not stop:
        t = time.monotonic()
        time.sleep(SLEEP_S)
        late.append((time.monotonic() - t - SLEEP_S) * 1000)
    late.sort()
    n = len(late)
    out = {
        "realtime": promoted,
        "wakes": n,
        "late_2ms": sum(1 for x in late if x > LATE_MS),
        "p99_ms": late[min(n - 1, int(0.99 * n))] if n else None,
        "max_ms": late[-1] if n else None,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
