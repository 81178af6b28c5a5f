"""Load the mapping directory: discover, parse, validate, cross-check; report every problem at once.

Steps, per file, in name order (``*.yaml`` and ``*.yml``, not recursive, dot-files skipped):

1. parse with :func:`gateway.yamlfile.load` (syntax errors and duplicate keys are located);
2. validate against :class:`~gateway.mapping.spec.MappingSpec` (shape, types, patterns);
3. lint what the schema cannot see: references to signals and attributes of the file, the
   connection of each signal (known, of the protocol of its address block, and of a protocol
   this version can read), and whether each trigger fits its signal: deadbands, thresholds
   and windows on numbers, transitions on named states (``from``/``to`` among the signal's
   ``enum``), edges on booleans, counters on integers (quality triggers take any signal);
   ``{trigger: <attribute>}`` data fields name an attribute the event's trigger kind offers;
   a periodic snapshot reads at least one signal; expressions (a condition's ``when``, a
   ``{expr: ...}`` field) compile against the file's signals (:func:`compile_expression`), their
   errors located at the offending character of the expression.

Then across files: every subject is used by one file only, and one ``(connection, tag)`` is
read with one set of address settings (the source reads each address once).

Binding the same ``(connection, tag)`` to several signals, in one file or in several, is
allowed: each binding is updated from the same readings.

Last, the contracts of ``<directory>/contracts/`` (:mod:`gateway.mapping.contracts`) are loaded
and every event whose type has one is checked against it (required fields produced, no
undeclared field when the contract forbids them, types of sources known statically).

Every finding of every file is collected and :class:`~gateway.errors.ConfigError` is raised once,
each finding located as ``file:line:col path``; nothing is returned unless all files are valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Tag, ValidationError

from gateway import yamlfile
from gateway.errors import ConfigError, Finding
from gateway.mapping import spec
from gateway.mapping.contracts import Contract, check_event, load_contracts
from gateway.mapping.expr import CompiledExpr, ExprError, ResultKind, Variable, compile_expr
from gateway.mapping.spec import MappingSpec, SignalSpec
from gateway.sources.modbus import signal_type_problem
from gateway.sources.modbus_codec import default_order as codec_default_order
from gateway.sources.opcua import OpcUaAddress

SUFFIXES = (".yaml", ".yml")
CONTRACTS_DIRECTORY = "contracts"
"""The subdirectory of the mapping directory holding the event type contracts."""
SUPPORTED_PROTOCOLS = frozenset({"mqtt", "opcua", "modbus"})
"""Protocols whose sources exist in this version; signals on other connections are refused."""
PROTOCOL_TITLES = {"mqtt": "MQTT", "opcua": "OPC UA", "modbus": "Modbus"}

_M = TypeVar("_M", bound=BaseModel)

_PATTERN_WORDS = {
    spec.NAME_PATTERN: "expected a lower-case snake_case name ([a-z][a-z0-9_]*)",
    spec.CONNECTION_PATTERN: "expected a connection name (lower-case snake_case, 1-63 characters)",
    spec.FIELD_PATTERN: "expected an identifier (a letter, then letters, digits or _)",
    spec.EVENT_TYPE_PATTERN: "expected <domain>.<EventName>.v<major>, "
    "e.g. production.MachineStateChanged.v1",
    spec.SUBJECT_PATTERN: "expected a slash-separated asset path such as "
    "acme/plant1/stamping/line2/press07 (no blanks, no empty segment)",
    spec.URI_PATTERN: "expected an absolute URI such as https://schemas.example.com/x.json",
}


@dataclass(frozen=True, slots=True)
class MappingFile:
    """A validated mapping file and where it came from."""

    path: Path
    """The file, as found in the mapping directory (used in messages)."""
    spec: MappingSpec
    """Its validated content."""
    contracts: Mapping[str, Contract] = dataclasses.field(default_factory=dict)
    """Event type -> contract, for the types of this file's events that have one (from the
    ``contracts`` subdirectory of the mapping directory)."""

    @property
    def subject(self) -> str:
        """The asset subject of the file."""
        return self.spec.asset.subject


@dataclass(slots=True)
class _Loaded:
    """A file that passed its own checks, kept with its positions for the cross-file checks."""

    file: MappingFile
    located: yamlfile.Located


def load_mappings(directory: Path, connections: Mapping[str, str]) -> list[MappingFile]:
    """Load and check every mapping file in ``directory``.

    Args:
        directory: The mapping directory (``mappings.directory`` of the gateway config).
        connections: Connection name -> protocol (``mqtt``, ``opcua``, ``modbus``) of the
            gateway config.

    Returns:
        The valid files, in file-name order.

    Raises:
        ConfigError: with every finding of every file, when anything is wrong (including a
            missing or empty directory).
    """
    paths = discover(directory)
    findings: list[Finding] = []
    loaded: list[_Loaded] = []
    for path in paths:
        one, problems = _load_file(path, connections)
        findings += sorted(problems, key=lambda f: (f.line or 0, f.column or 0))
        if one is not None:
            loaded.append(one)
    findings += _lint_across(loaded)
    contracts, problems = load_contracts(directory / CONTRACTS_DIRECTORY)
    findings += problems
    findings += _check_contracts(loaded, contracts)
    if findings:
        raise ConfigError(findings)
    return [
        replace(one.file, contracts={
            t: contracts[t] for t in dict.fromkeys(e.type for e in one.file.spec.events.values())
            if t in contracts
        })
        for one in loaded
    ]


def _check_contracts(loaded: Sequence[_Loaded], contracts: Mapping[str, Contract]) -> list[Finding]:
    """Every event whose type has a contract, checked statically against it."""
    out: list[Finding] = []
    for one in loaded:
        for event_id, event in one.file.spec.events.items():
            contract = contracts.get(event.type)
            if contract is not None:
                out += check_event(event_id, event, one.file.spec, contract, one.located)
    return out


def discover(directory: Path) -> list[Path]:
    """The mapping files of ``directory``, sorted by name.

    Raises:
        ConfigError: if the directory is missing, not a directory, or holds no mapping file.
    """
    if not directory.exists():
        raise _directory_error(
            directory,
            "mapping directory does not exist (set mappings.directory in the gateway config)",
        )
    if not directory.is_dir():
        raise _directory_error(directory, "expected a directory of mapping files, found a file")
    paths = sorted(
        p
        for p in directory.iterdir()
        if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not paths:
        raise _directory_error(
            directory,
            "no mapping files (*.yaml, *.yml) in this directory; the gateway would have nothing to map",
        )
    return paths


def _directory_error(directory: Path, message: str) -> ConfigError:
    return ConfigError([Finding(str(directory), None, None, "", message)])


def _load_file(path: Path, connections: Mapping[str, str]) -> tuple[_Loaded | None, list[Finding]]:
    try:
        data, located = yamlfile.load(path)
    except ConfigError as exc:
        return None, list(exc.findings)
    if data is None:
        return None, [
            located.finding(
                [], "file is empty; expected a mapping file (version, asset, signals, events)"
            )
        ]
    if not isinstance(data, dict):
        return None, [
            located.finding(
                [], f"expected a mapping of version, asset, signals and events, found {_kind(data)}"
            )
        ]
    try:
        parsed = MappingSpec.model_validate(data)
    except ValidationError as exc:
        # Lint the parts that are valid on their own too: all problems in one round.
        problems = _schema_findings(exc, located, data)
        return None, problems + _lint_view(_View.partial(data), located, connections)
    problems = lint(parsed, located, connections)
    return _Loaded(MappingFile(path, parsed), located), problems


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__} ({value!r})"


# --- schema errors -------------------------------------------------------------------------


def _schema_findings(exc: ValidationError, located: yamlfile.Located, data: Any) -> list[Finding]:
    errors = exc.errors(include_url=False)
    misspelt = _misspelt_keys(errors, data)
    out: list[Finding] = []
    for err in errors:
        raw = list(err["loc"])
        loc = clean_loc(raw, data)
        if err["type"] == "missing" and tuple(loc) in misspelt:
            continue  # "unknown key 'triger' (did you mean 'trigger'?)" says it already
        # Scalars are located at the value; mappings (a whole block is wrong) and keys at the key.
        at_value = err["type"] != "extra_forbidden" and not isinstance(err.get("input"), dict)
        finding = located.finding(loc, describe(err, raw), at_value=at_value)
        if finding not in out:
            out.append(finding)
    return out


def _misspelt_keys(errors: Sequence[Any], data: Any) -> set[tuple[str | int, ...]]:
    """Paths of missing keys that an unknown key next to them is a misspelling of."""
    out: set[tuple[str | int, ...]] = set()
    missing = {tuple(clean_loc(e["loc"], data)) for e in errors if e["type"] == "missing"}
    for err in errors:
        if err["type"] != "extra_forbidden":
            continue
        loc = clean_loc(err["loc"], data)
        if not loc:  # a top-level key the cleaning removed (e.g. one with "[" in it)
            continue
        for candidate in missing:
            if list(candidate[:-1]) == loc[:-1] and _did_you_mean(loc[-1], [str(candidate[-1])]):
                out.add(candidate)
    return out


def clean_loc(loc: Sequence[Any], data: Any) -> list[str | int]:
    """The YAML path of a pydantic error location: union tags and ``[key]`` markers removed.

    pydantic inserts a tag after a tagged-union field (``trigger.transition.from``,
    ``data.x.signal-source.signal``). The models tell where: a part that selects a member of the
    tagged union being walked is a tag (even when a key of the same name exists, like an edge
    trigger's ``edge``). Where the models cannot follow, walking the data decides: a part that
    is not a key of the node it applies to, and is not the last part, is a tag; so is anything
    below a scalar.
    """
    out: list[str | int] = []
    node = data
    tp: Any = MappingSpec
    for i, part in enumerate(loc):
        if isinstance(part, str) and "[" in part:
            continue
        member = _union_member(tp, part)
        if member is not None:
            tp = member
            continue
        tp = _child(_unwrap(tp), part) if tp is not None else None
        if isinstance(node, dict):
            if part in node:
                node = node[part]
            elif i != len(loc) - 1:
                continue
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        out.append(part)
    return out


def describe(err: Any, raw_loc: Sequence[Any] = ()) -> str:
    """A human sentence for one pydantic error: what was expected, what was found."""
    kind = err["type"]
    got = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return _unknown_key(raw_loc)
    if kind == "missing":
        return f"required key '{raw_loc[-1]}' is missing" if raw_loc else "required key is missing"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", ""))) or [
            str(ctx.get("expected"))
        ]
        return f"expected one of {', '.join(options)}; got {got!r}{_did_you_mean(got, options)}"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in _PATTERN_WORDS:
        return f"{_PATTERN_WORDS[ctx['pattern']]}; got {got!r}"
    if kind == "union_tag_invalid":
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        name = str(ctx.get("discriminator", "kind")).strip("'")
        return (
            f"unknown {name} {ctx.get('tag')!r}; expected one of {', '.join(tags)}"
            + _did_you_mean(ctx.get("tag"), tags)
        )
    if kind == "union_tag_not_found":
        return f"required key {ctx.get('discriminator', 'kind')} is missing"
    if kind == "value_error":  # our validators' sentences are complete
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "data_source":
        found = (
            f"found keys {', '.join(map(str, got))}" if isinstance(got, dict) else f"got {got!r}"
        )
        return f"{err['msg']} (e.g. {{signal: state}}); {found}"
    return yamlfile.describe(err)


def _unknown_key(raw_loc: Sequence[Any]) -> str:
    key = str(raw_loc[-1]) if raw_loc else "?"
    model = _model_at(raw_loc[:-1])
    if model is None:
        return f"unknown key '{key}'"
    allowed = [field.alias or name for name, field in model.model_fields.items()]
    return f"unknown key '{key}'{_did_you_mean(key, allowed)}; allowed here: {', '.join(allowed)}"


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The spec model that validates the node at the raw pydantic ``loc``."""
    tp: Any = MappingSpec
    for part in loc:
        member = _union_member(tp, part)
        tp = member if member is not None else _child(_unwrap(tp), part)
        if tp is None:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _child(tp: Any, part: Any) -> Any:
    """The type of the node ``part`` below a node of type ``tp`` (None when unknown)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if not isinstance(part, str):
            return None
        for name, field in tp.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
        return tp  # not a field: a tag pydantic inserted (validators, single-member unions)
    origin = typing.get_origin(tp)
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin is list and isinstance(part, int):
        return typing.get_args(tp)[0]
    return None


def _union_member(tp: Any, part: Any) -> Any:
    """The member of the tagged union ``tp`` whose tag is ``part``; None if ``tp`` is not a
    union or no member has that tag."""
    if tp is None or not isinstance(part, str):
        return None
    tp = _unwrap(tp)
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    for member in typing.get_args(tp):
        if _tag_of(member) == part:
            return member
    return None


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if _unwrap(m) is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _tag_of(member: Any) -> str | None:
    """A union member's tag: its ``Tag``, or the literal of its ``kind`` field (the
    discriminator of triggers)."""
    if typing.get_origin(member) is typing.Annotated:
        for meta in typing.get_args(member)[1:]:
            if isinstance(meta, Tag):
                return meta.tag
        member = typing.get_args(member)[0]
    if isinstance(member, type) and issubclass(member, BaseModel) and "kind" in member.model_fields:
        kinds = typing.get_args(member.model_fields["kind"].annotation)
        if len(kinds) == 1 and isinstance(kinds[0], str):
            return kinds[0]
    return None


def _did_you_mean(word: Any, options: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- semantic lint of one file -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _View:
    """What the lint needs of a file: its valid parts, and every declared name.

    ``signals`` maps every declared signal name to its spec, or to None when that signal is
    itself invalid (already reported), so references to it are not reported a second time.
    ``signals`` or ``attributes`` is None when its whole section is unusable (already reported):
    references into it are then not checked.
    """

    signals: Mapping[str, SignalSpec | None] | None
    attributes: Collection[str] | None
    events: Mapping[str, spec.EventSpec | None]

    @classmethod
    def of(cls, parsed: MappingSpec) -> _View:
        return cls(parsed.signals, parsed.asset.attributes, parsed.events)

    @classmethod
    def partial(cls, data: dict[str, Any]) -> _View:
        """The parts of a file that failed validation which are valid on their own."""
        asset = data.get("asset")
        attributes = asset.get("attributes", {}) if isinstance(asset, dict) else None
        signals = data.get("signals")
        return cls(
            _each_valid(signals, SignalSpec, keep_invalid=True)
            if isinstance(signals, dict)
            else None,
            list(attributes) if isinstance(attributes, dict) else None,
            _each_valid(data.get("events"), spec.EventSpec, keep_invalid=False),
        )


def _each_valid(section: Any, model: type[_M], *, keep_invalid: bool) -> dict[str, _M | None]:
    out: dict[str, _M | None] = {}
    for name, raw in section.items() if isinstance(section, dict) else ():
        try:
            out[str(name)] = model.model_validate(raw)
        except ValidationError:
            if keep_invalid:
                out[str(name)] = None
    return out


def lint(
    parsed: MappingSpec, located: yamlfile.Located, connections: Mapping[str, str]
) -> list[Finding]:
    """Cross-reference checks of one valid file against itself and the gateway's connections."""
    return _lint_view(_View.of(parsed), located, connections)


