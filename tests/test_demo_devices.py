"""The demo's OPC UA server and Modbus device: what docs/sources.md ("Demo devices") documents,
read with plain clients and with the gateway's own sources and example mappings."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusTcpClient

from gateway.demo.modbus_device import (
    FAULT_CODES,
    PACK_STATES,
    REGISTER_MAP,
    UNIT,
    PackagingDevice,
)
from gateway.demo.opcua_server import (
    CNC_STATES,
    NAMESPACE_URI,
    SPINDLE_RANGE_RPM,
    VARIABLES,
    MachiningServer,
    ensure_certificate,
)
from gateway.errors import SourceUnavailable
from gateway.localbrokers import free_port
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import Quality, Signal
from gateway.settings import GatewaySettings, load_settings
from gateway.sources import modbus_codec as codec
from gateway.sources.base import Delivery
from gateway.sources.modbus import ModbusConnectionConfig, ModbusSource
from gateway.sources.opcua import OpcUaConnectionConfig, OpcUaSource

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "gateway.yaml"


def shipped() -> tuple[GatewaySettings, dict[str, list[Any]]]:
    """The example config and what its mappings read, per connection."""
    settings = load_settings(CONFIG)
    files = load_mappings(settings.mappings.directory,
                          {n: c.protocol for n, c in settings.connections.items()})
    return settings, Mapper(files, settings.gateway.id).bindings()


async def first_delivery(source: Any, want: int, timeout_s: float = 20.0) -> list[Signal]:
    """Run ``source`` until deliveries carried ``want`` distinct tags; the latest per tag."""
    latest: dict[str, Signal] = {}
    done = asyncio.Event()

    async def emit(delivery: Delivery) -> None:
        for signal in delivery.signals:
            latest[signal.tag] = signal
        if len(latest) >= want:
            done.set()

    task = asyncio.create_task(source.run(emit))
    try:
        waiter = asyncio.create_task(done.wait())
        await asyncio.wait([task, waiter], timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # raises what ended the source
        assert done.is_set(), f"only {sorted(latest)} within {timeout_s} s"
        return list(latest.values())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# == Modbus ===================================================================================


@pytest.fixture
def device() -> Iterator[PackagingDevice]:
    # Near the uint32 wrap, running, and no ticks of its own: the test advances it.
    dev = PackagingDevice("127.0.0.1", free_port(), interval_s=3600, seed=7,
                          packs_produced=2**32 - 5, state="Running")
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


def read_all(client: ModbusTcpClient) -> dict[str, Any]:
    """Every entry of the documented register map, decoded with the gateway's codec."""
    holding = client.read_holding_registers(0, count=8, device_id=UNIT).registers
    coils = client.read_coils(0, count=1, device_id=UNIT).bits
    inputs = client.read_discrete_inputs(0, count=2, device_id=UNIT).bits
    out: dict[str, Any] = {}
    for entry in REGISTER_MAP:
        if entry.table == "holding_register":
            size = codec.register_count(entry.type)
            words = holding[entry.address:entry.address + size]
            out[entry.name] = codec.decode(words, entry.type, entry.order)
        else:
            out[entry.name] = (coils if entry.table == "coil" else inputs)[entry.address]
    out["_words"] = holding
    return out


def test_modbus_register_map_decodes_as_documented(device: PackagingDevice) -> None:
    client = ModbusTcpClient("127.0.0.1", port=device.port)
    assert client.connect()
    try:
        model = device.model
        values = read_all(client)
        assert values["status"] == PACK_STATES.index("Running") == 1
        assert values["jaw_temperature"] == round(model.jaw_c * 10)      # int16, x10
        assert 1600 <= values["jaw_temperature"] <= 1800
        assert values["packs_produced"] == model.packs_produced == 2**32 - 5
        (expected_air,) = struct.unpack(">f", struct.pack(">f", model.air_bar))
        assert values["air_pressure"] == pytest.approx(expected_air, rel=1e-6)
        high, low = struct.unpack(">HH", struct.pack(">f", model.air_bar))
        assert values["_words"][4:6] == [low, high]                       # CDAB: low word first
        assert values["speed"] == model.speed_ppm
        assert values["fault_code"] == 0
        assert (values["motor_on"], values["alarm"]) == (True, False)
        assert values["film_low"] == model.film_low

        # Two packs/s or so: ten seconds later the uint32 counter has wrapped.
        device.advance(10.0)
        values = read_all(client)
        assert values["packs_produced"] == device.model.packs_produced
        assert values["packs_produced"] < 100

        # Read-only: a write is refused as an illegal data address.
        answer = client.write_register(0, 3, device_id=UNIT)
        assert answer.isError() and answer.exception_code == 2
    finally:
        client.close()


