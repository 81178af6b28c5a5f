"""A simulated Sparkplug B edge node for the demo: an assembly station's gateway PLC with two
devices, publishing to MQTT as Sparkplug B 3.0 says.

Group ``plant1``, edge node ``assembly-gw``, devices::

    screwdriver01  a nut runner. Its DBIRTH gives names and aliases; its DDATA names the metrics
                   (report by exception: the state when it changes, a tightening's values when
                   one is done, the counter last so that a mapping reading the counter sees the
                   tightening's values):
                     State              String   Idle | Running | Fault
                     Tightening/Torque  Double   Nm
                     Tightening/Angle   Double   degrees
                     Tightening/Result  String   OK | NOK
                     Tightening/Count   UInt32   tightenings since the controller started
    leaktester01   a pressure-decay leak tester. Its DBIRTH gives names and aliases; its DDATA
                   carries the aliases only (a host must resolve them from the DBIRTH):
                     State              Int32    0 Idle, 1 Testing, 2 Fault       (alias 201)
                     Test/Pressure      Double   bar, the test pressure           (alias 202)
                     Test/LeakRate      Double   mbar*l/s                         (alias 203)
                     Test/Passed        Boolean  the leak rate is below 0.05      (alias 204)
                     Test/Count         UInt32   tests since power-up, counter last (alias 205)
                   It is power-cycled now and then: DDEATH, then a DBIRTH some seconds later.

The node keeps ``seq`` (0 on the NBIRTH, one step per message, wrapping after 255) and
``bdSeq`` (the NBIRTH's ``bdSeq`` metric is the one of the NDEATH it registered as its MQTT
will; one more per connection). It answers an NCMD ``Node Control/Rebirth`` = true with an NBIRTH
and its devices' DBIRTHs, publishes them again when its primary host application (``host_id``)
says online, and publishes its NDEATH before a clean disconnect. Payloads are encoded with the
gateway's own schema (:mod:`gateway.sources.sparkplug_schema`); the gateway's tests read it with an
independent one.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from typing import Any, ClassVar

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.sources.sparkplug_schema import DataType, Payload

GROUP = "plant1"
EDGE_NODE = "assembly-gw"
SCREWDRIVER = "screwdriver01"
LEAK_TESTER = "leaktester01"
DEVICES = (SCREWDRIVER, LEAK_TESTER)
NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"

Metric = tuple[str, int, int, Any]
"""``(name, alias, datatype, value)``."""


def _ms() -> int:
    return int(time.time() * 1000)


def encode(metrics: list[tuple[str | None, int | None, int, Any]], seq: int | None,
           timestamp: int) -> bytes:
    """A Sparkplug B payload: each metric by name, by alias or both (None leaves it out)."""
    p = Payload(timestamp=timestamp)
    if seq is not None:
        p.seq = seq
    for name, alias, datatype, value in metrics:
        m = p.metrics.add(timestamp=timestamp, datatype=datatype)
        if name is not None:
            m.name = name
        if alias is not None:
            m.alias = alias
        if value is None:
            m.is_null = True
        elif datatype == DataType.Boolean:
            m.boolean_value = bool(value)
        elif datatype == DataType.String:
            m.string_value = str(value)
        elif datatype == DataType.Float:
            m.float_value = float(value)
        elif datatype == DataType.Double:
            m.double_value = float(value)
        elif datatype in (DataType.Int64, DataType.UInt64):
            m.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF
        else:  # the 8, 16 and 32 bit integers
            m.int_value = int(value) & 0xFFFF_FFFF
    data: bytes = p.SerializeToString()
    return data


class Screwdriver:
    """A nut runner: tightenings every few seconds while Running; a NOK now and then."""

    STATES = ("Idle", "Running", "Fault")
    ALIASES: ClassVar[dict[str, int]] = {
        "State": 101, "Tightening/Torque": 102, "Tightening/Angle": 103,
        "Tightening/Result": 104, "Tightening/Count": 105}
    TYPES: ClassVar[dict[str, int]] = {
        "State": DataType.String, "Tightening/Torque": DataType.Double,
        "Tightening/Angle": DataType.Double, "Tightening/Result": DataType.String,
        "Tightening/Count": DataType.UInt32}

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.state = "Running"
        self.remaining_s = rng.uniform(40.0, 120.0)
        self.next_tightening_s = rng.uniform(0.5, 2.0)
        self.values: dict[str, Any] = {"State": "Running", "Tightening/Torque": 0.0,
                                       "Tightening/Angle": 0.0, "Tightening/Result": "OK",
                                       "Tightening/Count": rng.randrange(1000, 20_000)}

    def step(self, dt: float) -> list[str]:
        """Advance by ``dt`` seconds; the names of the metrics that changed, in report order."""
        changed: list[str] = []
        self.remaining_s -= dt
        if self.remaining_s <= 0:
            if self.state == "Running":
                self.state = self.rng.choices(("Idle", "Fault"), (0.8, 0.2))[0]
                self.remaining_s = self.rng.uniform(5.0, 20.0)
            else:
                self.state = "Running"
                self.remaining_s = self.rng.uniform(40.0, 120.0)
            self.values["State"] = self.state
            changed.append("State")
        if self.state == "Running":
            self.next_tightening_s -= dt
            if self.next_tightening_s <= 0:
                self.next_tightening_s = self.rng.uniform(2.0, 4.0)
                torque = self.rng.gauss(12.0, 0.3)
                angle = self.rng.gauss(720.0, 12.0)
                ok = 11.2 <= torque <= 12.8 and 690.0 <= angle <= 750.0
                self.values.update({"Tightening/Torque": round(torque, 2),
                                    "Tightening/Angle": round(angle, 1),
                                    "Tightening/Result": "OK" if ok else "NOK",
                                    "Tightening/Count": self.values["Tightening/Count"] + 1})
                changed += ["Tightening/Torque", "Tightening/Angle", "Tightening/Result",
                            "Tightening/Count"]
        return changed


class LeakTester:
    """A pressure-decay leak tester: fills, holds, measures; about one part in ten leaks."""

    ALIASES: ClassVar[dict[str, int]] = {
        "State": 201, "Test/Pressure": 202, "Test/LeakRate": 203, "Test/Passed": 204,
        "Test/Count": 205}
    TYPES: ClassVar[dict[str, int]] = {
        "State": DataType.Int32, "Test/Pressure": DataType.Double,
        "Test/LeakRate": DataType.Double, "Test/Passed": DataType.Boolean,
        "Test/Count": DataType.UInt32}
    LIMIT = 0.05
    """mbar*l/s: a part leaking more fails."""
    POWER_CYCLE_PER_S = 0.004
    """Chance per second of being switched off (DDEATH) for a few seconds."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.alive = True
        self.off_s = 0.0
        self.testing_s = 0.0
        self.idle_s = rng.uniform(0.5, 1.5)
        self.values: dict[str, Any] = {"State": 0, "Test/Pressure": 0.0, "Test/LeakRate": 0.0,
                                       "Test/Passed": True, "Test/Count": rng.randrange(100, 5000)}

    def step(self, dt: float) -> list[str] | None:
        """Advance by ``dt``: the metrics that changed, or None when it was just switched off
        (a DDEATH is due); ``alive`` turns True again when it is back (a DBIRTH is due)."""
        if not self.alive:
            self.off_s -= dt
            if self.off_s <= 0:
                self.alive = True
                self.values["State"], self.idle_s = 0, 1.0
            return []
        if self.rng.random() < self.POWER_CYCLE_PER_S * dt:
            self.alive, self.off_s = False, self.rng.uniform(4.0, 10.0)
            return None
        if self.values["State"] == 0:
            self.idle_s -= dt
            if self.idle_s <= 0:
                self.values["State"], self.testing_s = 1, self.rng.uniform(2.5, 4.0)
                self.values["Test/Pressure"] = round(self.rng.gauss(2.0, 0.02), 3)
                return ["State", "Test/Pressure"]
            return []
        self.testing_s -= dt
        if self.testing_s > 0:
            return []
        leak = self.rng.lognormvariate(-4.2, 0.9)  # median 0.015, ~10 % above 0.05
        self.values.update({"State": 0, "Test/LeakRate": round(leak, 4),
                            "Test/Passed": leak < self.LIMIT,
                            "Test/Count": self.values["Test/Count"] + 1})
        self.idle_s = self.rng.uniform(1.0, 2.0)
        return ["State", "Test/LeakRate", "Test/Passed", "Test/Count"]


