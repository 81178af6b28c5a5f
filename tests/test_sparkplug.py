"""SparkplugHost without a broker: births, aliases, seq gaps and rebirths, deaths, data types,
STATE, and malformed input.

Every payload the host reads here is made by an independent Sparkplug B implementation: the
Python core of Eclipse Tahu (``addMetric``, ``initDatasetMetric``, ``initTemplateMetric``,
...) with its own compiled ``sparkplug_b.proto``, as packaged on PyPI by
``sparkplug-b-packets``; the rebirth commands the host makes are read back with that same
schema. Only BooleanArray and StringArray values are written by hand from the specification's
byte layout, since that copy of Tahu predates the fix of its packing of those two
(eclipse/tahu#367).
"""

from __future__ import annotations

import gzip
import json
import timeit
import zlib
from typing import Any

import pytest
import sparkplub_b_packets.core.sparkplug_b as tahu
from google.protobuf import descriptor_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sparkplub_b_packets.core import array_packer
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu_pb

from gateway.model import Quality, Signal
from gateway.sources import sparkplug_schema
from gateway.sources.sparkplug import (
    Outcome,
    SparkplugAddress,
    SparkplugHost,
    publish_options,
    quality_of,
)

T = tahu.MetricDataType
DST = tahu.DataSetDataType
GROUP, NODE = "plant1", "line2"
NOW = 1_760_000_100.0
"""Receive time of every message unless a test says otherwise."""
MS = 1_760_000_000_250
"""The edge node's clock: the metric timestamps."""
SOURCE = MS / 1000


def tag(metric: str, device: str | None = None) -> str:
    return SparkplugAddress(group=GROUP, edge_node=NODE, device=device, metric=metric).tag


ADDRESSES = [
    SparkplugAddress(group=GROUP, edge_node=NODE, metric="Temperature"),
    SparkplugAddress(group=GROUP, edge_node=NODE, device="press07", metric="Spindle/Speed"),
    SparkplugAddress(group=GROUP, edge_node=NODE, device="press07", metric="State"),
    SparkplugAddress(group=GROUP, edge_node=NODE, device="press07", metric="Offset"),
    SparkplugAddress(group=GROUP, edge_node=NODE, device="press08", metric="Count"),
]


def make_host(addresses: list[SparkplugAddress] = ADDRESSES, **options: Any) -> SparkplugHost:
    return SparkplugHost(addresses, connection="plant_mqtt", host_id="gw1", **options)


Metric = tuple[Any, ...]
"""``(name, alias, datatype, value)`` or with a fifth item, the timestamp (ms)."""

_PACKERS = {
    tahu_pb.Int8Array: array_packer.convert_to_packed_int8_array,
    tahu_pb.Int16Array: array_packer.convert_to_packed_int16_array,
    tahu_pb.Int32Array: array_packer.convert_to_packed_int32_array,
    tahu_pb.Int64Array: array_packer.convert_to_packed_int64_array,
    tahu_pb.UInt8Array: array_packer.convert_to_packed_uint8_array,
    tahu_pb.UInt16Array: array_packer.convert_to_packed_uint16_array,
    tahu_pb.UInt32Array: array_packer.convert_to_packed_uint32_array,
    tahu_pb.UInt64Array: array_packer.convert_to_packed_uint64_array,
    tahu_pb.FloatArray: array_packer.convert_to_packed_float_array,
    tahu_pb.DoubleArray: array_packer.convert_to_packed_double_array,
    tahu_pb.DateTimeArray: array_packer.convert_to_packed_datetime_array,
}
"""Tahu's array packers (its ``addMetric`` of this copy lacks the array type codes)."""


def add_metric(container: Any, name: str | None, alias: int | None, datatype: int, value: Any,
               timestamp: int = MS) -> Any:
    """Tahu's ``addMetric``, or for a numeric or DateTime array its packer."""
    if datatype not in _PACKERS:
        return tahu.addMetric(container, name, alias, datatype, value, timestamp)
    m = container.metrics.add()
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    m.timestamp, m.datatype, m.bytes_value = timestamp, datatype, _PACKERS[datatype](value)
    return m


