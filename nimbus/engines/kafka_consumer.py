"""Consuming on kafka-python (the adapter nimbus.engines.kafka): a group member
(`KafkaGroupConsumer`, fed by `_RebalanceListener`) and a group-less reader (`KafkaReader`)."""

from __future__ import annotations

import functools
import time
from typing import Any

import kafka.errors as kerr
import trio
from kafka import TopicPartition as KafkaTP
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from nimbus.engines import kafka_common as kc
from nimbus.engines.kafka_common import in_thread
from nimbus.ports import (
    LogUnavailable,
    PollResult,
    Record,
    TopicPartition,
)

_COMMIT_TIMEOUT_MS = 10_000
_CLOSE_TIMEOUT_MS = 5_000


async def _close(c: Any) -> None:
    """Close a KafkaConsumer (a group member leaves the group: LeaveGroup)."""
    await in_thread(functools.partial(c.close, autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS))


def _record(r: Any) -> Record:
    return Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)


def _flatten(raw: dict[Any, list[Any]]) -> list[Record]:
    out: list[Record] = []
    for ktp in sorted(raw, key=lambda t: (t.topic, t.partition)):
        out.extend(_record(r) for r in raw[ktp])
    return out


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

    _CLIENT_ERRORS = (kerr.KafkaError,)

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

    async def _commit_now(self, offsets: dict[TopicPartition, int]) -> None:
        await in_thread(self._commit_sync, offsets)

    async def _commit_final(self, offsets: dict[TopicPartition, int]) -> None:
        await in_thread(self._commit_owned_sync, offsets)

    async def _close_consumer(self) -> None:
        await _close(self._c)


class KafkaReader(kc.ReaderBase[Any]):
    """A LogReader: one group-less KafkaConsumer, re-assigned/seeked only when needed. What it
    assigns (`_assigned`) is a kafka-python TopicPartition."""

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

    async def _fetch(
        self, topic: str, partition: int, offset: int, max_records: int, deadline: float
    ) -> list[Record]:
        ktp = KafkaTP(topic, partition)
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

    async def _close_consumer(self) -> None:
        await _close(self._c)
