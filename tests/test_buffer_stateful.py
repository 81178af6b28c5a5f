"""The disk buffer against a model, driven by Hypothesis through random appends, reads, deletes,
restarts, expiries and drop reports, with a small ``max_bytes`` so that both ``when_full``
policies drop events, and event types of all three priority classes.

The model is what the buffer promises (gateway/buffer/disk.py, format 2):

- the stored events, seq -> (type, subject, body) with their class, event time and append
  time, in seq order, and the counters;
- ``pending_events`` / ``pending_bytes`` are the model's count and ``sum(len(body))``, at most
  ``max_bytes`` (but see the report below);
- ``read(after, limit)`` returns exactly the model's next ``limit`` records, in seq order;
- a seq grows strictly and is never reused, not after deletes, not after a reopen;
- every offered event is either pending, deleted by the forwarder, or counted in
  ``events_dropped_total`` under its reason, and every drop is in the ledger (per type and
  reason: class, count, first and last event time) until it is reported;
- an event larger than ``max_bytes`` is dropped alone (``event_too_large``);
- making room (``need`` = pending + offered bytes - ``max_bytes`` > 0): the lowest class goes
  first (low, normal, high); within a class ``drop_oldest`` drops the oldest first (the
  buffered ones, then the offered batch in order) and ``drop_newest`` the newest first (the
  offered batch from its end, then the buffered ones, newest first), until ``need`` bytes are
  freed (``buffer_full_oldest`` / ``buffer_full_newest``);
- ``expire(age)`` drops the events appended before ``now - age`` (``expired``);
- ``report_drops`` with a non-empty ledger appends exactly one ``gateway.EventsDropped.v1``
  event (class high, ``data.count`` = the ledger total, one line per ledger line) and empties
  the ledger; with an empty ledger it appends nothing.

The clock the buffer stamps ``appended`` with (and ``expire`` and the report read) is the
machine's: ``gateway.buffer.disk.time`` is replaced, for the machine's lifetime, by a
:class:`Clock` whose ``time()`` the rules advance; nothing else in the process sees it.

Known deviation, modelled as implemented (see ``test_a_report_on_a_full_buffer_keeps_max_bytes``
below): ``report_drops`` inserts its event without making room, so after a report
``pending_bytes`` may exceed ``max_bytes`` by the report's size until the next append makes
room, although disk.py documents that the report "may itself have to make room".
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from gateway.buffer import disk, tools
from gateway.buffer.disk import (
    DROPPED_TYPE,
    BufferConfig,
    BufferedRecord,
    DiskBuffer,
    dropped_report,
)
from gateway.metrics import Metrics
from gateway.model import DomainEvent, EventIds, decode_envelope, rfc3339

pytestmark = pytest.mark.timeout(900)  # a failure shrinks for up to 5 minutes

MAX_BYTES = 65_536  # the smallest BufferConfig allows: a handful of events fill it
REASONS = ("event_too_large", "buffer_full_oldest", "buffer_full_newest", "expired")
LOW, NORMAL, HIGH = ("process.TemperatureChanged.v1", "production.CountChanged.v1",
                     "safety.EmergencyStop.v1")
TYPES = (LOW, NORMAL, HIGH)
PRIORITIES: dict[str, Any] = {"process.*": "low", HIGH: "high"}  # a pattern, an exact type
LEVEL = {LOW: 0, NORMAL: 1, HIGH: 2, DROPPED_TYPE: 2}
NAMES = ("low", "normal", "high")
SUBJECTS = ("acme/plant1/press1", "acme/plant1/oven1")
GATEWAY = "gw1"
CLOCK_START = 1_800_000_000.0
EVENT_TIME_START = 1_700_000_000.0

# An event's body is its envelope (~230 bytes) plus the pad: small ones, ones of which a few
# fill the buffer, ones near max_bytes (some fit alone, some are too large), and too large.
pads = st.one_of(
    st.integers(0, 2_000),
    st.integers(8_000, 30_000),
    st.integers(MAX_BYTES - 600, MAX_BYTES + 200),
    st.integers(MAX_BYTES, 2 * MAX_BYTES),
)
specs = st.tuples(st.sampled_from(TYPES), st.sampled_from(SUBJECTS), pads)
# Seconds the clock moves on before an append or an expiry (100 is the configured max_age_s).
laters = st.sampled_from([0, 1, 30, 60, 99, 100, 101, 250])


@dataclass(frozen=True, slots=True)
class Stored:
    """An event as the model keeps it; equality is what ``read`` returns."""

    type: str
    subject: str
    body: bytes
    priority: int = field(default=1, compare=False)
    time: float = field(default=0.0, compare=False)
    """The event's time (what the ledger's first/last times are made of)."""
    appended: float = field(default=0.0, compare=False)
    """The clock when it was buffered (what ``expire`` compares)."""

    @property
    def size(self) -> int:
        return len(self.body)


LedgerKey = tuple[str, str]  # type, reason
LedgerLine = tuple[str, str, int, int, float, float]  # the model's: times always known


class Clock:
    """``time`` as gateway.buffer.disk sees it: ``time()`` is the machine's, the rest real."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(CLOCK_START)
        self.patch = pytest.MonkeyPatch()  # undone in teardown
        self.patch.setattr(disk, "time", self.clock)
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="buffer-stateful-"))
        self.metrics = Metrics()
        self.ids = EventIds()
        self.n = itertools.count()
        self.config: BufferConfig | None = None
        self.buf: DiskBuffer | None = None
        self.model: dict[int, Stored] = {}  # insertion order == seq order
        self.ledger: dict[LedgerKey, list[Any]] = {}  # -> [priority, count, first, last]
        self.high_water = 0
        self.read_seqs: set[int] = set()
        self.offered = 0
        self.stored = 0
        self.deleted = 0
        self.reports = 0
        self.dropped: Counter[str] = Counter()
        """Bytes reports appended since the last append made room (the known deviation)."""

    # -- plumbing -------------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def open_buffer(self) -> DiskBuffer:
        assert self.config is not None
        buf = DiskBuffer(self.config, self.metrics)
        self.run(buf.open())
        return buf

    def teardown(self) -> None:
        try:
            if self.buf is not None:
                self.run(self.buf.close())
        finally:
            self.patch.undo()
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pending_bytes(self) -> int:
        return sum(s.size for s in self.model.values())

    def make(self, spec: tuple[str, str, int]) -> DomainEvent:
        type_, subject, pad = spec
        n = next(self.n)
        return DomainEvent(id=self.ids.next(), source="digispine-gateway/gw1/plc", type=type_,
                           subject=subject, time=EVENT_TIME_START + n,
                           data={"n": n, "pad": "x" * pad})

    def drop(self, dropped: list[Stored], reason: str) -> None:
        """Count ``dropped`` under ``reason`` in the metrics' and the ledger's model."""
        self.dropped[reason] += len(dropped)
        for s in dropped:
            line = self.ledger.setdefault((s.type, reason), [s.priority, 0, s.time, s.time])
            line[1] += 1
            line[2], line[3] = min(line[2], s.time), max(line[3], s.time)

    def ledger_lines(self) -> list[LedgerLine]:
        return [(t, reason, p, n, lo, hi)
                for (t, reason), (p, n, lo, hi) in sorted(self.ledger.items())]

    def take_new(self) -> list[BufferedRecord]:
        """The records appended since the model's high-water mark; checks their seqs."""
        assert self.buf is not None
        new: list[BufferedRecord] = self.run(self.buf.read(self.high_water, 1_000))
        seqs = [r.seq for r in new]
        assert seqs == sorted(set(seqs)), "seqs of one append must strictly increase"
        assert all(seq > self.high_water for seq in seqs), "a seq was reused"
        return new

    # -- rules ----------------------------------------------------------------------------

    @initialize(when_full=st.sampled_from(["drop_oldest", "drop_newest"]),
                max_age_s=st.sampled_from([None, 100.0]))
    def start(self, when_full: Literal["drop_oldest", "drop_newest"],
              max_age_s: float | None) -> None:
        self.config = BufferConfig(directory=self.directory, max_bytes=MAX_BYTES,
                                   when_full=when_full, sync="off", priorities=PRIORITIES,
                                   max_age_s=max_age_s)
        assert {t: self.config.priority_of(t) for t in LEVEL} == LEVEL
        self.buf = self.open_buffer()

    @rule(later=laters, batch=st.lists(specs, max_size=8))
    def append(self, later: int, batch: list[tuple[str, str, int]]) -> None:
        assert self.buf is not None and self.config is not None
        self.clock.now += later
        events = [self.make(spec) for spec in batch]
        offered = [Stored(e.type, e.subject, e.encode(), LEVEL[e.type], e.time, self.clock.now)
                   for e in events]
        kept, evicted = self.expect_append(offered)

        self.run(self.buf.append(events))

        self.offered += len(events)
        for seq in evicted:
            del self.model[seq]
        # The new records are the ones after the old high-water mark, in offered order.
        new = self.take_new()
        assert [Stored(r.type, r.subject, r.body) for r in new] == kept
        self.stored += len(new)
        for r, s in zip(new, kept, strict=True):
            self.model[r.seq] = s
        if new:
            self.high_water = new[-1].seq
        assert self.buf.last_seq == self.high_water

    def expect_append(self, offered: list[Stored]) -> tuple[list[Stored], list[int]]:
        """What the buffer must keep of ``offered`` and which buffered seqs it must evict;
        counts the expected drops by reason in the metrics and the ledger."""
        assert self.config is not None
        fitting = [s for s in offered if s.size <= MAX_BYTES]
        self.drop([s for s in offered if s.size > MAX_BYTES], "event_too_large")
        if len(fitting) < len(offered):
            event("append: an event larger than max_bytes")
        if not offered:
            return [], []  # nothing offered: the buffer is not even asked
        need = self.pending_bytes + sum(s.size for s in fitting) - MAX_BYTES
        if need <= 0:
            return fitting, []
        newest = self.config.when_full == "drop_newest"
        reason = "buffer_full_newest" if newest else "buffer_full_oldest"
        freed = 0
        refused: set[int] = set()  # indexes into fitting
        evicted: list[int] = []
        dropped: list[Stored] = []
        for level in (0, 1, 2):
            mine = [("offered", i) for i, s in enumerate(fitting) if s.priority == level]
            buffered = [("buffered", seq) for seq, s in self.model.items() if s.priority == level]
            # drop_newest: the offered batch from its end, then the buffered, newest first;
            # drop_oldest: the buffered, oldest first, then the offered batch in order.
            order = [*mine[::-1], *buffered[::-1]] if newest else [*buffered, *mine]
            for where, key in order:
                if freed >= need:
                    break
                s = fitting[key] if where == "offered" else self.model[key]
                freed += s.size
                dropped.append(s)
                (refused.add if where == "offered" else evicted.append)(key)
            if freed >= need:
                break
        assert freed >= need  # everything together always makes enough room
        self.drop(dropped, reason)
        kept = [s for i, s in enumerate(fitting) if i not in refused]
        event(f"append: made room, dropped classes {sorted({s.priority for s in dropped})}")
        if evicted and kept:
            event("append: offered events pushed out buffered ones")
        if evicted and newest:
            event("append: drop_newest evicted buffered events of a lower class")
        return kept, evicted

    @rule(data=st.data(), limit=st.integers(1, 12))
    def read(self, data: st.DataObject, limit: int) -> None:
        assert self.buf is not None
        cursor = data.draw(st.one_of(st.sampled_from([0, self.high_water, *self.model]),
                                     st.integers(0, self.high_water + 3)), label="after_seq")
        got = self.run(self.buf.read(cursor, limit))
        expected = [(seq, s) for seq, s in self.model.items() if seq > cursor][:limit]
        assert records(got) == expected
        self.read_seqs.update(r.seq for r in got)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """Acknowledge some records that were read, maybe some twice (already deleted); now and
        then a seq never read or never assigned (ignored unless pending)."""
        assert self.buf is not None
        some_seq = st.integers(0, self.high_water + 3)
        if self.read_seqs:
            some_seq = st.one_of(st.sampled_from(sorted(self.read_seqs)), some_seq)
        seqs = data.draw(st.lists(some_seq, max_size=10), label="seqs")
        self.run(self.buf.delete(seqs))
        if any(seq not in self.model for seq in seqs):
            event("delete: seqs already gone")
        for seq in set(seqs):
            if self.model.pop(seq, None) is not None:
                self.deleted += 1

    @rule()
    def reopen(self) -> None:
        """Stop and start the gateway: everything survives, the high-water mark and the
        ledger included."""
        assert self.buf is not None
        self.run(self.buf.close())
        self.buf = None
        self.buf = self.open_buffer()
        assert self.buf.last_seq == self.high_water
        event(f"reopen: {'empty' if not self.model else 'with pending events'}")

    @rule(later=laters, data=st.data())
    def expire(self, later: int, data: st.DataObject) -> None:
        """Expire with the configured ``max_age_s`` (``None``) or an explicit age, often one
        that puts the cut exactly on an event's append time (that event stays)."""
        assert self.buf is not None and self.config is not None
        self.clock.now += later
        waited = sorted({self.clock.now - s.appended for s in self.model.values()})
        ages = st.one_of(st.none(), st.integers(0, 400).map(float))
        if waited:
            ages = st.one_of(ages, st.sampled_from(waited))
        age = data.draw(ages, label="max_age_s")
        limit = age if age is not None else self.config.max_age_s
        expired = ([] if limit is None else
                   [seq for seq, s in self.model.items() if s.appended < self.clock.now - limit])

        got = self.run(self.buf.expire(age))

        assert got == len(expired)
        self.drop([self.model.pop(seq) for seq in expired], "expired")
        if expired:
            event("expire: dropped events" + (" (some stayed)" if self.model else ""))

    @rule()
    def report(self) -> None:
        """The ledger becomes exactly one high-priority ``gateway.EventsDropped.v1`` event."""
        assert self.buf is not None
        lines = self.ledger_lines()
        total = sum(line[3] for line in lines)

        # The report is appended like any event (high priority), after the ledger is cleared,
        # so making room for it may drop events: those go to the fresh ledger.
        body = dropped_report(GATEWAY, lines, self.clock.now).encode() if lines else b""
        if lines:
            self.ledger.clear()
            stored = Stored(DROPPED_TYPE, f"gateways/{GATEWAY}", body, 2, self.clock.now,
                            self.clock.now)
            kept, evicted = self.expect_append([stored])

        got = self.run(self.buf.report_drops(GATEWAY))

        assert got == total
        if not lines:
            assert self.take_new() == []
            event("report: nothing to report")
            return
        for seq in evicted:
            del self.model[seq]
        new = self.take_new()
        self.offered += 1  # the report entered the buffer like an offered event
        self.reports += 1
        assert [r.body for r in new] == [s.body for s in kept]
        if not new:
            event("report: the report itself had to be dropped")
            return
        report = new[0]
        envelope = decode_envelope(report.body)
        assert (envelope["type"], envelope["subject"], envelope["time"]) == (
            DROPPED_TYPE, f"gateways/{GATEWAY}", rfc3339(self.clock.now))
        assert envelope["data"]["count"] == total
        assert envelope["data"]["dropped"] == [
            {"type": t, "reason": reason, "priority": NAMES[p], "count": n,
             "first_time": rfc3339(lo), "last_time": rfc3339(hi)}
            for t, reason, p, n, lo, hi in lines]
        stored_events = tools.read_events(self.directory,
                                          tools.Selection(from_seq=report.seq, limit=1))
        assert [(e.seq, e.priority) for e in stored_events] == [(report.seq, 2)]  # high
        self.model[report.seq] = kept[0]
        self.high_water = report.seq
        self.stored += 1
        if evicted:
            event("report: making room for the report dropped events")
        event(f"report: {len(lines)} ledger line(s)")

    @rule()
    def look_with_the_tools(self) -> None:
        """``buffer stats`` and ``inspect`` on the live buffer see exactly the model."""
        stats = tools.read_stats(self.directory, now=self.clock.now)
        assert (stats.pending_events, stats.pending_bytes) == (len(self.model), self.pending_bytes)
        by_class = [[0, 0], [0, 0], [0, 0]]
        for s in self.model.values():
            by_class[s.priority][0] += 1
            by_class[s.priority][1] += s.size
        assert [(g.key, g.events, g.bytes) for g in stats.by_priority or ()] == [
            (name, n, b) for name, (n, b) in zip(NAMES, by_class, strict=True)]
        oldest = min((s.appended for s in self.model.values()), default=None)
        assert stats.oldest_appended == oldest
        assert stats.oldest_appended_age_s == (None if oldest is None else self.clock.now - oldest)
        assert sorted((d.type, d.reason, d.priority, d.count, d.first_time, d.last_time)
                      for d in stats.drops or ()) == self.ledger_lines()
        assert stats.dropped_unreported == sum(line[1] for line in self.ledger.values())
        assert [(e.seq, e.priority) for e in tools.read_events(self.directory)] == [
            (seq, s.priority) for seq, s in self.model.items()]

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def depth_matches_the_model(self) -> None:
        if self.buf is None:
            return
        assert self.buf.pending_events == len(self.model)
        assert self.buf.pending_bytes == self.pending_bytes <= MAX_BYTES

    @invariant()
    def contents_match_the_model(self) -> None:
        if self.buf is None:
            return
        assert records(self.run(self.buf.read(0, 10_000))) == list(self.model.items())
        assert all(seq <= self.high_water for seq in self.model)

    @invariant()
    def the_ledger_matches_the_model(self) -> None:
        if self.buf is None:
            return
        assert self.run(self.buf.ledger()) == self.ledger_lines()

    @invariant()
    def every_offered_event_is_accounted_for(self) -> None:
        for reason in REASONS:
            assert self.metrics.value("events_dropped_total", reason=reason) == self.dropped[
                reason], reason
        dropped = self.metrics.total("events_dropped_total")
        assert dropped == sum(self.dropped.values())
        assert self.metrics.value("buffer_appended_total") == self.stored
        assert self.metrics.value("buffer_deleted_total") == self.deleted
        assert self.metrics.value("drop_reports_total") == self.reports
        # pending + acknowledged + dropped (before or after being stored) = offered
        assert len(self.model) + self.deleted + dropped == self.offered


