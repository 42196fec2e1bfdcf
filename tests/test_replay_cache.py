"""The replays' shared fetch cache (nimbus/workers/replay_cache.py): pure, so tested directly."""

from __future__ import annotations

import pytest

from nimbus.ports import Record
from nimbus.workers.replay_cache import FetchCache


def recs(partition: int, offsets: list[int]) -> list[Record]:
    return [Record("dlq", partition, o, f"c{o % 3}".encode(), f"v{o}".encode()) for o in offsets]


def offsets(got: list[Record] | None) -> list[int] | None:
    return None if got is None else [r.offset for r in got]


def test_answers_only_inside_a_fetched_range() -> None:
    c = FetchCache()
    c.put(0, 10, recs(0, [10, 11, 12, 13]))
    assert offsets(c.get(0, 10, 500)) == [10, 11, 12, 13]
    assert offsets(c.get(0, 12, 500)) == [12, 13]
    assert offsets(c.get(0, 11, 2)) == [11, 12]
    assert c.get(0, 14, 500) is None  # past the range: the log may hold more by now
    assert c.get(0, 9, 500) is None  # before it: never fetched
    assert c.get(1, 11, 500) is None  # another partition
    assert (c.hits, c.misses) == (3, 3)


def test_a_range_with_holes_answers_from_the_next_record() -> None:
    # A fetch from 5 that returned 8 and 9 says nothing is at 5..7 (deleted, or markers).
    c = FetchCache()
    c.put(2, 5, recs(2, [8, 9]))
    assert offsets(c.get(2, 5, 500)) == [8, 9]
    assert offsets(c.get(2, 7, 500)) == [8, 9]
    assert offsets(c.get(2, 9, 500)) == [9]
    assert c.get(2, 4, 500) is None


def test_empty_fetches_are_not_cached() -> None:
    c = FetchCache()
    c.put(0, 3, [])
    assert c.get(0, 3, 10) is None
    assert c.held == 0


def test_bounded_oldest_range_goes_first() -> None:
    c = FetchCache(max_records=5)
    c.put(0, 0, recs(0, [0, 1, 2]))
    c.put(1, 0, recs(1, [0, 1]))
    assert c.held == 5
    c.put(0, 3, recs(0, [3, 4]))
    assert c.held == 4
    assert c.get(0, 1, 10) is None  # the oldest range was dropped
    assert offsets(c.get(1, 0, 10)) == [0, 1]
    assert offsets(c.get(0, 3, 10)) == [3, 4]


def test_refetch_of_the_same_start_replaces_the_range() -> None:
    c = FetchCache()
    c.put(0, 0, recs(0, [0, 1]))
    c.put(0, 0, recs(0, [0, 1, 2, 3]))
    assert c.held == 4
    assert offsets(c.get(0, 2, 10)) == [2, 3]


def test_one_range_larger_than_the_bound_is_kept_alone() -> None:
    c = FetchCache(max_records=2)
    c.put(0, 0, recs(0, [0, 1, 2]))
    assert offsets(c.get(0, 0, 10)) == [0, 1, 2]
    c.put(0, 3, recs(0, [3]))
    assert c.get(0, 0, 10) is None and c.held == 1


def test_rejects_a_useless_bound() -> None:
    with pytest.raises(ValueError):
        FetchCache(max_records=0)
