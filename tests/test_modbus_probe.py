"""``digispine-gateway probe modbus``: the ranking and collapsing of interpretations on their
own, and the whole command (``gateway.cli.main``) against a real pymodbus TCP server over a
real socket, with registers of known contents: a word-swapped float32, an int32 counter, a
scaled int16, text, a value at address 0 and values at the edges of the device's register map
(the Device of test_modbus_source: holding registers 0..199 and 250..299, 200..249 a hole).

The server runs in its own thread and event loop, since the command runs ``asyncio.run``
itself. Every printed snippet is loaded as a real mapping file.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.localbrokers import free_port
from gateway.mapping.loader import load_mappings
from gateway.mapping.spec import SignalSpec
from gateway.sources import modbus_codec as codec
from gateway.sources.modbus import ModbusAddress
from gateway.sources.modbus_probe import (
    Expect,
    Interpretation,
    ProbeError,
    attempts,
    collapse,
    interpret,
    plausible,
    rank,
    resolve_address,
    snippet,
)
from tests.test_modbus_source import Device

FLOAT_AT = 100          # float32 123.456, word swapped (CDAB): HMI 40101
COUNTER_AT = 110        # int32 1234567 (ABCD)
SCALED_AT = 120         # int16 2345, meaning 23.45
TEXT_AT = 130           # "PRESS07"
ZERO_VALUE = 21.5       # float32 (ABCD) at holding register 0
INPUT_AT = 5            # input register 5: int16 -42
COIL_AT = 3             # coil 3 set


# == pure: expectations, plausibility, collapsing, ranking =====================================


def test_expect_parses_numbers_with_their_precision_and_text() -> None:
    e = Expect.parse("23.45")
    assert e.number == 23.45 and e.half_unit == pytest.approx(0.005)
    assert Expect.parse("23,4").number == 23.4           # decimal comma, as HMIs show it
    assert Expect.parse("1200").half_unit == 0.5
    text = Expect.parse("PRESS07")
    assert text.number is None
    assert text.distance("PRESS07") == 0.0 and text.match("PRESS07") == "exact"
    assert 0 < text.distance("PRESS0") < text.distance("XYZ") <= 1.0
    assert math.isinf(text.distance(12.0)) and math.isinf(e.distance("23.45"))


def test_expect_distance_and_match() -> None:
    e = Expect.parse("23.45")
    assert e.distance(23.45) == 0.0 and e.match(23.45) == "exact"
    assert e.match(23.4512) == "rounds"                  # shows as 23.45 on the HMI
    assert e.match(23.46) == ""
    assert e.distance(23.6) == pytest.approx(0.15 / 23.45)
    assert Expect.parse("0").distance(0.25) == 0.25      # absolute when expecting 0
    assert Expect.parse("-5").distance(-5) == 0.0


def test_plausible_drops_nan_infinite_denormal_and_absurd_values() -> None:
    assert plausible("float32", 123.456) and plausible("float32", 0.0)
    assert not plausible("float32", math.nan) and not plausible("float64", math.inf)
    assert not plausible("float32", 1e-40)               # a float32 denormal
    assert not plausible("float64", 1e-310)              # a float64 denormal
    assert not plausible("float32", 3e-9)                # absurdly small for a process value
    assert not plausible("uint64", 2**63) and not plausible("float64", 5e13)
    assert plausible("uint32", 4_000_000_000)
    assert plausible("uint64", 2**50, Expect.parse(str(2**50)))  # huge, but expected
    assert plausible("string", "PRESS07")


def _i(type_: str, order: str | None, offset: int, value: Any, scale: float = 1,
       address: int = 100) -> Interpretation:
    length = len(value) if isinstance(value, str) else None
    return Interpretation(type_, order, offset, address + offset, scale, value, value, length)


def test_collapse_keeps_the_simplest_of_equal_values_and_lists_the_others() -> None:
    candidates = [
        _i("uint32", "CDAB", 0, 2345),
        _i("int32", "ABCD", -1, 2345),
        _i("uint16", "AB", 0, 2345),
        _i("int16", "AB", 0, 2345),
        _i("int16", "AB", 0, 23.45, scale=0.01),
        _i("float32", "ABCD", 0, 23.45),
        _i("float32", "CDAB", 0, 7.5),
    ]
    out = collapse(candidates)
    by_value = {c.value: c for c in out}
    assert set(by_value) == {2345, 23.45, 7.5}
    plain = by_value[2345]
    assert (plain.type, plain.order, plain.offset) == ("int16", "AB", 0)
    # the others, simplest first: same address before a neighbour, fewer registers first
    assert [a.label for a in plain.also] == ["uint16 @100", "uint32:CDAB @100", "int32 @99"]
    # a float32 and a scaled int16 of the same value: the unscaled one is simpler
    assert by_value[23.45].type == "float32"
    assert [a.label for a in by_value[23.45].also] == ["int16 @100 x0.01"]


def test_rank_orders_by_closeness_then_simplicity_and_marks_matches() -> None:
    candidates = collapse([
        _i("float32", "ABCD", 0, 120.0),
        _i("float32", "CDAB", 0, 123.456),
        _i("int16", "AB", 1, 123),
        _i("uint16", "AB", -1, 123.5, scale=0.1),
        _i("string", "AB", 0, "AB"),
    ])
    ranked = rank(candidates, Expect.parse("123.456"))
    assert [r.value for r in ranked] == [123.456, 123.5, 123, 120.0]  # text is not a number
    assert ranked[0].match == "exact" and ranked[0].distance == 0.0
    assert [r.match for r in ranked[1:]] == ["", "", ""]
    assert ranked[1].distance == pytest.approx(0.044 / 123.456)
    # equally close: the simpler first (the address given before a neighbour)
    tie = rank(collapse([_i("int16", "AB", 1, 50), _i("int16", "AB", 0, 60)]),
               Expect.parse("55"))
    assert [t.offset for t in tie] == [0, 1]


def test_interpret_decodes_every_type_and_order_with_the_codec() -> None:
    words = [0x0000, *codec.encode(123.456, "float32", "CDAB"), 0x0000, 0x0000, 0x0000]
    found = interpret(words, 99, 100)
    exact = [c for c in found if c.value == 123.456]
    assert [(c.type, c.order, c.offset, c.address) for c in exact] == \
        [("float32", "CDAB", 0, 100)]
    kinds = {(c.type, c.order) for c in found if c.offset == 0}
    for type_ in ("int16", "uint16", "int32", "uint32"):
        for order in codec.orders_for(type_):
            assert (type_, order) in kinds or type_.startswith("u"), (type_, order)
    # every value is what the codec says for that layout at that address
    for c in found:
        if c.type != "string":
            assert c.raw == codec.decode(words[c.address - 99:], c.type, c.order)
    # 64-bit values are tried only when four registers are there
    assert not [c for c in interpret(words[:3], 99, 100) if c.registers == 4]


def test_interpret_scales_integers_and_finds_text() -> None:
    scaled = interpret([2345], 120, 120, scales=(1, 0.1, 0.01, 0.001, 10, 100))
    values = {(c.type, c.order, c.scale): c.value for c in scaled}
    assert values[("int16", "AB", 0.01)] == 23.45         # rounded: not 23.450000000000003
    assert values[("int16", "AB", 100)] == 234500
    assert values[("uint16", "AB", 0.001)] == 2.345
    text = interpret(codec.encode("PRESS07", "string", length=8), 0, 0)
    strings = {(c.order, c.offset): c.value for c in text if c.type == "string"}
    assert strings[("AB", 0)] == "PRESS07"
    assert strings[("AB", 1)] == "ESS07"


def test_attempts_drop_the_neighbours_then_shrink() -> None:
    assert attempts(100, 4)[:4] == [(99, 6), (100, 5), (99, 5), (100, 4)]
    assert attempts(100, 4)[4:] == [(99, 4), (100, 3), (99, 3), (100, 2), (99, 2), (100, 1)]
    assert attempts(0, 4)[0] == (0, 5)                   # nothing below address 0
    assert attempts(65535, 4)[0] == (65534, 2)           # nothing above 65535
    assert all(s <= 100 < s + n for s, n in attempts(100, 4))


def test_resolve_address() -> None:
    assert resolve_address("40101", None)[:2] == ("holding_register", 100)
    assert resolve_address("400101", None)[:2] == ("holding_register", 100)
    assert resolve_address("4x0101", None)[:2] == ("holding_register", 100)
    assert resolve_address("3x0001", None)[:2] == ("input_register", 0)
    assert resolve_address("30006", None)[:2] == ("input_register", 5)
    assert resolve_address("00017", None)[:2] == ("coil", 16)
    assert resolve_address("100", None)[:2] == ("holding_register", 100)
    assert resolve_address("5", "input_register")[:2] == ("input_register", 5)
    table, address, note = resolve_address("40101", "holding_register")
    assert (table, address) == ("holding_register", 40101)   # zero-based with --table...
    assert "for the HMI reference (holding register 100) omit --table" in note  # ...said so
    for text, table_, words in [("4x0000", None, "count from 1"),
                                ("abc", None, "no address"),
                                ("3x0001", "holding_register",
                                 "is input register 0 (HMI numbering), but --table is holding"),
                                ("470000", "holding_register", "is not an HMI reference"),
                                ("20001", None, "no Modbus table")]:
        with pytest.raises(ProbeError) as info:
            resolve_address(text, table_)
        assert words in str(info.value) and info.value.code == 64


def _load_snippet(tmp_path: Path, text: str, connection: str = "plc") -> SignalSpec:
    """The snippet as a signal of a real mapping file, loaded and checked like `validate`."""
    name = text.strip().split(":")[0]
    folder = tmp_path / f"snippet{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "probe.yaml").write_text(
        "version: 1\nasset: {subject: acme/plant1/probe}\nsignals:\n" + text + "\n"
        f"events:\n  probed:\n    type: test.Probed.v1\n"
        f"    trigger: {{kind: on_change, signal: {name}}}\n"
        f"    data:\n      value: {{signal: {name}}}\n", encoding="utf-8")
    files = load_mappings(folder, {connection: "modbus"})
    spec = files[0].spec.signals[name]
    assert isinstance(spec.modbus, ModbusAddress)
    return spec


def test_snippets_are_valid_signal_entries(tmp_path: Path) -> None:
    float_cdab = _i("float32", "CDAB", -1, 123.456, address=101)
    spec = _load_snippet(tmp_path, snippet("plc", 2, "holding_register", float_cdab))
    assert spec.modbus is not None and spec.modbus.tag == "u2/hr/100:float32:CDAB"
    assert spec.type == "float" and spec.scale == 1.0
    scaled = _i("int16", "AB", 0, 23.45, scale=0.01, address=120)
    spec = _load_snippet(tmp_path, snippet("plc", 1, "input_register", scaled))
    assert spec.modbus is not None and spec.modbus.tag == "u1/ir/120:int16"
    assert (spec.type, spec.scale) == ("float", 0.01)
    tens = _i("uint32", "CDAB", 0, 5000, scale=10)
    spec = _load_snippet(tmp_path, snippet("plc", 1, "holding_register", tens))
    assert (spec.type, spec.scale) == ("integer", 10.0)
    text = Interpretation("string", "BA", 0, 7, 1, "AB CD", "AB CD", length=5)
    spec = _load_snippet(tmp_path, snippet("plc", 1, "holding_register", text))
    assert spec.modbus is not None and spec.modbus.tag == "u1/hr/7:string[5]:BA"
    coil = snippet("plc", 1, "coil", None, 16)
    spec = _load_snippet(tmp_path, coil)
    assert spec.modbus is not None and spec.modbus.tag == "u1/co/16:bool"
    assert spec.type == "boolean"
    assert "HMI 00017" in coil


# == the command against a real device =======================================================


@dataclass
class Served:
    device: Device
    loop: asyncio.AbstractEventLoop
    config: Path

    def call(self, fn: Any) -> None:
        """Run ``fn`` on the server's loop (the device is not thread-safe)."""
        done = threading.Event()

        def wrapped() -> None:
            fn()
            done.set()

        self.loop.call_soon_threadsafe(wrapped)
        assert done.wait(5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="modbus-server", daemon=True)
    thread.start()
    device = Device(free_port())
    asyncio.run_coroutine_threadsafe(device.start(), loop).result(10)
    folder = tmp_path_factory.mktemp("probe")
    config = folder / "gateway.yaml"
    config.write_text(
        "gateway: {id: probe-test}\n"
        "connections:\n"
        f"  plc: {{protocol: modbus, host: 127.0.0.1, port: {device.port}, timeout_ms: 500}}\n"
        "  line_mqtt: {protocol: mqtt, host: 127.0.0.1}\n"
        "mappings: {directory: mappings}\n", encoding="utf-8")
    served = Served(device, loop, config)

    def fill() -> None:
        device.set_words(1, "holding_register", FLOAT_AT, codec.encode(123.456, "float32", "CDAB"))
        device.set_words(1, "holding_register", COUNTER_AT, codec.encode(1234567, "int32"))
        device.set_words(1, "holding_register", SCALED_AT, [2345])
        device.set_words(1, "holding_register", TEXT_AT,
                         codec.encode("PRESS07", "string", length=8))
        device.set_words(1, "holding_register", 0, codec.encode(ZERO_VALUE, "float32"))
        device.set_words(1, "holding_register", 198, [0x1111, 0x2222])
        device.set_words(1, "holding_register", 250, [0x3333])
        device.set_words(1, "input_register", INPUT_AT, codec.encode(-42, "int16"))
        device.set_bit(1, "coil", COIL_AT, True)

    served.call(fill)
    try:
        yield served
    finally:
        asyncio.run_coroutine_threadsafe(device.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def probe(served: Served, capsys: pytest.CaptureFixture[str], *args: str
          ) -> tuple[int, str, str]:
    code = main(["probe", "modbus", "-c", str(served.config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def probe_json(served: Served, capsys: pytest.CaptureFixture[str], *args: str
               ) -> tuple[int, dict[str, Any]]:
    code, out, err = probe(served, capsys, *args, "--json")
    assert err == ""
    return code, json.loads(out)


def ranking(out: str) -> list[str]:
    """The rows of the printed ranking (after its header line), numbered from 1."""
    lines = out.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("Closest to")) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip() or not line.split()[0].isdigit():
            break  # a blank line or the note after the ranking
        rows.append(line)
    assert [r.split()[0] for r in rows] == [str(n) for n in range(1, len(rows) + 1)]
    return rows


def snippet_of(out: str) -> str:
    lines = out.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("Mapping snippet"))
    return "\n".join(lines[start + 1:])


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_word_swapped_float_is_ranked_first_with_its_order(
        served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = probe(served, capsys, "plc", "--address", "40101", "--expect", "123.456")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"plc at 127.0.0.1:{served.device.port}, unit 1, holding "
                               f"registers 99..104 (asked: 100 = HMI 40101")
    assert "> 100      40101    0xE979" in out and "> 101      40102    0x42F6" in out
    first = ranking(out)[0]
    assert first.split()[1:4] == ["123.456", "float32:CDAB", "@100"]
    assert "exact" in first
    spec = _load_snippet(tmp_path, snippet_of(out))
    assert spec.modbus is not None and spec.modbus.tag == "u1/hr/100:float32:CDAB"
    assert spec.type == "float" and spec.connection == "plc"

    code, report = probe_json(served, capsys, "plc", "--address", "40101", "--expect",
                              "123.456")
    assert code == 0 and report["close"] is True
    best = report["interpretations"][0]
    assert (best["type"], best["order"], best["address"], best["offset"], best["match"]) == \
        ("float32", "CDAB", 100, 0, "exact")
    assert report["read"] == {"first": 99, "values": [0, 0xE979, 0x42F6, 0, 0, 0],
                              "refused": []}
    assert report["signal"] == {"connection": "plc", "type": "float", "modbus": {
        "unit": 1, "table": "holding_register", "address": 100, "type": "float32",
        "order": "CDAB"}}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_an_int32_counter(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = probe_json(served, capsys, "plc", "--address", str(COUNTER_AT),
                              "--table", "holding", "--expect", "1234567")
    assert code == 0
    best = report["interpretations"][0]
    assert (best["type"], best["order"], best["address"], best["scale"], best["match"]) == \
        ("int32", "ABCD", COUNTER_AT, 1, "exact")
    assert "uint32 @110" in best["also"]
    second = report["interpretations"][1]
    assert second["distance"] > 0.01 and second["match"] is None
    assert report["signal"]["type"] == "integer"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_scaled_int16(served: Served, capsys: pytest.CaptureFixture[str],
                        tmp_path: Path) -> None:
    code, out, _ = probe(served, capsys, "plc", "--address", "4x0121", "--expect", "23.45",
                         "--top", "3")
    assert code == 0
    ranked = ranking(out)
    assert len(ranked) == 3                              # --top
    assert ranked[0].split()[:4] == ["1", "23.45", "int16", "@120"]
    assert "x0.01" in ranked[0] and "exact" in ranked[0]
    spec = _load_snippet(tmp_path, snippet_of(out))
    assert spec.modbus is not None and spec.modbus.tag == "u1/hr/120:int16"
    assert (spec.type, spec.scale) == ("float", 0.01)
    # the HMI shows one decimal less: still found, as rounding to it
    code, report = probe_json(served, capsys, "plc", "--address", "40121", "--expect", "23.5")
    assert code == 0
    assert report["interpretations"][0]["scale"] == 0.01
    assert report["interpretations"][0]["match"] == "rounds"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_an_hmi_number_one_too_high_is_found_one_register_below(
        served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = probe(served, capsys, "plc", "--address", "40102", "--expect", "123.456")
    assert code == 0
    first = ranking(out)[0]
    assert first.split()[1:4] == ["123.456", "float32:CDAB", "@100"]
    snip = snippet_of(out)
    assert "address: 100," in snip and "HMI 40101" in snip
    spec = _load_snippet(tmp_path, snip)
    assert spec.modbus is not None and spec.modbus.location == ("holding_register", 100)
    code, report = probe_json(served, capsys, "plc", "--address", "40102", "--expect",
                              "123.456")
    assert report["address"] == 101 and report["read"]["first"] == 100
    assert report["interpretations"][0]["offset"] == -1
    assert report["signal"]["modbus"]["address"] == 100
    spec = _load_snippet(tmp_path, report["snippet"])
    assert spec.modbus is not None and spec.modbus.tag == "u1/hr/100:float32:CDAB"
    assert "note: #1 starts one register below the address given (101)" in out


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_address_zero(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    for address in (["--address", "0", "--table", "holding"], ["--address", "40001"]):
        code, report = probe_json(served, capsys, "plc", *address, "--expect", "21.5")
        assert code == 0
        assert report["read"]["first"] == 0 and report["read"]["refused"] == []
        assert len(report["read"]["values"]) == 5           # nothing below 0: 0..4
        best = report["interpretations"][0]
        assert (best["type"], best["order"], best["address"], best["match"]) == \
            ("float32", "ABCD", 0, "exact")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_edges_of_the_register_map_are_read_without_the_missing_neighbours(
        served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    # 250 is the first register after the hole 200..249: the one below is refused
    code, report = probe_json(served, capsys, "plc", "--address", "250", "--table", "holding",
                              "--expect", str(0x3333))
    assert code == 0
    assert report["read"]["first"] == 250 and report["read"]["values"][:1] == [0x3333]
    assert report["read"]["refused"] == ["249..254 (exception 2 (illegal data address))"]
    assert report["interpretations"][0]["address"] == 250
    # 199 is the last before the hole: the device has only 198..199 of 198..203
    code, out, _ = probe(served, capsys, "plc", "--address", "199", "--table", "holding",
                         "--expect", str(0x2222))
    assert code == 0
    assert "holding registers 198..199" in out.splitlines()[0]
    assert "note: the device refused 198..203 (exception 2 (illegal data address)) and" in out
    first = ranking(out)[0]
    assert first.split()[1:4] == [str(0x2222), "int16", "@199"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_text_and_the_guess_without_expect(served: Served, capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    code, out, _ = probe(served, capsys, "plc", "--address", str(TEXT_AT), "--table",
                         "holding")
    assert code == 0
    assert "  text (AB): 'PRESS07'" in out
    assert "a guess: give --expect to rank" in out
    spec = _load_snippet(tmp_path, snippet_of(out))
    assert spec.modbus is not None and spec.modbus.tag == "u1/hr/130:string[7]"
    assert spec.type == "string"
    code, report = probe_json(served, capsys, "plc", "--address", str(TEXT_AT), "--table",
                              "holding", "--expect", "PRESS07")
    assert code == 0 and report["interpretations"][0]["value"] == "PRESS07"
    assert report["interpretations"][0]["match"] == "exact"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_compact_table_without_expect(served: Served,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = probe(served, capsys, "plc", "--address", "40101")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("type "))
    assert header.split() == ["type", "big-endian", "(ABCD)", "word", "swap", "(CDAB)", "byte",
                              "swap", "(BADC)", "little-endian", "(DCBA)"]
    row = next(line for line in lines if line.strip().startswith("float32"))
    column = header.index("word swap")
    assert row[column:].split()[0] == "123.456"
    int16 = next(line for line in lines if line.strip().startswith("int16"))
    assert int16.split()[1:] == [str(codec.decode([0xE979], "int16")),
                                 str(codec.decode([0xE979], "int16", "BA"))]
    assert "Plausible floats one register off:" in out
    assert "123.0  float32 @101" in out                  # 0x42F6 0x0000 read big-endian
    snip = snippet_of(out)
    assert "type: float32, order: CDAB" in snip


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_input_registers_and_coils(served: Served, capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path) -> None:
    code, report = probe_json(served, capsys, "plc", "--address", f"3{INPUT_AT + 1:04d}",
                              "--expect", "-42")
    assert code == 0 and report["table"] == "input_register"
    assert report["interpretations"][0]["type"] == "int16"
    assert report["signal"]["modbus"] == {"unit": 1, "table": "input_register",
                                          "address": INPUT_AT, "type": "int16"}
    code, out, _ = probe(served, capsys, "plc", "--address", str(COIL_AT), "--table", "coil")
    assert code == 0
    assert f"> {COIL_AT:<8} {COIL_AT + 1:05d}    1" in out
    spec = _load_snippet(tmp_path, snippet_of(out))
    assert spec.modbus is not None and spec.modbus.tag == f"u1/co/{COIL_AT}:bool"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_nothing_close_says_so_with_hints_and_no_snippet(
        served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = probe(served, capsys, "plc", "--address", "40101", "--expect", "77.7")
    assert code == 1 and err == ""
    assert "No reading is within 1% of 77.7" in out
    assert "--unit 1" in out and "try --table input" in out
    assert "No snippet: no reading is close" in out and "Mapping snippet" not in out
    code, out, _ = probe(served, capsys, "plc", "--address", "40101", "--expect", "77.7",
                         "--pick", "2")
    assert code == 1 and "Mapping snippet" in out and "#2" in out


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_unknown_connection(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = probe(served, capsys, "nope", "--address", "40001")
    assert code == 64 and out == ""
    line = _one_line(err)
    assert line.startswith("digispine-gateway: probe modbus: no connection 'nope'")
    assert line.endswith("Modbus connections: plc")
    code, _, err = probe(served, capsys, "line_mqtt", "--address", "40001")
    assert code == 64
    assert "connection 'line_mqtt'" in _one_line(err) and "is mqtt, not modbus" in err


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_unreachable_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text("gateway: {id: probe-test}\nconnections:\n"
                      f"  plc: {{protocol: modbus, host: 127.0.0.1, port: {port}}}\n",
                      encoding="utf-8")
    code = main(["probe", "modbus", "-c", str(config), "plc", "--address", "40001",
                 "--timeout-s", "1"])
    out, err = capsys.readouterr()
    assert code == 69 and out == ""
    line = _one_line(err)
    assert f"plc (127.0.0.1:{port}) unit 1 holding register 0: cannot reach the device: " \
           f"Connection refused" in line
    assert "check host and port of connections.plc" in line


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_unit_that_does_not_answer_and_an_exception(
        served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    served.call(lambda: served.device.dead.add(2))
    try:
        code, _, err = probe(served, capsys, "plc", "--unit", "2", "--address", "40001",
                             "--timeout-s", "0.3")
    finally:
        served.call(served.device.revive)
    assert code == 69
    line = _one_line(err)
    assert "plc (127.0.0.1:" in line and "unit 2 holding register 0: no answer within 0.3 s" \
        in line
    assert "check the unit id (--unit" in line
    # 220 is in the hole: no narrower read helps
    code, _, err = probe(served, capsys, "plc", "--address", "220", "--table", "holding")
    assert code == 76
    line = _one_line(err)
    assert "unit 1 holding register 220: the device answered exception 2 (illegal data " \
           "address)" in line
    assert "check table, address and numbering" in line


def test_bad_arguments_are_one_line(served: Served, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    code, _, err = probe(served, capsys, "plc", "--address", "4x0000")
    assert code == 64 and "--address 4x0000" in _one_line(err)
    code, _, err = probe(served, capsys, "plc", "--address", "1", "--count", "0")
    assert code == 64 and "--count 0" in _one_line(err)
    with pytest.raises(SystemExit):
        main(["probe", "modbus", "-c", str(served.config), "plc", "--address", "1",
              "--table", "registers"])
    assert "expected holding, input, coil or discrete" in capsys.readouterr().err
