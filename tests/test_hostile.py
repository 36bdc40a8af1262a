"""Random and mutated handshakes and requests against a live server: it survives,
the images stay untouched, and a well-behaved client keeps getting right data,
also while the hostile ones are connected."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ImagePair, RunningServer, make_pair, start_server

from nbdverify_protocol import wire
from nbdverify_protocol.constants import Command, Option

MiB = 1024 * 1024
IHAVEOPT = b"IHAVEOPT"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("hostile")
    running = start_server(directory, make_pair(directory, size=2 * MiB), "--on-mismatch=error")
    yield running
    running.stop()


def connect(server: RunningServer) -> socket.socket:
    assert server.socket is not None
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(server.socket))
    return sock


def receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return data


def well_behaved_read(server: RunningServer, offset: int = 4096, length: int = 4096) -> bytes:
    """Negotiate properly and read: what any later client must still be able to do."""
    with connect(server) as sock:
        receive_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3))
        go = wire.InfoRequest.build({"name": "", "info_types": []})
        sock.sendall(wire.OptionHeader.build({"option": Option.GO, "length": len(go)}) + go)
        while True:
            header = wire.OptionReplyHeader.parse(receive_exactly(sock, 20))
            receive_exactly(sock, header.length)
            if header.reply_type == 1:
                break
            assert header.reply_type == 3, header
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, Command.READ, 7, offset, length))
        magic, error, cookie = struct.unpack(">IIQ", receive_exactly(sock, 16))
        assert (magic, error, cookie) == (0x67446698, 0, 7)
        return receive_exactly(sock, length)


def option(number: int, payload: bytes) -> bytes:
    return IHAVEOPT + struct.pack(">II", number, len(payload)) + payload


handshakes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda flags, body: struct.pack(">I", flags) + body,
              st.integers(0, 2**32 - 1), st.binary(max_size=200)),
    st.builds(lambda opts: struct.pack(">I", 3) + b"".join(opts),
              st.lists(st.builds(option, st.integers(0, 2**32 - 1), st.binary(max_size=64)),
                       max_size=5)),
    st.builds(lambda number, claimed: struct.pack(">I", 3) + IHAVEOPT
              + struct.pack(">II", number, claimed) + b"\0" * 16,
              st.sampled_from(list(Option)), st.integers(0, 2**32 - 1)),
)

requests = st.lists(
    st.builds(lambda flags, command, cookie, offset, length, payload:
              struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length)
              + payload,
              st.integers(0, 2**16 - 1), st.integers(0, 12), st.integers(0, 2**64 - 1),
              st.one_of(st.integers(0, 2 * MiB), st.integers(2**63, 2**64 - 1)),
              st.one_of(st.integers(0, 8192), st.integers(2**31, 2**32 - 1)),
              st.binary(max_size=512)),
    max_size=8,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=handshakes)
def test_garbage_handshakes_never_hurt_the_server(live: RunningServer, garbage: bytes) -> None:
    before = live.images.raw_bytes()
    bystander = connect(live)  # connected through it all, then must still work
    with connect(live) as sock:
        receive_exactly(sock, 18)
        try:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # bounded by the server closing or the timeout
                pass
        except (ConnectionError, TimeoutError):
            pass
    bystander.close()
    assert live.process.poll() is None
    assert well_behaved_read(live) == before[4096:8192]
    assert live.images.raw_bytes() == before


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(burst=requests)
def test_mutated_requests_never_hurt_the_server(live: RunningServer, burst: list[bytes]) -> None:
    expected = live.images.raw_bytes()[4096:8192]
    with connect(live) as sock:
        receive_exactly(sock, 18)
        sock.sendall(struct.pack(">I", 3))
        go = wire.InfoRequest.build({"name": "", "info_types": []})
        sock.sendall(wire.OptionHeader.build({"option": Option.GO, "length": len(go)}) + go)
        try:
            sock.sendall(b"".join(burst))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 20):
                pass
        except (ConnectionError, TimeoutError):
            pass
    assert live.process.poll() is None
    # Writes may have landed (they are valid requests), but always on both children.
    assert live.images.raw_bytes() == live.images.test_bytes()
    data = well_behaved_read(live)
    assert data == live.images.raw_bytes()[4096:8192] or data == expected
    assert live.report_records() == []


def test_two_hundred_connections_opened_and_dropped(live: RunningServer, tmp_path: Path) -> None:
    before = live.images.raw_bytes()
    for number in range(200):
        sock = connect(live)
        if number % 3 == 1:
            receive_exactly(sock, 18)
        if number % 3 == 2:
            receive_exactly(sock, 18)
            sock.sendall(struct.pack(">I", 3) + IHAVEOPT)
        sock.close()
    assert well_behaved_read(live) == before[4096:8192]
    assert ImagePair(live.images.raw, live.images.test).test_bytes() == before
