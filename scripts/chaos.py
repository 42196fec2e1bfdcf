"""Chaos harness for Nimbus: the delivery contract, checked while everything around it breaks.

Runs a real deployment on the local Kafka and Redis (scripts/services.sh; started if they are not
running): `--pods` doorman pods (`python -m nimbus.server`) and `--workers` worker processes
(`python -m nimbus.workers`), on fresh topics, with short delivery/status timeouts. `--clients`
protocol-2 clients (nimbus.client, one trio process) each send `sq` 1, 2, 3, ... at `--rate`
events/s and check every result. Meanwhile a seeded schedule (`--seed`) of faults is played:

    switch       a client drops its stream and reconnects to another pod    (client.switch)
    cut          a client's stream is cut right after a send, mid-write      (client.disconnect)
    pod_kill     a pod is SIGKILLed, restarted after a short delay
    worker_kill  a worker process is SIGKILLed, restarted after a short delay
    redis_cut    every Redis client connection of one type is cut   (CLIENT KILL TYPE normal|pubsub)
    kafka_kill   the Kafka broker is SIGKILLed, restarted (scripts/kafka.sh kill9, start)
    redis_kill   redis-server is SIGKILLed, restarted (scripts/redis.sh kill9, start; AOF)

Rates are per minute over the whole run (Poisson); the broker kills are counts (`--kafka-kills`,
`--redis-kills`) placed in separate slots of the first two thirds of the run. A pod or worker is
killed only if another one of its kind is up. A process that exits on its own (e.g. it cannot
reach Kafka while the broker is down) is restarted with a backoff and reported as a crash.

After `--duration` seconds the chaos stops and the settle phase begins: the clients stop sending,
Kafka, Redis and every process are brought up, every client reconnects, and the harness waits
(at most `--settle-timeout` s from the end of the chaos) until every event is receipted (or
answered: a result that comes before its receipt settles the event) and every receipted event's
result has reached the application.

The checker, per client and in total (the delivery contract of ../shared/DESIGN.md):

    lost             a receipted delivery id whose result never reached the application.
                     "in the middle" (a later id arrived: a definite violation, like Jepsen's
                     queue checker) or "at the tail" (nothing later arrived before the timeout)
    out of order     delivery ids not strictly increasing, or a number whose first result came
                     after a higher number's first result. Exempt (reported as "reordered by
                     resend"): events refused with UNAVAILABLE, or receipted on a later stream
                     than the one they were sent on: both are receipted after later events, and
                     the contract orders results by receipt
    app duplicates   a result the application was handed twice (same delivery id, or the same
                     number twice): must be 0, the library dedupes
    resend dups      second results of events whose receipt was lost and which the library
                     resent, so the server accepted them twice; the library drops them by seq
                     (stats.resend_duplicates_dropped): allowed. Their receipted delivery id is
                     not "lost" when the number's first result was handed over
    wire dups        redeliveries the library dropped (stats.duplicates_dropped): allowed
    unexpected       a result for a number never sent, a wrong value, an error, or a delivery id
                     whose receipt named another number
    not settled      events still unreceipted at the end (nothing was lost, but the system did
                     not recover within the settle timeout)

Also reported: the reconnect gap (the library's Disconnected -> Connected) and the harness's own
loop lag: a CPU-starved harness (the client library decodes with betterproto) inflates every
timing it reports and delays receipts, which makes resends and their duplicates more likely.

Time to LIVE: the harness subscribes to the status manager's flips (`nimbus:flips`:
"client_id, last_ack_ns, flip_ns") and reports the flip's delay after the application took the
last result of its backlog ("LIVE after last backlog result": client clock, includes the
library's ack delay and the whole ack path; target p99 <= 100 ms), after the ack that completed
the backlog reached the pod ("LIVE after last ack"), and after the client's reconnect as the
harness saw it (the library's Connected notice).

Exit status: 0 if nothing was lost, reordered, shown twice or unexpected and every client
settled; 1 otherwise; 2 usage/set-up error; 130 interrupted. Process logs, the fault timeline and
the harness log go to the run folder (`--run-dir`, default artifacts/chaos-<timestamp>/);
`--json PATH` writes the summary. Every child process is stopped on exit (Ctrl-C included);
Kafka and Redis are left running. Traffic goes to 127.0.0.1 only.

    python scripts/chaos.py --clients 50 --rate 1 --duration 300 --kafka-kills 2 --redis-kills 2 \\
        --seed 7 --json artifacts/chaos.json

Cluster mode (`--cluster`, issue 17): the deployment runs on the local clusters of
scripts/cluster.sh (3 KRaft Kafka nodes, RF 3 / min ISR 2; a Redis Cluster of 3 masters + 3
replicas; started if they are not running, left running), with the environment `cluster.sh env`
prints (NIMBUS_KAFKA_BROKERS, NIMBUS_REDIS_MODE=cluster, NIMBUS_REDIS_ADDRESS). Which clusters:
the NIMBUS_LOCAL_DIR / NIMBUS_CLUSTER_*_PORT variables cluster.sh reads. Besides switches, cuts,
pod and worker kills and Redis connection cuts (on every Redis node), it plays

    broker_kill  the Kafka node leading one of the run's partitions is SIGKILLed; once its
                 partitions have new leaders and 1-3 s more, it is restarted   (--broker-kills)
    master_kill  a Redis Cluster master is SIGKILLed; once its replica is promoted and 1-3 s
                 more, it is restarted and rejoins as a replica                (--master-kills)

in separate slots, like the single-node broker kills (which it does not play). At most one Kafka
node and one Redis node are down at a time: a kill waits until the previous one on its cluster is
over (the node back in sync) and that cluster is whole, or is skipped if that has not happened by
the end of the chaos. The report lists every kill (node, time,
failover, restart and back-in-sync seconds) and their min / median / max: see
scripts/chaos_cluster.py for what is measured. Defaults there: 3 pods, 2 workers, 2 broker kills,
1 master kill. `--redis-single HOST:PORT` keeps Redis on one plain node instead (not managed by
the harness: no master kills), to play the Kafka faults alone:

    python scripts/chaos.py --cluster --redis-single 127.0.0.1:36379 --duration 120 --seed 7

Each run has its own topics, Redis namespace (NIMBUS_REDIS_PREFIX) and client ids (`--prefix`).
Environment: NIMBUS_KAFKA_PORT / NIMBUS_REDIS_PORT (or --kafka-port / --redis-port) and
NIMBUS_LOCAL_DIR select which local brokers scripts/services.sh manages, as for those scripts.
Killing the brokers disturbs anything else using them: on a shared machine, point the harness at
a private pair (e.g. NIMBUS_LOCAL_DIR=/tmp/chaos-brokers NIMBUS_KAFKA_PORT=39192
NIMBUS_KAFKA_CONTROLLER_PORT=39193 NIMBUS_REDIS_PORT=36479).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
import trio_asyncio
from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/chaos.py` from anywhere
    sys.path.insert(0, str(ROOT))
if str(ROOT / "scripts") not in sys.path:  # procs.py, shared.py, also when loaded by path
    sys.path.append(str(ROOT / "scripts"))

import procs  # noqa: E402
from chaos_cluster import ClusterBrokers, parse_env  # noqa: E402
from procs import Proc, nimbus_env, pod, run_logged, wall, worker  # noqa: E402
from shared import HOST, add_port_options, check_ports, percentile, ports_env, wait_until  # noqa: E402
from shared import watch_flips as watch_flip_payloads  # noqa: E402

from nimbus.client import (  # noqa: E402
    Connected,
    Disconnected,
    Gap,
    NimbusClient,
    NimbusError,
    Notice,
    Receipted,
    Refused,
    Result,
    open_client,
)
from nimbus.engines.redis import open_redis_state  # noqa: E402
from nimbus.engines.redis_cluster import open_redis_cluster_state  # noqa: E402
from nimbus.entry import ArgumentParser  # noqa: E402
from nimbus.ports import EngineError  # noqa: E402
from nimbus.wire.pod_channel import FLIPS, parse_flip  # noqa: E402

SCRIPTS = ROOT / "scripts"
CLIENT_ACTIONS = ("switch", "cut")
PROC_ACTIONS = ("pod_kill", "worker_kill")
CLUSTER_KILLS = ("broker_kill", "master_kill")
WORKER_READY = "status manager up"  # the last role run_workers starts


def dist(values: list[float]) -> dict[str, float | int]:
    v = sorted(values)
    return {
        "count": len(v),
        "p50": round(percentile(v, 0.50), 3),
        "p99": round(percentile(v, 0.99), 3),
        "max": round(v[-1], 3) if v else 0.0,
    }


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The run: timeline, counters
# ---------------------------------------------------------------------------------------------


class Run:
    """What the whole harness shares: the clock, the fault timeline, counters, the run folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir: Path = args.run_dir
        self.t0 = trio.current_time()
        self.timeline: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.phase = "start"
        self.lag: dict[str, list[float]] = {"trio": [], "asyncio": []}
        self._timeline_file = (self.dir / "timeline.log").open("a", buffering=1)

    def elapsed(self) -> float:
        return trio.current_time() - self.t0

    def event(self, what: str, *, show: bool = True, **info: Any) -> None:
        entry = {"t": round(self.elapsed(), 3), "wall": wall(), "event": what, **info}
        self.timeline.append(entry)
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        line = f"[{entry['t']:8.2f}s {entry['wall']}] {what}{' ' + extra if extra else ''}"
        self._timeline_file.write(line + "\n")
        if show:
            print(line, file=sys.stderr, flush=True)

    def around(self, t: float, span: float) -> list[dict[str, Any]]:
        return [e for e in self.timeline if abs(e["t"] - t) <= span]

    def close(self) -> None:
        self._timeline_file.close()


