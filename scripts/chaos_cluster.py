"""Cluster mode of scripts/chaos.py (issue 17): the brokers are the local clusters of
scripts/cluster.sh (3 KRaft Kafka nodes, RF 3 / min ISR 2; a Redis Cluster of 3 masters + 3
replicas), and the broker faults are

    broker_kill  SIGKILL the Kafka node leading a partition of the run's events or results topic
                 (picked from the metadata), wait for its partitions' failover, wait `down_for`
                 more, restart it (cluster.sh kafka-kill9 N, kafka-launch N)
    master_kill  SIGKILL a Redis Cluster master, wait until its replica is promoted, wait
                 `down_for` more, restart it: it rejoins as a replica (cluster.sh redis-kill9 PORT,
                 redis-start PORT)

One kill per cluster at a time: a kill waits until the previous one on its cluster is over (the
restarted node back in sync) and that cluster is whole (Kafka: 3 brokers up, every partition of
the run's topics led, with 3 in-sync replicas; Redis: 6 nodes up, cluster_state ok on each,
3 masters each with a connected replica). A kill whose turn has not come by the end of the chaos
is skipped (counted). So never more than one broker and one Redis node are down (a broker and a
master may be down together). cluster.sh runs its state-changing commands one at a time, so the
broker is restarted with `kafka-launch` (which returns once the JVM is started) and its return
watched here, not with `kafka-start` (which would hold the lock, and any Redis kill or restart,
for the JVM's whole start: 10-50 s on a busy 2-CPU machine).

Each kill is recorded (`kills`): what (broker id / Redis port), when, the failover time, the
restart time and the time until the restarted node is in sync again:

    failover_s   kill -> every partition the broker led has another leader in the metadata
                 (kafka-python admin, polled every 0.2 s: an upper bound; failover_lower_s is
                 the last poll that still saw an old leader) / kill -> the master's replica is
                 a master (not failing) in CLUSTER NODES of every surviving master (detail
                 replica_took_over_s: its own ROLE said master)
    restart_s    `cluster.sh kafka-launch N` -> the metadata lists broker N, unfenced, again /
                 how long `cluster.sh redis-start PORT` took (redis-server up and its own view
                 of the cluster ok: it may not yet know it was failed over)
    in_sync_s    from the restart: the broker back in the ISR of every partition of the run's
                 topics / the old master a replica with its link to its new master up (ROLE)

The kill time is when the node's port stopped accepting connections (polled every 0.05 s while
`cluster.sh ...-kill9` runs; the command itself returns only once the process is reaped, which
took seconds for a JVM: kill_cmd_s).

`--redis-single HOST:PORT` runs Nimbus on a single-node Redis instead of the Redis Cluster (to
play the Kafka faults alone): no master kills then, and Redis connection cuts go to that node. It
is not started, stopped or killed by the harness. Otherwise the Nimbus processes and the
harness's own record checker and flip watcher use the Redis Cluster (NIMBUS_REDIS_MODE=cluster,
nimbus.engines.redis_cluster).
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from procs import run_logged, wall
from shared import HOST

if TYPE_CHECKING:
    from chaos import Run

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"
KILL_KINDS = ("broker_kill", "master_kill")
POLL = 0.2
T = TypeVar("T")


def parse_env(text: str) -> dict[str, str]:
    """`cluster.sh env`'s lines (`export A=1 B=2`) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        for word in line.strip().removeprefix("export ").split():
            key, eq, value = word.partition("=")
            if eq and key.startswith("NIMBUS_"):
                out[key] = value
    return out


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def port_open(port: int, host: str = HOST) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def spread(values: list[float]) -> dict[str, float | int]:
    """min / median / max (s) of the measured values; count of them."""
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {
        "count": len(v),
        "min": round(v[0], 2),
        "median": round(statistics.median(v), 2),
        "max": round(v[-1], 2),
    }


# ---------------------------------------------------------------------------------------------
# Kafka metadata (kafka-python's admin client, in a worker thread, one call at a time)
# ---------------------------------------------------------------------------------------------

