"""The Mapper: triggers, deadbands, state, conversion and the CloudEvent fields it fills."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gateway.mapping import Mapper, load_mappings
from gateway.mapping.engine import ConversionError, converter
from gateway.mapping.spec import SignalSpec
from gateway.model import DomainEvent, EventIds, Quality, Signal, decode_envelope, event_id
from gateway.sources.mqtt import MqttAddress

CONN = "plant_mqtt"
STATE = "m/state#state"
TEMP = "m/telemetry#temperature_c"
COUNT = "m/telemetry#part_counter"

MACHINE = """\
version: 1
asset:
  subject: {subject}
  attributes: {{line: line2, machine_type: press}}
signals:
  state:
    connection: plant_mqtt
    mqtt: {{topic: m/state, value_path: state}}
    type: string
  temperature:
    connection: plant_mqtt
    mqtt: {{topic: m/telemetry, value_path: temperature_c}}
    type: float
  part_counter:
    connection: plant_mqtt
    mqtt: {{topic: m/telemetry, value_path: part_counter}}
    type: integer
events:
  state_changed:
    type: production.MachineStateChanged.v1
    dataschema: {dataschema}
    trigger: {{kind: on_change, signal: state, on_first_value: {first}}}
    data:
      state: {{signal: state}}
      previous_state: {{previous: state}}
      state_quality: {{quality: state}}
      temperature_c: {{signal: temperature}}
      line: {{attribute: line}}
      schema_rev: {{const: 3}}
  temperature_changed:
    type: process.TemperatureChanged.v1
    trigger: {{kind: on_change, signal: temperature, deadband: {deadband}}}
    data:
      temperature_c: {{signal: temperature}}
      previous_c: {{previous: temperature}}
      unit: {{const: degC}}
"""


def machine(
    subject: str = "acme/p1/l2/press07",
    *,
    first: str = "emit",
    deadband: str = "null",
    dataschema: str = "null",
) -> str:
    return MACHINE.format(subject=subject, first=first, deadband=deadband, dataschema=dataschema)


def make_mapper(tmp_path: Path, *texts: str) -> Mapper:
    for i, text in enumerate(texts):
        (tmp_path / f"m{i}.yaml").write_text(text, encoding="utf-8")
    return Mapper(load_mappings(tmp_path, {CONN: "mqtt"}), "edge-01")


def reading(
    tag: str,
    value: Any,
    *,
    quality: Quality = Quality.GOOD,
    source_time: float | None = 10.0,
    receive_time: float = 20.0,
) -> Signal:
    return Signal(CONN, tag, value, quality, source_time=source_time, receive_time=receive_time)


def types_of(events: list[DomainEvent]) -> list[str]:
    return [e.type for e in events]


def temperature_events(m: Mapper, *values: float) -> list[float | None]:
    """Feed temperatures; return, per reading, the emitted temperature (None if no event)."""
    out: list[float | None] = []
    for v in values:
        fired = [e for e in m.map(reading(TEMP, v)) if e.type == "process.TemperatureChanged.v1"]
        out.append(fired[0].data["temperature_c"] if fired else None)
    return out


# --- on_change ---------------------------------------------------------------------------


def test_on_change_fires_on_a_new_value_and_not_on_a_repeat(tmp_path: Path) -> None:
    """The same state again is no event; a different one is."""
    m = make_mapper(tmp_path, machine())
    assert len(m.map(reading(STATE, "Running"))) == 1
    assert m.map(reading(STATE, "Running")) == []
    (event,) = m.map(reading(STATE, "Fault"))
    assert event.data["state"] == "Fault"


def test_first_value_is_an_event_with_on_first_value_emit(tmp_path: Path) -> None:
    """emit: the first value after start is an event whose previous value is null."""
    m = make_mapper(tmp_path, machine(first="emit"))
    (event,) = m.map(reading(STATE, "Idle"))
    assert event.data["state"] == "Idle"
    assert event.data["previous_state"] is None


def test_first_value_only_sets_the_baseline_with_on_first_value_skip(tmp_path: Path) -> None:
    """skip: no event for the first value; the next change is compared with it."""
    m = make_mapper(tmp_path, machine(first="skip"))
    assert m.map(reading(STATE, "Idle")) == []
    assert m.map(reading(STATE, "Idle")) == []
    (event,) = m.map(reading(STATE, "Running"))
    assert (event.data["state"], event.data["previous_state"]) == ("Running", "Idle")


def test_previous_is_the_value_before_the_triggering_one(tmp_path: Path) -> None:
    """previous follows the signal's history; repeats of the current value do not shift it."""
    m = make_mapper(tmp_path, machine())
    m.map(reading(STATE, "Idle"))
    m.map(reading(STATE, "Setup"))
    m.map(reading(STATE, "Setup"))
    (event,) = m.map(reading(STATE, "Running"))
    assert (event.data["state"], event.data["previous_state"]) == ("Running", "Setup")