class Edge:
    """An edge node driven by the test: payloads by Tahu's encoder, ``seq`` kept as a real
    node keeps it (one step per message, NDEATH excepted)."""

    def __init__(self, host: SparkplugHost, node: str = NODE, bd_seq: int = 7) -> None:
        self.host, self.node, self.bd_seq, self.seq = host, node, bd_seq, 0

    def payload(self, metrics: tuple[Metric, ...] = (), seq: bool = True) -> Any:
        p = tahu_pb.Payload()
        p.timestamp = MS
        if seq:
            p.seq = self.seq
            self.seq = (self.seq + 1) % 256
        for name, alias, datatype, value, *stamp in metrics:
            add_metric(p, name, alias, datatype, value, stamp[0] if stamp else MS)
        return p

    def send(self, kind: str, p: Any, device: str | None = None, now: float = NOW) -> Outcome:
        topic = f"spBv1.0/{GROUP}/{kind}/{self.node}" + (f"/{device}" if device else "")
        return self.host.on_message(topic, p.SerializeToString(), now)

    def nbirth(self, *metrics: Metric, now: float = NOW) -> Outcome:
        self.seq = 0
        p = self.payload((("bdSeq", None, T.Int64, self.bd_seq),
                          ("Node Control/Rebirth", None, T.Boolean, False), *metrics))
        return self.send("NBIRTH", p, now=now)

    def dbirth(self, device: str, *metrics: Metric) -> Outcome:
        return self.send("DBIRTH", self.payload(metrics), device)

    def ndata(self, *metrics: Metric, now: float = NOW) -> Outcome:
        return self.send("NDATA", self.payload(metrics), now=now)

    def ddata(self, device: str, *metrics: Metric, now: float = NOW) -> Outcome:
        return self.send("DDATA", self.payload(metrics), device, now=now)

    def ddeath(self, device: str) -> Outcome:
        return self.send("DDEATH", self.payload(), device)

    def ndeath(self, bd_seq: int | None = None) -> Outcome:
        p = tahu_pb.Payload()  # the will: no seq, no timestamp
        tahu.addMetric(p, "bdSeq", None, T.Int64, self.bd_seq if bd_seq is None else bd_seq, MS)
        return self.send("NDEATH", p)

    def born(self) -> None:
        """NBIRTH and both DBIRTHs, the way a node answers a rebirth request."""
        self.nbirth(("Temperature", 1, T.Double, 21.5), ("Uptime", 2, T.UInt64, 99))
        self.dbirth("press07", ("Spindle/Speed", 10, T.Int32, 1200), ("State", 11, T.String,
                    "RUNNING"), ("Offset", 12, T.Int8, -5), ("Unbound", 13, T.Float, 1.0))
        self.dbirth("press08", ("Count", 20, T.UInt32, 4_000_000_000))


def values(out: Outcome) -> dict[str, Any]:
    return {s.tag: s.value for s in out.signals}


def rebirth_metric(command: tuple[str, bytes]) -> Any:
    """The NCMD's payload as the independent library reads it; checks it asks for a rebirth."""
    topic, payload = command
    assert topic == f"spBv1.0/{GROUP}/NCMD/{NODE}"
    decoded = tahu_pb.Payload.FromString(payload)
    [metric] = decoded.metrics
    assert metric.name == "Node Control/Rebirth"
    assert metric.datatype == T.Boolean
    assert metric.boolean_value is True
    assert decoded.timestamp > 0
    return metric


# -- the schema ---------------------------------------------------------------------------------


def test_schema_is_the_one_the_independent_library_compiled() -> None:
    theirs = descriptor_pb2.FileDescriptorProto()
    tahu_pb.DESCRIPTOR.CopyToProto(theirs)
    ours = sparkplug_schema.file_descriptor()
    assert ours.package == theirs.package
    assert list(ours.message_type) == list(theirs.message_type)
    assert list(ours.enum_type) == list(theirs.enum_type)


# -- addresses ----------------------------------------------------------------------------------


def test_address_tag_and_validation() -> None:
    node_level = SparkplugAddress(group="g", edge_node="n", metric="Node Info/Serial")
    assert node_level.tag == "spBv1.0/g/n#Node Info/Serial"
    assert SparkplugAddress(group="g", edge_node="n", device="d", metric="a/b").tag == \
        "spBv1.0/g/n/d#a/b"
    for bad in ({"group": "g/x"}, {"edge_node": "+"}, {"device": "d#"}, {"group": ""},
                {"metric": ""}, {"extra": 1}):
        with pytest.raises(ValidationError):
            SparkplugAddress.model_validate({"group": "g", "edge_node": "n", "metric": "m", **bad})


def test_subscriptions_per_group_and_own_state() -> None:
    other = SparkplugAddress(group="plant2", edge_node="x", metric="m")
    host = make_host([*ADDRESSES, other])
    assert host.subscriptions() == ["spBv1.0/plant1/#", "spBv1.0/plant2/#", "spBv1.0/STATE/gw1"]
    assert SparkplugHost(ADDRESSES, connection="c").subscriptions() == ["spBv1.0/plant1/#"]
    with pytest.raises(ValueError, match="host_id"):
        SparkplugHost(ADDRESSES, connection="c", host_id="a/b")


# -- births and data ----------------------------------------------------------------------------


