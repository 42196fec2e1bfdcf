"""nimbus.wire.pod_channel.pod_messages composes PodMessages on the wire; a parser must read exactly
the message the plain protobuf construction gives (trace timestamps aside). The replay's runs
(run_message): what the pod makes of them."""

from __future__ import annotations

from nimbus import config
from nimbus.core.router_window import Entry
from nimbus.doorman.pod import Outbox, Pod, Session
from nimbus.engines.memory import MemoryLog, MemoryState
from nimbus.ports import TopicPartition
from nimbus.wire import trace
from nimbus.wire.messages import (
    GAP,
    RESULT,
    EventError,
    EventResponse,
    KafkaEventResponse,
    PodMessage,
    response_with_log,
)
from nimbus.wire.pod_channel import pod_messages, run_message

TP = TopicPartition("results", 3)


def _result(n: int, *, error: bool = False, steps: int = 3) -> KafkaEventResponse:
    r = KafkaEventResponse(
        event_name="sq", number=n, result=n * n, client_id=f"c{n % 2}", redis_channel="nimbus:pod:x",
        kafka_offset=n - 1, delivery_id=n, seq=n + 7,
    )  # fmt: skip
    if error:
        r.error.CopyFrom(EventError(code=5, message="handler failed " + "x" * 200))
    for i in range(steps):
        trace.step(r.log, f"service{i}", "instance-1", "method", pod="p", long="y" * 150)
    return r


def _expected(
    reply_to: str, entries: list[Entry], instance: str, service: str, method: str
) -> dict[str, PodMessage]:
    """The plain construction (what pod_messages did before it composed bytes)."""
    out: dict[str, PodMessage] = {}
    for e in entries:
        msg = out.setdefault(e.pod, PodMessage(reply_to=reply_to))
        d = msg.deliveries.add(
            client_id=e.client_id,
            epoch=e.epoch,
            delivery_id=e.delivery_id,
            token=e.token,
            prev_delivery_id=e.prev,
        )
        r = e.payload
        if isinstance(r, EventResponse):
            d.response.CopyFrom(r)
        else:
            d.response.CopyFrom(
                EventResponse(
                    event_name=r.event_name,
                    number=r.number,
                    result=r.result,
                    delivery_id=r.delivery_id,
                    kind=RESULT,
                    seq=r.seq,
                )
            )
            d.response.log.CopyFrom(r.log)
            if r.HasField("error"):
                d.response.error.CopyFrom(r.error)
        trace.step(d.response.log, service, instance, method, pod=e.pod)
    return out


def _without_times(msg: PodMessage) -> PodMessage:
    for d in msg.deliveries:
        for s in d.response.log.steps:
            s.ClearField("timestamp")
    return msg


def test_pod_messages_parse_as_the_built_messages() -> None:
    entries = [
        Entry(TP, n, f"c{n % 2}", n, _result(n, error=n == 3, steps=n % 4), token=100 + n,
              pod="pod-a" if n % 3 else "pod-b", epoch=n, prev=n - 1)
        for n in range(1, 9)
    ]  # fmt: skip
    gap = EventResponse(kind=GAP, delivery_id=20, gap_from=9, gap_to=20)
    entries.append(
        Entry(TopicPartition("", 0), 30, "c0", 20, gap, token=999, pod="pod-a", epoch=4, prev=8)
    )
    for method, service in (("route", "result-router"), ("replay", "replay")):
        got = dict(pod_messages("nimbus:reports:x", entries, "inst-9", method))
        want = _expected("nimbus:reports:x", entries, "inst-9", service, method)
        assert set(got) == set(want) == {"pod-a", "pod-b"}
        for pod, payload in got.items():
            msg = PodMessage.FromString(payload)
            assert all(
                s.timestamp.seconds > 0 for d in msg.deliveries for s in d.response.log.steps[-1:]
            )
            assert _without_times(msg) == _without_times(want[pod])


def test_long_fields_take_multi_byte_lengths() -> None:
    r = _result(5, steps=40)  # a log of several KB: lengths of two and more varint bytes
    e = Entry(TP, 4, "c1", 5, r, token=1, pod="p", epoch=1, prev=0)
    [(pod, payload)] = pod_messages("reply", [e], "inst", "route")
    d = PodMessage.FromString(payload).deliveries[0]
    assert len(payload) > 5000 and pod == "p"
    assert [s.service_name for s in d.response.log.steps] == [f"service{i}" for i in range(40)] + [
        "result-router"
    ]


# -- runs (nimbus.wire.pod_channel.run_message, the replay's deliveries; nimbus.doorman.pod._deliver_run) ----


def _pod(protocol: int = 2, acked: int = 0) -> tuple[Pod, Session]:
    settings = config.load(env={}, dotenv=False, instance_id="pod-inst")
    pod = Pod(settings, MemoryLog(), MemoryState())
    s = Session("c1", protocol, Outbox(100), 1, epoch=4, acked=acked)
    pod.sessions["c1"] = s
    return pod, s


def _queued(s: Session) -> list[tuple[int, EventResponse]]:
    out = []
    while not s.outbox.empty():
        item = s.outbox.get_nowait()
        assert isinstance(item, tuple)
        did, resp = item
        out.append(
            (did, resp if isinstance(resp, EventResponse) else EventResponse.FromString(resp))
        )
    return out


