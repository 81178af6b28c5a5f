"""Event types as contracts: what the ``data`` of an event type version must look like.

One YAML file per event type version in ``<mappings directory>/contracts/``, named after the
type (``production.MachineStateChanged.v1.yaml``)::

    version: 1
    type: production.MachineStateChanged.v1
    minor: 2
    owner: production-team
    description: A machine changed its operating state.
    asset_types: [press, cnc]
    expected_rate: 1/min
    data:
      state: {type: string, required: true, description: "the new state",
              semantics: "https://example.com/vocab/MachineState"}
      previous_state: {type: string, nullable: true}
      previous_state_duration_s: {type: number, unit: s, nullable: true}
    additional_fields: forbid

A contract is used three times:

- at load (:func:`gateway.mapping.loader.load_mappings`), every mapping event of the type is
  checked statically against it (:func:`check_event`): required fields produced, no undeclared
  field under ``additional_fields: forbid``, and the type of each source where it is known;
- at run time, the pipeline checks each event's ``data`` (:meth:`Contract.violation`, a
  precompiled hand check, no JSON Schema engine) and replaces a violating event by a
  dead-letter event of type :data:`VIOLATION_TYPE`;
- ``digispine-gateway catalog`` prints its ``data`` JSON Schema (:meth:`Contract.data_schema`),
  the AsyncAPI document and the catalog topic carry it (:mod:`gateway.catalog`).

The major version is part of the type name (``.v1``): a breaking change is a new type and a new
file (``...v2.yaml``); ``minor`` counts the compatible changes of one major version
(:mod:`gateway.mapping.compat` checks both). Every mapped event carries ``<major>.<minor>`` as
its ``contractversion`` attribute (:func:`provenance`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from gateway import yamlfile
from gateway.configbase import Strict
from gateway.errors import ConfigError, Finding
from gateway.mapping import spec
from gateway.model import DomainEvent

SUFFIXES = (".yaml", ".yml")
VIOLATION_TYPE = "gateway.ContractViolation.v1"
"""The type of the dead-letter event that replaces an event violating its contract."""
DLQ_SUFFIX = "-dlq"
"""Appended to the id of the violating event to make the dead-letter event's id."""

FieldType = Literal["string", "number", "integer", "boolean"]


class FieldContract(Strict):
    """One field of an event's ``data``."""

    type: FieldType = Field(examples=["string", "number"])
    """The JSON type of the value: ``integer`` values also fit ``number``; booleans are not
    numbers."""
    required: bool = False
    """The field must be present (and, unless ``nullable``, not null)."""
    nullable: bool = False
    """The value may be null (e.g. a previous state before the first one)."""
    unit: str | None = Field(default=None, examples=["s", "degC"])
    """Engineering unit, free text, for humans and the catalog."""
    enum: list[str] | None = Field(default=None, min_length=1, examples=[["Idle", "Running"]])
    """String fields only: the allowed values."""
    description: str | None = None
    """What the field means."""
    semantics: str | None = Field(default=None, examples=["https://qudt.org/vocab/quantitykind/Temperature"])
    """What the value denotes, as a term or the URI of a vocabulary entry (a quantity kind, a
    state model), for machines and the catalog; free text."""

    @model_validator(mode="after")
    def _enum_on_strings(self) -> FieldContract:
        if self.enum is not None and self.type != "string":
            raise ValueError(f"enum applies to string fields only, this field is of type {self.type}")
        return self


class ContractSpec(Strict):
    """A contract file (version 1): the ``data`` of one event type version."""

    version: Literal[1]
    """Format version of the contract file: 1."""
    type: str = Field(pattern=spec.EVENT_TYPE_PATTERN, examples=["production.MachineStateChanged.v1"])
    """``<domain>.<EventName>.v<major>``; the file is named after it."""
    minor: int = Field(default=0, ge=0)
    """Minor version: raised by every compatible change (an optional field, an enum value, a
    unit where there was none); the major version is the ``.v<major>`` of ``type``."""
    owner: str | None = Field(default=None, examples=["production-team"])
    """Who owns the event type (for the catalog)."""
    description: str | None = None
    """What the event means."""
    asset_types: list[str] = Field(default_factory=list, examples=[["press", "cnc"]])
    """The kinds of asset the event type applies to (for the catalog; not checked)."""
    expected_rate: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?/(s|min|h|d)$",
                                      examples=["1/min", "0.2/s"])
    """How often one asset typically emits it at most, ``<number>/<s|min|h|d>`` (for the
    catalog and capacity planning; not enforced)."""
    deprecated: bool = False
    """The type is on its way out (a newer major exists): ``contract check`` lets a later
    version of the directory remove a deprecated contract without calling it breaking."""
    data: dict[spec.FieldName, FieldContract] = Field(default_factory=dict)
    """Field name -> what the field holds."""
    additional_fields: Literal["forbid", "allow"] = "allow"
    """``forbid``: every field of ``data`` must be declared; ``allow``: others may appear."""