def test_births_yield_the_addressed_metrics_with_their_source_time() -> None:
    host = make_host()
    edge = Edge(host)
    nbirth = edge.nbirth(("Temperature", 1, T.Double, 21.5), ("Uptime", 2, T.UInt64, 99))
    assert nbirth.signals == [Signal("plant_mqtt", tag("Temperature"), 21.5, Quality.GOOD, None,
                                     SOURCE, NOW)]
    assert nbirth.commands == [] and nbirth.malformed is None
    dbirth = edge.dbirth("press07", ("Spindle/Speed", 10, T.Int32, 1200),
                         ("State", 11, T.String, "RUNNING"), ("Offset", 12, T.Int8, -5),
                         ("Unbound", 13, T.Float, 1.0))
    assert values(dbirth) == {tag("Spindle/Speed", "press07"): 1200,
                              tag("State", "press07"): "RUNNING",
                              tag("Offset", "press07"): -5}
    assert all(s.quality is Quality.GOOD and s.source_time == SOURCE for s in dbirth.signals)
    assert host.stats.seq_gaps == 0


def test_data_by_alias_and_by_name_resolves_tags_values_and_times() -> None:
    host = make_host()
    edge = Edge(host)
    edge.born()
    # NDATA by alias only, as Tahu sends it with name=None.
    out = edge.ndata((None, 1, T.Double, 22.25, MS + 1000), (None, 2, T.UInt64, 100))
    assert out.signals == [Signal("plant_mqtt", tag("Temperature"), 22.25, Quality.GOOD, None,
                                  SOURCE + 1, NOW)]
    # DDATA mixing a name and aliases; the metric without a timestamp takes the payload's.
    p = edge.payload(((None, 10, T.Int32, -300, MS + 2000), ("State", None, T.String, "IDLE"),
                      (None, 13, T.Float, 2.5)))
    p.metrics[1].ClearField("timestamp")
    p.timestamp = MS + 3000
    out = edge.send("DDATA", p, "press07")
    assert [(s.tag, s.value, s.source_time) for s in out.signals] == [
        (tag("Spindle/Speed", "press07"), -300, SOURCE + 2),
        (tag("State", "press07"), "IDLE", SOURCE + 3),
    ]
    # Neither timestamp: the receive time is the event time.
    p = edge.payload(((None, 20, T.UInt32, 7),))
    p.ClearField("timestamp")
    p.metrics[0].ClearField("timestamp")
    [signal] = edge.send("DDATA", p, "press08").signals
    assert signal.source_time is None and signal.time == NOW and signal.value == 7
    assert host.stats.seq_gaps == 0 and host.stats.rebirths_requested == 0


def test_a_device_that_sends_aliases_only() -> None:
    addresses = [SparkplugAddress(group=GROUP, edge_node=NODE, device="robot", metric=m)
                 for m in ("Axis/1/Torque", "Axis/2/Torque")]
    host = make_host(addresses)
    edge = Edge(host)
    edge.nbirth()
    edge.dbirth("robot", ("Axis/1/Torque", 100, T.Float, 0.5), ("Axis/2/Torque", 101, T.Float, 0.75))
    out = edge.ddata("robot", (None, 101, T.Float, 1.25), (None, 100, T.Float, -2.0))
    assert [(s.tag, s.value) for s in out.signals] == [
        (tag("Axis/2/Torque", "robot"), 1.25), (tag("Axis/1/Torque", "robot"), -2.0)]


def test_data_of_edge_nodes_without_addresses_is_not_even_parsed() -> None:
    host = make_host()
    out = host.on_message(f"spBv1.0/{GROUP}/NDATA/someone-else", b"\xff garbage", NOW)
    assert out == Outcome() and host.stats.ignored == 1 and host.stats.malformed == 0
    # Our own rebirth command comes back through spBv1.0/<group>/#: ignored too.
    out = host.on_message(f"spBv1.0/{GROUP}/NCMD/{NODE}", b"", NOW)
    assert out == Outcome() and host.stats.ignored == 2


# -- seq and rebirth ----------------------------------------------------------------------------


def test_a_seq_gap_requests_one_rebirth_and_repeated_gaps_do_not_spam() -> None:
    host = make_host(rebirth_interval_s=10.0)
    edge = Edge(host)
    edge.born()
    edge.seq += 3  # three messages lost
    out = edge.ddata("press07", (None, 10, T.Int32, 1300))
    [command] = out.commands
    rebirth_metric(command)
    assert values(out) == {tag("Spindle/Speed", "press07"): 1300}  # still used
    assert host.stats.seq_gaps == 1 and host.stats.rebirths_requested == 1
    assert publish_options(command[0]) == (0, False)
    # More gaps while the request is pending: counted, not requested again ...
    for i in range(5):
        edge.seq += 1
        assert edge.ndata((None, 1, T.Double, 20.0), now=NOW + i).commands == []
    assert host.stats.seq_gaps == 6 and host.stats.rebirths_requested == 1
    # ... until the interval has passed without an NBIRTH,
    edge.seq += 1
    [again] = edge.ndata((None, 1, T.Double, 20.0), now=NOW + 10).commands
    rebirth_metric(again)
    # and right away after an NBIRTH (a new session).
    edge.born()
    edge.seq += 1
    assert len(edge.ndata((None, 1, T.Double, 20.0), now=NOW + 11).commands) == 1
    assert host.stats.rebirths_requested == 3


