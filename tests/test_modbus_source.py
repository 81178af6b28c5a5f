"""ModbusAddress, the polling plan, and ModbusSource against a real pymodbus TCP server in the
test's event loop, over a real socket: coalescing counted at the server, every type decoded
end to end, a unit that does not answer (isolation, backoff, recovery), exceptions (permanent
and transient), late polls, and the server going away and coming back.

The server simulates units with pymodbus' SimDevice; its ``trace_pdu`` records every request
it receives (unit, function code, address, count, time). A unit set "dead" takes requests and
never answers (the handling coroutine waits forever, and is cancelled when the unit comes
back or the server stops); a "busy" unit answers exception 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from pydantic import ValidationError
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.errors import SourceUnavailable
from gateway.localbrokers import free_port
from gateway.metrics import Metrics
from gateway.model import Quality, Signal
from gateway.sources import modbus_codec as codec
from gateway.sources.base import Delivery
from gateway.sources.modbus import (
    ModbusAddress,
    ModbusConnectionConfig,
    ModbusSource,
    describe_plan,
    parse_hmi,
    plan,
    signal_type_problem,
)

NAME = "press_modbus"


def cfg(**kw: Any) -> ModbusConnectionConfig:
    base: dict[str, Any] = {"protocol": "modbus", "host": "127.0.0.1"}
    return ModbusConnectionConfig.model_validate(base | kw)


def addr(**kw: Any) -> ModbusAddress:
    return ModbusAddress.model_validate(kw)


# == addresses ================================================================================


@pytest.mark.parametrize(("block", "tag"), [
    ({"table": "holding_register", "address": 100, "type": "float32", "order": "CDAB"},
     "u1/hr/100:float32:CDAB"),
    ({"table": "holding_register", "address": 100, "type": "float32", "order": "ABCD"},
     "u1/hr/100:float32"),
    ({"table": "holding_register", "address": 100, "type": "float32"}, "u1/hr/100:float32"),
    ({"address": 40101, "type": "float32", "order": "CDAB"}, "u1/hr/100:float32:CDAB"),
    ({"address": 400101, "type": "float32", "order": "CDAB"}, "u1/hr/100:float32:CDAB"),
    ({"unit": 3, "address": 30001, "type": "int16"}, "u3/ir/0:int16"),
    ({"address": 30001, "type": "int16", "order": "BA"}, "u1/ir/0:int16:BA"),
    ({"address": 10017}, "u1/di/16:bool"),
    ({"address": "00017"}, "u1/co/16:bool"),
    ({"address": "000017"}, "u1/co/16:bool"),
    ({"table": "coil", "address": 16}, "u1/co/16:bool"),
    ({"table": "coil", "address": 16, "type": "bool"}, "u1/co/16:bool"),
    ({"address": 17, "numbering": "hmi"}, "u1/co/16:bool"),
    ({"table": "holding_register", "address": 7, "type": "bool", "bit": 3}, "u1/hr/7.3:bool"),
    ({"table": "input_register", "address": 20, "type": "string", "length": 12},
     "u1/ir/20:string[12]"),
    ({"table": "input_register", "address": 20, "type": "string", "length": 5, "order": "BA"},
     "u1/ir/20:string[5]:BA"),
    ({"table": "holding_register", "address": 0, "type": "uint64", "order": "GHEFCDAB"},
     "u1/hr/0:uint64:GHEFCDAB"),
    # SunSpec-style zero-based addresses in the 4xxxx range stay zero-based with the same table
    ({"table": "holding_register", "address": 40002, "type": "uint16"}, "u1/hr/40002:uint16"),
    ({"table": "holding_register", "address": 400101, "type": "uint16"}, "u1/hr/100:uint16"),
    ({"table": "coil", "address": 40001, "numbering": "zero_based"}, "u1/co/40001:bool"),
    ({"table": "input_register", "address": 65535, "type": "uint16"}, "u1/ir/65535:uint16"),
])
def test_canonical_tags(block: dict[str, Any], tag: str) -> None:
    assert addr(**block).tag == tag


def _error(block: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        addr(**block)
    return str(info.value)


def test_an_hmi_number_with_another_table_is_refused_with_both_readings() -> None:
    text = _error({"table": "coil", "address": 40001})
    assert "address 40001 with table: coil is ambiguous" in text
    assert "holding register 0" in text
    assert "table: holding_register, address: 0" in text
    assert "numbering: zero_based" in text
    text = _error({"table": "holding_register", "address": 30005, "type": "int16"})
    assert "input register 4" in text


def test_a_small_number_without_table_says_which_tables_it_could_be() -> None:
    text = _error({"address": 5, "type": "int16"})
    assert "does not say which table" in text
    assert "40006 = holding register 5" in text
    assert "address: '00006'" in text


@pytest.mark.parametrize(("block", "words"), [
    ({"address": 20001, "type": "int16"}, "2xxxx is no Modbus table"),
    ({"address": 40000, "type": "int16"}, "HMI numbers count from 1"),
    ({"address": 470000, "type": "int16"}, "is not an HMI reference"),
    ({"table": "holding_register", "address": 70000, "type": "int16"},
     "above 65535, the last Modbus address"),
    ({"table": "coil", "address": 400001}, "can only be an HMI reference, to holding register 0"),
    ({"address": "40001", "table": "coil"},
     "holding register 0 in HMI numbering, but table is coil"),
    ({"address": "4x001", "type": "int16"}, "expected a register number"),
    ({"address": True}, "expected a register number"),
    ({"table": "holding_register", "address": 1}, "say how to read the holding register"),
    ({"table": "holding_register", "address": 1, "type": "bool"}, "needs bit"),
    ({"table": "holding_register", "address": 1, "type": "int16", "bit": 2},
     "bit applies to bool only"),
    ({"table": "coil", "address": 1, "type": "int16"}, "its type is bool, not int16"),
    ({"table": "coil", "address": 1, "bit": 1}, "bit applies to registers"),
    ({"table": "input_register", "address": 1, "type": "float64", "order": "CDAB"},
     "the 64-bit form of CDAB is GHEFCDAB"),
    ({"table": "input_register", "address": 1, "type": "string"}, "needs length"),
    ({"table": "input_register", "address": 65535, "type": "float32"},
     "needs registers up to 65536"),
    ({"address": 1, "numbering": "zero_based"}, "numbering: zero_based needs table"),
    ({"table": "holding_register", "address": 1, "type": "int16", "unit": 256},
     "less than or equal to 255"),
    ({"table": "holding_register", "address": 1, "type": "real"}, "type"),
])
def test_address_errors(block: dict[str, Any], words: str) -> None:
    assert words in _error(block)


def test_parse_hmi() -> None:
    assert parse_hmi(40001) == ("holding_register", 0)
    assert parse_hmi(49999) == ("holding_register", 9998)
    assert parse_hmi(465536) == ("holding_register", 65535)
    assert parse_hmi(300100) == ("input_register", 99)
    assert parse_hmi(10001) == ("discrete_input", 0)
    assert parse_hmi("00001") == ("coil", 0)
    assert parse_hmi(1) == ("coil", 0)


def test_signal_type_problem() -> None:
    fl = addr(table="holding_register", address=0, type="float32")
    assert signal_type_problem(fl, "float") is None
    assert "declare the signal float" in (signal_type_problem(fl, "integer") or "")
    counter = addr(table="holding_register", address=0, type="uint32")
    assert all(signal_type_problem(counter, t) is None
               for t in ("integer", "float", "boolean", "string"))
    coil = addr(table="coil", address=0)
    assert signal_type_problem(coil, "boolean") is None
    assert "declare the signal boolean" in (signal_type_problem(coil, "float") or "")
    text = addr(table="input_register", address=0, type="string", length=4)
    assert "declare the signal string" in (signal_type_problem(text, "integer") or "")


def test_connection_config() -> None:
    assert cfg().transport == "tcp" and cfg().max_registers_per_request == 125
    assert cfg().max_bits_per_request == 2000 and cfg().max_gap == 10
    rtu = ModbusConnectionConfig.model_validate(
        {"protocol": "modbus", "transport": "rtu", "serial_port": "/dev/ttyUSB0",
         "baudrate": 9600, "parity": "none", "stopbits": 2})
    assert rtu.where == "/dev/ttyUSB0 (9600 8N2)"
    for block, words in [
        ({"protocol": "modbus"}, "transport tcp needs host"),
        ({"protocol": "modbus", "transport": "rtu"}, "needs serial_port"),
        ({"protocol": "modbus", "host": "h", "baudrate": 9600}, "baudrate apply to transport rtu"),
        ({"protocol": "modbus", "transport": "rtu", "serial_port": "/dev/x", "host": "h"},
         "host and port apply to transport tcp"),
        ({"protocol": "modbus", "host": "h", "backoff_min_s": 10, "backoff_max_s": 1},
         "backoff_min_s is larger"),
        ({"protocol": "modbus", "host": "h", "max_registers_per_request": 126}, "125"),
    ]:
        with pytest.raises(ValidationError) as info:
            ModbusConnectionConfig.model_validate(block)
        assert words in str(info.value), block


# == the plan =================================================================================


def _spans(requests: Sequence[Any]) -> list[tuple[int, str, int, int, int]]:
    return [(r.unit, r.table, r.start, r.count, r.poll_ms) for r in requests]


def test_plan_coalesces_within_gap_and_size() -> None:
    hr = functools.partial(addr, table="holding_register")
    addresses = [
        hr(address=100, type="float32"), hr(address=102, type="uint16"),
        hr(address=110, type="int32"),           # gap 7 after 103: bridged (max_gap 10)
        hr(address=130, type="uint16"),          # gap 18 after 112: a new read
        hr(address=130, type="bool", bit=4),     # same register, another value
        hr(address=100, type="float32"),         # duplicate tag: read once
        hr(address=100, type="float32", poll_ms=100),  # another rate: its own read
        hr(unit=2, address=100, type="float32"),
        addr(table="input_register", address=100, type="float32"),
        addr(table="coil", address=0), addr(table="coil", address=150),  # 150 bits apart: bridged
        addr(table="coil", address=400),          # 250 bits after 150 > 160: a new read
        addr(table="discrete_input", address=3),
    ]
    requests = plan(addresses, cfg())
    assert _spans(requests) == [
        (1, "coil", 0, 151, 1000),
        (1, "coil", 400, 1, 1000),
        (1, "discrete_input", 3, 1, 1000),
        (1, "input_register", 100, 2, 1000),
        (1, "holding_register", 100, 2, 100),
        (1, "holding_register", 100, 12, 1000),
        (1, "holding_register", 130, 1, 1000),
        (2, "holding_register", 100, 2, 1000),
    ]
    assert [m.tag for m in requests[5].members] == \
        ["u1/hr/100:float32", "u1/hr/102:uint16", "u1/hr/110:int32"]
    assert len(requests[6].members) == 2


def test_plan_respects_max_registers_and_never_splits_a_value() -> None:
    addresses = [addr(table="holding_register", address=a, type="float64") for a in range(0, 40, 4)]
    requests = plan(addresses, cfg(max_registers_per_request=10, max_gap=0))
    assert _spans(requests) == [(1, "holding_register", 0, 8, 1000),
                                (1, "holding_register", 8, 8, 1000),
                                (1, "holding_register", 16, 8, 1000),
                                (1, "holding_register", 24, 8, 1000),
                                (1, "holding_register", 32, 8, 1000)]
    gap0 = plan([addr(table="holding_register", address=0, type="uint16"),
                 addr(table="holding_register", address=2, type="uint16")], cfg(max_gap=0))
    assert len(gap0) == 2
    adjacent = plan([addr(table="holding_register", address=0, type="uint16"),
                     addr(table="holding_register", address=1, type="uint16")], cfg(max_gap=0))
    assert _spans(adjacent) == [(1, "holding_register", 0, 2, 1000)]
    with pytest.raises(ValueError, match="needs 100 registers, more than one read"):
        plan([addr(table="holding_register", address=0, type="string", length=200)],
             cfg(max_registers_per_request=60))


def test_plan_description_and_split() -> None:
    requests = plan([addr(address=40101, type="float32", order="CDAB"),
                     addr(address=40105, type="uint16"), addr(address=40105, type="int16")],
                    cfg(poll_ms=500))
    text = describe_plan(NAME, requests)
    assert text.splitlines() == [
        "press_modbus: 1 read(s) for 3 value(s), 2 requests/s",
        "  unit 1 holding registers 100..104 (5) every 500 ms (fc 3): u1/hr/100:float32:CDAB, "
        "u1/hr/104:int16, u1/hr/104:uint16",
    ]
    parts = requests[0].split()
    assert [(p.start, p.count, len(p.members)) for p in parts] == [(100, 2, 1), (104, 1, 2)]


# == the server ===============================================================================

HR_BLOCKS = ((0, 200), (250, 50))
"""Holding registers 0..199 and 250..299 exist; 200..249 is a hole (exception 2)."""


@dataclass
class Device:
    """A pymodbus TCP server with units 1..n; see the module docstring."""

    port: int
    units: tuple[int, ...] = (1, 2, 3)
    requests: list[tuple[int, int, int, int, float]] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)
    busy: set[int] = field(default_factory=set)
    framer: FramerType = FramerType.SOCKET
    serial_port: str | None = None
    """Serve RTU on this serial device instead of TCP."""
    server: Any = None
    hung: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        devices = [SimDevice(u, simdata=(
            [SimData(0, values=[False] * 256, datatype=DataType.BITS)],
            [SimData(0, values=[False] * 256, datatype=DataType.BITS)],
            [SimData(start, count=count, values=0, datatype=DataType.REGISTERS)
             for start, count in HR_BLOCKS],
            [SimData(0, count=200, values=0, datatype=DataType.REGISTERS)],
        ), action=functools.partial(self._action, u)) for u in self.units]
        if self.serial_port is not None:
            self.server = ModbusSerialServer(devices, port=self.serial_port, framer=FramerType.RTU,
                                             baudrate=115200, parity="N", stopbits=2,
                                             trace_pdu=self._trace)
        else:
            self.server = ModbusTcpServer(devices, address=("127.0.0.1", self.port),
                                          framer=self.framer, trace_pdu=self._trace)
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        self.revive()
        if self.server is not None:
            await self.server.shutdown()
            self.server = None
        await asyncio.sleep(0.05)

    def revive(self, unit: int | None = None) -> None:
        """Unit (or all) answers again; the requests it swallowed stay unanswered."""
        if unit is None:
            self.dead.clear()
        else:
            self.dead.discard(unit)
        for task in list(self.hung):
            task.cancel()
        self.hung.clear()

    def _trace(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            self.requests.append((pdu.dev_id, pdu.function_code, getattr(pdu, "address", -1),
                                  getattr(pdu, "count", -1), time.monotonic()))
        return pdu

    async def _action(self, unit: int, *_: Any) -> ExcCodes | None:
        if unit in self.dead:
            task = asyncio.current_task()
            assert task is not None
            self.hung.add(task)
            await asyncio.Event().wait()  # never answers; cancelled by revive() or stop()
        if unit in self.busy:
            return ExcCodes.DEVICE_BUSY
        return None

    def _block(self, unit: int, table: str) -> tuple[int, list[int]]:
        start, _, registers, _ = self.server.context.devices[unit].block[
            {"coil": "c", "discrete_input": "d", "holding_register": "h",
             "input_register": "i"}[table]]
        return start, registers

    def set_words(self, unit: int, table: str, address: int, words: Sequence[int]) -> None:
        start, registers = self._block(unit, table)
        for i, word in enumerate(words):
            registers[address - start + i] = word

    def set_bit(self, unit: int, table: str, address: int, value: bool) -> None:
        start, registers = self._block(unit, table)
        index = address // 16 - start
        if value:
            registers[index] |= 1 << (address % 16)
        else:
            registers[index] &= ~(1 << (address % 16))

    def seen(self, since: float = 0.0) -> list[tuple[int, int, int, int]]:
        return [(u, fc, a, c) for u, fc, a, c, t in self.requests if t >= since]

    def times(self, unit: int, since: float = 0.0, function_code: int | None = None
              ) -> list[float]:
        return [t for u, fc, _, _, t in self.requests
                if u == unit and t >= since and function_code in (None, fc)]


@contextlib.asynccontextmanager
async def serving(port: int | None = None, units: tuple[int, ...] = (1, 2, 3),
                  framer: FramerType = FramerType.SOCKET) -> AsyncIterator[Device]:
    device = Device(port or free_port(), units, framer=framer)
    await device.start()
    try:
        yield device
    finally:
        await device.stop()


class Collector:
    """The ``emit`` of the tests: keeps every delivery."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.deliveries: list[Delivery] = []
        self.delay_s = delay_s
        self.changed = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.changed.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    @property
    def signals(self) -> list[Signal]:
        return [s for d in self.deliveries for s in d.signals]

    def latest(self) -> dict[str, Signal]:
        return {s.tag: s for s in self.signals}

    def of(self, tag: str) -> list[Signal]:
        return [s for s in self.signals if s.tag == tag]

    async def until(self, check: Any, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; last signals: {self.signals[-8:]}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.2)):
                    await self.changed.wait()


