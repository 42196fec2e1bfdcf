"""The HTTP edge of a Nimbus process (`nimbus.ops.httpd`: hypercorn's trio worker): the metrics
endpoint and the live web view. Slow, idle or non-reading clients hold only their own
connection, never the others' requests nor the server's shutdown for long, and the Host header
is checked against DNS rebinding.

Rules (conftest): 127.0.0.1 with port 0, and a `fail_after` around every test that does I/O.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from loguru import logger

from nimbus import config
from nimbus.engines import open_engine
from nimbus.ops import httpd, metrics, web

SLOW_CONNECTIONS = 100

Serve = Callable[..., Awaitable[None]]


async def request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a raw request head on a fresh connection; the status, headers and body (read to EOF:
    the head must carry `Connection: close`)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split(" ")[1]), headers, body


async def get(
    port: int, path: str, host: str | None = "127.0.0.1", method: str = "GET"
) -> tuple[int, bytes]:
    host_line = f"Host: {host}\r\n" if host is not None else ""
    status, _, body = await request(
        port, f"{method} {path} HTTP/1.1\r\n{host_line}Connection: close\r\n\r\n".encode()
    )
    return status, body


@asynccontextmanager
async def metrics_server(allowed_hosts: str | None = "") -> AsyncIterator[int]:
    """The metrics endpoint; `allowed_hosts=None` reads NIMBUS_HTTP_ALLOWED_HOSTS."""
    async with trio.open_nursery() as nursery:
        yield await nursery.start(
            partial(metrics.serve_metrics, "127.0.0.1", 0, allowed_hosts=allowed_hosts)
        )
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def web_server(**overrides: Any) -> AsyncIterator[int]:
    settings = config.load(env={}, dotenv=False, engine="memory", web_refresh_ms=100, **overrides)
    async with open_engine(settings) as eng, trio.open_nursery() as nursery:
        yield await nursery.start(
            partial(web.run_web, settings, eng.log, eng.state, port=0, targets=[])
        )
        nursery.cancel_scope.cancel()


SERVERS = {
    "metrics": (metrics_server, "/metrics", b"# TYPE nimbus_ops_total counter"),
    "web": (web_server, "/", b"<title>Nimbus live</title>"),
}


@asynccontextmanager
async def slow_clients(port: int, n: int) -> AsyncIterator[list[trio.SocketStream]]:
    """`n` connections that each send half a request line and then nothing (slowloris)."""
    streams: list[trio.SocketStream] = []
    try:
        for _ in range(n):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(s)
            await s.send_all(b"GET /metr")
        yield streams
    finally:
        for s in streams:
            await s.aclose()


# -- slow clients -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", SERVERS)
async def test_slow_connections_do_not_stall_other_clients(which: str) -> None:
    """100 slowloris connections open: a normal GET still answers at once (the home-made server
    served 64 connections at a time and made the 65th wait ~9.8 s)."""
    server, path, marker = SERVERS[which]
    with trio.fail_after(30):
        async with server() as port, slow_clients(port, SLOW_CONNECTIONS):
            await trio.sleep(0.2)  # every slow connection accepted and waiting
            t0 = time.monotonic()
            with trio.fail_after(1):
                status, body = await get(port, path)
            assert status == 200 and marker in body
            assert time.monotonic() - t0 < 1.0


async def test_idle_and_half_sent_connections_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that sends nothing, or half a request head, is closed after the keep-alive
    timeout; so is one idle after a response."""
    monkeypatch.setattr(httpd, "KEEP_ALIVE_S", 0.5)

    async def closed_after(port: int, send: bytes) -> float:
        s = await trio.open_tcp_stream("127.0.0.1", port)
        async with s:
            t0 = time.monotonic()
            await s.send_all(send)
            while await s.receive_some(65536):
                pass
            return time.monotonic() - t0

    with trio.fail_after(20):
        async with metrics_server() as port:
            for send in (b"", b"GET /metr", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):
                assert 0.3 < await closed_after(port, send) < 3, send


