"""Mapping files: the format, the loader's located findings and its cross-reference lint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.mapping import MappingSpec, load_mappings, spec
from gateway.mapping import loader as loader_module
from gateway.mapping.cases import run_cases
from gateway.sources.mqtt import MqttAddress

MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
MQTT = {"plant_mqtt": "mqtt"}
SHIPPED = {"plant_mqtt": "mqtt", "machining_opcua": "opcua", "packaging_modbus": "modbus"}
"""The connections of config/gateway.yaml, which the example files read."""

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


SIMULATED = ("cell01", "oven01", "press07", "press08")
"""The example files whose machines the demo's MQTT simulator publishes."""


def test_shipped_examples_load_without_findings() -> None:
    """The example files of mappings/ are valid against a config with one mqtt connection."""
    files = load_mappings(MAPPINGS, SHIPPED)
    assert [f.path.name for f in files] == [
        "cell01.yaml",
        "cnc101.yaml",
        "cnc102.yaml",
        "leaktester01.yaml",
        "oven01.yaml",
        "pack01.yaml",
        "press07.yaml",
        "press08.yaml",
        "screwdriver01.yaml",
    ]
    assert {f.subject for f in files} == {
        "acme/plant1/assembly/line3/cell01",
        "acme/plant1/assembly/line4/leaktester01",
        "acme/plant1/assembly/line4/screwdriver01",
        "acme/plant1/heattreat/line1/oven01",
        "acme/plant1/machining/line1/cnc101",
        "acme/plant1/machining/line1/cnc102",
        "acme/plant1/packaging/line1/pack01",
        "acme/plant1/stamping/line2/press07",
        "acme/plant1/stamping/line2/press08",
    }


def test_shipped_examples_read_exactly_the_simulated_topics() -> None:
    """The examples of simulated machines subscribe to the topics and JSON keys the demo's
    simulator publishes."""
    topics: dict[str, set[str]] = {}
    for f in load_mappings(MAPPINGS, SHIPPED):
        if f.path.stem not in SIMULATED:
            continue
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
        "acme/plant1/assembly/line3/cell01/status": {
            "mode", "guard_door_open", "cycle_counter", "air_pressure_bar"},
    }


def test_every_example_is_fed_by_the_simulator() -> None:
    """Each example's machine is one the demo simulates, so the demo shows all of them."""
    from gateway.demo.simulator import DEFAULT_MACHINES

    subjects = {f.subject for f in load_mappings(MAPPINGS, SHIPPED)}
    assert subjects == {m.topic_prefix for m in DEFAULT_MACHINES} | {
        # the demo's OPC UA server and Modbus device (gateway/demo/opcua_server.py, modbus_device.py)
        "acme/plant1/machining/line1/cnc101",
        "acme/plant1/machining/line1/cnc102",
        "acme/plant1/packaging/line1/pack01",
        # the simulator's Sparkplug B edge node (gateway/demo/sparkplug_node.py)
        "acme/plant1/assembly/line4/screwdriver01",
        "acme/plant1/assembly/line4/leaktester01",
    }


def test_sparkplug_examples_read_exactly_the_metrics_the_demo_edge_node_publishes() -> None:
    """The Sparkplug examples name the group, edge node, devices and metrics of the demo's
    edge node."""
    from gateway.demo import sparkplug_node as node

    read: dict[str, set[str]] = {}
    for f in load_mappings(MAPPINGS, SHIPPED):
        for signal in f.spec.signals.values():
            address = signal.sparkplug
            if address is None:
                continue
            assert (signal.connection, address.group, address.edge_node) == (
                "plant_mqtt", node.GROUP, node.EDGE_NODE)
            assert address.device is not None
            read.setdefault(address.device, set()).add(address.metric)
    assert read == {node.SCREWDRIVER: set(node.Screwdriver.TYPES),
                    node.LEAK_TESTER: set(node.LeakTester.TYPES)}


