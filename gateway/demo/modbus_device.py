"""A simulated packaging machine served over Modbus TCP (pymodbus): flow-wrapper ``pack01``.

The demo's Modbus device. It answers as unit 1; every value is read-only (a write is refused
with exception 2, illegal data address). Its register map, addresses zero-based as sent on the
wire (the HMI reference in brackets)::

    table             address       type     order  name             meaning
    holding register  0  (40001)    uint16   -      status           0 Stopped, 1 Running,
                                                                     2 Starved, 3 Fault
    holding register  1  (40002)    int16    -      jaw_temperature  sealing jaw, degC x 10
                                                                     (1705 = 170.5 degC)
    holding register  2-3 (40003)   uint32   ABCD   packs_produced   packs made; register 2 is
                                                                     the high word; wraps
                                                                     4294967295 -> 0
    holding register  4-5 (40005)   float32  CDAB   air_pressure     supply air, bar; word
                                                                     swapped: register 4 holds
                                                                     the LOW word
    holding register  6  (40007)    uint16   -      speed            packs per minute
    holding register  7  (40008)    uint16   -      fault_code       0 none, 101 film break,
                                                                     102 jaw heater, 103 jam
    coil              0  (00001)    bool     -      motor_on         the main drive runs
    discrete input    0  (10001)    bool     -      alarm            an alarm is active (Fault)
    discrete input    1  (10002)    bool     -      film_low         film reel below 15 %

There are no input registers (input register 0 reads 0; everything else is exception 2).
Example: 5.25 bar is the float32 bytes ``40 A8 00 00``; word swapped (CDAB) the device holds
``0x0000`` in register 4 and ``0x40A8`` in register 5.

The machine runs most of the time (100-140 packs/min), starves for product now and then, stops,
and faults rarely (with a fault code); its film reel runs out and is changed (Stopped). The
sealing jaws hold 170 degC (a jaw heater fault lets them cool); the air supply sags below
5 bar now and then. Every ``interval_s`` the machine advances by ``interval_s`` of simulated
time, drawn from one ``random.Random(seed)``: a given seed gives the same sequence.

Run it on its own (Ctrl-C stops)::

    python -m gateway.demo.modbus_device --port 5020
"""

from __future__ import annotations

import argparse
import math
import random
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.demo.threaded import ThreadedDevice, wait_for_interrupt

UNIT = 1
"""The unit id the device answers to."""
PACK_STATES = ("Stopped", "Running", "Starved", "Fault")
"""The status codes: 0 Stopped, 1 Running, 2 Starved, 3 Fault."""
FAULT_CODES = {101: "film break", 102: "jaw heater", 103: "jam"}
UINT32_WRAP = 2**32

HOLDING_REGISTERS = 8
"""Holding registers 0..7 exist."""
FILM_LOW_PCT = 15.0


@dataclass(frozen=True, slots=True)
class RegisterEntry:
    """One row of the documented register map."""

    table: str
    address: int
    type: str
    order: str | None
    name: str
    meaning: str


REGISTER_MAP = (
    RegisterEntry("holding_register", 0, "uint16", None, "status",
                  "0 Stopped, 1 Running, 2 Starved, 3 Fault"),
    RegisterEntry("holding_register", 1, "int16", None, "jaw_temperature",
                  "sealing jaw temperature, degC x 10"),
    RegisterEntry("holding_register", 2, "uint32", "ABCD", "packs_produced",
                  "packs made; wraps 4294967295 -> 0"),
    RegisterEntry("holding_register", 4, "float32", "CDAB", "air_pressure",
                  "supply air pressure, bar (word swapped)"),
    RegisterEntry("holding_register", 6, "uint16", None, "speed", "packs per minute"),
    RegisterEntry("holding_register", 7, "uint16", None, "fault_code",
                  "0 none, 101 film break, 102 jaw heater, 103 jam"),
    RegisterEntry("coil", 0, "bool", None, "motor_on", "the main drive runs"),
    RegisterEntry("discrete_input", 0, "bool", None, "alarm", "an alarm is active"),
    RegisterEntry("discrete_input", 1, "bool", None, "film_low", "film reel below 15 %"),
)
"""The register map above, as data (for tests and tools)."""


