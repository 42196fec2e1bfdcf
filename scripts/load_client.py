"""Load generator and end-to-end checker for Nimbus: N clients x M events, every result verified.

Owns: driving many `nimbus.client` clients at once (bounded concurrency, an optional global rate,
optional chaos: each client drops its stream and moves to the next pod every K events), the live
progress line on stderr, and the verdict. Each client gets a distinct id (`--prefix`, random by
default) and sends `sq` for 1..M, so every result is checkable (result == n*n) and numbers
identify events: latency is measured per event, from the send() call to the result reaching the
application.

Verdict: exit status 1 if any result is missing (including events refused by the server), out of
order, seen twice by the application, or wrong, or if a client could not run; 0 otherwise. Before
any client starts: 2 for a usage error, 3 if a target cannot be reached or is no gRPC server (one
line says which); 130 when interrupted (Ctrl-C).
Results carrying an error (e.g. OUT_OF_RANGE for M > 46340) are reported, not failed; so is a
reordering caused by the server refusing an event with UNAVAILABLE (the library resends it later).

Chaos (`--disconnect-every K`): by default a client first waits until every event it sent is
receipted, then cuts its stream and reconnects to the next pod. Nothing is in doubt at the cut, so
this tests replay and dedupe: results not yet acked must come back on the new pod, exactly once
for the application. With `--abrupt` it cuts at once, as a dropped phone would: an event whose
RECEIPT dies with the stream is resent, and if the server had accepted it, the server sends its
result twice; the library drops the second by seq (see nimbus/client/). A result the
application sees twice fails the run.

    python scripts/load_client.py --clients 100 --events 1000 --targets 127.0.0.1:50051,127.0.0.1:50052 \\
        --concurrency 50 --rate 20000 --disconnect-every 250 --json artifacts/load.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio_asyncio
from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/load_client.py` from anywhere
    sys.path.insert(0, str(ROOT))
if str(ROOT / "scripts") not in sys.path:  # shared.py, also when loaded by path (tests)
    sys.path.append(str(ROOT / "scripts"))

from shared import percentile  # noqa: E402

from nimbus.client import (  # noqa: E402
    ClientStats,
    ConnectionFailed,
    NimbusClient,
    NimbusError,
    Notice,
    Refused,
    check_target,
    open_client,
    parse_target,
)
from nimbus.entry import (  # noqa: E402
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    ArgumentParser,
)


@dataclass
class ClientRun:
    """What one client saw, checked as it happens."""

    client_id: str
    events: int
    sent_at: dict[int, float] = field(default_factory=dict)  # number -> time send() was called
    received: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    retried: set[int] = field(default_factory=set)  # refused with UNAVAILABLE: may come late
    last_number: int = 0
    out_of_order: int = 0
    duplicates: int = 0  # results the application saw twice (same number)
    wrong: int = 0
    errors: int = 0  # results carrying an error
    latencies: list[float] = field(default_factory=list)
    wall_sent_at: dict[int, float] = field(default_factory=dict)  # sampled: time.time() at send()
    stages: dict[str, list[float]] = field(default_factory=dict)  # stage -> seconds (sampled)
    stats: ClientStats | None = None
    failure: str | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def answered(self) -> int:
        return len(self.received) + len(self.refused - self.received)


@dataclass
class Progress:
    sent: int = 0
    received: int = 0
    finished_clients: int = 0
    live: set[NimbusClient] = field(default_factory=set)
    reconnects_done: int = 0  # of clients already closed

    def reconnects(self) -> int:
        return self.reconnects_done + sum(c.stats.reconnects for c in self.live)


class RateLimiter:
    """A global pace of `rate` events/s shared by every client (0: unlimited)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def acquire(self) -> None:
        if not self._interval:
            return
        now = trio.current_time()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await trio.sleep_until(slot)


def record_stages(
    run: ClientRun, steps: list[tuple[str, float]], sent: float, received: float
) -> None:
    """Time spent between consecutive trace steps of one result (wall clocks, one machine);
    `steps` as `Result.trace()` gives them."""
    prev_name, prev = "client send", sent
    first_in = last_out = None
    for name, t in steps:
        run.stages.setdefault(f"{prev_name} -> {name}", []).append(t - prev)
        prev_name, prev = name, t
        if name == "server/ProcessEvent" and first_in is None:
            first_in = t
        elif name == "server/deliver":
            last_out = t
    run.stages.setdefault(f"{prev_name} -> client receive", []).append(received - prev)
    if first_in is not None and last_out is not None:
        # Inside Nimbus only: from the pod taking the event to the pod handing its result to
        # the stream (excludes both gRPC legs and the client library).
        run.stages.setdefault(INSIDE, []).append(last_out - first_in)


