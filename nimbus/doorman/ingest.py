"""The pod's ingest: events from the streams, produced to the events topic in batches, each
answered on its stream with a receipt (protocol 2) or a per-event error.

`Ingest` is the part of `nimbus.doorman.pod.Pod` that does it (Pod derives from it). The gRPC
handler (asyncio side) queues an event with the synchronous `submit` (or awaits `submit_wait`
while the queue is full, by count or by NIMBUS_INGEST_QUEUE_BYTES); the pod runs `_ingest`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from loguru import logger

from nimbus.config import INGEST_BATCH, Settings
from nimbus.core import events
from nimbus.core.channels import receive_batch
from nimbus.doorman.session import Close, Session
from nimbus.ops.stats import Counters
from nimbus.ports import EngineError, Log
from nimbus.wire import trace
from nimbus.wire.messages import (
    ERROR,
    RECEIPT,
    UNKNOWN_EVENT,
    EventRequest,
    EventResponse,
    KafkaEventRequest,
)


class Ingest:
    """The ingest part of a Pod (see the module docstring). The Pod provides what is declared
    here: its settings, log, counters and channel, and how it queues for and ends a stream."""

    s: Settings
    log: Log
    counters: Counters
    channel: str

    if TYPE_CHECKING:

        def _send(self, s: Session, resp: EventResponse | None, delivery_id: int = 0) -> bool: ...
        def _end(self, s: Session, close: Close) -> None: ...
        def _maybe_finish(self, s: Session) -> None: ...

    def __init__(self) -> None:
        send, recv = trio.open_memory_channel[tuple[Session, EventRequest, int]](10_000)
        self._ingest_send, self._ingest_recv = send, recv
        self._ingest_bytes = 0  # of the events in the ingest channel (NIMBUS_INGEST_QUEUE_BYTES)
        self._ingest_room = trio.Event()

    # -- from the handler (synchronous, asyncio side) -----------------------------------------

    def submit(self, s: Session, req: EventRequest, size: int = 0) -> bool:
        """Queue an event (`size`: its encoded bytes) for the events topic; False if the ingest
        queue is full, by count or by NIMBUS_INGEST_QUEUE_BYTES (then await `submit_wait`)."""
        if self._ingest_bytes and self._ingest_bytes + size > self.s.ingest_queue_bytes:
            return False
        try:
            self._ingest_send.send_nowait((s, req, size))
        except trio.WouldBlock:
            return False
        self._ingest_bytes += size
        s.in_ingest += 1
        return True

    async def submit_wait(self, s: Session, req: EventRequest, size: int = 0) -> None:
        """Queue the event once there is room (the stream's reader waits: HTTP/2 flow control
        then holds the client back)."""
        while not self.submit(s, req, size):
            await self._ingest_room.wait()

    def refuse(self, s: Session, req: EventRequest, code: int, message: str) -> None:
        """Refuse one event before it is queued (a limit): a per-event error."""
        self._send(s, self._error(s, req, code, message))

    # -- the task ----------------------------------------------------------------------------

    async def _ingest(self) -> None:
        """Events -> events topic, in batches; receipts or errors back to the streams."""
        while True:
            batch = await receive_batch(self._ingest_recv, INGEST_BATCH)
            for _, _, size in batch:
                self._ingest_bytes -= size
            self._ingest_room.set()
            self._ingest_room = trio.Event()
            try:
                await self._produce(batch)
            finally:
                # Only now are these events receipted (or refused): until then a half-closed
                # stream must not end, or it would end before the receipt of its last event.
                for s, _, _ in batch:
                    s.in_ingest -= 1
                    if s.half_closed_at is not None:
                        self._maybe_finish(s)

    async def _produce(self, batch: list[tuple[Session, EventRequest, int]]) -> None:
        accepted: list[tuple[Session, EventRequest]] = []
        records: list[tuple[bytes, bytes]] = []
        for s, req, _ in batch:
            if s.closed:
                # Never receipted, so the client resends it on its next stream; producing it
                # now would put it behind (and beside) the resent copy.
                self.counters.inc("pod.dropped_unreceipted")
                continue
            if not events.is_known(req.event_name):
                self.counters.inc("pod.unknown_event")
                self._send(
                    s, self._error(s, req, UNKNOWN_EVENT, f"unknown event {req.event_name!r}")
                )
                continue
            kreq = KafkaEventRequest(
                event_name=req.event_name,
                number=req.number,
                client_id=s.client_id,
                redis_channel=self.channel,
                epoch=s.epoch,
                seq=req.seq,
            )
            trace.step(kreq.log, "server", self.s.instance_id, "ProcessEvent", epoch=s.epoch)
            accepted.append((s, req))
            records.append((s.client_id.encode(), kreq.SerializeToString()))
        if not records:
            return
        try:
            written = await self.log.producer.send_batch(self.s.kafka_events_topic, records)
        except EngineError as e:
            logger.error("producing {} events failed: {}", len(records), e)
            self.counters.inc("pod.produce_failed", len(records))
            for s, _ in accepted:
                if not s.closed:
                    # Fail the stream rather than refuse this one event: events queued behind
                    # it are dropped with the stream (see above), and the client resends
                    # everything unreceipted, in order, on its next stream. A per-event
                    # refusal would let later events overtake it. Never silent (hole 9).
                    self._end(s, Close("UNAVAILABLE", f"event not accepted: {e}"))
            return
        self.counters.inc("pod.events", len(records))
        for (s, req), w in zip(accepted, written, strict=True):
            s.last_receipted = max(s.last_receipted, w.offset + 1)
            if s.protocol >= 2:
                self._send(s, EventResponse(kind=RECEIPT, seq=req.seq, delivery_id=w.offset + 1))

    @staticmethod
    def _error(s: Session, req: EventRequest, code: int, message: str) -> EventResponse:
        resp = EventResponse(event_name=req.event_name, number=req.number)
        resp.error.code = code
        resp.error.message = message
        if s.protocol >= 2:
            resp.kind = ERROR
            resp.seq = req.seq
        # The original's client sees what the original sent: event_name and number, result 0.
        return resp
