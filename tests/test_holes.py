"""The nine holes of the original (../shared/DESIGN.md), one named test each, reproducing the
scenario against the whole system (in-memory engine and, where marked, the real brokers through
both Kafka adapters: kafka-python and librdkafka).

Where a hole is closed by pure logic, the scenario is also pinned in tests/test_lifecycle.py and
tests/test_router_window.py; these tests show it end to end.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from nimbus.core.lifecycle import Status
from nimbus.engines.murmur2 import partition_for
from nimbus.proto_gen.nimbus import ResponseKind
from tests.harness import real_engine
from tests.test_pipeline import P2, cluster, wait_status
from tests.wire import open_stream


@pytest.fixture(
    params=[
        "memory",
        pytest.param("kafka-python", marks=pytest.mark.integration),
        pytest.param("librdkafka", marks=pytest.mark.integration),
    ]
)
def engine(request: pytest.FixtureRequest, unique: str) -> dict[str, Any]:
    """The in-memory engine, then the real brokers through each Kafka adapter: a hole closed
    on one client library must stay closed on the other."""
    if request.param == "memory":
        return {"engine": "memory"}
    brokers = request.getfixturevalue("kafka_brokers")
    redis = request.getfixturevalue("redis_address")
    return {**real_engine(brokers, redis, unique), "kafka_client": request.param}


def same_partition_ids(prefix: str, partitions: int, n: int) -> list[str]:
    """n client ids that Kafka's partitioner puts on one partition."""
    ids: list[str] = []
    target = None
    i = 0
    while len(ids) < n:
        cid = f"{prefix}-{i}"
        p = partition_for(cid.encode(), partitions)
        if target is None:
            target = p
        if p == target:
            ids.append(cid)
        i += 1
    return ids


async def send_and_leave(port: int, cid: str, numbers: range) -> None:
    """Send events, wait for their receipts (so they are durable), leave without reading results."""
    async with open_stream(port, {"client_id": cid, **P2}) as st:
        for n in numbers:
            await st.event("sq", n, seq=n)
        receipts = 0
        while receipts < len(numbers):
            r = await st.recv()
            assert r is not None
            if r.kind == ResponseKind.RECEIPT:
                receipts += 1


async def test_hole1_results_for_a_client_that_dropped_are_not_lost(
    engine: dict[str, Any], unique: str
) -> None:
    """Original: the result consumer commits after PUBLISH; a pod without the stream drops it."""
    cid = f"h1-{unique}"
    with trio.fail_after(90):
        async with cluster(engine, pods=2) as c:
            await send_and_leave(c.ports[0], cid, range(1, 51))
            async with open_stream(c.ports[1], {"client_id": cid, **P2}) as st:
                got = await st.results(50)
            assert [r.number for r in got] == list(range(1, 51))


async def test_hole2_one_clients_replay_never_consumes_anothers_backlog(
    engine: dict[str, Any], unique: str
) -> None:
    """Original: the replay commits one offset per DLQ partition for all clients, so A's acks
    mark B's undelivered messages on the same partition consumed."""
    a, b = same_partition_ids(f"h2-{unique}", engine.get("kafka_partitions", 8), 2)
    with trio.fail_after(120):
        async with cluster(engine) as c:
            # Both away with backlogs interleaved on one DLQ partition.
            for n in range(1, 31):
                await send_and_leave(c.ports[0], a if n % 2 else b, range(n, n + 1))
            await wait_status(c, a, Status.OFFLINE)
            await wait_status(c, b, Status.OFFLINE)
            async with open_stream(c.ports[0], {"client_id": a, **P2}) as st:
                got_a = await st.results(15)
                await wait_status(c, a, Status.LIVE)
            async with open_stream(c.ports[0], {"client_id": b, **P2}) as st:
                got_b = await st.results(15)
                await wait_status(c, b, Status.LIVE)
            assert [r.number for r in got_a] == list(range(1, 31, 2))
            assert [r.number for r in got_b] == list(range(2, 31, 2))


async def test_hole3_result_for_an_old_pod_reaches_the_client_on_its_new_pod(
    engine: dict[str, Any], unique: str
) -> None:
    """Original: a LIVE client whose result names its old pod is diverted to the DLQ, which only
    replays REPLAYING clients: stranded. Here results carry pod0 (where the events came from)
    while the client is LIVE on pod1."""
    cid = f"h3-{unique}"
    with trio.fail_after(90):
        async with cluster(engine, pods=2, roles=("replay", "status")) as c:
            await send_and_leave(c.ports[0], cid, range(1, 21))  # processed later, naming pod0
            async with open_stream(c.ports[1], {"client_id": cid, **P2}) as st:
                await wait_status(c, cid, Status.LIVE)
                from nimbus.workers.event_consumer import EventConsumer
                from nimbus.workers.router import ResultRouter

                c.nursery.start_soon(EventConsumer(c.settings, c.engine.log, c.counters).run)
                c.nursery.start_soon(
                    ResultRouter(c.settings, c.engine.log, c.engine.state, c.counters).run
                )
                got = await st.results(20)
            assert [r.number for r in got] == list(range(1, 21))


