"""Limits and slow clients: the token bucket (pure), then each limit end to end with grpcio
asserting the status a client sees, and a client that stops reading: cut at its queue bound
with a clear status, and given everything it missed when it comes back.

Delivery contract around a cut: results written but not acknowledged, results still queued and
results arriving for the cut stream are all reported undelivered by the pod, so the router
diverts them to the client's backlog (DLQ) in order; the replay brings them back with the same
delivery ids. So the test counts, on the reconnect, every result of every event that reached
the events topic, in order, without a duplicate."""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any

import trio

from nimbus.core.lifecycle import Status
from nimbus.core.limits import RateLimiter, TokenBucket
from nimbus.proto_gen.nimbus import ErrorCode, ResponseKind
from tests.test_auth import grpcio_stream
from tests.test_interop_grpcio import stubs  # noqa: F401 (fixture)
from tests.test_pipeline import P2, cluster, engine, wait_status  # noqa: F401 (fixture)
from tests.wire import open_stream

# --- token bucket ------------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket.full(rate=10, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(0.05)  # half a token
    assert b.take(0.1)  # one token after 0.1 s
    assert not b.take(0.1)
    assert [b.take(10.0) for _ in range(6)] == [True] * 5 + [False]  # never more than the burst


def test_a_refused_take_takes_nothing_and_time_never_runs_backwards() -> None:
    b = TokenBucket.full(rate=1, burst=1, now=5.0)
    assert b.take(5.0)
    assert not b.take(5.5)
    assert b.take(6.0)  # the refused take at 5.5 cost nothing
    assert not b.take(4.0)  # an earlier clock reading adds nothing
    assert b.take(7.0)


def test_limiter_is_per_client_and_forgets_idle_clients() -> None:
    lim = RateLimiter(rate=2, burst=2)
    assert [lim.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert lim.allow("b", 0.0)  # b has its own bucket
    assert len(lim) == 2
    assert lim.prune(0.25) == 0  # a and b are still refilling
    assert lim.prune(1.0) == 2  # both full again: forgotten, as good as new
    assert len(lim) == 0 and lim.allow("a", 1.0)
    assert RateLimiter(rate=0).allow("x", 0.0)  # 0: unlimited


def test_limiter_table_stays_bounded_by_active_clients() -> None:
    lim = RateLimiter(rate=1000, burst=1)
    for i in range(100_000):
        lim.allow(f"c{i}", i * 0.01)  # each bucket is full again 1 ms later
    assert len(lim) <= 2048


# --- limits end to end -------------------------------------------------------------------------


async def test_event_rate_limit_protocol2_per_event_errors_then_retries_lose_nothing(
    unique: str,
) -> None:
    cid = f"rate-{unique}"
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, client_event_rate=5, client_event_burst=5) as c:
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                for n in range(1, 21):
                    await st.event("sq", n, seq=n)
                receipts: dict[int, int] = {}
                errors: dict[int, Any] = {}
                got = []
                while len(receipts) + len(errors) < 20 or len(got) < len(receipts):
                    r = await st.recv()
                    assert r is not None
                    if r.kind == ResponseKind.RECEIPT:
                        receipts[r.seq] = r.delivery_id
                    elif r.kind == ResponseKind.ERROR:
                        errors[r.seq] = r.error
                    else:
                        got.append(r)
                        await st.ack(r.delivery_id)
            assert 5 <= len(receipts) < 20 and set(receipts) | set(errors) == set(range(1, 21))
            assert all(
                e.code == ErrorCode.UNAVAILABLE and "rate limit" in e.message
                for e in errors.values()
            )
            # Every receipted event has its result, in receipt order; refused ones have none.
            assert [r.number for r in got] == sorted(receipts)
    # The client library retries refused events after a backoff: every event gets its result.
    from nimbus.client import open_client

    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, client_event_rate=20, client_event_burst=5) as c:
            async with open_client([f"127.0.0.1:{c.ports[0]}"], f"{cid}-lib") as client:
                for n in range(1, 31):
                    await client.send("sq", n)
                got_lib = [await client.receive() for _ in range(30)]
            assert sorted(r.number for r in got_lib) == list(range(1, 31))
            assert client.stats.retries > 0


async def test_event_rate_limit_protocol1_ends_the_stream_with_resource_exhausted(
    unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    cid = f"rate1-{unique}"
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, client_event_rate=5, client_event_burst=5) as c:
            code, details, _ = await trio.to_thread.run_sync(
                grpcio_stream, c.ports[0], [("client_id", cid)], stubs, list(range(1, 21)), 20
            )
            assert code == "RESOURCE_EXHAUSTED" and "rate limit" in details, (code, details)


