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
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import kafka.errors as kerr
import trio
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.admin import KafkaAdminClient, OffsetSpec
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.structs import OffsetAndMetadata
from loguru import logger

from nimbus.engines import kafka_common as kc
from nimbus.engines import replication as repl
from nimbus.engines.kafka_common import BOOTSTRAP_TIMEOUT_S, in_thread
from nimbus.engines.murmur2 import partition_for
from nimbus.ports import (
    CommitFailed,
    EngineError,
    LogProducer,
    LogUnavailable,
    PollResult,
    ProduceFailed,
    Record,
    TopicPartition,
    Written,
)

_REQUEST_TIMEOUT_MS = 15_000
_COMMIT_TIMEOUT_MS = 10_000
_CLOSE_TIMEOUT_MS = 5_000
_TOPIC_READY_TIMEOUT_MS = 15_000
_INLINE_SEND = (
    32  # records of a produce batch appended on the trio thread, at most (see send_batch)
)
_PARTITION_CACHE = 200_000  # keys whose partition is remembered (cleared when full)


def _record(r: Any) -> Record:
    return Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)


def _flatten(raw: dict[Any, list[Any]]) -> list[Record]:
    out: list[Record] = []
    for ktp in sorted(raw, key=lambda t: (t.topic, t.partition)):
        out.extend(_record(r) for r in raw[ktp])
    return out


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


class _RebalanceListener(kc.RebalanceEvents, ConsumerRebalanceListener):  # type: ignore[misc]
    """Ordered rebalance events; kafka-python calls it on its IO thread."""

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.add(False, revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.add(True, assigned)

    def on_partitions_lost(self, lost: Any) -> None:
        self.add(False, lost)


class KafkaGroupConsumer(kc.GroupConsumerBase):
    """A LogConsumer: one KafkaConsumer in a group, subscribed to one topic."""

    def __init__(
        self, raw: Any, listener: _RebalanceListener, topic: str, group: str, max_poll_records: int
    ) -> None:
        super().__init__(listener, topic, group, max_poll_records)
        self._c = raw

    def _poll_sync(
        self, max_records: int, timeout_ms: int, commit: dict[TopicPartition, int] | None = None
    ) -> list[Record]:
        if commit:
            self._commit_async(commit)
        return _flatten(self._c.poll(timeout_ms=timeout_ms, max_records=max_records))

    def _send_commit(self, mine: dict[TopicPartition, int]) -> None:
        """Sends the commit (poll thread); `done` hears its answer in a later poll."""
        payload = {
            KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(off, "", -1)
            for tp, off in mine.items()
        }

        def done(_offsets: Any, result: Any) -> None:
            if isinstance(result, BaseException):
                self._refuse(mine)

        try:
            self._c.commit_async(payload, callback=done)
        except kerr.KafkaError:
            self._refuse(mine)

    async def poll(self, max_records: int, timeout: float) -> PollResult:
        budget, deadline = self._poll_window(max_records, timeout)
        async with self._lock:
            while True:
                left = deadline - trio.current_time()
                slice_ms = int(max(0.0, min(left, kc.SLICE_S)) * 1000)
                # Not abandoned on cancel: once kafka-python has handed records over (and moved
                # its position past them), to_thread returns them and this method returns them
                # before any checkpoint, so a cancelled poll never loses records.
                commit = self._take_later()
                try:
                    fetched = await in_thread(self._poll_sync, budget, slice_ms, commit)
                except kerr.KafkaError as exc:
                    raise self._poll_failed(commit, exc) from exc
                result = self._result(fetched, deadline)
                if result is not None:
                    return result

    def _commit_sync(self, offsets: dict[TopicPartition, int]) -> None:
        kc.check_assigned(offsets, kc.as_tps(self._c.assignment()))
        payload = {
            KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(off, "", -1)
            for tp, off in offsets.items()
        }
        self._c.commit(payload, timeout_ms=_COMMIT_TIMEOUT_MS)

    def _assigned_only(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The offsets of partitions assigned to this member now (poll thread)."""
        return kc.owned_only(offsets, kc.as_tps(self._c.assignment()))

    def _commit_owned_sync(self, offsets: dict[TopicPartition, int]) -> None:
        mine = self._assigned_only(offsets)
        if mine:
            self._commit_sync(mine)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not self._commit_wanted(offsets):
            return
        async with self._lock:
            try:
                await in_thread(self._commit_sync, offsets)
            except EngineError:
                raise
            except kerr.KafkaError as exc:
                raise CommitFailed(f"commit {self.group}/{self.topic}: {exc!r}") from exc

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        async with self._lock:
            later = self._take_later()
            if later:  # what commit_later left for a poll that will not come
                try:
                    await in_thread(self._commit_owned_sync, later)
                except Exception as exc:
                    logger.info("{}/{}: final commit failed: {!r}", self.group, self.topic, exc)
            try:
                # Leaves the group (LeaveGroup), so the others rebalance at once.
                await in_thread(
                    functools.partial(self._c.close, autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)
                )
            except Exception as exc:
                logger.warning("closing consumer {}/{} failed: {}", self.group, self.topic, exc)


class KafkaReader:
    """A LogReader: one group-less KafkaConsumer, re-assigned/seeked only when needed."""

    def __init__(self, log: KafkaLog, raw: Any) -> None:
        self._log = log
        self._c = raw
        self._lock = trio.Lock()
        self._assigned: Any = None  # the kafka TopicPartition assigned now
        self._next: int | None = None  # the consumer's position, when we know it
        self.closed = False

    def __repr__(self) -> str:
        return f"<KafkaReader at {self._assigned} next={self._next}>"

    def _fetch_sync(self, ktp: Any, offset: int, max_records: int, timeout_ms: int) -> list[Record]:
        c = self._c
        if self._assigned != ktp:
            c.assign([ktp])
            self._assigned = ktp
            self._next = None
        if self._next != offset:
            c.seek(ktp, offset)
            self._next = offset
        try:
            raw = c.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kerr.OffsetOutOfRangeError:
            begin = c.beginning_offsets([ktp])[ktp]
            if offset < begin:  # deleted by retention: continue from the oldest record kept
                c.seek(ktp, begin)
                self._next = begin
                raw = c.poll(timeout_ms=timeout_ms, max_records=max_records)
            else:  # beyond the end: nothing yet; look again on the next slice
                self._next = None
                time.sleep(timeout_ms / 1000)
                return []
        records = [_record(r) for r in raw.get(ktp, [])]
        if records:
            self._next = records[-1].offset + 1
        return records

    async def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_records: int,
        timeout: float,
    ) -> list[Record]:
        if self.closed:
            raise LogUnavailable("reader is closed")
        await kc.check_partition(self._log, topic, partition)
        ktp = KafkaTP(topic, partition)
        deadline = trio.current_time() + max(timeout, 0.0)
        async with self._lock:
            while True:
                left = deadline - trio.current_time()
                slice_ms = int(max(0.0, min(left, kc.SLICE_S)) * 1000)
                try:
                    records = await in_thread(
                        self._fetch_sync, ktp, max(offset, 0), max(1, max_records), slice_ms
                    )
                except kerr.KafkaError as exc:
                    self._next = None
                    raise LogUnavailable(f"fetch {topic}[{partition}]@{offset}: {exc!r}") from exc
                if records or trio.current_time() >= deadline:
                    return records

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        async with self._lock:
            try:
                await in_thread(
                    functools.partial(self._c.close, autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)
                )
            except Exception as exc:
                logger.warning("closing reader failed: {}", exc)
