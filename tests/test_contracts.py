"""Event type contracts: loading, the static check at load, the runtime check, the catalog."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app.pipeline import Pipeline
from gateway.buffer.disk import BufferConfig, DiskBuffer
from gateway.errors import ConfigError
from gateway.mapping import Mapper, load_mappings
from gateway.mapping.contracts import VIOLATION_TYPE, load_contracts
from gateway.metrics import Metrics
from gateway.model import DomainEvent, Signal, decode_envelope
from gateway.sources.base import Delivery

CONNECTIONS = {"plant_mqtt": "mqtt"}

MAPPING = """\
version: 1
asset:
  subject: acme/p1/l1/m1
  attributes: {line: l1, size: 3}
signals:
  state: {connection: plant_mqtt, mqtt: {topic: m1/state}, type: string}
  t: {connection: plant_mqtt, mqtt: {topic: m1/t}, type: float}
events:
  changed:
    type: production.MachineStateChanged.v1
    trigger: {kind: on_change, signal: state}
    data:
      state: {signal: state}
      line: {attribute: line}
  temperature:
    type: process.TemperatureChanged.v1
    trigger: {kind: on_change, signal: t}
    data:
      temperature_c: {signal: t}
"""

STATE_CONTRACT = """\
version: 1
type: production.MachineStateChanged.v1
owner: production-team
description: A machine changed its operating state.
data:
  state: {type: string, required: true, enum: [Idle, Running]}
  line: {type: string}
additional_fields: forbid
"""


def _write(tmp_path: Path, mapping: str = MAPPING, **contracts: str) -> Path:
    directory = tmp_path / "m"
    (directory / "contracts").mkdir(parents=True)
    (directory / "m1.yaml").write_text(mapping)
    for name, text in contracts.items():
        (directory / "contracts" / f"{name}.yaml").write_text(text)
    return directory


def _errors(directory: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_mappings(directory, CONNECTIONS)
    return [str(f) for f in info.value.findings]


# --- loading -------------------------------------------------------------------------------


def test_a_contract_loads_and_gives_a_draft07_schema_of_the_data(tmp_path: Path):
    directory = _write(tmp_path, **{"production.MachineStateChanged.v1": STATE_CONTRACT})
    contracts, findings = load_contracts(directory / "contracts")
    assert findings == []
    contract = contracts["production.MachineStateChanged.v1"]
    assert (contract.domain, contract.name, contract.major) == ("production", "MachineStateChanged", 1)
    schema = contract.data_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["required"] == ["state"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["state"] == {"type": "string", "enum": ["Idle", "Running"]}
    files = load_mappings(directory, CONNECTIONS)
    assert set(files[0].contracts) == {"production.MachineStateChanged.v1"}
    assert set(Mapper(files, "gw").contracts) == {"production.MachineStateChanged.v1"}


def test_broken_contract_files_are_located_errors(tmp_path: Path):
    bad_field = STATE_CONTRACT.replace("line: {type: string}", "line: {type: text}")
    directory = _write(tmp_path, **{
        "production.MachineStateChanged.v1": bad_field,
        "process.TemperatureChanged.v1": "version: 1\ntype: process.temperatureChanged\ndata: {}\n",
        "wrong.Name.v1": "version: 1\ntype: process.TemperatureChanged.v1\n",
        "broken.Yaml.v1": "version: 1\ntype: [\n",
    })
    errors = _errors(directory)
    assert any("production.MachineStateChanged.v1.yaml:7:" in e and "data.line.type" in e
               for e in errors), errors
    assert any("process.TemperatureChanged.v1.yaml:2:" in e and "<domain>.<EventName>.v<major>" in e
               for e in errors), errors
    assert any("wrong.Name.v1.yaml:2:" in e and "named after its type" in e for e in errors), errors
    assert any("broken.Yaml.v1.yaml:" in e and "YAML syntax" in e for e in errors), errors


def test_the_loader_still_skips_the_contracts_subdirectory_as_mapping_files(tmp_path: Path):
    directory = _write(tmp_path, **{"production.MachineStateChanged.v1": STATE_CONTRACT})
    assert [f.path.name for f in load_mappings(directory, CONNECTIONS)] == ["m1.yaml"]


# --- static check at load ------------------------------------------------------------------


def test_a_required_field_the_event_does_not_produce_is_located_at_its_data(tmp_path: Path):
    mapping = MAPPING.replace("      state: {signal: state}\n", "      st: {signal: state}\n")
    contract = STATE_CONTRACT.replace("additional_fields: forbid", "additional_fields: allow")
    directory = _write(tmp_path, mapping, **{"production.MachineStateChanged.v1": contract})
    errors = _errors(directory)
    assert len(errors) == 1
    assert "m1.yaml:12:5 events.changed.data" in errors[0]
    assert "missing required field(s) state of contract production.MachineStateChanged.v1" in errors[0]


def test_an_undeclared_field_is_an_error_when_the_contract_forbids_additional_fields(tmp_path: Path):
    mapping = MAPPING.replace("      line: {attribute: line}\n",
                              "      line: {attribute: line}\n      size: {attribute: size}\n")
    directory = _write(tmp_path, mapping, **{"production.MachineStateChanged.v1": STATE_CONTRACT})
    errors = _errors(directory)
    assert len(errors) == 1
    assert "m1.yaml:15:7 events.changed.data.size" in errors[0]
    assert "not declared" in errors[0] and "declared: state, line" in errors[0]
    allowing = STATE_CONTRACT.replace("additional_fields: forbid", "additional_fields: allow")
    (directory / "contracts" / "production.MachineStateChanged.v1.yaml").write_text(allowing)
    assert load_mappings(directory, CONNECTIONS)[0].contracts


def test_a_source_of_the_wrong_type_is_located_and_integer_fits_number(tmp_path: Path):
    mapping = MAPPING.replace("line: {attribute: line}", "line: {attribute: size}")
    temperature = """\
