"""The journal's binary format, version 2: encode and decode, nothing else.

A journal is a file header followed by records, all integers little-endian.

File header::

    magic     8 bytes   b"NBDVJNL\\n"
    version   u32       1
    length    u32       M, the length of the metadata that follows
    metadata  M bytes   UTF-8 JSON object: "size" (the export's size in bytes),
                        "raw" and "test" (where the children were), "export", "created"
    checksum  u64       XXH3-64 of every header byte before it

Record (64 bytes plus its payload)::

    length      u32   the whole record, these 4 bytes and the checksum included
    kind        u8    1 write, 2 write_zeroes, 3 trim, 4 flush, 5 note, 6 pad
    failed      u8    bit 0: RAW failed the request, bit 1: TEST failed it
    flags       u16   the request's NBD command flags (FUA 1, NO_HOLE 2, FAST_ZERO 16)
    sequence    u64   the device's change number, shared with provenance
    offset      u64
    count       u32   the request's length in bytes
    connection  u32   the server's connection number (0xffffffff: none)
    cookie      u64   the client's cookie
    wall        f64   completion time, seconds since the epoch
    monotonic   f64   completion time, CLOCK_MONOTONIC seconds
    payload           write: the `count` bytes written; note: UTF-8 text; pad: zeros;
                      else empty
    checksum    u64   XXH3-64 of every record byte before it (XXH3 rather than CRC-32:
                      0.7 us for a 4 KiB record instead of 1.7 us, on the writer thread
                      but under the GIL, so it slows the event loop all the same)

Records appear in the order both children completed the requests. Pad records fill
each batch the server appends up to a whole BLOCK (4 KiB), so that it can write the
journal with O_DIRECT; they carry no change, and readers skip them. Version 1 is
version 2 without pads, and is read the same way.

A server killed mid-append leaves a torn tail: a record cut short, or one whose
checksum does not match. Every reader stops at the first such record and reports where
(`JournalReader.torn`); the records before it are whole and are used. A note record
says why recording stopped (the size cap was reached, the writer failed); nothing
follows it.
"""

from __future__ import annotations

import enum
import io
import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from xxhash import xxh3_64_intdigest

MAGIC = b"NBDVJNL\n"
VERSION = 2
READABLE_VERSIONS = (1, 2)
#: The unit the server appends in (pads fill its batches up to a multiple of it).
BLOCK = 4096
NO_CONNECTION = 0xFFFF_FFFF
FAILED_RAW = 1
FAILED_TEST = 2

_HEADER_START = struct.Struct("<8sII")
_RECORD = struct.Struct("<IBBHQQIIQdd")
_CHECKSUM = struct.Struct("<Q")
_LENGTH = struct.Struct("<I")
RECORD_OVERHEAD = _RECORD.size + _CHECKSUM.size
#: A record longer than this is damage, not data (NBD requests are below 4 GiB).
MAX_RECORD = RECORD_OVERHEAD + 0xFFFF_FFFF
_MAX_METADATA = 1 << 20


class RecordKind(enum.IntEnum):
    WRITE = 1
    WRITE_ZEROES = 2
    TRIM = 3
    FLUSH = 4
    NOTE = 5
    PAD = 6


class JournalFormatError(Exception):
    """Not a journal, or a version this code cannot read."""


@dataclass(frozen=True, slots=True)
class JournalHeader:
    size: int
    raw: str = ""
    test: str = ""
    export: str = ""
    created: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {"size": self.size, "raw": self.raw, "test": self.test, "export": self.export,
                "created": self.created}


