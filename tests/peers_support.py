"""Helpers for the peer interop tests (tests/test_peers.py): sparse image pairs,
cheap byte comparisons, a watchdog for in-process libnbd calls, the two peer
generations (bookworm's tools on the host, trixie's in a chroot), and a minimal
hand-rolled NBD client for the one request libnbd will not send (> 64 MiB)."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import SYSTEM_PATH, ImagePair, RunningServer, require_tool, run, terminate

KiB = 1024
MiB = 1024 * KiB
MAX_REQUEST = 64 * MiB

#: Environment for nbdsh, which runs `python3 -m nbd` from PATH.
SYSTEM_ENV = {**os.environ, "PATH": SYSTEM_PATH}

#: libnbd's Python binding is untyped; its handle is nbd.NBD.
Handle = Any


def make_sparse_pair(directory: Path, size: int) -> ImagePair:
    """RAW and TEST as fully sparse (all-hole, all-zero) files of `size` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / "raw.img"
    test = directory / "test.img"
    for path in (raw, test):
        with path.open("wb") as f:
            f.truncate(size)
    return ImagePair(raw, test)


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    """Offset of the first differing byte (or the shorter length), None if equal.
    Never hand multi-MiB bytes to a bare `assert a == b`: pytest's diff is slow."""
    if a == b:
        return None
    limit = min(len(a), len(b))
    low, step = 0, 1 * MiB
    while low < limit and a[low:low + step] == b[low:low + step]:
        low += step
    for index in range(low, min(low + step, limit)):
        if a[index] != b[index]:
            return index
    return limit


def assert_same_bytes(actual: bytes | bytearray, expected: bytes | bytearray, what: str) -> None:
    where = first_difference(actual, expected)
    if where is not None:
        pytest.fail(
            f"{what}: differ at offset {where} (lengths {len(actual)} vs {len(expected)}): "
            f"{actual[where:where + 16].hex()} vs {expected[where:where + 16].hex()}"
        )


def assert_pair_identical(images: ImagePair) -> bytes:
    """RAW and TEST are byte-identical; returns their content."""
    raw = images.raw_bytes()
    assert_same_bytes(images.test_bytes(), raw, "TEST vs RAW")
    return raw


def assert_server_healthy(server: RunningServer) -> None:
    """Still running, no crash traceback, no verification finding reported."""
    assert server.process.poll() is None, f"server exited: {server.stderr}"
    assert "Traceback" not in server.stderr, server.stderr
    assert server.report_records() == [], server.stderr


