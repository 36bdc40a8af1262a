"""The NBD server: trio I/O around the sans-IO negotiation and the verified device."""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any

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
    MAX_PAYLOAD,
    MINIMUM_BLOCK_SIZE,
    PREFERRED_BLOCK_SIZE,
    Disconnect,
    EndOfStream,
    Negotiated,
    Request,
    RequestAnswered,
    ServerTransmission,
)

from .changes import Origin
from .device import DeviceError, Operation, VerificationFailed, VerifiedDevice
from .log import log_event
from .transport import ConnectionLost, Transport

# Per connection: requests in flight, and the bytes their buffers may hold until
# their replies are sent. A client that sends requests and never reads replies
# stalls here, bounded.
MAX_IN_FLIGHT = 64
# 128 MiB: two 32 MiB READs in flight (each holds a buffer per child). At 256 MiB the
# server peaked at 201 MiB RSS under 32 MiB requests at QD16 (scripts/bench).
MEMORY_BUDGET = 128 * 1024 * 1024
# A client must finish negotiating within this (a connection that never speaks
# must not hold resources forever; qemu-nbd's --handshake-limit is 10 s).
HANDSHAKE_TIMEOUT_SECONDS = 60.0
# Queued replies are sent once this much is waiting (or sooner, whenever the next
# step would wait).
REPLY_BATCH_BYTES = 256 * 1024
# A receiver that always finds bytes waiting still yields this often, so that the
# tasks sending child requests and completing replies are never starved.
FAIR_RECEIVES = 16
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


class RequestBudget:
    """What one connection's requests in flight may hold: a slot each, and the bytes
    of their buffers; `acquire` waits until both fit. One object for both, so a
    request takes and gives back its share in one call each (a trio.Semaphore beside
    a byte count cost four Python calls a request more)."""

    def __init__(self, slots: int, limit: int) -> None:
        self.limit = limit
        self._slots = slots
        self._free = limit
        self._waiting = 0
        self._lot = trio.lowlevel.ParkingLot()

    def try_acquire(self, amount: int) -> int | None:
        """A slot and the charge taken (capped at the limit), or None if either is
        not free now."""
        amount = min(amount, self.limit)
        if not self._slots or self._free < amount:
            return None
        self._slots -= 1
        self._free -= amount
        return amount

    async def acquire(self, amount: int) -> int:
        amount = min(amount, self.limit)
        while not self._slots or self._free < amount:
            self._waiting += 1
            try:
                await self._lot.park()
            finally:
                self._waiting -= 1
        self._slots -= 1
        self._free -= amount
        return amount

    def release(self, amount: int, slots: int) -> None:
        self._free += amount
        self._slots += slots
        if self._waiting:
            self._lot.unpark_all()


@dataclass(slots=True)
class _Unsent:
    """A batch of replies the kernel has not taken whole yet, and what it holds."""

    buffers: list[memoryview]
    charges: int
    slots: int