class AssemblyEdgeNode:
    """The edge node ``plant1/assembly-gw``: publishes every ``interval_s`` on its own thread;
    paho reconnects by itself (births again on every connect)."""

    def __init__(self, host: str, port: int, interval_s: float = 1.0, seed: int | None = None,
                 host_id: str | None = None, group: str = GROUP,
                 edge_node: str = EDGE_NODE) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.host, self.port, self.interval_s = host, port, interval_s
        self.group, self.edge_node, self.host_id = group, edge_node, host_id
        rng = random.Random(seed)
        self.screwdriver = Screwdriver(rng)
        self.leak_tester = LeakTester(rng)
        self._lock = threading.Lock()
        """Held while a message is made and published: ``seq`` is one sequence."""
        self._seq = 0
        self._bd_seq = 0
        self.births = 0
        """NBIRTHs published (the first connect, reconnects, rebirth requests)."""
        self.rebirth_requests = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._client = Client(CallbackAPIVersion.VERSION2,
                              client_id=f"{edge_node}-{uuid.uuid4().hex[:8]}")
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._set_will()

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"{NAMESPACE}/{self.group}/{kind}/{self.edge_node}" + (
            f"/{device}" if device else "")

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sparkplug-edge-node", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Publish the NDEATH (a clean disconnect sends no will) and disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._started:
            if self._client.is_connected():
                info = self._client.publish(self.topic("NDEATH"), self._ndeath(), qos=1)
                try:
                    info.wait_for_publish(2.0)
                except (RuntimeError, ValueError):
                    pass
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False

    # -- messages -------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    def _ndeath(self) -> bytes:
        return encode([("bdSeq", None, DataType.Int64, self._bd_seq)], None, _ms())

    def _set_will(self) -> None:
        self._client.will_set(self.topic("NDEATH"), self._ndeath(), qos=1, retain=False)

    def _publish(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=0)

    def _births(self) -> None:
        """NBIRTH, then the DBIRTH of each device that is up (under the lock)."""
        now = _ms()
        self._seq = 0
        self._publish(self.topic("NBIRTH"), encode(
            [("bdSeq", None, DataType.Int64, self._bd_seq),
             (REBIRTH, None, DataType.Boolean, False)], self._next_seq(), now))
        self.births += 1
        self._dbirth(SCREWDRIVER, now)
        if self.leak_tester.alive:
            self._dbirth(LEAK_TESTER, now)

    def _dbirth(self, device: str, now: int) -> None:
        model = self.screwdriver if device == SCREWDRIVER else self.leak_tester
        metrics: list[tuple[str | None, int | None, int, Any]] = [
            (name, model.ALIASES[name], model.TYPES[name], value)
            for name, value in model.values.items()]
        self._publish(self.topic("DBIRTH", device), encode(metrics, self._next_seq(), now))

    def _ddata(self, device: str, names: list[str]) -> None:
        model = self.screwdriver if device == SCREWDRIVER else self.leak_tester
        by_alias = device == LEAK_TESTER  # the leak tester sends aliases only
        metrics: list[tuple[str | None, int | None, int, Any]] = [
            (None if by_alias else name, model.ALIASES[name] if by_alias else None,
             model.TYPES[name], model.values[name]) for name in names]
        self._publish(self.topic("DDATA", device), encode(metrics, self._next_seq(), _ms()))

    def tick(self) -> None:
        """Advance both devices by ``interval_s`` and report what changed (when connected)."""
        with self._lock:
            connected = self._client.is_connected()
            changed = self.screwdriver.step(self.interval_s)
            if changed and connected:
                self._ddata(SCREWDRIVER, changed)
            was_alive = self.leak_tester.alive
            report = self.leak_tester.step(self.interval_s)
            if not connected:
                return
            if report is None:
                self._publish(self.topic("DDEATH", LEAK_TESTER),
                              encode([], self._next_seq(), _ms()))
            elif not was_alive and self.leak_tester.alive:
                self._dbirth(LEAK_TESTER, _ms())
            elif report:
                self._ddata(LEAK_TESTER, report)

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            next_tick += self.interval_s
            if next_tick < time.monotonic():
                next_tick = time.monotonic() + self.interval_s
            self.tick()

    # -- paho callbacks -------------------------------------------------------------------------

    def _on_connect(self, client: Client, _userdata: Any, _flags: ConnectFlags,
                    reason_code: ReasonCode, _properties: Properties | None) -> None:
        if reason_code.is_failure:
            return
        topics = [(self.topic("NCMD"), 0), (f"{self.topic('DCMD')}/+", 0)]
        if self.host_id is not None:
            topics.append((f"{NAMESPACE}/STATE/{self.host_id}", 1))
        client.subscribe(topics)
        with self._lock:
            self._births()

    def _on_disconnect(self, _client: Client, _userdata: Any, _flags: DisconnectFlags,
                       _reason: ReasonCode, _properties: Properties | None) -> None:
        with self._lock:  # the next connection is a new session: a new bdSeq, a new will
            self._bd_seq = (self._bd_seq + 1) % 256
            self._set_will()

    def _on_message(self, _client: Client, _userdata: Any, msg: MQTTMessage) -> None:
        if msg.topic == self.topic("NCMD"):
            try:
                p = Payload.FromString(msg.payload)
            except Exception:  # noqa: BLE001 - a bad command must not stop the node
                return
            if any(m.name == REBIRTH and m.boolean_value for m in p.metrics):
                with self._lock:
                    self.rebirth_requests += 1
                    self._births()
        elif msg.topic.startswith(f"{NAMESPACE}/STATE/"):
            try:
                state = json.loads(msg.payload)
            except ValueError:
                return
            if isinstance(state, dict) and state.get("online") is True:
                with self._lock:  # our primary host (re)connected: it wants our births
                    self._births()
