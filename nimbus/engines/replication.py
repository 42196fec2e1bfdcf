"""The replication of the topics Nimbus creates (NIMBUS_KAFKA_REPLICATION_FACTOR,
NIMBUS_KAFKA_MIN_INSYNC_REPLICAS), applied by both Kafka adapters against the brokers the cluster
reports: `auto` is what an operator would choose, a replication factor of 3 with
min.insync.replicas 2 on a cluster of 3 brokers or more (an acks=all write is on 2 brokers before
it is acknowledged, and writes go on while one broker is down), 1 and 1 on a single node. Pure,
beside the adapters (below the ports), so they do not import the processes' set-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loguru import logger

from nimbus.config import ConfigError
from nimbus.engines.kafka_common import missing_topics

AUTO_REPLICATION_FACTOR = 3  # at most; fewer when the cluster reports fewer brokers


def replication_factor(asked: int | None, brokers: int) -> int:
    """The replication factor asked for: `asked`, or for auto (None) 3, or the number of brokers
    the cluster reports if fewer (at least 1)."""
    if asked is not None:
        return asked
    return max(1, min(AUTO_REPLICATION_FACTOR, brokers))


def min_insync_replicas(asked: int | None, replication: int) -> int:
    """The min.insync.replicas of a topic with `replication` replicas: `asked`, or for auto (None)
    2 when it has 3 replicas or more, else 1. ConfigError (naming the variable) above
    `replication`: such a topic would refuse every acks=all write."""
    isr = asked if asked is not None else (2 if replication >= 3 else 1)
    if isr > replication:
        raise ConfigError(
            f"invalid NIMBUS_KAFKA_MIN_INSYNC_REPLICAS: {isr} is above the replication factor of "
            f"the topics to create ({replication}, NIMBUS_KAFKA_REPLICATION_FACTOR); no write "
            "could ever be acknowledged"
        )
    return isr


def creation_plan(replication: int | None, min_insync: int | None, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of topics created on a cluster that reports
    `brokers` brokers; ConfigError naming the variable when the cluster cannot meet them."""
    rf = replication_factor(replication, brokers)
    if rf > brokers:
        raise ConfigError(
            f"invalid NIMBUS_KAFKA_REPLICATION_FACTOR: {rf}, but the cluster reports "
            f"{brokers} broker(s); a topic cannot have more replicas than brokers"
        )
    return rf, min_insync_replicas(min_insync, rf)


def warn_under_replicated(existing: Mapping[str, int], asked: int) -> list[str]:
    """Log one warning per existing topic (name: its replication factor) with fewer replicas
    than `asked`; return their names. Existing topics are never changed."""
    low = [t for t, rf in existing.items() if rf < asked]
    for t in low:
        logger.warning(
            "topic {!r} has replication factor {}, below the {} asked "
            "(NIMBUS_KAFKA_REPLICATION_FACTOR); existing topics are not changed: raise it with a "
            "partition reassignment (kafka-reassign-partitions.sh)",
            t,
            existing[t],
            asked,
        )
    return low


def plan(
    names: Iterable[str],
    existing: Mapping[str, int],
    brokers: int,
    replication: int | None,
    min_insync: int | None,
) -> tuple[list[str], int, int]:
    """What an adapter's `ensure_topics` creates, given the existing topics among `names` (name:
    its replication factor) on a cluster of `brokers`: (the missing names, their replication
    factor, their min.insync.replicas). Warns of existing topics below the factor asked."""
    warn_under_replicated(existing, replication_factor(replication, brokers))
    missing = missing_topics(names, existing)
    if not missing:
        return missing, 0, 0
    return (missing, *creation_plan(replication, min_insync, brokers))
