"""What a finding does: the one place that answers "does this request fail, does
the export stop, which exit status". The device, the server and the CLI ask it."""

from __future__ import annotations

import enum

import trio

from .findings import Finding

EXIT_MISMATCH = 3


class OnMismatch(enum.Enum):
    """`--on-mismatch`: what the user chose."""

    #: Fail the request with EIO, close the connection, refuse new ones.
    DISCONNECT = "disconnect"
    #: Fail the request with EIO and keep serving.
    ERROR = "error"
    #: Serve the reference's result and keep serving, to collect every region.
    LOG = "log"
    #: As DISCONNECT, then the server exits with status 3.
    EXIT = "exit"


class MismatchPolicy:
    """The chosen behaviour, and what the findings so far have made of the export."""

    def __init__(self, mode: OnMismatch = OnMismatch.DISCONNECT) -> None:
        self.mode = mode
        self.findings = 0
        #: The finding that stopped the export, once one has.
        self.stopped_by: Finding | None = None
        #: Set when the export stops: connections stop reading, the CLI may exit.
        self.stopped = trio.Event()

    def judge(self, finding: Finding) -> bool:
        """Count a finding, stop the export if the mode says so; True if the
        request that found it must fail (every mode but LOG)."""
        self.findings += 1
        if self.mode in (OnMismatch.DISCONNECT, OnMismatch.EXIT) and self.stopped_by is None:
            self.stopped_by = finding
            self.stopped.set()
        return self.mode is not OnMismatch.LOG

    @property
    def exits_on_stop(self) -> bool:
        """A stopped export ends the server (EXIT)."""
        return self.mode is OnMismatch.EXIT

    def refusal(self) -> str | None:
        """Why a new client may not use the export, or None if it may."""
        if self.stopped_by is None:
            return None
        return f"export stopped after a verification failure: {self.stopped_by.summary()}"

    def exit_status(self, command_status: int | None = None) -> int:
        """The server's exit status. With a `--run` command: 3 if anything was found,
        else the command's. Without: 3 if the export stopped under EXIT, else 0
        (a signal stopped a server that was serving as asked)."""
        if command_status is not None:
            return EXIT_MISMATCH if self.findings else command_status
        return EXIT_MISMATCH if self.exits_on_stop and self.stopped_by else 0
