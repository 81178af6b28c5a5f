"""MQTT payload decoders and subscription settings: quality indicators, binary layouts, topic
captures (also through a mapping file and the engine), per-address QoS, shared subscriptions,
MQTT 5 session expiry and refused connections. Pure decoder tests first, then against the
tests' mosquitto."""

from __future__ import annotations

import asyncio
import math
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from gateway.errors import SourceUnavailable
from gateway.mapping.engine import Mapper
from gateway.mapping.loader import load_mappings
from gateway.metrics import Metrics
from gateway.model import Quality
from gateway.sources.mqtt import (
    MqttAddress,
    MqttBinary,
    MqttConnectionConfig,
    decode_binary,
    payload_quality,
    split_captures,
    subscription_id,
)
from tests.test_mqtt_source import (
    NAME,
    Collector,
    Mosquitto,
    Publisher,
    running,
    source,
)

pytestmark = pytest.mark.timeout(30)


# -- quality indicators ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "codes", "expected"), [
    ("good", "opcua", Quality.GOOD),
    (" GOOD ", "opcua", Quality.GOOD),
    ("Uncertain", "opcua", Quality.UNCERTAIN),
    ("bad", "opcua", Quality.BAD),
    (True, "opcua", Quality.GOOD),
    (False, "opcua", Quality.BAD),
    (0, "opcua", Quality.GOOD),
    (0.0, "opcua", Quality.GOOD),
    (0x00A80000, "opcua", Quality.GOOD),  # GoodNoData: severity bits 00
    (0x40000000, "opcua", Quality.UNCERTAIN),
    (0x408F0000, "opcua", Quality.UNCERTAIN),
    (0x80000000, "opcua", Quality.BAD),
    (0x80340000, "opcua", Quality.BAD),  # BadNodeIdUnknown
    (192, "opcda", Quality.GOOD),
    (216, "opcda", Quality.GOOD),  # good, local override
    (64, "opcda", Quality.UNCERTAIN),
    (0, "opcda", Quality.BAD),
    (24, "opcda", Quality.BAD),  # bad, comm failure
    ("ok", "opcua", None),
    ("", "opcua", None),
    (-1, "opcua", None),
    (2**32, "opcua", None),
    (0x10000, "opcda", None),
    (1.5, "opcua", None),
    (None, "opcua", None),
    ({"q": 1}, "opcua", None),
])
def test_payload_quality(raw: Any, codes: Any, expected: Quality | None) -> None:
    assert payload_quality(raw, codes) == expected


# -- binary layouts --------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "payload", "expected"), [
    ({"type": "int16"}, b"\xff\xfe", -2),
    ({"type": "uint16"}, b"\xff\xfe", 65534),
    ({"type": "uint16", "byte_order": "little"}, b"\x01\x02", 0x0201),
    ({"type": "int8", "offset": 1}, b"\x00\x80", -128),
    ({"type": "uint8", "offset": 1}, b"\x00\x80", 128),
    ({"type": "int32", "offset": 2}, b"\x00\x00" + struct.pack(">i", -70000), -70000),
    ({"type": "uint32", "byte_order": "little"}, struct.pack("<I", 4_000_000_000), 4_000_000_000),
    ({"type": "int64"}, struct.pack(">q", -(2**40)), -(2**40)),
    ({"type": "uint64", "byte_order": "little"}, struct.pack("<Q", 2**63), 2**63),
    ({"type": "float32"}, struct.pack(">f", 61.5), 61.5),
    ({"type": "float32", "byte_order": "little", "offset": 4},
     b"\0" * 4 + struct.pack("<f", -0.25), -0.25),
    ({"type": "float64"}, struct.pack(">d", 1e300), 1e300),
    ({"type": "bool"}, b"\x00", False),
    ({"type": "bool"}, b"\x07", True),
    ({"type": "string", "length": 8}, b"PRESS07\x00", "PRESS07"),
    ({"type": "string", "length": 4, "offset": 2}, b"\x00\x01Idle\xff", "Idle"),
    ({"type": "string", "length": 6}, "Über\0".encode(), "Über"),
])
def test_binary_layouts_decode(layout: dict[str, Any], payload: bytes, expected: Any) -> None:
    assert decode_binary(MqttBinary(**layout), payload) == (expected, None)


