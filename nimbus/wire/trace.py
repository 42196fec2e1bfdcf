"""End-to-end tracing: each stage appends a TraceStep to the message's LogEntry, as the original."""

from __future__ import annotations

import time

from nimbus.wire.messages import LogEntry


def step(
    log: LogEntry, service: str, instance: str, method: str, message: str = "", **metadata: object
) -> None:
    """Append one step to `log` (in place)."""
    s = log.steps.add(
        service_name=service, instance_id=instance, method_name=method, message=message
    )
    ns = time.time_ns()
    ts = s.timestamp  # set directly: Timestamp.FromNanoseconds is pure Python (well_known_types)
    ts.seconds = ns // 1_000_000_000
    ts.nanos = ns % 1_000_000_000
    for k, v in metadata.items():
        s.metadata[k] = str(v)


def encoded_step(service: str, instance: str, method: str, **metadata: object) -> bytes:
    """One step, encoded as a LogEntry holding it alone: appended to an encoded log (repeated
    fields concatenate on the wire), it is that log with the step added. For hops that write
    many responses at once, the step is encoded once for all of them."""
    one = LogEntry()
    step(one, service, instance, method, "", **metadata)
    out: bytes = one.SerializeToString()
    return out