def _lint_view(
    view: _View, located: yamlfile.Located, connections: Mapping[str, str]
) -> list[Finding]:
    out: list[Finding] = []
    for name, signal in (view.signals or {}).items():
        if signal is not None:
            out += _lint_connection(name, signal, located, connections)
    for event_id, event in view.events.items():
        if event is not None:
            out += _lint_event(view, event_id, event, located)
    return out


def _lint_connection(
    name: str, signal: SignalSpec, located: yamlfile.Located, connections: Mapping[str, str]
) -> list[Finding]:
    path = ["signals", name, "connection"]
    conn = signal.connection
    if conn not in connections:
        known = ", ".join(sorted(connections)) or "none are configured"
        message = (
            f"unknown connection '{conn}'{_did_you_mean(conn, connections)}; "
            f"connections of the gateway config: {known}"
        )
        return [located.finding(path, message, at_value=True)]
    protocol = connections[conn]
    if protocol not in SUPPORTED_PROTOCOLS:
        title = PROTOCOL_TITLES.get(protocol, protocol)
        supported = ", ".join(sorted(SUPPORTED_PROTOCOLS))
        message = (
            f"connection '{conn}' uses {title}: {title} sources arrive in a later "
            f"release; only {supported} connections can be mapped in this version"
        )
        return [located.finding(path, message, at_value=True)]
    if signal.connection_protocol != protocol:
        others = "".join(f" (or a '{b}' block)" for b, p in spec.BLOCK_CONNECTION_PROTOCOL.items()
                         if p == protocol)
        message = (
            f"connection '{conn}' is a {protocol} connection but this signal has a "
            f"'{signal.protocol}' address block; use a '{protocol}' block{others}"
        )
        return [located.finding(["signals", name, signal.protocol], message)]
    if signal.opcua is not None:
        return _lint_opcua(name, signal, signal.opcua, located)
    if signal.modbus is not None:
        problem = signal_type_problem(signal.modbus, signal.type)
        if problem is not None:
            return [located.finding(["signals", name, "type"], problem, at_value=True)]
    return []


