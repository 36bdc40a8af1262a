"""Fixtures shared by the tests; the helpers behind them live in support.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from peers_support import BOOKWORM, GENERATIONS, Peer, build_trixie_root, require_shared
from support import STOP_TIMEOUT, ImagePair, Launcher, RunningServer, make_pair, start_server

# In CI the property tests draw the same examples every run, so a red run means a
# change broke something, not that this run's dice found an old bug; locally
# they explore afresh each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def images(tmp_path: Path) -> ImagePair:
    return make_pair(tmp_path)


@pytest.fixture
def server(tmp_path: Path, images: ImagePair) -> Iterator[RunningServer]:
    running = start_server(tmp_path, images)
    yield running
    running.stop()


@pytest.fixture
def tcp_server(tmp_path: Path, images: ImagePair) -> Iterator[RunningServer]:
    running = start_server(tmp_path, images, tcp=True)
    yield running
    running.stop()


@pytest.fixture
def launch(tmp_path: Path, images: ImagePair) -> Iterator[Launcher]:
    """start_server with extra options; whatever a test leaves running is killed."""
    started: list[RunningServer] = []

    def start(*extra: str, tcp: bool = False) -> RunningServer:
        server = start_server(tmp_path, images, *extra, tcp=tcp)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="session")
def trixie(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    """Today's peers (QEMU 10, libnbd 1.22, nbdkit 1.42) from a cached trixie root,
    built on first use: once per suite run, and once per machine while cached."""
    require_shared(tmp_path_factory.getbasetemp())
    return build_trixie_root()


@pytest.fixture(params=GENERATIONS)
def peer(request: pytest.FixtureRequest) -> Peer:
    """Each peer generation in turn: the host's bookworm tools, then trixie's."""
    if request.param == "bookworm":
        return BOOKWORM
    return request.getfixturevalue("trixie")  # type: ignore[no-any-return]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the trixie root: `pytest -m trixie` runs just those."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        by_peer = callspec is not None and callspec.params.get("peer") == "trixie"
        if by_peer or "trixie" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.trixie)
