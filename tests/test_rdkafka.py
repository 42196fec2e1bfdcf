"""The librdkafka adapter (nimbus.engines.rdkafka) beyond the Log contract: its choice by
configuration, its bridge to trio (no worker thread for produce batches, nor for polls that find
records already fetched) and its commit_later bookkeeping. The contract itself runs on it in
tests/test_log_contract.py."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from confluent_kafka import KafkaError
from confluent_kafka import TopicPartition as RdTP

from nimbus import config
from nimbus.engines import rdkafka as rdkafka_engine
from nimbus.engines import rdkafka_admin, rdkafka_consumer, rdkafka_producer, rdkafka_wakeup
from nimbus.ports import CommitFailed, LogUnavailable, TopicPartition
from tests.harness import record_thread_calls

IO_TIMEOUT = 90


def record_adapter_thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """record_thread_calls over every module of the adapter that runs calls in a worker thread
    (`in_thread`): one list, in order."""
    calls = record_thread_calls(monkeypatch, rdkafka_consumer)
    for module in (rdkafka_engine, rdkafka_producer):
        monkeypatch.setattr(module, "in_thread", rdkafka_consumer.in_thread)
    return calls


def test_the_client_library_is_chosen_by_configuration() -> None:
    assert config.load(env={}, dotenv=False).kafka_client == "kafka-python"
    s = config.load(env={"NIMBUS_KAFKA_CLIENT": "librdkafka"}, dotenv=False)
    assert s.kafka_client == "librdkafka"
    with pytest.raises(config.ConfigError, match="NIMBUS_KAFKA_CLIENT"):
        config.load(env={"NIMBUS_KAFKA_CLIENT": "java"}, dotenv=False)


@pytest.mark.integration
async def test_open_engine_uses_librdkafka_when_configured(
    kafka_brokers: str, redis_address: str, unique: str
) -> None:
    import trio_asyncio

    from nimbus.engines import open_engine

    s = config.load(
        env={},
        dotenv=False,
        engine="real",
        kafka_client="librdkafka",
        kafka_brokers=kafka_brokers,
        redis_address=redis_address,
        redis_prefix=f"t-{unique}:",
    )
    with trio.fail_after(IO_TIMEOUT):
        async with trio_asyncio.open_loop(), open_engine(s) as eng:
            inner = eng.log._target  # type: ignore[attr-defined]  # the metrics proxy's target
            assert isinstance(inner, rdkafka_engine.RdkafkaLog)
            topic = f"eng-{unique}"
            assert await eng.log.ensure_topics([topic], 3) == {topic: 3}
            (w,) = await eng.log.producer.send_batch(topic, [(b"k", b"v")])
            assert w.partition == eng.log.producer.partition_for(topic, b"k")


@pytest.mark.integration
async def test_produce_and_prefetched_polls_need_no_thread(
    kafka_brokers: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """produce() only queues: every batch, small or large, is appended on the trio thread and
    its delivery reports reach trio from the poller thread. A poll that finds records librdkafka
    already fetched takes them without a thread; only a poll that has to wait uses one."""
    topic = f"nothread-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        async with rdkafka_engine.open_rdkafka_log(kafka_brokers, client_id="t") as log:
            await log.ensure_topics([topic], 1)
            calls = record_adapter_thread_calls(monkeypatch)
            assert len(await log.producer.send_batch(topic, [(b"k", b"1")])) == 1
            big = await log.producer.send_batch(topic, [(b"k", b"%d" % i) for i in range(5000)])
            assert [w.offset for w in big] == list(range(1, 5001))
            assert calls == []
            async with log.consumer(topic, f"g-{unique}", max_poll_records=100) as c:
                polls, seen = 0, 0
                while seen < 5001:
                    r = await c.poll(100, 5)
                    polls += 1
                    seen += len(r.records)
                waits = calls.count("_wait_sync")
                # The first polls wait for the join and the first fetch; the rest find records.
                assert polls >= 50 and waits <= polls // 4, (polls, waits)


def _consumer() -> rdkafka_engine.RdkafkaGroupConsumer:
    return rdkafka_engine.RdkafkaGroupConsumer("t", "g", 500)


def test_refused_async_commit_is_retried_only_if_nothing_newer_went_out() -> None:
    """commit_later on librdkafka: an asynchronous commit that the group refused (its answer
    comes to on_commit) is sent again with the next poll while the partition is owned, unless a
    newer commit was sent meanwhile (retrying then would move the group's offset back)."""
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    c = _consumer()
    c._owned = {tp}
    c._sent = {tp: 20, other: 5}
    refused = KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
    c._on_commit(refused, [RdTP("t", 0, 10), RdTP("t", 1, 5)])  # tp: stale; other: not owned
    assert c._take_later() == {}
    c._on_commit(refused, [RdTP("t", 0, 20)])
    assert c._take_later() == {tp: 20}
    c._on_commit(refused, [RdTP("t", 0, 20)])
    c.commit_later({tp: 25})
    assert c._take_later() == {tp: 25}  # the newer offset wins
    c._on_commit(None, [RdTP("t", 0, 25)])  # accepted: nothing to retry
    assert c._take_later() == {}


def test_rebalance_news_reports_a_partition_taken_and_given_back_in_both_sets() -> None:
    """As the kafka-python adapter: remove `revoked`, then add `assigned`; a reported partition
    revoked and re-assigned between two polls is in both (its position restarts)."""
    c = _consumer()
    a, b = RdTP("t", 0), RdTP("t", 1)
    c._listener.on_assign(None, [a, b])  # type: ignore[arg-type]
    assert c._news() == (set(), {TopicPartition("t", 0), TopicPartition("t", 1)})
    c._listener.on_revoke(None, [a])  # type: ignore[arg-type]
    c._listener.on_assign(None, [a])  # type: ignore[arg-type]
    c._listener.on_lost(None, [b])  # type: ignore[arg-type]
    assert c._news() == ({TopicPartition("t", 0), TopicPartition("t", 1)}, {TopicPartition("t", 0)})
    assert c._news() == (set(), set())


async def test_a_commit_without_answer_fails_and_close_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librdkafka's synchronous commit has no timeout (it waits for a coordinator while there is
    none): ours gives up after _COMMIT_TIMEOUT_S with CommitFailed, and the close waits for the
    abandoned call before destroying the consumer under it."""
    import threading

    events: list[str] = []
    release = threading.Event()

    class Stuck:
        def assignment(self) -> list[RdTP]:
            return [RdTP("t", 0)]

        def commit(self, **_: Any) -> list[RdTP]:
            events.append("commit")
            release.wait(5)
            events.append("commit done")
            return []

        def close(self) -> None:
            events.append("close")

    monkeypatch.setattr(rdkafka_consumer, "_COMMIT_TIMEOUT_S", 0.2)
    c = _consumer()
    c._c = Stuck()  # type: ignore[assignment]
    with trio.fail_after(10):
        t0 = trio.current_time()
        with pytest.raises(CommitFailed, match="no answer"):
            await c.commit({TopicPartition("t", 0): 1})
        assert trio.current_time() - t0 < 2
        assert c._handle.busy()  # the abandoned commit still holds the consumer

        async def answer() -> None:
            await trio.sleep(0.3)
            release.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            await c.aclose()
    assert events == ["commit", "commit done", "close"]


class _OneThreadAtATime:
    """A stand-in for a confluent-kafka Consumer that fails the test (as the real one would
    crash the process) when two threads are inside it at once, or when it is called after
    close(). `commit` blocks until `release` is set, like a commit without a coordinator."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.inside = 0
        self.closed = False
        self.errors: list[str] = []
        self.calls: list[str] = []
        self._guard = threading.Lock()

    def _enter(self, name: str) -> None:
        with self._guard:
            self.calls.append(name)
            if self.closed:
                self.errors.append(f"{name} after close")
            self.inside += 1
            if self.inside > 1:
                self.errors.append(f"{name} while another thread is inside")

    def _leave(self) -> None:
        with self._guard:
            self.inside -= 1

    def assignment(self) -> list[RdTP]:
        self._enter("assignment")
        self._leave()
        return [RdTP("t", 0)]

    def commit(self, **kw: Any) -> list[RdTP] | None:
        self._enter("commit")
        try:
            if not kw.get("asynchronous"):
                self.release.wait(5)
            return []
        finally:
            self._leave()

    def consume(self, n: int, timeout: float) -> list[Any]:
        import time

        self._enter("consume")
        time.sleep(min(timeout, 0.01))
        self._leave()
        return []

    def poll(self, timeout: float) -> None:
        import time

        self._enter("poll")
        time.sleep(min(timeout, 0.05))
        self._leave()

    def close(self) -> None:
        self._enter("close")
        self.closed = True
        self._leave()