def _lint_opcua(
    name: str, signal: SignalSpec, address: OpcUaAddress, located: yamlfile.Located
) -> list[Finding]:
    """What an OPC UA address block cannot check alone: a raw namespace index (fragile), a
    deadband on a signal that is not a number."""
    base: list[str | int] = ["signals", name, "opcua"]
    out: list[Finding] = []
    ref = address.node_ref
    if ref is not None and ref.fragile and not address.allow_namespace_index:
        message = (
            f"node id '{address.node}' names its namespace by index {ref.namespace_index}: the "
            f"server numbers its namespaces and the numbers can change when it restarts or its "
            f"configuration changes, silently pointing the signal at another node; write the "
            f"namespace URI (nsu=<uri>;{ref.kind}={ref.identifier}, the URIs are in the server's "
            f"NamespaceArray) or set allow_namespace_index: true to accept the risk"
        )
        out.append(located.finding([*base, "node"], message, at_value=True))
    if address.deadband is not None and (
        signal.type not in spec.NUMERIC_TYPES or signal.enum is not None
    ):
        out.append(
            located.finding(
                [*base, "deadband"],
                f"a deadband needs a numeric (float or integer) signal; "
                f"{_typed(signal, name)}",
            )
        )
    return out


def _lint_event(
    view: _View, event_id: str, event: spec.EventSpec, located: yamlfile.Located
) -> list[Finding]:
    base: list[str | int] = ["events", event_id]
    trigger = event.trigger
    out: list[Finding] = []
    watched = spec.trigger_signal(trigger)
    if watched is not None:
        out += _check_signal(view, watched, [*base, "trigger", "signal"], located)
        signal = (view.signals or {}).get(watched)
        if signal is not None:
            out += _lint_trigger(trigger, signal, [*base, "trigger"], located)
    elif isinstance(trigger, spec.ConditionTrigger):
        out += _check_expression(
            view, trigger.when, [*base, "trigger", "when"], "boolean", located
        )
    elif not any(
        isinstance(src, (spec.SignalSource, spec.PreviousSource, spec.QualitySource))
        for src in event.data.values()
    ):
        message = (
            "a periodic snapshot needs data that reads at least one signal ({signal: ...}, "
            "{previous: ...} or {quality: ...}): it is taken only once one of them has a value"
        )
        out.append(located.finding([*base, "data" if event.data else "trigger"], message))
    if event.when is not None:
        out += _check_expression(view, event.when, [*base, "when"], "boolean", located)
    for field, source in event.data.items():
        where: list[str | int] = [*base, "data", field]
        if isinstance(source, spec.AttributeSource):
            out += _check_attribute(view, source.attribute, [*where, "attribute"], located)
        elif isinstance(source, spec.SignalSource):
            out += _check_signal(view, source.signal, [*where, "signal"], located)
        elif isinstance(source, spec.PreviousSource):
            out += _check_signal(view, source.previous, [*where, "previous"], located)
        elif isinstance(source, spec.QualitySource):
            out += _check_signal(view, source.quality, [*where, "quality"], located)
        elif isinstance(source, spec.TriggerSource):
            out += _check_trigger_attribute(trigger.kind, source.trigger, where, located)
        elif isinstance(source, spec.ExprSource):
            out += _check_expression(view, source.expr, [*where, "expr"], "any", located)
    return out


