"""nimbus.wire.pod_channel: each channel message's parser reads what its encoder writes, the payloads
are byte for byte what the roles sent before the module existed, and a payload a parser cannot
read raises ValueError (the status manager counts it as bad input, drops it, and goes on)."""

from __future__ import annotations

import types
from collections.abc import Sequence

import pytest
import trio

from nimbus import config
from nimbus.core.router_window import Entry
from nimbus.engines.memory import MemoryState
from nimbus.ops import metrics
from nimbus.ports import TopicPartition
from nimbus.wire import trace
from nimbus.wire.messages import GAP, EventResponse, KafkaEventResponse, PodMessage
from nimbus.wire.pod_channel import (
    DLQ_WRITES,
    FLIPS,
    REPLAY_REQUESTS,
    STATUS_CHECKS,
    Outgoing,
    dlq_writes,
    flip_message,
    kick_message,
    parse_dlq_writes,
    parse_flip,
    parse_pod_message,
    parse_replay_request,
    parse_status_check,
    pod_messages,
    replay_request,
    reply_channel,
    run_message,
    run_problem,
    status_check,
)
from nimbus.workers.status import StatusManager

IDS = ["c1", "", "ü-ß/\u2028", "tab\tin\tid", "colon:x\t"]


def test_channel_names() -> None:
    assert (REPLAY_REQUESTS, STATUS_CHECKS, FLIPS) == (
        "nimbus:replay-requests",
        "nimbus:status-checks",
        "nimbus:flips",
    )
    assert reply_channel("router", "inst:ab12cd34") == "nimbus:reports:router:inst:ab12cd34"
    assert reply_channel("replay", "w:1") == "nimbus:reports:replay:w:1"


# -- DLQ write notices --------------------------------------------------------------------------


def test_a_dlq_write_notice_names_each_client_once_in_order() -> None:
    ids = [c for c in IDS if c] + ["c1", IDS[2]]
    channel, payload = dlq_writes(ids)
    assert channel == DLQ_WRITES == "nimbus:dlq-writes"
    assert parse_dlq_writes(payload) == [c for c in IDS if c]


def test_a_dlq_write_notice_that_is_not_utf8_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_dlq_writes(b"\xff\xfe")


# -- status checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("cid", IDS)
@pytest.mark.parametrize("ack_ns", [0, 7, 1_733_500_000_123_456_789])
def test_status_check_round_trips(cid: str, ack_ns: int) -> None:
    channel, payload = status_check(cid, ack_ns)
    assert channel == STATUS_CHECKS
    assert payload == f"{cid}\t{ack_ns}".encode()
    assert parse_status_check(payload) == (cid, ack_ns)


def test_a_status_check_without_a_tab_is_a_client_id_alone() -> None:
    assert parse_status_check(b"no-tab-here") == ("no-tab-here", 0)
    assert parse_status_check(b"") == ("", 0)


@pytest.mark.parametrize(
    "payload", [b"\xff\xfe", b"c1\xff\t5", b"a\tb\tnot-a-number", b"c1\t", b"c1\t1.5"]
)
def test_a_status_check_that_cannot_be_read_raises_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_status_check(payload)


# -- flips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cid", IDS)
@pytest.mark.parametrize("ack_ns", [0, 1_733_500_000_123_456_789])
def test_flip_round_trips(cid: str, ack_ns: int) -> None:
    channel, payload = flip_message(cid, ack_ns, 1_733_500_000_200_000_000)
    assert channel == FLIPS
    assert payload == f"{cid}\t{ack_ns}\t1733500000200000000".encode()
    assert parse_flip(payload) == (cid, ack_ns, 1_733_500_000_200_000_000)


def test_a_flip_with_an_empty_last_ack_reads_zero() -> None:
    assert parse_flip(b"c1\t\t5") == ("c1", 0, 5)


@pytest.mark.parametrize(
    "payload", [b"\xff\t1\t2", b"c1", b"c1\t5", b"c1\tx\t5", b"c1\t5\t", b"c1\t5\tnow", b""]
)
def test_a_flip_that_cannot_be_read_raises_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_flip(payload)


# -- replay requests, kicks, deliveries ----------------------------------------------------------


@pytest.mark.parametrize("cid", IDS)
def test_replay_request_round_trips(cid: str) -> None:
    channel, payload = replay_request(cid)
    assert (channel, payload) == (REPLAY_REQUESTS, cid.encode())
    assert parse_replay_request(payload) == cid


