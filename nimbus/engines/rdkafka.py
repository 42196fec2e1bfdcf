"""The real log on librdkafka (confluent-kafka): the second adapter of the Log port.

Chosen with NIMBUS_KAFKA_CLIENT=librdkafka (kafka-python, nimbus.engines.kafka, is the default).
It keeps the kafka-python adapter's semantics, which the contract tests (tests/test_log_contract.py)
hold both to; the bridge to trio is different because librdkafka's calls are different:

- Producing never blocks: `produce()` only appends to librdkafka's queue, so a batch is appended
  from the trio thread, whatever its size (a full local queue, BufferError, waits in trio).
  Delivery reports are only handed out by `poll()`: one small thread per producer (`_Poller`)
  polls every 50 ms (a report wakes it at once) and a batch wakes trio once, through the trio
  token, when its last report lands. Partitions are chosen by librdkafka's `murmur2_random`,
  the Java client's and kafka-python's partitioner (librdkafka's default, consistent_random, is
  a different hash): `partition_for` (nimbus.engines.murmur2) names the same partition, and a
  batch whose records land elsewhere (the topic grew) refreshes the partition count.
- A consumer's queue is read without a thread when it already holds records: `consume(n, 0)`
  never blocks. Only a poll that has to wait goes to a worker thread (`in_thread`, waited for
  even when cancelled), for `poll(slice)` and then `consume(n - 1, 0)` for what came with it
  (librdkafka's `consume(n, timeout)` waits for all n, or the whole timeout). A consumer is used
  by one thread at a time, and never after its close: each consumer/reader serialises its calls
  with a trio.Lock, and every call into the librdkafka handle, from whichever thread, holds the
  handle's own threading.Lock (`_Handle`). That second lock also covers the threads a caller
  stops waiting for (a commit or a close given up on keeps running): the trio thread never
  blocks on it (a busy handle sends the poll to a worker thread, or waits for the next one), a
  close waits for the call in flight to return, and nothing calls the handle once it is closed
  (confluent-kafka's close destroys the C handle under any call still inside it: a segfault).
- Rebalance callbacks (cooperative-sticky), offset-commit results, errors and log lines are
  served inside those calls, on whichever thread makes them; they only record what happened.
- Admin requests return concurrent futures completed on librdkafka's background thread; they
  wake trio through the token too (no worker thread).
- Nothing here creates topics except ensure_topics; an unknown topic is `LogUnavailable`.
- Every librdkafka error becomes one of ours: `LogUnavailable`, `ProduceFailed`, `CommitFailed`.

Group semantics are the kafka-python adapter's (and the memory engine's): each `PollResult`
reports the rebalance news since the previous poll, to be applied as "remove `revoked`, then add
`assigned`"; commits are checked on the client against the current assignment; `commit_later`
offsets go out asynchronously with the next poll, are dropped for partitions no longer owned and
retried, while owned, when refused. That bookkeeping is shared: nimbus.engines.kafka_common.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import glob
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import confluent_kafka
import outcome
import trio
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
    murmur2,
)
from confluent_kafka import TopicPartition as RdTP
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.cimpl import NewTopic
from loguru import logger

from nimbus.engines import kafka_common as kc
from nimbus.engines.kafka_common import BOOTSTRAP_TIMEOUT_S, in_thread
from nimbus.ports import (
    CommitFailed,
    EngineError,
    LogProducer,
    LogUnavailable,
    PollResult,
    ProduceFailed,
    Record,
    TopicPartition,
    Written,
)

T = TypeVar("T")

_REQUEST_TIMEOUT_S = 15.0
_POLLER_WAIT_S = 0.05  # the delivery-report thread's poll (a report ends it at once)
_TOPIC_READY_TIMEOUT_S = 15.0
_QUEUE_FULL_WAIT_S = 0.005

_OFFSET_CONSUMERS = 8  # committed(): group consumers kept open (the web view asks for a few)
_CLOSE_TIMEOUT_S = 10.0  # a consumer's close (LeaveGroup) or a producer's final flush, at most
# A synchronous commit waits this long at most (librdkafka's has no timeout: a commit waits for
# the group coordinator while there is none).
_COMMIT_TIMEOUT_S = 10.0

# Consumer errors after which polling on is pointless: the topic is not ours to read. (An unknown
# topic is not among them: a consumer's first metadata may predate a just-created topic, as may
# a restarted broker's; librdkafka keeps looking, and says so in the log.)
_FATAL_CONSUMER_ERRORS = frozenset(
    {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}
)


def _code(exc: BaseException) -> int | None:
    """The KafkaError code inside a KafkaException (None for anything else)."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0].code()
    return None


# Errors of an admin request that a moment later may not recur: a just-created topic whose leader
# does not know it leads yet, a coordinator loading, a broker restarting.
_RETRIABLE = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


def _retriable(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and (err.retriable() or err.code() in _RETRIABLE)


# Errors that say the client's idea of a partition's leader is out of date.
_STALE_LEADER = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
    }
)


async def _retrying(
    call: Callable[[], Awaitable[T]], refresh: Callable[[], Awaitable[object]] | None = None
) -> T:
    """`call()`, again while it fails with a retriable error, for up to the request timeout;
    `refresh()` (a metadata request) first when the error says the leader is out of date."""
    deadline = trio.current_time() + _REQUEST_TIMEOUT_S
    while True:
        try:
            return await call()
        except KafkaException as exc:
            if not _retriable(exc) or trio.current_time() >= deadline:
                raise
            logger.debug("librdkafka admin request: {}; retrying", exc)
            if refresh is not None and _code(exc) in _STALE_LEADER:
                try:
                    await refresh()
                except (KafkaException, LogUnavailable) as again:
                    logger.debug("librdkafka metadata refresh: {}", again)
        await trio.sleep(0.1)