def test_a_run_reads_as_one_delivery_of_each_result() -> None:
    results = [_result(n, error=n == 3, steps=n % 4) for n in (2, 3, 5)]
    pod, payload = run_message("reply", "pod-a", "c1", 4, 77, 1, results, "inst-9")
    msg = PodMessage.FromString(payload)
    assert pod == "pod-a" and msg.reply_to == "reply" and len(msg.deliveries) == 1
    d = msg.deliveries[0]
    assert (d.client_id, d.epoch, d.token, d.prev_delivery_id, d.delivery_id) == ("c1", 4, 77, 1, 5)
    assert list(d.run_ids) == [2, 3, 5]
    # Each head and log put together is the response pod_messages would have sent for it.
    entries = [
        Entry(TP, r.kafka_offset, "c1", r.delivery_id, r, token=77, pod="pod-a", epoch=4)
        for r in results
    ]
    want = _without_times(_expected("reply", entries, "inst-9", "replay", "replay")["pod-a"])
    for head, log, w in zip(d.run_heads, d.run_logs, want.deliveries, strict=True):
        got = EventResponse.FromString(response_with_log(head, log))
        for st in got.log.steps:
            st.ClearField("timestamp")
        assert got == w.response


async def test_the_pod_queues_a_run_in_order_and_confirms_it_once_acked_whole() -> None:
    pod, s = _pod(acked=2)  # result 2 is already acked: not sent again
    results = [_result(n) for n in (2, 3, 5)]
    _, payload = run_message("reply", "pod-a", "c1", 4, 77, 0, results, "inst-9")
    await pod._on_message(payload)
    got = _queued(s)
    assert [did for did, _ in got] == [3, 5]
    assert [(r.number, r.result, r.delivery_id) for _, r in got] == [(3, 9, 3), (5, 25, 5)]
    assert [st.service_name for st in got[0][1].log.steps] == [
        "service0",
        "service1",
        "service2",
        "replay",
        "server",
    ]
    assert s.unconfirmed == [(5, "reply", 77)] and s.last_queued == 5
    pod.on_ack(s, 3)
    assert not pod._reports.get("reply")  # part of the run: not confirmed yet
    pod.on_ack(s, 5)
    assert [(i.token, i.delivered, i.delivery_id) for i in pod._reports["reply"]] == [(77, True, 5)]


async def test_a_run_to_an_original_client_carries_only_the_original_fields() -> None:
    pod, s = _pod(protocol=1)
    _, payload = run_message(
        "reply", "pod-a", "c1", 4, 8, 0, [_result(n) for n in (1, 2)], "inst-9"
    )
    await pod._on_message(payload)
    got = _queued(s)
    assert [(did, r.number, r.result, r.delivery_id, r.seq) for did, r in got] == [
        (1, 1, 1, 0, 0),
        (2, 2, 4, 0, 0),
    ]
    assert got[0][1].log.steps[-1].service_name == "server"


async def test_a_run_that_cannot_be_read_is_refused_with_its_reason() -> None:
    pod, s = _pod()
    _, payload = run_message(
        "reply", "pod-a", "c1", 4, 9, 0, [_result(n) for n in (1, 2)], "inst-9"
    )
    msg = PodMessage.FromString(payload)
    del msg.deliveries[0].run_heads[1]  # two ids, one head
    await pod._on_message(msg.SerializeToString())
    assert _queued(s) == [] and s.unconfirmed == []
    items = pod._reports["reply"]
    assert [(i.token, i.delivered) for i in items] == [(9, False)]
    assert "2 ids, 1 heads" in items[0].refused  # the sender must change what it sends


async def test_a_run_holding_a_result_twice_is_delivered_once_each() -> None:
    # Issue #13: the DLQ held 1382 in two packs; a run spanning them held it twice and the pod
    # refused the run, for ever. A repeat is skipped like an acked result.
    pod, s = _pod()
    _, payload = run_message(
        "reply", "pod-a", "c1", 4, 9, 0, [_result(n) for n in (1, 3, 3, 2, 4)], "inst-9"
    )
    await pod._on_message(payload)
    assert [did for did, _ in _queued(s)] == [1, 3, 4]
    assert s.unconfirmed == [(4, "reply", 9)] and not pod._reports.get("reply")


async def test_a_delivery_already_queued_on_the_stream_is_not_queued_again() -> None:
    # A replay resending after a lost report, or a result written twice: confirmed with the
    # ack that covers it.
    pod, s = _pod()
    _, payload = run_message(
        "reply", "pod-a", "c1", 4, 9, 0, [_result(n) for n in (1, 2, 3)], "inst-9"
    )
    await pod._on_message(payload)
    _, again = run_message("reply", "pod-a", "c1", 4, 10, 0, [_result(n) for n in (2, 3, 4)], "x")
    await pod._on_message(again)
    single = pod_messages(
        "reply",
        [Entry(TP, 0, "c1", 3, _result(3), token=11, pod="pod-a", epoch=4)],
        "x",
        "route",
    )
    await pod._on_message(single[0][1])
    assert [did for did, _ in _queued(s)] == [1, 2, 3, 4]
    pod.on_ack(s, 4)
    assert sorted((i.token, i.delivered) for i in pod._reports["reply"]) == [
        (9, True),
        (10, True),
        (11, True),
    ]
