"""The trio <-> kafka-python bridge of nimbus.engines.kafka: its thread calls (`in_thread`, of
nimbus.engines.kafka_common) and the produce path that needs none once the topic's metadata is
known."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
import trio

from nimbus.engines import kafka as kafka_engine
from nimbus.engines import kafka_producer
from nimbus.engines.kafka_common import in_thread
from tests.harness import record_thread_calls

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


async def test_in_thread_returns_raises_and_keeps_the_context() -> None:
    _VAR.set("caller's")

    def work(x: int) -> tuple[int, str, bool]:
        return x * 2, _VAR.get(), threading.current_thread() is threading.main_thread()

    assert await in_thread(work, 21) == (42, "caller's", False)

    def boom() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        await in_thread(boom)


async def test_in_thread_waits_for_the_thread_when_cancelled() -> None:
    """A cancelled caller still waits for the call (a kafka-python object is never left in use
    by a thread nobody waits for); the cancellation arrives after it."""
    finished: list[float] = []

    def slow() -> None:
        time.sleep(0.3)
        finished.append(time.monotonic())

    with trio.move_on_after(0.05) as scope:
        await in_thread(slow)
        await trio.sleep(10)  # the deferred cancellation lands at this checkpoint
    assert scope.cancelled_caught
    assert len(finished) == 1


async def test_small_batches_need_no_thread_once_the_topic_is_known(
    kafka_brokers: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"{unique}-bridge"
    async with kafka_engine.open_kafka_log(kafka_brokers) as log:
        await log.ensure_topics([topic], 2)
        first = await log.producer.send_batch(topic, [(b"a", b"1")])
        calls = record_thread_calls(monkeypatch, kafka_producer)
        more = await log.producer.send_batch(topic, [(b"a", b"2"), (b"b", b"3")])
        assert calls == []
        # A large batch is encoded in a thread: the event loop is not held for all of it.
        big = [(b"k%d" % i, b"v") for i in range(kafka_producer._INLINE_SEND + 1)]
        assert len(await log.producer.send_batch(topic, big)) == len(big)
        assert calls == ["_send_all"]
    assert [w.offset for w in more if w.partition == first[0].partition][0] == first[0].offset + 1
