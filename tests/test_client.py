"""Tests of the Nimbus client (the package nimbus/client/).

Three layers, after h11 and trio-websocket:
- `ClientLedger` driven directly (no I/O, no clock): seqs, receipts, resends after a reconnect,
  UNAVAILABLE retries, dedupe, acks, gaps; plus a hypothesis test over random interleavings of
  sends, receipts, results (with redeliveries), refusals, acks and reconnects against a model
  server.
- End to end against `FakeNimbus`, a protocol-2 server in miniature built on grpclib and served
  inside trio-asyncio on 127.0.0.1 port 0, with a fault switch that aborts the TCP connection.
- The CLI as a subprocess (exit codes and messages), against the same fake server.

Every test that does real I/O runs under `trio.fail_after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nimbus.client import (
    ClientClosed,
    ClientLedger,
    ConnectionFailed,
    Gap,
    NimbusClient,
    Notice,
    OutgoingEvent,
    Refused,
    Result,
    StreamEnd,
    StreamRefused,
    Superseded,
    backoff_delay,
    classify_stream_end,
    format_result,
    open_client,
    parse_target,
)
from nimbus.proto_gen.nimbus import (
    ErrorCode,
    EventError,
    EventRequest,
    EventResponse,
    LogEntry,
    ResponseKind,
    TraceStep,
)

REPO = Path(__file__).resolve().parents[1]
METHOD = "/nimbus.NimbusService/ProcessEvent"


# =============================================================================================
# ClientLedger: the pure bookkeeping
# =============================================================================================


def connected_ledger(**kw: Any) -> ClientLedger:
    ledger = ClientLedger(**kw)
    assert ledger.on_connected() == (None, [])
    return ledger


def test_seqs_start_at_one_and_increase() -> None:
    ledger = connected_ledger()
    evs = [ledger.add("sq", n) for n in range(1, 4)]
    assert [e.seq for e in evs] == [1, 2, 3]
    assert [e.wire_seq for e in evs] == [1, 2, 3]
    assert all(e.in_flight for e in evs)
    assert ledger.pending == 3 and ledger.stats.sent == 3


def test_events_added_while_disconnected_wait_for_the_stream() -> None:
    ledger = ClientLedger()
    ev = ledger.add("sq", 7)
    assert not ev.in_flight
    ack, out = ledger.on_connected()
    assert ack is None and out == [ev] and ev.in_flight
    assert ledger.stats.resent == 0  # a first transmission is not a resend


def test_receipt_settles_and_maps_delivery_id_to_seq() -> None:
    ledger = connected_ledger()
    a, b = ledger.add("sq", 1), ledger.add("sq", 2)
    assert ledger.on_receipt(a.wire_seq, 100) is a
    assert ledger.on_receipt(b.wire_seq, 105) is b
    assert ledger.pending == 0 and ledger.stats.receipted == 2
    assert ledger.on_result(100) == (True, a.seq)
    assert ledger.on_result(105) == (True, b.seq)
    # A result of an earlier session: delivered, but it answers no event of ours.
    assert ledger.on_result(200) == (True, None)


def test_unknown_receipt_is_counted_not_fatal() -> None:
    ledger = connected_ledger()
    assert ledger.on_receipt(99, 5) is None
    assert ledger.stats.unexpected == 1


def test_redeliveries_are_dropped_by_delivery_id() -> None:
    ledger = connected_ledger()
    assert ledger.on_result(10)[0]
    assert ledger.on_result(12)[0]
    assert not ledger.on_result(12)[0]
    assert not ledger.on_result(11)[0]  # below the watermark: received already (or overtaken)
    assert not ledger.on_result(3)[0]
    assert ledger.on_result(13)[0]
    assert ledger.stats.duplicates_dropped == 3 and ledger.stats.results == 3


def test_overtaken_receipted_result_counts_as_skipped() -> None:
    ledger = connected_ledger()
    a, b = ledger.add("sq", 1), ledger.add("sq", 2)
    ledger.on_receipt(a.wire_seq, 10)
    ledger.on_receipt(b.wire_seq, 11)
    # The server skipped 10: it broke the order promise.
    assert ledger.on_result(11) == (True, b.seq)
    assert ledger.stats.skipped == 1
    assert ledger.on_result(10) == (False, None)


def test_protocol_1_delivers_everything_and_never_acks() -> None:
    ledger = connected_ledger(protocol=1)
    assert ledger.on_result(0) == (True, None)
    assert ledger.on_result(0) == (True, None)
    assert not ledger.consumed(5, now=0.0)
    assert ledger.ack_deadline() is None
    ev = ledger.add("sq", 3)
    assert ledger.on_written(ev) and ledger.pending == 0


def test_unreceipted_events_are_resent_in_seq_order_after_reconnect() -> None:
    ledger = connected_ledger()
    evs = [ledger.add("sq", n) for n in range(1, 6)]
    ledger.on_receipt(evs[1].wire_seq, 50)
    ledger.on_receipt(evs[3].wire_seq, 52)
    ledger.on_disconnected()
    assert not any(e.in_flight for e in evs)
    late = ledger.add("sq", 6)  # sent while down: waits
    assert not late.in_flight
    ack, out = ledger.on_connected()
    assert ack is None
    assert [e.number for e in out] == [1, 3, 5, 6]
    assert [e.wire_seq for e in out] == [
        1,
        3,
        5,
        6,
    ]  # a resend keeps its seq: a server may recognise it
    assert ledger.stats.resent == 3
    # Receipts of the old stream's seqs are not confused with the new ones.
    assert ledger.on_receipt(2, 99) is None


def test_a_resent_events_second_result_is_dropped_but_consumed() -> None:
    ledger = connected_ledger()
    a, b = ledger.add("sq", 1), ledger.add("sq", 2)
    ledger.on_receipt(a.wire_seq, 10)
    ledger.on_disconnected()  # b's receipt died with the stream: the server had accepted it (11)
    _, out = ledger.on_connected()
    assert out == [b]
    ledger.on_receipt(b.wire_seq, 14)  # ... and accepts the resend too
    assert ledger.on_result(10, wire_seq=a.wire_seq) == (True, a.seq)
    assert ledger.on_result(11, wire_seq=b.wire_seq) == (True, b.seq)  # its first result
    assert not ledger.is_resend_duplicate(11)
    assert ledger.on_result(14, wire_seq=b.wire_seq) == (False, b.seq)  # its second: dropped
    assert ledger.is_resend_duplicate(14)  # ... and to be consumed (acked) in order
    assert ledger.stats.resend_duplicates_dropped == 1 and ledger.stats.results == 2
    assert ledger.on_result(14, wire_seq=b.wire_seq) == (False, None)  # a redelivery of it
    assert not ledger.is_resend_duplicate(14)
    assert ledger.stats.duplicates_dropped == 1


def test_a_resent_event_with_one_result_is_handed_over() -> None:
    """The receipt died but the event did not reach Kafka: the resend's result is the only one."""
    ledger = connected_ledger()
    a = ledger.add("sq", 1)
    ledger.on_disconnected()
    ledger.on_connected()
    ledger.on_receipt(a.wire_seq, 7)
    assert ledger.on_result(7, wire_seq=a.wire_seq) == (True, a.seq)
    assert ledger.stats.resend_duplicates_dropped == 0


