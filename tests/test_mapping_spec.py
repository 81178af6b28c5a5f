"""Mapping files: the format, the loader's located findings and its cross-reference lint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.mapping import MappingSpec, load_mappings
from gateway.mapping import loader as loader_module
from gateway.sources.mqtt import MqttAddress

MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
MQTT = {"plant_mqtt": "mqtt"}

# Line numbers matter: tests below assert exact file:line:col positions in this text.
MINIMAL = """\
version: 1
asset:
  subject: acme/plant1/test/line1/m1
  attributes: {line: line1}
signals:
  state:
    connection: plant_mqtt
    mqtt: {topic: acme/plant1/test/line1/m1/state, value_path: state}
    type: string
  temperature:
    connection: plant_mqtt
    mqtt: {topic: acme/plant1/test/line1/m1/telemetry, value_path: temperature_c}
    type: float
events:
  state_changed:
    type: production.MachineStateChanged.v1
    trigger:
      kind: on_change
      signal: state
    data:
      state: {signal: state}
      line: {attribute: line}
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def edited(old: str, new: str, text: str = MINIMAL) -> str:
    assert old in text, f"test setup: {old!r} not in the text"
    return text.replace(old, new, 1)


def findings(directory: Path, connections: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_mappings(directory, MQTT if connections is None else connections)
    return [str(f) for f in caught.value.findings]


# --- the shipped examples ----------------------------------------------------------------


def test_shipped_examples_load_without_findings() -> None:
    """The example files of mappings/ are valid against a config with one mqtt connection."""
    files = load_mappings(MAPPINGS, MQTT)
    assert [f.path.name for f in files] == ["oven01.yaml", "press07.yaml", "press08.yaml"]
    assert {f.subject for f in files} == {
        "acme/plant1/heattreat/line1/oven01",
        "acme/plant1/stamping/line2/press07",
        "acme/plant1/stamping/line2/press08",
    }


def test_shipped_examples_read_exactly_the_simulated_topics() -> None:
    """The examples subscribe to the topics and JSON keys the demo's simulator publishes."""
    topics: dict[str, set[str]] = {}
    for f in load_mappings(MAPPINGS, MQTT):
        for signal in f.spec.signals.values():
            assert f.spec.signals and signal.mqtt is not None and signal.mqtt.timestamp_path == "ts"
            topics.setdefault(signal.mqtt.topic, set()).add(signal.mqtt.value_path or "")
    presses = {
        f"acme/plant1/stamping/line2/{p}/{leaf}": keys
        for p in ("press07", "press08")
        for leaf, keys in (("state", {"state"}), ("telemetry", {"temperature_c", "part_counter"}))
    }
    assert topics == presses | {
        "acme/plant1/heattreat/line1/oven01/state": {"state"},
        "acme/plant1/heattreat/line1/oven01/telemetry": {"zone1_temperature_c"},
    }


def test_shipped_examples_emit_the_documented_event_types() -> None:
    """Presses emit three event types, the oven two, with the documented deadbands."""
    by_name = {f.path.stem: f.spec for f in load_mappings(MAPPINGS, MQTT)}
    press = by_name["press07"].events
    assert {e.type for e in press.values()} == {
        "production.MachineStateChanged.v1",
        "production.PartCounterChanged.v1",
        "process.TemperatureChanged.v1",
    }
    assert press["temperature_changed"].trigger.deadband is not None
    assert press["temperature_changed"].trigger.deadband.absolute == 2.0
    oven = by_name["oven01"].events
    assert oven["temperature_changed"].trigger.deadband is not None
    assert oven["temperature_changed"].trigger.deadband.absolute == 5.0
    assert list(press["machine_state_changed"].data) == [
        "state",
        "previous_state",
        "machine_type",
        "line",
    ]


def test_every_example_file_starts_with_the_schema_modeline() -> None:
    """Editors find the schema through the first line of every example."""
    for path in sorted(MAPPINGS.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=./mapping.schema.json", path


# --- located schema findings -------------------------------------------------------------


def test_wrong_type_value_is_located_at_the_value(tmp_path: Path) -> None:
    """A misspelt signal type points at the value, lists the choices and suggests the fix."""
    path = write(tmp_path, "m.yaml", edited("    type: float", "    type: flaot"))
    assert findings(tmp_path) == [
        (
            f"{path}:13:11 signals.temperature.type: expected one of string, float, integer, "
            f"boolean; got 'flaot' (did you mean 'float'?)"
        )
    ]


def test_unknown_key_is_located_at_the_key(tmp_path: Path) -> None:
    """A misspelt key is reported once, at the key, with a suggestion and the allowed keys."""
    path = write(tmp_path, "m.yaml", edited("    trigger:\n", "    triger:\n"))
    assert findings(tmp_path) == [
        (
            f"{path}:17:5 events.state_changed.triger: unknown key 'triger' (did you mean "
            f"'trigger'?); allowed here: type, dataschema, trigger, data"
        )
    ]


def test_unknown_key_inside_a_trigger_is_located_without_the_union_tag(tmp_path: Path) -> None:
    """pydantic's tagged-union tag (``on_change``) does not appear in the reported path."""
    path = write(
        tmp_path,
        "m.yaml",
        edited("      signal: state\n", "      signal: state\n      dedband: 1\n"),
    )
    assert findings(tmp_path) == [
        (
            f"{path}:20:7 events.state_changed.trigger.dedband: unknown key 'dedband' (did you mean "
            f"'deadband'?); allowed here: kind, signal, deadband, on_first_value"
        )
    ]


def test_bad_event_type_pattern_names_the_expected_form(tmp_path: Path) -> None:
    """An event type that is not <domain>.<EventName>.v<major> is refused with an example."""
    path = write(
        tmp_path, "m.yaml", edited("production.MachineStateChanged.v1", "MachineStateChanged")
    )
    assert findings(tmp_path) == [
        (
            f"{path}:16:11 events.state_changed.type: expected <domain>.<EventName>.v<major>, "
            f"e.g. production.MachineStateChanged.v1; got 'MachineStateChanged'"
        )
    ]


def test_duplicate_yaml_key_is_a_located_finding(tmp_path: Path) -> None:
    """A key given twice is an error at the second occurrence, not a silent overwrite."""
    path = write(
        tmp_path, "m.yaml", edited("    type: string\n", "    type: string\n    type: float\n")
    )
    (only,) = findings(tmp_path)
    assert only.startswith(f"{path}:10:5 YAML syntax:")
    assert 'duplicate key "type"' in only


def test_yaml_syntax_error_is_a_located_finding(tmp_path: Path) -> None:
    """Broken YAML is reported with its line and what the parser expected."""
    path = write(
        tmp_path, "m.yaml", edited("  attributes: {line: line1}", "  attributes: {line: line1")
    )
    (only,) = findings(tmp_path)
    assert only.startswith(f"{path}:5:")
    assert "YAML syntax" in only


def test_unknown_version_is_refused_clearly(tmp_path: Path) -> None:
    """A file of a future format version says which version this gateway reads."""
    path = write(tmp_path, "m.yaml", edited("version: 1", "version: 2"))
    assert findings(tmp_path) == [
        (
            f"{path}:1:10 version: unsupported mapping format version 2; this gateway reads "
            f"version 1 (is the file newer than the gateway?)"
        )
    ]


def test_signal_needs_exactly_one_address_block(tmp_path: Path) -> None:
    """A signal without a protocol block is refused at the signal."""
    write(
        tmp_path,
        "m.yaml",
        edited(
            "    mqtt: {topic: acme/plant1/test/line1/m1/telemetry, value_path: temperature_c}\n",
            "",
        ),
    )
    (only,) = findings(tmp_path)
    assert (
        ":10:3 signals.temperature: a signal needs exactly one address block (mqtt), found none"
        in only
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "      signal: state\n",
            "      signal: state\n      deadband: {}\n",
            "events.state_changed.trigger.deadband: a deadband has exactly one key: absolute or percent",
        ),
        (
            "      signal: state\n",
            "      signal: state\n      deadband: {absolute: 1, percent: 2}\n",
            "events.state_changed.trigger.deadband: a deadband has exactly one key: absolute or percent",
        ),
        (
            "{attribute: line}",
            "{attribute: line, const: 1}",
            (
                "events.state_changed.data.line: expected a mapping with exactly one of the keys signal, "
                "previous, attribute, const, quality (e.g. {signal: state}); found keys attribute, const"
            ),
        ),
        (
            "{attribute: line}",
            "line",
            (
                "events.state_changed.data.line: expected a mapping with exactly one of the keys signal, "
                "previous, attribute, const, quality (e.g. {signal: state}); got 'line'"
            ),
        ),
        (
            "    type: string\n",
            "    type: string\n    scale: 2.0\n",
            "signals.state.scale: scale applies to float and integer signals only, this signal is of type string",
        ),
        (
            "    type: float\n",
            "    type: integer\n    scale: 0.5\n",
            "signals.temperature.scale: scale of an integer signal must be a whole number, got 0.5",
        ),
        (
            "      kind: on_change",
            "      kind: edge",
            "events.state_changed.trigger: unknown kind 'edge'; expected one of on_change",
        ),
        (
            "{line: line1}",
            "{line: [1, 2]}",
            "asset.attributes.line: expected a string, number or boolean, found a list",
        ),
        (
            "acme/plant1/test/line1/m1\n",
            "/acme//m1\n",
            "asset.subject: expected a slash-separated asset path",
        ),
        (
            "  state:\n    connection",
            "  State:\n    connection",
            "signals.State: expected a lower-case snake_case name ([a-z][a-z0-9_]*); got 'State'",
        ),
    ],
)
def test_shape_rules_are_reported_with_their_reason(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    """Each "exactly one" and "only on" rule of the format is a located, explained finding."""
    write(tmp_path, "m.yaml", edited(old, new))
    assert any(expected in f for f in findings(tmp_path)), findings(tmp_path)


# --- cross-reference lint ----------------------------------------------------------------


def test_unknown_signal_reference_suggests_the_closest_name(tmp_path: Path) -> None:
    """A trigger naming a signal the file does not declare is located and gets a suggestion."""
    path = write(tmp_path, "m.yaml", edited("      signal: state", "      signal: stat"))
    assert findings(tmp_path) == [
        (
            f"{path}:19:15 events.state_changed.trigger.signal: unknown signal 'stat' (did you mean "
            f"'state'?); signals of this file: state, temperature"
        )
    ]


def test_unknown_signal_in_a_data_field_is_located(tmp_path: Path) -> None:
    """Data fields' signal, previous and quality references are checked like triggers."""
    write(
        tmp_path,
        "m.yaml",
        edited(
            "      state: {signal: state}",
            "      state: {previous: temprature}\n      q: {quality: nope}",
        ),
    )
    found = findings(tmp_path)
    assert any(
        ":21:" in f
        and "data.state.previous: unknown signal 'temprature' (did you mean 'temperature'?)" in f
        for f in found
    ), found
    assert any("data.q.quality: unknown signal 'nope'" in f for f in found), found


def test_unknown_attribute_is_reported_with_the_known_ones(tmp_path: Path) -> None:
    """An attribute reference must name one of asset.attributes."""
    write(tmp_path, "m.yaml", edited("{attribute: line}", "{attribute: lien}"))
    (only,) = findings(tmp_path)
    assert (
        "data.line.attribute: unknown attribute 'lien' (did you mean 'line'?); attributes of this asset: line"
        in only
    )


def test_unknown_connection_lists_the_known_ones(tmp_path: Path) -> None:
    """A connection the gateway config does not define is named, with the defined ones."""
    path = write(
        tmp_path, "m.yaml", edited("    connection: plant_mqtt\n", "    connection: plant_mqt\n")
    )
    assert findings(tmp_path, {"plant_mqtt": "mqtt", "hall_b": "mqtt"}) == [
        (
            f"{path}:7:17 signals.state.connection: unknown connection 'plant_mqt' (did you mean "
            f"'plant_mqtt'?); connections of the gateway config: hall_b, plant_mqtt"
        )
    ]


@pytest.mark.parametrize(("protocol", "title"), [("opcua", "OPC UA"), ("modbus", "Modbus")])
def test_connection_without_a_source_yet_is_refused(
    tmp_path: Path, protocol: str, title: str
) -> None:
    """Signals on OPC UA and Modbus connections are refused until those sources exist."""
    write(tmp_path, "m.yaml", MINIMAL)
    found = findings(tmp_path, {"plant_mqtt": protocol})
    assert len(found) == 2
    assert (
        f"signals.state.connection: connection 'plant_mqtt' uses {title}: {title} sources "
        f"arrive in a later release; only mqtt connections can be mapped in this version"
        in found[0]
    )


def test_address_block_must_match_the_connection_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a second protocol is readable, an mqtt block on its connection is refused."""
    monkeypatch.setattr(loader_module, "SUPPORTED_PROTOCOLS", frozenset({"mqtt", "opcua"}))
    write(tmp_path, "m.yaml", MINIMAL)
    found = findings(tmp_path, {"plant_mqtt": "opcua"})
    assert any(
        ":8:5 signals.state.mqtt: connection 'plant_mqtt' is a opcua connection but this "
        "signal has a 'mqtt' address block; use a 'opcua' block" in f
        for f in found
    ), found


def test_deadband_on_a_non_numeric_signal_is_refused(tmp_path: Path) -> None:
    """A deadband only makes sense for float and integer signals."""
    write(
        tmp_path,
        "m.yaml",
        edited("      signal: state\n", "      signal: state\n      deadband: {absolute: 1}\n"),
    )
    (only,) = findings(tmp_path)
    assert (
        ":20:7 events.state_changed.trigger.deadband: a deadband needs a numeric (float or "
        "integer) signal; 'state' is of type string" in only
    )


def test_references_are_checked_even_when_another_part_is_invalid(tmp_path: Path) -> None:
    """A schema error elsewhere in the file does not hide a broken reference."""
    text = edited(
        "    type: float", "    type: flaot", edited("{attribute: line}", "{attribute: lien}")
    )
    write(tmp_path, "m.yaml", text)
    found = findings(tmp_path)
    assert len(found) == 2
    assert "signals.temperature.type" in found[0] and "unknown attribute 'lien'" in found[1]


def test_same_subject_in_two_files_is_refused(tmp_path: Path) -> None:
    """One asset, one file: the second file claiming a subject points at the first."""
    first = write(tmp_path, "a.yaml", MINIMAL)
    second = write(tmp_path, "b.yaml", MINIMAL)
    assert findings(tmp_path) == [
        (
            f"{second}:3:12 asset.subject: subject 'acme/plant1/test/line1/m1' is already mapped by "
            f"{first}:3:12; one asset, one mapping file (merge the files or fix a subject)"
        )
    ]


def test_same_address_twice_in_one_file_is_allowed(tmp_path: Path) -> None:
    """Two signals of one file may read the same (connection, tag)."""
    text = edited(
        "    type: float\n",
        "    type: float\n  temperature_text:\n    connection: plant_mqtt\n"
        "    mqtt: {topic: acme/plant1/test/line1/m1/telemetry, value_path: temperature_c}\n"
        "    type: string\n",
    )
    write(tmp_path, "m.yaml", text)
    (file,) = load_mappings(tmp_path, MQTT)
    assert list(file.spec.signals) == ["state", "temperature", "temperature_text"]


def test_one_address_read_two_ways_is_refused(tmp_path: Path) -> None:
    """Two files reading one tag must agree on the address settings (the source reads it once)."""
    first = write(tmp_path, "a.yaml", MINIMAL)
    other = edited(
        "value_path: state}",
        "value_path: state, timestamp_path: ts}",
        edited("line1/m1\n", "line1/m2\n"),
    )
    second = write(tmp_path, "b.yaml", other)
    assert findings(tmp_path) == [
        (
            f"{second}:8:5 signals.state.mqtt: reads the same address as {first}:8:5 signals.state "
            f"with other settings (timestamp_path); an address is read one way: make them agree"
        )
    ]


# --- files and directories ---------------------------------------------------------------


def test_every_error_in_every_file_is_reported_at_once(tmp_path: Path) -> None:
    """Findings of all files arrive in one ConfigError, in file order, each file's in line order."""
    a = write(
        tmp_path,
        "a.yaml",
        edited("    type: float", "    type: flaot", edited("    trigger:\n", "    triger:\n")),
    )
    b = write(
        tmp_path,
        "b.yml",
        edited("line1/m1\n", "line1/m2\n", edited("connection: plant_mqtt", "connection: opc")),
    )
    c = write(tmp_path, "c.yaml", "version: 1\nasset: [oops\n")
    found = findings(tmp_path, {"plant_mqtt": "mqtt", "opc": "opcua"})
    assert [f.split(" ", 1)[0] for f in found] == [
        f"{a}:13:11",
        f"{a}:17:5",
        f"{b}:7:17",
        f"{c}:3:1",
    ]


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    """A mapping directory that does not exist is a finding naming it."""
    assert findings(tmp_path / "nope") == [
        f"{tmp_path / 'nope'} mapping directory does not exist (set mappings.directory in the gateway config)"
    ]


def test_directory_without_mapping_files_is_an_error(tmp_path: Path) -> None:
    """An empty directory (or one with only other files) would map nothing: refused."""
    write(tmp_path, "notes.txt", "hello")
    write(tmp_path, ".hidden.yaml", MINIMAL)
    assert findings(tmp_path) == [
        f"{tmp_path} no mapping files (*.yaml, *.yml) in this directory; the gateway would have nothing to map"
    ]


def test_dot_files_subdirectories_and_other_suffixes_are_skipped(tmp_path: Path) -> None:
    """Only *.yaml and *.yml files directly in the directory are read."""
    write(tmp_path, "m.yml", MINIMAL)
    write(tmp_path, ".m.yaml.swp.yaml", "not: [valid")
    write(tmp_path, "mapping.schema.json", "{}")
    write(tmp_path / "sub", "x.yaml", "not: [valid")
    assert [f.path.name for f in load_mappings(tmp_path, MQTT)] == ["m.yml"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "file is empty; expected a mapping file (version, asset, signals, events)"),
        (
            "# only a comment\n",
            "file is empty; expected a mapping file (version, asset, signals, events)",
        ),
        ("- 1\n- 2\n", "expected a mapping of version, asset, signals and events, found a list"),
        (
            "just text\n",
            "expected a mapping of version, asset, signals and events, found a str ('just text')",
        ),
    ],
)
def test_empty_or_non_mapping_file_is_an_error(tmp_path: Path, text: str, message: str) -> None:
    """A file must hold a mapping at its top level."""
    write(tmp_path, "m.yaml", text)
    (only,) = findings(tmp_path)
    assert only.endswith(message)


