"""The mapping file format (version 1), as pydantic models: what a valid file *is*.

A mapping file describes one asset: which shop-floor signals to read (``signals``) and which
business events they produce (``events``)::

    version: 1
    asset:
      subject: acme/plant1/stamping/line2/press07
      attributes: {machine_type: press, line: line2}
    signals:
      state:
        connection: plant_mqtt
        mqtt: {topic: acme/plant1/stamping/line2/press07/state, value_path: state}
        type: string
    events:
      machine_state_changed:
        type: production.MachineStateChanged.v1
        trigger: {kind: on_change, signal: state}
        data:
          state: {signal: state}
          previous_state: {previous: state}

Invariants enforced here (shape only; references between sections and to the gateway's
connections are checked by :mod:`gateway.mapping.loader`):

- unknown keys are errors everywhere (:class:`~gateway.configbase.Strict`);
- ``version`` is exactly the integer 1;
- a signal has exactly one protocol address block; the block's key is the protocol name
  (:data:`PROTOCOL_BLOCKS`), so adding OPC UA is adding an ``opcua`` field and an entry there;
  a block carried by a connection of another protocol (``sparkplug``, read by an ``mqtt``
  connection) says so in :data:`BLOCK_CONNECTION_PROTOCOL`;
- ``scale``/``offset`` only on numeric signals, whole numbers on ``integer`` ones (an integer
  signal stays an integer);
- ``enum`` labels: a mapping of codes to labels on ``integer`` and ``string`` signals (codes of
  the signal's type), a list of allowed states on ``string`` signals only;
- a trigger is a tagged union on ``kind`` (``on_change``, ``transition``, ``edge``, ``counter``,
  ``threshold``, ``quality``, ``periodic``, ``window``, ``condition``); a data field has exactly one source key
  (:data:`DATA_SOURCE_KINDS`);
- a deadband has exactly one of ``absolute`` or ``percent``; a threshold exactly one of
  ``above`` or ``below``; a counter's ``rollover_at`` comes with ``max_delta``;
- periods (``every_s``) and ``stale_after_s`` are at least one second (the gateway checks the
  time about once per second); a quality trigger lists ``stale`` in ``on`` only with
  ``stale_after_s``.

Which signal types a trigger accepts, whether ``from``/``to`` name states of the signal's
``enum``, which ``{trigger: <attribute>}`` a trigger offers (:data:`TRIGGER_ATTRIBUTES`) and
whether a periodic snapshot reads a signal need the rest of the file: the loader checks them.
Every trigger has a ``signal`` except ``periodic`` and ``condition`` (:func:`trigger_signal`).
Expressions (``when:``, ``{expr: ...}``) are compiled against the file's signals by the loader.

The models give the JSON Schema of the format (``MappingSpec.model_json_schema()``): every field
has a description, and the "exactly one" rules are expressed with ``oneOf`` as well.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gateway.configbase import Strict, exactly_one_of
from gateway.mapping.cases import MappingTest
from gateway.sources.modbus import ModbusAddress
from gateway.sources.mqtt import MqttAddress
from gateway.sources.opcua import OpcUaAddress
from gateway.sources.sparkplug import SparkplugAddress

FORMAT_VERSION = 1
"""The only mapping format version this gateway reads."""

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
"""Signal, event and attribute names: lower-case snake_case."""
CONNECTION_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
"""Connection names, as in ``config/gateway.yaml``."""
FIELD_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"
"""Event data field names: identifiers (snake_case or camelCase, as the event schema wants)."""
EVENT_TYPE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\.[A-Z][A-Za-z0-9]*\.v[0-9]+$"
"""``<domain>.<EventName>.v<major>``."""
SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$"
"""Slash-separated asset path: no empty segment, no leading or trailing slash, no blanks."""
URI_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$"
"""An absolute URI (scheme, colon, no blanks)."""

SignalType = Literal["string", "float", "integer", "boolean"]
NUMERIC_TYPES: frozenset[str] = frozenset({"float", "integer"})

PROTOCOL_BLOCKS: dict[str, type[Strict]] = {
    "mqtt": MqttAddress, "opcua": OpcUaAddress, "modbus": ModbusAddress,
    "sparkplug": SparkplugAddress,
}
"""Protocol name -> its address model; a signal field of the same name holds the block."""

BLOCK_CONNECTION_PROTOCOL: dict[str, str] = {"sparkplug": "mqtt"}
"""Address blocks read through a connection of another protocol: Sparkplug B metrics arrive
over an ``mqtt`` connection. A block not listed needs a connection of its own name."""

DATA_SOURCE_KINDS: tuple[str, ...] = (
    "signal",
    "previous",
    "attribute",
    "const",
    "quality",
    "trigger",
    "expr",
)
"""The keys a data field may use, exactly one per field."""

WINDOW_AGGREGATES: tuple[str, ...] = ("count", "min", "max", "mean", "first", "last")
"""The aggregates of a window trigger's readings, each a ``{trigger: <aggregate>}``."""

