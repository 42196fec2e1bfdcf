"""The delivery contract under chaos, on the real Kafka and Redis: `scripts/chaos.py` with a short
configuration (about two minutes including the settle phase).

12 clients on 2 pods and 2 workers, while clients switch pods and have their streams cut right
after a send, pods and workers are SIGKILLed and restarted, Redis client connections are cut, and
the Kafka broker and redis-server are each SIGKILLed and restarted once. The harness exits 0 only
if nothing receipted was lost, nothing was reordered or shown twice to the application, and
nothing unexpected arrived; this test checks that and the JSON summary, and prints the summary.

Every run draws a fresh seed, so every CI run tries a schedule nobody chose; the seed is printed
first (and is in the summary and the run folder's name), so a failure can be replayed with
`NIMBUS_CHAOS_SEED=<seed>`, which fixes it. For many seeds at once: scripts/chaos_sweep.py. The brokers
are the ones scripts/test.sh started (the `kafka_brokers`/`redis_address` fixtures): the harness
kills and restarts them through scripts/kafka.sh and scripts/redis.sh, and leaves them running.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from tests.chaos_check import chaos_command, run_chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent

# The CI configuration (see the module docstring); rates are per minute.
CI_ARGS = [
    "--clients", "12",
    "--rate", "5",
    "--pods", "2",
    "--workers", "2",
    "--partitions", "4",
    "--duration", "70",
    "--settle-timeout", "90",
    "--switch-rate", "30",
    "--cut-rate", "20",
    "--pod-kill-rate", "4",
    "--worker-kill-rate", "4",
    "--redis-cut-rate", "4",
    "--kafka-kills", "1",
    "--redis-kills", "1",
    "--delivery-timeout-ms", "2000",
    "--status-interval-ms", "250",
    "--shutdown-timeout", "2",
    "--progress", "10",
]  # fmt: skip


def _port(address: str) -> str:
    return address.split(",")[0].rpartition(":")[2]


@pytest.mark.parametrize("kafka_client", ["kafka-python", "librdkafka"])
def test_delivery_contract_holds_under_chaos(
    kafka_brokers: str, redis_address: str, capsys: pytest.CaptureFixture[str], kafka_client: str
) -> None:
    seed = os.environ.get("NIMBUS_CHAOS_SEED") or str(secrets.randbelow(1_000_000))
    with capsys.disabled():
        print(
            f"\nchaos seed {seed} on {kafka_client} (replay it with NIMBUS_CHAOS_SEED={seed}"
            f" NIMBUS_KAFKA_CLIENT={kafka_client})",
            flush=True,
        )
    run_dir = (
        ROOT / "artifacts" / f"chaos-ci-{time.strftime('%Y%m%d-%H%M%S')}-{kafka_client}-{seed}"
    )
    cmd, summary_path = chaos_command(
        CI_ARGS,
        seed,
        run_dir,
        "--kafka-port", _port(kafka_brokers),
        "--redis-port", _port(redis_address),
    )  # fmt: skip
    s, t, chaos, returncode, output = run_chaos(
        cmd,
        env={**os.environ, "NIMBUS_KAFKA_CLIENT": kafka_client},
        timeout=600,
        run_dir=run_dir,
        summary_path=summary_path,
        capsys=capsys,
    )
    assert chaos["kills"] > 0 and chaos["pod_kills"] > 0 and chaos["worker_kills"] > 0, chaos
    assert chaos["kafka_kills"] == 1 and chaos["redis_kills"] == 1, chaos
    assert chaos["redis_cuts_normal"] + chaos["redis_cuts_pubsub"] > 0, chaos
    assert t["reconnects"] > 0 and chaos["switches"] > 0 and chaos["cuts"] > 0, (t, chaos)
    assert returncode == 0, output[-6000:]