version: 1
type: process.TemperatureChanged.v1
data:
  temperature_c: {type: integer, required: true}
"""
    directory = _write(tmp_path, mapping, **{
        "production.MachineStateChanged.v1": STATE_CONTRACT,
        "process.TemperatureChanged.v1": temperature,
    })
    errors = _errors(directory)
    assert len(errors) == 2, errors
    assert "m1.yaml:14:7 events.changed.data.line" in errors[0]
    assert "of type string" in errors[0] and "gives an integer" in errors[0]
    assert "m1.yaml:19:7 events.temperature.data.temperature_c" in errors[1]
    assert "of type integer" in errors[1] and "gives a number" in errors[1]
    # the other way round is fine: an integer attribute fits a number field
    fine = STATE_CONTRACT.replace("line: {type: string}", "line: {type: number}")
    (directory / "contracts" / "production.MachineStateChanged.v1.yaml").write_text(fine)
    (directory / "contracts" / "process.TemperatureChanged.v1.yaml").write_text(
        temperature.replace("integer", "number"))
    assert len(load_mappings(directory, CONNECTIONS)) == 1


def test_computed_fields_and_window_aggregates_are_typed_statically(tmp_path: Path):
    """{expr: ...} has the expression's type; a window's min/max/first/last the type of its
    signal, its mean a number, its count an integer."""
    mapping = MAPPING + """\
  stats:
    type: process.TemperatureStatistics.v1
    trigger: {kind: window, signal: t, every_s: 60}
    data:
      low: {trigger: min}
      mean: {trigger: mean}
      readings: {trigger: count}
      label: {expr: 't > 100.0'}
      fahrenheit: {expr: 't * 1.8 + 32.0'}
"""
    stats = """\
version: 1
type: process.TemperatureStatistics.v1
data:
  low: {type: integer}
  mean: {type: string}
  readings: {type: integer}
  label: {type: string}
  fahrenheit: {type: number}
