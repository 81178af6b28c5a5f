"""Modbus source (pymodbus): coalesced polling of coils and registers, per-unit fault isolation.

Connection settings (:class:`ModbusConnectionConfig`) live in ``config/gateway.yaml`` under
``connections``; what to read (:class:`ModbusAddress`) lives in the mapping files. How
registers become values (types, byte and word orders) is :mod:`gateway.sources.modbus_codec`.

Addressing
    An address names a unit (the unit id, "slave id"), a table (``coil``, ``discrete_input``,
    ``input_register``, ``holding_register``) and the zero-based protocol address, as sent on
    the wire. HMI/Modicon references (``40001`` = holding register 0, ``30001`` = input register
    0, ``10001`` = discrete input 0, ``'00001'`` = coil 0; six-digit forms ``400001`` up to
    ``465536`` too) are accepted when ``table`` is omitted. A number that reads both ways (say
    ``40001`` with ``table: coil``) is refused with both readings spelled out;
    ``numbering: zero_based`` confirms the protocol address. The canonical form is the Signal's
    ``tag`` (:attr:`ModbusAddress.tag`), e.g. ``u1/hr/100:float32:CDAB``.

Polling plan
    :func:`plan` groups the addresses by unit, table and poll interval and coalesces each group
    into as few reads as possible: a read may bridge up to ``max_gap`` registers nobody asked for
    (16 times that many coils or discrete inputs) and spans at most
    ``max_registers_per_request`` registers (``max_bits_per_request`` bits). A value is never
    split over two reads. :func:`describe_plan` prints it (for ``validate --plan``).

Scheduling
    One link executes one request at a time (a serial bus can do no better, and pymodbus
    serialises a TCP connection too). Each read has its own interval and due time, kept in
    phase (no drift). A read's lag (how long after its due time it started, queueing behind
    the other reads of its cycle on the link included: the staleness it adds) goes to
    ``modbus_poll_lag_seconds`` (the worst lag of the last minute, all Modbus connections) and
    ``modbus_poll_lag_seconds_bucket{le}``. A read that starts more than a tenth of its interval
    after both its due time and the end of the link's previous request (the gateway was slow,
    not the link busy) is counted in ``modbus_poll_late_total``. A read
    more than one whole interval late runs once and the ticks it missed are counted in
    ``modbus_polls_skipped_total``: never silently dropped. Each response is one
    :class:`~gateway.sources.base.Delivery` (``ack`` None), timed at the response
    (``source_time``); ``emit`` is awaited, so polling waits while the pipeline is behind.

Fault isolation per unit
    A unit that does not answer (after ``retries`` resends of ``timeout_ms`` each) or answers a
    transient exception (4 device failure, 5 acknowledge, 6 busy, 10 gateway path unavailable,
    11 gateway target failed to respond, or any other than 1-3) is *down*: its signals are
    emitted once as BAD (status ``"timeout"`` or the exception code, the reason logged once as
    ``modbus.unit_down``), and it is probed again after ``backoff_min_s``, doubling to
    ``backoff_max_s``. A probe is one attempt (no resends), and it waits while a healthy read is
    due within ``timeout_ms`` (up to one backoff period), so a dead unit costs the others at most
    one timeout per backoff period; the other units keep their rate. When a probe is answered
    the unit is up again (``modbus.unit_recovered``) and all its reads run at once. The gauge
    ``modbus_units_down{connection}`` counts the units down per connection.

Configuration problems (exceptions 1, 2, 3)
    Illegal function, illegal data address and illegal data value are answers about the
    request, not about the unit's health. A coalesced read refused so is split into one read per
    value (it may have bridged a hole in the device's register map). A read of one value still
    refused is a mapping problem: ``modbus.config_problem`` is logged (once per source) naming
    the unit, table and register range, the read is stopped for the rest of the connection and
    its signals are emitted BAD with the exception code as status. The unit stays up.

Reconnect story
    One ``run`` is one connection (TCP socket or serial port). A device that cannot be reached,
    or a connection lost later, makes ``run`` emit one Delivery marking every signal BAD
    (status ``"connection lost"``, once per outage) and raise
    :class:`~gateway.errors.SourceUnavailable`; pymodbus' own reconnect is off, the daemon's
    supervisor backs off (``reconnect_min_s`` .. ``reconnect_max_s``) and calls ``run`` again,
    which starts with every unit up and every read enabled.

Metrics
    ``modbus_requests_total{connection, result}`` (``ok``, ``timeout``, ``exception``,
    ``error``), ``modbus_exceptions_total{connection, code}``,
    ``modbus_registers_read_total{connection}``, ``modbus_bits_read_total{connection}``,
    ``signals_received_total{connection}``, the gauges ``modbus_units_down{connection}``,
    ``modbus_reads_stopped{connection}`` and ``modbus_connected{connection}``, and the poll
    timing above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from gateway import logs
from gateway.configbase import Strict
from gateway.errors import SourceUnavailable
from gateway.metrics import Metrics
from gateway.model import Quality, Signal
from gateway.sources import modbus_codec as codec
from gateway.sources.base import Delivery, Emit

# --- connection -------------------------------------------------------------------------------


class ModbusConnectionConfig(Strict):
    """A Modbus device or gateway: Modbus TCP, RTU on a serial line, or RTU framed over TCP."""

    protocol: Literal["modbus"]
    transport: Literal["tcp", "rtu", "rtu_over_tcp"] = "tcp"
    """``tcp``: Modbus TCP; ``rtu``: RTU on a serial port (RS-485/RS-232, needs pyserial);
    ``rtu_over_tcp``: RTU frames through a TCP socket (a serial device server)."""
    host: str | None = Field(default=None, examples=["10.0.3.17"])
    """Host name or address of the device (``tcp``, ``rtu_over_tcp``)."""
    port: int = Field(default=502, ge=1, le=65535)
    """TCP port (502 by convention)."""
    serial_port: str | None = Field(default=None, examples=["/dev/ttyUSB0", "/dev/ttyS1"])
    """Serial device (``rtu``)."""
    baudrate: int = Field(default=19200, ge=300, le=921600)
    """Serial speed in bit/s (``rtu``)."""
    parity: Literal["none", "even", "odd"] = "even"
    """Serial parity (``rtu``); Modbus RTU's default is even."""
    stopbits: Literal[1, 2] = 1
    """Serial stop bits (``rtu``); 2 is customary with no parity."""
    bytesize: Literal[7, 8] = 8
    """Serial data bits (``rtu``)."""
    timeout_ms: int = Field(default=1000, ge=10, le=60_000)
    """How long to wait for one response (and for the connection to open)."""
    retries: int = Field(default=1, ge=0, le=10)
    """Resends of a request that got no answer before its unit counts as down (0 is fine on
    TCP; 1-2 on a noisy serial line). Each costs up to ``timeout_ms`` of the link's time."""
    poll_ms: int = Field(default=1000, ge=10, le=86_400_000)
    """Default poll interval of the addresses that do not set ``poll_ms``."""
    max_registers_per_request: int = Field(default=125, ge=1, le=125)
    """Most registers one read asks for (the protocol allows 125; some devices fewer)."""
    max_bits_per_request: int = Field(default=2000, ge=1, le=2000)
    """Most coils or discrete inputs one read asks for (the protocol allows 2000)."""
    max_gap: int = Field(default=10, ge=0, le=124)
    """Registers nobody asked for that one read may bridge to save a request (16 times as many
    coils or discrete inputs). 0 reads only adjacent values together; lower it when the
    device refuses reads across holes in its register map (exception 2)."""
    backoff_min_s: float = Field(default=1.0, gt=0, le=3600)
    """First wait before probing a unit that stopped answering; doubles per failed probe."""
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    """Longest wait between probes of a unit that does not answer."""
    reconnect_min_s: float = Field(default=1.0, gt=0)
    """First reconnect delay after a lost connection; doubles up to ``reconnect_max_s``."""
    reconnect_max_s: float = Field(default=60.0, gt=0)
    """Longest reconnect delay."""

    @model_validator(mode="after")
    def _consistent(self) -> ModbusConnectionConfig:
        serial_keys = ("serial_port", "baudrate", "parity", "stopbits", "bytesize")
        if self.transport == "rtu":
            if self.serial_port is None:
                raise ValueError("transport rtu needs serial_port (e.g. /dev/ttyUSB0)")
            if "host" in self.model_fields_set or "port" in self.model_fields_set:
                raise ValueError("host and port apply to transport tcp and rtu_over_tcp; "
                                 "transport rtu uses serial_port")
        else:
            if self.host is None:
                raise ValueError(f"transport {self.transport} needs host (the device's "
                                 f"address or name)")
            misplaced = [key for key in serial_keys if key in self.model_fields_set]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} apply to transport rtu (a serial "
                                 f"line) only")
        if self.backoff_min_s > self.backoff_max_s:
            raise ValueError("backoff_min_s is larger than backoff_max_s")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s is larger than reconnect_max_s")
        return self

    @property
    def where(self) -> str:
        if self.transport == "rtu":
            return f"{self.serial_port} ({self.baudrate} {self.bytesize}{self.parity[0].upper()}"\
                   f"{self.stopbits})"
        return f"{self.host}:{self.port}"


