"""`ClientRuntime`: the state and the tasks of a client (nimbus/client/connection.py's
`NimbusClient` is its public face): the supervisor that opens one gRPC stream after the other
(backoff, rotation through the targets), the reader that applies each response to the ledger
(nimbus/client/ledger.py) and hands results to the application, the ack and retry loops, and the
graceful end.

Wire messages: the stream is encoded and decoded with protobuf's upb classes (nimbus/wire/messages.py),
~200x cheaper per message than betterproto's here (which dominated a load generator's CPU). The
public types stay betterproto's: `Result.error` is converted when a result carries one, and
`Result.log` (the trace) is decoded only when the application reads it.

Threading model: grpclib is asyncio, so the library runs inside trio-asyncio and every call must
happen under `async with trio_asyncio.open_loop():` (the CLI opens it itself). Crossing between
trio and asyncio costs ~50-70 us per awaited call, so the per-message paths never await across:
the asyncio reader hands responses to trio with `MemorySendChannel.send_nowait()` (awaiting only
when the channel is full), and trio hands requests to the asyncio writer through a plain deque plus
`asyncio.Event.set()`, both synchronous (same thread).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio
import trio_asyncio
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError
from loguru import logger

from nimbus.client.ledger import ClientLedger, OutgoingEvent
from nimbus.client.transport import _STREAM_ERRORS, _Dialer, _Inbound, _Opened, _Stream
from nimbus.client.types import (
    PROTOCOL_KEY,
    ClientClosed,
    Connected,
    ConnectionFailed,
    Disconnected,
    EventRequest,
    EventResponse,
    Gap,
    NimbusError,
    Notice,
    Receipted,
    Refused,
    Result,
    StreamEnd,
    StreamRefused,
    Superseded,
    _Skip,
    backoff_delay,
    classify_stream_end,
    describe_error,
)
from nimbus.core.channels import receive_batch
from nimbus.proto_gen.nimbus import ErrorCode, EventError
from nimbus.wire import messages as wire

if TYPE_CHECKING:
    from nimbus.client.connection import ClientOptions


class _Wakeup:
    """A trio.Event to wait on again and again: a wait that it ended re-arms it."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, deadline: float = math.inf) -> None:
        """Until set, or until `deadline` (trio clock)."""
        with trio.move_on_at(deadline):
            await self._event.wait()
        if self._event.is_set():
            self._event = trio.Event()


class ClientRuntime:
    """What a `NimbusClient` runs on: its state, and the tasks `_run` starts (see the module
    docstring). Created by NimbusClient, with arguments it has checked."""

    def __init__(self, targets: Sequence[str], client_id: str, opts: ClientOptions) -> None:
        self.options = opts
        self.client_id = client_id
        self.protocol = opts.protocol
        self._targets = list(dict.fromkeys(targets))
        self._target_index = 0
        self._reconnect = opts.reconnect
        self._backoff = opts.backoff
        self._rotate = opts.rotate
        self._on_event = opts.on_event
        self._connect_timeout = opts.connect_timeout
        self._max_pending = opts.max_pending
        self._close_timeout = opts.close_timeout
        self._close_linger = opts.close_linger
        self._ledger = ClientLedger(
            opts.protocol,
            ack_every=opts.ack_every,
            ack_interval=opts.ack_interval,
            retry_backoff=opts.backoff,
        )
        self.stats = self._ledger.stats
        self._dialer = _Dialer(
            protocol=opts.protocol,
            metadata=_stream_metadata(client_id, opts),
            grpc_config=_grpc_config(opts.keepalive),
            ssl=opts.ssl,
            dial_timeout=opts.dial_timeout,
            on_written=self._forget_written if opts.protocol == 1 else None,
        )
        self._received_unyielded = (
            0  # results taken since the last full checkpoint (see NimbusClient.receive)
        )
        # Results (and gaps, so they reach the application in order) waiting for the application.
        self._results_send, self._results_recv = trio.open_memory_channel[Result | Gap | _Skip](
            opts.result_buffer
        )
        self._stream_buffer = (
            16  # reads (of up to _READ_BATCH responses) between the asyncio reader and trio
        )
        self._stream: _Stream | None = None
        self._ever_opened = False
        self._first_open = trio.Event()
        self._state_event = trio.Event()
        self._ack_wake = _Wakeup()
        self._retry_wake = _Wakeup()
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

    # --- state ------------------------------------------------------------------------------

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

    def _forget_written(self, ev: OutgoingEvent) -> None:
        """Protocol 1: an event written is settled (there are no receipts)."""
        if self._ledger.on_written(ev):
            self._capacity_freed()

    def _capacity_freed(self) -> None:
        if self._capacity_waiters:
            self._capacity_event.set()
            self._capacity_event = trio.Event()

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

    # --- tasks ------------------------------------------------------------------------------

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
            stream = _Stream(self._targets[self._target_index])
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
                    await trio_asyncio.aio_as_trio(self._dialer.run)(stream, send_channel)
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
        await self._when_due(self._ack_wake, self._ledger.ack_deadline, self._send_ack)

    def _send_ack(self) -> None:
        self._enqueue_ack(self._ledger.take_ack())

    async def _retry_loop(self) -> None:
        """Retransmit events refused with UNAVAILABLE once their backoff has passed."""
        await self._when_due(self._retry_wake, self._ledger.next_retry_at, self._retry_due)

    def _retry_due(self) -> None:
        for ev in self._ledger.due_retries(trio.current_time()):
            self._write_event(ev)

    async def _when_due(
        self, wake: _Wakeup, due: Callable[[], float | None], act: Callable[[], None]
    ) -> None:
        """Forever: call `act` once the time `due()` gives (trio clock; None: nothing due) has
        come while a stream is open. Before that time: asleep until it, or until `wake`; with
        nothing due or no stream, until `wake` (on_connected() repeats the ack on the next one)."""
        while True:
            at = due()
            if at is None or not self._ledger.is_writable:
                await wake.wait()
                continue
            if trio.current_time() < at:
                await wake.wait(at)
                continue
            act()

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


def _error_code(code: int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code  # a code newer than this library: passed through as the number


def _public_error(error: wire.EventError) -> EventError:
    return EventError(code=_error_code(error.code), message=error.message)


def _stream_metadata(client_id: str, opts: ClientOptions) -> list[tuple[str, str]]:
    metadata = [("client_id", client_id)]
    if opts.protocol == 2:
        metadata.append((PROTOCOL_KEY, "2"))
    if opts.token:
        metadata.append(("authorization", f"Bearer {opts.token}"))
    return metadata


def _grpc_config(keepalive: float | None) -> Configuration | None:
    if keepalive is None:
        return None
    # A link that died silently (NAT timeout, a phone losing signal) sends no FIN or RST: only
    # an unanswered HTTP/2 PING reveals it. grpclib's defaults never ping from a client and allow
    # one ping per 300 s without data, which a standby client never sends.
    return Configuration(
        _keepalive_time=keepalive,
        _keepalive_timeout=min(20.0, keepalive),
        _http2_min_sent_ping_interval_without_data=keepalive,
        _http2_max_pings_without_data=0,
    )