async def test_a_client_that_does_not_read_cannot_hold_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that asks for a large response and never reads it: others are served meanwhile,
    and cancelling the server returns within the write timeout (hypercorn sends with
    cancellation shielded, so without it the shutdown would wait for ever)."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux-only")
    monkeypatch.setattr(httpd, "WRITE_TIMEOUT_S", 1.0)
    big = b"x" * 8_000_000

    async def handler(req: httpd.Request) -> httpd.Response:
        return httpd.Response(200, "text/plain", big if req.path == "/big" else b"ok\n")

    with trio.fail_after(20), socket.socket() as stuck:  # open until the server has stopped
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(httpd.serve, "127.0.0.1", 0, handler, "test")
            stuck.connect(("127.0.0.1", port))
            stuck.sendall(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await trio.sleep(0.3)
            with trio.fail_after(1):
                assert await get(port, "/") == (200, b"ok\n")
            t0 = time.monotonic()
            nursery.cancel_scope.cancel()
        assert 0.3 < time.monotonic() - t0 < 5


# -- the Host header (DNS rebinding) -------------------------------------------------------------


@pytest.mark.parametrize("which", SERVERS)
async def test_host_header_is_checked(which: str) -> None:
    server, path, marker = SERVERS[which]
    with trio.fail_after(30):
        async with server() as port:
            for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}"):
                status, body = await get(port, path, host)
                assert status == 200 and marker in body, host
            assert (await get(port, path, f"[::1]:{port}"))[0] == 200
            for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
                assert await get(port, path, host) == (403, b"host not allowed\n"), host
            # no Host: h11 refuses HTTP/1.1 without one (400), we refuse HTTP/1.0 (403)
            assert (await get(port, path, None))[0] == 400
            status, _, _ = await request(port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            assert status == 403
            # two Host headers: refused
            status, _, _ = await request(
                port,
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            assert status in (400, 403)


@pytest.mark.parametrize("which", SERVERS)
async def test_allowed_hosts_admit_more_names(which: str) -> None:
    server, path, marker = SERVERS[which]
    kw = {"allowed_hosts": "nimbus.internal, pod-a"} if which == "metrics" else {}
    if which == "web":
        kw = {"http_allowed_hosts": "nimbus.internal, pod-a"}
    with trio.fail_after(30):
        async with server(**kw) as port:
            for host in ("nimbus.internal", f"nimbus.internal:{port}", "POD-A:9100", "localhost"):
                assert (await get(port, path, host))[0] == 200, host
            assert (await get(port, path, "evil.example"))[0] == 403
        wildcard = {"allowed_hosts": "*"} if which == "metrics" else {"http_allowed_hosts": "*"}
        async with server(**wildcard) as port:
            assert (await get(port, path, "anything.example"))[0] == 200


async def h2_get(port: int, path: str, authority: str) -> tuple[int, bytes]:
    """One GET over HTTP/2 with prior knowledge (hypercorn speaks it on a plain socket too)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", authority)],
        end_stream=True,
    )
    status, body = 0, b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(conn.data_to_send())
        while data := await stream.receive_some(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, body
            await stream.send_all(conn.data_to_send())
    raise AssertionError("connection closed before the response ended")


async def test_host_check_holds_over_http2() -> None:
    with trio.fail_after(20):
        async with metrics_server() as port:
            assert await h2_get(port, "/metrics", "evil.example") == (403, b"host not allowed\n")
            status, body = await h2_get(port, "/metrics", f"127.0.0.1:{port}")
            assert status == 200 and b"# TYPE nimbus_ops_total counter" in body


async def test_metrics_endpoint_reads_the_allow_list_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NIMBUS_HTTP_ALLOWED_HOSTS", "scraper.example")
    with trio.fail_after(20):
        async with metrics_server(allowed_hosts=None) as port:
            assert (await get(port, "/metrics", "scraper.example:9100"))[0] == 200
            assert (await get(port, "/metrics", "evil.example"))[0] == 403


async def test_wildcard_bind_without_allow_list_warns() -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    partial(metrics.serve_metrics, "0.0.0.0", 0, allowed_hosts="")
                )
                assert (await get(port, "/metrics", "127.0.0.1"))[0] == 200
                assert (await get(port, "/metrics", "10.1.2.3"))[0] == 403
                nursery.cancel_scope.cancel()
            async with metrics_server(allowed_hosts="") as port:
                pass
    finally:
        logger.remove(sink)
    warned = [ln for ln in lines if "admits only loopback names" in ln]
    assert len(warned) == 1 and "NIMBUS_HTTP_ALLOWED_HOSTS" in warned[0], lines


def test_host_names_and_the_check() -> None:
    assert httpd.host_name("Example.COM:8080") == "example.com"
    assert httpd.host_name("[::1]:9100") == "::1"
    assert httpd.host_name("[::1]") == "::1"
    assert httpd.host_name("127.0.0.1") == "127.0.0.1"
    for bad in ("", ":80", "a:b", "[::1", "[::1]x", "[::1]:x", "a:80:90"):
        assert httpd.host_name(bad) is None, bad
    check = httpd.HostCheck.for_bind("10.0.0.5", "nimbus.internal,[fd00::1]:9")
    for ok in ("10.0.0.5:9100", "localhost", "[::1]:1", "nimbus.internal", "[FD00::1]"):
        assert check.admits(ok), ok
    for no in ("10.0.0.6", "evil.example", "localhost.evil.example", None, "[::1"):
        assert not check.admits(no), no
    assert httpd.HostCheck.for_bind("::").only_loopback_on_wildcard
    assert httpd.HostCheck.for_bind("[::1]").admits("[::1]:80")
    assert not httpd.HostCheck.for_bind("0.0.0.0", "x").only_loopback_on_wildcard
    assert httpd.HostCheck.for_bind("127.0.0.1", ["*"]).admits("anything")
    with pytest.raises(ValueError):
        httpd.parse_allowed_hosts("ok,bad:host:name")


# -- the server's lifecycle and the requests it takes -------------------------------------------


async def test_port_in_use_is_a_plain_oserror_and_cancel_frees_the_port() -> None:
    """`python -m nimbus` catches OSError when the web port is taken; after a cancel the port
    can be bound again at once."""
    with trio.fail_after(20):
        async with metrics_server() as port:
            with pytest.raises(OSError):
                await metrics.serve_metrics("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            again = await nursery.start(metrics.serve_metrics, "127.0.0.1", port)
            assert again == port and (await get(port, "/healthz"))[0] == 200
            nursery.cancel_scope.cancel()


async def test_methods_head_query_and_errors() -> None:
    seen: list[httpd.Request] = []

    async def handler(req: httpd.Request) -> httpd.Response:
        seen.append(req)
        if req.path == "/boom":
            raise RuntimeError("boom")
        return httpd.Response(200, "text/plain", b"hello\n", {"X-Test": "1"})

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(httpd.serve, "127.0.0.1", 0, handler, "test")
            status, headers, body = await request(
                port,
                b"GET /a/b?x=1&x=2&y= HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            assert (status, body) == (200, b"hello\n")
            assert headers["content-length"] == "6" and headers["x-test"] == "1"
            assert headers["cache-control"] == "no-store"
            assert seen[-1] == httpd.Request("GET", "/a/b", {"x": ["1", "2"]})
            status, headers, body = await request(
                port, b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            assert (status, body, headers["content-length"]) == (200, b"", "6")
            assert await get(port, "/", method="POST") == (405, b"GET only\n")
            assert await get(port, "/boom") == (500, b"internal error\n")
            # A websocket upgrade: refused.
            status, _, _ = await request(
                port,
                b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n",
            )
            assert status == 403
            # Not HTTP at all: 400, and the server keeps serving.
            assert (await request(port, b"\x00\x01garbage\r\n\r\n"))[0] == 400
            # A request head that grows past the limit without ending: refused, not buffered.
            status, _, _ = await request(
                port,
                b"GET / HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * (httpd.MAX_REQUEST + 1024),
            )
            assert status == 431
            assert (await get(port, "/"))[0] == 200
            # Keep-alive: two requests on one connection.
            s = await trio.open_tcp_stream("127.0.0.1", port)
            async with s:
                await s.send_all(b"GET /1 HTTP/1.1\r\nHost: localhost\r\n\r\n" * 2)
                data = b""
                while data.count(b"hello\n") < 2:
                    data += await s.receive_some(65536)
            assert data.count(b"HTTP/1.1 200") == 2
            nursery.cancel_scope.cancel()
