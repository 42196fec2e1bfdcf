"""Bad input: hypothesis throws malformed gRPC traffic and malformed topic records at a running
cluster while well-behaved clients use it.

At the gRPC edge (tests/rawgrpc.py, raw HTTP/2): random and wrong-type protobuf payloads, lying
length prefixes, the compressed flag, cut-off prefixes, wrong content-types, random, non-ASCII,
non-printable and oversized `client_id` / `nimbus-protocol` values. Into each topic (events,
results, DLQ): random bytes, missing and mismatched keys, protobuf of the wrong type, records
with a field that breaks the contract, huge values.

Meanwhile a LIVE client (G) sends events and a client that went away (R) has a DLQ backlog with
poison in the middle of it. After each example:
- nothing crashed (a crashed role or pod would end the cluster's nursery and fail the test);
- G got every result, in order; R, reconnecting, got its whole backlog in order and went LIVE;
- every bad record was counted (`nimbus_bad_input_total`) and logged with its
  topic/partition/offset, and the consumers committed past it (no partition stalls);
- every refusal at the edge that reaches Nimbus was counted.

Kept short for CI: a bounded number of examples on the in-memory engine, and one fixed example
on the real Kafka + Redis. The regression tests at the end pin what the fuzzing found.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from nimbus.core.lifecycle import Status
from nimbus.engines.murmur2 import partition_for
from nimbus.ops import metrics
from nimbus.ports import Record
from nimbus.proto_gen.nimbus import ResponseKind
from nimbus.wire import badinput
from nimbus.wire.messages import (
    DeliveryReport,
    EventRequest,
    KafkaEventRequest,
    KafkaEventResponse,
    PodMessage,
    ResultPack,
)
from tests import rawgrpc
from tests.harness import Cluster, open_cluster, real_engine
from tests.wire import open_stream

P2 = {"nimbus-protocol": "2"}
TOPICS = ("events", "results", "dlq")
MAX_CLIENT_ID_BYTES = 256  # NIMBUS_MAX_CLIENT_ID_BYTES's default: a longer id is refused, counted


# -- what is bad (the test's own statement of the record contract) -----------------------------


def event_is_bad(key: bytes | None, value: bytes) -> bool:
    try:
        req = KafkaEventRequest.FromString(value)
    except Exception:
        return True
    return not req.client_id or key != req.client_id.encode()


def result_is_bad(key: bytes | None, value: bytes) -> bool:
    try:
        r = KafkaEventResponse.FromString(value)
    except Exception:
        return True
    return (
        not r.client_id
        or key != r.client_id.encode()
        or r.delivery_id <= 0
        or r.delivery_id != r.kafka_offset + 1
    )


def results_in(key: bytes | None, value: bytes) -> int:
    """Good results in a DLQ record of the client it is keyed by: one result, or a pack the
    router wrote (nimbus.wire.packs: its encoding starts with FA 7F)."""
    if value[:2] == b"\xfa\x7f":
        try:
            return len(ResultPack.FromString(value).results)
        except Exception:
            return 0
    return 0 if result_is_bad(key, value) else 1


def is_bad(topic: str, key: bytes | None, value: bytes) -> bool:
    return event_is_bad(key, value) if topic == "events" else result_is_bad(key, value)


# -- strategies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    topic: str  # events | results | dlq
    key: bytes | None
    value: bytes
    huge: int = 0  # if > 0: value is this many seeded random bytes instead

    def __repr__(self) -> str:
        v = (
            repr(self.value)
            if len(self.value) <= 80
            else f"{self.value[:40]!r}+{len(self.value) - 40} bytes"
        )
        return (
            f"Poison({self.topic!r}, {self.key!r}, {v}{f', huge={self.huge}' if self.huge else ''})"
        )


def _values(topic: str, key: bytes | None, draw: Any) -> bytes:
    cid = draw(st.sampled_from(["", "someone", "G", "x" * 300]))
    wrong = draw(st.sampled_from(["random", "wrong type", "broken"]))
    if wrong == "random":
        return bytes(draw(st.binary(max_size=300)))
    if wrong == "wrong type":
        other: list[bytes] = [
            EventRequest(event_name="sq", number=3, seq=1).SerializeToString(),
            PodMessage(reply_to="r").SerializeToString(),
            DeliveryReport().SerializeToString(),
        ]
        if topic == "events":
            other.append(
                KafkaEventResponse(client_id=cid, delivery_id=5, kafka_offset=4).SerializeToString()
            )
        else:
            other.append(
                KafkaEventRequest(client_id=cid, event_name="sq", number=2).SerializeToString()
            )
        return draw(st.sampled_from(other))
    # Broken: the right type, with one field that breaks the contract.
    n = draw(st.integers(-(2**31), 2**31 - 1))
    if topic == "events":
        return KafkaEventRequest(client_id=cid, event_name="sq", number=n).SerializeToString()
    d = draw(st.integers(0, 2**64 - 1))
    off = draw(st.one_of(st.just(d - 1), st.integers(-(2**63), 2**63 - 1)))
    return KafkaEventResponse(
        client_id=cid, delivery_id=d, kafka_offset=max(min(off, 2**63 - 1), -(2**63))
    ).SerializeToString()


@st.composite
def poison(draw: Any, topic: str, keys: list[bytes | None]) -> Poison:
    key = draw(st.sampled_from(keys))
    if draw(st.integers(0, 9)) == 0:
        return Poison(topic, key, b"", huge=draw(st.integers(100_000, 900_000)))
    value = _values(topic, key, draw)
    return Poison(topic, key, value)


class EdgeCase:
    """One raw request. Not a dataclass: hypothesis prints dataclasses field by field, and a
    100 kB client id in a failure report is itself an error (HypothesisWarning under -W error)."""

    def __init__(
        self,
        client_id: bytes | None,
        protocol: bytes | None,
        content_type: bytes,
        frames: tuple[bytes, ...],
        truncated: bool,  # a frame lies about its length (or is cut off)
    ) -> None:
        self.client_id = client_id
        self.protocol = protocol
        self.content_type = content_type
        self.frames = frames
        self.truncated = truncated

    def __repr__(self) -> str:
        def short(b: bytes | None) -> str:
            return repr(b) if b is None or len(b) <= 80 else f"{b[:40]!r}+{len(b) - 40} bytes"

        return (
            f"EdgeCase({short(self.client_id)}, {short(self.protocol)}, {self.content_type!r}, "
            f"({', '.join(short(f) for f in self.frames)}{',' if len(self.frames) == 1 else ''}), {self.truncated})"
        )


_printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


@st.composite
def edge_case(draw: Any) -> EdgeCase:
    cid = draw(
        st.one_of(
            _printable.map(lambda s: b"fz-" + s.encode()),  # a fine id: the payload is what is bad
            _printable.map(lambda s: b"fz-" + s.encode()),
            st.binary(max_size=64),  # anything, including non-ASCII and control bytes
            st.just(b"fz-" + b"a" * 5000),  # long, still within HTTP/2 header limits
            st.just(b"fz-" + b"a" * 100_000),  # over h2's 64 KiB header-list limit
            st.none(),
        )
    )
    proto = draw(st.one_of(st.none(), st.just(b"2"), st.binary(max_size=8)))
    ctype = draw(
        st.sampled_from(
            [b"application/grpc"] * 4 + [b"application/grpc+json", b"text/html", b"\xff"]
        )
    )
    frames: list[bytes] = []
    truncated = False
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(["random", "wrong type", "lie", "compressed", "cut", "good", "ack"])
        )
        if kind == "random":
            frames.append(rawgrpc.frame(draw(st.binary(max_size=200))))
        elif kind == "ack":
            ack = draw(st.one_of(st.integers(1, 2**53 - 1), st.integers(2**53, 2**64 - 1)))
            frames.append(rawgrpc.frame(EventRequest(ack=ack).SerializeToString()))
        elif kind == "wrong type":
            frames.append(
                rawgrpc.frame(KafkaEventResponse(client_id="G", delivery_id=1).SerializeToString())
            )
        elif kind == "lie":
            body = draw(st.binary(max_size=50))
            frames.append(
                rawgrpc.frame(body, length=len(body) + draw(st.integers(1, 2**32 - 1 - len(body))))
            )
            truncated = True
        elif kind == "compressed":
            frames.append(
                rawgrpc.frame(
                    EventRequest(event_name="sq", number=1).SerializeToString(), compressed=True
                )
            )
            truncated = True
        elif kind == "cut":
            frames.append(draw(st.binary(min_size=1, max_size=4)))
            truncated = True
        else:
            frames.append(
                rawgrpc.frame(
                    EventRequest(
                        event_name="sq", number=draw(st.integers(0, 100))
                    ).SerializeToString()
                )
            )
        if truncated:
            break  # nothing after a lie is framed as the client meant anyway
    return EdgeCase(cid, proto, ctype, tuple(frames), truncated)


def edge_counted(case: EdgeCase) -> bool:
    """Whether Nimbus (not only grpclib) sees and counts this case as bad input."""
    if len(case.client_id or b"") > 65536:
        return True  # over h2's header-list limit: a protocol error, closed and counted (edge.py)
    values = [v for v in (case.client_id, case.protocol, case.content_type) if v is not None]
    if any(not v.isascii() for v in values):
        return True  # the connection cannot be parsed: closed, counted as a protocol error
    if case.content_type != b"application/grpc":
        return False  # grpclib answers 415 before Nimbus sees the stream
    cid = (case.client_id or b"").decode("ascii").strip()
    if not cid or not cid.isprintable() or len(cid) > MAX_CLIENT_ID_BYTES:
        return True
    for f in case.frames:
        if len(f) < 5 or f[0] != 0 or int.from_bytes(f[1:5], "big") != len(f) - 5:
            return True
        try:
            req = EventRequest.FromString(f[5:])
        except Exception:
            return True
        if req.ack > 2**53 - 1:
            return True  # not a delivery id
    return False


# -- the cluster side -------------------------------------------------------------------------


def bad_count(where: str) -> float:
    total = 0.0
    for m in metrics.BAD_INPUT.collect():
        for s in m.samples:
            if s.name.endswith("_total") and s.labels.get("where") == where:
                total += s.value
    return total


@contextmanager
def bad_input_log() -> Iterator[list[dict[str, Any]]]:
    """The `extra` of every bad-input log line while inside."""
    seen: list[dict[str, Any]] = []
    sink = logger.add(
        lambda m: seen.append(dict(m.record["extra"])),
        level="WARNING",
        filter=lambda r: "bad_input" in r["extra"],
    )
    try:
        yield seen
    finally:
        logger.remove(sink)


def topic_name(c: Cluster, topic: str) -> str:
    s = c.settings
    return {
        "events": s.kafka_events_topic,
        "results": s.kafka_results_topic,
        "dlq": s.kafka_dlq_topic,
    }[topic]


async def write_raw(
    c: Cluster, topic: str, items: list[tuple[bytes | None, bytes]]
) -> list[tuple[int, int]]:
    """Write records as they are (any key, None included); returns (partition, offset) each."""
    name = topic_name(c, topic)
    n = c.settings.kafka_partitions
    if c.settings.engine == "memory":
        t = c.engine.log.topics[name]  # type: ignore[attr-defined]
        out = []
        for key, value in items:
            p = partition_for(key, n) if key is not None else random.randrange(n)
            part = t.partitions[p]
            part.append(Record(name, p, len(part), key, value, 0))
            out.append((p, len(part) - 1))
        t.notify()
        return out

    def produce() -> list[tuple[int, int]]:
        from kafka import KafkaProducer

        prod = KafkaProducer(
            bootstrap_servers=c.settings.kafka_brokers, max_request_size=2_000_000, acks="all"
        )
        try:
            futs = [prod.send(name, key=key, value=value) for key, value in items]
            prod.flush(30)
            return [(m.partition, m.offset) for m in (f.get(30) for f in futs)]
        finally:
            prod.close(5)

    return await trio.to_thread.run_sync(produce)


async def settled(c: Cluster, timeout: float = 60) -> None:
    """Until the event consumer and router groups have committed every record of their topics.

    Generous: on a loaded machine a group member can be evicted (its heartbeats late past the
    6 s session timeout) and its commits are refused until it has rejoined; seen once locally
    as ~30 s of refused router commits before the member was back."""
    log = c.engine.log
    with trio.fail_after(timeout):
        while True:
            ok = True
            for topic, group in (
                (c.settings.kafka_events_topic, c.settings.events_group),
                (c.settings.kafka_results_topic, c.settings.results_group),
            ):
                ends = await log.end_offsets(topic)
                committed = await log.committed(group, topic)
                if any(end > committed.get(p, 0) for p, end in ends.items()):
                    ok = False
            if ok:
                return
            await trio.sleep(0.05)


async def dlq_results(c: Cluster, cid: str) -> int:
    """How many of `cid`'s results are in the DLQ."""
    name = c.settings.kafka_dlq_topic
    p = c.engine.log.producer.partition_for(name, cid.encode())
    end = (await c.engine.log.end_offsets(name)).get(p, 0)
    n, offset = 0, 0
    async with c.engine.log.reader() as reader:
        while offset < end:
            recs = await reader.fetch(name, p, offset, 500, 1.0)
            n += sum(results_in(r.key, r.value) for r in recs if r.key == cid.encode())
            offset = recs[-1].offset + 1 if recs else offset
    return n