def _record(m: Message) -> Record:
    ts_type, ts = m.timestamp()
    return Record(
        m.topic() or "",
        -1 if (p := m.partition()) is None else p,
        -1 if (o := m.offset()) is None else o,
        m.key(),
        m.value() or b"",
        0 if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
    )


class _RdLog:
    """librdkafka's log lines (served by poll/consume, as `logger` asks) into loguru."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = fmt % args
        if level >= logging.ERROR:
            logger.warning("librdkafka: {}", text)
        elif level >= logging.WARNING:
            logger.info("librdkafka: {}", text)
        else:
            logger.debug("librdkafka: {}", text)


_RDLOG = _RdLog()


def _on_error(what: str) -> Callable[[KafkaError], None]:
    """An `error_cb`: librdkafka's client-wide errors (broker down, ...), retried by librdkafka
    itself; only logged."""

    def cb(err: KafkaError) -> None:
        if err.fatal():
            logger.error("librdkafka {}: fatal error {}", what, err)
        else:
            logger.info("librdkafka {}: {}", what, err)

    return cb


def _common(brokers: str, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": brokers,
        "client.id": client_id,
        "socket.connection.setup.timeout.ms": int(BOOTSTRAP_TIMEOUT_S * 1000),
        # After a broker restart, reconnect within ~2 s rather than librdkafka's 10 s backoff.
        "reconnect.backoff.max.ms": 2_000,
        # Small requests go out at once (librdkafka leaves Nagle's algorithm on by default).
        "socket.nagle.disable": True,
        # Leaders and their epochs as the cluster has them now, within 5 s (librdkafka's default
        # is 5 min): after a broker restart, an admin ListOffsets sent with a stale leader epoch
        # is refused (FENCED_LEADER_EPOCH) until the cache is refreshed.
        "topic.metadata.refresh.interval.ms": 5_000,
        "logger": _RDLOG,
    }


async def _wait_future(fut: concurrent.futures.Future[T], timeout: float, what: str) -> T:
    """The future's result, awaited in trio: librdkafka's background thread completes it and
    wakes this task through the trio token. LogUnavailable if it takes longer than `timeout`;
    the future's own exception (a KafkaException) otherwise."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(wake)
    with trio.move_on_after(timeout):
        await done.wait()
    if not fut.done():
        raise LogUnavailable(f"{what}: no answer within {timeout:.0f} s")
    return fut.result()