def test_seq_wraps_after_255_without_a_gap() -> None:
    host = make_host()
    edge = Edge(host)
    edge.born()
    for _ in range(600):
        out = edge.ndata((None, 1, T.Double, 1.0))
        assert out.commands == []
    assert host.stats.seq_gaps == 0


def test_gaps_without_rebirth_on_gap_are_only_counted() -> None:
    host = make_host(rebirth_on_gap=False)
    edge = Edge(host)
    edge.born()
    edge.seq += 2
    out = edge.ndata((None, 1, T.Double, 1.0))
    assert out.commands == [] and host.stats.seq_gaps == 1 and len(out.signals) == 1


def test_an_unknown_alias_is_dropped_counted_and_asks_for_a_rebirth() -> None:
    host = make_host()
    edge = Edge(host)
    edge.born()
    out = edge.ddata("press07", (None, 99, T.Int32, 5), (None, 10, T.Int32, 1400))
    assert values(out) == {tag("Spindle/Speed", "press07"): 1400}
    assert out.dropped == 1 and host.stats.unknown_aliases == 1
    [command] = out.commands
    rebirth_metric(command)


def test_data_before_any_birth_asks_for_a_rebirth() -> None:
    host = make_host()
    edge = Edge(host)
    edge.seq = 42  # a node born before the host connected
    out = edge.ndata((None, 1, T.Double, 1.0), (None, 2, T.UInt64, 5))
    assert out.signals == [] and out.dropped == 2
    [command] = out.commands
    rebirth_metric(command)
    # The node answers with its births; from then on its data resolves.
    edge.born()
    assert values(edge.ndata((None, 1, T.Double, 3.5))) == {tag("Temperature"): 3.5}


def test_a_ddata_before_its_dbirth_asks_for_a_rebirth() -> None:
    host = make_host()
    edge = Edge(host)
    edge.nbirth(("Temperature", 1, T.Double, 21.5))
    out = edge.ddata("press07", (None, 10, T.Int32, 1))
    assert out.signals == [] and out.dropped == 1 and len(out.commands) == 1
    # A device no address names counts for seq only.
    assert edge.ddata("conveyor", (None, 1, T.Int32, 1)) == Outcome()


def test_read_only_host_never_publishes() -> None:
    host = make_host(request_rebirth=False)
    edge = Edge(host)
    edge.seq = 5
    assert edge.ndata((None, 1, T.Double, 1.0)).commands == []
    edge.born()
    edge.seq += 9
    assert edge.ddata("press07", (None, 77, T.Int32, 1)).commands == []
    assert host.stats.rebirths_requested == 0 and host.stats.unknown_aliases == 1


# -- deaths -------------------------------------------------------------------------------------


def test_ddeath_turns_that_device_bad_and_leaves_the_others() -> None:
    host = make_host()
    edge = Edge(host)
    edge.born()
    out = edge.ddeath("press07")
    assert {s.tag for s in out.signals} == {tag(m, "press07") for m in
                                            ("Spindle/Speed", "State", "Offset")}
    assert all(s.quality is Quality.BAD and s.value is None and s.status == "DDEATH"
               and s.source_time == SOURCE for s in out.signals)
    # The others go on; the dead device's data waits for its DBIRTH (rebirth asked).
    assert values(edge.ddata("press08", (None, 20, T.UInt32, 8))) == {tag("Count", "press08"): 8}
    assert values(edge.ndata((None, 1, T.Double, 2.0))) == {tag("Temperature"): 2.0}
    late = edge.ddata("press07", (None, 10, T.Int32, 1))
    assert late.signals == [] and len(late.commands) == 1
    edge.dbirth("press07", ("Spindle/Speed", 10, T.Int32, 900))
    assert values(edge.ddata("press07", (None, 10, T.Int32, 901))) == {
        tag("Spindle/Speed", "press07"): 901}


def test_ndeath_of_the_current_session_turns_everything_bad() -> None:
    host = make_host()
    edge = Edge(host, bd_seq=7)
    edge.born()
    out = edge.ndeath()
    assert {s.tag for s in out.signals} == {a.tag for a in ADDRESSES}
    assert all(s.quality is Quality.BAD and s.value is None and s.status == "NDEATH"
               for s in out.signals)
    # Dead: its data (there should be none) asks for a rebirth, and a second death is a no-op.
    assert edge.ndeath().signals == []
    edge.seq = 3
    assert len(edge.ndata((None, 1, T.Double, 1.0)).commands) == 1


