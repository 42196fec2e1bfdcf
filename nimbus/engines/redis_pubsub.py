"""The `PubSub` port on Redis (`RedisPubSub`), part of `nimbus.engines.redis.RedisState`.

The port's channel `x` is the Redis channel `{prefix}ch:x`. `publish` is one script call per
1000 messages, made on the store's lane (`nimbus.engines.redis_link`).

Each `subscribe()` opens its own connection. A reader task on the asyncio side pulls messages
off it and hands them to trio with `MemorySendChannel.send_nowait` (legal: the asyncio loop
runs inside the trio run, on the same thread), so a busy subscription costs no crossing per
message. When the trio side falls behind and the buffer is full, the reader waits for room with
one awaited crossing, which backpressures the socket; Redis may then cut the slow subscriber
(client-output-buffer-limit pubsub), which the iterator reports as `StateUnavailable` after
delivering what it had. Pub/sub is at-most-once: the caller re-subscribes and tolerates the gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio
import trio_asyncio
from loguru import logger
from redis.asyncio.client import PubSub as PubSubConnection
from redis.asyncio.client import Redis

from nimbus.engines.redis_link import CONNECT_TIMEOUT, describe
from nimbus.ports import PubSub, StateUnavailable

if TYPE_CHECKING:
    from nimbus.engines.redis import RedisState

SUBSCRIBE_TIMEOUT = 5.0  # seconds for Redis to confirm a SUBSCRIBE
SUBSCRIBER_BUFFER = 10_000  # messages buffered per subscription on the trio side
_PUBLISH_CHUNK = 1000  # messages per publish script call


class _Subscription:
    """The async iterator `subscribe()` yields: payloads, then StateUnavailable if the link drops."""

    def __init__(self, recv: trio.MemoryReceiveChannel[bytes], address: str, channel: str) -> None:
        self._recv = recv
        self._address = address
        self._channel = channel
        self.error: BaseException | None = None  # set by the reader before it closes the channel

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            # The reader only stops on its own when the connection failed.
            raise StateUnavailable(
                f"redis at {self._address}: subscription to {self._channel!r} lost: "
                f"{describe(self.error)}"
            ) from self.error
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None


class RedisPubSub(PubSub):
    """`PubSub` on the connections of a `RedisState` (its lane for publish, its pool's client
    for the subscriptions). The store's `subscriber_buffer` sizes each new subscription.
    `sharded`: SSUBSCRIBE instead of SUBSCRIBE (`nimbus.engines.redis_cluster.ClusterPubSub`)."""

    sharded = False

    def __init__(self, store: RedisState) -> None:
        self._store = store

    def _channel(self, channel: str) -> str:
        return f"{self._store.prefix}ch:{channel}"

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        # Not a pipeline of PUBLISH: one script call per 1000 messages, which costs redis-py one
        # reply to parse instead of 1000 (measured ~15x cheaper). Order is kept (one connection,
        # calls in sequence), per channel and overall.
        if not messages:
            await trio.lowlevel.checkpoint()
            return

        for start in range(0, len(messages), _PUBLISH_CHUNK):
            args: list[str | bytes] = []
            for channel, payload in messages[start : start + _PUBLISH_CHUNK]:
                args += (self._channel(channel), payload)
            await self._store._script("publish", args)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        send, recv = trio.open_memory_channel[bytes](self._store.subscriber_buffer)
        sub = _Subscription(recv, self._store.address, channel)
        try:
            pubsub, reader = await self._store._cross(
                self._start_subscription, self._channel(channel), send, sub
            )
        except BaseException:
            send.close()
            recv.close()
            raise
        try:
            yield sub
        finally:
            recv.close()
            with trio.move_on_after(CONNECT_TIMEOUT, shield=True):
                try:
                    await self._store._cross(self._stop_subscription, pubsub, reader)
                except StateUnavailable as exc:
                    logger.debug("closing subscription to {}: {}", channel, exc)

    async def _subscriber_for(self, channel: str) -> Redis:
        """(asyncio side) The client whose connection pool a subscription to `channel` uses."""
        return self._store._r

    async def _start_subscription(
        self, channel: str, send: trio.MemorySendChannel[bytes], sub: _Subscription
    ) -> tuple[PubSubConnection, asyncio.Task[None]]:
        """(asyncio side) SUBSCRIBE on a fresh connection, wait for the confirmation, start the
        reader task."""
        pubsub = (await self._subscriber_for(channel)).pubsub()
        kind = "ssubscribe" if self.sharded else "subscribe"
        try:
            await (pubsub.ssubscribe if self.sharded else pubsub.subscribe)(channel)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SUBSCRIBE_TIMEOUT
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"{kind.upper()} {channel} not confirmed")
                msg = await pubsub.get_message(timeout=remaining)
                if msg is not None and msg["type"] == kind:
                    break
            reader = loop.create_task(self._read_subscription(pubsub, send, sub))
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub, reader

    async def _read_subscription(
        self, pubsub: PubSubConnection, send: trio.MemorySendChannel[bytes], sub: _Subscription
    ) -> None:
        """(asyncio task) Connection -> trio memory channel, without a crossing per message."""
        wait_for_room = trio_asyncio.trio_as_aio(send.send, loop=self._store._loop)
        data_type = "smessage" if self.sharded else "message"
        try:
            while True:
                msg = await pubsub.get_message(timeout=None)
                if msg is None:
                    continue
                if msg["type"] == "sunsubscribe":  # Redis Cluster: the channel's slot moved
                    raise ConnectionError("the shard channel's slot moved (SUNSUBSCRIBE)")
                if msg["type"] != data_type:
                    continue
                try:
                    send.send_nowait(msg["data"])
                except trio.WouldBlock:
                    await wait_for_room(msg["data"])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the subscriber left
        except Exception as exc:  # the connection failed: the iterator raises StateUnavailable
            sub.error = exc
        finally:
            send.close()

    async def _stop_subscription(
        self, pubsub: PubSubConnection, reader: asyncio.Task[None]
    ) -> None:
        reader.cancel()
        await asyncio.wait([reader])
        await pubsub.aclose()