# --- addresses --------------------------------------------------------------------------------

Table = Literal["coil", "discrete_input", "input_register", "holding_register"]
TABLES: tuple[str, ...] = get_args(Table)
BIT_TABLES = frozenset({"coil", "discrete_input"})
TABLE_CODES = {"coil": "co", "discrete_input": "di", "input_register": "ir",
               "holding_register": "hr"}
"""The table's abbreviation in a tag."""
TABLE_TITLES = {"coil": "coils", "discrete_input": "discrete inputs",
                "input_register": "input registers", "holding_register": "holding registers"}
FUNCTION_CODES = {"coil": 1, "discrete_input": 2, "holding_register": 3, "input_register": 4}
HMI_TABLES = {0: "coil", 1: "discrete_input", 3: "input_register", 4: "holding_register"}
"""First digit of an HMI/Modicon reference -> table."""
MAX_ADDRESS = 65535

Order = Literal["AB", "BA", "ABCD", "CDAB", "BADC", "DCBA",
                "ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"]


def _hmi_help() -> str:
    return ("0xxxx coils, 1xxxx discrete inputs, 3xxxx input registers, 4xxxx holding "
            "registers, counted from 1; six-digit forms 400001..465536 too")


def parse_hmi(ref: int | str) -> tuple[str, int]:
    """``(table, zero-based address)`` of an HMI/Modicon reference: ``40001`` -> holding
    register 0, ``'00017'`` (or the number 17) -> coil 16, ``300100`` -> input register 99.

    Raises:
        ValueError: not such a reference, worded for the mapping file.
    """
    if isinstance(ref, str):
        text = ref.strip()
        if not (text.isascii() and text.isdigit()) or len(text) not in (5, 6):
            raise ValueError(f"{ref!r} is not an HMI reference: five or six digits "
                             f"({_hmi_help()})")
    else:
        if ref < 1 or ref > 465536:
            raise ValueError(f"{ref} is not an HMI reference ({_hmi_help()})")
        text = f"{ref:05d}"
    prefix, number = int(text[0]), int(text[1:])
    table = HMI_TABLES.get(prefix)
    if table is None:
        raise ValueError(f"{text} is not an HMI reference: {prefix}xxxx is no Modbus table "
                         f"({_hmi_help()})")
    limit = 9999 if len(text) == 5 else MAX_ADDRESS + 1
    if not 1 <= number <= limit:
        first = f"{prefix}0001" if len(text) == 5 else f"{prefix}00001"
        raise ValueError(f"{text} is not an HMI reference: HMI numbers count from 1 "
                         f"({first} is the first of the {TABLE_TITLES[table]})")
    return table, number - 1


