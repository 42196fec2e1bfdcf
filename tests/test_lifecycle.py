"""The client lifecycle table, driven directly (no store)."""

from __future__ import annotations

import pytest

from nimbus.core import lifecycle as L
from nimbus.core.lifecycle import Route, Status


def test_first_connect_is_live_with_epoch_1() -> None:
    rec, res = L.connect(L.new_record("c"), "pod-a")
    assert (rec.status, rec.pod, rec.epoch) == (Status.LIVE, "pod-a", 1)
    assert res.previous_pod == ""


def test_reconnect_with_backlog_replays_and_names_the_old_pod() -> None:
    rec, _ = L.connect(L.new_record("c"), "pod-a")
    rec, d = L.route(rec, 5)
    assert d.route is Route.LIVE and (d.pod, d.epoch) == ("pod-a", 1)
    rec, _ = L.disconnect(rec, 1)
    rec, d = L.route(rec, 6)
    assert d.route is Route.DLQ and rec.routed_dlq == 6
    rec, res = L.connect(rec, "pod-b")
    assert rec.status is Status.REPLAYING and res.epoch == 2 and res.previous_pod == ""


def test_second_stream_names_the_stream_it_replaces() -> None:
    rec, _ = L.connect(L.new_record("c"), "pod-a")
    rec, res = L.connect(rec, "pod-b")
    assert (res.previous_pod, res.previous_epoch, res.epoch) == ("pod-a", 1, 2)


def test_stale_disconnect_changes_nothing() -> None:
    """Hole 8: the first stream's disconnect must not mark OFFLINE a client whose second stream is up."""
    rec, _ = L.connect(L.new_record("c"), "pod-a")
    rec, _ = L.connect(rec, "pod-b")
    rec2, changed = L.disconnect(rec, 1)
    assert not changed and rec2 == rec and rec2.status is Status.LIVE


def test_route_drops_what_the_client_acked() -> None:
    rec, _ = L.connect(L.new_record("c"), "p")
    rec = L.ack(rec, 10)
    assert L.route(rec, 10)[1].route is Route.DROP
    assert L.route(rec, 11)[1].route is Route.LIVE


def test_divert_makes_a_live_client_replay() -> None:
    """Hole 3: a failed live delivery goes to the DLQ *and* the client is made to replay it."""
    rec, _ = L.connect(L.new_record("c"), "p")
    rec = L.divert(rec, 7)
    assert rec.status is Status.REPLAYING and rec.routed_dlq == 7
    assert L.route(rec, 8)[1].route is Route.DLQ


def test_flip_waits_for_every_dlq_routed_result_to_be_acked() -> None:
    """Hole 4: a result routed to the DLQ before the flip keeps the client REPLAYING."""
    rec, _ = L.connect(L.new_record("c"), "p")
    rec, _ = L.disconnect(rec, 1)
    rec, _ = L.route(rec, 3)
    rec, _ = L.connect(rec, "p")
    rec = L.ack(rec, 3)
    rec, d = L.route(rec, 4)  # decided DLQ while REPLAYING, not yet written
    assert d.route is Route.DLQ
    assert L.try_flip(rec)[1] is False
    rec = L.ack(rec, 4)
    rec, ok = L.try_flip(rec)
    assert ok and rec.status is Status.LIVE


def test_cursor_jumps_only_when_nothing_older_is_unacked() -> None:
    rec = L.new_record("c")
    rec = L.dlq_written(rec, 3, offset=100)
    assert rec.cursor == 100
    rec = L.dlq_written(rec, 4, offset=150)
    assert rec.cursor == 100  # delivery 3 is not acked yet
    rec = L.ack(rec, 4)
    rec = L.dlq_written(rec, 9, offset=400)
    assert rec.cursor == 400


def test_ack_and_cursor_are_monotonic() -> None:
    rec = L.ack(L.new_record("c"), 5)
    assert L.ack(rec, 3).acked == 5
    rec = L.advance_cursor(rec, 10)
    assert L.advance_cursor(rec, 4).cursor == 10


# -- the table itself ---------------------------------------------------------------------------


def test_the_table_has_every_status_and_event() -> None:
    assert set(L.TRANSITIONS) == {(s, e) for s in Status for e in L.Event}
    assert set(L.ROUTES) == set(Status) and L.ROUTES[Status.LIVE] is Route.LIVE


def test_the_table_is_well_formed() -> None:
    fields = {"epoch", "acked", "routed_dlq", "dlq_written", "cursor"}
    for (status, event), rows in L.TRANSITIONS.items():
        guards = [t.guard for t in rows]
        # An unguarded transition is always taken: nothing may follow it.
        assert None not in guards[:-1], (status, event)
        for g in guards:
            if g is None:
                continue
            assert g.op in L._OPS and {g.left, g.right} <= fields | {L.ARG}, g
            if event in (L.Event.CONNECT, L.Event.FLIP):  # events without an argument
                assert L.ARG not in (g.left, g.right), (event, g)
        if event is L.Event.CONNECT:  # a connect always succeeds: newest stream wins
            assert guards and guards[-1] is None, status
        if event is L.Event.ROUTE:  # routing never changes the status
            assert all(t.to is status for t in rows), status


def test_the_functions_follow_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    rec, _ = L.connect(L.new_record("c"), "p")
    assert L.divert(rec, 3).status is Status.REPLAYING
    rows = (L.Transition(L.UNSEEN, Status.LIVE),)
    monkeypatch.setitem(L.TRANSITIONS, (Status.LIVE, L.Event.DIVERT), rows)
    assert L.divert(rec, 3).status is Status.LIVE  # the row, not an if-branch, decided
    assert L.divert(rec, 3).routed_dlq == 3


def test_guards_compare_fields_with_the_events_argument() -> None:
    rec = L.ClientRecord("c", Status.REPLAYING, "p", epoch=2, acked=5, routed_dlq=5)
    assert L.CAUGHT_UP.holds(rec, 0) and not L.BACKLOG.holds(rec, 0)
    assert L.CURRENT.holds(rec, 2) and not L.CURRENT.holds(rec, 1)
    assert L.UNSEEN.holds(rec, 6) and not L.UNSEEN.holds(rec, 5)
    assert L.transition(rec, L.Event.FLIP) == L.Transition(L.CAUGHT_UP, Status.LIVE)
    assert L.transition(rec, L.Event.DISCONNECT, 1) is None
