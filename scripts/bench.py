"""Nimbus benchmark: throughput, latency, CPU per event, replay drain and idle connections on the
real brokers, each figure next to the limit of the stage that bounds it, measured in the same run.

    .venv/bin/python scripts/bench.py            # full run (~6-8 min here), writes docs/BENCHMARKS.md
    .venv/bin/python scripts/bench.py --quick    # small sizes (~3-4 min)

Brokers: the scripts' Kafka and Redis on NIMBUS_KAFKA_PORT / NIMBUS_REDIS_PORT (started with
`scripts/services.sh up` unless --no-services-up). Nimbus runs as separate processes: 2 server
pods and `--workers` worker processes, each run on its own topics and Redis namespace.

Phases (progress on stderr, a table at the end, JSON + markdown written):
  limits   Kafka perf tools (ProducerPerformance/ConsumerPerformance), kafka-python produce->consume
           round trip, redis.asyncio PUBLISH->subscriber, grpclib echo stream under trio
           (scripts/bench_limits.py), at the message sizes Nimbus puts on each hop; and the
           replay path with the same hops and libraries but no Nimbus logic (replay-chain:
           kafka-python -> redis.asyncio -> grpclib under trio -> client, one client's backlog)
  live     scripts/load_client.py at full speed (max rate), then at 25/50/90% of it: events/s end
           to end, latency p50/p99/p99.9, CPU of every Nimbus process per 1,000 events
  replay   a client with a backlog of N results reconnects: results/s, time to LIVE after the last
           ack; then 100 clients with N/100 each at once
  conns    10,000 idle streams on one pod: RSS per stream, time to accept them all, and a live
           result on one of them
  profile  py-spy on the hottest Nimbus process during a saturation run (top functions)

Exit status: 0 written; 2 usage error (one line); 3 Kafka or Redis cannot be started or reached
(one line); 130 interrupted (Ctrl-C; the Nimbus processes it started are stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "scripts") not in sys.path:  # shared.py, also when loaded by path (tests)
    sys.path.append(str(ROOT / "scripts"))

from fleet import BenchFleet  # noqa: E402
from loguru import logger  # noqa: E402
from procs import PY, proc_cpu  # noqa: E402
from shared import (  # noqa: E402
    HOST,
    add_port_options,
    check_ports,
    percentile,
    ports_env,
    watch_flips,
)

from nimbus.client import open_client  # noqa: E402
from nimbus.entry import (  # noqa: E402
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ArgumentParser,
)

INSIDE_STAGE = "(inside Nimbus) server/ProcessEvent -> server/deliver"  # load_client.INSIDE
PAGE = os.sysconf("SC_PAGE_SIZE")
TARGETS = {
    "live_events_per_s": 5000,
    "bound_ratio": 0.5,
    "cpu_us_per_event": 300,
    "p99_ms_at_50pct": 20,
    "replay_results_per_s": 20000,
    "live_after_last_ack_ms": 100,
    "rss_kb_per_stream": 20,
}


def say(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
    }


CLUSTER = False  # --cluster: the brokers are the local clusters' (scripts/cluster.sh)


def broker_cpu() -> dict[str, float]:
    """CPU seconds so far of the scripts' Kafka and Redis (from their pid files; empty for
    brokers this script did not start); with --cluster, summed over the clusters' nodes."""
    local = Path(os.environ.get("NIMBUS_LOCAL_DIR", ROOT / ".local"))
    if CLUSTER:
        files = [("kafka", f) for f in sorted((local / "cluster").glob("kafka-*/kafka.pid"))]
        files += [("redis", f) for f in sorted((local / "cluster").glob("redis-*/redis.pid"))]
    else:
        files = [("kafka", local / "kafka" / "kafka.pid"), ("redis", local / "redis" / "redis.pid")]
    out: dict[str, float] = {}
    for name, pid_file in files:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{pid}").exists():
            out[name] = out.get(name, 0.0) + proc_cpu(pid)
    return out


def proc_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE // 1024
    except (OSError, IndexError):
        return 0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in after}


# --- limits -------------------------------------------------------------------------------------


async def run_json(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            cmd, capture_stdout=True, capture_stderr=True, cwd=ROOT, env=env, check=False
        )
    out = proc.stdout.decode(errors="replace")
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise RuntimeError(
        f"{' '.join(cmd[:3])}... printed no result (rc {proc.returncode}): {proc.stderr.decode()[-800:]}"
    )


