"""The NBD server: trio I/O around the sans-IO negotiation and the verified device."""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
from dataclasses import dataclass

import trio

from nbdverify_protocol.constants import (
    BASE_ALLOCATION,
    Command,
    CommandFlag,
    Errno,
    OptionReplyType,
    TransmissionFlag,
)
from nbdverify_protocol.errors import RemoteProtocolError
from nbdverify_protocol.events import (
    BlockSize,
    ClientRequest,
    ExportDetails,
    ExportInfoRequested,
    ExportList,
    ExportListing,
    ExportListRequested,
    ExportNameChosen,
    MetaContextsGranted,
    MetaContextsRequested,
    NegotiationAborted,
    OptionRefused,
    ServerDecision,
    TlsRequested,
)
from nbdverify_protocol.negotiation import (
    NEED_DATA,
    ServerNegotiation,
    State,
    TlsMode,
    match_meta_contexts,
)
from nbdverify_protocol.transmission import (
    MAX_EXTENT_LENGTH,
    MAX_PAYLOAD,
    MINIMUM_BLOCK_SIZE,
    PREFERRED_BLOCK_SIZE,
    REQUEST_HEADER,
    Negotiated,
    Request,
    block_status_chunk,
    error_reply,
    none_chunk,
    pack_read_reply_header,
    parse_request,
    read_reply_header_size,
    request_error,
    simple_reply,
)

from .changes import Origin
from .device import DeviceError, VerificationFailed, VerifiedDevice
from .log import log_event
from .transport import ConnectionLost, Transport

# Per connection: requests in flight, and the bytes their buffers may hold. A
# client that sends requests and never reads replies stalls here, bounded.
MAX_IN_FLIGHT = 64
MEMORY_BUDGET = 256 * 1024 * 1024
# A client must finish negotiating within this (a connection that never speaks
# must not hold resources forever; qemu-nbd's --handshake-limit is 10 s).
HANDSHAKE_TIMEOUT_SECONDS = 60.0
# Replies served inline are sent together once this much is queued (or sooner,
# whenever the next request is not already here).
REPLY_BATCH_BYTES = 256 * 1024
# READs and WRITEs larger than this get a task of their own even on inline
# children: sending 1 MiB while the next request is read doubles sequential speed.
INLINE_MAX = 256 * 1024
# When the server stops, a connection closes once no request came for this long.
DRAIN_IDLE_SECONDS = 0.5
# How long in-flight requests may take to finish once the connection must close.
CLOSE_GRACE_SECONDS = 30.0
BASE_ALLOCATION_ID = 1

# CAN_MULTI_CONN holds: all connections share one device, so overlapping requests
# are ordered across connections, and FLUSH syncs both children whole (fdatasync
# of each file; FLUSH on the single connection to an NBD child), which covers every
# completed write from every connection.
ADVERTISED_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.SEND_CACHE
)


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str = ""
    description: str = ""
    readonly: bool = False

    @property
    def transmission_flags(self) -> TransmissionFlag:
        if self.readonly:
            return ADVERTISED_FLAGS | TransmissionFlag.READ_ONLY
        return ADVERTISED_FLAGS


