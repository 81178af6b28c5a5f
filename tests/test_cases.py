"""Inline mapping test cases and `digispine-gateway test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.mapping.cases import run_cases
from gateway.mapping.loader import load_mappings

MAPPING = """\
version: 1
asset:
  subject: acme/test/line1/m1
  attributes: {line: line1}
signals:
  temperature:
    connection: plant_mqtt
    mqtt: {topic: acme/m1/telemetry, value_path: t}
    type: float
    scale: 0.1
events:
  temperature_changed:
    type: process.TemperatureChanged.v1
    trigger: {kind: on_change, signal: temperature, deadband: {absolute: 1.0}}
    data:
      temperature_c: {signal: temperature}
      previous_c: {previous: temperature}
      line: {attribute: line}
tests:
  - name: raw tenths become degrees, small changes are ignored
    given:
      - {signal: temperature, value: 600}
      - {signal: temperature, value: 605}
      - {signal: temperature, value: 615, at_s: 30}
    expect:
      - {type: process.TemperatureChanged.v1, data: {temperature_c: 60.0, previous_c: null, line: line1}}
      - type: process.TemperatureChanged.v1
        at_s: 30
        data: {temperature_c: 61.5, previous_c: 60.5, line: line1}
  - name: a bad reading is no event
    given:
      - {signal: temperature, value: 600, quality: bad}
    expect: []
{extra}
"""

FAILING = """\
  - name: wrong expectations
    given:
      - {signal: temperature, value: 600}
      - {signal: temperature, value: 700}
    expect:
      - {type: process.TemperatureChanged.v1, data: {temperature_c: 61.0, previous_c: null, line: line1}}
"""

CONFIG = """\
gateway: {{id: t}}
connections: {{plant_mqtt: {{protocol: mqtt, host: 127.0.0.1}}}}
mappings: {{directory: {mappings}}}
"""


def setup(tmp_path: Path, extra: str = "") -> Path:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "m1.yaml").write_text(MAPPING.replace("{extra}", extra))
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG.format(mappings=mappings))
    return config


def test_passing_cases_pass(tmp_path):
    setup(tmp_path)
    results = run_cases(load_mappings(tmp_path / "mappings", {"plant_mqtt": "mqtt"}))
    assert [(r.name, r.problems) for r in results] == [
        ("raw tenths become degrees, small changes are ignored", []),
        ("a bad reading is no event", []),
    ]


def test_a_failing_case_says_what_differs(tmp_path):
    setup(tmp_path, FAILING)
    results = run_cases(load_mappings(tmp_path / "mappings", {"plant_mqtt": "mqtt"}))
    failed = [r for r in results if not r.passed]
    assert len(failed) == 1
    assert failed[0].problems == [
        "event 1: data.temperature_c = 60.0, expected 61.0",
        'event 2: unexpected process.TemperatureChanged.v1 {"temperature_c":70.0,"previous_c":60.0,"line":"line1"}',
    ]


def test_command_exits_1_on_failure_and_prints_the_diff(tmp_path):
    config = setup(tmp_path, FAILING)
    proc = subprocess.run([sys.executable, "-m", "gateway", "test", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "FAIL  m1.yaml: wrong expectations" in proc.stdout
    assert "      event 1: data.temperature_c = 60.0, expected 61.0" in proc.stdout
    assert proc.stdout.strip().endswith("2 passed, 1 failed")


def test_command_on_a_file_passes(tmp_path):
    config = setup(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gateway", "test", "--config", str(config),
                           str(tmp_path / "mappings" / "m1.yaml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("2 passed, 0 failed")


def test_unknown_signal_in_a_case_is_reported(tmp_path):
    setup(tmp_path, "  - name: typo\n    given:\n      - {signal: temprature, value: 1}\n")
    results = run_cases(load_mappings(tmp_path / "mappings", {"plant_mqtt": "mqtt"}))
    assert results[-1].problems == [
        "given[0]: unknown signal 'temprature' (signals: temperature)"]
