"""nimbus.router.pod_messages composes PodMessages on the wire; a parser must read exactly the
message the plain protobuf construction gives (trace timestamps aside)."""

from __future__ import annotations

from nimbus import trace
from nimbus.messages import GAP, RESULT, EventError, EventResponse, KafkaEventResponse, PodMessage
from nimbus.ports import TopicPartition
from nimbus.router import pod_messages
from nimbus.router_window import Entry

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


def _expected(reply_to: str, entries: list[Entry], instance: str, service: str, method: str) -> dict[str, PodMessage]:
    """The plain construction (what pod_messages did before it composed bytes)."""
    out: dict[str, PodMessage] = {}
    for e in entries:
        msg = out.setdefault(e.pod, PodMessage(reply_to=reply_to))
        d = msg.deliveries.add(
            client_id=e.client_id, epoch=e.epoch, delivery_id=e.delivery_id, token=e.token, prev_delivery_id=e.prev
        )
        r = e.payload
        if isinstance(r, EventResponse):
            d.response.CopyFrom(r)
        else:
            d.response.CopyFrom(
                EventResponse(event_name=r.event_name, number=r.number, result=r.result, delivery_id=r.delivery_id, kind=RESULT, seq=r.seq)
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
    entries.append(Entry(TopicPartition("", 0), 30, "c0", 20, gap, token=999, pod="pod-a", epoch=4, prev=8))
    for method, service in (("route", "result-router"), ("replay", "replay")):
        got = dict(pod_messages("nimbus:reports:x", entries, "inst-9", method))
        want = _expected("nimbus:reports:x", entries, "inst-9", service, method)
        assert set(got) == set(want) == {"pod-a", "pod-b"}
        for pod, payload in got.items():
            msg = PodMessage.FromString(payload)
            assert all(s.timestamp.seconds > 0 for d in msg.deliveries for s in d.response.log.steps[-1:])
            assert _without_times(msg) == _without_times(want[pod])


def test_long_fields_take_multi_byte_lengths() -> None:
    r = _result(5, steps=40)  # a log of several KB: lengths of two and more varint bytes
    e = Entry(TP, 4, "c1", 5, r, token=1, pod="p", epoch=1, prev=0)
    [(pod, payload)] = pod_messages("reply", [e], "inst", "route")
    d = PodMessage.FromString(payload).deliveries[0]
    assert len(payload) > 5000 and pod == "p"
    assert [s.service_name for s in d.response.log.steps] == [f"service{i}" for i in range(40)] + ["result-router"]