TRIGGER_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "on_change": (),
    "transition": ("state_duration_s",),
    "edge": ("edge", "state_duration_s"),
    "counter": ("delta",),
    "threshold": ("crossing", "state_duration_s"),
    "quality": ("quality", "previous_quality", "reason", "state_duration_s"),
    "periodic": (),
    "window": (*WINDOW_AGGREGATES, "window_start"),
    "condition": ("state_duration_s",),
}
"""Trigger kind -> the attributes its events can read with ``{trigger: <attribute>}``."""

ALL_TRIGGER_ATTRIBUTES: tuple[str, ...] = tuple(
    dict.fromkeys(a for attributes in TRIGGER_ATTRIBUTES.values() for a in attributes)
)
"""Every ``{trigger: <attribute>}`` of some trigger kind."""

TriggerAttribute = Annotated[
    str,
    Field(min_length=1),
    WithJsonSchema({"type": "string", "enum": list(ALL_TRIGGER_ATTRIBUTES)}),
]
"""What ``{trigger: <attribute>}`` can read of the trigger that fired the event. Any name
validates here; the loader checks it against the event's trigger kind (so a misspelling is
answered with the attributes of that kind); the JSON Schema lists them all for editors."""

SignalName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["state", "temperature"])]
EventName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["machine_state_changed"])]
AttributeName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["line", "machine_type"])]
FieldName = Annotated[str, Field(pattern=FIELD_PATTERN, examples=["state", "previous_state"])]


Address = MqttAddress | OpcUaAddress | ModbusAddress | SparkplugAddress
"""Any protocol address block; each has ``.tag``,
the address as :attr:`gateway.model.Signal.tag` carries it."""


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"expected a string, number or boolean, found {_kind(value)}")


def _scalar_or_null(value: Any) -> str | int | float | bool | None:
    return None if value is None else _scalar(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


Scalar = Annotated[
    str | int | float | bool,
    PlainValidator(_scalar),
    WithJsonSchema({"type": ["string", "number", "boolean"]}),
]
ScalarOrNull = Annotated[
    str | int | float | bool | None,
    PlainValidator(_scalar_or_null),
    WithJsonSchema({"type": ["string", "number", "boolean", "null"]}),
]


def _enum_labels(value: Any) -> dict[int | str, str] | list[str]:
    """Shape of ``enum``: a non-empty mapping code -> label, or a non-empty list of labels."""
    if isinstance(value, dict):
        if not value:
            raise ValueError("an enum needs at least one code: label entry")
        for code, label in value.items():
            if isinstance(code, bool) or not isinstance(code, (int, str)):
                raise ValueError(
                    f"enum codes are whole numbers or strings, got {_kind(code)} ({code!r})"
                )
            _label(label, f"the label of code {code!r}")
        return dict(value)
    if isinstance(value, list):
        if not value:
            raise ValueError("an enum needs at least one state")
        for label in value:
            _label(label, "an enum state")
        twice = sorted({label for label in value if value.count(label) > 1})
        if twice:
            raise ValueError(f"enum states are listed once each; repeated: {', '.join(twice)}")
        return list(value)
    raise ValueError(
        f"expected a mapping of codes to labels ({{0: Idle, 1: Running}}) or a list of states "
        f"([Idle, Running]), found {_kind(value)}"
    )


def _whole_number(code: int | str) -> int | None:
    """An enum code as an integer (``3`` or ``"3"``, as YAML keys arrive); None if it is not."""
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", code):
        return int(code)
    return None


def _label(label: Any, what: str) -> None:
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{what} must be a non-empty string, got {label!r}")


EnumLabels = Annotated[
    dict[int | str, str] | list[str],
    PlainValidator(_enum_labels),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": {"type": "string", "minLength": 1},
                },
                {
                    "type": "array",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"type": "string", "minLength": 1},
                },
            ]
        }
    ),
]
"""``{code: label}`` or ``[label, ...]``; which form fits which signal type is checked by
:class:`SignalSpec`."""


