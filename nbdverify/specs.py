"""What a child is, from the command line, and how to open it.

A child is a local file (raw: read and written directly), an image in any format
QEMU reads (served to us by a qemu-nbd we start), or any NBD server by URI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import trio

from .children import Child, FileChild
from .nbd_child import NbdChild, is_nbd_uri
from .qemu_child import open_qemu_child, probe_format


class SpecError(ValueError):
    """A child description we cannot understand."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    #: A path, or an nbd:// / nbd+unix:// URI.
    target: str
    #: The image format; None: ask qemu-img (files only).
    image_format: str | None = None

    @property
    def is_uri(self) -> bool:
        return is_nbd_uri(self.target)


def parse_images(images: list[str]) -> tuple[ChildSpec, ChildSpec]:
    """RAW and TEST from `RAW TEST`, QEMU's `blkverify:RAW:TEST` (split at the first
    colon, as QEMU does: RAW cannot contain one), or QEMU's
    `json:{"driver":"blkverify","raw":...,"test":...}`."""
    if len(images) == 2:
        return ChildSpec(images[0]), ChildSpec(images[1])
    if len(images) == 1 and images[0].startswith("blkverify:"):
        raw, sep, test = images[0].removeprefix("blkverify:").partition(":")
        if sep and raw and test:
            return ChildSpec(raw), ChildSpec(test)
        raise SpecError(f"expected blkverify:RAW:TEST, got {images[0]!r}")
    if len(images) == 1 and images[0].startswith("json:"):
        try:
            options = json.loads(images[0].removeprefix("json:"))
        except json.JSONDecodeError as error:
            raise SpecError(f"bad JSON: {error}") from None
        if not isinstance(options, dict) or options.get("driver") != "blkverify":
            raise SpecError('expected json:{"driver":"blkverify","raw":...,"test":...}')
        return _from_qemu_json(options.get("raw")), _from_qemu_json(options.get("test"))
    raise SpecError("expected RAW TEST, blkverify:RAW:TEST or json:{\"driver\":\"blkverify\",...}")


def _from_qemu_json(node: Any) -> ChildSpec:
    """The subset of QEMU's block node options that names one image or server."""
    if isinstance(node, str):
        return ChildSpec(node)
    if not isinstance(node, dict):
        raise SpecError(f"cannot use child {node!r}")
    driver = node.get("driver")
    if driver == "file" and isinstance(node.get("filename"), str):
        return ChildSpec(node["filename"], "raw")
    if driver == "nbd":
        server = node.get("server", {})
        export = node.get("export", "")
        if server.get("type") == "unix":
            return ChildSpec(f"nbd+unix:///{export}?socket={server['path']}")
        if server.get("type") == "inet":
            return ChildSpec(f"nbd://{server['host']}:{server.get('port', 10809)}/{export}")
    if isinstance(driver, str) and isinstance(node.get("file"), str | dict):
        inner = _from_qemu_json(node["file"])
        return ChildSpec(inner.target, driver)
    if isinstance(driver, str) and isinstance(node.get("filename"), str):
        return ChildSpec(node["filename"], driver)
    raise SpecError(f"cannot use child {json.dumps(node)}")


async def open_child(role: str, spec: ChildSpec, nursery: trio.Nursery, readonly: bool,
                     timeout: float | None, in_place: bool = False) -> Child:
    """Open one child; OSError or ChildError if it cannot be had. `in_place`: see
    open_qemu_child."""
    if spec.is_uri:
        return await NbdChild.open(role, spec.target, nursery, timeout)
    os.stat(spec.target)  # a missing file is named plainly, before any probing
    image_format = spec.image_format or await probe_format(spec.target)
    if image_format == "raw":
        return FileChild(role, spec.target, readonly=readonly)
    return await open_qemu_child(role, spec.target, image_format, nursery, readonly, timeout,
                                 in_place)
