"""An nbdkit python plugin: a file that mishandles chosen writes, as a TEST child.

    nbdkit python tests/buggy_plugin.py file=IMAGE faults=1:drop,3:flip shift=65536

Writes are counted from 1 (WRITE only; zeroing is done right and not counted).
Faults: drop (never applied), misdirect (applied `shift` bytes further on),
tear (only the first half, in whole sectors), zero (zeros instead of the data),
flip (one bit of the data flipped).
"""

from __future__ import annotations

import os

import nbdkit

API_VERSION = 2
SECTOR = 512

path = ""
faults: dict[int, str] = {}
shift = 0
writes = 0


def config(key: str, value: str) -> None:
    global path, shift
    if key == "file":
        path = value
    elif key == "faults":
        for item in value.split(","):
            number, fault = item.split(":")
            faults[int(number)] = fault
    elif key == "shift":
        shift = int(value)
    else:
        raise RuntimeError(f"unknown parameter {key}")


def open(readonly: bool) -> int:  # nbdkit calls it by this name
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def get_size(handle: int) -> int:
    return os.fstat(handle).st_size


def can_fua(handle: int) -> int:
    return int(nbdkit.FUA_EMULATE)


def pread(handle: int, buffer: bytearray, offset: int, flags: int) -> None:
    buffer[:] = os.pread(handle, len(buffer), offset)


def pwrite(handle: int, buffer: bytes, offset: int, flags: int) -> None:
    global writes
    writes += 1
    fault = faults.get(writes)
    data = bytearray(buffer)
    if fault == "drop":
        return
    if fault == "misdirect":
        offset += shift
    elif fault == "tear":
        data = data[:len(data) // 2 // SECTOR * SECTOR]
    elif fault == "zero":
        data = bytearray(len(data))
    elif fault == "flip":
        data[len(data) // 2] ^= 0x10
    os.pwrite(handle, data, offset)


def zero(handle: int, count: int, offset: int, flags: int) -> None:
    os.pwrite(handle, bytes(count), offset)


def flush(handle: int, flags: int) -> None:
    os.fsync(handle)


def close(handle: int) -> None:
    os.close(handle)
