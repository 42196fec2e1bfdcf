"""Operator's view of a running Nimbus (`python -m nimbus.admin`), read-only: it only reads the
state store and Kafka (client records, end offsets, committed offsets, the DLQ), never writes.

    python -m nimbus.admin clients [--state LIVE|REPLAYING|OFFLINE] [--json]
    python -m nimbus.admin client ID [--json]      # status, pod, epoch, acks, backlog, cursor
    python -m nimbus.admin lags [--json]           # per topic/partition: end, committed, lag

It uses the same NIMBUS_* settings as the processes (brokers, Redis, prefix, topic names).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

import trio_asyncio

from nimbus.config import ConfigError, Settings
from nimbus.core.lifecycle import ClientRecord, Status
from nimbus.engines import open_engine
from nimbus.engines.murmur2 import partition_for
from nimbus.entry import ArgumentParser, run_process
from nimbus.ports import ClientRecords, Log
from nimbus.wire import packs

SCAN_LIMIT = 100_000  # DLQ records read at most to count one client's backlog


def record_dict(rec: ClientRecord) -> dict[str, Any]:
    d = asdict(rec)
    d["status"] = rec.status.value
    d["backlog"] = rec.backlog
    return d


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[[("" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def format_clients(records: list[ClientRecord]) -> str:
    counts = {st.value: 0 for st in Status}
    for r in records:
        counts[r.status.value] += 1
    rows = [
        [
            r.client_id,
            r.status.value,
            r.pod or "-",
            r.epoch,
            r.acked,
            r.routed_dlq,
            r.cursor,
            "yes" if r.backlog else "no",
        ]
        for r in sorted(records, key=lambda r: r.client_id)
    ]
    summary = f"{len(records)} clients: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    if not rows:
        return summary
    return (
        table(
            rows, ["client", "status", "pod", "epoch", "acked", "routed_dlq", "cursor", "backlog"]
        )
        + "\n"
        + summary
    )


def format_client(d: dict[str, Any]) -> str:
    order = [
        ("client", "client_id"),
        ("status", "status"),
        ("pod", "pod"),
        ("epoch", "epoch"),
        ("acked (highest delivery id received)", "acked"),
        ("routed to DLQ (highest delivery id)", "routed_dlq"),
        ("DLQ written (highest delivery id)", "dlq_written"),
        ("cursor (DLQ offset the replay scans from)", "cursor"),
        ("backlog", "backlog"),
        ("DLQ partition", "dlq_partition"),
        ("DLQ end offset", "dlq_end"),
        ("results waiting in the DLQ", "waiting"),
    ]
    width = max(len(label) for label, _ in order)
    out = []
    for label, key in order:
        v = d.get(key)
        if key == "backlog":
            v = "yes" if v else "no"
        if key == "waiting" and d.get("waiting_truncated"):
            v = f">= {v} (scan stopped after {SCAN_LIMIT} records)"
        out.append(f"{label.ljust(width)}  {'-' if v in (None, '') else v}")
    return "\n".join(out)


def format_lags(rows: list[dict[str, Any]]) -> str:
    return table(
        [
            [r["topic"], r["partition"], r["group"] or "-", r["end"], r["committed"], r["lag"]]
            for r in rows
        ],
        ["topic", "partition", "group", "end", "committed", "lag"],
    )


async def clients(state: ClientRecords, only: str | None = None) -> list[ClientRecord]:
    records: list[ClientRecord] = await state.all_clients()
    return [r for r in records if only is None or r.status.value == only]


async def client(
    settings: Settings, log: Log, state: ClientRecords, client_id: str
) -> dict[str, Any] | None:
    rec = await state.get(client_id)
    if rec is None:
        return None
    d = record_dict(rec)
    topic = settings.kafka_dlq_topic
    ends = await log.end_offsets(topic)
    part = partition_for(client_id.encode(), len(ends))  # Kafka's partitioner, as the producer
    end = ends.get(part, 0)
    d.update(dlq_partition=part, dlq_end=end, waiting=0, waiting_truncated=False)
    if rec.backlog and rec.cursor >= 0:
        # Count this client's results from its cursor on, not yet acknowledged (read-only scan).
        key = client_id.encode()
        offset, scanned, waiting, taken = rec.cursor, 0, 0, rec.acked
        async with log.reader() as reader:
            while offset < end and scanned < SCAN_LIMIT:
                records = await reader.fetch(topic, part, offset, 500, 1.0)
                if not records:
                    break
                for r in records:
                    if r.key == key:
                        # One result or a pack; a result written twice (at-least-once) counts once.
                        mine = [
                            res
                            for res in packs.decode_record(r.value)
                            if res.client_id == client_id
                        ]
                        new = packs.fresh(mine, taken)
                        if new:
                            waiting += len(new)
                            taken = new[-1].delivery_id
                scanned += len(records)
                offset = records[-1].offset + 1
        d.update(waiting=waiting, waiting_truncated=offset < end)
    return d


async def lags(settings: Settings, log: Log) -> list[dict[str, Any]]:
    rows = []
    for topic, group in (
        (settings.kafka_events_topic, settings.events_group),
        (settings.kafka_results_topic, settings.results_group),
        (settings.kafka_dlq_topic, ""),
    ):
        ends = await log.end_offsets(topic)
        committed = await log.committed(group, topic) if group else {}
        for p in sorted(ends):
            c = committed.get(p, 0) if group else None
            rows.append(
                {
                    "topic": topic,
                    "partition": p,
                    "group": group,
                    "end": ends[p],
                    "committed": c,
                    "lag": ends[p] - c if c is not None else None,
                }
            )
    return rows


async def run(settings: Settings, args: argparse.Namespace, out: Any = None) -> int:
    """Run one admin command against the engine; prints to `out`; returns the exit code."""
    out = out or sys.stdout
    async with trio_asyncio.open_loop(), open_engine(settings) as engine:
        if args.command == "clients":
            recs = await clients(engine.state, args.state)
            print(
                json.dumps([record_dict(r) for r in recs]) if args.json else format_clients(recs),
                file=out,
            )
        elif args.command == "client":
            d = await client(settings, engine.log, engine.state, args.client_id)
            if d is None:
                print(
                    f"nimbus.admin: no client {args.client_id!r} "
                    "(python -m nimbus.admin clients lists them)",
                    file=sys.stderr,
                )
                return 1
            print(json.dumps(d) if args.json else format_client(d), file=out)
        else:
            rows = await lags(settings, engine.log)
            print(json.dumps(rows) if args.json else format_lags(rows), file=out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m nimbus.admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("clients", help="list clients and their state")
    c.add_argument("--state", choices=[s.value for s in Status], default=None)
    c.add_argument("--json", action="store_true")
    one = sub.add_parser("client", help="one client: status, pod, epoch, backlog, cursor")
    one.add_argument("client_id")
    one.add_argument("--json", action="store_true")
    lg = sub.add_parser("lags", help="per topic/partition: end offset, committed offset, lag")
    lg.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    code = 0

    async def main_async(settings: Settings) -> None:
        nonlocal code
        if settings.engine == "memory":
            raise ConfigError(
                "NIMBUS_ENGINE=memory: nothing to read (the all-in-one keeps its state inside its "
                "process); the admin reads a deployment's Kafka and Redis (NIMBUS_ENGINE=real)"
            )
        code = await run(settings, args)

    run_process("nimbus.admin", "admin", main_async, log_level="warning", metrics_port=0)
    sys.exit(code)
