"""Where findings go: a line (and a hexdump) on stderr, a JSON object in --report."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import IO, Any

from .findings import Finding
from .log import log_event


class Reporter:
    """Never drops or throttles a finding (QEMU's quorum events are limited to one a
    second); each report line is flushed at once, so it survives a crash."""

    def __init__(self, report: IO[str] | None = None) -> None:
        self._report = report
        #: Told of each finding after it is reported (--dump-dir).
        self.also: list[Callable[[Finding], None]] = []

    def attach(self, report: IO[str]) -> None:
        """Start writing JSON lines to `report` (opened once the images checked out,
        so a failed start creates no file)."""
        self._report = report

    def __call__(self, finding: Finding) -> None:
        log_event(logging.ERROR, finding.kind, finding.summary())
        for line in finding.details():
            log_event(logging.ERROR, "hexdump", "  " + line)
        self._write(finding.as_record())
        for listener in self.also:
            listener(finding)

    def statistics(self, summary: str, record: dict[str, Any]) -> None:
        """One line for people, one `"kind": "statistics"` record in the report."""
        log_event(logging.INFO, "statistics", f"statistics: {summary}")
        self._write({"kind": "statistics", **record})

    def _write(self, record: dict[str, Any]) -> None:
        if self._report is not None:
            self._report.write(json.dumps(record) + "\n")
            self._report.flush()