def enum_states(signal: SignalSpec) -> list[str] | None:
    """The state names of a signal with ``enum`` (labels in order, each once), else None."""
    enum = signal.enum
    if enum is None:
        return None
    labels = enum.values() if isinstance(enum, dict) else enum
    return list(dict.fromkeys(labels))


class Asset(Strict):
    """The asset this file describes: one file, one asset, one subject."""

    subject: str = Field(
        pattern=SUBJECT_PATTERN,
        examples=["acme/plant1/stamping/line2/press07", "acme/plant1/heattreat/line1/oven01"],
    )
    """Asset path: the CloudEvent ``subject`` of every event of this file and its Kafka key
    (so events of one asset stay in order). Unique across all mapping files."""
    attributes: dict[AttributeName, Scalar] = Field(
        default_factory=dict, examples=[{"machine_type": "press", "line": "line2"}]
    )
    """Static enrichment values (string, number or boolean) that events copy with
    ``{attribute: <name>}``."""


class SignalSpec(Strict):
    """One value read from a connection, converted to ``type``."""

    model_config = ConfigDict(
        json_schema_extra=exactly_one_of(tuple(PROTOCOL_BLOCKS))
    )

    connection: str = Field(pattern=CONNECTION_PATTERN, examples=["plant_mqtt"])
    """Name of a connection in ``config/gateway.yaml``; its protocol must match the address
    block of this signal."""
    mqtt: MqttAddress | None = None
    """Address of the value on an MQTT connection (topic and JSON paths)."""
    opcua: OpcUaAddress | None = None
    """Address of the value on an OPC UA connection: a node id with its namespace URI
    (``node``) or a browse path from Objects (``path``), subscribed or polled."""
    modbus: ModbusAddress | None = None
    """Address of the value on a Modbus connection: unit, table and address (zero-based, or an
    HMI reference such as 40001), the data type and its byte order."""
    sparkplug: SparkplugAddress | None = None
    """Address of a Sparkplug B metric on an MQTT connection: ``group``, ``edge_node``,
    ``device`` (omitted for a metric of the edge node itself) and ``metric`` (see
    ``docs/sparkplug.md``)."""
    type: SignalType = Field(examples=["float", "string"])
    """Type of the converted value: ``float`` and ``integer`` accept numbers and numeric
    strings; ``boolean`` accepts booleans, 0/1 and "true"/"false"; ``string`` accepts any
    scalar. A value that cannot be converted is a bad-quality reading."""
    enum: EnumLabels | None = Field(
        default=None,
        examples=[
            {0: "Idle", 1: "Setup", 2: "Running", 3: "Fault"},
            ["Idle", "Setup", "Running", "Fault"],
        ],
    )
    """Named states. A mapping ``{code: label}`` (integer signals: whole-number codes; string
    signals: string codes) turns each raw code into its label, and the label is the value that
    triggers and data fields see. A list ``[Idle, Running]`` (string signals only) names the
    allowed states. A value that is not listed is a bad-quality reading, counted as a
    conversion error."""
    unit: str | None = Field(default=None, examples=["degC", "rpm", "bar"])
    """Engineering unit, free text, for humans and the catalog."""
    scale: float = Field(default=1.0, strict=True, allow_inf_nan=False, examples=[0.1])
    """Numeric signals only: the converted value is ``value * scale + offset``. Whole numbers
    on ``integer`` signals (declare the signal ``float`` to scale by a fraction)."""
    offset: float = Field(default=0.0, strict=True, allow_inf_nan=False, examples=[-273.15])
    """Numeric signals only: added after ``scale``. Whole numbers on ``integer`` signals."""

    @field_validator("scale", "offset")
    @classmethod
    def _numeric_only(cls, value: float, info: ValidationInfo) -> float:
        kind = info.data.get("type")
        if kind is not None and kind not in NUMERIC_TYPES:
            raise ValueError(
                f"{info.field_name} applies to float and integer signals only, "
                f"this signal is of type {kind}"
            )
        if kind == "integer" and not float(value).is_integer():
            raise ValueError(
                f"{info.field_name} of an integer signal must be a whole number, "
                f"got {value!r} (declare the signal as float to scale by a fraction)"
            )
        return value

    @field_validator("enum")
    @classmethod
    def _enum_fits_type(
        cls, value: dict[int | str, str] | list[str] | None, info: ValidationInfo
    ) -> dict[int | str, str] | list[str] | None:
        kind = info.data.get("type")
        if value is None or kind is None:
            return value
        if kind not in ("integer", "string"):
            raise ValueError(
                f"enum applies to integer signals (codes -> labels) and string signals, "
                f"this signal is of type {kind}"
            )
        if isinstance(value, list):
            if kind == "integer":
                raise ValueError(
                    "an integer signal's enum maps codes to labels, e.g. {0: Idle, 1: Running}; "
                    "a list of states applies to string signals"
                )
            return value
        # YAML mapping keys arrive as text (0: Idle is {"0": "Idle"}): codes are normalised to
        # the signal's type here, so the engine compares them with converted values.
        if kind == "string":
            return {str(code): label for code, label in value.items()}
        codes: dict[int | str, str] = {}
        for code, label in value.items():
            number = _whole_number(code)
            if number is None:
                raise ValueError(
                    f"enum code {code!r} is not a whole number; the codes of an integer signal "
                    f"are whole numbers (declare the signal as string to map text codes)"
                )
            if number in codes:
                raise ValueError(f"enum code {number} is given twice")
            codes[number] = label
        return codes

    @model_validator(mode="after")
    def _one_address(self) -> SignalSpec:
        present = [name for name in PROTOCOL_BLOCKS if getattr(self, name) is not None]
        if len(present) != 1:
            found = " and ".join(present) if present else "none"
            raise ValueError(
                f"a signal needs exactly one address block "
                f"({', '.join(PROTOCOL_BLOCKS)}), found {found}"
            )
        return self

    @property
    def protocol(self) -> str:
        """The protocol of the address block (``mqtt``, ...)."""
        return next(name for name in PROTOCOL_BLOCKS if getattr(self, name) is not None)

    @property
    def connection_protocol(self) -> str:
        """The protocol of the connection that reads the address block (``mqtt`` for a
        ``sparkplug`` block)."""
        block = self.protocol
        return BLOCK_CONNECTION_PROTOCOL.get(block, block)

    @property
    def address(self) -> Address:
        """The address block itself (e.g. a :class:`~gateway.sources.mqtt.MqttAddress`)."""
        block: Address = getattr(self, self.protocol)
        return block


