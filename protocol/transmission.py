"""The transmission phase, sans-IO: request bytes in, request events out, replies
framed as the negotiated session requires.

`ServerTransmission` is the one place that knows the transmission rules: which
requests are refused before they reach the device (and that a refused WRITE's
payload is drained), simple or structured framing, which context id a
block-status reply carries, what a zero-length READ gets, what DISC means.

construct is 25-120x slower than `struct` on a 28-byte header, so this path uses
precompiled `struct.Struct` objects; tests/test_wire.py proves they produce and
accept the same bytes as the construct definitions in `wire`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from .buffers import PayloadStream
from .constants import (
    ALLOWED_COMMAND_FLAGS,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_ERROR_MESSAGE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import NEED_DATA, NeedData

REQUEST_HEADER = struct.Struct(">IHHQQI")
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
# A chunk header followed by the 64-bit offset that starts OFFSET_DATA and ERROR_OFFSET.
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
ERROR_CHUNK_PREFIX = struct.Struct(">IH")
BLOCK_DESCRIPTOR = struct.Struct(">II")
CONTEXT_ID = struct.Struct(">I")
OFFSET = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")
MAGIC = struct.Struct(">I")
EXTENDED_REQUEST_HEADER = struct.Struct(">IHHQQQ")
EXTENDED_REPLY_HEADER = struct.Struct(">IHHQQQ")
BLOCK_STATUS_EXT_PREFIX = struct.Struct(">II")
EXTENDED_BLOCK_DESCRIPTOR = struct.Struct(">QQ")

# The biggest WRITE payload or READ reply served. QEMU and the kernel send at most
# 32 MiB; nbdkit and libnbd allow 64 MiB, and third-party suites send ~48 MiB.
MAX_PAYLOAD = 64 * 1024 * 1024
#: A plain int: an IntFlag `&` builds a flag object (~1 us).
_FUA = int(CommandFlag.FUA)
PREFERRED_BLOCK_SIZE = 4096
MINIMUM_BLOCK_SIZE = 1
# Extents are 32-bit on the wire; longer TRIM/WRITE_ZEROES/BLOCK_STATUS ranges are
# fine, but a single descriptor must not overflow.
MAX_EXTENT_LENGTH = 2**32 - 2**20


class Request(NamedTuple):
    """One transmission request. As an event of `ServerTransmission` it is valid
    for the session, and a WRITE carries its payload. A NamedTuple, immutable like
    the other events: one is built for every request, and a frozen dataclass takes
    0.73 us to build, a NamedTuple 0.24 us."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    payload: bytearray | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)


