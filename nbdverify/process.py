"""Tying process lifetimes together (Linux prctl)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from .libc import set_parent_death_signal


def die_with_parent() -> None:
    """For subprocesses we own (a preexec_fn): SIGKILL when the server exits, even
    if the server itself was killed and could not clean up."""
    set_parent_death_signal(signal.SIGKILL)


def run_reporting(main: Callable[[], Awaitable[int]],
                  expected: tuple[type[BaseException], ...], status: int) -> int:
    """Run `main` under trio; an `expected` error ends the process with one line on
    stderr and `status`, anything else with its traceback."""
    try:
        return trio.run(main)
    except BaseException as error:
        # Errors raised inside a nursery arrive wrapped in exception groups.
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, expected):
            print(f"nbdverify: {error}", file=sys.stderr)
            return status
        raise