class ModbusAddress(Strict):
    """Which coil, discrete input or register(s) of which unit a signal reads, and how."""

    unit: int = Field(default=1, ge=0, le=255)
    """Unit identifier ("slave id"): 1-247 on a serial line; a TCP device usually answers 1 or
    255 (see its manual); a TCP gateway passes it to the serial device with that id."""
    table: Table | None = None
    """``coil``, ``discrete_input``, ``input_register`` or ``holding_register``. Omit it to
    give ``address`` as an HMI reference (40001 = holding register 0)."""
    address: int | str = Field(examples=[100, 40101, "00017"])
    """With ``table``: the zero-based protocol address (0-65535), as sent on the wire. Without:
    an HMI/Modicon reference, counted from 1: 40001.. holding registers, 30001.. input
    registers, 10001.. discrete inputs, '00001'.. coils (quoted: YAML drops leading zeros);
    six-digit forms (400001..465536) too."""
    numbering: Literal["auto", "zero_based", "hmi"] = "auto"
    """``auto``: ``address`` is zero-based with ``table`` and an HMI reference without; a
    number that reads both ways is refused. ``zero_based`` or ``hmi`` settle it."""
    type: codec.DataType | None = Field(default=None, examples=["float32", "uint16", "bool"])
    """How to read the value: ``bool`` (a coil or discrete input, or ``bit`` of a register),
    ``int16``, ``uint16``, ``int32``, ``uint32``, ``int64``, ``uint64``, ``float32``,
    ``float64`` or ``string``. Required for registers; coils and discrete inputs are bool."""
    order: Order | None = Field(default=None, examples=["CDAB", "ABCD"])
    """Byte and word order of a multi-byte value, the bytes from most significant (A) as they
    arrive: 32-bit ABCD (big-endian, the default), CDAB (word swap), BADC (byte swap), DCBA
    (little-endian); 64-bit ABCDEFGH, GHEFCDAB, BADCFEHG, HGFEDCBA; 16-bit and strings AB
    (default) or BA."""
    bit: int | None = Field(default=None, ge=0, le=15)
    """For ``type: bool`` in a register: the bit, 0 (least significant) to 15."""
    length: int | None = Field(default=None, ge=1, le=codec.MAX_STRING_LENGTH)
    """For ``type: string``: characters (one byte each, two per register)."""
    poll_ms: int | None = Field(default=None, ge=10, le=86_400_000, examples=[1000, 100])
    """Poll interval of this value; default the connection's ``poll_ms``."""

    @field_validator("address", mode="before")
    @classmethod
    def _address_kind(cls, value: Any) -> int | str:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected a register number such as 100 or 40101, got "
                             f"{value!r}")
        if isinstance(value, str) and not (value.strip().isascii() and value.strip().isdigit()):
            raise ValueError(f"expected a register number such as 100 or 40101, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModbusAddress:
        table, start = self.location
        kind = self.type
        if table in BIT_TABLES:
            if kind not in (None, "bool"):
                raise ValueError(f"a {table.replace('_', ' ')} is one bit: its type is bool, "
                                 f"not {kind} (registers are input_register and "
                                 f"holding_register)")
            for key in ("bit", "order", "length"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to registers, not to a "
                                     f"{table.replace('_', ' ')}")
            return self
        if kind is None:
            raise ValueError(
                f"say how to read the {TABLE_TITLES[table][:-1]}: type: int16, uint16, int32, "
                f"uint32, int64, uint64, float32, float64, string or bool (with bit)")
        if kind == "bool" and self.bit is None:
            raise ValueError("type bool on a register needs bit: which bit (0 = least "
                             "significant, 15 = most significant)")
        try:
            lay = codec.layout(kind, self.order, bit=self.bit, length=self.length)
        except codec.CodecError as exc:
            raise ValueError(str(exc)) from None
        end = start + lay.registers - 1
        if end > MAX_ADDRESS:
            raise ValueError(f"a {kind} at {start} needs registers up to {end}; the last "
                             f"Modbus address is {MAX_ADDRESS}")
        return self

    @property
    def location(self) -> tuple[str, int]:
        """``(table, zero-based address)`` as resolved from ``table``, ``address`` and
        ``numbering``.

        Raises:
            ValueError: the address is invalid or ambiguous (the message says both readings).
        """
        return _resolve(self.table, self.address, self.numbering)

    @property
    def layout(self) -> codec.Layout:
        """The value's layout (a coil or discrete input: one bit)."""
        table, _ = self.location
        if table in BIT_TABLES:
            return codec.layout("bool")
        return codec.layout(self.type or "uint16", self.order, bit=self.bit, length=self.length)

    @property
    def tag(self) -> str:
        """The canonical address: ``u<unit>/<co|di|ir|hr>/<address>[.<bit>]:<type>[:<order>]``
        with the zero-based address and the order when it is not the default, e.g.
        ``u1/hr/100:float32:CDAB``, ``u1/hr/7.3:bool``, ``u2/co/16:bool``,
        ``u1/ir/20:string[12]``."""
        table, start = self.location
        lay = self.layout
        text = f"u{self.unit}/{TABLE_CODES[table]}/{start}"
        if lay.bit is not None:
            text += f".{lay.bit}"
        text += f":{lay.type}"
        if lay.type == "string":
            text += f"[{lay.length}]"
        if lay.order is not None and lay.order != codec.default_order(lay.type):
            text += f":{lay.order}"
        return text


def _resolve(table: str | None, address: int | str, numbering: str) -> tuple[str, int]:
    if numbering == "zero_based":
        if table is None:
            raise ValueError("numbering: zero_based needs table (coil, discrete_input, "
                             "input_register or holding_register)")
        number = int(address)
        if not 0 <= number <= MAX_ADDRESS:
            raise ValueError(f"address {number} is outside 0..{MAX_ADDRESS}")
        return table, number
    if numbering == "hmi" or isinstance(address, str) or table is None:
        if numbering == "auto" and table is None and isinstance(address, int) and address < 10001:
            raise ValueError(_which_table(address))
        hmi_table, number = parse_hmi(address)
        if table is not None and table != hmi_table:
            raise ValueError(
                f"address {address} is {TABLE_TITLES[hmi_table][:-1]} {number} in HMI "
                f"numbering, but table is {table}; drop table (the reference says it), or "
                f"give the zero-based address of the {table.replace('_', ' ')}")
        return hmi_table, number
    if address <= MAX_ADDRESS:
        reading: tuple[str, int] | None = None
        if address >= 10001:
            with contextlib.suppress(ValueError):
                reading = parse_hmi(address)
        if reading is not None and reading[0] != table:
            raise ValueError(_ambiguous(table, address, *reading))
        return table, address
    try:
        hmi_table, number = parse_hmi(address)
    except ValueError:
        raise ValueError(f"address {address} is above {MAX_ADDRESS}, the last Modbus address, "
                         f"and no HMI reference either ({_hmi_help()})") from None
    if hmi_table != table:
        raise ValueError(
            f"address {address} can only be an HMI reference, to {TABLE_TITLES[hmi_table][:-1]} "
            f"{number}, but table is {table}; drop table, or give the zero-based address")
    return table, number


def _ambiguous(table: str, address: int, hmi_table: str, number: int) -> str:
    return (
        f"address {address} with table: {table} is ambiguous: in HMI numbering {address} is "
        f"{TABLE_TITLES[hmi_table][:-1]} {number} (zero-based), while with table the address "
        f"counts the {TABLE_TITLES[table]} from 0. For the {TABLE_TITLES[hmi_table][:-1]} write "
        f"table: {hmi_table}, address: {number} (or address: {address} without table); for "
        f"{table.replace('_', ' ')} number {address} counted from 0 add numbering: zero_based")


def _which_table(address: int) -> str:
    n = address
    return (
        f"address {n} does not say which table: give table with the zero-based address "
        f"(table: holding_register, address: {n}), or an HMI reference: {40001 + n} = holding "
        f"register {n}, {30001 + n} = input register {n}, {10001 + n} = discrete input {n}. "
        f"Coils in HMI numbering start with 0 ({n + 1:05d} = coil {n}), which YAML reads as "
        f"{n + 1}: quote it (address: '{n + 1:05d}') or write table: coil, address: {n}")


_FITS: dict[str, frozenset[str]] = {
    "bool": frozenset({"boolean", "string"}),
    "float32": frozenset({"float", "string"}),
    "float64": frozenset({"float", "string"}),
    "string": frozenset({"string"}),
}
_INTEGER_FITS = frozenset({"integer", "float", "boolean", "string"})


def signal_type_problem(address: ModbusAddress, signal_type: str) -> str | None:
    """Why a mapping signal of ``signal_type`` (``float``, ``integer``, ``boolean``,
    ``string``) cannot take what ``address`` reads, or None when it can; for the loader's
    lint (every reading would otherwise be a conversion error)."""
    kind = address.layout.type
    if signal_type in _FITS.get(kind, _INTEGER_FITS):
        return None
    if kind == "bool":
        return ("a coil, discrete input or register bit reads true/false: declare the signal "
                "boolean")
    if kind.startswith("float"):
        return (f"a {kind} reads numbers with fractions: declare the signal float, or read the "
                f"register(s) as an integer type (int16, uint16, int32, ...)")
    if kind == "string":
        return "a string reads text: declare the signal string"
    return f"a {kind} reads whole numbers: declare the signal integer or float"


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """One value of a read: its tag, layout and place."""

    tag: str
    layout: codec.Layout
    start: int
    """Zero-based address of its first register (or its bit)."""
    count: int
    """Registers (or bits) it occupies."""

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True, slots=True)
class Request:
    """One read: a function code, a range, a period, and the values it carries."""

    unit: int
    table: str
    start: int
    count: int
    poll_ms: int
    members: tuple[Member, ...]

    @property
    def function_code(self) -> int:
        return FUNCTION_CODES[self.table]

    @property
    def bits(self) -> bool:
        return self.table in BIT_TABLES

    @property
    def last(self) -> int:
        return self.start + self.count - 1

    @property
    def span(self) -> str:
        """``unit 1 holding registers 100..109``."""
        where = f"{self.start}" if self.count == 1 else f"{self.start}..{self.last}"
        return f"unit {self.unit} {TABLE_TITLES[self.table]} {where}"

    def describe(self) -> str:
        """One line: ``unit 1 holding registers 100..109 (10) every 1000 ms (fc 3): <tags>``."""
        tags = ", ".join(m.tag for m in self.members)
        return (f"{self.span} ({self.count}) every {self.poll_ms} ms "
                f"(fc {self.function_code}): {tags}")

    def split(self) -> list[Request]:
        """One read per distinct value range (members sharing a range stay together)."""
        by_range: dict[tuple[int, int], list[Member]] = {}
        for m in self.members:
            by_range.setdefault((m.start, m.count), []).append(m)
        return [Request(self.unit, self.table, start, count, self.poll_ms, tuple(ms))
                for (start, count), ms in sorted(by_range.items())]


