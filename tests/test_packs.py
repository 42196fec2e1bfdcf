"""The DLQ's record layouts (nimbus.wire.packs): packs of one client's results, and single results."""

from __future__ import annotations

import pytest

from nimbus.ports import Record
from nimbus.wire import badinput, packs, trace
from nimbus.wire.messages import EventError, KafkaEventResponse, ResultPack


def result(cid: str, did: int, **kw: object) -> KafkaEventResponse:
    r = KafkaEventResponse(
        client_id=cid,
        delivery_id=did,
        kafka_offset=did - 1,
        event_name="sq",
        number=did,
        result=did * did,
        **kw,
    )
    trace.step(r.log, "event-consumer", "w-1", "compute", partition=0, offset=did - 1)
    return r


def rec(cid: str, value: bytes, offset: int = 0) -> Record:
    return Record("dlq", 0, offset, cid.encode(), value)


def test_packs_keep_each_clients_order_and_split_at_the_limit() -> None:
    items = [
        ("a", b"a1", 1),
        ("b", b"b1", 1),
        ("a", b"a2", 2),
        ("a", b"a3", 3),
        ("b", b"b2", 2),
        ("a", b"a4", 4),
    ]
    out = packs.packs(items, 3)
    assert [(cid, ids) for cid, _, ids in out] == [("a", [1, 2, 3]), ("a", [4]), ("b", [1, 2])]
    # A record of one result is the result itself (the original's layout); more are a pack.
    assert out[1][1] == b"a4"
    assert out[0][1] == packs.encode_pack([b"a1", b"a2", b"a3"])


def test_pack_size_one_is_one_record_per_result() -> None:
    items = [("a", b"x%d" % i, i) for i in range(5)]
    assert [(v, ids) for _, v, ids in packs.packs(items, 1)] == [
        (b"x%d" % i, [i]) for i in range(5)
    ]


def test_a_pack_is_closed_before_it_passes_the_byte_limit() -> None:
    big = b"x" * (packs.MAX_PACK_BYTES // 3 + 1)
    out = packs.packs([("a", big, i) for i in range(7)], 100)
    assert [ids for _, _, ids in out] == [[0, 1], [2, 3], [4, 5], [6]]
    assert all(len(v) <= packs.MAX_PACK_BYTES + 16 for _, v, _ in out)


def test_a_composed_pack_reads_back_as_the_built_message() -> None:
    rs = [result("c", i) for i in range(1, 5)]
    rs[2].error.CopyFrom(EventError(code=5, message="boom"))
    value = packs.encode_pack([r.SerializeToString(deterministic=True) for r in rs])
    # A trace step's metadata is a map: its entries' order on the wire is only fixed
    # when both sides serialize deterministically (keys sorted).
    assert value == ResultPack(results=rs).SerializeToString(deterministic=True)
    assert ResultPack.FromString(value) == ResultPack(results=rs)
    assert packs.is_pack(value)
    assert packs.parse_record(rec("c", value)) == rs
    assert packs.decode_record(value) == rs


def test_a_single_result_is_read_as_before() -> None:
    r = result("c", 7)
    assert not packs.is_pack(r.SerializeToString())
    assert packs.parse_record(rec("c", r.SerializeToString())) == [r]
    assert packs.decode_record(r.SerializeToString()) == [r]


@pytest.mark.parametrize(
    "field",
    [
        "event_name",
        "client_id",
        "redis_channel",
        "number",
        "result",
        "kafka_offset",
        "seq",
        "delivery_id",
    ],
)
def test_no_result_encoding_looks_like_a_pack(field: str) -> None:
    # Whatever field a result's encoding starts with (writers put fields in number order, but
    # any may be the first present), its first byte is a tag below 0x80.
    value = (
        2**62
        if field in ("kafka_offset", "seq", "delivery_id")
        else ("\xfa\x7f" if field.endswith(("name", "id", "channel")) else 0x7FFA)
    )
    r = KafkaEventResponse(**{field: value})
    assert not packs.is_pack(r.SerializeToString())


@pytest.mark.parametrize(
    ("results", "key", "reason"),
    [
        ([result("c", 1), result("d", 2)], "c", badinput.KEY_MISMATCH),  # a pack holds one client's
        (
            [result("c", 1), KafkaEventResponse(delivery_id=2, kafka_offset=1)],
            "c",
            badinput.NO_CLIENT_ID,
        ),
        (
            [result("c", 1), KafkaEventResponse(client_id="c", delivery_id=5, kafka_offset=1)],
            "c",
            badinput.BAD_DELIVERY_ID,
        ),
        ([KafkaEventResponse()], "c", badinput.NO_CLIENT_ID),  # a pack of one empty result
    ],
)
def test_a_bad_pack_is_refused_whole(
    results: list[KafkaEventResponse], key: str, reason: str
) -> None:
    value = packs.encode_pack([r.SerializeToString() for r in results])
    with pytest.raises(badinput.BadRecord) as e:
        packs.parse_record(rec(key, value))
    assert e.value.reason == reason


def test_a_pack_with_repeats_is_read_and_fresh_takes_each_result_once() -> None:
    # At-least-once writers: a pack may repeat a result (or a record repeat a pack's); the
    # record is not refused (refusing it would skip the new results in it), readers skip repeats.
    rs = [result("c", i) for i in (3, 5, 5, 4, 7)]
    value = packs.encode_pack([r.SerializeToString() for r in rs])
    assert [r.delivery_id for r in packs.parse_record(rec("c", value))] == [3, 5, 5, 4, 7]
    assert [r.delivery_id for r in packs.fresh(packs.parse_record(rec("c", value)), 0)] == [3, 5, 7]
    assert [r.delivery_id for r in packs.fresh(rs, 5)] == [7]
    assert packs.fresh(rs, 7) == []


def test_overlapping_records_are_taken_once_across_records() -> None:
    # The DLQ of issue #13: offset 10 [1367, 1374, 1382], offset 11 [1382, 1389, 1396].
    first = [result("c", i) for i in (1367, 1374, 1382)]
    second = [result("c", i) for i in (1382, 1389, 1396)]
    taken, out = 0, []
    for pack in (first, second):
        new = packs.fresh(pack, taken)
        out += [r.delivery_id for r in new]
        taken = new[-1].delivery_id if new else taken
    assert out == [1367, 1374, 1382, 1389, 1396]


def test_undecodable_and_oversized_packs_are_refused() -> None:
    with pytest.raises(badinput.BadRecord) as e:
        packs.parse_record(rec("c", packs.PACK_PREFIX + b"\xff\xff\xff"))
    assert e.value.reason == badinput.UNDECODABLE
    assert packs.decode_record(packs.PACK_PREFIX + b"\xff\xff\xff") == []
    huge = (
        packs.encode_pack([result("c", i).SerializeToString() for i in range(1, 3)])
        + b"\x00" * badinput.MAX_RECORD_BYTES
    )
    with pytest.raises(badinput.BadRecord) as e:
        packs.parse_record(rec("c", huge))
    assert e.value.reason == badinput.TOO_LARGE
