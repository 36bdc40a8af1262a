"""The journal recorder on a real device, and the pure logic of show, compare and
crashcheck, without processes."""

from __future__ import annotations

import argparse
import errno
import fcntl
import io
import os
import time
from pathlib import Path

import pytest
import trio

from nbdverify.changes import Change, ChangeKind, Origin
from nbdverify.children import FileChild
from nbdverify.compare import Segment, segments
from nbdverify.crashcheck import ANYTHING, BLOCK, Model, digest, judge
from nbdverify.device import VerifiedDevice
from nbdverify.findings import differing_spans
from nbdverify.journal import (
    BATCH_SIZE,
    WRITE_INTERVAL,
    JournalRecorder,
    Selection,
    parse_range,
    parse_size,
    record_device,
)
from nbdverify.journal_format import (
    FAILED_TEST,
    JournalHeader,
    JournalReader,
    Record,
    RecordKind,
)
from nbdverify_protocol.constants import CommandFlag

SIZE = 1024 * 1024


def make_device(tmp_path: Path) -> VerifiedDevice:
    for name in ("raw.img", "test.img"):
        (tmp_path / name).write_bytes(bytes(SIZE))
    return VerifiedDevice(FileChild("raw", str(tmp_path / "raw.img")),
                          FileChild("test", str(tmp_path / "test.img")))


async def test_the_recorder_journals_every_change_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    device = make_device(tmp_path)
    recorder = record_device(device, str(tmp_path / "j"), None, "raw.img", "test.img")
    await device.write(512, b"abc", fua=True, origin=Origin(1, 7))
    await device.write_zeroes(4096, 8192, may_trim=False, fast=False, fua=False)
    await device.trim(65536, 4096, fua=False)
    await device.flush(Origin(2, 10))
    await trio.to_thread.run_sync(recorder.close)
    with (tmp_path / "j").open("rb") as stream:
        reader = JournalReader(stream)
        got = list(reader)
    assert reader.header.size == SIZE
    assert reader.header.raw == str(tmp_path / "raw.img")  # absolute: crashcheck reopens it
    assert [(r.sequence, r.kind, r.offset, r.count) for r in got] == [
        (1, RecordKind.WRITE, 512, 3), (2, RecordKind.WRITE_ZEROES, 4096, 8192),
        (3, RecordKind.TRIM, 65536, 4096), (4, RecordKind.FLUSH, 0, 0)]
    assert got[0].payload == b"abc" and got[0].flags == CommandFlag.FUA
    assert (got[0].connection, got[0].cookie) == (1, 7)
    assert got[1].connection is None and got[1].flags == CommandFlag.NO_HOLE


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct-where-it-can", "buffered"])
def test_the_recorder_appends_whole_blocks_of_records(tmp_path: Path, direct: bool) -> None:
    """Batches taken at different times, one larger than a standard batch: the file
    stays a whole number of blocks, and the records read back in order."""
    recorder = JournalRecorder(str(tmp_path / "j"), JournalHeader(SIZE), direct=direct)
    if not direct:
        assert not recorder.direct
    sizes = [1, 4096, 0, BATCH_SIZE + 3, 100, 65536]
    payloads = [os.urandom(size) for size in sizes]
    for sequence, payload in enumerate(payloads, 1):
        kind = ChangeKind.WRITE if payload else ChangeKind.FLUSH
        recorder.changed(Change(sequence, kind, 0, len(payload), 0, None, 0.0, 0.0, payload))
        assert os.path.getsize(tmp_path / "j") % 4096 == 0
        time.sleep(3 * WRITE_INTERVAL)  # the writer takes this one alone
    recorder.close()
    assert os.path.getsize(tmp_path / "j") % 4096 == 0
    with (tmp_path / "j").open("rb") as stream:
        reader = JournalReader(stream)
        got = list(reader)
    assert reader.torn is None
    assert [record.payload for record in got] == payloads
    assert [record.sequence for record in got] == list(range(1, len(sizes) + 1))


def test_a_file_system_that_refuses_direct_writes_gets_buffered_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def refusing_direct(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_direct)
    recorder = JournalRecorder(str(tmp_path / "j"), JournalHeader(SIZE))
    recorder.changed(Change(1, ChangeKind.WRITE, 0, 3, 0, None, 0.0, 0.0, b"abc"))
    recorder.close()
    assert not recorder.direct and recorder.stopped is None
    with (tmp_path / "j").open("rb") as stream:
        assert [record.payload for record in JournalReader(stream)] == [b"abc"]


async def test_the_cap_stops_recording_once_with_a_note(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    device = make_device(tmp_path)
    recorder = record_device(device, str(tmp_path / "j"), 64 * 1024, "raw.img", "test.img")
    for i in range(40):
        await device.write(i * 4096, os.urandom(4096), fua=False)
    assert recorder.stopped is not None and "cap" in recorder.stopped
    await trio.to_thread.run_sync(recorder.close)
    assert os.path.getsize(tmp_path / "j") <= 64 * 1024
    with (tmp_path / "j").open("rb") as stream:
        got = list(JournalReader(stream))
    assert got[-1].kind is RecordKind.NOTE and "cap of 65536 bytes" in got[-1].note
    assert [r.sequence for r in got[:-1]] == list(range(1, len(got)))
    assert got[-1].sequence == len(got)  # the first change not recorded
    assert sum("recording stopped" in r.getMessage() for r in caplog.records) == 1


async def test_a_change_a_child_failed_is_marked(tmp_path: Path) -> None:
    device = make_device(tmp_path)
    recorder = record_device(device, str(tmp_path / "j"), None, "raw.img", "test.img")
    device.test.close()  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="write"):
        await device.write(0, b"x" * 512, fua=False)
    await trio.to_thread.run_sync(recorder.close)
    with (tmp_path / "j").open("rb") as stream:
        (record,) = list(JournalReader(stream))
    assert record.failed == FAILED_TEST


