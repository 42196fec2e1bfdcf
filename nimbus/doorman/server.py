"""The doorman: the gRPC server (`python -m nimbus.server`).

grpclib serves `nimbus.NimbusService/ProcessEvent` inside trio-asyncio. The handler (asyncio
side) identifies the client from the `client_id` metadata, opens a session on the `Pod` (trio
side), then reads the stream itself while a writer task writes it (an idle stream is mostly its
tasks and grpclib's state: see `nimbus.wire.grpc.slim_grpclib_streams`). The handler is
registered by hand (not through betterproto's generated base) because the generated one hides
`stream.metadata`. What it uses of grpclib's internals goes through `nimbus.wire.grpc`.

Before anything changes state, a stream is checked: its identity (`nimbus.doorman.auth`: with auth on,
a bearer token whose subject is the client id), then the pod's stream limit. While it runs, each
request's size is checked before its body is read (`NIMBUS_MAX_MESSAGE_BYTES`) and each event
against the client's token bucket (`nimbus.core.limits`). The writer never blocks a stream's cut-off:
it waits for HTTP/2 flow-control room before writing a message, so a client that stops reading
is ended with a status (not a reset) as soon as its outgoing queue overflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import grpclib.const
import trio
import trio_asyncio
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server, Stream
from loguru import logger

from nimbus import logs
from nimbus.config import Settings
from nimbus.core.limits import RateLimiter
from nimbus.doorman import edge, startup, tls
from nimbus.doorman.auth import AuthError, Verifier
from nimbus.doorman.pod import Close, Outbox, OutboxItem, Pod, Session
from nimbus.engines import open_engine
from nimbus.entry import ArgumentParser, run_process, run_with_signals
from nimbus.ops import metrics
from nimbus.ports import EngineError, Log, RecordsAndPubSub
from nimbus.topics import ensure_topics
from nimbus.wire import badinput
from nimbus.wire import grpc as grpcwire

# Re-exported: tests/test_stream_memory.py imports these from here.
from nimbus.wire.messages import (  # also registers descriptors for reflection
    UNAVAILABLE,
    EventRequest,
    EventResponse,
)

SERVICE = "nimbus.NimbusService"
PROTOCOL_KEY = "nimbus-protocol"
# One HTTP/2 write carries at most this much of a stream's queued messages.
WRITE_BATCH_BYTES = 16384


class Refusal(Exception):
    """A request the stream cannot go on after: the stream ends with this gRPC status."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class MessageTooLarge(Refusal):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            "RESOURCE_EXHAUSTED",
            f"request message of {size} bytes is over the limit of {limit} bytes",
        )


async def _next_request(h2: Any, max_bytes: int) -> tuple[EventRequest | None, int]:
    """The stream's next request (None at its end) and its size in bytes, like
    `await anext(stream)`, but a message's declared length is checked against `max_bytes` before
    its body is read (grpclib itself would buffer any size). `h2` is the grpclib.protocol.Stream;
    its buffer is what its `recv_data` reads (one coroutine fewer held by each idle stream)."""
    buffer = h2.buffer
    meta = await buffer.read(5)
    if not meta:
        return None, 0
    compressed, size = struct.unpack(">?I", meta)
    if size > max_bytes:
        raise MessageTooLarge(size, max_bytes)
    if compressed:
        raise Refusal("UNIMPLEMENTED", "compressed messages are not supported")
    data = await buffer.read(size) if size else b""
    if len(data) != size:  # the client ended the stream inside a message
        raise Refusal("INVALID_ARGUMENT", "malformed message: the stream ended inside a message")
    return EventRequest.FromString(data), size


def _take_batch(outbox: Outbox, first: OutboxItem) -> tuple[bytes, int, list[int], Close | None]:
    """`first` and what else is queued (up to WRITE_BATCH_BYTES, or up to a Close), framed for one
    write: (data, number of messages, delivery ids in order (0: not a result), the Close met)."""
    payloads: list[bytes] = []
    ids: list[int] = []
    size = 0
    item = first
    while True:
        if isinstance(item, Close):
            return grpcwire.frame(payloads), len(payloads), ids, item
        delivery_id, resp = item
        if resp is not None:  # None: a GAP the original's client cannot be told of
            payload = resp if isinstance(resp, bytes) else resp.SerializeToString()
            payloads.append(payload)
            size += grpcwire.framed_size(len(payload))
        ids.append(delivery_id)
        if size >= WRITE_BATCH_BYTES or outbox.empty():
            return grpcwire.frame(payloads), len(payloads), ids, None
        item = outbox.get_nowait()


