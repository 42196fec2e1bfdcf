"""The Redis state store: `nimbus.ports.StateStore` on redis.asyncio, used from trio.

Use it inside `trio_asyncio.open_loop()`::

    async with trio_asyncio.open_loop():
        async with open_redis_state("127.0.0.1:6379") as state:
            await state.connect("client-1", "pod-a")

`RedisState` provides the three state ports: `ClientRecords` and `Leases` here, `PubSub` in
`nimbus.engines.redis_pubsub` (the store hands `publish` and `subscribe` to it).

Every transition, lease call and `publish` is one script call whatever the batch size (publish:
one per 1000 messages), made on the lane (`nimbus.engines.redis_link.Lane`): one connection
whose asyncio task pipelines the calls of every trio task, which wait for their replies on a
trio.Event, with no crossing into asyncio per call. The reads (`get`, `get_many`, `replaying`,
`all_clients`: SMEMBERS, then pipelined HMGETs) and subscriptions make one crossing each
(`trio_asyncio.aio_as_trio`) on the connection pool. The transitions are the Lua scripts of
`nimbus.engines.redis_scripts`, which mirror `nimbus.core.lifecycle`; a batch travels as one JSON
argument and comes back as one compact reply, because redis-py packs every argument and parses
every reply element in pure Python, which cost more than the script itself. Scripts run by
EVALSHA, and a NOSCRIPT answer (Redis restarted and lost its script cache) reloads the script and
runs it again: the only retry here. redis-py's own retries are switched off; every redis or
socket error surfaces as `StateUnavailable`, naming the address.

Keys live under `prefix` (see `redis_scripts` for the layout); pub/sub channels are namespaced
too (see `redis_pubsub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import trio
import trio_asyncio
from loguru import logger
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from nimbus.core.lifecycle import ClientRecord, ConnectResult, Route, RouteDecision, Status
from nimbus.engines import redis_scripts
from nimbus.engines.redis_link import COMMAND_TIMEOUT, CONNECT_TIMEOUT, Lane, describe
from nimbus.engines.redis_pubsub import SUBSCRIBER_BUFFER, RedisPubSub
from nimbus.ports import AckItem, ClientRecords, DlqWrite, Leases, PubSub, StateUnavailable

__all__ = ["RedisState", "open_redis_state"]

T = TypeVar("T")

_HMGET_CHUNK = 1000  # HMGETs per pipeline (get_many, all_clients)
REDIS_MAX_CONNECTIONS = 100  # per process (subscriptions hold one each); callers wait beyond it

_FIELDS = ("status", "pod", "epoch", "acked", "routed_dlq", "dlq_written", "cursor")
_DROP = RouteDecision(Route.DROP)
_DLQ = RouteDecision(Route.DLQ)


def _client_name(prefix: str) -> str:
    # CLIENT SETNAME accepts '!'..'~' only; the name shows the namespace in CLIENT LIST.
    return re.sub(r"[^!-~]", "_", prefix.rstrip(":")) or "nimbus"


def _make_client(address: str, prefix: str) -> aioredis.Redis:
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": COMMAND_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),  # retry nothing silently
        "decode_responses": False,
        "client_name": _client_name(prefix),
        # RESP2: redis-py 8 defaults to RESP3, whose pure-Python push handling made a subscriber
        # ~30% slower here; nothing in this store uses a RESP3 feature.
        "protocol": 2,
    }
    # A blocking pool: past REDIS_MAX_CONNECTIONS a call waits for a free connection instead of
    # failing (the default pool raised MaxConnectionsError when ~1,000 streams connected at once,
    # each with its own connect script in flight).
    pool: aioredis.BlockingConnectionPool
    if "://" in address:
        pool = aioredis.BlockingConnectionPool.from_url(
            address, max_connections=REDIS_MAX_CONNECTIONS, timeout=COMMAND_TIMEOUT, **options
        )
    else:
        host, _, port = address.rpartition(":")
        pool = aioredis.BlockingConnectionPool(
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=COMMAND_TIMEOUT,
            host=host or "127.0.0.1",
            port=int(port),
            **options,
        )
    return aioredis.Redis.from_pool(pool)


def _str(value: bytes | None, default: str = "") -> str:
    return default if value is None else value.decode()


def _int(value: bytes | int | None, default: int) -> int:
    return default if value is None else int(value)


def _flags(reply: bytes | None) -> list[bool]:
    """A script's per-item answer: one b"1" / b"0" per item, in order (None: no items)."""
    return [f == 0x31 for f in reply or b""]


def _record(client_id: str, values: Sequence[bytes | None]) -> ClientRecord | None:
    """A ClientRecord from the hash fields in `_FIELDS` order; None if there is no record."""
    status, pod, epoch, acked, routed_dlq, dlq_written, cursor = values
    if status is None:
        return None
    return ClientRecord(
        client_id=client_id,
        status=Status(status.decode()),
        pod=_str(pod),
        epoch=_int(epoch, 0),
        acked=_int(acked, 0),
        routed_dlq=_int(routed_dlq, 0),
        dlq_written=_int(dlq_written, 0),
        cursor=_int(cursor, -1),
    )


