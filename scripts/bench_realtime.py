"""The bench's `realtime` phase: paced latency and CPU per event with each Kafka adapter, measured
with a compiled load generator (loadgen/, Go: nimbus-loadgen) so the load side is not the bound.

For each adapter (NIMBUS_KAFKA_CLIENT=kafka-python, librdkafka) a fresh fleet (2 pods, a worker
process with the events/results/replay roles and a status-manager process; 8 partitions; own
topics) takes, after a warm-up:

    one_200         1 client at 200 events/s
    c50_1000        50 clients at 1,000 events/s in all
    c50_3000        50 clients at 3,000 events/s
    unpaced         50 clients, each with up to 100 events unanswered (the maximum rate)
    reconnect_1000  20 clients at 1,000 events/s; halfway, each cuts its stream and reconnects to
                    the other pod: its backlog comes by replay, then it is live again

Latency is end to end, from the event's scheduled send time to its result at the client (open
loop: a late sender shows as latency). CPU is read from /proc for every process: the Nimbus
processes, the load generator, Kafka and redis-server. "Nimbus CPU per event" is the pods' and
workers' CPU over the run divided by the results delivered.

Limits measured beside it, per adapter: Nimbus's two Kafka hops with that client library and no
Nimbus logic (scripts/bench_limits.py kafka-path: producer -> relay -> sink, a process each,
paced at 1,000/s, linger as Nimbus's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import bench
import trio
from fleet import BenchFleet, fleet_args, make_fleet
from shared import free_port

ROOT = bench.ROOT
ADAPTERS = ("kafka-python", "librdkafka")
# label -> (clients, events/s in all (0: unpaced), reconnect halfway)
SCENARIOS: dict[str, tuple[int, int, bool]] = {
    "one_200": (1, 200, False),
    "c50_1000": (50, 1000, False),
    "c50_3000": (50, 3000, False),
    "unpaced": (50, 0, False),
    "reconnect_1000": (20, 1000, True),
}
TARGETS = {
    "one_200": "p50 ≤ 5 ms, p99 ≤ 10 ms",
    "c50_1000": "p99 ≤ 20 ms; Nimbus CPU ≤ 200 µs/event",
    "c50_3000": "p99 ≤ 30 ms; Nimbus CPU ≤ 150 µs/event",
    "unpaced": "≥ 12,000 events/s",
    "reconnect_1000": "reconnect -> the backlog's last result ≤ 100 ms (p99); 0 lost",
}


def loadgen_binary() -> Path:
    """Builds loadgen/ (once, or when its sources changed) with scripts/gotools.sh."""
    out = subprocess.run(
        ["bash", "scripts/gotools.sh", "nimbus-loadgen"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"building nimbus-loadgen failed: {out.stderr.strip()[-500:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def reconnect_p99(r: dict[str, Any]) -> float | None:
    """From the new stream's open to the backlog's last result, p99 over the clients (bounded
    above by the sum of the two p99s the load generator reports: open -> first result, first ->
    the backlog's last)."""
    rc = r.get("reconnect") or {}
    first = (rc.get("reconnect_first_ms") or {}).get("p99")
    last = (rc.get("backlog_last_ms") or {}).get("p99")
    return None if first is None or last is None else first + last


_DIVERTED = re.compile(rb"diverted (\d+) failed live deliveries")


def diverts_in(log: Path, start: int = 0) -> int:
    """Live deliveries the result routers diverted to the DLQ, from a worker log's lines after
    byte `start` (a divert without a fault costs a replay's latency: 0 expected unless a run cuts
    streams)."""
    with log.open("rb") as f:
        f.seek(start)
        return sum(int(m.group(1)) for m in _DIVERTED.finditer(f.read()))


def met(label: str, r: dict[str, Any]) -> bool | None:
    """Whether a scenario's run meets its target (None: no figure)."""
    lat = r.get("latency_ms") or {}
    cpu = r.get("nimbus_cpu_us_per_event")
    if not r.get("results"):
        return None
    if label == "one_200":
        return lat.get("p50", 1e9) <= 5 and lat.get("p99", 1e9) <= 10
    if label == "c50_1000":
        return lat.get("p99", 1e9) <= 20 and cpu is not None and cpu <= 200
    if label == "c50_3000":
        return lat.get("p99", 1e9) <= 30 and cpu is not None and cpu <= 150
    if label == "unpaced":
        return (r.get("rate_achieved") or 0) >= 12000
    if label == "reconnect_1000":
        total = reconnect_p99(r)
        return total is not None and total <= 100 and r.get("lost", 1) == 0
    return None


async def run_scenario(
    binary: Path,
    fleet: BenchFleet,
    run_dir: Path,
    label: str,
    clients: int,
    rate: int,
    seconds: float,
    reconnect: bool,
    prefix: str,
) -> dict[str, Any]:
    out = run_dir / f"loadgen-{label}.json"
    cmd = [
        str(binary),
        "--targets", ",".join(fleet.targets),
        "--clients", str(clients),
        "--rate", str(rate),
        "--duration", f"{seconds:g}",
        "--warmup", "1",
        "--prefix", f"{prefix}-{label}",
        "--timeout", "60",
        "--json", str(out),
    ]  # fmt: skip
    if reconnect:
        cmd += ["--reconnect-at", f"{seconds / 2:g}"]
    idle = dict(fleet.idle_util)
    log_marks = {p.name: p.log.stat().st_size for p in fleet.workers if p.log.exists()}
    before, brokers0, t0 = fleet.cpu(), bench.broker_cpu(), time.monotonic()
    with trio.fail_after(seconds + 180):
        proc = await trio.run_process(
            cmd, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    wall = time.monotonic() - t0
    nimbus = bench.cpu_delta(before, fleet.cpu())
    brokers = bench.cpu_delta(brokers0, bench.broker_cpu())
    r: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results = r.get("results") or 0
    total = sum(nimbus.values())
    r.update(
        {
            "label": label,
            "clients": clients,
            "target_rate": rate,
            "rc": proc.returncode,
            "wall_s": round(wall, 2),
            "nimbus_cpu_s": nimbus,
            "nimbus_utilisation": {k: round(v / wall, 3) for k, v in nimbus.items()},
            "broker_cpu_s": brokers,
            "broker_utilisation": {k: round(v / wall, 3) for k, v in brokers.items()},
            "nimbus_cpu_us_per_event": round(total / results * 1e6, 1) if results else None,
            "nimbus_cpu_us_per_event_net_of_idle": round(
                max(0.0, total - sum(idle.values()) * wall) / results * 1e6, 1
            )
            if results
            else None,
            "loadgen_utilisation": round((r.get("cpu_s") or 0) / wall, 3),
            "loadavg": bench.loadavg(),
        }
    )
    r["diverts"] = sum(
        diverts_in(p.log, log_marks.get(p.name, 0)) for p in fleet.workers if p.log.exists()
    )
    r["met"] = met(label, r)
    if proc.returncode != 0:
        r["stderr_tail"] = proc.stderr.decode(errors="replace")[-1500:]
    return r


async def kafka_path_limit(
    args: argparse.Namespace, kafka: str, adapter: str, linger_ms: int, rate: int, count: int
) -> dict[str, Any]:
    cmd = [
        bench.PY, "scripts/bench_limits.py", "kafka-path", "--brokers", kafka,
        "--topic", f"{args.prefix}-rtpath-{adapter}", "--count", str(count),
        "--rate", str(rate), "--linger-ms", str(linger_ms), "--client", adapter,
        "--partitions", str(args.partitions),
        "--replication", "3" if args.cluster else "1",
    ]  # fmt: skip
    try:
        return await bench.run_json(cmd, 300)
    except (RuntimeError, trio.TooSlowError, ValueError) as e:
        return {"error": str(e)[:500]}


async def grpc_floor(binary: Path, run_dir: Path, seconds: float) -> dict[str, Any]:
    """The gRPC side of a pod alone (bench_limits.py grpc-pod: grpclib under trio-asyncio, a
    RECEIPT and a RESULT sent at once for each event, no Kafka, no Redis) under the same
    load-generator runs but the reconnect: the server's CPU per event and the latency."""
    port = free_port()
    log = (run_dir / "grpc-pod.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 (starts it and returns, as procs.Proc does)
        [bench.PY, "scripts/bench_limits.py", "grpc-pod", "--port", str(port)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    out: dict[str, Any] = {}
    try:
        with trio.fail_after(60):
            while b"ready" not in (run_dir / "grpc-pod.log").read_bytes():
                if proc.poll() is not None:
                    raise RuntimeError(f"grpc-pod exited: see {run_dir / 'grpc-pod.log'}")
                await trio.sleep(0.1)
        for label, (clients, rate, reconnect) in SCENARIOS.items():
            if reconnect:
                continue
            js = run_dir / f"grpc-pod-{label}.json"
            c0, t0 = bench.proc_cpu(proc.pid), time.monotonic()
            cmd = [
                str(binary), "--quiet", "--targets", f"{bench.HOST}:{port}",
                "--clients", str(clients), "--rate", str(rate), "--duration", f"{seconds:g}",
                "--warmup", "1", "--json", str(js),
            ]  # fmt: skip
            with trio.fail_after(seconds + 120):
                await trio.run_process(cmd, cwd=ROOT, capture_stdout=True, capture_stderr=True)
            cpu, wall = bench.proc_cpu(proc.pid) - c0, time.monotonic() - t0
            r = json.loads(js.read_text())
            n = r.get("results") or 0
            out[label] = {
                "rate_achieved": r.get("rate_achieved"),
                "latency_ms": r.get("latency_ms"),
                "server_cpu_us_per_event": round(cpu / n * 1e6, 1) if n else None,
                "server_utilisation": round(cpu / wall, 3),
                "loadgen_cpu_us_per_event": r.get("cpu_us_per_event"),
                "ok": r.get("ok"),
            }
    except (RuntimeError, OSError, ValueError, trio.TooSlowError) as e:
        out["error"] = str(e)[:500]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return out


def linger_for(adapter: str) -> int:
    from nimbus.variables import DEFAULT_LINGER_MS

    env = os.environ.get("NIMBUS_PRODUCER_LINGER_MS", "").strip()
    return int(env) if env else DEFAULT_LINGER_MS[adapter]


async def realtime(
    args: argparse.Namespace, kafka: str, redis: str, run_dir: Path
) -> dict[str, Any]:
    binary = loadgen_binary()
    seconds = args.rt_seconds
    res: dict[str, Any] = {
        "seconds": seconds,
        "loadgen": str(binary.relative_to(ROOT)) if binary.is_relative_to(ROOT) else str(binary),
        "adapters": {},
    }
    bench.say("realtime: limit: the gRPC side of a pod alone (grpc-pod), same load generator")
    res["grpc_pod"] = await grpc_floor(binary, run_dir, seconds)
    for label, r in res["grpc_pod"].items():
        if isinstance(r, dict):
            lat = r.get("latency_ms") or {}
            bench.say(
                f"  {label}: {r.get('rate_achieved', 0):,.0f}/s, p50 {lat.get('p50', 0):.1f}"
                f" p99 {lat.get('p99', 0):.1f} ms, server {r.get('server_cpu_us_per_event')} µs/event"
            )
    for adapter in args.adapters.split(","):
        a_dir = run_dir / f"realtime-{adapter}"
        a_dir.mkdir(parents=True, exist_ok=True)
        ns = fleet_args(partitions=args.partitions, prefix=f"{args.prefix}-rt-{adapter[:5]}")
        fleet = make_fleet(
            ns, a_dir, kafka, redis, adapter, "cluster" if args.cluster else "single"
        )
        out: dict[str, Any] = {"linger_ms": linger_for(adapter), "runs": {}}
        res["adapters"][adapter] = out
        bench.say(f"realtime [{adapter}]: fleet up, logs in {a_dir}")
        try:
            await fleet.start()
            await run_scenario(
                binary, fleet, a_dir, "warmup", 20, 500, 3, False, ns.prefix
            )  # connections, metadata, JIT-less caches
            before, t0 = fleet.cpu(), time.monotonic()
            await trio.sleep(3)
            fleet.idle_util = {
                k: v / (time.monotonic() - t0)
                for k, v in bench.cpu_delta(before, fleet.cpu()).items()
            }
            out["idle_utilisation"] = {k: round(v, 3) for k, v in fleet.idle_util.items()}
            for label, (clients, rate, reconnect) in SCENARIOS.items():
                r = await run_scenario(
                    binary, fleet, a_dir, label, clients, rate, seconds, reconnect, ns.prefix
                )
                out["runs"][label] = r
                lat = r.get("latency_ms") or {}
                bench.say(
                    f"  {label}: {r.get('rate_achieved', 0):,.0f}/s, p50 {lat.get('p50', 0):.1f}"
                    f" p99 {lat.get('p99', 0):.1f} ms, Nimbus {r.get('nimbus_cpu_us_per_event')} µs/event,"
                    f" loadgen {r.get('loadgen_utilisation')} CPU, lost {r.get('lost')}, ok={r.get('ok')}"
                )
        finally:
            fleet.stop()
        bench.say(f"realtime [{adapter}]: limit: the two Kafka hops alone, paced at 1,000/s")
        out["kafka_path_1000"] = await kafka_path_limit(
            args, kafka, adapter, out["linger_ms"], 1000, int(1000 * max(seconds, 5))
        )
        kp = out["kafka_path_1000"].get("latency_ms") or {}
        bench.say(f"  p50 {kp.get('p50', 0):.1f} p99 {kp.get('p99', 0):.1f} ms")
    return res


# --- rendering -----------------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def dups(r: dict[str, Any]) -> str:
    """Application duplicates the load generator would have shown (a second result of one event
    under another delivery id), and how many of them came from its own resends after a cut,
    which it drops by seq as the client library does."""
    app, resend = r.get("app_duplicates"), r.get("resend_duplicates") or 0
    if app is None:
        return "-"
    return f"{app - resend} ({resend} resend)" if resend else str(app)


def _procs(util: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in util.items() if v >= 0.005) or "-"


def render(rt: dict[str, Any]) -> list[str]:
    adapters = rt.get("adapters", {})
    if not adapters:
        return []
    names = list(adapters)
    lines = [
        "## Real time: paced load on both Kafka adapters",
        "",
        f"Load: `{rt.get('loadgen')}` (loadgen/, Go, grpc-go; protocol 2, cumulative acks every"
        f" 5 ms or 100 results), {rt.get('seconds')} s per run after a 1 s warm-up left out of"
        " the figures. Latency: scheduled send → result at the client. Nimbus CPU: 2 pods + the"
        " worker + the status manager, per result delivered. CPU columns are CPUs used"
        " (1.00 = one core) during the run.",
        "",
        "| run | adapter | results/s | p50 / p99 / p99.9 ms | Nimbus µs/event (net of idle) |"
        " Nimbus CPUs | load generator CPUs (µs/event) | Kafka / Redis CPUs |"
        " lost / app duplicates / out of order / diverted |"
        " target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in SCENARIOS:
        for name in names:
            r = adapters[name].get("runs", {}).get(label)
            if not r:
                continue
            lat = r.get("latency_ms") or {}
            bu = r.get("broker_utilisation") or {}
            rc = r.get("reconnect") or {}
            extra = ""
            if rc:
                first = rc.get("reconnect_first_ms") or {}
                last = rc.get("backlog_last_ms") or {}
                extra = (
                    f"; reconnect -> first result p50 {_f(first.get('p50'))} / p99"
                    f" {_f(first.get('p99'))} ms, first -> the backlog's last p99"
                    f" {_f(last.get('p99'))} ms ({rc.get('backlog_results', 0):,} backlog results)"
                )
            lines.append(
                f"| {label} | {name} | {_f(r.get('rate_achieved'), '{:,.0f}')} |"
                f" {_f(lat.get('p50'))} / {_f(lat.get('p99'))} / {_f(lat.get('p999'))}{extra} |"
                f" {_f(r.get('nimbus_cpu_us_per_event'), '{:,.0f}')}"
                f" ({_f(r.get('nimbus_cpu_us_per_event_net_of_idle'), '{:,.0f}')}) |"
                f" {_procs(r.get('nimbus_utilisation') or {})} |"
                f" {r.get('loadgen_utilisation', 0):.2f} ({_f(r.get('cpu_us_per_event'), '{:,.0f}')}) |"
                f" {bu.get('kafka', 0):.2f} / {bu.get('redis', 0):.2f} |"
                f" {r.get('lost', '-')} / {dups(r)} / {r.get('out_of_order', '-')} /"
                f" {r.get('diverts', '-')} |"
                f" {TARGETS[label]} | {bench.verdict(met(label, r))} |"
            )
    lines += stage_tables(adapters)
    gp = rt.get("grpc_pod") or {}
    if gp:
        lines += [
            "",
            "The gRPC side of a pod alone, under the same load generator (`bench_limits.py"
            " grpc-pod`: grpclib under trio-asyncio, as the pods run it, answering each event with"
            " its RECEIPT and RESULT at once; no Kafka, no Redis, no Nimbus logic): the floor of"
            " the pods' share of the work.",
            "",
            "| run | results/s | p50 / p99 ms | server CPU µs/event | server CPUs |",
            "|---|---|---|---|---|",
        ]
        for label in SCENARIOS:
            r = gp.get(label)
            if not isinstance(r, dict):
                continue
            lat = r.get("latency_ms") or {}
            lines.append(
                f"| {label} | {_f(r.get('rate_achieved'), '{:,.0f}')} | {_f(lat.get('p50'))} /"
                f" {_f(lat.get('p99'))} | {_f(r.get('server_cpu_us_per_event'), '{:,.0f}')} |"
                f" {r.get('server_utilisation', 0):.2f} |"
            )
        if gp.get("error"):
            lines.append(f"\n(grpc-pod failed: {gp['error'][:300]})")
    lines += [
        "",
        "The two Kafka hops alone (no Nimbus logic: producer → relay → sink, a process each,"
        " paced at 1,000/s, each adapter's client library and linger):",
        "",
        "| client library | linger ms | p50 / p99 / p99.9 ms | CPU µs per record (producer + relay + sink) |",
        "|---|---|---|---|",
    ]
    for name in names:
        kp = adapters[name].get("kafka_path_1000") or {}
        lat = kp.get("latency_ms") or {}
        by = kp.get("cpu_s_by_process") or {}
        n = kp.get("count") or 0
        per = " + ".join(f"{v / n * 1e6:,.0f}" for v in by.values()) if n else "-"
        lines.append(
            f"| {name} | {adapters[name].get('linger_ms')} | {_f(lat.get('p50'))} / {_f(lat.get('p99'))} /"
            f" {_f(lat.get('p999'))} | {per} |"
            + (f" error: {kp['error'][:200]}" if kp.get("error") else "")
        )
    lines += ["", *floors(rt)]
    return lines


def _stages(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's `stages_ms`: the loadgen's list of {stage, n, p50, p99}, in pipeline order (or
    load_client.py's {stage: {n, p50, p99}})."""
    st = r.get("stages_ms") or []
    if isinstance(st, dict):
        return [{"stage": k, **v} for k, v in st.items()]
    return [x for x in st if isinstance(x, dict) and "stage" in x]


def stage_tables(adapters: dict[str, Any]) -> list[str]:
    """Latency by pipeline stage from the load generator's sampled traces: a table per adapter,
    a row per stage (in the order first seen), a p50 / p99 column per scenario that has them."""
    out: list[str] = []
    for name, a in adapters.items():
        runs = {label: _stages(r) for label in SCENARIOS if (r := a.get("runs", {}).get(label))}
        runs = {label: st for label, st in runs.items() if st}
        if not runs:
            continue
        if not out:
            out += [
                "",
                "### Latency by stage (sampled traces)",
                "",
                "Every 10th result of each load-generator client (its default `--stage-sample 10`)"
                " after the warm-up, timed between the steps of its trace (each hop's wall"
                " clock; one machine): p50 / p99 ms per run, n the sampled results. The"
                " consecutive stages' p50s add up to about the latency p50 from the actual send"
                " (not exactly: a sum of medians); `(inside Nimbus)` is from the pod taking the"
                " event to the pod handing its result to the stream. A replayed result has a"
                " `replay/replay` step where a live one has the router's.",
            ]
        order: list[str] = []
        for st in runs.values():
            order += [x["stage"] for x in st if x["stage"] not in order]
        n = {label: max(x.get("n") or 0 for x in st) for label, st in runs.items()}
        out += [
            "",
            f"{name}:",
            "",
            "| stage | " + " | ".join(f"{label} (n {n[label]:,})" for label in runs) + " |",
            "|---|" + "---|" * len(runs),
        ]
        for stage in order:
            cells = []
            for st in runs.values():
                x = next((x for x in st if x["stage"] == stage), None)
                cells.append(
                    f"{_f(x.get('p50'), '{:,.2f}')} / {_f(x.get('p99'), '{:,.2f}')}" if x else "-"
                )
            out.append(f"| {stage} | " + " | ".join(cells) + " |")
    return out


def _machine_cpus(r: dict[str, Any]) -> float:
    """CPUs used during a run by every process measured: Nimbus, brokers, load generator."""
    return (
        sum((r.get("nimbus_utilisation") or {}).values())
        + sum((r.get("broker_utilisation") or {}).values())
        + (r.get("loadgen_utilisation") or 0.0)
    )


def floors(rt: dict[str, Any]) -> list[str]:
    """Where each paced target stands against the floors measured in the same run."""
    adapters = rt.get("adapters", {})
    gp = rt.get("grpc_pod") or {}
    out = ["### Where the real-time targets stand", ""]
    for name, a in adapters.items():
        kp = a.get("kafka_path_1000") or {}
        by, n = kp.get("cpu_s_by_process") or {}, kp.get("count") or 0
        kafka_worker = (by.get("relay", 0) + by.get("sink", 0)) / n * 1e6 if n else None
        kafka_all = sum(by.values()) / n * 1e6 if n else None
        for label in ("c50_1000", "c50_3000"):
            r = a.get("runs", {}).get(label) or {}
            g = (gp.get(label) or {}).get("server_cpu_us_per_event")
            if not r or g is None:
                continue
            if label == "c50_3000" or kafka_worker is None:
                # The Kafka hops were measured at 1,000/s only: the gRPC side alone is the floor
                # claimed here.
                out.append(
                    f"- {label}, {name}: Nimbus used"
                    f" {_f(r.get('nimbus_cpu_us_per_event'), '{:,.0f}')} µs/event. The gRPC side"
                    f" of the pods alone costs {g:,.0f} µs/event at this load (grpc-pod): the"
                    f" target ({TARGETS[label].split('; ')[-1]}) is below it before any Kafka or"
                    f" Redis work. Every measured process together used"
                    f" {_machine_cpus(r):.2f} of the machine's 2 CPUs: the latency above is"
                    " mostly waiting for a CPU."
                )
                continue
            floor = g + kafka_worker
            out.append(
                f"- {label}, {name}: Nimbus used {_f(r.get('nimbus_cpu_us_per_event'), '{:,.0f}')}"
                f" µs/event. Its floor on this stack: the gRPC side of the pods alone"
                f" {g:,.0f} µs/event (grpc-pod, same load) + the Kafka hops' consuming and"
                f" re-producing alone {kafka_worker:,.0f} µs/record (relay + sink at 1,000/s,"
                f" {name}; with the producer's share {kafka_all:,.0f}) = {floor:,.0f} µs/event,"
                f" before any Redis call or Nimbus logic: the target"
                f" ({TARGETS[label].split('; ')[-1]}) is below it. During the run every measured"
                f" process together used {_machine_cpus(r):.2f} of the machine's 2 CPUs"
                " (the kernel's network work on top): the latency above is mostly waiting"
                " for a CPU."
            )
    one = {n: (a.get("runs", {}).get("one_200") or {}) for n, a in adapters.items()}
    for name, r in one.items():
        lat = r.get("latency_ms") or {}
        kp = (adapters[name].get("kafka_path_1000") or {}).get("latency_ms") or {}
        g = (gp.get("one_200") or {}).get("latency_ms") or {}
        if lat and kp and g:
            out.append(
                f"- one_200, {name}: p50 {lat.get('p50', 0):.1f} / p99 {lat.get('p99', 0):.1f} ms."
                f" The gRPC round trip alone at that load: p50 {g.get('p50', 0):.1f} / p99"
                f" {g.get('p99', 0):.1f} ms; the two Kafka hops alone (at 1,000/s): p50"
                f" {kp.get('p50', 0):.1f} / p99 {kp.get('p99', 0):.1f} ms."
            )
    return out if len(out) > 2 else []
