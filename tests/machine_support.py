"""Driving a sans-IO machine (ServerTransmission, ReplyReader) from test bytes:
in any chunking, taking events after every piece, as the I/O layer does."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol, TypeVar

from nbdverify_protocol.events import NEED_DATA, NeedData
from nbdverify_protocol.transmission import EndOfStream

E_co = TypeVar("E_co", covariant=True)


class Machine(Protocol[E_co]):
    def receive_data(self, data: bytes | bytearray | memoryview) -> None: ...
    def next_event(self) -> E_co | NeedData: ...


def take(machine: Machine[E_co]) -> list[E_co]:
    """Events until the machine needs more bytes (or has seen the stream end)."""
    events: list[E_co] = []
    while (event := machine.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, EndOfStream):  # it stays ended: asking again says so again
            break
    return events


def feed(machine: Machine[E_co], chunks: Sequence[bytes], end: bool = False) -> list[E_co]:
    """Feed the chunks one by one, taking events after each; then the end of stream."""
    events: list[E_co] = []
    for piece in chunks:
        if piece:  # b"" would mean the end of the stream
            machine.receive_data(piece)
            events += take(machine)
    if end:
        machine.receive_data(b"")
        events += take(machine)
    return events


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """`data` cut at the given points (taken modulo its length)."""
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]
