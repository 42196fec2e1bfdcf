"""Metadata checks for scripts/cluster.sh (kafka-python from the project's venv).

kafka_meta.py ready EXPECTED HOST:PORT...   exit 0 when every listed broker answers a
                                            metadata request and the cluster reports
                                            EXPECTED unfenced brokers; else print why, exit 1
kafka_meta.py leader TOPIC PARTITION HOST:PORT...
                                            print the partition's leader node id (-1: none)
"""

from __future__ import annotations

import logging
import sys

from kafka import KafkaAdminClient


def _admin(bootstrap: list[str]) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="nimbus-cluster-sh",
        request_timeout_ms=5000,
    )


def _unfenced(cluster: dict) -> list[int]:
    return sorted(
        b["broker_id"] for b in cluster.get("brokers", []) if not b.get("is_fenced", False)
    )


def ready(expected: int, nodes: list[str]) -> int:
    for node in nodes:
        try:
            admin = _admin([node])
        except Exception as exc:  # any failure means "not ready yet"
            print(f"{node}: no metadata ({type(exc).__name__}: {exc})")
            return 1
        try:
            admin.list_topics()
            brokers = _unfenced(admin.describe_cluster())
        except Exception as exc:
            print(f"{node}: metadata request failed ({type(exc).__name__}: {exc})")
            return 1
        finally:
            admin.close()
        if len(brokers) != expected:
            print(f"{node}: cluster reports brokers {brokers}, expected {expected}")
            return 1
    return 0


def leader(topic: str, partition: int, nodes: list[str]) -> int:
    admin = _admin(nodes)
    try:
        topics = admin.describe_topics([topic])
    finally:
        admin.close()
    for t in topics:
        if t.get("name", t.get("topic")) != topic:
            continue
        for p in t["partitions"]:
            if p.get("partition_index", p.get("partition")) == partition:
                print(p.get("leader_id", p.get("leader", -1)))
                return 0
    print(f"topic {topic} partition {partition} not found", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    logging.disable(logging.CRITICAL)
    if len(argv) >= 3 and argv[0] == "ready":
        return ready(int(argv[1]), argv[2:])
    if len(argv) >= 4 and argv[0] == "leader":
        return leader(argv[1], int(argv[2]), argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