@contextlib.asynccontextmanager
async def running(source: ModbusSource, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(emit))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, SourceUnavailable):
            await task


# == against the server =======================================================================

@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_coalescing_yields_the_planned_requests_at_the_server() -> None:
    async with serving() as device:
        addresses = [
            addr(table="holding_register", address=0, type="uint16"),
            addr(table="holding_register", address=1, type="float32"),
            addr(table="holding_register", address=8, type="int16"),     # bridged: gap 5
            addr(table="holding_register", address=60, type="uint32"),  # far: its own read
            addr(table="input_register", address=10, type="int16"),
            addr(table="input_register", address=12, type="int16"),
            addr(table="coil", address=3), addr(table="coil", address=40),
            addr(table="discrete_input", address=0),
            addr(unit=2, table="holding_register", address=0, type="uint16"),
            addr(unit=2, table="holding_register", address=0, type="uint16", poll_ms=100),
        ]
        config = cfg(port=device.port, poll_ms=200, timeout_ms=500)
        source = ModbusSource(NAME, config, addresses, Metrics())
        planned = {(r.unit, r.function_code, r.start, r.count) for r in source.requests}
        assert planned == {(1, 3, 0, 9), (1, 3, 60, 2), (1, 4, 10, 3), (1, 1, 3, 38),
                           (1, 2, 0, 1), (2, 3, 0, 1)}
        assert len(source.requests) == 7  # unit 2's register at two rates: two reads
        emit = Collector()
        async with running(source, emit):
            await emit.until(lambda: len(emit.deliveries) >= 14)
            started = time.monotonic()
            await asyncio.sleep(1.0)
            window = device.seen(started)
        assert set(window) == planned  # exactly the planned reads, nothing else
        per_read = {r: window.count(r) for r in planned}
        # one second: five 200 ms cycles of every read (give or take one at each edge) plus
        # unit 2's 100 ms read of the same register (about ten)
        assert all(4 <= n <= 6 for r, n in per_read.items() if r != (2, 3, 0, 1)), per_read
        assert 13 <= per_read[(2, 3, 0, 1)] <= 17, per_read
        assert len(emit.latest()) == len({a.tag for a in addresses})
        assert all(s.quality is Quality.GOOD for s in emit.signals)


