"""`nbdverify compare A B`: every range where two images differ, not only the first.

Block status comes first: a range both sides report as reading zero is skipped
unread, and a range one side reports as zero is read on the other side only and
checked for zeroes. The rest is read in pieces, several in flight at once (an NBD
child's reads go out before the previous piece is compared), one file's reads in a
worker thread so that they overlap the other side's, into page-aligned buffers, and
compared with memcmp; only a piece that differs is searched, by sub-blocks then
sectors, for where. A qcow2 is read through qemu-nbd, except its data that lies as
it is in the file, which is read from there (qemu_child.map_in_place).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from nbdverify_protocol.constants import AllocationState

from .children import Child, FileChild, Pending
from .findings import differing_spans
from .images import open_image, run_offline
from .journal import sector_span
from .libc import memcmp

SECTOR = 512
#: Every pair is read in 2 MiB pieces, 4 in flight beyond the one being compared. An
#: identical, page-cached 2 GiB pair compared (reads and memcmp) in ~0.7 s raw vs
#: qcow2 (its data read in place) and raw vs raw, ~1.4 s raw vs an NBD URI (qemu-nbd);
#: 1 MiB pieces cost 10% more (a thread hop per piece, ~70 us), 256 KiB pieces 16 in
#: flight as fast through NBD but 30% slower from files.
CHUNK = 2 * 1024 * 1024
DEPTH = 4
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


@dataclass
class _Piece:
    start: int
    length: int
    segment: Segment
    buffers: tuple[_Buffer, _Buffer]
    reads: list[Pending[None]]


class Comparer:
    """Compares two open images; `run` fills a Comparison."""

    def __init__(self, a: Child, b: Child, progress: Progress) -> None:
        self.a, self.b = a, b
        self.progress = progress
        self.result = Comparison(a.size, b.size)
        # One file is read in a worker thread, its copy overlapping the other side's
        # reads (in place, or through NBD): 0.7 s instead of 0.9 s for raw vs qcow2
        # above, 1.4 s instead of 1.6 s through NBD.
        self._in_thread = (a if isinstance(a, FileChild)
                           else b if isinstance(b, FileChild) else None)
        self._free = [(_Buffer(CHUNK), _Buffer(CHUNK)) for _ in range(DEPTH + 1)]
        self._zeroes = _Buffer(CHUNK)

    async def run(self) -> Comparison:
        size = min(self.a.size, self.b.size)
        plan = segments(await zero_map(self.a, size), await zero_map(self.b, size))
        in_flight: list[_Piece] = []
        for piece in self._pieces(plan):
            in_flight.append(piece)
            if len(in_flight) > DEPTH:
                await self._finish(in_flight.pop(0))
        for piece in in_flight:
            await self._finish(piece)
        return self.result

    def _pieces(self, plan: Iterator[Segment]) -> Iterator[_Piece]:
        for segment in plan:
            if segment.a_zero and segment.b_zero:
                self.result.skipped_zero += segment.end - segment.start
                self.progress.update(segment.end - segment.start)
                continue
            for start in range(segment.start, segment.end, CHUNK):
                length = min(CHUNK, segment.end - start)
                # A short piece gets buffers of its own length, to compare them whole.
                buffers = (self._free.pop() if length == CHUNK
                           else (_Buffer(length), _Buffer(length)))
                reads = [self._read(child, buffer.view, start)
                         for child, buffer, zero in ((self.a, buffers[0], segment.a_zero),
                                                     (self.b, buffers[1], segment.b_zero))
                         if not zero]
                yield _Piece(start, length, segment, buffers, reads)

    def _read(self, child: Child, buffer: memoryview, offset: int) -> Pending[None]:
        if self._in_thread is not None and child is self._in_thread:
            return self._in_thread.read_in_thread(buffer, offset)
        return child.read(buffer, offset)

    async def _finish(self, piece: _Piece) -> None:
        for read in piece.reads:
            await read
        first, second = piece.buffers
        # A side that reports zero was not read: compare the other with zeroes.
        zeroes = self._zeroes if piece.length == CHUNK else _Buffer(piece.length)
        if piece.segment.a_zero:
            first = zeroes
        elif piece.segment.b_zero:
            second = zeroes
        if not first.same_as(second):
            for start, end in differing_spans(bytes(first.view), bytes(second.view), 0,
                                              piece.start, piece.length):
                self.result.add(start, end)
        if piece.length == CHUNK:
            self._free.append(piece.buffers)
        self.progress.update(piece.length)


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
