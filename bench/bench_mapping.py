"""Throughput of the mapping engine alone: Signals in, DomainEvents out, no broker, no buffer.

    python -m bench.bench_mapping              # 1,000 assets x 20 signals, 1,000,000 readings per mix
    python -m bench.bench_mapping --quick      # 50 assets, 50,000 readings: a smoke run in seconds
    python -m bench.bench_mapping --profile    # also a cProfile of the expression mix (c)
    python -m bench.bench_mapping --assets 200 --readings 200000 --profile b

It writes a realistic plant into a temporary directory, twice: one mapping file per machine
(subject ``acme/plant1/area<k>/line<j>/m<i>``), each with ``--signals`` signals (20 by default)
on the MQTT connection ``plant_mqtt`` and every trigger kind the loader accepts:

- ``on_change`` with absolute and percent deadbands on float telemetry;
- ``transition`` on a string state signal (enum list) and on an integer mode code (enum map),
  with and without ``from``/``to`` filters;
- ``edge`` on booleans, debounced (``min_duration_ms``) and not;
- ``counter`` on a uint32 part counter (``rollover_at`` + ``max_delta``) and a uint16 cycle
  counter (``count_from_zero``);
- ``threshold`` above and below a limit, with hysteresis;
- further kinds (quality, periodic, window) only if this loader accepts them (probed).

The second plant has the same signals and events plus expressions (docs/expressions.md):
``when:`` guards on some events (``state != 'Idle'``, ``state in ['Running', 'Setup']``, ...),
``{expr: ...}`` computed data fields (unit conversions such as ``temperature * 1.8 + 32.0``,
ratios and products of two signals, ``? :`` choices, ``min``/``abs``/``double``) and
``condition`` triggers over two or three signals (``door_open && state == 'Running'``), with
computed fields of their own. Both plants are loaded the normal way (``load_mappings``).

It then builds, with a fixed seed, a stream of readings as the plant would send them (every
signal of every machine once per simulated second, machines in shuffled order, device
timestamps, a few ms of latency): telemetry noise below the deadbands with set-point steps and
drifts now and then, states that change now and then, counters that advance (and, rarely,
reset), door bounces, limit excursions, rare sensor glitches (a value that does not convert);
about 8% of the readings fire an event. Figures, each the best of 3 passes (``--passes``) over
the whole pre-built list, GC on, timed in CPU time of the process (``time.process_time``: the
engine is single-threaded, so this is signals per second of one core, and a busy machine that
deschedules the benchmark does not count; the best wall-clock pass is shown too). Before each
pass every signal and trigger state is reset in place, so each pass starts as a fresh Mapper;
the passes go round-robin over the mixes (each round starting at the next mix), so a noisy
neighbour slows them alike:

- ``(a) on_change/transition``: readings of the float telemetry and state signals only (the
  target: 200,000 signals/s on one core);
- ``(b) all kinds``: readings of every signal, the plant without expressions (every trigger
  kind but ``condition``, which is an expression);
- ``(b) + tick/s``: (b) plus ``Mapper.tick(now)`` once per simulated second (periodic, window
  and quality triggers fire from it);
- ``(c) all kinds + expr``: the same readings as (b) on the plant with expressions (all nine
  kinds);
- ``(c) + tick/s``: (c) plus the ticks.

Each with its ratio to (a) of the same run, plus the time ``load_mappings`` takes for the files,
the Mapper construction time, and what the expressions did in one pass of (c) (events the
guards dropped, evaluations without a value). ``--profile`` adds the top 15 functions of a
cProfile run of mix (c) (or of the mix named: ``--profile a|b|c``), by own and by cumulative
time, the share of the time spent evaluating expressions, and which trigger kinds the events
came from.

The readings of a second are built as a list before the clock starts: the figures are the
engine's alone (no JSON decoding, no source, no buffer). With 1,000 machines the engine's
state (~20,000 signals, ~26,000 triggers) no longer fits in the CPU caches: the same readings
over 100 machines map about twice as fast. The plant with expressions takes longer to load
and to build a Mapper for (each expression is compiled by the loader and again by the engine).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import json
import math
import pstats
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.errors import ConfigError
from gateway.mapping import Mapper, MappingFile, load_mappings
from gateway.model import DomainEvent, Signal

CONNECTION = "plant_mqtt"
CONNECTIONS = {CONNECTION: "mqtt"}
SEED = 20261128
T0 = 1_795_903_200.0
"""Simulated start (Unix seconds)."""
PASSES = 3
"""Passes per figure (``--passes``); the fastest counts."""
TARGET = 200_000
"""signals/s the on_change/transition mix must reach on one core."""

STATES = ["Idle", "Setup", "Running", "Fault"]
MODES = {0: "Idle", 1: "Setup", 2: "Running", 3: "Fault", 4: "Fault"}


# --- the plant: signal templates -------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One kind of signal of a machine: how it is declared, which events it feeds, how it
    behaves. ``events`` are YAML lines of the ``events:`` section with ``{s}`` for the signal
    name and ``{k}`` for a per-signal suffix of event ids."""

    name: str
    group: str
    """``telemetry`` / ``state`` (mix a) or ``bool`` / ``counter`` / ``threshold``."""
    topic: str
    """Topic suffix under the machine's subject."""
    declaration: str
    """The YAML of the signal after ``connection`` and ``mqtt``."""
    events: str
    kind: str
    """Generator of its readings (see :class:`Machine`)."""
    params: tuple[float, ...] = ()


def _float(unit: str) -> str:
    return f"type: float\n    unit: {unit}"