def test_shipped_examples_emit_the_documented_event_types() -> None:
    """The examples' event types and trigger settings, as docs/mapping.md describes them."""
    by_name = {f.path.stem: f.spec for f in load_mappings(MAPPINGS, SHIPPED)}
    press = by_name["press07"].events
    assert {e.type for e in press.values()} == {
        "production.MachineStateChanged.v1",
        "production.RunEnded.v1",
        "maintenance.FaultCleared.v1",
        "production.PartsProduced.v1",
        "process.TemperatureChanged.v1",
    }
    temperature = press["temperature_changed"].trigger
    assert isinstance(temperature, spec.OnChangeTrigger) and temperature.deadband is not None
    assert temperature.deadband.absolute == 2.0
    parts = press["parts_produced"].trigger
    assert isinstance(parts, spec.CounterTrigger)
    assert (parts.rollover_at, parts.max_delta, parts.on_reset) == (4294967295, 1000, "ignore")
    assert list(press["machine_state_changed"].data) == [
        "state",
        "previous_state",
        "previous_state_duration_s",
        "machine_type",
        "line",
    ]
    assert "production.PartCounterChanged.v1" in {
        e.type for e in by_name["press08"].events.values()
    }
    oven = by_name["oven01"].events
    limit = oven["over_temperature"].trigger
    assert isinstance(limit, spec.ThresholdTrigger)
    assert (limit.above, limit.hysteresis) == (860.0, 5.0)


def test_shipped_examples_use_every_trigger_kind_and_enum_form() -> None:
    """Together the examples show every trigger kind (on_change, transition, edge, counter,
    threshold, quality, periodic, window, condition) and both enum forms (a list of states, a mapping of
    codes)."""
    files = load_mappings(MAPPINGS, SHIPPED)
    kinds = {e.trigger.kind for f in files for e in f.spec.events.values()}
    assert kinds == set(spec.TRIGGER_KINDS)
    enums = [s.enum for f in files for s in f.spec.signals.values() if s.enum is not None]
    assert any(isinstance(e, list) for e in enums) and any(isinstance(e, dict) for e in enums)


