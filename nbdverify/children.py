"""The two children of a verified device: where bytes really live.

A child raises `ChildError` (never a bare OSError) so the device can tell which
child failed, at what, and compare the two children's errors.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

import trio

from nbdverify_protocol.constants import AllocationState, Errno

# Zero-fill fallbacks and extent scans work in steps of this size.
ZERO_CHUNK = 1024 * 1024
MAX_EXTENTS = 1024


@dataclass(frozen=True, slots=True)
class Extent:
    length: int
    state: AllocationState


class ChildError(Exception):
    """One child failed one operation."""

    def __init__(self, child: str, operation: str, offset: int, length: int, error: Errno,
                 detail: str) -> None:
        super().__init__(f"{child}: {operation} offset={offset} length={length}: {detail}")
        self.child = child
        self.operation = operation
        self.offset = offset
        self.length = length
        self.error = error
        self.detail = detail


class Child(Protocol):
    """What the verified device needs from each of its two children."""

    name: str
    #: Where the child's data lives, for people: a path or a URI.
    location: str
    size: int
    #: True when operations never yield to the event loop, so running the two
    #: children one after the other costs nothing.
    runs_inline: bool

    async def read_into(self, buffer: memoryview, offset: int) -> None: ...
    def post_read(self, buffer: memoryview, offset: int) -> Awaitable[None]:
        """Start a read now; awaiting the result finishes it (and raises its error)."""
        ...
    async def write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None: ...
    def post_write(self, data: bytes | bytearray | memoryview, offset: int) -> Awaitable[None]:
        """Start a write (without FUA) now; awaiting the result finishes it."""
        ...
    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                           fua: bool) -> None: ...
    async def trim(self, offset: int, length: int, fua: bool) -> None: ...
    async def flush(self) -> None: ...
    async def cache(self, offset: int, length: int) -> None: ...
    async def extents(self, offset: int, length: int) -> list[Extent]: ...
    async def aclose(self) -> None: ...


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int


async def _done() -> None:
    return None


async def _raise(error: ChildError) -> None:
    raise error


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class FileChild:
    """A local file or block device. Page-cached I/O runs inline on the event loop
    (a thread hop costs ~170 us, far more than a cached pread); only fsync, which
    can block for long, goes to a worker thread."""

    runs_inline = True

    def __init__(self, name: str, path: str, readonly: bool = False) -> None:
        self.name = name
        self.location = path
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(path, flags)
        try:
            mode = os.fstat(self._fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise OSError(errno.EINVAL, "not a regular file or block device")
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise
        self._zero_range_works = True

    def _error(self, operation: str, offset: int, length: int, error: OSError) -> ChildError:
        code = error.errno or errno.EIO
        return ChildError(self.name, operation, offset, length, Errno.from_host(code),
                          os.strerror(code))

    def post_read(self, buffer: memoryview, offset: int) -> Awaitable[None]:
        """Page-cached: the read happens right here; the awaitable only reports it."""
        try:
            self._read(buffer, offset)
        except ChildError as error:
            return _raise(error)
        return _done()

    async def read_into(self, buffer: memoryview, offset: int) -> None:
        self._read(buffer, offset)

    def _read(self, buffer: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(buffer):
                count = os.preadv(self._fd, [buffer[done:]], offset + done)
                if count == 0:
                    buffer[done:] = bytes(len(buffer) - done)  # past EOF reads as zeroes
                    return
                done += count
        except OSError as error:
            raise self._error("read", offset, len(buffer), error) from None

    def post_write(self, data: bytes | bytearray | memoryview, offset: int) -> Awaitable[None]:
        try:
            self._write(data, offset)
        except ChildError as error:
            return _raise(error)
        return _done()

    async def write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        self._write(data, offset)
        if fua:
            await self.flush()

    def _write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as error:
            raise self._error("write", offset, len(view), error) from None

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                           fua: bool) -> None:
        try:
            if not self._zero_quickly(offset, length, may_trim):
                if fast:
                    raise OSError(errno.ENOTSUP, "cannot zero this range quickly")
                self._write_zero_buffers(offset, length)
        except OSError as error:
            raise self._error("write_zeroes", offset, length, error) from None
        if fua:
            await self.flush()

    def _zero_quickly(self, offset: int, length: int, may_trim: bool) -> bool:
        """Zero with fallocate where the filesystem can; False where it cannot."""
        if length == 0:
            return True
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if may_trim else []
        if self._zero_range_works:
            modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self._fd, mode, offset, length)
                return True
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                if mode & FALLOC_FL_ZERO_RANGE:
                    self._zero_range_works = False
        return False

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            step = min(len(zeroes), end - offset)
            offset += os.pwrite(self._fd, zeroes[:step], offset)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        if length == 0:
            return
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as error:
            # TRIM is a hint: a filesystem that cannot punch holes simply keeps the data.
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise self._error("trim", offset, length, error) from None
        if fua:
            await self.flush()

    async def flush(self) -> None:
        try:
            await trio.to_thread.run_sync(os.fdatasync, self._fd)
        except OSError as error:
            raise self._error("flush", 0, 0, error) from None

    async def cache(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as error:
            raise self._error("cache", offset, length, error) from None

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation from SEEK_DATA/SEEK_HOLE; at most MAX_EXTENTS, which may cover
        less than asked (the client asks again for the rest)."""
        end = min(offset + length, self.size)
        found: list[Extent] = []
        position = offset
        try:
            while position < end and len(found) < MAX_EXTENTS:
                try:
                    data_start = os.lseek(self._fd, position, os.SEEK_DATA)
                except OSError as error:
                    if error.errno != errno.ENXIO:
                        raise
                    data_start = end  # no data up to EOF
                if data_start > position:
                    hole_end = min(data_start, end)
                    found.append(Extent(hole_end - position, AllocationState.HOLE
                                        | AllocationState.ZERO))
                    position = hole_end
                    continue
                data_end = min(os.lseek(self._fd, position, os.SEEK_HOLE), end)
                found.append(Extent(data_end - position, AllocationState.DATA))
                position = data_end
        except OSError as error:
            raise self._error("block_status", offset, length, error) from None
        return found

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
