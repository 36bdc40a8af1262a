"""A child that is an NBD server: another implementation under test, or a
qemu-nbd we started to read an image format.

Many requests are in flight at once; one task reads replies and hands each to
the request waiting for its cookie. Every failure becomes a ChildError naming this
child, so the device treats a remote error, a stall and a dead server alike.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import trio

from nbdverify_protocol.client import (
    ClientNegotiation,
    ExportOpened,
    NegotiationRefused,
    ReplyData,
    ReplyDone,
    ReplyExtents,
    ReplyHole,
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
from nbdverify_protocol.errors import RemoteProtocolError
from nbdverify_protocol.events import NEED_DATA
from nbdverify_protocol.transmission import build_request

from .children import ZERO_CHUNK, ChildError, Extent
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


def is_nbd_uri(text: str) -> bool:
    return text.startswith(("nbd://", "nbd+unix://"))


@dataclass(eq=False, slots=True)
class _Request:
    cookie: int
    operation: str
    command: Command
    offset: int
    length: int
    buffer: memoryview | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    result: ReplyDone | None = None


class NbdChild:
    runs_inline = False

    def __init__(self, name: str, location: str, stream: trio.SocketStream,
                 opened: ExportOpened, timeout: float | None) -> None:
        self.name = name
        self.location = location
        self.size = opened.size
        self._stream = stream
        self._flags = opened.transmission_flags
        self._context = opened.meta_contexts.get(BASE_ALLOCATION)
        maximum = opened.block_size.maximum if opened.block_size else DEFAULT_MAX_REQUEST
        self._max_request = min(maximum, DEFAULT_MAX_REQUEST * 2)
        self._timeout = timeout
        self._reader = ReplyReader()
        self._incoming = Transport.over_socket(stream.socket)
        self._cookies = itertools.count(1)
        self._in_flight: dict[int, _Request] = {}
        # Requests go out through one writer task: all those made in one scheduler
        # tick leave in one send instead of one send each.
        self._outbox: list[bytes] = []
        self._outbox_ready = trio.Event()
        self._outbox_empty = trio.Event()
        self._lost: str | None = None
        self._disconnecting = False
        #: Stops what this child owns (a qemu-nbd we started), after disconnecting.
        self.owned_cleanup: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, name: str, uri: str, nursery: trio.Nursery,
                   timeout: float | None = None) -> NbdChild:
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
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                RemoteProtocolError, NegotiationRefused) as error:
            raise ChildError(name, "connect", 0, 0, Errno.EIO, f"{uri}: {error}") from None
        assert isinstance(event, ExportOpened)
        child = cls(name, uri, stream, event, timeout)
        child._reader.receive_data(machine.trailing_data)
        nursery.start_soon(child._read_replies)
        nursery.start_soon(child._write_requests)
        return child

    # --- Reply dispatch ------------------------------------------------------------

    def _post(self, message: bytes) -> None:
        self._outbox.append(message)
        if len(self._outbox) == 1:
            self._outbox_empty = trio.Event()
            self._outbox_ready.set()

    async def _write_requests(self) -> None:
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready = trio.Event()
                batch, self._outbox = self._outbox, []
                await self._stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
                if not self._outbox:
                    self._outbox_empty.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self._lose(str(error) or type(error).__name__)

    async def _read_replies(self) -> None:
        try:
            while True:
                event = self._reader.next_event()
                if event is NEED_DATA:
                    # Into one kept buffer: receive_some(n) would allocate n bytes each time.
                    data = await self._incoming.receive_some()
                    if not data:
                        raise EOFError("server closed the connection")
                    self._reader.receive_data(data)
                    continue
                request = self._in_flight.get(event.cookie)
                if request is None:
                    continue  # the request gave up waiting (timeout); drop its reply
                if isinstance(event, ReplyData):
                    self._place(request, event.offset, event.data)
                elif isinstance(event, ReplyHole):
                    self._place(request, event.offset, bytes(event.length))
                elif isinstance(event, ReplyExtents):
                    if event.context_id == self._context:
                        request.extents.extend(event.extents)
                else:
                    request.result = event
                    del self._in_flight[event.cookie]
                    request.done.set()
        except (EOFError, OSError, RemoteProtocolError, trio.BrokenResourceError,
                trio.ClosedResourceError) as error:
            self._lose(str(error) or type(error).__name__)

    def _place(self, request: _Request, offset: int, data: bytes) -> None:
        start = offset - request.offset
        if request.buffer is None or start < 0 or start + len(data) > request.length:
            raise RemoteProtocolError(f"read data outside the request at offset {offset}")
        request.buffer[start:start + len(data)] = data

    def _lose(self, reason: str) -> None:
        """The connection is gone: fail everything waiting, and all that follows."""
        if self._lost is None and self._disconnecting:
            self._lost = "closed"  # the server hung up after our NBD_CMD_DISC, as it should
        if self._lost is None:
            self._lost = reason
            log_event(logging.ERROR, "child-lost", f"{self.name} child {self.location}: "
                      f"connection lost: {reason}", child=self.name)
        for request in self._in_flight.values():
            request.done.set()
        self._in_flight.clear()

    # --- Requests ----------------------------------------------------------------

    def _error(self, operation: str, offset: int, length: int, error: int,
               detail: str) -> ChildError:
        try:
            code = Errno(error)
        except ValueError:
            code = Errno.EIO
        return ChildError(self.name, operation, offset, length, code, detail)

    def _submit(self, operation: str, command: Command, offset: int, length: int,
                flags: int = 0, payload: bytes | bytearray | memoryview = b"",
                buffer: memoryview | None = None) -> _Request:
        """Queue one request for the writer; `_finish` waits for its reply."""
        if self._lost is not None:
            raise self._error(operation, offset, length, Errno.EIO,
                              f"connection lost: {self._lost}")
        cookie = next(self._cookies)
        request = _Request(cookie, operation, command, offset, length, buffer)
        self._in_flight[cookie] = request
        if command is Command.READ:
            self._reader.expect_read(cookie, offset, length)
        self._post(build_request(command, offset, length, cookie, flags) + bytes(payload))
        return request

    async def _finish(self, request: _Request) -> _Request:
        try:
            with trio.move_on_after(self._timeout if self._timeout else float("inf")):
                await request.done.wait()
        finally:
            self._in_flight.pop(request.cookie, None)
        operation, offset, length = request.operation, request.offset, request.length
        if request.result is None:
            request.buffer = None  # a late reply must not land in a buffer we gave up
            detail = (f"connection lost: {self._lost}" if self._lost is not None
                      else f"no reply within {self._timeout} s")
            raise self._error(operation, offset, length, Errno.EIO, detail)
        if request.result.error:
            code = request.result.error
            detail = request.result.message or f"error {code}"
            raise self._error(operation, offset, length, code, detail)
        return request

    async def _finish_all(self, requests: list[_Request]) -> None:
        """Wait for every request (all are in flight already); raise the first error."""
        first: ChildError | None = None
        for request in requests:
            try:
                await self._finish(request)
            except ChildError as error:
                first = first or error
        if first is not None:
            raise first

    async def _call(self, operation: str, command: Command, offset: int, length: int,
                    flags: int = 0) -> _Request:
        return await self._finish(self._submit(operation, command, offset, length, flags))

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self._max_request
        return [(start, min(step, offset + length - start))
                for start in range(offset, offset + length, step)]

    def _can(self, flag: TransmissionFlag) -> bool:
        return bool(self._flags & flag)

    def _submit_pieces(self, operation: str, command: Command, offset: int,
                       view: memoryview, flags: int) -> list[_Request]:
        """READ into, or WRITE from, `view`, split at the server's maximum request size;
        all pieces go out together."""
        requests = []
        for start, length in self._pieces(offset, len(view)):
            part = view[start - offset:start - offset + length]
            if command is Command.READ:
                requests.append(self._submit(operation, command, start, length, flags,
                                             buffer=part))
            else:
                requests.append(self._submit(operation, command, start, length, flags,
                                             payload=part))
        return requests

    def post_read(self, buffer: memoryview, offset: int) -> Awaitable[None]:
        """Send the READ now; the returned awaitable waits for its data. Lets the
        device read the other child meanwhile without a task for this one."""
        return self._finish_all(self._submit_pieces("read", Command.READ, offset, buffer, 0))

    async def read_into(self, buffer: memoryview, offset: int) -> None:
        await self.post_read(buffer, offset)

    def post_write(self, data: bytes | bytearray | memoryview, offset: int) -> Awaitable[None]:
        """Send the WRITE now; the returned awaitable waits for its reply."""
        return self._finish_all(
            self._submit_pieces("write", Command.WRITE, offset, memoryview(data), 0))

    async def write(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        native_fua = fua and self._can(TransmissionFlag.SEND_FUA)
        flags = CommandFlag.FUA if native_fua else 0
        await self._finish_all(
            self._submit_pieces("write", Command.WRITE, offset, memoryview(data), flags))
        if fua and not native_fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool,
                           fua: bool) -> None:
        if not self._can(TransmissionFlag.SEND_WRITE_ZEROES):
            if fast:
                raise self._error("write_zeroes", offset, length, Errno.ENOTSUP,
                                  "server cannot write zeroes")
            for start in range(offset, offset + length, ZERO_CHUNK):
                await self.write(bytes(min(ZERO_CHUNK, offset + length - start)), start, False)
            if fua:
                await self.flush()
            return
        flags = 0 if may_trim else CommandFlag.NO_HOLE
        if fast:
            if not self._can(TransmissionFlag.SEND_FAST_ZERO):
                raise self._error("write_zeroes", offset, length, Errno.ENOTSUP,
                                  "server cannot zero quickly")
            flags |= CommandFlag.FAST_ZERO
        if fua and self._can(TransmissionFlag.SEND_FUA):
            flags |= CommandFlag.FUA
        await self._call("write_zeroes", Command.WRITE_ZEROES, offset, length, flags)
        if fua and not self._can(TransmissionFlag.SEND_FUA):
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        if self._can(TransmissionFlag.SEND_TRIM) and length:
            await self._call("trim", Command.TRIM, offset, length)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self._can(TransmissionFlag.SEND_FLUSH):
            await self._call("flush", Command.FLUSH, 0, 0)

    async def cache(self, offset: int, length: int) -> None:
        if self._can(TransmissionFlag.SEND_CACHE) and length:
            await self._call("cache", Command.CACHE, offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if self._context is None or not length:
            return [Extent(length, AllocationState.DATA)]
        request = await self._call("block_status", Command.BLOCK_STATUS, offset, length)
        found = []
        total = 0
        for extent_length, flags in request.extents:
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
            self._disconnecting = True
            self._post(build_request(Command.DISC, 0, 0, 0))
            with trio.move_on_after(5):
                await self._outbox_empty.wait()
        self._lost = self._lost or "closed"
        await self._stream.aclose()
        if self.owned_cleanup is not None:
            await self.owned_cleanup()
