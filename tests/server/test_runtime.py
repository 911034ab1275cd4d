"""The send clock: waking loop waiters at a deadline, and the spin before it."""

from __future__ import annotations

import asyncio
import time

from improv.server.runtime import SendClock


def test_wake_at_resolves_at_the_deadline_in_order() -> None:
    async def run() -> list[tuple[int, float]]:
        clock, loop, woke = SendClock(), asyncio.get_running_loop(), []
        try:
            t0 = time.perf_counter()
            futs = []
            for i, d in enumerate((0.03, 0.01, 0.02)):  # pushed out of order
                f = loop.create_future()
                f.add_done_callback(lambda _, i=i: woke.append((i, time.perf_counter() - t0)))
                clock.wake_at(t0 + d, f)
                futs.append(f)
            await asyncio.gather(*futs)
        finally:
            clock.close()
        return woke

    woke = asyncio.run(run())
    assert [i for i, _ in woke] == [1, 2, 0]
    for i, t in woke:
        assert t >= (0.03, 0.01, 0.02)[i]  # never early


def test_spin_until_only_short_waits_within_its_budget() -> None:
    clock = SendClock()
    try:
        assert not clock.spin_until(time.perf_counter() + 10 * clock.SPIN_S)  # too far: wait
        deadline = time.perf_counter() + clock.SPIN_S / 2
        assert clock.spin_until(deadline) and time.perf_counter() >= deadline
        # the budget (a share of each second) runs out, then it refuses until the next second
        spun = 0
        while clock.spin_until(time.perf_counter() + clock.SPIN_S * 0.9):
            spun += 1
            assert spun < 1000
        assert spun * clock.SPIN_S * 0.9 <= clock.SPIN_BUDGET + clock.SPIN_S
        time.sleep(1.0)
        assert clock.spin_until(time.perf_counter() + clock.SPIN_S / 2)
    finally:
        clock.close()
