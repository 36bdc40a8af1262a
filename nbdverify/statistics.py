"""Live statistics: per operation counts, bytes and each child's latency.

Pure. Latencies go into log-scale histograms (8 buckets per power of two, so a
percentile is within 12.5% of the truth) of fixed size: memory does not grow
with the number of requests, and recording one costs a few integer operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUB_BUCKETS = 8
_SUB_BITS = 3  # log2(SUB_BUCKETS)
ROLES = ("raw", "test")


class LatencyHistogram:
    def __init__(self) -> None:
        self._buckets: list[int] = []
        self.count = 0
        self.max_ns = 0

    def record(self, seconds: float) -> None:
        ns = int(seconds * 1e9)
        if ns < SUB_BUCKETS:
            index = max(ns, 0)
        else:
            shift = ns.bit_length() - _SUB_BITS - 1
            index = (shift + 1) * SUB_BUCKETS + (ns >> shift) - SUB_BUCKETS
        if index >= len(self._buckets):
            self._buckets.extend([0] * (index + 1 - len(self._buckets)))
        self._buckets[index] += 1
        self.count += 1
        if ns > self.max_ns:
            self.max_ns = ns

    @staticmethod
    def _upper_bound(index: int) -> int:
        """The largest latency in ns that lands in bucket `index`."""
        if index < SUB_BUCKETS:
            return index
        shift = index // SUB_BUCKETS - 1
        return ((index % SUB_BUCKETS + SUB_BUCKETS + 1) << shift) - 1

    def percentile(self, fraction: float) -> int:
        """The latency in ns that `fraction` of the requests did not exceed (at
        most the bucket's upper bound, never more than the maximum seen)."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index, count in enumerate(self._buckets):
            seen += count
            if seen >= rank:
                return min(self._upper_bound(index), self.max_ns)
        return self.max_ns

    def as_record(self) -> dict[str, int]:
        return {"p50_ns": self.percentile(0.5), "p99_ns": self.percentile(0.99),
                "max_ns": self.max_ns}


@dataclass
class OperationStatistics:
    count: int = 0
    bytes: int = 0
    latency: dict[str, LatencyHistogram] = field(
        default_factory=lambda: {role: LatencyHistogram() for role in ROLES})


class Statistics:
    """What the device has done since start. `started` and `child_done` are on the
    request path; the rest is read on SIGUSR1 and at exit."""

    def __init__(self) -> None:
        self.operations: dict[str, OperationStatistics] = {}
        self.bytes_verified = 0
        self.bytes_unverified = 0
        self.findings = 0

    def _operation(self, operation: str) -> OperationStatistics:
        found = self.operations.get(operation)
        if found is None:
            found = self.operations[operation] = OperationStatistics()
        return found

    def started(self, operation: str, length: int = 0) -> None:
        entry = self._operation(operation)
        entry.count += 1
        entry.bytes += length

    def child_done(self, operation: str, role: str, seconds: float) -> None:
        self._operation(operation).latency[role].record(seconds)

    def count(self, operation: str) -> int:
        entry = self.operations.get(operation)
        return 0 if entry is None else entry.count

    def as_record(self) -> dict[str, Any]:
        return {
            "operations": {
                name: {
                    "count": entry.count,
                    "bytes": entry.bytes,
                    "latency": {role: histogram.as_record()
                                for role, histogram in entry.latency.items()
                                if histogram.count},
                }
                for name, entry in self.operations.items()
            },
            "bytes_verified": self.bytes_verified,
            "bytes_unverified": self.bytes_unverified,
            "findings": self.findings,
        }

    def summary(self) -> str:
        """One line for people."""
        parts = []
        for name, entry in self.operations.items():
            latencies = " ".join(
                f"{role} p50 {_duration(h.percentile(0.5))} p99 {_duration(h.percentile(0.99))} "
                f"max {_duration(h.max_ns)}"
                for role, h in entry.latency.items() if h.count)
            size = f" {_size(entry.bytes)}" if entry.bytes else ""
            parts.append(f"{name} {entry.count}{size}" + (f" ({latencies})" if latencies else ""))
        parts.append(f"verified {_size(self.bytes_verified)}, "
                     f"unverified {_size(self.bytes_unverified)}, findings {self.findings}")
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
