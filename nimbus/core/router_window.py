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

An entry's state changes only in `RouterWindow._move`, which refuses a move that `MOVES` does not
list: a result can reach DONE only by being dropped, delivered or written to the DLQ.

The results topic is an at-least-once log (an event consumer killed between its write and its
commit writes the same results again): `add` skips a result whose delivery id is not above the
highest one taken for its client, so a repeat is never routed twice by one window. The highest
ids are kept for the `TAKEN_MAX` clients seen last; past that, a repeat is routed again and
every later stage still takes it at most once (the store drops what is acked, the pod what it
queued, the replay what it took), so the bound costs work, never correctness.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from nimbus.core.lifecycle import Route, RouteDecision
from nimbus.ports import TopicPartition

TAKEN_MAX = 100_000  # clients whose highest taken delivery id a window remembers


class S(enum.Enum):
    UNDECIDED = "undecided"
    DECIDING = "deciding"
    LIVE = "live"  # published to a pod, waiting for its report
    DIVERTING = "diverting"  # live delivery failed; the store must be told before the DLQ write
    DLQ_WAIT = "dlq-wait"
    DLQ_WRITING = "dlq-writing"
    DONE = "done"
    REVOKED = "revoked"  # its partition was taken away: forgotten, the new owner re-reads it

    # Every move hashes states (MOVES, the clients' counts): Enum's own hash is Python code.
    __hash__ = object.__hash__


# Every move an entry may make. Made by: decidable (-> DECIDING); apply (-> DLQ_WAIT, LIVE, or
# DONE for a drop, or back to UNDECIDED behind an entry asked again), undecide (-> UNDECIDED);
# report (LIVE -> DONE or DIVERTING), expire (-> DIVERTING); diverted (-> DLQ_WAIT);
# take_dlq_writes (-> DLQ_WRITING), dlq_failed (-> DLQ_WAIT), dlq_done (-> DONE); revoke (any
# unresolved state -> REVOKED).
MOVES: dict[S, frozenset[S]] = {
    S.UNDECIDED: frozenset({S.DECIDING, S.REVOKED}),
    S.DECIDING: frozenset({S.DLQ_WAIT, S.LIVE, S.DONE, S.UNDECIDED, S.REVOKED}),
    S.LIVE: frozenset({S.DONE, S.DIVERTING, S.REVOKED}),
    S.DIVERTING: frozenset({S.DLQ_WAIT, S.REVOKED}),
    S.DLQ_WAIT: frozenset({S.DLQ_WRITING, S.REVOKED}),
    S.DLQ_WRITING: frozenset({S.DONE, S.DLQ_WAIT, S.REVOKED}),
    S.DONE: frozenset(),
    S.REVOKED: frozenset(),
}


class IllegalMove(Exception):
    """A window entry was asked to make a move `MOVES` does not allow: a bug in the window."""


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
    added: float = 0.0  # when it was read (see RouterWindow.stalled)
    stalled: bool = False  # reported by RouterWindow.stalled

    def __repr__(self) -> str:
        return f"<Entry {self.client_id}#{self.delivery_id} @{self.tp.partition}:{self.offset} {self.state.value}>"


class _Client:
    """A client's unresolved entries, in offset order, and how many are in each state.

    Shape of `queue` (an invariant the transitions keep): resolved or in-flight entries
    (LIVE, DIVERTING, DLQ_WAIT, DLQ_WRITING, DONE) first, then DECIDING, then UNDECIDED. LIVE never
    follows a DLQ state: nothing is decided while a DLQ state is pending.
    """

    __slots__ = ("queue", "undecided", "counts", "wait_inflight", "live_key", "last_live_id")

    def __init__(self) -> None:
        self.queue: deque[Entry] = deque()
        self.undecided: deque[Entry] = deque()
        self.counts: dict[S, int] = dict.fromkeys(S, 0)
        # Set when a LIVE decision conflicted with results in flight to another stream: wait for
        # those to resolve before asking again.
        self.wait_inflight = False
        self.live_key: tuple[str, int] = ("", 0)
        self.last_live_id = 0

    def blocked(self) -> bool:
        c = self.counts
        return self.wait_inflight or bool(
            c[S.DECIDING] or c[S.DIVERTING] or c[S.DLQ_WAIT] or c[S.DLQ_WRITING]
        )


