"""The write journal: `serve --journal FILE` records every change; `journal show`
prints them.

The recorder is a change observer on the event loop. Per change it only places the
whole record (header, data, checksum) in a batch buffer; a writer thread appends the
batch in one write (with O_DIRECT where it can: no copy into the page cache), and
fdatasyncs the journal after a batch that holds a FLUSH, so the journal is about as
durable as what the guest flushed. The event loop never waits on the file.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import mmap
import os
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from nbdverify_protocol.constants import CommandFlag

from .changes import Change, ChangeKind
from .journal_format import (
    BLOCK,
    FAILED_RAW,
    FAILED_TEST,
    MAX_PAD,
    NO_CONNECTION,
    RECORD_OVERHEAD,
    JournalFormatError,
    JournalHeader,
    JournalReader,
    Record,
    RecordKind,
    encode_header,
    pack_pad_into,
    pack_record_into,
    pad_record_size,
)
from .log import log_event
from .nbd_child import is_nbd_uri

if TYPE_CHECKING:  # the device (and all it imports) only matters to `serve`
    from .device import VerifiedDevice

_KINDS = {ChangeKind.WRITE: RecordKind.WRITE, ChangeKind.WRITE_ZEROES: RecordKind.WRITE_ZEROES,
          ChangeKind.TRIM: RecordKind.TRIM, ChangeKind.FLUSH: RecordKind.FLUSH}
#: The writer thread takes what was recorded this often.
WRITE_INTERVAL = 0.02
#: Records are placed in batch buffers of this size, reused: a fresh buffer per
#: write costs ~1 us more (new memory) than copying into a warm one.
BATCH_SIZE = 4 * 1024 * 1024
#: More than this recorded and not yet written: the disk cannot keep up, so
#: recording stops (with a note) rather than the server's memory growing unbounded.
MAX_BACKLOG = 256 * 1024 * 1024
#: Room kept under the cap for the note that says recording stopped, and the pad
#: of the batch it may begin.
NOTE_ROOM = RECORD_OVERHEAD + 512 + MAX_PAD


class JournalError(Exception):
    """The journal cannot be opened or read."""


_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`4096`, `64K`, `512M`, `2G`, `1TiB`: binary multiples, as qemu-img's sizes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 4096, 64M or 2G)")
    return int(match.group(1)) << (10 * " kmgt".index(match.group(2).lower() or " "))


class _Batch:
    """Records placed one after another, to be written in one call. Its buffer is an
    anonymous mapping, page-aligned as O_DIRECT needs, with room left at the end for
    the pad that fills the batch up to a whole BLOCK."""

    __slots__ = ("buffer", "flushes", "room", "used")

    def __init__(self, size: int) -> None:
        self.buffer = mmap.mmap(-1, _buffer_length(size))
        self.room = len(self.buffer) - MAX_PAD
        self.used = 0
        self.flushes = False

    def clear(self) -> None:
        self.used = 0
        self.flushes = False


def _buffer_length(size: int) -> int:
    """A batch buffer for `size` bytes of records: their pad's room, whole blocks."""
    return -(-(size + MAX_PAD) // BLOCK) * BLOCK


def _open_for_append(path: str, direct: bool) -> tuple[int, bool]:
    """The journal's descriptor, with O_DIRECT where asked and the file system takes
    it (True): the writer then never copies records into the page cache. A buffered
    append of a 4 KiB record cost the writer 8 us of kernel time an I/O under fio's
    load, one with O_DIRECT under 1 us; at 15-20k writes a second on two cores that
    was a tenth of the server's CPU."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as error:
            if error.errno != errno.EINVAL:  # tmpfs and others refuse O_DIRECT so
                raise
    return os.open(path, flags, 0o666), False


class JournalRecorder:
    """A change observer that appends every change to a journal file.

    The event loop places each whole record in the current batch buffer (~1.5 us
    for a 4 KiB write: a struct.pack_into, a memcpy and a checksum, under an
    uncontended lock); the writer thread takes the batch every WRITE_INTERVAL, pads
    it to a whole BLOCK, writes it in one call and fdatasyncs if it holds a FLUSH.
    """

    def __init__(self, path: str, header: JournalHeader, max_size: int | None = None,
                 direct: bool = True) -> None:
        self.path = path
        self.max_size = max_size
        batch = _Batch(BATCH_SIZE)
        encoded = encode_header(header)
        batch.buffer[:len(encoded)] = encoded
        batch.used = len(encoded)
        block = batch.used + pad_record_size(batch.used)
        if max_size is not None and block + MAX_PAD + NOTE_ROOM > max_size:
            raise JournalError(f"--journal-max-size {max_size} leaves no room for records")
        try:
            self._fd, self.direct = _open_for_append(path, direct)
            try:
                self._append(batch)
            except OSError as error:
                os.close(self._fd)
                if not (self.direct and error.errno == errno.EINVAL):
                    raise
                # Some file systems take O_DIRECT at open and refuse its writes.
                self._fd, self.direct = _open_for_append(path, False)
                self._append(batch)
        except OSError as error:
            raise JournalError(f"cannot write journal {path}: {error.strerror or error}") from None
        batch.clear()
        self._lock = threading.Lock()
        #: The batch records go to; None until the first after the writer took one.
        self._batch: _Batch | None = None
        self._full: deque[_Batch] = deque()
        self._spare: list[_Batch] = [batch]
        #: Bytes recorded (event loop) and written (writer thread), each batch counted
        #: with MAX_PAD for its pad: what the file will hold at most.
        self._queued = self._written = block
        self._stopped: str | None = None
        self._wake = threading.Event()
        self._closing = False
        # Not `_thread`: compiled by mypyc that became the C keyword __thread.
        self._writer = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._writer.start()

    # --- The event loop's side: cheap, never waits on the file ---------------------------

    def changed(self, change: Change) -> None:
        if self._stopped is not None:
            return
        kind = _KINDS[change.kind]
        payload = change.data if kind is RecordKind.WRITE and change.data is not None else b""
        queued = self._queued + RECORD_OVERHEAD + len(payload)
        if self.max_size is not None and queued + MAX_PAD + NOTE_ROOM > self.max_size:
            self.stop(change.sequence, f"the journal reached its cap of {self.max_size} bytes")
        elif queued - self._written > MAX_BACKLOG:
            self.stop(change.sequence, f"the writer fell {MAX_BACKLOG} bytes behind")
        else:
            origin = change.origin
            self._place(kind, (FAILED_RAW if change.raw_failed else 0)
                        | (FAILED_TEST if change.test_failed else 0), change.flags,
                        change.sequence, change.offset, change.length,
                        NO_CONNECTION if origin is None else origin.connection,
                        0 if origin is None else origin.cookie, change.wall_time,
                        change.monotonic_time, payload)

    def _place(self, kind: RecordKind, failed: int, flags: int, sequence: int, offset: int,
               count: int, connection: int, cookie: int, wall: float, monotonic: float,
               payload: bytes | bytearray | memoryview) -> None:
        size = RECORD_OVERHEAD + len(payload)
        with self._lock:
            batch = self._batch
            if batch is None or batch.used + size > batch.room:
                if batch is not None:
                    self._full.append(batch)
                batch = self._batch = (self._spare.pop() if self._spare and size <= BATCH_SIZE
                                       else _Batch(max(BATCH_SIZE, size)))
                self._queued += MAX_PAD
            batch.used = pack_record_into(batch.buffer, batch.used, kind, failed, flags,
                                          sequence, offset, count, connection, cookie, wall,
                                          monotonic, payload)
            if kind is RecordKind.FLUSH:
                batch.flushes = True
            self._queued += size

    def stop(self, sequence: int, reason: str) -> None:
        """Stop recording, once: say so in the log and, as the last record, in the journal."""
        if self._stopped is not None:
            return
        self._stopped = reason
        text = f"recording stopped before sequence {sequence}: {reason}"
        log_event(logging.WARNING, "journal-stopped", f"journal {self.path}: {text}",
                  sequence=sequence)
        self._place(RecordKind.NOTE, 0, 0, sequence, 0, 0, NO_CONNECTION, 0, time.time(),
                    time.monotonic(), text.encode())

    @property
    def stopped(self) -> str | None:
        """Why recording stopped, or None while it records."""
        return self._stopped

    def close(self) -> None:
        """Write what is recorded and close the file. Blocks: call from a thread."""
        self._closing = True
        self._wake.set()
        self._writer.join()

    # --- The writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(WRITE_INTERVAL)
                closing = self._closing
                with self._lock:
                    if self._batch is not None:
                        self._full.append(self._batch)
                        self._batch = None
                while self._full:
                    batch = self._full.popleft()
                    self._written += self._append(batch) + MAX_PAD
                    batch.clear()
                    if len(batch.buffer) == _buffer_length(BATCH_SIZE):
                        with self._lock:
                            self._spare.append(batch)
                if closing:
                    break
        except OSError as error:
            self._stopped = self._stopped or "write failed"
            log_event(logging.ERROR, "journal-failed",
                      f"journal {self.path}: cannot write: {error.strerror or error}; "
                      "recording stopped")
        finally:
            os.close(self._fd)

    def _append(self, batch: _Batch) -> int:
        """Pad and write one batch; returns its length before the pad."""
        buffer, used = batch.buffer, batch.used
        pad = pad_record_size(used)
        if pad:
            pack_pad_into(buffer, used, pad)
        with memoryview(buffer) as whole:
            view = whole[:used + pad]
            while view:
                # Two statements: compiled by mypyc, a call inside a memoryview's (or
                # bytearray's) slice bound runs twice, so this wrote every batch twice.
                written = os.write(self._fd, view)
                view = view[written:]
            view.release()
        if batch.flushes:
            os.fdatasync(self._fd)
        return used


def record_device(device: VerifiedDevice, path: str, max_size: int | None,
                  raw: str, test: str) -> JournalRecorder:
    """Start journaling every change of `device` to `path`; JournalError if it cannot.
    `raw` and `test` name the children as given (crashcheck reopens RAW)."""
    raw, test = (target if is_nbd_uri(target) else os.path.abspath(target)
                 for target in (raw, test))
    header = JournalHeader(device.size, raw, test, device.export_name, time.time())
    recorder = JournalRecorder(path, header, max_size)
    device.observers.append(recorder)
    return recorder


# --- journal show ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Selection:
    """Which records `journal show` prints: byte range, sequence range, or one byte."""

    offsets: tuple[int, int] | None = None
    sequences: tuple[int, int] | None = None
    at: int | None = None

    def __contains__(self, record: Record) -> bool:
        if self.sequences is not None and not (
                self.sequences[0] <= record.sequence <= self.sequences[1]):
            return False
        if self.at is not None:
            return record.touches_data and record.offset <= self.at < record.end
        if self.offsets is not None:
            start, end = self.offsets
            return record.touches_data and record.offset < end and start < record.end
        return True


def parse_range(text: str, size: bool) -> tuple[int, int]:
    """`A-B` (both inclusive for sequences; for offsets B is exclusive), `A-`, or `A`."""
    first, dash, last = text.partition("-")
    parse = parse_size if size else _parse_int
    start = parse(first)
    if not dash:
        return (start, start + 1) if size else (start, start)
    return start, parse(last) if last else 1 << 64


def _parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _flag_names(record: Record) -> list[str]:
    names = [flag.name for flag in (CommandFlag.FUA, CommandFlag.NO_HOLE, CommandFlag.FAST_ZERO)
             if record.flags & flag and flag.name]
    if record.failed & FAILED_RAW:
        names.append("RAW-FAILED")
    if record.failed & FAILED_TEST:
        names.append("TEST-FAILED")
    return names


def _timestamp(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1e6):06d}Z"


def sector_span(start: int, end: int) -> str:
    """`sector N` or `sectors N-M` for the bytes start..end-1."""
    first, last = start // 512, (max(end, start + 1) - 1) // 512
    return f"sector {first}" if first == last else f"sectors {first}-{last}"


def describe(record: Record) -> str:
    """One line for people."""
    head = f"{record.sequence:>8} {_timestamp(record.wall_time)} {record.kind.name.lower():<12}"
    if record.kind is RecordKind.NOTE:
        return f"{head} {record.note}"
    where = ""
    if record.touches_data:
        where = (f" offset {record.offset} length {record.count}"
                 f" ({sector_span(record.offset, record.end)})")
    flags = _flag_names(record)
    who = "" if record.connection is None else (f" conn {record.connection} "
                                                f"cookie {record.cookie:#x}")
    return f"{head}{where}{' ' + ','.join(flags) if flags else ''}{who}".rstrip()


def as_json(record: Record) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "sequence": record.sequence, "kind": record.kind.name.lower(),
        "wall_time": record.wall_time, "monotonic_time": record.monotonic_time,
    }
    if record.kind is RecordKind.NOTE:
        entry["note"] = record.note
        return entry
    if record.touches_data:
        entry.update(offset=record.offset, length=record.count,
                     first_sector=record.offset // 512,
                     last_sector=(max(record.end, record.offset + 1) - 1) // 512)
    entry.update(flags=_flag_names(record), connection=record.connection, cookie=record.cookie)
    return entry


def open_journal(path: str) -> tuple[JournalReader, Any]:
    """A reader on `path` and the file to close; JournalError if it is not a journal."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except OSError as error:
        raise JournalError(f"cannot open journal {path}: {error.strerror or error}") from None
    try:
        return JournalReader(stream), stream
    except JournalFormatError as error:
        stream.close()
        raise JournalError(f"{path}: {error}") from None


def show(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """`nbdverify journal show`: 0, or 2 when the file is not a journal."""
    try:
        reader, stream = open_journal(args.file)
    except JournalError as error:
        print(f"nbdverify: {error}", file=sys.stderr)
        return 2
    selection = Selection(args.offset, args.sequence, args.at)
    with stream:
        for record in reader:
            if record in selection or record.kind is RecordKind.NOTE:
                print(json.dumps(as_json(record)) if args.json else describe(record), file=out)
    if reader.torn is not None:
        print(f"nbdverify: {reader.describe_torn()}", file=sys.stderr)
    return 0
