"""MqttSource against a real mosquitto over a real socket: values, wildcards, malformed payloads,
manual acknowledgement with persistent sessions, lost and restarted brokers; the core tests run
with MQTT 5 and with MQTT 3.1.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import structlog
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion

from gateway.errors import SourceUnavailable
from gateway.metrics import Metrics
from gateway.model import Quality, Signal
from gateway.sources.base import Delivery
from gateway.sources.mqtt import MqttAddress, MqttConnectionConfig, MqttSource, unix_time
from tests import support

pytestmark = pytest.mark.timeout(30)

NAME = "plant_mqtt"
VERSIONS = pytest.mark.parametrize("version", ["5", "3.1.1"])
"""Runs a test with each protocol version (the source's ``protocol_version``)."""


# -- helpers ---------------------------------------------------------------------------------


def config(port: int, **overrides: Any) -> MqttConnectionConfig:
    return MqttConnectionConfig(protocol="mqtt", host="127.0.0.1", port=port, **overrides)


def source(port: int, addresses: list[MqttAddress], *, client_id: str | None = None,
           metrics: Metrics | None = None, **overrides: Any) -> MqttSource:
    src = MqttSource(NAME, config(port, **overrides), addresses,
                     client_id or f"test-{uuid.uuid4().hex[:8]}", metrics or Metrics())
    src.stop_ack_timeout_s = 0.5  # collectors that never ack must not slow every stop down
    return src


class Collector:
    """An ``emit`` that records deliveries; acknowledges them at once unless ``ack`` is False."""

    def __init__(self, ack: bool = True) -> None:
        self.ack = ack
        self.deliveries: list[Delivery] = []
        self.block_from: int | None = None
        """Deliveries with this index and later are recorded, then never returned (backpressure)."""

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.block_from is not None and len(self.deliveries) > self.block_from:
            await asyncio.Event().wait()
        if self.ack and delivery.ack is not None:
            delivery.ack()

    @property
    def signals(self) -> list[Signal]:
        return [s for d in self.deliveries for s in d.signals]

    async def wait(self, deliveries: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.deliveries) < deliveries:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.deliveries)} deliveries, expected {deliveries}")
            await asyncio.sleep(0.01)


