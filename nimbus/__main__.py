"""All-in-one (`python -m nimbus`): the doorman and every worker in one process, on the embedded
in-memory engine. Needs no Kafka, Redis, Java or Docker."""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import trio
import trio_asyncio
from loguru import logger

from nimbus.config import Settings
from nimbus.doorman import startup
from nimbus.doorman.server import run_server
from nimbus.engines import open_engine
from nimbus.entry import ArgumentParser, leaves, run_process, run_with_signals
from nimbus.ops.web import run_web
from nimbus.topics import ensure_topics
from nimbus.workers.run import run_workers


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
                "Nimbus all-in-one ready on port {} ({} engine). Try: {}",
                port,
                settings.engine,
                client_hint(settings.host, port),
            )
            task_status.started(port)


async def start_web(nursery: trio.Nursery, settings: Settings, log: object, state: object) -> None:
    """The live web view beside the all-in-one; a port already taken only costs the view."""
    try:
        await nursery.start(run_web, settings, log, state)
    except* OSError as group:  # trio wraps it in groups: `except OSError` would miss it
        logger.warning(
            "live web view not started on {}:{}: {} (NIMBUS_WEB_PORT: another port, or 0 for none)",
            settings.web_host,
            settings.web_port,
            next(leaves(group)),
        )


def client_hint(host: str, port: int) -> str:
    """The sample client's command for this server, to run as printed from the directory the
    server started in (README: `.venv/bin/python -m nimbus.client ...` from the checkout)."""
    python = sys.executable or "python3"
    rel = os.path.relpath(python)
    if not rel.startswith(os.pardir):
        python = rel if os.sep in rel else os.path.join(os.curdir, rel)
    else:
        for name in ("python", "python3"):
            found = shutil.which(name)
            if found and os.path.realpath(found) == os.path.realpath(python):
                python = name
                break
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return (
        f"{shlex.quote(python)} -m nimbus.client --client_id=a --start=1 --end=10 "
        f"--target {host}:{port}"
    )


async def main_async(settings: Settings) -> None:
    async with trio_asyncio.open_loop():
        await run_with_signals(lambda task_status: run_all(settings, task_status=task_status))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m nimbus", description=__doc__)
    parser.add_argument(
        "--engine",
        choices=("memory", "real"),
        default=None,
        help="default: memory (NIMBUS_ENGINE is ignored unless given here)",
    )
    args = parser.parse_args(argv)
    run_process(
        "nimbus",
        "all-in-one",
        main_async,
        checks=[startup.check],
        engine=args.engine or "memory",
    )


if __name__ == "__main__":
    main()
