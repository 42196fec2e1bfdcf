"""Many chaos runs, each with its own seed and fault mix: schedules nobody chose.

Runs `scripts/chaos.py` once per seed, one after the other, each in a process of its own with its
own run folder, topics and client ids, and prints one verdict line per run as it ends and a
table at the end (also written as Markdown with `--table PATH` and as JSON with `--json PATH`).

Seeds: `--seeds N` draws N seeds at random (printed, so a failure can be replayed), `--seed-list`
gives them; both may be used. A run's fault mix is drawn from its seed (clients, rate, kill and
cut rates, broker kills), so the sweep covers mixes as well as schedules; `--fixed-mix` keeps
chaos.py's own defaults and whatever `--` arguments follow, for every seed. Arguments after `--`
go to every chaos.py run as they are (e.g. `-- --duration 150 --settle-timeout 240`), after the
drawn mix, so they win over it. With `-- --cluster` (chaos.py's cluster mode, on
scripts/cluster.sh's clusters) the mix draws Kafka broker and Redis master kills
(`--broker-kills`, `--master-kills`; no master kills with `--redis-single`) instead of the
single-node broker kills.

    python scripts/chaos_sweep.py --seeds 30 --duration 120 --table artifacts/sweep.md
    python scripts/chaos_sweep.py --seed-list 8878 --fixed-mix -- --clients 30 --rate 2 \\
        --duration 150 --kafka-kills 1 --redis-kills 1 --settle-timeout 240
    python scripts/chaos_sweep.py --seeds 5 --duration 120 -- --cluster

Exit status: 0 if every run's verdict is PASS, 1 if any failed, 2 on a usage error, 130 if
interrupted (the table of the runs finished so far is still printed and written).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHAOS = ROOT / "scripts" / "chaos.py"


def mix_for(seed: int, cluster: bool = False, redis_single: bool = False) -> dict[str, Any]:
    """The fault mix of a seed's run: drawn from the seed, so the same seed is the same run.
    `cluster`: chaos.py --cluster (broker and master kills; none of the latter with
    `redis_single`) instead of the single-node Kafka and Redis kills."""
    rng = random.Random(f"mix-{seed}")
    mix: dict[str, Any] = {
        "clients": rng.choice([12, 20, 30]),
        "rate": rng.choice([2, 3, 5]),
        "switch-rate": rng.choice([10, 30, 60]),
        "cut-rate": rng.choice([5, 20, 40]),
        "pod-kill-rate": rng.choice([1, 3, 6]),
        "worker-kill-rate": rng.choice([1, 3, 6]),
        "redis-cut-rate": rng.choice([0, 2, 6]),
    }
    kafka, redis = rng.choice([0, 1, 1, 2]), rng.choice([0, 1, 1, 2])
    if not cluster:
        mix["kafka-kills"], mix["redis-kills"] = kafka, redis
    else:
        mix["broker-kills"] = kafka
        mix["master-kills"] = 0 if redis_single else redis
    return mix


def mix_args(mix: dict[str, Any]) -> list[str]:
    return [a for k, v in mix.items() for a in (f"--{k}", str(v))]


def verdict(s: dict[str, Any] | None, code: int) -> str:
    if s is None:
        return f"ERROR (exit {code}, no summary)"
    t = s["totals"]
    bad = [
        k
        for k in ("lost", "out_of_order", "app_duplicates", "unexpected", "failed_clients")
        if t[k]
    ]
    if not s["settled"]:
        bad.append("not settled")
    if bad or code != 0:
        return "FAIL: " + ", ".join(bad or [f"exit {code}"])
    return "PASS"


def row(
    seed: int, mix: dict[str, Any] | None, s: dict[str, Any] | None, v: str, took: float
) -> dict[str, Any]:
    t = s["totals"] if s else {}
    ch = s["chaos"] if s else {}
    return {
        "seed": seed,
        "mix": mix,
        "verdict": v,
        "sent": t.get("sent"),
        "results": t.get("results"),
        "lost": t.get("lost"),
        "out_of_order": t.get("out_of_order"),
        "app_duplicates": t.get("app_duplicates"),
        "reconnects": t.get("reconnects"),
        "kills": ch.get("kills"),
        "pod_kills": ch.get("pod_kills"),
        "worker_kills": ch.get("worker_kills"),
        "kafka_kills": ch.get("kafka_kills"),
        "redis_kills": ch.get("redis_kills"),
        "broker_kills": ch.get("broker_kills"),
        "master_kills": ch.get("master_kills"),
        "failover_s": {k: ch[k]["failover_s"] for k in ("broker_kill", "master_kill") if k in ch},
        "settle_s": s.get("settle_s") if s else None,
        "took_s": round(took),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| seed | mix (clients x ev/s; sw/cut/pod/wrk/rcut per min; kafka, redis kills) | events "
        "| kills (pod/wrk/kafka/redis) | reconnects | lost | out of order | app dups | settled (s) "
        "| verdict |"
    )
    if any(r["mix"] and "broker-kills" in r["mix"] for r in rows) or any(
        r["broker_kills"] or r["master_kills"] for r in rows
    ):  # cluster mode: Kafka broker and Redis master kills
        head = head.replace("kafka, redis kills", "broker, master kills").replace(
            "kafka/redis", "broker/master"
        )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        m = r["mix"]
        cl = (m is not None and "broker-kills" in m) or bool(r["broker_kills"] or r["master_kills"])
        mix = (
            "chaos.py defaults + fixed args"
            if m is None
            else f"{m['clients']}x{m['rate']}; {m['switch-rate']}/{m['cut-rate']}/"
            f"{m['pod-kill-rate']}/{m['worker-kill-rate']}/{m['redis-cut-rate']}; "
            + (
                f"{m['broker-kills']}, {m['master-kills']}"
                if "broker-kills" in m
                else f"{m['kafka-kills']}, {m['redis-kills']}"
            )
        )
        a, b = ("broker_kills", "master_kills") if cl else ("kafka_kills", "redis_kills")
        kills = (
            f"{r['kills']} ({r['pod_kills']}/{r['worker_kills']}/{r[a]}/{r[b]})"
            if r["kills"] is not None
            else "-"
        )
        lines.append(
            f"| {r['seed']} | {mix} | {r['sent']} | {kills} | {r['reconnects']} | {r['lost']} "
            f"| {r['out_of_order']} | {r['app_duplicates']} | {r['settle_s']} | {r['verdict']} |"
        )
    passed = sum(1 for r in rows if r["verdict"] == "PASS")
    lines.append("")
    lines.append(f"{passed} passed, {len(rows) - passed} failed")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, default=0, help="random seeds to draw (default 0)")
    p.add_argument(
        "--seed-list", default="", help="comma-separated seeds to run first (e.g. 8878,10)"
    )
    p.add_argument(
        "--duration", type=float, default=120.0, help="seconds of chaos per run (default 120)"
    )
    p.add_argument(
        "--fixed-mix", action="store_true", help="no drawn mix: chaos.py defaults + `--` args"
    )
    p.add_argument("--out", type=Path, default=None, help="folder of the runs (default artifacts/)")
    p.add_argument("--table", type=Path, help="write the table as Markdown to PATH")
    p.add_argument("--json", type=Path, help="write the rows as JSON to PATH")
    args = p.parse_args(argv)
    try:
        listed = [int(x) for x in args.seed_list.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seed-list: not a list of integers: {args.seed_list!r}")
    if args.seeds < 0 or (args.seeds == 0 and not listed):
        p.error("give --seeds N (N > 0) and/or --seed-list")
    args.all_seeds = listed + [secrets.randbelow(1_000_000) for _ in range(args.seeds)]
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    args.out = args.out or ROOT / "artifacts" / f"sweep-{stamp}"
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = args.all_seeds
    print(f"chaos sweep: {len(seeds)} runs, seeds {seeds}; runs in {args.out}", flush=True)
    rows: list[dict[str, Any]] = []
    interrupted = False
    for i, seed in enumerate(seeds, 1):
        mix = (
            None
            if args.fixed_mix
            else mix_for(
                seed, "--cluster" in extra, any(a.startswith("--redis-single") for a in extra)
            )
        )
        run_dir = args.out / f"seed-{seed}"
        summary_path = run_dir / "sweep-summary.json"
        cmd = [
            sys.executable,
            str(CHAOS),
            "--seed", str(seed),
            "--duration", str(args.duration),
            "--run-dir", str(run_dir),
            "--json", str(summary_path),
            "--progress", "30",
            *([] if mix is None else mix_args(mix)),
            *extra,
        ]  # fmt: skip
        t0 = time.monotonic()
        try:
            with (run_dir.parent / f"seed-{seed}.out").open("w") as out:
                code = subprocess.run(
                    cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
                ).returncode
        except KeyboardInterrupt:
            interrupted = True
            code = 130
        took = time.monotonic() - t0
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        v = verdict(summary, code)
        rows.append(row(seed, mix, summary, v, took))
        r = rows[-1]
        print(
            f"[{i}/{len(seeds)}] seed {seed}: {v}  (events {r['sent']}, kills {r['kills']}, "
            f"reconnects {r['reconnects']}, lost {r['lost']}, out of order {r['out_of_order']}, "
            f"app dups {r['app_duplicates']}; {took:.0f} s; {run_dir})",
            flush=True,
        )
        if interrupted:
            break
    text = table(rows)
    print("\n" + text, flush=True)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if interrupted:
        return 130
    return 0 if all(r["verdict"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