_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
}


def fits(declared: str, actual: str) -> bool:
    """Whether a value of JSON type ``actual`` fits a field of type ``declared``."""
    return actual == declared or (declared == "number" and actual == "integer")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


@dataclass(frozen=True)
class Contract:
    """A validated contract, with its runtime check precompiled."""

    spec: ContractSpec
    path: Path | None = None
    """The file it came from (None for the gateway's built-in contracts)."""
    _checks: tuple[tuple[str, bool, bool, tuple[type, ...], frozenset[str] | None], ...] = field(
        init=False, repr=False, compare=False
    )
    _declared: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks = tuple(
            (name, f.required, f.nullable, _PY_TYPES[f.type],
             frozenset(f.enum) if f.enum is not None else None)
            for name, f in self.spec.data.items()
        )
        object.__setattr__(self, "_checks", checks)
        object.__setattr__(self, "_declared", frozenset(self.spec.data))

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def domain(self) -> str:
        return split_type(self.spec.type)[0]

    @property
    def name(self) -> str:
        return split_type(self.spec.type)[1]

    @property
    def major(self) -> int:
        return split_type(self.spec.type)[2]

    @property
    def minor(self) -> int:
        return self.spec.minor

    @property
    def version(self) -> str:
        """``<major>.<minor>``, e.g. ``1.2``: the ``contractversion`` of its events."""
        return f"{self.major}.{self.spec.minor}"

    def data_schema(self) -> dict[str, Any]:
        """The JSON Schema (draft-07) of the ``data`` object of this event type."""
        properties: dict[str, Any] = {}
        for name, f in self.spec.data.items():
            prop: dict[str, Any] = {"type": [f.type, "null"] if f.nullable else f.type}
            words = [w for w in (f.description, f"unit: {f.unit}" if f.unit else None) if w]
            if words:
                prop["description"] = "; ".join(words)
            if f.enum is not None:
                prop["enum"] = [*f.enum, None] if f.nullable else list(f.enum)
            if f.unit:
                prop["x-unit"] = f.unit
            if f.semantics:
                prop["x-semantics"] = f.semantics
            properties[name] = prop
        schema: dict[str, Any] = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "title": self.spec.type,
            "type": "object",
            "properties": properties,
            "required": [n for n, f in self.spec.data.items() if f.required],
            "additionalProperties": self.spec.additional_fields == "allow",
        }
        if self.spec.description:
            schema["description"] = self.spec.description
        schema["x-contract-version"] = self.version
        return schema

    def violation(self, data: Mapping[str, Any]) -> str | None:
        """Why ``data`` breaks this contract (the first problem found), or None if it fits."""
        for name, required, nullable, types, allowed in self._checks:
            if name not in data:
                if required:
                    return f"required field '{name}' is missing"
                continue
            value = data[name]
            if value is None:
                if not nullable:
                    return f"field '{name}' is null, and it is not nullable"
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                declared = next(k for k, v in _PY_TYPES.items() if v == types)
                return f"field '{name}' must be of type {declared}, got {_json_type(value)} ({value!r})"
            if allowed is not None and value not in allowed:
                return f"field '{name}' is {value!r}, not one of {', '.join(sorted(allowed))}"
        if self.spec.additional_fields == "forbid":
            extra = sorted(k for k in data if k not in self._declared)
            if extra:
                return f"undeclared field(s) {', '.join(extra)} (additional_fields: forbid)"
        return None


def split_type(event_type: str) -> tuple[str, str, int]:
    """``production.MachineStateChanged.v1`` -> ``("production", "MachineStateChanged", 1)``."""
    domain, name, version = event_type.rsplit(".", 2)
    return domain, name, int(version[1:]) if version[1:].isdigit() else 0


class _ViolationContract(Contract):
    """The dead-letter contract: its ``data`` also carries the original data, an object."""

    def data_schema(self) -> dict[str, Any]:
        schema = super().data_schema()
        schema["properties"]["data"] = {
            "type": "object", "description": "the data of the original event, as it was"}
        schema["required"].append("data")
        return schema


