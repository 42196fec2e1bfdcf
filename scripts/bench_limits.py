"""The limits Nimbus is measured against: the same message sizes through the same client libraries
with no Nimbus logic (used by scripts/bench.py, one probe per process so its CPU is its own).

    python scripts/bench_limits.py kafka-rtt --brokers 127.0.0.1:19092 --topic t --count 20000 --size 120
    python scripts/bench_limits.py redis-pubsub --redis 127.0.0.1:16379 --count 50000 --size 90
    python scripts/bench_limits.py grpc-echo --count 50000 --streams 50 --size 20
    python scripts/bench_limits.py grpc-pod --port 50999     # served until stdin closes
    python scripts/bench_limits.py replay-chain --brokers 127.0.0.1:19092 --redis 127.0.0.1:16379 --topic t --count 100000

Each prints one JSON line: {"probe": ..., "count": n, "seconds": s, "rate": n/s, "cpu_s": ...}.

- kafka-rtt: a kafka-python producer (acks=all, idempotent, linger as Nimbus's
  NIMBUS_PRODUCER_LINGER_MS) sends `count` records keyed over 1,000 keys from a trio task, futures
  resolved on the sender thread; a kafka-python consumer in a worker thread polls them back.
  Rate = records consumed / time from the first send to the last record consumed.
- redis-pubsub: redis.asyncio (hiredis parser when installed) PUBLISHes `count` messages in
  pipelines of `batch`; a subscriber on its own connection counts them. Rate as above.
- grpc-echo: a grpclib server and client, each under trio (trio-asyncio) in its own process,
  one bidi stream per `streams`, upb EventRequest out / EventResponse back, `count` in all.
- replay-chain: one client's replay with the hops and libraries of Nimbus's and none of its
  logic. Setup (not timed): `count` DLQ-like results of one client in a 1-partition topic
  (deleted after if the probe created it). Then three processes: a worker (kafka-python
  group-less consumer polled in a thread under trio, upb decode, one PodMessage per batch
  PUBLISHed with redis.asyncio, at most `window` results unacked), a pod (grpclib server under
  trio-asyncio: Redis subscription -> trio -> each PodMessage's responses in one HTTP/2 write
  (nimbus.wire.grpc); each ack read is PUBLISHed back to the worker) and this process as the
  client (grpclib, cumulative ack every `ack-every`). Rate = results / time from the start
  signal to the last result; CPU per result of each process (and of the brokers, from their
  pid files: their whole CPU meanwhile), and where the worker waited.
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
from typing import Any

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
    except Exception as e:
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
                q: latencies[min(len(latencies) - 1, int(len(latencies) * f))] * 1e3
                if latencies
                else 0.0
                for q, f in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
            },
        }
    emit("kafka-rtt", got, seconds, cpu, size=args.size, linger_ms=args.linger_ms, **extra)


# --- Kafka: the events -> results path, paced, one process per role ----------------------------


def _path_consumer(args: argparse.Namespace, topic: str, group: str) -> Any:
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        bootstrap_servers=args.brokers,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=500,
        # As nimbus.engines.kafka: a consumer whose metadata predates a just-created topic gets
        # no partitions until its next refresh (default 5 min), so refresh often and subscribe
        # only once the topic's partitions are known.
        metadata_max_age_ms=2_000,
    )
    deadline = time.monotonic() + 60
    while not c.partitions_for_topic(topic):
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic!r}: no partitions in the metadata after 60 s")
        time.sleep(0.2)
    c.subscribe([topic])
    while not c.assignment():
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic!r}: no partitions assigned after 60 s")
        c.poll(timeout_ms=200)
    return c


def _rd_config(args: argparse.Namespace) -> dict[str, Any]:
    """librdkafka settings as nimbus.engines.rdkafka's."""
    extra = json.loads(os.environ.get("BENCH_RDKAFKA_EXTRA") or "{}")  # experiments
    return {"bootstrap.servers": args.brokers, "socket.nagle.disable": True, **extra}


def _rd_producer(args: argparse.Namespace) -> Any:
    from confluent_kafka import Producer

    return Producer(
        {
            **_rd_config(args),
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "linger.ms": args.linger_ms,
        }
    )