def _pending_close(s: Session) -> Close:
    """The Close the pod queued when it ended `s` (results queued before it are dropped: they
    are unconfirmed, so the pod already reported them undelivered)."""
    while not s.outbox.empty():
        item = s.outbox.get_nowait()
        if isinstance(item, Close):
            return item
    return Close("UNAVAILABLE", "stream closed")


class NimbusService:
    """grpclib service object; one instance per server."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        s = pod.s
        self.verifier = Verifier.from_settings(s)
        self.limiter = RateLimiter(s.client_event_rate, s.client_event_burst)
        self.max_streams = s.max_streams
        self.max_message_bytes = s.max_message_bytes
        self.max_client_id_bytes = s.max_client_id_bytes
        self.first_message_s = s.first_message_sec
        self._opening = 0  # streams past the checks whose session is being opened

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            f"/{SERVICE}/ProcessEvent": grpclib.const.Handler(
                self.process_event,
                grpclib.const.Cardinality.STREAM_STREAM,
                EventRequest,
                EventResponse,
            )
        }

    def identify(self, md: Any, peer: Any = None) -> str:
        """The stream's client id, or GRPCError (nothing has changed state yet)."""
        if self.verifier is not None:
            try:
                return self.verifier.identify(md)
            except AuthError as e:
                self.pod.counters.inc(f"server.refused.{e.status.lower()}")
                logger.info(
                    "stream refused: {} ({}), client_id {!r}, peer {}",
                    e.status,
                    e.message,
                    str(md.get("client_id", ""))[:100],
                    peer,
                )
                raise GRPCError(grpclib.const.Status[e.status], e.message) from None
        client_id = str(md.get("client_id", "")).strip()
        if not client_id:
            badinput.message("grpc", badinput.BAD_METADATA, "no client_id")
            raise GRPCError(
                grpclib.const.Status.INVALID_ARGUMENT, "client_id not received or empty in metadata"
            )
        return client_id

    async def process_event(self, stream: Stream[EventRequest, EventResponse]) -> None:
        md: Any = stream.metadata or {}
        client_id = self.identify(md, stream.peer.addr() if self.verifier is not None else None)
        if not client_id.isprintable() or not client_id.isascii():  # gRPC: printable ASCII only
            badinput.message("grpc", badinput.BAD_METADATA, f"client_id {client_id[:64]!r}")
            raise GRPCError(
                grpclib.const.Status.INVALID_ARGUMENT, "client_id must be printable ASCII"
            )
        if len(client_id) > self.max_client_id_bytes:  # ASCII: one byte a character
            badinput.message("grpc", badinput.BAD_METADATA, f"client_id of {len(client_id)} bytes")
            raise GRPCError(
                grpclib.const.Status.INVALID_ARGUMENT,
                f"client_id is {len(client_id)} bytes long; at most {self.max_client_id_bytes}",
            )
        if not self.pod.accepting:
            raise GRPCError(grpclib.const.Status.UNAVAILABLE, "server is shutting down")
        logs.bind_task(
            client_id=client_id, trace_id=logs.trace_id(md)
        )  # on every line of this stream
        if (
            len(self.pod.sessions) + self._opening >= self.max_streams
            and client_id not in self.pod.sessions
        ):
            self.pod.counters.inc("server.refused.max_streams")
            raise GRPCError(
                grpclib.const.Status.RESOURCE_EXHAUSTED,
                f"this server holds its maximum of {self.max_streams} streams",
            )
        protocol = 2 if str(md.get(PROTOCOL_KEY, "")) == "2" else 1
        self._opening += 1
        try:
            session = await trio_asyncio.trio_as_aio(self.pod.open_session)(client_id, protocol)
        except EngineError as e:
            raise GRPCError(
                grpclib.const.Status.UNAVAILABLE, f"state store unavailable: {e}"
            ) from None
        finally:
            self._opening -= 1
        logs.bind_task(epoch=session.epoch)
        # The writer runs in a task of its own; this task is the reader (one task per stream
        # fewer than a reader task and a writer task: idle streams are mostly their tasks).
        writer = asyncio.ensure_future(self._writer(stream, session))
        me = asyncio.current_task()
        assert me is not None
        reading, stopped = True, False

        def writer_done(_: object) -> None:
            nonlocal stopped
            if reading:
                stopped = True
                me.cancel()  # stop reading: see below

        writer.add_done_callback(writer_done)
        try:
            # The writer ends on Close (superseded, slow, over a limit, shutdown) or a broken
            # stream; the reader ends the stream only if it broke (a half-close, or a refusal it
            # queued as a Close, keeps it open for the writer). A writer waiting for a client that
            # stopped reading notices the Close itself (see _writer).
            try:
                broke = await self._reader(stream, session)
            except asyncio.CancelledError:
                reading = False
                # Only writer_done's cancellation is absorbed; any other (grpclib ending the
                # handler) goes on.
                if not stopped or me.uncancel() > 0:
                    raise
                writer.result()
                return
            except Exception:
                broke = True
            reading = False
            if not broke or writer.done():
                await writer
        finally:
            reading = False
            writer.cancel()
            await asyncio.shield(trio_asyncio.trio_as_aio(self.pod.close_session)(session))

    async def _reader(self, stream: Stream[EventRequest, EventResponse], s: Session) -> bool:
        """Feed the pod; True if the stream broke, False if the client half-closed or the stream
        was cut (the writer then sends the Close's status)."""
        pod = self.pod
        limiter = self.limiter
        h2 = grpcwire.h2_stream(stream)
        max_bytes = self.max_message_bytes
        first = self.first_message_s
        try:
            while True:
                req = None  # an idle stream holds no request (nor its protobuf arena)
                if first:
                    first = 0
                    try:
                        req, size = await asyncio.wait_for(
                            _next_request(h2, max_bytes), self.first_message_s
                        )
                    except TimeoutError:
                        pod.counters.inc("server.first_message_timeout")
                        pod.cut(
                            s,
                            "DEADLINE_EXCEEDED",
                            f"no message within {self.first_message_s}s of opening the stream",
                        )
                        return False
                else:
                    req, size = await _next_request(h2, max_bytes)
                if req is None:
                    # Half-closed: the writer ends the stream once its results are delivered.
                    pod.half_close(s)
                    break
                if not req.event_name and not req.ack and s.protocol >= 2:
                    # An empty message: the library's "hello" when it opens a stream (the first
                    # message limit), or a keep-alive. Nothing to do.
                    continue
                if req.ack > badinput.MAX_DELIVERY_ID:
                    badinput.message(
                        "grpc", badinput.BAD_ACK, f"client {s.client_id}: ack {req.ack}"
                    )
                    pod.cut(s, "INVALID_ARGUMENT", "ack is not a delivery id")
                    return False
                if req.ack:
                    pod.on_ack(s, req.ack)
                if req.event_name or not req.ack:
                    if limiter.enabled and not limiter.allow(s.client_id, time.monotonic()):
                        pod.counters.inc("server.rate_limited")
                        why = f"over the event rate limit ({limiter.rate:g}/s per client); retry later"
                        if s.protocol >= 2:  # per event: the client library retries it
                            pod.refuse(s, req, UNAVAILABLE, why)
                            continue
                        # the original's client has no per-event errors
                        pod.cut(s, "RESOURCE_EXHAUSTED", why)
                        return False
                    if not pod.submit(s, req, size):
                        await trio_asyncio.trio_as_aio(pod.submit_wait)(s, req, size)
        except Refusal as e:
            self._refused(s, e)
            return False
        except (StreamTerminatedError, GRPCError, ConnectionError):
            return True
        except Exception as e:
            badinput.message(
                "grpc",
                badinput.MALFORMED_MESSAGE,
                f"client {s.client_id}: {type(e).__name__}: {e}"[:300],
            )
            pod.cut(s, "INVALID_ARGUMENT", "malformed message")
            return False
        return False

    def _refused(self, s: Session, e: Refusal) -> None:
        """End `s` with the status of a request it cannot go on after (counted and logged)."""
        too_large = isinstance(e, MessageTooLarge)
        self.pod.counters.inc("server.message_too_large" if too_large else "server.refused_request")
        badinput.message(
            "grpc",
            badinput.TOO_LARGE if too_large else badinput.MALFORMED_MESSAGE,
            f"client {s.client_id}: {e.message}"[:300],
        )
        self.pod.cut(s, e.status, e.message)

    async def _writer(self, stream: Stream[EventRequest, EventResponse], s: Session) -> None:
        """Write what the pod queues for `s`: every message waiting at a wake-up goes out in one
        HTTP/2 write (up to WRITE_BATCH_BYTES), then the results among them are confirmed in
        order (`on_written`)."""
        pod = self.pod
        h2 = grpcwire.h2_stream(stream)
        outbox = s.outbox
        try:
            while True:
                data, n, ids, close = _take_batch(outbox, await outbox.get())
                if n:
                    need = min(
                        len(data), WRITE_BATCH_BYTES
                    )  # always reachable: the window is >= 64 KiB
                    if not grpcwire.writable(h2, need):
                        # The client is not reading (fast enough). Wait for room without starting
                        # the write, so that a cut can still end the stream with a status
                        # (trailers are not flow-controlled; half a message would need a reset).
                        cut = await self._wait_writable(h2, need, s)
                        if cut is not None:
                            close, n, ids = cut, 0, []
                    if n:
                        await grpcwire.server_send(stream, data, n)
                for delivery_id in ids:
                    if delivery_id:
                        pod.on_written(s, delivery_id)
                if close is not None:
                    if close.status is None:
                        return
                    raise GRPCError(grpclib.const.Status[close.status], close.message)
                # An idle stream holds none of what it wrote (the bytes, nor through them the
                # pub/sub batch its results came in): most streams are idle most of the time.
                del data, ids
        except (StreamTerminatedError, ConnectionError):
            return

    @staticmethod
    async def _wait_writable(h2: Any, size: int, s: Session) -> Close | None:
        """None once `size` bytes can be written; the pod's Close if it ends `s` meanwhile."""
        if await grpcwire.wait_writable(h2, size, lambda: s.closed):
            return None
        return _pending_close(s)