def build_request(command: int, offset: int, length: int, cookie: int, flags: int = 0) -> bytes:
    return REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def build_extended_request(command: int, offset: int, length: int, cookie: int,
                           flags: int = 0) -> bytes:
    """A 32-byte request; a WRITE's payload length is marked with PAYLOAD_LEN."""
    if command == Command.WRITE:
        flags |= PAYLOAD_LEN
    return EXTENDED_REQUEST_HEADER.pack(EXTENDED_REQUEST_MAGIC, flags, command, cookie,
                                        offset, length)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the handshake settled, which decides how requests are checked and answered."""

    export_size: int
    transmission_flags: TransmissionFlag
    #: Replies are chunks (negotiated structured replies, or extended headers).
    structured_replies: bool
    meta_contexts: tuple[tuple[int, str], ...] = ()
    #: 32-byte request and reply headers with 64-bit lengths.
    extended_headers: bool = False


# Module constants, not class attributes: mypyc compiles no computed class attribute.
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_DISC = int(Command.DISC)
_FLUSH = int(Command.FLUSH)
_BLOCK_STATUS = int(Command.BLOCK_STATUS)
_CHANGES = frozenset(int(c) for c in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES))
_ENOSPC_ON = frozenset((int(Command.WRITE), int(Command.WRITE_ZEROES)))


class RequestCheck:
    """The errors a request must get before it touches the device, for one session.

    The enum flag arithmetic is done once, here: the per-request checks below are
    plain int operations (an IntFlag `&` costs ~1.5 us, four of them a request).
    Offsets are Python integers, so `offset + length` cannot overflow; a request
    near 2**64 is simply beyond the end.
    """

    def __init__(self, session: Negotiated) -> None:
        flags = session.transmission_flags
        fua = int(CommandFlag.FUA) if flags & TransmissionFlag.SEND_FUA else 0
        forbidden = 0
        if not flags & TransmissionFlag.SEND_FAST_ZERO:
            forbidden |= int(CommandFlag.FAST_ZERO)
        if not session.structured_replies:
            forbidden |= int(CommandFlag.DF)
        # The spec: once SEND_FUA is advertised, FUA is valid on every command.
        self._allowed = {int(command): (int(allowed) | fua) & ~forbidden
                         for command, allowed in ALLOWED_COMMAND_FLAGS.items()}
        self._readonly = bool(flags & TransmissionFlag.READ_ONLY)
        self._has_contexts = bool(session.meta_contexts)
        self._size = session.export_size

    def __call__(self, request: Request) -> Errno:
        command = request.command
        allowed = self._allowed.get(command)
        if allowed is None or request.flags & ~allowed:  # unknown bits count too
            return Errno.EINVAL
        if command in (_DISC, _FLUSH):
            return Errno.OK
        if self._readonly and command in _CHANGES:
            return Errno.EPERM
        if command == _BLOCK_STATUS and not (self._has_contexts and request.length):
            return Errno.EINVAL
        if command in (_READ, _WRITE) and request.length > MAX_PAYLOAD:
            return Errno.EOVERFLOW if command == _READ else Errno.EINVAL
        if request.offset + request.length > self._size:
            return Errno.ENOSPC if command in _ENOSPC_ON else Errno.EINVAL
        return Errno.OK


PAYLOAD_LEN = int(CommandFlag.PAYLOAD_LEN)

# --- Replies -------------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def none_chunk(cookie: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.NONE, cookie, 0)


def truncate_message(message: str, limit: int = MAX_ERROR_MESSAGE) -> bytes:
    """UTF-8 encode, cut to `limit` bytes without splitting a character."""
    return message.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def error_chunk(cookie: int, error: int, message: str = "", offset: int | None = None) -> bytes:
    chunk_type, body = error_body(error, message, offset)
    header = CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, chunk_type, cookie, len(body)
    )
    return header + body


def error_reply(
    cookie: int, error: int, structured: bool, message: str = "", offset: int | None = None
) -> bytes:
    """An error for any command: a structured error chunk where negotiated (READ
    must not get a simple reply then), a simple reply otherwise."""
    if structured:
        return error_chunk(cookie, error, message, offset)
    return simple_reply(cookie, error)


def block_status_chunk(cookie: int, context_id: int, extents: Iterable[tuple[int, int]]) -> bytes:
    body = bytearray(CONTEXT_ID.pack(context_id))
    for length, status in extents:
        body += BLOCK_DESCRIPTOR.pack(length, status)
    header = CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.BLOCK_STATUS, cookie, len(body)
    )
    return header + body


def extended_chunk(flags: int, chunk_type: int, cookie: int, offset: int,
                   body: bytes = b"") -> bytes:
    return EXTENDED_REPLY_HEADER.pack(EXTENDED_REPLY_MAGIC, flags, chunk_type, cookie, offset,
                                      len(body)) + body


def error_body(error: int, message: str = "", offset: int | None = None) -> tuple[int, bytes]:
    """An error chunk's type and payload."""
    text = truncate_message(message)
    body = ERROR_CHUNK_PREFIX.pack(error, len(text)) + text
    if offset is None:
        return ChunkType.ERROR, body
    return ChunkType.ERROR_OFFSET, body + OFFSET.pack(offset)


class Framing:
    """How replies look in one session; chosen once, when transmission starts."""

    #: Bytes left in front of READ data for its reply header.
    read_headroom: ClassVar[int]

    def pack_read_header(self, buffer: bytearray, request: Request) -> None:
        """Write the header into the room left in front of the data, so that the whole
        reply goes out in one send."""
        raise NotImplementedError

    def done(self, request: Request) -> bytes:
        """Success for a command that returns no data."""
        raise NotImplementedError

    def empty_read(self, request: Request) -> bytes:
        """Success for a zero-length READ: where a READ may get the same reply as any
        other command. (A method, not `empty_read = done`: mypyc compiles no alias.)"""
        return self.done(request)

    def error(self, request: Request, error: int, message: str, offset: int | None) -> bytes:
        raise NotImplementedError

    def extents(self, request: Request, context_id: int,
                extents: Sequence[tuple[int, int]]) -> bytes:
        raise NotImplementedError

    #: The longest extent one descriptor can carry.
    max_extent: ClassVar[int] = MAX_EXTENT_LENGTH


class SimpleFraming(Framing):
    """No structured replies: a 16-byte header, READ data after it, errors as numbers."""

    read_headroom: ClassVar[int] = SIMPLE_REPLY_HEADER.size

    def pack_read_header(self, buffer: bytearray, request: Request) -> None:
        SIMPLE_REPLY_HEADER.pack_into(buffer, 0, SIMPLE_REPLY_MAGIC, 0, request.cookie)

    def done(self, request: Request) -> bytes:
        return simple_reply(request.cookie)

    def error(self, request: Request, error: int, message: str, offset: int | None) -> bytes:
        return simple_reply(request.cookie, error)

    def extents(self, request: Request, context_id: int,
                extents: Sequence[tuple[int, int]]) -> bytes:
        # BLOCK_STATUS needs a metadata context, which needs chunked replies.
        raise LocalProtocolError("no block status without structured replies")


