"""The limits Nimbus is measured against: the same message sizes through the same client libraries
with no Nimbus logic (used by scripts/bench.py, one probe per process so its CPU is its own).

    python scripts/bench_limits.py kafka-rtt --brokers 127.0.0.1:19092 --topic t --count 20000 --size 120
    python scripts/bench_limits.py redis-pubsub --redis 127.0.0.1:16379 --count 50000 --size 90
    python scripts/bench_limits.py grpc-echo --count 50000 --streams 50 --size 20

Each prints one JSON line: {"probe": ..., "count": n, "seconds": s, "rate": n/s, "cpu_s": ...}.

- kafka-rtt: a kafka-python producer (acks=all, idempotent, linger as Nimbus's
  NIMBUS_PRODUCER_LINGER_MS) sends `count` records keyed over 1,000 keys from a trio task, futures
  resolved on the sender thread; a kafka-python consumer in a worker thread polls them back.
  Rate = records consumed / time from the first send to the last record consumed.
- redis-pubsub: redis.asyncio (hiredis parser when installed) PUBLISHes `count` messages in
  pipelines of `batch`; a subscriber on its own connection counts them. Rate as above.
- grpc-echo: a grpclib server and client, each under trio (trio-asyncio) in its own process,
  one bidi stream per `streams`, upb EventRequest out / EventResponse back, `count` in all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def emit(probe: str, count: int, seconds: float, cpu_s: float, **extra: object) -> None:
    print(
        json.dumps(
            {
                "probe": probe,
                "count": count,
                "seconds": seconds,
                "rate": count / seconds if seconds > 0 else 0.0,
                "cpu_s": cpu_s,
                "cpu_us_per_msg": cpu_s / count * 1e6 if count else 0.0,
                **extra,
            }
        ),
        flush=True,
    )


# --- Kafka: produce -> consume round trip with kafka-python ------------------------------------


def kafka_rtt(args: argparse.Namespace) -> None:
    import trio
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=args.brokers)
    try:
        admin.create_topics([NewTopic(args.topic, args.partitions, 1)])
    except Exception as e:  # noqa: BLE001 - exists already is fine
        if "TopicAlreadyExists" not in type(e).__name__ + str(e):
            raise
    admin.close()
    value = b"x" * args.size
    keys = [f"client-{i}".encode() for i in range(1000)]
    consumer = KafkaConsumer(
        args.topic,
        bootstrap_servers=args.brokers,
        group_id=f"{args.topic}-g",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=2000,
    )
    # Join the group before producing: wait until partitions are assigned.
    deadline = time.monotonic() + 60
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200)
    got = 0
    done = threading.Event()
    last = [0.0]

    latencies: list[float] = []  # paced runs: produce call -> consumer has it, seconds

    def consume() -> None:
        nonlocal got
        while got < args.count:
            batch = consumer.poll(timeout_ms=200)
            n = sum(len(v) for v in batch.values())
            if n:
                got += n
                last[0] = now = time.perf_counter()
                if args.rate:
                    for recs in batch.values():
                        latencies.extend(now - struct.unpack_from("d", r.value)[0] for r in recs)
                consumer.commit_async()  # a commit per poll batch, as Nimbus's consumers
        done.set()

    producer = KafkaProducer(bootstrap_servers=args.brokers, linger_ms=args.linger_ms, acks="all")
    cpu0 = cpu_now()
    t0 = time.perf_counter()
    th = threading.Thread(target=consume, daemon=True)
    th.start()

    async def produce() -> None:
        token = trio.lowlevel.current_trio_token()
        acked = [0]
        all_acked = trio.Event()

        def ok(_: object) -> None:
            acked[0] += 1
            if acked[0] == args.count:
                token.run_sync_soon(all_acked.set)

        start = trio.current_time()
        for i in range(args.count):
            if args.rate:  # paced: one record at a time, stamped with its send time
                await trio.sleep_until(start + i / args.rate)
                v = struct.pack("d", time.perf_counter()) + value[8:]
            else:
                v = value
            producer.send(args.topic, value=v, key=keys[i % len(keys)]).add_callback(ok)
            if not args.rate and i % 500 == 499:
                await trio.lowlevel.checkpoint()
        await all_acked.wait()

    trio.run(produce)
    done.wait(120)
    seconds = last[0] - t0
    cpu = cpu_now() - cpu0
    producer.close()
    consumer.close()
    extra: dict[str, object] = {}
    if args.rate:
        latencies.sort()
        extra = {
            "paced_rate": args.rate,
            "latency_ms": {
                q: latencies[min(len(latencies) - 1, int(len(latencies) * f))] * 1e3 if latencies else 0.0
                for q, f in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
            },
        }
    emit("kafka-rtt", got, seconds, cpu, size=args.size, linger_ms=args.linger_ms, **extra)


# --- Redis: PUBLISH -> subscriber with redis.asyncio --------------------------------------------


def redis_pubsub(args: argparse.Namespace) -> None:
    import asyncio

    import redis.asyncio as aioredis

    host, _, port = args.redis.rpartition(":")

    async def main() -> None:
        sub_conn = aioredis.Redis(host=host, port=int(port))
        pub_conn = aioredis.Redis(host=host, port=int(port))
        channel = f"bench-limit-{os.getpid()}"
        ps = sub_conn.pubsub()
        await ps.subscribe(channel)
        await ps.get_message(timeout=1.0)  # the subscribe confirmation
        value = b"x" * args.size
        got = 0
        last = 0.0

        async def listen() -> None:
            nonlocal got, last
            while got < args.count:
                m = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if m is not None:
                    got += 1
                    last = time.perf_counter()

        cpu0 = cpu_now()
        t0 = time.perf_counter()
        task = asyncio.ensure_future(listen())
        for start in range(0, args.count, args.batch):
            pipe = pub_conn.pipeline(transaction=False)
            for _ in range(min(args.batch, args.count - start)):
                pipe.publish(channel, value)
            await pipe.execute()
        await asyncio.wait_for(task, 120)
        cpu = cpu_now() - cpu0
        emit("redis-pubsub", got, last - t0, cpu, size=args.size, batch=args.batch)
        await ps.aclose()
        await sub_conn.aclose()
        await pub_conn.aclose()

    asyncio.run(main())


# --- gRPC: grpclib bidi echo under trio ----------------------------------------------------------

METHOD = "/bench.Echo/Stream"


def grpc_server(args: argparse.Namespace) -> None:
    import trio
    import trio_asyncio
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    from nimbus.messages import EventRequest, EventResponse

    class Echo:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                METHOD: Handler(self.handle, Cardinality.STREAM_STREAM, EventRequest, EventResponse)
            }

        async def handle(self, stream) -> None:  # type: ignore[no-untyped-def]
            async for req in stream:
                await stream.send_message(
                    EventResponse(
                        event_name=req.event_name,
                        number=req.number,
                        result=req.number * req.number,
                        delivery_id=req.seq,
                    )
                )

    async def main() -> None:
        async with trio_asyncio.open_loop():
            server = Server([Echo()])
            await trio_asyncio.aio_as_trio(server.start)("127.0.0.1", args.port)
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)


def grpc_echo(args: argparse.Namespace) -> None:
    import socket

    import trio
    import trio_asyncio
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    from nimbus.messages import EventRequest, EventResponse

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, __file__, "_grpc-server", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()
        per_stream = args.count // args.streams

        async def one(channel: Channel, i: int) -> int:
            got = 0
            async with channel.request(
                METHOD, Cardinality.STREAM_STREAM, EventRequest, EventResponse
            ) as call:
                await call.send_request()

                async def reader() -> None:
                    nonlocal got
                    while got < per_stream:
                        if await call.recv_message() is None:
                            return
                        got += 1

                import asyncio

                task = asyncio.ensure_future(reader())
                for n in range(1, per_stream + 1):
                    await call.send_message(EventRequest(event_name="sq", number=n, seq=n))
                await task
                await call.end()
            return got

        async def main() -> tuple[int, float, float]:
            import asyncio

            async with trio_asyncio.open_loop():

                async def run_all() -> tuple[int, float, float]:
                    channel = Channel("127.0.0.1", port)
                    cpu0 = cpu_now()
                    t0 = time.perf_counter()
                    counts = await asyncio.gather(*(one(channel, i) for i in range(args.streams)))
                    t = time.perf_counter() - t0
                    channel.close()
                    return sum(counts), t, cpu_now() - cpu0

                return await trio_asyncio.aio_as_trio(run_all)()

        got, seconds, cpu = trio.run(main)
        server_cpu = _proc_cpu(server.pid)
        emit("grpc-echo", got, seconds, cpu, streams=args.streams, server_cpu_s=server_cpu)
    finally:
        server.terminate()
        server.wait(10)


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="probe", required=True)
    k = sub.add_parser("kafka-rtt")
    k.add_argument("--brokers", required=True)
    k.add_argument("--topic", required=True)
    k.add_argument("--partitions", type=int, default=8)
    k.add_argument("--count", type=int, default=20000)
    k.add_argument("--size", type=int, default=120)
    k.add_argument("--linger-ms", type=int, default=2)
    k.add_argument(
        "--rate", type=float, default=0.0, help="paced records/s: report one hop's latency (0: as fast as possible)"
    )
    r = sub.add_parser("redis-pubsub")
    r.add_argument("--redis", required=True)
    r.add_argument("--count", type=int, default=50000)
    r.add_argument("--size", type=int, default=100)
    r.add_argument("--batch", type=int, default=100)
    g = sub.add_parser("grpc-echo")
    g.add_argument("--count", type=int, default=50000)
    g.add_argument("--streams", type=int, default=50)
    s = sub.add_parser("_grpc-server")
    s.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    {
        "kafka-rtt": kafka_rtt,
        "redis-pubsub": redis_pubsub,
        "grpc-echo": grpc_echo,
        "_grpc-server": grpc_server,
    }[args.probe](args)


if __name__ == "__main__":
    main()