async def wait_ready(src: MqttSource, task: asyncio.Task[None], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not src.ready:
        if task.done():
            task.result()  # raises what ended it
            raise AssertionError("run returned before the source was ready")
        if time.monotonic() > deadline:
            raise AssertionError("the source did not subscribe in time")
        await asyncio.sleep(0.01)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def running(src: MqttSource, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(src.run(emit))
    try:
        await wait_ready(src, task)
        yield task
    finally:
        await stop(task)


class Publisher:
    """A plain paho client publishing from the test."""

    def __init__(self, port: int) -> None:
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def __call__(self, topic: str, payload: Any, qos: int = 1) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, raw, qos=qos).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publish(mqtt_port: int) -> Iterator[Publisher]:
    pub = Publisher(mqtt_port)
    yield pub
    pub.close()


def _listening(port: int) -> bool:
    try:
        support.wait_port(port, timeout_s=0.01)
    except TimeoutError:
        return False
    return True


class Mosquitto:
    """A mosquitto of one test's own that can be killed and started again on the same port."""

    def __init__(self, directory: Path, extra: str = "") -> None:
        self.port = support.free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence false\n{extra}")
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}"
                                   if self.proc.stderr else "mosquitto exited")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto does not listen on {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- values ----------------------------------------------------------------------------------


@VERSIONS
async def test_json_payload_becomes_signal(mqtt_port: int, topic_prefix: str,
                                           publish: Publisher, version: str) -> None:
    topic = f"{topic_prefix}/press07/telemetry"
    metrics = Metrics()
    src = source(mqtt_port, [MqttAddress(topic=topic, value_path="temperature_c",
                                         timestamp_path="ts")], metrics=metrics,
                 protocol_version=version)
    emit = Collector()
    async with running(src, emit):
        before = time.time()
        publish(topic, {"ts": 1764367741.25, "temperature_c": 61.5})
        await emit.wait(1)
    [delivery] = emit.deliveries
    [signal] = delivery.signals
    assert (signal.connection, signal.tag, signal.value) == (NAME, f"{topic}#temperature_c", 61.5)
    assert signal.quality == Quality.GOOD
    assert signal.source_time == 1764367741.25
    assert before - 1 <= signal.receive_time <= time.time()
    assert delivery.ack is not None
    assert metrics.value("signals_received_total", connection=NAME) == 1
    assert metrics.value("mqtt_messages_received_total", connection=NAME) == 1


async def test_wildcard_filters_match(mqtt_port: int, topic_prefix: str,
                                      publish: Publisher) -> None:
    states = MqttAddress(topic=f"{topic_prefix}/+/state", value_path="state")
    line = MqttAddress(topic=f"{topic_prefix}/line2/#", value_path="v")
    src = source(mqtt_port, [states, line])
    emit = Collector()
    async with running(src, emit):
        publish(f"{topic_prefix}/press07/state", {"state": "Running"})
        publish(f"{topic_prefix}/line2/press08/telemetry", {"v": 3})
        publish(f"{topic_prefix}/line2", {"v": 4})  # '#' matches the parent level too
        await emit.wait(3)
    assert [(s.tag, s.value) for s in emit.signals] == [
        (states.tag, "Running"), (line.tag, 3), (line.tag, 4)]


@VERSIONS
async def test_several_addresses_on_one_topic(mqtt_port: int, topic_prefix: str,
                                              publish: Publisher, version: str) -> None:
    """Overlapping filters: MQTT 3.1.1 (mosquitto) sends one copy of the message, MQTT 5 one per
    matching subscription, each marked with its subscription identifier; either way every
    address yields its signal exactly once."""
    topic = f"{topic_prefix}/press07/telemetry"
    addresses = [
        MqttAddress(topic=topic, value_path="temperature_c", timestamp_path="header.ts"),
        MqttAddress(topic=topic, value_path="spindle.speed_rpm", timestamp_path="header.ts"),
        MqttAddress(topic=topic, value_path="axes.1.position_mm"),
        MqttAddress(topic=f"{topic_prefix}/+/telemetry", value_path="part_counter"),
    ]
    src = source(mqtt_port, addresses, protocol_version=version)
    emit = Collector()
    async with running(src, emit):
        publish(topic, {"header": {"ts": "2026-11-28T22:09:01.5Z"}, "temperature_c": 60.1,
                        "spindle": {"speed_rpm": 1200}, "axes": [{"position_mm": 1},
                                                                 {"position_mm": 2.5}],
                        "part_counter": 17})
        await emit.wait(1 if version == "3.1.1" else 2)
        await asyncio.sleep(0.2)
    assert len(emit.deliveries) == (1 if version == "3.1.1" else 2)
    assert len(emit.signals) == 4  # no signal twice
    got = {s.tag: (s.value, s.source_time) for s in emit.signals}
    ts = unix_time("2026-11-28T22:09:01.5Z")
    assert got == {
        f"{topic}#temperature_c": (60.1, ts),
        f"{topic}#spindle.speed_rpm": (1200, ts),
        f"{topic}#axes.1.position_mm": (2.5, None),
        f"{topic_prefix}/+/telemetry#part_counter": (17, None),
    }


async def test_plain_payloads_are_the_value(mqtt_port: int, topic_prefix: str,
                                            publish: Publisher) -> None:
    topic = f"{topic_prefix}/press07/speed"
    src = source(mqtt_port, [MqttAddress(topic=topic)])
    emit = Collector()
    async with running(src, emit):
        for raw in (b"42.5", b"true", b"Running", b'"Idle"', b"null"):
            publish(topic, raw)
        await emit.wait(5)
    assert [(s.tag, s.value) for s in emit.signals] == [
        (topic, 42.5), (topic, True), (topic, "Running"), (topic, "Idle"), (topic, None)]
    assert [s.quality for s in emit.signals] == [Quality.GOOD] * 4 + [Quality.BAD]


async def test_qos0_deliveries_need_no_ack(mqtt_port: int, topic_prefix: str,
                                           publish: Publisher) -> None:
    topic = f"{topic_prefix}/press07/speed"
    src = source(mqtt_port, [MqttAddress(topic=topic)], qos=0)
    emit = Collector()
    async with running(src, emit):
        publish(topic, b"7", qos=1)  # downgraded to the subscription's QoS 0
        await emit.wait(1)
    assert [(s.value, d.ack) for d in emit.deliveries for s in d.signals] == [(7, None)]


async def test_a_message_no_address_matches_is_acknowledged_and_counted(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    """A persistent session keeps the subscriptions of an older mapping."""
    client_id = f"old-{uuid.uuid4().hex[:8]}"
    old, new = f"{topic_prefix}/old/state", f"{topic_prefix}/new/state"
    async with running(source(mqtt_port, [MqttAddress(topic=old)], client_id=client_id),
                       Collector()):
        pass
    metrics = Metrics()
    emit = Collector()
    src = source(mqtt_port, [MqttAddress(topic=new)], client_id=client_id, metrics=metrics)
    async with running(src, emit):
        publish(old, b"1")
        publish(new, b"2")
        await emit.wait(2)
    assert [[s.value for s in d.signals] for d in emit.deliveries] == [[], [2]]
    assert all(d.ack is not None for d in emit.deliveries)
    assert metrics.value("mqtt_unmatched_messages_total", connection=NAME) == 1


@pytest.mark.parametrize(("raw", "expected"), [
    (1764367741, 1764367741.0),
    (1764367741.5, 1764367741.5),
    (1764367741500, 1764367741.5),
    ("1764367741.5", 1764367741.5),
    ("2025-11-28T22:09:01.5Z", 1764367741.5),
    ("2025-11-28T23:09:01.5+01:00", 1764367741.5),
    ("2025-11-28T22:09:01.5", 1764367741.5),
    ("yesterday", None),
    (True, None),
    (None, None),
    (-5, None),
    ({"s": 1}, None),
])
def test_unix_time(raw: Any, expected: float | None) -> None:
    assert unix_time(raw) == expected


def test_invalid_topic_filter_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="must be a whole level"):
        MqttAddress(topic="acme/#/state")


# -- malformed payloads ----------------------------------------------------------------------


async def test_malformed_payloads_are_counted_logged_once_and_acknowledged(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    topic_filter = f"{topic_prefix}/+/telemetry"
    topic = f"{topic_prefix}/press07/telemetry"
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        src = source(mqtt_port, [MqttAddress(topic=topic_filter, value_path="temperature_c",
                                             timestamp_path="ts")], metrics=metrics)
        emit = Collector()
        async with running(src, emit):
            publish(topic, b"{not json")
            publish(topic, {"ts": 1764367741, "pressure": 3})  # no value
            publish(topic, {"ts": "yesterday", "temperature_c": 1.0})  # bad timestamp
            publish(topic, {"temperature_c": 2.0})  # no timestamp
            publish(topic, {"ts": 1764367741, "temperature_c": 3.0})  # fine
            await emit.wait(5)
            warnings = [e for e in logs if e["event"] == "mqtt.malformed_payload"]
            assert len(warnings) == 1
            assert warnings[0]["topic"] == topic_filter
            assert warnings[0]["message_topic"] == topic
            assert warnings[0]["reason"].startswith("payload is not JSON")
            assert warnings[0]["log_level"] == "warning"

            src.malformed_log_interval_s = 0.2  # the next one after the interval is logged
            await asyncio.sleep(0.25)
            publish(topic, {"ts": 1764367741})
            await emit.wait(6)
    warnings = [e for e in logs if e["event"] == "mqtt.malformed_payload"]
    assert len(warnings) == 2
    assert warnings[1]["suppressed"] == 3
    assert warnings[1]["reason"] == "no value at 'temperature_c'"
    assert all(d.ack is not None for d in emit.deliveries)  # every message is acknowledged
    assert [(s.value, s.source_time) for s in emit.signals] == [
        (1.0, None), (2.0, None), (3.0, 1764367741.0)]
    assert metrics.value("mqtt_malformed_payloads_total", connection=NAME,
                         topic=topic_filter) == 5
    assert metrics.value("mqtt_messages_received_total", connection=NAME) == 6


# -- acknowledgement and persistent sessions -------------------------------------------------


@VERSIONS
async def test_unacknowledged_messages_are_redelivered_to_the_next_run(
        mqtt_port: int, topic_prefix: str, publish: Publisher, version: str) -> None:
    """m1 is acked, m2 delivered but never acked, m3 blocks in emit and m4 waits on the paho
    thread (a hand-off window of 1: backpressure) when the source is stopped. Stopping is
    prompt, and the same client id gets m2, m3 and m4 again, not m1."""
    topic = f"{topic_prefix}/press07/counter"
    client_id = f"ack-{uuid.uuid4().hex[:8]}"
    addresses = [MqttAddress(topic=topic, value_path="n")]
    first = Collector(ack=False)
    first.block_from = 2
    src = source(mqtt_port, addresses, client_id=client_id, protocol_version=version)
    src.handoff_window = 1
    metrics = src._metrics
    task = asyncio.create_task(src.run(first))
    await wait_ready(src, task)
    for n in (1, 2, 3, 4):
        publish(topic, {"n": n})
    await first.wait(3)
    await asyncio.sleep(0.1)
    assert len(first.deliveries) == 3  # m4 is held back on the paho thread
    assert metrics.value("mqtt_messages_received_total", connection=NAME) == 3
    ack = first.deliveries[0].ack
    assert ack is not None
    ack()
    started = time.monotonic()
    await stop(task)  # emit and the paho thread are both blocked: must not deadlock
    assert time.monotonic() - started < 2
    late_ack = first.deliveries[1].ack
    assert late_ack is not None
    late_ack()  # after the stop: does nothing, m2 stays unacknowledged

    second = Collector()
    async with running(source(mqtt_port, addresses, client_id=client_id,
                              protocol_version=version), second):
        publish(topic, {"n": 5})  # sent after the redeliveries
        await second.wait(4)
        await asyncio.sleep(0.2)
    assert [s.value for s in second.signals] == [2, 3, 4, 5]


async def test_clean_stop_waits_for_the_pipeline_to_ack_what_it_took(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    """Stopping while the pipeline still holds messages: the source stops taking new ones and
    waits for those acks before disconnecting, so the next run gets no duplicates."""
    topic = f"{topic_prefix}/press08/counter"
    client_id = f"stop-{uuid.uuid4().hex[:8]}"
    addresses = [MqttAddress(topic=topic, value_path="n")]
    taken = Collector(ack=False)
    src = source(mqtt_port, addresses, client_id=client_id)
    src.stop_ack_timeout_s = 5.0
    task = asyncio.create_task(src.run(taken))
    await wait_ready(src, task)
    for n in range(1, 21):
        publish(topic, {"n": n})
    await taken.wait(20)

    async def slow_pipeline() -> None:  # acks what it took, a little later, in order
        await asyncio.sleep(0.3)
        for d in taken.deliveries:
            assert d.ack is not None
            d.ack()

    acker = asyncio.create_task(slow_pipeline())
    started = time.monotonic()
    await stop(task)
    assert 0.2 < time.monotonic() - started < 3  # it waited for the acks, not for the timeout
    await acker
    # The PUBACKs went out before the DISCONNECT, but a broker may take the session over for a
    # new connection of the same client id before it has read the old socket to its end (then
    # it redelivers: at-least-once). A restart is not that fast; give the broker a moment.
    await asyncio.sleep(0.3)

    second = Collector()
    async with running(source(mqtt_port, addresses, client_id=client_id), second):
        publish(topic, {"n": 21})
        await second.wait(1)
        await asyncio.sleep(0.3)
    assert [s.value for s in second.signals] == [21]


@VERSIONS
async def test_persistent_session_keeps_what_arrives_while_stopped(
        mqtt_port: int, topic_prefix: str, publish: Publisher, version: str) -> None:
    topic = f"{topic_prefix}/oven01/state"
    client_id = f"keep-{uuid.uuid4().hex[:8]}"
    addresses = [MqttAddress(topic=f"{topic_prefix}/+/state", value_path="state")]
    async with running(source(mqtt_port, addresses, client_id=client_id,
                              protocol_version=version), Collector()):
        pass
    for state in ("Heating", "Soaking", "Cooling"):
        publish(topic, {"state": state})
    emit = Collector()
    async with running(source(mqtt_port, addresses, client_id=client_id,
                              protocol_version=version), emit):
        await emit.wait(3)
    assert [s.value for s in emit.signals] == ["Heating", "Soaking", "Cooling"]


@VERSIONS
async def test_clean_session_forgets_what_arrives_while_stopped(
        mqtt_port: int, topic_prefix: str, publish: Publisher, version: str) -> None:
    topic = f"{topic_prefix}/oven01/state"
    client_id = f"clean-{uuid.uuid4().hex[:8]}"
    addresses = [MqttAddress(topic=topic, value_path="state")]
    async with running(source(mqtt_port, addresses, client_id=client_id, session="clean",
                              protocol_version=version), Collector()):
        pass
    publish(topic, {"state": "Heating"})
    emit = Collector()
    async with running(source(mqtt_port, addresses, client_id=client_id, session="clean",
                              protocol_version=version), emit):
        publish(topic, {"state": "Cooling"})
        await emit.wait(1)
        await asyncio.sleep(0.2)
    assert [s.value for s in emit.signals] == ["Cooling"]


async def test_an_emit_failure_ends_run(mqtt_port: int, topic_prefix: str,
                                        publish: Publisher) -> None:
    topic = f"{topic_prefix}/press07/state"

    async def broken(delivery: Delivery) -> None:
        raise RuntimeError("pipeline broken")

    src = source(mqtt_port, [MqttAddress(topic=topic, value_path="state")])
    task = asyncio.create_task(src.run(broken))
    await wait_ready(src, task)
    publish(topic, {"state": "Idle"})
    with pytest.raises(RuntimeError, match="pipeline broken"):
        await asyncio.wait_for(task, 5)


# -- connection loss -------------------------------------------------------------------------


async def test_unreachable_broker_raises_source_unavailable() -> None:
    port = support.free_port()  # nothing listens there
    src = source(port, [MqttAddress(topic="a/b")])
    with pytest.raises(SourceUnavailable) as info:
        await asyncio.wait_for(src.run(Collector()), 10)
    assert str(info.value) == (f"Cannot reach MQTT broker {NAME} at 127.0.0.1:{port}: "
                               "Connection refused")


DYNSEC_PLUGIN = next(iter(sorted(Path("/usr/lib").glob("**/mosquitto_dynamic_security.so"))), None)


@pytest.mark.skipif(DYNSEC_PLUGIN is None, reason="mosquitto's dynamic security plugin is missing")
async def test_refused_subscription_is_logged_with_its_topic(tmp_path: Path,
                                                             topic_prefix: str) -> None:
    """mosquitto's plain acl_file never refuses a SUBSCRIBE; its dynamic security plugin does."""
    dynsec = {
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "reader"}], "clients": []}],
        "roles": [{"rolename": "reader", "acls": [
            {"acltype": "subscribePattern", "topic": f"{topic_prefix}/allowed/#", "allow": True}]}],
        "anonymousGroup": "anonymous",
    }
    # Run as root, mosquitto reads plugin files as user "mosquitto": keep them readable.
    readable = Path(tempfile.mkdtemp(prefix="mqtt-dynsec-"))
    readable.chmod(0o755)
    (readable / "dynsec.json").write_text(json.dumps(dynsec))
    (readable / "dynsec.json").chmod(0o644)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, readable, ignore_errors=True)
        broker = cleanup.enter_context(Mosquitto(
            tmp_path, f"plugin {DYNSEC_PLUGIN}\nplugin_opt_config_file {readable}/dynsec.json\n"))
        logs = cleanup.enter_context(structlog.testing.capture_logs())
        metrics = Metrics()
        src = source(broker.port, [MqttAddress(topic=f"{topic_prefix}/allowed/#"),
                                   MqttAddress(topic=f"{topic_prefix}/secret/#")],
                     metrics=metrics)
        async with running(src, Collector()):
            pass  # ready: the SUBACK is in and reported
    refused = [e for e in logs if e["event"] == "mqtt.subscription_refused"]
    assert [(e["topic"], e["log_level"]) for e in refused] == [
        (f"{topic_prefix}/secret/#", "error")]
    assert metrics.value("mqtt_subscriptions_refused_total", connection=NAME) == 1


