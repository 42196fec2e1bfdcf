"""The live web view (nimbus.web): its pure parts, its JSON on the in-memory engine, and the page
itself in headless Chromium (Debian's `chromium`, driven by Playwright's Python package; no
browser is downloaded) while a small load runs. The Chromium test keeps its screenshot in
artifacts/web-view.png (gitignored: a test artifact of each run)."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_asyncio

from nimbus.core.lifecycle import Status
from nimbus.ops import metrics, web
from nimbus.proto_gen.nimbus import ResponseKind
from tests.harness import Cluster, open_cluster
from tests.test_metrics import P2, http_get, wait_for
from tests.wire import open_stream

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def test_merge_rates_and_stages() -> None:
    a = '# TYPE nimbus_ops_total counter\nnimbus_ops_total{op="pod.events"} 10.0\nnimbus_ops_total{op="router.live"} 4.0\n'
    b = '# TYPE nimbus_ops_total counter\nnimbus_ops_total{op="pod.events"} 5.0\n# TYPE nimbus_replay_drained counter\nnimbus_replay_drained_total 3.0\n'
    merged = web.merge_exposition([a, b])
    assert merged["nimbus_ops_total{op=pod.events}"] == 15
    stages = web.stage_totals(merged)
    assert (
        stages["events ingested"] == 15
        and stages["routed live"] == 4
        and stages["replayed (confirmed)"] == 3
    )
    assert stages["flips to LIVE"] == 0
    r = web.rates({"x": 10, "y": 50}, {"x": 30, "y": 5, "z": 2}, 2.0)
    assert r == {"x": 10.0, "y": 2.5, "z": 1.0}  # y went down: its process restarted
    text = (
        "# TYPE nimbus_delivery_latency_seconds histogram\n"
        'nimbus_delivery_latency_seconds_bucket{le="0.01",path="live"} 10.0\n'
        'nimbus_delivery_latency_seconds_bucket{le="0.1",path="live"} 90.0\n'
        'nimbus_delivery_latency_seconds_bucket{le="+Inf",path="live"} 100.0\n'
        'nimbus_delivery_latency_seconds_count{path="live"} 100.0\n'
        'nimbus_delivery_latency_seconds_sum{path="live"} 3.0\n'
        'nimbus_delivery_latency_seconds_bucket{le="+Inf",path="replay"} 7.0\n'
    )
    buckets = web.latency_buckets(web.merge_exposition([text]), "live")
    assert buckets == {"lat:0.01": 10.0, "lat:0.1": 90.0, "lat:+Inf": 100.0}
    assert web.quantile(buckets, 0.05) == pytest.approx(0.005)  # half-way into the first bucket
    assert web.quantile(buckets, 0.5) == pytest.approx(0.01 + 0.09 * 40 / 80)
    assert web.quantile(buckets, 0.99) == pytest.approx(0.1)  # in +Inf: the last finite bound
    assert web.quantile({"lat:0.1": 0.0, "lat:+Inf": 0.0}, 0.5) is None
    assert web.errors(
        {"nimbus_errors_total{kind=slow_client_cut}": 2.0, "nimbus_errors_total{kind=x}": 0.0}
    ) == {"slow_client_cut": 2.0}


async def _load(c: Cluster, clients: int, stop: trio.Event, tag: str) -> None:
    """`clients` protocol-2 clients sending and acking continuously until `stop` (bounded)."""

    async def one(i: int) -> None:
        seq = 0
        async with open_stream(c.ports[0], {"client_id": f"load-{tag}-{i}", **P2}) as st:
            with trio.move_on_after(300):
                while not stop.is_set():
                    for _ in range(10):
                        seq += 1
                        await st.event("sq", seq % 1000, seq=seq)
                    await st.results(10)
                    await trio.sleep(0.05)

    async with trio.open_nursery() as n:
        for i in range(clients):
            n.start_soon(one, i)


async def _stuck_replay(c: Cluster, cid: str) -> None:
    """A client that left with results in the DLQ and came back on a stream it does not read:
    its replay stays in progress (the view shows it) until the stream goes."""
    async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
        for i in range(1, 201):
            await st.event("sq", i, seq=i)
        await st.results(1)
    with trio.fail_after(60):
        while True:
            rec = await c.engine.state.get(cid)
            if (
                rec is not None
                and rec.status is Status.OFFLINE
                and rec.dlq_written >= rec.routed_dlq > rec.acked
            ):
                break
            await trio.sleep(0.05)
    async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
        r = await st.recv()  # one result, never acked
        assert r is not None and r.kind == ResponseKind.RESULT
        await trio.sleep_forever()


async def test_state_json_follows_the_cluster(unique: str) -> None:
    with trio.fail_after(90):
        async with (
            trio_asyncio.open_loop(),
            open_cluster(
                delivery_timeout_ms=2000,
                status_interval_ms=200,
                web_refresh_ms=100,
                metrics_interval_ms=100,
            ) as c,
            trio.open_nursery() as n,
        ):
            port = await n.start(
                partial(web.run_web, c.settings, c.engine.log, c.engine.state, port=0, targets=[])
            )
            status, body = await http_get(port, "/")
            assert status == 200 and "<title>Nimbus live</title>" in body and "/api/state" in body
            assert (await http_get(port, "/metrics"))[0] == 200
            stop = trio.Event()
            n.start_soon(_load, c, 2, stop, unique)
            n.start_soon(_stuck_replay, c, f"stuck-{unique}")
            with trio.fail_after(60):
                while True:
                    status, body = await http_get(port, "/api/state")
                    s = json.loads(body) if status == 200 else {}
                    stages = {x["stage"]: x for x in s.get("stages", [])}
                    if (
                        s.get("clients", {}).get("LIVE", 0) >= 2
                        and any(
                            r["client_id"] == f"stuck-{unique}" and r["backlog_upper"] > 0
                            for r in s["replays"]
                        )
                        and stages["events ingested"]["rate"] > 0
                        and s["topic_rates"]["ingested into events topic"] > 0
                    ):
                        break
                    await trio.sleep(0.1)
            assert s["replays_total"] >= 1
            assert set(s["delivery_latency_live_recent_ms"]) == {"0.5", "0.99"}
            # The replay gauges of this process (the stuck client's replay runs here).
            await wait_for(
                lambda: (
                    metrics.sample("nimbus_replays_active") >= 1
                    and metrics.sample("nimbus_replay_unconfirmed") >= 1
                    and metrics.sample("nimbus_replay_backlog_records") > 0
                )
            )
            events = next(t for t in s["topics"] if t["topic"] == c.settings.kafka_events_topic)
            assert len(events["partitions"]) == c.settings.kafka_partitions and events["end"] > 0
            assert s["problems"] == []
            stop.set()
            n.cancel_scope.cancel()


# -- the page in headless Chromium ----------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium package)")
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")


async def test_live_view_in_headless_chromium(chromium: str, unique: str, tmp_path: Path) -> None:
    """The page, in Chromium, shows live numbers while a load runs: clients by state, per-stage
    rates above zero, a replay in progress, lags; later samples show more events. The screenshot
    is taken while the load runs."""
    shot = ROOT / "artifacts" / "web-view.png"
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    with trio.fail_after(240):
        async with (
            trio_asyncio.open_loop(),
            open_cluster(
                delivery_timeout_ms=10_000,
                status_interval_ms=200,
                web_refresh_ms=250,
                metrics_interval_ms=250,
            ) as c,
            trio.open_nursery() as n,
        ):
            port = await n.start(
                partial(web.run_web, c.settings, c.engine.log, c.engine.state, port=0, targets=[])
            )
            stop = trio.Event()
            n.start_soon(_load, c, 4, stop, unique)
            n.start_soon(_stuck_replay, c, f"stuck-{unique}")
            proc = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "tests.browser_check",
                    f"http://127.0.0.1:{port}/",
                    str(shot),
                    str(tmp_path / "profile"),
                    "4",
                ],
                cwd=ROOT,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            stop.set()
            n.cancel_scope.cancel()
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    seen = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    # (the page showed a non-zero ingest rate when each wait ended; read again just after)
    assert seen["live1"] >= 4 and max(seen["ingest_rate1"], seen["ingest_rate2"]) > 0, seen
    assert seen["sample2"] > seen["sample1"] and seen["ingested2"] > seen["ingested1"] > 0, seen
    assert seen["delivered2"] > 0, seen
    assert f"stuck-{unique}" in seen["replays"] and seen["nrep"] >= 1, seen
    assert seen["problems"].strip() == "", seen
    assert c.settings.kafka_events_topic in seen["lags"] and "#0" in seen["lags"], seen
    assert shot.stat().st_size > 10_000


async def test_the_all_in_one_serves_the_view_and_its_metrics(tmp_path: Path) -> None:
    """`python -m nimbus` starts the live view on NIMBUS_WEB_PORT and metrics on
    NIMBUS_METRICS_PORT beside the doorman and the workers."""
    from tests.test_metrics import free_port

    grpc, metrics_port, web_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "NIMBUS_PORT": str(grpc),
        "NIMBUS_HOST": "127.0.0.1",
        "NIMBUS_METRICS_PORT": str(metrics_port),
        "NIMBUS_WEB_PORT": str(web_port),
        "NIMBUS_WEB_REFRESH_MS": "200",
    }
    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            log = (tmp_path / "all-in-one.log").open("wb")
            proc = await n.start(
                partial(
                    trio.run_process,
                    [sys.executable, "-m", "nimbus"],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=log,
                    check=False,
                )
            )
            try:
                while True:
                    try:
                        status, body = await http_get(web_port, "/api/state")
                        if status == 200:
                            break
                    except OSError:
                        pass
                    await trio.sleep(0.2)
                state = json.loads(body)
                assert state["engine"] == "memory" and state["clients"]["total"] == 0
                assert {s["stage"] for s in state["stages"]} >= {"events ingested", "routed live"}
                status, text = await http_get(metrics_port, "/metrics")
                assert status == 200 and "nimbus_kafka_lag" in text and "nimbus_streams{" in text
            finally:
                proc.terminate()
                log.close()
