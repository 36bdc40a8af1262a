"""The verified device: two children that must always agree.

Every write goes to both children; every read reads both and compares them. What
happens on a disagreement is the mismatch policy's call. This module knows
nothing of NBD connections: the server turns its results and exceptions into
replies.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Coroutine
from time import perf_counter_ns
from typing import TypeVar

import trio

from nbdverify_protocol.constants import AllocationState, CommandFlag, Errno

from .changes import Change, ChangeKind, ChangeObserver, Origin
from .children import Child, ChildError, Extent
from .classify import classify
from .findings import Divergence, Finding, Mismatch, compare
from .provenance import Provenance
from .ranges import RangeSet, RequestOrdering
from .statistics import Statistics

T = TypeVar("T")


class MismatchPolicy(enum.Enum):
    #: Fail the read with EIO, close the connection, refuse new ones.
    DISCONNECT = "disconnect"
    #: Fail the read with EIO and keep serving.
    ERROR = "error"
    #: Return the raw (reference) data and keep serving, to collect every region.
    LOG = "log"
    #: As DISCONNECT, then the server exits with status 3.
    EXIT = "exit"

    @property
    def stops_export(self) -> bool:
        return self in (MismatchPolicy.DISCONNECT, MismatchPolicy.EXIT)


class DeviceError(Exception):
    """The device as a whole failed a request (both children agree it failed)."""

    def __init__(self, error: Errno, message: str) -> None:
        super().__init__(message)
        self.error = error


class VerificationFailed(Exception):
    """The children disagreed and the policy says the request fails."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.summary())
        self.finding = finding


class SizeMismatch(Exception):
    def __init__(self, raw: Child, test: Child) -> None:
        super().__init__(
            f"RAW and TEST differ in size: {raw.name} is {raw.size} bytes, "
            f"{test.name} is {test.size} bytes"
        )


Outcome = tuple[T | None, ChildError | None]