def test_a_stale_ndeath_of_an_earlier_session_is_ignored() -> None:
    host = make_host()
    edge = Edge(host, bd_seq=8)
    edge.born()
    out = edge.ndeath(bd_seq=7)  # the will of the session before, delivered late
    assert out.signals == [] and host.stats.stale_deaths == 1
    assert values(edge.ndata((None, 1, T.Double, 5.0))) == {tag("Temperature"): 5.0}


def test_connection_lost_turns_everything_born_bad_and_forgets_the_sessions() -> None:
    host = make_host()
    edge = Edge(host)
    edge.born()
    edge.ddeath("press08")
    signals = host.on_connection_lost(NOW + 5)
    assert {s.tag for s in signals} == {a.tag for a in ADDRESSES if a.device != "press08"}
    assert all(s.quality is Quality.BAD and s.status == "connection lost"
               and s.receive_time == NOW + 5 for s in signals)
    assert host.on_connection_lost(NOW + 6) == []
    out = edge.ndata((None, 1, T.Double, 1.0))
    assert out.signals == [] and len(out.commands) == 1


# -- values -------------------------------------------------------------------------------------


SCALARS = [
    (T.Int8, -5, -5), (T.Int16, -300, -300), (T.Int32, -70_000, -70_000),
    (T.Int64, -(2**40), -(2**40)), (T.UInt8, 250, 250), (T.UInt16, 65_000, 65_000),
    (T.UInt32, 4_000_000_000, 4_000_000_000), (T.UInt64, 2**63 + 5, 2**63 + 5),
    (T.Float, 1.5, 1.5), (T.Double, -3.25, -3.25), (T.Boolean, True, True),
    (T.String, "Läuft", "Läuft"), (T.Text, "a\nlong text", "a\nlong text"),
    (T.UUID, "123e4567-e89b-12d3-a456-426614174000", "123e4567-e89b-12d3-a456-426614174000"),
    (T.DateTime, MS, "2025-10-09T08:53:20.250Z"),
    (T.Bytes, b"\x00\x01\xff", "AAH/"), (T.File, b"%PDF", "JVBERg=="),
    (tahu_pb.Int8Array, [-23, 123], [-23, 123]), (tahu_pb.Int16Array, [-1, 300], [-1, 300]),
    (tahu_pb.Int32Array, [123456789, -987654321], [123456789, -987654321]),
    (tahu_pb.Int64Array, [-(2**40), 1], [-(2**40), 1]), (tahu_pb.UInt8Array, [23, 250], [23, 250]),
    (tahu_pb.UInt16Array, [1, 65535], [1, 65535]), (tahu_pb.UInt32Array, [0, 2**32 - 1], [0, 2**32 - 1]),
    (tahu_pb.UInt64Array, [2**64 - 1], [2**64 - 1]), (tahu_pb.FloatArray, [1.5, -2.25], [1.5, -2.25]),
    (tahu_pb.DoubleArray, [0.1, 1e300], [0.1, 1e300]),
    (tahu_pb.DateTimeArray, [MS, MS + 1000], ["2025-10-09T08:53:20.250Z", "2025-10-09T08:53:21.250Z"]),
]


@pytest.mark.parametrize(("datatype", "sent", "expected"), SCALARS,
                         ids=[tahu_pb.DataType.Name(d) for d, _, _ in SCALARS])
def test_data_types_as_tahu_encodes_them(datatype: int, sent: Any, expected: Any) -> None:
    host = make_host([SparkplugAddress(group=GROUP, edge_node=NODE, metric="v")])
    edge = Edge(host)
    [birth] = edge.nbirth(("v", 1, datatype, sent)).signals
    assert (birth.value, birth.quality) == (expected, Quality.GOOD)
    [data] = edge.ndata((None, 1, datatype, sent)).signals  # the type comes from the BIRTH
    assert data.value == expected


def test_arrays_tahus_old_packer_gets_wrong_follow_the_specification() -> None:
    """BooleanArray: a 4-byte little-endian count, then the bits most significant first;
    StringArray: UTF-8 strings each ended by NUL (Sparkplug 3.0, 6.4.17)."""
    host = make_host([SparkplugAddress(group=GROUP, edge_node=NODE, metric=m)
                      for m in ("bits", "names")])
    edge = Edge(host)
    p = edge.payload()
    p.seq = 0
    flags = [False, False, True, True, False, True, False, False,
             True, True, False, False, False, True, False, True, True]
    m = p.metrics.add(name="bits", alias=1, datatype=tahu_pb.BooleanArray, timestamp=MS)
    m.bytes_value = bytes([17, 0, 0, 0, 0x34, 0xC5, 0x80])
    m = p.metrics.add(name="names", alias=2, datatype=tahu_pb.StringArray, timestamp=MS)
    m.bytes_value = "ABC\0hellö\0".encode()
    out = edge.send("NBIRTH", p)
    assert values(out) == {tag("bits"): flags, tag("names"): ["ABC", "hellö"]}


