"""Helpers the scripts share (bench.py, chaos.py, load_client.py, procs.py; fleet.py and
bench_realtime.py through them): the nearest-rank percentile, a free port, polling for a
condition, the watcher of the status manager's flips, and the broker port options (bench.py,
chaos.py). Imported as a sibling (`import shared`):
the scripts put scripts/ on sys.path."""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Callable

import trio

HOST = "127.0.0.1"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def free_port() -> int:
    """A port nothing listens on (bound on 127.0.0.1, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], period: float = 0.2) -> None:
    """Poll `predicate` (state that many tasks change, several processes included)."""
    while not predicate():  # noqa: ASYNC110 - no single event to wait on
        await trio.sleep(period)


async def watch_flips(
    redis: str,
    namespace: str,
    on_flip: Callable[[str, int, int], None],
    ready: trio.Event | None = None,
) -> None:
    """Subscribe to the status manager's flips (Redis namespace `namespace`, e.g. "run:"); set
    `ready` once subscribed; call on_flip(client_id, last_ack_ns, flip_ns) for each (payloads
    parsed by nimbus.wire.pod_channel.parse_flip). Returns or raises when the subscription ends."""
    from nimbus.engines.redis import open_redis_state
    from nimbus.wire.pod_channel import FLIPS, parse_flip

    async with open_redis_state(redis, prefix=namespace) as state, state.subscribe(FLIPS) as sub:
        if ready is not None:
            ready.set()
        async for payload in sub:
            on_flip(*parse_flip(payload))


def add_port_options(p: argparse.ArgumentParser, controller: bool = False) -> None:
    """--kafka-port (then --kafka-controller-port if `controller`) and --redis-port, each
    defaulting to its NIMBUS_*_PORT variable; check them with check_ports."""
    # String defaults go through `type` too: a bad NIMBUS_*_PORT is a usage error, one line.
    p.add_argument(
        "--kafka-port",
        type=int,
        default=os.environ.get("NIMBUS_KAFKA_PORT") or "19092",
        help="default $NIMBUS_KAFKA_PORT, else 19092",
    )
    if controller:
        p.add_argument(
            "--kafka-controller-port",
            type=int,
            default=os.environ.get("NIMBUS_KAFKA_CONTROLLER_PORT") or "0",
            help="default $NIMBUS_KAFKA_CONTROLLER_PORT, else services.sh's",
        )
    p.add_argument(
        "--redis-port",
        type=int,
        default=os.environ.get("NIMBUS_REDIS_PORT") or "16379",
        help="default $NIMBUS_REDIS_PORT, else 16379",
    )


def check_ports(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error (p.error) unless the ports of add_port_options are ports."""
    for name in ("kafka_port", "redis_port"):
        if not 0 < getattr(args, name) < 65536:
            p.error(f"--{name.replace('_', '-')} must be a port (1-65535)")
    if not 0 <= getattr(args, "kafka_controller_port", 0) < 65536:
        p.error("--kafka-controller-port must be a port (1-65535; 0: services.sh's)")


def ports_env(args: argparse.Namespace) -> dict[str, str]:
    """This environment with the ports of add_port_options (the controller's if set), for
    scripts/services.sh and the brokers' kill/restart commands."""
    env = {
        **os.environ,
        "NIMBUS_KAFKA_PORT": str(args.kafka_port),
        "NIMBUS_REDIS_PORT": str(args.redis_port),
    }
    if getattr(args, "kafka_controller_port", 0):
        env["NIMBUS_KAFKA_CONTROLLER_PORT"] = str(args.kafka_controller_port)
    return env