def _footprint(address: ModbusAddress) -> tuple[str, int, int]:
    table, start = address.location
    count = 1 if table in BIT_TABLES else address.layout.registers
    return table, start, count


def plan(addresses: Iterable[ModbusAddress], config: ModbusConnectionConfig) -> list[Request]:
    """The reads that cover ``addresses``: grouped by (unit, table, poll interval), each group
    coalesced into as few reads as the limits allow (``max_registers_per_request`` /
    ``max_bits_per_request``, bridging at most ``max_gap`` unread registers, 16 times that many
    bits). Duplicate tags are read once. Sorted by unit, table, interval and address.

    Raises:
        ValueError: a value larger than one read may be (a string longer than
            ``max_registers_per_request`` registers).
    """
    groups: dict[tuple[int, str, int], dict[str, Member]] = {}
    for address in addresses:
        table, start, count = _footprint(address)
        limit = config.max_bits_per_request if table in BIT_TABLES else \
            config.max_registers_per_request
        if count > limit:
            raise ValueError(
                f"{address.tag} needs {count} registers, more than one read may ask for "
                f"(max_registers_per_request: {limit})")
        key = (address.unit, table, address.poll_ms or config.poll_ms)
        members = groups.setdefault(key, {})
        members.setdefault(address.tag, Member(address.tag, address.layout, start, count))
    out: list[Request] = []
    for (unit, table, poll_ms), by_tag in sorted(
            groups.items(), key=lambda kv: (kv[0][0], TABLES.index(kv[0][1]), kv[0][2])):
        bits = table in BIT_TABLES
        limit = config.max_bits_per_request if bits else config.max_registers_per_request
        gap = config.max_gap * 16 if bits else config.max_gap
        current: list[Member] = []
        first = end = 0
        for m in sorted(by_tag.values(), key=lambda m: (m.start, -m.count, m.tag)):
            if current and m.start - end <= gap and max(end, m.end) - first <= limit:
                current.append(m)
                end = max(end, m.end)
                continue
            if current:
                out.append(Request(unit, table, first, end - first, poll_ms, tuple(current)))
            current, first, end = [m], m.start, m.end
        if current:
            out.append(Request(unit, table, first, end - first, poll_ms, tuple(current)))
    return out


