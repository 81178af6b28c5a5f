"""A simulated shop floor publishing to MQTT: two stamping presses, a heat-treatment oven, a robot
cell, and a Sparkplug B edge node with a screwdriver and a leak tester.

Every ``interval_s`` each machine publishes its state and its telemetry, QoS 1, as JSON objects
whose ``ts`` is Unix seconds (a float). The topics and keys are a contract with the example
mapping files; do not change them::

    acme/plant1/stamping/line2/<press>/state       {"ts", "state": Idle|Setup|Running|Fault}
    acme/plant1/stamping/line2/<press>/telemetry   {"ts", "temperature_c", "spindle_speed_rpm",
                                                    "part_counter"}
    acme/plant1/heattreat/line1/oven01/state       {"ts", "state": Idle|Heating|Soaking|Cooling|Fault}
    acme/plant1/heattreat/line1/oven01/telemetry   {"ts", "zone1_temperature_c",
                                                    "zone2_temperature_c"}

The presses (``press07``, ``press08``) go Idle -> Setup -> Running -> Idle with random dwell
times and a Fault now and then; their spindle turns and their part counter counts only while
Running. The oven heats, soaks at its set point, cools, and faults rarely; its zone temperatures
follow the state. The machines advance by ``interval_s`` of simulated time per tick, drawn from
one ``random.Random(seed)``: a given seed gives the same sequence of states and values.

With the default machines the simulator also runs a Sparkplug B edge node on the same broker
(:mod:`gateway.demo.sparkplug_node`: group ``plant1``, edge node ``assembly-gw``, devices
``screwdriver01`` and ``leaktester01``), which :meth:`ShopFloorSimulator.start` starts and
:meth:`ShopFloorSimulator.stop` stops (:meth:`ShopFloorSimulator.publish_once` publishes only the
JSON machines).

The rest of the demo's shop floor speaks the other protocols: two CNC machines behind an OPC UA
server (:mod:`gateway.demo.opcua_server`) and a packaging machine on Modbus TCP
(:mod:`gateway.demo.modbus_device`); ``digispine-gateway demo`` runs all three.

Run it on its own (it waits for the broker and reconnects by itself)::

    python -m gateway.demo.simulator --host 127.0.0.1 --port 1883 --interval-s 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from paho.mqtt.client import Client, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.demo.sparkplug_node import DEVICES, AssemblyEdgeNode
from gateway.demo.threaded import wait_for_interrupt

QOS = 1
CONNECT_WAIT_S = 10.0
"""How long :meth:`ShopFloorSimulator.publish_once` waits for the broker."""
SPARKPLUG_HOST_ID = "digispine-edge-demo-01"
"""The primary host application the demo's edge node re-births for when it says online (the
``sparkplug_host_id`` of ``plant_mqtt`` in ``config/gateway.yaml``)."""

PRESS_STATES = ("Idle", "Setup", "Running", "Fault")
OVEN_STATES = ("Idle", "Heating", "Soaking", "Cooling", "Fault")

Message = tuple[str, dict[str, Any]]
"""A topic and its JSON payload."""


@dataclass(frozen=True, slots=True)
class Machine:
    """One simulated machine and where it publishes."""

    name: str
    kind: Literal["press", "oven", "cell"]
    topic_prefix: str

    @property
    def state_topic(self) -> str:
        return f"{self.topic_prefix}/state"

    @property
    def telemetry_topic(self) -> str:
        return f"{self.topic_prefix}/telemetry"


PRESS07 = Machine("press07", "press", "acme/plant1/stamping/line2/press07")
PRESS08 = Machine("press08", "press", "acme/plant1/stamping/line2/press08")
OVEN01 = Machine("oven01", "oven", "acme/plant1/heattreat/line1/oven01")
CELL01 = Machine("cell01", "cell", "acme/plant1/assembly/line3/cell01")
DEFAULT_MACHINES = (PRESS07, PRESS08, OVEN01, CELL01)


class PressModel:
    """A stamping press: a state machine with random dwell times, and its telemetry."""

    DWELL_S: ClassVar[dict[str, tuple[float, float]]] = {
        "Idle": (5.0, 20.0), "Setup": (5.0, 15.0), "Running": (30.0, 120.0), "Fault": (10.0, 40.0)}
    """Seconds a press stays in a state: uniform between the two bounds."""
    NEXT: ClassVar[dict[str, tuple[tuple[str, ...], tuple[float, ...]]]] = {
        "Idle": (("Setup", "Running"), (0.6, 0.4)),
        "Setup": (("Running", "Fault"), (0.9, 0.1)),
        "Running": (("Idle", "Fault"), (0.8, 0.2)),
        "Fault": (("Idle", "Setup"), (0.7, 0.3))}
    """The states that can follow a state, and their weights."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.temperature_c = 60.0 + rng.uniform(-2.0, 2.0)
        self.strokes = float(rng.randrange(1000, 50_000))
        self.state = "Idle"
        self.remaining_s = 0.0
        self.rated_rpm = 0.0
        self.strokes_per_s = 0.0
        self._enter(rng.choice(("Idle", "Setup", "Running")))

    def _enter(self, state: str) -> None:
        self.state = state
        low, high = self.DWELL_S[state]
        self.remaining_s = self.rng.uniform(low, high)
        self.rated_rpm = self.rng.uniform(1100.0, 1300.0)
        self.strokes_per_s = self.rng.uniform(40.0, 70.0) / 60.0

    def step(self, dt: float) -> None:
        self.remaining_s -= dt
        if self.remaining_s <= 0:
            states, weights = self.NEXT[self.state]
            self._enter(self.rng.choices(states, weights)[0])
        running = self.state == "Running"
        target = 64.0 if running else 57.0  # around 60 over a shift
        self.temperature_c += (target - self.temperature_c) * min(1.0, 0.02 * dt)
        self.temperature_c += self.rng.gauss(0.0, 0.15) * math.sqrt(dt)
        if running:
            self.strokes += self.strokes_per_s * dt

    def messages(self, machine: Machine, ts: float) -> list[Message]:
        running = self.state == "Running"
        rpm = self.rated_rpm + self.rng.gauss(0.0, 5.0) if running else 0.0
        return [
            (machine.state_topic, {"ts": ts, "state": self.state}),
            (machine.telemetry_topic, {"ts": ts, "temperature_c": round(self.temperature_c, 2),
                                       "spindle_speed_rpm": round(rpm, 1),
                                       "part_counter": int(self.strokes)}),
        ]


