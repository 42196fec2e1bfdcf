"""What every Nimbus process does around its work: settings, logging, the trio run, signals (the
first SIGINT/SIGTERM drains, a second exits at once), and the one line a process that cannot run
ends with: what went wrong and what to do, with a distinct exit status (README, "Errors and exit
codes"). Only `--debug` style logging (NIMBUS_LOG_LEVEL=debug or trace) adds the traceback.

    0    done (a signal drained it)
    1    failed while running (an engine error other than the ones below)
    2    usage or configuration: a bad argument or NIMBUS_* value, topics that do not fit
    3    a dependency cannot be reached: Kafka, Redis (clients: the Nimbus server)
    4    a port cannot be bound: in use, not permitted, not an address of this host
    130  interrupted (Ctrl-C) before the process was up
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio
from loguru import logger

from nimbus import config, logs
from nimbus.config import ConfigError
from nimbus.ops import metrics
from nimbus.ports import EngineError, LogUnavailable, StateUnavailable, TopicMismatch

# Every process runs trio-asyncio with batched callbacks (`run_process`); the patch lives with the
# other patches of grpclib and trio-asyncio internals, in nimbus.wire.grpc.
from nimbus.wire.grpc import batch_asyncio_callbacks

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_CANNOT_LISTEN = 4
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line that says where to look: `prog: message (see prog
    --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def check_output_file(self, option: str, path: str | os.PathLike[str]) -> None:
        """A usage error now, not a file left unwritten at the end of a run: the folder of `path`
        (the value of `option`) must exist or be creatable, and be writable."""
        folder = Path(path).resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.error(f"{option} {path}: cannot create {folder}: {e.strerror}")
        if not os.access(folder, os.W_OK):
            self.error(f"{option} {path}: {folder} is not writable")


class CannotListen(Exception):
    """A listener could not bind; carries the settings that choose its address."""

    def __init__(self, host_var: str, port_var: str, host: str, port: int, error: OSError) -> None:
        super().__init__(f"{host}:{port}: {error}")
        self.host_var, self.port_var = host_var, port_var
        self.host, self.port = host, port
        self.error = error


# The listener each role binds itself (the metrics endpoint is tagged where it starts).
_LISTENERS = {
    "server": ("NIMBUS_HOST", "NIMBUS_PORT", "host", "port"),
    "all-in-one": ("NIMBUS_HOST", "NIMBUS_PORT", "host", "port"),
    "web": ("NIMBUS_WEB_HOST", "NIMBUS_WEB_PORT", "web_host", "web_port"),
}
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside `exc`, nested exception groups (every trio nursery makes one) opened."""
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from leaves(e)
    else:
        yield exc


def _bind_error(exc: BaseException) -> OSError | None:
    """The error of a listener that could not bind, if `exc` holds one."""
    for e in leaves(exc):
        if isinstance(e, socket.gaierror) or (isinstance(e, OSError) and e.errno in _BIND_ERRNOS):
            return e
    return None


def _cannot_listen(e: CannotListen) -> str:
    where = f"cannot listen on {e.host}:{e.port}"
    err = e.error
    if isinstance(err, socket.gaierror):
        return (
            f"{where}: cannot resolve {e.host!r}; set {e.host_var} to an address of this machine "
            "(0.0.0.0: every interface, 127.0.0.1: this machine only)"
        )
    if err.errno == errno.EADDRINUSE:
        return (
            f"{where}: the port is in use; set {e.port_var} to a free port "
            "(or stop the process that holds it)"
        )
    if err.errno == errno.EACCES:
        return (
            f"{where}: permission denied; set {e.port_var} to a port above 1023 "
            "(or run with the privilege to bind it)"
        )
    return (
        f"{where}: {e.host} is not an address of this machine; set {e.host_var} to one of "
        "its addresses (0.0.0.0: every interface, 127.0.0.1: this machine only)"
    )


