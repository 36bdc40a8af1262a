"""The per-request path: request headers in, replies out.

construct is 25-120x slower than `struct` on a 28-byte header, so this path uses
precompiled `struct.Struct` objects; tests/test_wire.py proves they produce and
accept the same bytes as the construct definitions in `wire`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .constants import (
    ALLOWED_COMMAND_FLAGS,
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
from .errors import RemoteProtocolError

REQUEST_HEADER = struct.Struct(">IHHQQI")
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
# A chunk header followed by the 64-bit offset that starts OFFSET_DATA and ERROR_OFFSET.
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
ERROR_CHUNK_PREFIX = struct.Struct(">IH")
BLOCK_DESCRIPTOR = struct.Struct(">II")
CONTEXT_ID = struct.Struct(">I")
OFFSET = struct.Struct(">Q")

# The biggest WRITE payload or READ reply served. QEMU and the kernel send at most
# 32 MiB; nbdkit and libnbd allow 64 MiB, and third-party suites send ~48 MiB.
MAX_PAYLOAD = 64 * 1024 * 1024
PREFERRED_BLOCK_SIZE = 4096
MINIMUM_BLOCK_SIZE = 1
# Extents are 32-bit on the wire; longer TRIM/WRITE_ZEROES/BLOCK_STATUS ranges are
# fine, but a single descriptor must not overflow.
MAX_EXTENT_LENGTH = 2**32 - 2**20


@dataclass(frozen=True, slots=True)
class Request:
    """One transmission request, as received (type and flags not yet validated)."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def fua(self) -> bool:
        return bool(self.flags & CommandFlag.FUA)


def parse_request(header: bytes | bytearray | memoryview) -> Request:
    magic, flags, command, cookie, offset, length = REQUEST_HEADER.unpack(header)
    if magic != REQUEST_MAGIC:
        raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
    return Request(flags, command, cookie, offset, length)


def build_request(command: int, offset: int, length: int, cookie: int, flags: int = 0) -> bytes:
    return REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the handshake settled, which decides how requests are checked and answered."""

    export_size: int
    transmission_flags: TransmissionFlag
    structured_replies: bool
    meta_contexts: tuple[tuple[int, str], ...] = ()


def request_error(request: Request, session: Negotiated) -> Errno:
    """The error a request must get before it touches the device, or Errno.OK.

    Offsets are Python integers, so `offset + length` cannot overflow; a request
    near 2**64 is simply beyond the end.
    """
    try:
        command = Command(request.command)
    except ValueError:
        return Errno.EINVAL
    flags = session.transmission_flags
    allowed = int(ALLOWED_COMMAND_FLAGS[command])
    if flags & TransmissionFlag.SEND_FUA:
        allowed |= int(CommandFlag.FUA)  # the spec: then FUA is valid on every command
    if request.flags & ~allowed:  # int, so unknown bits count too
        return Errno.EINVAL
    if request.flags & CommandFlag.FAST_ZERO and not flags & TransmissionFlag.SEND_FAST_ZERO:
        return Errno.EINVAL
    if request.flags & CommandFlag.DF and not session.structured_replies:
        return Errno.EINVAL
    if command in (Command.DISC, Command.FLUSH):
        return Errno.OK
    if command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES) and (
        flags & TransmissionFlag.READ_ONLY
    ):
        return Errno.EPERM
    if command is Command.BLOCK_STATUS and (not session.meta_contexts or not request.length):
        return Errno.EINVAL
    if command in (Command.READ, Command.WRITE) and request.length > MAX_PAYLOAD:
        return Errno.EOVERFLOW if command is Command.READ else Errno.EINVAL
    if request.end > session.export_size:
        if command in (Command.WRITE, Command.WRITE_ZEROES):
            return Errno.ENOSPC
        return Errno.EINVAL
    return Errno.OK


# --- Replies -------------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def read_reply_header_size(structured: bool) -> int:
    """Bytes reserved in front of READ data for the reply header."""
    return OFFSET_DATA_HEADER.size if structured else SIMPLE_REPLY_HEADER.size


def pack_read_reply_header(
    buffer: bytearray, cookie: int, offset: int, length: int, structured: bool
) -> None:
    """Write the header into the room left in front of the data, so that the whole
    reply goes out in one send."""
    if structured:
        OFFSET_DATA_HEADER.pack_into(
            buffer,
            0,
            STRUCTURED_REPLY_MAGIC,
            ReplyFlag.DONE,
            ChunkType.OFFSET_DATA,
            cookie,
            OFFSET.size + length,
            offset,
        )
    else:
        SIMPLE_REPLY_HEADER.pack_into(buffer, 0, SIMPLE_REPLY_MAGIC, 0, cookie)


def none_chunk(cookie: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.NONE, cookie, 0)


def truncate_message(message: str, limit: int = MAX_ERROR_MESSAGE) -> bytes:
    """UTF-8 encode, cut to `limit` bytes without splitting a character."""
    return message.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def error_chunk(cookie: int, error: int, message: str = "", offset: int | None = None) -> bytes:
    text = truncate_message(message)
    body = ERROR_CHUNK_PREFIX.pack(error, len(text)) + text
    chunk_type = ChunkType.ERROR
    if offset is not None:
        body += OFFSET.pack(offset)
        chunk_type = ChunkType.ERROR_OFFSET
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