def test_shipped_examples_inline_cases_pass() -> None:
    """Every example file has test cases, and they all pass."""
    files = load_mappings(MAPPINGS, SHIPPED)
    assert all(f.spec.tests for f in files)
    results = run_cases(files)
    assert len(results) == sum(len(f.spec.tests) for f in files)
    assert [r for r in results if not r.passed] == []


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
            f"'trigger'?); allowed here: type, dataschema, trigger, when, data"
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
        ":10:3 signals.temperature: a signal needs exactly one address block (mqtt, opcua, modbus, sparkplug), "
        "found none"
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
                "previous, attribute, const, quality, trigger, expr (e.g. {signal: state}); found keys "
                "attribute, const"
            ),
        ),
        (
            "{attribute: line}",
            "line",
            (
                "events.state_changed.data.line: expected a mapping with exactly one of the keys signal, "
                "previous, attribute, const, quality, trigger, expr (e.g. {signal: state}); got 'line'"
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
            "      kind: on_chnage",
            "events.state_changed.trigger: unknown kind 'on_chnage'; expected one of on_change, "
            "transition, edge, counter, threshold, quality, periodic, window, condition "
            "(did you mean 'on_change'?)",
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


# --- enums and the new trigger kinds: located findings ------------------------------------

TRIGGER = "      kind: on_change\n      signal: state\n"
"""The trigger block of MINIMAL (lines 18-19), replaced by the tests below."""


def with_trigger(block: str, text: str = MINIMAL) -> str:
    """MINIMAL with its trigger block (``kind`` on line 18) replaced by ``block``."""
    return edited(TRIGGER, block, text)


ENUM_STATE = edited("    type: string\n", "    type: string\n    enum: [Idle, Running, Fault]\n")
"""MINIMAL with named states: the events section moves down one line (kind on line 19)."""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "    type: float\n",
            "    type: float\n    enum: [a, b]\n",
            ":14:11 signals.temperature.enum: enum applies to integer signals (codes -> labels) "
            "and string signals, this signal is of type float",
        ),
        (
            "    type: float\n",
            "    type: integer\n    enum: [a, b]\n",
            ":14:11 signals.temperature.enum: an integer signal's enum maps codes to labels, "
            "e.g. {0: Idle, 1: Running}; a list of states applies to string signals",
        ),
        (
            "    type: float\n",
            "    type: integer\n    enum: {0: Idle, x: Running}\n",
            ":14:5 signals.temperature.enum: enum code 'x' is not a whole number; the codes of an "
            "integer signal are whole numbers (declare the signal as string to map text codes)",
        ),
        (
            "    type: float\n",
            "    type: integer\n    enum: {1: Idle, '01': Running}\n",
            ":14:5 signals.temperature.enum: enum code 1 is given twice",
        ),
        (
            "    type: string\n",
            "    type: string\n    enum: [Idle, Running, Idle]\n",
            ":10:11 signals.state.enum: enum states are listed once each; repeated: Idle",
        ),
        (
            "    type: string\n",
            "    type: string\n    enum: []\n",
            ":10:11 signals.state.enum: an enum needs at least one state",
        ),
        (
            "    type: string\n",
            "    type: string\n    enum: Idle\n",
            ":10:11 signals.state.enum: expected a mapping of codes to labels ({0: Idle, "
            "1: Running}) or a list of states ([Idle, Running]), found str",
        ),
        (
            "    type: string\n",
            "    type: string\n    enum: {I: ''}\n",
            ":10:5 signals.state.enum: the label of code 'I' must be a non-empty string, got ''",
        ),
    ],
)
def test_enum_rules_are_located_at_the_enum(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    """enum fits the signal type: code mappings on integer and string signals, lists of
    states on string signals, labels non-empty, nothing twice."""
    path = write(tmp_path, "m.yaml", edited(old, new))
    assert findings(tmp_path) == [f"{path}{expected}"]


def test_integer_enum_codes_are_numbers_whatever_yaml_made_of_them() -> None:
    """YAML keys arrive as text; an integer signal's codes become whole numbers, a string
    signal's stay text (so 0: Idle matches the string "0")."""
    address = {"connection": "c", "mqtt": {"topic": "t"}}
    ints = spec.SignalSpec.model_validate(
        {**address, "type": "integer", "enum": {"0": "A", 1: "B"}}
    )
    text = spec.SignalSpec.model_validate({**address, "type": "string", "enum": {0: "A"}})
    assert (ints.enum, text.enum) == ({0: "A", 1: "B"}, {"0": "A"})
    assert spec.enum_states(ints) == ["A", "B"]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            "      kind: transition\n      signal: temperature\n",
            ":19:15 events.state_changed.trigger.signal: a transition trigger needs a signal with "
            "named states (a string signal, or an integer signal with an enum); 'temperature' is "
            "of type float (for a number crossing a limit use kind: threshold)",
        ),
        (
            "      kind: edge\n      signal: state\n      edge: rising\n",
            ":19:15 events.state_changed.trigger.signal: an edge trigger needs a boolean signal; "
            "'state' is of type string (for named states use kind: transition)",
        ),
        (
            "      kind: edge\n      signal: temperature\n      edge: rising\n",
            ":19:15 events.state_changed.trigger.signal: an edge trigger needs a boolean signal; "
            "'temperature' is of type float (for a number crossing a limit use kind: threshold)",
        ),
        (
            "      kind: counter\n      signal: temperature\n",
            ":19:15 events.state_changed.trigger.signal: a counter trigger needs an integer "
            "signal; 'temperature' is of type float",
        ),
        (
            "      kind: threshold\n      signal: state\n      above: 1\n",
            ":19:15 events.state_changed.trigger.signal: a threshold trigger needs a numeric "
            "(float or integer) signal; 'state' is of type string",
        ),
    ],
)
def test_a_trigger_on_a_signal_of_the_wrong_type_is_located_at_its_signal(
    tmp_path: Path, block: str, expected: str
) -> None:
    """Each trigger kind names the signal types it works on, and suggests the right kind."""
    path = write(tmp_path, "m.yaml", with_trigger(block))
    assert findings(tmp_path) == [f"{path}{expected}"]


