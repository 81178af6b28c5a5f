"""``digispine-gateway probe modbus``: read registers once and show what they could mean.

An engineer commissioning a Modbus signal usually knows three things: the connection, an
address from the device's manual or the HMI, and the value the HMI shows right now. What the
manual rarely says plainly is the data type, the byte and word order, the scale and whether its
addresses count from 0 or from 1. The probe reads the registers once (with one neighbour on
each side) and lists every plausible interpretation: each type (``int16`` .. ``float64``, and
``string`` when the bytes are printable text) in each order :mod:`~gateway.sources.modbus_codec`
knows, at the given address and one register either side, times the usual scale factors for
integers. With ``--expect`` (the value on the HMI) they are ranked by closeness to it; the
best one (or ``--pick N``) is printed as a signal entry ready for a mapping file.

The ranking and formatting functions are pure (no I/O) and tested on their own; only
:func:`run` talks to a device. pymodbus is imported when the command runs, not when the CLI
builds its parser.

Exit codes: 0 done (with ``--expect``: a reading within 1% was found); 1 no reading within 1%
of ``--expect``; 64 a bad argument (unknown connection, an address that does not exist); 69 the
device could not be reached or did not answer; 76 the device answered with an exception.
A broken config file is the CLI's usual 78.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from gateway.sources import modbus_codec as codec

if TYPE_CHECKING:
    from gateway.sources.modbus import ModbusConnectionConfig

EX_OK = 0
EX_NO_MATCH = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_PROTOCOL = 76

NUMERIC_TYPES: tuple[str, ...] = ("int16", "uint16", "int32", "uint32", "int64", "uint64",
                                  "float32", "float64")
"""The types tried, in the order of the compact table."""
SCALES: tuple[float, ...] = (1, 0.1, 0.01, 0.001, 10, 100)
"""Scale factors tried on integer types (with ``--expect`` only), simplest first."""
OFFSETS: tuple[int, ...] = (0, -1, 1)
"""Register offsets tried: the address given and one register either side."""
CLOSE = 0.01
"""A reading within this relative distance of the expected value is "close"."""
HUGE = 1e12
"""Readings larger than this are dropped as implausible, unless expected."""
TINY = 1e-6
"""Non-zero floats smaller than this are dropped as implausible, unless expected."""
DEFAULT_COUNT = 4
DEFAULT_TOP = 10

_TABLE_ALIASES = {
    "holding": "holding_register", "holding_register": "holding_register", "hr": "holding_register",
    "input": "input_register", "input_register": "input_register", "ir": "input_register",
    "coil": "coil", "coils": "coil", "co": "coil",
    "discrete": "discrete_input", "discrete_input": "discrete_input", "di": "discrete_input",
}
_HMI_PREFIX = {"coil": 0, "discrete_input": 1, "input_register": 3, "holding_register": 4}
_COLUMNS = ("big-endian", "word swap", "byte swap", "little-endian")
"""Columns of the compact table: index i is the i-th order of every width (codec order)."""
_TYPE_RANK = {t: i for i, t in enumerate(
    ("int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64", "string"))}
_SCALE_RANK = {s: i for i, s in enumerate(SCALES)}


_UNIT_HINTS = {
    4: "some devices answer so for a unit id or a range they do not have; check --unit "
       "({unit}) and the address",
    6: "the device is busy; try again",
    10: "the gateway has no path to unit {unit}; check --unit",
    11: "the gateway got no answer from unit {unit}; check --unit and the serial line behind "
        "the gateway",
}
"""Hints for exceptions about the unit rather than the request (those: modbus.py's)."""


class ProbeError(Exception):
    """One line for the user, and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- what the engineer expects -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expect:
    """The value read off the HMI: a number (with the precision it was typed with) or text."""

    text: str
    number: float | None
    half_unit: float = 0.0
    """Half of the last typed digit (``23.45`` -> 0.005): a reading that rounds to the shown
    value is within this."""

    @classmethod
    def parse(cls, text: str) -> Expect:
        cleaned = text.strip()
        if re.fullmatch(r"[+-]?\d+,\d+", cleaned):  # a decimal comma, as many HMIs show it
            cleaned = cleaned.replace(",", ".")
        try:
            exact = Decimal(cleaned)
        except InvalidOperation:
            return cls(text, None)
        if not exact.is_finite():
            return cls(text, None)
        exponent = exact.as_tuple().exponent
        digits = -exponent if isinstance(exponent, int) and exponent < 0 else 0
        return cls(text, float(exact), 0.5 * 10.0 ** -digits)

    def distance(self, value: codec.Value) -> float:
        """Relative distance of ``value`` (0 = the same); inf for a value of another kind."""
        if self.number is None:
            if not isinstance(value, str):
                return math.inf
            if value == self.text:
                return 0.0
            if value.strip().lower() == self.text.strip().lower():
                return 1e-6
            import difflib

            ratio = difflib.SequenceMatcher(None, value.lower(), self.text.lower()).ratio()
            return 1.0 - ratio
        if isinstance(value, str | bool):
            return math.inf
        diff = abs(float(value) - self.number)
        return diff / abs(self.number) if self.number else diff

    def match(self, value: codec.Value) -> str:
        """``exact``, ``rounds`` (shows as the expected value at its precision) or ``""``."""
        if self.number is None:
            return "exact" if isinstance(value, str) and value == self.text else ""
        if isinstance(value, str | bool):
            return ""
        diff = abs(float(value) - self.number)
        if diff <= 1e-9 * max(1.0, abs(self.number)):
            return "exact"
        if diff <= self.half_unit * (1 + 1e-9):
            return "rounds"
        return ""

    def near(self, value: codec.Value) -> bool:
        return self.distance(value) <= CLOSE


# --- interpretations -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interpretation:
    """One way to read the registers: a type in an order at an address, times a scale."""

    type: str
    order: str | None
    offset: int
    """Registers from the address given: -1, 0 or +1."""
    address: int
    """Zero-based address of the value's first register."""
    scale: float
    raw: codec.Value
    """What the codec decodes, before the scale."""
    value: codec.Value
    length: int | None = None
    """Characters, for ``string``."""
    also: tuple[Interpretation, ...] = ()
    """Other interpretations with the same value (collapsed into this simplest one)."""
    distance: float | None = None
    """Relative distance to the expected value, when there is one."""
    match: str = ""

    @property
    def registers(self) -> int:
        return codec.register_count(self.type, self.length)

    @property
    def label(self) -> str:
        """``float32:CDAB @100``, ``int16 @99 x0.01``: type, order when not the default,
        address, scale when not 1."""
        text = self.type
        if self.type == "string":
            text += f"[{self.length}]"
        if self.order is not None and self.order != codec.default_order(self.type):
            text += f":{self.order}"
        text += f" @{self.address}"
        if self.scale != 1:
            text += f" x{_num(self.scale)}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value, "type": self.type, "order": self.order, "offset": self.offset,
            "address": self.address, "scale": self.scale, "raw": self.raw,
            "length": self.length, "distance": _json_float(self.distance),
            "match": self.match or None, "also": [a.label for a in self.also],
        }


