"""TLS through NBD_OPT_STARTTLS, with certificates made at test time."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nbd
import pytest
import trio
from rawclient import RawClient
from support import (
    NBDVERIFY,
    ImagePair,
    RunningServer,
    make_pair,
    require_tool,
    run,
    start_server,
)

from nbdverify_protocol import wire
from nbdverify_protocol.constants import Option, OptionReplyType


def make_certificates(directory: Path) -> Path:
    """A CA, and a server certificate for 127.0.0.1/localhost signed by it, in the
    file layout qemu-nbd, nbdkit and libnbd use."""
    openssl = require_tool("openssl")
    directory.mkdir()

    def sh(*arguments: str) -> None:
        run([openssl, *arguments], timeout=60)

    sh("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-keyout", str(directory / "ca-key.pem"), "-out", str(directory / "ca-cert.pem"),
       "-subj", "/CN=nbdverify test CA")
    sh("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(directory / "server-key.pem"),
       "-out", str(directory / "server.csr"), "-subj", "/CN=localhost")
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                          "extendedKeyUsage=serverAuth\n")
    sh("x509", "-req", "-in", str(directory / "server.csr"), "-days", "2",
       "-CA", str(directory / "ca-cert.pem"), "-CAkey", str(directory / "ca-key.pem"),
       "-CAcreateserial", "-out", str(directory / "server-cert.pem"),
       "-extfile", str(extensions))
    return directory


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("tls") / "pki")


@pytest.fixture
def pair(tmp_path: Path) -> ImagePair:
    return make_pair(tmp_path, size=4 * 1024 * 1024)


def tls_server(tmp_path: Path, pair: ImagePair, certificates: Path, mode: str) -> RunningServer:
    return start_server(tmp_path, pair, f"--tls={mode}", "--tls-certificates",
                        str(certificates), tcp=True)


def test_qemu_io_over_tls(tmp_path: Path, pair: ImagePair, certificates: Path) -> None:
    server = tls_server(tmp_path, pair, certificates, "require")
    try:
        port = server.uri.rsplit(":", 1)[1].split("/")[0]
        result = run([
            require_tool("qemu-io"),
            "--object", f"tls-creds-x509,id=tls0,dir={certificates},endpoint=client",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0",
            "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k",
        ], timeout=60)
        assert "read 65536/65536 bytes" in result.stdout
    finally:
        assert server.stop() == 0
    assert pair.raw_bytes() == pair.test_bytes()
    assert pair.raw_bytes()[:65536] == b"\x42" * 65536


def test_libnbd_over_tls(tmp_path: Path, pair: ImagePair, certificates: Path) -> None:
    server = tls_server(tmp_path, pair, certificates, "require")
    try:
        assert server.uri.startswith("nbds://")
        handle = nbd.NBD()
        handle.set_tls_certificates(str(certificates))
        handle.set_tls(nbd.TLS_REQUIRE)
        handle.connect_uri(server.uri)
        assert handle.get_tls_negotiated()
        handle.pwrite(b"\x99" * 4096, 8192)
        assert handle.pread(4096, 8192) == b"\x99" * 4096
        handle.shutdown()
        info = run([require_tool("nbdinfo"), "--json",
                    f"{server.uri}?tls-certificates={certificates}"], timeout=60)
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 4 * 1024 * 1024
    finally:
        assert server.stop() == 0
    assert pair.raw_bytes() == pair.test_bytes()


def test_tls_on_lets_plain_clients_in_too(tmp_path: Path, pair: ImagePair,
                                          certificates: Path) -> None:
    server = tls_server(tmp_path, pair, certificates, "on")
    try:
        plain = server.uri.replace("nbds://", "nbd://")
        run([require_tool("qemu-io"), "-f", "raw", "-c", "read 0 4k", plain], timeout=60)
    finally:
        server.stop()


async def test_require_refuses_everything_but_starttls_and_abort(
        tmp_path: Path, pair: ImagePair, certificates: Path) -> None:
    server = tls_server(tmp_path, pair, certificates, "require")
    try:
        port = int(server.uri.rsplit(":", 1)[1].split("/")[0])
        with trio.fail_after(30):
            client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
            await client.greeting()
            go = wire.InfoRequest.build({"name": "", "info_types": []})
            for option, payload in ((Option.GO, go), (Option.LIST, b""),
                                    (Option.STRUCTURED_REPLY, b""), (Option.INFO, go)):
                replies = await client.option(option, payload)
                assert replies[-1].reply_type == OptionReplyType.ERR_TLS_REQD, option
            replies = await client.option(Option.ABORT)
            assert replies[-1].reply_type == OptionReplyType.ACK
    finally:
        server.stop()


def test_tls_without_certificates_is_a_usage_error(pair: ImagePair) -> None:
    result = subprocess.run([NBDVERIFY, "serve", str(pair.raw), str(pair.test), "--tls=on"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--tls-certificates" in result.stderr
