"""Per-client event rate: token buckets. Pure (the caller passes the time).

A bucket holds up to `burst` tokens and gains `rate` per second; an event takes one. The
limiter keeps one bucket per client id and forgets buckets that have refilled completely (a
full bucket and a fresh one behave alike), so its size follows the clients active within the
last `burst / rate` seconds, not every client ever seen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second, > 0
    burst: float  # capacity, >= 1
    tokens: float
    stamp: float  # time of the last refill

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take `n` tokens if there are that many; a refused take takes nothing."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def is_full(self, now: float) -> bool:
        return self.tokens + max(0.0, now - self.stamp) * self.rate >= self.burst


class RateLimiter:
    """One token bucket per key. `rate` <= 0 disables it (everything is allowed)."""

    def __init__(self, rate: float, burst: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(1.0, rate)
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = 1024

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self._prune_at:
                self.prune(now)
            b = self._buckets[key] = TokenBucket.full(self.rate, self.burst, now)
        return b.take(now)

    def prune(self, now: float) -> int:
        """Forget full buckets; returns how many. Amortised: runs when the table doubled."""
        full = [k for k, b in self._buckets.items() if b.is_full(now)]
        for k in full:
            del self._buckets[k]
        self._prune_at = max(1024, 2 * len(self._buckets))
        return len(full)
