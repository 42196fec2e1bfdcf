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
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("NIMBUS_TEST_CLUSTER") != "1",
        reason="starts the local clusters (scripts/cluster.sh); set NIMBUS_TEST_CLUSTER=1",
    ),
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"

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


def test_delivery_contract_holds_under_cluster_chaos(
    clusters: None, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = os.environ.get("NIMBUS_CHAOS_SEED") or str(secrets.randbelow(1_000_000))
    with capsys.disabled():
        print(f"\ncluster chaos seed {seed} (replay it with NIMBUS_CHAOS_SEED={seed})", flush=True)
    run_dir = ROOT / "artifacts" / f"chaos-cluster-ci-{time.strftime('%Y%m%d-%H%M%S')}-{seed}"
    summary_path = run_dir / "ci-summary.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "chaos.py"),
        *CI_ARGS,
        "--seed", seed,
        "--run-dir", str(run_dir),
        "--json", str(summary_path),
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=420
    )
    took = time.monotonic() - started
    output = proc.stdout
    table = output[output.find("Nimbus chaos:") :] if "Nimbus chaos:" in output else output[-6000:]
    with capsys.disabled():
        print(f"\n{table}\n(chaos.py exit {proc.returncode} after {took:.0f} s; logs in {run_dir})")
    assert summary_path.exists(), f"no summary written; chaos.py said:\n{output[-6000:]}"
    s = json.loads(summary_path.read_text())
    t, chaos = s["totals"], s["chaos"]
    problems = {
        k: t[k] for k in ("lost", "out_of_order", "app_duplicates", "unexpected", "failed_clients")
    }
    assert not any(problems.values()), (problems, s["violations"][:3])
    assert s["settled"] and t["unanswered"] == 0, f"did not settle: {t}"
    assert t["sent"] > 1000 and t["results"] >= t["sent"] >= t["receipted"], t
    assert chaos["broker_kills"] == 1 and chaos["master_kills"] == 1, chaos
    assert chaos["broker_kill_failures"] == 0 and chaos["failovers_not_seen"] == 0, chaos
    kills = chaos["kill_log"]
    assert sorted(k["kind"] for k in kills) == ["broker_kill", "master_kill"], kills
    for k in kills:  # every failover seen, every node restarted and back in sync
        assert k["failover_s"] is not None and 0 < k["failover_s"] < 60, k
        assert k["restart_s"] is not None and k["in_sync_s"] is not None, k
    assert chaos["pod_kills"] > 0 and chaos["worker_kills"] > 0, chaos
    assert t["reconnects"] > 0 and chaos["switches"] > 0 and chaos["cuts"] > 0, (t, chaos)
    assert proc.returncode == 0, output[-6000:]
    assert "RESULT: OK" in output, output[-3000:]
