"""How the Redis state store reaches Redis from trio: its timeouts, its error text, and the lane.

The lane (`Lane`) carries the script calls (EVALSHA) of every trio task on one connection,
pipelined, with no crossing into asyncio per call. `nimbus.engines.redis` (client records,
leases) and `nimbus.engines.redis_pubsub` (publish) make their script calls on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import trio
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ResponseError

from nimbus.ports import StateUnavailable

CONNECT_TIMEOUT = 5.0  # seconds to reach Redis (TCP connect, and the PING at open)
COMMAND_TIMEOUT = 10.0  # socket timeout of a command (a script over a big batch included)


def describe(exc: BaseException | None) -> str:
    """An error as the text of a StateUnavailable ("connection closed" for none)."""
    return f"{type(exc).__name__}: {exc}" if exc is not None else "connection closed"


class NotReplicated(Exception):
    """WAIT answered fewer replicas than asked for (see `Lane`)."""


class _Call:
    """One command on the lane: its arguments, and its reply or error once read."""

    __slots__ = ("args", "done", "error", "reply", "write")

    def __init__(self, args: tuple[Any, ...], write: bool) -> None:
        self.args = args
        self.write = write
        self.done = trio.Event()
        self.reply: Any = None
        self.error: BaseException | None = None


class Lane:
    """One Redis connection that carries the script calls (EVALSHA) of every trio task,
    pipelined: the calls made while a batch is out go together in the next one, with one write.

    A call costs its trio task one queue append and one trio.Event wait. The asyncio side is
    one task that owns the connection: it writes a batch, reads its replies in order and sets
    each caller's event (legal from asyncio code: the loop runs inside the trio run, on the same
    thread). The other way, a crossing (`aio_as_trio`) per call also took a pooled connection
    and ran the command under redis-py's per-command timeout task: ~300 µs of CPU per call here
    against ~50 on the lane (measured, 2026-12-06), and no pipelining across tasks.

    A failed connection fails the batch it carried (StateUnavailable, as before: the outcome of
    a script whose reply was lost is unknown to its caller, who retries as it did); the next
    batch connects again. A caller that stops waiting (cancelled, or no reply within
    COMMAND_TIMEOUT) leaves its command to run; its reply is read and dropped.
    """

    def __init__(
        self, address: str, pool: ConnectionPool, wait: tuple[int, int] | None = None
    ) -> None:
        self._address = address
        self._pool = pool
        self._wait = wait  # (replicas, timeout ms): WAIT after every batch that wrote
        self._replicas = wait[0] if wait else 0  # replicas the master had at the last ROLE
        self._queue: list[_Call] = []
        self._wake = asyncio.Event()  # (asyncio side) a call was queued
        self._conn: AbstractConnection | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def call(self, *args: Any, write: bool = True) -> Any:
        """(trio side) The reply of `args`; a ResponseError is raised as itself, a lost
        connection as StateUnavailable. With `wait`, a `write` call is answered only once
        Redis's WAIT confirmed the batch it went in reached that many replicas (at most as many
        as the master has, see `_carry`); if it did not within the timeout, StateUnavailable
        (the write happened on the master: its outcome is unknown to the caller, as with a lost
        reply)."""
        if self._task.done():
            raise StateUnavailable(f"redis at {self._address}: the state store is closed")
        c = _Call(args, write)
        self._queue.append(c)
        if len(self._queue) == 1:
            self._wake.set()
        with trio.move_on_after(COMMAND_TIMEOUT + CONNECT_TIMEOUT):
            await c.done.wait()
        if not c.done.is_set():
            raise StateUnavailable(
                f"redis at {self._address}: no reply within"
                f" {COMMAND_TIMEOUT + CONNECT_TIMEOUT:.0f} s"
            )
        if c.error is not None:
            if isinstance(c.error, ResponseError):
                raise c.error
            raise StateUnavailable(f"redis at {self._address}: {describe(c.error)}") from c.error
        return c.reply

    async def _connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is None:
            pool = self._pool
            # No per-command timeout of redis-py's (a task per write, a timer per read): the
            # whole batch has one deadline (_carry).
            kwargs = {**pool.connection_kwargs, "socket_timeout": None}
            conn = self._conn = pool.connection_class(**kwargs)
        if not conn.is_connected:
            await conn.connect()  # type: ignore[no-untyped-call]
        return conn

    async def _run(self) -> None:
        """(asyncio task) Batches out, replies in, until cancelled by close."""
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch, self._queue = self._queue, []
                await self._carry(batch)
        finally:
            for c in self._queue:
                c.error = c.error or ConnectionError("the state store is closed")
                c.done.set()
            self._queue = []
            if self._conn is not None:
                await self._conn.disconnect(nowait=True)

    async def _carry(self, batch: list[_Call]) -> None:
        # With `wait`: WAIT for min(asked, the replicas the master had at the last look), then
        # ROLE for how many it has now. A master without a replica (its replica died, or it took
        # over and the old master is not back yet) is not waited for: it has no replica a failover
        # could promote, and waiting would refuse every write until one came back.
        wait = self._wait if self._wait and any(c.write for c in batch) else None
        commands = [c.args for c in batch]
        if wait is not None:
            wait = (min(wait[0], self._replicas), wait[1])
            if wait[0] > 0:
                commands.append(("WAIT", *wait))
            commands.append(("ROLE",))
        conn = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                conn = await self._connection()
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                for c in batch:
                    try:
                        c.reply = await conn.read_response()
                    except ResponseError as exc:  # this command's error; the connection is fine
                        c.error = exc
                    if wait is None:
                        c.done.set()
                if wait is not None:
                    acked = int(await conn.read_response()) if wait[0] > 0 else 0
                    role = await conn.read_response()
                    self._replicas = len(role[2]) if role and role[0] == b"master" else 0
                    if acked < wait[0]:
                        lost = NotReplicated(
                            f"WAIT: {acked} of {wait[0]} replica(s) confirmed within {wait[1]} ms"
                        )
                        for c in batch:
                            if c.write and c.error is None:
                                c.error = lost
                    for c in batch:
                        c.done.set()
        except BaseException as exc:
            for c in batch:
                if not c.done.is_set():
                    c.error = c.error or exc
                    c.done.set()
            if conn is not None:
                await conn.disconnect(nowait=True)
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise

    async def close(self) -> None:
        """(asyncio side)"""
        self._task.cancel()
        await asyncio.wait([self._task])