class OvenModel:
    """A two-zone heat-treatment oven: Idle -> Heating -> Soaking -> Cooling -> Idle."""

    AMBIENT_C = 25.0
    SETPOINTS_C = (850.0, 840.0)
    HEAT_RATE_C_PER_S = 15.0
    COOL_RATE_PER_S = 0.05
    """Cooling is exponential towards ambient: this fraction of the difference per second."""
    FAULT_PER_S: ClassVar[dict[str, float]] = {"Heating": 0.003, "Soaking": 0.002}
    """Chance of a Fault per second in these states."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.zones = [self.AMBIENT_C + rng.uniform(0.0, 3.0) for _ in self.SETPOINTS_C]
        self.state = "Idle"
        self.remaining_s = rng.uniform(3.0, 10.0)

    def _enter(self, state: str, dwell: tuple[float, float] = (0.0, 0.0)) -> None:
        self.state = state
        self.remaining_s = self.rng.uniform(*dwell)

    def step(self, dt: float) -> None:
        self.remaining_s -= dt
        hot = self.zones[0] - 5.0
        if self.rng.random() < self.FAULT_PER_S.get(self.state, 0.0) * dt:
            self._enter("Fault", (15.0, 45.0))
        elif self.state == "Idle" and self.remaining_s <= 0:
            self._enter("Heating")
        elif self.state == "Heating" and hot >= self.SETPOINTS_C[0] - 10.0:
            self._enter("Soaking", (30.0, 90.0))
        elif self.state == "Soaking" and self.remaining_s <= 0:
            self._enter("Cooling")
        elif self.state == "Cooling" and self.zones[0] < 80.0:
            self._enter("Idle", (10.0, 30.0))
        elif self.state == "Fault" and self.remaining_s <= 0:
            self._enter("Cooling" if self.zones[0] >= 80.0 else "Idle", (10.0, 30.0))
        for i, setpoint in enumerate(self.SETPOINTS_C):
            self.zones[i] = self._zone(self.zones[i], setpoint, dt)

    def _zone(self, temp: float, setpoint: float, dt: float) -> float:
        noise = self.rng.gauss(0.0, 0.8) * math.sqrt(dt)
        if self.state == "Heating":
            return min(setpoint, temp + self.HEAT_RATE_C_PER_S * dt * self.rng.uniform(0.8, 1.1))
        if self.state == "Soaking":
            return temp + (setpoint - temp) * min(1.0, 0.3 * dt) + noise
        if self.state in ("Cooling", "Fault"):
            rate = self.COOL_RATE_PER_S if self.state == "Cooling" else self.COOL_RATE_PER_S / 3
            return temp + (self.AMBIENT_C - temp) * min(1.0, rate * dt)
        return max(self.AMBIENT_C - 2.0, temp + (self.AMBIENT_C - temp) * min(1.0, 0.05 * dt)
                   + noise * 0.2)

    def messages(self, machine: Machine, ts: float) -> list[Message]:
        zone1, zone2 = (round(z, 1) for z in self.zones)
        return [
            (machine.state_topic, {"ts": ts, "state": self.state}),
            (machine.telemetry_topic, {"ts": ts, "zone1_temperature_c": zone1,
                                       "zone2_temperature_c": zone2}),
        ]


class CellModel:
    """A robot assembly cell behind a guard door, as its PLC reports it on one status topic:
    mode as an integer code (0 Idle, 1 Setup, 2 Running, 3 Fault), the guard door switch
    (open while the cell stands), a uint16 cycle counter that wraps at 65535, and the air
    pressure of its supply (sagging now and then)."""

    MODES = ("Idle", "Setup", "Running", "Fault")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.mode = 2
        self.remaining_s = rng.uniform(20.0, 60.0)
        self.door_open = False
        self.cycles = 65_500 + rng.randrange(0, 30)  # wraps within the first minutes
        self.air_pressure_bar = 6.2

    def step(self, dt: float) -> None:
        self.remaining_s -= dt
        if self.remaining_s <= 0:
            if self.mode == 2:  # stop for a while: the operator opens the door
                self.mode, self.door_open = self.rng.choice((0, 1, 3)), True
                self.remaining_s = self.rng.uniform(5.0, 20.0)
            else:
                self.mode, self.door_open = 2, False
                self.remaining_s = self.rng.uniform(30.0, 90.0)
        if self.mode == 2:
            self.cycles = (self.cycles + self.rng.choice((0, 1, 1, 2))) % 65_536
        sag = 1.2 if self.rng.random() < 0.02 else 0.0
        self.air_pressure_bar += (6.2 - sag - self.air_pressure_bar) * min(1.0, 0.5 * dt)

    def messages(self, machine: Machine, ts: float) -> list[Message]:
        return [(f"{machine.topic_prefix}/status", {
            "ts": ts, "mode": self.mode, "guard_door_open": self.door_open,
            "cycle_counter": self.cycles, "air_pressure_bar": round(self.air_pressure_bar, 2)})]


Model = PressModel | OvenModel | CellModel


def model_for(machine: Machine, rng: random.Random) -> Model:
    if machine.kind == "press":
        return PressModel(rng)
    return OvenModel(rng) if machine.kind == "oven" else CellModel(rng)


class ShopFloorSimulator:
    """Publishes every machine's state and telemetry once per ``interval_s`` on its own thread.

    The paho network loop reconnects by itself; ticks while the broker is away advance the
    machines without publishing.
    """

    def __init__(self, host: str, port: int, interval_s: float = 1.0, seed: int | None = None,
                 machines: Sequence[Machine] | None = None,
                 sparkplug: bool | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.machines = tuple(machines if machines is not None else DEFAULT_MACHINES)
        rng = random.Random(seed)
        self._models = [(m, model_for(m, rng)) for m in self.machines]
        self.edge_node: AssemblyEdgeNode | None = None
        """The Sparkplug B edge node (by default with the default machines only)."""
        if sparkplug if sparkplug is not None else machines is None:
            self.edge_node = AssemblyEdgeNode(
                host, port, interval_s=interval_s, seed=None if seed is None else seed + 1,
                host_id=SPARKPLUG_HOST_ID)
        self._lock = threading.Lock()
        self._published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._network_started = False
        self._client = Client(CallbackAPIVersion.VERSION2,
                              client_id=f"digispine-simulator-{uuid.uuid4().hex[:8]}")
        self._client.reconnect_delay_set(1, 1)  # a local broker: retry every second
        self._client.on_publish = self._on_publish

    @property
    def messages_published(self) -> int:
        """Messages the broker has acknowledged (PUBACK)."""
        return self._published

    def start(self) -> None:
        """Connect (retrying until the broker is up) and publish every ``interval_s``."""
        if self._thread is not None:
            return
        self._ensure_network()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="shop-floor-simulator", daemon=True)
        self._thread.start()
        if self.edge_node is not None:
            self.edge_node.start()

    def stop(self) -> None:
        """Stop publishing and disconnect (within about a second)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.edge_node is not None:
            self.edge_node.stop()
        if self._network_started:
            self._client.disconnect()
            self._client.loop_stop()
            self._network_started = False

    def publish_once(self) -> list[Message]:
        """Advance every machine one interval and publish its messages; wait for the PUBACKs.

        Raises TimeoutError when the broker cannot be reached within ``CONNECT_WAIT_S``.
        """
        self._ensure_network()
        deadline = time.monotonic() + CONNECT_WAIT_S
        while not self._client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no MQTT broker at {self.host}:{self.port}")
            time.sleep(0.02)
        published = self._tick(publish=True)
        for _, info in published:
            if info is not None:
                info.wait_for_publish(CONNECT_WAIT_S)
        return [message for message, _ in published]

    # -- internals ----------------------------------------------------------------------------

    def _ensure_network(self) -> None:
        if not self._network_started:
            self._client.connect_async(self.host, self.port, keepalive=30)
            self._client.loop_start()
            self._network_started = True

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            next_tick += self.interval_s
            if next_tick < time.monotonic():  # fell behind (suspend, slow broker): skip ahead
                next_tick = time.monotonic() + self.interval_s
            self._tick(publish=self._client.is_connected())

    def _tick(self, publish: bool) -> list[tuple[Message, MQTTMessageInfo | None]]:
        """Advance every machine by ``interval_s``; publish their messages if asked to."""
        out: list[tuple[Message, MQTTMessageInfo | None]] = []
        with self._lock:
            for machine, model in self._models:
                model.step(self.interval_s)
                for topic, payload in model.messages(machine, time.time()):
                    info = (self._client.publish(topic, json.dumps(payload), qos=QOS)
                            if publish else None)
                    out.append(((topic, payload), info))
        return out

    def _on_publish(self, _client: Client, _userdata: Any, _mid: int, _reason: ReasonCode,
                    _properties: Properties) -> None:
        self._published += 1  # only the paho thread writes it


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.demo.simulator``: publish until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.simulator",
                                     description="Publish a simulated shop floor to MQTT.")
    parser.add_argument("--host", default="127.0.0.1", help="MQTT broker host (127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="MQTT broker port (1883)")
    parser.add_argument("--interval-s", type=float, default=1.0,
                        help="seconds between two messages of one machine (1.0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    args = parser.parse_args(argv)
    if args.interval_s <= 0:
        parser.error("--interval-s must be positive")
    simulator = ShopFloorSimulator(args.host, args.port, interval_s=args.interval_s,
                                   seed=args.seed)
    names = ", ".join(m.name for m in simulator.machines)
    node = simulator.edge_node
    sparkplug = ("" if node is None else f"; Sparkplug B edge node {node.group}/{node.edge_node} "
                 f"({', '.join(DEVICES)})")
    print(f"simulator: {names} -> mqtt://{args.host}:{args.port} every {args.interval_s:g} s"
          f"{sparkplug} (Ctrl-C stops)", flush=True)
    simulator.start()
    try:
        wait_for_interrupt()
    finally:
        simulator.stop()
    print(f"simulator: stopped after {simulator.messages_published} messages", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