async def test_lost_link_raises_and_the_persistent_session_keeps_the_gap(
        mqtt_port: int, topic_prefix: str, publish: Publisher) -> None:
    topic = f"{topic_prefix}/press08/state"
    client_id = f"gap-{uuid.uuid4().hex[:8]}"
    addresses = [MqttAddress(topic=topic, value_path="state")]
    with support.TcpProxy("127.0.0.1", mqtt_port) as proxy:
        emit = Collector()
        src = source(proxy.port, addresses, client_id=client_id)
        task = asyncio.create_task(src.run(emit))
        await wait_ready(src, task)
        proxy.cut()
        with pytest.raises(SourceUnavailable, match="Lost connection to MQTT broker"):
            await asyncio.wait_for(task, 10)
        for state in ("Fault", "Idle"):
            publish(topic, {"state": state})  # straight to the broker, while we are away
        proxy.restore()
        async with running(src, emit):
            publish(topic, {"state": "Setup"})
            await emit.wait(3)
    assert [s.value for s in emit.signals] == ["Fault", "Idle", "Setup"]


async def test_broker_restart_raises_then_streams_again(tmp_path: Path,
                                                        topic_prefix: str) -> None:
    """The supervisor's story: run raises while the broker is gone and, run again after it is
    back (a fresh broker without persistence: the subscriptions are made anew), streams."""
    topic = f"{topic_prefix}/press07/state"
    emit = Collector()
    with Mosquitto(tmp_path) as broker:
        src = source(broker.port, [MqttAddress(topic=topic, value_path="state")])
        task = asyncio.create_task(src.run(emit))
        await wait_ready(src, task)
        pub = Publisher(broker.port)
        pub(topic, {"state": "Running"})
        await emit.wait(1)
        pub.close()

        broker.kill()
        with pytest.raises(SourceUnavailable, match="Lost connection"):
            await asyncio.wait_for(task, 10)
        with pytest.raises(SourceUnavailable, match="Cannot reach MQTT broker"):
            await asyncio.wait_for(src.run(emit), 10)

        broker.start()  # same port
        async with running(src, emit):
            pub = Publisher(broker.port)
            pub(topic, {"state": "Idle"})
            await emit.wait(2)
            pub.close()
    assert [s.value for s in emit.signals] == ["Running", "Idle"]
