"""The benchmark's pure parts (scripts/bench.py, scripts/load_client.py): parsing Kafka's perf
tools, summarising py-spy stacks, per-stage latency from traces; and the client's lazy trace.
Also the Nimbus processes the scripts start (scripts/procs.py), with a stand-in module in their
place: start and readiness, stop, kill and restart, supervision, death with the script."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from nimbus.client import Result
from nimbus.proto_gen.nimbus import ErrorCode, EventError, LogEntry
from nimbus.wire import messages as wire

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
    assert [n for n, _ in steps] == [
        "server/ProcessEvent",
        "event-consumer/compute",
        "server/deliver",
    ]
    assert r.trace() == [
        (n, t) for n, t in Result(5, "sq", 3, 9, None, r.log, 2).trace()
    ]  # both forms
    load_client.record_stages(run, steps, sent=100.0, received=100.035)
    s = load_client.stage_summary([run])
    assert list(s) == [
        "client send -> server/ProcessEvent",
        "server/ProcessEvent -> event-consumer/compute",
        "event-consumer/compute -> server/deliver",
        "server/deliver -> client receive",
        load_client.INSIDE,
    ]
    assert s["server/ProcessEvent -> event-consumer/compute"]["p50"] == pytest.approx(
        20.0, abs=0.01
    )
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


# --- the replay chain (scripts/bench_limits.py replay-chain) against Nimbus's one-client replay ---

CHAIN = {
    "probe": "replay-chain", "count": 100_000, "seconds": 4.0, "rate": 25_000.0, "cpu_s": 1.0,
    "cpu_us_per_msg": 10.0, "worker_cpu_s": 2.5, "pod_cpu_s": 1.5, "all_cpu_us_per_msg": 50.0,
    "cpu_us_per_result": {"worker": 25.0, "pod": 15.0, "client": 10.0, "kafka": 3.0, "redis": 2.0},
    "window": 2000, "ack_every": 100, "record_bytes": 276,
}  # fmt: skip
ONE = {
    "received": 100_000, "seconds": 10.0, "results_per_s": 10_000.0, "all_cpu_us_per_result": 150.0,
    "nimbus_cpu_s": {"pod0": 0.0, "pod1": 4.0, "worker0": 6.0, "status": 0.1},
    "broker_utilisation": {"kafka": 0.05, "redis": 0.03},
}  # fmt: skip


def test_replay_cpu_by_role() -> None:
    got = bench.replay_cpu_by_role(ONE)
    # pods summed, workers summed; brokers from utilisation x seconds; the client is the rest
    assert got == {
        "pod": 40.0,
        "worker": 60.0,
        "status": 1.0,
        "kafka": 5.0,
        "redis": 3.0,
        "client": 41.0,
    }
    assert bench.replay_cpu_by_role({"received": 0}) == {}


def test_replay_limit_uses_the_chain_for_one_client_only() -> None:
    lim = {"kafka_perf_consume": {"rate": 200_000.0}, "replay_chain": CHAIN}
    text, rate = bench.replay_limit("one", lim)
    assert (
        rate == 25_000.0
        and text.startswith("25,000 (replay chain")
        and "Kafka consume 200,000" in text
    )
    assert bench.ratio(ONE["results_per_s"], rate) == "40%"
    assert bench.replay_limit("one_window_x5", lim)[1] == 25_000.0
    assert bench.replay_limit("many", lim) == ("200,000 (Kafka consume)", 200_000.0)
    # an older JSON (no chain) or a failed chain: Kafka consume as before
    assert bench.replay_limit("one", {"kafka_perf_consume": {"rate": 200_000.0}})[1] == 200_000.0
    failed = {"replay_chain": {"rate": 0.0, "error": "RuntimeError: x"}}
    assert bench.replay_limit("one", failed) == ("-", None)


def test_chain_limits_row() -> None:
    assert bench.chain_limits_row(None) == "| replay_chain | - | - | not measured in this run |"
    assert "failed: RuntimeError: boom" in bench.chain_limits_row(
        {"rate": 0.0, "error": "RuntimeError: boom"}
    )
    row = bench.chain_limits_row(CHAIN)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["replay_chain", "25,000"]
    assert cells[2].startswith("50 (worker 25 / pod 15 / client 10; brokers kafka 3 / redis 2)")
    assert (
        "window 2,000" in cells[3]
        and "acks every 100" in cells[3]
        and "no Nimbus logic" in cells[3]
    )


def test_chain_comparison_follows_the_numbers() -> None:
    assert bench.chain_comparison(ONE, None, 2) == []
    assert bench.chain_comparison(ONE, {"rate": 0.0, "error": "x"}, 2) == []
    text, reach = bench.chain_comparison(ONE, CHAIN, 2)
    assert "**25,000 results/s**" in text and "50 µs of CPU per result in its processes" in text
    assert "the brokers' 5 more" in text
    # Nimbus: 150 µs for the whole machine, 142 without its brokers (8), vs the chain's 50
    assert (
        "40% of the chain's rate" in text
        and "142 in its processes and the client: 2.8x the chain's 50" in text
    )
    assert (
        "worker 60 vs 25 (2.4x)" in text
        and "pod 40 vs 15 (2.7x)" in text
        and "client 41 vs 10 (4.1x)" in text
    )
    assert "adds 92 µs per result, the most in the worker (+35)" in text
    assert (
        reach.startswith("- So 20,000 results/s is within the stack's reach")
        and "not within" not in reach
    )
    assert "what keeps Nimbus below it" in reach
    assert (
        "at most 40,000 results/s" in reach and "36,364 with the brokers" in reach
    )  # 2 CPUs / 50, / 55 µs
    assert "bound by waiting" not in reach
    # below the target although its CPU would allow it: bound by waiting, with the worker's waits
    slow = {
        **CHAIN, "rate": 19_999.0, "seconds": 5.0, "loadavg_start": [3.5, 2.0, 1.0],
        "worker": {"publish_wait_s": 3.0, "window_wait_s": 0.5, "fetch_wait_s": 0.25},
    }  # fmt: skip
    text, reach = bench.chain_comparison(ONE, slow, 2)
    assert "(load average 3.5 at its start)" in text
    assert reach.startswith("- So in this run 20,000 results/s was not within the stack's reach")
    assert "only 19,999/s" in reach and "what keeps Nimbus" not in reach
    assert (
        "bound by waiting, not by its own CPU" in reach
        and "waited 3.0 s for PUBLISH replies" in reach
    )
    # below the target and its CPU would not allow more: no waiting claim
    costly = {**slow, "all_cpu_us_per_msg": 120.0}
    reach = bench.chain_comparison(ONE, costly, 2)[1]
    assert "not within" in reach and "at most 16,667 results/s" in reach and "waiting" not in reach
    # Nimbus cheaper per result than the chain (packs and runs): said so, no negative "adds"
    cheap = {**ONE, "all_cpu_us_per_result": 40.0, "cpu_us_per_result": 20.0}
    text = bench.chain_comparison(cheap, CHAIN, 2)[0]
    assert "adds" not in text and "less than the chain" in text and "not its bound" in text
    # without a Nimbus replay in the run: the chain alone
    text, reach = bench.chain_comparison(None, CHAIN, 2)
    assert "Nimbus's 1-client replay" not in text and "within the stack's reach" in reach


# --- the latency floor's probe (scripts/bench_limits.py kafka-path), on the real broker ---------


@pytest.mark.integration
def test_kafka_path_probe_relays_every_record_and_times_both_hops(
    kafka_brokers: str, unique: str
) -> None:
    import json
    import subprocess

    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_limits.py"),
            "kafka-path",
            "--brokers",
            kafka_brokers,
            "--topic",
            f"path-{unique}",
            "--partitions",
            "2",
            "--count",
            "300",
            "--rate",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["probe"] == "kafka-path"
    assert got["sent"] == got["count"] == 300  # the sink saw every record the producer sent
    assert set(got["cpu_s_by_process"]) == {"producer", "relay", "sink"}
    assert all(v > 0 for v in got["cpu_s_by_process"].values())
    for name in ("latency_ms", "hop1_ms", "hop2_ms"):
        q = got[name]
        assert 0 < q["p50"] <= q["p99"] <= q["p999"] <= q["max"] < 60_000, (name, q)
    # End to end is the two hops together, record by record; so its median lies between the
    # larger hop's median and the sum of the two hops' maxima.
    assert max(got["hop1_ms"]["p50"], got["hop2_ms"]["p50"]) <= got["latency_ms"]["p50"]
    assert got["latency_ms"]["max"] <= got["hop1_ms"]["max"] + got["hop2_ms"]["max"] + 1e-6


# --- the realtime phase's pure parts (scripts/bench_realtime.py) ---------------------------------


def _realtime() -> ModuleType:
    sys.path.insert(0, str(ROOT / "scripts"))  # it imports bench and fleet as siblings
    return _load("bench_realtime")


def test_realtime_verdicts_follow_the_issue_targets() -> None:
    rt = _realtime()
    ok200 = {"results": 10, "latency_ms": {"p50": 4.9, "p99": 9.9}}
    assert rt.met("one_200", ok200) is True
    assert rt.met("one_200", {**ok200, "latency_ms": {"p50": 4.9, "p99": 10.1}}) is False
    r1000 = {"results": 10, "latency_ms": {"p99": 19}, "nimbus_cpu_us_per_event": 199}
    assert rt.met("c50_1000", r1000) is True
    assert rt.met("c50_1000", {**r1000, "nimbus_cpu_us_per_event": 201}) is False
    assert rt.met("unpaced", {"results": 10, "rate_achieved": 11_999}) is False
    assert rt.met("unpaced", {"results": 10, "rate_achieved": 12_000}) is True
    assert rt.met("c50_3000", {"results": 0}) is None  # no figure, no verdict
    # The reconnect: from the new stream's open to the backlog's last result, and nothing lost.
    rc = {
        "results": 10,
        "lost": 0,
        "reconnect": {"reconnect_first_ms": {"p99": 60.0}, "backlog_last_ms": {"p99": 39.0}},
    }
    assert rt.met("reconnect_1000", rc) is True
    rc["reconnect"]["backlog_last_ms"]["p99"] = 41.0
    assert rt.met("reconnect_1000", rc) is False
    rc["reconnect"]["backlog_last_ms"]["p99"] = 1.0
    assert rt.met("reconnect_1000", {**rc, "lost": 1}) is False


def test_realtime_duplicates_and_diverts(tmp_path: Path) -> None:
    rt = _realtime()
    assert rt.dups({"app_duplicates": 5, "resend_duplicates": 5}) == "0 (5 resend)"
    assert rt.dups({"app_duplicates": 7, "resend_duplicates": 5}) == "2 (5 resend)"
    assert rt.dups({"app_duplicates": 0}) == "0"
    log = tmp_path / "worker0.log"
    log.write_bytes(
        b"12:00:00 INFO result router: diverted 3 failed live deliveries to the DLQ\n"
        b"12:00:01 INFO something else\n"
    )
    start = log.stat().st_size
    with log.open("ab") as f:
        f.write(b"12:00:02 INFO result router: diverted 21 failed live deliveries to the DLQ\n")
        f.write(b"12:00:03 INFO result router: diverted 18 failed live deliveries to the DLQ\n")
    assert rt.diverts_in(log) == 42
    assert rt.diverts_in(log, start) == 39  # only what a run added


def test_realtime_render_shows_both_adapters_the_floors_and_the_verdicts() -> None:
    rt = _realtime()
    run = {
        "results": 1000,
        "rate_achieved": 999.0,
        "latency_ms": {"p50": 50.0, "p99": 300.0, "p999": 400.0},
        "nimbus_cpu_us_per_event": 1200.0,
        "nimbus_cpu_us_per_event_net_of_idle": 1150.0,
        "nimbus_utilisation": {"pod0": 0.3, "pod1": 0.3, "worker0": 0.6},
        "broker_utilisation": {"kafka": 0.5, "redis": 0.05},
        "loadgen_utilisation": 0.09,
        "cpu_us_per_event": 90.0,
        "lost": 0,
        "app_duplicates": 0,
        "out_of_order": 0,
        "diverts": 0,
    }
    path = {
        "count": 1000,
        "cpu_s_by_process": {"producer": 0.15, "relay": 0.27, "sink": 0.21},
        "latency_ms": {"p50": 1.4, "p99": 19.8, "p999": 35.5},
    }
    res = {
        "seconds": 20,
        "loadgen": ".local/go-bin/nimbus-loadgen",
        "grpc_pod": {"c50_1000": {"rate_achieved": 1000, "latency_ms": {"p50": 0.6, "p99": 1.9},
                                  "server_cpu_us_per_event": 430.0, "server_utilisation": 0.43}},
        "adapters": {
            name: {"linger_ms": 0, "runs": {"c50_1000": run}, "kafka_path_1000": path}
            for name in ("kafka-python", "librdkafka")
        },
    }  # fmt: skip
    text = "\n".join(rt.render(res))
    assert text.count("| c50_1000 | ") == 3  # one row per adapter, one in the gRPC floor table
    assert "| c50_1000 | kafka-python | 999 | 50.0 / 300.0 / 400.0 |" in text
    assert "**not met**" in text
    assert "430 µs/event" in text and "= 910 µs/event" in text  # 430 + (270 + 210) µs
    assert "1.84 of the machine's 2 CPUs" in text  # 1.2 Nimbus + 0.55 brokers + 0.09 load
    assert "Latency by stage" not in text  # no run with stages_ms: no table


def test_realtime_render_tables_the_stages_per_adapter() -> None:
    """The loadgen's stages_ms (a list in pipeline order) of each run: a table per adapter that
    has them, a row per stage in the order first seen, a p50 / p99 column per scenario."""
    rt = _realtime()

    def st(stage: str, n: int, p50: float, p99: float) -> dict[str, object]:
        return {"stage": stage, "n": n, "p50": p50, "p99": p99}

    live = [
        st("client send -> server/ProcessEvent", 100, 0.4, 3.2),
        st("server/ProcessEvent -> event-consumer/compute", 100, 2.5, 12.0),
        st("event-consumer/compute -> result-router/route", 100, 1.25, 8.0),
        st("result-router/route -> server/deliver", 100, 0.1, 1.0),
        st("server/deliver -> client receive", 100, 0.12, 0.9),
        st("(inside Nimbus) server/ProcessEvent -> server/deliver", 100, 4.0, 20.0),
    ]
    replay = [
        st("client send -> server/ProcessEvent", 40, 0.5, 4.0),
        st("event-consumer/compute -> replay/replay", 3, 30.0, 45.0),
    ]
    res = {
        "adapters": {
            "kafka-python": {
                "runs": {
                    "c50_1000": {"results": 1000, "stages_ms": live},
                    "reconnect_1000": {"results": 400, "stages_ms": replay},
                    "one_200": {"results": 10},  # an older loadgen's JSON: no column
                }
            },
            "librdkafka": {"runs": {"c50_1000": {"results": 1000, "stages_ms": []}}},
        }
    }
    lines = rt.stage_tables(res["adapters"])
    text = "\n".join(lines)
    assert text.count("### Latency by stage (sampled traces)") == 1
    assert "kafka-python:" in text and "librdkafka:" not in text  # no stages: no table
    assert "| stage | c50_1000 (n 100) | reconnect_1000 (n 40) |" in text
    rows = [line for line in lines if line.startswith("| ") and " -> " in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [x["stage"] for x in live] + [
        "event-consumer/compute -> replay/replay"
    ]
    assert "| server/ProcessEvent -> event-consumer/compute | 2.50 / 12.00 | - |" in text
    assert "| client send -> server/ProcessEvent | 0.40 / 3.20 | 0.50 / 4.00 |" in text
    assert "| event-consumer/compute -> replay/replay | - | 30.00 / 45.00 |" in text
    # within render, after the main table
    full = {**res, "seconds": 20, "loadgen": "x"}
    out = rt.render(full)
    assert out.index("### Latency by stage (sampled traces)") > out.index(
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    # load_client.py's form ({stage: {n, p50, p99}}) reads the same
    as_dict = {x["stage"]: {k: v for k, v in x.items() if k != "stage"} for x in live}
    runs = {"kafka-python": {"runs": {"c50_1000": {"stages_ms": as_dict}}}}
    assert "| result-router/route -> server/deliver | 0.10 / 1.00 |" in "\n".join(
        rt.stage_tables(runs)
    )


# --- the scripts' Nimbus processes (scripts/procs.py: bench.py, fleet.py, chaos.py) --------------

procs = _load("procs")

# Stands in for `python -m nimbus.server`: says it is up after FAKE_DELAY s, then lives (or, with
# FAKE_EXIT, exits with that code at once, or FAKE_AFTER s after it is up).
FAKE = """\
import os, sys, time
if os.environ.get("FAKE_EXIT") and not os.environ.get("FAKE_AFTER"):
    sys.exit(int(os.environ["FAKE_EXIT"]))
