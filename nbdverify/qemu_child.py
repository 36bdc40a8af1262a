"""Image formats QEMU can read (qcow2, vmdk, vdi, ...) as children: nbdverify starts
a qemu-nbd for the image on a private unix socket and talks NBD to it.

An offline reader (compare) may also ask for the data `qemu-img map` places as it is
in a qcow2 file (neither compressed nor encrypted, nor in a backing file) to be read
from the file itself, with one copy instead of three (qemu-nbd's read, its send, our
receive): a page-cached 2 GiB qcow2 compared with its raw twin in ~0.9 s instead of
1.5-2.0 s, qemu-nbd's CPU 0.03 s instead of 1.0-1.7 s. qemu-nbd still serves block
status and all the rest, and holds the image's locks meanwhile.

The qemu-nbd belongs to the server: its stderr is logged under the child's name,
it is stopped with the server, and the kernel kills it if the server dies (even by
SIGKILL), so no qemu-nbd outlives us.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from nbdverify_protocol.constants import SECTOR_SIZE, Errno

from .children import COMPLETED, AllOf, ChildError, FileChild, Pending
from .log import log_event
from .nbd_child import ChildRefused, NbdChild
from .process import die_with_parent

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
#: qemu-nbd makes its socket ~10 ms after it starts: looking every 20 ms, a qcow2
#: child was connected ~29 ms after the start; every 1 ms, ~14 ms.
SOCKET_POLL = 0.001
#: qemu-nbd's --aio, best first. io_uring serves page-cached reads without a thread
#: pool: qemu-nbd alone, 4 KiB random reads of a qcow2 at QD16 went 80-85k IOPS at
#: 12 us of its CPU a read, against 33-47k at 25-29 us with threads (writes 30-33k
#: against 25-32k). A QEMU built without it, or a kernel or seccomp profile that
#: refuses it, makes qemu-nbd exit naming it; then the next is used.
#: The trap: QEMU 7.2's io_uring never completes a read that runs past the end of
#: its file (it asks again for the rest, gets 0 bytes, and asks again): a compressed
#: qcow2 cluster at the file's end hung qemu-io's read of it and `compare`. So
#: io_uring only for an image whose Layout says no read does.
AIO_MODES = ("io_uring", "threads")
#: Modes found unusable: not tried again in this process.
_refused_aio: set[str] = set()
#: qemu-nbd allocates each READ's buffer afresh, and glibc's defaults give big ones
#: back to the kernel when freed (munmap, or trimming the heap top), so the next READ
#: faults their pages in again: 2 GiB read in 256 KiB requests took 7,000 to 310,000
#: faults from run to run, and qemu-nbd 1.6 s of CPU instead of 0.8 s in the worst.
#: From a heap that keeps up to 64 MiB free (every request, at most 32 MiB, comes
#: from the heap), ~6,000 every run.
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432"
                   ":glibc.malloc.trim_threshold=67108864")


def qemu_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with MALLOC_TUNABLES; the caller's own GLIBC_TUNABLES come after
    them, and win."""
    tunables = ":".join(filter(None, [MALLOC_TUNABLES, environ.get("GLIBC_TUNABLES")]))
    return {**environ, "GLIBC_TUNABLES": tunables}


async def qemu_img(*arguments: str) -> bytes:
    """What a `qemu-img` command prints; OSError with its last words if it fails."""
    try:
        result = await trio.run_process(["qemu-img", *arguments], capture_stdout=True,
                                        capture_stderr=True, check=False)
    except FileNotFoundError:
        raise OSError("qemu-img is not installed (it probes and maps images)") from None
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(message[-1] if message else f"qemu-img {arguments[0]} failed")
    return result.stdout


async def probe_format(path: str) -> str:
    """The image's format as qemu-img sees it."""
    info = await qemu_img("info", "--force-share", "--output=json", "--", path)
    return str(json.loads(info)["format"])


# One extent of `qemu-img map --output=json` (flat objects, one per extent).
_MAP_ENTRY = re.compile(rb"\{[^{}]*\}")


