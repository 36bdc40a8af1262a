"""A deliberately low-level NBD client for sending what real clients never send.

Built on the protocol package's wire definitions, with no checks of its own, so a
test can put any byte on the wire and read exactly what the server answers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import trio

from nbdverify_protocol import wire
from nbdverify_protocol.constants import (
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Option,
    OptionReplyType,
    ReplyFlag,
)
from nbdverify_protocol.transmission import build_request


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class OptionReply:
    option: int
    reply_type: int
    payload: bytes


@dataclass
class Reply:
    cookie: int
    error: int
    data: bytes = b""
    message: bytes = b""
    chunks: int = 1


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self.structured = False

    @classmethod
    async def connect(cls, socket_path: str) -> RawClient:
        return cls(await trio.open_unix_socket(socket_path))

    async def receive_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise Closed(f"closed with {len(self._buffer)} of {count} bytes")
            self._buffer += data
        out = bytes(self._buffer[:count])
        del self._buffer[:count]
        return out

    async def at_eof(self) -> bool:
        """True once the server has closed the connection (after any pending bytes)."""
        try:
            await self.receive_exactly(len(self._buffer) + 1)
        except Closed:
            return True
        return False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    # --- Handshake ----------------------------------------------------------------

    async def greeting(self, client_flags: int = 3) -> int:
        greeting = wire.ServerGreeting.parse(await self.receive_exactly(18))
        await self.send(struct.pack(">I", client_flags))
        return int(greeting.handshake_flags)

    async def option(self, option: int, payload: bytes = b"") -> list[OptionReply]:
        """Send one option; collect replies up to the final (ACK or error) one."""
        await self.send(wire.OptionHeader.build({"option": option, "length": len(payload)})
                        + payload)
        replies = []
        while True:
            header = wire.OptionReplyHeader.parse(await self.receive_exactly(20))
            body = await self.receive_exactly(header.length)
            replies.append(OptionReply(header.option, header.reply_type, body))
            if header.reply_type == OptionReplyType.ACK or header.reply_type & 2**31:
                return replies

    async def go(self, name: str = "", structured: bool = False,
                 meta_context: bool = False) -> None:
        await self.greeting()
        if structured:
            assert (await self.option(Option.STRUCTURED_REPLY))[-1].reply_type == 1
            self.structured = True
        if meta_context:
            query = wire.MetaContextRequest.build(
                {"export_name": name, "queries": ["base:allocation"]})
            await self.option(Option.SET_META_CONTEXT, query)
        payload = wire.InfoRequest.build({"name": name, "info_types": []})
        replies = await self.option(Option.GO, payload)
        assert replies[-1].reply_type == OptionReplyType.ACK, replies

    # --- Transmission ---------------------------------------------------------------

    async def request(self, command: int, offset: int, length: int, cookie: int,
                      flags: int = 0, payload: bytes = b"") -> None:
        await self.send(build_request(command, offset, length, cookie, flags) + payload)

    async def reply(self, read_length: int = 0) -> Reply:
        """One whole reply. `read_length` is the data a successful simple READ reply
        carries (the simple reply header does not say)."""
        magic = struct.unpack(">I", await self.receive_exactly(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.receive_exactly(12))
            data = await self.receive_exactly(read_length) if not error else b""
            return Reply(cookie, error, data)
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        result = Reply(0, 0, chunks=0)
        collected = bytearray()
        while True:
            if result.chunks:
                assert struct.unpack(">I", await self.receive_exactly(4))[0] == magic
            flags, chunk_type, cookie, length = struct.unpack(
                ">HHQI", await self.receive_exactly(16))
            body = await self.receive_exactly(length)
            result.cookie = cookie
            result.chunks += 1
            if chunk_type == ChunkType.OFFSET_DATA:
                collected += body[8:]
            elif chunk_type in (ChunkType.ERROR, ChunkType.ERROR_OFFSET):
                result.error, message_length = struct.unpack(">IH", body[:6])
                result.message = body[6:6 + message_length]
            elif chunk_type == ChunkType.BLOCK_STATUS:
                collected += body
            if flags & ReplyFlag.DONE:
                result.data = bytes(collected)
                return result
