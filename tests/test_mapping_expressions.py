"""Expressions in mapping files: ``kind: condition`` triggers (``when:``) and ``{expr: ...}``
data fields, their load-time errors (located in the expression) and their run-time errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError
from gateway.mapping import Mapper, load_mappings
from gateway.mapping.engine import ConditionState
from gateway.model import DomainEvent, Quality, Signal

CONN = "plant_mqtt"
TAGS = {name: f"c/status#{name}" for name in ("mode", "door", "count", "pressure", "label")}

SIGNALS = """\
version: 1
asset:
  subject: acme/p1/l3/cell01
signals:
  mode:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: mode}
    type: integer
    enum: {0: Idle, 1: Setup, 2: Running, 3: Fault}
  door:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: door}
    type: boolean
  count:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: count}
    type: integer
  pressure:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: pressure}
    type: float
  label:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: label}
    type: string
events:
"""

CONDITION = """\
  open_while_running:
    type: safety.GuardDoorOpenWhileRunning.v1
    trigger: {{kind: condition, when: "door && mode == 'Running'"{options}}}
    data:
      safe_for_s: {{trigger: state_duration_s}}
      psi: {{expr: "pressure * 14.5038"}}
"""


def write(tmp_path: Path, events: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cell.yaml").write_text(SIGNALS + events, encoding="utf-8")
    return tmp_path


def mapper(tmp_path: Path, events: str) -> Mapper:
    return Mapper(load_mappings(write(tmp_path, events), {CONN: "mqtt"}), "edge-01")


def findings(tmp_path: Path, events: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_mappings(write(tmp_path, events), {CONN: "mqtt"})
    return [str(f) for f in caught.value.findings]


def read(
    m: Mapper, signal: str, value: Any, at: float, quality: Quality = Quality.GOOD
) -> list[DomainEvent]:
    return m.map(Signal(CONN, TAGS[signal], value, quality, source_time=at, receive_time=at))


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate((SIGNALS + text).splitlines(), 1) if needle in line)


# --- condition triggers --------------------------------------------------------------------


def test_condition_fires_on_the_rising_edge_only(tmp_path: Path) -> None:
    """Unknown until both signals have a value; false -> true fires once; true stays quiet;
    true -> false -> true fires again with how long it was false."""
    m = mapper(tmp_path, CONDITION.format(options=""))
    assert read(m, "mode", 2, 0.0) == []  # door unknown: the condition is unknown
    assert read(m, "door", False, 1.0) == []  # first known result: false
    (event,) = read(m, "door", True, 10.0)
    assert event.type == "safety.GuardDoorOpenWhileRunning.v1"
    assert event.time == 10.0
    assert event.data == {"safe_for_s": None, "psi": None}  # false began before it was seen
    assert read(m, "door", True, 11.0) == []
    assert read(m, "mode", 2, 12.0) == []
    assert read(m, "mode", 3, 20.0) == []  # Fault: false from 20 s
    (again,) = read(m, "mode", 2, 50.0)
    assert again.data["safe_for_s"] == 30.0
    state = m.trigger_states[("acme/p1/l3/cell01", "open_while_running")]
    assert state == ConditionState(value=True, since=50.0, last_event_time=50.0,
                                   events_at_last_time=1)


def test_condition_true_at_first_is_skipped_by_default_and_emitted_on_request(
    tmp_path: Path,
) -> None:
    skip = mapper(tmp_path / "skip", CONDITION.format(options=""))
    read(skip, "door", True, 0.0)
    assert read(skip, "mode", 2, 1.0) == []
    emit = mapper(tmp_path / "emit", CONDITION.format(options=", on_first_value: emit"))
    read(emit, "door", True, 0.0)
    (event,) = read(emit, "mode", 2, 1.0)
    assert event.data["safe_for_s"] is None


def test_unknown_does_not_count_as_false(tmp_path: Path) -> None:
    """A bad reading makes the condition unknown: no event, and the last known result stands
    (true, unknown, true is no edge; false, unknown, true is one)."""
    m = mapper(tmp_path, CONDITION.format(options=""))
    read(m, "mode", 2, 0.0)
    read(m, "door", False, 1.0)
    assert len(read(m, "door", True, 2.0)) == 1
    assert read(m, "door", None, 3.0, Quality.BAD) == []
    assert read(m, "door", True, 4.0) == []  # true, unknown, true: no new edge
    assert read(m, "door", False, 5.0) == []
    assert read(m, "mode", 7, 6.0) == []  # not in the enum: bad, unknown
    assert read(m, "door", True, 7.0) == []  # mode's latest reading is bad: unknown
    (event,) = read(m, "mode", 2, 8.0)  # false (since 5 s), unknown, true: an edge
    assert event.data["safe_for_s"] == 3.0
    assert m.expressions_without_value > 0
    assert m.expression_errors == {}


def test_condition_state_is_carried_over_by_adopt_state(tmp_path: Path) -> None:
    old = mapper(tmp_path, CONDITION.format(options=""))
    read(old, "mode", 2, 0.0)
    read(old, "door", False, 1.0)
    new = mapper(tmp_path, CONDITION.format(options=""))
    assert new.adopt_state(old) == 6  # five signals and the condition
    (event,) = read(new, "door", True, 2.0)
    assert event.type == "safety.GuardDoorOpenWhileRunning.v1"


def test_condition_is_evaluated_only_for_the_signals_it_reads(tmp_path: Path) -> None:
    m = mapper(tmp_path, CONDITION.format(options=""))
    read(m, "mode", 2, 0.0)
    read(m, "door", False, 1.0)
    assert m.expressions_without_value == 1  # mode alone: door had no value yet
    read(m, "pressure", 6.0, 2.0)
    read(m, "count", 1, 3.0)
    assert m.expressions_without_value == 1


# --- computed fields -----------------------------------------------------------------------

FIELDS = """  snapshot:
    type: test.Snapshot.v1
    trigger: {kind: on_change, signal: count}
    data:
      psi: {expr: "pressure * 14.5038"}
      per_part: {expr: "pressure / double(count)"}
      ratio: {expr: "count / (count - 2)"}
      state: {expr: "mode == 'Running' ? 'run' : 'stop'"}
      tagged: {expr: "label + '-' + mode"}
