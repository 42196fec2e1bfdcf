"""The router's in-flight window, driven directly, plus a model test of the whole delivery path.

The model test wires RouterWindow to the lifecycle table (the store), a simulated pod per
client connection and a simulated replay, then lets hypothesis interleave connects, disconnects,
reconnects, results, delivery reports, timeouts and replays. Both topics are written
at-least-once: results are written again at random points (a killed event consumer) and DLQ
writes repeat part of what was written before (a killed router), and the readers must take each
result once. In every generated history each
client must see every result, first deliveries in delivery-id order, and the commit must never
pass an unresolved result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nimbus.core import lifecycle as L
from nimbus.core.lifecycle import ClientRecord, Route, RouteDecision, Status
from nimbus.core.router_window import MOVES, Entry, IllegalMove, RouterWindow, S
from nimbus.ports import TopicPartition
from nimbus.wire import packs

TP = TopicPartition("results", 0)


def live(pod: str = "p", epoch: int = 1) -> RouteDecision:
    return RouteDecision(Route.LIVE, pod, epoch)


DLQ = RouteDecision(Route.DLQ)


def test_commit_stops_at_the_first_unresolved_result() -> None:
    w = RouterWindow(5.0)
    a = w.add(TP, 0, "a", 1, None)
    b = w.add(TP, 1, "b", 2, None)
    w.apply(w.decidable(), [live(), live()], now=0)
    [pa, pb] = w.take_publish()
    w.report(pb.token, True)
    assert w.commits() == {}  # b is done, a is not: nothing may be committed
    w.report(pa.token, True)
    assert w.commits() == {TP: 2}
    assert a.state is S.DONE and b.state is S.DONE


def test_results_of_one_record_are_committed_past_only_together() -> None:
    """A packed record (nimbus.wire.packs) gives several entries one offset: its offset is passed
    only when all of them are resolved."""
    w = RouterWindow(5.0)
    w.add(TP, 0, "a", 1, None)
    w.add(TP, 0, "a", 2, None)
    w.add(TP, 1, "b", 3, None)
    w.apply(w.decidable(), [live(), live(), live()], now=0)
    p1, p2, p3 = w.take_publish()
    w.report(p1.token, True)
    assert w.commits() == {TP: 0}  # half of offset 0 is resolved: nothing consumed yet
    w.report(p2.token, True)
    assert w.commits() == {TP: 1}
    w.report(p3.token, True)
    assert w.commits() == {TP: 2}


def test_failed_delivery_diverts_it_and_everything_after_it_in_order() -> None:
    """Hole 1: a result whose stream is gone is diverted, never dropped."""
    w = RouterWindow(5.0)
    for off in range(3):
        w.add(TP, off, "a", off + 1, None)
    w.apply(w.decidable(), [live()] * 3, now=0)
    e1, e2, e3 = w.take_publish()
    w.report(e1.token, True)
    w.report(e2.token, False)
    assert [e.delivery_id for e in w.pending_diverts()] == [2, 3]
    assert w.take_dlq_writes() == []  # the store has not been told yet
    w.diverted(w.pending_diverts())
    assert [e.delivery_id for e in w.take_dlq_writes()] == [2, 3]
    w.report(e3.token, True)  # a late report for a diverted result changes nothing
    assert e3.state is S.DLQ_WRITING


def test_later_result_waits_for_earlier_live_ones_before_going_to_the_dlq() -> None:
    w = RouterWindow(5.0)
    w.add(TP, 0, "a", 1, None)
    w.apply(w.decidable(), [live()], now=0)
    [e1] = w.take_publish()
    w.add(TP, 1, "a", 2, None)
    assert [e.delivery_id for e in w.decidable()] == [2]
    w.apply([x for x in [w._clients["a"].queue[1]]], [DLQ], now=0)
    assert w.take_dlq_writes() == []  # 1 is still in flight: it may yet be diverted ahead of 2
    w.report(e1.token, False)
    w.diverted(w.pending_diverts())
    assert [e.delivery_id for e in w.take_dlq_writes()] == [1, 2]


def test_live_to_a_new_stream_waits_for_the_old_stream_to_resolve() -> None:
    w = RouterWindow(5.0)
    w.add(TP, 0, "a", 1, None)
    w.apply(w.decidable(), [live("p1", 1)], now=0)
    [e1] = w.take_publish()
    e2 = w.add(TP, 1, "a", 2, None)
    w.apply(w.decidable(), [live("p2", 2)], now=0)
    assert e2.state is S.UNDECIDED and w.take_publish() == []
    assert w.decidable() == []  # no busy re-asking while the old stream's result is in flight
    w.report(e1.token, True)
    assert w.decidable() == [e2]


def test_expiry_fails_deliveries_no_pod_confirmed() -> None:
    w = RouterWindow(2.0)
    w.add(TP, 0, "a", 1, None)
    w.apply(w.decidable(), [live()], now=10)
    w.take_publish()
    assert w.expire(11.9) == 0
    assert w.expire(12.0) == 1
    assert [e.delivery_id for e in w.pending_diverts()] == [1]


def test_revoked_partitions_are_forgotten() -> None:
    w = RouterWindow(2.0)
    w.add(TP, 0, "a", 1, None)
    w.apply(w.decidable(), [live()], now=0)
    [e] = w.take_publish()
    w.revoke([TP])
    assert w.pending == 0 and w.commits() == {}
    w.report(e.token, True)  # late report after revocation: ignored
    assert w.pending == 0


def test_a_move_outside_the_table_raises_and_changes_nothing() -> None:
    w = RouterWindow(5.0)
    e = w.add(TP, 0, "a", 1, None)
    assert e is not None
    with pytest.raises(IllegalMove, match="undecided> cannot move to done"):
        w._move(e, S.DONE)  # a result resolved without being routed: lost
    assert e.state is S.UNDECIDED and w._clients["a"].counts[S.UNDECIDED] == 1
    [d] = w.decidable()
    w.apply([d], [live()], now=0)
    with pytest.raises(IllegalMove):
        w._move(e, S.DLQ_WRITING)  # to the DLQ without being diverted (hole 3)
    w.report(w.take_publish()[0].token, True)
    assert e.state is S.DONE
    for state in S:
        with pytest.raises(IllegalMove):
            w._move(e, state)  # nothing leaves DONE


def test_the_window_makes_every_move_of_the_table_and_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = RouterWindow(5.0)
    made: set[tuple[S, S]] = set()
    move = w._move

    def spy(e: Entry, state: S) -> None:
        made.add((e.state, state))
        move(e, state)

    monkeypatch.setattr(w, "_move", spy)
    # One result through a failed delivery and a failed DLQ write, one dropped, one delivered,
    # one routed to the DLQ.
    w.add(TP, 0, "a", 1, None)
    w.undecide(w.decidable())
    w.apply(w.decidable(), [live()], now=0)
    w.report(w.take_publish()[0].token, False)
    w.diverted(w.pending_diverts())
    w.dlq_failed(w.take_dlq_writes())
    w.dlq_done(w.take_dlq_writes())
    w.add(TP, 1, "b", 2, None)
    w.add(TP, 2, "c", 3, None)
    w.add(TP, 3, "d", 4, None)
    w.apply(w.decidable(), [RouteDecision(Route.DROP), live(), DLQ], now=0)
    w.report(w.take_publish()[0].token, True)
    # A partition revoked with a result in every unresolved state.
    tp2 = TopicPartition("results", 1)
    for i, c in enumerate(["live", "diverting", "wait", "writing"]):
        w.add(tp2, i, c, 1, None)
    w.apply(w.decidable(), [live(), live(), DLQ, DLQ], now=0)
    w.report(w.take_publish()[1].token, False)
    w.dlq_failed([e for e in w.take_dlq_writes() if e.client_id == "wait"])
    w.add(tp2, 4, "deciding", 1, None)
    assert len(w.decidable()) == 1
    w.add(tp2, 5, "undecided", 1, None)
    w.revoke([tp2])
    assert made == {(a, b) for a, tos in MOVES.items() for b in tos}
    assert w.pending == 1 and w.commits() == {TP: 3}  # d waits for its DLQ write


# ---------------------------------------------------------------------------------------------
# Model test


@dataclass
class Conn:
    epoch: int
    pod: str
    alive: bool = True
    last: int = 0  # highest delivery id this stream received


@dataclass
class Model:
    w: RouterWindow = field(default_factory=lambda: RouterWindow(3.0))
    store: dict[str, ClientRecord] = field(default_factory=dict)
    conns: dict[str, Conn | None] = field(default_factory=dict)
    dlq: dict[str, list[list[int]]] = field(default_factory=dict)  # records (packs) of ids
    seen: dict[str, list[int]] = field(default_factory=dict)  # first deliveries, in order
    sent: dict[str, list[int]] = field(default_factory=dict)
    replay_pos: dict[str, int] = field(default_factory=dict)
    next_offset: int = 0
    next_id: int = 0  # delivery ids (from the events topic's offsets, not the results topic's)
    now: float = 0.0
    committed: int = 0
    dlq_repeat: int = 0  # > 0: the next DLQ write of a client first repeats this many of its ids

    def rec(self, c: str) -> ClientRecord:
        return self.store.get(c) or L.new_record(c)

    def receive(self, c: str, d: int) -> None:
        s = self.seen.setdefault(c, [])
        if d not in s:
            s.append(d)
        self.store[c] = L.ack(self.rec(c), d)

    # operations ------------------------------------------------------------------------------
    def connect(self, c: str) -> None:
        old = self.conns.get(c)
        if old is not None:
            old.alive = False
        rec, res = L.connect(self.rec(c), f"pod{len(self.store)}")
        self.store[c] = rec
        self.conns[c] = Conn(res.epoch, rec.pod)

    def disconnect(self, c: str) -> None:
        conn = self.conns.get(c)
        if conn is not None:
            conn.alive = False
            self.store[c] = L.disconnect(self.rec(c), conn.epoch)[0]
            self.conns[c] = None

    def result(self, c: str, n: int = 1) -> None:
        """n results of client c in one record (n > 1: a pack, nimbus.wire.packs): one offset."""
        for _ in range(n):
            self.next_id += 1
            self.w.add(TP, self.next_offset, c, self.next_id, None)
            self.sent.setdefault(c, []).append(self.next_id)
        self.next_offset += 1

    def repeat_results(self, c: str, k: int) -> None:
        """An event consumer killed before its commit writes c's last k results again, as one
        record (a pack) at a new offset: the results topic is at-least-once."""
        again = self.sent.get(c, [])[-k:]
        if not again:
            return
        added = 0
        for d in again:
            if self.w.add(TP, self.next_offset, c, d, None) is not None:
                added += 1
        if not added:
            self.w.add_skipped(TP, self.next_offset)
        self.next_offset += 1

    def step_router(self, deliver: bool) -> None:
        w = self.w
        for e in w.pending_diverts():
            self.store[e.client_id] = L.divert(self.rec(e.client_id), e.delivery_id)
        w.diverted(w.pending_diverts())
        dec = w.decidable()
        decisions = []
        for e in dec:
            rec, d = L.route(self.rec(e.client_id), e.delivery_id)
            self.store[e.client_id] = rec
            decisions.append(d)
        w.apply(dec, decisions, self.now)
        for e in w.take_publish():
            conn = self.conns.get(e.client_id)
            ok = deliver and conn is not None and conn.alive and conn.epoch == e.epoch
            if ok and conn is not None and e.prev > conn.last:
                ok = False  # the pod refuses a delivery whose predecessor it never got
                w.report(e.token, False)
                continue
            if ok and conn is not None:
                conn.last = e.delivery_id
                self.receive(e.client_id, e.delivery_id)
                w.report(e.token, True)
            elif conn is None or not conn.alive or conn.epoch != e.epoch:
                w.report(e.token, False)
            # else: the report is lost; the timeout takes care of it
        writes = w.take_dlq_writes()
        by_client: dict[str, list[int]] = {}
        for e in writes:
            by_client.setdefault(e.client_id, []).append(e.delivery_id)
        for c, ids in by_client.items():
            records = self.dlq.setdefault(c, [])
            if self.dlq_repeat:
                # At-least-once: a router killed after its DLQ write and before its commit
                # writes part of it again, in front of what is new (one pack spanning both).
                done = [d for r in records for d in r][-self.dlq_repeat :]
                ids = done + ids
            records.append(ids)
            self.store[c] = L.dlq_written(self.rec(c), ids[-1], 0)
        self.dlq_repeat = 0
        w.dlq_done(writes)
        for off in w.commits().values():
            assert off >= self.committed
            self.committed = off

    def tick(self) -> None:
        self.now += 1.0
        self.w.expire(self.now)

    def replay(self, c: str) -> None:
        rec = self.rec(c)
        conn = self.conns.get(c)
        if rec.status is not Status.REPLAYING or conn is None or not conn.alive:
            return
        # As the replay reads: each record's results through packs.fresh from the highest id
        # taken (the acked one at the start), published as one run across records; the pod
        # takes a run only if its ids strictly increase above what the client acked.
        taken = self.rec(c).acked
        run: list[int] = []
        for record in self.dlq.get(c, []):
            new = packs.fresh([SimpleNamespace(delivery_id=d) for d in record], taken)  # type: ignore[misc]
            run += [r.delivery_id for r in new]
            taken = run[-1] if run else taken
        assert all(a < b for a, b in zip(run, run[1:], strict=False)), f"{c}: run {run}"
        assert not run or run[0] > self.rec(c).acked
        for d in run:
            self.receive(c, d)
        self.store[c] = L.try_flip(self.rec(c))[0]

    def check_invariants(self) -> None:
        for c, s in self.seen.items():
            assert s == sorted(s), f"{c} first-saw results out of order: {s}"
        # Nothing below the committed offset is unresolved.
        for q in self.w._partitions.values():
            for e in q:
                if e.offset < self.committed:
                    assert e.state is S.DONE


clients = st.sampled_from(["a", "b"])
ops = st.one_of(
    st.tuples(st.just("connect"), clients),
    st.tuples(st.just("disconnect"), clients),
    st.tuples(st.just("result"), clients),
    st.tuples(st.just("result"), clients),
    st.tuples(st.just("pack"), st.tuples(clients, st.integers(2, 4))),
    st.tuples(st.just("route"), st.booleans()),
    st.tuples(st.just("route"), st.just(True)),
    st.tuples(st.just("reconnect"), clients),
    st.tuples(st.just("tick"), st.none()),
    st.tuples(st.just("replay"), clients),
    st.tuples(st.just("repeat_results"), st.tuples(clients, st.integers(1, 4))),
    st.tuples(st.just("repeat_dlq"), st.integers(1, 3)),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(ops, max_size=60))
def test_every_history_keeps_the_delivery_contract(history: list[tuple[str, object]]) -> None:
    m = Model()
    for op, arg in history:
        if op == "connect":
            m.connect(str(arg))
        elif op == "reconnect":
            m.connect(str(arg))  # a second stream while the first is up (newest wins)
        elif op == "disconnect":
            m.disconnect(str(arg))
        elif op == "result":
            m.result(str(arg))
        elif op == "pack":
            c, n = arg  # type: ignore[misc]
            m.result(c, n)
        elif op == "route":
            m.step_router(bool(arg))
        elif op == "tick":
            m.tick()
        elif op == "replay":
            m.replay(str(arg))
        elif op == "repeat_results":
            c, k = arg  # type: ignore[misc]
            m.repeat_results(c, k)
        elif op == "repeat_dlq":
            m.dlq_repeat = int(arg)  # type: ignore[call-overload]
        m.check_invariants()
    # Quiesce: everyone connects, the router drains, replays run, until nothing is pending.
    for _ in range(20):
        for c in ["a", "b", "c"]:
            if m.conns.get(c) is None:
                m.connect(c)
        m.step_router(True)
        m.tick()
        m.tick()
        m.tick()
        for c in ["a", "b", "c"]:
            m.replay(c)
        m.check_invariants()
    assert m.w.pending == 0
    assert m.committed == m.next_offset
    for c, sent in m.sent.items():
        assert m.seen.get(c, []) == sent, f"{c}: sent {sent}, first deliveries {m.seen.get(c)}"
