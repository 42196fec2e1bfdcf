"""The sample CLI, `python -m nimbus.client`: flag-compatible with the original Go client
(`--client_id --start --end`); see README."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import ssl as _ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TextIO

import trio
import trio_asyncio
from loguru import logger

from nimbus.proto_gen.nimbus import (
    LogEntry,
)

if TYPE_CHECKING:
    pass

from nimbus.client.connection import NimbusClient, open_client
from nimbus.client.transport import check_target
from nimbus.client.types import (
    DEFAULT_PORT,
    INT32_MAX,
    INT32_MIN,
    Connected,
    ConnectionFailed,
    Disconnected,
    Gap,
    NimbusError,
    Notice,
    Refused,
    Result,
    StreamRefused,
    _metadata_value_ok,
    _single,
    parse_target,
)

EXIT_OK: Final = 0
EXIT_MISSING: Final = 1  # timed out (or results aged out) before every result arrived
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_REFUSED: Final = 4  # the server refused the stream (or superseded it)
EXIT_INTERRUPTED: Final = 130


def format_result(result: Result, *, protocol: int = 2, mine: bool = True) -> str:
    """One line per result: `sq(3) = 9  (delivery 17)`."""
    call = f"{result.event_name}({result.number})"
    if result.error is not None:
        text = f"{call} failed: {result.error.code.name}: {result.error.message}"
    else:
        text = f"{call} = {result.result}"
    if protocol == 2:
        text += (
            f"  (delivery {result.delivery_id}"
            + ("" if mine else ", from an earlier session")
            + ")"
        )
    return text


def format_trace(log: LogEntry | None) -> list[str]:
    if log is None:
        return []
    lines = []
    for s in log.steps:
        meta = " ".join(f"{k}={v}" for k, v in sorted(s.metadata.items()))
        line = f"    {s.timestamp.isoformat()}  {s.service_name}/{s.instance_id}  {s.method_name}"
        if s.message:
            line += f": {s.message}"
        if meta:
            line += f"  [{meta}]"
        lines.append(line)
    return lines


def _default_target() -> str:
    port = os.environ.get("NIMBUS_PORT", "").strip()
    return f"127.0.0.1:{port if port.isdigit() and port != '0' else DEFAULT_PORT}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from nimbus.entry import ArgumentParser  # one-line usage errors, as every Nimbus command

    parser = ArgumentParser(
        prog="python -m nimbus.client",
        description=(
            "Send an event (`sq` by default) for each number in --start..--end over one Nimbus "
            "stream and print the results as they arrive. --start=0 --end=0 sends nothing and "
            "stands by for results (Ctrl-C to stop). Ctrl-C prints what was sent and what arrived."
        ),
        epilog=(
            "exit status: 0 every result arrived (results carrying an error included), "
            "1 timed out or results were lost, 2 usage error, 3 server unreachable or not a gRPC "
            "server, 4 server refused the stream, 130 interrupted (Ctrl-C, standing by included)."
        ),
    )
    parser.add_argument(
        "--client_id",
        "--client-id",
        default="client_default",
        help="client id, sent as the metadata client_id; printable ASCII (default %(default)s)",
    )
    parser.add_argument("--start", type=int, default=1, help="first number (default 1)")
    parser.add_argument("--end", type=int, default=10, help="last number, inclusive (default 10)")
    parser.add_argument(
        "--target",
        "--addr",
        action="append",
        metavar="HOST:PORT",
        help="a server pod; repeat for several (default 127.0.0.1:$NIMBUS_PORT, else 50051)",
    )
    parser.add_argument(
        "--protocol",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: the original's, 2: acks and receipts (default)",
    )
    parser.add_argument("--event", default="sq", help="event name (default sq)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="N",
        help="send at most N events per second (default 0: as fast as the stream takes them)",
    )
    parser.add_argument("--trace", action="store_true", help="print each result's trace steps")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SEC",
        help="give up after SEC seconds (default 30, plus the sending time at --rate)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log connection events to stderr"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("NIMBUS_TOKEN") or None,
        help="JWT for a server with auth on (default $NIMBUS_TOKEN; see python -m nimbus.token)",
    )
    parser.add_argument(
        "--tls",
        nargs="?",
        const="",
        default=None,
        metavar="CA_FILE",
        help="connect with TLS, verifying the server with CA_FILE (alone: the system's CAs)",
    )
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (usage error, exit 2) what argparse lets through; fill in the defaults that
    depend on other arguments (--target, --timeout)."""
    args.target = args.target or [_default_target()]
    for t in args.target:
        try:
            parse_target(t)
        except ValueError as e:
            parser.error(str(e))
    if not args.client_id:
        parser.error("--client_id must not be empty")
    if not _metadata_value_ok(args.client_id):
        parser.error(
            f"--client_id must be printable ASCII (a gRPC metadata value), got {args.client_id!r}"
        )
    if args.token is not None and not _metadata_value_ok(args.token):
        parser.error("--token (or $NIMBUS_TOKEN) must be printable ASCII, as a JWT is")
    if not (args.start == 0 and args.end == 0) and args.end < args.start:
        parser.error("--end must be >= --start")
    for n in (args.start, args.end):
        if not INT32_MIN <= n <= INT32_MAX:
            parser.error(f"{n} does not fit int32")
    if not (args.rate >= 0 and math.isfinite(args.rate)):
        parser.error("--rate must be >= 0")
    if args.timeout is None:
        count = 0 if args.start == args.end == 0 else args.end - args.start + 1
        args.timeout = 30.0 + (count / args.rate if args.rate else 0.0)
    elif not (args.timeout > 0 and math.isfinite(args.timeout)):
        parser.error("--timeout must be > 0")
    if args.tls and not os.path.isfile(args.tls):
        parser.error(f"--tls {args.tls}: no such file (a PEM CA bundle)")


