"""Admin requests of the librdkafka adapter (nimbus.engines.rdkafka): their futures awaited in
trio (librdkafka's background thread completes them and wakes trio through its token, no worker
thread), and retried while their errors are retriable."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from confluent_kafka import KafkaError, KafkaException
from loguru import logger

from nimbus.engines.rdkafka_handle import _REQUEST_TIMEOUT_S
from nimbus.ports import LogUnavailable

T = TypeVar("T")


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
