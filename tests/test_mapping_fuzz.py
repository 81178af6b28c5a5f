"""Fuzzing the mapping loader and engine: no input makes them raise anything unplanned.

Properties (Hypothesis):

1. Any text, and any bytes (invalid UTF-8 included), written as a mapping file: ``load_mappings``
   returns, or raises :class:`~gateway.errors.ConfigError`, never anything else; every finding
   names its file and says something.
2. A valid mapping document (the shipped examples and one of our own with every trigger kind),
   mutated (keys deleted or renamed, values replaced by scalars, lists, mappings, wrong types,
   huge numbers, NaN/inf, unicode, deep nesting) and dumped with ruamel.yaml: only ConfigError,
   and every finding then has a line number (the file parses, so every problem has a place).
3. The Mapper, for a valid file with every trigger kind, never raises on any reading value
   (None, NaN, inf, huge ints, strings, bytes, lists, mappings, booleans), quality or time
   (decreasing ones included), through ``map`` and ``tick``.

Crashes found and not fixed yet are pinned by deterministic ``test_known_*`` cases at the end
(``xfail(strict=True)``: they fail as soon as the bug is fixed, so that the mark is removed) and
listed in :data:`KNOWN_CRASHES`: the properties skip an input that hits one of those (same
exception type, same function), so that they stay green and keep looking for new ones.

Examples are kept modest (the whole file runs in well under 30 s) and no example database is
written (``database=None``).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from gateway.errors import ConfigError, Finding
from gateway.mapping import Mapper, load_mappings
from gateway.mapping.loader import MappingFile
from gateway.model import Quality, Signal, representable
from gateway.sources.mqtt import unix_time

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = {"plant_mqtt": "mqtt", "cell_opcua": "opcua", "press_modbus": "modbus"}
T0 = 1_795_903_200.0

EXAMPLES = int(os.environ.get("MAPPING_FUZZ_EXAMPLES", "200"))
"""Examples per property (structured fuzzing: 4/5 of it); raise it for a deeper run."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)

KNOWN_CRASHES: dict[tuple[type[BaseException], str], str] = {
    # (exception type, qualified name of the innermost gateway function it escaped from):
    # the test_known_* case below that pins it. The properties reject (skip) an input that
    # hits one of these, so that they keep looking for new crashes; a fix makes the pinned
    # case XPASS (strict), and then its line here goes too.
}
"""Crashes found by these properties and not fixed yet."""


def _signature(exc: BaseException) -> tuple[type[BaseException], str] | None:
    """The known crash ``exc`` is, if any: matched on its type and the innermost frame of the
    gateway package it went through."""
    innermost = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.startswith(str(ROOT / "gateway")):
            innermost = code.co_qualname
        tb = tb.tb_next
    if innermost is None:
        return None
    for kind, where in KNOWN_CRASHES:
        if isinstance(exc, kind) and (innermost == where or innermost.startswith(where + ".")):
            return kind, where
    return None


@contextmanager
def known_crashes_rejected() -> Iterator[None]:
    """Run the block; an input that hits a known crash is rejected (not counted as an example)
    instead of failing the property."""
    try:
        yield
    except Exception as exc:
        if _signature(exc) is not None:
            reject()
        raise


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory whose single mapping file each example overwrites."""
    return tmp_path_factory.mktemp("fuzz")


def load_or_error(directory: Path) -> ConfigError | None:
    """``load_mappings``: None when the files load, the ConfigError (checked) when not; any
    other exception propagates and fails the test."""
    try:
        with known_crashes_rejected():
            load_mappings(directory, CONNECTIONS)
    except ConfigError as exc:
        assert exc.findings, "a ConfigError without findings"
        for finding in exc.findings:
            assert isinstance(finding, Finding)
            assert isinstance(finding.file, str) and finding.file, finding
            assert isinstance(finding.message, str) and finding.message.strip(), finding
            assert str(finding)  # renders
        assert str(exc)
        return exc
    return None


def write_text(directory: Path, text: str) -> None:
    (directory / "m.yaml").write_text(text, encoding="utf-8")


def write_bytes(directory: Path, raw: bytes) -> None:
    (directory / "m.yaml").write_bytes(raw)


def dump(document: Any) -> str:
    yaml = YAML(typ="rt")
    yaml.allow_unicode = True
    buf = io.StringIO()
    yaml.dump(document, buf)
    return buf.getvalue()


@functools.cache
def shipped() -> dict[str, str]:
    """The example files of the repository, by name."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "mappings").glob("*.yaml"))}


# --- 1. arbitrary text and bytes -------------------------------------------------------------

