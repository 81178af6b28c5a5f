"""Provenance: every event says where it came from (gateway, mapping file and its hash, contract
version, connection and address) and its per-gateway sequence, so a consumer can trace it back,
deduplicate it (by id) and detect gaps (by sequence)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.buffer.disk import BufferConfig, BufferedRecord, DiskBuffer
from gateway.mapping import Mapper, load_mappings
from gateway.mapping.contracts import VIOLATION_TYPE, dead_letter, load_contracts, mapping_hash
from gateway.metrics import Metrics
from gateway.model import Signal
from gateway.sinks.kafka import KafkaConfig, KafkaForwarder, binary_message
from tests.support import GatewayProcess, consume, counting_gateway, publish, publisher

ROOT = Path(__file__).parent.parent
CONNECTIONS = {"plant_mqtt": "mqtt"}
PROVENANCE = ("mappingfile", "mappingversion", "mappinghash", "contractversion",
              "sourceconnection", "sourceaddress")

COUNT_CONTRACT = """\
version: 1
type: test.CountChanged.v1
minor: 2
owner: test-team
description: The counter of a test machine changed.
asset_types: [test_machine]
expected_rate: 10/s
data:
  n: {type: integer, required: true, unit: pcs, description: "the counter"}
  line: {type: string}
additional_fields: forbid
"""

MAPPING = """\
version: 1
asset:
  subject: acme/p1/l1/m1
  attributes: {line: l1}
signals:
  state: {connection: plant_mqtt, mqtt: {topic: m1/state}, type: string}
  door: {connection: plant_mqtt, mqtt: {topic: m1/door}, type: boolean}
events:
  changed:
    type: test.StateChanged.v1
    trigger: {kind: on_change, signal: state}
    data:
      state: {signal: state}
  door_open_while_running:
    type: test.DoorOpenWhileRunning.v1
    trigger: {kind: condition, when: "door && state == 'Running'"}
    data:
      line: {attribute: line}
