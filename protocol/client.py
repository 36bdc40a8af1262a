"""Client side of NBD, sans-IO: negotiation, then replies parsed into events.

nbdverify is a client of its children when a child is an NBD server (another
implementation under test, or a qemu-nbd we start for an image format).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from construct import ConstructError

from . import wire
from .buffers import ByteConversation, PayloadStream
from .constants import (
    ERROR_CHUNK_BIT,
    EXTENDED_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    Errno,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReplyType,
    ReplyFlag,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import NEED_DATA, BlockSize, NeedData
from .transmission import (
    BLOCK_DESCRIPTOR,
    BLOCK_STATUS_EXT_PREFIX,
    CHUNK_HEADER,
    CONTEXT_ID,
    ERROR_CHUNK_PREFIX,
    EXTENDED_BLOCK_DESCRIPTOR,
    EXTENDED_REPLY_HEADER,
    MAGIC,
    OFFSET,
    OFFSET_HOLE,
    SIMPLE_REPLY_HEADER,
)

GREETING_SIZE = wire.ServerGreeting.sizeof()
OPTION_REPLY_HEADER_SIZE = wire.OptionReplyHeader.sizeof()
# A server's option reply payload larger than this is a broken server.
MAX_OPTION_REPLY = 64 * 1024


class NegotiationRefused(ProtocolError):
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
    extended_headers: bool = False


class ClientState(enum.Enum):
    AWAIT_GREETING = "await-greeting"
    AWAIT_REPLY = "await-reply"  # an option is out; its replies are coming
    TRANSMISSION = "transmission"


class ClientNegotiation(ByteConversation):
    """Fixed newstyle: STRUCTURED_REPLY, SET_META_CONTEXT, then GO. Structured
    replies and metadata contexts are used when the server offers them."""

    def __init__(self, export_name: str = "", structured_replies: bool = True,
                 meta_contexts: Sequence[str] = (), extended_headers: bool = True) -> None:
        super().__init__()
        self.state = ClientState.AWAIT_GREETING
        self.export_name = export_name
        self._plan: list[Option] = []
        if structured_replies:
            # Extended headers where the server has them, else structured replies.
            self._plan.append(Option.EXTENDED_HEADERS if extended_headers
                              else Option.STRUCTURED_REPLY)
            if meta_contexts:
                self._plan.append(Option.SET_META_CONTEXT)
        self._plan.append(Option.GO)
        self._wanted_contexts = tuple(meta_contexts)
        self._pending: Option | None = None
        self._structured = False
        self._extended = False
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
        if option in (Option.STRUCTURED_REPLY, Option.EXTENDED_HEADERS):
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
            if option is Option.EXTENDED_HEADERS:
                self._plan.insert(0, Option.STRUCTURED_REPLY)  # an older server
            elif option is Option.STRUCTURED_REPLY:
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
        if option is Option.EXTENDED_HEADERS:
            self._structured = self._extended = True
        if option is not Option.GO:
            self._send_next_option()
            return None
        if self._size is None:
            raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
        self.state = ClientState.TRANSMISSION
        return ExportOpened(self._size, self._flags, self._structured, dict(self._contexts),
                            self._block_size, self._extended)

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
class ReplyExtents:
    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]  # (length, flags)


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The last event for a cookie: error 0 on success. A READ's data is already
    in the buffer given to `expect`."""

    cookie: int
    error: int = 0
    message: str = ""


ReplyEvent = ReplyExtents | ReplyDone

# Plain ints for the per-reply tests (an IntFlag `&` costs ~1.5 us).
DONE = int(ReplyFlag.DONE)
OFFSET_DATA = int(ChunkType.OFFSET_DATA)
# No server sends a chunk bigger than its biggest READ reply plus its header.
MAX_CHUNK = 64 * 1024 * 1024 + OFFSET.size
# Metadata chunks (errors, block status) are buffered whole; bigger is hostile.
MAX_METADATA_CHUNK = 16 * 1024 * 1024


@dataclass(slots=True)
class _Expected:
    """A request in flight, as the reply parser needs it."""

    offset: int
    length: int
    is_read: bool
    target: memoryview | None  # a READ's buffer; None once abandoned
    error: ReplyDone | None = None  # the first error chunk
    covered: int = 0  # READ bytes the data and hole chunks so far described


class _Reading(enum.Enum):
    HEADER = "header"
    DATA = "data"  # a READ's data, into its buffer
    CHUNK = "chunk"  # a whole metadata chunk, buffered


