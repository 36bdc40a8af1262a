"""The C library calls: where malloc puts a big READ buffer, fallocate's errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdverify.libc import fallocate

# In a fresh interpreter: is a 1 MiB bytearray's storage on the heap, or an mmap
# of its own (glibc's default, which costs page faults and zeroing on every READ)?
WHERE_A_BIG_BUFFER_LIVES = """
import ctypes, sys
from nbdverify.libc import reuse_freed_buffers
if sys.argv[1] == "tuned":
    assert reuse_freed_buffers()
buffer = bytearray(1024 * 1024)
address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
for line in open("/proc/self/maps"):
    start, end = (int(part, 16) for part in line.split()[0].split("-"))
    if start <= address < end:
        print("heap" if line.rstrip().endswith("[heap]") else "mapping")
"""


@pytest.mark.parametrize(("setting", "expected"), [("default", "mapping"), ("tuned", "heap")])
def test_big_buffers_come_from_the_heap_once_tuned(setting: str, expected: str) -> None:
    result = subprocess.run([sys.executable, "-c", WHERE_A_BIG_BUFFER_LIVES, setting],
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == expected


def test_fallocate_errors_carry_the_errno(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as raised:
            fallocate(fd, 0, 0, 4096)  # read-only descriptor
        assert raised.value.errno == errno.EBADF
        assert "fallocate" in str(raised.value)
    finally:
        os.close(fd)
