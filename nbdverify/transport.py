"""Bytes on a connection, for the sans-IO machines: receive into the buffer they
name, send many buffers at once.

On a plain socket, `recv_into` lets a machine receive straight into a payload's
buffer, and `sendmsg` sends a batch of replies (or child requests) as they are,
without joining them into one copy first. Inside TLS the same calls go through
trio's SSLStream, with copies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

ReceiveInto = Callable[[memoryview], Awaitable[int]]
SendBuffers = Callable[[Sequence[bytes | bytearray | memoryview]], Awaitable[int]]

NEGOTIATION_RECEIVE = 64 * 1024
# Linux takes at most this many buffers in one sendmsg (IOV_MAX).
MAX_BUFFERS = 1024


class ConnectionLost(Exception):
    """The peer closed the connection in the middle of a message."""


class Transport:
    def __init__(self, receive_into: ReceiveInto, send_buffers: SendBuffers) -> None:
        self.receive_into = receive_into
        self._send_buffers = send_buffers

    @classmethod
    def over_socket(cls, sock: trio.socket.SocketType) -> Transport:
        return cls(sock.recv_into, sock.sendmsg)

    @classmethod
    def over_stream(cls, stream: trio.abc.Stream) -> Transport:
        async def receive_into(view: memoryview) -> int:
            data = await stream.receive_some(len(view))
            view[: len(data)] = data
            return len(data)

        async def send_buffers(buffers: Sequence[bytes | bytearray | memoryview]) -> int:
            data = b"".join(buffers)
            await stream.send_all(data)
            return len(data)

        return cls(receive_into, send_buffers)

    async def receive_some(self) -> bytes:
        """Whatever is available, or b"" at end of stream (negotiation)."""
        buffer = bytearray(NEGOTIATION_RECEIVE)
        count = await self.receive_into(memoryview(buffer))
        return bytes(buffer[:count])

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_all([data])

    async def send_all(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send every byte of every buffer, in order, in as few calls as the kernel takes."""
        pending = [memoryview(buffer) for buffer in buffers if len(buffer)]
        first = 0  # pending[first:] is still to send
        while first < len(pending):
            sent = await self._send_buffers(pending[first:first + MAX_BUFFERS])
            while sent and sent >= len(pending[first]):
                sent -= len(pending[first])
                first += 1
            if sent:
                pending[first] = pending[first][sent:]
