"""Helpers the scripts share (bench.py, chaos.py, load_client.py, procs.py; fleet.py and
bench_realtime.py through them): the nearest-rank percentile, a free port, polling for a
condition, and the watcher of the status manager's flips. Imported as a sibling (`import shared`):
the scripts put scripts/ on sys.path."""

from __future__ import annotations

import math
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
