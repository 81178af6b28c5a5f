"""modbus_codec: worked examples, hex registers in -> value out, for every type and order, and
back (encode). The hex is written out by hand from the byte-order table of the module
docstring, not computed by the code under test."""

from __future__ import annotations

import math

import pytest

from gateway.sources import modbus_codec as codec
from gateway.sources.modbus_codec import CodecError, decode, encode, words_from_hex

# (type, order, registers as hex, value)
EXAMPLES: list[tuple[str, str | None, str, object]] = [
    # 16 bits
    ("uint16", None, "1234", 0x1234),
    ("uint16", "AB", "FFFF", 65535),
    ("uint16", "BA", "3412", 0x1234),
    ("int16", None, "FFFF", -1),
    ("int16", None, "8000", -32768),
    ("int16", None, "7FFF", 32767),
    ("int16", "BA", "0080", -32768),
    ("int16", "BA", "FEFF", -2),
    # 32 bits: 0x12345678 = 305419896 in the four orders
    ("uint32", "ABCD", "1234 5678", 305419896),
    ("uint32", "CDAB", "5678 1234", 305419896),
    ("uint32", "BADC", "3412 7856", 305419896),
    ("uint32", "DCBA", "7856 3412", 305419896),
    # -123456789 = 0xF8A432EB
    ("int32", None, "F8A4 32EB", -123456789),
    ("int32", "CDAB", "32EB F8A4", -123456789),
    ("int32", "BADC", "A4F8 EB32", -123456789),
    ("int32", "DCBA", "EB32 A4F8", -123456789),
    # 123.456 as float32 = 0x42F6E979 (read back as the shortest equal decimal)
    ("float32", "ABCD", "42F6 E979", 123.456),
    ("float32", "CDAB", "E979 42F6", 123.456),
    ("float32", "BADC", "F642 79E9", 123.456),
    ("float32", "DCBA", "79E9 F642", 123.456),
    ("float32", None, "BFC0 0000", -1.5),
    ("float32", None, "41AC 0000", 21.5),
    ("float32", None, "0000 0000", 0.0),
    ("float32", None, "7F80 0000", math.inf),
    ("float32", None, "FF80 0000", -math.inf),
    ("float32", "CDAB", "0000 FF80", -math.inf),
    # 64 bits: 0x0102030405060708 = 72623859790382856
    ("uint64", "ABCDEFGH", "0102 0304 0506 0708", 72623859790382856),
    ("uint64", "GHEFCDAB", "0708 0506 0304 0102", 72623859790382856),
    ("uint64", "BADCFEHG", "0201 0403 0605 0807", 72623859790382856),
    ("uint64", "HGFEDCBA", "0807 0605 0403 0201", 72623859790382856),
    ("uint64", None, "FFFF FFFF FFFF FFFF", 18446744073709551615),
    ("int64", None, "FFFF FFFF FFFF FFFE", -2),
    ("int64", "GHEFCDAB", "FFFE FFFF FFFF FFFF", -2),
    ("int64", "HGFEDCBA", "FEFF FFFF FFFF FFFF", -2),
    ("int64", None, "8000 0000 0000 0000", -(2**63)),
    # 123.456 as float64 = 0x405EDD2F1A9FBE77
    ("float64", "ABCDEFGH", "405E DD2F 1A9F BE77", 123.456),
    ("float64", "GHEFCDAB", "BE77 1A9F DD2F 405E", 123.456),
    ("float64", "BADCFEHG", "5E40 2FDD 9F1A 77BE", 123.456),
    ("float64", "HGFEDCBA", "77BE 9F1A 2FDD 5E40", 123.456),
    ("float64", None, "7FF0 0000 0000 0000", math.inf),
    ("float64", None, "C000 0000 0000 0000", -2.0),
]


@pytest.mark.parametrize(("type_", "order", "hex_words", "value"), EXAMPLES,
                         ids=[f"{t}-{o or 'default'}-{h}" for t, o, h, _ in EXAMPLES])
