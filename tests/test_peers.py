"""Interop with real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh and
python3-libnbd, each against a real `nbdverify serve` process. After each test RAW
and TEST must be byte-identical and the server must have reported nothing.

Tests that take `peer` run once per peer generation: Debian bookworm's tools on the
host (QEMU 7.2, libnbd 1.14) and Debian trixie's in a chroot (QEMU 10, libnbd 1.22);
the in-process libnbd tests use the host's binding."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest
from peers_support import (
    BOOKWORM,
    CMD_READ,
    CMD_WRITE,
    MAX_REQUEST,
    Handle,
    KiB,
    MiB,
    Peer,
    RawClient,
    assert_pair_identical,
    assert_same_bytes,
    assert_server_healthy,
    connect,
    make_sparse_pair,
    negotiated_packets,
    watchdog,
)
from support import IMAGE_SIZE, ImagePair, Launcher, RunningServer, start_server, terminate

TOOL_TIMEOUT = 30.0
LIBNBD_TIMEOUT = 20.0


def finish(server: RunningServer) -> bytes:
    """The end of every test: both images identical, server alive and quiet."""
    content = assert_pair_identical(server.images)
    assert_server_healthy(server)
    return content


def map_extents(peer: Peer, uri: str) -> list[tuple[int, int, str]]:
    result = peer.run("nbdinfo", "--map", "--json", uri, timeout=TOOL_TIMEOUT)
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(result.stdout)]


def describe_at(extents: list[tuple[int, int, str]], offset: int) -> str:
    for start, length, description in extents:
        if start <= offset < start + length:
            return description
    raise AssertionError(f"no extent covers {offset}: {extents}")


def src_with_zero_hole(path: Path, size: int) -> bytes:
    """Random content with a zero megabyte in the middle (exercises zero detection)."""
    content = bytearray(os.urandom(size))
    content[2 * MiB:3 * MiB] = bytes(MiB)
    path.write_bytes(content)
    return bytes(content)


@pytest.mark.parametrize("tool, version", [
    ("qemu-io", "qemu-io version 10."), ("qemu-img", "qemu-img version 10."),
    ("qemu-system-x86_64", "QEMU emulator version 10."), ("nbdinfo", "libnbd 1.22."),
    ("nbdkit", "nbdkit 1.42."), ("fio", "fio-3.39"),
])
def test_trixie_peers_are_todays(trixie: Peer, tool: str, version: str) -> None:
    """The trixie generation really is today's tools, not the host's by mistake."""
    assert version in trixie.run(tool, "--version", timeout=TOOL_TIMEOUT).stdout


# --- qemu-io ---------------------------------------------------------------------


def qemu_io_pattern_round_trip(server: RunningServer, peer: Peer) -> None:
    writes = [(0x5A, 12345, 300 * KiB + 7), (0xC3, 4 * MiB, MiB)]
    commands: list[str] = []
    for pattern, offset, length in writes:
        commands += ["-c", f"write -P {pattern:#x} {offset} {length}"]
    for pattern, offset, length in writes:
        commands += ["-c", f"read -P {pattern:#x} {offset} {length}"]
    result = peer.run("qemu-io", "-f", "raw", *commands, server.uri, timeout=TOOL_TIMEOUT)
    assert "Pattern verification failed" not in result.stdout, result.stdout
    for _, offset, length in writes:
        assert f"read {length}/{length} bytes at offset {offset}" in result.stdout, result.stdout
    content = finish(server)
    for pattern, offset, length in writes:
        assert_same_bytes(content[offset:offset + length], bytes([pattern]) * length,
                          f"pattern {pattern:#x} at {offset}")


def test_qemu_io_pattern_over_unix_socket(server: RunningServer, peer: Peer) -> None:
    assert server.uri.startswith("nbd+unix://")
    qemu_io_pattern_round_trip(server, peer)


def test_qemu_io_pattern_over_tcp(tcp_server: RunningServer, peer: Peer) -> None:
    assert tcp_server.uri.startswith("nbd://")
    qemu_io_pattern_round_trip(tcp_server, peer)


# --- qemu-img --------------------------------------------------------------------


def test_qemu_img_info(server: RunningServer, peer: Peer) -> None:
    # No -f: qemu-img probes the format by reading the export.
    result = peer.run("qemu-img", "info", "--output=json", server.uri, timeout=TOOL_TIMEOUT)
    info = json.loads(result.stdout)
    assert info["virtual-size"] == IMAGE_SIZE
    assert info["format"] == "raw"
    finish(server)


def test_qemu_img_convert_out_of_export(server: RunningServer, tmp_path: Path,
                                        peer: Peer) -> None:
    out = tmp_path / "out.img"
    peer.run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out),
             timeout=TOOL_TIMEOUT)
    assert_same_bytes(out.read_bytes(), finish(server), "converted copy vs RAW")


def test_qemu_img_convert_into_export(server: RunningServer, tmp_path: Path,
                                      peer: Peer) -> None:
    src = tmp_path / "src.img"
    expected = src_with_zero_hole(src, IMAGE_SIZE)
    peer.run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), server.uri,
             timeout=TOOL_TIMEOUT)
    assert_same_bytes(finish(server), expected, "RAW vs source")
    compare = peer.run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri,
                       timeout=TOOL_TIMEOUT)
    assert "Images are identical" in compare.stdout


def test_qemu_img_compare(server: RunningServer, tmp_path: Path, peer: Peer) -> None:
    same = peer.run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(server.images.raw),
                    server.uri, timeout=TOOL_TIMEOUT)
    assert same.returncode == 0
    assert "Images are identical" in same.stdout
    # The export's content really is compared: a copy with one byte changed differs.
    other = tmp_path / "other.img"
    content = bytearray(server.images.raw_bytes())
    content[5 * MiB + 3] ^= 0xFF
    other.write_bytes(content)
    differ = peer.run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), server.uri,
                      timeout=TOOL_TIMEOUT, check=False)
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert f"Content mismatch at offset {5 * MiB}" in differ.stdout, differ.stdout
    finish(server)


# --- nbdinfo ---------------------------------------------------------------------


def test_nbdinfo_list(tmp_path: Path, images: ImagePair, peer: Peer) -> None:
    server = start_server(tmp_path, images, "-e", "disk0", "--description", "peer test disk")
    try:
        result = peer.run("nbdinfo", "--list", server.uri, timeout=TOOL_TIMEOUT)
        assert 'export="disk0":' in result.stdout, result.stdout
        assert "description: peer test disk" in result.stdout, result.stdout
        assert f"export-size: {IMAGE_SIZE}" in result.stdout, result.stdout
        finish(server)
    finally:
        server.stop()


def test_nbdinfo_json_fields(server: RunningServer, peer: Peer) -> None:
    result = peer.run("nbdinfo", "--json", server.uri, timeout=TOOL_TIMEOUT)
    info = json.loads(result.stdout)
    assert info["structured"] is True
    [export] = info["exports"]
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is False
    for flag in ("can_trim", "can_zero", "can_flush", "can_fua", "can_fast_zero", "can_cache"):
        assert export[flag] is True, (flag, export)
    assert export["block_size_maximum"] == 64 * MiB
    assert "base:allocation" in export["contexts"]
    finish(server)


def test_nbdinfo_map_sparse_then_written(tmp_path: Path, peer: Peer) -> None:
    images = make_sparse_pair(tmp_path / "images", IMAGE_SIZE)
    server = start_server(tmp_path, images)
    try:
        assert map_extents(peer, server.uri) == [(0, IMAGE_SIZE, "hole,zero")]
        offset, length = 3 * MiB, 64 * KiB
        peer.run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 {offset} {length}", server.uri,
                 timeout=TOOL_TIMEOUT)
        extents = map_extents(peer, server.uri)
        assert describe_at(extents, offset) == "data"
        assert describe_at(extents, offset + length - 1) == "data"
        assert describe_at(extents, 0) == "hole,zero"
        assert describe_at(extents, IMAGE_SIZE - 1) == "hole,zero"
        assert sum(length for _, length, _ in extents) == IMAGE_SIZE
        finish(server)
    finally:
        server.stop()


def test_nbdinfo_map_hole_only_where_both_children_are_holes(tmp_path: Path,
                                                             peer: Peer) -> None:
    images = make_sparse_pair(tmp_path / "images", IMAGE_SIZE)
    with images.test.open("r+b") as f:  # allocated zeroes in TEST only
        f.seek(2 * MiB)
        f.write(bytes(MiB))
    server = start_server(tmp_path, images)
    try:
        extents = map_extents(peer, server.uri)
        assert describe_at(extents, 2 * MiB) == "data", extents
        assert describe_at(extents, 3 * MiB - 1) == "data", extents
        assert describe_at(extents, 0) == "hole,zero", extents
        assert describe_at(extents, 3 * MiB) == "hole,zero", extents
        finish(server)
    finally:
        server.stop()


def test_nbdinfo_map_random_image_is_data(server: RunningServer, peer: Peer) -> None:
    assert map_extents(peer, server.uri) == [(0, IMAGE_SIZE, "data")]
    finish(server)


def test_nbdinfo_content(server: RunningServer, peer: Peer) -> None:
    # Random content is whatever file(1) guesses (once "OpenPGP Public Key"), so
    # first give the export a gzip header, written by another client (nbdsh).
    gzip_header = "1f8b0800000000000003"
    peer.run("nbdsh", "-u", server.uri, "-c", f"h.pwrite(bytes.fromhex('{gzip_header}'), 0)",
             timeout=TOOL_TIMEOUT)
    result = peer.run("nbdinfo", "--content", server.uri, timeout=TOOL_TIMEOUT)
    assert "content: gzip compressed data" in result.stdout, result.stdout
    assert finish(server).startswith(bytes.fromhex(gzip_header))


# --- nbdcopy ---------------------------------------------------------------------


def test_nbdinfo_negotiates_extended_headers_where_it_can(server: RunningServer,
                                                          peer: Peer) -> None:
    """libnbd >= 1.18 (trixie) asks for extended headers first and gets them;
    bookworm's libnbd 1.14 knows only structured replies."""
    expected = "structured" if peer == BOOKWORM else "extended"
    assert negotiated_packets(peer, server.uri) == expected
    finish(server)