def test_signed_integers_in_either_wire_convention() -> None:
    """Tahu Java puts Int8 -1 in int_value as 32-bit two's complement, Tahu Python as 8-bit."""
    host = make_host([SparkplugAddress(group=GROUP, edge_node=NODE, metric="o")])
    edge = Edge(host)
    edge.nbirth(("o", 1, T.Int8, 0))
    p = edge.payload()
    p.metrics.add(alias=1, int_value=0xFFFFFFFF)
    p.metrics.add(alias=1, int_value=0xFF)
    assert [s.value for s in edge.send("NDATA", p).signals] == [-1, -1]


def test_null_value_mismatched_type_and_quality_property() -> None:
    host = make_host([SparkplugAddress(group=GROUP, edge_node=NODE, metric=m)
                      for m in ("a", "b", "c", "d")])
    edge = Edge(host)
    edge.nbirth(("a", 1, T.Int32, 1), ("b", 2, T.DateTime, MS), ("c", 3, T.Double, 1.0),
                ("d", 4, T.Double, 1.0))
    p = edge.payload()
    tahu.addNullMetric(p, None, 1, T.Int32)
    p.metrics.add(alias=2, string_value="not a time")
    for alias, code in ((3, 64), (4, 0)):
        m = tahu.addMetric(p, None, alias, T.Double, 9.5, MS)
        m.properties.keys.append("Quality")
        quality = m.properties.values.add()
        quality.type = tahu.ParameterDataType.Int32
        quality.int_value = code
    a, b, c, d = edge.send("NDATA", p).signals
    assert (a.value, a.quality, a.status) == (None, Quality.BAD, "is_null")
    assert (b.value, b.quality) == (None, Quality.BAD) and "DateTime" in str(b.status)
    assert (c.value, c.quality, c.status) == (9.5, Quality.UNCERTAIN, 64)
    assert (d.value, d.quality, d.status) == (9.5, Quality.BAD, 0)
    assert [quality_of(q) for q in (192, 216, 64, 0, 128, 500, -1)] == [
        Quality.GOOD, Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.BAD, Quality.BAD,
        Quality.BAD]


def test_historical_values_are_dropped_unless_asked_for() -> None:
    addresses = [SparkplugAddress(group=GROUP, edge_node=NODE, metric="v")]
    for include, expected in ((False, []), (True, [3.0])):
        host = make_host(addresses, include_historical=include)
        edge = Edge(host)
        edge.nbirth(("v", 1, T.Double, 1.0))
        p = edge.payload()
        tahu.addHistoricalMetric(p, None, 1, T.Double, 3.0)
        assert [s.value for s in edge.send("NDATA", p).signals] == expected
        assert host.stats.historical_dropped == (0 if include else 1)


def test_dataset_as_a_list_of_rows() -> None:
    host = make_host([SparkplugAddress(group=GROUP, edge_node=NODE, device="oven", metric="Recipe")])
    edge = Edge(host)
    edge.nbirth()
    p = edge.payload()
    ds = tahu.initDatasetMetric(p, "Recipe", 30, ["step", "name", "temp", "hold", "delta"],
                                [DST.Int32, DST.String, DST.Double, DST.Boolean, DST.Int8])
    for step, name, temp, hold, delta in ((1, "heat", 180.5, False, -2), (2, "bake", 200.0, True, 3)):
        row = ds.rows.add()
        row.elements.add().int_value = step
        row.elements.add().string_value = name
        row.elements.add().double_value = temp
        row.elements.add().boolean_value = hold
        row.elements.add().int_value = delta + 256 if delta < 0 else delta
    out = edge.send("DBIRTH", p, "oven")
    assert values(out) == {tag("Recipe", "oven"): [
        {"step": 1, "name": "heat", "temp": 180.5, "hold": False, "delta": -2},
        {"step": 2, "name": "bake", "temp": 200.0, "hold": True, "delta": 3},
    ]}
    json.dumps(out.signals[0].value)  # JSON-friendly


