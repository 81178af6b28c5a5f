"""The quality trigger of the Mapper (``kind: quality``): bad readings, conversion failures,
staleness checked by the tick, recovery, the ``on`` filter and its trigger attributes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.mapping import Mapper, load_mappings
from gateway.mapping.engine import QualityState
from gateway.model import DomainEvent, Quality, Signal

CONN = "plant_mqtt"
SUBJECT = "acme/p1/l2/press08"

SIGNALS = """\
version: 1
asset:
  subject: acme/p1/l2/press08
signals:
  state:
    connection: plant_mqtt
    mqtt: {topic: p/state, value_path: state}
    type: string
    enum: [Idle, Running, Fault]
  temperature:
    connection: plant_mqtt
    mqtt: {topic: p/telemetry, value_path: temperature_c}
    type: float
events:
"""

QUALITY = """\
  health:
    type: maintenance.SignalQualityChanged.v1
    trigger: {{kind: quality, signal: {signal}{options}}}
    data:
      quality: {{trigger: quality}}
      previous: {{trigger: previous_quality}}
      reason: {{trigger: reason}}
      duration_s: {{trigger: state_duration_s}}
      value: {{signal: {signal}}}
"""


def mapper(tmp_path: Path, options: str = ", stale_after_s: 120", signal: str = "temperature"
           ) -> Mapper:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "p.yaml").write_text(
        SIGNALS + QUALITY.format(signal=signal, options=options), encoding="utf-8"
    )
    return Mapper(load_mappings(tmp_path, {CONN: "mqtt"}), "edge-01")


TAGS = {"state": "p/state#state", "temperature": "p/telemetry#temperature_c"}


def read(
    m: Mapper,
    value: Any,
    at: float,
    *,
    signal: str = "temperature",
    quality: Quality = Quality.GOOD,
    status: int | str | None = None,
    received: float | None = None,
) -> list[Brief]:
    """Feed a reading; (time, quality, previous, reason, duration_s) of each event."""
    return brief(
        m.map(
            Signal(
                CONN,
                TAGS[signal],
                value,
                quality,
                status,
                source_time=at,
                receive_time=at if received is None else received,
            )
        )
    )


Brief = tuple[float, str, str | None, str | None, float | None]


def brief(events: list[DomainEvent]) -> list[Brief]:
    """(time, quality, previous, reason, duration_s) of each event."""
    return [
        (e.time, e.data["quality"], e.data["previous"], e.data["reason"], e.data["duration_s"])
        for e in events
    ]


def test_the_documented_quality_example(tmp_path: Path) -> None:
    """docs/mapping.md, *quality*: bad by conversion, good again, stale by the clock 120 s
    after the latest reading, good again; each with the previous quality and its duration."""
    m = mapper(tmp_path)
    assert m.tick(0) == []
    assert read(m, 60.5, 0) == []
    assert read(m, "n/a", 1) == [
        (1, "bad", "good", "expected a number for a float signal, got 'n/a'", None)
    ]
    assert read(m, 61.0, 2) == [(2, "good", "bad", None, 1)]
    assert read(m, 61.1, 4) == []
    assert m.tick(123.9) == []
    assert brief(m.tick(124)) == [(124, "stale", "good", "no reading for 120 s", 122)]
    assert m.tick(200) == []
    assert read(m, 61.3, 205) == [(205, "good", "stale", None, 81)]


def test_a_bad_quality_reading_says_why_with_its_status(tmp_path: Path) -> None:
    """The reason of a bad reading is its quality, with the protocol's status when there is
    one; the last good value stays available to the data fields."""
    m = mapper(tmp_path)
    read(m, 60.0, 0)
    (event,) = m.map(Signal(CONN, TAGS["temperature"], None, Quality.BAD, "0x80340000",
                            source_time=5.0, receive_time=5.0))
    assert event.data == {"quality": "bad", "previous": "good",
                          "reason": "bad quality, status 0x80340000", "duration_s": None,
                          "value": 60.0}
    read(m, 61.0, 6)
    assert read(m, 62.0, 7, quality=Quality.BAD) == [(7, "bad", "good", "bad quality", 1)]


def test_a_value_outside_the_enum_is_bad_with_the_conversion_message(tmp_path: Path) -> None:
    m = mapper(tmp_path, options="", signal="state")
    read(m, "Idle", 0, signal="state")
    ((_, quality, _, reason, _),) = read(m, "Stopped", 1, signal="state")
    assert quality == "bad"
    assert reason == "expected one of the enum states Idle, Running, Fault, got 'Stopped'"


def test_the_first_reading_fires_only_when_it_is_bad(tmp_path: Path) -> None:
    """Nothing is known to have changed when the first reading is good; a first bad reading
    is news (its previous quality and the duration are unknown)."""
    good = mapper(tmp_path / "a")
    assert read(good, 1.0, 0) == []
    bad = mapper(tmp_path / "b")
    assert read(bad, 1.0, 0, quality=Quality.BAD) == [(0, "bad", None, "bad quality", None)]
    assert read(bad, 1.0, 3) == [(3, "good", "bad", None, None)]  # bad began before start


def test_repeated_bad_or_good_readings_fire_once(tmp_path: Path) -> None:
    m = mapper(tmp_path)
    read(m, 1.0, 0)
    assert read(m, 1.0, 1) == []
    assert len(read(m, "x", 2)) == 1
    assert read(m, "y", 3) == []
    assert read(m, 2.0, 4, quality=Quality.BAD) == []
    assert len(read(m, 2.0, 5)) == 1
    assert read(m, 2.0, 6) == []


def test_uncertain_readings_count_as_good(tmp_path: Path) -> None:
    m = mapper(tmp_path)
    read(m, 1.0, 0, quality=Quality.BAD)
    assert read(m, 1.0, 2, quality=Quality.UNCERTAIN) == [(2, "good", "bad", None, None)]


def test_the_on_filter_chooses_what_fires_and_the_state_moves_anyway(tmp_path: Path) -> None:
    """on: [bad, stale]: recovery is silent but real, so the next failure fires again and its
    duration counts from the recovery."""
    m = mapper(tmp_path, options=", stale_after_s: 30, on: [bad, stale]")
    read(m, 1.0, 0)
    assert [q for _, q, *_ in read(m, "x", 10)] == ["bad"]
    assert read(m, 2.0, 20) == []
    assert read(m, "x", 25) == [(25, "bad", "good", "expected a number for a float signal, "
                                 "got 'x'", 5)]
    assert [q for _, q, *_ in brief(m.tick(55))] == ["stale"]


def test_only_good_fires_with_on_good(tmp_path: Path) -> None:
    m = mapper(tmp_path, options=", on: [good]")
    read(m, 1.0, 0)
    assert read(m, "x", 1) == []
    assert read(m, 1.0, 2) == [(2, "good", "bad", None, 1)]


def test_staleness_is_measured_by_receive_time_and_dated_in_signal_time(tmp_path: Path) -> None:
    """A device clock 1000 s behind: stale 120 s after the gateway received the latest
    reading (not at once), and the event is dated in the device's time."""
    m = mapper(tmp_path)
    read(m, 1.0, 0, received=1000)
    assert m.tick(1119) == []
    assert brief(m.tick(1120)) == [(120, "stale", "good", "no reading for 120 s", None)]


