"""Server side of fixed-newstyle negotiation as a sans-IO state machine.

Bytes go in through `receive_data`; `next_event` returns the next `ClientRequest`
the application must decide on (or NEED_DATA); the application answers with
`send(decision)`; `data_to_send` hands back the bytes to write. Options that need
no decision (STRUCTURED_REPLY, unknown options, malformed payloads) are answered
here, so every server built on this behaves the same.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import ClassVar

from construct import ConstructError

from . import wire
from .buffers import ByteConversation
from .constants import (
    BASE_ALLOCATION,
    MAX_OPTION_LENGTH,
    ClientFlag,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReplyType,
    TransmissionFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    ClientRequest,
    Event,
    ExportDetails,
    ExportInfoRequested,
    ExportList,
    ExportListRequested,
    ExportNameChosen,
    MetaContextsGranted,
    MetaContextsRequested,
    NeedData,
    NegotiationAborted,
    OptionRefused,
    ServerDecision,
    TlsRequested,
)
from .transmission import Negotiated, truncate_message


class State(enum.Enum):
    #: Greeting sent; waiting for the client's 32-bit flags.
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    #: Waiting for the next option.
    AWAIT_OPTION = "await-option"
    #: An option was handed to the application, which must `send` a decision.
    AWAIT_DECISION = "await-decision"
    #: STARTTLS was acknowledged; the application runs the TLS handshake.
    AWAIT_TLS = "await-tls"
    #: Negotiation is over; requests follow (see `negotiated`).
    TRANSMISSION = "transmission"
    #: Aborted or refused: send what is queued, then close.
    CLOSED = "closed"


# Which decisions answer which request. A decision not listed here is a
# LocalProtocolError.
ALLOWED_DECISIONS: dict[type[ClientRequest], tuple[type[ServerDecision], ...]] = {
    ExportListRequested: (ExportList, OptionRefused),
    ExportInfoRequested: (ExportDetails, OptionRefused),
    ExportNameChosen: (ExportDetails, OptionRefused),
    MetaContextsRequested: (MetaContextsGranted, OptionRefused),
}

SUPPORTED_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
OPTION_HEADER_SIZE = wire.OptionHeader.sizeof()


def match_meta_contexts(
    queries: Iterable[str], supported: Iterable[str], listing: bool
) -> list[str]:
    """The contexts a LIST or SET query names. `namespace:` alone is a wildcard when
    listing; unknown names are ignored, as the spec requires."""
    supported = list(supported)
    queries = list(queries)
    if listing and not queries:
        return supported
    chosen: list[str] = []
    for query in queries:
        if query in supported:
            matches = [query]
        elif listing and query.endswith(":"):
            matches = [name for name in supported if name.startswith(query)]
        else:
            matches = []
        chosen.extend(name for name in matches if name not in chosen)
    return chosen


class TlsMode(enum.Enum):
    #: STARTTLS is refused (NBD_REP_ERR_UNSUP).
    OFF = "off"
    #: Clients may upgrade with STARTTLS, or go on without TLS.
    ON = "on"
    #: Every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until TLS is up.
    REQUIRE = "require"


class ServerNegotiation(ByteConversation):
    def __init__(
        self,
        handshake_flags: HandshakeFlag = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
        max_option_length: int = MAX_OPTION_LENGTH,
        tls: TlsMode = TlsMode.OFF,
        offer_extended_headers: bool = True,
    ) -> None:
        super().__init__()
        self.state = State.AWAIT_CLIENT_FLAGS
        self.tls = tls
        self.tls_active = False
        self.handshake_flags = handshake_flags
        self.client_flags = ClientFlag(0)
        self.structured_replies = False
        self.offer_extended_headers = offer_extended_headers
        self.extended_headers = False
        self.negotiated: Negotiated | None = None
        self._max_option_length = max_option_length
        self._outgoing += wire.ServerGreeting.build({"handshake_flags": handshake_flags})
        self._pending: ClientRequest | None = None
        self._pending_option = 0
        self._skipping = 0  # bytes of an oversized option still to discard
        self._selected_contexts: tuple[str, tuple[tuple[int, str], ...]] = ("", ())

    # --- Bytes ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state in (State.TRANSMISSION, State.CLOSED, State.AWAIT_TLS):
            raise LocalProtocolError(f"no negotiation data expected in state {self.state}")
        super().receive_data(data)

    # --- Events out ----------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        while True:
            if self.state is State.AWAIT_CLIENT_FLAGS:
                if len(self._received) < 4:
                    return NEED_DATA
                self._receive_client_flags(self._take(4))
            elif self.state is State.AWAIT_OPTION:
                event = self._receive_option()
                if event is not None:
                    return event
            else:
                raise LocalProtocolError(f"next_event called in state {self.state}")

    def _fail(self, reason: str) -> RemoteProtocolError:
        self.state = State.CLOSED
        return RemoteProtocolError(reason)

    def _receive_client_flags(self, data: bytes) -> None:
        flags = wire.ClientFlags.parse(data).client_flags
        offered = ClientFlag(int(self.handshake_flags))
        # int(): ~ on an IntFlag only inverts the bits the enum defines.
        if flags & ~int(SUPPORTED_CLIENT_FLAGS & offered):
            raise self._fail(f"unknown or unoffered client flags 0x{flags:08x}")
        self.client_flags = ClientFlag(flags)
        self.state = State.AWAIT_OPTION

    def _receive_option(self) -> Event | NeedData | None:
        """One step of option parsing: an event, NEED_DATA, or None to keep going."""
        if self._skipping:
            dropped = min(self._skipping, len(self._received))
            del self._received[:dropped]
            self._skipping -= dropped
            if self._skipping:
                return NEED_DATA
            self._reply_error(OptionReplyType.ERR_TOO_BIG, "option payload too large")
            return None
        if len(self._received) < OPTION_HEADER_SIZE:
            return NEED_DATA
        try:
            header = wire.OptionHeader.parse(bytes(self._received[:OPTION_HEADER_SIZE]))
        except ConstructError:
            raise self._fail("bad option magic") from None
        fixed = self.client_flags & ClientFlag.FIXED_NEWSTYLE
        if not fixed and header.option != Option.EXPORT_NAME:
            raise self._fail(f"option {header.option} needs fixed newstyle")
        if header.option == Option.SET_META_CONTEXT:
            # The spec: SET replaces the selection "including when this command fails".
            self._selected_contexts = ("", ())
        if header.length > self._max_option_length:
            if header.option == Option.EXPORT_NAME:
                raise self._fail("export name too long")
            del self._received[:OPTION_HEADER_SIZE]
            self._pending_option = header.option
            self._skipping = header.length
            return None
        if len(self._received) < OPTION_HEADER_SIZE + header.length:
            return NEED_DATA
        del self._received[:OPTION_HEADER_SIZE]
        payload = self._take(header.length)
        self._pending_option = header.option
        return self._dispatch(header.option, payload)

    def _dispatch(self, option: int, payload: bytes) -> Event | None:
        try:
            known = Option(option)
        except ValueError:
            known = None
        handler = self._HANDLERS.get(known) if known is not None else None
        if (self.tls is TlsMode.REQUIRE and not self.tls_active
                and known not in (Option.STARTTLS, Option.ABORT)):
            if option == Option.EXPORT_NAME:
                raise self._fail("NBD_OPT_EXPORT_NAME before the required STARTTLS")
            self._reply_error(OptionReplyType.ERR_TLS_REQD, "TLS is required: use STARTTLS")
            return None
        if handler is None:
            self._reply_error(OptionReplyType.ERR_UNSUP, f"option {option} is not supported")
            return None
        try:
            event = handler(self, payload)
        except (ConstructError, UnicodeDecodeError, _InvalidOption) as error:
            if option == Option.EXPORT_NAME:
                raise self._fail("malformed export name") from None
            self._reply_error(OptionReplyType.ERR_INVALID, f"malformed option: {error}")
            return None
        if isinstance(event, ClientRequest):
            self._pending = event
            self.state = State.AWAIT_DECISION
        return event

    # --- Option handlers: payload in, event out (or a reply queued) ---------------

    def _on_export_name(self, payload: bytes) -> Event:
        if self.extended_headers:
            raise self._fail("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
        return ExportNameChosen(payload.decode("utf-8"))

    def _on_abort(self, payload: bytes) -> Event:
        self._reply(OptionReplyType.ACK)
        self.state = State.CLOSED
        return NegotiationAborted()

    def _on_list(self, payload: bytes) -> Event | None:
        if payload:
            raise _InvalidOption("NBD_OPT_LIST takes no data")
        return ExportListRequested()

    def _on_starttls(self, payload: bytes) -> Event | None:
        if self.tls is TlsMode.OFF:
            self._reply_error(OptionReplyType.ERR_UNSUP, "TLS is not enabled on this server")
            return None
        if self.tls_active:
            raise _InvalidOption("TLS is already active")
        if payload:
            raise _InvalidOption("NBD_OPT_STARTTLS takes no data")
        if self._received:
            raise self._fail("data sent after STARTTLS before its reply")
        self._reply(OptionReplyType.ACK)
        self.state = State.AWAIT_TLS
        return TlsRequested()

    def tls_established(self) -> None:
        """The TLS handshake succeeded: negotiation starts over inside it, with
        everything agreed before forgotten, as the spec requires."""
        if self.state is not State.AWAIT_TLS:
            raise LocalProtocolError(f"tls_established called in state {self.state}")
        self.tls_active = True
        self.structured_replies = False
        self.extended_headers = False
        self._selected_contexts = ("", ())
        self.state = State.AWAIT_OPTION

    def _on_info_or_go(self, payload: bytes) -> Event:
        request = wire.InfoRequest.parse(payload)
        name_length = len(request.name.encode("utf-8"))
        if 4 + name_length + 2 + 2 * len(request.info_types) != len(payload):
            raise _InvalidOption("length does not match the info requests")
        return ExportInfoRequested(
            request.name, tuple(request.info_types), go=self._pending_option == Option.GO
        )

    def _on_structured_reply(self, payload: bytes) -> None:
        if payload:
            raise _InvalidOption("NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended_headers:
            self._reply_error(OptionReplyType.ERR_EXT_HEADER_REQD,
                              "extended headers are in use; they take precedence")
            return
        self.structured_replies = True
        self._reply(OptionReplyType.ACK)

    def _on_extended_headers(self, payload: bytes) -> None:
        if not self.offer_extended_headers:
            self._reply_error(OptionReplyType.ERR_UNSUP, "extended headers are turned off")
            return
        if payload:
            raise _InvalidOption("NBD_OPT_EXTENDED_HEADERS takes no data")
        self.extended_headers = True
        self._reply(OptionReplyType.ACK)

    @property
    def chunked_replies(self) -> bool:
        """Replies are chunks (structured or extended): READ data, errors with text."""
        return self.structured_replies or self.extended_headers

    def _on_meta_context(self, payload: bytes) -> Event | None:
        if not self.chunked_replies:
            raise _InvalidOption("negotiate structured replies or extended headers first")
        request = wire.MetaContextRequest.parse(payload)
        expected = 4 + len(request.export_name.encode("utf-8")) + 4
        expected += sum(4 + len(query.encode("utf-8")) for query in request.queries)
        if expected != len(payload):
            raise _InvalidOption("length does not match the queries")
        return MetaContextsRequested(
            request.export_name,
            tuple(request.queries),
            select=self._pending_option == Option.SET_META_CONTEXT,
        )

    _HANDLERS: ClassVar[dict[Option, Callable[[ServerNegotiation, bytes], Event | None]]] = {
        Option.EXPORT_NAME: _on_export_name,
        Option.ABORT: _on_abort,
        Option.LIST: _on_list,
        Option.STARTTLS: _on_starttls,
        Option.INFO: _on_info_or_go,
        Option.GO: _on_info_or_go,
        Option.STRUCTURED_REPLY: _on_structured_reply,
        Option.EXTENDED_HEADERS: _on_extended_headers,
        Option.LIST_META_CONTEXT: _on_meta_context,
        Option.SET_META_CONTEXT: _on_meta_context,
    }

    # --- Decisions in ---------------------------------------------------------------

    def send(self, decision: ServerDecision) -> None:
        pending = self._pending
        if self.state is not State.AWAIT_DECISION or pending is None:
            raise LocalProtocolError(f"no client request is waiting for {decision!r}")
        if not isinstance(decision, ALLOWED_DECISIONS[type(pending)]):
            raise LocalProtocolError(f"{type(decision).__name__} does not answer {pending!r}")
        self._pending = None
        self.state = State.AWAIT_OPTION
        if isinstance(decision, OptionRefused):
            if isinstance(pending, ExportNameChosen):
                self.state = State.CLOSED  # EXPORT_NAME has no error reply: hang up
            else:
                self._reply_error(decision.error, decision.message)
        elif isinstance(decision, ExportList):
            for export in decision.exports:
                entry = wire.ServerEntry.build(
                    {"name": export.name, "description": export.description}
                )
                self._reply(OptionReplyType.SERVER, entry)
            self._reply(OptionReplyType.ACK)
        elif isinstance(decision, MetaContextsGranted):
            assert isinstance(pending, MetaContextsRequested)
            for context_id, name in decision.contexts:
                body = wire.MetaContextReply.build({"context_id": context_id, "name": name})
                self._reply(OptionReplyType.META_CONTEXT, body)
            self._reply(OptionReplyType.ACK)
            if pending.select:
                self._selected_contexts = (pending.export_name, decision.contexts)
        elif isinstance(pending, ExportNameChosen):
            assert isinstance(decision, ExportDetails)
            self._accept_export_name(decision, pending.name)
        else:
            assert isinstance(pending, ExportInfoRequested)
            assert isinstance(decision, ExportDetails)
            self._send_export_info(pending, decision)

    def _transmission_flags(self, details: ExportDetails) -> TransmissionFlag:
        flags = details.transmission_flags | TransmissionFlag.HAS_FLAGS
        if not self.chunked_replies:
            flags &= ~TransmissionFlag.SEND_DF
        return flags

    def _accept_export_name(self, details: ExportDetails, requested_name: str) -> None:
        reply = {"size": details.size, "transmission_flags": self._transmission_flags(details)}
        if self.client_flags & ClientFlag.NO_ZEROES:
            self._outgoing += wire.ExportNameReply.build(reply)
        else:
            self._outgoing += wire.ExportNameReplyWithZeroes.build(reply)
        self._enter_transmission(details, requested_name)

    def _send_export_info(self, request: ExportInfoRequested, details: ExportDetails) -> None:
        flags = self._transmission_flags(details)
        self._reply(
            OptionReplyType.INFO,
            wire.InfoExport.build({"size": details.size, "transmission_flags": flags}),
        )
        if InfoType.NAME in request.info_types:
            self._reply(OptionReplyType.INFO, wire.InfoName.build({"name": details.name}))
        if InfoType.DESCRIPTION in request.info_types and details.description:
            description = truncate_message(details.description, 4096).decode("utf-8")
            self._reply(
                OptionReplyType.INFO, wire.InfoDescription.build({"description": description})
            )
        if InfoType.BLOCK_SIZE in request.info_types and details.block_size is not None:
            size = details.block_size
            body = wire.InfoBlockSize.build(
                {"minimum": size.minimum, "preferred": size.preferred, "maximum": size.maximum}
            )
            self._reply(OptionReplyType.INFO, body)
        self._reply(OptionReplyType.ACK)
        if request.go:
            self._enter_transmission(details, request.name)

    def _enter_transmission(self, details: ExportDetails, requested_name: str) -> None:
        context_export, contexts = self._selected_contexts
        if context_export != requested_name:
            contexts = ()  # contexts were chosen for another export: none apply
        self.negotiated = Negotiated(
            export_size=details.size,
            transmission_flags=self._transmission_flags(details),
            structured_replies=self.chunked_replies,
            meta_contexts=contexts,
            extended_headers=self.extended_headers,
        )
        self.state = State.TRANSMISSION

    # --- Reply framing ---------------------------------------------------------------

    def _reply(self, reply_type: OptionReplyType, payload: bytes = b"") -> None:
        header = wire.OptionReplyHeader.build(
            {"option": self._pending_option, "reply_type": reply_type, "length": len(payload)}
        )
        self._outgoing += header + payload

    def _reply_error(self, reply_type: OptionReplyType, message: str) -> None:
        self._reply(reply_type, truncate_message(message))


class _InvalidOption(Exception):
    """An option payload that parses but breaks the spec's rules: NBD_REP_ERR_INVALID."""


__all__ = [
    "BASE_ALLOCATION",
    "NEED_DATA",
    "ServerNegotiation",
    "State",
    "match_meta_contexts",
]