def test_worked_examples_decode(type_: str, order: str | None, hex_words: str,
                                value: object) -> None:
    got = decode(words_from_hex(hex_words), type_, order)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize(("type_", "order", "hex_words", "value"), EXAMPLES,
                         ids=[f"{t}-{o or 'default'}-{h}" for t, o, h, _ in EXAMPLES])
def test_worked_examples_encode(type_: str, order: str | None, hex_words: str,
                                value: object) -> None:
    assert encode(value, type_, order) == words_from_hex(hex_words)  # type: ignore[arg-type]


@pytest.mark.parametrize("order", codec.ORDERS_32)
def test_float32_nan_passes_through(order: str) -> None:
    words = encode(math.nan, "float32", order)
    assert math.isnan(decode(words, "float32", order))  # type: ignore[arg-type]
    assert math.isnan(decode(words_from_hex("7FC0 0000"), "float32"))  # type: ignore[arg-type]


def test_float64_nan_and_negative_zero() -> None:
    nan = decode(words_from_hex("7FF8 0000 0000 0000"), "float64")
    assert isinstance(nan, float) and math.isnan(nan)
    zero = decode(words_from_hex("8000 0000 0000 0000"), "float64")
    assert zero == 0.0 and math.copysign(1.0, zero) == -1.0  # type: ignore[arg-type]


def test_float32_shortest_decimal_and_extremes() -> None:
    assert decode(encode(0.1, "float32"), "float32") == 0.1
    assert decode(encode(3.4028235e38, "float32"), "float32") == 3.4028235e38
    assert decode(words_from_hex("0000 0001"), "float32") == 1e-45  # smallest subnormal
    with pytest.raises(CodecError, match="too large for float32"):
        encode(1e39, "float32")


@pytest.mark.parametrize("order", codec.ORDERS_32)
def test_32_bit_counter_near_rollover(order: str) -> None:
    """A uint32 counter read across its wrap, in every order; int32 across its sign flip."""
    for value in (4294967293, 4294967294, 4294967295, 0, 1):
        assert decode(encode(value, "uint32", order), "uint32", order) == value
    assert decode(words_from_hex("FFFF FFFF"), "uint32") == 4294967295
    assert decode(words_from_hex("FFFF FFFF"), "uint32", "CDAB") == 4294967295
    assert decode(words_from_hex("FFFE FFFF"), "uint32", "CDAB") == 4294967294
    assert decode(words_from_hex("FFFF FFFE"), "uint32", "CDAB") == 4294901759  # words swapped
    assert decode(words_from_hex("7FFF FFFF"), "int32") == 2147483647
    assert decode(words_from_hex("8000 0000"), "int32") == -2147483648
    assert decode(encode(2147483647, "int32", order), "int32", order) == 2147483647
    with pytest.raises(CodecError, match=r"outside the uint32 range 0\.\.4294967295"):
        encode(4294967296, "uint32", order)
    with pytest.raises(CodecError, match="outside the int32 range"):
        encode(2147483648, "int32", order)


def test_16_bit_ranges() -> None:
    with pytest.raises(CodecError, match=r"outside the int16 range -32768\.\.32767"):
        encode(32768, "int16")
    with pytest.raises(CodecError, match="outside the uint16 range"):
        encode(-1, "uint16")
    with pytest.raises(CodecError, match="whole numbers"):
        encode(1.5, "int16")
    assert encode(7.0, "int16") == [7]


STRINGS: list[tuple[str | None, str, int, str]] = [
    # order, registers, length, text
    (None, "4142 4344 4500", 5, "ABCDE"),            # odd length: the last low byte is unused
    (None, "4142 4344 45FF", 5, "ABCDE"),            # ... whatever it holds
    ("BA", "4241 4443 0045", 5, "ABCDE"),            # byte swapped: the last high byte unused
    ("BA", "4241 4443 FF45", 5, "ABCDE"),
    (None, "4100", 1, "A"),
    (None, "4142 0043 4445", 6, "AB"),               # ends at the first NUL
    (None, "4142 2020", 4, "AB"),                    # blank padding removed
    (None, "5072 6573 7320 3037", 8, "Press 07"),    # inner blanks kept
    (None, "C46E 6465 7275 6E67", 8, "\u00c4nderung"),  # Latin-1
    (None, "0000 0000", 4, ""),
]


