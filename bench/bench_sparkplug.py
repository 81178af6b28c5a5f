"""MQTT ingest throughput, Sparkplug B and JSON: a flooding publisher -> decode -> mapping -> buffer.

    python -m bench.bench_sparkplug                   # 20,000 messages x 10 metrics per payload
    python -m bench.bench_sparkplug --quick           # 1,000 messages: a smoke run
    python -m bench.bench_sparkplug --messages 50000 --metrics-per-message 20 [--qos 0]

Starts a mosquitto (free port, the test brokers' settings: ``max_inflight_messages 100``,
``max_queued_messages 200000``) and a Tansu of its own, and, for each payload kind, measures
three receivers draining the same stream, one after the other in the same run:

1. ``bare paho``: a paho subscriber that only counts messages: the raw limit of one Python MQTT
   client on this machine (the figure the ratios are relative to);
2. ``paho + decode``: the same subscriber that also decodes each message as the gateway does on
   its paho thread, and counts the signals: Sparkplug through
   :meth:`~gateway.sources.sparkplug.SparkplugHost.on_message` (protobuf, alias look-up, seq
   check, value conversion into Signals), JSON through ``MqttSource._parse`` (topic match,
   JSON, value and timestamp paths) with the same addresses as the mapping files;
3. ``gateway``: the daemon itself (``python -m gateway run``, as ``bench.bench_e2e``): the MQTT
   source (manual ack, MQTT 5, persistent session) with the Sparkplug host or the JSON
   decoders, the mapping engine, the durable SQLite buffer with ``sync: full``, and the Kafka
   forwarder (acks=all, to Tansu) running alongside as in production. A message is
   acknowledged to the broker only once its events are fsynced.

The stream (``bench/sparkplug_flood.py``, a separate process) is: Sparkplug B, group
``<unique>``, edge node ``flood-node`` with 10 devices: an NBIRTH, a DBIRTH per device giving
``--metrics-per-message`` metrics names and aliases (``m0`` a UInt32 counter, the others
doubles), then ``--messages`` DDATA round-robin over the devices, every metric by alias with a
new value and its own timestamp, ``seq`` 0..255 wrapping (no gap, so no rebirth). JSON: the
same ``--messages`` as ``{"ts": ..., "m0": ..., "m1": ...}`` on ``<prefix>/devNN/data``. The
generated mapping files have one file per device, a signal per metric (``sparkplug`` or
``mqtt`` address) and an ``on_change`` event on ``m0`` in 3 of the 10 devices: 0.3 events per
message (the other 7 have a ``threshold`` event on ``m0`` whose limit is never reached, as a
mapping file needs an event).

QoS: by default the publisher and all subscriptions use QoS 1, which is what the gateway's
config uses (``qos: 1``, at-least-once, acknowledged after the buffer) and what lets the
broker queue the stream losslessly. Sparkplug edge nodes publish DATA with QoS 0, and the
broker delivers with the lower of the publish and subscription QoS, so such a stream reaches
the gateway as QoS 0 (no PUBACK, no in-flight window): ``--qos 0`` measures that case
(mosquitto then gets ``queue_qos0_messages true`` so the stream can still be queued).

Each receiver first creates its persistent session and goes away; the publisher then queues
the whole stream for it (published anew for each receiver) and exits; only then does the
receiver connect and drain it, so the receive rate is measured, not the publish rate. Bare
receivers are timed from their first message to their last; the gateway from the first
movement of its ``signals_mapped_total`` counter (health endpoint, sampled every 0.05 s) until
every signal is mapped and in the buffer: messages/s there is signals/s divided by the metrics
per message, events/s is ``events_mapped_total`` over the same window. The start-up of the
daemon is outside the window. The Sparkplug host's counters (seq gaps, unknown aliases,
rebirths requested) are printed afterwards: they must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench import sparkplug_flood as flood
from gateway.metrics import Metrics
from gateway.sources.mqtt import MqttAddress, MqttConnectionConfig, MqttSource
from gateway.sources.sparkplug import SparkplugAddress, SparkplugHost
from tests import support

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 10
EVENT_DEVICES = 3
"""Devices whose mapping has an on_change event on their counter ``m0``."""
CONNECTION = "plant_mqtt"


@dataclass
class Row:
    kind: str
    receiver: str
    messages: int
    msg_s: float
    signals_s: float | None = None
    events_s: float | None = None
    note: str = ""


# -- the stream and its mapping ------------------------------------------------------------


def mapping_text(kind: str, prefix: str, d: int, metrics: int) -> str:
    dev = flood.device(d)
    lines = ["version: 1", f"asset: {{subject: acme/bench/line1/{dev}}}", "signals:"]
    for i in range(metrics):
        if kind == "sparkplug":
            where = (f"sparkplug: {{group: {prefix}, edge_node: {flood.NODE}, device: {dev}, "
                     f"metric: m{i}}}")
        else:
            where = f'mqtt: {{topic: "{prefix}/{dev}/data", value_path: m{i}, timestamp_path: ts}}'
        lines += [f"  m{i}:", f"    connection: {CONNECTION}", f"    {where}",
                  f"    type: {'integer' if i == 0 else 'float'}"]
    if d < EVENT_DEVICES:
        lines += ["events:", "  count_changed:", "    type: bench.CountChanged.v1",
                  "    trigger: {kind: on_change, signal: m0}", "    data:",
                  "      count: {signal: m0}"]
        if metrics > 1:
            lines.append("      m1: {signal: m1}")
    else:  # a file needs an event: one whose limit the stream never reaches
        lines += ["events:", "  never:", "    type: bench.Never.v1",
                  "    trigger: {kind: threshold, signal: m0, above: 1.0e15}", "    data:",
                  "      count: {signal: m0}"]
    return "\n".join(lines) + "\n"


def write_mappings(folder: Path, kind: str, prefix: str, metrics: int) -> Path:
    folder.mkdir(parents=True)
    for d in range(DEVICES):
        (folder / f"{flood.device(d)}.yaml").write_text(mapping_text(kind, prefix, d, metrics))
    return folder


def addresses(kind: str, prefix: str, metrics: int) -> list[Any]:
    """The addresses of the mapping files, for the decode-only receiver."""
    if kind == "sparkplug":
        return [SparkplugAddress(group=prefix, edge_node=flood.NODE, device=flood.device(d),
                                 metric=f"m{i}")
                for d in range(DEVICES) for i in range(metrics)]
    return [MqttAddress(topic=f"{prefix}/{flood.device(d)}/data", value_path=f"m{i}",
                        timestamp_path="ts")
            for d in range(DEVICES) for i in range(metrics)]


def subscription(kind: str, prefix: str) -> str:
    return f"spBv1.0/{prefix}/#" if kind == "sparkplug" else f"{prefix}/+/data"


def stream_size(kind: str, n: int, metrics: int) -> tuple[int, int]:
    """(messages, addressed signals) of a stream: Sparkplug adds an NBIRTH and the DBIRTHs,
    whose values yield signals too."""
    if kind == "sparkplug":
        return n + 1 + DEVICES, (n + DEVICES) * metrics
    return n, n * metrics


def flood_publish(port: int, kind: str, prefix: str, n: int, metrics: int, qos: int) -> float:
    """Run the publisher process to its end; the seconds it took to publish."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.sparkplug_flood", "--port", str(port), "--mode", kind,
         "--prefix", prefix, "--messages", str(n), "--devices", str(DEVICES),
         "--metrics-per-message", str(metrics), "--qos", str(qos)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


