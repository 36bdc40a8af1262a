"""The runtime install path (scripts/install) and the Dockerfile built on it.

The image's build is replayed outside a container (test_container.py builds and runs
the real image): the files the Dockerfile COPYs are copied into a directory laid out
as the image's, and the command its RUN gives is run there, with the prefix moved
into a temporary directory. The nbdverify that comes out is then used as the image's
ENTRYPOINT would be. One real install (a venv and a pip run) per session; everything
else reuses it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import START_TIMEOUT, STOP_TIMEOUT, require_tool, run

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_TIMEOUT = 600.0  # a venv and a pip run; ~20-40 s normally
RERUN_TIMEOUT = 60.0
COMMAND_TIMEOUT = 30.0
IMAGE_SIZE = 4 * 1024 * 1024


@dataclass
class Instruction:
    keyword: str
    arguments: str


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, arguments = logical.partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def only(keyword: str) -> Instruction:
    found = [i for i in dockerfile_instructions() if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the Dockerfile, found {len(found)}"
    return found[0]


@dataclass
class InstallStep:
    """The Dockerfile's RUN of scripts/install: where it runs and with what prefix."""

    workdir: str
    command: list[str]
    prefix: str


def install_step() -> InstallStep:
    workdir = "/"
    steps = []
    for instruction in dockerfile_instructions():
        if instruction.keyword == "WORKDIR":
            workdir = os.path.join(workdir, instruction.arguments)
        elif instruction.keyword == "RUN" and "scripts/install" in instruction.arguments:
            words = shlex.split(instruction.arguments)
            command = words[:words.index("&&")] if "&&" in words else words
            steps.append(InstallStep(workdir, command, command[command.index("--prefix") + 1]))
    assert len(steps) == 1, f"expected one RUN of scripts/install, found {len(steps)}"
    return steps[0]


def replay_copies(image_root: Path) -> None:
    """Lay out the Dockerfile's COPY sources under image_root as the build would
    (.dockerignore keeps caches out of the context, so they are skipped here too)."""
    workdir = "/"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for instruction in dockerfile_instructions():
        if instruction.keyword == "WORKDIR":
            workdir = os.path.join(workdir, instruction.arguments)
        elif instruction.keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
            *sources, destination = words
            assert instruction.keyword == "COPY", "ADD is not used for local files"
            target = image_root / os.path.join(workdir, destination).lstrip("/")
            for source in sources:
                origin = ROOT / source
                assert origin.exists(), f"the Dockerfile COPYs {source}, which is missing"
                if origin.is_dir():  # COPY copies a directory's contents
                    shutil.copytree(origin, target, ignore=ignore, dirs_exist_ok=True)
                else:
                    to = target / origin.name if destination.endswith("/") else target
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, to)


@dataclass
class Installed:
    checkout: Path  # the image's copy of the sources
    step: InstallStep
    prefix: Path
    entry_point: Path
    stderr: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    image_root = base / "image"
    replay_copies(image_root)
    step = install_step()
    checkout = image_root / step.workdir.lstrip("/")
    prefix = base / "prefix"
    command = list(step.command)
    command[command.index("--prefix") + 1] = str(prefix)
    # The script must run as the image's RUN runs it: by a relative path, from WORKDIR.
    result = run(command, timeout=INSTALL_TIMEOUT, cwd=checkout)
    return Installed(checkout, step, prefix, Path(result.stdout.strip()), result.stderr)


def test_install_reports_prefix_bin_nbdverify(installed: Installed) -> None:
    assert installed.entry_point == installed.prefix / "bin" / "nbdverify"
    assert os.access(installed.entry_point, os.X_OK)
    assert (installed.prefix / "pyvenv.cfg").is_file()


def test_dockerfile_entrypoint_is_what_install_makes(installed: Installed) -> None:
    entrypoint = json.loads(only("ENTRYPOINT").arguments)
    assert installed.step.prefix == "/opt/nbdverify"
    made = Path(installed.step.prefix) / installed.entry_point.relative_to(installed.prefix)
    assert entrypoint == [str(made)]
    assert json.loads(only("CMD").arguments) == ["--help"]


def test_dockerfile_rig() -> None:
    assert only("FROM").arguments.startswith("debian:bookworm")
    assert only("EXPOSE").arguments.split() == ["10809"]
    assert only("VOLUME").arguments in ("/images", '["/images"]')
    user = only("USER").arguments.split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"


