"""NBD extended headers, sans-IO: negotiation on both sides, 32-byte requests in,
32-byte replies out, and the client's reply reader; every frame checked against
the construct definitions in `wire`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdverify_protocol import wire
from nbdverify_protocol.client import (
    ClientNegotiation,
    ExportOpened,
    ReplyDone,
    ReplyExtents,
    ReplyReader,
)
from nbdverify_protocol.constants import (
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReplyType,
    ReplyFlag,
    TransmissionFlag,
)
from nbdverify_protocol.errors import RemoteProtocolError
from nbdverify_protocol.events import (
    NEED_DATA,
    BlockSize,
    ExportDetails,
    ExportInfoRequested,
    MetaContextsGranted,
)
from nbdverify_protocol.negotiation import ServerNegotiation, State
from nbdverify_protocol.transmission import (
    EXTENDED_REQUEST_HEADER,
    MAX_PAYLOAD,
    Disconnect,
    Negotiated,
    Request,
    RequestAnswered,
    ServerTransmission,
    build_extended_request,
)

FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
         | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)
SESSION = Negotiated(export_size=2**40, transmission_flags=FLAGS, structured_replies=True,
                     meta_contexts=((7, "base:allocation"),), extended_headers=True)
DISK = ExportDetails(name="disk", size=2**40, transmission_flags=FLAGS,
                     block_size=BlockSize(1, 4096, 32 * 2**20))


def option(number: int, payload: bytes = b"") -> bytes:
    header: bytes = wire.OptionHeader.build({"option": number, "length": len(payload)})
    return header + payload


def replies(data: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of each option reply in `data`."""
    found = []
    while data:
        header = wire.OptionReplyHeader.parse(data[:20])
        found.append((header.option, header.reply_type))
        data = data[20 + header.length:]
    return found


def negotiating(offer: bool = True) -> ServerNegotiation:
    machine = ServerNegotiation(offer_extended_headers=offer)
    machine.data_to_send()
    machine.receive_data(wire.ClientFlags.build({"client_flags": ClientFlag.FIXED_NEWSTYLE}))
    return machine


def ask(machine: ServerNegotiation, number: int, payload: bytes = b"") -> list[tuple[int, int]]:
    machine.receive_data(option(number, payload))
    assert machine.next_event() is NEED_DATA
    return replies(machine.data_to_send())


# --- Negotiation, server side --------------------------------------------------------


def test_extended_headers_are_acknowledged_and_reach_the_session() -> None:
    machine = negotiating()
    assert ask(machine, Option.EXTENDED_HEADERS) == [(Option.EXTENDED_HEADERS,
                                                      OptionReplyType.ACK)]
    machine.receive_data(option(Option.GO, wire.InfoRequest.build(
        {"name": "disk", "info_types": [InfoType.BLOCK_SIZE]})))
    event = machine.next_event()
    assert isinstance(event, ExportInfoRequested)
    machine.send(DISK)
    assert machine.state is State.TRANSMISSION
    assert machine.negotiated is not None
    assert machine.negotiated.extended_headers
    assert machine.negotiated.structured_replies  # every reply is a chunk


def test_turned_off_they_are_unsupported() -> None:
    machine = negotiating(offer=False)
    assert ask(machine, Option.EXTENDED_HEADERS) == [(Option.EXTENDED_HEADERS,
                                                      OptionReplyType.ERR_UNSUP)]
    assert not machine.extended_headers


def test_structured_replies_after_extended_headers_are_refused() -> None:
    machine = negotiating()
    ask(machine, Option.EXTENDED_HEADERS)
    assert ask(machine, Option.STRUCTURED_REPLY) == [
        (Option.STRUCTURED_REPLY, OptionReplyType.ERR_EXT_HEADER_REQD)]
    assert machine.extended_headers


def test_extended_headers_with_data_are_invalid() -> None:
    assert ask(negotiating(), Option.EXTENDED_HEADERS, b"x") == [
        (Option.EXTENDED_HEADERS, OptionReplyType.ERR_INVALID)]


def test_export_name_after_extended_headers_ends_the_connection() -> None:
    machine = negotiating()
    ask(machine, Option.EXTENDED_HEADERS)
    machine.receive_data(option(Option.EXPORT_NAME, b"disk"))
    with pytest.raises(RemoteProtocolError):
        machine.next_event()


# --- Negotiation, client side --------------------------------------------------------


def client_against(server: ServerNegotiation) -> ExportOpened:
    """Run our client machine against our server machine, bytes only."""
    client = ClientNegotiation("disk", meta_contexts=["base:allocation"])
    for _ in range(20):
        event = client.next_event()
        if isinstance(event, ExportOpened):
            return event
        server.receive_data(client.data_to_send())
        while server.state is State.AWAIT_OPTION or server.state is State.AWAIT_CLIENT_FLAGS:
            request = server.next_event()
            if request is NEED_DATA:
                break
            if isinstance(request, ExportInfoRequested):
                server.send(DISK)
            else:
                server.send(MetaContextsGranted(((7, "base:allocation"),)))
        client.receive_data(server.data_to_send())
    raise AssertionError("negotiation did not finish")


