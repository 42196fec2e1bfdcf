"""The Nimbus client: a trio library (`open_client`) and the sample CLI (`python -m nimbus.client`).

This module owns the client side of the wire protocol (protocols/nimbus.proto, docs/protocol.md):

- `ClientLedger`: every piece of client bookkeeping, with no I/O (after h11): seq allocation, events
  waiting for a receipt, what to resend after a reconnect, retries of events refused with
  UNAVAILABLE, the delivery-id watermark that drops redeliveries, the delivery id -> seq map, and
  the cumulative ack with its batching rule. Tests drive it directly.
- `NimbusClient` / `open_client`: the I/O around the ledger. One gRPC stream at a time, reconnected
  with jittered exponential backoff (optionally rotating through several pods), results handed to
  the application exactly once and in delivery-id order.
- `main`: the CLI, flag-compatible with the original Go client (`--client_id --start --end`).

Protocol 2 (the default) is what makes the delivery contract visible to the application: the
server sends RECEIPT/ERROR per event and a delivery id per result, the client acks cumulatively
and drops redeliveries. Protocol 1 is the original client's behaviour: no extra metadata, no
acks, results as they come.

Delivery guarantees, as seen by the application (protocol 2):
- Every event that `send()` accepted is retransmitted until it is receipted or refused for good
  (UNKNOWN_EVENT, INVALID_ARGUMENT, ...); UNAVAILABLE refusals are retried with backoff. On the
  wire this is at-least-once: if a stream dies after the server durably accepted an event but
  before its RECEIPT reached us, the resend is a second event and the server sends a second
  result for it (another delivery id). A resend keeps its seq and every result carries the seq of
  its event, so the library hands the application the first of them and drops the others
  (`stats.resend_duplicates_dropped`), acking them in order as if taken.
- Each result is handed over once, in strictly increasing delivery-id order; anything at or below
  the highest delivery id already received is a redelivery and is dropped (`stats.duplicates_dropped`).
- The ack covers what the application has *taken* from `results()`/`receive()`, not what is
  buffered inside the library: results buffered when the process dies are redelivered next time.

Wire messages: the stream is encoded and decoded with protobuf's upb classes (nimbus/messages.py),
~200x cheaper per message than betterproto's here (which dominated a load generator's CPU). The
public types stay betterproto's: `Result.error` is converted when a result carries one, and
`Result.log` (the trace) is decoded only when the application reads it.

Threading model: grpclib is asyncio, so the library runs inside trio-asyncio and every call must
happen under `async with trio_asyncio.open_loop():` (the CLI opens it itself). Crossing between
trio and asyncio costs ~50-70 us per awaited call, so the per-message paths never await across:
the asyncio reader hands responses to trio with `MemorySendChannel.send_nowait()` (awaiting only
when the channel is full), and trio hands requests to the asyncio writer through a plain deque plus
`asyncio.Event.set()`, both synchronous (same thread).

Backpressure: `send()` waits while `max_pending` events are unreceipted; results wait in a bounded
buffer of `result_buffer`; when that is full the stream stops reading, and gRPC flow control pushes
back on the server. Receipts travel on the same stream as results, so an application must read
results concurrently with sending, or `send()` eventually blocks for good.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import heapq
import math
import os
import random
import signal
import socket
import ssl as _ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TextIO, TypeAlias

import h2.exceptions
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from loguru import logger

from nimbus import grpcwire
from nimbus import messages as wire
from nimbus.channels import receive_batch
from nimbus.proto_gen.nimbus import (
    ErrorCode,
    EventError,
    LogEntry,
)

# On the wire: upb classes (see "Wire messages" above).
EventRequest: TypeAlias = wire.EventRequest
EventResponse: TypeAlias = wire.EventResponse

if TYPE_CHECKING:
    from grpclib.client import Stream as GrpcStream

__all__ = [
    "ClientClosed",
    "ClientLedger",
    "ClientStats",
    "Connected",
    "ConnectionFailed",
    "Disconnected",
    "Gap",
    "NimbusClient",
    "NimbusError",
    "Notice",
    "OutgoingEvent",
    "Receipted",
    "Refused",
    "Result",
    "StreamEnd",
    "StreamRefused",
    "Superseded",
    "backoff_delay",
    "check_target",
    "classify_stream_end",
    "main",
    "open_client",
    "parse_target",
]

METHOD: Final = "/nimbus.NimbusService/ProcessEvent"
DEFAULT_PORT: Final = 50051
PROTOCOL_KEY: Final = "nimbus-protocol"
RESENT_MEMORY: Final = 100_000  # resent events remembered for dropping their second results
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
_WRITE_BATCH_BYTES: Final = 16384  # queued requests written at once, at most
_READ_BATCH: Final = 32  # received responses taken from the stream at once, at most
_YIELD_EVERY: Final = 32  # results handed to the application between two full checkpoints

# ---------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------


class Result:
    """One result, as handed to the application (immutable).

    `delivery_id` is 0 under protocol 1. `error` is set when the server could not compute the
    result (e.g. OUT_OF_RANGE); `result` is then meaningless. `seq` is the value `send()` returned
    for the event this result answers, when this client saw its RECEIPT (None for results of
    events sent by an earlier process with the same client id, and under protocol 1). `log` is
    the result's trace, decoded (into betterproto's `LogEntry`) on first access.
    """

    __slots__ = (
        "delivery_id",
        "event_name",
        "number",
        "result",
        "error",
        "seq",
        "_log",
        "_log_wire",
    )

    delivery_id: int
    event_name: str
    number: int
    result: int
    error: EventError | None
    seq: int | None
    _log: LogEntry | None
    _log_wire: wire.LogEntry | None

    def __init__(
        self,
        delivery_id: int,
        event_name: str,
        number: int,
        result: int,
        error: EventError | None = None,
        log: LogEntry | None = None,
        seq: int | None = None,
        *,
        _log_wire: wire.LogEntry | None = None,
    ) -> None:
        init = object.__setattr__
        init(self, "delivery_id", delivery_id)
        init(self, "event_name", event_name)
        init(self, "number", number)
        init(self, "result", result)
        init(self, "error", error)
        init(self, "seq", seq)
        init(self, "_log", log)
        init(self, "_log_wire", _log_wire)

    @property
    def log(self) -> LogEntry | None:
        if self._log is None and self._log_wire is not None:
            object.__setattr__(self, "_log", LogEntry().parse(self._log_wire.SerializeToString()))
            object.__setattr__(self, "_log_wire", None)
        return self._log

    def trace(self) -> list[tuple[str, float]]:
        """The trace's steps as ("service/method", wall-clock seconds), read from the wire form
        without decoding `log` (betterproto's decode costs ~1 ms per result; this ~10 µs)."""
        if self._log_wire is not None:
            return [
                (
                    f"{st.service_name}/{st.method_name}",
                    st.timestamp.seconds + st.timestamp.nanos / 1e9,
                )
                for st in self._log_wire.steps
            ]
        if self._log is not None:
            return [
                (f"{st.service_name}/{st.method_name}", st.timestamp.timestamp())
                for st in self._log.steps
            ]
        return []

    @property
    def ok(self) -> bool:
        return self.error is None

    def _key(self) -> tuple[object, ...]:
        return (
            self.delivery_id,
            self.event_name,
            self.number,
            self.result,
            self.error,
            self.log,
            self.seq,
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Result)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.delivery_id, self.event_name, self.number, self.result, self.seq))

    def __repr__(self) -> str:
        return (
            f"Result(delivery_id={self.delivery_id!r}, event_name={self.event_name!r}, number={self.number!r},"
            f" result={self.result!r}, error={self.error!r}, log={self.log!r}, seq={self.seq!r})"
        )


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (all monotonic)."""

    sent: int = 0  # events accepted by send()
    receipted: int = 0  # RECEIPTs received (protocol 2)
    results: int = 0  # results put in the results buffer (each delivery id once)
    duplicates_dropped: int = 0  # redeliveries dropped (delivery id <= highest received)
    resend_duplicates_dropped: int = 0  # second results of a resent event (same seq), dropped
    reconnects: int = 0  # streams opened after the first one
    errors: int = 0  # ERROR responses plus results carrying an error
    refused: int = 0  # events refused for good (no result will come): a subset of errors
    retries: int = 0  # events refused with UNAVAILABLE and scheduled for a retry
    resent: int = 0  # events retransmitted on a new stream because their receipt never came
    gaps: int = 0  # GAP responses (results aged out on the server)
    skipped: int = 0  # receipted results overtaken by a higher delivery id (server broke order)
    acks_sent: int = 0
    unexpected: int = 0  # receipts/errors for unknown seqs, responses of unknown kind

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# Notices: what `on_event` receives. Called synchronously from the client's own tasks: keep the
# callback short and non-blocking; an exception raised by it tears the client down.


@dataclass(frozen=True, slots=True)
class Connected:
    target: str
    reconnect: bool  # False for the client's first stream


@dataclass(frozen=True, slots=True)
class Disconnected:
    target: str
    reason: str
    will_reconnect: bool


@dataclass(frozen=True, slots=True)
class Receipted:
    seq: int
    delivery_id: int
    event_name: str
    number: int


@dataclass(frozen=True, slots=True)
class Refused:
    seq: int
    event_name: str
    number: int
    code: ErrorCode
    message: str
    will_retry: bool  # UNAVAILABLE: the library resends it; otherwise no result will come


@dataclass(frozen=True, slots=True)
class _Skip:
    """A result not for the application (a resent event's second result), consumed in order."""

    delivery_id: int


@dataclass(frozen=True, slots=True)
class Gap:
    """Results `first`..`last` aged out on the server; `lost_seqs` are this client's events among them."""

    first: int
    last: int
    lost_seqs: tuple[int, ...] = ()


Notice = Connected | Disconnected | Receipted | Refused | Gap


class NimbusError(Exception):
    """Base of the errors this module raises."""


class ClientClosed(NimbusError):
    """The client was closed (`aclose()`), so it cannot send any more."""


class ConnectionFailed(NimbusError):
    """No stream could be opened (or one was lost with `reconnect=False`)."""

    def __init__(self, errors: dict[str, str], *, lost: bool = False) -> None:
        self.errors = dict(errors)
        if lost:
            what = "lost the stream to Nimbus at"
        else:
            what = "cannot reach Nimbus at"
        if len(errors) == 1:
            ((target, why),) = errors.items()
            text = f"{what} {target}: {why}"
        else:
            text = f"{what} " + ", ".join(f"{t} ({why})" for t, why in errors.items())
        super().__init__(text)


class StreamRefused(NimbusError):
    """The server ended the stream with a status that reconnecting cannot fix."""

    def __init__(self, target: str, status: Status, message: str | None) -> None:
        self.target = target
        self.status = status
        self.message = message or ""
        super().__init__(
            f"Nimbus at {target} refused the stream: {status.name}"
            + (f": {self.message}" if self.message else "")
        )


class Superseded(StreamRefused):
    """Another stream with the same client_id took over; this client must not reconnect."""

    def __init__(self, target: str, status: Status, message: str | None) -> None:
        super().__init__(target, status, message)
        self.args = (
            f"another stream with this client_id took over at Nimbus {target}"
            f" ({status.name}: {self.message or 'superseded'})",
        )


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def parse_target(target: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = target.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {target!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _metadata_value_ok(value: str) -> bool:
    """gRPC metadata values are printable ASCII (0x20-0x7E); grpclib refuses anything else."""
    return bool(value) and value.isascii() and value.isprintable()


def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """Delay before reconnect attempt `attempt` (0-based): exponential, capped, 'equal jitter'.

    Half the delay is fixed so a flapping server is not hammered, half is random (`rand` in
    [0, 1)) so a fleet of clients cut at the same instant does not come back in lockstep.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling / 2 + ceiling / 2 * rand


class StreamEnd(enum.Enum):
    RECONNECT = "reconnect"
    SUPERSEDED = "superseded"
    REFUSED = "refused"


# Statuses that say "this request is wrong", not "this server is unwell": retrying the same stream
# elsewhere cannot succeed, so the client stops and reports.
_FATAL_STATUSES: Final = frozenset(
    {
        Status.INVALID_ARGUMENT,
        Status.UNAUTHENTICATED,
        Status.PERMISSION_DENIED,
        Status.UNIMPLEMENTED,
        Status.NOT_FOUND,
        Status.FAILED_PRECONDITION,
    }
)


def classify_stream_end(status: Status | None, message: str | None) -> StreamEnd:
    """What to do when a stream ended with gRPC `status` (None: transport failure or clean end)."""
    if status is None or status is Status.OK:
        return StreamEnd.RECONNECT
    if status is Status.ABORTED and "supersed" in (message or "").lower():
        return StreamEnd.SUPERSEDED
    if status in _FATAL_STATUSES:
        return StreamEnd.REFUSED
    return StreamEnd.RECONNECT


def describe_error(exc: BaseException | None) -> str:
    """A short human reason for a failed or ended stream ('connection refused', ...)."""
    if exc is None:
        return "the server ended the stream"
    if isinstance(exc, GRPCError):
        return f"{exc.status.name}" + (f": {exc.message}" if exc.message else "")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, StreamTerminatedError):
        return f"stream terminated ({exc})"
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# The ledger: all client bookkeeping, no I/O
# ---------------------------------------------------------------------------------------------


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
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_writable(self) -> bool:
        return self._writable

    @property
    def pending(self) -> int:
        """Events accepted by `add()` and not settled (receipted, refused for good, or written in protocol 1)."""
        return len(self._events)

    def pending_events(self) -> list[OutgoingEvent]:
        return list(self._events.values())

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


# ---------------------------------------------------------------------------------------------
# I/O: one stream at a time, around the ledger
# ---------------------------------------------------------------------------------------------


class _Opened:
    """Marker the asyncio side sends first on a stream, once the request headers are out."""


_OPENED: Final = _Opened()
_Inbound: TypeAlias = list[EventResponse] | _Opened  # a stream's responses, as read together
_Outbound: TypeAlias = tuple[EventRequest, OutgoingEvent | None]

# What ends a stream without being a bug of ours: the client reconnects (or reports) on these.
_STREAM_ERRORS: Final = (
    GRPCError,
    StreamTerminatedError,
    ProtocolError,
    h2.exceptions.H2Error,
    OSError,  # includes ConnectionError, socket.gaierror, TimeoutError
)


class _Stream:
    """One gRPC stream, shared by its trio side (the client) and its asyncio side (reader/writer).

    The trio side fills `outbox` and calls `wake.set()`; the asyncio writer drains it. Both are
    synchronous calls on the same thread, so no message crosses between the loops with an await.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.outbox: deque[_Outbound] = deque()
        self.wake = asyncio.Event()  # binds to the running asyncio loop on first wait()
        # The ack waiting in the outbox, if any: a newer ack updates it in place.
        self.queued_ack: EventRequest | None = None
        self.open = False  # the trio side has seen the stream open (ledger connected to it)
        self.opened_at: float | None = None
        self.received = 0
        self.half_close = False  # aclose(): write what is queued, then END_STREAM
        self.ended = False  # our half is closed
        self.cut_by_client = False  # disconnect()/switch(), not a failure
        self.cancel_scope = trio.CancelScope()
        self.gone = trio.Event()  # the gRPC call is over (responses may still be draining)
        self.writer_done = trio.Event()

    def push(self, request: EventRequest, event: OutgoingEvent | None) -> None:
        self.outbox.append((request, event))
        self.wake.set()


class _Results:
    """`async for result in client.results()`: ends when the client is closed, raises if it failed."""

    def __init__(self, client: NimbusClient) -> None:
        self._client = client

    def __aiter__(self) -> _Results:
        return self

    async def __anext__(self) -> Result:
        try:
            return await self._client.receive()
        except ClientClosed:
            raise StopAsyncIteration from None


class NimbusClient:
    """A Nimbus client. Create it with `open_client()`, which runs its tasks and closes it."""

    def __init__(
        self,
        targets: Sequence[str],
        client_id: str,
        *,
        protocol: int = 2,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.05, 2.0),
        rotate: bool = True,
        on_event: Callable[[Notice], None] | None = None,
        connect_timeout: float | None = 10.0,
        max_pending: int = 1000,
        result_buffer: int = 1000,
        ack_every: int = 100,
        ack_interval: float = 0.005,
        dial_timeout: float = 5.0,
        keepalive: float | None = 30.0,
        close_timeout: float = 2.0,
        close_linger: float = 0.05,
        token: str | None = None,
        ssl: _ssl.SSLContext | bool | None = None,
    ) -> None:
        if isinstance(targets, str):
            targets = [targets]
        if not targets:
            raise ValueError("at least one target (host:port) is required")
        for t in targets:
            parse_target(t)
        if not client_id:
            raise ValueError("client_id must not be empty")
        if not _metadata_value_ok(client_id):
            raise ValueError(
                f"client_id must be printable ASCII (gRPC metadata), got {client_id!r}"
            )
        if token is not None and not _metadata_value_ok(token):
            raise ValueError("token must be printable ASCII (gRPC metadata)")
        if max_pending < 1 or result_buffer < 1:
            raise ValueError("max_pending and result_buffer must be >= 1")
        self.client_id = client_id
        self.protocol = protocol
        self._targets = list(dict.fromkeys(targets))
        self._target_index = 0
        self._reconnect = reconnect
        self._backoff = backoff
        self._rotate = rotate
        self._on_event = on_event
        self._connect_timeout = connect_timeout
        self._max_pending = max_pending
        self._dial_timeout = dial_timeout
        self._grpc_config: Configuration | None = None
        if keepalive is not None:
            # A link that died silently (NAT timeout, a phone losing signal) sends no FIN or RST:
            # only an unanswered HTTP/2 PING reveals it. grpclib's defaults never ping from a
            # client and allow one ping per 300 s without data, which a standby client never sends.
            self._grpc_config = Configuration(
                _keepalive_time=keepalive,
                _keepalive_timeout=min(20.0, keepalive),
                _http2_min_sent_ping_interval_without_data=keepalive,
                _http2_max_pings_without_data=0,
            )
        self._close_timeout = close_timeout
        self._close_linger = close_linger
        self._ledger = ClientLedger(
            protocol, ack_every=ack_every, ack_interval=ack_interval, retry_backoff=backoff
        )
        self.stats = self._ledger.stats
        self._metadata = [("client_id", client_id)]
        if protocol == 2:
            self._metadata.append((PROTOCOL_KEY, "2"))
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        self._ssl = ssl
        self._received_unyielded = 0  # results taken since the last full checkpoint (see receive)
        # Results (and gaps, so they reach the application in order) waiting for the application.
        self._results_send, self._results_recv = trio.open_memory_channel[Result | Gap | _Skip](
            result_buffer
        )
        self._stream_buffer = (
            16  # reads (of up to _READ_BATCH responses) between the asyncio reader and trio
        )
        self._stream: _Stream | None = None
        self._ever_opened = False
        self._first_open = trio.Event()
        self._state_event = trio.Event()
        self._ack_wake = trio.Event()
        self._retry_wake = trio.Event()
        self._kick = trio.Event()  # cuts a backoff sleep short (switch())
        self._capacity_event = trio.Event()
        self._capacity_waiters = 0
        # The client's own tasks ignore cancellation from outside (a timeout or Ctrl-C around the
        # `async with`): otherwise the stream would be cut while aclose() is still flushing the
        # final ack. aclose(), which open_client() always runs, is what cancels this scope.
        self._scope = trio.CancelScope(shield=True)
        self._closing = False
        self._close_reason: NimbusError | None = None
        self._finished = trio.Event()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected" if self.connected else "connecting"
        return (
            f"<NimbusClient {self.client_id!r} protocol={self.protocol} {state} target={self.target}"
            f" pending={self._ledger.pending} highest={self._ledger.highest_received} stats={self.stats}>"
        )

    # --- public API ----------------------------------------------------------------------

    @property
    def target(self) -> str:
        """The target of the current stream, or of the next attempt."""
        return self._targets[self._target_index]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self._targets)

    @property
    def connected(self) -> bool:
        stream = self._stream
        return stream is not None and stream.open and not stream.gone.is_set()

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> NimbusError | None:
        return self._close_reason

    @property
    def pending(self) -> int:
        """Events sent and not settled yet (no receipt, no final refusal)."""
        return self._ledger.pending

    @property
    def highest_received(self) -> int:
        return self._ledger.highest_received

    async def send(self, event_name: str, number: int) -> int:
        """Queue an event; returns its seq. Waits while `max_pending` events are unreceipted.

        The event is (re)transmitted until the server receipts it or refuses it for good; see
        the module docstring for the at-least-once caveat.
        """
        if not event_name:
            raise ValueError("event_name must not be empty (an empty name is an ack)")
        if not INT32_MIN <= number <= INT32_MAX:
            raise ValueError(f"number {number} does not fit int32")
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._ledger.pending >= self._max_pending:
            self._raise_if_closed()
            self._capacity_waiters += 1
            try:
                await self._capacity_event.wait()
            finally:
                self._capacity_waiters -= 1
        self._raise_if_closed()
        ev = self._ledger.add(event_name, number)
        if ev.in_flight:
            self._write_event(ev)
        # Let the writer run: a sender that never yields would only fill the outbox.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return ev.seq

    def results(self) -> AsyncIterator[Result]:
        """Iterate over results (exactly once each, delivery-id order). Ends when the client is
        closed; raises the reason if the client failed (e.g. `Superseded`, `StreamRefused`)."""
        return _Results(self)

    async def receive(self) -> Result:
        """The next result. Raises `ClientClosed` once closed and drained, or the failure reason."""
        while True:
            # A result already queued is taken without a trio scheduling round (measured here:
            # ~9.5 µs per item through `receive()`, ~1.2 this way): still a cancellation point
            # every time, and a full checkpoint every _YIELD_EVERY results so the application's
            # loop cannot starve the other tasks. Both come before an item is taken, so a
            # cancellation never loses one.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._received_unyielded += 1
            if self._received_unyielded >= _YIELD_EVERY:
                self._received_unyielded = 0
                await trio.lowlevel.checkpoint()
            try:
                try:
                    item = self._results_recv.receive_nowait()
                except trio.WouldBlock:
                    self._received_unyielded = 0
                    item = await self._results_recv.receive()
            except trio.EndOfChannel:
                reason = self._close_reason
                if reason is None or isinstance(reason, ClientClosed):
                    raise ClientClosed("the client is closed") from None
                raise reason from None
            if isinstance(item, Gap):
                self._consumed(item.last)
                self._notify(item)
                continue
            if isinstance(item, _Skip):
                self._consumed(item.delivery_id)
                continue
            if item.delivery_id:
                self._consumed(item.delivery_id)
            return item

    async def wait_settled(self) -> None:
        """Wait until every event sent so far is receipted (durable) or refused for good."""
        while self._ledger.pending:
            self._raise_if_closed()
            self._capacity_waiters += 1
            try:
                await self._capacity_event.wait()
            finally:
                self._capacity_waiters -= 1

    async def wait_connected(self) -> None:
        """Wait until a stream is open (raises if the client is closed)."""
        while not self.connected:
            self._raise_if_closed()
            await self._state_event.wait()

    async def disconnect(self) -> None:
        """Cut the current stream (chaos/tests); the client reconnects at once, to the same target."""
        stream = self._stream
        if stream is None:
            return
        stream.cut_by_client = True
        stream.cancel_scope.cancel()
        await stream.gone.wait()

    async def switch(self, target: str) -> None:
        """Reconnect to `target` (added to the targets if new): cut the current stream, open one there."""
        parse_target(target)
        if target not in self._targets:
            self._targets.append(target)
        self._target_index = self._targets.index(target)
        self._kick.set()
        await self.disconnect()

    async def aclose(self) -> None:
        """Flush the ack, half-close, end the stream, stop every task. Idempotent."""
        if self._closing:
            with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout):
                await self._finished.wait()
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._close_timeout):
                await self._graceful_end()
            if self._close_reason is None:
                self._close_reason = ClientClosed("the client was closed")
            self._scope.cancel()
            self._changed()
            with trio.move_on_after(self._close_timeout):
                await self._finished.wait()

    # --- internals: state --------------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._close_reason is not None:
            if isinstance(self._close_reason, ClientClosed):
                raise ClientClosed("the client is closed")
            raise self._close_reason
        if self._closing:
            raise ClientClosed("the client is closing")

    def _changed(self) -> None:
        # Connection state changed: wake everything that waits on it.
        self._state_event.set()
        self._state_event = trio.Event()
        self._ack_wake.set()
        self._retry_wake.set()
        self._capacity_event.set()
        self._capacity_event = trio.Event()

    def _fail(self, reason: NimbusError) -> None:
        if self._close_reason is None:
            self._close_reason = reason
            logger.warning("nimbus client {}: {}", self.client_id, reason)
        self._first_open.set()
        self._changed()

    def _notify(self, notice: Notice) -> None:
        if self._on_event is not None:
            self._on_event(notice)

    def _capacity_freed(self) -> None:
        if self._capacity_waiters:
            self._capacity_event.set()
            self._capacity_event = trio.Event()

    def _consumed(self, delivery_id: int) -> None:
        if self._ledger.consumed(delivery_id, trio.current_time()):
            self._ack_wake.set()

    def _request(self, ev: OutgoingEvent) -> EventRequest:
        if self.protocol == 1:
            return EventRequest(event_name=ev.event_name, number=ev.number)
        return EventRequest(event_name=ev.event_name, number=ev.number, seq=ev.wire_seq)

    def _write_event(self, ev: OutgoingEvent) -> None:
        stream = self._stream
        assert stream is not None and stream.open, (
            "the ledger is writable only while a stream is open"
        )
        stream.push(self._request(ev), ev)

    def _enqueue_ack(self, value: int) -> None:
        stream = self._stream
        assert stream is not None and stream.open
        if stream.queued_ack is not None:
            # Acks are cumulative: one waiting in the outbox can simply be raised.
            stream.queued_ack.ack = value
        else:
            stream.queued_ack = EventRequest(ack=value)
            stream.push(stream.queued_ack, None)

    # --- internals: tasks --------------------------------------------------------------------

    async def _run(self) -> None:
        """Every task of the client, under one cancel scope that aclose() cancels."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._ack_loop)
                    nursery.start_soon(self._retry_loop)
                    await self._supervise()
                    nursery.cancel_scope.cancel()
        finally:
            self._results_send.close()
            if self._close_reason is None:
                self._close_reason = ClientClosed("the client was closed")
            self._first_open.set()
            self._changed()
            self._finished.set()

    async def _wait_first_stream(self) -> None:
        await self._first_open.wait()
        if not self._ever_opened and self._close_reason is not None:
            raise self._close_reason

    def _connect_deadline_passed(self, attempts: int, started: float) -> bool:
        if self._connect_timeout is None:
            return False
        if self._connect_timeout <= 0:
            return attempts >= len(self._targets)
        return trio.current_time() - started >= self._connect_timeout

    async def _supervise(self) -> None:
        """Open streams one after the other until closed or refused; back off between failures."""
        failures = 0
        attempts = 0
        started = trio.current_time()
        errors: dict[str, str] = {}
        while True:
            if self._kick.is_set():
                # A switch() made while connected is served by this very attempt.
                self._kick = trio.Event()
            stream = _Stream(self.target)
            error = await self._run_stream(stream)
            if self._closing:
                return
            was_open = stream.opened_at is not None
            if stream.cut_by_client:
                verdict, reason = StreamEnd.RECONNECT, "cut by the client"
            else:
                status = error.status if isinstance(error, GRPCError) else None
                message = error.message if isinstance(error, GRPCError) else None
                verdict, reason = classify_stream_end(status, message), describe_error(error)
                if verdict is not StreamEnd.RECONNECT:
                    assert status is not None
                    cls = Superseded if verdict is StreamEnd.SUPERSEDED else StreamRefused
                    self._notify(Disconnected(stream.target, reason, will_reconnect=False))
                    self._fail(cls(stream.target, status, message))
                    return
            if not self._ever_opened:
                attempts += 1
                errors[stream.target] = reason
                logger.debug(
                    "nimbus client {}: cannot open a stream to {}: {}",
                    self.client_id,
                    stream.target,
                    reason,
                )
                if self._connect_deadline_passed(attempts, started):
                    self._fail(ConnectionFailed(errors))
                    return
            elif not self._reconnect and not stream.cut_by_client:
                self._notify(Disconnected(stream.target, reason, will_reconnect=False))
                self._fail(ConnectionFailed({stream.target: reason}, lost=True))
                return
            if was_open:
                logger.debug(
                    "nimbus client {}: stream to {} ended: {}",
                    self.client_id,
                    stream.target,
                    reason,
                )
                self._notify(Disconnected(stream.target, reason, will_reconnect=True))
            if stream.cut_by_client:
                failures = 0
                continue  # disconnect()/switch(): straight back, to the (possibly new) target
            if was_open and stream.received:
                failures = 0  # that stream worked; start the backoff over
            if (self._rotate or not self._ever_opened) and len(self._targets) > 1:
                self._target_index = (self._target_index + 1) % len(self._targets)
            base, cap = self._backoff
            delay = backoff_delay(failures, base, cap, random.random())
            failures += 1
            with trio.move_on_after(delay):
                await self._kick.wait()
            if self._kick.is_set():
                self._kick = trio.Event()

    async def _run_stream(self, stream: _Stream) -> BaseException | None:
        """Run one stream to its end; apply every response it delivered before returning.

        Returns the error that ended it (None: the server ended it with OK, or we cut it). The
        ledger stays connected until the last response is applied, so a receipt that arrived
        just before the cut still settles its event instead of causing a resend.
        """
        send_channel, receive_channel = trio.open_memory_channel[_Inbound](self._stream_buffer)
        error: BaseException | None = None

        async def pump() -> None:
            nonlocal error
            try:
                with stream.cancel_scope:
                    await trio_asyncio.aio_as_trio(self._aio_stream)(stream, send_channel)
            except _STREAM_ERRORS as exc:
                error = exc
            finally:
                stream.gone.set()
                if stream.open:
                    self._ledger.on_stream_lost()
                send_channel.close()

        self._stream = stream
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                async with receive_channel:
                    while True:
                        # Everything the reader has handed over, without a trio round per item.
                        try:
                            items = await receive_batch(receive_channel)
                        except trio.EndOfChannel:
                            break
                        for item in items:
                            if isinstance(item, _Opened):
                                self._on_opened(stream)
                                continue
                            for resp in item:
                                await self._apply(stream, resp)
        finally:
            self._stream = None
            if stream.open:
                stream.open = False
                self._ledger.on_disconnected()
                self._changed()
        return error

    def _on_opened(self, stream: _Stream) -> None:
        if stream.gone.is_set():
            return  # died right after opening: treat it as a failed attempt, transmit nothing
        stream.open = True
        stream.opened_at = trio.current_time()
        first = not self._ever_opened
        self._ever_opened = True
        if not first:
            self.stats.reconnects += 1
        ack, events = self._ledger.on_connected()
        if ack is not None:
            self._enqueue_ack(ack)  # first on the wire: it tells the server what not to replay
        for ev in events:
            stream.push(self._request(ev), ev)
        self._first_open.set()
        self._changed()
        logger.debug(
            "nimbus client {}: stream open to {} (resending {})",
            self.client_id,
            stream.target,
            len(events),
        )
        self._notify(Connected(stream.target, reconnect=not first))

    async def _apply(self, stream: _Stream, resp: EventResponse) -> None:
        """Apply one response of `stream` to the ledger; hand results to the application."""
        stream.received += 1
        kind = resp.kind
        if self.protocol == 1 or kind == wire.RESULT:
            # Protocol 1 has no kinds: everything is a result. Our server still sets `error` on
            # one it could not compute (the original's client ignores the field); keep it.
            failed = resp.HasField("error")
            delivery_id = resp.delivery_id if self.protocol == 2 else 0
            deliver, seq = self._ledger.on_result(delivery_id, failed=failed, wire_seq=resp.seq)
            if self._ledger.settled_by_result:
                self._capacity_freed()
            if not deliver and self._ledger.is_resend_duplicate(resp.delivery_id):
                # Not for the application, but its ack must pass it in order.
                await self._hand_result(_Skip(resp.delivery_id))
            elif deliver:
                await self._hand_result(
                    Result(
                        delivery_id,
                        resp.event_name,
                        resp.number,
                        resp.result,
                        _public_error(resp.error) if failed else None,
                        None,
                        seq,
                        _log_wire=resp.log if resp.HasField("log") else None,
                    )
                )
        elif kind == wire.RECEIPT:
            ev = self._ledger.on_receipt(resp.seq, resp.delivery_id)
            if ev is not None:
                self._capacity_freed()
                if self._on_event is not None:
                    self._notify(Receipted(ev.seq, resp.delivery_id, ev.event_name, ev.number))
        elif kind == wire.ERROR:
            code = _error_code(resp.error.code)
            outcome = self._ledger.on_refused(resp.seq, code, trio.current_time())
            if outcome is not None:
                ev, retry = outcome
                if retry:
                    self._retry_wake.set()
                else:
                    self._capacity_freed()
                if self._on_event is not None:
                    self._notify(
                        Refused(ev.seq, ev.event_name, ev.number, code, resp.error.message, retry)
                    )
        elif kind == wire.GAP:
            lost = self._ledger.on_gap(resp.gap_from, resp.gap_to)
            await self._hand_result(Gap(resp.gap_from, resp.gap_to, lost))
        else:
            self.stats.unexpected += 1

    async def _hand_result(self, item: Result | Gap | _Skip) -> None:
        """To the application's queue; waits (backpressure) only when it is full."""
        try:
            self._results_send.send_nowait(item)
        except trio.WouldBlock:
            await self._results_send.send(item)

    async def _ack_loop(self) -> None:
        """Send the cumulative ack when due: `ack_every` results taken, or `ack_interval` after the first."""
        if self.protocol == 1:
            return
        while True:
            deadline = self._ledger.ack_deadline()
            if deadline is None or not self._ledger.is_writable:
                # Nothing to ack, or no stream: on_connected() repeats the ack on the next one.
                await self._ack_wake.wait()
                self._ack_wake = trio.Event()
                continue
            if trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await self._ack_wake.wait()
                if self._ack_wake.is_set():
                    self._ack_wake = trio.Event()
                continue
            self._enqueue_ack(self._ledger.take_ack())

    async def _retry_loop(self) -> None:
        """Retransmit events refused with UNAVAILABLE once their backoff has passed."""
        while True:
            at = self._ledger.next_retry_at()
            if at is None or not self._ledger.is_writable:
                await self._retry_wake.wait()
                self._retry_wake = trio.Event()
                continue
            if trio.current_time() < at:
                with trio.move_on_at(at):
                    await self._retry_wake.wait()
                if self._retry_wake.is_set():
                    self._retry_wake = trio.Event()
                continue
            for ev in self._ledger.due_retries(trio.current_time()):
                self._write_event(ev)

    async def _graceful_end(self) -> None:
        """Flush the ack and half-close, so the server knows what this client has."""
        stream = self._stream
        if stream is None or not stream.open or stream.gone.is_set():
            return
        if self._ledger.ack_position > self._ledger.ack_sent:
            self._enqueue_ack(self._ledger.take_ack())
        stream.half_close = True
        stream.wake.set()
        await stream.writer_done.wait()
        # grpclib drops data it has not read yet when its stream is reset, on either side. The
        # server ends a half-closed stream (OK) once it has read everything up to the half-close
        # and written what it owed: wait for that, so the final ack is taken before anything
        # resets the call (a fixed pause lost it on a loaded server, and its results were then
        # diverted to the backlog and replayed). aclose() bounds the wait (close_timeout).
        await stream.gone.wait()
        await trio.sleep(self._close_linger)

    # --- internals: the asyncio side (runs inside trio-asyncio) ----------------------------

    async def _aio_stream(
        self, stream: _Stream, responses: trio.MemorySendChannel[_Inbound]
    ) -> None:
        host, port = parse_target(stream.target)
        channel = Channel(host, port, config=self._grpc_config, ssl=self._ssl)
        try:
            call = channel.request(
                METHOD,
                Cardinality.STREAM_STREAM,
                EventRequest,
                EventResponse,
                metadata=self._metadata,
            )
            async with call:
                async with asyncio.timeout(self._dial_timeout):
                    try:
                        await call.send_request()
                    except AttributeError as exc:
                        # grpclib race (its issue #110): the connection died between connecting
                        # and opening the stream. A failed attempt, not a bug of ours.
                        raise StreamTerminatedError(
                            f"connection lost while opening: {exc}"
                        ) from exc
                    if self.protocol == 2:
                        # A "hello" (an empty message): the server ends a stream that sends no
                        # first message within NIMBUS_FIRST_MESSAGE_SEC, and a standby client
                        # may have nothing else to send for a long time.
                        await call.send_message(EventRequest())
                await _hand_over(responses, _OPENED)
                reader = asyncio.ensure_future(self._aio_reader(call, responses))
                writer = asyncio.ensure_future(self._aio_writer(call, stream))
                try:
                    pending: set[asyncio.Future[None]] = {reader, writer}
                    while reader in pending:
                        done, pending = await asyncio.wait(
                            pending, return_when=asyncio.FIRST_COMPLETED
                        )
                        if writer in done:
                            writer.result()  # raises if the writer failed; else we half-closed
                    reader.result()
                finally:
                    reader.cancel()
                    writer.cancel()
                    await asyncio.gather(reader, writer, return_exceptions=True)
                # The server ended its side. Its status is in the trailers, which grpclib only
                # hands over once our side is ended too.
                try:
                    if not stream.ended:
                        await call.end()
                        stream.ended = True
                except (h2.exceptions.H2Error, StreamTerminatedError, ProtocolError) as exc:
                    # Already reset by the server: grpclib turns this into the trailers' status.
                    raise StreamTerminatedError(f"stream closed by the server ({exc})") from exc
                await call.recv_trailing_metadata()
        finally:
            channel.close()

    @staticmethod
    async def _aio_reader(
        call: GrpcStream[EventRequest, EventResponse], responses: trio.MemorySendChannel[_Inbound]
    ) -> None:
        while True:
            # Every response already received, handed over at once (see nimbus.grpcwire).
            messages = await grpcwire.client_recv_many(call, _READ_BATCH)
            if not messages:
                return
            await _hand_over(responses, messages)

    async def _aio_writer(
        self, call: GrpcStream[EventRequest, EventResponse], stream: _Stream
    ) -> None:
        outbox = stream.outbox
        forget_written = self.protocol == 1
        try:
            while True:
                while outbox:
                    # Everything queued goes out in one HTTP/2 write (nimbus.grpcwire).
                    payloads: list[bytes] = []
                    events: list[OutgoingEvent] = []
                    size = 0
                    while outbox and size < _WRITE_BATCH_BYTES:
                        request, event = outbox.popleft()
                        if request is stream.queued_ack:
                            stream.queued_ack = (
                                None  # from now on a newer ack needs its own message
                            )
                        payload = request.SerializeToString()
                        payloads.append(payload)
                        size += grpcwire.framed_size(len(payload))
                        if event is not None:
                            events.append(event)
                    await grpcwire.client_send(call, grpcwire.frame(payloads), len(payloads))
                    if forget_written:
                        for event in events:
                            if self._ledger.on_written(event):
                                self._capacity_freed()
                if stream.half_close:
                    await call.end()
                    stream.ended = True
                    return
                stream.wake.clear()
                await stream.wake.wait()
        finally:
            stream.writer_done.set()


