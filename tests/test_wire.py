"""The construct definitions in `wire` round-trip, match the spec's bytes, and agree
byte for byte with the precompiled `struct` fast path in `transmission`."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from construct import ConstructError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nbdverify_protocol import wire
from nbdverify_protocol.constants import (
    IHAVEOPT,
    MAX_ERROR_MESSAGE,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    InfoType,
    ReplyFlag,
    TransmissionFlag,
)
from nbdverify_protocol.errors import RemoteProtocolError
from nbdverify_protocol.transmission import (
    BLOCK_DESCRIPTOR,
    CHUNK_HEADER,
    OFFSET_DATA_HEADER,
    REQUEST_HEADER,
    SIMPLE_REPLY_HEADER,
    Negotiated,
    Request,
    ServerTransmission,
    SimpleFraming,
    StructuredFraming,
    block_status_chunk,
    build_request,
    error_chunk,
    error_reply,
    none_chunk,
    simple_reply,
    truncate_message,
)


def uint(bits: int) -> st.SearchStrategy[int]:
    """Any unsigned integer of `bits` bits, with the edges always in play."""
    top = 2**bits - 1
    return st.one_of(st.sampled_from([0, 1, top - 1, top]), st.integers(0, top))


u16 = uint(16)
u32 = uint(32)
u64 = uint(64)
# Strings the spec allows on the wire (any UTF-8, kept short so builds stay fast).
names = st.text(max_size=40)
# Edges come from `uint`; a few dozen random values per structure are plenty and
# keep the three protocol test files within a few seconds.
ROUND_TRIP = settings(max_examples=30, deadline=None)


def fields(container: Any, *names: str) -> dict[str, Any]:
    """The named fields of a parsed construct Container (it also carries `_io`)."""
    return {name: container[name] for name in names}


def chunk_body(data: bytes) -> tuple[Any, bytes]:
    """Split a structured reply chunk into its parsed header and its payload."""
    header = wire.ChunkHeader.parse(data[: CHUNK_HEADER.size])
    body = data[CHUNK_HEADER.size :]
    assert header.length == len(body)
    return header, body


# --- Known bytes from the spec ---------------------------------------------------------


def test_server_greeting_known_bytes() -> None:
    built = wire.ServerGreeting.build({"handshake_flags": 3})
    assert built == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert wire.ServerGreeting.sizeof() == 18


def test_magic_numbers_spell_the_spec_strings() -> None:
    assert NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert OPTION_REPLY_MAGIC == 0x0003E889045565A9
    assert REQUEST_MAGIC == 0x25609513
    assert SIMPLE_REPLY_MAGIC == 0x67446698
    assert STRUCTURED_REPLY_MAGIC == 0x668E33EF


def test_option_header_known_bytes() -> None:
    # NBD_OPT_GO (7) with a 10-byte payload.
    built = wire.OptionHeader.build({"option": 7, "length": 10})
    assert built == b"IHAVEOPT" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x0a"


def test_option_reply_header_known_bytes() -> None:
    # NBD_REP_ACK (1) to NBD_OPT_STRUCTURED_REPLY (8).
    built = wire.OptionReplyHeader.build({"option": 8, "reply_type": 1, "length": 0})
    assert built == bytes.fromhex("0003e889045565a9000000080000000100000000")


def test_request_known_bytes() -> None:
    # NBD_CMD_READ of 512 bytes at offset 1024, cookie 0x0102030405060708, FUA.
    built = wire.Request.build(
        {"flags": 1, "type": 0, "cookie": 0x0102030405060708, "offset": 1024, "length": 512}
    )
    assert built == bytes.fromhex("25609513000100000102030405060708000000000000040000000200")
    assert len(built) == 28


def test_simple_reply_known_bytes() -> None:
    assert wire.SimpleReply.build({"error": 22, "cookie": 5}) == bytes.fromhex(
        "67446698000000160000000000000005"
    )


def test_chunk_header_known_bytes() -> None:
    built = wire.ChunkHeader.build({"flags": 1, "type": 0, "cookie": 9, "length": 0})
    assert built == bytes.fromhex("668e33ef00010000000000000000000900000000")


def test_info_request_known_bytes() -> None:
    built = wire.InfoRequest.build({"name": "ab", "info_types": [3]})
    assert built == b"\x00\x00\x00\x02ab" + b"\x00\x01" + b"\x00\x03"


def test_export_name_reply_with_zeroes_is_134_bytes() -> None:
    built = wire.ExportNameReplyWithZeroes.build({"size": 2**20, "transmission_flags": 0x0101})
    assert built == (2**20).to_bytes(8, "big") + b"\x01\x01" + bytes(124)
    assert len(wire.ExportNameReply.build({"size": 0, "transmission_flags": 1})) == 10


# --- Round trips ---------------------------------------------------------------------


@ROUND_TRIP
@given(u16)
def test_server_greeting_round_trip(flags: int) -> None:
    built = wire.ServerGreeting.build({"handshake_flags": flags})
    assert built[:16] == b"NBDMAGICIHAVEOPT"
    assert wire.ServerGreeting.parse(built).handshake_flags == flags


@ROUND_TRIP
@given(u32)
def test_client_flags_round_trip(flags: int) -> None:
    built = wire.ClientFlags.build({"client_flags": flags})
    assert built == flags.to_bytes(4, "big")
    assert wire.ClientFlags.parse(built).client_flags == flags


@ROUND_TRIP
@given(u32, u32)
def test_option_header_round_trip(option: int, length: int) -> None:
    value = {"option": option, "length": length}
    built = wire.OptionHeader.build(value)
    assert len(built) == 16
    assert fields(wire.OptionHeader.parse(built), "option", "length") == value


@ROUND_TRIP
@given(names, st.lists(u16, max_size=20))
def test_info_request_round_trip(name: str, info_types: list[int]) -> None:
    built = wire.InfoRequest.build({"name": name, "info_types": info_types})
    encoded = name.encode("utf-8")
    assert len(built) == 4 + len(encoded) + 2 + 2 * len(info_types)
    parsed = wire.InfoRequest.parse(built)
    assert parsed.name == name
    assert list(parsed.info_types) == info_types


@ROUND_TRIP
@given(names, st.lists(names, max_size=8))
def test_meta_context_request_round_trip(export_name: str, queries: list[str]) -> None:
    built = wire.MetaContextRequest.build({"export_name": export_name, "queries": queries})
    expected_length = 4 + len(export_name.encode()) + 4 + sum(4 + len(q.encode()) for q in queries)
    assert len(built) == expected_length
    parsed = wire.MetaContextRequest.parse(built)
    assert parsed.export_name == export_name
    assert list(parsed.queries) == queries


@ROUND_TRIP
@given(u32, u32, u32)
def test_option_reply_header_round_trip(option: int, reply_type: int, length: int) -> None:
    value = {"option": option, "reply_type": reply_type, "length": length}
    built = wire.OptionReplyHeader.build(value)
    assert len(built) == 20
    assert fields(wire.OptionReplyHeader.parse(built), *value) == value


@ROUND_TRIP
@given(names, names)
def test_server_entry_round_trip(name: str, description: str) -> None:
    built = wire.ServerEntry.build({"name": name, "description": description})
    encoded = name.encode("utf-8")
    # The name's own length field is part of the NBD_REP_SERVER payload.
    assert built[:4] == len(encoded).to_bytes(4, "big")
    assert built[4 : 4 + len(encoded)] == encoded
    assert built[4 + len(encoded) :] == description.encode("utf-8")
    parsed = wire.ServerEntry.parse(built)
    assert (parsed.name, parsed.description) == (name, description)


@ROUND_TRIP
@given(u64, u16)
def test_info_export_round_trip(size: int, flags: int) -> None:
    built = wire.InfoExport.build({"size": size, "transmission_flags": flags})
    assert built == b"\x00\x00" + size.to_bytes(8, "big") + flags.to_bytes(2, "big")
    parsed = wire.InfoExport.parse(built)
    assert (parsed.info_type, parsed.size, parsed.transmission_flags) == (0, size, flags)


@ROUND_TRIP
@given(names)
def test_info_name_and_description_round_trip(text: str) -> None:
    name = wire.InfoName.build({"name": text})
    assert name == b"\x00\x01" + text.encode("utf-8")
    assert wire.InfoName.parse(name).name == text
    description = wire.InfoDescription.build({"description": text})
    assert description == b"\x00\x02" + text.encode("utf-8")
    assert wire.InfoDescription.parse(description).description == text


@ROUND_TRIP
@given(u32, u32, u32)
def test_info_block_size_round_trip(minimum: int, preferred: int, maximum: int) -> None:
    value = {"minimum": minimum, "preferred": preferred, "maximum": maximum}
    built = wire.InfoBlockSize.build(value)
    assert len(built) == 14
    assert built[:2] == b"\x00\x03"
    parsed = wire.InfoBlockSize.parse(built)
    assert parsed.info_type == InfoType.BLOCK_SIZE
    assert fields(parsed, *value) == value


@pytest.mark.parametrize(
    ("structure", "data"),
    [
        (wire.InfoExport, b"\x00\x01" + bytes(10)),
        (wire.InfoName, b"\x00\x00name"),
        (wire.InfoDescription, b"\x00\x01text"),
        (wire.InfoBlockSize, b"\x00\x00" + bytes(12)),
        (wire.ServerGreeting, b"NBDMAGICIHAVEOPX\x00\x03"),
        (wire.OptionHeader, b"IHAVEOPX" + bytes(8)),
        (wire.OptionReplyHeader, bytes(20)),
        (wire.Request, bytes(28)),
        (wire.SimpleReply, bytes(16)),
        (wire.ChunkHeader, bytes(20)),
        (wire.ExportNameReplyWithZeroes, bytes(10) + b"\x01" + bytes(123)),
    ],
)
def test_constants_are_checked_on_parse(structure: Any, data: bytes) -> None:
    with pytest.raises(ConstructError):
        structure.parse(data)


@ROUND_TRIP
@given(u32, names)
def test_meta_context_reply_round_trip(context_id: int, name: str) -> None:
    built = wire.MetaContextReply.build({"context_id": context_id, "name": name})
    assert built == context_id.to_bytes(4, "big") + name.encode("utf-8")
    parsed = wire.MetaContextReply.parse(built)
    assert (parsed.context_id, parsed.name) == (context_id, name)


@ROUND_TRIP
@given(names)
def test_option_error_message_round_trip(message: str) -> None:
    built = wire.OptionErrorMessage.build(message)
    assert built == message.encode("utf-8")
    assert wire.OptionErrorMessage.parse(built) == message


@ROUND_TRIP
@given(u64, u16)
def test_export_name_replies_round_trip(size: int, flags: int) -> None:
    value = {"size": size, "transmission_flags": flags}
    short = wire.ExportNameReply.build(value)
    long = wire.ExportNameReplyWithZeroes.build(value)
    assert long == short + bytes(124)
    assert fields(wire.ExportNameReply.parse(short), *value) == value
    assert fields(wire.ExportNameReplyWithZeroes.parse(long), *value) == value


@ROUND_TRIP
@given(u16, u16, u64, u64, u32)
def test_request_round_trip(flags: int, kind: int, cookie: int, offset: int, length: int) -> None:
    value = {"flags": flags, "type": kind, "cookie": cookie, "offset": offset, "length": length}
    built = wire.Request.build(value)
    assert fields(wire.Request.parse(built), *value) == value


@ROUND_TRIP
@given(u32, u64)
def test_simple_reply_round_trip(error: int, cookie: int) -> None:
    built = wire.SimpleReply.build({"error": error, "cookie": cookie})
    assert len(built) == 16
    assert fields(wire.SimpleReply.parse(built), "error", "cookie") == {
        "error": error,
        "cookie": cookie,
    }


@ROUND_TRIP
@given(u16, u16, u64, u32)
def test_chunk_header_round_trip(flags: int, kind: int, cookie: int, length: int) -> None:
    value = {"flags": flags, "type": kind, "cookie": cookie, "length": length}
    built = wire.ChunkHeader.build(value)
    assert len(built) == 20
    assert fields(wire.ChunkHeader.parse(built), *value) == value


@ROUND_TRIP
@given(u64, st.binary(max_size=64))
def test_offset_data_chunk_round_trip(offset: int, data: bytes) -> None:
    built = wire.OffsetDataChunk.build({"offset": offset, "data": data})
    assert built == offset.to_bytes(8, "big") + data
    parsed = wire.OffsetDataChunk.parse(built)
    assert (parsed.offset, parsed.data) == (offset, data)


@ROUND_TRIP
@given(u64, u32)
def test_offset_hole_chunk_round_trip(offset: int, hole_size: int) -> None:
    built = wire.OffsetHoleChunk.build({"offset": offset, "hole_size": hole_size})
    assert len(built) == 12
    parsed = wire.OffsetHoleChunk.parse(built)
    assert (parsed.offset, parsed.hole_size) == (offset, hole_size)


@ROUND_TRIP
@given(u32, names, u64)
def test_error_chunks_round_trip(error: int, message: str, offset: int) -> None:
    encoded = message.encode("utf-8")
    plain = wire.ErrorChunk.build({"error": error, "message": message})
    assert plain == error.to_bytes(4, "big") + len(encoded).to_bytes(2, "big") + encoded
    parsed = wire.ErrorChunk.parse(plain)
    assert (parsed.error, parsed.message) == (error, message)
    with_offset = wire.ErrorOffsetChunk.build(
        {"error": error, "message": message, "offset": offset}
    )
    assert with_offset == plain + offset.to_bytes(8, "big")
    parsed_offset = wire.ErrorOffsetChunk.parse(with_offset)
    assert (parsed_offset.error, parsed_offset.message, parsed_offset.offset) == (
        error,
        message,
        offset,
    )


@ROUND_TRIP
@given(u32, u32)
def test_block_descriptor_round_trip(length: int, status: int) -> None:
    built = wire.BlockDescriptor.build({"length": length, "status_flags": status})
    assert built == BLOCK_DESCRIPTOR.pack(length, status)
    parsed = wire.BlockDescriptor.parse(built)
    assert (parsed.length, parsed.status_flags) == (length, status)


@ROUND_TRIP
@given(u32, st.lists(st.tuples(u32, u32), max_size=16))
def test_block_status_chunk_round_trip(context_id: int, extents: list[tuple[int, int]]) -> None:
    descriptors = [{"length": length, "status_flags": status} for length, status in extents]
    built = wire.BlockStatusChunk.build({"context_id": context_id, "descriptors": descriptors})
    assert len(built) == 4 + 8 * len(extents)
    parsed = wire.BlockStatusChunk.parse(built)
    assert parsed.context_id == context_id
    assert [(d.length, d.status_flags) for d in parsed.descriptors] == extents


# --- The struct fast path is the construct definition -------------------------------


def test_fast_path_sizes_match_construct() -> None:
    assert REQUEST_HEADER.size == wire.Request.sizeof() == 28
    assert SIMPLE_REPLY_HEADER.size == wire.SimpleReply.sizeof() == 16
    assert CHUNK_HEADER.size == wire.ChunkHeader.sizeof() == 20
    assert OFFSET_DATA_HEADER.size == CHUNK_HEADER.size + 8
    assert StructuredFraming.read_headroom == OFFSET_DATA_HEADER.size
    assert SimpleFraming.read_headroom == SIMPLE_REPLY_HEADER.size


@ROUND_TRIP
@given(u16, u16, u64, u64, u32)
@example(0xFFFF, 0xFFFF, 2**64 - 1, 2**64 - 1, 2**32 - 1)
def test_request_header_matches_construct(
    flags: int, kind: int, cookie: int, offset: int, length: int
) -> None:
    value = {"flags": flags, "type": kind, "cookie": cookie, "offset": offset, "length": length}
    built = wire.Request.build(value)
    packed = REQUEST_HEADER.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)
    assert packed == built
    assert build_request(kind, offset, length, cookie, flags) == built
    parsed = wire.Request.parse(packed)
    assert REQUEST_HEADER.unpack(built) == (
        parsed.magic,
        parsed.flags,
        parsed.type,
        parsed.cookie,
        parsed.offset,
        parsed.length,
    )


@ROUND_TRIP
@given(st.binary(min_size=24, max_size=24))
def test_request_header_agrees_with_construct_on_any_header(rest: bytes) -> None:
    data = REQUEST_MAGIC.to_bytes(4, "big") + rest
    parsed = wire.Request.parse(data)
    _, flags, command, cookie, offset, length = REQUEST_HEADER.unpack(data)
    assert (flags, command, cookie, offset, length) == (
        parsed.flags,
        parsed.type,
        parsed.cookie,
        parsed.offset,
        parsed.length,
    )
    assert build_request(command, offset, length, cookie, flags) == data


@ROUND_TRIP
@given(u32.filter(lambda magic: magic != REQUEST_MAGIC), st.binary(min_size=24, max_size=24))
@example(SIMPLE_REPLY_MAGIC, bytes(24))
@example(REQUEST_MAGIC ^ 1, bytes(24))
def test_transmission_rejects_bad_magic(magic: int, rest: bytes) -> None:
    data = magic.to_bytes(4, "big") + rest
    session = Negotiated(2**20, TransmissionFlag.HAS_FLAGS, structured_replies=True)
    with pytest.raises(RemoteProtocolError):
        ServerTransmission(session, data).next_event()
    with pytest.raises(ConstructError):  # and construct agrees that it is no request
        wire.Request.parse(data)


@ROUND_TRIP
@given(u64, u64, u32)
def test_request_properties(offset: int, length: int, flags: int) -> None:
    request = Request(flags=flags & 0xFFFF, command=0, cookie=1, offset=offset, length=length)
    assert request.end == offset + length  # a Python int: never wraps at 2**64
    assert request.fua == bool(flags & 1)


@ROUND_TRIP
@given(u32, u64)
def test_simple_reply_header_matches_construct(error: int, cookie: int) -> None:
    built = wire.SimpleReply.build({"error": error, "cookie": cookie})
    assert SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, cookie) == built
    assert simple_reply(cookie, error) == built
    assert error_reply(cookie, error, structured=False, message="ignored") == built
    parsed = wire.SimpleReply.parse(built)
    assert SIMPLE_REPLY_HEADER.unpack(built) == (parsed.magic, parsed.error, parsed.cookie)


@ROUND_TRIP
@given(u16, u16, u64, u32)
def test_chunk_header_matches_construct(flags: int, kind: int, cookie: int, length: int) -> None:
    value = {"flags": flags, "type": kind, "cookie": cookie, "length": length}
    built = wire.ChunkHeader.build(value)
    assert CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length) == built
    parsed = wire.ChunkHeader.parse(built)
    assert CHUNK_HEADER.unpack(built) == (
        parsed.magic,
        parsed.flags,
        parsed.type,
        parsed.cookie,
        parsed.length,
    )


@ROUND_TRIP
@given(u64)
def test_none_chunk_matches_construct(cookie: int) -> None:
    assert none_chunk(cookie) == wire.ChunkHeader.build(
        {"flags": ReplyFlag.DONE, "type": ChunkType.NONE, "cookie": cookie, "length": 0}
    )


@ROUND_TRIP
@given(u16, u16, u64, uint(32).filter(lambda n: n >= 8), u64)
def test_offset_data_header_matches_construct(
    flags: int, kind: int, cookie: int, length: int, offset: int
) -> None:
    built = wire.ChunkHeader.build(
        {"flags": flags, "type": kind, "cookie": cookie, "length": length}
    ) + wire.OffsetDataChunk.build({"offset": offset, "data": b""})
    packed = OFFSET_DATA_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length, offset)
    assert packed == built
    header = wire.ChunkHeader.parse(built[: CHUNK_HEADER.size])
    body = wire.OffsetDataChunk.parse(built[CHUNK_HEADER.size :])
    assert OFFSET_DATA_HEADER.unpack(built) == (
        header.magic,
        header.flags,
        header.type,
        header.cookie,
        header.length,
        body.offset,
    )


def read_request(cookie: int, offset: int, length: int) -> Request:
    return Request(0, Command.READ, cookie, offset, length)


@ROUND_TRIP
@given(u64, u64, st.binary(max_size=64))
def test_pack_read_reply_header_structured(cookie: int, offset: int, data: bytes) -> None:
    room = StructuredFraming.read_headroom
    buffer = bytearray(room) + data
    StructuredFraming().pack_read_header(buffer, read_request(cookie, offset, len(data)))
    expected = wire.ChunkHeader.build(
        {
            "flags": ReplyFlag.DONE,
            "type": ChunkType.OFFSET_DATA,
            "cookie": cookie,
            "length": 8 + len(data),
        }
    ) + wire.OffsetDataChunk.build({"offset": offset, "data": data})
    assert bytes(buffer) == expected
    header, body = chunk_body(bytes(buffer))
    assert (header.flags, header.type, header.cookie) == (1, ChunkType.OFFSET_DATA, cookie)
    parsed = wire.OffsetDataChunk.parse(body)
    assert (parsed.offset, parsed.data) == (offset, data)


@ROUND_TRIP
@given(u64, u64, st.integers(0, 2**32 - 1 - 8))
def test_pack_read_reply_header_structured_any_length(
    cookie: int, offset: int, length: int
) -> None:
    """The header alone, for lengths far too big to allocate; no bytes past it move."""
    room = StructuredFraming.read_headroom
    buffer = bytearray(b"\xaa" * (room + 4))
    StructuredFraming().pack_read_header(buffer, read_request(cookie, offset, length))
    assert bytes(buffer[:room]) == wire.ChunkHeader.build(
        {"flags": 1, "type": 1, "cookie": cookie, "length": 8 + length}
    ) + offset.to_bytes(8, "big")
    assert buffer[room:] == b"\xaa" * 4


@ROUND_TRIP
@given(u64, u64, st.binary(max_size=64))
def test_pack_read_reply_header_simple(cookie: int, offset: int, data: bytes) -> None:
    room = SimpleFraming.read_headroom
    buffer = bytearray(b"\xff" * room) + data
    SimpleFraming().pack_read_header(buffer, read_request(cookie, offset, len(data)))
    assert bytes(buffer) == wire.SimpleReply.build({"error": 0, "cookie": cookie}) + data


@settings(max_examples=60, deadline=None)
@given(u64, u32, st.text(max_size=400), st.one_of(st.none(), u64))
@example(0, 5, "x" * 1000, None)
@example(2**64 - 1, 2**32 - 1, "é" * 300, 2**64 - 1)
def test_error_chunk_matches_construct(
    cookie: int, error: int, message: str, offset: int | None
) -> None:
    chunk = error_chunk(cookie, error, message, offset)
    assert error_reply(cookie, error, structured=True, message=message, offset=offset) == chunk
    text = truncate_message(message).decode("utf-8")
    value = {"error": error, "message": text}
    if offset is None:
        body = wire.ErrorChunk.build(value)
        kind = ChunkType.ERROR
    else:
        body = wire.ErrorOffsetChunk.build({**value, "offset": offset})
        kind = ChunkType.ERROR_OFFSET
    header = wire.ChunkHeader.build(
        {"flags": ReplyFlag.DONE, "type": kind, "cookie": cookie, "length": len(body)}
    )
    assert chunk == header + body
    parsed_header, payload = chunk_body(chunk)
    assert parsed_header.type == kind
    structure = wire.ErrorChunk if offset is None else wire.ErrorOffsetChunk
    parsed = structure.parse(payload)
    assert parsed.error == error
    assert message.startswith(parsed.message)
    assert len(parsed.message.encode("utf-8")) <= MAX_ERROR_MESSAGE
    if offset is not None:
        assert parsed.offset == offset


def test_error_chunk_known_bytes() -> None:
    chunk = error_chunk(7, 5, "bad", offset=512)
    assert chunk == (
        bytes.fromhex("668e33ef00018002000000000000000700000011")
        + bytes.fromhex("000000050003")
        + b"bad"
        + (512).to_bytes(8, "big")
    )


@ROUND_TRIP
@given(u64, u32, st.lists(st.tuples(u32, u32), max_size=32))
def test_block_status_chunk_matches_construct(
    cookie: int, context_id: int, extents: list[tuple[int, int]]
) -> None:
    chunk = block_status_chunk(cookie, context_id, extents)
    body = wire.BlockStatusChunk.build(
        {
            "context_id": context_id,
            "descriptors": [{"length": n, "status_flags": s} for n, s in extents],
        }
    )
    header = wire.ChunkHeader.build(
        {
            "flags": ReplyFlag.DONE,
            "type": ChunkType.BLOCK_STATUS,
            "cookie": cookie,
            "length": len(body),
        }
    )
    assert chunk == header + body
    _, payload = chunk_body(chunk)
    parsed = wire.BlockStatusChunk.parse(payload)
    assert [(d.length, d.status_flags) for d in parsed.descriptors] == extents


def test_fast_path_rejects_out_of_range_values() -> None:
    """The struct formats have the construct widths: too-wide values do not fit."""
    with pytest.raises(struct.error):
        build_request(2**16, 0, 0, 0)
    with pytest.raises(struct.error):
        build_request(0, 2**64, 0, 0)
    with pytest.raises(struct.error):
        simple_reply(2**64)


# --- truncate_message ---------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300), st.integers(0, 400))
@example("aé", 2)
@example("€€", 5)
@example("😀", 3)
def test_truncate_message_stays_within_limit_and_whole_characters(message: str, limit: int) -> None:
    encoded = message.encode("utf-8")
    out = truncate_message(message, limit)
    assert len(out) <= limit
    text = out.decode("utf-8")  # strict: no split character
    assert message.startswith(text)
    if len(out) < len(encoded):
        # Maximal: the next character would not have fitted.
        following = message[len(text)]
        assert len(out) + len(following.encode("utf-8")) > limit
    else:
        assert out == encoded


@ROUND_TRIP
@given(st.text(max_size=600))
def test_truncate_message_default_limit(message: str) -> None:
    out = truncate_message(message)
    assert len(out) <= MAX_ERROR_MESSAGE
    assert message.encode("utf-8").startswith(out)


def test_truncate_message_known_cut() -> None:
    assert truncate_message("aé", 2) == b"a"  # é is 2 bytes; it would not fit
    assert truncate_message("aé", 3) == "aé".encode()
    assert truncate_message("😀x", 3) == b""
    assert truncate_message("", 0) == b""
