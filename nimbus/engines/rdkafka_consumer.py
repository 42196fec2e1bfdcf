"""Consuming on librdkafka (the adapter nimbus.engines.rdkafka): a group member
(`RdkafkaGroupConsumer`) and a group-less reader (`RdkafkaReader`), each calling its librdkafka
consumer through a `_Handle`."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as RdTP
from loguru import logger

from nimbus.engines import kafka_common as kc
from nimbus.engines.kafka_common import in_thread
from nimbus.engines.rdkafka_handle import (
    _REQUEST_TIMEOUT_S,
    _Busy,
    _close_bounded,
    _Handle,
    _in_thread_abandonable,
)
from nimbus.engines.rdkafka_wakeup import _QueueFd
from nimbus.ports import (
    CommitFailed,
    EngineError,
    LogUnavailable,
    PollResult,
    Record,
    TopicPartition,
)

if TYPE_CHECKING:
    from nimbus.engines.rdkafka import RdkafkaLog

# A synchronous commit waits this long at most (librdkafka's has no timeout: a commit waits for
# the group coordinator while there is none).
_COMMIT_TIMEOUT_S = 10.0

# Consumer errors after which polling on is pointless: the topic is not ours to read. (An unknown
# topic is not among them: a consumer's first metadata may predate a just-created topic, as may
# a restarted broker's; librdkafka keeps looking, and says so in the log.)
_FATAL_CONSUMER_ERRORS = frozenset(
    {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}
)


def _record(m: Message) -> Record:
    ts_type, ts = m.timestamp()
    return Record(
        m.topic() or "",
        -1 if (p := m.partition()) is None else p,
        -1 if (o := m.offset()) is None else o,
        m.key(),
        m.value() or b"",
        0 if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
    )


class _RebalanceListener(kc.RebalanceEvents):
    """Ordered rebalance events; librdkafka calls it inside poll/consume/close."""

    # With cooperative-sticky these are the incremental changes; confluent-kafka applies them
    # (incremental_assign/unassign) after the callback returns.
    def on_assign(self, _consumer: Consumer, partitions: list[RdTP]) -> None:
        self.add(True, partitions)

    def on_revoke(self, _consumer: Consumer, partitions: list[RdTP]) -> None:
        self.add(False, partitions)

    def on_lost(self, _consumer: Consumer, partitions: list[RdTP]) -> None:
        self.add(False, partitions)


class RdkafkaGroupConsumer(kc.GroupConsumerBase):
    """A LogConsumer: one librdkafka consumer in a group, subscribed to one topic."""

    _listener: _RebalanceListener
    _CLIENT_ERRORS = (KafkaException, RuntimeError)

    def __init__(self, topic: str, group: str, max_poll_records: int) -> None:
        super().__init__(_RebalanceListener(), topic, group, max_poll_records)
        self._c: Consumer = None  # type: ignore[assignment]  # set by RdkafkaLog.consumer
        self._error: EngineError | None = None  # to raise from the next poll
        # Every call into _c holds it, on any thread, abandoned commits included; the close
        # waits for the call in flight, and nothing calls _c after it.
        self._handle = _Handle(f"consumer {group}/{topic}")
        # Set when librdkafka can wake this consumer's polls through a pipe (no thread waits).
        self._fd: _QueueFd | None = None

    # -- callbacks (served inside consume/poll/close, on the thread making the call) ----------

    def _on_commit(self, err: KafkaError | None, partitions: list[RdTP]) -> None:
        """The answer to an asynchronous commit: keep what was refused for a retry."""
        refused = {
            kc.tp(p.topic, p.partition): p.offset
            for p in partitions
            if (err is not None or p.error is not None) and p.offset >= 0
        }
        if refused:
            self._refuse(refused)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            logger.error("librdkafka consumer {}/{}: fatal error {}", self.group, self.topic, err)
            self._error = LogUnavailable(f"consumer {self.group}/{self.topic}: {err}")
        else:
            logger.info("librdkafka consumer {}/{}: {}", self.group, self.topic, err)

    # -- polling -------------------------------------------------------------------------------

    def _records(self, msgs: list[Message]) -> list[Record]:
        out: list[Record] = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(_record(m))
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal() or err.code() in _FATAL_CONSUMER_ERRORS:
                self._error = LogUnavailable(f"poll {self.group}/{self.topic}: {err}")
            else:  # transient: librdkafka retries it
                logger.info("librdkafka consumer {}/{}: {}", self.group, self.topic, err)
        return out

    def _take_ready(self, commit: dict[TopicPartition, int], budget: int) -> list[Message]:
        """Send `commit`, take what librdkafka already holds: never blocks (trio thread, the
        handle held)."""
        if commit:
            self._commit_async(commit)
        return self._c.consume(budget, 0)

    def _poll_wait(self, budget: int, wait_s: float) -> list[Message]:
        m = self._c.poll(wait_s)
        if m is None:
            return []
        return [m, *self._c.consume(budget - 1, 0)] if budget > 1 else [m]

    def _wait_sync(self, budget: int, wait_s: float) -> list[Message]:
        """Wait up to `wait_s` for a record (worker thread), then take what came with it; for
        the handle too, if an abandoned call still holds it (nothing then, this slice)."""
        try:
            return self._handle.call(self._poll_wait, budget, wait_s, wait=wait_s)
        except _Busy:
            return []

    async def poll(self, max_records: int, timeout: float) -> PollResult:
        budget, deadline = self._poll_window(max_records, timeout)
        async with self._lock:
            if self.closed:  # closed while this poll waited for the lock
                raise LogUnavailable("consumer is closed")
            while True:
                if self._error is not None:
                    err, self._error = self._error, None
                    raise err
                commit = self._take_later()
                fd = self._fd
                if fd is not None:
                    fd.drain()  # before the queue is served: a later item writes again
                try:
                    try:
                        # What librdkafka already holds, without a thread: never blocks.
                        msgs = self._handle.call(self._take_ready, commit, budget, wait=0)
                    except _Busy:  # an abandoned commit still runs: the commit waits, as we do
                        for p, off in commit.items():
                            self._later.setdefault(p, off)
                        commit, msgs = {}, []
                        fd = None  # the handle is busy: the thread path waits for it
                    left = deadline - trio.current_time()
                    if not msgs and not self._listener.pending() and left > 0:
                        if fd is not None:
                            # librdkafka writes to the pipe when the queue gets an item.
                            await fd.wait(min(left, kc.SLICE_S))
                        else:
                            # Not abandoned on cancel: records handed over by librdkafka (its
                            # position moved past them) are returned before any checkpoint.
                            msgs = await in_thread(self._wait_sync, budget, min(left, kc.SLICE_S))
                except (KafkaException, RuntimeError) as exc:
                    raise self._poll_failed(commit, exc) from exc
                result = self._result(self._records(msgs), deadline)
                if result is not None:
                    return result

    # -- commits -------------------------------------------------------------------------------

    def _assigned_only(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The offsets of partitions assigned to this member now (the rebalance callbacks are
        the only way an assignment changes here)."""
        self._apply_events()
        return kc.owned_only(offsets, self._owned)

    def _send_commit(self, mine: dict[TopicPartition, int]) -> None:
        """Sends the commit (never blocks); _on_commit hears its answer in a later poll."""
        try:
            self._c.commit(
                offsets=[RdTP(p.topic, p.partition, off) for p, off in mine.items()],
                asynchronous=True,
            )
        except KafkaException:
            self._refuse(mine)

    def _held(self, fn: Callable[..., None], *args: Any) -> Callable[[], None]:
        """`fn(*args)` holding the handle, for a thread that may be abandoned."""
        return functools.partial(self._handle.call, fn, *args)

    def _before_retry(self) -> None:
        # Refused commits are kept only for partitions owned now: the callbacks' latest news.
        self._apply_events()

    def _commit_sync(self, offsets: dict[TopicPartition, int]) -> None:
        kc.check_assigned(offsets, kc.as_tps(self._c.assignment()))
        done = self._c.commit(
            offsets=[RdTP(p.topic, p.partition, off) for p, off in offsets.items()],
            asynchronous=False,
        )
        refused = [t for t in done or [] if t.error is not None]
        if refused:
            raise CommitFailed(
                f"commit {self.group}/{self.topic} refused: "
                + ", ".join(f"{t.topic}[{t.partition}]: {t.error}" for t in refused)
            )

    def _commit_owned_sync(self, offsets: dict[TopicPartition, int]) -> None:
        mine = kc.owned_only(offsets, kc.as_tps(self._c.assignment()))
        if mine:
            self._commit_sync(mine)

    async def _commit_now(self, offsets: dict[TopicPartition, int]) -> None:
        if self.closed:  # closed while this commit waited for the lock
            raise CommitFailed("consumer is closed")
        # Abandoned after _COMMIT_TIMEOUT_S (or on cancel): the commit may still land later,
        # which only commits offsets the caller processed (at least once). It keeps the
        # handle meanwhile: polls wait for it, the close too.
        with trio.move_on_after(_COMMIT_TIMEOUT_S):
            await _in_thread_abandonable(self._held(self._commit_sync, offsets))
            return
        raise CommitFailed(
            f"commit {self.group}/{self.topic}: no answer within {_COMMIT_TIMEOUT_S:.0f} s"
        )

    # -- closing -------------------------------------------------------------------------------

    async def _commit_final(self, offsets: dict[TopicPartition, int]) -> None:
        with trio.move_on_after(_COMMIT_TIMEOUT_S):
            await _in_thread_abandonable(self._held(self._commit_owned_sync, offsets))

    def _before_close(self) -> None:
        if self._fd is not None:  # before the handle goes: no write to a closed pipe
            self._fd.close()
            self._fd = None

    async def _close_consumer(self) -> None:
        # After the call in flight (an abandoned commit), if any: if that outlasts the bound,
        # the close is left to happen when it returns.
        await _close_bounded(
            functools.partial(self._handle.close, self._c.close),
            f"consumer {self.group}/{self.topic}",
        )

    async def aclose(self) -> None:
        if self._c is None:  # never opened (RdkafkaLog.consumer failed): nothing to close
            self.closed = True
            return
        await super().aclose()


