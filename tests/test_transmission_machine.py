"""ServerTransmission, the server's sans-IO transmission phase: request bytes in
(in any chunking), events out, replies framed byte for byte as `wire` defines them."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from machine_support import feed, split, take

from nbdverify_protocol import wire
from nbdverify_protocol.buffers import DISCARD_CHUNK, RECEIVE_SIZE
from nbdverify_protocol.constants import (
    BASE_ALLOCATION,
    REQUEST_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from nbdverify_protocol.errors import LocalProtocolError, RemoteProtocolError
from nbdverify_protocol.events import NEED_DATA
from nbdverify_protocol.transmission import (
    MAX_EXTENT_LENGTH,
    MAX_PAYLOAD,
    Disconnect,
    EndOfStream,
    Negotiated,
    Request,
    RequestAnswered,
    RequestCheck,
    ServerTransmission,
    TransmissionEvent,
    build_request,
)

SIZE = 1024 * 1024
FEATURES = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_DF | TransmissionFlag.SEND_CACHE
            | TransmissionFlag.SEND_FAST_ZERO)
STRUCTURED = Negotiated(SIZE, FEATURES, True, ((7, BASE_ALLOCATION),))
SIMPLE = Negotiated(SIZE, FEATURES & ~TransmissionFlag.SEND_DF, False)
R, W, DISC, FLUSH, TRIM, CACHE, WZ, BS = (
    Command.READ, Command.WRITE, Command.DISC, Command.FLUSH, Command.TRIM, Command.CACHE,
    Command.WRITE_ZEROES, Command.BLOCK_STATUS)
FUZZ = settings(max_examples=60, deadline=None)


def request_bytes(command: int, offset: int, length: int, cookie: int, flags: int = 0,
                  payload: bytes = b"") -> bytes:
    """A request as a client sends it, built by construct (the spec in code)."""
    header: bytes = wire.Request.build({"flags": flags, "type": command, "cookie": cookie,
                                        "offset": offset, "length": length})
    return header + payload


def run(session: Negotiated, chunks: Sequence[bytes], end: bool = True
        ) -> list[TransmissionEvent]:
    return feed(ServerTransmission(session), chunks, end)


def answered(cookie: int, command: int, error: Errno, session: Negotiated) -> RequestAnswered:
    """What the machine must say for a refused request: its error as the session frames it."""
    message = f"request refused: {error.name}".encode()
    if session.structured_replies:
        body = wire.ErrorChunk.build({"error": error, "message": message.decode()})
        reply = wire.ChunkHeader.build({"flags": ReplyFlag.DONE, "type": ChunkType.ERROR,
                                        "cookie": cookie, "length": len(body)}) + body
    else:
        reply = wire.SimpleReply.build({"error": error, "cookie": cookie})
    return RequestAnswered(cookie, command, error, reply)


# A conversation with every event type: plain requests, a WRITE with its payload, a
# refused WRITE whose payload is drained, a refused READ, a zero-length READ, DISC.
PAYLOAD = bytes(range(256)) * 16
CONVERSATION = b"".join([
    request_bytes(R, 0, 512, 1),
    request_bytes(W, 4096, len(PAYLOAD), 2, CommandFlag.FUA, PAYLOAD),
    request_bytes(W, SIZE - 10, 100, 3, 0, bytes(100)),  # past the end: ENOSPC, drained
    request_bytes(R, 0, 512, 4, 1 << 9),  # unknown flag: EINVAL
    request_bytes(R, 512, 0, 5),  # zero-length READ: answered by the protocol
    request_bytes(FLUSH, 0, 0, 6),
    request_bytes(BS, 0, SIZE, 7, CommandFlag.REQ_ONE),
    request_bytes(W, 0, 0, 8),  # zero-length WRITE: no payload follows
    request_bytes(TRIM, 0, 4096, 9),
    request_bytes(DISC, 0, 0, 10),
])
EXPECTED = [
    Request(0, R, 1, 0, 512),
    Request(int(CommandFlag.FUA), W, 2, 4096, len(PAYLOAD), bytearray(PAYLOAD)),
    answered(3, W, Errno.ENOSPC, STRUCTURED),
    answered(4, R, Errno.EINVAL, STRUCTURED),
    RequestAnswered(5, R, Errno.OK, wire.ChunkHeader.build(
        {"flags": ReplyFlag.DONE, "type": ChunkType.NONE, "cookie": 5, "length": 0})),
    Request(0, FLUSH, 6, 0, 0),
    Request(int(CommandFlag.REQ_ONE), BS, 7, 0, SIZE),
    Request(0, W, 8, 0, 0, bytearray()),
    Request(0, TRIM, 9, 0, 4096),
    Disconnect(),
    EndOfStream(),
]


def test_one_feed_gives_every_event_type() -> None:
    assert run(STRUCTURED, [CONVERSATION]) == EXPECTED


def test_byte_by_byte_gives_the_same_events() -> None:
    chunks = [CONVERSATION[i:i + 1] for i in range(len(CONVERSATION))]
    assert run(STRUCTURED, chunks) == EXPECTED


@FUZZ
@given(st.lists(st.integers(0, len(CONVERSATION)), max_size=40))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    assert run(STRUCTURED, split(CONVERSATION, cuts)) == EXPECTED


def test_simple_session_frames_refusals_and_zero_length_read_as_simple_replies() -> None:
    data = request_bytes(R, SIZE, 1, 1) + request_bytes(R, 0, 0, 2)
    assert run(SIMPLE, [data]) == [
        answered(1, R, Errno.EINVAL, SIMPLE),
        RequestAnswered(2, R, Errno.OK, wire.SimpleReply.build({"error": 0, "cookie": 2})),
        EndOfStream(),
    ]


def test_bigger_than_the_input_buffer_in_one_feed() -> None:
    """Regression: receive_data of more than the input buffer holds looped forever (the
    full buffer offered no room, and a 0-byte receive reads as end of stream)."""
    count = 2 * RECEIVE_SIZE // 28 + 100
    data = b"".join(request_bytes(R, 0, 512, cookie) for cookie in range(count))
    events = run(STRUCTURED, [data])
    assert [event.cookie for event in events if isinstance(event, Request)] == list(range(count))
    assert events[-1] == EndOfStream()


# --- Streams built by hypothesis ---------------------------------------------------------


@st.composite
def conversations(draw: st.DrawFn) -> tuple[bytes, list[TransmissionEvent]]:
    """A stream of requests, valid and refused, and the events it must give."""
    data = bytearray()
    expected: list[TransmissionEvent] = []
    check = RequestCheck(STRUCTURED)
    for cookie in range(draw(st.integers(0, 12))):
        command = draw(st.sampled_from([R, W, FLUSH, TRIM, CACHE, WZ, BS, 9]))
        flags = draw(st.sampled_from([0, 0, int(CommandFlag.FUA), 1 << 7]))
        offset = draw(st.sampled_from([0, 512, SIZE - 100, SIZE, 2**64 - 1]))
        length = draw(st.sampled_from([0, 1, 100, 700]))
        request = Request(flags, command, cookie, offset, length)
        payload = draw(st.binary(min_size=length, max_size=length)) if command == W else b""
        data += request_bytes(command, offset, length, cookie, flags, payload)
        error = check(request)
        if error:
            expected.append(answered(cookie, command, error, STRUCTURED))
        elif command == R and not length:
            expected.append(RequestAnswered(cookie, R, Errno.OK, wire.ChunkHeader.build(
                {"flags": 1, "type": ChunkType.NONE, "cookie": cookie, "length": 0})))
        else:
            expected.append(request._replace(payload=bytearray(payload))
                            if command == W else request)
    expected.append(EndOfStream())
    return bytes(data), expected


@FUZZ
@given(conversations(), st.lists(st.integers(0, 2**16), max_size=30))
def test_generated_streams_in_any_chunking(
        conversation: tuple[bytes, list[TransmissionEvent]], cuts: list[int]) -> None:
    data, expected = conversation
    assert run(STRUCTURED, [data]) == expected
    assert run(STRUCTURED, split(data, cuts)) == expected


# --- Payloads: zero copy, and drained refusals in bounded memory ------------------------


def test_write_payload_is_received_into_its_own_buffer() -> None:
    machine = ServerTransmission(STRUCTURED)
    length = 1024 * 1024
    machine.receive_data(request_bytes(W, 0, length, 1))
    assert machine.next_event() is NEED_DATA
    target = machine.receive_buffer()
    assert len(target) == length  # the whole payload, not the input buffer's room
    target[:] = b"\x5a" * length
    machine.received(length)
    event = machine.next_event()
    assert isinstance(event, Request) and event.payload is not None
    assert target.obj is event.payload  # the bytes the kernel wrote are the payload
    assert event.payload == b"\x5a" * length


def test_payload_arriving_with_its_header_is_moved_then_received_in_place() -> None:
    machine = ServerTransmission(STRUCTURED)
    length = 64 * 1024
    machine.receive_data(request_bytes(W, 0, length, 1) + b"a" * 1000)
    assert machine.next_event() is NEED_DATA
    target = machine.receive_buffer()
    assert len(target) == length - 1000
    target[:] = b"b" * len(target)
    machine.received(len(target))
    event = machine.next_event()
    assert isinstance(event, Request) and event.payload is not None
    assert target.obj is event.payload
    assert event.payload == b"a" * 1000 + b"b" * (length - 1000)


@pytest.mark.parametrize(("offset", "length", "error"), [
    (0, 200 * 1024 * 1024, Errno.EINVAL),  # over MAX_PAYLOAD
    (SIZE, 5 * DISCARD_CHUNK + 17, Errno.ENOSPC),  # past the end
])
def test_refused_write_payload_is_drained_through_one_scratch_buffer(
        offset: int, length: int, error: Errno) -> None:
    machine = ServerTransmission(STRUCTURED)
    machine.receive_data(request_bytes(W, offset, length, 1))
    tracemalloc.start()
    try:
        scratch = None
        left = length
        while left:
            assert machine.next_event() is NEED_DATA
            target = machine.receive_buffer()
            assert 0 < len(target) <= min(DISCARD_CHUNK, left)
            if scratch is None:
                scratch = target.obj
            assert target.obj is scratch  # reused, not allocated per chunk
            machine.received(len(target))
            left -= len(target)
        event = machine.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert event == answered(1, W, error, STRUCTURED)
    assert peak < 2 * DISCARD_CHUNK
    # The next request is read as usual.
    machine.receive_data(request_bytes(FLUSH, 0, 0, 2))
    assert machine.next_event() == Request(0, FLUSH, 2, 0, 0)


def test_refused_write_drained_by_receive_data_in_big_pieces() -> None:
    machine = ServerTransmission(STRUCTURED)
    length = MAX_PAYLOAD + 1
    machine.receive_data(request_bytes(W, 0, length, 1))
    assert machine.next_event() is NEED_DATA  # refused: what follows is dropped
    piece = bytes(3 * DISCARD_CHUNK + 5)
    tail = bytes(length % len(piece)) + request_bytes(FLUSH, 0, 0, 2)
    tracemalloc.start()
    try:
        for _ in range(length // len(piece)):
            machine.receive_data(piece)
            assert machine.next_event() is NEED_DATA
        machine.receive_data(tail)
        events = take(machine)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert events == [answered(1, W, Errno.EINVAL, STRUCTURED), Request(0, FLUSH, 2, 0, 0)]
    assert peak < 2 * DISCARD_CHUNK


# --- Broken streams ------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 4, 27])
def test_end_of_stream_inside_a_header(cut: int) -> None:
    machine = ServerTransmission(STRUCTURED)
    machine.receive_data(request_bytes(R, 0, 512, 1) + request_bytes(R, 0, 512, 2)[:cut])
    assert machine.next_event() == Request(0, R, 1, 0, 512)
    assert machine.next_event() is NEED_DATA
    machine.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="header"):
        machine.next_event()


@pytest.mark.parametrize("refused", [False, True])
def test_end_of_stream_inside_a_payload(refused: bool) -> None:
    machine = ServerTransmission(STRUCTURED)
    machine.receive_data(request_bytes(W, SIZE if refused else 0, 4096, 1) + bytes(100))
    assert machine.next_event() is NEED_DATA
    machine.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="discard" if refused else "payload"):
        machine.next_event()


def test_end_of_stream_between_requests() -> None:
    machine = ServerTransmission(STRUCTURED)
    machine.receive_data(b"")
    assert machine.next_event() == EndOfStream()
    assert machine.closed


@FUZZ
@given(st.integers(0, 2**32 - 1).filter(lambda magic: magic != REQUEST_MAGIC),
       st.binary(min_size=24, max_size=24))
@example(REQUEST_MAGIC ^ 1, bytes(24))
def test_bad_magic(magic: int, rest: bytes) -> None:
    machine = ServerTransmission(STRUCTURED, request_bytes(FLUSH, 0, 0, 1))
    machine.receive_data(magic.to_bytes(4, "big") + rest)
    assert machine.next_event() == Request(0, FLUSH, 1, 0, 0)
    with pytest.raises(RemoteProtocolError, match="magic"):
        machine.next_event()


def test_nothing_after_disc_is_read_as_a_request() -> None:
    machine = ServerTransmission(STRUCTURED)
    machine.receive_data(request_bytes(DISC, 0, 0, 1) + request_bytes(R, 0, 512, 2) + b"junk")
    assert machine.next_event() == Disconnect()
    assert machine.closed
    assert machine.next_event() is NEED_DATA
    machine.receive_data(b"")
    assert machine.next_event() == EndOfStream()


def test_disc_ends_reading_whatever_its_flags() -> None:
    assert run(STRUCTURED, [request_bytes(DISC, 5, 7, 1, 0xFFFF)]) == [Disconnect(),
                                                                      EndOfStream()]


def test_initial_bytes_are_read_first() -> None:
    second = request_bytes(R, 0, 2, 2)
    machine = ServerTransmission(STRUCTURED, request_bytes(R, 0, 1, 1) + second[:5])
    machine.receive_data(second[5:])
    assert take(machine) == [Request(0, R, 1, 0, 1), Request(0, R, 2, 0, 2)]


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """Mostly well-formed headers (so the fuzz reaches past the magic), some noise."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            parts.append(request_bytes(draw(st.integers(0, 12)), draw(st.integers(0, 2 * SIZE)),
                                       draw(st.sampled_from([0, 3, 512, 2**32 - 1])),
                                       draw(st.integers(0, 2**64 - 1)),
                                       draw(st.integers(0, 0xFFFF))))
        parts.append(draw(st.binary(max_size=600)))
    return b"".join(parts)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([STRUCTURED, SIMPLE, replace(STRUCTURED, export_size=0)]),
       hostile_bytes(), st.lists(st.integers(0, 2**12), max_size=8), st.booleans())