# (topic, partition) -> (leader id, in-sync replica ids)
Partitions = dict[tuple[str, int], tuple[int, tuple[int, ...]]]


class KafkaMeta:
    def __init__(self, brokers: list[str]) -> None:
        self.brokers = brokers
        self._admin: Any = None
        self._lock = trio.Lock()

    def _open(self) -> Any:
        import logging

        from kafka.admin import KafkaAdminClient

        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        if self._admin is None:
            self._admin = KafkaAdminClient(
                bootstrap_servers=self.brokers,
                client_id="nimbus-chaos-meta",
                request_timeout_ms=3000,
                reconnect_backoff_ms=100,
                reconnect_backoff_max_ms=500,
            )
        return self._admin

    def _describe(self, topics: list[str]) -> Partitions:
        admin = self._open()
        try:
            described = admin.describe_topics(topics)
        except Exception:
            self._close()  # start afresh on the next call
            raise
        out: Partitions = {}
        for t in described:
            name = t.get("name", t.get("topic"))
            for p in t.get("partitions") or []:
                index = p.get("partition_index", p.get("partition"))
                leader = p.get("leader_id", p.get("leader", -1))
                out[(name, int(index))] = (int(leader), tuple(sorted(p.get("isr_nodes") or ())))
        return out

    def _close(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:
                pass
            self._admin = None

    def _unfenced(self) -> list[int]:
        admin = self._open()
        try:
            cluster = admin.describe_cluster()
        except Exception:
            self._close()
            raise
        return sorted(
            int(b["broker_id"]) for b in cluster.get("brokers", []) if not b.get("is_fenced", False)
        )

    async def unfenced(self) -> list[int] | None:
        """The ids of the brokers the cluster reports unfenced, or None if the request failed."""
        async with self._lock:
            try:
                return await trio.to_thread.run_sync(self._unfenced)
            except Exception:
                return None

    async def describe(self, topics: list[str]) -> Partitions | None:
        """The partitions of `topics`, or None if the metadata request failed."""
        async with self._lock:
            try:
                return await trio.to_thread.run_sync(self._describe, topics)
            except Exception:
                return None

    async def close(self) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._close)


# ---------------------------------------------------------------------------------------------
# Redis Cluster views (redis-cli: raw CLUSTER NODES / INFO / ROLE text)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    id: str
    port: int
    flags: frozenset[str]
    master_id: str  # "-" for masters
    link: str  # connected | disconnected
    slots: int  # slot ranges listed (masters serving slots: > 0)

    @property
    def failing(self) -> bool:
        return bool({"fail", "fail?"} & self.flags)

    @property
    def master(self) -> bool:
        return "master" in self.flags and not self.failing


def parse_nodes(text: str) -> list[Node]:
    nodes = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        addr = f[1].split("@")[0]
        try:
            port = port_of(addr)
        except ValueError:
            continue
        nodes.append(Node(f[0], port, frozenset(f[2].split(",")), f[3], f[7], len(f) - 8))
    return nodes


