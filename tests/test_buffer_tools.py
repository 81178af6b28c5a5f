"""``digispine-gateway buffer stats|inspect|export`` on real buffers written by DiskBuffer.

The tools must read a buffer whose gateway runs (lock held, WAL live) or is stopped, without
writing, creating a file or taking the lock, and must say clearly when there is no buffer (66)
or the file is not one (73). Format 2 adds per-priority figures, how long the oldest event has
waited and the unreported drop ledger; a format-1 file is still read, without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway import errors
from gateway.buffer import disk, tools
from gateway.buffer.disk import (
    APPLICATION_ID,
    DROPPED_TYPE,
    FILE_NAME,
    FORMAT_VERSION,
    BufferConfig,
    DiskBuffer,
)
from gateway.buffer.tools import EX_NOINPUT, DropLine, Group, NoBuffer, Selection
from gateway.cli import main
from gateway.metrics import Metrics
from gateway.model import DomainEvent, EventIds, rfc3339

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
PRESS = "acme/plant1/press1"
OVEN = "acme/plant1/oven1"
COUNT = "production.CountChanged.v1"
STATE = "production.MachineStateChanged.v1"
TEMP = "process.TemperatureChanged.v1"
ALARM = "safety.EmergencyStop.v1"
PRIORITIES: dict[str, Any] = {"process.*": "low", "safety.*": "high"}
_ids = EventIds()


def event(n: int, type_: str = COUNT, subject: str = PRESS, pad: int = 0) -> DomainEvent:
    data: dict[str, object] = {"n": n}
    if pad:
        data["pad"] = "x" * pad
    return DomainEvent(id=_ids.next(), source="digispine-gateway/gw1/plc", type=type_,
                       subject=subject, time=T0 + n, data=data)


def mixed(count: int) -> list[DomainEvent]:
    """n = 0..count-1: every third a TEMP of the oven, the rest COUNT/STATE of the press."""
    out = []
    for n in range(count):
        if n % 3 == 2:
            out.append(event(n, TEMP, OVEN, pad=n))
        else:
            out.append(event(n, COUNT if n % 3 == 0 else STATE, PRESS, pad=n))
    return out


class OpenBuffer:
    """A DiskBuffer kept open (flock held, WAL live) on a private loop, as a running gateway."""

    def __init__(self, directory: Path, **config: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.buf = DiskBuffer(BufferConfig(directory=directory, **config), Metrics())
        self.loop.run_until_complete(self.buf.open())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def append(self, batch: list[DomainEvent], state: Sequence[tuple[str, str, bytes]] = ()) -> None:
        self.loop.run_until_complete(self.buf.append(batch, state))

    def delete(self, seqs: list[int]) -> None:
        self.loop.run_until_complete(self.buf.delete(seqs))

    def close(self) -> None:
        self.loop.run_until_complete(self.buf.close())
        self.loop.close()


def write_buffer(directory: Path, batch: list[DomainEvent], delete: Sequence[int] = ()) -> None:
    """A stopped gateway's buffer: appended, acknowledged ``delete``, closed cleanly."""
    b = OpenBuffer(directory)
    try:
        b.append(batch)
        b.delete(list(delete))
    finally:
        b.close()


