"""Bad input: what every decode site does with something it cannot use.

A malformed topic record, channel message or client message is logged (loguru, with where it was
seen: topic/partition/offset for a record), counted (`nimbus_bad_input_total{where,reason}`) and
skipped; the caller then goes on, and a consumer commits past the record like any other, so one
poison record never stalls a partition. Reasons come from the small fixed set below, so the
metric's labels stay bounded whatever the input.

Log lines carry `extra["bad_input"] = where` (and topic/partition/offset for records), so tests
and JSON logs can pick them out.
"""

from __future__ import annotations

from typing import Any, TypeVar

from loguru import logger

from nimbus.ops import metrics
from nimbus.ports import Record

# A record larger than any Nimbus writes: a pod's event is a known event name, a client id within
# HTTP/2's 64 KiB header-list limit and one trace step; a result or DLQ record adds a few steps.
# A bigger one is refused: its result (or DLQ copy, one step larger) could exceed Kafka's message
# limit, and a produce that can never succeed would stall its consumer for good.
MAX_RECORD_BYTES = 512 * 1024

# Delivery ids are events-topic offsets + 1; the Redis scripts hold them in Lua numbers (doubles),
# exact up to 2**53. An ack or a record beyond that is not a delivery id (an ack of 2**64 - 1 was
# stored as -2**63 on Redis, while the memory engine kept it).
MAX_DELIVERY_ID = 2**53 - 1

# Reasons (the `reason` label).
BAD_ACK = "bad ack"
TOO_LARGE = "too large"
UNDECODABLE = "undecodable"  # not a protobuf message of the expected type
NO_CLIENT_ID = "no client id"
KEY_MISMATCH = "key mismatch"  # the record's key is not its client id (wrong partition)
BAD_DELIVERY_ID = "bad delivery id"  # missing, or not the originating event's offset + 1
BAD_METADATA = "bad metadata"  # gRPC metadata the server refuses (e.g. a non-printable client_id)
MALFORMED_MESSAGE = "malformed message"  # a gRPC message that could not be framed or decoded
PROTOCOL_ERROR = "protocol error"  # a connection grpclib/h2 could not parse (closed)


M = TypeVar("M", bound=Any)  # a generated protobuf message class


class BadRecord(Exception):
    """Raised by a record decoder; `reason` is one of the reasons above."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_keyed(rec: Record, cls: type[M]) -> M:
    """A topic record's message of type `cls` (a protobuf class with `client_id`), checked as every
    consumer needs it: not oversized, decodable, naming a client, keyed by that client's id (the
    key decides the partition, hence the order). Raises BadRecord otherwise."""
    if len(rec.value or b"") > MAX_RECORD_BYTES:
        raise BadRecord(TOO_LARGE)
    try:
        msg: M = cls.FromString(rec.value)
    except Exception:
        raise BadRecord(UNDECODABLE) from None
    check_keyed(rec.key, msg)
    return msg


def check_keyed(key: bytes | None, msg: Any) -> None:
    """Raises BadRecord unless `msg` names a client and `key` is that client's id."""
    if not msg.client_id:
        raise BadRecord(NO_CLIENT_ID)
    if key != msg.client_id.encode():
        raise BadRecord(KEY_MISMATCH)


def _preview(data: bytes | None, n: int = 32) -> str:
    if data is None:
        return "None"
    return repr(data[:n]) + ("..." if len(data) > n else "")


def record(where: str, reason: str, rec: Record) -> None:
    """A topic record that is skipped (and committed past)."""
    metrics.bad_input(where, reason)
    logger.bind(
        bad_input=where, topic=rec.topic, partition=rec.partition, offset=rec.offset
    ).warning(
        "bad input: skipping {} record {}:{}@{} ({}; key {}, {} bytes)",
        where,
        rec.topic,
        rec.partition,
        rec.offset,
        reason,
        _preview(rec.key),
        len(rec.value or b""),
    )


def message(where: str, reason: str, detail: str = "") -> None:
    """A channel message, gRPC message or metadata value that is refused."""
    metrics.bad_input(where, reason)
    logger.bind(bad_input=where).warning(
        "bad input: {} refused ({}){}", where, reason, f": {detail}" if detail else ""
    )
