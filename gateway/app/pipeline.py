"""The ingest pipeline: source deliveries -> mapper -> durable buffer -> upstream acknowledgements.

Ordering and acknowledgement rules (the invariants the rest of the gateway relies on):

- Deliveries are processed strictly in arrival order, in batches (group commit): the pipeline
  takes whatever is queued, up to ``max_batch_events`` signals, maps it, and appends all
  resulting events to the buffer in one transaction.
- Only when that append has returned (durable per the buffer's sync mode) are the batch's
  ``Delivery.ack`` callbacks called, in order. A delivery that produced no event is
  acknowledged too, after the events of the deliveries before it.
- If the append fails (disk full, I/O error) nothing is acknowledged: the batch is retried with
  backoff and the sources are held back by the bounded queue, so upstream peers keep the data.
- The mapping engine's state changed by a batch (:meth:`Mapper.take_dirty_state`) is written
  in the same transaction as the batch's events, also when the batch fired none: what was
  acknowledged upstream is exactly what the saved state has seen, so a restart (even after
  ``kill -9``) continues counters, states and windows where the buffered events left them.
- A mapping bug on one signal never stops the stream: it is counted, logged and the signal is
  dropped (reason ``mapping_error``).
- An event whose ``data`` breaks the contract of its type (:mod:`gateway.mapping.contracts`)
  is not buffered: it is counted (``contract_violations_total{type}``), logged, and replaced by
  a dead-letter event of type ``gateway.ContractViolation.v1`` carrying the reason and the
  original data (its own topic through the topic template).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import msgspec

from gateway import logs
from gateway.buffer.disk import DiskBuffer
from gateway.mapping.contracts import dead_letter
from gateway.mapping.engine import Mapper, StateRecord
from gateway.metrics import Metrics
from gateway.model import DomainEvent, representable
from gateway.sources.base import Delivery
from gateway.trace import Recorder

UNENCODABLE = (ValueError, TypeError, OverflowError, msgspec.EncodeError)
"""What encoding an event may raise for a value JSON cannot carry (as opposed to an I/O error)."""

TICK_S = 1.0
"""How often time-based triggers (debounced edges) are evaluated without a new reading."""


class Pipeline:
    """Maps deliveries and appends the events durably before acknowledging upstream."""

    def __init__(self, mapper: Mapper, buffer: DiskBuffer, metrics: Metrics, *,
                 max_batch_events: int = 2000, queue_deliveries: int = 10_000) -> None:
        self.mapper = mapper
        self.buffer = buffer
        self.metrics = metrics
        self.max_batch_events = max_batch_events
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(queue_deliveries)
        self._log = logs.get("pipeline")
        self.failing_since: float | None = None
        """When appends began to fail (disk full, I/O error); None while they succeed."""
        self.last_append_time: float | None = None
        self.last_batch_time: float | None = None
        """When the latest batch was done (buffered and acknowledged); None before the first."""
        self.recorder: Recorder | None = None
        """When set (``run --record``), every reading is appended to a trace before mapping."""
        metrics.gauge("pipeline_queued_deliveries", lambda: float(self._queue.qsize()),
                      "Deliveries received from sources and not yet buffered")

    @property
    def queued(self) -> int:
        """Deliveries received and not yet taken into a batch."""
        return self._queue.qsize()

    async def emit(self, delivery: Delivery) -> None:
        """The sources' hand-off; waits while the queue is full (backpressure)."""
        await self._queue.put(delivery)

    async def run(self) -> None:
        """Process deliveries until cancelled; tick the mapper about once per second when its
        mappings have time-based triggers (debounced edges)."""
        next_tick = time.monotonic() + TICK_S
        while True:
            if self.mapper.needs_tick:
                try:
                    first = await asyncio.wait_for(self._queue.get(), max(0.0, next_tick - time.monotonic()))
                except TimeoutError:
                    first = None
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    await self._tick()
                if first is None:
                    continue
            else:
                first = await self._queue.get()
            batch = [first]
            self._take_more(batch)
            await self._process(batch)

    async def _tick(self) -> None:
        try:
            events = self.mapper.tick(time.time())
        except Exception:  # noqa: BLE001 - a bug in one trigger must not stop the stream
            self.metrics.inc("events_dropped_total", reason="mapping_error")
            self._log.exception("pipeline.tick_error")
            return
        if events:
            self.metrics.inc("events_mapped_total", len(events))
        state = self._take_state()
        if events or state:
            await self._append(events, state)

    async def drain(self) -> int:
        """Process whatever is queued now (used at shutdown, after the sources stopped)."""
        done = 0
        while not self._queue.empty():
            batch: list[Delivery] = []
            self._take_more(batch)
            await self._process(batch)
            done += len(batch)
        return done

    def _take_more(self, batch: list[Delivery]) -> None:
        signals = sum(len(d.signals) for d in batch)
        while signals < self.max_batch_events and not self._queue.empty():
            d = self._queue.get_nowait()
            batch.append(d)
            signals += len(d.signals)

    async def _process(self, batch: Sequence[Delivery]) -> None:
        if self.recorder is not None:
            self.recorder.write(s for d in batch for s in d.signals)
        events = self._map(batch)
        state = self._take_state()
        if events or state:
            await self._append(events, state)
        for d in batch:
            if d.ack is not None:
                try:
                    d.ack()
                except Exception:  # noqa: BLE001 - a broken upstream connection redelivers
                    self.metrics.inc("ack_errors_total")
                    self._log.warning("pipeline.ack_failed", exc_info=True)
        self.last_batch_time = time.time()

    def _take_state(self) -> list[StateRecord]:
        take = getattr(self.mapper, "take_dirty_state", None)  # stand-in mappers may have none
        return take() if take is not None else []

    def _map(self, batch: Sequence[Delivery]) -> list[DomainEvent]:
        events: list[DomainEvent] = []
        map_one: Callable[..., list[DomainEvent]] = self.mapper.map
        n = 0
        for d in batch:
            for s in d.signals:
                n += 1
                try:
                    events.extend(map_one(s))
                except Exception:  # noqa: BLE001 - one bad signal must not stop the stream
                    self.metrics.inc("events_dropped_total", reason="mapping_error")
                    self._log.exception("pipeline.mapping_error", connection=s.connection, tag=s.tag)
        self.metrics.inc("signals_mapped_total", n)
        self.metrics.inc("events_mapped_total", len(events))
        return events

    def _contracted(self, events: list[DomainEvent]) -> list[DomainEvent]:
        """Replace each event that breaks its type's contract by its dead-letter event."""
        contracts = getattr(self.mapper, "contracts", None)  # stand-in mappers may have none
        if not contracts:
            return events
        out = events
        for i, e in enumerate(events):
            contract = contracts.get(e.type)
            if contract is None:
                continue
            reason = contract.violation(e.data)
            if reason is None:
                continue
            if out is events:
                out = list(events)
            out[i] = dead_letter(e, reason)
            self.metrics.inc("contract_violations_total", type=e.type)
            self._log.warning("pipeline.contract_violation", type=e.type, subject=e.subject,
                              id=e.id, reason=reason)
        return out

    def _encodable(self, events: list[DomainEvent]) -> list[DomainEvent]:
        """Drop (count, log) the events the encoder refuses, e.g. a time past 9999 from a bad
        device clock, so one of them cannot pass for a disk failure and hold the stream."""
        kept = []
        for e in events:
            try:
                e.encode()
            except UNENCODABLE as exc:
                reason = "unencodable" if representable(e.time) else "invalid_time"
                self.metrics.inc("events_dropped_total", reason=reason)
                self._log.warning("pipeline.unencodable_event", type=e.type, subject=e.subject,
                                  reason=reason, error=str(exc)[:200])
            else:
                kept.append(e)
        return kept

    async def _append(self, events: list[DomainEvent], state: list[StateRecord]) -> None:
        events = self._contracted(events)
        delay = 0.2
        while True:
            try:
                await self.buffer.append(events, state)
            except UNENCODABLE:  # a value the encoder refuses (not an I/O error): drop just those
                events = self._encodable(events)
                if not events and not state:
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - disk full, I/O error: hold, ack nothing
                if self.failing_since is None:
                    self.failing_since = time.time()
                    self._log.error("pipeline.buffer_append_failed", error=str(exc),
                                    events=len(events), retry_in_s=delay)
                self.metrics.inc("buffer_append_errors_total")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if self.failing_since is not None:
                self._log.info("pipeline.buffer_append_recovered",
                               down_s=round(time.time() - self.failing_since, 1))
                self.failing_since = None
            self.last_append_time = time.time()
            return
