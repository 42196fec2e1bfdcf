"""The client lifecycle: every state transition of a client's record, and nothing else.

Rule 1 (after h11's `_state.py`): everything that changes a `ClientRecord` lives in this file.
The in-memory state store calls these functions directly; the Redis state store runs Lua scripts
that implement exactly this table (`nimbus/engines/redis_scripts.py`), and the state-store
contract tests run the same cases against both.

States: OFFLINE (no stream), REPLAYING (a stream, and results waiting in the DLQ), LIVE (a stream,
nothing waiting). Delivery ids are per client and strictly increasing (the originating event's
offset in the events topic + 1, the partition being fixed by the client id).

Fields:
- epoch: increases on every connect; a pod only delivers to a stream whose epoch matches.
- acked: the highest delivery id the client has received (cumulative).
- routed_dlq: the highest delivery id sent towards the DLQ. It is raised *when the decision is
  made*, before the DLQ write, which is what makes the flip to LIVE safe (hole 4).
- dlq_written: the highest delivery id whose DLQ write is acknowledged.
- cursor: the DLQ offset from which this client's replay scans; every record of this client
  below it is already acked.

The flip REPLAYING -> LIVE succeeds only when acked >= routed_dlq: every result ever sent towards
the DLQ for this client has reached it. That is the per-client form of the Triple Lag Check:
nothing of this client is lagging in the results topic (the router would have raised
routed_dlq), in flight to the DLQ, or unacknowledged in the DLQ.

The status moves are one table, `TRANSITIONS`: (status, event) -> the transitions that event may
make, each a guard and a next status; the first whose guard holds is taken, and none means the
event changes nothing. The functions below look their move up there and change the other fields
only when a transition is taken. The guards are plain data (a comparison of a field with a field
or with the event's argument), so the Redis scripts render the same table into Lua. ack,
dlq_written and advance_cursor only raise counters, the same way in every status: not in the table.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple


class Status(enum.StrEnum):
    OFFLINE = "OFFLINE"
    REPLAYING = "REPLAYING"
    LIVE = "LIVE"


class Route(enum.StrEnum):
    DROP = "DROP"  # the client has it already
    LIVE = "LIVE"  # publish to the client's pod, fenced by epoch
    DLQ = "DLQ"  # append to the DLQ; the replay delivers it


@dataclass(frozen=True, slots=True)
class ClientRecord:
    client_id: str
    status: Status = Status.OFFLINE
    pod: str = ""
    epoch: int = 0
    acked: int = 0
    routed_dlq: int = 0
    dlq_written: int = 0
    cursor: int = -1

    @property
    def backlog(self) -> bool:
        return self.routed_dlq > self.acked


@dataclass(frozen=True, slots=True)
class ConnectResult:
    epoch: int
    status: Status
    previous_pod: str  # pod of the stream this connect replaces ("" if none)
    previous_epoch: int


@dataclass(frozen=True, slots=True)
class RouteDecision:
    route: Route
    pod: str = ""
    epoch: int = 0


class Event(enum.StrEnum):
    """What happens to a client; the values name the functions below (and the Redis scripts)."""

    CONNECT = "connect"  # a stream opened
    DISCONNECT = "disconnect"  # a stream ended (argument: its epoch)
    ROUTE = "route"  # a result is to be delivered (argument: its delivery id)
    DIVERT = "divert"  # a live delivery failed (argument: its delivery id)
    FLIP = "try_flip"  # the replay asks to go live


ARG = "arg"  # in a guard: the event's argument instead of a record field

_OPS: dict[str, Callable[[int, int], bool]] = {
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class Guard:
    """`left op right`, each side an integer field of the record or the event's argument (ARG).
    `holds(rec, arg)` evaluates it (built once: guards run on every routed result)."""

    name: str
    left: str
    op: str  # a key of _OPS
    right: str
    holds: Callable[[ClientRecord, int], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        op = _OPS[self.op]
        if self.right == ARG:
            get = operator.attrgetter(self.left)

            def check(rec: ClientRecord, arg: int) -> bool:
                return op(get(rec), arg)

        elif self.left == ARG:
            get = operator.attrgetter(self.right)

            def check(rec: ClientRecord, arg: int) -> bool:
                return op(arg, get(rec))

        else:
            left, right = operator.attrgetter(self.left), operator.attrgetter(self.right)

            def check(rec: ClientRecord, arg: int) -> bool:
                return op(left(rec), right(rec))

        object.__setattr__(self, "holds", check)


class Transition(NamedTuple):
    guard: Guard | None  # None: always taken
    to: Status


BACKLOG = Guard("backlog", "routed_dlq", ">", "acked")  # results sent towards the DLQ, not acked
CAUGHT_UP = Guard("caught_up", "routed_dlq", "<=", "acked")  # the Triple Lag Check (hole 4)
CURRENT = Guard("current", "epoch", "==", ARG)  # the stream that ended is the newest (hole 8)
UNSEEN = Guard("unseen", "acked", "<", ARG)  # the client has not received this delivery

# Module-level names: on Python 3.11 reading an enum member off its class costs ~0.2 us.
_OFF, _REP, _LIVE = Status.OFFLINE, Status.REPLAYING, Status.LIVE
_CONNECT, _DISCONNECT, _ROUTE, _DIVERT, _FLIP = Event
_T = Transition

TRANSITIONS: dict[tuple[Status, Event], tuple[Transition, ...]] = {
    # The newest stream wins, in any status; a backlog is replayed before the client goes live.
    (_OFF, _CONNECT): (_T(BACKLOG, _REP), _T(None, _LIVE)),
    (_REP, _CONNECT): (_T(BACKLOG, _REP), _T(None, _LIVE)),
    (_LIVE, _CONNECT): (_T(BACKLOG, _REP), _T(None, _LIVE)),
    # Only the end of the current stream counts: a stale one changes nothing.
    (_OFF, _DISCONNECT): (),
    (_REP, _DISCONNECT): (_T(CURRENT, _OFF),),
    (_LIVE, _DISCONNECT): (_T(CURRENT, _OFF),),
    # Never a status change: what the client has is dropped, the rest goes the way ROUTES says.
    (_OFF, _ROUTE): (_T(UNSEEN, _OFF),),
    (_REP, _ROUTE): (_T(UNSEEN, _REP),),
    (_LIVE, _ROUTE): (_T(UNSEEN, _LIVE),),
    # A failed live delivery goes to the DLQ, and a live client must replay it (hole 3).
    (_OFF, _DIVERT): (_T(UNSEEN, _OFF),),
    (_REP, _DIVERT): (_T(UNSEEN, _REP),),
    (_LIVE, _DIVERT): (_T(UNSEEN, _REP),),
    # REPLAYING -> LIVE once every result sent towards the DLQ is acked.
    (_OFF, _FLIP): (),
    (_REP, _FLIP): (_T(CAUGHT_UP, _LIVE),),
    (_LIVE, _FLIP): (),
}

# Where a result the client has not received goes, by status (a DLQ route raises routed_dlq).
ROUTES: dict[Status, Route] = {_OFF: Route.DLQ, _REP: Route.DLQ, _LIVE: Route.LIVE}
_DROP, _TO_LIVE, _TO_DLQ = Route.DROP, Route.LIVE, Route.DLQ


def transition(rec: ClientRecord, event: Event, arg: int = 0) -> Transition | None:
    """The transition `event` (with argument `arg`) takes from `rec`'s status, None if none."""
    for t in TRANSITIONS[rec.status, event]:
        if t.guard is None or t.guard.holds(rec, arg):
            return t
    return None