class StructuredFraming(Framing):
    """Structured replies: READ data and errors in chunks; simple replies for the rest."""

    read_headroom: ClassVar[int] = OFFSET_DATA_HEADER.size

    def pack_read_header(self, buffer: bytearray, request: Request) -> None:
        OFFSET_DATA_HEADER.pack_into(buffer, 0, STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE,
                                     ChunkType.OFFSET_DATA, request.cookie,
                                     OFFSET.size + request.length, request.offset)

    def done(self, request: Request) -> bytes:
        return simple_reply(request.cookie)

    def empty_read(self, request: Request) -> bytes:
        return none_chunk(request.cookie)  # a READ must not get a simple reply now

    def error(self, request: Request, error: int, message: str, offset: int | None) -> bytes:
        return error_chunk(request.cookie, error, message, offset)

    def extents(self, request: Request, context_id: int,
                extents: Sequence[tuple[int, int]]) -> bytes:
        return block_status_chunk(request.cookie, context_id, extents)


class ExtendedFraming(Framing):
    """Extended headers: every reply a 32-byte chunk header echoing the request's
    offset; block status as 64-bit descriptors (BLOCK_STATUS_EXT)."""

    read_headroom: ClassVar[int] = EXTENDED_REPLY_HEADER.size + OFFSET.size
    max_extent: ClassVar[int] = 2**63

    def pack_read_header(self, buffer: bytearray, request: Request) -> None:
        EXTENDED_REPLY_HEADER.pack_into(
            buffer, 0, EXTENDED_REPLY_MAGIC, DONE, ChunkType.OFFSET_DATA, request.cookie,
            request.offset, OFFSET.size + request.length)
        OFFSET.pack_into(buffer, EXTENDED_REPLY_HEADER.size, request.offset)

    def done(self, request: Request) -> bytes:
        return extended_chunk(DONE, ChunkType.NONE, request.cookie, request.offset)

    def error(self, request: Request, error: int, message: str, offset: int | None) -> bytes:
        chunk_type, body = error_body(error, message, offset)
        return extended_chunk(DONE, chunk_type, request.cookie, request.offset, body)

    def extents(self, request: Request, context_id: int,
                extents: Sequence[tuple[int, int]]) -> bytes:
        body = bytearray(BLOCK_STATUS_EXT_PREFIX.pack(context_id, len(extents)))
        for length, status in extents:
            body += EXTENDED_BLOCK_DESCRIPTOR.pack(length, status)
        return extended_chunk(DONE, ChunkType.BLOCK_STATUS_EXT, request.cookie,
                              request.offset, bytes(body))


DONE = int(ReplyFlag.DONE)


def framing_for(session: Negotiated) -> Framing:
    if session.extended_headers:
        return ExtendedFraming()
    return StructuredFraming() if session.structured_replies else SimpleFraming()


# --- The server's transmission machine ----------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestAnswered:
    """A request the protocol answers by itself: refused before reaching the device
    (`error` says why; a WRITE's payload has been drained), or a zero-length READ.
    Send `reply` in its turn."""

    cookie: int
    command: int
    error: Errno
    reply: bytes


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish the requests in flight, then close. Nothing after it is read."""


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The client closed the connection between two requests."""


TransmissionEvent = Request | RequestAnswered | Disconnect | EndOfStream


class _Receiving(enum.Enum):
    HEADER = "header"
    PAYLOAD = "payload"  # a WRITE's payload, into its own buffer
    DISCARD = "discard"  # a refused WRITE's payload, dropped
    CLOSED = "closed"  # after DISC or end of stream