PositiveNumber = Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]


class Deadband(Strict):
    """How much a number must move before it counts as a change: exactly one key."""

    model_config = ConfigDict(
        json_schema_extra=exactly_one_of(("absolute", "percent"))
    )

    absolute: PositiveNumber | None = Field(default=None, examples=[0.5, 2.0])
    """Fire only when ``|value - last emitted| > absolute`` (in the signal's unit)."""
    percent: PositiveNumber | None = Field(default=None, examples=[2.0])
    """Fire only when ``|value - last emitted| > |last emitted| * percent / 100``."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Deadband:
        if (self.absolute is None) == (self.percent is None):
            raise ValueError("a deadband has exactly one key: absolute or percent")
        return self


class OnChangeTrigger(Strict):
    """Emit when a signal's value changes (by more than the deadband, for numbers)."""

    kind: Literal["on_change"]
    """Trigger kind; the key that selects the rest of this block."""
    signal: SignalName
    """The signal of this file whose changes fire the event."""
    deadband: Deadband | None = Field(default=None, examples=[{"absolute": 0.5}, {"percent": 2.0}])
    """Numeric signals only: ignore changes up to this size, compared with the last emitted
    value (so slow drifts still fire once they add up)."""
    on_first_value: Literal["emit", "skip"] = "emit"
    """``emit``: the first value seen after start is an event (its previous value is null);
    ``skip``: it only sets the baseline."""


StateName = Annotated[str, Field(min_length=1, examples=["Running", "Fault"])]
Crossing = Literal["enter", "leave"]
CROSSINGS: tuple[Crossing, ...] = ("enter", "leave")
FirstValue = Literal["emit", "skip"]