def test_data_fields_carry_other_signals_attributes_constants_and_quality(tmp_path: Path) -> None:
    """Every data source kind, including a signal never seen yet (null)."""
    m = make_mapper(tmp_path, machine())
    (first,) = m.map(reading(STATE, "Idle"))
    assert first.data == {
        "state": "Idle",
        "previous_state": None,
        "state_quality": "good",
        "temperature_c": None,
        "line": "line2",
        "schema_rev": 3,
    }
    m.map(reading(TEMP, 61.2))
    (second,) = m.map(reading(STATE, "Running", quality=Quality.UNCERTAIN))
    assert list(second.data) == [
        "state",
        "previous_state",
        "state_quality",
        "temperature_c",
        "line",
        "schema_rev",
    ]
    assert second.data["temperature_c"] == 61.2
    assert second.data["state_quality"] == "uncertain"


def test_one_reading_can_fire_several_events_in_declaration_order(tmp_path: Path) -> None:
    """Two events triggered by the same signal both fire, in the file's order."""
    text = machine().replace(
        "trigger: {kind: on_change, signal: temperature,",
        "trigger: {kind: on_change, signal: state,",
    )
    text = text.replace("deadband: null", "on_first_value: emit")
    m = make_mapper(tmp_path, text)
    assert types_of(m.map(reading(STATE, "Idle"))) == [
        "production.MachineStateChanged.v1",
        "process.TemperatureChanged.v1",
    ]


def test_events_on_one_signal_keep_separate_baselines(tmp_path: Path) -> None:
    """Each event compares with the value it last emitted, not with another event's."""
    text = (
        machine(deadband="{absolute: 5.0}")
        + """\
  temperature_fine:
    type: process.TemperatureSampled.v1
    trigger: {kind: on_change, signal: temperature}
    data: {t: {signal: temperature}}
"""
    )
    m = make_mapper(tmp_path, text)
    assert types_of(m.map(reading(TEMP, 60.0))) == [
        "process.TemperatureChanged.v1",
        "process.TemperatureSampled.v1",
    ]
    assert types_of(m.map(reading(TEMP, 61.0))) == ["process.TemperatureSampled.v1"]
    assert types_of(m.map(reading(TEMP, 65.5))) == [
        "process.TemperatureChanged.v1",
        "process.TemperatureSampled.v1",
    ]


# --- deadbands ---------------------------------------------------------------------------


def test_absolute_deadband_fires_only_beyond_the_band(tmp_path: Path) -> None:
    """A change of exactly the deadband is not enough; strictly more is."""
    m = make_mapper(tmp_path, machine(deadband="{absolute: 2.0}"))
    assert temperature_events(m, 60.0, 62.0, 58.0, 62.25, 60.25, 60.24) == [
        60.0,
        None,
        None,
        62.25,
        None,
        60.24,
    ]


def test_absolute_deadband_compares_with_the_last_emitted_value(tmp_path: Path) -> None:
    """A slow drift fires once it adds up, even if no single step exceeds the band."""
    m = make_mapper(tmp_path, machine(deadband="{absolute: 2.0}"))
    assert temperature_events(m, 60.0, 61.0, 61.9, 62.1) == [60.0, None, None, 62.1]


def test_percent_deadband_is_relative_to_the_last_emitted_value(tmp_path: Path) -> None:
    """5 % of a baseline of 100 is 5: 105 does not fire, 105.5 does; the band then moves."""
    m = make_mapper(tmp_path, machine(deadband="{percent: 5.0}"))
    assert temperature_events(m, 100.0, 105.0, 95.0, 105.5, 110.7, 110.8) == [
        100.0,
        None,
        None,
        105.5,
        None,
        110.8,
    ]