def test_arbitrary_bytes_raise_only_remote_protocol_error(
        session: Negotiated, data: bytes, cuts: list[int], end: bool) -> None:
    try:
        events = run(session, split(data, cuts), end)
    except RemoteProtocolError:
        return
    for event in events:
        if isinstance(event, Request):
            assert not RequestCheck(session)(event)
            assert event.command != W or event.payload is not None


# --- Reply framing, byte for byte as construct builds it --------------------------------


def chunk(kind: int, cookie: int, body: bytes) -> bytes:
    header: bytes = wire.ChunkHeader.build({"flags": ReplyFlag.DONE, "type": kind,
                                            "cookie": cookie, "length": len(body)})
    return header + body


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(0, SIZE), st.binary(max_size=100),
       st.booleans())
def test_read_reply_matches_construct(cookie: int, offset: int, data: bytes,
                                      structured: bool) -> None:
    machine = ServerTransmission(STRUCTURED if structured else SIMPLE)
    request = Request(0, R, cookie, offset, len(data))
    buffer = bytearray(machine.read_headroom) + data
    reply = machine.read_reply(request, buffer)
    assert reply is buffer  # the header went into the headroom: no copy
    if structured:
        expected = chunk(ChunkType.OFFSET_DATA, cookie,
                         wire.OffsetDataChunk.build({"offset": offset, "data": data}))
    else:
        expected = wire.SimpleReply.build({"error": 0, "cookie": cookie}) + data
    assert bytes(reply) == expected