class TransitionTrigger(Strict):
    """Emit when a signal with named states moves from one state to another."""

    kind: Literal["transition"]
    """Trigger kind; the key that selects the rest of this block."""
    signal: SignalName
    """A string signal, or an integer signal with an ``enum`` mapping codes to labels. States
    are the converted values (the labels)."""
    from_: list[StateName] | None = Field(
        default=None,
        alias="from",
        min_length=1,
        description="Fire only for transitions out of one of these states (all when omitted). "
        "Checked against the signal's enum when it has one.",
        examples=[["Running"], ["Fault"]],
    )
    to: list[StateName] | None = Field(default=None, min_length=1, examples=[["Fault"]])
    """Fire only for transitions into one of these states (all when omitted). Checked against
    the signal's enum when it has one."""
    on_first_value: FirstValue = "skip"
    """``skip`` (default): the first state seen after start is only remembered; ``emit``: it is
    an event too (its previous state is null, so a ``from`` filter never matches it)."""


class EdgeTrigger(Strict):
    """Emit when a boolean signal changes level: rising (false -> true), falling, or both."""

    kind: Literal["edge"]
    """Trigger kind; the key that selects the rest of this block."""
    signal: SignalName
    """A boolean signal of this file."""
    edge: Literal["rising", "falling", "both"] = Field(examples=["rising"])
    """Which level changes fire: ``rising`` (false -> true), ``falling`` (true -> false) or
    ``both``; ``{trigger: edge}`` tells which one it was."""
    min_duration_ms: PositiveNumber | None = Field(default=None, examples=[500, 2000])
    """Debounce: a new level counts only once it has held this long (measured in signal
    time; a reading at the same level or the gateway's periodic tick confirms it). A level that
    flips back sooner, or a bad reading, cancels it. Omitted: every level change counts."""
    on_first_value: FirstValue = "skip"
    """``skip`` (default): the first level seen after start is only remembered; ``emit``: it
    fires as an edge from an unknown level (true as rising, false as falling)."""


class CounterTrigger(Strict):
    """Emit when an integer counter (parts, strokes, cycles) has increased; ``{trigger:
    delta}`` is the increment."""

    kind: Literal["counter"]
    """Trigger kind; the key that selects the rest of this block."""
    signal: SignalName
    """An integer signal of this file (without enum)."""
    rollover_at: int | None = Field(default=None, strict=True, gt=0, examples=[65535, 4294967295])
    """The counter's largest value, after which it wraps to 0 (65535 for a uint16 counter,
    4294967295 for a uint32). A decrease whose wrapped increment is at most ``max_delta`` is a
    rollover (65534 -> 2 is +4 with 65535); any other decrease is a reset. Needs ``max_delta``.
    Omitted: every decrease is a reset."""
    max_delta: int | None = Field(default=None, strict=True, gt=0, examples=[100, 1000])
    """The largest plausible increase between two readings. A larger jump fires nothing, is
    counted, and its value becomes the new baseline. Omitted: no limit."""
    on_reset: Literal["ignore", "count_from_zero"] = "ignore"
    """After a reset (a decrease that is not a rollover): ``ignore`` (default) only takes the
    new value as the baseline, so no part is ever counted twice or invented; ``count_from_zero``
    also counts the new value as the increment (the counter restarted at 0 and has counted
    this much since), within ``max_delta``."""

    @model_validator(mode="after")
    def _rollover_needs_max_delta(self) -> CounterTrigger:
        if self.rollover_at is not None and self.max_delta is None:
            raise ValueError(
                "rollover_at needs max_delta: a decrease is a rollover only when the counter "
                "advanced at most max_delta through the wrap, otherwise it is a reset (set "
                "max_delta to the most the counter can plausibly advance between two readings)"
            )
        if (
            self.rollover_at is not None
            and self.max_delta is not None
            and self.max_delta > self.rollover_at
        ):
            raise ValueError(
                f"max_delta ({self.max_delta}) is larger than the counter's range "
                f"(rollover_at {self.rollover_at})"
            )
        return self


