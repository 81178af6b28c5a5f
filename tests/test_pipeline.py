"""The ingest pipeline: acks after the durable append, and events it cannot encode."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.app.pipeline import Pipeline
from gateway.buffer.disk import BufferConfig, DiskBuffer
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import DomainEvent, Signal, decode_envelope
from gateway.sources.base import Delivery

MAPPING = """\
version: 1
asset: {subject: acme/p1/l1/m1}
signals:
  t: {connection: plant_mqtt, mqtt: {topic: m1/t}, type: float}
events:
  changed:
    type: process.TemperatureChanged.v1
    trigger: {kind: on_change, signal: t}
    data: {t: {signal: t}}
"""


async def test_an_event_time_past_9999_is_dropped_counted_and_the_stream_goes_on(tmp_path: Path):
    """One absurd device timestamp must not look like a disk failure and hold everything."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "m1.yaml").write_text(MAPPING)
    metrics = Metrics()
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), metrics)
    await buffer.open()
    mapper = Mapper(load_mappings(tmp_path / "m", {"plant_mqtt": "mqtt"}), "gw")
    pipeline = Pipeline(mapper, buffer, metrics)
    acked: list[int] = []
    task = asyncio.create_task(pipeline.run())
    try:
        await pipeline.emit(Delivery([Signal("plant_mqtt", "m1/t", 1.0, source_time=1e17)],
                                     lambda: acked.append(1)))
        await pipeline.emit(Delivery([Signal("plant_mqtt", "m1/t", 2.0, source_time=1.7e9)],
                                     lambda: acked.append(2)))
        for _ in range(100):
            if len(acked) == 2:
                break
            await asyncio.sleep(0.02)
        records = await buffer.read(0, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buffer.close()
    assert acked == [1, 2]
    assert len(records) == 1
    assert metrics.value("events_dropped_total", reason="invalid_time") == 1
    assert metrics.value("buffer_append_errors_total") == 0


class _OneBadEvent:
    """A stand-in mapper: the second reading makes an event JSON cannot carry."""

    needs_tick = False

    def map(self, signal: Signal) -> list[DomainEvent]:
        value: object = object() if signal.value == "bad" else signal.value
        return [DomainEvent(f"id-{signal.value}", "/s", "t.E.v1", "a/b", 1.7e9, {"v": value})]


async def test_an_unencodable_event_is_dropped_and_the_rest_of_its_batch_kept(tmp_path: Path):
    metrics = Metrics()
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), metrics)
    await buffer.open()
    pipeline = Pipeline(_OneBadEvent(), buffer, metrics)  # type: ignore[arg-type]
    for value in ("a", "bad", "c"):
        await pipeline.emit(Delivery([Signal("c", "t", value)]))
    await pipeline.drain()
    records = await buffer.read(0, 10)
    await buffer.close()
    assert [decode_envelope(r.body)["data"]["v"] for r in records] == ["a", "c"]
    assert metrics.value("events_dropped_total", reason="unencodable") == 1
    assert metrics.value("buffer_append_errors_total") == 0
