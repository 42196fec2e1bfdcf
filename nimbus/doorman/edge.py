"""The gRPC port's edge: what a connection may cost before it is a client, and what the process
does when connections run out of something.

- A connection must complete the HTTP/2 preface (the client's SETTINGS) within
  NIMBUS_HANDSHAKE_TIMEOUT_SEC of being accepted (after TLS: asyncio bounds the TLS handshake
  itself, 60 s), or it is closed.
- A connection with no open stream for NIMBUS_IDLE_CONNECTION_SEC is closed, with a GOAWAY first.
- A protocol error (bytes h2 cannot parse) closes the connection after the GOAWAY that h2
  prepared for it (grpclib ends the streams and drops the socket, without flushing it).
- accept() failing for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged
  (at most every 5 s) and counted; asyncio stops accepting for a second and tries again, and the
  connections already open keep being served. Any other error a connection's bytes cause closes
  that connection only. Without this, trio-asyncio re-raises the loop's exception into its
  nursery and the whole process exits.

grpclib creates one `H2Protocol` per connection; `GuardedServer` makes it a `GuardedH2Protocol`,
which keeps one asyncio timer per connection.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass
from typing import Any

from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.events import RemoteSettingsChanged
from h2.exceptions import ProtocolError
from loguru import logger

from nimbus.ops import metrics
from nimbus.wire import badinput

_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_LOG_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    handshake_s: float
    idle_s: float


class GuardedH2Protocol(H2Protocol):
    """grpclib's connection protocol, with the time limits above."""

    limits: EdgeLimits

    def __init__(self, handler: Any, config: Any, h2_config: Any, limits: EdgeLimits) -> None:
        super().__init__(handler, config, h2_config)
        self.limits = limits
        self._settled = False  # the client's preface and SETTINGS arrived
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transport: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._transport = transport
        self._arm(self.limits.handshake_s)

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(delay, 0.05), self._check)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.connection.feed(data)
        except ProtocolError as e:
            badinput.message("grpc", badinput.PROTOCOL_ERROR, f"connection closed: {e}"[:300])
            self._close(goaway=False)  # h2 already prepared its GOAWAY with the error code
            return
        if not self._settled and any(isinstance(ev, RemoteSettingsChanged) for ev in events):
            self._settled = True
        self.connection.flush()
        for event in events:
            self.processor.process(event)
        self.connection.flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _check(self) -> None:
        self._timer = None
        if self._transport is None or self._transport.is_closing():
            return
        if not self._settled:
            metrics.error("handshake_timeout")
            logger.info(
                "closing a connection from {}: no HTTP/2 preface within {:g}s",
                self._transport.get_extra_info("peername"),
                self.limits.handshake_s,
            )
            self._close(goaway=False)
            return
        streams = getattr(self.processor, "streams", None)
        now = time.monotonic()
        # Polled: a connection is found idle within `period` of its last stream ending.
        period = min(self.limits.idle_s / 2, 30.0)
        if streams:
            self._idle_since = None
            self._arm(period)
            return
        if self._idle_since is None:
            self._idle_since = now
        idle = now - self._idle_since
        if idle >= self.limits.idle_s:
            metrics.error("idle_connection_closed")
            logger.debug(
                "closing a connection from {}: no stream for {:.0f}s",
                self._transport.get_extra_info("peername"),
                idle,
            )
            self._close(goaway=True)
            return
        self._arm(min(period, self.limits.idle_s - idle))

    def _close(self, *, goaway: bool) -> None:
        """Send what h2 has to send (a GOAWAY: ours, or the one a protocol error prepared), then
        close the socket and end the connection's streams."""
        h2_conn = getattr(self.connection, "_connection", None)
        transport = self._transport
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


class GuardedServer(Server):
    """grpclib's Server whose connections are `GuardedH2Protocol`s."""

    def __init__(self, handlers: Any, *, limits: EdgeLimits) -> None:
        super().__init__(handlers)
        self._limits = limits

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()
        return GuardedH2Protocol(plain.handler, plain.config, plain.h2_config, self._limits)


def contain_connection_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Errors the loop reports for one connection (or for accept) stay there; see the module's
    docstring. Anything else goes to the loop's default handler."""
    last_accept_log = [-_ACCEPT_LOG_EVERY_S]

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            isinstance(exc, OSError)
            and exc.errno in _OUT_OF_RESOURCES
            and "socket" in context
            and "accept" in str(context.get("message", ""))
        ):
            metrics.error("accept_out_of_resources")
            now = time.monotonic()
            if now - last_accept_log[0] >= _ACCEPT_LOG_EVERY_S:
                last_accept_log[0] = now
                logger.warning(
                    "cannot accept connections: {} ({}); serving the open ones and retrying "
                    "every second (raise `ulimit -n`, or lower NIMBUS_MAX_STREAMS)",
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                    exc.strerror,
                )
            return
        proto = context.get("protocol")
        proto = getattr(proto, "_app_protocol", proto)  # over TLS: asyncio's SSLProtocol wraps it
        if isinstance(proto, H2Protocol):
            badinput.message(
                "grpc",
                badinput.PROTOCOL_ERROR,
                f"connection closed: {type(exc).__name__}: {exc}"[:300],
            )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
