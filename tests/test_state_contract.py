"""The StateStore contract, run against every engine: MemoryState always, RedisState with the
real Redis (marker `integration`, NIMBUS_TEST_REDIS_ADDRESS).

Concrete cases first (one per rule of `nimbus.core.lifecycle`), then every transition of
`lifecycle.TRANSITIONS` taken from stored records of every status, then leases and pub/sub, then a
Hypothesis property: random operation sequences applied to the store give exactly the records
(and results) of folding the lifecycle functions in Python. For Redis that is what proves the Lua
in `nimbus/engines/redis_scripts.py` matches `nimbus/core/lifecycle.py`.
"""

from __future__ import annotations

import gc
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import pytest
import trio
import trio_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from nimbus.core import lifecycle
from nimbus.core.lifecycle import ClientRecord, ConnectResult, Route, RouteDecision, Status
from nimbus.engines import redis_scripts
from nimbus.engines.memory import MemoryState
from nimbus.engines.redis import RedisState, _client_name, open_redis_state
from nimbus.engines.redis_cluster import RedisClusterState, open_redis_cluster_state
from nimbus.ports import AckItem, DlqWrite, StateStore, StateUnavailable

T = TypeVar("T")

TIMEOUT = 15  # seconds, around every test that does I/O

ENGINES = [
    "memory",
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("redis-cluster", marks=pytest.mark.integration),
]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The engine: "memory", the address of the real Redis, or "cluster:" and the seed nodes of
    the real Redis Cluster."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_address"))
    if request.param == "redis-cluster":
        return "cluster:" + str(request.getfixturevalue("redis_cluster_address"))
    return "memory"


async def _purge(state: RedisState) -> None:
    """Delete every key under the state's prefix (test cleanup)."""

    async def purge() -> None:
        keys = [k async for k in state._r.scan_iter(match=f"{state.prefix}*", count=1000)]
        if isinstance(state, RedisClusterState):  # one key per DEL: keys of many slots
            for k in keys:
                await state._r.delete(k)
        elif keys:
            await state._r.delete(*keys)

    await state._cross(purge)


