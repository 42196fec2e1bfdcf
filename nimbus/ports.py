"""The ports everything above the engines talks to: the log, and the state store's three ports.

Nothing outside `nimbus/engines/` imports kafka-python or redis. Each engine maps its library's
errors into the exceptions below, so callers handle one family of errors whatever the engine.

The log is Kafka's model: topics split into partitions, records keyed, the partition chosen by
Kafka's murmur2 partitioner, per-partition order, consumer groups with committed offsets,
watermarks.

The state store is three ports, split by what their data is keyed on (a client, a lease name,
a channel), which is also what a store split over several nodes would shard them by:

- `ClientRecords`: one `ClientRecord` per client, changed only by the transitions of
  `nimbus.core.lifecycle`, applied atomically (a Lua script on Redis, a plain function call in
  memory). Every call but the two scans names the clients it touches;
- `Leases`: named, expiring locks with one owner each;
- `PubSub`: at-most-once messages on named channels.

`StateStore` is the three together, as the engines provide them; a caller is typed with the
narrowest port it uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from nimbus.core.lifecycle import ClientRecord, ConnectResult, RouteDecision


class EngineError(Exception):
    """Base of every error an engine raises."""


class LogUnavailable(EngineError):
    """The log (Kafka) could not be reached or did not answer in time."""


class ProduceFailed(EngineError):
    """A record was not durably written to the log."""


class CommitFailed(EngineError):
    """An offset commit was refused (e.g. the partition was reassigned to another member)."""


class StateUnavailable(EngineError):
    """The state store (Redis) could not be reached."""


class TopicMismatch(EngineError):
    """The topics' partition counts differ; per-client ordering depends on them being equal."""