class ThresholdTrigger(Strict):
    """Emit when a number crosses into a band (above or below a limit) and when it leaves it
    again, with hysteresis; ``{trigger: crossing}`` is ``enter`` or ``leave``."""

    model_config = ConfigDict(
        json_schema_extra=exactly_one_of(("above", "below"))
    )

    kind: Literal["threshold"]
    """Trigger kind; the key that selects the rest of this block."""
    signal: SignalName
    """A float or integer signal of this file (without enum)."""
    above: float | None = Field(default=None, strict=True, allow_inf_nan=False, examples=[860.0])
    """The band is ``value > above`` (the limit itself is outside it)."""
    below: float | None = Field(default=None, strict=True, allow_inf_nan=False, examples=[5.5])
    """The band is ``value < below`` (the limit itself is outside it)."""
    hysteresis: float = Field(
        default=0.0, strict=True, ge=0, allow_inf_nan=False, examples=[2.0, 0.3]
    )
    """Once inside, the value leaves the band only when it is back at ``above - hysteresis``
    or lower (``below + hysteresis`` or higher), so noise at the limit does not flap."""
    crossings: list[Crossing] = Field(
        default_factory=lambda: list(CROSSINGS), min_length=1, examples=[["enter"]]
    )
    """Which crossings fire the event (default both)."""
    on_first_value: FirstValue = "skip"
    """``skip`` (default): the first value only establishes whether the signal is in the
    band; ``emit``: a first value already in the band fires ``enter`` (one outside never fires)."""

    @model_validator(mode="after")
    def _exactly_one_limit(self) -> ThresholdTrigger:
        if (self.above is None) == (self.below is None):
            raise ValueError("a threshold has exactly one limit: above or below")
        return self


QualityChange = Literal["bad", "stale", "good"]
QUALITY_CHANGES: tuple[QualityChange, ...] = ("bad", "stale", "good")
"""The qualities a quality trigger tells apart, each a change it can fire on."""


def _at_least_one_second(value: float) -> float:
    if value < 1:
        raise ValueError(
            f"expected at least 1 (second): the gateway checks the time about once per second; "
            f"got {value!r}"
        )
    return value


Period = Annotated[
    float,
    Field(strict=True, allow_inf_nan=False, json_schema_extra={"minimum": 1}),
    AfterValidator(_at_least_one_second),
]
"""A duration of at least one second (time-based triggers are checked about once per second)."""


class QualityTrigger(Strict):
    """Emit when a signal goes bad (a bad-quality reading, or a value that does not convert),
    goes stale (no reading for ``stale_after_s``), and when it is good again; ``{trigger:
    quality}`` is ``bad``, ``stale`` or ``good``."""

    kind: Literal["quality"]
    """Trigger kind; the key that selects the rest of this block."""
    signal: SignalName
    """The signal of this file whose quality is watched (any type)."""
    stale_after_s: Period | None = Field(default=None, examples=[30, 300])
    """The signal is stale when no reading (good or bad) arrived for this many seconds, by the
    gateway's clock (checked about once per second). The stale event's time is the latest
    reading's time plus ``stale_after_s``. Omitted: never stale."""
    on: list[QualityChange] = Field(
        default_factory=lambda: list(QUALITY_CHANGES),
        min_length=1,
        examples=[["bad", "stale"], ["good"]],
    )
    """Which changes fire the event (default all): ``bad`` (the signal went bad), ``stale``
    (readings stopped), ``good`` (good or uncertain readings again, after bad or stale)."""

    @model_validator(mode="after")
    def _stale_needs_a_time(self) -> QualityTrigger:
        if "on" in self.model_fields_set and "stale" in self.on and self.stale_after_s is None:
            raise ValueError(
                "on lists stale but stale_after_s is not set: say after how many seconds "
                "without a reading the signal is stale (e.g. stale_after_s: 30)"
            )
        return self


class PeriodicTrigger(Strict):
    """Emit a snapshot of the latest values every ``every_s`` seconds, at the same instants on
    every gateway (multiples of ``every_s`` in Unix time)."""

    kind: Literal["periodic"]
    """Trigger kind; the key that selects the rest of this block."""
    every_s: Period = Field(examples=[60, 900, 3600])
    """The period in seconds (at least 1). Snapshots are taken at multiples of it in Unix time
    (``every_s: 3600`` is on the hour, UTC) and carry that instant as their time. A boundary
    passes while none of the signals the data reads has had a value: no snapshot. Boundaries
    the gateway missed (it was stopped or busy) are not caught up: one snapshot for the latest,
    the others counted."""