def expression_variables(signals: Mapping[str, SignalSpec]) -> dict[str, Variable]:
    """The variables an expression of a file may read: its signals, typed as their converted
    values are (a signal with ``enum`` labels is a string)."""
    return {
        name: Variable(name, "string" if signal.enum is not None else signal.type)
        for name, signal in signals.items()
    }


def compile_expression(
    text: str, signals: Mapping[str, SignalSpec], result: ResultKind
) -> CompiledExpr:
    """Compile an expression of a file over its signals; raises
    :class:`~gateway.mapping.expr.ExprError` when it is wrong."""
    return compile_expr(text, expression_variables(signals), result=result)


def _check_expression(
    view: _View, text: str, path: list[str | int], result: ResultKind, located: yamlfile.Located
) -> list[Finding]:
    signals = view.signals
    if signals is None or any(signal is None for signal in signals.values()):
        return []  # an invalid signal is reported already; its type is unknown
    valid = {name: signal for name, signal in signals.items() if signal is not None}
    try:
        compiled = compile_expression(text, valid, result)
    except ExprError as exc:
        return [_expression_finding(located, path, text, exc)]
    if result == "boolean" and not compiled.names:
        message = (
            "the condition reads no signal, so no reading ever evaluates it; "
            f"name at least one of: {', '.join(valid)}"
        )
        return [located.finding(path, message, at_value=True)]
    return []