def test_any_reading_even_a_bad_one_keeps_a_signal_from_being_stale(tmp_path: Path) -> None:
    """Stale means no reading at all; a bad signal that stops sending goes from bad to stale."""
    m = mapper(tmp_path, options=", stale_after_s: 30")
    read(m, 1.0, 0)
    read(m, 1.0, 20, quality=Quality.BAD)
    assert m.tick(49) == []
    assert brief(m.tick(50)) == [(50, "stale", "bad", "no reading for 30 s", 30)]
    assert m.tick(51) == [] and m.tick(500) == []  # stale once


def test_a_stale_signal_that_sends_a_bad_reading_is_bad(tmp_path: Path) -> None:
    m = mapper(tmp_path, options=", stale_after_s: 30")
    read(m, 1.0, 0)
    m.tick(30)
    assert read(m, 1.0, 40, quality=Quality.BAD) == [(40, "bad", "stale", "bad quality", 10)]


def test_a_signal_never_read_since_start_goes_stale(tmp_path: Path) -> None:
    """The gateway starts waiting at its first tick; no reading for stale_after_s after it is
    stale too (a sensor dead at start-up is reported), dated by the gateway's clock."""
    m = mapper(tmp_path, options=", stale_after_s: 30")
    assert m.tick(100) == []
    assert m.tick(129) == []
    assert brief(m.tick(130)) == [(130, "stale", None, "no reading for 30 s", None)]
    assert read(m, 5.0, 150) == [(150, "good", "stale", None, 20)]


def test_the_quality_state_is_plain_data(tmp_path: Path) -> None:
    m = mapper(tmp_path)
    read(m, 1.0, 10, received=11)
    read(m, "x", 12, received=13)
    state = m.trigger_states[(SUBJECT, "health")]
    assert state == QualityState(
        quality="bad", since=12, last_time=12, last_received=13,
        last_event_time=12, events_at_last_time=1,
    )


@pytest.mark.parametrize(("options", "expected"), [("", False), (", stale_after_s: 5", True)])
def test_only_a_stale_check_needs_the_tick(tmp_path: Path, options: str, expected: bool) -> None:
    assert mapper(tmp_path, options=options).needs_tick is expected
