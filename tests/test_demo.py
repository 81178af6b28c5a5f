"""The README's first quick-start command: the demo shows DomainEvents read back from Kafka,
from the MQTT machines, the OPC UA machines and the Modbus device."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def test_demo_prints_events_consumed_from_kafka():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--duration-s", "12", "--interval-s", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    events = [line for line in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3}  ", line)]
    types = {line.split()[1] for line in events}
    assert {"production.MachineStateChanged.v1", "production.PartCounterChanged.v1"} <= types
    subjects = {line.split()[2] for line in events}
    assert "acme/plant1/stamping/line2/press07" in subjects
    # The OPC UA machines (secure channel, certificates trusted both ways) and the Modbus
    # device: each reports its first state at once.
    for subject in ("acme/plant1/machining/line1/cnc101", "acme/plant1/machining/line1/cnc102",
                    "acme/plant1/packaging/line1/pack01"):
        assert subject in subjects, proc.stdout
        assert any(line.split()[1:3] == ["production.MachineStateChanged.v1", subject]
                   for line in events)
    assert re.search(r"demo: OPC UA server \(CNC-101, CNC-102\) on opc\.tcp://127\.0\.0\.1:\d+",
                     proc.stdout)
    assert re.search(r"demo: Modbus TCP device \(pack01, unit 1\) on 127\.0\.0\.1:\d+",
                     proc.stdout)
    summary = re.search(r"demo: stopped; (\d+) DomainEvents arrived in Kafka", proc.stdout)
    assert summary and int(summary.group(1)) == len(events)
