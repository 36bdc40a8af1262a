"""What verification finds, and how a finding is described to people and machines.

Pure: no I/O here. `compare` locates differences after a fast whole-buffer
comparison has already said there are some.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from nbdverify_protocol.constants import SECTOR_SIZE

from .classify import ClassifiedRange

# Differences are located block by block, then sector by sector inside the
# blocks that differ, so a mismatch in a 64 MiB read is found in milliseconds.
SCAN_BLOCK = 64 * 1024
HEXDUMP_ROW = 16
HEXDUMP_ROWS = 4
MAX_REPORTED_RANGES = 64


@dataclass(frozen=True, slots=True)
class Difference:
    """Where two buffers differ, in absolute device offsets."""

    first_offset: int
    differing_sectors: int
    total_sectors: int
    # Differing sector runs as [start, end) byte offsets, at most MAX_REPORTED_RANGES.
    ranges: tuple[tuple[int, int], ...]
    # (row offset, raw bytes, test bytes) for the first rows that differ.
    rows: tuple[tuple[int, bytes, bytes], ...]

    @property
    def first_sector(self) -> int:
        return self.first_offset // SECTOR_SIZE


def _sector_spans(offset: int, length: int) -> list[tuple[int, int]]:
    """Absolute [start, end) of each sector a request touches, clipped to it."""
    spans = []
    position = offset
    end = offset + length
    while position < end:
        boundary = min(end, (position // SECTOR_SIZE + 1) * SECTOR_SIZE)
        spans.append((position, boundary))
        position = boundary
    return spans


def differing_spans(raw: bytes | bytearray, test: bytes | bytearray, base: int, offset: int,
                    length: int) -> Iterator[tuple[int, int]]:
    """Absolute [start, end) of each sector (clipped to the range) where
    raw[base:base+length] and test[...] differ, for data at device `offset`: 64 KiB
    blocks are compared first, then the sectors of those that differ. Slices of
    bytes, not memoryviews: memoryview equality is 25 times slower."""
    block_start = offset
    end = offset + length
    while block_start < end:
        block_end = min(end, (block_start // SCAN_BLOCK + 1) * SCAN_BLOCK)
        lo, hi = base + block_start - offset, base + block_end - offset
        if raw[lo:hi] != test[lo:hi]:
            for start, stop in _sector_spans(block_start, block_end - block_start):
                a, b = base + start - offset, base + stop - offset
                if raw[a:b] != test[a:b]:
                    yield start, stop
        block_start = block_end


def compare(raw: bytes | bytearray, test: bytes | bytearray, base: int, offset: int,
            length: int) -> Difference | None:
    """Locate differences between raw[base:base+length] and test[...] for a
    request at device `offset`; None if they are equal."""
    differing = list(differing_spans(raw, test, base, offset, length))
    total = (offset + length - 1) // SECTOR_SIZE - offset // SECTOR_SIZE + 1 if length else 0
    if not differing:
        return None
    first_start, first_stop = differing[0]
    a = base + first_start - offset
    first = first_start + next(
        i for i in range(first_stop - first_start) if raw[a + i] != test[a + i]
    )
    return Difference(
        first_offset=first,
        differing_sectors=len(differing),
        total_sectors=total,
        ranges=tuple(_merge(differing)[:MAX_REPORTED_RANGES]),
        rows=_differing_rows(raw, test, base, offset, length, first),
    )


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def _differing_rows(raw: bytes | bytearray, test: bytes | bytearray, base: int, offset: int,
                    length: int, first: int) -> tuple[tuple[int, bytes, bytes], ...]:
    rows: list[tuple[int, bytes, bytes]] = []
    row = first - first % HEXDUMP_ROW
    end = offset + length
    while row < end and len(rows) < HEXDUMP_ROWS:
        lo = max(row, offset)
        hi = min(row + HEXDUMP_ROW, end)
        a, b = base + lo - offset, base + hi - offset
        if raw[a:b] != test[a:b]:
            rows.append((lo, bytes(raw[a:b]), bytes(test[a:b])))
        row += HEXDUMP_ROW
    return tuple(rows)


def hexdump_line(label: str, offset: int, data: bytes) -> str:
    hex_part = " ".join(f"{byte:02x}" for byte in data)
    text = "".join(chr(byte) if 32 <= byte < 127 else "." for byte in data)
    return f"{label:<4} {offset:#012x}: {hex_part:<47}  |{text}|"


@dataclass(frozen=True)
class Finding:
    """Something the two children disagree on. Subclasses say what."""

    kind: ClassVar[str]
    export: str
    operation: str
    offset: int
    length: int
    time: float = field(default_factory=time.time, kw_only=True)

    def summary(self) -> str:
        raise NotImplementedError

    def details(self) -> list[str]:
        """Further lines for people (a hexdump), after the summary."""
        return []

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, **asdict(self)}
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time)) + (
            f".{int(self.time % 1 * 1e6):06d}Z"
        )
        record["message"] = self.summary()
        return record

    @property
    def error_offset(self) -> int | None:
        """The offset to name in an NBD_REPLY_TYPE_ERROR_OFFSET chunk, if any."""
        return None

    def client_message(self) -> str:
        """Short text for the NBD error chunk (QEMU drops anything over 1000 bytes)."""
        return f"nbdverify: {self.summary()}"[:200]


@dataclass(frozen=True)
class Mismatch(Finding):
    """A read returned different bytes from the two children."""

    kind: ClassVar[str] = "mismatch"
    difference: Difference
    #: Every differing range cut at last-writer boundaries, classified (classify.py).
    ranges: tuple[ClassifiedRange, ...] = ()

    def summary(self) -> str:
        d = self.difference
        where = (f"{self.operation} offset={self.offset} length={self.length} mismatch at "
                 f"offset {d.first_offset} (sector {d.first_sector})")
        count = f"{d.differing_sectors} of {d.total_sectors} sectors differ"
        if not self.ranges:
            return f"{where}, {count}"
        spread = f" in {len(self.ranges)} ranges" if len(self.ranges) > 1 else ""
        return f"{where}: {self.ranges[0].describe()}; {count}{spread}"

    @property
    def error_offset(self) -> int | None:
        return self.difference.first_offset

    def details(self) -> list[str]:
        lines = []
        for row_offset, raw, test in self.difference.rows:
            lines.append(hexdump_line("raw", row_offset, raw))
            lines.append(hexdump_line("test", row_offset, test))
        return lines

    def as_record(self) -> dict[str, Any]:
        d = self.difference
        record = super().as_record()
        del record["difference"]
        record["ranges"] = [classified.as_record() for classified in self.ranges]
        record.update(
            mismatch_offset=d.first_offset,
            sector=d.first_sector,
            differing_sectors=d.differing_sectors,
            total_sectors=d.total_sectors,
            differing_ranges=[list(span) for span in d.ranges],
            rows=[
                {"offset": row, "raw": raw.hex(), "test": test.hex()}
                for row, raw, test in d.rows
            ],
        )
        return record


@dataclass(frozen=True)
class Divergence(Finding):
    """One child failed an operation the other completed, or they failed differently."""

    kind: ClassVar[str] = "divergence"
    raw_error: str | None
    test_error: str | None

    def summary(self) -> str:
        raw = self.raw_error or "ok"
        test = self.test_error or "ok"
        return (
            f"{self.operation} offset={self.offset} length={self.length} children diverged: "
            f"raw {raw}, test {test}"
        )
