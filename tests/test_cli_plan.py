"""`digispine-gateway validate --plan` prints the coalesced Modbus reads of each connection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIG = """
gateway: {id: gw1}
connections:
  plc: {protocol: modbus, host: 127.0.0.1, max_gap: 10}
buffer: {directory: state}
mappings: {directory: mappings}
"""

MAPPING = """
version: 1
asset: {subject: acme/p1/l1/m1}
signals:
  a: {connection: plc, modbus: {table: holding_register, address: 0, type: uint16}, type: integer}
  b: {connection: plc, modbus: {table: holding_register, address: 5, type: float32}, type: float}
  c: {connection: plc, modbus: {table: holding_register, address: 100, type: int32}, type: integer}
  d: {connection: plc, modbus: {unit: 2, table: coil, address: 3, type: bool}, type: boolean}
events:
  changed:
    type: production.Changed.v1
    trigger: {kind: on_change, signal: a}
    data: {a: {signal: a}, b: {signal: b}, c: {signal: c}, d: {signal: d}}
"""


def test_validate_plan_shows_the_coalesced_reads(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "m1.yaml").write_text(MAPPING)
    (tmp_path / "gw.yaml").write_text(CONFIG)
    done = subprocess.run([sys.executable, "-m", "gateway", "validate", "--plan", "--config",
                           str(tmp_path / "gw.yaml")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    plan = done.stdout[done.stdout.index("plc:"):].splitlines()
    # registers 0 and 5..6 in one read (gap 4 <= max_gap 10), 100..101 apart, the coil on unit 2
    assert plan == [
        "plc: 3 read(s) for 4 value(s), 3 requests/s",
        "  unit 1 holding registers 0..6 (7) every 1000 ms (fc 3): u1/hr/0:uint16, u1/hr/5:float32",
        "  unit 1 holding registers 100..101 (2) every 1000 ms (fc 3): u1/hr/100:int32",
        "  unit 2 coils 3 (1) every 1000 ms (fc 1): u2/co/3:bool",
    ]