def simplicity(i: Interpretation) -> tuple[int, int, int, int, int]:
    """Sort key, simplest first: the address given, no scale, fewest registers, the default
    order, then signed before unsigned before float."""
    orders = codec.orders_for(i.type)
    order_rank = orders.index(i.order) if i.order in orders else 0
    return (abs(i.offset), _SCALE_RANK.get(i.scale, len(SCALES)), i.registers, order_rank,
            _TYPE_RANK.get(i.type, 99))


def _apply_scale(raw: int, scale: float) -> int | float:
    value = codec.scaled(raw, scale)
    if isinstance(value, float) and scale < 1:
        value = round(value, round(-math.log10(scale)))  # 2345 x 0.01 = 23.45, not ...0003
    return value


def plausible(type_: str, value: codec.Value, expect: Expect | None = None) -> bool:
    """Not NaN, infinite, a denormal float, nor absurdly large (> 1e12) or small (a non-zero
    float under 1e-6), unless near the expected value."""
    if isinstance(value, str | bool):
        return True
    if isinstance(value, float):
        if not math.isfinite(value):
            return False
        smallest = 1.1754943508222875e-38 if type_ == "float32" else sys.float_info.min
        if value != 0 and abs(value) < smallest:
            return False
    if expect is not None and expect.number is not None and expect.near(value):
        return True
    magnitude = abs(value)
    if magnitude > HUGE:
        return False
    return not (type_.startswith("float") and value != 0 and magnitude < TINY)


def _printable(text: str) -> bool:
    return (len(text) >= 2 and all(" " <= c <= "~" for c in text)
            and any(c.isalpha() for c in text))


def interpret(words: Sequence[int], first: int, address: int, *,
              scales: Iterable[float] = (1,), expect: Expect | None = None,
              strings: bool = True) -> list[Interpretation]:
    """Every plausible interpretation of ``words`` (read from ``first``) at ``address`` and
    one register either side: each numeric type in each of its orders, integers times each of
    ``scales``, and (``strings``) the printable text from each start to the end of the read.
    Decoding is :mod:`~gateway.sources.modbus_codec`'s."""
    scales = tuple(scales)
    out: list[Interpretation] = []
    for offset in OFFSETS:
        start = address + offset
        index = start - first
        if index < 0 or index >= len(words):
            continue
        window = words[index:]
        for type_ in NUMERIC_TYPES:
            if codec.REGISTERS[type_] > len(window):
                continue
            for order in codec.orders_for(type_):
                raw = codec.decode(window, type_, order)
                assert isinstance(raw, int | float)
                if type_.startswith("float"):
                    if plausible(type_, raw, expect):
                        out.append(Interpretation(type_, order, offset, start, 1, raw, raw))
                    continue
                assert isinstance(raw, int)
                for scale in scales:
                    value = _apply_scale(raw, scale)
                    if plausible(type_, value, expect):
                        out.append(Interpretation(type_, order, offset, start, scale, raw,
                                                  value))
        if strings:
            for order in codec.ORDERS_16:
                text = codec.decode(window, "string", order, length=len(window) * 2)
                assert isinstance(text, str)
                if _printable(text):
                    out.append(Interpretation("string", order, offset, start, 1, text, text,
                                              length=len(text)))
    return out


