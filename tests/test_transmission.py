"""RequestCheck: the checks every request passes before it touches the device,
and the host-to-wire errno mapping."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdverify_protocol.constants import (
    ALLOWED_COMMAND_FLAGS,
    BASE_ALLOCATION,
    Command,
    CommandFlag,
    Errno,
    TransmissionFlag,
)
from nbdverify_protocol.transmission import MAX_PAYLOAD, Negotiated, Request, RequestCheck

SIZE = 1024 * 1024
BIG = 4 * MAX_PAYLOAD  # an export big enough for MAX_PAYLOAD-sized requests
ALL_FEATURES = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.SEND_FAST_ZERO
)
FULL = Negotiated(
    export_size=SIZE,
    transmission_flags=ALL_FEATURES,
    structured_replies=True,
    meta_contexts=((1, BASE_ALLOCATION),),
)
SIMPLE = replace(
    FULL,
    transmission_flags=ALL_FEATURES & ~TransmissionFlag.SEND_DF,
    structured_replies=False,
    meta_contexts=(),
)
NO_FAST_ZERO = replace(FULL, transmission_flags=ALL_FEATURES & ~TransmissionFlag.SEND_FAST_ZERO)
READ_ONLY = replace(FULL, transmission_flags=ALL_FEATURES | TransmissionFlag.READ_ONLY)
NO_CONTEXT = replace(FULL, meta_contexts=())
LARGE = replace(FULL, export_size=BIG)
NEAR_2_64 = 2**64 - 512

R, W, DISC, FLUSH, TRIM, CACHE, WZ, BS = (
    Command.READ,
    Command.WRITE,
    Command.DISC,
    Command.FLUSH,
    Command.TRIM,
    Command.CACHE,
    Command.WRITE_ZEROES,
    Command.BLOCK_STATUS,
)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = (
    CommandFlag.FUA,
    CommandFlag.NO_HOLE,
    CommandFlag.DF,
    CommandFlag.REQ_ONE,
    CommandFlag.FAST_ZERO,
)


def request_error(request: Request, session: Negotiated) -> Errno:
    return RequestCheck(session)(request)


@dataclass(frozen=True)
class Case:
    command: int
    expected: Errno
    offset: int = 0
    length: int = 512
    flags: int = 0
    session: Negotiated = field(default=FULL)


CASES: dict[str, Case] = {
    # Plain requests that are fine.
    "read": Case(R, Errno.OK),
    "write": Case(W, Errno.OK),
    "trim": Case(TRIM, Errno.OK),
    "cache": Case(CACHE, Errno.OK),
    "write-zeroes": Case(WZ, Errno.OK),
    "block-status": Case(BS, Errno.OK),
    "whole-export-read": Case(R, Errno.OK, length=SIZE),
    "last-byte-write": Case(W, Errno.OK, offset=SIZE - 1, length=1),
    # Unknown commands.
    "command-8": Case(8, Errno.EINVAL),
    "command-0x42": Case(0x42, Errno.EINVAL),
    "command-0xffff": Case(0xFFFF, Errno.EINVAL),
    "resize-unsupported": Case(8, Errno.EINVAL, length=0),
    # Unknown flag bits, on every command.
    "read-bit5": Case(R, Errno.EINVAL, flags=1 << 5),
    "write-bit15": Case(W, Errno.EINVAL, flags=0x8000),
    "trim-bit7": Case(TRIM, Errno.EINVAL, flags=1 << 7),
    "cache-bit9": Case(CACHE, Errno.EINVAL, flags=1 << 9),
    "write-zeroes-bit5": Case(WZ, Errno.EINVAL, flags=1 << 5),
    "block-status-0xffff": Case(BS, Errno.EINVAL, flags=0xFFFF),
    "flush-bit15": Case(FLUSH, Errno.EINVAL, flags=0x8000),
    "read-all-flags": Case(R, Errno.EINVAL, flags=0xFFFF),
    # Known flags on the wrong command.
    "write-no-hole": Case(W, Errno.EINVAL, flags=NO_HOLE),
    "write-df": Case(W, Errno.EINVAL, flags=DF),
    "read-req-one": Case(R, Errno.EINVAL, flags=REQ_ONE),
    "read-no-hole": Case(R, Errno.EINVAL, flags=NO_HOLE),
    "trim-fast-zero": Case(TRIM, Errno.EINVAL, flags=FAST_ZERO),
    "trim-no-hole": Case(TRIM, Errno.EINVAL, flags=NO_HOLE),
    "cache-no-hole": Case(CACHE, Errno.EINVAL, flags=NO_HOLE),
    "write-zeroes-df": Case(WZ, Errno.EINVAL, flags=DF),
    "block-status-df": Case(BS, Errno.EINVAL, flags=DF),
    "flush-req-one": Case(FLUSH, Errno.EINVAL, flags=REQ_ONE),
    # Flags in their place.
    "read-fua": Case(R, Errno.OK, flags=FUA),
    "write-fua": Case(W, Errno.OK, flags=FUA),
    "trim-fua": Case(TRIM, Errno.OK, flags=FUA),
    "flush-fua": Case(FLUSH, Errno.OK, flags=FUA, length=0),
    "write-zeroes-all": Case(WZ, Errno.OK, flags=FUA | NO_HOLE | FAST_ZERO),
    "block-status-req-one": Case(BS, Errno.OK, flags=REQ_ONE),
    "block-status-fua": Case(BS, Errno.OK, flags=FUA | REQ_ONE),
    # SPEC: with SEND_FUA the server "MUST accept all commands with this bit set
    # (even by ignoring the bit)".
    "cache-fua": Case(CACHE, Errno.OK, flags=FUA),
    # FAST_ZERO only when SEND_FAST_ZERO was advertised.
    "fast-zero-not-advertised": Case(WZ, Errno.EINVAL, flags=FAST_ZERO, session=NO_FAST_ZERO),
    "no-hole-without-fast-zero": Case(WZ, Errno.OK, flags=NO_HOLE, session=NO_FAST_ZERO),
    # DF only with structured replies.
    "df-without-structured": Case(R, Errno.EINVAL, flags=DF, session=SIMPLE),
    "df-fua-without-structured": Case(R, Errno.EINVAL, flags=DF | FUA, session=SIMPLE),
    "df-with-structured": Case(R, Errno.OK, flags=DF),
    # Read-only exports.
    "read-only-write": Case(W, Errno.EPERM, session=READ_ONLY),
    "read-only-trim": Case(TRIM, Errno.EPERM, session=READ_ONLY),
    "read-only-write-zeroes": Case(WZ, Errno.EPERM, session=READ_ONLY),
    "read-only-write-past-end": Case(W, Errno.EPERM, offset=SIZE, session=READ_ONLY),
    "read-only-read": Case(R, Errno.OK, session=READ_ONLY),
    "read-only-cache": Case(CACHE, Errno.OK, session=READ_ONLY),
    "read-only-flush": Case(FLUSH, Errno.OK, length=0, session=READ_ONLY),
    "read-only-block-status": Case(BS, Errno.OK, session=READ_ONLY),
    # BLOCK_STATUS needs a context and a length.
    "block-status-no-context": Case(BS, Errno.EINVAL, session=NO_CONTEXT),
    "block-status-simple": Case(BS, Errno.EINVAL, session=SIMPLE),
    "block-status-zero-length": Case(BS, Errno.EINVAL, length=0),
    "block-status-past-end": Case(BS, Errno.EINVAL, offset=SIZE, length=1),
    "block-status-whole-export": Case(BS, Errno.OK, length=SIZE),
    # Payload limits.
    "read-max-payload": Case(R, Errno.OK, length=MAX_PAYLOAD, session=LARGE),
    "read-over-max-payload": Case(R, Errno.EOVERFLOW, length=MAX_PAYLOAD + 1, session=LARGE),
    "read-u32-max": Case(R, Errno.EOVERFLOW, length=2**32 - 1, session=LARGE),
    "write-max-payload": Case(W, Errno.OK, length=MAX_PAYLOAD, session=LARGE),
    "write-over-max-payload": Case(W, Errno.EINVAL, length=MAX_PAYLOAD + 1, session=LARGE),
    "trim-over-max-payload": Case(TRIM, Errno.OK, length=MAX_PAYLOAD + 1, session=LARGE),
    "write-zeroes-over-max-payload": Case(WZ, Errno.OK, length=MAX_PAYLOAD + 1, session=LARGE),
    # Past the end of the export.
    "read-past-end": Case(R, Errno.EINVAL, offset=SIZE - 511),
    "read-after-end": Case(R, Errno.EINVAL, offset=SIZE),
    "trim-past-end": Case(TRIM, Errno.EINVAL, offset=SIZE - 1, length=2),
    "cache-past-end": Case(CACHE, Errno.EINVAL, offset=SIZE),
    "write-past-end": Case(W, Errno.ENOSPC, offset=SIZE - 511),
    "write-zeroes-past-end": Case(WZ, Errno.ENOSPC, offset=SIZE, length=1),
    # Offsets near 2**64 must never wrap around to a small end.
    "read-near-2**64": Case(R, Errno.EINVAL, offset=NEAR_2_64, length=4096),
    "write-near-2**64": Case(W, Errno.ENOSPC, offset=NEAR_2_64, length=4096),
    "trim-near-2**64": Case(TRIM, Errno.EINVAL, offset=NEAR_2_64, length=4096),
    "cache-near-2**64": Case(CACHE, Errno.EINVAL, offset=NEAR_2_64, length=4096),
    "write-zeroes-near-2**64": Case(WZ, Errno.ENOSPC, offset=NEAR_2_64, length=4096),
    "block-status-near-2**64": Case(BS, Errno.EINVAL, offset=NEAR_2_64, length=4096),
    "read-at-2**64-1": Case(R, Errno.EINVAL, offset=2**64 - 1, length=MAX_PAYLOAD, session=LARGE),
    "write-max-fields": Case(W, Errno.ENOSPC, offset=2**64 - 1, length=1),
    # Zero-length requests at (not beyond) the end are fine.
    "zero-read-at-end": Case(R, Errno.OK, offset=SIZE, length=0),
    "zero-write-at-end": Case(W, Errno.OK, offset=SIZE, length=0),
    "zero-trim-at-end": Case(TRIM, Errno.OK, offset=SIZE, length=0),
    "zero-write-zeroes-at-end": Case(WZ, Errno.OK, offset=SIZE, length=0),
    "zero-cache-at-end": Case(CACHE, Errno.OK, offset=SIZE, length=0),
    "zero-read-at-start": Case(R, Errno.OK, offset=0, length=0),
    "zero-read-beyond-end": Case(R, Errno.EINVAL, offset=SIZE + 1, length=0),
    "zero-write-beyond-end": Case(W, Errno.ENOSPC, offset=SIZE + 1, length=0),
    "empty-export-zero-read": Case(R, Errno.OK, length=0, session=replace(FULL, export_size=0)),
    "empty-export-read": Case(R, Errno.EINVAL, length=1, session=replace(FULL, export_size=0)),
    # DISC and FLUSH carry no range: anything in offset/length is fine.
    "disc": Case(DISC, Errno.OK, length=0),
    "disc-tester-offset": Case(DISC, Errno.OK, offset=NEAR_2_64, length=0),
    "disc-garbage-range": Case(DISC, Errno.OK, offset=2**64 - 1, length=2**32 - 1),
    "disc-read-only": Case(DISC, Errno.OK, session=READ_ONLY),
    "disc-simple": Case(DISC, Errno.OK, session=SIMPLE),
    "flush": Case(FLUSH, Errno.OK, length=0),
    "flush-garbage-range": Case(FLUSH, Errno.OK, offset=2**64 - 1, length=2**32 - 1),
    "flush-simple": Case(FLUSH, Errno.OK, session=SIMPLE),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_request_error(case: Case) -> None:
    request = Request(
        flags=case.flags,
        command=case.command,
        cookie=0xFEED,
        offset=case.offset,
        length=case.length,
    )
    assert request_error(request, case.session) is case.expected


def test_every_command_has_a_flag_rule() -> None:
    assert set(ALLOWED_COMMAND_FLAGS) == set(Command)


RANGED = [R, W, TRIM, CACHE, WZ, BS]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(RANGED),
    st.integers(0, 0x1F),
    st.one_of(st.integers(0, 2 * SIZE), st.integers(0, 2**64 - 1), st.just(NEAR_2_64)),
    st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
)
def test_accepted_requests_stay_inside_the_export(
    command: Command, flags: int, offset: int, length: int
) -> None:
    request = Request(flags=flags, command=command, cookie=1, offset=offset, length=length)
    error = request_error(request, FULL)
    assert isinstance(error, Errno)
    # FUA is valid on every command once SEND_FUA is advertised (FULL advertises it).
    allowed = int(ALLOWED_COMMAND_FLAGS[command]) | int(CommandFlag.FUA)
    if error is Errno.OK:
        assert offset + length <= SIZE
        assert not flags & ~allowed
    if flags & ~allowed:
        assert error is Errno.EINVAL


@settings(max_examples=100, deadline=None)
@given(st.integers(8, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1))
def test_unknown_commands_are_einval(command: int, flags: int, offset: int) -> None:
    request = Request(flags=flags, command=command, cookie=1, offset=offset, length=0)
    assert request_error(request, FULL) is Errno.EINVAL


# --- Errno -------------------------------------------------------------------------


def test_wire_errno_values_are_the_spec_numbers() -> None:
    assert {e.name: e.value for e in Errno} == {
        "OK": 0,
        "EPERM": 1,
        "EIO": 5,
        "ENOMEM": 12,
        "EINVAL": 22,
        "ENOSPC": 28,
        "EOVERFLOW": 75,
        "ENOTSUP": 95,
        "ESHUTDOWN": 108,
    }


HOST_ERRNOS = [
    (errno.EPERM, Errno.EPERM),
    (errno.EACCES, Errno.EPERM),
    (errno.EROFS, Errno.EPERM),
    (errno.EIO, Errno.EIO),
    (errno.ENOMEM, Errno.ENOMEM),
    (errno.EINVAL, Errno.EINVAL),
    (errno.ENOSPC, Errno.ENOSPC),
    (errno.EDQUOT, Errno.ENOSPC),
    (errno.EFBIG, Errno.ENOSPC),
    (errno.EOVERFLOW, Errno.EOVERFLOW),
    (errno.ENOTSUP, Errno.ENOTSUP),
    (errno.EOPNOTSUPP, Errno.ENOTSUP),
    (errno.ESHUTDOWN, Errno.ESHUTDOWN),
    # Anything without a wire value is EIO.
    (errno.ENOENT, Errno.EIO),
    (errno.EBADF, Errno.EIO),
    (errno.ENXIO, Errno.EIO),
    (errno.EAGAIN, Errno.EIO),
    (errno.ETIMEDOUT, Errno.EIO),
    (9999, Errno.EIO),
]


@pytest.mark.parametrize(
    ("host", "wire"),
    HOST_ERRNOS,
    ids=[errno.errorcode.get(host, str(host)) for host, _ in HOST_ERRNOS],
)
def test_errno_from_host(host: int, wire: Errno) -> None:
    assert Errno.from_host(host) is wire


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2**31))
def test_errno_from_host_is_total(host: int) -> None:
    assert isinstance(Errno.from_host(host), Errno)
    assert Errno.from_host(host) is not Errno.OK
