"""Producing on kafka-python (the adapter nimbus.engines.kafka): `KafkaLogProducer` and the
batches' acknowledgements (`_BatchAcks`), counted down on the producer's sender thread."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import kafka.errors as kerr
import trio
from loguru import logger

from nimbus.engines import kafka_common as kc
from nimbus.engines.kafka_common import in_thread
from nimbus.engines.murmur2 import partition_for
from nimbus.ports import ProduceFailed, Written

if TYPE_CHECKING:
    from nimbus.engines.kafka import KafkaLog

_INLINE_SEND = (
    32  # records of a produce batch appended on the trio thread, at most (see send_batch)
)
_PARTITION_CACHE = 200_000  # keys whose partition is remembered (cleared when full)


class _BatchAcks(kc.BatchAcks[BaseException]):
    """A batch's produce futures, counted down on the sender thread."""

    __slots__ = ()

    def ok(self, i: int, md: Any) -> None:
        self.written(i, Written(md.partition, md.offset))

    def fail(self, i: int, exc: BaseException) -> None:
        self.failed(i, exc)


class KafkaLogProducer:
    def __init__(self, log: KafkaLog, producer: Any, make_producer: Any = None) -> None:
        self._log = log
        self._producer = producer
        self._make_producer = make_producer
        self._generation = 0  # bumped by each replacement of the producer
        self._partitions: dict[tuple[int, bytes], int] = {}  # (partition count, key) -> partition

    async def _replace(self, generation: int, why: str) -> None:
        """A failed batch leaves an idempotent producer's sequence numbers behind the broker's
        (its expired batches were never written): seen as a producer whose every later batch
        timed out, long after the broker was back. Start over with a new producer (a new
        producer id); the old one is closed without waiting. Once per failing generation."""
        if self._make_producer is None or generation != self._generation:
            return
        self._generation += 1
        old = self._producer
        try:
            self._producer = await in_thread(self._make_producer)
        except (kerr.KafkaError, OSError, ValueError) as exc:
            logger.warning(
                "kafka producer: replacing it after {} failed: {!r}; keeping the old one", why, exc
            )
            return
        logger.warning("kafka producer replaced after {}", why)
        try:
            await in_thread(functools.partial(old.close, timeout=0))
        except Exception as exc:  # the old producer is broken anyway
            logger.debug("closing the replaced kafka producer: {!r}", exc)

    def partition_for(self, topic: str, key: bytes) -> int:
        """Kafka's murmur2 partition; the topic's count must be known (ensure_topics or a send)."""
        return partition_for(key, kc.known_count(self._log._counts, topic))

    def _send_all(self, topic: str, items: Sequence[tuple[bytes, bytes]], acks: _BatchAcks) -> int:
        # The producer's own view of the partition count is the one its partitioner uses; keep
        # ours equal so partition_for() names the partition records really land on.
        n = len(self._producer.partitions_for(topic))
        send = self._producer.send
        # The partition given, not left to kafka-python's partitioner: its path costs about as
        # much as the rest of send() (measured: 37 -> 19 µs per record). Same murmur2 result.
        parts = self._partitions
        if len(parts) > _PARTITION_CACHE:
            parts.clear()
        for i, (key, value) in enumerate(items):
            p = parts.get((n, key))
            if p is None:
                p = parts[(n, key)] = partition_for(key, n)
            fut = send(topic, value=value, key=key, partition=p)
            fut.add_callback(acks.ok, i)
            fut.add_errback(acks.fail, i)
        return n

    async def send_batch(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> list[Written]:
        await self._log.partition_count(topic)  # LogUnavailable for an unknown topic
        if not items:
            return []
        acks = _BatchAcks(len(items), trio.lowlevel.current_trio_token())
        generation = self._generation
        try:
            if (
                len(items) <= _INLINE_SEND
                and self._producer._metadata.partitions_for_topic(topic) is not None
            ):
                # send() blocks only while it waits for a topic's metadata (kafka-python 3's
                # accumulator never waits for memory): with the metadata known, a small batch
                # is appended from this thread (a thread hop costs ~130-190 µs of CPU here, more
                # than a few records' appends at ~20 µs each). A large one goes to a thread, so
                # the event loop is not held for its whole encoding.
                n = self._send_all(topic, items, acks)
            else:
                n = await in_thread(self._send_all, topic, items, acks)
        except (kerr.KafkaError, ValueError, TypeError) as exc:
            raise ProduceFailed(f"send to {topic!r} failed: {exc!r}") from exc
        if self._log._counts.get(topic) != n:
            logger.warning("topic {} now has {} partitions", topic, n)
            self._log._counts[topic] = n
        with trio.move_on_after(kc.SEND_TIMEOUT_S):
            await acks.done.wait()
        if not acks.done.is_set():
            await self._replace(generation, "a batch timed out")
            raise acks.timed_out(topic)
        if acks.errors:
            _i, first = acks.first_error()
            await self._replace(generation, f"a failed batch ({first!r})")
            raise acks.failure(topic, repr(first)) from first
        return [w for w in acks.results if w is not None]