class VerifiedDevice:
    def __init__(
        self,
        raw: Child,
        test: Child,
        export_name: str = "",
        policy: MismatchPolicy = MismatchPolicy.DISCONNECT,
        on_finding: Callable[[Finding], None] = lambda finding: None,
        provenance: Provenance | None = None,
    ) -> None:
        if raw.size != test.size:
            raise SizeMismatch(raw, test)
        self.raw = raw
        self.test = test
        self.size = raw.size
        self.export_name = export_name
        self.policy = policy
        self.statistics = Statistics()
        #: The finding that stopped the export (DISCONNECT and EXIT policies).
        self.stopped_by: Finding | None = None
        self.stopped = trio.Event()
        self._on_finding = on_finding
        self._ordering = RequestOrdering()
        #: Both children answer without waiting (page-cached files), so a request
        #: can be served inline, without a task of its own.
        self.runs_inline = raw.runs_inline and test.runs_inline
        # Trimmed bytes: their content is unspecified until written again.
        self._unverified = RangeSet()
        #: Told of every completed change, in completion order (provenance, journal).
        self.observers: list[ChangeObserver] = []
        self._changes = 0
        #: Names each mismatching range's last writer and class (and, with
        #: fingerprints, wants what RAW held before each write).
        self.provenance = provenance
        if provenance is not None:
            self.observers.append(provenance)
        self._fingerprints = provenance is not None and provenance.fingerprints
        #: Findings keep both children's differing bytes (for --dump-dir).
        self.keep_mismatch_bytes = False

    def _changed(self, kind: ChangeKind, offset: int, length: int, flags: int,
                 origin: Origin | None,
                 data: bytes | bytearray | memoryview | None = None,
                 replaced: bytearray | None = None, covers: int = 0) -> None:
        """Number a change both children completed and tell the observers."""
        self._changes += 1
        if not self.observers:
            return
        change = Change(self._changes, kind, offset, length, flags, origin, time.time(),
                        time.monotonic(), data, replaced, covers)
        for observer in self.observers:
            observer.changed(change)

    # --- Running an operation on both children ----------------------------------

    async def _on_both(
        self, name: str, operation: Callable[[Child], Awaitable[T]], concurrent: bool = False
    ) -> tuple[Outcome[T], Outcome[T]]:
        """Run on both children, in turn when both run inline (free) and the
        operation does not wait (`concurrent` says it will: fsync), else together."""
        took = [0, 0]  # ns: test, raw

        async def attempt(child: Child) -> Outcome[T]:
            began = perf_counter_ns()
            try:
                return await operation(child), None
            except ChildError as error:
                return None, error
            finally:
                took[child is self.raw] = perf_counter_ns() - began

        if self.raw.runs_inline and self.test.runs_inline and not concurrent:
            outcomes = await attempt(self.raw), await attempt(self.test)
            self.statistics.children_done(name, took[1], took[0])
            return outcomes
        results: dict[str, Outcome[T]] = {}

        async def run(key: str, child: Child) -> None:
            results[key] = await attempt(child)

        async with trio.open_nursery() as nursery:
            # The child that waits gets the task; an inline one runs meanwhile in
            # this task, which saves a task per request.
            if self.test.runs_inline and not concurrent:
                nursery.start_soon(run, "raw", self.raw)
                await run("test", self.test)
            elif self.raw.runs_inline and not concurrent:
                nursery.start_soon(run, "test", self.test)
                await run("raw", self.raw)
            else:
                nursery.start_soon(run, "raw", self.raw)
                nursery.start_soon(run, "test", self.test)
        self.statistics.children_done(name, took[1], took[0])
        return results["raw"], results["test"]

    async def _start_both(
        self, name: str, start: Callable[[Child], Awaitable[None]]
    ) -> tuple[ChildError | None, ChildError | None]:
        """Both children's operation in flight at once, with no task: each child
        starts it (an NBD child sends its request, a file child does the work in
        place), then both are awaited. Errors come back as (raw, test)."""
        started: list[Awaitable[None] | ChildError] = []
        marks = [perf_counter_ns()]  # then after each start, then after each wait
        for child in (self.test, self.raw):
            try:
                started.append(start(child))
            except ChildError as error:
                started.append(error)
            marks.append(perf_counter_ns())
        errors: list[ChildError | None] = []
        try:
            for pending in started:
                if isinstance(pending, ChildError):
                    errors.append(pending)
                else:
                    try:
                        await pending
                        errors.append(None)
                    except ChildError as error:
                        errors.append(error)
                marks.append(perf_counter_ns())
        finally:
            for pending in started[len(errors) + 1:]:  # cancelled: never to be awaited
                if isinstance(pending, Coroutine):
                    pending.close()
        test_error, raw_error = errors
        # A child's latency: its start (a file child's whole work) and the wait for
        # it once both started; the child awaited second is seen no sooner.
        began, test_started, raw_started, test_done, raw_done = marks
        self.statistics.children_done(name, raw_done - test_started,
                                      test_started - began + test_done - raw_started)
        return raw_error, test_error

    def _settle(self, operation: str, offset: int, length: int,
                raw: ChildError | None, test: ChildError | None) -> None:
        """Raise what the guest must see when a child failed; return if both succeeded
        (or the policy says to carry on with the reference's result)."""
        if raw is None and test is None:
            return
        if raw is not None and test is not None and raw.error == test.error:
            raise DeviceError(raw.error, f"{operation} failed on both children: {raw.detail}")
        finding = Divergence(
            self.export_name, operation, offset, length,
            raw_error=_describe(raw), test_error=_describe(test),
        )
        self._found(finding)
        if raw is not None:
            raise DeviceError(raw.error, str(raw))

    def _found(self, finding: Finding) -> None:
        """Report a finding and apply the policy; returns only under LOG."""
        self.statistics.findings += 1
        if self.policy.stops_export and self.stopped_by is None:
            self.stopped_by = finding
            self.stopped.set()
        self._on_finding(finding)
        if self.policy is not MismatchPolicy.LOG:
            raise VerificationFailed(finding)

    # --- Operations ------------------------------------------------------------------

    async def read(self, offset: int, length: int, headroom: int = 0) -> bytearray:
        """The verified bytes, after `headroom` spare bytes for a reply header."""
        self.statistics.started("read", length)
        end = offset + length
        async with self._ordering.hold(offset, end, exclusive=False):
            reference = bytearray(headroom + length)
            candidate = bytearray(headroom + length)
            views = {self.raw: memoryview(reference)[headroom:],
                     self.test: memoryview(candidate)[headroom:]}
            raw_error, test_error = await self._start_both(
                "read", lambda child: child.post_read(views[child], offset))
            self._settle("read", offset, length, raw_error, test_error)
            if raw_error or test_error:
                return reference  # LOG policy: serve the reference
            for start, stop in self._unverified.overlapping(offset, end):
                # Trimmed content is unspecified: not a finding, just not checked.
                a, b = headroom + start - offset, headroom + stop - offset
                candidate[a:b] = reference[a:b]
                self.statistics.bytes_unverified += stop - start
            # Both buffers carry the same (zeroed) headroom, so comparing whole
            # bytearrays compares the data at memcmp speed, with no copy.
            if reference != candidate:
                difference = compare(reference, candidate, headroom, offset, length)
                assert difference is not None
                ranges = () if self.provenance is None else classify(
                    self.provenance, offset, reference, candidate, headroom, difference.ranges,
                    self.keep_mismatch_bytes)
                self._found(Mismatch(self.export_name, "read", offset, length,
                                     difference=difference, ranges=ranges))
            self.statistics.bytes_verified += length
            return reference

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool,
                    origin: Origin | None = None) -> None:
        length = len(data)
        self.statistics.started("write", length)
        async with self._ordering.hold(offset, offset + length, exclusive=True):
            replaced = await self._replaced(offset, length) if self._fingerprints else None
            if fua:  # the two syncs run concurrently
                (_, raw), (_, test) = await self._on_both(
                    "write", lambda child: child.write(data, offset, fua), concurrent=True)
            else:
                raw, test = await self._start_both(
                    "write", lambda child: child.post_write(data, offset))
            self._unverified.remove(offset, offset + length)
            self._changed(ChangeKind.WRITE, offset, length, CommandFlag.FUA if fua else 0,
                          origin, data, replaced)
            self._settle("write", offset, length, raw, test)

    async def _replaced(self, offset: int, length: int) -> bytearray | None:
        """What RAW holds where a write goes, for provenance's fingerprints."""
        old = bytearray(length)
        try:
            await self.raw.read_into(memoryview(old), offset)
        except ChildError:
            return None  # the write itself will meet the same error
        return old

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                           fua: bool, origin: Origin | None = None) -> None:
        self.statistics.started("write_zeroes", length)
        flags = ((0 if may_trim else CommandFlag.NO_HOLE) | (CommandFlag.FAST_ZERO if fast else 0)
                 | (CommandFlag.FUA if fua else 0))
        async with self._ordering.hold(offset, offset + length, exclusive=True):
            if fast:
                raw, test = await self._fast_zero(offset, length, may_trim, fua)
            else:
                (_, raw), (_, test) = await self._on_both(
                    "write_zeroes",
                    lambda child: child.write_zeroes(offset, length, may_trim, False, fua),
                    concurrent=fua,
                )
            self._unverified.remove(offset, offset + length)
            self._changed(ChangeKind.WRITE_ZEROES, offset, length, int(flags), origin)
            self._settle("write_zeroes", offset, length, raw, test)

    async def _fast_zero(self, offset: int, length: int, may_trim: bool,
                         fua: bool) -> tuple[ChildError | None, ChildError | None]:
        """FAST_ZERO must fail with ENOTSUP rather than be slow, but must never leave
        one child zeroed and the other not: the reference goes first, and if the
        test child cannot zero quickly after it did, the test child zeroes slowly."""
        try:
            await self.raw.write_zeroes(offset, length, may_trim, True, fua)
        except ChildError as error:
            if error.error == Errno.ENOTSUP:
                raise DeviceError(Errno.ENOTSUP, "cannot zero quickly") from None
            raw_error: ChildError | None = error
        else:
            raw_error = None
        test_error = None
        try:
            await self.test.write_zeroes(offset, length, may_trim, False, fua)
        except ChildError as error:
            test_error = error
        return raw_error, test_error

    async def trim(self, offset: int, length: int, fua: bool,
                   origin: Origin | None = None) -> None:
        self.statistics.started("trim", length)
        async with self._ordering.hold(offset, offset + length, exclusive=True):
            (_, raw), (_, test) = await self._on_both(
                "trim", lambda child: child.trim(offset, length, fua), concurrent=fua
            )
            self._unverified.add(offset, offset + length)
            self._changed(ChangeKind.TRIM, offset, length, CommandFlag.FUA if fua else 0, origin)
            self._settle("trim", offset, length, raw, test)

    async def flush(self, origin: Origin | None = None) -> None:
        """Both children, always (QEMU's blkverify flushes only the test image)."""
        self.statistics.started("flush")
        covers = self._changes  # what had completed when the flush began
        (_, raw), (_, test) = await self._on_both(
            "flush", lambda child: child.flush(), concurrent=True)
        self._changed(ChangeKind.FLUSH, 0, 0, 0, origin, covers=covers)
        self._settle("flush", 0, 0, raw, test)

    async def cache(self, offset: int, length: int) -> None:
        self.statistics.started("cache", length)
        (_, raw), (_, test) = await self._on_both(
            "cache", lambda child: child.cache(offset, length))
        self._settle("cache", offset, length, raw, test)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation where both children agree: a range is a hole, or reads as
        zero, only if it is so on both. A child that cannot tell counts as data."""
        self.statistics.started("block_status", length)
        (raw, _), (test, _) = await self._on_both(
            "block_status", lambda child: child.extents(offset, length))
        return merge_extents(
            raw or [Extent(length, AllocationState.DATA)],
            test or [Extent(length, AllocationState.DATA)],
        )

    @property
    def unverified_ranges(self) -> list[tuple[int, int]]:
        return self._unverified.ranges()


def _describe(error: ChildError | None) -> str | None:
    return None if error is None else f"{error.error.name} ({error.detail})"


def merge_extents(first: list[Extent], second: list[Extent]) -> list[Extent]:
    """Intersect two extent lists that start at the same offset: each piece keeps
    only the flags both sides report. Ends where the shorter list ends."""
    merged: list[Extent] = []
    i = j = 0
    left_a = first[0].length if first else 0
    left_b = second[0].length if second else 0
    while i < len(first) and j < len(second):
        step = min(left_a, left_b)
        state = first[i].state & second[j].state
        if merged and merged[-1].state == state:
            merged[-1] = Extent(merged[-1].length + step, state)
        else:
            merged.append(Extent(step, state))
        left_a -= step
        left_b -= step
        if left_a == 0:
            i += 1
            left_a = first[i].length if i < len(first) else 0
        if left_b == 0:
            j += 1
            left_b = second[j].length if j < len(second) else 0
    return merged
