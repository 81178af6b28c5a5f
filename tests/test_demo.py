"""The README's first quick-start command: the demo shows DomainEvents read back from Kafka,
from the MQTT machines (JSON and a Sparkplug B edge node), the OPC UA machines and the Modbus
device."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def test_demo_prints_events_consumed_from_kafka():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--duration-s", "12", "--interval-s", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    events = [line for line in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3}  ", line)]
    types = {line.split()[1] for line in events}
    assert {"production.MachineStateChanged.v1", "production.PartCounterChanged.v1"} <= types
    subjects = {line.split()[2] for line in events}
    assert "acme/plant1/stamping/line2/press07" in subjects
    # The OPC UA machines (secure channel, certificates trusted both ways) and the Modbus
    # device: each reports its first state at once.
    for subject in ("acme/plant1/machining/line1/cnc101", "acme/plant1/machining/line1/cnc102",
                    "acme/plant1/packaging/line1/pack01"):
        assert subject in subjects, proc.stdout
        assert any(line.split()[1:3] == ["production.MachineStateChanged.v1", subject]
                   for line in events)
    # The Sparkplug B edge node's devices: their births (asked for by the gateway's STATE or a
    # rebirth request) give their first state; the screwdriver tightens and the leak tester
    # tests every few seconds, one by names, one by aliases only.
    for subject in ("acme/plant1/assembly/line4/screwdriver01",
                    "acme/plant1/assembly/line4/leaktester01"):
        assert any(line.split()[1:3] == ["production.MachineStateChanged.v1", subject]
                   for line in events), proc.stdout
    assert {"quality.TighteningCompleted.v1", "quality.LeakTestCompleted.v1"} <= types
    assert re.search(r"demo: OPC UA server \(CNC-101, CNC-102\) on opc\.tcp://127\.0\.0\.1:\d+",
                     proc.stdout)
    assert re.search(r"demo: Modbus TCP device \(pack01, unit 1\) on 127\.0\.0\.1:\d+",
                     proc.stdout)
    summary = re.search(r"demo: stopped; (\d+) DomainEvents arrived in Kafka", proc.stdout)
    assert summary and int(summary.group(1)) == len(events)


def test_the_demo_edge_node_speaks_sparkplug_b(mqtt_port: int) -> None:
    """The demo's edge node, read with an independent Sparkplug B implementation: births with
    bdSeq, seq one step per message, the leak tester's DDATA by alias only, a rebirth request
    answered with new births, and its NDEATH (same bdSeq) on a clean stop."""
    import threading
    import time
    import uuid

    from paho.mqtt.client import Client, MQTTMessage
    from paho.mqtt.enums import CallbackAPIVersion
    from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu_pb

    from gateway.demo.sparkplug_node import AssemblyEdgeNode
    from gateway.sources.sparkplug import rebirth_payload

    group = f"g{uuid.uuid4().hex[:10]}"
    seen: list[tuple[str, Any]] = []
    lock = threading.Lock()
    subscribed = threading.Event()

    def keep(_c: Client, _u: Any, msg: MQTTMessage) -> None:
        with lock:
            seen.append((msg.topic.split("/", 2)[2], tahu_pb.Payload.FromString(msg.payload)))

    client = Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, *_: c.subscribe(f"spBv1.0/{group}/#", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = keep
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()

    def wait_for(predicate: Any) -> None:
        deadline = time.monotonic() + 10
        while True:
            with lock:
                if predicate(list(seen)):
                    return
            assert time.monotonic() < deadline, [t for t, _ in seen]
            time.sleep(0.02)

    def count(kind: str, messages: list[tuple[str, Any]]) -> int:
        return sum(1 for t, _ in messages if t.startswith(kind))

    node = AssemblyEdgeNode("127.0.0.1", mqtt_port, interval_s=0.05, seed=3, group=group)
    try:
        assert subscribed.wait(5)
        node.start()
        wait_for(lambda m: count("DDATA/assembly-gw/leaktester01", m) >= 1
                 and count("DDATA/assembly-gw/screwdriver01", m) >= 1)
        client.publish(f"spBv1.0/{group}/NCMD/assembly-gw", rebirth_payload(time.time()))
        wait_for(lambda m: count("NBIRTH", m) >= 2)
    finally:
        node.stop()
        wait_for(lambda m: count("NDEATH", m) >= 1)
        client.disconnect()
        client.loop_stop()
    topics = [t for t, _ in seen]
    assert topics[:3] == ["NBIRTH/assembly-gw", "DBIRTH/assembly-gw/screwdriver01",
                          "DBIRTH/assembly-gw/leaktester01"]
    births = [p for t, p in seen if t.startswith("NBIRTH")]
    [death] = [p for t, p in seen if t.startswith("NDEATH")]
    bd_seq = {m.name: m.long_value for m in births[0].metrics}["bdSeq"]
    assert {m.name: m.long_value for m in death.metrics} == {"bdSeq": bd_seq}
    assert not death.HasField("seq")
    # seq: 0 on each NBIRTH, then one step per message of the node and its devices.
    expected = None
    for topic, p in seen:
        if topic.startswith(("NDEATH", "NCMD")):  # no seq; the test's own command
            continue
        if topic.startswith("NBIRTH"):
            expected = 0
        assert p.seq == expected, topic
        expected = (p.seq + 1) % 256
    for topic, p in seen:
        if topic.startswith("DDATA/assembly-gw/leaktester01"):
            assert all(not m.name and m.HasField("alias") for m in p.metrics)
        elif topic.startswith("DDATA/assembly-gw/screwdriver01"):
            assert all(m.name for m in p.metrics)
        elif topic.startswith("DBIRTH"):
            assert all(m.name and m.HasField("alias") and m.timestamp for m in p.metrics)