def _error_code(code: int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code  # a code newer than this library: passed through as the number


def _public_error(error: wire.EventError) -> EventError:
    return EventError(code=_error_code(error.code), message=error.message)


async def _hand_over(channel: trio.MemorySendChannel[_Inbound], item: _Inbound) -> None:
    """asyncio -> trio without an awaited crossing unless the trio side is behind."""
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        await trio_asyncio.trio_as_aio(channel.send)(item)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


@contextlib.asynccontextmanager
async def open_client(
    targets: Sequence[str],
    client_id: str,
    *,
    protocol: int = 2,
    reconnect: bool = True,
    backoff: tuple[float, float] = (0.05, 2.0),
    rotate: bool = True,
    on_event: Callable[[Notice], None] | None = None,
    connect_timeout: float | None = 10.0,
    max_pending: int = 1000,
    result_buffer: int = 1000,
    ack_every: int = 100,
    ack_interval: float = 0.005,
    dial_timeout: float = 5.0,
    keepalive: float | None = 30.0,
    close_timeout: float = 2.0,
    close_linger: float = 0.05,
    token: str | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
) -> AsyncIterator[NimbusClient]:
    """Connect to Nimbus and yield a `NimbusClient`; close it (flushing the ack) on exit.

    Must run inside `async with trio_asyncio.open_loop():` (grpclib is asyncio).

    - targets: "host:port" of one or more pods. The first stream goes to targets[0]; after a
      failure the client moves to the next target (`rotate=False`: stays on the current one).
    - Returns once the first stream is open. If no stream can be opened within
      `connect_timeout` seconds (0: one attempt per target; None: keep trying), raises
      `ConnectionFailed`. A server that accepts the connection and then refuses the stream
      (INVALID_ARGUMENT, PERMISSION_DENIED, ...) surfaces as `StreamRefused` from `send()`,
      `receive()` and `results()`; a newer stream with the same client_id as `Superseded`.
    - reconnect: after an established stream is lost, open another (backoff: (first, max)
      seconds, exponential, jittered). With False, the client fails with `ConnectionFailed`.
    - on_event: called synchronously with `Connected`, `Disconnected`, `Receipted`, `Refused`
      and `Gap` notices (a `Gap` when the application reaches it in the results).
    - max_pending: unreceipted events before `send()` waits; result_buffer: results waiting
      for the application before the stream stops reading.
    - ack_every / ack_interval: an ack goes out after that many results, or that long after
      the first unacked one, whichever comes first.
    - dial_timeout: per connection attempt. keepalive: ping the server when the connection has
      been quiet this many seconds; no answer within min(20, keepalive) s ends the stream (and
      the client reconnects). None: no pings, a silently dead link goes unnoticed.
    - close_timeout / close_linger: bound aclose(); wait after the final ack before ending.
    - token: a JWT sent as `authorization: Bearer <token>` (servers with NIMBUS_AUTH=jwt).
    - ssl: True (system CAs) or an `ssl.SSLContext` for a server with TLS; None: plaintext.
    """
    if trio_asyncio.current_loop.get() is None:
        raise RuntimeError(
            "open_client() must run inside `async with trio_asyncio.open_loop():` (grpclib runs on asyncio)"
        )
    client = NimbusClient(
        targets,
        client_id,
        protocol=protocol,
        reconnect=reconnect,
        backoff=backoff,
        rotate=rotate,
        on_event=on_event,
        connect_timeout=connect_timeout,
        max_pending=max_pending,
        result_buffer=result_buffer,
        ack_every=ack_every,
        ack_interval=ack_interval,
        dial_timeout=dial_timeout,
        keepalive=keepalive,
        close_timeout=close_timeout,
        close_linger=close_linger,
        token=token,
        ssl=ssl,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                await client._wait_first_stream()
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # A nursery wraps even a lone exception; callers want `except ConnectionFailed:` to work.
        single = _single(group)
        if single is None:
            raise
        raise single from None


_H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_SETTINGS: Final = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS frame
_H2_GOAWAY: Final = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + bytes(8)  # NO_ERROR
_H2_FRAME_SETTINGS: Final = 0x04


async def check_target(
    target: str, *, ssl: _ssl.SSLContext | bool | None = None, timeout: float = 5.0
) -> str | None:
    """Whether `target` is a gRPC server at all, on a connection of its own: every gRPC server
    answers the HTTP/2 preface with a SETTINGS frame at once, while a stream to a web server (or
    anything else) only fails later, and the client would take that for a flaky link and retry.

    Returns None when the target speaks HTTP/2, else why it is no gRPC server, in words for a
    person (a TLS handshake that failed included). Raises `ConnectionFailed`, with the words
    opening a stream would use, when nothing answers at all. Needs no asyncio loop."""
    host, port = parse_target(target)
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ConnectionFailed({target: "timed out"}) from None
    except OSError as e:
        # trio tries every address and raises one OSError, with each attempt's error as cause
        cause = e.__cause__
        if isinstance(cause, BaseExceptionGroup):
            cause = _single(cause) or cause
        why = describe_error(cause if isinstance(cause, OSError) else e)
        raise ConnectionFailed({target: why}) from None
    stream: trio.abc.Stream = tcp
    try:
        if ssl:
            ctx = ssl if isinstance(ssl, _ssl.SSLContext) else _ssl.create_default_context()
            ctx.set_alpn_protocols(["h2"])
            tls = trio.SSLStream(tcp, ctx, server_hostname=host)
            try:
                with trio.fail_after(timeout):
                    await tls.do_handshake()
            except trio.TooSlowError:
                return f"{target}: no TLS handshake within {timeout:g}s; is it a TLS server?"
            except trio.BrokenResourceError as e:
                reason = getattr(e.__cause__, "reason", None) or e.__cause__ or e
                return (
                    f"TLS handshake with {target} failed ({reason}): is it a TLS server, and does "
                    "the --tls CA file sign its certificate?"
                )
            stream = tls
            if tls.selected_alpn_protocol() != "h2":
                return (
                    f"{target} does not speak gRPC/HTTP2: it did not agree to HTTP/2 over TLS "
                    f"(ALPN {tls.selected_alpn_protocol()!r}); check --target"
                )
        data = b""
        closed = False
        try:
            await stream.send_all(_H2_PREFACE + _H2_SETTINGS)
            with trio.move_on_after(timeout):
                while len(data) < 9:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        closed = True
                        break
                    data += chunk
        except trio.BrokenResourceError:
            closed = True  # reset: judged on what arrived
        if len(data) >= 9 and data[3] == _H2_FRAME_SETTINGS:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(_H2_GOAWAY)
            return None
        first_line = data.split(b"\n", 1)[0].strip().decode("latin-1")[:60]
        if data.startswith(b"HTTP/") or data.lstrip().startswith(b"<"):
            return (
                f"{target} does not speak gRPC/HTTP2: it answered in HTTP/1 ({first_line!r}), "
                "a web server? check --target"
            )
        if data[:1] in (b"\x15", b"\x16") and not ssl:  # a TLS alert or handshake record
            return f"{target} does not speak gRPC/HTTP2 in the clear: it answered in TLS; use --tls"
        if data and first_line.isprintable():
            return f"{target} does not speak gRPC/HTTP2: it answered {first_line!r}; check --target"
        if data:
            return f"{target} does not speak gRPC/HTTP2: it answered {data[:16]!r}; check --target"
        if closed:
            return (
                f"{target} does not speak gRPC/HTTP2: it closed the connection without an "
                f"HTTP/2 answer; check --target{'' if ssl else ' (and --tls for a TLS server)'}"
            )
        return (
            f"{target} does not speak gRPC/HTTP2: no HTTP/2 answer within {timeout:g}s; "
            "check --target"
        )
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


# ---------------------------------------------------------------------------------------------
# CLI: python -m nimbus.client
# ---------------------------------------------------------------------------------------------

EXIT_OK: Final = 0
EXIT_MISSING: Final = 1  # timed out (or results aged out) before every result arrived
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_REFUSED: Final = 4  # the server refused the stream (or superseded it)
EXIT_INTERRUPTED: Final = 130


def format_result(result: Result, *, protocol: int = 2, mine: bool = True) -> str:
    """One line per result: `sq(3) = 9  (delivery 17)`."""
    call = f"{result.event_name}({result.number})"
    if result.error is not None:
        text = f"{call} failed: {result.error.code.name}: {result.error.message}"
    else:
        text = f"{call} = {result.result}"
    if protocol == 2:
        text += (
            f"  (delivery {result.delivery_id}"
            + ("" if mine else ", from an earlier session")
            + ")"
        )
    return text


def format_trace(log: LogEntry | None) -> list[str]:
    if log is None:
        return []
    lines = []
    for s in log.steps:
        meta = " ".join(f"{k}={v}" for k, v in sorted(s.metadata.items()))
        line = f"    {s.timestamp.isoformat()}  {s.service_name}/{s.instance_id}  {s.method_name}"
        if s.message:
            line += f": {s.message}"
        if meta:
            line += f"  [{meta}]"
        lines.append(line)
    return lines


def _default_target() -> str:
    port = os.environ.get("NIMBUS_PORT", "").strip()
    return f"127.0.0.1:{port if port.isdigit() and port != '0' else DEFAULT_PORT}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from nimbus.entry import ArgumentParser  # one-line usage errors, as every Nimbus command

    parser = ArgumentParser(
        prog="python -m nimbus.client",
        description=(
            "Send an event (`sq` by default) for each number in --start..--end over one Nimbus "
            "stream and print the results as they arrive. --start=0 --end=0 sends nothing and "
            "stands by for results (Ctrl-C to stop). Ctrl-C prints what was sent and what arrived."
        ),
        epilog=(
            "exit status: 0 every result arrived (results carrying an error included), "
            "1 timed out or results were lost, 2 usage error, 3 server unreachable or not a gRPC "
            "server, 4 server refused the stream, 130 interrupted (Ctrl-C, standing by included)."
        ),
    )
    parser.add_argument(
        "--client_id",
        "--client-id",
        default="client_default",
        help="client id, sent as the metadata client_id; printable ASCII (default %(default)s)",
    )
    parser.add_argument("--start", type=int, default=1, help="first number (default 1)")
    parser.add_argument("--end", type=int, default=10, help="last number, inclusive (default 10)")
    parser.add_argument(
        "--target",
        "--addr",
        action="append",
        metavar="HOST:PORT",
        help="a server pod; repeat for several (default 127.0.0.1:$NIMBUS_PORT, else 50051)",
    )
    parser.add_argument(
        "--protocol",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: the original's, 2: acks and receipts (default)",
    )
    parser.add_argument("--event", default="sq", help="event name (default sq)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="N",
        help="send at most N events per second (default 0: as fast as the stream takes them)",
    )
    parser.add_argument("--trace", action="store_true", help="print each result's trace steps")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SEC",
        help="give up after SEC seconds (default 30, plus the sending time at --rate)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log connection events to stderr"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("NIMBUS_TOKEN") or None,
        help="JWT for a server with auth on (default $NIMBUS_TOKEN; see python -m nimbus.token)",
    )
    parser.add_argument(
        "--tls",
        nargs="?",
        const="",
        default=None,
        metavar="CA_FILE",
        help="connect with TLS, verifying the server with CA_FILE (alone: the system's CAs)",
    )
    args = parser.parse_args(argv)
    args.target = args.target or [_default_target()]
    for t in args.target:
        try:
            parse_target(t)
        except ValueError as e:
            parser.error(str(e))
    if not args.client_id:
        parser.error("--client_id must not be empty")
    if not _metadata_value_ok(args.client_id):
        parser.error(
            f"--client_id must be printable ASCII (a gRPC metadata value), got {args.client_id!r}"
        )
    if args.token is not None and not _metadata_value_ok(args.token):
        parser.error("--token (or $NIMBUS_TOKEN) must be printable ASCII, as a JWT is")
    if not (args.start == 0 and args.end == 0) and args.end < args.start:
        parser.error("--end must be >= --start")
    for n in (args.start, args.end):
        if not INT32_MIN <= n <= INT32_MAX:
            parser.error(f"{n} does not fit int32")
    if not (args.rate >= 0 and math.isfinite(args.rate)):
        parser.error("--rate must be >= 0")
    if args.timeout is None:
        count = 0 if args.start == args.end == 0 else args.end - args.start + 1
        args.timeout = 30.0 + (count / args.rate if args.rate else 0.0)
    elif not (args.timeout > 0 and math.isfinite(args.timeout)):
        parser.error("--timeout must be > 0")
    if args.tls and not os.path.isfile(args.tls):
        parser.error(f"--tls {args.tls}: no such file (a PEM CA bundle)")
    return args


def _client_ssl(ca_file: str | None) -> _ssl.SSLContext | None:
    """--tls [CA_FILE]: None (plaintext), or a context trusting CA_FILE (or the system's CAs)."""
    if ca_file is None:
        return None
    ctx = _ssl.create_default_context(cafile=ca_file or None)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _leaf(exc: BaseException) -> BaseException:
    if isinstance(exc, BaseExceptionGroup):
        return _single(exc) or exc
    return exc


@dataclass
class _Tally:
    """What the CLI sent and what arrived, for the line Ctrl-C prints."""

    event: str
    planned: int
    protocol: int
    sent: int = 0
    last_sent: int | None = None
    arrived: int = 0
    last: Result | None = None

    def interrupted(self, elapsed: float) -> str:
        if self.planned:
            sent = f"sent {self.sent} of {self.planned} events"
            if self.last_sent is not None:
                sent += f" (last {self.event}({self.last_sent}))"
        else:
            sent = "standing by (sends nothing)"
        arrived = f"{self.arrived} result{'' if self.arrived == 1 else 's'} arrived"
        if self.last is not None:
            arrived += f" (last {self.last.event_name}({self.last.number})"
            if self.protocol == 2:
                arrived += f", delivery {self.last.delivery_id}"
            arrived += ")"
        return f"interrupted after {elapsed:.2f}s: {sent}, {arrived}"


async def _cli(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    standby = args.start == 0 and args.end == 0
    numbers = [] if standby else list(range(args.start, args.end + 1))
    outstanding = set(numbers)  # numbers whose result (or final refusal) has not arrived
    unanswered = 0  # results carrying an error, and final refusals
    seq_number: dict[int, int] = {}
    lost: list[int] = []
    all_sent = False
    finished = trio.Event()
    interrupted = False
    tally = _Tally(args.event, len(numbers), args.protocol)

    def settle(number: int) -> None:
        outstanding.discard(number)
        if all_sent and not outstanding:
            finished.set()

    def on_event(notice: Notice) -> None:
        nonlocal unanswered
        if isinstance(notice, Refused):
            if notice.will_retry:
                if args.verbose:
                    print(
                        f"{notice.event_name}({notice.number}) not accepted ({notice.code.name}), resending",
                        file=err,
                    )
                return
            print(
                f"{notice.event_name}({notice.number}) refused: {notice.code.name}: {notice.message}",
                file=out,
                flush=True,
            )
            if notice.number in outstanding:
                unanswered += 1
            settle(notice.number)
        elif isinstance(notice, Gap):
            print(
                f"results {notice.first}..{notice.last} aged out on the server and are lost",
                file=out,
                flush=True,
            )
            for seq in notice.lost_seqs:
                if seq in seq_number:
                    lost.append(seq_number[seq])
                    settle(seq_number[seq])
        elif args.verbose and isinstance(notice, Connected | Disconnected):
            print(f"[{notice}]", file=err, flush=True)

    async def sender(client: NimbusClient) -> None:
        nonlocal all_sent
        begun = trio.current_time()
        for i, n in enumerate(numbers):
            if args.rate:
                await trio.sleep_until(begun + i / args.rate)
            seq_number[await client.send(args.event, n)] = n
            tally.sent += 1
            tally.last_sent = n
        all_sent = True
        # Everything may have settled before the last send() returned.
        if numbers and not outstanding:
            finished.set()

    async def printer(client: NimbusClient) -> None:
        nonlocal unanswered
        async for r in client.results():
            tally.arrived += 1
            tally.last = r
            # Protocol 2: a result without a seq answers an event of an earlier session.
            mine = args.protocol == 1 or r.seq is not None
            print(format_result(r, protocol=args.protocol, mine=mine), file=out, flush=True)
            if args.trace:
                for line in format_trace(r.log):
                    print(line, file=out, flush=True)
            if mine:
                if r.error is not None and r.number in outstanding:
                    unanswered += 1
                settle(r.number)

    async def session(client: NimbusClient) -> None:
        # Done is decided by `finished`, not by the results loop: the last event to settle may
        # be a refusal (a notice), after which no result will ever come.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, client)
            nursery.start_soon(printer, client)
            await finished.wait()  # standby: never set; Ctrl-C or a failure ends it
            nursery.cancel_scope.cancel()

    started = trio.current_time()
    main_scope = trio.CancelScope()
    timeout_scope = trio.CancelScope(deadline=math.inf if standby else started + args.timeout)
    ssl = _client_ssl(args.tls)

    async def watch_sigint() -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                if interrupted:  # a second Ctrl-C: do not wait for the final ack
                    print(tally.interrupted(trio.current_time() - started), file=err, flush=True)
                    os._exit(EXIT_INTERRUPTED)
                interrupted = True
                main_scope.cancel()

    async def not_grpc() -> str | None:
        """Why a target that answers is not a gRPC server (each checked at once, concurrently);
        one that cannot be reached is left to the client, which tries the others."""
        verdicts: dict[str, str | None] = {}

        async def check(target: str) -> None:
            with contextlib.suppress(ConnectionFailed):
                verdicts[target] = await check_target(target, ssl=ssl)

        async with trio.open_nursery() as nursery:
            for target in args.target:
                nursery.start_soon(check, target)
        return next((v for v in verdicts.values() if v), None)

    async with trio.open_nursery() as top:
        top.start_soon(watch_sigint)
        try:
            with main_scope, timeout_scope:
                why = await not_grpc()
                if why is not None:
                    print(why, file=err)
                    return EXIT_UNREACHABLE
                async with trio_asyncio.open_loop():
                    async with open_client(
                        args.target,
                        args.client_id,
                        protocol=args.protocol,
                        connect_timeout=0,
                        on_event=on_event,
                        token=args.token,
                        ssl=ssl,
                    ) as client:
                        await session(client)
        except BaseException as exc:
            leaf = _leaf(exc)
            if isinstance(leaf, ConnectionFailed | StreamRefused):
                print(str(leaf), file=err)
                return EXIT_UNREACHABLE if isinstance(leaf, ConnectionFailed) else EXIT_REFUSED
            if isinstance(leaf, NimbusError):
                print(str(leaf), file=err)
                return EXIT_MISSING
            raise
        finally:
            top.cancel_scope.cancel()

    if interrupted:
        print(tally.interrupted(trio.current_time() - started), file=err, flush=True)
        return EXIT_INTERRUPTED
    if timeout_scope.cancelled_caught or outstanding or lost:
        missing = sorted(outstanding | set(lost))
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        why = (
            f"timed out after {args.timeout:g}s"
            if timeout_scope.cancelled_caught
            else "results were lost"
        )
        print(
            f"{why}: {len(missing)} of {len(numbers)} results missing ({args.event} {shown})",
            file=err,
        )
        return EXIT_MISSING
    if numbers:
        errors = f" ({unanswered} with an error)" if unanswered else ""
        print(
            f"all {len(numbers)} answered{errors} in {trio.current_time() - started:.2f}s", file=err
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logger.remove()
    if args.verbose:
        logger.add(sys.stderr, level="DEBUG")
    try:
        return trio.run(_cli, args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:  # a Ctrl-C outside the CLI's own handling (start-up, shutdown)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