def _on_change(event: str, deadband: str, **data: str) -> str:
    return (
        f"  {{s}}_changed{{k}}:\n"
        f"    type: process.{event}.v1\n"
        f"    trigger: {{{{kind: on_change, signal: {{s}}, deadband: {deadband}}}}}\n"
        f"    data: {{{{value: {{{{signal: {{s}}}}}}, previous: {{{{previous: {{s}}}}}}, "
        f"line: {{{{attribute: line}}}}}}}}\n"
    )


def _threshold(event: str, limit: str, hysteresis: float, crossings: str = "[enter, leave]") -> str:
    return (
        f"  {{s}}_limit{{k}}:\n"
        f"    type: quality.{event}.v1\n"
        f"    trigger: {{{{kind: threshold, signal: {{s}}, {limit}, hysteresis: {hysteresis}, "
        f"crossings: {crossings}}}}}\n"
        f"    data: {{{{crossing: {{{{trigger: crossing}}}}, value: {{{{signal: {{s}}}}}}, "
        f"since_s: {{{{trigger: state_duration_s}}}}}}}}\n"
    )


# params of telemetry: nominal, noise sigma, deadband-relative step size, drift amplitude
TEMPLATES: list[Template] = [
    Template(
        "state", "state", "state",
        "type: string\n    enum: [Idle, Setup, Running, Fault]",
        "  machine_state_changed{k}:\n"
        "    type: production.MachineStateChanged.v1\n"
        "    trigger: {{kind: transition, signal: {s}, on_first_value: emit}}\n"
        "    data:\n"
        "      state: {{signal: {s}}}\n"
        "      previous_state: {{previous: {s}}}\n"
        "      previous_state_duration_s: {{trigger: state_duration_s}}\n"
        "      machine_type: {{attribute: machine_type}}\n"
        "      line: {{attribute: line}}\n"
        "  run_ended{k}:\n"
        "    type: production.RunEnded.v1\n"
        "    trigger: {{kind: transition, signal: {s}, from: [Running], to: [Idle, Fault]}}\n"
        "    data: {{run_duration_s: {{trigger: state_duration_s}}, ended_in: {{signal: {s}}}}}\n",
        "state",
    ),
    Template(
        "temperature", "telemetry", "telemetry", _float("degC"),
        _on_change("TemperatureChanged", "{{absolute: 2.0}}"), "telemetry", (60.0, 0.25, 2.0, 1.5),
    ),
    Template(
        "door_open", "bool", "status", "type: boolean",
        "  door_opened{k}:\n"
        "    type: safety.GuardDoorOpened.v1\n"
        "    trigger: {{kind: edge, signal: {s}, edge: rising, min_duration_ms: 500}}\n"
        "    data: {{closed_for_s: {{trigger: state_duration_s}}, state: {{signal: state}}}}\n"
        "  door_closed{k}:\n"
        "    type: safety.GuardDoorClosed.v1\n"
        "    trigger: {{kind: edge, signal: {s}, edge: falling, min_duration_ms: 500}}\n"
        "    data: {{open_for_s: {{trigger: state_duration_s}}}}\n",
        "bool", (0.004, 0.3),
    ),
    Template(
        "part_counter", "counter", "telemetry", "type: integer",
        "  parts_produced{k}:\n"
        "    type: production.PartsProduced.v1\n"
        "    trigger: {{kind: counter, signal: {s}, rollover_at: 4294967295, max_delta: 1000}}\n"
        "    data: {{parts: {{trigger: delta}}, part_counter: {{signal: {s}}}}}\n",
        "counter", (4294967295.0, 0.3),
    ),
    Template(
        "oil_temperature", "threshold", "telemetry", _float("degC"),
        _threshold("OilTemperatureLimitCrossed", "above: 75.0", 3.0), "threshold", (70.0, 8.0),
    ),
    Template(
        "hydraulic_pressure", "telemetry", "telemetry", _float("bar"),
        _on_change("HydraulicPressureChanged", "{{percent: 2.0}}"), "telemetry",
        (180.0, 0.4, 3.6, 3.0),
    ),
    Template(
        "mode", "state", "status",
        "type: integer\n    enum: {0: Idle, 1: Setup, 2: Running, 3: Fault, 4: Fault}",
        "  mode_changed{k}:\n"
        "    type: production.ModeChanged.v1\n"
        "    trigger: {{kind: transition, signal: {s}}}\n"
        "    data: {{mode: {{signal: {s}}}, previous_mode: {{previous: {s}}}, "
        "duration_s: {{trigger: state_duration_s}}}}\n"
        "  fault_raised{k}:\n"
        "    type: maintenance.FaultRaised.v1\n"
        "    trigger: {{kind: transition, signal: {s}, to: [Fault]}}\n"
        "    data: {{mode: {{signal: {s}}}}}\n",
        "mode",
    ),
    Template(
        "spindle_speed", "telemetry", "telemetry", _float("rpm"),
        _on_change("SpindleSpeedChanged", "{{absolute: 25.0}}"), "telemetry",
        (1200.0, 3.0, 25.0, 20.0),
    ),
    Template(
        "e_stop", "bool", "status", "type: boolean",
        "  e_stop{k}:\n"
        "    type: safety.EmergencyStop.v1\n"
        "    trigger: {{kind: edge, signal: {s}, edge: both}}\n"
        "    data: {{edge: {{trigger: edge}}, duration_s: {{trigger: state_duration_s}}}}\n",
        "bool", (0.002, 0.0),
    ),
    Template(
        "vibration", "telemetry", "telemetry", _float("mm/s"),
        _on_change("VibrationChanged", "{{absolute: 0.5}}"), "telemetry", (2.5, 0.06, 0.5, 0.4),
    ),
    Template(
        "cycle_counter", "counter", "status", "type: integer",
        "  cycles_completed{k}:\n"
        "    type: production.CyclesCompleted.v1\n"
        "    trigger: {{kind: counter, signal: {s}, rollover_at: 65535, max_delta: 50, "
        "on_reset: count_from_zero}}\n"
        "    data: {{cycles: {{trigger: delta}}, cycle_counter: {{signal: {s}}}}}\n",
        "counter", (65535.0, 0.15),
    ),
    Template(
        "motor_current", "telemetry", "telemetry", _float("A"),
        _on_change("MotorCurrentChanged", "{{percent: 5.0}}"), "telemetry", (42.0, 0.2, 2.1, 1.8),
    ),
    Template(
        "air_pressure", "threshold", "status", _float("bar"),
        _threshold("AirPressureLow", "below: 5.5", 0.3, "[enter]"), "threshold", (6.1, 0.7),
    ),
    Template(
        "coolant_flow", "telemetry", "telemetry", _float("l/min"),
        _on_change("CoolantFlowChanged", "{{absolute: 1.0}}"), "telemetry", (24.0, 0.12, 1.0, 0.8),
    ),
    Template(
        "clamp_closed", "bool", "status", "type: boolean",
        "  clamp_released{k}:\n"
        "    type: production.ClampReleased.v1\n"
        "    trigger: {{kind: edge, signal: {s}, edge: falling}}\n"
        "    data: {{closed_for_s: {{trigger: state_duration_s}}}}\n",
        "bool", (0.01, 0.0),
    ),
    Template(
        "supply_voltage", "telemetry", "telemetry", _float("V"),
        _on_change("SupplyVoltageChanged", "{{absolute: 5.0}}"), "telemetry",
        (400.0, 0.6, 5.0, 4.0),
    ),
    Template(
        "motor_temperature", "threshold", "telemetry", _float("degC"),
        _threshold("MotorTemperatureLimitCrossed", "above: 90.0", 5.0), "threshold", (80.0, 12.0),
    ),
    Template(
        "torque", "telemetry", "telemetry", _float("Nm"),
        _on_change("TorqueChanged", "{{absolute: 4.0}}"), "telemetry", (150.0, 0.5, 4.0, 3.0),
    ),
    Template(
        "humidity", "telemetry", "telemetry", _float("'%'"),
        _on_change("HumidityChanged", "{{absolute: 2.0}}"), "telemetry", (45.0, 0.25, 2.0, 1.5),
    ),
    Template(
        "feed_rate", "telemetry", "telemetry", _float("mm/min"),
        _on_change("FeedRateChanged", "{{percent: 1.0}}"), "telemetry",
        (800.0, 0.9, 8.0, 6.0),
    ),
]
"""20 signals per machine: 10 float telemetry, 2 with named states, 3 booleans, 2 counters,
3 limits; interleaved so that ``--signals`` below 20 still gets a mix."""

