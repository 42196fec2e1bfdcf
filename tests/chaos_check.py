"""Run scripts/chaos.py from a test and check its verdict: what tests/test_chaos.py and
tests/test_chaos_cluster.py share."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def chaos_command(
    ci_args: list[str], seed: str, run_dir: Path, *extra: str
) -> tuple[list[str], Path]:
    """The chaos.py command of a CI run (its arguments, the seed, `extra`, the run folder) and
    the path of the JSON summary it writes."""
    summary_path = run_dir / "ci-summary.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "chaos.py"),
        *ci_args,
        "--seed", seed,
        *extra,
        "--run-dir", str(run_dir),
        "--json", str(summary_path),
    ]  # fmt: skip
    return cmd, summary_path


def run_chaos(
    cmd: list[str],
    *,
    env: dict[str, str] | None,
    timeout: float,
    run_dir: Path,
    summary_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int, str]:
    """Run `cmd` (chaos.py ... --json summary_path), print its table, and check the delivery
    contract: nothing lost, out of order, duplicated to the app or unexpected; every event
    answered. Returns (summary, its totals, its chaos section, chaos.py's exit status, its
    output) for the caller's own checks (the exit status last: its specific failures first)."""
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    took = time.monotonic() - started
    output = proc.stdout
    table = output[output.find("Nimbus chaos:") :] if "Nimbus chaos:" in output else output[-6000:]
    with capsys.disabled():
        print(f"\n{table}\n(chaos.py exit {proc.returncode} after {took:.0f} s; logs in {run_dir})")
    assert summary_path.exists(), f"no summary written; chaos.py said:\n{output[-6000:]}"
    s = json.loads(summary_path.read_text())
    t, chaos = s["totals"], s["chaos"]
    problems = {
        k: t[k] for k in ("lost", "out_of_order", "app_duplicates", "unexpected", "failed_clients")
    }
    assert not any(problems.values()), (problems, s["violations"][:3])
    assert s["settled"] and t["unanswered"] == 0, f"did not settle: {t}"
    # Every event got its result. Not every one its receipt: an event whose result arrives first
    # (its produce batch was held, then failed) is settled by that result and not resent.
    assert t["sent"] > 1000 and t["results"] >= t["sent"] >= t["receipted"], t
    return s, t, chaos, proc.returncode, output