class ReplyReader(PayloadStream):
    """The client's side of the transmission phase: the server's reply stream in,
    events out. Every request is announced with `expect` first (a simple reply to
    READ does not say how long its data is); data lands in the caller's buffer.
    Anything the spec does not allow raises RemoteProtocolError."""

    def __init__(self, structured: bool, initial: bytes | bytearray = b"",
                 extended: bool = False) -> None:
        super().__init__(initial)
        self.structured = structured or extended
        self.extended = extended
        self._expected: dict[int, _Expected] = {}
        self._state = _Reading.HEADER
        self._current: tuple[int, int, int, int] = (0, 0, 0, 0)  # flags, type, cookie, length
        # What to hand out once the payload being received is in (or right away).
        self._then: ReplyDone | None = None

    def expect(self, cookie: int, offset: int, length: int,
               target: memoryview | None = None) -> None:
        """A request is going out; a READ gives the buffer for its `length` bytes."""
        if target is not None and len(target) != length:
            raise LocalProtocolError(f"a {len(target)}-byte buffer for a {length}-byte READ")
        self._expected[cookie] = _Expected(offset, length, target is not None, target)

    def abandon(self, cookie: int) -> None:
        """The caller gave up waiting: the reply is still parsed, its data dropped."""
        expected = self._expected.get(cookie)
        if expected is not None:
            expected.target = None

    def next_event(self) -> ReplyEvent | NeedData:
        while True:
            state = self._state
            event: ReplyEvent | NeedData | None
            if state is _Reading.HEADER:
                event, self._then = self._then, None
                if event is None:
                    event = self._header()
            elif state is _Reading.DATA:
                if not self._sink_full():
                    event = NEED_DATA
                else:
                    self._state = _Reading.HEADER
                    continue
            else:
                event = self._metadata_chunk()
            if event is None:
                continue
            if event is NEED_DATA and self._ended:
                if state is _Reading.HEADER and not self._input.buffered:
                    raise RemoteProtocolError("server closed the connection")
                raise RemoteProtocolError(
                    f"server closed the connection inside a reply ({state.value})")
            return event

    def _take_expected(self, cookie: int) -> _Expected:
        expected = self._expected.get(cookie)
        if expected is None:
            raise RemoteProtocolError(f"reply for cookie {cookie}, which is not in flight")
        return expected

    def _header(self) -> ReplyEvent | NeedData | None:
        source = self._input
        available = source.end - source.start
        if available < 4:
            return NEED_DATA
        magic = MAGIC.unpack_from(source.data, source.start)[0]
        if self.extended:
            if magic != EXTENDED_REPLY_MAGIC:
                raise RemoteProtocolError(
                    f"reply magic 0x{magic:08x} after extended headers were negotiated")
            if available < EXTENDED_REPLY_HEADER.size:
                return NEED_DATA
            _, flags, chunk_type, cookie, offset, length = EXTENDED_REPLY_HEADER.unpack_from(
                source.data, source.start)
            if self._take_expected(cookie).offset != offset:
                raise RemoteProtocolError(f"reply for cookie {cookie} names offset {offset}, "
                                          "not its request's")
            return self._chunk(flags, chunk_type, cookie, length, EXTENDED_REPLY_HEADER.size,
                               available)
        if magic == SIMPLE_REPLY_MAGIC:
            if available < SIMPLE_REPLY_HEADER.size:
                return NEED_DATA
            _, error, cookie = SIMPLE_REPLY_HEADER.unpack_from(source.data, source.start)
            source.consume(SIMPLE_REPLY_HEADER.size)
            expected = self._take_expected(cookie)
            if self.structured and expected.is_read:
                raise RemoteProtocolError("simple reply to READ after structured replies "
                                          "were negotiated")
            del self._expected[cookie]
            done = ReplyDone(cookie, error)
            if not expected.is_read or error:
                return done
            self._state, self._then = _Reading.DATA, done
            self._sink(expected.target, expected.length)
            return None
        if magic != STRUCTURED_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad reply magic 0x{magic:08x}")
        if not self.structured:
            raise RemoteProtocolError("structured reply that was not negotiated")
        if available < CHUNK_HEADER.size:
            return NEED_DATA
        _, flags, chunk_type, cookie, length = CHUNK_HEADER.unpack_from(source.data,
                                                                        source.start)
        return self._chunk(flags, chunk_type, cookie, length, CHUNK_HEADER.size, available)

    def _chunk(self, flags: int, chunk_type: int, cookie: int, length: int, header: int,
               available: int) -> NeedData | None:
        """A structured or extended chunk whose `header`-byte header is buffered."""
        source = self._input
        if chunk_type == OFFSET_DATA:
            return self._data_chunk(flags, cookie, length, header, available)
        if length > MAX_METADATA_CHUNK:
            raise RemoteProtocolError(f"reply chunk of {length} bytes")
        source.consume(header)
        self._take_expected(cookie)
        self._current = (flags, chunk_type, cookie, length)
        self._state = _Reading.CHUNK
        source.ensure(length)
        return None

    def _data_chunk(self, flags: int, cookie: int, length: int, header: int,
                    available: int) -> NeedData | None:
        """OFFSET_DATA: once its offset is here, the data goes straight to the buffer."""
        source = self._input
        if length <= OFFSET.size or length > MAX_CHUNK:
            raise RemoteProtocolError(f"OFFSET_DATA chunk of {length} bytes")
        if available < header + OFFSET.size:
            return NEED_DATA
        offset = OFFSET.unpack_from(source.data, source.start + header)[0]
        source.consume(header + OFFSET.size)
        expected = self._take_expected(cookie)
        size = length - OFFSET.size
        target = self._placement(expected, offset, size)
        self._state = _Reading.DATA
        self._then = self._finished(cookie) if flags & DONE else None
        self._sink(target, size)
        return None

    def _placement(self, expected: _Expected, offset: int, size: int) -> memoryview | None:
        """Where `size` bytes of reply data at device `offset` belong in the buffer."""
        start = offset - expected.offset
        if not expected.is_read or start < 0 or start + size > expected.length:
            raise RemoteProtocolError(
                f"read data at offset {offset} (+{size}) outside the request "
                f"({expected.offset} +{expected.length})")
        expected.covered += size
        if expected.target is None:
            return None
        return expected.target[start:start + size]

    def _finished(self, cookie: int) -> ReplyDone:
        expected = self._expected.pop(cookie)
        if expected.error is not None:
            return expected.error
        # Chunks must not overlap, so a successful READ is covered exactly once: a gap
        # would leave bytes the server never sent to be compared as if it had.
        if expected.covered != expected.length and expected.is_read:
            raise RemoteProtocolError(
                f"READ reply for cookie {cookie} described {expected.covered} of its "
                f"{expected.length} bytes")
        return ReplyDone(cookie)

    @staticmethod
    def _check_error_offset(expected: _Expected, body: memoryview, end: int,
                            length: int) -> None:
        """ERROR_OFFSET ends with the failing offset, which lies inside the request."""
        if length != end + OFFSET.size:
            raise RemoteProtocolError(f"ERROR_OFFSET chunk of {length} bytes for a "
                                      f"{end - ERROR_CHUNK_PREFIX.size}-byte message")
        offset = OFFSET.unpack_from(body, end)[0]
        if not expected.offset <= offset < expected.offset + expected.length:
            raise RemoteProtocolError(
                f"error offset {offset} outside the request "
                f"({expected.offset} +{expected.length})")

    def _metadata_chunk(self) -> ReplyEvent | NeedData | None:
        flags, chunk_type, cookie, length = self._current
        source = self._input
        if source.buffered < length:
            return NEED_DATA
        body = memoryview(source.data)[source.start:source.start + length]
        source.consume(length)
        self._state = _Reading.HEADER
        expected = self._expected[cookie]
        event: ReplyEvent | None = None
        try:
            if chunk_type == ChunkType.NONE:
                if length:
                    raise RemoteProtocolError(f"NONE chunk with {length} bytes")
            elif chunk_type == ChunkType.OFFSET_HOLE:
                offset, size = OFFSET_HOLE.unpack(body)
                target = self._placement(expected, offset, size)
                if target is not None:
                    target[:] = bytes(size)
            elif chunk_type == ChunkType.BLOCK_STATUS and not self.extended:
                if expected.is_read:
                    raise RemoteProtocolError("BLOCK_STATUS chunk in reply to a READ")
                if length < CONTEXT_ID.size + BLOCK_DESCRIPTOR.size or (
                        length - CONTEXT_ID.size) % BLOCK_DESCRIPTOR.size:
                    raise RemoteProtocolError(f"BLOCK_STATUS chunk of {length} bytes")
                context_id = CONTEXT_ID.unpack_from(body)[0]
                extents = tuple(BLOCK_DESCRIPTOR.iter_unpack(body[CONTEXT_ID.size:]))
                event = ReplyExtents(cookie, context_id, extents)
            elif chunk_type == ChunkType.BLOCK_STATUS_EXT and self.extended:
                if expected.is_read:
                    raise RemoteProtocolError("BLOCK_STATUS_EXT chunk in reply to a READ")
                prefix = BLOCK_STATUS_EXT_PREFIX.size
                count = (length - prefix) // EXTENDED_BLOCK_DESCRIPTOR.size
                context_id, announced = BLOCK_STATUS_EXT_PREFIX.unpack_from(body)
                if not count or announced != count or (
                        length != prefix + count * EXTENDED_BLOCK_DESCRIPTOR.size):
                    raise RemoteProtocolError(f"BLOCK_STATUS_EXT chunk of {length} bytes "
                                              f"announcing {announced} extents")
                extents = tuple(EXTENDED_BLOCK_DESCRIPTOR.iter_unpack(body[prefix:]))
                event = ReplyExtents(cookie, context_id, extents)
            elif chunk_type & ERROR_CHUNK_BIT:
                error, message_length = ERROR_CHUNK_PREFIX.unpack_from(body)
                end = ERROR_CHUNK_PREFIX.size + message_length
                if end > length:
                    raise RemoteProtocolError("error chunk message longer than the chunk")
                if chunk_type == ChunkType.ERROR_OFFSET:
                    self._check_error_offset(expected, body, end, length)
                message = bytes(body[ERROR_CHUNK_PREFIX.size:end]).decode("utf-8", "replace")
                if expected.error is None:
                    expected.error = ReplyDone(cookie, error or Errno.EIO, message)
            else:
                raise RemoteProtocolError(f"unknown chunk type {chunk_type}")
        except struct.error as error:
            raise RemoteProtocolError(f"malformed chunk type {chunk_type}: {error}") from None
        finally:
            body.release()
        if flags & DONE:
            done = self._finished(cookie)
            if event is None:
                return done
            self._then = done  # the extents first, then done
        return event
