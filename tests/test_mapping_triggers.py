"""The state triggers of the Mapper: transition, edge (with debounce and tick), counter and
threshold, the ``{trigger: <attribute>}`` data fields and ``enum`` labels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.mapping import Mapper, load_mappings
from gateway.mapping.engine import CounterState, EdgeState, SignalState
from gateway.model import DomainEvent, Quality, Signal, event_id

CONN = "plant_mqtt"
SUBJECT = "acme/p1/l3/cell01"
TAGS = {
    "state": "c/status#state",
    "code": "c/status#code",
    "door": "c/status#door",
    "counter": "c/status#counter",
    "temperature": "c/status#temperature",
    "pieces": "c/status#pieces",
}

SIGNALS = """\
version: 1
asset:
  subject: acme/p1/l3/cell01
  attributes: {line: line3}
signals:
  state:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: state}
    type: string
    enum: [Idle, Setup, Running, Fault]
  code:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: code}
    type: integer
    enum: {0: Idle, 1: Setup, 2: Running, 3: Fault, 4: Fault}
  door:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: door}
    type: boolean
  counter:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: counter}
    type: integer
  temperature:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: temperature}
    type: float
  pieces:
    connection: plant_mqtt
    mqtt: {topic: c/status, value_path: pieces}
    type: integer
events:
"""


def mapper(tmp_path: Path, events: str, signals: str = SIGNALS) -> Mapper:
    """A Mapper of one file: the signals above and the given ``events:`` entries."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cell.yaml").write_text(signals + events, encoding="utf-8")
    return Mapper(load_mappings(tmp_path, {CONN: "mqtt"}), "edge-01")


def read(
    m: Mapper,
    signal: str,
    value: Any,
    at: float,
    *,
    quality: Quality = Quality.GOOD,
    received: float | None = None,
) -> list[DomainEvent]:
    """Feed one reading with source time ``at`` (receive time ``received``, default ``at``)."""
    reading = Signal(
        CONN,
        TAGS[signal],
        value,
        quality,
        source_time=at,
        receive_time=at if received is None else received,
    )
    return m.map(reading)


def datas(events: list[DomainEvent]) -> list[dict[str, Any]]:
    return [e.data for e in events]


def feed(m: Mapper, signal: str, *values: Any, start: float = 0.0) -> list[list[dict[str, Any]]]:
    """Feed values one second apart; per reading, the data of the events it fired."""
    return [datas(read(m, signal, v, start + i)) for i, v in enumerate(values)]


# --- transition ----------------------------------------------------------------------------

TRANSITION = """\
  changed:
    type: production.MachineStateChanged.v1
    trigger: {{kind: transition, signal: {signal}{options}}}
    data:
      state: {{signal: {signal}}}
      previous: {{previous: {signal}}}
      duration_s: {{trigger: state_duration_s}}
"""


def transition(tmp_path: Path, options: str = "", signal: str = "state") -> Mapper:
    return mapper(tmp_path, TRANSITION.format(signal=signal, options=options))


def test_transition_fires_on_each_state_change_and_not_on_repeats(tmp_path: Path) -> None:
    """Idle, Idle, Setup, Setup, Running: two transitions, each with its previous state."""
    m = transition(tmp_path)
    fired = feed(m, "state", "Idle", "Idle", "Setup", "Setup", "Running")
    assert [[(d["previous"], d["state"]) for d in f] for f in fired] == [
        [],
        [],
        [("Idle", "Setup")],
        [],
        [("Setup", "Running")],
    ]


def test_transition_skips_the_first_state_by_default(tmp_path: Path) -> None:
    """on_first_value defaults to skip for transitions: the first state is only remembered."""
    m = transition(tmp_path)
    assert read(m, "state", "Running", 0.0) == []
    (event,) = read(m, "state", "Fault", 1.0)
    assert event.data["previous"] == "Running"


def test_transition_emits_the_first_state_with_on_first_value_emit(tmp_path: Path) -> None:
    """emit: the first state is an event with no previous state and no duration."""
    m = transition(tmp_path, ", on_first_value: emit")
    assert datas(read(m, "state", "Idle", 0.0)) == [
        {"state": "Idle", "previous": None, "duration_s": None}
    ]


