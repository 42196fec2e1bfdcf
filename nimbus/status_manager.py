"""The status manager ("postmaster"): the only component that flips a client REPLAYING -> LIVE.

The flip is one atomic transition (`lifecycle.try_flip`) that succeeds only when everything ever
routed towards the DLQ for that client is acknowledged by it — the per-client Triple Lag Check
(see nimbus/lifecycle.py). It runs the moment a replay reports its backlog drained (a message on
STATUS_CHECKS), and periodically for every REPLAYING client as a safety net. Because the check is
per client and atomic with the router's decisions, other clients' traffic on the same partition
cannot delay it (hole 6), and nothing can land in the DLQ behind a client that is already LIVE
(hole 4).
"""

from __future__ import annotations

import time

import trio
from loguru import logger

from nimbus.config import Settings
from nimbus.pod import FLIPS, STATUS_CHECKS
from nimbus.ports import EngineError, StateStore
from nimbus.stats import Counters
from nimbus.subscriptions import listen


class StatusManager:
    def __init__(self, settings: Settings, state: StateStore, counters: Counters | None = None) -> None:
        self.s = settings
        self.state = state
        self.counters = counters or Counters()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def on_check(payload: bytes) -> None:
            cid, _, ack_ns = payload.decode().partition("\t")
            await self.check([cid], int(ack_ns or 0))

        async with trio.open_nursery() as nursery:
            await nursery.start(listen, self.state, STATUS_CHECKS, on_check)
            nursery.start_soon(self._periodic)
            task_status.started()
            logger.info("status manager up")

    async def check(self, client_ids: list[str], last_ack_ns: int = 0) -> int:
        try:
            flipped = await self.state.try_flip(client_ids)
        except EngineError as e:
            logger.warning("status manager: {}", e)
            return 0
        now = time.time_ns()
        done = [cid for cid, ok in zip(client_ids, flipped, strict=True) if ok]
        for cid in done:
            after = f", {(now - last_ack_ns) / 1e6:.1f} ms after the last ack" if last_ack_ns else ""
            logger.info("client {} is LIVE again (backlog acknowledged{})", cid, after)
        if done:
            self.counters.inc("status.flips", len(done))
            try:
                # Observers (the chaos harness, the admin view) learn of flips here.
                await self.state.publish([(FLIPS, f"{cid}\t{last_ack_ns}\t{now}".encode()) for cid in done])
            except EngineError as e:
                logger.warning("status manager: {}", e)
        return len(done)

    async def _periodic(self) -> None:
        while True:
            await trio.sleep(self.s.status_interval_ms / 1000)
            try:
                replaying = await self.state.replaying()
            except EngineError as e:
                logger.warning("status manager: {}", e)
                continue
            for i in range(0, len(replaying), 500):
                await self.check(replaying[i : i + 500])