async def redis_cli(port: int, *cmd: str, timeout: float = 3) -> str | None:
    """The reply of redis-cli (raw text), or None if the node did not answer."""
    with trio.move_on_after(timeout):
        proc = await trio.run_process(
            ["redis-cli", "-h", HOST, "-p", str(port), *cmd],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        out = proc.stdout.decode(errors="replace")
        if proc.returncode != 0 or "Could not connect" in out:
            return None
        return out.replace("\r", "")
    return None


async def cluster_nodes(port: int) -> list[Node] | None:
    text = await redis_cli(port, "CLUSTER", "NODES")
    return parse_nodes(text) if text else None


async def cluster_ok(port: int) -> bool:
    text = await redis_cli(port, "CLUSTER", "INFO")
    if not text:
        return False
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return (
        info.get("cluster_state") == "ok"
        and info.get("cluster_slots_ok") == "16384"
        and info.get("cluster_known_nodes") == "6"
    )


async def role(port: int) -> list[str]:
    """ROLE as lines: ["master", ...] or ["slave", host, port, state, offset]."""
    text = await redis_cli(port, "ROLE")
    return text.split() if text else []


# ---------------------------------------------------------------------------------------------
# The brokers
# ---------------------------------------------------------------------------------------------


@dataclass
class Kill:
    kind: str  # broker_kill | master_kill
    target: str  # "kafka-2" / "redis-37001"
    node: int  # the Kafka node (broker) id / the Redis port
    t: float  # run time of the kill (s)
    wall: str
    kill_cmd_s: float
    down_for_s: float
    failover_s: float | None = None
    failover_lower_s: float | None = None
    restart_s: float | None = None
    in_sync_s: float | None = None
    restart_attempts: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


async def poll_until(
    probe: Callable[[], Awaitable[T | None]], timeout: float, since: float | None = None
) -> tuple[T | None, float, float]:
    """Call `probe` every POLL s until it returns something other than None: (that value, s
    until the answer that had it, s until the last answer that did not), or (None, timeout, ...).
    Seconds count from `since` (trio time; default now)."""
    t0 = trio.current_time() if since is None else since
    lower = 0.0
    with trio.move_on_after(timeout):
        while True:
            value = await probe()
            now = trio.current_time() - t0
            if value is not None:
                return value, now, lower
            lower = now
            await trio.sleep(POLL)
    return None, timeout, lower


class ClusterBrokers:
    """Kafka and Redis on scripts/cluster.sh's clusters: start them if needed, kill and restart
    their nodes one at a time, cut Redis client connections. Same interface as chaos.Brokers."""

    def __init__(
        self,
        run: Run,
        env: dict[str, str],
        kafka: list[str],
        redis_nodes: list[str],
        redis_single: str | None,
        topics: list[str],
    ) -> None:
        self.run = run
        self.env = env
        self.kafka = kafka  # node N is kafka[N - 1]
        self.redis_nodes = redis_nodes
        self.redis_single = redis_single
        self.topics = topics
        self.meta = KafkaMeta(kafka)
        self.log = run.dir / "services.log"
        self.busy = 0  # kill-and-restart sequences in progress (or waiting for their turn)
        self.down: set[str] = set()
        self.kills: list[Kill] = []
        # one kill per cluster at a time (see the module docstring)
        self._kafka_turn = trio.Lock()
        self._redis_turn = trio.Lock()

    # --- plumbing

    async def script(self, *argv: str, timeout: float = 240) -> int:
        cmd = ["bash", str(CLUSTER_SH), *argv]
        return await run_logged(self.log, cmd, self.env, f"cluster.sh {' '.join(argv)}", timeout)

    @property
    def redis_down(self) -> bool:
        """Never all of it: connection cuts go to the nodes that are up."""
        return False

    def status(self) -> str:
        return f"down: {','.join(sorted(self.down))}" if self.down else "clusters whole"

    @property
    def redis_ports(self) -> list[int]:
        if self.redis_single:
            return [port_of(self.redis_single)]
        return [port_of(a) for a in self.redis_nodes]

    async def ensure_up(self, timeout: float = 240) -> bool:
        """Every cluster node running (cluster.sh up starts what is not), and the single Redis
        (if used) answering."""
        if await self.script("status", timeout=30) != 0:
            self.run.event("cluster.sh up")
            if await self.script("up", timeout=timeout) != 0:
                return False
        self.down.clear()
        if self.redis_single:
            host, _, port = self.redis_single.rpartition(":")
            if not port_open(int(port), host or HOST):
                self.run.event("the single Redis does not answer", address=self.redis_single)
                return False
        return True

    async def cut_redis_connections(self, kind: str) -> str:
        """CLIENT KILL TYPE `kind` on every Redis node that is up."""
        out = []
        for port in self.redis_ports:
            if f"redis-{port}" in self.down:
                continue
            reply = await redis_cli(port, "CLIENT", "KILL", "TYPE", kind, timeout=10)
            out.append(f"{port}:{(reply or 'no answer').strip()}")
        return " ".join(out)

    # --- Kafka

    async def _kafka_whole(self) -> Partitions | None:
        """The run's partitions if the Kafka cluster is whole: 3 nodes up, every partition led,
        3 in-sync replicas each; else None."""
        if not all(port_open(port_of(b)) for b in self.kafka):
            return None
        parts = await self.meta.describe(self.topics)
        if not parts or {t for t, _ in parts} != set(self.topics):
            return None
        if all(leader >= 0 and len(isr) == len(self.kafka) for leader, isr in parts.values()):
            return parts
        return None

    async def _when_whole(
        self, whole: Callable[[], Awaitable[T | None]], deadline: float, kill: str, cluster: str
    ) -> T | None:
        """`whole()`'s answer once the cluster is whole; None (the kill skipped, said and
        counted) if it is not before `deadline`."""
        found: T | None = None
        with trio.move_on_at(deadline):
            found, _, _ = await poll_until(whole, 1e9)
        if found is None:
            self.run.event(f"{kill} skipped: the {cluster} was not whole before the end")
            self.run.counts[f"{kill}_skipped"] += 1
        return found

    async def broker_kill(self, target: int, down_for: float, deadline: float) -> None:
        """SIGKILL the leader of one of the run's partitions (chosen by `target`), wait for the
        failover, `down_for` s more, restart it, wait until it is in sync again."""
        await self._in_turn(self._kafka_turn, self._broker_kill, target, down_for, deadline)

    async def _broker_kill(self, target: int, down_for: float, deadline: float) -> None:
        run = self.run
        parts = await self._when_whole(self._kafka_whole, deadline, "broker_kill", "Kafka cluster")
        if parts is None:
            return
        busy = sorted(parts)
        topic, partition = busy[target % len(busy)]
        victim = parts[(topic, partition)][0]
        led = sorted(tp for tp, (leader, _) in parts.items() if leader == victim)
        name = f"kafka-{victim}"
        killed = await self._kill_node(
            "broker_kill",
            name,
            victim,
            "kafka-kill9",
            self.kafka[victim - 1],
            down_for,
            {"chosen": f"{topic}-{partition}", "led": [f"{t}-{p}" for t, p in led]},
        )
        if killed is None:
            return
        kill, killed_at = killed
        run.event(
            "broker SIGKILL",
            node=name,
            at=f"{kill.t}s",
            leader_of=f"{topic}-{partition}",
            led=len(led),
            cmd=f"{kill.kill_cmd_s}s",
        )

        async def moved() -> dict[str, int] | None:
            now = await self.meta.describe(self.topics)
            if now is None:
                return None
            new = {f"{t}-{p}": now[(t, p)][0] for t, p in led if (t, p) in now}
            if len(new) == len(led) and all(v not in (-1, victim) for v in new.values()):
                return new
            return None

        new_leaders, took, lower = await poll_until(moved, 90, since=killed_at)
        if new_leaders is not None:
            kill.failover_s, kill.failover_lower_s = round(took, 2), round(lower, 2)
            kill.detail["new_leaders"] = new_leaders
            run.event("broker failover", node=name, took=f"{took:.2f}s", new_leaders=new_leaders)
        else:
            run.event("broker failover NOT SEEN", node=name, within="90s")
            run.counts["broker_failover_not_seen"] += 1
        await trio.sleep(down_for)
        kill.restart_s, kill.restart_attempts = await self._restart_broker(victim)
        self.down.discard(name)
        t_restart = trio.current_time() - kill.restart_s

        async def in_sync() -> bool | None:
            now = await self.meta.describe(self.topics)
            if now and all(victim in isr for _, isr in now.values()):
                return True
            return None

        back, _, _ = await poll_until(in_sync, 120)
        if back:
            kill.in_sync_s = round(trio.current_time() - t_restart, 2)
        run.event(
            f"{name} up",
            restart=f"{kill.restart_s:.1f}s",
            in_sync=f"{kill.in_sync_s}s" if back else "NOT within 120s",
        )

    async def _kill_node(
        self,
        kind: str,
        name: str,
        node: int,
        command: str,
        address: str,
        down_for: float,
        detail: dict[str, Any],
    ) -> tuple[Kill, float] | None:
        """kill9 the node `name` (`cluster.sh command node`, its port at `address`) as a `kind`
        (broker_kill | master_kill): marked down, counted, its Kill logged, and (that Kill, the
        trio time its port closed); None, counted as failed, if it still answers."""
        run = self.run
        killed_at, killed_wall, kill_cmd_s = await self._kill(command, str(node), address)
        if killed_at is None:
            run.event(f"{kind.removesuffix('_kill')} kill9 FAILED: {name} still answers")
            run.counts[f"{kind}_failed"] += 1
            return None
        self.down.add(name)
        run.counts[f"{kind}s"] += 1
        kill = Kill(
            kind,
            name,
            node,
            round(killed_at - run.t0, 3),
            killed_wall,
            kill_cmd_s,
            down_for,
            detail=detail,
        )
        self.kills.append(kill)
        return kill, killed_at

    async def _kill(self, command: str, arg: str, address: str) -> tuple[float | None, str, float]:
        """Run `cluster.sh command arg` (a kill9) and watch the node's port meanwhile: (trio time
        the port stopped accepting, or None if it still does 5 s after the command; the wall
        clock then; s the command took)."""
        host, _, port = address.rpartition(":")
        gone_at: float | None = None
        gone_wall = ""
        gone = trio.Event()
        t = trio.current_time()

        async def watch() -> None:
            nonlocal gone_at, gone_wall
            while True:
                if not port_open(int(port), host):
                    gone_at, gone_wall = trio.current_time(), wall()
                    gone.set()
                    return
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await self.script(command, arg, timeout=60)
            took = round(trio.current_time() - t, 3)
            with trio.move_on_after(5):
                await gone.wait()
            nursery.cancel_scope.cancel()
        return gone_at, gone_wall, took

    async def _restart_broker(self, node: int) -> tuple[float, int]:
        """`cluster.sh kafka-launch N`, then wait until the metadata lists broker N, unfenced
        (launched again if it is not there within 180 s; `kafka-start` after 5 attempts)."""
        t = trio.current_time()

        async def registered() -> bool | None:
            return True if node in (await self.meta.unfenced() or ()) else None

        for attempt in range(1, 6):
            rc = await self.script("kafka-launch", str(node), timeout=120)
            if rc == 0:
                back, _, _ = await poll_until(registered, 180)
                if back:
                    return round(trio.current_time() - t, 2), attempt
                self.run.event(f"kafka-{node} not registered within 180 s", attempt=attempt)
            else:
                self.run.event(f"cluster.sh kafka-launch {node} failed", rc=rc, attempt=attempt)
            await trio.sleep(2)
        took, _ = await self._restart("kafka-start", str(node))
        return round(trio.current_time() - t, 2), 6

    async def _restart(self, command: str, arg: str) -> tuple[float, int]:
        t = trio.current_time()
        for attempt in range(1, 6):
            rc = await self.script(command, arg, timeout=240)
            if rc == 0:
                return round(trio.current_time() - t, 2), attempt
            self.run.event(f"cluster.sh {command} {arg} failed", rc=rc, attempt=attempt)
            await trio.sleep(2)
        return round(trio.current_time() - t, 2), 5

    # --- Redis Cluster

    async def _redis_whole(self) -> list[Node] | None:
        """The cluster's nodes if it is whole: 6 nodes up, cluster_state ok on each, 3 masters
        serving slots, each with a connected replica that is not failing; else None."""
        ports = self.redis_ports
        for port in ports:
            if not await cluster_ok(port):
                return None
        nodes = await cluster_nodes(ports[0])
        if not nodes or len(nodes) != len(ports) or any(n.failing for n in nodes):
            return None
        masters = [n for n in nodes if n.master and n.slots]
        if len(masters) != 3:
            return None
        for m in masters:
            if not any(n.master_id == m.id and n.link == "connected" for n in nodes):
                return None
        return nodes

    async def master_kill(self, target: int, down_for: float, deadline: float) -> None:
        """SIGKILL a master (chosen by `target` among the current ones), wait until its replica
        is promoted, `down_for` s more, restart it, wait until it is a connected replica."""
        await self._in_turn(self._redis_turn, self._master_kill, target, down_for, deadline)

    async def _in_turn(
        self,
        turn: trio.Lock,
        kill: Callable[[int, float, float], Awaitable[None]],
        target: int,
        down_for: float,
        deadline: float,
    ) -> None:
        """`kill` once its cluster's turn comes (one kill per cluster at a time), counted busy
        while it waits and runs."""
        self.busy += 1
        try:
            async with turn:
                await kill(target, down_for, deadline)
        finally:
            self.busy -= 1

    async def _master_kill(self, target: int, down_for: float, deadline: float) -> None:
        run = self.run
        nodes = await self._when_whole(self._redis_whole, deadline, "master_kill", "Redis Cluster")
        if nodes is None:
            return
        masters = sorted((n for n in nodes if n.master and n.slots), key=lambda n: n.port)
        victim = masters[target % len(masters)]
        replica = next(n for n in nodes if n.master_id == victim.id and n.link == "connected")
        others = [m.port for m in masters if m is not victim]
        name = f"redis-{victim.port}"
        killed = await self._kill_node(
            "master_kill",
            name,
            victim.port,
            "redis-kill9",
            f"{HOST}:{victim.port}",
            down_for,
            {"replica": replica.port, "slot_ranges": victim.slots},
        )
        if killed is None:
            return
        kill, killed_at = killed
        run.event(
            "master SIGKILL",
            node=name,
            at=f"{kill.t}s",
            replica=replica.port,
            cmd=f"{kill.kill_cmd_s}s",
        )

        async def promoted() -> bool | None:
            if "replica_took_over_s" not in kill.detail and (await role(replica.port))[:1] == [
                "master"
            ]:
                kill.detail["replica_took_over_s"] = round(trio.current_time() - killed_at, 2)
            for port in others:
                view = await cluster_nodes(port)
                mine = [n for n in view or [] if n.id == replica.id]
                if not mine or not mine[0].master:
                    return None
            return True

        done, took, lower = await poll_until(promoted, 90, since=killed_at)
        if done:
            kill.failover_s, kill.failover_lower_s = round(took, 2), round(lower, 2)
            run.event("master failover", node=name, promoted=replica.port, took=f"{took:.2f}s")
        else:
            run.event("master failover NOT SEEN", node=name, within="90s")
            run.counts["master_failover_not_seen"] += 1
        await trio.sleep(down_for)
        kill.restart_s, kill.restart_attempts = await self._restart("redis-start", str(victim.port))
        self.down.discard(name)
        t_restart = trio.current_time() - kill.restart_s

        async def rejoined() -> list[str] | None:
            r = await role(victim.port)
            return r if len(r) >= 4 and r[0] == "slave" and r[3] == "connected" else None

        r, _, _ = await poll_until(rejoined, 60)
        if r is not None:
            kill.in_sync_s = round(trio.current_time() - t_restart, 2)
            kill.detail["rejoined_as_replica_of"] = int(r[2])
        run.event(
            f"{name} up",
            restart=f"{kill.restart_s:.1f}s",
            rejoined=f"as a replica of {r[2]} after {kill.in_sync_s}s" if r else "NOT within 60s",
        )

    async def close(self) -> None:
        await self.meta.close()

    # --- the report

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kill_log": [k.__dict__ for k in self.kills]}
        for kind in KILL_KINDS:
            mine = [k for k in self.kills if k.kind == kind]
            out[kind] = {
                "failover_s": spread([k.failover_s for k in mine if k.failover_s is not None]),
                "restart_s": spread([k.restart_s for k in mine if k.restart_s is not None]),
                "in_sync_s": spread([k.in_sync_s for k in mine if k.in_sync_s is not None]),
            }
        return out
