"""The simulated shop floor: its topics and payload keys (a contract with the example mappings),
its machines' behaviour, and its life on a real mosquitto."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion

from gateway.demo.simulator import (
    DEFAULT_MACHINES,
    OVEN01,
    OVEN_STATES,
    PRESS07,
    PRESS_STATES,
    OvenModel,
    PressModel,
    ShopFloorSimulator,
)
from tests import support
from tests.test_mqtt_source import Mosquitto

pytestmark = pytest.mark.timeout(30)

PRESS_KEYS = {"ts", "temperature_c", "spindle_speed_rpm", "part_counter"}
OVEN_KEYS = {"ts", "zone1_temperature_c", "zone2_temperature_c"}
EXPECTED = {
    "acme/plant1/stamping/line2/press07/state": {"ts", "state"},
    "acme/plant1/stamping/line2/press07/telemetry": PRESS_KEYS,
    "acme/plant1/stamping/line2/press08/state": {"ts", "state"},
    "acme/plant1/stamping/line2/press08/telemetry": PRESS_KEYS,
    "acme/plant1/heattreat/line1/oven01/state": {"ts", "state"},
    "acme/plant1/heattreat/line1/oven01/telemetry": OVEN_KEYS,
    "acme/plant1/assembly/line3/cell01/status": {
        "ts", "mode", "guard_door_open", "cycle_counter", "air_pressure_bar"},
}


class Subscriber:
    """A paho client recording what arrives under ``acme/#``."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, int, dict[str, Any]]] = []
        self._subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *_: c.subscribe("acme/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "no SUBACK"

    def _on_message(self, _client: Client, _userdata: Any, msg: MQTTMessage) -> None:
        self.messages.append((msg.topic, msg.qos, json.loads(msg.payload)))

    def wait(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} messages, expected {count}"
            time.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(mqtt_port: int) -> Iterator[Subscriber]:
    sub = Subscriber(mqtt_port)
    yield sub
    sub.close()


def test_publish_once_publishes_the_documented_topics_and_keys(
        mqtt_port: int, subscriber: Subscriber) -> None:
    sim = ShopFloorSimulator("127.0.0.1", mqtt_port, seed=7)
    try:
        before = time.time()
        published = sim.publish_once()
        subscriber.wait(len(EXPECTED))
    finally:
        sim.stop()
    assert {topic: set(payload) for topic, payload in published} == EXPECTED
    assert sim.messages_published == len(EXPECTED)
    assert {topic: set(payload) for topic, _, payload in subscriber.messages} == EXPECTED
    for topic, qos, payload in subscriber.messages:
        assert qos == 1
        assert isinstance(payload["ts"], float)
        assert before - 1 < payload["ts"] <= time.time()
        if topic.endswith("/state"):
            assert payload["state"] in (OVEN_STATES if "oven01" in topic else PRESS_STATES)
        elif "oven01" in topic:
            assert all(isinstance(payload[k], float) for k in OVEN_KEYS)
        elif "cell01" in topic:
            assert payload["mode"] in (0, 1, 2, 3)
            assert isinstance(payload["guard_door_open"], bool)
            assert 0 <= payload["cycle_counter"] <= 65_535
            assert isinstance(payload["air_pressure_bar"], float)
        else:
            assert isinstance(payload["temperature_c"], float)
            assert isinstance(payload["spindle_speed_rpm"], float)
            assert isinstance(payload["part_counter"], int)


def test_start_publishes_every_interval_until_stop(mqtt_port: int,
                                                   subscriber: Subscriber) -> None:
    sim = ShopFloorSimulator("127.0.0.1", mqtt_port, interval_s=0.05, machines=[PRESS07])
    sim.start()
    try:
        subscriber.wait(2 * 4)  # four ticks of state + telemetry
    finally:
        started = time.monotonic()
        sim.stop()
        stop_s = time.monotonic() - started
    assert stop_s < 1.5
    after_stop = len(subscriber.messages)
    time.sleep(0.2)
    assert len(subscriber.messages) == after_stop
    assert {topic for topic, _, _ in subscriber.messages} == {
        PRESS07.state_topic, PRESS07.telemetry_topic}


def test_waits_for_a_broker_that_is_not_up_yet(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    sim = ShopFloorSimulator("127.0.0.1", broker.port, interval_s=0.05, machines=[OVEN01])
    sim.start()
    try:
        time.sleep(0.3)  # connection refused meanwhile
        with broker:
            sub = Subscriber(broker.port)
            try:
                sub.wait(2, timeout_s=10)  # paho retries every second
            finally:
                sub.close()
                sim.stop()
    finally:
        sim.stop()
    assert sim.messages_published >= 2
    assert {topic for topic, _, _ in sub.messages} == {OVEN01.state_topic, OVEN01.telemetry_topic}


def test_same_seed_same_shop_floor() -> None:
    def run(seed: int) -> list[str]:
        press, oven = PressModel(random.Random(seed)), OvenModel(random.Random(seed))
        states = []
        for _ in range(600):
            press.step(1.0)
            oven.step(1.0)
            states.append(f"{press.state}/{oven.state}/{int(press.strokes)}/{oven.zones[0]:.3f}")
        return states

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_press_counts_and_turns_only_while_running() -> None:
    press = PressModel(random.Random(3))
    seen: set[str] = set()
    for _ in range(4 * 3600):
        before = int(press.strokes)
        press.step(1.0)
        seen.add(press.state)
        [(_, state), (_, telemetry)] = press.messages(PRESS07, time.time())
        assert state["state"] == press.state
        if press.state == "Running":
            assert telemetry["spindle_speed_rpm"] > 1000
            assert telemetry["part_counter"] >= before
        else:
            assert telemetry["spindle_speed_rpm"] == 0
            assert telemetry["part_counter"] == before
        assert 45 < telemetry["temperature_c"] < 75
    assert seen == set(PRESS_STATES)  # a Fault now and then


def test_oven_temperatures_follow_its_state() -> None:
    oven = OvenModel(random.Random(5))
    seen: set[str] = set()
    for _ in range(8 * 3600):
        oven.step(1.0)
        seen.add(oven.state)
        [_, (_, telemetry)] = oven.messages(OVEN01, time.time())
        zone1, zone2 = telemetry["zone1_temperature_c"], telemetry["zone2_temperature_c"]
        if oven.state == "Soaking":
            assert 820 < zone1 < 870 and 810 < zone2 < 860
        if oven.state == "Idle":
            assert zone1 < 100
        assert 20 < zone1 < 870
    assert seen == set(OVEN_STATES)


def test_main_runs_until_interrupted(mqtt_port: int, subscriber: Subscriber) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.simulator", "--host", "127.0.0.1",
         "--port", str(mqtt_port), "--interval-s", "0.05", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        subscriber.wait(2 * len(DEFAULT_MACHINES) * 2)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("simulator: press07, press08, oven01, cell01 -> mqtt://127.0.0.1:")
    assert lines[1].startswith("simulator: stopped after ")


def test_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        ShopFloorSimulator("127.0.0.1", support.free_port(), interval_s=0)