def exposure_warnings(s: Settings) -> list[str]:
    """What an operator should hear at start about a server reachable beyond loopback."""
    if is_loopback(s.host):
        return []
    out = []
    if s.auth == "off":
        out.append(
            f"auth is off and the server listens on {s.host} (beyond loopback): any client can "
            "connect as any client_id and receive its results; set NIMBUS_AUTH=jwt"
        )
    if not s.tls_cert_file:
        out.append(
            f"TLS is off and the server listens on {s.host} (beyond loopback): events, results"
            + (" and tokens" if s.auth != "off" else "")
            + " travel in clear text unless a proxy terminates TLS; set NIMBUS_TLS_CERT_FILE/KEY_FILE"
        )
    return out


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.asynccontextmanager
async def serve_grpc(
    pod: Pod, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Server, int]]:
    """Serve the Nimbus service, health and reflection; yields (server, bound port)."""
    grpcwire.slim_grpclib_streams()
    service = NimbusService(pod)
    health = Health()
    services: list[Any] = ServerReflection.extend([service, health])
    limits = edge.EdgeLimits(pod.s.handshake_timeout_sec, pod.s.idle_connection_sec)
    server = edge.GuardedServer(services, limits=limits)
    edge.contain_connection_errors(trio_asyncio.current_loop.get())
    await trio_asyncio.aio_as_trio(server.start)(host, port, ssl=ssl_context)
    bound = grpcwire.bound_port(server, port)
    try:
        yield server, bound
    finally:
        server.close()
        with trio.move_on_after(5) as cs:
            cs.shield = True
            await trio_asyncio.aio_as_trio(server.wait_closed)()


