"""Engine state across a hot reload, and time-based triggers ticked by the pipeline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.app.pipeline import Pipeline
from gateway.buffer.disk import BufferConfig, DiskBuffer
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import Signal, decode_envelope
from gateway.sources.base import Delivery

MAPPING = """\
version: 1
asset: {{subject: acme/p1/l1/m1}}
signals:
  state:
    connection: plant_mqtt
    mqtt: {{topic: m1/status, value_path: state}}
    type: string
    enum: [Idle, Running, Fault]
  door:
    connection: plant_mqtt
    mqtt: {{topic: m1/status, value_path: {door_path}}}
    type: boolean
events:
  state_changed:
    type: production.MachineStateChanged.v1
    trigger: {{kind: transition, signal: state}}
    data:
      state: {{signal: state}}
      previous_state: {{previous: state}}
      previous_state_duration_s: {{trigger: state_duration_s}}
  door_opened:
    type: safety.GuardDoorOpened.v1
    trigger: {{kind: edge, signal: door, edge: rising, min_duration_ms: 300}}
    data: {{closed_for_s: {{trigger: state_duration_s}}}}
"""


def mapper(tmp_path: Path, door_path: str = "door") -> Mapper:
    folder = tmp_path / "mappings"
    folder.mkdir(exist_ok=True)
    (folder / "m1.yaml").write_text(MAPPING.format(door_path=door_path))
    return Mapper(load_mappings(folder, {"plant_mqtt": "mqtt"}), "gw")


def reading(tag: str, value: object, t: float) -> Signal:
    return Signal("plant_mqtt", f"m1/status#{tag}", value, source_time=t, receive_time=t)


def test_unchanged_signals_and_triggers_keep_their_state_across_a_reload(tmp_path):
    """After a reload the next transition knows the state before it and how long it lasted."""
    old = mapper(tmp_path)
    old.map(reading("state", "Idle", 100.0))
    old.map(reading("state", "Running", 160.0))
    new = mapper(tmp_path)
    assert new.adopt_state(old) == 4  # 2 signals, 2 triggers
    events = new.map(reading("state", "Fault", 250.0))
    assert [e.data for e in events] == [
        {"state": "Fault", "previous_state": "Running", "previous_state_duration_s": 90.0}]


def test_a_changed_signal_starts_fresh(tmp_path):
    """A signal read from another address does not inherit the old reading."""
    old = mapper(tmp_path)
    old.map(reading("door", False, 100.0))
    (tmp_path / "b").mkdir()
    new = mapper(tmp_path / "b", door_path="door_open")
    carried = new.adopt_state(old)
    assert carried == 2  # state signal and its transition; not the door nor its edge
    assert new.signal_states[("acme/p1/l1/m1", "door")].value is None


async def test_the_pipeline_ticks_a_debounced_edge_without_a_further_reading(tmp_path):
    """A door opens once and stays open: the pipeline's tick fires the event ~300 ms later."""
    metrics = Metrics()
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), metrics)
    await buffer.open()
    pipeline = Pipeline(mapper(tmp_path), buffer, metrics)
    task = asyncio.create_task(pipeline.run())
    try:
        now = time.time()
        await pipeline.emit(Delivery([reading("door", False, now - 5)]))
        await pipeline.emit(Delivery([reading("door", True, now)]))
        deadline = time.monotonic() + 5
        while buffer.pending_events == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        records = await buffer.read(0, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buffer.close()
    assert [r.type for r in records] == ["safety.GuardDoorOpened.v1"]
    data = decode_envelope(records[0].body)["data"]
    assert data == {"closed_for_s": None}  # the closed level began before the gateway saw it
