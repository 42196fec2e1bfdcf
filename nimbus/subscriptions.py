"""Pub/sub listening that survives the state store: Redis pub/sub drops a subscription when its
connection goes (a Redis restart, CLIENT KILL, a network blip). Messages published meanwhile are
lost, which every sender tolerates (deliveries time out and are diverted, requests are repeated by
periodic scans); the listener itself must come back, not take its process down."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from loguru import logger

from nimbus.core.retry import DEFAULT, Backoff, Policy
from nimbus.ports import PubSub, StateUnavailable


async def listen(
    state: PubSub,
    channel: str,
    handle: Callable[[bytes], Awaitable[None]],
    policy: Policy = DEFAULT,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `handle` for each message on `channel`, forever, resubscribing after a failure
    (waits per `policy`, NIMBUS_RETRY_*). Reports started once the first subscription is
    active."""
    started = False
    backoff = Backoff(policy)
    while True:
        try:
            async with state.subscribe(channel) as messages:
                if not started:
                    task_status.started()
                    started = True
                elif backoff.failures:
                    logger.info("resubscribed to {}", channel)
                backoff.reset()
                async for payload in messages:
                    await handle(payload)
            return
        except StateUnavailable as e:
            delay = backoff.next_delay()
            logger.warning(
                "subscription to {} lost ({}); resubscribing in {:.1f}s", channel, e, delay
            )
            await trio.sleep(delay)
