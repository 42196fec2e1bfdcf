"""The result router's in-flight window: which result may be decided, published, diverted,
written to the DLQ or committed next. Pure: no I/O, no clock of its own (callers pass `now`).

Invariants it keeps, per client (all of a client's results sit on one partition, in order):
- A result is decided only when every earlier result of that client is resolved or is in
  flight live to the same (pod, epoch) as the new decision: a client never has live results in
  flight to two streams, so a failure can divert the failed one and everything after it, in order.
- A result goes to the DLQ only after every earlier result of the client is resolved or is
  already on its way to the DLQ: the DLQ holds a client's results in order (hole 1 and hole 3).
- A failed live delivery is diverted (the state store marks the client REPLAYING) before it is
  written to the DLQ and before any later result of that client is decided.
Per partition, only the prefix of resolved results is committed: nothing unresolved is ever
marked consumed (hole 1), and a restart re-reads and re-routes whatever was in flight.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nimbus.lifecycle import Route, RouteDecision
from nimbus.ports import TopicPartition


class S(enum.Enum):
    UNDECIDED = "undecided"
    DECIDING = "deciding"
    LIVE = "live"  # published to a pod, waiting for its report
    DIVERTING = "diverting"  # live delivery failed; the store must be told before the DLQ write
    DLQ_WAIT = "dlq-wait"
    DLQ_WRITING = "dlq-writing"
    DONE = "done"


@dataclass(eq=False)
class Entry:
    tp: TopicPartition
    offset: int
    client_id: str
    delivery_id: int
    payload: object  # the decoded result; opaque here
    state: S = S.UNDECIDED
    token: int = 0
    pod: str = ""
    epoch: int = 0
    deadline: float = 0.0
    prev: int = 0  # delivery id of the previous unconfirmed live entry of this client, or 0

    def __repr__(self) -> str:
        return f"<Entry {self.client_id}#{self.delivery_id} @{self.tp.partition}:{self.offset} {self.state.value}>"


@dataclass
class _Client:
    queue: deque[Entry] = field(default_factory=deque)
    # Set when a LIVE decision conflicted with results in flight to another stream: wait for
    # those to resolve before asking again.
    wait_inflight: bool = False


class RouterWindow:
    def __init__(self, delivery_timeout: float) -> None:
        self.delivery_timeout = delivery_timeout
        self._partitions: dict[TopicPartition, deque[Entry]] = {}
        self._clients: dict[str, _Client] = {}
        self._by_token: dict[int, Entry] = {}
        self._tokens = itertools.count(1)
        self._to_publish: list[Entry] = []
        self._committed: dict[TopicPartition, int] = {}
        self.pending = 0  # entries not DONE

    def __repr__(self) -> str:
        return (
            f"<RouterWindow pending={self.pending} clients={len(self._clients)} "
            f"inflight={len(self._by_token)}>"
        )

    # -- input -----------------------------------------------------------------------------

    def add(self, tp: TopicPartition, offset: int, client_id: str, delivery_id: int, payload: object) -> Entry:
        e = Entry(tp, offset, client_id, delivery_id, payload)
        self._partitions.setdefault(tp, deque()).append(e)
        self._clients.setdefault(client_id, _Client()).queue.append(e)
        self.pending += 1
        return e

    def add_skipped(self, tp: TopicPartition, offset: int) -> None:
        """A record that carries no result (malformed): resolved at once, only for the commit."""
        e = Entry(tp, offset, "", 0, None, S.DONE)
        self._partitions.setdefault(tp, deque()).append(e)

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions taken away: forget them; their new owner re-reads from the commit."""
        for tp in tps:
            for e in self._partitions.pop(tp, ()):
                if e.state is not S.DONE:
                    self.pending -= 1
                    e.state = S.DONE
                self._by_token.pop(e.token, None)
            self._committed.pop(tp, None)
        self._to_publish = [e for e in self._to_publish if e.state is S.LIVE]
        for cid in [c for c, cl in self._clients.items() if self._prune(cl)]:
            del self._clients[cid]

    # -- deciding ----------------------------------------------------------------------------

    @staticmethod
    def _prune(cl: _Client) -> bool:
        while cl.queue and cl.queue[0].state is S.DONE:
            cl.queue.popleft()
        return not cl.queue

    def decidable(self) -> list[Entry]:
        """Entries to ask the store about now, in order per client; they become DECIDING."""
        out: list[Entry] = []
        for cl in self._clients.values():
            if cl.wait_inflight:
                continue
            started = False
            for e in cl.queue:
                if e.state is S.DONE or (e.state is S.LIVE and not started):
                    continue
                if e.state is S.UNDECIDED:
                    started = True
                    e.state = S.DECIDING
                    out.append(e)
                    continue
                break
        return out

    def undecide(self, entries: Iterable[Entry]) -> None:
        """The store call failed: ask again later."""
        for e in entries:
            if e.state is S.DECIDING:
                e.state = S.UNDECIDED

    def apply(self, entries: list[Entry], decisions: list[RouteDecision], now: float) -> None:
        reverted: set[str] = set()
        for e, d in zip(entries, decisions, strict=True):
            if e.state is not S.DECIDING:
                continue  # revoked meanwhile
            cl = self._clients[e.client_id]
            if e.client_id in reverted:
                e.state = S.UNDECIDED  # decided after an entry that must be asked again
            elif d.route is Route.DROP:
                self._resolve(e)
            elif d.route is Route.DLQ:
                e.state = S.DLQ_WAIT
            elif any(x.state is S.LIVE and (x.pod, x.epoch) != (d.pod, d.epoch) for x in cl.queue):
                # Live to a new stream while results are in flight to the old one: wait for
                # those to resolve (a failure diverts them and the client replays first).
                e.state = S.UNDECIDED
                cl.wait_inflight = True
                reverted.add(e.client_id)
            else:
                before = [x for x in cl.queue if x.state is S.LIVE and x.offset < e.offset]
                e.prev = before[-1].delivery_id if before else 0
                e.state = S.LIVE
                e.pod, e.epoch = d.pod, d.epoch
                e.token = next(self._tokens)
                e.deadline = now + self.delivery_timeout
                self._by_token[e.token] = e
                self._to_publish.append(e)

    def take_publish(self) -> list[Entry]:
        out, self._to_publish = [e for e in self._to_publish if e.state is S.LIVE], []
        return out

    # -- delivery reports ----------------------------------------------------------------------

    def report(self, token: int, delivered: bool) -> None:
        e = self._by_token.get(token)
        if e is None or e.state is not S.LIVE:
            return  # late, duplicate, or already diverted after a timeout
        if delivered:
            del self._by_token[token]
            self._resolve(e)
        else:
            self._fail(e)

    def expire(self, now: float) -> int:
        """Live deliveries past their deadline (a dead pod, a lost message) fail."""
        expired = [e for e in self._by_token.values() if e.state is S.LIVE and e.deadline <= now]
        for e in sorted(expired, key=lambda x: x.offset):
            if e.state is S.LIVE:
                self._fail(e)
        return len(expired)

    def _fail(self, e: Entry) -> None:
        """Divert `e` and every later live result of its client: they went to the same stream."""
        cl = self._clients[e.client_id]
        for x in cl.queue:
            if x.state is S.LIVE and x.offset >= e.offset:
                self._by_token.pop(x.token, None)
                x.state = S.DIVERTING
        if not any(x.state is S.LIVE for x in cl.queue):
            cl.wait_inflight = False

    def pending_diverts(self) -> list[Entry]:
        return [e for cl in self._clients.values() for e in cl.queue if e.state is S.DIVERTING]

    def diverted(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.state is S.DIVERTING:
                e.state = S.DLQ_WAIT

    # -- DLQ writes --------------------------------------------------------------------------

    def take_dlq_writes(self) -> list[Entry]:
        """Per client, the run of DLQ_WAIT entries with nothing unresolved before them but
        entries already being written; they become DLQ_WRITING. Order within a client kept."""
        out: list[Entry] = []
        for cl in self._clients.values():
            for e in cl.queue:
                if e.state in (S.DONE, S.DLQ_WRITING):
                    continue
                if e.state is S.DLQ_WAIT:
                    e.state = S.DLQ_WRITING
                    out.append(e)
                    continue
                break
        return out

    def dlq_failed(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.state is S.DLQ_WRITING:
                e.state = S.DLQ_WAIT

    def dlq_done(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.state is S.DLQ_WRITING:
                self._resolve(e)

    # -- resolution and commits ------------------------------------------------------------------

    def _resolve(self, e: Entry) -> None:
        e.state = S.DONE
        self.pending -= 1
        cl = self._clients.get(e.client_id)
        if cl is None:
            return
        if not any(x.state is S.LIVE for x in cl.queue):
            cl.wait_inflight = False
        if self._prune(cl):
            del self._clients[e.client_id]

    def commits(self) -> dict[TopicPartition, int]:
        """The next offset to commit for each partition whose resolved prefix grew."""
        out: dict[TopicPartition, int] = {}
        for tp, q in self._partitions.items():
            last = None
            while q and q[0].state is S.DONE:
                last = q.popleft().offset
            if last is not None:
                out[tp] = last + 1
                self._committed[tp] = last + 1
        return out

    def state_of(self, client_id: str) -> list[tuple[int, S]]:
        """(delivery_id, state) of a client's unresolved entries, for tests and the admin view."""
        cl = self._clients.get(client_id)
        return [(e.delivery_id, e.state) for e in cl.queue] if cl else []
