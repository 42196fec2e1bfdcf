"""What the two Kafka adapters share: nimbus.engines.kafka (kafka-python) and
nimbus.engines.rdkafka (librdkafka). No Kafka client library here, only trio and the ports.

- The bridge's worker threads (`in_thread`, waited for even when cancelled) and the bootstrap
  probe (`probe`), with the timeouts both adapters keep.
- A Log's partition counts, cached (`LogBase`), and the topic checks around them.
- A group consumer's bookkeeping (`GroupConsumerBase`): the rebalance news reported by each
  `PollResult` ("remove `revoked`, then add `assigned`"), fed by `RebalanceEvents`, and the
  `commit_later` offsets that go out with the next poll, retried while owned when refused.
- A group consumer's commit and close (`GroupConsumerBase.commit`, `.aclose`) and a reader's
  fetch and close (`ReaderBase`), around the client calls each adapter makes.
- A produce batch's acknowledgements (`BatchAcks`), counted down on a client thread.
- The errors both map library failures to, worded alike (`unavailable`, `not_reachable`, ...).

Each adapter keeps its library's I/O (what a call is, which thread makes it, which of the
library's errors mean what) in its own module.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar, cast

import outcome
import trio
from loguru import logger

from nimbus.ports import (
    CommitFailed,
    EngineError,
    LogUnavailable,
    PollResult,
    ProduceFailed,
    Record,
    TopicPartition,
    Written,
)

T = TypeVar("T")
E = TypeVar("E")
A = TypeVar("A")

BOOTSTRAP_TIMEOUT_S = 15.0
# Whole-call bound of send_batch. The client's own delivery timeout is a little shorter, so a
# stuck record normally fails with the client's reason before this generic one fires.
SEND_TIMEOUT_S = 30.0
DELIVERY_TIMEOUT_MS = 28_000
# How long one blocking client call may hold a worker thread (and delay a cancellation).
SLICE_S = 0.5
# A reader's fetch wait: a fetch parked at a partition's end (long poll) delays the first fetch
# after a switch to another partition by up to that much.
READER_FETCH_WAIT_MS = 50

_THREADS = trio.CapacityLimiter(64)  # blocking Kafka client calls in flight at once, per process


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread; this task waits for it, even if cancelled meanwhile (the
    cancellation is delivered at the next checkpoint), as `trio.to_thread.run_sync` with
    `abandon_on_cancel=False` does. Built on `trio.lowlevel.start_thread_soon` because
    to_thread.run_sync renames the OS thread twice per call (two prctl calls through ctypes,
    and formatting the name): measured here ~190 µs of CPU per call against ~130."""
    async with _THREADS:
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        call = functools.partial(contextvars.copy_context().run, fn, *args)

        def deliver(result: outcome.Outcome[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        trio.lowlevel.start_thread_soon(call, deliver)
        return cast(
            T, await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        )


def not_reachable(brokers: str, waited: float, why: object) -> LogUnavailable:
    return LogUnavailable(f"Kafka at {brokers} is not reachable (waited {waited:.0f} s): {why}")


def unavailable(brokers: str, what: str, exc: BaseException) -> LogUnavailable:
    """A request to the cluster failed: `what` it was, and the client's reason."""
    return LogUnavailable(f"Kafka at {brokers}: {what}: {exc}")


async def probe(brokers: str, timeout: float) -> None:
    """Wait until some bootstrap address accepts a TCP connection, or raise LogUnavailable.

    Done in trio before the client bootstraps: cancellable, and a kafka-python KafkaAdminClient
    whose bootstrap fails leaks its socket (a ResourceWarning at garbage collection).
    """
    addresses: list[tuple[str, int]] = []
    for item in brokers.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or "]" in port:  # no port given
            host, port = item.strip(), "9092"
        addresses.append((host.strip("[]") or "localhost", int(port or 9092)))
    last: Exception | None = None
    with trio.move_on_after(timeout):
        while True:
            for host, port_no in addresses:
                try:
                    with trio.fail_after(min(timeout, 3.0)):
                        stream = await trio.open_tcp_stream(host, port_no)
                except (OSError, trio.TooSlowError) as exc:
                    last = exc
                    continue
                await stream.aclose()
                return
            await trio.sleep(0.25)
    raise not_reachable(brokers, timeout, repr(last))


@asynccontextmanager
async def closed_after(close: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """Runs `close()` when the block ends, however it ends: shielded from cancellation."""
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await close()


async def close_logged(close: Callable[[], Awaitable[object]], what: str) -> None:
    """`close()`; a failure is logged (`closing {what} failed: ...`), not raised."""
    try:
        await close()
    except Exception as exc:
        logger.warning("closing {} failed: {}", what, exc)


# -- topics -----------------------------------------------------------------------------------


class _Counted(Protocol):
    async def partition_count(self, topic: str) -> int: ...


class LogBase:
    """What both adapters' Log keeps: the cluster's address, the client id, and the partition
    counts learnt (from ensure_topics, a describe or a send). Subclasses ask the cluster
    (`_count_of`)."""

    def __init__(self, brokers: str, client_id: str) -> None:
        self.brokers = brokers
        self.client_id = client_id
        self._counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.brokers} topics={sorted(self._counts)}>"

    async def _count_of(self, topic: str) -> int | None:
        """The topic's partition count, asked of the cluster; None if there is no such topic."""
        raise NotImplementedError

    async def partition_count(self, topic: str) -> int:
        """The topic's partition count (cached); LogUnavailable if the topic does not exist."""
        n = self._counts.get(topic)
        if n is None:
            n = await self._count_of(topic)
            if n is None:
                raise LogUnavailable(f"unknown topic {topic!r}")
            self._counts[topic] = n
        return n


def missing_topics(names: Iterable[str], existing: Mapping[str, object]) -> list[str]:
    """The names (each once, in order) not among the existing topics."""
    return [n for n in dict.fromkeys(names) if n not in existing]


def known_count(counts: Mapping[str, int], topic: str) -> int:
    """The topic's partition count as known to the log; LogUnavailable if it is not known."""
    n = counts.get(topic)
    if n is None:
        raise LogUnavailable(f"partition count of topic {topic!r} unknown: ensure_topics first")
    return n


async def check_partition(log: _Counted, topic: str, partition: int) -> None:
    """LogUnavailable unless the topic exists and has that partition."""
    n = await log.partition_count(topic)
    if not 0 <= partition < n:
        raise LogUnavailable(f"topic {topic!r} has no partition {partition}")


# -- producing --------------------------------------------------------------------------------


class BatchAcks(Generic[E]):
    """Counts a batch's acknowledgements down on a client thread; wakes trio once at the end.
    `E` is what the client reports a failed record with."""

    __slots__ = ("results", "errors", "done", "_pending", "_lock", "_token")

    def __init__(self, n: int, token: trio.lowlevel.TrioToken) -> None:
        self.results: list[Written | None] = [None] * n
        self.errors: list[tuple[int, E]] = []
        self.done = trio.Event()
        self._pending = n
        self._lock = threading.Lock()
        self._token = token

    def written(self, i: int, w: Written) -> None:
        self.results[i] = w
        self._one()

    def failed(self, i: int, err: E) -> None:
        with self._lock:
            self.errors.append((i, err))
        self._one()

    def _one(self) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            try:
                self._token.run_sync_soon(self.done.set)
            except trio.RunFinishedError:
                pass

    def first_error(self) -> tuple[int, E]:
        return min(self.errors, key=lambda e: e[0])

    def failure(self, topic: str, shown: str) -> ProduceFailed:
        """The batch's error once some records failed; `shown`: the first failure, as text."""
        i, _first = self.first_error()
        return ProduceFailed(
            f"{len(self.errors)} of {len(self.results)} records to {topic!r} failed; "
            f"first (item {i}): {shown}"
        )

    def timed_out(self, topic: str) -> ProduceFailed:
        return ProduceFailed(
            f"{len(self.results)} records to {topic!r} not acknowledged within "
            f"{SEND_TIMEOUT_S:.0f} s"
        )


# -- consuming --------------------------------------------------------------------------------


def tp(topic: str | None, partition: int | None) -> TopicPartition:
    return TopicPartition(topic or "", -1 if partition is None else partition)


def as_tps(items: Iterable[Any]) -> set[TopicPartition]:
    """Ours, of a client's topic-partitions (anything with `topic` and `partition`)."""
    return {tp(t.topic, t.partition) for t in items}


def owned_only(
    offsets: Mapping[TopicPartition, int], owned: set[TopicPartition]
) -> dict[TopicPartition, int]:
    return {p: off for p, off in offsets.items() if p in owned}


def check_assigned(offsets: Mapping[TopicPartition, int], owned: set[TopicPartition]) -> None:
    """CommitFailed unless every partition of `offsets` is assigned to this member (Kafka's
    broker would accept a commit for any partition from a current member)."""
    foreign = set(offsets) - owned
    if foreign:
        raise CommitFailed(f"partitions not assigned to this member: {sorted(foreign, key=str)}")


class RebalanceEvents:
    """Ordered rebalance events, recorded on whichever thread the client calls back on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[bool, frozenset[TopicPartition]]] = []

    def add(self, assigned: bool, tps: Iterable[Any]) -> None:
        s = frozenset(as_tps(tps))
        if s:
            with self._lock:
                self._events.append((assigned, s))

    def pending(self) -> bool:
        return bool(self._events)

    def drain(self) -> list[tuple[bool, frozenset[TopicPartition]]]:
        with self._lock:
            events, self._events = self._events, []
        return events


class _ClientUser:
    """A group consumer or reader: the client's calls serialised by `_lock`; closed once."""

    _lock: trio.Lock
    closed: bool

    async def _close_consumer(self) -> None:
        """Close the client."""
        raise NotImplementedError

    async def _closing(self) -> None:
        """What the close does, the lock held."""
        raise NotImplementedError

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        async with self._lock:
            await self._closing()


class GroupConsumerBase(_ClientUser):
    """A group consumer's bookkeeping, the same on both clients: what the caller was told it
    owns, what the consumer owns now, and the offsets of `commit_later` on their way out.
    Subclasses send commits (`_send_commit`, `_commit_now`, `_commit_final`), say what is
    assigned (`_assigned_only`) and close their client (`_close_consumer`)."""

    # The client's errors that a failed commit() reports as CommitFailed.
    _CLIENT_ERRORS: tuple[type[BaseException], ...] = ()

    def __init__(
        self, listener: RebalanceEvents, topic: str, group: str, max_poll_records: int
    ) -> None:
        self._listener = listener
        self.topic = topic
        self.group = group
        self.max_poll_records = max_poll_records
        self._lock = trio.Lock()
        # What the caller has been told it owns, and what the consumer really owns now.
        self._reported: set[TopicPartition] = set()
        self._owned: set[TopicPartition] = set()
        # Owned partitions that were revoked (and re-assigned) since the last report: their
        # position was reset to the committed offset, so the caller must hear about it.
        self._churned: set[TopicPartition] = set()
        # commit_later: offsets waiting for the next poll; refused async commits (client thread).
        self._later: dict[TopicPartition, int] = {}
        self._refused: list[dict[TopicPartition, int]] = []
        self._refused_lock = threading.Lock()
        self._sent: dict[TopicPartition, int] = {}  # highest offset sent in a commit, per partition
        self.closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.group}/{self.topic} owned={len(self._owned)}>"

    # -- rebalance news ---------------------------------------------------------------------

    def _apply_events(self) -> None:
        for assigned, tps in self._listener.drain():
            if assigned:
                self._owned |= tps
            else:
                self._owned -= tps
                self._churned |= tps & self._reported

    def _news(self) -> tuple[set[TopicPartition], set[TopicPartition]]:
        self._apply_events()
        churn = self._churned & self._owned
        revoked = (self._reported - self._owned) | churn
        assigned = (self._owned - self._reported) | churn
        self._reported = set(self._owned)
        self._churned = set()
        return revoked, assigned

    # -- polling ----------------------------------------------------------------------------

    def _poll_window(self, max_records: int, timeout: float) -> tuple[int, float]:
        """(records to ask for, trio deadline) of a poll; LogUnavailable once closed."""
        if self.closed:
            raise LogUnavailable("consumer is closed")
        budget = max(1, min(max_records, self.max_poll_records))
        return budget, trio.current_time() + max(timeout, 0.0)

    def _poll_failed(self, commit: dict[TopicPartition, int], exc: BaseException) -> LogUnavailable:
        """The error of a failed poll; the offsets it was to commit wait for the next one."""
        for p, off in commit.items():
            self._later.setdefault(p, off)
        return LogUnavailable(f"poll {self.group}/{self.topic}: {exc!r}")

    def _result(self, fetched: list[Record], deadline: float) -> PollResult | None:
        """What a poll returns after fetching `fetched`, or None to poll on."""
        revoked, assigned = self._news()
        # Records of partitions lost meanwhile belong to their new owner now.
        records = [r for r in fetched if tp(r.topic, r.partition) in self._owned]
        if records or revoked or assigned or trio.current_time() >= deadline:
            return PollResult(records, revoked, assigned)
        return None

    # -- commits ----------------------------------------------------------------------------

    def _assigned_only(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        raise NotImplementedError

    def _send_commit(self, mine: dict[TopicPartition, int]) -> None:
        """Send an asynchronous commit of `mine`; `_refuse(mine)` if it is refused."""
        raise NotImplementedError

    def _commit_async(self, offsets: dict[TopicPartition, int]) -> None:
        """Send an offset commit for the owned partitions among `offsets` without waiting for
        it; its answer is handled by a later poll. A refused commit is kept for the next one."""
        mine = self._assigned_only(offsets)
        if not mine:
            return
        for p, off in mine.items():
            self._sent[p] = max(off, self._sent.get(p, off))
        self._send_commit(mine)

    def _refuse(self, offsets: dict[TopicPartition, int]) -> None:
        """An asynchronous commit of `offsets` was refused (any thread): retry with a poll."""
        with self._refused_lock:
            self._refused.append(offsets)

    def commit_later(self, offsets: dict[TopicPartition, int]) -> None:
        if not self.closed:
            self._later.update(offsets)

    def _before_retry(self) -> None:
        """Called before refused commits are filtered by ownership (a hook)."""

    def _take_later(self) -> dict[TopicPartition, int]:
        with self._refused_lock:
            refused, self._refused = self._refused, []
        later, self._later = self._later, {}
        if refused:
            self._before_retry()
        for offsets in refused:  # older than anything in _later: newer offsets win
            for p, off in offsets.items():
                # Not if a newer commit went out since (retrying would move the group back).
                if p in self._owned and off >= self._sent.get(p, off):
                    later.setdefault(p, off)
        if refused:
            logger.info(
                "{}/{}: an offset commit was refused; retrying it with this poll",
                self.group,
                self.topic,
            )
        return later

    def _commit_wanted(self, offsets: dict[TopicPartition, int]) -> bool:
        """Whether `commit(offsets)` has anything to do; CommitFailed once closed."""
        if self.closed:
            raise CommitFailed("consumer is closed")
        return bool(offsets)

    async def _commit_now(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit `offsets` and wait for the answer (the lock held)."""
        raise NotImplementedError

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not self._commit_wanted(offsets):
            return
        async with self._lock:
            try:
                await self._commit_now(offsets)
            except EngineError:
                raise
            except self._CLIENT_ERRORS as exc:
                raise CommitFailed(f"commit {self.group}/{self.topic}: {exc!r}") from exc

    # -- closing ----------------------------------------------------------------------------

    async def _commit_final(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the owned partitions among `offsets`, at the close (the lock held)."""
        raise NotImplementedError

    def _before_close(self) -> None:
        """Called after the final commit, before the client is closed (a hook)."""

    async def _closing(self) -> None:
        later = self._take_later()
        if later:  # what commit_later left for a poll that will not come
            try:
                await self._commit_final(later)
            except Exception as exc:
                logger.info("{}/{}: final commit failed: {!r}", self.group, self.topic, exc)
        self._before_close()
        # A group member's close leaves the group (LeaveGroup), so the others rebalance at once.
        await close_logged(self._close_consumer, f"consumer {self.group}/{self.topic}")


class ReaderBase(_ClientUser, Generic[A]):
    """What both adapters' reader keeps: the log (to check partitions against), the client's
    consumer and the lock that serialises its use, the partition assigned now (`A`, as the
    adapter names it) and the consumer's position, when known. Subclasses fetch (`_fetch`)
    and close their client (`_close_consumer`)."""

    def __init__(self, log: _Counted, raw: Any) -> None:
        self._log = log
        self._c = raw
        self._lock = trio.Lock()
        self._assigned: A | None = None  # the partition assigned now
        self._next: int | None = None  # the consumer's position, when we know it
        self.closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {self._assigned} next={self._next}>"

    async def _fetch(
        self, topic: str, partition: int, offset: int, max_records: int, deadline: float
    ) -> list[Record]:
        """`fetch`, once the partition is checked; `deadline` in trio time."""
        raise NotImplementedError

    async def fetch(
        self, topic: str, partition: int, offset: int, max_records: int, timeout: float
    ) -> list[Record]:
        if self.closed:
            raise LogUnavailable("reader is closed")
        await check_partition(self._log, topic, partition)
        deadline = trio.current_time() + max(timeout, 0.0)
        return await self._fetch(topic, partition, offset, max_records, deadline)

    async def _closing(self) -> None:
        await close_logged(self._close_consumer, "reader")