def _key(value: codec.Value) -> str:
    if isinstance(value, str):
        return "s:" + value
    return f"n:{float(value):.10g}"


def collapse(candidates: Iterable[Interpretation]) -> list[Interpretation]:
    """One interpretation per distinct value: the simplest, the others in its ``also``
    (simplest first). Sorted by simplicity."""
    groups: dict[str, list[Interpretation]] = {}
    for c in candidates:
        groups.setdefault(_key(c.value), []).append(c)
    out = []
    for group in groups.values():
        group.sort(key=simplicity)
        out.append(dataclasses.replace(group[0], also=tuple(group[1:])))
    out.sort(key=simplicity)
    return out


def rank(candidates: Iterable[Interpretation], expect: Expect) -> list[Interpretation]:
    """The candidates of the expected kind (numbers or text), closest first (then simplest),
    each with its ``distance`` and ``match``."""
    scored = []
    for c in candidates:
        distance = expect.distance(c.value)
        if math.isinf(distance):
            continue
        scored.append(dataclasses.replace(c, distance=distance, match=expect.match(c.value)))
    scored.sort(key=lambda c: (c.distance, simplicity(c)))
    return scored


def guess_penalty(i: Interpretation) -> float:
    """Without an expected value: how unlikely ``i`` is as a process value (lower is likelier).
    A float with few significant digits and a sane magnitude is rarely an accident; random
    bits read as a float have 7-9 digits. Otherwise a plain register is the usual case."""
    penalty = 3.0 * abs(i.offset) + simplicity(i)[3]
    if isinstance(i.value, str):
        # eight or more printable bytes with letters are rarely an accident
        return penalty + (0.5 if len(i.value) >= 6 else 2.5 if len(i.value) >= 4 else 10)
    if isinstance(i.value, float) and i.type.startswith("float"):
        if i.value == 0:
            return penalty + 12
        digits = len(f"{i.value:g}".lstrip("-").replace(".", "").split("e")[0].strip("0"))
        sane = 1e-3 <= abs(i.value) <= 1e7
        return penalty + (1 if digits <= 6 and sane else 20)
    return penalty + 3 + 2 * (i.registers - 1) + (1 if i.value == 0 else 0)


def best_guess(candidates: Sequence[Interpretation]) -> Interpretation | None:
    if not candidates:
        return None
    return min(candidates, key=lambda c: (guess_penalty(c), simplicity(c)))


# --- the snippet ---------------------------------------------------------------------------


def hmi_number(table: str, address: int) -> str:
    """The HMI/Modicon reference of a zero-based address: holding register 99 -> ``40100``."""
    number = address + 1
    prefix = _HMI_PREFIX[table]
    return f"{prefix}{number:04d}" if number <= 9999 else f"{prefix}{number:05d}"


def signal_name(table: str, address: int) -> str:
    from gateway.sources.modbus import TABLE_CODES

    return f"{TABLE_CODES[table]}{address}"


def modbus_block(unit: int, table: str, i: Interpretation | None, address: int) -> dict[str, Any]:
    """The ``modbus:`` block of the signal (``i`` None: a coil or discrete input)."""
    block: dict[str, Any] = {"unit": unit, "table": table,
                             "address": i.address if i is not None else address}
    if i is not None:
        block["type"] = i.type
        if i.order is not None and i.order != codec.default_order(i.type):
            block["order"] = i.order
        if i.type == "string":
            block["length"] = i.length
    return block


def signal_type(i: Interpretation | None) -> str:
    if i is None:
        return "boolean"
    if i.type == "string":
        return "string"
    if i.type.startswith("float") or not float(i.scale).is_integer():
        return "float"
    return "integer"


