"""OPC UA addressing and settings without a server: node ids and browse paths, the address block
of the mapping files and the loader's lint, the connection settings, the daemon's wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.app.daemon import build_sources
from gateway.errors import ConfigError
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import Quality
from gateway.settings import GatewaySettings
from gateway.sources.opcua import (
    OpcUaAddress,
    OpcUaConnectionConfig,
    OpcUaSource,
    overflowed,
    parse_browse_path,
    parse_node_id,
    quality_of,
    status_name,
)

URI = "urn:acme:machines"


# --- node ids and paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        (f"nsu={URI};s=Machine1.State", f"nsu={URI};s=Machine1.State"),
        (f"nsu={URI};i=0006012", f"nsu={URI};i=6012"),
        (f"nsu={URI};g=72962B91-FA75-4AE6-8D28-B404DC7DAF63",
         f"nsu={URI};g=72962b91-fa75-4ae6-8d28-b404dc7daf63"),
        (f"nsu={URI};b=AAEC", f"nsu={URI};b=AAEC"),
        (f"nsu={URI};s=a;b=c", f"nsu={URI};s=a;b=c"),  # a string id may hold ; and =
        ("i=2258", "i=2258"),
        ("ns=0;i=2258", "i=2258"),
        ("nsu=http://opcfoundation.org/UA/;i=2258", "i=2258"),
        ("ns=3;s=X", "ns=3;s=X"),
    ],
)
def test_node_ids_have_one_canonical_tag(text: str, tag: str) -> None:
    assert parse_node_id(text).canonical == tag
    extra = {"allow_namespace_index": True} if text.startswith("ns=3") else {}
    assert OpcUaAddress(node=text, **extra).tag == tag


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Machine1.State", "is not a node id; expected nsu=<namespace URI>;<i|s|g|b>="),
        ("nsu=;s=X", "nsu= needs a namespace URI"),
        (f"nsu={URI};i=12x", "i= takes a whole number"),
        (f"nsu={URI};i=4294967296", "i= takes a whole number"),
        (f"nsu={URI};g=not-a-guid", "g= takes a GUID"),
        (f"nsu={URI};b=***", "b= takes base64 text"),
        (f"nsu={URI};s=", "s= needs a string identifier"),
        ("ns=70000;i=1", "namespace index 70000 is out of range"),
    ],
)
def test_malformed_node_ids_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("=", "=")):
        parse_node_id(text)


def test_paths_parse_with_and_without_namespace_qualification() -> None:
    segments = parse_browse_path("Objects/Machines/<urn:acme:machines>:CNC-101/State")
    assert [(s.name, s.namespace_uri) for s in segments] == [
        ("Machines", None), ("CNC-101", "urn:acme:machines"), ("State", None)]
    # A qualified segment's URI may hold slashes and colons.
    address = OpcUaAddress(path="Objects/<http://acme.com/UA/Machines/>:CNC-101/State")
    assert address.tag == "Objects/<http://acme.com/UA/Machines/>:CNC-101/State"
    assert address.segments is not None and address.segments[0].name == "CNC-101"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Machines/CNC-101/State", "a browse path starts at the Objects folder"),
        ("/Objects/Machines", "a browse path starts at the Objects folder"),
        ("Objects/Machines//State", "empty segment"),
        ("Objects/Machines/", "empty segment"),
        ("Objects/<urn:x/State", "a qualified segment is <namespace URI>:Name"),
        ("Objects/<>:State", "needs a namespace URI"),
    ],
)
def test_malformed_paths_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_browse_path(text)


# --- the address block -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one of node"),
        ({"node": "i=2258", "path": "Objects/X"}, "exactly one of node"),
        ({"node": "i=2258", "mode": "poll"}, "mode: poll needs poll_interval_ms"),
        ({"node": "i=2258", "mode": "poll", "poll_interval_ms": 500, "queue_size": 5},
         "queue_size apply to mode: subscribe only"),
        ({"node": "i=2258", "poll_interval_ms": 500}, "poll_interval_ms applies to mode: poll only"),
        ({"node": "i=2258", "deadband": {}}, "exactly one of absolute or percent"),
        ({"node": "i=2258", "deadband": {"absolute": 1, "percent": 2}},
         "exactly one of absolute or percent"),
        ({"node": "i=2258", "deadband": {"percent": 150}}, "less than or equal to 100"),
        ({"node": "i=2258", "deadband": {"absolute": 1}, "trigger": "status"},
         "trigger: status reports status changes only"),
        ({"node": "i=2258", "trigger": "value"}, "status_value"),
    ],
)
def test_address_block_rules(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OpcUaAddress.model_validate(fields)


def test_address_defaults() -> None:
    address = OpcUaAddress(node=f"nsu={URI};s=M.State")
    assert (address.mode, address.queue_size, address.discard_oldest, address.trigger,
            address.sampling_interval_ms, address.deadband) == (
        "subscribe", 1, True, "status_value", None, None)
    poll = OpcUaAddress(node=f"nsu={URI};s=M.State", mode="poll", poll_interval_ms=250)
    assert poll.poll_interval_ms == 250


# --- status codes ----------------------------------------------------------------------------


def test_status_code_severity_gives_the_quality() -> None:
    assert quality_of(0x00000000) is Quality.GOOD
    assert quality_of(0x00960000) is Quality.GOOD  # GoodLocalOverride
    assert quality_of(0x40900000) is Quality.UNCERTAIN  # UncertainLastUsableValue
    assert quality_of(0x808D0000) is Quality.BAD  # BadSensorFailure... any 10xx
    assert quality_of(0xC0000000) is Quality.BAD  # reserved severity counts as bad
    assert overflowed(0x00000480)  # Good, InfoType DataValue, Overflow
    assert not overflowed(0x00000080)  # the bit means nothing without InfoType DataValue
    assert status_name(0x80340000) == "BadNodeIdUnknown"
    assert status_name(0x80340480) == "BadNodeIdUnknown"
    assert status_name(0x81FF0000) == "0x81FF0000"


# --- connection settings ---------------------------------------------------------------------


def test_security_none_needs_consent() -> None:
    with pytest.raises(ValidationError, match="set allow_insecure: true to allow it"):
        OpcUaConnectionConfig(protocol="opcua", endpoint="opc.tcp://h:4840", security_policy="None")
    ok = OpcUaConnectionConfig(protocol="opcua", endpoint="opc.tcp://h:4840",
                               security_policy="None", allow_insecure=True)
    assert ok.security_policy == "None"
    default = OpcUaConnectionConfig(protocol="opcua", endpoint="opc.tcp://h:4840")
    assert (default.security_policy, default.security_mode, default.pki_dir) == (
        "Basic256Sha256", "SignAndEncrypt", Path("pki"))


# --- mapping files ---------------------------------------------------------------------------

MAPPING = """\
version: 1
asset:
  subject: acme/plant1/cnc/cell1/cnc101
