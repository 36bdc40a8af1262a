"""The two children of a verified device: where bytes really live.

A child raises `ChildError` (never a bare OSError) so the device can tell which
child failed, at what, and compare the two children's errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import outcome
import trio
from mypy_extensions import mypyc_attr

from nbdverify_protocol.constants import AllocationState, Errno

from .libc import fallocate

# Zero-fill fallbacks and extent scans work in steps of this size.
ZERO_CHUNK = 1024 * 1024
MAX_EXTENTS = 1024

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


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


class Pending(Protocol[T_co]):
    """A child operation that has started: a file child has done it already, an NBD
    child has sent its request. Awaiting it finishes it and raises its ChildError."""

    @property
    def done(self) -> bool:
        """Awaiting will not wait: it returns (or raises) without yielding, so the
        device may finish the operation in place (`device.outcome_now`)."""
        ...

    @property
    def reported(self) -> bool:
        """When it becomes done, its child tells its `progress` listeners (an NBD
        child's reply reader does, after each batch of replies), so that a connection
        can finish it right there instead of waking a task to await it."""
        ...

    def __await__(self) -> Generator[Any, None, T_co]: ...


class Progress:
    """Who a child tells that some of its `reported` operations have become done:
    the connections waiting for them. Called on the event loop, never waits."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)

    def tell(self) -> None:
        for listener in tuple(self._listeners):  # one may stop listening meanwhile
            listener()


class Completed(Generic[T]):
    """An operation that finished as it started (page-cached file I/O)."""

    __slots__ = ("value",)
    done = True
    reported = True  # done already

    def __init__(self, value: T) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, T]:
        yield from ()
        return self.value


class Failed:
    """An operation that failed as it started."""

    __slots__ = ("_error",)
    done = True
    reported = True

    def __init__(self, error: ChildError) -> None:
        self._error = error

    def __await__(self) -> Generator[Any, None, Any]:
        yield from ()
        raise self._error


COMPLETED: Completed[None] = Completed(None)


