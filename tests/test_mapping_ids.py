"""Deterministic event ids: the same readings give the same ids (a replay, a redelivery to a
restarted gateway), different inputs give different ids, and the rule is the documented one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gateway.mapping import Mapper, load_mappings
from gateway.model import Quality, Signal, event_id

CONN = "plant_mqtt"
SUBJECT = "acme/p1/l3/cell01"

FILE = """\
version: 1
asset:
  subject: acme/p1/l3/cell01
signals:
  state:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: state}
    type: string
    enum: [Idle, Running, Fault]
  door:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: door}
    type: boolean
  temperature:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: temperature}
    type: float
events:
  changed:
    type: production.MachineStateChanged.v1
    trigger: {kind: transition, signal: state}
    data: {state: {signal: state}}
  door_opened:
    type: safety.GuardDoorOpened.v1
    trigger: {kind: edge, signal: door, edge: rising, min_duration_ms: 500}
    data: {closed_for_s: {trigger: state_duration_s}}
  health:
    type: maintenance.SignalQualityChanged.v1
    trigger: {kind: quality, signal: temperature, stale_after_s: 10}
    data: {quality: {trigger: quality}}
  stats:
    type: process.TemperatureStatistics.v1
    trigger: {kind: window, signal: temperature, every_s: 60}
    data: {mean: {trigger: mean}}
  snapshot:
    type: production.CellStatus.v1
    trigger: {kind: periodic, every_s: 30}
    data: {state: {signal: state}}
