"""The durable on-disk buffer (SQLite in WAL mode).

Events accepted by the pipeline wait here until Kafka has acknowledged them; the buffer is what
lets the gateway ride out a lost uplink and a ``kill -9`` without losing an acknowledged event.

File layout (``BufferConfig.directory``)::

    buffer.sqlite3                    the database (WAL mode)
    buffer.sqlite3-wal, -shm          SQLite's write-ahead log and its index (SQLite owns them)
    buffer.lock                       flock()ed by the one process that owns the buffer
    buffer.sqlite3.corrupt-<UTC ts>   a database that could not be read, moved aside for a human

Schema (format 1, marked by ``PRAGMA application_id`` = ``0x44475742`` and
``PRAGMA user_version`` = 1)::

    CREATE TABLE events (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,  -- delivery order; never reused
        type    TEXT    NOT NULL,                   -- CloudEvent type (topic routing)
        subject TEXT    NOT NULL,                   -- CloudEvent subject (the Kafka key)
        size    INTEGER NOT NULL,                   -- len(body), what max_bytes counts
        body    BLOB    NOT NULL                    -- DomainEvent.encode(): structured CloudEvent
    )
    CREATE TABLE mapper_state (                     -- added in place to format-1 files at open
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
- An event leaves the buffer only by ``delete`` (the forwarder, after Kafka acknowledged it) or
  by the ``when_full`` policy (counted in ``events_dropped_total``).
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
  plant's data from flowing nor crash-loop the service. The old file stays for forensics.
- A file written by a newer gateway (higher format version), or a SQLite file that is not a
  gateway buffer, is refused with ``BufferError``: that needs a human, not an automatic fix.

Deleted rows leave free pages that later appends reuse; the file keeps its high-water size (at
most about ``max_bytes`` plus SQLite overhead), which the ``max_bytes`` budget already reserves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, TypeVar

from pydantic import Field

from gateway import errors, logs
from gateway.configbase import Strict
from gateway.metrics import Metrics
from gateway.model import DomainEvent

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, the rest works
    fcntl = None  # type: ignore[assignment]


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


FILE_NAME = "buffer.sqlite3"
LOCK_NAME = "buffer.lock"
FORMAT_VERSION = 1
"""``PRAGMA user_version`` of the schema this code writes and reads."""
APPLICATION_ID = 0x44475742
"""``PRAGMA application_id`` marking a gateway buffer ("DGWB")."""

_SYNC = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_FULL_CLEARED_RATIO = 0.9
"""A buffer-full episode ends once pending bytes are back under this share of ``max_bytes``."""

_SCHEMA = """
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    type    TEXT    NOT NULL,
    subject TEXT    NOT NULL,
    size    INTEGER NOT NULL,
    body    BLOB    NOT NULL
)
"""
_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS mapper_state (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state       BLOB NOT NULL
) WITHOUT ROWID
"""
_INSERT = "INSERT INTO events (type, subject, size, body) VALUES (?, ?, ?, ?)"
_PUT_STATE = "INSERT OR REPLACE INTO mapper_state (key, fingerprint, state) VALUES (?, ?, ?)"
_READ = "SELECT seq, type, subject, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?"

