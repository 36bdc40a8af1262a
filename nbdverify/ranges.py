"""Byte-range bookkeeping for the verified device."""

from __future__ import annotations

import bisect

import trio


class Hold:
    """One request's claim on a byte range, from its arrival until it is done."""

    __slots__ = ("_earlier", "_ordering", "_released", "active", "end", "exclusive", "start")

    def __init__(self, ordering: RequestOrdering, start: int, end: int, exclusive: bool,
                 earlier: list[Hold]) -> None:
        self._ordering = ordering
        self.start = start
        self.end = end
        self.exclusive = exclusive
        self._earlier = earlier
        self._released: trio.Event | None = None  # made only when somebody waits
        self.active = True

    @property
    def blocked(self) -> bool:
        """An earlier conflicting request has not finished yet."""
        if not self._earlier:  # the usual case: nothing overlapped it on arrival
            return False
        self._earlier = [other for other in self._earlier if other.active]
        return bool(self._earlier)

    async def wait(self) -> None:
        """Until every earlier conflicting request has finished."""
        for other in self._earlier:
            if other.active:
                if other._released is None:
                    other._released = trio.Event()
                await other._released.wait()
        self._earlier = []

    def release(self) -> None:
        """This request is done (safe to call again)."""
        if not self.active:
            return
        self.active = False
        self._ordering._release(self)
        if self._released is not None:
            self._released.set()


class RequestOrdering:
    """Makes overlapping requests take effect in arrival order on both children.

    Each request waits for every earlier request it conflicts with (a write
    conflicts with anything that overlaps it; reads do not conflict with reads).
    So a read can never see one child updated and the other not, and two writes
    to the same bytes land in the same order on both children.
    """

    def __init__(self) -> None:
        self._holds: dict[Hold, None] = {}  # in arrival order
        self._exclusive = 0  # how many of them are writes

    def enter(self, start: int, end: int, exclusive: bool) -> Hold:
        """Claim [start, end) now; the hold says whether it must wait first."""
        earlier: list[Hold] = []
        if exclusive or self._exclusive:  # reads among reads never conflict
            earlier = [other for other in self._holds
                       if other.start < end and start < other.end
                       and (exclusive or other.exclusive)]
        hold = Hold(self, start, end, exclusive, earlier)
        self._holds[hold] = None
        self._exclusive += exclusive
        return hold

    def _release(self, hold: Hold) -> None:
        del self._holds[hold]
        self._exclusive -= hold.exclusive

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