@pytest.mark.parametrize(("order", "hex_words", "length", "text"), STRINGS)
def test_strings(order: str | None, hex_words: str, length: int, text: str) -> None:
    assert decode(words_from_hex(hex_words), "string", order, length=length) == text


def test_string_encode_pads_and_checks() -> None:
    assert encode("ABCDE", "string", length=5) == words_from_hex("4142 4344 4500")
    assert encode("ABCDE", "string", "BA", length=5) == words_from_hex("4241 4443 0045")
    assert encode("AB", "string", length=6) == words_from_hex("4142 0000 0000")
    with pytest.raises(CodecError, match="has 6 characters, the string holds 5"):
        encode("ABCDEF", "string", length=5)
    with pytest.raises(CodecError, match="outside Latin-1"):
        encode("\u20ac", "string", length=2)


def test_bits_of_a_register() -> None:
    words = words_from_hex("8001")
    assert decode(words, "bool", bit=0) is True
    assert decode(words, "bool", bit=1) is False
    assert decode(words, "bool", bit=15) is True
    assert encode(True, "bool", bit=3) == [0x0008]
    assert encode(False, "bool", bit=3) == [0]
    assert codec.decode_bits([False, True], 1) is True


def test_register_counts() -> None:
    assert [codec.register_count(t) for t in ("bool", "int16", "uint16", "int32", "uint32",
                                               "float32", "int64", "uint64", "float64")] == \
        [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert [codec.register_count("string", n) for n in (1, 2, 3, 10, 11, 250)] == \
        [1, 1, 2, 5, 6, 125]
    assert codec.layout("string", length=11).registers == 6


def test_layout_errors_are_worded_for_the_engineer() -> None:
    with pytest.raises(CodecError, match=r"the 64-bit form of CDAB is GHEFCDAB"):
        codec.layout("float64", "CDAB")
    with pytest.raises(CodecError, match=r"the 32-bit form of GHEFCDAB is CDAB"):
        codec.layout("float32", "GHEFCDAB")
    with pytest.raises(CodecError, match="only its two bytes can be swapped"):
        codec.layout("int16", "CDAB")
    with pytest.raises(CodecError, match=r"use AB .* or BA"):
        codec.layout("string", "ABCD", length=4)
    with pytest.raises(CodecError, match="a bit has no byte order"):
        codec.layout("bool", "AB")
    with pytest.raises(CodecError, match="bit 16 does not exist"):
        codec.layout("bool", bit=16)
    with pytest.raises(CodecError, match="bit applies to bool only"):
        codec.layout("uint16", bit=1)
    with pytest.raises(CodecError, match="needs length"):
        codec.layout("string")
    with pytest.raises(CodecError, match="length applies to string only"):
        codec.layout("uint16", length=2)
    with pytest.raises(CodecError, match="unknown type 'real'"):
        codec.layout("real")
    with pytest.raises(CodecError, match="needs 2 register"):
        decode([1], "float32")
    assert codec.normalise_order("float32", "cdab") == "CDAB"
    assert codec.normalise_order("uint64", None) == "ABCDEFGH"


def test_extra_words_are_ignored() -> None:
    assert decode(words_from_hex("0001 FFFF FFFF"), "uint16") == 1


def test_hex_helpers() -> None:
    assert words_from_hex("0x42F6,0xE979") == [0x42F6, 0xE979]
    assert words_from_hex("42F6E979") == [0x42F6, 0xE979]
    assert codec.words_to_hex([0x42F6, 0x0001]) == "42F6 0001"
    with pytest.raises(CodecError, match="4 digits each"):
        words_from_hex("42F")


def test_scale_and_offset() -> None:
    assert codec.scaled(215, 0.1) == pytest.approx(21.5)
    assert codec.scaled(100, 2, -5) == 195
    assert isinstance(codec.scaled(100, 2, -5), int)
    assert codec.scaled(7) == 7
    assert codec.unscaled(21.5, 0.1) == pytest.approx(215)
    assert codec.unscaled(195, 2, -5) == 100
    with pytest.raises(CodecError):
        codec.unscaled(1, 0)
