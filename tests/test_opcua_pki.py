"""`digispine-gateway opcua-cert`: the gateway's certificate (generated once, where the daemon
keeps it), the trust list, and a secure `browse` that is refused until the server's
certificate is trusted with the command. Against a real asyncua server (Basic256Sha256).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import cli
from tests.test_opcua_source import Users, _server_certificate, serving

pytestmark = pytest.mark.timeout(90)

SECURE = {"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt",
          "username": "gateway", "password": "s3cret", "request_timeout_s": 3.0}


def write_config(tmp_path: Path, connections: dict[str, dict[str, Any]]) -> Path:
    config = {"gateway": {"id": "gw1"}, "connections": connections,
              "buffer": {"directory": "state"}, "mappings": {"directory": "mappings"}}
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))
    return path


def opcua(endpoint: str = "opc.tcp://127.0.0.1:4840/", **fields: Any) -> dict[str, Any]:
    return {"protocol": "opcua", "endpoint": endpoint, **fields}


async def cli_main(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def fields(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())
            if k and not k.startswith(" ")}


def test_show_creates_the_certificate_once_where_the_daemon_keeps_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, {"cell": opcua()})
    pki = tmp_path / "state" / "pki"  # pki_dir is relative to buffer.directory
    assert cli.main(["opcua-cert", "show", "-c", str(config)]) == 0
    first = capsys.readouterr().out
    der = (pki / "own" / "cert.der").read_bytes()
    shown = fields(first)
    assert shown["certificate"] == f"{pki / 'own' / 'cert.der'}  (created now)"
    assert shown["private key"] == str(pki / "own" / "private" / "key.pem")
    assert shown["application URI"] == "urn:digispine:edge-gateway:gw1"
    assert shown["SHA-1"].split()[0] == sha1(der)
    assert shown["key"] == "RSA 2048 bit"
    assert "CN=DigiSpine Edge Gateway@" in shown["subject"]
    assert shown["valid"].endswith("(valid)")
    assert (pki / "trusted").is_dir() and (pki / "rejected").is_dir()

    # Again, as JSON and with the connection named: the same certificate, not regenerated.
    assert cli.main(["opcua-cert", "show", "cell", "--json", "-c", str(config)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (pki / "own" / "cert.der").read_bytes() == der
    assert again["thumbprint_sha1"] == sha1(der) and again["created_now"] is False
    assert again["file"] == str(pki / "own" / "cert.der")
    cert = x509.load_der_x509_certificate(der)
    assert again["not_after"] == cert.not_valid_after_utc.isoformat()

    assert cli.main(["opcua-cert", "show", "--pem", "-c", str(config)]) == 0
    pem = capsys.readouterr().out
    block = pem[pem.index("-----BEGIN CERTIFICATE-----"):]
    assert x509.load_pem_x509_certificate(block.encode()).public_bytes(
        serialization.Encoding.DER) == der


def test_which_connection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = write_config(tmp_path, {"a": opcua(), "b": opcua(),
                                     "plc": {"protocol": "modbus", "host": "127.0.0.1"}})
    assert cli.main(["opcua-cert", "list", "-c", str(shared)]) == 0  # one PKI: no name needed
    assert "trusted (" in capsys.readouterr().out
    apart = write_config(tmp_path, {"a": opcua(), "b": opcua(pki_dir="/var/lib/gw/pki-b")})
    assert cli.main(["opcua-cert", "show", "-c", str(apart)]) == 64
    assert capsys.readouterr().err == (
        f"digispine-gateway: {apart} has several OPC UA connections with different PKI "
        f"directories; name one: a, b\n")
    modbus = write_config(tmp_path, {"a": opcua(),
                                     "plc": {"protocol": "modbus", "host": "127.0.0.1"}})
    assert cli.main(["opcua-cert", "list", "plc", "-c", str(modbus)]) == 64
    assert capsys.readouterr().err == (
        f"digispine-gateway: connection plc in {modbus} is modbus, not OPC UA (OPC UA "
        f"connections: a)\n")


async def test_secure_browse_is_refused_until_the_server_certificate_is_trusted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server_cert, _ = cert_key = _server_certificate(tmp_path / "server")
    server_der = server_cert.read_bytes()
    thumb = sha1(server_der)
    pki = tmp_path / "state" / "pki"
    async with serving(secure=cert_key, user_manager=Users()) as server:
        config = write_config(tmp_path, {"cell": opcua(server.endpoint, **SECURE)})
        c = str(config)

        # 1. Unknown server certificate: one line, saved to rejected/, says how to trust it.
        assert await cli_main("browse", "cell", "Objects/Machines", "-c", c) == 69
        out, err = capsys.readouterr()
        (rejected,) = (pki / "rejected").iterdir()
        assert rejected.read_bytes() == server_der
        assert out == ""
        assert err == (
            f"digispine-gateway: OPC UA connection cell ({server.endpoint}): the server's "
            f"certificate (CN=Test OPC UA Server, SHA-1 {thumb}) is not trusted; it was saved "
            f"as {rejected}: move it to {pki / 'trusted'} to trust this server, or run: "
            f"digispine-gateway opcua-cert trust {thumb[:16]} cell\n")
        own = (pki / "own" / "cert.der").read_bytes()  # made by the connect, as the daemon does

        assert await cli_main("opcua-cert", "list", "-c", c) == 0
        listed = capsys.readouterr().out.splitlines()
        assert listed[0] == f"trusted ({pki / 'trusted'}): 0 certificate(s)"
        assert listed[1] == f"rejected ({pki / 'rejected'}): 1 certificate(s)"
        assert listed[2] == f"  {rejected.name}"
        assert listed[3].strip() == "subject CN=Test OPC UA Server"
        assert listed[4].strip() == "self-signed"
        assert listed[5].strip().startswith(f"SHA-1 {thumb}  valid ")
        assert listed[5].endswith("  valid")

        # 2. Trusted by a thumbprint prefix (as other tools print it: upper case, colons).
        colons = ":".join(thumb[i:i + 2] for i in range(0, 8, 2)).upper()
        assert await cli_main("opcua-cert", "trust", colons, "cell", "-c", c) == 0
        said = capsys.readouterr().out
        assert said.splitlines()[0] == f"trusted: {pki / 'trusted' / rejected.name}"
        assert not rejected.exists()
        assert (pki / "trusted" / rejected.name).read_bytes() == server_der

        # 3. The next browse succeeds, over Basic256Sha256 with the same gateway certificate.
        assert await cli_main("browse", "cell", "Objects/Machines/CNC-101", "-c", c) == 0
        out, err = capsys.readouterr()
        assert out.splitlines()[0].startswith(
            f"cell ({server.endpoint}, Basic256Sha256/SignAndEncrypt): Objects/Machines/CNC-101")
        assert "nsu=urn:acme:machines;s=CNC-101.State" in out and err == ""
        assert (pki / "own" / "cert.der").read_bytes() == own

        # 4. Rejected again: refused again.
        assert await cli_main("opcua-cert", "reject", thumb[:10], "-c", c) == 0
        assert capsys.readouterr().out.startswith(f"rejected: {rejected}")
        assert await cli_main("browse", "cell", "-c", c) == 69
        assert "is not trusted" in capsys.readouterr().err


def test_trust_copies_a_pem_file_as_der_and_refuses_what_it_cannot_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server_cert, _ = _server_certificate(tmp_path / "server")
    der = server_cert.read_bytes()
    pem = tmp_path / "server.pem"
    pem.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    config = write_config(tmp_path, {"cell": opcua()})
    trusted = tmp_path / "state" / "pki" / "trusted"
    c = str(config)

    assert cli.main(["opcua-cert", "trust", str(pem), "-c", c]) == 0
    (copied,) = trusted.iterdir()
    assert copied.name == f"Test_OPC_UA_Server_{sha1(der)[:16]}.der"
    assert copied.read_bytes() == der
    assert capsys.readouterr().out.splitlines()[0] == f"trusted: {copied}"
    assert cli.main(["opcua-cert", "trust", str(server_cert), "-c", c]) == 0  # same cert, DER
    assert capsys.readouterr().out.startswith(f"already trusted: {copied}")
    assert list(trusted.iterdir()) == [copied]

    assert cli.main(["opcua-cert", "list", "--json", "-c", c]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["file"], t["thumbprint_sha1"], t["expired"]) for t in listed["trusted"]] == [
        (str(copied), sha1(der), False)]
    assert listed["rejected"] == []

    garbage = tmp_path / "not-a-cert.der"
    garbage.write_bytes(b"hello")
    assert cli.main(["opcua-cert", "trust", str(garbage), "-c", c]) == 66
    assert capsys.readouterr().err.startswith(
        f"digispine-gateway: {garbage} is not a DER or PEM certificate")
    assert cli.main(["opcua-cert", "trust", "abc", "-c", c]) == 64
    assert "too short" in capsys.readouterr().err
    assert cli.main(["opcua-cert", "trust", "0123456789", "-c", c]) == 64
    assert capsys.readouterr().err == (
        f"digispine-gateway: no certificate in {trusted.parent / 'rejected'} has a SHA-1 "
        f"thumbprint starting with 0123456789 (it is empty)\n")


def test_the_parser_does_not_import_asyncua_or_cryptography() -> None:
    code = ("import sys; from gateway import cli; cli._parser(); "
            "print(sorted(m for m in ('asyncua', 'cryptography', 'gateway.sources.opcua') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent.parent)
    assert done.stdout.strip() == "[]"