def _client_ssl(ca_file: str | None) -> _ssl.SSLContext | None:
    """--tls [CA_FILE]: None (plaintext), or a context trusting CA_FILE (or the system's CAs)."""
    if ca_file is None:
        return None
    ctx = _ssl.create_default_context(cafile=ca_file or None)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _leaf(exc: BaseException) -> BaseException:
    if isinstance(exc, BaseExceptionGroup):
        return _single(exc) or exc
    return exc


@dataclass
class _Tally:
    """What the CLI sent and what arrived, for the line Ctrl-C prints."""

    event: str
    planned: int
    protocol: int
    sent: int = 0
    last_sent: int | None = None
    arrived: int = 0
    last: Result | None = None

    def interrupted(self, elapsed: float) -> str:
        if self.planned:
            sent = f"sent {self.sent} of {self.planned} events"
            if self.last_sent is not None:
                sent += f" (last {self.event}({self.last_sent}))"
        else:
            sent = "standing by (sends nothing)"
        arrived = f"{self.arrived} result{'' if self.arrived == 1 else 's'} arrived"
        if self.last is not None:
            arrived += f" (last {self.last.event_name}({self.last.number})"
            if self.protocol == 2:
                arrived += f", delivery {self.last.delivery_id}"
            arrived += ")"
        return f"interrupted after {elapsed:.2f}s: {sent}, {arrived}"