def _expression_finding(
    located: yamlfile.Located, path: list[str | int], text: str, exc: ExprError
) -> Finding:
    """The error at the offending character of the expression when the scalar is on one line
    (plain, or quoted without escapes); else at the scalar, with the column in the message."""
    line, col = located.value_position(path)
    message = exc.message
    if line is None or col is None or exc.column is None:
        return Finding(located.file, line, col, yamlfile.dotted(path), message)
    try:
        source = Path(located.file).read_text(encoding="utf-8").splitlines()[line - 1]
    except (OSError, UnicodeDecodeError, IndexError):
        source = ""
    start = col + 1 if source[col - 1 : col] in ("'", '"') else col
    if "\n" not in text and source[start - 1 : start - 1 + len(text)] == text:
        return Finding(located.file, line, start + exc.column - 1, yamlfile.dotted(path), message)
    return Finding(
        located.file,
        line,
        col,
        yamlfile.dotted(path),
        f"{message} (at column {exc.column} of the expression)",
    )


def _lint_trigger(
    trigger: spec.Trigger, signal: SignalSpec, path: list[str | int], located: yamlfile.Located
) -> list[Finding]:
    """Whether the trigger fits the type (and enum) of its signal."""
    name = spec.trigger_signal(trigger) or ""
    at_signal: list[str | int] = [*path, "signal"]
    is_number = signal.type in spec.NUMERIC_TYPES and signal.enum is None
    if isinstance(trigger, (spec.QualityTrigger, spec.PeriodicTrigger, spec.ConditionTrigger)):
        return []  # any signal has a quality; periodic and condition triggers have no signal
    if isinstance(trigger, spec.WindowTrigger):
        if not is_number:
            hint = (
                " (for a boolean use kind: edge)"
                if signal.type == "boolean"
                else " (for named states use kind: transition)"
            )
            return [
                located.finding(
                    at_signal,
                    f"a window trigger aggregates numbers: it needs a numeric (float or "
                    f"integer) signal; {_typed(signal, name)}{hint}",
                    at_value=True,
                )
            ]
        return []
    if isinstance(trigger, spec.OnChangeTrigger):
        if trigger.deadband is not None and not is_number:
            return [
                located.finding(
                    [*path, "deadband"],
                    f"a deadband needs a numeric (float or integer) signal; {_typed(signal, name)}",
                )
            ]
        return []
    if isinstance(trigger, spec.ThresholdTrigger):
        if not is_number:
            return [
                located.finding(
                    at_signal,
                    f"a threshold trigger needs a numeric (float or integer) signal; "
                    f"{_typed(signal, name)}",
                    at_value=True,
                )
            ]
        return []
    if isinstance(trigger, spec.CounterTrigger):
        if signal.type != "integer" or signal.enum is not None:
            return [
                located.finding(
                    at_signal,
                    f"a counter trigger needs an integer signal; {_typed(signal, name)}",
                    at_value=True,
                )
            ]
        return []
    if isinstance(trigger, spec.EdgeTrigger):
        if signal.type != "boolean":
            hint = (
                " (for a number crossing a limit use kind: threshold)"
                if signal.type in spec.NUMERIC_TYPES and signal.enum is None
                else " (for named states use kind: transition)"
            )
            return [
                located.finding(
                    at_signal,
                    f"an edge trigger needs a boolean signal; {_typed(signal, name)}{hint}",
                    at_value=True,
                )
            ]
        return []
    return _lint_transition(trigger, signal, path, located)


