"""The verified device over real files: verification logic without the network."""

from __future__ import annotations

import os
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from nbdverify.changes import Change, ChangeKind, Origin
from nbdverify.children import ChildError, Extent, FileChild
from nbdverify.device import (
    DeviceError,
    MismatchPolicy,
    SizeMismatch,
    VerificationFailed,
    VerifiedDevice,
    merge_extents,
)
from nbdverify.findings import Divergence, Finding, Mismatch, compare
from nbdverify.ranges import RangeSet, RequestOrdering
from nbdverify_protocol.constants import AllocationState, CommandFlag, Errno

SIZE = 4 * 1024 * 1024
HOLE = AllocationState.HOLE | AllocationState.ZERO
DATA = AllocationState.DATA


def make_device(tmp_path: Path, policy: MismatchPolicy = MismatchPolicy.ERROR,
                content: bytes | None = None) -> tuple[VerifiedDevice, list[Finding]]:
    data = os.urandom(SIZE) if content is None else content
    for name in ("raw.img", "test.img"):
        (tmp_path / name).write_bytes(data)
    found: list[Finding] = []
    device = VerifiedDevice(FileChild("raw", str(tmp_path / "raw.img")),
                            FileChild("test", str(tmp_path / "test.img")),
                            policy=policy, on_finding=found.append)
    return device, found


def poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


async def test_write_reaches_both_children_and_reads_back(tmp_path: Path) -> None:
    device, found = make_device(tmp_path)
    await device.write(4097, b"hello world", fua=True)
    data = await device.read(4096, 16, headroom=16)
    assert data[16 + 1:16 + 12] == b"hello world"
    assert (tmp_path / "raw.img").read_bytes() == (tmp_path / "test.img").read_bytes()
    assert found == []


async def test_mismatch_names_first_byte_sector_and_count(tmp_path: Path) -> None:
    device, found = make_device(tmp_path)
    test_path = tmp_path / "test.img"
    original = test_path.read_bytes()
    poke(test_path, 1049576, bytes([original[1049576] ^ 0xFF]))
    poke(test_path, 1049576 + 3 * 512, bytes([original[1049576 + 3 * 512] ^ 0xFF]))
    with pytest.raises(VerificationFailed) as failure:
        await device.read(1048576, 65536)
    finding = failure.value.finding
    assert isinstance(finding, Mismatch)
    assert finding.difference.first_offset == 1049576
    assert finding.difference.first_sector == 2049
    assert finding.difference.differing_sectors == 2
    assert finding.difference.total_sectors == 128
    assert finding.summary() == (
        "read offset=1048576 length=65536 mismatch at offset 1049576 (sector 2049), "
        "2 of 128 sectors differ")
    assert found == [finding]
    assert len(finding.details()) >= 2  # a raw row and a test row of hexdump


async def test_log_policy_serves_reference_bytes(tmp_path: Path) -> None:
    device, found = make_device(tmp_path, MismatchPolicy.LOG)
    raw = (tmp_path / "raw.img").read_bytes()
    poke(tmp_path / "test.img", 100, b"\x00\x01\x02")
    data = await device.read(0, 4096)
    assert bytes(data) == raw[:4096]
    assert len(found) == 1


async def test_disconnect_policy_stops_the_export(tmp_path: Path) -> None:
    device, _ = make_device(tmp_path, MismatchPolicy.DISCONNECT)
    poke(tmp_path / "test.img", 0, b"\xaa\xbb")
    with pytest.raises(VerificationFailed):
        await device.read(0, 512)
    assert device.stopped.is_set()
    assert device.stopped_by is not None


async def test_trimmed_ranges_are_not_compared_until_written(tmp_path: Path) -> None:
    device, found = make_device(tmp_path)
    await device.trim(8192, 8192, fua=False)
    # Behind the server's back, make the trimmed range differ: still no finding.
    poke(tmp_path / "test.img", 9000, b"different")
    await device.read(0, 32768)
    assert device.statistics.bytes_unverified == 8192
    assert found == []
    # Once written again the range is verified as usual.
    await device.write(8192, bytes(8192), fua=False)
    poke(tmp_path / "test.img", 9000, b"different")
    with pytest.raises(VerificationFailed):
        await device.read(8192, 8192)


async def test_write_zeroes_verified_and_identical(tmp_path: Path) -> None:
    device, found = make_device(tmp_path)
    await device.write_zeroes(4096, 1 << 20, may_trim=True, fast=False, fua=True)
    await device.write_zeroes(3 << 20, 1000, may_trim=False, fast=False, fua=False)
    data = await device.read(4096, 1 << 20)
    assert bytes(data) == bytes(1 << 20)
    assert (tmp_path / "raw.img").read_bytes() == (tmp_path / "test.img").read_bytes()
    assert device.unverified_ranges == []
    assert found == []


