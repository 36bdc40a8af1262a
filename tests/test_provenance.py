"""From a corrupt read to the guilty write, through a real `nbdverify serve`.

The TEST that misbehaves is real: an nbdkit python plugin (buggy_plugin.py) that
drops, misdirects, tears, zeroes or bit-flips chosen writes, or a TEST file
altered behind the server's back. Clients are qemu-io and libnbd.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

import nbd
from children_support import TOOL_TIMEOUT, Rig, wait_until
from peers_support import make_sparse_pair
from support import (
    ImagePair,
    LibnbdClient,
    RunningServer,
    make_pair,
    require_tool,
    run,
    start_server,
)

PLUGIN = Path(__file__).parent / "buggy_plugin.py"
MiB = 1 << 20
AT = 1 * MiB
WAIT = 10.0
#: 64 KiB writes and reads the client makes while SIGUSR1 arrives, in three
#: bursts with a pause of PAUSE_MS between them.
WORKLOAD = 600
PAUSE_MS = 1000


def qemu_io(uri: str, *commands: str) -> None:
    """qemu-io with a write-back cache: its writes carry no FUA, as a guest's."""
    arguments = [part for command in commands for part in ("-c", command)]
    run([require_tool("qemu-io"), "-f", "raw", "-t", "writeback", *arguments, uri],
        timeout=TOOL_TIMEOUT)


def serve_buggy(rig: Rig, tmp_path: Path, faults: str, *extra: str,
                shift: int = 0) -> RunningServer:
    """RAW a file; TEST the same content behind the buggy plugin."""
    images = make_pair(tmp_path)
    helper = rig.nbdkit("buggy", "python", str(PLUGIN), f"file={images.test}",
                        f"faults={faults}", f"shift={shift}")
    return rig.serve([str(images.raw), helper.uri], images, "--fingerprints",
                     "--on-mismatch=log", *extra)


def only_finding(server: RunningServer) -> dict[str, Any]:
    assert wait_until(lambda: bool(server.report_records()), WAIT), server.stderr
    records = server.report_records()
    assert len(records) == 1, records
    return records[0]


def write_at(client: LibnbdClient, offset: int, data: bytes, flags: int = 0) -> int:
    """A libnbd write; its cookie."""
    cookie: int = client.handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset,
                                           flags=flags)
    client.complete(cookie)
    return cookie


def test_a_write_that_never_reached_test_is_stale_and_named_flushed(tmp_path: Path) -> None:
    with Rig(tmp_path) as rig:
        server = serve_buggy(rig, tmp_path, "1:drop")
        qemu_io(server.uri, f"write -P 0xab {AT} 4096", "flush", f"read {AT} 4096")
        [piece] = only_finding(server)["ranges"]
        assert (piece["start"], piece["end"], piece["class"]) == (AT, AT + 4096, "stale")
        last = piece["last_write"]
        assert {key: last[key] for key in ("sequence", "operation", "offset", "length",
                                           "flags", "flushed")} == {
            "sequence": 1, "operation": "write", "offset": AT, "length": 4096, "flags": [],
            "flushed": True}
        assert last["connection"] == 1 and isinstance(last["cookie"], int)
        assert (f"(sector {AT // 512}): stale, TEST still holds what was there before write #1 "
                f"(conn 1, 4096 bytes at {AT}, flushed)") in server.stderr


def test_a_write_at_the_wrong_offset_is_misdirected_naming_both_offsets(
        tmp_path: Path) -> None:
    with Rig(tmp_path) as rig:
        server = serve_buggy(rig, tmp_path, "1:misdirect", shift=65536)
        qemu_io(server.uri, f"write -P 0xcd {AT} 4096", f"read {AT} {128 * 1024}")
        target, landed = only_finding(server)["ranges"]
        # Where it should have gone, TEST still holds the old content...
        assert (target["start"], target["class"]) == (AT, "stale")
        assert target["last_write"]["sequence"] == 1
        assert target["last_write"]["flushed"] is False
        # ...and where it landed, TEST holds its data, never written there.
        assert (landed["start"], landed["end"]) == (AT + 65536, AT + 65536 + 4096)
        assert landed["class"] == "misdirected" and landed["last_write"] is None
        assert landed["misdirected_from"] == AT
        assert landed["misdirected_write"]["sequence"] == 1
        assert landed["misdirected_write"]["offset"] == AT


