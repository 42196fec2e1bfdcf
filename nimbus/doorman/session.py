"""A pod's per-stream state: the `Session` of each connected stream, its `Outbox` (what the pod
queues for the stream's writer, `Close` ending it) and the pod's `Budget` of queued bytes.

The pod (nimbus.doorman.pod) fills an outbox from the trio side with `put_nowait`; the stream's
writer (nimbus.doorman.server, asyncio side) takes from it with `get`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from nimbus.wire.messages import EventResponse


class Close:
    """Outbox sentinel: end the stream with this gRPC status (None: end it cleanly)."""

    def __init__(self, status: str | None, message: str = "") -> None:
        self.status = status
        self.message = message


OutboxItem = tuple[int, EventResponse | bytes | None] | Close  # bytes: encoded; None: confirm only


# What a queued response is counted for beyond its encoded bytes: the deque slot, the
# (id, payload) tuple, the bytes object's header (an estimate; tests/test_edge.py checks the RSS
# of a doorman with slow readers against the bound it gives).
ITEM_OVERHEAD = 160


def item_bytes(item: OutboxItem) -> int:
    """The memory an outbox item is counted for (its encoding plus ITEM_OVERHEAD)."""
    if isinstance(item, Close):
        return 0
    payload = item[1]
    if payload is None:
        return ITEM_OVERHEAD
    if isinstance(payload, bytes):
        return len(payload) + ITEM_OVERHEAD
    return int(payload.ByteSize()) + ITEM_OVERHEAD


class Budget:
    """Bytes queued in all the outboxes of one pod (NIMBUS_POD_QUEUE_BYTES)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Outbox:
    """A session's outgoing queue: the pod puts (`put_nowait`, never blocking), the stream's
    one writer gets. asyncio.Queue's interface for that use, at a fraction of its memory, since
    most streams are idle (issue #4: 10,000 of them on one pod): an asyncio.Queue holds four
    deques (~2.5 KB) from birth; this holds a deque only while something is queued, and one
    future only while the writer waits. Bounded by a count (`maxsize`) and by bytes
    (`maxbytes`, see `item_bytes`); the bytes also count towards the pod's `budget`."""

    __slots__ = ("_items", "_waiter", "maxsize", "maxbytes", "nbytes", "budget")

    def __init__(self, maxsize: int = 0, maxbytes: int = 0, budget: Budget | None = None) -> None:
        self.maxsize = maxsize  # <= 0: unbounded, as asyncio.Queue
        self.maxbytes = maxbytes  # <= 0: no byte bound
        self.nbytes = 0
        self.budget = budget
        self._items: deque[OutboxItem] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= self.qsize()

    def put_nowait(self, item: OutboxItem) -> None:
        size = item_bytes(item)
        items = self._items
        if items is None:
            items = self._items = deque()
        elif not isinstance(item, Close) and (
            0 < self.maxsize <= len(items) or 0 < self.maxbytes < self.nbytes + size
        ):
            raise asyncio.QueueFull
        items.append(item)
        self.nbytes += size
        if self.budget is not None:
            self.budget.used += size
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> OutboxItem:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None  # an idle stream keeps no deque
        size = item_bytes(item)
        self.nbytes -= size
        if self.budget is not None:
            self.budget.used -= size
        return item

    def clear(self) -> None:
        """Drop everything queued (a stream that is ending)."""
        while self._items:
            self.get_nowait()

    async def get(self) -> OutboxItem:
        """The next item, waiting for one (one getter at a time: the stream's writer)."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self.get_nowait()


@dataclass(eq=False, slots=True)
class Session:
    client_id: str
    protocol: int
    outbox: Outbox
    id: int
    epoch: int = 0
    closed: bool = False
    # Deliveries written (or queued) and not yet confirmed: (delivery_id, reply_to, token).
    unconfirmed: list[tuple[int, str, int]] = field(default_factory=list)
    acked: int = 0
    last_queued: int = 0  # highest delivery id put in the outbox
    last_receipted: int = 0  # highest delivery id of an event this stream sent
    written: int = 0  # highest delivery id written to the stream
    in_ingest: int = 0  # events of this stream waiting to be produced
    half_closed_at: float | None = None  # trio clock; set when the client ended its side

    def __repr__(self) -> str:
        return f"<Session {self.client_id} epoch={self.epoch} p{self.protocol} unconfirmed={len(self.unconfirmed)}>"