class ReplyOutput:
    """The one owner of a connection's outgoing replies: queued as requests finish,
    sent in batches (one writev per batch, not one send per reply: two sends per
    reply halve the IOPS), in one order.

    A batch goes straight to the kernel when it takes it (no task, no wait). What
    it does not take (a 1 MiB READ reply, a client slow to read) is left to this
    output's sender task, so the receiving task goes on to the next request's reads
    meanwhile. A request's memory charge and in-flight slot are given back once its
    reply has left, so a client that never reads replies cannot make the server
    hold more than the budget."""

    def __init__(self, transport: Transport, budget: RequestBudget) -> None:
        self._transport = transport
        self._budget = budget
        self._queued: list[bytes | bytearray] = []
        self._charges = 0  # memory held by the queued replies
        self._slots = 0  # in-flight slots held by them
        self.queued_bytes = 0
        self._unsent: deque[_Unsent] = deque()  # oldest first; the sender's work
        self._more_unsent = trio.Event()
        self._all_sent = trio.Event()
        self._all_sent.set()

    def queue(self, reply: bytes | bytearray, charge: int = 0, slot: bool = False) -> None:
        self._queued.append(reply)
        self.queued_bytes += len(reply)
        self._charges += charge
        self._slots += slot

    @property
    def full(self) -> bool:
        return self.queued_bytes >= REPLY_BATCH_BYTES

    def send(self) -> None:
        """Send everything queued, now if the kernel takes it, else behind what is
        still unsent; never waits."""
        if not self._queued:
            return
        batch = _Unsent([memoryview(reply) for reply in self._queued], self._charges,
                        self._slots)
        self._queued, self._charges, self._slots, self.queued_bytes = [], 0, 0, 0
        if not self._unsent:
            batch.buffers = self._transport.send_now(batch.buffers)
            if not batch.buffers:
                self._release(batch)
                return
            self._all_sent = trio.Event()
            self._more_unsent.set()
        self._unsent.append(batch)

    def _release(self, batch: _Unsent) -> None:
        self._budget.release(batch.charges, batch.slots)

    async def sent(self) -> None:
        """Until every reply handed to `send` has left."""
        await self._all_sent.wait()

    async def run_sender(self) -> None:
        """The task that sends what the kernel did not take at once (until cancelled)."""
        while True:
            await self._more_unsent.wait()
            self._more_unsent = trio.Event()
            await self._send_unsent()
            self._all_sent.set()

    async def _send_unsent(self) -> None:
        while self._unsent:
            batch = self._unsent[0]
            while batch.buffers:
                batch.buffers = await self._transport.send_more(batch.buffers)
            self._unsent.popleft()
            self._release(batch)

    async def send_all_now(self) -> None:
        """At the end, once the sender has stopped: whatever is unsent or queued."""
        if self._transport.cut_off:
            return  # a reply was cut off midway: another cannot follow it
        self.send()
        await self._send_unsent()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    mode: TlsMode
    context: ssl.SSLContext


