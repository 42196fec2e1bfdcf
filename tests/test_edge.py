"""The gRPC port's edge (issue #14): what a stranger's connection may cost, and what happens when
it costs too much. Each limit is set small here and driven with raw sockets or a bare grpclib
stream (tests/wire.py), on the in-memory engine; the descriptor flood runs the all-in-one in a
process of its own with a low `ulimit -n`.

Every I/O test runs under a `fail_after`.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio
from grpclib.const import Status as GStatus
from grpclib.exceptions import GRPCError, StreamTerminatedError

from nimbus import config
from nimbus.core.lifecycle import Status
from nimbus.doorman.pod import ITEM_OVERHEAD, Budget, Close, Outbox, Pod, Session, item_bytes
from nimbus.engines.memory import MemoryLog, MemoryState
from nimbus.proto_gen.nimbus import EventRequest, EventResponse, ResponseKind
from nimbus.topics import ensure_topics
from tests.harness import real_env
from tests.test_auth import grpcio_stream
from tests.test_interop_grpcio import stubs  # noqa: F401 (fixture)
from tests.test_pipeline import P2, cluster, wait_status
from tests.wire import open_stream

ROOT = Path(__file__).resolve().parent.parent
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GOAWAY = 7


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of the whole HTTP/2 frames in `data` (server side: no preface)."""
    out = []
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        out.append((data[3], data[9 : 9 + n]))
        data = data[9 + n :]
    return out


async def until_closed(sock: trio.SocketStream, within: float) -> tuple[float, bytes]:
    """Read until the server closes the connection: (seconds it took, everything received)."""
    t0 = trio.current_time()
    got = b""
    with trio.fail_after(within):
        while True:
            try:
                chunk = await sock.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            got += chunk
    return trio.current_time() - t0, got


async def test_connections_that_never_become_clients_are_closed() -> None:
    """Nothing sent, half the preface: closed at the handshake limit. The preface alone (no
    stream): closed at the idle limit, with a GOAWAY. A protocol error: closed at once, with
    the GOAWAY that names it."""
    async with cluster({"engine": "memory"}, handshake_timeout_sec=1, idle_connection_sec=2) as c:
        port = c.ports[0]

        async def case(payload: bytes) -> tuple[float, bytes]:
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            if payload:
                await sock.send_all(payload)
            return await until_closed(sock, 10)

        took, _ = await case(b"")
        assert 0.8 < took < 3.0, took
        took, _ = await case(PREFACE[:10])
        assert 0.8 < took < 3.0, took
        took, got = await case(PREFACE + EMPTY_SETTINGS)
        assert 1.8 < took < 6.0, took
        goaways = [p for t, p in frames(got) if t == GOAWAY]
        assert goaways and goaways[0][4:8] == b"\x00\x00\x00\x00", frames(got)  # NO_ERROR
        # DATA on stream 0 is a connection error (PROTOCOL_ERROR, code 1).
        took, got = await case(
            PREFACE + EMPTY_SETTINGS + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd"
        )
        assert took < 0.8, took
        goaways = [p for t, p in frames(got) if t == GOAWAY]
        assert goaways and goaways[0][4:8] == b"\x00\x00\x00\x01", frames(got)
        # The server still serves a real client after all that.
        async with open_stream(port, {"client_id": "after", **P2}) as st:
            await st.event("sq", 12, seq=1)
            (r,) = await st.results(1)
            assert r.result == 144


async def test_a_stream_that_sends_nothing_ends_with_deadline_exceeded(
    stubs: tuple[ModuleType, ModuleType],
) -> None:
    with trio.fail_after(30):
        async with cluster({"engine": "memory"}, first_message_sec=1) as c:
            t0 = trio.current_time()
            code, details, _ = await trio.to_thread.run_sync(
                lambda: grpcio_stream(c.ports[0], [("client_id", "mute")], stubs, [], 1)
            )
            assert code == "DEADLINE_EXCEEDED" and "no message within 1s" in details
            assert 0.8 < trio.current_time() - t0 < 5
            # An empty first message (what the client library sends on opening: a "hello")
            # counts; nothing comes back for it, and the stream stays.
            async with open_stream(c.ports[0], {"client_id": "hello", **P2}) as st:
                await st.send(EventRequest())
                with trio.move_on_after(2):
                    r = await st.recv()
                    raise AssertionError(f"a hello got an answer, or the stream ended: {r}")
                await st.event("sq", 3, seq=1)
                (r,) = await st.results(1)
                assert r.result == 9


