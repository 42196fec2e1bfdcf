"""The Log port's contract, run against every engine: the in-memory one and real Kafka.

Each test runs three times: `memory` (always), `kafka` (kafka-python) and `rdkafka` (librdkafka
through confluent-kafka), the real ones with the marker `integration` (they need
NIMBUS_TEST_KAFKA_BROKERS; topics and groups named with the `unique` fixture). Every test asserts
on the data the log hands back, and every one runs under `trio.fail_after`.

Rebalance news in a PollResult is read as: remove `revoked`, then add `assigned`, to the set of
partitions the member was told it owns. A partition in both sets was taken away and given back
(its position restarts at the committed offset).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import DefaultPartitioner
from kafka.partitioner.default import murmur2 as kafka_murmur2

from nimbus.engines.memory import MemoryLog
from nimbus.engines.murmur2 import murmur2
from nimbus.ports import (
    CommitFailed,
    Log,
    LogConsumer,
    LogUnavailable,
    PollResult,
    ProduceFailed,
    Record,
    TopicPartition,
    Written,
)

ENGINES = [
    "memory",
    pytest.param("kafka", marks=pytest.mark.integration),
    pytest.param("rdkafka", marks=pytest.mark.integration),
]
# The real adapters, for the tests that only make sense on a real cluster.
ADAPTERS = ["kafka", "rdkafka"]
# Real Kafka needs seconds for group joins and rebalances; memory needs none of it.
IO_TIMEOUT = 90


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param in ADAPTERS:
        return (request.param, request.getfixturevalue("kafka_brokers"))
    return ("memory", "")


def open_adapter(name: str, brokers: str, **kw: Any) -> AbstractAsyncContextManager[Log]:
    """open_kafka_log (kafka-python) or open_rdkafka_log (librdkafka)."""
    if name == "rdkafka":
        from nimbus.engines.rdkafka import open_rdkafka_log

        return open_rdkafka_log(brokers, **kw)
    from nimbus.engines.kafka import open_kafka_log

    return open_kafka_log(brokers, **kw)


@pytest.fixture
async def log(engine: tuple[str, str]) -> AsyncIterator[Log]:
    name, brokers = engine
    if name == "memory":
        yield MemoryLog()
        return
    # The adapters bound their own connect (~15 s); a cancel scope around the enter would not
    # nest with the nursery the librdkafka adapter keeps open for its producer's poller.
    async with open_adapter(name, brokers, client_id="nimbus-contract") as k:
        yield k


def rng_keys(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 40)) for _ in range(n)]


async def wait_until(what: str, pred: Callable[[], bool], timeout: float = 45) -> None:
    with trio.move_on_after(timeout):
        while not pred():  # noqa: ASYNC110 (the state lives in other tasks' bookkeeping)
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for: {what}")


async def read_partition(log: Log, topic: str, partition: int) -> list[Record]:
    begin = (await log.begin_offsets(topic))[partition]
    end = (await log.end_offsets(topic))[partition]
    out: list[Record] = []
    async with log.reader() as r:
        off = begin
        while off < end:
            got = await r.fetch(topic, partition, off, 1000, 10)
            assert got, f"no records at {topic}[{partition}]@{off} below the end {end}"
            out.extend(got)
            off = got[-1].offset + 1
    return out


# -- topics and the partitioner -----------------------------------------------------------------


async def test_ensure_topics_is_idempotent_and_reports_partition_counts(
    log: Log, unique: str
) -> None:
    a, b, c = f"ens-a-{unique}", f"ens-b-{unique}", f"ens-c-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        assert await log.ensure_topics([a, b], 4) == {a: 4, b: 4}
        # An existing topic keeps its count whatever is asked for now.
        assert await log.ensure_topics([a, b], 6) == {a: 4, b: 4}
        assert await log.ensure_topics([c, a], 3) == {c: 3, a: 4}
        assert await log.end_offsets(a) == {0: 0, 1: 0, 2: 0, 3: 0}
        assert await log.begin_offsets(c) == {0: 0, 1: 0, 2: 0}


async def test_partition_for_is_where_records_land(log: Log, unique: str) -> None:
    topic = f"land-{unique}"
    keys = rng_keys(300, seed=1) + [b"", b"a", b"client-42"]
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 5)
        items = [(k, b"v%d" % i) for i, k in enumerate(keys)]
        written = await log.producer.send_batch(topic, items)
        assert len(written) == len(items)
        for (key, _), w in zip(items, written, strict=True):
            assert w.partition == log.producer.partition_for(topic, key), key
        stored = {}
        for p in range(5):
            for rec in await read_partition(log, topic, p):
                stored[(rec.partition, rec.offset)] = (rec.key, rec.value)
        assert len(stored) == len(items)
        for (key, value), w in zip(items, written, strict=True):
            assert stored[(w.partition, w.offset)] == (key, value)


class _FakeCluster:
    """Just enough ClusterMetadata for kafka-python's DefaultPartitioner."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def topics(self) -> set[str]:
        return set(self.counts)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.counts[topic]))

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.counts[topic]))