def test_a_from_filter_never_matches_the_first_state(tmp_path: Path) -> None:
    """The first state has no previous state, so it is in no ``from`` list, even with emit."""
    m = transition(tmp_path, ", from: [Idle], on_first_value: emit")
    assert read(m, "state", "Idle", 0.0) == []
    assert len(read(m, "state", "Setup", 1.0)) == 1


def test_a_to_filter_applies_to_the_first_state_with_emit(tmp_path: Path) -> None:
    """emit with ``to``: the first state fires only if it is a listed target."""
    m = transition(tmp_path, ", to: [Fault], on_first_value: emit")
    assert read(m, "state", "Idle", 0.0) == []
    other = transition(tmp_path / "other", ", to: [Fault], on_first_value: emit")
    assert datas(read(other, "state", "Fault", 0.0))[0]["state"] == "Fault"


def test_from_and_to_filters_select_transitions(tmp_path: Path) -> None:
    """from: [Running], to: [Idle, Fault]: Setup->Running, Running->Setup and Fault->Idle do
    not fire; Running->Fault does."""
    m = transition(tmp_path, ", from: [Running], to: [Idle, Fault]")
    fired = feed(m, "state", "Setup", "Running", "Setup", "Running", "Fault", "Idle")
    assert [[(d["previous"], d["state"]) for d in f] for f in fired] == [
        [],
        [],
        [],
        [],
        [("Running", "Fault")],
        [],
    ]


def test_filtered_out_transitions_still_move_the_state(tmp_path: Path) -> None:
    """The duration of a state counts from when it was entered, even by an unreported
    transition: Setup entered at 10 s (not reported), left at 25 s -> 15 s."""
    m = transition(tmp_path, ", to: [Running]")
    read(m, "state", "Idle", 0.0)
    assert read(m, "state", "Setup", 10.0) == []
    (event,) = read(m, "state", "Running", 25.0)
    assert event.data == {"state": "Running", "previous": "Setup", "duration_s": 15.0}


def test_state_duration_is_unknown_for_the_state_seen_first(tmp_path: Path) -> None:
    """The first state began before the gateway saw it: its duration is null; later ones are
    the time between the transitions."""
    m = transition(tmp_path)
    read(m, "state", "Idle", 100.0)
    (first,) = read(m, "state", "Setup", 130.0)
    (second,) = read(m, "state", "Running", 175.5)
    assert (first.data["duration_s"], second.data["duration_s"]) == (None, 45.5)


def test_state_duration_uses_source_timestamps_not_receive_times(tmp_path: Path) -> None:
    """Durations are in signal time: a late delivery does not stretch the state."""
    m = transition(tmp_path)
    read(m, "state", "Idle", 0.0, received=500.0)
    read(m, "state", "Setup", 10.0, received=510.0)
    (event,) = read(m, "state", "Running", 40.0, received=900.0)
    assert event.data["duration_s"] == 30.0
    assert event.time == 40.0


def test_state_duration_falls_back_to_receive_time_without_source_timestamp(
    tmp_path: Path,
) -> None:
    """A reading without a source timestamp is timed by its receive time."""
    m = transition(tmp_path)
    for value, received in (("Idle", 1000.0), ("Setup", 1010.0), ("Running", 1012.5)):
        fired = m.map(Signal(CONN, TAGS["state"], value, source_time=None, receive_time=received))
    assert datas(fired)[0]["duration_s"] == 2.5


def test_state_duration_is_null_when_the_clock_went_back(tmp_path: Path) -> None:
    """A device clock set back makes a negative difference: the duration is unknown."""
    m = transition(tmp_path)
    read(m, "state", "Idle", 0.0)
    read(m, "state", "Setup", 100.0)
    (event,) = read(m, "state", "Running", 50.0)
    assert event.data["duration_s"] is None


def test_bad_readings_neither_fire_nor_move_a_transition(tmp_path: Path) -> None:
    """Running, bad Fault, Running: no transition at all; the next real change counts from
    when Running was entered."""
    m = transition(tmp_path)
    read(m, "state", "Idle", 0.0)
    read(m, "state", "Running", 10.0)
    assert read(m, "state", "Fault", 11.0, quality=Quality.BAD) == []
    assert read(m, "state", "Running", 12.0) == []
    (event,) = read(m, "state", "Idle", 70.0)
    assert event.data == {"state": "Idle", "previous": "Running", "duration_s": 60.0}