# (type, order, registers as hex, value): what a device holds, what the source must read
E2E: list[tuple[str, str | None, str, Any]] = [
    ("uint16", None, "1234", 0x1234),
    ("uint16", "BA", "3412", 0x1234),
    ("int16", None, "FF85", -123),
    ("int16", "BA", "85FF", -123),
    ("int32", "ABCD", "F8A4 32EB", -123456789),
    ("int32", "CDAB", "32EB F8A4", -123456789),
    ("int32", "BADC", "A4F8 EB32", -123456789),
    ("int32", "DCBA", "EB32 A4F8", -123456789),
    ("uint32", "ABCD", "FFFF FFFE", 4294967294),
    ("uint32", "CDAB", "FFFE FFFF", 4294967294),
    ("uint32", "BADC", "FFFF FEFF", 4294967294),
    ("uint32", "DCBA", "FEFF FFFF", 4294967294),
    ("float32", "ABCD", "42F6 E979", 123.456),
    ("float32", "CDAB", "E979 42F6", 123.456),
    ("float32", "BADC", "F642 79E9", 123.456),
    ("float32", "DCBA", "79E9 F642", 123.456),
    ("int64", "ABCDEFGH", "FFFF FFFF FFFF FFFE", -2),
    ("int64", "GHEFCDAB", "FFFE FFFF FFFF FFFF", -2),
    ("int64", "BADCFEHG", "FFFF FFFF FFFF FEFF", -2),
    ("int64", "HGFEDCBA", "FEFF FFFF FFFF FFFF", -2),
    ("uint64", "ABCDEFGH", "0102 0304 0506 0708", 72623859790382856),
    ("uint64", "GHEFCDAB", "0708 0506 0304 0102", 72623859790382856),
    ("uint64", "BADCFEHG", "0201 0403 0605 0807", 72623859790382856),
    ("uint64", "HGFEDCBA", "0807 0605 0403 0201", 72623859790382856),
    ("float64", "ABCDEFGH", "405E DD2F 1A9F BE77", 123.456),
    ("float64", "GHEFCDAB", "BE77 1A9F DD2F 405E", 123.456),
    ("float64", "BADCFEHG", "5E40 2FDD 9F1A 77BE", 123.456),
    ("float64", "HGFEDCBA", "77BE 9F1A 2FDD 5E40", 123.456),
]


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_every_type_and_order_decoded_end_to_end() -> None:
    async with serving() as device:
        addresses: list[ModbusAddress] = []
        expected: dict[str, Any] = {}
        at = 0
        for type_, order, hex_words, value in E2E:
            words = codec.words_from_hex(hex_words)
            device.set_words(1, "holding_register", at, words)
            a = addr(table="holding_register", address=at, type=type_, order=order)
            addresses.append(a)
            expected[a.tag] = value
            at += len(words) + 1  # one spare register between values: the plan bridges it
        # strings (odd length, byte swapped), bits of a register, coils, discrete inputs,
        # input registers
        device.set_words(1, "input_register", 0, codec.words_from_hex("5072 6573 7330 3700"))
        device.set_words(1, "input_register", 10, codec.words_from_hex("4241 4443 0045"))
        device.set_words(1, "input_register", 20, codec.words_from_hex("8001"))
        device.set_bit(1, "coil", 5, True)
        device.set_bit(1, "discrete_input", 17, True)
        more = {
            addr(table="input_register", address=0, type="string", length=7): "Press07",
            addr(table="input_register", address=10, type="string", length=5, order="BA"):
                "ABCDE",
            addr(table="input_register", address=20, type="bool", bit=0): True,
            addr(table="input_register", address=20, type="bool", bit=1): False,
            addr(table="input_register", address=20, type="bool", bit=15): True,
            addr(table="input_register", address=20, type="int16"): -32767,
            addr(address="00006"): True,
            addr(table="coil", address=4): False,
            addr(address=10018): True,
            addr(address=10017): False,
        }
        for a, value in more.items():
            addresses.append(a)
            expected[a.tag] = value
        source = ModbusSource(NAME, cfg(port=device.port, poll_ms=100), addresses, Metrics())
        assert len(source.requests) == 4  # hr 0..~110 in one read, ir, coils, di
        emit = Collector()
        before = time.time()
        async with running(source, emit):
            await emit.until(lambda: expected.keys() <= emit.latest().keys())
        got = emit.latest()
        for tag, value in expected.items():
            signal = got[tag]
            assert signal.value == value, tag
            assert type(signal.value) is type(value), tag
            assert signal.quality is Quality.GOOD and signal.connection == NAME
            assert signal.source_time is not None and before <= signal.source_time <= time.time()


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_unit_that_does_not_answer_does_not_slow_the_others_and_recovers() -> None:
    """Unit 2 swallows its requests. Unit 1 keeps its 250 ms rate (a naive loop would poll
    unit 2 every cycle and wait its 200 ms timeout, stretching unit 1's cycle to ~450 ms);
    unit 2 is reported BAD once, probed with backoff, and GOOD again once it answers."""
    metrics = Metrics()
    with structlog.testing.capture_logs() as logged:
        async with serving() as device:
            device.dead.add(2)
            device.set_words(2, "holding_register", 0, [42])
            config = cfg(port=device.port, timeout_ms=200, retries=0, backoff_min_s=0.3,
                         backoff_max_s=0.6)
            addresses = [
                addr(unit=1, table="holding_register", address=0, type="uint16", poll_ms=250),
                addr(unit=1, table="input_register", address=0, type="uint16", poll_ms=250),
                addr(unit=2, table="holding_register", address=0, type="uint16", poll_ms=250),
                addr(unit=2, table="holding_register", address=50, type="uint16", poll_ms=250),
            ]
            source = ModbusSource(NAME, config, addresses, metrics)
            emit = Collector()
            async with running(source, emit):
                await emit.until(lambda: any(s.tag.startswith("u2/") for s in emit.signals))
                started = time.monotonic()
                await asyncio.sleep(3.0)
                healthy = device.times(1, started, function_code=3)
                probes = device.times(2, started)
                assert metrics.snapshot()["modbus_units_down"] == 1.0
                # the unit comes back
                device.revive(2)
                back = time.monotonic()
                await emit.until(lambda: emit.of("u2/hr/0:uint16")[-1].quality is Quality.GOOD,
                                 timeout_s=5)
                recovered_after = time.monotonic() - back
                await emit.until(lambda: emit.of("u2/hr/50:uint16")[-1].quality is Quality.GOOD,
                                 timeout_s=2)
                assert metrics.snapshot()["modbus_units_down"] == 0.0
    # unit 1's holding register read: every 250 ms, in phase; no gap much over the interval
    gaps = [b - a for a, b in itertools.pairwise(sorted(healthy))]
    assert len(gaps) >= 10, gaps
    assert max(gaps) < 0.25 + 0.12, gaps
    assert abs(statistics.median(gaps) - 0.25) < 0.03, gaps
    assert metrics.total("modbus_polls_skipped_total") == 0
    # unit 2: BAD once (both its values, status timeout), then probed with backoff:
    # 0.3, 0.6, 0.6, ... s, one attempt each
    bad = [s for s in emit.signals if s.quality is Quality.BAD]
    assert sorted(s.tag for s in bad) == ["u2/hr/0:uint16", "u2/hr/50:uint16"]
    assert {s.status for s in bad} == {"timeout"}
    assert 3 <= len(probes) <= 7, probes
    assert recovered_after < 0.6 + 0.25 + 0.3
    assert emit.of("u2/hr/0:uint16")[-1].value == 42
    events = [e["event"] for e in logged]
    assert events.count("modbus.unit_down") == 1
    assert events.count("modbus.unit_recovered") == 1
    down = next(e for e in logged if e["event"] == "modbus.unit_down")
    assert down["unit"] == 2 and "no answer within 200 ms" in down["reason"]
    assert metrics.value("modbus_requests_total", connection=NAME, result="timeout") >= 3


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_busy_unit_is_backed_off_as_transient() -> None:
    metrics = Metrics()
    async with serving() as device:
        device.busy.add(3)
        addresses = [addr(unit=3, table="holding_register", address=5, type="uint16"),
                     addr(unit=1, table="holding_register", address=5, type="uint16")]
        source = ModbusSource(NAME, cfg(port=device.port, poll_ms=100, backoff_min_s=0.2,
                                        backoff_max_s=0.2), addresses, metrics)
        emit = Collector()
        async with running(source, emit):
            await emit.until(lambda: bool(emit.of("u3/hr/5:uint16")))
            await asyncio.sleep(1.0)
            polls_while_busy = sum(1 for u, *_ in device.seen() if u == 3)
            device.busy.discard(3)
            await emit.until(lambda: emit.of("u3/hr/5:uint16")[-1].quality is Quality.GOOD)
    first = emit.of("u3/hr/5:uint16")[0]
    assert first.quality is Quality.BAD and first.status == 6
    assert 4 <= polls_while_busy <= 8  # every 0.2 s, not every 0.1 s
    assert metrics.value("modbus_exceptions_total", connection=NAME, code="6") >= 4
    assert all(s.quality is Quality.GOOD for s in emit.of("u1/hr/5:uint16"))


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_an_illegal_address_is_a_permanent_config_problem() -> None:
    """Holding registers 200..249 do not exist. A coalesced read that bridges into the hole is
    split; the value inside it is reported BAD (status 2) once, logged as a configuration
    problem, and not asked for again; the rest keeps being read."""
    metrics = Metrics()
    with structlog.testing.capture_logs() as logged:
        async with serving() as device:
            device.set_words(1, "holding_register", 195, [7])
            addresses = [addr(table="holding_register", address=195, type="uint16"),
                         addr(table="holding_register", address=205, type="uint16"),
                         addr(table="holding_register", address=260, type="uint16")]
            source = ModbusSource(NAME, cfg(port=device.port, poll_ms=100), addresses, metrics)
            assert [(r.start, r.count) for r in source.requests] == [(195, 11), (260, 1)]
            emit = Collector()
            async with running(source, emit):
                await emit.until(lambda: len(emit.of("u1/hr/195:uint16")) >= 5)
                stopped = metrics.snapshot()["modbus_reads_stopped"]
            requests = device.seen()
    assert requests.count((1, 3, 195, 11)) == 1   # the coalesced read, refused once
    assert requests.count((1, 3, 205, 1)) == 1    # its bad part alone, refused once
    assert requests.count((1, 3, 195, 1)) >= 5    # its good part, polled on
    assert stopped == 1.0
    bad = emit.of("u1/hr/205:uint16")
    assert len(bad) == 1 and bad[0].quality is Quality.BAD and bad[0].status == 2
    assert all(s.quality is Quality.GOOD for s in emit.of("u1/hr/195:uint16"))
    assert emit.of("u1/hr/195:uint16")[-1].value == 7
    assert all(s.quality is Quality.GOOD for s in emit.of("u1/hr/260:uint16"))
    problems = [e for e in logged if e["event"] == "modbus.config_problem"]
    assert len(problems) == 1
    problem = problems[0]
    assert (problem["unit"], problem["table"], problem["first"], problem["last"]) == \
        (1, "holding_register", 205, 205)
    assert "illegal data address" in problem["reason"]
    assert problem["log_level"] == "error"
    assert [e["event"] for e in logged].count("modbus.coalesced_read_refused") == 1
    assert [e["event"] for e in logged].count("modbus.unit_down") == 0


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_late_polls_are_counted_never_silently_skipped() -> None:
    """The pipeline stalls (emit takes 0.35 s) a 100 ms read: each read runs late, once, and
    the ticks it missed are counted."""
    metrics = Metrics()
    async with serving() as device:
        source = ModbusSource(NAME, cfg(port=device.port, poll_ms=100),
                              [addr(table="holding_register", address=0, type="uint16")], metrics)
        emit = Collector(delay_s=0.35)
        async with running(source, emit):
            await emit.until(lambda: len(emit.deliveries) >= 4)
            snapshot = metrics.snapshot()
    assert snapshot["modbus_poll_late_total"] >= 2
    assert snapshot["modbus_polls_skipped_total"] >= 2 * 2  # three ticks missed per read
    assert snapshot["modbus_poll_lag_seconds"] >= 0.2
    assert metrics.value("modbus_poll_lag_seconds_bucket", connection=NAME, le="+Inf") >= 4
    assert len(device.seen()) == len(emit.deliveries) or \
        len(device.seen()) == len(emit.deliveries) + 1  # one read per delivery, no burst


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_server_gone_then_back_raises_then_recovers_in_the_next_run() -> None:
    metrics = Metrics()
    port = free_port()
    addresses = [addr(table="holding_register", address=3, type="uint16"),
                 addr(unit=2, table="coil", address=1)]
    source = ModbusSource(NAME, cfg(port=port, poll_ms=100, timeout_ms=300), addresses, metrics)
    emit = Collector()
    with structlog.testing.capture_logs() as logged:
        async with serving(port) as device:
            device.set_words(1, "holding_register", 3, [11])
            task = asyncio.create_task(source.run(emit))
            await emit.until(lambda: len(emit.deliveries) >= 4)
            assert metrics.snapshot()["modbus_connected"] == 1.0
            await device.stop()
            with pytest.raises(SourceUnavailable, match="Lost Modbus connection press_modbus"):
                await asyncio.wait_for(task, 5)
        last = emit.deliveries[-1]
        assert sorted(s.tag for s in last.signals) == ["u1/hr/3:uint16", "u2/co/1:bool"]
        assert all(s.quality is Quality.BAD and s.status == "connection lost"
                   for s in last.signals)
        assert metrics.snapshot()["modbus_connected"] == 0.0
        # nobody listens: the next run cannot connect; no second BAD delivery in this outage
        count = len(emit.deliveries)
        with pytest.raises(SourceUnavailable, match="Cannot reach Modbus device press_modbus"):
            await source.run(emit)
        assert len(emit.deliveries) == count
        # the device is back: the next run reads again
        async with serving(port) as device:
            device.set_words(1, "holding_register", 3, [12])
            async with running(source, emit):
                await emit.until(lambda: emit.of("u1/hr/3:uint16")[-1].value == 12
                                 and emit.of("u2/co/1:bool")[-1].quality is Quality.GOOD)
                assert emit.of("u1/hr/3:uint16")[-1].quality is Quality.GOOD
    events = [e["event"] for e in logged]
    assert events.count("modbus.connected") == 2
    assert events.count("modbus.connection_lost") == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_cannot_reach_names_the_reason() -> None:
    port = free_port()
    source = ModbusSource(NAME, cfg(port=port, timeout_ms=300),
                          [addr(table="holding_register", address=0, type="uint16")], Metrics())
    emit = Collector()
    with pytest.raises(SourceUnavailable) as info:
        await source.run(emit)
    assert f"Cannot reach Modbus device press_modbus at 127.0.0.1:{port}" in str(info.value)
    assert str(info.value).endswith(": Connection refused")
    assert [s.status for s in emit.signals] == ["connection lost"]


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_supervisor_restarts_the_source_after_a_restart_of_the_device() -> None:
    from gateway.app.supervisor import State, Supervisor

    metrics = Metrics()
    port = free_port()
    source = ModbusSource(NAME, cfg(port=port, poll_ms=100, reconnect_min_s=0.1,
                                    reconnect_max_s=0.2),
                          [addr(table="holding_register", address=0, type="uint16")], metrics)
    emit = Collector()
    supervisor = Supervisor(metrics, healthy_after_s=1.0)
    async with serving(port) as device:
        device.set_words(1, "holding_register", 0, [1])
        job = asyncio.create_task(supervisor.supervise(
            NAME, "modbus", lambda: source.run(emit), running_after_s=0.2,
            min_backoff_s=0.1, max_backoff_s=0.2))
        try:
            await emit.until(lambda: bool(emit.of("u1/hr/0:uint16")))
            await device.stop()
            await emit.until(lambda: emit.signals[-1].quality is Quality.BAD)
            await device.start()
            device.set_words(1, "holding_register", 0, [2])
            await emit.until(lambda: emit.signals[-1].value == 2, timeout_s=10)
            await asyncio.sleep(0.3)
            assert supervisor.components[NAME].state is State.RUNNING
            assert supervisor.components[NAME].restarts >= 1
        finally:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_rtu_over_tcp() -> None:
    """RTU frames (CRC, no MBAP header) through a TCP socket, as a serial device server
    passes them on."""
    async with serving(framer=FramerType.RTU) as device:
        device.set_words(2, "holding_register", 10, codec.encode(-1.25, "float32", "CDAB"))
        device.set_words(2, "holding_register", 12, [0xBEEF])
        device.set_bit(2, "coil", 7, True)
        addresses = [addr(unit=2, table="holding_register", address=10, type="float32",
                          order="CDAB"),
                     addr(unit=2, table="holding_register", address=12, type="uint16"),
                     addr(unit=2, address="00008")]
        source = ModbusSource(NAME, cfg(transport="rtu_over_tcp", port=device.port,
                                        poll_ms=100), addresses, Metrics())
        emit = Collector()
        async with running(source, emit):
            await emit.until(lambda: len(emit.latest()) == 3)
        assert device.seen()[:2] == [(2, 1, 7, 1), (2, 3, 10, 3)]
    assert {t: s.value for t, s in emit.latest().items()} == {
        "u2/hr/10:float32:CDAB": -1.25, "u2/hr/12:uint16": 0xBEEF, "u2/co/7:bool": True}


