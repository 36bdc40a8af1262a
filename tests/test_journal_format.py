"""The journal format: round trips, and a torn tail at every byte."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_intdigest

from nbdverify.journal_format import (
    BLOCK,
    MAX_PAD,
    RECORD_OVERHEAD,
    JournalFormatError,
    JournalHeader,
    JournalReader,
    Record,
    RecordKind,
    decode_record,
    encode_header,
    encode_record,
    pack_pad_into,
    pad_record_size,
    read_header,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
times = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def records(draw: st.DrawFn, kinds: tuple[RecordKind, ...] = tuple(RecordKind)) -> Record:
    kind = draw(st.sampled_from(kinds))
    payload = b""
    if kind in (RecordKind.WRITE, RecordKind.PAD):
        payload = draw(st.binary(max_size=300))
    elif kind is RecordKind.NOTE:
        payload = draw(st.text(max_size=32)).encode()
    count = len(payload) if kind is RecordKind.WRITE else draw(u32)
    return Record(kind, draw(u64), draw(u64), count, draw(st.integers(0, 0xFFFF)),
                  draw(st.none() | st.integers(0, 2**32 - 2)), draw(u64), draw(times),
                  draw(times), draw(st.integers(0, 3)), payload)


def journal(header: JournalHeader, items: list[Record]) -> bytes:
    return encode_header(header) + b"".join(encode_record(r) for r in items)


HEADER = JournalHeader(1 << 30, "/images/raw.img", "nbd+unix:///?socket=/s", "disk", 1.5)


# Draws are small; the 2-core machine shared by several test runs makes them slow.
relaxed = settings(suppress_health_check=[HealthCheck.too_slow])


@relaxed
@given(records())
def test_a_record_round_trips(record: Record) -> None:
    assert decode_record(encode_record(record)) == record


CHANGES = tuple(kind for kind in RecordKind if kind is not RecordKind.PAD)


@relaxed
@given(st.builds(JournalHeader, u64, st.text(), st.text(), st.text(), times),
       st.lists(records(CHANGES), max_size=8), st.lists(st.booleans(), max_size=9))
def test_a_journal_round_trips_and_its_pads_are_skipped(header: JournalHeader,
                                                        items: list[Record],
                                                        pads: list[bool]) -> None:
    written = encode_header(header)
    for index, record in enumerate([*items, None]):
        if index < len(pads) and pads[index]:  # a pad wherever a batch may have ended
            buffer = bytearray(MAX_PAD)
            size = pad_record_size(len(written))
            if size:
                pack_pad_into(buffer, 0, size)
                written += buffer[:size]
                assert len(written) % BLOCK == 0
        if record is not None:
            written += encode_record(record)
    reader = JournalReader(io.BytesIO(written))
    assert reader.header == header
    assert list(reader) == items
    assert reader.torn is None


def test_a_version_1_journal_is_read() -> None:
    old = bytearray(journal(HEADER, SAMPLE))
    old[8] = 1
    start = len(encode_header(HEADER))
    old[start - 8:start] = struct.pack("<Q", xxh3_64_intdigest(bytes(old[:start - 8])))
    assert list(JournalReader(io.BytesIO(bytes(old)))) == SAMPLE


SAMPLE = [
    Record(RecordKind.WRITE, 1, 4096, 5, 1, 3, 0xABC, 10.0, 1.0, 0, b"hello"),
    Record(RecordKind.FLUSH, 2, connection=3, cookie=0xABD),
    Record(RecordKind.WRITE_ZEROES, 3, 0, 65536, 2),
    Record(RecordKind.NOTE, 4, payload=b"recording stopped"),
]


def test_a_torn_tail_at_every_byte_keeps_the_whole_records_before_it() -> None:
    data = journal(HEADER, SAMPLE)
    header_length = len(encode_header(HEADER))
    ends = [header_length]
    for record in SAMPLE:
        ends.append(ends[-1] + len(encode_record(record)))
    for cut in range(header_length, len(data)):
        reader = JournalReader(io.BytesIO(data[:cut]))
        got = list(reader)
        whole = sum(1 for end in ends[1:] if end <= cut)
        assert got == SAMPLE[:whole], cut
        if cut in ends:
            assert reader.torn is None, cut
        else:
            assert reader.torn is not None, cut
            assert reader.torn.position == ends[whole]
            assert reader.torn.ignored_bytes == cut - ends[whole]
            assert "torn at byte" in reader.describe_torn()


def test_a_header_cut_anywhere_is_not_a_journal() -> None:
    data = encode_header(HEADER)
    for cut in range(len(data)):
        with pytest.raises(JournalFormatError):
            read_header(io.BytesIO(data[:cut]))


def test_a_damaged_byte_stops_reading_at_that_record() -> None:
    data = bytearray(journal(HEADER, SAMPLE))
    second = len(encode_header(HEADER)) + len(encode_record(SAMPLE[0]))
    data[second + RECORD_OVERHEAD - 12] ^= 1  # inside the second record's fields
    reader = JournalReader(io.BytesIO(bytes(data)))
    assert list(reader) == SAMPLE[:1]
    assert reader.torn is not None and "checksum" in reader.torn.reason
    assert reader.torn.ignored_bytes == len(data) - second


def test_other_files_and_versions_are_refused_by_name() -> None:
    with pytest.raises(JournalFormatError, match="not an nbdverify journal"):
        read_header(io.BytesIO(b"QFI\xfb" + bytes(60)))
    future = bytearray(encode_header(HEADER))
    future[8] = 3
    with pytest.raises(JournalFormatError, match="version 3"):
        read_header(io.BytesIO(bytes(future)))
