"""Logging setup (loguru): human-readable by default, JSON lines with NIMBUS_LOG_FORMAT=json.

Every line carries `role` and `instance`; a line logged during a stream's work also carries
`client_id`, `epoch` and `trace_id` (in JSON: under record.extra; in the human format: after the
role). They are bound with `bind_task` at the start of the stream's handler (a contextvar, so the
stream's reader and writer tasks inherit them), or per line with `for_client` where one task
works for many clients (the pod's ingest and delivery loops, the replay of one client).
"""

from __future__ import annotations

import re
import sys
import uuid
from typing import Any

from loguru import logger
from loguru._logger import context as _context  # the ContextVar behind logger.contextualize

from nimbus.config import Settings

STREAM_FIELDS = ("client_id", "epoch", "trace_id")
_TRACE_OK = re.compile(r"^[0-9A-Za-z._:-]{1,64}$")


def _human(record: Any) -> str:
    extra = record["extra"]
    tags = "".join(f" {k}={{extra[{k}]}}" for k in STREAM_FIELDS if k in extra)
    return (
        "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{extra[role]}</cyan>"
        + (f"<blue>{tags}</blue>" if tags else "")
        + " {message}\n{exception}"
    )


def setup(settings: Settings, role: str) -> None:
    logger.remove()
    logger.configure(extra={"role": role, "instance": settings.instance_id})
    if settings.log_format == "json":
        logger.add(sys.stderr, level=settings.log_level.upper(), serialize=True)
    else:
        logger.add(sys.stderr, level=settings.log_level.upper(), format=_human)


def trace_id(metadata: Any) -> str:
    """The stream's trace id: the client's `x-trace-id` (or the trace id of a W3C `traceparent`)
    when it is a sane token, else a fresh random one."""
    raw = str(metadata.get("x-trace-id", "") or "").strip()
    if not raw:
        parts = str(metadata.get("traceparent", "") or "").split("-")
        raw = parts[1] if len(parts) == 4 else ""
    return raw if _TRACE_OK.match(raw) else uuid.uuid4().hex[:16]


def bind_task(**fields: Any) -> None:
    """Bind `fields` to every line logged from now on by the current task (asyncio or trio) and
    by the tasks it starts. Only for a task that does one stream's work, and ends with it."""
    # What logger.contextualize() does on entry, without the exit: a context manager entered and
    # dropped would be closed by the garbage collector, resetting the fields at once.
    _context.set({**_context.get(), **fields})


def for_client(client_id: str, epoch: int | None = None, trace: str | None = None) -> Any:
    """A logger with the stream fields bound, for one line in a task that serves many clients."""
    fields: dict[str, Any] = {"client_id": client_id}
    if epoch is not None:
        fields["epoch"] = epoch
    if trace:
        fields["trace_id"] = trace
    return logger.bind(**fields)