def describe_plan(name: str, requests: Sequence[Request]) -> str:
    """The plan of one connection as text, one read per line (``validate --plan``)."""
    signals = sum(len(r.members) for r in requests)
    per_s = sum(1000.0 / r.poll_ms for r in requests)
    head = (f"{name}: {len(requests)} read(s) for {signals} value(s), "
            f"{per_s:.3g} requests/s")
    return "\n".join([head, *(f"  {r.describe()}" for r in requests)])


# --- exceptions -------------------------------------------------------------------------------

EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge (busy with a long command)",
    6: "server device busy", 7: "negative acknowledge", 8: "memory parity error",
    10: "gateway path unavailable", 11: "gateway target device failed to respond",
}
PERMANENT_EXCEPTIONS = frozenset({1, 2, 3})
"""Answers about the request itself: a mapping problem, not the unit's health."""

_CONFIG_HINTS = {
    1: "the device does not support reading this table (function code {fc}); check the table",
    2: "the device has no such address; check table, address and numbering (zero-based vs "
       "HMI) against its register map",
    3: "the device refuses this read's size or range; check the type, length and address",
}


def exception_text(code: int) -> str:
    return f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown exception')})"


# --- the source -------------------------------------------------------------------------------

LATE_FRACTION = 0.1
"""A read starting more than this fraction of its interval after its due time is late."""
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, math.inf)
"""Upper bounds (seconds) of ``modbus_poll_lag_seconds_bucket``."""
LAG_WINDOW_S = 60.0
"""``modbus_poll_lag_seconds`` shows the worst lag of the last one to two windows."""
SAFETY_S = 2.0
"""Extra time past ``timeout_ms`` x (``retries`` + 1) before a request is abandoned anyway."""

STATUS_TIMEOUT = "timeout"
STATUS_LOST = "connection lost"