async def test_oversized_message_is_refused_and_nothing_receipted_is_lost(
    unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    import grpc

    pb2, grpc_mod = stubs
    cid = f"big-{unique}"

    def run(port: int) -> tuple[str, str, list[Any]]:
        seen: list[Any] = []
        receipted = threading.Event()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = grpc_mod.NimbusServiceStub(ch)

            def requests():  # type: ignore[no-untyped-def]
                yield pb2.EventRequest(event_name="sq", number=7, seq=1)
                receipted.wait(10)
                yield pb2.EventRequest(event_name="x" * 5000, number=8, seq=2)
                time.sleep(10)

            call = stub.ProcessEvent(
                requests(), metadata=[("client_id", cid), ("nimbus-protocol", "2")], timeout=20
            )
            try:
                for r in call:
                    seen.append(r)
                    if r.kind == pb2.RECEIPT:
                        receipted.set()
            except grpc.RpcError as e:
                return e.code().name, e.details() or "", seen
            return "OK", "", seen

    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, max_message_bytes=1024) as c:
            code, details, seen = await trio.to_thread.run_sync(run, c.ports[0])
            assert code == "RESOURCE_EXHAUSTED" and "over the limit of 1024 bytes" in details, (
                code,
                details,
            )
            assert any(r.kind == pb2.RECEIPT and r.seq == 1 for r in seen)
            await wait_status(c, cid, Status.OFFLINE)
            # The receipted event's result (acked or not before the cut) comes on the next stream.
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                [r] = await st.results(1)
                assert (r.number, r.result) == (7, 49)


async def test_max_streams_per_pod(unique: str, stubs: tuple[ModuleType, ModuleType]) -> None:
    a, b, x = (f"{n}-{unique}" for n in "abx")
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}, max_streams=2) as c:
            port = c.ports[0]
            async with (
                open_stream(port, {"client_id": a, **P2}) as sa,
                open_stream(port, {"client_id": b, **P2}) as sb,
            ):
                for s in (sa, sb):
                    await s.event("sq", 2, seq=1)
                    assert (await s.recv()).kind == ResponseKind.RECEIPT  # type: ignore[union-attr]
                code, details, _ = await trio.to_thread.run_sync(
                    grpcio_stream, port, [("client_id", x)], stubs, [3], 1
                )
                assert code == "RESOURCE_EXHAUSTED" and "maximum of 2 streams" in details, (
                    code,
                    details,
                )
                assert await c.engine.state.get(x) is None  # refused before any state change
                # A client already here may replace its own stream at the limit (and first gets
                # the result its old stream left unacknowledged).
                code, details, got = await trio.to_thread.run_sync(
                    grpcio_stream, port, [("client_id", a), ("nimbus-protocol", "2")], stubs, [3], 2
                )
                assert code == "OK" and [r.result for r in got] == [4, 9], (code, details)
            await wait_status(c, b, Status.OFFLINE)
            code, details, got = await trio.to_thread.run_sync(
                grpcio_stream, port, [("client_id", x)], stubs, [4], 1
            )
            assert code == "OK" and [r.result for r in got] == [16], (code, details)


# --- slow clients ------------------------------------------------------------------------------


def non_reading_client(
    port: int, cid: str, stub_mods: tuple[ModuleType, ModuleType], n: int, cut: threading.Event
) -> tuple[str, str, list[Any]]:
    """Protocol 2 over grpcio: send 1..n, read nothing until `cut` is set, then read what the
    transport buffered and the status."""
    import grpc

    pb2, grpc_mod = stub_mods
    # No BDP probing: grpcio keeps its stream window at the default, so the server's writer
    # meets flow control after a known amount instead of a window grpcio grows as it likes.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = grpc_mod.NimbusServiceStub(ch)

        def requests():  # type: ignore[no-untyped-def]
            for i in range(1, n + 1):
                yield pb2.EventRequest(event_name="sq", number=i, seq=i)
            cut.wait(100)

        call = stub.ProcessEvent(
            requests(), metadata=[("client_id", cid), ("nimbus-protocol", "2")], timeout=120
        )
        assert cut.wait(100), "the server never cut the stream"
        seen: list[Any] = []
        try:
            for r in call:
                seen.append(r)
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", seen
        return "OK", "", seen


