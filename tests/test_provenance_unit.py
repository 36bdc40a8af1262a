"""Provenance, classification and statistics on their own: pure, no I/O."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

from nbdverify.changes import Change, ChangeKind, Origin
from nbdverify.classify import MismatchClass, classify
from nbdverify.provenance import CHUNK, LastWrite, Provenance, sector_pieces
from nbdverify.statistics import WINDOW, LatencyWindow, Statistics
from nbdverify_protocol.constants import CommandFlag

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class Feeder:
    """Numbers changes the way the device does and hands them to a Provenance."""

    def __init__(self, provenance: Provenance) -> None:
        self.provenance = provenance
        self.sequence = 0

    def change(self, kind: ChangeKind, offset: int = 0, length: int = 0, flags: int = 0,
               connection: int = 1, data: bytes | None = None, replaced: bytes | None = None,
               covers: int | None = None) -> int:
        self.sequence += 1
        self.provenance.changed(Change(
            self.sequence, kind, offset, length, flags, Origin(connection, 100 + self.sequence),
            1000.0 + self.sequence, 5.0 + self.sequence, data, replaced=replaced,
            covers=self.sequence - 1 if covers is None else covers))
        return self.sequence

    def write(self, offset: int, data: bytes, replaced: bytes | None = None,
              flags: int = 0, connection: int = 1) -> int:
        return self.change(ChangeKind.WRITE, offset, len(data), flags, connection, data,
                           replaced)


def sequences(provenance: Provenance, start: int, end: int) -> list[tuple[int, int, int]]:
    return [(a, b, 0 if w is None else w.sequence) for a, b, w in provenance.writers(start, end)]


# --- The map ----------------------------------------------------------------------------

def test_writes_cut_runs_and_unwritten_bytes_are_initial_content() -> None:
    feed = Feeder(Provenance())
    feed.write(4096, bytes(8192))
    feed.write(6000, bytes(100))  # inside the first, unaligned
    feed.write(12000, bytes(1000))  # overlaps the end of the first
    assert sequences(feed.provenance, 0, 16384) == [
        (0, 4096, 0), (4096, 6000, 1), (6000, 6100, 2), (6100, 12000, 1), (12000, 13000, 3),
        (13000, 16384, 0)]
    feed.write(0, bytes(16384))  # covers all of them
    assert sequences(feed.provenance, 0, 20000) == [(0, 16384, 4), (16384, 20000, 0)]


def test_a_write_across_a_chunk_boundary_is_one_range() -> None:
    feed = Feeder(Provenance())
    feed.write(CHUNK - 512, bytes(1024))
    assert sequences(feed.provenance, CHUNK - 4096, CHUNK + 4096) == [
        (CHUNK - 4096, CHUNK - 512, 0), (CHUNK - 512, CHUNK + 512, 1),
        (CHUNK + 512, CHUNK + 4096, 0)]


def test_a_zero_length_write_takes_no_bytes() -> None:
    feed = Feeder(Provenance())
    feed.write(4096, bytes(4096))
    feed.write(6000, b"")  # inside a written run
    feed.write(CHUNK, b"")  # on a chunk boundary
    assert sequences(feed.provenance, 0, CHUNK + 4096) == [
        (0, 4096, 0), (4096, 8192, 1), (8192, CHUNK + 4096, 0)]


def test_records_name_operation_connection_cookie_flags_and_times() -> None:
    feed = Feeder(Provenance())
    feed.write(0, bytes(512), flags=CommandFlag.FUA, connection=7)
    feed.change(ChangeKind.WRITE_ZEROES, 512, 512, CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO)
    feed.change(ChangeKind.TRIM, 1024, 512)
    (_, _, fua), (_, _, zero), (_, _, trim) = feed.provenance.writers(0, 1536)
    assert fua == LastWrite(1, True, operation=ChangeKind.WRITE, connection=7, cookie=101,
                            offset=0, length=512, flags=int(CommandFlag.FUA), wall_time=1001.0,
                            monotonic_time=6.0)
    assert fua.describe() == "write #1 (conn 7, 512 bytes at 0, flushed)"
    assert zero is not None and zero.as_record()["flags"] == ["no_hole", "fast_zero"]
    assert zero.as_record()["flushed"] is False
    assert trim is not None and trim.operation is ChangeKind.TRIM


def test_a_flush_covers_what_completed_before_it_began_not_after() -> None:
    feed = Feeder(Provenance())
    early = feed.write(0, bytes(512))
    late_start = feed.sequence
    during = feed.write(512, bytes(512))  # completes while the flush is in flight
    feed.change(ChangeKind.FLUSH, covers=late_start)
    after = feed.write(1024, bytes(512))
    flushed = {w.sequence: w.flushed for _, _, w in feed.provenance.writers(0, 1536) if w}
    assert flushed == {early: True, during: False, after: False}


def test_past_the_record_cap_details_are_forgotten_but_the_number_is_kept() -> None:
    feed = Feeder(Provenance(record_cap=8))
    for n in range(20):
        feed.write(n * 512, bytes(512))
    [(_, _, oldest)] = feed.provenance.writers(0, 512)
    assert oldest == LastWrite(1, False)
    assert oldest.describe() == "request #1 (details no longer kept, not flushed)"
    assert oldest.as_record() == {"sequence": 1, "summarised": True, "flushed": False}
    [(_, _, newest)] = feed.provenance.writers(19 * 512, 20 * 512)
    assert newest is not None and newest.operation is ChangeKind.WRITE


def test_past_the_run_cap_the_oldest_chunks_are_summarised() -> None:
    feed = Feeder(Provenance(run_cap=40))
    for n in range(10):  # chunk 0: 20 runs and more
        feed.write(n * 8192, bytes(4096))
    for n in range(10):  # chunk 1, later
        feed.write(CHUNK + n * 8192, bytes(4096))
    feed.change(ChangeKind.FLUSH, covers=feed.sequence)
    feed.write(2 * CHUNK, bytes(4096))
    assert feed.provenance.summarised_chunks == 1
    [(start, end, summary)] = feed.provenance.writers(0, CHUNK)
    assert (start, end) == (0, CHUNK)
    assert summary == LastWrite(11, True, exact=False)
    assert summary.describe() == "a request before #11 (summarised, flushed)"
    assert summary.as_record() == {"before": 11, "summarised": True, "flushed": True}
    assert sequences(feed.provenance, CHUNK, CHUNK + 4096) == [(CHUNK, CHUNK + 4096, 11)]


def test_sector_pieces_clip_to_the_range() -> None:
    assert sector_pieces(0, 1024) == [(0, 512), (512, 1024)]
    assert sector_pieces(100, 1000) == [(100, 512), (512, 1024), (1024, 1100)]
    assert sector_pieces(600, 10) == [(600, 610)]
    assert sector_pieces(5, 0) == []


def test_fingerprints_of_what_a_write_replaced_until_the_ring_wraps() -> None:
    feed = Feeder(Provenance(fingerprints=True, fingerprint_cap=16))
    old = os.urandom(4096)
    feed.write(0, os.urandom(4096), replaced=old)
    [(_, _, first)] = feed.provenance.writers(0, 4096)
    assert first is not None
    assert list(feed.provenance.replaced_fingerprints(first) or []) == [
        zlib.crc32(old[at:at + 512]) for at in range(0, 4096, 512)]
    feed.write(8192, os.urandom(4096), replaced=os.urandom(4096))  # 16 in the ring: still there
    assert feed.provenance.replaced_fingerprints(first) is not None
    feed.write(16384, os.urandom(512), replaced=os.urandom(512))  # wraps over the first
    assert feed.provenance.replaced_fingerprints(first) is None


def test_recent_pieces_name_their_write_and_offset_and_zeros_name_none() -> None:
    feed = Feeder(Provenance(fingerprints=True, recent_pieces=2))
    data = os.urandom(8192)
    feed.write(65536, data, replaced=bytes(8192))
    feed.write(0, bytes(4096), replaced=bytes(4096))
    assert feed.provenance.recent_source(data[4096:4608]) == (1, 65536 + 4096)
    assert feed.provenance.recent_source(bytes(512)) is None
    feed.write(4096, os.urandom(4096), replaced=bytes(4096))  # pushes out the oldest piece
    assert feed.provenance.recent_source(data[:512]) is None
    assert feed.provenance.recent_source(data[4096:4608]) == (1, 65536 + 4096)


def million_writes() -> None:
    """A million random 4 KiB writes on a 16 GiB export, fingerprints on; prints
    (as JSON) how far the process's peak resident memory rose above where it was
    before, which counts what the allocator holds too, not only live objects."""
    before = resident_bytes()
    rng = random.Random(16)
    data, old = os.urandom(4096), os.urandom(4096)
    change = Change(0, ChangeKind.WRITE, 0, 4096, 0, Origin(1, 0), 0.0, 0.0, data, replaced=old)
    provenance = Provenance(fingerprints=True)
    for sequence in range(1, 1_000_001):
        change.sequence = sequence
        change.offset = rng.randrange(16 * GiB // 4096) * 4096
        provenance.changed(change)
    [(_, _, last)] = provenance.writers(change.offset, change.offset + 4096)
    # VmHWM, not ru_maxrss: Linux keeps the pre-exec image's peak in ru_maxrss, which
    # here is pytest's whole RSS at fork (700 MiB in a full run).
    peak = status_bytes("VmHWM")
    print(json.dumps({"grown": peak - before, "last": last.sequence if last else None}))


def status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) * 1024


def resident_bytes() -> int:
    return status_bytes("VmRSS")


def test_a_million_random_4k_writes_on_16_gib_stay_under_64_mib() -> None:
    """The documented bound, in a fresh interpreter so the peak is this run's
    alone. The slow test of this file (~25 s)."""
    result = subprocess.run(
        [sys.executable, "-c", "import test_provenance_unit as t; t.million_writes()"],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["last"] == 1_000_000
    assert measured["grown"] < 64 * MiB, measured["grown"] / MiB


# --- Classification -----------------------------------------------------------------------

def classified(provenance: Provenance, offset: int, raw: bytes, test: bytes,
               ranges: list[tuple[int, int]]) -> list[tuple[int, int, MismatchClass]]:
    return [(r.start, r.end, r.mismatch_class)
            for r in classify(provenance, offset, raw, test, 0, ranges)]


def test_a_lost_write_is_stale_and_a_half_lost_one_torn() -> None:
    feed = Feeder(Provenance(fingerprints=True))
    old, new = os.urandom(8192), os.urandom(8192)
    feed.write(0, new, replaced=old)
    assert classified(feed.provenance, 0, new, old, [(0, 8192)]) == [
        (0, 8192, MismatchClass.STALE)]
    torn = new[:4096] + old[4096:]
    [piece] = classify(feed.provenance, 0, new, torn, 0, [(4096, 8192)])
    assert piece.mismatch_class is MismatchClass.TORN
    assert piece.describe() == ("torn, TEST holds part of write #1 (conn 1, 8192 bytes at 0, "
                                "not flushed); 4096 bytes at 4096 still hold what was there "
                                "before it")


def test_unchanged_sectors_of_a_lost_write_do_not_make_it_torn() -> None:
    feed = Feeder(Provenance(fingerprints=True))
    old = os.urandom(4096)
    new = old[:2048] + os.urandom(2048)  # rewrote the first half unchanged
    feed.write(0, new, replaced=old)
    assert classified(feed.provenance, 0, new, old, [(2048, 4096)]) == [
        (2048, 4096, MismatchClass.STALE)]


def test_data_meant_for_elsewhere_is_misdirected_and_names_its_write() -> None:
    feed = Feeder(Provenance(fingerprints=True))
    landed = os.urandom(4096)
    feed.write(1 * MiB, landed, replaced=os.urandom(4096))
    raw = os.urandom(4096)  # never written here
    [piece] = classify(feed.provenance, 0, raw, landed, 0, [(0, 4096)])
    assert piece.mismatch_class is MismatchClass.MISDIRECTED
    assert piece.source_offset == 1 * MiB and piece.source is not None
    assert piece.source.sequence == 1 and piece.last_write is None
    assert piece.as_record()["misdirected_from"] == 1 * MiB
    assert piece.describe().startswith("misdirected, TEST holds at 0 the data write #1")


def test_zeros_bits_and_anything_else() -> None:
    feed = Feeder(Provenance())
    raw = os.urandom(1536)
    flipped = bytearray(raw)
    flipped[600] ^= 0x81
    garbage = os.urandom(512)
    test = bytes(512) + bytes(flipped[512:1024]) + garbage
    pieces = classify(feed.provenance, 0, raw, test, 0, [(0, 1536)])
    assert [(p.mismatch_class, p.bits) for p in pieces] == [(MismatchClass.OTHER, None)]
    pieces = classify(feed.provenance, 0, raw, test, 0, [(0, 512), (512, 1024), (1024, 1536)])
    assert [(p.mismatch_class, p.bits) for p in pieces] == [
        (MismatchClass.ZEROED, None), (MismatchClass.BITFLIP, 2), (MismatchClass.OTHER, None)]
    assert pieces[1].describe() == "bitflip, 2 bits differ from its initial content"
    assert pieces[0].as_record() == {"start": 0, "end": 512, "class": "zeroed",
                                     "last_write": None}


def test_a_range_is_cut_where_its_last_writer_changes_and_keeps_bytes_for_dumps() -> None:
    feed = Feeder(Provenance())
    feed.write(512, os.urandom(512))
    raw, test = os.urandom(2048), os.urandom(2048)
    pieces = classify(feed.provenance, 0, b"hh" + raw, b"hh" + test, 2, [(0, 2048)],
                      keep_bytes=True)
    assert [(p.start, p.end) for p in pieces] == [(0, 512), (512, 1024), (1024, 2048)]
    assert [p.last_write.sequence if p.last_write else None for p in pieces] == [None, 1, None]
    assert pieces[1].raw == raw[512:1024] and pieces[1].test == test[512:1024]


# --- Statistics -----------------------------------------------------------------------------

def test_percentiles_are_exact_over_the_recent_window_and_the_max_over_all() -> None:
    window = LatencyWindow()
    assert window.as_record() == {"p50_ns": 0, "p99_ns": 0, "max_ns": 0}
    rng = random.Random(5)
    samples = [rng.randrange(1, 10**6) for _ in range(1001)]
    window.current.extend(samples)
    ordered = sorted(samples)
    assert window.percentile(0.5) == ordered[500]
    assert window.percentile(0.99) == ordered[math.ceil(0.99 * 1001) - 1]
    assert window.max_ns == ordered[-1] and window.count == 1001
    window.roll()
    window.current.extend([7, 8])
    window.roll()  # the first thousand and one are dropped but for their maximum
    assert window.percentile(0.5) == 7 and window.max_ns == ordered[-1]
    assert window.count == 1003


def test_children_done_rolls_both_windows_at_the_cap() -> None:
    statistics = Statistics()
    for _ in range(WINDOW * 2 + 1):
        statistics.children_done("read", 5, 9)
    entry = statistics.operations["read"]
    assert entry.raw.count == entry.test.count == WINDOW * 2 + 1
    assert len(entry.raw.current) == 1


def test_statistics_summary_and_record() -> None:
    statistics = Statistics()
    statistics.started("write", 4096)
    statistics.started("write", 4096)
    statistics.children_done("write", 20_000, 2_000_000)
    statistics.started("flush")
    statistics.bytes_verified = 3 * MiB
    record = statistics.as_record(findings=1)
    assert record["operations"] == {
        "write": {"count": 2, "bytes": 8192,
                  "latency": {"raw": {"p50_ns": 20000, "p99_ns": 20000, "max_ns": 20000},
                              "test": {"p50_ns": 2000000, "p99_ns": 2000000,
                                       "max_ns": 2000000}}},
        "flush": {"count": 1, "bytes": 0, "latency": {}}}
    assert statistics.count("write") == 2 and statistics.count("read") == 0
    assert statistics.summary(findings=1) == (
        "write 2 8.0 KiB (raw p50 20us p99 20us max 20us test p50 2.0ms p99 2.0ms max 2.0ms); "
        "flush 1; verified 3.0 MiB, unverified 0 B, findings 1")