class _RdConsumer:
    """A confluent-kafka group consumer with kafka-python's poll()/commit_async() shape."""

    def __init__(self, args: argparse.Namespace, topic: str, group: str) -> None:
        from confluent_kafka import Consumer

        self.c = Consumer(
            {
                **_rd_config(args),
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "topic.metadata.refresh.interval.ms": 2_000,
            }
        )
        assigned: list[object] = []
        self.c.subscribe([topic], on_assign=lambda _c, ps: assigned.extend(ps))
        deadline = time.monotonic() + 60
        self._held: list[Any] = []
        while not assigned:
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r}: no partitions assigned after 60 s")
            m = self.c.poll(0.2)
            if m is not None and m.error() is None:
                self._held.append(m)

    def poll(self, timeout_ms: int) -> dict[int, list[Any]]:
        msgs, self._held = self._held, []
        if not msgs:
            m = self.c.poll(timeout_ms / 1000)
            if m is not None:
                msgs = [m, *self.c.consume(499, 0)]
        good = [m for m in msgs if m.error() is None]
        return {0: [_RdRecord(m) for m in good]} if good else {}

    def commit_async(self) -> None:
        self.c.commit(asynchronous=True)

    def close(self) -> None:
        self.c.close()


class _RdRecord:
    __slots__ = ("key", "value")

    def __init__(self, m: Any) -> None:
        self.key, self.value = m.key(), m.value()


def _path_consumer_for(args: argparse.Namespace, topic: str, group: str) -> Any:
    if getattr(args, "client", "kafka-python") == "librdkafka":
        return _RdConsumer(args, topic, group)
    return _path_consumer(args, topic, group)


def path_relay(args: argparse.Namespace) -> None:
    """kafka-path's middle process (the worker's place): consume from `src`, stamp the time into
    bytes 8..16, produce to `dst` under the same key, commit per poll batch."""
    c = _path_consumer_for(args, args.src, f"{args.src}-relay")
    rd = args.client == "librdkafka"
    if rd:
        producer = _rd_producer(args)
        send = lambda k, v: producer.produce(args.dst, v, k)  # noqa: E731
    else:
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=args.brokers, linger_ms=args.linger_ms, acks="all"
        )
        send = lambda k, v: producer.send(args.dst, key=k, value=v)  # noqa: E731
    print("ready", flush=True)
    _exit_on_stdin_eof()
    cpu0, n = cpu_now(), 0
    while n < args.count:
        batch = c.poll(timeout_ms=200)
        for recs in batch.values():
            for r in recs:
                v = r.value[:8] + struct.pack("d", time.time()) + r.value[16:]
                send(r.key, v)
                n += 1
        if rd:
            producer.poll(0)  # delivery reports
        if batch:
            c.commit_async()
    producer.flush()
    print(json.dumps({"relayed": n, "cpu_s": cpu_now() - cpu0}), flush=True)
    if not rd:
        producer.close()
    c.close()


def path_sink(args: argparse.Namespace) -> None:
    """kafka-path's last process (the result router's place): consume from `src`, note each
    record's two hop latencies, commit per poll batch."""
    c = _path_consumer_for(args, args.src, f"{args.src}-sink")
    print("ready", flush=True)
    _exit_on_stdin_eof()
    cpu0 = cpu_now()
    hop1: list[float] = []
    hop2: list[float] = []
    total: list[float] = []
    deadline = time.monotonic() + args.timeout
    received, first = 0, None
    while received < args.count and time.monotonic() < deadline:
        batch = c.poll(timeout_ms=200)
        now = time.time()
        for recs in batch.values():
            for r in recs:
                t0, t1 = struct.unpack_from("dd", r.value)
                received += 1
                if first is None:
                    first = t0
                if t0 < first + args.warmup:  # the first second: connections, metadata
                    continue
                hop1.append(t1 - t0)
                hop2.append(now - t1)
                total.append(now - t0)
        if batch:
            c.commit_async()

    def q(xs: list[float]) -> dict[str, float]:
        xs.sort()
        return {
            k: xs[min(len(xs) - 1, int(len(xs) * f))] * 1e3 if xs else 0.0
            for k, f in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))
        }

    print(
        json.dumps(
            {
                "received": received,
                "warmup_s": args.warmup,
                "cpu_s": cpu_now() - cpu0,
                "latency_ms": q(total),
                "hop1_ms": q(hop1),
                "hop2_ms": q(hop2),
            }
        ),
        flush=True,
    )
    c.close()