class ServerTransmission(PayloadStream):
    """The server's side of the transmission phase (h11's shape: bytes in, events
    out, replies as bytes). The I/O layer loops on::

        view = machine.receive_buffer(); count = recv_into(view); machine.received(count)

    and takes events with `next_event()` until it returns NEED_DATA.
    """

    def __init__(self, session: Negotiated, initial: bytes | bytearray = b"") -> None:
        super().__init__(initial)
        self.session = session
        self.framing = framing_for(session)
        self.extended = session.extended_headers
        self._header_format = EXTENDED_REQUEST_HEADER if self.extended else REQUEST_HEADER
        self._magic = EXTENDED_REQUEST_MAGIC if self.extended else REQUEST_MAGIC
        self._state = _Receiving.HEADER
        self._pending: Request | None = None  # the WRITE whose payload is arriving
        self._refused_with = Errno.OK
        self._check = RequestCheck(session)
        #: Bytes to leave in front of READ data for the reply header (see `read_reply`).
        self.read_headroom = self.framing.read_headroom

    @property
    def closed(self) -> bool:
        """DISC or end of stream was seen: nothing more is read."""
        return self._state is _Receiving.CLOSED

    def next_event(self) -> TransmissionEvent | NeedData:
        """The next request (or what happened instead); NEED_DATA when more bytes
        must arrive. Raises RemoteProtocolError when the stream breaks the spec."""
        state = self._state
        source = self._input
        if state is _Receiving.HEADER:
            header = self._header_format
            if source.end - source.start >= header.size:
                magic, flags, command, cookie, offset, length = header.unpack_from(
                    source.data, source.start)
                source.consume(header.size)
                if magic != self._magic:
                    raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
                return self._header(flags, command, cookie, offset, length)
        elif state is _Receiving.CLOSED:
            return EndOfStream() if self._ended else NEED_DATA
        elif self._sink_full():
            request = self._pending
            assert request is not None
            self._state, self._pending = _Receiving.HEADER, None
            if state is _Receiving.DISCARD:
                return self._answer_error(request, self._refused_with)
            return request
        if self._ended:
            if source.buffered or state is not _Receiving.HEADER:
                raise RemoteProtocolError(
                    f"connection closed inside a request (while reading its {state.value})")
            self._state = _Receiving.CLOSED
            return EndOfStream()
        return NEED_DATA

    def _header(self, flags: int, command: int, cookie: int, offset: int,
                length: int) -> TransmissionEvent | NeedData:
        """A request header arrived: refuse it, answer it, or wait for its payload."""
        if command == Command.DISC:
            self._state = _Receiving.CLOSED
            return Disconnect()
        if self.extended:
            # PAYLOAD_LEN marks a payload. The spec wants it on every WRITE, but QEMU
            # 10's client sends WRITE without it (seen here), and a WRITE's payload
            # is there all the same: so WRITE always has one.
            has_payload = command == Command.WRITE or bool(flags & PAYLOAD_LEN)
            payload = length if has_payload else 0
            if payload > MAX_PAYLOAD:  # the spec: disconnect rather than drain it
                raise RemoteProtocolError(f"request payload of {payload} bytes")
            request = Request(flags & ~PAYLOAD_LEN, command, cookie, offset, length)
            # No other command takes a payload here (no block-status filtering).
            misframed = command != Command.WRITE and has_payload
            error = Errno.EINVAL if misframed else self._check(request)
        else:
            payload = length if command == Command.WRITE else 0
            request = Request(flags, command, cookie, offset, length)
            error = self._check(request)
        if payload or (command == Command.WRITE and not error):
            if error:
                self._state, self._pending = _Receiving.DISCARD, request
                self._refused_with = error
                self._sink(None, payload)
            else:
                data = bytearray(payload)
                self._state = _Receiving.PAYLOAD
                self._pending = Request(request.flags, command, cookie, offset, length, data)
                self._sink(memoryview(data), payload)
            return self.next_event()
        if error:
            return self._answer_error(request, error)
        if command == Command.READ and not length:
            return RequestAnswered(cookie, command, Errno.OK, self.framing.empty_read(request))
        return request

    def _answer_error(self, request: Request, error: Errno) -> RequestAnswered:
        reply = self.error_reply(request, error, f"request refused: {error.name}")
        return RequestAnswered(request.cookie, request.command, error, reply)

    # --- Replies -----------------------------------------------------------------

    def read_reply(self, request: Request, buffer: bytearray) -> bytearray:
        """The reply to a READ whose data sits in buffer[read_headroom:]: the header
        goes into the headroom, so data and header leave in one send, uncopied."""
        if len(buffer) != self.read_headroom + request.length:
            raise LocalProtocolError(
                f"READ reply of {len(buffer) - self.read_headroom} bytes for a "
                f"{request.length}-byte request")
        self.framing.pack_read_header(buffer, request)
        return buffer

    def done_reply(self, request: Request) -> bytes:
        """Success for any command but READ and BLOCK_STATUS."""
        return self.framing.done(request)

    def error_reply(self, request: Request, error: Errno, message: str = "",
                    offset: int | None = None) -> bytes:
        """Failure for any command; `offset` names the failing byte (chunked replies)."""
        return self.framing.error(request, error, message, offset)

    def block_status_length(self, request: Request) -> int:
        """How much of a BLOCK_STATUS request to look up: what one descriptor can
        carry at most (the client asks again for the rest)."""
        return min(request.length, self.framing.max_extent)

    def block_status_reply(self, request: Request,
                           extents: Sequence[tuple[int, int]]) -> bytes:
        """(length, flags) extents, as the negotiated context sees them: one with
        REQ_ONE; an empty answer becomes "allocated", which is always safe."""
        if request.flags & CommandFlag.REQ_ONE:
            extents = extents[:1]
        if not extents:
            extents = [(max(self.block_status_length(request), 1), 0)]
        context_id = self.session.meta_contexts[0][0]
        return self.framing.extents(request, context_id, extents)
