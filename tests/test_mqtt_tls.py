"""MQTT over TLS against a mosquitto of the test's own with a test CA made here: server
authentication, mutual TLS, and one clear line for each way it goes wrong (untrusted broker,
wrong host name, missing or refused client certificate, TLS against a plain port and the other
way round, unusable files)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from gateway.errors import SourceUnavailable
from gateway.sources.mqtt import MqttAddress, MqttConnectionConfig, MqttSource
from tests.test_mqtt_source import NAME, Collector, Mosquitto, running, source

pytestmark = pytest.mark.timeout(30)


# -- a test PKI ------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _issue(cn: str, issuer: Issued | None, *, ca: bool = False,
           names: tuple[x509.GeneralName, ...] = ()) -> Issued:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer else _name(cn))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


@dataclass
class Pki:
    """Files of a test CA, a broker certificate for 127.0.0.1, a client certificate, and a
    second CA that issued nothing the broker uses."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path
    other_ca: Path
    named_server_cert: Path
    """A broker certificate for the DNS name broker.plant1.test only."""


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o644)  # mosquitto, started as root, reads them as user mosquitto
    return path


def _pem(issued: Issued, password: bytes | None = None) -> tuple[bytes, bytes]:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return (issued.cert.public_bytes(serialization.Encoding.PEM),
            issued.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8, encryption))


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    directory = Path(tempfile.mkdtemp(prefix="mqtt-tls-"))
    try:
        yield make_pki(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def make_pki(directory: Path) -> Pki:
    """Write a test PKI into ``directory`` (readable by all: mosquitto reads it too)."""
    directory.chmod(0o755)
    ca = _issue("DigiSpine Test CA", None, ca=True)
    other = _issue("Some Other CA", None, ca=True)
    server = _issue("broker", ca, names=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.DNSName("localhost")))
    named = _issue("broker.plant1.test", ca, names=(x509.DNSName("broker.plant1.test"),))
    client = _issue("edge-gw-01", ca)
    server_pem, server_key = _pem(server)
    named_pem, _ = _pem(named)
    client_pem, client_key = _pem(client)
    _, client_key_encrypted = _pem(client, b"s3cret")
    return Pki(
        directory,
        ca=_write(directory / "ca.pem", _pem(ca)[0]),
        server_cert=_write(directory / "server.pem", server_pem),
        server_key=_write(directory / "server.key", server_key),
        client_cert=_write(directory / "client.pem", client_pem),
        client_key=_write(directory / "client.key", client_key),
        client_key_encrypted=_write(directory / "client-enc.key", client_key_encrypted),
        other_ca=_write(directory / "other-ca.pem", _pem(other)[0]),
        named_server_cert=_write(directory / "named.pem", named_pem + _pem(named)[1]),
    )


def tls_broker(tmp_path: Path, pki: Pki, *, mutual: bool = False,
               cert: Path | None = None) -> Mosquitto:
    """A mosquitto whose only listener speaks TLS (the listener line is the Mosquitto's own)."""
    key = pki.server_key if cert is None else cert  # the named cert file holds its key
    extra = (f"cafile {pki.ca}\ncertfile {cert or pki.server_cert}\nkeyfile {key}\n"
             f"require_certificate {'true' if mutual else 'false'}\n")
    return Mosquitto(tmp_path, extra)


def tls_source(port: int, topic: str, **tls: Any) -> MqttSource:
    return source(port, [MqttAddress(topic=topic)], tls=tls)


def publish_tls(port: int, pki: Pki, topic: str, payload: bytes) -> None:
    client = Client(CallbackAPIVersion.VERSION2)
    client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert),
                   keyfile=str(pki.client_key))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


async def failure(src: MqttSource) -> str:
    with pytest.raises(SourceUnavailable) as info:
        await asyncio.wait_for(src.run(Collector()), 15)
    return str(info.value)


