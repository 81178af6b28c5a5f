"""The Source seam: a source owns one connection and emits :class:`Delivery` batches of Signals.

Contract (every protocol module implements it):

- ``Source.run(emit)`` connects, subscribes or polls, and awaits ``emit(delivery)`` for every
  batch of readings until cancelled. ``emit`` returns once the batch is accepted by the
  pipeline; it may wait (backpressure).
- ``Delivery.ack`` (when set) is called by the pipeline after the events produced from the
  delivery, or the fact that it produced none, are durably in the buffer. A source that can
  defer its upstream acknowledgement (MQTT QoS 1 PUBACK) does it there, never earlier.
- On losing its peer, ``run`` raises :class:`~gateway.errors.SourceUnavailable`; the supervisor
  owns the retry policy (backoff, log once when down and once when back). A source knows nothing
  of events, mappings or Kafka.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.model import Signal


@dataclass(slots=True)
class Delivery:
    """Signals that arrived together, and how to acknowledge them upstream once durable."""

    signals: list[Signal]
    ack: Callable[[], None] | None = None
    size_hint: int = field(default=1)


Emit = Callable[[Delivery], Awaitable[None]]


class Source(Protocol):
    """One connection of one protocol."""

    name: str

    async def run(self, emit: Emit) -> None:
        """Stream deliveries into ``emit`` until cancelled; raise SourceUnavailable on loss."""
        ...
