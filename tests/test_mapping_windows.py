"""The clock-driven aggregating triggers of the Mapper: tumbling windows (``kind: window``) and
periodic snapshots (``kind: periodic``): alignment, window edges, late readings, the grace
period, empty windows, missed boundaries, and the worked examples of ``docs/mapping.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.mapping import Mapper, load_mappings
from gateway.mapping.cases import CASE_EPOCH, run_cases
from gateway.model import DomainEvent, Quality, Signal, rfc3339

CONN = "plant_mqtt"
SUBJECT = "acme/p1/ht/oven01"
T0 = CASE_EPOCH
"""2026-01-01T00:00:00Z: a multiple of every period used here."""

SIGNALS = """\
version: 1
asset:
  subject: acme/p1/ht/oven01
  attributes: {line: line1}
signals:
  state:
    connection: plant_mqtt
    mqtt: {topic: o/status, value_path: state}
    type: string
    enum: [Idle, Heating, Soaking, Cooling, Fault]
  temperature:
    connection: plant_mqtt
    mqtt: {topic: o/status, value_path: temperature}
    type: float
  pieces:
    connection: plant_mqtt
    mqtt: {topic: o/status, value_path: pieces}
    type: integer
events:
"""

WINDOW = """\
  stats:
    type: process.TemperatureStatistics.v1
    trigger: {{kind: window, signal: {signal}, every_s: {every}{options}}}
    data:
      window_start: {{trigger: window_start}}
      readings: {{trigger: count}}
      min: {{trigger: min}}
      max: {{trigger: max}}
      mean: {{trigger: mean}}
      first: {{trigger: first}}
      last: {{trigger: last}}
"""

SNAPSHOT = """\
  snapshot:
    type: production.OvenStatus.v1
    trigger: {{kind: periodic, every_s: {every}}}
    data:
      state: {{signal: state}}
      temperature: {{signal: temperature}}
      temperature_quality: {{quality: temperature}}
      line: {{attribute: line}}