async def wait_for(pred: Any, timeout: float = 30) -> None:
    """Poll `pred` (an async callable) until true: the stores offer nothing to wait on."""
    with trio.fail_after(timeout):
        while not await pred():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def wait_live(c: Cluster, cid: str) -> None:
    async def live() -> bool:
        rec = await c.engine.state.get(cid)
        return rec is not None and rec.status is Status.LIVE

    await wait_for(live)


@asynccontextmanager
async def cluster(engine: dict[str, Any]) -> AsyncIterator[Cluster]:
    async with (
        trio_asyncio.open_loop(),
        open_cluster(pods=1, delivery_timeout_ms=1000, status_interval_ms=100, **engine) as c,
    ):
        yield c


async def results(st_: Any, n: int) -> list[Any]:
    """The next n results, acked; a redelivery (same id, allowed on the wire) is dropped, as the
    client library does."""
    out: list[Any] = []
    while len(out) < n:
        r = await st_.recv()
        assert r is not None, f"stream ended after {len(out)} of {n} results"
        if r.kind == ResponseKind.RESULT:
            await st_.ack(r.delivery_id)
            if not out or r.delivery_id > out[-1].delivery_id:
                out.append(r)
    return out


async def send_and_leave(port: int, cid: str, numbers: list[int]) -> None:
    async with open_stream(port, {"client_id": cid, **P2}) as s:
        for i, n in enumerate(numbers, 1):
            await s.event("sq", n, seq=i)
        receipts = 0
        while receipts < len(numbers):
            r = await s.recv()
            assert r is not None
            receipts += r.kind == ResponseKind.RECEIPT