async def test_flush_and_cache_reach_both(tmp_path: Path) -> None:
    device, found = make_device(tmp_path)
    await device.flush()
    await device.cache(0, SIZE)
    assert device.statistics.count("flush") == 1
    assert found == []


async def test_block_status_is_hole_only_where_both_agree(tmp_path: Path) -> None:
    for name in ("raw.img", "test.img"):
        (tmp_path / name).touch()
        os.truncate(tmp_path / name, SIZE)  # fully sparse
        poke(tmp_path / name, 0, b"x")  # data at the start of both
    poke(tmp_path / "test.img", 1 << 20, b"\0")  # allocated in TEST only, same content
    device = VerifiedDevice(FileChild("raw", str(tmp_path / "raw.img")),
                            FileChild("test", str(tmp_path / "test.img")))
    extents = await device.block_status(0, 2 << 20)
    assert sum(e.length for e in extents) == 2 << 20
    assert extents[0].state == DATA
    assert _state_at(extents, 100_000) == HOLE
    assert _state_at(extents, 1 << 20) == DATA  # a hole in RAW but data in TEST
    assert _state_at(extents, (1 << 20) + 300_000) == HOLE


def _state_at(extents: list[Extent], offset: int) -> AllocationState:
    position = 0
    for extent in extents:
        if position <= offset < position + extent.length:
            return extent.state
        position += extent.length
    raise AssertionError(f"offset {offset} not covered")


def test_merge_extents_intersects_flags() -> None:
    first = [Extent(100, HOLE), Extent(100, DATA)]
    second = [Extent(50, DATA), Extent(150, HOLE)]
    assert merge_extents(first, second) == [
        Extent(50, DATA), Extent(50, HOLE), Extent(100, DATA)]
    assert merge_extents([Extent(10, HOLE)], [Extent(30, HOLE)]) == [Extent(10, HOLE)]


def test_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    (tmp_path / "raw.img").write_bytes(bytes(1024))
    (tmp_path / "test.img").write_bytes(bytes(2048))
    with pytest.raises(SizeMismatch, match=r"1024 bytes.*2048 bytes"):
        VerifiedDevice(FileChild("raw", str(tmp_path / "raw.img")),
                       FileChild("test", str(tmp_path / "test.img")))


class FailingChild(FileChild):
    """A file child whose chosen operations fail with a chosen error: the one way to
    make exactly one of two local files fail on cue."""

    def __init__(self, name: str, path: str, fail: dict[str, Errno]) -> None:
        super().__init__(name, path)
        self.fail = fail

    def _maybe_fail(self, operation: str, offset: int, length: int) -> None:
        if operation in self.fail:
            raise ChildError(self.name, operation, offset, length, self.fail[operation],
                             "injected")

    async def read_into(self, buffer: memoryview, offset: int) -> None:
        self._maybe_fail("read", offset, len(buffer))
        await super().read_into(buffer, offset)

    def post_read(self, buffer: memoryview, offset: int) -> Awaitable[None]:
        self._maybe_fail("read", offset, len(buffer))
        return super().post_read(buffer, offset)

    async def write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        self._maybe_fail("write", offset, len(data))
        await super().write(data, offset, fua)

    def post_write(self, data: bytes | bytearray | memoryview, offset: int) -> Awaitable[None]:
        self._maybe_fail("write", offset, len(data))
        return super().post_write(data, offset)


def failing_device(tmp_path: Path, raw_fail: dict[str, Errno], test_fail: dict[str, Errno],
                   policy: MismatchPolicy = MismatchPolicy.ERROR
                   ) -> tuple[VerifiedDevice, list[Finding]]:
    content = os.urandom(SIZE)
    for name in ("raw.img", "test.img"):
        (tmp_path / name).write_bytes(content)
    found: list[Finding] = []
    device = VerifiedDevice(FailingChild("raw", str(tmp_path / "raw.img"), raw_fail),
                            FailingChild("test", str(tmp_path / "test.img"), test_fail),
                            policy=policy, on_finding=found.append)
    return device, found


async def test_same_error_on_both_children_is_the_devices_error(tmp_path: Path) -> None:
    device, found = failing_device(tmp_path, {"read": Errno.EIO}, {"read": Errno.EIO})
    with pytest.raises(DeviceError) as error:
        await device.read(0, 4096)
    assert error.value.error == Errno.EIO
    assert found == []  # not a mismatch: QEMU's blkverify reports a bogus one here


