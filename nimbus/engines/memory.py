"""The in-memory engine: the embedded default of `python -m nimbus` and the suite's fake broker.

Faithful to the semantics the rest of Nimbus relies on: Kafka's murmur2 partitioner, per-partition
order, consumer groups that split partitions among members and report rebalances, committed
offsets, watermarks, random-access reads; a state store whose transitions are the functions of
`nimbus.core.lifecycle` applied atomically (no await inside a transition), leases, and at-most-once
pub/sub with bounded subscriber buffers (a slow subscriber loses messages, as on Redis).

Everything lives in one trio run; nothing here is thread-safe, nothing needs to be.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar, TypeVarTuple

import trio
from loguru import logger

from nimbus.core import lifecycle
from nimbus.core.lifecycle import ClientRecord, ConnectResult, RouteDecision, Status
from nimbus.engines.murmur2 import partition_for
from nimbus.ports import (
    AckItem,
    ClientRecords,
    CommitFailed,
    DlqWrite,
    Leases,
    LogUnavailable,
    PollResult,
    ProduceFailed,
    PubSub,
    Record,
    StateUnavailable,
    TopicPartition,
    Written,
)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@dataclass
class _Topic:
    partitions: list[list[Record]]
    changed: trio.Event = field(default_factory=trio.Event)
    # Log start offset per partition (records below it are gone, as after Kafka's retention).
    starts: dict[int, int] = field(default_factory=dict)

    def start(self, partition: int) -> int:
        return self.starts.get(partition, 0)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass
class _Group:
    members: list[MemoryConsumer] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class MemoryProducer:
    def __init__(self, log: MemoryLog) -> None:
        self._log = log
        # Test hook: the next N send_batch calls fail (as a Kafka produce that times out would).
        self.fail_next = 0

    def partition_for(self, topic: str, key: bytes) -> int:
        return partition_for(key, len(self._log.topic(topic).partitions))

    async def send_batch(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> list[Written]:
        await trio.lowlevel.checkpoint()
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ProduceFailed(f"injected produce failure on {topic}")
        t = self._log.topic(topic)
        now = int(time.time() * 1000)
        out = []
        for key, value in items:
            p = partition_for(key, len(t.partitions))
            part = t.partitions[p]
            part.append(Record(topic, p, len(part), key, value, now))
            out.append(Written(p, len(part) - 1))
        if items:
            t.notify()
        return out


class MemoryConsumer:
    def __init__(self, log: MemoryLog, topic: str, group: str, max_poll_records: int) -> None:
        self._log = log
        self.topic = topic
        self.group = group
        self.max_poll_records = max_poll_records
        self.assignment: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self._revoked: set[TopicPartition] = set()
        self._assigned: set[TopicPartition] = set()
        self.closed = False

    def _set_assignment(self, new: set[TopicPartition]) -> None:
        g = self._log.group(self.group)
        revoked = self.assignment - new
        added = new - self.assignment
        for tp in revoked:
            self.positions.pop(tp, None)
        for tp in added:
            self.positions[tp] = g.committed.get(tp, 0)
        # News is applied as "remove revoked, then add assigned": a partition assigned and taken
        # away again before any poll reported it is no news at all (reporting it in both sets
        # would read as "still owned").
        for tp in revoked:
            if tp in self._assigned:
                self._assigned.discard(tp)
            else:
                self._revoked.add(tp)
        self._assigned |= added
        self.assignment = set(new)

    async def poll(self, max_records: int, timeout: float) -> PollResult:
        if self.closed:
            raise LogUnavailable("consumer is closed")
        t = self._log.topic(self.topic)
        with trio.move_on_after(timeout):
            while True:
                await trio.lowlevel.checkpoint()
                result = PollResult(revoked=self._revoked, assigned=self._assigned)
                self._revoked, self._assigned = set(), set()
                budget = min(max_records, self.max_poll_records)
                for tp in sorted(self.assignment, key=lambda x: x.partition):
                    if budget <= 0:
                        break
                    pos = max(self.positions[tp], t.start(tp.partition))
                    chunk = t.partitions[tp.partition][pos : pos + budget]
                    if chunk:
                        result.records.extend(chunk)
                        self.positions[tp] = pos + len(chunk)
                        budget -= len(chunk)
                if result.records or result.revoked or result.assigned:
                    return result
                await t.changed.wait()
        return PollResult()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await trio.lowlevel.checkpoint()
        foreign = set(offsets) - self.assignment
        if foreign:
            raise CommitFailed(
                f"partitions not assigned to this member: {sorted(foreign, key=str)}"
            )
        self._log.group(self.group).committed.update(offsets)

    def commit_later(self, offsets: dict[TopicPartition, int]) -> None:
        if self.closed:
            return
        mine = {tp: off for tp, off in offsets.items() if tp in self.assignment}
        self._log.group(self.group).committed.update(mine)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._log.leave(self)


class MemoryReader:
    def __init__(self, log: MemoryLog) -> None:
        self._log = log

    async def fetch(
        self, topic: str, partition: int, offset: int, max_records: int, timeout: float
    ) -> list[Record]:
        t = self._log.topic(topic)
        with trio.move_on_after(timeout):
            while True:
                await trio.lowlevel.checkpoint()
                # Below the log start (retention): from the oldest record kept, as Kafka does.
                offset = max(offset, t.start(partition))
                chunk = t.partitions[partition][offset : offset + max_records]
                if chunk:
                    return chunk
                await t.changed.wait()
        return []

    async def aclose(self) -> None:
        pass


class MemoryLog:
    def __init__(self, default_partitions: int = 8) -> None:
        self.default_partitions = default_partitions
        self.topics: dict[str, _Topic] = {}
        self.groups: dict[str, _Group] = {}
        self.producer = MemoryProducer(self)

    def topic(self, name: str) -> _Topic:
        t = self.topics.get(name)
        if t is None:
            raise LogUnavailable(f"unknown topic {name!r}")
        return t

    def group(self, name: str) -> _Group:
        return self.groups.setdefault(name, _Group())

    async def ensure_topics(
        self,
        names: Sequence[str],
        partitions: int,
        *,
        replication: int | None = None,  # one copy in memory: accepted and ignored
        min_insync: int | None = None,
    ) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        for name in names:
            if name not in self.topics:
                self.topics[name] = _Topic([[] for _ in range(partitions)])
        return {name: len(self.topics[name].partitions) for name in names}

    async def end_offsets(self, topic: str) -> dict[int, int]:
        await trio.lowlevel.checkpoint()
        return {p: len(part) for p, part in enumerate(self.topic(topic).partitions)}

    async def begin_offsets(self, topic: str) -> dict[int, int]:
        await trio.lowlevel.checkpoint()
        t = self.topic(topic)
        return {p: t.start(p) for p in range(len(t.partitions))}

    def delete_records(self, topic: str, partition: int, before: int) -> None:
        """Test hook: records of `partition` below offset `before` age out (Kafka's retention,
        or its DeleteRecords request)."""
        t = self.topic(topic)
        t.starts[partition] = max(t.start(partition), min(before, len(t.partitions[partition])))

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        await trio.lowlevel.checkpoint()
        return {
            tp.partition: off
            for tp, off in self.group(group).committed.items()
            if tp.topic == topic
        }

    def _rebalance(self, group: str, topic: str) -> None:
        members = [m for m in self.group(group).members if m.topic == topic]
        n = len(self.topic(topic).partitions)
        for i, m in enumerate(members):
            m._set_assignment({TopicPartition(topic, p) for p in range(n) if p % len(members) == i})
        self.topic(topic).notify()

    def leave(self, consumer: MemoryConsumer) -> None:
        g = self.group(consumer.group)
        if consumer in g.members:
            g.members.remove(consumer)
            consumer._set_assignment(set())
            self._rebalance(consumer.group, consumer.topic)

    @asynccontextmanager
    async def consumer(
        self, topic: str, group: str, *, max_poll_records: int = 500
    ) -> AsyncIterator[MemoryConsumer]:
        self.topic(topic)
        c = MemoryConsumer(self, topic, group, max_poll_records)
        self.group(group).members.append(c)
        self._rebalance(group, topic)
        try:
            yield c
        finally:
            await c.aclose()

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[MemoryReader]:
        yield MemoryReader(self)


class MemoryState(ClientRecords, Leases, PubSub):
    """The state store's three ports (`nimbus.ports.StateStore`) in plain dicts.

    `record_ttl` (seconds, 0: never): a record left OFFLINE with nothing pending by a
    disconnect expires this long after it, unless a connect or a backlog comes first (the Redis
    store does the same with PEXPIRE/PERSIST). `subscriber_buffer`: messages a subscription
    holds before the next ones to it are dropped (counted in `dropped`)."""

    def __init__(self, subscriber_buffer: int = 10_000, record_ttl: float = 0.0) -> None:
        self.record_ttl = record_ttl
        self._expires: dict[str, float] = {}  # client -> trio time its record expires
        self.records: dict[str, ClientRecord] = {}
        self.leases: dict[str, tuple[str, float]] = {}
        self.channels: dict[str, set[trio.MemorySendChannel[bytes]]] = {}
        self.subscriber_buffer = subscriber_buffer
        self.dropped = 0
        self._broken: set[trio.MemorySendChannel[bytes]] = set()
        # Test hook: while set, every call raises StateUnavailable-like errors from the caller's view.
        self.down = False

    # -- plumbing ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.down:
            raise StateUnavailable("in-memory state store marked down")

    def _rec(self, client_id: str) -> ClientRecord | None:
        """The stored record, unless it has expired (then it is gone, as in Redis)."""
        at = self._expires.get(client_id)
        if at is not None and at <= trio.current_time():
            del self._expires[client_id]
            self.records.pop(client_id, None)
        return self.records.get(client_id)

    def _store(self, client_id: str, old: ClientRecord, new: ClientRecord) -> None:
        self.records[client_id] = new
        if new.status is not Status.OFFLINE or (new.backlog and not old.backlog):
            self._expires.pop(client_id, None)  # connected, or something is pending again

    def _apply(
        self, client_id: str, fn: Callable[[ClientRecord, *Ts], tuple[ClientRecord, T]], *args: *Ts
    ) -> T:
        rec = self._rec(client_id) or lifecycle.new_record(client_id)
        new, out = fn(rec, *args)
        self._store(client_id, rec, new)
        return out

    def _update(
        self, client_id: str, fn: Callable[[ClientRecord, *Ts], ClientRecord], *args: *Ts
    ) -> ClientRecord:
        rec = self._rec(client_id) or lifecycle.new_record(client_id)
        new = fn(rec, *args)
        self._store(client_id, rec, new)
        return new

    # -- ClientRecords: transitions ------------------------------------------------------------

    async def connect(self, client_id: str, pod: str) -> ConnectResult:
        await trio.lowlevel.checkpoint()
        self._check()
        return self._apply(client_id, lifecycle.connect, pod)

    async def disconnect(self, client_id: str, epoch: int) -> bool:
        await trio.lowlevel.checkpoint()
        self._check()
        ok = self._apply(client_id, lifecycle.disconnect, epoch)
        rec = self.records[client_id]
        if ok and self.record_ttl and not rec.backlog:
            self._expires[client_id] = trio.current_time() + self.record_ttl
        return ok

    async def route(self, items: Sequence[tuple[str, int]]) -> list[RouteDecision]:
        await trio.lowlevel.checkpoint()
        self._check()
        return [self._apply(cid, lifecycle.route, d) for cid, d in items]

    async def divert(self, items: Sequence[tuple[str, int]]) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        for cid, d in items:
            self._update(cid, lifecycle.divert, d)

    async def dlq_written(self, items: Sequence[DlqWrite]) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        for w in items:
            self._update(w.client_id, lifecycle.dlq_written, w.delivery_id, w.offset)

    async def ack(self, items: Sequence[AckItem]) -> list[bool]:
        await trio.lowlevel.checkpoint()
        self._check()
        return [
            lifecycle.flip_ready(self._update(a.client_id, lifecycle.ack, a.acked)) for a in items
        ]

    async def advance_cursor(self, items: Sequence[tuple[str, int]]) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        for cid, off in items:
            self._update(cid, lifecycle.advance_cursor, off)

    async def try_flip(self, client_ids: Sequence[str]) -> list[bool]:
        await trio.lowlevel.checkpoint()
        self._check()
        return [self._apply(cid, lifecycle.try_flip) for cid in client_ids]

    # -- ClientRecords: reads and scans --------------------------------------------------------

    async def get(self, client_id: str) -> ClientRecord | None:
        await trio.lowlevel.checkpoint()
        self._check()
        return self._rec(client_id)

    async def get_many(self, client_ids: Sequence[str]) -> list[ClientRecord | None]:
        await trio.lowlevel.checkpoint()
        self._check()
        return [self._rec(c) for c in client_ids]

    async def replaying(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        self._check()
        return [
            c for c in list(self.records) if (r := self._rec(c)) and r.status is Status.REPLAYING
        ]

    async def all_clients(self) -> list[ClientRecord]:
        await trio.lowlevel.checkpoint()
        self._check()
        return [r for c in list(self.records) if (r := self._rec(c)) is not None]

    # -- Leases --------------------------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        await trio.lowlevel.checkpoint()
        self._check()
        now = trio.current_time()
        holder = self.leases.get(name)
        if holder is None or holder[0] == owner or holder[1] <= now:
            self.leases[name] = (owner, now + ttl_ms / 1000)
            return True
        return False

    async def release_lease(self, name: str, owner: str) -> None:
        await trio.lowlevel.checkpoint()
        holder = self.leases.get(name)
        if holder is not None and holder[0] == owner:
            del self.leases[name]

    # -- PubSub --------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        for channel, payload in messages:
            for sub in list(self.channels.get(channel, ())):
                try:
                    sub.send_nowait(payload)
                except trio.WouldBlock:
                    self.dropped += 1
                    logger.warning("pub/sub: subscriber of {} is full; message dropped", channel)
                except trio.BrokenResourceError:
                    self.channels[channel].discard(sub)

    def break_subscriptions(self) -> int:
        """Test hook: every current subscription fails, as Redis drops subscribers when their
        connection goes; their iterators raise StateUnavailable. Returns how many broke."""
        n = 0
        for subs in self.channels.values():
            for send in list(subs):
                self._broken.add(send)
                send.close()
                n += 1
            subs.clear()
        return n

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        self._check()
        send, recv = trio.open_memory_channel[bytes](self.subscriber_buffer)
        self.channels.setdefault(channel, set()).add(send)

        broken = self._broken

        class Messages:
            def __aiter__(self) -> Messages:
                return self

            async def __anext__(self) -> bytes:
                try:
                    return await recv.receive()
                except trio.EndOfChannel:
                    if send in broken:
                        broken.discard(send)
                        raise StateUnavailable(
                            f"in-memory subscription to {channel!r} broken"
                        ) from None
                    raise StopAsyncIteration from None

        try:
            async with recv:
                yield Messages()
        finally:
            self.channels.get(channel, set()).discard(send)
            send.close()


@dataclass
class MemoryEngine:
    log: MemoryLog = field(default_factory=MemoryLog)
    state: MemoryState = field(default_factory=MemoryState)
