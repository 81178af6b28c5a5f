"""validate refuses registers read as two different values (located, naming both signals),
and accepts the same read twice, bits of a read register, and neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.mapping.loader import load_mappings

CONN = {"plc": "modbus"}


def write(folder: Path, name: str, signals: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"""\
version: 1
asset:
  subject: acme/p1/l1/{name}
signals:
{signals}
events:
  changed:
    type: test.Changed.v1
    trigger: {{kind: on_change, signal: a}}
""")


def signal(name: str, block: str, kind: str = "float") -> str:
    return f"  {name}:\n    connection: plc\n    modbus: {block}\n    type: {kind}\n"


def findings(folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_mappings(folder, CONN)
    return [str(f) for f in caught.value.findings]


def test_a_float_and_a_register_inside_it_are_refused_with_both_places(tmp_path: Path) -> None:
    write(tmp_path, "m1", signal("a", "{table: holding_register, address: 4, type: float32}")
          + signal("b", "{table: holding_register, address: 5, type: uint16}", "integer"))
    (problem,) = findings(tmp_path)
    assert problem.startswith(f"{tmp_path / 'm1.yaml'}:")
    assert "signals.b.modbus" in problem
    assert ("reads holding registers 5..5 of unit 1 as uint16, but "
            f"{tmp_path / 'm1.yaml'}:7:") in problem
    assert "signals.a reads 4..5 as float32: one of the two layouts is wrong" in problem


def test_two_orders_of_one_value_across_files_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "m1", signal("a", "{table: holding_register, address: 10, type: float32}"))
    write(tmp_path, "m2", signal("a", "{table: holding_register, address: 10, type: float32, "
                                      "order: CDAB}"))
    (problem,) = findings(tmp_path)
    assert problem.startswith(str(tmp_path / "m2.yaml"))
    assert "as float32 CDAB, but" in problem and "m1.yaml" in problem


def test_same_read_bits_other_units_and_neighbours_are_fine(tmp_path: Path) -> None:
    write(tmp_path, "m1",
          signal("a", "{table: holding_register, address: 0, type: uint32}", "integer")
          + signal("status", "{table: holding_register, address: 2, type: uint16}", "integer")
          + signal("ready", "{table: holding_register, address: 2, type: bool, bit: 3}", "boolean")
          + signal("other_unit", "{unit: 2, table: holding_register, address: 1, type: uint16}",
                   "integer")
          + signal("input", "{table: input_register, address: 1, type: uint16}", "integer"))
    write(tmp_path, "m2", signal("a", "{table: holding_register, address: 0, type: uint32}",
                                 "integer"))
    files = load_mappings(tmp_path, CONN)
    assert len(files) == 2