def test_no_extended_headers_makes_today_s_clients_fall_back(launch: Launcher,
                                                             peer: Peer) -> None:
    """--no-extended-headers: libnbd 1.22 falls back to structured replies, and
    qemu-io 10 still writes and reads (its own fallback)."""
    server = launch("--no-extended-headers")
    assert negotiated_packets(peer, server.uri) == "structured"
    result = peer.run("qemu-io", "-f", "raw", "-c", "write -P 0x5e 4096 8192",
                      "-c", "read -P 0x5e 4096 8192", server.uri, timeout=TOOL_TIMEOUT)
    assert "Pattern verification failed" not in result.stdout, result.stdout
    finish(server)


def test_nbdcopy_out_of_export(server: RunningServer, tmp_path: Path, peer: Peer) -> None:
    out = tmp_path / "out.img"
    peer.run("nbdcopy", server.uri, str(out), timeout=TOOL_TIMEOUT)
    assert_same_bytes(out.read_bytes(), finish(server), "nbdcopy output vs RAW")


def test_nbdcopy_into_export(server: RunningServer, tmp_path: Path, peer: Peer) -> None:
    src = tmp_path / "src.img"
    expected = src_with_zero_hole(src, IMAGE_SIZE)
    peer.run("nbdcopy", "--flush", str(src), server.uri, timeout=TOOL_TIMEOUT)
    assert_same_bytes(finish(server), expected, "RAW vs nbdcopy source")


