"""`nbdverify serve`: the verified device of two children as an NBD export, until a
signal, a finding that stops it, or the --run command's end."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

import trio

from nbdverify_protocol import native
from nbdverify_protocol.negotiation import TlsMode

from . import journal
from .children import Child, ChildError
from .device import (
    DeviceError,
    SizeMismatch,
    VerificationFailed,
    VerifiedDevice,
)
from .dumps import DumpDir
from .libc import reuse_freed_buffers, set_parent_death_signal
from .log import configure_logging, log_event
from .policy import MismatchPolicy, OnMismatch
from .process import run_reporting
from .provenance import Provenance
from .report import Reporter
from .server import ExportConfig, Server, TlsConfig
from .specs import ChildSpec, open_child

EXIT_FAILURE = 1


class StartupError(Exception):
    """The server cannot start (missing or mismatched images): exit status 1."""


@dataclass
class Endpoint:
    """Where the server listens, and how clients name it."""

    export_name: str
    unix_path: str | None
    host: str
    port: int
    #: The socket came from socket activation: not ours to remove.
    activated: bool = False
    tls_required: bool = False

    @property
    def uri(self) -> str:
        name = quote(self.export_name)
        scheme = "nbds" if self.tls_required else "nbd"
        if self.unix_path is not None:
            return f"{scheme}+unix:///{name}?socket={quote(self.unix_path)}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{name}"

    @property
    def qemu_name(self) -> str:
        """The old `nbd:` syntax QEMU accepts, nbdkit's $nbd."""
        suffix = f":exportname={self.export_name}" if self.export_name else ""
        if self.unix_path is not None:
            return f"nbd:unix:{self.unix_path}{suffix}"
        return f"nbd:{self.host}:{self.port}{suffix}"

    def environment(self) -> dict[str, str]:
        return {
            "uri": self.uri,
            "nbd": self.qemu_name,
            "unixsocket": self.unix_path or "",
            "port": "" if self.unix_path else str(self.port),
            "exportname": self.export_name,
        }


async def open_device(args: argparse.Namespace, reporter: Reporter,
                      nursery: trio.Nursery) -> VerifiedDevice:
    """Open both children and check they fit together; StartupError if not."""
    raw_spec, test_spec = args.children
    raw_spec = ChildSpec(raw_spec.target, args.raw_format or raw_spec.image_format)
    test_spec = ChildSpec(test_spec.target, args.test_format or test_spec.image_format)
    children: list[Child] = []
    try:
        for role, spec in (("raw", raw_spec), ("test", test_spec)):
            try:
                children.append(await open_child(role, spec, nursery, args.readonly,
                                                 args.child_timeout))
            except OSError as error:
                raise StartupError(f"cannot open {role.upper()} image {spec.target}: "
                                   f"{error.strerror or error}") from None
            except ChildError as error:
                raise StartupError(f"cannot open {role.upper()} {spec.target}: "
                                   f"{error.detail}") from None
        raw, test = children
        try:
            device = VerifiedDevice(raw, test, export_name=args.exportname,
                                    policy=MismatchPolicy(OnMismatch(args.on_mismatch)),
                                    on_finding=reporter,
                                    provenance=None if args.no_provenance
                                    else Provenance(args.fingerprints))
            device.keep_mismatch_bytes = args.dump_dir is not None
            return device
        except SizeMismatch as error:
            raise StartupError(f"{error} (RAW {raw_spec.target}, TEST {test_spec.target}); "
                               "they must start identical") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            for child in children:
                await child.aclose()
        raise


SD_LISTEN_FDS_START = 3


def activated_socket() -> trio.socket.SocketType | None:
    """The listening socket systemd-style socket activation handed us (fd 3), as
    `nbdinfo -- [ nbdverify serve ... ]` and nbdcopy do; None if not activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # meant for us, not for processes we start
    if not count.isdigit() or int(count) < 1:
        return None
    return trio.socket.socket(fileno=SD_LISTEN_FDS_START)


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The server's TLS settings from the certificate directory, in the layout
    qemu-nbd and nbdkit use."""
    mode = TlsMode(args.tls)
    if mode is TlsMode.OFF:
        return None
    directory = Path(args.tls_certificates)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(directory / "server-cert.pem", directory / "server-key.pem")
        if args.tls_verify_peer:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(directory / "ca-cert.pem")
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"cannot load TLS certificates from {directory}: {error}") from None
    return TlsConfig(mode, context)


async def open_listeners(endpoint: Endpoint) -> list[trio.SocketListener]:
    activated = activated_socket()
    if activated is not None:
        name = activated.getsockname()
        if activated.family == trio.socket.AF_UNIX:
            endpoint.unix_path = name if isinstance(name, str) else name.decode()
        else:
            endpoint.host, endpoint.port = name[0], name[1]
        endpoint.activated = True
        return [trio.SocketListener(activated)]
    if endpoint.unix_path is None:
        listeners = await trio.open_tcp_listeners(endpoint.port, host=endpoint.host)
        endpoint.port = listeners[0].socket.getsockname()[1]
        return listeners
    path = endpoint.unix_path
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


@dataclass
class Outcome:
    #: The --run command's exit status, once it has exited.
    command_status: int | None = None


