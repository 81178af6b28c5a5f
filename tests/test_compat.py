"""Contract compatibility: the rules, table-tested, and ``digispine-gateway contract check``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.mapping import compat
from gateway.mapping.contracts import Contract, ContractSpec

TYPE = "production.MachineStateChanged.v1"

BASE: dict[str, Any] = {
    "version": 1,
    "type": TYPE,
    "minor": 3,
    "owner": "production-team",
    "description": "A machine changed its operating state.",
    "data": {
        "state": {"type": "string", "required": True, "enum": ["Idle", "Running"]},
        "duration_s": {"type": "number", "unit": "s", "nullable": True},
        "line": {"type": "string"},
        "count": {"type": "integer"},
    },
    "additional_fields": "forbid",
}


def contract(**changes: Any) -> Contract:
    """BASE with top-level keys replaced; ``data__<field>`` replaces (None: removes) a field."""
    raw = {**BASE, "data": {k: dict(v) for k, v in BASE["data"].items()}}
    for key, value in changes.items():
        if key.startswith("data__"):
            name = key.removeprefix("data__")
            if value is None:
                del raw["data"][name]
            else:
                raw["data"][name] = value
        else:
            raw[key] = value
    return Contract(ContractSpec.model_validate(raw))


RULES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("field removed", {"data__line": None}, {"field_removed"}),
    ("field retyped", {"data__count": {"type": "number"}}, {"type_changed"}),
    ("optional field added", {"data__shift": {"type": "string"}}, {"optional_field_added"}),
    ("required field added", {"data__shift": {"type": "string", "required": True}},
     {"required_field_added"}),
    ("field became required", {"data__line": {"type": "string", "required": True}},
     {"became_required"}),
    ("field no longer required", {"data__state": {"type": "string", "enum": ["Idle", "Running"]}},
     {"became_optional"}),
    ("field became nullable", {"data__line": {"type": "string", "nullable": True}},
     {"nullable_changed"}),
    ("field no longer nullable", {"data__duration_s": {"type": "number", "unit": "s"}},
     {"nullable_changed"}),
    ("unit changed", {"data__duration_s": {"type": "number", "unit": "ms", "nullable": True}},
     {"unit_changed"}),
    ("unit removed", {"data__duration_s": {"type": "number", "nullable": True}}, {"unit_removed"}),
    ("unit added", {"data__count": {"type": "integer", "unit": "pcs"}}, {"unit_added"}),
    ("enum value removed", {"data__state": {"type": "string", "required": True, "enum": ["Idle"]}},
     {"enum_value_removed"}),
    ("enum value added",
     {"data__state": {"type": "string", "required": True, "enum": ["Idle", "Running", "Fault"]}},
     {"enum_value_added"}),
    ("enum added", {"data__line": {"type": "string", "enum": ["l1", "l2"]}}, {"enum_added"}),
    ("enum removed", {"data__state": {"type": "string", "required": True}}, {"enum_removed"}),
    ("additional fields allowed", {"additional_fields": "allow"}, {"additional_fields_allowed"}),
    ("description changed", {"description": "Another wording."}, {"editorial"}),
    ("field description changed",
     {"data__line": {"type": "string", "description": "the line", "semantics": "urn:x:line"}},
     {"editorial"}),
    ("owner, asset types, rate", {"owner": "ops", "asset_types": ["press"],
                                  "expected_rate": "2/min"}, {"editorial"}),
    ("nothing changed", {}, set()),
]

LEVELS = {
    "field_removed": "breaking", "type_changed": "breaking", "optional_field_added": "minor",
    "required_field_added": "breaking", "became_required": "breaking",
    "became_optional": "breaking", "nullable_changed": "breaking", "unit_changed": "breaking",
    "unit_removed": "breaking", "unit_added": "minor", "enum_value_removed": "breaking",
    "enum_value_added": "minor", "enum_added": "breaking", "enum_removed": "breaking",
    "additional_fields_allowed": "minor", "additional_fields_forbidden": "breaking",
    "editorial": "editorial", "contract_removed": "breaking",
    "deprecated_contract_removed": "editorial", "contract_added": "new",
}


@pytest.mark.parametrize(("what", "changes", "rules"), RULES, ids=[r[0] for r in RULES])
def test_each_change_is_classified(what: str, changes: dict[str, Any], rules: set[str]) -> None:
    found = compat.compare_contract(contract(), contract(**changes))
    assert {c.rule for c in found} == rules, what
    assert all(c.level == LEVELS[c.rule] for c in found)


def test_the_rule_table_and_the_documented_levels_agree() -> None:
    assert compat.RULES == LEVELS


def test_forbidding_additional_fields_is_breaking() -> None:
    found = compat.compare_contract(contract(additional_fields="allow"), contract())
    assert [c.rule for c in found] == ["additional_fields_forbidden"]


@pytest.mark.parametrize(("changes", "minor", "ok", "words"), [
    ({"data__line": None}, 4, False, "breaking: field 'line' removed"),  # a bump does not help
    ({"data__shift": {"type": "string"}}, 3, False, "need a higher minor version (minor: 4)"),
    ({"data__shift": {"type": "string"}}, 4, True, ""),
    ({"data__shift": {"type": "string"}}, 9, True, ""),  # any higher minor will do
    ({"description": "Reworded."}, 3, True, ""),  # editorial: no bump needed
    ({}, 2, False, "minor version went down from 3 to 2"),
])
def test_versions_must_follow_the_changes(changes: dict[str, Any], minor: int, ok: bool,
                                          words: str) -> None:
    report = compat.check({TYPE: contract()}, {TYPE: contract(minor=minor, **changes)})
    assert report.ok is ok, report
    if words:
        assert any(words in line for line in report.errors), report.errors


def test_a_minor_bump_without_a_change_is_a_warning_only() -> None:
    report = compat.check({TYPE: contract()}, {TYPE: contract(minor=4)})
    assert report.ok and len(report.warnings) == 1 and "without a compatible change" in report.warnings[0]


def test_a_breaking_change_names_the_next_major() -> None:
    report = compat.check({TYPE: contract()}, {TYPE: contract(data__count={"type": "string"})})
    assert not report.ok
    assert "production.MachineStateChanged.v2" in report.errors[0]


def test_removing_a_contract_is_breaking_unless_it_was_deprecated() -> None:
    v2 = "production.MachineStateChanged.v2"
    successor = Contract(ContractSpec.model_validate({**BASE, "type": v2, "minor": 0}))
    removed = compat.check({TYPE: contract()}, {v2: successor})
    assert not removed.ok and "contract removed" in removed.errors[0]
    assert any("new contract, version 2.0" in n for n in removed.notes)
    retired = compat.check({TYPE: contract(deprecated=True)}, {v2: successor})
    assert retired.ok, retired.errors


# --- the command -----------------------------------------------------------------------------


def _write(directory: Path, **contracts: Contract) -> Path:
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):
        old.unlink()
    for c in contracts.values():
        raw = c.spec.model_dump(mode="json", exclude_defaults=True)
        raw["version"] = 1
        (directory / f"{c.type}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return directory


def _check(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "contract", "check", *args],
                          capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def test_the_command_against_a_directory_locates_each_finding(tmp_path: Path) -> None:
    before = _write(tmp_path / "before" / "contracts", a=contract())
    after = _write(tmp_path / "after" / "contracts",
                   a=contract(data__count={"type": "string"}, data__shift={"type": "string"}))
    done = _check("--dir", str(tmp_path / "after"), "--against", str(before.parent))
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    path = after / f"{TYPE}.yaml"
    assert any(line.startswith(f"error: {path}:") and "data.count.type" in line
               and "type changed from integer to string" in line for line in errors), errors
    assert any("need a higher minor version" in line for line in errors), errors
    # additive only, with the bump: passes
    _write(after, a=contract(minor=4, data__shift={"type": "string"}))
    done = _check("--dir", str(after), "--against", str(before))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "minor: optional field 'shift' added" in done.stdout


def test_the_command_against_a_git_ref(tmp_path: Path) -> None:
    repo = tmp_path / "plant-mappings"
    contracts = _write(repo / "mappings" / "contracts", a=contract())

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x",
                            "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "v1.3")
    git("tag", "release-1")
    _write(contracts, a=contract(data__line=None))
    done = _check("--dir", str(repo / "mappings"), "--against", "release-1")
    assert done.returncode == 1 and "breaking: field 'line' removed" in done.stdout, done.stdout
    _write(contracts, a=contract(minor=4, data__state={
        "type": "string", "required": True, "enum": ["Idle", "Running", "Fault"]}))
    done = _check("--dir", str(repo / "mappings"), "--against", "release-1")
    assert done.returncode == 0, done.stdout + done.stderr
    done = _check("--dir", str(contracts), "--against", "no-such-ref")
    assert done.returncode == 78 and "neither a directory nor a git ref" in done.stderr


def test_the_shipped_contracts_pass_against_themselves() -> None:
    root = Path(__file__).parent.parent
    done = _check("--against", str(root / "mappings" / "contracts"), cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
