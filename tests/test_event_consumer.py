"""The event consumer's pipeline (poller -> producer task -> commit_later): at least once, with
commits never ahead of the results written. Memory engine; the same code runs on Kafka in
tests/test_pipeline.py and the chaos test."""

from __future__ import annotations

import trio

from nimbus import config
from nimbus.engines.memory import MemoryLog
from nimbus.event_consumer import EventConsumer, group_for
from nimbus.messages import KafkaEventRequest, KafkaEventResponse


async def test_offsets_are_committed_only_after_their_results_are_written() -> None:
    s = config.load({}, dotenv=False, kafka_partitions=2)
    log = MemoryLog()
    await log.ensure_topics(list(s.topics), s.kafka_partitions)
    events = [
        (cid.encode(), KafkaEventRequest(event_name="sq", number=n, client_id=cid, redis_channel="p", epoch=1, seq=n).SerializeToString())
        for n in range(1, 21)
        for cid in ("alice", "bob")
    ]
    await log.producer.send_batch(s.kafka_events_topic, events)
    ends = await log.end_offsets(s.kafka_events_topic)
    log.producer.fail_next = 3  # the first three result produces fail (a Kafka timeout)
    group = group_for(s)
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
