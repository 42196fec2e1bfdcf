"""The distributed run, as separate processes on the real Kafka and Redis: two doorman pods
(`python -m nimbus.server`) and one `python -m nimbus.workers`; and their graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio_asyncio

from nimbus.core.lifecycle import Status
from nimbus.engines.redis import open_redis_state
from nimbus.proto_gen.nimbus import EventResponse
from tests.harness import free_port, real_env
from tests.wire import open_stream

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
P2 = {"nimbus-protocol": "2"}


@dataclass
class Deployment:
    env: dict[str, str]
    pods: list[tuple[subprocess.Popen[bytes], int]]
    workers: subprocess.Popen[bytes]
    logs: Path


def _spawn(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", module], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.fixture
def deployment(
    kafka_brokers: str, redis_address: str, unique: str, tmp_path: Path
) -> Iterator[Deployment]:
    env = real_env(
        kafka_brokers,
        redis_address,
        unique,
        NIMBUS_KAFKA_PARTITIONS="4",
        NIMBUS_HOST="127.0.0.1",
        NIMBUS_SHUTDOWN_TIMEOUT_SEC="5",
        NIMBUS_DELIVERY_TIMEOUT_MS="3000",
        NIMBUS_STATUS_INTERVAL_MS="200",
    )
    workers = _spawn("nimbus.workers", env, tmp_path / "workers.log")
    pods = []
    for i in range(2):
        port = free_port()
        penv = {**env, "NIMBUS_PORT": str(port), "NIMBUS_REDIS_EVENTS_CHANNEL": f"pod{i}-{unique}"}
        pods.append((_spawn("nimbus.server", penv, tmp_path / f"pod{i}.log"), port))
    d = Deployment(env, pods, workers, tmp_path)
    try:
        yield d
    finally:
        for p in [workers, *(p for p, _ in pods)]:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in sorted(tmp_path.glob("*.log")):
            print(f"----- {f.name}\n{f.read_text()[-3000:]}")


async def wait_listening(port: int, timeout: float = 60) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.aclose()
                return
            except OSError:
                await trio.sleep(0.1)


async def test_reconnect_on_the_other_pod_gets_all_1000_in_order(
    deployment: Deployment, unique: str
) -> None:
    cid = f"proc-{unique}"
    with trio.fail_after(180):
        for _, port in deployment.pods:
            await wait_listening(port)
        async with trio_asyncio.open_loop():
            async with open_stream(deployment.pods[0][1], {"client_id": cid, **P2}) as st:
                for n in range(1, 1001):
                    await st.event("sq", n, seq=n)
                first = await st.results(500)
            async with open_stream(deployment.pods[1][1], {"client_id": cid, **P2}) as st2:
                seen = {r.delivery_id for r in first}
                rest: list[EventResponse] = []
                while len(first) + len(rest) < 1000:
                    [r] = await st2.results(1)
                    if r.delivery_id in seen:
                        continue  # a redelivery (same id): the client library drops these
                    seen.add(r.delivery_id)
                    rest.append(r)
                got = first + rest
                assert [r.number for r in got] == list(range(1, 1001))
                assert all(r.result == r.number**2 for r in got)
                assert [r.delivery_id for r in got] == sorted(r.delivery_id for r in got)
                host, port = deployment.env["NIMBUS_REDIS_ADDRESS"].rsplit(":", 1)
                async with open_redis_state(
                    f"{host}:{port}", prefix=deployment.env["NIMBUS_REDIS_PREFIX"]
                ) as state:
                    with trio.move_on_after(10):
                        while True:  # polls Redis
                            rec = await state.get(cid)
                            if rec is not None and rec.status is Status.LIVE:
                                break
                            await trio.sleep(0.05)
                    assert rec is not None and rec.status is Status.LIVE, (
                        rec,
                        max(r.delivery_id for r in got),
                    )
                    assert rec.pod == f"pod1-{unique}" and rec.epoch == 2


async def test_sigterm_drains_marks_offline_and_exits_0(
    deployment: Deployment, unique: str
) -> None:
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    cid = f"term-{unique}"
    proc, port = deployment.pods[0]
    with trio.fail_after(120):
        await wait_listening(port)
        async with trio_asyncio.open_loop():
            async with open_stream(port, {"client_id": cid, **P2}) as st:
                await st.event("sq", 4, seq=1)
                [r] = await st.results(1)
                assert r.result == 16
                proc.send_signal(signal.SIGTERM)
                # The server ends the stream (UNAVAILABLE, or a reset if grpclib's close wins).
                try:
                    while await st.recv() is not None:
                        pass
                except (GRPCError, StreamTerminatedError):
                    pass
            code = await trio.to_thread.run_sync(proc.wait, 15)
            assert code == 0
            async with open_redis_state(
                deployment.env["NIMBUS_REDIS_ADDRESS"], prefix=deployment.env["NIMBUS_REDIS_PREFIX"]
            ) as state:
                rec = await state.get(cid)
                assert rec is not None and rec.status is Status.OFFLINE
            deployment.workers.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(deployment.workers.wait, 15) == 0
