"""The mapping engine's state saved with the buffer: a restart continues where it stopped.

A counter at 10,000 after a restart is not 10,000 new parts, nor are the parts counted while
the gateway was down lost; a transition reported after a restart knows the state before it and
how long it lasted; an open window keeps its readings.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gateway.app.pipeline import Pipeline
from gateway.buffer.disk import BufferConfig, DiskBuffer
from gateway.mapping import Mapper, load_mappings
from gateway.metrics import Metrics
from gateway.model import DomainEvent, Signal, decode_envelope
from gateway.sources.base import Delivery
from tests.support import GatewayProcess, consume, publisher, write_config

MAPPING = """\
version: 1
asset: {{subject: acme/p1/l1/{machine}}}
signals:
  state:
    connection: plant_mqtt
    mqtt: {{topic: "{prefix}/{machine}/status", value_path: state, timestamp_path: ts}}
    type: string
    enum: [Idle, Running, Fault]
  parts:
    connection: plant_mqtt
    mqtt: {{topic: "{prefix}/{machine}/status", value_path: parts, timestamp_path: ts}}
    type: integer
  temperature:
    connection: plant_mqtt
    mqtt: {{topic: "{prefix}/{machine}/status", value_path: temperature, timestamp_path: ts}}
    type: float
events:
  state_changed:
    type: production.MachineStateChanged.v1
    trigger: {{kind: transition, signal: state}}
    data:
      state: {{signal: state}}
      previous_state: {{previous: state}}
      previous_state_duration_s: {{trigger: state_duration_s}}
  parts_produced:
    type: production.PartsProduced.v1
    trigger: {{kind: counter, signal: parts{counter_options}}}
    data: {{count: {{trigger: delta}}, total: {{signal: parts}}}}
  temperature_stats:
    type: process.TemperatureStatistics.v1
    trigger: {{kind: window, signal: temperature, every_s: 60}}
    data: {{readings: {{trigger: count}}, mean: {{trigger: mean}}}}