MIX_A_GROUPS = frozenset({"telemetry", "state"})

# Trigger kinds beyond the five the documentation describes: (kind, the signal template it
# watches, YAML variants of one event: the first one the loader accepts is used). A kind is
# included only if the loader accepts it (probed at start-up), so the benchmark follows the
# language as it grows without depending on any of them. They watch signals that only the full
# mix reads (mix (a) stays on_change/transition), and a periodic trigger runs on tick alone.
EXTRA_KINDS: list[tuple[str, str | None, list[str]]] = [
    (
        "quality", "oil_temperature", [
            "  {s}_quality{k}:\n"
            "    type: maintenance.SignalQualityChanged.v1\n"
            "    trigger: {{kind: quality, signal: {s}, stale_after_s: 30}}\n"
            "    data: {{quality: {{trigger: quality}}, previous_quality: "
            "{{trigger: previous_quality}}, reason: {{trigger: reason}}}}\n",
            "  {s}_quality{k}:\n"
            "    type: maintenance.SignalQualityChanged.v1\n"
            "    trigger: {{kind: quality, signal: {s}}}\n"
            "    data: {{quality: {{quality: {s}}}}}\n",
        ],
    ),
    (
        "periodic", None, [
            "  snapshot{k}:\n"
            "    type: process.MachineSnapshot.v1\n"
            "    trigger: {{kind: periodic, every_s: 15}}\n"
            "    data: {{state: {{signal: state}}, temperature: {{signal: temperature}}}}\n",
        ],
    ),
    (
        "window", "motor_temperature", [
            "  {s}_window{k}:\n"
            "    type: process.MotorTemperatureAggregated.v1\n"
            "    trigger: {{kind: window, signal: {s}, every_s: 10}}\n"
            "    data: {{count: {{trigger: count}}, min: {{trigger: min}}, max: {{trigger: max}}, "
            "mean: {{trigger: mean}}}}\n",
            "  {s}_window{k}:\n"
            "    type: process.MotorTemperatureAggregated.v1\n"
            "    trigger: {{kind: window, signal: {s}, every_s: 10}}\n"
            "    data: {{value: {{signal: {s}}}}}\n",
        ],
    ),
]


# --- expressions (mix (c)) -------------------------------------------------------------------
# Added to the events of the signals of the first 20 (names without a suffix), each only when the
# file has every signal it reads (fewer ``--signals``: fewer expressions). String literals in
# single quotes, so that the names an expression reads are the identifiers outside them.

GUARDS: dict[str, str] = {
    "spindle_speed_changed": "state != 'Idle'",
    "vibration_changed": "spindle_speed > 100.0 && !e_stop",
    "parts_produced": "state in ['Running', 'Setup']",
    "oil_temperature_limit": "state != 'Idle' || spindle_speed > 100.0",
    "door_opened": "mode != 'Setup'",
}
"""Event id -> its ``when:`` guard (evaluated when the trigger fires)."""