def _lint_transition(
    trigger: spec.TransitionTrigger,
    signal: SignalSpec,
    path: list[str | int],
    located: yamlfile.Located,
) -> list[Finding]:
    name = trigger.signal
    if not (
        signal.type == "string" or (signal.type == "integer" and isinstance(signal.enum, dict))
    ):
        hint = {
            "integer": " (give it an enum mapping codes to state names, e.g. "
            "{0: Idle, 1: Running})",
            "boolean": " (for a boolean use kind: edge)",
            "float": " (for a number crossing a limit use kind: threshold)",
        }[signal.type]
        return [
            located.finding(
                [*path, "signal"],
                f"a transition trigger needs a signal with named states (a string signal, or an "
                f"integer signal with an enum); {_typed(signal, name)}{hint}",
                at_value=True,
            )
        ]
    states = spec.enum_states(signal)
    if states is None:
        return []
    out: list[Finding] = []
    for key, listed in (("from", trigger.from_), ("to", trigger.to)):
        for i, state in enumerate(listed or ()):
            if state not in states:
                out.append(
                    located.finding(
                        [*path, key, i],
                        f"unknown state '{state}'{_did_you_mean(state, states)}; states of "
                        f"signal '{name}' (its enum): {', '.join(states)}",
                        at_value=True,
                    )
                )
    return out


