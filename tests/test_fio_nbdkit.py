"""More real clients: fio's nbd engine with data verification, nbdinfo --can, and
nbdkit's nbd plugin in front of nbdverify (its delay and error filters make a slow
or failing client side). Tests taking `peer` run with each peer generation."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers_support import Peer, start_nbdkit
from support import ImagePair, RunningServer, make_pair, require_tool, run, start_server, terminate

MiB = 1024 * 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path, make_pair(tmp_path, size=16 * MiB))
    yield running
    running.stop()


def test_fio_nbd_engine_write_then_verify_crc32c(served: RunningServer, tmp_path: Path,
                                                 peer: Peer) -> None:
    result = peer.run("fio", "--name=verify", "--ioengine=nbd", f"--uri={served.uri}",
                      "--rw=randwrite", "--bs=4k", "--size=8m", "--iodepth=16", "--verify=crc32c",
                      "--do_verify=1", "--verify_fatal=1", "--numjobs=2", "--offset_increment=8m",
                      "--group_reporting", "--output-format=terse", "--verify_state_save=0",
                      timeout=180, cwd=tmp_path)
    assert result.returncode == 0
    assert served.images.raw_bytes() == served.images.test_bytes()
    assert served.report_records() == []


@pytest.mark.parametrize("feature, expected", [
    ("trim", 0), ("zero", 0), ("fua", 0), ("flush", 0), ("cache", 0), ("multi-conn", 0),
    ("read", 0), ("write", 0), ("df", 0), ("fast-zero", 0),
])
def test_nbdinfo_can(served: RunningServer, feature: str, expected: int, peer: Peer) -> None:
    result = peer.run("nbdinfo", "--can", feature, served.uri, timeout=30, check=False)
    assert result.returncode == expected, result.stderr


def test_nbdinfo_cannot_write_a_readonly_export(tmp_path: Path, images: ImagePair) -> None:
    server = start_server(tmp_path, images, "--readonly")
    try:
        result = run([require_tool("nbdinfo"), "--can", "write", server.uri], check=False)
        assert result.returncode == 2, result  # nbdinfo: 2 means "cannot"
    finally:
        server.stop()


def start_nbdkit_proxy(directory: Path, target: RunningServer, filter_name: str,
                       *parameters: str, peer: Peer) -> tuple[subprocess.Popen[bytes], str]:
    """nbdkit's nbd plugin forwarding to nbdverify, behind one filter."""
    assert target.socket is not None
    socket = directory / "proxy.sock"
    process = start_nbdkit(peer, socket, f"--filter={filter_name}", "nbd",
                           f"socket={target.socket}", *parameters)
    return process, f"nbd+unix:///?socket={socket}"


def test_through_nbdkit_with_a_delay_filter(tmp_path: Path, served: RunningServer,
                                            peer: Peer) -> None:
    proxy, uri = start_nbdkit_proxy(tmp_path, served, "delay", "delay-read=5ms",
                                    "delay-write=5ms", peer=peer)
    try:
        result = peer.run("qemu-io", "-f", "raw", "-c", "aio_write -P 0x61 0 1M",
                          "-c", "aio_write -P 0x62 512k 1M", "-c", "aio_flush",
                          "-c", "read -P 0x61 0 512k", "-c", "read -P 0x62 512k 1M", uri,
                          timeout=60)
        assert "read 1048576/1048576" in result.stdout
    finally:
        terminate(proxy)
    assert served.images.raw_bytes() == served.images.test_bytes()
    assert served.report_records() == []


def test_through_nbdkit_with_an_error_filter(tmp_path: Path, served: RunningServer,
                                             peer: Peer) -> None:
    """Errors made on the client's side of the wire never reach the device: whatever
    the client sees, the two images stay the same."""
    proxy, uri = start_nbdkit_proxy(tmp_path, served, "error", "error-pwrite=EIO",
                                    "error-pwrite-rate=50%", "error-pread=EIO",
                                    "error-pread-rate=30%", peer=peer)
    try:
        failures = 0
        for index in range(20):  # bounded
            result = peer.run("qemu-io", "-f", "raw",
                              "-c", f"write -P {index} {index * 65536} 64k",
                              "-c", f"read {index * 65536} 64k", uri, timeout=30, check=False)
            failures += "failed" in result.stdout + result.stderr
        assert failures > 0, "the error filter never fired: the test proves nothing"
        assert served.process.poll() is None
    finally:
        terminate(proxy)
    assert served.images.raw_bytes() == served.images.test_bytes()
    assert served.report_records() == []
