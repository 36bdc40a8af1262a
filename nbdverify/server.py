"""The NBD server: trio I/O around the sans-IO negotiation and the verified device."""

from __future__ import annotations

import itertools
import logging
import ssl
from dataclasses import dataclass

import trio

from nbdverify_protocol.constants import (
    BASE_ALLOCATION,
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
    Negotiated,
    ServerTransmission,
)

from .device import VerifiedDevice
from .log import log_event
from .transmission import CLOSE_GRACE_SECONDS, Transmission
from .transport import ConnectionLost, Transport

# A client must finish negotiating within this (a connection that never speaks
# must not hold resources forever; qemu-nbd's --handshake-limit is 10 s).
HANDSHAKE_TIMEOUT_SECONDS = 60.0
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
                await Transmission(self.device, ServerTransmission(session, trailing),
                                   self._transport, self.number, self.server.stopping).run()
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


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group, for a one-line log message."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


