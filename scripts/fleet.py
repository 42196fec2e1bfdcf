"""Start the benchmark's Nimbus topology on the real brokers and keep it up until Ctrl-C: 2 pods,
`--workers` worker processes (events, results, replay) and a status-manager process, on topics
and a Redis namespace of their own. For pointing any load generator (ghz, grpcurl, your own) at
the same servers the bench measures.

    .venv/bin/python scripts/fleet.py --kafka-client librdkafka
    # prints the two pods' host:port, then waits; Ctrl-C (or SIGTERM) stops every process it
    # started

Brokers: the scripts' Kafka and Redis (`bash scripts/services.sh up` first; NIMBUS_KAFKA_PORT and
NIMBUS_REDIS_PORT as there). Logs: artifacts/fleet-<prefix>/.
Exit status: 0 after Ctrl-C; 2 usage error; 3 brokers unreachable or a process failed to start.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402

from nimbus.entry import EXIT_UNAVAILABLE, ArgumentParser  # noqa: E402

KAFKA_CLIENTS = ("kafka-python", "librdkafka")


def fleet_args(
    *, workers: int = 1, partitions: int = 8, prefix: str | None = None
) -> argparse.Namespace:
    """The namespace bench.Fleet reads (the bench's defaults)."""
    return argparse.Namespace(
        prefix=prefix or f"fleet-{secrets.token_hex(3)}",
        partitions=partitions,
        streams=0,
        status_process=True,
        split_roles=False,
        workers=workers,
    )


def make_fleet(
    ns: argparse.Namespace, run_dir: Path, kafka: str, redis: str, kafka_client: str
) -> bench.Fleet:
    fleet = bench.Fleet(ns, run_dir, kafka, redis)
    for p in fleet.procs:
        p.env["NIMBUS_KAFKA_CLIENT"] = kafka_client
    return fleet


async def main_async(a: argparse.Namespace) -> int:
    kafka, redis = f"{bench.HOST}:{a.kafka_port}", f"{bench.HOST}:{a.redis_port}"
    for what, port in (("Kafka", a.kafka_port), ("Redis", a.redis_port)):
        try:
            with trio.fail_after(5):
                s = await trio.open_tcp_stream(bench.HOST, port)
            await s.aclose()
        except (OSError, trio.TooSlowError):
            print(f"fleet.py: {what} is not reachable on port {port}: bash scripts/services.sh up")
            return EXIT_UNAVAILABLE
    ns = fleet_args(workers=a.workers, partitions=a.partitions, prefix=a.prefix)
    run_dir = ROOT / "artifacts" / f"fleet-{ns.prefix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet = make_fleet(ns, run_dir, kafka, redis, a.kafka_client)
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
