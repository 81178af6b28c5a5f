"""Secure defaults: validate warns (located) about secrets in the file, clear-text links to
other machines, a public health endpoint and readable keys; and a known secret never shows in
logs, the buffer, the state directory, the health/metrics output or the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.security import config_warnings, is_local
from gateway.settings import load_settings
from tests import support

pytestmark = pytest.mark.timeout(120)


def config(tmp_path: Path, body: str) -> Path:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    path = tmp_path / "gw.yaml"
    path.write_text(f"gateway: {{id: gw1}}\nmappings: {{directory: mappings}}\n"
                    f"buffer: {{directory: state}}\n{body}")
    return path


def test_is_local() -> None:
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1")
    assert is_local("[::1]") and is_local("127.8.9.10")
    assert not is_local("10.0.0.5") and not is_local("kafka1.central") and not is_local("")


def test_a_safe_local_config_has_no_warnings(tmp_path: Path) -> None:
    path = config(tmp_path, "kafka: {bootstrap_servers: ['127.0.0.1:9092']}\n"
                            "connections:\n  m: {protocol: mqtt, host: localhost}\n")
    assert config_warnings(load_settings(path), path) == []


def test_each_unsafe_setting_is_one_located_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = config(tmp_path, """\
kafka:
  bootstrap_servers: ["kafka1.central:9092"]
  security_protocol: SASL_PLAINTEXT
  sasl_mechanism: PLAIN
  sasl_username: edge
  sasl_password: hunter2
  allow_plaintext: true
connections:
  plant_mqtt:
    protocol: mqtt
    host: 10.1.2.3
    password: s3cret
    allow_plaintext: true
  cell:
    protocol: opcua
    endpoint: opc.tcp://10.1.2.4:4840
    security_policy: None
    allow_insecure: true
health: {listen: "0.0.0.0:8311"}
""")
    key = tmp_path / "state" / "pki" / "own" / "private" / "key.pem"
    key.parent.mkdir(parents=True)
    key.write_text("not really a key")
    key.chmod(0o644)
    found = [str(w) for w in config_warnings(load_settings(path), path)]
    text = "\n".join(found)
    assert f"{path}:9:3 kafka.sasl_password: a secret in the config file in clear: set it in " \
           f"the environment (DIGISPINE_KAFKA__SASL_PASSWORD)" in text
    assert f"{path}:15:5 connections.plant_mqtt.password: a secret" in text
    assert "Kafka at kafka1.central:9092 without TLS (SASL_PLAINTEXT): events and the SASL " \
           "password cross the network in clear; use SSL or SASL_SSL" in text
    assert "MQTT broker 10.1.2.3 without TLS: readings and the password cross" in text
    assert "connections.cell.security_policy: OPC UA without security" in text
    assert "health.listen: the health and metrics endpoint listens on 0.0.0.0:8311" in text
    assert f"{key} readable by other users (mode -rw-r--r--): chmod 600 {key}" in text
    assert len(found) == 7
    assert "hunter2" not in text and "s3cret" not in text
    # validate prints them and still passes
    (tmp_path / "more").mkdir()
    support.make_mappings(tmp_path / "more", "t", ["m1"])
    path.write_text(path.read_text().replace("directory: mappings", "directory: more/mappings"))
    assert main(["validate", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 7 and "hunter2" not in err


def test_clear_text_to_another_machine_is_refused_unless_allowed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "more").mkdir()
    mappings = support.make_mappings(tmp_path / "more", "t", ["m1"])
    path = tmp_path / "gw.yaml"
    path.write_text(f"""\
gateway: {{id: gw1}}
mappings: {{directory: {mappings}}}
buffer: {{directory: state}}
kafka:
  bootstrap_servers: ["kafka1.central:9092", "127.0.0.1:9092"]
connections:
  plant_mqtt: {{protocol: mqtt, host: broker.plant1.local}}
  local_mqtt: {{protocol: mqtt, host: 127.0.0.1}}
""")
    assert main(["validate", "--config", str(path)]) == 78
    err = capsys.readouterr().err
    assert (f"error: {path}:4:1 kafka.security_protocol: Kafka at kafka1.central:9092 without "
            f"TLS (PLAINTEXT) is refused: use SSL or SASL_SSL") in err
    assert (f"error: {path}:7:32 connections.plant_mqtt.host: MQTT broker broker.plant1.local "
            f"without TLS is refused") in err
    assert "local_mqtt" not in err and "2 errors" in err
    path.write_text(path.read_text().replace(
        '"127.0.0.1:9092"]', '"127.0.0.1:9092"]\n  security_protocol: SSL').replace(
        "host: broker.plant1.local}", "host: broker.plant1.local, tls: true}"))
    assert main(["validate", "--config", str(path)]) == 0


def test_a_secret_never_leaves_memory(tmp_path: Path, mqtt_port: int, kafka_bootstrap: str,
                                      topic_prefix: str) -> None:
    """The MQTT password comes from a credentials file; after a run with debug logs, nothing
    the gateway wrote or serves contains it."""
    canary = "canary-7f3a9c1e-do-not-leak"
    cfg, _ = support.counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    cfg.write_text(cfg.read_text().replace("    qos: 1\n", "    qos: 1\n    username: edge\n"))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "DIGISPINE_CONNECTIONS__PLANT_MQTT__PASSWORD").write_text(canary + "\n")
    (creds / "DIGISPINE_CONNECTIONS__PLANT_MQTT__PASSWORD").chmod(0o600)
    gw = support.GatewayProcess(cfg, tmp_path / "gw.log", env={"CREDENTIALS_DIRECTORY": str(creds)},
                                args=["--log-level", "debug"])
    try:
        gw.wait_sources_running()
        client = support.publisher(mqtt_port)
        support.publish(client, topic_prefix, "m1", range(20))
        client.loop_stop()
        gw.wait_for(lambda h: h["counters"].get("events_forwarded_total", 0) >= 20,
                    what="events forwarded")
        served = b""
        for endpoint in ("/healthz", "/readyz", "/metrics"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}{endpoint}",
                                            timeout=3) as r:
                    served += r.read()
            except urllib.error.HTTPError as exc:
                served += exc.read()
        cmdline = Path(f"/proc/{gw.proc.pid}/cmdline").read_bytes()
        assert gw.terminate() == 0
    finally:
        if gw.proc.poll() is None:
            gw.kill()
    assert canary.encode() not in served and b"events_forwarded_total" in served
    assert canary.encode() not in cmdline
    log = (tmp_path / "gw.log").read_bytes()
    assert b"config.loaded" in log and b"daemon.stopped" in log
    assert canary.encode() not in log
    state_files = [p for p in (tmp_path / "state").rglob("*") if p.is_file()]
    assert state_files
    for p in state_files:
        assert canary.encode() not in p.read_bytes(), p
    out = subprocess.run([sys.executable, "-m", "gateway", "validate", "--config", str(cfg)],
                         capture_output=True, env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)},
                         timeout=60)
    assert out.returncode == 0 and canary.encode() not in out.stdout + out.stderr