def kafka_path(args: argparse.Namespace) -> None:
    """Nimbus's two Kafka hops with no Nimbus logic, one process per role as Nimbus runs them:
    this process produces `count` records paced at `rate` (a pod's place), a relay consumes and
    re-produces them (the event consumer's), a sink consumes them (the result router's)."""
    import trio
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    src, dst = f"{args.topic}-a", f"{args.topic}-b"
    admin = KafkaAdminClient(bootstrap_servers=args.brokers)
    try:
        admin.create_topics(
            [
                NewTopic(
                    t,
                    args.partitions,
                    args.replication,
                    topic_configs={"min.insync.replicas": str(min(2, args.replication))},
                )
                for t in (src, dst)
            ]
        )
    except Exception as e:
        if "TopicAlreadyExists" not in type(e).__name__ + str(e):
            raise
    admin.close()
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--brokers", args.brokers, "--count", str(args.count)]
    common += ["--client", args.client]
    relay = _Child(
        "relay",
        [
            *me,
            "_path-relay",
            *common,
            "--src",
            src,
            "--dst",
            dst,
            "--linger-ms",
            str(args.linger_ms),
        ],
    )
    # The first second (connections, metadata) is left out of the latency, if the run is long
    # enough to have more than that.
    warmup = 1.0 if args.count / args.rate >= 5 else 0.0
    sink = _Child(
        "sink",
        [*me, "_path-sink", *common, "--src", dst, "--timeout", "120", "--warmup", str(warmup)],
    )
    try:
        relay.expect("ready", 90)
        sink.expect("ready", 90)
        value = b"x" * max(args.size, 16)
        keys = [f"client-{i}".encode() for i in range(1000)]
        rd = args.client == "librdkafka"
        if rd:
            producer = _rd_producer(args)
            send = lambda k, v: producer.produce(src, v, k)  # noqa: E731
        else:
            producer = KafkaProducer(
                bootstrap_servers=args.brokers, linger_ms=args.linger_ms, acks="all"
            )
            send = lambda k, v: producer.send(src, value=v, key=k)  # noqa: E731
        cpu0 = cpu_now()
        t0 = time.perf_counter()

        async def produce() -> None:
            # Wake every tick and send what is due (a pod sends what arrived since its last
            # wake-up); tick 0: one wake-up per record.
            start, tick = trio.current_time(), args.tick_ms / 1000
            i = 0
            while i < args.count:
                due = min(args.count, int((trio.current_time() - start) * args.rate) + 1)
                while i < due:
                    v = struct.pack("d", time.time()) + value[8:]
                    send(keys[i % len(keys)], v)
                    i += 1
                if rd:
                    producer.poll(0)  # delivery reports
                await trio.sleep_until(
                    start + i / args.rate if not tick else trio.current_time() + tick
                )

        trio.run(produce)
        producer.flush()
        cpu = cpu_now() - cpu0
        got = json.loads(sink.expect("{", 180))
        seconds = time.perf_counter() - t0
        relayed = json.loads(relay.expect("{", 60))
        if not rd:
            producer.close()
    finally:
        relay.stop()
        sink.stop()
    emit(
        "kafka-path",
        got["received"],
        seconds,
        cpu + relayed["cpu_s"] + got["cpu_s"],
        sent=args.count,
        client=args.client,
        paced_rate=args.rate,
        tick_ms=args.tick_ms,
        size=args.size,
        linger_ms=args.linger_ms,
        cpu_s_by_process={"producer": cpu, "relay": relayed["cpu_s"], "sink": got["cpu_s"]},
        latency_ms=got["latency_ms"],
        hop1_ms=got["hop1_ms"],
        hop2_ms=got["hop2_ms"],
    )


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
        # At most this many bytes published and not yet received: past redis-server's pub/sub
        # output buffer limit (32 MB hard by default) it drops the subscriber, and the count
        # would never be reached (large messages at full speed did).
        window = max(args.batch, (8 << 20) // max(1, args.size))
        room = asyncio.Event()

        async def listen() -> None:
            nonlocal got, last
            while got < args.count:
                m = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if m is not None:
                    got += 1
                    last = time.perf_counter()
                    room.set()

        cpu0 = cpu_now()
        t0 = time.perf_counter()
        task = asyncio.ensure_future(listen())
        for start in range(0, args.count, args.batch):
            while start - got > window:
                room.clear()
                await room.wait()
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

    from nimbus.wire.messages import EventRequest, EventResponse

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


def grpc_pod(args: argparse.Namespace) -> None:
    """The gRPC side of a pod and nothing else, for the bench's paced runs (driven by the
    load generator): a grpclib server under trio (trio-asyncio) answering each protocol-2 event
    with its RECEIPT and its RESULT at once (no Kafka, no Redis), acks read and ignored. Prints
    "ready", then serves until stdin closes."""
    import trio
    import trio_asyncio
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    from nimbus.wire import messages as m
    from nimbus.wire.messages import EventRequest, EventResponse

    class Pod:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                "/nimbus.NimbusService/ProcessEvent": Handler(
                    self.handle, Cardinality.STREAM_STREAM, EventRequest, EventResponse
                )
            }

        async def handle(self, stream) -> None:  # type: ignore[no-untyped-def]
            async for req in stream:
                if not req.event_name:
                    continue  # an ack or a hello
                await stream.send_message(
                    EventResponse(kind=m.RECEIPT, seq=req.seq, delivery_id=req.seq)
                )
                await stream.send_message(
                    EventResponse(
                        kind=m.RESULT,
                        event_name=req.event_name,
                        number=req.number,
                        result=req.number * req.number,
                        seq=req.seq,
                        delivery_id=req.seq,
                    )
                )

    async def main() -> None:
        async with trio_asyncio.open_loop():
            server = Server([Pod()])
            await trio_asyncio.aio_as_trio(server.start)("127.0.0.1", args.port)
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until stdin closes

    trio.run(main)


