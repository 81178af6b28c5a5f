"""A full buffer drops by priority class, keeps a durable ledger of what it dropped, and reports
it as a ``gateway.EventsDropped.v1`` event; an age limit expires old events; format-1 files are
upgraded in place."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gateway.buffer.disk import FILE_NAME, BufferConfig, DiskBuffer
from gateway.metrics import Metrics
from gateway.model import DomainEvent, EventIds, decode_envelope

pytestmark = pytest.mark.timeout(60)

_ids = EventIds()
TELEMETRY = "process.TemperatureStatistics.v1"
BUSINESS = "production.PartsProduced.v1"
ALARM = "safety.EmergencyStop.v1"
PRIORITIES = {"process.*": "low", "safety.*": "high"}


def event(n: int, type_: str, size: int = 600) -> DomainEvent:
    return DomainEvent(id=_ids.next(), source="/gateways/gw1/connections/plc", type=type_,
                       subject="acme/p1/press1", time=1_700_000_000.0 + n,
                       data={"n": n, "pad": "x" * size})


def batch(type_: str, start: int, count: int) -> list[DomainEvent]:
    return [event(n, type_) for n in range(start, start + count)]


async def opened(tmp_path: Path, **kw: object) -> tuple[DiskBuffer, Metrics]:
    metrics = Metrics()
    buf = DiskBuffer(BufferConfig(directory=tmp_path, **kw), metrics)  # type: ignore[arg-type]
    await buf.open()
    return buf, metrics


async def kept(buf: DiskBuffer) -> list[tuple[str, int]]:
    return [(r.type, decode_envelope(r.body)["data"]["n"]) for r in await buf.read(0, 100_000)]


def test_priority_of_exact_pattern_and_default() -> None:
    config = BufferConfig(priorities={"process.*": "low", "process.Special.v1": "high"})
    assert config.priority_of("process.TemperatureStatistics.v1") == 0
    assert config.priority_of("process.Special.v1") == 2  # the exact type wins
    assert config.priority_of(BUSINESS) == 1
    assert config.priority_of("gateway.EventsDropped.v1") == 2


@pytest.mark.parametrize("when_full", ["drop_oldest", "drop_newest"])
async def test_low_priority_goes_first_then_the_policy_within_a_class(tmp_path, when_full):
    """Telemetry is dropped before business events, alarms last; within a class drop_oldest
    keeps the newest and drop_newest keeps the oldest."""
    buf, metrics = await opened(tmp_path, max_bytes=65_536, when_full=when_full,
                                priorities=PRIORITIES)
    try:
        await buf.append(batch(ALARM, 0, 5))
        await buf.append(batch(TELEMETRY, 100, 20))
        await buf.append(batch(BUSINESS, 200, 30))
        await buf.append(batch(TELEMETRY, 300, 20))  # everything so far fits in 64 KiB
        assert buf.pending_events == 75
        await buf.append(batch(BUSINESS, 400, 60))  # ~50 KiB more: all 40 telemetry must go
        records = await kept(buf)
        by_type = {t: [n for tt, n in records if tt == t] for t in (ALARM, TELEMETRY, BUSINESS)}
        assert by_type[ALARM] == list(range(5))
        assert by_type[TELEMETRY] == []
        business = by_type[BUSINESS]
        if when_full == "drop_oldest":
            assert business[-60:] == list(range(400, 460)) and business[0] > 200
        else:
            assert business[:30] == list(range(200, 230)) and business[-1] < 459
        dropped = 75 + 60 - len(records)
        reason = "buffer_full_oldest" if when_full == "drop_oldest" else "buffer_full_newest"
        assert metrics.value("events_dropped_total", reason=reason) == dropped
        ledger = {(t, r): n for t, r, _, n, _, _ in await buf.ledger()}
        assert ledger == {(TELEMETRY, reason): 40, (BUSINESS, reason): dropped - 40}
        assert buf.pending_bytes <= 65_536
    finally:
        await buf.close()


async def test_a_new_low_event_does_not_push_out_a_business_event(tmp_path):
    buf, _ = await opened(tmp_path, max_bytes=65_536, priorities=PRIORITIES)
    try:
        await buf.append(batch(BUSINESS, 0, 77))  # just under 64 KiB
        before = await kept(buf)
        await buf.append(batch(TELEMETRY, 100, 10))
        assert await kept(buf) == before  # the telemetry is the lowest: it is what goes
        assert {(t, n) for t, _, _, n, _, _ in await buf.ledger()} == {(TELEMETRY, 10)}
    finally:
        await buf.close()


async def test_the_ledger_survives_a_restart_and_becomes_one_report(tmp_path):
    buf, _ = await opened(tmp_path, max_bytes=65_536, priorities=PRIORITIES)
    await buf.append(batch(TELEMETRY, 0, 40))
    await buf.append(batch(BUSINESS, 100, 60))  # pushes out telemetry 0..~34
    too_big = event(999, BUSINESS, size=70_000)
    await buf.append([too_big])
    ledger = await buf.ledger()
    await buf.close()

    buf, metrics = await opened(tmp_path, max_bytes=65_536, priorities=PRIORITIES)
    try:
        assert await buf.ledger() == ledger
        # Kafka took the oldest half (the daemon reports only once there is room again)
        await buf.delete([r.seq for r in (await buf.read(0, 100_000))[:30]])
        reported = await buf.report_drops("gw1")
        assert reported == sum(line[3] for line in ledger) and reported > 1
        assert await buf.ledger() == []
        assert await buf.report_drops("gw1") == 0  # nothing new: no second report
        last = (await buf.read(0, 100_000))[-1]
        envelope = decode_envelope(last.body)
        assert (envelope["type"], envelope["subject"]) == ("gateway.EventsDropped.v1", "gateways/gw1")
        data = envelope["data"]
        assert data["count"] == reported
        lines = {(d["type"], d["reason"]): d for d in data["dropped"]}
        telemetry = lines[(TELEMETRY, "buffer_full_oldest")]
        assert telemetry["priority"] == "low"
        assert telemetry["first_time"] == "2023-11-14T22:13:20.000000Z"  # event 0's time
        assert lines[(BUSINESS, "event_too_large")]["count"] == 1
        assert metrics.value("drop_reports_total") == 1
    finally:
        await buf.close()


async def test_a_report_into_a_full_buffer_makes_room_for_itself(tmp_path):
    """The report is appended like any event: a full buffer drops by the usual rules for it,
    and what that drops is in the next report."""
    buf, _ = await opened(tmp_path, max_bytes=65_536, priorities=PRIORITIES)
    try:
        await buf.append(batch(TELEMETRY, 0, 90))  # more than fits: the first few dropped
        room = 65_536 - buf.pending_bytes
        filler = event(500, TELEMETRY, size=room - len(event(500, TELEMETRY, size=0).encode()))
        await buf.append([filler])
        assert buf.pending_bytes == 65_536  # exactly full
        dropped = sum(line[3] for line in await buf.ledger())
        assert await buf.report_drops("gw1") == dropped
        assert buf.pending_bytes <= 65_536
        again = await buf.ledger()
        assert [(t, r) for t, r, _, _, _, _ in again] == [(TELEMETRY, "buffer_full_oldest")]
        assert (await buf.read(0, 100_000))[-1].type == "gateway.EventsDropped.v1"
    finally:
        await buf.close()


async def test_max_age_expires_old_events_and_reports_them(tmp_path, monkeypatch):
    buf, metrics = await opened(tmp_path, max_age_s=60)
    try:
        await buf.append(batch(BUSINESS, 0, 3))
        assert await buf.expire() == 0  # young
        import gateway.buffer.disk as disk
        real = disk.time.time
        monkeypatch.setattr(disk.time, "time", lambda: real() + 30)
        await buf.append(batch(BUSINESS, 10, 2))  # appended 30 s later
        assert await buf.expire() == 0  # the oldest waited 30 s
        monkeypatch.setattr(disk.time, "time", lambda: real() + 70)
        assert await buf.expire() == 3
        assert [n for _, n in await kept(buf)] == [10, 11]
        assert metrics.value("events_dropped_total", reason="expired") == 3
        assert [(t, r, n) for t, r, _, n, _, _ in await buf.ledger()] == [(BUSINESS, "expired", 3)]
    finally:
        await buf.close()


async def test_a_format_1_file_is_upgraded_in_place(tmp_path):
    """A buffer written before priorities keeps its events, as normal priority."""
    path = tmp_path / FILE_NAME
    body = event(1, BUSINESS).encode()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT "
                     "NULL, subject TEXT NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL)")
        conn.execute("INSERT INTO events (type, subject, size, body) VALUES (?, ?, ?, ?)",
                     (BUSINESS, "acme/p1/press1", len(body), body))
        conn.execute("PRAGMA application_id=1145526082")
        conn.execute("PRAGMA user_version=1")
    buf, _ = await opened(tmp_path, max_bytes=65_536, priorities=PRIORITIES)
    try:
        assert buf.pending_events == 1
        await buf.append(batch(TELEMETRY, 10, 70))  # full: telemetry goes, the old event stays
        assert (await buf.read(0, 1))[0].body == body
    finally:
        await buf.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        row = conn.execute("SELECT priority, appended FROM events WHERE seq = 1").fetchone()
    assert row[0] == 1 and row[1] is not None


def test_the_report_is_valid_json_with_iso_times() -> None:
    from gateway.buffer.disk import dropped_report
    event_ = dropped_report("gw1", [(BUSINESS, "expired", 1, 2, 1.0, 2.5),
                                    (TELEMETRY, "buffer_full_oldest", 0, 1, None, None)], 10.0)
    data = json.loads(event_.encode())["data"]
    assert data == {"count": 3, "first_time": "1970-01-01T00:00:01.000000Z",
                    "last_time": "1970-01-01T00:00:02.500000Z", "dropped": [
                        {"type": BUSINESS, "reason": "expired", "priority": "normal", "count": 2,
                         "first_time": "1970-01-01T00:00:01.000000Z",
                         "last_time": "1970-01-01T00:00:02.500000Z"},
                        {"type": TELEMETRY, "reason": "buffer_full_oldest", "priority": "low",
                         "count": 1, "first_time": None, "last_time": None}]}
    again = dropped_report("gw1", [(BUSINESS, "expired", 1, 2, 1.0, 2.5),
                                   (TELEMETRY, "buffer_full_oldest", 0, 1, None, None)], 10.0)
    assert again.id == event_.id  # deterministic
