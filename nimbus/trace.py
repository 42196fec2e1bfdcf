"""End-to-end tracing: each stage appends a TraceStep to the message's LogEntry, as the original."""

from __future__ import annotations

import time

from nimbus.messages import LogEntry


def step(log: LogEntry, service: str, instance: str, method: str, message: str = "", **metadata: object) -> None:
    """Append one step to `log` (in place)."""
    s = log.steps.add(service_name=service, instance_id=instance, method_name=method, message=message)
    s.timestamp.FromNanoseconds(time.time_ns())  # GetCurrentTime() costs 10x more
    for k, v in metadata.items():
        s.metadata[k] = str(v)