def grpc_echo(args: argparse.Namespace) -> None:
    import socket

    import trio
    import trio_asyncio
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    from nimbus.wire.messages import EventRequest, EventResponse

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


# --- The replay path with no Nimbus logic: Kafka -> worker -> Redis -> pod -> gRPC -> client -----


def _chain_record(i: int, client_id: str, channel: str) -> bytes:
    """A DLQ record value as Nimbus writes one: a result whose trace has the 3 steps a diverted
    result carries (server/ProcessEvent, event-consumer/compute, result-router/divert-to-dlq;
    ~270-280 B like the bench's own DLQ records; a results-topic record, 2 steps, is ~210 B)."""
    from nimbus.wire.messages import KafkaEventResponse
    from nimbus.wire.trace import step

    n = 1 + i % 46340  # n*n stays within int32
    r = KafkaEventResponse(
        event_name="sq", number=n, result=n * n, client_id=client_id, redis_channel=channel,
        kafka_offset=i, delivery_id=i + 1, seq=i + 1,
    )  # fmt: skip
    step(r.log, "server", "pod1", "ProcessEvent", epoch=1)
    step(r.log, "event-consumer", "worker0", "compute", partition=0, offset=i, event="sq")
    step(r.log, "result-router", "worker0", "divert-to-dlq")
    return r.SerializeToString()


def _exit_on_stdin_eof(then: object = None) -> None:
    """A child of replay-chain: leave when the parent goes away (its stdin closes). `then`, a
    callable, runs on the first line (the start signal) before waiting for the end."""

    def watch() -> None:
        if then is not None:
            sys.stdin.readline()
            then()  # type: ignore[operator]
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _broker_cpu() -> dict[str, float]:
    """CPU seconds so far of the scripts' Kafka and Redis: scripts/bench.py's `broker_cpu` (this
    file runs as a script beside it; imported here, not at the top, so that loading this module
    does not load the bench)."""
    from bench import broker_cpu

    return broker_cpu()


