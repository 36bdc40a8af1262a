"""The issue's first acceptance check, as a newcomer would try it."""

from __future__ import annotations

from support import RunningServer, require_tool, run


def test_qemu_io_write_then_read_pattern_and_compare(server: RunningServer) -> None:
    qemu_io = require_tool("qemu-io")
    result = run([qemu_io, "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
                  server.uri])
    assert "read 1048576/1048576 bytes at offset 0" in result.stdout
    compare = run([require_tool("qemu-img"), "compare", str(server.images.raw), server.uri])
    assert "Images are identical" in compare.stdout
    assert server.images.raw_bytes()[:1 << 20] == b"\xab" * (1 << 20)
    assert server.images.raw_bytes() == server.images.test_bytes()
