"""Any child: TEST (or RAW) as an image in another format (served by a qemu-nbd
nbdverify starts), as an NBD server by URI, or named by QEMU's json: syntax. A child
that fails, stalls or dies is a finding (or, failing like its sibling, the device's
error), never a crash. After every test no process started for it is left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
import trio
from children_support import (
    EXIT_GRACE,
    FORMAT_SIZE,
    TOOL_TIMEOUT,
    Helper,
    KiB,
    MiB,
    Rig,
    assert_images_identical,
    assert_io_error,
    is_running,
    make_format_pair,
    processes_mentioning,
    qemu_io,
    qemu_nbd_pid,
    random_content,
    wait_until,
)
from peers_support import assert_same_bytes, connect, watchdog
from support import (
    CORRUPT_OFFSET,
    NBDVERIFY,
    ImagePair,
    RunningServer,
    make_pair,
    require_tool,
    run,
)

from nbdverify.nbd_child import ChildRefused, NbdChild
from nbdverify.qemu_child import MALLOC_TUNABLES, qemu_environment

LIBNBD_TIMEOUT = 20.0
#: (pattern, offset, length): aligned, unaligned, and across a 64 KiB cluster boundary.
WRITES = [(0xAB, 0, MiB), (0xCD, 3 * MiB + 123, 4567), (0x3C, 6 * MiB - 1000, 70 * KiB)]
ZEROED = (8 * MiB + 512, 256 * KiB)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path) as running:
        yield running


def records_of(server: RunningServer, kind: str) -> list[dict[str, object]]:
    return [record for record in server.report_records() if record["kind"] == kind]


def assert_quiet(server: RunningServer) -> None:
    """Alive, no traceback, nothing reported."""
    assert server.process.poll() is None, server.stderr
    assert "Traceback" not in server.stderr, server.stderr
    assert server.report_records() == [], server.report_records()


def write_read_compare(server: RunningServer, raw: Path) -> None:
    """qemu-io write patterns (and a write of zeroes) through nbdverify, read them
    back, then qemu-img compare the whole export against RAW."""
    commands = [f"write -P {pattern:#x} {offset} {length}" for pattern, offset, length in WRITES]
    commands.append(f"write -z {ZEROED[0]} {ZEROED[1]}")
    commands += [f"read -P {pattern:#x} {offset} {length}" for pattern, offset, length in WRITES]
    commands.append(f"read -P 0 {ZEROED[0]} {ZEROED[1]}")
    result = qemu_io(server.uri, *commands)
    assert "Pattern verification failed" not in result.stdout, result.stdout
    for offset, length in [*((offset, length) for _, offset, length in WRITES), ZEROED]:
        assert f"read {length}/{length} bytes at offset {offset}" in result.stdout, result.stdout
    compare = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(raw),
                   server.uri], timeout=TOOL_TIMEOUT)
    assert "Images are identical" in compare.stdout


def assert_raw_has_the_writes(raw: Path) -> None:
    content = raw.read_bytes()
    for pattern, offset, length in WRITES:
        assert content[offset:offset + length] == bytes([pattern]) * length, (pattern, offset)
    assert content[ZEROED[0]:ZEROED[0] + ZEROED[1]] == bytes(ZEROED[1])


def exercise_format(rig: Rig, tmp_path: Path, image_format: str, *extra: str) -> None:
    """Serve RAW + TEST in `image_format`: writes and verified reads through the
    export, then (server stopped) the writes are in both images."""
    images = make_format_pair(tmp_path, image_format)
    server = rig.serve_pair(images, *extra)
    assert f"({image_format}, via qemu-nbd pid" in server.stderr, server.stderr
    write_read_compare(server, images.raw)
    assert_quiet(server)
    assert server.stop() == 0, server.stderr
    assert "findings=0" in server.stderr, server.stderr
    assert_raw_has_the_writes(images.raw)
    assert_images_identical(images.raw, images.test, image_format)


# --- Image formats ------------------------------------------------------------------


def test_qcow2_test_child_verifies_and_receives_every_write(rig: Rig, tmp_path: Path) -> None:
    exercise_format(rig, tmp_path, "qcow2")


@pytest.mark.parametrize("image_format", ["vmdk", "vdi"])
def test_other_format_test_child(rig: Rig, tmp_path: Path, image_format: str) -> None:
    exercise_format(rig, tmp_path, image_format)


def test_explicit_test_format_qcow2(rig: Rig, tmp_path: Path) -> None:
    exercise_format(rig, tmp_path, "qcow2", "--test-format", "qcow2")


def test_wrong_test_format_fails_startup_cleanly(rig: Rig, tmp_path: Path) -> None:
    """--test-format vmdk for a qcow2: exit 1 with one clear message, no traceback,
    no report file, no qemu-nbd left. The failure races qemu-nbd's exit against our
    connection, so try a few times."""
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    report = tmp_path / "report.jsonl"
    for attempt in range(6):
        result = run([NBDVERIFY, "serve", str(images.raw), str(images.test), "--test-format",
                      "vmdk", "-U", str(tmp_path / "nbd.sock"), "--report", str(report)],
                     timeout=TOOL_TIMEOUT, check=False)
        assert result.returncode == 1, (attempt, result.stderr)
        assert "Traceback" not in result.stderr, (attempt, result.stderr)
        assert f"nbdverify: cannot open TEST {images.test}" in result.stderr, result.stderr
        assert "vmdk" in result.stderr.lower(), result.stderr
        assert not report.exists()
        assert not processes_mentioning(str(tmp_path)), processes_mentioning(str(tmp_path))


def stand_in_qemu_nbd(script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put `script` first on PATH as qemu-nbd, with REAL in it naming the real one."""
    real = shutil.which("qemu-nbd")
    assert real is not None
    stand_in = tmp_path / "bin" / "qemu-nbd"
    stand_in.parent.mkdir()
    stand_in.write_text(script.replace("REAL", repr(real)))
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}:{os.environ['PATH']}")