KEYS = (
    "version", "asset", "subject", "attributes", "signals", "events", "tests", "connection",
    "mqtt", "opcua", "modbus", "topic", "value_path", "timestamp_path", "type", "unit", "scale",
    "offset", "enum", "dataschema", "trigger", "kind", "signal", "deadband", "absolute",
    "percent", "on_first_value", "from", "to", "edge", "min_duration_ms", "rollover_at",
    "max_delta", "on_reset", "above", "below", "hysteresis", "crossings", "data", "previous",
    "quality", "attribute", "const", "name", "given", "expect", "value", "at_s", "stale_after_s",
    "on", "every_s", "grace_s", "emit_empty",
)
WORDS = (
    "1", "0", "-1", "2", "1.5", "1e400", "-1e400", ".nan", ".inf", "-.inf", "null", "~", "true",
    "false", "yes", "no", "on_change", "transition", "edge", "counter", "threshold", "quality",
    "periodic", "window", "rising", "falling", "both", "emit", "skip", "float", "integer",
    "boolean", "string", "plant_mqtt", "cell_opcua", "press_modbus", "plant_mqt", "a/b/c",
    "a/#", "a/+/b", "#/a", "production.MachineStateChanged.v1", "x.Y.v1", "Running", "Idle",
    "state", "temperature", "state_duration_s", "delta", "crossing", "2001-12-14", "12:30:00",
    "0x1F", "0o17", "1_000", "!!binary aGVsbG8=", "!!str 1", "!!int x", "!!float x", "!!set",
    "!!omap", "!!python/object:os.system", "!custom x", "&a 1", "*a", "*undefined", "<<: *a",
    "'quoted'", '"dq\\u00e9"', '"\\x00"', "|", ">-", "[", "]", "{", "}", ",", "? ", ": ", "- ",
    "#c", "%YAML 1.2", "%TAG ! tag:x,2000:", "---", "...", "\t", "\u00e9", "\u2028", "\ufeff",
    "\U0001f600", "x" * 200, "9" * 30,
)


@st.composite
def yamlish(draw: st.DrawFn) -> str:
    """Lines of YAML-looking tokens: keys of the format, values, indicators, tags, anchors."""
    token = st.one_of(st.sampled_from(KEYS), st.sampled_from(WORDS), st.text(max_size=6))
    lines = []
    for _ in range(draw(st.integers(0, 14))):
        indent = " " * draw(st.sampled_from([0, 0, 1, 2, 2, 4, 6]))
        parts = draw(st.lists(token, min_size=1, max_size=4))
        sep = draw(st.sampled_from([": ", " ", ":", ": {", ": [", "\n- ", ", "]))
        lines.append(indent + sep.join(parts))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@st.composite
def spliced_shipped(draw: st.DrawFn) -> str:
    """A shipped example file with a few slices cut, inserted, swapped or duplicated."""
    files = shipped()
    text = files[draw(st.sampled_from(sorted(files)))]
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        op = draw(st.sampled_from(["cut", "insert", "swap", "dup", "indent", "chars"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        j = draw(st.integers(i, min(len(lines), i + 6)))
        if op == "cut":
            del lines[i:j]
        elif op == "insert":
            lines.insert(i, draw(yamlish()))
        elif op == "swap" and j < len(lines):
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "dup":
            lines[i:i] = lines[i:j]
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 5)) + lines[i].lstrip()
        else:
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.text(max_size=4)) + lines[i][pos:]
        text = "\n".join(lines)
    return text


@FUZZ
@given(text=st.one_of(st.text(), yamlish(), spliced_shipped()))
@example(text="")
@example(text="---\n...\n")
@example(text="a: 1\na: 2\n")
@example(text="- 1\n- 2\n")
@example(text="version: 1\n---\nversion: 1\n")
@example(text="&a [*a]")
@example(text="version: !!python/object:os.system 1\n")
@example(text="? [a, b]\n: 1\n")
@example(text="version: 1\nasset: {subject: a/b}\nsignals: {}\nevents: {}\n")
@example(text="\ufeffversion: 1\n")
@example(text="version: 2001-12-14\nasset: !!binary aGVsbG8=\n")
@example(text="[" * 300)
@example(text="{a: " * 300)
def test_any_text_loads_or_is_a_config_error(scratch: Path, text: str) -> None:
    write_text(scratch, text)
    load_or_error(scratch)


INVALID_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80",
                b"\xf4\x90\x80\x80", b"\x00", b"\xef\xbb\xbf", b"\r", b"\r\n")


@st.composite
def broken_bytes(draw: st.DrawFn) -> bytes:
    """A shipped file's bytes with invalid UTF-8, NULs, BOMs or CRs spliced in."""
    files = shipped()
    raw = files[draw(st.sampled_from(sorted(files)))].encode("utf-8")
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.sampled_from(INVALID_UTF8)) + raw[pos:]
    return raw


@FUZZ
@given(raw=st.one_of(st.binary(), broken_bytes(), st.text().map(lambda t: t.encode("utf-16"))))
@example(raw=b"\xff\xfe")
@example(raw=b"version: 1\n\xff")
@example(raw=b"\x00\x00\x00")
def test_any_bytes_load_or_are_a_config_error(scratch: Path, raw: bytes) -> None:
    write_bytes(scratch, raw)
    load_or_error(scratch)


# --- 2. structured fuzzing of valid documents -------------------------------------------------

