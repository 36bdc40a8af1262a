"""Every NBD wire structure, described once with construct.

This module is the written spec in code: negotiation parses and builds with it
directly, and the per-request fast path in `headers` is tested byte for byte
against the definitions here. All integers are big-endian.
"""

from __future__ import annotations

from construct import (
    Bytes,
    Const,
    GreedyBytes,
    GreedyRange,
    GreedyString,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
)

from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    InfoType,
)

# --- Handshake -------------------------------------------------------------------

ServerGreeting = Struct(
    "magic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)

ClientFlags = Struct("client_flags" / Int32ub)

# --- Options (client to server) --------------------------------------------------

OptionHeader = Struct(
    "magic" / Const(IHAVEOPT, Int64ub),
    "option" / Int32ub,
    "length" / Int32ub,
)

# NBD_OPT_INFO and NBD_OPT_GO
InfoRequest = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "info_types" / PrefixedArray(Int16ub, Int16ub),
)

# NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT
MetaContextRequest = Struct(
    "export_name" / PascalString(Int32ub, "utf8"),
    "queries" / PrefixedArray(Int32ub, PascalString(Int32ub, "utf8")),
)

# --- Option replies (server to client) -------------------------------------------

OptionReplyHeader = Struct(
    "magic" / Const(OPTION_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "reply_type" / Int32ub,
    "length" / Int32ub,
)

# NBD_REP_SERVER: the name's length field is part of the payload.
ServerEntry = Struct(
    "name" / PascalString(Int32ub, "utf8"),
    "description" / GreedyString("utf8"),
)

InfoExport = Struct(
    "info_type" / Const(InfoType.EXPORT, Int16ub),
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
)
InfoName = Struct(
    "info_type" / Const(InfoType.NAME, Int16ub),
    "name" / GreedyString("utf8"),
)
InfoDescription = Struct(
    "info_type" / Const(InfoType.DESCRIPTION, Int16ub),
    "description" / GreedyString("utf8"),
)
InfoBlockSize = Struct(
    "info_type" / Const(InfoType.BLOCK_SIZE, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)

MetaContextReply = Struct(
    "context_id" / Int32ub,
    "name" / GreedyString("utf8"),
)

OptionErrorMessage = GreedyString("utf8")

# Reply to NBD_OPT_EXPORT_NAME: no reply header, then transmission begins.
ExportNameReply = Struct(
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
)
ExportNameReplyWithZeroes = Struct(
    "size" / Int64ub,
    "transmission_flags" / Int16ub,
    "zeroes" / Const(bytes(124), Bytes(124)),
)

# --- Transmission ----------------------------------------------------------------

Request = Struct(
    "magic" / Const(REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)

# With extended headers: the length is 64 bits (a payload's with PAYLOAD_LEN, else
# the effect length).
ExtendedRequest = Struct(
    "magic" / Const(EXTENDED_REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)

SimpleReply = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "cookie" / Int64ub,
)

ChunkHeader = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "length" / Int32ub,
)

# With extended headers every reply is one of these; `offset` echoes the request's.
ExtendedReplyHeader = Struct(
    "magic" / Const(EXTENDED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)

OffsetDataChunk = Struct(
    "offset" / Int64ub,
    "data" / GreedyBytes,
)

OffsetHoleChunk = Struct(
    "offset" / Int64ub,
    "hole_size" / Int32ub,
)

ErrorChunk = Struct(
    "error" / Int32ub,
    "message" / PascalString(Int16ub, "utf8"),
)

ErrorOffsetChunk = Struct(
    "error" / Int32ub,
    "message" / PascalString(Int16ub, "utf8"),
    "offset" / Int64ub,
)

BlockDescriptor = Struct(
    "length" / Int32ub,
    "status_flags" / Int32ub,
)

BlockStatusChunk = Struct(
    "context_id" / Int32ub,
    "descriptors" / GreedyRange(BlockDescriptor),
)

ExtendedBlockDescriptor = Struct(
    "length" / Int64ub,
    "status_flags" / Int64ub,
)

BlockStatusExtChunk = Struct(
    "context_id" / Int32ub,
    "descriptors" / PrefixedArray(Int32ub, ExtendedBlockDescriptor),
)
