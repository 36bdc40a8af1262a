"""Client side of NBD, sans-IO: negotiation, then replies parsed into events.

nbdverify is a client of its children when a child is an NBD server (another
implementation under test, or a qemu-nbd we start for an image format).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from construct import ConstructError

from . import wire
from .buffers import ByteConversation
from .constants import (
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReplyType,
    ReplyFlag,
    TransmissionFlag,
)
from .errors import RemoteProtocolError
from .events import NEED_DATA, BlockSize, NeedData

GREETING_SIZE = wire.ServerGreeting.sizeof()
OPTION_REPLY_HEADER_SIZE = wire.OptionReplyHeader.sizeof()
# A server's option reply payload larger than this is a broken server.
MAX_OPTION_REPLY = 64 * 1024


class NegotiationRefused(Exception):
    """The server answered an option we cannot do without with an error."""

    def __init__(self, option: Option, reply_type: int, message: str) -> None:
        try:
            name = OptionReplyType(reply_type).name
        except ValueError:
            name = str(reply_type)
        super().__init__(f"server refused {option.name}: {name} {message}".rstrip())
        self.reply_type = reply_type


@dataclass(frozen=True, slots=True)
class ExportOpened:
    """Negotiation finished; requests may be sent."""

    size: int
    transmission_flags: TransmissionFlag
    structured_replies: bool
    meta_contexts: dict[str, int] = field(default_factory=dict)
    block_size: BlockSize | None = None


class ClientState(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    AWAIT_REPLY = "await-reply"  # an option is out; its replies are coming
    TRANSMISSION = "transmission"


class ClientNegotiation(ByteConversation):
    """Fixed newstyle: STRUCTURED_REPLY, SET_META_CONTEXT, then GO. Structured
    replies and metadata contexts are used when the server offers them."""

    def __init__(self, export_name: str = "", structured_replies: bool = True,
                 meta_contexts: Sequence[str] = ()) -> None:
        super().__init__()
        self.state = ClientState.AWAIT_GREETING
        self.export_name = export_name
        self._plan: list[Option] = []
        if structured_replies:
            self._plan.append(Option.STRUCTURED_REPLY)
            if meta_contexts:
                self._plan.append(Option.SET_META_CONTEXT)
        self._plan.append(Option.GO)
        self._wanted_contexts = tuple(meta_contexts)
        self._pending: Option | None = None
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._size: int | None = None
        self._flags = TransmissionFlag(0)
        self._block_size: BlockSize | None = None

    def next_event(self) -> ExportOpened | NeedData:
        while True:
            if self.state is ClientState.AWAIT_GREETING:
                if len(self._received) < GREETING_SIZE:
                    return NEED_DATA
                self._receive_greeting(self._take(GREETING_SIZE))
            elif self.state is ClientState.AWAIT_REPLY:
                if len(self._received) < OPTION_REPLY_HEADER_SIZE:
                    return NEED_DATA
                header = wire.OptionReplyHeader.parse(
                    bytes(self._received[:OPTION_REPLY_HEADER_SIZE]))
                if header.length > MAX_OPTION_REPLY:
                    raise RemoteProtocolError(f"option reply of {header.length} bytes")
                if len(self._received) < OPTION_REPLY_HEADER_SIZE + header.length:
                    return NEED_DATA
                del self._received[:OPTION_REPLY_HEADER_SIZE]
                payload = self._take(header.length)
                if header.option != self._pending:
                    raise RemoteProtocolError(f"reply to option {header.option}, "
                                              f"expected {self._pending}")
                opened = self._receive_reply(header.reply_type, payload)
                if opened is not None:
                    return opened
            else:
                return NEED_DATA

    def _receive_greeting(self, data: bytes) -> None:
        try:
            greeting = wire.ServerGreeting.parse(data)
        except ConstructError:
            raise RemoteProtocolError("not an NBD newstyle server") from None
        offered = HandshakeFlag(greeting.handshake_flags)
        if not offered & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("server does not speak fixed newstyle")
        flags = ClientFlag.FIXED_NEWSTYLE
        if offered & HandshakeFlag.NO_ZEROES:
            flags |= ClientFlag.NO_ZEROES
        self._outgoing += wire.ClientFlags.build({"client_flags": flags})
        self._send_next_option()

    def _send_next_option(self) -> None:
        option = self._plan.pop(0)
        if option is Option.STRUCTURED_REPLY:
            payload = b""
        elif option is Option.SET_META_CONTEXT:
            payload = wire.MetaContextRequest.build(
                {"export_name": self.export_name, "queries": list(self._wanted_contexts)})
        else:
            payload = wire.InfoRequest.build(
                {"name": self.export_name, "info_types": [InfoType.BLOCK_SIZE]})
        self._outgoing += wire.OptionHeader.build({"option": option, "length": len(payload)})
        self._outgoing += payload
        self._pending = option
        self.state = ClientState.AWAIT_REPLY

    def _receive_reply(self, reply_type: int, payload: bytes) -> ExportOpened | None:
        option = self._pending
        assert option is not None
        if reply_type & 2**31:
            message = payload.decode("utf-8", "replace")
            if option is Option.GO:
                raise NegotiationRefused(option, reply_type, message)
            if option is Option.STRUCTURED_REPLY:
                self._plan = [Option.GO]  # no structured replies: no contexts either
            self._send_next_option()
            return None
        try:
            if reply_type == OptionReplyType.META_CONTEXT:
                context = wire.MetaContextReply.parse(payload)
                self._contexts[context.name] = context.context_id
            elif reply_type == OptionReplyType.INFO:
                self._receive_info(payload)
            elif reply_type != OptionReplyType.ACK:
                raise RemoteProtocolError(f"unexpected reply type {reply_type} to {option.name}")
        except (ConstructError, UnicodeDecodeError) as error:
            raise RemoteProtocolError(f"malformed reply to {option.name}: {error}") from None
        if reply_type != OptionReplyType.ACK:
            return None
        if option is Option.STRUCTURED_REPLY:
            self._structured = True
        if option is not Option.GO:
            self._send_next_option()
            return None
        if self._size is None:
            raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
        self.state = ClientState.TRANSMISSION
        return ExportOpened(self._size, self._flags, self._structured, dict(self._contexts),
                            self._block_size)

    def _receive_info(self, payload: bytes) -> None:
        info_type = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else -1
        if info_type == InfoType.EXPORT:
            info = wire.InfoExport.parse(payload)
            self._size = info.size
            self._flags = TransmissionFlag(info.transmission_flags)
        elif info_type == InfoType.BLOCK_SIZE:
            info = wire.InfoBlockSize.parse(payload)
            self._block_size = BlockSize(info.minimum, info.preferred, info.maximum)


# --- Replies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyData:
    cookie: int
    offset: int  # absolute device offset of `data`
    data: bytes


@dataclass(frozen=True, slots=True)
class ReplyHole:
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ReplyExtents:
    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]  # (length, flags)


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The last event for a cookie: error 0 on success."""

    cookie: int
    error: int = 0
    message: str = ""