async def test_no_call_overlaps_an_abandoned_commit_and_none_follows_the_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SIGSEGV of a worker (chaos run 20261206-102358): confluent-kafka's Consumer is not safe
    for two threads at once (its close destroys the C handle under a poll in flight). A commit
    whose caller gave up keeps running in its thread: polls meanwhile neither enter the consumer
    nor hang (they wait in a worker thread, slice by slice), the close waits for the commit to
    return, and nothing touches the consumer after its close."""
    monkeypatch.setattr(rdkafka_consumer, "_COMMIT_TIMEOUT_S", 0.2)
    fake = _OneThreadAtATime()
    c = _consumer()
    c._c = fake  # type: ignore[assignment]
    tp = TopicPartition("t", 0)
    with trio.fail_after(10):
        with pytest.raises(CommitFailed, match="no answer"):
            await c.commit({tp: 1})
        assert c._handle.busy()
        c.commit_later({tp: 2})  # waits: the commit in flight holds the consumer
        for _ in range(3):
            t0 = trio.current_time()
            r = await c.poll(10, 0.1)
            assert r.records == [] and trio.current_time() - t0 < 2
        assert c._later == {tp: 2}
        with trio.move_on_after(0.05):  # a poll cancelled while it waits for the consumer
            await c.poll(10, 5)

        async def answer() -> None:
            await trio.sleep(0.3)
            fake.release.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            await c.aclose()
        with pytest.raises(LogUnavailable, match="closed"):
            await c.poll(10, 0.1)
    assert fake.errors == []
    assert fake.calls[-1] == "close" and fake.calls.count("close") == 1
    # No poll entered while the commit held it; the commit_later offsets went out before the
    # close, after the stuck commit.
    assert fake.calls == ["assignment", "commit", "assignment", "assignment", "commit", "close"]


@pytest.mark.integration
@pytest.mark.parametrize("wakeup", ["fd", "thread"])
async def test_a_waiting_poll_wakes_when_a_record_lands(
    kafka_brokers: str, unique: str, monkeypatch: pytest.MonkeyPatch, wakeup: str
) -> None:
    """A poll with nothing to take waits, and returns the record produced meanwhile: woken by
    librdkafka through the consumer queue's pipe (no thread at all), or, where that cannot be
    set up, by a worker thread waiting in poll(). The wait slice is made longer than the poll's
    deadline, so a wake-up that never came would return nothing."""
    if wakeup == "thread":
        monkeypatch.setattr(rdkafka_wakeup, "_LIB", None)  # as if librdkafka were not found
    monkeypatch.setattr(rdkafka_engine.kc, "SLICE_S", 120.0)
    topic = f"wake-{unique}"
    with trio.fail_after(IO_TIMEOUT):
        async with rdkafka_engine.open_rdkafka_log(kafka_brokers, client_id="t") as log:
            await log.ensure_topics([topic], 1)
            assert (log._producer._poller._fd is not None) == (wakeup == "fd")
            async with log.consumer(topic, f"g-{unique}", max_poll_records=10) as c:
                assert (c._fd is not None) == (wakeup == "fd")
                while not c._owned:  # joined, partition assigned
                    await c.poll(10, 0.2)
                calls = record_adapter_thread_calls(monkeypatch)
                for i in range(3):
                    async with trio.open_nursery() as n:

                        async def produce_later(i: int = i) -> None:
                            await trio.sleep(0.3)
                            await log.producer.send_batch(topic, [(b"k", b"%d" % i)])

                        n.start_soon(produce_later)
                        got = await c.poll(10, 20)
                    assert [r.value for r in got.records] == [b"%d" % i]
                waits = calls.count("_wait_sync")
                assert waits == 0 if wakeup == "fd" else waits >= 3, calls


@pytest.mark.integration
async def test_committed_offsets_come_from_a_bounded_set_of_group_consumers(
    kafka_brokers: str, unique: str
) -> None:
    """committed() asks through a never-subscribed consumer of the group (librdkafka's admin
    OffsetFetch crashes the process when a (re)starting coordinator answers NOT_COORDINATOR,
    librdkafka #5040); at most _OFFSET_CONSUMERS of them stay open, the least recently asked go."""
    topic = f"committed-{unique}"
    limit = rdkafka_engine._OFFSET_CONSUMERS
    with trio.fail_after(IO_TIMEOUT):
        async with rdkafka_engine.open_rdkafka_log(kafka_brokers, client_id="t") as log:
            await log.ensure_topics([topic], 2)
            await log.producer.send_batch(topic, [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
            group = f"g-{unique}"
            async with log.consumer(topic, group) as c:
                seen = 0
                while seen < 3:
                    r = await c.poll(10, 1)
                    seen += len(r.records)
                    if r.records:
                        last: dict[TopicPartition, int] = {}
                        for rec in r.records:
                            last[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
                        await c.commit(last)
            want = {p: off for p, off in (await log.end_offsets(topic)).items() if off > 0}
            assert await log.committed(group, topic) == want
            for i in range(limit + 3):  # groups that never committed: nothing
                assert await log.committed(f"none-{i}-{unique}", topic) == {}
                assert len(log._offset_consumers) <= limit
            assert group not in log._offset_consumers  # the least recently asked went first
            assert await log.committed(group, topic) == want  # asked again: made again
            assert await log.committed(group, f"no-such-topic-{unique}") == {}


def test_the_pipe_wake_up_is_only_used_with_a_tested_confluent_kafka(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipe path reads the `rd_kafka_t *` out of confluent-kafka's objects: with a release it
    was not tested on, the adapter takes the thread path instead of guessing the layout."""
    import confluent_kafka

    assert rdkafka_wakeup._load_librdkafka() is not None  # the installed, tested release
    monkeypatch.setattr(confluent_kafka, "version", lambda: "2.99.0")
    assert rdkafka_wakeup._load_librdkafka() is None
    monkeypatch.setattr(confluent_kafka, "version", lambda: ("2.16.9", 0x021009FF))
    assert rdkafka_wakeup._load_librdkafka() is not None


async def test_a_stale_leader_epoch_refreshes_the_metadata_before_the_retry() -> None:
    """After a broker restart an admin request sent with the old leader epoch is refused
    (FENCED_LEADER_EPOCH) for as long as the client's metadata is stale (chaos seed 6892 on
    librdkafka: replays failed for 90 s on ListOffsets): the retry asks for metadata first."""
    from confluent_kafka import KafkaException

    calls: list[str] = []

    async def ask() -> str:
        calls.append("ask")
        if calls.count("refresh") == 0:
            raise KafkaException(KafkaError(KafkaError.FENCED_LEADER_EPOCH))
        return "offsets"

    async def refresh() -> None:
        calls.append("refresh")

    with trio.fail_after(5):
        assert await rdkafka_admin._retrying(ask, refresh) == "offsets"
    assert calls == ["ask", "refresh", "ask"]

    async def refused() -> str:  # not about the leader: no refresh, no retry
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    calls.clear()
    with pytest.raises(KafkaException):
        await rdkafka_admin._retrying(refused, refresh)
    assert calls == []