class WindowTrigger(Strict):
    """Emit aggregates (count, min, max, mean, first, last) of a number's good readings per
    tumbling window of ``every_s`` seconds of signal time."""

    kind: Literal["window"]
    """Trigger kind; the key that selects the rest of this block."""
    signal: SignalName
    """A float or integer signal of this file (without enum)."""
    every_s: Period = Field(examples=[60, 300])
    """The window length in seconds (at least 1). Windows are ``[start, start + every_s)`` with
    ``start`` a multiple of ``every_s`` in Unix time, on the readings' signal times; the event's
    time is the window's end."""
    grace_s: float = Field(
        default=2.0, strict=True, ge=0, allow_inf_nan=False, examples=[2.0, 10.0]
    )
    """How long after a window's end the gateway waits for readings still under way before it
    closes the window by its clock (a reading at or after the end closes it at once). A reading
    for a closed window is late: dropped and counted."""
    emit_empty: bool = False
    """``false`` (default): a window without good readings emits nothing; ``true``: it emits
    too, with ``count`` 0 and the other aggregates null (windows follow one another from the
    first reading on)."""


Expression = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2000,
        examples=["part_present == false && cycle_time_s > 0.0", "air_pressure * 14.5038"],
    ),
]
"""A CEL expression over the file's signals (by name); ``docs/expressions.md``."""


class ConditionTrigger(Strict):
    """Emit when a boolean expression over several signals becomes true (its rising edge)."""

    kind: Literal["condition"]
    """Trigger kind; the key that selects the rest of this block."""
    when: Expression = Field(examples=["guard_door_open && mode == 'Running'"])
    """A CEL expression of type bool over the file's signals (``docs/expressions.md``). It is
    evaluated whenever one of the signals it reads gets a reading; the event fires when it goes
    from false (or not yet known) to true. While a signal it needs has no value (none yet, or
    a bad reading) the condition is unknown: no event, and the last known result stands."""
    on_first_value: FirstValue = "skip"
    """``skip`` (default): a condition already true at its first known result only sets the
    state; ``emit``: it fires (its ``state_duration_s`` is null)."""


Trigger = Annotated[
    OnChangeTrigger
    | TransitionTrigger
    | EdgeTrigger
    | CounterTrigger
    | ThresholdTrigger
    | QualityTrigger
    | PeriodicTrigger
    | WindowTrigger
    | ConditionTrigger,
    Field(discriminator="kind"),
]
"""Tagged union on ``kind``."""


def trigger_signal(trigger: Any) -> str | None:
    """The signal a trigger watches; None for a periodic trigger (it watches the clock) and a
    condition (it watches the signals its expression reads)."""
    name: str | None = getattr(trigger, "signal", None)
    return name


TRIGGER_KINDS: tuple[str, ...] = tuple(TRIGGER_ATTRIBUTES)
"""Every trigger kind, in documentation order."""


class SignalSource(Strict):
    """The current (converted) value of a signal of this file; null if never seen."""

    signal: SignalName
    """Signal name."""


class PreviousSource(Strict):
    """The value a signal had before its current one; null if none."""

    previous: SignalName
    """Signal name."""


class AttributeSource(Strict):
    """A static attribute of the asset."""

    attribute: AttributeName
    """Attribute name (a key of ``asset.attributes``)."""


class ConstSource(Strict):
    """A constant."""

    const: ScalarOrNull = Field(examples=[3, "degC"])
    """The value: string, number, boolean or null."""


class QualitySource(Strict):
    """A signal's current quality: ``good``, ``uncertain`` or ``bad``; null if never seen."""

    quality: SignalName
    """Signal name."""


class TriggerSource(Strict):
    """A value the event's own trigger computed when it fired (which ones depends on its kind:
    transition ``state_duration_s``; edge ``edge``, ``state_duration_s``; counter ``delta``;
    threshold ``crossing``, ``state_duration_s``; condition ``state_duration_s``; quality ``quality``, ``previous_quality``,
    ``reason``, ``state_duration_s``; window ``count``, ``min``, ``max``, ``mean``,
    ``first``, ``last``, ``window_start``; periodic none)."""

    trigger: TriggerAttribute = Field(
        examples=["delta", "state_duration_s", "quality", "mean", "window_start"]
    )
    """``state_duration_s``: seconds the previous state (level, side of the limit, quality)
    lasted, in signal time, null when it began before the gateway saw it; ``delta``: the
    counter increment; ``crossing``: ``enter`` or ``leave``; ``edge``: ``rising`` or
    ``falling``; ``quality``: ``bad``, ``stale`` or ``good``; ``previous_quality``: the quality
    before (null at the first reading); ``reason``: why it is bad or stale (the conversion
    failure, the reading's status, ``no reading for 30 s``), null when good; ``count``,
    ``min``, ``max``, ``mean``, ``first``, ``last``: of the window's good readings (null when
    it has none); ``window_start``: the window's start, an RFC 3339 time."""


