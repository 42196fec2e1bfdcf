"""A tiny HTTP/1.1 server on trio, for the metrics endpoint and the web view: GET only, one
request per connection, bounded request size, a deadline per connection and a bounded number of
connections served at once. Not a general web server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import trio
from loguru import logger

MAX_REQUEST = 16 * 1024
DEADLINE_S = 10
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]


@dataclass(slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


def parse_request(head: bytes) -> Request | None:
    """The request line of an HTTP request head, or None if it is not one."""
    try:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, version = line.split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1."):
        return None
    parts = urlsplit(target)
    return Request(method.upper(), parts.path or "/", parse_qs(parts.query))


def render(resp: Response) -> bytes:
    head = [
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in resp.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body


async def _serve_one(stream: trio.abc.Stream, handler: Handler) -> None:
    head = b""
    with trio.move_on_after(DEADLINE_S):
        while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        req = parse_request(head) if b"\r\n\r\n" in head else None
        if req is None:
            resp = Response(400, "text/plain", b"bad request\n")
        elif req.method not in ("GET", "HEAD"):
            resp = Response(405, "text/plain", b"GET only\n")
        else:
            try:
                resp = await handler(req)
            except Exception as e:
                logger.warning("http {}: {}", req.path, e)
                resp = Response(500, "text/plain", b"internal error\n")
            if req.method == "HEAD":
                data = render(resp)
                resp_bytes = data[: data.index(b"\r\n\r\n") + 4]
                await stream.send_all(resp_bytes)
                return
        await stream.send_all(render(resp))


async def serve(
    host: str,
    port: int,
    handler: Handler,
    name: str = "http",
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled; reports the bound port (port 0: any)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def conn(stream: trio.SocketStream) -> None:
        async with limiter, stream:
            try:
                await _serve_one(stream, handler)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    logger.info("{} http listening on {}:{}", name, host, bound)
    task_status.started(bound)
    await trio.serve_listeners(conn, listeners)