class Server:
    def __init__(self, device: VerifiedDevice, export: ExportConfig,
                 tls: TlsConfig | None = None, extended_headers: bool = True) -> None:
        self.device = device
        self.export = export
        self.tls = tls
        #: Offer NBD extended headers (64-bit lengths) to clients that ask.
        self.extended_headers = extended_headers
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
            connections.start_soon(self.handle, stream)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it ends (also the entry point for
        in-process tests, with any trio stream)."""
        connection = Connection(self, stream, next(self._ids))
        try:
            await connection.run()
        finally:
            await stream.aclose()


class Connection:
    def __init__(self, server: Server, stream: trio.abc.Stream, number: int) -> None:
        self.server = server
        self.device = server.device
        self.number = number
        self._stream = stream
        # A plain socket is read and written directly; anything else (the memory
        # streams of in-process tests) through its stream methods.
        self._transport = (Transport.over_socket(stream.socket)
                           if isinstance(stream, trio.SocketStream)
                           else Transport.over_stream(stream))

    def _log(self, level: int, event: str, message: str, **fields: object) -> None:
        log_event(level, event, message, connection=self.number, **fields)

    async def run(self) -> None:
        self._log(logging.DEBUG, "connected", "client connected")
        try:
            negotiated = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_SECONDS):
                negotiated = await self._negotiate()
            if negotiated is None:
                self._log(logging.DEBUG, "no-session", "negotiation ended without an export")
            else:
                session, trailing = negotiated
                await Transmission(self, ServerTransmission(session, trailing)).run()
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

    async def _negotiate(self) -> tuple[Negotiated, bytes] | None:
        """The session, and the bytes that came after the handshake (first requests)."""
        tls = self.server.tls
        machine = ServerNegotiation(tls=tls.mode if tls else TlsMode.OFF,
                                    offer_extended_headers=self.server.extended_headers)
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
                    assert machine.negotiated is not None
                    return machine.negotiated, machine.trailing_data
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
        stopped = self.device.policy.refusal()
        if stopped is not None:
            return OptionRefused(OptionReplyType.ERR_POLICY, stopped)
        if self.server.stopping.is_set():
            return OptionRefused(OptionReplyType.ERR_SHUTDOWN, "server is shutting down")
        return None


class Transmission:
    """One connection's transmission phase: requests from the machine to the device,
    replies back, with no task per request.

    Every request starts on the device the moment it is parsed. Then the device's
    answer decides where it finishes (`_dispatch`, the one place that decides):
    - `ready` (page-cached files): right here, in the receiving task;
    - otherwise, READ and WRITE on an NBD child: in order, in one completer task
      per connection (their replies come back in about that order anyway);
    - `waits_long` (fsync, or waiting for an earlier overlapping request): a task
      of its own, so that it holds up nothing behind it.
    """

    def __init__(self, connection: Connection, machine: ServerTransmission) -> None:
        self.connection = connection
        self.server = connection.server
        self.device = connection.device
        self.machine = machine
        self.origin_connection = connection.number
        self._transport = connection._transport
        self._budget = RequestBudget(MAX_IN_FLIGHT, MEMORY_BUDGET)
        self.output = ReplyOutput(self._transport, self._budget)
        self._in_order: deque[tuple[Request, Operation[Any, Any], int]] = deque()
        self._more_in_order = trio.Event()
        self._waiting: trio.CancelScope | None = None  # the wait for the next request
        self._unyielding = 0  # receives in a row that found bytes without waiting
        self._tasks: trio.Nursery | None = None
        self._closing = False  # no more requests will come: finish and end

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as sending:
                sending.start_soon(self.output.run_sender)
                async with trio.open_nursery() as tasks:
                    self._tasks = tasks
                    watching = trio.CancelScope()
                    tasks.start_soon(self._stop_reading_when_told, watching)
                    tasks.start_soon(self._complete_in_order)
                    try:
                        await self._receive_requests()
                    finally:
                        # Requests in flight finish (bounded), then the connection closes.
                        watching.cancel()
                        self._closing = True
                        self._more_in_order.set()
                        tasks.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
                # Every request is answered: let the replies leave, then stop the sender.
                self.output.send()
                with trio.move_on_after(CLOSE_GRACE_SECONDS):
                    await self.output.sent()
                sending.cancel_scope.cancel()
        finally:
            self._abandon_in_order()
            with trio.CancelScope(shield=True) as last:
                last.deadline = trio.current_time() + CLOSE_GRACE_SECONDS
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         OSError):
                    await self.output.send_all_now()

    async def _stop_reading_when_told(self, watching: trio.CancelScope) -> None:
        """Wake the wait for the next request when the export stops (mismatch) or
        the server is stopping; `_receive_requests` then decides what comes next. A
        reply being sent is never cancelled."""
        with watching:
            async with trio.open_nursery() as race:
                for event in (self.device.policy.stopped, self.server.stopping):
                    race.start_soon(_wait_then_cancel, event, race.cancel_scope)
            if self._waiting is not None:
                self._waiting.cancel()

    async def _receive(self) -> bool:
        """Receive more request bytes; False when reading must stop.

        After a mismatch stopped the export nothing more is served. When the server
        is stopping, requests the client has already sent are still served (they
        are in flight from its side), and the connection closes once it goes quiet.
        """
        if self.device.policy.stopped.is_set():
            return False
        self.output.send()  # about to wait for the client: send what is ready
        machine = self.machine
        view = machine.receive_buffer()
        count = self._transport.receive_now(view)
        if count is not None and self._unyielding < FAIR_RECEIVES:
            # Bytes were there: no cancel scope, no trip through the scheduler.
            self._unyielding += 1
            machine.received(count)
            return True
        self._unyielding = 0
        if count is not None:
            machine.received(count)
            await trio.lowlevel.checkpoint()  # let the other tasks run now and then
            return True
        if self.server.stopping.is_set():
            with trio.move_on_after(DRAIN_IDLE_SECONDS):
                machine.received(await self._transport.receive_into(view))
                return True
            return False
        try:
            with trio.CancelScope() as self._waiting:
                machine.received(await self._transport.receive_into(view))
                return True
        finally:
            self._waiting = None
        return False

    async def _receive_requests(self) -> None:
        machine = self.machine
        while True:
            event = machine.next_event()
            if event is NEED_DATA:
                if not await self._receive():
                    break
            elif isinstance(event, Request):
                if self.device.policy.stopped.is_set():
                    break
                # A slot and the request's memory if free now (no coroutine: the usual case).
                charge = self._budget.try_acquire(_buffer_bytes(event))
                if charge is None:
                    charge = await self._reserve(event)
                self._dispatch(event, charge)
            elif isinstance(event, RequestAnswered):
                self.output.queue(event.reply)
            else:
                assert isinstance(event, Disconnect | EndOfStream)
                break
        # Replies that are ready leave now, not after the requests still in flight.
        self.output.send()

    def _dispatch(self, request: Request, charge: int) -> None:
        """Start a request on the device, and choose where it finishes."""
        operation = self._start(request)
        if operation.ready:
            self.output.queue(self._reply_now(request, operation), charge, slot=True)
            if self.output.full:
                self.output.send()
        elif operation.waits_long:
            assert self._tasks is not None
            self._tasks.start_soon(self._complete, request, operation, charge)
        else:
            self._in_order.append((request, operation, charge))
            self._more_in_order.set()

    async def _reserve(self, request: Request) -> int:
        """Wait for an in-flight slot and the request's memory: the client is ahead
        of its replies."""
        self.output.send()  # our own queued replies hold slots and memory: free them first
        return await self._budget.acquire(_buffer_bytes(request))

    def _start(self, request: Request) -> Operation[Any, Any]:
        device = self.device
        command = request.command
        if command == Command.READ:  # first, and before an Origin that only changes need
            return device.read(request.offset, request.length, self.machine.read_headroom)
        origin = Origin(self.origin_connection, request.cookie)
        if command == Command.WRITE:
            assert request.payload is not None
            return device.write(request.offset, request.payload, request.fua, origin)
        if command == Command.WRITE_ZEROES:
            return device.write_zeroes(
                request.offset, request.length,
                may_trim=not request.flags & CommandFlag.NO_HOLE,
                fast=bool(request.flags & CommandFlag.FAST_ZERO),
                fua=request.fua, origin=origin)
        if command == Command.TRIM:
            return device.trim(request.offset, request.length, request.fua, origin)
        if command == Command.FLUSH:
            return device.flush(origin)
        if command == Command.CACHE:
            return device.cache(request.offset, request.length)
        assert command == Command.BLOCK_STATUS
        return device.block_status(request.offset, self.machine.block_status_length(request))

    def _reply_now(self, request: Request, operation: Operation[Any, Any]) -> bytes | bytearray:
        """The reply to a `ready` request, finished in place: no coroutine, no wait."""
        try:
            result = operation.finish_now()
        except (DeviceError, VerificationFailed) as error:
            return self._failure(request, error)
        return self._success(request, result)

    async def _reply(self, request: Request, operation: Operation[Any, Any]) -> bytes | bytearray:
        """The reply to a started request, once it has finished."""
        try:
            result = await operation
        except (DeviceError, VerificationFailed) as error:
            return self._failure(request, error)
        return self._success(request, result)

    def _failure(self, request: Request, error: DeviceError | VerificationFailed) -> bytes:
        if isinstance(error, DeviceError):
            return self.machine.error_reply(request, error.error, str(error))
        finding = error.finding
        return self.machine.error_reply(request, Errno.EIO, finding.client_message(),
                                        finding.error_offset)

    def _success(self, request: Request, result: Any) -> bytes | bytearray:
        machine = self.machine
        command = request.command
        if command == Command.READ:
            return machine.read_reply(request, result)
        if command == Command.BLOCK_STATUS:
            return machine.block_status_reply(
                request, [(extent.length, int(extent.state)) for extent in result])
        return machine.done_reply(request)

    async def _complete(self, request: Request, operation: Operation[Any, Any],
                        charge: int) -> None:
        """Finish a request that was not ready when it started, and queue its reply."""
        self._queue_late(await self._reply(request, operation), charge)

    def _queue_late(self, reply: bytes | bytearray, charge: int) -> None:
        """Queue a reply that did not go out as its request started; send when
        nothing else is about to be ready to go with it."""
        output = self.output
        output.queue(reply, charge, slot=True)
        if output.full or not (self._in_order and self._in_order[0][1].ready):
            output.send()

    async def _complete_in_order(self) -> None:
        while True:
            while self._in_order:
                request, operation, charge = self._in_order.popleft()
                if operation.ready:  # its reply came in the batch just read: no coroutine
                    self._queue_late(self._reply_now(request, operation), charge)
                else:
                    await self._complete(request, operation, charge)
            if self._closing:
                return
            await self._more_in_order.wait()
            self._more_in_order = trio.Event()

    def _abandon_in_order(self) -> None:
        while self._in_order:
            _, operation, _ = self._in_order.popleft()
            operation.abandon()


def _buffer_bytes(request: Request) -> int:
    """The memory a request holds while in flight: a READ one buffer per child."""
    command = request.command
    return (2 * request.length if command == Command.READ
            else request.length if command == Command.WRITE else 0)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group, for a one-line log message."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