# --- python3-libnbd, with and without structured replies -------------------------


@pytest.fixture(params=[True, False], ids=["structured", "simple"])
def structured(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def handle(server: RunningServer, structured: bool) -> Iterator[Handle]:
    """A libnbd handle (strict mode off) on the server, under a watchdog."""
    with watchdog(server, LIBNBD_TIMEOUT):
        h = connect(server.uri, structured=structured, strict=False)
        try:
            yield h
        finally:
            close(h)


def close(h: Handle) -> None:
    """Disconnect even when the test failed half-way (then the traceback keeps
    the handle alive, and with it the connection)."""
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def shutdown_and_check(h: Handle, server: RunningServer) -> bytes:
    h.shutdown()
    return finish(server)


def test_libnbd_pread_pwrite(handle: Handle, server: RunningServer) -> None:
    h = handle
    original = server.images.raw_bytes()
    assert_same_bytes(h.pread(100 * KiB, 777), original[777:777 + 100 * KiB], "read")
    plain, fua = os.urandom(200 * KiB + 3), os.urandom(64 * KiB)
    h.pwrite(plain, 4097)
    h.pwrite(fua, 6 * MiB, nbd.CMD_FLAG_FUA)
    assert_same_bytes(h.pread(len(plain), 4097), plain, "plain write read back")
    assert_same_bytes(h.pread(len(fua), 6 * MiB), fua, "FUA write read back")
    assert h.pread(1, IMAGE_SIZE - 1) == original[-1:]
    expected = bytearray(original)
    expected[4097:4097 + len(plain)] = plain
    expected[6 * MiB:6 * MiB + len(fua)] = fua
    assert_same_bytes(shutdown_and_check(h, server), bytes(expected), "RAW after writes")


def test_libnbd_flush(handle: Handle, server: RunningServer) -> None:
    h = handle
    data = os.urandom(128 * KiB)
    h.pwrite(data, MiB)
    h.flush()
    h.flush()
    assert h.pread(len(data), MiB) == data
    assert shutdown_and_check(h, server)[MiB:MiB + len(data)] == data


def test_libnbd_trim(handle: Handle, server: RunningServer) -> None:
    h = handle
    original = server.images.raw_bytes()
    h.trim(MiB, 2 * MiB)
    h.trim(5000, 5 * MiB + 3, nbd.CMD_FLAG_FUA)
    # Trimmed content is unspecified, but reading it must succeed (it is not compared).
    assert len(h.pread(MiB, 2 * MiB)) == MiB
    assert len(h.pread(64 * KiB, 5 * MiB - 1000)) == 64 * KiB
    # Untouched bytes around the trims still verify.
    assert h.pread(4096, 2 * MiB - 4096) == original[2 * MiB - 4096:2 * MiB]
    # Rewritten, a trimmed range is verified again.
    data = os.urandom(4096)
    h.pwrite(data, 2 * MiB + 4096)
    assert h.pread(len(data), 2 * MiB + 4096) == data
    assert shutdown_and_check(h, server)[2 * MiB + 4096:2 * MiB + 8192] == data


def test_libnbd_zero(handle: Handle, server: RunningServer) -> None:
    h = handle
    original = server.images.raw_bytes()
    ranges = [  # offset, length, flags
        (0, 3 * MiB + 5, 0),
        (3 * MiB + 10000, 4 * KiB + 1, nbd.CMD_FLAG_NO_HOLE),
        (4 * MiB, MiB, nbd.CMD_FLAG_FAST_ZERO),
        (6 * MiB + 4096, 7 * KiB, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE),
    ]
    for offset, length, flags in ranges:
        h.zero(length, offset, flags)
        assert h.pread(length, offset) == bytes(length), (offset, length, flags)
    expected = bytearray(original)
    for offset, length, _ in ranges:
        expected[offset:offset + length] = bytes(length)
    assert_same_bytes(bytes(h.pread(IMAGE_SIZE, 0)), bytes(expected), "export after zeroing")
    assert_same_bytes(shutdown_and_check(h, server), bytes(expected), "RAW after zeroing")


def test_libnbd_cache(handle: Handle, server: RunningServer) -> None:
    h = handle
    assert h.can_cache()
    h.cache(MiB, 0)
    h.cache(IMAGE_SIZE, 0)
    h.cache(4096, 123)
    assert h.pread(4096, 123) == server.images.raw_bytes()[123:4219]
    shutdown_and_check(h, server)


def test_libnbd_block_status(structured: bool, tmp_path: Path) -> None:
    images = make_sparse_pair(tmp_path / "images", IMAGE_SIZE)
    server = start_server(tmp_path, images)
    offset, length = 3 * MiB, 256 * KiB
    try:
        with watchdog(server, LIBNBD_TIMEOUT):
            h = connect(server.uri, structured=structured, meta=True, strict=False)
            try:
                data = os.urandom(length)
                h.pwrite(data, offset)
                if structured:
                    assert h.can_meta_context("base:allocation")
                    hole = nbd.STATE_HOLE | nbd.STATE_ZERO
                    assert block_status(h, IMAGE_SIZE, 0) == [
                        (offset, hole), (length, 0), (IMAGE_SIZE - offset - length, hole)]
                    assert block_status(h, IMAGE_SIZE, 0, nbd.CMD_FLAG_REQ_ONE) == [
                        (offset, hole)]
                    assert block_status(h, MiB, offset, nbd.CMD_FLAG_REQ_ONE) == [(length, 0)]
                    assert block_status(h, 4096, offset + length) == [(4096, hole)]
                    # Unaligned starts, and a range straddling a hole/data boundary.
                    assert block_status(h, 4096, 5) == [(4096, hole)]
                    assert block_status(h, 8192, offset - 4096) == [(4096, hole), (4096, 0)]
                else:
                    # No structured replies, so no meta context: block status fails,
                    # and the connection keeps working.
                    assert not h.can_meta_context("base:allocation")
                    with pytest.raises(nbd.Error):
                        block_status(h, IMAGE_SIZE, 0)
                assert h.pread(length, offset) == data
                h.shutdown()
            finally:
                close(h)
        content = finish(server)
        assert content[offset:offset + length] == data
    finally:
        server.stop()


def block_status(h: Handle, count: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    """base:allocation extents as (length, flags) pairs."""
    extents: list[tuple[int, int]] = []

    def collect(context: str, start: int, entries: list[int], error: object) -> int:
        assert context == "base:allocation"
        assert start == offset
        extents.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(count, offset, collect, flags)
    return extents


def test_libnbd_zero_length_requests(handle: Handle, server: RunningServer) -> None:
    h = handle
    original = server.images.raw_bytes()
    assert h.pread(0, 4096) == b""
    h.pwrite(b"", 4096)
    h.pwrite(b"", 4096, nbd.CMD_FLAG_FUA)
    assert h.pread(0, IMAGE_SIZE) == b""  # at the very end: still in range
    # The connection survived and still serves verified data.
    assert h.pread(4096, 4096) == original[4096:8192]
    data = os.urandom(512)
    h.pwrite(data, 4096)
    assert h.pread(512, 4096) == data
    shutdown_and_check(h, server)


def test_libnbd_out_of_range(handle: Handle, server: RunningServer) -> None:
    h = handle
    original = server.images.raw_bytes()
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: h.pread(512, IMAGE_SIZE), errno.EINVAL),
        (lambda: h.pread(512, IMAGE_SIZE - 100), errno.EINVAL),
        (lambda: h.pread(512, 2**63), errno.EINVAL),
        (lambda: h.pwrite(b"x" * 512, IMAGE_SIZE), errno.ENOSPC),
        (lambda: h.pwrite(b"x" * 512, IMAGE_SIZE - 100), errno.ENOSPC),
    ]
    for call, expected in cases:
        with pytest.raises(nbd.Error) as caught:
            call()
        # The binding gives the errno's name ("EINVAL"), the number in args[1].
        assert caught.value.errno == errno.errorcode[expected], caught.value.string
        # After each refusal the connection still works.
        assert h.pread(100, IMAGE_SIZE - 100) == original[-100:]
    # Nothing was written past (or up to) the end.
    assert shutdown_and_check(h, server) == original


