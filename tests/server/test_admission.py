"""GenerationGate: slots, a bounded queue with a wait limit, Retry-After (#22 item 8)."""

from __future__ import annotations

import asyncio

import pytest

from improv.server.admission import Busy, GenerationGate


def test_slots_then_the_queue_then_busy():
    async def main() -> None:
        gate = GenerationGate(slots=1, queue=1, wait_s=5.0)
        first = await gate.acquire()
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        assert gate.waiting == 1 and not waiting.done()
        with pytest.raises(Busy, match="queue is full") as e:  # the queue holds one
            await gate.acquire()
        assert 1 <= e.value.retry_after <= 120
        first.release()
        second = await asyncio.wait_for(waiting, 1)  # handed the slot, first come first served
        assert gate.running == 1 and gate.waiting == 0
        second.release()
        second.release()  # safe twice
        assert gate.running == 0

    asyncio.run(main())


def test_the_wait_is_bounded_and_a_gone_client_leaves_the_queue():
    async def main() -> None:
        gate = GenerationGate(slots=1, queue=4, wait_s=0.1)
        lease = await gate.acquire()
        with pytest.raises(Busy, match="within 0.1 s"):
            await gate.acquire()
        gone = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while waiting
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert gate.waiting == 0
        lease.release()
        assert gate.running == 0
        (await gate.acquire()).release()

    asyncio.run(main())


def test_retry_after_grows_with_the_queue():
    gate = GenerationGate(slots=2, queue=10, wait_s=1.0)
    short = gate.retry_after()
    gate._waiters.extend([None] * 9)  # type: ignore[list-item]
    assert gate.retry_after() > short