async def _raw(state: RedisState, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a redis.asyncio call on the state's own client (test-only access to Redis)."""

    async def call() -> Any:
        return await fn(state._r, *args)

    return await state._cross(call)


@asynccontextmanager
async def _open_store(engine: str, prefix: str) -> AsyncIterator[StateStore]:
    if engine == "memory":
        yield MemoryState()
        return
    opened: AbstractAsyncContextManager[RedisState]
    if engine.startswith("cluster:"):
        opened = open_redis_cluster_state(engine.removeprefix("cluster:"), prefix=prefix)
    else:
        opened = open_redis_state(engine, prefix=prefix)
    async with trio_asyncio.open_loop(), opened as state:
        try:
            yield state
        finally:
            with trio.move_on_after(5, shield=True):
                await _purge(state)


@pytest.fixture
async def store(engine: str, unique: str) -> AsyncIterator[StateStore]:
    async with _open_store(engine, f"nimbus-test:{unique}:") as s:
        yield s


@pytest.fixture
async def redis_store(redis_address: str, unique: str) -> AsyncIterator[RedisState]:
    async with _open_store(redis_address, f"nimbus-test:{unique}:") as state:
        assert isinstance(state, RedisState)
        yield state


async def _rec(store: StateStore, client_id: str) -> ClientRecord:
    rec = await store.get(client_id)
    assert rec is not None
    return rec


# -- transitions -------------------------------------------------------------------------------


async def test_connect_new_client_is_live_epoch_1(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.get("c1") is None
        res = await store.connect("c1", "pod-a")
        assert res == ConnectResult(epoch=1, status=Status.LIVE, previous_pod="", previous_epoch=0)
        assert await store.get("c1") == ClientRecord("c1", Status.LIVE, "pod-a", epoch=1)
        assert await store.all_clients() == [ClientRecord("c1", Status.LIVE, "pod-a", epoch=1)]
        assert await store.replaying() == []


async def test_get_many_reads_each_record_in_order(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.get_many([]) == []
        await store.connect("c1", "pod-a")
        await store.connect("c2", "pod-b")
        await store.disconnect("c2", 1)
        got = await store.get_many(["c2", "nobody", "c1"])
        assert got == [await store.get("c2"), None, await store.get("c1")]
        assert (
            got[0] is not None
            and got[0].status is Status.OFFLINE
            and got[2] is not None
            and got[2].pod == "pod-a"
        )


async def test_reconnect_replaces_stream_and_replays_backlog(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.connect("c1", "pod-a")
        # Reconnect without backlog: LIVE, the old stream (pod-a, epoch 1) is to be closed.
        assert await store.connect("c1", "pod-b") == ConnectResult(2, Status.LIVE, "pod-a", 1)
        # A live delivery fails: backlog.
        await store.divert([("c1", 5)])
        assert (await _rec(store, "c1")).status is Status.REPLAYING
        res = await store.connect("c1", "pod-c")
        assert res == ConnectResult(3, Status.REPLAYING, "pod-b", 2)
        assert await store.get("c1") == ClientRecord(
            "c1", Status.REPLAYING, "pod-c", epoch=3, routed_dlq=5
        )
        # Reconnect after a disconnect: no previous stream to close, backlog still there.
        assert await store.disconnect("c1", 3)
        assert await store.connect("c1", "pod-d") == ConnectResult(4, Status.REPLAYING, "", 3)
        assert await store.replaying() == ["c1"]


async def test_disconnect_only_for_the_current_epoch(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.connect("c1", "pod-a")
        await store.connect("c1", "pod-b")  # epoch 2
        before = await store.get("c1")
        assert not await store.disconnect("c1", 1)  # stale stream: nothing changes
        assert await store.get("c1") == before
        assert not await store.disconnect("c1", 3)  # no such stream yet
        assert await store.get("c1") == before
        assert await store.disconnect("c1", 2)
        assert await store.get("c1") == ClientRecord("c1", Status.OFFLINE, "", epoch=2)
        assert not await store.disconnect("c1", 2)  # already offline
        assert not await store.disconnect("never-seen", 0)  # offline by default


async def test_route_drop_live_dlq(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        # Offline client: DLQ, and routed_dlq is raised when the decision is made.
        assert await store.route([("c1", 5)]) == [RouteDecision(Route.DLQ)]
        assert (await _rec(store, "c1")).routed_dlq == 5
        assert await store.route([("c1", 3)]) == [RouteDecision(Route.DLQ)]
        assert (await _rec(store, "c1")).routed_dlq == 5  # max, not last
        await store.ack([AckItem("c1", 3)])
        # Already received: DROP, whatever the status.
        assert await store.route([("c1", 2), ("c1", 3)]) == [RouteDecision(Route.DROP)] * 2
        # Backlog (5 > 3): connect replays; REPLAYING routes to the DLQ.
        res = await store.connect("c1", "pod-a")
        assert res.status is Status.REPLAYING
        assert await store.route([("c1", 6)]) == [RouteDecision(Route.DLQ)]
        await store.ack([AckItem("c1", 6)])
        assert await store.try_flip(["c1"]) == [True]
        # LIVE: publish to the pod, fenced by the epoch; the record does not change.
        before = await store.get("c1")
        decisions = await store.route([("c1", 7), ("c2", 1), ("c1", 6), ("c1", 8)])
        assert decisions == [
            RouteDecision(Route.LIVE, "pod-a", 1),
            RouteDecision(Route.DLQ),
            RouteDecision(Route.DROP),
            RouteDecision(Route.LIVE, "pod-a", 1),
        ]
        assert await store.get("c1") == before
        assert (await _rec(store, "c2")).routed_dlq == 1
        assert await store.route([]) == []


async def test_divert_flips_live_to_replaying(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.connect("c1", "pod-a")
        await store.ack([AckItem("c1", 4)])
        await store.divert([("c1", 4)])  # already received: nothing
        assert await store.get("c1") == ClientRecord("c1", Status.LIVE, "pod-a", 1, acked=4)
        await store.divert([("c1", 9), ("c1", 7)])
        assert await store.get("c1") == ClientRecord(
            "c1", Status.REPLAYING, "pod-a", 1, acked=4, routed_dlq=9
        )
        assert await store.replaying() == ["c1"]
        # Offline clients stay offline; their backlog grows.
        await store.divert([("c2", 3)])
        assert await store.get("c2") == ClientRecord("c2", Status.OFFLINE, routed_dlq=3)
        await store.divert([])


async def test_dlq_written_cursor_rules(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        # First write: nothing older unacked, the cursor (-1) jumps to the offset.
        await store.dlq_written([DlqWrite("c1", 1, partition=0, offset=10)])
        rec = await _rec(store, "c1")
        assert (rec.cursor, rec.dlq_written) == (10, 1)
        # Delivery 1 is not acked: the cursor must stay where delivery 1 is.
        await store.dlq_written([DlqWrite("c1", 2, 0, 11), DlqWrite("c1", 3, 0, 12)])
        rec = await _rec(store, "c1")
        assert (rec.cursor, rec.dlq_written) == (10, 3)
        # Everything written is acked: the next write moves the cursor to it.
        await store.ack([AckItem("c1", 3)])
        await store.dlq_written([DlqWrite("c1", 4, 0, 20)])
        rec = await _rec(store, "c1")
        assert (rec.cursor, rec.dlq_written) == (20, 4)
        # The cursor never goes back, and dlq_written is a max.
        await store.ack([AckItem("c1", 4)])
        await store.dlq_written([DlqWrite("c1", 2, 0, 15)])
        rec = await _rec(store, "c1")
        assert (rec.cursor, rec.dlq_written) == (20, 4)
        await store.dlq_written([])


async def test_ack_is_monotonic(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.ack([AckItem("c1", 5)])
        await store.ack([AckItem("c1", 3)])
        assert (await _rec(store, "c1")).acked == 5
        await store.ack([AckItem("c1", 7), AckItem("c2", 2), AckItem("c1", 6)])
        assert (await _rec(store, "c1")).acked == 7
        assert await store.get("c2") == ClientRecord("c2", acked=2)
        await store.ack([])


async def test_advance_cursor_is_monotonic(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.advance_cursor([("c1", 8), ("c1", 5)])
        assert (await _rec(store, "c1")).cursor == 8
        await store.advance_cursor([("c1", 9)])
        assert (await _rec(store, "c1")).cursor == 9
        await store.advance_cursor([])


async def test_try_flip_only_when_backlog_acked(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.connect("c1", "pod-a")
        await store.divert([("c1", 5)])
        assert await store.ack([AckItem("c1", 4)]) == [False]
        assert await store.try_flip(["c1"]) == [False]  # acked 4 < routed_dlq 5
        assert (await _rec(store, "c1")).status is Status.REPLAYING
        # The ack that completes the backlog says so (the pod then asks the status manager).
        assert await store.ack([AckItem("c1", 5), AckItem("c2", 1)]) == [True, False]
        assert (await _rec(store, "c1")).status is Status.REPLAYING  # ack alone never flips
        assert await store.try_flip(["c1", "c1"]) == [True, False]
        assert await store.ack([AckItem("c1", 6)]) == [False]  # LIVE: nothing to flip
        assert (await _rec(store, "c1")).status is Status.LIVE
        assert await store.try_flip(["c1"]) == [False]  # LIVE already
        await store.disconnect("c1", 1)
        assert await store.try_flip(["c1"]) == [False]  # OFFLINE is not REPLAYING
        assert await store.try_flip([]) == []


async def test_replaying_follows_status(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.connect("c1", "pod-a")
        await store.connect("c2", "pod-a")
        assert await store.replaying() == []
        await store.divert([("c1", 3), ("c2", 3)])
        assert sorted(await store.replaying()) == ["c1", "c2"]
        assert await store.disconnect("c2", 1)  # REPLAYING -> OFFLINE
        assert await store.replaying() == ["c1"]
        assert (await store.connect("c2", "pod-b")).status is Status.REPLAYING
        assert sorted(await store.replaying()) == ["c1", "c2"]
        await store.ack([AckItem("c1", 3)])
        assert await store.try_flip(["c1", "c2"]) == [True, False]
        assert await store.replaying() == ["c2"]
        await store.ack([AckItem("c2", 3)])
        assert (await store.connect("c2", "pod-c")).status is Status.LIVE  # REPLAYING -> LIVE
        assert await store.replaying() == []
        records = {r.client_id: r.status for r in await store.all_clients()}
        assert records == {"c1": Status.LIVE, "c2": Status.LIVE}


async def test_big_ids_are_exact(store: StateStore) -> None:
    # Redis's Lua has doubles: ids up to 2**53 must survive exactly (no "1e+15" formatting).
    big = 2**53 - 10
    with trio.fail_after(TIMEOUT):
        await store.divert([("c1", big + 3)])
        await store.ack([AckItem("c1", big + 1)])
        await store.dlq_written([DlqWrite("c1", big + 2, 0, big)])
        await store.advance_cursor([("c1", big + 5)])
        assert await store.get("c1") == ClientRecord(
            "c1", routed_dlq=big + 3, acked=big + 1, dlq_written=big + 2, cursor=big + 5
        )
        assert await store.route([("c1", big + 1), ("c1", big + 9)]) == [
            RouteDecision(Route.DROP),
            RouteDecision(Route.DLQ),
        ]
        assert (await _rec(store, "c1")).routed_dlq == big + 9


async def test_any_client_id_and_pod_string(store: StateStore) -> None:
    # Ids and pods travel as JSON through Lua's cjson and back: quotes, separators, non-ASCII.
    cid, pod = 'ü/"c":1\\n\t', "pod:ß/\u2028x"
    with trio.fail_after(TIMEOUT):
        assert (await store.connect(cid, pod)).epoch == 1
        assert await store.route([(cid, 1), (cid, 0)]) == [
            RouteDecision(Route.LIVE, pod, 1),
            RouteDecision(Route.DROP),
        ]
        await store.divert([(cid, 2)])
        await store.ack([AckItem(cid, 2)])
        assert await store.try_flip([cid]) == [True]
        assert await store.get(cid) == ClientRecord(cid, Status.LIVE, pod, 1, acked=2, routed_dlq=2)
        assert [r.client_id for r in await store.all_clients()] == [cid]


# -- the transition table, every row on every engine -----------------------------------------


async def _put(store: StateStore, rec: ClientRecord) -> None:
    """Store `rec` as it is, whether or not the transitions could reach it."""
    if isinstance(store, MemoryState):
        store.records[rec.client_id] = rec
        return
    assert isinstance(store, RedisState)
    fields = {
        "status": str(rec.status),
        "pod": rec.pod,
        **{
            f: str(getattr(rec, f))
            for f in ("epoch", "acked", "routed_dlq", "dlq_written", "cursor")
        },
    }

    async def put(r: Any) -> None:
        await r.hset(store._key(rec.client_id), mapping=fields)
        await r.sadd(store._set_key("clients", rec.client_id), rec.client_id)
        if rec.status is Status.REPLAYING:
            await r.sadd(store._set_key("replaying", rec.client_id), rec.client_id)

    await _raw(store, put)


def _table_records() -> list[ClientRecord]:
    """Every status, with a backlog, caught up exactly (the flip's boundary), and nothing sent
    towards the DLQ; dlq_written and cursor are left alone by every transition of the table."""
    out = []
    for status in Status:
        pod = "" if status is Status.OFFLINE else "pod-old"
        for routed_dlq in (0, 5, 7):
            out.append(ClientRecord("", status, pod, epoch=2, acked=5, routed_dlq=routed_dlq))
    return out


# Each event with arguments on both sides of its guards' boundaries (relative to the record).
_TABLE_EVENTS: list[tuple[str, Callable[[ClientRecord], int]]] = [
    ("connect", lambda r: 0),
    *[("disconnect", lambda r, k=k: r.epoch + k) for k in (-1, 0, 1)],
    *[("route", lambda r, k=k: r.acked + k) for k in (-1, 0, 1, 3)],
    *[("divert", lambda r, k=k: r.acked + k) for k in (-1, 0, 1, 3)],
    ("try_flip", lambda r: 0),
    *[("ack", lambda r, k=k: r.routed_dlq + k) for k in (-1, 0, 1)],  # replies with flip_ready
]


async def _table_case(store: StateStore, rec: ClientRecord, kind: str, arg: int) -> tuple[Any, Any]:
    """(what the store replied, what the lifecycle function returns) for one event."""
    cid = rec.client_id
    if kind == "connect":
        return await store.connect(cid, "pod-new"), lifecycle.connect(rec, "pod-new")
    if kind == "disconnect":
        return await store.disconnect(cid, arg), lifecycle.disconnect(rec, arg)
    if kind == "route":
        return (await store.route([(cid, arg)]))[0], lifecycle.route(rec, arg)
    if kind == "divert":
        await store.divert([(cid, arg)])
        return None, (lifecycle.divert(rec, arg), None)
    if kind == "try_flip":
        return (await store.try_flip([cid]))[0], lifecycle.try_flip(rec)
    assert kind == "ack"
    new = lifecycle.ack(rec, arg)
    return (await store.ack([AckItem(cid, arg)]))[0], (new, lifecycle.flip_ready(new))


async def test_every_transition_of_the_table(store: StateStore) -> None:
    """Each event from each status, with its guards on both sides: the store (for Redis, the Lua
    the table is rendered into) gives the reply and the record the lifecycle function gives, and
    together the cases take every transition of lifecycle.TRANSITIONS and every "none"."""
    taken: set[tuple[Status, lifecycle.Event, lifecycle.Transition | None]] = set()
    replaying = set()
    with trio.fail_after(TIMEOUT):
        n = 0
        for template in _table_records():
            for kind, arg_of in _TABLE_EVENTS:
                n += 1
                rec = replace(template, client_id=f"t{n}")
                arg = arg_of(rec)
                await _put(store, rec)
                got, (expected_rec, expected) = await _table_case(store, rec, kind, arg)
                where = (rec, kind, arg)
                assert got == expected, where
                assert await store.get(rec.client_id) == expected_rec, where
                if expected_rec.status is Status.REPLAYING:
                    replaying.add(rec.client_id)
                if kind != "ack":
                    event = lifecycle.Event(kind)
                    taken.add((rec.status, event, lifecycle.transition(rec, event, arg)))
        assert sorted(await store.replaying()) == sorted(replaying)
    wanted = set()
    for (status, event), rows in lifecycle.TRANSITIONS.items():
        wanted |= {(status, event, t) for t in rows}
        if not rows or rows[-1].guard is not None:
            wanted.add((status, event, None))
    assert wanted - taken == set()


def test_the_scripts_are_rendered_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Lua has no status move of its own: a row changed in the table changes the script."""
    key = (Status.LIVE, lifecycle.Event.DIVERT)
    assert "if r.acked < x then return 'REPLAYING' end" in redis_scripts.DIVERT
    patched = {**lifecycle.TRANSITIONS, key: (lifecycle.Transition(None, Status.OFFLINE),)}
    monkeypatch.setattr(lifecycle, "TRANSITIONS", patched)
    lua = redis_scripts.lua_transitions(lifecycle.Event.DIVERT)
    assert "elseif r.status == 'LIVE' then\n    return 'OFFLINE'\n" in lua
    for source in redis_scripts.SCRIPTS.values():
        assert "status = '" not in source  # no status set by hand


# -- leases ------------------------------------------------------------------------------------


async def test_lease_is_exclusive_and_renewable(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.acquire_lease("replay-0", "pod-a", 10_000)
        assert not await store.acquire_lease("replay-0", "pod-b", 10_000)
        assert await store.acquire_lease("replay-0", "pod-a", 10_000)  # renew
        assert await store.acquire_lease("replay-1", "pod-b", 10_000)  # another lease
        await store.release_lease("replay-0", "pod-b")  # not the owner: nothing
        assert not await store.acquire_lease("replay-0", "pod-b", 10_000)
        await store.release_lease("replay-0", "pod-a")
        assert await store.acquire_lease("replay-0", "pod-b", 10_000)
        await store.release_lease("never-taken", "pod-a")


async def test_lease_expires(store: StateStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.acquire_lease("replay-0", "pod-a", 300)
        assert not await store.acquire_lease("replay-0", "pod-b", 300)
        await trio.sleep(0.2)
        assert await store.acquire_lease("replay-0", "pod-a", 300)  # renewal extends it
        await trio.sleep(0.2)
        assert not await store.acquire_lease("replay-0", "pod-b", 300)  # expired if not renewed
        await trio.sleep(0.4)
        assert await store.acquire_lease("replay-0", "pod-b", 300)


# -- pub/sub -----------------------------------------------------------------------------------


async def test_subscription_is_active_on_enter(store: StateStore, unique: str) -> None:
    ch = f"pod-{unique}"
    with trio.fail_after(TIMEOUT):
        await store.publish([(ch, b"before anyone listens")])
        async with store.subscribe(ch) as sub:
            await store.publish([(ch, b"hello"), (f"other-{unique}", b"not for us")])
            await store.publish([(ch, b"")])
            assert await anext(sub) == b"hello"
            assert await anext(sub) == b""
        await store.publish([])


async def test_publish_keeps_order_per_channel(store: StateStore, unique: str) -> None:
    channels = [f"a-{unique}", f"b-{unique}"]
    n = 3000
    expected = {ch: [f"{ch}:{i}".encode() for i in range(n)] for ch in channels}
    received: dict[str, list[bytes]] = {ch: [] for ch in channels}
    with trio.fail_after(TIMEOUT):
        async with store.subscribe(channels[0]) as sub_a, store.subscribe(channels[1]) as sub_b:
            async with trio.open_nursery() as nursery:

                async def collect(ch: str, sub: AsyncIterator[bytes]) -> None:
                    async for payload in sub:
                        received[ch].append(payload)
                        if len(received[ch]) == n:
                            return

                nursery.start_soon(collect, channels[0], sub_a)
                nursery.start_soon(collect, channels[1], sub_b)
                for start in range(0, n, 500):
                    batch = [
                        (ch, expected[ch][i]) for i in range(start, start + 500) for ch in channels
                    ]
                    await store.publish(batch)
    assert received == expected


async def test_every_subscriber_gets_the_message(store: StateStore, unique: str) -> None:
    ch = f"fan-{unique}"
    with trio.fail_after(TIMEOUT):
        async with store.subscribe(ch) as s1, store.subscribe(ch) as s2:
            await store.publish([(ch, b"x")])
            assert await anext(s1) == b"x"
            assert await anext(s2) == b"x"
        # A subscription that ended receives nothing more, and publishing to it is harmless.
        await store.publish([(ch, b"y")])


# -- Redis only --------------------------------------------------------------------------------


@pytest.mark.integration
async def test_redis_subscription_raises_when_connection_drops(
    redis_store: RedisState, unique: str
) -> None:
    ch = f"drop-{unique}"
    with trio.fail_after(TIMEOUT):
        async with redis_store.subscribe(ch) as sub:
            await redis_store.publish([(ch, b"before")])
            assert await anext(sub) == b"before"
            name = _client_name(redis_store.prefix)
            clients = await _raw(redis_store, lambda r: r.client_list(_type="pubsub"))
            ids = [c["id"] for c in clients if c["name"] == name]
            assert len(ids) == 1
            await _raw(redis_store, lambda r: r.client_kill_filter(_id=ids[0]))
            with pytest.raises(StateUnavailable, match="subscription"):
                await anext(sub)
        # The store itself is fine; a new subscription works.
        async with redis_store.subscribe(ch) as sub:
            await redis_store.publish([(ch, b"after")])
            assert await anext(sub) == b"after"


@pytest.mark.integration
async def test_redis_slow_subscriber_is_backpressured_not_dropped(
    redis_store: RedisState, unique: str
) -> None:
    # With a tiny trio-side buffer the reader waits for room (an awaited crossing) instead of
    # dropping: what Redis buffers in the meantime still arrives, in order.
    ch = f"slow-{unique}"
    redis_store.subscriber_buffer = 4
    n = 2000
    with trio.fail_after(TIMEOUT):
        async with redis_store.subscribe(ch) as sub:
            await redis_store.publish([(ch, b"%d" % i) for i in range(n)])
            received = []
            async for payload in sub:
                received.append(payload)
                if len(received) % 100 == 0:
                    await trio.sleep(0.001)
                if len(received) == n:
                    break
            assert received == [b"%d" % i for i in range(n)]
        # Leaving while the reader is blocked on a full buffer must not hang.
        async with redis_store.subscribe(ch) as sub:
            await redis_store.publish([(ch, b"x")] * 100)
            assert await anext(sub) == b"x"
            await trio.sleep(0.05)


@pytest.mark.integration
async def test_redis_reloads_scripts_after_script_flush(redis_store: RedisState) -> None:
    with trio.fail_after(TIMEOUT):
        await redis_store.connect("c1", "pod-a")
        await _raw(redis_store, lambda r: r.script_flush())  # as after a Redis restart
        assert await redis_store.connect("c1", "pod-b") == ConnectResult(2, Status.LIVE, "pod-a", 1)
        await _raw(redis_store, lambda r: r.script_flush())
        assert await redis_store.acquire_lease("l", "me", 1000)


@pytest.mark.integration
async def test_redis_keeps_the_documented_layout(redis_store: RedisState) -> None:
    p = redis_store.prefix
    with trio.fail_after(TIMEOUT):
        await redis_store.connect("c1", "pod-a")
        await redis_store.divert([("c1", 2)])
        fields = await _raw(redis_store, lambda r: r.hgetall(f"{p}c:c1"))
        assert fields == {
            b"status": b"REPLAYING",
            b"pod": b"pod-a",
            b"epoch": b"1",
            b"acked": b"0",
            b"routed_dlq": b"2",
            b"dlq_written": b"0",
            b"cursor": b"-1",
        }
        assert await _raw(redis_store, lambda r: r.smembers(f"{p}clients")) == {b"c1"}
        assert await _raw(redis_store, lambda r: r.smembers(f"{p}replaying")) == {b"c1"}


async def test_redis_unreachable_raises_state_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with trio.fail_after(TIMEOUT):
        async with trio_asyncio.open_loop():
            with pytest.raises(StateUnavailable, match=address):
                async with open_redis_state(address):
                    pass  # pragma: no cover


@pytest.mark.slow
async def test_redis_silent_server_times_out_in_about_5_s() -> None:
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # connections complete in the backlog; nobody ever answers
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with trio.fail_after(TIMEOUT):
            async with trio_asyncio.open_loop():
                start = trio.current_time()
                with pytest.raises(StateUnavailable, match=address):
                    async with open_redis_state(address):
                        pass  # pragma: no cover
                assert 4 < trio.current_time() - start < 8


# -- property: the store is the lifecycle fold -------------------------------------------------

CLIENTS = ["a", "b"]
_client = st.sampled_from(CLIENTS)
_n = st.integers(0, 8)
# A delivery id or offset: absolute (base + n), or relative to a field of the client's record
# when the operation starts (field + 0, -1 or +1), so that every comparison lifecycle.py makes
# (d <= acked, acked >= dlq_written, routed_dlq > acked, offset > cursor...) hits its boundary.
_FIELDS = ["acked", "routed_dlq", "dlq_written", "cursor"]
_value = st.tuples(st.sampled_from(["abs", *_FIELDS]), _n)
_items = st.lists(st.tuples(_client, _value), max_size=6)
_op = st.one_of(
    st.tuples(st.just("connect"), _client, st.sampled_from(["p1", "p2"])),
    st.tuples(st.just("disconnect"), _client, st.sampled_from([0, -1, 1])),  # epoch + this
    st.tuples(st.just("route"), _items),
    st.tuples(st.just("divert"), _items),
    st.tuples(st.just("dlq_written"), st.lists(st.tuples(_client, _value, _value), max_size=4)),
    st.tuples(st.just("ack"), _items),
    st.tuples(st.just("advance_cursor"), _items),
    st.tuples(st.just("try_flip"), st.lists(_client, max_size=4)),
    # ack(routed_dlq + 0/-1/+1) then try_flip: the flip's boundary, acked == routed_dlq.
    st.tuples(st.just("catch_up"), _client, _n),
)
_ops = st.lists(_op, min_size=20, max_size=80)
_base = st.sampled_from([0, 1000, 2**53 - 100])  # the last one checks Lua's number handling


class _Fold:
    """The reference: lifecycle functions folded over a dict, a missing record = new_record."""

    def __init__(self) -> None:
        self.records: dict[str, ClientRecord] = {}

    def apply(self, client_id: str, fn: Callable[[ClientRecord], tuple[ClientRecord, T]]) -> T:
        new, out = fn(self.records.get(client_id) or lifecycle.new_record(client_id))
        self.records[client_id] = new
        return out

    def update(self, client_id: str, fn: Callable[[ClientRecord], ClientRecord]) -> None:
        self.apply(client_id, lambda r: (fn(r), None))

    def value(self, client_id: str, value: tuple[str, int], base: int) -> int:
        ref, n = value
        if ref == "abs":
            return base + n
        rec = self.records.get(client_id) or lifecycle.new_record(client_id)
        return int(getattr(rec, ref)) + (0, -1, 1)[n % 3]


async def _run_against_fold(store: StateStore, ops: list[tuple[Any, ...]], base: int) -> None:
    model = _Fold()
    for op in ops:
        kind = op[0]
        # Values are resolved against the model before the operation, identically for both.
        if kind in ("route", "divert", "ack", "advance_cursor"):
            items = [(cid, model.value(cid, v, base)) for cid, v in op[1]]
        if kind == "connect":
            _, cid, pod = op
            expected: Any = model.apply(cid, partial(lifecycle.connect, pod=pod))
            got: Any = await store.connect(cid, pod)
        elif kind == "disconnect":
            _, cid, rel = op
            epoch = max(model.value(cid, ("epoch", 0), base) + rel, 0)
            expected = model.apply(cid, partial(lifecycle.disconnect, epoch=epoch))
            got = await store.disconnect(cid, epoch)
        elif kind == "route":
            expected = [model.apply(c, partial(lifecycle.route, delivery_id=d)) for c, d in items]
            got = await store.route(items)
        elif kind == "divert":
            for c, d in items:
                model.update(c, partial(lifecycle.divert, delivery_id=d))
            await store.divert(items)
            expected = got = None
        elif kind == "dlq_written":
            writes = [
                DlqWrite(cid, model.value(cid, d, base), 0, model.value(cid, off, base))
                for cid, d, off in op[1]
            ]
            for w in writes:
                model.update(
                    w.client_id,
                    partial(lifecycle.dlq_written, delivery_id=w.delivery_id, offset=w.offset),
                )
            await store.dlq_written(writes)
            expected = got = None
        elif kind == "ack":
            expected = []
            for c, a in items:
                model.update(c, partial(lifecycle.ack, acked=a))
                expected.append(lifecycle.flip_ready(model.records[c]))
            got = await store.ack([AckItem(c, a) for c, a in items])
        elif kind == "advance_cursor":
            for c, off in items:
                model.update(c, partial(lifecycle.advance_cursor, offset=off))
            await store.advance_cursor(items)
            expected = got = None
        elif kind == "catch_up":
            _, cid, n = op
            acked = model.value(cid, ("routed_dlq", n), base)
            model.update(cid, partial(lifecycle.ack, acked=acked))
            await store.ack([AckItem(cid, acked)])
            expected = model.apply(cid, lifecycle.try_flip)
            got = (await store.try_flip([cid]))[0]
        else:
            assert kind == "try_flip"
            expected = [model.apply(c, lifecycle.try_flip) for c in op[1]]
            got = await store.try_flip(op[1])
        assert got == expected, op
        assert {r.client_id: r for r in await store.all_clients()} == model.records, op
        replaying = {c for c, r in model.records.items() if r.status is Status.REPLAYING}
        assert sorted(await store.replaying()) == sorted(replaying), op
    for cid in CLIENTS:
        assert await store.get(cid) == model.records.get(cid)


def test_store_is_the_lifecycle_fold(engine: str) -> None:
    # A sync test (pytest-trio leaves it alone): each example is its own trio.run, and for Redis
    # its own event loop, connection and key prefix.
    # Fewer examples on the cluster: the scripts' bodies are the single node's (proved with 60),
    # and every step there also gathers the per-slot sets of 16384 slots twice.
    examples = 100 if engine == "memory" else 15 if engine.startswith("cluster:") else 60

    @settings(max_examples=examples, deadline=None)
    @given(ops=_ops, base=_base)
    def check(ops: list[tuple[Any, ...]], base: int) -> None:
        async def main() -> None:
            with trio.fail_after(TIMEOUT):
                prefix = f"nimbus-test:{uuid.uuid4().hex[:10]}:"
                async with _open_store(engine, prefix) as store:
                    await _run_against_fold(store, ops, base)

        trio.run(main)

    check()


# -- expiry (issue #14): records that outlive their client ----------------------------------


def _set_ttl(store: StateStore, seconds: float) -> None:
    if isinstance(store, MemoryState):
        store.record_ttl = seconds
    else:
        assert isinstance(store, RedisState)
        store.record_ttl_ms = int(seconds * 1000)


async def test_a_record_offline_with_nothing_pending_expires(store: StateStore) -> None:
    _set_ttl(store, 0.3)
    for cid in ("gone", "back", "owed"):
        await store.connect(cid, "pod")
        await store.disconnect(cid, 1)
    await store.route([("owed", 7)])  # a result for it went to the DLQ: it must stay
    await store.connect("back", "pod")  # back before the ttl: the record (and epoch) stay
    await trio.sleep(0.6)
    assert await store.get("gone") is None
    assert (await _rec(store, "back")).epoch == 2
    owed = await _rec(store, "owed")
    assert owed.routed_dlq == 7 and owed.status is Status.OFFLINE
    assert {r.client_id for r in await store.all_clients()} == {"back", "owed"}
    # A client whose record expired starts again as a new one.
    res = await store.connect("gone", "pod")
    assert res.epoch == 1 and res.status is Status.LIVE


async def test_no_ttl_keeps_records(store: StateStore) -> None:
    _set_ttl(store, 0)
    await store.connect("kept", "pod")
    await store.disconnect("kept", 1)
    await trio.sleep(0.2)
    assert (await _rec(store, "kept")).status is Status.OFFLINE


@pytest.mark.integration
async def test_redis_lane_pipelines_concurrent_calls_and_survives_a_cut(
    redis_store: RedisState, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script calls of many trio tasks share one connection: calls made while a batch is out
    go together in the next batch (fewer writes than calls), each gets its own reply in order.
    A cut connection fails only what it carried (StateUnavailable); the next call reconnects."""
    from nimbus.engines import redis as redis_engine

    batches: list[int] = []
    lane = redis_store._lane
    assert lane is not None
    carry = lane._carry

    async def counting(batch: list[Any]) -> None:
        batches.append(len(batch))
        await carry(batch)

    monkeypatch.setattr(lane, "_carry", counting)
    n = 200
    with trio.fail_after(TIMEOUT):
        results: dict[int, ConnectResult] = {}
        async with trio.open_nursery() as nursery:
            for i in range(n):

                async def one(i: int = i) -> None:
                    results[i] = await redis_store.connect(f"lane-{unique}-{i}", f"pod-{i}")

                nursery.start_soon(one)
        assert sorted(results) == list(range(n))
        assert all(r.epoch == 1 and r.status is Status.LIVE for r in results.values()), results
        assert sum(batches) == n and len(batches) < n / 4, batches
        # Each client's record names its own pod: replies went to their callers.
        recs = await redis_store.get_many([f"lane-{unique}-{i}" for i in range(n)])
        assert [r.pod if r else None for r in recs] == [f"pod-{i}" for i in range(n)]

        name = redis_engine._client_name(redis_store.prefix)
        clients = await _raw(redis_store, lambda r: r.client_list(_type="normal"))
        mine = [c["id"] for c in clients if c["name"] == name and c["cmd"] != "client|list"]
        for cid in mine:  # every connection of this store but the one asking
            await _raw(redis_store, lambda r, cid=cid: r.client_kill_filter(_id=cid))
        # The lane learns of the cut on its next write or read: at most one call fails with it.
        failures = 0
        for i in range(3):
            try:
                await redis_store.connect(f"lane-{unique}-after-{i}", "pod-z")
            except StateUnavailable:
                failures += 1
        assert failures <= 1
        assert await redis_store.connect(f"lane-{unique}-final", "pod-z") == ConnectResult(
            1, Status.LIVE, "", 0
        )


# -- Redis Cluster only ------------------------------------------------------------------------


@pytest.fixture
async def cluster_store(
    redis_cluster_address: str, unique: str
) -> AsyncIterator[RedisClusterState]:
    async with _open_store(f"cluster:{redis_cluster_address}", f"nimbus-test:{unique}:") as state:
        assert isinstance(state, RedisClusterState)
        yield state


@pytest.mark.integration
async def test_cluster_batch_spans_every_master_in_order(cluster_store: RedisClusterState) -> None:
    """A batch over clients of every master: split per master, answered in the batch's order,
    and each client's keys (record, per-slot sets) in its own slot."""
    with trio.fail_after(TIMEOUT):
        s = cluster_store
        ids = [f"client-{i}" for i in range(300)]
        masters = {s._masters[s._slot_of(c)] for c in ids}
        assert len(masters) >= 3, masters
        for i, c in enumerate(ids):
            await s.connect(c, f"pod-{i % 3}")
        await s.disconnect(ids[0], 1)  # OFFLINE: its results go to the DLQ
        decisions = await s.route([(c, 5) for c in ids])
        assert decisions[0] == RouteDecision(Route.DLQ)
        assert decisions[1:] == [
            RouteDecision(Route.LIVE, f"pod-{i % 3}", 1) for i in range(1, 300)
        ]
        await s.divert([(c, 6) for c in ids[1:50]])
        assert await s.replaying() == sorted(ids[1:50])
        assert [r.client_id for r in await s.all_clients()] == sorted(ids)
        flags = await s.ack([AckItem(c, 6) for c in ids[1:50]])
        assert flags == [True] * 49
        assert await s.try_flip(ids[1:50]) == [True] * 49
        assert await s.replaying() == []
        for c in ids[:5]:  # the layout: the record and its sets share the client's slot
            slot = s._slot_of(c)
            assert s._key(c) == f"{s.prefix}c:{{{c}}}"
            assert s._cluster.keyslot(s._set_key("clients", c)) == slot
            assert await _raw(s, lambda r, c=c: r.sismember(s._set_key("clients", c), c)) == 1


@pytest.mark.integration
async def test_cluster_stale_slot_map_is_refreshed(cluster_store: RedisClusterState) -> None:
    """A batch sent to a master that does not serve the slot (a stale map, as after a failover or
    a resharding) fails there before it changed anything, and is sent again on a fresh map."""
    with trio.fail_after(TIMEOUT):
        s = cluster_store
        await s.connect("moved", "pod-a")
        slot = s._slot_of("moved")
        right = s._masters[slot]
        wrong = next(a for a in s._masters if a is not None and a != right)
        s._masters[slot] = wrong  # what a map read before the slot moved would say
        assert await s.route([("moved", 3)]) == [RouteDecision(Route.LIVE, "pod-a", 1)]
        assert s._masters[slot] == right
        assert (await _rec(s, "moved")).epoch == 1


@pytest.mark.integration
async def test_cluster_write_not_confirmed_by_replicas_fails(
    redis_cluster_address: str, unique: str
) -> None:
    """NIMBUS_REDIS_WAIT_REPLICAS: a write that fewer replicas confirmed than asked for is
    refused (StateUnavailable, naming WAIT); each master here has one replica, so 2 cannot be."""
    with trio.fail_after(TIMEOUT):
        async with (
            trio_asyncio.open_loop(),
            open_redis_cluster_state(
                redis_cluster_address, prefix=f"nimbus-test:{unique}:", wait_replicas=2, wait_ms=50
            ) as s,
        ):
            try:
                with pytest.raises(StateUnavailable, match="WAIT: 1 of 2 replica"):
                    await s.connect("c1", "pod")
                # It ran on the master (outcome unknown to the caller), once: not retried here,
                # which would have applied it twice (epoch 2).
                rec = await s.get("c1")
                assert rec is not None and rec.epoch == 1
            finally:
                await _purge(s)


@pytest.mark.integration
async def test_cluster_concurrent_first_calls_share_one_lane_per_master(
    cluster_store: RedisClusterState,
) -> None:
    """Many tasks calling a fresh store at once (a pod right after start): one lane per master,
    every call answered (two lanes for one master once left calls waiting on a dropped one)."""
    with trio.fail_after(TIMEOUT):
        s = cluster_store
        ids = [f"burst-{i}" for i in range(200)]
        async with trio.open_nursery() as nursery:
            for c in ids:
                nursery.start_soon(s.connect, c, "pod")
        assert len(s._lanes) == len({a for a in s._masters if a is not None})
        # A lane dropped while its asyncio task is pending is destroyed with the task pending,
        # which trio-asyncio raises in the loop (it stopped a pod).
        gc.collect()
        await trio.sleep(0.1)
        assert [r.client_id for r in await s.get_many(ids) if r is not None] == ids


def test_slot_tags_hash_to_their_slots() -> None:
    """The per-slot sets' tags: one per slot, each hashing (as a hash tag) to its own slot."""
    from redis.crc import key_slot

    from nimbus.engines.redis_cluster import SLOTS, slot_tags

    tags = slot_tags()
    assert len(tags) == SLOTS == 16384 and len(set(tags)) == SLOTS
    assert all(key_slot(f"nimbus:replaying{{{t}}}".encode()) == s for s, t in enumerate(tags))
    assert all("{" not in t and "}" not in t for t in tags)
