"""`nbdverify compare A B` through the real command: files, qcow2, an NBD URI served by
a real qemu-nbd."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from support import START_TIMEOUT, nbdverify, require_tool, run, terminate

from nbdverify.children import ChildError, FileChild
from nbdverify.compare import CHUNK, LOCAL_WORKERS, Comparer, compare
from nbdverify.images import open_image
from nbdverify.nbd_child import NbdChild
from nbdverify.qemu_child import InPlace, Layout, QemuChild, describe

SIZE = 16 * 1024 * 1024
#: Three separate places B differs from A: (offset, length).
CHANGES = ((1000, 1), (3 << 20, 8192), (SIZE - 512, 512))
EXPECTED = [(512, 1024), (3 << 20, (3 << 20) + 8192), (SIZE - 512, SIZE)]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "a.img"
    b = tmp_path / "b.img"
    a.write_bytes(os.urandom(SIZE))
    shutil.copyfile(a, b)
    with b.open("r+b") as f:
        for offset, length in CHANGES:
            f.seek(offset)
            old = bytearray(f.read(length))
            f.seek(offset)
            f.write(bytes(x ^ 0xFF for x in old))
    return a, b


def ranges(stdout: str) -> list[tuple[int, int]]:
    return [(r["offset"], r["offset"] + r["length"]) for r in json.loads(stdout)["ranges"]]


@pytest.fixture
def served_b(pair: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    """B served read-only by qemu-nbd on a unix socket: its URI."""
    socket = tmp_path / "b.sock"
    process = subprocess.Popen([require_tool("qemu-nbd"), "-r", "-f", "raw", "-t",
                                f"--socket={socket}", str(pair[1])],
                               stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.exists():
            assert process.poll() is None and time.monotonic() < deadline, "qemu-nbd failed"
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={socket}"
    finally:
        terminate(process)


def test_identical_images_exit_0(pair: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.img"
    shutil.copyfile(pair[0], copy)
    result = nbdverify("compare", str(pair[0]), str(copy))
    assert (result.returncode, result.stdout) == (0, "Images are identical.\n"), result.stderr


def test_every_differing_range_is_listed_in_sectors(pair: tuple[Path, Path]) -> None:
    result = nbdverify("compare", str(pair[0]), str(pair[1]))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "3 differing ranges, 9216 bytes:",
        "  sector 1 (offset 512, 512 bytes)",
        f"  sectors {(3 << 20) // 512}-{(3 << 20) // 512 + 15} (offset {3 << 20}, 8192 bytes)",
        f"  sector {SIZE // 512 - 1} (offset {SIZE - 512}, 512 bytes)",
    ]


def test_raw_qcow2_and_an_nbd_uri_compare_alike(pair: tuple[Path, Path], tmp_path: Path,
                                                 served_b: str) -> None:
    qcow2 = tmp_path / "b.qcow2"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(pair[1]),
         str(qcow2)])
    for a, b in ((pair[0], qcow2), (qcow2, pair[0]), (pair[0], served_b)):
        result = nbdverify("compare", str(a), str(b), "--json")
        assert result.returncode == 1, result.stderr
        assert ranges(result.stdout) == EXPECTED, (a, b)
    same = nbdverify("compare", str(pair[1]), str(qcow2))
    assert same.returncode == 0, same.stdout + same.stderr


def test_ranges_both_sides_report_as_zero_are_skipped(tmp_path: Path) -> None:
    a, b = tmp_path / "sparse-a.img", tmp_path / "sparse-b.img"
    for path in (a, b):
        with path.open("wb") as f:
            f.truncate(SIZE)
            f.seek(5 << 20)
            f.write(b"\x01" * 4096)
    result = nbdverify("compare", str(a), str(b), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped_zero_bytes"] >= SIZE - (1 << 20)


def test_a_size_difference_is_named(pair: tuple[Path, Path], tmp_path: Path) -> None:
    longer = tmp_path / "longer.img"
    shutil.copyfile(pair[0], longer)
    with longer.open("r+b") as f:
        f.truncate(SIZE + 65536)
    result = nbdverify("compare", str(pair[0]), str(longer))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"Sizes differ: A {pair[0]} is {SIZE} bytes, B {longer} is {SIZE + 65536} bytes "
        f"(compared the first {SIZE})"]


def test_a_missing_image_is_one_line_and_status_2(pair: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    result = nbdverify("compare", str(pair[0]), str(missing))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"nbdverify: cannot open {missing}: No such file or directory\n"


# --- A qcow2's data read in place -------------------------------------------------------

MiB = 1024 * 1024
#: top.qcow2 over base.qcow2: its own data at 1-2 MiB (in place), a compressed cluster at
#: 3 MiB, zero clusters at 4 MiB; the rest is the backing file's.
TOP_WRITES = ("write -P 0x22 1M 1M", "write -c -P 0x33 3M 64k", "write -z 4M 128k")


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    base_raw, base, top = tmp_path / "base.raw", tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    base_raw.write_bytes(os.urandom(8 * MiB))
    qemu_img = require_tool("qemu-img")
    run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(base_raw), str(base)])
    run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    run([require_tool("qemu-io"), "-f", "qcow2", *(part for write in TOP_WRITES
                                                  for part in ("-c", write)), str(top)])
    return top


async def test_only_a_qcow2s_own_plain_data_is_read_in_place(layered: Path,
                                                           tmp_path: Path) -> None:
    layout = await describe("B", str(layered), "qcow2", in_place=True)
    assert layout is not None
    places = layout.in_place
    assert places is not None
    assert (list(places.starts), list(places.ends)) == ([MiB], [2 * MiB])
    external = tmp_path / "external.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o",
         f"data_file={tmp_path / 'external.raw'}", str(external), "1M"])
    run([require_tool("qemu-io"), "-f", "qcow2", "-c", "write 0 64k", str(external)])
    external_layout = await describe("B", str(external), "qcow2", in_place=True)
    assert external_layout is not None
    assert external_layout.in_place is None  # its offsets are elsewhere


async def test_only_a_qcow2_read_within_its_files_takes_io_uring(layered: Path,
                                                              tmp_path: Path) -> None:
    """QEMU 7.2's io_uring hangs on a read past a file's end: a file that ends mid-sector
    (`layered`'s top, whose last cluster written was compressed), or any layer that is
    not qcow2, rules it out; compressed clusters in a file of whole sectors do not."""
    qemu_img = require_tool("qemu-img")
    assert layered.stat().st_size % 512, "the premise: it ends mid-sector"
    plain = tmp_path / "plain.qcow2"
    run([qemu_img, "convert", "-f", "qcow2", "-O", "qcow2", str(layered), str(plain)])
    compressed = tmp_path / "compressed.qcow2"
    run([qemu_img, "convert", "-c", "-f", "qcow2", "-O", "qcow2", str(layered),
         str(compressed)])
    assert compressed.stat().st_size % 512 == 0
    over_raw = tmp_path / "over-raw.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.raw"), "-F", "raw",
         str(over_raw)])
    verdicts = {}
    for image in (layered, plain, compressed, over_raw):
        layout = await describe("B", str(image), "qcow2", in_place=False)
        assert isinstance(layout, Layout)
        verdicts[image.name] = layout.reads_within_its_files
    assert verdicts == {"top.qcow2": False, "plain.qcow2": True, "compressed.qcow2": True,
                        "over-raw.qcow2": False}


def test_every_kind_of_qcow2_range_is_compared(layered: Path, tmp_path: Path) -> None:
    """Data in place, compressed, zeroed and from the backing file, and a difference
    across the edge of the data in place."""
    raw = tmp_path / "top.raw"
    run([require_tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(layered),
         str(raw)])
    assert nbdverify("compare", str(raw), str(layered)).returncode == 0
    changes = ((MiB + 1000, 1), (2 * MiB - 10, 20), (3 * MiB + 100, 1), (4 * MiB + 5000, 1),
               (6 * MiB + 512, 512))
    with raw.open("r+b") as f:
        for offset, length in changes:
            f.seek(offset)
            old = f.read(length)
            f.seek(offset)
            f.write(bytes(x ^ 0xFF for x in old))
    result = nbdverify("compare", str(raw), str(layered), "--json")
    assert result.returncode == 1, result.stderr
    assert ranges(result.stdout) == [(offset // 512 * 512, -(-(offset + length) // 512) * 512)
                                     for offset, length in changes]


def test_in_place_pieces_split_at_the_mapped_ranges() -> None:
    places = InPlace(array("q", [10, 30]), array("q", [20, 40]), array("q", [100, 500]))
    assert list(places.pieces(0, 50)) == [(0, 10, None), (10, 20, 100), (20, 30, None),
                                          (30, 40, 500), (40, 50, None)]
    assert list(places.pieces(15, 35)) == [(15, 20, 105), (20, 30, None), (30, 35, 500)]
    assert list(places.pieces(12, 18)) == [(12, 18, 102)]
    assert list(places.pieces(20, 30)) == [(20, 30, None)]


# --- Where the reads run ------------------------------------------------------------------


class _NoProgress:
    def update(self, count: int, /) -> None:
        pass


class _WatchedChild(FileChild):
    """Notes the threads its reads run on; fails A's second half on cue. A subclass,
    not a patched method: compiled with mypyc, FileChild calls its own methods directly."""

    threads: set[int]
    failing = False
    offsets: list[int]

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        self.threads.add(threading.get_ident())
        if hasattr(self, "offsets"):
            self.offsets.append(offset)
        if self.name == "A" and offset >= SIZE // 2 and self.failing:
            raise OSError(errno.EIO, "Input/output error")
        super()._read_into(buffer, offset)


async def test_a_file_pair_is_read_and_compared_in_worker_threads(
        pair: tuple[Path, Path]) -> None:
    """Never on the event loop; A's read errors still reach the comparer."""
    threads: set[int] = set()
    a, b = (_WatchedChild(name, str(path), readonly=True)
            for name, path in zip("AB", pair, strict=True))
    for child in (a, b):
        child.threads = threads
    result = await Comparer(a, b, _NoProgress()).run()
    assert result.ranges == EXPECTED
    assert len(threads) == min(LOCAL_WORKERS, SIZE // CHUNK)
    assert threading.get_ident() not in threads
    a.failing = True
    with pytest.raises(ChildError) as caught:
        await Comparer(a, b, _NoProgress()).run()
    assert (caught.value.child, caught.value.operation) == ("A", "read"), caught.value
    assert caught.value.offset >= SIZE // 2


async def test_against_an_nbd_uri_a_files_reads_go_to_a_worker_thread(
        pair: tuple[Path, Path], served_b: str) -> None:
    """Overlapping the NBD side's, which the event loop reads."""
    threads: set[int] = set()
    a = _WatchedChild("A", str(pair[0]), readonly=True)
    a.threads = threads
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            b = await NbdChild.open("B", served_b, nursery)
            try:
                result = await Comparer(a, b, _NoProgress()).run()
            finally:
                await b.aclose()
                nursery.cancel_scope.cancel()  # its reply reader and request writer
    assert result.ranges == EXPECTED
    assert threads and threading.get_ident() not in threads


@pytest.mark.parametrize("through_qemu", [False, True])
async def test_through_qemu_reads_a_qcow2_only_through_qemu_nbd(
        pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], through_qemu: bool) -> None:
    qcow2 = tmp_path / "b.qcow2"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(pair[1]),
         str(qcow2)])
    in_place: list[str] = []
    read_in_place = QemuChild.read_in_place

    def watched(child: QemuChild, path: str, places: InPlace) -> None:
        in_place.append(path)
        read_in_place(child, path, places)

    monkeypatch.setattr(QemuChild, "read_in_place", watched)
    args = argparse.Namespace(a=str(pair[0]), b=str(qcow2), format_a=None, format_b=None,
                              json=True, through_qemu=through_qemu)
    assert await compare(args) == 1
    assert ranges(capsys.readouterr().out) == EXPECTED
    assert in_place == ([] if through_qemu else [str(qcow2)])


async def test_a_file_is_read_once_a_piece_against_a_qcow2_not_all_in_place(
        layered: Path, tmp_path: Path) -> None:
    """Pieces the qcow2 cannot read in place (compressed, from its backing file) go to
    the event loop, and the file side is not read twice for them."""
    raw = tmp_path / "top.raw"
    run([require_tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(layered),
         str(raw)])
    a = _WatchedChild("A", str(raw), readonly=True)
    a.threads, a.offsets = set(), []
    with trio.fail_after(60):
        async with open_image("B", str(layered), "qcow2", in_place=True) as b:
            assert isinstance(b, QemuChild) and b.reads_in_place
            result = await Comparer(a, b, _NoProgress()).run()
    assert result.identical
    assert sorted(a.offsets) == sorted(set(a.offsets))  # no piece read twice
    assert threading.get_ident() in a.threads  # the pieces not in place: on the loop