VIOLATION_CONTRACT: Contract = _ViolationContract(ContractSpec(
    version=1,
    type=VIOLATION_TYPE,
    owner="digispine-gateway",
    description="Dead letter: a mapped event whose data broke its contract, sent instead of it.",
    data={
        "reason": FieldContract(type="string", required=True,
                                description="what was wrong with the original event"),
        "event_type": FieldContract(type="string", required=True,
                                    description="the type of the original event"),
        "event_id": FieldContract(type="string", required=True,
                                  description="the id of the original event"),
        # "data" (the original data, an object) is added to the schema by _ViolationContract.
    },
    additional_fields="allow",
))
"""The built-in contract of :data:`VIOLATION_TYPE`."""


def dead_letter(event: DomainEvent, reason: str) -> DomainEvent:
    """The dead-letter event that replaces ``event`` (same subject, source and time; a
    deterministic id: the original id + :data:`DLQ_SUFFIX`)."""
    return DomainEvent(
        id=event.id + DLQ_SUFFIX,
        source=event.source,
        type=VIOLATION_TYPE,
        subject=event.subject,
        time=event.time,
        data={"reason": reason, "event_type": event.type, "event_id": event.id,
              "data": event.data},
        # The provenance of the original event; the contract version is the dead letter's own.
        extensions=None if event.extensions is None else {
            **event.extensions, "contractversion": VIOLATION_CONTRACT.version},
    )


def load_contracts(directory: Path) -> tuple[dict[str, Contract], list[Finding]]:
    """The contracts of ``directory`` (``*.yaml``, ``*.yml``; none if it does not exist), and
    the located findings of the broken ones (which are left out)."""
    if not directory.is_dir():
        return {}, []
    contracts: dict[str, Contract] = {}
    findings: list[Finding] = []
    paths = sorted(p for p in directory.iterdir()
                   if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file())
    for path in paths:
        contract, problems = _load_file(path)
        findings += problems
        if contract is not None:
            contracts[contract.type] = contract
    return contracts, findings


def _load_file(path: Path) -> tuple[Contract | None, list[Finding]]:
    try:
        data, located = yamlfile.load(path)
    except ConfigError as exc:
        return None, list(exc.findings)
    if not isinstance(data, dict):
        return None, [located.finding(
            [], "expected a contract (version, type, data), found "
            + ("an empty file" if data is None else type(data).__name__))]
    try:
        parsed = ContractSpec.model_validate(data)
    except ValidationError as exc:
        return None, _schema_findings(exc, located)
    if path.stem != parsed.type:
        return None, [located.finding(
            ["type"], f"a contract file is named after its type: expected {parsed.type}.yaml, "
            f"this file is {path.name}", at_value=True)]
    return Contract(parsed, path), []


def _schema_findings(exc: ValidationError, located: yamlfile.Located) -> list[Finding]:
    from gateway.mapping.loader import _PATTERN_WORDS  # the same words as for mapping files

    out: list[Finding] = []
    for err in exc.errors(include_url=False):
        loc, message, at_value = yamlfile.normalize(err)
        pattern = (err.get("ctx") or {}).get("pattern")
        if err["type"] == "string_pattern_mismatch" and pattern in _PATTERN_WORDS:
            message = f"{_PATTERN_WORDS[pattern]}; got {err.get('input')!r}"
        elif err["type"] == "extra_forbidden":
            message = f"unknown key '{loc[-1] if loc else '?'}'"
        out.append(located.finding(loc, message, at_value=at_value))
    return out


# --- static check of a mapping event against its contract ------------------------------------

TRIGGER_ATTRIBUTE_TYPES: dict[str, str] = {
    "state_duration_s": "number",
    "delta": "integer",
    "count": "integer",
    "mean": "number",
    "edge": "string",
    "crossing": "string",
    "quality": "string",
    "previous_quality": "string",
    "reason": "string",
    "window_start": "string",
}
"""The JSON type of ``{trigger: <attribute>}`` values whose type does not depend on a signal."""

_SIGNAL_TYPES = {"float": "number", "integer": "integer", "boolean": "boolean", "string": "string"}


_SIGNAL_TYPED_AGGREGATES = frozenset({"min", "max", "first", "last"})
"""Window aggregates of the type of the window's signal (``mean`` is always a number)."""