def snippet(connection: str, unit: int, table: str, i: Interpretation | None,
            address: int | None = None) -> str:
    """The signal entry for a mapping file's ``signals:`` (indented two spaces), e.g.::

          hr100:                      # rename
            connection: plc1
            modbus: {unit: 1, table: holding_register, address: 100, type: float32, order: CDAB}
            type: float
    """
    where = i.address if i is not None else address
    assert where is not None
    block = modbus_block(unit, table, i, where)
    inner = ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in block.items())
    lines = [
        f"  {signal_name(table, where)}:{' ' * 20}# rename; HMI {hmi_number(table, where)}",
        f"    connection: {connection}",
        f"    modbus: {{{inner}}}",
        f"    type: {signal_type(i)}",
    ]
    if i is not None and i.scale != 1:
        lines.append(f"    scale: {_num(i.scale)}")
    return "\n".join(lines)


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return json.dumps(value)
    return str(value)


# --- formatting ----------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:g}" if value == int(value) or abs(value) < 1e6 else repr(value)


def show(value: codec.Value) -> str:
    """A value as the engineer would type it: ``23.45``, ``-5767``, ``'PRESS07'``."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        text = f"{value:.10g}"
        return text if "e" in text or "." in text or "inf" in text or "nan" in text \
            else text + ".0"
    return str(value)


def _json_float(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return value


def _also(i: Interpretation, limit: int = 3) -> str:
    if not i.also:
        return ""
    shown = ", ".join(a.label for a in i.also[:limit])
    more = len(i.also) - limit
    return f"also {shown}" + (f" +{more} more" if more > 0 else "")


def format_words(table: str, first: int, words: Sequence[int], address: int,
                 registers: int) -> list[str]:
    out = ["  address  HMI      hex      uint16"]
    for n, word in enumerate(words):
        at = first + n
        mark = ">" if address <= at < address + registers else " "
        out.append(f"{mark} {at:<8} {hmi_number(table, at):<8} 0x{word:04X}  {word:>6}")
    return out


def format_ranked(ranked: Sequence[Interpretation], top: int) -> list[str]:
    rows = [("#", "value", "read as", "match", "")]
    for n, i in enumerate(ranked[:top], 1):
        if i.match:
            match = i.match
        elif i.distance is not None and i.distance < 10:
            match = f"{i.distance * 100:.3g}% off"
        else:
            match = "far off"
        rows.append((str(n), show(i.value), i.label, match, _also(i)))
    return _columns(rows)


def format_table(candidates: Sequence[Interpretation], words_left: int) -> list[str]:
    """The compact table: at the address given, one row per type, one column per order."""
    cells: dict[tuple[str, int], str] = {}
    for c in candidates:
        if c.offset == 0 and c.scale == 1 and c.type in NUMERIC_TYPES and c.order is not None:
            cells[(c.type, codec.orders_for(c.type).index(c.order))] = show(c.value)
    rows = [("type", *(f"{name} ({codec.ORDERS_32[n]})" for n, name in enumerate(_COLUMNS)))]
    for type_ in NUMERIC_TYPES:
        if codec.REGISTERS[type_] > words_left:
            continue
        orders = codec.orders_for(type_)
        row = [type_]
        for column in range(4):
            if type_ in ("int16", "uint16") and column in (1, 3):
                row.append("")  # one register: no word order; little-endian = byte swap
                continue
            position = 1 if type_ in ("int16", "uint16") and column == 2 else column
            present = position < len(orders)
            row.append(cells.get((type_, position), "." if present else ""))
        rows.append(tuple(row))
    return _columns(rows)


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


# --- the command ---------------------------------------------------------------------------


def probe_actions(sub: Any) -> Any:
    """The action subparsers of ``probe`` (created on first use), for each protocol's
    ``probe <protocol>`` command."""
    parser = sub.choices.get("probe") if hasattr(sub, "choices") else None
    if parser is None:
        parser = sub.add_parser(
            "probe", help="read a device once and show what its values could mean",
            description="Read a device once and show how its raw data could be interpreted, "
                        "with the mapping-file snippet for the likeliest reading.")
        actions = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
        return actions
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def register(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``probe modbus`` to the CLI's subparsers."""
    actions = probe_actions(sub)
    p = actions.add_parser(
        "modbus", help="read registers once; list every plausible type/order/scale/address",
        description="Read registers once (with one neighbour each side) and list every "
                    "plausible interpretation: int16..uint64, float32/64 and text, in every "
                    "byte/word order, one register either side, integers times 0.001..100. "
                    "With --expect (the value the HMI shows) they are ranked by closeness; the "
                    "best is printed as a mapping-file signal entry. Exit 0: done; 1: nothing "
                    "within 1% of --expect; 64: bad argument; 69: no answer; 76: exception.")
    config_arg(p)
    p.add_argument("connection", help="a Modbus connection in the config")
    p.add_argument("--unit", type=int, metavar="N",
                   help="unit id (slave id); default the connection's, else 1")
    p.add_argument("--address", required=True, metavar="A",
                   help="zero-based address (with --table, or a holding register), or an HMI "
                        "number: 40001 / 4x0001 = holding register 0, 30001 = input register 0")
    p.add_argument("--table", type=_table, metavar="TABLE",
                   help="holding, input, coil or discrete (default: from the HMI number, "
                        "else holding)")
    p.add_argument("--count", type=int, metavar="C",
                   help=f"registers to decode from the address (default {DEFAULT_COUNT}: "
                        f"enough for 64-bit values; more for text)")
    p.add_argument("--expect", metavar="VALUE",
                   help="the value the HMI shows now (a number or text): rank by closeness")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                   help=f"show the N closest readings (default {DEFAULT_TOP})")
    p.add_argument("--pick", type=int, metavar="N",
                   help="print the snippet of the N-th reading of the ranking (default: the "
                        "first, when it is within 1%% of --expect)")
    p.add_argument("--timeout-s", type=float, metavar="S",
                   help="response timeout (default: the connection's timeout_ms)")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    p.set_defaults(func=run)


