"""The verified device: two children that must always agree.

Every write goes to both children; every read reads both and compares them. What
happens on a disagreement is the mismatch policy's call. This module knows
nothing of NBD connections: the server turns its results and exceptions into
replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from time import perf_counter_ns
from typing import Any, Generic, TypeVar

from nbdverify_protocol.constants import AllocationState, CommandFlag, Errno

from .changes import Change, ChangeKind, ChangeObserver, Origin
from .children import Child, ChildError, Completed, Extent, Failed, FileChild, Later, Pending
from .classify import classify
from .findings import Divergence, Finding, Mismatch, compare
from .policy import MismatchPolicy
from .provenance import Provenance
from .ranges import Hold, RangeSet, RequestOrdering
from .statistics import Statistics

T = TypeVar("T")
R = TypeVar("R")
#: Starts one operation on both children: (raw's, test's).
Starter = Callable[[], tuple[Pending[T], Pending[T]]]


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

#: Plain ints: an IntFlag `&` or `|` builds a new flag object (~1 us).
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)


def outcome_now(pending: Pending[T]) -> Outcome[T]:
    """The result (or ChildError) of a Pending that is `done`, with no coroutine
    and no trip through the scheduler: `done` promises its __await__ returns
    without yielding."""
    if isinstance(pending, Completed):  # page-cached file I/O: no generator, no StopIteration
        return pending.value, None
    try:
        pending.__await__().send(None)
    except StopIteration as stop:
        return stop.value, None
    except ChildError as error:
        return None, error
    raise AssertionError(f"{pending!r} is done but waited")


#: What a finished operation's two outcomes (raw's, test's) become: its result or
#: the exception the guest must see. Plain functions, so that a ready operation
#: finishes with no coroutine at all.
Conclusion = Callable[[Outcome[T], Outcome[T]], R]


class Operation(Generic[T, R]):
    """A device operation that has started on both children (or waits behind an
    earlier overlapping request to start). Awaiting it, or `finish_now` when it is
    `ready`, finishes it: results compared, errors settled.

    `ready` is the device's word that finishing will not wait (page-cached files).
    `waits_long` says it may take long for reasons other than a child's round trip
    (an fsync, or an earlier overlapping request), so it is best not queued behind
    others. An operation that is never finished must be `abandon`ed.
    """

    __slots__ = ("_began", "_conclude", "_hold", "_name", "_parts", "_start", "_statistics",
                 "waits_long")

    def __init__(self, name: str, hold: Hold, start: Starter[T],
                 conclude: Conclusion[T, R], statistics: Statistics,
                 waits_long: bool) -> None:
        self._name = name
        self._hold = hold
        self._start = start
        self._conclude = conclude
        self._statistics = statistics
        self._parts: tuple[Pending[T], Pending[T]] | None = None
        self._began = 0
        if hold.blocked:
            self.waits_long = True  # started once the earlier request is done
        else:
            self._began = perf_counter_ns()
            self._parts = start()
            self.waits_long = waits_long

    @property
    def ready(self) -> bool:
        parts = self._parts
        return parts is not None and parts[0].done and parts[1].done

    @property
    def reported(self) -> bool:
        """Its children will say when it is `ready` (VerifiedDevice.listen), so that it
        can be finished then without awaiting it."""
        parts = self._parts
        return parts is not None and parts[0].reported and parts[1].reported

    def finish_now(self) -> R:
        """Finish a `ready` operation in place."""
        assert self._parts is not None
        raw, test = self._parts
        try:
            elapsed = perf_counter_ns() - self._began
            self._statistics.children_done(self._name, elapsed, elapsed)
            return self._conclude(outcome_now(raw), outcome_now(test))
        finally:
            self._hold.release()

    def __await__(self) -> Generator[Any, None, R]:
        return self._finish().__await__()

    async def _finish(self) -> R:
        try:
            if self._parts is None:
                await self._hold.wait()
                self._began = perf_counter_ns()
                self._parts = self._start()
            # Each child's latency runs from the start to when its part was seen done.
            outcomes: list[Outcome[T]] = []
            done: list[int] = []
            for pending in self._parts:
                try:
                    outcomes.append((await pending, None))
                except ChildError as error:
                    outcomes.append((None, error))
                done.append(perf_counter_ns())
            self._statistics.children_done(self._name, done[0] - self._began,
                                           done[1] - self._began)
            return self._conclude(outcomes[0], outcomes[1])
        finally:
            self._hold.release()

    def abandon(self) -> None:
        """Never to be finished (the connection is going): let later requests through."""
        self._hold.release()


class VerifiedDevice:
    def __init__(
        self,
        raw: Child,
        test: Child,
        export_name: str = "",
        policy: MismatchPolicy | None = None,
        on_finding: Callable[[Finding], None] = lambda finding: None,
        provenance: Provenance | None = None,
    ) -> None:
        if raw.size != test.size:
            raise SizeMismatch(raw, test)
        self.raw = raw
        self.test = test
        self.size = raw.size
        self.export_name = export_name
        self.policy = policy or MismatchPolicy()
        self.statistics = Statistics()
        self._on_finding = on_finding
        self._ordering = RequestOrdering()
        # Trimmed bytes: their content is unspecified until written again.
        self._unverified = RangeSet()
        #: Told of every completed change, in completion order (provenance, journal).
        self.observers: list[ChangeObserver] = []
        self._changes = 0
        #: Who last wrote each byte, for findings that name the guilty write.
        self.provenance = provenance
        if provenance is not None:
            self.observers.append(provenance)
        self._fingerprints = provenance is not None and provenance.fingerprints
        #: Findings keep both children's bytes of each differing range (--dump-dir).
        self.keep_mismatch_bytes = False

    def listen(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever some `reported` operations may have become ready."""
        for child in (self.raw, self.test):
            child.progress.listen(listener)

    def unlisten(self, listener: Callable[[], None]) -> None:
        for child in (self.raw, self.test):
            child.progress.unlisten(listener)

    def hold_requests(self) -> None:
        """Operations started from now on may keep their child requests until
        `send_requests`, which the caller calls before it next yields: one send to
        each child for a whole batch of guest requests."""
        self.raw.hold_requests()
        self.test.hold_requests()

    def send_requests(self) -> None:
        self.raw.send_requests()
        self.test.send_requests()

    def _changed(self, kind: ChangeKind, offset: int, length: int, flags: int,
                 origin: Origin | None,
                 data: bytes | bytearray | memoryview | None = None, *,
                 raw: ChildError | None = None, test: ChildError | None = None,
                 replaced: bytearray | None = None, covers: int = 0) -> None:
        """Number a change both children completed (`raw`, `test`: unless one failed
        it) and tell the observers."""
        self._changes += 1
        if not self.observers:
            return
        change = Change(self._changes, kind, offset, length, flags, origin, time.time(),
                        time.monotonic(), data, raw is not None, test is not None, replaced,
                        covers)
        for observer in self.observers:
            observer.changed(change)

    # --- Starting an operation on both children -------------------------------------

    def _on_each(self, start: Callable[[Child], Pending[T]]) -> Starter[T]:
        """Start on both: TEST first, so that an NBD child's request is on its way
        while a file child does its part."""
        def start_both() -> tuple[Pending[T], Pending[T]]:
            test = start(self.test)
            return start(self.raw), test
        return start_both

    def _start(self, operation: str, offset: int, length: int, exclusive: bool,
               start_both: Starter[T], conclude: Conclusion[T, R],
               waits_long: bool = False) -> Operation[T, R]:
        """The one way every operation runs: claim its range, start it on both
        children (once no earlier overlapping request is in the way), and return
        what finishes it."""
        self.statistics.started(operation, length)
        hold = self._ordering.enter(offset, offset + length, exclusive)
        return Operation(operation, hold, start_both, conclude, self.statistics, waits_long)

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
        """Report a finding; raise unless the policy says the request goes on."""
        fails = self.policy.judge(finding)
        self._on_finding(finding)
        if fails:
            raise VerificationFailed(finding)

    # --- Operations ------------------------------------------------------------------

    def read(self, offset: int, length: int,
             headroom: int = 0) -> Operation[None, bytearray]:
        """The verified bytes, after `headroom` spare bytes for a reply header."""
        reference = bytearray(headroom + length)
        candidate = bytearray(headroom + length)
        raw_view = memoryview(reference)[headroom:]
        test_view = memoryview(candidate)[headroom:]

        def conclude(raw: Outcome[None], test: Outcome[None]) -> bytearray:
            raw_error, test_error = raw[1], test[1]
            if raw_error or test_error:
                self._settle("read", offset, length, raw_error, test_error)
                return reference  # LOG policy: serve the reference
            self._verify(reference, candidate, headroom, offset, length)
            return reference

        def start_both() -> tuple[Pending[None], Pending[None]]:
            test = self.test.read(test_view, offset)  # TEST first: see _on_each
            return self.raw.read(raw_view, offset), test

        return self._start("read", offset, length, False, start_both, conclude)

    def _verify(self, reference: bytearray, candidate: bytearray, headroom: int,
                offset: int, length: int) -> None:
        end = offset + length
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
            # Worked out only now that there is a mismatch: classes and last writers.
            ranges = () if self.provenance is None else classify(
                self.provenance, offset, reference, candidate, headroom, difference.ranges,
                self.keep_mismatch_bytes)
            self._found(Mismatch(self.export_name, "read", offset, length,
                                 difference=difference, ranges=ranges))
        self.statistics.bytes_verified += length

    def _change(self, kind: ChangeKind, offset: int, length: int, flags: int,
                origin: Origin | None, data: bytes | bytearray | memoryview | None,
                start_both: Starter[None]) -> Operation[None, None]:
        """WRITE, WRITE_ZEROES or TRIM: on both children, then recorded."""
        name = kind.value  # an Enum's .value is a Python-level property: read it once
        replaced: list[bytearray | None] = [None]
        if self._fingerprints and kind is ChangeKind.WRITE:
            start_both = self._keeping_old_content(offset, length, replaced, start_both)

        def conclude(raw: Outcome[None], test: Outcome[None]) -> None:
            raw_error, test_error = raw[1], test[1]
            if raw_error and raw_error.error == Errno.ENOTSUP and flags & _FAST_ZERO:
                raise DeviceError(Errno.ENOTSUP, "cannot zero quickly")  # nothing was zeroed
            if kind is ChangeKind.TRIM:
                self._unverified.add(offset, offset + length)
            else:
                self._unverified.remove(offset, offset + length)
            self._changed(kind, offset, length, flags, origin, data, raw=raw_error,
                          test=test_error, replaced=replaced[0])
            if raw_error or test_error:
                self._settle(name, offset, length, raw_error, test_error)

        return self._start(name, offset, length, True, start_both, conclude,
                           waits_long=bool(flags & _FUA))

    def _keeping_old_content(self, offset: int, length: int, replaced: list[bytearray | None],
                             start_both: Starter[None]) -> Starter[None]:
        """--fingerprints: what RAW holds where a write goes, read just before the
        write starts (its range is held by then). Only a file RAW answers at once;
        with an NBD RAW the classes that need it fall back (see classify)."""
        def start() -> tuple[Pending[None], Pending[None]]:
            if isinstance(self.raw, FileChild):
                old = bytearray(length)
                if not isinstance(self.raw.read(memoryview(old), offset), Failed):
                    replaced[0] = old
            return start_both()
        return start

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool,
              origin: Origin | None = None) -> Operation[None, None]:
        def start_both() -> tuple[Pending[None], Pending[None]]:
            test = self.test.write(data, offset, fua)  # TEST first: see _on_each
            return self.raw.write(data, offset, fua), test

        return self._change(ChangeKind.WRITE, offset, len(data), _FUA if fua else 0,
                            origin, data, start_both)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                     fua: bool, origin: Origin | None = None) -> Operation[None, None]:
        flags = ((0 if may_trim else _NO_HOLE) | (_FAST_ZERO if fast else 0)
                 | (_FUA if fua else 0))
        if fast:
            start_both = self._zero_fast(offset, length, may_trim, fua)
        else:
            start_both = self._on_each(
                lambda child: child.write_zeroes(offset, length, may_trim, False, fua))
        return self._change(ChangeKind.WRITE_ZEROES, offset, length, flags, origin, None,
                            start_both)

    def _zero_fast(self, offset: int, length: int, may_trim: bool,
                   fua: bool) -> Starter[None]:
        """FAST_ZERO must fail with ENOTSUP rather than be slow, but must never leave
        one child zeroed and the other not: the reference goes first, and once it
        has zeroed quickly, the test child zeroes however it can."""
        def start_both() -> tuple[Pending[None], Pending[None]]:
            reference = self.raw.write_zeroes(offset, length, may_trim, True, fua)

            async def after_reference() -> None:
                try:
                    await reference
                except ChildError:
                    return  # the device reports the reference's failure; TEST stays as it was
                await self.test.write_zeroes(offset, length, may_trim, False, fua)

            return reference, Later(after_reference)
        return start_both

    def trim(self, offset: int, length: int, fua: bool,
             origin: Origin | None = None) -> Operation[None, None]:
        return self._change(ChangeKind.TRIM, offset, length, _FUA if fua else 0,
                            origin, None,
                            self._on_each(lambda child: child.trim(offset, length, fua)))

    def flush(self, origin: Origin | None = None) -> Operation[None, None]:
        """Both children, always (QEMU's blkverify flushes only the test image)."""
        covers = self._changes  # what had completed when the flush began

        def conclude(raw: Outcome[None], test: Outcome[None]) -> None:
            raw_error, test_error = raw[1], test[1]
            self._changed(ChangeKind.FLUSH, 0, 0, 0, origin, raw=raw_error, test=test_error,
                          covers=covers)
            self._settle("flush", 0, 0, raw_error, test_error)

        # A flush claims no range: it covers what completed before it.
        return self._start("flush", 0, 0, False, self._on_each(lambda child: child.flush()),
                           conclude, waits_long=True)

    def cache(self, offset: int, length: int) -> Operation[None, None]:
        def conclude(raw: Outcome[None], test: Outcome[None]) -> None:
            self._settle("cache", offset, length, raw[1], test[1])

        return self._start("cache", offset, length, False,
                           self._on_each(lambda child: child.cache(offset, length)), conclude)

    def block_status(self, offset: int, length: int) -> Operation[list[Extent], list[Extent]]:
        """Allocation where both children agree: a range is a hole, or reads as
        zero, only if it is so on both. A child that cannot tell counts as data."""
        def conclude(raw: Outcome[list[Extent]], test: Outcome[list[Extent]]) -> list[Extent]:
            return merge_extents(
                raw[0] or [Extent(length, AllocationState.DATA)],
                test[0] or [Extent(length, AllocationState.DATA)],
            )

        return self._start("block_status", offset, length, False,
                           self._on_each(lambda child: child.extents(offset, length)), conclude)

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
