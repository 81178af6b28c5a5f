"""The gateway reports itself: heartbeat and connection-state DomainEvents in Kafka, ``/readyz``
per component, and ``/metrics`` that the Prometheus parser reads. A real daemon (child
process) with its own mosquitto, which the test stops and starts again."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import localbrokers
from gateway.app.supervisor import Component, Supervisor
from gateway.errors import SourceUnavailable
from gateway.metrics import Metrics
from tests import support

pytestmark = pytest.mark.timeout(180)


class Broker:
    """A mosquitto on a fixed port that the test stops and starts again."""

    def __init__(self, port: int, log: Any) -> None:
        self.port, self.log = port, log
        self._running: Any = None
        self.start()

    def start(self) -> None:
        self._running = localbrokers.mosquitto(self.port, output=self.log)
        self._running.__enter__()

    def stop(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            running.__exit__(None, None, None)


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(port: int, want: bool, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            code, raw = get(port, "/readyz")
        except OSError:
            time.sleep(0.2)
            continue
        body = json.loads(raw)
        if (code == 200) == want and body["ready"] == want:
            return body
        time.sleep(0.2)
    raise AssertionError(f"/readyz did not become {'ready' if want else 'not ready'}: {body}")


async def test_heartbeat_connection_events_readiness_and_metrics(
        tmp_path: Path, kafka_bootstrap: str, topic_prefix: str) -> None:
    mqtt_port = localbrokers.free_port()
    config, _ = support.counting_gateway(tmp_path, mqtt_port, kafka_bootstrap, topic_prefix)
    config.write_text(config.read_text() + "\nhealth:\n  heartbeat_interval_s: 1\n"
                      "  ready_kafka_grace_s: 30\n")
    with (tmp_path / "mq.log").open("ab") as mq_log:
        broker = Broker(mqtt_port, mq_log)
        gw = support.GatewayProcess(config, tmp_path / "gw.log")
        try:
            gw.wait_sources_running()
            ready = wait_ready(gw.health_port, True)
            assert ready["components"]["sources"]["plant_mqtt"]["ready"] is True
            assert ready["components"]["kafka"]["ready"] is True
            assert ready["components"]["buffer"]["ready"] is True

            # /metrics: the official parser reads every family; the ones operators graph exist.
            code, raw = get(gw.health_port, "/metrics")
            assert code == 200
            families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
            for name in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                         "buffer_pending_events", "buffer_oldest_age_seconds",
                         "kafka_connected", "gateway_uptime_seconds"):
                assert name in families, sorted(families)
            rss = next(iter(families["process_resident_memory_bytes"].samples)).value
            assert 10e6 < rss < 2e9

            # The MQTT broker goes away: not ready, one "down" event (not one per retry).
            broker.stop()
            body = wait_ready(gw.health_port, False)
            assert body["components"]["sources"]["plant_mqtt"]["ready"] is False
            assert body["components"]["sources"]["plant_mqtt"]["last_error"]
            await asyncio.sleep(3)  # several reconnect attempts fail meanwhile
            broker.start()
            wait_ready(gw.health_port, True)
            await asyncio.sleep(1.5)  # one more heartbeat after the recovery
            assert gw.terminate() == 0
        finally:
            if gw.proc.poll() is None:
                gw.kill()
            broker.stop()

    states = await support.consume(
        kafka_bootstrap, [f"{topic_prefix}.gateway.ConnectionStateChanged.v1"], expect=3,
        quiet_s=1)
    changes = [json.loads(r.value) for r in states]
    assert [(c["connection"], c["state"]) for c in changes] == [
        ("plant_mqtt", "up"), ("plant_mqtt", "down"), ("plant_mqtt", "up")]
    assert changes[1]["error"] and changes[2]["down_s"] >= 3
    assert {r.key for r in states} == {b"gateways/test-gw"}
    headers = dict(states[0].headers)
    assert headers["ce_type"] == b"gateway.ConnectionStateChanged.v1"
    assert headers["ce_source"] == b"/gateways/test-gw"

    beats = await support.consume(kafka_bootstrap, [f"{topic_prefix}.gateway.Heartbeat.v1"],
                                  expect=4, quiet_s=1)
    data = [json.loads(r.value) for r in beats]
    last = data[-1]
    assert last["gateway_id"] == "test-gw" and last["interval_s"] == 1
    assert last["connections"]["plant_mqtt"]["protocol"] == "mqtt"
    assert len(last["config_sha256"]) == 64
    assert last["mappings"]["files"] == 1 and len(last["mappings"]["sha256"]) == 64
    assert last["uptime_s"] > data[0]["uptime_s"]
    assert any(d["connections"]["plant_mqtt"]["state"] != "running" for d in data), \
        "a heartbeat during the outage shows the connection down"
    assert len({json.dumps(d, sort_keys=True) for d in data}) == len(data)


# -- the supervisor's transitions, without a network ------------------------------------------


async def test_transitions_are_reported_once_per_episode() -> None:
    seen: list[tuple[str, bool, float | None]] = []
    supervisor = Supervisor(Metrics(), min_backoff_s=0.01, max_backoff_s=0.02,
                            healthy_after_s=0.05)

    def note(comp: Component, up: bool, down_s: float | None) -> None:
        seen.append((comp.name, up, down_s))

    supervisor.on_transition = note
    plan = iter(["ok", "fail", "fail", "fail", "ok"])

    async def run() -> None:
        if next(plan, "ok") == "fail":
            raise SourceUnavailable("broker gone")
        await asyncio.sleep(0.1)
        raise SourceUnavailable("dropped")

    task = asyncio.create_task(supervisor.supervise("c1", "mqtt", run, running_after_s=0.03))
    deadline = time.monotonic() + 10
    while sum(1 for _, up, _ in seen if up) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ups = [s for s in seen if s[1]]
    downs = [s for s in seen if not s[1]]
    assert seen[0] == ("c1", True, None)  # first run
    assert len(downs) >= 1 and len(ups) >= 2
    # Between two "up" reports there is exactly one "down", however many retries failed.
    flips = [up for _, up, _ in seen]
    assert all(a != b for a, b in itertools.pairwise(flips))
    assert ups[1][2] is not None and ups[1][2] > 0
