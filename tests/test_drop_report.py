"""A real daemon whose buffer overflows during an uplink outage: health says so, and once the
link is back the platform gets the newest events plus one ``gateway.EventsDropped.v1`` event
that accounts for every dropped one."""

from __future__ import annotations

import json
import time

import pytest

from tests.support import (
    GatewayProcess,
    consume,
    counting_gateway,
    publish,
    publisher,
    tansu_behind_proxy,
    values_of,
)

pytestmark = pytest.mark.integration


async def test_overflow_during_an_outage_is_reported_once_the_link_is_back(
        tmp_path, mqtt_port, topic_prefix):
    total = 600
    with tansu_behind_proxy() as (bootstrap, proxy):
        config, _ = counting_gateway(tmp_path, mqtt_port, bootstrap, topic_prefix)
        # Only mapped events in the buffer: a status or catalog event may be the one dropped,
        # and the report would list it as well.
        gw = GatewayProcess(config, tmp_path / "gw.log",
                            env={"DIGISPINE_BUFFER__MAX_BYTES": "65536",
                                 "DIGISPINE_HEALTH__HEARTBEAT_INTERVAL_S": "0",
                                 "DIGISPINE_HEALTH__CONNECTION_EVENTS": "false",
                                 "DIGISPINE_KAFKA__CATALOG_PUBLISH": "false"})
        try:
            gw.wait_sources_running()
            gw.wait_for(lambda h: h["kafka"]["connected"], 20, "kafka connected")
            proxy.cut()
            client = publisher(mqtt_port)
            publish(client, topic_prefix, "m1", range(1, total + 1))
            client.loop_stop()
            health = gw.wait_for(
                lambda h: h["counters"].get("events_mapped_total") == total
                and not h["kafka"]["connected"], 30, "all mapped, kafka seen down")
            assert health["status"] == "degraded"
            assert {"kafka_unreachable", "buffer_full"} <= set(health["problems"]), health
            dropped = health["counters"]["events_dropped_total"]
            assert 0 < dropped < total
            assert health["buffer"]["pending_bytes"] <= 65536

            proxy.restore()
            records = await consume(bootstrap, [f"{topic_prefix}.test.CountChanged.v1",
                                                f"{topic_prefix}.gateway.EventsDropped.v1"],
                                    expect=total - int(dropped) + 1, quiet_s=3, timeout_s=60)
            after = gw.wait_for(lambda h: h["counters"].get("drop_reports_total") == 1, 20,
                                "the report")
        finally:
            assert gw.terminate() == 0, gw.tail()
    reports = [json.loads(r.value) for r in records if r.topic.endswith("EventsDropped.v1")]
    counted = [r for r in records if r.topic.endswith("CountChanged.v1")]
    values = values_of(counted)
    assert len(reports) == 1, reports
    (report,) = reports
    assert report["count"] == dropped == after["counters"]["events_dropped_total"]
    assert report["dropped"] == [{
        "type": "test.CountChanged.v1", "reason": "buffer_full_oldest", "priority": "normal",
        "count": dropped, "first_time": report["first_time"], "last_time": report["last_time"]}]
    # drop_oldest: what arrives is the newest, contiguous, in order; with the report's
    # accounting, every published value is either delivered or counted
    assert values == list(range(total - len(values) + 1, total + 1))
    assert len(values) + report["count"] == total
    first_dropped = time.gmtime(1_700_000_000 + 1)
    assert report["first_time"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", first_dropped))