@dataclass(frozen=True, slots=True)
class InPlace:
    """The ranges of an image whose data lies as it is in the image file: sorted and
    disjoint, [starts[i], ends[i]) at file offset offsets[i]."""

    starts: array[int]
    ends: array[int]
    offsets: array[int]

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """[start, end) as (start, end, offset in the file, or None: not in place)."""
        index = bisect_right(self.starts, start) - 1
        if index < 0 or self.ends[index] <= start:
            index += 1  # the first range that ends after `start`
        position = start
        while position < end:
            if index < len(self.starts) and self.starts[index] <= position:
                stop = min(end, self.ends[index])
                yield position, stop, self.offsets[index] + position - self.starts[index]
                index += 1
            else:
                stop = min(end, self.starts[index]) if index < len(self.starts) else end
                yield position, stop, None
            position = stop


@dataclass(frozen=True, slots=True)
class Layout:
    """What `qemu-img` says of a qcow2 image, read once before its qemu-nbd starts."""

    #: No read of it passes the end of a file, so io_uring is safe (see AIO_MODES).
    reads_within_its_files: bool
    #: For a reader in place: where its data lies as it is in its file.
    in_place: InPlace | None


async def describe(name: str, path: str, image_format: str, in_place: bool) -> Layout | None:
    """The Layout of a qcow2 image (`in_place`: with the InPlace map); None for other
    formats, or if qemu-img cannot say."""
    if image_format != "qcow2":
        return None
    try:
        chain = json.loads(await qemu_img("info", "--force-share", "--backing-chain",
                                          "--output=json", f"--format={image_format}", "--",
                                          path))
        chain = chain if isinstance(chain, list) else [chain]
        places = None
        if in_place and not _external_data(chain[0]):
            places = _in_place(await qemu_img("map", "--force-share", "--output=json",
                                              f"--format={image_format}", "--", path))
        return Layout(_reads_within_files(chain), places)
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:
        log_event(logging.DEBUG, "child-map", f"{name}: qemu-img cannot describe {path}: "
                  f"{error}", child=name)
        return None


def _external_data(layer: dict[str, Any]) -> bool:
    return "data-file" in layer.get("format-specific", {}).get("data", {})


def _reads_within_files(chain: list[dict[str, Any]]) -> bool:
    """qcow2 all the way down, no external data file, and every file a whole number
    of sectors long. The only qcow2 read that passes a file's end is of a compressed
    cluster, read to the end of the sector that holds its last byte: only in a file
    that ends mid-sector (as it does when the cluster written last was compressed).
    Checked at start; a guest's writes never compress, and new clusters are aligned.
    A stat, where `qemu-img map` of a big fragmented image takes seconds."""
    def whole_sectors(filename: str) -> bool:
        try:
            return os.stat(filename).st_size % SECTOR_SIZE == 0
        except OSError:  # not a local file (json:, a protocol): assume the worst
            return False

    return all(layer["format"] == "qcow2" and not _external_data(layer)
               and whole_sectors(layer["filename"]) for layer in chain)


def _in_place(extents: bytes) -> InPlace | None:
    """From `qemu-img map`: data at depth 0 (not in a backing file) with an offset
    (neither compressed nor encrypted). None if there is none."""
    starts, ends, offsets = array("q"), array("q"), array("q")
    for match in _MAP_ENTRY.finditer(extents):  # an entry at a time: maps can be long
        entry = json.loads(match[0])
        if (entry.get("offset") is not None and entry["depth"] == 0 and entry["data"]
                and not entry["zero"] and not entry.get("compressed")):
            starts.append(entry["start"])
            ends.append(entry["start"] + entry["length"])
            offsets.append(entry["offset"])
    return InPlace(starts, ends, offsets) if starts else None


