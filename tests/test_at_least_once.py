"""Both result topics are at-least-once logs: a result can be written twice, in two records or in
one pack, and every reader must pass it on once (issue #13).

The chaos seed 8878 left the DLQ of one client holding delivery id 1382 in two packs (offset 10
`[1367, 1374, 1382]`, offset 11 `[1382, 1389, ...]`) after a worker was killed between its DLQ
write and its commit; the replay sent a run holding 1382 twice, the pod refused the run, and the
replay sent it again, for ever. Here the topics are written by hand with such overlaps (and
worse: a repeat inside one pack, a repeat out of order), on the memory engine and on the real
Kafka + Redis, and a raw protocol-2 client (which does not dedupe) must see every result exactly
once, in order, and go LIVE. A client of the original protocol, which cannot dedupe at all, must
not see a repeat either.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from loguru import logger

from nimbus.core.lifecycle import Status
from nimbus.doorman.pod import Pod
from nimbus.engines.murmur2 import partition_for
from nimbus.ports import DlqWrite
from nimbus.proto_gen.nimbus import EventResponse, ResponseKind
from nimbus.wire import packs
from nimbus.wire.messages import KafkaEventResponse
from tests.test_pipeline import P2, cluster, engine, wait_status  # noqa: F401 (fixture)
from tests.test_retention import reconnect_and_ack, send_and_leave, wait_in_dlq
from tests.wire import WireStream, open_stream


def result(cid: str, n: int, did: int) -> KafkaEventResponse:
    return KafkaEventResponse(
        event_name="sq",
        number=n,
        result=n * n,
        client_id=cid,
        kafka_offset=did - 1,
        delivery_id=did,
        seq=n,
    )


def record(rs: list[KafkaEventResponse]) -> bytes:
    """One result as itself, several as a pack (nimbus.wire.packs), repeats and all."""
    if len(rs) == 1:
        return bytes(rs[0].SerializeToString())
    return packs.encode_pack([r.SerializeToString() for r in rs])


async def take_once(st: WireStream, n: int, *, ack: bool) -> list[EventResponse]:
    """The next n results on a raw stream (receipts skipped), acking each if asked."""
    got: list[EventResponse] = []
    while len(got) < n:
        with trio.fail_after(20):
            r = await st.recv()
        assert r is not None, f"stream ended after {[x.number for x in got]}"
        if r.kind == ResponseKind.RESULT:
            got.append(r)
            if ack:
                await st.ack(r.delivery_id)
    return got


async def nothing_more(st: WireStream, wait: float) -> None:
    """No repeat was queued behind the last result."""
    with trio.move_on_after(wait):
        extra = await st.recv()
        raise AssertionError(f"a repeat reached the wire: {extra}")


def overlapping(rs: list[KafkaEventResponse]) -> list[list[KafkaEventResponse]]:
    """40 results as a writer repeating itself would leave them: packs that overlap (8, 9 in two
    packs), a record that repeats the last result of the pack before it, a pack repeating part of
    itself after its end (a restarted writer appended to its own batch), then the rest."""
    assert len(rs) == 40
    return [
        rs[0:10],
        rs[8:20],
        [rs[19]],
        rs[20:30] + rs[25:30],
        [rs[29], rs[30]],
        rs[30:40],
    ]


async def test_a_dlq_with_overlapping_packs_replays_each_result_once(
    engine: dict[str, Any], unique: str
) -> None:
    cid = f"dlq-dup-{unique}"
    with trio.fail_after(90):
        async with cluster(engine, replay_window=16) as c:
            s = c.settings
            rs = [result(cid, n, 7 * n) for n in range(1, 41)]
            # The client's record as the router leaves it: every id routed to the DLQ (it was
            # away), each record's write noted with its offset.
            await c.engine.state.route([(cid, rs[-1].delivery_id)])
            written = await c.engine.log.producer.send_batch(
                s.kafka_dlq_topic, [(cid.encode(), record(g)) for g in overlapping(rs)]
            )
            await c.engine.state.dlq_written(
                [
                    DlqWrite(cid, g[-1].delivery_id, w.partition, w.offset)
                    for g, w in zip(overlapping(rs), written, strict=True)
                ]
            )
            assert {w.partition for w in written} == {
                partition_for(cid.encode(), s.kafka_partitions)
            }
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                got = await take_once(st, 40, ack=True)
                await wait_status(c, cid, Status.LIVE)
                await nothing_more(st, 0.5)
            assert [r.number for r in got] == list(range(1, 41))
            assert [r.delivery_id for r in got] == [r.delivery_id for r in rs]


async def test_a_results_topic_with_overlapping_packs_delivers_each_result_once(
    engine: dict[str, Any], unique: str
) -> None:
    """Live routing: the router takes a repeated result once; a protocol-2 client (raw, no
    dedupe) and an original client (no delivery ids at all) each see every result once."""
    with trio.fail_after(90):
        async with cluster(engine) as c:
            s = c.settings
            for protocol, meta in ((2, P2), (1, {})):
                cid = f"res-dup-p{protocol}-{unique}"
                rs = [result(cid, n, 3 * n) for n in range(1, 41)]
                async with open_stream(c.ports[0], {"client_id": cid, **meta}) as st:
                    await wait_status(c, cid, Status.LIVE)
                    await c.engine.log.producer.send_batch(
                        s.kafka_results_topic,
                        [(cid.encode(), record(g)) for g in overlapping(rs)],
                    )
                    got = await take_once(st, 40, ack=protocol == 2)
                    await nothing_more(st, 1.0)
                assert [r.number for r in got] == list(range(1, 41)), protocol
                assert [r.result for r in got] == [n * n for n in range(1, 41)]
                if protocol == 2:
                    assert [r.delivery_id for r in got] == [r.delivery_id for r in rs]


async def test_a_pod_refusing_runs_still_gets_the_backlog_one_by_one(
    monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    """No refusal repeats itself: a pod that refuses every run of more than one result (as a
    pod of another version might) makes the replay send one result per delivery; the client
    gets its whole backlog in order and goes LIVE, the refusal is logged at ERROR once and
    counted, and the run is not sent again and again."""
    refused: list[int] = []
    real = Pod._deliver_run

    def refuse_runs(self: Pod, s: Any, reply_to: str, d: Any, steps: Any) -> None:
        if len(d.run_ids) > 1:
            refused.append(d.delivery_id)
            self._report(reply_to, d, delivered=False, refused="runs not taken here")
            return
        real(self, s, reply_to, d, steps)

    monkeypatch.setattr(Pod, "_deliver_run", refuse_runs)
    cid = f"refused-{unique}"
    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(str(m)), level="ERROR")
    try:
        with trio.fail_after(60):
            async with cluster({"engine": "memory"}, dlq_pack=4) as c:
                ids = await send_and_leave(c.ports[0], cid, range(1, 41))
                await wait_in_dlq(c, cid, ids[-1])
                got = await reconnect_and_ack(c, cid, 40)
                assert [r.number for r in got] == list(range(1, 41))
                assert [r.delivery_id for r in got] == ids
                assert c.counters["replay.refused"] == 1
    finally:
        logger.remove(sink)
    assert len(refused) <= 5, refused  # the runs in flight when the first refusal came back
    assert sum("refused a run" in e for e in errors) == 1, errors