EXPR_FIELDS: dict[str, dict[str, str]] = {
    "temperature_changed": {"value_degf": "temperature * 1.8 + 32.0"},
    "hydraulic_pressure_changed": {"value_psi": "hydraulic_pressure * 14.5038"},
    "motor_current_changed": {"power_kw": "motor_current * supply_voltage * 1.732 / 1000.0"},
    "torque_changed": {
        "mech_power_kw": "torque * spindle_speed / 9549.0",
        "load_pct": "min(torque / 250.0 * 100.0, 100.0)",
    },
    "feed_rate_changed": {
        "feed_per_rev_mm": "spindle_speed > 0.0 ? feed_rate / spindle_speed : 0.0",
    },
    "humidity_changed": {"climate": "humidity > 60.0 ? 'humid' : 'ok'"},
    "cycles_completed": {
        "parts_per_cycle": "cycle_counter > 0 ? double(part_counter) / double(cycle_counter) : 0.0",
    },
    "oil_temperature_limit": {"margin_c": "75.0 - oil_temperature"},
    "motor_temperature_limit": {"deviation_c": "abs(motor_temperature - 90.0)"},
    "snapshot": {
        "temperature_degf": "temperature * 1.8 + 32.0",
        "power_kw": "motor_current * supply_voltage * 1.732 / 1000.0",
    },
}
"""Event id -> computed data fields (``{expr: ...}``, evaluated when the event is emitted)."""

CONDITIONS: dict[str, dict[str, Any]] = {
    "door_open_while_running": {
        "type": "safety.GuardDoorOpenWhileRunning.v1",
        "trigger": {"kind": "condition", "when": "door_open && state == 'Running'"},
        "data": {
            "safe_for_s": {"trigger": "state_duration_s"},
            "spindle_speed": {"signal": "spindle_speed"},
        },
    },
    "spindle_overload": {
        "type": "maintenance.SpindleOverload.v1",
        "trigger": {
            "kind": "condition",
            "when": "motor_current > 45.0 && torque > 155.0 && spindle_speed > 1000.0",
        },
        "data": {
            "normal_for_s": {"trigger": "state_duration_s"},
            "mech_power_kw": {"expr": "torque * spindle_speed / 9549.0"},
        },
    },
    "cooling_lost": {
        "type": "maintenance.CoolingLost.v1",
        "trigger": {"kind": "condition", "when": "coolant_flow < 23.0 && oil_temperature > 72.0"},
        "data": {
            "oil_temperature": {"signal": "oil_temperature"},
            "flow_pct": {"expr": "coolant_flow / 24.0 * 100.0"},
        },
    },
}
"""Condition events (evaluated on every reading of a signal their ``when`` reads)."""

TEMPLATE_NAMES = frozenset(t.name for t in TEMPLATES)


def reads(text: str) -> set[str]:
    """The signal names (of :data:`TEMPLATES`) in an expression, or in the JSON of a data map."""
    return set(re.findall(r"\b[a-z_][a-z0-9_]*\b", re.sub(r"'[^']*'", "", text))) & TEMPLATE_NAMES


@dataclass(frozen=True)
class Plant:
    directory: Path
    subjects: list[str]
    templates: list[tuple[str, Template]]
    """(signal name, template) per signal of a machine, in declaration order."""
    extras: dict[str, str]
    """Extra trigger kind -> the YAML of its event (the kinds this loader accepts)."""
    expressions: Counter[str]
    """What each file has of expressions: ``when:`` guards, ``{expr}`` fields, conditions."""


def subject_of(i: int) -> str:
    return f"acme/plant1/area{i // 100}/line{(i // 10) % 10}/m{i:04d}"


def machine_signals(count: int) -> list[tuple[str, Template]]:
    out = []
    for i in range(count):
        template = TEMPLATES[i % len(TEMPLATES)]
        suffix = f"_{i // len(TEMPLATES)}" if i >= len(TEMPLATES) else ""
        out.append((template.name + suffix, template))
    return out


def header_text(subject: str, signals: list[tuple[str, Template]]) -> str:
    """A file up to and including its ``events:`` line."""
    machine = subject.rsplit("/", 1)[1]
    line = subject.split("/")[3]
    lines = [
        "# yaml-language-server: $schema=./mapping.schema.json",
        f"# Machine {machine}: generated by bench/bench_mapping.py.",
        "version: 1",
        "asset:",
        f"  subject: {subject}",
        f"  attributes: {{machine_type: press, line: {line}}}",
        "signals:",
    ]
    for name, t in signals:
        lines += [
            f"  {name}:",
            f"    connection: {CONNECTION}",
            f"    mqtt: {{topic: {subject}/{t.topic}, value_path: {name}, timestamp_path: ts}}",
            f"    {t.declaration}",
        ]
    lines.append("events:")
    return "\n".join(lines) + "\n"


def events_text(signals: list[tuple[str, Template]], extras: dict[str, str]) -> str:
    """The ``events:`` section of a file (the same in every file: no subject in it)."""
    text = ""
    names = {name for name, _ in signals}
    for name, t in signals:
        suffix = name[len(t.name):]
        events = t.events
        if "state" not in names:
            events = events.replace(", state: {{signal: state}}", "")
        text += events.format(s=name, k=suffix)
    for kind, watched, _ in EXTRA_KINDS:
        snippet = extras.get(kind)
        if snippet is not None and (watched is None or watched in names):
            if watched is None and not {"state", "temperature"} <= names:
                continue
            text += snippet.format(s=watched, k="")
    return text


