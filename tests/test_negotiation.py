"""ServerNegotiation driven purely by bytes built from the `wire` structures."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nbdverify_protocol import wire
from nbdverify_protocol.constants import (
    BASE_ALLOCATION,
    MAX_ERROR_MESSAGE,
    ClientFlag,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReplyType,
    TransmissionFlag,
)
from nbdverify_protocol.errors import LocalProtocolError, RemoteProtocolError
from nbdverify_protocol.events import (
    BlockSize,
    ClientRequest,
    Event,
    ExportDetails,
    ExportInfoRequested,
    ExportList,
    ExportListing,
    ExportListRequested,
    ExportNameChosen,
    MetaContextsGranted,
    MetaContextsRequested,
    NegotiationAborted,
    OptionRefused,
    ServerDecision,
)
from nbdverify_protocol.negotiation import (
    NEED_DATA,
    OPTION_HEADER_SIZE,
    ServerNegotiation,
    State,
    match_meta_contexts,
)
from nbdverify_protocol.transmission import Negotiated, build_request

# --- Client side helpers ----------------------------------------------------------------

ALL_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
SIZE = 8 * 1024 * 1024
FLAGS = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_DF
)
DISK = ExportDetails(
    name="disk",
    size=SIZE,
    transmission_flags=FLAGS,
    description="a verified disk",
    block_size=BlockSize(1, 4096, 64 * 1024 * 1024),
)
# The first request a client pipelines after GO.
FIRST_REQUEST = build_request(command=0, offset=0, length=512, cookie=0xC0FFEE)


def client_flags(flags: int) -> bytes:
    return bytes(wire.ClientFlags.build({"client_flags": flags}))


def option(number: int, payload: bytes = b"") -> bytes:
    header = wire.OptionHeader.build({"option": number, "length": len(payload)})
    return bytes(header) + payload


def info(name: str, *info_types: int, go: bool = False) -> bytes:
    payload = wire.InfoRequest.build({"name": name, "info_types": list(info_types)})
    return option(Option.GO if go else Option.INFO, bytes(payload))


def meta(number: int, export_name: str, *queries: str) -> bytes:
    payload = wire.MetaContextRequest.build({"export_name": export_name, "queries": list(queries)})
    return option(number, bytes(payload))


def state_of(machine: ServerNegotiation) -> State:
    """The machine's state, read through a call so that mypy does not narrow it."""
    return machine.state


def negotiated_of(machine: ServerNegotiation) -> Negotiated | None:
    return machine.negotiated


def structured_of(machine: ServerNegotiation) -> bool:
    return machine.structured_replies


@dataclass(frozen=True)
class Reply:
    option: int
    reply_type: int
    payload: bytes


def parse_replies(data: bytes) -> list[Reply]:
    """Split server output into option replies; fails on any malformed framing."""
    replies = []
    position = 0
    header_size = wire.OptionReplyHeader.sizeof()
    while position < len(data):
        header = wire.OptionReplyHeader.parse(data[position : position + header_size])
        position += header_size
        payload = data[position : position + header.length]
        assert len(payload) == header.length, "truncated option reply"
        position += header.length
        replies.append(Reply(int(header.option), int(header.reply_type), bytes(payload)))
    return replies


def start(
    flags: int = ALL_FLAGS,
    handshake_flags: HandshakeFlag = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
    max_option_length: int | None = None,
) -> ServerNegotiation:
    """A machine past the greeting and the client flags, waiting for options."""
    if max_option_length is None:
        machine = ServerNegotiation(handshake_flags)
    else:
        machine = ServerNegotiation(handshake_flags, max_option_length)
    assert len(machine.data_to_send()) == wire.ServerGreeting.sizeof()
    machine.receive_data(client_flags(flags))
    assert machine.next_event() is NEED_DATA
    assert state_of(machine) is State.AWAIT_OPTION
    return machine


def event_for(machine: ServerNegotiation, data: bytes) -> Event:
    """Feed one option and return the event it produces."""
    machine.receive_data(data)
    event = machine.next_event()
    assert isinstance(event, Event), f"expected an event, got {event!r}"
    return event


def replies_for(machine: ServerNegotiation, data: bytes) -> list[Reply]:
    """Feed an option the machine answers by itself; return its replies."""
    machine.receive_data(data)
    assert machine.next_event() is NEED_DATA
    assert state_of(machine) is State.AWAIT_OPTION
    return parse_replies(machine.data_to_send())


def decide(machine: ServerNegotiation, decision: ServerDecision) -> list[Reply]:
    machine.send(decision)
    return parse_replies(machine.data_to_send())


def go(machine: ServerNegotiation, name: str = "disk", details: ExportDetails = DISK) -> None:
    event = event_for(machine, info(name, go=True))
    assert event == ExportInfoRequested(name, (), go=True)
    replies = decide(machine, details)
    assert replies[-1] == Reply(Option.GO, OptionReplyType.ACK, b"")
    assert state_of(machine) is State.TRANSMISSION


def assert_error(replies: list[Reply], number: int, error: OptionReplyType) -> None:
    assert len(replies) == 1
    assert replies[0].option == number
    assert replies[0].reply_type == error
    message = replies[0].payload.decode("utf-8")  # errors carry a UTF-8 message
    assert len(message.encode()) <= MAX_ERROR_MESSAGE