def test_template_instance_as_a_dict_and_its_members_as_tags() -> None:
    addresses = [SparkplugAddress(group=GROUP, edge_node=NODE, device="line", metric=m)
                 for m in ("Motor1", "Motor1/Speed", "Motor1/Drive/Fault")]
    host = make_host(addresses)
    edge = Edge(host)
    p = edge.payload()
    p.seq = 0
    tahu.addMetric(p, "bdSeq", None, T.Int64, 7, MS)
    definition = tahu.initTemplateMetric(p, "_types_/Motor", None, None)  # NBIRTH: the type
    tahu.addMetric(definition, "Speed", None, T.Int32, 0, MS)
    assert edge.send("NBIRTH", p).signals == []
    p = edge.payload()
    motor = tahu.initTemplateMetric(p, "Motor1", 40, "_types_/Motor")
    tahu.addMetric(motor, "Speed", None, T.Int32, -1500, MS)
    tahu.addMetric(motor, "Running", None, T.Boolean, True, MS)
    drive = tahu.initTemplateMetric(motor, "Drive", None, "_types_/Drive")
    tahu.addMetric(drive, "Fault", None, T.Boolean, False, MS)
    out = edge.send("DBIRTH", p, "line")
    assert values(out) == {
        tag("Motor1", "line"): {"Speed": -1500, "Running": True, "Drive": {"Fault": False}},
        tag("Motor1/Speed", "line"): -1500,
        tag("Motor1/Drive/Fault", "line"): False,
    }
    # A DDATA with only the changed member, by the instance's alias, and without its datatype:
    # the member's type is the one its DBIRTH gave.
    p = edge.payload()
    motor = tahu.initTemplateMetric(p, None, 40, "_types_/Motor")
    member = tahu.addMetric(motor, "Speed", None, T.Int32, -1600, MS + 500)
    member.ClearField("datatype")
    out = edge.send("DDATA", p, "line")
    speed = next(s for s in out.signals if s.tag == tag("Motor1/Speed", "line"))
    assert (speed.value, speed.source_time) == (-1600, SOURCE + 0.5)


def test_compressed_payloads_are_inflated() -> None:
    """Tahu's compression: uuid SPBV1.0_COMPRESSED, an ``algorithm`` metric, the real payload
    in ``body`` (zlib framing for DEFLATE, gzip for GZIP)."""
    host = make_host()
    edge = Edge(host)
    edge.born()
    for algorithm, compress in (("DEFLATE", zlib.compress), ("GZIP", gzip.compress)):
        inner = edge.payload(((None, 1, T.Double, 30.5),))
        outer = tahu_pb.Payload(uuid="SPBV1.0_COMPRESSED", body=compress(inner.SerializeToString()))
        tahu.addMetric(outer, "algorithm", None, T.String, algorithm, MS)
        assert values(edge.send("NDATA", outer)) == {tag("Temperature"): 30.5}, algorithm
    bomb = tahu_pb.Payload(uuid="SPBV1.0_COMPRESSED", body=zlib.compress(bytes(17 * 2**20)))
    out = edge.send("NDATA", bomb)
    assert out.malformed and "16777216" in out.malformed
    cut = tahu_pb.Payload(uuid="SPBV1.0_COMPRESSED", body=zlib.compress(b"x" * 100)[:-5])
    assert edge.send("NDATA", cut).malformed


# -- malformed input ----------------------------------------------------------------------------


def test_malformed_payloads_and_topics_are_reported_not_raised() -> None:
    host = make_host()
    edge = Edge(host)
    edge.born()
    out = host.on_message(f"spBv1.0/{GROUP}/DDATA/{NODE}/press07", b"\x12\xff\xff garbage", NOW)
    assert out.signals == [] and out.malformed and "protobuf" in out.malformed
    for topic in ("spBv1.0", f"spBv1.0/{GROUP}/NDATA", f"spBv1.0/{GROUP}/XDATA/{NODE}",
                  f"spBv1.0/{GROUP}/NDATA/{NODE}/extra", f"other/{GROUP}/NDATA/{NODE}"):
        assert host.on_message(topic, b"", NOW).malformed, topic
    assert host.stats.malformed == 6
    # A bad message changes nothing: the next good one resolves.
    assert values(edge.ndata((None, 1, T.Double, 4.0))) == {tag("Temperature"): 4.0}


_TOPICS = [f"spBv1.0/{GROUP}/{kind}/{NODE}" for kind in ("NBIRTH", "NDATA", "NDEATH", "NCMD")] + [
    f"spBv1.0/{GROUP}/{kind}/{NODE}/press07" for kind in ("DBIRTH", "DDATA", "DDEATH")] + [
    "spBv1.0/STATE/gw1", f"spBv1.0/{GROUP}/NDATA/other"]