def with_expressions(events: str, names: set[str]) -> tuple[str, Counter[str]]:
    """``events`` (an ``events:`` section) with the guards, computed fields and conditions
    whose signals are all in ``names``; and how many of each it got."""
    parsed: dict[str, dict[str, Any]] = YAML(typ="safe", pure=True).load("events:\n" + events)[
        "events"]
    used: Counter[str] = Counter()
    out: dict[str, dict[str, Any]] = {}
    for event_id, event in parsed.items():
        guard = GUARDS.get(event_id)
        if guard is not None and reads(guard) <= names:
            event = {"type": event.pop("type"), "when": guard, **event}
            used["when: guards"] += 1
        for field, expr in EXPR_FIELDS.get(event_id, {}).items():
            if reads(expr) <= names:
                event["data"][field] = {"expr": expr}
                used["{expr} fields"] += 1
        out[event_id] = event
    for event_id, event in CONDITIONS.items():
        if reads(json.dumps([event["trigger"], event["data"]])) <= names:
            out[event_id] = event
            used["condition triggers"] += 1
            used["{expr} fields"] += sum("expr" in source for source in event["data"].values())
    # JSON is YAML: one flow value per key keeps the file readable and its values exact.
    text = "".join(
        f"  {event_id}:\n" + "".join(f"    {k}: {json.dumps(v)}\n" for k, v in event.items())
        for event_id, event in out.items()
    )
    return text, used


def mapping_text(subject: str, signals: list[tuple[str, Template]], extras: dict[str, str]) -> str:
    return header_text(subject, signals) + events_text(signals, extras)


def accepted_extras(tmp: Path) -> dict[str, str]:
    """The extra trigger kinds this loader accepts, each with the first variant it accepts
    (probed with a one-machine file of all 20 signals)."""
    signals = machine_signals(len(TEMPLATES))
    out: dict[str, str] = {}
    for kind, _, variants in EXTRA_KINDS:
        for i, snippet in enumerate(variants):
            probe = tmp / f"probe-{kind}-{i}"
            probe.mkdir()
            text = mapping_text(subject_of(0), signals, {kind: snippet})
            (probe / "m.yaml").write_text(text, "utf-8")
            try:
                load_mappings(probe, CONNECTIONS)
            except ConfigError:
                continue
            out[kind] = snippet
            break
    return out


def write_plant(
    directory: Path, assets: int, signals_per_asset: int, extras: dict[str, str],
    expressions: bool,
) -> Plant:
    """The mapping files of the plant in ``directory`` (created), with or without the
    expressions of :data:`GUARDS`, :data:`EXPR_FIELDS` and :data:`CONDITIONS`."""
    directory.mkdir()
    signals = machine_signals(signals_per_asset)
    events = events_text(signals, extras)
    used: Counter[str] = Counter()
    if expressions:
        events, used = with_expressions(events, {name for name, _ in signals})
    subjects = [subject_of(i) for i in range(assets)]
    for i, subject in enumerate(subjects):
        (directory / f"m{i:04d}.yaml").write_text(header_text(subject, signals) + events, "utf-8")
    return Plant(directory, subjects, signals, extras, used)


# --- the reading stream ----------------------------------------------------------------------


class Machine:
    """One machine's signals as a PLC would publish them, once per simulated second."""

    def __init__(self, subject: str, signals: list[tuple[str, Template]], rng: random.Random):
        self.rng = rng
        self.phase = rng.random() * 2 * math.pi
        self.offset = rng.random() * 0.9
        """Where in each second this machine publishes (its PLC cycle)."""
        self.tags = [f"{subject}/{t.topic}#{name}" for name, t in signals]
        self.templates = [t for _, t in signals]
        self.values: list[Any] = []
        self.setpoints: list[float] = []
        for t in self.templates:
            self.setpoints.append(t.params[0] if t.params else 0.0)
            if t.kind == "state":
                self.values.append("Running")
            elif t.kind == "mode":
                self.values.append(2)
            elif t.kind == "bool":
                self.values.append(t.name == "clamp_closed")
            elif t.kind == "counter":
                top = int(t.params[0])
                # A quarter of the counters start just below their wrap, to exercise rollovers.
                start = top - rng.randrange(200) if rng.random() < 0.25 else rng.randrange(top)
                self.values.append(start)
            else:
                self.values.append(self.setpoints[-1])

    def readings(self, second: int, groups: frozenset[str] | None) -> list[tuple[str, Any, float]]:
        """(tag, value, source time) of this second's readings (a bounce adds one)."""
        rng = self.rng
        t = T0 + second + self.offset
        out: list[tuple[str, Any, float]] = []
        value: Any
        for i, tmpl in enumerate(self.templates):
            if groups is not None and tmpl.group not in groups:
                continue
            kind = tmpl.kind
            tag = self.tags[i]
            if kind == "telemetry":
                nominal, sigma, step, drift = tmpl.params
                if rng.random() < 0.09:  # a set-point change: usually fires
                    self.setpoints[i] = nominal + rng.uniform(-4, 4) * step
                slow = drift * math.sin(second / 90.0 + self.phase + i)
                value = round(self.setpoints[i] + slow + rng.gauss(0.0, sigma), 3)
            elif kind == "state":
                value = self.values[i]
                if rng.random() < 0.04:
                    value = rng.choice([s for s in STATES if s != value])
                    self.values[i] = value
            elif kind == "mode":
                value = self.values[i]
                if rng.random() < 0.04:
                    value = rng.choice([c for c in MODES if MODES[c] != MODES[value]])
                    self.values[i] = value
            elif kind == "bool":
                p_flip, p_bounce = tmpl.params
                value = self.values[i]
                if rng.random() < p_flip:
                    if rng.random() < p_bounce:  # contact bounce: the new level for 0.1-0.3 s
                        out.append((tag, not value, t))
                        t_back = t + rng.uniform(0.1, 0.3)
                        out.append((tag, value, t_back))
                        continue
                    value = not value
                    self.values[i] = value
            elif kind == "counter":
                top, p_step = int(tmpl.params[0]), tmpl.params[1]
                value = self.values[i]
                r = rng.random()
                if r < 0.0002:  # reset to 0 at shift change
                    value = 0
                elif r < p_step:
                    value = (value + rng.choice((1, 1, 1, 2))) % (top + 1)
                self.values[i] = value
            else:  # threshold: a slow swing around the limit and noise
                nominal, swing = tmpl.params
                if rng.random() < 0.003:  # a sensor glitch: a value that does not convert
                    out.append((tag, "ERR", t))
                    continue
                value = round(
                    nominal + swing * math.sin(second / 120.0 + self.phase + i)
                    + rng.gauss(0.0, swing / 20), 3)
            out.append((tag, value, t))
        return out