def records(got: list[BufferedRecord]) -> list[tuple[int, Stored]]:
    return [(r.seq, Stored(r.type, r.subject, r.body)) for r in got]


BufferMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBufferStateMachine = BufferMachine.TestCase


@pytest.mark.parametrize("when_full", ["drop_oldest", "drop_newest"])
async def test_a_report_on_a_full_buffer_keeps_max_bytes(
        tmp_path: Path, when_full: Literal["drop_oldest", "drop_newest"]) -> None:
    """The minimal case the state machine found: a buffer filled to exactly ``max_bytes`` and one
    event refused as too large; its report must make room for itself like any event."""
    buf = DiskBuffer(BufferConfig(directory=tmp_path, max_bytes=MAX_BYTES, when_full=when_full,
                                  sync="off"), Metrics())
    await buf.open()
    try:
        ids = EventIds()

        def make(pad: int) -> DomainEvent:
            return DomainEvent(id=ids.next(), source="s", type=NORMAL, subject=SUBJECTS[0],
                               time=EVENT_TIME_START, data={"pad": "x" * pad})

        envelope = len(make(0).encode())
        await buf.append([make(MAX_BYTES - envelope)])  # exactly max_bytes: full, no drop
        await buf.append([make(MAX_BYTES)])  # too large: refused, in the ledger
        assert (buf.pending_bytes, len(await buf.ledger())) == (MAX_BYTES, 1)
        assert await buf.report_drops(GATEWAY) == 1
        assert buf.pending_bytes <= MAX_BYTES  # the report made room for itself
    finally:
        await buf.close()