async def test_partition_for_equals_kafka_python_partitioner(log: Log, unique: str) -> None:
    counts = {f"part-{n}-{unique}": n for n in (1, 3, 7, 12)}
    cluster = _FakeCluster(counts)
    partitioner = DefaultPartitioner()
    keys = rng_keys(2000, seed=2)
    with trio.fail_after(IO_TIMEOUT):
        for topic, n in counts.items():
            assert await log.ensure_topics([topic], n) == {topic: n}
    for topic, n in counts.items():
        for key in keys:
            expected = partitioner.partition(topic, key, key, b"", b"", cluster)
            assert expected == (kafka_murmur2(key) & 0x7FFFFFFF) % n
            assert log.producer.partition_for(topic, key) == expected, (topic, key)


@settings(deadline=None)  # a loaded 2-core CI machine can stall any one example
@given(st.binary(max_size=64))
def test_murmur2_equals_kafka_python(data: bytes) -> None:
    assert murmur2(data) == kafka_murmur2(data)


# -- producing ----------------------------------------------------------------------------------


async def test_per_key_order_across_batches(log: Log, unique: str) -> None:
    topic = f"order-{unique}"
    keys = [b"k%d" % i for i in range(12)]
    rng = random.Random(3)
    sent: list[tuple[bytes, bytes]] = []
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 4)
        seq = Counter[bytes]()
        for _ in range(8):
            batch = []
            for _ in range(rng.randrange(1, 60)):
                k = rng.choice(keys)
                batch.append((k, b"%s:%d" % (k, seq[k])))
                seq[k] += 1
            written = await log.producer.send_batch(topic, batch)
            # Within a partition, input order is offset order.
            last: dict[int, int] = {}
            for w in written:
                assert w.offset > last.get(w.partition, -1)
                last[w.partition] = w.offset
            sent.extend(batch)
        got: dict[bytes, list[bytes]] = {}
        for p in range(4):
            for rec in await read_partition(log, topic, p):
                assert rec.key is not None
                got.setdefault(rec.key, []).append(rec.value)
    expected: dict[bytes, list[bytes]] = {}
    for k, v in sent:
        expected.setdefault(k, []).append(v)
    assert got == expected


async def test_empty_batch_writes_nothing(log: Log, unique: str) -> None:
    topic = f"empty-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 2)
        assert await log.producer.send_batch(topic, []) == []
        assert await log.end_offsets(topic) == {0: 0, 1: 0}


async def test_unknown_topic_is_our_error_and_is_not_created(log: Log, unique: str) -> None:
    topic = f"missing-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(LogUnavailable):
            await log.producer.send_batch(topic, [(b"k", b"v")])
        with pytest.raises(LogUnavailable):
            log.producer.partition_for(topic, b"k")
        with pytest.raises(LogUnavailable):
            async with log.consumer(topic, f"g-{unique}"):
                pass
        async with log.reader() as r:
            with pytest.raises(LogUnavailable):
                await r.fetch(topic, 0, 0, 10, 0.1)
        assert await log.committed(f"g-{unique}", topic) == {}
        # Nothing above created the topic (a broker with auto-creation on would have).
        with pytest.raises(LogUnavailable):
            await log.end_offsets(topic)
        with pytest.raises(LogUnavailable):
            await log.begin_offsets(topic)


# -- consumer groups ----------------------------------------------------------------------------