async def _in_thread_abandonable(fn: Callable[[], T]) -> T:
    """`fn()` in a thread started at once (whatever happens to the caller); the caller may stop
    waiting for it (cancelled) and leave it running."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[outcome.Outcome[T]](1)

    def deliver(result: outcome.Outcome[T]) -> None:
        try:
            token.run_sync_soon(send.send_nowait, result)
        except trio.RunFinishedError:
            pass

    trio.lowlevel.start_thread_soon(fn, deliver)
    return (await receive.receive()).unwrap()


class _Busy(Exception):
    """The librdkafka handle is in use by another thread (a call its caller gave up on)."""


class _Handle:
    """The one-thread-at-a-time guard of a librdkafka consumer: every call into it holds `_lock`
    (whichever thread makes it), and none is made after `close` (which waits for the call in
    flight). confluent-kafka's calls are not safe against one another on one consumer: `close()`
    destroys the C handle under a `poll()`/`consume()`/`commit()` still using it (SIGSEGV), and a
    trio task that stops waiting for a thread (`_in_thread_abandonable`) leaves that thread
    inside the handle while the task's next call goes on."""

    __slots__ = ("_lock", "_what", "closed")

    def __init__(self, what: str) -> None:
        self._lock = threading.Lock()
        self._what = what
        self.closed = False  # set under _lock by close(): no call into the handle after it

    def busy(self) -> bool:
        return self._lock.locked()

    def call(self, fn: Callable[..., T], *args: Any, wait: float = -1) -> T:
        """`fn(*args)` holding the handle, waiting up to `wait` s for it (-1: as long as it
        takes; 0: not at all, for the trio thread): `_Busy` if not got; RuntimeError (as
        confluent-kafka's own, for a closed consumer) once closed."""
        if not self._lock.acquire(True, wait):
            raise _Busy(self._what)
        try:
            if self.closed:
                raise RuntimeError(f"{self._what} is closed")
            return fn(*args)
        finally:
            self._lock.release()

    def close(self, close: Callable[[], object]) -> None:
        """`close()` once the call in flight, if any, has returned; the last call (a thread)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            close()


async def _close_bounded(fn: Callable[[], object], what: str) -> None:
    """`fn()` (a close) in a thread, waited for up to _CLOSE_TIMEOUT_S, then left to finish on
    its own: librdkafka's close has no timeout of its own, and a shutdown must not hang on an
    unreachable broker."""
    with trio.move_on_after(_CLOSE_TIMEOUT_S):
        await _in_thread_abandonable(fn)
        return
    logger.warning("{}: not closed within {:.0f} s; left to finish", what, _CLOSE_TIMEOUT_S)


# -- waking trio from librdkafka's queues, without a thread ----------------------------------
#
# librdkafka can write a byte to a file descriptor when one of its queues gets an item after it
# was last served (rd_kafka_queue_io_event_enable): a consumer's queue (records, rebalances,
# commit answers, errors) or a producer's main queue (delivery reports). trio then waits for
# the pipe like for a socket and serves the queue from its own thread with calls that never
# block (`consume(n, 0)`, `poll(0)`): no thread hand-off, no GIL hand-over, no trio-token wake
# per poll. confluent-kafka does not wrap that call, so it is made through ctypes, on the
# rd_kafka_t pointer that confluent-kafka keeps right after the object's header (checked: the
# handle's name must be the one this client was given, else the thread path is used).
# NIMBUS_RDKAFKA_FD_WAKEUP=0 turns it off (the thread path: a worker thread waits in poll()).

_FD_WAKEUP = os.environ.get("NIMBUS_RDKAFKA_FD_WAKEUP", "1").strip() not in ("0", "false", "no")


# confluent-kafka releases whose object layout (the `rd_kafka_t *` right after the header) this
# was tested with; another release takes the thread path rather than read an unknown layout.
_FD_TESTED_RELEASES = ("2.16.",)


def _release() -> str:
    """confluent-kafka's release, e.g. "2.16.2" (its version() is that string; older releases
    returned a (string, int) tuple)."""
    v: Any = confluent_kafka.version()
    return str(v[0] if isinstance(v, tuple) else v)


def _load_librdkafka() -> ctypes.CDLL | None:
    """The librdkafka that confluent-kafka's extension is linked with (its wheel bundles one),
    with the few functions used here typed; None if it cannot be found, is another version, or
    confluent-kafka is a release this was not tested with."""
    if not _release().startswith(_FD_TESTED_RELEASES):
        return None
    here = os.path.dirname(confluent_kafka.__file__)
    paths = sorted(glob.glob(os.path.join(here, "..", "confluent_kafka.libs", "librdkafka*.so*")))
    try:
        lib = ctypes.CDLL(paths[0]) if paths else ctypes.CDLL("librdkafka.so.1")
        lib.rd_kafka_version.restype = ctypes.c_int
        if lib.rd_kafka_version() != confluent_kafka.libversion()[1]:
            return None
        lib.rd_kafka_name.restype = ctypes.c_char_p
        lib.rd_kafka_name.argtypes = [ctypes.c_void_p]
        for name in ("rd_kafka_queue_get_consumer", "rd_kafka_queue_get_main"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_void_p
            fn.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_queue_destroy.restype = None
        lib.rd_kafka_queue_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_queue_io_event_enable.restype = None
        lib.rd_kafka_queue_io_event_enable.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
    except (OSError, AttributeError):
        return None
    return lib


_LIB: ctypes.CDLL | None | bool = False  # not looked for yet
_WAKE_BYTE = ctypes.create_string_buffer(b"!", 1)  # what librdkafka writes (kept alive here)


def _lib() -> ctypes.CDLL | None:
    global _LIB
    if _LIB is False:
        _LIB = _load_librdkafka() if _FD_WAKEUP else None
        if _FD_WAKEUP and _LIB is None:
            logger.info(
                "librdkafka: no io-event wake-ups (confluent-kafka {} untested, or its library"
                " not found); threads wait instead",
                _release(),
            )
    return _LIB  # type: ignore[return-value]


class _QueueFd:
    """A pipe librdkafka writes to when a queue of `handle` gets an item: `main` (a producer's
    delivery reports) or the consumer queue. `close()` before the handle's own close."""

    __slots__ = ("_lib", "_q", "r", "w")

    def __init__(self, lib: ctypes.CDLL, q: int) -> None:
        self._lib = lib
        self._q: int | None = q
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        lib.rd_kafka_queue_io_event_enable(q, self.w, ctypes.addressof(_WAKE_BYTE), 1)

    @classmethod
    def open(cls, handle: Consumer | Producer, client_id: str, kind: str) -> _QueueFd | None:
        lib = _lib()
        if lib is None:
            return None
        # confluent-kafka's Handle: PyObject_HEAD, then `rd_kafka_t *rk`.
        rk = ctypes.c_void_p.from_address(id(handle) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        name = lib.rd_kafka_name(rk) if rk else None
        role = "consumer" if isinstance(handle, Consumer) else "producer"
        if not name or not name.decode(errors="replace").startswith(f"{client_id}#{role}-"):
            logger.warning("librdkafka: {} handle not recognised; threads wait instead", role)
            return None
        get = lib.rd_kafka_queue_get_main if kind == "main" else lib.rd_kafka_queue_get_consumer
        q = get(rk)
        return cls(lib, q) if q else None

    def drain(self) -> None:
        try:
            while len(os.read(self.r, 512)) == 512:
                pass
        except BlockingIOError:
            pass

    async def wait(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self.r)

    def close(self) -> None:
        """No more wake-ups (librdkafka's queue lock makes this wait for a write in flight),
        then the queue reference and the pipe go; idempotent."""
        if self._q is None:
            return
        q, self._q = self._q, None
        self._lib.rd_kafka_queue_io_event_enable(q, -1, None, 0)
        self._lib.rd_kafka_queue_destroy(q)
        for fd in (self.r, self.w):
            try:
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:  # not in trio (a thread's close)
                pass
            os.close(fd)


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


@asynccontextmanager
async def open_rdkafka_log(
    brokers: str, *, linger_ms: int = 2, client_id: str = "nimbus", fetch_wait_ms: int = 0
) -> AsyncIterator[RdkafkaLog]:
    """Connect to the cluster; LogUnavailable if it does not answer within ~15 s."""
    common = _common(brokers, client_id)

    def make_producer() -> Producer:
        return Producer(
            {
                **common,
                "acks": "all",
                "enable.idempotence": True,
                # Kafka's (Java's, kafka-python's) partitioner: murmur2 of the key.
                "partitioner": "murmur2_random",
                "linger.ms": linger_ms,
                "message.timeout.ms": kc.DELIVERY_TIMEOUT_MS,
                "request.timeout.ms": int(_REQUEST_TIMEOUT_S * 1000),
                "allow.auto.create.topics": False,
                "error_cb": _on_error("producer"),
            }
        )

    await kc.probe(brokers, BOOTSTRAP_TIMEOUT_S)
    try:
        admin_config: dict[str, Any] = {**common, "error_cb": _on_error("admin")}
        admin = AdminClient(admin_config)
        # A TCP port that accepts is not yet a broker that answers: ask it once, bounded.
        await _wait_future(
            admin.describe_cluster(request_timeout=BOOTSTRAP_TIMEOUT_S),
            BOOTSTRAP_TIMEOUT_S + 1,
            "describe cluster",
        )
        producer = make_producer()
    except (KafkaException, LogUnavailable, ValueError, TypeError) as exc:
        raise kc.not_reachable(brokers, BOOTSTRAP_TIMEOUT_S, exc) from exc
    async with trio.open_nursery() as nursery:
        log = RdkafkaLog(brokers, client_id, admin, producer, make_producer, nursery, fetch_wait_ms)
        async with kc.closed_after(log._close):
            yield log


class RdkafkaLog(kc.LogBase):
    """The Log port over one Kafka cluster: a shared producer and admin client."""

    def __init__(
        self,
        brokers: str,
        client_id: str,
        admin: AdminClient,
        producer: Producer,
        make_producer: Callable[[], Producer] | None = None,
        nursery: trio.Nursery | None = None,
        fetch_wait_ms: int = 0,
    ) -> None:
        super().__init__(brokers, client_id)
        self._admin = admin
        self._nursery = nursery  # the producer's poller task (none: a poller thread)
        # > 0: a group consumer's fetch waits this long for records to gather at the broker
        # (fewer, larger fetches at paced rates: less CPU here and in the broker).
        self.fetch_wait_ms = fetch_wait_ms
        self._producer = RdkafkaLogProducer(self, producer, make_producer)
        # committed(): one never-subscribed consumer per group asked (see there)
        self._offset_consumers: dict[str, tuple[Consumer, _Handle]] = {}
        # Typed as the port: Log.producer is a plain (invariant) protocol attribute.
        self.producer: LogProducer = self._producer

    async def _close(self) -> None:
        consumers, self._offset_consumers = self._offset_consumers, {}
        for group, (raw, handle) in consumers.items():
            try:
                await _close_bounded(
                    functools.partial(handle.close, raw.close), f"offsets consumer {group!r}"
                )
            except Exception as exc:
                logger.warning("closing the offsets consumer of {!r} failed: {}", group, exc)
        try:
            await self._producer._close()
        except Exception as exc:  # closing must not mask the body's error
            logger.warning("librdkafka producer close failed: {}", exc)

    # -- topics -----------------------------------------------------------------------------

    async def _describe(self, names: Iterable[str]) -> dict[str, tuple[int, bool]]:
        """(partition count, every partition has a leader) of the existing topics in `names`."""
        unique = list(dict.fromkeys(names))

        async def ask() -> dict[str, tuple[int, bool]]:
            futures = self._admin.describe_topics(
                TopicCollection(unique), request_timeout=_REQUEST_TIMEOUT_S
            )
            found: dict[str, tuple[int, bool]] = {}
            for name, fut in futures.items():
                try:
                    desc = await _wait_future(fut, _REQUEST_TIMEOUT_S + 1, f"describe {name!r}")
                except KafkaException as exc:
                    if _code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        continue
                    raise
                parts = desc.partitions
                if parts:
                    found[name] = (len(parts), all(p.leader is not None for p in parts))
            return found

        try:
            return await _retrying(ask)
        except KafkaException as exc:
            raise kc.unavailable(self.brokers, f"describe {unique}", exc) from exc

    async def _count_of(self, topic: str) -> int | None:
        found = await self._describe([topic])
        return found[topic][0] if topic in found else None

    async def ensure_topics(self, names: Sequence[str], partitions: int) -> dict[str, int]:
        existing = await self._describe(names)
        missing = kc.missing_topics(names, existing)
        if missing:
            futures = self._admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=-1) for n in missing],
                request_timeout=_REQUEST_TIMEOUT_S,
                operation_timeout=_REQUEST_TIMEOUT_S,
            )
            for name, fut in futures.items():
                try:
                    await _wait_future(fut, _REQUEST_TIMEOUT_S + 1, f"create {name!r}")
                except KafkaException as exc:
                    if _code(exc) != KafkaError.TOPIC_ALREADY_EXISTS:  # lost a race: fine
                        raise LogUnavailable(f"creating topic {name!r}: {exc}") from exc
        # Ready when every partition has a leader in the metadata (kafka-python's
        # wait_for_topics): a producer or group member that starts earlier may see none.
        with trio.move_on_after(_TOPIC_READY_TIMEOUT_S):
            while True:
                existing = await self._describe(names)
                if all(existing.get(n, (0, False))[1] for n in names):
                    break
                await trio.sleep(0.1)
        absent = [n for n in names if n not in existing]
        if absent:
            raise LogUnavailable(f"Kafka at {self.brokers}: topics {absent} not ready")
        counts = {n: existing[n][0] for n in names}
        self._counts.update(counts)
        return counts

    # -- offsets ------------------------------------------------------------------------------

    async def _offsets(self, topic: str, spec: OffsetSpec) -> dict[int, int]:
        n = await self.partition_count(topic)

        async def ask() -> dict[int, int]:
            futures = self._admin.list_offsets(
                {RdTP(topic, p): spec for p in range(n)}, request_timeout=_REQUEST_TIMEOUT_S
            )
            out: dict[int, int] = {}
            for rtp, fut in futures.items():
                info = await _wait_future(fut, _REQUEST_TIMEOUT_S + 1, f"offsets of {topic!r}")
                out[rtp.partition] = int(info.offset)
            return out

        async def refresh() -> object:
            # A metadata request for the topic: its answer updates the leaders and epochs the
            # admin client sends ListOffsets with (a broker restart moves the epoch on).
            return await in_thread(
                functools.partial(self._admin.list_topics, topic, timeout=_REQUEST_TIMEOUT_S)
            )

        try:
            out = await _retrying(ask, refresh)
        except KafkaException as exc:
            if _code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self._counts.pop(topic, None)
                raise LogUnavailable(f"unknown topic {topic!r}") from exc
            raise kc.unavailable(self.brokers, f"offsets of {topic!r}", exc) from exc
        return dict(sorted(out.items()))

    async def end_offsets(self, topic: str) -> dict[int, int]:
        return await self._offsets(topic, OffsetSpec.latest())  # type: ignore[no-untyped-call]

    async def begin_offsets(self, topic: str) -> dict[int, int]:
        return await self._offsets(topic, OffsetSpec.earliest())  # type: ignore[no-untyped-call]

    async def committed(self, group: str, topic: str) -> dict[int, int]:
        # Like the memory engine, an unknown group or topic simply has no committed offsets.
        # Asked through a consumer of the group (never subscribed: it does not join), not
        # AdminClient.list_consumer_group_offsets: librdkafka's admin OffsetFetch crashes the
        # process when the coordinator answers NOT_COORDINATOR / COORDINATOR_NOT_AVAILABLE (a
        # broker (re)starting: rd_kafka_handle_OffsetFetch calls rd_kafka_cgrp_op on the admin
        # handle's NULL rk_cgrp, SIGSEGV; librdkafka #5040) and can trip an assertion when a
        # coordinator answer comes after the request's timeout (rd_kafka_admin_coord_response_
        # parse: `eonce->refcnt > 0`, SIGABRT; #3663). A group consumer's committed() goes
        # through its own group handle, which looks the coordinator up again instead.
        n = self._counts.get(topic)
        if n is None:
            n = await self._count_of(topic)  # LogUnavailable if the cluster does not answer
            if n is None:
                return {}
            self._counts[topic] = n
        c, handle = await self._offsets_consumer(group)
        tps = [RdTP(topic, p) for p in range(n)]

        def ask() -> list[RdTP]:
            c.poll(0)  # its log lines and errors (never polled otherwise)
            return c.committed(tps, timeout=_REQUEST_TIMEOUT_S)

        with trio.move_on_after(_REQUEST_TIMEOUT_S + 1):
            try:
                res = await _in_thread_abandonable(functools.partial(handle.call, ask))
            except (KafkaException, RuntimeError) as exc:
                raise kc.unavailable(self.brokers, f"committed {group!r}", exc) from exc
            return {
                t.partition: int(t.offset)
                for t in sorted(res, key=lambda t: t.partition)
                if t.error is None and t.offset >= 0
            }
        raise LogUnavailable(f"Kafka at {self.brokers}: committed {group!r}: no answer")

    async def _offsets_consumer(self, group: str) -> tuple[Consumer, _Handle]:
        """The group's committed-offsets consumer (made once, closed with the log; at most
        _OFFSET_CONSUMERS kept, the least recently asked closed first)."""
        got = self._offset_consumers.pop(group, None)
        if got is not None:
            self._offset_consumers[group] = got  # most recent last
        else:
            while len(self._offset_consumers) >= _OFFSET_CONSUMERS:
                old, (old_raw, old_handle) = next(iter(self._offset_consumers.items()))
                del self._offset_consumers[old]
                await _close_bounded(
                    functools.partial(old_handle.close, old_raw.close), f"offsets consumer {old!r}"
                )
            config = {
                **self._consumer_config(),
                "group.id": group,
                "error_cb": _on_error(f"offsets of {group!r}"),
            }
            try:
                raw = await in_thread(Consumer, config)
            except (KafkaException, ValueError, TypeError) as exc:
                raise kc.unavailable(self.brokers, f"committed {group!r}", exc) from exc
            got = self._offset_consumers.setdefault(group, (raw, _Handle(f"offsets {group}")))
            if got[0] is not raw:  # another task made one meanwhile
                await _close_bounded(raw.close, f"offsets consumer {group!r}")
        return got

    # -- consumers ----------------------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        return {
            **_common(self.brokers, self.client_id),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "allow.auto.create.topics": False,
            # librdkafka prefetches up to this much per consumer (default 64 MB).
            "queued.max.messages.kbytes": 16_384,
        }

    @asynccontextmanager
    async def consumer(
        self, topic: str, group: str, *, max_poll_records: int = 500
    ) -> AsyncIterator[RdkafkaGroupConsumer]:
        await self.partition_count(topic)
        c = RdkafkaGroupConsumer(topic, group, max_poll_records)

        def make() -> Consumer:
            raw = Consumer(
                {
                    **self._consumer_config(),
                    "group.id": group,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "cooperative-sticky",
                    # A SIGKILLed member holds its partitions until this expires (the broker's
                    # group.min.session.timeout.ms is 6 s), as in the kafka-python adapter.
                    "session.timeout.ms": 6_000,
                    "heartbeat.interval.ms": 1_000,
                    # A topic created after this consumer's first metadata is seen within 5 s.
                    "topic.metadata.refresh.interval.ms": 5_000,
                    **(
                        {"fetch.wait.max.ms": self.fetch_wait_ms, "fetch.min.bytes": 1 << 20}
                        if self.fetch_wait_ms > 0
                        else {}
                    ),
                    "on_commit": c._on_commit,
                    "error_cb": c._on_error,
                }
            )
            try:
                raw.subscribe(
                    [topic],
                    on_assign=c._listener.on_assign,
                    on_revoke=c._listener.on_revoke,
                    on_lost=c._listener.on_lost,
                )
            except BaseException:
                raw.close()
                raise
            return raw

        try:
            c._c = await in_thread(make)
        except (KafkaException, ValueError, TypeError) as exc:
            raise kc.unavailable(self.brokers, f"consumer of {topic!r}", exc) from exc
        c._fd = _QueueFd.open(c._c, self.client_id, "consumer")
        async with kc.closed_after(c.aclose):
            yield c

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[RdkafkaReader]:
        def make() -> Consumer:
            # librdkafka wants a group id even for a consumer that only assigns; it never joins
            # or commits with it. auto.offset.reset "error": an out-of-range fetch is reported
            # instead of silently jumping.
            return Consumer(
                {
                    **self._consumer_config(),
                    "group.id": f"{self.client_id}-reader",
                    "auto.offset.reset": "error",
                    "fetch.wait.max.ms": kc.READER_FETCH_WAIT_MS,
                    "queued.max.messages.kbytes": 8_192,
                    "error_cb": _on_error("reader"),
                }
            )

        try:
            raw = await in_thread(make)
        except (KafkaException, ValueError, TypeError) as exc:
            raise kc.unavailable(self.brokers, "reader", exc) from exc
        r = RdkafkaReader(self, raw)
        async with kc.closed_after(r.aclose):
            yield r


