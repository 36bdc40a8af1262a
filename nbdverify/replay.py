"""`nbdverify replay`: apply a journal to a copy of the starting image, up to any
point, to see the device as it was then."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from tqdm import tqdm

from nbdverify_protocol.constants import CommandFlag

from .children import Child
from .images import ImageError, open_image, run_offline
from .journal import open_journal
from .journal_format import FAILED_RAW, Record, RecordKind

EXIT_OK = 0
EXIT_NOT_REACHED = 1


@dataclass
class Stop:
    """Where to stop: after sequence `until`, or after the `flushes`-th FLUSH."""

    until: int | None = None
    flushes: int | None = None

    def after(self, record: Record, flushes_seen: int) -> bool:
        if self.until is not None:
            return record.sequence >= self.until
        return self.flushes is not None and flushes_seen >= self.flushes

    def describe(self) -> str:
        if self.until is not None:
            return f"sequence {self.until}"
        return f"flush {self.flushes}" if self.flushes is not None else "the end"


async def apply(child: Child, record: Record) -> None:
    """Do to `child` what the record did to RAW. Flushes are left out: only the
    content matters, and the caller flushes once at the end."""
    if record.kind is RecordKind.WRITE:
        await child.write(record.payload, record.offset, False)
    elif record.kind is RecordKind.WRITE_ZEROES:
        await child.write_zeroes(record.offset, record.count,
                                 not record.flags & CommandFlag.NO_HOLE, False, False)
    elif record.kind is RecordKind.TRIM:
        # RAW, a file, punched a hole: the trimmed range reads as zeroes there.
        await child.trim(record.offset, record.count, False)


async def replay(args: argparse.Namespace) -> int:
    reader, stream = open_journal(args.file)
    stop = Stop(args.until, args.flushes)
    applied = flushes_seen = last = 0
    note = None
    reached = False
    with stream, tqdm(total=os.fstat(stream.fileno()).st_size, unit="B", unit_scale=True,
                      desc="replay", disable=not sys.stderr.isatty()) as progress:
        async with open_image("image", args.onto, args.format, readonly=False) as child:
            if child.size != reader.header.size:
                raise ImageError(f"{args.onto} is {child.size} bytes; the journal's device "
                                 f"was {reader.header.size}")
            for record in reader:
                if record.kind is RecordKind.NOTE:
                    note = record.note
                    continue
                if stop.until is not None and record.sequence > stop.until:
                    reached = True
                    break
                if not record.failed & FAILED_RAW:
                    await apply(child, record)
                applied += 1
                last = record.sequence
                flushes_seen += record.kind is RecordKind.FLUSH
                progress.update(reader.position - progress.n)
                if stop.after(record, flushes_seen):
                    reached = True
                    break
            await child.flush()
    if reader.torn is not None:
        print(f"nbdverify: {reader.describe_torn()}", file=sys.stderr)
    if note is not None:
        print(f"nbdverify: the journal says: {note}", file=sys.stderr)
    summary = (f"replayed {applied} records (up to sequence {last}, {flushes_seen} "
               f"flush{'' if flushes_seen == 1 else 'es'}) onto {args.onto}")
    if stop.until is None and stop.flushes is None:
        print(f"nbdverify: {summary}", file=sys.stderr)
        return EXIT_OK
    if not reached:
        print(f"nbdverify: {summary}; the journal ends before {stop.describe()}",
              file=sys.stderr)
        return EXIT_NOT_REACHED
    print(f"nbdverify: {summary}", file=sys.stderr)
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    return run_offline(lambda: replay(args))
