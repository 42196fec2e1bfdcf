"""The status manager ("postmaster"): the only component that flips a client REPLAYING -> LIVE.

The flip is one atomic transition (`lifecycle.try_flip`) that succeeds only when everything ever
routed towards the DLQ for that client is acknowledged by it — the per-client Triple Lag Check
(see nimbus/core/lifecycle.py). It runs the moment the check can pass — a pod whose stored ack
completed a client's backlog asks for it (a message on STATUS_CHECKS, carrying when the ack
arrived), and so does a replay that has drained — batching the requests that arrive together into
one atomic round trip; and periodically for every REPLAYING client as a safety net. Because the check is
per client and atomic with the router's decisions, other clients' traffic on the same partition
cannot delay it (hole 6), and nothing can land in the DLQ behind a client that is already LIVE
(hole 4).
"""

from __future__ import annotations

import time

import trio
from loguru import logger

from nimbus import logs
from nimbus.config import Settings
from nimbus.core.channels import receive_batch
from nimbus.core.retry import Policy
from nimbus.ops.stats import Counters
from nimbus.ports import EngineError, RecordsAndPubSub
from nimbus.subscriptions import listen
from nimbus.wire import badinput
from nimbus.wire.pod_channel import STATUS_CHECKS, flip_message, parse_status_check


class StatusManager:
    def __init__(
        self, settings: Settings, state: RecordsAndPubSub, counters: Counters | None = None
    ) -> None:
        self.s = settings
        self.state = state
        self.counters = counters or Counters()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[tuple[str, int]](10_000)

        async def on_check(payload: bytes) -> None:
            try:
                cid, last_ack_ns = parse_status_check(payload)
            except ValueError:  # UnicodeDecodeError included
                badinput.message("status checks", badinput.UNDECODABLE, repr(payload[:64]))
                return
            try:
                send.send_nowait((cid, last_ack_ns))
            except trio.WouldBlock:
                self.counters.inc("status.checks_dropped")  # the periodic check covers it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checks, recv)
            await nursery.start(
                listen, self.state, STATUS_CHECKS, on_check, Policy.from_settings(self.s)
            )
            nursery.start_soon(self._periodic)
            task_status.started()
            logger.info("status manager up")

    async def _checks(self, recv: trio.MemoryReceiveChannel[tuple[str, int]]) -> None:
        """Requests (from pods when an ack completes a backlog, from replays when drained),
        answered in batches: all pending requests in one atomic round trip."""
        async with recv:
            while True:
                batch: dict[str, int] = {}
                for cid, ack_ns in await receive_batch(recv, 500):
                    batch[cid] = max(batch.get(cid, 0), ack_ns)
                await self.check(list(batch), batch)

    async def check(self, client_ids: list[str], last_ack_ns: dict[str, int] | None = None) -> int:
        """Try the flip for `client_ids`; `last_ack_ns` (wall clock, per client, when known) is
        when the ack that completed the backlog arrived, so the flip's delay can be measured."""
        try:
            flipped = await self.state.try_flip(client_ids)
        except EngineError as e:
            logger.warning("status manager: {}", e)
            return 0
        now = time.time_ns()
        acks = last_ack_ns or {}
        done = [cid for cid, ok in zip(client_ids, flipped, strict=True) if ok]
        for cid in done:
            ack_ns = acks.get(cid, 0)
            after = f", {(now - ack_ns) / 1e6:.1f} ms after the last ack" if ack_ns else ""
            logs.for_client(cid).info(
                "client {} is LIVE again (backlog acknowledged{})", cid, after
            )
        if done:
            self.counters.inc("status.flips", len(done))
            try:
                # Observers (the chaos harness, the admin view) learn of flips here.
                await self.state.publish([flip_message(cid, acks.get(cid, 0), now) for cid in done])
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