def test_transition_on_an_integer_signal_needs_enum_codes(tmp_path: Path) -> None:
    """Raw integer codes are no state names: the finding says how to give them names."""
    text = with_trigger(
        "      kind: transition\n      signal: temperature\n",
        edited("    type: float\n", "    type: integer\n"),
    )
    write(tmp_path, "m.yaml", text)
    (only,) = findings(tmp_path)
    assert only.endswith(
        "'temperature' is of type integer (give it an enum mapping codes to state names, "
        "e.g. {0: Idle, 1: Running})"
    )


def test_counter_and_threshold_refuse_an_enum_signal(tmp_path: Path) -> None:
    """An integer signal with enum codes has labels as values: no counting, no limits."""
    text = edited(
        "    type: float\n",
        "    type: integer\n    enum: {0: Idle, 1: Running}\n",
        MINIMAL
        + (
            "  counted:\n"
            "    type: production.X.v1\n"
            "    trigger: {kind: counter, signal: temperature}\n"
            "  limited:\n"
            "    type: production.Y.v1\n"
            "    trigger: {kind: threshold, signal: temperature, below: 1}\n"
            "  banded:\n"
            "    type: production.Z.v1\n"
            "    trigger: {kind: on_change, signal: temperature, deadband: {absolute: 1}}\n"
        ),
    )
    path = write(tmp_path, "m.yaml", text)
    labels = "'temperature' is an integer signal with an enum (its values are the labels)"
    assert findings(tmp_path) == [
        f"{path}:26:38 events.counted.trigger.signal: a counter trigger needs an integer "
        f"signal; {labels}",
        f"{path}:29:40 events.limited.trigger.signal: a threshold trigger needs a numeric "
        f"(float or integer) signal; {labels}",
        f"{path}:32:53 events.banded.trigger.deadband: a deadband needs a numeric (float or "
        f"integer) signal; {labels}",
    ]


def test_from_and_to_states_are_checked_against_the_enum(tmp_path: Path) -> None:
    """Each unknown state is located at its list item, with a suggestion and the states."""
    block = "      kind: transition\n      signal: state\n      from: [Idle, Runing]\n      to: [Falt]\n"
    path = write(tmp_path, "m.yaml", with_trigger(block, ENUM_STATE))
    states = "states of signal 'state' (its enum): Idle, Running, Fault"
    assert findings(tmp_path) == [
        f"{path}:21:20 events.state_changed.trigger.from[1]: unknown state 'Runing' (did you "
        f"mean 'Running'?); {states}",
        f"{path}:22:12 events.state_changed.trigger.to[0]: unknown state 'Falt' (did you mean "
        f"'Fault'?); {states}",
    ]


def test_from_and_to_are_free_on_a_string_signal_without_enum(tmp_path: Path) -> None:
    """Without an enum the states are whatever arrives: nothing to check them against."""
    write(
        tmp_path,
        "m.yaml",
        with_trigger("      kind: transition\n      signal: state\n      to: [Anything]\n"),
    )
    (file,) = load_mappings(tmp_path, MQTT)
    trigger = file.spec.events["state_changed"].trigger
    assert isinstance(trigger, spec.TransitionTrigger) and trigger.to == ["Anything"]


def test_unknown_key_in_a_transition_lists_from_by_its_yaml_name(tmp_path: Path) -> None:
    """``from`` is a Python keyword (the model field is ``from_``); users only see ``from``."""
    block = "      kind: transition\n      signal: state\n      form: [Idle]\n"
    path = write(tmp_path, "m.yaml", with_trigger(block))
    assert findings(tmp_path) == [
        f"{path}:20:7 events.state_changed.trigger.form: unknown key 'form' (did you mean "
        f"'from'?); allowed here: kind, signal, from, to, on_first_value"
    ]


