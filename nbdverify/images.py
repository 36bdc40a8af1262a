"""Images opened by the offline commands (replay, crashcheck, compare): any form
`serve` accepts, and one-line errors with exit status 2 when one cannot be had."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from .children import Child, ChildError
from .journal import JournalError
from .process import run_reporting
from .specs import ChildSpec, open_child

EXIT_ERROR = 2


class ImageError(Exception):
    """An image cannot be opened or read: the command fails with exit status 2."""


@asynccontextmanager
async def open_image(role: str, target: str, image_format: str | None = None,
                     readonly: bool = True, in_place: bool = False) -> AsyncIterator[Child]:
    """A child for `target` (file, QEMU image, NBD URI), closed on the way out.
    `in_place` (read-only): see open_qemu_child."""
    async with trio.open_nursery() as nursery:
        try:
            child = await open_child(role, ChildSpec(target, image_format), nursery, readonly,
                                     None, in_place and readonly)
        except OSError as error:
            raise ImageError(f"cannot open {target}: {error.strerror or error}") from None
        except ChildError as error:
            raise ImageError(f"cannot open {target}: {error.detail}") from None
        try:
            yield child
        finally:
            with trio.CancelScope(shield=True):
                await child.aclose()
            nursery.cancel_scope.cancel()


def run_offline(command: Callable[[], Awaitable[int]]) -> int:
    """Run an offline command under trio; its errors become one line and status 2."""
    return run_reporting(command, (ImageError, JournalError, ChildError), EXIT_ERROR)
