"""Compatibility of contract changes: ``digispine-gateway contract check --against <previous>``.

Compares the contracts of a directory (the current ones) with a previous version of the same
directory (another directory, or a git ref of the repository holding it) and reports, per
contract, every change with its class:

- ``breaking``: a consumer or a mapping written against the previous version can break. The
  major version is part of the type name (``production.MachineStateChanged.v1``), so a
  breaking change is never allowed in place: it needs a new type, a new file ``...v2.yaml``
  (and the old one kept, marked ``deprecated: true``, until its consumers moved);
- ``minor``: compatible, additive (a new optional field, a new enum value, a unit where there
  was none): ``minor`` must be raised;
- ``editorial``: descriptions, owner, semantics, asset types, expected rate, the deprecation
  mark: no version change needed.

The rules (:data:`RULES`, table-tested in ``tests/test_compat.py``):

===========================================  ===========
change                                       class
===========================================  ===========
contract removed (not deprecated before)     breaking
contract removed (was ``deprecated: true``)  editorial
contract added                               (new)
field removed                                breaking
field type changed                           breaking
field added, optional                        minor
field added, required                        breaking
field optional -> required                   breaking
field required -> optional                   breaking
field nullable changed (either way)          breaking
unit changed or removed                      breaking
unit added where there was none              minor
enum value removed                           breaking
enum value added                             minor
enum added to a free field                   breaking
enum removed (the field becomes free)        breaking
``additional_fields`` allow -> forbid        breaking
``additional_fields`` forbid -> allow        minor
description, owner, semantics, asset types,  editorial
expected rate, deprecated
===========================================  ===========

Version findings: a breaking change (error, exit 1), minor changes without a higher ``minor``
(error), a ``minor`` that went down (error), a higher ``minor`` without any change (warning).
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from gateway import yamlfile
from gateway.errors import ConfigError, Finding
from gateway.mapping.contracts import Contract, FieldContract, load_contracts

Level = Literal["breaking", "minor", "editorial", "new"]

RULES: dict[str, Level] = {
    "contract_removed": "breaking",
    "deprecated_contract_removed": "editorial",
    "contract_added": "new",
    "field_removed": "breaking",
    "type_changed": "breaking",
    "optional_field_added": "minor",
    "required_field_added": "breaking",
    "became_required": "breaking",
    "became_optional": "breaking",
    "nullable_changed": "breaking",
    "unit_changed": "breaking",
    "unit_removed": "breaking",
    "unit_added": "minor",
    "enum_value_removed": "breaking",
    "enum_value_added": "minor",
    "enum_added": "breaking",
    "enum_removed": "breaking",
    "additional_fields_forbidden": "breaking",
    "additional_fields_allowed": "minor",
    "editorial": "editorial",
}
"""Rule -> class of the change."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One difference between two versions of a contract."""

    event_type: str
    rule: str
    message: str
    location: list[str | int]
    """Where in the current contract file (keys), for the located line."""

    @property
    def level(self) -> Level:
        return RULES[self.rule]


@dataclasses.dataclass(frozen=True)
class Report:
    """The outcome of a check: located lines, and whether it fails."""

    errors: list[str]
    warnings: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors


def _field_changes(event_type: str, name: str, old: FieldContract, new: FieldContract) -> list[Change]:
    loc: list[str | int] = ["data", name]
    out: list[Change] = []

    def add(rule: str, message: str, key: str | None = None) -> None:
        out.append(Change(event_type, rule, f"field '{name}': {message}",
                          [*loc, key] if key else loc))

    if old.type != new.type:
        add("type_changed", f"type changed from {old.type} to {new.type}", "type")
    if old.required != new.required:
        add("became_required" if new.required else "became_optional",
            "became required" if new.required else "is no longer required", "required")
    if old.nullable != new.nullable:
        add("nullable_changed", "may now be null" if new.nullable else "may no longer be null",
            "nullable")
    if old.unit != new.unit:
        if old.unit is None:
            add("unit_added", f"unit {new.unit!r} added", "unit")
        elif new.unit is None:
            add("unit_removed", f"unit {old.unit!r} removed", "unit")
        else:
            add("unit_changed", f"unit changed from {old.unit!r} to {new.unit!r}", "unit")
    if old.enum != new.enum:
        if old.enum is None:
            add("enum_added", "values restricted to an enum", "enum")
        elif new.enum is None:
            add("enum_removed", "enum removed: any value may now appear", "enum")
        else:
            removed = [v for v in old.enum if v not in new.enum]
            added = [v for v in new.enum if v not in old.enum]
            if removed:
                add("enum_value_removed", f"enum value(s) {', '.join(removed)} removed", "enum")
            if added:
                add("enum_value_added", f"enum value(s) {', '.join(added)} added", "enum")
    if (old.description, old.semantics) != (new.description, new.semantics):
        add("editorial", "description or semantics changed")
    return out


def compare_contract(old: Contract, new: Contract) -> list[Change]:
    """The changes from ``old`` to ``new`` (two versions of one event type)."""
    t = new.type
    out: list[Change] = []
    for name, field in old.spec.data.items():
        if name not in new.spec.data:
            out.append(Change(t, "field_removed", f"field '{name}' removed", ["data"]))
        else:
            out += _field_changes(t, name, field, new.spec.data[name])
    for name, field in new.spec.data.items():
        if name not in old.spec.data:
            rule = "required_field_added" if field.required else "optional_field_added"
            what = "required" if field.required else "optional"
            out.append(Change(t, rule, f"{what} field '{name}' added", ["data", name]))
    if old.spec.additional_fields != new.spec.additional_fields:
        forbid = new.spec.additional_fields == "forbid"
        out.append(Change(
            t, "additional_fields_forbidden" if forbid else "additional_fields_allowed",
            "additional fields now forbidden" if forbid else "additional fields now allowed",
            ["additional_fields"]))
    for key in ("owner", "description", "asset_types", "expected_rate", "deprecated"):
        if getattr(old.spec, key) != getattr(new.spec, key):
            out.append(Change(t, "editorial", f"{key} changed", [key]))
    return out


