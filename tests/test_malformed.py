"""Bad input fails the request (or, where the spec says, the connection): never the
server, never another client, never a byte of either image."""

from __future__ import annotations

import struct
from pathlib import Path

import trio
from rawclient import RawClient
from support import RunningServer, require_tool, run

from nbdverify_protocol import wire
from nbdverify_protocol.constants import Command, CommandFlag, Errno, Option, OptionReplyType

MiB = 1024 * 1024
TIMEOUT = 30


def socket_of(server: RunningServer) -> str:
    assert server.socket is not None
    return str(server.socket)


def still_serving(server: RunningServer) -> None:
    """The server is alive and another client gets correct data."""
    assert server.process.poll() is None
    result = run([require_tool("qemu-io"), "-f", "raw", "-c", "read 0 4k", server.uri])
    assert "read 4096/4096 bytes" in result.stdout


def images_unchanged(server: RunningServer, before: bytes) -> None:
    assert server.images.raw_bytes() == before
    assert server.images.test_bytes() == before


def memory_high_water_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_unknown_client_flags_drop_the_connection(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.greeting(client_flags=0x80000001)
        assert await client.at_eof()
    still_serving(server)


async def test_bad_option_magic_drops_the_connection(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.greeting()
        await client.send(b"NOTMAGIC" + struct.pack(">II", Option.GO, 0))
        assert await client.at_eof()
    still_serving(server)


async def test_unknown_and_oversized_options_are_refused_and_negotiation_goes_on(
        server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.greeting()
        replies = await client.option(99, b"some payload")
        assert replies[-1].reply_type == OptionReplyType.ERR_UNSUP
        replies = await client.option(Option.LIST, bytes(MiB))  # over the 64 KiB cap
        assert replies[-1].reply_type == OptionReplyType.ERR_TOO_BIG
        replies = await client.option(Option.GO, b"\xff\xff\xff\xff")  # namelen beyond payload
        assert replies[-1].reply_type == OptionReplyType.ERR_INVALID
        unknown = wire.InfoRequest.build({"name": "nope", "info_types": []})
        replies = await client.option(Option.GO, unknown)
        assert replies[-1].reply_type == OptionReplyType.ERR_UNKNOWN
        replies = await client.option(Option.GO, wire.InfoRequest.build(
            {"name": "", "info_types": []}))
        assert replies[-1].reply_type == OptionReplyType.ACK
        await client.request(Command.READ, 0, 512, cookie=1)
        reply = await client.reply(512)
        assert reply.error == 0
        assert reply.data == server.images.raw_bytes()[:512]


async def test_bad_requests_fail_alone_and_the_session_goes_on(server: RunningServer) -> None:
    before = server.images.raw_bytes()
    size = len(before)
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.go()
        cases = [
            (Command.READ, 0, 512, 0x8000, b"", Errno.EINVAL),  # unknown flag
            (0x42, 0, 512, 0, b"", Errno.EINVAL),  # unknown command
            (Command.READ, 2**64 - 512, 4096, 0, b"", Errno.EINVAL),  # wraps in 64 bits
            (Command.READ, size - 100, 200, 0, b"", Errno.EINVAL),  # straddles the end
            (Command.TRIM, size, 1, 0, b"", Errno.EINVAL),
            (Command.WRITE, 2**63, 16, 0, b"x" * 16, Errno.ENOSPC),  # payload drained
            (Command.WRITE_ZEROES, size - 1, 2, 0, b"", Errno.ENOSPC),
            (Command.WRITE, 0, 16, CommandFlag.NO_HOLE, b"y" * 16, Errno.EINVAL),
            (Command.BLOCK_STATUS, 0, 512, 0, b"", Errno.EINVAL),  # no context negotiated
            (Command.READ, 0, 512, CommandFlag.DF, b"", Errno.EINVAL),  # DF needs structured
        ]
        for cookie, (command, offset, length, flags, payload, expected) in enumerate(cases):
            await client.request(command, offset, length, cookie, flags, payload)
            reply = await client.reply()
            assert (reply.cookie, reply.error) == (cookie, expected), (command, offset)
        for cookie, command in enumerate((Command.READ, Command.WRITE, Command.TRIM,
                                          Command.WRITE_ZEROES, Command.CACHE), start=100):
            await client.request(command, size, 0, cookie)  # zero length, at the very end
            reply = await client.reply()
            assert (reply.cookie, reply.error) == (cookie, 0)
        await client.request(Command.READ, 4096, 4096, cookie=7)
        reply = await client.reply(4096)
        assert reply.error == 0 and reply.data == before[4096:8192]
    images_unchanged(server, before)
    still_serving(server)


async def test_structured_errors_are_short_and_carry_a_message(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.go(structured=True)
        await client.request(Command.READ, 2**64 - 512, 4096, cookie=5)
        reply = await client.reply()
        assert reply.error == Errno.EINVAL
        assert 0 < len(reply.message) < 1000
        await client.request(Command.READ, 0, 0, cookie=6)  # zero length, structured
        reply = await client.reply()
        assert (reply.cookie, reply.error, reply.data) == (6, 0, b"")


async def test_oversized_write_is_drained_not_buffered(server: RunningServer) -> None:
    before = server.images.raw_bytes()
    baseline = memory_high_water_kib(server.process.pid)
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.go()
        length = 200 * MiB  # over the 64 MiB maximum payload
        await client.request(Command.WRITE, 0, length, cookie=9)
        chunk = b"\xee" * MiB
        for _ in range(length // MiB):
            await client.send(chunk)
        reply = await client.reply()
        assert (reply.cookie, reply.error) == (9, Errno.EINVAL)
        await client.request(Command.READ, 0, 512, cookie=10)
        assert (await client.reply(512)).data == before[:512]
    grown = memory_high_water_kib(server.process.pid) - baseline
    assert grown < 64 * 1024, f"server grew by {grown} KiB for a refused 200 MiB write"
    images_unchanged(server, before)


async def test_disc_answers_everything_in_flight_first(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.go()
        burst = b"".join(
            struct.pack(">IHHQQI", 0x25609513, 0, Command.READ, cookie, cookie * 4096, 4096)
            for cookie in range(16))
        await client.send(burst + struct.pack(">IHHQQI", 0x25609513, 0, Command.DISC, 99,
                                              2**64 - 512, 0))
        cookies = {(await client.reply(4096)).cookie for _ in range(16)}
        assert cookies == set(range(16))
        assert await client.at_eof()


async def test_bad_request_magic_closes_only_that_connection(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.go()
        await client.send(b"\x12\x34\x56\x78" + bytes(24))
        assert await client.at_eof()
    still_serving(server)


async def test_hanging_up_inside_a_write_payload_writes_nothing(server: RunningServer) -> None:
    before = server.images.raw_bytes()
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.go()
        await client.request(Command.WRITE, 0, MiB, cookie=1, payload=b"\x77" * 4000)
        await client.stream.aclose()
        await trio.sleep(0.3)
    images_unchanged(server, before)
    still_serving(server)


async def test_client_that_never_reads_replies_holds_bounded_memory(
        server: RunningServer) -> None:
    baseline = memory_high_water_kib(server.process.pid)
    with trio.fail_after(TIMEOUT):
        client = await RawClient.connect(socket_of(server))
        await client.go()
        request = struct.pack(">IHHQQI", 0x25609513, 0, Command.READ, 1, 0, MiB)
        with trio.move_on_after(5):
            for _ in range(5000):  # 5 GiB of replies asked for, none read
                await client.send(request)
        await client.stream.aclose()
    grown = memory_high_water_kib(server.process.pid) - baseline
    assert grown < 400 * 1024, f"server grew by {grown} KiB"
    still_serving(server)


async def test_many_connections_opened_and_dropped(server: RunningServer) -> None:
    with trio.fail_after(TIMEOUT):
        for number in range(100):
            client = await RawClient.connect(socket_of(server))
            if number % 2:
                await client.greeting()
            await client.stream.aclose()
    still_serving(server)
