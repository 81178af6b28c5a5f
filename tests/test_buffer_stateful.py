"""The disk buffer against a model, driven by Hypothesis through random appends, reads, deletes
and restarts, with a small ``max_bytes`` so that both ``when_full`` policies drop events.

The model is what the buffer promises (gateway/buffer/disk.py):

- the stored events, seq -> (type, subject, body), in seq order, and the counters;
- ``pending_events`` / ``pending_bytes`` are the model's count and ``sum(len(body))``;
- ``read(after, limit)`` returns exactly the model's next ``limit`` records, in seq order;
- a seq grows strictly and is never reused, not after deletes, not after a reopen;
- every offered event is either pending, deleted by the forwarder, or counted in
  ``events_dropped_total`` under its reason;
- an event larger than ``max_bytes`` is dropped alone (``event_too_large``);
- ``drop_newest`` keeps the past: buffered events stay, the offered events are accepted in
  order until the first that does not fit (``buffer_full_newest``);
- ``drop_oldest`` keeps the present: the events that stay are the newest that fit, i.e. the
  oldest are dropped first, buffered or just offered (``buffer_full_oldest``).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
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

from gateway.buffer.disk import BufferConfig, BufferedRecord, DiskBuffer
from gateway.metrics import Metrics
from gateway.model import DomainEvent, EventIds

pytestmark = pytest.mark.timeout(900)  # a failure shrinks for up to 5 minutes

MAX_BYTES = 65_536  # the smallest BufferConfig allows: a handful of events fill it
REASONS = ("event_too_large", "buffer_full_oldest", "buffer_full_newest")
TYPES = ("production.CountChanged.v1", "process.TemperatureChanged.v1")
SUBJECTS = ("acme/plant1/press1", "acme/plant1/oven1")

# An event's body is its envelope (~230 bytes) plus the pad: small ones, ones of which a few
# fill the buffer, ones near max_bytes (some fit alone, some are too large), and too large.
pads = st.one_of(
    st.integers(0, 2_000),
    st.integers(8_000, 30_000),
    st.integers(MAX_BYTES - 600, MAX_BYTES + 200),
    st.integers(MAX_BYTES, 2 * MAX_BYTES),
)
specs = st.tuples(st.sampled_from(TYPES), st.sampled_from(SUBJECTS), pads)


@dataclass(frozen=True, slots=True)
class Stored:
    type: str
    subject: str
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="buffer-stateful-"))
        self.metrics = Metrics()
        self.ids = EventIds()
        self.n = itertools.count()
        self.config: BufferConfig | None = None
        self.buf: DiskBuffer | None = None
        self.model: dict[int, Stored] = {}  # insertion order == seq order
        self.high_water = 0
        self.read_seqs: set[int] = set()
        self.offered = 0
        self.stored = 0
        self.deleted = 0
        self.dropped: Counter[str] = Counter()

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
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pending_bytes(self) -> int:
        return sum(s.size for s in self.model.values())

    def make(self, spec: tuple[str, str, int]) -> DomainEvent:
        type_, subject, pad = spec
        n = next(self.n)
        return DomainEvent(id=self.ids.next(), source="digispine-gateway/gw1/plc", type=type_,
                           subject=subject, time=1_700_000_000.0 + n,
                           data={"n": n, "pad": "x" * pad})

    # -- rules ----------------------------------------------------------------------------

    @initialize(when_full=st.sampled_from(["drop_oldest", "drop_newest"]))
    def start(self, when_full: Literal["drop_oldest", "drop_newest"]) -> None:
        self.config = BufferConfig(directory=self.directory, max_bytes=MAX_BYTES,
                                   when_full=when_full, sync="off")
        self.buf = self.open_buffer()

    @rule(batch=st.lists(specs, max_size=8))
    def append(self, batch: list[tuple[str, str, int]]) -> None:
        assert self.buf is not None and self.config is not None
        events = [self.make(spec) for spec in batch]
        offered = [Stored(e.type, e.subject, e.encode()) for e in events]
        kept, evicted = self.expect_append(offered)

        self.run(self.buf.append(events))

        self.offered += len(events)
        for seq in evicted:
            del self.model[seq]
        # The new records are the ones after the old high-water mark, in offered order.
        new = self.run(self.buf.read(self.high_water, 1_000))
        assert [Stored(r.type, r.subject, r.body) for r in new] == kept
        seqs = [r.seq for r in new]
        assert seqs == sorted(set(seqs)), "seqs of one append must strictly increase"
        assert all(seq > self.high_water for seq in seqs), "a seq was reused"
        self.stored += len(new)
        for r in new:
            self.model[r.seq] = Stored(r.type, r.subject, r.body)
        if new:
            self.high_water = new[-1].seq
        assert self.buf.last_seq == self.high_water

    def expect_append(self, offered: list[Stored]) -> tuple[list[Stored], list[int]]:
        """What the buffer must keep of ``offered`` and which buffered seqs it must evict;
        counts the expected drops by reason."""
        assert self.config is not None
        fitting = [s for s in offered if s.size <= MAX_BYTES]
        self.dropped["event_too_large"] += len(offered) - len(fitting)
        if len(fitting) < len(offered):
            event("append: an event larger than max_bytes")
        if sum(s.size for s in fitting) > MAX_BYTES:
            event("append: a batch larger than max_bytes")
        if self.config.when_full == "drop_newest":
            room, kept = MAX_BYTES - self.pending_bytes, []
            for s in fitting:
                if s.size > room:
                    break  # the first that does not fit, and every later one, is refused
                kept.append(s)
                room -= s.size
            self.dropped["buffer_full_newest"] += len(fitting) - len(kept)
            if len(kept) < len(fitting):
                event("append: drop_newest refused offered events")
            return kept, []
        # drop_oldest: everything goes in, then the oldest go until the rest fits
        queue: list[tuple[int | None, Stored]] = [*self.model.items(), *((None, s) for s in fitting)]
        total = sum(s.size for _, s in queue)
        while total > MAX_BYTES:
            _, s = queue.pop(0)
            total -= s.size
            self.dropped["buffer_full_oldest"] += 1
        staying = {q for q, _ in queue}
        evicted = [seq for seq in self.model if seq not in staying]
        kept = [s for q, s in queue if q is None]
        if evicted:
            event("append: drop_oldest evicted buffered events")
        if len(kept) < len(fitting):
            event("append: drop_oldest dropped offered events")
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
        """Stop and start the gateway: everything survives, the high-water mark included."""
        assert self.buf is not None
        self.run(self.buf.close())
        self.buf = None
        self.buf = self.open_buffer()
        assert self.buf.last_seq == self.high_water
        event(f"reopen: {'empty' if not self.model else 'with pending events'}")

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
    def every_offered_event_is_accounted_for(self) -> None:
        for reason in REASONS:
            assert self.metrics.value("events_dropped_total", reason=reason) == self.dropped[
                reason], reason
        dropped = self.metrics.total("events_dropped_total")
        assert dropped == sum(self.dropped.values())
        assert self.metrics.value("buffer_appended_total") == self.stored
        assert self.metrics.value("buffer_deleted_total") == self.deleted
        # pending + acknowledged + dropped (before or after being stored) = offered
        assert len(self.model) + self.deleted + dropped == self.offered


def records(got: list[BufferedRecord]) -> list[tuple[int, Stored]]:
    return [(r.seq, Stored(r.type, r.subject, r.body)) for r in got]


BufferMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBufferStateMachine = BufferMachine.TestCase