def test_lost_stream_still_settles_receipts_but_carries_nothing_new() -> None:
    ledger = connected_ledger()
    a = ledger.add("sq", 1)
    ledger.on_stream_lost()
    b = ledger.add("sq", 2)
    assert not b.in_flight  # not written to a dead stream
    # A receipt that made it before the cut still counts.
    assert ledger.on_receipt(a.wire_seq, 10) is a
    ledger.on_disconnected()
    _, out = ledger.on_connected()
    assert out == [b] and ledger.stats.resent == 0


def test_unavailable_refusal_retries_with_a_fresh_seq_after_backoff() -> None:
    ledger = connected_ledger(retry_backoff=(1.0, 8.0), rand=lambda: 0.0)
    a, b = ledger.add("sq", 1), ledger.add("sq", 2)
    outcome = ledger.on_refused(a.wire_seq, ErrorCode.UNAVAILABLE, now=10.0)
    assert outcome == (a, True)
    assert ledger.pending == 2 and ledger.stats.retries == 1 and ledger.stats.errors == 1
    assert ledger.next_retry_at() == 10.5  # equal jitter with rand=0: half of 1 s
    assert ledger.due_retries(10.4) == []
    (again,) = ledger.due_retries(10.5)
    # A fresh seq keeps seqs strictly increasing on the stream.
    assert again is a and a.seq == 1 and a.wire_seq == 3 > b.wire_seq
    assert ledger.next_retry_at() is None
    ledger.on_receipt(3, 77)
    assert ledger.on_result(77) == (True, 1)  # the application's handle is still the first seq


def test_unavailable_event_is_retried_at_once_on_a_new_stream() -> None:
    ledger = connected_ledger(retry_backoff=(5.0, 5.0))
    a, b = ledger.add("sq", 1), ledger.add("sq", 2)
    ledger.on_refused(a.wire_seq, ErrorCode.UNAVAILABLE, now=0.0)
    ledger.on_disconnected()
    _, out = ledger.on_connected()
    assert out == [b, a]
    assert [e.wire_seq for e in out] == [2, 3]


def test_final_refusal_settles_the_event() -> None:
    ledger = connected_ledger()
    a = ledger.add("nope", 1)
    assert ledger.on_refused(a.wire_seq, ErrorCode.UNKNOWN_EVENT, now=0.0) == (a, False)
    assert ledger.pending == 0 and ledger.stats.refused == 1 and ledger.stats.errors == 1


def test_ack_batches_by_count() -> None:
    ledger = connected_ledger(ack_every=3, ack_interval=10.0)
    assert ledger.ack_deadline() is None
    assert ledger.consumed(1, now=0.0)  # first unacked: the timer must start
    assert ledger.ack_deadline() == 10.0
    assert not ledger.consumed(2, now=0.1)
    assert ledger.consumed(3, now=0.2)  # threshold reached: due now
    assert ledger.ack_deadline() == float("-inf")
    assert ledger.take_ack() == 3
    assert ledger.ack_deadline() is None and ledger.stats.acks_sent == 1


def test_ack_batches_by_time() -> None:
    ledger = connected_ledger(ack_every=100, ack_interval=0.005)
    ledger.consumed(7, now=1.0)
    ledger.consumed(9, now=1.003)
    assert ledger.ack_deadline() == pytest.approx(1.005)
    assert ledger.take_ack() == 9
    assert not ledger.consumed(9, now=2.0)  # nothing new
    assert ledger.ack_deadline() is None


def test_reconnect_repeats_the_last_ack_first() -> None:
    ledger = connected_ledger()
    ledger.consumed(5, now=0.0)
    assert ledger.take_ack() == 5
    ledger.consumed(8, now=0.1)  # taken by the app, the ack not sent before the drop
    ledger.on_disconnected()
    ack, _ = ledger.on_connected()
    assert ack == 8 and ledger.ack_deadline() is None


def test_gap_reports_lost_events_and_raises_the_watermark() -> None:
    ledger = connected_ledger()
    a, b, c = (ledger.add("sq", n) for n in (1, 2, 3))
    ledger.on_receipt(a.wire_seq, 10)
    ledger.on_receipt(b.wire_seq, 12)
    ledger.on_receipt(c.wire_seq, 20)
    assert ledger.on_gap(9, 15) == (a.seq, b.seq)
    assert ledger.highest_received == 15
    assert ledger.on_result(12) == (False, None)
    assert ledger.on_result(20) == (True, c.seq)


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert backoff_delay(0, 0.05, 2.0, 0.0) == pytest.approx(0.025)
    assert backoff_delay(0, 0.05, 2.0, 0.999) == pytest.approx(0.05, rel=1e-2)
    assert backoff_delay(3, 0.05, 2.0, 1.0) == pytest.approx(0.4)
    assert backoff_delay(50, 0.05, 2.0, 1.0) == pytest.approx(2.0)
    assert backoff_delay(1000, 0.05, 2.0, 0.0) == pytest.approx(1.0)