def test_libnbd_many_commands_in_flight(handle: Handle, server: RunningServer) -> None:
    h = handle
    original = server.images.raw_bytes()
    chunk = 64 * KiB
    writes = {index * 2 * chunk: os.urandom(chunk) for index in range(16)}
    read_offsets = [index * 2 * chunk + chunk for index in range(16)]  # between the writes
    # Keep every buffer referenced until its command completes.
    write_buffers = []
    for offset, data in writes.items():
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        write_buffers.append((h.aio_pwrite(buf, offset), buf))
    read_buffers = []
    for offset in read_offsets:
        buf = nbd.Buffer(chunk)
        read_buffers.append((h.aio_pread(buf, offset), buf, offset))
    assert h.aio_in_flight() == 32
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, _ in write_buffers:
        assert h.aio_command_completed(cookie) is True
    for cookie, buf, offset in read_buffers:
        assert h.aio_command_completed(cookie) is True
        assert buf.to_bytearray() == original[offset:offset + chunk], offset
    # Now read the written chunks back, again all at once.
    pending = []
    for offset in writes:
        buf = nbd.Buffer(chunk)
        pending.append((h.aio_pread(buf, offset), buf, offset))
    assert h.aio_in_flight() == 16
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, buf, offset in pending:
        assert h.aio_command_completed(cookie) is True
        assert buf.to_bytearray() == writes[offset], offset
    content = shutdown_and_check(h, server)
    for offset, data in writes.items():
        assert content[offset:offset + chunk] == data