async def test_a_half_closed_stream_ends_ok_once_its_results_are_delivered() -> None:
    """A request-then-wait client (grpcurl, ghz): it sends, half-closes, gets its results and
    an OK. Empty: OK at once. Protocol 2 cannot ack once half-closed: its results stay in its
    backlog and come again, with the same delivery ids, on its next stream."""
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            port = c.ports[0]
            for meta in ({}, P2):
                async with open_stream(port, {"client_id": f"hc-{len(meta)}", **meta}) as st:
                    for n in (2, 3, 4):
                        await st.event("sq", n, seq=n)
                    await st.end()
                    got = []
                    while True:
                        r = await st.recv()
                        if r is None:
                            break  # the server ended the stream with OK (else: GRPCError)
                        if r.kind == ResponseKind.RESULT:
                            got.append(r.result)
                    await st.status()  # OK, or it raises
                    assert got == [4, 9, 16]
            # The protocol-2 client's results were not acked: they come again.
            async with open_stream(port, {"client_id": f"hc-{len(P2)}", **P2}) as st:
                again = await st.results(3)
                assert [r.result for r in again] == [4, 9, 16]
            t0 = trio.current_time()
            async with open_stream(port, {"client_id": "hc-empty", **P2}) as st:
                await st.end()
                assert await st.recv() is None
                await st.status()
            assert trio.current_time() - t0 < 2
            await wait_status(c, "hc-empty", Status.OFFLINE)


async def test_a_half_closed_stream_whose_results_do_not_come_ends_at_its_limit() -> None:
    with trio.fail_after(30):
        # No workers: the event is receipted, its result never comes.
        async with cluster({"engine": "memory"}, roles=(), half_closed_sec=1) as c:
            async with open_stream(c.ports[0], {"client_id": "noresult", **P2}) as st:
                await st.event("sq", 5, seq=1)
                await st.end()
                t0 = trio.current_time()
                kinds = []
                with pytest.raises(GRPCError) as e:
                    while (r := await st.recv()) is not None:
                        kinds.append(r.kind)
                    await st.status()
                assert e.value.status is GStatus.DEADLINE_EXCEEDED
                assert kinds == [ResponseKind.RECEIPT]
                assert 0.8 < trio.current_time() - t0 < 4


async def test_a_half_closed_stream_is_not_ended_while_its_last_event_is_being_produced() -> None:
    """The race CI once hit (the test above ended OK with no result): the ingest task had taken
    the event from its queue and was still producing it when the client half-closed, and the
    stream was ended before its receipt. It must wait for the receipt, then for its result."""
    settings = config.load(env={"NIMBUS_HALF_CLOSED_SEC": "30"}, dotenv=False, instance_id="p")
    pod = Pod(settings, MemoryLog(), MemoryState())
    gate, entered = trio.Event(), trio.Event()
    send_batch = pod.log.producer.send_batch

    async def slow_send_batch(topic: str, items: Any) -> Any:
        entered.set()
        await gate.wait()
        return await send_batch(topic, items)

    pod.log.producer.send_batch = slow_send_batch  # type: ignore[method-assign]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await ensure_topics(pod.log, settings)
            await nursery.start(pod.run)
            s = await pod.open_session("racer", 2)
            s2 = await pod.open_session("unknown", 2)
            assert pod.submit(s, EventRequest(event_name="sq", number=5, seq=1))
            assert pod.submit(s2, EventRequest(event_name="nope", number=1, seq=1))
            await entered.wait()  # taken from the queue, being produced
            pod.half_close(s)
            pod.half_close(s2)
            await trio.testing.wait_all_tasks_blocked()
            assert not s.closed and not s2.closed
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            # The receipt went out; its result is still due, so the stream stays open.
            assert [item[1].kind for item in _drain(s.outbox)] == [ResponseKind.RECEIPT]
            assert not s.closed and s.last_receipted == 1
            # The unknown event's error was the last thing due: that stream ends cleanly.
            kinds = _drain(s2.outbox)
            assert [k[1].kind for k in kinds[:-1]] == [ResponseKind.ERROR]
            assert isinstance(kinds[-1], Close) and kinds[-1].status is None
            assert s2.closed
            nursery.cancel_scope.cancel()


def _drain(outbox: Outbox) -> list[Any]:
    out = []
    while not outbox.empty():
        item = outbox.get_nowait()
        if isinstance(item, tuple) and isinstance(item[1], bytes):
            item = (item[0], EventResponse().parse(item[1]))
        out.append(item)
    return out


async def test_a_client_id_over_the_limit_is_refused_before_any_state_changes(
    stubs: tuple[ModuleType, ModuleType],
) -> None:
    with trio.fail_after(30):
        async with cluster({"engine": "memory"}, max_client_id_bytes=64) as c:
            long_id = "x" * 65
            code, details, _ = await trio.to_thread.run_sync(
                lambda: grpcio_stream(c.ports[0], [("client_id", long_id)], stubs, [1], 1)
            )
            assert code == "INVALID_ARGUMENT" and "at most 64" in details
            assert await c.engine.state.get(long_id) is None
            ok_id = "y" * 64
            async with open_stream(c.ports[0], {"client_id": ok_id, **P2}) as st:
                await st.event("sq", 2, seq=1)
                (r,) = await st.results(1)
                assert r.result == 4


