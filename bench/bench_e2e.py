"""End-to-end throughput: MQTT QoS 1 in -> mapping -> durable buffer -> Kafka (acks=all) out.

Starts a mosquitto and a Tansu of its own and measures, in one run:

1. a bare paho QoS 1 subscriber draining N messages queued for its persistent session;
2. the gateway (a subprocess, sync=full, acks=all) draining the same N messages queued for its
   persistent session while it was stopped: ingest rate (mapped, durably buffered and
   acknowledged to the broker) and end-to-end rate (acknowledged by Kafka), each message
   producing one event; then every record is read back from Kafka and counted.

Draining a queued session takes the publisher out of the measurement. Rates come from the
gateway's own counters sampled every 0.1 s on its health endpoint.

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
from tests.support import make_mappings


def publish_all(port: int, topic: str, n: int, start: int = 0) -> float:
    """QoS 1 messages {"n": start .. start+n-1}, each acknowledged by the broker; seconds taken."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    began = time.monotonic()
    for chunk in range(start, start + n, 20_000):  # paho has 65,535 message ids
        infos = [client.publish(topic, json.dumps({"n": i, "ts": time.time()}), qos=1)
                 for i in range(chunk, min(start + n, chunk + 20_000))]
        for info in infos:
            info.wait_for_publish(timeout=120)
    elapsed = time.monotonic() - began
    client.loop_stop()
    client.disconnect()
    return elapsed


def bare_paho_rate(port: int, topic: str, n: int) -> float:
    """Messages/s a bare paho QoS 1 subscriber takes from its queued persistent session."""
    got = 0
    done = threading.Event()
    first: list[float] = []

    def on_message(_c: object, _u: object, _m: object) -> None:
        nonlocal got
        if not first:
            first.append(time.monotonic())
        got += 1
        if got >= n:
            done.set()

    def client() -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", clean_session=False)
        c.on_message = on_message
        c.connect("127.0.0.1", port)
        return c

    sub = client()
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    time.sleep(0.5)
    sub.disconnect()
    sub.loop_stop()
    publish_all(port, topic, n)
    sub = client()
    sub.loop_start()
    done.wait(timeout=300)
    end = time.monotonic()
    sub.disconnect()
    sub.loop_stop()
    return got / (end - first[0]) if first else 0.0


def sample_rates(gw: support.GatewayProcess, counters: list[str], n: int) -> list[float]:
    """Rate of each counter from its first movement until it reaches n, sampled together."""
    first: dict[str, tuple[float, float]] = {}
    rates: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while len(rates) < len(counters) and time.monotonic() < deadline:
        values = ((gw.health() or {}).get("counters") or {})
        now = time.monotonic()
        for name in counters:
            value = values.get(name, 0)
            if value and name not in first:
                first[name] = (now, value)
            if value >= n and name not in rates and name in first:
                rates[name] = (value - first[name][1]) / max(now - first[name][0], 1e-9)
        time.sleep(0.05)
    return [rates[name] for name in counters]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--json-out", type=Path,
                        help="also write the printed figures to this file (JSON)")
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
        gw = support.GatewayProcess(config, root / "gw0.log")
        gw.wait_sources_running()  # creates the persistent session
        assert gw.terminate() == 0
        publish_all(mqtt_port, f"{prefix}/m1/data", n)
        gw = support.GatewayProcess(config, root / "gw.log")
        start = time.monotonic()
        ingest, forwarded = sample_rates(gw, ["events_mapped_total", "events_forwarded_total"], n)
        total_s = time.monotonic() - start
        records = asyncio.run(support.consume(bootstrap, [f"{prefix}.test.CountChanged.v1"],
                                              expect=n, quiet_s=1, timeout_s=120))
        assert gw.terminate() == 0
    distinct = len({r.value for r in records})
    print(f"messages                                  {n}")
    print(f"bare paho subscriber, QoS 1               {bare:10,.0f} msg/s")
    print(f"gateway ingest (mapped, fsynced, PUBACK)  {ingest:10,.0f} events/s  ({ingest / bare:.2f}x bare paho)")
    print(f"gateway out (Kafka acks=all)              {forwarded:10,.0f} events/s")
    print(f"gateway wall time incl. start-up          {total_s:10.1f} s")
    print(f"records read back from Kafka              {len(records)} ({distinct} distinct, "
          f"{n - distinct} lost, {len(records) - distinct} duplicates)")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "messages": n, "bare_paho_msg_s": bare, "ingest_events_s": ingest,
            "ingest_vs_bare": ingest / bare if bare else None, "forwarded_events_s": forwarded,
            "wall_s": total_s, "records": len(records), "distinct": distinct,
            "lost": n - distinct, "duplicates": len(records) - distinct}, indent=1))


if __name__ == "__main__":
    main()
