"""A child that is an NBD server: another implementation under test, or a
qemu-nbd we started to read an image format.

Many requests are in flight at once; one task reads replies and hands each to
the request waiting for its cookie. Every failure becomes a ChildError naming this
child, so the device treats a remote error, a stall and a dead server alike.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import trio
from mypy_extensions import mypyc_attr

from nbdverify_protocol.client import (
    ClientNegotiation,
    ExportOpened,
    ReplyDone,
    ReplyExtents,
    ReplyReader,
)
from nbdverify_protocol.constants import (
    BASE_ALLOCATION,
    AllocationState,
    Command,
    CommandFlag,
    Errno,
    TransmissionFlag,
)
from nbdverify_protocol.errors import ProtocolError, RemoteProtocolError
from nbdverify_protocol.events import NEED_DATA
from nbdverify_protocol.transmission import build_extended_request, build_request

from .children import (
    COMPLETED,
    ZERO_CHUNK,
    AllOf,
    ChildError,
    Completed,
    Extent,
    Failed,
    Later,
    Pending,
    Progress,
)
from .log import log_event
from .transport import Transport

# Without a block size from the server, stay within what every server accepts.
DEFAULT_MAX_REQUEST = 32 * 1024 * 1024
CONNECT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an NBD server listens, from nbd://host[:port]/export or
    nbd+unix:///export?socket=PATH."""

    export_name: str
    unix_path: str | None = None
    host: str = ""
    port: int = 10809

    @classmethod
    def parse(cls, uri: str) -> NbdAddress:
        parts = urlsplit(uri)
        export = unquote(parts.path.removeprefix("/"))
        if parts.scheme == "nbd":
            if not parts.hostname:
                raise ValueError(f"{uri}: no host")
            return cls(export, host=parts.hostname, port=parts.port or 10809)
        if parts.scheme == "nbd+unix":
            query = dict(pair.split("=", 1) for pair in parts.query.split("&") if "=" in pair)
            if "socket" not in query:
                raise ValueError(f"{uri}: no ?socket=PATH")
            return cls(export, unix_path=unquote(query["socket"]))
        raise ValueError(f"{uri}: not an nbd:// or nbd+unix:// URI")

    async def connect(self) -> trio.SocketStream:
        if self.unix_path is not None:
            return await trio.open_unix_socket(self.unix_path)
        return await trio.open_tcp_stream(self.host, self.port)


class ChildRefused(ChildError):
    """Nothing listens at the child's address (yet: a server between its bind and
    its listen refuses too, and a unix socket path is briefly missing while a
    server replaces a stale one)."""


def is_nbd_uri(text: str) -> bool:
    return text.startswith(("nbd://", "nbd+unix://"))


class _Request:
    """One request in flight to the child server: the Pending the device awaits."""

    __slots__ = ("child", "cookie", "done", "extents", "length", "offset", "operation",
                 "result", "waiter")

    def __init__(self, child: NbdChild, cookie: int, operation: str, offset: int,
                 length: int) -> None:
        self.child = child
        self.cookie = cookie
        self.operation = operation
        self.offset = offset
        self.length = length
        self.extents: list[tuple[int, int]] = []
        self.result: ReplyDone | None = None
        #: The reply came (or the connection is gone): awaiting will not wait.
        self.done = False
        self.waiter: trio.Event | None = None  # made only when somebody must wait

    def finish(self, result: ReplyDone | None) -> None:
        self.result = result
        self.done = True
        if self.waiter is not None:
            self.waiter.set()

    @property
    def reported(self) -> bool:
        # A reply that may never come must be awaited: the wait gives up in time.
        return self.child._timeout is None

    def __await__(self) -> Generator[Any, None, None]:
        return self.child._finish(self).__await__()


