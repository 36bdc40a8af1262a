"""Bytes on a connection, for the sans-IO machines: receive into the buffer they
name, send many buffers at once.

On a plain socket, `recv_into` lets a machine receive straight into a payload's
buffer, and `sendmsg` sends a batch of replies (or child requests) as they are,
without joining them into one copy first. Inside TLS the same calls go through
trio's SSLStream, with copies.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence

import trio

ReceiveInto = Callable[[memoryview], Awaitable[int]]
SendBuffers = Callable[[Sequence[bytes | bytearray | memoryview]], Awaitable[int]]

NEGOTIATION_RECEIVE = 64 * 1024
# Linux takes at most this many buffers in one sendmsg (IOV_MAX).
MAX_BUFFERS = 1024


class ConnectionLost(Exception):
    """The peer closed the connection in the middle of a message."""


def sent_so_far(buffers: list[memoryview], count: int) -> list[memoryview]:
    """What is left of `buffers` after the first `count` bytes went out."""
    first = 0
    while count and count >= len(buffers[first]):
        count -= len(buffers[first])
        first += 1
    rest = buffers[first:]
    if count:
        rest[0] = rest[0][count:]
    return rest


def receive_now(fd: int, view: memoryview) -> int | None:
    try:
        return os.readv(fd, [view])
    except BlockingIOError:
        return None


class Transport:
    def __init__(self, receive_into: ReceiveInto, send_buffers: SendBuffers | None = None,
                 fd: int | None = None) -> None:
        self.receive_into = receive_into
        self._send_buffers = send_buffers  # a stream's; a plain socket's are os.writev
        self._fd = fd  # a plain socket: sends go straight to the kernel
        #: A stream's send was cancelled midway: nothing more can follow it.
        self.cut_off = False

    @classmethod
    def over_socket(cls, sock: trio.socket.SocketType) -> Transport:
        fd = sock.fileno()

        async def receive_into(view: memoryview) -> int:
            while True:
                count = receive_now(fd, view)
                if count is not None:
                    return count
                await trio.lowlevel.wait_readable(fd)

        return cls(receive_into, fd=fd)

    def receive_now(self, view: memoryview) -> int | None:
        """What has arrived, without waiting (0 at end of stream); None if nothing
        has, or this is not a plain socket. Like `send_now`, no scheduler trip."""
        return None if self._fd is None else receive_now(self._fd, view)

    def send_now(self, buffers: list[memoryview]) -> list[memoryview]:
        """Send what the kernel takes without waiting; what is left (on a plain
        socket). A send that need not wait costs a syscall, not a trip through trio's
        scheduler (~6 us a checkpoint here, more than the syscall)."""
        if self._fd is None:
            return buffers
        while buffers:
            batch = buffers[:MAX_BUFFERS]
            try:
                sent = os.writev(self._fd, batch)
            except BlockingIOError:
                return buffers
            if len(batch) == len(buffers) and sent == sum(map(len, batch)):
                return []  # all of it, the usual case: no walk over the buffers in Python
            buffers = sent_so_far(buffers, sent)
        return buffers

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

    async def send_more(self, buffers: list[memoryview]) -> list[memoryview]:
        """Wait until more can be sent, send it; what is left. Cancelled, nothing is
        lost: what it returns (or was given) is exactly what has not been sent."""
        if self._send_buffers is not None:
            # A stream sends all or breaks: cancelled in the middle, it is unusable.
            self.cut_off = True
            await self._send_buffers(buffers)
            self.cut_off = False
            return []
        assert self._fd is not None
        await trio.lowlevel.wait_writable(self._fd)
        return self.send_now(buffers)

    async def send_all(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send every byte of every buffer, in order, in as few calls as the kernel takes."""
        pending = self.send_now([memoryview(buffer) for buffer in buffers if len(buffer)])
        while pending:
            pending = await self.send_more(pending)