def test_stream_end_classification() -> None:
    assert classify_stream_end(None, None) is StreamEnd.RECONNECT
    assert classify_stream_end(Status.OK, None) is StreamEnd.RECONNECT
    assert classify_stream_end(Status.UNAVAILABLE, "draining") is StreamEnd.RECONNECT
    assert (
        classify_stream_end(Status.ABORTED, "superseded by a newer stream") is StreamEnd.SUPERSEDED
    )
    assert classify_stream_end(Status.ABORTED, "try again") is StreamEnd.RECONNECT
    assert classify_stream_end(Status.INVALID_ARGUMENT, "client_id missing") is StreamEnd.REFUSED
    assert classify_stream_end(Status.PERMISSION_DENIED, None) is StreamEnd.REFUSED


def test_parse_target() -> None:
    assert parse_target("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_target("[::1]:7") == ("::1", 7)
    for bad in ("localhost", ":5", "host:", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_format_result() -> None:
    ok = Result(delivery_id=17, event_name="sq", number=3, result=9, seq=2)
    assert format_result(ok) == "sq(3) = 9  (delivery 17)"
    assert format_result(ok, protocol=1) == "sq(3) = 9"
    bad = Result(17, "sq", 50000, 0, EventError(code=ErrorCode.OUT_OF_RANGE, message="too big"))
    assert format_result(bad, mine=False) == (
        "sq(50000) failed: OUT_OF_RANGE: too big  (delivery 17, from an earlier session)"
    )


# --- hypothesis: random interleavings against a model server ---------------------------------


@dataclass
class ModelServer:
    """What the protocol promises, as simply as possible: a per-client result log, acked
    cumulatively; a new stream replays everything after the ack; no dedupe of resent events."""

    log: list[tuple[int, int]] = field(default_factory=list)  # (delivery id, wire seq)
    number_of: dict[int, int] = field(default_factory=dict)  # delivery id -> number
    acked: int = 0
    offset: int = 0
    inbox: list[EventRequest] = field(default_factory=list)  # client -> server, in flight
    outbox: list[EventResponse] = field(default_factory=list)  # server -> client, in flight
    seen: list[int] = field(default_factory=list)  # delivery ids of results the client received

    def accept(self, req: EventRequest, stride: int, refuse: bool) -> None:
        if not req.event_name:
            assert req.ack <= self.offset
            self.acked = max(self.acked, req.ack)
            return
        if refuse:
            self.outbox.append(
                EventResponse(
                    kind=ResponseKind.ERROR,
                    seq=req.seq,
                    error=EventError(code=ErrorCode.UNAVAILABLE),
                )
            )
            return
        self.offset += stride
        did = self.offset
        self.log.append((did, req.seq))
        self.number_of[did] = req.number
        self.outbox.append(EventResponse(kind=ResponseKind.RECEIPT, seq=req.seq, delivery_id=did))
        self.outbox.append(
            EventResponse(kind=ResponseKind.RESULT, delivery_id=did, number=req.number)
        )

    def new_stream(self) -> None:
        self.inbox.clear()
        self.outbox = [
            EventResponse(kind=ResponseKind.RESULT, delivery_id=did, number=self.number_of[did])
            for did, _ in self.log
            if did > self.acked
        ]


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "send",
                "serve",
                "serve",
                "deliver",
                "deliver",
                "deliver",
                "consume",
                "consume",
                "tick",
                "redeliver",
                "refuse",
                "drop",
            ]
        ),
        st.integers(1, 3),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_ledger_delivers_each_result_once_in_order_across_reconnects(
    ops: list[tuple[str, int]],
) -> None:
    ledger = ClientLedger(ack_every=3, ack_interval=1.0, retry_backoff=(1.0, 4.0), rand=lambda: 0.5)
    server = ModelServer()
    now = 0.0
    buffered: list[tuple[int, int | None]] = []  # (delivery id, seq) waiting for the application
    taken: list[int] = []  # delivery ids the application took, in order
    number_of_seq: dict[int, int] = {}
    next_number = 1

    def transmit(evs: list[OutgoingEvent]) -> None:
        for ev in evs:
            server.inbox.append(
                EventRequest(event_name=ev.event_name, number=ev.number, seq=ev.wire_seq)
            )

    def step(op: str, arg: int) -> None:
        nonlocal now, next_number
        if op == "send":
            ev = ledger.add("sq", next_number)
            number_of_seq[ev.seq] = next_number
            next_number += 1
            if ev.in_flight:
                transmit([ev])
        elif op in ("serve", "refuse") and server.inbox:
            server.accept(server.inbox.pop(0), stride=arg, refuse=op == "refuse")
        elif op == "deliver" and server.outbox:
            resp = server.outbox.pop(0)
            if resp.kind == ResponseKind.RESULT:
                server.seen.append(resp.delivery_id)
            if resp.kind == ResponseKind.RECEIPT:
                ledger.on_receipt(resp.seq, resp.delivery_id)
            elif resp.kind == ResponseKind.ERROR:
                ledger.on_refused(resp.seq, resp.error.code, now)
            else:
                deliver, seq = ledger.on_result(resp.delivery_id)
                if deliver:
                    buffered.append((resp.delivery_id, seq))
        elif op == "redeliver" and server.seen:
            # A duplicate on the wire of a result the client already received (e.g. a replay
            # racing the live path). Never one it has not seen: putting a result ahead of a lower
            # one still undelivered would break the order promise, which dedupe cannot repair.
            did = server.seen[-min(arg, len(server.seen))]
            server.outbox.insert(
                0,
                EventResponse(
                    kind=ResponseKind.RESULT, delivery_id=did, number=server.number_of[did]
                ),
            )
        elif op == "consume" and buffered:
            did, seq = buffered.pop(0)
            taken.append(did)
            if seq is not None:
                assert server.number_of[did] == number_of_seq[seq]  # the seq mapping is right
            ledger.consumed(did, now)
        elif op == "tick":
            now += arg * 0.5
        elif op == "drop":
            ledger.on_disconnected()
            server.new_stream()
            ack, evs = ledger.on_connected()
            if ack is not None:
                server.inbox.append(EventRequest(ack=ack))
            transmit(evs)
        # The I/O layer's timers, run after every step.
        deadline = ledger.ack_deadline()
        if deadline is not None and now >= deadline:
            server.inbox.append(EventRequest(ack=ledger.take_ack()))
        transmit(ledger.due_retries(now))
        # Invariants at every step.
        assert taken == sorted(set(taken)), "handed over out of order or twice"
        assert server.acked <= (taken[-1] if taken else 0), (
            "acked something the application never took"
        )

    for op, arg in ops:
        step(op, arg)

    # Quiesce: reconnect, let retries come due, and run everything to the end.
    step("drop", 1)
    for _ in range(10_000):
        if server.inbox:
            step("serve", 1)
        elif server.outbox:
            step("deliver", 1)
        elif buffered:
            step("consume", 1)
        elif ledger.pending:
            step("tick", 4)
        else:
            break
    assert ledger.pending == 0
    step("tick", 4)  # flush the last ack
    # Every result the server ever produced reached the application exactly once, in order.
    assert taken == [did for did, _ in server.log]
    # Every event sent has at least one result; more than one only if it was transmitted again
    # after a stream drop (its first copy was accepted, but the receipt was lost).
    numbers = [server.number_of[did] for did in taken]
    assert set(numbers) == set(range(1, next_number))
    assert ledger.stats.duplicates_dropped >= 0 and ledger.stats.results == len(taken)


