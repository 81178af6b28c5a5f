"""Sparkplug B host application core: decoding and the protocol's state, with no network.

The MQTT source subscribes to :meth:`SparkplugHost.subscriptions`, hands every message to
:meth:`SparkplugHost.on_message` and publishes the :attr:`Outcome.commands` it returns; this
module only decodes payloads (:mod:`gateway.sources.sparkplug_schema`, the protobuf runtime)
and keeps what the Sparkplug B 3.0 specification asks a host application to keep. The user's
view is ``docs/sparkplug.md``.

What the host keeps, per edge node it has an address for (``group``/``edge_node``)
    Whether the node is born, the ``seq`` of its last message and the ``bdSeq`` of its NBIRTH;
    for the node and each addressed device, the metric names, aliases and data types of their
    BIRTH (the NBIRTH or DBIRTH). Nodes that no address names are dropped after the topic is
    split, before their payload is parsed: their traffic costs one dict look-up.

Births and data
    NBIRTH starts a new session of the node: its tables, its devices' tables and its ``seq``
    start over and its ``bdSeq`` is recorded. DBIRTH does the same for one device. NDATA and
    DDATA name a metric by name or by the alias of the BIRTH; a value whose alias the BIRTH did
    not give is dropped (:attr:`Outcome.dropped`, :attr:`SparkplugStats.unknown_aliases`) and a
    rebirth is requested. A BIRTH carries current values, so it yields signals like a DATA.
    Only metrics an address names yield signals (others cost a dict look-up each); a metric
    with ``is_historical`` is dropped unless ``include_historical`` (the mapping would take an
    old value for the current one).

Sequence numbers and rebirth
    ``seq`` goes 0..255 and wraps, one step per message of the node (NBIRTH is 0; DBIRTH,
    NDATA, DDATA, DDEATH count; NDEATH, the broker-published will, carries none). A step other
    than +1 is a gap (:attr:`SparkplugStats.seq_gaps`): a message was lost or reordered. A gap
    (with ``rebirth_on_gap``), an unknown alias, a DATA or DBIRTH before the node's NBIRTH and a
    DDATA before the device's DBIRTH make the host publish an NCMD ``Node Control/Rebirth`` =
    true to the node: once, then again only if no NBIRTH came within ``rebirth_interval_s``.
    ``request_rebirth=False`` makes a read-only host that publishes nothing. Values of DATA
    before a BIRTH cannot be resolved and are dropped.

Deaths
    An NDEATH whose ``bdSeq`` is that of the node's NBIRTH (or that carries none) turns every
    addressed metric of the node and of its born devices BAD (value None, status ``NDEATH``);
    an NDEATH of another ``bdSeq`` is the late will of an earlier session and is ignored
    (:attr:`SparkplugStats.stale_deaths`). DDEATH turns that device's metrics BAD (``DDEATH``).
    :meth:`SparkplugHost.on_connection_lost` turns everything born BAD and forgets all
    sessions: after a reconnect the first DATA of each node asks for a rebirth.

Values
    See :func:`decode_value` and the table in ``docs/sparkplug.md``: integers keep their sign
    (``Int8`` -1 arrives as 255 from some encoders and as 4294967295 from others), ``DateTime``
    becomes an RFC 3339 string, ``Bytes``/``File`` base64, arrays lists, a ``DataSet`` a list
    of row dicts and a ``Template`` instance a dict of its members (each member is also
    addressable as ``<instance>/<member>``). ``is_null`` (or no value at all) is value None
    with BAD quality, as a JSON null is for MQTT. The metric's ``Quality`` property, when
    present, gives the quality (OPC DA codes: 192 good, 64 uncertain, 0 bad) and the status.
    The time is the metric's timestamp, else the payload's, else (None) the receive time.

Nothing here raises on input from the network: a payload that is not protobuf, a topic that
is not Sparkplug, a value that does not fit its data type come back as
:attr:`Outcome.malformed` or as a BAD signal with the reason in its status.
"""

from __future__ import annotations

import base64
import operator
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]
from pydantic import Field, field_validator