ReplyEvent = ReplyData | ReplyHole | ReplyExtents | ReplyDone

SIMPLE_REST = struct.Struct(">IQ")
MAX_CHUNK = 64 * 1024 * 1024 + 64
CHUNK_REST = struct.Struct(">HHQI")


class ReplyReader:
    """Turns the server's reply stream into events. A simple reply to READ does not
    say how long its data is, so reads are announced with `expect_read`."""

    def __init__(self) -> None:
        self._received = bytearray()
        self._events: deque[ReplyEvent] = deque()
        self._reads: dict[int, tuple[int, int]] = {}  # cookie -> (offset, length)
        self._errors: dict[int, ReplyDone] = {}  # first error chunk of each cookie

    def expect_read(self, cookie: int, offset: int, length: int) -> None:
        self._reads[cookie] = (offset, length)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._received += data

    def next_event(self) -> ReplyEvent | NeedData:
        while not self._events:
            if not self._parse_one():
                return NEED_DATA
        return self._events.popleft()

    def _parse_one(self) -> bool:
        """Parse one whole reply or chunk into events; False if it is not all here."""
        if len(self._received) < 4:
            return False
        magic = struct.unpack_from(">I", self._received)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple_reply()
        if magic == STRUCTURED_REPLY_MAGIC:
            return self._chunk()
        raise RemoteProtocolError(f"bad reply magic 0x{magic:08x}")

    def _simple_reply(self) -> bool:
        if len(self._received) < 16:
            return False
        error, cookie = SIMPLE_REST.unpack_from(self._received, 4)
        offset, length = self._reads.get(cookie, (0, 0))
        if error:
            length = 0
        if len(self._received) < 16 + length:
            return False
        if length:
            self._events.append(ReplyData(cookie, offset, bytes(self._received[16:16 + length])))
        del self._received[:16 + length]
        self._reads.pop(cookie, None)
        self._events.append(ReplyDone(cookie, error))
        return True

    def _chunk(self) -> bool:
        if len(self._received) < 20:
            return False
        flags, chunk_type, cookie, length = CHUNK_REST.unpack_from(self._received, 4)
        if length > MAX_CHUNK:
            raise RemoteProtocolError(f"reply chunk of {length} bytes")
        if len(self._received) < 20 + length:
            return False
        body = bytes(self._received[20:20 + length])
        del self._received[:20 + length]
        self._chunk_event(chunk_type, cookie, body)
        if flags & ReplyFlag.DONE:
            self._reads.pop(cookie, None)
            self._events.append(self._errors.pop(cookie, ReplyDone(cookie)))
        return True

    def _chunk_event(self, chunk_type: int, cookie: int, body: bytes) -> None:
        try:
            if chunk_type == ChunkType.NONE:
                return
            if chunk_type == ChunkType.OFFSET_DATA:
                if len(body) < 9:
                    raise RemoteProtocolError("OFFSET_DATA chunk too short")
                offset = struct.unpack_from(">Q", body)[0]
                self._events.append(ReplyData(cookie, offset, body[8:]))
            elif chunk_type == ChunkType.OFFSET_HOLE:
                offset, size = struct.unpack(">QI", body)
                self._events.append(ReplyHole(cookie, offset, size))
            elif chunk_type == ChunkType.BLOCK_STATUS:
                context_id = struct.unpack_from(">I", body)[0]
                extents = tuple(struct.iter_unpack(">II", body[4:]))
                self._events.append(ReplyExtents(cookie, context_id, extents))
            elif chunk_type & 0x8000:
                error, message_length = struct.unpack_from(">IH", body)
                message = body[6:6 + message_length].decode("utf-8", "replace")
                self._errors.setdefault(cookie, ReplyDone(cookie, error or 5, message))
            else:
                raise RemoteProtocolError(f"unknown chunk type {chunk_type}")
        except struct.error as error:
            raise RemoteProtocolError(f"malformed chunk type {chunk_type}: {error}") from None
