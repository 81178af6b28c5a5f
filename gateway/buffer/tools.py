"""``digispine-gateway buffer stats|inspect|export``: look into the disk buffer, read-only.

The tools read ``buffer.sqlite3`` while the gateway runs (it holds ``buffer.lock``; the tools
never take that lock) or while it is stopped. They never write to the buffer directory, never
create a file there and never block the gateway:

- the gateway running (``-wal`` and ``-shm`` present): SQLite read-only with a read-only
  wal-index (``mode=ro&readonly_shm=1``). A WAL reader never blocks the writer; each query is
  a short read transaction, so checkpoints are held back at most for one query;
- the gateway stopped cleanly (no ``-wal``): the file as an immutable snapshot
  (``mode=ro&immutable=1``: no locks, no ``-wal``/``-shm`` created);
- a ``-wal`` without its ``-shm`` (a copied or half-cleaned directory): SQLite would have to
  create the ``-shm``, so the database and its WAL are copied to a temporary directory and read
  there.

Only the ``events`` columns ``seq, type, subject, size, body`` are required, and every column
is read by name: other tables and extra columns are ignored. A file is accepted when its
``application_id`` marks a gateway buffer and its ``events`` table has those columns, whatever
its format version. What format 2 added is shown when the file has it, and is simply absent
from the output when not (a format-1 file): the ``events`` columns ``priority`` (pending events
and bytes per class, the PRIORITY column of ``inspect``) and ``appended`` (how long the oldest
event has waited, what ``buffer.max_age_s`` limits), the ``drops`` ledger (what was dropped and
not yet reported) and the ``mapper_state`` table (how many states are saved).

Errors: a missing buffer file raises :class:`NoBuffer` (the command exits
:data:`EX_NOINPUT`, 66); a file that is not a gateway buffer or cannot be read raises
:class:`gateway.errors.BufferError` (exit 73).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from gateway import errors
from gateway.buffer.disk import APPLICATION_ID, FILE_NAME, PRIORITY_LEVELS, PRIORITY_NAMES
from gateway.model import representable, rfc3339

EX_NOINPUT = 66
"""sysexits.h EX_NOINPUT: there is no buffer file to read."""

COLUMNS = ("seq", "type", "subject", "size", "body")
"""The ``events`` columns the tools need (by name; other columns are ignored)."""
LEDGER_COLUMNS = ("type", "reason", "priority", "count", "first_time", "last_time")
"""The ``drops`` columns the ledger figures read (format 2); without them there are none."""

_CHUNK = 500
"""Rows per query when streaming: each query is one short read transaction."""
_OPEN_ATTEMPTS = 3


class NoBuffer(errors.BufferError):
    """There is no buffer file where the config (or ``--dir``) points."""


# -- data --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events to list or export. Patterns are exact values or globs (``*``, ``?``,
    ``[...]``, case-sensitive); several patterns of one kind match any of them."""

    types: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    from_seq: int | None = None
    """Only events with ``seq >= from_seq``."""
    limit: int | None = None
    """At most this many events (``None``: all)."""
    tail: bool = False
    """The newest ``limit`` matching events instead of the oldest (still in seq order)."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One buffered event as stored: ``body`` is the structured CloudEvent JSON, byte for byte."""

    seq: int
    type: str
    subject: str
    size: int
    body: bytes
    priority: int | None = None
    """0 low, 1 normal, 2 high (format 2); ``None`` when the file has no ``priority`` column."""

    @property
    def priority_name(self) -> str | None:
        return None if self.priority is None else priority_name(self.priority)

    def envelope(self) -> dict[str, Any] | None:
        """The parsed CloudEvent, or ``None`` when the body is not a JSON object."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class Group:
    """Events and bytes of one type (or one subject)."""

    key: str
    events: int
    bytes: int


@dataclass(frozen=True, slots=True)
class DropLine:
    """One line of the ``drops`` ledger: events of one type dropped for one reason and not yet
    reported (``gateway.EventsDropped.v1``)."""

    type: str
    reason: str
    priority: int
    count: int
    first_time: float | None
    """The earliest event time (CloudEvent ``time``, Unix seconds) of the dropped events."""
    last_time: float | None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "reason": self.reason,
                "priority": priority_name(self.priority), "count": self.count,
                "first_time": _iso(self.first_time), "last_time": _iso(self.last_time)}


@dataclass(frozen=True, slots=True)
class BufferStats:
    path: Path
    format: int
    """``PRAGMA user_version`` of the file."""
    pending_events: int
    pending_bytes: int
    """``sum(size)``: what ``buffer.max_bytes`` counts."""
    first_seq: int | None
    last_seq: int | None
    high_water_seq: int | None
    """The highest seq ever assigned (deleted events included); the next event gets a higher one."""
    oldest_time: str | None
    """CloudEvent ``time`` of the first event by seq."""
    newest_time: str | None
    """CloudEvent ``time`` of the last event by seq."""
    oldest_age_s: float | None
    """Seconds from ``oldest_time`` to now."""
    db_bytes: int
    wal_bytes: int
    by_type: tuple[Group, ...]
    by_subject: tuple[Group, ...] | None = field(default=None)
    """Only when asked for (``--by-subject``)."""
    by_priority: tuple[Group, ...] | None = field(default=None)
    """Pending events and bytes per class, ``low``, ``normal``, ``high`` (zeros included; an
    unknown level by its number after them); ``None`` without a ``priority`` column."""
    oldest_appended: float | None = field(default=None)
    """When the event that has waited longest was buffered (Unix seconds): ``min(appended)``;
    ``None`` without an ``appended`` column or pending events."""
    oldest_appended_age_s: float | None = field(default=None)
    """Seconds from ``oldest_appended`` to now: what ``buffer.max_age_s`` limits."""
    has_appended: bool = field(default=False)
    """Whether the file has the ``appended`` column (then the two figures above are shown)."""
    drops: tuple[DropLine, ...] | None = field(default=None)
    """The ledger: dropped and not yet reported, the most first; ``None`` without it."""
    mapper_states: int | None = field(default=None)
    """Saved mapping-engine states; ``None`` without a ``mapper_state`` table."""

    @property
    def disk_bytes(self) -> int:
        return self.db_bytes + self.wal_bytes

    @property
    def dropped_unreported(self) -> int | None:
        """The ledger total: events dropped and not yet reported (``None`` without a ledger)."""
        return None if self.drops is None else sum(line.count for line in self.drops)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": str(self.path),
            "format": self.format,
            "pending_events": self.pending_events,
            "pending_bytes": self.pending_bytes,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "high_water_seq": self.high_water_seq,
            "oldest_time": self.oldest_time,
            "newest_time": self.newest_time,
            "oldest_age_s": _round(self.oldest_age_s),
            "db_bytes": self.db_bytes,
            "wal_bytes": self.wal_bytes,
            "disk_bytes": self.disk_bytes,
            "by_type": [_group_json(g, "type") for g in self.by_type],
        }
        if self.by_subject is not None:
            out["by_subject"] = [_group_json(g, "subject") for g in self.by_subject]
        if self.by_priority is not None:
            out["by_priority"] = [_group_json(g, "priority") for g in self.by_priority]
        if self.has_appended:
            out["oldest_appended"] = _iso(self.oldest_appended)
            out["oldest_appended_age_s"] = _round(self.oldest_appended_age_s)
        if self.drops is not None:
            out["dropped_unreported"] = self.dropped_unreported
            out["drops"] = [line.to_json() for line in self.drops]
        if self.mapper_states is not None:
            out["mapper_states"] = self.mapper_states
        return out


def _group_json(group: Group, key: str) -> dict[str, Any]:
    return {key: group.key, "events": group.events, "bytes": group.bytes}


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def priority_name(level: int) -> str:
    """``low``, ``normal``, ``high`` for 0, 1, 2; another level as its number."""
    return PRIORITY_NAMES.get(level, str(level))


def _iso(ts: float | None) -> str | None:
    """RFC 3339 of Unix seconds (``None`` when absent or not representable)."""
    return rfc3339(ts) if ts is not None and representable(ts) else None


# -- opening read-only ----------------------------------------------------------------------


def database_path(location: Path) -> Path:
    """The buffer file of a buffer directory; a path naming a file is taken as the file."""
    try:
        return location if location.is_file() else location / FILE_NAME
    except OSError as exc:  # e.g. a directory on the way that we may not search
        raise errors.BufferError(f"cannot read {location}: {exc}") from exc


class BufferReader:
    """A read-only view of one buffer file (see :func:`open_buffer`)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self.columns: frozenset[str] = frozenset()
        """The ``events`` columns of the file."""
        self.tables: frozenset[str] = frozenset()
        with _sqlite_errors(path):
            self.format = self._check_format()
            self.tables = frozenset(str(row[0]) for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"))
            self._ledger = (
                "drops" in self.tables
                and set(LEDGER_COLUMNS) <= self._table_columns("drops"))

    @property
    def has_priority(self) -> bool:
        """Whether events carry a priority class (format 2)."""
        return "priority" in self.columns

    @property
    def has_appended(self) -> bool:
        """Whether events carry the time they were buffered (format 2)."""
        return "appended" in self.columns

    @property
    def has_ledger(self) -> bool:
        """Whether the file has the ``drops`` ledger (format 2)."""
        return self._ledger

    def _table_columns(self, table: str) -> set[str]:
        return {str(row[1]) for row in self._conn.execute(f"PRAGMA table_info({table})")}

    def _check_format(self) -> int:
        conn = self._conn
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if app_id != APPLICATION_ID:
            raise errors.BufferError(
                f"{self.path} is a SQLite database but not a gateway buffer "
                f"(application_id {app_id:#x}, expected {APPLICATION_ID:#x})")
        columns = self._table_columns("events")
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            what = "has no events table" if not columns else f"lacks events.{', '.join(missing)}"
            raise errors.BufferError(
                f"{self.path}: unknown buffer format {version}: the file {what}")
        self.columns = frozenset(columns)
        return version

    def stats(self, *, by_subject: bool = False, now: float | None = None) -> BufferStats:
        """Depth, bytes, seq range, oldest/newest event time, per-type (and per-subject) counts
        and, when the file has them (format 2), per-priority counts, the oldest append time and
        the drop ledger, all from one consistent snapshot."""
        conn = self._conn
        with _sqlite_errors(self.path):
            conn.execute("BEGIN")  # one read snapshot for every figure
            try:
                count, size, first, last = conn.execute(
                    "SELECT count(*), coalesce(sum(size), 0), min(seq), max(seq) FROM events"
                ).fetchone()
                high_water = self._high_water()
                oldest = self._body("SELECT body FROM events ORDER BY seq LIMIT 1")
                newest = self._body("SELECT body FROM events ORDER BY seq DESC LIMIT 1")
                by_type = self._groups("type")
                subjects = self._groups("subject") if by_subject else None
                by_priority = self._priorities() if self.has_priority else None
                first_appended = (conn.execute("SELECT min(appended) FROM events").fetchone()[0]
                                  if self.has_appended else None)
                drops = self._drops() if self.has_ledger else None
                states = (int(conn.execute("SELECT count(*) FROM mapper_state").fetchone()[0])
                          if "mapper_state" in self.tables else None)
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")  # a read transaction: nothing to commit
        oldest_time, newest_time = _event_time(oldest), _event_time(newest)
        oldest_ts = _parse_time(oldest_time)
        now = time.time() if now is None else now
        appended = _number(first_appended)
        db_bytes, wal_bytes = _size(self.path), _size(_side(self.path, "-wal"))
        return BufferStats(
            path=self.path, format=self.format, pending_events=int(count),
            pending_bytes=int(size), first_seq=first, last_seq=last,
            high_water_seq=high_water if high_water is not None else last,
            oldest_time=oldest_time, newest_time=newest_time,
            oldest_age_s=None if oldest_ts is None else now - oldest_ts,
            db_bytes=db_bytes, wal_bytes=wal_bytes, by_type=by_type, by_subject=subjects,
            by_priority=by_priority, oldest_appended=appended,
            oldest_appended_age_s=None if appended is None else now - appended,
            has_appended=self.has_appended, drops=drops, mapper_states=states)

    def _high_water(self) -> int | None:
        try:
            row = self._conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        except sqlite3.OperationalError:  # no AUTOINCREMENT table at all
            return None
        return int(row[0]) if row else None

    def _body(self, sql: str) -> bytes | None:
        row = self._conn.execute(sql).fetchone()
        return None if row is None else _bytes(row[0])

    def _priorities(self) -> tuple[Group, ...]:
        """Every class (zeros included), then levels this gateway does not know, if any."""
        found: dict[str, tuple[int, int]] = {}
        for level, n, b in self._conn.execute(
                "SELECT priority, count(*), coalesce(sum(size), 0) FROM events "
                "GROUP BY priority ORDER BY priority"):
            found[_level_name(level)] = (int(n), int(b))
        known = [PRIORITY_NAMES[level] for level in sorted(PRIORITY_NAMES)]
        names = [*known, *(name for name in found if name not in PRIORITY_LEVELS)]
        return tuple(Group(name, *found.get(name, (0, 0))) for name in names)

    def _drops(self) -> tuple[DropLine, ...]:
        rows = self._conn.execute(
            f"SELECT {', '.join(LEDGER_COLUMNS)} FROM drops "
            "ORDER BY count DESC, type, reason").fetchall()
        return tuple(DropLine(str(t), str(reason), _level(level), int(n), _number(lo), _number(hi))
                     for t, reason, level, n, lo, hi in rows)

    def _groups(self, column: str) -> tuple[Group, ...]:
        rows = self._conn.execute(
            f"SELECT {column}, count(*), coalesce(sum(size), 0) FROM events "
            f"GROUP BY {column} ORDER BY 2 DESC, 1").fetchall()
        return tuple(Group(str(k), int(n), int(b)) for k, n, b in rows)

    def events(self, selection: Selection = Selection()) -> Iterator[StoredEvent]:
        """The selected events in seq order, streamed in short queries (no long transaction).

        Events appended after the call started are not included; events deleted meanwhile
        (Kafka acknowledged them) may be missing.
        """
        with _sqlite_errors(self.path):
            yield from self._events(selection)

    def _events(self, selection: Selection) -> Iterator[StoredEvent]:
        conn = self._conn
        upper = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
        if upper is None or selection.limit == 0:
            return
        where, params = _filters(selection)
        start = max(selection.from_seq - 1, 0) if selection.from_seq is not None else 0
        remaining = selection.limit
        if selection.tail and remaining is not None:
            row = conn.execute(
                f"SELECT seq FROM events WHERE seq > ? AND seq <= ?{where} "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?", (start, upper, *params, remaining - 1),
            ).fetchone()
            if row is not None:
                start = int(row[0]) - 1
        columns = ", ".join((*COLUMNS, "priority" if self.has_priority else "NULL"))
        while remaining is None or remaining > 0:
            n = _CHUNK if remaining is None else min(_CHUNK, remaining)
            rows = conn.execute(
                f"SELECT {columns} FROM events WHERE seq > ? AND seq <= ?{where} "
                "ORDER BY seq LIMIT ?", (start, upper, *params, n)).fetchall()
            for seq, type_, subject, size, body, level in rows:
                yield StoredEvent(int(seq), str(type_), str(subject), int(size), _bytes(body),
                                  None if level is None else _level(level))
            if len(rows) < n:
                return
            start = int(rows[-1][0])
            if remaining is not None:
                remaining -= len(rows)


@contextlib.contextmanager
def open_buffer(location: Path) -> Iterator[BufferReader]:
    """Open the buffer of a directory (or a buffer file) read-only; see the module docstring."""
    path = database_path(location)
    with contextlib.ExitStack() as stack:
        conn = _connect(path, stack)
        stack.callback(conn.close)
        yield BufferReader(path, conn)


def _connect(path: Path, stack: contextlib.ExitStack) -> sqlite3.Connection:
    for attempt in range(_OPEN_ATTEMPTS):
        _check_file(path)
        wal, shm = _side(path, "-wal"), _side(path, "-shm")
        try:
            if not wal.exists():
                uri = _uri(path, "mode=ro&immutable=1")
            elif shm.exists():
                uri = _uri(path, "mode=ro&readonly_shm=1")
            else:
                uri = _uri(_copy_with_wal(path, stack), "mode=ro")
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            raise errors.BufferError(f"cannot read {path}: {exc}") from exc
        except sqlite3.Error as exc:
            if _retry(exc, attempt):
                continue  # the gateway started or stopped just now: look at the files again
            raise _translate(path, exc) from exc
        try:
            conn.execute("PRAGMA query_only = 1")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            if _retry(exc, attempt):
                continue
            raise _translate(path, exc) from exc
        return conn
    raise errors.BufferError(f"cannot open {path}: it kept changing")  # pragma: no cover


def _retry(exc: sqlite3.Error, attempt: int) -> bool:
    return (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_CANTOPEN
            and attempt + 1 < _OPEN_ATTEMPTS)


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise NoBuffer(
            f"no buffer at {path} (check buffer.directory or --dir; the gateway creates the "
            "file when it first starts)") from None
    except OSError as exc:
        raise errors.BufferError(f"cannot read {path}: {exc}") from exc
    if st.st_size == 0:
        raise errors.BufferError(f"{path} is empty: not a gateway buffer (yet)")


def _copy_with_wal(path: Path, stack: contextlib.ExitStack) -> Path:
    """The database and its WAL copied to a temporary directory, for reading without a -shm."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="digispine-buffer-")))
    copy = folder / FILE_NAME
    shutil.copyfile(path, copy)
    shutil.copyfile(_side(path, "-wal"), _side(copy, "-wal"))
    return copy


def _uri(path: Path, query: str) -> str:
    return f"file:{quote(str(path.absolute()))}?{query}"


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@contextlib.contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise _translate(path, exc) from exc


def _translate(path: Path, exc: sqlite3.Error) -> errors.BufferError:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
        return errors.BufferError(f"{path} is not a SQLite database, so not a gateway buffer")
    return errors.BufferError(f"cannot read {path}: {exc}")


def _filters(selection: Selection) -> tuple[str, list[object]]:
    sql = ""
    params: list[object] = []
    for column, patterns in (("type", selection.types), ("subject", selection.subjects)):
        if patterns:
            sql += " AND (" + " OR ".join(f"{column} GLOB ?" for _ in patterns) + ")"
            params.extend(patterns)
    return sql, params


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return str(value).encode()  # a TEXT body (or anything else SQLite holds): its UTF-8


def _level(value: object) -> int:
    """A stored priority level (a level that is not an integer reads as -1: unknown)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _level_name(value: object) -> str:
    level = _level(value)
    return "?" if level == -1 else priority_name(level)


def _number(value: object) -> float | None:
    """A REAL column's value as a float (``None`` for NULL or anything not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _event_time(body: bytes | None) -> str | None:
    if body is None:
        return None
    envelope = StoredEvent(0, "", "", len(body), body).envelope()
    value = envelope.get("time") if envelope else None
    return value if isinstance(value, str) else None


def _parse_time(value: str | None) -> float | None:
    """Unix seconds of an RFC 3339 time (``None`` when absent or unreadable)."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


# -- the functions behind the commands --------------------------------------------------------


def read_stats(location: Path, *, by_subject: bool = False, now: float | None = None) -> BufferStats:
    with open_buffer(location) as reader:
        return reader.stats(by_subject=by_subject, now=now)


def read_events(location: Path, selection: Selection = Selection()) -> list[StoredEvent]:
    with open_buffer(location) as reader:
        return list(reader.events(selection))


def export(location: Path, selection: Selection, out: IO[bytes], *, with_seq: bool = False) -> int:
    """Write the selected events to ``out`` as JSON lines (see :func:`write_jsonl`)."""
    with open_buffer(location) as reader:
        return write_jsonl(reader.events(selection), out, with_seq=with_seq)


def write_jsonl(events: Iterable[StoredEvent], out: IO[bytes], *, with_seq: bool = False) -> int:
    """One line per event, the body exactly as stored (one structured CloudEvent), or,
    ``with_seq``, ``{"seq":<seq>,"event":<body>}``; returns how many lines."""
    count = 0
    for event in events:
        if with_seq:
            out.write(b'{"seq":%d,"event":%s}\n' % (event.seq, event.body))
        else:
            out.write(event.body + b"\n")
        count += 1
    return count


# -- rendering ------------------------------------------------------------------------------


def render_stats(stats: BufferStats) -> str:
    lines = [
        f"buffer      {stats.path} (format {stats.format})",
        f"pending     {stats.pending_events:,} events, {_human_bytes(stats.pending_bytes)}",
    ]
    if stats.first_seq is not None:
        lines.append(f"seq         {stats.first_seq} .. {stats.last_seq} "
                     f"(highest assigned {stats.high_water_seq})")
        lines.append(f"oldest      {stats.oldest_time or '?'}{_ago(stats.oldest_age_s)}")
        lines.append(f"newest      {stats.newest_time or '?'}")
        if stats.has_appended:
            lines.append(f"waiting     {_waited(stats.oldest_appended_age_s)} "
                         f"(buffered {_iso(stats.oldest_appended) or '?'})")
    elif stats.high_water_seq is not None:
        lines.append(f"seq         none pending (highest assigned {stats.high_water_seq})")
    if stats.drops is not None:
        total = stats.dropped_unreported or 0
        lines.append(f"dropped     {total:,} event{'s' if total != 1 else ''} not yet reported"
                     if total else "dropped     none unreported")
    if stats.mapper_states is not None:
        lines.append(f"mapper      {stats.mapper_states:,} saved state"
                     f"{'s' if stats.mapper_states != 1 else ''}")
    lines.append(f"on disk     {_human_bytes(stats.disk_bytes, exact=False)} (database "
                 f"{_human_bytes(stats.db_bytes, exact=False)} + WAL "
                 f"{_human_bytes(stats.wal_bytes, exact=False)})")
    if stats.by_priority is not None and stats.pending_events:
        lines.append("")
        lines.extend(_table(["PRIORITY", "EVENTS", "BYTES"],
                            [[g.key, f"{g.events:,}", f"{g.bytes:,}"] for g in stats.by_priority],
                            right={1, 2}))
    for title, groups in (("TYPE", stats.by_type), ("SUBJECT", stats.by_subject)):
        if groups:
            lines.append("")
            lines.extend(_table([title, "EVENTS", "BYTES"],
                                [[g.key, f"{g.events:,}", f"{g.bytes:,}"] for g in groups],
                                right={1, 2}))
    if stats.drops:
        lines.append("")
        lines.append("dropped, not yet reported (gateway.EventsDropped.v1):")
        lines.extend(_table(
            ["TYPE", "REASON", "PRIORITY", "COUNT", "FIRST TIME", "LAST TIME"],
            [[d.type, d.reason, priority_name(d.priority), f"{d.count:,}",
              _iso(d.first_time) or "?", _iso(d.last_time) or "?"] for d in stats.drops],
            right={3}))
    return "\n".join(lines)


def render_events(events: list[StoredEvent], *, body: bool = False) -> str:
    """A table of the events (PRIORITY too when the file has it: format 2), with ``body``
    each event's JSON under its line."""
    if not events:
        return "no events"
    prioritized = any(e.priority is not None for e in events)
    rows, envelopes = [], []
    for e in events:
        env = e.envelope()
        envelopes.append(env)
        row = [str(e.seq), e.type, e.subject, _str((env or {}).get("time")),
               _str((env or {}).get("id")), str(e.size)]
        if prioritized:
            row.append(_str(e.priority_name))
        rows.append(row)
    header = ["SEQ", "TYPE", "SUBJECT", "TIME", "ID", "SIZE"]
    lines = _table([*header, "PRIORITY"] if prioritized else header, rows, right={0, 5})
    if not body:
        return "\n".join(lines)
    out = [lines[0]]
    for line, e, env in zip(lines[1:], events, envelopes, strict=True):
        text = (json.dumps(env, indent=2, ensure_ascii=False) if env is not None
                else e.body.decode("utf-8", "replace"))
        out.extend([line, text, ""])
    return "\n".join(out).rstrip("\n")


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


def _str(value: object) -> str:
    return "?" if value is None else str(value)


def _human_bytes(n: int, *, exact: bool = True) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}" + (f" ({n:,} B)" if exact else "")


