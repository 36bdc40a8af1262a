"""Fixtures shared by the tests; the helpers behind them live in support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ImagePair, RunningServer, make_pair, start_server


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