# ---------------------------------------------------------------------------------------------
# Child processes (pods, workers) and the brokers (through scripts/*.sh)
# ---------------------------------------------------------------------------------------------


class Fleet(procs.Fleet):
    """The pods and workers, kept up by `supervise` (killed by us: restarted after a delay;
    crashed: with a backoff), every start, crash and readiness on the run's timeline."""

    def __init__(self, run: Run, members: list[Proc]) -> None:
        super().__init__(members)
        self.run = run

    def on_start(self, p: Proc) -> None:
        self.run.event("start", show=p.starts > 1, proc=p.name, pid=p.pid, n=p.starts)

    def on_exit(self, p: Proc, rc: int, uptime: float, was_ready: bool) -> None:
        # Exiting before it was up (e.g. Kafka down at start) is a start failure; exiting
        # after is a crash.
        crash: dict[str, Any] = {
            "t": round(self.run.elapsed(), 3),
            "wall": wall(),
            "what": "crash" if was_ready else "start_failure",
            "rc": rc,
            "uptime_s": round(uptime, 1),
            "log_tail": p.log_tail(6),
        }
        p.crashes.append(crash)
        self.run.counts["crashes" if was_ready else "start_failures"] += 1
        last = crash["log_tail"][-1] if crash["log_tail"] else ""
        self.run.event(
            "CRASHED" if was_ready else "failed to start",
            proc=p.name,
            rc=rc,
            uptime=f"{uptime:.1f}s",
            last=repr(last[:200]),
        )

    def on_ready(self, p: Proc) -> None:
        if p.starts > 1:
            self.run.event("ready", show=False, proc=p.name)