async def run_server(server: Server, endpoint: Endpoint, args: argparse.Namespace,
                     reporter: Reporter) -> int:
    try:
        listeners = await open_listeners(endpoint)
    except OSError as error:
        raise StartupError(f"cannot listen on {endpoint.uri}: {error.strerror or error}") from None
    outcome = Outcome()
    policy = server.device.policy
    # Signals are caught from before the server says it serves (or writes its
    # pidfile): a SIGTERM sent the moment it is ready still shuts down cleanly.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            if args.pidfile:
                Path(args.pidfile).write_text(f"{os.getpid()}\n")
            log_event(logging.INFO, "serving", f"serving {endpoint.uri}", uri=endpoint.uri,
                      raw=server.device.raw.location, test=server.device.test.location)
            async with trio.open_nursery() as helpers:
                helpers.start_soon(_on_signals, server, signals, reporter)
                if policy.exits_on_stop:
                    helpers.start_soon(_stop_with_export, server)
                if args.run:
                    helpers.start_soon(_run_command, args.run, endpoint, server, outcome)
                await server.stopping.wait()
                helpers.cancel_scope.cancel()
            # server.serve, still running in `nursery`, lets open connections finish.
    return policy.exit_status(outcome.command_status)


async def _on_signals(server: Server, signals: AsyncIterator[int], reporter: Reporter) -> None:
    """SIGUSR1 reports statistics; SIGINT and SIGTERM shut down."""
    async for signum in signals:
        if signum == signal.SIGUSR1:
            report_statistics(server.device, reporter)
            continue
        log_event(logging.INFO, "signal", f"{signal.Signals(signum).name}: shutting down")
        server.stop()
        return


def report_statistics(device: VerifiedDevice, reporter: Reporter) -> None:
    findings = device.policy.findings
    record = device.statistics.as_record(findings)
    if device.provenance is not None:
        record["provenance_bytes"] = device.provenance.memory_bytes()
    reporter.statistics(device.statistics.summary(findings), record)


async def _stop_with_export(server: Server) -> None:
    await server.device.policy.stopped.wait()
    server.stop()


async def _run_command(command: str, endpoint: Endpoint, server: Server,
                       outcome: Outcome) -> None:
    environment = {**os.environ, **endpoint.environment()}
    process = await trio.run_process(["/bin/sh", "-c", command], check=False, stdin=None,
                                     env=environment)
    status = process.returncode if process.returncode >= 0 else 128 - process.returncode
    outcome.command_status = status
    server.stop()


async def serve(args: argparse.Namespace) -> int:
    reporter = Reporter()
    report: IO[str] | None = None
    recorder: journal.JournalRecorder | None = None
    private_dir: str | None = None
    async with trio.open_nursery() as children_tasks:
        device = await open_device(args, reporter, children_tasks)
        try:
            unix_path = args.unix
            if unix_path == "-":
                private_dir = tempfile.mkdtemp(prefix="nbdverify-")
                unix_path = os.path.join(private_dir, "socket")
            endpoint = Endpoint(args.exportname, unix_path, args.ipaddr, args.port,
                                tls_required=args.tls == TlsMode.REQUIRE.value)
            if args.report:
                try:
                    report = open(args.report, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
                except OSError as error:
                    raise StartupError(f"cannot open report file {args.report}: "
                                       f"{error.strerror or error}") from None
                reporter.attach(report)
            if args.journal:
                try:
                    recorder = journal.record_device(device, args.journal, args.journal_max_size,
                                                     *(spec.target for spec in args.children))
                except journal.JournalError as error:
                    raise StartupError(str(error)) from None
            if args.dump_dir:
                try:
                    Path(args.dump_dir).mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise StartupError(f"cannot create dump directory {args.dump_dir}: "
                                       f"{error.strerror or error}") from None
                reporter.also.append(DumpDir(Path(args.dump_dir), args.dump_max_findings,
                                             args.dump_max_bytes))
            server = Server(device, ExportConfig(args.exportname, args.description,
                                                 args.readonly), tls_config(args),
                            extended_headers=not args.no_extended_headers)
            status = await run_server(server, endpoint, args, reporter)
            if not args.readonly:
                with contextlib.suppress(DeviceError, VerificationFailed):
                    await device.flush()
            report_statistics(device, reporter)
            stats = device.statistics
            log_event(logging.INFO, "stopped", "stopped", findings=device.policy.findings,
                      reads=stats.count("read"), writes=stats.count("write"),
                      bytes_verified=stats.bytes_verified,
                      bytes_unverified=stats.bytes_unverified)
            return status
        finally:
            with trio.CancelScope(shield=True):
                await device.raw.aclose()
                await device.test.aclose()
            children_tasks.cancel_scope.cancel()
            if report is not None:
                report.close()
            if recorder is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(recorder.close)
            if private_dir is not None:
                shutil.rmtree(private_dir, ignore_errors=True)
            elif args.unix and os.path.exists(args.unix):
                os.unlink(args.unix)
    raise AssertionError("unreachable")


def warn_if_uncompiled() -> None:
    """A source checkout whose build is stale serves pure Python, by design, and so
    silently 1.1-1.5x slower (README, Speed): a benchmark ran so unnoticed once."""
    if native.unbuilt:
        log_event(logging.WARNING, "uncompiled", f"serving {native.describe()}")


def main(args: argparse.Namespace) -> int:
    """Serve, once cli.main has checked the arguments."""
    configure_logging(args.verbose, args.log_format == "json")
    warn_if_uncompiled()
    if not reuse_freed_buffers():
        log_event(logging.INFO, "malloc-untuned", "no mallopt in this C library: big READs "
                  "get fresh pages each (slower)")
    if args.exit_with_parent:
        set_parent_death_signal(signal.SIGTERM)  # a graceful shutdown, as on Ctrl-C
    return run_reporting(lambda: serve(args), (StartupError,), EXIT_FAILURE)
