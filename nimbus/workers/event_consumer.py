"""The event consumer ("back-office worker"): events topic -> compute -> results topic.

At least once: a batch's results are produced (and acknowledged by Kafka) before the batch's
offsets are committed, so a crash re-processes the batch; the duplicate results carry the same
delivery id (the event's offset + 1), which the router and the client library drop.
"""

from __future__ import annotations

import functools

import trio
from loguru import logger

from nimbus.config import Settings
from nimbus.core import events
from nimbus.core.channels import receive_batch
from nimbus.core.retry import Policy, retrying
from nimbus.ops.stats import Counters
from nimbus.ports import EngineError, Log, LogConsumer, Record, TopicPartition
from nimbus.wire import badinput, packs, trace
from nimbus.wire.messages import KafkaEventRequest, KafkaEventResponse


def process(rec: Record, instance: str) -> KafkaEventResponse:
    """The result of one events-topic record; raises BadRecord if the record is not an event."""
    req = badinput.decode_keyed(rec, KafkaEventRequest)  # pods key events by client id
    resp = KafkaEventResponse(
        event_name=req.event_name,
        number=req.number,
        client_id=req.client_id,
        redis_channel=req.redis_channel,
        kafka_offset=rec.offset,
        delivery_id=rec.offset + 1,
        seq=req.seq,
    )
    try:
        resp.result = events.compute(req.event_name, req.number)
    except events.EventFailed as e:
        resp.error.code = e.code
        resp.error.message = e.message
    resp.log.CopyFrom(req.log)
    trace.step(
        resp.log,
        "event-consumer",
        instance,
        "compute",
        event=req.event_name,
        partition=rec.partition,
        offset=rec.offset,
    )
    return resp


# Computed batches waiting for the producer task (each up to one poll: 500 records).
PIPELINE_BATCHES = 4


class EventConsumer:
    """Two tasks: the poller reads and computes; the producer writes the results (all batches
    waiting at once in one produce) and then hands their offsets to the consumer to commit with
    a later poll. So a poll never waits for a produce or a commit round trip."""

    def __init__(self, settings: Settings, log: Log, counters: Counters | None = None) -> None:
        self.s = settings
        self.log = log
        self.counters = counters or Counters()
        self.retry_policy = Policy.from_settings(settings)  # NIMBUS_RETRY_*

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[_Batch](PIPELINE_BATCHES)
        async with (
            self.log.consumer(self.s.kafka_events_topic, self.s.events_group) as consumer,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._produce, consumer, recv)
            task_status.started()
            logger.info("event consumer up: group {}", self.s.events_group)
            async with send:
                while True:
                    batch = await retrying(
                        lambda: consumer.poll(500, 0.5),
                        EngineError,
                        self.retry_policy,
                        on_error=lambda _n, e: logger.warning("event consumer: poll failed: {}", e),
                    )
                    if batch.records:
                        await send.send(self._compute(batch.records))

    def _compute(self, records: list[Record]) -> _Batch:
        results: list[tuple[str, bytes, None]] = []
        for rec in records:
            try:
                resp = process(rec, self.s.instance_id)
            except badinput.BadRecord as e:
                self.counters.inc("events.malformed")
                badinput.record("events", e.reason, rec)
                continue
            if resp.HasField("error"):
                self.counters.inc("events.failed")
            results.append((resp.client_id, resp.SerializeToString(), None))
        # Each client's results of this batch in records of up to NIMBUS_RESULTS_PACK
        # (nimbus.wire.packs): a client's events share a partition, so its results keep their order.
        out = [(cid.encode(), value) for cid, value, _ in packs.packs(results, self.s.results_pack)]
        offsets: dict[TopicPartition, int] = {}
        for rec in records:
            offsets[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
        return (out, len(results)), offsets

    async def _produce(
        self, consumer: LogConsumer, recv: trio.MemoryReceiveChannel[_Batch]
    ) -> None:
        async with recv:
            while True:
                batches = await receive_batch(recv)
                out = [item for (items, _), _ in batches for item in items]
                n = sum(count for (_, count), _ in batches)
                offsets: dict[TopicPartition, int] = {}
                for _, o in batches:
                    offsets.update(o)  # later batches read further
                if out:
                    # Nothing is committed until the results are written: retrying is safe.
                    await retrying(
                        functools.partial(
                            self.log.producer.send_batch, self.s.kafka_results_topic, out
                        ),
                        EngineError,
                        self.retry_policy,
                        on_error=functools.partial(_produce_failed, len(out)),
                    )
                self.counters.inc("events.processed", n)
                consumer.commit_later(offsets)


# ((records to write, results in them), the events topic offsets they answer)
_Batch = tuple[tuple[list[tuple[bytes, bytes]], int], dict[TopicPartition, int]]


def _produce_failed(n: int, _failures: int, e: Exception) -> None:
    logger.warning("event consumer: producing {} results failed: {}; retrying", n, e)