@contextmanager
def watchdog(server: RunningServer, seconds: float) -> Iterator[None]:
    """A timeout for blocking in-process libnbd calls: when it expires the server
    is killed, so whatever libnbd waits on fails, and the test fails."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        server.process.kill()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if fired.is_set():
            pytest.fail(f"timed out after {seconds} s (server killed); stderr: {server.stderr}")


def connect(uri: str, structured: bool = True, meta: bool = False,
            strict: bool = True) -> Handle:
    import nbd

    handle = nbd.NBD()
    handle.set_request_structured_replies(structured)
    if meta:
        handle.add_meta_context("base:allocation")
    handle.connect_uri(uri)
    assert handle.get_structured_replies_negotiated() == structured
    if not strict:
        handle.set_strict_mode(0)
    return handle


# --- Peer generations: bookworm's tools on the host, trixie's in a chroot ----------

REPO = Path(__file__).resolve().parent.parent
TRIXIE_ROOT_BUILD = REPO / "scripts" / "trixie-root"
TRIXIE_RUN = REPO / "scripts" / "trixie-run"
TRIXIE_ROOT_TIMEOUT = 900.0  # a build took 52-105 s here, most of it downloading
GENERATIONS = ("bookworm", "trixie")
# Where the tests keep images and sockets; trixie-run shares it with the root.
SHARED = Path("/tmp")


@dataclass(frozen=True)
class Peer:
    """One generation of peer tools. Tests take a `peer` and build every command
    line through it, so one test body runs against both generations."""

    generation: str
    root: Path | None = None  # None: the host's own (bookworm) tools

    def tool(self, name: str) -> list[str]:
        """The command line prefix that runs `name`; a missing tool fails the test."""
        if self.root is None:
            return [require_tool(name)]
        if not (self.root / "usr" / "bin" / name).exists():
            pytest.fail(f"{name} is missing from the {self.generation} root {self.root} "
                        "(scripts/trixie-root installs it)")
        return [str(TRIXIE_RUN), name]  # keeps the tool's pid: terminate() reaches it

    def run(self, name: str, *arguments: str, timeout: float = 60, check: bool = True,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run([*self.tool(name), *arguments], timeout=timeout, check=check,
                   env=SYSTEM_ENV, **kwargs)

    def popen(self, name: str, *arguments: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*self.tool(name), *arguments], env=SYSTEM_ENV, **kwargs)


BOOKWORM = Peer("bookworm")

NBDKIT_START_TIMEOUT = 15.0


def start_nbdkit(peer: Peer, socket: Path, *arguments: str,
                 stderr: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """`peer`'s nbdkit in the foreground on the unix socket `socket`, once it listens;
    it exits with the test process if nobody stops it."""
    process = peer.popen("nbdkit", "--exit-with-parent", "-f", "-U", str(socket), *arguments,
                         stdin=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + NBDKIT_START_TIMEOUT
    while not socket.exists():
        if process.poll() is not None:
            output = process.stderr.read() if process.stderr else b""
            pytest.fail(f"nbdkit exited with {process.returncode}: {output!r}")
        if time.monotonic() > deadline:
            terminate(process)
            pytest.fail("nbdkit did not start")
        time.sleep(0.05)
    return process


def build_trixie_root() -> Peer:
    """The trixie peer, building its root if the cache lacks it (once per machine)."""
    result = run([str(TRIXIE_ROOT_BUILD), "--quiet"], timeout=TRIXIE_ROOT_TIMEOUT)
    return Peer("trixie", Path(result.stdout.strip().splitlines()[-1]))


def require_shared(path: Path) -> None:
    """A trixie peer sees only the host's /tmp: the test's files must be under it."""
    if not path.resolve().is_relative_to(SHARED):
        pytest.fail(f"{path} is not under {SHARED}, which the trixie root shares "
                    "(do not move pytest's --basetemp elsewhere)")


def negotiated_packets(peer: Peer, uri: str) -> str:
    """What the peer's nbdinfo says it negotiated: 'simple', 'structured' or
    'extended' (its `using ... packets` line; libnbd >= 1.18 can say extended)."""
    result = peer.run("nbdinfo", "--no-content", uri, timeout=30)
    match = re.search(r"using (\w+) packets", result.stdout)
    if match is None:
        pytest.fail(f"nbdinfo named no packet type:\n{result.stdout}")
    return match.group(1)


# --- A minimal NBD client, only for requests libnbd refuses to send --------------

NBD_MAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME = 1
CLIENT_FLAGS = 0x1 | 0x2  # FIXED_NEWSTYLE | NO_ZEROES
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2


class RawClient:
    """Fixed newstyle via NBD_OPT_EXPORT_NAME (no structured replies), then bare
    requests and simple replies. Every socket operation has a timeout."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        magic, opt_magic, handshake_flags = struct.unpack(">QQH", self._exactly(18))
        assert (magic, opt_magic) == (NBD_MAGIC, IHAVEOPT)
        assert handshake_flags & 0x3 == 0x3, handshake_flags
        self.sock.sendall(struct.pack(">I", CLIENT_FLAGS))
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 0))
        self.size, self.flags = struct.unpack(">QH", self._exactly(10))
        self._cookie = 0

    def _exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(min(count - len(data), 1 * MiB))
            if not chunk:
                raise ConnectionError(f"server closed after {len(data)}/{count} bytes")
            data += chunk
        return bytes(data)

    def request(self, command: int, offset: int, length: int,
                payload: bytes | None = None) -> tuple[int, bytes]:
        """Send one request; its simple reply's error, and the data of a good READ."""
        self._cookie += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, self._cookie, offset, length)
        self.sock.sendall(header)
        if payload is not None:
            self.sock.sendall(payload)
        magic, error, cookie = struct.unpack(">IIQ", self._exactly(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert cookie == self._cookie
        data = self._exactly(length) if command == CMD_READ and error == 0 else b""
        return error, data

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        finally:
            self.sock.close()