# -- memory in bytes -------------------------------------------------------------------------


def test_an_outbox_is_bounded_in_bytes_and_counts_towards_the_pod() -> None:
    budget = Budget(10_000)
    box = Outbox(maxsize=1000, maxbytes=3 * (1000 + ITEM_OVERHEAD), budget=budget)
    payload = b"r" * 1000
    for i in range(3):
        box.put_nowait((i + 1, payload))
    assert box.nbytes == budget.used == 3 * item_bytes((1, payload))
    with pytest.raises(asyncio.QueueFull):
        box.put_nowait((4, payload))  # over its bytes long before its count
    box.put_nowait(Close("RESOURCE_EXHAUSTED"))  # a close always fits
    box.get_nowait()
    assert box.nbytes == budget.used == 2 * item_bytes((1, payload))
    box.clear()
    assert box.nbytes == budget.used == 0 and box.empty()


async def test_the_pod_cuts_the_stream_holding_the_most_when_over_its_budget() -> None:
    s = config.load(env={}, dotenv=False, pod_queue_bytes=1 << 20, stream_queue_bytes=1 << 20)
    pod = Pod(s, MemoryLog(), MemoryState())
    pod.budget.limit = 10 * (1000 + ITEM_OVERHEAD)
    big = Session("big", 2, Outbox(1000, 1 << 20, pod.budget), 1, epoch=1)
    small = Session("small", 2, Outbox(1000, 1 << 20, pod.budget), 2, epoch=1)
    pod.sessions = {"big": big, "small": small}
    payload = b"r" * 1000
    for i in range(8):
        assert pod._send(big, payload, i + 1)  # type: ignore[arg-type]
    assert pod._send(small, payload, 1)  # type: ignore[arg-type]
    assert pod._send(small, payload, 2)  # type: ignore[arg-type]
    # Over the budget: the one holding the most is cut, whoever pushed it over.
    assert pod._send(small, payload, 3)  # type: ignore[arg-type]
    assert big.closed and not small.closed
    assert pod.budget.used == small.outbox.nbytes
    assert pod.counters["pod.slow_client"] == 1


async def test_ingest_waits_for_room_in_bytes() -> None:
    s = config.load(env={}, dotenv=False, ingest_queue_bytes=65_536)
    pod = Pod(s, MemoryLog(), MemoryState())
    st = Session("a", 2, Outbox(), 1, epoch=1)
    req = EventRequest(event_name="sq", number=1)
    assert pod.submit(st, req, 40_000)  # type: ignore[arg-type]
    assert not pod.submit(st, req, 40_000)  # type: ignore[arg-type]
    assert pod.submit(st, req, 20_000)  # type: ignore[arg-type]
    assert st.in_ingest == 2
    done = []
    with trio.fail_after(5):
        async with trio.open_nursery() as n:

            async def wait() -> None:
                await pod.submit_wait(st, req, 40_000)  # type: ignore[arg-type]
                done.append(True)

            n.start_soon(wait)
            await trio.sleep(0.1)
            assert not done  # no room yet
            n.start_soon(pod._ingest)  # takes the queued events: room again
            with trio.fail_after(2):
                while not done:  # noqa: ASYNC110 - polling a list the other task appends to
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(port: int, env: dict[str, str], nofile: int | None = None) -> subprocess.Popen[str]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [sys.executable, "-m", "nimbus"],
        cwd=ROOT,
        env={
            **os.environ,
            "NIMBUS_PORT": str(port),
            "NIMBUS_HOST": "127.0.0.1",
            "NIMBUS_WEB_PORT": "0",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit,
    )


def _wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


def _one_result(port: int, cid: str) -> int:
    """One sq round trip through the server with a fresh client process of ours (grpclib)."""

    async def go() -> int:
        async with trio_asyncio.open_loop():
            async with open_stream(port, {"client_id": cid, **P2}) as st:
                await st.event("sq", 7, seq=1)
                (r,) = await st.results(1)
                return int(r.result)

    async def bounded() -> int:
        with trio.fail_after(20):
            return await go()

    return trio.run(bounded)