@dataclass
class Outcome:
    edge_answers: list[rawgrpc.Answer] = field(default_factory=list)


async def run_scenario(
    engine: dict[str, Any], tag: str, edge: list[EdgeCase], records: list[Poison], n_good: int = 8
) -> Outcome:
    out = Outcome()
    g, r = f"G-{tag}", f"R-{tag}"
    before = {w: bad_count(w) for w in ("grpc", *TOPICS)}
    with bad_input_log() as logged, trio.fail_after(180):
        async with cluster(engine) as c:
            port = c.ports[0]

            def materialize(p: Poison) -> tuple[bytes | None, bytes]:
                key = {b"G": g.encode(), b"R": r.encode()}.get(p.key or b"", p.key)
                value = random.Random(p.huge).randbytes(p.huge) if p.huge else p.value
                return key, value

            # R goes away with a backlog of 3.
            await send_and_leave(port, r, [1, 2, 3])

            async def r_backlog(n: int) -> bool:
                return await dlq_results(c, r) >= n

            written: list[
                tuple[str, bytes | None, int, int]
            ] = []  # (topic, key, partition, offset)

            async def poison_topics() -> None:
                for topic in ("events", "results"):
                    items = [materialize(p) for p in records if p.topic == topic]
                    if items:
                        where = await write_raw(c, topic, items)
                        written.extend(
                            (topic, k, pp, o) for (k, _), (pp, o) in zip(items, where, strict=True)
                        )
                    await trio.sleep(0.01)
                # DLQ poison goes after R's real backlog, before the rest of it.
                await wait_for(lambda: r_backlog(3))
                items = [materialize(p) for p in records if p.topic == "dlq"]
                if items:
                    where = await write_raw(c, "dlq", items)
                    written.extend(
                        ("dlq", k, pp, o) for (k, _), (pp, o) in zip(items, where, strict=True)
                    )
                # Two more results for R, behind the poison (the events its stream would have sent).
                rec = await c.engine.state.get(r)
                assert rec is not None
                await write_raw(
                    c,
                    "events",
                    [
                        (
                            r.encode(),
                            KafkaEventRequest(
                                event_name="sq",
                                number=n,
                                client_id=r,
                                redis_channel=rec.pod,
                                epoch=rec.epoch,
                            ).SerializeToString(),
                        )
                        for n in (4, 5)
                    ],
                )

            async def fuzz_edge() -> None:
                for case in edge:
                    md: list[tuple[bytes, bytes]] = []
                    if case.client_id is not None:
                        md.append((b"client_id", case.client_id))
                    if case.protocol is not None:
                        md.append((b"nimbus-protocol", case.protocol))
                    # A stream Nimbus accepts stays open (results may come): give up on it soon.
                    # One it refuses is answered at once: wait for that, however loaded the machine.
                    wait = 10 if edge_counted(case) else 0.3
                    ans = await rawgrpc.call(
                        port,
                        rawgrpc.headers(md, content_type=case.content_type),
                        list(case.frames),
                        wait=wait,
                    )
                    out.edge_answers.append(ans)

            got: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poison_topics)
                nursery.start_soon(fuzz_edge)
                async with open_stream(port, {"client_id": g, **P2}) as gs:
                    for i in range(1, n_good + 1):
                        await gs.event("sq", i, seq=i)
                        await trio.sleep(0.01)
                    got = await results(gs, n_good)
            assert [x.number for x in got] == list(range(1, n_good + 1)), [
                (x.number, x.delivery_id) for x in got
            ]
            ids = [x.delivery_id for x in got]
            assert ids == sorted(set(ids)), ids

            await wait_for(lambda: r_backlog(5))
            async with open_stream(port, {"client_id": r, **P2}) as rs:
                back = await results(rs, 5)
                await wait_live(c, r)
            assert [x.number for x in back] == [1, 2, 3, 4, 5]
            await settled(c)

    # Every bad record: counted and logged where it was; the DLQ's are read only by the replay of
    # the client their key names, so only R's are (the rest are never read by anyone).
    seen = {(e.get("topic"), e.get("partition"), e.get("offset")) for e in logged}
    for topic, key, p, o in written:
        if topic == "dlq" and key != r.encode():
            continue
        assert (topic_name(c, topic), p, o) in seen, (topic, key, p, o)
    expected = {
        t: sum(1 for w in written if w[0] == t and (t != "dlq" or w[1] == r.encode()))
        for t in TOPICS
    }
    for t in TOPICS:
        assert bad_count(t) - before[t] == expected[t], (t, bad_count(t) - before[t], expected[t])
    answers = [
        (edge_counted(e), a.http_status, a.grpc_status, a.grpc_message[:60], a.connection_error)
        for e, a in zip(edge, out.edge_answers, strict=True)
    ]
    assert bad_count("grpc") - before["grpc"] == sum(edge_counted(e) for e in edge), answers
    return out