def test_client_uses_extended_headers_where_offered() -> None:
    opened = client_against(ServerNegotiation())
    assert opened.extended_headers and opened.structured_replies
    assert opened.meta_contexts == {"base:allocation": 7}


def test_client_falls_back_to_structured_replies() -> None:
    opened = client_against(ServerNegotiation(offer_extended_headers=False))
    assert not opened.extended_headers and opened.structured_replies
    assert opened.meta_contexts == {"base:allocation": 7}


def test_handshake_flags_unchanged() -> None:
    machine = ServerNegotiation()
    greeting = wire.ServerGreeting.parse(machine.data_to_send())
    assert greeting.handshake_flags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


# --- Requests in --------------------------------------------------------------------


def test_extended_request_matches_construct() -> None:
    header = build_extended_request(Command.WRITE, 2**33, 4096, 99, CommandFlag.FUA)
    parsed = wire.ExtendedRequest.parse(header)
    assert (parsed.flags, parsed.type, parsed.cookie, parsed.offset, parsed.length) == (
        CommandFlag.FUA | CommandFlag.PAYLOAD_LEN, Command.WRITE, 99, 2**33, 4096)
    assert len(header) == EXTENDED_REQUEST_HEADER.size == 32


def request(command: int, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
    built: bytes = wire.ExtendedRequest.build({"flags": flags, "type": command,
                                               "cookie": cookie, "offset": offset,
                                               "length": length})
    return built


@pytest.mark.parametrize("flags", [CommandFlag.PAYLOAD_LEN, 0])  # QEMU 10 omits the flag
def test_write_payload_arrives_with_or_without_payload_len(flags: int) -> None:
    machine = ServerTransmission(SESSION)
    machine.receive_data(request(Command.WRITE, 512, 3, flags=flags) + b"abc")
    event = machine.next_event()
    assert isinstance(event, Request)
    assert event.payload is not None and bytes(event.payload) == b"abc"
    assert event.flags == 0
    assert machine.next_event() is NEED_DATA


def test_a_payload_on_another_command_is_drained_and_refused() -> None:
    machine = ServerTransmission(SESSION)
    machine.receive_data(request(Command.TRIM, 0, 5, flags=CommandFlag.PAYLOAD_LEN) + b"12345"
                         + request(Command.FLUSH, 0, 0, cookie=2))
    refused = machine.next_event()
    assert isinstance(refused, RequestAnswered) and refused.error == Errno.EINVAL
    flush = machine.next_event()
    assert isinstance(flush, Request) and flush.command == Command.FLUSH


def test_an_oversized_payload_ends_the_connection() -> None:
    machine = ServerTransmission(SESSION)
    machine.receive_data(request(Command.WRITE, 0, MAX_PAYLOAD + 1,
                                 flags=CommandFlag.PAYLOAD_LEN))
    with pytest.raises(RemoteProtocolError):
        machine.next_event()


def test_effect_lengths_are_64_bits() -> None:
    machine = ServerTransmission(SESSION)
    machine.receive_data(request(Command.TRIM, 0, 2**39) + request(Command.TRIM, 0, 2**41, 2))
    trim = machine.next_event()
    assert isinstance(trim, Request) and trim.length == 2**39
    beyond = machine.next_event()
    assert isinstance(beyond, RequestAnswered) and beyond.error == Errno.EINVAL


def test_compact_requests_are_a_protocol_error_now() -> None:
    from nbdverify_protocol.transmission import build_request

    machine = ServerTransmission(SESSION)
    machine.receive_data(build_request(Command.READ, 0, 512, 1) + bytes(4))
    with pytest.raises(RemoteProtocolError):
        machine.next_event()


def test_disc() -> None:
    machine = ServerTransmission(SESSION)
    machine.receive_data(request(Command.DISC, 0, 0))
    assert isinstance(machine.next_event(), Disconnect)


# --- Replies out ------------------------------------------------------------------------


def split_reply(data: bytes) -> tuple[object, bytes]:
    header = wire.ExtendedReplyHeader.parse(data[:32])
    body = data[32:]
    assert header.length == len(body)
    return header, body


def read_request(offset: int = 4096, length: int = 5, cookie: int = 3) -> Request:
    return Request(0, Command.READ, cookie, offset, length)


def test_read_reply_is_one_extended_offset_data_chunk() -> None:
    machine = ServerTransmission(SESSION)
    request_ = read_request()
    buffer = bytearray(machine.read_headroom) + bytearray(b"hello")
    header, body = split_reply(bytes(machine.read_reply(request_, buffer)))
    assert (header.flags, header.type, header.cookie, header.offset) == (  # type: ignore[attr-defined]
        ReplyFlag.DONE, ChunkType.OFFSET_DATA, 3, 4096)
    data = wire.OffsetDataChunk.parse(body)
    assert (data.offset, data.data) == (4096, b"hello")


def test_every_reply_is_extended_even_without_data() -> None:
    machine = ServerTransmission(SESSION)
    done = machine.done_reply(Request(0, Command.FLUSH, 4, 0, 0))
    header, body = split_reply(done)
    assert (header.type, header.flags, body) == (ChunkType.NONE, ReplyFlag.DONE, b"")  # type: ignore[attr-defined]
    error = machine.error_reply(read_request(), Errno.EIO, "bad", 4100)
    header, body = split_reply(error)
    assert header.type == ChunkType.ERROR_OFFSET  # type: ignore[attr-defined]
    parsed = wire.ErrorOffsetChunk.parse(body)
    assert (parsed.error, parsed.message, parsed.offset) == (Errno.EIO, "bad", 4100)


def test_block_status_is_block_status_ext() -> None:
    machine = ServerTransmission(SESSION)
    asked = Request(0, Command.BLOCK_STATUS, 5, 0, 2**36)
    assert machine.block_status_length(asked) == 2**36  # no 32-bit cap
    reply = machine.block_status_reply(asked, [(2**35, 0), (2**35, 3)])
    header, body = split_reply(reply)
    assert header.type == ChunkType.BLOCK_STATUS_EXT  # type: ignore[attr-defined]
    parsed = wire.BlockStatusExtChunk.parse(body)
    assert parsed.context_id == 7
    assert [(d.length, d.status_flags) for d in parsed.descriptors] == [(2**35, 0), (2**35, 3)]


# --- The client's reply reader ----------------------------------------------------------


def extended(flags: int, chunk_type: int, cookie: int, offset: int, body: bytes = b"") -> bytes:
    header: bytes = wire.ExtendedReplyHeader.build({"flags": flags, "type": chunk_type,
                                                    "cookie": cookie, "offset": offset,
                                                    "length": len(body)})
    return header + body


def test_reader_places_data_and_finishes() -> None:
    reader = ReplyReader(True, extended=True)
    target = bytearray(8)
    reader.expect(1, 1000, 8, memoryview(target))
    reader.receive_data(extended(0, ChunkType.OFFSET_DATA, 1, 1000,
                                 wire.OffsetDataChunk.build({"offset": 1004, "data": b"wxyz"}))
                        + extended(ReplyFlag.DONE, ChunkType.OFFSET_DATA, 1, 1000,
                                   wire.OffsetDataChunk.build({"offset": 1000, "data": b"abcd"})))
    assert reader.next_event() == ReplyDone(1)
    assert target == b"abcdwxyz"


def test_reader_block_status_ext() -> None:
    reader = ReplyReader(True, extended=True)
    reader.expect(2, 0, 2**33)
    body = wire.BlockStatusExtChunk.build({"context_id": 7, "descriptors": [
        {"length": 2**32, "status_flags": 3}, {"length": 2**32, "status_flags": 0}]})
    reader.receive_data(extended(ReplyFlag.DONE, ChunkType.BLOCK_STATUS_EXT, 2, 0, body))
    assert reader.next_event() == ReplyExtents(2, 7, ((2**32, 3), (2**32, 0)))
    assert reader.next_event() == ReplyDone(2)


@pytest.mark.parametrize("hostile", [
    # the offset echo names another request's offset
    extended(ReplyFlag.DONE, ChunkType.NONE, 1, 999),
    # a compact simple reply once extended headers are in use
    wire.SimpleReply.build({"error": 0, "cookie": 1}),
    # descriptor count that does not match the length
    extended(ReplyFlag.DONE, ChunkType.BLOCK_STATUS_EXT, 1, 0,
             bytes.fromhex("00000007 00000002") + bytes(16)),
    # 32-bit block status is not for extended headers
    extended(ReplyFlag.DONE, ChunkType.BLOCK_STATUS, 1, 0, bytes.fromhex("00000007") + bytes(8)),
])
def test_reader_refuses_what_extended_headers_forbid(hostile: bytes) -> None:
    reader = ReplyReader(True, extended=True)
    reader.expect(1, 0, 512)
    reader.receive_data(hostile)
    with pytest.raises(RemoteProtocolError):
        reader.next_event()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**16 - 1), st.sampled_from([1, 2]),
                          st.sampled_from([0, 64]), st.binary(max_size=80)), max_size=4),
       st.binary(max_size=40))
def test_reader_fuzz_only_protocol_errors_escape(
        chunks: list[tuple[int, int, int, int, bytes]], tail: bytes) -> None:
    """Plausible chunks (random types, cookies, offsets and bodies), then noise."""
    reader = ReplyReader(True, extended=True)
    reader.expect(1, 0, 64, memoryview(bytearray(64)))
    reader.expect(2, 64, 64)
    reader.receive_data(b"".join(extended(*chunk) for chunk in chunks) + tail)
    try:
        for _ in range(50):
            if reader.next_event() is NEED_DATA:
                break
    except RemoteProtocolError:
        pass