class MemoryBudget:
    """Bytes that requests in flight may hold; `acquire` waits until they fit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, amount: int) -> int:
        amount = min(amount, self.limit)
        while self._free < amount:
            await self._lot.park()
        self._free -= amount
        return amount

    def release(self, amount: int) -> None:
        self._free += amount
        if self._lot:
            self._lot.unpark_all()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    mode: TlsMode
    context: ssl.SSLContext


class Server:
    def __init__(self, device: VerifiedDevice, export: ExportConfig,
                 tls: TlsConfig | None = None) -> None:
        self.device = device
        self.export = export
        self.tls = tls
        #: Set to stop: no new connections; open ones finish in-flight requests.
        self.stopping = trio.Event()
        self._ids = itertools.count(1)

    def stop(self) -> None:
        self.stopping.set()

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until stopped, then wait for open connections to finish."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(self._accept, listener, connections)
                task_status.started()
                await self.stopping.wait()
                acceptors.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            connections.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE_SECONDS

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:  # EMFILE and friends: wait, do not spin or die
                log_event(logging.WARNING, "accept-failed", f"accept failed: {error}")
                await trio.sleep(0.1)
                continue
            connections.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection = Connection(self, stream, next(self._ids))
        try:
            await connection.run()
        finally:
            await stream.aclose()


class Connection:
    def __init__(self, server: Server, stream: trio.SocketStream, number: int) -> None:
        self.server = server
        self.device = server.device
        self.number = number
        self._stream: trio.abc.Stream = stream
        self._transport = Transport.over_socket(stream.socket)
        self._send_lock = trio.Lock()
        self._in_flight = trio.Semaphore(MAX_IN_FLIGHT)
        self._memory = MemoryBudget(MEMORY_BUDGET)
        self._session: Negotiated | None = None
        self._queued: list[bytes | bytearray] = []  # replies ready to go in one send
        self._queued_bytes = 0
        self._replies_waiting = trio.Event()  # wakes the writer for task replies
        self._waiting: trio.CancelScope | None = None  # the wait for the next request

    def _log(self, level: int, event: str, message: str, **fields: object) -> None:
        log_event(level, event, message, connection=self.number, **fields)

    async def run(self) -> None:
        self._log(logging.DEBUG, "connected", "client connected")
        try:
            session = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_SECONDS):
                session = await self._negotiate()
            if session is None:
                self._log(logging.DEBUG, "no-session", "negotiation ended without an export")
            else:
                self._session = session
                await self._transmit(session)
        # Nurseries wrap errors in groups, hence except*. Whatever goes wrong ends
        # this connection only, never the server or another client.
        except* (RemoteProtocolError, ConnectionLost) as group:
            self._log(logging.WARNING, "protocol-error", f"dropping client: {_first(group)}")
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as group:
            self._log(logging.DEBUG, "connection-lost", f"connection lost: {_first(group)}")
        except* Exception as group:
            logging.getLogger("nbdverify").error(
                "internal error; dropping this client", exc_info=_first(group),
                extra={"event": "internal-error", "fields": {"connection": self.number}})
        self._log(logging.DEBUG, "disconnected", "client disconnected")

    # --- Negotiation ------------------------------------------------------------------

    async def _negotiate(self) -> Negotiated | None:
        tls = self.server.tls
        machine = ServerNegotiation(tls=tls.mode if tls else TlsMode.OFF)
        while True:
            if machine.state is State.AWAIT_OPTION or machine.state is State.AWAIT_CLIENT_FLAGS:
                event = machine.next_event()
                if event is NEED_DATA:
                    await self._flush_negotiation(machine)
                    data = await self._transport.receive_some()
                    if not data:
                        return None
                    machine.receive_data(data)
                elif isinstance(event, ClientRequest):
                    machine.send(self._decide(event))
                elif isinstance(event, TlsRequested):
                    await self._flush_negotiation(machine)
                    await self._start_tls()
                    machine.tls_established()
                else:
                    assert isinstance(event, NegotiationAborted)
            else:
                await self._flush_negotiation(machine)
                if machine.state is State.TRANSMISSION:
                    self._transport.unread(machine.trailing_data)
                    return machine.negotiated
                return None  # closed: aborted, or an export name we cannot serve

    async def _start_tls(self) -> None:
        """Wrap the connection in TLS; from here on, every byte goes through it."""
        assert self.server.tls is not None
        stream = trio.SSLStream(self._stream, self.server.tls.context, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as error:
            raise ConnectionLost(f"TLS handshake failed: {error.__cause__ or error}") from None
        self._stream = stream
        self._transport = Transport.over_stream(stream)
        self._log(logging.DEBUG, "tls", "TLS established")

    async def _flush_negotiation(self, machine: ServerNegotiation) -> None:
        outgoing = machine.data_to_send()
        if outgoing:
            await self._transport.send(outgoing)

    def _decide(self, request: ClientRequest) -> ServerDecision:
        """The server's answer to one option: what exports exist and who may use them."""
        export = self.server.export
        if isinstance(request, ExportListRequested):
            return ExportList((ExportListing(export.name, export.description),))
        if isinstance(request, MetaContextsRequested):
            refusal = self._refusal(request.export_name)
            if refusal:
                return refusal
            names = match_meta_contexts(request.queries, [BASE_ALLOCATION], not request.select)
            context_id = BASE_ALLOCATION_ID if request.select else 0
            return MetaContextsGranted(tuple((context_id, name) for name in names))
        assert isinstance(request, ExportInfoRequested | ExportNameChosen)
        return self._refusal(request.name) or ExportDetails(
            name=export.name,
            size=self.device.size,
            transmission_flags=export.transmission_flags,
            description=export.description,
            block_size=BlockSize(MINIMUM_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD),
        )

    def _refusal(self, name: str) -> OptionRefused | None:
        export = self.server.export
        if name not in (export.name, ""):
            return OptionRefused(
                OptionReplyType.ERR_UNKNOWN,
                f"no export named {name!r}; this server exports {export.name!r}",
            )
        if self.device.stopped_by is not None:
            return OptionRefused(
                OptionReplyType.ERR_POLICY,
                f"export stopped after a verification failure: {self.device.stopped_by.summary()}",
            )
        if self.server.stopping.is_set():
            return OptionRefused(OptionReplyType.ERR_SHUTDOWN, "server is shutting down")
        return None

    # --- Transmission -----------------------------------------------------------------

    async def _transmit(self, session: Negotiated) -> None:
        async with trio.open_nursery() as handlers:
            watching = trio.CancelScope()
            handlers.start_soon(self._stop_reading_when_told, watching)
            writing = trio.CancelScope()
            handlers.start_soon(self._write_replies, writing)
            try:
                await self._receive_requests(session, handlers)
            finally:
                watching.cancel()
                writing.cancel()
                handlers.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
                with trio.CancelScope(shield=True) as last_replies:
                    last_replies.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
                    with contextlib.suppress(trio.BrokenResourceError,
                                             trio.ClosedResourceError, OSError):
                        await self._send_replies()

    async def _stop_reading_when_told(self, watching: trio.CancelScope) -> None:
        """Wake the wait for the next request when the export stops (mismatch) or
        the server is stopping; `_next_header` then decides what comes next. A reply
        being sent is never cancelled."""
        with watching:
            async with trio.open_nursery() as race:
                for event in (self.device.stopped, self.server.stopping):
                    race.start_soon(_wait_then_cancel, event, race.cancel_scope)
            if self._waiting is not None:
                self._waiting.cancel()

    async def _next_header(self) -> bytes | None:
        """The next request header; None at end of stream or when reading must stop.

        After a mismatch stopped the export nothing more is served. When the server
        is stopping, requests the client has already sent are still served (they
        are in flight from its side), and the connection closes once it goes quiet.
        """
        size = REQUEST_HEADER.size
        while not self.device.stopped.is_set():
            if self._transport.buffered >= size:
                return await self._transport.receive_header(size)
            # About to wait for the client: first send every reply that is ready.
            await self._send_replies()
            if self.server.stopping.is_set():
                with trio.move_on_after(DRAIN_IDLE_SECONDS):
                    return await self._transport.receive_header(size)
                return None
            try:
                with trio.CancelScope() as self._waiting:
                    return await self._transport.receive_header(size)
            finally:
                self._waiting = None
        return None

    async def _receive_requests(self, session: Negotiated, handlers: trio.Nursery) -> None:
        inline = self.device.runs_inline
        while True:
            header = await self._next_header()
            if header is None:
                return
            request = parse_request(header)
            command = request.command
            if command == Command.DISC:
                return
            error = request_error(request, session)
            if error:
                if command == Command.WRITE:
                    await self._transport.discard(request.length)
                self._queue_reply(error_reply(request.cookie, error, session.structured_replies,
                                              f"request refused: {error.name}"))
                continue
            charge = 2 * request.length if command == Command.READ else 0
            if command == Command.WRITE:
                charge = request.length
            charge = await self._memory.acquire(charge)
            payload: bytearray | None = None
            try:
                if command == Command.WRITE:
                    payload = bytearray(request.length)
                    await self._transport.receive_into(memoryview(payload))
                if inline and self._serves_inline(request):
                    # Children that never wait (page-cached files) are served right
                    # here: a task per small request would cost more than the request.
                    self._queue_reply(await self._answer(request, payload, session))
                    self._memory.release(charge)
                    if self._queued_bytes >= REPLY_BATCH_BYTES:
                        await self._send_replies()
                    continue
            except BaseException:
                self._memory.release(charge)
                raise
            try:
                self._in_flight.acquire_nowait()  # acquire() would yield every time
            except trio.WouldBlock:
                await self._in_flight.acquire()
            handlers.start_soon(self._serve, request, payload, charge)

    @staticmethod
    def _serves_inline(request: Request) -> bool:
        """Small requests that cannot wait: no FUA or FLUSH (fsync), and no big
        payload, whose send is better overlapped with the next request's reads."""
        if request.fua or request.command == Command.FLUSH:
            return False
        big = request.length > INLINE_MAX
        return not (big and request.command in (Command.READ, Command.WRITE))

    def _queue_reply(self, reply: bytes | bytearray) -> None:
        self._queued.append(reply)
        self._queued_bytes += len(reply)

    async def _write_replies(self, writing: trio.CancelScope) -> None:
        """Send what request tasks queued: when many finish in one scheduler tick,
        their replies leave in one write."""
        with writing:
            while True:
                await self._replies_waiting.wait()
                self._replies_waiting = trio.Event()
                await self._send_replies()

    async def _send_replies(self) -> None:
        """Send the queued replies in one write: one send per batch, not per reply."""
        if not self._queued:
            return
        data = self._queued[0] if len(self._queued) == 1 else b"".join(self._queued)
        self._queued = []
        self._queued_bytes = 0
        await self._send(data)

    async def _send(self, data: bytes | bytearray) -> None:
        async with self._send_lock:
            await self._transport.send(data)

    async def _serve(self, request: Request, payload: bytearray | None, charge: int) -> None:
        """A request that may wait (FUA, FLUSH, children that are not inline), in its
        own task so the requests behind it keep flowing."""
        session = self._session
        assert session is not None
        try:
            self._queue_reply(await self._answer(request, payload, session))
            if self._queued_bytes >= REPLY_BATCH_BYTES:
                await self._send_replies()  # big replies: send now, and hold memory until sent
            else:
                self._replies_waiting.set()
        finally:
            self._memory.release(charge)
            self._in_flight.release()

    async def _answer(self, request: Request, payload: bytearray | None,
                      session: Negotiated) -> bytes | bytearray:
        """The reply to a valid request, success or error."""
        try:
            return await self._perform(request, payload, session)
        except DeviceError as error:
            return error_reply(request.cookie, error.error, session.structured_replies,
                               str(error))
        except VerificationFailed as failure:
            finding = failure.finding
            return error_reply(request.cookie, Errno.EIO, session.structured_replies,
                               finding.client_message(), finding.error_offset)

    async def _perform(self, request: Request, payload: bytearray | None,
                       session: Negotiated) -> bytes | bytearray:
        """Run one valid request on the device; the successful reply."""
        command = request.command
        cookie = request.cookie
        origin = Origin(self.number, cookie)
        if command == Command.READ and request.length == 0:
            return none_chunk(cookie) if session.structured_replies else simple_reply(cookie)
        if command == Command.READ:
            headroom = read_reply_header_size(session.structured_replies)
            data = await self.device.read(request.offset, request.length, headroom)
            pack_read_reply_header(data, cookie, request.offset, request.length,
                                   session.structured_replies)
            return data
        if command == Command.WRITE:
            assert payload is not None
            await self.device.write(request.offset, payload, request.fua, origin)
        elif command == Command.WRITE_ZEROES:
            await self.device.write_zeroes(
                request.offset,
                request.length,
                may_trim=not request.flags & CommandFlag.NO_HOLE,
                fast=bool(request.flags & CommandFlag.FAST_ZERO),
                fua=request.fua,
                origin=origin,
            )
        elif command == Command.TRIM:
            await self.device.trim(request.offset, request.length, request.fua, origin)
        elif command == Command.FLUSH:
            await self.device.flush(origin)
        elif command == Command.CACHE:
            await self.device.cache(request.offset, request.length)
        elif command == Command.BLOCK_STATUS:
            return await self._block_status(request, session)
        return simple_reply(cookie)

    async def _block_status(self, request: Request, session: Negotiated) -> bytes:
        length = min(request.length, MAX_EXTENT_LENGTH)
        extents = await self.device.block_status(request.offset, length)
        if request.flags & CommandFlag.REQ_ONE:
            extents = extents[:1]
        descriptors = [(extent.length, int(extent.state)) for extent in extents]
        if not descriptors:
            # Nothing known (an empty range): say "allocated", always safe.
            descriptors = [(max(length, 1), 0)]
        context_id = session.meta_contexts[0][0]
        return block_status_chunk(request.cookie, context_id, descriptors)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group, for a one-line log message."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