# =============================================================================================
# FakeNimbus: a protocol-2 server in miniature, for the end-to-end tests
# =============================================================================================


class _FakeConn:
    def __init__(self, stream: Stream[EventRequest, EventResponse]) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[EventResponse] = asyncio.Queue()  # test fake: unbounded is fine
        self.superseded = asyncio.Event()


@dataclass
class _FakeClient:
    log: list[EventResponse] = field(default_factory=list)  # results, delivery-id order
    acked: int = 0
    offset: int = 0
    seqs: dict[int, int] = field(default_factory=dict)  # seq -> delivery id (dedupe_seqs)
    current: _FakeConn | None = None


class FakeNimbus:
    """The server side of protocol 2, honestly and nothing more.

    Per client: a log of results; each event gets a delivery id (offset-like, strides of 1..3),
    a RECEIPT on the stream that sent it, and its RESULT on the client's current stream. A new
    stream supersedes the old one (ABORTED) and first replays every result after the client's
    last ack, in order, then goes live. The stream stays open after the client half-closes.

    Knobs: `drop_points` (total responses sent after which the TCP connection is aborted: the
    fault switch), `dedupe_seqs` (a resend with a known seq gets its original receipt, as a
    server remembering seqs would do), `unavailable` (refuse that many events with
    UNAVAILABLE), `hold_results` (receipt, never answer), `refuse` (end every stream with a status),
    `reading` (an asyncio.Event: clear it and the server stops reading requests).
    """

    def __init__(
        self,
        *,
        dedupe_seqs: bool = True,
        unavailable: int = 0,
        hold_results: bool = False,
        refuse: tuple[Status, str] | None = None,
    ) -> None:
        self.dedupe_seqs = dedupe_seqs
        self.unavailable = unavailable
        self.hold_results = hold_results
        self.refuse = refuse
        self.clients: dict[str, _FakeClient] = {}
        self.drop_points: list[int] = []
        self.sent = 0
        self.drops = 0
        self.streams = 0
        self.metadata: list[dict[str, str]] = []
        self.requests: list[EventRequest] = []
        self._stream_started = trio.Event()  # set from the asyncio side: a sync call, same thread
        self.reading = asyncio.Event()  # clear() to stop reading requests (backpressure tests)
        self.reading.set()

    async def current_stream(self, client_id: str) -> _FakeConn:
        """Wait until the server has registered a stream of `client_id` (trio side)."""
        while (state := self.clients.get(client_id)) is None or state.current is None:
            await self._stream_started.wait()
            self._stream_started = trio.Event()
        return state.current

    def __mapping__(self) -> dict[str, Handler]:
        # A raw handler rather than betterproto's base class: it needs `stream.metadata`.
        return {
            METHOD: Handler(
                self._process_event, Cardinality.STREAM_STREAM, EventRequest, EventResponse
            )
        }

    async def _process_event(self, stream: Stream[EventRequest, EventResponse]) -> None:
        md = {
            k: v if isinstance(v, str) else v.decode() for k, v in (stream.metadata or {}).items()
        }
        self.metadata.append(md)
        client_id = md.get("client_id", "")
        if not client_id:
            raise GRPCError(Status.INVALID_ARGUMENT, "client_id metadata is required")
        if self.refuse is not None:
            raise GRPCError(*self.refuse)
        v2 = md.get("nimbus-protocol") == "2"
        self.streams += 1
        state = self.clients.setdefault(client_id, _FakeClient())
        if state.current is not None:
            state.current.superseded.set()
        conn = _FakeConn(stream)
        # Replay and registration happen without an await in between, so live results produced
        # from now on queue up behind the replay.
        if v2:
            for resp in state.log:
                if resp.delivery_id > state.acked:
                    conn.queue.put_nowait(resp)
        state.current = conn
        self._stream_started.set()
        tasks = [
            asyncio.ensure_future(self._read(conn, state, v2)),
            asyncio.ensure_future(self._write(conn)),
            asyncio.ensure_future(conn.superseded.wait()),
        ]
        reader, writer, superseded = tasks
        try:
            pending = set(tasks)
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if superseded in done:
                    raise GRPCError(Status.ABORTED, "superseded by a newer stream of this client")
                if writer in done:
                    writer.result()
                    return  # the fault switch fired: the connection is gone
                if reader in done:
                    reader.result()  # the client half-closed: keep the stream open, as the real server
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if state.current is conn:
                state.current = None

    async def _read(self, conn: _FakeConn, state: _FakeClient, v2: bool) -> None:
        async for req in conn.stream:
            await self.reading.wait()
            self.requests.append(req)
            if not v2:
                conn.queue.put_nowait(
                    EventResponse(
                        event_name=req.event_name, number=req.number, result=req.number**2
                    )
                )
                continue
            if not req.event_name:
                state.acked = max(state.acked, req.ack)
                continue
            if self.dedupe_seqs and req.seq in state.seqs:
                conn.queue.put_nowait(
                    EventResponse(
                        kind=ResponseKind.RECEIPT, seq=req.seq, delivery_id=state.seqs[req.seq]
                    )
                )
                continue
            if self.unavailable > 0:
                self.unavailable -= 1
                conn.queue.put_nowait(
                    self._error(req.seq, ErrorCode.UNAVAILABLE, "kafka produce failed")
                )
                continue
            if req.event_name != "sq":
                conn.queue.put_nowait(
                    self._error(
                        req.seq, ErrorCode.UNKNOWN_EVENT, f"unknown event {req.event_name!r}"
                    )
                )
                continue
            state.offset += random.randint(1, 3)
            did = state.offset
            state.seqs[req.seq] = did
            conn.queue.put_nowait(
                EventResponse(kind=ResponseKind.RECEIPT, seq=req.seq, delivery_id=did)
            )
            if self.hold_results:
                continue
            result = EventResponse(
                kind=ResponseKind.RESULT,
                delivery_id=did,
                seq=req.seq,  # as the real server: the seq of the event answered
                event_name=req.event_name,
                number=req.number,
                log=LogEntry(
                    steps=[
                        TraceStep(
                            service_name="fake",
                            instance_id="t",
                            method_name="sq",
                            message="computed",
                        )
                    ]
                ),
            )
            if abs(req.number) > 46340:
                result.error = EventError(
                    code=ErrorCode.OUT_OF_RANGE, message=f"sq({req.number}) does not fit int32"
                )
            else:
                result.result = req.number**2
            state.log.append(result)
            if state.current is not None:
                state.current.queue.put_nowait(result)

    @staticmethod
    def _error(seq: int, code: ErrorCode, message: str) -> EventResponse:
        return EventResponse(
            kind=ResponseKind.ERROR, seq=seq, error=EventError(code=code, message=message)
        )

    async def _write(self, conn: _FakeConn) -> None:
        while True:
            resp = await conn.queue.get()
            await conn.stream.send_message(resp)
            self.sent += 1
            if self.drop_points and self.sent >= self.drop_points[0]:
                self.drop_points.pop(0)
                self.drops += 1
                # The fault: the TCP connection dies mid-stream (no trailers, no RST_STREAM).
                conn.stream._stream._transport.abort()
                return


