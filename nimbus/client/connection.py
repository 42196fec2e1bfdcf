"""`NimbusClient` and `open_client`: the I/O around the ledger (nimbus/client/ledger.py).

One gRPC stream at a time, reconnected with jittered exponential backoff (optionally rotating
through several pods), results handed to the application exactly once and in delivery-id order.
Its state and its tasks (the stream supervisor, the reader, the ack and retry loops) are
`ClientRuntime` (nimbus/client/runtime.py, which also tells the threading model), which
`NimbusClient` derives from; this module is the public API around them.

Backpressure: `send()` waits while `max_pending` events are unreceipted; results wait in a bounded
buffer of `result_buffer`; when that is full the stream stops reading, and gRPC flow control pushes
back on the server. Receipts travel on the same stream as results, so an application must read
results concurrently with sending, or `send()` eventually blocks for good.
"""

from __future__ import annotations

import contextlib
import ssl as _ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio
import trio_asyncio

from nimbus.client.runtime import ClientRuntime
from nimbus.client.types import (
    INT32_MAX,
    INT32_MIN,
    ClientClosed,
    Gap,
    NimbusError,
    Notice,
    Result,
    _metadata_value_ok,
    _single,
    _Skip,
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


class NimbusClient(ClientRuntime):
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
        super().__init__(targets, client_id, opts)

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
            await self._wait_capacity()
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
            await self._wait_capacity()

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

    async def _wait_capacity(self) -> None:
        """Until an event settles or the state changes (raises if the client is closed)."""
        self._raise_if_closed()
        self._capacity_waiters += 1
        try:
            await self._capacity_event.wait()
        finally:
            self._capacity_waiters -= 1

    def _consumed(self, delivery_id: int) -> None:
        if self._ledger.consumed(delivery_id, trio.current_time()):
            self._ack_wake.set()


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
