"""The byte plumbing every sans-IO state machine here shares."""

from __future__ import annotations


class ByteConversation:
    """Bytes received but not yet parsed, and bytes queued for the peer."""

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