def child_command(server: RunningServer) -> list[str]:
    """The command line of the server's qemu-nbd, as it runs."""
    cmdline = Path(f"/proc/{qemu_nbd_pid(server)}/cmdline").read_bytes()
    return cmdline.decode().split("\0")


STAND_IN = """#!/usr/bin/python3
import os, socket, sys, time
path = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--socket="))
bound = socket.socket(socket.AF_UNIX)
bound.bind(path)  # and no listen: a connect now is refused
time.sleep(0.3)
bound.close()  # the path stays: qemu-nbd unlinks it and binds its own
os.execv(REAL, [REAL, *sys.argv[1:]])
"""


@pytest.mark.parametrize("bound", [True, False], ids=["bound-not-listening", "path-missing"])
async def test_a_unix_socket_not_yet_listening_is_refused_not_failed(
        tmp_path: Path, bound: bool) -> None:
    """ChildRefused is what makes open_qemu_child ask again, so both moments of a
    qemu-nbd's start must raise it: bound but not listening, and the path missing
    while it replaces a stale socket."""
    path = tmp_path / "child.sock"
    listener = socket.socket(socket.AF_UNIX)
    if bound:
        listener.bind(str(path))
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                with pytest.raises(ChildRefused):
                    await NbdChild.open("test", f"nbd+unix:///?socket={path}", nursery)
    finally:
        listener.close()


