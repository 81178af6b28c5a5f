"""Flooding publisher for ``bench.bench_sparkplug``, run as a process of its own.

Publishes one stream to a broker and exits, printing ``{"seconds": ..., "messages": ...}``:

- ``sparkplug``: an NBIRTH (seq 0, ``bdSeq``), one DBIRTH per device giving every metric a name,
  an alias (unique in the node) and a data type, then ``--messages`` DDATA round-robin over the
  devices naming the metrics by alias only, ``seq`` one more per message, wrapping after 255,
  so a host sees no gap and asks no rebirth. Encoded with the gateway's own schema
  (:mod:`gateway.sources.sparkplug_schema`), a timestamp on the payload and on every metric as
  Eclipse Tahu does.
- ``json``: the same content as JSON, one object per message on ``<prefix>/<device>/data``:
  ``{"ts": <Unix s>, "m0": <count>, "m1": <float>, ...}``.

In both, metric ``m0`` of a device is a UInt32 counter that goes up by one in each of its
messages and ``m1..`` are doubles that change every message. Every message is published with
``--qos`` and, at QoS >= 1, acknowledged by the broker before the process exits.

    python -m bench.sparkplug_flood --port 1883 --mode sparkplug --prefix g1 --messages 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.sources.sparkplug_schema import DataType, Payload

NODE = "flood-node"
CHUNK = 20_000  # paho has 65,535 message ids


def device(d: int) -> str:
    return f"dev{d:02d}"


def alias(d: int, i: int, metrics: int) -> int:
    """Aliases are unique within an edge node, over all its devices."""
    return 1 + d * metrics + i


def _payload(seq: int, ms: int) -> object:
    p = Payload(timestamp=ms)
    p.seq = seq
    return p


def _add(p: object, i: int, value: float, ms: int, *, name: str | None = None,
         alias_: int | None = None) -> None:
    m = p.metrics.add(timestamp=ms)  # type: ignore[attr-defined]
    if name is not None:
        m.name = name
    if alias_ is not None:
        m.alias = alias_
    if i == 0:
        m.datatype = DataType.UInt32
        m.int_value = int(value) & 0xFFFF_FFFF
    else:
        m.datatype = DataType.Double
        m.double_value = value


def sparkplug_stream(group: str, devices: int, metrics: int, n: int) -> Iterator[tuple[str, bytes]]:
    ms = int(time.time() * 1000)
    base = f"spBv1.0/{group}"
    birth = _payload(0, ms)
    b = birth.metrics.add(name="bdSeq", timestamp=ms, datatype=DataType.Int64)  # type: ignore[attr-defined]
    b.long_value = 0
    r = birth.metrics.add(name="Node Control/Rebirth", timestamp=ms,  # type: ignore[attr-defined]
                          datatype=DataType.Boolean)
    r.boolean_value = False
    yield f"{base}/NBIRTH/{NODE}", birth.SerializeToString()  # type: ignore[attr-defined]
    seq = 0
    counts = [0] * devices
    for d in range(devices):
        seq = (seq + 1) % 256
        p = _payload(seq, ms)
        for i in range(metrics):
            _add(p, i, 0.0, ms, name=f"m{i}", alias_=alias(d, i, metrics))
        yield f"{base}/DBIRTH/{NODE}/{device(d)}", p.SerializeToString()  # type: ignore[attr-defined]
    for k in range(n):
        d = k % devices
        counts[d] += 1
        seq = (seq + 1) % 256
        ms = int(time.time() * 1000)
        p = _payload(seq, ms)
        for i in range(metrics):
            _add(p, i, counts[d] if i == 0 else counts[d] * 0.5 + i, ms,
                 alias_=alias(d, i, metrics))
        yield f"{base}/DDATA/{NODE}/{device(d)}", p.SerializeToString()  # type: ignore[attr-defined]


def json_stream(prefix: str, devices: int, metrics: int, n: int) -> Iterator[tuple[str, bytes]]:
    counts = [0] * devices
    for k in range(n):
        d = k % devices
        counts[d] += 1
        doc: dict[str, float] = {"ts": time.time()}
        for i in range(metrics):
            doc[f"m{i}"] = counts[d] if i == 0 else counts[d] * 0.5 + i
        yield f"{prefix}/{device(d)}/data", json.dumps(doc).encode()


def publish(port: int, stream: Iterator[tuple[str, bytes]], qos: int) -> tuple[int, float]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    began = time.monotonic()
    sent = 0
    infos: list[mqtt.MQTTMessageInfo] = []
    for topic, payload in stream:
        infos.append(client.publish(topic, payload, qos=qos))
        sent += 1
        if len(infos) >= CHUNK:
            for info in infos:
                info.wait_for_publish(timeout=120)
            infos = []
    for info in infos:
        info.wait_for_publish(timeout=120)
    elapsed = time.monotonic() - began
    client.disconnect()
    client.loop_stop()
    return sent, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["sparkplug", "json"], required=True)
    parser.add_argument("--prefix", required=True, help="Sparkplug group id, or JSON topic prefix")
    parser.add_argument("--messages", type=int, required=True, help="DDATA / JSON messages")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--metrics-per-message", type=int, default=10)
    parser.add_argument("--qos", type=int, choices=[0, 1], default=1)
    args = parser.parse_args()
    make = sparkplug_stream if args.mode == "sparkplug" else json_stream
    stream = make(args.prefix, args.devices, args.metrics_per_message, args.messages)
    sent, elapsed = publish(args.port, stream, args.qos)
    json.dump({"messages": sent, "seconds": elapsed}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