def test_a_half_applied_write_is_torn(tmp_path: Path) -> None:
    with Rig(tmp_path) as rig:
        server = serve_buggy(rig, tmp_path, "1:tear")
        qemu_io(server.uri, f"write -P 0xef {AT} 8192", f"read {AT} 8192")
        [piece] = only_finding(server)["ranges"]
        assert (piece["start"], piece["end"], piece["class"]) == (AT + 4096, AT + 8192, "torn")
        assert piece["last_write"]["length"] == 8192
        assert "torn, TEST holds part of write #1" in server.stderr


def test_several_corrupt_ranges_in_one_read_each_with_class_and_writer(
        tmp_path: Path) -> None:
    with Rig(tmp_path) as rig:
        server = serve_buggy(rig, tmp_path, "1:drop,2:flip,3:zero")
        client = LibnbdClient(server.uri)
        cookies = [write_at(client, AT + n * 16384, os.urandom(4096)) for n in range(3)]
        client.pread(65536, AT)
        ranges = only_finding(server)["ranges"]
        assert [(r["start"], r["class"]) for r in ranges] == [
            (AT, "stale"), (AT + 16384 + 2048, "bitflip"), (AT + 32768, "zeroed")]
        assert [r["last_write"]["sequence"] for r in ranges] == [1, 2, 3]
        assert [r["last_write"]["cookie"] for r in ranges] == cookies
        assert ranges[1]["bits"] == 1  # the plugin flipped one bit mid-write: one sector
        assert ranges[1]["end"] - ranges[1]["start"] == 512
        client.handle.shutdown()


def test_provenance_across_connections_fua_flush_trim_and_write_zeroes(
        tmp_path: Path) -> None:
    images = make_pair(tmp_path)
    with Rig(tmp_path) as rig:
        server = rig.serve_pair(images, "--on-mismatch=log")
        first, second = LibnbdClient(server.uri), LibnbdClient(server.uri)
        block = [AT + n * 65536 for n in range(5)]
        early = write_at(first, block[0], os.urandom(4096))
        first.complete(first.handle.aio_flush())
        fua = write_at(second, block[1], os.urandom(4096), flags=nbd.CMD_FLAG_FUA)
        late = write_at(first, block[2], os.urandom(4096))
        second.complete(second.handle.aio_zero(4096, block[3]))
        write_at(second, block[4], os.urandom(8192))
        second.complete(second.handle.aio_trim(4096, block[4]))  # its first half
        for offset in (*block[:4], block[4] + 4096 + 100):
            images.corrupt_test(offset + 100)
        images.corrupt_test(block[4] + 100)  # trimmed: unverified, never a finding
        first.pread(5 * 65536, AT)
        ranges = only_finding(server)["ranges"]
        assert [r["start"] for r in ranges] == [*block[:4], block[4] + 4096]
        writers = [r["last_write"] for r in ranges]
        assert [w["operation"] for w in writers] == ["write"] * 3 + ["write_zeroes", "write"]
        assert [w["flushed"] for w in writers] == [True, True, False, False, False]
        assert writers[1]["flags"] == ["fua"]
        one, two = writers[0]["connection"], writers[1]["connection"]
        assert one != two
        assert [w["connection"] for w in writers] == [one, two, one, two, two]
        assert [w["cookie"] for w in writers[:3]] == [early, fua, late]
        assert writers[4]["length"] == 8192 and writers[4]["offset"] == block[4]
        first.handle.shutdown()
        second.handle.shutdown()


def test_restored_behind_the_servers_back_is_stale_without_a_buggy_child(
        tmp_path: Path, images: ImagePair) -> None:
    with Rig(tmp_path) as rig:
        server = rig.serve_pair(images, "--fingerprints", "--on-mismatch=log")
        before = images.test_bytes()[AT:AT + 4096]
        qemu_io(server.uri, f"write -P 0x5c {AT} 4096", "flush")
        with images.test.open("r+b") as test:
            test.seek(AT)
            test.write(before)
        qemu_io(server.uri, f"read {AT} 4096")
        [piece] = only_finding(server)["ranges"]
        assert piece["class"] == "stale" and piece["last_write"]["flushed"] is True