def info_replies(replies: list[Reply]) -> dict[int, bytes]:
    """The NBD_REP_INFO payloads by info type (each type at most once)."""
    infos: dict[int, bytes] = {}
    for reply in replies:
        if reply.reply_type == OptionReplyType.INFO:
            info_type = int.from_bytes(reply.payload[:2], "big")
            assert info_type not in infos
            infos[info_type] = reply.payload
    return infos


# --- Greeting and client flags -------------------------------------------------------


def test_greeting_bytes() -> None:
    machine = ServerNegotiation()
    assert state_of(machine) is State.AWAIT_CLIENT_FLAGS
    assert machine.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert machine.data_to_send() == b""  # handed over once
    assert machine.next_event() is NEED_DATA


def test_greeting_without_no_zeroes() -> None:
    machine = ServerNegotiation(HandshakeFlag.FIXED_NEWSTYLE)
    assert machine.data_to_send() == b"NBDMAGICIHAVEOPT\x00\x01"


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x2, 0x3])
def test_known_client_flags_accepted(flags: int) -> None:
    machine = ServerNegotiation()
    machine.data_to_send()
    machine.receive_data(client_flags(flags)[:3])
    assert machine.next_event() is NEED_DATA
    assert state_of(machine) is State.AWAIT_CLIENT_FLAGS
    machine.receive_data(client_flags(flags)[3:])
    assert machine.next_event() is NEED_DATA
    assert state_of(machine) is State.AWAIT_OPTION
    assert machine.client_flags == flags
    assert machine.data_to_send() == b""


@pytest.mark.parametrize(
    ("handshake_flags", "flags"),
    [
        pytest.param(
            HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 0x80000001, id="bit31"
        ),
        pytest.param(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 0x4, id="bit2"),
        pytest.param(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 0x7, id="bit2+known"),
        pytest.param(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 0xFFFFFFFF, id="all"),
        pytest.param(HandshakeFlag.FIXED_NEWSTYLE, 0x3, id="no-zeroes-not-offered"),
        pytest.param(HandshakeFlag.FIXED_NEWSTYLE, 0x2, id="only-no-zeroes-not-offered"),
        pytest.param(HandshakeFlag.NO_ZEROES, 0x1, id="fixed-not-offered"),
    ],
)
def test_unknown_or_unoffered_client_flags_close(
    handshake_flags: HandshakeFlag, flags: int
) -> None:
    """SPEC: the server MUST drop the connection on an unknown or unoffered flag."""
    machine = ServerNegotiation(handshake_flags)
    machine.data_to_send()
    machine.receive_data(client_flags(flags))
    with pytest.raises(RemoteProtocolError):
        machine.next_event()
    assert state_of(machine) is State.CLOSED
    assert machine.data_to_send() == b""


# --- Option framing ------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"IHAVEOPX", b"NBDMAGIC", bytes(8), b"\xff" * 8])
def test_bad_option_magic(magic: bytes) -> None:
    machine = start()
    machine.receive_data(magic + (Option.GO).to_bytes(4, "big") + bytes(4))
    with pytest.raises(RemoteProtocolError):
        machine.next_event()
    assert state_of(machine) is State.CLOSED
    assert machine.data_to_send() == b""


def test_partial_option_header_needs_data() -> None:
    machine = start()
    machine.receive_data(b"IHAVE")  # not enough to judge the magic yet
    assert machine.next_event() is NEED_DATA
    assert state_of(machine) is State.AWAIT_OPTION


@pytest.mark.parametrize(
    "data",
    [
        option(Option.LIST),
        info("disk", go=True),
        option(Option.STRUCTURED_REPLY),
        option(Option.ABORT),
        option(99, b"xx"),
    ],
    ids=["LIST", "GO", "STRUCTURED_REPLY", "ABORT", "unknown"],
)
def test_non_fixed_newstyle_allows_only_export_name(data: bytes) -> None:
    machine = start(flags=0)
    machine.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        machine.next_event()
    assert state_of(machine) is State.CLOSED
    assert machine.data_to_send() == b""


# --- NBD_OPT_EXPORT_NAME ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "zeroes"), [(0x0, True), (0x1, True), (0x2, False), (0x3, False)]
)
def test_export_name_accepted(flags: int, zeroes: bool) -> None:
    machine = start(flags=flags)
    event = event_for(machine, option(Option.EXPORT_NAME, b"disk"))
    assert event == ExportNameChosen("disk")
    assert state_of(machine) is State.AWAIT_DECISION
    machine.send(DISK)
    out = machine.data_to_send()
    expected_flags = FLAGS | TransmissionFlag.HAS_FLAGS
    expected_flags &= ~TransmissionFlag.SEND_DF  # no structured replies here
    if zeroes:
        assert len(out) == 8 + 2 + 124
        parsed = wire.ExportNameReplyWithZeroes.parse(out)
        assert out[10:] == bytes(124)
    else:
        assert len(out) == 8 + 2
        parsed = wire.ExportNameReply.parse(out)
    assert parsed.size == SIZE
    assert parsed.transmission_flags == expected_flags
    assert state_of(machine) is State.TRANSMISSION
    assert machine.negotiated == Negotiated(
        export_size=SIZE,
        transmission_flags=TransmissionFlag(expected_flags),
        structured_replies=False,
        meta_contexts=(),
    )


