"""The durable on-disk buffer (SQLite in WAL mode).

Events accepted by the pipeline wait here until Kafka has acknowledged them; the buffer is what
lets the gateway ride out a lost uplink and a ``kill -9`` without losing an acknowledged event.

File layout (``BufferConfig.directory``)::

    buffer.sqlite3                    the database (WAL mode)
    buffer.sqlite3-wal, -shm          SQLite's write-ahead log and its index (SQLite owns them)
    buffer.lock                       flock()ed by the one process that owns the buffer
    buffer.sqlite3.corrupt-<UTC ts>   a database that could not be read, moved aside for a human

Schema (format 2, marked by ``PRAGMA application_id`` = ``0x44475742`` and
``PRAGMA user_version`` = 2; a format-1 file is upgraded in place at open, in one transaction:
its events become ``normal`` priority with ``appended`` = the upgrade time)::

    CREATE TABLE events (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT, -- delivery order; never reused
        type     TEXT    NOT NULL,                  -- CloudEvent type (topic routing)
        subject  TEXT    NOT NULL,                  -- CloudEvent subject (the Kafka key)
        size     INTEGER NOT NULL,                  -- len(body), what max_bytes counts
        body     BLOB    NOT NULL,                  -- DomainEvent.encode(): structured CloudEvent
        priority INTEGER NOT NULL DEFAULT 1,        -- 0 low, 1 normal, 2 high (when full)
        time     REAL,                              -- the event's time (for the drop report)
        appended REAL,                              -- when it was buffered (for max_age_s)
        crc      INTEGER                            -- CRC-32 of body, checked at every read
    )
    CREATE INDEX events_by_priority ON events (priority, seq)
    CREATE TABLE drops (                            -- the ledger: dropped, not yet reported
        type TEXT, reason TEXT, priority INTEGER, count INTEGER,
        first_time REAL, last_time REAL,            -- range of the dropped events' times
        PRIMARY KEY (type, reason)
    ) WITHOUT ROWID
    CREATE TABLE mapper_state (
        key         TEXT PRIMARY KEY,               -- "signal\t<subject>\t<name>" / "event\t..."
        fingerprint TEXT NOT NULL,                  -- hash of the definition the state belongs to
        state       BLOB NOT NULL                   -- the mapping engine's state dataclass as JSON
    ) WITHOUT ROWID

Invariants:

- ``seq`` grows strictly (AUTOINCREMENT keeps the high-water mark in ``sqlite_sequence``), so a
  seq never names two events, even after the table was emptied, and ``read(after_seq)`` is a
  cursor that cannot skip an event appended later.
- One ``append`` call is one transaction: after it returns every event of the call is stored
  (durable per ``sync``), or, on an exception, none is. Events that had to be dropped to honour
  ``max_bytes`` are counted and never half-written.
- The mapping engine's state is written in the same transaction as the events of the same
  readings (``append(events, state)``): after a crash the saved state is exactly the state
  that produced the buffered events, so a restart neither re-counts a counter increment nor
  forgets a transition (see :meth:`gateway.mapping.engine.Mapper.take_dirty_state`).
- An event leaves the buffer only by ``delete`` (the forwarder, after Kafka acknowledged it),
  by making room when full or by ``max_age_s``; every such drop is counted
  (``events_dropped_total{reason}``) and written to the ``drops`` ledger in the same
  transaction, so what was lost is known even across a crash. :meth:`DiskBuffer.report_drops`
  turns the ledger into one ``gateway.EventsDropped.v1`` event (and clears it) atomically.
- Making room: the lowest priority class goes first (``low``, then ``normal``, then ``high``;
  ``BufferConfig.priorities`` maps event types to classes); within a class ``when_full``
  decides: ``drop_oldest`` the oldest first (buffered, then the offered batch in order),
  ``drop_newest`` the newest first (the offered batch from its end, then buffered). The
  forwarder reads by ``seq`` only, so priorities never reorder what is sent.
- ``pending_events`` / ``pending_bytes`` equal ``count(*)`` / ``sum(size)`` of the table: they
  are recovered by a scan at ``open`` and then updated in the same place that commits.
- All SQLite work runs on one dedicated worker thread, in submission order; the event loop
  never blocks on the disk. A coroutine cancelled while waiting does not cancel its statement:
  an append may then be stored although its caller saw ``CancelledError`` (at-least-once).
- One process owns the directory (``flock`` on ``buffer.lock``): a second gateway started on
  the same state directory fails with ``BufferError`` instead of double-sending.

Durability per ``sync`` (SQLite ``PRAGMA synchronous`` in WAL mode):

- ``full``: the WAL is fsynced at every commit; an append that returned survives ``kill -9``,
  an OS crash and a power loss.
- ``normal``: commits reach the OS, not the platter; they survive ``kill -9`` (the page cache
  outlives the process), the last transactions may be lost on power loss or an OS crash; the
  database stays consistent.
- ``off``: no fsync at all; survives ``kill -9``; a power loss may lose recent events and, in
  the worst case, corrupt the file (then the recovery below applies).

Recovery at ``open``:

- A torn WAL tail (a crash mid-commit) is SQLite's business: frames without a valid commit
  record are ignored, so the last incomplete transaction simply never happened.
- A file that is not a SQLite database, or fails ``PRAGMA quick_check``, is renamed to
  ``buffer.sqlite3.corrupt-<timestamp>`` (with its WAL), logged as an error, counted
  (``buffer_corrupt_total``) and replaced by a fresh buffer: a damaged disk must not stop the
  plant's data from flowing nor crash-loop the service. Every event still readable in the old
  file is then salvaged into the new one under its seq (order holds; ``buffer.salvaged`` logs
  how many, and an upper bound of the unreadable ones; the drop ledger and the mapping state
  are copied too). The old file stays for forensics.
- A record whose body no longer matches its CRC-32 (bit rot that leaves the database valid) is
  never forwarded: :meth:`DiskBuffer.read` drops it, counts it
  (``events_dropped_total{reason="corrupt"}``), ledgers and logs it.
- A file written by a newer gateway (higher format version), or a SQLite file that is not a
  gateway buffer, is refused with ``BufferError``: that needs a human, not an automatic fix.

Deleted rows leave free pages that later appends reuse; the file keeps its high-water size (at
most about ``max_bytes`` plus SQLite overhead), which the ``max_bytes`` budget already reserves.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pydantic import Field

from gateway import errors, logs
from gateway.configbase import Strict
from gateway.metrics import Metrics
from gateway.model import DomainEvent, event_id, representable, rfc3339

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, the rest works
    fcntl = None  # type: ignore[assignment]


Priority = Literal["low", "normal", "high"]
PRIORITY_LEVELS: dict[str, int] = {"low": 0, "normal": 1, "high": 2}
PRIORITY_NAMES = {v: k for k, v in PRIORITY_LEVELS.items()}
DROPPED_TYPE = "gateway.EventsDropped.v1"
"""The report of what the buffer dropped (:meth:`DiskBuffer.report_drops`)."""


class BufferConfig(Strict):
    """Where accepted events wait for Kafka, and what happens when that space is full."""

    directory: Path = Field(default=Path("state"), examples=["/var/lib/digispine-gateway"])
    """State directory holding the buffer file (``buffer.sqlite3``); relative paths are relative
    to the working directory. systemd's ``StateDirectory=`` sets it via the environment."""
    max_bytes: int = Field(default=1_073_741_824, ge=65_536, examples=[1_073_741_824])
    """Upper bound of buffered event bytes (payloads, not counting SQLite overhead)."""
    when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    """``drop_oldest``: make room by deleting the oldest buffered events (keeps the present);
    ``drop_newest``: refuse new events (keeps the past). Every drop is counted and logged."""
    sync: Literal["full", "normal", "off"] = "full"
    """When an append is on stable storage: ``full`` fsyncs every append batch (survives kill -9
    and power loss); ``normal`` survives kill -9, may lose the last batches on power loss;
    ``off`` leaves it to the OS."""
    max_batch_events: int = Field(default=2000, ge=1)
    """Most events written in one transaction (group commit)."""
    priorities: dict[str, Priority] = Field(
        default_factory=dict,
        examples=[{"process.TemperatureStatistics.*": "low", "production.Status.v1": "low",
                   "safety.*": "high"}])
    """Event type (or a pattern, ``*`` = any characters) -> its class when the buffer is full:
    ``low`` events are dropped first, then ``normal`` ones (every type not listed), ``high``
    ones last; within a class ``when_full`` decides which go. An exact type wins over patterns,
    then the first matching pattern. ``gateway.EventsDropped.v1`` is ``high`` unless listed."""
    max_age_s: float | None = Field(default=None, gt=0, examples=[604_800])
    """Drop events that waited longer than this for Kafka (reason ``expired``, counted and
    reported like every drop); null (the default) keeps them until ``max_bytes`` forces a
    choice."""

    def priority_of(self, event_type: str) -> int:
        """The class of an event type as a number: 0 low, 1 normal, 2 high."""
        exact = self.priorities.get(event_type)
        if exact is not None:
            return PRIORITY_LEVELS[exact]
        for pattern, level in self.priorities.items():
            if "*" in pattern and fnmatch.fnmatchcase(event_type, pattern):
                return PRIORITY_LEVELS[level]
        return 2 if event_type == DROPPED_TYPE else 1


