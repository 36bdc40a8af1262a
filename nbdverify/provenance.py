"""Which request last wrote each byte of the export, in a fixed memory budget.

Pure (no I/O): a change observer the verified device feeds every completed
WRITE, WRITE_ZEROES, TRIM and FLUSH, asked only when a read finds a mismatch.

Three structures, each capped, so memory stays bounded whatever the workload:
- the map: per 16 MiB chunk of the export, sorted runs (start, sequence number)
  in two arrays, 12 bytes a run. Past RUN_CAP runs the chunks written longest
  ago are summarised into one run each: "not written since request #N".
- the records: one per change (operation, connection, cookie, offset, length,
  flags, wall and monotonic time), 53 bytes, in a ring of the last RECORD_CAP;
  older ones are forgotten, and the map still names their number.
- with fingerprints on: a CRC-32 per sector of what each write replaced (read
  from RAW by the device just before the write) in a ring of FINGERPRINT_CAP,
  and the CRC-32 of the first sector of each 4 KiB piece of the most recent
  RECENT_PIECES written, to recognise data that landed at the wrong offset.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from nbdverify_protocol.constants import SECTOR_SIZE, CommandFlag

from .changes import Change, ChangeKind

#: An insert moves at most one chunk's runs (~1700 of them after a million
#: random 4 KiB writes on 16 GiB): a few microseconds of memmove.
CHUNK_SHIFT = 24
CHUNK = 1 << CHUNK_SHIFT
RUN_CAP = 1 << 21
RECORD_CAP = 1 << 18
FINGERPRINT_CAP = 1 << 21
RECENT_PIECES = 1 << 14
PIECE = 4096

_KINDS = (ChangeKind.WRITE, ChangeKind.WRITE_ZEROES, ChangeKind.TRIM, ChangeKind.FLUSH)
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}
_WRITE_CODE = _KIND_CODES[ChangeKind.WRITE]
#: The request flags a record keeps, shifted above the two bits of the kind. A
#: plain int: `&` on an IntFlag builds a new flag object (~1 us).
_KEPT_FLAGS = int(CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO)
_FLAG_NAMES = ((CommandFlag.FUA, "fua"), (CommandFlag.NO_HOLE, "no_hole"),
               (CommandFlag.FAST_ZERO, "fast_zero"))
#: One record: kind and flags, connection (-1 none), cookie, offset, length, wall
#: and monotonic time, first fingerprint's index in the ring (-1 none); a pack
#: costs half of eight array appends.
_RECORD = struct.Struct("<BiQQQddq")
#: Records are kept in a ring of fixed pages, allocated as first needed: never
#: reallocated, since copying a growing 14 MB buffer doubles the peak memory.
PAGE_RECORDS = 4096


@dataclass(frozen=True, slots=True)
class LastWrite:
    """The last request that wrote a range, as far as the budget remembers it."""

    sequence: int
    #: A completed FLUSH that began after it, or its own FUA, covered it.
    flushed: bool
    #: False: summarised, only "not written since request #sequence" is known.
    exact: bool = True
    #: None: an exact number whose details have been forgotten (RECORD_CAP).
    operation: ChangeKind | None = None
    connection: int | None = None
    cookie: int | None = None
    offset: int = 0
    length: int = 0
    flags: int = 0
    wall_time: float = 0.0
    monotonic_time: float = 0.0

    @property
    def end(self) -> int:
        return self.offset + self.length

    def describe(self) -> str:
        """For people, e.g. `write #812 (conn 1, 4096 bytes at 1048576, flushed)`."""
        flushed = "flushed" if self.flushed else "not flushed"
        if not self.exact:
            return f"a request before #{self.sequence} (summarised, {flushed})"
        if self.operation is None:
            return f"request #{self.sequence} (details no longer kept, {flushed})"
        connection = "internal" if self.connection is None else f"conn {self.connection}"
        return (f"{self.operation.value} #{self.sequence} ({connection}, {self.length} bytes "
                f"at {self.offset}, {flushed})")

    def as_record(self) -> dict[str, Any]:
        if not self.exact:
            return {"before": self.sequence, "summarised": True, "flushed": self.flushed}
        if self.operation is None:
            return {"sequence": self.sequence, "summarised": True, "flushed": self.flushed}
        return {
            "sequence": self.sequence,
            "operation": self.operation.value,
            "connection": self.connection,
            "cookie": self.cookie,
            "offset": self.offset,
            "length": self.length,
            "flags": [name for flag, name in _FLAG_NAMES if self.flags & flag],
            "wall_time": self.wall_time,
            "monotonic_time": self.monotonic_time,
            "flushed": self.flushed,
        }


def _chunk_spans(start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(chunk number, start, end within that chunk) for each chunk [start, end) touches."""
    while start < end:
        number = start >> CHUNK_SHIFT
        base = number << CHUNK_SHIFT
        stop = min(end, base + CHUNK)
        yield number, start - base, stop - base
        start = stop