# -- the fuzz tests ---------------------------------------------------------------------------

_keys: list[bytes | None] = [b"G", b"R", None, b"", b"someone", b"\xff\x00"]


def _records() -> Any:
    return st.lists(
        st.one_of(*(poison(t, _keys) for t in TOPICS)).filter(
            lambda p: p.huge or is_bad(p.topic, p.key, p.value)
        ),
        max_size=8,
    )


def test_fuzz_bad_input_on_memory() -> None:
    # A sync test: each example is its own trio.run with its own cluster.
    @settings(
        max_examples=12,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(edge=st.lists(edge_case(), max_size=5), records=_records())
    def check(edge: list[EdgeCase], records: list[Poison]) -> None:
        trio.run(run_scenario, {"engine": "memory"}, "m", edge, records)

    check()


FIXED_EDGE = [
    EdgeCase(b"fz-1", b"2", b"application/grpc", (rawgrpc.frame(b"\xff\xff\xff"),), False),
    EdgeCase(b"fz-2", None, b"application/grpc", (rawgrpc.frame(b"x", length=2**32 - 1),), True),
    EdgeCase(
        b"fz-3", None, b"application/grpc", (rawgrpc.frame(b"\x0a\x02sq", compressed=True),), True
    ),
    EdgeCase(b"\xff\xfe", b"2", b"application/grpc", (), False),
    EdgeCase(
        b"fz\t4",
        b"2",
        b"application/grpc",
        (rawgrpc.frame(EventRequest(event_name="sq", number=2).SerializeToString()),),
        False,
    ),
    EdgeCase(b"fz-5", b"\x80", b"application/grpc", (), False),
    EdgeCase(b"fz-6", None, b"text/html", (rawgrpc.frame(b""),), False),
    EdgeCase(None, None, b"application/grpc", (), False),
]
FIXED_RECORDS = [
    Poison("events", b"G", b"\xff\xff not an event"),
    Poison(
        "events",
        None,
        KafkaEventRequest(client_id="someone", event_name="sq", number=2).SerializeToString(),
    ),
    Poison("events", b"G", KafkaEventResponse(client_id="G", delivery_id=1).SerializeToString()),
    Poison("events", b"G", b"", huge=600_000),
    Poison("results", b"G", b"\x08\x96\x01 not a result"),
    Poison(
        "results",
        b"someone",
        KafkaEventResponse(client_id="G", delivery_id=7, kafka_offset=6).SerializeToString(),
    ),
    Poison(
        "results",
        b"G",
        KafkaEventResponse(
            client_id="G", delivery_id=2**64 - 1, kafka_offset=5
        ).SerializeToString(),
    ),
    Poison("results", None, b"", huge=600_000),
    Poison("dlq", b"R", b"\x00\x01\x02"),
    Poison("dlq", b"R", KafkaEventRequest(client_id="R", event_name="sq").SerializeToString()),
    Poison(
        "dlq",
        b"R",
        KafkaEventResponse(client_id="someone", delivery_id=9, kafka_offset=8).SerializeToString(),
    ),
    Poison("dlq", b"R", b"", huge=600_000),
    Poison("dlq", None, b"\xff"),
]


@pytest.mark.integration
async def test_fuzz_fixed_example_on_real_brokers(
    kafka_brokers: str, redis_address: str, unique: str
) -> None:
    # Keys b"G"/b"R" in the fixed records stand for the two clients' real ids.
    await run_scenario(
        real_engine(kafka_brokers, redis_address, unique), unique, FIXED_EDGE, FIXED_RECORDS
    )


# -- regressions: what the fuzzing found, one plain test each ---------------------------------


async def test_non_ascii_metadata_closes_that_connection_not_the_server() -> None:
    """Found: a header value with a byte >= 0x80 made h2 raise inside grpclib's data_received;
    trio-asyncio re-raised it in the loop's nursery and the whole server process died."""
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            before = bad_count("grpc")
            for md in (
                [(b"client_id", b"\xff\xfe")],
                [(b"client_id", b"ok"), (b"nimbus-protocol", b"\x80")],
            ):
                ans = await rawgrpc.call(c.ports[0], rawgrpc.headers(md), [], wait=10)
                assert ans.connection_error and not ans.grpc_status, ans
            assert bad_count("grpc") - before == 2
            async with open_stream(c.ports[0], {"client_id": "after", **P2}) as s:
                await s.event("sq", 7, seq=1)
                assert [r.result for r in await results(s, 1)] == [49]


async def test_non_ascii_metadata_over_tls_closes_that_connection_not_the_server(
    tmp_path: Any,
) -> None:
    """Over TLS the same error reaches the loop from asyncio's SSL protocol (which wraps grpclib's),
    not from grpclib's own protocol."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "server.pem", tmp_path / "server.key"
    chain.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(60):
        async with cluster(
            {"engine": "memory", "tls_cert_file": str(chain), "tls_key_file": str(key)}
        ) as c:
            before = bad_count("grpc")
            md = [(b"client_id", b"\xff\xfe")]
            ans = await rawgrpc.call(
                c.ports[0], rawgrpc.headers(md), [], wait=10, ssl_context=client_ctx
            )
            assert ans.connection_error and not ans.grpc_status, ans
            assert bad_count("grpc") - before == 1
            ans = await rawgrpc.call(
                c.ports[0],
                rawgrpc.headers([(b"client_id", b"ok")]),
                [rawgrpc.frame(b"\xff")],
                wait=10,
                ssl_context=client_ctx,
            )
            assert ans.grpc_status == b"3", ans


@pytest.mark.parametrize(
    ("frames", "status"),
    [
        pytest.param([rawgrpc.frame(b"\xff\xff\xff")], b"3", id="undecodable"),
        pytest.param([rawgrpc.frame(b"\x0a\x02sq", compressed=True)], b"12", id="compressed-flag"),
        pytest.param([rawgrpc.frame(b"\x0a\x02sq", length=100)], b"3", id="length-too-long"),
        pytest.param([rawgrpc.frame(b"x", length=2**32 - 1)], b"8", id="length-4GiB"),
        pytest.param([b"\x00\x00"], b"3", id="cut-prefix"),
        pytest.param(
            [
                rawgrpc.frame(EventRequest(event_name="sq", number=2).SerializeToString()),
                rawgrpc.frame(b"\xff"),
            ],
            b"3",
            id="good-then-bad",
        ),
    ],
)
async def test_malformed_message_ends_the_stream_and_is_counted(
    frames: list[bytes], status: bytes
) -> None:
    """Found: grpclib's decode errors (and its AssertionError/NotImplementedError for a short
    message or the compressed flag) ended the reader; the handler then closed the stream with
    status OK, and nothing was logged or counted. Now: INVALID_ARGUMENT (UNIMPLEMENTED for the
    compressed flag, RESOURCE_EXHAUSTED over the message size limit), logged and counted."""
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            before = bad_count("grpc")
            with bad_input_log() as logged:
                ans = await rawgrpc.call(
                    c.ports[0], rawgrpc.headers([(b"client_id", b"fuzzy")]), frames, wait=10
                )
            assert ans.grpc_status == status, ans
            if status == b"3":
                assert ans.grpc_message.startswith(b"malformed message"), ans
            assert bad_count("grpc") - before == 1
            assert [e["bad_input"] for e in logged] == ["grpc"]


@pytest.mark.parametrize("cid", [b"a\tb", b"a\nb", b"nul\x00", b"\x7f"])
async def test_non_printable_client_id_is_refused(cid: bytes) -> None:
    """Found: a client_id with a tab passed, and the status manager splits "client_id<TAB>ns"
    messages on the first tab: int() of the rest raised and took the workers process down.
    gRPC allows only printable ASCII in metadata values; the server now refuses the rest."""
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            before = bad_count("grpc")
            ans = await rawgrpc.call(
                c.ports[0], rawgrpc.headers([(b"client_id", cid)]), [], wait=10
            )
            assert ans.grpc_status == b"3" and b"printable ASCII" in ans.grpc_message, ans
            assert bad_count("grpc") - before == 1
            assert await c.engine.state.get(cid.decode()) is None  # refused before any state change


async def test_bad_channel_messages_are_counted_and_the_workers_keep_going() -> None:
    """Found: a non-UTF-8 replay request (payload.decode()) and a status check that is not
    "client_id<TAB>ns" (or whose client id holds a tab) raised out of the channel listeners and
    ended the workers process. Also: the replay's undecodable delivery reports went uncounted."""
    from nimbus.wire.pod_channel import REPLAY_REQUESTS, STATUS_CHECKS

    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            before = {w: bad_count(w) for w in ("replay requests", "status checks", "pod channel")}
            await c.engine.state.publish(
                [
                    (REPLAY_REQUESTS, b"\xff\xfe"),
                    (STATUS_CHECKS, b"\xff\xfe"),
                    (STATUS_CHECKS, b"no-tab-here"),  # a client id alone: checked, last ack unknown
                    (STATUS_CHECKS, b"a\tb\tnot-a-number"),
                    (
                        STATUS_CHECKS,
                        b"tab\tin\tid\t123",
                    ),  # a client id with tabs: checked, not refused
                    (c.settings.pod_channel + "-pod0", b"\xff\xff not a pod message"),
                ]
            )

            async def checked() -> bool:
                return bad_count("status checks") - before["status checks"] >= 2

            await wait_for(checked)
            assert bad_count("replay requests") - before["replay requests"] == 1
            assert bad_count("pod channel") - before["pod channel"] == 1
            # Replay and status manager still work: a client with a backlog comes back LIVE.
            await send_and_leave(c.ports[0], "back", [1, 2, 3])
            async with open_stream(c.ports[0], {"client_id": "back", **P2}) as s:
                assert [r.number for r in await results(s, 3)] == [1, 2, 3]
                await wait_live(c, "back")