def test_uncertain_readings_fire_like_good_ones(tmp_path: Path) -> None:
    """Only bad quality is excluded; uncertain values are still states."""
    m = transition(tmp_path)
    read(m, "state", "Idle", 0.0)
    assert len(read(m, "state", "Setup", 1.0, quality=Quality.UNCERTAIN)) == 1


# --- enum ----------------------------------------------------------------------------------


def test_integer_enum_codes_become_labels(tmp_path: Path) -> None:
    """Codes map to labels; two codes of one label (3 and 4: Fault) are the same state."""
    m = transition(tmp_path, signal="code")
    fired = feed(m, "code", 0, "2", 3, 4, 0)
    assert [[(d["previous"], d["state"]) for d in f] for f in fired] == [
        [],
        [("Idle", "Running")],
        [("Running", "Fault")],
        [],
        [("Fault", "Idle")],
    ]


def test_a_code_outside_the_enum_is_a_counted_bad_reading(tmp_path: Path) -> None:
    """Code 9 is not in the enum: no event, the state stays, a conversion error is counted."""
    m = transition(tmp_path, signal="code")
    read(m, "code", 2, 0.0)
    assert read(m, "code", 9, 1.0) == []
    assert m.conversion_errors == 1
    assert m.conversion_errors_by_signal == {(SUBJECT, "code"): 1}
    assert m.last_conversion_error == (
        f"{SUBJECT} signal code: expected one of the enum codes "
        f"{{0: Idle, 1: Setup, 2: Running, 3: Fault, 4: Fault}}, got 9"
    )
    assert m.signal_states[(SUBJECT, "code")].quality == "bad"
    assert m.signal_states[(SUBJECT, "code")].value == "Running"
    assert read(m, "code", 2, 2.0) == []


def test_a_string_outside_the_enum_states_is_a_counted_bad_reading(tmp_path: Path) -> None:
    """A misspelt state from the PLC is refused, counted, and fires nothing."""
    m = transition(tmp_path)
    read(m, "state", "Idle", 0.0)
    assert read(m, "state", "Runing", 1.0) == []
    assert m.conversion_errors == 1
    assert m.last_conversion_error == (
        f"{SUBJECT} signal state: expected one of the enum states Idle, Setup, Running, Fault, "
        f"got 'Runing'"
    )


def test_on_change_on_an_enum_signal_sees_the_labels(tmp_path: Path) -> None:
    """Data and on_change triggers see the label, whatever the trigger kind."""
    m = mapper(
        tmp_path,
        """\
  code_changed:
    type: production.ModeChanged.v1
    trigger: {kind: on_change, signal: code}
    data: {mode: {signal: code}}
""",
    )
    assert feed(m, "code", 1, 1, 2) == [[{"mode": "Setup"}], [], [{"mode": "Running"}]]


# --- edge ----------------------------------------------------------------------------------

EDGE = """\
  door:
    type: safety.GuardDoor.v1
    trigger: {{kind: edge, signal: door, edge: {edge}{options}}}
    data:
      edge: {{trigger: edge}}
      previous_level_s: {{trigger: state_duration_s}}
      open: {{signal: door}}
"""


def edge(tmp_path: Path, which: str = "both", options: str = "") -> Mapper:
    return mapper(tmp_path, EDGE.format(edge=which, options=options))


def test_rising_edge_fires_only_from_false_to_true(tmp_path: Path) -> None:
    """edge: rising ignores falling edges but still follows the level."""
    m = edge(tmp_path, "rising")
    fired = feed(m, "door", False, True, True, False, True)
    assert [[d["edge"] for d in f] for f in fired] == [[], ["rising"], [], [], ["rising"]]


def test_falling_edge_fires_only_from_true_to_false(tmp_path: Path) -> None:
    """edge: falling fires on true -> false only."""
    m = edge(tmp_path, "falling")
    fired = feed(m, "door", True, False, True, False)
    assert [[d["edge"] for d in f] for f in fired] == [[], ["falling"], [], ["falling"]]