T = TypeVar("T")
Row = tuple[str, str, int, bytes]
"""An event as inserted: type, subject, size, body."""
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
    dropped_oldest: int
    dropped_newest: int


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
        elif version != FORMAT_VERSION or "events" not in tables:
            raise errors.BufferError(
                f"{self.path}: unreadable buffer format {version} (tables: {sorted(tables)})")
        if "mapper_state" not in tables:  # additive: older gateways ignore the table
            with self.transaction():
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
               state: Sequence[StateRow] = ()) -> _Appended:
        incoming = sum(r[2] for r in rows)
        dropped_new = dropped_old = 0
        evict_bytes = self.pending_bytes + incoming - max_bytes
        if evict_bytes > 0 and when_full == "drop_newest":
            rows, dropped_new = _fitting_prefix(rows, max_bytes - self.pending_bytes)
            incoming, evict_bytes = sum(r[2] for r in rows), 0
        elif incoming > max_bytes:  # drop_oldest, and the batch alone is too big: keep its tail
            rows, dropped_old = _fitting_tail(rows, max_bytes)
            incoming = sum(r[2] for r in rows)
            evict_bytes = self.pending_bytes + incoming - max_bytes
        evicted = (0, 0)
        with self.transaction() as conn:
            if evict_bytes > 0:
                evicted = self._evict_oldest(conn, evict_bytes)
            if rows:
                conn.executemany(_INSERT, rows)
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            if state:
                conn.executemany(_PUT_STATE, state)
        self.pending_events += len(rows) - evicted[0]
        self.pending_bytes += incoming - evicted[1]
        if rows:
            self.last_seq = int(last)
        return _Appended(len(rows), dropped_old + evicted[0], dropped_new)

    def _evict_oldest(self, conn: sqlite3.Connection, need: int) -> tuple[int, int]:
        """Delete the oldest rows until ``need`` bytes are free; returns (rows, bytes)."""
        freed = count = 0
        cutoff = None
        oldest = conn.execute("SELECT seq, size FROM events ORDER BY seq")
        try:
            for seq, size in oldest:
                freed += size
                count += 1
                cutoff = seq
                if freed >= need:
                    break
        finally:
            oldest.close()  # no read statement left open across the DELETE
        if cutoff is not None:
            conn.execute("DELETE FROM events WHERE seq <= ?", (cutoff,))
        return count, freed

    def read(self, after_seq: int, limit: int) -> list[BufferedRecord]:
        rows = self._conn().execute(_READ, (after_seq, limit)).fetchall()
        return [BufferedRecord(*row) for row in rows]

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


def _fitting_prefix(rows: list[Row], room: int) -> tuple[list[Row], int]:
    """The longest prefix of ``rows`` within ``room`` bytes, and how many rows were left out."""
    used = 0
    for i, row in enumerate(rows):
        used += row[2]
        if used > room:
            return rows[:i], len(rows) - i
    return rows, 0


def _fitting_tail(rows: list[Row], room: int) -> tuple[list[Row], int]:
    """The longest suffix of ``rows`` within ``room`` bytes, and how many rows were left out."""
    used = 0
    for i in range(len(rows) - 1, -1, -1):
        used += rows[i][2]
        if used > room:
            return rows[i + 1:], i + 1
    return rows, 0


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of the given seqs as inclusive ``(lo, hi)`` ranges."""
    out: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


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

        When the events do not fit in ``max_bytes`` the ``when_full`` policy drops (and counts)
        the oldest buffered or the newest offered events; nothing here waits for space.
        """
        rows: list[Row] = []
        limit = self._config.max_bytes
        for event in events:
            body = event.encode()
            if len(body) > limit:
                self._drop_too_large(event, len(body))
                continue
            rows.append((event.type, event.subject, len(body), body))
        if rows or state:
            await self._call(self._append_rows, rows, state)

    def _append_rows(self, rows: list[Row], state: Sequence[StateRow]) -> None:
        result = self._store.append(rows, self._config.max_bytes, self._config.when_full, state)
        # Scheduled before the awaiting coroutine resumes, and even if it was cancelled.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._appended_done, result)

    def _appended_done(self, result: _Appended) -> None:
        if result.stored:
            self._metrics.inc("buffer_appended_total", result.stored)
            self._appended.set()
        if result.dropped_oldest:
            self._metrics.inc("events_dropped_total", result.dropped_oldest,
                              reason="buffer_full_oldest")
        if result.dropped_newest:
            self._metrics.inc("events_dropped_total", result.dropped_newest,
                              reason="buffer_full_newest")
        dropped = result.dropped_oldest + result.dropped_newest
        if dropped:
            self._note_full(dropped)

    def _note_full(self, dropped: int) -> None:
        if self._full_since is None:
            self._full_since = time.monotonic()
            self._full_dropped = 0
            self._log.warning("buffer.full", when_full=self._config.when_full, dropped=dropped,
                              max_bytes=self._config.max_bytes,
                              pending_bytes=self.pending_bytes)
        self._full_dropped += dropped

    def _drop_too_large(self, event: DomainEvent, size: int) -> None:
        self._metrics.inc("events_dropped_total", reason="event_too_large")
        self._log.warning("buffer.event_too_large", id=event.id, type=event.type,
                          subject=event.subject, size=size, max_bytes=self._config.max_bytes)

    async def read(self, after_seq: int, limit: int) -> list[BufferedRecord]:
        """Up to ``limit`` records with ``seq > after_seq``, oldest first."""
        return await self._call(self._store.read, after_seq, limit)

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
