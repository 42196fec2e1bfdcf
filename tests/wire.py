"""A bare grpclib client for tests: one stream, no library logic, so tests see the wire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from grpclib.client import Channel, Stream

from nimbus.proto_gen.nimbus import EventRequest, EventResponse, ResponseKind

PATH = "/nimbus.NimbusService/ProcessEvent"


class WireStream:
    """Trio-side handle on one ProcessEvent stream (each call crosses to asyncio: fine in tests)."""

    def __init__(self, stream: Stream[EventRequest, EventResponse]) -> None:
        self.stream = stream

    async def send(self, req: EventRequest) -> None:
        await trio_asyncio.aio_as_trio(self.stream.send_message)(req)

    async def event(self, name: str, number: int, seq: int = 0) -> None:
        await self.send(EventRequest(event_name=name, number=number, seq=seq))

    async def ack(self, delivery_id: int) -> None:
        await self.send(EventRequest(ack=delivery_id))

    async def recv(self) -> EventResponse | None:
        return await trio_asyncio.aio_as_trio(self.stream.recv_message)()

    async def results(self, n: int, *, ack: bool = True) -> list[EventResponse]:
        """The next n RESULT messages (receipts skipped), acking each as it comes."""
        out: list[EventResponse] = []
        while len(out) < n:
            r = await self.recv()
            assert r is not None, f"stream ended after {len(out)} of {n} results"
            if r.kind == ResponseKind.RESULT:
                out.append(r)
                if ack and r.delivery_id:
                    await self.ack(r.delivery_id)
        return out

    async def status(self) -> None:
        """After the last response: the stream's trailers; raises GRPCError unless it is OK."""
        await trio_asyncio.aio_as_trio(self.stream.recv_trailing_metadata)()

    async def end(self) -> None:
        await trio_asyncio.aio_as_trio(self.stream.end)()

    async def cancel(self) -> None:
        await trio_asyncio.aio_as_trio(self.stream.cancel)()


@asynccontextmanager
async def open_stream(
    port: int, metadata: dict[str, Any] | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[WireStream]:
    """Needs a running trio_asyncio loop."""
    channel = Channel(host, port)
    stream_cm = channel.request(
        PATH, _cardinality(), EventRequest, EventResponse, metadata=metadata
    )
    stream = await trio_asyncio.aio_as_trio(stream_cm.__aenter__)()
    try:
        await trio_asyncio.aio_as_trio(stream.send_request)()
        yield WireStream(stream)
    finally:
        with trio.move_on_after(5) as cs:
            cs.shield = True
            try:
                await trio_asyncio.aio_as_trio(stream.cancel)()
            except Exception:
                pass
            try:
                await trio_asyncio.aio_as_trio(stream_cm.__aexit__)(None, None, None)
            except Exception:
                pass
        channel.close()


def _cardinality() -> Any:
    from grpclib.const import Cardinality

    return Cardinality.STREAM_STREAM
