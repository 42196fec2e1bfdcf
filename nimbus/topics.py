"""Topic set-up shared by every process: create what is missing, refuse mismatched partitions.
The replication of the topics created follows NIMBUS_KAFKA_REPLICATION_FACTOR /
NIMBUS_KAFKA_MIN_INSYNC_REPLICAS (rules in `nimbus.engines.replication`, applied by the adapters).
"""

from __future__ import annotations

from collections.abc import Sequence

from loguru import logger

from nimbus.config import Settings
from nimbus.ports import Log, TopicMismatch


async def ensure_topics(log: Log, settings: Settings) -> int:
    """Create the three topics if missing; return their common partition count.

    Per-client order rests on a client's events, results and DLQ records sharing one partition
    number, so differing partition counts are refused rather than worked around.
    """
    names: Sequence[str] = list(settings.topics)
    counts = await log.ensure_topics(
        names,
        settings.kafka_partitions,
        replication=settings.kafka_replication_factor,
        min_insync=settings.kafka_min_insync_replicas,
    )
    if len(set(counts.values())) != 1:
        raise TopicMismatch(
            "topics have different partition counts "
            + ", ".join(f"{t}={n}" for t, n in counts.items())
            + "; ordering depends on them being equal (recreate them or fix NIMBUS_KAFKA_PARTITIONS)"
        )
    n = next(iter(counts.values()))
    logger.debug("topics ready: {} ({} partitions each)", ", ".join(counts), n)
    return n
