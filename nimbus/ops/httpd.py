"""The HTTP edge of a Nimbus process (the metrics endpoint, the live web view): hypercorn's trio
worker serving one small ASGI app that hands GET and HEAD requests to a `Handler`.

Every connection is a task of its own, so a slow or idle client holds only its own connection;
hypercorn closes a connection idle (or still sending its request head) for KEEP_ALIVE_S and one
that sends nothing for READ_TIMEOUT_S, and refuses (431) a request head still incomplete after
MAX_REQUEST bytes; WRITE_TIMEOUT_S bounds a client that stops reading.

The Host header is checked against DNS rebinding (a page on evil.example that resolves to
127.0.0.1 must not read the view): `HostCheck` admits the bind address, the loopback names and
NIMBUS_HTTP_ALLOWED_HOSTS ("*": any), and anything else gets 403.

This module is the one place Nimbus touches hypercorn: its `Config`, and `worker_serve` (what
`hypercorn.trio.serve` runs) given sockets bound here, so a port in use is a plain OSError and
the listening sockets are closed when the server stops.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from hypercorn.utils import wrap_app
from loguru import logger

MAX_REQUEST = 16 * 1024
KEEP_ALIVE_S = 5
READ_TIMEOUT_S = 10
# hypercorn has no write timeout, and sends with cancellation shielded: a client that stops
# reading would hold its connection, and the server's shutdown, for ever. TCP_USER_TIMEOUT
# (Linux; set on the listening socket, inherited by each connection) makes the kernel drop a
# connection whose sent data stays unacknowledged, or unsent behind a zero window, this long.
WRITE_TIMEOUT_S = 10.0
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})


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


def host_name(header: str) -> str | None:
    """The name in a Host header ("name", "name:port", "[v6]", "[v6]:port"), lowercased without
    brackets; None if it is not one."""
    h = header.strip().lower()
    if h.startswith("["):
        name, sep, rest = h[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name or None
    name, sep, port = h.partition(":")
    if sep and not port.isdigit():
        return None
    return name or None


def parse_allowed_hosts(raw: str) -> tuple[str, ...]:
    """NIMBUS_HTTP_ALLOWED_HOSTS: comma-separated names (ports and brackets ignored), or "*"."""
    names = []
    for part in raw.split(","):
        part = part.strip()
        if part == "*":
            names.append("*")
        elif part:
            name = host_name(part)
            if name is None:
                raise ValueError(f"not a host name: {part!r}")
            names.append(name)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class HostCheck:
    """Which Host headers a server bound to `bind_host` answers."""

    bind_host: str
    allowed: tuple[str, ...] = ()

    @classmethod
    def for_bind(cls, bind_host: str, allowed: str | Iterable[str] = "") -> HostCheck:
        names = parse_allowed_hosts(allowed if isinstance(allowed, str) else ",".join(allowed))
        return cls(bind_host.strip("[]").lower(), names)

    @property
    def admits_any(self) -> bool:
        return "*" in self.allowed

    @property
    def only_loopback_on_wildcard(self) -> bool:
        """Bound to every interface but no names listed: a client that reaches this server by
        another name or address is refused."""
        return self.bind_host in WILDCARD_BINDS and not self.allowed

    def admits(self, header: str | None) -> bool:
        if self.admits_any:
            return True
        name = host_name(header) if header is not None else None
        if name is None:
            return False
        return name in LOOPBACK_NAMES or name == self.bind_host or name in self.allowed


class App:
    """The ASGI app: the Host check, GET/HEAD only, then `handler`."""

    def __init__(self, handler: Handler, hosts: HostCheck, name: str) -> None:
        self.handler = handler
        self.hosts = hosts
        self.name = name

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": None})  # 403
            return
        hosts = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"]
        resp = await self.respond(
            scope["method"],
            scope["path"],
            scope["query_string"],
            hosts[0] if len(hosts) == 1 else None,  # none, or two: refused
        )
        await send(
            {
                "type": "http.response.start",
                "status": resp.status,
                "headers": [
                    (b"content-type", resp.content_type.encode("latin-1")),
                    (b"content-length", str(len(resp.body)).encode()),
                    (b"cache-control", b"no-store"),
                    *(
                        (k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in resp.headers.items()
                    ),
                ],
                "trailers": False,
            }
        )
        # (hypercorn leaves the body out of a HEAD response itself)
        await send({"type": "http.response.body", "body": resp.body, "more_body": False})

    async def respond(self, method: str, path: str, query: bytes, host: str | None) -> Response:
        if not self.hosts.admits(host):
            return Response(403, "text/plain", b"host not allowed\n")
        if method not in ("GET", "HEAD"):
            return Response(405, "text/plain", b"GET only\n", {"Allow": "GET, HEAD"})
        req = Request(method, path or "/", parse_qs(query.decode("latin-1")))
        try:
            return await self.handler(req)
        except Exception as e:
            logger.warning("{} http {}: {}", self.name, req.path, e)
            return Response(500, "text/plain", b"internal error\n")


class _ToLoguru(logging.Handler):
    """hypercorn's own error log (warnings and up), into ours."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.name = name

    def emit(self, record: logging.LogRecord) -> None:
        logger.opt(exception=record.exc_info).log(
            record.levelname, "{} http: {}", self.name, record.getMessage()
        )


def config_for(host: str, port: int, name: str) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.read_timeout = READ_TIMEOUT_S
    config.h11_max_incomplete_size = MAX_REQUEST
    config.include_server_header = False
    config.accesslog = None
    error_log = logging.Logger(f"nimbus.ops.httpd.{name}")  # not in logging's registry: ours alone
    error_log.addHandler(_ToLoguru(name))
    config.errorlog = error_log
    return config


async def serve(
    host: str,
    port: int,
    handler: Handler,
    name: str = "http",
    *,
    allowed_hosts: str | Iterable[str] = "",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled; reports the bound port (port 0: any).
    `allowed_hosts`: Host names admitted besides the bind address and loopback ("*": any)."""
    hosts = HostCheck.for_bind(host, allowed_hosts)
    if hosts.only_loopback_on_wildcard:
        logger.warning(
            "{} http on {}:{}: Host checking admits only loopback names; list the names "
            "clients use in NIMBUS_HTTP_ALLOWED_HOSTS ('*': any)",
            name,
            host,
            port,
        )
    config = config_for(host, port, name)
    sockets = config.create_sockets()  # bound here: a port in use is a plain OSError, as before
    try:
        for sock in sockets.insecure_sockets:
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(WRITE_TIMEOUT_S * 1000)
                )
            sock.listen(config.backlog)
        bound = sockets.insecure_sockets[0].getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    worker_serve,
                    wrap_app(App(handler, hosts, name), config.wsgi_max_body_size, "asgi"),
                    config,
                    sockets=sockets,
                )
            )
            logger.info("{} http listening on {}:{}", name, host, bound)
            task_status.started(bound)
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()
