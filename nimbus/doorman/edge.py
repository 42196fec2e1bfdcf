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
which keeps one asyncio timer per connection. What they use of grpclib's internals is in
`nimbus.wire.grpc` (`HookedH2Protocol`, `HookedServer`): this module holds the policy.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass
from typing import Any

from grpclib.protocol import H2Protocol
from h2.exceptions import ProtocolError
from loguru import logger

from nimbus.ops import metrics
from nimbus.wire import badinput
from nimbus.wire import grpc as grpcwire

_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_LOG_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    handshake_s: float
    idle_s: float


class GuardedH2Protocol(grpcwire.HookedH2Protocol):
    """grpclib's connection protocol, with the time limits above."""

    limits: EdgeLimits

    def __init__(self, handler: Any, config: Any, h2_config: Any, limits: EdgeLimits) -> None:
        super().__init__(handler, config, h2_config)
        self.limits = limits
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

    def on_protocol_error(self, error: ProtocolError) -> None:
        badinput.message("grpc", badinput.PROTOCOL_ERROR, f"connection closed: {error}"[:300])
        self._close(goaway=False)  # h2 already prepared its GOAWAY with the error code

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _check(self) -> None:
        self._timer = None
        if self._transport is None or self._transport.is_closing():
            return
        if not self.settled:
            metrics.error("handshake_timeout")
            logger.info(
                "closing a connection from {}: no HTTP/2 preface within {:g}s",
                self._transport.get_extra_info("peername"),
                self.limits.handshake_s,
            )
            self._close(goaway=False)
            return
        now = time.monotonic()
        # Polled: a connection is found idle within `period` of its last stream ending.
        period = min(self.limits.idle_s / 2, 30.0)
        if self.has_streams():
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
        self.close_connection(self._transport, goaway=goaway)


class GuardedServer(grpcwire.HookedServer):
    """grpclib's Server whose connections are `GuardedH2Protocol`s."""

    def __init__(self, handlers: Any, *, limits: EdgeLimits) -> None:
        super().__init__(
            handlers, lambda handler, config, h2: GuardedH2Protocol(handler, config, h2, limits)
        )


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
