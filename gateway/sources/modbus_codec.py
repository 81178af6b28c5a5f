"""Modbus data layouts: registers and bits to values and back. Pure: no I/O, no pymodbus.

A Modbus device exposes 16-bit registers and single bits; everything wider (a 32-bit counter,
a float, a text) is spread over consecutive registers in a layout the device's manual
documents, usually as a byte order such as ``ABCD`` or "word swapped". This module turns the
words of a read into the value (:func:`decode`, or a compiled :class:`Layout`) and back
(:func:`encode`, for tests and the probe tool).

Types and their size
    ============  ==========  ===========================================================
    type          registers   value
    ============  ==========  ===========================================================
    ``bool``      1 (or bit)  a coil or discrete input, or bit ``bit`` (0 = least
                              significant, 15 = most significant) of a register
    ``int16``     1           -32768 .. 32767 (two's complement)
    ``uint16``    1           0 .. 65535
    ``int32``     2           -2 147 483 648 .. 2 147 483 647
    ``uint32``    2           0 .. 4 294 967 295
    ``float32``   2           IEEE 754 single precision, as the shortest decimal that is
                              the same float32 (``123.456``, not ``123.45600128173828``);
                              NaN and infinities pass through
    ``int64``     4           two's complement, 64 bits
    ``uint64``    4           0 .. 18 446 744 073 709 551 615
    ``float64``   4           IEEE 754 double precision
    ``string``    length/2    ``length`` characters, two per register (rounded up)
    ============  ==========  ===========================================================

Byte and word order (``order``)
    The letters name the bytes of the value from the most significant (``A``) to the least
    significant; the order lists them as they arrive: the register at the lowest address
    first, the high byte of each register first (as Modbus sends every register). So:

    ==============  ==============  =====================================================
    32-bit          64-bit          meaning
    ==============  ==============  =====================================================
    ``ABCD``        ``ABCDEFGH``    big-endian: most significant word first, high byte
                                    first in each word (the Modbus convention; default)
    ``CDAB``        ``GHEFCDAB``    word swap ("little-endian word order"): least
                                    significant word first, bytes of each word big-endian
                                    (common in PLCs that store 32-bit values low word first)
    ``BADC``        ``BADCFEHG``    byte swap: words in big-endian order, the two bytes
                                    of every word swapped
    ``DCBA``        ``HGFEDCBA``    little-endian: least significant byte first
    ==============  ==============  =====================================================

    16-bit types take ``AB`` (default) or ``BA`` (byte swapped). A ``string`` takes ``AB``
    (default: the first character in the high byte of the first register) or ``BA`` (the
    first character in the low byte). Example: the float32 ``123.456`` is the bytes
    ``42 F6 E9 79``; ``ABCD`` reads it from the registers ``0x42F6 0xE979``, ``CDAB`` from
    ``0xE979 0x42F6``, ``BADC`` from ``0xF642 0x79E9``, ``DCBA`` from ``0x79E9 0xF642``.

Strings
    One byte per character: ASCII, bytes above 0x7F read as Latin-1 (so ``length`` is the
    number of characters and every byte decodes). The text ends at the first NUL byte;
    trailing blanks are removed (devices pad with either). An odd ``length`` leaves the
    unused half of the last register out.

Scale and offset
    :func:`scaled` (``raw * scale + offset``) and its inverse :func:`unscaled` are here for the
    probe tool; the mapping engine applies a signal's ``scale``/``offset`` itself.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                   "float32", "float64", "string"]
DATA_TYPES: tuple[str, ...] = get_args(DataType)

Value = bool | int | float | str

REGISTERS: dict[str, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4,
}
"""Registers of each fixed-size numeric type."""

_STRUCT: dict[str, str] = {
    "int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f",
    "int64": ">q", "uint64": ">Q", "float64": ">d",
}

ORDERS_16: tuple[str, ...] = ("AB", "BA")
ORDERS_32: tuple[str, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
ORDERS_64: tuple[str, ...] = ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA")
"""The orders of each width; the first is the default (big-endian)."""

ORDER_EQUIVALENT: dict[str, str] = dict(zip(ORDERS_32, ORDERS_64, strict=True))
"""The 64-bit name of each 32-bit order (``CDAB`` -> ``GHEFCDAB``), for error messages."""

_FLOAT32_MIN_NORMAL = 1.1754943508222875e-38

MAX_STRING_LENGTH = 250
"""Characters of the longest string: 125 registers, the most one read returns."""


class CodecError(ValueError):
    """A layout that cannot exist (an order of the wrong width, a bit above 15), or a value
    that does not fit its type when encoding."""


def orders_for(type_: str) -> tuple[str, ...]:
    """The orders a type accepts, default first; empty for ``bool``."""
    if type_ == "bool":
        return ()
    if type_ == "string":
        return ORDERS_16
    return {1: ORDERS_16, 2: ORDERS_32, 4: ORDERS_64}[REGISTERS[type_]]


def default_order(type_: str) -> str | None:
    orders = orders_for(type_)
    return orders[0] if orders else None


def normalise_order(type_: str, order: str | None) -> str | None:
    """The canonical (upper-case) order for ``type_``; the default when ``order`` is None.

    Raises:
        CodecError: with the orders that apply to the type (and, for a 32-bit name given to a
            64-bit type, its 64-bit equivalent).
    """
    if type_ not in DATA_TYPES:
        raise CodecError(f"unknown type {type_!r}; expected one of {', '.join(DATA_TYPES)}")
    orders = orders_for(type_)
    if order is None:
        return orders[0] if orders else None
    name = order.strip().upper()
    if not orders:
        raise CodecError("order does not apply to bool: a bit has no byte order")
    if name in orders:
        return name
    if type_ == "string":
        raise CodecError(
            f"order {order!r} does not apply to a string; use AB (first character in the high "
            f"byte of each register, the usual) or BA (first character in the low byte)")
    width = REGISTERS[type_] * 16
    hint = ""
    if width == 64 and name in ORDER_EQUIVALENT:
        hint = f" (the 64-bit form of {name} is {ORDER_EQUIVALENT[name]})"
    elif width == 32 and name in ORDERS_64:
        hint = f" (the 32-bit form of {name} is {ORDERS_32[ORDERS_64.index(name)]})"
    elif width == 16 and name in ORDERS_32:
        hint = " (a 16-bit value has one register: only its two bytes can be swapped)"
    raise CodecError(
        f"order {order!r} does not apply to {type_} ({width} bits); use one of "
        f"{', '.join(orders)}{hint}")


def register_count(type_: str, length: int | None = None) -> int:
    """Registers one value of ``type_`` occupies (``bool``: 1, the register holding the bit)."""
    if type_ == "bool":
        return 1
    if type_ == "string":
        if length is None or length < 1:
            raise CodecError("a string needs its length in characters (length: 1 or more)")
        return (length + 1) // 2
    try:
        return REGISTERS[type_]
    except KeyError:
        raise CodecError(
            f"unknown type {type_!r}; expected one of {', '.join(DATA_TYPES)}") from None


@dataclass(frozen=True, slots=True)
class Layout:
    """How one value lies in registers, checked once; :meth:`decode` and :meth:`encode` are the
    per-read path. Build it with :func:`layout`."""

    type: str
    order: str | None = None
    bit: int | None = None
    """For ``bool`` in a register: the bit, 0 = least significant."""
    length: int | None = None
    """For ``string``: characters."""
    registers: int = 1
    _perm: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """Wire byte index for each big-endian byte position of the value."""
    _identity: bool = field(default=False, repr=False, compare=False)
    """``_perm`` keeps the wire order (ABCD...): no reordering per decode."""

    def decode(self, words: Sequence[int]) -> Value:
        """The value in ``words`` (the registers of this layout, lowest address first;
        extra words are ignored)."""
        if len(words) < self.registers:
            raise CodecError(
                f"{self.type} needs {self.registers} register(s), got {len(words)}")
        if self.type == "bool":
            return bool((words[0] >> (self.bit or 0)) & 1)
        raw = _bytes(words, self.registers)
        if self.type == "string":
            return _text(raw, self.order == "BA", self.length or 0)
        ordered = raw if self._identity else bytes([raw[i] for i in self._perm])
        value: int | float = struct.unpack(_STRUCT[self.type], ordered)[0]
        if self.type == "float32":
            return _short_float32(ordered, float(value))
        return value

    def encode(self, value: Value) -> list[int]:
        """The registers holding ``value`` (for ``bool`` in a register: the register with
        only that bit set or clear).

        Raises:
            CodecError: the value does not fit the type.
        """
        if self.type == "bool":
            if not isinstance(value, bool | int) or value not in (0, 1):
                raise CodecError(f"a bool is true/false or 0/1, got {value!r}")
            return [(1 << (self.bit or 0)) if value else 0]
        if self.type == "string":
            return _encode_text(value, self.order == "BA", self.length or 0)
        packed = _pack(self.type, value)
        wire = bytearray(len(packed))
        for position, wire_index in enumerate(self._perm):
            wire[wire_index] = packed[position]
        return list(struct.unpack(f">{self.registers}H", wire))


def layout(type_: str, order: str | None = None, *, bit: int | None = None,
           length: int | None = None) -> Layout:
    """A checked :class:`Layout`.

    Raises:
        CodecError: an unknown type, an order of another width, ``bit`` on a type other than
            bool or outside 0..15, ``length`` missing on a string or given on another type.
    """
    canonical = normalise_order(type_, order)
    if bit is not None:
        if type_ != "bool":
            raise CodecError(f"bit applies to bool only (one bit of a register), not {type_}")
        if not 0 <= bit <= 15:
            raise CodecError(f"bit {bit} does not exist: a register has bits 0 (least "
                             f"significant) to 15 (most significant)")
    if type_ == "string":
        if length is None or not 1 <= length <= MAX_STRING_LENGTH:
            raise CodecError(f"a string needs length: the number of characters, 1 to "
                             f"{MAX_STRING_LENGTH} (two per register)")
    elif length is not None:
        raise CodecError(f"length applies to string only, not {type_}")
    registers = register_count(type_, length)
    perm: tuple[int, ...] = ()
    if canonical is not None and type_ != "string":
        perm = tuple(canonical.index(chr(ord("A") + rank)) for rank in range(len(canonical)))
    identity = bool(perm) and perm == tuple(range(len(perm)))
    return Layout(type_, canonical, bit, length, registers, perm, identity)


def decode(words: Sequence[int], type_: str, order: str | None = None, *,
           bit: int | None = None, length: int | None = None) -> Value:
    """The value of ``type_`` in ``words`` (lowest address first)."""
    return layout(type_, order, bit=bit, length=length).decode(words)


def encode(value: Value, type_: str, order: str | None = None, *,
           bit: int | None = None, length: int | None = None) -> list[int]:
    """The registers that hold ``value`` as ``type_`` in ``order``."""
    return layout(type_, order, bit=bit, length=length).encode(value)


def decode_bits(bits: Sequence[bool], offset: int) -> bool:
    """The coil or discrete input at ``offset`` of a bit read."""
    return bool(bits[offset])


def words_from_hex(text: str) -> list[int]:
    """Registers from hex text: ``"42F6 E979"``, ``"0x42F6,0xE979"`` or ``"42F6E979"``
    (whole registers, four digits each). For tests and the probe tool."""
    cleaned = text.replace(",", " ").replace("0x", "").replace("0X", "").split()
    digits = "".join(cleaned)
    if not digits or len(digits) % 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise CodecError(f"expected whole registers as hex (4 digits each), got {text!r}")
    return [int(digits[i:i + 4], 16) for i in range(0, len(digits), 4)]


def words_to_hex(words: Sequence[int]) -> str:
    return " ".join(f"{w:04X}" for w in words)


def scaled(raw: int | float, scale: float = 1.0, offset: float = 0.0) -> int | float:
    """``raw * scale + offset``; an integer stays an integer when scale and offset are whole."""
    if scale == 1 and offset == 0:
        return raw
    if isinstance(raw, int) and float(scale).is_integer() and float(offset).is_integer():
        return raw * int(scale) + int(offset)
    return raw * scale + offset


def unscaled(value: int | float, scale: float = 1.0, offset: float = 0.0) -> int | float:
    """The raw value that :func:`scaled` turns into ``value`` (rounded for integer types by
    the caller)."""
    if scale == 0:
        raise CodecError("scale 0 cannot be inverted")
    if scale == 1 and offset == 0:
        return value
    return (value - offset) / scale


# -- helpers -----------------------------------------------------------------------------------


def _bytes(words: Sequence[int], count: int) -> bytes:
    try:
        return struct.pack(f">{count}H", *words[:count])
    except struct.error:
        raise CodecError(
            f"registers are 16-bit values 0..65535, got {list(words[:count])}") from None


_pack_f32 = struct.Struct(">f").pack


def _short_float32(packed: bytes, value: float) -> float:
    """The shortest decimal that is the same float32 (123.456, not 123.45600128173828)."""
    if not math.isfinite(value) or value == 0:
        return value
    # Normal float32s carry over 7 significant digits, so their shortest decimal has the same
    # digits as the 6-digit rounding (``g`` drops trailing zeros); subnormals have fewer.
    first = 6 if abs(value) >= _FLOAT32_MIN_NORMAL else 1
    for digits in range(first, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if _pack_f32(candidate) == packed:
                return candidate
        except OverflowError:  # rounded up past the largest float32
            continue
    return value


def _text(raw: bytes, swapped: bool, length: int) -> str:
    if swapped:
        raw = bytes(b for i in range(0, len(raw), 2) for b in (raw[i + 1], raw[i]))
    raw = raw[:length]
    end = raw.find(0)
    if end >= 0:
        raw = raw[:end]
    return raw.decode("latin-1").rstrip(" ")


def _encode_text(value: Value, swapped: bool, length: int) -> list[int]:
    if not isinstance(value, str):
        raise CodecError(f"a string value is text, got {value!r}")
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise CodecError(f"{value!r} has characters outside Latin-1 (one byte each)") from None
    if len(raw) > length:
        raise CodecError(f"{value!r} has {len(raw)} characters, the string holds {length}")
    raw = raw.ljust(((length + 1) // 2) * 2, b"\0")
    if swapped:
        raw = bytes(b for i in range(0, len(raw), 2) for b in (raw[i + 1], raw[i]))
    return list(struct.unpack(f">{len(raw) // 2}H", raw))


def _pack(type_: str, value: Value) -> bytes:
    if isinstance(value, str):
        raise CodecError(f"{type_} holds a number, got {value!r}")
    if type_.startswith("float"):
        try:
            return struct.pack(_STRUCT[type_], float(value))
        except OverflowError:
            raise CodecError(f"{value!r} is too large for {type_}") from None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise CodecError(f"{type_} holds whole numbers, got {value!r}")
        value = int(value)
    try:
        return struct.pack(_STRUCT[type_], int(value))
    except struct.error:
        bits = REGISTERS[type_] * 16
        low, high = (0, 2**bits - 1) if type_.startswith("u") else (-(2 ** (bits - 1)),
                                                                    2 ** (bits - 1) - 1)
        raise CodecError(f"{value!r} is outside the {type_} range {low}..{high}") from None
