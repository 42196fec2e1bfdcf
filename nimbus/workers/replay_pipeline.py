"""One client's replay (a `ReplayPipeline`): three stages joined by bounded trio memory channels,

    fetch (DLQ records of this client, from the cursor)
      -> publish (runs of results to the client's pod channel, one delivery each; at most
                 `replay_window` results unconfirmed)
      -> ack (a delivery report per run; advance the cursor; at the end, ask for the flip to LIVE)

beside two guards: the lease's renewal, and a watchdog for deliveries no pod confirms. The
replay service (`nimbus.workers.replay`) starts one while it holds the client's lease, and serves
it what all its replays share: the DLQ partition's reader and fetch cache, the delivery tokens,
the cursor writes, the client records' watch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from loguru import logger

from nimbus.core.channels import receive_batch
from nimbus.core.lifecycle import ClientRecord, Status
from nimbus.wire import badinput, packs
from nimbus.wire.messages import GAP, EventResponse, KafkaEventResponse, ReportItem
from nimbus.wire.pod_channel import Outgoing, pod_messages, run_message

if TYPE_CHECKING:
    from nimbus.workers.replay import ReplayService

LEASE_MS = 4_000  # renewed every third of it; a killed worker's replays restart after this
_BEGINS_MAX_AGE_S = 1.0  # see ReplayPipeline._fetch
_START_BEGINS_MAX_AGE_S = 0.25
# Results per run (one pod message, one delivery, one report) at most, and at most a quarter of
# the window: a window holds several runs, so the pod, the stream and the acks work on one while
# the next is on its way (a fetch of packed records holds thousands of results; published at
# once, the stages would take turns).
_RUN_MAX = 500


@dataclass
class _Item:
    offset: int  # DLQ offset
    result: KafkaEventResponse | EventResponse  # a DLQ record, or a GAP notice (see _gap)


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
                    # No DLQ write recorded yet: the service's _watch picks it up, or a notice
                    # says it came.
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
            # when it refused a run (see nimbus.workers.replay._Retry.singles).
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
