"""Latency at a fixed rate: MQTT publish -> gateway (mapping, durable buffer) -> Kafka -> consumer.

Starts a mosquitto and a Tansu of its own and the real gateway (a subprocess, the counting
mapping of tests/support.py: one event per message, ``buffer.sync`` full, acks=all). A paced
paho publisher sends QoS 1 JSON messages ``{"n": i, "ts": <send time>}`` at ``--rate`` msg/s
for ``--warmup`` + ``--duration`` s and notes the wall-clock time of each ``publish()`` call; a
Kafka consumer in a process of its own (so that the publisher's and paho's threads do not delay
it through the GIL) notes the wall-clock time each record arrives (same machine, same clock).

Figures, over the messages published in the measured window (after the warm-up):

- ``publish -> consumer receive``: p50 / p90 / p99 / max, ms. This is the target's "source
  receive -> Kafka ack" plus the MQTT hop before it (publisher -> mosquitto -> gateway) and
  the consumer's fetch after it; the producer's ack itself is not observed (on one broker a
  record is readable about when it is acknowledged). An upper-bound-style figure.
- ``publish -> record timestamp``: the Kafka record's CreateTime (ms resolution, set by the
  gateway's producer when it hands the record over): the part spent before Kafka (MQTT hop,
  mapping, durable append, buffer read).
- the achieved publish rate, the gateway's forwarded rate over the window, the buffer's pending
  events at the end (a growing backlog would show here), the gateway's RSS, records lost.

The consumer fetches with ``fetch_max_wait_ms`` 10 (its wait when nothing is new).

    python -m bench.bench_latency                       # 5,000 msg/s, 3 s warm-up, 20 s measured
    python -m bench.bench_latency --duration 5 --json-out lat.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests import support

EVENT_TYPE = "test.CountChanged.v1"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


class PacedPublisher(threading.Thread):
    """QoS 1 messages {"n": i, "ts": now} at ``rate`` msg/s, in ticks of 5 ms; ``sent_at[i]`` is the
    wall-clock time of publish() of message i."""

    def __init__(self, port: int, topic: str, rate: float, seconds: float, start: int = 0) -> None:
        super().__init__(daemon=True)
        self.port, self.topic, self.rate, self.seconds = port, topic, rate, seconds
        self.start_n = start
        self.sent_at: list[float] = []
        self.started = self.ended = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="")
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.connect("127.0.0.1", self.port)
            client.loop_start()
            tick = 0.005
            began = time.monotonic()
            self.started = time.time()
            total = int(self.rate * self.seconds)
            n = 0
            while n < total:
                due = int(min(total, (time.monotonic() - began) * self.rate + 1))
                while n < due:
                    now = time.time()
                    self.sent_at.append(now)
                    client.publish(self.topic, json.dumps({"n": self.start_n + n, "ts": now}), qos=1)
                    n += 1
                time.sleep(tick)
            self.ended = time.time()
            time.sleep(1.0)  # let the last PUBACKs come in
            client.loop_stop()
            client.disconnect()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc


def consumer_process(bootstrap: str, topic: str, expect: int, timeout_s: float, out: str,
                     ready: Any) -> None:
    """Reads ``topic`` from the start until ``expect`` distinct n arrived (or the timeout) and
    writes [[n, received wall time, record timestamp ms], ...] to ``out``."""
    from aiokafka import AIOKafkaConsumer

    async def main() -> None:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    group_id=None, metadata_max_age_ms=1000,
                                    fetch_max_wait_ms=10)
        await consumer.start()
        ready.set()
        rows: list[tuple[int, float, int]] = []
        seen: set[int] = set()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and len(seen) < expect:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for records in batch.values():
                    for r in records:
                        n = int(json.loads(r.value)["n"])
                        seen.add(n)
                        rows.append((n, now, int(r.timestamp)))
        finally:
            await consumer.stop()
        Path(out).write_text(json.dumps(rows))

    asyncio.run(main())


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupted)  # like Ctrl-C: stop the gateway and brokers
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000.0, help="messages (= events) per s")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--sync", default="full", help="buffer.sync of the gateway")
    parser.add_argument("--json-out", type=Path, help="also write the figures to this file (JSON)")
    args = parser.parse_args(argv)
    prefix = support.unique_topic_prefix()
    mqtt_topic = f"{prefix}/m1/data"
    kafka_topic = f"{prefix}.{EVENT_TYPE}"
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp, \
            support.mosquitto(extra_conf="max_inflight_messages 1000\n") as mqtt_port, \
            support.kafka_broker() as bootstrap:
        root = Path(tmp)
        mappings = support.make_mappings(root, prefix, ["m1"])
        config = support.write_config(root / "gw.yaml", mqtt_port=mqtt_port, bootstrap=bootstrap,
                                      topic_template=f"{prefix}.{{type}}", mappings=mappings,
                                      state=root / "state")
        gw = support.GatewayProcess(config, root / "gw.log",
                                    env={"DIGISPINE_BUFFER__SYNC": args.sync})
        try:
            gw.wait_sources_running()
            gw.wait_for(lambda h: h["kafka"]["connected"], 30, "Kafka connected")
            # one message first (n = -1), so that the topic exists before the consumer subscribes
            primer = PacedPublisher(mqtt_port, mqtt_topic, 1, 1, start=-1)
            primer.run()
            gw.wait_for(lambda h: (h.get("counters") or {}).get("events_forwarded_total", 0) >= 1,
                        30, "the first event forwarded")
            total = int(args.rate * (args.warmup + args.duration))
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Event()
            out = str(root / "consumed.json")
            consumer = ctx.Process(target=consumer_process, args=(
                bootstrap, kafka_topic, total, args.warmup + args.duration + 60, out, ready))
            consumer.start()
            if not ready.wait(30):
                raise RuntimeError("the consumer did not start")
            time.sleep(1.0)  # its first fetch (and the primer record) behind it
            publisher = PacedPublisher(mqtt_port, mqtt_topic, args.rate,
                                       args.warmup + args.duration)
            publisher.start()
            samples: list[tuple[float, float, float]] = []  # (wall time, forwarded, pending)
            while publisher.is_alive():
                h = gw.health() or {}
                samples.append((time.time(), float((h.get("counters") or {}).get(
                    "events_forwarded_total", 0)), float((h.get("buffer") or {}).get(
                        "pending_events", 0))))
                time.sleep(0.5)
            publisher.join()
            if publisher.error is not None:
                raise RuntimeError(f"publisher failed: {publisher.error!r}")
            consumer.join(args.warmup + args.duration + 90)
            if consumer.is_alive():
                consumer.kill()
                raise RuntimeError("the consumer did not finish")
            end_health = gw.health() or {}
            rss_mib = 0.0
            for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss_mib = int(line.split()[1]) / 1024
        finally:
            code = gw.terminate()
        rows = json.loads(Path(out).read_text())
    first: dict[int, tuple[float, int]] = {}  # the first arrival of each n (the primer's is -1)
    for n, received, stamp in rows:
        first.setdefault(n, (received, stamp))
    sent = publisher.sent_at
    window_start = publisher.started + args.warmup
    measured = [n for n in range(len(sent)) if sent[n] >= window_start]
    e2e = [1000 * (first[n][0] - sent[n]) for n in measured if n in first]
    pre = [first[n][1] - 1000 * sent[n] for n in measured if n in first]
    lost = len([n for n in range(len(sent)) if n not in first])
    win = [s for s in samples if s[0] >= window_start]
    forwarded = ((win[-1][1] - win[0][1]) / max(win[-1][0] - win[0][0], 1e-9)
                 if len(win) >= 2 else float("nan"))
    achieved = len(measured) / max(publisher.ended - window_start, 1e-9)
    pending_end = float((end_health.get("buffer") or {}).get("pending_events", 0))
    pending_max = max((s[2] for s in win), default=float("nan"))
    fig = {
        "rate_asked": args.rate, "rate_published": achieved, "forwarded_events_s": forwarded,
        "measured_messages": len(measured), "received": len(e2e), "lost": lost,
        "e2e_ms": {"p50": percentile(e2e, 0.5), "p90": percentile(e2e, 0.9),
                   "p99": percentile(e2e, 0.99), "max": max(e2e, default=float("nan")),
                   "mean": statistics.fmean(e2e) if e2e else float("nan")},
        "to_record_ts_ms": {"p50": percentile(pre, 0.5), "p99": percentile(pre, 0.99)},
        "pending_max_in_window": pending_max, "pending_at_end": pending_end,
        "gateway_rss_peak_mib": rss_mib, "sync": args.sync, "gateway_exit": code,
        "duration_s": args.duration, "warmup_s": args.warmup,
    }
    e, p = fig["e2e_ms"], fig["to_record_ts_ms"]
    print(f"latency at {args.rate:,.0f} msg/s asked ({achieved:,.0f} published, gateway forwarded "
          f"{forwarded:,.0f} events/s), {args.duration:g} s measured after {args.warmup:g} s, "
          f"buffer.sync={args.sync}, acks=all")
    print(f"publish -> consumer receive   p50 {e['p50']:7.1f} ms  p90 {e['p90']:7.1f} ms  "
          f"p99 {e['p99']:7.1f} ms  max {e['max']:7.1f} ms  ({len(e2e):,} messages)")
    print(f"publish -> record timestamp   p50 {p['p50']:7.1f} ms  p99 {p['p99']:7.1f} ms  "
          f"(the gateway's producer CreateTime, ms resolution)")
    print(f"buffer pending: max {pending_max:,.0f} in the window, {pending_end:,.0f} at the end; "
          f"gateway peak RSS {rss_mib:.1f} MiB; {lost} of {len(sent):,} messages not read back")
    if args.json_out:
        args.json_out.write_text(json.dumps(fig, indent=1))
    return 0 if not lost and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