def chain_worker(args: argparse.Namespace) -> None:
    """The replay worker's path: a group-less kafka-python consumer polled in a worker thread,
    upb decode, one PodMessage per batch PUBLISHed with redis.asyncio; at most `window` results
    published and not yet acked (acks: cumulative counts on the ack channel)."""
    import math

    import redis.asyncio as aioredis
    import trio
    import trio_asyncio
    from kafka import KafkaConsumer, TopicPartition

    from nimbus.wire.messages import RESULT, KafkaEventResponse, PodMessage

    host, _, port = args.redis.rpartition(":")
    tp = TopicPartition(args.topic, 0)

    def make() -> tuple[KafkaConsumer, int]:
        # As nimbus/engines/kafka.py KafkaLog.reader(): group-less, no auto commit or reset,
        # fetch_max_wait_ms 50.
        c = KafkaConsumer(
            bootstrap_servers=args.brokers.split(","),
            client_id="chain-worker",
            request_timeout_ms=15_000,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            group_id=None,
            auto_offset_reset="none",
            fetch_max_wait_ms=50,
        )
        c.assign([tp])
        end = c.end_offsets([tp])[tp]  # connects and reads the metadata before the timed part
        c.seek(tp, 0)
        return c, end

    def poll(c: KafkaConsumer) -> list:  # type: ignore[type-arg]
        return c.poll(timeout_ms=100, max_records=args.max_records).get(tp, [])

    async def main() -> None:
        async with trio_asyncio.open_loop():
            consumer, end = await trio.to_thread.run_sync(make)
            if end < args.count:
                raise SystemExit(f"{args.topic} holds {end} records, fewer than {args.count}")
            pub = aioredis.Redis(host=host, port=int(port))
            ps = aioredis.Redis(host=host, port=int(port)).pubsub()
            await trio_asyncio.aio_as_trio(ps.subscribe)(args.ack_channel)
            with trio.fail_after(10):
                while True:
                    m = await trio_asyncio.aio_as_trio(ps.get_message)(timeout=1.0)
                    if m is not None and m["type"] == "subscribe":
                        break
            publish = trio_asyncio.aio_as_trio(pub.publish)
            window = trio.Semaphore(args.window)
            all_acked = trio.Event()
            go = trio.Event()
            token = trio.lowlevel.current_trio_token()
            _exit_on_stdin_eof(lambda: token.run_sync_soon(go.set))
            # Where the publisher waited: for the window (acks), for records (Kafka), for Redis's
            # reply to a PUBLISH (each includes waiting for a CPU on a loaded machine).
            stats: dict[str, float] = {"publishes": 0, "polls": 0, "max_deliveries": 0}
            stats.update(window_wait_s=0.0, fetch_wait_s=0.0, publish_wait_s=0.0)
            print("ready", flush=True)
            await go.wait()

            async def fetch(send: trio.MemorySendChannel[list[KafkaEventResponse]]) -> None:
                got = 0
                async with send:
                    while got < args.count:
                        recs = await trio.to_thread.run_sync(poll, consumer)
                        if not recs:
                            continue
                        recs = recs[: args.count - got]
                        got += len(recs)
                        stats["polls"] += 1
                        await send.send([KafkaEventResponse.FromString(r.value) for r in recs])

            async def send_msg(msg: PodMessage, n: int) -> None:
                data = msg.SerializeToString()
                t = trio.current_time()
                await publish(args.channel, data)
                stats["publish_wait_s"] += trio.current_time() - t
                stats["publishes"] += 1
                stats["max_deliveries"] = max(stats["max_deliveries"], n)

            async def publish_batches(
                recv: trio.MemoryReceiveChannel[list[KafkaEventResponse]],
            ) -> None:
                async with recv:
                    while True:
                        t = trio.current_time()
                        try:
                            batch = await recv.receive()
                        except trio.EndOfChannel:
                            break
                        stats["fetch_wait_s"] += trio.current_time() - t
                        msg, n = PodMessage(reply_to=args.ack_channel), 0
                        for r in batch:
                            try:
                                window.acquire_nowait()
                            except trio.WouldBlock:
                                if n:  # publish what we hold before waiting, as the replay does
                                    await send_msg(msg, n)
                                    msg, n = PodMessage(reply_to=args.ack_channel), 0
                                t = trio.current_time()
                                await window.acquire()
                                stats["window_wait_s"] += trio.current_time() - t
                            d = msg.deliveries.add(
                                client_id=r.client_id,
                                epoch=1,
                                delivery_id=r.delivery_id,
                                token=r.delivery_id,
                            )
                            # the fields nimbus/wire/pod_channel.py pod_messages copies; no checks/trace
                            resp = d.response
                            resp.event_name = r.event_name
                            resp.number = r.number
                            resp.result = r.result
                            resp.delivery_id = r.delivery_id
                            resp.kind = RESULT
                            resp.seq = r.seq
                            resp.log.CopyFrom(r.log)
                            n += 1
                        if n:
                            await send_msg(msg, n)

            async def acks() -> None:
                acked = 0
                get = trio_asyncio.aio_as_trio(ps.get_message)
                while acked < args.count:
                    m = await get(timeout=None)
                    if m is None or m["type"] != "message":
                        continue
                    a = int(m["data"])
                    for _ in range(a - acked):
                        window.release()
                    acked = max(acked, a)
                all_acked.set()

            send, recv = trio.open_memory_channel[list[KafkaEventResponse]](4)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch, send)
                nursery.start_soon(publish_batches, recv)
                nursery.start_soon(acks)
                await all_acked.wait()
                nursery.cancel_scope.cancel()
            print("done " + json.dumps({k: round(v, 3) for k, v in stats.items()}), flush=True)
            await trio.sleep(math.inf)  # until the parent ends it (or its stdin closes)

    trio.run(main)