def _table(text: str) -> str:
    table = _TABLE_ALIASES.get(text.strip().lower())
    if table is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected holding, input, coil or discrete")
    return table


def resolve_address(text: str, table: str | None) -> tuple[str, int, str]:
    """``(table, zero-based address, note)`` of ``--address``/``--table``: an HMI number
    (``40001``, ``'00017'``, ``4x0001``) without ``--table``, else zero-based.

    Raises:
        ProbeError: not an address (exit 64).
    """
    from gateway.sources.modbus import HMI_TABLES, MAX_ADDRESS, TABLE_TITLES, parse_hmi

    raw = text.strip()
    note = ""
    x_form = re.fullmatch(r"([0134])[xX](\d{1,6})", raw)
    try:
        if x_form:
            hmi_table = HMI_TABLES[int(x_form.group(1))]
            number = int(x_form.group(2))
            if not 1 <= number <= MAX_ADDRESS + 1:
                raise ValueError(f"{raw}: HMI numbers count from 1 ({x_form.group(1)}x0001 is "
                                 f"the first of the {TABLE_TITLES[hmi_table]})")
            found = (hmi_table, number - 1)
        elif not (raw.isascii() and raw.isdigit()):
            raise ValueError(f"{raw!r} is no address: give a number such as 100, 40101 or "
                             f"4x0101")
        elif table is None:
            looks_hmi = len(raw) in (5, 6) and (raw.startswith("0") or int(raw) >= 10001)
            found = parse_hmi(raw) if looks_hmi else ("holding_register", int(raw))
            if not looks_hmi and found[1] > MAX_ADDRESS:
                found = parse_hmi(int(raw))
        else:
            number = int(raw)
            if number > MAX_ADDRESS:
                found = parse_hmi(number)
            else:
                found = (table, number)
                if len(raw) in (5, 6) and number >= 10001:
                    try:
                        other, zero_based = parse_hmi(raw)
                        note = (f"{raw} is read as {TABLE_TITLES[table][:-1]} {number} "
                                f"(zero-based, as --table is given); for the HMI reference "
                                f"({TABLE_TITLES[other][:-1]} {zero_based}) omit --table")
                    except ValueError:
                        pass
    except ValueError as exc:
        raise ProbeError(f"--address {text}: {exc}", EX_USAGE) from None
    if table is not None and found[0] != table:
        raise ProbeError(
            f"--address {text} is {TABLE_TITLES[found[0]][:-1]} {found[1]} (HMI numbering), "
            f"but --table is {table}; omit --table, or give the zero-based address", EX_USAGE)
    return found[0], found[1], note


def _connection(settings: Any, name: str, path: Any) -> ModbusConnectionConfig:
    from gateway.sources.modbus import ModbusConnectionConfig

    known = sorted(n for n, c in settings.connections.items()
                   if isinstance(c, ModbusConnectionConfig))
    listed = ", ".join(known) if known else "none (add one with protocol: modbus)"
    conn = settings.connections.get(name)
    if conn is None:
        raise ProbeError(f"no connection {name!r} in {path}; Modbus connections: {listed}",
                         EX_USAGE)
    if not isinstance(conn, ModbusConnectionConfig):
        raise ProbeError(f"connection {name!r} in {path} is {conn.protocol}, not modbus; "
                         f"Modbus connections: {listed}", EX_USAGE)
    return conn


@dataclass(slots=True)
class Read:
    """What one probe read: the words (or bits) from ``first``, and what the device refused."""

    first: int
    values: list[int]
    refused: list[str] = dataclasses.field(default_factory=list)


def attempts(address: int, count: int, limit: int = 125) -> list[tuple[int, int]]:
    """``(start, count)`` reads to try, widest first: with both neighbours, without the one
    below, without the one above, without both; then fewer registers (the end of the
    device's table). Clipped to 0..65535 and ``limit`` registers."""
    out: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:  # end exclusive
        start, end = max(start, 0), min(end, 65536)
        n = min(end - start, limit)
        if n >= 1 and start <= address < start + n and (start, n) not in out:
            out.append((start, n))

    add(address - 1, address + count + 1)
    add(address, address + count + 1)
    add(address - 1, address + count)
    add(address, address + count)
    for k in range(count - 1, 0, -1):
        add(address - 1, address + k)
        add(address, address + k)
    return out


