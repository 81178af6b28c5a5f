"""The whole shape, end to end: the daemon as a subprocess between a real mosquitto and a real
Kafka-compatible broker. MQTT messages go in; records are read back from Kafka and checked."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from tests import support
from tests.support import (
    GatewayProcess,
    consume,
    counting_gateway,
    make_mappings,
    publish,
    publisher,
    values_of,
    write_config,
)

pytestmark = pytest.mark.integration

async def test_mqtt_messages_become_cloudevents_in_kafka(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    """Each message becomes one record: key = subject, ce_* headers, value = data, in order."""
    config, _ = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix, ["m1", "m2"])
    gw = GatewayProcess(config, tmp_path / "gw.log")
    try:
        gw.wait_sources_running()
        client = publisher(mqtt_port)
        publish(client, topic_prefix, "m1", range(1, 51))
        publish(client, topic_prefix, "m2", range(101, 131))
        records = await consume(kafka_bootstrap, [f"{topic_prefix}.test.CountChanged.v1"],
                                expect=80, quiet_s=2)
        client.loop_stop()
    finally:
        assert gw.terminate() == 0, gw.tail()
    by_key: dict[bytes, list] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(r)
    assert sorted(by_key) == [b"acme/test/line1/m1", b"acme/test/line1/m2"]
    assert values_of(by_key[b"acme/test/line1/m1"]) == list(range(1, 51))
    assert values_of(by_key[b"acme/test/line1/m2"]) == list(range(101, 131))
    first = by_key[b"acme/test/line1/m1"][0]
    headers = {k: v.decode() for k, v in first.headers}
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_type"] == "test.CountChanged.v1"
    assert headers["ce_subject"] == "acme/test/line1/m1"
    assert headers["ce_source"] == "/gateways/test-gw/connections/plant_mqtt"
    assert headers["ce_time"] == "2023-11-14T22:13:21.000000Z"  # ts 1_700_000_001 from the payload
    assert headers["content-type"] == "application/json"
    assert json.loads(first.value) == {"n": 1, "line": "line1"}
    assert len({dict(r.headers)["ce_id"] for r in records}) == 80


async def test_sigterm_stops_cleanly_and_nothing_is_left_behind(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    """SIGTERM: exit 0 after flushing; a restart finds an empty buffer."""
    config, _ = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    gw = GatewayProcess(config, tmp_path / "gw.log")
    gw.wait_sources_running()
    client = publisher(mqtt_port)
    publish(client, topic_prefix, "m1", range(1, 201))
    client.loop_stop()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=30) == 0
    stopped = [json.loads(line) for line in gw.tail(100_000).splitlines()
               if '"daemon.stopped"' in line]
    assert stopped and stopped[0]["left_in_buffer"] == 0
    records = await consume(kafka_bootstrap, [f"{topic_prefix}.test.CountChanged.v1"], expect=200, quiet_s=1)
    assert sorted(values_of(records)) == list(range(1, 201))


async def test_kill_9_while_kafka_is_cut_loses_no_acknowledged_event(tmp_path, mqtt_port):
    """Kafka unreachable (proxy cut), messages published and buffered, the gateway SIGKILLed;
    after the link and the gateway come back, every event arrives, none twice."""
    if support.real_kafka():
        pytest.skip("cutting the link needs a broker whose advertised address is the proxy (Tansu)")
    prefix = support.unique_topic_prefix()
    mappings = make_mappings(tmp_path, prefix, ["m1"])
    with support.tansu_behind_proxy() as (bootstrap, proxy):
        config = write_config(tmp_path / "gw.yaml", mqtt_port=mqtt_port, bootstrap=bootstrap,
                              topic_template=f"{prefix}.{{type}}", mappings=mappings,
                              state=tmp_path / "state")
        gw = GatewayProcess(config, tmp_path / "gw1.log")
        gw.wait_sources_running()
        proxy.cut()
        client = publisher(mqtt_port)
        publish(client, prefix, "m1", range(1, 301))  # each returns once the broker has it
        client.loop_stop()
        gw.wait_for(lambda h: h["buffer"]["pending_events"] == 300, 30, "300 events buffered")
        gw.kill()
        proxy.restore()
        gw2 = GatewayProcess(config, tmp_path / "gw2.log")
        try:
            records = await consume(bootstrap, [f"{prefix}.test.CountChanged.v1"], expect=300, quiet_s=3)
            gw2.wait_for(lambda h: h["buffer"]["pending_events"] == 0, 30, "buffer empty")
        finally:
            assert gw2.terminate() == 0, gw2.tail()
    values = values_of(records)
    assert sorted(set(values)) == list(range(1, 301)), "lost events"
    assert len(values) == len(set(values)), f"{len(values) - len(set(values))} duplicates"
    assert values == sorted(values), "per-key order broken"


async def test_kill_9_while_messages_flow_loses_no_message(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    """MQTT QoS 1 with a persistent session is acknowledged only after the durable append: a
    SIGKILL in mid-stream loses nothing; the broker redelivers what was not acknowledged, and a
    redelivered message yields the same event id as its first delivery (deterministic ids), so
    consumers can drop the duplicates."""
    config, _ = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    gw = GatewayProcess(config, tmp_path / "gw1.log")
    gw.wait_sources_running()
    client = publisher(mqtt_port)
    total = 3000
    infos = [client.publish(f"{topic_prefix}/m1/data",
                            json.dumps({"n": n, "ts": 1_700_000_000 + n / 1000}), qos=1)
             for n in range(1, total + 1)]
    await asyncio.sleep(0.3)  # let the gateway be in the middle of the stream
    gw.kill()
    for info in infos:
        info.wait_for_publish(timeout=30)
    client.loop_stop()
    gw2 = GatewayProcess(config, tmp_path / "gw2.log")
    try:
        records = await consume(kafka_bootstrap, [f"{topic_prefix}.test.CountChanged.v1"],
                                expect=total, quiet_s=3, timeout_s=90)
    finally:
        assert gw2.terminate() == 0, gw2.tail()
    values = values_of(records)
    missing = set(range(1, total + 1)) - set(values)
    ids_per_value: dict[int, set[bytes]] = {}
    for value, record in zip(values, records, strict=True):
        ids_per_value.setdefault(value, set()).add(dict(record.headers)["ce_id"])
    print(f"\nkill -9 mid-stream: {total} published, {len(values)} records, "
          f"{len(missing)} lost, {len(values) - len(set(values))} duplicates, "
          f"{len({i for ids in ids_per_value.values() for i in ids})} distinct ids")
    assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:10]}"
    assert all(len(ids) == 1 for ids in ids_per_value.values()), "a duplicate got a new id"


async def test_malformed_payloads_are_counted_and_the_stream_goes_on(
        tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    """Garbage between good messages: no crash, the good ones arrive, the bad ones are counted
    and logged once per topic and interval."""
    config, _ = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    gw = GatewayProcess(config, tmp_path / "gw.log")
    try:
        gw.wait_sources_running()
        client = publisher(mqtt_port)
        topic = f"{topic_prefix}/m1/data"
        for n in range(1, 11):
            client.publish(topic, json.dumps({"n": n, "ts": 1_700_000_000}), qos=1).wait_for_publish(10)
            client.publish(topic, b"\xff not json {", qos=1).wait_for_publish(10)
        client.loop_stop()
        records = await consume(kafka_bootstrap, [f"{topic_prefix}.test.CountChanged.v1"],
                                expect=10, quiet_s=1)
        health = gw.wait_for(lambda h: h["counters"].get("mqtt_malformed_payloads_total") == 10,
                             15, "10 malformed payloads counted")
    finally:
        assert gw.terminate() == 0, gw.tail()
    assert values_of(records) == list(range(1, 11))
    assert health["status"] == "ok"
    warnings = [line for line in gw.tail(100_000).splitlines() if "mqtt.malformed_payload" in line]
    assert len(warnings) == 1, warnings


def test_bad_config_exits_78_with_located_errors(tmp_path):
    """Every error at once, located, no traceback, exit 78 (systemd does not restart-loop)."""
    import subprocess
    import sys

    bad = tmp_path / "gw.yaml"
    bad.write_text("gateway:\n  id: ok-id\nkafka:\n  linger_ms: soon\n  acks: most\nbufer: {}\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr
    assert f"{bad}:4:14 kafka.linger_ms:" in proc.stderr
    assert f"{bad}:5:9 kafka.acks:" in proc.stderr
    assert f"{bad}:6:1 bufer: unknown key" in proc.stderr