@pytest.mark.parametrize("structured", [True, False])
def test_read_reply_of_the_wrong_length_is_our_mistake(structured: bool) -> None:
    machine = ServerTransmission(STRUCTURED if structured else SIMPLE)
    request = Request(0, R, 1, 0, 10)
    with pytest.raises(LocalProtocolError):
        machine.read_reply(request, bytearray(machine.read_headroom + 9))


@FUZZ
@given(st.integers(0, 2**64 - 1), st.sampled_from([W, FLUSH, TRIM, CACHE, WZ]),
       st.booleans())
def test_done_reply_is_a_simple_reply_in_both_sessions(cookie: int, command: int,
                                                       structured: bool) -> None:
    machine = ServerTransmission(STRUCTURED if structured else SIMPLE)
    assert machine.done_reply(Request(0, command, cookie, 0, 1)) == wire.SimpleReply.build(
        {"error": 0, "cookie": cookie})


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**64 - 1), st.sampled_from(list(Errno)[1:]),
       st.text(max_size=300), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_error_reply_matches_construct(cookie: int, error: Errno, message: str,
                                       offset: int | None) -> None:
    request = Request(0, R, cookie, 0, 512)
    simple = ServerTransmission(SIMPLE).error_reply(request, error, message, offset)
    assert simple == wire.SimpleReply.build({"error": error, "cookie": cookie})
    structured = ServerTransmission(STRUCTURED).error_reply(request, error, message, offset)
    text = message.encode()[:256].decode("utf-8", "ignore")
    if offset is None:
        expected = chunk(ChunkType.ERROR, cookie,
                         wire.ErrorChunk.build({"error": error, "message": text}))
    else:
        expected = chunk(ChunkType.ERROR_OFFSET, cookie, wire.ErrorOffsetChunk.build(
            {"error": error, "message": text, "offset": offset}))
    assert structured == expected