def test_an_error_inside_an_edge_trigger_is_located_at_its_own_key(tmp_path: Path) -> None:
    """The union tag ``edge`` is also a key of edge triggers; the finding still points at the
    key in error, not at ``edge``."""
    block = "      kind: edge\n      signal: state\n      edge: rising\n      min_duration_ms: -5\n"
    path = write(tmp_path, "m.yaml", with_trigger(block))
    assert findings(tmp_path)[0] == (
        f"{path}:21:24 events.state_changed.trigger.min_duration_ms: Input should be greater "
        f"than 0, got -5"
    )


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            "      kind: edge\n      signal: state\n",
            ":17:5 events.state_changed.trigger.edge: required key 'edge' is missing",
        ),
        (
            "      kind: edge\n      signal: state\n      edge: rise\n",
            ":20:13 events.state_changed.trigger.edge: expected one of rising, falling, both; "
            "got 'rise' (did you mean 'rising'?)",
        ),
        (
            "      kind: counter\n      signal: state\n      rollover_at: 65535\n",
            ":17:5 events.state_changed.trigger: rollover_at needs max_delta: a decrease is a "
            "rollover only when the counter advanced at most max_delta through the wrap, "
            "otherwise it is a reset",
        ),
        (
            "      kind: counter\n      signal: state\n      rollover_at: 100\n      max_delta: 101\n",
            ":17:5 events.state_changed.trigger: max_delta (101) is larger than the counter's "
            "range (rollover_at 100)",
        ),
        (
            "      kind: counter\n      signal: state\n      on_reset: zero\n",
            ":20:17 events.state_changed.trigger.on_reset: expected one of ignore, "
            "count_from_zero; got 'zero'",
        ),
        (
            "      kind: threshold\n      signal: state\n      above: 1\n      below: 2\n",
            ":17:5 events.state_changed.trigger: a threshold has exactly one limit: above or below",
        ),
        (
            "      kind: threshold\n      signal: state\n",
            ":17:5 events.state_changed.trigger: a threshold has exactly one limit: above or below",
        ),
        (
            "      kind: threshold\n      signal: state\n      above: 1\n      hysteresis: -1\n",
            ":21:19 events.state_changed.trigger.hysteresis: Input should be greater than or "
            "equal to 0, got -1",
        ),
        (
            "      kind: threshold\n      signal: state\n      above: 1\n      crossings: [entre]\n",
            ":21:19 events.state_changed.trigger.crossings[0]: expected one of enter, leave; "
            "got 'entre' (did you mean 'enter'?)",
        ),
        (
            "      kind: transition\n      signal: state\n      from: []\n",
            ":20:13 events.state_changed.trigger.from: List should have at least 1 item",
        ),
    ],
)
def test_trigger_shape_rules_are_located_findings(
    tmp_path: Path, block: str, expected: str
) -> None:
    """The "exactly one", "needs" and value rules of the new trigger kinds."""
    path = write(tmp_path, "m.yaml", with_trigger(block))
    found = findings(tmp_path)
    assert any(f.startswith(f"{path}{expected}") for f in found), found


@pytest.mark.parametrize(
    ("block", "attribute", "expected"),
    [
        (
            TRIGGER,
            "delta",
            "'delta' is an attribute of counter triggers; this event's trigger is on_change, "
            "which offers none (use {signal: ...} or {previous: ...})",
        ),
        (
            "      kind: transition\n      signal: state\n",
            "crossing",
            "'crossing' is an attribute of threshold triggers; this event's trigger is "
            "transition, which offers state_duration_s",
        ),
        (
            "      kind: counter\n      signal: temperature\n",
            "state_duration_s",
            "'state_duration_s' is an attribute of transition, edge, threshold, quality and condition "
            "triggers; "
            "this event's trigger is counter, which offers delta",
        ),
    ],
)
def test_trigger_attribute_must_be_offered_by_the_events_trigger(
    tmp_path: Path, block: str, attribute: str, expected: str
) -> None:
    """{trigger: x} reads a value the event's own trigger computes; others are located."""
    text = with_trigger(
        block,
        edited(
            "    type: float\n",
            "    type: integer\n",
            edited(
                "      line: {attribute: line}\n",
                f"      line: {{attribute: line}}\n      extra: {{trigger: {attribute}}}\n",
            ),
        ),
    )
    path = write(tmp_path, "m.yaml", text)
    assert findings(tmp_path) == [
        f"{path}:23:24 events.state_changed.data.extra.trigger: {expected}"
    ]