@pytest.fixture
def pty_pair(tmp_path: Any) -> Any:
    """Two pseudo-terminals wired together by socat: a serial line in software."""
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed")
    pytest.importorskip("serial", reason="transport rtu needs pyserial (pymodbus[serial])")
    device_side, gateway_side = tmp_path / "device", tmp_path / "gateway"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={device_side}", f"pty,raw,echo=0,link={gateway_side}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not (device_side.exists() and gateway_side.exists()):
            if time.monotonic() > deadline:
                pytest.fail("socat did not create the pseudo-terminals")
            time.sleep(0.02)
        yield str(device_side), str(gateway_side)
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_rtu_on_a_serial_line(pty_pair: tuple[str, str]) -> None:
    """Modbus RTU over a pseudo-terminal pair (115200 8N2; Linux ptys refuse parity being
    set twice, which pyserial does): two units on one line, one of them silent, the other
    read on at its rate."""
    device_side, gateway_side = pty_pair
    device = Device(0, (1, 2), serial_port=device_side)
    await device.start()
    try:
        device.set_words(1, "input_register", 0, codec.encode("RTU!", "string", length=4))
        device.set_words(1, "input_register", 2, codec.encode(-7, "int32"))
        device.dead.add(2)
        config = ModbusConnectionConfig.model_validate({
            "protocol": "modbus", "transport": "rtu", "serial_port": gateway_side,
            "baudrate": 115200, "parity": "none", "stopbits": 2, "timeout_ms": 200, "retries": 0,
            "poll_ms": 200, "backoff_min_s": 0.5, "backoff_max_s": 0.5})
        addresses = [addr(unit=1, table="input_register", address=0, type="string", length=4),
                     addr(unit=1, table="input_register", address=2, type="int32"),
                     addr(unit=2, table="holding_register", address=0, type="uint16")]
        source = ModbusSource(NAME, config, addresses, Metrics())
        emit = Collector()
        async with running(source, emit):
            await emit.until(lambda: len(emit.latest()) == 3)
            started = time.monotonic()
            await asyncio.sleep(1.5)
            healthy = device.times(1, started)
    finally:
        await device.stop()
    latest = emit.latest()
    assert latest["u1/ir/0:string[4]"].value == "RTU!"
    assert latest["u1/ir/2:int32"].value == -7
    assert latest["u2/hr/0:uint16"].quality is Quality.BAD
    assert latest["u2/hr/0:uint16"].status == "timeout"
    gaps = [b - a for a, b in itertools.pairwise(healthy)]
    assert len(gaps) >= 5 and max(gaps) < 0.2 + 0.12, gaps