def test_a_qemu_nbd_that_refuses_before_it_listens_is_asked_again(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-nbd's socket appears at its bind, a moment before it listens, and a
    connect in between is refused (seen with two servers starting at once). A
    stand-in holds that moment open for 0.3 s, then becomes the real qemu-nbd, which
    replaces the stale socket (the path is missing for a moment: CI hit that once).
    The server starts all the same."""
    stand_in_qemu_nbd(STAND_IN, tmp_path, monkeypatch)
    images = make_format_pair(tmp_path, "qcow2")
    server = rig.serve_pair(images, "--on-mismatch=error")
    write_read_compare(server, images.raw)
    assert_quiet(server)


def test_a_qcow2_child_is_served_with_io_uring(rig: Rig, tmp_path: Path) -> None:
    """This machine's QEMU and kernel allow io_uring, which serves page-cached reads
    at half qemu-nbd's CPU of its thread pool: the child must be using it."""
    server = rig.serve_pair(make_format_pair(tmp_path, "qcow2"), "--on-mismatch=error")
    assert "--aio=io_uring" in child_command(server), server.stderr


def test_a_compressed_qcow2_child_is_served_with_threads(rig: Rig, tmp_path: Path) -> None:
    """A compressed cluster at the end of the file hangs QEMU 7.2's io_uring on reading
    it: such a TEST is served with --aio=threads, and every byte reads back."""
    images = make_format_pair(tmp_path, "qcow2")
    last = FORMAT_SIZE - 64 * KiB
    with images.raw.open("r+b") as raw:
        raw.seek(last)
        raw.write(bytes(64 * KiB))  # converted as a hole
    compressed = tmp_path / "compressed.qcow2"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(images.raw),
         str(compressed)], timeout=TOOL_TIMEOUT)
    # Into the hole, compressed: appended to the file, which now ends mid-sector.
    qemu_io(str(compressed), f"write -c -P 0x5a {last} 64k", image_format="qcow2")
    assert compressed.stat().st_size % 512, "the premise: a file that ends mid-sector"
    with images.raw.open("r+b") as raw:
        raw.seek(last)
        raw.write(b"\x5a" * 64 * KiB)
    server = rig.serve_pair(ImagePair(images.raw, compressed), "--on-mismatch=error")
    assert "--aio=threads" in child_command(server)
    qemu_io(server.uri, f"read -P 0x5a {last} 64k", f"read 0 {FORMAT_SIZE}")
    assert_quiet(server)


#: A QEMU without io_uring. LISTEN: as 7.2 does, it listens first (so a handshake
#: begins) and fails on opening the image; or it fails at once, on parsing --aio.
NO_IO_URING = """#!/usr/bin/python3
import os, socket, sys, time
if "--aio=io_uring" in sys.argv:
    if LISTEN:
        path = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--socket="))
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen()
        time.sleep(0.3)
        sys.exit("qemu-nbd: Failed to blk_new_open 'x': Unable to use io_uring: "
                 "failed to init linux io_uring ring")
    sys.exit("qemu-nbd: Invalid aio mode 'io_uring'")
os.execv(REAL, [REAL, *sys.argv[1:]])
"""


@pytest.mark.parametrize("listen", [False, True], ids=["at-once", "after-it-listens"])
def test_a_qemu_nbd_without_io_uring_serves_with_threads(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listen: bool) -> None:
    """A QEMU without io_uring (or a kernel or seccomp profile that refuses it): the
    child starts again with --aio=threads, the log says why, and all works."""
    stand_in_qemu_nbd(NO_IO_URING.replace("LISTEN", repr(listen)), tmp_path, monkeypatch)
    images = make_format_pair(tmp_path, "qcow2")
    server = rig.serve_pair(images, "--on-mismatch=error")
    assert "--aio=threads" in child_command(server)
    assert "qemu-nbd cannot use --aio=io_uring (qemu-nbd: " in server.stderr
    write_read_compare(server, images.raw)


