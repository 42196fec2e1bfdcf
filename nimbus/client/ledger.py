"""`ClientLedger`: every piece of client bookkeeping, with no I/O."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nimbus.proto_gen.nimbus import (
    ErrorCode,
)

if TYPE_CHECKING:
    pass

from nimbus.client.types import RESENT_MEMORY, ClientStats, backoff_delay


@dataclass(slots=True, eq=False)
class OutgoingEvent:
    """An event `send()` accepted and whose fate is not settled yet."""

    seq: int  # the application's handle (what send() returned); the seq of its first transmission
    wire_seq: int  # the seq on the wire: == seq, except after an UNAVAILABLE retry
    event_name: str
    number: int
    transmissions: int = 0
    in_flight: bool = False  # written (or queued) on the current stream, outcome unknown
    retry_at: float | None = None  # refused with UNAVAILABLE: retransmit at this time
    retries: int = 0


class ClientLedger:
    """Everything the client remembers between messages; every method is synchronous and pure.

    The I/O layer calls `add()` for each event, `on_connected()`/`on_disconnected()` around each
    stream (with `on_stream_lost()` in between when the stream dies but its last responses are
    still being applied), `on_receipt()`/`on_refused()`/`on_result()`/`on_gap()` for each response,
    `on_written()` for each event written (protocol 1: there are no receipts, so "written to a
    stream" is the end of the library's responsibility), and `consumed()` when the application
    takes a result. Times (`now`) are supplied by the caller, so tests need no clock.

    Seqs: one counter per client, starting at 1. An event keeps its seq when it is resent after a
    reconnect (resends go first on the new stream, in ascending order, so seqs stay strictly
    increasing per stream, and a server could recognise a resend). An event refused with
    UNAVAILABLE was definitely not accepted; it is retransmitted with a fresh seq, because seqs
    after it were probably used on the same stream already.

    Acks (protocol 2): cumulative, covering what the application has taken; due when `ack_every`
    results are unacked or `ack_interval` seconds after the first unacked one.
    """

    def __init__(
        self,
        protocol: int = 2,
        *,
        ack_every: int = 100,
        ack_interval: float = 0.005,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        rand: Callable[[], float] = random.random,
    ) -> None:
        if protocol not in (1, 2):
            raise ValueError(f"protocol must be 1 or 2, got {protocol!r}")
        if ack_every < 1 or ack_interval < 0:
            raise ValueError("ack_every must be >= 1 and ack_interval >= 0")
        self.protocol = protocol
        self.stats = ClientStats()
        self._ack_every = ack_every
        self._ack_interval = ack_interval
        self._retry_backoff = retry_backoff
        self._rand = rand
        self._next_seq = 1
        self._events: dict[int, OutgoingEvent] = {}  # by seq; insertion order == seq order
        self._in_flight: dict[int, int] = {}  # wire seq -> seq, on the current stream
        self._retrying = 0  # events with retry_at set
        # Connected: responses of the current stream are applied (receipts settle events).
        # Writable: it can still carry requests. A stream that died is drained (still connected)
        # before on_disconnected(); nothing new is written to it meanwhile.
        self._connected = False
        self._writable = False
        # Receipted events whose result has not arrived: delivery id -> seq (+ a heap of the ids,
        # so ids overtaken by a later result can be found without scanning).
        self._expected: dict[int, int] = {}
        self._expected_ids: list[int] = []
        self.highest_received = 0  # dedupe watermark: every delivery id <= this was received
        # Resent events (wire seq -> seq) and whether one of their results was handed over: the
        # server may have accepted an event twice (receipt lost with its stream). Bounded.
        self._resent: dict[int, int] = {}
        self._resent_handed: set[int] = set()
        self.settled_by_result = False  # the last on_result settled its unreceipted event
        self.last_resend_duplicate = 0
        self.ack_position = 0  # highest delivery id the application has taken
        self.ack_sent = 0  # highest ack handed to a stream
        self._unacked = 0
        self._first_unacked_at: float | None = None

    # --- state ---------------------------------------------------------------------------

    @property
    def is_writable(self) -> bool:
        return self._writable

    @property
    def pending(self) -> int:
        """Events accepted by `add()` and not settled (receipted, refused for good, or written in protocol 1)."""
        return len(self._events)

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _transmit(self, ev: OutgoingEvent) -> None:
        ev.in_flight = True
        ev.transmissions += 1
        self._in_flight[ev.wire_seq] = ev.seq

    # --- sending -------------------------------------------------------------------------

    def add(self, event_name: str, number: int) -> OutgoingEvent:
        """Accept a new event. If a stream is up it is transmitted now (`ev.in_flight`), else on connect."""
        seq = self._take_seq()
        ev = OutgoingEvent(seq=seq, wire_seq=seq, event_name=event_name, number=number)
        self._events[seq] = ev
        self.stats.sent += 1
        if self._writable:
            self._transmit(ev)
        return ev

    def on_connected(self) -> tuple[int | None, list[OutgoingEvent]]:
        """A new stream is up: return (ack to send first or None, events to write, in wire order)."""
        self._connected = self._writable = True
        ack = None
        if self.protocol == 2 and self.ack_position > 0:
            # The last ack may have died with the old stream; repeating it is free.
            ack = self.take_ack()
        resend = sorted(
            (ev for ev in self._events.values() if ev.retry_at is None),
            key=lambda ev: ev.wire_seq,
        )
        for ev in resend:
            if ev.transmissions:
                self.stats.resent += 1
                self._remember_resent(ev.wire_seq, ev.seq)
            self._transmit(ev)
        # Refused with UNAVAILABLE: a new stream (maybe another pod) is worth an immediate retry.
        retry = [ev for ev in self._events.values() if ev.retry_at is not None]
        for ev in retry:
            self._start_retry(ev)
        return ack, resend + retry

    def on_stream_lost(self) -> None:
        """The stream can carry nothing more; its responses already received are still to be applied."""
        self._writable = False

    def on_disconnected(self) -> None:
        """The stream is gone and drained: whatever was in flight on it will be resent on the next one."""
        self._connected = self._writable = False
        for ev in self._events.values():
            ev.in_flight = False
        self._in_flight.clear()

    def on_written(self, ev: OutgoingEvent) -> bool:
        """Protocol 1: the event was written to the stream; forget it. True if it was pending."""
        self._in_flight.pop(ev.wire_seq, None)
        return self._events.pop(ev.seq, None) is not None

    def _start_retry(self, ev: OutgoingEvent) -> None:
        ev.retry_at = None
        self._retrying -= 1
        ev.wire_seq = self._take_seq()
        self._transmit(ev)

    def next_retry_at(self) -> float | None:
        if not self._retrying:
            return None
        return min(ev.retry_at for ev in self._events.values() if ev.retry_at is not None)

    def due_retries(self, now: float) -> list[OutgoingEvent]:
        """Refused events whose retry time has come, with fresh seqs (empty when not writable)."""
        if not self._retrying or not self._writable:
            return []
        due = [ev for ev in self._events.values() if ev.retry_at is not None and ev.retry_at <= now]
        for ev in due:
            self._start_retry(ev)
        return due

    # --- responses -----------------------------------------------------------------------

    def on_receipt(self, wire_seq: int, delivery_id: int) -> OutgoingEvent | None:
        """RECEIPT: the event is durable and its result will carry `delivery_id`."""
        seq = self._in_flight.pop(wire_seq, None)
        if seq is None:
            if wire_seq not in self._resent_handed:
                self.stats.unexpected += 1
            # else: the receipt of an event already settled by its result (see on_result), or
            # of a resent copy of it; that copy's result will be dropped by its seq.
            return None
        ev = self._events.pop(seq)
        ev.in_flight = False
        self.stats.receipted += 1
        if delivery_id > self.highest_received:
            self._expected[delivery_id] = seq
            heapq.heappush(self._expected_ids, delivery_id)
        return ev

    def on_refused(
        self, wire_seq: int, code: ErrorCode | int, now: float
    ) -> tuple[OutgoingEvent, bool] | None:
        """ERROR: returns (event, will_retry). UNAVAILABLE is retried after a backoff; anything else is final."""
        seq = self._in_flight.pop(wire_seq, None)
        if seq is None:
            self.stats.unexpected += 1
            return None
        ev = self._events[seq]
        ev.in_flight = False
        self.stats.errors += 1
        if code == ErrorCode.UNAVAILABLE:
            base, cap = self._retry_backoff
            ev.retry_at = now + backoff_delay(ev.retries, base, cap, self._rand())
            ev.retries += 1
            self._retrying += 1
            self.stats.retries += 1
            return ev, True
        del self._events[seq]
        self.stats.refused += 1
        return ev, False

    def on_result(
        self, delivery_id: int, *, failed: bool = False, wire_seq: int = 0
    ) -> tuple[bool, int | None]:
        """RESULT: returns (hand it to the application?, seq of the event it answers or None).
        Not handed over: a redelivery (nothing to do), or a second result of a resent event —
        see `is_resend_duplicate`, which then must be consumed in order like a result."""
        self.last_resend_duplicate = 0
        self.settled_by_result = False
        if self.protocol == 1 or delivery_id == 0:
            # Nothing to dedupe on: the original semantics, results as they come.
            self._count_result(failed)
            return True, None
        if delivery_id <= self.highest_received:
            self.stats.duplicates_dropped += 1
            return False, None
        self.highest_received = delivery_id
        seq = self._expected.pop(delivery_id, None)
        self._forget_expected_up_to(delivery_id)
        self.settled_by_result = self._settle_by_result(wire_seq)
        if wire_seq in self._resent:
            if wire_seq in self._resent_handed:
                self.stats.resend_duplicates_dropped += 1
                self.last_resend_duplicate = delivery_id
                return False, seq
            self._resent_handed.add(wire_seq)
            seq = self._resent[wire_seq]  # also when this is the copy whose receipt was lost
        self._count_result(failed)
        return True, seq

    def _settle_by_result(self, wire_seq: int) -> bool:
        """A result whose event has no receipt yet: the event is durable (its result exists), so
        it is settled now and never resent. The receipt waits for the pod's whole produce batch,
        so a result can come first; before this, the event was resent on the next stream after
        a failed batch and its second result, with a new delivery id, reached the application
        (chaos seed 7459). Any later copy of it is dropped by its seq, as a resend's is."""
        seq = self._in_flight.pop(wire_seq, None)
        ev = self._events.get(wire_seq if seq is None else seq)
        if ev is None or ev.wire_seq != wire_seq or ev.retry_at is not None:
            return False
        del self._events[ev.seq]
        ev.in_flight = False
        self.stats.receipted += 1
        self._remember_resent(wire_seq, ev.seq)
        return True

    def _remember_resent(self, wire_seq: int, seq: int) -> None:
        """An event that may be accepted more than once: its results are told apart by seq."""
        self._resent[wire_seq] = seq
        if len(self._resent) > RESENT_MEMORY:
            oldest = next(iter(self._resent))
            del self._resent[oldest]
            self._resent_handed.discard(oldest)

    def is_resend_duplicate(self, delivery_id: int) -> bool:
        """Whether the result `on_result` just refused was a resend's second result (it has a
        new delivery id, so the ack must pass it once the application reaches it)."""
        return self.last_resend_duplicate == delivery_id

    def _count_result(self, failed: bool) -> None:
        self.stats.results += 1
        if failed:
            self.stats.errors += 1

    def _forget_expected_up_to(self, delivery_id: int) -> None:
        # Receipted ids below a result we just accepted will be dropped as redeliveries if they
        # ever come: the server broke the order promise. Count them rather than hide them.
        ids = self._expected_ids
        while ids and ids[0] <= delivery_id:
            did = heapq.heappop(ids)
            if self._expected.pop(did, None) is not None:
                self.stats.skipped += 1

    def on_gap(self, first: int, last: int) -> tuple[int, ...]:
        """GAP: results first..last are gone. Returns the seqs of this client's events among them."""
        self.stats.gaps += 1
        lost: list[int] = []
        ids = self._expected_ids
        while ids and ids[0] <= last:
            did = heapq.heappop(ids)
            seq = self._expected.pop(did, None)
            if seq is None:
                continue
            if did >= first:
                lost.append(seq)
            else:
                self.stats.skipped += 1
        self.highest_received = max(self.highest_received, last)
        return tuple(lost)

    # --- acks ----------------------------------------------------------------------------

    def consumed(self, delivery_id: int, now: float) -> bool:
        """The application took the result `delivery_id` (or passed a gap ending there).

        Returns True when the ack timer should re-evaluate: an ack just became pending, or the
        `ack_every` threshold was just reached.
        """
        if self.protocol == 1 or delivery_id <= self.ack_position:
            return False
        self.ack_position = delivery_id
        self._unacked += 1
        if self._first_unacked_at is None:
            self._first_unacked_at = now
            return True
        return self._unacked == self._ack_every

    def ack_deadline(self) -> float | None:
        """When the next ack is due (-inf: now), or None if there is nothing to ack."""
        if self.ack_position <= self.ack_sent:
            return None
        if self._unacked >= self._ack_every or self._first_unacked_at is None:
            return -math.inf
        return self._first_unacked_at + self._ack_interval

    def take_ack(self) -> int:
        """The ack value to send now; marks it sent."""
        self.ack_sent = self.ack_position
        self._unacked = 0
        self._first_unacked_at = None
        self.stats.acks_sent += 1
        return self.ack_sent
