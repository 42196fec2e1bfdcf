"""The benchmark's pure parts (scripts/bench.py, scripts/load_client.py): parsing Kafka's perf
tools, summarising py-spy stacks, per-stage latency from traces; and the client's lazy trace."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from nimbus import messages as wire
from nimbus.client import Result
from nimbus.proto_gen.nimbus import ErrorCode, EventError, LogEntry

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench")
load_client = _load("load_client")


def test_parse_producer_performance() -> None:
    out = (
        "49901 records sent, 9980.2 records/sec (1.14 MB/sec), 20.1 ms avg latency, 300.0 ms max latency.\n"
        "100000 records sent, 19984.012790 records/sec (2.29 MB/sec), 12.45 ms avg latency, 310.00 ms max"
        " latency, 4 ms 50th, 40 ms 95th, 200 ms 99th, 300 ms 99.9th.\n"
    )
    got = bench.parse_perf(out, consume=False)
    assert got == {"rate": pytest.approx(19984.01279), "mb_per_s": 2.29, "avg_latency_ms": 12.45}


def test_parse_consumer_performance() -> None:
    out = (
        "start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec,"
        " rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec\n"
        "2026-11-26 22:00:00:000, 2026-11-26 22:00:02:000, 11.4, 5.7, 100000, 50000.0, 300, 1700, 6.7, 58823.5\n"
    )
    assert bench.parse_perf(out, consume=True) == {"rate": 50000.0, "mb_per_s": 5.7}


def test_parse_perf_without_summary_fails() -> None:
    with pytest.raises(RuntimeError):
        bench.parse_perf("ERROR could not connect\n", consume=False)
    with pytest.raises(RuntimeError):
        bench.parse_perf("", consume=True)


def test_summarize_profile(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "main (a.py:1);f (a.py:2);g (a.py:3) 6\nmain (a.py:1);f (a.py:2) 3\nmain (a.py:1);h (b.py:9) 1\n"
    )
    p = bench.summarize_profile(raw)
    assert p["samples"] == 10
    assert p["self"][0] == ("g (a.py:3)", 60.0)
    assert dict(p["self"]) == {"g (a.py:3)": 60.0, "f (a.py:2)": 30.0, "h (b.py:9)": 10.0}
    assert dict(p["total"])["main (a.py:1)"] == 100.0
    assert dict(p["total"])["f (a.py:2)"] == 90.0


def test_stages_from_trace() -> None:
    """Result.trace() reads the wire trace (no betterproto decode); the load client turns it
    into time per stage, plus the time inside Nimbus (pod in -> pod out)."""
    run = load_client.ClientRun(client_id="c", events=1)
    log = wire.LogEntry()
    for service, method, ns in (
        ("server", "ProcessEvent", 100_010_000_000),
        ("event-consumer", "compute", 100_030_000_000),
        ("server", "deliver", 100_032_500_000),
    ):
        st = log.steps.add(service_name=service, method_name=method)
        st.timestamp.seconds, st.timestamp.nanos = divmod(ns, 1_000_000_000)
    r = Result(5, "sq", 3, 9, None, None, 2, _log_wire=log)
    steps = r.trace()
    assert [n for n, _ in steps] == ["server/ProcessEvent", "event-consumer/compute", "server/deliver"]
    assert r.trace() == [(n, t) for n, t in Result(5, "sq", 3, 9, None, r.log, 2).trace()]  # both forms
    load_client.record_stages(run, steps, sent=100.0, received=100.035)
    s = load_client.stage_summary([run])
    assert list(s) == [
        "client send -> server/ProcessEvent",
        "server/ProcessEvent -> event-consumer/compute",
        "event-consumer/compute -> server/deliver",
        "server/deliver -> client receive",
        load_client.INSIDE,
    ]
    assert s["server/ProcessEvent -> event-consumer/compute"]["p50"] == pytest.approx(20.0, abs=0.01)
    assert s[load_client.INSIDE]["p50"] == pytest.approx(22.5, abs=0.01)
    assert s["server/deliver -> client receive"]["n"] == 1


def test_result_decodes_its_trace_lazily_and_stays_immutable() -> None:
    log = wire.LogEntry()
    log.steps.add(service_name="server", instance_id="p", method_name="deliver")
    r = Result(5, "sq", 3, 9, None, None, 2, _log_wire=log)
    assert isinstance(r.log, LogEntry) and r.log.steps[0].service_name == "server"
    assert r.log is r.log  # decoded once
    assert r == Result(5, "sq", 3, 9, None, r.log, 2) and r.ok
    with pytest.raises(AttributeError):
        r.number = 4  # type: ignore[misc]
    bad = Result(1, "sq", 50000, 0, EventError(code=ErrorCode.OUT_OF_RANGE, message="x"))
    assert not bad.ok and bad.log is None and bad != r