def test_export_name_utf8_and_empty() -> None:
    machine = start()
    assert event_for(machine, option(Option.EXPORT_NAME, "dïsk€".encode())) == ExportNameChosen(
        "dïsk€"
    )
    machine = start()
    assert event_for(machine, option(Option.EXPORT_NAME)) == ExportNameChosen("")


def test_export_name_refused_closes_silently() -> None:
    machine = start()
    event_for(machine, option(Option.EXPORT_NAME, b"nope"))
    machine.send(OptionRefused(OptionReplyType.ERR_UNKNOWN, "no such export"))
    assert state_of(machine) is State.CLOSED
    assert machine.data_to_send() == b""  # EXPORT_NAME has no error reply
    assert machine.negotiated is None


def test_export_name_invalid_utf8_is_a_protocol_error() -> None:
    machine = start()
    machine.receive_data(option(Option.EXPORT_NAME, b"\xff\xfe"))
    with pytest.raises(RemoteProtocolError):
        machine.next_event()
    assert state_of(machine) is State.CLOSED


def test_export_name_after_structured_reply_keeps_df() -> None:
    machine = start()
    replies_for(machine, option(Option.STRUCTURED_REPLY))
    event_for(machine, option(Option.EXPORT_NAME, b"disk"))
    machine.send(DISK)
    parsed = wire.ExportNameReply.parse(machine.data_to_send())
    assert parsed.transmission_flags == FLAGS | TransmissionFlag.HAS_FLAGS
    assert machine.negotiated is not None
    assert machine.negotiated.structured_replies


# --- NBD_OPT_ABORT ---------------------------------------------------------------------


def test_abort_acks_and_closes() -> None:
    machine = start()
    event = event_for(machine, option(Option.ABORT))
    assert event == NegotiationAborted()
    assert state_of(machine) is State.CLOSED
    assert parse_replies(machine.data_to_send()) == [Reply(Option.ABORT, OptionReplyType.ACK, b"")]
    with pytest.raises(LocalProtocolError):
        machine.next_event()
    with pytest.raises(LocalProtocolError):
        machine.receive_data(option(Option.LIST))
    with pytest.raises(LocalProtocolError):
        machine.send(ExportList(()))


# --- NBD_OPT_LIST ----------------------------------------------------------------------


def test_list_replies_server_entries_then_ack() -> None:
    machine = start()
    assert event_for(machine, option(Option.LIST)) == ExportListRequested()
    assert state_of(machine) is State.AWAIT_DECISION
    replies = decide(
        machine, ExportList((ExportListing("disk", "the disk"), ExportListing("ëxtra")))
    )
    assert [(r.option, r.reply_type) for r in replies] == [
        (Option.LIST, OptionReplyType.SERVER),
        (Option.LIST, OptionReplyType.SERVER),
        (Option.LIST, OptionReplyType.ACK),
    ]
    first = wire.ServerEntry.parse(replies[0].payload)
    assert (first.name, first.description) == ("disk", "the disk")
    assert replies[0].payload == b"\x00\x00\x00\x04disk" + b"the disk"
    second = wire.ServerEntry.parse(replies[1].payload)
    assert (second.name, second.description) == ("ëxtra", "")
    assert replies[2].payload == b""
    assert state_of(machine) is State.AWAIT_OPTION
    assert machine.next_event() is NEED_DATA


def test_empty_list() -> None:
    machine = start()
    event_for(machine, option(Option.LIST))
    assert decide(machine, ExportList(())) == [Reply(Option.LIST, OptionReplyType.ACK, b"")]


def test_list_with_payload_is_invalid_and_negotiation_continues() -> None:
    machine = start()
    assert_error(
        replies_for(machine, option(Option.LIST, b"junk")), Option.LIST, OptionReplyType.ERR_INVALID
    )
    go(machine)


def test_list_refused_by_application() -> None:
    machine = start()
    event_for(machine, option(Option.LIST))
    replies = decide(machine, OptionRefused(OptionReplyType.ERR_POLICY, "x" * 1000))
    assert_error(replies, Option.LIST, OptionReplyType.ERR_POLICY)
    assert state_of(machine) is State.AWAIT_OPTION


# --- Options the machine answers itself -----------------------------------------------


@pytest.mark.parametrize(
    ("number", "payload"),
    [
        (99, b"some payload"),
        (0, b""),
        (2**32 - 1, b"\x00" * 3),
        (Option.PEEK_EXPORT, b""),
    ],
)
def test_unsupported_option_then_go(number: int, payload: bytes) -> None:
    machine = start()
    replies = replies_for(machine, option(number, payload))
    assert_error(replies, number, OptionReplyType.ERR_UNSUP)
    go(machine)


def test_starttls_unsupported() -> None:
    machine = start()
    replies = replies_for(machine, option(Option.STARTTLS))
    assert_error(replies, Option.STARTTLS, OptionReplyType.ERR_UNSUP)


