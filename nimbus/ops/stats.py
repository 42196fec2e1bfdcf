"""Process-local counters: what each role did, for logs, the summary at shutdown, and tests.
Every increment also goes to the Prometheus counter `nimbus_ops_total{op=name}`."""

from __future__ import annotations

from collections import Counter

from nimbus.ops import metrics


class Counters:
    def __init__(self) -> None:
        self.values: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] += n
        metrics.op(name, n)  # and the process-wide Prometheus counter nimbus_ops_total{op=name}

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def __repr__(self) -> str:
        return f"<Counters {dict(sorted(self.values.items()))}>"

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.values.items())) or "nothing happened"
