"""ReplyReader, the client's sans-IO reply parser: replies framed by the server's own
functions and by construct, in any chunking; every reply and chunk type; data in
the caller's buffer; and every reply the spec forbids is a RemoteProtocolError."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from machine_support import feed, split, take

from nbdverify_protocol import wire
from nbdverify_protocol.client import (
    MAX_CHUNK,
    MAX_METADATA_CHUNK,
    ReplyDone,
    ReplyEvent,
    ReplyReader,
)
from nbdverify_protocol.client import ReplyExtents as Extents
from nbdverify_protocol.constants import (
    BASE_ALLOCATION,
    ChunkType,
    Command,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from nbdverify_protocol.errors import LocalProtocolError, RemoteProtocolError
from nbdverify_protocol.events import NEED_DATA
from nbdverify_protocol.transmission import Negotiated, Request, ServerTransmission, none_chunk

SIZE = 1024 * 1024
CONTEXT = 3
SERVER = ServerTransmission(Negotiated(SIZE, TransmissionFlag.HAS_FLAGS, True,
                                       ((CONTEXT, BASE_ALLOCATION),)))
SIMPLE_SERVER = ServerTransmission(Negotiated(SIZE, TransmissionFlag.HAS_FLAGS, False))
DONE = int(ReplyFlag.DONE)
FUZZ = settings(max_examples=60, deadline=None)


def chunk(kind: int, cookie: int, body: bytes = b"", flags: int = DONE,
          length: int | None = None) -> bytes:
    """A structured reply chunk, built by construct."""
    header: bytes = wire.ChunkHeader.build({"flags": flags, "type": kind, "cookie": cookie,
                                            "length": len(body) if length is None else length})
    return header + body


def data_chunk(cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return chunk(ChunkType.OFFSET_DATA, cookie,
                 wire.OffsetDataChunk.build({"offset": offset, "data": data}), flags)


def hole_chunk(cookie: int, offset: int, size: int, flags: int = 0) -> bytes:
    return chunk(ChunkType.OFFSET_HOLE, cookie,
                 wire.OffsetHoleChunk.build({"offset": offset, "hole_size": size}), flags)


def error_body(error: int, message: str, offset: int | None = None) -> bytes:
    if offset is None:
        body: bytes = wire.ErrorChunk.build({"error": error, "message": message})
    else:
        body = wire.ErrorOffsetChunk.build({"error": error, "message": message,
                                            "offset": offset})
    return body


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    header: bytes = wire.SimpleReply.build({"error": error, "cookie": cookie})
    return header + data


def read_reply(server: ServerTransmission, cookie: int, offset: int, data: bytes) -> bytes:
    """A READ reply as our server frames it."""
    buffer = bytearray(server.read_headroom) + data
    return bytes(server.read_reply(Request(0, Command.READ, cookie, offset, len(data)), buffer))


@dataclass
class Read:
    """A READ the test expects a reply to, with the buffer its data must land in."""

    cookie: int
    offset: int
    length: int
    abandoned: bool = False

    def __post_init__(self) -> None:
        self.buffer = bytearray(b"\xee" * self.length)


def reader_for(structured: bool, reads: Sequence[Read], others: Sequence[int]) -> ReplyReader:
    reader = ReplyReader(structured)
    for read in reads:
        reader.expect(read.cookie, read.offset, read.length, memoryview(read.buffer))
        if read.abandoned:
            reader.abandon(read.cookie)
    for cookie in others:  # commands that carry no data, on the whole export
        reader.expect(cookie, 0, SIZE)
    return reader


# --- A structured conversation with every reply and chunk type -------------------------

DATA = bytes(range(256)) * 32  # 8 KiB
STRUCTURED_READS = [Read(1, 4096, 8192), Read(5, 0, 100, abandoned=True), Read(8, 512, 300),
                    Read(9, 0, 10), Read(10, 0, 0)]
STRUCTURED_OTHERS = [2, 3, 4, 6, 7, 11]
STRUCTURED_REPLIES = b"".join([
    # READ 1 in pieces, out of order, with a hole, then a NONE chunk that ends it.
    data_chunk(1, 4096 + 4096, DATA[4096:6000]),
    data_chunk(1, 4096, DATA[:3000]),
    hole_chunk(1, 4096 + 3000, 1096),
    SIMPLE_SERVER.done_reply(Request(0, Command.WRITE, 2, 0, 1)),  # interleaved, simple
    data_chunk(1, 4096 + 6000, DATA[6000:]),
    chunk(ChunkType.NONE, 1),
    SERVER.error_reply(Request(0, Command.FLUSH, 3, 0, 0), Errno.ENOSPC, "disk full"),
    SERVER.block_status_reply(Request(0, Command.BLOCK_STATUS, 4, 0, SIZE),
                              [(4096, 3), (8192, 0)]),
    data_chunk(5, 0, bytes(100), DONE),  # abandoned: parsed, dropped
    chunk(ChunkType.ERROR_OFFSET, 6, error_body(Errno.EIO, "bad sector", 4096)),
    chunk(2**15 + 77, 7, error_body(Errno.EPERM, "an error type we do not know")),
    read_reply(SERVER, 8, 512, DATA[:300]),
    # An error chunk that does not end the reply, then more chunks: the error wins.
    chunk(ChunkType.ERROR, 9, error_body(Errno.EIO, "first"), flags=0),
    chunk(ChunkType.ERROR, 9, error_body(Errno.EINVAL, "second"), flags=0),
    chunk(ChunkType.NONE, 9),
    none_chunk(10),  # what our server answers a zero-length READ with
    chunk(ChunkType.BLOCK_STATUS, 11, wire.BlockStatusChunk.build(
        {"context_id": 9, "descriptors": [{"length": 1, "status_flags": 2}]}), flags=0),
    chunk(ChunkType.ERROR, 11, error_body(0, ""), flags=DONE),  # error 0 is still an error
])
STRUCTURED_EVENTS: list[ReplyEvent] = [
    ReplyDone(2),
    ReplyDone(1),
    ReplyDone(3, Errno.ENOSPC, "disk full"),
    Extents(4, CONTEXT, ((4096, 3), (8192, 0))),
    ReplyDone(4),
    ReplyDone(5),
    ReplyDone(6, Errno.EIO, "bad sector"),
    ReplyDone(7, Errno.EPERM, "an error type we do not know"),
    ReplyDone(8),
    ReplyDone(9, Errno.EIO, "first"),
    ReplyDone(10),
    Extents(11, 9, ((1, 2),)),
    ReplyDone(11, Errno.EIO, ""),
]


def check_structured_buffers(reads: Sequence[Read]) -> None:
    read_1, read_5, read_8, read_9, _ = reads
    assert read_1.buffer == DATA[:3000] + bytes(1096) + DATA[4096:]
    assert read_5.buffer == b"\xee" * 100  # abandoned: nothing lands
    assert read_8.buffer == DATA[:300]
    assert read_9.buffer == b"\xee" * 10


def fresh_reads() -> list[Read]:
    return [Read(r.cookie, r.offset, r.length, r.abandoned) for r in STRUCTURED_READS]


def test_structured_conversation_in_one_feed() -> None:
    reads = fresh_reads()
    reader = reader_for(True, reads, STRUCTURED_OTHERS)
    assert feed(reader, [STRUCTURED_REPLIES]) == STRUCTURED_EVENTS
    check_structured_buffers(reads)


def test_structured_conversation_byte_by_byte() -> None:
    reads = fresh_reads()
    reader = reader_for(True, reads, STRUCTURED_OTHERS)
    pieces = [STRUCTURED_REPLIES[i:i + 1] for i in range(len(STRUCTURED_REPLIES))]
    assert feed(reader, pieces) == STRUCTURED_EVENTS
    check_structured_buffers(reads)


@FUZZ
@given(st.lists(st.integers(0, len(STRUCTURED_REPLIES)), max_size=40))
def test_structured_conversation_in_any_chunking(cuts: list[int]) -> None:
    reads = fresh_reads()
    reader = reader_for(True, reads, STRUCTURED_OTHERS)
    assert feed(reader, split(STRUCTURED_REPLIES, cuts)) == STRUCTURED_EVENTS
    check_structured_buffers(reads)


# --- Simple replies --------------------------------------------------------------------

SIMPLE_READS = [Read(1, 0, 700), Read(2, 0, 50), Read(3, 0, 64, abandoned=True), Read(6, 9, 0)]
SIMPLE_REPLIES = b"".join([
    read_reply(SIMPLE_SERVER, 1, 0, DATA[:700]),
    simple(2, Errno.EIO),  # an error to a READ carries no data
    simple(4),
    simple(3, 0, b"\x01" * 64),  # abandoned
    SIMPLE_SERVER.error_reply(Request(0, Command.TRIM, 5, 0, 1), Errno.EPERM, "ignored"),
    simple(6),
    simple(7, 1234),  # an errno the spec does not name: passed on as it is
])
SIMPLE_EVENTS: list[ReplyEvent] = [ReplyDone(1), ReplyDone(2, Errno.EIO), ReplyDone(4),
                                   ReplyDone(3), ReplyDone(5, Errno.EPERM), ReplyDone(6),
                                   ReplyDone(7, 1234)]


@FUZZ
@given(st.lists(st.integers(0, len(SIMPLE_REPLIES)), max_size=30))
def test_simple_conversation_in_any_chunking(cuts: list[int]) -> None:
    reads = [Read(r.cookie, r.offset, r.length, r.abandoned) for r in SIMPLE_READS]
    reader = reader_for(False, reads, [4, 5, 7])
    assert feed(reader, split(SIMPLE_REPLIES, cuts)) == SIMPLE_EVENTS
    assert reads[0].buffer == DATA[:700]
    assert reads[1].buffer == b"\xee" * 50
    assert reads[2].buffer == b"\xee" * 64


def test_simple_replies_are_fine_for_other_commands_in_a_structured_session() -> None:
    reader = reader_for(True, [], [1])
    assert feed(reader, [simple(1, Errno.EINVAL)]) == [ReplyDone(1, Errno.EINVAL)]


# --- Big reads land in place -----------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_big_read_data_is_received_into_the_callers_buffer(structured: bool) -> None:
    length = 1024 * 1024
    read = Read(1, 0, length)
    reader = reader_for(structured, [read], [])
    # The header alone, framing `length` bytes of data at offset 0.
    header = (chunk(ChunkType.OFFSET_DATA, 1, b"", DONE, 8 + length) + bytes(8)
              if structured else simple(1))
    reader.receive_data(header)
    assert reader.next_event() is NEED_DATA
    target = reader.receive_buffer()
    assert len(target) == length
    assert target.obj is read.buffer  # the kernel writes straight into the READ's buffer
    target[:] = b"\x33" * length
    reader.received(length)
    assert reader.next_event() == ReplyDone(1)
    assert read.buffer == b"\x33" * length


def test_abandoned_big_read_is_dropped_through_a_bounded_buffer() -> None:
    length = 32 * 1024 * 1024
    read = Read(1, 0, length, abandoned=True)
    reader = reader_for(True, [read], [2])
    reader.receive_data(chunk(ChunkType.OFFSET_DATA, 1, b"", DONE, 8 + length) + bytes(8))
    left, scratch = length, None
    while left:
        assert reader.next_event() is NEED_DATA
        target = reader.receive_buffer()
        assert 0 < len(target) <= 1024 * 1024
        scratch = scratch or target.obj
        assert target.obj is scratch and target.obj is not read.buffer
        reader.received(len(target))
        left -= len(target)
    reader.receive_data(simple(2))
    assert take(reader) == [ReplyDone(1), ReplyDone(2)]


# --- Hostile replies ---------------------------------------------------------------------

READ_1 = (1, 4096, 512)  # cookie, offset, length
HOSTILE: dict[str, tuple[bool, bytes]] = {
    "unknown-cookie-simple": (True, simple(99)),
    "unknown-cookie-structured": (True, chunk(ChunkType.NONE, 99)),
    "unknown-cookie-data": (True, data_chunk(99, 0, b"x", DONE)),
    "finished-cookie-again": (True, chunk(ChunkType.NONE, 2) + chunk(ChunkType.NONE, 2)),
    "data-before-the-request": (True, data_chunk(1, 4095, b"x" * 10)),
    "data-after-the-request": (True, data_chunk(1, 4096 + 500, b"x" * 13)),
    "data-far-away": (True, data_chunk(1, 2**64 - 1, b"x")),
    "hole-outside-the-request": (True, hole_chunk(1, 4096, 513)),
    "read-done-without-all-its-data": (True, data_chunk(1, 4096, b"x" * 511, DONE)),
    "read-done-with-a-gap": (True, data_chunk(1, 4096, b"x" * 256)
                             + hole_chunk(1, 4096 + 384, 128) + chunk(ChunkType.NONE, 1)),
    "read-done-without-data": (True, chunk(ChunkType.NONE, 1)),
    "read-data-twice": (True, data_chunk(1, 4096, b"x" * 512) + data_chunk(1, 4096, b"x" * 512,
                                                                            DONE)),
    "data-for-a-write": (True, data_chunk(2, 0, b"x", DONE)),
    "hole-for-a-write": (True, hole_chunk(2, 0, 0, DONE)),
    "simple-reply-to-read-when-structured": (True, simple(1, 0, bytes(512))),
    "simple-error-to-read-when-structured": (True, simple(1, Errno.EIO)),
    "structured-when-not-negotiated": (False, chunk(ChunkType.NONE, 2)),
    "unknown-chunk-type": (True, chunk(3, 2)),
    "unknown-chunk-type-7": (True, chunk(7, 1, bytes(4))),
    "oversize-metadata-chunk": (True, chunk(ChunkType.ERROR, 2, b"", DONE,
                                            MAX_METADATA_CHUNK + 1)),
    "oversize-data-chunk": (True, chunk(ChunkType.OFFSET_DATA, 1, b"", DONE, MAX_CHUNK + 1)),
    "data-chunk-without-data": (True, chunk(ChunkType.OFFSET_DATA, 1, bytes(8))),
    "data-chunk-shorter-than-its-offset": (True, chunk(ChunkType.OFFSET_DATA, 1, bytes(4))),
    "bad-magic": (True, b"\x12\x34\x56\x78" + bytes(16)),
    "request-magic": (True, wire.Request.build({"flags": 0, "type": 0, "cookie": 1,
                                                "offset": 0, "length": 0})),
    "block-status-without-descriptors": (True, chunk(ChunkType.BLOCK_STATUS, 2, bytes(4))),
    "block-status-partial-descriptor": (True, chunk(ChunkType.BLOCK_STATUS, 2, bytes(4 + 7))),
    "block-status-empty": (True, chunk(ChunkType.BLOCK_STATUS, 2)),
    "block-status-for-a-read": (True, chunk(ChunkType.BLOCK_STATUS, 1, bytes(12))),
    "error-message-longer-than-chunk": (True, chunk(ChunkType.ERROR, 2,
                                                    error_body(Errno.EIO, "long")[:-1])),
    "error-chunk-too-short": (True, chunk(ChunkType.ERROR, 2, bytes(5))),
    "error-offset-without-offset": (True, chunk(ChunkType.ERROR_OFFSET, 2,
                                                error_body(Errno.EIO, "x") + bytes(3))),
    "error-offset-with-trailing-bytes": (True, chunk(ChunkType.ERROR_OFFSET, 1, error_body(
        Errno.EIO, "x", 4096) + bytes(1))),
    "error-offset-before-the-request": (True, chunk(ChunkType.ERROR_OFFSET, 1,
                                                    error_body(Errno.EIO, "x", 4095))),
    "error-offset-after-the-request": (True, chunk(ChunkType.ERROR_OFFSET, 1,
                                                   error_body(Errno.EIO, "x", 4096 + 512))),
    "none-chunk-with-payload": (True, chunk(ChunkType.NONE, 2, b"x")),
    "hole-chunk-wrong-size": (True, chunk(ChunkType.OFFSET_HOLE, 1, bytes(11))),
}


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_replies_are_remote_protocol_errors(case: tuple[bool, bytes]) -> None:
    structured, data = case
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        cookie, offset, length = READ_1
        reader = ReplyReader(structured)
        reader.expect(cookie, offset, length, memoryview(bytearray(length)))
        reader.expect(2, 0, 0)
        with pytest.raises(RemoteProtocolError):  # before the stream ends: that is an error too
            feed(reader, pieces)


BOTH, STRUCTURED_ONLY, SIMPLE_ONLY = (True, False), (True,), (False,)
EOF_CASES = {
    "inside-a-simple-header": (simple(2)[:10], BOTH),
    "inside-a-chunk-header": (chunk(ChunkType.NONE, 2)[:19], STRUCTURED_ONLY),
    "inside-the-offset-of-data": (data_chunk(1, 4096, b"x" * 512, DONE)[:24], STRUCTURED_ONLY),
    "inside-read-data": (data_chunk(1, 4096, b"x" * 512, DONE)[:100], STRUCTURED_ONLY),
    "inside-simple-read-data": (simple(1, 0, b"x" * 512)[:100], SIMPLE_ONLY),
    "inside-an-error-chunk": (chunk(ChunkType.ERROR, 2, error_body(Errno.EIO, "abc"))[:-1],
                              STRUCTURED_ONLY),
    "between-replies": (b"", BOTH),
    "after-a-reply": (simple(2), BOTH),
}


@pytest.mark.parametrize(("data", "structured"),
                         [(data, mode) for data, modes in EOF_CASES.values() for mode in modes],
                         ids=[f"{name}-{'structured' if mode else 'simple'}"
                              for name, (_, modes) in EOF_CASES.items() for mode in modes])
def test_end_of_stream_is_a_remote_protocol_error(data: bytes, structured: bool) -> None:
    reader = ReplyReader(structured)
    reader.expect(1, 4096, 512, memoryview(bytearray(512)))
    reader.expect(2, 0, 0)
    with pytest.raises(RemoteProtocolError, match="closed"):
        feed(reader, [data], end=True)


# --- Fuzz --------------------------------------------------------------------------------


@st.composite
def reply_streams(draw: st.DrawFn) -> bytes:
    """Mostly well-framed replies with hostile fields, and some noise."""
    parts = []
    cookies = st.integers(0, 6)
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            parts.append(simple(draw(cookies), draw(st.integers(0, 40)),
                                draw(st.binary(max_size=40))))
        elif kind == 1:
            parts.append(data_chunk(draw(cookies), draw(st.integers(0, 600)),
                                    draw(st.binary(min_size=1, max_size=64)),
                                    draw(st.integers(0, 3))))
        elif kind == 2:
            parts.append(chunk(draw(st.sampled_from([0, 2, 5, 2**15 + 1, 2**15 + 2, 9])),
                               draw(cookies), draw(st.binary(max_size=40)),
                               draw(st.integers(0, 1))))
        elif kind == 3:
            parts.append(chunk(draw(st.integers(0, 0xFFFF)), draw(cookies), b"",
                               draw(st.integers(0, 0xFFFF)),
                               draw(st.sampled_from([0, 12, 2**16, 2**32 - 1]))))
        else:
            parts.append(draw(st.binary(max_size=60)))
    return b"".join(parts)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), reply_streams(), st.lists(st.integers(0, 2**10), max_size=8),
       st.booleans(), st.booleans())
def test_arbitrary_replies_raise_only_remote_protocol_error(
        structured: bool, data: bytes, cuts: list[int], end: bool, abandon: bool) -> None:
    reader = ReplyReader(structured)
    buffers = {cookie: bytearray(512) for cookie in (1, 2, 3)}
    for cookie, buffer in buffers.items():
        reader.expect(cookie, 100, 512, memoryview(buffer))
    if abandon:
        reader.abandon(2)
    for cookie in (4, 5, 6):
        reader.expect(cookie, 0, 0)
    try:
        events = feed(reader, split(data, cuts), end)
    except RemoteProtocolError:
        return
    done = [event.cookie for event in events if isinstance(event, ReplyDone)]
    assert len(done) == len(set(done))  # one ending per request, at most
    assert set(done) <= {1, 2, 3, 4, 5, 6}
    if abandon:
        assert buffers[2] == bytes(512)


@pytest.mark.parametrize("piece", [1000, 64 * 1024, 4 * 1024 * 1024])
def test_metadata_chunk_bigger_than_the_input_buffer(piece: int) -> None:
    extents = [(4096, index % 4) for index in range(100_000)]  # 800 KB of descriptors
    reply = SERVER.block_status_reply(Request(0, Command.BLOCK_STATUS, 1, 0, SIZE), extents)
    assert len(reply) > 3 * 256 * 1024
    reader = reader_for(True, [], [1, 2])
    data = reply + simple(2)
    events = feed(reader, [data[i:i + piece] for i in range(0, len(data), piece)])
    assert events == [Extents(1, CONTEXT, tuple(extents)), ReplyDone(1), ReplyDone(2)]


def test_a_read_buffer_of_the_wrong_size_is_our_mistake() -> None:
    reader = ReplyReader(True)
    with pytest.raises(LocalProtocolError):
        reader.expect(1, 0, 4096, memoryview(bytearray(4095)))
