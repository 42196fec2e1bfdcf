"""Smoke test of `scripts/cluster.sh` (issue 17, item 4): the local clusters are real.

It brings up the 3 KRaft brokers and the Redis Cluster (3 masters + 3 replicas), then:

- Kafka: creates a topic with replication factor 3 and sees 3 replicas in sync, produces
  with acks=all, SIGKILLs the leader of partition 0 (`kafka-kill9`), waits for a new leader,
  produces again with acks=all and consumes both records in order;
- Redis: writes a key on its master and `WAIT`s for the replica (a write acknowledged just
  before a kill may otherwise be lost: replication is asynchronous), SIGKILLs that master
  (`redis-kill9`), waits until its replica is a master, and reads the key through
  `redis.cluster.RedisCluster`;
- restarts both killed nodes (`kafka-start`, `redis-start`), sees the ISR back at 3 and the old
  master rejoin as a replica, and takes the clusters `down` (if this module started them);
- Nimbus's topic set-up: each Kafka adapter's `ensure_topics` creates its topics with
  replication factor 3 and min.insync.replicas=2 (NIMBUS_KAFKA_REPLICATION_FACTOR and
  NIMBUS_KAFKA_MIN_INSYNC_REPLICAS at `auto`).

It prints how long each failover took (run with `-s` to see them). It runs when
NIMBUS_TEST_CLUSTER=1, which scripts/test.sh sets under CI: it starts 3 JVMs and 6 redis-servers
for about a minute. Running Nimbus itself on these clusters is later work (issue 17).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("NIMBUS_TEST_CLUSTER") != "1",
        reason="starts the local clusters (scripts/cluster.sh); set NIMBUS_TEST_CLUSTER=1",
    ),
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"

T = TypeVar("T")


def cluster_sh(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        ["bash", str(CLUSTER_SH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"cluster.sh {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Call `probe` until it returns something other than None (exceptions count as None)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # brokers are failing over; try again
            last = exc
        else:
            if value is not None:
                return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


def env_value(env: str, name: str) -> str:
    for line in env.splitlines():
        for word in line.removeprefix("export ").split():
            key, _, value = word.partition("=")
            if key == name:
                return value
    raise AssertionError(f"{name} not in cluster.sh env output:\n{env}")


def _cluster_is_up() -> bool:
    done = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The local clusters: the ones scripts/test.sh started (left up for the other tests), or
    started here and brought down after this module."""
    owned = not _cluster_is_up()
    start = time.monotonic()
    try:
        cluster_sh("up", timeout=400)
        print(f"\ncluster.sh up: {time.monotonic() - start:.1f}s")
        yield cluster_sh("env")
    finally:
        if owned:
            start = time.monotonic()
            cluster_sh("down", timeout=120)
            print(f"cluster.sh down: {time.monotonic() - start:.1f}s")


def test_kafka_leader_failover(cluster: str) -> None:
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic

    brokers = env_value(cluster, "NIMBUS_KAFKA_BROKERS").split(",")
    assert len(brokers) == 3
    topic = f"cluster-smoke-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=brokers, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=3)])

        def partition0() -> dict[str, Any] | None:
            for t in admin.describe_topics([topic]):
                for p in t["partitions"]:
                    if p["partition_index"] == 0:
                        return dict(p)
            return None

        def isr_of_3() -> dict[str, Any] | None:
            p = partition0()
            return p if p is not None and len(p["isr_nodes"]) == 3 else None

        p0 = wait_for("3 in-sync replicas", isr_of_3, 30)
        assert sorted(p0["replica_nodes"]) == [1, 2, 3]

        producer = KafkaProducer(
            bootstrap_servers=brokers,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=10000,
            retry_backoff_ms=200,
        )
        try:
            producer.send(topic, b"before", partition=0).get(timeout=30)
            leader = int(cluster_sh("kafka-leader", topic, "0").strip())
            assert leader in (1, 2, 3)
            assert leader == p0["leader_id"]

            killed_at = time.monotonic()
            cluster_sh("kafka-kill9", str(leader))

            def new_leader() -> int | None:
                now = int(cluster_sh("kafka-leader", topic, "0", timeout=60).strip())
                return now if now not in (-1, leader) else None

            elected = wait_for("a new leader of partition 0", new_leader, 60)
            elected_s = time.monotonic() - killed_at
            producer.send(topic, b"after", partition=0).get(timeout=60)
            produced_s = time.monotonic() - killed_at
            isr = partition0()
            assert isr is not None and leader not in isr["isr_nodes"]
            print(
                f"kafka: killed leader {leader} of {topic}-0; node {elected} elected after "
                f"{elected_s:.1f}s; acks=all produce succeeded {produced_s:.1f}s after the kill "
                f"(ISR then {isr['isr_nodes']})"
            )
        finally:
            producer.close(timeout=10)

        consumer = KafkaConsumer(
            bootstrap_servers=brokers, enable_auto_commit=False, consumer_timeout_ms=1000
        )
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            seen: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(seen) < 2 and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=1000).values():
                    seen.extend(r.value for r in records)
            assert seen == [b"before", b"after"]
        finally:
            consumer.close()

        started = time.monotonic()
        cluster_sh("kafka-start", str(leader), timeout=200)
        p0 = wait_for("the restarted broker back in the ISR", isr_of_3, 60)
        print(
            f"kafka: node {leader} restarted and back in the ISR of {topic}-0 after "
            f"{time.monotonic() - started:.1f}s"
        )
        admin.delete_topics([topic])
    finally:
        admin.close()


