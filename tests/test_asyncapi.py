"""``digispine-gateway catalog --format asyncapi``: an AsyncAPI 3.0.0 document, valid against the
official AsyncAPI JSON Schema, whose message schemas real emitted records satisfy.

``tests/data/asyncapi-3.0.0.schema.json`` is ``schemas/3.0.0-without-$id.json`` of the npm
package ``@asyncapi/specs`` 6.11.1 (the AsyncAPI Initiative's official schemas, Apache-2.0),
unchanged."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway.catalog import asyncapi_document
from gateway.mapping import load_mappings
from gateway.settings import find_config, load_settings
from tests.support import GatewayProcess, consume, publish, publisher
from tests.test_provenance import contracted_counting_gateway, gateway_topics

ROOT = Path(__file__).parent.parent
SCHEMA = json.loads((Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def errors(document: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in VALIDATOR.iter_errors(document)]


def shipped_document(content_mode: str = "binary") -> dict[str, Any]:
    settings = load_settings(find_config(str(ROOT / "config" / "gateway.yaml")))
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(
        update={"content_mode": content_mode})})
    protocols = {name: c.protocol for name, c in settings.connections.items()}
    files = load_mappings(ROOT / settings.mappings.directory
                          if not Path(settings.mappings.directory).is_absolute()
                          else Path(settings.mappings.directory), protocols)
    return asyncapi_document(settings, files)


def test_the_command_writes_a_valid_asyncapi_3_document(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    done = subprocess.run([sys.executable, "-m", "gateway", "catalog", "--format", "asyncapi",
                           "-o", str(out)], capture_output=True, text=True, timeout=60,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    assert document["asyncapi"] == "3.0.0"
    assert errors(document) == []
    channel = document["channels"]["digispine.production.MachineStateChanged.v1"]
    assert channel["address"] == "digispine.production.MachineStateChanged.v1"
    message = document["components"]["messages"]["production.MachineStateChanged.v1"]
    headers = message["headers"]["properties"]
    assert {"ce_id", "ce_source", "ce_type", "ce_subject", "ce_time", "ce_specversion",
            "ce_gatewayid", "ce_sequence", "ce_mappingfile", "ce_mappinghash",
            "ce_contractversion", "ce_sourceconnection", "ce_sourceaddress"} <= set(headers)
    assert headers["ce_type"]["const"] == "production.MachineStateChanged.v1"
    assert message["payload"]["required"] == ["state"]
    assert message["payload"]["properties"]["previous_state_duration_s"]["x-unit"] == "s"
    assert message["bindings"]["kafka"]["key"]["type"] == "string"
    operations = [op for op in document["operations"].values()
                  if op["channel"]["$ref"] == "#/channels/digispine.production.MachineStateChanged.v1"]
    assert [op["action"] for op in operations] == ["send"]
    assert "digispine.gateway.CatalogEntry.v1" in document["channels"]


def test_the_structured_mode_document_is_valid_too() -> None:
    document = shipped_document("structured")
    assert errors(document) == []
    message = document["components"]["messages"]["process.TemperatureChanged.v1"]
    assert message["contentType"] == "application/cloudevents+json"
    assert message["payload"]["properties"]["data"]["required"] == ["temperature_c"]
    assert {"gatewayid", "sequence", "mappinghash"} <= set(message["payload"]["required"])


def test_the_validator_does_reject_a_broken_document() -> None:
    document = shipped_document()
    broken = copy.deepcopy(document)
    next(iter(broken["operations"].values()))["action"] = "publish"  # AsyncAPI 2 wording
    assert errors(broken)
    broken = copy.deepcopy(document)
    del broken["info"]["version"]
    assert errors(broken)


def _validate(schema: dict[str, Any], instance: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    return [e.message for e in validator.iter_errors(instance)]


@pytest.mark.integration
async def test_emitted_records_satisfy_their_message_schemas(
        tmp_path: Path, mqtt_port: int, kafka_bootstrap: str, topic_prefix: str) -> None:
    config, _ = contracted_counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix,
                                            ["m1", "m2"])
    settings = load_settings(config)
    files = load_mappings(Path(settings.mappings.directory), {"plant_mqtt": "mqtt"})
    document = json.loads(json.dumps(asyncapi_document(settings, files)))
    assert errors(document) == []
    gw = GatewayProcess(config, tmp_path / "gw.log")
    try:
        gw.wait_sources_running()
        client = publisher(mqtt_port)
        publish(client, topic_prefix, "m1", range(1, 21))
        publish(client, topic_prefix, "m2", range(101, 111))
        client.loop_stop()
        records = await consume(kafka_bootstrap, gateway_topics(topic_prefix), expect=33,
                                quiet_s=2)
    finally:
        assert gw.terminate() == 0, gw.tail()
    messages = document["components"]["messages"]
    addresses = {c["address"]: c for c in document["channels"].values()}
    checked: dict[str, int] = {}
    for r in records:
        headers = {k: v.decode() for k, v in r.headers}
        event_type = headers["ce_type"]
        assert r.topic in addresses and event_type in addresses[r.topic]["messages"]
        message = messages[event_type]
        assert _validate(message["headers"], headers) == [], (event_type, headers)
        assert _validate(message["payload"], json.loads(r.value)) == [], (event_type, r.value)
        assert _validate(message["bindings"]["kafka"]["key"], r.key.decode()) == []
        checked[event_type] = checked.get(event_type, 0) + 1
    assert checked["test.CountChanged.v1"] == 30
    assert checked["gateway.CatalogEntry.v1"] >= 2  # the counting type and the dead letter
    # the schema does bite on real records
    count = messages["test.CountChanged.v1"]
    assert _validate(count["payload"], {"n": "7", "line": "line1"})
    assert _validate(count["headers"], {**headers, "ce_sequence": "12"})