def test_both_edges_say_which_edge_it_was(tmp_path: Path) -> None:
    """edge: both fires on every level change; {trigger: edge} names the direction."""
    m = edge(tmp_path)
    fired = feed(m, "door", "false", "1", 0, True)
    assert [[d["edge"] for d in f] for f in fired] == [[], ["rising"], ["falling"], ["rising"]]


def test_edge_skips_the_first_level_by_default(tmp_path: Path) -> None:
    """A door already open at start-up is not an opening."""
    m = edge(tmp_path)
    assert read(m, "door", True, 0.0) == []


def test_edge_emits_the_first_level_with_on_first_value_emit(tmp_path: Path) -> None:
    """emit: the first level is an edge from an unknown level (true rising, false falling),
    filtered by ``edge`` like any other."""
    m = edge(tmp_path, "rising", ", on_first_value: emit")
    assert datas(read(m, "door", True, 0.0)) == [
        {"edge": "rising", "previous_level_s": None, "open": True}
    ]
    other = edge(tmp_path / "other", "rising", ", on_first_value: emit")
    assert read(other, "door", False, 0.0) == []
    assert len(read(other, "door", True, 1.0)) == 1


def test_edge_reports_how_long_the_previous_level_lasted(tmp_path: Path) -> None:
    """Open at 10 s, closed at 70 s: the falling edge says the door was open 60 s."""
    m = edge(tmp_path)
    read(m, "door", False, 0.0)
    (opened,) = read(m, "door", True, 10.0)
    (closed,) = read(m, "door", False, 70.0)
    assert (opened.data["previous_level_s"], closed.data["previous_level_s"]) == (None, 60.0)


def test_a_bad_reading_is_no_edge(tmp_path: Path) -> None:
    """false, bad true, false: no edge."""
    m = edge(tmp_path)
    read(m, "door", False, 0.0)
    assert read(m, "door", True, 1.0, quality=Quality.BAD) == []
    assert read(m, "door", "maybe", 2.0) == []
    assert read(m, "door", False, 3.0) == []
    assert m.conversion_errors == 1


# --- edge debounce and tick ------------------------------------------------------------------


def debounced(tmp_path: Path, which: str = "both") -> Mapper:
    return edge(tmp_path, which, ", min_duration_ms: 500")


def test_a_bounce_shorter_than_min_duration_is_no_edge(tmp_path: Path) -> None:
    """true for 200 ms, then false again: nothing fires, before or after."""
    m = debounced(tmp_path)
    read(m, "door", False, 0.0)
    assert read(m, "door", True, 10.0) == []
    assert read(m, "door", False, 10.2) == []
    assert read(m, "door", False, 11.0) == []
    assert m.tick(20.0) == []


def test_a_level_held_long_enough_fires_at_the_next_reading(tmp_path: Path) -> None:
    """The reading that finds the level held for min_duration confirms it; the event carries
    that reading's time, and the previous level's duration up to the change."""
    m = debounced(tmp_path)
    read(m, "door", False, 0.0)
    assert read(m, "door", True, 10.0) == []
    assert read(m, "door", True, 10.3) == []
    (event,) = read(m, "door", True, 10.6)
    assert (event.time, event.data["edge"], event.data["previous_level_s"]) == (
        10.6,
        "rising",
        None,
    )
    assert read(m, "door", True, 11.0) == []


def test_a_level_held_exactly_min_duration_counts(tmp_path: Path) -> None:
    """Held for exactly 500 ms is long enough."""
    m = debounced(tmp_path)
    read(m, "door", False, 0.0)
    read(m, "door", True, 1.0)
    assert len(read(m, "door", True, 1.5)) == 1


