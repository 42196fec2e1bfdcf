"""The replay consumer ("mail carrier"): drains one reconnected client's DLQ backlog, in order.

A replay is per client, not per partition: it reads the client's DLQ partition from the
client's own cursor (stored in its record), so it never commits anything on behalf of another
client (hole 2), and one client's backlog never holds up another's (isolation). Each replay is a
pipeline of three stages joined by bounded trio memory channels (fetch -> publish -> ack:
`nimbus.workers.replay_pipeline`); this module owns the service that starts, feeds and ends them.

The replays of a worker share one reader per DLQ partition and what it fetched
(`nimbus.workers.replay_cache`): clients replaying from the same partition at once read its records
from Kafka about once, not once each, and a hundred replays do not mean a hundred Kafka
consumers (each with its own network thread).

A lease in the state store makes sure one worker replays a client at a time, whatever number of
workers run. The replay ends when the client is no longer REPLAYING under the epoch it started
with (flipped LIVE, disconnected, or reconnected: a new replay takes over from the cursor); the
service reads all its replaying clients' records in one round trip to see it.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import trio
from loguru import logger

from nimbus import logs
from nimbus.config import Settings
from nimbus.core.lifecycle import Status
from nimbus.core.retry import Backoff, Policy
from nimbus.ops.stats import Counters
from nimbus.ports import EngineError, Log, LogReader, Record, StateStore
from nimbus.subscriptions import listen
from nimbus.wire import badinput
from nimbus.wire.messages import DeliveryReport, ReportItem
from nimbus.wire.pod_channel import (
    DLQ_WRITES,
    REPLAY_REQUESTS,
    parse_dlq_writes,
    parse_replay_request,
    reply_channel,
    status_check,
)
from nimbus.workers.replay_cache import FetchCache
from nimbus.workers.replay_pipeline import LEASE_MS, ReplayPipeline

_END_POLL_S = 0.02  # a fetch at a partition's end holds the shared reader this long at most
_SHARED_FETCH = 2_000  # records per fetch through a partition's shared reader
_WATCH_S = 0.2  # how often the service reads its replaying clients' records
# A client's next replay after one ended by a fault waits 0.25 s, doubling to at most 10 s (no
# jitter: one client's retries are spread by its own faults). Per client, not per I/O loop, so it
# is its own policy rather than NIMBUS_RETRY_*'s.
_CLIENT_RETRY = Policy(first=0.25, max=10.0, multiplier=2.0, jitter=0.0)
_RETRY_FORGET_S = 600.0


@dataclass
class _Feed:
    """One DLQ partition's reader, shared by the replays reading that partition."""

    users: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    opened: AbstractAsyncContextManager[LogReader] | None = None
    reader: LogReader | None = None
    end: tuple[int, float] = (-1, 0.0)  # (offset, when): a fetch there found nothing new then


@dataclass(slots=True)
class _Retry:
    """A client's replays that ended by a fault (its stream failed a delivery, a pod refused a
    run, no confirmation came within the delivery timeout, an engine error), for one epoch: the
    next one waits `not_before`; if none has confirmed anything for NIMBUS_STALL_MS, that is
    logged at ERROR once and counted (replay.stalled). `singles`: a pod refused a run, so this
    epoch's replays send one result per delivery."""

    epoch: int
    since: float  # the last progress (or the first fault after it)
    failures: int = 0  # faults in a row without a confirmation
    not_before: float = 0.0
    singles: bool = False
    reported: bool = False