async def read_once(cfg: ModbusConnectionConfig, name: str, unit: int, table: str,
                    address: int, count: int, timeout_s: float) -> Read:
    """Read ``count`` values at ``address`` and one neighbour each side, once; narrower when
    the device answers exception 2 or 3 (the edge of its table).

    Raises:
        ProbeError: the device cannot be reached, does not answer or refuses the read.
    """
    import asyncio

    from pymodbus.exceptions import ConnectionException, ModbusIOException

    from gateway.sources.modbus import (
        _CONFIG_HINTS,
        BIT_TABLES,
        FUNCTION_CODES,
        TABLE_TITLES,
        _connect,
        _new_client,
        _quiet_pymodbus,
        exception_text,
    )

    _quiet_pymodbus()
    bits = table in BIT_TABLES
    what = f"{name} ({cfg.where}) unit {unit} {TABLE_TITLES[table][:-1]} {address}"
    client = _new_client(cfg, name, None)
    try:
        try:
            ok, reason = await asyncio.wait_for(_connect(client), timeout_s + 2.0)
        except (OSError, RuntimeError, TimeoutError) as exc:
            ok, reason = False, str(exc) or "no connection within the timeout"
        if not ok or not client.connected:
            check = ("the serial port, its settings and that the device is powered"
                     if cfg.transport == "rtu" else
                     f"host and port of connections.{name}, that the device is on and that "
                     f"nothing blocks TCP port {cfg.port}")
            raise ProbeError(f"{what}: cannot reach the device: {reason}; check {check}",
                             EX_UNAVAILABLE)
        read = {
            "coil": client.read_coils,
            "discrete_input": client.read_discrete_inputs,
            "holding_register": client.read_holding_registers,
            "input_register": client.read_input_registers,
        }[table]
        refused: list[str] = []
        budget = timeout_s * (cfg.retries + 1) + 2.0
        last_code = 0
        limit = cfg.max_bits_per_request if bits else cfg.max_registers_per_request
        for start, n in attempts(address, count, limit):
            try:
                response = await asyncio.wait_for(read(start, count=n, device_id=unit), budget)
            except (ModbusIOException, TimeoutError):
                raise ProbeError(
                    f"{what}: no answer within {timeout_s:g} s; check the unit id (--unit; "
                    f"TCP devices often answer 1 or 255), that {cfg.where} is a Modbus device, "
                    f"or raise --timeout-s", EX_UNAVAILABLE) from None
            except ConnectionException as exc:
                raise ProbeError(f"{what}: connection lost: {exc}", EX_UNAVAILABLE) from None
            if response.isError():
                last_code = int(getattr(response, "exception_code", 0) or 0)
                span = f"{start}..{start + n - 1}" if n > 1 else f"{start}"
                refused.append(f"{span} ({exception_text(last_code)})")
                if last_code in (2, 3):
                    continue
                break
            values = response.bits if bits else response.registers
            if values is None or len(values) < n:
                raise ProbeError(f"{what}: short answer ({0 if values is None else len(values)} "
                                 f"of {n} values)", EX_PROTOCOL)
            return Read(start, [int(v) for v in values[:n]], refused)
        hint = (_CONFIG_HINTS.get(last_code) or _UNIT_HINTS.get(last_code)
                or "check the unit id (--unit) and the device's manual")
        raise ProbeError(f"{what}: the device answered {exception_text(last_code)}; "
                         f"{hint.format(fc=FUNCTION_CODES[table], unit=unit)}", EX_PROTOCOL)
    finally:
        client.close()