@dataclass
class Member:
    """Bookkeeping of one group member, as a caller of the port would keep it."""

    name: str
    owned: set[TopicPartition] = field(default_factory=set)
    seen: list[Record] = field(default_factory=list)
    revoked_news: set[TopicPartition] = field(default_factory=set)
    assigned_news: set[TopicPartition] = field(default_factory=set)
    uncommitted: list[Record] = field(default_factory=list)  # records whose commit failed
    polls: int = 0

    def apply(self, r: PollResult) -> None:
        self.polls += 1
        self.owned -= r.revoked
        self.owned |= r.assigned
        self.revoked_news |= r.revoked
        self.assigned_news |= r.assigned
        for rec in r.records:
            tp = TopicPartition(rec.topic, rec.partition)
            assert tp in self.owned, f"{self.name} got a record of {tp}, owns {self.owned}"
        self.seen.extend(r.records)


async def consume(c: LogConsumer, m: Member, stop: trio.Event, *, commit: bool = True) -> None:
    """Poll, 'process', commit what was processed; repeat until stopped."""
    while not stop.is_set():
        r = await c.poll(25, 0.2)
        m.apply(r)
        if commit and r.records:
            nxt: dict[TopicPartition, int] = {}
            for rec in r.records:
                tp = TopicPartition(rec.topic, rec.partition)
                nxt[tp] = max(nxt.get(tp, 0), rec.offset + 1)
            try:
                await c.commit(nxt)
            except CommitFailed:
                m.uncommitted.extend(r.records)


async def run_member(
    log: Log, topic: str, group: str, m: Member, stop: trio.Event, *, commit: bool = True
) -> None:
    async with log.consumer(topic, group, max_poll_records=25) as c:
        await consume(c, m, stop, commit=commit)


def split_evenly(members: list[Member], everything: set[TopicPartition]) -> bool:
    owned = [m.owned for m in members]
    return (
        all(owned)
        and sum(len(o) for o in owned) == len(everything)
        and set().union(*owned) == everything
    )


async def test_group_members_split_partitions_and_see_every_record_once(
    log: Log, unique: str
) -> None:
    """A, then B, then C join while records keep arriving; each commits after each poll."""
    topic, group = f"grp-{unique}", f"g-{unique}"
    n = 6
    everything = {TopicPartition(topic, p) for p in range(n)}
    keys = rng_keys(1000, seed=4)
    produced: list[Written] = []
    all_joined, trickled = trio.Event(), trio.Event()

    async def trickle() -> None:
        # Keep producing through every rebalance, and a little after the last one.
        i, after = 300, 0
        while after < 10:
            produced.extend(
                await log.producer.send_batch(topic, [(k, b"2") for k in keys[i : i + 5]])
            )
            i = 300 + (i + 5 - 300) % 700
            after += all_joined.is_set()
            await trio.sleep(0.03)
        trickled.set()

    with trio.fail_after(IO_TIMEOUT * 2):
        await log.ensure_topics([topic], n)
        produced += await log.producer.send_batch(topic, [(k, b"1") for k in keys[:300]])
        a, b, c = Member("a"), Member("b"), Member("c")
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_member, log, topic, group, a, stop)
            await wait_until("a owns everything", lambda: a.owned == everything)
            nursery.start_soon(trickle)
            nursery.start_soon(run_member, log, topic, group, b, stop)
            await wait_until(
                "a and b split the partitions", lambda: split_evenly([a, b], everything)
            )
            nursery.start_soon(run_member, log, topic, group, c, stop)
            await wait_until(
                "a, b and c split the partitions", lambda: split_evenly([a, b, c], everything)
            )
            all_joined.set()
            await trickled.wait()
            want = {(w.partition, w.offset) for w in produced}

            def seen_all() -> bool:
                return want <= {(r.partition, r.offset) for m in (a, b, c) for r in m.seen}

            await wait_until("every record consumed", seen_all)
            stop.set()
    assert len(want) == len(produced) > 300
    assert a.revoked_news, "a never heard that partitions were taken away"
    assert b.assigned_news and c.assigned_news
    assert split_evenly([a, b, c], everything)
    seen = Counter((r.partition, r.offset) for m in (a, b, c) for r in m.seen)
    assert set(seen) == want
    # Exactly once, except records whose commit was refused (a rebalance raced the commit):
    # their partition's next owner starts from the older committed offset.
    duplicates = {po for po, count in seen.items() if count > 1}
    refused = {(r.partition, r.offset) for m in (a, b, c) for r in m.uncommitted}
    print(
        f"records={len(want)} duplicates={len(duplicates)} refused={len(refused)} "
        f"polls={[m.polls for m in (a, b, c)]}"
    )
    assert duplicates <= refused