def test_tick_fires_a_held_level_without_a_further_reading(tmp_path: Path) -> None:
    """The daemon's tick confirms a level that has held min_duration on the gateway clock;
    the event's time is the level's start plus min_duration, in signal time."""
    m = debounced(tmp_path)
    assert m.needs_tick
    read(m, "door", False, 0.0, received=1000.0)
    read(m, "door", True, 10.0, received=1010.0)
    assert m.tick(1010.4) == []
    (event,) = m.tick(1010.5)
    assert (event.time, event.data["edge"], event.type) == (10.5, "rising", "safety.GuardDoor.v1")
    assert event.source == "/gateways/edge-01/connections/plant_mqtt"
    assert event.subject == SUBJECT
    assert m.tick(1020.0) == []
    assert read(m, "door", True, 12.0) == []


def test_tick_measures_on_the_gateway_clock_whatever_the_device_clock(tmp_path: Path) -> None:
    """A device clock an hour behind neither fires the edge early nor delays it."""
    m = debounced(tmp_path)
    read(m, "door", False, 0.0, received=3600.0)
    read(m, "door", True, 5.0, received=3605.0)
    assert m.tick(3605.2) == []
    (event,) = m.tick(3606.0)
    assert event.time == 5.5


def test_tick_after_a_bounce_fires_nothing(tmp_path: Path) -> None:
    """A level that flipped back before its time is forgotten, not fired by a later tick."""
    m = debounced(tmp_path)
    read(m, "door", False, 0.0)
    read(m, "door", True, 1.0)
    read(m, "door", False, 1.1)
    assert m.tick(100.0) == []


def test_a_bad_reading_cancels_a_pending_level(tmp_path: Path) -> None:
    """A bad reading means the level did not demonstrably hold: the wait starts over with the
    next good reading."""
    m = debounced(tmp_path)
    read(m, "door", False, 0.0)
    read(m, "door", True, 1.0)
    assert read(m, "door", None, 1.2, quality=Quality.BAD) == []
    assert m.tick(1.6) == []
    assert read(m, "door", True, 1.6) == []
    assert m.tick(2.0) == []
    (event,) = m.tick(2.1)
    assert (event.time, event.data["previous_level_s"]) == (2.1, None)


def test_debounced_edge_duration_counts_from_when_each_level_began(tmp_path: Path) -> None:
    """Opened at 10 s (confirmed at 10.5 s), closed at 70 s: open for 60 s, not 59.5 s."""
    m = debounced(tmp_path)
    read(m, "door", False, 0.0)
    read(m, "door", True, 10.0)
    read(m, "door", True, 10.5)
    read(m, "door", False, 70.0)
    (closed,) = read(m, "door", False, 71.0)
    assert (closed.data["edge"], closed.data["previous_level_s"]) == ("falling", 60.0)


def test_a_confirmed_edge_the_filter_drops_still_moves_the_level(tmp_path: Path) -> None:
    """With edge: rising, a confirmed falling level is no event but is the new level, and the
    next rising edge measures from it."""
    m = debounced(tmp_path, "rising")
    read(m, "door", True, 0.0)
    read(m, "door", False, 1.0)
    assert m.tick(2.0) == []
    assert m.trigger_states[(SUBJECT, "door")] == EdgeState(level=False, since=1.0)
    read(m, "door", True, 5.0)
    (event,) = m.tick(6.0)
    assert event.data["previous_level_s"] == 4.0


def test_mapper_without_debounced_edges_needs_no_tick(tmp_path: Path) -> None:
    """needs_tick tells the daemon whether to schedule tick at all; tick is harmless anyway."""
    m = edge(tmp_path)
    assert not m.needs_tick
    read(m, "door", False, 0.0)
    read(m, "door", True, 1.0)
    assert m.tick(100.0) == []


# --- counter -------------------------------------------------------------------------------

COUNTER = """\
  produced:
    type: production.PartsProduced.v1
    trigger: {{kind: counter, signal: counter{options}}}
    data:
      parts: {{trigger: delta}}
      counter: {{signal: counter}}
"""


def counter(tmp_path: Path, options: str = "") -> Mapper:
    return mapper(tmp_path, COUNTER.format(options=options))


def deltas(m: Mapper, *values: int) -> list[int | None]:
    """Feed counter values; per reading, the delta fired (None: no event)."""
    return [f[0]["parts"] if f else None for f in feed(m, "counter", *values)]


