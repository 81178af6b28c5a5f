"""Record live readings with `run --record`, replay them offline with `replay`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import (
    GatewayProcess,
    consume,
    counting_gateway,
    make_mappings,
    publish,
    publisher,
    write_config,
)


def replay(config, trace) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "replay", "--config", str(config),
                           str(trace)], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.integration
async def test_a_recorded_trace_replays_to_the_events_that_went_to_kafka(
        tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    config, _ = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    trace = tmp_path / "trace.jsonl"
    gw = GatewayProcess(config, tmp_path / "gw.log", args=["--record", str(trace)])
    try:
        gw.wait_sources_running()
        client = publisher(mqtt_port)
        publish(client, topic_prefix, "m1", range(1, 21))
        client.loop_stop()
        records = await consume(kafka_bootstrap, [f"{topic_prefix}.test.CountChanged.v1"],
                                expect=20, quiet_s=1)
    finally:
        assert gw.terminate() == 0, gw.tail()
    lines = trace.read_text().splitlines()
    assert len(lines) == 20
    assert json.loads(lines[0])["tag"] == f"{topic_prefix}/m1/data#n"
    proc = replay(config, trace)
    assert proc.returncode == 0, proc.stderr
    replayed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["data"] for e in replayed] == [json.loads(r.value) for r in records]
    assert [e["time"] for e in replayed] == [dict(r.headers)["ce_time"].decode() for r in records]
    assert [e["id"] for e in replayed] == [dict(r.headers)["ce_id"].decode() for r in records]
    assert "replayed 20 readings: 20 events" in proc.stderr


def test_a_malformed_trace_line_is_a_located_error(tmp_path):
    mappings = make_mappings(tmp_path, "p", ["m1"])
    config = write_config(tmp_path / "gw.yaml", mqtt_port=1883, bootstrap="127.0.0.1:9",
                          topic_template="{type}", mappings=mappings, state=tmp_path / "state")
    trace = tmp_path / "trace.jsonl"
    good = {"connection": "plant_mqtt", "tag": "p/m1/data#n", "value": 5, "source_time": 1.0}
    trace.write_text(json.dumps(good) + "\n" + '{"connection": "plant_mqtt"}\n')
    proc = replay(config, trace)
    assert proc.returncode == 78
    assert f"{trace}:2 " in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["data"] == {"n": 5, "line": "line1"}
