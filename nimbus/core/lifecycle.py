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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


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


def new_record(client_id: str) -> ClientRecord:
    return ClientRecord(client_id=client_id)


def connect(rec: ClientRecord, pod: str) -> tuple[ClientRecord, ConnectResult]:
    """A stream opened on `pod`. The newest stream wins: the previous one is to be closed."""
    previous_pod = rec.pod if rec.status is not Status.OFFLINE else ""
    status = Status.REPLAYING if rec.backlog else Status.LIVE
    new = replace(rec, status=status, pod=pod, epoch=rec.epoch + 1)
    return new, ConnectResult(new.epoch, status, previous_pod, rec.epoch)


def disconnect(rec: ClientRecord, epoch: int) -> tuple[ClientRecord, bool]:
    """The stream with `epoch` ended. A stale epoch (a newer stream exists) changes nothing."""
    if rec.epoch != epoch or rec.status is Status.OFFLINE:
        return rec, False
    return replace(rec, status=Status.OFFLINE, pod=""), True


def route(rec: ClientRecord, delivery_id: int) -> tuple[ClientRecord, RouteDecision]:
    if delivery_id <= rec.acked:
        return rec, RouteDecision(Route.DROP)
    if rec.status is Status.LIVE:
        return rec, RouteDecision(Route.LIVE, rec.pod, rec.epoch)
    return replace(rec, routed_dlq=max(rec.routed_dlq, delivery_id)), RouteDecision(Route.DLQ)


def divert(rec: ClientRecord, delivery_id: int) -> ClientRecord:
    """A live delivery failed; the result goes to the DLQ, so the client needs a replay."""
    if delivery_id <= rec.acked:
        return rec
    status = Status.REPLAYING if rec.status is Status.LIVE else rec.status
    return replace(rec, status=status, routed_dlq=max(rec.routed_dlq, delivery_id))


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
    """The per-client Triple Lag Check: REPLAYING with every result sent towards the DLQ acked.
    `ack` reports it so the status manager is asked at once (not when the replay next looks)."""
    return rec.status is Status.REPLAYING and not rec.backlog


def try_flip(rec: ClientRecord) -> tuple[ClientRecord, bool]:
    if flip_ready(rec):
        return replace(rec, status=Status.LIVE), True
    return rec, False
