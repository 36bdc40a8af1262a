"""Live statistics: per operation counts, bytes and each child's latency.

Pure. Recording is on every request's path, so it is two array appends: each
child's latencies go into a window of the last WINDOW to 2 * WINDOW requests,
from which p50 and p99 are worked out exactly when asked (SIGUSR1, exit); the
maximum is kept over all of them. Memory does not grow with the request count.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

#: Latency samples kept per child and operation, twice over (8 bytes each).
WINDOW = 1 << 15
OPERATIONS = ("read", "write", "write_zeroes", "trim", "flush", "cache", "block_status")


class LatencyWindow:
    def __init__(self) -> None:
        self.current = array("q")
        self._previous = array("q")
        self._max_ns = 0
        self._rolled = 0  # samples no longer in either array

    def roll(self) -> None:
        """The current samples become the previous ones; the oldest are dropped."""
        self._max_ns = max(self._max_ns, max(self.current, default=0))
        self._rolled += len(self._previous)
        self._previous, self.current = self.current, array("q")

    @property
    def count(self) -> int:
        return self._rolled + len(self._previous) + len(self.current)

    @property
    def max_ns(self) -> int:
        return max(self._max_ns, max(self._previous, default=0), max(self.current, default=0))

    def percentile(self, fraction: float) -> int:
        """The latency in ns that `fraction` of the recent requests did not exceed."""
        recent = sorted(self._previous + self.current)
        if not recent:
            return 0
        return recent[max(1, math.ceil(fraction * len(recent))) - 1]

    def as_record(self) -> dict[str, int]:
        return {"p50_ns": self.percentile(0.5), "p99_ns": self.percentile(0.99),
                "max_ns": self.max_ns}


@dataclass
class OperationStatistics:
    count: int = 0
    bytes: int = 0
    raw: LatencyWindow = field(default_factory=LatencyWindow)
    test: LatencyWindow = field(default_factory=LatencyWindow)

    def latencies(self) -> dict[str, LatencyWindow]:
        return {role: window for role, window in (("raw", self.raw), ("test", self.test))
                if window.count}


class Statistics:
    """What the device has done since start. `started` and `children_done` are on
    the request path (~0.3 us each); the rest is read on SIGUSR1 and at exit."""

    def __init__(self) -> None:
        self.operations = {name: OperationStatistics() for name in OPERATIONS}
        self.bytes_verified = 0
        self.bytes_unverified = 0

    def started(self, operation: str, length: int = 0) -> None:
        entry = self.operations[operation]
        entry.count += 1
        entry.bytes += length

    def children_done(self, operation: str, raw_ns: int, test_ns: int) -> None:
        """How long each child took, in nanoseconds."""
        entry = self.operations[operation]
        entry.raw.current.append(raw_ns)
        entry.test.current.append(test_ns)
        if len(entry.raw.current) >= WINDOW:
            entry.raw.roll()
            entry.test.roll()

    def count(self, operation: str) -> int:
        return self.operations[operation].count

    def as_record(self, findings: int) -> dict[str, Any]:
        """`findings`: the policy's count (it is the one that counts them)."""
        return {
            "operations": {
                name: {
                    "count": entry.count,
                    "bytes": entry.bytes,
                    "latency": {role: window.as_record()
                                for role, window in entry.latencies().items()},
                }
                for name, entry in self.operations.items() if entry.count
            },
            "bytes_verified": self.bytes_verified,
            "bytes_unverified": self.bytes_unverified,
            "findings": findings,
        }

    def summary(self, findings: int) -> str:
        """One line for people."""
        parts = []
        for name, entry in self.operations.items():
            if not entry.count:
                continue
            latencies = " ".join(
                f"{role} p50 {_duration(w.percentile(0.5))} p99 {_duration(w.percentile(0.99))} "
                f"max {_duration(w.max_ns)}"
                for role, w in entry.latencies().items())
            size = f" {_size(entry.bytes)}" if entry.bytes else ""
            parts.append(f"{name} {entry.count}{size}" + (f" ({latencies})" if latencies else ""))
        parts.append(f"verified {_size(self.bytes_verified)}, "
                     f"unverified {_size(self.bytes_unverified)}, findings {findings}")
        return "; ".join(parts)


def _duration(ns: int) -> str:
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.0f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f}ms"
    return f"{ns / 1e9:.2f}s"


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
