"""The real log: Apache Kafka through kafka-python 3, made trio-native.

kafka-python is a threaded library. This module owns the bridge and its rules:

- Every blocking call (bootstrap, consumer poll/commit/close, admin requests, producer flush)
  runs in a worker thread that the calling task waits for even when cancelled (`in_thread`, in
  nimbus.engines.kafka_common, as `trio.to_thread.run_sync(abandon_on_cancel=False)`), so a cancelled trio task
  never leaves a kafka-python object in use by a thread nobody waits for. Those calls are kept
  short (polls are sliced into <= 0.5 s pieces) so cancellation stays prompt.
- A KafkaConsumer is used by one thread at a time: each consumer/reader serialises its calls
  with a trio.Lock.
- A small produce batch is appended on the trio thread once the producer knows the topic's
  metadata (send() then never blocks); a topic's first batches and large ones go through a thread.
- Produce acknowledgements arrive as future callbacks on the producer's sender thread. A batch
  counts them down under a threading.Lock and wakes trio once, through the trio token, when the
  last one lands (no thread hop per record).
- kafka-python never creates topics here (`allow_auto_create_topics=False` everywhere, even if the
  broker allows it); an unknown topic is `LogUnavailable`, as in the memory engine.
- Every kafka-python exception becomes one of ours: `LogUnavailable`, `ProduceFailed`,
  `CommitFailed`.

Group semantics follow the memory engine (the reference): members split the partitions, and each
`PollResult` reports the rebalance news since the previous poll, to be applied as "remove
`revoked`, then add `assigned`" to the set reported so far. The cooperative-sticky assignor
(KIP-429) is used so a rebalance only moves the partitions that change owner; a partition kept
across a rebalance keeps its position. Commits are checked on the client against the current
assignment (Kafka's broker would accept a commit for any partition from a current member).
That bookkeeping is the librdkafka adapter's too: nimbus.engines.kafka_common.

This module holds the Log itself (`open_kafka_log`, `KafkaLog`: topics, offsets, the consumers'
configuration); beside it, `nimbus.engines.kafka_producer` (producing) and
`nimbus.engines.kafka_consumer` (group consumer and reader).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import kafka.errors as kerr
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.admin import KafkaAdminClient, OffsetSpec
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from loguru import logger

from nimbus.engines import kafka_common as kc
from nimbus.engines import replication as repl
from nimbus.engines.kafka_common import BOOTSTRAP_TIMEOUT_S, in_thread
from nimbus.engines.kafka_consumer import (
    _CLOSE_TIMEOUT_MS,
    KafkaGroupConsumer,
    KafkaReader,
    _RebalanceListener,
)
from nimbus.engines.kafka_producer import KafkaLogProducer
from nimbus.ports import LogProducer, LogUnavailable

__all__ = [
    "KafkaGroupConsumer",
    "KafkaLog",
    "KafkaLogProducer",
    "KafkaReader",
    "open_kafka_log",
]

_REQUEST_TIMEOUT_MS = 15_000
_TOPIC_READY_TIMEOUT_MS = 15_000


@asynccontextmanager
async def open_kafka_log(
    brokers: str, *, linger_ms: int = 2, client_id: str = "nimbus"
) -> AsyncIterator[KafkaLog]:
    """Connect to the cluster; LogUnavailable if it does not answer within ~15 s."""
    common: dict[str, Any] = {
        "bootstrap_servers": brokers.split(","),
        "client_id": client_id,
        "bootstrap_timeout_ms": int(BOOTSTRAP_TIMEOUT_S * 1000),
        "request_timeout_ms": _REQUEST_TIMEOUT_MS,
    }

    def make_producer() -> Any:
        return KafkaProducer(
            **common,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            batch_size=256 * 1024,
            max_block_ms=10_000,
            delivery_timeout_ms=kc.DELIVERY_TIMEOUT_MS,
            allow_auto_create_topics=False,
        )

    def make_admin() -> Any:
        return KafkaAdminClient(**common)

    await kc.probe(brokers, BOOTSTRAP_TIMEOUT_S)
    admin: Any = None
    producer: Any = None
    try:
        admin = await in_thread(make_admin)
        producer = await in_thread(make_producer)
    except (kerr.KafkaError, OSError, ValueError) as exc:
        if admin is not None:
            await in_thread(admin.close)
        raise kc.not_reachable(brokers, BOOTSTRAP_TIMEOUT_S, exc) from exc
    log = KafkaLog(brokers, client_id, producer, admin, make_producer)
    async with kc.closed_after(log._close):
        yield log


class KafkaLog(kc.LogBase):
    """The Log port over one Kafka cluster: a shared producer and admin client."""

    def __init__(
        self, brokers: str, client_id: str, producer: Any, admin: Any, make_producer: Any = None
    ) -> None:
        super().__init__(brokers, client_id)
        self._admin = admin
        self._producer = KafkaLogProducer(self, producer, make_producer)
        # Typed as the port: Log.producer is a plain (invariant) protocol attribute.
        self.producer: LogProducer = self._producer

    async def _close(self) -> None:
        try:
            await in_thread(functools.partial(self._producer._producer.close, timeout=5))
        except Exception as exc:  # closing must not mask the body's error
            logger.warning("kafka producer close failed: {}", exc)
        try:
            await in_thread(self._admin.close)
        except Exception as exc:
            logger.warning("kafka admin close failed: {}", exc)

    # -- topics -----------------------------------------------------------------------------

    def _topics(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(partition count, replication factor: its partitions' fewest replicas) of the
        existing, ready topics among `names` (worker thread)."""
        found: dict[str, tuple[int, int]] = {}
        for t in self._admin.describe_topics(list(names)):
            parts = t.get("partitions") or []
            if t.get("error_code", 0) == 0 and parts:
                rf = min(len(p.get("replica_nodes") or ()) for p in parts)
                found[t["name"]] = (len(parts), rf)
        return found

    def _describe(self, names: Sequence[str]) -> dict[str, int]:
        """Partition counts of the existing, ready topics among `names` (worker thread)."""
        return {n: count for n, (count, _rf) in self._topics(names).items()}

    def _brokers(self) -> int:
        """The number of (unfenced) brokers the cluster reports (worker thread)."""
        brokers = self._admin.describe_cluster().get("brokers") or []
        return sum(1 for b in brokers if not b.get("is_fenced"))

    async def _count_of(self, topic: str) -> int | None:
        try:
            found = await in_thread(self._describe, [topic])
        except kerr.KafkaError as exc:
            raise kc.unavailable(self.brokers, f"describe {topic!r}", exc) from exc
        return found.get(topic)

    async def ensure_topics(
        self,
        names: Sequence[str],
        partitions: int,
        *,
        replication: int | None = None,
        min_insync: int | None = None,
    ) -> dict[str, int]:
        def survey() -> tuple[dict[str, tuple[int, int]], int]:
            return self._topics(names), self._brokers()

        def create(missing: list[str], rf: int, isr: int) -> None:
            spec = {
                n: {
                    "num_partitions": partitions,
                    "replication_factor": rf,
                    "configs": {"min.insync.replicas": str(isr)},
                }
                for n in missing
            }
            resp = self._admin.create_topics(spec, raise_errors=False)
            for t in resp.get("topics", []):
                code = t.get("error_code", 0)
                if code not in (0, kerr.TopicAlreadyExistsError.errno):
                    err = kerr.for_code(code)
                    raise LogUnavailable(
                        f"creating topic {t.get('name')!r}: {err.__name__} "
                        f"{t.get('error_message') or ''}".rstrip()
                    )

        def ready() -> dict[str, int]:
            # wait_for_topics asks one broker; on a cluster another broker's metadata may not
            # list the new topic yet, so describe until every name is there (or time is up).
            self._admin.wait_for_topics(list(names), timeout_ms=_TOPIC_READY_TIMEOUT_MS)
            deadline = time.monotonic() + _TOPIC_READY_TIMEOUT_MS / 1000
            found = self._describe(names)
            while any(n not in found for n in names) and time.monotonic() < deadline:
                time.sleep(0.1)
                found = self._describe(names)
            return found

        try:
            existing, brokers = await in_thread(survey)
            missing, rf, isr = repl.plan(
                names,
                {n: rf for n, (_count, rf) in existing.items()},
                brokers,
                replication,
                min_insync,
            )
            if missing:
                await in_thread(create, missing, rf, isr)
            counts = await in_thread(ready)
        except kerr.KafkaError as exc:
            raise kc.unavailable(self.brokers, f"ensure_topics {names}", exc) from exc
        absent = [n for n in names if n not in counts]
        if absent:
            raise LogUnavailable(f"Kafka at {self.brokers}: topics {absent} not ready")
        self._counts.update(counts)
        return {n: counts[n] for n in names}

    # -- offsets ------------------------------------------------------------------------------

    async def _offsets(self, topic: str, spec: Any) -> dict[int, int]:
        n = await self.partition_count(topic)
        query = {KafkaTP(topic, p): spec for p in range(n)}
        try:
            res = await in_thread(self._admin.list_partition_offsets, query)
        except kerr.KafkaError as exc:
            raise kc.unavailable(self.brokers, f"offsets of {topic!r}", exc) from exc
        return {ktp.partition: int(v.offset) for ktp, v in sorted(res.items())}

    async def end_offsets(self, topic: str) -> dict[int, int]:
        return await self._offsets(topic, OffsetSpec.LATEST)

    async def begin_offsets(self, topic: str) -> dict[int, int]:
        return await self._offsets(topic, OffsetSpec.EARLIEST)

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        # All of the group's offsets, filtered: like the memory engine, an unknown group or
        # topic simply has no committed offsets.
        try:
            res = await in_thread(self._admin.list_group_offsets, {group: None})
        except kerr.GroupIdNotFoundError:
            return {}
        except kerr.KafkaError as exc:
            raise kc.unavailable(self.brokers, f"committed {group!r}", exc) from exc
        return {
            ktp.partition: int(om.offset)
            for ktp, om in sorted(res.get(group, {}).items())
            if ktp.topic == topic and om is not None and om.offset >= 0
        }

    # -- consumers ----------------------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.brokers.split(","),
            "client_id": self.client_id,
            "bootstrap_timeout_ms": int(BOOTSTRAP_TIMEOUT_S * 1000),
            "request_timeout_ms": _REQUEST_TIMEOUT_MS,
            "enable_auto_commit": False,
            "allow_auto_create_topics": False,
        }

    @asynccontextmanager
    async def consumer(
        self, topic: str, group: str, *, max_poll_records: int = 500
    ) -> AsyncIterator[KafkaGroupConsumer]:
        await self.partition_count(topic)
        listener = _RebalanceListener()

        def make() -> Any:
            c = KafkaConsumer(
                **self._consumer_config(),
                group_id=group,
                auto_offset_reset="earliest",
                max_poll_records=max_poll_records,
                partition_assignment_strategy=(CooperativeStickyAssignor,),
                # A SIGKILLed member holds its partitions until this expires (the broker's
                # group.min.session.timeout.ms is 6 s): results for its clients wait that long.
                session_timeout_ms=6_000,
                heartbeat_interval_ms=1_000,
                # A consumer whose first metadata predates a just-created topic gets no
                # partitions until its next metadata refresh (default 5 min): seen in CI as a
                # router that never received anything. Refresh every 5 s instead.
                metadata_max_age_ms=5_000,
            )
            try:
                # Join only once this consumer's metadata has the topic's partitions; otherwise
                # the assignor sees "no partition metadata" and hands out nothing.
                for _ in range(50):
                    if c.partitions_for_topic(topic):
                        break
                    time.sleep(0.2)
                c.subscribe([topic], listener=listener)
            except BaseException:
                c.close(autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)
                raise
            return c

        try:
            raw = await in_thread(make)
        except kerr.KafkaError as exc:
            raise kc.unavailable(self.brokers, f"consumer of {topic!r}", exc) from exc
        c = KafkaGroupConsumer(raw, listener, topic, group, max_poll_records)
        async with kc.closed_after(c.aclose):
            yield c

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[KafkaReader]:
        def make() -> Any:
            # auto_offset_reset "none": an out-of-range fetch raises instead of silently jumping.
            return KafkaConsumer(
                **self._consumer_config(),
                group_id=None,
                auto_offset_reset="none",
                fetch_max_wait_ms=kc.READER_FETCH_WAIT_MS,
            )

        try:
            raw = await in_thread(make)
        except kerr.KafkaError as exc:
            raise kc.unavailable(self.brokers, "reader", exc) from exc
        r = KafkaReader(self, raw)
        async with kc.closed_after(r.aclose):
            yield r
