"""The asyncio side of the client's streams (`_Stream`, `_Dialer`), and `check_target`.

grpclib runs on asyncio; the trio side (nimbus/client/runtime.py) hands requests over through
`_Stream.outbox` and gets responses back on a trio memory channel (see "Threading model" there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeAlias

import h2.exceptions
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from nimbus.client.ledger import OutgoingEvent
from nimbus.client.types import (
    METHOD,
    ConnectionFailed,
    EventRequest,
    EventResponse,
    _single,
    describe_error,
    parse_target,
)
from nimbus.wire import grpc as grpcwire

if TYPE_CHECKING:
    from grpclib.client import Stream as GrpcStream

_WRITE_BATCH_BYTES: Final = 16384  # queued requests written at once, at most
_READ_BATCH: Final = 32  # received responses taken from the stream at once, at most


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


@dataclass(frozen=True, slots=True)
class _Dialer:
    """The asyncio side of every stream of one client: opens it, then reads and writes it.

    `on_written` (protocol 1 only) is told of each event once it is written: with no receipts,
    being written is all the settling such an event gets.
    """

    protocol: int
    metadata: list[tuple[str, str]]
    grpc_config: Configuration | None
    ssl: _ssl.SSLContext | bool | None
    dial_timeout: float
    on_written: Callable[[OutgoingEvent], None] | None

    async def run(self, stream: _Stream, responses: trio.MemorySendChannel[_Inbound]) -> None:
        """One gRPC call: open it, hand `_OPENED` then every response to trio, until it ends."""
        host, port = parse_target(stream.target)
        channel = Channel(host, port, config=self.grpc_config, ssl=self.ssl)
        try:
            call = channel.request(
                METHOD,
                Cardinality.STREAM_STREAM,
                EventRequest,
                EventResponse,
                metadata=self.metadata,
            )
            async with call:
                async with asyncio.timeout(self.dial_timeout):
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
                reader = asyncio.ensure_future(self._reader(call, responses))
                writer = asyncio.ensure_future(self._writer(call, stream))
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
    async def _reader(
        call: GrpcStream[EventRequest, EventResponse], responses: trio.MemorySendChannel[_Inbound]
    ) -> None:
        while True:
            # Every response already received, handed over at once (see nimbus.wire.grpc).
            messages = await grpcwire.client_recv_many(call, _READ_BATCH)
            if not messages:
                return
            await _hand_over(responses, messages)

    async def _writer(self, call: GrpcStream[EventRequest, EventResponse], stream: _Stream) -> None:
        outbox = stream.outbox
        on_written = self.on_written
        try:
            while True:
                while outbox:
                    # Everything queued goes out in one HTTP/2 write (nimbus.wire.grpc).
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
                    if on_written is not None:
                        for event in events:
                            on_written(event)
                if stream.half_close:
                    await call.end()
                    stream.ended = True
                    return
                stream.wake.clear()
                await stream.wake.wait()
        finally:
            stream.writer_done.set()


async def _hand_over(channel: trio.MemorySendChannel[_Inbound], item: _Inbound) -> None:
    """asyncio -> trio without an awaited crossing unless the trio side is behind."""
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        await trio_asyncio.trio_as_aio(channel.send)(item)


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
            failed = await _tls_handshake(tls, target, timeout)
            if failed is not None:
                return failed
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
        return _not_http2(target, data, closed, tls=bool(ssl), timeout=timeout)
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def _tls_handshake(
    tls: trio.SSLStream[trio.SocketStream], target: str, timeout: float
) -> str | None:
    """None once the handshake is done, else why it failed, in words for a person."""
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
    return None


def _not_http2(target: str, data: bytes, closed: bool, *, tls: bool, timeout: float) -> str:
    """Why `target`, which answered the HTTP/2 preface with `data` (then closed the connection,
    or not), is no gRPC server: in words for a person."""
    first_line = data.split(b"\n", 1)[0].strip().decode("latin-1")[:60]
    if data.startswith(b"HTTP/") or data.lstrip().startswith(b"<"):
        return (
            f"{target} does not speak gRPC/HTTP2: it answered in HTTP/1 ({first_line!r}), "
            "a web server? check --target"
        )
    if data[:1] in (b"\x15", b"\x16") and not tls:  # a TLS alert or handshake record
        return f"{target} does not speak gRPC/HTTP2 in the clear: it answered in TLS; use --tls"
    if data and first_line.isprintable():
        return f"{target} does not speak gRPC/HTTP2: it answered {first_line!r}; check --target"
    if data:
        return f"{target} does not speak gRPC/HTTP2: it answered {data[:16]!r}; check --target"
    if closed:
        return (
            f"{target} does not speak gRPC/HTTP2: it closed the connection without an "
            f"HTTP/2 answer; check --target{'' if tls else ' (and --tls for a TLS server)'}"
        )
    return (
        f"{target} does not speak gRPC/HTTP2: no HTTP/2 answer within {timeout:g}s; check --target"
    )
