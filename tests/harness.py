"""An in-process Nimbus cluster for tests: workers plus N doorman pods on one engine.

The same scenarios run on the in-memory engine (always) and on the real Kafka + Redis
(integration), by choosing the engine when the cluster opens. Needs a running trio_asyncio loop.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
import trio

from nimbus import config
from nimbus.config import Settings
from nimbus.doorman import startup
from nimbus.doorman.server import run_server
from nimbus.engines import OpenEngine, open_engine
from nimbus.ops.stats import Counters
from nimbus.topics import ensure_topics
from nimbus.workers.run import ROLES, run_workers


def doorman_settings(env: dict[str, str], *, dotenv: bool = False) -> Settings:
    """Settings as a doorman process takes them: `config.load`, then its start-up checks."""
    s = config.load(env=env, dotenv=dotenv)
    startup.check(s)
    return s


@dataclass
class Cluster:
    settings: Settings
    engine: OpenEngine
    nursery: trio.Nursery
    ports: list[int] = field(default_factory=list)
    pod_scopes: list[trio.CancelScope] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)

    async def add_pod(self, name: str | None = None) -> int:
        """Start one more doorman pod; returns its port."""
        i = len(self.ports)
        s = config.load(
            env={},
            dotenv=False,
            **{
                **_fields(self.settings),
                "redis_events_channel": name or f"{self.settings.redis_events_channel}-pod{i}",
                "port": 0,
            },
        )
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_server(s, self.engine.log, self.engine.state, task_status=task_status)

        port: int = await self.nursery.start(run)
        self.ports.append(port)
        self.pod_scopes.append(scope)
        return port

    def stop_pod(self, i: int) -> None:
        self.pod_scopes[i].cancel()


def real_engine(
    kafka_brokers: str, redis_address: str, unique: str, partitions: int = 4
) -> dict[str, Any]:
    """open_cluster keywords for the real brokers, on topics and a Redis namespace of this test.
    The Kafka client library is NIMBUS_TEST_KAFKA_CLIENT's (kafka-python by default), so a whole
    run can go through librdkafka: `NIMBUS_TEST_KAFKA_CLIENT=librdkafka`."""
    return {
        "engine": "real",
        "kafka_client": os.environ.get("NIMBUS_TEST_KAFKA_CLIENT", "kafka-python"),
        "kafka_brokers": kafka_brokers,
        "redis_address": redis_address,
        "kafka_events_topic": f"events-{unique}",
        "kafka_results_topic": f"results-{unique}",
        "kafka_dlq_topic": f"dlq-{unique}",
        "kafka_partitions": partitions,
        "redis_events_channel": f"pod-{unique}",
        "redis_prefix": f"t-{unique}:",
    }


def real_env(kafka_brokers: str, redis_address: str, unique: str, **extra: str) -> dict[str, str]:
    """The environment of a Nimbus process on the real brokers, on topics and a Redis namespace
    of this test (this process's environment, then these, then `extra`: NIMBUS_* values). The
    Kafka client library is NIMBUS_TEST_KAFKA_CLIENT's, as in `open_cluster`."""
    return {
        **os.environ,
        "NIMBUS_ENGINE": "real",
        "NIMBUS_KAFKA_CLIENT": os.environ.get("NIMBUS_TEST_KAFKA_CLIENT", "kafka-python"),
        "NIMBUS_KAFKA_BROKERS": kafka_brokers,
        "NIMBUS_REDIS_ADDRESS": redis_address,
        "NIMBUS_KAFKA_EVENTS_TOPIC": f"events-{unique}",
        "NIMBUS_KAFKA_RESULTS_TOPIC": f"results-{unique}",
        "NIMBUS_KAFKA_DLQ_TOPIC": f"dlq-{unique}",
        "NIMBUS_REDIS_PREFIX": f"t-{unique}:",
        **extra,
    }


def record_thread_calls(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[str]:
    """From now on, the name of each function a Kafka adapter `module` (nimbus.engines.kafka or
    .rdkafka) runs in a worker thread (its `in_thread`), in order."""
    calls: list[str] = []
    real = module.in_thread

    async def recording(fn: Any, *args: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args)

    monkeypatch.setattr(module, "in_thread", recording)
    return calls


def _fields(s: Settings) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


@asynccontextmanager
async def open_cluster(
    *, pods: int = 1, engine: str = "memory", roles: tuple[str, ...] = ROLES, **overrides: Any
) -> AsyncIterator[Cluster]:
    settings = config.load(
        env={}, dotenv=False, engine=engine, port=0, host="127.0.0.1", **overrides
    )
    async with open_engine(settings) as eng, trio.open_nursery() as nursery:
        await ensure_topics(eng.log, settings)
        c = Cluster(settings, eng, nursery)
        if roles:
            await nursery.start(run_workers, settings, eng.log, eng.state, roles, c.counters)
        for _ in range(pods):
            await c.add_pod()
        try:
            yield c
        finally:
            nursery.cancel_scope.cancel()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