class ReplayService:
    """Starts a replay for every REPLAYING client this worker can lease."""

    def __init__(
        self, settings: Settings, log: Log, state: StateStore, counters: Counters | None = None
    ) -> None:
        self.s = settings
        self.log = log
        self.state = state
        self.counters = counters or Counters()
        self.owner = f"{settings.instance_id}:{uuid.uuid4().hex[:8]}"
        self.reply_to = reply_channel("replay", self.owner)
        self.active: dict[str, ReplayPipeline] = {}
        self._tokens = itertools.count(1)
        self._by_token: dict[int, ReplayPipeline] = {}
        self._limiter = trio.CapacityLimiter(settings.max_replays)
        self._requests_send, self._requests_recv = trio.open_memory_channel[str](10_000)
        self.cache = FetchCache()
        self._starting: set[str] = set()  # leases being taken (see _start)
        self._start_limiter = trio.CapacityLimiter(64)
        self._feeds: dict[
            int, _Feed
        ] = {}  # DLQ partition -> its reader, while some replay reads it
        self._begins: tuple[float, dict[int, int]] = (0.0, {})
        self._begins_lock = trio.Lock()
        self._cursors: dict[str, int] = {}  # client -> cursor to store (see advance_cursor)
        self._cursors_due = trio.Event()
        self._retry: dict[str, _Retry] = {}  # clients whose last replay ended by a fault
        self.retry_policy = Policy.from_settings(settings)  # NIMBUS_RETRY_*

    def __repr__(self) -> str:
        return f"<ReplayService {self.owner} active={len(self.active)}>"

    @staticmethod
    def lease_name(client_id: str) -> str:
        return f"replay:{client_id}"

    def new_token(self, p: ReplayPipeline) -> int:
        t = next(self._tokens)
        self._by_token[t] = p
        return t

    def forget_token(self, token: int) -> None:
        self._by_token.pop(token, None)

    async def fetch(
        self, p: ReplayPipeline, offset: int, max_records: int, timeout: float
    ) -> list[Record]:
        """DLQ records of p's partition from `offset` on: from the shared cache when some replay
        fetched them already, else through the partition's one reader (and then cached for the
        others). At the end of the partition the reader is not held for the wait: a short poll,
        then a sleep for the rest of `timeout`; replays waiting at the same end share the poll."""
        part = p.partition
        hit = self.cache.get(part, offset, max_records)
        if hit is not None:
            self.counters.inc("replay.fetch_shared")
            return hit
        feed = self._feeds[part]
        until = trio.current_time() + timeout
        async with feed.lock:
            records = self.cache.get(part, offset, max_records)
            at_end, when = feed.end
            if records is not None or (
                0 <= at_end <= offset and trio.current_time() - when < timeout
            ):
                self.counters.inc("replay.fetch_shared")  # fetched, or found the end, meanwhile
            else:
                if feed.reader is None:
                    opening = self.log.reader()
                    feed.reader = await opening.__aenter__()
                    feed.opened = opening
                self.counters.inc("replay.fetch_own")
                # More than asked for: the rest is cached for the partition's other replays (a
                # reader moved between replays' offsets re-fetches from the broker each time).
                records = await feed.reader.fetch(
                    self.s.kafka_dlq_topic,
                    part,
                    offset,
                    max(max_records, _SHARED_FETCH),
                    min(timeout, _END_POLL_S),
                )
                if records:
                    self.cache.put(part, offset, records)
                    records = records[:max_records]
                else:
                    feed.end = (offset, trio.current_time())
        if not records:
            with trio.move_on_at(until):
                await p.nudged.wait()  # new records of p's client: read again now
            return []
        return records

    async def dlq_begin_offsets(self, max_age: float) -> dict[int, int]:
        """The DLQ partitions' first offsets, as read at most `max_age` seconds ago."""
        async with self._begins_lock:
            at, begins = self._begins
            if trio.current_time() - at > max_age or not begins:
                begins = await self.log.begin_offsets(self.s.kafka_dlq_topic)
                self._begins = (trio.current_time(), begins)
            return begins

    def advance_cursor(self, client_id: str, cursor: int) -> None:
        """Store a replay's progress; the writes of all replays go out together."""
        self._cursors[client_id] = max(cursor, self._cursors.get(client_id, 0))
        self._cursors_due.set()

    async def _cursor_writer(self) -> None:
        backoff = Backoff(self.retry_policy)
        while True:
            await self._cursors_due.wait()
            self._cursors_due = trio.Event()
            items, self._cursors = self._cursors, {}
            try:
                await self.state.advance_cursor(list(items.items()))
            except EngineError as e:
                # A cursor behind only means a later replay re-reads a little (and skips what is
                # acked); retried with the next writes.
                logger.warning("replay: storing cursors failed: {}", e)
                for cid, c in items.items():
                    self._cursors[cid] = max(c, self._cursors.get(cid, 0))
                await backoff.wait()
                self._cursors_due.set()
            else:
                backoff.failures = 0

    @contextlib.asynccontextmanager
    async def _feed(self, partition: int) -> AsyncIterator[None]:
        """The partition's reader is opened by its first fetch and closed with its last user."""
        feed = self._feeds.get(partition)
        if feed is None:
            feed = self._feeds[partition] = _Feed()
        feed.users += 1
        try:
            yield
        finally:
            feed.users -= 1
            if feed.users == 0:
                del self._feeds[partition]
                if feed.opened is not None:
                    with trio.CancelScope(shield=True):
                        await feed.opened.__aexit__(None, None, None)

    async def request_flip(self, client_id: str, last_ack_ns: int = 0) -> None:
        """Ask the status manager for the flip; `last_ack_ns` (wall clock) is when the last
        confirmation of the backlog arrived here, so the flip's delay can be measured."""
        await self.state.publish([status_check(client_id, last_ack_ns)])

    async def _watch(self) -> None:
        """Every replay's client record, read for all of them in one round trip: a replay ends
        when its client is no longer REPLAYING under its epoch; a drained one asks again."""
        while True:
            await trio.sleep(_WATCH_S)
            pipes = list(self.active.values())
            if not pipes:
                continue
            try:
                recs = await self.state.get_many([p.client_id for p in pipes])
                again = [p for p, rec in zip(pipes, recs, strict=True) if p.on_record(rec)]
                if again:
                    await self.state.publish(
                        [status_check(p.client_id, p.last_ack_ns) for p in again]
                    )
            except EngineError as e:
                logger.warning("replay: watching the replaying clients: {}", e)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                listen, self.state, REPLAY_REQUESTS, self._on_request, self.retry_policy
            )
            await nursery.start(
                listen, self.state, DLQ_WRITES, self._on_dlq_writes, self.retry_policy
            )
            await nursery.start(
                listen, self.state, self.reply_to, self._on_report, self.retry_policy
            )
            nursery.start_soon(self._scan)
            nursery.start_soon(self._cursor_writer)
            nursery.start_soon(self._watch)
            task_status.started()
            logger.info("replay consumer up ({})", self.owner)
            async with self._requests_recv:
                async for client_id in self._requests_recv:
                    if client_id in self.active or client_id in self._starting:
                        continue
                    # Each start is its own task: a hundred clients reconnecting at once do not
                    # wait for each other's lease and record round trips.
                    self._starting.add(client_id)
                    nursery.start_soon(self._start, client_id)

    def stalled(self) -> int:
        """Clients whose replays have made no progress for NIMBUS_STALL_MS (reported)."""
        return sum(1 for r in self._retry.values() if r.reported)

    def _ended(self, p: ReplayPipeline) -> None:
        """After a replay: if it ended by a fault, the next one for the client waits (0.25 s,
        doubling to 10 s while none confirms anything), and sends one result per delivery if a
        pod refused a run; a stall of NIMBUS_STALL_MS is logged at ERROR once and counted."""
        now = trio.current_time()
        r = self._retry.get(p.client_id)
        if r is None or r.epoch != p.epoch:
            r = _Retry(p.epoch, since=now)
        if p.refused and not r.singles:
            r.singles = True
            self.counters.inc("replay.refused")
            logger.error(
                "replay of {} (epoch {}): a pod refused a run ({}); sending one result per "
                "delivery from now on",
                p.client_id,
                p.epoch,
                p.refused,
            )
        if not p.fault:
            if r.singles:
                r.failures, r.not_before = 0, 0.0
                self._retry[p.client_id] = r
            else:
                self._retry.pop(p.client_id, None)
            return
        if p.delivered:
            r.failures, r.since, r.reported = 0, now, False
        r.failures += 1
        r.not_before = now + _CLIENT_RETRY.delay(r.failures)
        stall = self.s.stall_ms / 1000
        if not r.reported and now - r.since >= stall:
            r.reported = True
            self.counters.inc("replay.stalled")
            logger.error(
                "replay of {} (epoch {}): no progress for {:.0f}s ({} attempts; last: {}); "
                "retrying every {:.1f}s at most",
                p.client_id,
                p.epoch,
                now - r.since,
                r.failures,
                p.fault,
                _CLIENT_RETRY.max,
            )
        self._retry[p.client_id] = r

    async def _start(self, client_id: str) -> None:
        r = self._retry.get(client_id)
        if r is not None and trio.current_time() < r.not_before:
            self._starting.discard(client_id)
            return  # backing off; the periodic scan asks again
        try:
            async with self._start_limiter:
                try:
                    got = await self.state.acquire_lease(
                        self.lease_name(client_id), self.owner, LEASE_MS
                    )
                    rec = await self.state.get(client_id) if got else None
                except EngineError as e:
                    logger.warning("replay: {}", e)
                    return
                if rec is None or rec.status is not Status.REPLAYING:
                    if got:
                        with contextlib.suppress(EngineError):
                            await self.state.release_lease(self.lease_name(client_id), self.owner)
                    return
                retry = self._retry.get(client_id)
                singles = retry is not None and retry.epoch == rec.epoch and retry.singles
                p = ReplayPipeline(
                    self, client_id, rec.epoch, rec.pod, rec.cursor, rec.acked, singles=singles
                )
                self.active[client_id] = p
        finally:
            self._starting.discard(client_id)
        await self._run_pipeline(p)

    async def _run_pipeline(self, p: ReplayPipeline) -> None:
        logs.bind_task(
            client_id=p.client_id, epoch=p.epoch
        )  # every line of this replay (its own task)
        try:
            async with self._limiter, self._feed(p.partition):
                logger.info(
                    "replay of {} (epoch {}) from DLQ offset {} on partition {}",
                    p.client_id,
                    p.epoch,
                    p.cursor,
                    p.partition,
                )
                await p.run()
        except* EngineError as group:
            # The pipeline's nursery wraps its stages' errors in a group. The client is still
            # REPLAYING; the next request or periodic scan starts a new replay from the cursor.
            logger.warning(
                "replay of {} failed: {}; it will be retried", p.client_id, group.exceptions[0]
            )
            p.fault = p.fault or f"engine error: {group.exceptions[0]}"
        finally:
            for t in list(p.unconfirmed):
                self.forget_token(t)
            self.active.pop(p.client_id, None)
            self._ended(p)
            self.counters.inc("replay.delivered", p.delivered)
            with trio.move_on_after(2) as cs:
                cs.shield = True
                try:
                    await self.state.release_lease(self.lease_name(p.client_id), self.owner)
                except EngineError:
                    pass

    async def _on_request(self, payload: bytes) -> None:
        try:
            client_id = parse_replay_request(payload)
        except UnicodeDecodeError:
            badinput.message("replay requests", badinput.UNDECODABLE, repr(payload[:64]))
            return
        await self._requests_send.send(client_id)

    async def _on_dlq_writes(self, payload: bytes) -> None:
        """A result router wrote these clients' results to the DLQ: their replays here read
        now rather than after their wait at the partition's end (most clients in it have none)."""
        try:
            client_ids = parse_dlq_writes(payload)
        except ValueError:
            badinput.message("dlq write notices", badinput.UNDECODABLE, repr(payload[:64]))
            return
        for cid in client_ids:
            p = self.active.get(cid)
            if p is not None:
                feed = self._feeds.get(p.partition)
                if feed is not None:
                    feed.end = (-1, 0.0)  # the end seen before is not the end any more
                p.nudged.set()

    async def _on_report(self, payload: bytes) -> None:
        try:
            report = DeliveryReport.FromString(payload)
        except Exception:
            badinput.message("replay reports", badinput.UNDECODABLE, self.reply_to)
            return
        by_replay: dict[ReplayPipeline, list[ReportItem]] = {}
        for it in report.items:
            p = self._by_token.get(it.token)
            if p is None:
                continue  # late report for a replay that has ended
            by_replay.setdefault(p, []).append(it)
        for p, items in by_replay.items():
            try:
                try:
                    p.reports_send.send_nowait(items)
                except trio.WouldBlock:
                    await p.reports_send.send(items)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                for it in items:
                    self.forget_token(it.token)

    async def _scan(self) -> None:
        """Safety net: pick up REPLAYING clients whose request was lost (pub/sub is lossy), and
        those whose replay is due again after a back-off."""
        while True:
            await trio.sleep(self.s.status_interval_ms / 1000)
            now = trio.current_time()
            for cid in [c for c, r in self._retry.items() if now - r.not_before > _RETRY_FORGET_S]:
                del self._retry[cid]  # not replayed again since (the client left or went LIVE)
            try:
                for client_id in await self.state.replaying():
                    if client_id not in self.active:
                        await self._requests_send.send(client_id)
            except EngineError as e:
                logger.warning("replay scan: {}", e)
