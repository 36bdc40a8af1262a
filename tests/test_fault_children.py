"""Fault-injecting children: nbdkit 1.42 (from the trixie root) serves TEST, a file
identical to RAW, through a filter that misbehaves, and nbdverify must catch it.

The evil filter corrupts reads: cosmic-rays flips random bits, stuck-bits pins bits
of the disk, stuck-wires pins bits at fixed places in every reply. With
--on-mismatch=log every corrupted read must be a finding, and the client must still
get RAW's bytes. What the filter corrupted is counted on its own: a fresh nbdkit with
the same seed, read directly with the same requests in the same order, corrupts the
same bits (stuck-bits depends on the seed and the offset; stuck-wires on the seed and
the place in the reply; cosmic-rays on the seed and the sizes and order of the reads,
which it serializes), so the test first checks that two direct readings agree.
With --on-mismatch=error exactly the corrupted reads must fail.

The error filter's failed reads are divergences, counted against the line nbdkit
logs for each error it injects.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from peers_support import MiB, Peer, assert_same_bytes, start_nbdkit
from support import ImagePair, LibnbdClient, make_pair, start_server, terminate

SECTOR = 512
SIZE = 16 * MiB
# At 1e-6 the filter hits ~134 of SIZE's 2**27 bits: several in each 1 MiB read,
# well under the 64 differing ranges a finding lists.
EVIL_PROBABILITY = "1e-6"
EVIL_CHUNK = MiB
# 64 reads failing at 25% each: none fails, or all do, with odds under 1e-7.
ERROR_CHUNK = SIZE // 64
ERROR_RATE = "25%"


def read_serially(uri: str, chunk: int) -> bytes:
    """The whole export in `chunk`-sized reads, one at a time, in order: the same
    sequence of requests every time."""
    client = LibnbdClient(uri)
    try:
        return b"".join(client.pread(chunk, offset) for offset in range(0, SIZE, chunk))
    finally:
        with contextlib.suppress(nbd.Error):
            client.handle.shutdown()


def differing_sectors(a: bytes, b: bytes) -> set[int]:
    return {offset // SECTOR for offset in range(0, len(a), SECTOR)
            if a[offset:offset + SECTOR] != b[offset:offset + SECTOR]}


@contextlib.contextmanager
def nbdkit_child(peer: Peer, directory: Path, *arguments: str,
                 stderr: Any = subprocess.PIPE) -> Iterator[str]:
    """A fresh nbdkit (so a fresh random state) on a socket of its own; its URI."""
    socket = directory / f"nbdkit-{time.monotonic_ns()}.sock"
    process = start_nbdkit(peer, socket, *arguments, stderr=stderr)
    try:
        yield f"nbd+unix:///?socket={socket}"
    finally:
        terminate(process)


def evil_arguments(pair: ImagePair, mode: str, seed: int) -> list[str]:
    return ["--filter=evil", "file", str(pair.test), f"evil={mode}",
            f"evil-probability={EVIL_PROBABILITY}", f"evil-seed={seed}"]


def corrupted_reads(sectors: set[int]) -> set[int]:
    """Which of read_serially's EVIL_CHUNK reads (by index) hold these sectors."""
    return {sector * SECTOR // EVIL_CHUNK for sector in sectors}


@pytest.fixture
def pair(tmp_path: Path) -> ImagePair:
    # Random, so fully allocated: evil leaves holes alone.
    return make_pair(tmp_path, size=SIZE)


@pytest.mark.parametrize("mode, seed", [("cosmic-rays", 7), ("stuck-bits", 11),
                                        ("stuck-wires", 13)])
def test_evil_corruption_is_caught_every_time_and_never_reaches_the_client(
        trixie: Peer, tmp_path: Path, pair: ImagePair, mode: str, seed: int) -> None:
    evil = evil_arguments(pair, mode, seed)
    raw = pair.raw_bytes()
    readings = []
    for _ in range(2):
        with nbdkit_child(trixie, tmp_path, *evil) as uri:
            readings.append(read_serially(uri, EVIL_CHUNK))
    direct, again = readings
    assert direct == again, "the filter is not repeatable for one sequence: cannot count"
    corrupted = differing_sectors(direct, raw)
    assert corrupted, "the filter corrupted nothing: this test would prove nothing"

    with nbdkit_child(trixie, tmp_path, *evil) as uri:
        server = start_server(tmp_path, pair, "--on-mismatch=log", test=uri)
        try:
            seen = read_serially(server.uri, EVIL_CHUNK)
        finally:
            assert server.stop() == 0, server.stderr
    assert_same_bytes(seen, raw, "client's data vs RAW")
    records: list[dict[str, Any]] = server.report_records()
    assert {record["kind"] for record in records} == {"mismatch"}, records
    reported = {sector for record in records
                for start, end in record["differing_ranges"]
                for sector in range(start // SECTOR, end // SECTOR)}
    assert reported == corrupted
    assert sum(record["differing_sectors"] for record in records) == len(corrupted)
    assert sorted(record["offset"] // EVIL_CHUNK for record in records) == sorted(
        corrupted_reads(corrupted))
    assert pair.test_bytes() == raw, "evil changes reads only, never the file"


def test_evil_corrupted_reads_fail_under_on_mismatch_error(trixie: Peer, tmp_path: Path,
                                                          pair: ImagePair) -> None:
    """With --on-mismatch=error exactly the corrupted reads fail (EIO), the others
    return RAW's bytes, and the connection carries on. stuck-bits corrupts the same
    bits whatever the order of the reads, so one direct reading counts them."""
    evil = evil_arguments(pair, "stuck-bits", 11)
    raw = pair.raw_bytes()
    with nbdkit_child(trixie, tmp_path, *evil) as uri:
        expected = corrupted_reads(differing_sectors(read_serially(uri, EVIL_CHUNK), raw))
    assert expected, "the filter corrupted nothing: this test would prove nothing"
    failed = set()
    with nbdkit_child(trixie, tmp_path, *evil) as uri:
        server = start_server(tmp_path, pair, "--on-mismatch=error", test=uri)
        try:
            client = LibnbdClient(server.uri)
            for index, offset in enumerate(range(0, SIZE, EVIL_CHUNK)):
                try:
                    data = client.pread(EVIL_CHUNK, offset)
                except nbd.Error as error:
                    assert error.errno == "EIO", error.string
                    failed.add(index)
                    continue
                assert_same_bytes(data, raw[offset:offset + EVIL_CHUNK], f"read {index}")
            client.handle.shutdown()
        finally:
            assert server.stop() == 0, server.stderr
    assert failed == expected
    assert len(server.report_records()) == len(expected)


def test_error_filter_failures_are_divergences(trixie: Peer, tmp_path: Path,
                                               pair: ImagePair) -> None:
    log = tmp_path / "nbdkit-error.log"
    with log.open("wb") as stderr, nbdkit_child(
            trixie, tmp_path, "--filter=error", "file", str(pair.test), "error-pread=EIO",
            f"error-pread-rate={ERROR_RATE}", stderr=stderr) as uri:
        server = start_server(tmp_path, pair, "--on-mismatch=log", test=uri)
        try:
            seen = read_serially(server.uri, ERROR_CHUNK)
        finally:
            assert server.stop() == 0, server.stderr
    injected = log.read_text().count("injecting EIO error into pread")
    assert 0 < injected < SIZE // ERROR_CHUNK, injected
    assert_same_bytes(seen, pair.raw_bytes(), "client's data vs RAW")
    records: list[dict[str, Any]] = server.report_records()
    assert len(records) == injected, records
    for record in records:
        assert record["kind"] == "divergence", record
        assert record["operation"] == "read"
        assert record["raw_error"] is None
        assert str(record["test_error"]).startswith("EIO"), record
        assert record["offset"] % ERROR_CHUNK == 0 and record["length"] == ERROR_CHUNK