EVERY_KIND: dict[str, Any] = {
    "version": 1,
    "asset": {"subject": "acme/plant1/assembly/line3/cell01",
              "attributes": {"machine_type": "robot_cell", "line": "line3", "weight": 2.5}},
    "signals": {
        "state": {"connection": "plant_mqtt",
                  "mqtt": {"topic": "c/status", "value_path": "state", "timestamp_path": "ts"},
                  "type": "string", "enum": ["Idle", "Setup", "Running", "Fault"]},
        "mode": {"connection": "plant_mqtt",
                 "mqtt": {"topic": "c/status", "value_path": "mode", "timestamp_path": "ts"},
                 "type": "integer", "enum": {0: "Idle", 1: "Setup", 2: "Running", 3: "Fault"}},
        "door": {"connection": "plant_mqtt",
                 "mqtt": {"topic": "c/status", "value_path": "door", "timestamp_path": "ts"},
                 "type": "boolean"},
        "counter": {"connection": "plant_mqtt",
                    "mqtt": {"topic": "c/status", "value_path": "counter", "timestamp_path": "ts"},
                    "type": "integer"},
        "temperature": {"connection": "plant_mqtt",
                        "mqtt": {"topic": "c/+/telemetry", "value_path": "t.c"},
                        "type": "float", "unit": "degC", "scale": 0.1, "offset": -273.15},
    },
    "events": {
        "state_changed": {
            "type": "production.MachineStateChanged.v1",
            "dataschema": "https://schemas.example.com/state.json",
            "trigger": {"kind": "transition", "signal": "state", "from": ["Running"],
                        "to": ["Idle", "Fault"], "on_first_value": "skip"},
            "data": {"state": {"signal": "state"}, "previous": {"previous": "state"},
                     "quality": {"quality": "state"}, "line": {"attribute": "line"},
                     "duration": {"trigger": "state_duration_s"}, "unit": {"const": "degC"}},
        },
        "mode_changed": {
            "type": "production.ModeChanged.v1",
            "trigger": {"kind": "transition", "signal": "mode", "on_first_value": "emit"},
            "data": {"mode": {"signal": "mode"}},
        },
        "door_opened": {
            "type": "safety.GuardDoorOpened.v1",
            "trigger": {"kind": "edge", "signal": "door", "edge": "rising",
                        "min_duration_ms": 500},
            "data": {"edge": {"trigger": "edge"}, "closed_for_s": {"trigger": "state_duration_s"}},
        },
        "cycles": {
            "type": "production.CyclesCompleted.v1",
            "trigger": {"kind": "counter", "signal": "counter", "rollover_at": 65535,
                        "max_delta": 50, "on_reset": "count_from_zero"},
            "data": {"cycles": {"trigger": "delta"}},
        },
        "temperature_changed": {
            "type": "process.TemperatureChanged.v1",
            "trigger": {"kind": "on_change", "signal": "temperature",
                        "deadband": {"absolute": 2.0}},
            "data": {"temperature": {"signal": "temperature"}},
        },
        "too_hot": {
            "type": "quality.TemperatureLimitCrossed.v1",
            "trigger": {"kind": "threshold", "signal": "temperature", "above": 860.0,
                        "hysteresis": 5.0, "crossings": ["enter", "leave"]},
            "data": {"crossing": {"trigger": "crossing"}},
        },
    },
    "tests": [
        {"name": "a transition", "given": [{"signal": "state", "value": "Running", "at_s": 0},
                                           {"signal": "state", "value": "Idle", "at_s": 10}],
         "expect": [{"type": "production.MachineStateChanged.v1",
                     "data": {"state": "Idle", "previous": "Running", "quality": "good",
                              "line": "line3", "duration": None, "unit": "degC"}}]},
    ],
}


def seeds() -> list[Any]:
    """Valid documents to mutate: ours (twice: it is the smallest, so the fastest) and the
    shipped examples without their test cases (ours has one; they make a file slow to parse)."""
    out: list[Any] = [EVERY_KIND, EVERY_KIND]
    yaml = YAML(typ="safe")
    for text in shipped().values():
        document = yaml.load(text)
        if isinstance(document, dict):
            document.pop("tests", None)
        out.append(document)
    return out


def _valid(document: Any, directory: Path) -> bool:
    write_text(directory, dump(document))
    return load_or_error(directory) is None


_SEEDS: list[Any] | None = None


def valid_seeds(directory: Path) -> list[Any]:
    global _SEEDS
    if _SEEDS is None:
        _SEEDS = [d for d in seeds() if _valid(d, directory)]
    return _SEEDS


def test_seeds_are_valid(scratch: Path) -> None:
    """The structured fuzzing starts from valid documents (ours at least)."""
    assert _valid(EVERY_KIND, scratch)
    assert valid_seeds(scratch)


def _near_miss(key: str) -> st.SearchStrategy[str]:
    """Typos of a key: a letter dropped, doubled or upper-cased, a suffix."""
    variants = {key[:-1], key + key[-1:], key.upper(), key.capitalize(), key + "s", "_" + key,
                key.replace("_", "-"), key.replace("_", "")}
    return st.sampled_from(sorted(v for v in variants if v and v != key))


