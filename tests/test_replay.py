"""The replay service's shared parts, driven directly on the in-memory engine: one fetch per
partition for many replays, shared waits at a partition's end, batched cursor writes, and the
cursor frozen once a delivery failed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from nimbus import config
from nimbus.engines.memory import MemoryLog, MemoryReader, MemoryState
from nimbus.wire.messages import ReportItem
from nimbus.workers.replay import ReplayService
from nimbus.workers.replay_pipeline import ReplayPipeline, _Run
from tests.test_holes import same_partition_ids


class CountingLog(MemoryLog):
    """A memory log whose readers count the fetches that reach it."""

    def __init__(self) -> None:
        super().__init__(default_partitions=4)
        self.fetches: list[int] = []  # offsets asked for
        self.readers = 0

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[MemoryReader]:
        log = self

        class Counting(MemoryReader):
            async def fetch(
                self, topic: str, partition: int, offset: int, max_records: int, timeout: float
            ) -> Any:
                log.fetches.append(offset)
                return await super().fetch(topic, partition, offset, max_records, timeout)

        self.readers += 1
        yield Counting(self)


async def service(log: MemoryLog | None = None) -> tuple[ReplayService, MemoryLog, MemoryState]:
    s = config.load(env={}, dotenv=False)
    log = log or MemoryLog(default_partitions=4)
    state = MemoryState()
    await log.ensure_topics([s.kafka_dlq_topic], 4)
    return ReplayService(s, log, state), log, state


async def test_replays_of_one_partition_share_one_fetch_and_one_reader() -> None:
    svc, log, _ = await service(CountingLog())
    a, b = same_partition_ids("share", 4, 2)
    await log.producer.send_batch(
        svc.s.kafka_dlq_topic, [(cid.encode(), b"r") for cid in (a, b, a, b)]
    )
    pa = ReplayPipeline(svc, a, 1, "pod", 0, 0)
    pb = ReplayPipeline(svc, b, 1, "pod", 0, 0)
    assert pa.partition == pb.partition
    got: dict[str, list[int]] = {}

    async def read(p: ReplayPipeline) -> None:
        async with svc._feed(p.partition):
            got[p.client_id] = [r.offset for r in await svc.fetch(p, 0, 500, 0.1)]

    async with trio.open_nursery() as n:
        n.start_soon(read, pa)
        n.start_soon(read, pb)
    assert got == {a: [0, 1, 2, 3], b: [0, 1, 2, 3]}
    assert isinstance(log, CountingLog) and log.fetches == [0] and log.readers == 1
    assert svc.counters["replay.fetch_own"] == 1 and svc.counters["replay.fetch_shared"] == 1


async def test_waits_at_a_partitions_end_poll_once() -> None:
    svc, log, _ = await service(CountingLog())
    a, b, c = same_partition_ids("end", 4, 3)
    pipes = [ReplayPipeline(svc, cid, 1, "pod", 0, 0) for cid in (a, b, c)]
    empty: list[int] = []

    async def wait_at_end(p: ReplayPipeline) -> None:
        async with svc._feed(p.partition):
            empty.append(len(await svc.fetch(p, 0, 500, 0.1)))

    async with trio.open_nursery() as n:
        for p in pipes:
            n.start_soon(wait_at_end, p)
    assert empty == [0, 0, 0]
    assert isinstance(log, CountingLog) and log.fetches == [0]  # one poll for the three waits


async def test_cursor_writes_of_all_replays_go_out_together() -> None:
    svc, _, state = await service()
    calls: list[list[tuple[str, int]]] = []
    real = state.advance_cursor

    async def advance_cursor(items: Any) -> None:
        calls.append(sorted(items))
        await real(items)

    state.advance_cursor = advance_cursor  # type: ignore[method-assign]
    for cid in ("a", "b", "c"):
        await state.connect(cid, "pod")
    svc.advance_cursor("a", 5)
    svc.advance_cursor("b", 7)
    svc.advance_cursor("a", 3)  # behind what is queued: the cursor never goes back
    svc.advance_cursor("c", 1)
    async with trio.open_nursery() as n:
        n.start_soon(svc._cursor_writer)
        await trio.testing.wait_all_tasks_blocked()
        n.cancel_scope.cancel()
    assert calls == [[("a", 5), ("b", 7), ("c", 1)]]
    rec = await state.get("a")
    assert rec is not None and rec.cursor == 5


async def test_a_failed_delivery_freezes_the_cursor() -> None:
    """The stream went away: the failed deliveries leave the window, and a stage already woken
    (here: the publish stage finishing an empty batch) must not count them as delivered."""
    svc, _, _ = await service()
    p = ReplayPipeline(svc, "x", 1, "pod", 0, 0)
    tokens = []
    for off in (3, 4):
        t = svc.new_token(p)
        p.unconfirmed[t] = _Run(off, 1, off)
        tokens.append(t)
    p.published_to = p.fetched_to = 10
    with trio.CancelScope() as cs:
        async with trio.open_nursery() as n:
            n.start_soon(p._ack, cs)
            await p.reports_send.send(
                [ReportItem(token=tokens[0], delivered=False, client_id="x", delivery_id=3)]
            )
    assert cs.cancel_called
    p._advance()  # what the publish stage does after an empty batch
    assert p.cursor == 0 and svc._cursors == {}


# -- refusals and stalls (issue #13): every refusal leads to a change, every retry backs off ---


def _ended(svc: ReplayService, p: ReplayPipeline, fault: str, delivered: int = 0) -> None:
    p.fault, p.delivered = fault, delivered
    svc._ended(p)


async def test_replays_that_end_by_a_fault_back_off_and_a_stall_is_reported_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    svc, _, _ = await service()
    svc.s = config.load(env={}, dotenv=False, stall_ms=5_000)
    waits = []
    for _ in range(8):
        p = ReplayPipeline(svc, "x", 3, "pod", 0, 0)
        _ended(svc, p, "a delivery failed")
        r = svc._retry["x"]
        waits.append(round(r.not_before - trio.current_time(), 2))
        await trio.sleep_until(r.not_before)
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert svc.counters["replay.stalled"] == 1 and svc.stalled() == 1  # reported once
    # Progress (a replay that delivered something) resets the back-off and the report.
    _ended(svc, ReplayPipeline(svc, "x", 3, "pod", 0, 0), "a delivery failed", delivered=5)
    assert svc._retry["x"].failures == 1 and svc.stalled() == 0
    # A replay that ended without a fault (flipped LIVE, client left) forgets the client.
    _ended(svc, ReplayPipeline(svc, "x", 3, "pod", 0, 0), "")
    assert "x" not in svc._retry


async def test_a_refused_run_makes_the_next_replay_send_one_result_per_delivery() -> None:
    svc, _, _ = await service()
    p = ReplayPipeline(svc, "x", 3, "pod", 0, 0)
    assert p.run_max > 1
    p.refused = "run of x: 2 ids, 1 heads, 2 logs"
    _ended(svc, p, "a pod refused a delivery")
    assert svc.counters["replay.refused"] == 1 and svc._retry["x"].singles
    # The next replay of this epoch is built with singles (see ReplayService._start).
    assert ReplayPipeline(svc, "x", 3, "pod", 0, 0, singles=True).run_max == 1
    # A new epoch (the client reconnected) starts afresh.
    _ended(svc, ReplayPipeline(svc, "x", 4, "pod", 0, 0), "a delivery failed")
    assert not svc._retry["x"].singles


async def test_a_replay_with_nothing_confirmed_within_the_delivery_timeout_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lost delivery message (or its lost report) must not hold a replay for ever."""
    svc, _, _ = await service()
    svc.s = config.load(env={}, dotenv=False, delivery_timeout_ms=2_000)
    p = ReplayPipeline(svc, "x", 1, "pod", 0, 0)
    t = svc.new_token(p)
    p.unconfirmed[t] = _Run(0, 10, 10)
    p.progress_at = trio.current_time()
    with trio.CancelScope() as cs:
        await p._watchdog(cs)
    assert cs.cancel_called and p.stopped and "no delivery confirmed" in p.fault
    assert 2.0 < trio.current_time() <= 2.6