# --- python3-libnbd as a process of each generation ------------------------------

LIBNBD_PEER = Path(__file__).with_name("libnbd_peer.py")


def test_python3_libnbd_as_a_peer_process(server: RunningServer, peer: Peer) -> None:
    result = peer.run("python3", "-", server.uri, input=LIBNBD_PEER.read_text(),
                      timeout=TOOL_TIMEOUT)
    seen = json.loads(result.stdout.splitlines()[-1])
    if peer == BOOKWORM:
        assert seen["structured"] and not seen["extended"], seen
    else:
        assert seen["extended"], seen  # libnbd 1.22's python binding, 64-bit headers
    content = finish(server)
    assert seen["sha256"] == hashlib.sha256(content).hexdigest(), "client's view is not RAW"


# --- nbdsh -----------------------------------------------------------------------


def test_nbdsh_zero_trim_flush(server: RunningServer, peer: Peer) -> None:
    original = server.images.raw_bytes()
    result = peer.run(
        "nbdsh", "-u", server.uri,
        "-c", f"h.zero({MiB}, {MiB})",
        "-c", f"h.zero({64 * KiB}, {3 * MiB + 1}, nbd.CMD_FLAG_NO_HOLE)",
        "-c", f"h.trim({MiB}, {5 * MiB})",
        "-c", "h.flush()",
        "-c", f"assert h.pread({MiB}, {MiB}) == bytes({MiB})",
        "-c", f"assert len(h.pread({MiB}, {5 * MiB})) == {MiB}",
        "-c", "print('nbdsh done')",
        timeout=TOOL_TIMEOUT,
    )
    assert "nbdsh done" in result.stdout
    content = finish(server)
    assert content[MiB:2 * MiB] == bytes(MiB)
    assert content[3 * MiB + 1:3 * MiB + 1 + 64 * KiB] == bytes(64 * KiB)
    assert content[:MiB] == original[:MiB]
    assert content[4 * MiB:5 * MiB] == original[4 * MiB:5 * MiB]