def chain_pod(args: argparse.Namespace) -> None:
    """The pod's path: the Redis subscription read by an asyncio task and handed to trio (as
    nimbus/engines/redis.py does), each PodMessage decoded in trio and queued for the stream, the
    stream's writer (asyncio, grpclib) writes its responses in one HTTP/2 write
    (nimbus.wire.grpc); each ack read on the stream is PUBLISHed to the worker's ack channel."""
    import asyncio
    import math

    import redis.asyncio as aioredis
    import trio
    import trio_asyncio
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    from nimbus.wire import grpc as grpcwire
    from nimbus.wire.messages import EventRequest, EventResponse, PodMessage

    host, _, port = args.redis.rpartition(":")
    outboxes: list[asyncio.Queue[PodMessage]] = []
    pub = aioredis.Redis(host=host, port=int(port))

    class Pod:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                METHOD: Handler(self.handle, Cardinality.STREAM_STREAM, EventRequest, EventResponse)
            }

        async def handle(self, stream) -> None:  # type: ignore[no-untyped-def]
            outbox: asyncio.Queue[PodMessage] = asyncio.Queue()

            async def writer() -> None:
                while True:
                    msg = await outbox.get()
                    ds = msg.deliveries
                    await grpcwire.server_send(
                        stream,
                        grpcwire.frame([d.response.SerializeToString() for d in ds]),
                        len(ds),
                    )

            await stream.send_initial_metadata()  # the client starts the worker once it has this
            outboxes.append(outbox)
            task = asyncio.ensure_future(writer())
            try:
                async for req in stream:
                    if req.ack:
                        await pub.publish(args.ack_channel, str(req.ack))
            finally:
                outboxes.remove(outbox)
                task.cancel()

    async def main() -> None:
        async with trio_asyncio.open_loop() as loop:
            send, recv = trio.open_memory_channel[bytes](math.inf)
            ps = aioredis.Redis(host=host, port=int(port)).pubsub()

            async def subscribe() -> None:
                await ps.subscribe(args.channel)
                while True:
                    m = await ps.get_message(timeout=10.0)
                    if m is None:
                        raise TimeoutError(f"SUBSCRIBE {args.channel} not confirmed")
                    if m["type"] == "subscribe":
                        return

            async def read() -> None:  # asyncio task: connection -> trio channel
                while True:
                    m = await ps.get_message(timeout=None)
                    if m is not None and m["type"] == "message":
                        send.send_nowait(m["data"])

            await trio_asyncio.aio_as_trio(subscribe)()
            loop.create_task(read())
            server = Server([Pod()])
            await trio_asyncio.aio_as_trio(server.start)("127.0.0.1", args.port)
            _exit_on_stdin_eof()
            print("ready", flush=True)
            async for payload in recv:
                msg = PodMessage.FromString(payload)
                for outbox in outboxes:
                    outbox.put_nowait(msg)

    trio.run(main)