signals:
  state:
    connection: cell_opcua
    opcua: {node: "nsu=urn:acme:machines;s=CNC-101.State"}
    type: string
  temperature:
    connection: cell_opcua
    opcua:
      path: Objects/Machines/CNC-101/Temperature
      deadband: {absolute: 0.5}
      sampling_interval_ms: 250
    type: float
  counter:
    connection: cell_opcua
    opcua: {node: "nsu=urn:acme:machines;i=6012", mode: poll, poll_interval_ms: 1000}
    type: integer
events:
  state_changed:
    type: production.MachineStateChanged.v1
    trigger: {kind: on_change, signal: state}
    data:
      state: {signal: state}
"""
CONNECTIONS = {"cell_opcua": "opcua", "plant_mqtt": "mqtt"}


def findings(directory: Path, connections: dict[str, str] = CONNECTIONS) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_mappings(directory, connections)
    return [str(f) for f in caught.value.findings]


def write(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cnc101.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_opcua_signals_load_and_bind_by_canonical_tag(tmp_path: Path) -> None:
    write(tmp_path, MAPPING)
    files = load_mappings(tmp_path, CONNECTIONS)
    bindings = Mapper(files, "gw").bindings()
    assert [a.tag for a in bindings["cell_opcua"]] == [
        "nsu=urn:acme:machines;s=CNC-101.State",
        "Objects/Machines/CNC-101/Temperature",
        "nsu=urn:acme:machines;i=6012",
    ]


def test_a_raw_namespace_index_is_an_error_unless_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, MAPPING.replace("nsu=urn:acme:machines;s=CNC-101.State", "ns=2;s=X"))
    (found,) = findings(tmp_path)
    assert found.startswith(f"{path}:7:19 signals.state.opcua.node: node id 'ns=2;s=X' names its "
                            f"namespace by index 2: the server numbers its namespaces")
    assert "write the namespace URI (nsu=<uri>;s=X" in found
    assert "or set allow_namespace_index: true to accept the risk" in found
    write(tmp_path, MAPPING.replace('{node: "nsu=urn:acme:machines;s=CNC-101.State"}',
                                    '{node: "ns=2;s=X", allow_namespace_index: true}'))
    assert len(load_mappings(tmp_path, CONNECTIONS)) == 1


def test_a_deadband_needs_a_numeric_signal(tmp_path: Path) -> None:
    path = write(tmp_path, MAPPING.replace(
        '{node: "nsu=urn:acme:machines;s=CNC-101.State"}',
        '{node: "nsu=urn:acme:machines;s=CNC-101.State", deadband: {absolute: 1}}'))
    (found,) = findings(tmp_path)
    assert found.startswith(f"{path}:7:")
    assert ("signals.state.opcua.deadband: a deadband needs a numeric (float or integer) signal; "
            "'state' is of type string") in found


def test_block_errors_are_located_in_the_mapping_file(tmp_path: Path) -> None:
    path = write(tmp_path, MAPPING.replace("s=CNC-101.State", "q=CNC-101.State"))
    (found,) = findings(tmp_path)
    assert found.startswith(f"{path}:7:")
    assert "is not a node id; expected nsu=<namespace URI>" in found


def test_an_opcua_block_on_an_mqtt_connection_is_refused(tmp_path: Path) -> None:
    write(tmp_path, MAPPING.replace("connection: cell_opcua", "connection: plant_mqtt", 1))
    (found,) = findings(tmp_path)
    assert ("signals.state.opcua: connection 'plant_mqtt' is a mqtt connection but this signal "
            "has a 'opcua' address block; use a 'mqtt' block") in found


def test_one_node_read_two_ways_is_a_conflict(tmp_path: Path) -> None:
    text = MAPPING.replace("    opcua: {node: \"nsu=urn:acme:machines;i=6012\", mode: poll, "
                           "poll_interval_ms: 1000}",
                           "    opcua: {node: \"nsu=urn:acme:machines;s=CNC-101.State\", "
                           "mode: poll, poll_interval_ms: 1000}")
    write(tmp_path, text)
    (found,) = findings(tmp_path)
    assert "reads the same address as" in found and "(mode, poll_interval_ms)" in found


# --- daemon wiring ---------------------------------------------------------------------------


def test_build_sources_makes_an_opcua_source_with_its_pki_in_the_state_directory(
    tmp_path: Path,
) -> None:
    write(tmp_path / "mappings", MAPPING)
    settings = GatewaySettings(
        gateway={"id": "edge-1"},
        connections={"cell_opcua": {"protocol": "opcua", "endpoint": "opc.tcp://h:4840"}},
        buffer={"directory": str(tmp_path / "state")},
    )
    files = load_mappings(tmp_path / "mappings", {"cell_opcua": "opcua"})
    (source,) = build_sources(settings, Mapper(files, "edge-1"), Metrics())
    assert isinstance(source, OpcUaSource)
    assert source.name == "cell_opcua"
    assert source.pki_dir == tmp_path / "state" / "pki"
    assert source.application_uri == "urn:digispine:edge-gateway:edge-1"
    assert source.items[0].tag == "nsu=urn:acme:machines;s=CNC-101.State"