class QemuChild(NbdChild):
    """A child served by a qemu-nbd we started for a reader (compare): after
    `read_in_place`, what that covers is read from the image file itself."""

    _in_place: tuple[FileChild, InPlace] | None = None

    def read_in_place(self, path: str, places: InPlace) -> None:
        """From now on, read what `places` covers from the file at `path`."""
        try:
            file = FileChild(self.name, path, readonly=True)
        except OSError as error:  # then qemu-nbd reads it all, as without
            log_event(logging.DEBUG, "child-map", f"{self.name}: cannot open {path}: {error}",
                      child=self.name)
            return
        self._in_place = (file, places)

    def read(self, buffer: memoryview, offset: int) -> Pending[None]:
        if self._in_place is None:
            return super().read(buffer, offset)
        file, places = self._in_place
        parts = []
        for start, end, file_offset in places.pieces(offset, offset + len(buffer)):
            view = buffer[start - offset:end - offset]
            part = (super().read(view, start) if file_offset is None
                    else file.read(view, file_offset))
            if part is not COMPLETED:
                parts.append(part)
        if not parts:
            return COMPLETED
        return parts[0] if len(parts) == 1 else AllOf(parts)

    @property
    def reads_in_place(self) -> bool:
        return self._in_place is not None

    def read_locally(self, buffer: memoryview, offset: int) -> bool:
        """FileChild.read_locally, if all of [offset, +len(buffer)) lies in place;
        False (nothing read) if not. Safe in a worker thread: it touches only the file."""
        if self._in_place is None:
            return False
        file, places = self._in_place
        pieces = list(places.pieces(offset, offset + len(buffer)))
        if any(file_offset is None for _, _, file_offset in pieces):
            return False
        for start, end, file_offset in pieces:
            assert file_offset is not None
            file.read_locally(buffer[start - offset:end - offset], file_offset)
        return True

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            if self._in_place is not None:
                self._in_place[0].close()


class _QemuNbd:
    """One qemu-nbd process we own.

    It is started with Popen on the event loop's own thread: PR_SET_PDEATHSIG fires
    when the parent *thread* exits, and trio's open_process forks from a worker
    thread that exits after ten idle seconds, killing the child with it.
    """

    def __init__(self, name: str, command: list[str], nursery: trio.Nursery) -> None:
        self.name = name
        self.last_lines: deque[str] = deque(maxlen=3)
        self._stderr_closed = trio.Event()
        read_end, write_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end,
                env=qemu_environment(os.environ), preexec_fn=die_with_parent,
                start_new_session=True)  # a Ctrl-C on our terminal must not stop it mid-flush
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        nursery.start_soon(self._log_stderr, trio.lowlevel.FdStream(read_end))

    async def _log_stderr(self, stream: trio.lowlevel.FdStream) -> None:
        pending = b""
        try:
            async with stream:
                async for chunk in stream:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        text = line.decode(errors="replace")
                        self.last_lines.append(text)
                        log_event(logging.WARNING, "child-stderr",
                                  f"{self.name} qemu-nbd: {text}", child=self.name)
        finally:
            self._stderr_closed.set()

    async def said_all(self) -> None:
        """Once it has exited: wait (briefly) until its last words are read, which
        can come after `poll` sees the exit."""
        with trio.move_on_after(STOP_TIMEOUT):
            await self._stderr_closed.wait()

    @property
    def last_said(self) -> str:
        return self.last_lines[-1] if self.last_lines else ""

    async def wait(self, timeout: float) -> bool:
        """True once the process has exited, False if it still runs after `timeout`.
        (Woken by a pidfd the moment it exits: polling every 20 ms added ~20 ms to
        every `compare` of a qcow2.)"""
        if self.process.poll() is None:
            pidfd = os.pidfd_open(self.process.pid)
            try:
                with trio.move_on_after(timeout):
                    await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
        return self.process.poll() is not None

    async def stop(self) -> None:
        if await self.wait(STOP_TIMEOUT):  # qemu-nbd exits once its only client is gone
            return
        self.process.terminate()
        if not await self.wait(STOP_TIMEOUT):
            self.process.kill()
            self.process.wait()

    def failure(self, path: str, image_format: str) -> str:
        said = f": {self.last_said}" if self.last_said else ""
        return (f"qemu-nbd exited with status {self.process.returncode} for {path} "
                f"(format {image_format}){said}")


