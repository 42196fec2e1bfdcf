"""What every librdkafka client of the adapter (nimbus.engines.rdkafka) shares: their common
configuration, librdkafka's log lines and client-wide errors into loguru, and the plumbing between
trio and a librdkafka handle's calls: the one-thread-at-a-time guard (`_Handle`), threads a caller
may stop waiting for, and closes bounded in time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio
from confluent_kafka import KafkaError
from loguru import logger

from nimbus.engines.kafka_common import BOOTSTRAP_TIMEOUT_S

T = TypeVar("T")

_REQUEST_TIMEOUT_S = 15.0
_CLOSE_TIMEOUT_S = 10.0  # a consumer's close (LeaveGroup) or a producer's final flush, at most


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