@dataclass
class Stream:
    seconds: list[tuple[list[Signal], float]]
    """Per simulated second: its readings, and the gateway clock at its end (for tick)."""
    count: int

    def flat(self) -> list[Signal]:
        return [s for chunk, _ in self.seconds for s in chunk]


def build_stream(plant: Plant, readings: int, groups: frozenset[str] | None) -> Stream:
    """``readings`` readings of the signals of ``groups`` (all when None), as the plant sends
    them. Built with the GC paused (a million new objects would trigger full collections)."""
    gc.disable()
    try:
        return _build_stream(plant, readings, groups)
    finally:
        gc.enable()


def _build_stream(plant: Plant, readings: int, groups: frozenset[str] | None) -> Stream:
    rng = random.Random(SEED)
    machines = [Machine(subject, plant.templates, rng) for subject in plant.subjects]
    order = list(range(len(machines)))
    seconds: list[tuple[list[Signal], float]] = []
    count, second = 0, 0
    while count < readings:
        rng.shuffle(order)
        chunk: list[Signal] = []
        for m in order:
            for tag, value, t in machines[m].readings(second, groups):
                latency = 0.002 + rng.random() * 0.008
                chunk.append(Signal(CONNECTION, tag, value, source_time=t, receive_time=t + latency))
        chunk.sort(key=lambda s: s.receive_time)
        chunk = chunk[: readings - count]
        seconds.append((chunk, T0 + second + 1.0))
        count += len(chunk)
        second += 1
    return Stream(seconds, count)


# --- measuring -------------------------------------------------------------------------------


def fresh_mapper(files: list[MappingFile]) -> Mapper:
    return Mapper(files, "bench-01")


def reset(mapper: Mapper) -> None:
    """Put every signal and trigger state back to its start-up value, in place (the rules hold
    references to these objects): the next pass starts as a fresh Mapper would, without the
    seconds a 1,000-file Mapper takes to build."""
    for state in (*mapper.signal_states.values(), *mapper.trigger_states.values()):
        blank = type(state)()
        for f in dataclasses.fields(state):
            setattr(state, f.name, getattr(blank, f.name))


def run_flat(mapper: Mapper, signals: list[Signal]) -> int:
    m = mapper.map
    events = 0
    for s in signals:
        out = m(s)
        if out:
            events += len(out)
    return events


def run_ticked(mapper: Mapper, stream: Stream) -> int:
    m, tick = mapper.map, mapper.tick
    events = 0
    for chunk, now in stream.seconds:
        for s in chunk:
            out = m(s)
            if out:
                events += len(out)
        events += len(tick(now))
    return events


@dataclass
class Figure:
    name: str
    readings: int
    events: int
    seconds: float
    """The best pass, in CPU seconds of this process (one core: the engine is single-threaded)."""
    wall: float
    """The best pass, in wall-clock seconds (longer when the machine is busy)."""
    expressions: str = ""
    """What the expressions did in one pass (:meth:`ExprStats.per_pass`); empty without any."""

    @property
    def signals_per_s(self) -> float:
        return self.readings / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class Measurement:
    name: str
    mapper: Mapper
    readings: int
    run: Callable[[Mapper, Any], int]
    stream: Any
    """What ``run`` takes: the flat list of Signals, or the :class:`Stream` (with ticks)."""


def measure(measurements: list[Measurement], passes: int) -> list[Figure]:
    """The fastest of ``passes`` passes of each measurement, each pass from the start state.
    The passes go round-robin over the measurements, each round starting one further, so that
    a noisy neighbour on the machine (or the place in the round) slows all of them alike rather
    than one mix."""
    best = [math.inf] * len(measurements)
    best_wall = [math.inf] * len(measurements)
    counts: list[list[int]] = [[] for _ in measurements]
    expressions = [""] * len(measurements)
    n = len(measurements)
    for i in range(passes):
        rates = []
        for j in [(i + k) % n for k in range(n)]:
            m = measurements[j]
            reset(m.mapper)
            before = ExprStats.of(m.mapper)
            gc.collect()
            start, start_wall = time.process_time(), time.perf_counter()
            counts[j].append(m.run(m.mapper, m.stream))
            seconds = time.process_time() - start
            best_wall[j] = min(best_wall[j], time.perf_counter() - start_wall)
            best[j] = min(best[j], seconds)
            label = m.name.split()[0] + ("+tick" if "tick" in m.name else "")
            rates.append(f"{label} {m.readings / seconds:,.0f}")
            expressions[j] = ExprStats.of(m.mapper).per_pass(before, 1)
        print(f"  pass {i + 1}/{passes}, signals per CPU second: " + ", ".join(rates), flush=True)
    figures = []
    for m, b, w, c, e in zip(measurements, best, best_wall, counts, expressions, strict=True):
        if len(set(c)) != 1:  # a pass did not start from the same state: say so
            print(f"WARNING: {m.name}: event counts differ between passes: {c}", file=sys.stderr)
        figures.append(Figure(m.name, m.readings, c[-1], b, w, e))
    return figures


