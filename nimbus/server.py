"""The doorman: the gRPC server (`python -m nimbus.server`).

grpclib serves `nimbus.NimbusService/ProcessEvent` inside trio-asyncio. The handler (asyncio
side) identifies the client from the `client_id` metadata, opens a session on the `Pod` (trio
side), then runs a reader and a writer for the stream. The handler is registered by hand (not
through betterproto's generated base) because the generated one hides `stream.metadata`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from nimbus.config import Settings
from nimbus.engines import open_engine
from nimbus.entry import run_process, run_with_signals
from nimbus.messages import EventRequest, EventResponse  # also registers descriptors for reflection
from nimbus.pod import Close, Pod, Session
from nimbus.ports import EngineError, Log, StateStore
from nimbus.topics import ensure_topics

SERVICE = "nimbus.NimbusService"
PROTOCOL_KEY = "nimbus-protocol"


class NimbusService:
    """grpclib service object; one instance per server."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            f"/{SERVICE}/ProcessEvent": grpclib.const.Handler(
                self.process_event,
                grpclib.const.Cardinality.STREAM_STREAM,
                EventRequest,
                EventResponse,
            )
        }

    async def process_event(self, stream: Stream[EventRequest, EventResponse]) -> None:
        md = stream.metadata or {}
        client_id = str(md.get("client_id", "")).strip()
        if not client_id:
            raise GRPCError(grpclib.const.Status.INVALID_ARGUMENT, "client_id not received or empty in metadata")
        if not self.pod.accepting:
            raise GRPCError(grpclib.const.Status.UNAVAILABLE, "server is shutting down")
        protocol = 2 if str(md.get(PROTOCOL_KEY, "")) == "2" else 1
        try:
            session = await trio_asyncio.trio_as_aio(self.pod.open_session)(client_id, protocol)
        except EngineError as e:
            raise GRPCError(grpclib.const.Status.UNAVAILABLE, f"state store unavailable: {e}") from None
        reader = asyncio.ensure_future(self._reader(stream, session))
        writer = asyncio.ensure_future(self._writer(stream, session))
        try:
            # The writer ends on Close (superseded, slow, shutdown) or a broken stream; the reader
            # ends the stream only if it broke (a half-close keeps it open for results). A writer
            # blocked on a client that stopped reading is freed by the reader seeing the reset.
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and not reader.exception() and not reader.result():
                await writer
            elif writer in done:
                writer.result()
        finally:
            reader.cancel()
            writer.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await asyncio.shield(trio_asyncio.trio_as_aio(self.pod.close_session)(session))

    async def _reader(self, stream: Stream[EventRequest, EventResponse], s: Session) -> bool:
        """Feed the pod; True if the stream broke, False if the client half-closed."""
        pod = self.pod
        try:
            async for req in stream:
                if req.ack:
                    pod.on_ack(s, req.ack)
                if req.event_name or not req.ack:
                    if not pod.submit(s, req):
                        await trio_asyncio.trio_as_aio(pod.submit_wait)(s, req)
        except (StreamTerminatedError, GRPCError, ConnectionError):
            return True
        return False

    async def _writer(self, stream: Stream[EventRequest, EventResponse], s: Session) -> None:
        pod = self.pod
        try:
            while True:
                item = await s.outbox.get()
                if isinstance(item, Close):
                    if item.status is None:
                        return
                    raise GRPCError(grpclib.const.Status[item.status], item.message)
                delivery_id, resp = item
                if resp is not None:  # None: a GAP the original's client cannot be told of
                    await stream.send_message(resp)
                if delivery_id:
                    pod.on_written(s, delivery_id)
        except (StreamTerminatedError, ConnectionError):
            return


@contextlib.asynccontextmanager
async def serve_grpc(pod: Pod, host: str, port: int) -> AsyncIterator[tuple[Server, int]]:
    """Serve the Nimbus service, health and reflection; yields (server, bound port)."""
    service = NimbusService(pod)
    health = Health()
    services: list[Any] = ServerReflection.extend([service, health])
    server = Server(services)
    await trio_asyncio.aio_as_trio(server.start)(host, port)
    sockets = server._server.sockets if server._server else []  # noqa: SLF001
    bound = sockets[0].getsockname()[1] if sockets else port
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
    state: StateStore,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The doorman until cancelled; reports the bound port. Must run inside trio_asyncio."""
    pod = Pod(settings, log, state)
    async with trio.open_nursery() as nursery:
        await nursery.start(pod.run)
        async with serve_grpc(pod, settings.host, settings.port) as (_, port):
            logger.info("doorman listening on {}:{} (pod channel {})", settings.host, port, settings.pod_channel)
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
            await run_with_signals(lambda task_status: run_server(settings, engine.log, engine.state, task_status=task_status))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nimbus.server", description=__doc__)
    parser.parse_args(argv)
    run_process("nimbus.server", "server", main_async)


if __name__ == "__main__":
    main()