# -- receivers ---------------------------------------------------------------------------------


def bare_receiver(port: int, topic: str, qos: int, client_id: str, expect: int,
                  publish: Callable[[], float],
                  handle: Callable[[mqtt.MQTTMessage], int] | None = None) -> tuple[float, int, float]:
    """(messages/s, signals, seconds) of a paho subscriber draining its queued session;
    ``handle`` (if any) runs on each message on the paho thread and returns its signals."""
    got = signals = 0
    done = threading.Event()
    first: list[float] = []

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal got, signals
        if not first:
            first.append(time.monotonic())
        if handle is not None:
            signals += handle(msg)
        got += 1
        if got >= expect:
            done.set()

    def client() -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        c.on_message = on_message
        c.connect("127.0.0.1", port)
        return c

    sub = client()
    sub.subscribe(topic, qos=qos)
    sub.loop_start()
    time.sleep(0.5)
    sub.disconnect()
    sub.loop_stop()
    publish()
    sub = client()
    sub.loop_start()
    done.wait(timeout=600)
    end = time.monotonic()
    sub.disconnect()
    sub.loop_stop()
    if got < expect:
        print(f"WARNING: {client_id} got {got} of {expect} messages", file=sys.stderr)
    seconds = end - first[0] if first else 0.0
    return (got / seconds if seconds else 0.0), signals, seconds