@contextlib.asynccontextmanager
async def serving(fake: FakeNimbus) -> AsyncIterator[str]:
    """Serve `fake` on 127.0.0.1, any free port; yields 'host:port'. Needs a trio-asyncio loop."""
    server = Server([fake])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    await trio_asyncio.aio_as_trio(server.start)(sock=sock)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        await trio_asyncio.aio_as_trio(server.wait_closed)()


class FreezingProxy:
    """A TCP proxy whose live connections can be frozen: from then on their bytes vanish in both
    directions and nothing is closed, like a link that died silently (NAT timeout, lost signal)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = parse_target(upstream)
        self.frozen_before = 0  # connections numbered below this are frozen
        self.connections = 0

    def freeze(self) -> None:
        self.frozen_before = self.connections + 1

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, down: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        async with down, await trio.open_tcp_stream(*self.upstream) as up:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, down, up, number)
                nursery.start_soon(self._pump, up, down, number)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, number: int) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for chunk in src:
                if number >= self.frozen_before:
                    await dst.send_all(chunk)
            await dst.send_eof()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_client(
    targets: str | list[str], client_id: str, **kw: Any
) -> AbstractAsyncContextManager[NimbusClient]:
    """open_client with test-speed backoff and close linger."""
    kw.setdefault("backoff", (0.01, 0.05))
    kw.setdefault("close_linger", 0.01)
    return open_client([targets] if isinstance(targets, str) else targets, client_id, **kw)


async def collect(client: NimbusClient, count: int, into: list[Result]) -> None:
    async for r in client.results():
        into.append(r)
        if len(into) >= count:
            return


# =============================================================================================
# End to end
# =============================================================================================


async def test_results_arrive_in_order_with_receipts_and_acks() -> None:
    fake = FakeNimbus()
    notices: list[Notice] = []
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-basic", on_event=notices.append) as client:
                got: list[Result] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect, client, 20, got)
                    seqs = [await client.send("sq", n) for n in range(1, 21)]
                assert seqs == list(range(1, 21))
                assert [r.number for r in got] == list(range(1, 21))
                assert all(r.result == r.number**2 and r.ok for r in got)
                assert [r.seq for r in got] == seqs
                assert [r.delivery_id for r in got] == sorted({r.delivery_id for r in got})
                assert got[0].log is not None and got[0].log.steps[0].service_name == "fake"
                assert client.stats.receipted == 20 and client.pending == 0
            # aclose flushed the ack: the server knows everything was received.
    assert fake.clients["c-basic"].acked == got[-1].delivery_id
    assert fake.metadata[0]["nimbus-protocol"] == "2" and fake.metadata[0]["client_id"] == "c-basic"
    assert [r.seq for r in fake.requests if r.event_name] == list(range(1, 21))
    assert sum(1 for n in notices if type(n).__name__ == "Receipted") == 20


async def test_exactly_once_in_order_across_three_forced_disconnects() -> None:
    fake = FakeNimbus()
    # Responses sent (receipts, results, replays) before each drop.
    fake.drop_points = [60, 150, 260]
    got: list[Result] = []
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-chaos") as client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect, client, 200, got)
                    for n in range(1, 201):
                        await client.send("sq", n)
                await client.wait_settled()
                assert fake.drops == 3
                assert client.stats.reconnects == 3
    assert [r.number for r in got] == list(range(1, 201))
    assert all(r.result == r.number**2 for r in got)
    ids = [r.delivery_id for r in got]
    assert ids == sorted(set(ids))


async def test_without_server_dedupe_each_event_is_handed_over_once() -> None:
    # The real server does not remember seqs: a resent event whose receipt was lost in the drop
    # becomes a second event with a second result. The library hands over each delivery id once,
    # in order, and drops a resent event's second result (same seq): every number exactly once.
    fake = FakeNimbus(dedupe_seqs=False)
    fake.drop_points = [41, 97, 201]
    got: list[Result] = []
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-nodedupe") as client:
                async with trio.open_nursery() as nursery:

                    async def take_all() -> None:
                        async for r in client.results():
                            got.append(r)

                    nursery.start_soon(take_all)
                    for n in range(1, 151):
                        await client.send("sq", n)
                    await client.wait_settled()
                    while {x.number for x in got} < set(range(1, 151)):  # noqa: ASYNC110 (the collector task appends)
                        await trio.sleep(0.02)
                    await trio.sleep(0.3)  # a duplicate would arrive meanwhile
                    nursery.cancel_scope.cancel()
                resent = client.stats.resent
    ids = [r.delivery_id for r in got]
    assert ids == sorted(set(ids))
    assert [r.number for r in got] == list(range(1, 151))
    assert resent > 0 and client.stats.resend_duplicates_dropped <= resent


async def test_redeliveries_after_reconnect_are_dropped() -> None:
    # No acks go out before the cut (huge batch, long interval), so the new stream replays all
    # the results the application already has: the library must drop every one of them.
    fake = FakeNimbus()
    got: list[Result] = []
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(
                target, "c-replay", ack_every=10_000, ack_interval=60.0
            ) as client:
                for n in range(1, 31):
                    await client.send("sq", n)
                await collect(client, 30, got)
                assert fake.clients["c-replay"].acked == 0
                await client.disconnect()
                await client.wait_connected()
                # The reconnect repeats the ack first, but the fake replays on connect, before reading.
                for n in range(31, 41):
                    await client.send("sq", n)
                await collect(client, 40, got)
                assert client.stats.duplicates_dropped == 30
                assert client.stats.reconnects == 1
    assert [r.number for r in got] == list(range(1, 41))


async def test_switch_moves_to_another_pod() -> None:
    fake = FakeNimbus()
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), serving(fake) as a, serving(fake) as b:
            # Two "pods" sharing one backend state, as two Nimbus pods share Kafka and Redis.
            async with fast_client(a, "c-switch") as client:
                got: list[Result] = []
                for n in range(1, 6):
                    await client.send("sq", n)
                await collect(client, 5, got)
                await client.switch(b)
                await client.wait_connected()
                assert client.target == b and client.targets == (a, b)
                for n in range(6, 11):
                    await client.send("sq", n)
                await collect(client, 10, got)
    assert [r.number for r in got] == list(range(1, 11))


async def test_unavailable_refusals_are_retried_and_unknown_events_refused() -> None:
    fake = FakeNimbus(unavailable=3)
    notices: list[Notice] = []
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-retry", on_event=notices.append) as client:
                for n in range(1, 6):
                    await client.send("sq", n)
                bad = await client.send("cube", 2)
                got: list[Result] = []
                await collect(client, 5, got)
                await client.wait_settled()
                assert sorted(r.number for r in got) == [1, 2, 3, 4, 5]
                assert client.stats.retries == 3 and client.stats.refused == 1
    refused = [n for n in notices if isinstance(n, Refused)]
    assert [n.will_retry for n in refused].count(True) == 3
    final = [n for n in refused if not n.will_retry]
    assert len(final) == 1 and final[0].seq == bad and final[0].code == ErrorCode.UNKNOWN_EVENT
    wire_seqs = [r.seq for r in fake.requests if r.event_name]
    assert wire_seqs == sorted(wire_seqs) and len(set(wire_seqs)) == len(wire_seqs)


async def test_result_errors_reach_the_application() -> None:
    fake = FakeNimbus()
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-range") as client:
                await client.send("sq", 50_000)
                r = await client.receive()
    assert not r.ok and r.error is not None and r.error.code == ErrorCode.OUT_OF_RANGE
    assert client.stats.errors == 1


async def test_second_stream_supersedes_the_first() -> None:
    fake = FakeNimbus()
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-dup") as first:
                async with fast_client(target, "c-dup") as second:
                    with pytest.raises(Superseded):
                        await first.receive()
                    assert isinstance(first.close_reason, Superseded)
                    with pytest.raises(Superseded):
                        await first.send("sq", 1)
                    await second.send("sq", 2)
                    assert (await second.receive()).number == 2
                    assert first.stats.reconnects == 0
    assert fake.streams == 2  # the superseded client did not come back


async def test_unreachable_server_fails_fast() -> None:
    target = f"127.0.0.1:{free_port()}"
    with trio.fail_after(10):
        async with trio_asyncio.open_loop():
            with pytest.raises(ConnectionFailed, match="connection refused"):
                async with open_client([target], "c-none", connect_timeout=0):
                    pytest.fail("must not get here")


async def test_refused_stream_is_reported_not_retried() -> None:
    fake = FakeNimbus(refuse=(Status.PERMISSION_DENIED, "go away"))
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-refused") as client:
                with pytest.raises(StreamRefused, match="PERMISSION_DENIED: go away"):
                    await client.receive()
    assert fake.streams == 0 and len(fake.metadata) == 1


async def test_rotates_to_the_next_target_when_one_is_down() -> None:
    fake = FakeNimbus()
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            down = f"127.0.0.1:{free_port()}"
            async with fast_client([down, target], "c-rotate", connect_timeout=5) as client:
                assert client.target == target
                await client.send("sq", 4)
                assert (await client.receive()).result == 16


async def test_protocol_1_is_the_original_behaviour() -> None:
    fake = FakeNimbus()
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-v1", protocol=1) as client:
                for n in (3, 4):
                    await client.send("sq", n)
                got: list[Result] = []
                await collect(client, 2, got)
    assert [(r.number, r.result, r.delivery_id) for r in got] == [(3, 9, 0), (4, 16, 0)]
    assert "nimbus-protocol" not in fake.metadata[0]
    assert all(r.seq == 0 and r.ack == 0 for r in fake.requests)


async def test_send_waits_while_max_pending_events_are_unreceipted() -> None:
    fake = FakeNimbus()
    fake.reading.clear()
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-pressure", max_pending=3) as client:
                for n in range(1, 4):
                    await client.send("sq", n)
                with trio.move_on_after(0.2) as blocked:
                    await client.send("sq", 4)
                assert blocked.cancelled_caught and client.pending == 3
                fake.reading.set()
                await client.send("sq", 4)
                got: list[Result] = []
                await collect(client, 4, got)
    assert [r.number for r in got] == [1, 2, 3, 4]


async def test_closed_client_refuses_to_send_and_aclose_is_idempotent() -> None:
    fake = FakeNimbus()
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-close") as client:
                await client.send("sq", 2)
                assert (await client.receive()).result == 4
                await client.aclose()
                await client.aclose()
                assert client.closed and not client.connected
                with pytest.raises(ClientClosed):
                    await client.send("sq", 3)
                assert [r async for r in client.results()] == []  # ends quietly once closed
    assert fake.clients["c-close"].acked > 0


async def test_cancellation_from_outside_still_flushes_the_final_ack() -> None:
    # Acks are held back (60 s), so only the graceful close can deliver this one; a timeout or
    # Ctrl-C around the `async with` must not cut the stream before it does.
    fake = FakeNimbus()
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            with trio.CancelScope() as outer:
                async with fast_client(
                    target, "c-cancel", ack_every=10_000, ack_interval=60.0
                ) as client:
                    await client.send("sq", 3)
                    r = await client.receive()
                    outer.cancel()
                    await trio.sleep_forever()
    assert fake.clients["c-cancel"].acked == r.delivery_id


async def test_keepalive_detects_a_silently_dead_link() -> None:
    fake = FakeNimbus()
    with trio.fail_after(15):
        async with (
            trio_asyncio.open_loop(),
            serving(fake) as target,
            trio.open_nursery() as nursery,
        ):
            proxy = FreezingProxy(target)
            via = await nursery.start(proxy.serve)
            async with fast_client(via, "c-silent", keepalive=0.2) as client:
                await client.send("sq", 2)
                assert (await client.receive()).result == 4
                proxy.freeze()
                await client.send("sq", 3)  # into the void: no error, no answer
                r = await client.receive()  # after the unanswered ping ended the stream, resent
                assert r.number == 3 and r.result == 9
                assert client.stats.reconnects == 1 and proxy.connections == 2
            nursery.cancel_scope.cancel()


async def test_without_reconnect_a_lost_stream_fails_the_client() -> None:
    fake = FakeNimbus()
    fake.drop_points = [2]
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-once", reconnect=False) as client:
                await client.send("sq", 5)
                with pytest.raises(ConnectionFailed, match="lost the stream"):
                    while True:
                        await client.receive()
    assert fake.streams == 1


async def test_requires_a_trio_asyncio_loop() -> None:
    with pytest.raises(RuntimeError, match="trio_asyncio.open_loop"):
        async with open_client(["127.0.0.1:1"], "c"):
            pass


async def test_gap_is_told_in_order() -> None:
    # A GAP reaches on_event when the application reaches it among the results.
    fake = FakeNimbus()
    notices: list[Notice] = []
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            async with fast_client(target, "c-gap", on_event=notices.append) as client:
                # The client's stream is open before the server's handler runs.
                conn = await fake.current_stream("c-gap")
                conn.queue.put_nowait(EventResponse(kind=ResponseKind.GAP, gap_from=1, gap_to=5))
                conn.queue.put_nowait(
                    EventResponse(
                        kind=ResponseKind.RESULT, delivery_id=6, event_name="sq", number=2, result=4
                    )
                )
                r = await client.receive()
                assert r.delivery_id == 6 and r.seq is None
                assert [n for n in notices if isinstance(n, Gap)] == [Gap(1, 5, ())]
                assert client.stats.gaps == 1
    assert fake.clients["c-gap"].acked == 6


# =============================================================================================
# CLI
# =============================================================================================


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return await trio.run_process(
        [sys.executable, "-m", "nimbus.client", *args],
        cwd=REPO,
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_cli_unreachable_server_exits_non_zero_with_a_clear_message() -> None:
    target = f"127.0.0.1:{free_port()}"
    with trio.fail_after(30):
        proc = await run_cli(
            "--target", target, "--client_id", "cli-down", "--start", "1", "--end", "3"
        )
    assert proc.returncode == 3
    assert (
        proc.stderr.decode().strip().splitlines()[-1]
        == f"cannot reach Nimbus at {target}: connection refused"
    )


async def test_cli_prints_every_result_and_exits_zero() -> None:
    fake = FakeNimbus()
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            proc = await run_cli(
                "--target", target, "--client_id", "cli-ok", "--start", "1", "--end", "5", "--trace"
            )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [line for line in out.splitlines() if not line.startswith("    ")]
    assert [line.split("  (")[0] for line in lines] == [f"sq({n}) = {n * n}" for n in range(1, 6)]
    assert "fake/t  sq: computed" in out  # --trace
    assert fake.clients["cli-ok"].acked > 0  # acked before exiting


async def test_cli_standby_prints_replayed_results_until_ctrl_c() -> None:
    # --start=0 --end=0 sends nothing; a result of an earlier session, never acked, is replayed.
    fake = FakeNimbus()
    left_over = EventResponse(
        kind=ResponseKind.RESULT, delivery_id=5, event_name="sq", number=7, result=49
    )
    fake.clients["cli-standby"] = _FakeClient(log=[left_over], offset=5)
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), serving(fake) as target:
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "nimbus.client",
                    "--target",
                    target,
                    "--client_id",
                    "cli-standby",
                    "--start=0",
                    "--end=0",
                ],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert proc.stdout is not None
                out = b""
                while b"\n" not in out:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, "the CLI exited before printing the replayed result"
                    out += chunk
                assert (
                    out.decode().splitlines()[0]
                    == "sq(7) = 49  (delivery 5, from an earlier session)"
                )
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == 130  # interrupted, standing by too (--help)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    assert fake.clients["cli-standby"].acked == 5


async def test_cli_refused_and_timeout_exit_codes() -> None:
    with trio.fail_after(30):
        async with trio_asyncio.open_loop():
            async with serving(FakeNimbus(refuse=(Status.PERMISSION_DENIED, "not you"))) as target:
                refused = await run_cli("--target", target, "--start", "1", "--end", "2")
            async with serving(FakeNimbus(hold_results=True)) as target:
                slow = await run_cli(
                    "--target", target, "--start", "1", "--end", "4", "--timeout", "1"
                )
    assert refused.returncode == 4
    assert "PERMISSION_DENIED: not you" in refused.stderr.decode()
    assert slow.returncode == 1
    assert "timed out after 1s: 4 of 4 results missing" in slow.stderr.decode()


async def test_receive_takes_queued_results_fairly_and_a_cancel_loses_none() -> None:
    """receive() takes a queued result without a scheduling round each time, yet other tasks run
    every _YIELD_EVERY results, and a cancelled receive() takes nothing from the queue."""
    from nimbus.client import NimbusClient, Result
    from nimbus.client.connection import _YIELD_EVERY

    c = NimbusClient(["127.0.0.1:1"], "fair", result_buffer=1000)
    for i in range(300):
        c._results_send.send_nowait(Result(0, "sq", i, i * i))
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        ticks = 0
        got = [(await c.receive()).number for _ in range(8 * _YIELD_EVERY)]
        assert got == list(range(8 * _YIELD_EVERY))
        assert 6 <= ticks <= 8 * _YIELD_EVERY // 4, (
            ticks
        )  # ran about every _YIELD_EVERY, not every result
        with trio.CancelScope() as scope:
            scope.cancel()
            await c.receive()
        assert scope.cancelled_caught
        assert (await c.receive()).number == 8 * _YIELD_EVERY
        nursery.cancel_scope.cancel()


async def test_cli_ctrl_c_prints_what_was_sent_and_what_arrived_then_exits_130() -> None:
    """Against a real all-in-one: Ctrl-C midway says how far it got; the same client standing by
    on it gets what was still in flight, and its Ctrl-C says what arrived (standby exits 130 too)."""
    import re

    from tests.test_entrypoints import all_in_one, clean_env

    interrupted = re.compile(
        r"^interrupted after [\d.]+s: sent (\d+) of 100000 events \(last sq\((\d+)\)\), "
        r"(\d+) results? arrived \(last sq\((\d+)\), delivery (\d+)\)$"
    )
    standing = re.compile(
        r"^interrupted after [\d.]+s: standing by \(sends nothing\), (\d+) results? arrived"
        r"( \(last sq\((\d+)\), delivery (\d+)\))?$"
    )

    async def cli(port: int, *args: str) -> trio.Process:
        return await trio.lowlevel.open_process(
            [sys.executable, "-m", "nimbus.client", "--client_id=ctrl-c", "-v", *args]
            + ["--target", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    async def interrupt(proc: trio.Process, ready: bytes, where: str) -> tuple[list[str], str]:
        """Read `where` until `ready` shows, Ctrl-C, then everything to the end."""
        out = {"stdout": b"", "stderr": b""}
        seen = trio.Event()

        async def drain(name: str) -> None:
            stream = getattr(proc, name)
            async for chunk in stream:
                out[name] += chunk
                if name == where and ready in out[name]:
                    seen.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, "stdout")
            nursery.start_soon(drain, "stderr")
            await seen.wait()
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 130, out["stderr"].decode()[-2000:]
        lines = [line for line in out["stderr"].decode().splitlines() if line.strip()]
        return out["stdout"].decode().splitlines(), lines[-1]

    with trio.fail_after(60):
        async with all_in_one() as (port, _):
            sender = await cli(port, "--start=1", "--end=100000", "--rate", "300")
            results, summary = await interrupt(sender, b"sq(50) = 2500", "stdout")
            m = interrupted.match(summary)
            assert m, summary
            sent, last_sent, arrived, last_number, last_delivery = map(int, m.groups())
            assert sent == last_sent and sent >= arrived >= 50
            assert arrived == len(results)
            assert (
                results[-1] == f"sq({last_number}) = {last_number**2}  (delivery {last_delivery})"
            )

            standby = await cli(port, "--start=0", "--end=0")
            later, summary = await interrupt(standby, b"[Connected", "stderr")
            m = standing.match(summary)
            assert m, summary
            assert int(m.group(1)) == len(later)
            # What was in flight at the first Ctrl-C, if anything, is delivered here, in order.
            assert [line.split("  (")[0] for line in later] == [
                f"sq({n}) = {n * n}" for n in range(arrived + 1, arrived + 1 + len(later))
            ]


def test_a_result_before_its_receipt_settles_the_event_and_a_second_copy_is_dropped() -> None:
    """Chaos seed 7459: the pod receipts an event only when its whole produce batch returns; a
    batch held by another partition's failure let the event's result arrive first, then the
    batch failed, the stream ended with UNAVAILABLE, and the library resent the event: the
    server accepted it twice and the application got its result twice (two delivery ids)."""
    led = ClientLedger(2)
    led.on_connected()
    ev = led.add("sq", 90)
    assert led.on_result(451, wire_seq=ev.wire_seq) == (True, ev.seq)
    assert led.settled_by_result and led.pending == 0  # durable: its result exists
    led.on_stream_lost()
    led.on_disconnected()
    _, resend = led.on_connected()
    assert resend == []  # not sent again
    # Had a copy been accepted anyway (resent before the first result came), its result and
    # its receipt are dropped quietly.
    assert led.on_receipt(ev.wire_seq, 452) is None and led.stats.unexpected == 0
    assert led.on_result(452, wire_seq=ev.wire_seq) == (False, None)
    assert led.is_resend_duplicate(452)
    assert led.stats.results == 1 and led.stats.resend_duplicates_dropped == 1