"""


def test_computed_fields_use_the_current_values(tmp_path: Path) -> None:
    m = mapper(tmp_path, FIELDS)
    read(m, "pressure", 6.0, 0.0)
    read(m, "mode", 2, 0.0)
    read(m, "label", "A", 0.0)
    (event,) = read(m, "count", 4, 1.0)
    assert event.data == {
        "psi": pytest.approx(87.0228),
        "per_part": 1.5,
        "ratio": 2,
        "state": "run",
        "tagged": "A-Running",
    }


def test_a_field_without_a_result_is_null_and_counted(tmp_path: Path) -> None:
    """No value yet: null, counted apart (normal after start); division by zero: null,
    counted by reason and per event."""
    m = mapper(tmp_path, FIELDS)
    read(m, "mode", 1, 0.0)
    (event,) = read(m, "count", 2, 1.0)
    assert event.data == {
        "psi": None,  # pressure never seen
        "per_part": None,
        "ratio": None,  # 2 / 0
        "state": "stop",
        "tagged": None,  # label never seen
    }
    assert m.expression_errors == {"division_by_zero": 1}
    assert m.expression_errors_by_event == {("acme/p1/l3/cell01", "snapshot"): 1}
    assert m.expressions_without_value == 3
    read(m, "pressure", 6.0, 2.0)
    read(m, "pressure", "junk", 3.0)  # a bad reading: the field is null again
    (event,) = read(m, "count", 3, 4.0)
    assert event.data["psi"] is None
    assert event.data["ratio"] == 3


# --- load errors, located in the expression ------------------------------------------------


def expr_event(when: str) -> str:
    return f"""  watch:
    type: test.Watch.v1
    trigger: {{kind: condition, when: {when}}}
"""


def test_syntax_error_points_into_the_expression(tmp_path: Path) -> None:
    events = expr_event('"door && && mode == 1"')
    (finding,) = findings(tmp_path, events)
    line = line_of(events, "kind: condition")
    column = (SIGNALS + events).splitlines()[line - 1].index('"door') + 2  # first character
    assert finding.startswith(f"{tmp_path / 'cell.yaml'}:{line}:{column + 8}")
    assert "events.watch.trigger.when" in finding


def test_unknown_signal_suggests_a_name_plain_scalar(tmp_path: Path) -> None:
    events = """  watch:
    type: test.Watch.v1
    trigger:
      kind: condition
      when: door && presure > 5.0