FILE_NAME = "buffer.sqlite3"
LOCK_NAME = "buffer.lock"
FORMAT_VERSION = 2
"""``PRAGMA user_version`` of the schema this code writes and reads (format 1 files, without
priorities, times and the drop ledger, are upgraded in place at open)."""
APPLICATION_ID = 0x44475742
"""``PRAGMA application_id`` marking a gateway buffer ("DGWB")."""

_SYNC = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SALVAGE_GIVE_UP_SEQS = 1_000_000
"""A failing seq range wider than this is not split further (an inner b-tree page is gone)."""
_SALVAGE_MAX_QUERIES = 50_000
"""At most this many range reads while salvaging a damaged file."""
_FULL_CLEARED_RATIO = 0.9
"""A buffer-full episode ends once pending bytes are back under this share of ``max_bytes``."""

_SCHEMA = """
CREATE TABLE events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    type     TEXT    NOT NULL,
    subject  TEXT    NOT NULL,
    size     INTEGER NOT NULL,
    body     BLOB    NOT NULL,
    priority INTEGER NOT NULL DEFAULT 1,
    time     REAL,
    appended REAL,
    crc      INTEGER
)
"""
_V2_INDEX = "CREATE INDEX IF NOT EXISTS events_by_priority ON events (priority, seq)"
_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS drops (
    type       TEXT    NOT NULL,
    reason     TEXT    NOT NULL,
    priority   INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    first_time REAL,
    last_time  REAL,
    PRIMARY KEY (type, reason)
) WITHOUT ROWID
"""
_UPGRADE_1_TO_2 = (
    "ALTER TABLE events ADD COLUMN priority INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE events ADD COLUMN time REAL",
    "ALTER TABLE events ADD COLUMN appended REAL",
    "ALTER TABLE events ADD COLUMN crc INTEGER",
)
_ADD_CRC = "ALTER TABLE events ADD COLUMN crc INTEGER"
"""For format-2 files written before the checksum existed (their events stay unchecked)."""
_COLUMNS = ("seq", "type", "subject", "size", "body", "priority", "time", "appended", "crc")
_LEDGER_ADD = """
INSERT INTO drops (type, reason, priority, count, first_time, last_time) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (type, reason) DO UPDATE SET
    count = count + excluded.count,
    first_time = min(coalesce(first_time, excluded.first_time),
                     coalesce(excluded.first_time, first_time)),
    last_time = max(coalesce(last_time, excluded.last_time),
                    coalesce(excluded.last_time, last_time))