async def test_hole4_nothing_lands_in_the_dlq_behind_a_live_client(
    engine: dict[str, Any], unique: str
) -> None:
    """Original: check-then-set; a result routed to the DLQ between the lag check and SET LIVE
    lands behind a LIVE client. Here the route decision raises routed_dlq atomically, so the
    flip waits for it."""
    cid = f"h4-{unique}"
    with trio.fail_after(60):
        async with cluster(engine, roles=()) as c:
            state = c.engine.state
            await state.connect(cid, "pod-x")
            await state.disconnect(cid, 1)
            [d1] = await state.route([(cid, 5)])
            res = await state.connect(cid, "pod-y")
            assert res.status is Status.REPLAYING
            await state.ack([__import__("nimbus.ports", fromlist=["AckItem"]).AckItem(cid, 5)])
            [d2] = await state.route([(cid, 6)])  # decided while REPLAYING: DLQ, not yet written
            assert (d1.route.value, d2.route.value) == ("DLQ", "DLQ")
            assert await state.try_flip([cid]) == [False]
            rec = await state.get(cid)
            assert rec is not None and rec.status is Status.REPLAYING and rec.routed_dlq == 6


async def test_hole5_replay_reads_the_partition_the_producer_wrote(
    engine: dict[str, Any], unique: str
) -> None:
    """Original: the lag check hashed with FNV-1a while the producer used murmur2."""
    with trio.fail_after(60):
        async with cluster(engine, roles=()) as c:
            log = c.engine.log
            ids = [f"h5-{unique}-{i}" for i in range(40)]
            written = await log.producer.send_batch(
                c.settings.kafka_dlq_topic, [(i.encode(), b"x") for i in ids]
            )
            for cid, w in zip(ids, written, strict=True):
                assert (
                    log.producer.partition_for(c.settings.kafka_dlq_topic, cid.encode())
                    == w.partition
                )
                assert partition_for(cid.encode(), c.settings.kafka_partitions) == w.partition


async def test_hole6_replaying_client_goes_live_under_steady_traffic_from_others(
    engine: dict[str, Any], unique: str
) -> None:
    """Original: lags per partition, checked once a minute: with other clients busy on the same
    partition, a replaying client may never be LIVE again. Here the check is per client."""
    a, b = same_partition_ids(f"h6-{unique}", engine.get("kafka_partitions", 8), 2)
    with trio.fail_after(120):
        async with cluster(engine) as c:
            await send_and_leave(c.ports[0], a, range(1, 21))
            await wait_status(c, a, Status.OFFLINE)
            async with (
                trio.open_nursery() as n,
                open_stream(c.ports[0], {"client_id": b, **P2}) as busy,
            ):
                stop = trio.Event()

                async def traffic() -> None:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        await busy.event("sq", i % 1000, seq=i)
                        await trio.sleep(0.005)

                async def drain_b() -> None:
                    while not stop.is_set():
                        r = await busy.recv()
                        if r is not None and r.kind == ResponseKind.RESULT:
                            await busy.ack(r.delivery_id)

                n.start_soon(traffic)
                n.start_soon(drain_b)
                async with open_stream(c.ports[0], {"client_id": a, **P2}) as st:
                    got = await st.results(20)
                    acked_at = trio.current_time()
                    await wait_status(c, a, Status.LIVE, timeout=20)
                    took = trio.current_time() - acked_at
                stop.set()
                n.cancel_scope.cancel()
            assert [r.number for r in got] == list(range(1, 21))
            print(f"hole6: LIVE {took * 1000:.0f} ms after the last ack, under traffic")


async def test_hole7_unacked_results_are_redelivered_with_the_same_ids(
    engine: dict[str, Any], unique: str
) -> None:
    """Original: "delivered" = handed to the send buffer. A protocol-2 result counts as delivered
    only when acked: received-but-unacked results come again after a reconnect, same ids."""
    cid = f"h7-{unique}"
    with trio.fail_after(90):
        async with cluster(engine, pods=2) as c:
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                for n in range(1, 11):
                    await st.event("sq", n, seq=n)
                seen = await st.results(10, ack=False)
            async with open_stream(c.ports[1], {"client_id": cid, **P2}) as st:
                again = await st.results(10)
            assert [r.delivery_id for r in again] == [r.delivery_id for r in seen]
            assert [r.number for r in again] == list(range(1, 11))