def test_structured_reply_ack() -> None:
    machine = start()
    assert not structured_of(machine)
    replies = replies_for(machine, option(Option.STRUCTURED_REPLY))
    assert replies == [Reply(Option.STRUCTURED_REPLY, OptionReplyType.ACK, b"")]
    assert structured_of(machine)
    go(machine)
    assert machine.negotiated is not None
    assert machine.negotiated.structured_replies


def test_structured_reply_with_payload_is_invalid() -> None:
    machine = start()
    replies = replies_for(machine, option(Option.STRUCTURED_REPLY, b"\x00"))
    assert_error(replies, Option.STRUCTURED_REPLY, OptionReplyType.ERR_INVALID)
    assert not machine.structured_replies


# --- NBD_OPT_INFO and NBD_OPT_GO ------------------------------------------------------------


def test_info_then_go() -> None:
    machine = start()
    types = (InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE)
    event = event_for(machine, info("disk", *types))
    assert event == ExportInfoRequested("disk", tuple(types), go=False)
    assert state_of(machine) is State.AWAIT_DECISION

    replies = decide(machine, DISK)
    assert all(reply.option == Option.INFO for reply in replies)
    assert replies[-1].reply_type == OptionReplyType.ACK
    assert [r.reply_type for r in replies[:-1]] == [OptionReplyType.INFO] * 4
    infos = info_replies(replies)
    flags = (FLAGS | TransmissionFlag.HAS_FLAGS) & ~TransmissionFlag.SEND_DF
    export = wire.InfoExport.parse(infos[InfoType.EXPORT])
    assert (export.size, export.transmission_flags) == (SIZE, flags)
    assert wire.InfoName.parse(infos[InfoType.NAME]).name == "disk"
    assert wire.InfoDescription.parse(infos[InfoType.DESCRIPTION]).description == "a verified disk"
    block = wire.InfoBlockSize.parse(infos[InfoType.BLOCK_SIZE])
    assert (block.minimum, block.preferred, block.maximum) == (1, 4096, 64 * 1024 * 1024)
    # INFO leaves negotiation open.
    assert state_of(machine) is State.AWAIT_OPTION
    assert machine.negotiated is None

    event = event_for(machine, info("disk", InfoType.BLOCK_SIZE, go=True))
    assert event == ExportInfoRequested("disk", (InfoType.BLOCK_SIZE,), go=True)
    replies = decide(machine, DISK)
    assert all(reply.option == Option.GO for reply in replies)
    assert replies[-1] == Reply(Option.GO, OptionReplyType.ACK, b"")
    assert set(info_replies(replies)) == {InfoType.EXPORT, InfoType.BLOCK_SIZE}
    assert state_of(machine) is State.TRANSMISSION
    assert negotiated_of(machine) == Negotiated(
        export_size=SIZE,
        transmission_flags=TransmissionFlag(flags),
        structured_replies=False,
        meta_contexts=(),
    )
    assert machine.trailing_data == b""


def test_go_without_info_requests_sends_only_export_info() -> None:
    machine = start()
    event_for(machine, info("", go=True))
    replies = decide(machine, DISK)
    assert set(info_replies(replies)) == {InfoType.EXPORT}
    assert len(replies) == 2


def test_info_skips_what_the_export_lacks() -> None:
    machine = start()
    event_for(machine, info("bare", InfoType.DESCRIPTION, InfoType.BLOCK_SIZE, 77))
    bare = ExportDetails(name="bare", size=0, transmission_flags=TransmissionFlag(0))
    replies = decide(machine, bare)
    infos = info_replies(replies)
    assert set(infos) == {InfoType.EXPORT}  # no description, no block size, unknown 77 ignored
    export = wire.InfoExport.parse(infos[InfoType.EXPORT])
    assert export.transmission_flags == TransmissionFlag.HAS_FLAGS


def test_info_description_is_cut_to_4096_bytes() -> None:
    machine = start()
    event_for(machine, info("disk", InfoType.DESCRIPTION))
    long = ExportDetails(
        name="disk", size=1, transmission_flags=TransmissionFlag(0), description="é" * 3000
    )
    infos = info_replies(decide(machine, long))
    description = wire.InfoDescription.parse(infos[InfoType.DESCRIPTION]).description
    assert description == "é" * 2048


def test_go_refused_then_go_again() -> None:
    machine = start()
    event_for(machine, info("missing", go=True))
    replies = decide(machine, OptionRefused(OptionReplyType.ERR_UNKNOWN, "no such export"))
    assert_error(replies, Option.GO, OptionReplyType.ERR_UNKNOWN)
    assert replies[0].payload == b"no such export"
    assert state_of(machine) is State.AWAIT_OPTION
    assert machine.negotiated is None
    go(machine)


def _info_payload_with(name_length: int, name: bytes, tail: bytes) -> bytes:
    return name_length.to_bytes(4, "big") + name + tail


