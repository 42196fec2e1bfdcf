"""Start the benchmark's Nimbus topology on the real brokers and keep it up until Ctrl-C: 2 pods,
`--workers` worker processes (events, results, replay) and a status-manager process, on topics
and a Redis namespace of their own. For pointing any load generator (ghz, grpcurl, your own) at
the same servers the bench measures.

    .venv/bin/python scripts/fleet.py --kafka-client librdkafka
    # prints the two pods' host:port, then waits; Ctrl-C (or SIGTERM) stops every process it
    # started

Brokers: the scripts' Kafka and Redis (`bash scripts/services.sh up` first; NIMBUS_KAFKA_PORT and
NIMBUS_REDIS_PORT as there); with `--cluster`, the local clusters (`bash scripts/cluster.sh up`
first: 3 Kafka brokers and a Redis Cluster, NIMBUS_REDIS_MODE=cluster). Logs:
artifacts/fleet-<prefix>/.
Exit status: 0 after Ctrl-C; 2 usage error; 3 brokers unreachable or a process failed to start.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "scripts") not in sys.path:  # procs.py, shared.py, also when imported (bench.py)
    sys.path.insert(0, str(ROOT / "scripts"))

from procs import Fleet, nimbus_env, pod, worker  # noqa: E402
from shared import HOST  # noqa: E402

from nimbus.entry import EXIT_UNAVAILABLE, ArgumentParser  # noqa: E402

KAFKA_CLIENTS = ("kafka-python", "librdkafka")


class BenchFleet(Fleet):
    """The bench's topology on its own topics and Redis namespace (`args.prefix`): 2 pods and
    `args.workers` worker processes; with `args.status_process` the status manager in a process
    of its own, with `args.split_roles` each worker's event consumer too (eventsN)."""

    def __init__(self, args: argparse.Namespace, run_dir: Path, kafka: str, redis: str) -> None:
        self.rid = args.prefix
        self.idle_util: dict[str, float] = {}  # CPUs each process uses with nothing to do
        base = {**nimbus_env(self.rid, kafka, redis, args.partitions), "NIMBUS_LOG_LEVEL": "INFO"}
        # Room for the replay phase's 5x window (the queue must exceed the window + an ingest
        # batch) and for the idle streams beside the phase's others.
        window = int(base.get("NIMBUS_REPLAY_WINDOW", "2000"))
        queue = int(base.get("NIMBUS_STREAM_QUEUE", "10000"))
        base["NIMBUS_STREAM_QUEUE"] = str(max(queue, 5 * window + 1000))
        base["NIMBUS_MAX_STREAMS"] = str(
            max(int(base.get("NIMBUS_MAX_STREAMS", "10000")), args.streams + 1000)
        )
        split = getattr(args, "status_process", False)
        by_role = getattr(args, "split_roles", False)
        roles = ["results", "replay"] if by_role else ["events", "results", "replay"]
        procs = [pod(base, self.rid, i, run_dir) for i in range(2)]
        procs += [
            worker(
                f"worker{i}",
                base,
                run_dir,
                "replay consumer up" if split else "status manager up",
                "--roles",
                ",".join(roles if split else [*roles, "status"]),
            )
            for i in range(args.workers)
        ]
        if by_role:
            procs += [
                worker(f"events{i}", base, run_dir, "event consumer up", "--roles", "events")
                for i in range(args.workers)
            ]
        if split:
            procs.append(worker("status", base, run_dir, "status manager up", "--roles", "status"))
        super().__init__(procs)


def fleet_args(
    *, workers: int = 1, partitions: int = 8, prefix: str | None = None
) -> argparse.Namespace:
    """The namespace BenchFleet reads (the bench's defaults)."""
    return argparse.Namespace(
        prefix=prefix or f"fleet-{secrets.token_hex(3)}",
        partitions=partitions,
        streams=0,
        status_process=True,
        split_roles=False,
        workers=workers,
    )


def make_fleet(
    ns: argparse.Namespace,
    run_dir: Path,
    kafka: str,
    redis: str,
    kafka_client: str,
    redis_mode: str = "single",
) -> BenchFleet:
    fleet = BenchFleet(ns, run_dir, kafka, redis)
    for p in fleet.procs:
        p.env["NIMBUS_KAFKA_CLIENT"] = kafka_client
        p.env["NIMBUS_REDIS_MODE"] = redis_mode
    return fleet


def cluster_addresses() -> tuple[str, str]:
    """(Kafka brokers, Redis Cluster seed nodes) of the local clusters (scripts/cluster.sh env);
    RuntimeError if they are not up."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "cluster.sh"), "env"],
        capture_output=True,
        text=True,
        check=False,
    )
    found: dict[str, str] = {}
    for word in done.stdout.replace("export ", " ").split():
        key, _, value = word.partition("=")
        found[key] = value
    if done.returncode != 0 or "NIMBUS_REDIS_ADDRESS" not in found:
        raise RuntimeError(
            f"the local clusters are not up: bash scripts/cluster.sh up\n{done.stderr}"
        )
    return found["NIMBUS_KAFKA_BROKERS"], found["NIMBUS_REDIS_ADDRESS"]


async def main_async(a: argparse.Namespace) -> int:
    kafka, redis = f"{HOST}:{a.kafka_port}", f"{HOST}:{a.redis_port}"
    if a.cluster:
        try:
            kafka, redis = cluster_addresses()
        except RuntimeError as e:
            print(f"fleet.py: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    for what, address in (("Kafka", kafka), ("Redis", redis)):
        host, _, port = address.split(",")[0].rpartition(":")
        try:
            with trio.fail_after(5):
                s = await trio.open_tcp_stream(host, int(port))
            await s.aclose()
        except (OSError, trio.TooSlowError):
            print(f"fleet.py: {what} is not reachable at {address}: bash scripts/services.sh up")
            return EXIT_UNAVAILABLE
    ns = fleet_args(workers=a.workers, partitions=a.partitions, prefix=a.prefix)
    run_dir = ROOT / "artifacts" / f"fleet-{ns.prefix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet = make_fleet(
        ns, run_dir, kafka, redis, a.kafka_client, "cluster" if a.cluster else "single"
    )
    if a.cprofile:  # each process under cProfile: <name>.prof in the run folder, at its exit
        for p in fleet.procs:
            p.args = ["-o", str(run_dir / f"{p.name}.prof"), "-m", p.module, *p.args]
            p.module = "cProfile"
    try:
        t0 = time.monotonic()
        try:
            await fleet.start()
        except (RuntimeError, trio.TooSlowError) as e:
            print(f"fleet.py: the fleet did not start: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        print(
            f"fleet up in {time.monotonic() - t0:.1f} s ({a.kafka_client}), logs in {run_dir}",
            file=sys.stderr,
        )
        print(",".join(fleet.targets), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
    finally:
        fleet.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kafka-client", choices=KAFKA_CLIENTS, default="kafka-python")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--prefix", default=None)
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run on the local clusters (scripts/cluster.sh) instead of the single nodes",
    )
    p.add_argument(
        "--cprofile", action="store_true", help="run each process under cProfile (<name>.prof)"
    )
    p.add_argument(
        "--kafka-port", type=int, default=int(os.environ.get("NIMBUS_KAFKA_PORT") or 19092)
    )
    p.add_argument(
        "--redis-port", type=int, default=int(os.environ.get("NIMBUS_REDIS_PORT") or 16379)
    )
    a = p.parse_args(argv)
    if a.workers < 1 or a.partitions < 1:
        p.error("--workers and --partitions must be >= 1")
    try:
        return trio.run(main_async, a)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