"""


def mapper(tmp_path: Path, events: str) -> Mapper:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "oven.yaml").write_text(SIGNALS + events, encoding="utf-8")
    return Mapper(load_mappings(tmp_path, {CONN: "mqtt"}), "edge-01")


def window(
    tmp_path: Path, every: float = 300, options: str = "", signal: str = "temperature"
) -> Mapper:
    return mapper(tmp_path, WINDOW.format(signal=signal, every=every, options=options))


def read(
    m: Mapper,
    signal: str,
    value: Any,
    at: float,
    *,
    received: float | None = None,
    quality: Quality = Quality.GOOD,
) -> list[DomainEvent]:
    """A reading with source time ``T0 + at`` (received at ``T0 + received``, default the
    same)."""
    return m.map(
        Signal(
            CONN,
            f"o/status#{signal}",
            value,
            quality,
            source_time=T0 + at,
            receive_time=T0 + (at if received is None else received),
        )
    )


def tick(m: Mapper, at: float) -> list[DomainEvent]:
    return m.tick(T0 + at)


def summary(event: DomainEvent) -> tuple[float, dict[str, Any]]:
    """(seconds after T0, data) of an event."""
    return event.time - T0, event.data


def stats(start: float, *values: float, first: float | None = None, last: float | None = None
          ) -> dict[str, Any]:
    """The data of a window event over ``values`` (``first``/``last`` by signal time)."""
    if not values:
        return {"window_start": rfc3339(T0 + start), "readings": 0, "min": None, "max": None,
                "mean": None, "first": None, "last": None}
    return {
        "window_start": rfc3339(T0 + start),
        "readings": len(values),
        "min": min(values),
        "max": max(values),
        "mean": sum(values) / len(values),
        "first": values[0] if first is None else first,
        "last": values[-1] if last is None else last,
    }


# --- windows: alignment, edges, closing by a reading ----------------------------------------


def test_the_documented_window_example(tmp_path: Path) -> None:
    """docs/mapping.md, *window*: four readings in [00:00, 00:05), closed by the reading at
    00:05:01; a reading for that window afterwards is late; the next window closes by the
    clock once its end plus grace_s has passed."""
    m = window(tmp_path)
    assert read(m, "temperature", 850.0, 10) == []
    assert read(m, "temperature", 852.0, 100) == []
    assert read(m, "temperature", 848.0, 200) == []
    assert read(m, "temperature", 851.0, 299.5) == []
    (first,) = read(m, "temperature", 853.0, 301)
    assert summary(first) == (300.0, stats(0, 850.0, 852.0, 848.0, 851.0))
    assert first.data["window_start"] == "2026-01-01T00:00:00.000000Z"
    assert first.data["mean"] == 850.25
    assert read(m, "temperature", 849.0, 299) == []
    assert m.window_late == 1
    assert tick(m, 601.9) == []
    (second,) = tick(m, 602)
    assert summary(second) == (600.0, stats(300, 853.0))
    assert tick(m, 700) == []


def test_a_reading_at_the_window_end_belongs_to_the_next_window(tmp_path: Path) -> None:
    """Windows are [start, end): a reading exactly at the start is in, one exactly at the end
    closes the window and opens the next."""
    m = window(tmp_path, every=60)
    assert read(m, "temperature", 1.0, 0) == []
    assert read(m, "temperature", 2.0, 59.999) == []
    (closed,) = read(m, "temperature", 3.0, 60)
    assert summary(closed) == (60.0, stats(0, 1.0, 2.0))
    (following,) = read(m, "temperature", 4.0, 120)
    assert summary(following) == (120.0, stats(60, 3.0))


def test_windows_are_aligned_to_multiples_of_every_s_in_unix_time(tmp_path: Path) -> None:
    """The first reading at 00:01:37 opens [00:00, 00:05), not a window starting at 00:01:37."""
    m = window(tmp_path)
    read(m, "temperature", 5.0, 97)
    (event,) = read(m, "temperature", 6.0, 300)
    assert event.data["window_start"] == rfc3339(T0)
    assert event.time == T0 + 300


def test_first_and_last_follow_signal_time_not_arrival_order(tmp_path: Path) -> None:
    """Readings of one window arriving out of order: first is the earliest by signal time,
    last the latest; an integer signal keeps integer min and max, the mean is a float."""
    m = window(tmp_path, every=60, signal="pieces")
    read(m, "pieces", 5, 30)
    read(m, "pieces", 7, 10)  # earlier, arrives later: still in the open window
    read(m, "pieces", 4, 50)
    read(m, "pieces", 6, 40)
    (event,) = read(m, "pieces", 1, 61)
    assert event.data == stats(0, 5, 7, 4, 6, first=7, last=4)
    assert isinstance(event.data["min"], int) and isinstance(event.data["max"], int)
    assert event.data["mean"] == 5.5


def test_a_gap_without_readings_emits_only_the_windows_that_had_readings(tmp_path: Path) -> None:
    """emit_empty: false (default): the reading at 1000 closes [0, 300) and opens [900, 1200);
    the empty windows in between say nothing."""
    m = window(tmp_path)
    read(m, "temperature", 1.0, 10)
    events = read(m, "temperature", 2.0, 1000)
    assert [summary(e) for e in events] == [(300.0, stats(0, 1.0))]
    (later,) = read(m, "temperature", 3.0, 1200)
    assert summary(later) == (1200.0, stats(900, 2.0))


def test_emit_empty_reports_every_window_from_the_first_reading_on(tmp_path: Path) -> None:
    """emit_empty: true: the gap's windows come as count 0 with null aggregates, in order, and
    the clock closes empty windows too."""
    m = window(tmp_path, options=", emit_empty: true")
    read(m, "temperature", 1.0, 10)
    events = read(m, "temperature", 2.0, 1000)
    assert [summary(e) for e in events] == [
        (300.0, stats(0, 1.0)),
        (600.0, stats(300)),
        (900.0, stats(600)),
    ]
    (closed,) = tick(m, 1202)
    assert summary(closed) == (1200.0, stats(900, 2.0))
    (empty,) = tick(m, 1502)
    assert summary(empty) == (1500.0, stats(1200))


def test_a_huge_gap_emits_at_most_1000_empty_windows(tmp_path: Path) -> None:
    """A device clock jumping ahead by 5000 one-second windows: the latest 1000 empty windows
    are emitted, the others counted as skipped."""
    m = window(tmp_path, every=1, options=", emit_empty: true")
    read(m, "temperature", 1.0, 0.5)
    events = read(m, "temperature", 2.0, 5000.5)
    assert len(events) == 1001
    assert summary(events[0]) == (1.0, stats(0, 1.0))
    assert summary(events[1]) == (4001.0, stats(4000))
    assert summary(events[-1]) == (5000.0, stats(4999))
    assert m.windows_skipped == 3999


# --- windows: late readings and the grace period ---------------------------------------------


def test_a_reading_for_a_closed_window_is_late_and_dropped(tmp_path: Path) -> None:
    """After [0, 60) closed, a reading at 59 changes nothing and is counted, per event."""
    m = window(tmp_path, every=60)
    read(m, "temperature", 1.0, 30)
    read(m, "temperature", 2.0, 70)
    assert read(m, "temperature", 100.0, 59) == []
    assert read(m, "temperature", 100.0, 10) == []
    (event,) = read(m, "temperature", 3.0, 120)
    assert event.data == stats(60, 2.0)
    assert m.window_late == 2
    assert m.window_late_by_event == {(SUBJECT, "stats"): 2}


def test_readings_of_a_window_before_the_open_one_are_late(tmp_path: Path) -> None:
    """One window is open at a time: the first reading at 130 opens [120, 180); a reading at
    100 arriving afterwards belongs to a window that can no longer be reported."""
    m = window(tmp_path, every=60)
    read(m, "temperature", 1.0, 130)
    assert read(m, "temperature", 2.0, 100) == []
    assert m.window_late == 1


def test_the_clock_closes_a_window_after_its_grace_period(tmp_path: Path) -> None:
    """No reading after the end: the tick closes the window once end + grace_s has passed,
    not before; a reading for it after that is late."""
    m = window(tmp_path, every=60, options=", grace_s: 5")
    read(m, "temperature", 1.0, 50)
    assert tick(m, 60) == []
    assert tick(m, 64.9) == []
    (event,) = tick(m, 65)
    assert summary(event) == (60.0, stats(0, 1.0))
    assert read(m, "temperature", 3.0, 59.5, received=66) == []
    assert m.window_late == 1


def test_a_delayed_reading_within_the_grace_counts_and_delays_the_close(tmp_path: Path) -> None:
    """A reading for the open window that arrives late (59 s, received at 63.5 s) is counted;
    it shows the stream 4.5 s behind the gateway, so the window closes when the stream's time
    (59 + time since 63.5) passes 60 + grace_s, at 69.5 s: a backlog delivered after a
    reconnect is not cut off by the gateway's clock."""
    m = window(tmp_path, every=60, options=", grace_s: 5")
    read(m, "temperature", 1.0, 50)
    assert read(m, "temperature", 2.0, 59, received=63.5) == []
    assert tick(m, 65) == []
    assert tick(m, 69.4) == []
    (event,) = tick(m, 69.5)
    assert summary(event) == (60.0, stats(0, 1.0, 2.0))
    assert m.window_late == 0