def test_dump_dir_holds_both_childrens_bytes_and_the_cap_is_logged_once(
        tmp_path: Path, images: ImagePair) -> None:
    dumps = tmp_path / "dumps"
    for n in range(3):
        images.corrupt_test(AT + n * 65536 + 7)
    raw, test = images.raw_bytes(), images.test_bytes()
    server = start_server(tmp_path, images, "--on-mismatch=log", "--dump-dir", str(dumps),
                          "--dump-max-findings", "2")
    try:
        client = LibnbdClient(server.uri)
        for n in range(3):
            client.pread(4096, AT + n * 65536)
        assert wait_until(lambda: len(server.report_records()) == 3, WAIT), server.stderr
        folders = sorted(dumps.iterdir())
        assert [f.name for f in folders] == ["finding-0001", "finding-0002"]
        for n, folder in enumerate(folders):
            start = AT + n * 65536
            assert sorted(p.name for p in folder.iterdir()) == [
                "finding.json", f"raw-{start}.bin", f"test-{start}.bin"]
            assert (folder / f"raw-{start}.bin").read_bytes() == raw[start:start + 512]
            assert (folder / f"test-{start}.bin").read_bytes() == test[start:start + 512]
            assert f'"start": {start}' in (folder / "finding.json").read_text()
        assert server.stderr.count("dump directory cap reached") == 1
        client.handle.shutdown()
    finally:
        server.stop()


def has_statistics(server: RunningServer, count: int) -> bool:
    return len(server.statistics_records()) >= count


def test_sigusr1_reports_statistics_while_a_client_runs(tmp_path: Path,
                                                         images: ImagePair) -> None:
    server = start_server(tmp_path, images)
    try:
        # A client writes and reads in three bursts with a pause between them, so
        # it is surely still connected and busy when each signal arrives.
        burst = [part for n in range(WORKLOAD // 3) for part in
                 ("-c", f"write -P {n % 256} {n % 64 * 65536} 65536",
                  "-c", f"read {n % 64 * 65536} 65536")]
        pause = ["-c", f"sleep {PAUSE_MS}"]
        client = subprocess.Popen([require_tool("qemu-io"), "-f", "raw", "-t", "writeback",
                                   *burst, *pause, *burst, *pause, *burst, server.uri],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for signalled in (1, 2):
                time.sleep(PAUSE_MS / 2000)  # the last burst is a whole pause later
                assert client.poll() is None, "the client finished before the signal"
                server.process.send_signal(signal.SIGUSR1)
                assert wait_until(partial(has_statistics, server, signalled), WAIT)
            assert client.wait(timeout=60) == 0, client.stderr
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=10)
        assert server.stop() == 0
    finally:
        server.stop()
    records = server.statistics_records()
    assert len(records) == 3  # two signals, then the exit
    writes = [r["operations"]["write"]["count"] for r in records]  # type: ignore[index]
    assert writes[0] <= writes[1] < writes[2] == WORKLOAD
    final: Any = records[2]
    assert final["operations"]["write"]["bytes"] == WORKLOAD * 65536
    assert final["bytes_verified"] == WORKLOAD * 65536 and final["findings"] == 0
    for role in ("raw", "test"):
        latency = final["operations"]["write"]["latency"][role]
        assert 0 < latency["p50_ns"] <= latency["p99_ns"] <= latency["max_ns"]
    lines = [line for line in server.stderr.splitlines() if "statistics: " in line]
    assert len(lines) == 3
    size = f"{WORKLOAD * 65536 / (1 << 20):.1f} MiB"
    assert re.search(rf"write {WORKLOAD} {size} \(raw p50 \S+ p99 \S+ max \S+ test p50", lines[-1])


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) * 1024


def test_provenance_memory_stays_small_on_a_sparse_16_gib_export(tmp_path: Path) -> None:
    """End to end, smaller than the unit test's million writes: 20000 random 4 KiB
    writes (with fingerprints) grow the server by well under the budget's share."""
    images = make_sparse_pair(tmp_path / "images", 16 << 30)
    server = start_server(tmp_path, images, "--fingerprints")
    try:
        client = LibnbdClient(server.uri)
        write_at(client, 0, bytes(4096))
        before = rss_bytes(server.process.pid)
        rng = random.Random(8)
        data = nbd.Buffer.from_bytearray(bytearray(os.urandom(4096)))
        pending: list[int] = []
        for _ in range(20000):
            pending.append(client.handle.aio_pwrite(data, rng.randrange(4 << 20) * 4096))
            if len(pending) >= 64:
                client.complete(pending.pop(0))
        for cookie in pending:
            client.complete(cookie)
        grown = rss_bytes(server.process.pid) - before
        server.process.send_signal(signal.SIGUSR1)
        assert wait_until(lambda: bool(server.statistics_records()), WAIT)
        record: Any = server.statistics_records()[0]
        assert record["operations"]["write"]["count"] == 20001
        # 20000 of a million writes; the fingerprint ring (8 MiB) is allocated up front.
        assert grown < 8 << 20, grown
        assert record["provenance_bytes"] < 16 << 20
        client.handle.shutdown()
    finally:
        server.stop()