class _LagWindow:
    """The worst poll lag of the current and the previous window."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.current = 0.0
        self.previous = 0.0

    def _roll(self, now: float) -> None:
        if now - self.start >= LAG_WINDOW_S:
            self.previous = self.current if now - self.start < 2 * LAG_WINDOW_S else 0.0
            self.current, self.start = 0.0, now

    def add(self, lag: float, now: float) -> None:
        self._roll(now)
        self.current = max(self.current, lag)

    def read(self) -> float:
        self._roll(time.monotonic())
        return max(self.current, self.previous)


@dataclass(slots=True)
class _Shared:
    """Per Metrics registry: what the Modbus gauges sum over all connections."""

    down: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, int] = field(default_factory=dict)
    connected: dict[str, bool] = field(default_factory=dict)
    lag: dict[str, _LagWindow] = field(default_factory=dict)


_SHARED: weakref.WeakKeyDictionary[Metrics, _Shared] = weakref.WeakKeyDictionary()


def _shared(metrics: Metrics) -> _Shared:
    shared = _SHARED.get(metrics)
    if shared is None:
        shared = _SHARED[metrics] = _Shared()
        metrics.describe("modbus_units_down", "Modbus units not answering (backed off)")
        metrics.describe("modbus_reads_stopped",
                         "Modbus reads stopped as configuration problems (exceptions 1-3)")
        metrics.describe("modbus_connected", "1 while the Modbus connection is open")
        metrics.gauge("modbus_poll_lag_seconds",
                      lambda: max((w.read() for w in shared.lag.values()), default=0.0),
                      "Worst delay of a Modbus read past its due time, last 1-2 minutes")
        metrics.describe("modbus_requests_total", "Modbus requests by result")
        metrics.describe("modbus_poll_late_total",
                         "Modbus reads started more than a tenth of their interval late")
        metrics.describe("modbus_polls_skipped_total",
                         "Modbus poll ticks missed by reads more than one interval late")
        metrics.describe("modbus_poll_lag_seconds_bucket",
                         "Modbus reads by delay past their due time (cumulative, le=seconds)")
    return shared


class ModbusSource:
    """Polls its addresses on one Modbus connection; see the module docstring."""

    def __init__(self, name: str, config: ModbusConnectionConfig,
                 addresses: Sequence[ModbusAddress], metrics: Metrics) -> None:
        if not addresses:
            raise ValueError(f"Modbus connection {name} has no address to read")
        self.name = name
        self.config = config
        self.requests = plan(addresses, config)
        self._metrics = metrics
        self._log = logs.get("modbus", source=name)
        self._shared = _shared(metrics)
        self._shared.down.setdefault(name, 0)
        self._shared.stopped.setdefault(name, 0)
        self._shared.connected.setdefault(name, False)
        shared = self._shared
        metrics.gauge("modbus_units_down", lambda: float(shared.down.get(name, 0)),
                      connection=name)
        metrics.gauge("modbus_reads_stopped", lambda: float(shared.stopped.get(name, 0)),
                      connection=name)
        metrics.gauge("modbus_connected", lambda: float(shared.connected.get(name, False)),
                      connection=name)
        self._lag = self._shared.lag.setdefault(name, _LagWindow())
        self._marked_bad = False
        self._reported: set[tuple[int, str, int, int, int]] = set()
        """(unit, table, start, count, code) already logged as a configuration problem."""
        self._link: _Link | None = None
        _quiet_pymodbus()

    @property
    def where(self) -> str:
        return self.config.where

    @property
    def connected(self) -> bool:
        return self._shared.connected.get(self.name, False)

    def describe(self) -> str:
        """The polling plan (``validate --plan``)."""
        return describe_plan(self.name, self.requests)

    async def run(self, emit: Emit) -> None:
        """Connect, then poll and stream deliveries into ``emit`` until cancelled; raise
        SourceUnavailable when the connection cannot be opened or is lost."""
        link = _Link(self, emit)
        self._link = link
        try:
            await link.open()
            self._marked_bad = False
            self._shared.connected[self.name] = True
            self._log.info("modbus.connected", where=self.where, transport=self.config.transport,
                           reads=len(self.requests),
                           values=sum(len(r.members) for r in self.requests))
            await link.poll()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._marked_bad:
                self._marked_bad = True
                await emit(Delivery(self._all_bad(STATUS_LOST)))
            if isinstance(exc, SourceUnavailable) and link.opened:
                self._log.info("modbus.connection_lost", where=self.where, error=str(exc))
            raise
        finally:
            self._link = None
            self._shared.connected[self.name] = False
            self._shared.down[self.name] = 0
            self._shared.stopped[self.name] = 0
            link.close()

    def _all_bad(self, status: str) -> list[Signal]:
        now = time.time()
        return [Signal(self.name, m.tag, None, Quality.BAD, status, receive_time=now)
                for r in self.requests for m in r.members]


@dataclass(slots=True)
class _Unit:
    id: int
    delay: float
    down: bool = False
    since: float = 0.0
    retry_at: float = 0.0
    silent: bool = False
    """Its last failure was a timeout: a probe may hold the link for ``timeout_ms``."""


@dataclass(slots=True)
class _Poll:
    request: Request
    interval: float
    due: float
    stopped: bool = False


@dataclass(slots=True)
class _Result:
    kind: Literal["ok", "timeout", "exception", "error"]
    values: list[int] | list[bool] | None = None
    code: int = 0
    reason: str = ""


class _Link:
    """One connection of a :class:`ModbusSource`: the client and the poll loop."""

    def __init__(self, source: ModbusSource, emit: Emit) -> None:
        self.src = source
        self.cfg = source.config
        self.emit = emit
        self.client: Any = None
        self.opened = False
        self.lost: str | None = None
        self._inflight: asyncio.Task[Any] | None = None
        self._wake = asyncio.Event()
        now = time.monotonic()
        self.polls = [_Poll(r, r.poll_ms / 1000.0, now) for r in source.requests]
        self.link_free = 0.0
        """When the link finished its last request (monotonic): a read due earlier waited for
        the link, not for the scheduler."""
        self.units = {r.unit: _Unit(r.unit, self.cfg.backoff_min_s) for r in source.requests}
        self.timeout_s = self.cfg.timeout_ms / 1000.0

    # -- connection ---------------------------------------------------------------------------

    async def open(self) -> None:
        cfg, src = self.cfg, self.src
        self.client = _new_client(cfg, src.name, self._on_connection)
        connecting = asyncio.ensure_future(_connect(self.client))
        try:
            ok, reason = await asyncio.shield(connecting)  # see _execute: no lost cancellation
        except asyncio.CancelledError:
            _abandon(connecting)
            raise
        except (OSError, RuntimeError) as exc:  # RuntimeError: pyserial missing
            raise SourceUnavailable(
                f"Cannot open Modbus connection {src.name} at {src.where}: {exc}") from exc
        if not ok or not self.client.connected:
            raise SourceUnavailable(
                f"Cannot reach Modbus device {src.name} at {src.where}: {reason}")
        self.opened = True

    def _on_connection(self, up: bool) -> None:
        """pymodbus' trace_connect: called from its protocol callbacks on the loop."""
        if up or not self.opened:
            return
        self.lost = "the device closed the connection" if self.cfg.transport != "rtu" else \
            "the serial port went away"
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        self._wake.set()

    def close(self) -> None:
        if self.client is not None:
            self.opened = False  # our own close is no loss
            with contextlib.suppress(Exception):
                self.client.close()

    def _check(self) -> None:
        if self.lost is None and self.client is not None and not self.client.connected:
            self.lost = "connection closed"
        if self.lost is not None:
            raise SourceUnavailable(
                f"Lost Modbus connection {self.src.name} at {self.src.where}: {self.lost}")

    # -- scheduling ---------------------------------------------------------------------------

    async def poll(self) -> None:
        start = time.monotonic()
        for p in self.polls:
            p.due = start
        while True:
            self._check()
            now = time.monotonic()
            chosen, probe, wait = self._next(now)
            if chosen is None:
                # asyncio.timeout, not wait_for: 3.11's wait_for can turn a cancellation that
                # coincides with its timeout into TimeoutError, and the source would not stop
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()  # woken early by a lost link
                continue
            await self._run(chosen, probe, now)

    def _next(self, now: float) -> tuple[_Poll | None, bool, float]:
        """The read to run now (and whether it probes a unit that is down), or how long to
        wait for one."""
        healthy: _Poll | None = None
        probe: _Poll | None = None
        probe_unit: _Unit | None = None
        for p in self.polls:
            if p.stopped:
                continue
            unit = self.units[p.request.unit]
            if not unit.down:
                if healthy is None or p.due < healthy.due:
                    healthy = p
            elif probe is None or probe_unit is None or (
                    (unit.retry_at, p.due) < (probe_unit.retry_at, probe.due)):
                probe, probe_unit = p, unit
        next_healthy = healthy.due if healthy is not None else math.inf
        if healthy is not None and next_healthy <= now:
            return healthy, False, 0.0
        if probe is not None and probe_unit is not None and probe_unit.retry_at <= now:
            starved = now - probe_unit.retry_at >= probe_unit.delay
            cost = self.timeout_s if probe_unit.silent else 0.0  # a busy unit answers fast
            if next_healthy - now >= cost or starved:
                return probe, True, 0.0
            return None, False, max(next_healthy - now, 0.0)
        next_probe = probe_unit.retry_at if probe_unit is not None else math.inf
        wait = min(next_healthy, next_probe) - now
        return None, False, max(min(wait, 3600.0), 0.0)

    def _account_lag(self, p: _Poll, started: float) -> None:
        lag = max(started - p.due, 0.0)
        metrics, name = self.src._metrics, self.src.name
        skipped = int(lag // p.interval) if lag >= p.interval else 0
        # Late: started long after the link could take it. Queueing behind the other reads of
        # the same cycle on one link is what a link does (it shows in the lag, not here).
        if started - max(p.due, self.link_free) > p.interval * LATE_FRACTION:
            metrics.inc("modbus_poll_late_total", connection=name)
        if skipped:
            metrics.inc("modbus_polls_skipped_total", skipped, connection=name)
        for bound in LAG_BUCKETS:
            if lag <= bound:
                metrics.inc("modbus_poll_lag_seconds_bucket", connection=name,
                            le="+Inf" if math.isinf(bound) else f"{bound:g}")
        self.src._lag.add(lag, started)
        p.due += (skipped + 1) * p.interval

    async def _run(self, p: _Poll, probe: bool, now: float) -> None:
        unit = self.units[p.request.unit]
        if probe:
            p.due = now + p.interval
        else:
            self._account_lag(p, now)
        result = await self._execute(p.request, probe)
        self.link_free = time.monotonic()
        self._count(p.request, result)
        if result.kind == "ok":
            if unit.down:
                self._recovered(unit)
            await self._deliver(p.request, result)
        elif result.kind == "exception" and result.code in PERMANENT_EXCEPTIONS:
            if unit.down:
                self._recovered(unit)  # it answered: it is up
            await self._refused(p, result.code)
        else:
            await self._failed(unit, result, probe)

    # -- requests -----------------------------------------------------------------------------

    async def _execute(self, request: Request, probe: bool) -> _Result:
        read = {
            "coil": self.client.read_coils,
            "discrete_input": self.client.read_discrete_inputs,
            "holding_register": self.client.read_holding_registers,
            "input_register": self.client.read_input_registers,
        }[request.table]
        ctx = getattr(self.client, "ctx", None)
        retries = self.cfg.retries
        if probe and ctx is not None:
            ctx.retries = 0  # a unit known down gets one attempt per backoff step
        budget = self.timeout_s * ((0 if probe else retries) + 1) + SAFETY_S
        try:
            try:
                task = asyncio.ensure_future(
                    read(request.start, count=request.count, device_id=request.unit))
            except Exception as exc:  # noqa: BLE001 - pymodbus raises when not connected
                return self._error(exc)
            self._inflight = task
            # The read runs as its own task, waited for with asyncio.wait rather than awaited:
            # pymodbus waits for the response with 3.11's wait_for, which returns the response
            # (swallowing the cancellation) when both arrive together; awaited directly, that
            # would lose our own cancellation, and the source would not stop.
            try:
                done, _ = await asyncio.wait({task}, timeout=budget)
            except asyncio.CancelledError:
                _abandon(task)
                raise
        finally:
            self._inflight = None
            if probe and ctx is not None:
                ctx.retries = retries
        if not done:
            _abandon(task)
            return _Result("timeout", reason=f"no answer within {budget:g} s")
        if task.cancelled():  # by _on_connection: the link is gone
            self._check()
            return _Result("error", reason="request cancelled")
        failure = task.exception()
        if failure is not None:
            return self._error(failure)
        response = task.result()
        if response.isError():
            code = int(getattr(response, "exception_code", 0) or 0)
            return _Result("exception", code=code, reason=exception_text(code))
        values = response.bits if request.bits else response.registers
        if values is None or len(values) < request.count:
            got = 0 if values is None else len(values)
            return _Result("error", reason=f"short answer: {got} of {request.count} values")
        return _Result("ok", values=list(values[:request.count]))

    def _error(self, exc: BaseException) -> _Result:
        from pymodbus.exceptions import ConnectionException, ModbusIOException

        if isinstance(exc, ConnectionException) or self.lost is not None:
            self.lost = self.lost or str(exc)
            self._check()
        if isinstance(exc, ModbusIOException):
            tries = self.cfg.retries + 1
            return _Result("timeout", reason=f"no answer within {self.cfg.timeout_ms} ms "
                                             f"({tries} attempt{'s' if tries > 1 else ''})")
        return _Result("error", reason=f"{type(exc).__name__}: {exc}")

    def _count(self, request: Request, result: _Result) -> None:
        metrics, name = self.src._metrics, self.src.name
        metrics.inc("modbus_requests_total", connection=name, result=result.kind)
        if result.kind == "exception":
            metrics.inc("modbus_exceptions_total", connection=name, code=str(result.code))
        elif result.kind == "ok":
            counter = "modbus_bits_read_total" if request.bits else "modbus_registers_read_total"
            metrics.inc(counter, request.count, connection=name)

    # -- outcomes -----------------------------------------------------------------------------

    async def _deliver(self, request: Request, result: _Result) -> None:
        now = time.time()
        values = result.values or []
        signals: list[Signal] = []
        name = self.src.name
        for m in request.members:
            offset = m.start - request.start
            try:
                if request.bits:
                    value: Any = bool(values[offset])
                else:
                    value = m.layout.decode(values[offset:offset + m.count])
            except (codec.CodecError, IndexError, TypeError) as exc:  # a device answering junk
                signals.append(Signal(name, m.tag, None, Quality.BAD, f"undecodable: {exc}",
                                      receive_time=now))
                continue
            signals.append(Signal(name, m.tag, value, Quality.GOOD, None, now, now))
        self.src._metrics.inc("signals_received_total", len(signals), connection=name)
        await self.emit(Delivery(signals))

    async def _failed(self, unit: _Unit, result: _Result, probe: bool) -> None:
        now = time.monotonic()
        unit.silent = result.kind == "timeout"
        if unit.down:
            unit.delay = min(unit.delay * 2, self.cfg.backoff_max_s) if probe else unit.delay
            unit.retry_at = now + unit.delay
            self.src._log.debug("modbus.probe_failed", unit=unit.id, reason=result.reason,
                                retry_in_s=round(unit.delay, 3))
            return
        unit.down, unit.since = True, now
        unit.delay = self.cfg.backoff_min_s
        unit.retry_at = now + unit.delay
        self.src._shared.down[self.src.name] += 1
        status: int | str = result.code if result.kind == "exception" else (
            STATUS_TIMEOUT if result.kind == "timeout" else result.reason)
        self.src._log.warning("modbus.unit_down", where=self.src.where, unit=unit.id,
                              reason=result.reason, retry_in_s=unit.delay)
        stamp = time.time()
        signals = [Signal(self.src.name, m.tag, None, Quality.BAD, status, receive_time=stamp)
                   for p in self.polls if p.request.unit == unit.id and not p.stopped
                   for m in p.request.members]
        if signals:
            await self.emit(Delivery(signals))

    def _recovered(self, unit: _Unit) -> None:
        now = time.monotonic()
        self.src._log.info("modbus.unit_recovered", where=self.src.where, unit=unit.id,
                           down_s=round(now - unit.since, 1))
        unit.down, unit.delay = False, self.cfg.backoff_min_s
        self.src._shared.down[self.src.name] = max(self.src._shared.down[self.src.name] - 1, 0)
        for p in self.polls:
            if p.request.unit == unit.id and p.due < now:
                p.due = now  # its overdue reads run now, not counted late

    async def _refused(self, p: _Poll, code: int) -> None:
        request = p.request
        log = self.src._log
        if len(request.members) > 1 and code in (2, 3):
            parts = request.split()
            if len(parts) > 1:
                log.warning("modbus.coalesced_read_refused", where=self.src.where,
                            read=request.span, reason=exception_text(code), reads=len(parts),
                            hint="reading the values separately; lower max_gap if the device "
                                 "has holes in its register map")
                now = time.monotonic()
                index = self.polls.index(p)
                self.polls[index:index + 1] = [_Poll(r, p.interval, now) for r in parts]
                return
        p.stopped = True
        self.src._shared.stopped[self.src.name] += 1
        key = (request.unit, request.table, request.start, request.count, code)
        if key not in self.src._reported:
            self.src._reported.add(key)
            hint = _CONFIG_HINTS.get(code, "").format(fc=request.function_code)
            hmi = _hmi_hint(request)
            log.error("modbus.config_problem", where=self.src.where, unit=request.unit,
                      table=request.table, first=request.start, last=request.last,
                      reason=exception_text(code), hint=hint + hmi,
                      tags=[m.tag for m in request.members])
        stamp = time.time()
        await self.emit(Delivery([Signal(self.src.name, m.tag, None, Quality.BAD, code,
                                         receive_time=stamp) for m in request.members]))


async def _connect(client: Any) -> tuple[bool, str]:
    """Connect; on failure also say why (pymodbus only logs it: the log line is caught by
    :class:`_PymodbusNoise` right before ``connect`` returns, with no await in between)."""
    _PymodbusNoise.last_failure = ""
    ok = bool(await client.connect())
    return ok, ("" if ok else _plain_reason(_PymodbusNoise.last_failure))


def _plain_reason(text: str) -> str:
    """``[Errno 111] Connect call failed (...)`` -> ``Connection refused``; empty (a timeout)
    -> ``no connection within the timeout``."""
    found = re.search(r"\[Errno (\d+)\]", text)
    if found:
        return os.strerror(int(found.group(1)))
    return text or "no connection within timeout_ms"


def _abandon(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and retrieve its outcome whenever it comes (no "never retrieved")."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _hmi_hint(request: Request) -> str:
    try:
        table, number = parse_hmi(request.start)
    except ValueError:
        return ""
    if table != request.table:
        return ""
    return (f"; if {request.start} is an HMI number, the zero-based address is {number} "
            f"(omit table and write address: {request.start}, or address: {number})")


# --- pymodbus ---------------------------------------------------------------------------------


def _new_client(cfg: ModbusConnectionConfig, name: str, on_connection: Any) -> Any:
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
    from pymodbus.framer import FramerType

    common: dict[str, Any] = {
        "timeout": cfg.timeout_ms / 1000.0, "retries": cfg.retries, "name": f"modbus-{name}",
        "reconnect_delay": 0, "trace_connect": on_connection,
    }
    client: Any
    if cfg.transport == "rtu":
        client = AsyncModbusSerialClient(
            cfg.serial_port or "", framer=FramerType.RTU, baudrate=cfg.baudrate,
            bytesize=cfg.bytesize, parity=cfg.parity[0].upper(), stopbits=cfg.stopbits,
            **common)
    else:
        framer = FramerType.RTU if cfg.transport == "rtu_over_tcp" else FramerType.SOCKET
        client = AsyncModbusTcpClient(cfg.host or "", port=cfg.port, framer=framer, **common)
    # pymodbus closes the connection after a few unanswered requests in a row; one unit behind
    # a gateway not answering is not a lost connection: units are handled here.
    client.set_max_no_responses(1_000_000_000)
    return client


class _PymodbusNoise(logging.Filter):
    """Drops pymodbus' own log lines (per retry, per timeout, with frames) unless the root logger
    is at DEBUG; the source logs each state change once. Keeps the last connect failure, which
    :meth:`_Link.open` reports (pymodbus returns only False)."""

    last_failure = ""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Failed to connect"):
            _PymodbusNoise.last_failure = message.removeprefix("Failed to connect").strip()
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def _quiet_pymodbus() -> None:
    logger = logging.getLogger("pymodbus.logging")
    if not any(isinstance(f, _PymodbusNoise) for f in logger.filters):
        logger.addFilter(_PymodbusNoise())


__all__ = [
    "ModbusAddress",
    "ModbusConnectionConfig",
    "ModbusSource",
    "Request",
    "describe_plan",
    "parse_hmi",
    "plan",
    "signal_type_problem",
]