def print_table(figures: list[Figure]) -> None:
    base = figures[0].signals_per_s
    print()
    print("signals/s: per CPU second of the best pass (one core); wall: per wall-clock second "
          "of the best pass")
    print(f"{'mix':<24} {'readings':>10} {'signals/s':>10} {'vs (a)':>7} {'wall':>9} "
          f"{'events/s':>9} {'events':>8} {'ev/rd':>6} {'us/reading':>10}")
    for f in figures:
        print(f"{f.name:<24} {f.readings:>10,} {f.signals_per_s:>10,.0f} "
              f"{f.signals_per_s / base:>6.2f}x {f.readings / f.wall:>9,.0f} "
              f"{f.events_per_s:>9,.0f} {f.events:>8,} "
              f"{f.events / f.readings:>6.1%} {1e6 * f.seconds / f.readings:>10.2f}")


def built(what: str, stream: Stream, seconds: float) -> None:
    print(f"built {what}: {stream.count:,} readings, {len(stream.seconds)} s of plant time, "
          f"in {seconds:.1f} s", flush=True)


@dataclass(frozen=True)
class ExprStats:
    """The Mapper's expression counters (cumulative)."""

    guarded: int
    without_value: int
    errors: Counter[str]

    @staticmethod
    def of(mapper: Mapper) -> ExprStats:
        return ExprStats(mapper.events_guarded, mapper.expressions_without_value,
                         Counter(mapper.expression_errors))

    def per_pass(self, before: ExprStats, passes: int) -> str:
        """What happened since ``before``, per pass; empty when nothing did."""
        errors = self.errors - before.errors
        errors.pop("no_value", None)
        if self == before:
            return ""
        return (f"{(self.guarded - before.guarded) // passes:,} events dropped by when: guards, "
                f"{(self.without_value - before.without_value) // passes:,} evaluations "
                "without a value (signals not reported yet, or bad), errors: "
                + (", ".join(f"{k} {n // passes:,}" for k, n in errors.items()) or "none"))


def qualified_names() -> dict[tuple[str, int], str]:
    """(file name, first line) -> qualified name of the functions (closures and lambdas too) of
    the engine, the expression compiler and the model, so that the profile says
    ``_OnChangeRule.fires`` rather than ``fires``."""
    import inspect
    import types

    from gateway import model
    from gateway.mapping import engine, expr

    out: dict[tuple[str, int], str] = {}

    def add(code: types.CodeType) -> None:
        out[(Path(code.co_filename).name, code.co_firstlineno)] = code.co_qualname
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                add(const)

    for module in (engine, expr, model):
        for obj in vars(module).values():
            members = vars(obj).values() if inspect.isclass(obj) else [obj]
            for fn in members:
                fn = getattr(fn, "fget", fn)
                code = getattr(fn, "__code__", None)
                if isinstance(code, types.CodeType) and code.co_filename == module.__file__:
                    add(code)
    return out


def _print_stats(profiler: cProfile.Profile, key: str, title: str) -> None:
    out_text = io.StringIO()
    pstats.Stats(profiler, stream=out_text).strip_dirs().sort_stats(key).print_stats(15)
    print(f"\n{title}")
    names = qualified_names()
    for line in out_text.getvalue().splitlines():
        if line.strip() and not line.lstrip().startswith(("Ordered by", "List reduced")):
            print(re.sub(r"([\w.]+\.py):(\d+)\(([^)]+)\)",
                         lambda m: f"{m[1]}:{m[2]}({names.get((m[1], int(m[2])), m[3])})", line))


def profile(mix: str, mapper: Mapper, files: list[MappingFile], signals: list[Signal]) -> None:
    """cProfile of one pass of ``mix`` (over ``signals``, no tick): the top 15 functions by
    own and by cumulative time, the share of the expressions, the events by trigger kind."""
    reset(mapper)
    before = ExprStats.of(mapper)
    fired: list[list[DomainEvent]] = []
    m, keep = mapper.map, fired.append
    gc.collect()
    profiler = cProfile.Profile()
    profiler.enable()
    for s in signals:
        out = m(s)
        if out:
            keep(out)
    profiler.disable()
    heading = f"cProfile of one pass of mix ({mix}), {len(signals):,} readings"
    _print_stats(profiler, "tottime", f"{heading}, top 15 by own time (profiling inflates times):")
    _print_stats(profiler, "cumulative", f"{heading}, top 15 by cumulative time:")

    # Where the expressions' time goes: the calls of the functions that evaluate them.
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in stats.values())
    names = qualified_names()
    watched = ("Mapper.map", "_Rule.emit", "_ConditionRule.fires", "_Rule.evaluate",
               "CompiledExpr.evaluate")
    print(f"\ntime in (profiled, total {total:.2f} s; cumulative time, calls per reading):")
    for (file, line, func), (_, calls, _, cumulative, _) in sorted(
            stats.items(), key=lambda kv: -kv[1][3]):
        name = names.get((Path(file).name, line), func)
        if name in watched:
            print(f"  {name:<24} {cumulative:6.2f} s {cumulative / total:5.1%}  "
                  f"{calls:>10,} calls  {calls / len(signals):.3f}/reading")
    kind_of = {e.type: e.trigger.kind for f in files for e in f.spec.events.values()}
    by_kind = Counter(kind_of[e.type] for out in fired for e in out)
    n_events = sum(by_kind.values()) or 1
    print(f"events of mix ({mix}) by trigger kind: "
          + ", ".join(f"{k} {n:,} ({n / n_events:.0%})" for k, n in by_kind.most_common()))
    print(f"expressions in this pass: {ExprStats.of(mapper).per_pass(before, 1)}")
    print(f"conversion errors (over all passes): {mapper.conversion_errors}; counter resets: "
          f"{mapper.counter_resets}, jumps: {mapper.counter_jumps}")


