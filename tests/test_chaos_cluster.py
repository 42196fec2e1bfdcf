"""The delivery contract under chaos on the local clusters (issue 17): `scripts/chaos.py --cluster`
on scripts/cluster.sh's 3 KRaft brokers and Redis Cluster, for about 70 s of chaos.

3 pods and 2 workers; 12 clients switch pods and have their streams cut, pods and workers are
SIGKILLed and restarted, Redis client connections are cut, the Kafka node leading one of the run's
partitions is SIGKILLed and restarted once (`broker_kill`), and a Redis Cluster master once
(`master_kill`). The harness exits 0 only if nothing receipted was lost, nothing was reordered or
shown twice to the application and nothing unexpected arrived; this test checks that, that both
node kills happened and their failovers were seen, and prints the summary (the failover times
among it).

Every run draws a fresh seed, printed first; `NIMBUS_CHAOS_SEED=<seed>` replays one. It runs when
NIMBUS_TEST_CLUSTER=1 (scripts/test.sh sets it under CI and starts the clusters), like
tests/test_cluster_scripts.py: on the clusters that are up, or it brings them up (`cluster.sh up`,
which NIMBUS_LOCAL_DIR / NIMBUS_CLUSTER_*_PORT place) and down again; the killed nodes are
restarted (a killed master comes back as a replica). About 2 minutes, 2.5 with the start.

The other tests here are quick and always run: the flags cluster mode adds (usage errors), where
the schedule puts the node kills, and the reading of CLUSTER NODES that picks the master to kill.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos_check import chaos_command, run_chaos

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"
sys.path.insert(0, str(ROOT / "scripts"))  # chaos.py imports chaos_cluster, procs as siblings

import chaos  # noqa: E402
import chaos_cluster  # noqa: E402

# The CI configuration (see the module docstring); rates are per minute.
CI_ARGS = [
    "--cluster",
    "--clients", "12",
    "--rate", "5",
    "--pods", "3",
    "--workers", "2",
    "--partitions", "4",
    "--duration", "70",
    "--settle-timeout", "90",
    "--switch-rate", "30",
    "--cut-rate", "20",
    "--pod-kill-rate", "3",
    "--worker-kill-rate", "3",
    "--redis-cut-rate", "3",
    "--broker-kills", "1",
    "--master-kills", "1",
    "--delivery-timeout-ms", "2000",
    "--status-interval-ms", "250",
    "--shutdown-timeout", "2",
    "--progress", "10",
]  # fmt: skip


def cluster_sh(*args: str, timeout: float = 300) -> None:
    done = subprocess.run(
        ["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise AssertionError(
            f"cluster.sh {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )


@pytest.fixture(scope="module")
def clusters() -> Iterator[None]:
    """The local clusters: the ones scripts/test.sh started (left up for the other tests), or
    started here and brought down after this module."""
    owned = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True).returncode != 0
    try:
        cluster_sh("up", timeout=400)
        yield
    finally:
        if owned:
            cluster_sh("down", timeout=120)


@pytest.mark.skipif(
    os.environ.get("NIMBUS_TEST_CLUSTER") != "1",
    reason="starts the local clusters (scripts/cluster.sh); set NIMBUS_TEST_CLUSTER=1",
)
@pytest.mark.slow
def test_delivery_contract_holds_under_cluster_chaos(
    clusters: None, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = os.environ.get("NIMBUS_CHAOS_SEED") or str(secrets.randbelow(1_000_000))
    with capsys.disabled():
        print(f"\ncluster chaos seed {seed} (replay it with NIMBUS_CHAOS_SEED={seed})", flush=True)
    run_dir = ROOT / "artifacts" / f"chaos-cluster-ci-{time.strftime('%Y%m%d-%H%M%S')}-{seed}"
    cmd, summary_path = chaos_command(CI_ARGS, seed, run_dir)
    s, t, chaos, returncode, output = run_chaos(
        cmd, env=None, timeout=420, run_dir=run_dir, summary_path=summary_path, capsys=capsys
    )
    assert chaos["broker_kills"] == 1 and chaos["master_kills"] == 1, chaos
    assert chaos["broker_kill_failures"] == 0 and chaos["failovers_not_seen"] == 0, chaos
    kills = chaos["kill_log"]
    assert sorted(k["kind"] for k in kills) == ["broker_kill", "master_kill"], kills
    for k in kills:  # every failover seen, every node restarted and back in sync
        assert k["failover_s"] is not None and 0 < k["failover_s"] < 60, k
        assert k["restart_s"] is not None and k["in_sync_s"] is not None, k
    assert chaos["pod_kills"] > 0 and chaos["worker_kills"] > 0, chaos
    assert t["reconnects"] > 0 and chaos["switches"] > 0 and chaos["cuts"] > 0, (t, chaos)
    assert returncode == 0, output[-6000:]
    assert "RESULT: OK" in output, output[-3000:]


# --- quick checks of the parts (no clusters needed) -------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--redis-single", "127.0.0.1:6379"], "--redis-single needs --cluster"),
        (["--broker-kills", "1"], "--broker-kills needs --cluster"),
        (["--cluster", "--kafka-kills", "1"], "with --cluster use --broker-kills"),
        (["--cluster", "--redis-single", "nope"], "--redis-single must be HOST:PORT"),
        (
            ["--cluster", "--redis-single", "127.0.0.1:6379", "--master-kills", "1"],
            "--master-kills needs the Redis Cluster",
        ),
    ],
)
def test_cluster_flags_usage_errors(args: list[str], needle: str) -> None:
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), *args, "--run-dir", "/proc/no/run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("chaos.py: ") and needle in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def _schedule_args(**over: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "seed": 7,
        "duration": 120.0,
        "clients": 4,
        "pods": 3,
        "workers": 2,
        "switch_rate": 0.0,
        "cut_rate": 0.0,
        "pod_kill_rate": 0.0,
        "worker_kill_rate": 0.0,
        "redis_cut_rate": 0.0,
        "restart_delay": (0.5, 3.0),
        "kafka_kills": 0,
        "redis_kills": 0,
        "broker_kills": 2,
        "master_kills": 1,
    }
    base.update(over)
    return argparse.Namespace(**base)


def test_node_kills_get_slots_of_their_own() -> None:
    for seed in range(50):
        plan = chaos.make_schedule(_schedule_args(seed=seed))
        kills = [a for a in plan if a.kind in chaos.CLUSTER_KILLS]
        assert sorted(a.kind for a in kills) == ["broker_kill", "broker_kill", "master_kill"]
        # one per slot of [0.1 d, 0.66 d] (slot width 0.56 * 120 / 3 = 22.4 s, placed in its
        # first half): in order, at least half a slot apart, restarted after 1-3 s
        ats = [a.at for a in kills]
        assert 12 <= ats[0] and ats[-1] <= 0.66 * 120
        assert all(b - a >= 11.2 - 1e-6 for a, b in zip(ats, ats[1:], strict=False)), ats
        assert all(1.0 <= a.arg <= 3.0 for a in kills)
    # the same seed, the same plan; another seed, another plan
    assert chaos.make_schedule(_schedule_args()) == chaos.make_schedule(_schedule_args())
    assert chaos.make_schedule(_schedule_args()) != chaos.make_schedule(_schedule_args(seed=8))


NODES = """\
a1 127.0.0.1:37001@47001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:37002@47002 master - 0 1733 2 connected 5461-10922
c3 127.0.0.1:37003@47003 master,fail - 1733 1732 3 disconnected
d4 127.0.0.1:37004@47004 slave b2 0 1733 2 connected
e5 127.0.0.1:37005@47005 master - 0 1733 7 connected 10923-16383
f6 127.0.0.1:37006@47006 slave a1 0 1733 1 connected
"""


def test_cluster_nodes_are_read_as_redis_prints_them() -> None:
    nodes = {n.port: n for n in chaos_cluster.parse_nodes(NODES)}
    assert sorted(nodes) == [37001, 37002, 37003, 37004, 37005, 37006]
    serving = sorted(p for p, n in nodes.items() if n.master and n.slots)
    assert serving == [37001, 37002, 37005]  # 37003 failed: not a master that serves slots
    assert nodes[37003].failing and not nodes[37003].master and nodes[37003].slots == 0
    assert nodes[37004].master_id == "b2" and not nodes[37004].master
    assert nodes[37006].link == "connected" and nodes[37006].master_id == "a1"
    assert chaos_cluster.parse_env(
        "export NIMBUS_KAFKA_BROKERS=h:1,h:2\n"
        "export NIMBUS_REDIS_MODE=cluster NIMBUS_REDIS_ADDRESS=h:3,h:4\n"
    ) == {
        "NIMBUS_KAFKA_BROKERS": "h:1,h:2",
        "NIMBUS_REDIS_MODE": "cluster",
        "NIMBUS_REDIS_ADDRESS": "h:3,h:4",
    }
    assert chaos_cluster.spread([3.0, 1.0, 2.0, 10.0]) == {
        "count": 4,
        "min": 1.0,
        "median": 2.5,
        "max": 10.0,
    }
