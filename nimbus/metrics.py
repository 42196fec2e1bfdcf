"""Prometheus metrics of a Nimbus process (prometheus-client).

One registry per process (`REGISTRY`); in-process test clusters share it, so tests compare
counter values before and after rather than absolute values. Helpers here are the only way the
rest of the code touches metrics, so adapters stay one line.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()

BAD_INPUT = Counter(
    "nimbus_bad_input_total",
    "Malformed input seen, logged and skipped, by where it was seen and why it was refused",
    ["where", "reason"],
    registry=REGISTRY,
)

ERRORS = Counter(
    "nimbus_errors_total",
    "Errors by kind",
    ["kind"],
    registry=REGISTRY,
)


def bad_input(where: str, reason: str) -> None:
    """Count one malformed input (a gRPC message, metadata value or topic record)."""
    BAD_INPUT.labels(where=where, reason=reason).inc()


def error(kind: str) -> None:
    ERRORS.labels(kind=kind).inc()


def value(counter: Counter, **labels: str) -> float:
    """The current value of one labelled counter (for tests and summaries)."""
    return counter.labels(**labels)._value.get()
