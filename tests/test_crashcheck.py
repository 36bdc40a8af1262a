"""`nbdverify crashcheck` after a real crash: TEST is a qcow2 whose qemu-nbd (started
by nbdverify serve) is killed with SIGKILL after writes, a FLUSH and more writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from support import (
    STOP_TIMEOUT,
    ImagePair,
    LibnbdClient,
    nbdverify,
    require_tool,
    run,
    start_server,
)

BLOCK = 4096
#: Written before the FLUSH (durable), and after it (may be lost).
FLUSHED = (0, 64 * 1024, 1 << 20)
UNFLUSHED = (2 << 20, 64 * 1024)


def qemu_nbd_of(pid: int) -> int:
    """The qemu-nbd the server started for its qcow2 child."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        if Path(f"/proc/{child}/comm").read_text().strip() == "qemu-nbd":
            return int(child)
    raise AssertionError(f"no qemu-nbd among the children of {pid}: {children}")


def wait_dead(pid: int) -> None:
    """Until `pid` is a zombie (the server has not reaped it yet) or gone."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} outlived SIGKILL")


def crash(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Record writes, a flush and more writes, then SIGKILL TEST's qemu-nbd.
    Returns (journal, base, crashed qcow2)."""
    require_tool("qemu-img")
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(8 * 1024 * 1024))
    raw = tmp_path / "raw.img"
    shutil.copyfile(base, raw)
    qcow2 = tmp_path / "test.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), str(qcow2)])
    journal = tmp_path / "crash.journal"
    server = start_server(tmp_path, ImagePair(raw, qcow2), "--journal", str(journal))
    try:
        client = LibnbdClient(server.uri)
        for offset in FLUSHED:
            client.pwrite(os.urandom(BLOCK), offset)
        client.flush()
        for offset in UNFLUSHED:
            client.pwrite(os.urandom(BLOCK), offset)
        victim = qemu_nbd_of(server.process.pid)
        os.kill(victim, signal.SIGKILL)
        wait_dead(victim)
        client.handle.shutdown()
    finally:
        server.stop()
    return journal, base, qcow2


def crashcheck(journal: Path, image: Path, base: Path) -> tuple[int, str, str]:
    result = nbdverify("crashcheck", str(journal), str(image), "--base", str(base))
    return result.returncode, result.stdout, result.stderr


def put(image: Path, offset: int, data: bytes, directory: Path) -> None:
    source = directory / "put.bin"
    source.write_bytes(data)
    run(["qemu-io", "-f", "qcow2", str(image), "-c",
         f"write -s {source} {offset} {len(data)}"])


def test_crashcheck_finds_no_violation_then_a_lost_write_then_garbage(tmp_path: Path) -> None:
    journal, base, crashed = crash(tmp_path)
    shown = nbdverify("journal", "show", str(journal)).stdout
    assert "TEST-FAILED" in shown  # the server's flush after the kill failed on TEST
    status, out, err = crashcheck(journal, crashed, base)
    assert status == 0, out + err
    assert "no violations" in out
    assert nbdverify("crashcheck", str(journal), str(crashed)).returncode == 0  # RAW as base

    lost = tmp_path / "lost.qcow2"
    shutil.copyfile(crashed, lost)
    old = base.read_bytes()[FLUSHED[1]:FLUSHED[1] + 512]
    put(lost, FLUSHED[1], old, tmp_path)  # one flushed sector back to its old content
    status, out, err = crashcheck(journal, lost, base)
    assert status == 1, out + err
    sector = FLUSHED[1] // 512
    assert out.splitlines() == [
        f"lost-write: sector {sector} (offset {FLUSHED[1]}, 512 bytes): holds the starting "
        "content; durable write 2 is lost",
        "1 violation: 7 records, 32 sectors written, checked against " + str(base)]

    garbage = tmp_path / "garbage.qcow2"
    shutil.copyfile(crashed, garbage)
    put(garbage, FLUSHED[2] + 1024, os.urandom(512), tmp_path)
    result = nbdverify("crashcheck", str(journal), str(garbage), "--base", str(base), "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert [(v["kind"], v["first_sector"]) for v in report["violations"]] == [
        ("garbage", (FLUSHED[2] + 1024) // 512)]

    changed = tmp_path / "changed.qcow2"
    shutil.copyfile(crashed, changed)
    put(changed, 4 << 20, os.urandom(512), tmp_path)  # a sector nothing wrote
    status, out, _ = crashcheck(journal, changed, base)
    assert status == 1 and out.startswith(f"changed: sector {(4 << 20) // 512} ")


def test_crashcheck_errors_are_one_line_and_status_2(tmp_path: Path) -> None:
    missing = nbdverify("crashcheck", str(tmp_path / "none.journal"), str(tmp_path / "x.img"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "cannot open journal" in missing.stderr
    (tmp_path / "not.journal").write_bytes(b"hello")
    bad = nbdverify("crashcheck", str(tmp_path / "not.journal"), str(tmp_path / "x.img"))
    assert bad.returncode == 2 and "not an nbdverify journal" in bad.stderr