class ExprSource(Strict):
    """A value computed from the current values of the file's signals by a CEL expression;
    null when a signal it needs has no value (or a bad reading) or the computation fails."""

    expr: Expression
    """The expression (``docs/expressions.md``), e.g. ``air_pressure * 14.5038``."""


def _source_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [kind for kind in DATA_SOURCE_KINDS if kind in value]
        return f"{kinds[0]}-source" if len(kinds) == 1 else None
    for kind in DATA_SOURCE_KINDS:
        if hasattr(value, kind):
            return f"{kind}-source"
    return None


DataSource = Annotated[
    Annotated[SignalSource, Tag("signal-source")]
    | Annotated[PreviousSource, Tag("previous-source")]
    | Annotated[AttributeSource, Tag("attribute-source")]
    | Annotated[ConstSource, Tag("const-source")]
    | Annotated[QualitySource, Tag("quality-source")]
    | Annotated[TriggerSource, Tag("trigger-source")]
    | Annotated[ExprSource, Tag("expr-source")],
    Discriminator(
        _source_kind,
        custom_error_type="data_source",
        custom_error_message="expected a mapping with exactly one of the keys "
        + ", ".join(DATA_SOURCE_KINDS),
    ),
]
"""Where a data field's value comes from: exactly one source key."""


class EventSpec(Strict):
    """A business event this asset emits."""

    type: str = Field(
        pattern=EVENT_TYPE_PATTERN,
        examples=["production.MachineStateChanged.v1", "process.TemperatureChanged.v1"],
    )
    """CloudEvent ``type``: ``<domain>.<EventName>.v<major>``."""
    dataschema: str | None = Field(
        default=None,
        pattern=URI_PATTERN,
        examples=["https://schemas.acme.example/production/MachineStateChanged/v1.json"],
    )
    """CloudEvent ``dataschema``: URI of the JSON Schema of ``data``; omitted when null."""
    trigger: Trigger
    """When the event fires."""
    when: Expression | None = Field(
        default=None, examples=["mode == 'Running'", "part_counter > 0"]
    )
    """A guard: a CEL boolean expression over the file's signals, evaluated when the trigger
    fires; the event is emitted only when it is true (false or unknown: dropped and counted;
    the trigger's state moves either way). Not on a ``condition`` trigger (put it into the
    trigger's own ``when``)."""
    data: dict[FieldName, DataSource] = Field(
        default_factory=dict,
        examples=[
            {"state": {"signal": "state"}, "previous_state": {"previous": "state"}},
            {"parts": {"trigger": "delta"}},
        ],
    )
    """The event's ``data`` object: field name -> where its value comes from (declared order
    is kept)."""

    @model_validator(mode="after")
    def _no_guard_on_a_condition(self) -> EventSpec:
        if self.when is not None and isinstance(self.trigger, ConditionTrigger):
            raise ValueError(
                "a condition trigger has its own when: combine the two with && in the "
                "trigger's when instead of an event-level when"
            )
        return self


class MappingSpec(Strict):
    """One mapping file: one asset, the signals it reads and the events it emits."""

    version: Literal[1]
    """Format version of this file; this gateway reads version 1."""
    revision: str | None = Field(default=None, min_length=1, max_length=64,
                                 pattern=r"^[A-Za-z0-9._+-]+$",
                                 examples=["2026-11-29.1", "3", "v1.4.0"])
    """This file's own revision, chosen by its authors (a date, a number, a release): every
    event it emits carries it as the ``mappingversion`` attribute (with the file's content
    hash as ``mappinghash``). Without it ``mappingversion`` is the format version."""
    asset: Asset
    """The asset: subject and static attributes."""
    signals: dict[SignalName, SignalSpec] = Field(min_length=1)
    """Signal name -> where to read it and how to convert it."""
    events: dict[EventName, EventSpec] = Field(min_length=1)
    """Local event id -> the event emitted and its trigger."""
    tests: list[MappingTest] = Field(default_factory=list)
    """Test cases run by ``digispine-gateway test``: readings in, exactly these events out."""

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if type(value) is int and value != FORMAT_VERSION:
            raise ValueError(
                f"unsupported mapping format version {value}; this gateway reads "
                f"version {FORMAT_VERSION} (is the file newer than the gateway?)"
            )
        if type(value) is not int:
            raise ValueError(f"expected the integer {FORMAT_VERSION}")
        return value
