"""`nbdverify crashcheck`: after TEST crashed, does it hold what a block device must?

For every block (512-byte sector) the journal wrote, TEST must hold the content of
the last durable write to it (one that completed before a completed FLUSH, or was
written with FUA) or of a later write. Content from before that is a lost write;
content that matches no write is garbage. A block never written must hold the
starting content (--base, else RAW, which the journal never changed there).

The model keeps, per written block, a checksum of each version the journal's
writes gave it. Partly written blocks need the rest of the block: a scratch sparse
file holds the model's current content, and --base supplies a block's starting
content the first time a write touches part of it.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from nbdverify_protocol.constants import CommandFlag

from .children import Child
from .images import ImageError, open_image, run_offline
from .journal import open_journal, sector_span
from .journal_format import FAILED_TEST, JournalHeader, Record, RecordKind

BLOCK = 512
#: TEST and the reference are read this much at a time.
CHUNK = 8 * 1024 * 1024
EXIT_CONSISTENT = 0
EXIT_VIOLATIONS = 1
EXIT_ERROR = 2

#: A version whose content is not known (a partial write onto an unknown block).
UNKNOWN = b"?"
#: A trimmed block: its content is unspecified, anything is allowed.
ANYTHING = b"*"


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(slots=True)
class BlockHistory:
    """The versions one block went through, in journal order."""

    sequences: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    #: Index of the last durable version; -1: none (the starting content still counts).
    durable: int = -1
    #: Index of the last version TEST itself completed (a flush makes it durable).
    completed: int = -1


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # "lost-write", "garbage", "changed" (never written, yet differs)
    block: int
    detail: str
    lost_sequence: int | None = None
    #: Consecutive blocks with the same violation, reported as one range.
    blocks: int = 1

    def follows(self, other: Violation) -> bool:
        return (other.block + other.blocks == self.block and other.kind == self.kind
                and other.detail == self.detail)

    def describe(self) -> str:
        start, length = self.block * BLOCK, self.blocks * BLOCK
        return (f"{self.kind}: {sector_span(start, start + length)} (offset {start}, "
                f"{length} bytes): {self.detail}")

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind, "first_sector": self.block,
                                 "last_sector": self.block + self.blocks - 1,
                                 "offset": self.block * BLOCK, "length": self.blocks * BLOCK,
                                 "detail": self.detail}
        if self.lost_sequence is not None:
            entry["lost_sequence"] = self.lost_sequence
        return entry


def merge(violations: list[Violation]) -> list[Violation]:
    """Runs of neighbouring blocks with the same violation, as ranges."""
    merged: list[Violation] = []
    for violation in sorted(violations, key=lambda v: v.block):
        if merged and violation.follows(merged[-1]):
            merged[-1] = replace(merged[-1], blocks=merged[-1].blocks + 1)
        else:
            merged.append(violation)
    return merged


class Model:
    """The journal's writes, block by block: what TEST may hold after a crash."""

    def __init__(self, size: int, scratch: BinaryIO, base: Child | None) -> None:
        self.size = size
        self.blocks: dict[int, BlockHistory] = {}
        self._since_flush: set[int] = set()
        self._scratch = scratch
        self._base = base
        #: Blocks whose current content in the scratch file is what the model says.
        self._known: set[int] = set()
        self._zero_digest = digest(bytes(BLOCK))

    async def apply(self, record: Record) -> None:
        if record.kind is RecordKind.FLUSH:
            if not record.failed & FAILED_TEST:
                for block in self._since_flush:
                    history = self.blocks[block]
                    history.durable = max(history.durable, history.completed)
                self._since_flush.clear()
            return
        if not record.touches_data or not record.count:
            return
        on_test = not record.failed & FAILED_TEST
        durable = on_test and bool(record.flags & CommandFlag.FUA)
        first, last = record.offset // BLOCK, (record.end - 1) // BLOCK
        for block, start, stop in self._pieces(record, first, last):
            history = self.blocks.setdefault(block, BlockHistory())
            history.sequences.append(record.sequence)
            history.digests.append(await self._version(record, block, start, stop))
            if on_test:
                history.completed = len(history.digests) - 1
                self._since_flush.add(block)
            if durable:
                history.durable = history.completed

    @staticmethod
    def _pieces(record: Record, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """(block, start, stop): the part of each block the record covers, in bytes."""
        for block in range(first, last + 1):
            yield (block, max(record.offset, block * BLOCK) - block * BLOCK,
                   min(record.end, (block + 1) * BLOCK) - block * BLOCK)

    async def _version(self, record: Record, block: int, start: int, stop: int) -> bytes:
        """The checksum of the block's content after the record, or UNKNOWN/ANYTHING."""
        if record.kind is RecordKind.TRIM:
            self._known.discard(block)
            return ANYTHING
        whole = start == 0 and stop == BLOCK
        if record.kind is RecordKind.WRITE:
            at = block * BLOCK + start - record.offset
            part = memoryview(record.payload)[at:at + stop - start]
        else:
            part = memoryview(bytes(stop - start))
        if whole:
            self._put(block, 0, part)
            self._known.add(block)
            return self._zero_digest if record.kind is RecordKind.WRITE_ZEROES else digest(part)
        if block not in self._known:
            if self._base is None:
                self._put(block, start, part)
                return UNKNOWN
            content = bytearray(BLOCK)
            await self._base.read(memoryview(content), block * BLOCK)
            self._put(block, 0, memoryview(content))
            self._known.add(block)
        self._put(block, start, part)
        self._scratch.seek(block * BLOCK)
        return digest(self._scratch.read(BLOCK))

    def _put(self, block: int, start: int, data: memoryview) -> None:
        self._scratch.seek(block * BLOCK + start)
        self._scratch.write(data)


def judge(block: int, history: BlockHistory, found: bytes, start: bytes | None
          ) -> Violation | None:
    """Whether `found` (TEST's checksum) is allowed for the block; None if it is.
    `start` is the starting content's checksum, None when unknown."""
    allowed = history.digests[max(history.durable, 0):]
    if history.durable < 0 and start is not None and found == start:
        return None
    if found in allowed or ANYTHING in allowed:
        return None
    if UNKNOWN in allowed and history.durable < 0 and start is None:
        return None  # cannot tell: both the start and a partial version are unknown
    durable_sequence = history.sequences[history.durable] if history.durable >= 0 else None
    older = history.digests[:max(history.durable, 0)]
    if durable_sequence is not None and found in older:
        held = history.sequences[len(older) - 1 - older[::-1].index(found)]
        return Violation("lost-write", block, f"holds write {held}, from before durable "
                         f"write {durable_sequence}", durable_sequence)
    if durable_sequence is not None and start is not None and found == start:
        return Violation("lost-write", block, f"holds the starting content; durable write "
                         f"{durable_sequence} is lost", durable_sequence)
    if UNKNOWN in allowed:
        return None
    writes = ", ".join(str(s) for s in history.sequences[-5:])
    return Violation("garbage", block, f"matches no write to it (last writes: {writes})")


@dataclass
class Outcome:
    violations: list[Violation] = field(default_factory=list)
    written_blocks: int = 0
    records: int = 0
    torn: str | None = None


async def check(test: Child, reference: Child, model: Model, outcome: Outcome,
                reference_is_base: bool) -> None:
    """Read TEST and the reference side by side and judge every block."""
    written = sorted(model.blocks)
    outcome.written_blocks = len(written)
    for offset in range(0, model.size, CHUNK):
        length = min(CHUNK, model.size - offset)
        found, expected = bytearray(length), bytearray(length)
        await test.read(memoryview(found), offset)
        await reference.read(memoryview(expected), offset)
        first_block, end_block = offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK
        low = bisect.bisect_left(written, first_block)
        high = bisect.bisect_left(written, end_block)
        mine = written[low:high]
        # Never-written stretches: compared whole, at memcmp speed.
        previous = first_block
        for block in [*mine, end_block]:
            a, b = (previous - first_block) * BLOCK, (block - first_block) * BLOCK
            if a < b and found[a:b] != expected[a:b]:
                for sector in range(previous, block):
                    x = (sector - first_block) * BLOCK
                    if found[x:x + BLOCK] != expected[x:x + BLOCK]:
                        outcome.violations.append(Violation(
                            "changed", sector, "never written, yet differs from the "
                            "starting content"))
            previous = block + 1
        for block in mine:
            x = (block - first_block) * BLOCK
            start = digest(expected[x:x + BLOCK]) if reference_is_base else None
            violation = judge(block, model.blocks[block], digest(found[x:x + BLOCK]), start)
            if violation is not None:
                outcome.violations.append(violation)


async def crashcheck(args: argparse.Namespace) -> int:
    reader, stream = open_journal(args.file)
    header: JournalHeader = reader.header
    outcome = Outcome()
    reference_target = args.base or header.raw
    if not reference_target:
        raise ImageError("the journal does not name RAW: give --base IMAGE")
    with stream, tempfile.TemporaryFile() as scratch:
        async with open_image("TEST", args.test, args.format) as test, \
                open_image("reference", reference_target) as reference:
            for child in (test, reference):
                if child.size != header.size:
                    raise ImageError(f"{child.location} is {child.size} bytes; the journal's "
                                     f"device was {header.size}")
            scratch.truncate(header.size)
            model = Model(header.size, scratch, reference if args.base else None)
            for record in reader:
                if record.kind is RecordKind.NOTE:
                    raise ImageError(f"the journal is incomplete ({record.note}): later "
                                     "writes are unknown, so TEST cannot be checked")
                await model.apply(record)
                outcome.records += 1
            if reader.torn is not None:
                outcome.torn = reader.describe_torn()
            await check(test, reference, model, outcome, reference_is_base=bool(args.base))
    outcome.violations = merge(outcome.violations)
    report(args, outcome)
    return EXIT_VIOLATIONS if outcome.violations else EXIT_CONSISTENT


def report(args: argparse.Namespace, outcome: Outcome) -> None:
    if outcome.torn:
        print(f"nbdverify: {outcome.torn}", file=sys.stderr)
    if args.json:
        print(json.dumps({"consistent": not outcome.violations, "records": outcome.records,
                          "written_sectors": outcome.written_blocks,
                          "violations": [v.as_json() for v in outcome.violations]}))
        return
    for violation in outcome.violations:
        print(violation.describe())
    count = len(outcome.violations)
    verdict = f"{count} violation{'' if count == 1 else 's'}" if count else "no violations"
    print(f"{verdict}: {outcome.records} records, {outcome.written_blocks} sectors written, "
          f"checked against {args.base or 'RAW'}")


def main(args: argparse.Namespace) -> int:
    return run_offline(lambda: crashcheck(args))
