"""Metrics (nimbus.ops.metrics) and the stream fields on log lines.

One registry per process, shared by every in-process cluster: tests compare values before and
after (deltas), never absolute values. The last test runs the real processes on the real brokers
and reads each one's metrics port over HTTP, as `curl` would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from loguru import logger

from nimbus.core.lifecycle import Status
from nimbus.ops import metrics
from nimbus.ops.stats import Counters
from tests.harness import Cluster, free_port, open_cluster, real_env
from tests.wire import open_stream

P2 = {"nimbus-protocol": "2"}
ROOT = Path(__file__).resolve().parent.parent


def m(name: str, **labels: str) -> float:
    return metrics.sample(name, **labels)


@asynccontextmanager
async def cluster(pods: int = 1, **kw: Any) -> AsyncIterator[Cluster]:
    async with (
        trio_asyncio.open_loop(),
        open_cluster(
            pods=pods,
            delivery_timeout_ms=2000,
            status_interval_ms=200,
            metrics_interval_ms=100,
            **kw,
        ) as c,
    ):
        yield c


async def wait_for(pred: Any, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110 (polling another process's state)
            await trio.sleep(0.05)


async def wait_status_live(c: Cluster, cid: str) -> None:
    with trio.fail_after(20):
        while True:
            rec = await c.engine.state.get(cid)
            if rec is not None and rec.status is Status.LIVE:
                return
            await trio.sleep(0.05)


async def http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def test_counters_are_bridged_to_prometheus() -> None:
    before = m("nimbus_ops_total", op="test.bridge")
    errors_before = m("nimbus_errors_total", kind="slow_client_cut")
    c = Counters()
    c.inc("test.bridge", 3)
    c.inc("test.bridge")
    c.inc("pod.slow_client")
    refused0 = m("nimbus_errors_total", kind="refused_unauthenticated")
    c.inc("server.refused.unauthenticated")
    assert m("nimbus_errors_total", kind="refused_unauthenticated") - refused0 == 1
    assert c["test.bridge"] == 4
    assert m("nimbus_ops_total", op="test.bridge") - before == 4
    assert m("nimbus_errors_total", kind="slow_client_cut") - errors_before == 1


def test_plain_histogram_buckets_are_cumulative_and_inclusive() -> None:
    """The lock-free histogram renders as prometheus-client's would: `le` buckets cumulative, a
    value equal to a bound counted in that bucket, +Inf = count, and the sum."""
    h = metrics._PlainHistogram("test_plain_seconds", "test", "path", (0.01, 0.1, 1))
    registry = metrics.CollectorRegistry()
    registry.register(h)
    a = h.child("a")
    for v in (0.005, 0.01, 0.05, 0.1, 0.5, 5.0):
        h.observe(a, v)
    h.observe(h.child("b"), 0.2)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert [
        sample("test_plain_seconds_bucket", path="a", le=le)
        for le in ("0.01", "0.1", "1.0", "+Inf")
    ] == [2, 4, 5, 6]
    assert sample("test_plain_seconds_count", path="a") == 6
    assert sample("test_plain_seconds_sum", path="a") == pytest.approx(5.665)
    assert sample("test_plain_seconds_bucket", path="b", le="0.1") == 0
    assert sample("test_plain_seconds_bucket", path="b", le="1.0") == 1


async def test_metrics_endpoint_serves_the_registry() -> None:
    metrics.op("test.endpoint", 7)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(metrics.serve_metrics, "127.0.0.1", 0)
            status, body = await http_get(port, "/metrics")
            assert status == 200
            assert 'nimbus_ops_total{op="test.endpoint"}' in body
            assert "# TYPE nimbus_delivery_latency_seconds histogram" in body
            assert "nimbus_replays_active" in body
            assert (await http_get(port, "/nope"))[0] == 404
            # Not HTTP at all: refused, and the server keeps serving.
            s = await trio.open_tcp_stream("127.0.0.1", port)
            async with s:
                await s.send_all(b"\x00\x01garbage\r\n\r\n")
                assert (await s.receive_some(100)).startswith(b"HTTP/1.1 400")
            assert (await http_get(port, "/metrics"))[0] == 200
            nursery.cancel_scope.cancel()


async def test_live_path_metrics_move_with_the_traffic(unique: str) -> None:
    """Per-stage counters, engine call timings, delivery latency, streams, lag and clients by
    state, on the in-memory engine."""
    cid = f"m-{unique}"
    keys = [
        ("nimbus_ops_total", {"op": "pod.events"}),
        ("nimbus_ops_total", {"op": "events.processed"}),
        ("nimbus_ops_total", {"op": "router.live"}),
        ("nimbus_ops_total", {"op": "pod.delivered"}),
        ("nimbus_ops_total", {"op": "router.delivered"}),
        ("nimbus_delivery_latency_seconds_count", {"path": "live"}),
    ]
    with trio.fail_after(60):
        async with cluster() as c:
            before = {(k, tuple(v.items())): m(k, **v) for k, v in keys}
            io_before = m(
                "nimbus_io_records_total", op="produce", topic=c.settings.kafka_events_topic
            )
            pod = f"{c.settings.redis_events_channel}-pod0"
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                for i in range(1, 51):
                    await st.event("sq", i, seq=i)
                got = await st.results(50)
                assert [r.result for r in got] == [i * i for i in range(1, 51)]
                assert m("nimbus_streams", pod=pod) == 1
                await wait_for(
                    lambda: (
                        m("nimbus_ops_total", op="router.delivered")
                        - before[("nimbus_ops_total", (("op", "router.delivered"),))]
                        >= 50
                    )
                )
                await wait_for(lambda: m("nimbus_clients", state="LIVE") >= 1)
            for k, v in keys:
                assert m(k, **v) - before[(k, tuple(v.items()))] >= 50, (k, v)
            assert (
                m("nimbus_io_records_total", op="produce", topic=c.settings.kafka_events_topic)
                - io_before
                >= 50
            )
            assert m("nimbus_io_seconds_count", op="state.route", topic="") > 0
            # Lag as our consumer groups see it: sampled, and drained to 0 once all is consumed.
            group = f"nimbus-event-consumer.{c.settings.kafka_events_topic}"
            tp = c.engine.log.producer.partition_for(c.settings.kafka_events_topic, cid.encode())
            await wait_for(
                lambda: (
                    metrics.REGISTRY.get_sample_value(
                        "nimbus_kafka_end_offset",
                        {"topic": c.settings.kafka_events_topic, "partition": str(tp)},
                    )
                    is not None
                    and m(
                        "nimbus_kafka_lag",
                        group=group,
                        topic=c.settings.kafka_events_topic,
                        partition=str(tp),
                    )
                    == 0
                )
            )
            await wait_for(lambda: m("nimbus_streams", pod=pod) == 0)


async def test_replay_metrics(unique: str) -> None:
    """A client leaves with results coming: DLQ writes, a replay, its drain and the replay path
    of the delivery latency all move."""
    cid, n = f"r-{unique}", 100
    with trio.fail_after(90):
        async with cluster(pods=2) as c:
            dlq0 = m("nimbus_ops_total", op="router.dlq")
            drained0 = m("nimbus_replay_drained_total")
            replay_lat0 = m("nimbus_delivery_latency_seconds_count", path="replay")
            async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
                for i in range(1, n + 1):
                    await st.event("sq", i, seq=i)
                first = await st.results(5)
            await wait_for(lambda: m("nimbus_ops_total", op="router.dlq") > dlq0)
            async with open_stream(c.ports[1], {"client_id": cid, **P2}) as st2:
                rest = await st2.results(n - len(first))
                await wait_status_live(c, cid)
            assert [r.number for r in first + rest] == list(range(1, n + 1))
            assert m("nimbus_replay_drained_total") > drained0
            assert m("nimbus_delivery_latency_seconds_count", path="replay") > replay_lat0
            assert m("nimbus_ops_total", op="status.flips") >= 1


async def test_stream_log_lines_carry_client_epoch_and_trace(unique: str) -> None:
    lines: list[dict[str, Any]] = []
    sink = logger.add(
        lambda msg: lines.append(dict(msg.record["extra"], message=msg.record["message"])),
        level="INFO",
    )
    cid = f"log-{unique}"
    try:
        with trio.fail_after(60):
            async with cluster() as c:
                for epoch_hint, trace in ((1, "trace-abc.1"), (2, "")):
                    md = {"client_id": cid, **P2, **({"x-trace-id": trace} if trace else {})}
                    async with open_stream(c.ports[0], md) as st:
                        await st.event("sq", 2, seq=1)
                        await st.results(1)
                    await wait_for(
                        lambda e=epoch_hint: any(
                            ln["message"].startswith(f"client {cid} disconnected (epoch {e})")
                            for ln in lines
                        )
                    )
    finally:
        logger.remove(sink)
    mine = [
        ln
        for ln in lines
        if cid in ln["message"]
        and ("connected" in ln["message"] or "disconnected" in ln["message"])
    ]
    assert len(mine) >= 4
    for ln in mine:
        assert ln.get("client_id") == cid, ln
        assert ln.get("trace_id"), ln
    first = [ln for ln in mine if ln["message"].startswith(f"client {cid} disconnected (epoch 1)")]
    assert first and first[0]["trace_id"] == "trace-abc.1" and first[0]["epoch"] == 1
    second = [ln for ln in mine if ln["message"].startswith(f"client {cid} disconnected (epoch 2)")]
    assert second and second[0]["epoch"] == 2 and second[0]["trace_id"] != "trace-abc.1"


# -- real processes, real brokers ------------------------------------------------------------------


@pytest.fixture
def processes(
    kafka_brokers: str, redis_address: str, unique: str, tmp_path: Path
) -> Iterator[dict[str, int]]:
    """One pod and one workers process, each with its own metrics port."""
    env = real_env(
        kafka_brokers,
        redis_address,
        unique,
        NIMBUS_KAFKA_PARTITIONS="2",
        NIMBUS_HOST="127.0.0.1",
        NIMBUS_SHUTDOWN_TIMEOUT_SEC="5",
        NIMBUS_METRICS_INTERVAL_MS="200",
        NIMBUS_LOG_FORMAT="json",
    )
    ports = {"grpc": free_port(), "pod_metrics": free_port(), "workers_metrics": free_port()}
    procs = []
    for module, extra in (
        ("nimbus.workers", {"NIMBUS_METRICS_PORT": str(ports["workers_metrics"])}),
        (
            "nimbus.server",
            {
                "NIMBUS_METRICS_PORT": str(ports["pod_metrics"]),
                "NIMBUS_PORT": str(ports["grpc"]),
                "NIMBUS_REDIS_EVENTS_CHANNEL": f"pod-{unique}",
            },
        ),
    ):
        with (tmp_path / f"{module}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module],
                    env={**env, **extra},
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        yield ports
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in sorted(tmp_path.glob("*.log")):
            print(f"----- {f.name}\n{f.read_text()[-3000:]}")


def parse(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"] = (
                s.value
            )
    return out


@pytest.mark.integration
async def test_each_process_serves_its_metrics_on_real_brokers(
    processes: dict[str, int], unique: str, tmp_path: Path
) -> None:
    cid = f"proc-{unique}"
    with trio.fail_after(180):
        for key in ("grpc", "pod_metrics", "workers_metrics"):
            with trio.fail_after(60):
                while True:
                    try:
                        s = await trio.open_tcp_stream("127.0.0.1", processes[key])
                        await s.aclose()
                        break
                    except OSError:
                        await trio.sleep(0.2)
        async with (
            trio_asyncio.open_loop(),
            open_stream(processes["grpc"], {"client_id": cid, **P2}) as st,
        ):
            for i in range(1, 21):
                await st.event("sq", i, seq=i)
            got = await st.results(20)
            assert [r.result for r in got] == [i * i for i in range(1, 21)]
            # The pod's metrics: its stage, its engine calls, the delivery latency, its streams.
            status, text = await http_get(processes["pod_metrics"], "/metrics")
            assert status == 200
            pod = parse(text)
            assert pod["nimbus_ops_total{op=pod.events}"] == 20
            assert pod["nimbus_ops_total{op=pod.delivered}"] == 20
            assert pod[f"nimbus_io_records_total{{op=produce,topic=events-{unique}}}"] == 20
            assert pod["nimbus_delivery_latency_seconds_count{path=live}"] == 20
            assert pod[f"nimbus_streams{{pod=pod-{unique}}}"] == 1
        # The workers' metrics: the stages, Kafka lag per partition (drained), clients by state.
        with trio.fail_after(60):
            while True:
                status, text = await http_get(processes["workers_metrics"], "/metrics")
                w = parse(text)
                lag_keys = [
                    k
                    for k in w
                    if k.startswith("nimbus_kafka_lag{") and f"topic=events-{unique}" in k
                ]
                if (
                    w.get("nimbus_ops_total{op=router.delivered}", 0) >= 20
                    and len(lag_keys) == 2
                    and all(w[k] == 0 for k in lag_keys)
                    and w.get("nimbus_clients{state=OFFLINE}", 0) >= 1
                ):
                    break
                await trio.sleep(0.2)
        assert status == 200
        assert w["nimbus_ops_total{op=events.processed}"] == 20
        assert w["nimbus_ops_total{op=router.live}"] == 20
        # 20 results in at most 20 records (a client's results of a batch share one: nimbus.wire.packs)
        assert 1 <= w[f"nimbus_io_records_total{{op=produce,topic=results-{unique}}}"] <= 20
        assert w["nimbus_io_seconds_count{op=state.route,topic=}"] >= 1
        assert (
            sum(
                v
                for k, v in w.items()
                if k.startswith("nimbus_kafka_end_offset{") and f"topic=events-{unique}" in k
            )
            == 20
        )
    # The pod's JSON log lines of this stream carry its client id, epoch and trace id.
    log = (tmp_path / "nimbus.server.log").read_text().splitlines()
    lines = [json.loads(ln) for ln in log if ln.startswith("{")]
    [gone] = [
        ln for ln in lines if ln["record"]["message"].startswith(f"client {cid} disconnected")
    ]
    extra = gone["record"]["extra"]
    assert extra["client_id"] == cid and extra["epoch"] == 1 and extra["trace_id"]
    assert extra["role"] == "server"
