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
- ``scale``/``offset`` only on numeric signals, whole numbers on ``integer`` ones (an integer
  signal stays an integer);
- a trigger is a tagged union on ``kind`` (only ``on_change`` today); a data field has exactly
  one source key (``signal``, ``previous``, ``attribute``, ``const``, ``quality``);
- a deadband has exactly one of ``absolute`` or ``percent``.

The models give the JSON Schema of the format (``MappingSpec.model_json_schema()``): every field
has a description, and the "exactly one" rules are expressed with ``oneOf`` as well.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
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

from gateway.configbase import Strict
from gateway.mapping.cases import MappingTest
from gateway.sources.mqtt import MqttAddress

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

PROTOCOL_BLOCKS: dict[str, type[Strict]] = {"mqtt": MqttAddress}
"""Protocol name -> its address model; a signal field of the same name holds the block."""

DATA_SOURCE_KINDS: tuple[str, ...] = ("signal", "previous", "attribute", "const", "quality")
"""The keys a data field may use, exactly one per field."""

SignalName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["state", "temperature"])]
EventName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["machine_state_changed"])]
AttributeName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["line", "machine_type"])]
FieldName = Annotated[str, Field(pattern=FIELD_PATTERN, examples=["state", "previous_state"])]


Address = MqttAddress
"""Any protocol address block (a union once OPC UA and Modbus blocks join); each has ``.tag``,
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


def _exactly_one_of(schema: dict[str, Any], keys: tuple[str, ...]) -> None:
    """JSON Schema for "exactly one of these optional keys": ``oneOf`` of ``required``, and the
    keys shown without their ``null`` alternative (null means absent, never a useful value)."""
    schema["oneOf"] = [{"required": [key]} for key in keys]
    properties = schema.get("properties")
    for key in keys:
        prop = properties.get(key) if isinstance(properties, dict) else None
        if not isinstance(prop, dict) or not isinstance(prop.get("anyOf"), list):
            continue
        kept = [alt for alt in prop.pop("anyOf") if alt != {"type": "null"}]
        prop.pop("default", None)
        prop.update(kept[0] if len(kept) == 1 and isinstance(kept[0], dict) else {"anyOf": kept})


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
        json_schema_extra=lambda schema: _exactly_one_of(schema, tuple(PROTOCOL_BLOCKS))
    )

    connection: str = Field(pattern=CONNECTION_PATTERN, examples=["plant_mqtt"])
    """Name of a connection in ``config/gateway.yaml``; its protocol must match the address
    block of this signal."""
    mqtt: MqttAddress | None = None
    """Address of the value on an MQTT connection (topic and JSON paths)."""
    type: SignalType = Field(examples=["float", "string"])
    """Type of the converted value: ``float`` and ``integer`` accept numbers and numeric
    strings; ``boolean`` accepts booleans, 0/1 and "true"/"false"; ``string`` accepts any
    scalar. A value that cannot be converted is a bad-quality reading."""
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
    def address(self) -> Address:
        """The address block itself (e.g. a :class:`~gateway.sources.mqtt.MqttAddress`)."""
        block: Address = getattr(self, self.protocol)
        return block


PositiveNumber = Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]


class Deadband(Strict):
    """How much a number must move before it counts as a change: exactly one key."""

    model_config = ConfigDict(
        json_schema_extra=lambda schema: _exactly_one_of(schema, ("absolute", "percent"))
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


Trigger = Annotated[OnChangeTrigger, Field(discriminator="kind")]
"""Tagged union on ``kind``; later kinds (transition, edge, counter, threshold) join it."""


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
    | Annotated[QualitySource, Tag("quality-source")],
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
    data: dict[FieldName, DataSource] = Field(
        default_factory=dict,
        examples=[{"state": {"signal": "state"}, "previous_state": {"previous": "state"}}],
    )
    """The event's ``data`` object: field name -> where its value comes from (declared order
    is kept)."""


class MappingSpec(Strict):
    """One mapping file: one asset, the signals it reads and the events it emits."""

    version: Literal[1]
    """Format version of this file; this gateway reads version 1."""
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