class _Child:
    """A replay-chain subprocess: its stdout lines on a queue, stdin for the start signal."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        import queue

        self.name = name
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The child's next line starting with `prefix` (others are skipped); RuntimeError if it
        exits or prints none within `timeout` seconds."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"replay-chain {self.name}: no {prefix!r} within {timeout:.0f} s"
                ) from None
            if line is None:
                raise RuntimeError(
                    f"replay-chain {self.name} exited (rc {self.p.wait()}) before {prefix!r}"
                )
            if line.startswith(prefix):
                return line

    def signal(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


def replay_chain(args: argparse.Namespace) -> None:
    """The replay path, no Nimbus logic: worker and pod subprocesses, this process the client."""
    from kafka.admin import KafkaAdminClient, NewTopic

    client_id = f"{args.topic}-client"
    admin = KafkaAdminClient(bootstrap_servers=args.brokers)
    created = False
    try:
        admin.create_topics([NewTopic(args.topic, 1, 1)])
        created = True
    except Exception as e:
        if "TopicAlreadyExists" not in type(e).__name__ + str(e):
            raise
    admin.close()
    try:
        _replay_chain_run(args, client_id)
    finally:
        if created:  # the backlog is ~30 MB per 100,000 results: not kept
            try:
                admin = KafkaAdminClient(bootstrap_servers=args.brokers)
                admin.delete_topics([args.topic])
                admin.close()
            except Exception as e:
                print(f"replay-chain: could not delete topic {args.topic}: {e!r}", file=sys.stderr)


def _chain_backlog(args: argparse.Namespace, client_id: str, pod_channel: str) -> float:
    """Write the replay chain's backlog to args.topic; the median record's size in bytes."""
    import statistics

    from kafka import KafkaProducer

    # The backlog, as the DLQ holds it (not timed): `count` results of one client, producer
    # settings as Nimbus's.
    producer = KafkaProducer(
        bootstrap_servers=args.brokers, acks="all", enable_idempotence=True, linger_ms=2,
        batch_size=256 * 1024,
    )  # fmt: skip
    key = client_id.encode()
    sizes = []
    for i in range(args.count):
        v = _chain_record(i, client_id, pod_channel)
        if i % 1000 == 0:
            sizes.append(len(v))
        producer.send(args.topic, value=v, key=key)
    producer.flush(120)
    producer.close()
    return statistics.median(sizes)


def _emit_chain(args: argparse.Namespace, marks: dict[str, Any], record_bytes: float) -> None:
    """The replay chain run's report (emit), from the marks its client took."""
    seconds = marks["t1"] - marks["t0"]
    client_cpu = marks["cpu1"] - marks["cpu0"]
    worker_cpu = marks["worker1"] - marks["worker0"]
    pod_cpu = marks["pod1"] - marks["pod0"]
    b0, b1 = marks["brokers0"], marks["brokers1"]
    brokers = {k: round(b1[k] - b0.get(k, 0.0), 3) for k in b1}
    n = args.count
    every = client_cpu + worker_cpu + pod_cpu
    load = [round(x, 2) for x in os.getloadavg()]
    emit(
        "replay-chain", n, seconds, client_cpu,
        worker_cpu_s=worker_cpu, pod_cpu_s=pod_cpu, broker_cpu_s=brokers,
        cpu_us_per_result={
            "worker": round(worker_cpu / n * 1e6, 1), "pod": round(pod_cpu / n * 1e6, 1),
            "client": round(client_cpu / n * 1e6, 1),
            **{k: round(v / n * 1e6, 1) for k, v in brokers.items()},
        },
        all_cpu_us_per_msg=every / n * 1e6,
        all_with_brokers_cpu_us_per_msg=(every + sum(brokers.values())) / n * 1e6,
        first_result_ms=(marks["first"] - marks["t0"]) * 1e3,
        window=args.window, ack_every=args.ack_every, max_records=args.max_records,
        record_bytes=record_bytes, worker=marks["worker_stats"], loadavg_start=marks["load0"],
        loadavg_end=load,
    )  # fmt: skip


