"""The event consumer's pipeline (poller -> producer task -> commit_later): at least once, with
commits never ahead of the results written. Memory engine; the same code runs on Kafka in
tests/test_pipeline.py and the chaos test."""

from __future__ import annotations

import trio

from nimbus import config
from nimbus.engines.memory import MemoryLog
from nimbus.wire import packs
from nimbus.wire.messages import KafkaEventRequest, KafkaEventResponse
from nimbus.workers.event_consumer import EventConsumer


async def with_events(**settings: object) -> tuple[config.Settings, MemoryLog]:
    """A memory log holding sq events 1..20 of alice and bob, interleaved."""
    s = config.load({}, dotenv=False, **settings)
    log = MemoryLog()
    await log.ensure_topics(list(s.topics), s.kafka_partitions)
    events = [
        (
            cid.encode(),
            KafkaEventRequest(
                event_name="sq", number=n, client_id=cid, redis_channel="p", epoch=1, seq=n
            ).SerializeToString(),
        )
        for n in range(1, 21)
        for cid in ("alice", "bob")
    ]
    await log.producer.send_batch(s.kafka_events_topic, events)
    return s, log


async def test_offsets_are_committed_only_after_their_results_are_written() -> None:
    # One result per record (NIMBUS_RESULTS_PACK=1): the check below compares offsets.
    s, log = await with_events(kafka_partitions=2, results_pack=1)
    ends = await log.end_offsets(s.kafka_events_topic)
    log.producer.fail_next = 3  # the first three result produces fail (a Kafka timeout)
    group = s.events_group
    seen_ahead: list[tuple[dict[int, int], int]] = []

    async def results_written() -> int:
        return sum((await log.end_offsets(s.kafka_results_topic)).values())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(EventConsumer(s, log).run)
            while True:
                committed = await log.committed(group, s.kafka_events_topic)
                written = await results_written()
                # Everything committed has its result written (per partition: events of a
                # client share one, and results keep their partition's order).
                if sum(committed.values()) > written:
                    seen_ahead.append((committed, written))
                if committed == ends:
                    break
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not seen_ahead, seen_ahead
    assert log.producer.fail_next == 0  # the failures happened, and were retried
    # Every event has its result, each delivery id once (a failed produce wrote nothing).
    got = []
    for p in range(s.kafka_partitions):
        for rec in log.topic(s.kafka_results_topic).partitions[p]:
            r = KafkaEventResponse.FromString(rec.value)
            got.append((r.client_id, r.number, r.result, r.delivery_id))
    assert sorted((c, n) for c, n, _, _ in got) == sorted(
        (cid, n) for n in range(1, 21) for cid in ("alice", "bob")
    )
    assert all(res == n * n for _, n, res, _ in got)
    assert len({(c, d) for c, _, _, d in got}) == len(got)  # ids are per partition


async def test_a_clients_results_of_a_batch_share_a_record() -> None:
    """NIMBUS_RESULTS_PACK: the results of one poll batch are written as packs per client
    (nimbus.wire.packs), in each client's order; every result once."""
    s, log = await with_events(kafka_partitions=1, results_pack=8)
    ends = await log.end_offsets(s.kafka_events_topic)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(EventConsumer(s, log).run)
            while await log.committed(s.events_group, s.kafka_events_topic) != ends:  # noqa: ASYNC110 (a store to poll)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    records = log.topic(s.kafka_results_topic).partitions[0]
    got: dict[str, list[int]] = {}
    for rec in records:
        for r in packs.parse_record(rec):
            got.setdefault(r.client_id, []).append(r.number)
    assert got == {"alice": list(range(1, 21)), "bob": list(range(1, 21))}
    assert len(records) < 40 and max(len(packs.decode_record(r.value)) for r in records) > 1
