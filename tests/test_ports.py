"""The state store's ports: `StateStore` is exactly ClientRecords + Leases + PubSub, and every
state engine provides each port with methods of its own (a method left to the protocol's stub
would return None instead of failing). No I/O here."""

from __future__ import annotations

import inspect

import pytest

from nimbus.engines.memory import MemoryState
from nimbus.engines.redis import RedisState
from nimbus.engines.redis_pubsub import RedisPubSub
from nimbus.ops import metrics
from nimbus.ports import ClientRecords, Leases, PubSub, StateStore

PORTS = (ClientRecords, Leases, PubSub)


def _methods(port: type) -> set[str]:
    """The public methods a port declares itself."""
    return {n for n, v in vars(port).items() if callable(v) and not n.startswith("_")}


def _all_methods(port: type) -> set[str]:
    """The public methods of a port and the ports it extends."""
    return {n for n, v in inspect.getmembers(port, callable) if not n.startswith("_")}


def test_state_store_is_the_three_ports_without_overlap() -> None:
    records, leases, pubsub = (_methods(p) for p in PORTS)
    assert not records & leases and not records & pubsub and not leases & pubsub
    assert _methods(StateStore) == set()  # nothing of its own
    assert _all_methods(StateStore) == records | leases | pubsub
    assert leases == {"acquire_lease", "release_lease"}
    assert pubsub == {"publish", "subscribe"}
    assert {"route", "ack", "get_many", "all_clients"} <= records


@pytest.mark.parametrize("engine", [MemoryState, RedisState])
@pytest.mark.parametrize("port", PORTS)
def test_engine_implements_every_method_of_the_port(engine: type, port: type) -> None:
    assert port in engine.__mro__
    for name in _methods(port):
        impl = getattr(engine, name)
        assert impl is not getattr(port, name), f"{engine.__name__}.{name} is the port's stub"
        assert list(inspect.signature(impl).parameters) == list(
            inspect.signature(getattr(port, name)).parameters
        ), f"{engine.__name__}.{name}"


def test_redis_pubsub_implements_the_pubsub_port() -> None:
    for name in _methods(PubSub):
        assert getattr(RedisPubSub, name) is not getattr(PubSub, name), name


def test_timed_state_calls_are_port_methods() -> None:
    """The instrumented store times calls by name: every name must be a method of its port."""
    assert set(metrics._TIMED_CLIENT_RECORDS_OPS) <= _methods(ClientRecords)
    assert set(metrics._TIMED_PUBSUB_OPS) <= _methods(PubSub)
