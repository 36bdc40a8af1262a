"""Exact-size reads and whole writes on a connection.

The request loop needs "exactly 28 bytes", "exactly N bytes of payload, straight
into this buffer" and "skip N bytes"; trio's streams offer `receive_some`. On a
plain socket, reading with `recv_into` saves a copy per receive; inside TLS the
same calls go through trio's SSLStream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

ReceiveInto = Callable[[memoryview], Awaitable[int]]
SendSome = Callable[[memoryview], Awaitable[int]]

RECEIVE_SIZE = 256 * 1024
DISCARD_CHUNK = 1024 * 1024


class ConnectionLost(Exception):
    """The peer closed the connection in the middle of a message."""


class Transport:
    def __init__(self, receive_into: ReceiveInto, send_some: SendSome) -> None:
        self._receive_into = receive_into
        self._send_some = send_some
        self._buffer = bytearray(RECEIVE_SIZE)
        self._start = 0  # unread bytes are self._buffer[self._start:self._end]
        self._end = 0

    @classmethod
    def over_socket(cls, sock: trio.socket.SocketType) -> Transport:
        return cls(sock.recv_into, sock.send)

    @classmethod
    def over_stream(cls, stream: trio.abc.Stream) -> Transport:
        async def receive_into(view: memoryview) -> int:
            data = await stream.receive_some(len(view))
            view[: len(data)] = data
            return len(data)

        async def send_some(view: memoryview) -> int:
            await stream.send_all(view)
            return len(view)

        return cls(receive_into, send_some)

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def unread(self, data: bytes) -> None:
        """Put back bytes that were received but belong to the next stage."""
        if not data:
            return
        pending = bytes(data) + bytes(self._buffer[self._start:self._end])
        if len(pending) > len(self._buffer):
            self._buffer = bytearray(len(pending))
        self._buffer[: len(pending)] = pending
        self._start, self._end = 0, len(pending)

    async def _fill(self) -> int:
        """Receive more into the buffer; 0 at end of stream."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):
            remaining = self._buffer[self._start:self._end]
            self._buffer[: len(remaining)] = remaining
            self._start, self._end = 0, len(remaining)
        count: int = await self._receive_into(memoryview(self._buffer)[self._end:])
        self._end += count
        return count

    async def receive_some(self) -> bytes:
        """Whatever is available (at least one byte), or b"" at end of stream."""
        if self._start == self._end and await self._fill() == 0:
            return b""
        data = bytes(self._buffer[self._start:self._end])
        self._start = self._end
        return data

    async def receive_header(self, size: int) -> bytes | None:
        """Exactly `size` bytes, or None if the stream ended cleanly before any."""
        while self._end - self._start < size:
            if await self._fill() == 0:
                if self._start == self._end:
                    return None
                raise ConnectionLost(f"connection closed inside a {size}-byte header")
        data = bytes(self._buffer[self._start:self._start + size])
        self._start += size
        return data

    async def receive_into(self, target: memoryview) -> None:
        """Fill `target` exactly: buffered bytes first, then straight from the socket."""
        have = min(self._end - self._start, len(target))
        target[:have] = self._buffer[self._start:self._start + have]
        self._start += have
        while have < len(target):
            count: int = await self._receive_into(target[have:])
            if count == 0:
                raise ConnectionLost("connection closed inside a payload")
            have += count

    async def discard(self, count: int) -> None:
        """Skip a payload we refuse, without ever holding more than a chunk of it."""
        have = min(self._end - self._start, count)
        self._start += have
        count -= have
        if not count:
            return
        scratch = memoryview(bytearray(min(count, DISCARD_CHUNK)))
        while count:
            received: int = await self._receive_into(scratch[: min(count, len(scratch))])
            if received == 0:
                raise ConnectionLost("connection closed inside a discarded payload")
            count -= received

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            sent = await self._send_some(view)
            view = view[sent:]
