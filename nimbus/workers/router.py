"""The result router ("mail sorter"): results topic -> the client's pod channel, or the DLQ.

The decisions live in `RouterWindow` (pure); this module is the thin driver around it: one task
polls the results topic, one reads delivery reports from this router's reply channel, a ticker
expires deliveries that no pod confirmed, and the driver loop applies them to the window and
does the I/O it asks for, batched: one `route` script call per batch, one PUBLISH per pod per
batch, one DLQ produce per batch, one commit per ~100 ms (sent with the poller's next poll).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import trio
from loguru import logger

from nimbus.config import RESULTS_GROUP, Settings
from nimbus.core.channels import receive_batch
from nimbus.core.retry import Backoff, Policy, retrying
from nimbus.core.router_window import Entry, RouterWindow
from nimbus.ops.stats import Counters
from nimbus.ports import (
    CommitFailed,
    DlqWrite,
    EngineError,
    Log,
    LogConsumer,
    PollResult,
    RecordsAndPubSub,
    TopicPartition,
)
from nimbus.subscriptions import listen
from nimbus.wire import badinput, packs, trace
from nimbus.wire.messages import DeliveryReport, KafkaEventResponse
from nimbus.wire.pod_channel import dlq_writes, pod_messages, replay_request, reply_channel


@dataclass
class _Tick:
    pass


class ResultRouter:
    def __init__(
        self,
        settings: Settings,
        log: Log,
        state: RecordsAndPubSub,
        counters: Counters | None = None,
    ) -> None:
        self.s = settings
        self.log = log
        self.state = state
        self.window = RouterWindow(settings.delivery_timeout_ms / 1000)
        self.reply_to = reply_channel("router", f"{settings.instance_id}:{uuid.uuid4().hex[:8]}")
        self.counters = counters or Counters()
        self.retry_policy = Policy.from_settings(settings)  # NIMBUS_RETRY_*
        self._act_backoff = Backoff(self.retry_policy)
        self._space = trio.Event()
        self._last_commit = -math.inf
        self._pending_commit: dict[TopicPartition, int] = {}

    def __repr__(self) -> str:
        return f"<ResultRouter {self.reply_to} {self.window!r}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[PollResult | DeliveryReport | _Tick](64)
        async with (
            self.log.consumer(self.s.kafka_results_topic, self.s.results_group) as consumer,
            trio.open_nursery() as nursery,
        ):
            reports = send.clone()

            async def on_report(payload: bytes) -> None:
                try:
                    report = DeliveryReport.FromString(payload)
                except Exception:
                    self.counters.inc("router.bad_report")
                    badinput.message("router reports", badinput.UNDECODABLE, self.reply_to)
                    return
                await reports.send(report)

            await nursery.start(listen, self.state, self.reply_to, on_report, self.retry_policy)
            nursery.start_soon(self._poller, consumer, send.clone())
            nursery.start_soon(self._ticker, send.clone())
            send.close()
            task_status.started()
            logger.info("result router up: group {} reply channel {}", RESULTS_GROUP, self.reply_to)
            try:
                await self._drive(consumer, recv)
            finally:
                with trio.move_on_after(2) as cs:
                    cs.shield = True
                    await self._commit(consumer, force=True)

    async def _poller(
        self,
        consumer: LogConsumer,
        send: trio.MemorySendChannel[PollResult | DeliveryReport | _Tick],
    ) -> None:
        async with send:
            while True:
                while self.window.pending >= self.s.router_window:
                    self._space = trio.Event()
                    await self._space.wait()
                result = await retrying(
                    lambda: consumer.poll(500, 0.2),
                    EngineError,
                    self.retry_policy,
                    on_error=lambda _n, e: logger.warning("result router: poll failed: {}", e),
                )
                if result.records or result.revoked or result.assigned:
                    await send.send(result)

    async def _ticker(
        self, send: trio.MemorySendChannel[PollResult | DeliveryReport | _Tick]
    ) -> None:
        async with send:
            while True:
                await trio.sleep(0.05)
                await send.send(_Tick())

    async def _drive(
        self,
        consumer: LogConsumer,
        recv: trio.MemoryReceiveChannel[PollResult | DeliveryReport | _Tick],
    ) -> None:
        async with recv:
            while True:
                items = await receive_batch(recv)
                for item in items:
                    self._take(item)
                now = trio.current_time()
                self.window.expire(now)
                for e in self.window.stalled(now, self.s.stall_ms / 1000):
                    self.counters.inc("router.stalled")
                    logger.error(
                        "result router: result {} of {} (partition {} offset {}) unresolved for "
                        "{:.0f}s ({}); it holds the partition's commit back",
                        e.delivery_id,
                        e.client_id,
                        e.tp.partition,
                        e.offset,
                        now - e.added,
                        e.state.value,
                    )
                await self._act(consumer)
                if self.window.pending < self.s.router_window:
                    self._space.set()

    def _take(self, item: PollResult | DeliveryReport | _Tick) -> None:
        w = self.window
        if isinstance(item, PollResult):
            if item.revoked:
                logger.info(
                    "result router: partitions revoked {}",
                    sorted(tp.partition for tp in item.revoked),
                )
                w.revoke(item.revoked)
            for rec in item.records:
                tp = TopicPartition(rec.topic, rec.partition)
                try:
                    results = packs.parse_record(rec)  # one result, or a pack of them
                except badinput.BadRecord as e:
                    self.counters.inc("router.malformed")
                    badinput.record("results", e.reason, rec)
                    w.add_skipped(tp, rec.offset)
                    continue
                self.counters.inc("router.results", len(results))
                added = 0
                now = trio.current_time()
                for r in results:  # a pack's results share its offset (see RouterWindow.commits)
                    if w.add(tp, rec.offset, r.client_id, r.delivery_id, r, now) is not None:
                        added += 1
                if added < len(results):
                    # At-least-once: results written again after a kill are taken once.
                    self.counters.inc("router.repeats", len(results) - added)
                if not added:
                    w.add_skipped(tp, rec.offset)
        elif isinstance(item, DeliveryReport):
            for it in item.items:
                w.report(it.token, it.delivered)
                self.counters.inc("router.delivered" if it.delivered else "router.failed")

    async def _act(self, consumer: LogConsumer) -> None:
        w = self.window
        try:
            diverts = w.pending_diverts()
            if diverts:
                await self.state.divert([(e.client_id, e.delivery_id) for e in diverts])
                w.diverted(diverts)
                self.counters.inc("router.diverted", len(diverts))
                logger.info(
                    "result router: diverted {} failed live deliveries to the DLQ", len(diverts)
                )
                # A divert makes a connected client REPLAYING: ask for its replay now, not at
                # the replay service's next periodic scan (NIMBUS_STATUS_INTERVAL_MS), which
                # stays the safety net if this request is lost.
                try:
                    await self.state.publish(
                        [replay_request(cid) for cid in {e.client_id for e in diverts}]
                    )
                except EngineError as e:
                    logger.debug("result router: replay requests not sent: {}", e)
            decide = w.decidable()
            if decide:
                try:
                    decisions = await self.state.route(
                        [(e.client_id, e.delivery_id) for e in decide]
                    )
                except BaseException:
                    w.undecide(decide)
                    raise
                w.apply(decide, decisions, trio.current_time())
            live = w.take_publish()
            if live:
                await self.state.publish(
                    pod_messages(self.reply_to, live, self.s.instance_id, "route")
                )
                self.counters.inc("router.live", len(live))
            writes = w.take_dlq_writes()
            if writes:
                await self._write_dlq(writes)
            w.settle()
            self._act_backoff.failures = 0
        except EngineError as e:
            logger.warning("result router: {}; retrying", e)
            await self._act_backoff.wait()
        await self._commit(consumer)

    async def _write_dlq(self, writes: list[Entry]) -> None:
        items = []
        for e in writes:
            r = e.payload
            assert isinstance(r, KafkaEventResponse)
            trace.step(r.log, "result-router", self.s.instance_id, "divert-to-dlq")
            items.append((e.client_id, r.SerializeToString(), e.delivery_id))
        # Each client's results of this batch in records of up to NIMBUS_DLQ_PACK (nimbus.wire.packs):
        # one record write and one DLQ write noted per pack, its last delivery id.
        records = packs.packs(items, self.s.dlq_pack)
        try:
            written = await self.log.producer.send_batch(
                self.s.kafka_dlq_topic, [(cid.encode(), value) for cid, value, _ in records]
            )
            await self.state.dlq_written(
                [
                    DlqWrite(cid, ids[-1], w.partition, w.offset)
                    for (cid, _, ids), w in zip(records, written, strict=True)
                ]
            )
        except BaseException:
            self.window.dlq_failed(writes)
            raise
        self.window.dlq_done(writes)
        self.counters.inc("router.dlq", len(writes))
        self.counters.inc("router.dlq_records", len(records))
        # Wake the replays of these clients, if any is running (a client reconnecting while its
        # results were on their way to its old pod is replaying now, waiting for exactly these).
        # Only a hint: a replay finds the records by itself too, a wait at the partition's end
        # later, so a lost one costs latency, never a result.
        try:
            await self.state.publish([dlq_writes(cid for cid, _, _ in records)])
        except EngineError as e:
            logger.debug("result router: DLQ write notice not sent: {}", e)

    async def _commit(self, consumer: LogConsumer, force: bool = False) -> None:
        self._pending_commit.update(self.window.commits())
        now = trio.current_time()
        if not self._pending_commit or (not force and now - self._last_commit < 0.1):
            return
        offsets, self._pending_commit = self._pending_commit, {}
        self._last_commit = now
        if not force:
            # Sent by the poller's next poll: the driver never waits for the poll in progress
            # (it holds the consumer) or for the commit's round trip.
            consumer.commit_later(offsets)
            return
        try:
            await consumer.commit(offsets)
        except CommitFailed as e:
            logger.info(
                "result router: commit refused ({}); the partitions' new owner re-reads them", e
            )
            self._retry_commit(offsets)
        except EngineError as e:
            logger.warning("result router: commit failed: {}", e)
            self._retry_commit(offsets)

    def _retry_commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit again later what is still ours: a rebalance may leave a partition here, and
        with no new record on it nothing else would commit past what is already resolved (its
        lag would stay, and a restart would re-route it). Found by tests/test_fuzz.py."""
        for tp, offset in offsets.items():
            if self.window.owns(tp):
                self._pending_commit.setdefault(tp, offset)