def test_sizes_and_ranges_parse_as_people_write_them() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 65536
    assert parse_size("2GiB") == 2 << 30
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
    assert parse_range("1M-2M", size=True) == (1 << 20, 2 << 20)
    assert parse_range("5-9", size=False) == (5, 9)
    assert parse_range("7", size=False) == (7, 7)


def test_selection_by_byte_offset_range_and_sequence() -> None:
    write = Record(RecordKind.WRITE, 5, 4096, 512)
    flush = Record(RecordKind.FLUSH, 6)
    assert write in Selection(at=4096) and write in Selection(at=4607)
    assert write not in Selection(at=4608) and flush not in Selection(at=0)
    assert write in Selection(offsets=(4000, 4097)) and write not in Selection(offsets=(0, 4096))
    assert write in Selection(sequences=(5, 5)) and flush not in Selection(sequences=(1, 5))


def test_segments_walk_both_zero_maps_and_merge_alike_neighbours() -> None:
    a = [(1024, True), (1024, False), (2048, False)]
    b = [(512, True), (3584, True)]
    assert list(segments(a, b)) == [Segment(0, 1024, True, True), Segment(1024, 4096, False, True)]


def test_differing_sectors_are_cut_at_the_image_sector_grid() -> None:
    a = bytearray(200 * 1024)
    b = bytearray(a)
    b[100] = 1            # sector 0 (offset 256 + 100)
    b[70000] = 1          # in the second 64 KiB sub-block
    found = list(differing_spans(a, b, 0, 256, len(a)))
    assert found == [(256, 512), (256 + 70000 - (256 + 70000) % 512,
                                  256 + 70000 - (256 + 70000) % 512 + 512)]


async def _model(records: list[Record], base: bytes | None = None) -> Model:
    model = Model(16 * BLOCK, io.BytesIO(bytes(16 * BLOCK)), None)
    for record in records:
        await model.apply(record)
    return model


def _write(sequence: int, block: int, fill: int, fua: bool = False, failed: int = 0) -> Record:
    return Record(RecordKind.WRITE, sequence, block * BLOCK, BLOCK,
                  CommandFlag.FUA if fua else 0, failed=failed, payload=bytes([fill]) * BLOCK)


async def test_crash_rules_durable_then_later_writes() -> None:
    flush = Record(RecordKind.FLUSH, 3)
    model = await _model([_write(1, 0, 1), _write(2, 0, 2), flush, _write(4, 0, 4)])
    history = model.blocks[0]
    start = digest(bytes(BLOCK))
    assert judge(0, history, digest(bytes([2]) * BLOCK), start) is None  # the durable one
    assert judge(0, history, digest(bytes([4]) * BLOCK), start) is None  # a later one
    lost = judge(0, history, digest(bytes([1]) * BLOCK), start)
    assert lost is not None and lost.kind == "lost-write" and lost.lost_sequence == 2
    lost = judge(0, history, start, start)
    assert lost is not None and lost.kind == "lost-write" and "starting content" in lost.detail
    garbage = judge(0, history, digest(b"\x99" * BLOCK), start)
    assert garbage is not None and garbage.kind == "garbage"


async def test_crash_rules_fua_flush_failures_and_trims() -> None:
    start = digest(bytes(BLOCK))
    fua = (await _model([_write(1, 0, 1, fua=True)])).blocks[0]
    assert judge(0, fua, start, start) is not None  # FUA alone makes it durable
    unflushed = (await _model([_write(1, 0, 1)])).blocks[0]
    assert judge(0, unflushed, start, start) is None
    failed_flush = Record(RecordKind.FLUSH, 2, failed=FAILED_TEST)
    history = (await _model([_write(1, 0, 1), failed_flush])).blocks[0]
    assert judge(0, history, start, start) is None  # TEST never completed that flush
    trimmed = (await _model([_write(1, 0, 1), Record(RecordKind.FLUSH, 2),
                             Record(RecordKind.TRIM, 3, 0, BLOCK)])).blocks[0]
    assert trimmed.digests[-1] == ANYTHING
    assert judge(0, trimmed, digest(b"\x77" * BLOCK), start) is None


async def test_a_partial_write_is_checked_against_the_whole_block() -> None:
    first = _write(1, 0, 1)
    partial = Record(RecordKind.WRITE, 2, 100, 4, payload=b"\xee" * 4)
    history = (await _model([first, partial, Record(RecordKind.FLUSH, 3)])).blocks[0]
    expected = bytearray([1]) * BLOCK
    expected[100:104] = b"\xee" * 4
    assert judge(0, history, digest(expected), None) is None
    assert judge(0, history, digest(bytes([1]) * BLOCK), None) is not None
