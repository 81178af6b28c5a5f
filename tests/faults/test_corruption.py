"""Damaged buffer files after a kill -9: a torn WAL tail, bytes flipped in the middle of the
database, the ``-wal``/``-shm`` files deleted.

Each time the daemon must start (no crash loop, no file for a human to delete first), say
what it found (log line, metric) and forward what it still can; new events must flow.
(gateway/buffer/disk.py, "Recovery at open".)

The buffers are written by the real daemon (Kafka cut, so everything stays buffered), then it is
SIGKILLed and the files are damaged on disk; a new generation starts with Kafka back.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    Figures,
    Generator,
    Ledger,
    Rig,
    by_label,
    counter,
    read_back,
    rig,
    scrape_metrics,
    wait_health,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DB = "buffer.sqlite3"
NEW = 50  # events published after the restart: they must all arrive



def _pending_at_least(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda h: bool(h["buffer"]["pending_events"] >= n)


async def _buffer_then_kill(r: Rig, gen: Generator, bursts: list[int]) -> None:
    """Kafka cut: start a generation, publish ``bursts`` (waiting until each one is buffered,
    so that each is its own transaction), SIGKILL it."""
    assert r.kafka_proxy is not None
    r.kafka_proxy.cut()
    gw = r.start()
    await r.ready()
    base = (await wait_health(gw, lambda h: True, 30, "health"))["buffer"]["pending_events"]
    for burst in bursts:
        gen.publish_now("m1", burst)
        base += burst
        await wait_health(gw, _pending_at_least(base), 30, f"{base} events buffered")
    await asyncio.sleep(0.3)  # let the source's acknowledgements out
    r.kill9()


def _checkpoint(state: Path) -> None:
    """Move the WAL's content into the database file, as a clean stop would."""
    conn = sqlite3.connect(state / DB)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    assert not (state / (DB + "-wal")).exists() or (state / (DB + "-wal")).stat().st_size == 0


async def _restart_and_read(r: Rig, gen: Generator, old: int,
                            expect_old: int | None = None) -> tuple[Ledger, dict[str, Any], dict[str, float]]:
    """Kafka back, a new generation on the damaged state, ``NEW`` more events; returns the
    ledger of everything read back (``old`` earlier events may or may not arrive), the health
    and /metrics of the new generation."""
    assert r.kafka_proxy is not None
    r.kafka_proxy.restore()
    gw = r.start()  # the persistent session queues NEW until the source is back
    gen.publish_now("m1", NEW)
    gen.wait_acknowledged(30)
    new = {("m1", n) for n in range(old + 1, old + NEW + 1)}
    ledger = Ledger(r.subjects(), gen.produced(), new)
    await read_back(r.bootstrap, r.topic, ledger, quiet_s=1, timeout_s=60,
                    done=lambda led: not led.missing and (
                        expect_old is None or led.distinct >= expect_old + NEW))
    h = await wait_health(gw, lambda h: h["buffer"]["pending_events"] == 0, 30, "buffer empty")
    metrics = scrape_metrics(gw)
    assert gw.proc.poll() is None, gw.tail()
    assert gw.terminate() == 0, gw.tail()
    return ledger, h, metrics


def _old_delivered(ledger: Ledger, old: int) -> list[int]:
    return sorted(n for (_, n) in ledger.first if n <= old)


async def test_torn_wal_tail(tmp_path: Path, figures: Figures) -> None:
    """The WAL loses its last bytes (a torn last commit): SQLite ignores the incomplete
    transaction; the daemon starts, forwards the events before it, and new ones flow."""
    started = time.monotonic()
    with rig(tmp_path, ["m1"], needs_kafka_proxy=True) as r:
        gen = Generator(r.publish_port, r.prefix, ["m1"], rate=1e9)
        try:
            await _buffer_then_kill(r, gen, [50, 50, 50, 50])
            wal = r.state / (DB + "-wal")
            size = wal.stat().st_size
            assert size > 0, "no WAL after kill -9: nothing to tear"
            os.truncate(wal, size - 1000)  # inside the last frame: its commit record is gone
            ledger, _, _ = await _restart_and_read(r, gen, 200)
        finally:
            gen.close()
    delivered = _old_delivered(ledger, 200)
    opened = r.events_logged("buffer.opened")[-1]
    figures(wal_bytes=size, torn_bytes=1000, old_acknowledged=200, old_delivered=len(delivered),
            lost_with_torn_commit=200 - len(delivered), reopened_pending=opened.get(
                "pending_events"), new_delivered=NEW - len(ledger.missing),
            records=ledger.records, total_s=round(time.monotonic() - started, 1))
    ledger.assert_clean("torn WAL tail")
    k = len(delivered)
    assert delivered == list(range(1, k + 1)), "the survivors are not a prefix"
    assert 150 <= k < 200, f"expected the last burst's commit (only) to be torn, {k} survived"
    assert opened.get("pending_events") == k


