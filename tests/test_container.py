"""The container as users run it: the Dockerfile built by a real Docker engine, then
run with the images' directory as its volume and no network at all, serving a unix
socket in that volume to qemu-io and qemu-img on the host.

scripts/setup starts the engine; scripts/docker-base makes the base image (built
from Debian packages where no registry answers). The image is built once per
module and run as its own non-root uid (as the user running the tests, if that is
not root). Every container is removed afterwards, passed or failed. No engine is a
failure, never a skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import CORRUPT_OFFSET, ImagePair, make_pair, require_tool, run

ROOT = Path(__file__).resolve().parent.parent
# Per checkout: a build in another worktree never retags (and prunes) this one's.
TAG = "nbdverify-suite:" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
LABEL = "org.nbdverify.suite"
BASE_TIMEOUT = 900.0  # mmdebstrap and docker import: ~25 s here; a cached base: ~0.1 s
BUILD_TIMEOUT = 900.0  # apt and pip inside the build: 21-45 s here; unchanged sources: ~2 s
DOCKER_TIMEOUT = 60.0
START_TIMEOUT = 60.0
QEMU_TIMEOUT = 30.0
# docker stop -t (--time in Debian's client, --timeout in newer ones; -t in both):
# SIGTERM, then SIGKILL after this many seconds.
STOP_GRACE = 10
VOLUME = "/images"
SECTOR = 512
IMAGE_SIZE = 4 * 1024 * 1024
MIB = 1 << 20


def docker(*arguments: str, timeout: float = DOCKER_TIMEOUT,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([require_tool("docker"), *arguments], timeout=timeout, check=check)


@pytest.fixture(scope="module")
def engine() -> None:
    """A Docker engine that answers (scripts/setup starts one)."""
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    if info.returncode != 0:
        pytest.fail(f"no Docker engine answers (scripts/setup starts one): {info.stderr.strip()}")


@pytest.fixture(scope="module")
def image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's image, built from this checkout; its ID, so that containers run
    exactly this build."""
    run([str(ROOT / "scripts" / "docker-base")], timeout=BASE_TIMEOUT)
    iidfile = tmp_path_factory.mktemp("build") / "iid"
    # --network host: the build's apt and pip reach the registries as the host does.
    docker("build", "--network", "host", "--label", f"{LABEL}={ROOT}", "--iidfile", str(iidfile),
           "-t", TAG, str(ROOT), timeout=BUILD_TIMEOUT)
    # The builds this one replaced (dangling now) would otherwise pile up, ~200 MB each.
    docker("image", "prune", "--force", "--filter", f"label={LABEL}={ROOT}", check=False)
    return iidfile.read_text().strip()


def container_user() -> list[str]:
    """Root on the host runs the image as its own uid 10809. Anyone else runs it as
    themselves: the socket the server creates is mode 0755 (umask 022), and only its
    owner (or root) may connect to it."""
    if os.geteuid() == 0:
        return []
    return ["--user", f"{os.geteuid()}:{os.getegid()}"]


def volume(directory: Path) -> Path:
    """The images' directory, writable for the container's uid (it creates the socket
    and the report there)."""
    directory.mkdir()
    directory.chmod(0o777)
    return directory


def writable(*paths: Path) -> None:
    for path in paths:
        path.chmod(0o666)


def inside(path: Path) -> str:
    """Where a file of the volume appears in the container."""
    return f"{VOLUME}/{path.name}"


@dataclass
class Container:
    name: str
    host_volume: Path

    @property
    def socket(self) -> Path:
        return self.host_volume / "nbd.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def logs(self) -> str:
        result = docker("logs", self.name)
        return result.stdout + result.stderr

    def state(self) -> dict[str, object]:
        state: dict[str, object] = json.loads(
            docker("inspect", "--format", "{{json .State}}", self.name).stdout)
        return state

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while "serving nbd+unix://" not in self.logs():
            if not self.state()["Running"] or time.monotonic() > deadline:
                pytest.fail(f"the container did not start serving: {self.logs()}")
            time.sleep(0.1)