def test_nimbus_creates_topics_with_rf_3_and_min_insync_2(cluster: str) -> None:
    """`auto` on 3 brokers (nimbus.topics): each adapter's ensure_topics creates topics with
    3 replicas and the topic's own min.insync.replicas=2 (the brokers' defaults are the same
    here, so the config is checked on the topic itself)."""
    import trio
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    from nimbus.engines.kafka import open_kafka_log
    from nimbus.engines.rdkafka import open_rdkafka_log

    brokers = env_value(cluster, "NIMBUS_KAFKA_BROKERS")
    kp_topic = f"cluster-rf-kp-{uuid.uuid4().hex[:8]}"
    rd_topic = f"cluster-rf-rd-{uuid.uuid4().hex[:8]}"
    names = {"kafka-python": kp_topic, "librdkafka": rd_topic}

    async def create() -> None:
        with trio.fail_after(120):
            async with open_kafka_log(brokers, client_id="cluster-rf") as kp:
                assert await kp.ensure_topics([kp_topic], 3) == {kp_topic: 3}
            async with open_rdkafka_log(brokers, client_id="cluster-rf") as rd:
                assert await rd.ensure_topics([rd_topic], 3) == {rd_topic: 3}

    trio.run(create)
    admin = KafkaAdminClient(bootstrap_servers=brokers.split(","), request_timeout_ms=10000)
    try:
        for client, topic in names.items():
            (t,) = admin.describe_topics([topic])
            assert [len(p["replica_nodes"]) for p in t["partitions"]] == [3, 3, 3], (client, t)
            own = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            isr = own["topic"][topic].get("min.insync.replicas")
            assert isr is not None and isr["value"] == "2", (client, own)
            print(f"kafka: {client} created {topic} with RF 3, min.insync.replicas=2")
        admin.delete_topics(list(names.values()))
    finally:
        admin.close()


def role(port: int) -> list[str]:
    """ROLE of a node as strings: ["master", ...] or ["slave", master host, master port, ...]."""
    from redis import Redis

    with Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True) as r:
        answer = r.execute_command("ROLE")
    return [answer[0], str(answer[2])] if answer[0] == "slave" else [answer[0]]


def test_redis_master_failover(cluster: str) -> None:
    from redis import Redis
    from redis.cluster import ClusterNode, RedisCluster

    addresses = env_value(cluster, "NIMBUS_REDIS_ADDRESS").split(",")
    assert env_value(cluster, "NIMBUS_REDIS_MODE") == "cluster"
    assert len(addresses) == 6
    masters = cluster_sh("redis-masters").split()
    assert len(masters) == 3

    nodes = [ClusterNode(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in addresses]
    rc = RedisCluster(startup_nodes=nodes, socket_timeout=5)
    try:
        key = f"cluster-smoke:{uuid.uuid4().hex[:8]}"
        master = rc.get_node_from_key(key)
        master_port = int(master.port)
        assert str(master_port) in masters
        replicas = [
            port
            for port in (int(a.rpartition(":")[2]) for a in addresses)
            if port != master_port and role(port)[:2] == ["slave", str(master_port)]
        ]
        assert len(replicas) == 1, replicas
        replica_port = replicas[0]

        # SET and WAIT on one connection: WAIT counts the replicas that acknowledged this
        # connection's writes (WAIT 1 0 would block forever if the replica were broken).
        with Redis(host="127.0.0.1", port=master_port, socket_timeout=15) as direct:
            direct.set(key, "before")
            assert direct.execute_command("WAIT", 1, 10000) >= 1

        killed_at = time.monotonic()
        cluster_sh("redis-kill9", str(master_port))

        def promoted() -> bool | None:
            return True if str(replica_port) in cluster_sh("redis-masters").split() else None

        wait_for(f"replica {replica_port} to be promoted", promoted, 60)
        promoted_s = time.monotonic() - killed_at

        def read_key() -> bytes | None:
            value: bytes | None = rc.get(key)
            return value

        value = wait_for("the key through RedisCluster", read_key, 30)
        read_s = time.monotonic() - killed_at
        assert value == b"before"
        rc.set(key, "after")
        print(
            f"redis: killed master {master_port}; replica {replica_port} promoted after "
            f"{promoted_s:.1f}s; RedisCluster read the key {read_s:.1f}s after the kill"
        )

        started = time.monotonic()
        cluster_sh("redis-start", str(master_port), timeout=120)
        wait_for(
            f"{master_port} to rejoin as a replica of {replica_port}",
            lambda: True if role(master_port)[:2] == ["slave", str(replica_port)] else None,
            30,
        )
        assert sorted(cluster_sh("redis-masters").split()) == sorted(
            [m for m in masters if m != str(master_port)] + [str(replica_port)]
        )
        assert rc.get(key) == b"after"
        print(
            f"redis: {master_port} restarted and rejoined as a replica of {replica_port} "
            f"after {time.monotonic() - started:.1f}s"
        )
        rc.delete(key)
    finally:
        rc.close()