@pytest.mark.parametrize("number", [Option.INFO, Option.GO])
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_info_payload_with(100, b"disk", b"\x00\x00"), id="namelen-too-big"),
        pytest.param(_info_payload_with(2, b"disk", b"\x00\x00"), id="namelen-too-small"),
        pytest.param(_info_payload_with(4, b"disk", b"\x00\x00extra"), id="trailing-bytes"),
        pytest.param(_info_payload_with(4, b"disk", b"\x00\x02\x00\x01"), id="missing-type"),
        pytest.param(_info_payload_with(4, b"disk", b""), id="no-count"),
        pytest.param(_info_payload_with(2, b"\xff\xfe", b"\x00\x00"), id="bad-utf8"),
        pytest.param(b"", id="empty"),
    ],
)
def test_info_inconsistent_payload_is_invalid(number: int, payload: bytes) -> None:
    machine = start()
    replies = replies_for(machine, option(number, payload))
    assert_error(replies, number, OptionReplyType.ERR_INVALID)
    go(machine)


# --- SEND_DF ------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_send_df_only_with_structured_replies(structured: bool) -> None:
    machine = start()
    if structured:
        replies_for(machine, option(Option.STRUCTURED_REPLY))
    event_for(machine, info("disk", go=True))
    infos = info_replies(decide(machine, DISK))
    advertised = wire.InfoExport.parse(infos[InfoType.EXPORT]).transmission_flags
    assert bool(advertised & TransmissionFlag.SEND_DF) is structured
    assert advertised & TransmissionFlag.HAS_FLAGS
    assert machine.negotiated is not None
    assert machine.negotiated.transmission_flags == advertised
    assert bool(machine.negotiated.transmission_flags & TransmissionFlag.SEND_DF) is structured


# --- Metadata contexts ------------------------------------------------------------------


@pytest.mark.parametrize("number", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_meta_context_needs_structured_replies(number: int) -> None:
    machine = start()
    replies = replies_for(machine, meta(number, "disk", BASE_ALLOCATION))
    assert_error(replies, number, OptionReplyType.ERR_INVALID)
    go(machine)
    assert machine.negotiated is not None
    assert machine.negotiated.meta_contexts == ()


def structured() -> ServerNegotiation:
    machine = start()
    replies_for(machine, option(Option.STRUCTURED_REPLY))
    return machine


def select_allocation(machine: ServerNegotiation, export_name: str, context_id: int) -> None:
    event = event_for(machine, meta(Option.SET_META_CONTEXT, export_name, BASE_ALLOCATION))
    assert event == MetaContextsRequested(export_name, (BASE_ALLOCATION,), select=True)
    replies = decide(machine, MetaContextsGranted(((context_id, BASE_ALLOCATION),)))
    assert [(r.option, r.reply_type) for r in replies] == [
        (Option.SET_META_CONTEXT, OptionReplyType.META_CONTEXT),
        (Option.SET_META_CONTEXT, OptionReplyType.ACK),
    ]
    reply = wire.MetaContextReply.parse(replies[0].payload)
    assert (reply.context_id, reply.name) == (context_id, BASE_ALLOCATION)
    assert state_of(machine) is State.AWAIT_OPTION


def test_set_meta_context_then_go_same_export() -> None:
    machine = structured()
    select_allocation(machine, "disk", 0x1234ABCD)
    go(machine, "disk")
    assert machine.negotiated is not None
    assert machine.negotiated.meta_contexts == ((0x1234ABCD, BASE_ALLOCATION),)


def test_set_meta_context_then_go_other_export() -> None:
    machine = structured()
    select_allocation(machine, "disk", 7)
    go(machine, "other", ExportDetails("other", SIZE, FLAGS))
    assert machine.negotiated is not None
    assert machine.negotiated.meta_contexts == ()


def test_set_meta_context_then_export_name() -> None:
    machine = structured()
    select_allocation(machine, "disk", 3)
    event_for(machine, option(Option.EXPORT_NAME, b"disk"))
    machine.send(DISK)
    assert machine.negotiated is not None
    assert machine.negotiated.meta_contexts == ((3, BASE_ALLOCATION),)


def test_later_set_meta_context_replaces_earlier() -> None:
    machine = structured()
    select_allocation(machine, "disk", 1)
    select_allocation(machine, "disk", 2)
    go(machine)
    assert machine.negotiated is not None
    assert machine.negotiated.meta_contexts == ((2, BASE_ALLOCATION),)


def test_list_meta_context_does_not_select() -> None:
    machine = structured()
    event = event_for(machine, meta(Option.LIST_META_CONTEXT, "disk"))
    assert event == MetaContextsRequested("disk", (), select=False)
    replies = decide(machine, MetaContextsGranted(((0, BASE_ALLOCATION),)))
    assert [r.reply_type for r in replies] == [OptionReplyType.META_CONTEXT, OptionReplyType.ACK]
    assert all(r.option == Option.LIST_META_CONTEXT for r in replies)
    go(machine)
    assert machine.negotiated is not None
    assert machine.negotiated.meta_contexts == ()


@pytest.mark.parametrize("how", ["refused-by-app", "malformed"])
def test_failed_set_meta_context_clears_selection(how: str) -> None:
    """SPEC proto.md NBD_OPT_SET_META_CONTEXT: "Issuing this command replaces all
    previously-set metadata contexts (including when this command fails)"."""
    machine = structured()
    select_allocation(machine, "disk", 5)
    if how == "refused-by-app":
        event_for(machine, meta(Option.SET_META_CONTEXT, "disk", BASE_ALLOCATION))
        replies = decide(machine, OptionRefused(OptionReplyType.ERR_POLICY))
    else:
        replies = replies_for(machine, option(Option.SET_META_CONTEXT, b"\x00\x00\x00\x09disk"))
    assert replies[0].reply_type in (OptionReplyType.ERR_POLICY, OptionReplyType.ERR_INVALID)
    go(machine)
    assert machine.negotiated is not None
    assert machine.negotiated.meta_contexts == ()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00\x00\x00\x04disk\x00\x00\x00\x01", id="missing-query"),
        pytest.param(b"\x00\x00\x00\x04disk\x00\x00\x00\x00extra", id="trailing-bytes"),
        pytest.param(b"\x00\x00\x00\x04disk", id="no-count"),
        pytest.param(b"\x00\x00\x00\x01\xff\x00\x00\x00\x00", id="bad-utf8"),
    ],
)
def test_malformed_meta_context_is_invalid(payload: bytes) -> None:
    machine = structured()
    replies = replies_for(machine, option(Option.SET_META_CONTEXT, payload))
    assert_error(replies, Option.SET_META_CONTEXT, OptionReplyType.ERR_INVALID)


