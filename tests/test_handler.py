"""The doorman's gRPC handler (`nimbus.doorman.server.NimbusService`) without a socket:
grpclib.testing.ChannelFor joins a client Channel and a grpclib Server over an in-memory
transport, both on the asyncio side of trio-asyncio, while the Pod and the workers run on the trio
side on the in-memory engine, as tests/harness.py starts them (the listening socket and the
connection edge of `serve_grpc` left out).

Every test runs under a `fail_after`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.const import Status as GStatus
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor

from nimbus.doorman.pod import Pod
from nimbus.doorman.server import NimbusService
from nimbus.proto_gen.nimbus import EventRequest, EventResponse, ResponseKind
from nimbus.wire import grpc as grpcwire
from tests.harness import Cluster, open_cluster
from tests.wire import PATH, WireStream

P2 = {"nimbus-protocol": "2"}


@dataclass
class Handler:
    cluster: Cluster
    pod: Pod
    channel: Channel

    @asynccontextmanager
    async def stream(self, metadata: dict[str, Any]) -> AsyncIterator[WireStream]:
        """One ProcessEvent call on the in-memory channel, its request headers sent."""
        cm = self.channel.request(
            PATH, Cardinality.STREAM_STREAM, EventRequest, EventResponse, metadata=metadata
        )
        async with trio_asyncio.aio_as_trio(cm) as stream:
            await trio_asyncio.aio_as_trio(stream.send_request)()
            yield WireStream(stream)


@asynccontextmanager
async def open_handler(**overrides: Any) -> AsyncIterator[Handler]:
    """The workers and one Pod (trio side) on the in-memory engine, and a channel to a grpclib
    Server holding the pod's NimbusService (asyncio side), joined in memory."""
    async with (
        trio_asyncio.open_loop(),
        open_cluster(pods=0, delivery_timeout_ms=2000, status_interval_ms=200, **overrides) as c,
    ):
        pod = Pod(c.settings, c.engine.log, c.engine.state)
        await c.nursery.start(pod.run)
        grpcwire.slim_grpclib_streams()  # as serve_grpc does
        channel_for = ChannelFor([NimbusService(pod)])
        channel = await trio_asyncio.aio_as_trio(channel_for.__aenter__)()
        try:
            yield Handler(c, pod, channel)
        finally:
            with trio.move_on_after(5) as cs:
                cs.shield = True
                # Ends the handlers still running (they close their sessions on the pod).
                await trio_asyncio.aio_as_trio(channel_for.__aexit__)(None, None, None)


async def test_event_receipt_result_and_ack_then_the_stream_ends_ok(unique: str) -> None:
    cid = f"h-{unique}"
    with trio.fail_after(20):
        async with open_handler() as h, h.stream({"client_id": cid, **P2}) as st:
            await st.event("sq", 7, seq=1)
            receipt = await st.recv()
            assert receipt is not None and receipt.kind == ResponseKind.RECEIPT
            assert receipt.seq == 1 and receipt.delivery_id > 0
            [result] = await st.results(1)  # acked as it comes
            assert result.result == 49 and result.delivery_id == receipt.delivery_id
            assert cid in h.pod.sessions
            await st.end()  # half-closed: the writer ends the stream with OK
            assert await st.recv() is None
            await st.status()
            await h.pod.wait_empty()  # the handler closed its session
            rec = await h.cluster.engine.state.get(cid)
            assert rec is not None and rec.acked >= result.delivery_id


@pytest.mark.parametrize("metadata", [{}, {"client_id": "   "}])
async def test_no_client_id_is_invalid_argument_and_opens_no_session(
    metadata: dict[str, str],
) -> None:
    with trio.fail_after(20):
        async with open_handler() as h:
            with pytest.raises(GRPCError) as e:
                async with h.stream({**metadata, **P2}) as st:
                    r = await st.recv()
                    pytest.fail(f"a response instead of a refusal: {r}")
            assert e.value.status is GStatus.INVALID_ARGUMENT
            assert e.value.message == "client_id not received or empty in metadata"
            assert not h.pod.sessions


async def test_a_message_over_the_size_limit_ends_the_stream_resource_exhausted(
    unique: str,
) -> None:
    with trio.fail_after(20):
        async with open_handler(max_message_bytes=1024) as h:
            with pytest.raises(GRPCError) as e:
                async with h.stream({"client_id": f"big-{unique}", **P2}) as st:
                    await st.event("sq", 2, seq=1)
                    [result] = await st.results(1)
                    assert result.result == 4
                    await st.event("x" * 2000, 1, seq=2)
                    while (r := await st.recv()) is not None:
                        assert r.kind != ResponseKind.RESULT, r
            assert e.value.status is GStatus.RESOURCE_EXHAUSTED
            assert "over the limit of 1024 bytes" in (e.value.message or "")
            assert h.pod.counters["server.message_too_large"] == 1


async def test_bytes_that_are_no_event_request_end_the_stream_invalid_argument(
    unique: str,
) -> None:
    with trio.fail_after(20):
        async with open_handler() as h:
            with pytest.raises(GRPCError) as e:
                async with h.stream({"client_id": f"bad-{unique}", **P2}) as st:
                    garbage = grpcwire.frame([b"\xff\xff\xff"])  # no protobuf message parses
                    await trio_asyncio.aio_as_trio(grpcwire.client_send)(st.stream, garbage, 1)
                    r = await st.recv()
                    pytest.fail(f"a response instead of a refusal: {r}")
            assert e.value.status is GStatus.INVALID_ARGUMENT
            assert e.value.message == "malformed message"


async def test_a_pod_shutting_down_refuses_new_streams_unavailable(unique: str) -> None:
    with trio.fail_after(20):
        async with open_handler() as h:
            h.pod.accepting = False
            with pytest.raises(GRPCError) as e:
                async with h.stream({"client_id": f"late-{unique}", **P2}) as st:
                    r = await st.recv()
                    pytest.fail(f"a response instead of a refusal: {r}")
            assert e.value.status is GStatus.UNAVAILABLE
            assert e.value.message == "server is shutting down"
            assert not h.pod.sessions