def test_the_grace_period_follows_the_stream_not_the_device_clock(tmp_path: Path) -> None:
    """A device clock an hour behind: the tick estimates the stream's time from the latest
    reading, so the window is neither closed at once nor held for an hour; its event has the
    device's time."""
    m = window(tmp_path, every=60)
    behind = 3600.0
    read(m, "temperature", 1.0, 50 - behind, received=50)
    assert tick(m, 55) == []
    assert tick(m, 61.9) == []
    (event,) = tick(m, 62)
    assert event.time == T0 - behind + 60
    assert event.data["readings"] == 1


def test_bad_readings_neither_count_nor_close_a_window(tmp_path: Path) -> None:
    """A bad reading (or a value that does not convert) after the end is no evidence of the
    stream's progress: the window waits for a good reading or the clock."""
    m = window(tmp_path, every=60)
    read(m, "temperature", 1.0, 10)
    assert read(m, "temperature", 99.0, 20, quality=Quality.BAD) == []
    assert read(m, "temperature", "n/a", 61) == []
    (event,) = read(m, "temperature", 2.0, 62)
    assert event.data == stats(0, 1.0)


def test_a_window_closed_by_the_clock_does_not_close_again(tmp_path: Path) -> None:
    """emit_empty: false: after the clock closed [0, 60), no window is open until a reading;
    repeated ticks emit nothing."""
    m = window(tmp_path, every=60)
    read(m, "temperature", 1.0, 10)
    assert len(tick(m, 62)) == 1
    assert tick(m, 63) == tick(m, 200) == []
    assert read(m, "temperature", 2.0, 130) == []  # opens [120, 180)
    (event,) = tick(m, 182)
    assert summary(event) == (180.0, stats(120, 2.0))