def test_nbd_child_that_resets_the_handshake_fails_startup_cleanly(tmp_path: Path) -> None:
    """A TEST server that sends its greeting, then drops the connection with our reply
    unread (the client sees ECONNRESET, as with a qemu-nbd that failed to open its
    image): exit 1 naming TEST, no traceback."""
    images = make_pair(tmp_path, size=MiB)
    path = tmp_path / "reset.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(TOOL_TIMEOUT)

    def greet_then_reset() -> None:
        with listener, listener.accept()[0] as connection:
            connection.settimeout(TOOL_TIMEOUT)
            connection.sendall(b"NBDMAGIC" + struct.pack(">QH", 0x49484156454F5054, 3))
            connection.recv(1, socket.MSG_PEEK)  # the client's reply arrived, unread

    thread = threading.Thread(target=greet_then_reset, daemon=True)
    thread.start()
    result = run([NBDVERIFY, "serve", str(images.raw), f"nbd+unix:///?socket={path}",
                  "-U", str(tmp_path / "nbd.sock")], timeout=TOOL_TIMEOUT, check=False)
    thread.join(timeout=TOOL_TIMEOUT)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "nbdverify: cannot open TEST nbd+unix:" in result.stderr, result.stderr


def test_json_blkverify_syntax_with_a_qcow2_test(rig: Rig, tmp_path: Path) -> None:
    images = make_format_pair(tmp_path, "qcow2")
    spec = "json:" + json.dumps({
        "driver": "blkverify",
        "raw": {"driver": "file", "filename": str(images.raw)},
        "test": {"driver": "qcow2", "file": {"driver": "file", "filename": str(images.test)}},
    })
    server = rig.serve([spec], images)
    assert f"test={images.test} (qcow2, via qemu-nbd pid" in server.stderr, server.stderr
    write_read_compare(server, images.raw)
    assert_quiet(server)
    assert server.stop() == 0, server.stderr
    assert_raw_has_the_writes(images.raw)
    assert_images_identical(images.raw, images.test, "qcow2")


def test_qcow2_child_outlives_an_idle_spell(rig: Rig, tmp_path: Path) -> None:
    """The qemu-nbd must live as long as the server, not die with whichever thread
    happened to start it (PR_SET_PDEATHSIG fires when the parent *thread* exits)."""
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    server = rig.serve_pair(images, "--on-mismatch=error")
    pid = qemu_nbd_pid(server)
    idle = 12.0  # beyond trio's 10 s idle worker-thread lifetime
    died = wait_until(lambda: not is_running(pid), idle)
    assert not died, f"qemu-nbd {pid} died while the server idled: {server.stderr}"
    result = qemu_io(server.uri, "read 0 64k", check=False)
    assert result.returncode == 0, result.stdout + result.stderr + server.stderr
    assert_quiet(server)


# --- Corruption inside an image format -------------------------------------------------


def test_corruption_inside_qcow2_is_found_at_its_byte(rig: Rig, tmp_path: Path) -> None:
    content = random_content(FORMAT_SIZE, avoid={CORRUPT_OFFSET: 0x5A})
    images = make_format_pair(tmp_path, "qcow2", content=content)
    qemu_io(str(images.test), f"write -P 0x5a {CORRUPT_OFFSET} 1", image_format="qcow2")
    server = rig.serve_pair(images)
    result = qemu_io(server.uri, "read 1M 64k", check=False)
    assert result.returncode != 0
    assert_io_error(result)
    records = server.report_records()
    assert len(records) == 1, records
    record = records[0]
    assert record["kind"] == "mismatch"
    assert (record["operation"], record["offset"], record["length"]) == ("read", MiB, 64 * KiB)
    assert (record["mismatch_offset"], record["sector"]) == (CORRUPT_OFFSET, 2049)
    assert record["differing_sectors"] == 1
    rows = record["rows"]
    assert isinstance(rows, list) and rows
    index = CORRUPT_OFFSET - rows[0]["offset"]
    assert bytes.fromhex(rows[0]["test"])[index] == 0x5A
    assert bytes.fromhex(rows[0]["raw"])[index] == content[CORRUPT_OFFSET]
    assert "mismatch at offset 1049576 (sector 2049)" in server.stderr, server.stderr


# --- NBD servers as children ---------------------------------------------------------------


