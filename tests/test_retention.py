"""Backlog that aged past the DLQ's retention: the client is told (a GAP with the range), then
gets the rest of its backlog in order and goes LIVE; the original's client gets the rest.

Retention is simulated by deleting the oldest DLQ records: the memory engine's `delete_records`
hook, and Kafka's own DeleteRecords request (what retention does to a log) on the real broker.
Most tests write one result per DLQ record (NIMBUS_DLQ_PACK=1), so they can delete results one
by one; the last one deletes a pack of results (the default layout, nimbus.wire.packs).
"""

from __future__ import annotations

from typing import Any

import trio

from nimbus.core.lifecycle import Status
from nimbus.engines.murmur2 import partition_for
from nimbus.proto_gen.nimbus import EventResponse, ResponseKind
from nimbus.wire import packs
from tests.harness import Cluster
from tests.test_pipeline import P2, cluster, engine, wait_status  # noqa: F401 (fixture)
from tests.wire import open_stream


async def send_and_leave(port: int, cid: str, numbers: range) -> list[int]:
    """Send events, wait for their receipts, leave without reading results: their delivery ids."""
    ids: list[int] = []
    async with open_stream(port, {"client_id": cid, **P2}) as st:
        for n in numbers:
            await st.event("sq", n, seq=n)
        while len(ids) < len(numbers):
            r = await st.recv()
            assert r is not None
            if r.kind == ResponseKind.RECEIPT:
                ids.append(r.delivery_id)
    return ids


async def wait_in_dlq(c: Cluster, cid: str, last_id: int) -> None:
    with trio.fail_after(30):
        while True:
            rec = await c.engine.state.get(cid)
            if rec is not None and rec.status is Status.OFFLINE and rec.dlq_written >= last_id:
                return
            await trio.sleep(0.05)


async def age_out(c: Cluster, engine: dict[str, Any], cid: str, before: int) -> None:
    """Delete the DLQ partition's records below offset `before` (the test's own topics: only
    this client's records are there, at offsets 0, 1, ...; one result each with dlq_pack=1)."""
    topic = c.settings.kafka_dlq_topic
    partition = partition_for(cid.encode(), c.settings.kafka_partitions)
    if engine["engine"] == "memory":
        c.engine.log.delete_records(topic, partition, before)  # type: ignore[attr-defined]
        return
    from kafka import KafkaAdminClient, TopicPartition

    def delete() -> None:
        admin = KafkaAdminClient(bootstrap_servers=engine["kafka_brokers"])
        try:
            admin.delete_records({TopicPartition(topic, partition): before}, timeout_ms=10_000)
        finally:
            admin.close()

    await trio.to_thread.run_sync(delete)
    begin = (await c.engine.log.begin_offsets(topic))[partition]
    assert begin == before, f"DeleteRecords left the log start at {begin}"


async def reconnect_and_ack(c: Cluster, cid: str, n: int) -> list[EventResponse]:
    """Reconnect (protocol 2), take the first n results and GAPs acking each, wait for LIVE."""
    got: list[EventResponse] = []
    async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
        while len(got) < n:
            r = await st.recv()
            assert r is not None, f"stream ended after {got}"
            if r.kind in (ResponseKind.RESULT, ResponseKind.GAP):
                got.append(r)
                await st.ack(r.delivery_id)
        await wait_status(c, cid, Status.LIVE)
    return got


async def test_protocol2_client_is_told_of_the_aged_out_range_then_gets_the_rest(
    engine: dict[str, Any], unique: str
) -> None:
    cid = f"gap-{unique}"
    with trio.fail_after(120):
        async with cluster(engine, dlq_pack=1) as c:
            ids = await send_and_leave(c.ports[0], cid, range(1, 31))
            await wait_in_dlq(c, cid, ids[-1])
            await age_out(c, engine, cid, 10)  # results 1..10 are gone
            got = await reconnect_and_ack(c, cid, 21)
            gap, rest = got[0], got[1:]
            assert gap.kind == ResponseKind.GAP, got[:3]
            # The range covers exactly what is gone: after the last ack (none), up to just
            # before the first result still there.
            assert (gap.gap_from, gap.gap_to, gap.delivery_id) == (1, ids[10] - 1, ids[10] - 1)
            assert all(r.kind == ResponseKind.RESULT for r in rest)
            assert [r.number for r in rest] == list(range(11, 31))
            assert [r.delivery_id for r in rest] == ids[10:]