async def test_hole8_first_streams_end_does_not_mark_the_second_offline(
    engine: dict[str, Any], unique: str
) -> None:
    cid = f"h8-{unique}"
    with trio.fail_after(60):
        async with cluster(engine, pods=1) as c:
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as first:
                await first.event("sq", 1, seq=1)
                await first.results(1)
                async with open_stream(c.ports[0], {"client_id": cid, **P2}) as second:
                    await trio.sleep(0.3)  # the first stream is closed by now
                    rec = await c.engine.state.get(cid)
                    assert rec is not None and rec.status is Status.LIVE and rec.epoch == 2
                    await second.event("sq", 9, seq=1)
                    [r] = await second.results(1)
                    assert r.result == 81


async def test_hole9_failed_produce_is_reported_not_dropped(unique: str) -> None:
    """Original: failed Kafka produces (and unknown events, and int32 overflow) vanish silently.
    Here a failed produce fails the stream with UNAVAILABLE (both protocols), so the client
    resends what was not receipted, in order. Overflow and unknown events:
    tests/test_pipeline.py::test_receipts_errors_and_overflow."""
    from grpclib.const import Status as GStatus
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            producer = c.engine.log.producer
            for md in ({"client_id": f"h9a-{unique}", **P2}, {"client_id": f"h9b-{unique}"}):
                async with open_stream(c.ports[0], md) as st:
                    producer.fail_next = 1  # type: ignore[attr-defined]
                    await st.event("sq", 3, seq=1)
                    with pytest.raises((GRPCError, StreamTerminatedError)) as e:
                        while (r := await st.recv()) is not None:
                            assert r.kind != ResponseKind.RECEIPT, "a failed event was receipted"
                    if isinstance(e.value, GRPCError):
                        assert e.value.status is GStatus.UNAVAILABLE
                async with open_stream(c.ports[0], md) as st:
                    await st.event("sq", 3, seq=1)  # the resend goes through
                    [res] = await st.results(1, ack="nimbus-protocol" in md)
                    assert res.result == 9


async def test_listeners_resubscribe_when_the_state_store_drops_them(unique: str) -> None:
    """Redis drops pub/sub subscribers with their connection (restart, CLIENT KILL). Every
    listener (pods, router, replay, status manager) must come back, not die."""
    cid = f"resub-{unique}"
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, pods=2) as c:
            state = c.engine.state
            assert state.break_subscriptions() >= 6  # type: ignore[attr-defined]
            await trio.sleep(0.5)  # listeners back off 0.1 s, then resubscribe
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                await st.event("sq", 12, seq=1)
                [r] = await st.results(1)
                assert r.result == 144
            await send_and_leave(c.ports[0], cid, range(2, 6))
            async with open_stream(c.ports[1], {"client_id": cid, **P2}) as st:
                got = await st.results(4)
                await wait_status(c, cid, Status.LIVE)
            assert [r.number for r in got] == [2, 3, 4, 5]


async def test_a_replay_that_loses_the_state_store_is_retried_not_fatal(unique: str) -> None:
    """A state-store error inside one replay ends that replay (the client stays REPLAYING and a
    new replay resumes from its cursor); it must not take the worker down."""
    cid = f"retry-{unique}"
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            state = c.engine.state
            await send_and_leave(c.ports[0], cid, range(1, 301))
            await wait_status(c, cid, Status.OFFLINE)
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                first = await st.results(10)
                state.down = True  # type: ignore[attr-defined]
                await trio.sleep(0.3)
                state.down = False  # type: ignore[attr-defined]
                rest = await st.results(290)
                await wait_status(c, cid, Status.LIVE)
            numbers = [r.number for r in first + rest]
            assert sorted(set(numbers)) == list(range(1, 301))
            firsts = list(dict.fromkeys(numbers))
            assert firsts == sorted(firsts)


async def test_original_client_gets_results_in_order_across_a_reconnect(
    engine: dict[str, Any], unique: str
) -> None:
    """A client built from the original proto (no acks, no delivery ids) sends, drops before its
    results exist, and comes back on the other pod: it gets every result, in order, from the
    replay (for it, "delivered" means written to its stream)."""
    cid = f"orig-move-{unique}"
    with trio.fail_after(90):
        async with cluster(engine, pods=2, roles=("replay", "status")) as c:
            async with open_stream(c.ports[0], {"client_id": cid}) as st:
                for n in range(1, 31):
                    await st.event("sq", n)
                await trio.sleep(0.3)  # the events reach Kafka; the stream then drops
            await wait_status(c, cid, Status.OFFLINE)
            from nimbus.workers.event_consumer import EventConsumer
            from nimbus.workers.router import ResultRouter

            c.nursery.start_soon(EventConsumer(c.settings, c.engine.log, c.counters).run)
            c.nursery.start_soon(
                ResultRouter(c.settings, c.engine.log, c.engine.state, c.counters).run
            )
            async with open_stream(c.ports[1], {"client_id": cid}) as st:
                got = await st.results(30, ack=False)
                await wait_status(c, cid, Status.LIVE)
            assert [(r.number, r.result) for r in got] == [(n, n * n) for n in range(1, 31)]
            assert all(r.delivery_id == 0 for r in got)  # only the original's fields