def test_misspelt_trigger_attribute_gets_a_suggestion(tmp_path: Path) -> None:
    """A typo is located, with the closest attribute of the event's own trigger kind."""
    text = with_trigger(
        "      kind: counter\n      signal: temperature\n",
        edited(
            "    type: float\n",
            "    type: integer\n",
            edited(
                "      line: {attribute: line}\n",
                "      line: {attribute: line}\n      extra: {trigger: delt}\n",
            ),
        ),
    )
    path = write(tmp_path, "m.yaml", text)
    assert findings(tmp_path) == [
        f"{path}:23:24 events.state_changed.data.extra.trigger: unknown trigger attribute "
        f"'delt' (did you mean 'delta'?); this event's trigger is counter, which offers delta"
    ]


@pytest.mark.parametrize(
    ("block", "attribute", "expected"),
    [
        (
            "      kind: window\n      signal: temperature\n      every_s: 60\n",
            "delta",
            "'delta' is an attribute of counter triggers; this event's trigger is window, "
            "which offers count, min, max, mean, first, last, window_start",
        ),
        (
            "      kind: window\n      signal: temperature\n      every_s: 60\n",
            "mena",
            "unknown trigger attribute 'mena' (did you mean 'mean'?); this event's trigger is "
            "window, which offers count, min, max, mean, first, last, window_start",
        ),
        (
            "      kind: quality\n      signal: temperature\n      stale_after_s: 30\n",
            "mean",
            "'mean' is an attribute of window triggers; this event's trigger is quality, which "
            "offers quality, previous_quality, reason, state_duration_s",
        ),
        (
            "      kind: quality\n      signal: temperature\n      stale_after_s: 30\n",
            "reson",
            "unknown trigger attribute 'reson' (did you mean 'reason'?); this event's trigger "
            "is quality, which offers quality, previous_quality, reason, state_duration_s",
        ),
        (
            "      kind: periodic\n      every_s: 60\n      # (no signal)\n",
            "count",
            "'count' is an attribute of window triggers; this event's trigger is periodic, "
            "which offers none (use {signal: ...} or {previous: ...})",
        ),
    ],
)
def test_the_new_kinds_offer_their_own_trigger_attributes(
    tmp_path: Path, block: str, attribute: str, expected: str
) -> None:
    """Quality and window triggers offer their attributes; periodic offers none; a typo
    gets the closest attribute of the event's own kind."""
    text = with_trigger(
        block,
        edited(
            "      line: {attribute: line}\n",
            f"      line: {{attribute: line}}\n      extra: {{trigger: {attribute}}}\n",
        ),
    )
    path = write(tmp_path, "m.yaml", text)
    assert findings(tmp_path) == [
        f"{path}:24:24 events.state_changed.data.extra.trigger: {expected}"
    ]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            "      kind: window\n      signal: state\n      every_s: 60\n",
            ":19:15 events.state_changed.trigger.signal: a window trigger aggregates numbers: it "
            "needs a numeric (float or integer) signal; 'state' is of type string (for named "
            "states use kind: transition)",
        ),
        (
            "      kind: window\n      signal: temperature\n      every_s: 0.5\n",
            ":20:16 events.state_changed.trigger.every_s: expected at least 1 (second): the "
            "gateway checks the time about once per second; got 0.5",
        ),
        (
            "      kind: window\n      signal: temperature\n",
            ":17:5 events.state_changed.trigger.every_s: required key 'every_s' is missing",
        ),
        (
            "      kind: window\n      signal: temperature\n      every_s: 60\n"
            "      grace_s: -1\n",
            ":21:16 events.state_changed.trigger.grace_s: Input should be greater than or equal "
            "to 0, got -1",
        ),
        (
            "      kind: window\n      signal: temperature\n      every_s: 60\n"
            "      emit_empty: maybe\n",
            ":21:19 events.state_changed.trigger.emit_empty: Input should be a valid boolean",
        ),
        (
            "      kind: periodic\n      every_s: 0\n",
            ":19:16 events.state_changed.trigger.every_s: expected at least 1 (second): the "
            "gateway checks the time about once per second; got 0.0",
        ),
        (
            "      kind: periodic\n      every_s: 60\n      signal: state\n",
            ":20:7 events.state_changed.trigger.signal: unknown key 'signal'; allowed here: "
            "kind, every_s",
        ),
        (
            "      kind: quality\n      signal: temperature\n      on: [bad, stael]\n"
            "      stale_after_s: 10\n",
            ":20:17 events.state_changed.trigger.on[1]: expected one of bad, stale, good; got "
            "'stael' (did you mean 'stale'?)",
        ),
        (
            "      kind: quality\n      signal: temperature\n      on: [stale]\n",
            ":17:5 events.state_changed.trigger: on lists stale but stale_after_s is not set: "
            "say after how many seconds without a reading the signal is stale",
        ),
        (
            "      kind: quality\n      signal: temperature\n      stale_after_s: 0.2\n",
            ":20:22 events.state_changed.trigger.stale_after_s: expected at least 1 (second)",
        ),
        (
            "      kind: quality\n      signal: temperature\n      on: []\n",
            ":20:11 events.state_changed.trigger.on: List should have at least 1 item",
        ),
        (
            "      kind: quality\n      signal: tempreature\n",
            ":19:15 events.state_changed.trigger.signal: unknown signal 'tempreature' (did you "
            "mean 'temperature'?); signals of this file: state, temperature",
        ),
    ],
)
def test_quality_periodic_and_window_misuse_is_located(
    tmp_path: Path, block: str, expected: str
) -> None:
    """Periods of at least a second, numeric windows, known quality changes, stale only with
    a time: each a located finding that says why."""
    path = write(tmp_path, "m.yaml", with_trigger(block))
    found = findings(tmp_path)
    assert any(f.startswith(f"{path}{expected}") for f in found), found