# --- periodic snapshots ----------------------------------------------------------------------


def snapshots(tmp_path: Path, every: float = 900) -> Mapper:
    return mapper(tmp_path, SNAPSHOT.format(every=every))


def test_a_snapshot_at_each_boundary_with_the_latest_values(tmp_path: Path) -> None:
    """The first tick only learns the time; each boundary passed then gives one snapshot with
    the boundary as its time and the values the gateway has then."""
    m = snapshots(tmp_path)
    assert tick(m, 432) == []  # 00:07:12: the first snapshot is due at 00:15
    read(m, "state", "Heating", 440)
    read(m, "temperature", 845.5, 441)
    assert tick(m, 899.9) == []
    (first,) = tick(m, 900.4)
    assert summary(first) == (
        900.0,
        {"state": "Heating", "temperature": 845.5, "temperature_quality": "good", "line": "line1"},
    )
    assert first.source == "/gateways/edge-01/connections/plant_mqtt"
    assert tick(m, 901.4) == []
    read(m, "state", "Soaking", 1000)
    (second,) = tick(m, 1800)
    assert summary(second)[0] == 1800.0 and second.data["state"] == "Soaking"
    assert m.snapshots_skipped == 0


def test_missed_boundaries_give_one_snapshot_for_the_latest_and_are_counted(
    tmp_path: Path,
) -> None:
    """docs/mapping.md, *periodic*: suspended from 10:29:58 to 11:01:03, the gateway takes one
    snapshot, for 11:00, and counts 10:30 and 10:45 as skipped."""
    m = snapshots(tmp_path)
    ten = 10 * 3600
    assert tick(m, ten + 7 * 60 + 12) == []
    read(m, "state", "Heating", ten + 8 * 60)
    (quarter,) = tick(m, ten + 15 * 60 + 0.4)
    assert quarter.time == T0 + ten + 15 * 60
    assert tick(m, ten + 29 * 60 + 58) == []
    (late,) = tick(m, ten + 3600 + 63)
    assert late.time == T0 + ten + 3600
    assert m.snapshots_skipped == 2
    assert m.snapshots_skipped_by_event == {(SUBJECT, "snapshot"): 2}


def test_no_snapshot_while_no_signal_the_data_reads_has_a_value(tmp_path: Path) -> None:
    """A bad reading gives no value; the first good one of any read signal enables the
    snapshots, the other fields are then null."""
    m = snapshots(tmp_path, every=60)
    tick(m, 0)
    read(m, "temperature", 800.0, 10, quality=Quality.BAD)
    read(m, "pieces", 3, 11)  # not read by the snapshot
    assert tick(m, 60) == []
    read(m, "state", "Idle", 70)
    (event,) = tick(m, 120)
    assert event.data == {
        "state": "Idle",
        "temperature": None,
        "temperature_quality": "bad",
        "line": "line1",
    }


def test_a_clock_jumping_back_restarts_the_schedule(tmp_path: Path) -> None:
    """After the clock went back more than a period, the next snapshot is at the first
    boundary after the new time, not at the old one's."""
    m = snapshots(tmp_path)
    read(m, "state", "Idle", 0)
    tick(m, 1000)  # next due 1800
    assert tick(m, 100) == []  # clock went back: next due 900
    (event,) = tick(m, 905)
    assert event.time == T0 + 900
    assert m.snapshots_skipped == 0


def test_a_periodic_snapshot_names_the_connection_of_the_first_signal_it_reads(
    tmp_path: Path,
) -> None:
    """The event's source is the connection of the first signal its data reads."""
    text = SIGNALS.replace(
        "  pieces:\n    connection: plant_mqtt\n", "  pieces:\n    connection: line_mqtt\n"
    ) + (
        "  snapshot:\n    type: production.Counts.v1\n"
        "    trigger: {kind: periodic, every_s: 60}\n"
        "    data: {line: {attribute: line}, pieces: {signal: pieces}, state: {signal: state}}\n"
    )
    (tmp_path / "oven.yaml").write_text(text, encoding="utf-8")
    m = Mapper(load_mappings(tmp_path, {CONN: "mqtt", "line_mqtt": "mqtt"}), "edge-01")
    tick(m, 0)
    m.map(Signal("line_mqtt", "o/status#pieces", 4, source_time=T0 + 1, receive_time=T0 + 1))
    (event,) = tick(m, 60)
    assert event.source == "/gateways/edge-01/connections/line_mqtt"
    assert event.data == {"line": "line1", "pieces": 4, "state": None}