SUPPORTED = ["base:allocation", "base:other", "qemu:dirty-bitmap:x"]


@pytest.mark.parametrize(
    ("queries", "listing", "expected"),
    [
        ([], True, SUPPORTED),
        ([], False, []),
        (["base:"], True, ["base:allocation", "base:other"]),
        (["base:"], False, []),
        (["qemu:"], True, ["qemu:dirty-bitmap:x"]),
        (["base:allocation"], False, ["base:allocation"]),
        (["base:allocation"], True, ["base:allocation"]),
        (["base:unknown", "x-foo:bar", "nonsense"], False, []),
        (["base:unknown", "x-foo:bar", "nonsense"], True, []),
        (["base:allocation", "base:allocation"], False, ["base:allocation"]),
        (["base:allocation", "base:"], True, ["base:allocation", "base:other"]),
        (["base:other", "base:allocation"], False, ["base:other", "base:allocation"]),
        (["base"], True, []),
        (["base:alloc"], True, []),
    ],
)
def test_match_meta_contexts(queries: list[str], listing: bool, expected: list[str]) -> None:
    assert match_meta_contexts(queries, SUPPORTED, listing) == expected


def test_match_meta_contexts_accepts_iterators() -> None:
    assert match_meta_contexts(iter([]), iter(SUPPORTED), True) == SUPPORTED


# --- Oversized options ------------------------------------------------------------------


@pytest.mark.parametrize("number", [99, Option.INFO, Option.SET_META_CONTEXT, Option.LIST])
def test_oversized_option_is_skipped_in_pieces(number: int) -> None:
    limit = 16
    machine = start(max_option_length=limit)
    payload = bytes(range(100))
    machine.receive_data(wire.OptionHeader.build({"option": number, "length": len(payload)}))
    assert machine.next_event() is NEED_DATA
    for piece in (payload[:1], payload[1:40], payload[40:99]):
        machine.receive_data(piece)
        assert machine.next_event() is NEED_DATA
        assert machine.data_to_send() == b""  # no reply before the payload is gone
        assert len(machine._received) == 0  # skipped, never buffered
    machine.receive_data(payload[99:])
    assert machine.next_event() is NEED_DATA
    assert_error(parse_replies(machine.data_to_send()), number, OptionReplyType.ERR_TOO_BIG)
    assert state_of(machine) is State.AWAIT_OPTION
    go(machine)


def test_oversized_option_followed_by_next_option_in_same_chunk() -> None:
    machine = start(max_option_length=8)
    machine.receive_data(option(99, bytes(50)) + option(Option.LIST))
    assert machine.next_event() == ExportListRequested()
    assert_error(parse_replies(machine.data_to_send()), 99, OptionReplyType.ERR_TOO_BIG)


def test_option_at_exactly_max_length_is_processed() -> None:
    machine = start(max_option_length=16)
    replies = replies_for(machine, option(99, bytes(16)))
    assert_error(replies, 99, OptionReplyType.ERR_UNSUP)


def test_oversized_export_name_is_a_protocol_error() -> None:
    machine = start(max_option_length=16)
    machine.receive_data(option(Option.EXPORT_NAME, b"n" * 17))
    with pytest.raises(RemoteProtocolError):
        machine.next_event()
    assert state_of(machine) is State.CLOSED


# --- Whole conversations, in any chunking -------------------------------------------


@dataclass(frozen=True)
class Transcript:
    events: tuple[Event, ...]
    output: bytes
    state: State
    negotiated: Negotiated | None
    trailing: bytes


def application(event: ClientRequest) -> ServerDecision:
    """A small application: one export, base:allocation as context 9."""
    if isinstance(event, ExportListRequested):
        return ExportList((ExportListing("disk", "the disk"),))
    if isinstance(event, MetaContextsRequested):
        names = match_meta_contexts(event.queries, [BASE_ALLOCATION], not event.select)
        return MetaContextsGranted(tuple((9, name) for name in names))
    if isinstance(event, ExportInfoRequested | ExportNameChosen) and event.name == "disk":
        return DISK
    return OptionRefused(OptionReplyType.ERR_UNKNOWN, "no such export")