def run(args: argparse.Namespace) -> int:
    """``probe modbus``: see the module docstring."""
    try:
        return _run(args)
    except ProbeError as exc:
        print(f"digispine-gateway: probe modbus: {exc}", file=sys.stderr)
        return exc.code


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.settings import find_config, load_settings

    path = find_config(args.config)
    settings = load_settings(path)
    cfg = _connection(settings, args.connection, path)
    table, address, note = resolve_address(args.address, args.table)
    expect = Expect.parse(args.expect) if args.expect is not None else None
    unit = args.unit if args.unit is not None else getattr(cfg, "unit", None) or 1
    if not 0 <= unit <= 255:
        raise ProbeError(f"--unit {unit}: unit ids are 0..255", EX_USAGE)
    count = args.count
    if count is None:
        count = DEFAULT_COUNT
        if expect is not None and expect.number is None:
            count = max(count, (len(expect.text) + 1) // 2)
    if not 1 <= count <= 123:
        raise ProbeError(f"--count {count}: 1..123 registers (one read of 125 with the "
                         f"neighbours)", EX_USAGE)
    if args.top < 1 or (args.pick is not None and args.pick < 1):
        raise ProbeError("--top and --pick count from 1", EX_USAGE)
    timeout_s = args.timeout_s if args.timeout_s is not None else cfg.timeout_ms / 1000.0
    if not 0.01 <= timeout_s <= 60:
        raise ProbeError(f"--timeout-s {timeout_s:g}: 0.01..60 seconds", EX_USAGE)
    cfg = cfg.model_copy(update={"timeout_ms": round(timeout_s * 1000)})
    try:
        result = asyncio.run(read_once(cfg, args.connection, unit, table, address, count,
                                       timeout_s))
    except ProbeError as exc:
        if note:
            raise ProbeError(f"{exc} (note: {note})", exc.code) from None
        raise
    report = Report(args.connection, cfg.where, unit, table, address, count, result, expect,
                    note)
    if args.json:
        print(json.dumps(report.as_dict(args.top, args.pick), indent=2, ensure_ascii=False))
    else:
        print("\n".join(report.lines(args.top, args.pick)))
    if expect is not None and not report.close():
        return EX_NO_MATCH
    return EX_OK


@dataclass(slots=True)
class Report:
    """One probe's result, as text or JSON."""

    connection: str
    where: str
    unit: int
    table: str
    address: int
    count: int
    read: Read
    expect: Expect | None
    note: str = ""
    every: list[Interpretation] = dataclasses.field(default_factory=list)
    """Every plausible interpretation, before :func:`collapse`."""
    candidates: list[Interpretation] = dataclasses.field(default_factory=list)
    ranked: list[Interpretation] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bits:
            return
        scales = SCALES if self.expect is not None and self.expect.number is not None else (1,)
        self.every = interpret(self.read.values, self.read.first, self.address,
                               scales=scales, expect=self.expect)
        self.candidates = collapse(self.every)
        if self.expect is not None:
            self.ranked = rank(self.candidates, self.expect)

    @property
    def bits(self) -> bool:
        return self.table in ("coil", "discrete_input")

    def close(self) -> bool:
        if self.bits:
            return self.expect is None or self._bit_matches()
        return bool(self.ranked) and (self.ranked[0].distance or 0.0) <= CLOSE

    def _bit_matches(self) -> bool:
        assert self.expect is not None
        want = self.expect.text.strip().lower()
        value = self.read.values[self.address - self.read.first]
        return want in (("1", "true", "on") if value else ("0", "false", "off"))

    def chosen(self, pick: int | None) -> Interpretation | None:
        """The reading to print the snippet of: ``--pick`` of the ranking, else the first
        when it is close; without ``--expect``, a guess."""
        if self.expect is not None:
            if pick is None:
                return self.ranked[0] if self.close() else None
            return self.ranked[pick - 1] if pick <= len(self.ranked) else None
        if pick is not None:
            return None
        return best_guess([c for c in self.candidates if c.offset == 0]) or \
            best_guess(self.candidates)

    def lines(self, top: int, pick: int | None) -> list[str]:
        from gateway.sources.modbus import TABLE_TITLES

        read = self.read
        last = read.first + len(read.values) - 1
        out = [f"{self.connection} at {self.where}, unit {self.unit}, {TABLE_TITLES[self.table]} "
               f"{read.first}..{last} (asked: {self.address} = HMI "
               f"{hmi_number(self.table, self.address)}, {self.count} from there)"]
        if self.note:
            out.append(f"note: {self.note}")
        if read.refused:
            more = len(read.refused) - 1
            also = f" and {more} narrower read{'s' if more > 1 else ''}" if more else ""
            out.append(f"note: the device refused {read.refused[0]}{also}: read "
                       f"{read.first}..{last} instead (the edge of its register map?)")
        if self.bits:
            return out + self._bit_lines()
        out += format_words(self.table, read.first, read.values, self.address, self.count)
        if not any(read.values):
            out.append("note: every register read 0: the device may not use this range, or "
                       "the value is 0 right now")
        out.append("")
        if self.expect is not None:
            out += self._ranked_lines(top)
        else:
            out += self._table_lines()
        out.append("")
        chosen = self.chosen(pick)
        if chosen is None:
            if self.expect is None and pick is not None:
                out.append("--pick needs --expect (it picks from the ranking)")
            elif pick is not None and self.ranked:
                out.append(f"--pick {pick}: there are only {len(self.ranked)} readings")
            elif self.ranked:
                out.append("No snippet: no reading is close. To have one anyway, choose it "
                           "with --pick N.")
            else:
                out.append("No plausible reading to suggest.")
            return out
        which = f"#{pick or 1}" if self.expect is not None else \
            "a guess: give --expect to rank"
        out.append(f"Mapping snippet ({chosen.label}, value {show(chosen.value)}; {which}), "
                   f"under signals: in a mapping file:")
        out.append(snippet(self.connection, self.unit, self.table, chosen))
        return out

    def _ranked_lines(self, top: int) -> list[str]:
        assert self.expect is not None
        kind = "text" if self.expect.number is None else "number"
        if not self.ranked:
            return [f"No plausible {kind} reading at all to compare with {self.expect.text!r}."]
        out = [f"Closest to {self.expect.text} ({len(self.ranked)} distinct plausible "
               f"reading{'s' if len(self.ranked) != 1 else ''}, "
               f"{min(top, len(self.ranked))} shown):"]
        out += format_ranked(self.ranked, top)
        best = self.ranked[0]
        if best.offset and (best.distance or 0.0) <= CLOSE:
            where = "below" if best.offset < 0 else "above"
            out.append(f"note: #1 starts one register {where} the address given "
                       f"({self.address}); the usual cause is an address counted from 1 where "
                       f"the protocol counts from 0 (or the other way). The snippet has "
                       f"{best.address}.")
        if (best.distance or 0.0) > CLOSE:
            off = "far" if best.distance is None or best.distance >= 10 else \
                f"{best.distance * 100:.3g}%"
            this, other = ("holding", "input") if self.table == "holding_register" else \
                ("input", "holding")
            out += [
                "",
                f"No reading is within {CLOSE:.0%} of {self.expect.text} (the closest is "
                f"{off} off). Check:",
                f"  - the unit id: this read used --unit {self.unit} (a TCP gateway passes it "
                f"to the serial device with that id)",
                f"  - the table: this read {this} registers; try --table {other}",
                "  - the address: maybe off by more than one (try --address with the manual's "
                "other numbering, or a larger --count)",
                "  - the value: it may have moved since, or carry an offset (a signal's "
                "offset: e.g. Kelvin) or another scale",
            ]
        return out

    def _table_lines(self) -> list[str]:
        words_left = self.read.first + len(self.read.values) - self.address
        out = [f"At {self.address} (each order; . = NaN, infinite, denormal or beyond "
               f"{HUGE:.0e}):"]
        out += format_table(self.every, words_left)
        for t in self.every:
            if t.type == "string" and t.offset == 0:
                out.append(f"  text ({t.order}): {show(t.value)}")
        near = [c for c in self.every if c.offset != 0 and c.type.startswith("float")]
        if near:
            out += ["", "Plausible floats one register off:"]
            rows = [(show(c.value), c.label) for c in sorted(near, key=lambda c: (
                c.offset, c.type, codec.orders_for(c.type).index(c.order or "")))]
            out += _columns(rows)
        return out

    def _bit_lines(self) -> list[str]:
        read = self.read
        out = ["  address  HMI      value"]
        for n, bit in enumerate(read.values):
            at = read.first + n
            mark = ">" if at == self.address else " "
            out.append(f"{mark} {at:<8} {hmi_number(self.table, at):<8} {int(bit)}")
        if self.expect is not None and not self._bit_matches():
            out.append(f"\n{self.address} reads {read.values[self.address - read.first]}, "
                       f"not {self.expect.text}: check the unit id, table and address")
        out += ["", "Mapping snippet, under signals: in a mapping file:",
                snippet(self.connection, self.unit, self.table, None, self.address)]
        return out

    def as_dict(self, top: int, pick: int | None) -> dict[str, Any]:
        chosen = None if self.bits else self.chosen(pick)
        listed = self.ranked[:top] if self.expect is not None else self.candidates
        out: dict[str, Any] = {
            "connection": self.connection, "where": self.where, "unit": self.unit,
            "table": self.table, "address": self.address, "count": self.count,
            "expect": self.expect.text if self.expect is not None else None,
            "read": {"first": self.read.first, "values": self.read.values,
                     "refused": self.read.refused},
            "note": self.note or None,
            "interpretations": [i.as_dict() for i in listed],
            "close": self.close(),
        }
        if self.bits:
            out["signal"] = {"connection": self.connection, "type": "boolean",
                             "modbus": modbus_block(self.unit, self.table, None, self.address)}
            out["snippet"] = snippet(self.connection, self.unit, self.table, None, self.address)
        elif chosen is not None:
            signal: dict[str, Any] = {
                "connection": self.connection,
                "modbus": modbus_block(self.unit, self.table, chosen, chosen.address),
                "type": signal_type(chosen)}
            if chosen.scale != 1:
                signal["scale"] = chosen.scale
            out["chosen"] = chosen.as_dict()
            out["signal"] = signal
            out["snippet"] = snippet(self.connection, self.unit, self.table, chosen)
        return out


__all__ = [
    "Expect",
    "Interpretation",
    "ProbeError",
    "attempts",
    "collapse",
    "interpret",
    "plausible",
    "rank",
    "read_once",
    "register",
    "resolve_address",
    "run",
    "snippet",
]
