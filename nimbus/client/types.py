"""Types, errors and small pure helpers of the Nimbus client (re-exported by `nimbus.client`)."""

from __future__ import annotations

import dataclasses
import enum
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeAlias

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from nimbus.proto_gen.nimbus import (
    ErrorCode,
    EventError,
    LogEntry,
)
from nimbus.wire import messages as wire

# On the wire: upb classes (see "Wire messages" in nimbus/client/runtime.py).
EventRequest: TypeAlias = wire.EventRequest
EventResponse: TypeAlias = wire.EventResponse

if TYPE_CHECKING:
    pass


METHOD: Final = "/nimbus.NimbusService/ProcessEvent"
DEFAULT_PORT: Final = 50051
PROTOCOL_KEY: Final = "nimbus-protocol"
RESENT_MEMORY: Final = 100_000  # resent events remembered for dropping their second results
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1

# ---------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------


class Result:
    """One result, as handed to the application (immutable).

    `delivery_id` is 0 under protocol 1. `error` is set when the server could not compute the
    result (e.g. OUT_OF_RANGE); `result` is then meaningless. `seq` is the value `send()` returned
    for the event this result answers, when this client saw its RECEIPT (None for results of
    events sent by an earlier process with the same client id, and under protocol 1). `log` is
    the result's trace, decoded (into betterproto's `LogEntry`) on first access.
    """

    __slots__ = (
        "delivery_id",
        "event_name",
        "number",
        "result",
        "error",
        "seq",
        "_log",
        "_log_wire",
    )

    delivery_id: int
    event_name: str
    number: int
    result: int
    error: EventError | None
    seq: int | None
    _log: LogEntry | None
    _log_wire: wire.LogEntry | None

    def __init__(
        self,
        delivery_id: int,
        event_name: str,
        number: int,
        result: int,
        error: EventError | None = None,
        log: LogEntry | None = None,
        seq: int | None = None,
        *,
        _log_wire: wire.LogEntry | None = None,
    ) -> None:
        init = object.__setattr__
        init(self, "delivery_id", delivery_id)
        init(self, "event_name", event_name)
        init(self, "number", number)
        init(self, "result", result)
        init(self, "error", error)
        init(self, "seq", seq)
        init(self, "_log", log)
        init(self, "_log_wire", _log_wire)

    @property
    def log(self) -> LogEntry | None:
        if self._log is None and self._log_wire is not None:
            object.__setattr__(self, "_log", LogEntry().parse(self._log_wire.SerializeToString()))
            object.__setattr__(self, "_log_wire", None)
        return self._log

    def trace(self) -> list[tuple[str, float]]:
        """The trace's steps as ("service/method", wall-clock seconds), read from the wire form
        without decoding `log` (betterproto's decode costs ~1 ms per result; this ~10 µs)."""
        if self._log_wire is not None:
            return [
                (
                    f"{st.service_name}/{st.method_name}",
                    st.timestamp.seconds + st.timestamp.nanos / 1e9,
                )
                for st in self._log_wire.steps
            ]
        if self._log is not None:
            return [
                (f"{st.service_name}/{st.method_name}", st.timestamp.timestamp())
                for st in self._log.steps
            ]
        return []

    @property
    def ok(self) -> bool:
        return self.error is None

    def _key(self) -> tuple[object, ...]:
        return (
            self.delivery_id,
            self.event_name,
            self.number,
            self.result,
            self.error,
            self.log,
            self.seq,
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Result)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.delivery_id, self.event_name, self.number, self.result, self.seq))

    def __repr__(self) -> str:
        return (
            f"Result(delivery_id={self.delivery_id!r}, event_name={self.event_name!r}, number={self.number!r},"
            f" result={self.result!r}, error={self.error!r}, log={self.log!r}, seq={self.seq!r})"
        )


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (all monotonic)."""

    sent: int = 0  # events accepted by send()
    receipted: int = 0  # RECEIPTs received (protocol 2)
    results: int = 0  # results put in the results buffer (each delivery id once)
    duplicates_dropped: int = 0  # redeliveries dropped (delivery id <= highest received)
    resend_duplicates_dropped: int = 0  # second results of a resent event (same seq), dropped
    reconnects: int = 0  # streams opened after the first one
    errors: int = 0  # ERROR responses plus results carrying an error
    refused: int = 0  # events refused for good (no result will come): a subset of errors
    retries: int = 0  # events refused with UNAVAILABLE and scheduled for a retry
    resent: int = 0  # events retransmitted on a new stream because their receipt never came
    gaps: int = 0  # GAP responses (results aged out on the server)
    skipped: int = 0  # receipted results overtaken by a higher delivery id (server broke order)
    acks_sent: int = 0
    unexpected: int = 0  # receipts/errors for unknown seqs, responses of unknown kind

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# Notices: what `on_event` receives. Called synchronously from the client's own tasks: keep the
# callback short and non-blocking; an exception raised by it tears the client down.


@dataclass(frozen=True, slots=True)
class Connected:
    target: str
    reconnect: bool  # False for the client's first stream


@dataclass(frozen=True, slots=True)
class Disconnected:
    target: str
    reason: str
    will_reconnect: bool


@dataclass(frozen=True, slots=True)
class Receipted:
    seq: int
    delivery_id: int
    event_name: str
    number: int


@dataclass(frozen=True, slots=True)
class Refused:
    seq: int
    event_name: str
    number: int
    code: ErrorCode
    message: str
    will_retry: bool  # UNAVAILABLE: the library resends it; otherwise no result will come


@dataclass(frozen=True, slots=True)
class _Skip:
    """A result not for the application (a resent event's second result), consumed in order."""

    delivery_id: int


@dataclass(frozen=True, slots=True)
class Gap:
    """Results `first`..`last` aged out on the server; `lost_seqs` are this client's events among them."""

    first: int
    last: int
    lost_seqs: tuple[int, ...] = ()


Notice = Connected | Disconnected | Receipted | Refused | Gap


class NimbusError(Exception):
    """Base of the errors this module raises."""


class ClientClosed(NimbusError):
    """The client was closed (`aclose()`), so it cannot send any more."""


class ConnectionFailed(NimbusError):
    """No stream could be opened (or one was lost with `reconnect=False`)."""

    def __init__(self, errors: dict[str, str], *, lost: bool = False) -> None:
        self.errors = dict(errors)
        if lost:
            what = "lost the stream to Nimbus at"
        else:
            what = "cannot reach Nimbus at"
        if len(errors) == 1:
            ((target, why),) = errors.items()
            text = f"{what} {target}: {why}"
        else:
            text = f"{what} " + ", ".join(f"{t} ({why})" for t, why in errors.items())
        super().__init__(text)


class StreamRefused(NimbusError):
    """The server ended the stream with a status that reconnecting cannot fix."""

    def __init__(self, target: str, status: Status, message: str | None) -> None:
        self.target = target
        self.status = status
        self.message = message or ""
        super().__init__(
            f"Nimbus at {target} refused the stream: {status.name}"
            + (f": {self.message}" if self.message else "")
        )


class Superseded(StreamRefused):
    """Another stream with the same client_id took over; this client must not reconnect."""

    def __init__(self, target: str, status: Status, message: str | None) -> None:
        super().__init__(target, status, message)
        self.args = (
            f"another stream with this client_id took over at Nimbus {target}"
            f" ({status.name}: {self.message or 'superseded'})",
        )


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def parse_target(target: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = target.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {target!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _metadata_value_ok(value: str) -> bool:
    """gRPC metadata values are printable ASCII (0x20-0x7E); grpclib refuses anything else."""
    return bool(value) and value.isascii() and value.isprintable()


def backoff_delay(attempt: int, base: float, cap: float, rand: float) -> float:
    """Delay before reconnect attempt `attempt` (0-based): exponential, capped, 'equal jitter'.

    Half the delay is fixed so a flapping server is not hammered, half is random (`rand` in
    [0, 1)) so a fleet of clients cut at the same instant does not come back in lockstep.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling / 2 + ceiling / 2 * rand


class StreamEnd(enum.Enum):
    RECONNECT = "reconnect"
    SUPERSEDED = "superseded"
    REFUSED = "refused"


# Statuses that say "this request is wrong", not "this server is unwell": retrying the same stream
# elsewhere cannot succeed, so the client stops and reports.
_FATAL_STATUSES: Final = frozenset(
    {
        Status.INVALID_ARGUMENT,
        Status.UNAUTHENTICATED,
        Status.PERMISSION_DENIED,
        Status.UNIMPLEMENTED,
        Status.NOT_FOUND,
        Status.FAILED_PRECONDITION,
    }
)


def classify_stream_end(status: Status | None, message: str | None) -> StreamEnd:
    """What to do when a stream ended with gRPC `status` (None: transport failure or clean end)."""
    if status is None or status is Status.OK:
        return StreamEnd.RECONNECT
    if status is Status.ABORTED and "supersed" in (message or "").lower():
        return StreamEnd.SUPERSEDED
    if status in _FATAL_STATUSES:
        return StreamEnd.REFUSED
    return StreamEnd.RECONNECT


def describe_error(exc: BaseException | None) -> str:
    """A short human reason for a failed or ended stream ('connection refused', ...)."""
    if exc is None:
        return "the server ended the stream"
    if isinstance(exc, GRPCError):
        return f"{exc.status.name}" + (f": {exc.message}" if exc.message else "")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, StreamTerminatedError):
        return f"stream terminated ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None