def test_percent_deadband_with_a_zero_baseline_fires_on_any_change(tmp_path: Path) -> None:
    """Zero percent of zero is zero: any non-zero value is a change."""
    m = make_mapper(tmp_path, machine(deadband="{percent: 10.0}"))
    assert temperature_events(m, 0.0, 0.0, 0.001) == [0.0, None, 0.001]


def test_deadband_data_reports_the_previous_reading(tmp_path: Path) -> None:
    """previous is the reading before the triggering one, not the last emitted value."""
    m = make_mapper(tmp_path, machine(deadband="{absolute: 2.0}"))
    temperature_events(m, 60.0, 61.0)
    (event,) = m.map(reading(TEMP, 63.0))
    assert (event.data["temperature_c"], event.data["previous_c"]) == (63.0, 61.0)


# --- quality and conversion --------------------------------------------------------------


def test_bad_quality_fires_nothing_and_keeps_the_last_good_value(tmp_path: Path) -> None:
    """A bad reading updates the quality only; data fields keep the last good value."""
    m = make_mapper(tmp_path, machine())
    m.map(reading(TEMP, 61.0))
    m.map(reading(STATE, "Running"))
    assert m.map(reading(STATE, "Fault", quality=Quality.BAD)) == []
    assert m.map(reading(TEMP, None, quality=Quality.BAD)) == []
    (event,) = m.map(reading(STATE, "Idle"))
    assert (event.data["previous_state"], event.data["temperature_c"]) == ("Running", 61.0)
    assert m.conversion_errors == 0


def test_bad_quality_is_visible_in_quality_fields(tmp_path: Path) -> None:
    """A quality source reports bad while the signal's latest reading is bad."""
    text = machine().replace(
        "      schema_rev: {const: 3}\n",
        "      schema_rev: {const: 3}\n      temperature_quality: {quality: temperature}\n",
    )
    m = make_mapper(tmp_path, text)
    m.map(reading(TEMP, 61.0))
    m.map(reading(TEMP, 62.0, quality=Quality.BAD))
    (event,) = m.map(reading(STATE, "Idle"))
    assert (event.data["temperature_quality"], event.data["temperature_c"]) == ("bad", 61.0)


def test_conversion_failure_is_counted_and_treated_as_bad(tmp_path: Path) -> None:
    """A value that does not convert fires nothing, raises nothing and is counted per signal."""
    m = make_mapper(tmp_path, machine(deadband="{absolute: 1.0}"))
    assert temperature_events(m, 60.0) == [60.0]
    assert m.map(reading(TEMP, "hot")) == []
    assert m.map(reading(TEMP, {"v": 1})) == []
    assert m.conversion_errors == 2
    assert m.conversion_errors_by_signal == {("acme/p1/l2/press07", "temperature"): 2}
    assert m.last_conversion_error == (
        "acme/p1/l2/press07 signal temperature: expected a number for a float signal, got {'v': 1}"
    )
    (event,) = m.map(reading(STATE, "Idle"))
    assert event.data["temperature_c"] == 60.0
    assert temperature_events(m, 62.0) == [62.0]


def test_conversion_failure_of_the_trigger_signal_keeps_its_baseline(tmp_path: Path) -> None:
    """After a refused value, the next good value is compared with the last emitted one."""
    m = make_mapper(tmp_path, machine())
    m.map(reading(COUNT, 5))
    m.map(reading(STATE, "Running"))
    assert m.map(reading(STATE, ["not", "scalar"])) == []
    assert m.map(reading(STATE, "Running")) == []
    assert m.conversion_errors == 1


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("float", 61.2, 61.2),
        ("float", 7, 7.0),
        ("float", " 61.5 ", 61.5),
        ("float", "1e3", 1000.0),
        ("integer", 1234, 1234),
        ("integer", "1234", 1234),
        ("integer", 12.0, 12),
        ("integer", "12.0", 12),
        ("boolean", True, True),
        ("boolean", 0, False),
        ("boolean", 1.0, True),
        ("boolean", "TRUE", True),
        ("boolean", "false", False),
        ("boolean", "1", True),
        ("string", "Running", "Running"),
        ("string", 42, "42"),
        ("string", 1.5, "1.5"),
        ("string", True, "True"),
    ],
)
def test_conversion_accepts(kind: str, raw: Any, expected: Any) -> None:
    """Numbers, numeric strings and the boolean spellings convert to the declared type."""
    convert = converter(SignalSpec(connection="c", type=kind, mqtt=MqttAddress(topic="t")))  # type: ignore[arg-type]
    value = convert(raw)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        ("float", "hot"),
        ("float", True),
        ("float", None),
        ("float", float("nan")),
        ("float", "inf"),
        ("float", [1]),
        ("integer", 12.5),
        ("integer", "12.5"),
        ("integer", "x"),
        ("integer", False),
        ("integer", float("inf")),
        ("boolean", 2),
        ("boolean", "yes"),
        ("boolean", None),
        ("string", None),
        ("string", {"a": 1}),
        ("string", [1, 2]),
    ],
)
def test_conversion_refuses(kind: str, raw: Any) -> None:
    """Values that are not of the declared type raise ConversionError with the value shown."""
    convert = converter(SignalSpec(connection="c", type=kind, mqtt=MqttAddress(topic="t")))  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match=f"for an? {kind} signal, got"):
        convert(raw)