def block_status(cookie: int, context_id: int, extents: Sequence[tuple[int, int]]) -> bytes:
    return chunk(ChunkType.BLOCK_STATUS, cookie, wire.BlockStatusChunk.build(
        {"context_id": context_id,
         "descriptors": [{"length": n, "status_flags": s} for n, s in extents]}))


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 3)), min_size=1,
                max_size=20),
       st.booleans())
def test_block_status_reply_matches_construct(cookie: int, context_id: int,
                                              extents: list[tuple[int, int]],
                                              req_one: bool) -> None:
    machine = ServerTransmission(replace(STRUCTURED,
                                         meta_contexts=((context_id, BASE_ALLOCATION),)))
    flags = int(CommandFlag.REQ_ONE) if req_one else 0
    reply = machine.block_status_reply(Request(flags, BS, cookie, 0, SIZE), extents)
    assert reply == block_status(cookie, context_id, extents[:1] if req_one else extents)


@pytest.mark.parametrize(("length", "described"), [
    (4096, 4096),
    (2**32 - 1, MAX_EXTENT_LENGTH),  # one descriptor must not overflow 32 bits
])
def test_empty_block_status_answer_says_allocated(length: int, described: int) -> None:
    machine = ServerTransmission(replace(STRUCTURED, export_size=2**40))
    request = Request(0, BS, 3, 0, length)
    assert machine.block_status_length(request) == described
    assert machine.block_status_reply(request, []) == block_status(3, 7, [(described, 0)])


