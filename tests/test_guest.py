"""Real guests on nbdverify: a Debian kernel in QEMU (TCG) installs an ext4 system
through the verified device, boots it, and runs the kernel's own nbd-client.

The guest (kernel + initramfs) comes from scripts/guest-build, cached under
.cache/guest/. Each guest prints `GUEST-...` markers on its serial console and
powers off; `GUEST-RESULT: ok` or `GUEST-RESULT: fail <reason>` is the verdict.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers_support import BOOKWORM, Peer
from support import NBDVERIFY, ImagePair, RunningServer, require_tool, run, start_server

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parent.parent
GUEST_BUILD = ROOT / "scripts" / "guest-build"
BUILD_TIMEOUT = 1200.0   # the first build downloads ~45 MB of packages
BOOT_TIMEOUT = 110.0     # one guest run, boot to poweroff
DISK_SIZE = 128 * 1024 * 1024
NBD_DISK_SIZE = 64 * 1024 * 1024
PARTITION_OFFSET = 2048 * 512   # the install task's single partition starts at sector 2048
VICTIM = "/data/victim.bin"
# Sectors of VICTIM altered in TEST by the corruption tests, as indexes into the file.
VICTIM_SECTORS = (3, 700, 1500)
# Where the nbd-client corruption test alters TEST (the same byte the other
# corruption tests use: sector 2049).
NBD_CORRUPT_OFFSET = 1049576


@dataclass
class GuestRun:
    log: str
    seconds: float

    @property
    def markers(self) -> list[str]:
        return [line.strip() for line in self.log.splitlines() if line.startswith("GUEST-")]

    @property
    def result(self) -> str:
        results = [m for m in self.markers if m.startswith("GUEST-RESULT:")]
        return results[-1].split(":", 1)[1].strip() if results else "(no GUEST-RESULT marker)"

    def assert_ok(self) -> None:
        assert self.result == "ok", f"guest failed: {self.result}\n{self.log}"


# How often the boot test asks the server for statistics (SIGUSR1).
STATISTICS_EVERY = 1.0


def ask_for_statistics(server: RunningServer, done: threading.Event) -> None:
    while not done.wait(STATISTICS_EVERY):
        server.process.send_signal(signal.SIGUSR1)


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """Build the guest once (cached by scripts/guest-build across runs)."""
    require_tool("qemu-system-x86_64")
    result = run(["/usr/bin/python3", str(GUEST_BUILD), "--quiet"], timeout=BUILD_TIMEOUT)
    image = Path(result.stdout.strip().splitlines()[-1])
    assert (image / "vmlinuz").exists() and (image / "initrd.img").exists()
    return image


def boot(image: Path, directory: Path, task: str, *, disk: Path | None = None,
         nbd_port: int | None = None, append: str = "", peer: Peer = BOOKWORM) -> GuestRun:
    """Run the guest once, under `peer`'s QEMU: its disk is the nbdverify unix socket
    `disk`, its network (restrict=on) reaches only the server's loopback port
    `nbd_port`, forwarded to 10.0.2.100:10809. Returns when the guest powers off."""
    log = directory / f"guest-{task}-{time.monotonic_ns()}.log"
    cmdline = (image / "cmdline").read_text().strip()
    command = [*peer.tool("qemu-system-x86_64"), "-accel", "tcg", "-m", "512",
               "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{log}",
               "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
               "-append", f"{cmdline} nbdverify.task={task} {append}".strip()]
    if disk is not None:
        command += ["-drive", f"file=nbd:unix:{disk},format=raw,if=virtio,cache=none"]
    if nbd_port is not None:
        # guestfwd to a tcp chardev: QEMU connects once, at startup, and the guest's
        # single nbd-client connection to 10.0.2.100:10809 is spliced onto it.
        command += ["-netdev", "user,id=n0,restrict=on,"
                    f"guestfwd=tcp:10.0.2.100:10809-tcp:127.0.0.1:{nbd_port}",
                    "-device", "virtio-net-pci,netdev=n0"]
    started = time.monotonic()
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=BOOT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        text = log.read_text(errors="replace") if log.exists() else ""
        pytest.fail(f"guest task {task} did not power off within {BOOT_TIMEOUT} s:\n{text}")
    text = log.read_text(errors="replace").replace("\r", "") if log.exists() else ""
    if result.returncode != 0:
        pytest.fail(f"qemu exited {result.returncode}: {result.stderr}\n{text}")
    return GuestRun(text, time.monotonic() - started)


def blank_pair(directory: Path, size: int) -> ImagePair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = ImagePair(directory / "raw.img", directory / "test.img")
    for path in (pair.raw, pair.test):
        with path.open("wb") as f:
            f.truncate(size)
    return pair


def copy_pair(source: Path, directory: Path) -> ImagePair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = ImagePair(directory / "raw.img", directory / "test.img")
    shutil.copyfile(source, pair.raw)
    shutil.copyfile(source, pair.test)
    return pair


def identical(pair: ImagePair) -> bool:
    return filecmp.cmp(pair.raw, pair.test, shallow=False)


@contextmanager
def served(directory: Path, pair: ImagePair, *extra: str, tcp: bool = False
           ) -> Iterator[RunningServer]:
    server = start_server(directory, pair, *extra, tcp=tcp)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Installed:
    image: Path        # RAW after the install (the pristine installed disk)
    install: GuestRun


@pytest.fixture(scope="module")
def installed(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Install the guest system onto a blank pair through nbdverify, once."""
    directory = tmp_path_factory.mktemp("install")
    pair = blank_pair(directory, DISK_SIZE)
    with served(directory, pair) as server:
        install = boot(guest_image, directory, "install", disk=server.socket)
        install.assert_ok()
        assert server.report_records() == [], server.stderr
    assert identical(pair), "RAW and TEST differ after the install"
    return Installed(pair.raw, install)