async def test_ack_beyond_any_delivery_id_is_refused() -> None:
    """Found: an ack of 2**64 - 1 was stored as -2**63 by the Redis ack script (Lua numbers are
    doubles) while the memory engine kept it: the client's record was corrupted. Delivery ids
    are offsets + 1, so an ack above 2**53 - 1 is refused: the stream ends, nothing is stored."""
    with trio.fail_after(60):
        async with cluster({"engine": "memory"}) as c:
            before = bad_count("grpc")
            frames = [
                rawgrpc.frame(EventRequest(event_name="sq", number=2, seq=1).SerializeToString()),
                rawgrpc.frame(EventRequest(ack=2**64 - 1).SerializeToString()),
            ]
            md = [(b"client_id", b"acker"), (b"nimbus-protocol", b"2")]
            ans = await rawgrpc.call(c.ports[0], rawgrpc.headers(md), frames, wait=10)
            assert ans.grpc_status == b"3" and ans.grpc_message == b"ack is not a delivery id", ans
            assert bad_count("grpc") - before == 1
            rec = await c.engine.state.get("acker")
            assert rec is not None and rec.acked == 0


def _rec(topic: str, key: bytes | None, value: bytes, offset: int = 0) -> Record:
    return Record(topic, 0, offset, key, value)


