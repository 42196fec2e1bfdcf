"""The replay consumer ("mail carrier"): drains one reconnected client's DLQ backlog, in order.

A replay is per client, not per partition: it reads the client's DLQ partition from the
client's own cursor (stored in its record), so it never commits anything on behalf of another
client (hole 2), and one client's backlog never holds up another's (isolation). Each replay is a
pipeline of three stages joined by bounded trio memory channels:

    fetch (DLQ records of this client, from the cursor)
      -> publish (runs of results to the client's pod channel, one delivery each; at most
                 `replay_window` results unconfirmed)
      -> ack (a delivery report per run; advance the cursor; at the end, ask for the flip to LIVE)

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
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import trio
from loguru import logger

from nimbus import logs
from nimbus.config import Settings
from nimbus.core.channels import receive_batch
from nimbus.core.lifecycle import ClientRecord, Status
from nimbus.core.retry import Backoff, Policy
from nimbus.ops.stats import Counters
from nimbus.ports import EngineError, Log, LogReader, Record, StateStore
from nimbus.subscriptions import listen
from nimbus.wire import badinput, packs
from nimbus.wire.messages import GAP, DeliveryReport, EventResponse, KafkaEventResponse, ReportItem
from nimbus.wire.pod_channel import (
    DLQ_WRITES,
    REPLAY_REQUESTS,
    Outgoing,
    parse_dlq_writes,
    parse_replay_request,
    pod_messages,
    reply_channel,
    run_message,
    status_check,
)
from nimbus.workers.replay_cache import FetchCache

LEASE_MS = 4_000  # renewed every third of it; a killed worker's replays restart after this
_END_POLL_S = 0.02  # a fetch at a partition's end holds the shared reader this long at most
_BEGINS_MAX_AGE_S = 1.0  # see ReplayPipeline._fetch
_START_BEGINS_MAX_AGE_S = 0.25
_SHARED_FETCH = 2_000  # records per fetch through a partition's shared reader
_WATCH_S = 0.2  # how often the service reads its replaying clients' records
# Results per run (one pod message, one delivery, one report) at most, and at most a quarter of
# the window: a window holds several runs, so the pod, the stream and the acks work on one while
# the next is on its way (a fetch of packed records holds thousands of results; published at
# once, the stages would take turns).
_RUN_MAX = 500
_RETRY_FIRST_S = 0.25  # a client's next replay after one ended by a fault waits this, doubling
_RETRY_MAX_S = 10.0  # to at most this
_RETRY_FORGET_S = 600.0


@dataclass
class _Feed:
    """One DLQ partition's reader, shared by the replays reading that partition."""

    users: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    opened: AbstractAsyncContextManager[LogReader] | None = None
    reader: LogReader | None = None
    end: tuple[int, float] = (-1, 0.0)  # (offset, when): a fetch there found nothing new then


@dataclass
class _Item:
    offset: int  # DLQ offset
    result: KafkaEventResponse | EventResponse  # a DLQ record, or a GAP notice (see _gap)


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


@dataclass(slots=True)
class _Run:
    """Results published as one delivery (a run, or a GAP notice alone), not yet confirmed."""

    offset: int  # DLQ offset of its first result
    count: int
    last_id: int  # its last delivery id