def parse_perf(text: str, consume: bool) -> dict[str, float]:
    """ProducerPerformance's final line / ConsumerPerformance's CSV line -> records/s, MB/s."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not consume:
        for ln in reversed(lines):
            if "records sent" in ln:
                parts = ln.split(",")
                rate = float(parts[1].split("records/sec")[0].strip())
                mb = float(parts[1].split("(")[1].split("MB")[0].strip())
                avg_ms = float(parts[2].split("ms")[0].strip())
                return {"rate": rate, "mb_per_s": mb, "avg_latency_ms": avg_ms}
        raise RuntimeError(f"no ProducerPerformance summary in: {text[-400:]}")
    for i, ln in enumerate(lines):
        if ln.startswith("start.time"):
            head = [h.strip() for h in ln.split(",")]
            vals = [v.strip() for v in lines[i + 1].split(",")]
            row = dict(zip(head, vals, strict=False))
            return {"rate": float(row["nMsg.sec"]), "mb_per_s": float(row["MB.sec"])}
    raise RuntimeError(f"no ConsumerPerformance summary in: {text[-400:]}")


async def kafka_perf(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, Any]:
    """Kafka's own ProducerPerformance and ConsumerPerformance (scripts/kafka.sh perf-produce,
    perf-consume): 5 x --limit-count records of an event's size on a topic of the run's."""
    n = args.limit_count
    out: dict[str, Any] = {}
    topic = f"{args.prefix}-perf"
    env = {**os.environ, "NIMBUS_KAFKA_PORT": str(args.kafka_port)}
    say(f"limit: Kafka ProducerPerformance, {n * 5} records of {sizes['event']} B")
    await trio.run_process(
        [
            "bash",
            "scripts/kafka.sh",
            "topics",
            "--create",
            "--topic",
            topic,
            "--partitions",
            str(args.partitions),
        ],
        cwd=ROOT,
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    with trio.fail_after(300):
        p = await trio.run_process(
            [
                "bash",
                "scripts/kafka.sh",
                "perf-produce",
                "--topic",
                topic,
                "--num-records",
                str(n * 5),
                "--record-size",
                str(sizes["event"]),
                "--throughput",
                "-1",
                "--producer-props",
                "acks=all",
                f"linger.ms={args.linger_ms}",
            ],
            cwd=ROOT,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out["kafka_perf_produce"] = parse_perf(p.stdout.decode(errors="replace"), consume=False)
    say(f"  {out['kafka_perf_produce']['rate']:,.0f} records/s")
    say("limit: Kafka ConsumerPerformance")
    with trio.fail_after(300):
        p = await trio.run_process(
            [
                "bash",
                "scripts/kafka.sh",
                "perf-consume",
                "--topic",
                topic,
                "--messages",
                str(n * 5),
                "--timeout",
                "60000",
            ],
            cwd=ROOT,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    try:
        out["kafka_perf_consume"] = parse_perf(p.stdout.decode(errors="replace"), consume=True)
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        out["kafka_perf_consume"] = {"rate": 0.0, "error": str(e)[:300]}
    say(f"  {out['kafka_perf_consume']['rate']:,.0f} records/s")
    return out


async def limits(
    args: argparse.Namespace,
    kafka: str,
    redis: str,
    sizes: dict[str, int],
    paced_rate: float = 1000,
) -> dict[str, Any]:
    n = args.limit_count
    out = await kafka_perf(args, sizes)
    say(f"limit: kafka-python produce->consume round trip, {n} records of {sizes['event']} B")

    def kafka_rtt(topic: str, count: int, *extra: str) -> list[str]:
        return [
            PY, "scripts/bench_limits.py", "kafka-rtt", "--brokers", kafka, "--topic", topic,
            "--count", str(count), "--size", str(sizes["event"]), "--linger-ms", str(args.linger_ms),
            "--partitions", str(args.partitions), *extra,
        ]  # fmt: skip

    out["kafka_python_rtt"] = await run_json(kafka_rtt(f"{args.prefix}-rtt", n), 300)
    say(f"  {out['kafka_python_rtt']['rate']:,.0f} records/s")
    say(
        f"limit: Nimbus's two Kafka hops alone (producer -> relay -> sink, a process each), paced at"
        f" {paced_rate:,.0f} records/s (the 50% run's rate; 1,000/s without a live phase)"
    )
    out["kafka_path_paced"] = await run_json(
        [
            PY,
            "scripts/bench_limits.py",
            "kafka-path",
            "--brokers",
            kafka,
            "--topic",
            f"{args.prefix}-path",
            "--count",
            str(int(paced_rate * 8)),
            "--rate",
            str(paced_rate),
            "--size",
            str(sizes["event"]),
            "--linger-ms",
            str(args.linger_ms),
            "--partitions",
            str(args.partitions),
        ],  # fmt: skip
        300,
    )
    path = out["kafka_path_paced"].get("latency_ms", {})
    say(f"  p50 {path.get('p50', 0):.1f} ms, p99 {path.get('p99', 0):.1f} ms")
    say(f"limit: redis.asyncio PUBLISH->subscriber, {n} messages of {sizes['pod']} B")
    out["redis_pubsub"] = await run_json(
        [
            PY,
            "scripts/bench_limits.py",
            "redis-pubsub",
            "--redis",
            redis,
            "--count",
            str(n),
            "--size",
            str(sizes["pod"]),
        ],
        300,
    )
    say(f"  {out['redis_pubsub']['rate']:,.0f} messages/s")
    say(f"limit: grpclib echo stream under trio, {n} messages over 50 streams")
    out["grpc_echo"] = await run_json(
        [PY, "scripts/bench_limits.py", "grpc-echo", "--count", str(n), "--streams", "50"], 300
    )
    say(f"  {out['grpc_echo']['rate']:,.0f} messages/s")
    say(
        f"limit: grpclib echo under trio, one stream (what one client's replay travels), {n // 2} messages"
    )
    out["grpc_echo_1stream"] = await run_json(
        [PY, "scripts/bench_limits.py", "grpc-echo", "--count", str(n // 2), "--streams", "1"], 300
    )
    say(f"  {out['grpc_echo_1stream']['rate']:,.0f} messages/s")
    out["replay_chain"] = await replay_chain_limit(args, kafka, redis)
    return out


async def replay_chain_limit(args: argparse.Namespace, kafka: str, redis: str) -> dict[str, Any]:
    """The replay chain without Nimbus's logic (bench_limits.py replay-chain), --replay-backlog
    results; on a failure its error, so that the other limits stay usable."""
    window = int(os.environ.get("NIMBUS_REPLAY_WINDOW", "2000"))
    say(
        f"limit: the replay chain, no Nimbus logic (kafka-python -> redis.asyncio PUBLISH -> grpclib"
        f" under trio -> client), {args.replay_backlog:,} results, window {window:,}"
    )
    try:
        ch = await run_json(
            [
                PY, "scripts/bench_limits.py", "replay-chain", "--brokers", kafka, "--redis", redis,
                "--topic", f"{args.prefix}-chain", "--count", str(args.replay_backlog),
                "--window", str(window), "--ack-every", str(args.replay_ack_every),
            ],
            600,
        )  # fmt: skip
    except (RuntimeError, trio.TooSlowError, ValueError) as e:  # the other limits stay usable
        ch = {"rate": 0.0, "error": f"{type(e).__name__}: {e}"[:300]}
    say(
        f"  {ch['rate']:,.0f} results/s, {ch.get('all_cpu_us_per_msg', 0):.0f} µs CPU per result"
        f" (per process: {ch.get('cpu_us_per_result')})"
        if ch["rate"]
        else f"  failed: {ch.get('error')}"
    )
    return ch


def message_sizes(kafka: str, rid: str) -> dict[str, int]:
    """Median value size of the run's events and results records (read back after the live run)."""
    from kafka import KafkaConsumer, TopicPartition

    sizes: dict[str, int] = {}
    for name in ("events", "results"):
        c = KafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
        try:
            parts = [
                TopicPartition(f"{rid}-{name}", p)
                for p in (c.partitions_for_topic(f"{rid}-{name}") or [])
            ]
            c.assign(parts)
            c.seek_to_beginning()
            got: list[int] = []
            deadline = time.monotonic() + 10
            while len(got) < 200 and time.monotonic() < deadline:
                for recs in c.poll(timeout_ms=500).values():
                    got += [len(r.value or b"") for r in recs]
            sizes[name] = sorted(got)[len(got) // 2] if got else 0
        finally:
            c.close()
    return sizes


# --- live: load_client.py ----------------------------------------------------------------------


async def load_run(
    args: argparse.Namespace,
    fleet: BenchFleet,
    run_dir: Path,
    label: str,
    clients: int,
    events: int,
    rate: float,
) -> dict[str, Any]:
    out = run_dir / f"load-{label}.json"
    cmd = [
        PY,
        "scripts/load_client.py",
        "--clients",
        str(clients),
        "--events",
        str(events),
        "--targets",
        ",".join(fleet.targets),
        "--rate",
        f"{rate:.0f}",
        "--timeout",
        str(args.load_timeout),
        "--prefix",
        f"{args.prefix}-{label}",
        "--json",
        str(out),
        "--trace-sample",
        "10",
    ]
    before, cpu_c0, t0 = fleet.cpu(), children_cpu(), time.monotonic()
    with trio.fail_after(args.load_timeout + 120):
        proc = await trio.run_process(
            cmd, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    wall = time.monotonic() - t0
    nimbus = cpu_delta(before, fleet.cpu())
    summary = json.loads(out.read_text()) if out.exists() else {}
    received = summary.get("received", 0)
    total_cpu = sum(nimbus.values())
    summary.update(
        {
            "label": label,
            "target_rate": rate,
            "rc": proc.returncode,
            "wall_s": round(wall, 2),
            "nimbus_cpu_s": nimbus,
            "nimbus_cpu_total_s": round(total_cpu, 3),
            "cpu_us_per_event": round(total_cpu / received * 1e6, 1) if received else None,
            # Minus what the processes burn idle over the same wall time.
            "cpu_us_per_event_net_of_idle": round(
                max(0.0, total_cpu - sum(fleet.idle_util.values()) * wall) / received * 1e6, 1
            )
            if received
            else None,
            "cpu_s_per_1000_events": round(total_cpu / received * 1e3, 3) if received else None,
            "process_utilisation": {k: round(v / wall, 2) for k, v in nimbus.items()},
            "load_client_cpu_s": round(children_cpu() - cpu_c0, 2),
            "loadavg": loadavg(),
        }
    )
    summary["load_client_utilisation"] = round(summary["load_client_cpu_s"] / wall, 2)
    if proc.returncode != 0:
        summary["stderr_tail"] = proc.stderr.decode(errors="replace")[-1500:]
    return summary


async def live(args: argparse.Namespace, fleet: BenchFleet, run_dir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    c, e = args.clients, args.events
    say(f"live: warm-up ({c} clients x 20 events)")
    await load_run(args, fleet, run_dir, "warmup", c, 20, 0)
    # What the processes burn with nothing to do (timers, polls): part of every run's CPU.
    before, t0 = fleet.cpu(), time.monotonic()
    await trio.sleep(args.idle_seconds)
    fleet.idle_util = {
        k: v / (time.monotonic() - t0) for k, v in cpu_delta(before, fleet.cpu()).items()
    }
    res["idle_utilisation"] = {k: round(v, 3) for k, v in fleet.idle_util.items()}
    say(f"live: idle CPU utilisation per process {res['idle_utilisation']}")
    say(f"live: maximum rate, {c} clients x {e} events, unlimited")
    mx = await load_run(args, fleet, run_dir, "max", c, e, 0)
    res["max"] = mx
    say(
        f"  {mx.get('throughput_results_per_s', 0):,.0f} events/s end to end, {mx.get('cpu_us_per_event')} us CPU/event,"
        f" ok={mx.get('ok')}, utilisation {mx['process_utilisation']}, load client {mx['load_client_utilisation']}"
    )
    top = mx.get("throughput_results_per_s", 0.0)
    for frac in (0.25, 0.5, 0.9):
        rate = max(10.0, top * frac)
        events = max(10, int(rate * args.paced_seconds / c))
        say(
            f"live: {int(frac * 100)}% of max = {rate:,.0f} events/s, {c} clients x {events} events"
        )
        spies = None
        if frac == 0.25:  # where the time goes when batches are small
            spies = Spies(run_dir, "p25", [(p.name, p.pid) for p in fleet.procs])
            spies.start()
        r = await load_run(args, fleet, run_dir, f"p{int(frac * 100)}", c, events, rate)
        if spies is not None:
            r["profiles"] = await spies.stop()
        res[f"p{int(frac * 100)}"] = r
        lat = r.get("latency_ms", {})
        say(
            f"  {r.get('throughput_results_per_s', 0):,.0f} events/s, p50 {lat.get('p50', 0):.1f} p99 {lat.get('p99', 0):.1f}"
            f" p99.9 {lat.get('p999', 0):.1f} ms, {r.get('cpu_us_per_event')} us CPU/event, ok={r.get('ok')}"
        )
    # The same rate as the 50% run from 5x fewer clients: does latency follow the rate or the
    # number of streams?
    few = max(1, c // 5)
    rate = max(10.0, top * 0.5)
    events = max(10, int(rate * args.paced_seconds / few))
    say(f"live: 50% of max from {few} clients, {few} clients x {events} events")
    r = await load_run(args, fleet, run_dir, "p50_few", few, events, rate)
    r["clients"] = few
    res["p50_few"] = r
    lat = r.get("latency_ms", {})
    say(
        f"  {r.get('throughput_results_per_s', 0):,.0f} events/s, p50 {lat.get('p50', 0):.1f} p99 {lat.get('p99', 0):.1f} ms"
    )
    return res


# --- replay ------------------------------------------------------------------------------------


async def make_backlog(fleet: BenchFleet, redis: str, ids: list[str], per_client: int) -> float:
    """Workers stopped; each client sends `per_client` events, is receipted, leaves; workers start:
    every result goes to the DLQ. Returns seconds until the DLQ holds them all: until each
    client's record says the DLQ holds its last receipted result (the DLQ packs several results
    to a record, so its offsets do not count results)."""
    from nimbus.client import Receipted
    from nimbus.engines.redis import open_redis_state

    fleet.stop(fleet.workers)
    last: dict[str, int] = {}

    async def one(i: int, cid: str) -> None:
        def on_event(n: object) -> None:
            if isinstance(n, Receipted):
                last[cid] = max(last.get(cid, 0), n.delivery_id)

        async with open_client(
            [fleet.targets[i % 2]], cid, max_pending=5000, on_event=on_event
        ) as c:
            for n in range(1, per_client + 1):
                # Within sq's range (the result is an int32): every replayed result is a result,
                # not an OUT_OF_RANGE error (a 100,000 backlog of 1..n was half errors).
                await c.send("sq", 1 + (n - 1) % 46_340)
            await c.wait_settled()

    async with trio.open_nursery() as nursery:
        limiter = trio.CapacityLimiter(100)

        async def limited(i: int, cid: str) -> None:
            async with limiter:
                await one(i, cid)

        for i, cid in enumerate(ids):
            nursery.start_soon(limited, i, cid)
    assert len(last) == len(ids), f"receipts for {len(last)} of {len(ids)} clients"
    t0 = time.monotonic()
    await fleet.start(fleet.workers)
    async with open_redis_state(redis, prefix=f"{fleet.rid}:") as state:
        with trio.fail_after(600):
            while True:
                recs = await state.get_many(ids)
                done = sum(
                    1
                    for cid, r in zip(ids, recs, strict=True)
                    if r is not None and r.dlq_written >= last[cid]
                )
                if done == len(ids):
                    break
                say(f"  clients with their whole backlog in the DLQ: {done:,}/{len(ids):,}")
                await trio.sleep(1)
    return time.monotonic() - t0


class Spies:
    """py-spy on some processes for as long as a block runs (SIGINT makes py-spy write its file)."""

    def __init__(self, run_dir: Path, label: str, targets: list[tuple[str, int]]) -> None:
        self.files = {name: run_dir / f"profile-{label}-{name}.txt" for name, _ in targets}
        self.targets = targets
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            return
        for name, pid in self.targets:
            self.procs.append(
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "-p",
                        str(pid),
                        "-r",
                        "50",
                        "-f",
                        "raw",
                        "-o",
                        str(self.files[name]),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    async def stop(self) -> dict[str, Any]:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                await trio.to_thread.run_sync(p.wait, 30)
            except subprocess.TimeoutExpired:
                p.kill()
        return {name: summarize_profile(f) for name, f in self.files.items() if f.exists()}


async def drain(
    fleet: BenchFleet,
    ids: list[str],
    per_client: int,
    flips: dict[str, tuple[int, int]],
    spies: Spies | None = None,
    ack_every: int = 100,
) -> dict[str, Any]:
    """Reconnect every client at once; each takes its backlog; time results and the flip to LIVE."""
    last_result: dict[str, float] = {}
    first_result: dict[str, float] = {}
    counts: Counter[str] = Counter()
    before = fleet.cpu()
    brokers0 = broker_cpu()
    client0 = time.process_time()  # the draining clients run in this process
    if spies is not None:
        spies.start()
    t0 = time.time()

    async def one(i: int, cid: str) -> None:
        async with open_client(
            [fleet.targets[(i + 1) % 2]], cid, result_buffer=10_000, ack_every=ack_every
        ) as c:
            async for _r in c.results():
                now = time.time()
                first_result.setdefault(cid, now)
                counts[cid] += 1
                if counts[cid] >= per_client:
                    last_result[cid] = now
                    break
            # Stay connected until the status manager flips us LIVE (the library acks meanwhile).
            with trio.move_on_after(30):
                while cid not in flips:
                    await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        for i, cid in enumerate(ids):
            nursery.start_soon(one, i, cid)
    end = max(last_result.values()) if last_result else time.time()
    total = sum(counts.values())
    nimbus = cpu_delta(before, fleet.cpu())
    client_cpu = time.process_time() - client0
    brokers = cpu_delta(brokers0, broker_cpu())
    everything = sum(nimbus.values()) + client_cpu + sum(brokers.values())
    profiles = await spies.stop() if spies is not None else {}
    after_ack = [(flips[c][1] - flips[c][0]) / 1e6 for c in ids if c in flips and flips[c][0]]
    after_last = [
        (flips[c][1] / 1e9 - last_result[c]) * 1e3 for c in ids if c in flips and c in last_result
    ]
    after_ack.sort()
    after_last.sort()
    return {
        "clients": len(ids),
        "per_client": per_client,
        "received": total,
        "seconds": round(end - t0, 3),
        "results_per_s": round(total / (end - t0), 1) if end > t0 else 0.0,
        "first_result_ms": round((min(first_result.values()) - t0) * 1e3, 1)
        if first_result
        else None,
        "flipped_live": sum(1 for c in ids if c in flips),
        "live_after_last_ack_ms": {
            "p50": round(percentile(after_ack, 0.5), 1),
            "max": round(after_ack[-1], 1) if after_ack else None,
        },
        "live_after_last_result_ms": {
            "p50": round(percentile(after_last, 0.5), 1),
            "max": round(after_last[-1], 1) if after_last else None,
        },
        "nimbus_cpu_s": nimbus,
        "cpu_us_per_result": round(sum(nimbus.values()) / total * 1e6, 1) if total else None,
        "process_utilisation": {k: round(v / max(end - t0, 1e-9), 2) for k, v in nimbus.items()},
        # The whole machine's share: Nimbus, the draining clients (this process, including its
        # wait for the flips after the last result) and the brokers.
        "client_utilisation": round(client_cpu / max(time.time() - t0, 1e-9), 2),
        "broker_utilisation": {k: round(v / max(end - t0, 1e-9), 2) for k, v in brokers.items()},
        "all_cpu_us_per_result": round(everything / total * 1e6, 1) if total else None,
        "loadavg": loadavg(),
        "profiles": profiles,
    }


async def replay(
    args: argparse.Namespace, fleet: BenchFleet, kafka: str, redis: str, run_dir: Path
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    flips: dict[str, tuple[int, int]] = {}
    async with trio.open_nursery() as nursery:
        ready = trio.Event()

        def on_flip(cid: str, last_ack_ns: int, flip_ns: int) -> None:
            flips[cid] = (last_ack_ns, flip_ns)

        nursery.start_soon(watch_flips, redis, f"{fleet.rid}:", on_flip, ready)
        await ready.wait()
        window = int(os.environ.get("NIMBUS_REPLAY_WINDOW", "2000"))
        for label, nclients in (("one", 1), ("many", 100), ("one_window_x5", 1)):
            per = args.replay_backlog // nclients
            if label == "one_window_x5":
                # The proof of what bounds one client's replay: the same drain with a window 5x
                # larger (workers restart with it; the backlog is built under it too).
                per = min(per, 20_000)
                for w in fleet.workers:
                    w.env["NIMBUS_REPLAY_WINDOW"] = str(window * 5)
                say(f"replay: the same with NIMBUS_REPLAY_WINDOW={window * 5} (default {window})")
            ids = [f"{args.prefix}-replay-{label}-{i}" for i in range(nclients)]
            say(
                f"replay: building a backlog of {nclients} x {per:,} results (workers stopped meanwhile)"
            )
            routed = await make_backlog(fleet, redis, ids, per)
            say(f"  backlog in the DLQ {routed:.1f} s after the workers started; reconnecting")
            # The replaying client runs in this process: profile it too (is it what bounds?).
            procs = [(p.name, p.pid) for p in fleet.procs] + [("client", os.getpid())]
            spies = Spies(run_dir, f"replay-{label}", procs) if label in ("one", "many") else None
            r = await drain(fleet, ids, per, flips, spies, args.replay_ack_every)
            r["backlog_routed_s"] = round(routed, 1)
            r["replay_window"] = window * 5 if label == "one_window_x5" else window
            res[label] = r
            say(
                f"  {r['received']:,} results in {r['seconds']:.2f} s = {r['results_per_s']:,.0f}/s;"
                f" LIVE {r['live_after_last_ack_ms']} ms after the last ack; {r['flipped_live']}/{nclients} flipped"
            )
        nursery.cancel_scope.cancel()
    return res


# --- connections -------------------------------------------------------------------------------


async def conns(args: argparse.Namespace, fleet: BenchFleet) -> dict[str, Any]:
    pod = fleet.pods[0]
    n = args.streams
    rss0 = proc_rss_kb(pod.pid)
    say(f"conns: {n:,} streams on {pod.name} (RSS {rss0 / 1024:.0f} MB before)")
    cmd = [
        PY,
        "scripts/bench_conns.py",
        "--target",
        fleet.targets[0],
        "--streams",
        str(n),
        "--prefix",
        f"{args.prefix}-idle",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        accepted = json.loads(await trio.to_thread.run_sync(proc.stdout.readline))
        await trio.sleep(3)  # let the pod settle (results of the first events delivered and acked)
        rss1 = proc_rss_kb(pod.pid)
        say(
            f"  accepted {accepted.get('streams'):,} in {accepted.get('seconds', 0):.1f} s; RSS {rss1 / 1024:.0f} MB"
        )
        proc.stdin.write("probe\n")
        proc.stdin.flush()
        probe = json.loads(await trio.to_thread.run_sync(proc.stdout.readline))
        say(f"  live delivery on an idle stream: {probe}")
        proc.stdin.write("quit\n")
        proc.stdin.flush()
    finally:
        try:
            await trio.to_thread.run_sync(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()
    streams = accepted.get("streams", 0)
    return {
        "streams": streams,
        "accept_s": round(accepted.get("seconds", 0.0), 2),
        "failed": accepted.get("failed", 0),
        "pod_rss_mb_before": round(rss0 / 1024, 1),
        "pod_rss_mb_after": round(rss1 / 1024, 1),
        "rss_kb_per_stream": round((rss1 - rss0) / streams, 2) if streams else None,
        "probe": probe,
        "loadavg": loadavg(),
    }


# --- profile -----------------------------------------------------------------------------------


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """py-spy's collapsed stacks -> top functions by self time and by total time."""
    selfs: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        samples += c
        frames = stack.split(";")
        selfs[frames[-1]] += c
        for f in set(frames):
            totals[f] += c

    def short(f: str) -> str:
        return f.replace(str(ROOT) + "/", "").replace(
            sys.prefix + "/lib/python3.11/site-packages/", ""
        )

    return {
        "samples": samples,
        "self": [(short(f), round(c / samples * 100, 1)) for f, c in selfs.most_common(top)]
        if samples
        else [],
        "total": [(short(f), round(c / samples * 100, 1)) for f, c in totals.most_common(top + 10)]
        if samples
        else [],
    }


async def profile(
    args: argparse.Namespace, fleet: BenchFleet, run_dir: Path, rate_hint: float
) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    c = args.clients
    events = max(50, int(max(rate_hint, 200) * args.profile_seconds * 1.5 / c))
    out = run_dir / "load-profile.json"
    cmd = [
        PY,
        "scripts/load_client.py",
        "--clients",
        str(c),
        "--events",
        str(events),
        "--targets",
        ",".join(fleet.targets),
        "--timeout",
        str(args.load_timeout),
        "--prefix",
        f"{args.prefix}-prof",
        "--json",
        str(out),
    ]
    say(
        f"profile: saturation run, py-spy {args.profile_seconds}s on every Nimbus process and the load client"
    )
    load = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await trio.sleep(2)
    before = fleet.cpu()
    t0 = time.monotonic()
    targets = [(p.name, p.pid) for p in fleet.procs] + [("load_client", load.pid)]
    spies = []
    for name, pid in targets:
        raw = run_dir / f"profile-{name}.txt"
        spies.append(
            (
                name,
                raw,
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        str(args.profile_seconds),
                        "-r",
                        "50",
                        "-f",
                        "raw",
                        "-o",
                        str(raw),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        )
    for _, _, s in spies:
        await trio.to_thread.run_sync(s.wait)
    util = {
        k: round(v / (time.monotonic() - t0), 2) for k, v in cpu_delta(before, fleet.cpu()).items()
    }
    await trio.to_thread.run_sync(load.wait)
    profiles = {}
    for name, raw, _ in spies:
        if raw.exists():
            profiles[name] = summarize_profile(raw)
    hottest = max(util, key=lambda k: util[k]) if util else None
    return {"utilisation": util, "hottest": hottest, "profiles": profiles}


# --- report ------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.0%}" if a and b else "-"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def _role(process: str) -> str:
    """A Nimbus process name (pod0, worker0, status) -> its role (pod, worker, status)."""
    return process.rstrip("0123456789") or process


def replay_cpu_by_role(r: dict[str, Any]) -> dict[str, float]:
    """CPU µs per result of a bench replay drain (`drain()`), by role: the Nimbus processes
    (pods summed, workers summed), the draining client and each broker. The client's share is
    what remains of `all_cpu_us_per_result` (it includes its wait for the flip to LIVE)."""
    n = r.get("received") or 0
    if not n or not r.get("all_cpu_us_per_result"):
        return {}
    out: dict[str, float] = {}
    for k, v in r.get("nimbus_cpu_s", {}).items():
        out[_role(k)] = out.get(_role(k), 0.0) + v / n * 1e6
    brokers = {k: u * r["seconds"] / n * 1e6 for k, u in r.get("broker_utilisation", {}).items()}
    out["client"] = max(0.0, r["all_cpu_us_per_result"] - sum(out.values()) - sum(brokers.values()))
    out.update(brokers)
    return {k: round(v, 1) for k, v in out.items()}


def chain_ok(chain: dict[str, Any] | None) -> bool:
    return bool(chain and chain.get("rate") and not chain.get("error"))


def replay_limit(label: str, lim: dict[str, Any]) -> tuple[str, float | None]:
    """The limit column of a replay row and the rate it stands for: one client's replay (`one`,
    `one_window_x5`) against the replay chain with no Nimbus logic when the run has it, else (and
    for 100 clients) Kafka's consume rate."""
    kr = lim.get("kafka_perf_consume", {}).get("rate")
    chain = lim.get("replay_chain")
    if label.startswith("one") and chain_ok(chain):
        assert chain is not None
        also = f"; Kafka consume {kr:,.0f}" if kr else ""
        return (
            f"{chain['rate']:,.0f} (replay chain, no Nimbus logic, window {chain.get('window', 0):,}{also})",
            chain["rate"],
        )
    return (f"{kr:,.0f} (Kafka consume)" if kr else "-"), kr


def chain_limits_row(chain: dict[str, Any] | None) -> str:
    """The replay chain's row in the Limits table ("-" when the run has none)."""
    if chain is None:
        return "| replay_chain | - | - | not measured in this run |"
    if not chain_ok(chain):
        return f"| replay_chain | - | - | failed: {str(chain.get('error', '?'))[:200]} |"
    per = chain.get("cpu_us_per_result", {})
    procs = " / ".join(f"{k} {per[k]:.0f}" for k in ("worker", "pod", "client") if k in per)
    brokers = " / ".join(f"{k} {per[k]:.0f}" for k in ("kafka", "redis") if k in per)
    return (
        f"| replay_chain | {chain['rate']:,.0f} | {chain['all_cpu_us_per_msg']:.0f} ({procs}"
        + (f"; brokers {brokers}" if brokers else "")
        + ")"
        f" | the replay path, one client, {chain['count']:,} results of {chain.get('record_bytes', 0):.0f} B:"
        " kafka-python read -> redis.asyncio PUBLISH per batch -> grpclib stream under trio ->"
        f" grpclib client, cumulative acks every {chain.get('ack_every')}, window {chain.get('window', 0):,};"
        " no Nimbus logic. CPU: worker + pod + client per result (brokers apart) |"
    )


def chain_comparison(
    one: dict[str, Any] | None, chain: dict[str, Any] | None, ncpu: int, target: float = 20_000
) -> list[str]:
    """Bullets for "What bounds one client's replay": Nimbus's CPU per result against the replay
    chain's, process by process, and whether `target` results/s is within the chain's reach.
    Compared without the brokers: their CPU is read from their pids and counts everything the
    shared brokers did meanwhile."""
    if not chain_ok(chain):
        return []
    assert chain is not None
    per = chain.get("cpu_us_per_result", {})
    c_procs = chain["all_cpu_us_per_msg"]  # worker + pod + client
    c_brokers = sum(per.get(k, 0.0) for k in ("kafka", "redis"))
    rate = chain["rate"]
    load = chain.get("loadavg_start")
    text = (
        f"- The same replay path with no Nimbus logic (`replay-chain` in the limits: kafka-python ->"
        f" redis.asyncio PUBLISH -> grpclib under trio -> grpclib client; {chain['count']:,} results"
        f" of {chain.get('record_bytes', 0):.0f} B, window {chain.get('window', 0):,}, acks every"
        f" {chain.get('ack_every')}): **{rate:,.0f} results/s**"
        + (f" (load average {load[0]} at its start)" if load else "")
        + f", {c_procs:.0f} µs of CPU per result in its processes (worker {per.get('worker', 0):.0f}"
        f" / pod {per.get('pod', 0):.0f} / client {per.get('client', 0):.0f}); the brokers'"
        f" {c_brokers:.0f} more (their whole CPU meanwhile, shared)."
    )
    nim = replay_cpu_by_role(one) if one else {}
    if one and nim:
        whole = one["all_cpu_us_per_result"]
        n_procs = whole - sum(nim.get(k, 0.0) for k in ("kafka", "redis"))
        pairs = []
        for role in ("worker", "pod", "client"):
            if role in nim and per.get(role):
                pairs.append(
                    f"{role} {nim[role]:.0f} vs {per[role]:.0f} ({nim[role] / per[role]:.1f}x)"
                )
        if nim.get("status"):
            pairs.append(f"status manager {nim['status']:.0f} (no counterpart)")
        extra = {r: nim.get(r, 0.0) - per.get(r, 0.0) for r in ("worker", "pod", "client")}
        most = max(extra, key=lambda r: extra[r])
        text += (
            f" Nimbus's 1-client replay: {one['results_per_s']:,.0f} results/s"
            f" ({ratio(one['results_per_s'], rate)} of the chain's rate), {whole:.0f} µs of CPU per"
            f" result for the whole machine, {n_procs:.0f} in its processes and the client:"
            f" {n_procs / c_procs:.1f}x the chain's {c_procs:.0f}. Per process, Nimbus vs the chain"
            f" (µs per result): {', '.join(pairs)}"
        )
        if n_procs > c_procs:
            text += (
                f"; Nimbus's own work adds {n_procs - c_procs:.0f} µs per result, the most in the"
                f" {most} (+{extra[most]:.0f})."
            )
        else:
            text += (
                f"; Nimbus uses {c_procs - n_procs:.0f} µs per result less than the chain: the chain"
                " reads one DLQ record and sends one delivery per result, Nimbus packs a client's"
                " results in DLQ records and sends them in runs (NIMBUS_DLQ_PACK, nimbus/wire/packs.py),"
                " so the chain is not its bound."
            )
    ceiling = ncpu / c_procs * 1e6 if c_procs else 0.0
    with_brokers = ncpu / (c_procs + c_brokers) * 1e6 if c_procs else 0.0
    if rate >= target:
        reach = (
            f"- So {target:,.0f} results/s is within the stack's reach on this machine: the bare chain"
            f" moved {rate:,.0f}/s"
        )
        if one and one.get("results_per_s", 0) < target:
            reach += (
                "; what keeps Nimbus below it is the work Nimbus adds on this path, not the stack's"
                " libraries"
            )
    else:
        reach = (
            f"- So in this run {target:,.0f} results/s was not within the stack's reach on this"
            f" machine: even the bare chain moved only {rate:,.0f}/s"
        )
    reach += (
        f". At the chain's CPU cost {ncpu} CPUs would carry at most {ceiling:,.0f} results/s with"
        f" nothing else running ({with_brokers:,.0f} with the brokers' share as measured)"
    )
    w = chain.get("worker") or {}
    if rate < target <= ceiling:
        reach += "; so the chain was bound by waiting, not by its own CPU"
        if "publish_wait_s" in w:
            reach += (
                f" (its worker, in {chain['seconds']:.1f} s, waited {w['publish_wait_s']:.1f} s for"
                f" PUBLISH replies, {w['window_wait_s']:.1f} s for acks, {w['fetch_wait_s']:.1f} s for"
                " Kafka records; each wait includes waiting for a CPU on a loaded machine)"
            )
    return [text, reach + "."]


def analysis(res: dict[str, Any]) -> dict[str, Any]:
    """Which stage bounds live throughput: the stage limits, and the busiest process."""
    lim = res.get("limits", {})
    mx = res.get("live", {}).get("max", {})
    rate = mx.get("throughput_results_per_s")
    util = mx.get("process_utilisation", {})
    stages = {
        # Two Kafka round trips per event (events, results topics) run concurrently on separate
        # consumers, each bounded by the one-hop kafka-python rate.
        "kafka-python produce->consume (per hop)": lim.get("kafka_python_rtt", {}).get("rate"),
        "Redis PUBLISH->subscriber": lim.get("redis_pubsub", {}).get("rate"),
        # Each event crosses a gRPC stream twice each way (event + ack in, receipt + result out).
        "grpclib echo under trio (2 messages each way per event)": (
            lim.get("grpc_echo", {}).get("rate") or 0
        )
        / 2
        or None,
        "Kafka broker (ProducerPerformance)": lim.get("kafka_perf_produce", {}).get("rate"),
    }
    known = {k: v for k, v in stages.items() if v}
    bound = min(known, key=lambda k: known[k]) if known else None
    cpu_total = sum(util.values())
    return {
        "stage_limits": stages,
        "bounding_stage_by_limit": bound,
        "bounding_limit": known.get(bound) if bound else None,
        "ratio_to_bound": (rate / known[bound]) if bound and rate else None,
        "busiest_process": max(util, key=lambda k: util[k]) if util else None,
        "busiest_utilisation": max(util.values()) if util else None,
        "nimbus_cpu_utilisation_total": round(cpu_total, 2),
        "load_client_utilisation": mx.get("load_client_utilisation"),
        "cpus": res["machine"]["cpus"],
    }


def _realtime_lines(res: dict[str, Any]) -> list[str]:
    if not res.get("realtime"):
        return []
    import bench_realtime

    return [*bench_realtime.render(res["realtime"]), ""]


Row = tuple[str, str, str, str, str]  # a Summary row: figure, Nimbus, limit, ratio, target


def _max_rows(mx: dict[str, Any], lim: dict[str, Any], an: dict[str, Any]) -> Iterator[Row]:
    """Summary rows of the max-rate run: events/s against the bounding stage, CPU per event
    against the libraries' own floor."""
    rate = mx.get("throughput_results_per_s", 0)
    bl = an.get("bounding_limit")
    yield (
        "live events/s end to end (max)",
        f"{rate:,.0f}",
        f"{bl:,.0f} ({an.get('bounding_stage_by_limit')})" if bl else "-",
        ratio(rate, bl),
        f"≥ 5,000 and ≥ 50% of limit: {verdict(rate >= 5000 and bool(bl) and rate / bl >= 0.5)}",
    )
    cpu = mx.get("cpu_us_per_event")
    kcpu = lim.get("kafka_python_rtt", {}).get("cpu_us_per_msg")
    # The libraries' own CPU for what one event needs, no Nimbus logic: 2 Kafka hops
    # (produce+consume each), 2 server-side gRPC echoes (event in + receipt out, result out +
    # ack in) and 2 Redis pub/sub messages (result to the pod, delivery report back).
    g = lim.get("grpc_echo", {})
    g_us = g.get("server_cpu_s", 0) / max(g.get("count", 1), 1) * 1e6
    r_us = lim.get("redis_pubsub", {}).get("cpu_us_per_msg") or 0
    floor = 2 * (kcpu or 0) + 2 * g_us + 2 * r_us
    yield (
        "Nimbus CPU µs per event (all processes, max run; net of idle)",
        f"{cpu} ({mx.get('cpu_us_per_event_net_of_idle')})",
        f"{floor:.0f} = 2 x ({kcpu or 0:.0f} Kafka hop + {g_us:.0f} gRPC echo server + {r_us:.0f} Redis pub/sub)"
        if kcpu
        else "-",
        ratio(cpu, floor) if kcpu else "-",
        f"≤ 300: {verdict(cpu is not None and cpu <= 300)}",
    )


def _paced_rows(res: dict[str, Any]) -> Iterator[Row]:
    """Summary rows of the paced runs: latency (and inside Nimbus), CPU per event."""
    lim, lv = res.get("limits", {}), res.get("live", {})
    for frac in ("p25", "p50", "p90", "p50_few"):
        r = lv.get(frac)
        if not r:
            continue
        if frac == "p50_few":
            lat = r.get("latency_ms", {})
            yield (
                f"latency at 50% of max from {r.get('clients')} clients instead of"
                f" {res['config']['clients']}: p50 / p99 / p99.9 ms",
                f"{lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} / {lat.get('p999', 0):.1f}",
                "-",
                "-",
                f"p99 ≤ 20 ms: {verdict(lat.get('p99', 1e9) <= 20)}",
            )
            continue
        lat = r.get("latency_ms", {})
        target = f"p99 ≤ 20 ms: {verdict(lat.get('p99', 1e9) <= 20)}" if frac == "p50" else "-"
        path = lim.get("kafka_path_paced", {}).get("latency_ms")
        floor = (
            f"p99 {path['p99']:.1f} ms for Nimbus's two Kafka hops alone (kafka-python, a"
            f" process per role, paced, no Nimbus logic; p50 {path['p50']:.1f})"
            if frac == "p50" and path
            else "-"
        )
        yield (
            f"latency at {frac[1:]}% of max ({r.get('target_rate', 0):,.0f}/s): p50 / p99 / p99.9 ms",
            f"{lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} / {lat.get('p999', 0):.1f}",
            floor,
            "-",
            target,
        )
        inside = r.get("stages_ms", {}).get(INSIDE_STAGE)
        if inside:
            yield (
                "  of which inside Nimbus (pod ingest -> pod deliver, sampled): p50 / p99 ms",
                f"{inside['p50']:.1f} / {inside['p99']:.1f}",
                "-",
                "-",
                "-",
            )
        yield (
            f"  CPU µs per event at {frac[1:]}% (net of idle)",
            f"{r.get('cpu_us_per_event')} ({r.get('cpu_us_per_event_net_of_idle')})",
            "-",
            "-",
            "-",
        )


def _replay_rows(rp: dict[str, Any], lim: dict[str, Any]) -> Iterator[Row]:
    """Summary rows of the replay phase and of the worker pipeline while the backlog was built."""
    for label, title in (
        ("one", "replay, 1 client"),
        ("many", "replay, 100 clients at once"),
        ("one_window_x5", "replay, 1 client, NIMBUS_REPLAY_WINDOW x5"),
    ):
        r = rp.get(label)
        if not r:
            continue
        limit_text, limit_rate = replay_limit(label, lim)
        yield (
            f"{title}: results/s delivered and acked",
            f"{r['results_per_s']:,.0f} ({r['received']:,} in {r['seconds']:.1f} s)",
            limit_text,
            ratio(r["results_per_s"], limit_rate),
            f"≥ 20,000: {verdict(r['results_per_s'] >= 20000)}" if label == "one" else "-",
        )
        la, basis = r["live_after_last_ack_ms"], "ack"
        if la["max"] is None:  # flipped by the periodic check, which carries no ack time
            la, basis = r["live_after_last_result_ms"], "result received"
        yield (
            f"{title}: LIVE after the last {basis}, ms (p50 / max)",
            f"{la['p50']} / {la['max']} ({r['flipped_live']}/{r['clients']} flipped)",
            "-",
            "-",
            f"≤ 100: {verdict(la['max'] is not None and la['max'] <= 100)}",
        )
    one = rp.get("one")
    if one and one.get("backlog_routed_s"):
        n = one["received"]
        kr = lim.get("kafka_python_rtt", {}).get("rate")
        yield (
            "worker pipeline, no clients: events -> results -> DLQ, events/s (1 worker process)",
            f"{n / one['backlog_routed_s']:,.0f} ({n:,} in {one['backlog_routed_s']} s, from the workers' start)",
            f"{kr:,.0f} (kafka-python, one hop)" if kr else "-",
            ratio(n / one["backlog_routed_s"], kr),
            "-",
        )


def _conns_rows(cn: dict[str, Any]) -> Iterator[Row]:
    """Summary rows of the idle-connections phase."""
    yield (
        "idle streams on one pod",
        f"{cn['streams']:,} accepted ({cn.get('failed', 0)} failed to open within 120 s) in {cn['accept_s']} s",
        "-",
        "-",
        "10,000",
    )
    kb = cn.get("rss_kb_per_stream")
    yield (
        "  RSS per idle stream, KB",
        f"{kb}",
        "-",
        "-",
        f"≤ 20: {verdict(kb is not None and kb <= 20)}",
    )
    pr = cn.get("probe", {})
    yield (
        "  live result on one idle stream",
        f"{'ok' if pr.get('ok') else 'FAILED'} in {pr.get('ms', '?')} ms",
        "-",
        "-",
        "works",
    )


def _summary_rows(res: dict[str, Any]) -> list[Row]:
    lim, lv = res.get("limits", {}), res.get("live", {})
    rows: list[Row] = []
    if lv.get("max"):
        rows += [*_max_rows(lv["max"], lim, res.get("analysis", {})), *_paced_rows(res)]
    rows += _replay_rows(res.get("replay", {}), lim)
    if res.get("conns"):
        rows += _conns_rows(res["conns"])
    return rows


def _head_lines(res: dict[str, Any], rows: list[Row]) -> list[str]:
    """Title, machine, the realtime phase's section and the Summary table."""
    m = res["machine"]
    lines = [
        "# Nimbus benchmarks",
        "",
        f"Generated by `scripts/bench.py{' --quick' if res['quick'] else ''}` at {res['started']} (UTC), {res['duration_s']:.0f} s."
        " Re-run it to regenerate this file (and the JSON beside it).",
        "",
        "## Machine",
        "",
        f"- {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB RAM, Linux {m['kernel']}, Python {m['python']}",
        f"- load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')} (the machine is shared: "
        "other work running at the same time lowers every rate here; CPU per event is the stable figure)",
        f"- Kafka 4.4 (single KRaft node, scripts/kafka.sh) and redis-server (AOF everysec) on loopback;"
        f" Nimbus: 2 pods + {res['config']['workers']} worker process(es)"
        + (
            " (events, results, replay) + 1 status-manager process"
            if res["config"].get("status_process")
            else " (all roles)"
        )
        + f", {res['config']['partitions']} partitions,"
        f" {res['config']['clients']} clients (scripts/load_client.py, protocol 2, delivery contract on)",
        f"- message sizes on the wire: events record {res['sizes'].get('event')} B, results record {res['sizes'].get('result')} B",
        "",
        *(_realtime_lines(res)),
        "## Summary",
        "",
        "| figure | Nimbus | limit (same run) | ratio | target |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    return lines


def _limits_lines(lim: dict[str, Any]) -> list[str]:
    """The Limits table: each stage with no Nimbus logic."""
    lines = [
        "",
        "## Limits (no Nimbus logic, same sizes, same libraries)",
        "",
        "| stage | rate /s | CPU µs/msg | note |",
        "|---|---|---|---|",
    ]
    notes = {
        "kafka_perf_produce": "Kafka's ProducerPerformance (Java), acks=all",
        "kafka_perf_consume": "Kafka's ConsumerPerformance (Java)",
        "kafka_python_rtt": "kafka-python producer (linger as Nimbus) -> consumer, one hop",
        "kafka_path_paced": "Nimbus's two Kafka hops: producer -> relay (consume, produce) -> sink, a process each, paced at the 50% run's rate: latency",
        "redis_pubsub": "redis.asyncio PUBLISH (pipelined by 100) -> subscriber",
        "grpc_echo": "grpclib bidi echo under trio, 50 streams, client+server processes",
        "grpc_echo_1stream": "the same on one stream (one client's replay travels one stream)",
    }
    for k, note in notes.items():
        v = lim.get(k)
        if v:
            cpu = v.get("cpu_us_per_msg")
            if v.get("latency_ms"):
                note += f" p50 {v['latency_ms']['p50']:.1f} / p99 {v['latency_ms']['p99']:.1f} ms"
            lines.append(
                f"| {k} | {v.get('rate', 0):,.0f} | {f'{cpu:.0f}' if cpu else '-'} | {note} |"
            )
    lines.append(chain_limits_row(lim.get("replay_chain")))
    return lines


def _bound_lines(an: dict[str, Any], mx: dict[str, Any]) -> list[str]:
    """Where the bound is: the lowest stage limit, the CPUs the max-rate run used."""
    if not an:
        return []
    return [
        "",
        "## Where the bound is",
        "",
        f"- The lowest stage limit is **{an.get('bounding_stage_by_limit')}** at {an.get('bounding_limit') or 0:,.0f}/s;"
        f" Nimbus reached {ratio(mx.get('throughput_results_per_s'), an.get('bounding_limit'))} of it.",
        f"- During the max-rate run the Nimbus processes used {an.get('nimbus_cpu_utilisation_total')} CPUs in all"
        f" (per process: {mx.get('process_utilisation')}), the load client {an.get('load_client_utilisation')} CPU,"
        f" on a {an.get('cpus')}-CPU machine: "
        + (
            "the machine's CPUs are the bound (every process is CPU-bound Python; a faster stage would only move the time)."
            if (an.get("nimbus_cpu_utilisation_total") or 0)
            + (an.get("load_client_utilisation") or 0)
            >= 0.85 * (an.get("cpus") or 2)
            else "the Nimbus processes and the client together use less than the machine's CPUs, so"
            " either other work on the shared machine takes the rest (load average during the run:"
            f" {mx.get('loadavg')}) or the bound is latency/batching inside a stage (see below)."
        ),
        f"- At {mx.get('cpu_us_per_event')} µs of Nimbus CPU per event, {an.get('cpus')} CPUs can carry at most"
        f" {(an.get('cpus') or 2) / (mx.get('cpu_us_per_event') or 1) * 1e6:,.0f} events/s with nothing else running"
        " (and the clients need CPU too).",
    ]


def _live_cpu_lines(lv: dict[str, Any]) -> list[str]:
    """Live runs: who used the CPUs (a table of the runs), and why paced runs cost more."""
    if not lv:
        return []
    lines = [
        "",
        "## Live runs: who used the CPUs",
        "",
        "| run | target /s | achieved /s | Nimbus CPU per process (CPUs) | load client (CPUs) | load average | µs CPU/event |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ("max", "p25", "p50", "p90", "p50_few"):
        r = lv.get(k)
        if r:
            lines.append(
                f"| {k} | {format(r['target_rate'], ',.0f') if r.get('target_rate') else 'unlimited'} | {r.get('throughput_results_per_s', 0):,.0f}"
                f" | {r.get('process_utilisation')} | {r.get('load_client_utilisation')} | {r.get('loadavg')}"
                f" | {r.get('cpu_us_per_event')} |"
            )
    lines += [
        "",
        "CPU per event is several times higher in the paced runs than at the maximum. The reason"
        " (the profile at 25% below points there: its samples sit in socket sends, epoll"
        " wake-ups, thread hand-offs and the trio/trio-asyncio schedulers, not in Nimbus code):"
        " paced clients send one event per wake-up, so each stage handles small batches and pays"
        " its per-batch costs (a thread hop and GIL hand-over per Kafka poll/produce, a Redis"
        " script per batch, an HTTP/2 write per gRPC message, a trio scheduling round per"
        " asyncio callback in trio-asyncio) for very few events; unpaced, the same costs are"
        " shared by large batches. So at 50% of the maximum rate the machine's two CPUs are"
        " close to saturated, and latency is queueing for a CPU (see the stage table below)."
        " Where the achieved rate falls short of the target while no Nimbus process is near 1.0"
        " CPU, the CPUs went to the brokers, the load client and other work on the machine"
        " (load average column).",
        "",
        "The per-batch costs, measured on this machine outside the bench (2026-11-27, sixth"
        " session): one `poll()` of a kafka-python 3 consumer costs ~2.3 ms of CPU whether it"
        " returns records or not (three cross-thread round trips to kafka-python's IO thread per"
        " poll: coordinator check, fetch send, wait; an idle consumer polling every 10 ms used"
        " 0.22 CPU then, 0.05 in the seventh session; a consumer fed 2,000 records/s, ~2.1 ms"
        " per poll, ~1.9 ms of it fixed), and a one-record produce batch ~1.8-2.3 ms; a wake-up"
        " of another thread"
        " costs ~40 µs, a loopback TCP message that wakes a sleeping process ~35 µs on each"
        " side. A paced consumer polls once per arriving record or two, so the worker spends"
        " ~0.5-0.7 CPU at 100 events/s (5-7 ms per event) and about as much at the maximum rate"
        " (~0.12 ms per event): its CPU follows the number of polls and produce batches, not of"
        " events. Tried and not kept: waiting after a poll that returned few records (one run"
        " each: 10 ms at 100 events/s, worker 0.71 -> 0.57 CPU and latency p50 27 -> 35 ms; 5 ms"
        " at 1,500 events/s, no change in CPU, p50 332 -> 385 ms; seventh session, 10 ms after"
        " a poll of fewer than a quarter of its budget, one quick run each: the worker's CPU"
        " stayed at 0.55, max 8,103 -> 6,028 events/s, latency mixed); kafka-python's metrics"
        " off (no change in a poll's or a produce's cost); the event consumer in a process of"
        " its own beside the router and replay (`--split-roles`, two alternating pairs of quick"
        " runs: max 7,918 / 7,803 -> 9,054 / 7,549 events/s, p50 latency at 50% 719 / 545 ->"
        " 557 / 579 ms, within the noise). A standalone consumer does gain from polling less"
        " (fed 2,000 records/s: 0.34 -> 0.19 -> 0.13 CPU with 0 / 10 / 20 ms between polls),"
        " but inside the loaded worker the CPU did not fall.",
    ]
    return lines


def _stage_lines(res: dict[str, Any]) -> list[str]:
    """Latency by stage at 50% of max: for both client counts when the run has them."""
    lv = res.get("live", {})
    p50, few = lv.get("p50", {}), lv.get("p50_few", {})
    if p50.get("stages_ms") and few.get("stages_ms"):
        return _stage_comparison_lines(res, p50["stages_ms"], few)
    if not p50.get("stages_ms"):
        return []
    return [
        "",
        "## Latency by stage (50% of max, from sampled result traces)",
        "",
        "| stage | p50 ms | p99 ms |",
        "|---|---|---|",
        *(
            f"| {stage} | {v['p50']:.1f} | {v['p99']:.1f} |"
            for stage, v in p50["stages_ms"].items()
        ),
        "",
        "The client send -> server step and the server deliver -> client step include the"
        " client library's and the pod's gRPC work (and time waiting for a CPU); Kafka hops are"
        " the two middle steps.",
    ]


def _stage_comparison_lines(
    res: dict[str, Any], stages: dict[str, Any], few: dict[str, Any]
) -> list[str]:
    """The stages at 50% of max from all clients (`stages`) and from a fifth of them (`few`)."""
    clients = res["config"]["clients"]
    rows = []
    for stage, v in stages.items():
        w = few["stages_ms"].get(stage, {"p50": 0.0, "p99": 0.0})
        rows.append(
            f"| {stage} | {v['p50']:.1f} | {v['p99']:.1f} | {w['p50']:.1f} | {w['p99']:.1f} |"
        )
    return [
        "",
        f"## Latency by stage at 50% of max: {clients} clients vs {few.get('clients')}",
        "",
        "(from sampled result traces; same event rate, different number of streams)",
        "",
        f"| stage | p50 ms ({clients} clients) | p99 ms | p50 ms ({few.get('clients')} clients) | p99 ms |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "The Kafka hops (the two middle steps) depend little on the number of clients; the two"
        " gRPC legs (client send -> pod, pod deliver -> client) do. Instrumented once (not part"
        " of this run): the pod writes a result within ~1 ms (p50) of the deliver step, and the"
        " time is spent in the client process before grpclib hands the message over, i.e. in"
        " trio-asyncio, which runs one asyncio callback per trio scheduling round: with 50"
        " streams in one process a 10 ms asyncio timer woke 94 ms late at p50 (1.5 s at worst)"
        " while a trio timer in the same process was 3 ms late. Running all ready asyncio"
        " callbacks per round halved these legs but made the clients write their messages one"
        " by one instead of coalesced, and raised Nimbus's CPU per event by 40-90% (alternating"
        " A/B runs): not kept.",
        *_kafka_floor_lines(res.get("limits", {})),
    ]


def _kafka_floor_lines(lim: dict[str, Any]) -> list[str]:
    """The floor under the latency target: Nimbus's two Kafka hops alone, paced."""
    path = lim.get("kafka_path_paced", {})
    if not path.get("latency_ms"):
        return []
    secs = path.get("seconds") or 1
    by = {k: v / secs for k, v in (path.get("cpu_s_by_process") or {}).items()}
    lat, h1, h2 = path["latency_ms"], path.get("hop1_ms", {}), path.get("hop2_ms", {})
    return [
        "",
        "The floor under the latency target: Nimbus's two Kafka hops alone -- a kafka-python"
        " producer (a pod's place; it wakes every"
        f" {path.get('tick_ms', 1):g} ms and sends what is due) -> a relay that consumes and"
        " re-produces each record (the event consumer's place) -> a sink that consumes them"
        " (the result router's place), each in a process of its own, no Nimbus logic, paced"
        f" at {path.get('paced_rate', 0):,.0f} records/s -- measured p50 {lat['p50']:.1f} /"
        f" p99 {lat['p99']:.1f} / p99.9 {lat.get('p999', 0):.1f} ms end to end (first hop"
        f" p99 {h1.get('p99', 0):.1f}, second {h2.get('p99', 0):.1f}) in this run. Its three"
        f" processes used {sum(by.values()):.2f} CPUs ("
        + ", ".join(f"{k} {v:.2f}" for k, v in by.items())
        + f"), {path.get('cpu_us_per_msg', 0):,.0f} µs per record (at full speed one hop"
        f" costs {lim.get('kafka_python_rtt', {}).get('cpu_us_per_msg', 0):,.0f} µs): at"
        " this rate the Kafka client alone takes most of the machine's two CPUs, so"
        " p99 <= 20 ms end to end is below what this stack gives here before any pod, Redis"
        " or gRPC work. Paced traffic costs several times the CPU per record of batched"
        " traffic in the client library (a poll or a produce request costs ~2 ms of CPU"
        " however few records it carries), which is why the paced runs saturate the two"
        " CPUs.",
    ]


def _replay_bound_lines(res: dict[str, Any]) -> list[str]:
    """What bounds one client's replay: the window (with a 5x window run), the machine's CPUs,
    the replay chain with no Nimbus logic; 100 clients at once."""
    lim, rp = res.get("limits", {}), res.get("replay", {})
    ncpu = res["machine"]["cpus"] or 2
    one, x5 = rp.get("one"), rp.get("one_window_x5")
    chain_lines = chain_comparison(one, lim.get("replay_chain"), ncpu)
    if not (one and x5 and one.get("results_per_s") and x5.get("results_per_s")):
        return ["", "## What bounds one client's replay", "", *chain_lines] if chain_lines else []
    lines = _window_lines(one, x5, lim)
    if one.get("all_cpu_us_per_result"):
        lines += _drain_cpu_lines(one, ncpu)
    lines += chain_lines
    many = rp.get("many") or {}
    if many.get("all_cpu_us_per_result"):
        lines += _many_lines(many, one, ncpu, bool(res["config"].get("status_process")))
    return lines


def _window_lines(one: dict[str, Any], x5: dict[str, Any], lim: dict[str, Any]) -> list[str]:
    """One client's replay at the default window and at 5x: is the window the bound?"""
    rtt1 = one["replay_window"] / one["results_per_s"]
    rtt5 = x5["replay_window"] / x5["results_per_s"]
    return [
        "",
        "## What bounds one client's replay",
        "",
        f"- window {one['replay_window']:,}: {one['results_per_s']:,.0f} results/s; window"
        f" {x5['replay_window']:,}: {x5['results_per_s']:,.0f} results/s"
        f" ({x5['results_per_s'] / one['results_per_s']:.1f}x for a 5x window).",
        (
            "- So this run's replay was window-bound: rate = window / round trip"
            " (publish -> pod -> client -> ack -> pod report -> replay worker), the round trip"
            f" {rtt1:.2f} s at the default window and {rtt5:.2f} s at 5x."
            if x5["results_per_s"] >= 3 * one["results_per_s"]
            else "- So the window bounds it"
            + (" only in part" if x5["results_per_s"] >= 1.2 * one["results_per_s"] else " no more")
            + f" (a 5x window gave {x5['results_per_s'] / one['results_per_s']:.1f}x), and the stream itself does not:"
            " a grpclib echo on one stream under trio, no Nimbus logic, moved"
            f" {lim.get('grpc_echo_1stream', {}).get('rate', 0):,.0f} messages/s each way; the replay"
            f" reached {ratio(one['results_per_s'], lim.get('grpc_echo_1stream', {}).get('rate'))} of it."
            " The rest is per-result work on the replay path: the drain client (one trio"
            " process: decode, dedupe, ack; profiled below as `client`), the pod's delivery"
            " checks, acks and reports, the replay's fetch -> publish -> report loop, and the"
            " CPU they could get on the machine."
        ),
        f"- Kafka's own consume rate in this run: {lim.get('kafka_perf_consume', {}).get('rate', 0):,.0f}"
        f" records/s. Process utilisation during the 1-client drain: {one.get('process_utilisation')}"
        " (the drain client runs inside the bench process).",
    ]


def _drain_cpu_lines(one: dict[str, Any], ncpu: int) -> list[str]:
    """The whole machine's CPUs during the 1-client drain, and the ceiling they set."""
    used = (
        sum(one["process_utilisation"].values())
        + one["client_utilisation"]
        + sum(one["broker_utilisation"].values())
    )
    ceiling = ncpu / one["all_cpu_us_per_result"] * 1e6
    return [
        f"- The whole machine during the 1-client drain: Nimbus {sum(one['process_utilisation'].values()):.2f}"
        f" + the draining client {one['client_utilisation']:.2f} + brokers"
        f" {one['broker_utilisation']} = {used:.2f} of {ncpu} CPUs; all of it together"
        f" {one['all_cpu_us_per_result']:.0f} µs of CPU per result (Nimbus alone"
        f" {one['cpu_us_per_result']:.0f}). At that cost {ncpu} CPUs carry at most"
        f" {ceiling:,.0f} results/s with nothing else running: 20,000/s needs the whole"
        f" path below {ncpu / 20_000 * 1e6:.0f} µs per result.",
    ]


def _many_lines(
    many: dict[str, Any], one: dict[str, Any], ncpu: int, status_process: bool
) -> list[str]:
    """100 clients at once: CPUs used, LIVE after the last ack."""
    nim = sum(many["process_utilisation"].values())
    used = nim + many["client_utilisation"] + sum(many["broker_utilisation"].values())
    return [
        f"- 100 clients at once: Nimbus {nim:.2f} CPUs (per process {many['process_utilisation']})"
        f" + the 100 draining clients {many['client_utilisation']:.2f} + brokers"
        f" {many['broker_utilisation']} = {used:.2f} of {ncpu} CPUs, {many['all_cpu_us_per_result']:.0f}"
        f" µs of CPU per result in all. LIVE after the last ack: p50"
        f" {many['live_after_last_ack_ms']['p50']} ms / max {many['live_after_last_ack_ms']['max']} ms"
        f" (one client: {one['live_after_last_ack_ms']['p50']} ms)."
        + (
            " The status manager ran in a process of its own. Inside the worker, beside 100"
            " replays (`--status-in-worker`; quick runs, 100 x 1,000), the flips waited"
            " behind the replays' work: p50 0.2-0.7 s, max 2.6-8.5 s, and a third to a half of"
            " the clients were flipped by the 1 s periodic check because the worker read the"
            " flip requests late (a flip's Redis call, instrumented once: p50 16 ms, p90"
            " 105 ms, max 1 s in the loaded worker)."
            if status_process
            else " The status manager ran inside the worker, beside the replays: its flip"
            " requests and Redis round trips wait behind their work (a flip's Redis call,"
            " instrumented once: p50 16 ms, p90 105 ms, max 1 s in the loaded worker); in a"
            " process of its own (the default) quick runs gave p50 14 ms / max 357 ms."
        ),
    ]


def _p25_profile_lines(lv: dict[str, Any]) -> list[str]:
    """The busiest process's profile at 25% of max (self and total time)."""
    p25 = lv.get("p25", {})
    if not p25.get("profiles"):
        return []
    busiest = max(p25.get("process_utilisation", {"-": 0}).items(), key=lambda kv: kv[1])[0]
    p = p25["profiles"].get(busiest)
    if not p:
        return []
    lines = [
        "",
        f"## Profile at 25% of max ({busiest}, the busiest process then; {p['samples']} samples)",
        "",
        "| % self | function | | % total | function |",
        "|---|---|---|---|---|",
    ]
    tot = [t for t in p["total"] if "nimbus/" in t[0] or "kafka/" in t[0] or "redis/" in t[0]]
    for i in range(12):
        a = p["self"][i] if i < len(p["self"]) else ("", "")
        b = tot[i] if i < len(tot) else ("", "")
        lines.append(f"| {a[1]} | `{a[0]}` | | {b[1]} | `{b[0]}` |")
    return lines


def _profile_lines(prof: dict[str, Any]) -> list[str]:
    """The saturation run's profiles: the hottest process and the load client."""
    if not prof.get("profiles"):
        return []
    lines = [
        "",
        "## Profile (py-spy, saturation run)",
        "",
        f"CPU utilisation per process during the profile: {prof.get('utilisation')}.",
        "",
    ]
    for name in [prof.get("hottest"), "load_client"]:
        p = prof["profiles"].get(name)
        if not p:
            continue
        lines += [
            f"### {name} ({p['samples']} samples): top functions by self time",
            "",
            "| % | function |",
            "|---|---|",
        ]
        lines += [f"| {c} | `{f}` |" for f, c in p["self"][:12]]
        lines += [""]
    return lines


CHANGES = [  # the bench's own record of what changed its figures
    "",
    "## Changes measured with this benchmark (before -> after, same machine)",
    "",
    "- Client library on upb instead of betterproto for the stream (nimbus/client.py): the"
    " load generator spent ~70% of its CPU in betterproto; max live rate with 50 clients"
    " (quick run) 115 -> 1,551 events/s, Nimbus CPU per event 6,326 -> 450 µs (the pipeline"
    " had been starved by its client, so its per-batch costs were paid per event).",
    "- crc32c installed (kafka-python's record-batch CRC): 16 KB batch 5.6 ms in the"
    " pure-Python fallback -> 1.1 µs.",
    "- Redis engine on a blocking connection pool: 1,000 streams connecting at once went from"
    " 637 accepted in 122 s (the rest failing with MaxConnectionsError) to 1,000 in 3.7-6 s.",
    "- Tried and not kept: group consumers with fetch_min_bytes 16 KB / fetch_max_wait 10 ms"
    " (to batch fetches at trickle rates): the idle worker went from 0.03 to 0.21 CPU and the"
    " paced runs' CPU per event did not fall.",
    "- 2026-11-27 (quick runs and scripts/load_client.py against 2 pods + 1 worker process,"
    " 50 clients, max rate; machine shared with another agent's benchmark): event consumer"
    " pipelined (a poll no longer waits for its produce and a synchronous commit; offsets are"
    " committed with a later poll) -- it had been the stage bounding the live rate, 2.2 s p50"
    " of queueing before the compute step; several gRPC messages per HTTP/2 write on both"
    " sides; the Kafka partition passed to send() (37 -> 19 µs per record); trace timestamps"
    " set directly. Together: 2,000-2,700 -> 5,000-5,400 events/s, Nimbus CPU 460 -> 221 µs"
    " per event, load client 229 -> 116 µs per event.",
    "- 2026-11-27: the client library applies every response its stream reader handed over in"
    " one go instead of one trio scheduling round each: one client's replay drain 4,665 ->"
    " 11,909 results/s (quick run, 30,000 results); the bench process (the drain client) had"
    " been ~90% busy.",
    "- 2026-11-27 (quick replay phase, 60,000 results; 100 clients x 600): the replays of a"
    " worker share one Kafka reader per DLQ partition and a cache of what it fetched, share"
    " their waits at a partition's end, batch their cursor writes and read their clients'"
    " records in one round trip every 200 ms. Before, 100 replays meant 100 KafkaConsumers"
    " (each with a network thread), each reading its whole partition (about 12x the records"
    " for 100 clients on 8 partitions), a begin-offsets request every 100 ms each while"
    " waiting at their ends, and ~1,000 Redis calls/s. 100 clients at once: 2,054 ->"
    " 3,800-6,700 results/s, Nimbus CPU 500 -> 180-280 µs per result, LIVE after the last ack"
    " p50 311 -> 50-280 ms (noisy). Tried and not kept (alternating A/B runs, no clear"
    " effect on the flip): running up to 64 ready asyncio callbacks per trio round in the"
    " worker process, and a 0.5 ms GIL switch interval there.",
    "- 2026-11-27 (fifth session; microbenchmarks and alternating quick runs, the machine"
    " noisy): small produce batches appended on the trio thread once the topic's metadata is"
    " known, other blocking calls through trio.lowlevel.start_thread_soon (a thread wake-up"
    " costs ~100 µs of CPU on this VM; one-record batches 1,324-1,659 -> 935-1,328 µs of"
    " process CPU each); deliveries composed on the wire with one trace step per batch"
    " (router/replay ~11 -> ~6 µs per delivery, pod ~10 -> ~7); lock-free metrics on the hot"
    " paths (~4 -> ~2 µs per delivered result); the client library takes every response"
    " already received at once (drain client 33-40 -> 26-38 µs per result); the client's"
    " receive() takes a queued result without a trio scheduling round (~8 µs each here:"
    " drain client 29-36 -> 19-23 µs per result); Nimbus processes run up to 64 ready asyncio"
    " callbacks per trio round (100 clients' replay 5,775-7,189 -> 8,681-9,008 results/s)."
    " Full runs: one-client replay 10,883-11,560 -> 14,811-15,948 results/s, the whole"
    " machine 142 -> 104-112 µs per result; 100 clients 4,126 -> 8,888 results/s; the"
    " replay_chain limit shows the stack itself moves 25,000-34,000/s.",
    "- 2026-11-27 (sixth session; an in-process replay microbenchmark and alternating quick"
    " runs, 60,000 results): the DLQ packs a client's results, up to NIMBUS_DLQ_PACK (256)"
    " per record, and the replay sends runs of up to 500 results as one delivery, one token"
    " and one report (the worker's replay work in process 34.5 -> 24.3 -> 8.8 µs per result);"
    " one client 18,273 -> 19,706-19,756 results/s, the whole machine 88 -> 68 µs per result."
    " The client library cuts every response already received from its stream's buffer at"
    " once instead of two grpclib Buffer.read calls each (~7-8 -> ~3.7-3.9 µs per message):"
    " one client 19,706-19,756 -> 23,690-27,055 results/s, 68 -> 53-58 µs per result; 100"
    " clients 11,106-12,731 -> 12,587-17,504. The event consumer packs a client's results of a"
    " poll batch into one results-topic record too (NIMBUS_RESULTS_PACK; the router commits"
    " past a packed record once all its results are resolved): live max 4,715 / 6,627 ->"
    " 6,981 / 7,894 events/s, Nimbus CPU 260 / 204 -> 192 / 174 µs per event (two"
    " alternating pairs of quick runs).",
    "- 2026-11-27 (seventh session): the latency floor is measured as Nimbus runs its Kafka"
    " hops -- producer, relay and sink each in a process of its own (`kafka-path`). The"
    " earlier floor ran producer and consumer of one hop in one process and gave p99 74-219"
    " ms; one hop with producer and consumer in two processes gave p99 15-30 ms at 4,000"
    " records/s (three runs), so that figure was not the hop's own bound. The two-hop path at"
    " 4,000 records/s, standalone: p99 183 ms with a send per wake-up, 96 ms waking every"
    " 1 ms, 78 ms every 5 ms, its three processes using ~1.4-1.5 CPUs.",
    "- 2026-12-06 (issue 15; one run each unless said, scripts/fleet.py + the Go load"
    " generator or scripts/load_client.py): the librdkafka adapter with Nagle off and no"
    " linger: 1 client at 200/s p50 14.2 -> 6.5 ms, p99 39 -> 27 ms (Python client). Its"
    " waits on a pipe librdkafka writes instead of a thread per waiting poll: context"
    " switches per event at 1,000/s 12.2 -> 4.1 in the worker, 2.6 -> 1.3 per pod; CPU about"
    " the same (worker 0.48 -> 0.43). Redis script calls pipelined on one connection (the"
    " lane): per call 213 -> 157 µs of CPU alone, 118 -> 27 µs with 20 callers at once"
    " (scripts/bench_calls.py). Tried and not kept: `NIMBUS_KAFKA_FETCH_WAIT_MS=2` (fewer,"
    " larger fetches): the two Kafka hops alone fell from 416 to 227 µs of CPU per record at"
    " 1,000/s, but Nimbus's CPU per event did not fall and one client's p50 rose 5.1 -> 9.8 ms"
    " (two runs); `gc.freeze()` at start: GC pauses were small (gen0 p50 0.1-0.3 ms, a rare"
    " gen1 of 25 ms), latency unchanged.",
]


SINGLE_JSON = ROOT / "docs" / "benchmarks.json"
CLUSTER_JSON = ROOT / "docs" / "benchmarks-cluster.json"  # bench.py --cluster writes it

SCALE_OUT = """### How each role scales out

- **Pods** (gRPC streams): a pod holds its clients' streams, produces their events and reads its
  own pod channel. More pods carry more connections and more gRPC work (the gRPC side alone is
  the `grpc-pod` limit above); they share nothing but Kafka and Redis, so they add up until those
  do. A client moves between pods freely (its record names its pod and epoch).
- **Worker processes** (event consumer, result router, replay, status): each role is a Kafka
  consumer group, so one partition is read by one process at a time; processes add throughput up
  to one per partition per role, and beyond that sit idle (standby for a rebalance).
- **Partitions**: the unit of order and of parallelism. A client's events and results stay in
  one partition each, in order; more partitions let more worker processes work at once, at the
  cost of more consumer and producer state per process.
- **Redis masters**: a batch of transitions is split by master and run in parallel, one script
  per master; more masters spread the scripts' CPU (Redis runs one core per node), but a batch of
  N clients now costs one call per master it touches instead of one, and each write waits for a
  replica (WAIT). The scans (the replay and status `replaying` scan, the client lists) read the
  per-slot sets of all 16,384 slots.
- **Kafka brokers**: replicated topics (RF 3, acks=all, min ISR 2) cost every produce a
  follower's fetch before the acknowledgement: the `kafka_path` limit on the cluster shows it.
- **The next bound** on this 2-CPU machine is the CPU: the 3 JVMs and 6 redis-servers of the
  clusters compete with the Nimbus processes for the same 2 cores, so the clustered figures here
  are lower than the single node's; on separate machines each broker gets its own. One Python
  process per role is single-threaded: past one core per process the way up is more processes
  (and partitions), not bigger ones."""


def _cluster_lines(res: dict[str, Any]) -> list[str]:
    """The clustered run (bench.py --cluster, CLUSTER_JSON) beside this run's realtime figures."""
    try:
        cl = json.loads(CLUSTER_JSON.read_text())
    except (OSError, ValueError):
        return []
    single = (res.get("realtime") or {}).get("adapters") or {}
    clustered = (cl.get("realtime") or {}).get("adapters") or {}

    def cell(r: dict[str, Any] | None) -> str:
        if not r:
            return "-"
        lat = r.get("latency_ms") or {}
        return (
            f"{r.get('rate_achieved', 0):,.0f}/s, {_num(lat.get('p50'))} / {_num(lat.get('p99'))} ms,"
            f" {_num(r.get('nimbus_cpu_us_per_event'), '{:,.0f}')} µs, lost {r.get('lost', '-')}"
        )

    lines = [
        "## On the clusters: 3 Kafka brokers and a Redis Cluster (issue 17)",
        "",
        f"`bench.py --cluster --phases realtime`, {cl.get('started', '?')} UTC, this machine: the"
        " same fleet (2 pods, a worker process, the status manager) and load generator as the"
        " realtime phase above, on `scripts/cluster.sh`'s clusters: 3 KRaft brokers (topics RF 3,"
        " min.insync.replicas 2, acks=all) and a Redis Cluster of 3 masters + 3 replicas"
        " (NIMBUS_REDIS_MODE=cluster, WAIT for 1 replica). All on the same 2 CPUs. Each cell:"
        " events/s, latency p50 / p99, Nimbus CPU per event, lost. Raw: `docs/benchmarks-cluster.json`.",
        "",
        "| adapter | scenario | single node (run above) | clusters |",
        "|---|---|---|---|",
    ]
    for adapter, c in clustered.items():
        s_runs = (single.get(adapter) or {}).get("runs") or {}
        for label, r in (c.get("runs") or {}).items():
            lines.append(f"| {adapter} | {label} | {cell(s_runs.get(label))} | {cell(r)} |")
        skp = ((single.get(adapter) or {}).get("kafka_path_1000") or {}).get("latency_ms") or {}
        ckp = (c.get("kafka_path_1000") or {}).get("latency_ms") or {}
        lines.append(
            f"| {adapter} | limit: the two Kafka hops alone, 1,000/s | p50 {_num(skp.get('p50'))}"
            f" / p99 {_num(skp.get('p99'))} ms | p50 {_num(ckp.get('p50'))} / p99 {_num(ckp.get('p99'))} ms |"
        )
    lines += [
        "",
        "Read each adapter's rows against its limit row: on the clusters the two Kafka hops alone"
        " (RF 3, acks=all, min ISR 2, three JVMs and six redis-servers on the same 2 CPUs as"
        " everything else) already take a large part of the end-to-end latency, and each state"
        " write also waits for a Redis replica (WAIT). These are not the figures of a cluster of"
        " machines: they show what the cluster protocols cost when every node shares 2 cores.",
    ]
    return [*lines, "", SCALE_OUT, ""]


def _num(v: Any, fmt: str = "{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(res: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md from a run's results (as its JSON holds them)."""
    lv = res.get("live", {})
    lines = _head_lines(res, _summary_rows(res))
    lines += _cluster_lines(res)
    lines += _limits_lines(res.get("limits", {}))
    lines += _bound_lines(res.get("analysis", {}), lv.get("max", {}))
    lines += _live_cpu_lines(lv)
    lines += _stage_lines(res)
    lines += _replay_bound_lines(res)
    lines += _p25_profile_lines(lv)
    lines += _profile_lines(res.get("profile", {}))
    lines += [
        *CHANGES,
        "",
        "## Raw",
        "",
        f"Everything above, and per-run details, is in `{res['json_path']}`.",
        "",
    ]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


async def services_up(args: argparse.Namespace) -> None:
    env = ports_env(args)
    say("brokers: scripts/services.sh up")
    with trio.fail_after(600):
        p = await trio.run_process(
            ["bash", "scripts/services.sh", "up"],
            cwd=ROOT,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if p.returncode != 0:
        lines = [line for line in p.stderr.decode(errors="replace").splitlines() if line.strip()]
        raise BrokersUnavailable(
            f"bash scripts/services.sh up failed (exit {p.returncode}): "
            f"{lines[-1] if lines else 'no message'}; run it yourself to see why"
        )


class BrokersUnavailable(Exception):
    """Kafka or Redis cannot be started or reached: the run cannot begin."""


async def check_brokers(args: argparse.Namespace) -> None:
    """BrokersUnavailable unless something listens on the Kafka and Redis ports."""
    for what, port, flag in (
        ("Kafka", args.kafka_port, "--kafka-port / NIMBUS_KAFKA_PORT"),
        ("Redis", args.redis_port, "--redis-port / NIMBUS_REDIS_PORT"),
    ):
        try:
            with trio.fail_after(5):
                stream = await trio.open_tcp_stream(HOST, port)
        except (OSError, trio.TooSlowError):
            hint = "drop --no-services-up" if args.no_services_up else "check " + flag
            raise BrokersUnavailable(
                f"{what} is not reachable on {HOST}:{port}: start it (bash scripts/services.sh "
                f"up) or {hint}"
            ) from None
        await stream.aclose()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    run_dir = ROOT / "artifacts" / f"bench-{args.prefix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    kafka, redis = f"{HOST}:{args.kafka_port}", f"{HOST}:{args.redis_port}"
    if args.cluster:
        global CLUSTER
        from fleet import cluster_addresses

        CLUSTER = True
        kafka, redis = cluster_addresses()
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "quick": args.quick,
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "json_path": str(Path(args.json).resolve().relative_to(ROOT))
        if Path(args.json).resolve().is_relative_to(ROOT)
        else args.json,
        "targets": TARGETS,
        "sizes": {},
    }
    say(f"machine: {res['machine']}")
    if args.cluster:
        say(f"brokers: the local clusters, Kafka {kafka}, Redis Cluster {redis}")
    else:
        if not args.no_services_up:
            await services_up(args)
        await check_brokers(args)
    phases = set(args.phases.split(","))
    if "realtime" in phases:  # fleets of its own, one per Kafka adapter, before the others
        import bench_realtime

        res["realtime"] = await bench_realtime.realtime(args, kafka, redis, run_dir)
    fleet = BenchFleet(args, run_dir, kafka, redis)
    try:
        async with trio_asyncio.open_loop():
            say(
                f"fleet: 2 pods + {len(fleet.workers)} worker(s), topics {fleet.rid}-*, logs in {run_dir}"
            )
            if phases - {"realtime", "limits"}:
                await fleet.start()
            if "live" in phases:
                res["live"] = await live(args, fleet, run_dir)
            sizes = (
                await trio.to_thread.run_sync(message_sizes, kafka, fleet.rid)
                if phases - {"realtime", "limits"}
                else {}
            )
            res["sizes"] = {
                "event": sizes.get("events") or 120,
                "result": sizes.get("results") or 200,
                "pod": sizes.get("results") or 200,
            }
            if "profile" in phases:
                rate = res.get("live", {}).get("max", {}).get("throughput_results_per_s", 500)
                res["profile"] = await profile(args, fleet, run_dir, rate)
            if "replay" in phases:
                res["replay"] = await replay(args, fleet, kafka, redis, run_dir)
            if "conns" in phases:
                res["conns"] = await conns(args, fleet)
            fleet.stop()
            if "limits" in phases:
                paced = res.get("live", {}).get("p50", {}).get("target_rate") or 1000
                res["limits"] = await limits(args, kafka, redis, res["sizes"], paced)
    finally:
        fleet.stop()
    res["machine"]["loadavg_end"] = loadavg()
    res["duration_s"] = time.time() - started
    res["analysis"] = analysis(res)
    return res


PHASES = ("realtime", "live", "profile", "replay", "conns", "limits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    p.add_argument(
        "--render-only", metavar="JSON", help="only rewrite the markdown (--out) from a run's JSON"
    )
    p.add_argument(
        "--phases",
        default="realtime,live,profile,replay,conns,limits",
        help="comma list (default: all)",
    )
    p.add_argument(
        "--adapters",
        default="kafka-python,librdkafka",
        help="Kafka adapters the realtime phase runs on, in this order (comma list)",
    )
    p.add_argument(
        "--rt-seconds",
        type=float,
        default=0,
        help="length of each realtime run (default 20; quick 8)",
    )
    add_port_options(p, controller=True)
    p.add_argument(
        "--no-services-up",
        action="store_true",
        help="use running brokers, do not call services.sh up",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="the realtime phase on the local clusters (bash scripts/cluster.sh up first):"
        " 3 Kafka brokers (topics RF 3, min ISR 2) and a Redis Cluster (NIMBUS_REDIS_MODE=cluster)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (all roles each)")
    p.add_argument(
        "--split-roles",
        action="store_true",
        help="run each worker's event consumer in a process of its own (eventsN), beside the"
        " result router and replay consumer (workerN)",
    )
    p.add_argument(
        "--status-in-worker",
        dest="status_process",
        action="store_false",
        help="run the status manager inside the worker process(es) instead of in a process of its"
        " own (with 100 replays in the worker, its flips wait behind them: LIVE after the last ack"
        " p50 0.2-0.7 s, max 2.6-8.5 s in quick runs, vs 14 ms / 357 ms on its own)",
    )
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--events", type=int, default=0, help="events per client in the max-rate run")
    p.add_argument(
        "--paced-seconds", type=float, default=0, help="length of each paced latency run"
    )
    p.add_argument(
        "--replay-backlog", type=int, default=0, help="results in the one-client backlog"
    )
    p.add_argument("--streams", type=int, default=0, help="idle streams in the connections phase")
    p.add_argument("--limit-count", type=int, default=0, help="messages per limit probe")
    p.add_argument("--profile-seconds", type=int, default=0)
    p.add_argument(
        "--replay-ack-every",
        type=int,
        default=100,
        help="the replaying clients' ack_every (library default 100)",
    )
    p.add_argument(
        "--idle-seconds", type=float, default=5, help="idle CPU sample before the live runs"
    )
    p.add_argument(
        "--linger-ms", type=int, default=os.environ.get("NIMBUS_PRODUCER_LINGER_MS") or "2"
    )
    p.add_argument("--load-timeout", type=float, default=300)
    p.add_argument("--prefix", default=f"bench-{secrets.token_hex(3)}")
    p.add_argument(
        "--json", default=None, help="default docs/benchmarks.json (--cluster: CLUSTER_JSON)"
    )
    p.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    a = p.parse_args(argv)
    a.json = a.json or str(CLUSTER_JSON if a.cluster else SINGLE_JSON)
    if a.cluster and a.phases != "realtime":
        p.error("--cluster runs the realtime phase only: add --phases realtime")
    bad = [ph for ph in a.phases.split(",") if ph not in PHASES]
    if bad or not a.phases:
        p.error(
            f"--phases: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(PHASES)}"
        )
    check_ports(p, a)
    for name in ("workers", "partitions", "clients", "replay_ack_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in (
        "events",
        "paced_seconds",
        "replay_backlog",
        "streams",
        "limit_count",
        "profile_seconds",
        "idle_seconds",
        "linger_ms",
    ):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if not a.load_timeout > 0:
        p.error("--load-timeout must be > 0")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", a.prefix):
        # it names topics (Kafka's characters), client ids and the Redis namespace
        p.error(f"--prefix may hold only letters, digits, '.', '_', '-', got {a.prefix!r}")
    if a.render_only and not Path(a.render_only).is_file():
        p.error(f"--render-only {a.render_only}: no such file (a run's JSON)")
    for flag, path in (("--json", a.json), ("--out", a.out)):
        folder = Path(path).resolve().parent
        if a.render_only and flag == "--json":
            continue
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            p.error(f"{flag} {path}: {folder} is not a writable folder")
    bad = [x for x in a.adapters.split(",") if x not in ("kafka-python", "librdkafka")]
    if bad or not a.adapters:
        p.error(
            f"--adapters: unknown {', '.join(bad) or 'empty list'}; choose from kafka-python, librdkafka"
        )
    if a.rt_seconds < 0:
        p.error("--rt-seconds must be >= 0")
    q = a.quick
    a.rt_seconds = a.rt_seconds or (8 if q else 20)
    a.events = a.events or (100 if q else 1000)
    a.paced_seconds = a.paced_seconds or (8 if q else 20)
    a.replay_backlog = a.replay_backlog or (10_000 if q else 100_000)
    a.streams = a.streams or (1_000 if q else 10_000)
    a.limit_count = a.limit_count or (10_000 if q else 50_000)
    a.profile_seconds = a.profile_seconds or (8 if q else 15)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.render_only:
        try:
            res = json.loads(Path(args.render_only).read_text())
        except (OSError, ValueError) as e:
            print(
                f"bench.py: --render-only {args.render_only}: not a run's JSON: {e}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        res["analysis"] = analysis(res)
    else:
        try:
            res = trio.run(main_async, args)
        except BrokersUnavailable as e:
            print(f"bench.py: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except KeyboardInterrupt:
            print("bench.py: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        if args.cluster:  # BENCHMARKS.md stays the single node's run, with this one beside it
            try:
                res = json.loads(SINGLE_JSON.read_text())
            except (OSError, ValueError) as e:
                print(f"bench.py: no single-node run to compare with ({e})", file=sys.stderr)
                return 0
            res["analysis"] = analysis(res)
    md = render(res)
    Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