class PackagingModel:
    """A horizontal flow-wrapper: a state machine with random dwell times, and its telemetry."""

    DWELL_S: ClassVar[dict[str, tuple[float, float]]] = {
        "Stopped": (5.0, 20.0), "Running": (30.0, 120.0), "Starved": (3.0, 12.0),
        "Fault": (10.0, 30.0)}
    NEXT: ClassVar[dict[str, tuple[tuple[str, ...], tuple[float, ...]]]] = {
        "Stopped": (("Running",), (1.0,)),
        "Running": (("Starved", "Stopped", "Fault"), (0.6, 0.25, 0.15)),
        "Starved": (("Running", "Stopped"), (0.9, 0.1)),
        "Fault": (("Stopped", "Running"), (0.5, 0.5))}
    JAW_SETPOINT_C = 170.0
    AIR_NOMINAL_BAR = 6.0
    AIR_SAG_BAR = 4.6
    PACKS_PER_REEL = 20_000

    def __init__(self, rng: random.Random, packs_produced: int | None = None,
                 state: str | None = None) -> None:
        self.rng = rng
        self.packs = float((packs_produced if packs_produced is not None
                            else rng.randrange(100_000, 5_000_000)) % UINT32_WRAP)
        self.jaw_c = self.JAW_SETPOINT_C + rng.uniform(-1.0, 1.0)
        self.air_bar = self.AIR_NOMINAL_BAR
        self.sag_s = 0.0
        self.film_pct = rng.uniform(20.0, 100.0)
        self.state = "Stopped"
        self.remaining_s = 0.0
        self.rated_ppm = 0.0
        self.speed_ppm = 0
        self.fault_code = 0
        self._enter(state if state is not None
                    else rng.choices(("Running", "Stopped"), (0.8, 0.2))[0])

    @property
    def packs_produced(self) -> int:
        return int(self.packs) % UINT32_WRAP

    @property
    def film_low(self) -> bool:
        return self.film_pct < FILM_LOW_PCT

    def _enter(self, state: str, dwell: tuple[float, float] | None = None) -> None:
        if state not in PACK_STATES:
            raise ValueError(f"unknown packaging state {state!r}; expected one of {PACK_STATES}")
        self.state = state
        self.remaining_s = self.rng.uniform(*(dwell or self.DWELL_S[state]))
        self.rated_ppm = self.rng.uniform(100.0, 140.0)
        self.fault_code = self.rng.choice(tuple(FAULT_CODES)) if state == "Fault" else 0

    def step(self, dt_s: float) -> None:
        self.remaining_s -= dt_s
        if self.remaining_s <= 0:
            states, weights = self.NEXT[self.state]
            self._enter(self.rng.choices(states, weights)[0])
        running = self.state == "Running"
        self.speed_ppm = max(0, round(self.rated_ppm + self.rng.gauss(0.0, 2.0))) if running else 0
        if running:
            made = self.speed_ppm / 60.0 * dt_s
            self.packs = (self.packs + made) % UINT32_WRAP
            self.film_pct -= made * 100.0 / self.PACKS_PER_REEL
            if self.film_pct <= 0.0:  # reel empty: stop for the reel change
                self.film_pct = 100.0
                self._enter("Stopped", (20.0, 40.0))
        heater_ok = not (self.state == "Fault" and self.fault_code == 102)
        target = self.JAW_SETPOINT_C if heater_ok else 140.0
        self.jaw_c += (target - self.jaw_c) * min(1.0, 0.1 * dt_s)
        self.jaw_c += self.rng.gauss(0.0, 0.3) * math.sqrt(dt_s)
        if self.sag_s > 0:
            self.sag_s -= dt_s
        elif self.rng.random() < 0.01 * dt_s:
            self.sag_s = self.rng.uniform(5.0, 15.0)
        air_target = self.AIR_SAG_BAR if self.sag_s > 0 else self.AIR_NOMINAL_BAR
        self.air_bar += (air_target - self.air_bar) * min(1.0, 0.5 * dt_s)
        self.air_bar += self.rng.gauss(0.0, 0.02) * math.sqrt(dt_s)

    def image(self) -> tuple[list[int], list[bool], list[bool]]:
        """Holding registers 0..7, coils 0..15 and discrete inputs 0..15 as the device holds
        them (encoded here with ``struct``, independently of the gateway's codec)."""
        jaw = max(-32768, min(32767, round(self.jaw_c * 10)))
        packs = self.packs_produced
        air_high, air_low = struct.unpack(">HH", struct.pack(">f", self.air_bar))
        registers = [
            PACK_STATES.index(self.state),
            jaw & 0xFFFF,                      # int16, two's complement
            packs >> 16, packs & 0xFFFF,       # uint32 ABCD: high word first
            air_low, air_high,                 # float32 CDAB: low word first
            self.speed_ppm & 0xFFFF,
            self.fault_code,
        ]
        coils = [self.state == "Running"] + [False] * 15
        inputs = [self.state == "Fault", self.film_low] + [False] * 14
        return registers, coils, inputs