time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
print("fake is up", flush=True)
if os.environ.get("FAKE_AFTER"):
    time.sleep(float(os.environ["FAKE_AFTER"]))
    sys.exit(int(os.environ["FAKE_EXIT"]))
time.sleep(600)
"""


def _fake_env(tmp_path: Path, **env: str) -> dict[str, str]:
    (tmp_path / "fakeproc.py").write_text(FAKE)
    return {**os.environ, "PYTHONPATH": str(tmp_path), **env}


def _fake(tmp_path: Path, name: str, kind: str = "pod", **env: str) -> Any:
    full = _fake_env(tmp_path, **env)
    return procs.Proc(name, kind, "fakeproc", full, tmp_path / f"{name}.log", "fake is up")


class Heard(procs.Fleet):  # type: ignore[misc,name-defined]
    """A Fleet that notes what `supervise` tells it: (what, process, starts, trio time, detail)."""

    def __init__(self, members: list[Any]) -> None:
        super().__init__(members)
        self.events: list[tuple[str, str, int, float, Any]] = []

    def _note(self, what: str, p: Any, detail: Any = None) -> None:
        self.events.append((what, p.name, p.starts, trio.current_time(), detail))

    def on_start(self, p: Any) -> None:
        self._note("start", p)

    def on_exit(self, p: Any, rc: int, uptime: float, was_ready: bool) -> None:
        self._note("exit", p, (rc, was_ready))

    def on_ready(self, p: Any) -> None:
        self._note("ready", p)

    def of(self, name: str, what: str) -> list[tuple[str, str, int, float, Any]]:
        return [e for e in self.events if e[1] == name and e[0] == what]


async def test_fleet_start_waits_for_the_marker_then_stop_terminates(tmp_path: Path) -> None:
    slow = _fake(tmp_path, "pod0", FAKE_DELAY="0.5")
    fleet = procs.Fleet([slow, _fake(tmp_path, "worker0", kind="worker")])
    with trio.fail_after(20):
        t0 = trio.current_time()
        await fleet.start()
        assert trio.current_time() - t0 >= 0.5
    assert all(p.ready and p.alive for p in fleet.procs)
    assert [p.name for p in fleet.pods] == ["pod0"]
    assert [p.name for p in fleet.workers] == ["worker0"]
    assert set(fleet.cpu()) == {"pod0", "worker0"}
    fleet.stop()
    assert [p.popen.returncode for p in fleet.procs] == [-signal.SIGTERM] * 2
    assert "=====" not in slow.log.read_text()  # no banner unless asked


async def test_fleet_start_fails_when_a_process_exits(tmp_path: Path) -> None:
    fleet = procs.Fleet([_fake(tmp_path, "pod0", FAKE_EXIT="3")])
    with trio.fail_after(20), pytest.raises(RuntimeError, match="pod0 exited at start"):
        await fleet.start()


async def test_supervise_restarts_a_kill_after_its_delay_and_a_crash_with_backoff(
    tmp_path: Path,
) -> None:
    victim = _fake(tmp_path, "pod0", FAKE_DELAY="0.5")
    victim.log_banner = "test"
    crasher = _fake(tmp_path, "worker0", kind="worker", FAKE_EXIT="4", FAKE_AFTER="0.2")
    fleet = Heard([victim, crasher])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.supervise)
            await procs.wait_until(lambda: victim.ready, 0.05)
            t_kill = trio.current_time()
            fleet.kill(victim, restart_after=1.0)
            await procs.wait_until(
                lambda: victim.starts == 2 and victim.ready and crasher.starts >= 3, 0.05
            )
            nursery.cancel_scope.cancel()
        await fleet.stop_all(grace=5)
    assert not any(p.alive for p in fleet.procs)
    # The kill was ours: no exit reported, started again after its delay, then up again.
    assert victim.kills == 1 and not fleet.of("pod0", "exit")
    assert [e[2] for e in fleet.of("pod0", "start")] == [1, 2]
    assert fleet.of("pod0", "start")[1][3] - t_kill >= 1.0
    # Up again only once the new process says so: the first one's line does not count.
    ready = fleet.of("pod0", "ready")[-1]
    assert ready[2] == 2 and ready[3] - fleet.of("pod0", "start")[1][3] >= 0.5
    log = victim.log.read_text()
    assert "===== test: start #1 at " in log and "===== test: start #2 at " in log
    assert log.count("fake is up") == 2
    # Up for 0.2 s, then exit 4: a crash each time, started again 0.5 s, then 1 s after it.
    exits, starts = fleet.of("worker0", "exit"), fleet.of("worker0", "start")
    assert [e[4] for e in exits[:2]] == [(4, True), (4, True)]
    assert starts[1][3] - exits[0][3] >= 0.5 and starts[2][3] - exits[1][3] >= 1.0


async def test_a_process_that_exits_before_it_is_up_did_not_start(tmp_path: Path) -> None:
    fleet = Heard([_fake(tmp_path, "pod0", FAKE_EXIT="3")])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet.supervise)
            await procs.wait_until(lambda: len(fleet.of("pod0", "exit")) >= 2, 0.05)
            nursery.cancel_scope.cancel()
        await fleet.stop_all(grace=5)
    assert [e[4] for e in fleet.of("pod0", "exit")][:2] == [(3, False), (3, False)]
    assert fleet.procs[0].streak >= 2


PARENT = """\
import sys
from pathlib import Path
import trio
sys.path.insert(0, {scripts!r})
import procs
async def main():
    p = procs.Proc("pod0", "pod", "fakeproc", {env!r}, Path({log!r}), "fake is up",
                   die_with_parent={die})
    await procs.Fleet([p]).start()
    print(p.pid, flush=True)
    await trio.sleep(600)
