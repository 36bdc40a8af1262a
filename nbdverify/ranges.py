"""Byte-range bookkeeping for the verified device."""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio


@dataclass(eq=False, slots=True)
class _Hold:
    start: int
    end: int
    exclusive: bool
    released: trio.Event = field(default_factory=trio.Event)


class RequestOrdering:
    """Makes overlapping requests take effect in arrival order on both children.

    Each request waits for every earlier request it conflicts with (a write
    conflicts with anything that overlaps it; reads do not conflict with reads).
    So a read can never see one child updated and the other not, and two writes
    to the same bytes land in the same order on both children.
    """

    def __init__(self) -> None:
        self._holds: list[_Hold] = []

    @asynccontextmanager
    async def hold(self, start: int, end: int, exclusive: bool) -> AsyncIterator[None]:
        earlier = [
            other
            for other in self._holds
            if other.start < end and start < other.end and (exclusive or other.exclusive)
        ]
        hold = _Hold(start, end, exclusive)
        self._holds.append(hold)
        try:
            for other in earlier:
                await other.released.wait()
            yield
        finally:
            hold.released.set()
            self._holds.remove(hold)

    @property
    def in_flight(self) -> int:
        return len(self._holds)


class RangeSet:
    """A set of byte ranges kept as sorted, disjoint, non-adjacent [start, end) pairs."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # Every range touching [start, end] merges into one.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]

    def remove(self, start: int, end: int) -> None:
        if start >= end or not self._starts:
            return
        first = bisect.bisect_right(self._ends, start)
        last = bisect.bisect_left(self._starts, end)
        if first >= last:
            return
        keep_starts: list[int] = []
        keep_ends: list[int] = []
        if self._starts[first] < start:
            keep_starts.append(self._starts[first])
            keep_ends.append(start)
        if self._ends[last - 1] > end:
            keep_starts.append(end)
            keep_ends.append(self._ends[last - 1])
        self._starts[first:last] = keep_starts
        self._ends[first:last] = keep_ends

    def overlapping(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) that are in the set."""
        if not self._starts:
            return []
        first = bisect.bisect_right(self._ends, start)
        last = bisect.bisect_left(self._starts, end)
        return [
            (max(start, self._starts[i]), min(end, self._ends[i])) for i in range(first, last)
        ]
