"""`python -m nimbus.admin`: its formatting (pure), its queries on the in-memory engine, and the
command itself as a process against the real Kafka and Redis."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio
import trio_asyncio

from nimbus.core.lifecycle import ClientRecord, Status
from nimbus.ops import admin
from tests.harness import Cluster, open_cluster, real_engine, real_env
from tests.test_metrics import P2
from tests.wire import open_stream

ROOT = Path(__file__).resolve().parent.parent


def test_formatting() -> None:
    recs = [
        ClientRecord(
            "b", Status.REPLAYING, "pod-1", 3, acked=5, routed_dlq=9, dlq_written=9, cursor=12
        ),
        ClientRecord("a", Status.LIVE, "pod-2", 1, acked=4),
        ClientRecord("c"),
    ]
    text = admin.format_clients(recs)
    lines = text.splitlines()
    assert lines[0].split() == [
        "client",
        "status",
        "pod",
        "epoch",
        "acked",
        "routed_dlq",
        "cursor",
        "backlog",
    ]
    assert [ln.split()[0] for ln in lines[2:5]] == ["a", "b", "c"]
    assert lines[3].split() == ["b", "REPLAYING", "pod-1", "3", "5", "9", "12", "yes"]
    assert lines[-1] == "3 clients: OFFLINE 1, REPLAYING 1, LIVE 1"
    assert admin.format_clients([]) == "0 clients: OFFLINE 0, REPLAYING 0, LIVE 0"
    d = admin.record_dict(recs[0]) | {
        "dlq_partition": 2,
        "dlq_end": 40,
        "waiting": 4,
        "waiting_truncated": False,
    }
    detail = admin.format_client(d)
    assert "REPLAYING" in detail and "results waiting in the DLQ" in detail
    assert detail.splitlines()[-1].split()[-1] == "4"
    lag = admin.format_lags(
        [{"topic": "t", "partition": 0, "group": "g", "end": 10, "committed": 7, "lag": 3}]
    )
    assert lag.splitlines()[2].split() == ["t", "0", "g", "10", "7", "3"]


async def _client_with_backlog(c: Cluster, cid: str, n: int) -> None:
    """A client that leaves with results still coming: they land in the DLQ."""
    async with open_stream(c.ports[0], {"client_id": cid, **P2}) as st:
        for i in range(1, n + 1):
            await st.event("sq", i, seq=i)
        await st.results(2)
    rec, lag = None, None
    with trio.move_on_after(90):
        while True:
            rec = await c.engine.state.get(cid)
            if (
                rec is not None
                and rec.status is Status.OFFLINE
                and rec.dlq_written >= rec.routed_dlq > rec.acked
            ):
                lag = await admin.lags(c.settings, c.engine.log)
                if all(r["lag"] == 0 for r in lag if r["group"]):
                    return
            await trio.sleep(0.1)
    raise AssertionError(f"backlog not settled: {rec} {lag}")


async def test_queries_on_the_memory_engine(unique: str) -> None:
    cid, live = f"adm-{unique}", f"live-{unique}"
    with trio.fail_after(60):
        async with (
            trio_asyncio.open_loop(),
            open_cluster(delivery_timeout_ms=2000, status_interval_ms=200) as c,
        ):
            await _client_with_backlog(c, cid, 30)
            async with open_stream(c.ports[0], {"client_id": live, **P2}) as st:
                await st.event("sq", 3, seq=1)
                await st.results(1)
                recs = {r.client_id: r for r in await admin.clients(c.engine.state)}
                assert recs[live].status is Status.LIVE and recs[cid].status is Status.OFFLINE
                assert [r.client_id for r in await admin.clients(c.engine.state, "LIVE")] == [live]
            d = await admin.client(c.settings, c.engine.log, c.engine.state, cid)
            assert d is not None and d["status"] == "OFFLINE" and d["backlog"]
            # Delivery ids 1..30 (the client's partition was empty), 2 acked: 28 wait in the DLQ.
            # The DLQ packs a client's results several to a record (nimbus.wire.packs): fewer records.
            assert d["acked"] == 2 and d["waiting"] == 28 and 1 <= d["dlq_end"] <= 30
            assert (
                await admin.client(c.settings, c.engine.log, c.engine.state, f"nobody-{unique}")
                is None
            )
            rows = await admin.lags(c.settings, c.engine.log)
            events = [r for r in rows if r["topic"] == c.settings.kafka_events_topic]
            assert (
                len(events) == c.settings.kafka_partitions and sum(r["end"] for r in events) == 31
            )


@pytest.mark.integration
async def test_the_command_on_real_brokers(
    kafka_brokers: str, redis_address: str, unique: str
) -> None:
    engine = real_engine(kafka_brokers, redis_address, unique, partitions=2)
    env = real_env(kafka_brokers, redis_address, unique)
    cid = f"adm-{unique}"

    async def cmd(*args: str) -> tuple[int, str]:
        p = await trio.run_process(
            [sys.executable, "-m", "nimbus.admin", *args],
            env=env,
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        print(p.stderr.decode())
        return p.returncode, p.stdout.decode()

    with trio.fail_after(240):
        async with (
            trio_asyncio.open_loop(),
            open_cluster(delivery_timeout_ms=2000, status_interval_ms=200, **engine) as c,
        ):
            await _client_with_backlog(c, cid, 20)
            rec = await c.engine.state.get(cid)
            assert rec is not None
        code, out = await cmd("clients", "--json")
        assert code == 0
        [mine] = [r for r in json.loads(out) if r["client_id"] == cid]
        assert (
            mine["status"] == "OFFLINE" and mine["backlog"] is True and mine["acked"] == rec.acked
        )
        code, out = await cmd("client", cid)
        assert code == 0 and "OFFLINE" in out
        code, out = await cmd("client", cid, "--json")
        d = json.loads(out)
        assert (
            d["cursor"] == rec.cursor and d["waiting"] == 20 - 2
        )  # ids 1..20 (fresh topic), 2 acked
        code, _ = await cmd("client", f"nobody-{unique}")
        assert code == 1
        code, out = await cmd("lags", "--json")
        rows = json.loads(out)
        assert sum(r["end"] for r in rows if r["topic"] == f"events-{unique}") == 20
        assert all(r["lag"] == 0 for r in rows if r["group"])
        assert (
            1 <= sum(r["end"] for r in rows if r["topic"] == f"dlq-{unique}") <= 20
        )  # records, packed
        code, out = await cmd("lags")
        assert code == 0 and f"events-{unique}" in out
