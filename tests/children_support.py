"""Helpers for the "any child" tests (test_children.py, test_activation.py): image
pairs in other formats, helper NBD servers (nbdkit, qemu-nbd) started by the test,
and a rig that stops everything after a test and then proves no process started
for that test's files outlives it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest
from support import (
    NBDVERIFY,
    START_TIMEOUT,
    ImagePair,
    RunningServer,
    require_tool,
    run,
    start_server,
    terminate,
    wait_until_serving,
)

from nbdverify.process import die_with_parent

KiB = 1024
MiB = 1024 * KiB
#: Images in other formats: small, so conversion and full compares stay quick.
FORMAT_SIZE = 16 * MiB
TOOL_TIMEOUT = 30.0
#: How long a process may take to go away once its reason to live is gone.
EXIT_GRACE = 5.0
POLL = 0.02


def nbd_unix_uri(socket: Path) -> str:
    return f"nbd+unix:///?socket={socket}"


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


# --- Processes ----------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The /proc state letter of `pid` (R, S, Z, ...), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has not reaped it)."""
    return process_state(pid) not in (None, "Z", "X")


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text` (a test's tmp path names
    every image, socket and report of that test), as pid -> command line."""
    found: dict[int, str] = {}
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if needle in cmdline and is_running(int(entry.name)):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def assert_no_process_left(directory: Path, timeout: float = EXIT_GRACE) -> None:
    """Nothing started for this test (nbdverify, the qemu-nbd it started, a helper
    server) is still running after `timeout`; any leftover is killed, then reported."""
    if wait_until(lambda: not processes_mentioning(str(directory)), timeout):
        return
    leftovers = processes_mentioning(str(directory))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"processes outlived the test: {leftovers}")


def qemu_nbd_pid(server: RunningServer) -> int:
    """The qemu-nbd nbdverify started, from its `serving` line, checked against /proc."""
    match = re.search(r"via qemu-nbd pid (\d+)", server.stderr)
    assert match, f"no qemu-nbd named in the serving line: {server.stderr}"
    pid = int(match.group(1))
    assert parent_of(pid) == server.process.pid, f"qemu-nbd {pid} is not the server's child"
    assert "qemu-nbd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    return pid


# --- Images ---------------------------------------------------------------------------


def random_content(size: int, avoid: dict[int, int] | None = None) -> bytes:
    """Random bytes; at each offset in `avoid`, any value but the one given (so a
    later alteration to that value is sure to be a change)."""
    content = bytearray(os.urandom(size))
    for offset, value in (avoid or {}).items():
        if content[offset] == value:
            content[offset] = value ^ 0xFF
    return bytes(content)


def make_format_pair(directory: Path, image_format: str, size: int = FORMAT_SIZE,
                     content: bytes | None = None) -> ImagePair:
    """RAW (raw.img) and TEST (test.FORMAT), converted from a copy of RAW, so both
    show the same guest-visible bytes."""
    raw = directory / "raw.img"
    raw.write_bytes(content if content is not None else os.urandom(size))
    source = directory / "test-source.img"
    shutil.copyfile(raw, source)
    test = directory / f"test.{image_format}"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", image_format,
         str(source), str(test)], timeout=TOOL_TIMEOUT)
    source.unlink()
    return ImagePair(raw, test)


def assert_images_identical(raw: Path, test: Path, test_format: str) -> None:
    """qemu-img compare of the guest-visible contents."""
    result = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", test_format,
                  str(raw), str(test)], timeout=TOOL_TIMEOUT, check=False)
    assert result.returncode == 0 and "Images are identical" in result.stdout, (
        f"{raw} vs {test} ({test_format}): {result.stdout} {result.stderr}")


def qemu_io(uri: str, *commands: str, image_format: str = "raw",
            check: bool = True) -> subprocess.CompletedProcess[str]:
    arguments = [part for command in commands for part in ("-c", command)]
    return run([require_tool("qemu-io"), "-f", image_format, *arguments, uri],
               timeout=TOOL_TIMEOUT, check=check)


def assert_io_error(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert "Input/output error" in output, output


# --- Helper servers and the rig -------------------------------------------------------


@dataclass
class Helper:
    """An NBD server (nbdkit or qemu-nbd) the test started to be a child of nbdverify."""

    name: str
    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    @property
    def uri(self) -> str:
        return nbd_unix_uri(self.socket)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.process, EXIT_GRACE)


@dataclass
class Rig:
    """Everything one test starts. Closing it stops the servers (SIGTERM, then
    SIGKILL), then the helper servers, then checks that no process whose command
    line names the test's directory is left: not nbdverify, not a qemu-nbd it
    started, not a helper."""

    directory: Path
    servers: list[RunningServer] = field(default_factory=list)
    helpers: list[Helper] = field(default_factory=list)

    def serve_pair(self, images: ImagePair, *extra: str) -> RunningServer:
        """`nbdverify serve RAW TEST` for two files (support.start_server)."""
        server = start_server(self.directory, images, *extra)
        self.servers.append(server)
        return server

    def serve(self, children: Sequence[str], files: ImagePair, *extra: str) -> RunningServer:
        """`nbdverify serve CHILDREN...` for any child syntax (URIs, json:...);
        `files` are the files behind the children, for the test's checks."""
        tag = len(self.servers)
        socket = self.directory / f"nbd-{tag}.sock"
        report = self.directory / f"report-{tag}.jsonl"
        stderr_path = self.directory / f"server-{tag}.log"
        command = [NBDVERIFY, "serve", *children, "-U", str(socket), "--report", str(report),
                   *extra]
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=stderr)
        server = wait_until_serving(process, stderr_path, report, socket, files)
        self.servers.append(server)
        return server

    def _helper(self, name: str, command: list[str], socket: Path) -> Helper:
        log = self.directory / f"{name}.log"
        with log.open("wb") as output:
            # SIGKILL if pytest itself dies.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        helper = Helper(name, process, socket, log)
        self.helpers.append(helper)
        if not wait_until(lambda: socket.exists() or process.poll() is not None,
                          START_TIMEOUT) or process.poll() is not None:
            pytest.fail(f"{command} did not start: {helper.output}")
        return helper

    def nbdkit(self, name: str, *arguments: str) -> Helper:
        """`nbdkit -f -U SOCKET ARGUMENTS...` (plugin, filters, parameters)."""
        socket = self.directory / f"{name}.sock"
        command = [require_tool("nbdkit"), "-f", "--exit-with-parent", "-U", str(socket),
                   *arguments]
        return self._helper(name, command, socket)

    def qemu_nbd(self, name: str, image: Path, image_format: str = "raw") -> Helper:
        """A persistent (-t) qemu-nbd for `image` on a unix socket."""
        socket = self.directory / f"{name}.sock"
        command = [require_tool("qemu-nbd"), "-f", image_format, "-k", str(socket), "-t",
                   "--", str(image)]
        return self._helper(name, command, socket)

    def close(self) -> None:
        for server in self.servers:
            terminate(server.process)
        for helper in self.helpers:
            helper.stop()
        assert_no_process_left(self.directory)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