def _page_size(db: Path) -> int:
    with open(db, "rb") as f:
        head = f.read(100)
    size = int.from_bytes(head[16:18], "big")
    return 65536 if size == 1 else size


def _flip(path: Path, offset: int, length: int) -> None:
    """Invert ``length`` bytes at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _leaf_pages(db: Path) -> list[int]:
    """0-based indexes of the table b-tree leaf pages (type 0x0D) after page 1."""
    ps = _page_size(db)
    data = db.read_bytes()
    return [i for i in range(1, len(data) // ps) if data[i * ps] == 0x0D]


async def test_flipped_bytes_in_a_middle_page(tmp_path: Path, figures: Figures) -> None:
    """Bytes flipped in the middle of the database (the header of a middle b-tree page): the
    daemon moves the file aside (``buffer.corrupt_moved_aside``, ``buffer_corrupt_total``),
    salvages every event the other pages still hold into a fresh buffer, and new events flow."""
    started = time.monotonic()
    with rig(tmp_path, ["m1"], needs_kafka_proxy=True) as r:
        gen = Generator(r.publish_port, r.prefix, ["m1"], rate=1e9)
        try:
            await _buffer_then_kill(r, gen, [100, 100, 100])
            db = r.state / DB
            _checkpoint(r.state)
            leaves = _leaf_pages(db)
            assert len(leaves) >= 5, f"too few pages to pick a middle one: {leaves}"
            page = leaves[len(leaves) // 2]
            ps = _page_size(db)
            _flip(db, page * ps, 12)
            ledger, _, metrics = await _restart_and_read(r, gen, 300)
        finally:
            gen.close()
    moved = r.events_logged("buffer.corrupt_moved_aside")
    aside = sorted(p.name for p in r.state.iterdir() if ".corrupt-" in p.name)
    delivered = _old_delivered(ledger, 300)
    figures(pages=db.stat().st_size // ps, flipped_page=page, old_acknowledged=300,
            old_delivered=len(delivered), moved_aside=aside,
            corrupt_total=int(metrics.get("buffer_corrupt_total", 0)),
            new_delivered=NEW - len(ledger.missing), records=ledger.records,
            total_s=round(time.monotonic() - started, 1))
    ledger.assert_clean("flipped page header")
    assert moved, "no buffer.corrupt_moved_aside logged"
    assert metrics.get("buffer_corrupt_total") == 1
    assert aside, "the damaged file was not kept for forensics"
    # what the other pages hold is salvaged: one leaf page holds a dozen or so events
    assert len(delivered) >= 300 - 40, f"only {len(delivered)} of 300 salvaged"
    assert metrics.get("buffer_salvaged_events_total", 0) >= len(delivered)


def _flip_in_body(db: Path, old: bytes, new: bytes) -> int:
    """Replace ``old`` by ``new`` (same length) wherever it is in the file; returns how often."""
    assert len(old) == len(new)
    data = db.read_bytes()
    count = data.count(old)
    db.write_bytes(data.replace(old, new))
    return count


async def test_flipped_bytes_break_one_event(tmp_path: Path, figures: Figures) -> None:
    """A flipped byte makes one buffered event unreadable (not JSON any more) while the file
    stays a valid database: that event is dropped, counted and logged; the others arrive."""
    started = time.monotonic()
    with rig(tmp_path, ["m1"], needs_kafka_proxy=True) as r:
        gen = Generator(r.publish_port, r.prefix, ["m1"], rate=1e9)
        try:
            await _buffer_then_kill(r, gen, [100, 100, 100])
            _checkpoint(r.state)
            hits = _flip_in_body(r.state / DB, b'{"n":57,', b'\xff"n":57,')
            assert hits == 1, f"found the body of n=57 {hits} times"
            ledger, _, metrics = await _restart_and_read(r, gen, 300, expect_old=299)
        finally:
            gen.close()
    delivered = _old_delivered(ledger, 300)
    # Dropped (events_dropped_total) or replaced by a dead letter (events_dead_lettered_total):
    # either way accounted for, once.
    accounted = {k: v for k, v in metrics.items()
                 if k.startswith(("events_dropped_total", "events_dead_lettered_total"))}
    logged = [e for e in r.log_records() if e.get("level") in ("warning", "error")
              and e.get("component") in ("kafka", "buffer") and e.get("event") not in (
                  "kafka.unreachable",)]
    figures(old_acknowledged=300, old_delivered=len(delivered), accounted=accounted,
            corrupt_total=int(metrics.get("buffer_corrupt_total", 0)),
            new_delivered=NEW - len(ledger.missing), records=ledger.records,
            logged=[e.get("event") for e in logged], total_s=round(time.monotonic() - started, 1))
    ledger.assert_clean("flipped byte in one body")
    assert delivered == [n for n in range(1, 301) if n != 57]
    assert sum(accounted.values()) == 1, accounted
    assert logged, "the unreadable event was not logged"


async def test_flipped_digit_is_not_forwarded_as_data(tmp_path: Path,
                                                      figures: Figures) -> None:
    """A flipped byte that keeps the body valid JSON but changes its data (bit rot in a digit):
    the altered event must not reach Kafka as if it were real."""
    with rig(tmp_path, ["m1"], needs_kafka_proxy=True) as r:
        gen = Generator(r.publish_port, r.prefix, ["m1"], rate=1e9)
        try:
            await _buffer_then_kill(r, gen, [100, 100, 100])
            _checkpoint(r.state)
            hits = _flip_in_body(r.state / DB, b'{"n":158,', b'{"n":958,')
            assert hits == 1, f"found the body of n=158 {hits} times"
            ledger, _, metrics = await _restart_and_read(r, gen, 300, expect_old=299)
        finally:
            gen.close()
    altered = [u for u in ledger.unknown if "n=958" in u]
    figures(altered_forwarded=len(altered), never_produced=ledger.unknown[:2],
            dropped=by_label(metrics, "events_dropped_total", "reason"))
    assert not ledger.unknown, f"altered events reached Kafka as data: {ledger.unknown}"
    assert by_label(metrics, "events_dropped_total", "reason").get("corrupt") == 1


@pytest.mark.parametrize("deleted", ["wal+shm", "shm"])
async def test_deleted_wal_files(tmp_path: Path, figures: Figures, deleted: str) -> None:
    """``-wal`` and ``-shm`` (or only ``-shm``) deleted after a kill -9: the daemon starts on
    what the database file holds; the committed transactions that lived only in the deleted
    WAL are gone (SQLite cannot know them), everything else arrives, new events flow."""
    started = time.monotonic()
    with rig(tmp_path, ["m1"], needs_kafka_proxy=True) as r:
        gen = Generator(r.publish_port, r.prefix, ["m1"], rate=1e9)
        try:
            await _buffer_then_kill(r, gen, [100])
            _checkpoint(r.state)  # 1..100 now in the database file
            await _buffer_then_kill(r, gen, [50, 50])  # 101..200 only in the WAL
            removed = []
            for suffix in (["-wal", "-shm"] if deleted == "wal+shm" else ["-shm"]):
                path = r.state / (DB + suffix)
                if path.exists():
                    os.unlink(path)
                    removed.append(suffix)
            expect_old = 100 if deleted == "wal+shm" else 200
            ledger, h, metrics = await _restart_and_read(r, gen, 200, expect_old=expect_old)
        finally:
            gen.close()
    delivered = _old_delivered(ledger, 200)
    opened = r.events_logged("buffer.opened")[-1]
    figures(deleted=removed, old_acknowledged=200, old_delivered=len(delivered),
            lost=200 - len(delivered), reopened_pending=opened.get("pending_events"),
            corrupt_total=int(metrics.get("buffer_corrupt_total", 0)),
            new_delivered=NEW - len(ledger.missing), records=ledger.records,
            total_s=round(time.monotonic() - started, 1))
    ledger.assert_clean(f"deleted {deleted}")
    assert delivered == list(range(1, expect_old + 1))
    assert opened.get("pending_events") == expect_old
    assert counter(h, "buffer_corrupt_total") == 0