class Clock:
    """``time`` as gateway.buffer.disk sees it, with a ``time()`` the test sets (what the buffer
    stamps as ``appended`` and what ``expire`` compares with); the rest is the real module."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of the directory with a hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture
def stopped(tmp_path: Path) -> tuple[Path, list[DomainEvent]]:
    """A buffer of 30 mixed events of which seqs 1-3 were acknowledged (deleted)."""
    batch = mixed(30)
    directory = tmp_path / "state"
    write_buffer(directory, batch, delete=[1, 2, 3])
    return directory, batch[3:]


# -- stats --------------------------------------------------------------------------------


def test_stats_figures_of_a_stopped_buffer(stopped: tuple[Path, list[DomainEvent]]) -> None:
    directory, pending = stopped
    now = T0 + 3600
    stats = tools.read_stats(directory, by_subject=True, now=now)

    sizes = [len(e.encode()) for e in pending]
    assert stats.path == directory / FILE_NAME
    assert stats.format == FORMAT_VERSION
    assert (stats.pending_events, stats.pending_bytes) == (27, sum(sizes))
    assert (stats.first_seq, stats.last_seq, stats.high_water_seq) == (4, 30, 30)
    assert stats.oldest_time == rfc3339(T0 + 3) == "2023-11-14T22:13:23.000000Z"
    assert stats.newest_time == rfc3339(T0 + 29)
    assert stats.oldest_age_s == pytest.approx(3600 - 3)
    expected: dict[str, list[int]] = {}
    for e, size in zip(pending, sizes, strict=True):
        expected.setdefault(e.type, []).append(size)
    assert {g.key: (g.events, g.bytes) for g in stats.by_type} == {
        t: (len(v), sum(v)) for t, v in expected.items()}
    assert [g.events for g in stats.by_type] == sorted((g.events for g in stats.by_type),
                                                       reverse=True)
    assert stats.by_subject is not None
    assert {g.key: g.events for g in stats.by_subject} == {PRESS: 18, OVEN: 9}
    assert stats.db_bytes == (directory / FILE_NAME).stat().st_size > 0
    assert stats.wal_bytes == 0  # a clean close checkpointed and removed the WAL
    assert stats.disk_bytes == stats.db_bytes

    data = stats.to_json()
    assert data["pending_events"] == 27 and data["pending_bytes"] == sum(sizes)
    assert data["oldest_age_s"] == pytest.approx(3597)
    assert {d["type"] for d in data["by_type"]} == {COUNT, STATE, TEMP}
    assert {d["subject"]: d["events"] for d in data["by_subject"]} == {PRESS: 18, OVEN: 9}
    assert "by_subject" not in tools.read_stats(directory).to_json()

    text = tools.render_stats(stats)
    assert "27 events" in text and f"{sum(sizes):,} B" in text
    assert "seq         4 .. 30 (highest assigned 30)" in text
    assert "2023-11-14T22:13:23.000000Z (59m 57s ago)" in text
    assert TEMP in text and OVEN in text


def test_stats_of_an_emptied_buffer_keeps_the_high_water(tmp_path: Path) -> None:
    write_buffer(tmp_path, mixed(5), delete=[1, 2, 3, 4, 5])
    stats = tools.read_stats(tmp_path)
    assert (stats.pending_events, stats.pending_bytes) == (0, 0)
    assert (stats.first_seq, stats.last_seq, stats.high_water_seq) == (None, None, 5)
    assert (stats.oldest_time, stats.oldest_age_s, stats.by_type) == (None, None, ())
    assert stats.by_priority == (Group("low", 0, 0), Group("normal", 0, 0), Group("high", 0, 0))
    assert (stats.oldest_appended, stats.oldest_appended_age_s, stats.has_appended) == (
        None, None, True)
    assert (stats.drops, stats.dropped_unreported, stats.mapper_states) == ((), 0, 0)
    data = stats.to_json()
    assert (data["oldest_appended"], data["oldest_appended_age_s"]) == (None, None)
    assert (data["dropped_unreported"], data["drops"]) == (0, [])
    text = tools.render_stats(stats)
    assert "none pending (highest assigned 5)" in text
    assert "dropped     none unreported" in text
    assert "waiting" not in text and "PRIORITY" not in text  # nothing waits


# -- format 2: priorities, waiting time, the drop ledger -------------------------------------


def expected_priorities(config: BufferConfig, records: list[Any]) -> dict[str, tuple[int, int]]:
    out = {"low": (0, 0), "normal": (0, 0), "high": (0, 0)}
    for r in records:
        name = ("low", "normal", "high")[config.priority_of(r.type)]
        n, b = out[name]
        out[name] = (n + 1, b + len(r.body))
    return out


def ledger_lines(ledger: list[tuple[Any, ...]]) -> set[DropLine]:
    return {DropLine(*line) for line in ledger}


def test_stats_of_a_format_2_buffer_with_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Per-priority depth, the longest wait and the unreported ledger, read while the gateway
    runs and after it stopped; then what a report and an expiry leave."""
    clock = Clock(T0 + 10_000)
    monkeypatch.setattr(disk, "time", clock)
    config: dict[str, Any] = {"max_bytes": 65_536, "priorities": PRIORITIES, "sync": "off"}
    live = OpenBuffer(tmp_path, **config)
    try:
        live.append([event(n, ALARM, pad=500) for n in range(3)])  # high, appended first
        clock.now += 60
        live.append([event(n, TEMP, OVEN, pad=500) for n in range(10, 50)])  # low
        clock.now += 60
        live.append([event(n, COUNT, pad=500) for n in range(100, 170)],  # normal: full,
                    [("signal\tacme/plant1/press1\tcount", "fp", b"{}")])  # low ones go first
        live.append([event(999, COUNT, pad=70_000)])  # larger than max_bytes
        ledger = live.run(live.buf.ledger())
        records = live.run(live.buf.read(0, 100_000))
        assert {r.type for r in records} == {ALARM, TEMP, COUNT}  # some telemetry is left
        now = clock.now + 3600
        stats = tools.read_stats(tmp_path, now=now)  # through the live WAL

        buffer_config = BufferConfig(directory=tmp_path, **config)
        assert stats.format == 2 and stats.wal_bytes > 0
        assert {g.key: (g.events, g.bytes) for g in stats.by_priority or ()} == (
            expected_priorities(buffer_config, records))
        assert [g.key for g in stats.by_priority or ()] == ["low", "normal", "high"]
        assert (stats.pending_events, stats.pending_bytes) == (
            live.buf.pending_events, live.buf.pending_bytes)
        assert stats.oldest_appended == T0 + 10_000  # the alarms waited the longest
        assert stats.oldest_appended_age_s == 3600 + 120
        assert stats.drops is not None and set(stats.drops) == ledger_lines(ledger)
        assert [line.count for line in stats.drops] == sorted(
            (line.count for line in stats.drops), reverse=True)
        dropped_temps = 40 - sum(r.type == TEMP for r in records)
        assert ledger_lines(ledger) == {
            DropLine(TEMP, "buffer_full_oldest", 0, dropped_temps, T0 + 10, T0 + 9 + dropped_temps),
            DropLine(COUNT, "event_too_large", 1, 1, T0 + 999, T0 + 999)}
        assert stats.dropped_unreported == dropped_temps + 1
        assert stats.mapper_states == 1

        data = stats.to_json()
        assert data["by_priority"] == [
            {"priority": k, "events": n, "bytes": b}
            for k, (n, b) in expected_priorities(buffer_config, records).items()]
        assert data["oldest_appended"] == rfc3339(T0 + 10_000)
        assert data["oldest_appended_age_s"] == 3720.0
        assert data["dropped_unreported"] == dropped_temps + 1
        assert data["drops"][0] == {
            "type": TEMP, "reason": "buffer_full_oldest", "priority": "low",
            "count": dropped_temps, "first_time": rfc3339(T0 + 10),
            "last_time": rfc3339(T0 + 9 + dropped_temps)}
        assert data["drops"][1]["reason"] == "event_too_large"
        assert data["mapper_states"] == 1

        text = tools.render_stats(stats)
        assert f"waiting     the longest 1h 2m (buffered {rfc3339(T0 + 10_000)})" in text
        assert f"dropped     {dropped_temps + 1} events not yet reported" in text
        assert "mapper      1 saved state\n" in text
        rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line}
        assert rows["PRIORITY"] == ["EVENTS", "BYTES"]
        assert rows["high"] == ["3", f"{stats.by_priority[2].bytes:,}"]  # type: ignore[index]
        table = text[text.index("dropped, not yet reported"):].splitlines()
        assert table[1].split() == ["TYPE", "REASON", "PRIORITY", "COUNT", "FIRST", "TIME",
                                    "LAST", "TIME"]
        assert table[2].split() == [TEMP, "buffer_full_oldest", "low", str(dropped_temps),
                                    rfc3339(T0 + 10), rfc3339(T0 + 9 + dropped_temps)]
        assert table[3].split() == [COUNT, "event_too_large", "normal", "1", rfc3339(T0 + 999),
                                    rfc3339(T0 + 999)]

        # the report empties the ledger and is itself buffered, high (once Kafka made room)
        clock.now += 5
        counts = [r.seq for r in live.run(live.buf.read(0, 1000)) if r.type == COUNT]
        live.run(live.buf.delete(counts[:5]))
        before = tools.read_stats(tmp_path, now=clock.now).by_priority
        assert before is not None
        assert live.run(live.buf.report_drops("gw1")) == dropped_temps + 1
        stats = tools.read_stats(tmp_path, now=clock.now)
        assert (stats.drops, stats.dropped_unreported) == ((), 0)
        assert stats.by_priority is not None
        assert stats.by_priority[2].events == before[2].events + 1
        report = tools.read_events(tmp_path, Selection(tail=True, limit=1))[0]
        assert (report.type, report.priority, report.priority_name) == (DROPPED_TYPE, 2, "high")
        text = tools.render_stats(stats)
        assert "dropped     none unreported" in text and "dropped, not yet" not in text
        capsys.readouterr()  # the buffer's log lines so far
        assert main(["buffer", "inspect", "--dir", str(tmp_path), "--tail", "--limit", "1"]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[-1] == "high"

        # expire what was buffered first (the alarms): they land in the ledger, high
        assert live.run(live.buf.expire(clock.now - (T0 + 10_030))) == 3
        stats = tools.read_stats(tmp_path, now=clock.now)
        assert stats.drops == (DropLine(ALARM, "expired", 2, 3, T0, T0 + 2),)
        assert stats.oldest_appended == T0 + 10_060  # now the telemetry has waited longest
        assert stats.by_priority is not None and stats.by_priority[2].events == 1
        live_stats = stats
    finally:
        live.close()

    stopped = tools.read_stats(tmp_path, now=clock.now)  # the clean copy, no WAL
    assert stopped.wal_bytes == 0
    for name in ("by_priority", "oldest_appended", "drops", "mapper_states", "pending_bytes"):
        assert getattr(stopped, name) == getattr(live_stats, name), name


def test_a_format_1_buffer_is_read_without_the_format_2_figures(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A buffer an older gateway left (no priority, appended, drops, mapper_state): the tools
    read it as it is (they never upgrade it) and simply leave those figures out."""
    batch = mixed(3)
    with contextlib.closing(sqlite3.connect(tmp_path / FILE_NAME)) as conn:
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT "
                     "NULL, subject TEXT NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL)")
        conn.executemany("INSERT INTO events (type, subject, size, body) VALUES (?, ?, ?, ?)",
                         [(e.type, e.subject, len(e.encode()), e.encode()) for e in batch])
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute("PRAGMA user_version=1")
        conn.commit()
    before = snapshot(tmp_path)

    stats = tools.read_stats(tmp_path)
    assert (stats.format, stats.pending_events, stats.last_seq) == (1, 3, 3)
    assert (stats.by_priority, stats.oldest_appended, stats.oldest_appended_age_s) == (
        None, None, None)
    assert (stats.has_appended, stats.drops, stats.dropped_unreported, stats.mapper_states) == (
        False, None, None, None)
    data = stats.to_json()
    assert not {"by_priority", "oldest_appended", "oldest_appended_age_s", "dropped_unreported",
                "drops", "mapper_states"} & set(data)
    assert data["pending_events"] == 3
    text = tools.render_stats(stats)
    for absent in ("PRIORITY", "waiting", "dropped", "mapper"):
        assert absent not in text, absent
    assert [(e.seq, e.priority, e.priority_name) for e in tools.read_events(tmp_path)] == [
        (1, None, None), (2, None, None), (3, None, None)]
    assert main(["buffer", "inspect", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "SEQ", "TYPE", "SUBJECT", "TIME", "ID", "SIZE"]
    assert main(["buffer", "stats", "--json", "--dir", str(tmp_path)]) == 0
    assert "drops" not in json.loads(capsys.readouterr().out)
    assert snapshot(tmp_path) == before  # still format 1: reading never upgrades


def test_a_ledger_without_its_columns_is_left_out(tmp_path: Path) -> None:
    """A ``drops`` table of another shape (a later format, say) is no reason to fail."""
    write_buffer(tmp_path, mixed(2))
    with contextlib.closing(sqlite3.connect(tmp_path / FILE_NAME)) as conn:
        conn.execute("DROP TABLE drops")
        conn.execute("CREATE TABLE drops (what TEXT)")
        conn.commit()
    stats = tools.read_stats(tmp_path)
    assert (stats.pending_events, stats.drops) == (2, None)
    assert stats.by_priority is not None and stats.by_priority[1].events == 2


def test_a_stopped_buffer_is_left_byte_for_byte_alone(stopped: tuple[Path, list[DomainEvent]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    directory, _ = stopped
    before = snapshot(directory)
    assert set(before) == {FILE_NAME, "buffer.lock"}
    for args in (["stats"], ["stats", "--json", "--by-subject"], ["inspect", "--body"],
                 ["export", "--with-seq"]):
        assert main(["buffer", *args, "--dir", str(directory)]) == 0
    capsys.readouterr()
    assert snapshot(directory) == before  # no -wal, no -shm, nothing rewritten


# -- while the gateway runs ---------------------------------------------------------------


def test_stats_while_the_buffer_is_open_and_locked(tmp_path: Path) -> None:
    live = OpenBuffer(tmp_path)
    try:
        live.append(mixed(12))
        live.delete([1, 2])
        stats = tools.read_stats(tmp_path)
        assert (stats.pending_events, stats.pending_bytes) == (
            live.buf.pending_events, live.buf.pending_bytes)
        assert (stats.first_seq, stats.last_seq) == (3, 12)
        assert stats.wal_bytes > 0  # read through the live WAL

        # the tool took no lock and wrote nothing: the gateway goes on, the tool sees it
        live.append(mixed(3))
        live.delete([3])
        again = tools.read_stats(tmp_path)
        assert (again.pending_events, again.pending_bytes) == (
            live.buf.pending_events, live.buf.pending_bytes)
        assert (again.first_seq, again.last_seq) == (4, 15)
        assert [e.seq for e in tools.read_events(tmp_path, Selection(tail=True, limit=2))] == [
            14, 15]

        # and as a separate process, the way an operator runs it next to the service
        proc = cli("buffer", "stats", "--json", "--dir", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert (data["pending_events"], data["pending_bytes"]) == (
            live.buf.pending_events, live.buf.pending_bytes)
        assert data["last_seq"] == data["high_water_seq"] == 15

        live.append(mixed(1))  # still the owner of the buffer
        assert live.buf.last_seq == 16
    finally:
        live.close()


def test_a_crashed_gateways_wal_and_shm_are_read_but_not_touched(tmp_path: Path) -> None:
    """kill -9 leaves buffer.sqlite3-wal and -shm behind; the committed events are in the WAL."""
    code = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from gateway.buffer.disk import BufferConfig, DiskBuffer
        from gateway.metrics import Metrics
        from gateway.model import DomainEvent

        async def main():
            buf = DiskBuffer(BufferConfig(directory=Path({str(tmp_path)!r})), Metrics())
            await buf.open()
            await buf.append([DomainEvent(id=f"e{{n}}", source="s", type="t.T.v1",
                                          subject="a/b", time={T0} + n, data={{"n": n}})
                              for n in range(40)])
            await buf.delete([1])
            os._exit(0)  # no close: as kill -9

        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=30,
                   capture_output=True)
    before = snapshot(tmp_path)
    assert {FILE_NAME + "-wal", FILE_NAME + "-shm"} <= set(before)

    stats = tools.read_stats(tmp_path)
    assert (stats.pending_events, stats.first_seq, stats.last_seq) == (39, 2, 40)
    out = io.BytesIO()
    assert tools.export(tmp_path, Selection(), out) == 39
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == [
        f"e{n}" for n in range(1, 40)]
    assert snapshot(tmp_path) == before  # not even the -shm was written


def test_a_wal_without_its_shm_is_read_from_a_copy(tmp_path: Path) -> None:
    """A directory copied without the -shm: reading in place would create one."""
    live = OpenBuffer(tmp_path / "live")
    try:
        live.append(mixed(6))
        copy = tmp_path / "copy"
        copy.mkdir()
        for name in (FILE_NAME, FILE_NAME + "-wal"):
            shutil.copyfile(tmp_path / "live" / name, copy / name)
    finally:
        live.close()
    before = snapshot(copy)
    assert [e.seq for e in tools.read_events(copy)] == [1, 2, 3, 4, 5, 6]
    assert snapshot(copy) == before


# -- inspect ------------------------------------------------------------------------------


def test_inspect_selections(stopped: tuple[Path, list[DomainEvent]]) -> None:
    directory, _ = stopped

    def seqs(**kw: object) -> list[int]:
        return [e.seq for e in tools.read_events(directory, Selection(**kw))]  # type: ignore[arg-type]

    assert seqs() == list(range(4, 31))
    assert seqs(limit=5) == [4, 5, 6, 7, 8]
    assert seqs(limit=5, tail=True) == [26, 27, 28, 29, 30]
    assert seqs(from_seq=20, limit=3) == [20, 21, 22]
    assert seqs(from_seq=1, limit=2) == [4, 5]
    assert seqs(types=(TEMP,)) == list(range(6, 31, 3))  # n % 3 == 2 is seq % 3 == 0
    assert seqs(types=("production.*",), limit=4, tail=True) == [25, 26, 28, 29]
    assert seqs(types=(COUNT, TEMP), from_seq=25) == [25, 27, 28, 30]
    assert seqs(subjects=(OVEN,), limit=2, tail=True) == [27, 30]
    assert seqs(subjects=("acme/plant1/*",), types=(STATE,), limit=3) == [5, 8, 11]
    assert seqs(types=("nope.*",)) == []
    assert seqs(limit=10, tail=True, from_seq=29) == [29, 30]

    many = tools.read_events(directory, Selection(limit=1000))  # more than one query's chunk
    assert len(many) == 27


def test_inspect_renders_a_table_and_bodies(stopped: tuple[Path, list[DomainEvent]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    directory, pending = stopped
    assert main(["buffer", "inspect", "--dir", str(directory), "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SEQ", "TYPE", "SUBJECT", "TIME", "ID", "SIZE", "PRIORITY"]
    assert lines[1].split() == ["4", COUNT, PRESS, rfc3339(T0 + 3), pending[0].id,
                                str(len(pending[0].encode())), "normal"]
    assert len(lines) == 3

    assert main(["buffer", "inspect", "--dir", str(directory), "--tail", "--limit", "1",
                 "--body"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == "30"
    body = out[out.index("{"):]
    assert json.loads(body) == pending[-1].envelope()

    assert main(["buffer", "inspect", "--dir", str(directory), "--type", "x.*"]) == 0
    assert capsys.readouterr().out == "no events\n"


def test_inspect_default_limit_is_20(stopped: tuple[Path, list[DomainEvent]],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    directory, _ = stopped
    assert main(["buffer", "inspect", "--dir", str(directory)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 20
    assert main(["buffer", "inspect", "--dir", str(directory), "--limit", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 27


# -- export -------------------------------------------------------------------------------


def test_export_writes_the_bodies_exactly_as_stored(stopped: tuple[Path, list[DomainEvent]],
                                                    tmp_path: Path) -> None:
    directory, pending = stopped
    out = tmp_path / "out.jsonl"
    proc = cli("buffer", "export", "--dir", str(directory), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip() == f"exported 27 events to {out}"
    assert out.read_bytes() == b"".join(e.encode() + b"\n" for e in pending)


def test_export_with_seq_and_filters_to_stdout(stopped: tuple[Path, list[DomainEvent]],
                                               capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    directory, pending = stopped
    assert main(["buffer", "export", "--dir", str(directory), "--with-seq",
                 "--subject", OVEN, "--tail", "--limit", "2"]) == 0
    captured = capfdbinary.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    by_seq = {seq: e for seq, e in enumerate(pending, start=4)}
    assert [line["seq"] for line in lines] == [27, 30]
    assert [line["event"] for line in lines] == [by_seq[27].envelope(), by_seq[30].envelope()]
    assert captured.err.decode().strip() == "exported 2 events to stdout"

    sink = io.BytesIO()
    assert tools.export(directory, Selection(from_seq=30), sink, with_seq=True) == 1
    assert sink.getvalue() == b'{"seq":30,"event":' + by_seq[30].encode() + b"}\n"


def test_export_refuses_before_creating_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = cli("buffer", "export", "--dir", str(tmp_path / "none"), "-o", str(out))
    assert proc.returncode == EX_NOINPUT
    assert not out.exists()


def test_an_unwritable_output_is_exit_73(stopped: tuple[Path, list[DomainEvent]],
                                         tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    directory, _ = stopped
    target = tmp_path / "no" / "such" / "dir.jsonl"
    assert main(["buffer", "export", "--dir", str(directory), "-o", str(target)]) == 73
    err = capsys.readouterr().err
    assert err.startswith(f"digispine-gateway: buffer: cannot write {target}")
    assert err.count("\n") == 1


# -- where the buffer is ------------------------------------------------------------------


def test_directory_from_the_config_and_the_environment(stopped: tuple[Path, list[DomainEvent]],
                                                       tmp_path: Path) -> None:
    assert stopped[0] == tmp_path / "state"
    config = tmp_path / "conf" / "gateway.yaml"
    config.parent.mkdir()
    config.write_text("gateway:\n  id: gw1\nbuffer:\n  directory: ../state\n")
    proc = cli("buffer", "stats", "--json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pending_events"] == 27

    elsewhere = tmp_path / "elsewhere"
    write_buffer(elsewhere, mixed(2))
    proc = cli("buffer", "stats", "--json", "--config", str(config),
               env={"DIGISPINE_BUFFER__DIRECTORY": str(elsewhere)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pending_events"] == 2

    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  id: gw1\nbuffer:\n  when_full: sometimes\n")
    proc = cli("buffer", "stats", "--config", str(bad))
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr


def test_dir_may_name_the_buffer_file(stopped: tuple[Path, list[DomainEvent]]) -> None:
    directory, _ = stopped
    assert tools.read_stats(directory / FILE_NAME).pending_events == 27


# -- no buffer, not a buffer --------------------------------------------------------------


def test_a_missing_buffer_is_exit_66_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    proc = cli("buffer", "stats", "--dir", str(missing))
    assert proc.returncode == EX_NOINPUT == 66
    assert proc.stderr.startswith(f"digispine-gateway: buffer: no buffer at {missing / FILE_NAME}")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert not missing.exists()  # nothing created, not even the directory
    with pytest.raises(NoBuffer):
        tools.read_stats(missing)


def foreign_files(directory: Path) -> dict[str, Path]:
    """Files that are not gateway buffers, each in a directory of its own."""
    out = {}

    def place(name: str) -> Path:
        folder = directory / name
        folder.mkdir()
        out[name] = folder
        return folder / FILE_NAME

    place("text").write_text("hello, not a database\n" * 100)
    place("empty").write_bytes(b"")
    conn = sqlite3.connect(place("other_sqlite"))
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, type, subject, size, body)")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(place("no_events_table"))
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=7")
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(place("no_body_column"))
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=9")
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, type, subject, size, data)")
    conn.commit()
    conn.close()
    return out


@pytest.mark.parametrize("kind, message", [
    ("text", "is not a SQLite database, so not a gateway buffer"),
    ("empty", "is empty: not a gateway buffer (yet)"),
    ("other_sqlite", "is a SQLite database but not a gateway buffer (application_id 0x0"),
    ("no_events_table", "unknown buffer format 7: the file has no events table"),
    ("no_body_column", "unknown buffer format 9: the file lacks events.body"),
])
def test_not_a_buffer_is_exit_73_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, message: str) -> None:
    folder = foreign_files(tmp_path)[kind]
    before = snapshot(folder)
    for action in ("stats", "inspect", "export"):
        assert main(["buffer", action, "--dir", str(folder)]) == 73
        err = capsys.readouterr().err
        assert err.startswith("digispine-gateway: buffer: ") and message in err, err
        assert err.count("\n") == 1
    with pytest.raises(errors.BufferError, match=r"gateway buffer|buffer format"):
        tools.read_stats(folder)
    assert snapshot(folder) == before


def test_not_a_buffer_as_a_process(tmp_path: Path) -> None:
    folder = foreign_files(tmp_path)["text"]
    proc = cli("buffer", "inspect", "--dir", str(folder))
    assert proc.returncode == 73
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_extra_tables_columns_and_a_newer_format_are_tolerated(tmp_path: Path) -> None:
    """Tables and events columns a later gateway may add, and its format number: still read."""
    batch = mixed(4)
    write_buffer(tmp_path, batch)
    conn = sqlite3.connect(tmp_path / FILE_NAME)
    conn.execute("CREATE TABLE later_things (x)")
    conn.execute("ALTER TABLE events ADD COLUMN later_column INTEGER NOT NULL DEFAULT 0")
    conn.execute(f"PRAGMA user_version={FORMAT_VERSION + 1}")
    conn.commit()
    conn.close()

    stats = tools.read_stats(tmp_path)
    assert (stats.format, stats.pending_events) == (FORMAT_VERSION + 1, 4)
    assert [e.body for e in tools.read_events(tmp_path)] == [e.encode() for e in batch]


def test_selection_of_command_line_arguments() -> None:
    from gateway.cli import _parser

    args = _parser().parse_args(["buffer", "export", "--type", "a.*", "--type", "b.B.v1",
                                 "--subject", "s", "--from-seq", "5", "--tail"])
    assert tools.selection_of(args) == Selection(types=("a.*", "b.B.v1"), subjects=("s",),
                                                 from_seq=5, limit=None, tail=True)
    args = _parser().parse_args(["buffer", "inspect"])
    assert tools.selection_of(args) == Selection(limit=20)