def explain(
    exc: BaseException, settings: config.Settings | None = None, role: str = ""
) -> tuple[int, str] | None:
    """(exit status, one line saying what went wrong and what to do) for a failure a user can fix,
    found anywhere in `exc`'s exception groups; None for anything else (a bug: its traceback)."""
    found = list(leaves(exc))

    def first(kind: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
        return next((e for e in found if isinstance(e, kind)), None)

    if first(KeyboardInterrupt) is not None:
        return EXIT_INTERRUPTED, "interrupted"
    if (e := first(ConfigError)) is not None:
        return EXIT_USAGE, str(e)
    if (e := first(CannotListen)) is not None:
        return EXIT_CANNOT_LISTEN, _cannot_listen(e)
    bind = _bind_error(exc)
    if bind is not None and settings is not None and role in _LISTENERS:
        host_var, port_var, host_field, port_field = _LISTENERS[role]
        tagged = CannotListen(
            host_var, port_var, getattr(settings, host_field), getattr(settings, port_field), bind
        )
        return EXIT_CANNOT_LISTEN, _cannot_listen(tagged)
    if (e := first(LogUnavailable)) is not None:
        if str(e).startswith("unknown topic"):  # the engines' words for a topic not created yet
            return EXIT_UNAVAILABLE, (
                f"{e}: nimbus.server and nimbus.workers create the topics at start; check "
                "NIMBUS_KAFKA_EVENTS_TOPIC, NIMBUS_KAFKA_RESULTS_TOPIC, NIMBUS_KAFKA_DLQ_TOPIC"
            )
        return EXIT_UNAVAILABLE, (
            f"{str(e).rstrip('.')}; start Kafka (bash scripts/services.sh up) or point "
            "NIMBUS_KAFKA_BROKERS at it (python -m nimbus needs neither Kafka nor Redis)"
        )
    if (e := first(StateUnavailable)) is not None:
        return EXIT_UNAVAILABLE, (
            f"{str(e).rstrip('.')}; start Redis (bash scripts/services.sh up) or point "
            "NIMBUS_REDIS_ADDRESS at it (python -m nimbus needs neither Kafka nor Redis)"
        )
    if (e := first(TopicMismatch)) is not None:
        return EXIT_USAGE, str(e)
    if (e := first(EngineError)) is not None:
        return EXIT_FAILED, str(e)
    return None


def fail(prog: str, code: int, message: str, exc: BaseException | None = None) -> NoReturn:
    """End the process with `prog: message` on stderr (after `exc`'s traceback, when given)."""
    if exc is not None:
        traceback.print_exception(exc)
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_process(
    prog: str,
    role: str,
    main_async: Callable[..., Awaitable[None]],
    *args: Any,
    checks: Sequence[Callable[[config.Settings], None]] = (),
    **overrides: Any,
) -> None:
    """Load the settings (and run the role's own `checks` on them: ConfigError -> exit 2), set up
    logging, run `main_async(settings, *args)` under trio with metrics, and end with `explain`'s
    one line if it fails."""
    try:
        settings = config.load(**overrides)
        for check in checks:
            check(settings)
    except ConfigError as e:
        fail(prog, EXIT_USAGE, str(e))
    logs.setup(settings, role=role)
    batch_asyncio_callbacks()
    try:
        trio.run(_with_metrics, main_async, settings, *args)
    except SystemExit:
        raise
    except BaseException as exc:
        verdict = explain(exc, settings, role)
        if verdict is None:
            raise
        debug = settings.log_level in ("debug", "trace")
        fail(prog, *verdict, exc=exc if debug else None)


async def _with_metrics(
    main_async: Callable[..., Awaitable[None]], settings: config.Settings, *args: Any
) -> None:
    """`main_async`, with the process's metrics endpoint beside it when NIMBUS_METRICS_PORT is set."""
    async with trio.open_nursery() as nursery:
        if settings.metrics_port:
            try:
                await nursery.start(
                    functools.partial(
                        metrics.serve_metrics, allowed_hosts=settings.http_allowed_hosts
                    ),
                    settings.metrics_host,
                    settings.metrics_port,
                )
            except (OSError, BaseExceptionGroup) as exc:
                bind = _bind_error(exc)
                if bind is None:
                    raise
                raise CannotListen(
                    "NIMBUS_METRICS_HOST",
                    "NIMBUS_METRICS_PORT",
                    settings.metrics_host,
                    settings.metrics_port,
                    bind,
                ) from exc
        await main_async(settings, *args)
        nursery.cancel_scope.cancel()


async def run_with_signals(start: Any) -> None:
    """Run `start` (a nursery.start-able function) until it returns or SIGINT/SIGTERM: the first
    signal cancels it, which drains gracefully (bounded by NIMBUS_SHUTDOWN_TIMEOUT_SEC); a second
    signal exits at once."""
    async with trio.open_nursery() as outer:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            scope = trio.CancelScope()

            async def runner() -> None:
                with scope:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(start)
                outer.cancel_scope.cancel()

            outer.start_soon(runner)
            async for sig in signals:
                if not scope.cancel_called:
                    logger.info(
                        "received {}: shutting down (again to exit at once)",
                        signal.Signals(sig).name,
                    )
                    scope.cancel()
                else:
                    logger.warning("second {}: exiting now", signal.Signals(sig).name)
                    os._exit(130)