class RdkafkaReader(kc.ReaderBase[tuple[str, int]]):
    """A LogReader: one group-less librdkafka consumer, re-assigned only when needed. What it
    assigns (`_assigned`) is a (topic, partition)."""

    _c: Consumer

    def __init__(self, log: RdkafkaLog, raw: Consumer) -> None:
        super().__init__(log, raw)
        self._handle = _Handle("reader")  # every call into _c holds it (see _Handle)

    def _take(self, msgs: list[Message], topic: str, partition: int) -> tuple[list[Record], bool]:
        """The records of the assigned partition among `msgs`, and whether its position was out
        of range."""
        out: list[Record] = []
        out_of_range = False
        for m in msgs:
            err = m.error()
            if err is None:
                if m.partition() == partition and m.topic() == topic:
                    out.append(_record(m))
            elif err.code() == KafkaError._AUTO_OFFSET_RESET:
                out_of_range = True
            elif err.fatal() or err.code() in _FATAL_CONSUMER_ERRORS:
                self._next = None
                raise LogUnavailable(f"fetch {topic}[{partition}]: {err}")
            elif err.code() != KafkaError._PARTITION_EOF:
                logger.info("librdkafka reader {}[{}]: {}", topic, partition, err)
        if out:
            self._next = out[-1].offset + 1
        return out, out_of_range

    def _fetch_sync(
        self, topic: str, partition: int, offset: int, max_records: int, wait_s: float
    ) -> list[Record]:
        """`_fetch_now` (worker thread) holding the handle; nothing this slice if an abandoned
        call still holds it."""
        try:
            return self._handle.call(
                self._fetch_now, topic, partition, offset, max_records, wait_s, wait=wait_s
            )
        except _Busy:
            return []

    def _fetch_now(
        self, topic: str, partition: int, offset: int, max_records: int, wait_s: float
    ) -> list[Record]:
        c = self._c
        if self._assigned != (topic, partition) or self._next != offset:
            c.assign([RdTP(topic, partition, offset)])
            self._assigned = (topic, partition)
            self._next = offset
        records, out_of_range = self._take(self._wait(max_records, wait_s), topic, partition)
        if records or not out_of_range:
            return records
        begin, _end = c.get_watermark_offsets(
            RdTP(topic, partition), timeout=_REQUEST_TIMEOUT_S, cached=False
        )
        if offset < begin:  # deleted by retention: continue from the oldest record kept
            c.assign([RdTP(topic, partition, begin)])
            self._next = begin
            return self._take(self._wait(max_records, wait_s), topic, partition)[0]
        # Beyond the end: nothing yet; look again (re-assigned) on the next slice.
        self._next = None
        time.sleep(wait_s)
        return []

    def _wait(self, max_records: int, wait_s: float) -> list[Message]:
        msgs = self._c.consume(max_records, 0)
        if msgs or wait_s <= 0:
            return msgs
        m = self._c.poll(wait_s)
        if m is None:
            return []
        return [m, *self._c.consume(max_records - 1, 0)] if max_records > 1 else [m]

    async def _fetch(
        self, topic: str, partition: int, offset: int, max_records: int, deadline: float
    ) -> list[Record]:
        offset, max_records = max(offset, 0), max(1, max_records)
        async with self._lock:
            if self.closed:  # closed while this fetch waited for the lock
                raise LogUnavailable("reader is closed")
            try:
                if self._assigned == (topic, partition) and self._next == offset:
                    # Already there: what librdkafka prefetched, without a thread.
                    try:
                        ready = self._handle.call(self._c.consume, max_records, 0, wait=0)
                    except _Busy:
                        ready = []
                    records, out_of_range = self._take(ready, topic, partition)
                    if records:
                        return records
                    if out_of_range:
                        self._next = None  # the thread call below re-assigns and handles it
                while True:
                    left = deadline - trio.current_time()
                    records = await in_thread(
                        self._fetch_sync,
                        topic,
                        partition,
                        offset,
                        max_records,
                        max(0.0, min(left, kc.SLICE_S)),
                    )
                    if records or trio.current_time() >= deadline:
                        return records
            except (KafkaException, RuntimeError) as exc:
                self._next = None
                raise LogUnavailable(f"fetch {topic}[{partition}]@{offset}: {exc!r}") from exc

    async def _close_consumer(self) -> None:
        await _close_bounded(functools.partial(self._handle.close, self._c.close), "reader")