def test_the_documented_snapshot_test_case_passes(tmp_path: Path) -> None:
    """docs/mapping.md, *Test cases*: a case moves time with a later reading, and the
    snapshot comes with the boundary as its at_s."""
    text = SIGNALS + SNAPSHOT.format(every=900).replace(
        "      temperature: {signal: temperature}\n",
        "      zone1_temperature_c: {signal: temperature}\n",
    ).replace(
        "      temperature_quality: {quality: temperature}\n      line: {attribute: line}\n",
        "      zone1_quality: {quality: temperature}\n",
    ) + """\
tests:
  - name: a status snapshot on the quarter hour
    given:
      - {signal: state, value: Heating, at_s: 0}
      - {signal: state, value: Heating, at_s: 901}   # moves time past the 900 s boundary
    expect:
      - type: production.OvenStatus.v1
        data: {state: Heating, zone1_temperature_c: null, zone1_quality: null}
        at_s: 900
  - name: without the later reading there is no snapshot
    given:
      - {signal: state, value: Heating, at_s: 0}
      - {signal: state, value: Heating, at_s: 899}
    expect: []
"""
    (tmp_path / "oven.yaml").write_text(text, encoding="utf-8")
    results = run_cases(load_mappings(tmp_path, {CONN: "mqtt"}))
    assert [(r.name, r.problems) for r in results] == [
        ("a status snapshot on the quarter hour", []),
        ("without the later reading there is no snapshot", []),
    ]


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ("", False),
        (SNAPSHOT.format(every=60), True),
        (WINDOW.format(signal="temperature", every=60, options=""), True),
        (
            "  c:\n    type: a.C.v1\n    trigger: {kind: on_change, signal: state}\n"
            "    data: {s: {signal: state}}\n",
            False,
        ),
    ],
)
def test_periodic_and_window_triggers_need_the_tick(
    tmp_path: Path, events: str, expected: bool
) -> None:
    """The pipeline ticks the mapper only when some trigger depends on the clock."""
    base = (
        "  c0:\n    type: a.C.v1\n    trigger: {kind: transition, signal: state}\n"
        "    data: {s: {signal: state}}\n"
    )
    assert mapper(tmp_path, base + events).needs_tick is expected


# --- windows: values and times beyond the ordinary ---------------------------------------------


def test_extreme_values_and_times_never_make_a_window_raise(tmp_path: Path) -> None:
    """The Mapper never raises on a reading: an integer beyond 64 bits is a bad reading (not
    aggregated), a window start beyond the calendar's range is null, a non-finite time is
    ignored; the clock check keeps working for the other windows."""
    huge = window(tmp_path / "a", every=1, signal="pieces")
    read(huge, "pieces", 10**400, 0)
    read(huge, "pieces", 2**63, 0.5)
    (event,) = read(huge, "pieces", 1, 1)
    assert (event.data["readings"], event.data["max"]) == (1, 2**63)
    assert huge.conversion_errors == 1
    far = window(tmp_path / "b", every=1)
    far.map(Signal(CONN, "o/status#temperature", 1.0, source_time=1e17, receive_time=T0))
    (late,) = far.tick(T0 + 10)
    assert (late.time, late.data["window_start"], late.data["readings"]) == (1e17 + 1, None, 1)
    odd = window(tmp_path / "c", every=1)
    for t in (float("nan"), float("inf")):
        assert odd.map(Signal(CONN, "o/status#temperature", 1.0, source_time=t,
                              receive_time=T0)) == []
    assert odd.tick(T0 + 100) == []
    edge = window(tmp_path / "d", every=1, options=", emit_empty: true")
    edge.map(Signal(CONN, "o/status#temperature", 1.0, source_time=1.7e308, receive_time=0.0))
    assert edge.tick(1e308) == []  # the stream's time overflows: no window can be named
    assert read(odd, "temperature", 2.0, 5) == []
    assert [e.data["readings"] for e in read(odd, "temperature", 3.0, 6)] == [1]