async def test_a_dlq_write_notice_ends_a_replays_wait_at_the_partitions_end() -> None:
    """A reconnecting client's replay often starts before the results on their way to its old
    pod are diverted: it waits at the DLQ partition's end. The router's notice (DLQ_WRITES)
    must end that wait now, not after it (here 30 s, so a missed wake-up fails the test), and
    the partition's end seen before must be forgotten, or the next read would wait again."""
    svc, log, _ = await service(CountingLog())
    a, b = same_partition_ids("nudge", 4, 2)
    pa = ReplayPipeline(svc, a, 1, "pod", 0, 0)
    svc.active = {a: pa, b: ReplayPipeline(svc, b, 1, "pod", 0, 0)}  # b: not waiting, no harm
    got: dict[str, list[int]] = {}

    async def read(p: ReplayPipeline) -> None:
        async with svc._feed(p.partition):
            assert await svc.fetch(p, 0, 500, 30) == []  # at the end: waits
            got[p.client_id] = [r.offset for r in await svc.fetch(p, 0, 500, 30)]

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(read, pa)
            await trio.sleep(0.2)  # past its short poll at the end (_END_POLL_S): it sleeps
            await log.producer.send_batch(svc.s.kafka_dlq_topic, [(a.encode(), b"r")])
            await svc._on_dlq_writes(f"{a}\nsomeone-else".encode())
    assert got == {a: [0]}
    assert isinstance(log, CountingLog) and log.fetches == [0, 0]


async def test_the_router_sends_a_notice_after_each_dlq_write() -> None:
    """Results of a client that left go to the DLQ; each write is followed by a notice naming
    the clients written for (the replays' wake-up)."""
    from nimbus.subscriptions import listen
    from nimbus.wire.pod_channel import DLQ_WRITES
    from tests.test_holes import send_and_leave
    from tests.test_pipeline import cluster

    notices: list[bytes] = []
    came = trio.Event()

    async def handle(payload: bytes) -> None:
        notices.append(payload)
        came.set()

    with trio.fail_after(20):
        async with cluster({"engine": "memory"}) as c:
            await c.nursery.start(listen, c.engine.state, DLQ_WRITES, handle)
            await send_and_leave(c.ports[0], "gone", range(1, 6))
            await came.wait()
            c.nursery.cancel_scope.cancel()
    assert set(b"\n".join(notices).split(b"\n")) == {b"gone"}
