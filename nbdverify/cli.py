"""The command line: `serve`'s options spelled like nbdkit's, so rigs written for it
work, and the offline commands'. A command's own module is imported only when it
runs: `compare` then starts without the server's, replay's and crashcheck's imports
(0.27 s to import everything, 0.22 s what compare needs, with trio 0.13 s of that)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import NoReturn

from nbdverify_protocol import native
from nbdverify_protocol.negotiation import TlsMode

from . import __version__, journal
from .dumps import DEFAULT_MAX_BYTES, DEFAULT_MAX_FINDINGS
from .policy import OnMismatch
from .specs import SpecError, parse_images

EXIT_USAGE = 2
DEFAULT_PORT = 10809


class UsageError(Exception):
    """Bad command-line arguments: one line on stderr, exit status 2."""


def _command(module: str) -> Callable[[argparse.Namespace], int]:
    """The `main` of nbdverify.`module`, imported when the command runs."""
    def run(args: argparse.Namespace) -> int:
        return int(import_module(f"{__package__}.{module}").main(args))
    return run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nbdverify",
        description="A verifying NBD server: writes go to RAW and TEST, reads compare both.",
    )
    parser.add_argument("--version", action="version",
                        version=f"nbdverify {__version__} ({native.describe()})")
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
    serve.set_defaults(handler=_command("serve"))
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
    replaying.set_defaults(handler=_command("replay"))
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
    checking.set_defaults(handler=_command("crashcheck"))
    comparing = commands.add_parser(
        "compare", help="list every range where two images differ",
        description="Compare A and B (files, any QEMU format, NBD URIs) and list every "
        "differing range. Exit status 0: identical, 1: different, 2: error.")
    comparing.add_argument("a", metavar="A")
    comparing.add_argument("b", metavar="B")
    comparing.add_argument("-f", metavar="FORMAT", dest="format_a", help="A's format")
    comparing.add_argument("-F", metavar="FORMAT", dest="format_b", help="B's format")
    comparing.add_argument("--json", action="store_true", help="one JSON object")
    comparing.add_argument(
        "--through-qemu", action="store_true",
        help="read all of a qcow2 through QEMU's driver (qemu-nbd), as a guest would, not its "
        "plain data clusters from the file (slower; for suspicions about the driver's reads)")
    comparing.set_defaults(handler=_command("compare"))


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
    return int(args.handler(args))

if __name__ == "__main__":
    sys.exit(main())