"""
    (finding,) = findings(tmp_path, events)
    line = line_of(events, "when:")
    column = (SIGNALS + events).splitlines()[line - 1].index("presure") + 1
    assert finding.startswith(f"{tmp_path / 'cell.yaml'}:{line}:{column}")
    assert "presure" in finding and "did you mean 'pressure'" in finding


def test_a_type_error_in_a_computed_field(tmp_path: Path) -> None:
    events = """  watch:
    type: test.Watch.v1
    trigger: {kind: on_change, signal: count}
    data:
      bad: {expr: 'label * 2.0'}
"""
    (finding,) = findings(tmp_path, events)
    line = line_of(events, "bad:")
    start = (SIGNALS + events).splitlines()[line - 1].index("'label") + 2
    assert finding.startswith(f"{tmp_path / 'cell.yaml'}:{line}:")
    column = int(finding.split(":")[2].split()[0])
    assert start <= column < start + len("label * 2.0")
    assert "events.watch.data.bad.expr" in finding


def test_a_when_that_is_not_boolean(tmp_path: Path) -> None:
    (finding,) = findings(tmp_path, expr_event('"pressure * 2.0"'))
    assert "events.watch.trigger.when" in finding
    assert "bool" in finding


def test_a_block_scalar_is_located_at_its_start_with_the_column(tmp_path: Path) -> None:
    events = """  watch:
    type: test.Watch.v1
    trigger:
      kind: condition
      when: >-
        door &&
        nope
"""
    (finding,) = findings(tmp_path, events)
    assert "(at column" in finding and "nope" in finding


def test_a_condition_must_read_a_signal(tmp_path: Path) -> None:
    (finding,) = findings(tmp_path, expr_event('"1 > 0"'))
    assert "reads no signal" in finding


def test_condition_state_duration_is_its_only_attribute(tmp_path: Path) -> None:
    events = expr_event('"door"') + "    data: {x: {trigger: delta}}\n"
    (finding,) = findings(tmp_path, events)
    assert "condition" in finding and "state_duration_s" in finding


# --- event-level when guards ---------------------------------------------------------------

GUARDED = """\
  cycle:
    type: test.Cycle.v1
    trigger: {kind: counter, signal: count}
    when: "mode == 'Running' && pressure > 5.0"
    data:
      parts: {trigger: delta}
"""


def test_a_guard_drops_events_unless_it_is_true(tmp_path: Path) -> None:
    """The trigger's state moves either way; only true emits; false and unknown are counted."""
    m = mapper(tmp_path, GUARDED)
    read(m, "count", 1, 0.0)  # baseline
    assert read(m, "count", 2, 1.0) == []  # mode and pressure unknown: dropped
    read(m, "mode", 2, 2.0)
    read(m, "pressure", 4.0, 3.0)
    assert read(m, "count", 4, 4.0) == []  # false: dropped (the baseline moves to 4)
    read(m, "pressure", 6.0, 5.0)
    (event,) = read(m, "count", 7, 6.0)
    assert event.data == {"parts": 3}
    assert m.events_guarded == 2
    assert m.events_guarded_by_event == {("acme/p1/l3/cell01", "cycle"): 2}
    assert m.expressions_without_value == 1


def test_a_guard_is_checked_at_load(tmp_path: Path) -> None:
    events = GUARDED.replace("pressure > 5.0", "pressure + 5.0")
    (finding,) = findings(tmp_path, events)
    assert "events.cycle.when" in finding and "needs true/false" in finding
    line = line_of(events, "    when:")
    assert finding.startswith(f"{tmp_path / 'cell.yaml'}:{line}:")


def test_a_condition_takes_no_event_level_guard(tmp_path: Path) -> None:
    events = CONDITION.format(options="") + '    when: "pressure > 5.0"\n'
    (finding,) = findings(tmp_path, events)
    assert "combine the two with &&" in finding