"""


def write_mapping(folder: Path, *, machine: str = "m1", prefix: str = "p",
                  counter_options: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{machine}.yaml").write_text(
        MAPPING.format(machine=machine, prefix=prefix, counter_options=counter_options))
    return folder


def mapper_of(folder: Path) -> Mapper:
    return Mapper(load_mappings(folder, {"plant_mqtt": "mqtt"}), "gw")


def reading(tag: str, value: object, t: float, prefix: str = "p") -> Signal:
    return Signal("plant_mqtt", f"{prefix}/m1/status#{tag}", value, source_time=t, receive_time=t)


def of_type(events: list[DomainEvent], name: str) -> list[DomainEvent]:
    return [e for e in events if e.type == name]


# -- the engine: take_dirty_state / restore_state -------------------------------------------------


def test_restored_state_continues_counters_transitions_and_windows(tmp_path):
    folder = write_mapping(tmp_path / "mappings")
    before = mapper_of(folder)
    before.map(reading("parts", 10_000, 100.0))
    before.map(reading("parts", 10_003, 110.0))
    before.map(reading("state", "Idle", 100.0))
    before.map(reading("state", "Running", 130.0))
    before.map(reading("temperature", 20.0, 125.0))
    before.map(reading("temperature", 40.0, 126.0))
    saved = before.take_dirty_state()

    after = mapper_of(folder)
    assert after.restore_state(saved) == (len(saved), 0)
    parts = of_type(after.map(reading("parts", 10_005, 200.0)), "production.PartsProduced.v1")
    assert [e.data for e in parts] == [{"count": 2, "total": 10_005}]  # not 10,005 new parts
    (state,) = after.map(reading("state", "Fault", 250.0))
    assert state.data == {"state": "Fault", "previous_state": "Running",
                          "previous_state_duration_s": 120.0}
    (window,) = after.map(reading("temperature", 30.0, 180.0))
    assert (window.time, window.data) == (180.0, {"readings": 2, "mean": 30.0})


def test_without_saved_state_a_counter_rebaselines_and_invents_nothing(tmp_path):
    """The contrast: a fresh mapper takes the first reading as its baseline."""
    fresh = mapper_of(write_mapping(tmp_path / "mappings"))
    assert of_type(fresh.map(reading("parts", 10_005, 200.0)), "production.PartsProduced.v1") == []


def test_only_changed_states_are_taken_again(tmp_path):
    m = mapper_of(write_mapping(tmp_path / "mappings"))
    m.map(reading("parts", 5, 100.0))
    first = {key for key, _, _ in m.take_dirty_state()}
    assert first == {"signal\tacme/p1/l1/m1\tparts", "event\tacme/p1/l1/m1\tparts_produced"}
    assert m.take_dirty_state() == []  # nothing read since
    m.map(reading("parts", 5, 101.0))  # same value: the counter's baseline did not move
    assert m.take_dirty_state() == []
    m.map(reading("parts", 6, 102.0))
    assert {key for key, _, _ in m.take_dirty_state()} == first


def test_a_state_of_an_edited_definition_is_discarded(tmp_path):
    """A counter that now rolls over elsewhere cannot continue the old baseline safely."""
    old = mapper_of(write_mapping(tmp_path / "a"))
    old.map(reading("parts", 100, 1.0))
    old.map(reading("state", "Idle", 1.0))
    saved = old.take_dirty_state()
    edited = mapper_of(write_mapping(tmp_path / "b", counter_options=", rollover_at: 9999, max_delta: 100"))
    restored, discarded = edited.restore_state(saved)
    assert discarded == 1 and restored == len(saved) - 1  # the counter trigger only
    assert edited.signal_states[("acme/p1/l1/m1", "parts")].value == 100  # the signal is unchanged
    assert of_type(edited.map(reading("parts", 150, 2.0)), "production.PartsProduced.v1") == []


def test_an_undecodable_or_unknown_state_is_discarded(tmp_path):
    m = mapper_of(write_mapping(tmp_path / "mappings"))
    fps = m.state_fingerprints()
    key = "event\tacme/p1/l1/m1\tparts_produced"
    records = [(key, fps[key], b'{"last": "not a number'),
               ("event\tacme/p1/l1/gone\tparts_produced", fps[key], b"{}")]
    assert m.restore_state(records) == (0, 2)


# -- the buffer: same transaction, survives reopen, pruned ----------------------------------------


def feed(*signals: Signal) -> Delivery:
    return Delivery(list(signals))


async def run_pipeline(buffer: DiskBuffer, mapper: Mapper, deliveries: list[Delivery]) -> None:
    pipeline = Pipeline(mapper, buffer, Metrics())
    for d in deliveries:
        await pipeline.emit(d)
    await pipeline.drain()


async def test_state_is_saved_with_the_events_and_survives_a_reopen(tmp_path):
    folder = write_mapping(tmp_path / "mappings")
    config = BufferConfig(directory=tmp_path / "state")
    buffer = DiskBuffer(config, Metrics())
    await buffer.open()
    first = mapper_of(folder)
    await run_pipeline(buffer, first, [feed(reading("parts", 40, 10.0)),
                                       feed(reading("parts", 42, 11.0)),
                                       feed(reading("state", "Running", 11.0))])
    assert buffer.pending_events == 1  # one PartsProduced; the first reading is the baseline
    await buffer.close()

    buffer = DiskBuffer(config, Metrics())
    await buffer.open()
    try:
        second = mapper_of(folder)
        restored, discarded = second.restore_state(await buffer.load_state())
        assert (restored, discarded) == (4, 0)  # parts and state: signal and trigger each
        await run_pipeline(buffer, second, [feed(reading("parts", 45, 20.0))])
        records = await buffer.read(0, 10)
    finally:
        await buffer.close()
    assert [decode_envelope(r.body)["data"] for r in records] == [
        {"count": 2, "total": 42}, {"count": 3, "total": 45}]


async def test_a_batch_without_events_still_saves_the_state(tmp_path):
    """A reading that fires nothing (a window filling) was acknowledged upstream: its effect
    on the state must be saved, or a restart would forget it."""
    folder = write_mapping(tmp_path / "mappings")
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), Metrics())
    await buffer.open()
    try:
        await run_pipeline(buffer, mapper_of(folder), [feed(reading("temperature", 21.5, 10.0))])
        saved = dict((k, json.loads(v)) for k, _, v in await buffer.load_state())
    finally:
        await buffer.close()
    assert buffer.pending_events == 0
    window = saved["event\tacme/p1/l1/m1\ttemperature_stats"]
    assert (window["count"], window["total"]) == (1, 21.5)


async def test_prune_forgets_states_of_removed_or_edited_definitions(tmp_path):
    buffer = DiskBuffer(BufferConfig(directory=tmp_path / "state"), Metrics())
    await buffer.open()
    try:
        old = mapper_of(write_mapping(tmp_path / "a"))
        await run_pipeline(buffer, old, [feed(reading("parts", 1, 1.0), reading("state", "Idle", 1.0))])
        assert len(await buffer.load_state()) == 4
        edited = mapper_of(write_mapping(tmp_path / "b", counter_options=", rollover_at: 9999, max_delta: 100"))
        assert await buffer.prune_state(edited.state_fingerprints()) == 1
        assert {k for k, _, _ in await buffer.load_state()} == {
            "signal\tacme/p1/l1/m1\tparts", "signal\tacme/p1/l1/m1\tstate",
            "event\tacme/p1/l1/m1\tstate_changed"}
    finally:
        await buffer.close()


async def test_a_buffer_file_from_before_the_state_table_gains_it(tmp_path):
    """Format-1 files written before state persistence open and keep their events."""
    state = tmp_path / "state"
    buffer = DiskBuffer(BufferConfig(directory=state), Metrics())
    await buffer.open()
    await run_pipeline(buffer, mapper_of(write_mapping(tmp_path / "mappings")),
                       [feed(reading("parts", 1, 1.0)), feed(reading("parts", 3, 2.0))])
    await buffer.close()
    with sqlite3.connect(state / "buffer.sqlite3") as conn:
        conn.execute("DROP TABLE mapper_state")
    buffer = DiskBuffer(BufferConfig(directory=state), Metrics())
    await buffer.open()
    try:
        assert buffer.pending_events == 1
        assert await buffer.load_state() == []
    finally:
        await buffer.close()


# -- the daemon: kill -9 and restart --------------------------------------------------------------


@pytest.mark.integration
async def test_after_kill_9_the_daemon_continues_counters_and_transitions(
        tmp_path, mqtt_port, kafka_bootstrap, topic_prefix):
    """The restarted daemon neither re-counts the counter nor forgets the machine's state."""
    mappings = write_mapping(tmp_path / "mappings", prefix=topic_prefix)
    config = write_config(tmp_path / "gw.yaml", mqtt_port=mqtt_port, bootstrap=kafka_bootstrap,
                          topic_template=f"{topic_prefix}.{{type}}", mappings=mappings,
                          state=tmp_path / "state")
    topic = f"{topic_prefix}/m1/status"

    def send(client, **fields) -> None:
        client.publish(topic, json.dumps(fields), qos=1).wait_for_publish(timeout=10)

    client = publisher(mqtt_port)
    # buffer_appended_total below counts mapped events only: no status or catalog events
    quiet = {"DIGISPINE_HEALTH__HEARTBEAT_INTERVAL_S": "0",
             "DIGISPINE_HEALTH__CONNECTION_EVENTS": "false",
             "DIGISPINE_KAFKA__CATALOG_PUBLISH": "false"}
    gw = GatewayProcess(config, tmp_path / "gw1.log", env=quiet)
    gw.wait_sources_running()
    send(client, parts=10_000, state="Idle", ts=1_700_000_000)
    send(client, parts=10_004, state="Running", ts=1_700_000_060)
    gw.wait_for(lambda h: h["counters"].get("buffer_appended_total", 0) >= 2, 15, "2 events")
    gw.kill()

    send(client, parts=10_007, state="Fault", ts=1_700_000_300)  # while the gateway is down
    gw2 = GatewayProcess(config, tmp_path / "gw2.log", env=quiet)
    try:
        gw2.wait_sources_running()
        send(client, parts=10_008, state="Fault", ts=1_700_000_310)
        records = await consume(kafka_bootstrap, [
            f"{topic_prefix}.production.PartsProduced.v1",
            f"{topic_prefix}.production.MachineStateChanged.v1"], expect=5, quiet_s=2)
    finally:
        client.loop_stop()
        assert gw2.terminate() == 0, gw2.tail()
    restored = [json.loads(line) for line in gw2.tail(1_000_000).splitlines()
                if '"mapping.state_restored"' in line]
    assert restored and restored[0]["restored"] >= 4, gw2.tail()
    parts = [json.loads(r.value) for r in records if r.topic.endswith("PartsProduced.v1")]
    states = [json.loads(r.value) for r in records if r.topic.endswith("MachineStateChanged.v1")]
    assert [p["count"] for p in parts] == [4, 3, 1]
    assert [(s["previous_state"], s["state"], s["previous_state_duration_s"]) for s in states] == [
        ("Idle", "Running", None), ("Running", "Fault", 240.0)]