async def run_server(
    settings: Settings,
    log: Log,
    state: RecordsAndPubSub,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The doorman until cancelled; reports the bound port. Must run inside trio_asyncio."""
    pod = metrics.watched_obj(Pod(settings, log, state))
    ssl_context = tls.from_settings(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(pod.run)
        async with serve_grpc(pod, settings.host, settings.port, ssl_context) as (_, port):
            logger.info(
                "doorman listening on {}:{} (pod channel {}; auth {}, TLS {})",
                settings.host,
                port,
                settings.pod_channel,
                settings.auth,
                "off"
                if ssl_context is None
                else ("mutual" if settings.tls_client_ca_file else "on"),
            )
            for warning in exposure_warnings(settings):
                logger.warning("{}", warning)
            task_status.started(port)
            try:
                await trio.sleep_forever()
            finally:
                # Graceful: stop accepting, end every stream (clients reconnect elsewhere),
                # mark them OFFLINE; results in flight are diverted by the router.
                pod.accepting = False
                pod.close_all("server shutting down")
                with trio.move_on_after(settings.shutdown_timeout_sec) as cs:
                    cs.shield = True
                    await pod.wait_empty()
                nursery.cancel_scope.cancel()


async def main_async(settings: Settings) -> None:
    async with trio_asyncio.open_loop():
        async with open_engine(settings) as engine:
            await ensure_topics(engine.log, settings)
            await run_with_signals(
                lambda task_status: run_server(
                    settings, engine.log, engine.state, task_status=task_status
                )
            )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m nimbus.server", description=__doc__)
    parser.parse_args(argv)
    run_process("nimbus.server", "server", main_async, checks=[startup.check])