def _replay_chain_run(args: argparse.Namespace, client_id: str) -> None:
    import asyncio
    import queue
    import socket

    import trio
    import trio_asyncio
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    from nimbus.wire.messages import EventRequest, EventResponse

    pod_channel, ack_channel = f"{args.topic}-{os.getpid()}-pod", f"{args.topic}-{os.getpid()}-acks"
    record_bytes = _chain_backlog(args, client_id, pod_channel)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    me = [sys.executable, __file__]
    common = ["--redis", args.redis, "--channel", pod_channel, "--ack-channel", ack_channel]
    children: list[_Child] = []
    try:
        pod = _Child("pod", [*me, "_chain-pod", *common, "--port", str(port)])
        children.append(pod)
        worker = _Child(
            "worker",
            [
                *me, "_chain-worker", *common, "--brokers", args.brokers, "--topic", args.topic,
                "--count", str(args.count), "--window", str(args.window),
                "--max-records", str(args.max_records),
            ],
        )  # fmt: skip
        children.append(worker)
        pod.expect("ready", 60)
        worker.expect("ready", 60)
        marks: dict[str, Any] = {}

        async def client() -> None:
            channel = Channel("127.0.0.1", port)
            try:
                async with channel.request(
                    METHOD, Cardinality.STREAM_STREAM, EventRequest, EventResponse
                ) as call:
                    await call.send_request()
                    await call.recv_initial_metadata()  # the pod has the stream: start
                    marks["pod0"], marks["worker0"] = _proc_cpu(pod.p.pid), _proc_cpu(worker.p.pid)
                    marks["brokers0"] = _broker_cpu()
                    marks["cpu0"] = cpu_now()
                    marks["load0"] = [round(x, 2) for x in os.getloadavg()]
                    marks["t0"] = time.perf_counter()
                    worker.signal("go")
                    got = last = 0
                    while got < args.count:
                        m = await call.recv_message()
                        if m is None:
                            raise RuntimeError(f"the pod ended the stream after {got} results")
                        got += 1
                        if m.delivery_id != got:
                            raise RuntimeError(f"result {got} has delivery id {m.delivery_id}")
                        if got == 1:
                            marks["first"] = time.perf_counter()
                        last = m.delivery_id
                        if got % args.ack_every == 0:
                            await call.send_message(EventRequest(ack=last))
                    marks["t1"] = time.perf_counter()
                    if got % args.ack_every:
                        await call.send_message(EventRequest(ack=last))
                    marks["cpu1"] = cpu_now()
                    # The worker has every ack (through the pod) when it prints "done".
                    while True:
                        try:
                            line = worker.lines.get_nowait()
                        except queue.Empty:
                            await asyncio.sleep(0.005)
                            continue
                        if line is None:
                            raise RuntimeError("replay-chain worker exited before all acks")
                        if line.startswith("done"):
                            marks["pod1"], marks["worker1"] = (
                                _proc_cpu(pod.p.pid),
                                _proc_cpu(worker.p.pid),
                            )
                            marks["brokers1"] = _broker_cpu()
                            marks["worker_stats"] = json.loads(line[4:])
                            break
                    await call.cancel()
            finally:
                channel.close()

        async def main() -> None:
            async with trio_asyncio.open_loop():
                with trio.fail_after(args.timeout):
                    await trio_asyncio.aio_as_trio(client)()

        trio.run(main)
    finally:
        for c in children:
            c.stop()
    _emit_chain(args, marks, record_bytes)


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
        "--rate",
        type=float,
        default=0.0,
        help="paced records/s: report one hop's latency (0: as fast as possible)",
    )
    kp = sub.add_parser("kafka-path")
    kp.add_argument("--brokers", required=True)
    kp.add_argument("--topic", required=True, help="prefix of the two topics (-a, -b)")
    kp.add_argument("--partitions", type=int, default=8)
    kp.add_argument(
        "--replication", type=int, default=1, help="replicas per topic (min ISR 2 if > 1)"
    )
    kp.add_argument("--count", type=int, default=20000)
    kp.add_argument("--size", type=int, default=120)
    kp.add_argument("--linger-ms", type=int, default=2)
    kp.add_argument("--rate", type=float, required=True, help="paced records/s")
    kp.add_argument("--client", choices=("kafka-python", "librdkafka"), default="kafka-python")
    kp.add_argument(
        "--tick-ms", type=float, default=1.0, help="the producer's wake-up interval (0: per record)"
    )
    for name in ("_path-relay", "_path-sink"):
        w = sub.add_parser(name)
        w.add_argument("--brokers", required=True)
        w.add_argument("--count", type=int, required=True)
        w.add_argument("--src", required=True)
        w.add_argument("--dst")
        w.add_argument("--linger-ms", type=int, default=2)
        w.add_argument("--timeout", type=float, default=120)
        w.add_argument("--warmup", type=float, default=1.0, help="seconds left out of latency")
        w.add_argument("--client", choices=("kafka-python", "librdkafka"), default="kafka-python")
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
    gp = sub.add_parser("grpc-pod")
    gp.add_argument("--port", type=int, required=True)
    c = sub.add_parser("replay-chain")
    c.add_argument("--brokers", required=True)
    c.add_argument("--redis", required=True)
    c.add_argument(
        "--topic", required=True, help="created with 1 partition if missing; should be fresh"
    )
    c.add_argument("--count", type=int, default=100_000)
    c.add_argument(
        "--window", type=int, default=2000, help="as NIMBUS_REPLAY_WINDOW (default 2000)"
    )
    c.add_argument("--ack-every", type=int, default=100)
    c.add_argument("--max-records", type=int, default=2000, help="records per Kafka poll")
    c.add_argument("--timeout", type=float, default=180, help="seconds for the timed part")
    for name, fn in (("_chain-worker", True), ("_chain-pod", False)):
        w = sub.add_parser(name)
        w.add_argument("--redis", required=True)
        w.add_argument("--channel", required=True)
        w.add_argument("--ack-channel", required=True)
        if fn:
            w.add_argument("--brokers", required=True)
            w.add_argument("--topic", required=True)
            w.add_argument("--count", type=int, required=True)
            w.add_argument("--window", type=int, required=True)
            w.add_argument("--max-records", type=int, required=True)
        else:
            w.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    {
        "kafka-rtt": kafka_rtt,
        "kafka-path": kafka_path,
        "_path-relay": path_relay,
        "_path-sink": path_sink,
        "redis-pubsub": redis_pubsub,
        "grpc-echo": grpc_echo,
        "_grpc-server": grpc_server,
        "grpc-pod": grpc_pod,
        "replay-chain": replay_chain,
        "_chain-worker": chain_worker,
        "_chain-pod": chain_pod,
    }[args.probe](args)


if __name__ == "__main__":
    main()