def test_scale_and_offset_apply_to_numbers(tmp_path: Path) -> None:
    """value * scale + offset, after conversion; integers stay integers."""
    text = machine().replace(
        "    type: float\n", "    type: float\n    scale: 0.1\n    offset: -273.15\n"
    )
    text = text.replace("    type: integer\n", "    type: integer\n    scale: 2\n    offset: 1\n")
    text = text.replace(
        "      temperature_c: {signal: temperature}\n      line:",
        "      temperature_c: {signal: temperature}\n      count: {signal: part_counter}\n      line:",
    )
    m = make_mapper(tmp_path, text)
    (temp,) = m.map(reading(TEMP, "3000"))
    assert math.isclose(temp.data["temperature_c"], 26.85)
    m.map(reading(COUNT, 20))
    (state,) = m.map(reading(STATE, "Idle"))
    assert state.data["count"] == 41
    assert type(state.data["count"]) is int


# --- several files, one address ----------------------------------------------------------


def test_two_files_on_one_tag_fire_independently(tmp_path: Path) -> None:
    """Two assets reading one topic each keep their own state and emit their own events."""
    m = make_mapper(
        tmp_path,
        machine("acme/p1/l2/press07", first="emit"),
        machine("acme/p1/l2/press08", first="skip"),
    )
    assert [e.subject for e in m.map(reading(STATE, "Idle"))] == ["acme/p1/l2/press07"]
    assert [e.subject for e in m.map(reading(STATE, "Running"))] == [
        "acme/p1/l2/press07",
        "acme/p1/l2/press08",
    ]
    assert m.bindings() == {
        CONN: [
            MqttAddress(topic="m/state", value_path="state"),
            MqttAddress(topic="m/telemetry", value_path="temperature_c"),
            MqttAddress(topic="m/telemetry", value_path="part_counter"),
        ]
    }


def test_same_tag_twice_in_one_file_updates_both_before_triggers(tmp_path: Path) -> None:
    """An event triggered by one binding of a tag sees the other binding's new value too."""
    text = (
        machine()
        .replace(
            "events:\n",
            """\
  state_code:
    connection: plant_mqtt
    mqtt: {topic: m/state, value_path: state}
    type: string
events:
""",
        )
        .replace(
            "      line: {attribute: line}\n",
            "      line: {attribute: line}\n      code: {signal: state_code}\n",
        )
    )
    m = make_mapper(tmp_path, text)
    (event,) = m.map(reading(STATE, "Idle"))
    assert event.data["code"] == "Idle"
    assert len(m.bindings()[CONN]) == 3


def test_unbound_readings_are_counted_and_map_to_nothing(tmp_path: Path) -> None:
    """A tag or connection no file binds produces no event."""
    m = make_mapper(tmp_path, machine())
    assert m.map(reading("m/other#x", 1)) == []
    assert m.map(Signal("other_conn", STATE, "Idle")) == []
    assert m.unmatched == 2


# --- the CloudEvent fields ---------------------------------------------------------------


def test_event_fields_come_from_the_file_the_gateway_and_the_reading(tmp_path: Path) -> None:
    """source names gateway and connection; type, subject, dataschema come from the file."""
    m = make_mapper(tmp_path, machine(dataschema="https://schemas.acme.example/ms/v1.json"))
    (event,) = m.map(reading(STATE, "Idle"))
    assert event.id == event_id(
        "edge-01", "acme/p1/l2/press07", "state_changed", 10.0, STATE, "Idle"
    )
    assert event.source == "/gateways/edge-01/connections/plant_mqtt"
    assert event.type == "production.MachineStateChanged.v1"
    assert event.subject == "acme/p1/l2/press07"
    assert event.dataschema == "https://schemas.acme.example/ms/v1.json"
    (no_schema,) = m.map(reading(TEMP, 1.0))
    assert no_schema.dataschema is None
    envelope = decode_envelope(event.encode())
    assert envelope["data"]["state"] == "Idle" and envelope["dataschema"] == event.dataschema


