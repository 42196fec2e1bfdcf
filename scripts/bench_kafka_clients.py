"""CPU per call of the two Kafka adapters at low rates: kafka-python (nimbus.engines.kafka) and
librdkafka (nimbus.engines.rdkafka), behind the same Log port, on a real broker.

    .venv/bin/python scripts/bench_kafka_clients.py --brokers 127.0.0.1:19092 [--seconds 10]

For each adapter, in this process (CPU = process time, all threads: the client library's own
threads included), against an idle baseline of the same length:
- produce: one-record batches paced at --rate per second (send_batch awaited each time);
- poll: a group consumer polling (poll(500, 1.0)) while a feeder process writes --rate records
  per second, one at a time, so most polls wait for one record;
- idle: the log and a consumer open, the consumer polling an empty topic.
Per call = (CPU of the phase - idle CPU over the same time) / calls; the gross figure too.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

FEEDER = """
import sys, time
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": sys.argv[1], "linger.ms": 0})
topic, rate, seconds = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
n = int(rate * seconds)
t0 = time.monotonic()
for i in range(n):
    p.produce(topic, b"v%d" % i, b"k%d" % (i % 97))
    p.poll(0)
    time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
p.flush(10)
"""


def opener(adapter: str) -> Callable[..., AbstractAsyncContextManager[Any]]:
    if adapter == "librdkafka":
        from nimbus.engines.rdkafka import open_rdkafka_log

        return open_rdkafka_log
    from nimbus.engines.kafka import open_kafka_log

    return open_kafka_log


async def measure(adapter: str, brokers: str, rate: float, seconds: float) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    produce_topic, poll_topic, idle_topic = f"b-prod-{tag}", f"b-poll-{tag}", f"b-idle-{tag}"
    out: dict[str, float] = {}
    async with opener(adapter)(brokers, linger_ms=2, client_id=f"bench-{adapter}") as log:
        await log.ensure_topics([produce_topic, poll_topic, idle_topic], 8)
        await log.producer.send_batch(produce_topic, [(b"warm", b"up")])

        # idle: an open consumer polling an empty topic
        async with log.consumer(idle_topic, f"g-idle-{tag}") as c:
            while not (await c.poll(500, 1.0)).assigned:
                pass
            c0, t0, polls = time.process_time(), time.monotonic(), 0
            while time.monotonic() - t0 < seconds:
                await c.poll(500, 1.0)
                polls += 1
            idle_cpu_per_s = (time.process_time() - c0) / (time.monotonic() - t0)
        out["idle CPU (fraction of a core)"] = idle_cpu_per_s
        out["idle polls/s"] = polls / seconds

        # produce: one-record batches, paced
        n = int(rate * seconds)
        c0, t0 = time.process_time(), time.monotonic()
        for i in range(n):
            await log.producer.send_batch(produce_topic, [(b"k%d" % (i % 97), b"v%d" % i)])
            await trio.sleep_until(t0 + (i + 1) / rate)
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        out["produce: µs CPU per 1-record batch (gross)"] = cpu / n * 1e6
        out["produce: µs CPU per 1-record batch (net of idle)"] = (
            (cpu - idle_cpu_per_s * wall) / n * 1e6
        )

        # poll: a feeder process writes `rate` records/s, the consumer polls them
        async with log.consumer(poll_topic, f"g-poll-{tag}") as c:
            while not (await c.poll(500, 1.0)).assigned:
                pass
            feeder = await trio.lowlevel.open_process(
                [sys.executable, "-c", FEEDER, brokers, poll_topic, str(rate), str(seconds)]
            )
            try:
                await trio.sleep(0.5)  # the feeder's start
                c0, t0, polls, records = time.process_time(), time.monotonic(), 0, 0
                while time.monotonic() - t0 < seconds - 1.0:
                    r = await c.poll(500, 1.0)
                    polls += 1
                    records += len(r.records)
                cpu, wall = time.process_time() - c0, time.monotonic() - t0
            finally:
                await feeder.wait()
        out["poll: records per poll"] = records / max(polls, 1)
        out["poll: µs CPU per poll (gross)"] = cpu / polls * 1e6
        out["poll: µs CPU per poll (net of idle)"] = (cpu - idle_cpu_per_s * wall) / polls * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default="127.0.0.1:19092")
    ap.add_argument("--rate", type=float, default=100.0, help="records (batches) per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase")
    ap.add_argument("--adapters", default="kafka-python,librdkafka")
    args = ap.parse_args()
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    for adapter in args.adapters.split(","):
        res = trio.run(measure, adapter, args.brokers, args.rate, args.seconds)
        print(f"\n{adapter} (rate {args.rate:g}/s, {args.seconds:g} s per phase)")
        for k, v in res.items():
            print(f"  {k}: {v:,.3f}" if v < 10 else f"  {k}: {v:,.0f}")


if __name__ == "__main__":
    main()