def _typed(signal: SignalSpec, name: str) -> str:
    """``'x' is of type float`` (or ``... an integer signal with enum labels``)."""
    if signal.enum is not None and signal.type in spec.NUMERIC_TYPES:
        return f"'{name}' is an {signal.type} signal with an enum (its values are the labels)"
    return f"'{name}' is of type {signal.type}"


def _and(words: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} and {words[-1]}"


def _check_trigger_attribute(
    kind: str, attribute: str, where: list[str | int], located: yamlfile.Located
) -> list[Finding]:
    offered = spec.TRIGGER_ATTRIBUTES[kind]
    if attribute in offered:
        return []
    if offered:
        available = f"which offers {', '.join(offered)}"
    else:
        available = "which offers none (use {signal: ...} or {previous: ...})"
    users = [k for k, attrs in spec.TRIGGER_ATTRIBUTES.items() if attribute in attrs]
    if users:
        message = (
            f"'{attribute}' is an attribute of {_and(users)} triggers; this event's "
            f"trigger is {kind}, {available}"
        )
    else:
        message = (
            f"unknown trigger attribute '{attribute}'{_did_you_mean(attribute, offered)}; "
            f"this event's trigger is {kind}, {available}"
        )
    return [located.finding([*where, "trigger"], message, at_value=True)]


def _check_signal(
    view: _View, name: str, path: list[str | int], located: yamlfile.Located
) -> list[Finding]:
    if view.signals is None or name in view.signals:
        return []
    known = ", ".join(view.signals) or "none"
    message = (
        f"unknown signal '{name}'{_did_you_mean(name, view.signals)}; signals of this file: {known}"
    )
    return [located.finding(path, message, at_value=True)]


def _check_attribute(
    view: _View, name: str, path: list[str | int], located: yamlfile.Located
) -> list[Finding]:
    if view.attributes is None or name in view.attributes:
        return []
    known = ", ".join(view.attributes) or "none (asset.attributes is empty)"
    message = (
        f"unknown attribute '{name}'{_did_you_mean(name, view.attributes)}; "
        f"attributes of this asset: {known}"
    )
    return [located.finding(path, message, at_value=True)]


