"""The replication of the topics Nimbus creates (nimbus.engines.replication; issue 17, item 3): the `auto` rules
of NIMBUS_KAFKA_REPLICATION_FACTOR and NIMBUS_KAFKA_MIN_INSYNC_REPLICAS, and both Kafka adapters
creating topics with them on the single-node broker (the 3-broker case runs in
tests/test_cluster_scripts.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
from loguru import logger

from nimbus import config
from nimbus import topics as setup
from nimbus.config import ConfigError
from nimbus.engines import replication as topics
from nimbus.engines.memory import MemoryLog
from nimbus.ports import Log

IO_TIMEOUT = 90
ADAPTERS = ["kafka", "rdkafka"]


@pytest.mark.parametrize(("brokers", "rf"), [(0, 1), (1, 1), (2, 2), (3, 3), (5, 3), (9, 3)])
def test_auto_replication_factor_is_3_or_the_brokers_if_fewer(brokers: int, rf: int) -> None:
    assert topics.replication_factor(None, brokers) == rf


def test_an_asked_replication_factor_is_kept() -> None:
    assert topics.replication_factor(2, 5) == 2
    assert topics.replication_factor(5, 1) == 5  # creation_plan refuses it, not this


@pytest.mark.parametrize(("rf", "isr"), [(1, 1), (2, 1), (3, 2), (4, 2), (7, 2)])
def test_auto_min_insync_replicas_is_2_from_3_replicas_on(rf: int, isr: int) -> None:
    assert topics.min_insync_replicas(None, rf) == isr


def test_min_insync_replicas_above_the_replication_factor_names_the_variable() -> None:
    assert topics.min_insync_replicas(3, 3) == 3
    assert topics.min_insync_replicas(1, 3) == 1
    with pytest.raises(ConfigError, match="NIMBUS_KAFKA_MIN_INSYNC_REPLICAS.*above"):
        topics.min_insync_replicas(2, 1)


def test_creation_plan() -> None:
    assert topics.creation_plan(None, None, 1) == (1, 1)
    assert topics.creation_plan(None, None, 2) == (2, 1)
    assert topics.creation_plan(None, None, 3) == (3, 2)
    assert topics.creation_plan(None, None, 6) == (3, 2)
    assert topics.creation_plan(2, None, 3) == (2, 1)
    assert topics.creation_plan(3, 3, 3) == (3, 3)
    assert topics.creation_plan(None, 1, 3) == (3, 1)
    with pytest.raises(ConfigError, match="NIMBUS_KAFKA_REPLICATION_FACTOR: 3.*1 broker"):
        topics.creation_plan(3, None, 1)
    with pytest.raises(ConfigError, match="NIMBUS_KAFKA_MIN_INSYNC_REPLICAS"):
        topics.creation_plan(None, 2, 1)  # auto: RF 1 on a single node


def warnings_during() -> tuple[list[str], int]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    return lines, sink


def test_under_replicated_existing_topics_get_one_warning_each() -> None:
    lines, sink = warnings_during()
    try:
        low = topics.warn_under_replicated({"a": 1, "b": 3, "c": 2}, 3)
    finally:
        logger.remove(sink)
    assert low == ["a", "c"]
    assert len(lines) == 2
    assert "'a'" in lines[0] and "replication factor 1" in lines[0]
    assert "'c'" in lines[1] and "NIMBUS_KAFKA_REPLICATION_FACTOR" in lines[1]


class _Recording(MemoryLog):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[dict[str, Any]] = []

    async def ensure_topics(
        self,
        names: Sequence[str],
        partitions: int,
        *,
        replication: int | None = None,
        min_insync: int | None = None,
    ) -> dict[str, int]:
        self.asked.append({"replication": replication, "min_insync": min_insync})
        return await super().ensure_topics(
            names, partitions, replication=replication, min_insync=min_insync
        )


async def test_settings_reach_the_log_and_the_memory_engine_ignores_them() -> None:
    log = _Recording()
    s = config.load(env={}, dotenv=False, engine="memory")
    assert await setup.ensure_topics(log, s) == 8
    s = config.load(
        env={"NIMBUS_KAFKA_REPLICATION_FACTOR": "3", "NIMBUS_KAFKA_MIN_INSYNC_REPLICAS": "2"},
        dotenv=False,
        engine="memory",
    )
    assert await setup.ensure_topics(log, s) == 8
    assert log.asked == [
        {"replication": None, "min_insync": None},
        {"replication": 3, "min_insync": 2},
    ]


# -- the single-node broker, through each adapter ------------------------------------------------


def open_adapter(name: str, brokers: str) -> AbstractAsyncContextManager[Log]:
    if name == "rdkafka":
        from nimbus.engines.rdkafka import open_rdkafka_log

        return open_rdkafka_log(brokers, client_id="nimbus-topics")
    from nimbus.engines.kafka import open_kafka_log

    return open_kafka_log(brokers, client_id="nimbus-topics")


def replication_of(brokers: str, names: Sequence[str]) -> dict[str, tuple[int, str | None]]:
    """(fewest replicas of a partition, the topic's own min.insync.replicas or None when it is the
    broker's) of each topic, through a separate admin client (kafka-python's)."""
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=brokers.split(","), request_timeout_ms=15_000)
    try:
        out: dict[str, tuple[int, str | None]] = {}
        for t in admin.describe_topics(list(names)):
            rf = min(len(p["replica_nodes"]) for p in t["partitions"])
            # "modified": only the configs set on the topic itself.
            own = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t["name"])])
            isr = own["topic"][t["name"]].get("min.insync.replicas")
            out[t["name"]] = (rf, None if isr is None else isr["value"])
        return out
    finally:
        admin.close()


@pytest.mark.integration
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_single_node_topics_get_rf_1_and_min_insync_1(
    adapter: str, kafka_brokers: str, unique: str
) -> None:
    a, b = f"rf-a-{unique}", f"rf-b-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        async with open_adapter(adapter, kafka_brokers) as log:
            assert await log.ensure_topics([a, b], 2) == {a: 2, b: 2}
    found = await trio.to_thread.run_sync(replication_of, kafka_brokers, [a, b])
    assert found == {a: (1, "1"), b: (1, "1")}


@pytest.mark.integration
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_replication_the_cluster_cannot_meet_is_a_config_error(
    adapter: str, kafka_brokers: str, unique: str
) -> None:
    """Named by variable before anything is created; topics that exist are kept as they are,
    one with fewer replicas than asked is logged once."""
    topic, fresh = f"rf-x-{unique}", f"rf-y-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        async with open_adapter(adapter, kafka_brokers) as log:
            with pytest.raises(ConfigError, match="NIMBUS_KAFKA_REPLICATION_FACTOR"):
                await log.ensure_topics([topic], 1, replication=2)
            with pytest.raises(ConfigError, match="NIMBUS_KAFKA_MIN_INSYNC_REPLICAS"):
                await log.ensure_topics([topic], 1, min_insync=2)
            assert await log.ensure_topics([topic], 1) == {topic: 1}
            lines, sink = warnings_during()
            try:
                assert await log.ensure_topics([topic], 1, replication=3) == {topic: 1}
            finally:
                logger.remove(sink)
            assert len([m for m in lines if repr(topic) in m]) == 1, lines
            with pytest.raises(ConfigError, match="NIMBUS_KAFKA_REPLICATION_FACTOR"):
                await log.ensure_topics([topic, fresh], 1, replication=3)
    found = await trio.to_thread.run_sync(replication_of, kafka_brokers, [topic])
    assert found == {topic: (1, "1")}


@pytest.mark.integration
def test_a_process_asked_for_more_replicas_than_brokers_exits_2(
    kafka_brokers: str, redis_address: str, unique: str
) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {
        **os.environ,
        "NIMBUS_KAFKA_BROKERS": kafka_brokers,
        "NIMBUS_REDIS_ADDRESS": redis_address,
        "NIMBUS_REDIS_PREFIX": f"t-{unique}:",
        "NIMBUS_KAFKA_EVENTS_TOPIC": f"rf-ev-{unique}",
        "NIMBUS_KAFKA_RESULTS_TOPIC": f"rf-res-{unique}",
        "NIMBUS_KAFKA_DLQ_TOPIC": f"rf-dlq-{unique}",
        "NIMBUS_KAFKA_REPLICATION_FACTOR": "2",
    }
    p = subprocess.run(
        [sys.executable, "-m", "nimbus.workers"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert p.returncode == 2, p.stderr
    assert "NIMBUS_KAFKA_REPLICATION_FACTOR" in p.stderr.splitlines()[-1]