class Later(Generic[T]):
    """An operation that starts only when first awaited: the rare paths (fallbacks,
    FUA emulation, FAST_ZERO's reference-first order) that are simplest written as
    a coroutine. Awaiting it again gives the same result without running it again."""

    __slots__ = ("_finished", "_result", "_start")
    done = False
    reported = False  # a coroutine: somebody must run it

    def __init__(self, start: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._start = start
        self._finished: trio.Event | None = None
        self._result: outcome.Outcome[T] | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._run().__await__()

    async def _run(self) -> T:
        if self._finished is None:
            self._finished = trio.Event()
            try:
                self._result = outcome.Value(await self._start())
            except ChildError as error:
                self._result = outcome.Error(error)
            finally:
                self._finished.set()
        else:
            await self._finished.wait()
        if self._result is None:
            raise ChildError("?", "operation", 0, 0, Errno.EIO, "cancelled")
        return self._result.unwrap()


class AllOf:
    """Several operations as one (an NBD read split at the server's maximum size, or
    read partly from a file): awaiting it awaits them all, and raises the first error."""

    __slots__ = ("_parts",)

    def __init__(self, parts: list[Pending[None]]) -> None:
        self._parts = parts

    @property
    def done(self) -> bool:
        return all(part.done for part in self._parts)

    @property
    def reported(self) -> bool:
        return all(part.reported for part in self._parts)

    def __await__(self) -> Generator[Any, None, None]:
        return self._finish().__await__()

    async def _finish(self) -> None:
        first: ChildError | None = None
        for part in self._parts:
            try:
                await part
            except ChildError as error:
                first = first or error
        if first is not None:
            raise first


class InThread:
    """Blocking work (fsync) started in a worker thread at once, with no task: the
    two children's syncs overlap, and awaiting waits for this one."""

    __slots__ = ("_finished", "_result")
    reported = False

    def __init__(self, work: Callable[[], object], error: Callable[[OSError], ChildError]
                 ) -> None:
        self._finished = trio.Event()
        self._result: outcome.Outcome[ChildError | None] | None = None
        token = trio.lowlevel.current_trio_token()

        def run() -> ChildError | None:
            try:
                work()
            except OSError as failure:
                return error(failure)
            return None

        def deliver(result: outcome.Outcome[ChildError | None]) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # nobody is waiting any more
                token.run_sync_soon(self._deliver, result)

        trio.lowlevel.start_thread_soon(run, deliver)

    def _deliver(self, result: outcome.Outcome[ChildError | None]) -> None:
        self._result = result
        self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def __await__(self) -> Generator[Any, None, None]:
        if self._result is None:  # (Event.wait yields even when set: only if needed)
            yield from self._finished.wait().__await__()
        assert self._result is not None
        error = self._result.unwrap()
        if error is not None:
            raise error


class Child(Protocol):
    """What the verified device needs from each of its two children. Every
    operation starts when called and returns a Pending to await for its end."""

    name: str
    #: Where the child's data lives, for people: a path or a URI.
    location: str
    size: int
    #: Told when some of this child's `reported` operations have become done.
    progress: Progress

    def hold_requests(self) -> None:
        """Requests started from now on may wait in the child until `send_requests`,
        to leave together: the caller calls it before it next yields to the scheduler."""
        ...

    def send_requests(self) -> None: ...
    def read(self, buffer: memoryview, offset: int) -> Pending[None]: ...
    def write(self, data: bytes | bytearray | memoryview, offset: int,
              fua: bool) -> Pending[None]: ...
    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                     fua: bool) -> Pending[None]: ...
    def trim(self, offset: int, length: int, fua: bool) -> Pending[None]: ...
    def flush(self) -> Pending[None]: ...
    def cache(self, offset: int, length: int) -> Pending[None]: ...
    def extents(self, offset: int, length: int) -> Pending[list[Extent]]: ...
    async def aclose(self) -> None: ...


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' recording and failing children
class FileChild:
    """A local file or block device. Page-cached I/O runs inline on the event loop
    (a thread hop costs ~170 us, far more than a cached pread); only fsync, which
    can block for long, goes to a worker thread, and the big reads of a reader that
    asks for that (`read_in_thread`)."""

    def __init__(self, name: str, path: str, readonly: bool = False) -> None:
        self.name = name
        self.location = path
        self.progress = Progress()  # told nothing: what is not done at once is not reported
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

    def hold_requests(self) -> None:
        pass  # nothing is sent anywhere

    def send_requests(self) -> None:
        pass

    def read(self, buffer: memoryview, offset: int) -> Pending[None]:
        try:
            self._read_into(buffer, offset)
        except OSError as error:
            return Failed(self._error("read", offset, len(buffer), error))
        return COMPLETED

    def read_locally(self, buffer: memoryview, offset: int) -> bool:
        """`read`, blocking, raising ChildError: for a worker thread that reads and
        compares whole pieces (compare). True: it is read."""
        try:
            self._read_into(buffer, offset)
        except OSError as error:
            raise self._error("read", offset, len(buffer), error) from None
        return True

    def read_in_thread(self, buffer: memoryview, offset: int) -> Pending[None]:
        """`read` in a worker thread (preadv lets go of the GIL), for a reader that has
        other work meanwhile (compare); worth it for big reads only (this hop measured
        ~70 us, there and back)."""
        return InThread(lambda: self._read_into(buffer, offset),
                        lambda error: self._error("read", offset, len(buffer), error))

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):
            count = os.preadv(self._fd, [buffer[done:]], offset + done)
            if count == 0:
                buffer[done:] = bytes(len(buffer) - done)  # past EOF reads as zeroes
                break
            done += count

    def write(self, data: bytes | bytearray | memoryview, offset: int,
              fua: bool) -> Pending[None]:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as error:
            return Failed(self._error("write", offset, len(view), error))
        return self.flush() if fua else COMPLETED

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                     fua: bool) -> Pending[None]:
        try:
            if not self._zero_quickly(offset, length, may_trim):
                if fast:
                    raise OSError(errno.ENOTSUP, "cannot zero this range quickly")
                self._write_zero_buffers(offset, length)
        except OSError as error:
            return Failed(self._error("write_zeroes", offset, length, error))
        return self.flush() if fua else COMPLETED

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

    def trim(self, offset: int, length: int, fua: bool) -> Pending[None]:
        if length:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as error:
                # TRIM is a hint: a filesystem that cannot punch holes keeps the data.
                if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    return Failed(self._error("trim", offset, length, error))
        return self.flush() if fua else COMPLETED

    def flush(self) -> Pending[None]:
        fd = self._fd
        return InThread(lambda: os.fdatasync(fd),
                        lambda error: self._error("flush", 0, 0, error))

    def cache(self, offset: int, length: int) -> Pending[None]:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as error:
            return Failed(self._error("cache", offset, length, error))
        return COMPLETED

    def extents(self, offset: int, length: int) -> Pending[list[Extent]]:
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
            return Failed(self._error("block_status", offset, length, error))
        return Completed(found)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