async def test_gap_when_the_whole_backlog_aged_out(engine: dict[str, Any], unique: str) -> None:
    """Nothing of the backlog is left: the GAP runs up to the last result written to the DLQ,
    and acking it is what lets the client go LIVE."""
    cid = f"gapall-{unique}"
    with trio.fail_after(120):
        async with cluster(engine, dlq_pack=1) as c:
            ids = await send_and_leave(c.ports[0], cid, range(1, 6))
            await wait_in_dlq(c, cid, ids[-1])
            await age_out(c, engine, cid, 5)
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                while True:
                    r = await st.recv()
                    assert r is not None
                    if r.kind != ResponseKind.RECEIPT:
                        break
                assert (r.kind, r.gap_from, r.gap_to) == (ResponseKind.GAP, 1, ids[-1])
                rec = await c.engine.state.get(cid)
                assert rec is not None and rec.status is Status.REPLAYING  # not before the ack
                await st.ack(r.delivery_id)
                await wait_status(c, cid, Status.LIVE)
                # And live delivery works afterwards.
                await st.event("sq", 7, seq=7)
                while True:
                    r = await st.recv()
                    assert r is not None
                    if r.kind == ResponseKind.RESULT:
                        break
                assert (r.number, r.result) == (7, 49)


async def test_original_client_gets_what_is_left_in_order(
    engine: dict[str, Any], unique: str
) -> None:
    """The original's client cannot be told of a gap: it gets nothing in its place (no message
    it cannot understand), then the rest of its backlog in order, and goes LIVE."""
    cid = f"gap1-{unique}"
    with trio.fail_after(120):
        async with cluster(engine, dlq_pack=1) as c:
            ids = await send_and_leave(c.ports[0], cid, range(1, 21))
            await wait_in_dlq(c, cid, ids[-1])
            await age_out(c, engine, cid, 8)
            async with open_stream(c.ports[0], {"client_id": cid}) as st:
                got = []
                while len(got) < 12:
                    r = await st.recv()
                    assert r is not None
                    got.append(r)
                await wait_status(c, cid, Status.LIVE)
            assert [(r.number, r.result) for r in got] == [(n, n * n) for n in range(9, 21)]
            assert all(r.kind == ResponseKind.RESULT and not r.gap_to for r in got)


async def dlq_records(c: Cluster, cid: str) -> list[list[int]]:
    """The delivery ids in each of the client's DLQ records, in offset order."""
    topic = c.settings.kafka_dlq_topic
    partition = partition_for(cid.encode(), c.settings.kafka_partitions)
    end = (await c.engine.log.end_offsets(topic)).get(partition, 0)
    out: list[list[int]] = []
    offset = 0
    async with c.engine.log.reader() as reader:
        while offset < end:
            recs = await reader.fetch(topic, partition, offset, 500, 1.0)
            out += [
                [r.delivery_id for r in packs.decode_record(rec.value)]
                for rec in recs
                if rec.key == cid.encode()
            ]
            offset = recs[-1].offset + 1 if recs else offset
    return out


async def test_an_aged_out_pack_is_one_gap_then_the_rest(
    engine: dict[str, Any], unique: str
) -> None:
    """Results packed several to a DLQ record (NIMBUS_DLQ_PACK) age out a record at a time: the
    GAP covers exactly the first record's results, then the rest come in order."""
    cid = f"gappack-{unique}"
    with trio.fail_after(120):
        async with cluster(engine, dlq_pack=8) as c:
            ids = await send_and_leave(c.ports[0], cid, range(1, 31))
            await wait_in_dlq(c, cid, ids[-1])
            records = await dlq_records(c, cid)
            assert [i for r in records for i in r] == ids  # every result once, in order
            assert max(len(r) for r in records) > 1 and all(len(r) <= 8 for r in records), records
            await age_out(c, engine, cid, 1)  # the first record: records[0]'s results are gone
            lost = records[0]
            got = await reconnect_and_ack(c, cid, 1 + len(ids) - len(lost))
            gap, rest = got[0], got[1:]
            assert (gap.kind, gap.gap_from, gap.gap_to) == (
                ResponseKind.GAP,
                1,
                ids[len(lost)] - 1,
            ), got[:3]
            assert [r.delivery_id for r in rest] == ids[len(lost) :]
            assert [r.number for r in rest] == list(range(len(lost) + 1, 31))