def compare(old: Mapping[str, Contract], new: Mapping[str, Contract]) -> list[Change]:
    """The changes between two contract sets (event type -> contract)."""
    out: list[Change] = []
    for event_type, contract in sorted(old.items()):
        if event_type not in new:
            rule = "deprecated_contract_removed" if contract.spec.deprecated else "contract_removed"
            out.append(Change(event_type, rule, "contract removed" + (
                " (it was deprecated)" if contract.spec.deprecated else
                "; consumers of this type lose it: mark it deprecated: true first, with its "
                "successor in place"), []))
    for event_type, contract in sorted(new.items()):
        if event_type not in old:
            out.append(Change(event_type, "contract_added",
                              f"new contract, version {contract.version}", []))
        else:
            out += compare_contract(old[event_type], contract)
    return out


def _successor(event_type: str) -> str:
    domain_name, _, major = event_type.rpartition(".v")
    return f"{domain_name}.v{int(major) + 1}" if major.isdigit() else f"{event_type} (a new major)"


def check(old: Mapping[str, Contract], new: Mapping[str, Contract]) -> Report:
    """Classify the changes and check the versions; one located line per finding."""
    changes = compare(old, new)
    errors: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    by_type: dict[str, list[Change]] = {}
    for change in changes:
        by_type.setdefault(change.event_type, []).append(change)
    for event_type in sorted(set(old) | set(new)):
        found = by_type.get(event_type, [])
        contract = new.get(event_type) or old[event_type]
        located = _located(contract)

        def line(change: Change, text: str, contract: Contract = contract,
                 located: yamlfile.Located | None = located) -> str:
            if located is None or change.event_type not in new:
                where = str(contract.path) if contract.path else change.event_type
                return f"{where}: {text}"
            return str(located.finding(change.location, text))

        for change in found:
            if change.level == "breaking":
                errors.append(line(change, f"breaking: {change.message}" + (
                    "" if change.rule == "contract_removed" else
                    f"; a breaking change needs a new major version: a new contract "
                    f"{_successor(event_type)}")))
            elif change.level == "new":
                notes.append(line(change, change.message))
            elif change.level == "editorial":
                notes.append(line(change, f"editorial: {change.message}"))
        if event_type in old and event_type in new:
            before, after = old[event_type].spec.minor, new[event_type].spec.minor
            minor = [c for c in found if c.level == "minor"]
            version = Change(event_type, "editorial", "", ["minor"])
            if after < before:
                errors.append(line(version, f"minor version went down from {before} to {after}"))
            elif minor and after == before:
                errors.append(line(version, (
                    f"compatible change(s) need a higher minor version (minor: {before + 1}): "
                    + "; ".join(c.message for c in minor))))
            elif minor:
                notes.extend(line(c, f"minor: {c.message}") for c in minor)
            elif after > before and not any(c.level == "breaking" for c in found):
                warnings.append(line(version, f"minor version raised from {before} to {after} "
                                              "without a compatible change"))
    return Report(errors, warnings, notes)


def _located(contract: Contract) -> yamlfile.Located | None:
    if contract.path is None:
        return None
    try:
        return yamlfile.load(contract.path)[1]
    except ConfigError:
        return None


def load(directory: Path) -> dict[str, Contract]:
    """The contracts of ``directory`` (a contracts directory, or a mapping directory with a
    ``contracts`` subdirectory); ConfigError if a file is broken."""
    if (directory / "contracts").is_dir():
        directory = directory / "contracts"
    contracts, findings = load_contracts(directory)
    if findings:
        raise ConfigError(findings)
    return contracts


@contextmanager
def previous(against: str, current: Path) -> Iterator[Path]:
    """The previous version to compare ``current`` (a contracts directory) with: ``against``
    itself when it is a directory, else a git ref (a tag, a branch, a commit, ``HEAD~1``) of
    the repository holding ``current``, checked out into a temporary directory. A ref that
    did not have the directory yet gives an empty one (every contract is new)."""
    path = Path(against)
    if path.is_dir():
        yield path
        return
    root = _git(current, "rev-parse", "--show-toplevel").decode().strip()
    relative = current.resolve().relative_to(Path(root).resolve()).as_posix()
    _git(current, "rev-parse", "--verify", "--quiet", f"{against}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="contracts-") as tmp:
        try:
            archive = _git(Path(root), "archive", "--format=tar", against, "--", relative)
        except ConfigError:  # the path did not exist at that ref
            yield Path(tmp)
            return
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / relative


def _git(where: Path, *args: str) -> bytes:
    try:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, check=False,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError([Finding(str(where), None, None, "", f"git: {exc}")]) from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"git {args[0]} failed"
        if args[:2] == ("rev-parse", "--verify"):
            message = f"--against {args[-1].removesuffix('^{commit}')}: neither a directory nor " \
                      f"a git ref of the repository holding {where}"
        raise ConfigError([Finding(str(where), None, None, "", message)])
    return done.stdout