def source_type(source: Any, mapping: spec.MappingSpec, trigger_type: str | None = None) -> str | None:
    """The JSON type a data source produces, where it is known statically (else None).
    ``trigger_type``: the type of the event's trigger signal, for window aggregates."""
    if isinstance(source, (spec.SignalSource, spec.PreviousSource)):
        name = source.signal if isinstance(source, spec.SignalSource) else source.previous
        signal = mapping.signals.get(name)
        if signal is None:
            return None
        return "string" if signal.enum is not None else _SIGNAL_TYPES[signal.type]
    if isinstance(source, spec.QualitySource):
        return "string"
    if isinstance(source, spec.AttributeSource):
        if source.attribute not in mapping.asset.attributes:
            return None
        return _json_type(mapping.asset.attributes[source.attribute])
    if isinstance(source, spec.ConstSource):
        return None if source.const is None else _json_type(source.const)
    if isinstance(source, spec.TriggerSource):
        known = TRIGGER_ATTRIBUTE_TYPES.get(source.trigger)
        if known is not None or source.trigger not in _SIGNAL_TYPED_AGGREGATES:
            return known
        return None if trigger_type is None else _SIGNAL_TYPES.get(trigger_type)
    if isinstance(source, spec.ExprSource):
        # Imported here: the loader imports this module.
        from gateway.mapping.expr import ExprError
        from gateway.mapping.loader import compile_expression

        try:
            compiled = compile_expression(source.expr, mapping.signals, "any")
        except ExprError:
            return None  # reported where the expression is checked
        return _SIGNAL_TYPES[compiled.result_type]
    return None


def check_event(
    event_id: str, event: spec.EventSpec, mapping: spec.MappingSpec, contract: Contract,
    located: yamlfile.Located,
) -> list[Finding]:
    """Static check of one mapping event against the contract of its type."""
    base: list[str | int] = ["events", event_id, "data"]
    watched = spec.trigger_signal(event.trigger)
    signal = mapping.signals.get(watched) if watched is not None else None
    trigger_type = signal.type if signal is not None and signal.enum is None else None
    where = f"contract {contract.type}" + (f" ({contract.path})" if contract.path else "")
    out: list[Finding] = []
    missing = [n for n, f in contract.spec.data.items() if f.required and n not in event.data]
    if missing:
        out.append(located.finding(
            base if event.data else ["events", event_id],
            f"missing required field(s) {', '.join(missing)} of {where}"))
    for name, source in event.data.items():
        declared = contract.spec.data.get(name)
        if declared is None:
            if contract.spec.additional_fields == "forbid":
                known = ", ".join(contract.spec.data) or "none"
                out.append(located.finding(
                    [*base, name], f"field '{name}' is not declared by {where}, which forbids "
                    f"additional fields; declared: {known}"))
            continue
        actual = source_type(source, mapping, trigger_type)
        if actual is not None and not fits(declared.type, actual):
            out.append(located.finding(
                [*base, name], f"field '{name}' is of type {declared.type} in {where}, "
                f"but this source gives {'an' if actual[0] in 'aeiou' else 'a'} {actual}"))
    return out


# --- provenance ------------------------------------------------------------------------------

PROVENANCE_ATTRIBUTES = ("mappingfile", "mappingversion", "mappinghash", "contractversion",
                         "sourceconnection", "sourceaddress")
"""The CloudEvents extension attributes the mapping engine puts on every mapped event; the
forwarder adds ``gatewayid`` and ``sequence`` when it sends (see docs/data-products.md)."""


def mapping_hash(path: Path, mapping: spec.MappingSpec) -> str:
    """The ``mappinghash`` of a mapping file: the first 16 hex digits of the SHA-256 of the
    file's bytes (``sha256sum press07.yaml | cut -c1-16``), so any revision of the file in the
    plant's repository can be matched to the events it produced, whatever the gateway version.
    A file that cannot be read any more (deleted since it was loaded) is hashed as the canonical
    JSON of its validated content instead."""
    try:
        content = path.read_bytes()
    except OSError:
        content = mapping.model_dump_json().encode()
    return hashlib.sha256(content).hexdigest()[:16]


def provenance(file_name: str, mapping: spec.MappingSpec, digest: str, contract: Contract | None,
               connection: str, address: str) -> dict[str, str]:
    """The extension attributes of the events of one mapping event fired by one address
    (computed once per file, event and address, never per event)."""
    out = {
        "mappingfile": file_name,
        "mappingversion": mapping.revision or str(mapping.version),
        "mappinghash": digest,
    }
    if contract is not None:
        out["contractversion"] = contract.version
    out["sourceconnection"] = connection
    out["sourceaddress"] = address
    return out