async def test_members_joining_before_first_poll_get_a_consistent_view(
    log: Log, unique: str
) -> None:
    """Rebalance news accumulated before the first poll must still add up to the real split."""
    topic, group = f"early-{unique}", f"g-{unique}"
    everything = {TopicPartition(topic, p) for p in range(4)}
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 4)
        written = await log.producer.send_batch(topic, [(k, b"x") for k in rng_keys(200, seed=5)])
        a, b = Member("a"), Member("b")
        stop = trio.Event()
        async with (
            log.consumer(topic, group, max_poll_records=25) as ca,
            log.consumer(topic, group, max_poll_records=25) as cb,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(consume, ca, a, stop)
            nursery.start_soon(consume, cb, b, stop)
            await wait_until(
                "a and b split the partitions", lambda: split_evenly([a, b], everything)
            )
            await wait_until(
                "every record consumed",
                lambda: len({(r.partition, r.offset) for r in a.seen + b.seen}) == len(written),
            )
            stop.set()
    assert not a.owned & b.owned, (a.owned, b.owned)


async def test_commit_then_a_new_member_resumes_from_the_committed_offset(
    log: Log, unique: str
) -> None:
    topic, group = f"resume-{unique}", f"g-{unique}"
    keys = rng_keys(200, seed=6)
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 2)
        await log.producer.send_batch(topic, [(k, b"v") for k in keys])
        ends = await log.end_offsets(topic)
        assert all(e > 10 for e in ends.values()), ends
        assert await log.committed(group, topic) == {}
        commit_at = {TopicPartition(topic, p): e // 3 for p, e in ends.items()}
        first = Member("first")
        async with log.consumer(topic, group) as c:
            while first.owned != set(commit_at):
                first.apply(await c.poll(500, 1))
            await c.commit(commit_at)
        assert await log.committed(group, topic) == {tp.partition: o for tp, o in commit_at.items()}
        second = Member("second")
        async with log.consumer(topic, group, max_poll_records=50) as c:
            while len(second.seen) < sum(
                e - commit_at[TopicPartition(topic, p)] for p, e in ends.items()
            ):
                second.apply(await c.poll(50, 1))
            extra = await c.poll(50, 0.5)
    assert not extra.records
    for p, end in ends.items():
        offsets = [r.offset for r in second.seen if r.partition == p]
        assert offsets == list(range(commit_at[TopicPartition(topic, p)], end))


async def test_commit_later_is_sent_by_polls_and_by_close(log: Log, unique: str) -> None:
    """commit_later does not wait: the offsets reach the group with a later poll (while the
    member keeps polling), and what is still waiting when the member closes is committed then.
    Offsets of partitions the member does not own are dropped, not an error."""
    topic, other, group = f"later-{unique}", f"later2-{unique}", f"g-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic, other], 2)
        await log.producer.send_batch(topic, [(k, b"v") for k in rng_keys(40, seed=8)])
        ends = await log.end_offsets(topic)
        m = Member("m")
        mine = {TopicPartition(topic, p) for p in range(2)}
        async with log.consumer(topic, group) as c:
            while m.owned != mine:
                m.apply(await c.poll(500, 1))
            c.commit_later({TopicPartition(topic, 0): 1, TopicPartition(other, 0): 5})
            c.commit_later({TopicPartition(topic, 0): 2})  # the newest offset wins
            while await log.committed(group, topic) != {0: 2}:
                m.apply(await c.poll(500, 0.2))
            assert await log.committed(group, other) == {}
            c.commit_later({TopicPartition(topic, 1): ends[1]})
        assert await log.committed(group, topic) == {0: 2, 1: ends[1]}


async def test_commit_of_a_partition_not_assigned_fails(log: Log, unique: str) -> None:
    topic, other, group = f"foreign-{unique}", f"foreign2-{unique}", f"g-{unique}"
    everything = {TopicPartition(topic, p) for p in range(2)}
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic, other], 2)
        a, b = Member("a"), Member("b")
        stop = trio.Event()
        async with (
            log.consumer(topic, group) as ca,
            log.consumer(topic, group) as cb,
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, ca, a, stop)
                nursery.start_soon(consume, cb, b, stop)
                await wait_until(
                    "a and b split the partitions", lambda: split_evenly([a, b], everything)
                )
                stop.set()
            (theirs,) = b.owned
            (mine,) = a.owned
            with pytest.raises(CommitFailed):
                await ca.commit({theirs: 1})
            with pytest.raises(CommitFailed):
                await ca.commit({mine: 0, theirs: 1})
            with pytest.raises(CommitFailed):
                await ca.commit({TopicPartition(other, 0): 1})
            await ca.commit({mine: 0})
        assert await log.committed(group, topic) == {mine.partition: 0}
        assert await log.committed(group, other) == {}


