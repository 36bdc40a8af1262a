"""Negotiation events: what the client asked for, and what the server answers.

The state machine in `negotiation` turns bytes into the `ClientRequest` events
below and turns the application's `ServerDecision` events back into bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .constants import OptionReplyType, TransmissionFlag


class NeedData(enum.Enum):
    """What `next_event()` returns when more bytes must arrive first."""

    NEED_DATA = "need-data"


NEED_DATA: Final = NeedData.NEED_DATA


class Event:
    """Base class of every negotiation event."""

    __slots__ = ()


# --- Client to server --------------------------------------------------------------


class ClientRequest(Event):
    """A client option the application must decide on."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ExportListRequested(ClientRequest):
    """NBD_OPT_LIST."""


@dataclass(frozen=True, slots=True)
class ExportInfoRequested(ClientRequest):
    """NBD_OPT_INFO (go=False) or NBD_OPT_GO (go=True)."""

    name: str
    info_types: tuple[int, ...]
    go: bool


@dataclass(frozen=True, slots=True)
class ExportNameChosen(ClientRequest):
    """NBD_OPT_EXPORT_NAME: accept with ExportDetails or the connection is closed."""

    name: str


@dataclass(frozen=True, slots=True)
class MetaContextsRequested(ClientRequest):
    """NBD_OPT_LIST_META_CONTEXT (select=False) or NBD_OPT_SET_META_CONTEXT."""

    export_name: str
    queries: tuple[str, ...]
    select: bool


@dataclass(frozen=True, slots=True)
class TlsRequested(Event):
    """NBD_OPT_STARTTLS was acknowledged: send the queued bytes, run the TLS
    handshake, then call `tls_established()` on the state machine."""


@dataclass(frozen=True, slots=True)
class NegotiationAborted(Event):
    """NBD_OPT_ABORT: the acknowledgement is queued; close after sending it."""


# --- Server to client --------------------------------------------------------------


class ServerDecision(Event):
    """The application's answer to the pending `ClientRequest`."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ExportListing:
    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class ExportList(ServerDecision):
    exports: tuple[ExportListing, ...]


@dataclass(frozen=True, slots=True)
class BlockSize:
    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class ExportDetails(ServerDecision):
    """Accepts NBD_OPT_INFO, NBD_OPT_GO or NBD_OPT_EXPORT_NAME for this export."""

    name: str
    size: int
    transmission_flags: TransmissionFlag
    description: str = ""
    block_size: BlockSize | None = None


@dataclass(frozen=True, slots=True)
class MetaContextsGranted(ServerDecision):
    contexts: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class OptionRefused(ServerDecision):
    error: OptionReplyType
    message: str = ""