def start_file_server(rig: Rig, kind: str, image: Path) -> Helper:
    if kind == "nbdkit":
        return rig.nbdkit("test-server", "file", str(image))
    return rig.qemu_nbd("test-server", image)


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_nbd_uri_test_child(rig: Rig, tmp_path: Path, kind: str) -> None:
    images = make_pair(tmp_path, size=16 * MiB)
    helper = start_file_server(rig, kind, images.test)
    server = rig.serve([str(images.raw), helper.uri], images)
    assert f"test={helper.uri}" in server.stderr, server.stderr
    write_read_compare(server, images.raw)
    assert_quiet(server)
    assert server.stop() == 0, server.stderr
    helper.stop()
    assert_raw_has_the_writes(images.raw)
    assert_same_bytes(images.test_bytes(), images.raw_bytes(), "TEST behind the URI vs RAW")


@pytest.mark.parametrize(("inner_options", "framing"), [
    ((), "extended headers"),
    (("--no-extended-headers",), "structured replies"),
])
def test_an_nbdverify_child_is_spoken_to_with_extended_headers_where_offered(
        rig: Rig, tmp_path: Path, inner_options: tuple[str, ...], framing: str) -> None:
    """bookworm's qemu-nbd and nbdkit do not speak extended headers; our own server
    does, so it is the bookworm-side peer for the child's 64-bit path."""
    images = make_pair(tmp_path, size=16 * MiB)
    inner_raw = tmp_path / "inner-raw.img"
    inner_raw.write_bytes(images.test_bytes())
    inner = rig.serve([str(inner_raw), str(images.test)], ImagePair(inner_raw, images.test),
                      *inner_options)
    server = rig.serve([str(images.raw), inner.uri], images, "-v")
    assert f"test child {inner.uri}: {framing}" in server.stderr, server.stderr
    write_read_compare(server, images.raw)
    assert_quiet(server)
    assert server.stop() == 0, server.stderr
    assert inner.stop() == 0, inner.stderr
    assert_raw_has_the_writes(images.raw)
    assert_same_bytes(images.test_bytes(), images.raw_bytes(), "TEST behind the URI vs RAW")


def test_corruption_behind_an_nbd_uri_is_found(rig: Rig, tmp_path: Path) -> None:
    images = make_pair(tmp_path)
    images.corrupt_test()
    helper = rig.nbdkit("test-server", "file", str(images.test))
    server = rig.serve([str(images.raw), helper.uri], images, "--on-mismatch=error")
    assert_io_error(qemu_io(server.uri, "read 1M 64k", check=False))
    [record] = server.report_records()
    assert (record["kind"], record["mismatch_offset"], record["sector"]) == (
        "mismatch", CORRUPT_OFFSET, 2049)
    assert server.process.poll() is None


# --- Child faults are findings, not crashes ---------------------------------------------


def error_filter(image: Path, trigger: Path, operation: str, error: str) -> list[str]:
    """nbdkit arguments: the file plugin behind the error filter, failing every
    `operation` with `error` while `trigger` exists."""
    return ["--filter=error", "file", str(image), f"error-{operation}={error}",
            f"error-{operation}-rate=100%", f"error-file={trigger}"]


def nbd_errno(call: object) -> int:
    """The errno of the nbd.Error a libnbd call raises."""
    assert callable(call)
    with pytest.raises(nbd.Error) as caught:
        call()
    return int(caught.value.errnum)


def test_test_child_read_error_is_a_divergence(rig: Rig, tmp_path: Path) -> None:
    images = make_pair(tmp_path)
    content = images.raw_bytes()
    trigger = tmp_path / "trigger"
    helper = rig.nbdkit("test-server", *error_filter(images.test, trigger, "pread", "EIO"))
    server = rig.serve([str(images.raw), helper.uri], images, "--on-mismatch=error")
    handle = connect(server.uri)
    offset, length = MiB + 4096, 64 * KiB
    with watchdog(server, LIBNBD_TIMEOUT):
        assert handle.pread(length, offset) == content[offset:offset + length]
        trigger.touch()
        assert nbd_errno(lambda: handle.pread(length, offset)) == errno.EIO
        trigger.unlink()
        # Same connection: the export kept serving (policy error).
        assert handle.pread(length, offset) == content[offset:offset + length]
        handle.shutdown()
    [record] = server.report_records()
    assert record["kind"] == "divergence", record
    assert (record["operation"], record["offset"], record["length"]) == ("read", offset, length)
    assert record["raw_error"] is None
    assert isinstance(record["test_error"], str) and "EIO" in record["test_error"], record
    assert server.process.poll() is None
    assert "Traceback" not in server.stderr, server.stderr
    result = qemu_io(server.uri, "read 0 64k")  # a new client too
    assert "read 65536/65536 bytes" in result.stdout