class ContainerRunner:
    """Runs containers of one image with the volume and no network, and removes every
    one it ran, however the test ended."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.names: list[str] = []

    def arguments(self, host_volume: Path, *command: str,
                  options: Sequence[str] = ()) -> list[str]:
        name = f"nbdverify-test-{uuid.uuid4().hex[:12]}"
        self.names.append(name)
        return ["--name", name, "--network", "none", "--label", LABEL, *container_user(),
                "-v", f"{host_volume}:{VOLUME}", *options, self.image, *command]

    def serve(self, host_volume: Path, *command: str, options: Sequence[str] = ()) -> Container:
        """Start `nbdverify serve ... -U /images/nbd.sock` detached (`options` for
        docker run), and wait for it."""
        arguments = self.arguments(host_volume, "serve", *command, "-U", f"{VOLUME}/nbd.sock",
                                   options=options)
        docker("run", "--detach", *arguments)
        container = Container(self.names[-1], host_volume)
        container.wait_until_serving()
        return container

    def run_to_exit(self, host_volume: Path, *command: str) -> subprocess.CompletedProcess[str]:
        """Run it in the foreground, to its exit status."""
        return docker("run", *self.arguments(host_volume, *command), check=False)

    def remove_all(self) -> None:
        if self.names:
            docker("rm", "--force", "--volumes", *self.names, check=False)


@contextlib.contextmanager
def container_runner(image: str) -> Iterator[ContainerRunner]:
    runner = ContainerRunner(image)
    try:
        yield runner
    finally:
        runner.remove_all()


@pytest.fixture
def containers(image: str) -> Iterator[ContainerRunner]:
    with container_runner(image) as runner:
        yield runner


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    words = [word for command in commands for word in ("-c", command)]
    return run([require_tool("qemu-io"), "-f", "raw", *words, uri],
               timeout=QEMU_TIMEOUT, check=False)


@dataclass
class ServedAndStopped:
    """A raw + qcow2 pair served by one container: qemu-io wrote 1 MiB of 0xab at
    1 MiB and read it back, then `docker stop` ended the container."""

    images: ImagePair
    qemu_io: subprocess.CompletedProcess[str]
    interfaces: list[str]
    network_mode: str
    stop_seconds: float
    exit_code: int
    logs: str


def network_interfaces(proc_net_dev: str) -> list[str]:
    """Interface names from /proc/net/dev (two header lines, then `name: counters`)."""
    return [line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line]


@pytest.fixture(scope="module")
def served_and_stopped(image: str,
                       tmp_path_factory: pytest.TempPathFactory) -> ServedAndStopped:
    with container_runner(image) as containers:
        return serve_write_and_stop(containers, tmp_path_factory.mktemp("served"))


def raw_and_qcow2(host_volume: Path) -> ImagePair:
    """Random RAW, TEST its qcow2 twin, both writable for the container."""
    raw = host_volume / "raw.img"
    raw.write_bytes(os.urandom(IMAGE_SIZE))
    test = host_volume / "test.qcow2"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(test)],
        timeout=QEMU_TIMEOUT)
    writable(raw, test)
    return ImagePair(raw, test)


def serve_write_and_stop(containers: ContainerRunner, directory: Path) -> ServedAndStopped:
    host_volume = volume(directory / "images")
    images = raw_and_qcow2(host_volume)
    container = containers.serve(host_volume, inside(images.raw), inside(images.test))
    written = qemu_io(container.uri, f"write -P 0xab {MIB} {MIB}", f"read -P 0xab {MIB} {MIB}")
    interfaces = network_interfaces(docker("exec", container.name, "cat", "/proc/net/dev").stdout)
    network_mode = docker("inspect", "--format", "{{.HostConfig.NetworkMode}}",
                          container.name).stdout.strip()
    started = time.monotonic()
    docker("stop", "-t", str(STOP_GRACE), container.name, timeout=STOP_GRACE + DOCKER_TIMEOUT)
    stop_seconds = time.monotonic() - started
    exit_code = container.state()["ExitCode"]
    assert isinstance(exit_code, int)
    return ServedAndStopped(images, written, interfaces, network_mode,
                            stop_seconds, exit_code, container.logs())


def test_qemu_io_writes_and_reads_through_the_socket_in_the_volume(
        served_and_stopped: ServedAndStopped) -> None:
    result = served_and_stopped.qemu_io
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wrote {MIB}/{MIB} bytes at offset {MIB}" in result.stdout
    assert f"read {MIB}/{MIB} bytes at offset {MIB}" in result.stdout
    assert "Pattern verification failed" not in result.stdout


def test_the_container_has_no_network_but_loopback(served_and_stopped: ServedAndStopped) -> None:
    assert served_and_stopped.network_mode == "none"
    assert served_and_stopped.interfaces == ["lo"]


def test_docker_stop_ends_it_with_status_0_within_the_grace_period(
        served_and_stopped: ServedAndStopped) -> None:
    stopped = served_and_stopped
    assert stopped.exit_code == 0, stopped.logs
    # SIGKILL would come at STOP_GRACE s (and exit status 137).
    assert stopped.stop_seconds < STOP_GRACE, stopped.logs
    assert "SIGTERM: shutting down" in stopped.logs
    assert "stopped findings=0 reads=1 writes=1" in stopped.logs


def test_both_images_flushed_and_identical_after_the_stop(
        served_and_stopped: ServedAndStopped) -> None:
    images = served_and_stopped.images
    compare = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2",
                   str(images.raw), str(images.test)], timeout=QEMU_TIMEOUT)
    assert "Images are identical" in compare.stdout
    assert images.raw_bytes()[MIB:2 * MIB] == b"\xab" * MIB


#: What newer Docker engines' default profiles do to io_uring (this one, 20.10, allows it).
NO_IO_URING = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
                             "action": "SCMP_ACT_ERRNO"}]}


def test_a_seccomp_profile_that_refuses_io_uring_gets_a_qcow2_served_with_threads(
        containers: ContainerRunner, tmp_path: Path) -> None:
    """qemu-nbd cannot start with --aio=io_uring under such a profile: nbdverify starts
    it again with --aio=threads, says so, and serves."""
    profile = tmp_path / "no-io-uring.json"
    profile.write_text(json.dumps(NO_IO_URING))
    host_volume = volume(tmp_path / "images")
    images = raw_and_qcow2(host_volume)
    container = containers.serve(host_volume, inside(images.raw), inside(images.test),
                                 options=["--security-opt", f"seccomp={profile}"])
    result = qemu_io(container.uri, f"write -P 0xcd 0 {MIB}", f"read -P 0xcd 0 {MIB}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Pattern verification failed" not in result.stdout
    logs = container.logs()
    assert "qemu-nbd cannot use --aio=io_uring" in logs, logs
    assert "Unable to use io_uring" in logs and "using --aio=threads" in logs, logs


def test_corrupt_test_gives_eio_and_the_report_in_the_volume_names_the_sector(
        containers: ContainerRunner, tmp_path: Path) -> None:
    host_volume = volume(tmp_path / "images")
    images = make_pair(host_volume)
    images.corrupt_test()
    writable(images.raw, images.test)
    report = host_volume / "report.jsonl"
    container = containers.serve(host_volume, inside(images.raw), inside(images.test),
                                 "--report", inside(report))
    result = qemu_io(container.uri, f"read {MIB} {64 * 1024}")
    assert result.returncode != 0
    assert "read failed: Input/output error" in result.stdout, result.stdout + result.stderr
    # The server writes and flushes the record before it answers the read.
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(records) == 1, records
    assert records[0]["kind"] == "mismatch"
    assert records[0]["sector"] == CORRUPT_OFFSET // SECTOR
    assert records[0]["mismatch_offset"] == CORRUPT_OFFSET
    assert f"(sector {CORRUPT_OFFSET // SECTOR})" in container.logs()


def test_an_image_the_containers_uid_cannot_write_is_a_one_line_error(
        containers: ContainerRunner, tmp_path: Path) -> None:
    host_volume = volume(tmp_path / "images")
    images = make_pair(host_volume)
    writable(images.raw)
    images.test.chmod(0o444)  # writable by nobody but root, and the container runs as no root
    result = containers.run_to_exit(host_volume, "serve", inside(images.raw), inside(images.test),
                            "-U", f"{VOLUME}/nbd.sock")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nbdverify: "), lines
    assert inside(images.test) in lines[0] and "Permission denied" in lines[0], lines
    assert not (host_volume / "nbd.sock").exists()


def test_scripts_leave_a_running_engine_and_a_present_base_alone(image: str) -> None:
    engine = run([str(ROOT / "scripts" / "docker-engine")], timeout=DOCKER_TIMEOUT)
    assert "starting" not in engine.stderr, engine.stderr
    base = run([str(ROOT / "scripts" / "docker-base")], timeout=DOCKER_TIMEOUT)
    assert "is present" in base.stderr, base.stderr


def test_docker_base_refuses_an_unknown_argument_in_one_line() -> None:
    result = run([str(ROOT / "scripts" / "docker-base"), "--pull"], timeout=DOCKER_TIMEOUT,
                 check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "docker-base: unknown argument: --pull (usage: scripts/docker-base [--force])"]