"""


def files(tmp_path: Path) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cell.yaml").write_text(FILE, encoding="utf-8")
    return load_mappings(tmp_path, {CONN: "mqtt"})


def reading(tag: str, value: Any, t: float, quality: Quality = Quality.GOOD) -> Signal:
    return Signal(CONN, f"c/status#{tag}", value, quality, source_time=t, receive_time=t)


READINGS = [
    reading("state", "Idle", 0.0),
    reading("door", False, 0.0),
    reading("temperature", 20.0, 1.0),
    reading("state", "Running", 5.0),
    reading("door", True, 6.0),  # confirmed by the tick at 7
    reading("temperature", "n/a", 8.0),  # bad
    reading("temperature", 21.0, 9.0),  # good again
    reading("state", "Idle", 9.0),
    reading("state", "Running", 9.0),  # two transitions with one timestamp
    reading("state", "Idle", 9.0),
    reading("state", "Running", 40.0),  # after the stale time 19 and the snapshot at 30
    reading("temperature", 22.0, 61.0),  # closes the window [0, 60)
]


def run(mapper: Mapper) -> list[tuple[str, str, float]]:
    """Replay READINGS as the replay command does (tick at each reading's time, then map)."""
    out = []
    for signal in READINGS:
        for event in (*mapper.tick(signal.receive_time), *mapper.map(signal)):
            out.append((event.id, event.type, event.time))
    return out


def test_two_mappers_fed_the_same_readings_give_the_same_ids(tmp_path: Path) -> None:
    """Every kind of event (fired by a reading or by the clock) gets the same id in a second
    run; none repeats within a run."""
    first = run(Mapper(files(tmp_path), "edge-01"))
    second = run(Mapper(files(tmp_path), "edge-01"))
    assert first == second
    changed, door = "production.MachineStateChanged.v1", "safety.GuardDoorOpened.v1"
    health, stats = "maintenance.SignalQualityChanged.v1", "process.TemperatureStatistics.v1"
    assert [(kind, t) for _, kind, t in first] == [
        (changed, 5.0),
        (door, 6.5),  # confirmed by the tick at 8
        (health, 8.0),  # bad
        (health, 9.0),  # good
        (changed, 9.0),
        (changed, 9.0),
        (changed, 9.0),
        (health, 19.0),  # stale, found by the tick at 40
        ("production.CellStatus.v1", 30.0),
        (changed, 40.0),
        ("production.CellStatus.v1", 60.0),  # the tick at 61, before the reading
        (health, 61.0),  # good again (declared before the window)
        (stats, 60.0),  # closed by the reading at 61
    ]
    ids = [i for i, _, _ in first]
    assert len(set(ids)) == len(ids)


def test_another_gateway_id_gives_other_ids(tmp_path: Path) -> None:
    ours = [i for i, _, _ in run(Mapper(files(tmp_path), "edge-01"))]
    theirs = [i for i, _, _ in run(Mapper(files(tmp_path), "edge-02"))]
    assert not set(ours) & set(theirs)


def test_firings_of_one_trigger_at_one_time_are_told_apart(tmp_path: Path) -> None:
    """Idle -> Running -> Idle -> Running with one timestamp: the first and the third
    transition come from equal readings; the per-time counter separates their ids."""
    m = Mapper(files(tmp_path), "edge-01")
    m.map(reading("state", "Idle", 0.0))
    fired = [m.map(reading("state", s, 9.0))[0] for s in ("Running", "Idle", "Running")]
    ids = [e.id for e in fired]
    assert len(set(ids)) == 3
    tag = "c/status#state"
    assert ids == [
        event_id("edge-01", SUBJECT, "changed", 9.0, tag, "Running", 0),
        event_id("edge-01", SUBJECT, "changed", 9.0, tag, "Idle", 1),
        event_id("edge-01", SUBJECT, "changed", 9.0, tag, "Running", 2),
    ]
    (later,) = m.map(reading("state", "Idle", 10.0))
    assert later.id == event_id("edge-01", SUBJECT, "changed", 10.0, tag, "Idle", 0)


def test_each_input_of_the_rule_changes_the_id() -> None:
    base = ("gw", "a/b", "ev", 100.0, "t#v", "Running", 0)
    variants = [
        ("gw2", "a/b", "ev", 100.0, "t#v", "Running", 0),
        ("gw", "a/c", "ev", 100.0, "t#v", "Running", 0),
        ("gw", "a/b", "ev2", 100.0, "t#v", "Running", 0),
        ("gw", "a/b", "ev", 100.5, "t#v", "Running", 0),
        ("gw", "a/b", "ev", 100.0, "t#w", "Running", 0),
        ("gw", "a/b", "ev", 100.0, "t#v", "Idle", 0),
        ("gw", "a/b", "ev", 100.0, "t#v", "Running", 1),
        ("gw", "a/b", "ev", 100.0, "t#v", 1, 0),
        ("gw", "a/b", "ev", 100.0, "t#v", "1", 0),
    ]
    ids = {event_id(*v) for v in [base, *variants]}
    assert len(ids) == len(variants) + 1


def test_the_id_is_the_documented_hash() -> None:
    """BLAKE2b-128 of the JSON [time, tag, value, n], personalised with the BLAKE2b-128 digest
    of the JSON [gateway id, subject, event id]; an integer time counts as the float."""
    def compact(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    person = hashlib.blake2b(compact(["edge-01", "acme/p1/m1", "changed"]), digest_size=16)
    expected = hashlib.blake2b(
        compact([1795903771.25, "m1/state#state", "Läuft", 0]),
        digest_size=16,
        person=person.digest(),
    ).hexdigest()
    got = event_id("edge-01", "acme/p1/m1", "changed", 1795903771.25, "m1/state#state", "Läuft")
    assert got == expected
    assert len(got) == 32
    assert event_id("g", "s", "e", 5, "t", None) == event_id("g", "s", "e", 5.0, "t", None)


def test_a_value_json_cannot_encode_still_gets_a_stable_id() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "Odd()"

    first = event_id("g", "s", "e", 1.0, "t", Odd())
    assert first == event_id("g", "s", "e", 1.0, "t", Odd())
    assert first == event_id("g", "s", "e", 1.0, "t", "Odd()")
    unprintable = {(1, 2): 10**5000}  # no JSON (a tuple key), and no repr (too many digits)
    assert event_id("g", "s", "e", 1.0, "t", unprintable) == event_id(
        "g", "s", "e", 1.0, "t", "<dict>"
    )


def test_a_window_has_one_id_whether_a_reading_or_the_clock_closed_it(tmp_path: Path) -> None:
    """A window event names no reading: closed by the reading at 61 s or by the tick at 62 s,
    its id is the same (a replay that ticks differently still deduplicates)."""
    by_reading = Mapper(files(tmp_path), "edge-01")
    by_reading.map(reading("temperature", 20.0, 1.0))
    (closed,) = [e for e in by_reading.map(reading("temperature", 22.0, 61.0))
                 if e.type == "process.TemperatureStatistics.v1"]
    by_clock = Mapper(files(tmp_path), "edge-01")
    by_clock.map(reading("temperature", 20.0, 1.0))
    (ticked,) = [e for e in by_clock.tick(62.0) if e.type == "process.TemperatureStatistics.v1"]
    assert closed.id == ticked.id == event_id("edge-01", SUBJECT, "stats", 60.0, "", None)


def test_a_redelivered_reading_after_a_restart_gets_the_id_it_had(tmp_path: Path) -> None:
    """A gateway that restarts (fresh state) and receives the last two readings again emits
    the transition they fire with the id the first run gave it."""
    first = Mapper(files(tmp_path), "edge-01")
    first.map(reading("state", "Idle", 100.0))
    (before,) = first.map(reading("state", "Fault", 130.0))
    restarted = Mapper(files(tmp_path), "edge-01")
    restarted.map(reading("state", "Idle", 100.0))
    (again,) = restarted.map(reading("state", "Fault", 130.0))
    assert again.id == before.id