class ReplayPipeline:
    """One client's replay. Created by `ReplayService` while it holds the client's lease."""

    def __init__(
        self,
        service: ReplayService,
        client_id: str,
        epoch: int,
        pod: str,
        cursor: int,
        acked: int,
        *,
        singles: bool = False,
    ) -> None:
        self.svc = service
        self.client_id = client_id
        self.epoch = epoch
        self.pod = pod
        self.cursor = cursor
        self.acked = acked
        self.taken = acked  # highest delivery id fetched for publishing (never below `acked`)
        self.partition = service.log.producer.partition_for(
            service.s.kafka_dlq_topic, client_id.encode()
        )
        # Each report's items for this replay as one list (one channel operation per report).
        self.reports_send, self.reports_recv = trio.open_memory_channel[list[ReportItem]](256)
        self.unconfirmed: dict[int, _Run] = {}  # token -> run, in publish order
        self.in_flight = 0  # results in unconfirmed runs: at most the window
        self.window = service.s.replay_window
        self.run_max = 1 if singles else max(1, min(_RUN_MAX, self.window // 4))
        self._space = trio.Event()  # set when confirmations free some of the window
        self.fetched_to = cursor  # next DLQ offset the fetch stage will read
        self.published_to = cursor  # every record below it is published (or not ours)
        self.caught_up = trio.Event()
        # Set when a result router wrote this client's results to the DLQ (DLQ_WRITES): cuts the
        # fetch stage's wait short. Replaced before each fetch, so a notice during one is kept.
        self.nudged = trio.Event()
        self.delivered = 0
        self.last_published = (0, 0)  # (token, delivery id)
        self.last_ack_ns = 0
        self.gap_from = 0  # > 0: results from this delivery id on may have aged out (see _gap)
        self.stopped = False  # a delivery failed: the stream is gone, the cursor stays
        self.fault = ""  # why the replay stopped before its client left REPLAYING ("": it did not)
        self.refused = ""  # a pod refused a delivery of this replay as malformed: its reason
        self.progress_at = trio.current_time()  # last confirmation (or publish onto none pending)
        self.drained_at: float | None = None  # when it last found itself drained (see _watchdog)
        self.scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<ReplayPipeline {self.client_id} epoch={self.epoch} cursor={self.cursor} unconfirmed={len(self.unconfirmed)}>"

    async def run(self) -> None:
        t0 = trio.current_time()
        send, recv = trio.open_memory_channel[tuple[list[_Item], int]](4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fetch, send)
            nursery.start_soon(self._publish, recv)
            nursery.start_soon(self._ack, nursery.cancel_scope)
            nursery.start_soon(self._keep_lease, nursery.cancel_scope)
            nursery.start_soon(self._watchdog, nursery.cancel_scope)
            self.scope = nursery.cancel_scope  # the service's watcher ends the replay through it
        logger.info(
            "replay of {} (epoch {}) ended: {} results delivered in {:.3f}s",
            self.client_id,
            self.epoch,
            self.delivered,
            trio.current_time() - t0,
        )

    async def _fetch(self, send: trio.MemorySendChannel[tuple[list[_Item], int]]) -> None:
        key = self.client_id.encode()
        # Is part of what we are to read gone (retention)? See _gap. Checked at the start (with
        # partition starts read at most a quarter second ago: a hundred replays starting at once
        # share a read), again after each stall at the end (read at most a second ago: many
        # replays wait at their ends at once), and always afresh when the reader skipped records.
        check_start: float | None = (
            _START_BEGINS_MAX_AGE_S  # None: no check due; else the age allowed
        )
        async with send:
            while True:
                if self.fetched_to < 0:
                    # No DLQ write recorded yet: _watch picks it up, or a notice says it came.
                    with trio.move_on_after(0.02):
                        await self.nudged.wait()
                    if self.nudged.is_set() and self.fetched_to < 0:
                        self.nudged = trio.Event()
                        if self.on_record(await self.svc.state.get(self.client_id)):
                            await self.svc.request_flip(self.client_id, self.last_ack_ns)
                    continue
                if check_start is not None:
                    await self._check_retention(check_start)
                    check_start = None
                self.nudged = trio.Event()
                records = await self.svc.fetch(self, self.fetched_to, 500, 0.1)
                if records and records[0].offset > self.fetched_to:
                    await self._check_retention()  # the reader skipped records: aged out?
                if not records:
                    if not self.caught_up.is_set():
                        if self.gap_from and await self._at_end():
                            # Nothing of ours is left after the aged-out part: the GAP ends with
                            # the last result ever written to the DLQ for this client.
                            state = await self.svc.state.get(self.client_id)
                            gap = self._gap(state.dlq_written if state is not None else 0)
                            if gap is not None:
                                await send.send(([gap], self.fetched_to))
                                continue
                        check_start = (
                            _BEGINS_MAX_AGE_S  # a stall at the end may hide a deleted range too
                        )
                        self.caught_up.set()
                        if self._drained():
                            await self.svc.request_flip(self.client_id, self.last_ack_ns)
                    continue
                self.caught_up = trio.Event()
                batch = []
                for rec in records:
                    if rec.key != key:
                        continue
                    try:
                        results = packs.parse_record(rec)  # one result, or a pack of them
                    except badinput.BadRecord as e:
                        badinput.record("dlq", e.reason, rec)
                        continue
                    # Skipped: what the client acked, and what this replay already took (the
                    # DLQ is at-least-once: a result can be in two records, or twice in a pack).
                    for r in packs.fresh(results, self.taken):
                        self.taken = r.delivery_id
                        if self.gap_from:
                            gap = self._gap(r.delivery_id - 1, rec.offset)
                            if gap is not None:
                                batch.append(gap)
                        # A pack's results share its offset: the cursor stays on the pack until
                        # all of them are confirmed, and a replay from it skips the acked ones.
                        batch.append(_Item(rec.offset, r))
                self.fetched_to = records[-1].offset + 1
                await send.send((batch, self.fetched_to))

    async def _check_retention(self, max_age: float = 0.0) -> None:
        """If the DLQ partition now starts above where we read, the records in between aged out
        (retention): results of this client after `acked` may be among them. The client is told
        with a GAP before the next result of its that is still there (or, if none is, up to the
        last one written to the DLQ), so it can ack past them and go LIVE."""
        start = (await self.svc.dlq_begin_offsets(max_age)).get(self.partition, 0)
        if self.fetched_to < start:
            logger.warning(
                "replay of {}: DLQ offsets {}..{} of partition {} aged past retention; results after"
                " delivery id {} may be gone",
                self.client_id,
                self.fetched_to,
                start - 1,
                self.partition,
                self.acked,
            )
            self.svc.counters.inc("replay.retention_gaps")
            if not self.gap_from:
                self.gap_from = self.taken + 1  # everything up to `taken` was fetched
            self.fetched_to = max(self.fetched_to, start)

    async def _at_end(self) -> bool:
        """An empty fetch only says nothing came within its timeout; this says there is nothing."""
        end = (await self.svc.log.end_offsets(self.svc.s.kafka_dlq_topic)).get(self.partition, 0)
        return self.fetched_to >= end

    def _gap(self, gap_to: int, offset: int | None = None) -> _Item | None:
        """The GAP notice for gap_from..gap_to (None if that range is empty), as a delivery with
        id gap_to: the client's cumulative ack of it covers the lost results."""
        gap_from, self.gap_from = self.gap_from, 0
        if gap_to < gap_from:
            return None
        logger.warning(
            "replay of {}: telling the client results {}..{} are gone",
            self.client_id,
            gap_from,
            gap_to,
        )
        self.svc.counters.inc("replay.gap_notices")
        resp = EventResponse(kind=GAP, delivery_id=gap_to, gap_from=gap_from, gap_to=gap_to)
        self.taken = max(self.taken, gap_to)
        return _Item(self.fetched_to if offset is None else offset, resp)

    def _drained(self) -> bool:
        return (
            self.caught_up.is_set()
            and not self.unconfirmed
            and self.published_to == self.fetched_to
        )

    async def _publish(self, recv: trio.MemoryReceiveChannel[tuple[list[_Item], int]]) -> None:
        async with recv:
            async for batch, end in recv:
                run: list[_Item] = []
                for item in batch:
                    if self.in_flight + len(run) >= self.window:
                        await self._send(run)  # publish what we hold before waiting
                        run = []
                        while self.in_flight >= self.window:
                            self._space = trio.Event()
                            await self._space.wait()
                    if isinstance(item.result, EventResponse):  # a GAP notice: a delivery alone
                        await self._send(run)
                        run = []
                        await self._send([item])
                        continue
                    run.append(item)
                    if len(run) >= self.run_max:
                        await self._send(run)
                        run = []
                await self._send(run)
                self.published_to = end
                if not batch:
                    self._advance()

    async def _send(self, items: list[_Item]) -> None:
        """Publish items as one delivery: a run of results, or a GAP notice alone."""
        if not items:
            return
        # The pod refuses a delivery whose unconfirmed predecessor it never got.
        prev_token, prev_id = self.last_published
        prev = prev_id if prev_token in self.unconfirmed else 0
        token = self.svc.new_token(self)
        last = items[-1].result.delivery_id
        if not self.unconfirmed:
            self.progress_at = trio.current_time()  # nothing was pending: the wait starts now
        self.unconfirmed[token] = _Run(items[0].offset, len(items), last)
        self.in_flight += len(items)
        self.last_published = (token, last)
        svc = self.svc
        first = items[0]
        if len(items) == 1:
            # One result (or a GAP notice) as a delivery of its own: the form a pod takes even
            # when it refused a run (see _Retry.singles).
            one = Outgoing(self.pod, self.client_id, self.epoch, last, token, prev, first.result)
            messages = pod_messages(svc.reply_to, [one], svc.s.instance_id, "replay")
        else:
            results = [it.result for it in items]
            assert all(isinstance(r, KafkaEventResponse) for r in results)
            messages = [
                run_message(
                    svc.reply_to,
                    self.pod,
                    self.client_id,
                    self.epoch,
                    token,
                    prev,
                    results,
                    svc.s.instance_id,
                )
            ]
        await svc.state.publish(messages)

    def _advance(self) -> None:
        """Move the stored cursor to the lowest DLQ offset not yet confirmed: everything of this
        client below it is delivered. Records fetched but not yet published keep it back."""
        # Items are published in DLQ offset order and the dict keeps that order: its first item
        # is the lowest (no scan of the window per report).
        if self.stopped:
            return
        low = (
            next(iter(self.unconfirmed.values())).offset if self.unconfirmed else self.published_to
        )
        if low > self.cursor:
            self.cursor = low
            self.svc.advance_cursor(self.client_id, low)

    async def _ack(self, cancel: trio.CancelScope) -> None:
        """Delivery reports for this replay: advance the cursor; ask for the flip when drained."""
        async with self.reports_recv:
            while True:
                batches = await receive_batch(self.reports_recv)
                failed = False
                for it in itertools.chain.from_iterable(batches):
                    run = self.unconfirmed.pop(it.token, None)
                    self.svc.forget_token(it.token)
                    if run is None:
                        continue
                    self.in_flight -= run.count
                    if it.delivered:
                        self.delivered += run.count
                        self.last_ack_ns = time.time_ns()
                        self.acked = max(self.acked, run.last_id)
                        self.progress_at = trio.current_time()
                    else:
                        failed = True
                        self.refused = self.refused or it.refused
                self._space.set()
                if failed:
                    # What failed left `unconfirmed` above: the cursor must not move any more (a
                    # stage already woken would otherwise count it as delivered before it sees
                    # the cancellation). The next replay starts from the cursor, changed if the
                    # pod refused what this one sent (see ReplayService._ended).
                    self.stopped = True
                    if self.refused:
                        self.fault = f"a pod refused a delivery: {self.refused}"
                    else:
                        self.fault = "a delivery failed (the stream is gone or missed one)"
                    logger.info(
                        "replay of {} (epoch {}): {}; stopping",
                        self.client_id,
                        self.epoch,
                        self.fault,
                    )
                    cancel.cancel()
                    return
                self._advance()
                if self._drained():
                    await self.svc.request_flip(self.client_id, self.last_ack_ns)

    async def _keep_lease(self, cancel: trio.CancelScope) -> None:
        while True:
            await trio.sleep(LEASE_MS / 3000)
            if not await self.svc.state.acquire_lease(
                self.svc.lease_name(self.client_id), self.svc.owner, LEASE_MS
            ):
                logger.warning("replay of {}: lease lost; stopping", self.client_id)
                self.fault = "lease lost"
                cancel.cancel()
                return

    async def _watchdog(self, cancel: trio.CancelScope) -> None:
        """A delivery that no pod confirms (its message or its report was lost, e.g. with a Redis
        connection) would hold the replay for ever: after the delivery timeout without any
        confirmation the replay stops, and the next one resends from the cursor (the pod skips
        what it already queued). A drained replay whose flip does not come for NIMBUS_STALL_MS
        is reported once (the flip waits for a DLQ write that has not landed)."""
        timeout = self.svc.s.delivery_timeout_ms / 1000
        stall = self.svc.s.stall_ms / 1000
        reported = False
        while True:
            await trio.sleep(min(0.5, timeout / 4))
            now = trio.current_time()
            if self.unconfirmed and now - self.progress_at > timeout:
                self.stopped = True
                self.fault = f"no delivery confirmed for {now - self.progress_at:.1f}s"
                logger.warning(
                    "replay of {} (epoch {}): {}; resending from the cursor",
                    self.client_id,
                    self.epoch,
                    self.fault,
                )
                cancel.cancel()
                return
            if not self._drained():
                self.drained_at = None
            elif self.drained_at is None:
                self.drained_at = now
            elif not reported and now - self.drained_at > stall:
                reported = True
                self.svc.counters.inc("replay.stalled")
                logger.error(
                    "replay of {} (epoch {}): drained {:.0f}s ago and still not LIVE: the flip "
                    "waits for a result routed to the DLQ that has not been written (is a result "
                    "router down?)",
                    self.client_id,
                    self.epoch,
                    now - self.drained_at,
                )

    def on_record(self, rec: ClientRecord | None) -> bool:
        """The client's stored record, read by the service's watcher for all replays at once:
        end when the client is no longer ours to replay. True: ask for the flip again (the
        first request may have been lost)."""
        if rec is None or rec.status is not Status.REPLAYING or rec.epoch != self.epoch:
            if self.scope is not None:
                self.scope.cancel()
            return False
        if self.fetched_to < 0 <= rec.cursor:
            # The first DLQ write for this client landed after the replay started.
            self.cursor = self.fetched_to = self.published_to = rec.cursor
            return False
        return self._drained()


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
        r.not_before = now + min(_RETRY_FIRST_S * 2 ** (r.failures - 1), _RETRY_MAX_S)
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
                _RETRY_MAX_S,
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
