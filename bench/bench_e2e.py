"""End-to-end throughput: MQTT QoS 1 in -> mapping -> durable buffer -> Kafka (acks=all) out.

Starts a mosquitto and a Tansu of its own, the gateway as a subprocess, publishes N messages
as fast as paho can (each producing one event) and measures until every event was consumed back
from Kafka. Also measures, in the same run, a bare paho QoS 1 subscriber on the same broker, so
the gateway's ingest can be read as a ratio.

    python -m bench.bench_e2e [--messages 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests import support
from tests.test_daemon import make_mappings


def publish_all(port: int, topic: str, n: int) -> float:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.monotonic()
    infos = [client.publish(topic, json.dumps({"n": i, "ts": time.time()}), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(timeout=120)
    elapsed = time.monotonic() - start
    client.loop_stop()
    client.disconnect()
    return elapsed


def bare_paho_rate(port: int, topic: str, n: int) -> float:
    """Messages/s a bare paho QoS 1 subscriber receives (and acks) with nothing else to do."""
    got = 0
    done = threading.Event()
    first: list[float] = []

    def on_message(_c, _u, _m):  # noqa: ANN001
        nonlocal got
        if not first:
            first.append(time.monotonic())
        got += 1
        if got >= n:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare")
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    time.sleep(0.5)
    publish_all(port, topic, n)
    done.wait(timeout=120)
    sub.loop_stop()
    sub.disconnect()
    return got / (time.monotonic() - first[0]) if first else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    args = parser.parse_args()
    n = args.messages
    prefix = support.unique_topic_prefix()
    with tempfile.TemporaryDirectory() as tmp, support.mosquitto() as mqtt_port, \
            support.kafka_broker() as bootstrap:
        root = Path(tmp)
        mappings = make_mappings(root, prefix, ["m1"])
        config = support.write_config(root / "gw.yaml", mqtt_port=mqtt_port, bootstrap=bootstrap,
                                      topic_template=f"{prefix}.{{type}}", mappings=mappings,
                                      state=root / "state")
        bare = bare_paho_rate(mqtt_port, f"{prefix}/bare", n)
        gw = support.GatewayProcess(config, root / "gw.log")
        gw.wait_sources_running()
        start = time.monotonic()
        pub_s = publish_all(mqtt_port, f"{prefix}/m1/data", n)
        gw.wait_for(lambda h: h["counters"].get("events_mapped_total", 0) >= n, 300, "all mapped")
        ingest_s = time.monotonic() - start
        gw.wait_for(lambda h: h["counters"].get("events_forwarded_total", 0) >= n, 300, "all forwarded")
        total_s = time.monotonic() - start
        records = asyncio.run(support.consume(bootstrap, [f"{prefix}.test.CountChanged.v1"],
                                              expect=n, quiet_s=1, timeout_s=120))
        assert gw.terminate() == 0
    print(f"messages                     {n}")
    print(f"publish (paho, QoS 1)        {n / pub_s:10,.0f} msg/s")
    print(f"bare paho subscriber QoS 1   {bare:10,.0f} msg/s")
    print(f"gateway ingest (mapped+buffered, acked) {n / ingest_s:10,.0f} events/s "
          f"({n / ingest_s / bare:.2f}x bare paho)")
    print(f"end to end (Kafka acks=all)  {n / total_s:10,.0f} events/s")
    print(f"records read back            {len(records)} ({len({r.value for r in records})} distinct)")


if __name__ == "__main__":
    main()