# --- RequestCheck against the spec's rules, written out plainly --------------------------


def spec_error(request: Request, session: Negotiated) -> Errno:
    """The NBD spec's rules for a request the server must refuse, in its own terms
    (enum flags, one rule per sentence), as an independent oracle for RequestCheck."""
    try:
        command = Command(request.command)
    except ValueError:
        return Errno.EINVAL  # an unknown command
    allowed = {
        R: CommandFlag.FUA | CommandFlag.DF, W: CommandFlag.FUA, DISC: CommandFlag(0),
        FLUSH: CommandFlag.FUA, TRIM: CommandFlag.FUA, CACHE: CommandFlag(0),
        WZ: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
        BS: CommandFlag.FUA | CommandFlag.REQ_ONE,
    }[command]
    advertised = session.transmission_flags
    if advertised & TransmissionFlag.SEND_FUA:
        allowed |= CommandFlag.FUA  # "MUST accept all commands with this bit set"
    if not advertised & TransmissionFlag.SEND_FAST_ZERO:
        allowed &= ~CommandFlag.FAST_ZERO
    if not session.structured_replies:
        allowed &= ~CommandFlag.DF
    if request.flags & ~int(allowed):
        return Errno.EINVAL
    if command in (DISC, FLUSH):
        return Errno.OK
    if advertised & TransmissionFlag.READ_ONLY and command in (W, TRIM, WZ):
        return Errno.EPERM
    if command == BS and (not session.meta_contexts or request.length == 0):
        return Errno.EINVAL
    if command == R and request.length > MAX_PAYLOAD:
        return Errno.EOVERFLOW
    if command == W and request.length > MAX_PAYLOAD:
        return Errno.EINVAL
    if request.offset + request.length > session.export_size:
        return Errno.ENOSPC if command in (W, WZ) else Errno.EINVAL
    return Errno.OK