# -- working connections ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_tls_with_the_plant_ca(tmp_path: Path, pki: Pki, topic_prefix: str,
                                     version: str) -> None:
    topic = f"{topic_prefix}/press07/state"
    with tls_broker(tmp_path, pki) as broker:
        src = source(broker.port, [MqttAddress(topic=topic)], protocol_version=version,
                     tls={"ca_file": pki.ca})
        emit = Collector()
        with structlog.testing.capture_logs() as logs:
            async with running(src, emit):
                publish_tls(broker.port, pki, topic, b"Running")
                await emit.wait(1)
    assert [s.value for s in emit.signals] == ["Running"]
    [connected] = [e for e in logs if e["event"] == "mqtt.connected"]
    assert connected["tls"] is True and connected["protocol_version"] == version


async def test_mutual_tls(tmp_path: Path, pki: Pki, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/press07/state"
    with tls_broker(tmp_path, pki, mutual=True) as broker:
        emit = Collector()
        src = tls_source(broker.port, topic, ca_file=pki.ca, cert_file=pki.client_cert,
                         key_file=pki.client_key)
        async with running(src, emit):
            publish_tls(broker.port, pki, topic, b"Idle")
            await emit.wait(1)
        encrypted = source(broker.port, [MqttAddress(topic=topic)], tls={
            "ca_file": pki.ca, "cert_file": pki.client_cert,
            "key_file": pki.client_key_encrypted, "key_password": "s3cret"})
        async with running(encrypted, emit):
            publish_tls(broker.port, pki, topic, b"Setup")
            await emit.wait(2)
    assert [s.value for s in emit.signals] == ["Idle", "Setup"]


async def test_server_name_checks_a_certificate_issued_for_a_dns_name(
        tmp_path: Path, pki: Pki, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/press07/state"
    with tls_broker(tmp_path, pki, cert=pki.named_server_cert) as broker:
        message = await failure(tls_source(broker.port, topic, ca_file=pki.ca))
        assert message == (
            f"TLS handshake with MQTT broker {NAME} at 127.0.0.1:{broker.port} failed: the "
            f"broker's certificate is not trusted (IP address mismatch, certificate is not "
            f"valid for '127.0.0.1'.); check that tls.ca_file is the CA that issued it and "
            f"that the certificate is valid for '127.0.0.1' (tls.server_name)")
        emit = Collector()
        async with running(tls_source(broker.port, topic, ca_file=pki.ca,
                                      server_name="broker.plant1.test"), emit):
            publish_tls_insecure(broker.port, topic, b"Running")
            await emit.wait(1)
    assert [s.value for s in emit.signals] == ["Running"]


def publish_tls_insecure(port: int, topic: str, payload: bytes) -> None:
    client = Client(CallbackAPIVersion.VERSION2)
    client.tls_set(cert_reqs=ssl.CERT_NONE)
    client.tls_insecure_set(True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


async def test_insecure_skip_verify_connects_and_warns(tmp_path: Path, pki: Pki,
                                                       topic_prefix: str) -> None:
    with tls_broker(tmp_path, pki) as broker:
        src = tls_source(broker.port, f"{topic_prefix}/x", ca_file=pki.other_ca,
                         insecure_skip_verify=True)
        with structlog.testing.capture_logs() as logs:
            async with running(src, Collector()):
                pass
    [warning] = [e for e in logs if e["event"] == "mqtt.tls_insecure"]
    assert warning["log_level"] == "warning"


# -- failures: one line each, naming what to check -------------------------------------------


async def test_an_untrusted_broker_certificate(tmp_path: Path, pki: Pki) -> None:
    with tls_broker(tmp_path, pki) as broker:
        message = await failure(tls_source(broker.port, "a/b", ca_file=pki.other_ca))
    assert message.startswith(f"TLS handshake with MQTT broker {NAME} at 127.0.0.1:"
                              f"{broker.port} failed: the broker's certificate is not trusted (")
    assert message.endswith("); check that tls.ca_file is the CA that issued it and that the "
                            "certificate is valid for '127.0.0.1' (tls.server_name)")


async def test_a_broker_that_requires_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with tls_broker(tmp_path, pki, mutual=True) as broker:
        message = await failure(tls_source(broker.port, "a/b", ca_file=pki.ca))
    # mosquitto hangs up without an alert (TLS 1.2) or alerts after the handshake (TLS 1.3)
    assert message.startswith(f"TLS handshake with MQTT broker {NAME} at 127.0.0.1:{broker.port} "
                              f"failed: ")
    assert "client certificate" in message and "tls.cert_file" in message


async def test_tls_against_a_plain_port(mqtt_port: int, pki: Pki) -> None:
    message = await failure(tls_source(mqtt_port, "a/b", ca_file=pki.ca))
    assert message.startswith(f"TLS handshake with MQTT broker {NAME} at 127.0.0.1:{mqtt_port} "
                              f"failed: ")
    assert message.endswith("does the port speak TLS (a plain MQTT listener? TLS is usually "
                            "on 8883)?")


async def test_plain_mqtt_against_a_tls_port(tmp_path: Path, pki: Pki) -> None:
    with tls_broker(tmp_path, pki) as broker:
        message = await failure(source(broker.port, [MqttAddress(topic="a/b")]))
    assert message.startswith(f"MQTT broker {NAME} at 127.0.0.1:{broker.port} closed the "
                              f"connection before answering the CONNECT: ")
    assert message.endswith("(if this port expects TLS, set tls on the connection)")


async def test_a_key_that_does_not_match_the_certificate(tmp_path: Path, pki: Pki) -> None:
    src = tls_source(1, "a/b", ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.server_key)
    message = await failure(src)
    assert message == (
        f"TLS settings of MQTT connection {NAME} are unusable: tls.cert_file "
        f"'{pki.client_cert}' and tls.key_file '{pki.server_key}': key values mismatch; check "
        f"that the key belongs to the certificate, both are PEM, and tls.key_password if the "
        f"key is encrypted")


async def test_an_encrypted_key_without_its_password(pki: Pki) -> None:
    src = tls_source(1, "a/b", ca_file=pki.ca, cert_file=pki.client_cert,
                     key_file=pki.client_key_encrypted)
    message = await failure(src)  # never a password prompt on the terminal
    assert message.startswith(f"TLS settings of MQTT connection {NAME} are unusable: "
                              f"tls.cert_file '{pki.client_cert}' and tls.key_file "
                              f"'{pki.client_key_encrypted}': ")


async def test_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    message = await failure(tls_source(1, "a/b", ca_file=junk))
    assert message.startswith(f"TLS settings of MQTT connection {NAME} are unusable: "
                              f"tls.ca_file '{junk}' cannot be read as PEM CA certificates: ")


@pytest.mark.parametrize(("tls", "match"), [
    ({"ca_file": "certs/ca.pem"}, "tls.ca_file\n  Value error, expected an absolute path"),
    ({"ca_file": "/nonexistent/ca.pem"}, "tls.ca_file\n  Value error, no such file"),
    ({"cert_file": "/tmp"}, "tls.cert_file\n  Value error, expected a file, found a directory"),
    ({"key_file": "{ca}"}, "tls.key_file needs tls.cert_file"),
    ({"key_password": "x"}, "tls.key_password needs tls.cert_file"),
    ({"min_version": "1.1"}, "Input should be '1.2' or '1.3'"),
])
def test_tls_files_are_checked_when_the_config_loads(pki: Pki, tls: dict[str, Any],
                                                     match: str) -> None:
    tls = {k: v.format(ca=pki.ca) for k, v in tls.items()}
    with pytest.raises(ValidationError, match=match):
        MqttConnectionConfig(protocol="mqtt", host="h", tls=tls)