# -- producing --------------------------------------------------------------------------------


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


# -- consuming --------------------------------------------------------------------------------


class _RebalanceListener(kc.RebalanceEvents):
    """Ordered rebalance events; librdkafka calls it inside poll/consume/close."""

    # With cooperative-sticky these are the incremental changes; confluent-kafka applies them
    # (incremental_assign/unassign) after the callback returns.
    def on_assign(self, _consumer: Consumer, partitions: list[RdTP]) -> None:
        self.add(True, partitions)

    def on_revoke(self, _consumer: Consumer, partitions: list[RdTP]) -> None:
        self.add(False, partitions)

    def on_lost(self, _consumer: Consumer, partitions: list[RdTP]) -> None:
        self.add(False, partitions)


class RdkafkaGroupConsumer(kc.GroupConsumerBase):
    """A LogConsumer: one librdkafka consumer in a group, subscribed to one topic."""

    _listener: _RebalanceListener

    def __init__(self, topic: str, group: str, max_poll_records: int) -> None:
        super().__init__(_RebalanceListener(), topic, group, max_poll_records)
        self._c: Consumer = None  # type: ignore[assignment]  # set by RdkafkaLog.consumer
        self._error: EngineError | None = None  # to raise from the next poll
        # Every call into _c holds it, on any thread, abandoned commits included; the close
        # waits for the call in flight, and nothing calls _c after it.
        self._handle = _Handle(f"consumer {group}/{topic}")
        # Set when librdkafka can wake this consumer's polls through a pipe (no thread waits).
        self._fd: _QueueFd | None = None

    # -- callbacks (served inside consume/poll/close, on the thread making the call) ----------

    def _on_commit(self, err: KafkaError | None, partitions: list[RdTP]) -> None:
        """The answer to an asynchronous commit: keep what was refused for a retry."""
        refused = {
            kc.tp(p.topic, p.partition): p.offset
            for p in partitions
            if (err is not None or p.error is not None) and p.offset >= 0
        }
        if refused:
            self._refuse(refused)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            logger.error("librdkafka consumer {}/{}: fatal error {}", self.group, self.topic, err)
            self._error = LogUnavailable(f"consumer {self.group}/{self.topic}: {err}")
        else:
            logger.info("librdkafka consumer {}/{}: {}", self.group, self.topic, err)

    # -- polling -------------------------------------------------------------------------------

    def _records(self, msgs: list[Message]) -> list[Record]:
        out: list[Record] = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(_record(m))
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.fatal() or err.code() in _FATAL_CONSUMER_ERRORS:
                self._error = LogUnavailable(f"poll {self.group}/{self.topic}: {err}")
            else:  # transient: librdkafka retries it
                logger.info("librdkafka consumer {}/{}: {}", self.group, self.topic, err)
        return out

    def _take_ready(self, commit: dict[TopicPartition, int], budget: int) -> list[Message]:
        """Send `commit`, take what librdkafka already holds: never blocks (trio thread, the
        handle held)."""
        if commit:
            self._commit_async(commit)
        return self._c.consume(budget, 0)

    def _poll_wait(self, budget: int, wait_s: float) -> list[Message]:
        m = self._c.poll(wait_s)
        if m is None:
            return []
        return [m, *self._c.consume(budget - 1, 0)] if budget > 1 else [m]

    def _wait_sync(self, budget: int, wait_s: float) -> list[Message]:
        """Wait up to `wait_s` for a record (worker thread), then take what came with it; for
        the handle too, if an abandoned call still holds it (nothing then, this slice)."""
        try:
            return self._handle.call(self._poll_wait, budget, wait_s, wait=wait_s)
        except _Busy:
            return []

    async def poll(self, max_records: int, timeout: float) -> PollResult:
        budget, deadline = self._poll_window(max_records, timeout)
        async with self._lock:
            if self.closed:  # closed while this poll waited for the lock
                raise LogUnavailable("consumer is closed")
            while True:
                if self._error is not None:
                    err, self._error = self._error, None
                    raise err
                commit = self._take_later()
                fd = self._fd
                if fd is not None:
                    fd.drain()  # before the queue is served: a later item writes again
                try:
                    try:
                        # What librdkafka already holds, without a thread: never blocks.
                        msgs = self._handle.call(self._take_ready, commit, budget, wait=0)
                    except _Busy:  # an abandoned commit still runs: the commit waits, as we do
                        for p, off in commit.items():
                            self._later.setdefault(p, off)
                        commit, msgs = {}, []
                        fd = None  # the handle is busy: the thread path waits for it
                    left = deadline - trio.current_time()
                    if not msgs and not self._listener.pending() and left > 0:
                        if fd is not None:
                            # librdkafka writes to the pipe when the queue gets an item.
                            await fd.wait(min(left, kc.SLICE_S))
                        else:
                            # Not abandoned on cancel: records handed over by librdkafka (its
                            # position moved past them) are returned before any checkpoint.
                            msgs = await in_thread(self._wait_sync, budget, min(left, kc.SLICE_S))
                except (KafkaException, RuntimeError) as exc:
                    raise self._poll_failed(commit, exc) from exc
                result = self._result(self._records(msgs), deadline)
                if result is not None:
                    return result

    # -- commits -------------------------------------------------------------------------------

    def _assigned_only(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The offsets of partitions assigned to this member now (the rebalance callbacks are
        the only way an assignment changes here)."""
        self._apply_events()
        return kc.owned_only(offsets, self._owned)

    def _send_commit(self, mine: dict[TopicPartition, int]) -> None:
        """Sends the commit (never blocks); _on_commit hears its answer in a later poll."""
        try:
            self._c.commit(
                offsets=[RdTP(p.topic, p.partition, off) for p, off in mine.items()],
                asynchronous=True,
            )
        except KafkaException:
            self._refuse(mine)

    def _held(self, fn: Callable[..., None], *args: Any) -> Callable[[], None]:
        """`fn(*args)` holding the handle, for a thread that may be abandoned."""
        return functools.partial(self._handle.call, fn, *args)

    def _before_retry(self) -> None:
        # Refused commits are kept only for partitions owned now: the callbacks' latest news.
        self._apply_events()

    def _commit_sync(self, offsets: dict[TopicPartition, int]) -> None:
        kc.check_assigned(offsets, kc.as_tps(self._c.assignment()))
        done = self._c.commit(
            offsets=[RdTP(p.topic, p.partition, off) for p, off in offsets.items()],
            asynchronous=False,
        )
        refused = [t for t in done or [] if t.error is not None]
        if refused:
            raise CommitFailed(
                f"commit {self.group}/{self.topic} refused: "
                + ", ".join(f"{t.topic}[{t.partition}]: {t.error}" for t in refused)
            )

    def _commit_owned_sync(self, offsets: dict[TopicPartition, int]) -> None:
        mine = kc.owned_only(offsets, kc.as_tps(self._c.assignment()))
        if mine:
            self._commit_sync(mine)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not self._commit_wanted(offsets):
            return
        async with self._lock:
            if self.closed:  # closed while this commit waited for the lock
                raise CommitFailed("consumer is closed")
            # Abandoned after _COMMIT_TIMEOUT_S (or on cancel): the commit may still land later,
            # which only commits offsets the caller processed (at least once). It keeps the
            # handle meanwhile: polls wait for it, the close too.
            with trio.move_on_after(_COMMIT_TIMEOUT_S):
                try:
                    await _in_thread_abandonable(self._held(self._commit_sync, offsets))
                except EngineError:
                    raise
                except (KafkaException, RuntimeError) as exc:
                    raise CommitFailed(f"commit {self.group}/{self.topic}: {exc!r}") from exc
                return
            raise CommitFailed(
                f"commit {self.group}/{self.topic}: no answer within {_COMMIT_TIMEOUT_S:.0f} s"
            )

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._c is None:
            return
        async with self._lock:
            later = self._take_later()
            if later:  # what commit_later left for a poll that will not come
                try:
                    with trio.move_on_after(_COMMIT_TIMEOUT_S):
                        await _in_thread_abandonable(self._held(self._commit_owned_sync, later))
                except Exception as exc:
                    logger.info("{}/{}: final commit failed: {!r}", self.group, self.topic, exc)
            if self._fd is not None:  # before the handle goes: no write to a closed pipe
                self._fd.close()
                self._fd = None
            try:
                # Leaves the group (LeaveGroup), so the others rebalance at once. After the call
                # in flight (an abandoned commit), if any: if that outlasts the bound, the close
                # is left to happen when it returns.
                await _close_bounded(
                    functools.partial(self._handle.close, self._c.close),
                    f"consumer {self.group}/{self.topic}",
                )
            except Exception as exc:
                logger.warning("closing consumer {}/{} failed: {}", self.group, self.topic, exc)


class RdkafkaReader:
    """A LogReader: one group-less librdkafka consumer, re-assigned only when needed."""

    def __init__(self, log: RdkafkaLog, raw: Consumer) -> None:
        self._log = log
        self._c = raw
        self._handle = _Handle("reader")  # every call into _c holds it (see _Handle)
        self._lock = trio.Lock()
        self._assigned: tuple[str, int] | None = None  # the partition assigned now
        self._next: int | None = None  # the consumer's position, when we know it
        self.closed = False

    def __repr__(self) -> str:
        return f"<RdkafkaReader at {self._assigned} next={self._next}>"

    def _take(self, msgs: list[Message], topic: str, partition: int) -> tuple[list[Record], bool]:
        """The records of the assigned partition among `msgs`, and whether its position was out
        of range."""
        out: list[Record] = []
        out_of_range = False
        for m in msgs:
            err = m.error()
            if err is None:
                if m.partition() == partition and m.topic() == topic:
                    out.append(_record(m))
            elif err.code() == KafkaError._AUTO_OFFSET_RESET:
                out_of_range = True
            elif err.fatal() or err.code() in _FATAL_CONSUMER_ERRORS:
                self._next = None
                raise LogUnavailable(f"fetch {topic}[{partition}]: {err}")
            elif err.code() != KafkaError._PARTITION_EOF:
                logger.info("librdkafka reader {}[{}]: {}", topic, partition, err)
        if out:
            self._next = out[-1].offset + 1
        return out, out_of_range

    def _fetch_sync(
        self, topic: str, partition: int, offset: int, max_records: int, wait_s: float
    ) -> list[Record]:
        """`_fetch_now` (worker thread) holding the handle; nothing this slice if an abandoned
        call still holds it."""
        try:
            return self._handle.call(
                self._fetch_now, topic, partition, offset, max_records, wait_s, wait=wait_s
            )
        except _Busy:
            return []

    def _fetch_now(
        self, topic: str, partition: int, offset: int, max_records: int, wait_s: float
    ) -> list[Record]:
        c = self._c
        if self._assigned != (topic, partition) or self._next != offset:
            c.assign([RdTP(topic, partition, offset)])
            self._assigned = (topic, partition)
            self._next = offset
        records, out_of_range = self._take(self._wait(max_records, wait_s), topic, partition)
        if records or not out_of_range:
            return records
        begin, _end = c.get_watermark_offsets(
            RdTP(topic, partition), timeout=_REQUEST_TIMEOUT_S, cached=False
        )
        if offset < begin:  # deleted by retention: continue from the oldest record kept
            c.assign([RdTP(topic, partition, begin)])
            self._next = begin
            return self._take(self._wait(max_records, wait_s), topic, partition)[0]
        # Beyond the end: nothing yet; look again (re-assigned) on the next slice.
        self._next = None
        time.sleep(wait_s)
        return []

    def _wait(self, max_records: int, wait_s: float) -> list[Message]:
        msgs = self._c.consume(max_records, 0)
        if msgs or wait_s <= 0:
            return msgs
        m = self._c.poll(wait_s)
        if m is None:
            return []
        return [m, *self._c.consume(max_records - 1, 0)] if max_records > 1 else [m]

    async def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_records: int,
        timeout: float,
    ) -> list[Record]:
        if self.closed:
            raise LogUnavailable("reader is closed")
        await kc.check_partition(self._log, topic, partition)
        offset, max_records = max(offset, 0), max(1, max_records)
        deadline = trio.current_time() + max(timeout, 0.0)
        async with self._lock:
            if self.closed:  # closed while this fetch waited for the lock
                raise LogUnavailable("reader is closed")
            try:
                if self._assigned == (topic, partition) and self._next == offset:
                    # Already there: what librdkafka prefetched, without a thread.
                    try:
                        ready = self._handle.call(self._c.consume, max_records, 0, wait=0)
                    except _Busy:
                        ready = []
                    records, out_of_range = self._take(ready, topic, partition)
                    if records:
                        return records
                    if out_of_range:
                        self._next = None  # the thread call below re-assigns and handles it
                while True:
                    left = deadline - trio.current_time()
                    records = await in_thread(
                        self._fetch_sync,
                        topic,
                        partition,
                        offset,
                        max_records,
                        max(0.0, min(left, kc.SLICE_S)),
                    )
                    if records or trio.current_time() >= deadline:
                        return records
            except (KafkaException, RuntimeError) as exc:
                self._next = None
                raise LogUnavailable(f"fetch {topic}[{partition}]@{offset}: {exc!r}") from exc

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        async with self._lock:
            try:
                await _close_bounded(functools.partial(self._handle.close, self._c.close), "reader")
            except Exception as exc:
                logger.warning("closing reader failed: {}", exc)