INSIDE = "(inside Nimbus) server/ProcessEvent -> server/deliver"


async def run_client(
    index: int,
    args: argparse.Namespace,
    run: ClientRun,
    progress: Progress,
    limiter: trio.CapacityLimiter,
    rate: RateLimiter,
) -> None:
    targets: list[str] = (
        args.targets[index % len(args.targets) :] + args.targets[: index % len(args.targets)]
    )
    client: NimbusClient | None = None

    def on_event(notice: Notice) -> None:
        if isinstance(notice, Refused):
            if notice.will_retry:
                run.retried.add(notice.number)
                return
            run.refused.add(notice.number)
            if run.answered() >= run.events:
                run.done.set()

    async def receive(c: NimbusClient) -> None:
        async for r in c.results():
            now = trio.current_time()
            n = r.number
            # The library drops a resent event's second result (same seq): any number seen
            # twice here is a duplicate shown to the application, and fails the run.
            if n in run.received:
                run.duplicates += 1
                continue
            if n < run.last_number and n not in run.retried:
                run.out_of_order += 1
            run.last_number = max(run.last_number, n)
            run.received.add(n)
            progress.received += 1
            if r.error is not None:
                run.errors += 1
            elif args.event == "sq" and r.result != n * n:
                run.wrong += 1
            if n in run.sent_at:
                run.latencies.append(now - run.sent_at[n])
            if n in run.wall_sent_at:
                steps = r.trace()
                if steps:
                    record_stages(run, steps, run.wall_sent_at.pop(n), time.time())
            if run.answered() >= run.events:
                run.done.set()

    async with limiter:
        try:
            async with open_client(
                targets,
                run.client_id,
                protocol=args.protocol,
                connect_timeout=args.connect_timeout,
                on_event=on_event,
            ) as client:
                progress.live.add(client)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive, client)
                    for n in range(1, run.events + 1):
                        await rate.acquire()
                        run.sent_at[n] = trio.current_time()
                        if args.trace_sample and n % args.trace_sample == 0:
                            run.wall_sent_at[n] = time.time()
                        await client.send(args.event, n)
                        progress.sent += 1
                        if (
                            args.disconnect_every
                            and n % args.disconnect_every == 0
                            and n < run.events
                        ):
                            if args.abrupt:
                                await client.wait_connected()  # else the cut would be a no-op
                            else:
                                await client.wait_settled()  # nothing in doubt at the cut
                            here = targets.index(client.target) if client.target in targets else 0
                            await client.switch(targets[(here + 1) % len(targets)])
                    await run.done.wait()
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            leaf = exc
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            if not isinstance(leaf, NimbusError):
                raise
            run.failure = str(leaf)
        finally:
            if client is not None:
                run.stats = ClientStats(**client.stats.as_dict())
                progress.live.discard(client)
                progress.reconnects_done += client.stats.reconnects
            progress.finished_clients += 1


async def show_progress(args: argparse.Namespace, progress: Progress, started: float) -> None:
    tty = sys.stderr.isatty()
    period = 0.5 if tty else 5.0
    last_received, last_time = 0, started
    while True:
        await trio.sleep(period)
        now = trio.current_time()
        rate = (progress.received - last_received) / max(now - last_time, 1e-9)
        last_received, last_time = progress.received, now
        line = (
            f"[{now - started:7.1f}s] clients {progress.finished_clients}/{args.clients} done, {len(progress.live)} live"
            f" | sent {progress.sent}/{args.clients * args.events} | received {progress.received}"
            f" | {rate:,.0f} results/s | reconnects {progress.reconnects()}"
        )
        if tty:
            sys.stderr.write("\r" + line.ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def summarize(
    args: argparse.Namespace, runs: list[ClientRun], elapsed: float, first_result_span: float
) -> dict[str, Any]:
    latencies = sorted(x for r in runs for x in r.latencies)
    expected = args.clients * args.events
    received = sum(len(r.received) for r in runs)
    stats = [r.stats for r in runs if r.stats is not None]
    summary: dict[str, Any] = {
        "clients": args.clients,
        "events_per_client": args.events,
        "protocol": args.protocol,
        "targets": args.targets,
        "client_id_prefix": args.prefix,
        "sent": sum(len(r.sent_at) for r in runs),
        "received": received,
        "missing": expected - received,
        "refused": sum(len(r.refused - r.received) for r in runs),
        "out_of_order": sum(r.out_of_order for r in runs),
        "duplicates_seen_by_app": sum(r.duplicates for r in runs),
        "duplicates_dropped_by_library": sum(s.duplicates_dropped for s in stats),
        "wrong_results": sum(r.wrong for r in runs),
        "results_with_error": sum(r.errors for r in runs),
        "failed_clients": sum(1 for r in runs if r.failure),
        "reconnects": sum(s.reconnects for s in stats),
        "resent": sum(s.resent for s in stats),
        "retries": sum(s.retries for s in stats),
        "throughput_results_per_s": received / first_result_span if first_result_span > 0 else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 0.50) * 1e3,
            "p99": percentile(latencies, 0.99) * 1e3,
            "p999": percentile(latencies, 0.999) * 1e3,
            "max": (latencies[-1] if latencies else 0.0) * 1e3,
        },
        "elapsed_s": elapsed,
        "stages_ms": stage_summary(runs),
        "failures": sorted({r.failure for r in runs if r.failure})[:10],
    }
    summary["ok"] = not (
        summary["missing"]
        or summary["out_of_order"]
        or summary["duplicates_seen_by_app"]
        or summary["wrong_results"]
        or summary["failed_clients"]
    )
    return summary


