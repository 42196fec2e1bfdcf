"""Per-call CPU of the hand-offs on Nimbus's paths, one call at a time (the paced case: nothing
to share a call's fixed cost with), and many at once. Needs the scripts' Redis.

    .venv/bin/python scripts/bench_calls.py [--redis 127.0.0.1:16379] [--count 3000]

Prints a table and one JSON line. Rows:
- crossing: trio -> asyncio -> trio for a coroutine that does nothing (trio_asyncio.aio_as_trio)
- redis call, crossing + pool: a script call as Nimbus made it before the lane (one crossing, a
  pooled connection, redis-py's per-command timeout)
- redis call, lane: the same script call on `nimbus.engines.redis`'s lane, one caller; then 20
  trio tasks calling at once (their calls share batches)
- redis pub/sub round trip: PUBLISH on the lane, the subscriber's trio side receives it
- redis-py alone: PING in plain asyncio (no trio), the library's own cost
CPU is this process's (user + sys; Redis's own CPU is not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nimbus.engines import redis as redis_engine
from nimbus.wire.grpc import batch_asyncio_callbacks


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(n: int, call: Callable[[], Awaitable[Any]], tasks: int = 1) -> dict[str, float]:
    for _ in range(100):
        await call()
    c0, t0 = cpu(), time.perf_counter()
    if tasks == 1:
        for _ in range(n):
            await call()
    else:
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):

                async def worker() -> None:
                    for _ in range(n // tasks):
                        await call()

                nursery.start_soon(worker)
    c1, t1 = cpu(), time.perf_counter()
    return {"cpu_us": round((c1 - c0) / n * 1e6, 1), "wall_us": round((t1 - t0) / n * 1e6, 1)}


async def main_async(a: argparse.Namespace) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    n = a.count
    async with trio_asyncio.open_loop():

        async def nothing() -> None:
            return None

        out["crossing"] = await measure(n, lambda: trio_asyncio.aio_as_trio(nothing)())
        async with redis_engine.open_redis_state(a.redis, prefix="bench-calls:") as st:
            r = st._r
            sha = st._shas["publish"]

            async def old_way() -> Any:
                return await r.evalsha(sha, 0, "bench-calls:ch:none", b"x")

            out["redis call, crossing + pool"] = await measure(n, lambda: st._cross(old_way))
            out["redis call, lane"] = await measure(n, lambda: st.publish([("none", b"x")]))
            out["redis call, lane, 20 tasks at once"] = await measure(
                n, lambda: st.publish([("none", b"x")]), tasks=20
            )
            async with st.subscribe("rt") as sub:

                async def round_trip() -> None:
                    await st.publish([("rt", b"x")])
                    await sub.__anext__()

                out["redis pub/sub round trip (lane)"] = await measure(n, round_trip)
    return out


async def plain_redis(a: argparse.Namespace) -> dict[str, float]:
    import redis.asyncio as aioredis

    host, _, port = a.redis.rpartition(":")
    r = aioredis.Redis(host=host, port=int(port), protocol=2)
    for _ in range(100):
        await r.execute_command("PING")
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(a.count):
        await r.execute_command("PING")
    c1, t1 = cpu(), time.perf_counter()
    await r.aclose()
    return {
        "cpu_us": round((c1 - c0) / a.count * 1e6, 1),
        "wall_us": round((t1 - t0) / a.count * 1e6, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis", default="127.0.0.1:16379")
    p.add_argument("--count", type=int, default=3000)
    a = p.parse_args()
    if a.count < 100:
        p.error("--count must be >= 100")
    batch_asyncio_callbacks()  # as every Nimbus process runs
    res = trio.run(main_async, a)
    res["redis-py alone (PING, plain asyncio)"] = asyncio.run(plain_redis(a))
    print(f"{'call':<42} {'CPU µs':>8} {'wall µs':>8}")
    for k, v in res.items():
        print(f"{k:<42} {v['cpu_us']:>8.1f} {v['wall_us']:>8.1f}")
    print(json.dumps({"probe": "calls", "results": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
