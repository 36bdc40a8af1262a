"""What kind of corruption a mismatch is, range by range, and who last wrote it.

Pure, and run only when a read has found a mismatch, with both children's bytes
at hand. RAW is trusted, so it holds what the last writer wrote; the question is
what TEST holds instead:
- stale: what the range held before its last write (that write never reached
  TEST); torn: the same, while other sectors of that write did reach TEST.
  Both need the fingerprints of what each write replaced (--fingerprints).
- misdirected: the data of a recent write meant for another offset
  (--fingerprints keeps a CRC-32 of the start of every recent 4 KiB piece).
- zeroed: zeros; bitflip: at most BITFLIP_BITS bits differ; other: none of these.
"""

from __future__ import annotations

import enum
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nbdverify_protocol.constants import SECTOR_SIZE

from .provenance import LastWrite, Provenance, sector_pieces

BITFLIP_BITS = 8
#: Ranges listed in one finding, after cutting at last-writer boundaries.
MAX_CLASSIFIED_RANGES = 64

Buffer = bytes | bytearray | memoryview


class MismatchClass(enum.Enum):
    ZEROED = "zeroed"
    STALE = "stale"
    MISDIRECTED = "misdirected"
    TORN = "torn"
    BITFLIP = "bitflip"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ClassifiedRange:
    start: int
    end: int
    mismatch_class: MismatchClass
    #: None: initial content, not written since start.
    last_write: LastWrite | None
    #: bitflip: how many bits differ.
    bits: int | None = None
    #: misdirected: the write whose data TEST holds here, and where it was meant to go.
    source: LastWrite | None = None
    source_offset: int | None = None
    #: The two children's bytes, kept only for --dump-dir.
    raw: bytes = field(default=b"", repr=False, compare=False)
    test: bytes = field(default=b"", repr=False, compare=False)

    def describe(self) -> str:
        """The class and last writer in words, for the stderr line."""
        writer = self.last_write
        wrote = f"what {writer.describe()} wrote" if writer else "its initial content"
        kind = self.mismatch_class
        if kind is MismatchClass.STALE:
            before = writer.describe() if writer else "start"
            return f"stale, TEST still holds what was there before {before}"
        if kind is MismatchClass.TORN:
            assert writer is not None
            return (f"torn, TEST holds part of {writer.describe()}; {self.end - self.start} "
                    f"bytes at {self.start} still hold what was there before it")
        if kind is MismatchClass.MISDIRECTED:
            assert self.source is not None
            return (f"misdirected, TEST holds at {self.start} the data {self.source.describe()} "
                    f"wrote for offset {self.source_offset}, where RAW holds {wrote}")
        if kind is MismatchClass.ZEROED:
            return f"zeroed, TEST reads zeros where RAW holds {wrote}"
        if kind is MismatchClass.BITFLIP:
            bits = "1 bit differs" if self.bits == 1 else f"{self.bits} bits differ"
            return f"bitflip, {bits} from {wrote}"
        return f"other, TEST differs from {wrote}"

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "start": self.start,
            "end": self.end,
            "class": self.mismatch_class.value,
            "last_write": None if self.last_write is None else self.last_write.as_record(),
        }
        if self.bits is not None:
            record["bits"] = self.bits
        if self.source is not None:
            record["misdirected_write"] = self.source.as_record()
            record["misdirected_from"] = self.source_offset
        return record


@dataclass(frozen=True, slots=True)
class _Read:
    """Both children's bytes for a read at device offset `offset`."""

    offset: int
    raw: memoryview
    test: memoryview

    @property
    def end(self) -> int:
        return self.offset + len(self.raw)

    def raw_at(self, start: int, end: int) -> memoryview:
        return self.raw[start - self.offset:end - self.offset]

    def test_at(self, start: int, end: int) -> memoryview:
        return self.test[start - self.offset:end - self.offset]


def classify(provenance: Provenance, offset: int, raw: Buffer, test: Buffer, base: int,
             ranges: Sequence[tuple[int, int]], keep_bytes: bool = False
             ) -> tuple[ClassifiedRange, ...]:
    """Each differing range (absolute [start, end)), cut where its last writer
    changes, with its class. raw[base:] and test[base:] hold the read at `offset`."""
    read = _Read(offset, memoryview(raw)[base:], memoryview(test)[base:])
    found: list[ClassifiedRange] = []
    for start, end in ranges:
        for piece_start, piece_end, writer in provenance.writers(start, end):
            if len(found) == MAX_CLASSIFIED_RANGES:
                return tuple(found)
            classified = _classify(provenance, read, piece_start, piece_end, writer)
            if keep_bytes:
                classified = ClassifiedRange(
                    classified.start, classified.end, classified.mismatch_class,
                    classified.last_write, classified.bits, classified.source,
                    classified.source_offset, raw=bytes(read.raw_at(piece_start, piece_end)),
                    test=bytes(read.test_at(piece_start, piece_end)))
            found.append(classified)
    return tuple(found)


def _classify(provenance: Provenance, read: _Read, start: int, end: int,
              writer: LastWrite | None) -> ClassifiedRange:
    replaced = None if writer is None else provenance.replaced_fingerprints(writer)
    if writer is not None and replaced is not None and _held_before(
            read, writer, replaced, start, end):
        torn = _partly_applied(provenance, read, writer, replaced)
        kind = MismatchClass.TORN if torn else MismatchClass.STALE
        return ClassifiedRange(start, end, kind, writer)
    test = read.test_at(start, end)
    source = provenance.recent_source(test[:SECTOR_SIZE])
    if source is not None:
        sequence, source_offset = source
        if source_offset != start:
            return ClassifiedRange(start, end, MismatchClass.MISDIRECTED, writer,
                                   source=provenance.last_write(sequence),
                                   source_offset=source_offset)
        if writer is not None and sequence < writer.sequence:  # an older write's data
            return ClassifiedRange(start, end, MismatchClass.STALE, writer)
    if bytes(test) == bytes(len(test)):
        return ClassifiedRange(start, end, MismatchClass.ZEROED, writer)
    bits = (int.from_bytes(read.raw_at(start, end)) ^ int.from_bytes(test)).bit_count()
    if bits <= BITFLIP_BITS:
        return ClassifiedRange(start, end, MismatchClass.BITFLIP, writer, bits=bits)
    return ClassifiedRange(start, end, MismatchClass.OTHER, writer)


def _held_before(read: _Read, writer: LastWrite, replaced: array[int], start: int,
                 end: int) -> bool:
    """Every sector of [start, end) that can be checked holds what `writer` replaced
    (a sector only partly in the range, its rest rewritten since, cannot)."""
    checked = 0
    for (a, b), crc in zip(sector_pieces(writer.offset, writer.length), replaced, strict=True):
        if a >= start and b <= end:
            if zlib.crc32(read.test_at(a, b)) != crc:
                return False
            checked += 1
    return checked > 0


def _partly_applied(provenance: Provenance, read: _Read, writer: LastWrite,
                    replaced: array[int]) -> bool:
    """Some sector `writer` changed, and still last wrote, reached TEST."""
    own = [(a, b) for a, b, last in provenance.writers(max(writer.offset, read.offset),
                                                        min(writer.end, read.end))
           if last is not None and last.exact and last.sequence == writer.sequence]
    for (a, b), crc in zip(sector_pieces(writer.offset, writer.length), replaced, strict=True):
        if not any(start <= a and b <= end for start, end in own):
            continue
        new = read.raw_at(a, b)
        if new == read.test_at(a, b) and zlib.crc32(new) != crc:
            return True
    return False
