"""The catalog topic: the daemon publishes one record per event type (contract and JSON Schema)
at start and after a reload that changed it; read back from the Kafka-compatible broker."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from gateway.catalog import CatalogPublisher, catalog_subject
from gateway.mapping import load_mappings
from gateway.mapping.contracts import VIOLATION_TYPE
from gateway.settings import GatewaySettings
from gateway.sinks.kafka import CATALOG_TYPE
from tests.support import GatewayProcess, consume
from tests.test_provenance import COUNT_CONTRACT, contracted_counting_gateway

CONNECTIONS = {"plant_mqtt": "mqtt"}
COUNT = "test.CountChanged.v1"


def _settings(tmp_path: Path, mappings: Path) -> GatewaySettings:
    return GatewaySettings.model_validate({
        "gateway": {"id": "gw1"},
        "connections": {"plant_mqtt": {"protocol": "mqtt", "host": "127.0.0.1"}},
        "buffer": {"directory": str(tmp_path / "state")},
        "mappings": {"directory": str(mappings)},
    })


def test_the_publisher_sends_everything_first_then_only_what_changed(tmp_path: Path) -> None:
    _, mappings = contracted_counting_gateway(tmp_path, 1883, "127.0.0.1:9092", "p", ["m1", "m2"])
    publisher = CatalogPublisher(_settings(tmp_path, mappings))
    first = publisher.changes(load_mappings(mappings, CONNECTIONS), 1.7e9)
    assert {e.subject for e in first} == {catalog_subject("gw1", COUNT),
                                          catalog_subject("gw1", VIOLATION_TYPE)}
    entry = next(e for e in first if e.data["type"] == COUNT)
    assert entry.type == CATALOG_TYPE and entry.source == "/gateways/gw1"
    data = entry.data
    assert (data["status"], data["version"], data["owner"]) == ("active", "1.2", "test-team")
    assert data["subjects"] == ["acme/test/line1/m1", "acme/test/line1/m2"]
    assert data["topic"] == f"digispine.{COUNT}" and data["gateway_id"] == "gw1"
    assert data["data_schema"]["required"] == ["n"]
    assert data["expected_rate"] == "10/s" and data["asset_types"] == ["test_machine"]
    assert [m["file"] for m in data["mapping_files"]] == ["m1.yaml", "m2.yaml"]
    # nothing changed: nothing to publish; the ids depend on the content only
    assert publisher.changes(load_mappings(mappings, CONNECTIONS), 1.7e9 + 60) == []
    again = CatalogPublisher(_settings(tmp_path, mappings)).changes(
        load_mappings(mappings, CONNECTIONS), 1.7e9 + 120)
    assert {e.id for e in again} == {e.id for e in first}
    # a compatible contract change: that type only
    (mappings / "contracts" / f"{COUNT}.yaml").write_text(
        COUNT_CONTRACT.replace("minor: 2", "minor: 3") + "  # a comment\n")
    (changed,) = publisher.changes(load_mappings(mappings, CONNECTIONS), 1.7e9 + 180)
    assert changed.data["type"] == COUNT and changed.data["version"] == "1.3"
    # the type is gone: a last, withdrawn entry
    for m in ("m1", "m2"):
        path = mappings / f"{m}.yaml"
        path.write_text(path.read_text().replace(COUNT, "test.CountedAgain.v1"))
    gone = {e.data["type"]: e.data for e in publisher.changes(
        load_mappings(mappings, CONNECTIONS), 1.7e9 + 240)}
    assert gone[COUNT] == {"gateway_id": "gw1", "status": "withdrawn", "type": COUNT}
    assert gone["test.CountedAgain.v1"]["status"] == "active"


@pytest.mark.integration
async def test_the_daemon_publishes_its_catalog_at_start_and_after_a_reload(
        tmp_path: Path, mqtt_port: int, kafka_bootstrap: str, topic_prefix: str) -> None:
    config, mappings = contracted_counting_gateway(tmp_path, mqtt_port, kafka_bootstrap,
                                                   topic_prefix, ["m1"])
    topic = f"{topic_prefix}.catalog"
    config.write_text(config.read_text().replace(
        "kafka:\n", f"kafka:\n  catalog_topic: {topic}\n", 1))
    gw = GatewayProcess(config, tmp_path / "gw.log")
    try:
        gw.wait_sources_running()
        at_start = await consume(kafka_bootstrap, [topic], expect=2, quiet_s=1)
        (mappings / "contracts" / f"{COUNT}.yaml").write_text(COUNT_CONTRACT.replace(
            "minor: 2", "minor: 3").replace("  line: {type: string}\n",
                                            "  line: {type: string}\n  shift: {type: string}\n"))
        gw.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if '"catalog.published"' in gw.tail(100_000).split('"mappings.reloaded"', 1)[-1]:
                break
        after = await consume(kafka_bootstrap, [topic], expect=3, quiet_s=1)
    finally:
        assert gw.terminate() == 0, gw.tail()
    first = {r.key.decode(): json.loads(r.value) for r in at_start}
    key = f"gateways/test-gw/types/{COUNT}"
    assert set(first) == {key, f"gateways/test-gw/types/{VIOLATION_TYPE}"}
    entry = first[key]
    assert entry["version"] == "1.2" and entry["status"] == "active"
    assert entry["topic"] == f"{topic_prefix}.{COUNT}"
    assert entry["data_schema"]["properties"]["n"]["x-unit"] == "pcs"
    headers = {k: v.decode() for k, v in at_start[0].headers}
    assert headers["ce_type"] == CATALOG_TYPE and headers["ce_gatewayid"] == "test-gw"
    latest = [json.loads(r.value) for r in after if r.key.decode() == key][-1]
    assert latest["version"] == "1.3" and "shift" in latest["data_schema"]["properties"]
    assert len(after) == 3  # only the changed type was published again
