"""Engine state across a hot reload, and time-based triggers ticked by the pipeline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.app.pipeline import Pipeline
from gateway.buffer.disk import BufferConfig, DiskBuffer
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import DomainEvent, Signal, decode_envelope
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
    folder.mkdir(parents=True, exist_ok=True)
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


CLOCKED = """\
version: 1
asset: {{subject: acme/p1/l1/m2}}
signals:
  state:
    connection: plant_mqtt
    mqtt: {{topic: m2/status, value_path: state}}
    type: string
  temperature:
    connection: plant_mqtt
    mqtt: {{topic: m2/status, value_path: temperature}}
    type: float
events:
  stats:
    type: process.TemperatureStatistics.v1
    trigger: {{kind: window, signal: temperature, every_s: {window_s}}}
    data: {{readings: {{trigger: count}}, mean: {{trigger: mean}}}}
  health:
    type: maintenance.SignalQualityChanged.v1
    trigger: {{kind: quality, signal: temperature, stale_after_s: 30}}
    data: {{quality: {{trigger: quality}}, duration_s: {{trigger: state_duration_s}}}}
  snapshot:
    type: production.Status.v1
    trigger: {{kind: periodic, every_s: {snapshot_s}}}
    data: {{state: {{signal: state}}}}
"""


def clocked(tmp_path: Path, window_s: float = 60, snapshot_s: float = 900) -> Mapper:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "m2.yaml").write_text(CLOCKED.format(window_s=window_s, snapshot_s=snapshot_s))
    return Mapper(load_mappings(tmp_path, {"plant_mqtt": "mqtt"}), "gw")


def reading2(tag: str, value: object, t: float) -> Signal:
    return Signal("plant_mqtt", f"m2/status#{tag}", value, source_time=t, receive_time=t)


def test_an_open_window_keeps_its_readings_across_a_reload(tmp_path):
    """Readings before and after the reload land in one window; the reload loses none."""
    old = clocked(tmp_path / "a")
    old.map(reading2("temperature", 10.0, 1000.0))
    old.map(reading2("temperature", 20.0, 1010.0))
    new = clocked(tmp_path / "b")
    assert new.adopt_state(old) == 5  # 2 signals, 3 triggers
    new.map(reading2("temperature", 30.0, 1015.0))
    (event,) = new.map(reading2("temperature", 40.0, 1021.0))
    assert (event.time, event.data) == (1020.0, {"readings": 3, "mean": 20.0})


def test_a_changed_window_starts_fresh_and_the_rest_carries_over(tmp_path):
    """A window of another length cannot continue the old one; the quality and periodic
    triggers of the same file still carry over."""
    old = clocked(tmp_path / "a")
    old.map(reading2("temperature", 10.0, 1000.0))
    new = clocked(tmp_path / "b", window_s=120)
    assert new.adopt_state(old) == 4
    assert new.trigger_states[("acme/p1/l1/m2", "stats")] == type(
        old.trigger_states[("acme/p1/l1/m2", "stats")]
    )()


def test_a_bad_signal_stays_bad_across_a_reload(tmp_path):
    """Its recovery after the reload is an event, with how long it was bad."""
    old = clocked(tmp_path / "a")
    old.map(reading2("temperature", 10.0, 100.0))
    (bad,) = old.map(reading2("temperature", "n/a", 110.0))
    assert bad.data["quality"] == "bad"
    new = clocked(tmp_path / "b")
    new.adopt_state(old)
    (good,) = [e for e in new.map(reading2("temperature", 11.0, 125.0))
               if e.type == "maintenance.SignalQualityChanged.v1"]
    assert good.data == {"quality": "good", "duration_s": 15.0}


def test_a_reload_neither_repeats_nor_skips_a_snapshot(tmp_path):
    """The next boundary carries over: the new mapper does not take the 900 s snapshot again,
    and takes the 1800 s one without a first tick to learn the time."""
    def snapshots(events: list[DomainEvent]) -> list[DomainEvent]:
        return [e for e in events if e.type == "production.Status.v1"]

    old = clocked(tmp_path / "a")
    old.map(reading2("state", "Idle", 850.0))
    old.tick(850.0)
    (first,) = snapshots(old.tick(900.5))
    assert first.time == 900.0
    new = clocked(tmp_path / "b")
    new.adopt_state(old)
    assert snapshots(new.tick(901.0)) == []
    (second,) = snapshots(new.tick(1800.2))
    assert (second.time, second.data) == (1800.0, {"state": "Idle"})


def test_the_id_disambiguator_carries_over(tmp_path):
    """Two transitions at one time, the reload between them: the second still gets n = 1."""
    old = mapper(tmp_path / "a")
    old.map(reading("state", "Idle", 100.0))
    (first,) = old.map(reading("state", "Running", 160.0))
    new = mapper(tmp_path / "b")
    new.adopt_state(old)
    (second,) = new.map(reading("state", "Idle", 160.0))
    fresh = mapper(tmp_path / "c")
    fresh.map(reading("state", "Running", 100.0))
    (unaware,) = fresh.map(reading("state", "Idle", 160.0))
    assert len({first.id, second.id, unaware.id}) == 3


async def test_the_pipeline_ticks_a_periodic_snapshot(tmp_path):
    """A one-second snapshot: the pipeline's tick alone produces it, with a whole-second time."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "m2.yaml").write_text(CLOCKED.format(window_s=60, snapshot_s=1))
    metrics = Metrics()
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), metrics)
    await buffer.open()
    pipeline = Pipeline(Mapper(load_mappings(folder, {"plant_mqtt": "mqtt"}), "gw"), buffer,
                        metrics)
    task = asyncio.create_task(pipeline.run())
    try:
        await pipeline.emit(Delivery([reading2("state", "Running", time.time())]))
        deadline = time.monotonic() + 8
        records = []
        while time.monotonic() < deadline:
            records = [r for r in await buffer.read(0, 50) if r.type == "production.Status.v1"]
            if records:
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buffer.close()
    assert records, "no snapshot within 8 s"
    envelope = decode_envelope(records[0].body)
    assert envelope["data"] == {"state": "Running"}
    assert envelope["time"].endswith(".000000Z")  # a whole-second boundary
