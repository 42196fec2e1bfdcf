"""Recently fetched DLQ records, shared by the replays of one worker.

A replay reads its client's DLQ partition from the client's cursor and skips other clients'
records, so N clients replaying from one partition at once would each fetch and decode the same
records: N times the Kafka reads for the same results. The replays of a worker share what any of
them fetched instead. Records at an offset never change, so a cached range answers any read that
starts inside it; the cache only remembers ranges, it never guesses past them.

Pure (no I/O): `ReplayService` fetches on a miss and puts what it got; `get` answers from a range
that holds the offset asked for. Bounded by a number of records; the oldest ranges go first.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

from nimbus.ports import Record


@dataclass(slots=True)
class _Range:
    start: int  # the offset the fetch asked for: the range holds every record in [start, end)
    end: int  # the last record's offset + 1
    records: list[Record]
    offsets: list[int]  # of `records`, for bisect


class FetchCache:
    def __init__(self, max_records: int = 50_000) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        self.max_records = max_records
        self._ranges: OrderedDict[tuple[int, int], _Range] = OrderedDict()  # (partition, start)
        self._by_partition: dict[int, list[_Range]] = {}
        self.held = 0
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"<FetchCache ranges={len(self._ranges)} records={self.held} hits={self.hits} misses={self.misses}>"

    def get(self, partition: int, offset: int, max_records: int) -> list[Record] | None:
        """Records from `offset` on (at most max_records) if a cached range holds `offset`; a
        range that holds it but has nothing at or after it is a miss (it ended there)."""
        for r in self._by_partition.get(partition, ()):
            if r.start <= offset < r.end:
                i = bisect.bisect_left(r.offsets, offset)
                self.hits += 1
                return r.records[i : i + max_records]
        self.misses += 1
        return None

    def put(self, partition: int, start: int, records: list[Record]) -> None:
        """What a fetch from `start` returned (in offset order, all of `partition`)."""
        if not records or records[-1].offset < start:
            return
        key = (partition, start)
        old = self._ranges.pop(key, None)
        if old is not None:
            self._drop(partition, old)
        r = _Range(start, records[-1].offset + 1, records, [rec.offset for rec in records])
        self._ranges[key] = r
        self._by_partition.setdefault(partition, []).append(r)
        self.held += len(records)
        while self.held > self.max_records and len(self._ranges) > 1:
            (p, _), oldest = self._ranges.popitem(last=False)
            self._drop(p, oldest)

    def _drop(self, partition: int, r: _Range) -> None:
        ranges = self._by_partition[partition]
        ranges.remove(r)
        if not ranges:
            del self._by_partition[partition]
        self.held -= len(r.records)