def _pack_bits(bits: Sequence[bool]) -> int:
    return sum(1 << i for i, bit in enumerate(bits) if bit)


class PackagingDevice(ThreadedDevice):
    """Serves the simulated packaging machine over Modbus TCP on its own thread (and event
    loop). ``start`` returns once it listens (or raises why it cannot); ``stop`` ends it."""

    kind = "the Modbus device"

    def __init__(self, host: str = "127.0.0.1", port: int = 5020, *, interval_s: float = 1.0,
                 seed: int | None = None, packs_produced: int | None = None,
                 state: str | None = None) -> None:
        super().__init__(interval_s)
        self.host = host
        self.port = port
        self.model = PackagingModel(random.Random(seed), packs_produced, state)
        self._lock = threading.Lock()
        self._image = self.model.image()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def registers(self) -> tuple[list[int], list[bool], list[bool]]:
        """What the device answers now: holding registers 0..7, coils and discrete inputs."""
        with self._lock:
            registers, coils, inputs = self._image
            return list(registers), list(coils), list(inputs)

    def advance(self, seconds: float) -> None:
        """Advance the machine by ``seconds`` of simulated time at once (for tests; the device
        ticks every ``interval_s`` by itself)."""
        with self._lock:
            self.model.step(seconds)
            self._image = self.model.image()

    # -- internals ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        device = SimDevice(UNIT, simdata=(
            [SimData(0, values=[False] * 16, datatype=DataType.BITS, readonly=True)],
            [SimData(0, values=[False] * 16, datatype=DataType.BITS, readonly=True)],
            [SimData(0, count=HOLDING_REGISTERS, values=0, datatype=DataType.REGISTERS,
                     readonly=True)],
            [SimData(0, count=1, values=0, datatype=DataType.REGISTERS, readonly=True)],
        ), action=self._action)
        server: Any = ModbusTcpServer(device, address=(self.host, self.port))
        await server.serve_forever(background=True)
        try:
            await self._serving(self.advance)
        finally:
            await server.shutdown()

    async def _action(self, function_code: int, _start: int, _address: int, _count: int,
                      registers: list[int], _values: Any) -> None:
        """Before pymodbus answers a request: copy the machine's current values into the block
        it reads from (one consistent snapshot per request)."""
        with self._lock:
            holding, coils, inputs = self._image
        if function_code in (3, 6, 16, 22, 23):
            registers[:len(holding)] = holding
        elif function_code in (1, 5, 15):
            registers[0] = _pack_bits(coils)
        elif function_code == 2:
            registers[0] = _pack_bits(inputs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.demo.modbus_device``: serve until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.demo.modbus_device",
                                     description="Serve a simulated packaging machine over "
                                                 "Modbus TCP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=5020, help="TCP port (5020)")
    parser.add_argument("--interval-s", type=float, default=1.0,
                        help="seconds between two updates of the values (1.0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    args = parser.parse_args(argv)
    if args.interval_s <= 0:
        parser.error("--interval-s must be positive")
    device = PackagingDevice(args.host, args.port, interval_s=args.interval_s, seed=args.seed)
    device.start()
    print(f"modbus device: pack01 (unit {UNIT}) at {device.where} (Ctrl-C stops)", flush=True)
    try:
        wait_for_interrupt()
    finally:
        device.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