def test_version(installed: Installed) -> None:
    result = run([str(installed.entry_point), "--version"], timeout=COMMAND_TIMEOUT)
    # An installed copy runs as Python: build/native is a source checkout's.
    assert re.fullmatch(r"nbdverify \d+\.\d+\.\d+\S* \(pure Python\)\n", result.stdout)


def test_help(installed: Installed) -> None:
    result = run([str(installed.entry_point), "--help"], timeout=COMMAND_TIMEOUT)
    assert "serve" in result.stdout
    serve = run([str(installed.entry_point), "serve", "--help"], timeout=COMMAND_TIMEOUT)
    assert "--ipaddr" in serve.stdout and "--unix" in serve.stdout


def test_installed_package_is_runtime_only(installed: Installed) -> None:
    # -I: isolated, so neither the working directory (a checkout, with its own
    # nbdverify/ and *.egg-info) nor PYTHON* variables can stand in for the install.
    python = [str(installed.prefix / "bin" / "python"), "-I"]
    files = run([*python, "-c", "import importlib.metadata as m\n"
                 "print(*(f for f in m.files('nbdverify')), sep='\\n')"],
                timeout=COMMAND_TIMEOUT).stdout.split()
    # What went into site-packages (RECORD also lists ../../../bin/nbdverify).
    packages = {f.split("/")[0] for f in files
                if "/" in f and ".dist-info/" not in f and not f.startswith("../")}
    assert packages == {"nbdverify", "nbdverify_protocol"}, packages
    assert not [f for f in files if re.search(r"(^|/)(tests?/|conftest\.py|test_\w+\.py)", f)]
    site = run([*python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
               timeout=COMMAND_TIMEOUT).stdout.strip()
    assert not list(Path(site).glob("tests")) and not list(Path(site).glob("support.py"))
    # Not editable (it does not read from a checkout), and without the test extras.
    where = run([*python, "-c", "import nbdverify, nbdverify_protocol as p; "
                 "print(nbdverify.__file__); print(p.__file__)"],
                timeout=COMMAND_TIMEOUT).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), where
    for module in ("pytest", "hypothesis", "mypy"):
        probe = run([*python, "-c", f"import {module}"], timeout=COMMAND_TIMEOUT, check=False)
        assert probe.returncode != 0, f"{module} is installed, but only the runtime should be"
    # The build ran on a copy: the checkout gets no build/ or *.egg-info.
    assert not (installed.checkout / "build").exists()
    assert not list(installed.checkout.glob("*.egg-info"))


@pytest.fixture
def qcow2_pair(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "raw.img"
    raw.write_bytes(os.urandom(IMAGE_SIZE))
    test = tmp_path / "test.qcow2"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(test)],
        timeout=COMMAND_TIMEOUT)
    return raw, test


def test_installed_serve_raw_and_qcow2_on_unix_socket(
        installed: Installed, qcow2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    qemu_io = require_tool("qemu-io")
    raw, test = qcow2_pair
    socket = tmp_path / "nbd.sock"
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        server = subprocess.Popen([str(installed.entry_point), "serve", str(raw), str(test),
                                   "-U", str(socket)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=stderr)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "serving " not in log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the installed server did not start: {log.read_text()}")
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={socket}"
        before = run([qemu_io, "-f", "raw", "-c", "read 0 1M", uri], timeout=COMMAND_TIMEOUT)
        assert "read 1048576/1048576 bytes at offset 0" in before.stdout
        result = run([qemu_io, "-f", "raw", "-c", "write -P 0xab 1M 1M",
                      "-c", "read -P 0xab 1M 1M", uri], timeout=COMMAND_TIMEOUT)
        assert "read 1048576/1048576 bytes at offset 1048576" in result.stdout
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=STOP_TIMEOUT) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=STOP_TIMEOUT)
    assert "mismatch" not in log.read_text()
    compare = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2",
                   str(raw), str(test)], timeout=COMMAND_TIMEOUT)
    assert "Images are identical" in compare.stdout
    assert raw.read_bytes()[1 << 20:2 << 20] == b"\xab" * (1 << 20)


def test_rerun_installs_nothing(installed: Installed) -> None:
    """Idempotent: unchanged sources, so no venv and no pip run the second time."""
    command = list(installed.step.command)
    command[command.index("--prefix") + 1] = str(installed.prefix)
    result = run(command, timeout=RERUN_TIMEOUT, cwd=installed.checkout)
    assert Path(result.stdout.strip()) == installed.entry_point
    assert "up to date" in result.stderr
    assert "creating" not in result.stderr and "pip-installing" not in result.stderr
    run([str(installed.entry_point), "--version"], timeout=COMMAND_TIMEOUT)
