"""`serve --journal`, `journal show` and `replay`, through the real commands, with
libnbd as the client (each request is one change, so sequence numbers are known)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import nbd
import pytest
from support import (
    CORRUPT_OFFSET,
    ImagePair,
    Launcher,
    LibnbdClient,
    nbdverify,
)

from nbdverify.journal_format import (
    JournalReader,
    Record,
)

BLOCK = 4096


def record_a_run(launch: Launcher, images: ImagePair, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Six changes, a copy of RAW, three more, then the server stops (a tenth: its
    final flush). Returns (journal, starting image, RAW after change 6)."""
    base = tmp_path / "base.img"
    middle = tmp_path / "middle.img"
    journal = tmp_path / "run.journal"
    shutil.copyfile(images.raw, base)
    server = launch("--journal", str(journal))
    client = LibnbdClient(server.uri)
    client.pwrite(b"\xaa" * BLOCK, 0)                     # 1
    client.pwrite(b"\xbb" * 100, 5000, fua=True)          # 2
    client.zero(65536, 1 << 20)                           # 3
    client.trim(65536, 2 << 20)                           # 4
    client.pwrite(os.urandom(3 * BLOCK), 3 << 20)         # 5
    client.flush()                                        # 6
    shutil.copyfile(images.raw, middle)
    client.pwrite(b"\xcc" * BLOCK, 2048)                  # 7: overlaps 1
    client.pwrite(os.urandom(BLOCK), 6 << 20)             # 8
    client.flush()                                        # 9
    client.handle.shutdown()
    assert server.stop() == 0, server.stderr
    return journal, base, middle


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def test_the_journal_shows_every_change_and_replays_to_any_point(
        launch: Launcher, images: ImagePair, tmp_path: Path) -> None:
    journal, base, middle = record_a_run(launch, images, tmp_path)
    shown = nbdverify("journal", "show", str(journal))
    assert shown.returncode == 0, shown.stderr
    rows = lines(shown.stdout)
    assert len(rows) == 10
    assert [row.split()[2] for row in rows] == [
        "write", "write", "write_zeroes", "trim", "write", "flush", "write", "write", "flush",
        "flush"]
    assert "offset 5000 length 100 (sector 9) FUA conn 1" in rows[1]
    records = [json.loads(row) for row in lines(
        nbdverify("journal", "show", str(journal), "--json").stdout)]
    assert [r["sequence"] for r in records] == list(range(1, 11))
    assert records[9]["connection"] is None  # the server's own flush at shutdown
    at = [json.loads(row)["sequence"] for row in lines(
        nbdverify("journal", "show", str(journal), "--json", "--at", "3000").stdout)]
    assert at == [1, 7]
    ranged = [json.loads(row)["sequence"] for row in lines(nbdverify(
        "journal", "show", str(journal), "--json", "--offset", "1M-3M",
        "--sequence", "1-4").stdout)]
    assert ranged == [3, 4]

    whole = tmp_path / "whole.img"
    shutil.copyfile(base, whole)
    replayed = nbdverify("replay", str(journal), "--onto", str(whole))
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 10 records" in replayed.stderr
    assert whole.read_bytes() == images.raw_bytes()
    for point in (["--until", "6"], ["--flushes", "1"]):
        partial = tmp_path / "partial.img"
        shutil.copyfile(base, partial)
        result = nbdverify("replay", str(journal), "--onto", str(partial), *point)
        assert result.returncode == 0, result.stderr
        assert partial.read_bytes() == middle.read_bytes(), point
    beyond = nbdverify("replay", str(journal), "--onto", str(tmp_path / "partial.img"),
                       "--until", "99")
    assert beyond.returncode == 1 and "ends before sequence 99" in beyond.stderr


def test_a_torn_journal_replays_to_its_last_whole_record_and_says_so(
        launch: Launcher, images: ImagePair, tmp_path: Path) -> None:
    journal, base, _ = record_a_run(launch, images, tmp_path)
    with journal.open("rb") as stream:
        reader = JournalReader(stream)
        for count, _ in enumerate(reader, 1):
            if count == 7:
                cut = reader.position + 30  # where record 7 ends (pads come after it)
                break
    torn = tmp_path / "torn.journal"
    torn.write_bytes(journal.read_bytes()[:cut])  # killed while appending record 8
    expected = tmp_path / "expected.img"
    shutil.copyfile(base, expected)
    assert nbdverify("replay", str(journal), "--onto", str(expected),
                     "--until", "7").returncode == 0
    replayed_path = tmp_path / "replayed.img"
    shutil.copyfile(base, replayed_path)
    result = nbdverify("replay", str(torn), "--onto", str(replayed_path))
    assert result.returncode == 0, result.stderr
    assert f"journal torn at byte {cut - 30}" in result.stderr
    assert "the 30 bytes after the last whole record are ignored" in result.stderr
    assert "replayed 7 records" in result.stderr
    assert replayed_path.read_bytes() == expected.read_bytes()
    shown = nbdverify("journal", "show", str(torn))
    assert len(lines(shown.stdout)) == 7 and "journal torn" in shown.stderr


def list_records(journal: Path) -> list[Record]:
    with journal.open("rb") as stream:
        return list(JournalReader(stream))


def test_the_cap_is_logged_once_and_the_server_keeps_serving_and_verifying(
        launch: Launcher, images: ImagePair, tmp_path: Path) -> None:
    journal = tmp_path / "capped.journal"
    server = launch("--journal", str(journal), "--journal-max-size", "64K")
    client = LibnbdClient(server.uri)
    written = {}
    for i in range(40):
        written[i * BLOCK] = os.urandom(BLOCK)
        client.pwrite(written[i * BLOCK], i * BLOCK)
    for offset, data in written.items():
        assert client.pread(BLOCK, offset) == data
    deadline = time.monotonic() + 5
    while "recording stopped" not in server.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stderr.count("recording stopped") == 1, server.stderr
    assert server.report_records() == []
    images.corrupt_test(CORRUPT_OFFSET)  # still verified past the cap
    with pytest.raises(nbd.Error, match="Input/output error"):
        client.pread(BLOCK, CORRUPT_OFFSET - CORRUPT_OFFSET % BLOCK)
    assert [r["kind"] for r in server.report_records()] == ["mismatch"]
    server.stop()
    assert journal.stat().st_size <= 64 * 1024
    rows = lines(nbdverify("journal", "show", str(journal)).stdout)
    assert "recording stopped before sequence" in rows[-1]
    assert "cap of 65536 bytes" in rows[-1]


def test_journal_options_that_cannot_work_are_one_line_errors(images: ImagePair,
                                                              tmp_path: Path) -> None:
    pair = [str(images.raw), str(images.test), "-U", str(tmp_path / "s.sock")]
    unwritable = nbdverify("serve", *pair, "--journal", str(tmp_path / "no" / "j"))
    assert unwritable.returncode == 1
    assert unwritable.stderr == (f"nbdverify: cannot write journal {tmp_path / 'no' / 'j'}: "
                                 "No such file or directory\n")
    alone = nbdverify("serve", *pair, "--journal-max-size", "1G")
    assert alone.returncode == 2
    assert alone.stderr == "nbdverify: error: --journal-max-size needs --journal FILE\n"
    not_journal = nbdverify("journal", "show", str(images.raw))
    assert not_journal.returncode == 2 and "not an nbdverify journal" in not_journal.stderr