trio.run(main)
"""


@pytest.mark.parametrize("die", [True, False])
def test_die_with_parent_takes_the_process_down_with_a_killed_script(
    tmp_path: Path, die: bool
) -> None:
    env = _fake_env(tmp_path)
    code = PARENT.format(
        scripts=str(ROOT / "scripts"), env=env, log=str(tmp_path / "pod0.log"), die=die
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()  # SIGKILL: no cleanup of its own runs
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert _running(child) is not die
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may stay one where nothing reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_cluster_section_sets_the_clustered_run_beside_the_single_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(rate: float, p99: float, cpu: float) -> dict[str, Any]:
        return {
            "rate_achieved": rate,
            "latency_ms": {"p50": 5.0, "p99": p99},
            "nimbus_cpu_us_per_event": cpu,
            "lost": 0,
        }

    def realtime(r: dict[str, Any], p99: float) -> dict[str, Any]:
        return {
            "adapters": {
                "librdkafka": {
                    "runs": {"c50_1000": r},
                    "kafka_path_1000": {"latency_ms": {"p50": 1.0, "p99": p99}},
                }
            }
        }

    single = {"realtime": realtime(run(999, 20.0, 1200), 9.7)}
    clustered = {"started": "2026-12-06 20:00", "realtime": realtime(run(998, 45.0, 1500), 31.5)}
    monkeypatch.setattr(bench, "CLUSTER_JSON", tmp_path / "none.json")
    assert bench._cluster_lines(single) == []  # no clustered run: no section
    (tmp_path / "cl.json").write_text(json.dumps(clustered))
    monkeypatch.setattr(bench, "CLUSTER_JSON", tmp_path / "cl.json")
    text = "\n".join(bench._cluster_lines(single))
    assert (
        "| librdkafka | c50_1000 | 999/s, 5.0 / 20.0 ms, 1,200 µs, lost 0"
        " | 998/s, 5.0 / 45.0 ms, 1,500 µs, lost 0 |" in text
    )
    assert "p50 1.0 / p99 9.7 ms | p50 1.0 / p99 31.5 ms |" in text
    assert "2026-12-06 20:00" in text and "How each role scales out" in text