sessions = st.builds(
    Negotiated,
    export_size=st.sampled_from([0, 512, SIZE, 2 * MAX_PAYLOAD, 2**63]),
    transmission_flags=st.integers(0, 2**12 - 1).map(TransmissionFlag),
    structured_replies=st.booleans(),
    meta_contexts=st.sampled_from([(), ((1, BASE_ALLOCATION),)]),
)
requests = st.builds(
    Request,
    flags=st.one_of(st.integers(0, 0x3F), st.integers(0, 0xFFFF)),
    command=st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),
    cookie=st.just(1),
    offset=st.one_of(st.sampled_from([0, 512, SIZE, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.sampled_from([0, 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2**32 - 1]),
                     st.integers(0, 2**32 - 1)),
    payload=st.none(),  # a header as it arrives: the machine attaches a WRITE's payload
)


@settings(max_examples=400, deadline=None)
@given(requests, sessions)
def test_request_check_follows_the_spec_rules(request: Request, session: Negotiated) -> None:
    assert RequestCheck(session)(request) is spec_error(request, session)


@settings(max_examples=100, deadline=None)
@given(requests, sessions)
def test_machine_refuses_exactly_what_request_check_refuses(request: Request,
                                                            session: Negotiated) -> None:
    error = RequestCheck(session)(request)
    if request.command == W and not error:
        request = request._replace(length=min(request.length, 4096),
                          offset=0)  # keep accepted payloads small
        session = replace(session, export_size=max(session.export_size, 4096))
        error = RequestCheck(session)(request)
    payload = bytes(request.length) if request.command == W and not error else b""
    machine = ServerTransmission(session, build_request(
        request.command, request.offset, request.length, request.cookie,
        request.flags) + payload)
    event = machine.next_event()
    if request.command == DISC:
        assert event == Disconnect()
    elif error:
        if request.command == W and request.length:  # its payload is still to come
            assert event is NEED_DATA
            machine.receive_data(bytes(min(request.length, 2 * DISCARD_CHUNK)))
            event = machine.next_event()
            if request.length > 2 * DISCARD_CHUNK:
                assert event is NEED_DATA
                return
        assert event == answered(request.cookie, request.command, error, session)
    elif request.command == R and not request.length:
        assert isinstance(event, RequestAnswered) and event.error is Errno.OK
    else:
        assert event == (request._replace(payload=bytearray(payload))
                         if request.command == W else request)
