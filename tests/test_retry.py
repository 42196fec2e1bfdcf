"""The one retry helper (nimbus/core/retry.py, issue 16): its delays follow NIMBUS_RETRY_*, it retries
only the errors it is given, gives up after `attempts` when asked, and never holds up a
cancellation."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from nimbus import config
from nimbus.core.retry import DEFAULT, Backoff, Policy, retrying
from nimbus.ports import EngineError

EXACT = Policy(first=0.1, max=2.0, multiplier=2.0, jitter=0.0)


def test_delays_grow_by_the_multiplier_to_the_max() -> None:
    assert [EXACT.delay(n) for n in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert EXACT.delay(10_000) == 2.0  # no overflow after a long outage
    fixed = Policy(first=0.5, max=2.0, multiplier=1.0, jitter=0.0)
    assert [fixed.delay(n) for n in (1, 2, 9)] == [0.5, 0.5, 0.5]
    assert Policy(first=3.0, max=1.0, jitter=0.0).delay(1) == 1.0  # never above the max


def test_jitter_only_takes_off_up_to_its_fraction() -> None:
    p = Policy(first=1.0, max=10.0, multiplier=2.0, jitter=0.2)
    assert p.delay(2, rand=lambda: 0.0) == 2.0
    assert p.delay(2, rand=lambda: 1.0) == pytest.approx(1.6)
    for _ in range(200):
        assert 0.8 * 4.0 <= p.delay(3) <= 4.0


def test_the_policy_comes_from_the_settings() -> None:
    s = config.load(env={}, dotenv=False)
    assert Policy.from_settings(s) == DEFAULT == Policy(0.1, 2.0, 2.0, 0.2)
    s = config.load(
        env={
            "NIMBUS_RETRY_FIRST_MS": "250",
            "NIMBUS_RETRY_MAX_MS": "5000",
            "NIMBUS_RETRY_MULTIPLIER": "1.5",
            "NIMBUS_RETRY_JITTER": "0",
        },
        dotenv=False,
    )
    assert Policy.from_settings(s) == Policy(0.25, 5.0, 1.5, 0.0)


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("NIMBUS_RETRY_FIRST_MS", "fast", "expected an integer"),
        ("NIMBUS_RETRY_FIRST_MS", "0", "between 1 and 60000"),
        ("NIMBUS_RETRY_MAX_MS", "-5", "between"),
        ("NIMBUS_RETRY_MULTIPLIER", "x2", "expected a number"),
        ("NIMBUS_RETRY_MULTIPLIER", "0.5", "between 1 and 10"),
        ("NIMBUS_RETRY_MULTIPLIER", "nan", "between"),
        ("NIMBUS_RETRY_JITTER", "1.5", "between 0 and 1"),
        ("NIMBUS_RETRY_JITTER", "", "expected a number"),
    ],
)
def test_invalid_retry_settings_name_the_variable(var: str, value: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(env={var: value}, dotenv=False)
    assert var in str(e.value) and fragment in str(e.value)


class Flaky:
    """Fails with `error` the first `failures` calls, recording when each call came."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.left = failures
        self.error = error or EngineError("blip")
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(trio.current_time())
        if self.left:
            self.left -= 1
            raise self.error
        return "ok"


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]


async def test_retrying_waits_per_the_policy_until_it_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(5)
    seen: list[tuple[int, str]] = []
    got = await retrying(fn, EngineError, EXACT, on_error=lambda n, e: seen.append((n, str(e))))
    assert got == "ok"
    assert gaps(fn.calls) == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert seen == [(n, "blip") for n in range(1, 6)]