@dataclass(frozen=True, slots=True)
class Record:
    kind: RecordKind
    sequence: int
    offset: int = 0
    count: int = 0
    flags: int = 0
    connection: int | None = None
    cookie: int = 0
    wall_time: float = 0.0
    monotonic_time: float = 0.0
    failed: int = 0
    #: A write's data, or a note's UTF-8 text.
    payload: bytes = b""

    @property
    def end(self) -> int:
        return self.offset + self.count

    @property
    def touches_data(self) -> bool:
        return self.kind in (RecordKind.WRITE, RecordKind.WRITE_ZEROES, RecordKind.TRIM)

    @property
    def note(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class TornTail:
    """Where reading stopped short of the end of the file, and why."""

    position: int
    ignored_bytes: int
    reason: str


def encode_header(header: JournalHeader) -> bytes:
    metadata = json.dumps(header.metadata(), sort_keys=True).encode()
    start = _HEADER_START.pack(MAGIC, VERSION, len(metadata)) + metadata
    return start + _CHECKSUM.pack(xxh3_64_intdigest(start))


def encode_record(record: Record) -> bytes:
    buffer = bytearray(RECORD_OVERHEAD + len(record.payload))
    pack_record_into(buffer, 0, record.kind, record.failed, record.flags, record.sequence,
                     record.offset, record.count,
                     NO_CONNECTION if record.connection is None else record.connection,
                     record.cookie, record.wall_time, record.monotonic_time, record.payload)
    return bytes(buffer)


def pack_record_into(buffer: bytearray | mmap.mmap, at: int, kind: int, failed: int,
                     flags: int, sequence: int, offset: int, count: int, connection: int,
                     cookie: int, wall: float, monotonic: float,
                     payload: bytes | bytearray | memoryview) -> int:
    """Place a whole record at `at` in `buffer`; returns where it ends. The checksum
    is taken here, while the record is in the CPU's cache: on the journal's writer
    thread the same loop held the GIL 1.5 us a record, which the event loop waited for."""
    size = RECORD_OVERHEAD + len(payload)
    body_end = at + size - _CHECKSUM.size
    _RECORD.pack_into(buffer, at, size, kind, failed, flags, sequence, offset, count,
                      connection, cookie, wall, monotonic)
    buffer[at + _RECORD.size:body_end] = payload
    _CHECKSUM.pack_into(buffer, body_end, xxh3_64_intdigest(memoryview(buffer)[at:body_end]))
    return at + size


def pad_record_size(end: int) -> int:
    """The size of the pad record that, placed at `end`, ends at a BLOCK boundary
    (0: none needed; never smaller than a record)."""
    gap = -end % BLOCK
    return gap + BLOCK if 0 < gap < RECORD_OVERHEAD else gap


#: Room enough for any pad record.
MAX_PAD = BLOCK + RECORD_OVERHEAD
_ZEROS = memoryview(bytes(MAX_PAD))


def pack_pad_into(buffer: bytearray | mmap.mmap, at: int, size: int) -> int:
    """Place a pad record of `size` bytes (from pad_record_size) at `at`."""
    return pack_record_into(buffer, at, RecordKind.PAD, 0, 0, 0, 0, 0, NO_CONNECTION, 0,
                            0.0, 0.0, _ZEROS[:size - RECORD_OVERHEAD])


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    chunks: list[bytes] = []
    while count > 0:
        chunk = stream.read(count)
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def read_header(stream: BinaryIO) -> JournalHeader:
    start = _read_exact(stream, _HEADER_START.size)
    if len(start) < _HEADER_START.size or not start.startswith(MAGIC):
        raise JournalFormatError("not an nbdverify journal (no journal header)")
    _, version, length = _HEADER_START.unpack(start)
    if version not in READABLE_VERSIONS:
        raise JournalFormatError(f"journal format version {version}; this nbdverify reads "
                                 f"version {VERSION}")
    if length > _MAX_METADATA:
        raise JournalFormatError(f"damaged journal header (metadata of {length} bytes)")
    metadata = _read_exact(stream, length)
    checksum = _read_exact(stream, _CHECKSUM.size)
    if len(metadata) < length or len(checksum) < _CHECKSUM.size:
        raise JournalFormatError("journal header cut short")
    if _CHECKSUM.unpack(checksum)[0] != xxh3_64_intdigest(start + metadata):
        raise JournalFormatError("damaged journal header (checksum mismatch)")
    try:
        fields = json.loads(metadata)
        return JournalHeader(int(fields["size"]), str(fields.get("raw", "")),
                             str(fields.get("test", "")), str(fields.get("export", "")),
                             float(fields.get("created", 0.0)))
    except (ValueError, KeyError, TypeError) as error:
        raise JournalFormatError(f"damaged journal metadata: {error}") from None


def decode_record(data: bytes) -> Record:
    """One whole record (its length field through its checksum); ValueError if damaged."""
    if len(data) < RECORD_OVERHEAD:
        raise ValueError("record cut short")
    (length, kind, failed, flags, sequence, offset, count, connection, cookie, wall,
     monotonic) = _RECORD.unpack_from(data)
    if length != len(data):
        raise ValueError(f"record length {length} where {len(data)} bytes were given")
    body = memoryview(data)[:-_CHECKSUM.size]
    if _CHECKSUM.unpack_from(data, len(data) - _CHECKSUM.size)[0] != xxh3_64_intdigest(body):
        raise ValueError("checksum mismatch")
    try:
        record_kind = RecordKind(kind)
    except ValueError:
        raise ValueError(f"unknown record kind {kind}") from None
    payload = bytes(body[_RECORD.size:])
    if record_kind is RecordKind.WRITE and len(payload) != count:
        raise ValueError(f"write of {count} bytes carries {len(payload)}")
    return Record(record_kind, sequence, offset, count, flags,
                  None if connection == NO_CONNECTION else connection, cookie, wall, monotonic,
                  failed, payload)


@dataclass
class JournalReader:
    """Records from a journal file, each whole; reading stops at a torn tail and
    sets `torn`. Iterate once."""

    stream: BinaryIO
    header: JournalHeader = field(init=False)
    torn: TornTail | None = field(default=None, init=False)
    #: Bytes read so far (header included): for progress bars.
    position: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.torn = None  # compiled by mypyc, init=False fields get no default
        self.header = read_header(self.stream)
        self.position = self.stream.tell()

    def __iter__(self) -> Iterator[Record]:
        while True:
            start = _read_exact(self.stream, _LENGTH.size)
            if not start:
                return
            if len(start) < _LENGTH.size:
                self._tear("record cut short")
                return
            length = _LENGTH.unpack(start)[0]
            if not RECORD_OVERHEAD <= length <= MAX_RECORD:
                self._tear(f"bad record length {length}")
                return
            rest = _read_exact(self.stream, length - _LENGTH.size)
            if len(rest) < length - _LENGTH.size:
                self._tear(f"a {length}-byte record cut short")
                return
            try:
                record = decode_record(start + rest)
            except ValueError as error:
                self._tear(str(error))
                return
            self.position += length
            if record.kind is not RecordKind.PAD:
                yield record

    def _tear(self, reason: str) -> None:
        end = self.stream.seek(0, io.SEEK_END)
        self.torn = TornTail(self.position, end - self.position, reason)

    def describe_torn(self) -> str:
        assert self.torn is not None
        return (f"journal torn at byte {self.torn.position} ({self.torn.reason}): the "
                f"{self.torn.ignored_bytes} bytes after the last whole record are ignored")