class Brokers:
    """Kafka and Redis through scripts/kafka.sh, redis.sh, services.sh (same env as the user's)."""

    def __init__(self, run: Run, env: dict[str, str], kafka_port: int, redis_port: int) -> None:
        self.run = run
        self.env = env
        self.kafka_port = kafka_port
        self.redis_port = redis_port
        self.log = run.dir / "services.log"
        self.kafka_down = False
        self.redis_down = False
        self.busy = 0  # kill-and-restart sequences in progress

    def status(self) -> str:
        return f"kafka {'DOWN' if self.kafka_down else 'up'} redis {'DOWN' if self.redis_down else 'up'}"

    def report(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        pass

    async def script(self, *argv: str, timeout: float = 240) -> int:
        cmd = ["bash", str(SCRIPTS / argv[0]), *argv[1:]]
        return await run_logged(self.log, cmd, self.env, " ".join(argv), timeout)

    async def ensure_up(self, timeout: float = 240) -> bool:
        if await self.script("services.sh", "status", timeout=30) == 0:
            return True
        self.run.event("services.sh up")
        ok = await self.script("services.sh", "up", timeout=timeout) == 0
        if ok:
            self.kafka_down = self.redis_down = False
        return ok

    async def cut_redis_connections(self, kind: str) -> str:
        with trio.move_on_after(10):
            proc = await trio.run_process(
                [
                    "redis-cli",
                    "-h",
                    HOST,
                    "-p",
                    str(self.redis_port),
                    "CLIENT",
                    "KILL",
                    "TYPE",
                    kind,
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            return (proc.stdout or proc.stderr).decode(errors="replace").strip()
        return "timeout"

    async def kill_and_restart(self, which: str, down_for: float) -> None:
        """kill9, wait `down_for` s, start (retried): `which` is "kafka" or "redis"."""
        self.busy += 1
        try:
            await self._kill_and_restart(which, down_for)
        finally:
            self.busy -= 1

    async def _kill_and_restart(self, which: str, down_for: float) -> None:
        script, port = (
            ("kafka.sh", self.kafka_port) if which == "kafka" else ("redis.sh", self.redis_port)
        )
        if not port_open(port):
            self.run.event(f"{which}_kill skipped: not up", port=port)
            self.run.counts[f"{which}_kill_skipped"] += 1
            return
        self.run.event(f"{which} kill9")
        setattr(self, f"{which}_down", True)
        await self.script(script, "kill9", timeout=60)
        if port_open(port):
            # Not the broker scripts/*.sh manages (other NIMBUS_LOCAL_DIR?): say so loudly.
            self.run.event(
                f"{which} kill9 FAILED: port {port} still open (not managed by scripts/{script}?)"
            )
            self.run.counts[f"{which}_kill_failed"] += 1
            setattr(self, f"{which}_down", False)
            return
        self.run.counts[f"{which}_kills"] += 1
        await trio.sleep(down_for)
        t = trio.current_time()
        for attempt in range(1, 6):
            rc = await self.script(script, "start", timeout=240)
            if rc == 0:
                break
            self.run.event(f"{which} start failed", rc=rc, attempt=attempt)
            await trio.sleep(2)
        setattr(self, f"{which}_down", False)
        self.run.event(f"{which} up", took=f"{trio.current_time() - t:.1f}s")


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


@dataclass
class Got:
    """One result as the application received it."""

    delivery_id: int
    number: int
    result: int
    seq: int | None
    error: str | None
    t: float  # elapsed s
    wall_ns: int = 0  # wall clock when the application took it (vs. the status manager's flips)


@dataclass(eq=False)
class ClientRun:
    index: int
    client_id: str
    targets: list[str]
    client: NimbusClient | None = None
    next_number: int = 1  # numbers 1 .. next_number-1 were sent
    receipts: dict[int, int] = field(default_factory=dict)  # delivery id -> number
    receipt_t: dict[int, float] = field(default_factory=dict)  # delivery id -> elapsed s
    results: list[Got] = field(default_factory=list)
    delivered: set[int] = field(default_factory=set)  # delivery ids handed to the app
    outstanding: set[int] = field(default_factory=set)  # receipted, no result yet
    highest: int = 0  # highest delivery id handed to the app
    retried: set[int] = field(default_factory=set)  # numbers refused with UNAVAILABLE
    # Streams are numbered (generation: Connected notices so far). An event receipted on a later
    # stream than the one it was sent on was resent: it may land after later events.
    generation: int = 0
    sent_gen: dict[int, int] = field(default_factory=dict)  # number -> stream it went out on
    resent: set[int] = field(default_factory=set)  # numbers receipted on a later stream
    refused: set[int] = field(default_factory=set)  # numbers refused for good
    reconnect_ns: list[int] = field(default_factory=list)  # wall ns of Connected(reconnect)
    # (connect ns, read ns, status) of the client's record read right after each reconnect:
    # tells a reconnect that needs a replay (REPLAYING) from one that is LIVE at once.
    record_checks: list[tuple[int, int, str]] = field(default_factory=list)
    down_since: float | None = None  # elapsed s of the last Disconnected, until Connected
    reconnect_gaps: list[float] = field(default_factory=list)  # s from Disconnected to Connected
    history: list[str] = field(default_factory=list)  # connects/disconnects, for evidence
    gaps: int = 0
    cut_after_send: bool = False
    failure: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    pending_at_end: int = 0
    end_t: float = 0.0  # elapsed s when the client was closed
    done: trio.Event = field(default_factory=trio.Event)

    def settled(self) -> bool:
        """Nothing left to wait for: connected, all receipted, every receipted result here
        (ids below the highest delivered can no longer come: those are counted as lost)."""
        c = self.client
        if self.failure is not None:
            return True
        if c is None or not c.connected or c.pending:
            return False
        return all(d < self.highest for d in self.outstanding)


class Clients:
    def __init__(self, run: Run, runs: list[ClientRun]) -> None:
        self.run = run
        self.runs = runs
        self.stop_sending = trio.Event()
        self.close = trio.Event()
        self.record_checks, self._record_checks_recv = trio.open_memory_channel[
            tuple[ClientRun, int]
        ](10_000)

    async def check_records(self, redis_address: str, redis_mode: str, namespace: str) -> None:
        """Read each reconnected client's record (REPLAYING or LIVE?) as soon as possible."""
        recv = self._record_checks_recv
        while True:
            try:
                async with open_state(redis_address, redis_mode, namespace) as state:
                    while True:
                        r, connect_ns = await recv.receive()
                        rec = await state.get(r.client_id)
                        status = rec.status.value if rec is not None else "NONE"
                        r.record_checks.append((connect_ns, time.time_ns(), status))
            except (EngineError, OSError) as e:
                logger.debug("record checker: {}", e)
            await trio.sleep(0.5)

    def totals(self) -> tuple[int, int, int]:
        sent = sum(r.next_number - 1 for r in self.runs)
        rcpt = sum(len(r.receipts) for r in self.runs)
        res = sum(len(r.results) for r in self.runs)
        return sent, rcpt, res

    def reconnects(self) -> int:
        return sum(
            r.client.stats.reconnects if r.client else r.stats.get("reconnects", 0)
            for r in self.runs
        )

    def _on_notice(self, r: ClientRun, n: Notice) -> None:
        """Client `r`'s on_event: its receipts, refusals, (re)connections and gaps."""
        elapsed = self.run.elapsed
        if isinstance(n, Receipted):
            if r.sent_gen.get(n.number, r.generation) != r.generation:
                r.resent.add(n.number)
            r.receipts[n.delivery_id] = n.number
            r.receipt_t[n.delivery_id] = elapsed()
            if n.delivery_id not in r.delivered:
                r.outstanding.add(n.delivery_id)
        elif isinstance(n, Refused):
            (r.retried if n.will_retry else r.refused).add(n.number)
        elif isinstance(n, Connected):
            r.generation += 1
            if n.reconnect:
                r.reconnect_ns.append(now_ns := time.time_ns())
                try:
                    self.record_checks.send_nowait((r, now_ns))
                except trio.WouldBlock:
                    pass  # the checker is far behind: this reconnect goes unclassified
            if r.down_since is not None:
                r.reconnect_gaps.append(elapsed() - r.down_since)
                r.down_since = None
            r.history.append(f"{elapsed():.2f}s {wall()} connected to {n.target}")
            logger.debug("{} connected to {}", r.client_id, n.target)
        elif isinstance(n, Disconnected):
            r.down_since = elapsed()
            r.history.append(f"{elapsed():.2f}s {wall()} disconnected from {n.target}: {n.reason}")
            logger.debug("{} disconnected from {}: {}", r.client_id, n.target, n.reason)
        elif isinstance(n, Gap):
            r.gaps += 1

    def _client_failed(self, r: ClientRun, exc: Exception) -> None:
        """Client `r` ended with `exc`: its failure, with the traceback if it is no NimbusError."""
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, NimbusError):
            r.failure = f"{type(leaf).__name__}: {leaf}"
        else:  # a bug (in the library or below it): keep the traceback
            r.failure = f"client crashed: {type(leaf).__name__}: {leaf}"
            where = traceback.format_exception(leaf)
            r.history.append("".join(where[-6:]))
            logger.opt(exception=exc).error("client {} crashed", r.client_id)
        self.run.event("client FAILED", client=r.client_id, why=r.failure)

    async def run_client(self, r: ClientRun, rng: random.Random) -> None:
        args = self.run.args
        elapsed = self.run.elapsed

        async def receive(c: NimbusClient) -> None:
            async for res in c.results():
                did = res.delivery_id
                r.results.append(
                    Got(
                        did,
                        res.number,
                        res.result,
                        res.seq,
                        _error_text(res),
                        elapsed(),
                        time.time_ns(),
                    )
                )
                r.delivered.add(did)
                r.outstanding.discard(did)
                r.highest = max(r.highest, did)

        async def send(c: NimbusClient) -> None:
            interval = 1.0 / args.rate
            next_at = trio.current_time() + rng.uniform(0, interval)
            while not self.stop_sending.is_set():
                with trio.move_on_at(next_at):
                    await self.stop_sending.wait()
                if self.stop_sending.is_set():
                    return
                next_at += interval
                # Sent while no stream is up, an event goes out on the next one.
                r.sent_gen[r.next_number] = r.generation + (0 if c.connected else 1)
                # max_pending is far above what a run leaves unreceipted: send() never waits.
                await c.send("sq", r.next_number)
                r.next_number += 1
                if r.cut_after_send:
                    r.cut_after_send = False
                    await c.disconnect()
                    self.run.counts["cuts_done"] += 1

        try:
            async with open_client(
                r.targets,
                r.client_id,
                protocol=2,
                on_event=lambda n: self._on_notice(r, n),
                connect_timeout=None,
                backoff=(0.05, 1.0),
                max_pending=100_000,
                result_buffer=10_000,
            ) as c:
                r.client = c
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive, c)
                    await send(c)
                    await self.close.wait()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            self._client_failed(r, exc)
        finally:
            r.end_t = self.run.elapsed()
            if r.client is not None:
                r.stats = r.client.stats.as_dict()
                r.pending_at_end = r.client.pending
            r.done.set()


def _error_text(res: Result) -> str | None:
    if res.error is None:
        return None
    return f"{res.error.code.name}: {res.error.message}"


# ---------------------------------------------------------------------------------------------
# Flips (time to LIVE)


@dataclass
class Flip:
    client_id: str
    last_ack_ns: int
    flip_ns: int


def redis_prefix(args: argparse.Namespace) -> str:
    return f"{args.prefix}:"


def open_state(address: str, mode: str, namespace: str) -> AbstractAsyncContextManager[Any]:
    """The harness's own view of the run's Redis state: one node, or the Redis Cluster (`mode`
    "cluster": `address` is the seed nodes), as the Nimbus processes see it."""
    if mode == "cluster":
        return open_redis_cluster_state(address, prefix=namespace)
    return open_redis_state(address, prefix=namespace)


async def watch_flips(
    run: Run, redis_address: str, redis_mode: str, prefix: str, flips: list[Flip]
) -> None:
    """Subscribe to the status manager's flips; resubscribe whenever Redis goes away (on the
    Redis Cluster also when the channel's master fails over: sharded pub/sub)."""
    namespace = redis_prefix(run.args)

    def on_flip(cid: str, last_ack_ns: int, flip_ns: int) -> None:
        if cid.startswith(prefix):
            flips.append(Flip(cid, last_ack_ns, flip_ns))

    async def on_cluster() -> None:
        async with open_state(redis_address, "cluster", namespace) as state:
            async with state.subscribe(FLIPS) as sub:
                async for payload in sub:
                    on_flip(*parse_flip(payload))

    while True:
        try:
            if redis_mode == "cluster":
                await on_cluster()
            else:
                await watch_flip_payloads(redis_address, namespace, on_flip)
        except (EngineError, OSError, ValueError) as e:
            run.counts["flip_watch_resubscribes"] += 1
            logger.debug("flip watcher: {}", e)
        await trio.sleep(0.5)


async def probe_lag(run: Run) -> None:
    """How far behind the harness's own loops are (trio timers, the asyncio loop the client
    library runs on). A harness that lags (CPU starved) distorts every timing it reports."""
    while True:
        t = trio.current_time()
        await trio.sleep(0.5)
        run.lag["trio"].append(max(0.0, trio.current_time() - t - 0.5))
        t = trio.current_time()
        await trio_asyncio.aio_as_trio(asyncio.sleep)(0)
        run.lag["asyncio"].append(trio.current_time() - t)


# ---------------------------------------------------------------------------------------------
# The fault schedule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    at: float  # seconds after the chaos started
    kind: str
    target: int = 0
    arg: float = 0.0  # restart delay / down time
    variant: str = ""


def make_schedule(args: argparse.Namespace) -> list[Action]:
    """The whole fault plan, from the seed alone (one random stream per kind of fault)."""
    out: list[Action] = []
    d = args.duration
    rates = {
        "switch": (args.switch_rate, args.clients),
        "cut": (args.cut_rate, args.clients),
        "pod_kill": (args.pod_kill_rate, args.pods),
        "worker_kill": (args.worker_kill_rate, args.workers),
        "redis_cut": (args.redis_cut_rate, 1),
    }
    lo, hi = args.restart_delay
    for kind, (per_min, targets) in rates.items():
        if per_min <= 0:
            continue
        rng = random.Random(f"{args.seed}:{kind}")
        t = 0.0
        for i in range(100_000):
            t += rng.expovariate(per_min / 60.0)
            if t >= d - 2:
                break
            target, delay = rng.randrange(targets), round(rng.uniform(lo, hi), 3)
            # Redis cuts alternate between the two connection types.
            variant = ("normal", "pubsub")[i % 2] if kind == "redis_cut" else ""
            out.append(Action(round(t, 3), kind, target, delay, variant))
    # Broker kills: one per slot of [0.1 d, 0.66 d], slots shuffled between Kafka and Redis
    # (cluster mode: between broker and master kills, each with a target drawn for it).
    kinds = (
        ["kafka_kill"] * args.kafka_kills
        + ["redis_kill"] * args.redis_kills
        + ["broker_kill"] * args.broker_kills
        + ["master_kill"] * args.master_kills
    )
    if kinds:
        rng = random.Random(f"{args.seed}:brokers")
        rng.shuffle(kinds)
        start, span = 0.1 * d, 0.56 * d / len(kinds)
        for i, kind in enumerate(kinds):
            at = start + i * span + rng.uniform(0, span / 2)
            delay = round(rng.uniform(1.0, 3.0), 3)
            target = rng.randrange(1_000_000) if kind in CLUSTER_KILLS else 0
            out.append(Action(round(at, 3), kind, target, delay))
    out.sort(key=lambda a: a.at)
    return out


async def play(
    run: Run,
    schedule: list[Action],
    fleet: Fleet,
    brokers: Brokers | ClusterBrokers,
    clients: Clients,
    nursery: trio.Nursery,
    chaos_end: float,
) -> None:
    """Play the schedule. Actions that take time (switches, broker restarts) run in `nursery`,
    which outlives the chaos window: a broker kill near the end still restarts the broker. A
    cluster node kill waiting for its turn is skipped if the turn has not come by `chaos_end`."""
    started = trio.current_time()
    for a in schedule:
        await trio.sleep_until(started + a.at)
        c = run.counts
        if a.kind == "switch":
            r = clients.runs[a.target]
            cl = r.client
            if cl is None or r.failure:
                c["switch_skipped"] += 1
                continue
            elsewhere = [t for t in r.targets if t != cl.target]
            nursery.start_soon(
                cl.switch, elsewhere[a.target % len(elsewhere)] if elsewhere else cl.target
            )
            c["switches"] += 1
        elif a.kind == "cut":
            clients.runs[a.target].cut_after_send = True
            c["cuts"] += 1
        elif a.kind in PROC_ACTIONS:
            kind = "pod" if a.kind == "pod_kill" else "worker"
            group = fleet.pods if kind == "pod" else fleet.workers
            proc = group[a.target]
            peers = [q for q in fleet.up(kind) if q is not proc]
            if not proc.alive or not peers:
                c[f"{a.kind}_skipped"] += 1
                continue
            fleet.kill(proc, a.arg)
            c[f"{kind}_kills"] += 1
            run.event(
                "SIGKILL",
                proc=proc.name,
                pid=proc.popen.pid if proc.popen else 0,
                restart_in=f"{a.arg:.1f}s",
            )
        elif a.kind == "redis_cut":
            if brokers.redis_down:
                c["redis_cut_skipped"] += 1
                continue
            out = await brokers.cut_redis_connections(a.variant)
            c[f"redis_cuts_{a.variant}"] += 1
            run.event("redis CLIENT KILL", type=a.variant, killed=out)
        elif a.kind in ("kafka_kill", "redis_kill"):
            assert isinstance(brokers, Brokers)
            nursery.start_soon(brokers.kill_and_restart, a.kind.removesuffix("_kill"), a.arg)
        elif a.kind in CLUSTER_KILLS:
            assert isinstance(brokers, ClusterBrokers)
            kill = brokers.broker_kill if a.kind == "broker_kill" else brokers.master_kill
            nursery.start_soon(kill, a.target, a.arg, chaos_end)


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------


@dataclass
class Walk:
    """The results a client's application was handed, in order: the first result of each number
    and whatever broke the contract on the way."""

    first: dict[int, Got] = field(default_factory=dict)  # number -> first result
    out_of_order: list[dict[str, Any]] = field(default_factory=list)  # by number
    id_order: list[tuple[int, int]] = field(default_factory=list)  # (id before, id after)
    app_dups: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    reordered_by_resend: int = 0


def _why_unexpected(r: ClientRun, g: Got, sent: int) -> str | None:
    if not 1 <= g.number <= sent:
        return "number never sent"
    if g.error is not None:
        return f"error {g.error}"
    if g.result != g.number * g.number:
        return f"wrong result {g.result}"
    if g.delivery_id in r.receipts and r.receipts[g.delivery_id] != g.number:
        return f"receipt for this delivery id named {r.receipts[g.delivery_id]}"
    return None


def walk_results(r: ClientRun, sent: int) -> Walk:
    w = Walk()
    seen_ids: set[int] = set()
    top_number = 0
    prev_id = 0
    for g in r.results:
        if g.delivery_id <= prev_id:
            w.id_order.append((prev_id, g.delivery_id))
        prev_id = max(prev_id, g.delivery_id)
        if g.delivery_id in seen_ids:
            w.app_dups.append(
                {"delivery_id": g.delivery_id, "number": g.number, "why": "same delivery id twice"}
            )
            continue
        seen_ids.add(g.delivery_id)
        why = _why_unexpected(r, g, sent)
        if why:
            w.unexpected.append({"delivery_id": g.delivery_id, "number": g.number, "why": why})
        if g.number in w.first:
            w.app_dups.append(
                {
                    "delivery_id": g.delivery_id,
                    "number": g.number,
                    "first_delivery_id": w.first[g.number].delivery_id,
                    "why": "same number twice",
                }
            )
            continue
        w.first[g.number] = g
        if g.number < top_number and (g.number in r.retried or g.number in r.resent):
            w.reordered_by_resend += 1  # refused or resent, so receipted after later events
        elif g.number < top_number:
            w.out_of_order.append(
                {"delivery_id": g.delivery_id, "number": g.number, "after_number": top_number}
            )
        top_number = max(top_number, g.number)
    return w


def check_client(r: ClientRun) -> dict[str, Any]:
    sent = r.next_number - 1
    w = walk_results(r, sent)
    # A receipted id the application never got is lost, unless it was the second acceptance of
    # a resent event whose first result it got (the library drops that one: see resend dups).
    lost = sorted(d for d in set(r.receipts) - r.delivered if r.receipts[d] not in w.first)
    highest = max(r.delivered, default=0)
    middle = [d for d in lost if d < highest]
    tail = [d for d in lost if d > highest]
    abandoned = 0
    if r.failure:  # the client stopped receiving: its tail is not the server's doing
        abandoned, tail = len(tail), []
        lost = middle
    # Never answered and never receipted (receipted ones are counted as lost above).
    receipted = set(r.receipts.values())
    unanswered = [
        n
        for n in range(1, sent + 1)
        if n not in w.first and n not in receipted and n not in r.refused
    ]
    st = r.stats
    return {
        "client_id": r.client_id,
        "sent": sent,
        "receipted": len(r.receipts),
        "results": len(r.results),
        "lost": len(lost),
        "lost_middle": len(middle),
        "lost_tail": len(tail),
        "abandoned_by_failed_client": abandoned,
        "lost_ids": [
            {
                "delivery_id": d,
                "number": r.receipts[d],
                "receipted_at_s": round(r.receipt_t.get(d, -1), 2),
            }
            for d in lost[:20]
        ],
        "out_of_order": len(w.out_of_order) + len(w.id_order),
        "out_of_order_examples": w.out_of_order[:10]
        + [{"delivery_id_after": a, "delivery_id": b} for a, b in w.id_order[:5]],
        "app_duplicates": len(w.app_dups),
        "app_duplicate_examples": w.app_dups[:10],
        "resend_duplicates": st.get("resend_duplicates_dropped", 0),
        "wire_duplicates": st.get("duplicates_dropped", 0),
        "unexpected": len(w.unexpected),
        "unexpected_examples": w.unexpected[:10],
        "unanswered": len(unanswered),
        "unanswered_numbers": unanswered[:20],
        "pending_at_end": r.pending_at_end,
        "retried": len(r.retried),
        "reordered_by_resend": w.reordered_by_resend,
        "refused": len(r.refused),
        "reconnects": st.get("reconnects", 0),
        "resent": st.get("resent", 0),
        "skipped_by_library": st.get("skipped", 0),
        "gaps": r.gaps,
        "failure": r.failure,
    }


def _after_reconnect(
    runs: list[ClientRun], by_client: dict[str, list[int]]
) -> tuple[list[float], int, int]:
    """LIVE after reconnect (ms), reconnects LIVE at once, reconnects left before LIVE. Only
    for reconnects that needed a replay (the record read right after the reconnect said
    REPLAYING, or a flip came before that read), the first flip after the reconnect and before
    the next one. A flip after a later divert on the same stream is not a reconnect's doing."""
    after_reconnect: list[float] = []
    direct_live = unflipped = 0
    for r in runs:
        fl = sorted(by_client.get(r.client_id, []))
        starts = r.reconnect_ns
        for connect_ns, read_ns, status in r.record_checks:
            i = bisect.bisect_right(starts, connect_ns)
            nxt = starts[i] if i < len(starts) else math.inf
            j = bisect.bisect_left(fl, connect_ns)
            flip = fl[j] if j < len(fl) and fl[j] < nxt else None
            if status == "REPLAYING" or (flip is not None and flip <= read_ns):
                if flip is None:
                    unflipped += 1  # reconnected again (or the run ended) before LIVE
                else:
                    after_reconnect.append((flip - connect_ns) / 1e6)
            elif status == "LIVE":
                direct_live += 1
    return after_reconnect, direct_live, unflipped


def _after_last_result(
    runs: list[ClientRun], by_client: dict[str, list[int]]
) -> list[tuple[float, str, int]]:
    """(ms, client id, flip ns): LIVE after the application took the last result of its backlog
    (the client side of "within 100 ms of acking its backlog"; the library acks at most
    ack_interval later). Per flip, the last result this client took before it, if that came
    after the client's previous flip and reconnect (else the flip needed no backlog delivery
    and is not counted here)."""
    out: list[tuple[float, str, int]] = []
    runs_by_id = {r.client_id: r for r in runs}
    for cid, fl in by_client.items():
        r = runs_by_id.get(cid)
        if r is None:
            continue
        taken = sorted(g.wall_ns for g in r.results if g.wall_ns)
        fl = sorted(fl)
        for k, flip in enumerate(fl):
            i = bisect.bisect_right(taken, flip)
            if i == 0:
                continue
            last = taken[i - 1]
            j = bisect.bisect_right(r.reconnect_ns, flip)
            since = max(fl[k - 1] if k else 0, r.reconnect_ns[j - 1] if j else 0)
            if last > since:
                out.append(((flip - last) / 1e6, cid, flip))
    return out


def live_stats(runs: list[ClientRun], flips: list[Flip]) -> dict[str, Any]:
    after_ack = [(f.flip_ns - f.last_ack_ns) / 1e6 for f in flips if f.last_ack_ns > 0]
    by_client: dict[str, list[int]] = {}
    for f in flips:
        by_client.setdefault(f.client_id, []).append(f.flip_ns)
    after_reconnect, direct_live, unflipped = _after_reconnect(runs, by_client)
    slow_take = _after_last_result(runs, by_client)
    after_take = [ms for ms, _, _ in slow_take]
    slow_take.sort(reverse=True)
    slowest = sorted((f for f in flips if f.last_ack_ns), key=lambda f: f.last_ack_ns - f.flip_ns)
    return {
        "flips": len(flips),
        "flips_without_ack_time": sum(1 for f in flips if not f.last_ack_ns),
        "after_last_result_ms": dist(after_take),
        "slowest_after_last_result": [
            {
                "client_id": cid,
                "ms": round(ms, 1),
                "flip_wall": datetime.fromtimestamp(flip / 1e9).strftime("%H:%M:%S.%f")[:-3],
            }
            for ms, cid, flip in slow_take[:10]
        ],
        "slowest_after_last_ack": [
            {
                "client_id": f.client_id,
                "ms": round((f.flip_ns - f.last_ack_ns) / 1e6, 1),
                "flip_wall": datetime.fromtimestamp(f.flip_ns / 1e9).strftime("%H:%M:%S.%f")[:-3],
            }
            for f in slowest[:10]
        ],
        "after_last_ack_ms": dist(after_ack),
        "after_reconnect_ms": dist(after_reconnect),
        "reconnects": sum(len(r.reconnect_ns) for r in runs),
        "reconnects_live_at_once": direct_live,
        "reconnects_replaying_not_flipped": unflipped,
        # Disconnected -> Connected as the library reports them (s); a client that never came
        # back counts until the end.
        "reconnect_gap_s": dist(
            [g for r in runs for g in r.reconnect_gaps]
            + [max(0.0, r.end_t - r.down_since) for r in runs if r.down_since is not None]
        ),
    }


def grep_logs(paths: list[Path], needle: str, limit: int = 60) -> list[str]:
    out: list[str] = []
    for p in paths:
        try:
            with p.open("rb") as f:
                for raw in f:
                    if needle.encode() in raw:
                        out.append(f"{p.name}: {raw.decode(errors='replace').rstrip()}")
        except OSError:
            continue
    return out[-limit:]


def evidence(run: Run, r: ClientRun, c: dict[str, Any], logs: list[Path]) -> dict[str, Any]:
    times = [x["receipted_at_s"] for x in c["lost_ids"] if x["receipted_at_s"] >= 0]
    faults: list[dict[str, Any]] = []
    for t in times[:3]:
        for e in run.around(t, 15):
            if e not in faults:
                faults.append(e)
    return {
        "client_id": r.client_id,
        "lost_ids": c["lost_ids"],
        "out_of_order": c["out_of_order_examples"],
        "app_duplicates": c["app_duplicate_examples"],
        "unexpected": c["unexpected_examples"],
        "unanswered_numbers": c["unanswered_numbers"],
        "failure": r.failure,
        "faults_within_15s_of_lost_receipts": faults[:40],
        "connections": r.history[-40:],
        "log_lines": grep_logs(logs, r.client_id),
    }


# Per-client counts summed into the totals (check_client's keys)
TOTALS = (
    "sent",
    "receipted",
    "results",
    "lost",
    "lost_middle",
    "lost_tail",
    "out_of_order",
    "app_duplicates",
    "resend_duplicates",
    "reordered_by_resend",
    "wire_duplicates",
    "unexpected",
    "unanswered",
    "pending_at_end",
    "retried",
    "refused",
    "reconnects",
    "resent",
    "skipped_by_library",
    "gaps",
)


def chaos_played(counts: Counter[str], schedule: list[Action]) -> dict[str, Any]:
    """The faults planned, and those played (from the run's counters)."""
    chaos: dict[str, Any] = {
        "planned": dict(Counter(a.kind for a in schedule)),
        "switches": counts["switches"],
        "cuts": counts["cuts_done"],
        "pod_kills": counts["pod_kills"],
        "worker_kills": counts["worker_kills"],
        "redis_cuts_normal": counts["redis_cuts_normal"],
        "redis_cuts_pubsub": counts["redis_cuts_pubsub"],
        "kafka_kills": counts["kafka_kills"],
        "redis_kills": counts["redis_kills"],
        "broker_kills": counts["broker_kills"],
        "master_kills": counts["master_kills"],
        "broker_kill_failures": counts["kafka_kill_failed"]
        + counts["redis_kill_failed"]
        + counts["broker_kill_failed"]
        + counts["master_kill_failed"],
        "failovers_not_seen": counts["broker_failover_not_seen"]
        + counts["master_failover_not_seen"],
        "skipped": {k: v for k, v in counts.items() if k.endswith("_skipped")},
        "process_crashes": counts["crashes"],
        "process_start_failures": counts["start_failures"],
    }
    chaos["kills"] = sum(
        chaos[k]
        for k in (
            "pod_kills",
            "worker_kills",
            "kafka_kills",
            "redis_kills",
            "broker_kills",
            "master_kills",
        )
    )
    return chaos


def run_config(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    return {
        "clients": args.clients,
        "rate_per_client": args.rate,
        "duration_s": args.duration,
        "settle_timeout_s": args.settle_timeout,
        "pods": args.pods,
        "workers": args.workers,
        "partitions": args.partitions,
        "delivery_timeout_ms": args.delivery_timeout_ms,
        "status_interval_ms": args.status_interval_ms,
        "rates_per_min": {
            "switch": args.switch_rate,
            "cut": args.cut_rate,
            "pod_kill": args.pod_kill_rate,
            "worker_kill": args.worker_kill_rate,
            "redis_cut": args.redis_cut_rate,
        },
        "kafka_kills": args.kafka_kills,
        "redis_kills": args.redis_kills,
        "cluster": args.cluster,
        "broker_kills": args.broker_kills,
        "master_kills": args.master_kills,
        "cluster_env": args.cluster_env,
        "redis_single": args.redis_single,
        "restart_delay_s": list(args.restart_delay),
        "kafka_port": args.kafka_port,
        "redis_port": args.redis_port,
        "run_dir": str(run_dir),
        "client_prefix": args.prefix,
    }


def summarize(
    run: Run,
    fleet: Fleet,
    clients: Clients,
    flips: list[Flip],
    settled: bool,
    settle_s: float,
    schedule: list[Action],
) -> dict[str, Any]:
    per_client = [check_client(r) for r in clients.runs]
    totals = {k: sum(int(c[k]) for c in per_client) for k in TOTALS}
    totals["failed_clients"] = sum(1 for c in per_client if c["failure"])
    procs = [
        {
            "name": p.name,
            "starts": p.starts,
            "kills": p.kills,
            "crashes": len(p.crashes),
            "crash_details": p.crashes[:10],
            "log": str(p.log),
        }
        for p in fleet.procs
    ]
    violations = (
        totals["lost"] + totals["out_of_order"] + totals["app_duplicates"] + totals["unexpected"]
    )
    ok = violations == 0 and totals["failed_clients"] == 0 and totals["unanswered"] == 0 and settled
    logs = [p.log for p in fleet.procs]
    bad = [
        evidence(run, r, c, logs)
        for r, c in zip(clients.runs, per_client, strict=True)
        if c["lost"]
        or c["out_of_order"]
        or c["app_duplicates"]
        or c["unexpected"]
        or c["failure"]
        or c["unanswered"]
    ]
    return {
        "ok": ok,
        "seed": run.args.seed,
        "config": run_config(run.args, run.dir),
        "totals": totals,
        "chaos": chaos_played(run.counts, schedule),
        "live": live_stats(clients.runs, flips),
        "harness_lag_s": {k: dist(v) for k, v in run.lag.items()},
        "settled": settled,
        "settle_s": round(settle_s, 1),
        "elapsed_s": round(run.elapsed(), 1),
        "processes": procs,
        "per_client": per_client,
        "violations": bad[:20],
    }


def _outcome_rows(t: dict[str, Any]) -> list[tuple[str, Any]]:
    """What the clients sent and got: the contract's counts first, then what is allowed."""
    return [
        ("events sent", t["sent"]),
        ("events receipted", t["receipted"]),
        ("results delivered (app)", t["results"]),
        (
            "LOST (receipted, no result)",
            f"{t['lost']}  (middle {t['lost_middle']}, tail {t['lost_tail']})",
        ),
        ("OUT OF ORDER", t["out_of_order"]),
        ("DUPLICATES seen by app", t["app_duplicates"]),
        ("UNEXPECTED results", t["unexpected"]),
        (
            "not settled (unanswered)",
            f"{t['unanswered']}  (unreceipted at end {t['pending_at_end']})",
        ),
        ("failed clients", t["failed_clients"]),
        ("resend duplicates (dropped, ok)", t["resend_duplicates"]),
        ("reordered by resend/retry (ok)", t["reordered_by_resend"]),
        ("duplicates on the wire (ok)", f"{t['wire_duplicates']}  (dropped by the library)"),
        (
            "events retried (UNAVAILABLE)",
            f"{t['retried']}  (resent after a lost receipt: {t['resent']})",
        ),
    ]


def _fault_rows(t: dict[str, Any], ch: dict[str, Any]) -> list[tuple[str, Any]]:
    """The faults played, and the processes' own exits."""
    return [
        (
            "client reconnects",
            f"{t['reconnects']}  (switches {ch['switches']}, cuts mid-write {ch['cuts']})",
        ),
        (
            "kills",
            f"{ch['kills']}  (pods {ch['pod_kills']}, workers {ch['worker_kills']},"
            + (
                f" kafka brokers {ch['broker_kills']}, redis masters {ch['master_kills']})"
                if "kill_log" in ch
                else f" kafka {ch['kafka_kills']}, redis {ch['redis_kills']})"
            ),
        ),
        (
            "redis connection cuts",
            f"normal {ch['redis_cuts_normal']}, pubsub {ch['redis_cuts_pubsub']}",
        ),
        (
            "process exits (restarted)",
            f"crashed {ch['process_crashes']}, failed to start {ch['process_start_failures']}",
        ),
    ]


def _timing_rows(s: dict[str, Any]) -> list[tuple[str, Any]]:
    """Time to LIVE, the reconnect gap, the harness's own lag, the settle phase."""
    lv = s["live"]
    ack, rec, gap = lv["after_last_ack_ms"], lv["after_reconnect_ms"], lv["reconnect_gap_s"]
    took = lv["after_last_result_ms"]
    hl = s["harness_lag_s"]["asyncio"]
    return [
        (
            "flips to LIVE seen",
            f"{lv['flips']}  ({lv['flips_without_ack_time']} without an ack time)",
        ),
        (
            "LIVE after last backlog result",
            f"p50 {took['p50']:.1f} / p99 {took['p99']:.1f} / max {took['max']:.1f} ms  (n={took['count']},"
            " app took it -> flip; target p99 <= 100)",
        ),
        (
            "LIVE after last ack",
            f"p50 {ack['p50']:.1f} / p99 {ack['p99']:.1f} / max {ack['max']:.1f} ms  (n={ack['count']},"
            " the ack reached the pod -> flip)",
        ),
        (
            "client reconnect gap",
            f"p50 {gap['p50']:.2f} / p99 {gap['p99']:.2f} / max {gap['max']:.2f} s  (n={gap['count']},"
            " Disconnected -> Connected)",
        ),
        (
            "LIVE after reconnect",
            f"p50 {rec['p50']:.1f} / p99 {rec['p99']:.1f} / max {rec['max']:.1f} ms  (n={rec['count']}"
            f" that needed a replay; {lv['reconnects_live_at_once']} LIVE at once,"
            f" {lv['reconnects_replaying_not_flipped']} left before LIVE)",
        ),
        (
            "harness loop lag (asyncio)",
            f"p50 {hl['p50']:.3f} / p99 {hl['p99']:.3f} / max {hl['max']:.3f} s"
            + ("  (the harness was starved: its timings are inflated)" if hl["p99"] > 0.5 else ""),
        ),
        ("settled", f"{s['settled']} in {s['settle_s']} s"),
        ("elapsed", f"{s['elapsed_s']} s"),
    ]


def _cluster_kill_lines(ch: dict[str, Any]) -> list[str]:
    """Cluster mode: each node kill (failover, restart, back in sync) and their spread."""
    if "kill_log" not in ch:
        return []
    lines = ["", "  cluster node kills (s after the kill / after the restart began):"]
    for k in ch["kill_log"]:
        lines.append(
            f"    {k['kind']:<11} {k['target']:<12} at {k['t']:7.1f}s ({k['wall']})"
            f"  failover {k['failover_s'] if k['failover_s'] is not None else 'NOT SEEN'}"
            f"  restart {k['restart_s']}  in sync {k['in_sync_s']}"
        )
    for kind in ("broker_kill", "master_kill"):
        st = ch[kind]
        if not st["failover_s"]["count"]:
            continue
        lines.append(
            f"    {kind} failover min/median/max: {st['failover_s']['min']} / "
            f"{st['failover_s']['median']} / {st['failover_s']['max']} s (n={st['failover_s']['count']})"
        )
    if ch["broker_kill_failures"] or ch["failovers_not_seen"] or ch["skipped"]:
        lines.append(
            f"    kill failures {ch['broker_kill_failures']}, failovers not seen"
            f" {ch['failovers_not_seen']}, skipped {ch['skipped']}"
        )
    return lines


def _client_lines(per_client: list[dict[str, Any]]) -> list[str]:
    """One line per client: its counts, and its failure if it failed."""
    lines = [
        f"  {'client':<28} {'sent':>6} {'rcpt':>6} {'res':>6} {'lost':>5} {'mid':>4} {'ooo':>4}"
        f" {'dupA':>4} {'dupR':>4} {'dupW':>5} {'unex':>4} {'rcon':>5}"
    ]
    for c in per_client:
        lines.append(
            f"  {c['client_id']:<28} {c['sent']:>6} {c['receipted']:>6} {c['results']:>6} {c['lost']:>5}"
            f" {c['lost_middle']:>4} {c['out_of_order']:>4} {c['app_duplicates']:>4}"
            f" {c['resend_duplicates']:>4} {c['wire_duplicates']:>5} {c['unexpected']:>4} {c['reconnects']:>5}"
            + (f"  FAILED: {c['failure']}" if c["failure"] else "")
        )
    return lines


def _violation_lines(violations: list[dict[str, Any]]) -> list[str]:
    """The evidence of the first 5 clients that broke the contract."""
    lines: list[str] = []
    for v in violations[:5]:
        lines.append("")
        lines.append(f"  violation at {v['client_id']}:")
        for key in (
            "lost_ids",
            "out_of_order",
            "app_duplicates",
            "unexpected",
            "unanswered_numbers",
            "failure",
        ):
            if v[key]:
                lines.append(f"    {key}: {json.dumps(v[key])[:600]}")
    return lines


def render(s: dict[str, Any]) -> str:
    t, cfg = s["totals"], s["config"]
    rows = [*_outcome_rows(t), *_fault_rows(t, s["chaos"]), *_timing_rows(s)]
    head = (
        f"Nimbus chaos: {cfg['clients']} clients x {cfg['rate_per_client']:g} ev/s, {cfg['pods']} pods,"
        f" {cfg['workers']} workers, {cfg['duration_s']:g} s chaos, seed {s['seed']}"
    )
    width = max(len(k) for k, _ in rows)
    lines = [head, "-" * len(head)]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += _cluster_kill_lines(s["chaos"])
    lines.append("")
    lines += _client_lines(s["per_client"])
    lines += _violation_lines(s["violations"])
    lines.append("")
    lines.append(f"  run folder: {cfg['run_dir']}")
    lines.append("RESULT: " + ("OK" if s["ok"] else "FAILED"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


async def progress(
    run: Run, fleet: Fleet, clients: Clients, brokers: Brokers | ClusterBrokers
) -> None:
    last = 0
    while True:
        await trio.sleep(run.args.progress)
        sent, rcpt, res = clients.totals()
        waiting = sum(len(r.outstanding) for r in clients.runs)
        connected = sum(1 for r in clients.runs if r.client is not None and r.client.connected)
        c = run.counts
        print(
            f"[{run.elapsed():7.1f}s {run.phase:>6}] sent {sent} rcpt {rcpt} res {res} (+{res - last})"
            f" awaiting {waiting} | clients up {connected}/{len(clients.runs)} reconnects {clients.reconnects()}"
            f" | pods {len(fleet.up('pod'))}/{len(fleet.pods)} workers {len(fleet.up('worker'))}/{len(fleet.workers)}"
            f" {brokers.status()}"
            f" | kills pod {c['pod_kills']} wrk {c['worker_kills']} kafka {c['kafka_kills']} redis {c['redis_kills']}"
            + (
                f" broker {c['broker_kills']} master {c['master_kills']}"
                if run.args.cluster
                else ""
            )
            + f" cuts {c['cuts_done']} sw {c['switches']} rcut {c['redis_cuts_normal'] + c['redis_cuts_pubsub']}"
            f" crashes {c['crashes']} (start failures {c['start_failures']})"
            f" | harness lag {max(run.lag['asyncio'][-10:], default=0):.2f}s",
            file=sys.stderr,
            flush=True,
        )
        last = res


def build_fleet(
    run: Run, args: argparse.Namespace, kafka: str, redis: str, redis_mode: str | None = None
) -> Fleet:
    base = {
        **nimbus_env(args.prefix, kafka, redis, args.partitions),
        "NIMBUS_SHUTDOWN_TIMEOUT_SEC": str(args.shutdown_timeout),
        "NIMBUS_DELIVERY_TIMEOUT_MS": str(args.delivery_timeout_ms),
        "NIMBUS_STATUS_INTERVAL_MS": str(args.status_interval_ms),
        "NIMBUS_LOG_LEVEL": args.log_level,
        "NIMBUS_LOG_FORMAT": "human",
        # A process that crashes (e.g. SIGSEGV in a C library) prints every thread's stack
        # into its log, so the crash can be traced afterwards.
        "PYTHONFAULTHANDLER": "1",
    }
    # NIMBUS_REDIS_MODE as cluster.sh env says (cluster), else the default (one Redis node).
    base.pop("NIMBUS_REDIS_MODE", None)
    if redis_mode:
        base["NIMBUS_REDIS_MODE"] = redis_mode
    # Killed with the harness, however it dies; each start marked in the log.
    options: dict[str, Any] = {"die_with_parent": True, "log_banner": "chaos"}
    return Fleet(
        run,
        [pod(base, args.prefix, i, run.dir, **options) for i in range(args.pods)]
        + [
            worker(f"worker{i}", base, run.dir, WORKER_READY, **options)
            for i in range(args.workers)
        ],
    )


@dataclass(eq=False)
class Harness:
    """One chaos run's parts, and how far it got."""

    run: Run
    brokers: Brokers | ClusterBrokers
    fleet: Fleet
    clients: Clients
    schedule: list[Action]
    redis: str
    redis_mode: str  # "single" | "cluster"
    flips: list[Flip] = field(default_factory=list)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # the whole run's
    interrupted: bool = False
    clients_started: bool = False
    settled: bool = False
    settle_s: float = 0.0


def set_up(args: argparse.Namespace) -> Harness:
    """The run, its brokers, processes, clients and fault schedule (schedule.json); none started."""
    run = Run(args)
    brokers: Brokers | ClusterBrokers
    if args.cluster:
        env = dict(os.environ)
        cl = args.cluster_env
        kafka, redis_mode = cl["NIMBUS_KAFKA_BROKERS"], cl.get("NIMBUS_REDIS_MODE")
        redis = args.redis_single or cl["NIMBUS_REDIS_ADDRESS"]
        if args.redis_single:
            redis_mode = None
        topics = [f"{args.prefix}-events", f"{args.prefix}-results"]
        brokers = ClusterBrokers(
            run,
            env,
            kafka.split(","),
            cl["NIMBUS_REDIS_ADDRESS"].split(","),
            args.redis_single,
            topics,
        )
    else:
        env = ports_env(args)
        brokers = Brokers(run, env, args.kafka_port, args.redis_port)
        kafka, redis = f"{HOST}:{args.kafka_port}", f"{HOST}:{args.redis_port}"
        redis_mode = None
    fleet = build_fleet(run, args, kafka, redis, redis_mode)
    pods = [f"{HOST}:{p.port}" for p in fleet.pods]
    runs = [
        ClientRun(i, f"{args.prefix}-c{i:03d}", pods[i % len(pods) :] + pods[: i % len(pods)])
        for i in range(args.clients)
    ]
    schedule = make_schedule(args)
    (run.dir / "schedule.json").write_text(json.dumps([a.__dict__ for a in schedule], indent=1))
    run.event(
        "run",
        seed=args.seed,
        prefix=args.prefix,
        kafka=kafka,
        redis=redis,
        redis_mode=redis_mode or "single",
        pods=",".join(pods),
        dir=str(run.dir),
        planned=dict(Counter(a.kind for a in schedule)),
    )
    return Harness(run, brokers, fleet, Clients(run, runs), schedule, redis, redis_mode or "single")


async def on_signals(h: Harness) -> None:
    """The first SIGINT/SIGTERM stops the run (cleanly); a second one exits at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
        async for sig in sigs:
            if not h.interrupted:
                h.interrupted = True
                h.run.event(f"{signal.Signals(sig).name}: stopping (again to exit at once)")
                h.scope.cancel()
            else:
                h.fleet.kill_now()
                os._exit(130)


async def settle(h: Harness, faults: trio.Nursery) -> None:
    """Brokers and processes up, then every client settled (within --settle-timeout)."""
    args, runs = h.run.args, h.clients.runs
    t = trio.current_time()
    with trio.move_on_after(args.settle_timeout):
        await wait_until(lambda: not h.brokers.busy)  # a broker restart in progress
        await h.brokers.ensure_up()
        await h.fleet.wait_ready(args.settle_timeout)
        await wait_until(lambda: all(r.settled() for r in runs), 0.25)
        h.settled = True
    faults.cancel_scope.cancel()
    h.settle_s = trio.current_time() - t


async def run_clients(h: Harness) -> None:
    """The clients through the chaos, the settle phase and their close."""
    run, args, clients, runs = h.run, h.run.args, h.clients, h.clients.runs
    rng = random.Random(f"{args.seed}:clients")
    async with trio.open_nursery() as client_nursery:
        h.clients_started = True
        for r in runs:
            client_nursery.start_soon(clients.run_client, r, random.Random(rng.random()))
        with trio.move_on_after(60):
            await wait_until(lambda: all(r.client or r.failure for r in runs), 0.1)
        run.phase = "chaos"
        run.event("chaos starts", duration=args.duration)
        chaos_end = trio.current_time() + args.duration
        async with trio.open_nursery() as faults:
            with trio.move_on_at(chaos_end):
                await play(run, h.schedule, h.fleet, h.brokers, clients, faults, chaos_end)
                await trio.sleep_until(chaos_end)
            clients.stop_sending.set()
            run.phase = "settle"
            run.event(
                "chaos over: stop sending, bring everything up, settle",
                timeout=args.settle_timeout,
            )
            await settle(h, faults)
        run.event(
            "settled" if h.settled else "settle TIMED OUT",
            after=f"{h.settle_s:.1f}s",
        )
        run.phase = "close"
        clients.close.set()
        with trio.move_on_after(15):
            for r in runs:
                await r.done.wait()
        client_nursery.cancel_scope.cancel()


async def run_phases(h: Harness) -> int:
    """Brokers up, processes started and kept up, then the clients' run (run_clients)."""
    run, args, fleet = h.run, h.run.args, h.fleet
    if not await h.brokers.ensure_up():
        how = "scripts/cluster.sh" if args.cluster else "scripts/services.sh"
        run.event(f"cannot start Kafka/Redis with {how}; see services.log")
        return 2
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nursery.start_soon(fleet.supervise)
        nursery.start_soon(progress, run, fleet, h.clients, h.brokers)
        nursery.start_soon(watch_flips, run, h.redis, h.redis_mode, args.prefix, h.flips)
        nursery.start_soon(probe_lag, run)
        nursery.start_soon(h.clients.check_records, h.redis, h.redis_mode, redis_prefix(args))
        if not await fleet.wait_ready(args.start_timeout):
            not_up = [p.name for p in fleet.procs if not p.ready]
            run.event("processes not ready in time", procs=",".join(not_up))
            nursery.cancel_scope.cancel()
            return 2
        run.event("all processes ready")
        await run_clients(h)
        nursery.cancel_scope.cancel()
    return 0


async def main_async(args: argparse.Namespace) -> tuple[dict[str, Any] | None, int]:
    h = set_up(args)
    run = h.run
    # Everything is bounded by one deadline, on top of the per-phase limits.
    limit = args.start_timeout + args.duration + args.settle_timeout + 600
    h.scope.deadline = trio.current_time() + limit
    code = 1
    try:
        async with trio.open_nursery() as top:
            top.start_soon(on_signals, h)
            try:
                with h.scope:
                    code = await run_phases(h)
                if h.scope.cancelled_caught and not h.interrupted:
                    run.event(f"run limit of {limit:.0f}s reached")
            finally:
                top.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            run.phase = "stop"
            await h.fleet.stop_all(grace=args.shutdown_timeout + 3)
            # Leave Kafka and Redis running, whatever the chaos did to them.
            with trio.move_on_after(300):
                await h.brokers.ensure_up()
            await h.brokers.close()
            run.close()
    summary = None
    if h.clients_started:
        summary = summarize(run, h.fleet, h.clients, h.flips, h.settled, h.settle_s, h.schedule)
        summary["chaos"].update(h.brokers.report())
    if h.interrupted:
        return summary, 130
    if code:
        return summary, code
    return summary, 0 if summary and summary["ok"] else 1


def _delays(raw: str) -> tuple[float, float]:
    lo, _, hi = raw.partition(",")
    a, b = float(lo), float(hi or lo)
    if not 0 <= a <= b:
        raise argparse.ArgumentTypeError("expected MIN,MAX seconds with 0 <= MIN <= MAX")
    return a, b


def resolve_cluster_args(p: ArgumentParser, args: argparse.Namespace) -> None:
    """The defaults that depend on --cluster, the flags that need it or exclude it, and (with
    it) the clusters' environment from `scripts/cluster.sh env` (args.cluster_env)."""
    args.cluster_env = None
    if not args.cluster:
        for flag in ("redis_single", "broker_kills", "master_kills"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} needs --cluster")
        args.pods = 2 if args.pods is None else args.pods
        args.kafka_kills = 1 if args.kafka_kills is None else args.kafka_kills
        args.redis_kills = 1 if args.redis_kills is None else args.redis_kills
        args.broker_kills = args.master_kills = 0
        return
    for flag in ("kafka_kills", "redis_kills"):
        if getattr(args, flag):
            p.error(
                f"--{flag.replace('_', '-')} is for the single-node brokers; with --cluster use"
                " --broker-kills / --master-kills"
            )
    args.kafka_kills = args.redis_kills = 0
    args.pods = 3 if args.pods is None else args.pods
    args.broker_kills = 2 if args.broker_kills is None else args.broker_kills
    if args.redis_single is not None:
        host, _, port = args.redis_single.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            p.error(f"--redis-single must be HOST:PORT, got {args.redis_single!r}")
        if args.master_kills:
            p.error("--master-kills needs the Redis Cluster (not with --redis-single)")
        args.master_kills = 0
    elif args.master_kills is None:
        args.master_kills = 1
    try:
        done = subprocess.run(
            ["bash", str(SCRIPTS / "cluster.sh"), "env"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        p.error(f"--cluster: scripts/cluster.sh env failed: {e}")
    env = parse_env(done.stdout)
    if done.returncode != 0 or not {"NIMBUS_KAFKA_BROKERS", "NIMBUS_REDIS_ADDRESS"} <= set(env):
        why = (done.stderr.strip().splitlines() or ["no env lines"])[-1]
        p.error(f"--cluster: scripts/cluster.sh env failed: {why}")
    args.cluster_env = env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20, help="clients (default 20)")
    p.add_argument("--rate", type=float, default=5.0, help="events/s per client (default 5)")
    p.add_argument("--duration", type=float, default=90.0, help="seconds of chaos (default 90)")
    p.add_argument(
        "--settle-timeout", type=float, default=120.0, help="settle phase limit, s (default 120)"
    )
    p.add_argument(
        "--start-timeout", type=float, default=120.0, help="processes up limit, s (default 120)"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the fault schedule (default random)"
    )
    p.add_argument("--pods", type=int, default=None, help="default 2 (--cluster: 3)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument(
        "--switch-rate", type=float, default=30.0, help="client switches per minute (default 30)"
    )
    p.add_argument(
        "--cut-rate",
        type=float,
        default=20.0,
        help="streams cut right after a send, per minute (20)",
    )
    p.add_argument(
        "--pod-kill-rate", type=float, default=3.0, help="pod SIGKILLs per minute (default 3)"
    )
    p.add_argument(
        "--worker-kill-rate", type=float, default=3.0, help="worker SIGKILLs per minute (default 3)"
    )
    p.add_argument(
        "--redis-cut-rate",
        type=float,
        default=2.0,
        help="CLIENT KILL TYPE normal|pubsub per minute (2)",
    )
    p.add_argument(
        "--kafka-kills",
        type=int,
        default=None,
        help="Kafka broker kill9+restart count (default 1; not with --cluster)",
    )
    p.add_argument(
        "--redis-kills",
        type=int,
        default=None,
        help="redis-server kill9+restart count (default 1; not with --cluster)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run on scripts/cluster.sh's clusters (see Cluster mode above)",
    )
    p.add_argument(
        "--redis-single",
        metavar="HOST:PORT",
        default=None,
        help="--cluster: Redis on this single node instead of the Redis Cluster",
    )
    p.add_argument(
        "--broker-kills",
        type=int,
        default=None,
        help="--cluster: Kafka partition leader kill9+restart count (default 2)",
    )
    p.add_argument(
        "--master-kills",
        type=int,
        default=None,
        help="--cluster: Redis Cluster master kill9+restart count (default 1; 0 with --redis-single)",
    )
    p.add_argument(
        "--restart-delay",
        type=_delays,
        default=(0.5, 3.0),
        metavar="MIN,MAX",
        help="pod/worker restart delay, s (0.5,3)",
    )
    p.add_argument("--delivery-timeout-ms", type=int, default=2000)
    p.add_argument("--status-interval-ms", type=int, default=250)
    p.add_argument(
        "--shutdown-timeout", type=int, default=2, help="NIMBUS_SHUTDOWN_TIMEOUT_SEC (default 2)"
    )
    p.add_argument(
        "--log-level", default="INFO", help="NIMBUS_LOG_LEVEL of the processes (default INFO)"
    )
    add_port_options(p)
    p.add_argument("--run-dir", type=Path, default=None, help="default artifacts/chaos-<timestamp>")
    p.add_argument(
        "--prefix", default=None, help="client id / topic / channel prefix (default chaos-<random>)"
    )
    p.add_argument(
        "--progress", type=float, default=5.0, help="seconds between progress lines (default 5)"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the summary as JSON to PATH")
    p.add_argument("-v", "--verbose", action="store_true", help="client library logs to stderr")
    args = p.parse_args(argv)
    resolve_cluster_args(p, args)
    if (
        args.clients < 1
        or args.pods < 1
        or args.workers < 1
        or args.rate <= 0
        or args.duration <= 0
    ):
        p.error("need >= 1 client, pod and worker, a rate > 0 and a duration > 0")
    for name in ("settle_timeout", "start_timeout", "progress"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name.replace('_', '-')} must be > 0")
    for name in (
        "switch_rate",
        "cut_rate",
        "pod_kill_rate",
        "worker_kill_rate",
        "redis_cut_rate",
        "kafka_kills",
        "redis_kills",
        "broker_kills",
        "master_kills",
        "shutdown_timeout",
    ):
        if not (getattr(args, name) >= 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.partitions < 1:
        p.error("--partitions must be >= 1")
    if args.delivery_timeout_ms < 10 or args.status_interval_ms < 10:
        p.error("--delivery-timeout-ms and --status-interval-ms must be >= 10")
    check_ports(p, args)
    levels = ("trace", "debug", "info", "success", "warning", "error")
    if args.log_level.strip().lower() not in levels:
        p.error(f"--log-level must be one of {', '.join(levels)}, got {args.log_level!r}")
    if args.prefix is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", args.prefix):
        # it names topics (Kafka's characters), client ids and the Redis namespace
        p.error(f"--prefix may hold only letters, digits, '.', '_', '-', got {args.prefix!r}")
    if args.seed is None:
        args.seed = secrets.randbelow(1_000_000)
    args.prefix = args.prefix or f"chaos-{secrets.token_hex(4)}"
    if args.run_dir is None:
        args.run_dir = (
            ROOT / "artifacts" / f"chaos-{datetime.now():%Y%m%d-%H%M%S}-{args.prefix[-8:]}"
        )
    if args.json:  # written after the run: find out now
        p.check_output_file("--json", args.json)
    try:
        args.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--run-dir {args.run_dir}: cannot create it: {e.strerror}")
    if not os.access(args.run_dir, os.W_OK):
        p.error(f"--run-dir {args.run_dir}: not writable")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()
    logger.add(args.run_dir / "harness.log", level="DEBUG")
    aio_log = logging.getLogger("asyncio")
    aio_log.addHandler(logging.FileHandler(args.run_dir / "harness-asyncio.log"))
    aio_log.propagate = False
    if args.verbose:
        logger.add(sys.stderr, level="DEBUG")
    summary, code = trio.run(main_async, args)
    if summary is not None:
        print(render(summary), flush=True)
        (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
