"""Topic set-up shared by every process: create what is missing, refuse mismatched partitions."""

from __future__ import annotations

from loguru import logger

from nimbus.config import Settings
from nimbus.ports import Log, TopicMismatch


async def ensure_topics(log: Log, settings: Settings) -> int:
    """Create the three topics if missing; return their common partition count.

    Per-client order rests on a client's events, results and DLQ records sharing one partition
    number, so differing partition counts are refused rather than worked around.
    """
    counts = await log.ensure_topics(list(settings.topics), settings.kafka_partitions)
    if len(set(counts.values())) != 1:
        raise TopicMismatch(
            "topics have different partition counts "
            + ", ".join(f"{t}={n}" for t, n in counts.items())
            + "; ordering depends on them being equal (recreate them or fix NIMBUS_KAFKA_PARTITIONS)"
        )
    n = next(iter(counts.values()))
    logger.debug("topics ready: {} ({} partitions each)", ", ".join(counts), n)
    return n