def test_examples_copied_elsewhere_still_load(tmp_path: Path) -> None:
    """Nothing in the examples depends on where the directory is."""
    for path in MAPPINGS.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    assert len(load_mappings(tmp_path, MQTT)) == 3


# --- the model itself --------------------------------------------------------------------


def test_json_schema_documents_every_field() -> None:
    """Every property of every model of the format has a description (editor tooltips)."""
    schema = MappingSpec.model_json_schema()
    models = {"MappingSpec": schema, **schema["$defs"]}
    for name, model in models.items():
        for key, prop in model.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{key} has no description"
    signal = schema["$defs"]["SignalSpec"]
    assert signal["oneOf"] == [{"required": ["mqtt"]}]
    assert signal["properties"]["mqtt"]["$ref"] == "#/$defs/MqttAddress"
    assert schema["properties"]["version"]["const"] == 1


def test_signal_spec_exposes_its_address_and_protocol() -> None:
    """The engine reads a signal's protocol and address block through one accessor."""
    spec = MappingSpec.model_validate(
        {
            "version": 1,
            "asset": {"subject": "a/b"},
            "signals": {
                "s": {"connection": "c", "type": "float", "mqtt": {"topic": "t", "value_path": "v"}}
            },
            "events": {"e": {"type": "a.B.v1", "trigger": {"kind": "on_change", "signal": "s"}}},
        }
    )
    signal = spec.signals["s"]
    assert signal.protocol == "mqtt"
    assert signal.address == MqttAddress(topic="t", value_path="v")
    assert signal.address.tag == "t#v"
    assert (signal.scale, signal.offset) == (1.0, 0.0)


def test_a_missing_section_does_not_cascade_into_reference_findings(tmp_path: Path) -> None:
    """Without a signals section, the references to signals are not reported one by one."""
    text = MINIMAL.split("signals:\n")[0] + "events:\n" + MINIMAL.split("events:\n")[1]
    path = write(tmp_path, "m.yaml", text)
    assert findings(tmp_path) == [f"{path}:1:1 signals: required key 'signals' is missing"]
