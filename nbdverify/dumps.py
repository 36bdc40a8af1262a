"""--dump-dir: each finding's differing bytes from both children, as files.

DIR/finding-NNNN/ holds raw-OFFSET.bin and test-OFFSET.bin for each differing
range (OFFSET in decimal, where the range starts on the device) and finding.json
(the report's record). Findings are rare, so the files are written at once, on
the event loop; the caps keep a flood of findings from filling the disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .findings import Finding, Mismatch
from .log import log_event

DEFAULT_MAX_FINDINGS = 100
DEFAULT_MAX_BYTES = 1 << 30


class DumpDir:
    def __init__(self, directory: Path, max_findings: int = DEFAULT_MAX_FINDINGS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_findings = max_findings
        self.max_bytes = max_bytes
        self.findings = 0
        self.bytes = 0
        self._cap_logged = False

    def __call__(self, finding: Finding) -> None:
        if not isinstance(finding, Mismatch):
            return  # a divergence has no bytes to show
        size = sum(2 * (r.end - r.start) for r in finding.ranges)
        if self.findings >= self.max_findings or self.bytes + size > self.max_bytes:
            if not self._cap_logged:
                self._cap_logged = True
                log_event(logging.WARNING, "dump_cap",
                          f"dump directory cap reached: no more dumps in {self.directory}",
                          dumped=self.findings, bytes=self.bytes,
                          max_findings=self.max_findings, max_bytes=self.max_bytes)
            return
        self.findings += 1
        self.bytes += size
        folder = self.directory / f"finding-{self.findings:04d}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for piece in finding.ranges:
                (folder / f"raw-{piece.start}.bin").write_bytes(piece.raw)
                (folder / f"test-{piece.start}.bin").write_bytes(piece.test)
            (folder / "finding.json").write_text(json.dumps(finding.as_record(), indent=1) + "\n")
        except OSError as error:
            log_event(logging.ERROR, "dump_failed", f"cannot write dump {folder}: "
                      f"{error.strerror or error}")
