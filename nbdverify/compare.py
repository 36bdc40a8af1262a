"""`nbdverify compare A B`: every range where two images differ, not only the first.

Block status comes first: a range both sides report as reading zero is skipped
unread, and a range one side reports as zero is read on the other side only and
checked for zeroes. The rest is read in pieces into page-aligned buffers and compared
with memcmp: by worker threads, a whole piece each, where both sides are local files;
otherwise on the event loop, several in flight at once (an NBD child's reads go out
before the previous piece is compared). Only a piece that differs is searched, by
sub-blocks then sectors, for where. A qcow2 is read through qemu-nbd, except its
data that lies as it is in the file, which is read from there
(qemu_child.map_in_place).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import trio

from nbdverify_protocol.constants import AllocationState

from .children import Child, ChildError, FileChild, Pending
from .findings import differing_spans
from .images import open_image, run_offline
from .journal import sector_span
from .libc import memcmp
from .qemu_child import QemuChild

SECTOR = 512
#: Every pair is read in 2 MiB pieces, 4 in flight beyond the one being compared. An
#: identical, page-cached 2 GiB pair compared (reads and memcmp) in ~0.7 s raw vs
#: qcow2 (its data read in place) and raw vs raw, ~1.4 s raw vs an NBD URI (qemu-nbd);
#: 1 MiB pieces cost 10% more (a thread hop per piece, ~70 us), 256 KiB pieces 16 in
#: flight as fast through NBD but 30% slower from files.
CHUNK = 2 * 1024 * 1024
DEPTH = 4
#: Threads reading and comparing a local pair: one per core (on 2 cores, 3 measured slower).
LOCAL_WORKERS = max(1, min(4, len(os.sched_getaffinity(0))))
PAGE = 4096
#: Block status asks for at most this much at once (NBD lengths are 32-bit).
STATUS_STEP = 1 << 30

EXIT_IDENTICAL = 0
EXIT_DIFFERENT = 1


class Progress(Protocol):
    def update(self, n: int, /) -> object: ...


class _NoProgress:
    def update(self, n: int, /) -> None:
        pass


def progress_bar(total: int) -> AbstractContextManager[Progress]:
    """A progress bar on a terminal; none elsewhere, and then tqdm is not even imported
    (with what it imports, ~15 ms of start-up)."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(_NoProgress())
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="compare")


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the images with the same block status on each side."""

    start: int
    end: int
    a_zero: bool
    b_zero: bool


async def zero_map(child: Child, size: int) -> list[tuple[int, bool]]:
    """(length, reads as zero) for the whole of `child` up to `size`."""
    pieces: list[tuple[int, bool]] = []
    position = 0
    while position < size:
        extents = await child.extents(position, min(STATUS_STEP, size - position))
        for extent in extents:
            length = min(extent.length, size - position)
            if length <= 0:
                break
            pieces.append((length, bool(extent.state & AllocationState.ZERO)))
            position += length
        if not extents:
            pieces.append((size - position, False))
            position = size
    return pieces


def segments(a: list[tuple[int, bool]], b: list[tuple[int, bool]]) -> Iterator[Segment]:
    """Walk two zero maps of the same total length together, merging alike neighbours."""
    i = j = position = 0
    left_a = a[0][0] if a else 0
    left_b = b[0][0] if b else 0
    pending: Segment | None = None
    while i < len(a) and j < len(b):
        step = min(left_a, left_b)
        piece = Segment(position, position + step, a[i][1], b[j][1])
        if pending and (pending.a_zero, pending.b_zero) == (piece.a_zero, piece.b_zero):
            pending = Segment(pending.start, piece.end, piece.a_zero, piece.b_zero)
        else:
            if pending:
                yield pending
            pending = piece
        position += step
        left_a -= step
        left_b -= step
        if left_a == 0:
            i += 1
            left_a = a[i][0] if i < len(a) else 0
        if left_b == 0:
            j += 1
            left_b = b[j][0] if j < len(b) else 0
    if pending:
        yield pending


@dataclass
class Comparison:
    size_a: int
    size_b: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    skipped_zero: int = 0

    @property
    def identical(self) -> bool:
        return self.size_a == self.size_b and not self.ranges

    def add(self, start: int, end: int) -> None:
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1] = (self.ranges[-1][0], end)
        else:
            self.ranges.append((start, end))


class _Buffer:
    """A page-aligned window into a bytearray, and its address for memcmp. A preadv
    into a destination 16 bytes past a page boundary (where malloc puts a big
    bytearray's data) ran at 1.6-2.2 GB/s here, into a page-aligned one at 6.1 GB/s
    (the whole compare of 2 GiB: 2.7 s against qemu-img's 0.9 s)."""

    def __init__(self, length: int) -> None:
        self._storage = bytearray(length + PAGE)
        # The ctypes view pins the bytearray (no resize), so the address stays valid.
        self._pinned = (ctypes.c_char * len(self._storage)).from_buffer(self._storage)
        base = ctypes.addressof(self._pinned)
        start = -base % PAGE
        self.address = base + start
        self.view = memoryview(self._storage)[start:start + length]

    def same_as(self, other: _Buffer) -> bool:
        order: int = memcmp(self.address, other.address, len(self.view))
        return order == 0


@dataclass(frozen=True, slots=True)
class _Piece:
    """Up to CHUNK bytes of a segment, compared as one."""

    start: int
    length: int
    segment: Segment


_Buffers = tuple[_Buffer, _Buffer]


def _local(child: Child) -> FileChild | QemuChild | None:
    """`child`, if it may hold data a worker thread can read from a file directly."""
    if isinstance(child, FileChild) or (isinstance(child, QemuChild) and child.reads_in_place):
        return child
    return None


class Comparer:
    """Compares two open images; `run` fills a Comparison.

    Where both sides are local files (a qcow2's data read in place included), worker
    threads read and compare whole pieces, each piece on one core while its bytes
    are in that core's cache: 0.43 s for a 2 GiB raw pair in two such threads here,
    0.8 s in one, 1.3-1.5 s reading A in a thread and B on the event loop and
    comparing there (the memcmp then read bytes another core had copied). Otherwise
    the event loop reads both sides, several pieces in flight, one file's reads in a
    worker thread so that they overlap the NBD side's: 1.4 s instead of 1.6 s.
    """

    def __init__(self, a: Child, b: Child, progress: Progress) -> None:
        self.a, self.b = a, b
        self.progress = progress
        self.result = Comparison(a.size, b.size)
        local_a, local_b = _local(a), _local(b)
        self._local = (local_a, local_b) if local_a and local_b else None
        self._in_thread = (None if self._local is not None
                           else a if isinstance(a, FileChild)
                           else b if isinstance(b, FileChild) else None)
        self._free = [(_Buffer(CHUNK), _Buffer(CHUNK)) for _ in range(DEPTH + 1)]
        self._zeroes = _Buffer(CHUNK)  # never written: shared by the worker threads
        self._found: list[tuple[int, int]] = []  # differing ranges, in any order
        self._lock = threading.Lock()  # for _found and progress: worker threads add to them

    async def run(self) -> Comparison:
        size = min(self.a.size, self.b.size)
        plan = segments(await zero_map(self.a, size), await zero_map(self.b, size))
        pieces: Iterable[_Piece] = self._pieces(plan)
        if self._local is not None:
            pieces = await self._compare_locally(list(pieces))
        await self._compare_on_loop(pieces)
        for start, end in sorted(self._found):
            self.result.add(start, end)
        return self.result

    def _pieces(self, plan: Iterator[Segment]) -> Iterator[_Piece]:
        for segment in plan:
            if segment.a_zero and segment.b_zero:
                self.result.skipped_zero += segment.end - segment.start
                self.progress.update(segment.end - segment.start)
                continue
            for start in range(segment.start, segment.end, CHUNK):
                yield _Piece(start, min(CHUNK, segment.end - start), segment)

    # --- Both sides in local files: worker threads ------------------------------------

    async def _compare_locally(self, pieces: list[_Piece]) -> list[_Piece]:
        """Compare `pieces` in LOCAL_WORKERS threads; return those not all in local
        files (a qcow2's compressed clusters, say), for the event loop."""
        left_over: list[_Piece] = []
        errors: list[ChildError] = []
        stop = threading.Event()  # a failure, or the command cancelled

        def work(first: int) -> None:
            assert self._local is not None
            reusable = (_Buffer(CHUNK), _Buffer(CHUNK))
            for piece in pieces[first::LOCAL_WORKERS]:
                if stop.is_set():
                    return
                buffers = reusable if piece.length == CHUNK else _own_buffers(piece)
                # A qcow2 side first: if its piece is not all in place it says so before
                # the file side is read for nothing (the loop reads the piece again).
                sides = sorted(_sides(self._local, buffers, piece),
                               key=lambda side: isinstance(side[0], FileChild))
                try:
                    read = all(zero or child.read_locally(buffer.view, piece.start)
                               for child, buffer, zero in sides)
                except ChildError as error:
                    errors.append(error)
                    stop.set()
                    return
                if read:
                    self._check(piece, buffers)
                else:
                    with self._lock:
                        left_over.append(piece)

        try:
            async with trio.open_nursery() as nursery:
                for first in range(LOCAL_WORKERS):
                    nursery.start_soon(partial(trio.to_thread.run_sync, work, first,
                                               abandon_on_cancel=True))
        finally:
            stop.set()
        if errors:
            raise min(errors, key=lambda error: error.offset)
        return sorted(left_over, key=lambda piece: piece.start)

    # --- Otherwise: the event loop ------------------------------------------------------

    async def _compare_on_loop(self, pieces: Iterable[_Piece]) -> None:
        in_flight: list[tuple[_Piece, _Buffers, list[Pending[None]]]] = []
        for piece in pieces:
            buffers = self._free.pop() if piece.length == CHUNK else _own_buffers(piece)
            reads = [self._read(child, buffer.view, piece.start)
                     for child, buffer, zero in _sides((self.a, self.b), buffers, piece)
                     if not zero]
            in_flight.append((piece, buffers, reads))
            if len(in_flight) > DEPTH:
                await self._finish(*in_flight.pop(0))
        for started in in_flight:
            await self._finish(*started)

    def _read(self, child: Child, buffer: memoryview, offset: int) -> Pending[None]:
        if self._in_thread is not None and child is self._in_thread:
            return self._in_thread.read_in_thread(buffer, offset)
        return child.read(buffer, offset)

    async def _finish(self, piece: _Piece, buffers: _Buffers, reads: list[Pending[None]]
                      ) -> None:
        for read in reads:
            await read
        self._check(piece, buffers)
        if piece.length == CHUNK:
            self._free.append(buffers)

    # --- Either way -----------------------------------------------------------------------

    def _check(self, piece: _Piece, buffers: _Buffers) -> None:
        """Compare a piece as read into `buffers`; note where it differs. A side that
        reports zero was not read: zeroes stand in for it."""
        zeroes = self._zeroes if piece.length == CHUNK else _Buffer(piece.length)
        first, second = (zeroes if piece.segment.a_zero else buffers[0],
                         zeroes if piece.segment.b_zero else buffers[1])
        differing: list[tuple[int, int]] = []
        if not first.same_as(second):
            differing.extend(differing_spans(bytes(first.view), bytes(second.view), 0,
                                             piece.start, piece.length))
        with self._lock:
            self._found.extend(differing)
            self.progress.update(piece.length)


C = TypeVar("C", bound=Child)


def _sides(children: tuple[C, C], buffers: _Buffers,
           piece: _Piece) -> tuple[tuple[C, _Buffer, bool], tuple[C, _Buffer, bool]]:
    """(child, its buffer, whether it reports zero here) for A and for B."""
    return ((children[0], buffers[0], piece.segment.a_zero),
            (children[1], buffers[1], piece.segment.b_zero))


def _own_buffers(piece: _Piece) -> _Buffers:
    """A short piece gets buffers of its own length, to compare them whole."""
    return _Buffer(piece.length), _Buffer(piece.length)


def report(args: argparse.Namespace, result: Comparison) -> None:
    if args.json:
        print(json.dumps({
            "identical": result.identical,
            "a": {"image": args.a, "size": result.size_a},
            "b": {"image": args.b, "size": result.size_b},
            "sizes_differ": result.size_a != result.size_b,
            "skipped_zero_bytes": result.skipped_zero,
            "ranges": [{"offset": start, "length": end - start, "first_sector": start // SECTOR,
                        "last_sector": (end - 1) // SECTOR} for start, end in result.ranges],
        }))
        return
    if result.size_a != result.size_b:
        print(f"Sizes differ: A {args.a} is {result.size_a} bytes, B {args.b} is "
              f"{result.size_b} bytes (compared the first {min(result.size_a, result.size_b)})")
    if result.identical:
        print("Images are identical.")
        return
    if result.ranges:
        total = sum(end - start for start, end in result.ranges)
        print(f"{len(result.ranges)} differing ranges, {total} bytes:")
        for start, end in result.ranges:
            print(f"  {sector_span(start, end)} (offset {start}, {end - start} bytes)")


async def compare(args: argparse.Namespace) -> int:
    in_place = not args.through_qemu
    async with open_image("A", args.a, args.format_a, in_place=in_place) as a, \
            open_image("B", args.b, args.format_b, in_place=in_place) as b:
        with progress_bar(min(a.size, b.size)) as progress:
            result = await Comparer(a, b, progress).run()
    report(args, result)
    return EXIT_IDENTICAL if result.identical else EXIT_DIFFERENT


def main(args: argparse.Namespace) -> int:
    return run_offline(lambda: compare(args))
