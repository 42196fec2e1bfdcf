"""The one retry policy of the workers' and pods' loops (issue 16): after the n-th failure in a
row a loop waits `first * multiplier ** (n - 1)`, at most `max`, less a random part of up to
`jitter` of it (so processes failing together do not retry together). From NIMBUS_RETRY_*.

Two shapes, both free on the success path (no allocation; a loop resets a counter):
- `Backoff`, for loops that handle the failure themselves (requeue, log) and go round again;
- `retrying`, for one call retried until it succeeds (or `attempts` failures).

Only the exception types given are retried; trio.Cancelled (a BaseException) always passes.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    from nimbus.config import Settings

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Policy:
    first: float = 0.1  # seconds
    max: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # fraction of a delay taken off at random (0: none)

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(
            s.retry_first_ms / 1000, s.retry_max_ms / 1000, s.retry_multiplier, s.retry_jitter
        )

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...)."""
        d = min(self.first * self.multiplier ** min(failures - 1, 64), self.max)
        return d * (1 - self.jitter * rand()) if self.jitter else d


DEFAULT = Policy()  # the defaults of NIMBUS_RETRY_*, for callers without settings


class Backoff:
    """Failures in a row of one loop: `await b.wait()` after a failure, `b.failures = 0` (or
    `b.reset()`) after a success."""

    __slots__ = ("failures", "policy")

    def __init__(self, policy: Policy = DEFAULT) -> None:
        self.policy = policy
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        """Count a failure; the delay to wait before the next try."""
        self.failures += 1
        return self.policy.delay(self.failures)

    async def wait(self) -> None:
        await trio.sleep(self.next_delay())


async def retrying(
    fn: Callable[[], Awaitable[T]],
    on: type[Exception] | tuple[type[Exception], ...],
    policy: Policy = DEFAULT,
    *,
    attempts: int | None = None,
    on_error: Callable[[int, Exception], object] | None = None,
) -> T:
    """`await fn()` until it returns; an exception in `on` is passed to `on_error(failures, e)`
    and, unless that was the `attempts`-th, retried after the policy's delay (then re-raised)."""
    failures = 0
    while True:
        try:
            return await fn()
        except on as e:
            failures += 1
            if on_error is not None:
                on_error(failures, e)
            if attempts is not None and failures >= attempts:
                raise
            await trio.sleep(policy.delay(failures))