def test_test_child_that_stalls_times_out_as_a_divergence(rig: Rig, tmp_path: Path) -> None:
    images = make_pair(tmp_path)
    helper = rig.nbdkit("test-server", "--filter=delay", "file", str(images.test),
                        "delay-read=5")
    server = rig.serve([str(images.raw), helper.uri], images, "--on-mismatch=error",
                       "--child-timeout", "1")
    handle = connect(server.uri)
    with watchdog(server, LIBNBD_TIMEOUT):
        started = time.monotonic()
        assert nbd_errno(lambda: handle.pread(64 * KiB, 0)) == errno.EIO
        elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"the stalled read took {elapsed:.1f} s with --child-timeout 1"
    [record] = server.report_records()
    assert (record["kind"], record["operation"], record["offset"], record["length"]) == (
        "divergence", "read", 0, 64 * KiB), record
    assert record["raw_error"] is None
    assert isinstance(record["test_error"], str) and "no reply within" in record["test_error"]
    assert server.process.poll() is None
    assert "Traceback" not in server.stderr, server.stderr


def test_killed_qemu_nbd_child_is_a_divergence_not_a_crash(rig: Rig, tmp_path: Path) -> None:
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    server = rig.serve_pair(images, "--on-mismatch=error")
    pid = qemu_nbd_pid(server)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not is_running(pid), EXIT_GRACE)
    result = qemu_io(server.uri, "read 0 64k", check=False)
    assert result.returncode != 0
    assert_io_error(result)
    divergences = records_of(server, "divergence")
    assert divergences, server.stderr
    first = divergences[0]
    assert (first["operation"], first["offset"], first["length"]) == ("read", 0, 64 * KiB)
    assert first["raw_error"] is None
    assert isinstance(first["test_error"], str) and "connection lost" in first["test_error"]
    assert server.process.poll() is None, server.stderr
    # Still serving (policy error): the next read fails the same way, as a finding.
    assert_io_error(qemu_io(server.uri, "read 1M 4k", check=False))
    assert len(records_of(server, "divergence")) >= 2, server.report_records()
    assert server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr, server.stderr


def test_both_children_failing_alike_is_the_device_error(rig: Rig, tmp_path: Path) -> None:
    images = make_pair(tmp_path)
    content = images.raw_bytes()
    trigger = tmp_path / "trigger"
    raw = rig.nbdkit("raw-server", *error_filter(images.raw, trigger, "pread", "EIO"))
    test = rig.nbdkit("test-server", *error_filter(images.test, trigger, "pread", "EIO"))
    server = rig.serve([raw.uri, test.uri], images, "--on-mismatch=error")
    handle = connect(server.uri)
    with watchdog(server, LIBNBD_TIMEOUT):
        trigger.touch()
        assert nbd_errno(lambda: handle.pread(4096, 0)) == errno.EIO
        trigger.unlink()
        assert handle.pread(4096, 0) == content[:4096]  # the same connection goes on
        handle.shutdown()
    assert_quiet(server)


