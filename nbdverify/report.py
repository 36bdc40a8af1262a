"""Where findings go: a line (and a hexdump) on stderr, a JSON object in --report."""

from __future__ import annotations

import json
import logging
from typing import IO

from .findings import Finding
from .log import log_event


class Reporter:
    """Never drops or throttles a finding (QEMU's quorum events are limited to one a
    second); each report line is flushed at once, so it survives a crash."""

    def __init__(self, report: IO[str] | None = None) -> None:
        self._report = report

    def attach(self, report: IO[str]) -> None:
        """Start writing JSON lines to `report` (opened once the images checked out,
        so a failed start creates no file)."""
        self._report = report

    def __call__(self, finding: Finding) -> None:
        log_event(logging.ERROR, finding.kind, finding.summary())
        for line in finding.details():
            log_event(logging.ERROR, "hexdump", "  " + line)
        if self._report is not None:
            self._report.write(json.dumps(finding.as_record()) + "\n")
            self._report.flush()