def new_record(client_id: str) -> ClientRecord:
    return ClientRecord(client_id=client_id)


def connect(rec: ClientRecord, pod: str) -> tuple[ClientRecord, ConnectResult]:
    """A stream opened on `pod`. The newest stream wins: the previous one is to be closed."""
    t = transition(rec, _CONNECT)
    assert t is not None  # every status's connect ends with an unguarded transition
    previous_pod = rec.pod if rec.status is not _OFF else ""
    new = replace(rec, status=t.to, pod=pod, epoch=rec.epoch + 1)
    return new, ConnectResult(new.epoch, t.to, previous_pod, rec.epoch)


def disconnect(rec: ClientRecord, epoch: int) -> tuple[ClientRecord, bool]:
    """The stream with `epoch` ended. A stale epoch (a newer stream exists) changes nothing."""
    t = transition(rec, _DISCONNECT, epoch)
    if t is None:
        return rec, False
    return replace(rec, status=t.to, pod=""), True


def route(rec: ClientRecord, delivery_id: int) -> tuple[ClientRecord, RouteDecision]:
    if transition(rec, _ROUTE, delivery_id) is None:
        return rec, RouteDecision(_DROP)
    if ROUTES[rec.status] is _TO_LIVE:
        return rec, RouteDecision(_TO_LIVE, rec.pod, rec.epoch)
    return replace(rec, routed_dlq=max(rec.routed_dlq, delivery_id)), RouteDecision(_TO_DLQ)


def divert(rec: ClientRecord, delivery_id: int) -> ClientRecord:
    """A live delivery failed; the result goes to the DLQ, so the client needs a replay."""
    t = transition(rec, _DIVERT, delivery_id)
    if t is None:
        return rec
    return replace(rec, status=t.to, routed_dlq=max(rec.routed_dlq, delivery_id))


def dlq_written(rec: ClientRecord, delivery_id: int, offset: int) -> ClientRecord:
    """A DLQ write landed at `offset`. With nothing older unacked, the cursor can jump to it."""
    cursor = max(rec.cursor, offset) if rec.acked >= rec.dlq_written else rec.cursor
    if cursor < 0:
        cursor = offset
    return replace(rec, cursor=cursor, dlq_written=max(rec.dlq_written, delivery_id))


def ack(rec: ClientRecord, acked: int) -> ClientRecord:
    if acked <= rec.acked:
        return rec
    return replace(rec, acked=acked)


def advance_cursor(rec: ClientRecord, offset: int) -> ClientRecord:
    if offset <= rec.cursor:
        return rec
    return replace(rec, cursor=offset)


def flip_ready(rec: ClientRecord) -> bool:
    """Whether `try_flip` would flip now (the per-client Triple Lag Check). `ack` reports it so
    the status manager is asked at once (not when the replay next looks)."""
    return transition(rec, _FLIP) is not None


def try_flip(rec: ClientRecord) -> tuple[ClientRecord, bool]:
    t = transition(rec, _FLIP)
    if t is None:
        return rec, False
    return replace(rec, status=t.to), True