class _AioRefused(Exception):
    """qemu-nbd exited at start naming its --aio mode: its build, the kernel or a
    seccomp profile does not allow it."""


async def open_qemu_child(name: str, path: str, image_format: str, nursery: trio.Nursery,
                          readonly: bool = False, timeout: float | None = None,
                          in_place: bool = False) -> NbdChild:
    """Start qemu-nbd for `path` and connect to it; `in_place` (only for a reader that
    writes nothing): read the data that lies as it is in the file from there."""
    if shutil.which("qemu-nbd") is None:
        raise ChildError(name, "open", 0, 0, Errno.EIO, "qemu-nbd is not installed")
    layout = await describe(name, path, image_format, in_place)
    places = None if layout is None else layout.in_place
    safe = layout is not None and layout.reads_within_its_files
    modes = [mode for mode in AIO_MODES
             if mode not in _refused_aio and (mode != "io_uring" or safe)]
    for aio in modes[:-1]:
        try:
            return await _start_child(name, path, image_format, nursery, aio, True,
                                      readonly, timeout, places)
        except _AioRefused as refusal:
            _refused_aio.add(aio)
            log_event(logging.INFO, "child-aio",
                      f"{name}: qemu-nbd cannot use --aio={aio} ({refusal}); "
                      f"using --aio={modes[-1]}", child=name, aio=aio)
    return await _start_child(name, path, image_format, nursery, modes[-1], False,
                              readonly, timeout, places)


async def _start_child(name: str, path: str, image_format: str, nursery: trio.Nursery,
                       aio: str, may_refuse_aio: bool, readonly: bool, timeout: float | None,
                       places: InPlace | None) -> NbdChild:
    directory = tempfile.mkdtemp(prefix=f"nbdverify-{name}-")
    socket_path = os.path.join(directory, "qemu-nbd.sock")
    command = ["qemu-nbd", f"--format={image_format}", f"--socket={socket_path}",
               "--cache=writeback", f"--aio={aio}", "--discard=unmap"]
    if readonly:
        command.append("--read-only")
    server = _QemuNbd(name, [*command, "--", path], nursery)
    try:
        # A QemuChild only to read in place: its read is interpreted code (a subclass
        # of the compiled NbdChild), which cost a serving qcow2 child ~5% of its CPU.
        kind = NbdChild if places is None else QemuChild
        with trio.fail_after(READY_TIMEOUT):
            while True:
                if server.process.poll() is not None:
                    await server.said_all()
                    if may_refuse_aio and aio in server.last_said:
                        raise _AioRefused(server.last_said)
                    raise ChildError(name, "open", 0, 0, Errno.EIO,
                                     server.failure(path, image_format))
                if os.path.exists(socket_path):
                    try:
                        child = await kind.open(name, f"nbd+unix:///?socket={socket_path}",
                                                nursery, timeout)
                        break
                    except ChildRefused:
                        # Between qemu-nbd's bind and its listen (seen with two servers
                        # starting at once), between its unlink of a stale socket and
                        # its bind, or it failed to open the image and exits:
                        # then its own words say why, better than "connection refused".
                        pass
                    except ChildError:
                        # qemu-nbd 7.2 listens before it opens the image, so a failed
                        # open (io_uring refused among them) can end our handshake.
                        if not await server.wait(2.0):
                            raise
                        continue  # it exited: the check above says why, in its words
                await trio.sleep(SOCKET_POLL)
    except trio.TooSlowError:
        await server.stop()
        raise ChildError(name, "open", 0, 0, Errno.EIO,
                         f"qemu-nbd did not start within {READY_TIMEOUT} s") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await server.stop()
        raise
    finally:
        # Connected (or failed): the socket is no longer needed, and nothing is left
        # in /tmp even if we are killed later.
        shutil.rmtree(directory, ignore_errors=True)
    child.location = f"{path} ({image_format}, via qemu-nbd pid {server.process.pid})"
    child.owned_cleanup = server.stop
    if isinstance(child, QemuChild):
        assert places is not None
        child.read_in_place(path, places)
    return child