async def test_one_child_failing_is_a_divergence(tmp_path: Path) -> None:
    device, found = failing_device(tmp_path, {}, {"write": Errno.ENOSPC})
    with pytest.raises(VerificationFailed):
        await device.write(0, b"abc", fua=False)
    assert len(found) == 1
    assert isinstance(found[0], Divergence)
    assert found[0].test_error is not None and "ENOSPC" in found[0].test_error
    assert found[0].raw_error is None


async def test_different_errors_are_a_divergence(tmp_path: Path) -> None:
    device, found = failing_device(tmp_path, {"read": Errno.EIO}, {"read": Errno.EINVAL})
    with pytest.raises(VerificationFailed):
        await device.read(0, 512)
    assert isinstance(found[0], Divergence)


async def test_log_policy_divergence_returns_reference_result(tmp_path: Path) -> None:
    device, found = failing_device(tmp_path, {}, {"read": Errno.EIO}, MismatchPolicy.LOG)
    raw = (tmp_path / "raw.img").read_bytes()
    assert bytes(await device.read(0, 512)) == raw[:512]
    assert len(found) == 1


async def test_overlapping_requests_run_in_arrival_order() -> None:
    ordering = RequestOrdering()
    log: list[str] = []
    gate = trio.Event()

    async def slow_write() -> None:
        async with ordering.hold(0, 100, exclusive=True):
            log.append("write start")
            await gate.wait()
            log.append("write end")

    async def read(name: str, start: int, end: int) -> None:
        async with ordering.hold(start, end, exclusive=False):
            log.append(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_write)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read, "overlapping read", 50, 60)
            nursery.start_soon(read, "disjoint read", 100, 200)
            await trio.testing.wait_all_tasks_blocked()
            assert log == ["write start", "disjoint read"]
            gate.set()
    assert log == ["write start", "disjoint read", "write end", "overlapping read"]
    assert ordering.in_flight == 0


def test_range_set_add_remove_overlapping() -> None:
    ranges = RangeSet()
    ranges.add(10, 20)
    ranges.add(30, 40)
    ranges.add(20, 30)  # touching ranges merge
    assert ranges.ranges() == [(10, 40)]
    ranges.remove(15, 25)
    assert ranges.ranges() == [(10, 15), (25, 40)]
    assert ranges.overlapping(0, 30) == [(10, 15), (25, 30)]
    ranges.remove(0, 100)
    assert not ranges


def test_compare_reports_every_differing_run() -> None:
    raw = bytearray(os.urandom(200_000))
    test = bytearray(raw)
    for offset in (5, 70_000, 70_600, 199_999):
        test[offset] ^= 1
    difference = compare(raw, test, 0, 1000, len(raw))
    assert difference is not None
    assert difference.first_offset == 1005
    assert difference.differing_sectors == 4
    assert difference.ranges[0] == (1000, 1024)  # the first sector is clipped to the request
    assert compare(raw, bytearray(raw), 0, 0, len(raw)) is None


async def test_changes_are_numbered_in_completion_order_with_their_origin(
        tmp_path: Path) -> None:
    device, _ = make_device(tmp_path)
    seen: list[Change] = []

    class Recorder:
        def changed(self, change: Change) -> None:
            payload = None if change.data is None else bytes(change.data)
            seen.append(replace(change, data=payload))

    device.observers.append(Recorder())
    await device.write(512, b"abc", fua=True, origin=Origin(1, 7))
    await device.write_zeroes(4096, 8192, may_trim=False, fast=False, fua=False,
                              origin=Origin(2, 8))
    await device.trim(65536, 4096, fua=False, origin=Origin(1, 9))
    await device.flush(Origin(2, 10))
    assert [(c.sequence, c.kind, c.offset, c.length, c.origin) for c in seen] == [
        (1, ChangeKind.WRITE, 512, 3, Origin(1, 7)),
        (2, ChangeKind.WRITE_ZEROES, 4096, 8192, Origin(2, 8)),
        (3, ChangeKind.TRIM, 65536, 4096, Origin(1, 9)),
        (4, ChangeKind.FLUSH, 0, 0, Origin(2, 10)),
    ]
    assert seen[0].data == b"abc" and seen[0].flags == CommandFlag.FUA
    assert seen[1].flags == CommandFlag.NO_HOLE
    assert seen[0].wall_time <= seen[3].wall_time
