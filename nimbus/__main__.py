"""All-in-one (`python -m nimbus`): the doorman and every worker in one process, on the embedded
in-memory engine. Needs no Kafka, Redis, Java or Docker."""

from __future__ import annotations

import argparse

import trio
import trio_asyncio
from loguru import logger

from nimbus.config import Settings
from nimbus.engines import open_engine
from nimbus.entry import run_process, run_with_signals
from nimbus.server import run_server
from nimbus.topics import ensure_topics
from nimbus.web import run_web
from nimbus.workers import run_workers


async def run_all(
    settings: Settings, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_engine(settings) as engine:
        await ensure_topics(engine.log, settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_workers, settings, engine.log, engine.state)
            port = await nursery.start(run_server, settings, engine.log, engine.state)
            if settings.web_port:
                await start_web(nursery, settings, engine.log, engine.state)
            logger.info(
                "Nimbus all-in-one ready on port {} ({} engine). Try: python -m nimbus.client "
                "--client_id=a --start=1 --end=10 --target 127.0.0.1:{}",
                port,
                settings.engine,
                port,
            )
            task_status.started(port)


async def start_web(nursery: trio.Nursery, settings: Settings, log: object, state: object) -> None:
    """The live web view beside the all-in-one; a port already taken only costs the view."""
    try:
        await nursery.start(run_web, settings, log, state)
    except OSError as e:
        logger.warning(
            "live web view not started on {}:{}: {}", settings.web_host, settings.web_port, e
        )


async def main_async(settings: Settings) -> None:
    async with trio_asyncio.open_loop():
        await run_with_signals(lambda task_status: run_all(settings, task_status=task_status))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nimbus", description=__doc__)
    parser.add_argument(
        "--engine",
        choices=("memory", "real"),
        default=None,
        help="default: memory (NIMBUS_ENGINE is ignored unless given here)",
    )
    args = parser.parse_args(argv)
    run_process("nimbus", "all-in-one", main_async, engine=args.engine or "memory")


if __name__ == "__main__":
    main()