# --- The advertised maximum request: 64 MiB --------------------------------------

BIG_IMAGE = 80 * MiB


@pytest.fixture(scope="module")
def big_content() -> bytes:
    return os.urandom(BIG_IMAGE)


@pytest.fixture
def big_server(tmp_path: Path, big_content: bytes) -> Iterator[RunningServer]:
    directory = tmp_path / "big"
    directory.mkdir()
    images = ImagePair(directory / "raw.img", directory / "test.img")
    images.raw.write_bytes(big_content)
    images.test.write_bytes(big_content)
    running = start_server(tmp_path, images)
    yield running
    running.stop()


def test_libnbd_request_of_exactly_64_mib(big_server: RunningServer, big_content: bytes) -> None:
    server = big_server
    with watchdog(server, LIBNBD_TIMEOUT):
        h = connect(server.uri, strict=False)
        try:
            assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_REQUEST
            assert_same_bytes(h.pread(MAX_REQUEST, 5), big_content[5:5 + MAX_REQUEST],
                              "64 MiB read")
            data = os.urandom(MAX_REQUEST)
            h.pwrite(data, 8 * MiB + 3)
            assert_same_bytes(h.pread(MAX_REQUEST, 8 * MiB + 3), data, "64 MiB read back")
            # One byte more is refused, and the connection keeps working.
            with pytest.raises(nbd.Error):
                h.pread(MAX_REQUEST + 1, 0)
            with pytest.raises(nbd.Error):
                h.pwrite(bytes(MAX_REQUEST + 1), 0)
            assert h.pread(4096, 0) == big_content[:4096]
            h.shutdown()
        finally:
            close(h)
    content = finish(server)
    assert_same_bytes(content[8 * MiB + 3:8 * MiB + 3 + MAX_REQUEST], data, "64 MiB in RAW")
    assert content[:8 * MiB + 3] == big_content[:8 * MiB + 3]


