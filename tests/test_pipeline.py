"""Every role together: the full path on the in-memory engine, and the same scenarios on the real
Kafka + Redis (marker `integration`).

Clients here are bare wire streams (tests/wire.py) so the tests see exactly what the server
sends: results, receipts, errors, delivery ids.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_asyncio

from nimbus.core.lifecycle import Status
from nimbus.proto_gen.nimbus import ErrorCode, EventResponse, ResponseKind
from tests.harness import Cluster, open_cluster, real_engine
from tests.wire import open_stream

P2 = {"nimbus-protocol": "2"}


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, unique: str) -> dict[str, Any]:
    if request.param == "memory":
        return {"engine": "memory"}
    brokers = request.getfixturevalue("kafka_brokers")
    redis = request.getfixturevalue("redis_address")
    return real_engine(brokers, redis, unique)


@asynccontextmanager
async def cluster(engine: dict[str, Any], pods: int = 1, **kw: Any) -> AsyncIterator[Cluster]:
    async with (
        trio_asyncio.open_loop(),
        open_cluster(
            pods=pods, delivery_timeout_ms=2000, status_interval_ms=200, **engine, **kw
        ) as c,
    ):
        yield c


async def wait_status(c: Cluster, client_id: str, status: Status, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while True:
            rec = await c.engine.state.get(client_id)
            if rec is not None and rec.status is status:
                return
            await trio.sleep(0.02)


async def wait_acked(c: Cluster, client_id: str, delivery_id: int, timeout: float = 10) -> None:
    """Until the client's ack of `delivery_id` is in its record (the pod stores acks in batches;
    an ack sent just before the stream closes may otherwise never land)."""
    with trio.fail_after(timeout):
        while True:
            rec = await c.engine.state.get(client_id)
            if rec is not None and rec.acked >= delivery_id:
                return
            await trio.sleep(0.02)


async def test_original_client_gets_squares_in_order(engine: dict[str, Any], unique: str) -> None:
    with trio.fail_after(60):
        async with (
            cluster(engine) as c,
            open_stream(c.ports[0], {"client_id": f"orig-{unique}"}) as st,
        ):
            for n in range(1, 11):
                await st.event("sq", n)
            got = await st.results(10, ack=False)
            assert [(r.number, r.result) for r in got] == [(n, n * n) for n in range(1, 11)]
            # The original's client sees only the original's fields.
            assert all(r.delivery_id == 0 and r.kind == ResponseKind.RESULT for r in got)
            assert [s.service_name for s in got[0].log.steps] == [
                "server",
                "event-consumer",
                "result-router",
                "server",
            ]


async def test_receipts_errors_and_overflow(engine: dict[str, Any], unique: str) -> None:
    with trio.fail_after(60):
        async with (
            cluster(engine) as c,
            open_stream(c.ports[0], {"client_id": f"p2-{unique}", **P2}) as st,
        ):
            await st.event("sq", 3, seq=1)
            await st.event("cube", 3, seq=2)  # unknown: an error, and the stream stays open
            await st.event("sq", 46341, seq=3)  # 46341**2 does not fit int32 (hole 9)
            await st.event("sq", -46340, seq=4)  # fits exactly
            seen: dict[int, list[EventResponse]] = {}
            res: list[EventResponse] = []
            while len(res) < 3:
                r = await st.recv()
                assert r is not None
                if r.kind == ResponseKind.RESULT:
                    res.append(r)
                    await st.ack(r.delivery_id)
                else:
                    seen.setdefault(r.seq, []).append(r)
            assert (
                seen[2][0].kind == ResponseKind.ERROR
                and seen[2][0].error.code == ErrorCode.UNKNOWN_EVENT
            )
            receipts = {
                s: rs[0].delivery_id for s, rs in seen.items() if rs[0].kind == ResponseKind.RECEIPT
            }
            assert set(receipts) == {1, 3, 4}
            assert [r.delivery_id for r in res] == [receipts[1], receipts[3], receipts[4]]
            assert res[0].result == 9 and res[0].error.code == ErrorCode.UNSPECIFIED
            assert res[1].error.code == ErrorCode.OUT_OF_RANGE and res[1].result == 0
            assert res[2].result == 46340 * 46340


async def test_disconnect_then_reconnect_elsewhere_replays_in_order(
    engine: dict[str, Any], unique: str
) -> None:
    """The README's promise: 1..N, a disconnect half-way, a reconnect on the other pod; every
    result arrives, first deliveries in order, and the client is LIVE again."""
    cid, n = f"mover-{unique}", 200
    with trio.fail_after(120):
        async with cluster(engine, pods=2) as c:
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                for i in range(1, n + 1):
                    await st.event("sq", i, seq=i)
                first = await st.results(20)
                # The 20 taken are confirmed before it goes (else the last may come again).
                await wait_acked(c, cid, first[-1].delivery_id)
            # Gone with ~180 results still coming: they must land in the DLQ.
            await wait_status(c, cid, Status.OFFLINE)
            async with open_stream(c.ports[1], {"client_id": cid, **P2}) as st2:
                rest = await st2.results(n - 20)
                await wait_status(c, cid, Status.LIVE)
                # Live again: a new event comes straight through.
                await st2.event("sq", n + 1, seq=n + 1)
                [live] = await st2.results(1)
            got = first + rest
            assert [r.number for r in got] == list(range(1, n + 1))
            ids = [r.delivery_id for r in got]
            assert ids == sorted(ids) and len(set(ids)) == n
            assert live.number == n + 1 and live.delivery_id > ids[-1]
            # Every hop's trace step, the delivering pod's last (appended on the wire), in order.
            for r, sender in (
                (first[0], ("result-router", "route")),
                (rest[-1], ("replay", "replay")),
                (live, ("result-router", "route")),
            ):
                steps = [(st.service_name, st.method_name) for st in r.log.steps]
                assert steps[0] == ("server", "ProcessEvent") and steps[-2:] == [
                    sender,
                    ("server", "deliver"),
                ], steps
                times = [st.timestamp for st in r.log.steps]  # datetimes (betterproto)
                assert times == sorted(times) and times[0].year >= 2024, times
            assert c.counters["router.dlq"] > 0  # the missed results did go through the DLQ


async def test_a_partly_acked_pack_replays_from_the_first_unacked_result(
    engine: dict[str, Any], unique: str
) -> None:
    """The DLQ holds a client's results several to a record (NIMBUS_DLQ_PACK). A client that
    acks part of a pack and leaves gets exactly the rest, in order, on its next stream: the
    cursor stays on a pack until all of it is confirmed, and what is acked is not sent again."""
    cid, n = f"pack-{unique}", 40
    with trio.fail_after(120):
        async with cluster(engine, pods=2, dlq_pack=16) as c:
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                for i in range(1, n + 1):
                    await st.event("sq", i, seq=i)
                ids: list[int] = []
                while len(ids) < n:  # every event durable, then away before any result is read
                    r = await st.recv()
                    assert r is not None
                    if r.kind == ResponseKind.RECEIPT:
                        ids.append(r.delivery_id)
            with trio.fail_after(30):  # all of them in the DLQ
                while (rec := await c.engine.state.get(cid)) is None or rec.dlq_written < max(ids):  # noqa: ASYNC110 (a store to poll)
                    await trio.sleep(0.05)
            async with open_stream(c.ports[1], {"client_id": cid, **P2}) as st2:
                first = await st2.results(20, ack=False)
                await st2.ack(first[11].delivery_id)  # results 1..12 confirmed, 13..20 not
                await wait_acked(c, cid, first[11].delivery_id)
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st3:
                rest = await st3.results(n - 12)
                await wait_status(c, cid, Status.LIVE)
            assert [r.number for r in first] == list(range(1, 21))
            assert [r.number for r in rest] == list(range(13, n + 1))
            assert [r.delivery_id for r in rest] == [r.delivery_id for r in first[12:]] + [
                r.delivery_id for r in rest[8:]
            ]
            assert c.counters["router.dlq"] == n  # every result went through the DLQ ...
            assert c.counters["router.dlq_records"] < n  # ... packed


async def test_second_stream_supersedes_the_first(engine: dict[str, Any], unique: str) -> None:
    """Hole 8: the newest stream wins; the old one is closed and its end does not mark the
    client OFFLINE."""
    from grpclib.const import Status as GStatus
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    cid = f"twice-{unique}"
    with trio.fail_after(60):
        async with cluster(engine, pods=2) as c:
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as old:
                await old.event("sq", 2, seq=1)
                await old.results(1)
                async with open_stream(c.ports[1], {"client_id": cid, **P2}) as new:
                    # grpclib's client reports the server's trailers-then-RST_STREAM(NO_ERROR) as a
                    # reset; grpcio reports ABORTED (see test_interop_grpcio). Either way it ends.
                    with pytest.raises((GRPCError, StreamTerminatedError)) as e:
                        while await old.recv() is not None:
                            pass
                    if isinstance(e.value, GRPCError):
                        assert e.value.status is GStatus.ABORTED
                    await trio.sleep(0.3)
                    rec = await c.engine.state.get(cid)
                    assert rec is not None and rec.status is Status.LIVE and rec.epoch == 2
                    await new.event("sq", 5, seq=1)
                    [r] = await new.results(1)
                    assert r.result == 25


async def test_malformed_records_are_skipped_and_the_consumers_keep_going(
    engine: dict[str, Any], unique: str
) -> None:
    cid = f"bad-{unique}"
    with trio.fail_after(60):
        async with cluster(engine) as c:
            s = c.settings
            await c.engine.log.producer.send_batch(
                s.kafka_events_topic, [(cid.encode(), b"\xff\xff garbage")]
            )
            await c.engine.log.producer.send_batch(
                s.kafka_results_topic, [(cid.encode(), b"\x08\x96\x01 not a result")]
            )
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                await st.event("sq", 7, seq=1)
                [r] = await st.results(1)
                assert r.result == 49
            assert c.counters["events.malformed"] >= 1
            assert c.counters["router.malformed"] >= 1
