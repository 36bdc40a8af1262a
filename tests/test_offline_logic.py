"""The journal recorder on a real device, and the pure logic of show, compare and
crashcheck, without processes."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import pytest
import trio

from nbdverify.changes import Origin
from nbdverify.children import FileChild
from nbdverify.compare import Segment, segments
from nbdverify.crashcheck import ANYTHING, BLOCK, Model, digest, judge
from nbdverify.device import VerifiedDevice
from nbdverify.findings import differing_spans
from nbdverify.journal import Selection, parse_range, parse_size, record_device
from nbdverify.journal_format import FAILED_TEST, JournalReader, Record, RecordKind
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
