"""A TEST image that differs from RAW, read through a real `nbdverify serve`.

The corruption is made behind the server's back before it starts
(ImagePair.corrupt_test alters byte 1049576, in sector 2049), so every read of
1 MiB + 64 KiB must find it. Each mismatch policy is checked from the guest's
side (qemu-io, libnbd) and from the server's (exit status, stderr, --report).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from support import (
    CORRUPT_OFFSET,
    NBD_TIMEOUT,
    NBDVERIFY,
    STOP_TIMEOUT,
    ImagePair,
    Launcher,
    LibnbdClient,
    require_tool,
    run,
    start_server,
)

SECTOR = 512
READ_OFFSET = 1 << 20
READ_LENGTH = 64 * 1024
CORRUPT_SECTOR = CORRUPT_OFFSET // SECTOR
CLEAN_OFFSET = 4 << 20  # a range far from every corruption these tests make
QEMU_TIMEOUT = 30.0
SUMMARY = (
    f"read offset={READ_OFFSET} length={READ_LENGTH} mismatch at offset {CORRUPT_OFFSET} "
    f"(sector {CORRUPT_SECTOR}): bitflip, 4 bits differ from its initial content; "
    f"1 of {READ_LENGTH // SECTOR} sectors differ"
)
# How many fresh servers the connection-closing check tries: the bug it guards
# against is a race the client wins most of the time, not every time.
RACE_ATTEMPTS = 3


def qemu_io(uri: str, command: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-io"), "-f", "raw", "-c", command, uri],
               timeout=QEMU_TIMEOUT, check=False)


def expect_eio(call: Callable[[], object]) -> nbd.Error:
    with pytest.raises(nbd.Error) as caught:
        call()
    assert caught.value.errno == "EIO", caught.value
    return caught.value


def hex_bytes(data: bytes) -> str:
    return " ".join(f"{byte:02x}" for byte in data)


def test_corrupt_read_fails_and_is_reported_on_stderr_and_in_the_report(
    launch: Launcher, images: ImagePair
) -> None:
    images.corrupt_test()
    raw, test = images.raw_bytes(), images.test_bytes()
    server = launch()
    result = qemu_io(server.uri, f"read {READ_OFFSET} {READ_LENGTH}")
    assert result.returncode != 0
    assert "read failed: Input/output error" in result.stdout, result.stdout

    lines = server.stderr.splitlines()
    summary = f"nbdverify: {SUMMARY}"
    assert summary in lines, server.stderr
    at = lines.index(summary)
    row = CORRUPT_OFFSET - CORRUPT_OFFSET % 16
    raw_line, test_line = lines[at + 1], lines[at + 2]
    assert raw_line.split()[1] == "raw" and test_line.split()[1] == "test", server.stderr
    assert f"{row:#012x}: {hex_bytes(raw[row:row + 16])}" in raw_line
    assert f"{row:#012x}: {hex_bytes(test[row:row + 16])}" in test_line

    records = server.report_records()
    assert len(records) == 1, records
    record = records[0]
    assert record["kind"] == "mismatch"
    assert record["mismatch_offset"] == CORRUPT_OFFSET
    assert record["sector"] == CORRUPT_SECTOR
    assert record["differing_sectors"] == 1
    assert record["total_sectors"] == READ_LENGTH // SECTOR
    assert record["offset"] == READ_OFFSET and record["length"] == READ_LENGTH
    assert record["message"] == SUMMARY


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_guest_never_receives_the_altered_bytes(
    launch: Launcher, images: ImagePair, structured: bool
) -> None:
    images.corrupt_test()
    raw, test = images.raw_bytes(), images.test_bytes()
    server = launch()
    client = LibnbdClient(server.uri, structured=structured)
    assert bool(client.handle.get_structured_replies_negotiated()) == structured

    # An unrelated read before the corrupt one is verified and served.
    assert client.pread(READ_LENGTH, 0) == raw[:READ_LENGTH]

    target = bytearray(b"\xee" * READ_LENGTH)
    expect_eio(lambda: client.pread_into(target, READ_OFFSET))
    window = test[CORRUPT_OFFSET - 8:CORRUPT_OFFSET + 8]
    assert window != raw[CORRUPT_OFFSET - 8:CORRUPT_OFFSET + 8]
    assert window not in bytes(target), "TEST's altered bytes reached the guest"


def test_disconnect_policy_fails_the_read_stops_the_export_keeps_the_process(
    launch: Launcher, images: ImagePair
) -> None:
    images.corrupt_test()
    raw_before, test_before = images.raw_bytes(), images.test_bytes()
    server = launch()  # --on-mismatch=disconnect is the default
    client = LibnbdClient(server.uri)
    expect_eio(lambda: client.pread(READ_LENGTH, READ_OFFSET))

    refused = qemu_io(server.uri, "read 0 64k")
    assert refused.returncode != 0
    assert "export stopped after a verification failure" in refused.stderr, refused.stderr
    assert f"sector {CORRUPT_SECTOR}" in refused.stderr, refused.stderr
    with pytest.raises(nbd.Error):
        LibnbdClient(server.uri)

    assert server.process.poll() is None, "the server exited under --on-mismatch=disconnect"
    assert images.raw_bytes() == raw_before, "a read modified RAW"
    assert images.test_bytes() == test_before, "a read modified TEST"
    assert [r["mismatch_offset"] for r in server.report_records()] == [CORRUPT_OFFSET]


REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0


def _read_request(cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, cookie, offset, length)


def _answered_after_the_failure(directory: Path, images: ImagePair) -> str | None:
    """Start a server, fail a read, and at once send the next request on the same
    connection and on an idle one. Under --on-mismatch=disconnect both connections
    must be closed: returns what, if anything, was still served."""
    directory.mkdir()
    server = start_server(directory, images)
    try:
        idle = LibnbdClient(server.uri, structured=False)
        client = LibnbdClient(server.uri, structured=False)
        # libnbd did the handshake; the wire is driven by hand from here, so the next
        # request leaves the moment the error reply is in.
        wire = socket.socket(fileno=os.dup(client.handle.aio_get_fd()))
        wire.setblocking(True)
        wire.settimeout(NBD_TIMEOUT)
        with wire:
            wire.sendall(_read_request(1, READ_OFFSET, READ_LENGTH))
            reply = wire.recv(SIMPLE_REPLY.size, socket.MSG_WAITALL)
            assert SIMPLE_REPLY.unpack(reply) == (SIMPLE_REPLY_MAGIC, errno.EIO, 1)
            try:
                wire.sendall(_read_request(2, 0, SECTOR))
                answer = wire.recv(SIMPLE_REPLY.size, socket.MSG_WAITALL)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
        if answer:
            return f"the failing connection answered a later request: {answer.hex()}"
        try:
            idle.pread(SECTOR, 0)
        except nbd.Error:
            return None
        return "an idle connection still served a read after the export stopped"
    finally:
        server.stop()


def test_disconnect_policy_closes_connections_after_the_failed_read(
    tmp_path: Path, images: ImagePair
) -> None:
    images.corrupt_test()
    for attempt in range(RACE_ATTEMPTS):
        served = _answered_after_the_failure(tmp_path / f"attempt{attempt}", images)
        assert served is None, f"attempt {attempt + 1}: {served}"


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_error_policy_fails_the_read_and_keeps_serving(
    launch: Launcher, images: ImagePair, structured: bool
) -> None:
    images.corrupt_test()
    raw = images.raw_bytes()
    server = launch("--on-mismatch=error")
    client = LibnbdClient(server.uri, structured=structured)
    expect_eio(lambda: client.pread(READ_LENGTH, READ_OFFSET))
    # The same connection keeps serving, in step with the client.
    assert client.pread(READ_LENGTH, CLEAN_OFFSET) == raw[CLEAN_OFFSET:CLEAN_OFFSET + READ_LENGTH]
    expect_eio(lambda: client.pread(READ_LENGTH, READ_OFFSET))
    assert client.pread(SECTOR, 0) == raw[:SECTOR]
    # New connections are accepted.
    again = qemu_io(server.uri, f"read {CLEAN_OFFSET} 64k")
    assert again.returncode == 0, again.stderr
    assert server.process.poll() is None
    assert len(server.report_records()) == 2


def test_log_policy_serves_raw_data_and_keeps_serving(
    launch: Launcher, images: ImagePair
) -> None:
    images.corrupt_test()
    raw = images.raw_bytes()
    server = launch("--on-mismatch=log")
    client = LibnbdClient(server.uri)
    data = client.pread(READ_LENGTH, READ_OFFSET)
    assert data == raw[READ_OFFSET:READ_OFFSET + READ_LENGTH]
    assert client.pread(READ_LENGTH, CLEAN_OFFSET) == raw[CLEAN_OFFSET:CLEAN_OFFSET + READ_LENGTH]
    again = qemu_io(server.uri, f"read {READ_OFFSET} 64k")
    assert again.returncode == 0, again.stderr
    assert server.process.poll() is None
    records = server.report_records()
    assert [r["mismatch_offset"] for r in records] == [CORRUPT_OFFSET, CORRUPT_OFFSET]
    assert f"nbdverify: {SUMMARY}" in server.stderr.splitlines()


def test_log_policy_reports_every_corrupted_region(
    launch: Launcher, images: ImagePair
) -> None:
    corrupt = [CORRUPT_OFFSET, (3 << 20) + 4097, (6 << 20) + 123]
    for offset in corrupt:
        images.corrupt_test(offset)
    raw = images.raw_bytes()
    server = launch("--on-mismatch=log")
    client = LibnbdClient(server.uri)
    reads = [offset - offset % READ_LENGTH for offset in corrupt]
    for offset in reads:
        assert client.pread(READ_LENGTH, offset) == raw[offset:offset + READ_LENGTH]
    # One read across all three: served from RAW, one record naming all three.
    assert client.pread(len(raw), 0) == raw

    records = server.report_records()
    assert len(records) == len(reads) + 1, records
    for record, offset, start in zip(records, corrupt, reads, strict=False):
        assert record["kind"] == "mismatch"
        assert record["offset"] == start and record["length"] == READ_LENGTH
        assert record["mismatch_offset"] == offset
        assert record["sector"] == offset // SECTOR
        assert record["differing_sectors"] == 1
    whole = records[-1]
    assert whole["offset"] == 0 and whole["length"] == len(raw)
    assert whole["mismatch_offset"] == corrupt[0]
    assert whole["differing_sectors"] == len(corrupt)
    assert whole["total_sectors"] == len(raw) // SECTOR
    ranges = whole["differing_ranges"]
    assert isinstance(ranges, list)
    for offset in corrupt:
        assert any(start <= offset < end for start, end in ranges), (offset, ranges)
    assert server.process.poll() is None


def test_exit_policy_exits_with_status_3_promptly(
    launch: Launcher, images: ImagePair
) -> None:
    images.corrupt_test()
    for path in (images.raw, images.test):  # so the exit's flush has nothing of ours to write
        with path.open("rb+") as image:
            os.fsync(image.fileno())
    server = launch("--on-mismatch=exit")
    result = qemu_io(server.uri, f"read {READ_OFFSET} {READ_LENGTH}")
    returned = time.monotonic()
    assert result.returncode != 0
    assert "read failed: Input/output error" in result.stdout, result.stdout
    status = server.wait(timeout=STOP_TIMEOUT)
    elapsed = time.monotonic() - returned
    assert status == 3, server.stderr
    assert elapsed < 1.5, f"exited {elapsed:.2f} s after the mismatch"
    assert [r["sector"] for r in server.report_records()] == [CORRUPT_SECTOR]


def test_no_provenance_still_catches_the_corruption_but_names_no_writer(
    launch: Launcher, images: ImagePair
) -> None:
    images.corrupt_test()
    server = launch("--no-provenance")
    result = qemu_io(server.uri, f"read {READ_OFFSET} {READ_LENGTH}")
    assert "read failed: Input/output error" in result.stdout, result.stdout
    [record] = server.report_records()
    assert (record["mismatch_offset"], record["sector"]) == (CORRUPT_OFFSET, CORRUPT_SECTOR)
    assert record["ranges"] == []  # nothing remembered: no class, no last writer
    assert "bitflip" not in str(record["message"])


def test_fingerprints_need_provenance(images: ImagePair) -> None:
    result = run([NBDVERIFY, "serve", str(images.raw), str(images.test), "-U", "x.sock",
                  "--no-provenance", "--fingerprints"], timeout=QEMU_TIMEOUT, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "nbdverify: error: --fingerprints needs provenance (drop --no-provenance)"]
