"""Settings: YAML + environment + credential files, located errors, generated reference docs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gateway import docgen, logs
from gateway.errors import ConfigError
from gateway.settings import load_settings

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
gateway:
  id: edge-01
connections:
  plant_mqtt:
    protocol: mqtt
    host: broker.local
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(__import__("os").environ):
        if name.upper().startswith("DIGISPINE_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_shipped_config_loads():
    """config/gateway.yaml is valid as shipped."""
    settings = load_settings(REPO / "config" / "gateway.yaml")
    assert settings.kafka.acks == "all"
    assert settings.mappings.directory == REPO / "mappings"


def test_defaults_and_relative_paths(tmp_path):
    """Unset sections take documented defaults; relative paths follow the file's directory."""
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.buffer.directory == tmp_path / "state"
    assert settings.mappings.directory == tmp_path / "mappings"
    assert settings.connections["plant_mqtt"].port == 1883


def test_environment_overrides_nested_keys(tmp_path, monkeypatch):
    """DIGISPINE_<SECTION>__<KEY> overrides the file, lists as JSON, connection keys included."""
    monkeypatch.setenv("DIGISPINE_KAFKA__BOOTSTRAP_SERVERS", '["k1:9092","k2:9092"]')
    monkeypatch.setenv("DIGISPINE_CONNECTIONS__PLANT_MQTT__PORT", "8883")
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.kafka.bootstrap_servers == ["k1:9092", "k2:9092"]
    assert settings.connections["plant_mqtt"].port == 8883
    assert settings.connections["plant_mqtt"].host == "broker.local"


def test_secret_from_systemd_credentials_directory(tmp_path, monkeypatch):
    """A credential file named like the variable sets a secret, which never prints."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "DIGISPINE_CONNECTIONS__PLANT_MQTT__PASSWORD").write_text("hunter2\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(write(tmp_path, MINIMAL))
    password = settings.connections["plant_mqtt"].password
    assert password is not None and password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


def test_environment_beats_credential_file(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "DIGISPINE_KAFKA__SASL_PASSWORD").write_text("from-file")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("DIGISPINE_KAFKA__SASL_PASSWORD", "from-env")
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.kafka.sasl_password.get_secret_value() == "from-env"


def test_every_error_is_reported_at_once_and_located(tmp_path):
    path = write(tmp_path, MINIMAL + "kafka:\n  acks: some\n  lingr_ms: 5\nbuffer:\n  max_bytes: -1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    lines = [str(f) for f in info.value.findings]
    assert lines == [
        f"{path}:8:9 kafka.acks: Input should be 'all', '1' or '0', got 'some'",
        f"{path}:9:3 kafka.lingr_ms: unknown key (check the spelling; see the schema for the allowed keys)",
        f"{path}:11:14 buffer.max_bytes: Input should be greater than or equal to 65536, got -1",
    ]


def test_missing_required_key_and_bad_protocol(tmp_path):
    path = write(tmp_path, "gateway: {}\nconnections:\n  x:\n    protocol: profibus\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert f"{path}:1:1 gateway.id: required key is missing" in text
    assert (f"{path}:4:15 connections.x.protocol: expected one of 'mqtt', 'opcua', 'modbus', got 'profibus'") in text


def test_environment_errors_name_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGISPINE_KAFKA__LINGER_MS", "soon")
    monkeypatch.setenv("DIGISPINE_KAFAK__ACKS", "all")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, MINIMAL))
    text = str(info.value)
    assert "environment DIGISPINE_KAFKA__LINGER_MS: Input should be a valid integer" in text
    assert "environment DIGISPINE_KAFAK__ACKS: unknown setting" in text


def test_yaml_syntax_and_duplicate_keys_are_located(tmp_path):
    dup = write(tmp_path, "gateway:\n  id: a\ngateway:\n  id: b\n")
    with pytest.raises(ConfigError) as info:
        load_settings(dup)
    assert str(info.value).startswith(f"{dup}:3:1") and "duplicate" in str(info.value)
    broken = write(tmp_path, "gateway:\n  id: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(broken)
    assert str(info.value).startswith(f"{broken}:3:") and "YAML syntax" in str(info.value)


def test_logs_mask_secret_fields():
    """Secret-looking keys never reach a log line, JSON or console."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logs.get("test", source="plant_mqtt").info("connect", password="hunter2", host="h")
    line = json.loads(out.getvalue())
    assert line["password"] == "**********"
    assert line["component"] == "test" and line["source"] == "plant_mqtt"
    assert "hunter2" not in out.getvalue()


def test_configuration_reference_matches_the_models():
    """docs/configuration.md is generated from the models: regenerate it after changing them
    (`python -m gateway.docgen > docs/configuration.md`)."""
    assert (REPO / "docs" / "configuration.md").read_text() == docgen.render()


def test_errors_inside_a_connection_point_at_the_file_line(tmp_path):
    """A connection is a tagged union (by protocol): its field errors are located in the file,
    under the connection's own path, not as an environment variable."""
    (tmp_path / "mappings").mkdir()
    config = tmp_path / "gw.yaml"
    config.write_text("gateway: {id: gw1}\nconnections:\n  plant_mqtt:\n    protocol: mqtt\n"
                      "    host: 127.0.0.1\n    port: 99999\n  cell:\n    protocol: opcua\n"
                      "    endpoint: opc.tcp://h:4840\n    publishing_interval_ms: 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    found = sorted(str(f) for f in info.value.findings)
    assert found[0].startswith(f"{config}:10:") and " connections.cell.publishing_interval_ms:" in found[0]
    assert found[1].startswith(f"{config}:6:") and " connections.plant_mqtt.port:" in found[1]
    assert "environment" not in " ".join(found)
