"""Image formats QEMU can read (qcow2, vmdk, vdi, ...) as children: nbdverify starts
a qemu-nbd for the image on a private unix socket and talks NBD to it.

The qemu-nbd belongs to the server: its stderr is logged under the child's name,
it is stopped with the server, and the kernel kills it if the server dies (even by
SIGKILL), so no qemu-nbd outlives us.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile

import trio

from nbdverify_protocol.constants import Errno

from .children import ChildError
from .log import log_event
from .nbd_child import NbdChild
from .process import die_with_parent

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


async def probe_format(path: str) -> str:
    """The image's format as qemu-img sees it."""
    try:
        result = await trio.run_process(
            ["qemu-img", "info", "--force-share", "--output=json", "--", path],
            capture_stdout=True, capture_stderr=True, check=False)
    except FileNotFoundError:
        raise OSError("qemu-img is not installed (it probes image formats)") from None
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(message[-1] if message else f"qemu-img info failed on {path}")
    return str(json.loads(result.stdout)["format"])


async def _log_stderr(name: str, stream: trio.abc.ReceiveStream) -> None:
    pending = b""
    async for chunk in stream:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            log_event(logging.WARNING, "child-stderr",
                      f"{name} qemu-nbd: {line.decode(errors='replace')}", child=name)


async def open_qemu_child(name: str, path: str, image_format: str, nursery: trio.Nursery,
                          readonly: bool = False, timeout: float | None = None) -> NbdChild:
    """Start qemu-nbd for `path` and connect to it."""
    if shutil.which("qemu-nbd") is None:
        raise ChildError(name, "open", 0, 0, Errno.EIO, "qemu-nbd is not installed")
    directory = tempfile.mkdtemp(prefix=f"nbdverify-{name}-")
    socket_path = os.path.join(directory, "qemu-nbd.sock")
    command = ["qemu-nbd", f"--format={image_format}", f"--socket={socket_path}",
               "--cache=writeback", "--aio=threads", "--discard=unmap"]
    if readonly:
        command.append("--read-only")
    process = await trio.lowlevel.open_process(
        [*command, "--", path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, preexec_fn=die_with_parent,
        start_new_session=True)  # a Ctrl-C on our terminal must not stop it mid-flush
    assert process.stderr is not None
    nursery.start_soon(_log_stderr, name, process.stderr)

    async def stop() -> None:
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()  # qemu-nbd exits once its only client is gone
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        shutil.rmtree(directory, ignore_errors=True)

    try:
        with trio.fail_after(READY_TIMEOUT):
            while not os.path.exists(socket_path):
                if process.poll() is not None:
                    raise ChildError(name, "open", 0, 0, Errno.EIO,
                                     f"qemu-nbd exited with status {process.returncode} "
                                     f"for {path} (format {image_format})")
                await trio.sleep(0.02)
        child = await NbdChild.open(name, f"nbd+unix:///?socket={socket_path}", nursery,
                                    timeout)
    except trio.TooSlowError:
        await stop()
        raise ChildError(name, "open", 0, 0, Errno.EIO,
                         f"qemu-nbd did not start within {READY_TIMEOUT} s") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await stop()
        raise
    child.location = f"{path} ({image_format}, via qemu-nbd pid {process.pid})"
    child.owned_cleanup = stop
    return child