"""
_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS mapper_state (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state       BLOB NOT NULL
) WITHOUT ROWID
"""
_INSERT = ("INSERT INTO events (type, subject, size, body, priority, time, appended, crc) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_PUT_STATE = "INSERT OR REPLACE INTO mapper_state (key, fingerprint, state) VALUES (?, ?, ?)"
_READ = ("SELECT seq, type, subject, body, crc, priority, time FROM events WHERE seq > ? "
         "ORDER BY seq LIMIT ?")

T = TypeVar("T")
Row = tuple[str, str, int, bytes, int, float, float, int]
"""An event as inserted: type, subject, size, body, priority, event time, append time, CRC-32
of the body."""
Dropped = tuple[str, int, float | None]
"""A dropped event as the ledger counts it: type, priority, event time."""
LedgerRow = tuple[str, str, int, int, float | None, float | None]
"""A ledger line: type, reason, priority, count, first and last event time."""
StateRow = tuple[str, str, bytes]
"""A mapping-engine state as stored: key, fingerprint, state (see ``mapper_state``)."""


@dataclass(frozen=True, slots=True)
class BufferedRecord:
    """One buffered event as the forwarder reads it."""

    seq: int
    type: str
    subject: str
    body: bytes
    """``DomainEvent.encode()``: the structured-mode CloudEvent JSON, byte for byte."""


@dataclass(frozen=True, slots=True)
class _Appended:
    stored: int
    dropped: int
    reason: str


class _Corrupt(errors.BufferError):
    """The database file cannot be trusted (not a database, or quick_check failed)."""


class _Store:
    """The synchronous SQLite side; every method runs on the buffer's worker thread only.

    The counters are plain ints written only by that thread; the event loop reads them
    (a single attribute read is atomic in CPython).
    """

    def __init__(self, path: Path, sync: str) -> None:
        self.path = path
        self.sync = sync
        self.conn: sqlite3.Connection | None = None
        self.pending_events = 0
        self.pending_bytes = 0
        self.last_seq = 0

    # -- open / close -------------------------------------------------------------------

    def open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn = conn
        try:
            self._configure(conn)
            self._check_format(conn)
            self._recover_counts(conn)
        except sqlite3.DatabaseError as exc:
            self.close()
            if getattr(exc, "sqlite_errorcode", None) in _CORRUPT_CODES:
                raise _Corrupt(str(exc)) from exc
            raise
        except BaseException:
            self.close()
            raise

    def _configure(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise errors.BufferError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={_SYNC[self.sync]}")
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.execute("PRAGMA cache_size=-16384")
        conn.execute("PRAGMA temp_store=MEMORY")
        check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":
            raise _Corrupt(f"quick_check: {check}")

    def _check_format(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            raise errors.BufferError(
                f"{self.path} is a SQLite database but not a gateway buffer; "
                "point buffer.directory elsewhere or move the file away")
        if version > FORMAT_VERSION:
            raise errors.BufferError(
                f"{self.path} has buffer format {version}, written by a newer gateway; this "
                f"version reads format {FORMAT_VERSION}. Run the newer gateway until the buffer "
                "is empty, or move the file away (its events are then not forwarded)")
        if app_id == 0:
            with self.transaction():
                conn.execute(_SCHEMA)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        elif version not in (1, FORMAT_VERSION) or "events" not in tables:
            raise errors.BufferError(
                f"{self.path}: unreadable buffer format {version} (tables: {sorted(tables)})")
        elif version == 1:  # in place, in one transaction: priority normal, appended = now
            with self.transaction():
                for statement in _UPGRADE_1_TO_2:
                    conn.execute(statement)
                conn.execute("UPDATE events SET appended = ?", (time.time(),))
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        columns = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
        with self.transaction():  # idempotent; a crash before the first commit left none
            if "crc" not in columns:
                conn.execute(_ADD_CRC)
            conn.execute(_V2_INDEX)
            conn.execute(_LEDGER_SCHEMA)
            conn.execute(_STATE_SCHEMA)

    def _recover_counts(self, conn: sqlite3.Connection) -> None:
        count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM events").fetchone()
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
        self.pending_events, self.pending_bytes = int(count), int(size)
        self.last_seq = int(row[0]) if row else 0

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise errors.BufferError("the buffer is not open")
        return self.conn

    # -- operations ---------------------------------------------------------------------

    def append(self, rows: list[Row], max_bytes: int, when_full: str,
               state: Sequence[StateRow] = (), refused: Sequence[Dropped] = (),
               clear_ledger: bool = False) -> _Appended:
        """Insert ``rows`` (making room per the policy), write ``state`` and count ``refused``
        (events the caller could not store: too large) in the ledger, in one transaction;
        ``clear_ledger`` empties the ledger first (the rows report it)."""
        incoming = sum(r[2] for r in rows)
        need = self.pending_bytes + incoming - max_bytes
        reason = "buffer_full_oldest" if when_full == "drop_oldest" else "buffer_full_newest"
        dropped: list[Dropped] = []
        evicted = (0, 0)
        with self.transaction() as conn:
            if clear_ledger:
                conn.execute("DELETE FROM drops")
            if need > 0:
                rows, evicted = self._make_room(conn, rows, need, when_full == "drop_oldest",
                                                dropped)
                incoming = sum(r[2] for r in rows)
            if rows:
                conn.executemany(_INSERT, rows)
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            if state:
                conn.executemany(_PUT_STATE, state)
            if dropped:
                _ledger_add(conn, dropped, reason)
            if refused:
                _ledger_add(conn, refused, "event_too_large")
        self.pending_events += len(rows) - evicted[0]
        self.pending_bytes += incoming - evicted[1]
        if rows:
            self.last_seq = int(last)
        return _Appended(len(rows), len(dropped), reason)

    def _make_room(self, conn: sqlite3.Connection, rows: list[Row], need: int, oldest: bool,
                   dropped: list[Dropped]) -> tuple[list[Row], tuple[int, int]]:
        """Drop events until ``need`` bytes are free: the lowest priority first; within one,
        the oldest (``oldest``) or the newest first, the offered ``rows`` being the newest.

        Returns the rows still to insert and (count, bytes) of the buffered events deleted;
        appends every dropped event to ``dropped``.
        """
        freed = count = size = 0
        drop_rows: set[int] = set()
        for level in (0, 1, 2):
            offered = [i for i, r in enumerate(rows) if r[4] == level]
            if not oldest:  # newest first: the offered rows, latest first, then the buffered
                for i in reversed(offered):
                    if freed >= need:
                        break
                    drop_rows.add(i)
                    freed += rows[i][2]
                    dropped.append((rows[i][0], level, rows[i][5]))
            if freed < need:
                n, b = self._evict(conn, level, need - freed, oldest, dropped)
                count, size, freed = count + n, size + b, freed + b
            if oldest:  # oldest first: the buffered above, then the offered rows in order
                for i in offered:
                    if freed >= need:
                        break
                    drop_rows.add(i)
                    freed += rows[i][2]
                    dropped.append((rows[i][0], level, rows[i][5]))
            if freed >= need:
                break
        kept = [r for i, r in enumerate(rows) if i not in drop_rows] if drop_rows else rows
        return kept, (count, size)

    def _evict(self, conn: sqlite3.Connection, level: int, need: int, oldest: bool,
               dropped: list[Dropped]) -> tuple[int, int]:
        """Delete buffered events of one priority, oldest or newest first, until ``need``
        bytes are free (or none is left); returns (count, bytes)."""
        freed = count = 0
        cutoff = None
        order = "ASC" if oldest else "DESC"
        cursor = conn.execute(
            f"SELECT seq, size, type, time FROM events WHERE priority = ? ORDER BY seq {order}",
            (level,))
        try:
            for seq, size, event_type, event_time in cursor:
                freed += size
                count += 1
                cutoff = seq
                dropped.append((event_type, level, event_time))
                if freed >= need:
                    break
        finally:
            cursor.close()  # no read statement left open across the DELETE
        if cutoff is not None:
            op = "<=" if oldest else ">="
            conn.execute(f"DELETE FROM events WHERE priority = ? AND seq {op} ?", (level, cutoff))
        return count, freed

    def expire(self, before: float) -> int:
        """Delete (and ledger) the events appended before ``before``; returns how many."""
        rows = self._conn().execute(
            "SELECT seq, size, type, priority, time FROM events WHERE appended < ? ORDER BY seq",
            (before,)).fetchall()
        if not rows:
            return 0
        with self.transaction() as conn:
            conn.execute("DELETE FROM events WHERE seq <= ? AND appended < ?",
                         (rows[-1][0], before))
            _ledger_add(conn, [(r[2], r[3], r[4]) for r in rows], "expired")
        self.pending_events -= len(rows)
        self.pending_bytes -= sum(r[1] for r in rows)
        return len(rows)

    def ledger(self) -> list[LedgerRow]:
        return self._conn().execute(
            "SELECT type, reason, priority, count, first_time, last_time FROM drops "
            "ORDER BY type, reason").fetchall()

    def oldest_appended(self) -> float | None:
        row = self._conn().execute(
            "SELECT appended FROM events ORDER BY seq LIMIT 1").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def report_drops(self, make: Callable[[list[LedgerRow]], Row], max_bytes: int,
                     when_full: str) -> tuple[int, _Appended | None]:
        """Turn the ledger into one event (``make``) and clear it, in one transaction; the
        event is appended like any other, making room by the same rules (what that drops is
        ledgered for the next report). Returns the number of dropped events reported (0: the
        ledger was empty, nothing appended) and the append's result."""
        lines = self.ledger()
        if not lines:
            return 0, None
        result = self.append([make(lines)], max_bytes, when_full, clear_ledger=True)
        return sum(line[3] for line in lines), result

    def read(self, after_seq: int, limit: int) -> tuple[list[BufferedRecord], list[int]]:
        """Records after ``after_seq``; a record whose body no longer matches its CRC-32 (bit
        rot, a bad sector) is not returned but deleted and ledgered (reason ``corrupt``) in
        its own transaction. Returns (records, seqs of the corrupt ones)."""
        rows = self._conn().execute(_READ, (after_seq, limit)).fetchall()
        out: list[BufferedRecord] = []
        bad: list[tuple[Any, ...]] = []
        crc32 = zlib.crc32
        for seq, event_type, subject, body, crc, level, event_time in rows:
            if crc is not None and crc32(body) != crc:
                bad.append((seq, event_type, level, event_time, len(body)))
                continue
            out.append(BufferedRecord(seq, event_type, subject, body))
        if bad:
            with self.transaction() as conn:
                conn.executemany("DELETE FROM events WHERE seq = ?", [(b[0],) for b in bad])
                _ledger_add(conn, [(b[1], b[2], b[3]) for b in bad], "corrupt")
            self.pending_events -= len(bad)
            self.pending_bytes -= sum(b[4] for b in bad)
        return out, [b[0] for b in bad]

    def salvage(self, source: Path) -> tuple[int, int]:
        """Copy what can still be read from a damaged buffer file into this (fresh) one:
        events with their seqs (so order holds), the drop ledger and the mapping state.

        Reads the events in seq ranges, halving a range that fails until single seqs; gives up
        on a failing range wider than :data:`_SALVAGE_GIVE_UP_SEQS` (an inner page of the
        tree is gone) or after :data:`_SALVAGE_MAX_QUERIES` queries. Returns (events copied,
        seqs unreadable); seqs that were merely deleted before cannot be told apart from lost
        ones, so the second figure is an upper bound.
        """
        try:
            src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        except sqlite3.Error:
            return 0, 0
        copied = unreadable = 0
        queries = 0
        try:
            try:
                present = {r[1] for r in src.execute("PRAGMA table_info(events)")}
                top = src.execute("SELECT max(seq) FROM events").fetchone()[0]
            except sqlite3.Error:
                return 0, 0
            if top is None:
                return 0, 0
            select = ", ".join(c if c in present else "NULL" for c in _COLUMNS)
            query = f"SELECT {select} FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq"
            ranges = [(1, int(top))]
            conn = self._conn()
            while ranges:
                lo, hi = ranges.pop()
                queries += 1
                try:
                    rows = src.execute(query, (lo, hi)).fetchall()
                except sqlite3.Error:
                    if lo == hi or queries > _SALVAGE_MAX_QUERIES or hi - lo > _SALVAGE_GIVE_UP_SEQS:
                        unreadable += hi - lo + 1
                        continue
                    mid = (lo + hi) // 2
                    ranges += [(mid + 1, hi), (lo, mid)]  # low half first
                    continue
                if rows:
                    with self.transaction():
                        conn.executemany(
                            "INSERT INTO events (seq, type, subject, size, body, priority, "
                            "time, appended, crc) VALUES (?, ?, ?, ?, ?, coalesce(?, 1), ?, "
                            "coalesce(?, strftime('%s', 'now')), ?)", rows)
                    copied += len(rows)
            for table, columns in (("drops", 6), ("mapper_state", 3)):
                try:
                    extra = src.execute(f"SELECT * FROM {table}").fetchall()
                except sqlite3.Error:
                    continue
                if extra and all(len(r) == columns for r in extra):
                    with self.transaction():
                        conn.executemany(f"INSERT OR REPLACE INTO {table} VALUES "
                                         f"({', '.join('?' * columns)})", extra)
        finally:
            src.close()
        self._recover_counts(self._conn())
        return copied, unreadable

    def load_state(self) -> list[StateRow]:
        return self._conn().execute("SELECT key, fingerprint, state FROM mapper_state").fetchall()

    def prune_state(self, keep: dict[str, str]) -> int:
        """Delete the states whose key is not in ``keep`` or whose fingerprint differs."""
        stale = [key for key, fp in self._conn().execute(
            "SELECT key, fingerprint FROM mapper_state") if keep.get(key) != fp]
        if stale:
            with self.transaction() as conn:
                conn.executemany("DELETE FROM mapper_state WHERE key = ?", ((k,) for k in stale))
        return len(stale)

    def delete(self, seqs: Sequence[int]) -> int:
        count = size = 0
        with self.transaction() as conn:
            for lo, hi in _runs(seqs):
                n, s = conn.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM events WHERE seq BETWEEN ? AND ?",
                    (lo, hi)).fetchone()
                if n:
                    conn.execute("DELETE FROM events WHERE seq BETWEEN ? AND ?", (lo, hi))
                    count, size = count + n, size + s
        self.pending_events -= count
        self.pending_bytes -= size
        return count


def _ledger_add(conn: sqlite3.Connection, dropped: Sequence[Dropped], reason: str) -> None:
    """Count dropped events per type in the ``drops`` ledger (same transaction as the drop)."""
    per_type: dict[str, list[Any]] = {}
    for event_type, level, event_time in dropped:
        line = per_type.get(event_type)
        if line is None:
            per_type[event_type] = [level, 1, event_time, event_time]
            continue
        line[1] += 1
        if event_time is not None:
            line[2] = event_time if line[2] is None else min(line[2], event_time)
            line[3] = event_time if line[3] is None else max(line[3], event_time)
    conn.executemany(_LEDGER_ADD, [(t, reason, level, n, lo, hi)
                                   for t, (level, n, lo, hi) in per_type.items()])


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of the given seqs as inclusive ``(lo, hi)`` ranges."""
    out: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


def dropped_report(gateway_id: str, lines: Sequence[LedgerRow], now: float) -> DomainEvent:
    """The ``gateway.EventsDropped.v1`` event for ledger ``lines`` (see
    :meth:`DiskBuffer.report_drops`); its id is a hash of the gateway, the lines and ``now``."""
    dropped = [{"type": t, "reason": reason, "priority": PRIORITY_NAMES.get(level, str(level)),
                "count": n, "first_time": _iso(lo), "last_time": _iso(hi)}
               for t, reason, level, n, lo, hi in lines]
    times = [x for line in lines for x in (line[4], line[5]) if x is not None]
    data = {"count": sum(line[3] for line in lines), "dropped": dropped,
            "first_time": _iso(min(times)) if times else None,
            "last_time": _iso(max(times)) if times else None}
    return DomainEvent(
        id=event_id(gateway_id, f"gateways/{gateway_id}", "events_dropped", now, "",
                    [list(line) for line in lines]),
        source=f"/gateways/{gateway_id}",
        type=DROPPED_TYPE,
        subject=f"gateways/{gateway_id}",
        time=now,
        data=data,
    )


def _iso(t: float | None) -> str | None:
    return rfc3339(t) if t is not None and representable(t) else None


class DiskBuffer:
    """The asyncio face of the buffer: every SQLite call runs on one worker thread, in order.

    Writers call :meth:`append`; the forwarder (the only reader) calls :meth:`read` after its
    cursor, :meth:`delete` once Kafka acknowledged, and :meth:`wait_for_records` to sleep until
    something new arrives. ``pending_events`` / ``pending_bytes`` / ``last_seq`` are cheap reads
    for health and metrics. Failures surface as :class:`gateway.errors.BufferError`.
    """

    def __init__(self, config: BufferConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._log = logs.get("buffer")
        self.path = Path(config.directory) / FILE_NAME
        self._store = _Store(self.path, config.sync)
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_file: IO[bytes] | None = None
        self._appended = asyncio.Event()
        self._full_since: float | None = None
        self._full_dropped = 0
        self._priority: dict[str, int] = {}
        self._unreported = True
        """Whether the ledger may hold drops not yet reported (a restart left some, or a drop
        since the last report); ``_drop_gen`` counts drops so a report cannot clear the flag of
        a drop that happened while it ran."""
        self._drop_gen = 0
        metrics.gauge("buffer_pending_events", lambda: float(self.pending_events),
                      "Events in the disk buffer not yet acknowledged by Kafka")
        metrics.gauge("buffer_pending_bytes", lambda: float(self.pending_bytes),
                      "Bytes of buffered event bodies not yet acknowledged by Kafka")
        metrics.describe("events_dropped_total", "Events dropped, by reason")

    @property
    def pending_events(self) -> int:
        return self._store.pending_events

    @property
    def pending_bytes(self) -> int:
        return self._store.pending_bytes

    @property
    def last_seq(self) -> int:
        """The highest seq ever appended (0 for a new buffer); survives deletes and restarts."""
        return self._store.last_seq

    @property
    def is_open(self) -> bool:
        return self._executor is not None

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Create or recover the buffer; raises ``BufferError`` when that needs a human."""
        if self._executor is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.BufferError(f"cannot create {self.path.parent}: {exc}") from exc
        self._lock_file = _lock(self.path.parent / LOCK_NAME)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-sqlite")
        try:
            await self._call(self._open_or_replace)
        except BaseException:
            await self._shutdown_executor()
            raise
        self._log.info("buffer.opened", path=str(self.path), sync=self._config.sync,
                       pending_events=self.pending_events, pending_bytes=self.pending_bytes,
                       last_seq=self.last_seq)

    def _open_or_replace(self) -> None:
        try:
            self._store.open()
        except _Corrupt as exc:
            moved = _move_aside(self.path)
            self._log.error("buffer.corrupt_moved_aside", path=str(self.path),
                            moved_to=str(moved), error=str(exc))
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._metrics.inc, "buffer_corrupt_total")
            self._store.open()
            copied, unreadable = self._store.salvage(moved)
            self._log.warning("buffer.salvaged", moved_to=str(moved), events=copied,
                              unreadable_seqs_at_most=unreadable)
            if copied:
                self._loop.call_soon_threadsafe(self._metrics.inc, "buffer_salvaged_events_total",
                                                copied)

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._call(self._store.close)
        finally:
            await self._shutdown_executor()
        self._log.info("buffer.closed", pending_events=self.pending_events)

    async def _shutdown_executor(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._executor is None:
            raise errors.BufferError("the buffer is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise errors.BufferError(f"{self.path}: {exc}") from exc

    # -- operations ---------------------------------------------------------------------

    async def append(self, events: Sequence[DomainEvent], state: Sequence[StateRow] = ()) -> None:
        """Store ``events`` (and the mapping state ``state`` that produced them) in one
        transaction, durable per ``sync`` when this returns.

        When the events do not fit in ``max_bytes``, events are dropped (counted, logged and
        written to the drop ledger) by priority class, then by the ``when_full`` policy: the
        oldest buffered or the newest offered first; nothing here waits for space.
        """
        rows: list[Row] = []
        refused: list[Dropped] = []
        limit = self._config.max_bytes
        now = time.time()
        priority = self._priority
        for event in events:
            body = event.encode()
            level = priority.get(event.type)
            if level is None:
                level = priority[event.type] = self._config.priority_of(event.type)
            if len(body) > limit:
                self._drop_too_large(event, len(body))
                refused.append((event.type, level, event.time))
                continue
            rows.append((event.type, event.subject, len(body), body, level, event.time, now,
                         zlib.crc32(body)))
        if rows or state or refused:
            await self._call(self._append_rows, rows, state, refused)

    def _append_rows(self, rows: list[Row], state: Sequence[StateRow],
                     refused: Sequence[Dropped]) -> None:
        result = self._store.append(rows, self._config.max_bytes, self._config.when_full, state,
                                    refused)
        # Scheduled before the awaiting coroutine resumes, and even if it was cancelled.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._appended_done, result)

    def _appended_done(self, result: _Appended) -> None:
        if result.stored:
            self._metrics.inc("buffer_appended_total", result.stored)
            self._appended.set()
        if result.dropped:
            self._metrics.inc("events_dropped_total", result.dropped, reason=result.reason)
            self._note_full(result.dropped)
            self._unreported = True
            self._drop_gen += 1

    def _note_full(self, dropped: int) -> None:
        if self._full_since is None:
            self._full_since = time.monotonic()
            self._full_dropped = 0
            self._log.warning("buffer.full", when_full=self._config.when_full, dropped=dropped,
                              max_bytes=self._config.max_bytes,
                              pending_bytes=self.pending_bytes)
        self._full_dropped += dropped

    def _drop_too_large(self, event: DomainEvent, size: int) -> None:
        self._unreported = True
        self._drop_gen += 1
        self._metrics.inc("events_dropped_total", reason="event_too_large")
        self._log.warning("buffer.event_too_large", id=event.id, type=event.type,
                          subject=event.subject, size=size, max_bytes=self._config.max_bytes)

    async def read(self, after_seq: int, limit: int) -> list[BufferedRecord]:
        """Up to ``limit`` records with ``seq > after_seq``, oldest first (fewer when some
        failed their checksum: those are dropped, counted, ledgered and logged)."""
        records, corrupt = await self._call(self._store.read, after_seq, limit)
        if corrupt:
            self._unreported = True
            self._drop_gen += 1
            self._metrics.inc("events_dropped_total", len(corrupt), reason="corrupt")
            self._log.error("buffer.corrupt_events_dropped", seqs=corrupt[:20], count=len(corrupt))
        return records

    async def expire(self, max_age_s: float | None = None) -> int:
        """Drop the events older than ``max_age_s`` (default: the configured ``max_age_s``;
        nothing when neither is set), counting them (reason ``expired``) in the metrics and
        the ledger; returns how many."""
        age = max_age_s if max_age_s is not None else self._config.max_age_s
        if age is None:
            return 0
        expired = await self._call(self._store.expire, time.time() - age)
        if expired:
            self._unreported = True
            self._drop_gen += 1
            self._metrics.inc("events_dropped_total", expired, reason="expired")
            self._log.warning("buffer.expired", dropped=expired, max_age_s=age)
        return expired

    async def ledger(self) -> list[LedgerRow]:
        """What was dropped and not yet reported: (type, reason, priority, count, first and
        last event time) per type and reason."""
        return await self._call(self._store.ledger)

    async def report_drops(self, gateway_id: str) -> int:
        """Append one ``gateway.EventsDropped.v1`` event telling the platform what the buffer
        dropped since the last report (per type and reason: how many, their priority and the
        range of their event times) and clear the ledger, atomically. It is forwarded like any
        event, after the backlog, so it arrives once the link is back. Returns the number of
        dropped events reported (0: nothing to report, nothing appended)."""
        if not self._unreported:
            return 0
        now = time.time()

        def make(lines: list[LedgerRow]) -> Row:
            event = dropped_report(gateway_id, lines, now)
            body = event.encode()
            return (event.type, event.subject, len(body), body,
                    self._config.priority_of(event.type), event.time, now, zlib.crc32(body))

        gen = self._drop_gen
        reported, result = await self._call(self._store.report_drops, make,
                                            self._config.max_bytes, self._config.when_full)
        if gen == self._drop_gen:
            self._unreported = False
        if result is not None:
            self._appended_done(result)  # the report, and what making room for it dropped
        if reported:
            self._metrics.inc("drop_reports_total")
            self._log.info("buffer.drops_reported", dropped=reported)
        return reported

    @property
    def full(self) -> bool:
        """Whether a buffer-full episode is going on (drops since it last had room)."""
        return self._full_since is not None

    async def oldest_appended(self) -> float | None:
        """When the oldest buffered event was appended (Unix seconds; None: empty)."""
        if not self.pending_events:
            return None
        return await self._call(self._store.oldest_appended)

    async def load_state(self) -> list[StateRow]:
        """Every saved mapping-engine state (start-up)."""
        return await self._call(self._store.load_state)

    async def prune_state(self, keep: dict[str, str]) -> int:
        """Forget saved states of keys not in ``keep`` (key -> fingerprint) or of another
        fingerprint (start-up and reload, after the mapper took what it could); returns how
        many were deleted."""
        return await self._call(self._store.prune_state, keep)

    async def delete(self, seqs: Sequence[int]) -> None:
        """Remove records (Kafka acknowledged them); seqs already gone are ignored."""
        if seqs:
            await self._call(self._delete_rows, seqs)

    def _delete_rows(self, seqs: Sequence[int]) -> None:
        deleted = self._store.delete(seqs)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deleted_done, deleted)

    def _deleted_done(self, deleted: int) -> None:
        if deleted:
            self._metrics.inc("buffer_deleted_total", deleted)
        if (self._full_since is not None
                and self.pending_bytes <= self._config.max_bytes * _FULL_CLEARED_RATIO):
            self._log.info("buffer.full_ended", dropped=self._full_dropped,
                           duration_s=round(time.monotonic() - self._full_since, 1),
                           pending_bytes=self.pending_bytes)
            self._full_since = None

    async def wait_for_records(self, after_seq: int, timeout_s: float | None = None) -> bool:
        """Wait until a record with ``seq > after_seq`` was appended (no polling).

        Returns at once when one already was; ``False`` when ``timeout_s`` passed first. The
        record may have been deleted since (``drop_oldest``): callers re-read, they do not
        assume.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while self.last_seq <= after_seq:
                    self._appended.clear()
                    await self._appended.wait()
        except TimeoutError:
            return False
        return True


def _lock(path: Path) -> IO[bytes]:
    """Hold an exclusive advisory lock on ``path`` for as long as the returned file is open."""
    try:
        handle = open(path, "a+b")
    except OSError as exc:
        raise errors.BufferError(f"cannot open {path}: {exc}") from exc
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise errors.BufferError(
            f"{path.parent} is in use by another gateway process (lock {path} is held); "
            "two gateways must not share one buffer") from exc
    return handle


def _move_aside(path: Path) -> Path:
    """Rename a corrupt database (and its WAL) to ``<name>.corrupt-<UTC timestamp>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    return target