def test_a_periodic_snapshot_must_read_a_signal(tmp_path: Path) -> None:
    """Snapshots are skipped while none of the signals they read has a value: data that
    reads no signal would never be emitted, which the loader says at once."""
    text = with_trigger("      kind: periodic\n      every_s: 60\n").replace(
        "      state: {signal: state}\n", ""
    )
    path = write(tmp_path, "m.yaml", text)
    assert findings(tmp_path) == [
        f"{path}:20:5 events.state_changed.data: a periodic snapshot needs data that reads at "
        "least one signal ({signal: ...}, {previous: ...} or {quality: ...}): it is taken only "
        "once one of them has a value"
    ]
    write(
        tmp_path,
        "m.yaml",
        text.replace("      line: {attribute: line}\n", "      q: {quality: temperature}\n"),
    )
    assert len(load_mappings(tmp_path, MQTT)) == 1


def test_every_trigger_kind_loads_with_its_options(tmp_path: Path) -> None:
    """A file using every kind and every option loads, with the documented defaults."""
    text = edited(
        "    type: float\n",
        "    type: float\n  door:\n    connection: plant_mqtt\n"
        "    mqtt: {topic: acme/plant1/test/line1/m1/io, value_path: door}\n"
        "    type: boolean\n  count:\n    connection: plant_mqtt\n"
        "    mqtt: {topic: acme/plant1/test/line1/m1/io, value_path: count}\n"
        "    type: integer\n",
        ENUM_STATE,
    ) + (
        "  t:\n    type: a.T.v1\n"
        "    trigger: {kind: transition, signal: state, from: [Idle], to: [Running, Fault]}\n"
        "  e:\n    type: a.E.v1\n"
        "    trigger: {kind: edge, signal: door, edge: both, min_duration_ms: 250}\n"
        "  c:\n    type: a.C.v1\n"
        "    trigger: {kind: counter, signal: count, rollover_at: 65535, max_delta: 10,"
        " on_reset: count_from_zero}\n"
        "  h:\n    type: a.H.v1\n"
        "    trigger: {kind: threshold, signal: temperature, below: 5, hysteresis: 0.5}\n"
        "  q:\n    type: a.Q.v1\n"
        "    trigger: {kind: quality, signal: door}\n"
        "  qs:\n    type: a.Q.v1\n"
        "    trigger: {kind: quality, signal: state, stale_after_s: 30, on: [stale, good]}\n"
        "  p:\n    type: a.P.v1\n"
        "    trigger: {kind: periodic, every_s: 3600}\n"
        "    data: {state: {signal: state}}\n"
        "  w:\n    type: a.W.v1\n"
        "    trigger: {kind: window, signal: count, every_s: 60}\n"
        "  we:\n    type: a.W.v1\n"
        "    trigger: {kind: window, signal: temperature, every_s: 1.5, grace_s: 0,"
        " emit_empty: true}\n"
    )
    write(tmp_path, "m.yaml", text)
    (file,) = load_mappings(tmp_path, MQTT)
    triggers = {name: event.trigger for name, event in file.spec.events.items()}
    t, e, c, h = triggers["t"], triggers["e"], triggers["c"], triggers["h"]
    assert isinstance(t, spec.TransitionTrigger)
    assert (t.from_, t.to, t.on_first_value) == (["Idle"], ["Running", "Fault"], "skip")
    assert isinstance(e, spec.EdgeTrigger)
    assert (e.edge, e.min_duration_ms, e.on_first_value) == ("both", 250, "skip")
    assert isinstance(c, spec.CounterTrigger)
    assert (c.rollover_at, c.max_delta, c.on_reset) == (65535, 10, "count_from_zero")
    assert isinstance(h, spec.ThresholdTrigger)
    assert (h.above, h.below, h.hysteresis, h.crossings) == (None, 5.0, 0.5, ["enter", "leave"])
    assert h.on_first_value == "skip"
    q, qs, p, w, we = (triggers[k] for k in ("q", "qs", "p", "w", "we"))
    assert isinstance(q, spec.QualityTrigger) and isinstance(qs, spec.QualityTrigger)
    assert (q.signal, q.stale_after_s, q.on) == ("door", None, ["bad", "stale", "good"])
    assert (qs.stale_after_s, qs.on) == (30, ["stale", "good"])
    assert isinstance(p, spec.PeriodicTrigger) and p.every_s == 3600
    assert spec.trigger_signal(p) is None and spec.trigger_signal(q) == "door"
    assert isinstance(w, spec.WindowTrigger) and isinstance(we, spec.WindowTrigger)
    assert (w.signal, w.every_s, w.grace_s, w.emit_empty) == ("count", 60, 2.0, False)
    assert (we.every_s, we.grace_s, we.emit_empty) == (1.5, 0.0, True)


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
        f"{b}:8:5",  # an mqtt block on an OPC UA connection
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
    assert len(load_mappings(tmp_path, SHIPPED)) == 9


# --- the model itself --------------------------------------------------------------------


def test_json_schema_documents_every_field() -> None:
    """Every property of every model of the format has a description (editor tooltips)."""
    schema = MappingSpec.model_json_schema()
    models = {"MappingSpec": schema, **schema["$defs"]}
    for name, model in models.items():
        for key, prop in model.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{key} has no description"
    signal = schema["$defs"]["SignalSpec"]
    assert signal["oneOf"] == [{"required": ["mqtt"]}, {"required": ["opcua"]},
                               {"required": ["modbus"]}, {"required": ["sparkplug"]}]
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