FUZZ_KEYS = st.one_of(
    st.sampled_from(KEYS), st.text(max_size=12), st.sampled_from(["x[", "a[0]", "[key]", "a.b", ""]),
    st.integers(-5, 5), st.booleans(), st.none(), st.floats(allow_nan=False),
)
HUGE = st.sampled_from([2**31, 2**32 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30),
                        10**308, 10**400, 1e308, -1e308, 5e-324, 1e-300])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(WORDS),
    st.sampled_from(KEYS),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(FUZZ_KEYS, children, max_size=4)),
    max_leaves=12,
)


def _paths(node: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path below the root (keys and indices)."""
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return
    for key, child in items:
        path = (*here, key)
        yield path
        yield from _paths(child, path)


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


def _nest(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = {f"k{i}": value} if i % 2 else [value]
    return value


@st.composite
def mutated(draw: st.DrawFn, directory: Path) -> Any:
    """A valid seed with 1-6 mutations below its root."""
    document = copy.deepcopy(draw(st.sampled_from(valid_seeds(directory))))
    for _ in range(draw(st.integers(1, 6))):
        paths = list(_paths(document))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(document, path[:-1]), path[-1]
        value = parent[key]
        op = draw(st.sampled_from(["delete", "replace", "replace", "rename", "wrap", "unwrap",
                                   "retype", "nest", "add", "duplicate", "number"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(VALUES)
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(_near_miss(str(key)) if str(key) else FUZZ_KEYS, FUZZ_KEYS))
            parent[new] = parent.pop(key)
        elif op == "wrap":
            parent[key] = [value] if draw(st.booleans()) else {draw(FUZZ_KEYS): value}
        elif op == "unwrap" and isinstance(value, dict | list) and value:
            children = list(value.values()) if isinstance(value, dict) else value
            parent[key] = draw(st.sampled_from(children))
        elif op == "retype":
            parent[key] = draw(st.sampled_from([
                str(value), [value], None, True, 0, -1, 1.5, "", {}, [],
                list(value) if isinstance(value, dict) else value,
            ]))
        elif op == "nest":
            parent[key] = _nest(value, draw(st.integers(1, 40)))
        elif op == "add" and isinstance(value, dict):
            value[draw(FUZZ_KEYS)] = draw(VALUES)
        elif op == "duplicate" and isinstance(parent, dict):
            parent[draw(FUZZ_KEYS)] = copy.deepcopy(value)
        elif op == "number":
            parent[key] = draw(st.one_of(HUGE, st.floats(allow_nan=True, allow_infinity=True),
                                         st.sampled_from([0, -1, 1, 0.5, -0.0, 65535, 4294967295])))
    return document


@settings(FUZZ, max_examples=EXAMPLES * 4 // 5)
@given(data=st.data())
def test_mutated_documents_load_or_have_located_findings(scratch: Path, data: st.DataObject) -> None:
    document = data.draw(mutated(scratch))
    text = dump(document)
    write_text(scratch, text)
    error = load_or_error(scratch)
    if error is not None:
        unlocated = [f for f in error.findings if f.line is None]
        assert not unlocated, f"findings without a line:\n{unlocated}\n--- file:\n{text}"


# --- 3. the Mapper never raises on a reading --------------------------------------------------

ENGINE_FILE = """\
version: 1
asset:
  subject: acme/fuzz/cell01
  attributes: {line: line3, weight: 2.5, flag: true}
signals:
  state: {connection: plant_mqtt, mqtt: {topic: f/s, value_path: state, timestamp_path: ts}, type: string, enum: [Idle, Setup, Running, Fault]}
  code: {connection: plant_mqtt, mqtt: {topic: f/s, value_path: code, timestamp_path: ts}, type: string, enum: {A: Alpha, B: Beta}}
  mode: {connection: plant_mqtt, mqtt: {topic: f/s, value_path: mode, timestamp_path: ts}, type: integer, enum: {0: Idle, 1: Setup, 2: Running, 3: Fault, 4: Fault}}
  text: {connection: plant_mqtt, mqtt: {topic: f/text}, type: string}
  door: {connection: plant_mqtt, mqtt: {topic: f/s, value_path: door, timestamp_path: ts}, type: boolean}
  counter: {connection: plant_mqtt, mqtt: {topic: f/s, value_path: counter, timestamp_path: ts}, type: integer}
  counter16: {connection: plant_mqtt, mqtt: {topic: f/s, value_path: counter16, timestamp_path: ts}, type: integer}
  pieces: {connection: plant_mqtt, mqtt: {topic: f/s, value_path: pieces, timestamp_path: ts}, type: integer, scale: 2, offset: 1}
  temperature: {connection: plant_mqtt, mqtt: {topic: f/t, value_path: t, timestamp_path: ts}, type: float, scale: 0.1, offset: -273.15}
  temperature_text: {connection: plant_mqtt, mqtt: {topic: f/t, value_path: t, timestamp_path: ts}, type: string}
  pressure: {connection: plant_mqtt, mqtt: {topic: f/t, value_path: p, timestamp_path: ts}, type: float}
  level: {connection: plant_mqtt, mqtt: {topic: f/t, value_path: level, timestamp_path: ts}, type: integer}
events:
  state_changed:
    type: production.MachineStateChanged.v1
    trigger: {kind: transition, signal: state, on_first_value: emit}
    data: {state: {signal: state}, previous: {previous: state}, quality: {quality: state},
           duration: {trigger: state_duration_s}, line: {attribute: line}, k: {const: null}}
  run_ended:
    type: production.RunEnded.v1
    trigger: {kind: transition, signal: state, from: [Running], to: [Idle, Fault]}
    data: {duration: {trigger: state_duration_s}}
  code_changed:
    type: production.CodeChanged.v1
    trigger: {kind: transition, signal: code}
    data: {code: {signal: code}}
  mode_changed:
    type: production.ModeChanged.v1
    trigger: {kind: transition, signal: mode, on_first_value: emit, to: [Running, Fault]}
    data: {mode: {signal: mode}, previous: {previous: mode}}
  text_changed:
    type: process.TextChanged.v1
    trigger: {kind: on_change, signal: text}
    data: {text: {signal: text}, previous: {previous: text}}
  door_opened:
    type: safety.GuardDoorOpened.v1
    trigger: {kind: edge, signal: door, edge: rising, min_duration_ms: 500}
    data: {closed_for_s: {trigger: state_duration_s}, edge: {trigger: edge}}
  door_moved:
    type: safety.GuardDoorMoved.v1
    trigger: {kind: edge, signal: door, edge: both, on_first_value: emit}
    data: {edge: {trigger: edge}, duration: {trigger: state_duration_s}}
  door_closed:
    type: safety.GuardDoorClosed.v1
    trigger: {kind: edge, signal: door, edge: falling, min_duration_ms: 0.001}
    data: {door: {signal: door}}
  parts:
    type: production.PartsProduced.v1
    trigger: {kind: counter, signal: counter, rollover_at: 4294967295, max_delta: 1000}
    data: {parts: {trigger: delta}, counter: {signal: counter}}
  cycles:
    type: production.CyclesCompleted.v1
    trigger: {kind: counter, signal: counter16, rollover_at: 65535, max_delta: 50, on_reset: count_from_zero}
    data: {cycles: {trigger: delta}}
  pieces_counted:
    type: production.PiecesCounted.v1
    trigger: {kind: counter, signal: pieces, on_reset: count_from_zero}
    data: {pieces: {trigger: delta}}
  temperature_changed:
    type: process.TemperatureChanged.v1
    trigger: {kind: on_change, signal: temperature, deadband: {absolute: 2.0}, on_first_value: skip}
    data: {t: {signal: temperature}, as_text: {signal: temperature_text}}
  pressure_changed:
    type: process.PressureChanged.v1
    trigger: {kind: on_change, signal: pressure, deadband: {percent: 5}}
    data: {p: {signal: pressure}}
  level_changed_pct:
    type: process.LevelChanged.v1
    trigger: {kind: on_change, signal: level, deadband: {percent: 5}}
    data: {level: {signal: level}}
  level_changed_abs:
    type: process.LevelMoved.v1
    trigger: {kind: on_change, signal: level, deadband: {absolute: 3}}
    data: {level: {signal: level}}
  too_hot:
    type: quality.TemperatureLimitCrossed.v1
    trigger: {kind: threshold, signal: temperature, above: 86.0, hysteresis: 5.0, on_first_value: emit}
    data: {crossing: {trigger: crossing}, since: {trigger: state_duration_s}}
  pressure_low:
    type: maintenance.PressureLow.v1
    trigger: {kind: threshold, signal: pressure, below: 5.5, hysteresis: 0.3, crossings: [enter]}
    data: {p: {signal: pressure}}
  level_high:
    type: quality.LevelHigh.v1
    trigger: {kind: threshold, signal: level, above: 100}
    data: {crossing: {trigger: crossing}}
"""

ENGINE_EXTRAS = {
    # Trigger kinds beyond the five of the first release: used when the loader accepts them.
    "quality": """\
  temperature_quality:
    type: maintenance.SignalQualityChanged.v1
    trigger: {kind: quality, signal: temperature, stale_after_s: 5}
    data: {quality: {trigger: quality}, previous: {trigger: previous_quality},
           reason: {trigger: reason}, duration: {trigger: state_duration_s}}
  door_quality:
    type: maintenance.DoorQualityChanged.v1
    trigger: {kind: quality, signal: door, on: [bad, good]}
    data: {quality: {trigger: quality}}
""",
    "periodic": """\
  snapshot:
    type: process.Snapshot.v1
    trigger: {kind: periodic, every_s: 2}
    data: {state: {signal: state}, t: {signal: temperature}, q: {quality: pressure}}
""",
    "window": """\
  pressure_window:
    type: process.PressureAggregated.v1
    trigger: {kind: window, signal: pressure, every_s: 3, emit_empty: true}
    data: {count: {trigger: count}, min: {trigger: min}, max: {trigger: max},
           mean: {trigger: mean}, first: {trigger: first}, last: {trigger: last},
           start: {trigger: window_start}}
  level_window:
    type: process.LevelAggregated.v1
    trigger: {kind: window, signal: level, every_s: 5, grace_s: 0}
    data: {count: {trigger: count}, mean: {trigger: mean}}
""",
}

# A second asset fed by one of the same addresses (a tag bound in two files).
ENGINE_FILE_2 = """\
version: 1
asset: {subject: acme/fuzz/cell02}
signals:
  temperature: {connection: plant_mqtt, mqtt: {topic: f/t, value_path: t, timestamp_path: ts}, type: integer}
events:
  temperature_changed:
    type: process.TemperatureChanged.v1
    trigger: {kind: on_change, signal: temperature}
    data: {t: {signal: temperature}, q: {quality: temperature}, p: {previous: temperature}}
"""

TAGS = {
    "state": "f/s#state", "code": "f/s#code", "mode": "f/s#mode", "text": "f/text",
    "door": "f/s#door", "counter": "f/s#counter", "counter16": "f/s#counter16",
    "pieces": "f/s#pieces", "temperature": "f/t#t", "pressure": "f/t#p", "level": "f/t#level",
    "unbound": "f/unbound",
}


def _load_engine_files(directory: Path, extras: list[str]) -> list[MappingFile] | None:
    for old in directory.glob("*.yaml"):
        old.unlink()
    (directory / "a.yaml").write_text(
        ENGINE_FILE + "".join(ENGINE_EXTRAS[k] for k in extras), encoding="utf-8")
    (directory / "b.yaml").write_text(ENGINE_FILE_2, encoding="utf-8")
    try:
        return load_mappings(directory, CONNECTIONS)
    except ConfigError:
        return None


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory: pytest.TempPathFactory) -> list[MappingFile]:
    """The files above, with every extra trigger kind the loader accepts."""
    directory = tmp_path_factory.mktemp("engine")
    base = _load_engine_files(directory, [])
    assert base is not None, "the engine fuzz mapping must load"
    accepted = [k for k in ENGINE_EXTRAS if _load_engine_files(directory, [k]) is not None]
    files = _load_engine_files(directory, accepted)
    assert files is not None
    return files


def test_engine_file_has_every_trigger_kind(engine_files: list[MappingFile]) -> None:
    kinds = {e.trigger.kind for f in engine_files for e in f.spec.events.values()}
    assert {"on_change", "transition", "edge", "counter", "threshold"} <= kinds


MAX_JSON_INT = 10**4300 - 1
"""The largest integer the MQTT source's JSON decoder (msgspec) accepts: 4300 digits, Python's
``int`` <-> ``str`` limit. Larger ones are outside what any source delivers (see
test_known_huge_int_text for what they do)."""

READING_VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(),
    st.sampled_from([0, 1, -1, 2, 3, 4, 7, 49, 50, 51, 100, 101, 65534, 65535, 65536,
                     4294967294, 4294967295, 2**63, -(2**63), 10**30, 10**300, -(10**300),
                     2**1024, 10**400, -(10**400), MAX_JSON_INT, -MAX_JSON_INT]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 5.4, 5.5, 5.8, 86.0, 86.5, 1e308, -1e308, 5e-324,
                     float("nan"), float("inf"), float("-inf")]),
    st.sampled_from(["Idle", "Setup", "Running", "Fault", "A", "B", "true", "false", "TRUE",
                     " 1 ", "0", "1", "12", "12.0", "12.5", "1e400", "-1e400", "nan", "inf",
                     "", " ", "0x10", "1_000", "\u0661", "9" * 50, "9" * 400]),
    st.text(max_size=10), st.binary(max_size=10),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=3),
    st.sampled_from([(), (1,), frozenset(), object(), 1j, bytearray(b"x")]),
)
QUALITIES = st.sampled_from([Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.UNCERTAIN,
                             Quality.BAD])
STATUS = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.text(max_size=8))
ADVANCE = st.one_of(
    st.sampled_from([0.0, 0.0, 0.1, 0.4, 0.5, 0.6, 1.0, 1.0, 2.0, 3.0, 5.0, 6.0, 30.0, 3600.0,
                     -0.5, -1.0, -3600.0]),
    st.floats(-10.0, 10.0),
    st.floats(-1e6, 1e6),
)
SKEW = st.one_of(st.none(), st.just(0.0), st.floats(-5.0, 5.0))
"""Source time minus receive time: none (no timestamp), or a device clock a little off."""
FAR_SKEW = st.sampled_from([-T0 + 1.0, 1e10, -1e10, 1e17, 1e300, -1e300])
"""A device clock that is far off (rarely: an event past the year 2**31 cannot be encoded
today, test_known_far_future_event_time, and such a script is rejected)."""
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "state": st.sampled_from(["Idle", "Setup", "Running", "Fault"]),
    "code": st.sampled_from(["A", "B", "C"]),
    "mode": st.integers(0, 5),
    "text": st.text(max_size=4),
    "door": st.one_of(st.booleans(), st.sampled_from([0, 1, "true", "false"])),
    "counter": st.one_of(st.integers(0, 2000), st.integers(4294966000, 4294967295)),
    "counter16": st.one_of(st.integers(0, 100), st.integers(65500, 65535)),
    "pieces": st.integers(0, 1200),
    "temperature": st.floats(700.0, 1000.0),
    "pressure": st.floats(4.0, 7.0),
    "level": st.integers(0, 200),
    "unbound": st.integers(),
}
"""Values a device would send for each signal, so that triggers get to fire."""

Step = tuple[Any, ...]


@st.composite
def steps(draw: st.DrawFn) -> list[Step]:
    """Readings and ticks on a clock that mostly moves forward, sometimes back or far; values
    plausible for the signal or anything at all."""
    out: list[Step] = []
    # A few signals per script, so that each gets a sequence of readings its triggers act on.
    focus = draw(st.lists(st.sampled_from(sorted(TAGS)), min_size=1, max_size=3, unique=True))
    clock = draw(st.sampled_from([T0] * 8 + [0.0, 1.0, -T0, 1e11, 1e300]))
    for _ in range(draw(st.integers(1, 60))):
        clock += draw(ADVANCE)
        if draw(st.integers(0, 4)) == 0:
            out.append(("tick", clock + draw(st.floats(-2.0, 10.0))))
            continue
        skew = draw(FAR_SKEW if draw(st.integers(0, 99)) == 0 else SKEW)
        source = None if skew is None else clock + skew
        name = draw(st.sampled_from(focus))
        value = draw(PLAUSIBLE[name] if draw(st.integers(0, 2)) else READING_VALUES)
        out.append(("map", name, value, draw(QUALITIES), draw(STATUS), source, clock))
    return out


def run(files: list[MappingFile], script: list[Step]) -> int:
    """Feed the script to a fresh Mapper; the number of events (built in full)."""
    mapper = Mapper(files, "fuzz-gw")
    events = 0
    with known_crashes_rejected():
        for step in script:
            events += _step(mapper, step)
    return events


def _step(mapper: Mapper, step: Step) -> int:
    if step[0] == "tick":
        out = mapper.tick(step[1])
    else:
        _, name, value, quality, status, source, received = step
        signal = Signal("plant_mqtt", TAGS[name], value, quality, status, source, received)
        out = mapper.map(signal)
    for event in out:
        assert isinstance(event.data, dict)
        assert isinstance(event.id, str) and event.id
        if representable(event.time):
            event.encode()  # what the pipeline does next: the buffer stores the encoded event
        else:  # the pipeline drops (and counts) these before the buffer; encode refuses them
            with pytest.raises(ValueError, match="outside 1970-01-01"):
                event.encode()
    return len(out)


@FUZZ
@given(script=steps())
@example(script=[("map", "state", "Running", Quality.GOOD, None, T0, T0),
                 ("map", "state", "Idle", Quality.GOOD, None, T0 - 10, T0 + 1),
                 ("map", "door", True, Quality.GOOD, None, T0, T0 + 2),
                 ("tick", T0 + 3.0), ("tick", T0 - 100.0), ("tick", T0 + 100.0)])
@example(script=[("map", "counter", 4294967295, Quality.GOOD, None, None, T0),
                 ("map", "counter", 0, Quality.GOOD, None, None, T0),
                 ("map", "counter16", 65535, Quality.GOOD, None, None, T0),
                 ("map", "counter16", 3, Quality.BAD, 7, None, T0),
                 ("map", "counter16", 2, Quality.GOOD, None, None, T0)])
@example(script=[("map", "pressure", 1e308, Quality.GOOD, None, T0, T0),
                 ("map", "pressure", -1e308, Quality.GOOD, None, T0 + 1, T0 + 1),
                 ("map", "pressure", 1e308, Quality.GOOD, None, T0 + 9, T0 + 9),
                 ("tick", T0 + 60)])
@example(script=[("map", "level", 10**300, Quality.GOOD, None, T0, T0),
                 ("map", "level", -(10**300), Quality.GOOD, None, T0 + 1, T0 + 1)])
def test_mapper_never_raises(engine_files: list[MappingFile], script: list[Step]) -> None:
    events = run(engine_files, script)
    assert events >= 0


@FUZZ
@given(times=st.lists(st.one_of(*[st.floats(-1e10, 1e10)] * 3, st.floats(-1e300, 1e300)),
                      max_size=30),
       value=READING_VALUES)
def test_tick_never_raises_on_any_clock(
    engine_files: list[MappingFile], times: list[float], value: Any
) -> None:
    """Readings of every signal and ticks at arbitrary (also decreasing) times. Within
    +-1e300: sources deliver at most ~1.8e305 s and the gateway clock is time.time(); nearer
    the float limit, sums of two times overflow to inf (a window's close limit, say)."""
    mapper = Mapper(engine_files, "fuzz-gw")
    with known_crashes_rejected():
        for now in times:
            for name in TAGS:
                _step(mapper, ("map", name, value, Quality.GOOD, None, now, now))
            _step(mapper, ("tick", now))


# --- crashes found by the properties above, pinned until fixed --------------------------------
# Each case is the minimal input of one entry of KNOWN_CRASHES. When a fix lands, the case
# XPASSes (strict: the run fails): remove its mark and its KNOWN_CRASHES entry.


def _one_signal_mapper(tmp: Path, signal_yaml: str, trigger_yaml: str) -> Mapper:
    """A Mapper of one file: signal ``n`` on topic ``t`` and event ``e`` with that trigger."""
    (tmp / "m.yaml").write_text(
        "version: 1\nasset: {subject: a/b}\nsignals:\n  n: " + signal_yaml
        + "\nevents:\n  e:\n    type: x.Y.v1\n    trigger: " + trigger_yaml + "\n",
        encoding="utf-8")
    try:
        return Mapper(load_mappings(tmp, CONNECTIONS), "gw")
    except ConfigError as exc:  # a trigger kind of a later release (window) is not there
        pytest.skip(f"this version does not load the case: {exc}")


INT_SIGNAL = "{connection: plant_mqtt, mqtt: {topic: t}, type: integer}"
FLOAT_SIGNAL = "{connection: plant_mqtt, mqtt: {topic: t}, type: float}"


def test_a_top_level_key_with_a_bracket_is_a_config_error(tmp_path: Path) -> None:
    """Found by the properties: an unknown key with '[' next to missing keys crashed the
    did-you-mean pass (IndexError)."""
    (tmp_path / "m.yaml").write_text('"x[": 1\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_mappings(tmp_path, CONNECTIONS)
    assert all(f.line is not None for f in info.value.findings)


def test_a_recursive_alias_is_a_config_error(tmp_path: Path) -> None:
    """An anchored node that contains itself (found by the properties): a finding, not a hang."""
    (tmp_path / "m.yaml").write_text("&a [*a]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="alias refers to itself"):
        load_mappings(tmp_path, CONNECTIONS)


def test_an_integer_beyond_64_bits_is_a_bad_reading(tmp_path: Path) -> None:
    """Found by the properties: 2**1024 as a baseline overflowed the percent deadband on every
    later reading. Integers beyond 64 bits are now conversion failures (no device sends them)."""
    mapper = _one_signal_mapper(tmp_path, INT_SIGNAL,
                                "{kind: on_change, signal: n, deadband: {percent: 5}}")
    assert mapper.map(Signal("plant_mqtt", "t", 2**1024, receive_time=T0)) == []
    assert mapper.conversion_errors == 1
    (event,) = mapper.map(Signal("plant_mqtt", "t", 1, receive_time=T0 + 1))
    assert event.type == "x.Y.v1"  # the first good reading is the baseline and fires


def test_a_far_future_event_time_is_refused_by_encode_and_by_the_mqtt_source(tmp_path: Path) -> None:
    """Found by the properties: such a time used to crash deep in time.gmtime. The MQTT source
    now treats a timestamp past 9999 as malformed, the pipeline drops (counts) an event it
    cannot encode, and encode itself says why."""
    mapper = _one_signal_mapper(tmp_path, FLOAT_SIGNAL, "{kind: on_change, signal: n}")
    (event,) = mapper.map(Signal("plant_mqtt", "t", 1.0, source_time=1e17, receive_time=T0))
    with pytest.raises(ValueError, match="outside 1970-01-01"):
        event.encode()
    assert unix_time(1e20) is None and unix_time("10000-01-01T00:00:00Z") is None
    assert unix_time(1_700_000_000_000) == 1_700_000_000.0


def test_an_integer_too_long_to_print_is_a_bad_reading(tmp_path: Path) -> None:
    """Found by the properties: str() of a 5000-digit integer raised ValueError out of map()."""
    mapper = _one_signal_mapper(
        tmp_path, "{connection: plant_mqtt, mqtt: {topic: t}, type: string}",
        "{kind: on_change, signal: n}")
    assert mapper.map(Signal("plant_mqtt", "t", 10**5000, receive_time=T0)) == []
    assert mapper.conversion_errors == 1


# --- deterministic edges of the properties ---------------------------------------------------


def test_huge_int_literal_in_a_file_is_a_config_error(tmp_path: Path) -> None:
    """A 5000-digit number in a mapping file: a ConfigError (ruamel cannot convert it)."""
    (tmp_path / "m.yaml").write_text("version: " + "9" * 5000 + "\n", encoding="utf-8")
    assert load_or_error(tmp_path) is not None


def test_nan_and_inf_in_numeric_options_are_located_config_errors(tmp_path: Path) -> None:
    document = copy.deepcopy(EVERY_KIND)
    events = document["events"]
    events["too_hot"]["trigger"]["above"] = math.nan
    events["temperature_changed"]["trigger"]["deadband"]["absolute"] = math.inf
    document["signals"]["temperature"]["scale"] = -math.inf
    events["door_opened"]["trigger"]["min_duration_ms"] = math.nan
    write_text(tmp_path, dump(document))
    error = load_or_error(tmp_path)
    assert error is not None
    assert all(f.line is not None for f in error.findings), error
    assert len(error.findings) >= 4, error