def decoder(kind: str, prefix: str, metrics: int, port: int) -> tuple[Callable[[mqtt.MQTTMessage], int],
                                                                     Callable[[], str]]:
    """The gateway's per-message decoding as the paho thread does it, and a check of its
    counts (Sparkplug: no seq gap, no unknown alias, no rebirth)."""
    if kind == "sparkplug":
        host = SparkplugHost(addresses(kind, prefix, metrics), connection=CONNECTION)

        def sparkplug(msg: mqtt.MQTTMessage) -> int:
            return len(host.on_message(msg.topic, bytes(msg.payload), time.time()).signals)

        def check() -> str:
            s = host.stats
            return (f"seq gaps {s.seq_gaps}, unknown aliases {s.unknown_aliases}, "
                    f"rebirths {s.rebirths_requested}, malformed {s.malformed}")

        return sparkplug, check
    config = MqttConnectionConfig(protocol="mqtt", host="127.0.0.1", port=port)
    source = MqttSource(CONNECTION, config, addresses(kind, prefix, metrics), "bench-decode",
                        Metrics())

    def plain(msg: mqtt.MQTTMessage) -> int:
        return len(source._parse(msg, time.time()).signals)  # the paho-thread step

    return plain, lambda: ""


def write_config(path: Path, *, mqtt_port: int, bootstrap: str, topic_template: str,
                 mappings: Path, state: Path, qos: int) -> Path:
    """``tests.support.write_config`` with the QoS and ``sync: full`` spelled out."""
    path.write_text(f"""
gateway:
  id: bench-gw
connections:
  {CONNECTION}:
    protocol: mqtt
    host: 127.0.0.1
    port: {mqtt_port}
    session: persistent
    qos: {qos}
kafka:
  bootstrap_servers: ["{bootstrap}"]
  topic_template: "{topic_template}"
  enable_idempotence: {"true" if support.real_kafka() else "false"}
  linger_ms: 5
  retry_min_s: 0.2
  retry_max_s: 1.0
  request_timeout_ms: 5000
buffer:
  directory: {state}
  sync: full
mappings:
  directory: {mappings}
logging:
  level: info
  stats_interval_s: 0
""")
    return path


COUNTERS = ("sparkplug_sequence_gaps_total", "sparkplug_unknown_aliases_total",
            "sparkplug_rebirths_requested_total", "sparkplug_dropped_values_total",
            "mqtt_malformed_payloads_total", "events_dropped_total")


def gateway_receiver(gw: support.GatewayProcess, signals: int) -> tuple[float, float, float, dict[str, float]]:
    """(signals/s, events/s, seconds, final counters) from the first movement of
    ``signals_mapped_total`` until it reaches ``signals``."""
    first: tuple[float, float, float] | None = None
    deadline = time.monotonic() + 900
    counters: dict[str, float] = {}
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited:\n{gw.tail()}")
        counters = (gw.health() or {}).get("counters") or {}
        now = time.monotonic()
        mapped = counters.get("signals_mapped_total", 0)
        events = counters.get("events_mapped_total", 0)
        if mapped and first is None:
            first = (now, mapped, events)
        if first is not None and mapped >= signals:
            window = max(now - first[0], 1e-9)
            return (mapped - first[1]) / window, (events - first[2]) / window, window, counters
        time.sleep(0.05)
    raise RuntimeError(f"the gateway mapped {counters.get('signals_mapped_total')} of {signals} "
                       f"signals in time:\n{gw.tail()}")


