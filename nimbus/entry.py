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


def run_process(prog: str, role: str, main_async: Callable[..., Awaitable[None]], *args: Any, **overrides: Any) -> None:
    try:
        settings = config.load(**overrides)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(settings, role=role)
    try:
        trio.run(_with_metrics, main_async, settings, *args)
    except EngineError as e:
        logger.error("{}", e)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


async def _with_metrics(main_async: Callable[..., Awaitable[None]], settings: config.Settings, *args: Any) -> None:
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
                    logger.info("received {}: shutting down (again to exit at once)", signal.Signals(sig).name)
                    scope.cancel()
                else:
                    logger.warning("second {}: exiting now", signal.Signals(sig).name)
                    os._exit(130)
