"""The per-stream structures made lighter for idle streams (issue #4): the pod's `Outbox` (in
place of asyncio.Queue) and the list-backed asyncio.Event grpclib's streams get. Both must behave
as what they replace; the memory itself is measured by `scripts/bench.py --phases conns`."""

from __future__ import annotations

import asyncio

import grpclib.protocol
import pytest

from nimbus.doorman.session import Close, Outbox
from nimbus.wire.grpc import _ListEvent, _SlimQueue, slim_grpclib_streams


def run(coro):
    return asyncio.run(coro)


def test_outbox_fifo_bounded_and_holds_no_deque_when_empty() -> None:
    box = Outbox(2)
    assert box.empty() and box.qsize() == 0 and box._items is None
    box.put_nowait((1, None))
    box.put_nowait((2, None))
    assert box.full() and box.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        box.put_nowait((3, None))
    assert box.get_nowait() == (1, None)
    assert box.get_nowait() == (2, None)
    assert box.empty() and box._items is None
    with pytest.raises(asyncio.QueueEmpty):
        box.get_nowait()
    unbounded = Outbox(0)
    for i in range(100):
        unbounded.put_nowait((i, None))
    assert unbounded.qsize() == 100 and not unbounded.full()


def test_outbox_get_waits_for_a_put() -> None:
    async def main() -> list[object]:
        box = Outbox(10)
        got: list[object] = []

        async def writer() -> None:
            for _ in range(3):
                got.append(await box.get())

        task = asyncio.ensure_future(writer())
        await asyncio.sleep(0)
        assert not got and box._waiter is not None
        box.put_nowait((1, None))
        await asyncio.sleep(0)
        close = Close("ABORTED", "x")
        box.put_nowait((2, None))
        box.put_nowait(close)
        await asyncio.wait_for(task, 5)
        assert box._waiter is None
        return got

    got = run(main())
    assert got[:2] == [(1, None), (2, None)] and isinstance(got[2], Close)


def test_outbox_cancelled_get_loses_nothing() -> None:
    async def main() -> None:
        box = Outbox(10)
        task = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        box.put_nowait((7, None))  # no waiter left to wake: stays queued
        assert box.qsize() == 1
        assert await asyncio.wait_for(box.get(), 5) == (7, None)

    run(main())


def test_list_event_behaves_as_asyncio_event() -> None:
    async def main() -> None:
        ev = _ListEvent()
        assert isinstance(ev, asyncio.Event) and isinstance(ev._waiters, list)
        assert not ev.is_set()
        woken: list[int] = []

        async def waiter(i: int) -> None:
            assert await ev.wait() is True
            woken.append(i)

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(3)]
        cancelled = asyncio.ensure_future(ev.wait())
        await asyncio.sleep(0)
        assert len(ev._waiters) == 4
        cancelled.cancel()
        await asyncio.sleep(0)
        assert len(ev._waiters) == 3
        ev.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert woken == [0, 1, 2] and not ev._waiters
        assert await ev.wait() is True  # set: no wait
        ev.clear()
        assert not ev.is_set()
        late = asyncio.ensure_future(ev.wait())
        await asyncio.sleep(0)
        assert not late.done()
        ev.set()
        assert await asyncio.wait_for(late, 5) is True

    run(main())


def test_slim_queue_behaves_as_asyncio_queue() -> None:
    async def main() -> None:
        q: asyncio.Queue[int] = _SlimQueue()
        assert isinstance(q, asyncio.Queue) and isinstance(q._getters, list)
        got: list[int] = []

        async def reader() -> None:
            for _ in range(3):
                got.append(await q.get())
                q.task_done()

        cancelled = asyncio.ensure_future(q.get())
        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)
        assert len(q._getters) == 2
        cancelled.cancel()
        await asyncio.sleep(0)
        assert len(q._getters) == 1
        for i in range(3):
            q.put_nowait(i)
        await asyncio.wait_for(task, 5)
        assert got == [0, 1, 2] and q.empty()
        await asyncio.wait_for(q.join(), 5)  # every item was task_done
        q.put_nowait(9)
        joined = asyncio.ensure_future(q.join())
        await asyncio.sleep(0)
        assert not joined.done()
        assert q.get_nowait() == 9
        q.task_done()
        await asyncio.wait_for(joined, 5)
        bounded: asyncio.Queue[int] = _SlimQueue(1)
        bounded.put_nowait(1)
        putter = asyncio.ensure_future(bounded.put(2))
        await asyncio.sleep(0)
        assert not putter.done() and len(bounded._putters) == 1
        assert bounded.get_nowait() == 1
        await asyncio.wait_for(putter, 5)
        assert bounded.get_nowait() == 2

    run(main())


def test_grpclib_streams_get_slim_events_and_queues() -> None:
    original = grpclib.protocol.Event, grpclib.protocol.Queue
    try:
        slim_grpclib_streams()
        slim_grpclib_streams()  # idempotent
        assert grpclib.protocol.Event is _ListEvent and grpclib.protocol.Queue is _SlimQueue
        buffer = grpclib.protocol.Buffer(lambda n: None)
        assert isinstance(buffer._unacked, _SlimQueue)
    finally:
        grpclib.protocol.Event, grpclib.protocol.Queue = original  # type: ignore[misc]