def test_modbus_fault_sets_alarm_and_fault_code(device: PackagingDevice) -> None:
    device.model._enter("Fault")
    device.advance(0.5)
    registers, coils, inputs = device.registers()
    assert registers[0] == PACK_STATES.index("Fault")
    assert registers[7] in FAULT_CODES
    assert (coils[0], inputs[0]) == (False, True)


async def test_gateway_reads_pack01_from_the_device(device: PackagingDevice) -> None:
    """The Modbus source, with the addresses of mappings/pack01.yaml, reads good values."""
    settings, bindings = shipped()
    conn = settings.connections["packaging_modbus"]
    assert isinstance(conn, ModbusConnectionConfig)
    addresses = bindings["packaging_modbus"]
    source = ModbusSource("packaging_modbus",
                          conn.model_copy(update={"port": device.port}), addresses, Metrics())
    signals = await first_delivery(source, len(addresses))
    by_tag = {s.tag: s for s in signals}
    assert all(s.quality == Quality.GOOD for s in signals), signals
    model = device.model
    assert by_tag["u1/hr/0:uint16"].value == 1
    assert by_tag["u1/hr/2:uint32"].value == model.packs_produced
    assert by_tag["u1/hr/4:float32:CDAB"].value == pytest.approx(model.air_bar, rel=1e-6)
    assert by_tag["u1/hr/1:int16"].value == round(model.jaw_c * 10)
    assert by_tag["u1/co/0:bool"].value is True


# == OPC UA ===================================================================================


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MachiningServer]:
    srv = MachiningServer("127.0.0.1", free_port(), pki_dir=tmp_path / "server", seed=11,
                          interval_s=3600, trusted_client_dir=tmp_path / "server" / "trusted",
                          part_counts={"CNC-101": 2**32 - 2}, states={"CNC-101": "Running"})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def client_certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert = ensure_certificate(tmp_path / name / "cert.der", tmp_path / name / "key.pem",
                              common_name=name, application_uri=f"urn:test:{name}", client=True)
    return cert, tmp_path / name / "key.pem"


async def secure_client(server: MachiningServer, cert: Path, key: Path, name: str) -> Any:
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(server.endpoint, timeout=5)
    client.application_uri = f"urn:test:{name}"
    await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                              server_certificate=str(server.certificate),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    return client


async def test_opcua_server_exposes_the_documented_nodes(server: MachiningServer,
                                                         tmp_path: Path) -> None:
    from asyncua import ua

    cert, key = client_certificate(tmp_path, "reader")
    assert server.trusted_client_dir is not None
    server.trusted_client_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cert, server.trusted_client_dir / "reader.der")
    client = await secure_client(server, cert, key, "reader")
    async with client:
        namespaces = await client.get_namespace_array()
        idx = namespaces.index(NAMESPACE_URI)
        machines = await client.nodes.objects.get_child([f"{idx}:Machines"])
        children = await machines.get_children()
        names = sorted([(await n.read_browse_name()).to_string() for n in children])
        assert names == [f"{idx}:CNC-101", f"{idx}:CNC-102"]
        kinds = {"State": ua.VariantType.Int32, "SpindleSpeed": ua.VariantType.Double,
                 "PartCount": ua.VariantType.UInt32, "Temperature": ua.VariantType.Double}
        for machine in ("CNC-101", "CNC-102"):
            model = server.models[machine].values()
            for variable in VARIABLES:
                by_path = await machines.get_child([f"{idx}:{machine}", f"{idx}:{variable}"])
                assert by_path.nodeid == ua.NodeId(f"{machine}.{variable}", idx)
                dv = await by_path.read_data_value()
                assert dv.Value.VariantType == kinds[variable]
                assert dv.Value.Value == model[variable]
                assert dv.SourceTimestamp is not None
        state = client.get_node(ua.NodeId("CNC-101.State", idx))
        assert CNC_STATES[await state.read_value()] == "Running"
        labels = await (await state.get_child(["0:EnumStrings"])).read_value()
        assert [t.Text for t in labels] == list(CNC_STATES)
        speed = client.get_node(ua.NodeId("CNC-101.SpindleSpeed", idx))
        eu_range = await (await speed.get_child(["0:EURange"])).read_value()
        assert (eu_range.Low, eu_range.High) == SPINDLE_RANGE_RPM

        # The part counter is a UInt32 and wraps.
        count = client.get_node(ua.NodeId("CNC-101.PartCount", idx))
        assert await count.read_value() == 2**32 - 2
        server.advance(60.0)
        after = await count.read_value()
        assert after == server.models["CNC-101"].part_count < 100


