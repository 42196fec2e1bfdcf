"""End-to-end tracing: each stage appends a TraceStep to the message's LogEntry, as the original."""

from __future__ import annotations

from datetime import UTC, datetime

from nimbus.proto_gen.nimbus import LogEntry, TraceStep


def step(
    log: LogEntry | None,
    service: str,
    instance: str,
    method: str,
    message: str = "",
    **metadata: object,
) -> LogEntry:
    log = log if log is not None else LogEntry()
    log.steps.append(
        TraceStep(
            timestamp=datetime.now(UTC),
            service_name=service,
            instance_id=instance,
            method_name=method,
            message=message,
            metadata={k: str(v) for k, v in metadata.items()},
        )
    )
    return log
