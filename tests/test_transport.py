"""The transport's receive after `receive_now` found nothing: it waits, then reads."""

from __future__ import annotations

import trio
import trio.testing

from nbdverify.transport import Transport


async def test_a_receive_after_nothing_waits_for_what_comes_later() -> None:
    left, right = trio.socket.socketpair()
    with left, right:
        transport = Transport.over_socket(left)
        buffer = bytearray(16)
        view = memoryview(buffer)
        assert transport.receive_now(view) is None

        async def send_later() -> None:
            await trio.sleep(0.05)
            await right.send(b"reply")

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_later)
                count = await transport.receive_after_nothing(view)
        assert bytes(buffer[:count]) == b"reply"


async def test_a_receive_after_nothing_returns_at_once_when_bytes_are_there() -> None:
    left, right = trio.socket.socketpair()
    with left, right:
        transport = Transport.over_socket(left)
        await right.send(b"already")
        buffer = bytearray(16)
        with trio.fail_after(5):
            count = await transport.receive_after_nothing(memoryview(buffer))
        assert bytes(buffer[:count]) == b"already"


async def test_over_a_stream_a_receive_after_nothing_is_a_receive() -> None:
    left, right = trio.testing.memory_stream_pair()
    transport = Transport.over_stream(left)
    buffer = bytearray(16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(right.send_all, b"tls")
        with trio.fail_after(5):
            count = await transport.receive_after_nothing(memoryview(buffer))
    assert bytes(buffer[:count]) == b"tls"