async def test_a_client_that_stops_reading_is_cut_and_later_gets_everything(
    engine: dict[str, Any], unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    cid = f"slow-{unique}"
    n = 5000
    with trio.fail_after(180):
        async with cluster(engine, stream_queue=1500, replay_window=500) as c:
            cut = threading.Event()
            async with trio.open_nursery() as nursery:
                outcome: list[tuple[str, str, list[Any]]] = []

                async def client() -> None:
                    outcome.append(
                        await trio.to_thread.run_sync(
                            non_reading_client, c.ports[0], cid, stubs, n, cut
                        )
                    )

                nursery.start_soon(client)
                # The pod cuts it (queue full) and marks it OFFLINE; its results go to the backlog.
                try:
                    # (No record exists before the connect: OFFLINE can only mean the cut.)
                    await wait_status(c, cid, Status.OFFLINE, timeout=120)
                finally:
                    cut.set()
            [(code, details, seen)] = outcome
            assert code == "RESOURCE_EXHAUSTED" and "does not read" in details, (
                code,
                details,
                len(seen),
            )
            pb2, _ = stubs
            first_results = [r for r in seen if r.kind == pb2.RESULT]
            assert len(first_results) < n  # it really was cut before getting everything
            produced = sum((await c.engine.log.end_offsets(c.settings.kafka_events_topic)).values())
            assert produced > len(first_results)

            # Back, and reading: every result of every event that reached Kafka, in order, once.
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                got = []
                while len(got) < produced:
                    r = await st.recv()
                    assert r is not None, f"stream ended after {len(got)} of {produced} results"
                    if r.kind == ResponseKind.RESULT:
                        got.append(r)
                        if len(got) % 100 == 0 or len(got) == produced:
                            await st.ack(r.delivery_id)  # cumulative
                await wait_status(c, cid, Status.LIVE, timeout=60)
            assert [r.number for r in got] == list(range(1, produced + 1))
            ids = [r.delivery_id for r in got]
            assert ids == sorted(set(ids))
            # Results seen before the cut come again with the same delivery ids (the client
            # library drops them as duplicates).
            assert {r.delivery_id: r.number for r in first_results}.items() <= {
                r.delivery_id: r.number for r in got
            }.items()


async def test_a_non_reading_stream_that_is_superseded_ends_and_the_new_one_gets_everything(
    unique: str, stubs: tuple[ModuleType, ModuleType]
) -> None:
    """The queue is big enough that the first stream is not cut; its writer waits on a full
    window when a second stream for the same client arrives. The first ends with ABORTED (grpcio
    reports it once the client reads what came before it) and the second gets every result,
    once, in order: the first's unacknowledged results went to the backlog."""
    cid = f"supersede-{unique}"
    n = 3000
    with trio.fail_after(180):
        async with cluster({"engine": "memory"}, stream_queue=20_000) as c:
            cut = threading.Event()
            outcome: list[tuple[str, str, list[Any]]] = []
            async with trio.open_nursery() as nursery:

                async def client() -> None:
                    outcome.append(
                        await trio.to_thread.run_sync(
                            non_reading_client, c.ports[0], cid, stubs, n, cut
                        )
                    )

                nursery.start_soon(client)
                try:
                    with trio.fail_after(60):
                        topic = c.settings.kafka_events_topic
                        while True:
                            if sum((await c.engine.log.end_offsets(topic)).values()) >= n:
                                break  # every event produced
                            await trio.sleep(0.05)
                    rec = await c.engine.state.get(cid)
                    # Not cut: still connected with its first stream. (LIVE, or REPLAYING when
                    # unconfirmed live deliveries outlived the delivery timeout and went to the
                    # backlog: this client reads nothing, so it acks nothing.)
                    assert rec is not None and rec.epoch == 1, rec
                    assert rec.status in (Status.LIVE, Status.REPLAYING), rec
                    async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                        got = []
                        while len(got) < n:
                            r = await st.recv()
                            assert r is not None, f"stream ended after {len(got)} of {n} results"
                            if r.kind == ResponseKind.RESULT:
                                got.append(r)
                                if len(got) % 100 == 0:
                                    await st.ack(r.delivery_id)
                        # LIVE (at once, or after acking the backlog that the first stream's
                        # unconfirmed deliveries became).
                        await wait_status(c, cid, Status.LIVE)
                        rec = await c.engine.state.get(cid)
                        assert rec is not None and rec.epoch == 2
                finally:
                    cut.set()
            [(code, details, _)] = outcome
            assert code == "ABORTED" and "superseded" in details, (code, details)
            assert [r.number for r in got] == list(range(1, n + 1))