_VALUE_FIELDS = ["int_value", "long_value", "float_value", "double_value", "boolean_value",
                 "string_value", "bytes_value", None]


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    """A protobuf Payload with random metrics (names, aliases, types and values that need not
    agree), or random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    p = tahu_pb.Payload()
    if draw(st.booleans()):
        p.seq = draw(st.integers(0, 300))
    if draw(st.booleans()):
        p.timestamp = draw(st.integers(0, 2**64 - 1))
    for _ in range(draw(st.integers(0, 6))):
        m = p.metrics.add()
        name = draw(st.sampled_from(["Temperature", "Spindle/Speed", "State", "bdSeq", "", "x"]))
        if name:
            m.name = name
        if draw(st.booleans()):
            m.alias = draw(st.integers(0, 20))
        m.datatype = draw(st.integers(0, 40))
        m.timestamp = draw(st.integers(0, 2**64 - 1))
        m.is_null = draw(st.booleans())
        kind = draw(st.sampled_from(_VALUE_FIELDS))
        if kind in ("int_value", "long_value"):
            setattr(m, kind, draw(st.integers(0, 2**32 - 1 if kind == "int_value" else 2**64 - 1)))
        elif kind in ("float_value", "double_value"):
            setattr(m, kind, draw(st.floats(width=32)))
        elif kind == "boolean_value":
            m.boolean_value = draw(st.booleans())
        elif kind == "string_value":
            m.string_value = draw(st.text(max_size=10))
        elif kind == "bytes_value":
            m.bytes_value = draw(st.binary(max_size=20))
    return bytes(p.SerializeToString())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_TOPICS) | st.text(max_size=40), _payloads()),
                max_size=12))
def test_random_topics_and_payloads_never_raise(messages: list[tuple[str, bytes]]) -> None:
    host = make_host()
    edge = Edge(host)
    edge.born()
    host.state_message(True)
    for topic, payload in messages:
        out = host.on_message(topic, payload, NOW)
        for signal in out.signals:
            assert signal.quality is not Quality.GOOD or signal.value is not None
            json.dumps(signal.value)
        for command_topic, command in out.commands:
            assert command_topic.startswith("spBv1.0/")
            assert isinstance(command, bytes)
    host.on_connection_lost(NOW)


# -- STATE --------------------------------------------------------------------------------------


def test_state_messages_share_a_timestamp_per_session() -> None:
    host = make_host()
    will_topic, will = host.state_message(False)
    topic, online = host.state_message(True)
    assert topic == will_topic == "spBv1.0/STATE/gw1"
    assert publish_options(topic) == (1, True)
    will_doc, online_doc = json.loads(will), json.loads(online)
    assert will_doc == {"online": False, "timestamp": will_doc["timestamp"]}
    assert online_doc == {"online": True, "timestamp": will_doc["timestamp"]}
    assert isinstance(will_doc["timestamp"], int) and will_doc["timestamp"] > 1_600_000_000_000
    # Someone publishes our death while we are online: we say online again.
    out = host.on_message("spBv1.0/STATE/gw1", will, NOW)
    assert out.commands == [(topic, online)]
    assert host.on_message("spBv1.0/STATE/gw1", b"{not json", NOW).malformed
    # A new MQTT session gets a new, later timestamp.
    host.on_connection_lost(NOW)
    _, next_will = host.state_message(False)
    assert json.loads(next_will)["timestamp"] > will_doc["timestamp"]
    # Offline (a clean stop): our own offline message is not answered.
    assert host.on_message("spBv1.0/STATE/gw1", next_will, NOW).commands == []
    with pytest.raises(ValueError, match="host_id"):
        SparkplugHost(ADDRESSES, connection="c").state_message(True)


# -- rate ---------------------------------------------------------------------------------------


def test_ddata_rate_is_printed() -> None:
    """Decode and resolve a DDATA of 10 aliased metrics: printed (see -s), not asserted."""
    addresses = [SparkplugAddress(group=GROUP, edge_node=NODE, device="d", metric=f"m{i}")
                 for i in range(10)]
    host = make_host(addresses)
    edge = Edge(host)
    edge.nbirth()
    edge.dbirth("d", *((f"m{i}", i, T.Double if i % 2 else T.Int32, i) for i in range(10)))
    p = edge.payload(tuple((None, i, T.Double if i % 2 else T.Int32, i * 3) for i in range(10)))
    topic, raw = f"spBv1.0/{GROUP}/DDATA/{NODE}/d", p.SerializeToString()
    node_state = host._nodes[(GROUP, NODE)]
    before = p.seq - 1

    def one() -> Outcome:
        node_state.seq = before  # the same message again, without a gap
        return host.on_message(topic, raw, NOW)

    assert len(one().signals) == 10
    number = 3000
    seconds = min(timeit.repeat(one, number=number, repeat=3))
    print(f"\nSparkplug DDATA of 10 metrics: {number / seconds:,.0f} messages/s "
          f"({seconds / number * 1e6:.1f} us each)")