"""
    directory = _write(tmp_path, mapping, **{"process.TemperatureStatistics.v1": stats})
    errors = _errors(directory)
    assert [e.split(" ", 2)[1].rstrip(":") for e in errors] == [
        "events.stats.data.low", "events.stats.data.mean", "events.stats.data.label"], errors
    assert "gives a number" in errors[0] and "gives a number" in errors[1]
    assert "gives a boolean" in errors[2]
    fixed = stats.replace("low: {type: integer}", "low: {type: number}").replace(
        "mean: {type: string}", "mean: {type: number}").replace(
        "label: {type: string}", "label: {type: boolean}")
    (directory / "contracts" / "process.TemperatureStatistics.v1.yaml").write_text(fixed)
    assert len(load_mappings(directory, CONNECTIONS)) == 1


# --- runtime check -------------------------------------------------------------------------


def test_violation_reasons():
    from gateway.mapping.contracts import Contract, ContractSpec, FieldContract

    contract = Contract(ContractSpec(version=1, type="a.B.v1", additional_fields="forbid", data={
        "n": FieldContract(type="number", required=True),
        "i": FieldContract(type="integer", nullable=True),
        "s": FieldContract(type="string", enum=["x"]),
    }))
    assert contract.violation({"n": 1, "i": None, "s": "x"}) is None
    assert contract.violation({"n": 1.5}) is None
    assert contract.violation({}) == "required field 'n' is missing"
    assert contract.violation({"n": None}) == "field 'n' is null, and it is not nullable"
    assert contract.violation({"n": True}) == "field 'n' must be of type number, got boolean (True)"
    assert contract.violation({"n": 1, "i": 1.0}) == "field 'i' must be of type integer, got number (1.0)"
    assert contract.violation({"n": 1, "s": "y"}) == "field 's' is 'y', not one of x"
    assert contract.violation({"n": 1, "z": 0}) == "undeclared field(s) z (additional_fields: forbid)"


async def test_a_violating_event_is_replaced_by_a_counted_dead_letter_event(tmp_path: Path):
    # The static check cannot see that "Broken" is not in the enum: the runtime check does.
    directory = _write(tmp_path, **{"production.MachineStateChanged.v1": STATE_CONTRACT})
    metrics = Metrics()
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), metrics)
    await buffer.open()
    pipeline = Pipeline(Mapper(load_mappings(directory, CONNECTIONS), "gw"), buffer, metrics)
    acked: list[int] = []
    task = asyncio.create_task(pipeline.run())
    try:
        await pipeline.emit(Delivery([Signal("plant_mqtt", "m1/state", "Idle", source_time=1.7e9)],
                                     lambda: acked.append(1)))
        await pipeline.emit(Delivery([Signal("plant_mqtt", "m1/state", "Broken", source_time=1.7e9 + 1)],
                                     lambda: acked.append(2)))
        for _ in range(100):
            if len(acked) == 2:
                break
            await asyncio.sleep(0.02)
        records = await buffer.read(0, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buffer.close()
    assert acked == [1, 2]
    events = [decode_envelope(r.body) for r in records]
    assert [e["type"] for e in events] == ["production.MachineStateChanged.v1", VIOLATION_TYPE]
    good, dead = events
    assert good["data"] == {"state": "Idle", "line": "l1"}
    assert dead["subject"] == good["subject"] == "acme/p1/l1/m1"
    assert dead["source"] == good["source"]
    assert dead["id"].endswith("-dlq")
    original_id = dead["id"].removesuffix("-dlq")
    assert original_id != good["id"]
    assert dead["data"] == {
        "reason": "field 'state' is 'Broken', not one of Idle, Running",
        "event_type": "production.MachineStateChanged.v1",
        "event_id": original_id,
        "data": {"state": "Broken", "line": "l1"},
    }
    assert metrics.value("contract_violations_total", type="production.MachineStateChanged.v1") == 1


def test_the_dead_letter_event_keeps_source_and_derives_its_id():
    from gateway.mapping.contracts import dead_letter

    event = DomainEvent(id="abc", source="/gateways/gw/connections/c", type="x.Y.v1",
                        subject="s/a", time=5.0, data={"v": 1})
    dead = dead_letter(event, "why")
    assert (dead.id, dead.source, dead.subject, dead.time, dead.type) == (
        "abc-dlq", "/gateways/gw/connections/c", "s/a", 5.0, VIOLATION_TYPE)
    assert dead_letter(event, "why") == dead  # deterministic


# --- catalog -------------------------------------------------------------------------------


def test_catalog_lists_every_event_type_with_topic_subjects_and_contract(tmp_path: Path):
    directory = _write(tmp_path, **{"production.MachineStateChanged.v1": STATE_CONTRACT})
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "gateway: {id: gw1, site: acme/p1}\n"
        "connections: {plant_mqtt: {protocol: mqtt, host: 127.0.0.1}}\n"
        "kafka: {bootstrap_servers: ['127.0.0.1:9092'], topic_template: 'ds.{domain}.{name}.{version}'}\n"
        f"buffer: {{directory: {tmp_path / 'state'}}}\n"
        f"mappings: {{directory: {directory}}}\n"
    )
    done = subprocess.run([sys.executable, "-m", "gateway", "catalog", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    catalog = {e["type"]: e for e in json.loads(done.stdout)}
    assert set(catalog) == {"production.MachineStateChanged.v1", "process.TemperatureChanged.v1",
                            VIOLATION_TYPE}
    state = catalog["production.MachineStateChanged.v1"]
    assert state["domain"] == "production" and state["name"] == "MachineStateChanged"
    assert state["major"] == 1
    assert state["subjects"] == ["acme/p1/l1/m1"]
    assert state["topic"] == "ds.production.MachineStateChanged.v1"
    assert state["owner"] == "production-team"
    assert state["data_schema"]["required"] == ["state"]
    temperature = catalog["process.TemperatureChanged.v1"]
    assert temperature["data_schema"] is None and temperature["owner"] is None
    dead = catalog[VIOLATION_TYPE]
    assert dead["topic"] == "ds.gateway.ContractViolation.v1"
    assert set(dead["data_schema"]["required"]) == {"reason", "event_type", "event_id", "data"}


def test_the_shipped_examples_have_contracts_for_their_main_event_types():
    done = subprocess.run([sys.executable, "-m", "gateway", "catalog"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    with_contract = {e["type"] for e in json.loads(done.stdout) if e["data_schema"] is not None}
    assert {"production.MachineStateChanged.v1", "production.PartsProduced.v1",
            "process.TemperatureChanged.v1", VIOLATION_TYPE} <= with_contract


async def test_a_reloaded_mapper_brings_its_new_contracts_to_the_running_pipeline(tmp_path: Path):
    """What ``Daemon.reload`` does: ``pipeline.mapper = Mapper(load_mappings(...))``."""
    directory = _write(tmp_path)  # no contract yet: anything goes
    metrics = Metrics()
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), metrics)
    await buffer.open()
    pipeline = Pipeline(Mapper(load_mappings(directory, CONNECTIONS), "gw"), buffer, metrics)
    try:
        await pipeline._process([Delivery([Signal("plant_mqtt", "m1/state", "Broken", source_time=1.7e9)])])
        (directory / "contracts" / "production.MachineStateChanged.v1.yaml").write_text(STATE_CONTRACT)
        pipeline.mapper = Mapper(load_mappings(directory, CONNECTIONS), "gw")
        await pipeline._process([Delivery([Signal("plant_mqtt", "m1/state", "Weird", source_time=1.7e9 + 1)])])
        records = await buffer.read(0, 10)
    finally:
        await buffer.close()
    types = [decode_envelope(r.body)["type"] for r in records]
    assert types == ["production.MachineStateChanged.v1", VIOLATION_TYPE]
    assert metrics.value("contract_violations_total", type="production.MachineStateChanged.v1") == 1


# --- the data product fields (docs/data-products.md) -------------------------------------------


def test_a_contract_has_a_minor_version_asset_types_a_rate_and_semantics(tmp_path: Path):
    text = STATE_CONTRACT.replace("owner: production-team\n", (
        "owner: production-team\nminor: 3\nasset_types: [press, cnc]\nexpected_rate: 2/min\n")
    ).replace("{type: string}", "{type: string, unit: m, semantics: 'urn:acme:line'}")
    directory = _write(tmp_path, **{"production.MachineStateChanged.v1": text})
    contracts, findings = load_contracts(directory / "contracts")
    assert findings == []
    contract = contracts["production.MachineStateChanged.v1"]
    assert (contract.major, contract.minor, contract.version) == (1, 3, "1.3")
    assert contract.spec.asset_types == ["press", "cnc"] and contract.spec.expected_rate == "2/min"
    schema = contract.data_schema()
    assert schema["x-contract-version"] == "1.3"
    assert schema["properties"]["line"]["x-unit"] == "m"
    assert schema["properties"]["line"]["x-semantics"] == "urn:acme:line"


def test_a_rate_that_is_not_number_per_unit_is_a_located_error(tmp_path: Path):
    text = STATE_CONTRACT.replace("owner: production-team\n",
                                  "owner: production-team\nexpected_rate: often\n")
    directory = _write(tmp_path, **{"production.MachineStateChanged.v1": text})
    _, findings = load_contracts(directory / "contracts")
    assert len(findings) == 1 and "expected_rate" in str(findings[0])


def test_every_shipped_mapping_event_type_emitted_by_several_files_shares_a_contract():
    from collections import Counter

    from gateway.settings import find_config, load_settings

    root = Path(__file__).parent.parent
    settings = load_settings(find_config(str(root / "config" / "gateway.yaml")))
    directory = Path(settings.mappings.directory)
    files = load_mappings(directory if directory.is_absolute() else root / directory,
                          {n: c.protocol for n, c in settings.connections.items()})
    files_per_type = Counter(t for f in files for t in {e.type for e in f.spec.events.values()})
    shared = {t for t, n in files_per_type.items() if n > 1}
    assert shared and all(t in f.contracts for f in files for t in shared
                          if t in {e.type for e in f.spec.events.values()})
