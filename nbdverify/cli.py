"""`nbdverify serve`: options spelled like nbdkit's, so rigs written for it work."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import ssl
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn
from urllib.parse import quote

import trio

from nbdverify_protocol.negotiation import TlsMode

from . import __version__, compare, crashcheck, journal, replay
from .children import Child, ChildError
from .device import (
    DeviceError,
    SizeMismatch,
    VerificationFailed,
    VerifiedDevice,
)
from .dumps import DEFAULT_MAX_BYTES, DEFAULT_MAX_FINDINGS, DumpDir
from .log import configure_logging, log_event
from .policy import MismatchPolicy, OnMismatch
from .process import run_reporting, set_parent_death_signal
from .provenance import Provenance
from .report import Reporter
from .server import ExportConfig, Server, TlsConfig
from .specs import ChildSpec, SpecError, open_child, parse_images

EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_PORT = 10809


class UsageError(Exception):
    """Bad command-line arguments: one line on stderr, exit status 2."""


class StartupError(Exception):
    """The server cannot start (missing or mismatched images): exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nbdverify",
        description="A verifying NBD server: writes go to RAW and TEST, reads compare both.",
    )
    parser.add_argument("--version", action="version", version=f"nbdverify {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser(
        "serve",
        help="serve a raw + test pair",
        description="Serve RAW (trusted reference) and TEST (under test) as one verified "
        "NBD export. Give them as two arguments or as blkverify:RAW:TEST.",
    )
    serve.add_argument("images", nargs="+", metavar="IMAGE",
                       help="RAW TEST, blkverify:RAW:TEST or json:{\"driver\":\"blkverify\",...}; "
                       "each a file in any format qemu-img knows, or an nbd:// or "
                       "nbd+unix:// URI")
    where = serve.add_argument_group("where to listen")
    where.add_argument("-U", "--unix", metavar="PATH",
                       help="listen on a unix socket; '-' makes a private temporary one")
    where.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                       help="TCP port (default %(default)s; 0 picks a free one)")
    where.add_argument("-i", "--ipaddr", default="127.0.0.1",
                       help="address to listen on (default %(default)s)")
    export = serve.add_argument_group("the export")
    export.add_argument("-e", "--exportname", default="", help="export name (default empty)")
    export.add_argument("--description", default="", help="export description for clients")
    export.add_argument("-r", "--readonly", action="store_true", help="refuse all writes")
    export.add_argument("--no-extended-headers", action="store_true",
                        help="do not offer NBD extended headers (64-bit lengths), to test a "
                        "client's fallback to structured replies")
    tls = serve.add_argument_group("TLS (X.509, as qemu-nbd and nbdkit)")
    tls.add_argument("--tls", choices=[mode.value for mode in TlsMode], default="off",
                     help="off (default), on (clients may use STARTTLS) or require")
    tls.add_argument("--tls-certificates", metavar="DIR",
                     help="directory with ca-cert.pem, server-cert.pem and server-key.pem")
    tls.add_argument("--tls-verify-peer", action="store_true",
                     help="require a client certificate signed by ca-cert.pem")
    verify = serve.add_argument_group("verification")
    verify.add_argument("--on-mismatch", choices=[p.value for p in OnMismatch],
                        default=OnMismatch.DISCONNECT.value,
                        help="what a mismatch does (default %(default)s)")
    verify.add_argument("--raw-format", metavar="FORMAT",
                        help="RAW's image format (default: as qemu-img info says)")
    verify.add_argument("--test-format", metavar="FORMAT",
                        help="TEST's image format (default: as qemu-img info says)")
    verify.add_argument("--child-timeout", type=float, metavar="SECONDS",
                        help="a child that takes longer to answer a request has failed it")
    verify.add_argument("--report", metavar="FILE",
                        help="append each finding to FILE as one JSON object a line")
    verify.add_argument("--fingerprints", action="store_true",
                        help="read what RAW holds before each write and keep CRC-32s of it, "
                        "so a mismatch can be told stale, torn or misdirected (an extra RAW read "
                        "and about a third more server CPU per 4 KiB write)")
    verify.add_argument("--no-provenance", action="store_true",
                        help="do not remember which request last wrote each byte: findings "
                        "then carry no ranges (no class, no last writer); saves some server "
                        "CPU on every write")
    verify.add_argument("--dump-dir", metavar="DIR",
                        help="write both children's differing bytes of each finding, and its "
                        "JSON, under DIR")
    verify.add_argument("--dump-max-findings", type=int, default=DEFAULT_MAX_FINDINGS,
                        metavar="N", help="dump at most N findings (default %(default)s)")
    verify.add_argument("--dump-max-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="BYTES",
                        help="dump at most BYTES in all (default %(default)s)")
    run = serve.add_argument_group("running")
    run.add_argument("-P", "--pidfile", metavar="FILE", help="write the process id here once ready")
    run.add_argument("--run", metavar="CMD",
                     help="run CMD with $uri $nbd $unixsocket $port $exportname set, then exit "
                     "with its status (3 if any mismatch was seen)")
    run.add_argument("--exit-with-parent", action="store_true",
                     help="shut down when the process that started us exits")
    run.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    run.add_argument("--log-format", choices=["text", "json"], default="text",
                     help="stderr log lines for people (text) or machines (json)")
    record = serve.add_argument_group("journal")
    record.add_argument("--journal", metavar="FILE",
                        help="record every write, zero, trim and flush (with data) in FILE")
    record.add_argument("--journal-max-size", metavar="SIZE", type=journal.parse_size,
                        help="stop recording (with a note) before FILE grows past SIZE")
    add_offline_commands(commands)
    return parser