def converse(
    pieces: Iterable[bytes],
    answer: Callable[[ClientRequest], ServerDecision] = application,
) -> Transcript:
    """Run a whole negotiation, feeding `pieces` one at a time like a socket would."""
    machine = ServerNegotiation()
    events: list[Event] = []
    output = bytearray(machine.data_to_send())
    after = bytearray()  # bytes that reach the transmission phase directly
    for piece in pieces:
        if state_of(machine) in (State.TRANSMISSION, State.CLOSED):
            after += piece
            continue
        machine.receive_data(piece)
        while state_of(machine) in (State.AWAIT_CLIENT_FLAGS, State.AWAIT_OPTION):
            event = machine.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, Event)
            events.append(event)
            if isinstance(event, ClientRequest):
                machine.send(answer(event))
        output += machine.data_to_send()
    return Transcript(
        tuple(events),
        bytes(output),
        state_of(machine),
        machine.negotiated,
        machine.trailing_data + after,
    )


CONVERSATION = (
    client_flags(ALL_FLAGS)
    + option(Option.STRUCTURED_REPLY)
    + option(Option.LIST)
    + option(99, b"payload of an unknown option")
    + option(Option.LIST, b"bad")
    + meta(Option.LIST_META_CONTEXT, "disk")
    + meta(Option.SET_META_CONTEXT, "disk", BASE_ALLOCATION, "base:unknown")
    + info("missing", InfoType.NAME)
    + info("disk", InfoType.NAME, InfoType.DESCRIPTION, InfoType.BLOCK_SIZE)
    + info("disk", InfoType.BLOCK_SIZE, go=True)
    + FIRST_REQUEST
)


def test_whole_conversation_at_once() -> None:
    transcript = converse([CONVERSATION])
    assert transcript.state is State.TRANSMISSION
    assert transcript.trailing == FIRST_REQUEST
    assert transcript.negotiated == Negotiated(
        export_size=SIZE,
        transmission_flags=FLAGS | TransmissionFlag.HAS_FLAGS,
        structured_replies=True,
        meta_contexts=((9, BASE_ALLOCATION),),
    )
    assert [type(event) for event in transcript.events] == [
        ExportListRequested,
        MetaContextsRequested,
        MetaContextsRequested,
        ExportInfoRequested,
        ExportInfoRequested,
        ExportInfoRequested,
    ]
    greeting = transcript.output[:18]
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    replies = parse_replies(transcript.output[18:])
    assert [(r.option, r.reply_type) for r in replies] == [
        (Option.STRUCTURED_REPLY, OptionReplyType.ACK),
        (Option.LIST, OptionReplyType.SERVER),
        (Option.LIST, OptionReplyType.ACK),
        (99, OptionReplyType.ERR_UNSUP),
        (Option.LIST, OptionReplyType.ERR_INVALID),
        (Option.LIST_META_CONTEXT, OptionReplyType.META_CONTEXT),
        (Option.LIST_META_CONTEXT, OptionReplyType.ACK),
        (Option.SET_META_CONTEXT, OptionReplyType.META_CONTEXT),
        (Option.SET_META_CONTEXT, OptionReplyType.ACK),
        (Option.INFO, OptionReplyType.ERR_UNKNOWN),
        (Option.INFO, OptionReplyType.INFO),
        (Option.INFO, OptionReplyType.INFO),
        (Option.INFO, OptionReplyType.INFO),
        (Option.INFO, OptionReplyType.INFO),
        (Option.INFO, OptionReplyType.ACK),
        (Option.GO, OptionReplyType.INFO),
        (Option.GO, OptionReplyType.INFO),
        (Option.GO, OptionReplyType.ACK),
    ]


def test_whole_conversation_byte_by_byte() -> None:
    at_once = converse([CONVERSATION])
    one_by_one = converse(CONVERSATION[i : i + 1] for i in range(len(CONVERSATION)))
    assert one_by_one == at_once


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(CONVERSATION)), max_size=12))
def test_whole_conversation_any_chunking(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(CONVERSATION)]
    pieces = [CONVERSATION[a:b] for a, b in pairwise(points)]
    assert converse(pieces) == converse([CONVERSATION])


def test_trailing_data_after_go() -> None:
    machine = start()
    machine.receive_data(info("disk", go=True) + FIRST_REQUEST + b"\x01\x02")
    assert isinstance(machine.next_event(), ExportInfoRequested)
    machine.send(DISK)
    assert state_of(machine) is State.TRANSMISSION
    assert machine.trailing_data == FIRST_REQUEST + b"\x01\x02"
    with pytest.raises(LocalProtocolError):
        machine.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        machine.next_event()


def test_trailing_data_after_export_name() -> None:
    machine = start()
    machine.receive_data(option(Option.EXPORT_NAME, b"disk") + FIRST_REQUEST)
    assert machine.next_event() == ExportNameChosen("disk")
    machine.send(DISK)
    assert machine.trailing_data == FIRST_REQUEST


# --- Misuse by the application ------------------------------------------------------------