def test_event_time_is_the_source_timestamp_else_the_receive_time(tmp_path: Path) -> None:
    """A reading with a device timestamp carries it; one without carries the receive time."""
    m = make_mapper(tmp_path, machine())
    (with_source,) = m.map(
        reading(STATE, "Idle", source_time=1795903771.25, receive_time=1795903772.0)
    )
    (receive_only,) = m.map(reading(STATE, "Running", source_time=None, receive_time=1795903773.5))
    assert (with_source.time, receive_only.time) == (1795903771.25, 1795903773.5)


def test_event_ids_are_unique(tmp_path: Path) -> None:
    """Every event gets its own id, across events and files, and across firings of one trigger
    at one time (the disambiguator counts them)."""
    m = make_mapper(tmp_path, machine("acme/p1/l2/press07"), machine("acme/p1/l2/press08"))
    ids = [e.id for i in range(500) for e in m.map(reading(STATE, f"s{i % 7}"))]
    assert len(ids) == 1000
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_counter_ids_are_an_opt_in(tmp_path: Path) -> None:
    """Without ids, two mappers give the same (deterministic) ids; an explicit EventIds gives
    short per-run counter ids instead, for every kind of event."""
    (tmp_path / "m.yaml").write_text(machine(), encoding="utf-8")
    files = load_mappings(tmp_path, {CONN: "mqtt"})
    first = Mapper(files, "edge-01").map(reading(STATE, "Idle"))[0].id
    assert first == Mapper(files, "edge-01").map(reading(STATE, "Idle"))[0].id
    counted = Mapper(files, "edge-01", EventIds("x"))
    ids = [e.id for v in ("Idle", "Running") for e in counted.map(reading(STATE, v))]
    assert ids == ["x-1", "x-2"]


def test_shipped_examples_map_the_simulated_payloads(tmp_path: Path) -> None:
    """The example files turn simulator readings into the documented events."""
    files = load_mappings(Path(__file__).resolve().parent.parent / "mappings",
                          {CONN: "mqtt", "machining_opcua": "opcua", "packaging_modbus": "modbus"})
    m = Mapper(files, "edge-demo-01")
    base = "acme/plant1/stamping/line2/press07"
    (state,) = m.map(Signal(CONN, f"{base}/state#state", "Running", source_time=1795903771.25))
    assert state.data == {
        "state": "Running",
        "previous_state": None,
        "previous_state_duration_s": None,
        "machine_type": "press",
        "line": "line2",
    }
    (temp,) = m.map(Signal(CONN, f"{base}/telemetry#temperature_c", 61.2, source_time=1795903771.5))
    assert temp.data == {"temperature_c": 61.2, "unit": "degC"}
    assert m.map(Signal(CONN, f"{base}/telemetry#temperature_c", 63.2)) == []
    assert m.map(Signal(CONN, f"{base}/telemetry#part_counter", 1234)) == []
    (parts,) = m.map(Signal(CONN, f"{base}/telemetry#part_counter", 1236))
    assert (parts.type, parts.data) == (
        "production.PartsProduced.v1",
        {"parts": 2, "part_counter": 1236},
    )
    press08 = "acme/plant1/stamping/line2/press08"
    (count,) = m.map(Signal(CONN, f"{press08}/telemetry#part_counter", 1234))
    assert (count.type, count.data) == (
        "production.PartCounterChanged.v1",
        {"part_counter": 1234, "temperature_c": None},
    )
    oven = "acme/plant1/heattreat/line1/oven01"
    (zone,) = m.map(Signal(CONN, f"{oven}/telemetry#zone1_temperature_c", 850.3))
    assert (zone.subject, zone.type) == (oven, "process.TemperatureChanged.v1")
    assert m.map(Signal(CONN, f"{oven}/telemetry#zone1_temperature_c", 855.3)) == []
    assert m.map(Signal(CONN, f"{base}/state#state", "Stopped")) == []
    assert m.conversion_errors == 1
