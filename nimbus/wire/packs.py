"""Result records on the results and DLQ topics: one result per record, or a pack of one
client's results.

Through kafka-python a record costs more than the result in it: ~19 µs to produce and ~13 µs to
read back per record, against ~1-3 µs to encode or decode a 290-byte result. So the event
consumer writes a client's results of one poll batch to the results topic, and the result router
a client's diverted results of one batch to the DLQ, as packs (`ResultPack`) of up to
`NIMBUS_RESULTS_PACK` / `NIMBUS_DLQ_PACK` results per record. Set to 1, they write the original's
layout: one `KafkaEventResponse` per record.

Readers (the router, the replay, `nimbus.admin`) accept both layouts in any mix (a topic keeps
what older writers wrote). A pack's encoding starts with the bytes FA 7F (its field 2047); a
result's never does (its fields are numbered below 16, so its first byte is below 0x80). A pack
holds results of the client in its key only, in delivery order; its results share its offset.

Both topics are at-least-once logs: a writer killed after its write and before its commit writes
the same results again when it (or its successor) re-reads its input, so a client's results can
repeat across records and across packs (DLQ `[1367, 1374, 1382]` then `[1382, 1389, ...]`).
Every reader takes a client's results through `fresh`: a result whose delivery id is not above
the highest one it has already taken is skipped, never passed on.

Pure functions; the writers and readers do the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from nimbus.ports import Record
from nimbus.wire import badinput
from nimbus.wire.messages import KafkaEventResponse, ResultPack, varint

PACK_PREFIX = b"\xfa\x7f"  # the tag of ResultPack.results (2047, length-delimited) as a varint
_PACK_TAG_LEN = len(PACK_PREFIX)
MAX_PACK_BYTES = badinput.MAX_RECORD_BYTES // 2  # a pack is closed before it passes this

T = TypeVar("T")


def is_pack(value: bytes) -> bool:
    return value[:_PACK_TAG_LEN] == PACK_PREFIX


def encode_pack(results: Sequence[bytes]) -> bytes:
    """A ResultPack of encoded results (KafkaEventResponse encodings), composed on the wire."""
    return b"".join(PACK_PREFIX + varint(len(r)) + r for r in results)


def packs(
    items: Sequence[tuple[str, bytes, T]], max_results: int
) -> list[tuple[str, bytes, list[T]]]:
    """Records to write for `items` = (client id, encoded result, tag) in routing order: for each
    client, its results in their order, in records of at most `max_results` results (and about
    MAX_PACK_BYTES); a record of one result is the result itself (the original's layout).
    Returns (client id, record value, the tags of the results in it), each client's records in
    order; records of different clients in the order of their first result."""
    by_client: dict[str, list[list[tuple[bytes, T]]]] = {}
    size: dict[str, int] = {}  # bytes in each client's last group
    for cid, value, tag in items:
        groups = by_client.get(cid)
        if groups is None:
            groups = by_client[cid] = [[]]
            size[cid] = 0
        group = groups[-1]
        if group and (len(group) >= max_results or size[cid] + len(value) > MAX_PACK_BYTES):
            group = []
            groups.append(group)
            size[cid] = 0
        group.append((value, tag))
        size[cid] += len(value)
    out: list[tuple[str, bytes, list[T]]] = []
    for cid, groups in by_client.items():
        for group in groups:
            if len(group) == 1:
                value = group[0][0]
            else:
                value = encode_pack([v for v, _ in group])
            out.append((cid, value, [t for _, t in group]))
    return out


def parse_result(rec: Record) -> KafkaEventResponse:
    """A record holding one result; raises BadRecord if it is not one we can route. The event
    consumer keys each result by its client id and sets delivery_id = kafka_offset + 1: a record
    that breaks either would be routed out of its client's order, so it is refused."""
    r = badinput.decode_keyed(rec, KafkaEventResponse)
    check_result(r)
    return r


def check_result(r: KafkaEventResponse) -> None:
    """Raises BadRecord if the result's delivery id breaks the rule above."""
    if not 0 < r.delivery_id <= badinput.MAX_DELIVERY_ID or r.delivery_id != r.kafka_offset + 1:
        raise badinput.BadRecord(badinput.BAD_DELIVERY_ID)


def parse_record(rec: Record) -> list[KafkaEventResponse]:
    """The results in a results or DLQ record, as written (one for the original's layout), each
    checked as `parse_result` checks a result; raises BadRecord if the record or any result in
    it is not one we can route (a pack is written whole, so a bad part spoils it all). Repeated
    delivery ids are not refused here (see `fresh`)."""
    if not is_pack(rec.value or b""):
        return [parse_result(rec)]
    if len(rec.value) > badinput.MAX_RECORD_BYTES:
        raise badinput.BadRecord(badinput.TOO_LARGE)
    try:
        pack = ResultPack.FromString(rec.value)
    except Exception:
        raise badinput.BadRecord(badinput.UNDECODABLE) from None
    results = list(pack.results)
    if not results:
        raise badinput.BadRecord(badinput.UNDECODABLE)
    for r in results:
        badinput.check_keyed(rec.key, r)
        check_result(r)
    return results


def fresh(results: Sequence[KafkaEventResponse], taken: int) -> list[KafkaEventResponse]:
    """The results of one client (in the order read) whose delivery id is above `taken`, the
    highest one already taken, and above every earlier one here: what a reader of an
    at-least-once log passes on. A writer's repeat (the same ids again, in a later record or in
    the same pack) is skipped; the result is strictly increasing."""
    out: list[KafkaEventResponse] = []
    for r in results:
        if r.delivery_id > taken:
            out.append(r)
            taken = r.delivery_id
    return out


def decode_record(value: bytes) -> list[KafkaEventResponse]:
    """The results in a record value without checks ([] if undecodable): read-only tools."""
    try:
        if is_pack(value):
            return list(ResultPack.FromString(value).results)
        return [KafkaEventResponse.FromString(value)]
    except Exception:
        return []