def add_offline_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    """journal show, replay, crashcheck, compare: they read journals and images."""
    show = commands.add_parser("journal", help="read a journal").add_subparsers(
        dest="journal_command", required=True, parser_class=_Parser).add_parser(
        "show", help="print a journal's records, one a line",
        description="Print a journal's records, one a line, in the order both children "
        "completed them.")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--json", action="store_true", help="one JSON object a line")
    show.add_argument("--offset", metavar="START-END", type=lambda text: journal.parse_range(
        text, size=True), help="only requests that touched bytes START to END-1")
    show.add_argument("--sequence", metavar="FIRST-LAST", type=lambda text: journal.parse_range(
        text, size=False), help="only sequence numbers FIRST to LAST")
    show.add_argument("--at", metavar="OFFSET", type=journal.parse_size,
                      help="every request that touched the byte at OFFSET")
    show.set_defaults(handler=journal.show)
    replaying = commands.add_parser(
        "replay", help="apply a journal to a copy of the starting image",
        description="Apply FILE's records, in order, to IMAGE (a copy of the image the "
        "recorded run started from), to its end or to a chosen point.")
    replaying.add_argument("file", metavar="FILE")
    replaying.add_argument("--onto", metavar="IMAGE", required=True,
                           help="the image to change: a file, any QEMU format, or an NBD URI")
    replaying.add_argument("-f", "--format", metavar="FORMAT", help="IMAGE's format")
    point = replaying.add_mutually_exclusive_group()
    point.add_argument("--until", metavar="SEQ", type=int,
                       help="stop after the record with sequence number SEQ")
    point.add_argument("--flushes", metavar="N", type=int, help="stop after the N-th FLUSH")
    replaying.set_defaults(handler=replay.main)
    checking = commands.add_parser(
        "crashcheck", help="check a crashed TEST against the journal",
        description="Check that TEST, after a crash, holds for every block the last durable "
        "write or a later one, and the starting content where nothing was written. Exit "
        "status 0: no violation, 1: violations, 2: error.")
    checking.add_argument("file", metavar="FILE")
    checking.add_argument("test", metavar="TEST")
    checking.add_argument("--base", metavar="IMAGE",
                          help="the starting image (default: RAW, for blocks never written)")
    checking.add_argument("-f", "--format", metavar="FORMAT", help="TEST's format")
    checking.add_argument("--json", action="store_true", help="one JSON object")
    checking.set_defaults(handler=crashcheck.main)
    comparing = commands.add_parser(
        "compare", help="list every range where two images differ",
        description="Compare A and B (files, any QEMU format, NBD URIs) and list every "
        "differing range. Exit status 0: identical, 1: different, 2: error.")
    comparing.add_argument("a", metavar="A")
    comparing.add_argument("b", metavar="B")
    comparing.add_argument("-f", metavar="FORMAT", dest="format_a", help="A's format")
    comparing.add_argument("-F", metavar="FORMAT", dest="format_b", help="B's format")
    comparing.add_argument("--json", action="store_true", help="one JSON object")
    comparing.set_defaults(handler=compare.main)


@dataclass
class Endpoint:
    """Where the server listens, and how clients name it."""

    export_name: str
    unix_path: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command != "serve":
            return int(args.handler(args))
        args.children = parse_images(args.images)
        if args.tls != TlsMode.OFF.value and not args.tls_certificates:
            raise UsageError(f"--tls={args.tls} needs --tls-certificates DIR")
        if args.no_provenance and args.fingerprints:
            raise UsageError("--fingerprints needs provenance (drop --no-provenance)")
        if args.journal_max_size is not None and not args.journal:
            raise UsageError("--journal-max-size needs --journal FILE")
        for option in ("dump_max_findings", "dump_max_bytes"):
            if getattr(args, option) < 0:
                raise UsageError(f"--{option.replace('_', '-')} must not be negative")
    except (UsageError, SpecError) as error:
        print(f"nbdverify: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.verbose, args.log_format == "json")
    if args.exit_with_parent:
        set_parent_death_signal(signal.SIGTERM)  # a graceful shutdown, as on Ctrl-C
    return run_reporting(lambda: serve(args), (StartupError,), EXIT_FAILURE)

if __name__ == "__main__":
    sys.exit(main())
