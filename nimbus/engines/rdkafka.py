"""The real log on librdkafka (confluent-kafka): the second adapter of the Log port.

Chosen with NIMBUS_KAFKA_CLIENT=librdkafka (kafka-python, nimbus.engines.kafka, is the default).
It keeps the kafka-python adapter's semantics, which the contract tests (tests/test_log_contract.py)
hold both to; the bridge to trio is different because librdkafka's calls are different:

- Producing never blocks: `produce()` only appends to librdkafka's queue, so a batch is appended
  from the trio thread, whatever its size (a full local queue, BufferError, waits in trio).
  Delivery reports are only handed out by `poll()`: one small thread per producer (`_Poller`)
  polls every 50 ms (a report wakes it at once) and a batch wakes trio once, through the trio
  token, when its last report lands. Partitions are chosen by librdkafka's `murmur2_random`,
  the Java client's and kafka-python's partitioner (librdkafka's default, consistent_random, is
  a different hash): `partition_for` (nimbus.engines.murmur2) names the same partition, and a
  batch whose records land elsewhere (the topic grew) refreshes the partition count.
- A consumer's queue is read without a thread when it already holds records: `consume(n, 0)`
  never blocks. Only a poll that has to wait goes to a worker thread (`in_thread`, waited for
  even when cancelled), for `poll(slice)` and then `consume(n - 1, 0)` for what came with it
  (librdkafka's `consume(n, timeout)` waits for all n, or the whole timeout). A consumer is used
  by one thread at a time, and never after its close: each consumer/reader serialises its calls
  with a trio.Lock, and every call into the librdkafka handle, from whichever thread, holds the
  handle's own threading.Lock (`_Handle`). That second lock also covers the threads a caller
  stops waiting for (a commit or a close given up on keeps running): the trio thread never
  blocks on it (a busy handle sends the poll to a worker thread, or waits for the next one), a
  close waits for the call in flight to return, and nothing calls the handle once it is closed
  (confluent-kafka's close destroys the C handle under any call still inside it: a segfault).
- Rebalance callbacks (cooperative-sticky), offset-commit results, errors and log lines are
  served inside those calls, on whichever thread makes them; they only record what happened.
- Admin requests return concurrent futures completed on librdkafka's background thread; they
  wake trio through the token too (no worker thread).
- Nothing here creates topics except ensure_topics; an unknown topic is `LogUnavailable`.
- Every librdkafka error becomes one of ours: `LogUnavailable`, `ProduceFailed`, `CommitFailed`.

Group semantics are the kafka-python adapter's (and the memory engine's): each `PollResult`
reports the rebalance news since the previous poll, to be applied as "remove `revoked`, then add
`assigned`"; commits are checked on the client against the current assignment; `commit_later`
offsets go out asynchronously with the next poll, are dropped for partitions no longer owned and
retried, while owned, when refused. That bookkeeping is shared: nimbus.engines.kafka_common.

This module holds the Log itself (`open_rdkafka_log`, `RdkafkaLog`: topics, offsets, the
consumers' configuration); beside it, all `nimbus.engines.rdkafka_*`: `_producer` (producing and
the poller), `_consumer` (group consumer and reader), `_admin` (admin requests awaited and
retried), `_handle` (the shared configuration, `_Handle`, threads that may be abandoned, bounded
closes), `_wakeup` (the pipe wake-ups).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicCollection
from confluent_kafka import TopicPartition as RdTP
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.cimpl import NewTopic
from loguru import logger

from nimbus.engines import kafka_common as kc
from nimbus.engines import replication as repl
from nimbus.engines.kafka_common import BOOTSTRAP_TIMEOUT_S, in_thread
from nimbus.engines.rdkafka_admin import _code, _retrying, _wait_future
from nimbus.engines.rdkafka_consumer import RdkafkaGroupConsumer, RdkafkaReader
from nimbus.engines.rdkafka_handle import (
    _REQUEST_TIMEOUT_S,
    _close_bounded,
    _common,
    _Handle,
    _in_thread_abandonable,
    _on_error,
)
from nimbus.engines.rdkafka_producer import RdkafkaLogProducer
from nimbus.engines.rdkafka_wakeup import _QueueFd
from nimbus.ports import LogProducer, LogUnavailable

__all__ = [
    "RdkafkaGroupConsumer",
    "RdkafkaLog",
    "RdkafkaLogProducer",
    "RdkafkaReader",
    "open_rdkafka_log",
]

_TOPIC_READY_TIMEOUT_S = 15.0

_OFFSET_CONSUMERS = 8  # committed(): group consumers kept open (the web view asks for a few)


@asynccontextmanager
async def open_rdkafka_log(
    brokers: str, *, linger_ms: int = 2, client_id: str = "nimbus", fetch_wait_ms: int = 0
) -> AsyncIterator[RdkafkaLog]:
    """Connect to the cluster; LogUnavailable if it does not answer within ~15 s."""
    common = _common(brokers, client_id)

    def make_producer() -> Producer:
        return Producer(
            {
                **common,
                "acks": "all",
                "enable.idempotence": True,
                # Kafka's (Java's, kafka-python's) partitioner: murmur2 of the key.
                "partitioner": "murmur2_random",
                "linger.ms": linger_ms,
                "message.timeout.ms": kc.DELIVERY_TIMEOUT_MS,
                "request.timeout.ms": int(_REQUEST_TIMEOUT_S * 1000),
                "allow.auto.create.topics": False,
                "error_cb": _on_error("producer"),
            }
        )

    await kc.probe(brokers, BOOTSTRAP_TIMEOUT_S)
    try:
        admin_config: dict[str, Any] = {**common, "error_cb": _on_error("admin")}
        admin = AdminClient(admin_config)
        # A TCP port that accepts is not yet a broker that answers: ask it once, bounded.
        await _wait_future(
            admin.describe_cluster(request_timeout=BOOTSTRAP_TIMEOUT_S),
            BOOTSTRAP_TIMEOUT_S + 1,
            "describe cluster",
        )
        producer = make_producer()
    except (KafkaException, LogUnavailable, ValueError, TypeError) as exc:
        raise kc.not_reachable(brokers, BOOTSTRAP_TIMEOUT_S, exc) from exc
    async with trio.open_nursery() as nursery:
        log = RdkafkaLog(brokers, client_id, admin, producer, make_producer, nursery, fetch_wait_ms)
        async with kc.closed_after(log._close):
            yield log


class RdkafkaLog(kc.LogBase):
    """The Log port over one Kafka cluster: a shared producer and admin client."""

    def __init__(
        self,
        brokers: str,
        client_id: str,
        admin: AdminClient,
        producer: Producer,
        make_producer: Callable[[], Producer] | None = None,
        nursery: trio.Nursery | None = None,
        fetch_wait_ms: int = 0,
    ) -> None:
        super().__init__(brokers, client_id)
        self._admin = admin
        self._nursery = nursery  # the producer's poller task (none: a poller thread)
        # > 0: a group consumer's fetch waits this long for records to gather at the broker
        # (fewer, larger fetches at paced rates: less CPU here and in the broker).
        self.fetch_wait_ms = fetch_wait_ms
        self._producer = RdkafkaLogProducer(self, producer, make_producer)
        # committed(): one never-subscribed consumer per group asked (see there)
        self._offset_consumers: dict[str, tuple[Consumer, _Handle]] = {}
        # Typed as the port: Log.producer is a plain (invariant) protocol attribute.
        self.producer: LogProducer = self._producer

    async def _close(self) -> None:
        consumers, self._offset_consumers = self._offset_consumers, {}
        for group, (raw, handle) in consumers.items():
            try:
                await _close_bounded(
                    functools.partial(handle.close, raw.close), f"offsets consumer {group!r}"
                )
            except Exception as exc:
                logger.warning("closing the offsets consumer of {!r} failed: {}", group, exc)
        try:
            await self._producer._close()
        except Exception as exc:  # closing must not mask the body's error
            logger.warning("librdkafka producer close failed: {}", exc)

    # -- topics -----------------------------------------------------------------------------

    async def _describe(self, names: Iterable[str]) -> dict[str, tuple[int, bool, int]]:
        """(partition count, every partition has a leader, replication factor: its partitions'
        fewest replicas) of the existing topics in `names`."""
        unique = list(dict.fromkeys(names))

        async def ask() -> dict[str, tuple[int, bool, int]]:
            futures = self._admin.describe_topics(
                TopicCollection(unique), request_timeout=_REQUEST_TIMEOUT_S
            )
            found: dict[str, tuple[int, bool, int]] = {}
            for name, fut in futures.items():
                try:
                    desc = await _wait_future(fut, _REQUEST_TIMEOUT_S + 1, f"describe {name!r}")
                except KafkaException as exc:
                    if _code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        continue
                    raise
                parts = desc.partitions
                if parts:
                    found[name] = (
                        len(parts),
                        all(p.leader is not None for p in parts),
                        min(len(p.replicas) for p in parts),
                    )
            return found

        try:
            return await _retrying(ask)
        except KafkaException as exc:
            raise kc.unavailable(self.brokers, f"describe {unique}", exc) from exc

    async def _brokers(self) -> int:
        """The number of brokers the cluster reports."""

        async def ask() -> int:
            fut = self._admin.describe_cluster(request_timeout=_REQUEST_TIMEOUT_S)
            desc = await _wait_future(fut, _REQUEST_TIMEOUT_S + 1, "describe cluster")
            return len(desc.nodes)

        try:
            return await _retrying(ask)
        except KafkaException as exc:
            raise kc.unavailable(self.brokers, "describe cluster", exc) from exc

    async def _count_of(self, topic: str) -> int | None:
        found = await self._describe([topic])
        return found[topic][0] if topic in found else None

    async def ensure_topics(
        self,
        names: Sequence[str],
        partitions: int,
        *,
        replication: int | None = None,
        min_insync: int | None = None,
    ) -> dict[str, int]:
        existing = await self._describe(names)
        brokers = await self._brokers()
        missing, rf, isr = repl.plan(
            names,
            {n: rf for n, (_count, _led, rf) in existing.items()},
            brokers,
            replication,
            min_insync,
        )
        if missing:
            futures = self._admin.create_topics(
                [
                    NewTopic(
                        n,
                        num_partitions=partitions,
                        replication_factor=rf,
                        config={"min.insync.replicas": str(isr)},
                    )
                    for n in missing
                ],
                request_timeout=_REQUEST_TIMEOUT_S,
                operation_timeout=_REQUEST_TIMEOUT_S,
            )
            for name, fut in futures.items():
                try:
                    await _wait_future(fut, _REQUEST_TIMEOUT_S + 1, f"create {name!r}")
                except KafkaException as exc:
                    if _code(exc) != KafkaError.TOPIC_ALREADY_EXISTS:  # lost a race: fine
                        raise LogUnavailable(f"creating topic {name!r}: {exc}") from exc
        # Ready when every partition has a leader in the metadata (kafka-python's
        # wait_for_topics): a producer or group member that starts earlier may see none.
        with trio.move_on_after(_TOPIC_READY_TIMEOUT_S):
            while True:
                existing = await self._describe(names)
                if all(existing.get(n, (0, False, 0))[1] for n in names):
                    break
                await trio.sleep(0.1)
        absent = [n for n in names if n not in existing]
        if absent:
            raise LogUnavailable(f"Kafka at {self.brokers}: topics {absent} not ready")
        counts = {n: existing[n][0] for n in names}
        self._counts.update(counts)
        return counts

    # -- offsets ------------------------------------------------------------------------------

    async def _offsets(self, topic: str, spec: OffsetSpec) -> dict[int, int]:
        n = await self.partition_count(topic)

        async def ask() -> dict[int, int]:
            futures = self._admin.list_offsets(
                {RdTP(topic, p): spec for p in range(n)}, request_timeout=_REQUEST_TIMEOUT_S
            )
            out: dict[int, int] = {}
            for rtp, fut in futures.items():
                info = await _wait_future(fut, _REQUEST_TIMEOUT_S + 1, f"offsets of {topic!r}")
                out[rtp.partition] = int(info.offset)
            return out

        async def refresh() -> object:
            # A metadata request for the topic: its answer updates the leaders and epochs the
            # admin client sends ListOffsets with (a broker restart moves the epoch on).
            return await in_thread(
                functools.partial(self._admin.list_topics, topic, timeout=_REQUEST_TIMEOUT_S)
            )

        try:
            out = await _retrying(ask, refresh)
        except KafkaException as exc:
            if _code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self._counts.pop(topic, None)
                raise LogUnavailable(f"unknown topic {topic!r}") from exc
            raise kc.unavailable(self.brokers, f"offsets of {topic!r}", exc) from exc
        return dict(sorted(out.items()))

    async def end_offsets(self, topic: str) -> dict[int, int]:
        return await self._offsets(topic, OffsetSpec.latest())  # type: ignore[no-untyped-call]

    async def begin_offsets(self, topic: str) -> dict[int, int]:
        return await self._offsets(topic, OffsetSpec.earliest())  # type: ignore[no-untyped-call]

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        # Like the memory engine, an unknown group or topic simply has no committed offsets.
        # Asked through a consumer of the group (never subscribed: it does not join), not
        # AdminClient.list_consumer_group_offsets: librdkafka's admin OffsetFetch crashes the
        # process when the coordinator answers NOT_COORDINATOR / COORDINATOR_NOT_AVAILABLE (a
        # broker (re)starting: rd_kafka_handle_OffsetFetch calls rd_kafka_cgrp_op on the admin
        # handle's NULL rk_cgrp, SIGSEGV; librdkafka #5040) and can trip an assertion when a
        # coordinator answer comes after the request's timeout (rd_kafka_admin_coord_response_
        # parse: `eonce->refcnt > 0`, SIGABRT; #3663). A group consumer's committed() goes
        # through its own group handle, which looks the coordinator up again instead.
        n = self._counts.get(topic)
        if n is None:
            n = await self._count_of(topic)  # LogUnavailable if the cluster does not answer
            if n is None:
                return {}
            self._counts[topic] = n
        c, handle = await self._offsets_consumer(group)
        tps = [RdTP(topic, p) for p in range(n)]

        def ask() -> list[RdTP]:
            c.poll(0)  # its log lines and errors (never polled otherwise)
            return c.committed(tps, timeout=_REQUEST_TIMEOUT_S)

        with trio.move_on_after(_REQUEST_TIMEOUT_S + 1):
            try:
                res = await _in_thread_abandonable(functools.partial(handle.call, ask))
            except (KafkaException, RuntimeError) as exc:
                raise kc.unavailable(self.brokers, f"committed {group!r}", exc) from exc
            return {
                t.partition: int(t.offset)
                for t in sorted(res, key=lambda t: t.partition)
                if t.error is None and t.offset >= 0
            }
        raise LogUnavailable(f"Kafka at {self.brokers}: committed {group!r}: no answer")

    async def _offsets_consumer(self, group: str) -> tuple[Consumer, _Handle]:
        """The group's committed-offsets consumer (made once, closed with the log; at most
        _OFFSET_CONSUMERS kept, the least recently asked closed first)."""
        got = self._offset_consumers.pop(group, None)
        if got is not None:
            self._offset_consumers[group] = got  # most recent last
        else:
            while len(self._offset_consumers) >= _OFFSET_CONSUMERS:
                old, (old_raw, old_handle) = next(iter(self._offset_consumers.items()))
                del self._offset_consumers[old]
                await _close_bounded(
                    functools.partial(old_handle.close, old_raw.close), f"offsets consumer {old!r}"
                )
            config = {
                **self._consumer_config(),
                "group.id": group,
                "error_cb": _on_error(f"offsets of {group!r}"),
            }
            try:
                raw = await in_thread(Consumer, config)
            except (KafkaException, ValueError, TypeError) as exc:
                raise kc.unavailable(self.brokers, f"committed {group!r}", exc) from exc
            got = self._offset_consumers.setdefault(group, (raw, _Handle(f"offsets {group}")))
            if got[0] is not raw:  # another task made one meanwhile
                await _close_bounded(raw.close, f"offsets consumer {group!r}")
        return got

    # -- consumers ----------------------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        return {
            **_common(self.brokers, self.client_id),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "allow.auto.create.topics": False,
            # librdkafka prefetches up to this much per consumer (default 64 MB).
            "queued.max.messages.kbytes": 16_384,
        }

    @asynccontextmanager
    async def consumer(
        self, topic: str, group: str, *, max_poll_records: int = 500
    ) -> AsyncIterator[RdkafkaGroupConsumer]:
        await self.partition_count(topic)
        c = RdkafkaGroupConsumer(topic, group, max_poll_records)

        def make() -> Consumer:
            raw = Consumer(
                {
                    **self._consumer_config(),
                    "group.id": group,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "cooperative-sticky",
                    # A SIGKILLed member holds its partitions until this expires (the broker's
                    # group.min.session.timeout.ms is 6 s), as in the kafka-python adapter.
                    "session.timeout.ms": 6_000,
                    "heartbeat.interval.ms": 1_000,
                    # A topic created after this consumer's first metadata is seen within 5 s.
                    "topic.metadata.refresh.interval.ms": 5_000,
                    **(
                        {"fetch.wait.max.ms": self.fetch_wait_ms, "fetch.min.bytes": 1 << 20}
                        if self.fetch_wait_ms > 0
                        else {}
                    ),
                    "on_commit": c._on_commit,
                    "error_cb": c._on_error,
                }
            )
            try:
                raw.subscribe(
                    [topic],
                    on_assign=c._listener.on_assign,
                    on_revoke=c._listener.on_revoke,
                    on_lost=c._listener.on_lost,
                )
            except BaseException:
                raw.close()
                raise
            return raw

        try:
            c._c = await in_thread(make)
        except (KafkaException, ValueError, TypeError) as exc:
            raise kc.unavailable(self.brokers, f"consumer of {topic!r}", exc) from exc
        c._fd = _QueueFd.open(c._c, self.client_id, "consumer")
        async with kc.closed_after(c.aclose):
            yield c

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[RdkafkaReader]:
        def make() -> Consumer:
            # librdkafka wants a group id even for a consumer that only assigns; it never joins
            # or commits with it. auto.offset.reset "error": an out-of-range fetch is reported
            # instead of silently jumping.
            return Consumer(
                {
                    **self._consumer_config(),
                    "group.id": f"{self.client_id}-reader",
                    "auto.offset.reset": "error",
                    "fetch.wait.max.ms": kc.READER_FETCH_WAIT_MS,
                    "queued.max.messages.kbytes": 8_192,
                    "error_cb": _on_error("reader"),
                }
            )

        try:
            raw = await in_thread(make)
        except (KafkaException, ValueError, TypeError) as exc:
            raise kc.unavailable(self.brokers, "reader", exc) from exc
        r = RdkafkaReader(self, raw)
        async with kc.closed_after(r.aclose):
            yield r