async def test_closed_consumer_refuses_poll(log: Log, unique: str) -> None:
    topic = f"closed-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 1)
        async with log.consumer(topic, f"g-{unique}") as c:
            pass
        with pytest.raises(LogUnavailable):
            await c.poll(10, 0.1)


async def test_cancelled_polls_lose_no_records(log: Log, unique: str) -> None:
    topic = f"cancel-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 1)
        await log.producer.send_batch(topic, [(b"k", b"%d" % i) for i in range(300)])
        m = Member("m")
        rng = random.Random(7)
        async with log.consumer(topic, f"g-{unique}", max_poll_records=7) as c:
            while len(m.seen) < 300:
                with trio.move_on_after(rng.uniform(0.0, 0.03)):
                    m.apply(await c.poll(7, 1))
            m.apply(await c.poll(7, 0.3))
    assert [r.offset for r in m.seen] == list(range(300))
    assert [r.value for r in m.seen] == [b"%d" % i for i in range(300)]


# -- watermarks and random access ---------------------------------------------------------------


async def test_watermarks_count_what_was_written(log: Log, unique: str) -> None:
    topic = f"marks-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 3)
        assert await log.end_offsets(topic) == {0: 0, 1: 0, 2: 0}
        keys = rng_keys(90, seed=8)
        written = await log.producer.send_batch(topic, [(k, b"") for k in keys])
        per_partition = Counter(w.partition for w in written)
        assert await log.end_offsets(topic) == {p: per_partition[p] for p in range(3)}
        assert await log.begin_offsets(topic) == {0: 0, 1: 0, 2: 0}
        assert await log.committed(f"nobody-{unique}", topic) == {}


async def test_reader_fetches_at_any_offset(log: Log, unique: str) -> None:
    topic = f"read-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 2)
        key0 = next(k for k in rng_keys(100, seed=9) if log.producer.partition_for(topic, k) == 0)
        await log.producer.send_batch(topic, [(key0, b"%d" % i) for i in range(50)])
        assert (await log.end_offsets(topic))[0] == 50

        def check(recs: list[Record], first: int, count: int) -> None:
            assert [r.offset for r in recs] == list(range(first, first + count))
            assert [r.value for r in recs] == [b"%d" % i for i in range(first, first + count)]
            assert all(r.key == key0 and r.partition == 0 and r.topic == topic for r in recs)

        async with log.reader() as r:
            check(await r.fetch(topic, 0, 0, 10, 5), 0, 10)
            check(await r.fetch(topic, 0, 10, 10, 5), 10, 10)  # sequential scan
            check(await r.fetch(topic, 0, 37, 100, 5), 37, 13)  # up to the end
            check(await r.fetch(topic, 0, 5, 3, 5), 5, 3)  # backwards
            check(await r.fetch(topic, 0, 49, 1, 5), 49, 1)
            t0 = trio.current_time()
            assert await r.fetch(topic, 0, 50, 10, 0.5) == []  # at the end: waits, then empty
            assert trio.current_time() - t0 >= 0.45
            assert await r.fetch(topic, 1, 0, 10, 0.3) == []  # an empty partition
            check(await r.fetch(topic, 0, 20, 4, 5), 20, 4)

            async def later() -> None:
                await trio.sleep(0.3)
                await log.producer.send_batch(topic, [(key0, b"50")])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(later)
                t0 = trio.current_time()
                check(await r.fetch(topic, 0, 50, 10, 20), 50, 1)  # wakes on the new record
                assert trio.current_time() - t0 < 10


async def test_readers_are_independent_of_groups(log: Log, unique: str) -> None:
    topic, group = f"indep-{unique}", f"g-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        await log.ensure_topics([topic], 1)
        await log.producer.send_batch(topic, [(b"k", b"%d" % i) for i in range(5)])
        async with log.reader() as r:
            assert len(await r.fetch(topic, 0, 0, 100, 5)) == 5
        assert await log.committed(group, topic) == {}


