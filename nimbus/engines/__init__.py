"""Engines behind the ports: `memory` (embedded, the test fake) and `real` (Kafka + Redis)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from nimbus.config import Settings
from nimbus.ops import metrics
from nimbus.ports import Log, StateStore


@dataclass
class OpenEngine:
    log: Log
    state: StateStore


@asynccontextmanager
async def open_engine(settings: Settings) -> AsyncIterator[OpenEngine]:
    """The engine the settings name, its calls timed and counted (nimbus.ops.metrics). The real one
    needs a running trio_asyncio loop."""
    if settings.engine == "memory":
        from nimbus.engines.memory import MemoryEngine, MemoryState

        mem = MemoryEngine(state=MemoryState(record_ttl=settings.record_ttl_sec))
        yield OpenEngine(*metrics.instrument(mem.log, mem.state))
        return
    from nimbus.engines.redis import open_redis_state
    from nimbus.engines.redis_cluster import open_redis_cluster_state

    open_log: Callable[..., AbstractAsyncContextManager[Log]]
    if settings.kafka_client == "librdkafka":
        from nimbus.engines.rdkafka import open_rdkafka_log

        open_log = functools.partial(open_rdkafka_log, fetch_wait_ms=settings.kafka_fetch_wait_ms)
    else:
        from nimbus.engines.kafka import open_kafka_log

        open_log = open_kafka_log

    open_state: AbstractAsyncContextManager[StateStore]
    if settings.redis_mode == "cluster":
        open_state = open_redis_cluster_state(
            settings.redis_address,
            prefix=settings.redis_prefix,
            record_ttl_ms=settings.record_ttl_sec * 1000,
            wait_replicas=settings.redis_wait_replicas,
            wait_ms=settings.redis_wait_ms,
        )
    else:
        open_state = open_redis_state(
            settings.redis_address,
            prefix=settings.redis_prefix,
            record_ttl_ms=settings.record_ttl_sec * 1000,
        )
    async with (
        open_log(
            settings.kafka_brokers,
            linger_ms=settings.producer_linger_ms,
            client_id=settings.instance_id,
        ) as log,
        open_state as state,
    ):
        yield OpenEngine(*metrics.instrument(log, state))