def test_binary_nan_is_passed_on_for_the_signal_conversion_to_judge() -> None:
    value, error = decode_binary(MqttBinary(type="float32"), struct.pack(">f", math.nan))
    assert error is None and math.isnan(value)


@pytest.mark.parametrize(("layout", "payload", "reason"), [
    ({"type": "int32"}, b"\x00\x01\x02", "payload has 3 bytes, the int32 at offset 0 needs 4"),
    ({"type": "float64", "offset": 8}, b"\0" * 15, "payload has 15 bytes, the float64 at offset 8 needs 16"),
    ({"type": "uint8"}, b"", "payload has 0 bytes, the uint8 at offset 0 needs 1"),
    ({"type": "string", "length": 4}, b"abc", "payload has 3 bytes, the string at offset 0 needs 4"),
    ({"type": "string", "length": 2}, b"\xff\xfe", "the string at offset 0 is not UTF-8 text"),
])
def test_binary_payload_that_does_not_fit_is_an_error(layout: dict[str, Any], payload: bytes,
                                                       reason: str) -> None:
    assert decode_binary(MqttBinary(**layout), payload) == (None, reason)


@pytest.mark.parametrize(("layout", "match"), [
    ({"type": "string"}, "a string needs length"),
    ({"type": "int16", "length": 2}, "length applies to strings only"),
    ({"type": "int24"}, "Input should be"),
    ({"type": "int16", "offset": -1}, "greater than or equal to 0"),
    ({"type": "int16", "byte_order": "middle"}, "Input should be 'big' or 'little'"),
])
def test_invalid_binary_layouts_are_config_errors(layout: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        MqttBinary(**layout)


# -- addresses -------------------------------------------------------------------------------


def test_topic_captures_are_plus_levels_with_a_name() -> None:
    assert split_captures("acme/+line/+machine/telemetry") == (
        "acme/+/+/telemetry", {"line": 1, "machine": 2})
    assert split_captures("acme/+/state/#") == ("acme/+/state/#", {})


@pytest.mark.parametrize(("address", "match"), [
    ({"topic": "a/+line/+line/t"}, "capture '\\+line' appears twice"),
    ({"topic": "a/+Line/t"}, "a capture is '\\+' and a lower-case name"),
    ({"topic": "a/x+y/t"}, "'\\+' must be a whole level"),
    ({"topic": "a/+m/t", "capture": "line"}, "capture 'line' is not a level of the topic .*"
                                             "captures of the topic: \\+m"),
    ({"topic": "a/+/t", "capture": "m"}, "captures of the topic: none"),
    ({"topic": "a/+m/t", "capture": "m", "value_path": "v"}, "remove value_path"),
    ({"topic": "a/b", "binary": {"type": "int16"}, "value_path": "v"},
     "JSON paths do not apply \\(remove value_path\\)"),
    ({"topic": "a/b", "binary": {"type": "int16"}, "timestamp_path": "ts"},
     "remove timestamp_path"),
    ({"topic": "a/b", "quality_path": "q"}, "quality_path needs value_path"),
    ({"topic": "a/b", "value_path": "v", "quality_codes": "opcda"},
     "quality_codes applies to a quality_path"),
    ({"topic": "a/b", "qos": 3}, "Input should be 0, 1 or 2"),
    ({"topic": "$share/g/a/b"}, "set shared_group on the connection"),
])
def test_invalid_addresses_are_config_errors(address: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        MqttAddress(**address)


def test_tags_name_what_an_address_reads() -> None:
    topic = "acme/+line/+machine/raw"
    assert MqttAddress(topic=topic).tag == topic
    assert MqttAddress(topic=topic, value_path="a.b").tag == f"{topic}#a.b"
    assert MqttAddress(topic=topic, capture="machine").tag == f"{topic}#+machine"
    assert MqttAddress(topic=topic, binary={"offset": 4, "type": "float32"}).tag == (
        f"{topic}#@4:float32")
    assert MqttAddress(topic=topic, binary={"offset": 4, "type": "float32",
                                            "byte_order": "little"}).tag == f"{topic}#@4:float32:le"
    assert MqttAddress(topic=topic, binary={"type": "string", "length": 8}).tag == (
        f"{topic}#@0:string:8")
    assert MqttAddress(topic=topic).subscription == "acme/+/+/raw"


def test_existing_addresses_keep_their_json_form() -> None:
    """The JSON form feeds the fingerprints of persisted mapping state: a file written for an
    older gateway must keep its state across the upgrade."""
    address = MqttAddress(topic="a/b", value_path="v", timestamp_path="ts")
    assert address.model_dump_json() == '{"topic":"a/b","value_path":"v","timestamp_path":"ts"}'
    assert "qos" in address.model_dump()  # the Python form is complete
    assert '"qos":1' in MqttAddress(topic="a/b", qos=1).model_dump_json()


# -- connection settings ---------------------------------------------------------------------


def test_connection_settings() -> None:
    cfg = MqttConnectionConfig(protocol="mqtt", host="h", protocol_version=5)  # type: ignore[arg-type]
    assert cfg.protocol_version == "5"
    assert cfg.session_expiry_s == 7 * 24 * 3600
    assert cfg.tls_settings is None
    assert MqttConnectionConfig(protocol="mqtt", host="h", protocol_version="3.1.1",
                                tls=True).tls_settings is not None
    for bad, match in (({"protocol_version": "4"}, "Input should be '5' or '3.1.1'"),
                       ({"session_expiry_s": 0}, "greater than or equal to 1"),
                       ({"shared_group": "a/b"}, "should match pattern")):
        with pytest.raises(ValidationError, match=match):
            MqttConnectionConfig(protocol="mqtt", host="h", **bad)


def test_subscriptions_take_the_highest_qos_and_the_shared_group() -> None:
    addresses = [MqttAddress(topic="a/+m/t", capture="m", qos=0),
                 MqttAddress(topic="a/+/t", value_path="v"),
                 MqttAddress(topic="b/#", qos=2),
                 MqttAddress(topic="c", qos=0)]
    src = source(1883, addresses)
    assert src.subscriptions == (("a/+/t", 1), ("b/#", 2), ("c", 0))
    shared = source(1883, addresses, shared_group="hall1", qos=0)
    assert shared.subscriptions == (("$share/hall1/a/+/t", 0), ("$share/hall1/b/#", 2),
                                    ("$share/hall1/c", 0))
    ids = {subscription_id(f) for f, _ in shared.subscriptions}
    assert len(ids) == 3 and all(1 <= i <= 268_435_455 for i in ids)
    assert subscription_id("a/+/t") == subscription_id("a/+/t")  # stable across runs


# -- against mosquitto -----------------------------------------------------------------------


@pytest.fixture
def publish(mqtt_port: int) -> Any:
    pub = Publisher(mqtt_port)
    yield pub
    pub.close()


async def test_topic_captures_become_signals_before_the_payload_values(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    topic = f"{topic_prefix}/+line/+machine/telemetry"
    addresses = [MqttAddress(topic=topic, value_path="temperature_c", timestamp_path="ts"),
                 MqttAddress(topic=topic, capture="machine", timestamp_path="ts"),
                 MqttAddress(topic=topic, capture="line")]
    src = source(mqtt_port, addresses)
    assert src.subscriptions == ((f"{topic_prefix}/+/+/telemetry", 1),)
    emit = Collector()
    async with running(src, emit):
        publish(f"{topic_prefix}/line2/press07/telemetry", {"ts": 1764367741, "temperature_c": 61.5})
        publish(f"{topic_prefix}/line3/press08/telemetry", {"temperature_c": 58.0})
        await emit.wait(2)
    assert [[(s.tag.rsplit("#", 1)[1], s.value, s.source_time) for s in d.signals]
            for d in emit.deliveries] == [
        [("+machine", "press07", 1764367741.0), ("+line", "line2", None),
         ("temperature_c", 61.5, 1764367741.0)],
        [("+machine", "press08", None), ("+line", "line3", None), ("temperature_c", 58.0, None)],
    ]


MAPPING = """\
version: 1
asset:
  subject: acme/plant1/presses
signals:
  line:
    connection: plant_mqtt
    mqtt: {{topic: "{prefix}/+line/+machine/telemetry", capture: line}}
    type: string
  machine:
    connection: plant_mqtt
    mqtt: {{topic: "{prefix}/+line/+machine/telemetry", capture: machine}}
    type: string
  temperature:
    connection: plant_mqtt
    mqtt: {{topic: "{prefix}/+line/+machine/telemetry", value_path: temperature_c,
            quality_path: q}}
    type: float
events:
  temperature_reported:
    type: process.TemperatureReported.v1
    trigger: {{kind: on_change, signal: temperature}}
    when: "machine != 'press99'"
    data:
      line: {{signal: line}}
      machine: {{signal: machine}}
      temperature_c: {{signal: temperature}}
tests:
  - name: the machine of the reading is in the event
    given:
      - {{signal: machine, value: press07}}
      - {{signal: line, value: line2}}
      - {{signal: temperature, value: 61.5}}
    expect:
      - type: process.TemperatureReported.v1
        data: {{line: line2, machine: press07, temperature_c: 61.5}}
"""


async def test_captures_feed_event_data_through_a_mapping_file(
        tmp_path: Path, mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    """One file, many machines of a kind: the machine and line come from the topic."""
    (tmp_path / "presses.yaml").write_text(MAPPING.format(prefix=topic_prefix))
    files = load_mappings(tmp_path, {"plant_mqtt": "mqtt"})
    mapper = Mapper(files, "test-gw")
    [(_connection, addresses)] = mapper.bindings().items()
    src = source(mqtt_port, addresses)
    emit = Collector()
    async with running(src, emit):
        publish(f"{topic_prefix}/line2/press07/telemetry", {"temperature_c": 61.5, "q": "good"})
        publish(f"{topic_prefix}/line3/press08/telemetry", {"temperature_c": 58.0, "q": 0})
        publish(f"{topic_prefix}/line3/press99/telemetry", {"temperature_c": 50.0, "q": 0})
        publish(f"{topic_prefix}/line3/press08/telemetry", {"temperature_c": 40.0, "q": "BAD"})
        await emit.wait(4)
    events = [e for s in emit.signals for e in mapper.map(s)]
    assert [(e.subject, e.data) for e in events] == [
        ("acme/plant1/presses", {"line": "line2", "machine": "press07", "temperature_c": 61.5}),
        ("acme/plant1/presses", {"line": "line3", "machine": "press08", "temperature_c": 58.0}),
    ]
    assert mapper.signal_states[("acme/plant1/presses", "temperature")].quality == "bad"


async def test_quality_indicators_set_the_signal_quality(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    topic = f"{topic_prefix}/press07/temperature"
    metrics = Metrics()
    addresses = [MqttAddress(topic=topic, value_path="v", quality_path="q"),
                 MqttAddress(topic=topic, value_path="w", quality_path="q",
                             quality_codes="opcda")]
    src = source(mqtt_port, addresses, metrics=metrics)
    emit = Collector()
    async with running(src, emit):
        for q in ("good", "Uncertain", 0x80340000, True, 192, "maybe"):
            publish(topic, {"v": 1.5, "w": 2, "q": q})
        publish(topic, {"v": 1.5, "w": 2})  # no quality
        await emit.wait(7)
    got = [[(s.quality.value, s.status) for s in d.signals] for d in emit.deliveries]
    assert got == [
        [("good", None), ("good", None)],
        [("uncertain", "Uncertain"), ("uncertain", "Uncertain")],
        [("bad", 0x80340000), ("bad", 0x80340000)],  # not an OPC DA code: bad, and counted
        [("good", None), ("good", None)],
        [("good", None), ("good", None)],  # 192: good as a StatusCode and as a DA quality
        [("bad", "maybe"), ("bad", "maybe")],
        [("bad", None), ("bad", None)],
    ]
    assert all(s.value in (1.5, 2) for s in emit.signals)
    assert metrics.value("mqtt_malformed_payloads_total", connection=NAME, topic=topic) == 3


async def test_binary_payloads_by_struct_layout(mqtt_port: int, topic_prefix: str,
                                                publish: Publisher) -> None:
    topic = f"{topic_prefix}/+machine/raw"
    metrics = Metrics()
    addresses = [MqttAddress(topic=topic, binary={"offset": 0, "type": "uint16"}),
                 MqttAddress(topic=topic, binary={"offset": 2, "type": "float32",
                                                  "byte_order": "little"}),
                 MqttAddress(topic=topic, binary={"offset": 6, "type": "string", "length": 8}),
                 MqttAddress(topic=topic, capture="machine")]
    src = source(mqtt_port, addresses, metrics=metrics)
    emit = Collector()
    with structlog.testing.capture_logs() as logs:
        async with running(src, emit):
            publish(f"{topic_prefix}/press07/raw",
                    struct.pack(">H", 1234) + struct.pack("<f", 61.5) + b"Running\0")
            publish(f"{topic_prefix}/press08/raw", struct.pack(">H", 7) + b"\0\0")  # too short
            await emit.wait(2)
    assert [[s.value for s in d.signals] for d in emit.deliveries] == [
        ["press07", 1234, 61.5, "Running"], ["press08", 7]]
    assert all(d.ack is not None for d in emit.deliveries)
    assert metrics.value("mqtt_malformed_payloads_total", connection=NAME,
                         topic=f"{topic_prefix}/+/raw") == 1
    [warning] = [e for e in logs if e["event"] == "mqtt.malformed_payload"]
    assert warning["reason"] == "payload has 4 bytes, the float32 at offset 2 needs 6"


async def test_an_address_may_ask_for_its_own_qos(mqtt_port: int, topic_prefix: str,
                                                  publish: Publisher) -> None:
    fast = f"{topic_prefix}/press07/vibration"
    safe = f"{topic_prefix}/press07/counter"
    src = source(mqtt_port, [MqttAddress(topic=fast, qos=0), MqttAddress(topic=safe)])
    emit = Collector()
    async with running(src, emit):
        publish(fast, b"0.3")
        publish(safe, b"17")
        await emit.wait(2)
    assert [(d.signals[0].value, d.ack is not None) for d in emit.deliveries] == [
        (0.3, False), (17, True)]


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_shared_subscription_hands_each_message_to_one_member(
        mqtt_port: int, topic_prefix: str, publish: Publisher, version: str) -> None:
    topic = f"{topic_prefix}/press07/counter"
    group = f"g{uuid.uuid4().hex[:6]}"
    first, second = Collector(), Collector()
    a = source(mqtt_port, [MqttAddress(topic=topic)], shared_group=group,
               protocol_version=version)
    b = source(mqtt_port, [MqttAddress(topic=topic)], shared_group=group,
               protocol_version=version)
    async with running(a, first), running(b, second):
        for n in range(10):
            publish(topic, n)
        deadline = asyncio.get_running_loop().time() + 10
        while len(first.deliveries) + len(second.deliveries) < 10:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
    values = sorted(s.value for s in (*first.signals, *second.signals))
    assert values == list(range(10))  # each message once, to one member
    assert first.signals and second.signals


async def test_v5_session_expiry_ends_the_session_and_the_loss_is_logged(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    """A persistent session outlives a disconnect by session_expiry_s only; the next connect
    of the same source finds none and says that messages published meanwhile are lost."""
    topic = f"{topic_prefix}/oven01/state"
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        src = source(mqtt_port, [MqttAddress(topic=topic)], session_expiry_s=1, metrics=metrics)
        async with running(src, Collector()):
            pass
        await asyncio.sleep(2.5)  # the broker drops the session
        publish(topic, b"Heating")  # nobody subscribed any more: gone
        emit = Collector()
        async with running(src, emit):
            publish(topic, b"Cooling")
            await emit.wait(1)
            await asyncio.sleep(0.2)
    assert [s.value for s in emit.signals] == ["Cooling"]
    assert metrics.value("mqtt_sessions_lost_total", connection=NAME) == 1
    # In a full run, another test's logging set-up can keep these lines from the capture; when
    # the source's lines are captured at all, the warning must be among them.
    if any(e["event"] == "mqtt.connected" for e in logs):
        [lost] = [e for e in logs if e["event"] == "mqtt.session_lost"]
        assert lost["log_level"] == "warning"
        assert "messages published while the gateway was away are lost" in lost["hint"]


async def test_v5_session_within_its_expiry_keeps_the_messages(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    topic = f"{topic_prefix}/oven01/state"
    src = source(mqtt_port, [MqttAddress(topic=topic)], session_expiry_s=30)
    async with running(src, Collector()):
        pass
    await asyncio.sleep(1.5)
    publish(topic, b"Heating")
    emit = Collector()
    with structlog.testing.capture_logs() as logs:
        async with running(src, emit):
            await emit.wait(1)
    assert [s.value for s in emit.signals] == ["Heating"]
    assert not [e for e in logs if e["event"] == "mqtt.session_lost"]
    [connected] = [e for e in logs if e["event"] == "mqtt.connected"]
    assert connected["session_present"] is True


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_a_refused_connect_names_the_reason_and_what_to_check(
        tmp_path: Path, version: str) -> None:
    with Mosquitto(tmp_path, "allow_anonymous false\n") as broker:
        src = source(broker.port, [MqttAddress(topic="a/b")], protocol_version=version)
        with pytest.raises(SourceUnavailable) as info:
            await asyncio.wait_for(src.run(Collector()), 10)
    assert str(info.value) == (
        f"MQTT broker {NAME} at 127.0.0.1:{broker.port} refused the connection: Not authorized; "
        f"check username and the password (DIGISPINE_CONNECTIONS__PLANT_MQTT__PASSWORD), or the "
        f"broker's access rules for this user or client certificate")


async def test_a_stopped_source_can_run_again_after_a_refusal(tmp_path: Path) -> None:
    """The supervisor's retry after a refusal: nothing is left behind by the failed run."""
    with Mosquitto(tmp_path, "allow_anonymous false\n") as broker:
        src = source(broker.port, [MqttAddress(topic="a/b")])
        for _ in range(2):
            with pytest.raises(SourceUnavailable, match="Not authorized"):
                await asyncio.wait_for(src.run(Collector()), 10)
    assert src._link is None



async def test_a_broker_without_mqtt_5_is_answered_with_the_setting_to_change() -> None:
    """An MQTT 3.1.1 broker answers a version 5 CONNECT with return code 1 (unacceptable
    protocol version) and hangs up."""

    async def old_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the CONNECT
        writer.write(b"\x20\x02\x00\x01")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(old_broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        src = source(port, [MqttAddress(topic="a/b")])
        with pytest.raises(SourceUnavailable) as info:
            await asyncio.wait_for(src.run(Collector()), 10)
    assert str(info.value) == (
        f"MQTT broker {NAME} at 127.0.0.1:{port} refused the connection: Unsupported protocol "
        f"version; the broker does not speak MQTT 5: set protocol_version: 3.1.1 on the "
        f"connection")


async def test_a_payload_over_max_payload_bytes_is_acked_counted_and_not_decoded(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    topic = f"{topic_prefix}/press07/telemetry"
    metrics = Metrics()
    src = source(mqtt_port, [MqttAddress(topic=topic, value_path="t")], metrics=metrics,
                 max_payload_bytes=1024)
    emit = Collector()
    async with running(src, emit):
        publish(topic, b'{"t": 1.5, "pad": "' + b"x" * 2000 + b'"}')
        publish(topic, b'{"t": 2.5}')
        await emit.wait(2)
    assert [[s.value for s in d.signals] for d in emit.deliveries] == [[], [2.5]]
    assert all(d.ack is not None for d in emit.deliveries)  # acknowledged, not redelivered
    assert metrics.value("mqtt_malformed_payloads_total", connection=NAME, topic=topic) == 1