async def test_success_at_once_neither_waits_nor_reports(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[int] = []
    assert await retrying(Flaky(0), EngineError, EXACT, on_error=lambda n, e: seen.append(n))
    assert trio.current_time() == 0 and not seen


async def test_only_the_listed_errors_are_retried() -> None:
    fn = Flaky(3, ValueError("a bug, not a blip"))
    with pytest.raises(ValueError):
        await retrying(fn, EngineError, EXACT)
    assert len(fn.calls) == 1
    fn = Flaky(1, KeyError("k"))
    assert await retrying(fn, (EngineError, KeyError), EXACT) == "ok"


async def test_it_gives_up_after_the_attempts_asked_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(10)
    seen: list[int] = []
    with pytest.raises(EngineError):
        await retrying(fn, EngineError, EXACT, attempts=3, on_error=lambda n, e: seen.append(n))
    assert len(fn.calls) == 3 and seen == [1, 2, 3]
    assert gaps(fn.calls) == [0.1, 0.2]
    assert trio.current_time() == pytest.approx(0.3)  # no wait after the last try
    assert await retrying(Flaky(2), EngineError, EXACT, attempts=3) == "ok"


async def test_cancellation_passes_through_the_call_and_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[int] = []

    async def hangs() -> None:
        await trio.sleep_forever()

    # Cancelled while the call runs: even `on=Exception` does not catch it (a BaseException).
    with trio.move_on_after(1) as cs:
        await retrying(hangs, Exception, EXACT, on_error=lambda n, e: seen.append(n))
    assert cs.cancelled_caught and not seen
    # Cancelled during a wait between tries.
    fn = Flaky(100)
    with trio.move_on_after(1.0) as cs:
        await retrying(fn, EngineError, EXACT)
    assert cs.cancelled_caught and trio.current_time() == pytest.approx(2.0)
    assert len(fn.calls) == 4  # at 0, 0.1, 0.3, 0.7; the wait of 0.8 is cut short
    # A cancelled Backoff.wait raises Cancelled too.
    b = Backoff(Policy(first=10.0, max=10.0, jitter=0.0))
    with trio.move_on_after(1) as cs:
        await b.wait()
    assert cs.cancelled_caught and b.failures == 1


async def test_a_backoff_grows_with_failures_in_a_row_and_resets_on_success(
    autojump_clock: trio.testing.MockClock,
) -> None:
    b = Backoff(EXACT)
    times = [trio.current_time()]
    for _ in range(3):
        await b.wait()
        times.append(trio.current_time())
    assert gaps(times) == [0.1, 0.2, 0.4] and b.failures == 3
    b.reset()
    start = trio.current_time()
    await b.wait()
    assert trio.current_time() - start == pytest.approx(0.1)
    assert b.next_delay() == 0.2 and b.failures == 2


async def test_a_lost_subscription_is_resubscribed_after_the_policys_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One of the sites (nimbus/subscriptions.py): while the store stays down each failed try
    waits longer, up to the max; a subscription that works starts from the first wait again."""
    from nimbus.engines.memory import MemoryState
    from nimbus.subscriptions import listen

    state = MemoryState()

    async def handle(payload: bytes) -> None:
        pass

    async def resubscribed() -> float:
        await trio.lowlevel.checkpoint()
        while not state.channels.get("ch"):  # noqa: ASYNC110 (the store's own bookkeeping)
            await trio.sleep(0.001)
        return trio.current_time()

    policy = Policy(first=1.0, max=3.0, multiplier=2.0, jitter=0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(listen, state, "ch", handle, policy)
        start = trio.current_time()
        state.down = True
        assert state.break_subscriptions() == 1
        await trio.sleep(6.5)  # tries at +1, +3 and +6 fail
        state.down = False
        assert await resubscribed() - start == pytest.approx(9.0, abs=0.01)  # 1 + 2 + 3 + 3
        start = trio.current_time()
        assert state.break_subscriptions() == 1
        assert await resubscribed() - start == pytest.approx(1.0, abs=0.01)
        nursery.cancel_scope.cancel()


async def test_the_event_consumer_retries_a_failed_produce_per_the_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Another site (nimbus/workers/event_consumer.py): three failed produces in a row wait 1, 2 and 4 s
    (NIMBUS_RETRY_* here), then the results are written, nothing dropped."""
    from nimbus.workers.event_consumer import EventConsumer
    from tests.test_event_consumer import with_events

    s, log = await with_events(
        kafka_partitions=1, retry_first_ms=1000, retry_max_ms=10_000, retry_jitter=0.0
    )
    log.producer.fail_next = 3
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(EventConsumer(s, log).run)
        while sum((await log.end_offsets(s.kafka_results_topic)).values()) == 0:  # noqa: ASYNC110
            await trio.sleep(0.01)
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert log.producer.fail_next == 0
    assert 7.0 <= took < 7.5, took