def sector_pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """[start, end) of each device sector a range touches, clipped to it: the
    units fingerprints are kept in."""
    if length <= 0:
        return []
    first = -offset % SECTOR_SIZE or SECTOR_SIZE
    cuts = [offset, *range(offset + first, offset + length, SECTOR_SIZE), offset + length]
    return list(pairwise(cuts))


class Provenance:
    def __init__(self, fingerprints: bool = False, *, run_cap: int = RUN_CAP,
                 record_cap: int = RECORD_CAP, fingerprint_cap: int = FINGERPRINT_CAP,
                 recent_pieces: int = RECENT_PIECES) -> None:
        #: The device reads what RAW holds before each write into Change.replaced.
        self.fingerprints = fingerprints
        self._run_cap = run_cap
        self._record_cap = record_cap
        self._fingerprint_cap = fingerprint_cap
        self._recent_cap = recent_pieces
        # chunk number -> (run starts within the chunk, sequence numbers); 0 is
        # initial content, -N "not written since request #N".
        self._chunks: dict[int, tuple[array[int], array[int]]] = {}
        self._runs = 0
        self.summarised_chunks = 0
        self._page_records = min(PAGE_RECORDS, record_cap)
        if record_cap % self._page_records:
            raise ValueError("record_cap must be a multiple of PAGE_RECORDS")
        self._pages: list[bytearray | None] = [None] * (record_cap // self._page_records)
        self._first = 1  # the first sequence number seen since the last gap
        self._newest = 0
        self._flushed_through = 0
        self._ring = array("I", [0]) * fingerprint_cap if fingerprints else array("I")
        self._ring_total = 0
        self._recent: dict[int, int] = {}
        self._recent_order: deque[tuple[int, int]] = deque()
        self._zero_crcs: dict[int, int] = {}

    # --- Being told ----------------------------------------------------------------------

    def changed(self, change: Change) -> None:
        sequence = change.sequence
        if sequence != self._newest + 1:  # not contiguous: forget what came before
            self._first = sequence
        self._newest = sequence
        kind = change.kind
        fingerprint_at = -1
        if kind is ChangeKind.FLUSH:
            self._flushed_through = max(self._flushed_through, change.covers)
        else:
            self._assign(change.offset, change.offset + change.length, sequence)
            if change.replaced is not None and self.fingerprints:
                fingerprint_at = self._keep_replaced(change.offset, change.replaced)
            if change.data is not None and self.fingerprints:
                self._index_pieces(sequence, change.offset, change.data)
        origin = change.origin
        # (An Enum's hash is a Python-level call: the usual kind needs no dict.)
        code = _WRITE_CODE if kind is ChangeKind.WRITE else _KIND_CODES[kind]
        page, at = divmod(sequence % self._record_cap, self._page_records)
        records = self._pages[page]
        if records is None:
            records = self._pages[page] = bytearray(self._page_records * _RECORD.size)
        _RECORD.pack_into(
            records, at * _RECORD.size, code | (change.flags & _KEPT_FLAGS) << 2,
            -1 if origin is None else origin.connection, 0 if origin is None else origin.cookie,
            change.offset, change.length, change.wall_time, change.monotonic_time,
            fingerprint_at)

    def _record(self, sequence: int) -> tuple[Any, ...] | None:
        """The fields packed for `sequence`, if still in the ring."""
        if not max(self._first, self._newest - self._record_cap + 1) <= sequence <= self._newest:
            return None
        page, at = divmod(sequence % self._record_cap, self._page_records)
        records = self._pages[page]
        assert records is not None
        return _RECORD.unpack_from(records, at * _RECORD.size)

    def _assign(self, start: int, end: int, sequence: int) -> None:
        number = start >> CHUNK_SHIFT
        # Inside one chunk, the usual case: no generator (a third of this call's cost).
        spans = ([(number, start - (number << CHUNK_SHIFT), end - (number << CHUNK_SHIFT))]
                 if start < end and (end - 1) >> CHUNK_SHIFT == number
                 else _chunk_spans(start, end))
        for number, a, b in spans:
            chunk = self._chunks.get(number)
            if chunk is None:
                chunk = self._chunks[number] = (array("I", [0]), array("q", [0]))
                self._runs += 1
            starts, sequences = chunk
            i = bisect_right(starts, a) - 1  # the run holding a
            run_start = starts[i]
            run_end = starts[i + 1] if i + 1 < len(starts) else CHUNK
            if b <= run_end:  # inside one run, the usual case: no arrays built
                self._split_run(starts, sequences, i, run_start, run_end, a, b, sequence)
            else:
                self._replace_runs(starts, sequences, i, a, b, sequence)
        if self._runs > self._run_cap:
            self._summarise()

    def _split_run(self, starts: array[int], sequences: array[int], i: int, run_start: int,
                   run_end: int, a: int, b: int, sequence: int) -> None:
        """[a, b) lies in run i, [run_start, run_end): cut it out of that run."""
        if run_start == a and b == run_end:
            sequences[i] = sequence
        elif run_start == a:
            starts.insert(i + 1, b)
            sequences.insert(i, sequence)
            self._runs += 1
        elif b == run_end:
            starts.insert(i + 1, a)
            sequences.insert(i + 1, sequence)
            self._runs += 1
        else:
            starts.insert(i + 1, a)
            starts.insert(i + 2, b)
            sequences.insert(i + 1, sequence)
            sequences.insert(i + 2, sequences[i])
            self._runs += 2

    def _replace_runs(self, starts: array[int], sequences: array[int], i: int, a: int, b: int,
                      sequence: int) -> None:
        """[a, b) starts in run i and spans several: they give way to one run."""
        j = bisect_left(starts, b, i)  # runs i..j-1 overlap [a, b)
        new_starts = [a]
        new_sequences = [sequence]
        if starts[i] < a:
            new_starts.insert(0, starts[i])
            new_sequences.insert(0, sequences[i])
        if b < (starts[j] if j < len(starts) else CHUNK):
            new_starts.append(b)
            new_sequences.append(sequences[j - 1])
        starts[i:j] = array("I", new_starts)
        sequences[i:j] = array("q", new_sequences)
        self._runs += len(new_starts) - (j - i)

    def _summarise(self) -> None:
        """Collapse the chunks written longest ago into one run each until a
        quarter of the cap is free again."""
        def newest(number: int) -> int:
            sequences = self._chunks[number][1]
            return max(max(sequences), -min(sequences) - 1)

        target = self._run_cap * 3 // 4
        for number in sorted(self._chunks, key=newest):
            if self._runs <= target:
                break
            starts, _ = self._chunks[number]
            if len(starts) > 1:
                self._runs -= len(starts) - 1
                self._chunks[number] = (array("I", [0]), array("q", [-(newest(number) + 1)]))
                self.summarised_chunks += 1

    def _keep_replaced(self, offset: int, replaced: bytes | bytearray | memoryview) -> int:
        """Store a CRC-32 per sector of the replaced bytes; their first ring index."""
        view = memoryview(replaced)
        if offset % SECTOR_SIZE == 0:  # the usual case, without building the pieces
            crcs = array("I", [zlib.crc32(view[at:at + SECTOR_SIZE])
                               for at in range(0, len(view), SECTOR_SIZE)])
        else:
            crcs = array("I", [zlib.crc32(view[a - offset:b - offset])
                               for a, b in sector_pieces(offset, len(view))])
        capacity = self._fingerprint_cap
        if len(crcs) > capacity:
            return -1
        first = self._ring_total
        at = first % capacity
        head = min(len(crcs), capacity - at)
        self._ring[at:at + head] = crcs[:head]
        self._ring[:len(crcs) - head] = crcs[head:]
        self._ring_total += len(crcs)
        return first

    def _zero_crc(self, length: int) -> int:
        crc = self._zero_crcs.get(length)
        if crc is None:
            crc = self._zero_crcs[length] = zlib.crc32(bytes(length))
        return crc

    def _index_pieces(self, sequence: int, offset: int,
                      data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for at in range(0, len(view), PIECE):
            head = view[at:at + SECTOR_SIZE]  # a sector names the piece at an eighth the cost
            crc = zlib.crc32(head)
            if crc == self._zero_crc(len(head)):
                continue  # zeros are everywhere: they name no write
            key = len(head) << 32 | crc
            value = sequence << 64 | offset + at
            self._recent[key] = value
            self._recent_order.append((key, value))
        while len(self._recent_order) > self._recent_cap:
            key, value = self._recent_order.popleft()
            if self._recent.get(key) == value:
                del self._recent[key]

    # --- Being asked ----------------------------------------------------------------------

    def writers(self, start: int, end: int) -> list[tuple[int, int, LastWrite | None]]:
        """[start, end) cut where the last writer changes, each piece with it
        (None: initial content, never written since start)."""
        pieces: list[tuple[int, int, int]] = []
        for number, a, b in _chunk_spans(start, end):
            base = number << CHUNK_SHIFT
            chunk = self._chunks.get(number)
            if chunk is None:
                found = [(base + a, base + b, 0)]
            else:
                starts, sequences = chunk
                i = bisect_right(starts, a) - 1
                found = []
                while i < len(starts) and starts[i] < b:
                    run_end = starts[i + 1] if i + 1 < len(starts) else CHUNK
                    found.append((base + max(a, starts[i]), base + min(b, run_end), sequences[i]))
                    i += 1
            for piece in found:
                if pieces and pieces[-1][2] == piece[2] and pieces[-1][1] == piece[0]:
                    pieces[-1] = (pieces[-1][0], piece[1], piece[2])
                else:
                    pieces.append(piece)
        return [(a, b, self.last_write(code)) for a, b, code in pieces]

    def last_write(self, code: int) -> LastWrite | None:
        if code == 0:
            return None
        if code < 0:
            return LastWrite(-code, flushed=-code - 1 <= self._flushed_through, exact=False)
        record = self._record(code)
        if record is None:
            return LastWrite(code, flushed=code <= self._flushed_through)
        kind, connection, cookie, offset, length, wall, monotonic, _ = record
        flags = kind >> 2
        return LastWrite(
            code,
            flushed=bool(flags & CommandFlag.FUA) or code <= self._flushed_through,
            operation=_KINDS[kind & 3],
            connection=None if connection < 0 else connection,
            cookie=None if connection < 0 else cookie,
            offset=offset,
            length=length,
            flags=flags,
            wall_time=wall,
            monotonic_time=monotonic,
        )

    def replaced_fingerprints(self, write: LastWrite) -> array[int] | None:
        """The CRC-32 of each sector (sector_pieces) that `write` replaced, if kept."""
        record = None if not write.exact else self._record(write.sequence)
        if record is None or write.operation is not ChangeKind.WRITE:
            return None
        first = record[-1]
        count = len(sector_pieces(write.offset, write.length))
        capacity = self._fingerprint_cap
        if first < 0 or first < self._ring_total - capacity:
            return None  # overwritten in the ring since
        at = first % capacity
        head = min(count, capacity - at)
        return self._ring[at:at + head] + self._ring[:count - head]

    def recent_source(self, data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
        """(sequence, offset) of a recent WRITE with a 4 KiB piece that began with
        `data` (its first sector, or all of a shorter piece)."""
        value = self._recent.get(len(data) << 32 | zlib.crc32(data))
        return None if value is None else (value >> 64, value & (1 << 64) - 1)

    def memory_bytes(self) -> int:
        """Roughly what the structures hold, for the statistics record."""
        arrays: list[array[Any]] = [a for chunk in self._chunks.values() for a in chunk]
        return (sum(sys.getsizeof(a) for a in arrays) + sys.getsizeof(self._ring)
                + sum(sys.getsizeof(page) for page in self._pages if page is not None)
                + sys.getsizeof(self._chunks)
                + sys.getsizeof(self._recent) + sys.getsizeof(self._recent_order)
                + len(self._recent) * 150)
