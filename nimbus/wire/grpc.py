"""Every use Nimbus makes of grpclib's and trio-asyncio's internals, in one place, checked against
the versions in `CHECKED` (pyproject.toml pins the same ranges). Importing this module refuses an
installed version outside them: see `check_versions`.

- Batched writes (`server_send`, `client_send`): several gRPC messages in one HTTP/2 write.
  grpclib's `send_message` writes each message on its own (a DATA frame, a socket write and a
  loop wake-up each); a stream with several messages queued frames them all and writes them at
  once. gRPC's length-prefixed messages may share DATA frames; any peer reads them the same way.
- Batched reads (`client_recv_many`): a client stream's receive buffer often holds many messages;
  the first comes through grpclib's `recv_message`, every further whole one is cut from the
  buffer's bytes taken at once, without grpclib's per-message wrapper, reads and wake-ups.
- Flow control seen from a server stream (`h2_stream`, `writable`, `wait_writable`): whether a
  write would wait for the client's window, so the doorman can cut a stream that stopped reading
  with a status instead of half a message.
- Lighter idle streams (`slim_grpclib_streams`): grpclib creates list-backed Events and Queues.
- The bound port of a started server (`bound_port`).
- Connection hooks for the port's edge (`HookedH2Protocol`, `HookedServer`): protocol errors,
  the client's SETTINGS, open streams, closing with a GOAWAY; nimbus.doorman.edge sets the policy.
- trio-asyncio runs several ready asyncio callbacks per trio round (`batch_asyncio_callbacks`).

Only grpclib's per-message bookkeeping (and its receive buffer's) is repeated here; the framing
is gRPC's: a 0 byte (not compressed), a 4-byte big-endian length, the encoded message. Each part
below names what it relies on; a new grpclib or trio-asyncio is checked against those lists
before `CHECKED` and the pins in pyproject.toml are widened.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpclib
import grpclib.protocol
import h2.exceptions
import trio
import trio_asyncio
from grpclib.exceptions import ProtocolError
from grpclib.protocol import AckedData, H2Protocol
from grpclib.server import Server
from h2.events import RemoteSettingsChanged

# The versions every part of this module was read against: [lowest, first not checked). The same
# ranges as the pins in pyproject.toml (tests/test_grpcwire.py holds them equal).
CHECKED: dict[str, tuple[str, str]] = {
    "grpclib": ("0.4.7", "0.4.10"),
    "trio-asyncio": ("0.15", "0.17"),
}


class UnsupportedDependency(RuntimeError):
    """An installed grpclib or trio-asyncio outside the versions this module was checked against."""


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string ("0.4.9rc1" -> (0, 4, 9))."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in m.group().split(".")) if m else ()


def installed_versions() -> dict[str, str]:
    """The versions of the modules actually imported (not the metadata of whatever pip saw)."""
    return {"grpclib": grpclib.__version__, "trio-asyncio": trio_asyncio.__version__}


def check_versions(installed: Mapping[str, str]) -> None:
    """Raise UnsupportedDependency unless every package in `installed` is in its CHECKED range.

    Refused rather than warned about: these parts fail silently when an internal changes meaning
    (flow-control credit not given back stalls streams; counters drift) rather than with an
    error, a warning at start is one line among many, and only a deliberate override of the pins
    gets here. The way out is to check the parts below against the new version and widen the
    range here and in pyproject.toml."""
    wrong = []
    for name, version in installed.items():
        low, high = CHECKED[name]
        if not _release(low) <= _release(version) < _release(high):
            wrong.append(f"{name} {version} (checked: >={low},<{high})")
    if wrong:
        raise UnsupportedDependency(
            "nimbus.wire.grpc relies on internals of "
            + ", ".join(wrong)
            + "; install the checked versions (pyproject.toml pins them), or check the parts of"
            " nimbus/wire/grpc.py against the installed version and widen CHECKED and the pins"
        )


check_versions(installed_versions())

_HEADER = struct.Struct(">?I")


def frame(payloads: Iterable[bytes]) -> bytes:
    """The gRPC wire form of encoded messages, back to back."""
    out = bytearray()
    for p in payloads:
        out += _HEADER.pack(False, len(p))
        out += p
    return bytes(out)


def framed_size(payload_len: int) -> int:
    return payload_len + _HEADER.size


# Batched writes. Checked: grpclib 0.4.7-0.4.9. Relies on grpclib.server.Stream's
# `_send_initial_metadata_done`, `_send_message_done`, `_messages_sent` and `_stream` (the
# grpclib.protocol.Stream, whose `send_data` splits into DATA frames and waits for flow control);
# grpclib.client.Stream's `_send_request_done`, `_end_done`, `_wrapper`, `_messages_sent` and
# `_stream`; the protocol Connection's `messages_sent` and `last_message_sent` (channelz).


def _count(stream: Any, n: int) -> None:
    stream._send_message_done = True
    stream._messages_sent += n
    conn = stream._stream.connection
    conn.messages_sent += n
    conn.last_message_sent = time.monotonic()


async def server_send(stream: Any, data: bytes, n: int) -> None:
    """Write `n` framed messages (`frame(...)`) on a grpclib server stream."""
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    await stream._stream.send_data(data)
    _count(stream, n)


async def client_send(call: Any, data: bytes, n: int) -> None:
    """Write `n` framed messages on a grpclib client stream (a bidi call)."""
    if not call._send_request_done:
        await call.send_request()
    if call._end_done:
        raise ProtocolError("Stream is ended")
    with call._wrapper:
        await call._stream.send_data(data)
    _count(call, n)


# Batched reads. Checked: grpclib 0.4.7-0.4.9. Relies on grpclib.protocol.Buffer: `_unacked` (an
# asyncio Queue of UnackedData(data, data_size, ack_size), the end of the stream an item with
# ack_size 0), `_acked` (a deque of AckedData(memoryview, size)), `_acked_size` and
# `_ack_callback` (gives flow-control credit back), as its `read` uses them; on the client
# Stream's `_stream.buffer`, `_recv_type`, `_wrapper` and `_messages_received`, and the
# Connection's `messages_received` and `last_message_received`.


def _take_received(buffer: Any) -> bytes:
    """Every byte a stream's receive buffer (grpclib.protocol.Buffer) holds, taken at once, with
    the flow-control credit given back as its `read` gives it. Stops at the end of the stream
    (its marker taken as `read` takes it: the buffer then reads as ended once empty)."""
    unacked = buffer._unacked
    while not unacked.empty():
        data, data_size, ack_size = unacked.get_nowait()
        if not ack_size:
            break  # the end-of-stream marker
        buffer._acked.append(AckedData(memoryview(data), data_size))
        buffer._acked_size += data_size
        buffer._ack_callback(ack_size)
    chunks = buffer._acked
    data = b"".join(c.data for c in chunks)
    chunks.clear()
    buffer._acked_size = 0
    return data


def _give_back(buffer: Any, rest: bytes) -> None:
    """Put bytes taken by _take_received and not used back at the front of the buffer."""
    buffer._acked.appendleft(AckedData(memoryview(rest), len(rest)))
    buffer._acked_size += len(rest)


async def client_recv_many(call: Any, limit: int) -> list[Any]:
    """The next message of a grpclib client stream and up to `limit - 1` more already received
    (whole, in the stream's buffer); [] at the end of the stream.

    The first comes through grpclib's `recv_message` (it may wait, and handles the headers);
    the rest are cut from the buffer's bytes taken at once (~3 µs a message less than two
    `Buffer.read` calls each: a memoryview slice, a tuple and a join per read). A message not
    all there yet is put back for the next call."""
    first = await call.recv_message()
    if first is None:
        return []
    out = [first]
    stream = call._stream
    buffer = stream.buffer
    if limit > 1 and (buffer._acked_size or buffer._unacked.qsize()):
        decode = call._recv_type.FromString
        with call._wrapper:
            data = _take_received(buffer)
            pos, n = 0, len(data)
            unpack = _HEADER.unpack_from
            while len(out) < limit and pos + 5 <= n:
                compressed, size = unpack(data, pos)
                end = pos + 5 + size
                if end > n:
                    break
                if compressed:
                    raise NotImplementedError("Compression not implemented")
                out.append(decode(data[pos + 5 : end]))
                pos = end
            if pos < n:
                _give_back(buffer, data[pos:])
    n_more = len(out) - 1
    if n_more:
        call._messages_received += n_more
        stream.connection.messages_received += n_more
        stream.connection.last_message_received = time.monotonic()
    return out


# Flow control seen from a server stream. Checked: grpclib 0.4.7-0.4.9. Relies on
# grpclib.server.Stream's `_stream` (the grpclib.protocol.Stream), and on that stream's `id`,
# `buffer` (the Buffer above, read with its `read`), `window_updated` (an asyncio Event set when
# the client grants window), `_h2_connection` (h2's H2Connection) and `connection.write_ready`
# (an asyncio Event, clear while the transport's buffer is full).


def h2_stream(stream: Any) -> Any:
    """The grpclib.protocol.Stream (HTTP/2 stream) under a grpclib server Stream."""
    return stream._stream


def writable(h2: Any, size: int) -> bool:
    """Could `size` bytes of DATA go out on `h2` now, without waiting for the client's flow
    control?"""
    try:
        return bool(
            h2.connection.write_ready.is_set()
            and h2._h2_connection.local_flow_control_window(h2.id) >= size
        )
    except Exception:
        return True  # a closed stream: let send_message report it


async def wait_writable(h2: Any, size: int, give_up: Callable[[], bool]) -> bool:
    """True once `size` bytes can be written on `h2`; False as soon as `give_up()` is true
    (looked at again every 0.1 s while waiting)."""
    while not writable(h2, size):
        if give_up():
            return False
        if not h2.connection.write_ready.is_set():
            waiting = h2.connection.write_ready.wait()
        else:
            h2.window_updated.clear()
            waiting = h2.window_updated.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiting, 0.1)
    return True


# Lighter idle streams. Checked: grpclib 0.4.7-0.4.9. Relies on grpclib.protocol creating every
# stream's Events (window_updated, headers_received, trailers_received) and its Buffer's Queue
# through its module globals `Event` and `Queue` (`from asyncio import Event, Queue`), looked up
# when each stream is made; and on asyncio's Event and Queue (Python 3.11) keeping their waiters
# in `_waiters`, `_getters`, `_putters` (used with append, remove, popleft, iteration) and the
# join event in `_finished`.


class _Waiters(list):  # type: ignore[type-arg]
    """A list with a deque's `popleft`, for asyncio's waiting futures: a stream has at most one
    or two, and an empty list is 56 bytes where a deque is 760 (with its block)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class _ListEvent(asyncio.Event):
    """asyncio.Event with its waiters in a `_Waiters` list instead of a deque. Same methods and
    behaviour (waiters are appended, removed and woken in order either way)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters = _Waiters()  # type: ignore[assignment]


class _SlimQueue(asyncio.Queue):  # type: ignore[type-arg]
    """asyncio.Queue with its getters, putters and `join` event in lists instead of deques (the
    items stay in a deque). Same methods and behaviour."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._getters = _Waiters()
        self._putters = _Waiters()
        finished = _ListEvent()
        finished.set()  # as asyncio.Queue: no unfinished tasks
        self._finished = finished


