"""MqttSource as a Sparkplug B host application, against a real mosquitto: births and aliases,
a ``seq`` gap answered by a rebirth request, DDEATH and NDEATH (the broker's will too), the
host's STATE, the acknowledgement contract, a lost broker, and a mapping file with ``sparkplug``
blocks feeding the Mapper.

The edge node is the test, publishing with a plain paho client payloads made by an independent
Sparkplug B implementation (Eclipse Tahu's Python core, as ``sparkplug-b-packets`` packages it);
the commands the gateway publishes are read back with that implementation's schema.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sparkplub_b_packets.core.sparkplug_b as tahu
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu_pb

from gateway.errors import SourceUnavailable
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import Quality, Signal
from gateway.sources.mqtt import MqttAddress, MqttConnectionConfig, MqttSource
from gateway.sources.sparkplug import SparkplugAddress
from tests.test_mqtt_source import (
    VERSIONS,
    Collector,
    Mosquitto,
    Publisher,
    running,
    stop,
    wait_ready,
)

pytestmark = pytest.mark.timeout(30)

NAME = "plant_mqtt"
NODE = "line2-plc"
MS = 1_764_000_000_250
"""The edge node's clock (Unix ms): the metric timestamps."""
T = tahu.MetricDataType


def new_group() -> str:
    """A group of the test's own: the session's broker is shared."""
    return f"g{uuid.uuid4().hex[:10]}"


def addresses(group: str) -> list[SparkplugAddress]:
    return [
        SparkplugAddress(group=group, edge_node=NODE, metric="Temperature"),
        SparkplugAddress(group=group, edge_node=NODE, device="press07", metric="Spindle/Speed"),
        SparkplugAddress(group=group, edge_node=NODE, device="press07", metric="State"),
        SparkplugAddress(group=group, edge_node=NODE, device="press08", metric="Count"),
    ]


def tag(group: str, metric: str, device: str | None = None) -> str:
    return SparkplugAddress(group=group, edge_node=NODE, device=device, metric=metric).tag


def source(port: int, group_addresses: list[Any], *, client_id: str | None = None,
           metrics: Metrics | None = None, **overrides: Any) -> MqttSource:
    cfg = MqttConnectionConfig(protocol="mqtt", host="127.0.0.1", port=port, **overrides)
    src = MqttSource(NAME, cfg, group_addresses, client_id or f"test-{uuid.uuid4().hex[:8]}",
                     metrics or Metrics())
    src.stop_ack_timeout_s = 0.5
    return src


class Edge:
    """An edge node driven by the test: Tahu's encoder, ``seq`` as a real node keeps it."""

    def __init__(self, publish: Publisher, group: str, bd_seq: int = 3) -> None:
        self.publish, self.group, self.bd_seq, self.seq = publish, group, bd_seq, 0

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"spBv1.0/{self.group}/{kind}/{NODE}" + (f"/{device}" if device else "")

    def payload(self, *metrics: tuple[Any, ...], seq: bool = True) -> Any:
        p = tahu_pb.Payload()
        p.timestamp = MS
        if seq:
            p.seq = self.seq
            self.seq = (self.seq + 1) % 256
        for name, alias, datatype, value, *stamp in metrics:
            tahu.addMetric(p, name, alias, datatype, value, stamp[0] if stamp else MS)
        return p

    def send(self, kind: str, p: Any, device: str | None = None, qos: int = 1) -> None:
        self.publish(self.topic(kind, device), p.SerializeToString(), qos=qos)

    def nbirth(self) -> None:
        self.seq = 0
        self.send("NBIRTH", self.payload(("bdSeq", None, T.Int64, self.bd_seq),
                                         ("Node Control/Rebirth", None, T.Boolean, False),
                                         ("Temperature", 1, T.Double, 21.5)))

    def dbirth_press07(self) -> None:
        self.send("DBIRTH", self.payload(("Spindle/Speed", 10, T.Int32, 0),
                                         ("State", 11, T.String, "Idle")), "press07")

    def dbirth_press08(self) -> None:
        self.send("DBIRTH", self.payload(("Count", 20, T.UInt32, 100)), "press08")

    def born(self) -> None:
        self.nbirth()
        self.dbirth_press07()
        self.dbirth_press08()

    def ndeath_payload(self) -> bytes:
        data: bytes = self.payload(("bdSeq", None, T.Int64, self.bd_seq),
                                   seq=False).SerializeToString()
        return data


