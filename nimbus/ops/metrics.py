"""Prometheus metrics of a Nimbus process (prometheus-client).

One registry per process (`REGISTRY`); in-process test clusters share it, so tests compare
counter values before and after rather than absolute values. Helpers here are the only way the
rest of the code touches metrics, so adapters stay one line. Nothing here does I/O per message:

- `nimbus_ops_total{op}`: every `nimbus.ops.stats.Counters` increment of every role (bridged in
  `stats.py`): events ingested by pods, computed, results routed live / to the DLQ, diverted,
  delivered, replayed, flips... The per-stage rates are `rate()` of these.
- `nimbus_io_seconds{op,topic}` / `nimbus_io_records_total{op,topic}`: every engine call (one
  batch: a produce, a route script, a publish...), timed, and the records it carried; errors by
  kind in `nimbus_errors_total{kind}`. Made by wrapping the engine's log and state store
  (`instrument`).
- `nimbus_delivery_latency_seconds{path}`: from an event's arrival at a pod to its result being
  queued on the client's stream (path `live` or `replay`), from the trace's timestamps.
- `nimbus_kafka_lag{group,topic,partition}`, `nimbus_kafka_end_offset`, `nimbus_clients{state}`,
  replay backlog: sampled every NIMBUS_METRICS_INTERVAL_MS by `Sampler` (a few calls per period).
- Gauges read at scrape time from live objects registered with `watch` (pods, replay services,
  routers): streams, queued results, replays in progress and their drain.

`serve_metrics` exposes the registry over HTTP (`GET /metrics`) on NIMBUS_METRICS_PORT.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
from loguru import logger
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nimbus.ops import httpd
from nimbus.ports import ClientRecords

T = TypeVar("T")

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: half the exposition, and nothing reads them

REGISTRY = CollectorRegistry()

BAD_INPUT = Counter(
    "nimbus_bad_input_total",
    "Malformed input seen, logged and skipped, by where it was seen and why it was refused",
    ["where", "reason"],
    registry=REGISTRY,
)

ERRORS = Counter(
    "nimbus_errors_total",
    "Errors by kind",
    ["kind"],
    registry=REGISTRY,
)


class _PlainCounters(Collector):
    """A labelled counter whose increments are plain dict updates, read at scrape time.

    prometheus-client's children take a lock per increment (~1 µs); these are counted once per
    event or result on the hot paths. Only for values updated from the process's trio thread
    (no other thread counts them)."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.values: dict[str, float] = {}

    def inc(self, key: str, n: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + n

    def get(self, key: str) -> float:
        return self.values.get(key, 0)

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, v in list(self.values.items()):
            family.add_metric([key], v)
        yield family


OPS = _PlainCounters(
    "nimbus_ops",
    "What the roles did, by operation (the names of nimbus.ops.stats.Counters, e.g. pod.events, "
    "events.processed, router.live, router.dlq, router.diverted, replay.delivered, status.flips)",
    "op",
)
REGISTRY.register(OPS)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

IO_SECONDS = Histogram(
    "nimbus_io_seconds",
    "Duration of each engine call (one batch), by operation and topic (state-store calls: topic '')",
    ["op", "topic"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)

IO_RECORDS = Counter(
    "nimbus_io_records_total",
    "Records or items carried by engine calls, by operation and topic",
    ["op", "topic"],
    registry=REGISTRY,
)


class _PlainHistogram(Collector):
    """A labelled histogram observed with a bisect and two list updates (no locks), read at
    scrape time: prometheus-client's Histogram.observe costs ~3 µs (a lock per bucket touched),
    and a pod observes every result it delivers. Trio thread only, like `_PlainCounters`."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = list(buckets)
        self.series: dict[str, list[float]] = {}  # value -> [per-bucket counts..., +Inf count, sum]

    def child(self, key: str) -> list[float]:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.bounds) + 2)
        return series

    def observe(self, series: list[float], v: float) -> None:
        series[bisect.bisect_left(self.bounds, v)] += 1  # le: a value equal to a bound counts in it
        series[-1] += v

    def collect(self) -> Iterator[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, series in list(self.series.items()):
            cumulative, acc = [], 0.0
            for bound, n in zip(
                [*map(floatToGoString, self.bounds), "+Inf"], series[:-1], strict=True
            ):
                acc += n
                cumulative.append((bound, acc))
            family.add_metric([key], cumulative, series[-1])
        yield family


DELIVERY = _PlainHistogram(
    "nimbus_delivery_latency_seconds",
    "From an event's arrival at a pod to its result queued on the client's stream, by path "
    "(live: routed to the pod; replay: from the DLQ after a reconnect, so it includes time away)",
    "path",
    (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
REGISTRY.register(DELIVERY)

_DELIVERY_LIVE = DELIVERY.child("live")
_DELIVERY_REPLAY = DELIVERY.child("replay")

KAFKA_LAG = Gauge(
    "nimbus_kafka_lag",
    "Records not yet consumed by a consumer group of this process: end offset minus the group's "
    "position (the furthest of its committed offset and what this process polled)",
    ["group", "topic", "partition"],
    registry=REGISTRY,
)

KAFKA_END = Gauge(
    "nimbus_kafka_end_offset",
    "End offset (high watermark) of each partition of the topics this process consumes",
    ["topic", "partition"],
    registry=REGISTRY,
)

CLIENTS = Gauge(
    "nimbus_clients",
    "Clients by state (sampled from the state store by processes running the status role)",
    ["state"],
    registry=REGISTRY,
)

# Counters names that are errors too (errors by kind).
_ERROR_OPS = {
    "pod.produce_failed": "produce_failed",
    "pod.slow_client": "slow_client_cut",
    "pod.bad_message": "bad_pod_message",
    "pod.unknown_event": "unknown_event",
    "events.malformed": "malformed_event_record",
    "events.failed": "event_failed",
    "router.malformed": "malformed_result_record",
    "router.bad_report": "bad_delivery_report",
    "router.failed": "live_delivery_failed",
    "server.rate_limited": "over_event_rate",
    "server.message_too_large": "message_too_large",
    "server.refused_request": "refused_request",
}


def op(name: str, n: int = 1) -> None:
    """Count `n` of operation `name` (called by nimbus.ops.stats.Counters.inc)."""
    OPS.inc(name, n)
    kind = _ERROR_OPS.get(name)
    if kind is None and name.startswith("server.refused."):
        kind = "refused_" + name.removeprefix("server.refused.")  # auth, max streams...
    if kind is not None:
        ERRORS.labels(kind=kind).inc(n)


def bad_input(where: str, reason: str) -> None:
    """Count one malformed input (a gRPC message, metadata value or topic record)."""
    BAD_INPUT.labels(where=where, reason=reason).inc()


def error(kind: str) -> None:
    ERRORS.labels(kind=kind).inc()


def value(counter: Counter, **labels: str) -> float:
    """The current value of one labelled counter (for tests and summaries)."""
    return float(counter.labels(**labels)._value.get())


def sample(name: str, **labels: str) -> float:
    """The current value of any sample of the registry (0 if it has none yet), e.g.
    sample("nimbus_ops_total", op="pod.events"), sample("nimbus_streams", pod=...)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def delivered(log: Any) -> None:
    """A result is being queued on its client's stream: observe its delivery latency from the
    trace (`log`: the response's LogEntry as the pod received it; its first step is the pod's
    ingest, its last says whether the router or the replay sent it)."""
    steps = log.steps
    if len(steps) < 2:
        return
    first = steps[0].timestamp
    t0 = first.seconds + first.nanos / 1e9
    if t0 <= 0:
        return
    child = _DELIVERY_REPLAY if steps[len(steps) - 1].method_name == "replay" else _DELIVERY_LIVE
    DELIVERY.observe(child, max(0.0, time.time() - t0))


# -- gauges read from live objects at scrape time -------------------------------------------------

_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(obj: Any) -> None:
    """Register a live Pod, ReplayService or ResultRouter: its gauges are read at scrape time."""
    _watched.add(obj)


def watched_obj(obj: T) -> T:
    """`watch(obj)`, returning obj (for one-line use where the object is made)."""
    watch(obj)
    return obj


def watched(kind: str) -> list[Any]:
    return [o for o in list(_watched) if type(o).__name__ == kind]


class _LiveCollector(Collector):
    def collect(self) -> Iterator[Any]:
        streams = GaugeMetricFamily(
            "nimbus_streams", "Client streams open on a pod", labels=["pod"]
        )
        queued = GaugeMetricFamily(
            "nimbus_stream_queued",
            "Results and receipts waiting in a pod's outgoing stream queues",
            labels=["pod"],
        )
        ingest = GaugeMetricFamily(
            "nimbus_ingest_queued", "Events waiting to be produced by a pod", labels=["pod"]
        )
        by_pod: dict[str, list[int]] = {}
        for pod in watched("Pod"):
            if not pod.accepting and not pod.sessions:
                continue  # stopped (and not yet collected)
            v = by_pod.setdefault(pod.channel, [0, 0, 0])
            v[0] += len(pod.sessions)
            v[1] += sum(s.outbox.qsize() for s in list(pod.sessions.values()))
            v[2] += pod._ingest_send.statistics().current_buffer_used
        for channel, (n_streams, n_queued, n_ingest) in by_pod.items():
            streams.add_metric([channel], n_streams)
            queued.add_metric([channel], n_queued)
            ingest.add_metric([channel], n_ingest)
        yield streams
        yield queued
        yield ingest

        in_flight = GaugeMetricFamily(
            "nimbus_router_in_flight",
            "Results in a result router's window, undecided or unconfirmed",
        )
        in_flight.add_metric([], sum(r.window.pending for r in watched("ResultRouter")))
        yield in_flight

        services = watched("ReplayService")
        active = [p for svc in services for p in list(svc.active.values())]
        replays = GaugeMetricFamily("nimbus_replays_active", "Replays in progress in this process")
        replays.add_metric([], len(active))
        yield replays
        unconfirmed = GaugeMetricFamily(
            "nimbus_replay_unconfirmed", "Replayed results published and not yet confirmed"
        )
        unconfirmed.add_metric([], sum(p.in_flight for p in active))
        yield unconfirmed
        backlog = GaugeMetricFamily(
            "nimbus_replay_backlog_records",
            "DLQ records ahead of the replays in progress (from each client's cursor to its partition's "
            "end offset, sampled; an upper bound, as clients share partitions)",
        )
        total = 0
        for svc in services:
            ends: dict[int, int] = getattr(svc, "_nimbus_dlq_ends", {})
            for p in list(svc.active.values()):
                end = ends.get(p.partition)
                if end is not None and p.cursor >= 0:
                    total += max(0, end - p.cursor)
        backlog.add_metric([], total)
        yield backlog
        drained = CounterMetricFamily(
            "nimbus_replay_drained",
            "Replayed results confirmed by clients (finished replays plus those in progress); "
            "its rate is the replay drain rate",
        )
        done = OPS.get("replay.delivered")
        drained.add_metric([], done + sum(p.delivered for p in active))
        yield drained


REGISTRY.register(_LiveCollector())


# -- the engine's ports, instrumented -------------------------------------------------------------


def _observe(op_name: str, topic: str, t0: float, n: int) -> None:
    IO_SECONDS.labels(op=op_name, topic=topic).observe(time.perf_counter() - t0)
    if n:
        IO_RECORDS.labels(op=op_name, topic=topic).inc(n)


def _failed(op_name: str, e: BaseException) -> None:
    ERRORS.labels(kind=f"{op_name}:{type(e).__name__}").inc()


class _Proxy:
    """Forwards everything to the wrapped object (attribute reads and writes)."""

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __repr__(self) -> str:
        return repr(self._target)


class _Producer(_Proxy):
    async def send_batch(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> Any:
        t0 = time.perf_counter()
        try:
            out = await self._target.send_batch(topic, items)
        except Exception as e:  # not Cancelled: a cancelled call is no error
            _failed("produce", e)
            raise
        _observe("produce", topic, t0, len(items))
        return out


class _Consumer(_Proxy):
    def __init__(
        self, target: Any, topic: str, group: str, positions: dict[tuple[str, str, int], int]
    ) -> None:
        super().__init__(target)
        object.__setattr__(self, "_topic", topic)
        object.__setattr__(self, "_group", group)
        object.__setattr__(self, "_positions", positions)

    async def poll(self, max_records: int, timeout: float) -> Any:
        try:
            result = await self._target.poll(max_records, timeout)
        except Exception as e:  # not Cancelled: a cancelled call is no error
            _failed("poll", e)
            raise
        if result.records:
            IO_RECORDS.labels(op="poll", topic=self._topic).inc(len(result.records))
            pos = self._positions
            g = self._group
            for rec in result.records:
                pos[(g, rec.topic, rec.partition)] = rec.offset + 1
        return result

    async def commit(self, offsets: Any) -> None:
        t0 = time.perf_counter()
        try:
            await self._target.commit(offsets)
        except Exception as e:  # not Cancelled: a cancelled call is no error
            _failed("commit", e)
            raise
        _observe("commit", self._topic, t0, 0)


class _Reader(_Proxy):
    async def fetch(
        self, topic: str, partition: int, offset: int, max_records: int, timeout: float
    ) -> Any:
        try:
            records = await self._target.fetch(topic, partition, offset, max_records, timeout)
        except Exception as e:  # not Cancelled: a cancelled call is no error
            _failed("fetch", e)
            raise
        if records:
            IO_RECORDS.labels(op="fetch", topic=topic).inc(len(records))
        return records


class InstrumentedLog(_Proxy):
    def __init__(self, target: Any) -> None:
        super().__init__(target)
        object.__setattr__(self, "producer", _Producer(target.producer))
        # (group, topic) of the consumers opened here, and their positions as polled.
        object.__setattr__(self, "groups", set())
        object.__setattr__(self, "positions", {})

    @asynccontextmanager
    async def consumer(self, topic: str, group: str, **kw: Any) -> AsyncIterator[Any]:
        self.groups.add((group, topic))
        async with self._target.consumer(topic, group, **kw) as c:
            yield _Consumer(c, topic, group, self.positions)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Any]:
        async with self._target.reader() as r:
            yield _Reader(r)


# The state store's calls that are timed, by port: the transitions of ClientRecords and the
# publishes of PubSub, the calls on the hot paths (op "state.<name>"). Reads, scans, leases and
# subscriptions go through the proxy untimed.
_TIMED_CLIENT_RECORDS_OPS = (
    "connect",
    "disconnect",
    "route",
    "divert",
    "dlq_written",
    "ack",
    "advance_cursor",
    "try_flip",
)
_TIMED_PUBSUB_OPS = ("publish",)
_TIMED_STATE_OPS = frozenset(_TIMED_CLIENT_RECORDS_OPS + _TIMED_PUBSUB_OPS)


def _timed_state(target: Any, name: str) -> Callable[..., Any]:
    fn = getattr(target, name)
    op_name = f"state.{name}"

    async def call(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            out = await fn(*args, **kw)
        except Exception as e:  # not Cancelled: a cancelled call is no error
            _failed(op_name, e)
            raise
        n = len(args[0]) if args and isinstance(args[0], list | tuple) else 1
        _observe(op_name, "", t0, n)
        return out

    return call


class InstrumentedState(_Proxy):
    """A state store (all three ports of `nimbus.ports.StateStore`) with its hot calls timed."""

    def __getattr__(self, name: str) -> Any:
        if name in _TIMED_STATE_OPS:
            return _timed_state(self._target, name)
        return getattr(self._target, name)


def instrument(log: Any, state: Any) -> tuple[Any, Any]:
    """The engine's log and state store, wrapped so that their calls are timed and counted (the
    wrappers forward every other attribute, test hooks included)."""
    return InstrumentedLog(log), InstrumentedState(state)


# -- periodic sampling ----------------------------------------------------------------------------


class Sampler:
    """Every `interval` seconds: Kafka lag of this process's consumer groups, end offsets, the DLQ
    ends behind the replays in progress, and (with `clients`) clients by state. A few calls per
    period, whatever the traffic."""

    def __init__(
        self,
        log: Any,
        state: ClientRecords,
        interval: float,
        *,
        clients: bool = False,
        dlq_topic: str = "",
    ) -> None:
        self.log = log
        self.state = state
        self.interval = interval
        self.clients = clients
        self.dlq_topic = dlq_topic

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as e:  # an engine error, or anything else: metrics never kill a role
                logger.debug("metrics sampler: {}", e)
            await trio.sleep(self.interval)

    async def sample(self) -> None:
        log = self.log
        groups = sorted(getattr(log, "groups", ()))
        positions: dict[tuple[str, str, int], int] = getattr(log, "positions", {})
        ends_by_topic: dict[str, dict[int, int]] = {}
        for group, topic in groups:
            ends = ends_by_topic.get(topic)
            if ends is None:
                ends = ends_by_topic[topic] = await log.end_offsets(topic)
            committed = await log.committed(group, topic)
            for p, end in ends.items():
                pos = max(committed.get(p, 0), positions.get((group, topic, p), 0))
                KAFKA_LAG.labels(group=group, topic=topic, partition=str(p)).set(max(0, end - pos))
        for topic, ends in ends_by_topic.items():
            for p, end in ends.items():
                KAFKA_END.labels(topic=topic, partition=str(p)).set(end)
        if self.dlq_topic:
            services = [s for s in watched("ReplayService") if s.active]
            if services:
                ends = await log.end_offsets(self.dlq_topic)
                for svc in services:
                    svc._nimbus_dlq_ends = ends
        if self.clients:
            counts = {"OFFLINE": 0, "REPLAYING": 0, "LIVE": 0}
            for rec in await self.state.all_clients():
                counts[rec.status.value] = counts.get(rec.status.value, 0) + 1
            for st, n in counts.items():
                CLIENTS.labels(state=st).set(n)


# -- the HTTP endpoint ----------------------------------------------------------------------------


def exposition() -> bytes:
    return generate_latest(REGISTRY)


async def _handle(req: httpd.Request) -> httpd.Response:
    if req.path in ("/metrics", "/"):
        return httpd.Response(200, CONTENT_TYPE_LATEST, exposition())
    if req.path == "/healthz":
        return httpd.Response(200, "text/plain", b"ok\n")
    return httpd.Response(404, "text/plain", b"not found\n")


async def serve_metrics(
    host: str,
    port: int,
    *,
    allowed_hosts: str | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`GET /metrics` (Prometheus text format) until cancelled; reports the bound port.
    `allowed_hosts`: Host names admitted besides the bind address and loopback (default:
    NIMBUS_HTTP_ALLOWED_HOSTS)."""
    if allowed_hosts is None:
        from nimbus import config

        allowed_hosts = config.load().http_allowed_hosts
    await httpd.serve(
        host, port, _handle, "metrics", allowed_hosts=allowed_hosts, task_status=task_status
    )