@dataclass(frozen=True, slots=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class Written:
    """Where a produced record landed."""

    partition: int
    offset: int


@dataclass(slots=True)
class PollResult:
    records: list[Record] = field(default_factory=list)
    # Rebalance news since the previous poll: partitions taken away and handed to this member.
    revoked: set[TopicPartition] = field(default_factory=set)
    assigned: set[TopicPartition] = field(default_factory=set)


class LogProducer(Protocol):
    async def send_batch(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> list[Written]:
        """Write (key, value) records; return when every one is acknowledged, in input order.

        Records with the same key keep their relative order. Raises ProduceFailed if any record
        could not be written (records before it may have been written).
        """
        ...

    def partition_for(self, topic: str, key: bytes) -> int: ...


class LogConsumer(Protocol):
    """A member of a consumer group subscribed to one topic."""

    async def poll(self, max_records: int, timeout: float) -> PollResult: ...

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the *next* offset to read for each partition."""
        ...

    def commit_later(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit these offsets without waiting: with the next poll, in the background. Offsets
        of partitions this member no longer owns are dropped; a refused commit is retried with
        the next poll while the partition is still owned. For hot paths (at least once: an
        offset committed late only means records read again after a crash)."""
        ...

    async def aclose(self) -> None: ...


class LogReader(Protocol):
    """Random access to a partition, outside any group (used by the replay)."""

    async def fetch(
        self, topic: str, partition: int, offset: int, max_records: int, timeout: float
    ) -> list[Record]:
        """Records from `offset` on (at most max_records); waits up to `timeout` for any."""
        ...

    async def aclose(self) -> None: ...


class Log(Protocol):
    producer: LogProducer

    async def ensure_topics(
        self,
        names: Sequence[str],
        partitions: int,
        *,
        replication: int | None = None,
        min_insync: int | None = None,
    ) -> dict[str, int]:
        """Create missing topics; return each topic's partition count.

        Created topics get `replication` replicas and the topic config min.insync.replicas =
        `min_insync`; None is auto, from the brokers the cluster reports (nimbus.topics:
        replication_factor, min_insync_replicas); ConfigError if the cluster cannot meet them.
        Existing topics are not changed: one with fewer replicas than asked is logged as a
        warning. A log without replicas (the memory engine) ignores both."""
        ...

    async def end_offsets(self, topic: str) -> dict[int, int]: ...

    async def begin_offsets(self, topic: str) -> dict[int, int]: ...

    async def committed(self, group: str, topic: str) -> dict[int, int]: ...

    def consumer(
        self, topic: str, group: str, *, max_poll_records: int = 500
    ) -> AbstractAsyncContextManager[LogConsumer]: ...

    def reader(self) -> AbstractAsyncContextManager[LogReader]: ...


@dataclass(frozen=True, slots=True)
class AckItem:
    client_id: str
    acked: int  # highest delivery id the client has received (cumulative)


@dataclass(frozen=True, slots=True)
class DlqWrite:
    client_id: str
    delivery_id: int
    partition: int
    offset: int


class ClientRecords(Protocol):
    """One `ClientRecord` per client, changed only by the transitions of `nimbus.core.lifecycle`.

    Every call but the two scans (`replaying`, `all_clients`) names the clients it touches, and
    no item reads another client's record: a batch cut into groups of clients (e.g. per Redis
    Cluster slot), each group in order, gives the same results.
    """

    # Transitions (a missing record reads as `lifecycle.new_record`, and is created).

    async def connect(self, client_id: str, pod: str) -> ConnectResult: ...

    async def disconnect(self, client_id: str, epoch: int) -> bool: ...

    async def route(self, items: Sequence[tuple[str, int]]) -> list[RouteDecision]:
        """Decide live or DLQ for each (client_id, delivery_id), in order, atomically."""
        ...

    async def divert(self, items: Sequence[tuple[str, int]]) -> None:
        """Results (client_id, delivery_id) that failed live delivery are going to the DLQ."""
        ...

    async def dlq_written(self, items: Sequence[DlqWrite]) -> None: ...

    async def ack(self, items: Sequence[AckItem]) -> list[bool]:
        """Store cumulative acks; per item, whether the client is now ready for the flip to
        LIVE (`lifecycle.flip_ready`), so the status manager can be asked at once."""
        ...

    async def advance_cursor(self, items: Sequence[tuple[str, int]]) -> None:
        """Replay progress: (client_id, next DLQ offset to scan)."""
        ...

    async def try_flip(self, client_ids: Sequence[str]) -> list[bool]:
        """REPLAYING -> LIVE for each client whose backlog is acknowledged."""
        ...

    # Reads by client.

    async def get(self, client_id: str) -> ClientRecord | None: ...

    async def get_many(self, client_ids: Sequence[str]) -> list[ClientRecord | None]:
        """`get` for several clients in one round trip (each record consistent on its own)."""
        ...

    # Scans of every client.

    async def replaying(self) -> list[str]:
        """The ids of the clients whose status is REPLAYING."""
        ...

    async def all_clients(self) -> list[ClientRecord]:
        """Every record (each consistent on its own, not one snapshot of them all)."""
        ...


class Leases(Protocol):
    """Named locks held by one owner until released or until their time to live runs out."""

    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew a lease; true if `owner` holds it now."""
        ...

    async def release_lease(self, name: str, owner: str) -> None: ...


class PubSub(Protocol):
    """At-most-once messages on named channels: a message reaches the subscriptions active when
    it is published; one that is cut (or falls too far behind) loses messages."""

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish (channel, payload) pairs, pipelined; order kept per channel."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Messages published to `channel` after the subscription is active. The iterator
        raises StateUnavailable when the subscription is lost."""
        ...


class StateStore(ClientRecords, Leases, PubSub, Protocol):
    """The state engine: the three state ports on one object (`MemoryState`, `RedisState`)."""


class RecordsAndPubSub(ClientRecords, PubSub, Protocol):
    """What a role that moves client records and talks over channels, but holds no lease, needs
    (the pod, the result router, the status manager)."""