from gateway.configbase import Strict
from gateway.model import Quality, Signal
from gateway.sources.sparkplug_schema import DataType, Payload

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"
QUALITY_PROPERTY = "Quality"
COMPRESSED_UUID = "SPBV1.0_COMPRESSED"
"""``Payload.uuid`` of a compressed payload: ``body`` is the real payload, DEFLATE or GZIP."""
MAX_INFLATED_BYTES = 16 * 1024 * 1024
"""A compressed payload inflating to more than this is refused (malformed)."""
REBIRTH_INTERVAL_S = 10.0
"""Default: how long a rebirth request is left to be answered before another may be sent."""

_NODE_TYPES = frozenset({"NBIRTH", "NDATA", "NDEATH"})
_COMMAND_TYPES = frozenset({"NCMD", "DCMD"})


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a Sparkplug group, edge node, device or host id, or None."""
    if not value:
        return "cannot be empty"
    bad = [c for c in ("/", "+", "#", "\0") if c in value]
    if bad:
        return f"cannot contain {' or '.join(repr(c) for c in bad)} (it is one topic level)"
    return None


class SparkplugAddress(Strict):
    """Where a signal's value is among the metrics of a Sparkplug B edge node or device."""

    group: str = Field(examples=["plant1"])
    """Sparkplug group id: the topic level after ``spBv1.0``."""
    edge_node: str = Field(examples=["line2-plc"])
    """Edge node id."""
    device: str | None = Field(default=None, examples=["press07"])
    """Device id. Omit it for a metric of the edge node itself."""
    metric: str = Field(examples=["Spindle/Speed", "Motor1/Current"])
    """Metric name as the BIRTH gives it (it may contain ``/``); a member of a Template
    instance is ``<instance>/<member>``."""

    @field_validator("group", "edge_node", "device")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        problem = None if value is None else id_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("metric")
    @classmethod
    def _valid_metric(cls, value: str) -> str:
        if not value:
            raise ValueError("a metric name cannot be empty")
        return value

    @property
    def tag(self) -> str:
        """The canonical address: ``spBv1.0/<group>/<edge_node>[/<device>]#<metric>``."""
        where = self.edge_node if self.device is None else f"{self.edge_node}/{self.device}"
        return f"{NAMESPACE}/{self.group}/{where}#{self.metric}"


@dataclass(slots=True)
class Outcome:
    """What one message means for the gateway."""

    signals: list[Signal] = field(default_factory=list)
    """Readings of addressed metrics, in payload order."""
    commands: list[tuple[str, bytes]] = field(default_factory=list)
    """MQTT messages to publish, ``(topic, payload)``; see :func:`publish_options`."""
    malformed: str | None = None
    """Why the message could not be used at all, or None."""
    dropped: int = 0
    """Values that could not be resolved (unknown alias, DATA before its BIRTH)."""


@dataclass(slots=True)
class SparkplugStats:
    """Running counts of one host, for the caller's metrics."""

    messages: int = 0
    ignored: int = 0
    """Messages of edge nodes no address names, commands (NCMD/DCMD), other hosts' STATE."""
    malformed: int = 0
    seq_gaps: int = 0
    unknown_aliases: int = 0
    dropped_values: int = 0
    """Values dropped: unknown alias, DATA before its BIRTH."""
    rebirths_requested: int = 0
    stale_deaths: int = 0
    """NDEATH messages of an earlier session (another bdSeq), ignored."""
    historical_dropped: int = 0


def publish_options(topic: str) -> tuple[int, bool]:
    """``(qos, retain)`` for a command topic: the host's STATE is QoS 1 retained (Sparkplug
    3.0), an NCMD is QoS 0 and not retained."""
    if topic.startswith(f"{NAMESPACE}/STATE/"):
        return 1, True
    return 0, False


# -- values ------------------------------------------------------------------------------------


def _signed(bits: int) -> Callable[[Any], int]:
    """Two's complement of the low ``bits`` bits: Int8 -1 is 255 (Tahu Python, pysparkplug)
    or 4294967295 (Tahu Java, 32-bit) on the wire, and -1 either way here."""
    mask, sign, full = (1 << bits) - 1, 1 << (bits - 1), 1 << bits

    def conv(value: Any) -> int:
        v = operator.index(value) & mask
        return v - full if v & sign else v

    return conv


