"""nbdverify started by its client: systemd-style socket activation (LISTEN_PID,
LISTEN_FDS) from nbdinfo, nbdcopy and libnbd, `--run`, and `--exit-with-parent`.
Whoever started it, no nbdverify or qemu-nbd is left afterwards."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from children_support import (
    EXIT_GRACE,
    TOOL_TIMEOUT,
    MiB,
    Rig,
    assert_images_identical,
    assert_no_process_left,
    is_running,
    make_format_pair,
    processes_mentioning,
    qemu_io,
    wait_until,
)
from peers_support import assert_same_bytes
from support import NBDVERIFY, START_TIMEOUT, STOP_TIMEOUT, make_pair, require_tool, run

#: Not the default image size, so a right answer cannot be a coincidence.
ODD_SIZE = 12 * MiB + 512 * 1024


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path) as running:
        yield running


def spawn(*children: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`[ nbdverify serve CHILDREN... ]`, for a libnbd tool to socket-activate."""
    return ["[", NBDVERIFY, "serve", *children, *extra, "]"]


def test_nbdinfo_spawns_nbdverify(rig: Rig, tmp_path: Path) -> None:
    images = make_pair(tmp_path, size=ODD_SIZE)
    result = run([require_tool("nbdinfo"), "--json", "--",
                  *spawn(str(images.raw), str(images.test))], timeout=TOOL_TIMEOUT)
    info = json.loads(result.stdout)
    [export] = info["exports"]
    assert export["export-size"] == ODD_SIZE, export
    assert export["is_read_only"] is False
    assert_no_process_left(tmp_path)


def test_nbdcopy_out_of_a_spawned_qcow2_pair(rig: Rig, tmp_path: Path) -> None:
    images = make_format_pair(tmp_path, "qcow2")
    out = tmp_path / "out.img"
    run([require_tool("nbdcopy"), "--", *spawn(str(images.raw), str(images.test)), str(out)],
        timeout=TOOL_TIMEOUT)
    assert_same_bytes(out.read_bytes(), images.raw_bytes(), "copied out vs RAW")
    assert_no_process_left(tmp_path)


def test_nbdcopy_into_a_spawned_pair_writes_both_images(rig: Rig, tmp_path: Path) -> None:
    images = make_pair(tmp_path, size=ODD_SIZE)
    source = tmp_path / "in.img"
    content = bytearray(images.raw_bytes())
    content[MiB:3 * MiB] = bytes(2 * MiB)  # zeroes too: nbdcopy may send them as zero requests
    content[5 * MiB:6 * MiB] = b"\xe7" * MiB
    source.write_bytes(content)
    run([require_tool("nbdcopy"), str(source), "--",
         *spawn(str(images.raw), str(images.test))], timeout=TOOL_TIMEOUT)
    assert_no_process_left(tmp_path)
    assert_same_bytes(images.raw_bytes(), content, "RAW after nbdcopy")
    assert_same_bytes(images.test_bytes(), content, "TEST after nbdcopy")


LIBNBD_READER = textwrap.dedent("""\
    import hashlib, sys
    import nbd
    h = nbd.NBD()
    h.connect_systemd_socket_activation(sys.argv[1:])
    print(h.get_size())
    for offset in (0, 1048576 + 4096, 8388608 - 65536):
        print(hashlib.sha256(h.pread(65536, offset)).hexdigest())
    h.shutdown()
    del h  # closing the handle stops the server libnbd started
""")


def test_libnbd_socket_activation_reads_verified_data(rig: Rig, tmp_path: Path) -> None:
    """In a child python (so a hung libnbd call is bounded by a timeout)."""
    images = make_format_pair(tmp_path, "qcow2", size=8 * MiB)
    content = images.raw_bytes()
    result = run([sys.executable, "-c", LIBNBD_READER, NBDVERIFY, "serve", str(images.raw),
                  str(images.test)], timeout=TOOL_TIMEOUT)
    size, *digests = result.stdout.split()
    assert int(size) == 8 * MiB
    expected = [hashlib.sha256(content[offset:offset + 65536]).hexdigest()
                for offset in (0, MiB + 4096, 8 * MiB - 65536)]
    assert digests == expected
    assert_no_process_left(tmp_path)


def test_run_with_a_qcow2_test(rig: Rig, tmp_path: Path) -> None:
    images = make_format_pair(tmp_path, "qcow2", size=8 * MiB)
    result = run([NBDVERIFY, "serve", str(images.raw), str(images.test), "--run",
                  'qemu-img info "$uri" && qemu-io -f raw -c "write -P 0x42 1M 64k" "$uri"',
                  "-U", "-"], timeout=TOOL_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "virtual size: 8 MiB (8388608 bytes)" in result.stdout, result.stdout
    assert "wrote 65536/65536 bytes at offset 1048576" in result.stdout, result.stdout
    assert "(qcow2, via qemu-nbd pid" in result.stderr, result.stderr
    assert_no_process_left(tmp_path)
    assert images.raw_bytes()[MiB:MiB + 65536] == b"\x42" * 65536
    assert_images_identical(images.raw, images.test, "qcow2")


def test_exit_with_parent(rig: Rig, tmp_path: Path) -> None:
    """The parent (a shell) starts the server in the background and exits when the
    test says so; the server, and the qemu-nbd behind its qcow2 TEST, follow."""
    images = make_format_pair(tmp_path, "qcow2", size=8 * MiB)
    sock = tmp_path / "nbd.sock"
    pidfile = tmp_path / "server.pid"
    log = tmp_path / "server.log"
    server = " ".join(shlex.quote(part) for part in [
        NBDVERIFY, "serve", str(images.raw), str(images.test), "-U", str(sock),
        "--exit-with-parent", "-P", str(pidfile)])
    # A background job of a non-interactive shell reads /dev/null; `read` reads our pipe.
    with log.open("wb") as output:
        parent = subprocess.Popen(["/bin/sh", "-c", f"{server} & read _"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=output)
    try:
        assert wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"),
                          START_TIMEOUT), log.read_text()
        pid = int(pidfile.read_text())
        assert is_running(pid)
        result = qemu_io(f"nbd+unix:///?socket={sock}", "read 0 64k")
        assert "read 65536/65536 bytes" in result.stdout
        assert parent.stdin is not None
        parent.stdin.close()  # the parent's `read` ends: it exits
        parent.wait(timeout=STOP_TIMEOUT)
        exited = time.monotonic()
        assert wait_until(lambda: not is_running(pid), EXIT_GRACE), (
            f"server {pid} still running {EXIT_GRACE} s after its parent exited")
        assert time.monotonic() - exited < EXIT_GRACE
        assert wait_until(lambda: not processes_mentioning(str(tmp_path)), EXIT_GRACE), (
            processes_mentioning(str(tmp_path)))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=STOP_TIMEOUT)
    assert "SIGTERM: shutting down" in log.read_text(), log.read_text()
    assert not sock.exists()