@mypyc_attr(allow_interpreted_subclasses=True)  # QemuChild
class NbdChild:
    def __init__(self, name: str, location: str, stream: trio.SocketStream,
                 opened: ExportOpened, timeout: float | None, initial: bytes) -> None:
        self.name = name
        self.location = location
        self.size = opened.size
        self._stream = stream
        self._flags = opened.transmission_flags
        self._context = opened.meta_contexts.get(BASE_ALLOCATION)
        maximum = opened.block_size.maximum if opened.block_size else DEFAULT_MAX_REQUEST
        self._max_request = min(maximum, DEFAULT_MAX_REQUEST * 2)
        self._timeout = timeout
        self._reader = ReplyReader(opened.structured_replies, initial, opened.extended_headers)
        self._build = build_extended_request if opened.extended_headers else build_request
        #: The child negotiated NBD extended headers (32-byte requests and replies).
        self.extended_headers = opened.extended_headers
        self._transport = Transport.over_socket(stream.socket)
        self._cookies = itertools.count(1)
        self._in_flight: dict[int, _Request] = {}
        # Requests leave in batches, not a send each (18 us a call here, each waking
        # the server): those started between `hold_requests` and `send_requests` in
        # that call, the others through the writer task, all those posted in one
        # scheduler tick in one send. The writer also sends what the kernel did not
        # take at once.
        self._outbox: list[bytes | bytearray | memoryview] = []
        self._outbox_ready = trio.Event()
        self._outbox_empty = trio.Event()
        self._outbox_empty.set()
        self._holding = False  # requests wait for send_requests
        self._writing = False  # the writer task is sending a batch
        self.progress = Progress()
        self._lost: str | None = None
        #: Stops what this child owns (a qemu-nbd we started), after disconnecting.
        self.owned_cleanup: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, name: str, uri: str, nursery: trio.Nursery,
                   timeout: float | None = None) -> Self:
        """Connect, negotiate, and start reading replies in `nursery`."""
        address = NbdAddress.parse(uri)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await address.connect()
                machine = ClientNegotiation(address.export_name, meta_contexts=[BASE_ALLOCATION])
                while True:
                    event = machine.next_event()
                    await stream.send_all(machine.data_to_send())
                    if event is not NEED_DATA:
                        break
                    data = await stream.receive_some()
                    if not data:
                        raise RemoteProtocolError("server closed the connection")
                    machine.receive_data(data)
        except (ConnectionRefusedError, FileNotFoundError) as error:
            raise ChildRefused(name, "connect", 0, 0, Errno.EIO, f"{uri}: {error}") from None
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                ProtocolError) as error:
            raise ChildError(name, "connect", 0, 0, Errno.EIO, f"{uri}: {error}") from None
        assert isinstance(event, ExportOpened)
        child = cls(name, uri, stream, event, timeout, machine.trailing_data)
        framing = ("extended headers" if event.extended_headers
                   else "structured replies" if event.structured_replies else "simple replies")
        log_event(logging.DEBUG, "child-connected", f"{name} child {uri}: {framing}",
                  child=name, framing=framing)
        nursery.start_soon(child._read_replies)
        nursery.start_soon(child._write_requests)
        return child

    # --- Reply dispatch ------------------------------------------------------------

    def _post(self, *message: bytes | bytearray | memoryview) -> None:
        if not self._outbox:
            self._outbox_empty = trio.Event()
            if not self._holding:
                self._outbox_ready.set()
        self._outbox.extend(message)

    def hold_requests(self) -> None:
        self._holding = True

    def send_requests(self) -> None:
        """Send what is held, now, as far as the kernel takes it; the writer task
        sends the rest (and all of it, if it is busy with an earlier batch)."""
        self._holding = False
        if not self._outbox:
            return
        if self._writing:
            self._outbox_ready.set()
            return
        try:
            rest = self._transport.send_now([memoryview(message) for message in self._outbox])
        except OSError as error:
            self._lose(str(error) or type(error).__name__)
            return
        if rest:
            self._outbox = list(rest)
            self._outbox_ready.set()
        else:
            self._outbox = []
            self._outbox_empty.set()

    async def _write_requests(self) -> None:
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready = trio.Event()
                batch, self._outbox = self._outbox, []
                self._writing = True
                await self._transport.send_all(batch)
                self._writing = False
                if not self._outbox:
                    self._outbox_empty.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._lose(str(error) or type(error).__name__)

    async def _read_replies(self) -> None:
        reader = self._reader
        transport = self._transport
        finished = False  # a request finished since the listeners were last told
        try:
            while True:
                event = reader.next_event()
                if event is NEED_DATA:
                    if finished:
                        finished = False
                        self.progress.tell()
                    view = reader.receive_buffer()
                    count = transport.receive_now(view)
                    if count is None:
                        count = await transport.receive_into(view)
                    reader.received(count)
                    continue
                request = self._in_flight[event.cookie]
                if isinstance(event, ReplyExtents):
                    if event.context_id == self._context:
                        request.extents.extend(event.extents)
                    continue
                del self._in_flight[event.cookie]
                request.finish(event)
                finished = True
        except (OSError, RemoteProtocolError, trio.BrokenResourceError,
                trio.ClosedResourceError) as error:
            self._lose(str(error) or type(error).__name__)

    def _lose(self, reason: str) -> None:
        """The connection is gone: fail everything waiting, and all that follows."""
        if self._lost is None:
            self._lost = reason
            log_event(logging.ERROR, "child-lost", f"{self.name} child {self.location}: "
                      f"connection lost: {reason}", child=self.name)
        for request in self._in_flight.values():
            request.finish(None)
        self._in_flight.clear()
        self.progress.tell()

    # --- Requests ----------------------------------------------------------------

    def _error(self, operation: str, offset: int, length: int, error: int,
               detail: str) -> ChildError:
        try:
            code = Errno(error)
        except ValueError:
            code = Errno.EIO
        return ChildError(self.name, operation, offset, length, code, detail)

    def _submit(self, operation: str, command: Command, offset: int, length: int,
                flags: int = 0, payload: bytes | bytearray | memoryview | None = None,
                buffer: memoryview | None = None) -> Pending[None]:
        """Queue one request for the writer; awaiting the result waits for its reply."""
        if self._lost is not None:
            return Failed(self._error(operation, offset, length, Errno.EIO,
                                      f"connection lost: {self._lost}"))
        cookie = next(self._cookies)
        request = _Request(self, cookie, operation, offset, length)
        self._in_flight[cookie] = request
        self._reader.expect(cookie, offset, length, buffer)
        header = self._build(command, offset, length, cookie, flags)
        if payload is None:
            self._post(header)
        else:
            self._post(header, payload)
        return request

    async def _finish(self, request: _Request) -> None:
        if not request.done:
            request.waiter = trio.Event()
            if self._timeout:
                with trio.move_on_after(self._timeout):
                    await request.waiter.wait()
            else:
                await request.waiter.wait()  # a cancel scope costs ~3 us: only with a timeout
        operation, offset, length = request.operation, request.offset, request.length
        result = request.result
        if result is None:
            # Given up: the reply is still parsed when it comes, its data dropped.
            self._reader.abandon(request.cookie)
            detail = (f"connection lost: {self._lost}" if self._lost is not None
                      else f"no reply within {self._timeout} s")
            raise self._error(operation, offset, length, Errno.EIO, detail)
        if result.error:
            code = result.error
            detail = result.message or f"error {code}"
            raise self._error(operation, offset, length, code, detail)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self._max_request
        return [(start, min(step, offset + length - start))
                for start in range(offset, offset + length, step)]

    def _can(self, flag: TransmissionFlag) -> bool:
        return bool(self._flags & flag)

    def _submit_pieces(self, operation: str, command: Command, offset: int,
                       view: memoryview, flags: int) -> Pending[None]:
        """READ into, or WRITE from, `view`, split at the server's maximum request size;
        all pieces go out together."""
        if len(view) <= self._max_request:
            if command is Command.READ:
                return self._submit(operation, command, offset, len(view), flags, buffer=view)
            return self._submit(operation, command, offset, len(view), flags, payload=view)
        parts: list[Pending[None]] = []
        for start, length in self._pieces(offset, len(view)):
            parts.append(self._submit_pieces(operation, command, start,
                                             view[start - offset:start - offset + length],
                                             flags))
        return AllOf(parts)

    def read(self, buffer: memoryview, offset: int) -> Pending[None]:
        return self._submit_pieces("read", Command.READ, offset, buffer, 0)

    def write(self, data: bytes | bytearray | memoryview, offset: int,
              fua: bool) -> Pending[None]:
        native_fua = fua and self._can(TransmissionFlag.SEND_FUA)
        written = self._submit_pieces("write", Command.WRITE, offset, memoryview(data),
                                      CommandFlag.FUA if native_fua else 0)
        if fua and not native_fua:
            return self._then_flush(written)
        return written

    def _then_flush(self, first: Pending[None]) -> Pending[None]:
        """FUA where the server has none: the operation, then a FLUSH."""
        async def both() -> None:
            await first
            await self.flush()
        return Later(both)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                     fua: bool) -> Pending[None]:
        if not self._can(TransmissionFlag.SEND_WRITE_ZEROES):
            if fast:
                return Failed(self._error("write_zeroes", offset, length, Errno.ENOTSUP,
                                          "server cannot write zeroes"))
            return Later(lambda: self._write_zero_buffers(offset, length, fua))
        flags = 0 if may_trim else CommandFlag.NO_HOLE
        if fast:
            if not self._can(TransmissionFlag.SEND_FAST_ZERO):
                return Failed(self._error("write_zeroes", offset, length, Errno.ENOTSUP,
                                          "server cannot zero quickly"))
            flags |= CommandFlag.FAST_ZERO
        native_fua = fua and self._can(TransmissionFlag.SEND_FUA)
        if native_fua:
            flags |= CommandFlag.FUA
        zeroed = self._submit("write_zeroes", Command.WRITE_ZEROES, offset, length, flags)
        return self._then_flush(zeroed) if fua and not native_fua else zeroed

    async def _write_zero_buffers(self, offset: int, length: int, fua: bool) -> None:
        for start in range(offset, offset + length, ZERO_CHUNK):
            await self.write(bytes(min(ZERO_CHUNK, offset + length - start)), start, False)
        if fua:
            await self.flush()

    def trim(self, offset: int, length: int, fua: bool) -> Pending[None]:
        if not (self._can(TransmissionFlag.SEND_TRIM) and length):
            return self.flush() if fua else COMPLETED
        native_fua = fua and self._can(TransmissionFlag.SEND_FUA)
        trimmed = self._submit("trim", Command.TRIM, offset, length,
                               CommandFlag.FUA if native_fua else 0)
        return self._then_flush(trimmed) if fua and not native_fua else trimmed

    def flush(self) -> Pending[None]:
        if self._can(TransmissionFlag.SEND_FLUSH):
            return self._submit("flush", Command.FLUSH, 0, 0)
        return COMPLETED

    def cache(self, offset: int, length: int) -> Pending[None]:
        if self._can(TransmissionFlag.SEND_CACHE) and length:
            return self._submit("cache", Command.CACHE, offset, length)
        return COMPLETED

    def extents(self, offset: int, length: int) -> Pending[list[Extent]]:
        if self._context is None or not length:
            return Completed([Extent(length, AllocationState.DATA)])
        asked = self._submit("block_status", Command.BLOCK_STATUS, offset, length)
        return Later(lambda: self._collect_extents(asked, length))

    async def _collect_extents(self, asked: Pending[None], length: int) -> list[Extent]:
        await asked
        assert isinstance(asked, _Request)
        found = []
        total = 0
        for extent_length, flags in asked.extents:
            extent_length = min(extent_length, length - total)
            if extent_length <= 0:
                break
            state = AllocationState(flags & (AllocationState.HOLE | AllocationState.ZERO))
            found.append(Extent(extent_length, state))
            total += extent_length
        return found or [Extent(length, AllocationState.DATA)]

    async def aclose(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close."""
        if self._lost is None:
            self._post(self._build(Command.DISC, 0, 0, 0))
            self._lost = "closed"  # the server hanging up now is no news
            with trio.move_on_after(5):
                await self._outbox_empty.wait()
        await self._stream.aclose()
        if self.owned_cleanup is not None:
            await self.owned_cleanup()