class Listener:
    """A paho client recording what arrives on some filters (the gateway's commands)."""

    def __init__(self, port: int, *filters: str) -> None:
        self.messages: list[MQTTMessage] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=f"lst-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in filters])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self._keep(msg)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(5), "no SUBACK"

    def _keep(self, msg: MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    async def wait(self, count: int, timeout_s: float = 10.0) -> list[MQTTMessage]:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} messages, expected {count}"
            await asyncio.sleep(0.01)
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publish(mqtt_port: int) -> Any:
    pub = Publisher(mqtt_port)
    yield pub
    pub.close()


def by_tag(signals: list[Signal]) -> dict[str, Signal]:
    return {s.tag: s for s in signals}


async def wait_signals(emit: Collector, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(emit.signals) < count:
        assert time.monotonic() < deadline, f"{len(emit.signals)} signals, expected {count}"
        await asyncio.sleep(0.01)


def rebirth_requested(msg: MQTTMessage) -> bool:
    """Read with the independent implementation: an NCMD whose metric asks for a rebirth."""
    decoded = tahu_pb.Payload.FromString(msg.payload)
    return any(m.name == "Node Control/Rebirth" and m.datatype == T.Boolean and m.boolean_value
               for m in decoded.metrics)


# -- births, aliases, time ---------------------------------------------------------------------


@VERSIONS
async def test_births_then_data_by_alias_become_signals(mqtt_port: int, publish: Publisher,
                                                        version: str) -> None:
    group = new_group()
    metrics = Metrics()
    src = source(mqtt_port, addresses(group), metrics=metrics, protocol_version=version)
    assert src.subscriptions == ((f"spBv1.0/{group}/#", 1),)
    emit = Collector()
    edge = Edge(publish, group)
    async with running(src, emit):
        edge.born()
        # DDATA by alias only, one metric with its own timestamp, one with the payload's.
        p = edge.payload((None, 10, T.Int32, 1210, MS + 1000), (None, 11, T.String, "Running"))
        p.metrics[1].ClearField("timestamp")
        p.timestamp = MS + 2000
        edge.send("DDATA", p, "press07")
        await emit.wait(4)
    births = by_tag([s for d in emit.deliveries[:3] for s in d.signals])
    assert {t: s.value for t, s in births.items()} == {
        tag(group, "Temperature"): 21.5, tag(group, "Spindle/Speed", "press07"): 0,
        tag(group, "State", "press07"): "Idle", tag(group, "Count", "press08"): 100}
    assert all(s.source_time == MS / 1000 and s.quality is Quality.GOOD
               and s.connection == NAME for s in births.values())
    data = emit.deliveries[3].signals
    assert [(s.tag, s.value, s.source_time) for s in data] == [
        (tag(group, "Spindle/Speed", "press07"), 1210, (MS + 1000) / 1000),
        (tag(group, "State", "press07"), "Running", (MS + 2000) / 1000)]
    # Every PUBLISH is one Delivery, acknowledged after the pipeline (QoS 1 here).
    assert len(emit.deliveries) == 4 and all(d.ack is not None for d in emit.deliveries)
    assert metrics.value("mqtt_messages_received_total", connection=NAME) == 4
    assert metrics.value("signals_received_total", connection=NAME) == 6
    assert metrics.total("sparkplug_sequence_gaps_total") == 0


async def test_plain_and_sparkplug_addresses_share_a_connection(
        mqtt_port: int, publish: Publisher, topic_prefix: str) -> None:
    group = new_group()
    plain = MqttAddress(topic=f"{topic_prefix}/cell01/status", value_path="mode")
    src = source(mqtt_port, [plain, *addresses(group)])
    assert src.subscriptions == ((plain.topic, 1), (f"spBv1.0/{group}/#", 1))
    emit = Collector()
    edge = Edge(publish, group)
    async with running(src, emit):
        publish(plain.topic, {"mode": 2})
        edge.nbirth()
        await emit.wait(2)
    assert [[(s.tag, s.value) for s in d.signals] for d in emit.deliveries] == [
        [(plain.tag, 2)], [(tag(group, "Temperature"), 21.5)]]


# -- rebirth -----------------------------------------------------------------------------------


async def test_a_seq_gap_makes_the_host_publish_a_rebirth_request(
        mqtt_port: int, publish: Publisher) -> None:
    group = new_group()
    metrics = Metrics()
    src = source(mqtt_port, addresses(group), metrics=metrics)
    emit = Collector()
    edge = Edge(publish, group)
    commands = Listener(mqtt_port, f"spBv1.0/{group}/NCMD/#")
    try:
        async with running(src, emit):
            edge.born()
            edge.seq += 2  # two messages lost
            edge.send("NDATA", edge.payload((None, 1, T.Double, 22.0)))
            [ncmd] = await commands.wait(1)
            await emit.wait(4)
            # The values of the message after the gap are still used.
            assert by_tag(emit.deliveries[3].signals)[tag(group, "Temperature")].value == 22.0
            # The node answers with its births: read again, no second request.
            edge.born()
            edge.send("NDATA", edge.payload((None, 1, T.Double, 23.0)))
            await emit.wait(8)
            await asyncio.sleep(0.2)
            assert len(commands.messages) == 1
    finally:
        commands.close()
    assert ncmd.topic == f"spBv1.0/{group}/NCMD/{NODE}"
    assert (ncmd.qos, ncmd.retain) == (0, False)
    assert rebirth_requested(ncmd)
    assert emit.signals[-1].value == 23.0
    assert metrics.value("sparkplug_sequence_gaps_total", connection=NAME) == 1
    assert metrics.value("sparkplug_rebirths_requested_total", connection=NAME) == 1


async def test_data_of_a_node_born_before_the_gateway_asks_for_a_rebirth(
        mqtt_port: int, publish: Publisher) -> None:
    """An unknown alias (here: everything, the NBIRTH came before the gateway connected) is
    dropped, the message still acknowledged, and a rebirth asked for."""
    group = new_group()
    metrics = Metrics()
    src = source(mqtt_port, addresses(group), metrics=metrics)
    emit = Collector()
    edge = Edge(publish, group)
    commands = Listener(mqtt_port, f"spBv1.0/{group}/NCMD/#")
    try:
        edge.born()  # nobody listens yet
        async with running(src, emit):
            edge.send("DDATA", edge.payload((None, 10, T.Int32, 5)), "press07")
            [ncmd] = await commands.wait(1)
            await emit.wait(1)
    finally:
        commands.close()
    assert rebirth_requested(ncmd)
    # The DDATA (QoS 1: acknowledged), and the NCMD (QoS 0) coming back on the subscription:
    # deliveries without signals.
    assert emit.signals == [] and emit.deliveries[0].ack is not None
    assert metrics.value("sparkplug_dropped_values_total", connection=NAME) == 1


async def test_a_read_only_host_publishes_no_command(mqtt_port: int, publish: Publisher) -> None:
    group = new_group()
    src = source(mqtt_port, addresses(group), sparkplug_rebirth=False)
    emit = Collector()
    edge = Edge(publish, group)
    commands = Listener(mqtt_port, f"spBv1.0/{group}/NCMD/#")
    try:
        async with running(src, emit):
            edge.send("NDATA", edge.payload((None, 1, T.Double, 22.0)))
            await emit.wait(1)
            await asyncio.sleep(0.3)
    finally:
        commands.close()
    assert commands.messages == []


# -- deaths ------------------------------------------------------------------------------------


async def test_ddeath_turns_that_device_bad_and_ndeath_all(mqtt_port: int,
                                                           publish: Publisher) -> None:
    group = new_group()
    src = source(mqtt_port, addresses(group))
    emit = Collector()
    edge = Edge(publish, group)
    async with running(src, emit):
        edge.born()
        edge.send("DDEATH", edge.payload(), "press07")
        await emit.wait(4)
        dead = emit.deliveries[3].signals
        assert {s.tag for s in dead} == {tag(group, "Spindle/Speed", "press07"),
                                         tag(group, "State", "press07")}
        assert all(s.quality is Quality.BAD and s.value is None and s.status == "DDEATH"
                   for s in dead)
        edge.send("DDATA", edge.payload((None, 20, T.UInt32, 101)), "press08")  # lives on
        await emit.wait(5)
        assert [(s.value, s.quality) for s in emit.deliveries[4].signals] == [
            (101, Quality.GOOD)]
        publish(edge.topic("NDEATH"), edge.ndeath_payload())
        await emit.wait(6)
    dead = emit.deliveries[5].signals
    # The born scopes: the node itself and press08 (press07 is dead already).
    assert {s.tag for s in dead} == {tag(group, "Temperature"), tag(group, "Count", "press08")}
    assert all(s.quality is Quality.BAD and s.status == "NDEATH" for s in dead)


async def test_the_brokers_last_will_is_an_ndeath(mqtt_port: int, publish: Publisher) -> None:
    """A real edge node's connection breaks: mosquitto publishes its will, the NDEATH with the
    bdSeq of its NBIRTH, and every metric of the node turns bad."""
    group = new_group()
    src = source(mqtt_port, addresses(group))
    emit = Collector()
    edge = Edge(publish, group)
    node = Client(CallbackAPIVersion.VERSION2, client_id=f"node-{uuid.uuid4().hex[:8]}")
    node.will_set(edge.topic("NDEATH"), edge.ndeath_payload(), qos=1)
    async with running(src, emit):
        node.connect("127.0.0.1", mqtt_port)
        deadline = time.monotonic() + 5
        while not node.is_connected():
            node.loop(0.05)
            assert time.monotonic() < deadline
        edge.born()
        await emit.wait(3)
        sock = node.socket()
        assert sock is not None
        sock.close()  # no DISCONNECT: the broker publishes the will
        await emit.wait(4)
    dead = emit.deliveries[3].signals
    assert {s.tag for s in dead} == {a.tag for a in addresses(group)}
    assert all(s.quality is Quality.BAD and s.status == "NDEATH" for s in dead)


# -- STATE -------------------------------------------------------------------------------------


async def test_state_online_after_connect_and_offline_after_a_clean_stop(
        mqtt_port: int) -> None:
    group, host_id = new_group(), f"h{uuid.uuid4().hex[:8]}"
    state_topic = f"spBv1.0/STATE/{host_id}"
    src = source(mqtt_port, addresses(group), sparkplug_host_id=host_id)
    assert src.subscriptions == ((f"spBv1.0/{group}/#", 1), (state_topic, 1))
    emit = Collector()
    async with running(src, emit):
        watcher = Listener(mqtt_port, state_topic)
        try:
            [online, *_] = await watcher.wait(1)
        finally:
            watcher.close()
    late = Listener(mqtt_port, state_topic)  # a new subscriber gets the retained message
    try:
        [offline] = await late.wait(1)
    finally:
        late.close()
    up, down = json.loads(online.payload), json.loads(offline.payload)
    assert online.retain and offline.retain and online.qos == 1
    assert up["online"] is True and down["online"] is False
    assert up["timestamp"] == down["timestamp"] > 0  # one timestamp per session


async def test_a_lost_broker_turns_the_born_metrics_bad_and_the_will_says_offline(
        tmp_path: Path) -> None:
    group, host_id = new_group(), "gw-lost"
    with Mosquitto(tmp_path) as broker:
        pub = Publisher(broker.port)
        src = source(broker.port, addresses(group), sparkplug_host_id=host_id)
        emit = Collector()
        task = asyncio.create_task(src.run(emit))
        await wait_ready(src, task)
        edge = Edge(pub, group)
        edge.nbirth()
        edge.dbirth_press07()
        await emit.wait(2)
        pub.close()
        broker.kill()
        with pytest.raises(SourceUnavailable):
            await asyncio.wait_for(task, 10)
    lost = emit.deliveries[-1]
    assert lost.ack is None
    assert {s.tag for s in lost.signals} == {tag(group, "Temperature"),
                                             tag(group, "Spindle/Speed", "press07"),
                                             tag(group, "State", "press07")}
    assert all(s.quality is Quality.BAD and s.status == "connection lost"
               for s in lost.signals)


# -- acknowledgement ---------------------------------------------------------------------------


async def test_an_unacknowledged_sparkplug_message_is_redelivered(
        mqtt_port: int, publish: Publisher) -> None:
    """The NBIRTH is taken but never acknowledged: the next run of the same client id gets it
    again, and reads it as the birth it is."""
    group = new_group()
    client_id = f"ack-{uuid.uuid4().hex[:8]}"
    first = Collector(ack=False)
    src = source(mqtt_port, addresses(group), client_id=client_id)
    task = asyncio.create_task(src.run(first))
    await wait_ready(src, task)
    Edge(publish, group).nbirth()
    await first.wait(1)
    await stop(task)
    second = Collector()
    async with running(source(mqtt_port, addresses(group), client_id=client_id), second):
        await second.wait(1)
    assert [(s.tag, s.value) for s in second.signals] == [(tag(group, "Temperature"), 21.5)]


# -- a mapping file ----------------------------------------------------------------------------


MAPPING = """
version: 1
asset: {{subject: acme/plant1/line2/press07, attributes: {{machine_type: press, line: line2}}}}
signals:
  state:
    connection: plant_mqtt
    sparkplug: {{group: {group}, edge_node: {node}, device: press07, metric: State}}
    type: string
    enum: [Idle, Running, Fault]
  speed:
    connection: plant_mqtt
    sparkplug: {{group: {group}, edge_node: {node}, device: press07, metric: Spindle/Speed}}
    type: float
events:
  machine_state_changed:
    type: production.MachineStateChanged.v1
    trigger: {{kind: transition, signal: state, on_first_value: emit}}
    data:
      state: {{signal: state}}
      previous_state: {{previous: state}}
      previous_state_duration_s: {{trigger: state_duration_s}}
      machine_type: {{attribute: machine_type}}
      line: {{attribute: line}}
  state_quality:
    type: maintenance.SignalQualityChanged.v1
    trigger: {{kind: quality, signal: state}}
    data:
      signal: {{const: state}}
      quality: {{trigger: quality}}
      previous_quality: {{trigger: previous_quality}}
      reason: {{trigger: reason}}
      previous_quality_duration_s: {{trigger: state_duration_s}}
"""


def test_a_sparkplug_block_on_a_connection_of_another_protocol_is_refused(
        tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    (tmp_path / "m.yaml").write_text(MAPPING.format(group="plant1", node=NODE))
    with pytest.raises(ConfigError) as caught:
        load_mappings(tmp_path, {"plant_mqtt": "opcua"})
    assert any("is a opcua connection but this signal has a 'sparkplug' address block; use a "
               "'opcua' block" in str(f) for f in caught.value.findings)


async def test_a_mapping_with_sparkplug_signals_fires_events_from_the_source(
        tmp_path: Path, mqtt_port: int, publish: Publisher) -> None:
    group = new_group()
    (tmp_path / "press07.yaml").write_text(MAPPING.format(group=group, node=NODE))
    files = load_mappings(tmp_path, {"plant_mqtt": "mqtt"})
    mapper = Mapper(files, "gw1")
    bindings = mapper.bindings()
    assert {type(a) for a in bindings[NAME]} == {SparkplugAddress}
    src = source(mqtt_port, bindings[NAME])
    emit = Collector()
    edge = Edge(publish, group)
    async with running(src, emit):
        edge.nbirth()
        edge.dbirth_press07()
        edge.send("DDATA", edge.payload((None, 11, T.String, "Running", MS + 5000)), "press07")
        edge.send("DDEATH", edge.payload(), "press07")
        await emit.wait(4)
    events = [e for s in emit.signals for e in mapper.map(s)]
    assert [(e.type, e.data.get("state") or e.data.get("quality")) for e in events] == [
        ("production.MachineStateChanged.v1", "Idle"),
        ("production.MachineStateChanged.v1", "Running"),
        ("maintenance.SignalQualityChanged.v1", "bad"),
    ]
    assert events[1].data["previous_state"] == "Idle"
    assert events[1].time == (MS + 5000) / 1000
    assert all(e.subject == "acme/plant1/line2/press07" for e in events)
    assert events[2].data["reason"] == "bad quality, status DDEATH"
