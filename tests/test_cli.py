"""`nbdverify serve` as a user runs it: arguments, start-up failures, options,
signals and --run, each through the real command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nbd
import pytest
from support import (
    CORRUPT_OFFSET,
    IMAGE_SIZE,
    NBDVERIFY,
    STOP_TIMEOUT,
    ImagePair,
    Launcher,
    LibnbdClient,
    RunningServer,
    nbdverify,
    require_tool,
    run,
    wait_until_serving,
)

COMMAND_TIMEOUT = 30.0
SECTOR = 512
CHUNK = 64 * 1024


def spawn(directory: Path, images: ImagePair, *args: str) -> RunningServer:
    """`nbdverify serve ARGS` (no other options) in the background, once it serves."""
    stderr_path = directory / f"spawned-{time.monotonic_ns()}.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen([NBDVERIFY, "serve", *args], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    return wait_until_serving(process, stderr_path, directory / "no-report", None, images)


@pytest.fixture
def spawned() -> Iterator[list[RunningServer]]:
    """Servers a test spawns; killed after it if still running."""
    servers: list[RunningServer] = []
    yield servers
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=STOP_TIMEOUT)


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    arguments = [part for command in commands for part in ("-c", command)]
    return run([require_tool("qemu-io"), "-f", "raw", *arguments, uri],
               timeout=COMMAND_TIMEOUT, check=False)


# --- Bad arguments: one line, exit 2 ------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-option", "--bogus"),
        ("no-images", "IMAGE"),
        ("three-images", "RAW TEST"),
        ("bad-policy", "bogus"),
        ("blkverify-one-path", "blkverify:onlyone"),
        ("negative-dump-cap", "--dump-max-bytes must not be negative"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_2(
    tmp_path: Path, images: ImagePair, case: str, expected: str
) -> None:
    raw, test = str(images.raw), str(images.test)
    argument_lists = {
        "unknown-option": [raw, test, "--bogus"],
        "no-images": [],
        "three-images": [raw, test, raw],
        "bad-policy": [raw, test, "--on-mismatch=bogus"],
        "blkverify-one-path": ["blkverify:onlyone"],
        "negative-dump-cap": [raw, test, "--dump-dir", str(tmp_path), "--dump-max-bytes=-1"],
    }
    socket, pidfile, report = tmp_path / "nbd.sock", tmp_path / "pid", tmp_path / "report"
    before = images.raw_bytes(), images.test_bytes()
    result = nbdverify("serve", *argument_lists[case], "-U", str(socket), "-P", str(pidfile),
                       "--report", str(report))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == ""
    assert not socket.exists() and not pidfile.exists() and not report.exists()
    assert (images.raw_bytes(), images.test_bytes()) == before


# --- Start-up failures: a clear message, exit 1, nothing created ---------------------


def failed_start_line(directory: Path, images: ImagePair) -> str:
    """Start a server that must refuse to start: exit 1, one line on stderr, and no
    socket, pidfile or report file left behind. Returns the line."""
    socket, pidfile, report = directory / "nbd.sock", directory / "pid", directory / "report"
    result = nbdverify("serve", str(images.raw), str(images.test), "-U", str(socket),
                       "-P", str(pidfile), "--report", str(report))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert not socket.exists() and not pidfile.exists() and not report.exists()
    return lines[0]


@pytest.mark.parametrize("missing", ["raw", "test"])
def test_missing_image_names_the_path_and_creates_nothing(
    tmp_path: Path, images: ImagePair, missing: str
) -> None:
    path = images.raw if missing == "raw" else images.test
    other = images.test if missing == "raw" else images.raw
    path.unlink()
    other_before = other.read_bytes()
    line = failed_start_line(tmp_path, images)
    assert str(path) in line and missing.upper() in line, line
    assert not path.exists(), "the missing image was created"
    assert other.read_bytes() == other_before


def test_images_of_different_sizes_are_refused_unchanged(
    tmp_path: Path, images: ImagePair
) -> None:
    with images.test.open("r+b") as test:
        test.truncate(IMAGE_SIZE // 2)
    before = images.raw_bytes(), images.test_bytes()
    line = failed_start_line(tmp_path, images)
    assert str(IMAGE_SIZE) in line and str(IMAGE_SIZE // 2) in line, line
    assert (images.raw_bytes(), images.test_bytes()) == before
    assert images.raw.stat().st_size == IMAGE_SIZE
    assert images.test.stat().st_size == IMAGE_SIZE // 2


# --- Options -------------------------------------------------------------------------


def test_blkverify_single_argument_serves_raw_and_test_in_that_order(
    tmp_path: Path, images: ImagePair, spawned: list[RunningServer]
) -> None:
    images.corrupt_test()
    raw = images.raw_bytes()
    socket = tmp_path / "nbd.sock"
    server = spawn(tmp_path, images, f"blkverify:{images.raw}:{images.test}", "-U", str(socket),
                   "--on-mismatch=log")
    spawned.append(server)
    assert f"raw={images.raw}" in server.stderr and f"test={images.test}" in server.stderr
    result = qemu_io(server.uri, "read 0 64k", "write -P 0x22 0 64k", "read -P 0x22 0 64k")
    assert result.returncode == 0, result.stderr
    assert "read 65536/65536 bytes at offset 0" in result.stdout
    # Under --on-mismatch=log the server returns RAW's bytes: RAW is the first path.
    offset = CORRUPT_OFFSET - CORRUPT_OFFSET % CHUNK
    assert LibnbdClient(server.uri).pread(CHUNK, offset) == raw[offset:offset + CHUNK]
    assert images.raw_bytes()[:CHUNK] == b"\x22" * CHUNK
    assert images.test_bytes()[:CHUNK] == b"\x22" * CHUNK
    assert server.stop() == 0


def test_pidfile_holds_the_server_pid_once_serving(
    tmp_path: Path, images: ImagePair, launch: Launcher
) -> None:
    pidfile = tmp_path / "nbdverify.pid"
    server = launch("-P", str(pidfile))
    assert pidfile.read_text() == f"{server.process.pid}\n"
    assert server.stop() == 0


def test_export_name_is_required_to_match(launch: Launcher) -> None:
    server = launch("-e", "disk1")
    assert server.socket is not None
    socket = quote(str(server.socket))
    assert server.uri == f"nbd+unix:///disk1?socket={socket}"
    wrong = qemu_io(f"nbd+unix:///other?socket={socket}", "read 0 64k")
    assert wrong.returncode != 0
    assert "no export named 'other'" in wrong.stderr, wrong.stderr
    right = qemu_io(f"nbd+unix:///disk1?socket={socket}", "read 0 64k")
    assert right.returncode == 0, right.stderr
    assert "read 65536/65536 bytes at offset 0" in right.stdout


def test_readonly_refuses_writes_with_eperm_and_serves_reads(
    images: ImagePair, launch: Launcher
) -> None:
    before = images.raw_bytes(), images.test_bytes()
    server = launch("-r")
    client = LibnbdClient(server.uri)
    assert client.handle.is_read_only()
    with pytest.raises(nbd.Error) as refused:
        client.complete(client.handle.aio_pwrite(nbd.Buffer.from_bytearray(bytes(SECTOR)), 0))
    assert refused.value.errno == "EPERM", refused.value

    # With libnbd's checks off the requests reach the server, which must refuse them.
    lax = LibnbdClient(server.uri, strict=False)
    writes: list[Callable[[], int]] = [
        lambda: lax.handle.aio_pwrite(nbd.Buffer.from_bytearray(b"\x33" * SECTOR), 0),
        lambda: lax.handle.aio_zero(SECTOR, 0),
        lambda: lax.handle.aio_trim(SECTOR, 0),
    ]
    for issue in writes:
        with pytest.raises(nbd.Error) as failed:
            lax.complete(issue())
        assert failed.value.errno == "EPERM", failed.value
        assert "command failed" in failed.value.string, failed.value  # the server said so
    assert lax.pread(CHUNK, 0) == before[0][:CHUNK]
    assert client.pread(CHUNK, CHUNK) == before[0][CHUNK:2 * CHUNK]

    result = qemu_io(server.uri, "write -P 0x44 0 64k")
    assert result.returncode != 0
    assert server.stop() == 0
    assert (images.raw_bytes(), images.test_bytes()) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_in_flight_requests_then_exits_0(
    images: ImagePair, launch: Launcher, sig: signal.Signals
) -> None:
    raw = images.raw_bytes()
    server = launch()
    assert server.socket is not None and server.socket.exists()
    client = LibnbdClient(server.uri)
    handle = client.handle
    write_offset, read_length, reads = 6 << 20, 4 << 20, 8
    pattern = nbd.Buffer.from_bytearray(b"\x5c" * CHUNK)
    write = handle.aio_pwrite(pattern, write_offset)
    targets = [bytearray(read_length) for _ in range(reads)]
    buffers = [nbd.Buffer.from_buffer(target) for target in targets]
    cookies = [handle.aio_pread(buffer, 0) for buffer in buffers]
    # Every request is on the wire; the replies (32 MiB) wait, unread, so the server
    # still has them in hand when the signal comes.
    client.wait_for(lambda: not handle.aio_get_direction() & nbd.AIO_DIRECTION_WRITE)
    time.sleep(0.5)
    server.process.send_signal(sig)
    try:
        client.complete(write)
        for cookie in cookies:
            client.complete(cookie)
    except nbd.Error as error:
        pytest.fail(f"a request in flight at {sig.name} was dropped: {error}\n{server.stderr}")
    assert all(target == raw[:read_length] for target in targets)
    assert server.wait(timeout=STOP_TIMEOUT) == 0, server.stderr
    assert f"{sig.name}: shutting down" in server.stderr
    assert not server.socket.exists(), "the socket file was left behind"
    for image in (images.raw_bytes(), images.test_bytes()):
        assert image[write_offset:write_offset + CHUNK] == b"\x5c" * CHUNK


# --- --run ---------------------------------------------------------------------------


def private_tmp(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A TMPDIR of our own, to see that `-U -` cleans up after itself."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory, {**os.environ, "TMPDIR": str(directory)}


def test_run_ends_the_server_with_the_command_status(
    tmp_path: Path, images: ImagePair
) -> None:
    tmpdir, env = private_tmp(tmp_path)
    command = 'qemu-io -f raw -c "write -P 0x11 0 64k" "$uri"'
    result = nbdverify("serve", str(images.raw), str(images.test), "-U", "-", "--run", command,
                       env=env)
    assert result.returncode == 0, result.stderr
    assert "wrote 65536/65536 bytes at offset 0" in result.stdout
    assert images.raw_bytes()[:CHUNK] == b"\x11" * CHUNK
    assert images.test_bytes()[:CHUNK] == b"\x11" * CHUNK
    assert list(tmpdir.iterdir()) == [], "the private socket directory was left behind"


def test_run_passes_a_failing_status_through(images: ImagePair) -> None:
    result = nbdverify("serve", str(images.raw), str(images.test), "-U", "-", "--run", "exit 7")
    assert result.returncode == 7, result.stderr


def test_run_exits_3_when_the_command_met_a_mismatch(images: ImagePair) -> None:
    images.corrupt_test()
    # The command itself succeeds: status 3 can only come from the mismatch.
    command = 'qemu-io -f raw -c "read 1M 64k" "$uri" || true'
    result = nbdverify("serve", str(images.raw), str(images.test), "-U", "-", "--run", command)
    assert result.returncode == 3, result.stderr
    assert "mismatch at offset 1049576 (sector 2049)" in result.stderr


ENVIRONMENT_COMMAND = (
    'printf "%s\\n" "$uri" "$nbd" "$unixsocket" "$port" "$exportname" > "$OUT"; '
    'qemu-io -f raw -c "read 0 64k" "$uri"'
)


def run_environment(tmp_path: Path, images: ImagePair, *where: str) -> list[str]:
    out = tmp_path / "environment"
    _, env = private_tmp(tmp_path)
    env["OUT"] = str(out)
    result = nbdverify("serve", str(images.raw), str(images.test), *where, "-e", "disk1",
                       "--run", ENVIRONMENT_COMMAND, env=env)
    assert result.returncode == 0, result.stderr
    assert "read 65536/65536 bytes at offset 0" in result.stdout
    return out.read_text().split("\n")[:5]


def test_run_sets_the_environment_for_a_unix_socket(tmp_path: Path, images: ImagePair) -> None:
    uri, qemu_name, unixsocket, port, exportname = run_environment(tmp_path, images, "-U", "-")
    assert unixsocket.startswith(str(tmp_path / "tmp")), unixsocket
    assert uri == f"nbd+unix:///disk1?socket={quote(unixsocket)}"
    assert qemu_name == f"nbd:unix:{unixsocket}:exportname=disk1"
    assert port == ""
    assert exportname == "disk1"


def test_run_sets_the_environment_for_tcp(tmp_path: Path, images: ImagePair) -> None:
    uri, qemu_name, unixsocket, port, exportname = run_environment(tmp_path, images, "-p", "0")
    assert port.isdigit() and int(port) > 0, port
    assert uri == f"nbd://127.0.0.1:{port}/disk1"
    assert qemu_name == f"nbd:127.0.0.1:{port}:exportname=disk1"
    assert unixsocket == ""
    assert exportname == "disk1"


# --- TCP and logging -----------------------------------------------------------------


def test_port_zero_prints_the_chosen_port_and_serves_on_it(launch: Launcher) -> None:
    server = launch(tcp=True)
    match = re.search(r"^nbdverify: serving nbd://127\.0\.0\.1:(\d+)/ ", server.stderr, re.M)
    assert match, server.stderr
    port = int(match.group(1))
    assert port > 0
    uri = f"nbd://127.0.0.1:{port}/"
    assert server.uri == uri
    result = qemu_io(uri, "write -P 0x66 0 64k", "read -P 0x66 0 64k")
    assert result.returncode == 0, result.stderr
    assert "read 65536/65536 bytes at offset 0" in result.stdout
    assert server.images.raw_bytes()[:CHUNK] == b"\x66" * CHUNK


def test_json_log_format_writes_one_object_a_line(
    images: ImagePair, launch: Launcher
) -> None:
    images.corrupt_test()
    server = launch("--log-format=json")
    assert server.socket is not None
    uri = f"nbd+unix:///?socket={quote(str(server.socket))}"
    result = qemu_io(uri, "read 1M 64k")
    assert result.returncode != 0
    assert server.stop() == 0
    entries: list[dict[str, Any]] = []
    for line in server.stderr.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict) and isinstance(entry.get("event"), str), line
        entries.append(entry)
    events = [entry["event"] for entry in entries]
    for expected in ("serving", "mismatch", "hexdump", "stopped"):
        assert expected in events, events
    serving = entries[events.index("serving")]
    assert serving["uri"] == uri
    mismatch = entries[events.index("mismatch")]
    assert ("mismatch at offset 1049576 (sector 2049): bitflip, 4 bits differ from its initial "
            "content; 1 of 128 sectors differ") in mismatch["message"]


def test_unwritable_report_file_is_a_clear_startup_error(images: ImagePair,
                                                        tmp_path: Path) -> None:
    before = images.raw_bytes()
    result = nbdverify("serve", str(images.raw), str(images.test), "-U",
                       str(tmp_path / "s.sock"), "--report", str(tmp_path / "no" / "r.jsonl"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"nbdverify: cannot open report file {tmp_path / 'no' / 'r.jsonl'}: "
        "No such file or directory"]
    assert not (tmp_path / "s.sock").exists()
    assert images.raw_bytes() == before == images.test_bytes()


def test_a_dump_dir_that_cannot_be_made_is_a_clear_startup_error(images: ImagePair,
                                                                 tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = nbdverify("serve", str(images.raw), str(images.test), "-U",
                       str(tmp_path / "s.sock"), "--dump-dir", str(blocker / "dumps"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"nbdverify: cannot create dump directory {blocker / 'dumps'}: Not a directory"]
    assert not (tmp_path / "s.sock").exists()
