"""The daemon builds one source per connection the mapping files read, for every protocol."""

from __future__ import annotations

from pathlib import Path

from gateway.app.daemon import build_sources
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.settings import load_settings
from gateway.sources.modbus import ModbusSource
from gateway.sources.mqtt import MqttSource
from gateway.sources.opcua import OpcUaSource

CONFIG = """
gateway: {id: gw1}
connections:
  broker: {protocol: mqtt, host: 127.0.0.1}
  cnc: {protocol: opcua, endpoint: "opc.tcp://127.0.0.1:4840", security_policy: None, allow_insecure: true}
  plc: {protocol: modbus, host: 127.0.0.1}
buffer: {directory: state}
mappings: {directory: mappings}
"""

MAPPING = """
version: 1
asset: {subject: acme/p1/l1/m1}
signals:
  state: {connection: broker, mqtt: {topic: m1/state}, type: string}
  spindle: {connection: cnc, opcua: {node: "nsu=urn:acme:cnc;s=Spindle.Speed"}, type: float}
  count: {connection: plc, modbus: {unit: 2, table: holding_register, address: 10, type: uint32, order: CDAB}, type: integer}
  temperature: {connection: plc, modbus: {address: 40021, type: float32}, type: float}
events:
  changed:
    type: production.MachineStateChanged.v1
    trigger: {kind: transition, signal: state}
    data: {state: {signal: state}, spindle_rpm: {signal: spindle}, count: {signal: count}, t: {signal: temperature}}
"""


def test_every_protocol_gets_its_source(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "m1.yaml").write_text(MAPPING)
    (tmp_path / "gw.yaml").write_text(CONFIG)
    settings = load_settings(tmp_path / "gw.yaml")
    protocols = {n: c.protocol for n, c in settings.connections.items()}
    mapper = Mapper(load_mappings(settings.mappings.directory, protocols), settings.gateway.id)
    sources = {s.name: s for s in build_sources(settings, mapper, Metrics())}
    assert {name: type(s) for name, s in sources.items()} == {
        "broker": MqttSource, "cnc": OpcUaSource, "plc": ModbusSource}
    tags = {conn: sorted(a.tag for a in addresses) for conn, addresses in mapper.bindings().items()}
    assert tags["plc"] == ["u1/hr/20:float32", "u2/hr/10:uint32:CDAB"]
