"""A raw HTTP/2 gRPC client for fuzzing the edge (h2 over a trio socket, no gRPC library).

It sends exactly the headers and DATA frames it is given — any bytes, any length prefix, any
content-type — and reports what the server answered, or that the connection failed. Nothing here
validates anything: that is the point.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

PATH = b"/nimbus.NimbusService/ProcessEvent"


def frame(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """One gRPC length-prefixed message; `length` overrides the real length (a lie)."""
    n = len(payload) if length is None else length
    return struct.pack(">?I", compressed, n & 0xFFFFFFFF) + payload


def headers(
    metadata: list[tuple[bytes, bytes]], *, content_type: bytes = b"application/grpc"
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", PATH),
        (b":authority", b"127.0.0.1"),
        (b"content-type", content_type),
        (b"te", b"trailers"),
        *metadata,
    ]


@dataclass
class Answer:
    """What came back on the stream (fields stay empty if nothing did)."""

    http_status: bytes = b""
    grpc_status: bytes = b""
    grpc_message: bytes = b""
    data: bytes = b""
    ended: bool = False
    reset: int | None = None
    connection_error: str = ""
    events: list[str] = field(default_factory=list)


async def call(
    port: int,
    hdrs: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    *,
    end_stream: bool = True,
    wait: float = 0.5,
    host: str = "127.0.0.1",
    ssl_context: ssl.SSLContext | None = None,
) -> Answer:
    """One stream on a fresh connection: HEADERS, then each chunk as a DATA frame; read the answer
    for up to `wait` seconds after sending, then close the connection (as a client that gives up)."""
    ans = Answer()
    cfg = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=cfg)
    sock: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["h2"])
        sock = trio.SSLStream(sock, ssl_context, server_hostname=host)
    try:
        conn.initiate_connection()
        conn.send_headers(1, hdrs, end_stream=end_stream and not chunks)
        await sock.send_all(conn.data_to_send())
        for i, chunk in enumerate(chunks):
            last = end_stream and i == len(chunks) - 1
            # Respect the peer's flow-control window: a fuzzer that ignores it is only refused.
            view = memoryview(chunk)
            while True:
                window = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size)
                if window <= 0 and view:
                    if not await _pump(sock, conn, ans, 2.0):
                        return ans
                    continue
                part, view = view[:window], view[window:]
                conn.send_data(1, bytes(part), end_stream=last and not view)
                await sock.send_all(conn.data_to_send())
                if not view:
                    break
        with trio.move_on_after(wait):
            while not (ans.ended or ans.reset is not None or ans.connection_error):
                if not await _pump(sock, conn, ans, wait):
                    break
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        OSError,
        h2.exceptions.ProtocolError,
    ) as e:
        ans.connection_error = ans.connection_error or f"{type(e).__name__}: {e}"
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await sock.aclose()
    return ans


async def _pump(
    sock: trio.abc.Stream, conn: h2.connection.H2Connection, ans: Answer, timeout: float
) -> bool:
    """Read once and apply the events; False when the connection is gone."""
    with trio.move_on_after(timeout):
        data = await sock.receive_some(65536)
        if not data:
            ans.connection_error = ans.connection_error or "closed by server"
            return False
        for ev in conn.receive_data(data):
            ans.events.append(type(ev).__name__)
            if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                for k, v in ev.headers:
                    if k == b":status":
                        ans.http_status = v
                    elif k == b"grpc-status":
                        ans.grpc_status = v
                    elif k == b"grpc-message":
                        ans.grpc_message = v
            elif isinstance(ev, h2.events.DataReceived):
                ans.data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ans.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                ans.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                ans.connection_error = f"GOAWAY {ev.error_code}"
        out = conn.data_to_send()
        if out:
            await sock.send_all(out)
        return True
    return True
