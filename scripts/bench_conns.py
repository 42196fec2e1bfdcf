"""Idle-connection load for scripts/bench.py: open N protocol-2 streams to one pod (100 per HTTP/2
connection, h2's default concurrent-stream limit), each with its own client id.

Each stream sends one event and waits for its RECEIPT (the pod accepted the stream, registered the
client in Redis and produced the event), then acks its result and stays idle. Prints one JSON line
when all are accepted: {"streams": n, "seconds": s, "failed": f}. Then reads commands on stdin:
`probe` sends one more event on stream 0 and prints {"ok": bool, "ms": latency of its result};
`quit` closes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grpclib.client import Channel  # noqa: E402
from grpclib.const import Cardinality  # noqa: E402

from nimbus.client import METHOD, PROTOCOL_KEY, parse_target  # noqa: E402
from nimbus.wire.messages import RECEIPT, RESULT, EventRequest, EventResponse  # noqa: E402

PER_CONNECTION = int(os.environ.get("BENCH_STREAMS_PER_CONNECTION", "100"))


class Idle:
    def __init__(self, channel: Channel, client_id: str) -> None:
        self.channel = channel
        self.client_id = client_id
        self.call = None
        self.receipted = asyncio.Event()
        self.results: asyncio.Queue[float] = asyncio.Queue()
        self.reader: asyncio.Future[None] | None = None

    async def open(self) -> None:
        self.cm = self.channel.request(
            METHOD,
            Cardinality.STREAM_STREAM,
            EventRequest,
            EventResponse,
            metadata=[("client_id", self.client_id), (PROTOCOL_KEY, "2")],
        )
        self.call = await self.cm.__aenter__()
        await self.call.send_request()
        self.reader = asyncio.ensure_future(self.read())
        await self.call.send_message(EventRequest(event_name="sq", number=3, seq=1))
        await self.receipted.wait()

    async def read(self) -> None:
        assert self.call is not None
        while True:
            try:
                m = await self.call.recv_message()
            except Exception:
                return
            if m is None:
                return
            if m.kind == RECEIPT:
                self.receipted.set()
            elif m.kind == RESULT:
                await self.call.send_message(EventRequest(ack=m.delivery_id))
                self.results.put_nowait(time.perf_counter())

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()


async def main(args: argparse.Namespace) -> None:
    host, port = parse_target(args.target)
    channels = [
        Channel(host, port) for _ in range((args.streams + PER_CONNECTION - 1) // PER_CONNECTION)
    ]
    streams = [
        Idle(channels[i // PER_CONNECTION], f"{args.prefix}-{i}") for i in range(args.streams)
    ]
    sem = asyncio.Semaphore(args.concurrency)

    async def opened(s: Idle) -> bool:
        async with sem:
            try:
                await asyncio.wait_for(s.open(), 120)
                return True
            except Exception:
                return False

    t0 = time.perf_counter()
    ok = await asyncio.gather(*(opened(s) for s in streams))
    seconds = time.perf_counter() - t0
    print(
        json.dumps({"streams": sum(ok), "seconds": seconds, "failed": len(ok) - sum(ok)}),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "probe":
            s = streams[0]
            while not s.results.empty():
                s.results.get_nowait()
            t = time.perf_counter()
            assert s.call is not None
            await s.call.send_message(EventRequest(event_name="sq", number=7, seq=2))
            try:
                got = await asyncio.wait_for(s.results.get(), 30)
                print(json.dumps({"ok": True, "ms": round((got - t) * 1e3, 1)}), flush=True)
            except TimeoutError:
                print(json.dumps({"ok": False, "ms": None}), flush=True)
        else:
            break
    for s in streams:
        s.close()
    for c in channels:
        c.close()  # resets every stream: the pod sees the clients leave


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, default=10000)
    p.add_argument("--prefix", default="idle")
    p.add_argument("--concurrency", type=int, default=500)
    asyncio.run(main(p.parse_args()))
