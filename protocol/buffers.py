"""The byte plumbing every sans-IO state machine here shares."""

from __future__ import annotations

from mypy_extensions import mypyc_attr

# One receive into the input buffer takes up to this much: at QD16 a single receive
# then carries every 4 KiB request (or reply) the peer has sent.
RECEIVE_SIZE = 256 * 1024


# Compiled with mypyc (protocol/native.py), a class needs leave to have subclasses
# that are not: the negotiation machines and the client's reply reader.
@mypyc_attr(allow_interpreted_subclasses=True)
class ByteConversation:
    """Bytes received but not yet parsed, and bytes queued for the peer (negotiation:
    small messages, so plain copies)."""

    def __init__(self) -> None:
        self._received = bytearray()
        self._outgoing = bytearray()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._received += data

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the negotiation ended: the first requests or replies."""
        return bytes(self._received)

    def _take(self, count: int) -> bytes:
        data = bytes(self._received[:count])
        del self._received[:count]
        return data


class InputBuffer:
    """Received bytes not yet parsed, kept so that the I/O layer receives straight
    into it (`recv_into`) and parsers read headers in place (`struct.unpack_from`).

    The transmission machines add one thing on top: while a payload is being
    received and nothing else is buffered, they hand out the payload's own buffer
    instead, so a 1 MiB WRITE or READ reply is never copied after the kernel's copy.
    """

    def __init__(self, size: int = RECEIVE_SIZE) -> None:
        self.data = bytearray(size)
        self.start = 0  # unparsed bytes are data[start:end]
        self.end = 0

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def room(self) -> memoryview:
        """Free space after the unparsed bytes (moved to the front when needed)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.data) - self.end < len(self.data) // 4:
            count = self.end - self.start
            self.data[:count] = self.data[self.start:self.end]
            self.start, self.end = 0, count
        return memoryview(self.data)[self.end:]

    def filled(self, count: int) -> None:
        """`count` bytes were received into `room()`."""
        self.end += count

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes in (trailing negotiation data, tests), growing if they do not fit."""
        count = len(data)
        room = self.room()
        if len(room) < count:
            pending = self.data[self.start:self.end]
            self.data = bytearray(max(len(self.data), len(pending) + count))
            self.data[:len(pending)] = pending
            self.start, self.end = 0, len(pending)
            room = self.room()
        room[:count] = data
        self.end += count

    def consume(self, count: int) -> None:
        self.start += count

    def take_into(self, target: memoryview) -> int:
        """Move up to len(target) buffered bytes into target; how many moved. (Through a
        memoryview: a bytearray slice is a copy of its own first, 13 us instead of
        6.5 us for 200 KB here.)"""
        count = min(self.end - self.start, len(target))
        target[:count] = memoryview(self.data)[self.start:self.start + count]
        self.start += count
        return count

    def skip(self, count: int) -> int:
        """Drop up to `count` buffered bytes; how many were dropped."""
        count = min(self.end - self.start, count)
        self.start += count
        return count

    def ensure(self, count: int) -> None:
        """Make room for `count` unparsed bytes in all (a message bigger than the buffer)."""
        if len(self.data) - self.start >= count:
            return
        pending = self.data[self.start:self.end]
        self.data = bytearray(max(count, len(self.data)))
        self.data[:len(pending)] = pending
        self.start, self.end = 0, len(pending)


# Dropped payloads pass through a scratch buffer of at most this size, so a refused
# 200 MiB WRITE (or an abandoned 32 MiB READ reply) never costs its size in memory.
DISCARD_CHUNK = 1024 * 1024


@mypyc_attr(allow_interpreted_subclasses=True)
class PayloadStream:
    """What both transmission machines receive through: an input buffer for headers,
    and a sink for the payload being received (a buffer to fill, or bytes to drop).

    While a payload is due and nothing else is buffered, `receive_buffer()` is the
    payload's own buffer, so a 1 MiB WRITE or READ reply is received in place.
    """

    def __init__(self, initial: bytes | bytearray = b"") -> None:
        self._input = InputBuffer()
        self._unfilled = memoryview(b"")  # the part of the payload still to come
        self._discard = 0  # payload bytes still to drop
        self._scratch: bytearray | None = None
        self._ended = False  # the peer closed the stream
        if initial:
            self._input.feed(initial)

    def receive_buffer(self) -> memoryview:
        """Where the next received bytes must go."""
        source = self._input
        if source.start == source.end:
            if self._unfilled:
                return self._unfilled
            if self._discard:
                if self._scratch is None:
                    self._scratch = bytearray(DISCARD_CHUNK)
                return memoryview(self._scratch)[:self._discard]
        return self._input.room()

    def received(self, count: int) -> None:
        """`count` bytes arrived in the last `receive_buffer()`; 0 is end of stream."""
        source = self._input
        if count == 0:
            self._ended = True
        elif source.start != source.end:
            source.end += count
        elif self._unfilled:
            self._unfilled = self._unfilled[count:]
        elif self._discard:
            self._discard -= count
        else:
            self._input.filled(count)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes in (tests, bytes that came with the end of negotiation);
        b"" is end of stream."""
        view = memoryview(data)
        if not view:
            self.received(0)
        while view:
            target = self.receive_buffer()
            if not target:
                # The input buffer is full of unparsed bytes (no next_event() between
                # copies): grow it, or an empty receive would read as end of stream.
                self._input.feed(view)
                return
            count = min(len(target), len(view))
            target[:count] = view[:count]
            self.received(count)
            view = view[count:]

    def _sink(self, target: memoryview | None, length: int) -> None:
        """The next `length` payload bytes go into `target`, or are dropped if None."""
        if target is None:
            self._discard = length
        else:
            self._unfilled = target

    def _sink_full(self) -> bool:
        """Move buffered bytes into the sink; True once the whole payload is in."""
        if self._unfilled:
            # Two statements: compiled by mypyc, a call inside a memoryview's (or
            # bytearray's) slice bound runs twice (mypyc 2.4.1), losing payload bytes.
            taken = self._input.take_into(self._unfilled)
            self._unfilled = self._unfilled[taken:]
        if self._discard:
            self._discard -= self._input.skip(self._discard)
        return not self._unfilled and not self._discard
