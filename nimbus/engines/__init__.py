"""Engines behind the ports: `memory` (embedded, the test fake) and `real` (Kafka + Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from nimbus import metrics
from nimbus.config import Settings
from nimbus.ports import Log, StateStore


@dataclass
class OpenEngine:
    log: Log
    state: StateStore


@asynccontextmanager
async def open_engine(settings: Settings) -> AsyncIterator[OpenEngine]:
    """The engine the settings name, its calls timed and counted (nimbus.metrics). The real one
    needs a running trio_asyncio loop."""
    if settings.engine == "memory":
        from nimbus.engines.memory import MemoryEngine

        mem = MemoryEngine()
        yield OpenEngine(*metrics.instrument(mem.log, mem.state))
        return
    from nimbus.engines.kafka import open_kafka_log
    from nimbus.engines.redis import open_redis_state

    async with (
        open_kafka_log(
            settings.kafka_brokers,
            linger_ms=settings.producer_linger_ms,
            client_id=settings.instance_id,
        ) as log,
        open_redis_state(settings.redis_address, prefix=settings.redis_prefix) as state,
    ):
        yield OpenEngine(*metrics.instrument(log, state))
