"""`NimbusClient` and `open_client`: the I/O around the ledger (nimbus/client/ledger.py).

One gRPC stream at a time, reconnected with jittered exponential backoff (optionally rotating
through several pods), results handed to the application exactly once and in delivery-id order.

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

Backpressure: `send()` waits while `max_pending` events are unreceipted; results wait in a bounded
buffer of `result_buffer`; when that is full the stream stops reading, and gRPC flow control pushes
back on the server. Receipts travel on the same stream as results, so an application must read
results concurrently with sending, or `send()` eventually blocks for good.
"""

from __future__ import annotations

import contextlib
import random
import ssl as _ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio
import trio_asyncio
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError
from loguru import logger

from nimbus.core.channels import receive_batch
from nimbus.proto_gen.nimbus import (
    ErrorCode,
    EventError,
)
from nimbus.wire import messages as wire

if TYPE_CHECKING:
    pass

from nimbus.client.ledger import ClientLedger, OutgoingEvent
from nimbus.client.transport import _STREAM_ERRORS, _Dialer, _Inbound, _Opened, _Stream
from nimbus.client.types import (
    INT32_MAX,
    INT32_MIN,
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
    _metadata_value_ok,
    _single,
    _Skip,
    backoff_delay,
    classify_stream_end,
    describe_error,
    parse_target,
)

_YIELD_EVERY: Final = 32  # results handed to the application between two full checkpoints


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """Every keyword option of `open_client()` / `NimbusClient`, with its default.

    - protocol: 2 (receipts, delivery ids, acks) or 1 (the original client's behaviour).
    - reconnect: after an established stream is lost, open another (backoff: (first, max)
      seconds, exponential, jittered). With False, the client fails with `ConnectionFailed`.
    - rotate: after a failure move to the next target (False: stay on the current one).
    - on_event: called synchronously with `Connected`, `Disconnected`, `Receipted`, `Refused`
      and `Gap` notices (a `Gap` when the application reaches it in the results).
    - connect_timeout: seconds to open the first stream (0: one attempt per target; None: keep
      trying) before `ConnectionFailed`.
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

    protocol: int = 2
    reconnect: bool = True
    backoff: tuple[float, float] = (0.05, 2.0)
    rotate: bool = True
    on_event: Callable[[Notice], None] | None = None
    connect_timeout: float | None = 10.0
    max_pending: int = 1000
    result_buffer: int = 1000
    ack_every: int = 100
    ack_interval: float = 0.005
    dial_timeout: float = 5.0
    keepalive: float | None = 30.0
    close_timeout: float = 2.0
    close_linger: float = 0.05
    token: str | None = None
    ssl: _ssl.SSLContext | bool | None = None


def _options(options: ClientOptions | None, kw: dict[str, Any]) -> ClientOptions:
    """`options`, or the keyword arguments made into one (not both)."""
    if options is None:
        return ClientOptions(**kw)
    if kw:
        raise TypeError(f"pass either options= or keyword options, not both (got {sorted(kw)})")
    return options


class NimbusClient:
    """A Nimbus client. Create it with `open_client()`, which runs its tasks and closes it.

    Options: `options=ClientOptions(...)`, or the same names as keyword arguments.
    """

    def __init__(
        self,
        targets: Sequence[str],
        client_id: str,
        *,
        options: ClientOptions | None = None,
        **kw: Any,
    ) -> None:
        opts = _options(options, kw)
        _check_arguments(targets, client_id, opts)
        if isinstance(targets, str):
            targets = [targets]
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
        self._received_unyielded = 0  # results taken since the last full checkpoint (see receive)
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

    def _forget_written(self, ev: OutgoingEvent) -> None:
        """Protocol 1: an event written is settled (there are no receipts)."""
        if self._ledger.on_written(ev):
            self._capacity_freed()

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


def _error_code(code: int) -> ErrorCode | int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code  # a code newer than this library: passed through as the number


def _public_error(error: wire.EventError) -> EventError:
    return EventError(code=_error_code(error.code), message=error.message)


@contextlib.asynccontextmanager
async def open_client(
    targets: Sequence[str],
    client_id: str,
    *,
    options: ClientOptions | None = None,
    **kw: Any,
) -> AsyncIterator[NimbusClient]:
    """Connect to Nimbus and yield a `NimbusClient`; close it (flushing the ack) on exit.

    Must run inside `async with trio_asyncio.open_loop():` (grpclib is asyncio).

    - targets: "host:port" of one or more pods. The first stream goes to targets[0]; after a
      failure the client moves to the next target (`rotate=False`: stays on the current one).
    - options: a `ClientOptions`, or its fields as keyword arguments (`protocol=1`,
      `token=...`, ...; see `ClientOptions` for each and its default).
    - Returns once the first stream is open. If no stream can be opened within
      `connect_timeout` seconds (0: one attempt per target; None: keep trying), raises
      `ConnectionFailed`. A server that accepts the connection and then refuses the stream
      (INVALID_ARGUMENT, PERMISSION_DENIED, ...) surfaces as `StreamRefused` from `send()`,
      `receive()` and `results()`; a newer stream with the same client_id as `Superseded`.
    """
    if trio_asyncio.current_loop.get() is None:
        raise RuntimeError(
            "open_client() must run inside `async with trio_asyncio.open_loop():` (grpclib runs on asyncio)"
        )
    client = NimbusClient(targets, client_id, options=_options(options, kw))
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


def _check_arguments(targets: Sequence[str], client_id: str, opts: ClientOptions) -> None:
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("at least one target (host:port) is required")
    for t in targets:
        parse_target(t)
    if not client_id:
        raise ValueError("client_id must not be empty")
    if not _metadata_value_ok(client_id):
        raise ValueError(f"client_id must be printable ASCII (gRPC metadata), got {client_id!r}")
    if opts.token is not None and not _metadata_value_ok(opts.token):
        raise ValueError("token must be printable ASCII (gRPC metadata)")
    if opts.max_pending < 1 or opts.result_buffer < 1:
        raise ValueError("max_pending and result_buffer must be >= 1")


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