def _ago(age_s: float | None) -> str:
    if age_s is None:
        return ""
    if age_s < 0:
        return f" (in {_duration(-age_s)}: clock skew?)"
    return f" ({_duration(age_s)} ago)"


def _waited(age_s: float | None) -> str:
    """How long the longest-waiting event has waited (what ``buffer.max_age_s`` limits)."""
    if age_s is None:
        return "?"
    if age_s < 0:
        return f"? (buffered in {_duration(-age_s)}: clock skew?)"
    return f"the longest {_duration(age_s)}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86_400)
    hours, s = divmod(s, 3_600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{seconds:.1f}s"


# -- the command ----------------------------------------------------------------------------


def selection_of(args: argparse.Namespace) -> Selection:
    return Selection(types=tuple(args.type or ()), subjects=tuple(args.subject or ()),
                     from_seq=args.from_seq, limit=args.limit or None, tail=args.tail)


def command(args: argparse.Namespace, location: Path) -> int:
    """Run ``buffer stats|inspect|export`` (parsed by :mod:`gateway.cli`) on ``location``."""
    try:
        if args.action == "stats":
            stats = read_stats(location, by_subject=args.by_subject)
            print(json.dumps(stats.to_json(), indent=2) if args.json else render_stats(stats))
        elif args.action == "inspect":
            events = read_events(location, selection_of(args))
            print(render_events(events, body=args.body))
        else:
            _export_command(args, location)
    except NoBuffer as exc:
        print(f"digispine-gateway: buffer: {exc}", file=sys.stderr)
        return EX_NOINPUT
    return 0


def _export_command(args: argparse.Namespace, location: Path) -> None:
    selection = selection_of(args)
    with open_buffer(location) as reader:  # a missing or foreign buffer fails before -o is made
        events = reader.events(selection)
        if args.output in (None, "-"):
            count = write_jsonl(events, sys.stdout.buffer, with_seq=args.with_seq)
            sys.stdout.buffer.flush()
            where = "stdout"
        else:
            try:
                with open(args.output, "wb") as out:
                    count = write_jsonl(events, out, with_seq=args.with_seq)
            except OSError as exc:
                raise errors.BufferError(f"cannot write {args.output}: {exc}") from exc
            where = args.output
    print(f"exported {count} event{'s' if count != 1 else ''} to {where}", file=sys.stderr)