def run_kind(kind: str, root: Path, mqtt_port: int, bootstrap: str, n: int, metrics: int,
             qos: int) -> list[Row]:
    prefix = support.unique_topic_prefix()
    messages, signals = stream_size(kind, n, metrics)
    topic = subscription(kind, prefix)
    publish_s: list[float] = []

    def publish() -> float:
        s = flood_publish(mqtt_port, kind, prefix, n, metrics, qos)
        publish_s.append(s)
        return s

    rows = []
    bare, _, _ = bare_receiver(mqtt_port, topic, qos, f"bench-bare-{kind}", messages, publish)
    rows.append(Row(kind, f"bare paho, QoS {qos}", messages, bare))
    handle, check = decoder(kind, prefix, metrics, mqtt_port)
    rate, got, seconds = bare_receiver(mqtt_port, topic, qos, f"bench-decode-{kind}", messages,
                                       publish, handle)
    what = "SparkplugHost.on_message" if kind == "sparkplug" else "MqttSource._parse"
    rows.append(Row(kind, f"paho + {what}", messages, rate, got / seconds if seconds else 0.0,
                    note=check() + ("" if got == signals else f"; {got} of {signals} signals")))

    mappings = write_mappings(root / kind / "mappings", kind, prefix, metrics)
    config = write_config(root / kind / "gw.yaml", mqtt_port=mqtt_port, bootstrap=bootstrap,
                          topic_template=f"{prefix}.{{type}}", mappings=mappings,
                          state=root / kind / "state", qos=qos)
    gw = support.GatewayProcess(config, root / kind / "gw0.log")
    gw.wait_sources_running()  # creates the persistent session
    assert gw.terminate() == 0, gw.tail()
    publish()
    gw = support.GatewayProcess(config, root / kind / "gw.log")
    try:
        signals_s, events_s, _, counters = gateway_receiver(gw, signals)
    finally:
        code = gw.terminate(timeout_s=60)
    checks = ", ".join(f"{name.removesuffix('_total')} {counters.get(name, 0):g}"
                       for name in COUNTERS if kind == "sparkplug" or "sparkplug" not in name)
    rows.append(Row(kind, f"gateway (map, buffer sync=full{', PUBACK' if qos else ''})", messages, signals_s / metrics,
                    signals_s, events_s, note=f"{checks}; exit {code}"))
    print(f"  {kind}: publisher took {', '.join(f'{s:.1f}' for s in publish_s)} s per stream "
          f"({messages:,} messages each)", flush=True)
    return rows


def print_table(rows: list[Row], n: int, metrics: int, qos: int) -> None:
    print()
    print(f"{n:,} data messages x {metrics} metrics ({DEVICES} devices; events: on_change in "
          f"{EVENT_DEVICES} of them), QoS {qos}, queued then drained")
    print(f"{'payload':<10} {'receiver':<40} {'messages':>9} {'msg/s':>9} {'signals/s':>10} "
          f"{'events/s':>9} {'vs bare':>8}")
    bare: dict[str, float] = {}
    for r in rows:
        bare.setdefault(r.kind, r.msg_s)
        sig = f"{r.signals_s:>10,.0f}" if r.signals_s is not None else f"{'-':>10}"
        ev = f"{r.events_s:>9,.0f}" if r.events_s is not None else f"{'-':>9}"
        ratio = r.msg_s / bare[r.kind] if bare[r.kind] else 0.0
        print(f"{r.kind:<10} {r.receiver:<40} {r.messages:>9,} {r.msg_s:>9,.0f} {sig} {ev} "
              f"{ratio:>7.2f}x")
    print()
    for r in rows:
        if r.note:
            print(f"{r.kind} / {r.receiver}: {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=20_000, help="DDATA / JSON messages")
    parser.add_argument("--metrics-per-message", type=int, default=10)
    parser.add_argument("--qos", type=int, choices=[0, 1], default=1,
                        help="publish and subscription QoS (default 1, the gateway's config)")
    parser.add_argument("--kinds", default="sparkplug,json", help="sparkplug, json or both")
    parser.add_argument("--quick", action="store_true", help="1,000 messages: a smoke run")
    args = parser.parse_args()
    n = 1_000 if args.quick else args.messages
    metrics = args.metrics_per_message
    if n + 1 + DEVICES > 200_000:
        parser.error("mosquitto queues at most 200,000 messages per session here")
    extra = "queue_qos0_messages true\n" if args.qos == 0 else ""
    rows: list[Row] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, support.mosquitto(extra_conf=extra) as mqtt_port, \
            support.kafka_broker() as bootstrap:
        for kind in args.kinds.split(","):
            print(f"{kind}: {n:,} messages x {metrics} metrics ...", flush=True)
            rows += run_kind(kind, Path(tmp), mqtt_port, bootstrap, n, metrics, args.qos)
    print_table(rows, n, metrics, args.qos)
    print(f"\nwall time {time.monotonic() - began:.0f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
