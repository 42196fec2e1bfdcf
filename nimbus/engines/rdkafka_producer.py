"""Producing on librdkafka (the adapter nimbus.engines.rdkafka): `RdkafkaLogProducer`, the
batches' delivery reports (`_BatchAcks`) and the `_Poller` that serves them."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio
from confluent_kafka import KafkaError, KafkaException, Message, Producer, murmur2
from confluent_kafka.admin import AdminClient
from loguru import logger

from nimbus.engines import kafka_common as kc
from nimbus.engines.kafka_common import in_thread
from nimbus.engines.rdkafka_handle import _close_bounded
from nimbus.engines.rdkafka_wakeup import _QueueFd
from nimbus.ports import LogUnavailable, ProduceFailed, Written

if TYPE_CHECKING:
    from nimbus.engines.rdkafka import RdkafkaLog

_POLLER_WAIT_S = 0.05  # the delivery-report thread's poll (a report ends it at once)
_QUEUE_FULL_WAIT_S = 0.005


class _Poller:
    """Serves a producer's callbacks (delivery reports, errors, log lines) and the admin
    client's (errors, log lines) until stopped: on the trio thread, woken by librdkafka through
    a pipe (_QueueFd), when it can; else on a thread of its own that waits in `poll()`."""

    def __init__(
        self,
        name: str,
        producer: Producer,
        admin: AdminClient | None,
        nursery: trio.Nursery | None,
        client_id: str,
    ) -> None:
        self.producer = producer
        self._admin = admin
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Without a nursery (a log made outside open_rdkafka_log) a thread serves it.
        self._fd = None if nursery is None else _QueueFd.open(producer, client_id, "main")
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        if self._fd is None:
            self._done.set()
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()
        else:
            assert nursery is not None
            nursery.start_soon(self._pump, name=name)

    def _serve(self, wait_s: float) -> None:
        try:
            self.producer.poll(wait_s)
            if self._admin is not None:
                self._admin.poll(0)
        except Exception as exc:  # a callback raised: keep serving the others
            logger.opt(exception=exc).warning("librdkafka poller: a callback failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._serve(_POLLER_WAIT_S)

    async def _pump(self) -> None:
        assert self._fd is not None
        try:
            with self._scope:
                while True:
                    self._fd.drain()
                    self._serve(0)
                    # Log lines and errors of the admin client come without a wake-up.
                    await self._fd.wait(1.0)
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._stop.set()
        self._scope.cancel()
        await self._done.wait()
        if self._fd is not None:
            self._fd.close()
            self._serve(0)  # reports that landed since the last wake-up
        if self._thread is not None:
            await in_thread(self._thread.join)


class _BatchAcks(kc.BatchAcks[KafkaError]):
    """A batch's delivery reports, counted down on the poller thread."""

    __slots__ = ()

    def report(self, i: int, err: KafkaError | None, msg: Message) -> None:
        p, o = msg.partition(), msg.offset()
        if err is None and p is not None and o is not None and o >= 0:
            self.written(i, Written(p, o))
        else:
            self.failed(i, err or KafkaError(KafkaError._FAIL, "no offset"))


class RdkafkaLogProducer:
    def __init__(
        self, log: RdkafkaLog, producer: Producer, make_producer: Callable[[], Producer] | None
    ) -> None:
        self._log = log
        self._make_producer = make_producer
        self._poller = self._new_poller(producer)
        self._generation = 0  # bumped by each replacement of the producer

    def _new_poller(self, producer: Producer) -> _Poller:
        log = self._log
        return _Poller("rdkafka-producer-poll", producer, log._admin, log._nursery, log.client_id)

    @property
    def _producer(self) -> Producer:
        return self._poller.producer

    async def _close(self) -> None:
        await self._poller.stop()
        producer = self._producer

        def close() -> None:
            if producer.flush(5) > 0:
                producer.purge()  # what could not be delivered: fail its reports now
                producer.flush(1)
            producer.close()

        await _close_bounded(close, "librdkafka producer")

    async def _replace(self, generation: int, why: str) -> None:
        """A fatal error (librdkafka's idempotent producer fenced, or its sequence numbers out of
        step) leaves the producer unusable: start over with a new one (a new producer id).
        Once per failing generation."""
        if self._make_producer is None or generation != self._generation:
            return
        self._generation += 1
        old = self._poller
        try:
            self._poller = self._new_poller(self._make_producer())
        except (KafkaException, ValueError, TypeError) as exc:
            logger.warning("librdkafka producer: replacing it after {} failed: {!r}", why, exc)
            return
        logger.warning("librdkafka producer replaced after {}", why)
        await old.stop()

        def drop() -> None:
            old.producer.purge()
            old.producer.flush(1)

        try:
            await in_thread(drop)
        except Exception as exc:  # the old producer is broken anyway
            logger.debug("closing the replaced librdkafka producer: {!r}", exc)

    def partition_for(self, topic: str, key: bytes) -> int:
        """Kafka's murmur2 partition; the topic's count must be known (ensure_topics or a send).
        librdkafka's own murmur2 partitioner function (~0.1 µs; nimbus.engines.murmur2 in Python
        ~2.5 µs), the same result (tests/test_log_contract.py)."""
        return murmur2(key, kc.known_count(self._log._counts, topic))

    async def send_batch(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> list[Written]:
        n = await self._log.partition_count(topic)  # LogUnavailable for an unknown topic
        if not items:
            return []
        generation = self._generation
        producer = self._producer
        acks = _BatchAcks(len(items), trio.lowlevel.current_trio_token())
        report = acks.report
        produce = producer.produce
        with trio.move_on_after(kc.SEND_TIMEOUT_S):
            # Appended from this thread: produce() never blocks (no metadata wait, no I/O).
            for i, (key, value) in enumerate(items):
                while True:
                    try:
                        produce(topic, value, key, on_delivery=functools.partial(report, i))
                        break
                    except BufferError:  # librdkafka's local queue is full: let it drain
                        await trio.sleep(_QUEUE_FULL_WAIT_S)
                    except KafkaException as exc:
                        err = exc.args[0] if exc.args else exc
                        raise ProduceFailed(
                            f"send to {topic!r} failed (item {i} of {len(items)}): {err}"
                        ) from exc
                    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: closed
                        raise ProduceFailed(f"send to {topic!r} failed: {exc!r}") from exc
            await acks.done.wait()
        if not acks.done.is_set():
            raise acks.timed_out(topic)
        if acks.errors:
            _i, first = acks.first_error()
            if any(err.fatal() for _, err in acks.errors):
                await self._replace(generation, f"a fatal error ({first})")
            raise acks.failure(topic, str(first))
        written = [w for w in acks.results if w is not None]
        await self._check_partitions(topic, n, items, written)
        return written

    async def _check_partitions(
        self, topic: str, n: int, items: Sequence[tuple[bytes, bytes]], written: list[Written]
    ) -> None:
        """librdkafka partitions over the count in its own metadata: if records landed where
        partition_for() would not put them, the topic's count changed; learn the new one."""
        for (key, _), w in zip(items, written, strict=True):
            if murmur2(key, n) != w.partition:
                break
        else:
            return
        self._log._counts.pop(topic, None)
        try:
            now = await self._log.partition_count(topic)
        except LogUnavailable as exc:
            logger.warning("topic {}: records landed off their partition; {}", topic, exc)
            return
        logger.warning("topic {} now has {} partitions (was {})", topic, now, n)