def test_children_failing_differently_is_a_divergence(rig: Rig, tmp_path: Path) -> None:
    images = make_pair(tmp_path)
    before = images.raw_bytes()
    trigger = tmp_path / "trigger"
    trigger.touch()
    raw = rig.nbdkit("raw-server", *error_filter(images.raw, trigger, "pwrite", "ENOSPC"))
    test = rig.nbdkit("test-server", *error_filter(images.test, trigger, "pwrite", "EIO"))
    server = rig.serve([raw.uri, test.uri], images, "--on-mismatch=error")
    handle = connect(server.uri)
    with watchdog(server, LIBNBD_TIMEOUT):
        # The policy (error) fails the request with EIO, whatever the children said.
        assert nbd_errno(lambda: handle.pwrite(b"\x77" * 4096, 8192)) == errno.EIO
        handle.shutdown()
    [record] = server.report_records()
    assert (record["kind"], record["operation"], record["offset"], record["length"]) == (
        "divergence", "write", 8192, 4096), record
    assert isinstance(record["raw_error"], str) and "ENOSPC" in record["raw_error"], record
    assert isinstance(record["test_error"], str) and "EIO" in record["test_error"], record
    assert server.process.poll() is None
    assert "Traceback" not in server.stderr, server.stderr
    assert images.raw_bytes() == before and images.test_bytes() == before


# --- No child outlives the server ------------------------------------------------------------


def test_qemu_nbd_dies_with_a_killed_server(rig: Rig, tmp_path: Path) -> None:
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    server = rig.serve_pair(images)
    pid = qemu_nbd_pid(server)
    server.process.kill()
    server.process.wait(timeout=EXIT_GRACE)
    assert wait_until(lambda: not is_running(pid), EXIT_GRACE), f"qemu-nbd {pid} survived"
    assert not processes_mentioning(str(tmp_path))


def test_qemu_nbd_stops_with_the_server(rig: Rig, tmp_path: Path) -> None:
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    server = rig.serve_pair(images)
    pid = qemu_nbd_pid(server)
    assert server.stop() == 0, server.stderr
    assert not is_running(pid), f"qemu-nbd {pid} outlived the server"
    assert not processes_mentioning(str(tmp_path))


def test_qemu_nbd_keeps_its_freed_read_buffers(rig: Rig, tmp_path: Path) -> None:
    """Its READ buffers come from a heap glibc does not trim (no page faults per READ);
    GLIBC_TUNABLES of our own caller still come last, and win."""
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    pid = qemu_nbd_pid(rig.serve_pair(images))
    # glibc splits the variable at its colons in place, once parsed.
    environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    start = environment.index(b"GLIBC_TUNABLES=" + MALLOC_TUNABLES.split(":")[0].encode())
    assert environment[start + 1] == MALLOC_TUNABLES.split(":")[1].encode()
    mine = qemu_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert mine["GLIBC_TUNABLES"] == f"{MALLOC_TUNABLES}:glibc.malloc.arena_max=2"


def test_startup_failure_leaves_no_qemu_nbd(rig: Rig, tmp_path: Path) -> None:
    """RAW is missing: the qcow2 TEST is never opened, RAW's failure is named."""
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    missing = tmp_path / "missing.img"
    result = run([NBDVERIFY, "serve", str(missing), str(images.test), "-U",
                  str(tmp_path / "nbd.sock")], timeout=TOOL_TIMEOUT, check=False)
    assert result.returncode == 1, result.stderr
    assert f"cannot open RAW image {missing}" in result.stderr, result.stderr
    assert not processes_mentioning(str(tmp_path))


def test_size_mismatch_with_a_qcow2_test_stops_its_qemu_nbd(rig: Rig, tmp_path: Path) -> None:
    images = make_format_pair(tmp_path, "qcow2", size=4 * MiB)
    run([require_tool("qemu-img"), "resize", "-f", "qcow2", str(images.test), "8M"],
        timeout=TOOL_TIMEOUT)
    result = run([NBDVERIFY, "serve", str(images.raw), str(images.test), "-U",
                  str(tmp_path / "nbd.sock")], timeout=TOOL_TIMEOUT, check=False)
    assert result.returncode == 1, result.stderr
    assert "differ in size" in result.stderr, result.stderr
    assert str(4 * MiB) in result.stderr and str(8 * MiB) in result.stderr
    assert not processes_mentioning(str(tmp_path))