class RouterWindow:
    def __init__(self, delivery_timeout: float) -> None:
        self.delivery_timeout = delivery_timeout
        self._partitions: dict[TopicPartition, deque[Entry]] = {}
        self._clients: dict[str, _Client] = {}
        self._by_token: dict[int, Entry] = {}
        self._tokens = itertools.count(1)
        self._to_publish: list[Entry] = []
        self._deadlines: deque[Entry] = deque()  # LIVE entries in publish order (deadlines rise)
        self._diverting: list[Entry] = []
        self._ready: dict[
            str, None
        ] = {}  # clients that may have something to decide or write (ordered)
        self.pending = 0  # entries not DONE
        # client -> (partition, highest delivery id added), least recently added first
        self._taken: OrderedDict[str, tuple[TopicPartition, int]] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<RouterWindow pending={self.pending} clients={len(self._clients)} "
            f"inflight={len(self._by_token)}>"
        )

    def _move(self, e: Entry, state: S) -> None:
        """The one place an entry's state changes (see MOVES); keeps its client's counts."""
        if state not in MOVES[e.state]:
            raise IllegalMove(f"{e!r} cannot move to {state.value}")
        cl = self._clients.get(e.client_id)
        if cl is not None:
            cl.counts[e.state] -= 1
            cl.counts[state] += 1
        e.state = state

    # -- input -----------------------------------------------------------------------------

    def add(
        self,
        tp: TopicPartition,
        offset: int,
        client_id: str,
        delivery_id: int,
        payload: object,
        now: float = 0.0,
    ) -> Entry | None:
        """A result read at `offset`; None if it repeats one already taken (see the module's
        docstring). A record none of whose results is added needs `add_skipped` for the commit."""
        taken = self._taken.get(client_id)
        if taken is not None and taken[0] == tp and delivery_id <= taken[1]:
            return None
        self._taken[client_id] = (tp, delivery_id)
        self._taken.move_to_end(client_id)
        if len(self._taken) > TAKEN_MAX:
            self._taken.popitem(last=False)
        e = Entry(tp, offset, client_id, delivery_id, payload, added=now)
        self._partitions.setdefault(tp, deque()).append(e)
        cl = self._clients.get(client_id)
        if cl is None:
            cl = self._clients[client_id] = _Client()
        cl.queue.append(e)
        cl.undecided.append(e)
        cl.counts[S.UNDECIDED] += 1
        self._ready.setdefault(client_id, None)
        self.pending += 1
        return e

    def add_skipped(self, tp: TopicPartition, offset: int) -> None:
        """A record that carries no result (malformed): resolved at once, only for the commit."""
        e = Entry(tp, offset, "", 0, None, S.DONE)
        self._partitions.setdefault(tp, deque()).append(e)

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions taken away: forget them; their new owner re-reads from the commit."""
        gone = set(tps)
        for cid in [c for c, (tp, _) in self._taken.items() if tp in gone]:
            del self._taken[cid]
        for tp in gone:
            for e in self._partitions.pop(tp, ()):
                if e.state is not S.DONE:
                    self.pending -= 1
                    self._move(e, S.REVOKED)
                self._by_token.pop(e.token, None)
        for cid in [c for c, cl in self._clients.items() if cl.queue and cl.queue[0].tp in gone]:
            del self._clients[cid]
            self._ready.pop(cid, None)
        self._to_publish = [e for e in self._to_publish if e.state is S.LIVE]
        self._diverting = [e for e in self._diverting if e.state is S.DIVERTING]

    # -- deciding ----------------------------------------------------------------------------

    def decidable(self) -> list[Entry]:
        """Entries to ask the store about now, in order per client; they become DECIDING."""
        out: list[Entry] = []
        for cid in list(self._ready):
            cl = self._clients.get(cid)
            if cl is None or cl.blocked() or not cl.undecided:
                continue
            while cl.undecided:
                e = cl.undecided.popleft()
                if e.state is S.UNDECIDED:
                    self._move(e, S.DECIDING)
                    out.append(e)
        return out

    def undecide(self, entries: Iterable[Entry]) -> None:
        """The store call failed: ask again later."""
        self._revert([e for e in entries if e.state is S.DECIDING])

    def _revert(self, entries: list[Entry]) -> None:
        by_client: dict[str, list[Entry]] = {}
        for e in entries:
            by_client.setdefault(e.client_id, []).append(e)
        for cid, es in by_client.items():
            cl = self._clients[cid]
            for e in es:
                self._move(e, S.UNDECIDED)
            cl.undecided.extendleft(reversed(es))
            self._ready.setdefault(cid, None)

    def apply(self, entries: list[Entry], decisions: list[RouteDecision], now: float) -> None:
        reverted: list[Entry] = []
        reverted_clients: set[str] = set()
        for e, d in zip(entries, decisions, strict=True):
            if e.state is not S.DECIDING:
                continue  # revoked meanwhile
            cl = self._clients[e.client_id]
            if e.client_id in reverted_clients:
                reverted.append(e)  # decided after an entry that must be asked again
            elif d.route is Route.DROP:
                self._resolve(e)
            elif d.route is Route.DLQ:
                self._move(e, S.DLQ_WAIT)
            elif cl.counts[S.LIVE] and cl.live_key != (d.pod, d.epoch):
                # Live to a new stream while results are in flight to the old one: wait for
                # those to resolve (a failure diverts them and the client replays first).
                cl.wait_inflight = True
                reverted_clients.add(e.client_id)
                reverted.append(e)
            else:
                e.prev = cl.last_live_id if cl.counts[S.LIVE] else 0
                self._move(e, S.LIVE)
                cl.live_key = (d.pod, d.epoch)
                cl.last_live_id = e.delivery_id
                e.pod, e.epoch = d.pod, d.epoch
                e.token = next(self._tokens)
                e.deadline = now + self.delivery_timeout
                self._by_token[e.token] = e
                self._deadlines.append(e)
                self._to_publish.append(e)
            self._ready.setdefault(e.client_id, None)
        if reverted:
            self._revert(reverted)

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
        n = 0
        while self._deadlines and (
            self._deadlines[0].state is not S.LIVE or self._deadlines[0].deadline <= now
        ):
            e = self._deadlines.popleft()
            if e.state is S.LIVE:
                n += 1
                self._fail(e)
        return n

    def _fail(self, e: Entry) -> None:
        """Divert `e` and every later live result of its client: they went to the same stream."""
        cl = self._clients[e.client_id]
        for x in cl.queue:
            if x.state is S.LIVE and x.offset >= e.offset:
                self._by_token.pop(x.token, None)
                self._move(x, S.DIVERTING)
                self._diverting.append(x)
        if not cl.counts[S.LIVE]:
            cl.wait_inflight = False
        self._ready.setdefault(e.client_id, None)

    def pending_diverts(self) -> list[Entry]:
        return [e for e in self._diverting if e.state is S.DIVERTING]

    def diverted(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.state is S.DIVERTING:
                self._move(e, S.DLQ_WAIT)
                self._ready.setdefault(e.client_id, None)
        self._diverting = [e for e in self._diverting if e.state is S.DIVERTING]

    # -- DLQ writes --------------------------------------------------------------------------

    def take_dlq_writes(self) -> list[Entry]:
        """Per client, its DLQ_WAIT entries once nothing before them can still go live or be
        diverted (no LIVE, no DIVERTING); they become DLQ_WRITING, in offset order."""
        out: list[Entry] = []
        for cid in list(self._ready):
            cl = self._clients.get(cid)
            if (
                cl is None
                or not cl.counts[S.DLQ_WAIT]
                or cl.counts[S.LIVE]
                or cl.counts[S.DIVERTING]
            ):
                continue
            for e in cl.queue:
                if e.state is S.DLQ_WAIT:
                    self._move(e, S.DLQ_WRITING)
                    out.append(e)
                elif e.state in (S.DECIDING, S.UNDECIDED):
                    break
        return out

    def dlq_failed(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.state is S.DLQ_WRITING:
                self._move(e, S.DLQ_WAIT)
                self._ready.setdefault(e.client_id, None)

    def dlq_done(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.state is S.DLQ_WRITING:
                self._resolve(e)

    # -- resolution and commits ------------------------------------------------------------------

    def _resolve(self, e: Entry) -> None:
        self._move(e, S.DONE)
        self.pending -= 1
        cl = self._clients.get(e.client_id)
        if cl is None:
            return
        if not cl.counts[S.LIVE]:
            cl.wait_inflight = False
        while cl.queue and cl.queue[0].state is S.DONE:
            cl.queue.popleft()
        if not cl.queue:
            del self._clients[e.client_id]
            self._ready.pop(e.client_id, None)
        else:
            self._ready.setdefault(e.client_id, None)

    def settle(self) -> None:
        """Forget clients with nothing left to decide or write (keeps the scans short)."""
        for cid in list(self._ready):
            cl = self._clients.get(cid)
            if cl is None or (not cl.undecided and not cl.counts[S.DLQ_WAIT]):
                self._ready.pop(cid, None)

    def owns(self, tp: TopicPartition) -> bool:
        """Whether records of `tp` were taken and it has not been revoked since."""
        return tp in self._partitions

    def commits(self) -> dict[TopicPartition, int]:
        """The next offset to commit for each partition whose resolved prefix grew. Entries may
        share an offset (the results of one packed record, nimbus.wire.packs): an offset is passed
        only when every entry at it is resolved."""
        out: dict[TopicPartition, int] = {}
        for tp, q in self._partitions.items():
            last = None
            while q and q[0].state is S.DONE:
                last = q.popleft().offset
            if last is not None:
                out[tp] = q[0].offset if q and q[0].offset == last else last + 1
        return out

    def stalled(self, now: float, after: float) -> list[Entry]:
        """Per partition, its oldest unresolved result if it was read more than `after` ago and
        not reported before: it holds the partition's commit back. Each is returned once."""
        out: list[Entry] = []
        for q in self._partitions.values():
            for e in q:
                if e.state is not S.DONE:
                    if not e.stalled and now - e.added > after:
                        e.stalled = True
                        out.append(e)
                    break
        return out
