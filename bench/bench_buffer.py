"""Throughput of the disk buffer and of buffer -> Kafka forwarding, on this machine.

    python bench/bench_buffer.py                      # buffer figures + forwarding to a Tansu of its own
    python bench/bench_buffer.py --kafka host:9092    # forward to that Kafka instead
    python bench/bench_buffer.py --no-kafka           # buffer figures only

Figures (events/s, ~330-byte events, 50 subjects, one event type):

- ``append``: ``DiskBuffer.append`` of 1000 events per call (one transaction each), per sync mode;
  includes ``DomainEvent.encode()``.
- ``read+delete``: what the forwarder does to the buffer per event (10 000 per round).
- ``open``: seconds to recover a buffer with every event still pending (count scan +
  quick_check).
- ``forward``: events already buffered until Kafka acknowledged and the buffer is empty, per
  content mode; the broker runs on the same machine and competes for its CPUs.
- ``concurrent``: appending 1000-event batches while the forwarder runs, until all are
  acknowledged (the gateway's steady state, minus sources and mapping).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import logs
from gateway.buffer.disk import BufferConfig, DiskBuffer
from gateway.metrics import Metrics
from gateway.model import DomainEvent, EventIds
from gateway.sinks.kafka import KafkaConfig, KafkaForwarder

BATCH = 1000


def make_batches(count: int) -> list[list[DomainEvent]]:
    ids, now = EventIds(), time.time()
    events = [
        DomainEvent(id=ids.next(), source="digispine-gateway/bench/plc",
                    type="production.MachineStateChanged.v1", subject=f"acme/plant1/press{i % 50}",
                    time=now + i / 1000,
                    data={"state": "RUNNING", "previous": "IDLE", "counter": i, "quality": "good"})
        for i in range(count)
    ]
    return [events[i:i + BATCH] for i in range(0, count, BATCH)]


def report(name: str, count: int, seconds: float) -> None:
    print(f"{name:<34} {count / seconds:>10,.0f} events/s  ({count:,} in {seconds:.2f} s)",
          flush=True)


async def bench_buffer(count: int, sync: str) -> None:
    batches = make_batches(count)
    with tempfile.TemporaryDirectory() as tmp:
        buf = DiskBuffer(BufferConfig(directory=Path(tmp), sync=sync), Metrics())  # type: ignore[arg-type]
        await buf.open()
        start = time.perf_counter()
        for batch in batches:
            await buf.append(batch)
        report(f"append sync={sync} ({BATCH}/txn)", count, time.perf_counter() - start)
        await buf.close()

        buf = DiskBuffer(BufferConfig(directory=Path(tmp), sync=sync), Metrics())  # type: ignore[arg-type]
        start = time.perf_counter()
        await buf.open()
        print(f"{'open (recover + quick_check)':<34} {time.perf_counter() - start:>10.2f} s"
              f"         ({count:,} pending, {buf.pending_bytes / 1e6:.0f} MB)", flush=True)

        start, cursor = time.perf_counter(), 0
        while records := await buf.read(cursor, 10_000):
            cursor = records[-1].seq
            await buf.delete([r.seq for r in records])
        report(f"read+delete sync={sync}", count, time.perf_counter() - start)
        await buf.close()


async def bench_forward(bootstrap: str, count: int, mode: str, idempotence: bool,
                        concurrent: bool) -> None:
    from tests.support import unique_topic_prefix

    batches = make_batches(count)
    with tempfile.TemporaryDirectory() as tmp:
        buf = DiskBuffer(BufferConfig(directory=Path(tmp), sync="full"), Metrics())
        await buf.open()
        if not concurrent:
            for batch in batches:
                await buf.append(batch)
        config = KafkaConfig(bootstrap_servers=[bootstrap], content_mode=mode,  # type: ignore[arg-type]
                             topic_template=f"{unique_topic_prefix()}.{{type}}",
                             enable_idempotence=idempotence)
        forwarder = KafkaForwarder(config, buf, "bench", Metrics())
        start = time.perf_counter()
        task = asyncio.create_task(forwarder.run())
        if concurrent:
            for batch in batches:
                await buf.append(batch)
        while forwarder.delivered < count and not task.done():
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - start
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        label = "concurrent append+forward" if concurrent else "forward"
        report(f"{label} {mode}", count, seconds)
        await buf.close()


@contextlib.contextmanager
def broker(args: argparse.Namespace) -> Iterator[str | None]:
    if args.no_kafka:
        yield None
    elif args.kafka:
        yield args.kafka
    else:
        from tests.support import kafka_broker

        with kafka_broker() as bootstrap:
            yield bootstrap


async def main(args: argparse.Namespace, bootstrap: str | None) -> None:
    for sync in ("full", "normal", "off"):
        await bench_buffer(args.events, sync)
    if bootstrap is None:
        return
    idempotence = bool(args.kafka)  # Tansu refuses idempotent producers
    for mode in ("binary", "structured"):
        await bench_forward(bootstrap, args.events, mode, idempotence, concurrent=False)
    await bench_forward(bootstrap, args.events, "binary", idempotence, concurrent=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--kafka", help="bootstrap servers of a real Kafka (default: start Tansu)")
    parser.add_argument("--no-kafka", action="store_true")
    arguments = parser.parse_args()
    logs.configure("warning", "console")
    with broker(arguments) as servers:
        asyncio.run(main(arguments, servers))
