"""The workers (`python -m nimbus.workers`): event consumer, result router, replay consumer and
status manager, all by default or a subset with --roles. Any number of copies may run: the
consumers share work through Kafka consumer groups, replays through per-client leases, and the
status manager's flip is an idempotent atomic check.
"""

from __future__ import annotations

import argparse

import trio
import trio_asyncio
from loguru import logger

from nimbus.config import Settings
from nimbus.engines import open_engine
from nimbus.entry import ArgumentParser, run_process, run_with_signals
from nimbus.ops import metrics
from nimbus.ops.stats import Counters
from nimbus.ports import Log, StateStore
from nimbus.topics import ensure_topics
from nimbus.workers.event_consumer import EventConsumer
from nimbus.workers.replay import ReplayService
from nimbus.workers.router import ResultRouter
from nimbus.workers.status import StatusManager

ROLES = ("events", "results", "replay", "status")


async def run_workers(
    settings: Settings,
    log: Log,
    state: StateStore,
    roles: tuple[str, ...] = ROLES,
    counters: Counters | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    counters = counters or Counters()
    async with trio.open_nursery() as nursery:
        try:
            if "events" in roles:
                await nursery.start(EventConsumer(settings, log, counters).run)
            if "results" in roles:
                await nursery.start(
                    metrics.watched_obj(ResultRouter(settings, log, state, counters)).run
                )
            if "replay" in roles:
                await nursery.start(
                    metrics.watched_obj(ReplayService(settings, log, state, counters)).run
                )
            if "status" in roles:
                await nursery.start(StatusManager(settings, state, counters).run)
            sampler = metrics.Sampler(
                log,
                state,
                settings.metrics_interval_ms / 1000,
                clients="status" in roles,
                dlq_topic=settings.kafka_dlq_topic,
            )
            nursery.start_soon(sampler.run)
            task_status.started()
            await trio.sleep_forever()
        finally:
            logger.info("workers stopping; counters: {}", counters.summary())


def parse_roles(raw: str) -> tuple[str, ...]:
    roles = tuple(r.strip() for r in raw.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise argparse.ArgumentTypeError(f"unknown role(s) {bad}; choose from {', '.join(ROLES)}")
    return roles


async def main_async(settings: Settings, roles: tuple[str, ...]) -> None:
    async with trio_asyncio.open_loop(), open_engine(settings) as engine:
        await ensure_topics(engine.log, settings)
        await run_with_signals(
            lambda task_status: run_workers(
                settings, engine.log, engine.state, roles, task_status=task_status
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m nimbus.workers", description=__doc__)
    parser.add_argument(
        "--roles",
        type=parse_roles,
        default=ROLES,
        help=f"comma list of {', '.join(ROLES)} (default: all)",
    )
    args = parser.parse_args(argv)
    run_process("nimbus.workers", "workers", main_async, args.roles)
