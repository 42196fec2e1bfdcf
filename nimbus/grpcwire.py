"""Several gRPC messages in one HTTP/2 write (server and client side of grpclib).

grpclib's `send_message` writes each message on its own: a DATA frame, a socket write (a syscall)
and a wake-up of the event loop per message. A stream that has several messages queued (a burst
of results, a receipt and a result, a replay window) can frame them all and write them at once:
gRPC's length-prefixed messages may share DATA frames, and any gRPC peer reads them the same way.

Only grpclib's public per-message bookkeeping is repeated here (initial metadata or request sent
first, the message counters); the framing is gRPC's: a 0 byte (not compressed), a 4-byte
big-endian length, the encoded message.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import Any

from grpclib.exceptions import ProtocolError

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


def _count(stream: Any, n: int) -> None:
    stream._send_message_done = True  # noqa: SLF001 - grpclib's own bookkeeping
    stream._messages_sent += n  # noqa: SLF001
    conn = stream._stream.connection  # noqa: SLF001
    conn.messages_sent += n
    conn.last_message_sent = time.monotonic()


async def server_send(stream: Any, data: bytes, n: int) -> None:
    """Write `n` framed messages (`frame(...)`) on a grpclib server stream."""
    if not stream._send_initial_metadata_done:  # noqa: SLF001
        await stream.send_initial_metadata()
    await stream._stream.send_data(data)  # noqa: SLF001
    _count(stream, n)


async def client_send(call: Any, data: bytes, n: int) -> None:
    """Write `n` framed messages on a grpclib client stream (a bidi call)."""
    if not call._send_request_done:  # noqa: SLF001
        await call.send_request()
    if call._end_done:  # noqa: SLF001
        raise ProtocolError("Stream is ended")
    with call._wrapper:  # noqa: SLF001 - turns h2 errors into grpclib's
        await call._stream.send_data(data)  # noqa: SLF001
    _count(call, n)