@pytest.mark.integration
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_kafka_oversized_record_is_produce_failed(
    adapter: str, kafka_brokers: str, unique: str
) -> None:
    """Both clients refuse it before sending (kafka-python's MessageSizeTooLargeError,
    librdkafka's MSG_SIZE_TOO_LARGE): ours is ProduceFailed."""
    topic = f"big-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        async with open_adapter(adapter, kafka_brokers, client_id="nimbus-contract") as log:
            await log.ensure_topics([topic], 1)
            with pytest.raises(ProduceFailed):
                await log.producer.send_batch(topic, [(b"k", b"x" * 2_000_000)])
            assert await log.end_offsets(topic) == {0: 0}


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_kafka_unreachable_cluster_is_log_unavailable(
    adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No broker needed: a closed port must give our error, naming the address, promptly."""
    import importlib
    import socket

    module = importlib.import_module(f"nimbus.engines.{adapter}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(module, "BOOTSTRAP_TIMEOUT_S", 1.0)
    t0 = trio.current_time()
    with trio.fail_after(20):
        with pytest.raises(LogUnavailable, match=address):
            async with open_adapter(adapter, address):
                pass  # pragma: no cover
    assert trio.current_time() - t0 < 10


@pytest.mark.integration
async def test_both_adapters_put_a_key_in_the_same_partition(
    kafka_brokers: str, unique: str
) -> None:
    """kafka-python and librdkafka (partitioner murmur2_random, not its default) write a key to
    the same partition of a real topic: the one partition_for (nimbus.engines.murmur2) names,
    whichever adapter is asked."""
    topic = f"cross-{unique}"
    keys = rng_keys(300, seed=11) + [b"", b"a", b"client-42"]
    n = 7
    landed: dict[str, list[int]] = {}
    with trio.fail_after(IO_TIMEOUT):
        async with (
            open_adapter("kafka", kafka_brokers, client_id="nimbus-contract") as kp,
            open_adapter("rdkafka", kafka_brokers, client_id="nimbus-contract") as rd,
        ):
            assert await kp.ensure_topics([topic], n) == {topic: n}
            assert await rd.ensure_topics([topic], n) == {topic: n}
            for name, log in (("kafka", kp), ("rdkafka", rd)):
                written = await log.producer.send_batch(topic, [(k, name.encode()) for k in keys])
                landed[name] = [w.partition for w in written]
                for key, w in zip(keys, written, strict=True):
                    assert log.producer.partition_for(topic, key) == w.partition, (name, key)
            # What the broker holds agrees with what each producer was told.
            stored: dict[tuple[bytes | None, bytes], set[int]] = {}
            for p in range(n):
                for rec in await read_partition(rd, topic, p):
                    stored.setdefault((rec.key, rec.value), set()).add(rec.partition)
    expected = [(murmur2(k) & 0x7FFFFFFF) % n for k in keys]
    assert landed["kafka"] == expected
    assert landed["rdkafka"] == expected
    assert len(set(expected)) == n  # the keys reach every partition
    for key, p in zip(keys, expected, strict=True):
        assert stored[(key, b"kafka")] == {p}
        assert stored[(key, b"rdkafka")] == {p}


def test_kafka_refused_async_commit_is_retried_only_if_nothing_newer_went_out() -> None:
    """commit_later on Kafka: a refused async commit (a rebalance raced it) is sent again with
    the next poll while the partition is owned, unless a newer commit was sent meanwhile
    (retrying then would move the group's offset back)."""
    from nimbus.engines.kafka_consumer import KafkaGroupConsumer, _RebalanceListener

    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    c = KafkaGroupConsumer(None, _RebalanceListener(), "t", "g", 500)
    c._owned = {tp}
    c._sent = {tp: 20, other: 5}
    c._refused = [{tp: 10, other: 5}]  # tp: stale (20 went out since); other: not owned
    assert c._take_later() == {}
    c._refused = [{tp: 20}]
    assert c._take_later() == {tp: 20}
    c._refused = [{tp: 20}]
    c.commit_later({tp: 25})
    assert c._take_later() == {tp: 25}  # the newer offset wins
    assert c._take_later() == {}
