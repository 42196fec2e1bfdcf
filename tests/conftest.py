"""Shared fixtures.

Rules for every test here (after trio-websocket's suite): sockets on 127.0.0.1 with port 0,
`autojump_clock` for anything timed that needs no real I/O, a `fail_after` around every test
that does real I/O. Integration tests (marker `integration`) need the real Kafka and Redis that
`scripts/services.sh up` starts; their addresses come from NIMBUS_TEST_KAFKA_BROKERS and
NIMBUS_TEST_REDIS_ADDRESS. Without them the tests skip, except with CI set, where they fail:
CI must never pass by skipping the real brokers.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from nimbus.wire.grpc import batch_asyncio_callbacks

# Nimbus's processes run trio-asyncio with batched callbacks (nimbus.entry.run_process); the
# in-process clusters here do too.
batch_asyncio_callbacks()


def _reachable(address: str) -> bool:
    host, _, port = address.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _require(var: str) -> str:
    address = os.environ.get(var, "")
    if address and _reachable(address):
        return address
    why = f"{var} is not set" if not address else f"{var}={address} is not reachable"
    if os.environ.get("CI"):
        pytest.fail(f"integration test needs the real broker, but {why} (CI never skips these)")
    pytest.skip(why)


@pytest.fixture
def kafka_brokers() -> str:
    return _require("NIMBUS_TEST_KAFKA_BROKERS")


@pytest.fixture
def redis_address() -> str:
    return _require("NIMBUS_TEST_REDIS_ADDRESS")


@pytest.fixture
def redis_cluster_address() -> str:
    """Seed nodes of a Redis Cluster (scripts/cluster.sh; scripts/test.sh starts it under CI)."""
    return _require("NIMBUS_TEST_REDIS_CLUSTER")


@pytest.fixture
def unique() -> str:
    """A fresh suffix for topic, group, channel and client names, so tests never share state."""
    return uuid.uuid4().hex[:10]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the chaos test last: it SIGKILLs and restarts the shared Kafka broker and redis-server,
    and tests that start right after a broker restart were seen to wait on consumer-group joins."""
    items.sort(
        key=lambda item: item.module is not None and item.module.__name__.endswith("test_chaos")
    )