def load(plant: Plant, what: str) -> list[MappingFile]:
    start = time.perf_counter()
    files = load_mappings(plant.directory, CONNECTIONS)
    load_s = time.perf_counter() - start
    kinds = Counter(e.trigger.kind for e in files[0].spec.events.values())
    print(f"load_mappings {what}: {len(files):,} files ({len(plant.templates)} signals, "
          f"{len(files[0].spec.events)} events each: "
          + ", ".join(f"{k} {n}" for k, n in kinds.items())
          + (f"; with {', '.join(f'{n} {k}' for k, n in plant.expressions.items())}"
             if plant.expressions else "")
          + f") in {load_s:.1f} s ({1e3 * load_s / len(files):.1f} ms/file)", flush=True)
    return files


def build(files: list[MappingFile], what: str) -> Mapper:
    start = time.perf_counter()
    mapper = fresh_mapper(files)
    print(f"Mapper() {what}: {time.perf_counter() - start:.2f} s", flush=True)
    return mapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--assets", type=int, default=None,
                        help="mapping files (machines); 1,000 (--quick: 50)")
    parser.add_argument("--signals", type=int, default=20, help="signals per machine")
    parser.add_argument("--readings", type=int, default=None,
                        help="readings per mix; 1,000,000 (--quick: 50,000)")
    parser.add_argument("--passes", type=int, default=PASSES, help="passes per figure (the best)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: 50 assets, 50,000 readings")
    parser.add_argument("--profile", nargs="?", const="c", choices=("a", "b", "c"),
                        help="also print a cProfile of one pass of a mix (default: c)")
    parser.add_argument("--json-out", type=Path,
                        help="also write the printed figures to this file (JSON)")
    args = parser.parse_args(argv)
    assets = args.assets if args.assets is not None else (50 if args.quick else 1000)
    readings = args.readings if args.readings is not None else (
        50_000 if args.quick else 1_000_000)
    passes = max(1, args.passes)
    print(f"mapping engine benchmark: {assets:,} assets x {args.signals} signals, "
          f"{readings:,} readings per mix, best of {passes}, seed {SEED}, "
          f"Python {sys.version.split()[0]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-mapping-") as tmp:
        extras = accepted_extras(Path(tmp))
        plant = write_plant(Path(tmp) / "plain", assets, args.signals, extras, False)
        plant_x = write_plant(Path(tmp) / "expr", assets, args.signals, extras, True)
        print("trigger kinds: on_change, transition, edge, counter, threshold; further kinds: "
              + (", ".join(extras) or "none accepted by this loader")
              + "; condition with expressions", flush=True)
        files = load(plant, "(a)/(b), no expressions")
        files_x = load(plant_x, "(c), with expressions")
    mapper = build(files, "(a)/(b)")
    mapper_x = build(files_x, "(c)")

    start = time.perf_counter()
    stream_a = build_stream(plant, readings, MIX_A_GROUPS)
    flat_a = stream_a.flat()
    built("mix (a)", stream_a, time.perf_counter() - start)
    # (b) and (c) map the same readings: the plants differ only by their expressions.
    start = time.perf_counter()
    stream_b = build_stream(plant, readings, None)
    flat_b = stream_b.flat()
    built("mix (b)/(c)", stream_b, time.perf_counter() - start)

    figures = measure([
        Measurement("(a) on_change/transition", mapper, stream_a.count, run_flat, flat_a),
        Measurement("(b) all kinds", mapper, stream_b.count, run_flat, flat_b),
        Measurement("(b) + tick/s", mapper, stream_b.count, run_ticked, stream_b),
        Measurement("(c) all kinds + expr", mapper_x, stream_b.count, run_flat, flat_b),
        Measurement("(c) + tick/s", mapper_x, stream_b.count, run_ticked, stream_b),
    ], passes)
    print_table(figures)
    for f in figures:
        if f.expressions:
            print(f"{f.name}, per pass: {f.expressions}")
    rate = figures[0].signals_per_s
    print(f"target >= {TARGET:,} signals/s for the on_change/transition mix: {rate:,.0f} "
          f"({'met' if rate >= TARGET else 'MISSED'}, {rate / TARGET:.2f}x)")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "assets": assets, "signals_per_asset": args.signals, "readings": readings,
            "passes": passes, "target_signals_s": TARGET, "mixes": [
                {"name": f.name, "readings": f.readings, "events": f.events,
                 "signals_per_cpu_s": f.signals_per_s, "signals_per_wall_s": f.readings / f.wall,
                 "events_per_cpu_s": f.events_per_s, "events_per_reading": f.events / f.readings,
                 "vs_a": f.signals_per_s / rate} for f in figures]}, indent=1))

    if args.profile == "a":
        profile("a", mapper, files, flat_a)
    if args.profile == "b":
        profile("b", mapper, files, flat_b)
    elif args.profile == "c":
        profile("c", mapper_x, files_x, flat_b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