_int32 = _signed(32)


def _text(value: Any) -> str:
    """A protobuf string field: proto2 hands over ``bytes`` when they are not UTF-8."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"expected a string, not {type(value).__name__}")


def _datetime(ms: Any) -> str:
    """Unix milliseconds as RFC 3339 UTC with milliseconds: ``2026-01-31T08:15:00.250Z``."""
    stamp = datetime.fromtimestamp(operator.index(ms) / 1000, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _base64(value: Any) -> str:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, not {type(value).__name__}")
    return base64.b64encode(value).decode("ascii")


def _packed(code: str, each: Callable[[Any], Any] | None = None) -> Callable[[Any], list[Any]]:
    """A little-endian packed array of ``struct`` code ``code`` (Sparkplug's array types)."""
    size = struct.calcsize("<" + code)

    def conv(value: Any) -> list[Any]:
        count, rest = divmod(len(value), size)
        if rest:
            raise ValueError(f"{len(value)} bytes are not a whole number of {size}-byte items")
        items = list(struct.unpack(f"<{count}{code}", value))
        return items if each is None else [each(v) for v in items]

    return conv


def _boolean_array(value: Any) -> list[bool]:
    """A 4-byte little-endian count, then the bits, most significant bit first."""
    if not isinstance(value, bytes) or len(value) < 4:
        raise ValueError("a BooleanArray starts with a 4-byte count")
    count = int.from_bytes(value[:4], "little")
    if len(value) - 4 < (count + 7) // 8:
        raise ValueError(f"a BooleanArray of {count} items needs {(count + 7) // 8} more bytes")
    return [bool(value[4 + i // 8] & (0x80 >> (i % 8))) for i in range(count)]


def _string_array(value: Any) -> list[str]:
    """UTF-8 strings, each ended by a NUL byte."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, not {type(value).__name__}")
    items = value.decode("utf-8", "replace").split("\0")
    if items and items[-1] == "":
        items.pop()
    return items


def _dataset(ds: Any) -> list[dict[str, Any]]:
    """A DataSet as a list of rows, each ``{column: value}`` (a missing value is None)."""
    columns = [_text(c) for c in ds.columns]
    convs = [_CONVERT.get(t) for t in ds.types]
    convs += [None] * (len(columns) - len(convs))
    rows: list[dict[str, Any]] = []
    for row in ds.rows:
        record: dict[str, Any] = dict.fromkeys(columns)
        for column, conv, element in zip(columns, convs, row.elements, strict=False):
            kind = element.WhichOneof("value")
            if kind is None or kind == "extension_value":
                continue
            raw = getattr(element, kind)
            record[column] = raw if conv is None else conv(raw)
        rows.append(record)
    return rows


def _template(template: Any) -> dict[str, Any]:
    """A Template instance as ``{member: value}`` (nested instances as nested dicts)."""
    return {_text(m.name): None if m.is_null else decode_value(m, m.datatype)
            for m in template.metrics}


_CONVERT: dict[int, Callable[[Any], Any]] = {
    DataType.Int8: _signed(8), DataType.Int16: _signed(16), DataType.Int32: _signed(32),
    DataType.Int64: _signed(64),
    DataType.UInt8: operator.index, DataType.UInt16: operator.index,
    DataType.UInt32: operator.index, DataType.UInt64: operator.index,
    DataType.Float: float, DataType.Double: float, DataType.Boolean: bool,
    DataType.String: _text, DataType.Text: _text, DataType.UUID: _text,
    DataType.DateTime: _datetime,
    DataType.Bytes: _base64, DataType.File: _base64,
    DataType.DataSet: _dataset, DataType.Template: _template,
    DataType.Int8Array: _packed("b"), DataType.Int16Array: _packed("h"),
    DataType.Int32Array: _packed("i"), DataType.Int64Array: _packed("q"),
    DataType.UInt8Array: _packed("B"), DataType.UInt16Array: _packed("H"),
    DataType.UInt32Array: _packed("I"), DataType.UInt64Array: _packed("Q"),
    DataType.FloatArray: _packed("f"), DataType.DoubleArray: _packed("d"),
    DataType.BooleanArray: _boolean_array, DataType.StringArray: _string_array,
    DataType.DateTimeArray: _packed("q", _datetime),
}
_BY_FIELD: dict[str, Callable[[Any], Any]] = {
    "bytes_value": _base64, "dataset_value": _dataset, "template_value": _template,
    "string_value": _text,
}
"""For a data type we do not know (or none): what the value field alone says."""

DECODE_ERRORS = (ValueError, TypeError, OverflowError, OSError, AttributeError, struct.error,
                 RecursionError)
"""What decoding a value that does not fit its data type raises."""


def decode_value(metric: Any, datatype: int) -> Any:
    """The JSON-friendly value of a ``Payload.Metric`` (or a template member) of ``datatype``
    (0: unknown; the value field decides). None when it carries no value. Raises one of
    :data:`DECODE_ERRORS` when the value does not fit the type."""
    kind = metric.WhichOneof("value")
    if kind is None:
        return None
    if kind == "extension_value":
        raise ValueError("an extension value (not supported)")
    raw = getattr(metric, kind)
    conv = _CONVERT.get(datatype) or _BY_FIELD.get(kind)
    return raw if conv is None else conv(raw)


def quality_of(code: int) -> Quality:
    """An OPC DA quality code (Sparkplug's ``Quality`` property): in 0..255 the two top bits,
    11 good (192), 01 uncertain (64), else bad (0); any other code is bad (Cirrus Link's 500,
    stale, for one)."""
    if not 0 <= code <= 255:
        return Quality.BAD
    bits = code & 0xC0
    if bits == 0xC0:
        return Quality.GOOD
    return Quality.UNCERTAIN if bits == 0x40 else Quality.BAD


def _quality_property(properties: Any) -> int | None:
    for key, value in zip(properties.keys, properties.values, strict=False):
        if key == QUALITY_PROPERTY:
            kind = value.WhichOneof("value")
            if kind in ("int_value", "long_value"):
                return _int32(getattr(value, kind))
    return None


def _int_metric(payload: Any, name: str) -> int | None:
    """The integer value of the metric ``name`` of a payload (``bdSeq``), or None."""
    for m in payload.metrics:
        if m.name == name:
            kind = m.WhichOneof("value")
            if kind in ("int_value", "long_value"):
                return int(getattr(m, kind))
    return None


# -- the host ----------------------------------------------------------------------------------


class _Metric:
    """What a BIRTH said of one metric, and whether an address wants it."""

    __slots__ = ("conv", "datatype", "members", "name", "tag")

    def __init__(self, name: str, datatype: int, tag: str | None, members: bool) -> None:
        self.name = name
        self.datatype = datatype
        self.conv = _CONVERT.get(datatype)
        self.tag = tag
        self.members = members
        """A Template instance some of whose members are addressed (``name/member``)."""


class _Scope:
    """The metrics of an edge node itself, or of one of its devices."""

    __slots__ = ("born", "by_alias", "by_name", "member_types", "parents", "tags")

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        """Addressed metric name -> tag; fixed."""
        self.parents: set[str] = set()
        """Every ``a``, ``a/b`` of an addressed ``a/b/c``: where template members may be."""
        self.born = False
        self.by_name: dict[str, _Metric] = {}
        self.by_alias: dict[int, _Metric] = {}
        self.member_types: dict[str, int] = {}
        """Data types of template members (``instance/member``) the BIRTH gave."""

    def add(self, metric: str, tag: str) -> None:
        self.tags[metric] = tag
        levels = metric.split("/")
        self.parents.update("/".join(levels[:i]) for i in range(1, len(levels)))

    def reset(self) -> None:
        self.born = False
        self.by_name = {}
        self.by_alias = {}
        self.member_types = {}


class _Node:
    __slots__ = ("bd_seq", "born", "devices", "ncmd_topic", "own", "rebirth_at", "seq")

    def __init__(self, group: str, edge_node: str) -> None:
        self.ncmd_topic = f"{NAMESPACE}/{group}/NCMD/{edge_node}"
        self.own = _Scope()
        self.devices: dict[str, _Scope] = {}
        """The addressed devices only: the others' messages count for ``seq`` alone."""
        self.born = False
        self.seq = 0
        self.bd_seq: int | None = None
        self.rebirth_at: float | None = None

    def scopes(self) -> Iterable[_Scope]:
        yield self.own
        yield from self.devices.values()


_Handler = Callable[[_Node, str | None, Any, float, Outcome], None]


class SparkplugHost:
    """A Sparkplug B host application's view of the edge nodes that ``addresses`` name.

    ``connection`` names the gateway connection in the Signals; ``host_id`` is the Sparkplug
    host application id for :meth:`state_message` (None: no STATE). Not thread-safe: call it
    from one thread (the MQTT source's message thread, say).
    """

    def __init__(
        self,
        addresses: Iterable[SparkplugAddress],
        *,
        connection: str,
        host_id: str | None = None,
        request_rebirth: bool = True,
        rebirth_on_gap: bool = True,
        rebirth_interval_s: float = REBIRTH_INTERVAL_S,
        include_historical: bool = False,
    ) -> None:
        if host_id is not None and (problem := id_problem(host_id)):
            raise ValueError(f"host_id {problem}")
        self.connection = connection
        self.host_id = host_id
        self.request_rebirth = request_rebirth
        self.rebirth_on_gap = rebirth_on_gap
        self.rebirth_interval_s = rebirth_interval_s
        self.include_historical = include_historical
        self.stats = SparkplugStats()
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._groups: list[str] = []
        for a in addresses:
            node = self._nodes.get((a.group, a.edge_node))
            if node is None:
                node = self._nodes[(a.group, a.edge_node)] = _Node(a.group, a.edge_node)
                if a.group not in self._groups:
                    self._groups.append(a.group)
            scope = node.own if a.device is None else node.devices.setdefault(a.device, _Scope())
            scope.add(a.metric, a.tag)
        self._handlers: dict[str, _Handler] = {
            "NBIRTH": self._nbirth, "DBIRTH": self._dbirth, "NDATA": self._ndata,
            "DDATA": self._ddata, "NDEATH": self._ndeath, "DDEATH": self._ddeath,
        }
        self._state_ts: int | None = None
        self._last_state_ts = 0
        self._online = False

    # -- the caller's API ----------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to: ``spBv1.0/<group>/#`` per group, and the host's own
        STATE topic when it has a ``host_id`` (to re-assert itself online, Sparkplug 3.0)."""
        topics = [f"{NAMESPACE}/{g}/#" for g in self._groups]
        if self.host_id is not None:
            topics.append(self.state_topic())
        return topics

    def state_topic(self) -> str:
        if self.host_id is None:
            raise ValueError("this host has no host_id")
        return f"{NAMESPACE}/STATE/{self.host_id}"

    def state_message(self, online: bool, timestamp_ms: int | None = None) -> tuple[str, bytes]:
        """The Sparkplug 3.0 host STATE message, ``(topic, payload)``: JSON
        ``{"online": bool, "timestamp": <Unix ms>}``, to publish with QoS 1, retained.

        One timestamp serves an MQTT session: the first call after construction or after
        :meth:`on_connection_lost` takes a new one. So call ``state_message(False)`` for the
        CONNECT's will, ``state_message(True)`` once connected, and ``state_message(False)``
        again to publish on a clean stop: the three carry the same timestamp, as the
        specification asks."""
        if timestamp_ms is None:
            if self._state_ts is None:
                self._state_ts = max(int(time.time() * 1000), self._last_state_ts + 1)
                self._last_state_ts = self._state_ts
            timestamp_ms = self._state_ts
        self._online = online
        body = _json.encode({"online": online, "timestamp": timestamp_ms})
        return self.state_topic(), body

    def on_connection_lost(self, now: float) -> list[Signal]:
        """The broker connection is gone: every metric of a born node or device turns BAD
        (status ``connection lost``) and every session is forgotten (after the reconnect, the
        first DATA of a node asks for its rebirth). The next STATE gets a new timestamp."""
        signals: list[Signal] = []
        for node in self._nodes.values():
            if node.born:
                for scope in node.scopes():
                    if scope.born:
                        self._bad(scope, "connection lost", None, now, signals)
            self._forget(node)
        self._state_ts = None
        self._online = False
        return signals

    def on_message(self, topic: str, payload: bytes, receive_time: float) -> Outcome:
        """Take one message of a subscription. Never raises on what came from the network."""
        stats = self.stats
        stats.messages += 1
        parts = topic.split("/")
        count = len(parts)
        if count >= 4 and parts[0] == NAMESPACE:
            node = self._nodes.get((parts[1], parts[3]))
            if node is None:
                stats.ignored += 1
                return Outcome()
            kind = parts[2]
            handler = self._handlers.get(kind)
            if handler is None or count != (4 if kind in _NODE_TYPES else 5):
                if kind in _COMMAND_TYPES:
                    stats.ignored += 1
                    return Outcome()
                return self._malformed(f"not a Sparkplug B message topic: {topic[:200]!r}")
            try:
                message = Payload.FromString(payload)
                if message.uuid == COMPRESSED_UUID:
                    message = Payload.FromString(_inflate(message.body))
            except (DecodeError, TypeError, ValueError, zlib.error) as exc:
                return self._malformed(f"{kind} payload is not Sparkplug B protobuf: {exc}")
            out = Outcome()
            try:
                handler(node, parts[4] if count == 5 else None, message, receive_time, out)
            except DECODE_ERRORS as exc:  # a payload the handlers did not foresee
                out.malformed = f"{kind} payload could not be used: {exc!r}"[:300]
                stats.malformed += 1
            return out
        if count == 3 and parts[0] == NAMESPACE and parts[1] == "STATE":
            return self._on_state(parts[2], payload)
        return self._malformed(f"not a Sparkplug B topic: {topic[:200]!r}")

    # -- message types -------------------------------------------------------------------------

    def _nbirth(self, node: _Node, _: str | None, p: Any, now: float, out: Outcome) -> None:
        for scope in node.devices.values():
            scope.reset()
        node.born = True
        node.seq = p.seq
        node.bd_seq = _int_metric(p, BDSEQ_METRIC)
        node.rebirth_at = None
        self._birth(node.own, p, now, out)

    def _dbirth(self, node: _Node, device: str | None, p: Any, now: float, out: Outcome) -> None:
        if not node.born:
            self._unborn(node, p, now, out)
            return
        self._check_seq(node, p, now, out)
        scope = node.devices.get(device or "")
        if scope is not None:
            self._birth(scope, p, now, out)

    def _ndata(self, node: _Node, _: str | None, p: Any, now: float, out: Outcome) -> None:
        if not node.born:
            self._unborn(node, p, now, out)
            return
        self._check_seq(node, p, now, out)
        self._data(node, node.own, p, now, out)

    def _ddata(self, node: _Node, device: str | None, p: Any, now: float, out: Outcome) -> None:
        if not node.born:
            self._unborn(node, p, now, out)
            return
        self._check_seq(node, p, now, out)
        scope = node.devices.get(device or "")
        if scope is None:
            return
        if not scope.born:
            self._unborn(node, p, now, out)
            return
        self._data(node, scope, p, now, out)

    def _ndeath(self, node: _Node, _: str | None, p: Any, now: float, out: Outcome) -> None:
        if not node.born:
            return
        bd_seq = _int_metric(p, BDSEQ_METRIC)
        if bd_seq is not None and node.bd_seq is not None and bd_seq != node.bd_seq:
            self.stats.stale_deaths += 1
            return
        for scope in node.scopes():
            if scope.born:
                self._bad(scope, "NDEATH", None, now, out.signals)
        self._forget(node)

    def _ddeath(self, node: _Node, device: str | None, p: Any, now: float, out: Outcome) -> None:
        if not node.born:
            return
        self._check_seq(node, p, now, out)
        scope = node.devices.get(device or "")
        if scope is not None and scope.born:
            self._bad(scope, "DDEATH", p.timestamp / 1000 if p.timestamp else None, now,
                      out.signals)
            scope.reset()

    def _on_state(self, host_id: str, payload: bytes) -> Outcome:
        """Our own STATE topic: an offline message while we are online (an earlier session's
        will, or a takeover) is answered by publishing online again."""
        if host_id != self.host_id or not self._online:
            self.stats.ignored += 1
            return Outcome()
        try:
            doc = _json_decoder.decode(payload)
        except (msgspec.DecodeError, TypeError):
            return self._malformed("the STATE payload is not JSON")
        out = Outcome()
        if isinstance(doc, dict) and doc.get("online") is False:
            out.commands.append(self.state_message(True))
        return out

    # -- the work ------------------------------------------------------------------------------

    def _birth(self, scope: _Scope, p: Any, now: float, out: Outcome) -> None:
        scope.reset()
        scope.born = True
        tags, parents, by_name, by_alias = scope.tags, scope.parents, scope.by_name, scope.by_alias
        fallback = p.timestamp
        for m in p.metrics:
            name = m.name
            if not name or not isinstance(name, str):
                continue
            datatype = m.datatype
            entry = _Metric(name, datatype, tags.get(name),
                            datatype == DataType.Template and name in parents)
            by_name[name] = entry
            if m.HasField("alias"):
                by_alias[m.alias] = entry
            if entry.tag is not None or entry.members:
                if datatype == DataType.Template and m.template_value.is_definition:
                    continue
                self._emit(scope, entry, m, fallback, now, out)

    def _data(self, node: _Node, scope: _Scope, p: Any, now: float, out: Outcome) -> None:
        by_name, by_alias, tags = scope.by_name, scope.by_alias, scope.tags
        fallback = p.timestamp
        signals, connection, historical = out.signals, self.connection, self.include_historical
        for m in p.metrics:
            name = m.name
            if name:
                entry = by_name.get(name)
                if entry is None:  # not in the BIRTH: still usable when addressed
                    tag = tags.get(name)
                    if tag is None:
                        continue
                    entry = _Metric(name, m.datatype, tag, False)
            else:
                entry = by_alias.get(m.alias)
                if entry is None:
                    self.stats.unknown_aliases += 1
                    self.stats.dropped_values += 1
                    out.dropped += 1
                    self._rebirth(node, now, out)
                    continue
            tag = entry.tag
            conv = entry.conv
            if tag is None or entry.members or conv is None:
                if tag is not None or entry.members:
                    self._emit(scope, entry, m, fallback, now, out)
                continue
            # The common case, inlined (this loop is the hot path): a plain value, no
            # properties, not null, not historical. Anything else takes `_emit`.
            if m.is_historical and not historical:
                self.stats.historical_dropped += 1
                continue
            kind = m.WhichOneof("value")
            if kind is None or kind == "extension_value" or m.is_null or m.HasField("properties"):
                self._emit(scope, entry, m, fallback, now, out)
                continue
            stamp = m.timestamp or fallback
            try:
                value = conv(getattr(m, kind))
            except DECODE_ERRORS:
                self._emit(scope, entry, m, fallback, now, out)
                continue
            signals.append(Signal(connection, tag, value, _GOOD, None,
                                  stamp / 1000 if stamp else None, now))

    def _emit(self, scope: _Scope, entry: _Metric, m: Any, fallback: int, now: float,
              out: Outcome) -> None:
        if m.is_historical and not self.include_historical:
            self.stats.historical_dropped += 1
            return
        stamp = m.timestamp or fallback
        source_time = stamp / 1000 if stamp else None
        datatype = entry.datatype or m.datatype
        if entry.tag is not None:
            out.signals.append(self._signal(entry.tag, m, datatype, source_time, now))
        if entry.members and datatype == DataType.Template and not m.is_null:
            self._members(scope, entry.name, m.template_value, source_time, now, out)

    def _members(self, scope: _Scope, prefix: str, template: Any, source_time: float | None,
                 now: float, out: Outcome) -> None:
        """Signals of the addressed members of a Template instance, as ``prefix/member``."""
        for m in template.metrics:
            full = f"{prefix}/{_text(m.name)}"
            datatype = m.datatype
            if datatype:
                scope.member_types[full] = datatype
            else:
                datatype = scope.member_types.get(full, 0)
            stamp = m.timestamp
            when = stamp / 1000 if stamp else source_time
            tag = scope.tags.get(full)
            if tag is not None:
                out.signals.append(self._signal(tag, m, datatype, when, now))
            if full in scope.parents and datatype == DataType.Template and not m.is_null:
                self._members(scope, full, m.template_value, when, now, out)

    def _signal(self, tag: str, m: Any, datatype: int, source_time: float | None,
                now: float) -> Signal:
        if m.is_null:
            return Signal(self.connection, tag, None, Quality.BAD, "is_null", source_time, now)
        try:
            value = decode_value(m, datatype)
        except DECODE_ERRORS as exc:
            name = DataType(datatype).name if datatype in _DATATYPES else str(datatype)
            return Signal(self.connection, tag, None, Quality.BAD,
                          f"undecodable {name}: {exc}"[:200], source_time, now)
        if value is None:
            return Signal(self.connection, tag, None, Quality.BAD, "no value", source_time, now)
        quality, status = Quality.GOOD, None
        if m.HasField("properties"):
            code = _quality_property(m.properties)
            if code is not None:
                quality, status = quality_of(code), code
        return Signal(self.connection, tag, value, quality, status, source_time, now)

    def _bad(self, scope: _Scope, status: str, source_time: float | None, now: float,
             into: list[Signal]) -> None:
        name = self.connection
        into.extend(Signal(name, tag, None, Quality.BAD, status, source_time, now)
                    for tag in scope.tags.values())

    def _check_seq(self, node: _Node, p: Any, now: float, out: Outcome) -> None:
        if not p.HasField("seq"):
            return
        seq = p.seq
        expected = (node.seq + 1) % 256
        node.seq = seq
        if seq != expected:
            self.stats.seq_gaps += 1
            if self.rebirth_on_gap:
                self._rebirth(node, now, out)

    def _unborn(self, node: _Node, p: Any, now: float, out: Outcome) -> None:
        """A DATA or DBIRTH before the NBIRTH, or a DDATA before the DBIRTH."""
        dropped = len(p.metrics)
        self.stats.dropped_values += dropped
        out.dropped += dropped
        self._rebirth(node, now, out)

    def _rebirth(self, node: _Node, now: float, out: Outcome) -> None:
        if not self.request_rebirth:
            return
        if node.rebirth_at is not None and 0 <= now - node.rebirth_at < self.rebirth_interval_s:
            return
        node.rebirth_at = now
        self.stats.rebirths_requested += 1
        out.commands.append((node.ncmd_topic, rebirth_payload(now)))

    def _forget(self, node: _Node) -> None:
        node.born = False
        node.bd_seq = None
        node.rebirth_at = None
        for scope in node.scopes():
            scope.reset()

    def _malformed(self, reason: str) -> Outcome:
        self.stats.malformed += 1
        return Outcome(malformed=reason)


def _inflate(body: bytes) -> bytes:
    """The payload a compressed one carries (zlib or gzip framing, told apart by the header;
    Tahu's ``algorithm`` metric names one of the two)."""
    inflater = zlib.decompressobj(wbits=47)
    data = inflater.decompress(body, MAX_INFLATED_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"a compressed payload inflating to more than {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise ValueError("a compressed payload cut short")
    return data


def rebirth_payload(now: float) -> bytes:
    """An NCMD payload whose metric ``Node Control/Rebirth`` is true, timed ``now``."""
    ms = int(now * 1000) if 0 <= now < 1e11 else int(time.time() * 1000)
    p = Payload(timestamp=ms)
    m = p.metrics.add(name=REBIRTH_METRIC, timestamp=ms, datatype=DataType.Boolean)
    m.boolean_value = True
    data: bytes = p.SerializeToString()
    return data


_DATATYPES = frozenset(DataType)
_GOOD = Quality.GOOD
_json = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder()