def test_server_refuses_request_over_64_mib(big_server: RunningServer,
                                            big_content: bytes) -> None:
    """libnbd refuses > 64 MiB itself (ERANGE, client side), so the server's own
    refusal is checked with a hand-rolled client: READ gets EOVERFLOW, WRITE gets
    EINVAL after its payload is drained, and the connection stays in sync."""
    server = big_server
    assert server.socket is not None
    client = RawClient(server.socket, timeout=LIBNBD_TIMEOUT)
    try:
        assert client.size == BIG_IMAGE
        error, _ = client.request(CMD_READ, 0, MAX_REQUEST + 1)
        assert error == errno.EOVERFLOW
        error, data = client.request(CMD_READ, 4096, 4096)
        assert (error, data) == (0, big_content[4096:8192])
        error, _ = client.request(CMD_WRITE, 0, MAX_REQUEST + 1, bytes(MAX_REQUEST + 1))
        assert error == errno.EINVAL
        error, data = client.request(CMD_READ, 0, 4096)
        assert (error, data) == (0, big_content[:4096])
    finally:
        client.close()
    assert_same_bytes(finish(server), big_content, "RAW after refused requests")


# --- The NBD-child client against each generation's qemu-nbd ------------------------


def test_qemu_nbd_test_child_is_spoken_to_in_its_newest_framing(
        tmp_path: Path, images: ImagePair, peer: Peer) -> None:
    """TEST as an NBD URI to the generation's own qemu-nbd: QEMU 10's speaks
    extended headers to our NBD-child client, QEMU 7.2's structured replies."""
    socket = tmp_path / "qemu-nbd.sock"
    child = peer.popen("qemu-nbd", "-f", "raw", "-t", "-k", str(socket), str(images.test),
                       stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TOOL_TIMEOUT
        while not socket.exists():
            assert child.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        server = start_server(tmp_path, images, "-v", test=f"nbd+unix:///?socket={socket}")
        framing = "structured replies" if peer == BOOKWORM else "extended headers"
        assert f"test child nbd+unix:///?socket={socket}: {framing}" in server.stderr, \
            server.stderr
        result = peer.run("qemu-io", "-f", "raw", "-c", "write -P 0x77 65536 131072",
                          "-c", "write -z 1048576 65536", "-c", "read -P 0x77 65536 131072",
                          "-c", "read -P 0 1048576 65536", server.uri, timeout=TOOL_TIMEOUT)
        assert "Pattern verification failed" not in result.stdout, result.stdout
        assert server.stop() == 0, server.stderr
    finally:
        terminate(child)
    assert_same_bytes(images.test_bytes(), images.raw_bytes(), "TEST behind qemu-nbd vs RAW")
