"""python3-libnbd as a peer process, run by each generation's own python3 (the host's
bookworm binding, or trixie's inside its root) as `python3 - URI`, source on stdin.

It writes, zeroes, trims, flushes, asks block status and keeps 16 writes in flight,
checking every answer (a wrong one is an AssertionError and exit status 1), then
prints one JSON line: the SHA-256 of the whole export as it read it at the end, and
what it negotiated.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import nbd

MiB = 1024 * 1024
CHUNK = 64 * 1024
IN_FLIGHT = 16


def exercise(h: nbd.NBD) -> None:
    data = os.urandom(MiB + 3)
    h.pwrite(data, 4097)
    assert h.pread(len(data), 4097) == data
    fua = os.urandom(4096)
    h.pwrite(fua, 3 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(len(fua), 3 * MiB) == fua
    h.zero(MiB, 4 * MiB)
    assert h.pread(MiB, 4 * MiB) == bytes(MiB)
    h.trim(64 * 1024, 6 * MiB)
    h.flush()
    assert h.can_meta_context("base:allocation")
    entries: list[int] = []

    def collect(context: str, offset: int, found: list[int], error: object) -> int:
        entries.extend(found)
        return 0

    h.block_status(MiB, 0, collect)
    assert entries and entries[1] & nbd.STATE_HOLE == 0, entries  # written: data


def many_in_flight(h: nbd.NBD) -> None:
    """IN_FLIGHT writes sent before any reply is read, then read back the same way;
    every buffer stays referenced until its command completes."""
    chunks = {index * 2 * CHUNK: os.urandom(CHUNK) for index in range(IN_FLIGHT)}
    writes = []
    for offset, chunk in chunks.items():
        buffer = nbd.Buffer.from_bytearray(bytearray(chunk))
        writes.append((h.aio_pwrite(buffer, offset), buffer))
    assert h.aio_in_flight() == IN_FLIGHT
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(cookie) for cookie, _ in writes)
    reads = []
    for offset in chunks:
        buffer = nbd.Buffer(CHUNK)
        reads.append((h.aio_pread(buffer, offset), buffer, offset))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, buffer, offset in reads:
        assert h.aio_command_completed(cookie)
        assert buffer.to_bytearray() == chunks[offset], offset


def main(uri: str) -> int:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    exercise(h)
    many_in_flight(h)
    content = h.pread(h.get_size(), 0)
    extended = getattr(h, "get_extended_headers_negotiated", lambda: False)()  # >= 1.18
    print(json.dumps({
        "sha256": hashlib.sha256(content).hexdigest(),
        "libnbd": h.get_version(),
        "structured": h.get_structured_replies_negotiated(),
        "extended": extended,
    }))
    h.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
