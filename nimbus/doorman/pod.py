"""The pod: the trio side of the doorman. Owns this pod's sessions (one per connected stream),
the delivery of results arriving on this pod's channel, and the delivery reports and acks going
back; the ingest of the streams' events into the events topic is its part `Ingest`
(nimbus.doorman.ingest), the per-stream state (`Session`, `Outbox`) is in nimbus.doorman.session.

The gRPC handler (asyncio side, `nimbus.server`) talks to it without crossing loops per message:
it calls the synchronous `submit`, `on_ack` and `on_written`, and reads each session's
`outbox` (an `Outbox`, asyncio.Queue-like, this side fills with `put_nowait`). Only `open_session` and
`close_session` are awaited across the bridge, once per stream.

Delivery rules:
- A delivery is written to a stream only if the stream's epoch is the delivery's epoch (the
  client record's epoch when the router or replay decided): a result never reaches a stream that
  replaced, or was replaced by, the one it was meant for.
- "Delivered" means acked by the client (protocol 2), or written to the stream (the original's
  clients, which cannot ack). Anything else is reported failed, so the sender diverts it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import defaultdict

import trio
from loguru import logger

from nimbus import logs
from nimbus.config import Settings
from nimbus.core.lifecycle import Status
from nimbus.core.retry import Backoff, Policy, retrying
from nimbus.doorman.ingest import Ingest
from nimbus.doorman.session import (
    ITEM_OVERHEAD,
    Budget,
    Close,
    Outbox,
    OutboxItem,
    Session,
    item_bytes,
)
from nimbus.ops import metrics
from nimbus.ops.stats import Counters
from nimbus.ports import AckItem, EngineError, Log, RecordsAndPubSub
from nimbus.subscriptions import listen
from nimbus.wire import badinput, trace
from nimbus.wire.messages import (
    GAP,
    Delivery,
    DeliveryReport,
    EventResponse,
    LogEntry,
    ReportItem,
    response_with_log,
)
from nimbus.wire.pod_channel import (
    kick_message,
    parse_pod_message,
    replay_request,
    run_problem,
    status_check,
)

# The per-stream types are imported from here by the handler and the tests.
__all__ = [
    "ITEM_OVERHEAD",
    "Budget",
    "Close",
    "Outbox",
    "OutboxItem",
    "Pod",
    "Session",
    "item_bytes",
]


class Pod(Ingest):
    def __init__(
        self,
        settings: Settings,
        log: Log,
        state: RecordsAndPubSub,
        counters: Counters | None = None,
    ) -> None:
        super().__init__()
        self.s = settings
        self.log = log
        self.state = state
        self.channel = settings.pod_channel
        self.counters = counters or Counters()
        self.retry_policy = Policy.from_settings(settings)  # NIMBUS_RETRY_*
        self.sessions: dict[str, Session] = {}
        self._connecting: dict[str, list[tuple[str, Delivery]]] = {}
        self._ids = itertools.count(1)
        self.budget = Budget(settings.pod_queue_bytes)
        self._half_closed: set[Session] = set()
        self._reports: dict[str, list[ReportItem]] = defaultdict(list)
        self._acks: dict[str, int] = {}
        self._ack_ns: dict[str, int] = {}  # wall clock of each client's latest ack here
        self._flush = trio.Event()
        self._emptied = trio.Event()
        self._closing = 0  # close_session calls still marking their client OFFLINE
        self.accepting = True

    def __repr__(self) -> str:
        return f"<Pod {self.channel} sessions={len(self.sessions)}>"

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                listen, self.state, self.channel, self._on_message, self.retry_policy
            )
            nursery.start_soon(self._ingest)
            nursery.start_soon(self._reporter)
            nursery.start_soon(self._half_closed_deadlines)
            task_status.started()
            logger.info("pod {} up", self.channel)

    async def open_session(self, client_id: str, protocol: int) -> Session:
        s = Session(
            client_id,
            protocol,
            Outbox(self.s.stream_queue, self.s.stream_queue_bytes, self.budget),
            next(self._ids),
        )
        held = self._connecting.setdefault(client_id, [])
        try:
            res = await self.state.connect(client_id, self.channel)
        except BaseException:
            self._connecting.pop(client_id, None)
            raise
        s.epoch = res.epoch
        old = self.sessions.get(client_id)
        self.sessions[client_id] = s
        self._connecting.pop(client_id, None)
        if old is not None:
            self._end(old, Close("ABORTED", "superseded by a newer stream for this client_id"))
        elif res.previous_pod and res.previous_pod != self.channel:
            kick = kick_message(client_id, res.previous_epoch)
            await self.state.publish([(res.previous_pod, kick)])
        if res.status is Status.REPLAYING:
            await self.state.publish([replay_request(client_id)])
        self.counters.inc("pod.connects")
        logger.info("client {} connected (epoch {}, {})", client_id, s.epoch, res.status.value)
        steps: dict[int, bytes] = {}
        for reply_to, d in held:
            self._deliver(reply_to, d, steps)
        return s

    async def close_session(self, s: Session) -> None:
        """The stream ended (client left, error, superseded, shutdown)."""
        s.closed = True
        self._closing += 1
        try:
            if self.sessions.get(s.client_id) is s:
                del self.sessions[s.client_id]
            self._fail_unconfirmed(s)
            with trio.move_on_after(5) as cs:
                cs.shield = True
                try:
                    if await retrying(
                        lambda: self.state.disconnect(s.client_id, s.epoch),
                        EngineError,
                        self.retry_policy,
                        attempts=3,
                        on_error=lambda attempt, e: logger.warning(
                            "client {}: marking OFFLINE failed ({}): {}", s.client_id, attempt, e
                        ),
                    ):
                        logger.info("client {} disconnected (epoch {})", s.client_id, s.epoch)
                except EngineError:
                    # A Redis blip: a new connection usually works. If all 3 tries fail, the
                    # record stays LIVE on this pod and the router's delivery timeout diverts its
                    # results: slower, nothing lost.
                    pass
            self._flush.set()
        finally:
            self._closing -= 1
            if not self.sessions and not self._closing:
                self._emptied.set()
                self._emptied = trio.Event()

    def _end(self, s: Session, close: Close) -> None:
        s.closed = True
        self._half_closed.discard(s)
        self._fail_unconfirmed(s)
        if close.status is not None:
            # What is queued is unconfirmed, hence reported undelivered: its memory goes now
            # (the writer may be stuck on a slow client). A clean end lets the queue drain first.
            s.outbox.clear()
        s.outbox.put_nowait(close)

    async def wait_empty(self) -> None:
        """Until no stream is open and every closed one is marked OFFLINE (shutdown waits for
        this before the engine, and its Redis connections, go away)."""
        while self.sessions or self._closing:
            await self._emptied.wait()

    def close_all(self, message: str) -> None:
        for s in list(self.sessions.values()):
            self._end(s, Close("UNAVAILABLE", message))

    # -- from the handler (synchronous, asyncio side) -----------------------------------------

    def half_close(self, s: Session) -> None:
        """The client ended its side: the stream ends with OK once every result of the events it
        sent is written to it, or at NIMBUS_HALF_CLOSED_SEC. A half-closed stream can send no
        ack: a protocol-2 client's unacked results are reported undelivered when the stream
        ends, so they wait in its backlog, and come again (same delivery ids) next time."""
        if s.closed or s.half_closed_at is not None:
            return
        s.half_closed_at = trio.current_time()
        self._half_closed.add(s)
        self._maybe_finish(s)

    def _maybe_finish(self, s: Session) -> None:
        if (
            s.half_closed_at is not None
            and not s.closed
            and not s.in_ingest
            and max(s.acked, s.written) >= s.last_receipted
        ):
            logs.for_client(s.client_id, s.epoch).info(
                "client {}: half-closed stream done (results up to {} delivered); ending it",
                s.client_id,
                s.last_receipted,
            )
            self._end(s, Close(None))

    async def _half_closed_deadlines(self) -> None:
        limit = self.s.half_closed_sec
        while True:
            await trio.sleep(min(1.0, limit / 4))
            now = trio.current_time()
            for s in list(self._half_closed):
                if s.half_closed_at is not None and now - s.half_closed_at >= limit:
                    self.counters.inc("pod.half_closed_timeout")
                    self._end(
                        s,
                        Close(
                            "DEADLINE_EXCEEDED",
                            f"half-closed stream: results still due after {limit}s; they wait "
                            "in this client's backlog",
                        ),
                    )

    def cut(self, s: Session, status: str, message: str) -> None:
        """End a stream with a gRPC status from the handler's side (a limit); its unconfirmed
        deliveries are reported failed, so they go to its backlog."""
        if not s.closed:
            logger.warning("client {}: ending the stream ({}: {})", s.client_id, status, message)
            self._end(s, Close(status, message))

    def on_written(self, s: Session, delivery_id: int) -> None:
        """The writer put a result on the wire. For clients that cannot ack, that is delivery."""
        s.written = max(s.written, delivery_id)
        if s.protocol < 2:
            self.on_ack(s, delivery_id)
        elif s.half_closed_at is not None:
            self._maybe_finish(s)

    def on_ack(self, s: Session, acked: int) -> None:
        if acked <= s.acked:
            return
        s.acked = acked
        self._acks[s.client_id] = max(self._acks.get(s.client_id, 0), acked)
        self._ack_ns[s.client_id] = time.time_ns()
        # unconfirmed is sorted by delivery id (see _deliver): the acked ones are a prefix, so an
        # ack costs what it confirms, not the length of the window.
        pending = s.unconfirmed
        k = 0
        while k < len(pending) and pending[k][0] <= acked:
            d, reply_to, token = pending[k]
            self._reports[reply_to].append(
                ReportItem(token=token, delivered=True, client_id=s.client_id, delivery_id=d)
            )
            k += 1
        del pending[:k]
        self._flush.set()
        if s.half_closed_at is not None:
            self._maybe_finish(s)

    # -- tasks -------------------------------------------------------------------------------

    def _send(self, s: Session, resp: EventResponse | None, delivery_id: int = 0) -> bool:
        """Queue for the stream's writer; `delivery_id` > 0 marks a result (see on_written)."""
        if s.closed:
            return False
        try:
            s.outbox.put_nowait((delivery_id, resp))
        except asyncio.QueueFull:
            self._cut_slow(s, f"{s.outbox.qsize()} responses, {s.outbox.nbytes} bytes")
            return False
        if self.budget.used > self.budget.limit:
            # The pod's responses in all its queues are over NIMBUS_POD_QUEUE_BYTES: the stream
            # holding the most is the slowest reader (its results go to its backlog).
            worst = max(self.sessions.values(), key=lambda x: x.outbox.nbytes, default=s)
            self._cut_slow(worst, f"the pod's queues hold {self.budget.used} bytes")
            return worst is not s
        return True

    def _cut_slow(self, s: Session, why: str) -> None:
        self.counters.inc("pod.slow_client")
        logs.for_client(s.client_id, s.epoch).warning(
            "client {}: outgoing queue full ({}); cutting the stream", s.client_id, why
        )
        self._end(s, Close("RESOURCE_EXHAUSTED", "client does not read its results fast enough"))

    async def _on_message(self, payload: bytes) -> None:
        """A message on this pod's channel: kicks, then deliveries."""
        try:
            msg = parse_pod_message(payload)
        except Exception:
            self.counters.inc("pod.bad_message")
            badinput.message("pod channel", badinput.UNDECODABLE, self.channel)
            return
        for k in msg.kicks:
            s = self.sessions.get(k.client_id)
            if s is not None and s.epoch <= k.epoch:
                logs.for_client(s.client_id, s.epoch).info(
                    "client {}: stream epoch {} superseded by a stream on another pod",
                    s.client_id,
                    s.epoch,
                )
                self._end(s, Close("ABORTED", "superseded by a newer stream for this client_id"))
        steps: dict[int, bytes] = {}
        for d in msg.deliveries:
            self._deliver(msg.reply_to, d, steps)

    def _deliver(self, reply_to: str, d: Delivery, steps: dict[int, bytes]) -> None:
        """`steps`: this hop's trace step, encoded, by stream epoch (shared by a message's deliveries)."""
        held = self._connecting.get(d.client_id)
        if held is not None:
            held.append((reply_to, d))  # a connect is in progress here: its epoch is coming
            return
        s = self.sessions.get(d.client_id)
        if s is None or s.closed or s.epoch != d.epoch or d.prev_delivery_id > s.last_queued:
            self._report(reply_to, d, delivered=False)
            self.counters.inc("pod.not_here")
            return
        if d.delivery_id <= s.acked:
            self._report(reply_to, d, delivered=True)
            return
        if d.run_ids:
            self._deliver_run(s, reply_to, d, steps)
            return
        if d.delivery_id <= s.last_queued:
            # Already on its way to this stream (a result written twice, or sent again after a
            # lost report): confirmed with the ack that covers it, not queued a second time.
            self._track(s, reply_to, d)
            self.counters.inc("pod.repeats")
            return
        resp = d.response
        metrics.delivered(resp.log)
        out: EventResponse | bytes | None
        if resp.kind == GAP and s.protocol < 2:
            # The original's client cannot be told; nothing goes on the wire, and the writer
            # confirms it in stream order like a result (so nothing queued before it is
            # confirmed early).
            logger.warning(
                "client {} (original protocol): results {}..{} aged past retention and are gone",
                s.client_id,
                resp.gap_from,
                resp.gap_to,
            )
            out = None
        elif s.protocol < 2:
            out = self._original(s, resp, resp.log)
        else:
            # Encoded here, with this hop's trace step appended to the log on the wire (see
            # nimbus.wire.pod_channel.pod_messages): no step built per result, nothing re-encoded later.
            step = self._step(s, steps)
            log = resp.log.SerializeToString() + step
            resp.ClearField("log")
            out = response_with_log(resp.SerializeToString(), log)
        self._track(s, reply_to, d)
        self._send(s, out, d.delivery_id)
        self.counters.inc("pod.delivered")

    def _report(self, reply_to: str, d: Delivery, *, delivered: bool, refused: str = "") -> None:
        """Report delivery d to its sender without queueing it (not here, already acked, or
        `refused` as malformed: the sender must not send the same message again)."""
        self._reports[reply_to].append(
            ReportItem(
                token=d.token,
                delivered=delivered,
                client_id=d.client_id,
                delivery_id=d.delivery_id,
                refused=refused,
            )
        )
        self._flush.set()

    def _original(self, s: Session, resp: EventResponse, log: LogEntry) -> EventResponse:
        """For a client of the original protocol: only the original's fields (it never sees a
        message it cannot understand), the result's log and this hop's step."""
        out = EventResponse(event_name=resp.event_name, number=resp.number, result=resp.result)
        out.log.CopyFrom(log)
        trace.step(out.log, "server", self.s.instance_id, "deliver", epoch=s.epoch)
        return out

    def _step(self, s: Session, steps: dict[int, bytes]) -> bytes:
        """This hop's trace step for s's stream, encoded once per message and epoch."""
        step = steps.get(s.epoch)
        if step is None:
            step = steps[s.epoch] = trace.encoded_step(
                "server", self.s.instance_id, "deliver", epoch=s.epoch
            )
        return step

    @staticmethod
    def _track(s: Session, reply_to: str, d: Delivery) -> None:
        """Note a delivery queued on s: unconfirmed until the client's ack covers its id."""
        entry = (d.delivery_id, reply_to, d.token)
        if s.unconfirmed and s.unconfirmed[-1][0] > d.delivery_id:
            bisect.insort(s.unconfirmed, entry)  # not expected (senders keep a client's order)
        else:
            s.unconfirmed.append(entry)
        s.last_queued = max(s.last_queued, d.delivery_id)

    def _deliver_run(self, s: Session, reply_to: str, d: Delivery, steps: dict[int, bytes]) -> None:
        """A run of results (the replay): each queued in order; ones the client already acked,
        ones already queued on this stream and repeats within the run (an at-least-once DLQ can
        hold a result twice) are skipped. The run is confirmed, as one delivery, once the client
        has acked its last. Only a run that cannot be read (its lists of different lengths, its
        last id not the delivery's) is refused, with the reason, so its sender changes it."""
        reason = run_problem(d)
        if reason:
            badinput.message("pod channel", badinput.MALFORMED_MESSAGE, reason)
            self._report(reply_to, d, delivered=False, refused=reason)
            return
        ids, heads, encoded_logs = d.run_ids, d.run_heads, d.run_logs
        n = len(ids)
        # The delivery latency histogram gets one observation per run (its first result).
        metrics.delivered(LogEntry.FromString(encoded_logs[0]))
        taken = max(s.acked, s.last_queued)
        self._track(s, reply_to, d)
        queued = 0
        if s.protocol < 2:
            for did, head, log in zip(ids, heads, encoded_logs, strict=True):
                if did <= taken:
                    continue
                out = self._original(s, EventResponse.FromString(head), LogEntry.FromString(log))
                if not self._send(s, out, did):
                    break
                taken = did
                queued += 1
        else:
            step = self._step(s, steps)
            for did, head, log in zip(ids, heads, encoded_logs, strict=True):
                if did <= taken:
                    continue
                # Encoded here: the head, then the log with this hop's step (see _deliver).
                if not self._send(s, response_with_log(head, log + step), did):
                    break
                taken = did
                queued += 1
        if queued < n:
            self.counters.inc("pod.repeats", n - queued)
        self.counters.inc("pod.delivered", queued)

    def _fail_unconfirmed(self, s: Session) -> None:
        for d, reply_to, token in s.unconfirmed:
            self._reports[reply_to].append(
                ReportItem(token=token, delivered=False, client_id=s.client_id, delivery_id=d)
            )
        s.unconfirmed = []
        self._flush.set()

    async def _reporter(self) -> None:
        """Acks to the state store first, then delivery reports: a report must never reach the
        replay (which then asks for the flip to LIVE) before the ack it stands for is stored."""
        backoff = Backoff(self.retry_policy)
        while True:
            await self._flush.wait()
            self._flush = trio.Event()
            acks, self._acks = self._acks, {}
            ack_ns, self._ack_ns = self._ack_ns, {}
            reports, self._reports = self._reports, defaultdict(list)
            try:
                messages: list[tuple[str, bytes]] = []
                if acks:
                    ready = await self.state.ack([AckItem(c, a) for c, a in acks.items()])
                    # A client whose backlog this ack completes: ask the status manager now,
                    # with the time the ack arrived here (what "LIVE within 100 ms" counts from).
                    messages += [
                        status_check(c, ack_ns.get(c, 0))
                        for c, ok in zip(acks, ready, strict=True)
                        if ok
                    ]
                messages += [
                    (ch, DeliveryReport(items=items).SerializeToString())
                    for ch, items in reports.items()
                ]
                if messages:
                    await self.state.publish(messages)
                backoff.failures = 0
            except EngineError as e:
                logger.warning("pod {}: writing acks/reports failed: {}; retrying", self.channel, e)
                for c, a in acks.items():
                    self._acks[c] = max(a, self._acks.get(c, 0))
                    self._ack_ns.setdefault(c, ack_ns.get(c, 0))
                for ch, items in reports.items():
                    self._reports[ch][:0] = items
                self._flush.set()
                await backoff.wait()
            await trio.sleep(0.002)  # gather a few ms of acks into one round trip