# --- checks across files -------------------------------------------------------------------


def _lint_across(loaded: Sequence[_Loaded]) -> list[Finding]:
    # Positions are looked up only for a finding: on valid files that would cost a parse
    # with marks (see gateway.yamlfile).
    out: list[Finding] = []
    subjects: dict[str, yamlfile.Located] = {}
    addresses: dict[tuple[str, str], tuple[yamlfile.Located, str, spec.Address]] = {}
    for one in loaded:
        subject = one.file.subject
        if subject in subjects:
            first = _where(subjects[subject], ["asset", "subject"], value=True)
            out.append(
                one.located.finding(
                    ["asset", "subject"],
                    f"subject '{subject}' is already mapped by {first}; "
                    f"one asset, one mapping file (merge the files or fix a subject)",
                    at_value=True,
                )
            )
        else:
            subjects[subject] = one.located
        out += _address_conflicts(one, addresses)
    out += _modbus_overlaps(loaded)
    return out


def _modbus_overlaps(loaded: Sequence[_Loaded]) -> list[Finding]:
    """Registers read as two different values (a float32 at 4 and a uint16 at 5, or one start
    with two types or orders) are a mistake in one of them; a bit of a register next to the
    whole register is not (status words are read both ways)."""
    out: list[Finding] = []
    spans: dict[tuple[str, int, str], list[tuple[int, int, str, str, _Loaded, str]]] = {}
    for one in loaded:
        for name, signal in one.file.spec.signals.items():
            address = signal.modbus
            if address is None:
                continue
            try:
                table, start = address.location
                lay = address.layout
            except ValueError:
                continue  # reported on the address itself
            if table in ("coil", "discrete_input") or lay.bit is not None:
                continue
            key = (signal.connection, address.unit, table)
            end = start + lay.registers - 1
            what = lay.type + (f"[{lay.length}]" if lay.type == "string" else "") + (
                f" {lay.order}" if lay.order and lay.order != codec_default_order(lay.type) else "")
            for o_start, o_end, o_what, o_tag, o_one, o_name in spans.get(key, []):
                if o_end < start or end < o_start or o_tag == address.tag:
                    continue
                first = (_where(o_one.located, ["signals", o_name, "modbus"])
                         + f" signals.{o_name}")
                out.append(one.located.finding(
                    ["signals", name, "modbus"],
                    f"reads {table.replace('_', ' ')}s {start}..{end} of unit {address.unit} as "
                    f"{what}, but {first} reads {o_start}..{o_end} as {o_what}: one of the two "
                    f"layouts is wrong (check the device's register map; `digispine-gateway "
                    f"probe modbus` shows what the registers hold)"))
            spans.setdefault(key, []).append((start, end, what, address.tag, one, name))
    return out


def _address_conflicts(
    one: _Loaded, seen: dict[tuple[str, str], tuple[yamlfile.Located, str, spec.Address]]
) -> list[Finding]:
    """One address, one way to read it: the same tag with other settings is a conflict."""
    out: list[Finding] = []
    for name, signal in one.file.spec.signals.items():
        address = signal.address
        key = (signal.connection, address.tag)
        path: list[str | int] = ["signals", name, signal.protocol]
        if key not in seen:
            seen[key] = (one.located, name, address)
            continue
        first_located, first_name, first = seen[key]
        if first != address:
            first_where = (_where(first_located, ["signals", first_name, signal.protocol])
                           + f" signals.{first_name}")
            mine, theirs = address.model_dump(), first.model_dump()
            differ = ", ".join(k for k in mine if mine[k] != theirs.get(k))
            out.append(
                one.located.finding(
                    path,
                    f"reads the same address as {first_where} with other settings ({differ}); "
                    f"an address is read one way: make them agree",
                )
            )
    return out


def _where(located: yamlfile.Located, path: Sequence[str | int], *, value: bool = False) -> str:
    line, col = located.value_position(path) if value else located.position(path)
    return f"{located.file}:{line}:{col}"