async def test_opcua_server_refuses_an_untrusted_client(server: MachiningServer,
                                                        tmp_path: Path) -> None:
    cert, key = client_certificate(tmp_path, "stranger")
    client = await secure_client(server, cert, key, "stranger")
    with pytest.raises(Exception, match="BadCertificateUntrusted"):
        await client.connect()
    with contextlib.suppress(Exception):  # the half-open client cleans up
        await client.disconnect()


async def test_gateway_reads_the_cnc_mappings_over_a_trusted_secure_channel(
        server: MachiningServer, tmp_path: Path) -> None:
    """The demo's trust set-up (stack._point_at_opcua) lets the gateway's OPC UA source read
    every address of mappings/cnc101.yaml and cnc102.yaml with Basic256Sha256/SignAndEncrypt."""
    from gateway.demo.stack import _point_at_opcua

    settings, bindings = shipped()
    state = tmp_path / "state"
    env = _point_at_opcua("machining_opcua", settings, server, state, tmp_path)
    assert env == {"DIGISPINE_CONNECTIONS__MACHINING_OPCUA__ENDPOINT": server.endpoint}
    conn = settings.connections["machining_opcua"]
    assert isinstance(conn, OpcUaConnectionConfig)
    assert (conn.security_policy, conn.security_mode) == ("Basic256Sha256", "SignAndEncrypt")
    addresses = bindings["machining_opcua"]
    source = OpcUaSource("machining_opcua",
                         conn.model_copy(update={"endpoint": server.endpoint}), addresses,
                         Metrics(), pki_dir=state / conn.pki_dir,
                         application_uri=f"urn:digispine:edge-gateway:{settings.gateway.id}")
    signals = await first_delivery(source, len(addresses))
    assert len(signals) == len(addresses) == 8
    assert all(s.quality == Quality.GOOD for s in signals), signals
    by_tag = {s.tag: s.value for s in signals}
    cnc101 = server.models["CNC-101"].values()
    assert by_tag[f"nsu={NAMESPACE_URI};s=CNC-101.State"] == cnc101["State"]
    assert by_tag[f"nsu={NAMESPACE_URI};s=CNC-101.PartCount"] == cnc101["PartCount"]
    assert math.isclose(by_tag["Objects/Machines/CNC-101/Temperature"], cnc101["Temperature"])
    cnc102 = server.models["CNC-102"].values()
    assert by_tag[f"Objects/<{NAMESPACE_URI}>:Machines/CNC-102/State"] == cnc102["State"]
    assert by_tag["Objects/Machines/CNC-102/PartCount"] == cnc102["PartCount"]


async def test_without_the_pre_trust_the_gateway_refuses_the_server(
        server: MachiningServer, tmp_path: Path) -> None:
    settings, bindings = shipped()
    conn = settings.connections["machining_opcua"]
    assert isinstance(conn, OpcUaConnectionConfig)
    pki = tmp_path / "pki"
    source = OpcUaSource("machining_opcua",
                         conn.model_copy(update={"endpoint": server.endpoint}),
                         bindings["machining_opcua"], Metrics(), pki_dir=pki)
    with pytest.raises(SourceUnavailable, match="not trusted"):
        await source.run(lambda _d: asyncio.sleep(0))
    assert list((pki / "rejected").glob("*.der"))


# == the example config and mappings ============================================================


@pytest.mark.parametrize("command", [["validate"], ["validate", "--plan"], ["test"]])
def test_validate_and_test_pass_on_the_examples(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", *command, "--config", str(CONFIG)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if command == ["test"]:
        for name in ("cnc101.yaml", "cnc102.yaml", "pack01.yaml"):
            assert f"PASS  {name}" in proc.stdout
        assert "FAIL" not in proc.stdout
    elif command == ["validate", "--plan"]:
        assert "unit 1 holding registers 0..7 (8)" in proc.stdout
        assert "u1/hr/4:float32:CDAB" in proc.stdout


def test_a_device_that_cannot_listen_says_where(tmp_path: Path) -> None:
    """A port in use: start() raises one line naming the device and its address."""
    import socket

    from gateway.demo.opcua_server import MachiningServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MachiningServer(port=port, pki_dir=tmp_path / "pki", interval_s=1.0)
        with pytest.raises(RuntimeError, match=f"the OPC UA server cannot serve "
                                               f"opc.tcp://127.0.0.1:{port}: "):
            server.start()
