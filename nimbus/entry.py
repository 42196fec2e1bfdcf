"""What every Nimbus process does around its work: settings (bad ones exit 2), logging, the trio
run, and signals (the first SIGINT/SIGTERM drains, a second exits at once)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from loguru import logger

from nimbus import config, logs, metrics
from nimbus.config import ConfigError
from nimbus.ports import EngineError

ASYNCIO_BATCH = 64  # ready asyncio callbacks run per trio scheduling round, at most


def batch_asyncio_callbacks(limit: int = ASYNCIO_BATCH) -> None:
    """Let trio-asyncio run up to `limit` ready asyncio callbacks per trio scheduling round.

    trio-asyncio runs asyncio's callbacks (grpclib's and redis.asyncio's protocol events, future
    and task steps) from one trio task, one callback per `await` of its queue: every callback
    costs a whole trio scheduling round, ~8 µs of CPU on this machine (a channel item taken with
    a round: ~9.5 µs, without: ~1.2). After the first callback (taken as trio-asyncio does:
    waiting, timers first), the ones already queued run at once; a timer that falls due, an
    asyncio-to-trio task start (which awaits) and the limit end the batch, so trio's own tasks
    still run at least every `limit` callbacks. Idempotent; the process's loops only."""
    from trio_asyncio._base import BaseTrioEventLoop

    one = BaseTrioEventLoop._main_loop_one
    if getattr(one, "_nimbus_batched", False):
        return

    async def main_loop_batch(self: Any, no_wait: bool = False) -> None:
        await one(self, no_wait)
        for _ in range(limit - 1):
            if self._stopped.is_set():
                return
            try:
                # no_wait: the next ready callback or due timer, else WouldBlock
                await one(self, True)
            except trio.WouldBlock:
                return

    main_loop_batch._nimbus_batched = True  # type: ignore[attr-defined]
    BaseTrioEventLoop._main_loop_one = main_loop_batch


def run_process(
    prog: str, role: str, main_async: Callable[..., Awaitable[None]], *args: Any, **overrides: Any
) -> None:
    try:
        settings = config.load(**overrides)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(settings, role=role)
    batch_asyncio_callbacks()
    try:
        trio.run(_with_metrics, main_async, settings, *args)
    except EngineError as e:
        logger.error("{}", e)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


async def _with_metrics(
    main_async: Callable[..., Awaitable[None]], settings: config.Settings, *args: Any
) -> None:
    """`main_async`, with the process's metrics endpoint beside it when NIMBUS_METRICS_PORT is set."""
    async with trio.open_nursery() as nursery:
        if settings.metrics_port:
            await nursery.start(metrics.serve_metrics, settings.metrics_host, settings.metrics_port)
        await main_async(settings, *args)
        nursery.cancel_scope.cancel()


async def run_with_signals(start: Any) -> None:
    """Run `start` (a nursery.start-able function) until it returns or SIGINT/SIGTERM: the first
    signal cancels it, which drains gracefully (bounded by NIMBUS_SHUTDOWN_TIMEOUT_SEC); a second
    signal exits at once."""
    async with trio.open_nursery() as outer:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            scope = trio.CancelScope()

            async def runner() -> None:
                with scope:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(start)
                outer.cancel_scope.cancel()

            outer.start_soon(runner)
            async for sig in signals:
                if not scope.cancel_called:
                    logger.info(
                        "received {}: shutting down (again to exit at once)",
                        signal.Signals(sig).name,
                    )
                    scope.cancel()
                else:
                    logger.warning("second {}: exiting now", signal.Signals(sig).name)
                    os._exit(130)
