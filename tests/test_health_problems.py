"""Health never says ok while the gateway forwards nothing: the problems the daemon reports."""

from __future__ import annotations

import asyncio
import time

from gateway.app.daemon import STALL_S, Daemon
from gateway.mapping.loader import load_mappings
from gateway.settings import load_settings
from tests.support import counting_gateway


def make_daemon(tmp_path) -> Daemon:
    config, mappings = counting_gateway(tmp_path, 1883, "127.0.0.1:9", "t")
    settings = load_settings(config)
    return Daemon(settings, load_mappings(mappings, {"plant_mqtt": "mqtt"}))


async def test_a_connected_kafka_that_takes_nothing_is_fatal(tmp_path):
    d = make_daemon(tmp_path)
    forever = asyncio.get_running_loop().create_future()
    d._core = [asyncio.ensure_future(forever)]
    try:
        d.forwarder._connected = True
        assert d.problems() == ([], [])
        d.buffer._store.pending_events = 10  # a backlog ...
        d.started = d.forwarder.last_ack_time = time.time() - STALL_S - 1  # ... that did not move
        fatal, _ = d.problems()
        assert fatal == ["forwarding_stalled"]
        healthy, body = d.status()
        assert not healthy and body["status"] == "down" and body["problems"] == ["forwarding_stalled"]
        d.forwarder.last_ack_time = time.time()  # it moves again
        assert d.status()[0]
        d.forwarder._connected = False  # Kafka away: the buffer absorbs it, a restart would not help
        d.forwarder.last_ack_time = time.time() - STALL_S - 1
        healthy, body = d.status()
        assert healthy and body["status"] == "degraded" and body["problems"] == ["kafka_unreachable"]
    finally:
        forever.cancel()


async def test_an_ingest_that_does_not_move_is_fatal_unless_the_disk_is_failing(tmp_path):
    d = make_daemon(tmp_path)
    forever = asyncio.get_running_loop().create_future()
    d._core = [asyncio.ensure_future(forever)]
    d.forwarder._connected = True
    try:
        d.pipeline._queue.put_nowait(object())  # type: ignore[arg-type]
        d.started = time.time() - STALL_S - 1
        assert d.problems()[0] == ["ingest_stalled"]
        d.pipeline.failing_since = time.time()  # disk full: reported as such, not restarted
        assert d.problems() == ([], ["buffer_failing"])
    finally:
        forever.cancel()


def test_a_dead_core_task_is_fatal(tmp_path):
    d = make_daemon(tmp_path)
    assert d.problems()[0] == ["core_stopped"]  # never started