def test_first_counter_value_is_only_a_baseline(tmp_path: Path) -> None:
    """No event and no invented delta for the value found at start-up."""
    m = counter(tmp_path)
    assert deltas(m, 41000, 41000, 41003, 41010) == [None, None, 3, 7]


def test_counter_event_carries_the_increment_and_the_reading(tmp_path: Path) -> None:
    """{trigger: delta} is the increment; {signal: counter} the counter value."""
    m = counter(tmp_path)
    read(m, "counter", 10, 0.0)
    assert datas(read(m, "counter", 12, 1.0)) == [{"parts": 2, "counter": 12}]


@pytest.mark.parametrize(
    ("before", "after", "delta"),
    [
        (65534, 2, 4),
        (65535, 0, 1),
        (65535, 1, 2),
        (65000, 499, 1035),
    ],
)
def test_rollover_counts_through_the_wrap(
    tmp_path: Path, before: int, after: int, delta: int
) -> None:
    """With rollover_at 65535 the counter goes ..., 65535, 0, 1, ...: 65534 -> 2 is +4."""
    m = counter(tmp_path, ", rollover_at: 65535, max_delta: 2000")
    assert deltas(m, before, after) == [None, delta]
    assert m.counter_resets == 0


def test_rollover_larger_than_max_delta_is_a_reset(tmp_path: Path) -> None:
    """50000 -> 10 would be +25546 through the wrap: more than max_delta, so a reset."""
    m = counter(tmp_path, ", rollover_at: 65535, max_delta: 100")
    assert deltas(m, 50000, 10, 12) == [None, None, 2]
    assert m.counter_resets == 1


def test_reset_is_ignored_by_default(tmp_path: Path) -> None:
    """Without rollover_at a decrease is a reset: no part invented, counted, new baseline."""
    m = counter(tmp_path)
    assert deltas(m, 5000, 0, 4, 3, 9) == [None, None, 4, None, 6]
    assert m.counter_resets == 2
    assert m.counter_resets_by_event == {(SUBJECT, "produced"): 2}


def test_reset_counts_from_zero_when_asked(tmp_path: Path) -> None:
    """count_from_zero: the value after a reset is what was made since the counter restarted
    at 0; a reset to 0 itself fires nothing."""
    m = counter(tmp_path, ", on_reset: count_from_zero")
    assert deltas(m, 5000, 3, 0, 2) == [None, 3, None, 2]
    assert m.counter_resets == 2


def test_count_from_zero_respects_max_delta(tmp_path: Path) -> None:
    """A "reset" to a large value (a preset) would invent parts: above max_delta it is a jump."""
    m = counter(tmp_path, ", on_reset: count_from_zero, max_delta: 100")
    assert deltas(m, 50000, 40000, 40001) == [None, None, 1]
    assert (m.counter_resets, m.counter_jumps) == (1, 1)


def test_jump_above_max_delta_is_dropped_and_counted(tmp_path: Path) -> None:
    """Exactly max_delta fires; one more is implausible: no event, counted, new baseline."""
    m = counter(tmp_path, ", max_delta: 100")
    assert deltas(m, 1000, 1100, 1201, 1202) == [None, 100, None, 1]
    assert m.counter_jumps == 1
    assert m.counter_jumps_by_event == {(SUBJECT, "produced"): 1}


def test_bad_counter_readings_keep_the_baseline(tmp_path: Path) -> None:
    """A bad reading or an unconvertible value neither fires nor moves the baseline."""
    m = counter(tmp_path)
    read(m, "counter", 100, 0.0)
    assert read(m, "counter", 0, 1.0, quality=Quality.BAD) == []
    assert read(m, "counter", "12.5", 2.0) == []
    assert datas(read(m, "counter", 103, 3.0)) == [{"parts": 3, "counter": 103}]
    assert m.counter_resets == 0


def test_counter_on_a_scaled_signal_counts_scaled_units(tmp_path: Path) -> None:
    """The delta is of the converted value (scale applied): 2 pieces per stroke."""
    scaled = SIGNALS.replace(
        "value_path: pieces}\n    type: integer\n",
        "value_path: pieces}\n    type: integer\n    scale: 2\n",
    )
    m = mapper(tmp_path, COUNTER.format(options="").replace("counter}", "pieces}"), scaled)
    read(m, "pieces", 10, 0.0)
    assert datas(read(m, "pieces", 13, 1.0)) == [{"parts": 6, "counter": 26}]