"""


def load_consumer_example() -> ModuleType:
    """``examples/consumer.py`` (not a package)."""
    spec = importlib.util.spec_from_file_location("example_consumer", ROOT / "examples" / "consumer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def headers_of(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def contracted_counting_gateway(tmp_path: Path, mqtt_port: int, kafka_bootstrap: str,
                                prefix: str, machines: list[str]) -> tuple[Path, Path]:
    """The counting gateway of tests/support.py with a contract for its event type."""
    config, mappings = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, prefix, machines)
    (mappings / "contracts").mkdir()
    (mappings / "contracts" / "test.CountChanged.v1.yaml").write_text(COUNT_CONTRACT)
    return config, mappings


def gateway_topics(prefix: str) -> list[str]:
    """Every topic the counting gateway writes (one sequence numbers them all)."""
    return [f"{prefix}.{t}" for t in ("test.CountChanged.v1", "gateway.CatalogEntry.v1",
                                      "gateway.Heartbeat.v1", "gateway.ConnectionStateChanged.v1")]


# --- the mapping engine ----------------------------------------------------------------------


def _mapper(tmp_path: Path, contract: str | None = None) -> Mapper:
    directory = tmp_path / "m"
    (directory / "contracts").mkdir(parents=True)
    (directory / "m1.yaml").write_text(MAPPING)
    if contract:
        (directory / "contracts" / "test.StateChanged.v1.yaml").write_text(contract)
    return Mapper(load_mappings(directory, CONNECTIONS), "gw1")


def test_mapped_events_carry_their_provenance(tmp_path: Path) -> None:
    mapper = _mapper(tmp_path, "version: 1\ntype: test.StateChanged.v1\nminor: 4\n"
                               "data: {state: {type: string}}\n")
    spec = mapper.files[0].spec
    first = mapper.map(Signal("plant_mqtt", "m1/state", "Idle", source_time=1.7e9))
    second = mapper.map(Signal("plant_mqtt", "m1/state", "Running", source_time=1.7e9 + 1))
    (a,), (b,) = first, second
    assert a.extensions == {
        "mappingfile": "m1.yaml", "mappingversion": "1", "mappinghash": mapping_hash(mapper.files[0].path, spec),
        "contractversion": "1.4", "sourceconnection": "plant_mqtt", "sourceaddress": "m1/state"}
    assert a.extensions is b.extensions  # computed once per event and address, shared
    envelope = a.envelope()
    assert list(envelope)[-7:] == [*PROVENANCE, "data"]  # after the standard attributes
    assert re.fullmatch(r"[0-9a-f]{16}", envelope["mappinghash"])


def test_a_file_revision_is_the_mappingversion(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "m1.yaml").write_text(MAPPING.replace("version: 1\n", "version: 1\n"
                                                       "revision: 2026-11-29.1\n", 1))
    mapper = Mapper(load_mappings(directory, CONNECTIONS), "gw1")
    (event,) = mapper.map(Signal("plant_mqtt", "m1/state", "Idle", source_time=1.7e9))
    assert event.extensions["mappingversion"] == "2026-11-29.1"


def test_a_condition_names_the_address_of_the_reading_that_fired_it(tmp_path: Path) -> None:
    mapper = _mapper(tmp_path)  # no contract: no contractversion
    kind = "test.DoorOpenWhileRunning.v1"

    def fired(tag: str, value: object, t: float) -> list[dict[str, str]]:
        events = mapper.map(Signal("plant_mqtt", tag, value, source_time=1.7e9 + t))
        return [e.extensions or {} for e in events if e.type == kind]

    assert fired("m1/state", "Idle", 0) == [] and fired("m1/door", True, 1) == []
    (by_state,) = fired("m1/state", "Running", 2)
    assert by_state["sourceaddress"] == "m1/state" and "contractversion" not in by_state
    assert fired("m1/door", False, 3) == []
    (by_door,) = fired("m1/door", True, 4)
    assert by_door["sourceaddress"] == "m1/door"


def test_the_mapping_hash_is_the_files_sha256(tmp_path: Path) -> None:
    import hashlib

    mapper = _mapper(tmp_path)
    path = mapper.files[0].path
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert mapper.mapping_hashes == {"m1.yaml": expected}
    (tmp_path / "m" / "m1.yaml").write_text("# a comment\n" + MAPPING)
    assert Mapper(load_mappings(tmp_path / "m", CONNECTIONS), "gw1").mapping_hashes["m1.yaml"] != expected


def test_a_contract_violation_dead_letter_keeps_the_provenance(tmp_path: Path) -> None:
    mapper = _mapper(tmp_path, "version: 1\ntype: test.StateChanged.v1\nminor: 4\n"
                               "data: {state: {type: string}}\n")
    (event,) = mapper.map(Signal("plant_mqtt", "m1/state", "Idle", source_time=1.7e9))
    letter = dead_letter(event, "broken")
    assert letter.type == VIOLATION_TYPE and letter.extensions is not None
    assert letter.extensions == {**(event.extensions or {}), "contractversion": "1.0"}


# --- the forwarder -----------------------------------------------------------------------------


def test_binary_records_carry_the_provenance_headers(tmp_path: Path) -> None:
    (event,) = _mapper(tmp_path).map(Signal("plant_mqtt", "m1/state", "Idle", source_time=1.7e9))
    value, headers = binary_message(event.encode())
    names = [h for h, _ in headers]
    assert names[-1] == "content-type"
    assert [n for n in names if n.removeprefix("ce_") in PROVENANCE] == [
        f"ce_{n}" for n in PROVENANCE if n != "contractversion"]
    assert json.loads(value) == {"state": "Idle"}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_the_forwarder_adds_gatewayid_and_sequence(tmp_path: Path, mode: str) -> None:
    (event,) = _mapper(tmp_path).map(Signal("plant_mqtt", "m1/state", "Idle", source_time=1.7e9))
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), Metrics())  # not opened
    body = event.encode()
    record = BufferedRecord(seq=4711, type=event.type, subject=event.subject, body=body)
    config = KafkaConfig(content_mode=mode)  # type: ignore[arg-type]
    plain = KafkaForwarder(config, buffer, "gw-7", Metrics())._message(record)
    stamped = KafkaForwarder(config, buffer, "gw-7", Metrics(), provenance=True)._message(record)
    assert isinstance(plain, tuple) and isinstance(stamped, tuple)
    if mode == "binary":
        headers = dict(stamped[3])
        assert headers["ce_gatewayid"] == b"gw-7"
        assert headers["ce_sequence"] == b"00000000000000004711"
        assert [h for h, _ in stamped[3]][-1] == "content-type"
        assert "ce_sequence" not in dict(plain[3])  # a bare forwarder sends the events as they are
    else:
        envelope = json.loads(stamped[2])
        assert envelope == {**json.loads(body), "gatewayid": "gw-7",
                            "sequence": "00000000000000004711"}
        assert plain[2] == body


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.integration
async def test_every_record_of_a_running_gateway_is_traceable_and_gapless(
        tmp_path: Path, mqtt_port: int, kafka_bootstrap: str, topic_prefix: str) -> None:
    config, mappings = contracted_counting_gateway(tmp_path, mqtt_port, kafka_bootstrap,
                                                   topic_prefix, ["m1", "m2"])
    files = {f.path.name: f for f in load_mappings(mappings, CONNECTIONS)}
    gw = GatewayProcess(config, tmp_path / "gw.log")
    try:
        gw.wait_sources_running()
        client = publisher(mqtt_port)
        publish(client, topic_prefix, "m1", range(1, 41))
        publish(client, topic_prefix, "m2", range(101, 131))
        client.loop_stop()
        records = await consume(kafka_bootstrap, gateway_topics(topic_prefix), expect=73,
                                quiet_s=2)
    finally:
        assert gw.terminate() == 0, gw.tail()
    data = [r for r in records if r.topic == f"{topic_prefix}.test.CountChanged.v1"]
    assert len(data) == 70
    version = next(iter(load_contracts(mappings / "contracts")[0].values())).version
    for r in data:
        h = headers_of(r)
        f = files[h["ce_mappingfile"]]
        assert {k.removeprefix("ce_") for k in h} >= {"gatewayid", "sequence", *PROVENANCE}
        assert h["ce_gatewayid"] == "test-gw"
        assert re.fullmatch(r"[0-9]{20}", h["ce_sequence"])
        assert h["ce_mappingversion"] == "1"
        assert h["ce_mappinghash"] == mapping_hash(f.path, f.spec)
        assert h["ce_contractversion"] == version == "1.2"
        assert h["ce_sourceconnection"] == "plant_mqtt"
        assert h["ce_sourceaddress"] == f.spec.signals["n"].address.tag
    # Every record the gateway sent (data, catalog, status) is numbered by one sequence:
    # no gap, no number twice, and within a key in order.
    consumer = load_consumer_example()
    checker = consumer.Checker()
    for r in records:
        assert checker.add(consumer.attributes(r.headers, r.value))
    assert checker.duplicates == 0 and checker.without_sequence == 0
    assert checker.gaps() == {}, sorted(checker.sequences["test-gw"])
    per_key: dict[bytes, list[int]] = {}
    for r in data:
        per_key.setdefault(r.key, []).append(int(headers_of(r)["ce_sequence"]))
    assert all(seqs == sorted(seqs) for seqs in per_key.values())

