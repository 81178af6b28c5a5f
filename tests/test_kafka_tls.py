"""Kafka over TLS: the forwarder delivers through an SSL listener it verifies against the
plant's CA (a TLS-terminating proxy in front of Tansu, advertised as the broker), and an
untrusted broker certificate is an outage with a clear reason, never a silent plaintext
fallback."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.helpers import create_ssl_context

from gateway.buffer.disk import BufferConfig, DiskBuffer
from gateway.metrics import Metrics
from gateway.model import DomainEvent
from gateway.sinks.kafka import KafkaConfig, KafkaForwarder
from tests import support
from tests.test_mqtt_tls import Pki, make_pki

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(support.real_kafka(), reason="needs the local Tansu behind TLS")]

TYPE = "test.Tls.v1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("kafka-tls"))


def server_context(pki: Pki, *, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client:
        ctx.load_verify_locations(pki.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
def tls_bootstrap(pki: Pki) -> Iterator[str]:
    with support.tansu_behind_tls(server_context(pki)) as bootstrap:
        yield bootstrap


def config(bootstrap: str, prefix: str, **kw: Any) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=[bootstrap], topic_template=f"{prefix}.{{type}}",
                       enable_idempotence=False, request_timeout_ms=5000, retry_min_s=0.1,
                       retry_max_s=0.5, **kw)


def events(n: int) -> list[DomainEvent]:
    return [DomainEvent(id=f"id-{i}", source="/gateways/gw1", type=TYPE,
                        subject="acme/p1/tls", time=1_700_000_000.0 + i, data={"n": i})
            for i in range(n)]


async def until(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def read_back(bootstrap: str, topic: str, cafile: Path, expect: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, security_protocol="SSL",
                                ssl_context=create_ssl_context(cafile=str(cafile)),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while len(out) < expect and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def test_events_go_out_over_tls_verified_against_the_plant_ca(
        tmp_path: Path, pki: Pki, tls_bootstrap: str) -> None:
    prefix = support.unique_topic_prefix()
    buf = DiskBuffer(BufferConfig(directory=tmp_path, sync="normal"), Metrics())
    await buf.open()
    await buf.append(events(50))
    fwd = KafkaForwarder(config(tls_bootstrap, prefix, security_protocol="SSL",
                                ssl_cafile=str(pki.ca)), buf, "gw1", Metrics())
    task = asyncio.create_task(fwd.run())
    try:
        await until(lambda: buf.pending_events == 0)
        assert fwd.connected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buf.close()
    records = await read_back(tls_bootstrap, f"{prefix}.{TYPE}", pki.ca, 50)
    assert [json.loads(r.value)["n"] for r in records] == list(range(50))


async def test_an_untrusted_broker_certificate_keeps_events_buffered(
        tmp_path: Path, pki: Pki, tls_bootstrap: str) -> None:
    buf = DiskBuffer(BufferConfig(directory=tmp_path, sync="normal"), Metrics())
    await buf.open()
    await buf.append(events(5))
    metrics = Metrics()
    fwd = KafkaForwarder(config(tls_bootstrap, support.unique_topic_prefix(),
                                security_protocol="SSL", ssl_cafile=str(pki.other_ca)),
                         buf, "gw1", metrics)
    task = asyncio.create_task(fwd.run())
    try:
        await until(lambda: metrics.total("kafka_send_errors_total") >= 1)
        await asyncio.sleep(1.0)
        assert not fwd.connected and buf.pending_events == 5
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buf.close()


async def test_mutual_tls_with_the_gateways_client_certificate(tmp_path: Path, pki: Pki) -> None:
    """A broker listener that requires a client certificate: the gateway presents its own
    (ssl_certfile/ssl_keyfile) and delivers; without one the link fails and events stay."""
    prefix = support.unique_topic_prefix()
    with support.tansu_behind_tls(server_context(pki, require_client=True)) as bootstrap:
        buf = DiskBuffer(BufferConfig(directory=tmp_path / "a", sync="normal"), Metrics())
        await buf.open()
        await buf.append(events(20))
        fwd = KafkaForwarder(config(bootstrap, prefix, security_protocol="SSL",
                                    ssl_cafile=str(pki.ca), ssl_certfile=str(pki.client_cert),
                                    ssl_keyfile=str(pki.client_key)), buf, "gw1", Metrics())
        task = asyncio.create_task(fwd.run())
        try:
            await until(lambda: buf.pending_events == 0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await buf.close()

        anonymous = DiskBuffer(BufferConfig(directory=tmp_path / "b", sync="normal"), Metrics())
        await anonymous.open()
        await anonymous.append(events(3))
        metrics = Metrics()
        fwd = KafkaForwarder(config(bootstrap, prefix, security_protocol="SSL",
                                    ssl_cafile=str(pki.ca)), anonymous, "gw1", metrics)
        task = asyncio.create_task(fwd.run())
        try:
            await until(lambda: metrics.total("kafka_send_errors_total") >= 1)
            assert anonymous.pending_events == 3 and not fwd.connected
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await anonymous.close()


def test_client_certificate_settings_are_checked_at_load(pki: Pki) -> None:
    with pytest.raises(ValueError, match=r"ssl_certfile /nowhere/cert\.pem does not exist"):
        KafkaConfig(security_protocol="SSL", ssl_certfile="/nowhere/cert.pem")
    with pytest.raises(ValueError, match="apply to security_protocol SSL or SASL_SSL"):
        KafkaConfig(ssl_cafile=str(pki.ca))
    with pytest.raises(ValueError, match="ssl_keyfile needs ssl_certfile"):
        KafkaConfig(security_protocol="SSL", ssl_keyfile=str(pki.client_key))