def test_a_replay_request_that_is_not_utf8_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_replay_request(b"\xff\xfe")


def test_kick_message_is_the_built_pod_message() -> None:
    want = PodMessage()
    want.kicks.add(client_id="c1", epoch=7)
    assert kick_message("c1", 7) == want.SerializeToString()
    msg = parse_pod_message(kick_message("c1", 7))
    assert [(k.client_id, k.epoch) for k in msg.kicks] == [("c1", 7)] and not msg.deliveries


def test_a_pod_message_that_cannot_be_read_raises() -> None:
    with pytest.raises(Exception):  # noqa: B017 (protobuf's DecodeError; the pod catches any)
        parse_pod_message(b"\xff\xff not a pod message")


def _result(n: int) -> KafkaEventResponse:
    r = KafkaEventResponse(event_name="sq", number=n, result=n * n, client_id="c1", delivery_id=n)
    trace.step(r.log, "event-consumer", "w", "process")
    return r


def test_an_outgoing_is_sent_as_the_window_entry_it_replaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replay's single deliveries (an Outgoing) are the bytes it sent before, when it built
    the router's Entry (with a made-up partition) for them."""
    clock = types.SimpleNamespace(time_ns=lambda: 1_700_000_000_000_000_005)
    monkeypatch.setattr(trace, "time", clock)  # the trace steps' timestamps: one instant
    gap = EventResponse(kind=GAP, delivery_id=20, gap_from=9, gap_to=20)
    for payload in (_result(5), gap):
        one = Outgoing("pod-a", "c1", 4, payload.delivery_id, 77, 3, payload)
        entry = Entry(
            TopicPartition("", 0),
            12,
            "c1",
            payload.delivery_id,
            payload,
            token=77,
            pod="pod-a",
            epoch=4,
            prev=3,
        )
        for method in ("route", "replay"):
            assert pod_messages("r", [one], "i", method) == pod_messages("r", [entry], "i", method)


def test_run_problem() -> None:
    _, payload = run_message("r", "pod-a", "c1", 4, 77, 0, [_result(n) for n in (1, 2, 3)], "i")
    [d] = parse_pod_message(payload).deliveries
    assert run_problem(d) == ""
    d.run_logs.pop()
    assert run_problem(d) == "run of c1: 3 ids, 3 heads, 2 logs"
    d.run_logs.append(b"")
    d.delivery_id = 2
    assert run_problem(d) == "run of c1: 3 ids, 3 heads, 3 logs"


# -- the status manager reading them -------------------------------------------------------------


class _FlipsAll(MemoryState):
    """Every client asked about flips (and is noted)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def try_flip(self, client_ids: Sequence[str]) -> list[bool]:
        await trio.lowlevel.checkpoint()
        self.asked += client_ids
        return [True] * len(client_ids)


def _bad_status_checks() -> float:
    return sum(
        s.value
        for m in metrics.BAD_INPUT.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("where") == "status checks"
    )


async def test_the_status_manager_drops_checks_it_cannot_read_and_flips_the_others() -> None:
    s = config.load(env={"NIMBUS_STATUS_INTERVAL_MS": "600000"}, dotenv=False)
    state = _FlipsAll()
    before = _bad_status_checks()
    flips: list[tuple[str, int, int]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, state.subscribe(FLIPS) as sub:
            await nursery.start(StatusManager(s, state).run)
            await state.publish(
                [
                    (STATUS_CHECKS, b"\xff\xfe"),
                    (STATUS_CHECKS, b"a\tb\tnot-a-number"),
                    status_check("c1", 5),
                    (STATUS_CHECKS, b"no-tab-here"),
                    status_check("tab\tin\tid", 0),
                ]
            )
            async for payload in sub:
                flips.append(parse_flip(payload))
                if len(flips) == 3:
                    break
            nursery.cancel_scope.cancel()
    assert _bad_status_checks() - before == 2
    assert sorted(state.asked) == ["c1", "no-tab-here", "tab\tin\tid"]
    assert sorted((cid, ack) for cid, ack, _ in flips) == [
        ("c1", 5),
        ("no-tab-here", 0),
        ("tab\tin\tid", 0),
    ]
    assert all(flip_ns > 0 for *_, flip_ns in flips)