class _Run:
    """One CLI run: sends the numbers, prints what arrives, and keeps count of what is missing."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.standby = args.start == 0 and args.end == 0
        self.numbers = [] if self.standby else list(range(args.start, args.end + 1))
        self.outstanding = set(self.numbers)  # numbers whose result (or refusal) has not arrived
        self.unanswered = 0  # results carrying an error, and final refusals
        self.seq_number: dict[int, int] = {}
        self.lost: list[int] = []
        self.all_sent = False
        self.finished = trio.Event()
        self.tally = _Tally(args.event, len(self.numbers), args.protocol)

    def settle(self, number: int) -> None:
        self.outstanding.discard(number)
        if self.all_sent and not self.outstanding:
            self.finished.set()

    def on_event(self, notice: Notice) -> None:
        args, out, err = self.args, self.out, self.err
        if isinstance(notice, Refused):
            if notice.will_retry:
                if args.verbose:
                    print(
                        f"{notice.event_name}({notice.number}) not accepted ({notice.code.name}), resending",
                        file=err,
                    )
                return
            print(
                f"{notice.event_name}({notice.number}) refused: {notice.code.name}: {notice.message}",
                file=out,
                flush=True,
            )
            if notice.number in self.outstanding:
                self.unanswered += 1
            self.settle(notice.number)
        elif isinstance(notice, Gap):
            print(
                f"results {notice.first}..{notice.last} aged out on the server and are lost",
                file=out,
                flush=True,
            )
            for seq in notice.lost_seqs:
                if seq in self.seq_number:
                    self.lost.append(self.seq_number[seq])
                    self.settle(self.seq_number[seq])
        elif args.verbose and isinstance(notice, Connected | Disconnected):
            print(f"[{notice}]", file=err, flush=True)

    async def sender(self, client: NimbusClient) -> None:
        args, tally = self.args, self.tally
        begun = trio.current_time()
        for i, n in enumerate(self.numbers):
            if args.rate:
                await trio.sleep_until(begun + i / args.rate)
            self.seq_number[await client.send(args.event, n)] = n
            tally.sent += 1
            tally.last_sent = n
        self.all_sent = True
        # Everything may have settled before the last send() returned.
        if self.numbers and not self.outstanding:
            self.finished.set()

    async def printer(self, client: NimbusClient) -> None:
        args, out, tally = self.args, self.out, self.tally
        async for r in client.results():
            tally.arrived += 1
            tally.last = r
            # Protocol 2: a result without a seq answers an event of an earlier session.
            mine = args.protocol == 1 or r.seq is not None
            print(format_result(r, protocol=args.protocol, mine=mine), file=out, flush=True)
            if args.trace:
                for line in format_trace(r.log):
                    print(line, file=out, flush=True)
            if mine:
                if r.error is not None and r.number in self.outstanding:
                    self.unanswered += 1
                self.settle(r.number)

    async def session(self, client: NimbusClient) -> None:
        # Done is decided by `finished`, not by the results loop: the last event to settle may
        # be a refusal (a notice), after which no result will ever come.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sender, client)
            nursery.start_soon(self.printer, client)
            await self.finished.wait()  # standby: never set; Ctrl-C or a failure ends it
            nursery.cancel_scope.cancel()

    def outcome(self, timed_out: bool, started: float) -> int:
        """The last line (on err) and the exit code of a run that was not interrupted."""
        args, numbers = self.args, self.numbers
        if timed_out or self.outstanding or self.lost:
            missing = sorted(self.outstanding | set(self.lost))
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            why = f"timed out after {args.timeout:g}s" if timed_out else "results were lost"
            print(
                f"{why}: {len(missing)} of {len(numbers)} results missing ({args.event} {shown})",
                file=self.err,
            )
            return EXIT_MISSING
        if numbers:
            errors = f" ({self.unanswered} with an error)" if self.unanswered else ""
            elapsed = trio.current_time() - started
            print(f"all {len(numbers)} answered{errors} in {elapsed:.2f}s", file=self.err)
        return EXIT_OK


async def _not_grpc(targets: Sequence[str], ssl: _ssl.SSLContext | None) -> str | None:
    """Why a target that answers is not a gRPC server (each checked at once, concurrently);
    one that cannot be reached is left to the client, which tries the others."""
    verdicts: dict[str, str | None] = {}

    async def check(target: str) -> None:
        with contextlib.suppress(ConnectionFailed):
            verdicts[target] = await check_target(target, ssl=ssl)

    async with trio.open_nursery() as nursery:
        for target in targets:
            nursery.start_soon(check, target)
    return next((v for v in verdicts.values() if v), None)


def _failed(exc: BaseException, err: TextIO) -> int:
    """The exit code of a run the client library ended with an error; re-raises any other."""
    leaf = _leaf(exc)
    if isinstance(leaf, ConnectionFailed | StreamRefused):
        print(str(leaf), file=err)
        return EXIT_UNREACHABLE if isinstance(leaf, ConnectionFailed) else EXIT_REFUSED
    if isinstance(leaf, NimbusError):
        print(str(leaf), file=err)
        return EXIT_MISSING
    raise exc


async def _cli(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    run = _Run(args, out, err)
    interrupted = False
    started = trio.current_time()
    main_scope = trio.CancelScope()
    timeout_scope = trio.CancelScope(deadline=math.inf if run.standby else started + args.timeout)
    ssl = _client_ssl(args.tls)

    async def watch_sigint() -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                if interrupted:  # a second Ctrl-C: do not wait for the final ack
                    elapsed = trio.current_time() - started
                    print(run.tally.interrupted(elapsed), file=err, flush=True)
                    os._exit(EXIT_INTERRUPTED)
                interrupted = True
                main_scope.cancel()

    async with trio.open_nursery() as top:
        top.start_soon(watch_sigint)
        try:
            with main_scope, timeout_scope:
                why = await _not_grpc(args.target, ssl)
                if why is not None:
                    print(why, file=err)
                    return EXIT_UNREACHABLE
                async with trio_asyncio.open_loop():
                    async with open_client(
                        args.target,
                        args.client_id,
                        protocol=args.protocol,
                        connect_timeout=0,
                        on_event=run.on_event,
                        token=args.token,
                        ssl=ssl,
                    ) as client:
                        await run.session(client)
        except BaseException as exc:
            return _failed(exc, err)
        finally:
            top.cancel_scope.cancel()

    if interrupted:
        print(run.tally.interrupted(trio.current_time() - started), file=err, flush=True)
        return EXIT_INTERRUPTED
    return run.outcome(timeout_scope.cancelled_caught, started)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logger.remove()
    if args.verbose:
        logger.add(sys.stderr, level="DEBUG")
    try:
        return trio.run(_cli, args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:  # a Ctrl-C outside the CLI's own handling (start-up, shutdown)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