def stage_summary(runs: list[ClientRun]) -> dict[str, dict[str, float]]:
    """Per pipeline stage (from sampled traces): p50/p99 of the time spent in it, ms, in order."""
    merged: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r.stages.items():
            merged.setdefault(k, []).extend(v)
    out = {}
    for k, v in merged.items():
        v.sort()
        out[k] = {"n": len(v), "p50": percentile(v, 0.5) * 1e3, "p99": percentile(v, 0.99) * 1e3}
    return out


def render(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    rows = [
        ("sent", f"{summary['sent']}"),
        ("received", f"{summary['received']}"),
        (
            "missing",
            f"{summary['missing']}"
            + (f" ({summary['refused']} refused)" if summary["refused"] else ""),
        ),
        ("out of order", f"{summary['out_of_order']}"),
        ("duplicates (seen by app)", f"{summary['duplicates_seen_by_app']}"),
        ("duplicates (dropped by lib)", f"{summary['duplicates_dropped_by_library']}"),
        ("wrong results", f"{summary['wrong_results']}"),
        ("results with an error", f"{summary['results_with_error']}"),
        ("failed clients", f"{summary['failed_clients']}"),
        (
            "reconnects",
            f"{summary['reconnects']}  (resent {summary['resent']}, retried {summary['retries']})",
        ),
        ("throughput", f"{summary['throughput_results_per_s']:,.0f} results/s"),
        (
            "latency p50 / p99 / p99.9 / max",
            f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['p999']:.1f} / {lat['max']:.1f} ms",
        ),
        ("elapsed", f"{summary['elapsed_s']:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    head = (
        f"Nimbus load: {summary['clients']} clients x {summary['events_per_client']} events,"
        f" protocol {summary['protocol']}, targets {','.join(summary['targets'])}"
    )
    lines = [head, "-" * len(head)]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if "loop_lag_ms" in summary:
        lag = summary["loop_lag_ms"]
        lines.append(
            f"  load client loop lag p50 / p99 / max: {lag['p50']:.1f} / {lag['p99']:.1f} / {lag['max']:.1f} ms"
        )
    for stage, v in summary.get("stages_ms", {}).items():
        lines.append(f"  stage {stage}: p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms (n={v['n']})")
    lines += [f"  failure: {f}" for f in summary["failures"]]
    lines.append("RESULT: " + ("OK" if summary["ok"] else "FAILED"))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = [
        ClientRun(client_id=f"{args.prefix}-{i}", events=args.events) for i in range(args.clients)
    ]
    progress = Progress()
    lags: list[float] = []
    limiter = trio.CapacityLimiter(args.concurrency)
    rate = RateLimiter(args.rate)
    started = trio.current_time()
    async with trio_asyncio.open_loop():
        async with trio.open_nursery() as outer:
            outer.start_soon(show_progress, args, progress, started)
            outer.start_soon(watch_lag, lags)
            with trio.move_on_after(args.timeout) as timeout_scope:
                async with trio.open_nursery() as nursery:
                    for i, run in enumerate(runs):
                        nursery.start_soon(run_client, i, args, run, progress, limiter, rate)
            outer.cancel_scope.cancel()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    elapsed = trio.current_time() - started
    if timeout_scope.cancelled_caught:
        sys.stderr.write(f"timed out after {args.timeout:g}s\n")
    send_times = [t for r in runs for t in r.sent_at.values()]
    first_send = min(send_times) if send_times else started
    # Throughput over the span in which results could flow: first send -> end.
    summary = summarize(args, runs, elapsed, trio.current_time() - first_send)
    lags.sort()
    summary["loop_lag_ms"] = {
        "p50": percentile(lags, 0.50) * 1e3,
        "p99": percentile(lags, 0.99) * 1e3,
        "max": (lags[-1] if lags else 0.0) * 1e3,
    }
    return summary


async def watch_lag(lags: list[float], period: float = 0.01) -> None:
    """How late this process's event loop wakes a 10 ms timer: when the load generator itself is
    too busy, every latency it reports includes this."""
    while True:
        t = trio.current_time()
        await trio.sleep(period)
        lags.append(max(0.0, trio.current_time() - t - period))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    port = os.environ.get("NIMBUS_PORT", "").strip()
    default_target = f"127.0.0.1:{port if port.isdigit() and port != '0' else 50051}"
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10, help="number of clients (default 10)")
    p.add_argument(
        "--events", type=int, default=100, help="events per client: numbers 1..M (default 100)"
    )
    p.add_argument(
        "--targets",
        default=default_target,
        help=f"comma-separated host:port list (default {default_target})",
    )
    p.add_argument(
        "--concurrency", type=int, default=0, help="clients connected at once (default: all)"
    )
    p.add_argument(
        "--rate", type=float, default=0.0, help="events/s over all clients; 0 = unlimited (default)"
    )
    p.add_argument("--protocol", type=int, choices=(1, 2), default=2)
    p.add_argument(
        "--disconnect-every",
        type=int,
        default=0,
        metavar="K",
        help="each client drops its stream and reconnects to the next target every K events",
    )
    p.add_argument(
        "--abrupt",
        action="store_true",
        help="with --disconnect-every: cut without waiting for receipts (duplicates from resends are tolerated)",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)"
    )
    p.add_argument(
        "--connect-timeout", type=float, default=10.0, help="per client, to open its first stream"
    )
    p.add_argument(
        "--event", default="sq", help="event name (default sq; results are checked only for sq)"
    )
    p.add_argument(
        "--prefix", default=f"load-{secrets.token_hex(3)}", help="client id prefix (default random)"
    )
    p.add_argument(
        "--trace-sample",
        type=int,
        default=0,
        metavar="K",
        help="decode the trace of every K-th result: time spent per pipeline stage (0: off)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    p.add_argument("-v", "--verbose", action="store_true", help="client library logs to stderr")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    try:
        for t in args.targets:
            parse_target(t)
    except ValueError as e:
        p.error(str(e))
    if not args.targets or args.clients < 1 or args.events < 1:
        p.error("need at least one target, one client and one event")
    if args.protocol == 1 and args.disconnect_every:
        p.error("--disconnect-every needs protocol 2 (protocol 1 has no replay to check)")
    for name in ("concurrency", "disconnect_every", "trace_sample"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if not (args.rate >= 0 and math.isfinite(args.rate)):
        p.error("--rate must be >= 0")
    for name in ("timeout", "connect_timeout"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if not (args.prefix.isascii() and args.prefix.isprintable()):
        p.error(
            f"--prefix must be printable ASCII (client ids are gRPC metadata), got {args.prefix!r}"
        )
    if args.json:  # written after the run: find out now
        p.check_output_file("--json", args.json)
    args.concurrency = args.concurrency or args.clients
    return args


async def check_targets(targets: list[str]) -> str | None:
    """Why the run cannot start (a target unreachable or no gRPC server), or None; every target
    checked at once, so a wrong --targets costs a second, not a failed run of every client."""
    problems: dict[str, str] = {}

    async def check(target: str) -> None:
        try:
            why = await check_target(target)
        except ConnectionFailed as e:
            why = f"{e}: start the servers first, or check --targets"
        if why:
            problems[target] = why

    async with trio.open_nursery() as nursery:
        for t in targets:
            nursery.start_soon(check, t)
    return next((problems[t] for t in targets if t in problems), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logger.remove()
    if args.verbose:
        logger.add(sys.stderr, level="DEBUG")
    try:
        problem = trio.run(check_targets, args.targets)
        if problem:
            print(f"load_client.py: {problem}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        summary = trio.run(main_async, args)
    except KeyboardInterrupt:
        print("load_client.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(render(summary))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
