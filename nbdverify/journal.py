"""The write journal: `serve --journal FILE` records every change; `journal show`
prints them.

The recorder is a change observer on the event loop. Per change it only places the
record (header and data) in a batch buffer; a writer thread checksums the batch's
records, appends the batch in one write, and fdatasyncs the journal after a batch
that holds a FLUSH, so the journal is about as durable as what the guest flushed.
The event loop never waits on the file.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    FAILED_RAW,
    FAILED_TEST,
    NO_CONNECTION,
    RECORD_OVERHEAD,
    JournalFormatError,
    JournalHeader,
    JournalReader,
    Record,
    RecordKind,
    encode_header,
    pack_record_into,
    seal_record,
)
from .log import log_event
from .nbd_child import is_nbd_uri

if TYPE_CHECKING:  # the device (and all it imports) only matters to `serve`
    from .device import VerifiedDevice

_KINDS = {ChangeKind.WRITE: RecordKind.WRITE, ChangeKind.WRITE_ZEROES: RecordKind.WRITE_ZEROES,
          ChangeKind.TRIM: RecordKind.TRIM, ChangeKind.FLUSH: RecordKind.FLUSH}
#: The writer thread takes what was recorded this often.
WRITE_INTERVAL = 0.02
#: Records are placed in batch buffers of this size, reused: a fresh bytes object
#: per write costs ~1 us more (new memory) than copying into a warm buffer.
BATCH_SIZE = 4 * 1024 * 1024
#: More than this recorded and not yet written: the disk cannot keep up, so
#: recording stops (with a note) rather than the server's memory growing unbounded.
MAX_BACKLOG = 256 * 1024 * 1024
#: Room kept under the cap for the note that says recording stopped.
NOTE_ROOM = RECORD_OVERHEAD + 512


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
    """Records placed one after another, checksums still to be written."""

    __slots__ = ("buffer", "ends", "flushes", "used")

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.used = 0
        self.ends: list[int] = []
        self.flushes = False

    def clear(self) -> None:
        self.used = 0
        self.ends.clear()
        self.flushes = False


class JournalRecorder:
    """A change observer that appends every change to a journal file.

    The event loop packs each record into the current batch buffer (~1 us for a
    4 KiB write: a struct.pack_into and a memcpy, under an uncontended lock); the
    writer thread swaps the batch out every WRITE_INTERVAL, adds the checksums, writes
    it in one call and fdatasyncs if it holds a FLUSH.
    """

    def __init__(self, path: str, header: JournalHeader, max_size: int | None = None) -> None:
        self.path = path
        self.max_size = max_size
        encoded = encode_header(header)
        if max_size is not None and len(encoded) + NOTE_ROOM > max_size:
            raise JournalError(f"--journal-max-size {max_size} leaves no room for records")
        try:
            self._file = open(path, "wb", buffering=0)  # noqa: SIM115 (closed by the thread)
            self._file.write(encoded)
        except OSError as error:
            raise JournalError(f"cannot write journal {path}: {error.strerror or error}") from None
        self._lock = threading.Lock()
        self._batch = _Batch(BATCH_SIZE)
        self._full: deque[_Batch] = deque()
        self._spare: list[_Batch] = []
        #: Bytes recorded (event loop) and written to the file (writer thread).
        self._queued = self._written = len(encoded)
        self._stopped: str | None = None
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()

    # --- The event loop's side: cheap, never waits on the file ---------------------------

    def changed(self, change: Change) -> None:
        if self._stopped is not None:
            return
        kind = _KINDS[change.kind]
        payload = change.data if kind is RecordKind.WRITE and change.data is not None else b""
        queued = self._queued + RECORD_OVERHEAD + len(payload)
        if self.max_size is not None and queued + NOTE_ROOM > self.max_size:
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
            if batch.used + size > len(batch.buffer):
                self._full.append(batch)
                batch = self._batch = (self._spare.pop() if self._spare and size <= BATCH_SIZE
                                       else _Batch(max(BATCH_SIZE, size)))
            batch.used = pack_record_into(batch.buffer, batch.used, kind, failed, flags,
                                          sequence, offset, count, connection, cookie, wall,
                                          monotonic, payload)
            batch.ends.append(batch.used)
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
        self._thread.join()

    # --- The writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(WRITE_INTERVAL)
                closing = self._closing
                with self._lock:
                    if self._batch.used:
                        self._full.append(self._batch)
                        self._batch = self._spare.pop() if self._spare else _Batch(BATCH_SIZE)
                while self._full:
                    batch = self._full.popleft()
                    self._write(batch)
                    batch.clear()
                    if len(batch.buffer) == BATCH_SIZE:
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
            self._file.close()

    def _write(self, batch: _Batch) -> None:
        start = 0
        for end in batch.ends:
            seal_record(batch.buffer, start, end)
            start = end
        view = memoryview(batch.buffer)[:batch.used]
        while view:
            view = view[self._file.write(view) or 0:]
        if batch.flushes:
            os.fdatasync(self._file.fileno())
        self._written += batch.used


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