def victim_sectors(raw: Path) -> tuple[int, list[int]]:
    """(block size, absolute 512-byte sector of each block of VICTIM) in `raw`."""
    device = f"{raw}?offset={PARTITION_OFFSET}"
    debugfs = require_tool("debugfs")
    stats = run([debugfs, "-R", "stats", device], timeout=30).stdout
    block_size = int(re.search(r"Block size:\s+(\d+)", stats).group(1))  # type: ignore[union-attr]
    blocks = [int(b) for b in run([debugfs, "-R", f"blocks {VICTIM}", device],
                                  timeout=30).stdout.split()]
    per_block = block_size // 512
    assert len(blocks) * block_size == 1 << 20, blocks
    sectors = [(PARTITION_OFFSET + block * block_size) // 512 + i
               for block in blocks for i in range(per_block)]
    return block_size, sectors


def corrupt_victim(pair: ImagePair) -> list[int]:
    """Alter one byte in each of three separate sectors of VICTIM, in TEST only."""
    _, sectors = victim_sectors(pair.raw)
    altered = [sectors[i] for i in VICTIM_SECTORS]
    for sector in altered:
        pair.corrupt_test(sector * 512 + 100)
    assert not identical(pair)
    return altered


def reported_sectors(records: list[dict[str, object]]) -> set[int]:
    sectors: set[int] = set()
    for record in records:
        assert record["kind"] == "mismatch", record
        for start, end in record["differing_ranges"]:  # type: ignore[attr-defined]
            sectors.update(range(start // 512, (end + 511) // 512))
    return sectors


def test_install_then_boot_through_nbdverify(guest_image: Path, installed: Installed,
                                              tmp_path: Path) -> None:
    assert any(m.startswith("GUEST-INSTALL:") for m in installed.install.markers)
    pair = copy_pair(installed.image, tmp_path)
    with served(tmp_path, pair) as server:
        # Statistics on demand (SIGUSR1) every second while the guest runs.
        booting = threading.Event()
        asking = threading.Thread(target=ask_for_statistics, args=(server, booting))
        asking.start()
        try:
            booted = boot(guest_image, tmp_path, "boot", disk=server.socket,
                          append="root=/dev/vda1")
        finally:
            booting.set()
            asking.join()
        booted.assert_ok()
        assert "GUEST-FSCK: status 0" in booted.markers, booted.log
        assert re.search(r"GUEST-VERIFY: ok=\d+ ioerror=0 badsum=0", booted.log), booted.log
        assert server.report_records() == []
        during = server.statistics_records()
        assert len(during) >= 2, server.stderr  # the boot takes 5-25 s
        reads = [record["operations"]["read"]["count"] for record in during]  # type: ignore[index]
        assert reads == sorted(reads) and reads[-1] > reads[0], reads  # the guest was reading
        assert server.stderr.count("nbdverify: statistics: read ") == len(during)
    assert identical(pair)


def test_corruption_reaches_the_guest_as_an_io_error(guest_image: Path, installed: Installed,
                                                     tmp_path: Path) -> None:
    pair = copy_pair(installed.image, tmp_path)
    altered = corrupt_victim(pair)
    with served(tmp_path, pair, "--on-mismatch=error") as server:
        booted = boot(guest_image, tmp_path, "boot", disk=server.socket, append="root=/dev/vda1")
        records = server.report_records()
    assert booted.result.startswith("fail verify"), booted.log
    assert any(m.startswith(f"GUEST-IOERROR: {VICTIM}") for m in booted.markers), booted.log
    assert not any(m.startswith("GUEST-BADSUM") for m in booted.markers), booted.log
    assert records, "no report records"
    assert {r["sector"] for r in records} <= set(altered), records
    assert altered[0] in {r["sector"] for r in records}, records
    assert reported_sectors(records) <= set(altered), records
    assert f"(sector {altered[0]})" in server.stderr


def test_corruption_logged_and_guest_gets_raw(guest_image: Path, installed: Installed,
                                              tmp_path: Path) -> None:
    pair = copy_pair(installed.image, tmp_path)
    altered = corrupt_victim(pair)
    with served(tmp_path, pair, "--on-mismatch=log") as server:
        booted = boot(guest_image, tmp_path, "boot", disk=server.socket, append="root=/dev/vda1")
        records = server.report_records()
    booted.assert_ok()
    assert reported_sectors(records) == set(altered), (records, altered)


def test_install_and_boot_under_qemu_10(guest_image: Path, trixie: Peer,
                                        tmp_path: Path) -> None:
    """The same install and boot, under trixie's QEMU 10 system emulator (once: the
    guest's disk is QEMU's NBD client, so this covers its block layer end to end)."""
    image = tmp_path / "guest"  # the trixie root sees the host's /tmp, not .cache/
    shutil.copytree(guest_image, image)
    pair = blank_pair(tmp_path / "disk", DISK_SIZE)
    with served(tmp_path, pair) as server:
        install = boot(image, tmp_path, "install", disk=server.socket, peer=trixie)
        install.assert_ok()
        assert any(m.startswith("GUEST-INSTALL:") for m in install.markers), install.log
        booted = boot(image, tmp_path, "boot", disk=server.socket, append="root=/dev/vda1",
                      peer=trixie)
        booted.assert_ok()
        assert "GUEST-FSCK: status 0" in booted.markers, booted.log
        assert re.search(r"GUEST-VERIFY: ok=\d+ ioerror=0 badsum=0", booted.log), booted.log
        assert server.report_records() == [], server.stderr
    assert identical(pair), "RAW and TEST differ after install and boot under QEMU 10"


def test_nbd_client_in_the_guest(guest_image: Path, tmp_path: Path) -> None:
    pair = blank_pair(tmp_path, NBD_DISK_SIZE)
    with served(tmp_path, pair, tcp=True) as server:
        port = int(re.search(r":(\d+)/?$", server.uri).group(1))  # type: ignore[union-attr]
        guest = boot(guest_image, tmp_path, "nbdclient", nbd_port=port)
        guest.assert_ok()
        assert "GUEST-NBD: disconnected" in guest.markers
        assert server.report_records() == []
    assert identical(pair)
    assert pair.raw.read_bytes() != bytes(NBD_DISK_SIZE)


def test_nbd_client_corrupt_read_is_an_io_error(guest_image: Path, tmp_path: Path) -> None:
    pair = blank_pair(tmp_path, NBD_DISK_SIZE)
    pair.corrupt_test(NBD_CORRUPT_OFFSET)
    with served(tmp_path, pair, tcp=True) as server:
        port = int(re.search(r":(\d+)/?$", server.uri).group(1))  # type: ignore[union-attr]
        guest = boot(guest_image, tmp_path, "nbdclient-read", nbd_port=port,
                     append=f"nbdverify.offset={NBD_CORRUPT_OFFSET}")
        records = server.report_records()
    guest.assert_ok()
    assert f"GUEST-IOERROR: /dev/nbd0 offset {NBD_CORRUPT_OFFSET}" in guest.markers
    assert [r["sector"] for r in records] == [NBD_CORRUPT_OFFSET // 512], records
    assert "Input/output error" in guest.log


def test_a_recorded_install_replays_to_raw_and_to_its_middle(guest_image: Path,
                                                             tmp_path: Path) -> None:
    """Install, then boot, on one server with --journal; RAW is copied between the two
    guest runs (the workload stopped), so that point has a known image to replay to."""
    pair = blank_pair(tmp_path / "run", DISK_SIZE)
    journal = tmp_path / "install.journal"
    middle = tmp_path / "middle.img"
    with served(tmp_path, pair, "--journal", str(journal)) as server:
        boot(guest_image, tmp_path, "install", disk=server.socket).assert_ok()
        copied_at = time.time()
        shutil.copyfile(pair.raw, middle)
        boot(guest_image, tmp_path, "boot", disk=server.socket,
             append="root=/dev/vda1").assert_ok()
        assert server.report_records() == [], server.stderr
    records = [json.loads(line) for line in
               run([NBDVERIFY, "journal", "show", str(journal), "--json"]).stdout.splitlines()]
    before = [r["sequence"] for r in records if r["wall_time"] < copied_at]
    assert before and len(before) < len(records)  # both runs changed the disk
    assert {r["kind"] for r in records} >= {"write", "flush"}
    for until, expected in (([], pair.raw), (["--until", str(before[-1])], middle)):
        replayed = tmp_path / "replayed.img"
        blank_pair(tmp_path / "blank", DISK_SIZE)
        shutil.copyfile(tmp_path / "blank" / "raw.img", replayed)
        run([NBDVERIFY, "replay", str(journal), "--onto", str(replayed), *until], timeout=300)
        assert filecmp.cmp(replayed, expected, shallow=False), until
