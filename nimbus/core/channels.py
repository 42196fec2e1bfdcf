"""Draining a trio memory channel in batches: wait for one item, then take what is already
queued without waiting. Every batching stage (ingest, router reports, replay reports, status
checks) uses it, so one round trip serves everything that arrived together."""

from __future__ import annotations

from typing import TypeVar

import trio

T = TypeVar("T")


async def receive_batch(recv: trio.MemoryReceiveChannel[T], limit: int | None = None) -> list[T]:
    """At least one item (waits for it), at most `limit` (None: whatever is queued)."""
    batch = [await recv.receive()]
    while limit is None or len(batch) < limit:
        try:
            batch.append(recv.receive_nowait())
        except trio.WouldBlock:
            break
    return batch