def slim_grpclib_streams() -> None:
    """grpclib gives every HTTP/2 stream three asyncio.Events (window_updated, headers_received,
    trailers_received) and an asyncio.Queue (its receive buffer): seven deques, ~5 KB, most of
    an idle stream's own memory (issue #4: 10,000 idle streams on one pod). Make grpclib create
    `_ListEvent` and `_SlimQueue` instead (~2 KB less per stream; idempotent)."""
    grpclib.protocol.Event = _ListEvent  # type: ignore[attr-defined]
    grpclib.protocol.Queue = _SlimQueue  # type: ignore[attr-defined]


# Checked: grpclib 0.4.7-0.4.9. Relies on grpclib.server.Server's `_server`: the asyncio.Server
# its `start` made (an object without `sockets` under grpclib.testing.ChannelFor).


def bound_port(server: Any, default: int) -> int:
    """The port a started grpclib Server listens on (`default` when it has no socket)."""
    sockets = getattr(server._server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else default


# Connection hooks for the gRPC port's edge (nimbus.doorman.edge). Checked: grpclib 0.4.7-0.4.9.
# Relies on grpclib.protocol.H2Protocol: `__init__(handler, config, h2_config)` kept as the
# attributes of those names; `connection` (a grpclib Connection: `feed(data)` returns h2's
# events, `flush()` writes what h2 has to send, `_connection` is h2's H2Connection);
# `processor` (`process(event)`, `close(reason)`, `streams`); and its `data_received` being feed,
# flush, process each event, flush. On grpclib.server.Server making every connection's
# H2Protocol in `_protocol_factory()`.


class HookedH2Protocol(H2Protocol):
    """grpclib's connection protocol, with what the edge needs: bytes h2 cannot parse go to
    `on_protocol_error` (grpclib would end the streams and keep the socket), `settled` once the
    client's SETTINGS arrived, `has_streams()` and `close_connection()`."""

    def __init__(self, handler: Any, config: Any, h2_config: Any) -> None:
        super().__init__(handler, config, h2_config)
        self.settled = False  # the client's preface and SETTINGS arrived

    def on_protocol_error(self, error: h2.exceptions.ProtocolError) -> None:
        self.processor.close("Protocol error")  # grpclib's own answer

    def data_received(self, data: bytes) -> None:
        try:
            events = self.connection.feed(data)
        except h2.exceptions.ProtocolError as e:
            self.on_protocol_error(e)
            return
        if not self.settled and any(isinstance(ev, RemoteSettingsChanged) for ev in events):
            self.settled = True
        self.connection.flush()
        for event in events:
            self.processor.process(event)
        self.connection.flush()

    def has_streams(self) -> bool:
        return bool(getattr(self.processor, "streams", None))

    def close_connection(self, transport: Any, *, goaway: bool) -> None:
        """Send what h2 has to send (a GOAWAY: ours when `goaway`, or the one a protocol error
        prepared), then end the connection's streams and close `transport`."""
        h2_conn = getattr(self.connection, "_connection", None)
        try:
            if goaway and h2_conn is not None:
                h2_conn.close_connection()
            if h2_conn is not None and transport is not None and not transport.is_closing():
                data = h2_conn.data_to_send()
                if data:
                    transport.write(data)
        except Exception:
            pass
        self.processor.close("Connection closed by the server")
        if transport is not None:
            transport.close()


class HookedServer(Server):
    """grpclib's Server whose connections are made by `make_protocol(handler, config,
    h2_config)` (an H2Protocol, a HookedH2Protocol for the edge)."""

    def __init__(self, handlers: Any, make_protocol: Callable[..., H2Protocol]) -> None:
        super().__init__(handlers)
        self._make_protocol = make_protocol

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()
        return self._make_protocol(plain.handler, plain.config, plain.h2_config)


# Batched asyncio callbacks. Checked: trio-asyncio 0.15.0-0.16.0. Relies on
# trio_asyncio._base.BaseTrioEventLoop: `_main_loop` calls `self._main_loop_one()` until
# `self._stopped` (a trio.Event) is set; `_main_loop_one(no_wait=True)` runs the next due timer or
# queued callback, or raises trio.WouldBlock when there is none (as `_main_loop_exit` drains).

ASYNCIO_BATCH = 64  # ready asyncio callbacks run per trio scheduling round, at most


def batch_asyncio_callbacks(limit: int = ASYNCIO_BATCH) -> None:
    """Let trio-asyncio run up to `limit` ready asyncio callbacks per trio scheduling round.

    trio-asyncio runs asyncio's callbacks (grpclib's and redis.asyncio's protocol events, future
    and task steps) from one trio task, one callback per `await` of its queue: every callback
    costs a whole trio scheduling round, ~8 µs of CPU on this machine (a channel item taken with
    a round: ~9.5 µs, without: ~1.2). After the first callback (taken as trio-asyncio does:
    waiting, timers first), the ones already queued run at once; a timer that falls due, an
    asyncio-to-trio task start (which awaits) and the limit end the batch, so trio's own tasks
    still run at least every `limit` callbacks. Idempotent; the process's loops only."""
    from trio_asyncio._base import BaseTrioEventLoop

    one = BaseTrioEventLoop._main_loop_one
    if getattr(one, "_nimbus_batched", False):
        return

    async def main_loop_batch(self: Any, no_wait: bool = False) -> None:
        await one(self, no_wait)
        for _ in range(limit - 1):
            if self._stopped.is_set():
                return
            try:
                # no_wait: the next ready callback or due timer, else WouldBlock
                await one(self, True)
            except trio.WouldBlock:
                return

    main_loop_batch._nimbus_batched = True  # type: ignore[attr-defined]
    BaseTrioEventLoop._main_loop_one = main_loop_batch
