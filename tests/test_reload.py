"""Hot reload: SIGHUP swaps in valid mapping files and keeps the running ones on errors."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from tests.support import (
    MAPPING,
    GatewayProcess,
    consume,
    counting_gateway,
    publish,
    publisher,
)

pytestmark = pytest.mark.integration


def log_events(gw: GatewayProcess, name: str) -> list[dict]:
    return [json.loads(line) for line in gw.tail(1_000_000).splitlines() if f'"{name}"' in line]


def wait_log(gw: GatewayProcess, name: str, count: int = 1, timeout_s: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = log_events(gw, name)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {name} in the log:\n{gw.tail()}")


async def test_sighup_applies_new_mappings_and_rejects_broken_ones(
        tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    config, mappings = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    topic = f"{topic_prefix}.test.CountChanged.v1"
    gw = GatewayProcess(config, tmp_path / "gw.log")
    try:
        gw.wait_sources_running()
        client = publisher(mqtt_port)
        publish(client, topic_prefix, "m1", range(1, 4))
        gw.wait_for(lambda h: h["counters"].get("events_mapped_total") == 3, 15, "3 events mapped")

        # A new asset on a new topic, and a changed data field on the old one.
        (mappings / "m1.yaml").write_text(
            MAPPING.format(machine="m1", prefix=topic_prefix).replace("line: {attribute: line}",
                                                                     "line: {const: relabelled}"))
        (mappings / "m2.yaml").write_text(MAPPING.format(machine="m2", prefix=topic_prefix))
        gw.proc.send_signal(signal.SIGHUP)
        reloaded = wait_log(gw, "mappings.reloaded")[0]
        assert reloaded["files"] == 2 and reloaded["restarted_sources"] == ["plant_mqtt"]
        assert reloaded["states_carried_over"] == 1  # m1.n; its event changed, m2 is new
        gw.wait_sources_running()
        publish(client, topic_prefix, "m1", range(4, 6))
        publish(client, topic_prefix, "m2", range(100, 102))

        # A broken file: rejected with located errors, the running mappings stay in force.
        (mappings / "m2.yaml").write_text("version: 1\nasset: {subject: x}\nsignals: {}\nevnts: {}\n")
        gw.proc.send_signal(signal.SIGHUP)
        rejected = wait_log(gw, "mappings.reload_rejected")[0]
        assert any(e.startswith(f"{mappings / 'm2.yaml'}:4:1 evnts") for e in rejected["errors"])
        publish(client, topic_prefix, "m2", range(102, 104))
        client.loop_stop()
        records = await consume(kafka_bootstrap, [topic], expect=9, quiet_s=2)
    finally:
        assert gw.terminate() == 0, gw.tail()
    got = [(r.key.decode().rsplit("/", 1)[1], json.loads(r.value)) for r in records]
    m1 = [d for k, d in got if k == "m1"]
    m2 = [d for k, d in got if k == "m2"]
    assert m1 == [{"n": 1, "line": "line1"}, {"n": 2, "line": "line1"}, {"n": 3, "line": "line1"},
                  {"n": 4, "line": "relabelled"}, {"n": 5, "line": "relabelled"}]
    assert [d["n"] for d in m2] == [100, 101, 102, 103]


async def test_a_watched_directory_reloads_by_itself(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    """mappings.watch_interval_s: a new file is picked up without SIGHUP once it holds still;
    a broken one is rejected and the running mappings stay."""
    config, mappings = counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    gw = GatewayProcess(config, tmp_path / "gw.log", env={"DIGISPINE_MAPPINGS__WATCH_INTERVAL_S": "0.3"})
    try:
        gw.wait_sources_running()
        (mappings / "m2.yaml").write_text(MAPPING.format(machine="m2", prefix=topic_prefix))
        reloaded = wait_log(gw, "mappings.reloaded")[0]
        assert reloaded["files"] == 2
        assert log_events(gw, "mappings.changed")
        gw.wait_sources_running()
        client = publisher(mqtt_port)
        publish(client, topic_prefix, "m2", range(7, 9))
        (mappings / "m3.yaml").write_text("version: 1\nasset: {subject: x}\nsignals: {}\nevnts: {}\n")
        rejected = wait_log(gw, "mappings.reload_rejected")[0]
        assert any(e.startswith(f"{mappings / 'm3.yaml'}:4:1 evnts") for e in rejected["errors"])
        publish(client, topic_prefix, "m2", range(9, 10))
        client.loop_stop()
        records = await consume(kafka_bootstrap, [f"{topic_prefix}.test.CountChanged.v1"],
                                expect=3, quiet_s=2)
        await asyncio.sleep(1)  # more intervals: an unchanged broken file is not retried
        assert len(log_events(gw, "mappings.reload_rejected")) == 1
    finally:
        assert gw.terminate() == 0, gw.tail()
    assert [json.loads(r.value)["n"] for r in records] == [7, 8, 9]
