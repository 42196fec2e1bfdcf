"""nimbus.wire.grpc.batch_asyncio_callbacks: ready asyncio callbacks run together, timers and trio
tasks still get their turn, and the loop still stops cleanly."""

from __future__ import annotations

import asyncio

import trio
import trio_asyncio

from nimbus.wire.grpc import ASYNCIO_BATCH, batch_asyncio_callbacks


async def _rounds_to_run(n: int) -> int:
    """How many times a trio task got to run while `n` asyncio callbacks, queued at once, ran."""
    done: list[int] = []
    rounds = 0
    async with trio_asyncio.open_loop() as loop:
        await trio.lowlevel.checkpoint()
        for i in range(n):
            loop.call_soon(done.append, i)
        while len(done) < n:
            rounds += 1
            await trio.lowlevel.checkpoint()
    assert done == list(range(n))
    return rounds


async def test_ready_callbacks_run_together_and_trio_tasks_still_run() -> None:
    batch_asyncio_callbacks()
    assert 1 <= await _rounds_to_run(3 * ASYNCIO_BATCH) <= 6  # ~3 batches; one round each before


async def test_timers_futures_and_stop_still_work() -> None:
    batch_asyncio_callbacks()
    batch_asyncio_callbacks()  # idempotent
    async with trio_asyncio.open_loop() as loop:

        async def aio() -> list[str]:
            seen: list[str] = []
            fut = loop.create_future()
            loop.call_later(0.05, seen.append, "timer")
            loop.call_soon(fut.set_result, "future")
            seen.append(await fut)
            await asyncio.sleep(0.1)
            return seen

        with trio.fail_after(5):
            assert await trio_asyncio.aio_as_trio(aio)() == ["future", "timer"]