# --- threshold -----------------------------------------------------------------------------

THRESHOLD = """\
  limit:
    type: quality.TemperatureLimitCrossed.v1
    trigger: {{kind: threshold, signal: temperature{options}}}
    data:
      crossing: {{trigger: crossing}}
      duration_s: {{trigger: state_duration_s}}
      value: {{signal: temperature}}
"""


def threshold(tmp_path: Path, options: str) -> Mapper:
    return mapper(tmp_path, THRESHOLD.format(options=options))


def crossings(m: Mapper, *values: float) -> list[str | None]:
    """Feed temperatures; per reading, the crossing fired (None: no event)."""
    return [f[0]["crossing"] if f else None for f in feed(m, "temperature", *values)]


def test_above_enters_strictly_above_the_limit(tmp_path: Path) -> None:
    """Exactly at the limit is not in the band; just above is."""
    m = threshold(tmp_path, ", above: 100.0")
    assert crossings(m, 90.0, 100.0, 100.01) == [None, None, "enter"]


def test_above_leaves_at_the_limit_minus_hysteresis(tmp_path: Path) -> None:
    """above: 100, hysteresis: 3: once in, 97.01 and 100.5 stay in; exactly 97.0 leaves; back
    in only above 100 again."""
    m = threshold(tmp_path, ", above: 100.0, hysteresis: 3.0")
    assert crossings(m, 90.0, 101.0, 97.01, 100.5, 97.0, 99.0, 100.0, 100.5) == [
        None,
        "enter",
        None,
        None,
        "leave",
        None,
        None,
        "enter",
    ]


def test_without_hysteresis_the_limit_itself_leaves(tmp_path: Path) -> None:
    """Hysteresis 0: in above the limit, out at the limit."""
    m = threshold(tmp_path, ", above: 100.0")
    assert crossings(m, 90.0, 100.5, 100.0) == [None, "enter", "leave"]


def test_below_enters_strictly_below_and_leaves_at_limit_plus_hysteresis(tmp_path: Path) -> None:
    """below: 5.5, hysteresis 0.3: in below 5.5, out at 5.8 or more."""
    m = threshold(tmp_path, ", below: 5.5, hysteresis: 0.3")
    assert crossings(m, 6.0, 5.5, 5.4, 5.79, 5.2, 5.8, 5.6) == [
        None,
        None,
        "enter",
        None,
        None,
        "leave",
        None,
    ]


def test_crossings_select_which_direction_fires(tmp_path: Path) -> None:
    """crossings: [leave] reports the all-clear only; the band is still followed."""
    m = threshold(tmp_path, ", above: 100.0, crossings: [leave]")
    assert crossings(m, 90.0, 101.0, 99.0, 101.0, 99.0) == [None, None, "leave", None, "leave"]


def test_first_value_in_the_band_is_silent_by_default(tmp_path: Path) -> None:
    """skip: a value already above the limit only sets the state; leaving still fires."""
    m = threshold(tmp_path, ", above: 100.0")
    assert crossings(m, 120.0, 110.0, 90.0) == [None, None, "leave"]


def test_first_value_in_the_band_enters_with_emit(tmp_path: Path) -> None:
    """emit: a first value in the band is an enter with no duration; one outside is nothing."""
    m = threshold(tmp_path, ", above: 100.0, on_first_value: emit")
    assert datas(read(m, "temperature", 120.0, 0.0)) == [
        {"crossing": "enter", "duration_s": None, "value": 120.0}
    ]
    other = threshold(tmp_path / "other", ", above: 100.0, on_first_value: emit")
    assert crossings(other, 90.0, 101.0) == [None, "enter"]


def test_threshold_reports_how_long_the_previous_side_lasted(tmp_path: Path) -> None:
    """Entered at 10 s, left at 40 s: the leave says 30 s in the band."""
    m = threshold(tmp_path, ", above: 100.0")
    read(m, "temperature", 90.0, 0.0)
    (enter,) = read(m, "temperature", 105.0, 10.0)
    (leave,) = read(m, "temperature", 95.0, 40.0)
    assert (enter.data["duration_s"], leave.data["duration_s"]) == (None, 30.0)