def _huge_event(cid: str, size: int) -> bytes:
    """A well-formed event for `cid` whose trace makes it about `size` bytes."""
    req = KafkaEventRequest(client_id=cid, event_name="sq", number=5, redis_channel="x")
    req.log.steps.add(service_name="s", message="m" * size)
    return req.SerializeToString()


def _huge_result(cid: str, size: int) -> bytes:
    r = KafkaEventResponse(client_id=cid, delivery_id=6, kafka_offset=5, event_name="sq")
    r.log.steps.add(service_name="s", message="m" * size)
    return r.SerializeToString()


@pytest.mark.integration
async def test_near_limit_event_does_not_stall_the_event_consumer(
    kafka_brokers: str, redis_address: str, unique: str
) -> None:
    """Found: a well-formed event just under Kafka's 1 MiB message limit gets a result a trace step
    larger, which Kafka refuses (MessageSizeTooLarge); the event consumer retried that produce
    forever and every client's events on its partitions stalled."""
    with trio.fail_after(90):
        async with cluster(real_engine(kafka_brokers, redis_address, unique)) as c:
            g = f"G-{unique}"
            before = bad_count("events")
            await write_raw(c, "events", [(g.encode(), _huge_event(g, 1_048_420))])
            async with open_stream(c.ports[0], {"client_id": g, **P2}) as s:
                await s.event("sq", 3, seq=1)
                assert [(r.number, r.result) for r in await results(s, 1)] == [(3, 9)]
            assert bad_count("events") - before == 1


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"c", b"\xff\xff", badinput.UNDECODABLE),
        (
            b"c",
            KafkaEventResponse(client_id="c", delivery_id=1).SerializeToString(),
            badinput.NO_CLIENT_ID,
        ),
        (
            None,
            KafkaEventRequest(client_id="c", event_name="sq").SerializeToString(),
            badinput.KEY_MISMATCH,
        ),
        (
            b"d",
            KafkaEventRequest(client_id="c", event_name="sq").SerializeToString(),
            badinput.KEY_MISMATCH,
        ),
        (b"c", _huge_event("c", 600_000), badinput.TOO_LARGE),
    ],
)
def test_event_record_refusals(key: bytes | None, value: bytes, reason: str) -> None:
    """A keyless event (or one keyed by another client) sits on a partition its client's other
    events are not on; it used to be processed when the key was missing."""
    from nimbus.workers.event_consumer import process

    with pytest.raises(badinput.BadRecord) as e:
        process(_rec("events", key, value), "test")
    assert e.value.reason == reason


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"c", b"\x08\x96\x01 not a result", badinput.UNDECODABLE),
        (
            b"c",
            KafkaEventRequest(client_id="c", redis_channel="c").SerializeToString(),
            badinput.BAD_DELIVERY_ID,
        ),
        (b"c", KafkaEventResponse(delivery_id=1).SerializeToString(), badinput.NO_CLIENT_ID),
        (
            b"other",
            KafkaEventResponse(client_id="c", delivery_id=1).SerializeToString(),
            badinput.KEY_MISMATCH,
        ),
        (
            None,
            KafkaEventResponse(client_id="c", delivery_id=1).SerializeToString(),
            badinput.KEY_MISMATCH,
        ),
        (
            b"c",
            KafkaEventResponse(client_id="c", delivery_id=0, kafka_offset=-1).SerializeToString(),
            badinput.BAD_DELIVERY_ID,
        ),
        (
            b"c",
            KafkaEventResponse(
                client_id="c", delivery_id=2**64 - 1, kafka_offset=5
            ).SerializeToString(),
            badinput.BAD_DELIVERY_ID,
        ),
        (b"c", _huge_result("c", 600_000), badinput.TOO_LARGE),
        (
            b"c",
            KafkaEventResponse(
                client_id="c", delivery_id=2**60, kafka_offset=2**60 - 1
            ).SerializeToString(),
            badinput.BAD_DELIVERY_ID,
        ),
    ],
)
def test_result_record_refusals(key: bytes | None, value: bytes, reason: str) -> None:
    """Results and DLQ records: a result keyed by another client, or whose delivery id is not its
    event's offset + 1, used to be routed (a huge id would make the client library drop every
    later real result as already seen)."""
    from nimbus.wire.packs import parse_result

    with pytest.raises(badinput.BadRecord) as e:
        parse_result(_rec("results", key, value))
    assert e.value.reason == reason
    ok = KafkaEventResponse(client_id="c", delivery_id=6, kafka_offset=5, number=2, result=4)
    assert parse_result(_rec("results", b"c", ok.SerializeToString())) == ok