def test_a_descriptor_flood_does_not_take_the_server_down() -> None:
    """With `ulimit -n 128`, 200 bare TCP connections make accept() fail with EMFILE: the server
    logs it, keeps serving, and serves a normal client as soon as the flood stops."""
    port = _free_port()
    proc = _server(port, {"NIMBUS_HANDSHAKE_TIMEOUT_SEC": "60"}, nofile=128)
    flood: list[socket.socket] = []
    try:
        _wait_listening(port, proc)
        for _ in range(250):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except OSError:
                pass  # the listen backlog is full while the server cannot accept
        time.sleep(2.5)  # accept() has failed, and been retried, meanwhile
        assert proc.poll() is None, "the server died of the flood"
        for sock in flood:
            sock.close()
        flood.clear()
        t0 = time.monotonic()
        assert _one_result(port, "after-flood") == 49
        assert time.monotonic() - t0 < 10
        assert proc.poll() is None
    finally:
        for sock in flood:
            sock.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "cannot accept connections: EMFILE" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.integration
def test_slow_readers_stay_within_the_stated_memory_bound(
    kafka_brokers: str, redis_address: str, unique: str, tmp_path: Path
) -> None:
    """Four streams that never read while their results pile up: each is cut at its byte bound
    (here 2 MiB), so the doorman's RSS grows by about 4 x 2 MiB (plus a fixed slack for the
    allocator), where counting messages alone let it grow ~136 MB (issue #14). The doorman runs
    in a process of its own on the real brokers, so its RSS is the pod's alone."""
    port = _free_port()
    bound = 2 << 20
    env = real_env(
        kafka_brokers,
        redis_address,
        unique,
        NIMBUS_KAFKA_PARTITIONS="4",
        NIMBUS_REDIS_EVENTS_CHANNEL=f"pod-{unique}",
        NIMBUS_HOST="127.0.0.1",
        NIMBUS_PORT=str(port),
        NIMBUS_STREAM_QUEUE_BYTES=str(bound),
        NIMBUS_STREAM_QUEUE="1000000",
    )
    procs = {}
    for module in ("nimbus.workers", "nimbus.server"):
        with (tmp_path / f"{module}.log").open("w") as log:
            procs[module] = subprocess.Popen(
                [sys.executable, "-m", module], cwd=ROOT, env=env, stdout=log, stderr=log
            )
    server = procs["nimbus.server"]
    try:
        _wait_listening(port, server, timeout=90)
        time.sleep(2)  # the workers' consumers join their groups
        base = _rss_kb(server.pid)
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from tests.test_edge import _flood_slow; _flood_slow({port}, 4, 9000)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        grown = (_rss_kb(server.pid) - base) * 1024
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)
    log = (tmp_path / "nimbus.server.log").read_text()
    cut = [line for line in log.splitlines() if "cutting the stream" in line]
    assert len(cut) == 4, log[-3000:]
    assert grown < 4 * bound + (16 << 20), f"RSS grew {grown / 2**20:.1f} MiB"
    print(f"doorman RSS grew {grown / 2**20:.1f} MiB with 4 slow readers cut at {bound} bytes")


def _flood_slow(port: int, streams: int, events: int) -> None:
    """Open `streams` protocol-1 streams (no acks) with a 64 KiB flow-control window, send
    `events` events on each and read nothing for 15 s: the server cannot write, so their
    results pile up in it. Then read each stream to its end and print its status."""
    from grpclib.client import Channel
    from grpclib.config import Configuration
    from grpclib.const import Cardinality

    from nimbus.proto_gen.nimbus import EventResponse

    async def main() -> None:
        async with trio_asyncio.open_loop():
            cfg = Configuration(http2_connection_window_size=65535, http2_stream_window_size=65535)
            channel = Channel("127.0.0.1", port, config=cfg)
            calls = []
            for i in range(streams):
                cm = channel.request(
                    "/nimbus.NimbusService/ProcessEvent",
                    Cardinality.STREAM_STREAM,
                    EventRequest,
                    EventResponse,
                    metadata={"client_id": f"slow-{i}"},
                )
                st = await trio_asyncio.aio_as_trio(cm.__aenter__)()
                await trio_asyncio.aio_as_trio(st.send_request)()
                try:
                    for n in range(1, events + 1):
                        await trio_asyncio.aio_as_trio(st.send_message)(
                            EventRequest(event_name="sq", number=n)
                        )
                except (StreamTerminatedError, GRPCError) as e:
                    print("cut while sending:", e, flush=True)
                calls.append(st)
            await trio.sleep(15)  # results pile up in the server while nobody reads
            for st in calls:
                try:
                    while await trio_asyncio.aio_as_trio(st.recv_message)() is not None:
                        pass
                    await trio_asyncio.aio_as_trio(st.recv_trailing_metadata)()
                    print("OK", flush=True)
                except GRPCError as e:
                    print(e.status.name, e.message, flush=True)
                except StreamTerminatedError as e:  # grpclib: the trailers lost to the reset
                    print("ended:", e, flush=True)
            channel.close()

    trio.run(main)