def test_bad_readings_do_not_cross(tmp_path: Path) -> None:
    """A bad reading above the limit is no crossing."""
    m = threshold(tmp_path, ", above: 100.0")
    read(m, "temperature", 90.0, 0.0)
    assert read(m, "temperature", 150.0, 1.0, quality=Quality.BAD) == []
    assert read(m, "temperature", "n/a", 2.0) == []
    assert crossings(m, 95.0) == [None]


def test_threshold_on_an_integer_signal(tmp_path: Path) -> None:
    """Integer signals compare like floats."""
    m = mapper(
        tmp_path,
        THRESHOLD.format(options=", below: 10").replace("signal: temperature", "signal: counter"),
    )
    assert [f[0]["crossing"] if f else None for f in feed(m, "counter", 12, 10, 9, 10)] == [
        None,
        None,
        "enter",
        "leave",
    ]


# --- state is plain data --------------------------------------------------------------------


def test_mapper_state_is_plain_serialisable_data(tmp_path: Path) -> None:
    """Every signal and trigger state is a dataclass of JSON values; copying it into a fresh
    Mapper continues where the first one stopped (no new baseline, durations go on)."""
    events = (
        COUNTER.format(options="")
        + TRANSITION.format(signal="state", options="")
        + EDGE.format(edge="both", options=", min_duration_ms: 500")
    )
    first = mapper(tmp_path, events)
    read(first, "counter", 100, 0.0)
    read(first, "state", "Idle", 0.0)
    read(first, "state", "Running", 10.0)
    read(first, "door", False, 10.0)
    read(first, "door", True, 11.0)
    saved = json.dumps(
        {
            "signals": {"/".join(k): dataclasses.asdict(v) for k, v in first.signal_states.items()},
            "triggers": {
                "/".join(k): dataclasses.asdict(v) for k, v in first.trigger_states.items()
            },
        }
    )
    second = Mapper(first.files, "edge-01")
    restored = json.loads(saved)
    for key, state in second.signal_states.items():
        for name, value in restored["signals"]["/".join(key)].items():
            setattr(state, name, value)
    for key, trigger_state in second.trigger_states.items():
        for name, value in restored["triggers"]["/".join(key)].items():
            setattr(trigger_state, name, value)
    assert isinstance(second.signal_states[(SUBJECT, "counter")], SignalState)
    assert second.trigger_states[(SUBJECT, "produced")] == CounterState(last=100)
    assert datas(read(second, "counter", 103, 20.0)) == [{"parts": 3, "counter": 103}]
    assert datas(read(second, "state", "Idle", 70.0)) == [
        {"state": "Idle", "previous": "Running", "duration_s": 60.0}
    ]
    (door,) = read(second, "door", True, 11.5)
    assert (door.data["edge"], door.time) == ("rising", 11.5)


def test_triggers_of_different_kinds_on_one_signal_fire_in_declaration_order(
    tmp_path: Path,
) -> None:
    """A threshold and an on_change on one signal: one reading fires both, in file order,
    each with its own data."""
    events = THRESHOLD.format(options=", above: 50.0") + (
        "  changed:\n"
        "    type: process.TemperatureChanged.v1\n"
        "    trigger: {kind: on_change, signal: temperature, on_first_value: skip}\n"
        "    data: {value: {signal: temperature}}\n"
    )
    m = mapper(tmp_path, events)
    assert read(m, "temperature", 10.0, 0.0) == []
    fired = read(m, "temperature", 60.0, 1.0)
    assert [(e.type, e.data) for e in fired] == [
        (
            "quality.TemperatureLimitCrossed.v1",
            {"crossing": "enter", "duration_s": None, "value": 60.0},
        ),
        ("process.TemperatureChanged.v1", {"value": 60.0}),
    ]
    tag = TAGS["temperature"]
    assert [e.id for e in fired] == [
        event_id("edge-01", SUBJECT, "limit", 1.0, tag, 60.0),
        event_id("edge-01", SUBJECT, "changed", 1.0, tag, 60.0),
    ]
