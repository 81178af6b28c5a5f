"""`digispine-gateway browse` against a real asyncua server in the test's event loop: the tree
with namespace URIs, data types, access and values; depth; start by path or node id; the
mapping skeleton (loaded by the mapping loader, its nodes read by the OPC UA source); batched
reads; one-line errors. The CLI runs in a thread (it has its own event loop) as
``gateway.cli.main([...])``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.client.ua_client import UaClient
from asyncua.common.structures104 import new_enum

from gateway import cli
from gateway.mapping.loader import load_mappings
from gateway.mapping.spec import NAME_PATTERN
from gateway.model import Quality
from gateway.sources.opcua_browse import Entry, signal_names
from tests.test_opcua_source import (
    MACHINES,
    Collector,
    UaServer,
    Users,
    running,
    serving,
    source,
)

pytestmark = pytest.mark.timeout(90)


def write_config(tmp_path: Path, endpoint: str, **conn: Any) -> Path:
    fields: dict[str, Any] = {"protocol": "opcua", "endpoint": endpoint,
                              "security_policy": "None", "allow_insecure": True,
                              "request_timeout_s": 3.0}
    fields.update(conn)
    config = {"gateway": {"id": "gw1", "site": "acme/plant1"},
              "connections": {"cell": fields},
              "buffer": {"directory": "state"}, "mappings": {"directory": "mappings"}}
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


async def cli_main(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def rows(out: str) -> dict[str, list[str]]:
    """Listing lines by browse name (indent kept out), split into columns."""
    table: dict[str, list[str]] = {}
    for line in out.splitlines()[1:-1]:
        cells = re.split(r"\s{2,}", line.strip())
        table[cells[0]] = cells
    return table


async def extend(server: UaServer) -> None:
    """Under CNC-101: a nested variable, a name clash, an array, a property of a variable, a
    name YAML would read as a boolean, a custom enumeration and a non-ASCII name."""
    assert server.server is not None
    ns = server.ns
    machine = server.server.get_node(ua.NodeId("CNC-101", ns))
    spindle = await machine.add_object(ua.NodeId("CNC-101.Spindle", ns),
                                       ua.QualifiedName("Spindle", ns))
    await spindle.add_variable(ua.NodeId("CNC-101.Spindle.Speed", ns),
                               ua.QualifiedName("Speed", ns), 1200.0)
    await machine.add_variable(ua.NodeId("CNC-101.SpindleSpeed", ns),
                               ua.QualifiedName("SpindleSpeed", ns), 1300.0)
    await machine.add_variable(ua.NodeId("CNC-101.Axes", ns), ua.QualifiedName("Axes", ns),
                               [1.0, 2.0, 3.0])
    temperature = server.vars["CNC-101/Temperature"]
    await temperature.add_property(ua.NodeId("CNC-101.Temperature.Unit", ns),
                                   ua.QualifiedName("EngineeringUnits", ns), "degC")
    await machine.add_variable(ua.NodeId("CNC-101.True", ns), ua.QualifiedName("true", ns), True)
    mode_type = await new_enum(server.server, ns, "MachineMode", ["Idle", "Run", "Fault"])
    await machine.add_variable(ua.NodeId("CNC-101.Mode", ns), ua.QualifiedName("Mode", ns),
                               ua.Variant(1, ua.VariantType.Int32), datatype=mode_type.nodeid)
    await machine.add_variable(ua.NodeId("CNC-101.Oil", ns),
                               ua.QualifiedName("ÖlTemperatur", ns), 41.5)


async def test_browse_lists_a_folder_with_namespace_uris_types_access_and_values(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serving(dummy_first=True) as server:  # the machines' namespace is index 3
        await server.write("CNC-101/State", "Running")
        await server.vars["CNC-101/Counter"].set_writable()
        config = write_config(tmp_path, server.endpoint)
        code = await cli_main("browse", "cell", "Objects/Machines/CNC-101", "-c", str(config))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == (f"cell ({server.endpoint}, None (insecure)): Objects/Machines/CNC-101  "
                        f"Object  nsu={MACHINES};s=CNC-101")
    table = rows(out)
    assert table["State"] == ["State", "Variable", "String", "r-",
                              f"nsu={MACHINES};s=CNC-101.State", '= "Running"']
    assert table["Temperature"] == ["Temperature", "Variable", "Double", "r-",
                                    f"nsu={MACHINES};s=CNC-101.Temperature", "= 20.0"]
    assert table["Counter"] == ["Counter", "Variable", "Int64", "rw",
                                f"nsu={MACHINES};s=CNC-101.Counter", "= 0"]
    assert lines[-1] == "3 node(s), 3 variable(s)"
    assert not re.search(r"\bns=\d", out)  # never a bare namespace index
    assert all(re.match(r"  \S", line) for line in lines[1:-1])  # children: depth 1


async def test_depth_and_start_by_node_id(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    async with serving() as server:
        config = write_config(tmp_path, server.endpoint)
        depths = {}
        for depth in (1, 2, 3):
            assert await cli_main("browse", "cell", "--depth", str(depth), "--json",
                                  "-c", str(config)) == 0
            listing = json.loads(capsys.readouterr().out)
            depths[depth] = {n["path"]: n["depth"] for n in listing["nodes"]}
        # A raw index is accepted as the start, and the listing names the namespace by URI.
        code = await cli_main("browse", "cell", f"ns={server.ns};s=CNC-102", "-c", str(config))
        by_index = capsys.readouterr().out
        code_zero = await cli_main("browse", "cell", "Objects/Machines", "--depth", "0",
                                   "-c", str(config))
        only_start = capsys.readouterr().out
    assert depths[1]["Objects/Machines"] == 1 and "Objects/Server" in depths[1]
    assert "Objects/Machines/CNC-101" not in depths[1]
    assert depths[2]["Objects/Machines/CNC-101"] == 2
    assert "Objects/Machines/CNC-101/State" not in depths[2]
    assert depths[3]["Objects/Machines/CNC-101/State"] == 3
    assert max(depths[3].values()) == 3
    assert code == 0
    assert by_index.splitlines()[0].endswith(f"CNC-102  Object  nsu={MACHINES};s=CNC-102")
    assert f"nsu={MACHINES};s=CNC-102.Temperature" in by_index
    assert f"ns={server.ns};" not in by_index
    assert code_zero == 0
    assert only_start.splitlines()[1:] == [
        "0 node(s), 0 variable(s) (nothing below the start node to this depth)"]


async def test_skeleton_loads_with_the_mapping_loader_and_its_nodes_are_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    skeleton = mappings / "cnc101.yaml"
    async with serving() as server:
        await extend(server)
        config = write_config(tmp_path, server.endpoint)
        code = await cli_main("browse", "cell", "Objects/Machines/CNC-101", "--depth", "2",
                              "--skeleton", str(skeleton), "-c", str(config))
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "wrote " + str(skeleton) + ": 8 signal(s)" in err
        assert "SpindleSpeed" in out  # the listing is printed as well

        (loaded,) = load_mappings(mappings, {"cell": "opcua"})
        text = skeleton.read_text()
        spec = loaded.spec
        assert text.splitlines()[0] == "# yaml-language-server: $schema=./mapping.schema.json"
        assert spec.asset.subject == "acme/plant1/machines/cnc-101"
        got = {name: (s.connection, s.opcua.node if s.opcua else None, s.type)
               for name, s in spec.signals.items()}
        node = f"nsu={MACHINES};s=CNC-101"
        assert got == {
            "state": ("cell", f"{node}.State", "string"),
            "temperature": ("cell", f"{node}.Temperature", "float"),
            "counter": ("cell", f"{node}.Counter", "integer"),
            "spindle_speed": ("cell", f"{node}.Spindle.Speed", "float"),
            "spindle_speed_2": ("cell", f"{node}.SpindleSpeed", "float"),
            "true_value": ("cell", f"{node}.True", "boolean"),
            "mode": ("cell", f"{node}.Mode", "integer"),  # a custom enumeration
            "ol_temperatur": ("cell", f"{node}.Oil", "float"),
        }
        (event,) = spec.events.values()
        assert event.trigger.kind == "on_change"
        assert spec.signals["mode"].enum == {0: "Idle", 1: "Run", 2: "Fault"}
        assert "#   Objects/Machines/CNC-101/Axes (Double[]): an array" in text
        assert ("#   Objects/Machines/CNC-101/Temperature/EngineeringUnits (String): a "
                "property of a variable") in text

        # The nodes resolve: the OPC UA source reads every signal of the skeleton, good.
        addresses = [s.opcua for s in spec.signals.values() if s.opcua is not None]
        emit = Collector()
        src = source(server.endpoint, addresses)
        tags = {a.tag for a in addresses}
        async with running(src, emit):
            await emit.until(lambda: {s.tag for s in emit.signals
                                      if s.quality is Quality.GOOD} == tags, what="all good")
        assert emit.values(f"{node}.Mode")[-1] == 1
        capsys.readouterr()  # the source's own log lines

        # To stdout, and an existing file is kept unless --force.
        assert await cli_main("browse", "cell", "Objects/Machines/CNC-102", "--skeleton", "-",
                              "--subject", "acme/p1/cnc102", "-c", str(config)) == 0
        to_stdout = capsys.readouterr().out
        assert await cli_main("browse", "cell", "Objects/Machines/CNC-101", "--skeleton",
                              str(skeleton), "-c", str(config)) == 73
        refused = capsys.readouterr().err
    assert to_stdout.startswith("# yaml-language-server: $schema=./mapping.schema.json\n")
    assert 'subject: "acme/p1/cnc102"' in to_stdout
    assert f'opcua: {{node: "nsu={MACHINES};s=CNC-102.State"}}' in to_stdout
    assert refused == (f"digispine-gateway: {skeleton} exists; give another file or --force to "
                       f"overwrite it\n")


async def test_a_large_folder_is_read_in_few_batched_requests(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    browses: list[int] = []
    original_read, original_browse = UaClient.read, UaClient.browse

    async def read(self: UaClient, params: ua.ReadParameters) -> list[ua.DataValue]:
        reads.append(len(params.NodesToRead))
        return await original_read(self, params)

    async def browse(self: UaClient, params: ua.BrowseParameters) -> list[ua.BrowseResult]:
        browses.append(len(params.NodesToBrowse))
        return await original_browse(self, params)

    monkeypatch.setattr(UaClient, "read", read)
    monkeypatch.setattr(UaClient, "browse", browse)
    async with serving(limits={"MaxNodesPerRead": 400}) as server:
        await server.add_many(1, 250)
        config = write_config(tmp_path, server.endpoint)
        code = await cli_main("browse", "cell", "Objects/Bulk/F0", "--json", "-c", str(config))
    out, err = capsys.readouterr()
    assert code == 0, err
    nodes = json.loads(out)["nodes"]
    assert len(nodes) == 250
    assert {n["data_type"] for n in nodes} == {"Double"}
    assert nodes[249]["value"] == 249.0 and nodes[249]["node_id"] == f"nsu={MACHINES};s=F0.V249"
    # 250 variables x 5 attributes in reads of at most MaxNodesPerRead (400): 4 reads, plus
    # the NamespaceArray and the OperationLimits; not one request per attribute per node.
    assert max(reads) <= 400
    assert sum(1 for n in reads if n > 3) == 4
    assert len(reads) <= 6
    assert len(browses) == 3  # Objects, Bulk (walking the path), F0's children


async def test_unreachable_endpoint_and_unknown_start_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"opc.tcp://127.0.0.1:{port}/"
    config = write_config(tmp_path, endpoint)
    assert await cli_main("browse", "cell", "-c", str(config)) == 69
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"digispine-gateway: OPC UA connection cell ({endpoint}): connection refused "
                   f"while connecting (check the endpoint's host and port, and that the server "
                   f"runs)\n")
    assert await cli_main("browse", "nosuch", "-c", str(config)) == 64
    assert capsys.readouterr().err == (f"digispine-gateway: no connection nosuch in {config} "
                                       f"(OPC UA connections: cell)\n")
    async with serving() as server:
        config = write_config(tmp_path, server.endpoint)
        assert await cli_main("browse", "cell", "Objects/Machines/CNC-109", "-c",
                              str(config)) == 66
        missing_child = capsys.readouterr().err
        assert await cli_main("browse", "cell", f"nsu={MACHINES};s=Nope", "-c",
                              str(config)) == 66
        missing_node = capsys.readouterr().err
    assert missing_child == ("digispine-gateway: Objects/Machines has no child 'CNC-109' (its "
                             "children: CNC-101, CNC-102)\n")
    assert missing_node == (f"digispine-gateway: the server has no node nsu={MACHINES};s=Nope "
                            f"(BadNodeIdUnknown)\n")


async def test_wrong_password_is_one_line_without_the_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with serving(user_manager=Users()) as server:
        config = write_config(tmp_path, server.endpoint, username="gateway", password="nope")
        assert await cli_main("browse", "cell", "-c", str(config)) == 69
        out, err = capsys.readouterr()
        good = write_config(tmp_path, server.endpoint, username="gateway", password="s3cret")
        assert await cli_main("browse", "cell", "Objects/Machines", "-c", str(good)) == 0
        assert "CNC-101" in capsys.readouterr().out
    assert out == ""
    assert err.count("\n") == 1 and "nope" not in err
    assert err.startswith(f"digispine-gateway: OPC UA connection cell ({server.endpoint}): the "
                          f"server refused user 'gateway' (BadUserAccessDenied)")


def test_signal_names_are_snake_case_unique_and_valid_mapping_names() -> None:
    names = [("SpindleSpeed",), ("Spindle", "Speed"), ("spindle speed",), ("PLCState",),
             ("3rdAxis",), ("true",), ("Öl-Temperatur [°C]",), ("___",)]
    entries = [Entry(len(n), "/".join(n), n, n[-1], None, "Variable", "i=1", "HasComponent",
                     "Object") for n in names]
    got = signal_names(entries)
    assert got == ["spindle_speed", "spindle_speed_2", "spindle_speed_3", "plc_state",
                   "v_3rd_axis", "true_value", "ol_temperatur_c", "signal"]
    assert all(re.fullmatch(NAME_PATTERN, n) for n in got)
