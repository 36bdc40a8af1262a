"""Test helpers: image pairs, a real `nbdverify serve` process, peer tools."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

NBDVERIFY = str(Path(sys.executable).parent / "nbdverify")
IMAGE_SIZE = 8 * 1024 * 1024
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
# Byte the corruption tests alter in TEST, as in the issue: sector 2049.
CORRUPT_OFFSET = 1049576
# Debian's libnbd Python binding exists only for /usr/bin/python3; nbdsh runs
# `python3 -m nbd`, so it needs that interpreter first on PATH.
SYSTEM_PATH = "/usr/bin:" + os.environ.get("PATH", "")


def require_tool(name: str) -> str:
    """A peer tool that must exist: scripts/test installs it, so a missing one is a
    failure, never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs it)")
    return path


@dataclass
class ImagePair:
    raw: Path
    test: Path

    def raw_bytes(self) -> bytes:
        return self.raw.read_bytes()

    def test_bytes(self) -> bytes:
        return self.test.read_bytes()

    def corrupt_test(self, offset: int = CORRUPT_OFFSET, value: bytes | None = None) -> None:
        """Alter TEST only, at one byte (unaligned), to a value it does not hold."""
        with self.test.open("r+b") as f:
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(value if value is not None else bytes([old[0] ^ 0x5A]))


def make_pair(directory: Path, size: int = IMAGE_SIZE, random: bool = True) -> ImagePair:
    content = os.urandom(size) if random else bytes(size)
    raw = directory / "raw.img"
    test = directory / "test.img"
    raw.write_bytes(content)
    test.write_bytes(content)
    return ImagePair(raw, test)


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    uri: str
    socket: Path | None
    report: Path
    stderr_path: Path
    images: ImagePair
    exit_status: int | None = field(default=None)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def all_report_records(self) -> list[dict[str, object]]:
        import json

        if not self.report.exists():
            return []
        return [json.loads(line) for line in self.report.read_text().splitlines() if line]

    def report_records(self) -> list[dict[str, object]]:
        """The findings in the report (not the statistics records)."""
        return [r for r in self.all_report_records() if r["kind"] != "statistics"]

    def statistics_records(self) -> list[dict[str, object]]:
        return [r for r in self.all_report_records() if r["kind"] == "statistics"]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.exit_status = self.process.wait(timeout=STOP_TIMEOUT)
        return self.exit_status

    def wait(self, timeout: float) -> int:
        self.exit_status = self.process.wait(timeout=timeout)
        return self.exit_status


def start_server(
    directory: Path,
    images: ImagePair,
    *extra: str,
    tcp: bool = False,
    test: str | None = None,
) -> RunningServer:
    """Start `nbdverify serve` and wait until it says it is serving. `test` names
    another TEST child (an NBD URI) in place of the pair's file."""
    stderr_path = directory / f"server-{time.monotonic_ns()}.log"
    report = directory / "report.jsonl"
    socket = None if tcp else directory / "nbd.sock"
    where = ["-p", "0"] if tcp else ["-U", str(socket)]
    command = [NBDVERIFY, "serve", str(images.raw), test or str(images.test), *where,
               "--report", str(report), *extra]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    return wait_until_serving(process, stderr_path, report, socket, images)


def wait_until_serving(process: subprocess.Popen[bytes], stderr_path: Path, report: Path,
                       socket: Path | None, images: ImagePair) -> RunningServer:
    """Wait (bounded) for nbdverify's `serving URI` line on stderr."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = re.search(r"serving (nbd\S*://\S+)", stderr_path.read_text(errors="replace"))
        if match:
            return RunningServer(process, match.group(1), socket, report, stderr_path, images)
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {stderr_path.read_text()}")
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=STOP_TIMEOUT)
    pytest.fail(f"server did not start: {stderr_path.read_text()}")


def run(command: list[str], timeout: float = 60, check: bool = True,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a peer tool; on failure show what it printed."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            check=False, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        pytest.fail(f"{command} exited {result.returncode}\nstdout: {result.stdout}\n"
                    f"stderr: {result.stderr}")
    return result  # type: ignore[no-any-return]


def nbdverify(*args: str, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `nbdverify ARGS` to completion."""
    return subprocess.run([NBDVERIFY, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL, env=env)


NBD_TIMEOUT = 10.0


class LibnbdClient:
    """A libnbd handle on which every operation has a deadline (aio + poll), so a
    server that stops answering fails the test instead of hanging it."""

    def __init__(self, uri: str, structured: bool = True, strict: bool = True) -> None:
        import nbd

        self.handle: Any = nbd.NBD()
        self.handle.set_request_structured_replies(structured)
        if not strict:
            self.handle.set_strict_mode(0)  # send what the server advertised it refuses
        self.handle.aio_connect_uri(uri)
        self.wait_for(lambda: not self.handle.aio_is_connecting())
        if not self.handle.aio_is_ready():
            raise nbd.Error("connection did not become ready", 0)

    def wait_for(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + NBD_TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                pytest.fail("libnbd operation timed out")
            self.handle.poll(100)

    def complete(self, cookie: int) -> None:
        """Wait for one command; raises nbd.Error if the server failed it."""
        self.wait_for(lambda: bool(self.handle.aio_command_completed(cookie)))

    def pread_into(self, target: bytearray, offset: int) -> None:
        import nbd

        self.complete(self.handle.aio_pread(nbd.Buffer.from_buffer(target), offset))

    def pread(self, count: int, offset: int) -> bytes:
        target = bytearray(count)
        self.pread_into(target, offset)
        return bytes(target)

    def pwrite(self, data: bytes, offset: int, fua: bool = False) -> None:
        import nbd

        flags = nbd.CMD_FLAG_FUA if fua else 0
        self.complete(self.handle.aio_pwrite(nbd.Buffer.from_bytearray(data), offset,
                                             flags=flags))

    def flush(self) -> None:
        self.complete(self.handle.aio_flush())

    def zero(self, count: int, offset: int) -> None:
        self.complete(self.handle.aio_zero(count, offset))

    def trim(self, count: int, offset: int) -> None:
        self.complete(self.handle.aio_trim(count, offset))


class Launcher(Protocol):
    """The `launch` fixture: start_server with extra options for this test."""

    def __call__(self, *extra: str, tcp: bool = False) -> RunningServer: ...


def terminate(process: subprocess.Popen[bytes], grace: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
