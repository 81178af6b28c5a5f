"""The disk buffer on a real file system: order, persistence, limits, recovery, crash safety."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway import errors
from gateway.buffer.disk import (
    FILE_NAME,
    FORMAT_VERSION,
    BufferConfig,
    BufferedRecord,
    DiskBuffer,
)
from gateway.metrics import Metrics
from gateway.model import DomainEvent, EventIds, decode_envelope

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
_ids = EventIds()


def event(n: int, subject: str = "acme/plant1/press1", size: int = 0,
          type_: str = "production.CountChanged.v1") -> DomainEvent:
    data: dict[str, object] = {"n": n}
    if size:
        data["pad"] = "x" * size
    return DomainEvent(id=_ids.next(), source="digispine-gateway/gw1/plc", type=type_,
                       subject=subject, time=1_700_000_000.0 + n, data=data)


def events(start: int, count: int, **kw: object) -> list[DomainEvent]:
    return [event(n, **kw) for n in range(start, start + count)]  # type: ignore[arg-type]


def config(directory: Path, **kw: object) -> BufferConfig:
    return BufferConfig(directory=directory, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[DiskBuffer]:
    buf = DiskBuffer(config(tmp_path), Metrics())
    await buf.open()
    yield buf
    await buf.close()


async def read_all(buf: DiskBuffer) -> list[BufferedRecord]:
    return await buf.read(0, 1_000_000)


def ns(records: list[BufferedRecord]) -> list[int]:
    return [decode_envelope(r.body)["data"]["n"] for r in records]


# -- basic contract ----------------------------------------------------------------------


async def test_append_read_delete_keeps_order_and_counts(buffer: DiskBuffer) -> None:
    batch = events(0, 10)
    await buffer.append(batch)

    records = await read_all(buffer)
    assert [r.seq for r in records] == list(range(1, 11))
    assert [r.body for r in records] == [e.encode() for e in batch]
    assert (records[0].type, records[0].subject) == (batch[0].type, batch[0].subject)
    assert buffer.pending_events == 10
    assert buffer.pending_bytes == sum(len(e.encode()) for e in batch)

    await buffer.delete([1, 2, 3, 99])  # 99 never existed: ignored
    assert ns(await read_all(buffer)) == list(range(3, 10))
    assert buffer.pending_events == 7
    assert buffer.pending_bytes == sum(len(e.encode()) for e in batch[3:])


async def test_read_after_cursor_with_limit(buffer: DiskBuffer) -> None:
    await buffer.append(events(0, 20))
    first = await buffer.read(0, 5)
    second = await buffer.read(first[-1].seq, 5)
    assert [r.seq for r in first] == [1, 2, 3, 4, 5]
    assert [r.seq for r in second] == [6, 7, 8, 9, 10]
    assert await buffer.read(20, 5) == []


async def test_empty_append_is_a_no_op(buffer: DiskBuffer) -> None:
    await buffer.append([])
    assert buffer.pending_events == 0
    assert buffer.last_seq == 0


async def test_persists_across_close_and_reopen_and_never_reuses_seqs(tmp_path: Path) -> None:
    metrics = Metrics()
    buf = DiskBuffer(config(tmp_path), metrics)
    await buf.open()
    batch = events(0, 50)
    await buf.append(batch)
    before = await read_all(buf)
    await buf.close()

    again = DiskBuffer(config(tmp_path), Metrics())
    await again.open()
    after = await read_all(again)
    assert after == before
    assert [decode_envelope(r.body)["id"] for r in after] == [e.id for e in batch]
    assert (again.pending_events, again.pending_bytes) == (50, sum(len(e.encode()) for e in batch))

    await again.delete([r.seq for r in after])
    await again.close()
    third = DiskBuffer(config(tmp_path), Metrics())
    await third.open()
    await third.append(events(100, 1))
    assert [r.seq for r in await read_all(third)] == [51]  # the emptied table kept its high-water
    await third.close()


async def test_counters_and_gauges(tmp_path: Path) -> None:
    metrics = Metrics()
    buf = DiskBuffer(config(tmp_path), metrics)
    await buf.open()
    await buf.append(events(0, 5))
    await buf.delete([1, 2])
    assert metrics.value("buffer_appended_total") == 5
    assert metrics.value("buffer_deleted_total") == 2
    snap = metrics.snapshot()
    assert snap["buffer_pending_events"] == 3
    assert snap["buffer_pending_bytes"] == buf.pending_bytes > 0
    await buf.close()


# -- limits ------------------------------------------------------------------------------


async def test_drop_oldest_makes_room_counts_and_logs_once(tmp_path: Path) -> None:
    metrics = Metrics()
    with capture_logs() as logs:
        buf = DiskBuffer(config(tmp_path, max_bytes=65_536, when_full="drop_oldest"), metrics)
        await buf.open()
        size = len(event(0, size=1000).encode())
        fits, total = 65_536 // size, 300
        for start in range(0, total, 10):
            await buf.append(events(start, 10, size=1000))
    kept = await read_all(buf)
    assert buf.pending_bytes <= 65_536
    assert len(kept) == fits
    assert ns(kept) == list(range(total - fits, total))  # the newest survive, in order
    dropped = metrics.value("events_dropped_total", reason="buffer_full_oldest")
    assert dropped == total - fits
    assert [e["event"] for e in logs].count("buffer.full") == 1

    with capture_logs() as logs:
        await buf.delete([r.seq for r in kept])
    ended = [e for e in logs if e["event"] == "buffer.full_ended"]
    assert len(ended) == 1 and ended[0]["dropped"] == dropped  # the whole episode's count
    await buf.close()


async def test_drop_oldest_batch_larger_than_the_buffer_keeps_its_newest(tmp_path: Path) -> None:
    metrics = Metrics()
    buf = DiskBuffer(config(tmp_path, max_bytes=65_536, when_full="drop_oldest"), metrics)
    await buf.open()
    await buf.append(events(0, 5, size=1000))
    await buf.append(events(5, 200, size=1000))
    kept = ns(await read_all(buf))
    assert kept == list(range(205 - len(kept), 205))
    assert metrics.value("events_dropped_total", reason="buffer_full_oldest") == 205 - len(kept)
    await buf.close()


async def test_drop_newest_refuses_what_does_not_fit(tmp_path: Path) -> None:
    metrics = Metrics()
    buf = DiskBuffer(config(tmp_path, max_bytes=65_536, when_full="drop_newest"), metrics)
    await buf.open()
    size = len(event(0, size=1000).encode())
    fits, total = 65_536 // size, 200
    for start in range(0, total, 10):
        await buf.append(events(start, 10, size=1000))
    kept = await read_all(buf)
    assert ns(kept) == list(range(fits))  # the oldest survive
    assert metrics.value("events_dropped_total", reason="buffer_full_newest") == total - fits
    assert metrics.value("events_dropped_total", reason="buffer_full_oldest") == 0

    await buf.delete([r.seq for r in kept[:10]])  # space again: new events are taken
    await buf.append(events(1000, 1, size=1000))
    assert ns(await read_all(buf))[-1] == 1000
    await buf.close()


async def test_event_larger_than_the_buffer_is_dropped_alone(tmp_path: Path) -> None:
    metrics = Metrics()
    buf = DiskBuffer(config(tmp_path, max_bytes=65_536), metrics)
    await buf.open()
    with capture_logs() as logs:
        await buf.append([event(1), event(2, size=70_000), event(3)])
    assert ns(await read_all(buf)) == [1, 3]
    assert metrics.value("events_dropped_total", reason="event_too_large") == 1
    assert [e["event"] for e in logs] == ["buffer.event_too_large"]
    await buf.close()


# -- recovery ----------------------------------------------------------------------------


async def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"this is not a database" * 500)
    metrics = Metrics()
    with capture_logs() as logs:
        buf = DiskBuffer(config(tmp_path), metrics)
        await buf.open()
    aside = list(tmp_path.glob(f"{FILE_NAME}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
    assert metrics.value("buffer_corrupt_total") == 1
    assert any(e["event"] == "buffer.corrupt_moved_aside" and e["log_level"] == "error"
               for e in logs)
    await buf.append(events(0, 3))  # the fresh buffer works
    assert ns(await read_all(buf)) == [0, 1, 2]
    await buf.close()


async def test_a_database_with_damaged_pages_is_moved_aside(tmp_path: Path) -> None:
    buf = DiskBuffer(config(tmp_path), Metrics())
    await buf.open()
    await buf.append(events(0, 500, size=200))
    await buf.close()
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(2 * page, len(data), page):  # keep the header page, scribble on the rest
        data[offset:offset + 64] = os.urandom(64)
    path.write_bytes(bytes(data))

    metrics = Metrics()
    again = DiskBuffer(config(tmp_path), metrics)
    await again.open()
    assert metrics.value("buffer_corrupt_total") == 1
    assert again.pending_events == 0
    await again.close()


async def test_one_damaged_page_loses_only_its_events(tmp_path: Path) -> None:
    """The file fails quick_check and is moved aside, but every event still readable in it is
    salvaged into the fresh buffer, in order, under its seq; the rest is counted."""
    buf = DiskBuffer(config(tmp_path), Metrics())
    await buf.open()
    await buf.append(events(0, 600, size=200))
    await buf.close()
    path = tmp_path / FILE_NAME
    data = bytearray(path.read_bytes())
    page = 4096
    leaves = [i for i in range(1, len(data) // page) if data[i * page] == 0x0D]
    middle = leaves[len(leaves) // 2]
    data[middle * page:middle * page + 12] = b"\xff" * 12  # a leaf page header
    path.write_bytes(bytes(data))

    metrics = Metrics()
    again = DiskBuffer(config(tmp_path), metrics)
    with capture_logs() as logs:
        await again.open()
    try:
        records = await read_all(again)
        kept = ns(records)
        assert metrics.value("buffer_corrupt_total") == 1
        assert 500 < len(kept) < 600  # one page of ~15 events is gone, nothing else
        assert kept == sorted(kept) and set(kept) <= set(range(600))
        assert [r.seq for r in records] == [n + 1 for n in kept]  # seqs kept
        assert metrics.value("buffer_salvaged_events_total") == len(kept)
        salvaged = [e for e in logs if e["event"] == "buffer.salvaged"]
        assert salvaged and salvaged[0]["events"] == len(kept)
        assert salvaged[0]["unreadable_seqs_at_most"] >= 600 - len(kept)
        await again.append(events(1000, 1))  # and new events go after them
        assert (await read_all(again))[-1].seq == 601
    finally:
        await again.close()


async def test_a_body_that_fails_its_checksum_is_dropped_and_counted(tmp_path: Path) -> None:
    """Bit rot inside a body that leaves valid JSON (a digit) must not reach Kafka as data."""
    buf = DiskBuffer(config(tmp_path), Metrics())
    await buf.open()
    await buf.append(events(0, 300))
    await buf.close()
    path = tmp_path / FILE_NAME
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    assert data.count(b'"n":158}') == 1
    path.write_bytes(data.replace(b'"n":158}', b'"n":958}'))

    metrics = Metrics()
    again = DiskBuffer(config(tmp_path), metrics)
    await again.open()
    try:
        with capture_logs() as logs:
            kept = ns(await read_all(again))
        assert kept == [n for n in range(300) if n != 158]
        assert again.pending_events == 299
        assert metrics.value("events_dropped_total", reason="corrupt") == 1
        assert [e["event"] for e in logs] == ["buffer.corrupt_events_dropped"]
        assert [(t, r, n) for t, r, _, n, _, _ in await again.ledger()] == [
            ("production.CountChanged.v1", "corrupt", 1)]
    finally:
        await again.close()


async def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    buf = DiskBuffer(config(tmp_path), Metrics())
    await buf.open()
    await buf.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        conn.execute(f"PRAGMA user_version={FORMAT_VERSION + 1}")
    with pytest.raises(errors.BufferError, match="newer gateway"):
        await DiskBuffer(config(tmp_path), Metrics()).open()
    assert not list(tmp_path.glob("*.corrupt-*"))  # refused, not moved: a human decides


async def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER)")
    with pytest.raises(errors.BufferError, match="not a gateway buffer"):
        await DiskBuffer(config(tmp_path), Metrics()).open()


async def test_a_second_owner_of_the_directory_is_refused(buffer: DiskBuffer, tmp_path: Path) -> None:
    with pytest.raises(errors.BufferError, match="in use by another gateway"):
        await DiskBuffer(config(tmp_path), Metrics()).open()


async def test_the_directory_is_created(tmp_path: Path) -> None:
    buf = DiskBuffer(config(tmp_path / "a" / "b"), Metrics())
    await buf.open()
    assert (tmp_path / "a" / "b" / FILE_NAME).exists()
    await buf.close()


@pytest.mark.parametrize(("sync", "pragma"), [("full", 2), ("normal", 1), ("off", 0)])
async def test_sync_modes_open_in_wal(tmp_path: Path, sync: str, pragma: int) -> None:
    buf = DiskBuffer(config(tmp_path, sync=sync), Metrics())
    await buf.open()
    await buf.append(events(0, 3))
    conn = buf._store.conn  # the pragma is per connection: ask the buffer's own
    assert conn is not None
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == pragma
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await buf.close()


async def test_operations_on_a_closed_buffer_raise_buffer_error(tmp_path: Path) -> None:
    buf = DiskBuffer(config(tmp_path), Metrics())
    with pytest.raises(errors.BufferError, match="not open"):
        await buf.append(events(0, 1))
    await buf.open()
    await buf.close()
    with pytest.raises(errors.BufferError, match="not open"):
        await buf.read(0, 10)


# -- concurrency -------------------------------------------------------------------------


async def test_appends_while_reading_and_deleting_lose_nothing(buffer: DiskBuffer) -> None:
    total, seen = 2000, []

    async def writer() -> None:
        for start in range(0, total, 50):
            await buffer.append(events(start, 50))
            await asyncio.sleep(0)

    async def reader() -> None:
        cursor = 0
        while len(seen) < total:
            records = await buffer.read(cursor, 70)
            if not records:
                assert await buffer.wait_for_records(cursor, timeout_s=5)
                continue
            seen.extend(ns(records))
            cursor = records[-1].seq
            await buffer.delete([r.seq for r in records])

    await asyncio.gather(writer(), reader())
    assert seen == list(range(total))
    assert buffer.pending_events == 0 and buffer.pending_bytes == 0


async def test_wait_for_records_wakes_on_append_and_times_out(buffer: DiskBuffer) -> None:
    assert await buffer.wait_for_records(0, timeout_s=0.05) is False
    waiter = asyncio.create_task(buffer.wait_for_records(0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await buffer.append(events(0, 1))
    assert await asyncio.wait_for(waiter, 2) is True
    assert await buffer.wait_for_records(0, timeout_s=0) is True  # already there: no wait


# -- crash safety ------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from gateway import logs
    from gateway.buffer.disk import BufferConfig, DiskBuffer
    from gateway.metrics import Metrics
    from gateway.model import DomainEvent, EventIds

    async def main(directory: str, sync: str) -> None:
        logs.configure("error", "json", sys.stderr)
        buf = DiskBuffer(BufferConfig(directory=Path(directory), sync=sync), Metrics())
        await buf.open()
        ids, n = EventIds(), 0
        while True:
            batch = [DomainEvent(id=ids.next(), source="s", type="t.T.v1", subject=f"a{i % 7}",
                                 time=1.0, data={"n": n + i, "pad": "p" * 200}) for i in range(200)]
            await buf.append(batch)
            n += len(batch)
            print(buf.last_seq, n, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_kill_9_mid_stream_loses_no_returned_append(tmp_path: Path, sync: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), sync],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while len(lines) < 25 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        lines.append(line)
    child.send_signal(signal.SIGKILL)  # mid-stream: the child is inside some append
    rest, err = child.communicate(timeout=10)
    lines += rest.splitlines()  # what it printed before it died
    assert len(lines) >= 25, err
    last_seq, count = map(int, lines[-1].split())
    asyncio.run(check_recovered(tmp_path, sync, last_seq, count))


async def check_recovered(directory: Path, sync: str, last_seq: int, count: int) -> None:
    buf = DiskBuffer(config(directory, sync=sync), Metrics())
    await buf.open()
    records = await read_all(buf)
    seqs = {r.seq for r in records}
    assert set(range(1, last_seq + 1)) <= seqs  # every append that returned is there
    assert buf.pending_events >= count
    assert len(seqs) % 200 == 0  # whole transactions only, never a torn batch
    assert ns(records) == list(range(len(records)))  # readable, in order
    await buf.close()