def test_send_with_nothing_pending() -> None:
    machine = start()
    with pytest.raises(LocalProtocolError):
        machine.send(DISK)
    assert state_of(machine) is State.AWAIT_OPTION
    assert machine.data_to_send() == b""


def test_send_before_client_flags() -> None:
    machine = ServerNegotiation()
    with pytest.raises(LocalProtocolError):
        machine.send(ExportList(()))


@pytest.mark.parametrize(
    ("data", "wrong"),
    [
        (option(Option.LIST), DISK),
        (option(Option.LIST), MetaContextsGranted(())),
        (info("disk"), ExportList(())),
        (info("disk", go=True), MetaContextsGranted(())),
        (option(Option.EXPORT_NAME, b"disk"), ExportList(())),
        (option(Option.EXPORT_NAME, b"disk"), MetaContextsGranted(())),
    ],
)
def test_wrong_decision_type(data: bytes, wrong: ServerDecision) -> None:
    machine = start()
    event = event_for(machine, data)
    with pytest.raises(LocalProtocolError):
        machine.send(wrong)
    # Nothing changed: the request still waits, and a right answer still works.
    assert state_of(machine) is State.AWAIT_DECISION
    assert machine.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        machine.next_event()
    assert isinstance(event, ClientRequest)
    machine.send(application(event))
    assert state_of(machine) in (State.AWAIT_OPTION, State.TRANSMISSION)


def test_wrong_decision_for_meta_context() -> None:
    machine = structured()
    event_for(machine, meta(Option.SET_META_CONTEXT, "disk", BASE_ALLOCATION))
    with pytest.raises(LocalProtocolError):
        machine.send(DISK)
    assert state_of(machine) is State.AWAIT_DECISION


def test_second_decision_is_refused() -> None:
    machine = start()
    event_for(machine, option(Option.LIST))
    machine.send(ExportList(()))
    with pytest.raises(LocalProtocolError):
        machine.send(ExportList(()))


# --- Fuzzing -----------------------------------------------------------------------------

FUZZ_LIMIT = 32
OPTION_NUMBERS = st.one_of(st.sampled_from([int(o) for o in Option]), st.integers(0, 2**32 - 1))
# Pieces a hostile client might send: garbage, well-framed options with random
# payloads, and headers whose length field lies.
PIECES = st.one_of(
    st.binary(max_size=24),
    st.builds(option, OPTION_NUMBERS, st.binary(max_size=FUZZ_LIMIT + 24)),
    st.builds(
        lambda number, length, payload: (
            bytes(wire.OptionHeader.build({"option": number, "length": length})) + payload
        ),
        OPTION_NUMBERS,
        st.one_of(st.integers(0, 2 * FUZZ_LIMIT), st.integers(0, 2**32 - 1)),
        st.binary(max_size=FUZZ_LIMIT),
    ),
    # Well-formed INFO/GO and metadata-context options, so events happen too.
    st.builds(
        lambda name, types, go: info(name, *types, go=go),
        st.text(max_size=8),
        st.lists(st.integers(0, 0xFFFF), max_size=4),
        st.booleans(),
    ),
    st.builds(
        meta,
        st.sampled_from([int(Option.LIST_META_CONTEXT), int(Option.SET_META_CONTEXT)]),
        st.text(max_size=6),
        st.text(max_size=6),
    ),
    st.just(option(Option.STRUCTURED_REPLY)),
)


ERROR_REPLY_TYPES = {int(kind) for kind in OptionReplyType if kind & 2**31}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0x0, 0x1, 0x3]), st.lists(PIECES, max_size=12))
@example(0x1, [b"IHAVEOPT\x00\x00\x00\x0b\x00\x00\x00\x00"])  # EXTENDED_HEADERS: an ACK
def test_random_input_only_raises_remote_errors(flags: int, pieces: list[bytes]) -> None:
    machine = ServerNegotiation(max_option_length=FUZZ_LIMIT)
    machine.data_to_send()
    machine.receive_data(client_flags(flags))
    for piece in pieces:
        machine.receive_data(piece)
        while True:
            try:
                event = machine.next_event()
            except RemoteProtocolError:
                assert state_of(machine) is State.CLOSED
                return
            if event is NEED_DATA:
                # Never more than one bounded option held back.
                assert len(machine._received) < OPTION_HEADER_SIZE + FUZZ_LIMIT
                break
            if isinstance(event, NegotiationAborted):
                assert state_of(machine) is State.CLOSED
                return
            assert isinstance(event, ClientRequest)
            assert state_of(machine) is State.AWAIT_DECISION
            machine.send(OptionRefused(OptionReplyType.ERR_POLICY))
            if state_of(machine) is State.CLOSED:  # a refused EXPORT_NAME
                return
        for reply in parse_replies(machine.data_to_send()):  # well-framed replies only
            # Every decision was a refusal: the only successes the machine gives on its
            # own are the ACKs of STRUCTURED_REPLY and EXTENDED_HEADERS; anything else
            # is a known error type.
            if reply.reply_type == OptionReplyType.ACK:
                assert reply.option in (Option.STRUCTURED_REPLY, Option.EXTENDED_HEADERS)
                assert reply.payload == b""
            else:
                assert reply.reply_type in ERROR_REPLY_TYPES
        assert state_of(machine) is State.AWAIT_OPTION
