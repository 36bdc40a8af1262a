"""Several connections to one verified device: CAN_MULTI_CONN must hold."""

from __future__ import annotations

import json
import os
import random
import re
import threading
from pathlib import Path

import nbd
from peers_support import Peer
from support import ImagePair, make_pair, require_tool, run, start_server

MiB = 1024 * 1024


def test_multi_conn_is_advertised(tmp_path: Path, images: ImagePair) -> None:
    server = start_server(tmp_path, images)
    try:
        info = json.loads(run([require_tool("nbdinfo"), "--json", server.uri]).stdout)
        assert info["exports"][0]["can_multi_conn"] is True
    finally:
        server.stop()


def test_nbdcopy_uses_several_connections_both_ways(tmp_path: Path, peer: Peer) -> None:
    pair = make_pair(tmp_path, size=32 * MiB)
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(32 * MiB))
    server = start_server(tmp_path, pair, "-v")
    try:
        peer.run("nbdcopy", "--connections=4", "--flush", str(source), server.uri, timeout=120)
        copy = tmp_path / "copy.img"
        peer.run("nbdcopy", "--connections=4", server.uri, str(copy), timeout=120)
    finally:
        assert server.stop() == 0
    assert pair.raw_bytes() == source.read_bytes()
    assert pair.test_bytes() == source.read_bytes()
    assert copy.read_bytes() == source.read_bytes()
    connections = set(re.findall(r"client connected connection=(\d+)", server.stderr))
    assert len(connections) > 2, server.stderr  # more than one per nbdcopy run
    assert server.report_records() == []


def test_concurrent_overlapping_writers_never_cause_a_false_mismatch(
        tmp_path: Path, images: ImagePair) -> None:
    """Writers on four connections hammer the same 1 MiB while a reader on a fifth
    reads it: any read that saw one child updated and the other not would be
    reported as a mismatch."""
    server = start_server(tmp_path, images, "--on-mismatch=error")
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            handle = nbd.NBD()
            handle.connect_uri(server.uri)
            rng = random.Random(seed)
            for _ in range(20):  # bounded: 20 batches of 8 requests in flight
                cookies = []
                for _ in range(8):
                    offset = rng.randrange(0, MiB - 65536)
                    length = rng.choice([512, 4096, 65536, 1000])
                    buffer = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(length)))
                    cookies.append(handle.aio_pwrite(buffer, offset))
                pending = set(cookies)
                for _ in range(10_000):  # bounded wait for this batch
                    pending = {c for c in pending if not handle.aio_command_completed(c)}
                    if not pending:
                        break
                    handle.poll(1)
                assert not pending, "writes never completed"
            handle.flush()
            handle.shutdown()
        except BaseException as error:  # reported to the main thread
            errors.append(error)

    def reader() -> None:
        try:
            handle = nbd.NBD()
            handle.connect_uri(server.uri)
            rng = random.Random(99)
            for _ in range(200):
                offset = rng.randrange(0, MiB - 65536)
                handle.pread(rng.choice([512, 4096, 65536]), offset)
            handle.shutdown()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    threads.append(threading.Thread(target=reader))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive()
    finally:
        server.stop()
    assert errors == []
    assert server.report_records() == []
    assert images.raw_bytes() == images.test_bytes()