ODD_IDS = [
    'q"uote',
    "back\\slash",
    "{json}[1]",
    "\\u0000",
    "%s%d",
    "a b c",
    "*?[x]",
    "nimbus:client:x",
    "~!@#$^&()_+=`",
]


@pytest.mark.integration
async def test_odd_printable_client_ids_survive_the_whole_path_on_real_brokers(
    kafka_brokers: str, redis_address: str, unique: str
) -> None:
    """Printable ASCII ids with JSON, Lua-pattern, glob and key-separator characters: live
    results, a backlog replayed after a reconnect, the flip to LIVE (Redis scripts take batches
    as JSON; status checks are "client_id<TAB>ns")."""
    with trio.fail_after(120):
        async with cluster(real_engine(kafka_brokers, redis_address, unique)) as c:
            for i, odd in enumerate(ODD_IDS):
                cid = f"{odd}-{unique}"
                async with open_stream(c.ports[0], {"client_id": cid, **P2}) as s:
                    await s.event("sq", i, seq=1)
                    assert [r.number for r in await results(s, 1)] == [i]
                await send_and_leave(c.ports[0], cid, [10, 11])
                async with open_stream(c.ports[0], {"client_id": cid, **P2}) as s:
                    assert [r.number for r in await results(s, 2)] == [10, 11]
                    await wait_live(c, cid)
