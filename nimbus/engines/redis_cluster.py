"""The Redis state store on Redis Cluster: `RedisClusterState`, the `RedisState` of a cluster.

Use it like `open_redis_state` (inside `trio_asyncio.open_loop()`)::

    async with open_redis_cluster_state("10.0.0.1:7000,10.0.0.2:7000") as state:
        ...

Same ports, same scripts, other key names (`nimbus.engines.redis_scripts.CLUSTER_SCRIPTS`): a
client's record `<prefix>c:{<client_id>}` carries the client's hash tag, and the `clients` and
`replaying` sets are one per slot, so everything a transition touches for one client is in that
client's slot.

- **Slot map.** redis-py's `redis.asyncio.cluster.RedisCluster` finds the nodes and the slots
  (CLUSTER SLOTS, from the seed nodes); this store reads its slot cache, and asks it to refresh
  after an error that says the map is stale (a MOVED/ASK, a "non local key" from a script, a
  CLUSTERDOWN/TRYAGAIN, a lost connection). The reads (`get`, `get_many`) and the lease scripts
  (one declared key) go through `RedisCluster` itself, which follows redirects.
- **Batches split per node.** A batch (route, ack, ...) is split by the master of each client's
  slot and each part is one script call on that master (in parallel), atomic for the clients in
  it; a client's items keep their order (they all go to one part). The answer is put back in the
  batch's order. If a part fails, the call raises StateUnavailable: the other parts may have been
  applied, which the caller already treats as it treats a lost reply (it retries; the
  transitions are idempotent for a retry, see `nimbus.core.lifecycle`). Every script reads all
  its records before its first write, so a part sent to a master that lost the slot fails
  before it changed anything; it is sent once more after the map is refreshed.
- **One lane per master** (`nimbus.engines.redis_link.Lane`): the script calls to one master are
  pipelined on one connection, with no crossing into asyncio per call.
- **Failover** (the choice for #17's "Redis failover without breaking the contract"): Redis
  replication is asynchronous, so a master that dies right after a script can take the write with
  it. Each lane ends every batch that wrote with `WAIT replicas timeout`
  (NIMBUS_REDIS_WAIT_REPLICAS, NIMBUS_REDIS_WAIT_MS), and a write is answered only once that many
  replicas confirmed it; otherwise the caller gets StateUnavailable (outcome unknown) and retries,
  as after a lost reply. With one replica per master, the replica that takes over has every
  transition a caller was told about. Cost: a master without a live replica refuses writes (after
  the timeout) until one is back; NIMBUS_REDIS_WAIT_REPLICAS=0 trades that for the risk.
- **Sharded pub/sub.** The port's channel `x` is the shard channel `<prefix>ch:x`: `publish`
  is SPUBLISH (one script per master and 1000 messages), `subscribe` is SSUBSCRIBE on a
  connection to the channel's master. A failover or a moved slot ends the subscription (a lost
  connection, or Redis's SUNSUBSCRIBE): the iterator raises StateUnavailable, as on one node, and
  the subscriber subscribes again (on the map refreshed by then).
- **Scans** (`replaying`, `all_clients`): one read-only script per master that gathers the
  members of the per-slot sets of the slots it serves (GATHER), in parallel.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import redis.asyncio as aioredis
import trio
import trio_asyncio
from loguru import logger
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from nimbus.core.lifecycle import ClientRecord, ConnectResult, Status
from nimbus.engines import redis_scripts
from nimbus.engines.redis import _FIELDS, RedisState, _client_name, _record
from nimbus.engines.redis_link import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    Lane,
    NotReplicated,
    describe,
)
from nimbus.engines.redis_pubsub import _PUBLISH_CHUNK, RedisPubSub
from nimbus.ports import StateUnavailable

__all__ = ["RedisClusterState", "open_redis_cluster_state", "slot_tags"]

SLOTS = 16384
_REFRESH_MIN_S = 0.25  # at most one slot-map refresh per this many seconds
_STALE = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")

_tags: list[str] = []


def slot_tags() -> list[str]:
    """A short tag per slot (index: slot) that hashes to that slot: the per-slot sets' hash tags.
    Computed once (~0.1 s): base-36 numbers, the first that lands on each slot."""
    if not _tags:
        tags = [""] * SLOTS
        missing, i = SLOTS, 0
        while missing:
            tag = _base36(i)
            slot = key_slot(tag.encode())
            if not tags[slot]:
                tags[slot] = tag
                missing -= 1
            i += 1
        _tags[:] = tags
    return _tags


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = digits[n % 36]
    while n >= 36:
        n //= 36
        out = digits[n % 36] + out
    return out


def _seeds(address: str) -> list[ClusterNode]:
    nodes = []
    for part in address.split(","):
        host, _, port = part.strip().rpartition(":")
        nodes.append(ClusterNode(host or "127.0.0.1", int(port)))
    return nodes


class _Moved(StateUnavailable):
    """A master answered that it does not serve a slot of the call (MOVED, ASK, a script's
    "non local key", CLUSTERDOWN, TRYAGAIN): nothing was applied, and the slot map is stale."""


def _is_stale(exc: ResponseError) -> bool:
    text = str(exc)
    return text.startswith(_STALE) or "non local key" in text or "cluster is down" in text


class RedisClusterState(RedisState):
    """`StateStore` on Redis Cluster (see the module's doc). Build it with
    `open_redis_cluster_state`."""

    def __init__(
        self,
        address: str,
        prefix: str,
        loop: Any,
        record_ttl_ms: int = 0,
        wait: tuple[int, int] = (1, 1000),
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"on Redis Cluster the key prefix may not contain braces: {prefix!r}")
        super().__init__(address, prefix, loop, record_ttl_ms)
        self._wait = wait
        self._pubsub = ClusterPubSub(self)
        self._shas = {
            name: redis_scripts.sha1(src) for name, src in redis_scripts.CLUSTER_SCRIPTS.items()
        }
        self._rc: RedisCluster | None = None
        self._masters: list[str | None] = [None] * SLOTS  # slot -> "host:port" of its master
        self._gather_args: dict[str, str] = {}
        self._lanes: dict[str, Lane] = {}
        self._subscribers: dict[str, aioredis.Redis] = {}
        self._stale = False
        self._refreshed_at = -1e9
        self._refresh_lock = trio.Lock()

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _r(self) -> Any:  # the RedisCluster (its commands route by key; tests use it directly)
        return self._cluster

    @property
    def _cluster(self) -> RedisCluster:
        if self._rc is None:
            raise StateUnavailable(f"redis cluster at {self.address}: the state store is closed")
        return self._rc

    async def _open(self) -> None:
        """(asyncio side) Find the cluster, read its slot map."""
        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": COMMAND_TIMEOUT,
            "decode_responses": False,
            "client_name": _client_name(self.prefix),
            "protocol": 2,
            # redirects and a refresh after a failed node: RedisCluster's own (reads and leases)
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        }
        rc = RedisCluster(startup_nodes=_seeds(self.address), **options)
        try:
            await rc.initialize()
        except BaseException:
            await rc.aclose()
            raise
        self._rc = rc
        self._read_map()

    def _read_map(self) -> None:
        cache = self._cluster.nodes_manager.slots_cache
        self._masters = [cache[s][0].name if cache.get(s) else None for s in range(SLOTS)]
        tags = slot_tags()
        by_master: dict[str, list[str]] = {}
        for slot, addr in enumerate(self._masters):
            if addr is not None:
                by_master.setdefault(addr, []).append(tags[slot])
        # GATHER's argument per master: the tags of the slots it serves (one JSON array)
        self._gather_args = {a: json.dumps(t, separators=(",", ":")) for a, t in by_master.items()}

    async def _close(self) -> None:
        lanes, self._lanes = self._lanes, {}
        for lane in lanes.values():
            await lane.close()
        subs, self._subscribers = self._subscribers, {}
        for r in subs.values():
            await r.aclose()
        rc, self._rc = self._rc, None
        if rc is not None:
            await rc.aclose()

    async def _cross(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args)
        except (RedisError, RedisClusterException, OSError) as exc:
            # RedisClusterException (e.g. RedisClusterUnreachableError from a refresh while a
            # master is down) is not a RedisError; it once escaped and stopped the process.
            self._stale = True
            raise StateUnavailable(f"redis cluster at {self.address}: {describe(exc)}") from exc

    async def _refresh(self) -> None:
        """Ask RedisCluster for the slot map again (at most every _REFRESH_MIN_S)."""
        async with self._refresh_lock:
            if not self._stale or trio.current_time() - self._refreshed_at < _REFRESH_MIN_S:
                return
            self._refreshed_at = trio.current_time()

            async def reinit() -> None:
                await self._cluster.nodes_manager.initialize()
                self._read_map()

            await self._cross(reinit)
            self._stale = False
            logger.debug("redis cluster at {}: slot map refreshed", self.address)

    def _slot_of(self, client_id: str) -> int:
        return int(key_slot(self._key(client_id).encode()))

    async def _master(self, slot: int) -> str:
        if self._stale:
            await self._refresh()
        addr = self._masters[slot]
        if addr is None:
            self._stale = True
            raise StateUnavailable(f"redis cluster at {self.address}: slot {slot} has no master")
        return addr

    async def _lane_to(self, addr: str) -> Lane:
        lane = self._lanes.get(addr)
        if lane is None:

            async def make() -> Lane:
                host, _, port = addr.rpartition(":")
                pool = aioredis.ConnectionPool(
                    host=host,
                    port=int(port),
                    socket_connect_timeout=CONNECT_TIMEOUT,
                    client_name=_client_name(self.prefix),
                    protocol=2,
                )
                return Lane(addr, pool, self._wait if self._wait[0] > 0 else None)

            made = await self._cross(make)
            lane = self._lanes.setdefault(addr, made)
            if lane is not made:  # another task made one meanwhile: one lane per master
                await self._cross(made.close)
        return lane

    async def _on(
        self, addr: str, name: str, args: Sequence[str | int | bytes], keys: Sequence[str] = ()
    ) -> Any:
        """EVALSHA of script `name` on the master at `addr` (its lane); NOSCRIPT loads it there
        and runs it again; an answer that says the slot map is stale refreshes it and raises."""
        lane = await self._lane_to(addr)
        call = ("EVALSHA", self._shas[name], len(keys), *keys, *args)
        write = name != "gather"
        try:
            try:
                return await lane.call(*call, write=write)
            except NoScriptError:
                logger.info("redis at {}: loading script {}", addr, name)
                await lane.call("SCRIPT", "LOAD", redis_scripts.CLUSTER_SCRIPTS[name], write=False)
                return await lane.call(*call, write=write)
        except ResponseError as exc:
            if _is_stale(exc):
                self._stale = True
                raise _Moved(f"redis at {addr}: {describe(exc)}") from exc
            raise StateUnavailable(f"redis at {addr}: {describe(exc)}") from exc
        except StateUnavailable as exc:
            if not isinstance(exc.__cause__, NotReplicated):  # a lost connection: a failover?
                self._stale = True
            raise

    async def _on_slot(
        self, slot: int, name: str, args: Sequence[str | int | bytes], keys: Sequence[str] = ()
    ) -> Any:
        """`_on` on the master of `slot`; once more on a refreshed map if that master answered
        that it does not serve the slot (the script did not run). Any other failure is raised:
        a write whose reply was lost, or not confirmed by the replicas, may have been applied,
        and only the caller knows whether to retry it."""
        try:
            return await self._on(await self._master(slot), name, args, keys)
        except _Moved:
            await trio.sleep(_REFRESH_MIN_S)
            return await self._on(await self._master(slot), name, args, keys)

    async def _by_master(self, slots: Sequence[int]) -> dict[str, list[int]]:
        """Indexes into `slots` grouped by the master of each slot, in order."""
        groups: dict[str, list[int]] = {}
        for i, slot in enumerate(slots):
            groups.setdefault(await self._master(slot), []).append(i)
        return groups

    async def _parallel(self, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """Run `jobs` at once; the first StateUnavailable (if any) is raised after all ended."""
        if len(jobs) == 1:
            await jobs[0]()
            return
        errors: list[StateUnavailable] = []

        async def run(job: Callable[[], Awaitable[None]]) -> None:
            try:
                await job()
            except StateUnavailable as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(run, job)
        if errors:
            raise errors[0]

    def _tags_arg(self, client_ids: Sequence[str], slots: Sequence[int]) -> str:
        tags = slot_tags()
        return json.dumps(
            {c: tags[s] for c, s in zip(client_ids, slots, strict=True)},
            ensure_ascii=False,
            separators=(",", ":"),
        )

    # -- ClientRecords: transitions ------------------------------------------------------------

    def _key(self, client_id: str) -> str:
        return f"{self.prefix}c:{{{client_id}}}"

    def _set_key(self, kind: str, client_id: str) -> str:
        return f"{self.prefix}{kind}{{{slot_tags()[self._slot_of(client_id)]}}}"

    async def connect(self, client_id: str, pod: str) -> ConnectResult:
        slot = self._slot_of(client_id)
        epoch, status, previous_pod, previous_epoch = await self._on_slot(
            slot, "connect", (self.prefix, client_id, pod, self._tags_arg([client_id], [slot]))
        )
        return ConnectResult(
            int(epoch), Status(status.decode()), previous_pod.decode(), int(previous_epoch)
        )

    async def disconnect(self, client_id: str, epoch: int) -> bool:
        slot = self._slot_of(client_id)
        tags = self._tags_arg([client_id], [slot])
        args = (self.prefix, client_id, epoch, self.record_ttl_ms, tags)
        return bool(await self._on_slot(slot, "disconnect", args))

    async def _run_items(self, name: str, items: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Batch script `name` over `items` (each starts with its client id), split by master;
        the per-item answers in the batch's order."""
        if not items:
            await trio.lowlevel.checkpoint()
            return []
        ids = [str(it[0]) for it in items]
        slots = [self._slot_of(c) for c in ids]
        out: list[Any] = [None] * len(items)

        def job(idx: list[int]) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                flat = [x for i in idx for x in items[i]]
                part_ids = [ids[i] for i in idx]
                args = (
                    self.prefix,
                    json.dumps(flat, ensure_ascii=False, separators=(",", ":")),
                    self._tags_arg(part_ids, [slots[i] for i in idx]),
                )
                # one slot of the part tells its master; a stale map is retried once
                answers = self._split(name, await self._on_slot(slots[idx[0]], name, args))
                for i, a in zip(idx, answers or [None] * len(idx), strict=True):
                    out[i] = a

            return run

        groups = await self._by_master(slots)
        await self._parallel([job(idx) for idx in groups.values()])
        return out

    # -- ClientRecords: reads and scans -------------------------------------------------------

    async def get(self, client_id: str) -> ClientRecord | None:
        async def read() -> list[bytes | None]:
            return cast(
                list[bytes | None], await self._cluster.hmget(self._key(client_id), _FIELDS)
            )

        return _record(client_id, await self._cross(read))

    async def _hmget_records(self, client_ids: Sequence[str]) -> list[ClientRecord | None]:
        """(asyncio side) The records of `client_ids` by one cluster pipeline of HMGETs."""
        pipe = self._cluster.pipeline(transaction=False)
        for client_id in client_ids:
            pipe.hmget(self._key(client_id), _FIELDS)
        values = await pipe.execute()
        return [_record(c, v) for c, v in zip(client_ids, values, strict=True)]

    async def _gather(self, kind: str) -> list[str]:
        """Members of every per-slot set of `kind` ("clients", "replaying"), sorted."""
        if self._stale:
            await self._refresh()
        if None in self._masters:
            self._stale = True
            raise StateUnavailable(f"redis cluster at {self.address}: a slot has no master")
        found: list[bytes] = []

        def job(addr: str, arg: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                found.extend(await self._on(addr, "gather", (self.prefix + kind, arg)))

            return run

        await self._parallel([job(a, arg) for a, arg in self._gather_args.items()])
        return sorted({m.decode() for m in found})

    async def replaying(self) -> list[str]:
        return await self._gather("replaying")

    async def all_clients(self) -> list[ClientRecord]:
        ids = await self._gather("clients")
        records = await self.get_many(ids)
        gone = [c for c, rec in zip(ids, records, strict=True) if rec is None]
        if gone:  # expired records (NIMBUS_RECORD_TTL_SEC): their ids leave the sets too

            async def forget() -> None:
                pipe = self._cluster.pipeline(transaction=False)
                for c in gone:
                    pipe.srem(self._set_key("clients", c), c)
                await pipe.execute()

            await self._cross(forget)
        return [rec for rec in records if rec is not None]

    # -- Leases (one declared key: the slot of the lease's key) -------------------------------

    async def _script(
        self, name: str, args: Sequence[str | int | bytes], keys: Sequence[str] = ()
    ) -> Any:
        if not keys:
            raise TypeError(f"on Redis Cluster, script {name!r} is called by node, not here")
        return await self._on_slot(int(key_slot(keys[0].encode())), name, args, keys)


class ClusterPubSub(RedisPubSub):
    """`PubSub` on Redis Cluster: sharded pub/sub (SPUBLISH / SSUBSCRIBE on the channel's master)."""

    sharded = True

    def __init__(self, store: RedisClusterState) -> None:
        super().__init__(store)
        self._cstore = store

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        # Per master, in order: a channel's messages all go to its master, in one sequence.
        if not messages:
            await trio.lowlevel.checkpoint()
            return
        store = self._cstore
        names = [self._channel(ch) for ch, _ in messages]
        slots = [int(key_slot(n.encode())) for n in names]
        groups = await store._by_master(slots)

        def job(idx: list[int]) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for start in range(0, len(idx), _PUBLISH_CHUNK):
                    args: list[str | bytes] = []
                    for i in idx[start : start + _PUBLISH_CHUNK]:
                        args += (names[i], messages[i][1])
                    await store._on_slot(slots[idx[start]], "publish", args)

            return run

        await store._parallel([job(idx) for idx in groups.values()])

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        # A fresh slot map first: a subscriber comes back here after a failover ended its
        # subscription, and must find the channel's new master.
        self._cstore._stale = True
        await self._cstore._refresh()
        async with super().subscribe(channel) as sub:
            yield sub

    async def _subscriber_for(self, channel: str) -> aioredis.Redis:
        """(asyncio side) A client of the master of `channel`'s slot (one per master)."""
        store = self._cstore
        addr = store._masters[int(key_slot(channel.encode()))]
        if addr is None:
            raise ConnectionError(f"the slot of {channel!r} has no master")
        r = store._subscribers.get(addr)
        if r is None:
            host, _, port = addr.rpartition(":")
            r = store._subscribers[addr] = aioredis.Redis(
                host=host,
                port=int(port),
                socket_connect_timeout=CONNECT_TIMEOUT,
                decode_responses=False,
                client_name=_client_name(store.prefix),
                protocol=2,
            )
        return r


@asynccontextmanager
async def open_redis_cluster_state(
    address: str,
    *,
    prefix: str = "nimbus:",
    record_ttl_ms: int = 0,
    wait_replicas: int = 1,
    wait_ms: int = 1000,
) -> AsyncIterator[RedisClusterState]:
    """A `RedisClusterState` on the Redis Cluster that the seed nodes `address` ("host:port,...")
    belong to. Must be used inside `trio_asyncio.open_loop()`. Raises StateUnavailable if the
    cluster does not answer within ~5 s."""
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError(
            "open_redis_cluster_state() must be used inside trio_asyncio.open_loop()"
        )
    state = RedisClusterState(address, prefix, loop, record_ttl_ms, (wait_replicas, wait_ms))
    try:
        with trio.fail_after(CONNECT_TIMEOUT * 3):
            await state._cross(state._open)
    except (StateUnavailable, trio.TooSlowError) as exc:
        raise StateUnavailable(
            f"cannot reach the redis cluster at {address}: {describe(exc.__cause__ or exc)}"
        ) from exc
    try:
        yield state
    finally:
        with trio.move_on_after(CONNECT_TIMEOUT, shield=True):
            try:
                await state._cross(state._close)
            except StateUnavailable as exc:
                logger.debug("closing the redis cluster state: {}", exc)