class RedisState(ClientRecords, Leases, PubSub):
    """`StateStore` on Redis: `ClientRecords` and `Leases` here, `PubSub` handed to a
    `RedisPubSub` on the same connections. Build it with `open_redis_state`."""

    def __init__(self, address: str, prefix: str, loop: Any, record_ttl_ms: int = 0) -> None:
        self.address = address
        self.prefix = prefix
        self.record_ttl_ms = record_ttl_ms
        self.subscriber_buffer = SUBSCRIBER_BUFFER
        self._loop = loop  # the trio_asyncio loop; any trio task of this run may use the store
        self._redis: aioredis.Redis | None = None
        self._lane: Lane | None = None  # the script calls' connection (made by _open)
        self._pubsub = RedisPubSub(self)
        self._shas = {name: redis_scripts.sha1(src) for name, src in redis_scripts.SCRIPTS.items()}
        self._clients_key = f"{prefix}clients"
        self._replaying_key = f"{prefix}replaying"

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise StateUnavailable(f"redis at {self.address}: the state store is closed")
        return self._redis

    async def _cross(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run the asyncio coroutine function `fn(*args)` from trio: one crossing."""
        try:
            return cast(T, await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis at {self.address}: {describe(exc)}") from exc

    async def _script(
        self, name: str, args: Sequence[str | int | bytes], keys: Sequence[str] = ()
    ) -> Any:
        """EVALSHA on the lane (trio side, no crossing); on NOSCRIPT the script is loaded (one
        crossing) and run again, once."""
        lane = self._lane
        if lane is None:
            raise StateUnavailable(f"redis at {self.address}: the state store is closed")
        call = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        try:
            return await lane.call(*call)
        except NoScriptError:
            logger.info("redis at {}: script cache lost; reloading {}", self.address, name)

            async def load() -> None:
                await self._r.script_load(redis_scripts.SCRIPTS[name])

            await self._cross(load)
            try:
                return await lane.call(*call)
            except ResponseError as exc:
                raise StateUnavailable(f"redis at {self.address}: {describe(exc)}") from exc
        except ResponseError as exc:
            raise StateUnavailable(f"redis at {self.address}: {describe(exc)}") from exc

    async def _batch(self, name: str, flat: list[str | int]) -> Any:
        """A batch script: ARGV = prefix, the flattened batch as one JSON array."""
        return await self._script(
            name, (self.prefix, json.dumps(flat, ensure_ascii=False, separators=(",", ":")))
        )

    async def _open(self) -> None:
        """(asyncio side) Create the client, check Redis answers, load the scripts."""
        self._redis = r = _make_client(self.address, self.prefix)
        try:
            await asyncio.wait_for(r.ping(), CONNECT_TIMEOUT)
            pipe = r.pipeline(transaction=False)
            for source in redis_scripts.SCRIPTS.values():
                pipe.script_load(source)
            shas = await pipe.execute()
        except BaseException:
            self._redis = None
            await r.aclose()
            raise
        loaded = {
            name: sha if isinstance(sha, str) else sha.decode()
            for name, sha in zip(redis_scripts.SCRIPTS, shas, strict=True)
        }
        if loaded != self._shas:  # pragma: no cover - would mean Redis hashes scripts differently
            raise RuntimeError(f"unexpected script SHAs from redis at {self.address}: {loaded}")
        self._lane = Lane(self.address, r.connection_pool)

    async def _close(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            await lane.close()
        r, self._redis = self._redis, None
        if r is not None:
            await r.aclose()

    def _key(self, client_id: str) -> str:
        return f"{self.prefix}c:{client_id}"

    def _set_key(self, kind: str, client_id: str) -> str:
        """The key of the `kind` set ("clients", "replaying") that holds `client_id`."""
        return f"{self.prefix}{kind}"

    # -- ClientRecords: transitions (nimbus.core.lifecycle, via redis_scripts) -------------------

    async def connect(self, client_id: str, pod: str) -> ConnectResult:
        epoch, status, previous_pod, previous_epoch = await self._script(
            "connect", (self.prefix, client_id, pod)
        )
        return ConnectResult(
            int(epoch), Status(status.decode()), previous_pod.decode(), int(previous_epoch)
        )

    async def disconnect(self, client_id: str, epoch: int) -> bool:
        return bool(
            await self._script("disconnect", (self.prefix, client_id, epoch, self.record_ttl_ms))
        )

    @staticmethod
    def _split(name: str, reply: Any) -> list[Any] | None:
        """A batch script's reply as one answer per item (None: the script answers nothing)."""
        if name == "route":  # one JSON array
            return cast(list[Any], json.loads(reply))
        if name in ("ack", "try_flip"):  # one string of "1"/"0"
            return _flags(reply)
        return None

    async def _run_items(self, name: str, items: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Batch script `name` over `items` (each starts with its client id): one call; the
        per-item answers in order (empty if the script answers nothing)."""
        if not items:
            await trio.lowlevel.checkpoint()
            return []
        flat: list[str | int] = [x for it in items for x in it]
        return self._split(name, await self._batch(name, flat)) or []

    async def route(self, items: Sequence[tuple[str, int]]) -> list[RouteDecision]:
        out = []
        for code in await self._run_items("route", items):
            if code == "D":
                out.append(_DROP)
            elif code == "Q":
                out.append(_DLQ)
            else:  # "L{epoch}:{pod}"
                epoch, _, pod = code[1:].partition(":")
                out.append(RouteDecision(Route.LIVE, pod, int(epoch)))
        return out

    async def divert(self, items: Sequence[tuple[str, int]]) -> None:
        await self._run_items("divert", items)

    async def dlq_written(self, items: Sequence[DlqWrite]) -> None:
        # lifecycle.dlq_written ignores the partition: a client's DLQ records share one partition.
        await self._run_items(
            "dlq_written", [(w.client_id, w.delivery_id, w.offset) for w in items]
        )

    async def ack(self, items: Sequence[AckItem]) -> list[bool]:
        return await self._run_items("ack", [(a.client_id, a.acked) for a in items])

    async def advance_cursor(self, items: Sequence[tuple[str, int]]) -> None:
        await self._run_items("advance_cursor", items)

    async def try_flip(self, client_ids: Sequence[str]) -> list[bool]:
        return await self._run_items("try_flip", [(c,) for c in client_ids])

    # -- ClientRecords: reads and scans -------------------------------------------------------

    async def get(self, client_id: str) -> ClientRecord | None:
        async def read() -> list[bytes | None]:
            # decode_responses=False: replies are bytes, whatever the stubs' union says
            return cast(list[bytes | None], await self._r.hmget(self._key(client_id), _FIELDS))

        return _record(client_id, await self._cross(read))

    async def _hmget_records(self, client_ids: Sequence[str]) -> list[ClientRecord | None]:
        """The records of `client_ids` by pipelined HMGETs (asyncio side: call inside a crossing)."""
        out: list[ClientRecord | None] = []
        for start in range(0, len(client_ids), _HMGET_CHUNK):
            chunk = client_ids[start : start + _HMGET_CHUNK]
            pipe = self._r.pipeline(transaction=False)
            for client_id in chunk:
                pipe.hmget(self._key(client_id), _FIELDS)
            out += [_record(c, v) for c, v in zip(chunk, await pipe.execute(), strict=True)]
        return out

    async def get_many(self, client_ids: Sequence[str]) -> list[ClientRecord | None]:
        if not client_ids:
            await trio.lowlevel.checkpoint()
            return []
        return await self._cross(self._hmget_records, client_ids)

    async def replaying(self) -> list[str]:
        async def read() -> set[bytes]:
            return cast(set[bytes], await self._r.smembers(self._replaying_key))

        return sorted(m.decode() for m in await self._cross(read))

    async def all_clients(self) -> list[ClientRecord]:
        # One crossing: SMEMBERS, then the hashes by pipelined HMGETs (not one atomic snapshot:
        # each record is consistent, the set of them is read across a few round trips).
        async def read() -> list[ClientRecord]:
            members = cast(set[bytes], await self._r.smembers(self._clients_key))
            ids = sorted(m.decode() for m in members)
            records = await self._hmget_records(ids)
            gone = [c for c, rec in zip(ids, records, strict=True) if rec is None]
            if gone:  # expired records (NIMBUS_RECORD_TTL_SEC): their ids leave the set too
                await self._r.srem(self._clients_key, *gone)
            return [rec for rec in records if rec is not None]

        return await self._cross(read)

    # -- Leases ------------------------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        if ttl_ms < 1:
            raise ValueError(f"lease ttl_ms must be >= 1, not {ttl_ms}")
        key = f"{self.prefix}lease:{name}"
        return bool(await self._script("acquire_lease", (owner, ttl_ms), (key,)))

    async def release_lease(self, name: str, owner: str) -> None:
        await self._script("release_lease", (owner,), (f"{self.prefix}lease:{name}",))

    # -- PubSub (nimbus.engines.redis_pubsub) ------------------------------------------------

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        await self._pubsub.publish(messages)

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._pubsub.subscribe(channel)


@asynccontextmanager
async def open_redis_state(
    address: str, *, prefix: str = "nimbus:", record_ttl_ms: int = 0
) -> AsyncIterator[RedisState]:
    """A `RedisState` on the Redis at `address` ("host:port" or a redis:// URL).

    Must be used inside `trio_asyncio.open_loop()`. Raises StateUnavailable if Redis does not
    answer within ~5 s.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("open_redis_state() must be used inside trio_asyncio.open_loop()")
    state = RedisState(address, prefix, loop, record_ttl_ms)
    try:
        await state._cross(state._open)
    except StateUnavailable as exc:
        raise StateUnavailable(
            f"cannot reach redis at {address}: {describe(exc.__cause__)}"
        ) from exc
    try:
        yield state
    finally:
        with trio.move_on_after(CONNECT_TIMEOUT, shield=True):
            with contextlib.suppress(StateUnavailable):
                await state._cross(state._close)
