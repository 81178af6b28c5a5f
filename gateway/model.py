"""The two values that cross every seam: :class:`Signal` and :class:`DomainEvent`.

A Source emits Signals (one raw reading of one address); the mapping engine turns them into
DomainEvents, shaped as CloudEvents 1.0 events. Times are Unix seconds (UTC) as floats: cheap
to take, compare and subtract; they are rendered as RFC 3339 only when an event is encoded.

The buffer stores an event as its structured-mode CloudEvent JSON (:meth:`DomainEvent.encode`),
so an event replayed after a crash is byte-for-byte what was accepted, same ``id`` included.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

SPECVERSION = "1.0"
JSON = "application/json"


class Quality(enum.StrEnum):
    """OPC UA's three-way quality, which every protocol's status maps onto."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


@dataclass(frozen=True, slots=True)
class Signal:
    """One reading of one address of one connection.

    ``tag`` is the canonical address string of the reading within its connection (an MQTT
    topic plus JSON path, an OPC UA node id, a Modbus register spec); the mapping engine binds
    mapping-file signals to ``(connection, tag)``.
    """

    connection: str
    tag: str
    value: Any
    quality: Quality = Quality.GOOD
    status: int | str | None = None
    """The protocol's raw status (OPC UA StatusCode, Modbus exception code, payload quality)."""
    source_time: float | None = None
    """When the device says the value was taken, if the protocol says so."""
    receive_time: float = field(default_factory=time.time)
    """When the gateway received it."""

    @property
    def time(self) -> float:
        """The event time this signal carries: the source timestamp when there is one."""
        return self.source_time if self.source_time is not None else self.receive_time


class EventIds:
    """Unique, cheap event ids: a random per-run prefix and a counter.

    A fresh ``uuid4()`` per event costs more than mapping it; this costs one string format.
    Ids are assigned once, before the event is buffered, and stored with it, so a replay after a
    crash carries the id of the first delivery attempt (consumers deduplicate on ``source`` +
    ``id``, as CloudEvents prescribes).
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self._counter):x}"


@dataclass(slots=True)
class DomainEvent:
    """A business event in the domain's language, as a CloudEvents 1.0 event.

    ``type`` is ``<domain>.<EventName>.v<major>``, e.g. ``production.MachineStateChanged.v1``;
    ``subject`` is the asset path (the Kafka key, so per-asset order holds); ``source`` names the
    gateway and connection (``/gateways/<gateway id>/connections/<connection>``).
    """

    id: str
    source: str
    type: str
    subject: str
    time: float
    data: dict[str, Any]
    dataschema: str | None = None
    datacontenttype: str = JSON

    def envelope(self) -> dict[str, Any]:
        """The structured-mode CloudEvent as a JSON-ready dict."""
        out: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": rfc3339(self.time),
            "datacontenttype": self.datacontenttype,
        }
        if self.dataschema is not None:
            out["dataschema"] = self.dataschema
        out["data"] = self.data
        return out

    def encode(self) -> bytes:
        """Structured-mode CloudEvent JSON: the buffer's record format."""
        return _encoder.encode(self.envelope())


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def decode_envelope(raw: bytes) -> dict[str, Any]:
    """Parse a buffered record back into its CloudEvent envelope dict."""
    value = _decoder.decode(raw)
    if not isinstance(value, dict):
        raise ValueError("buffered record is not a JSON object")
    return value


def encode_json(value: Any) -> bytes:
    return _encoder.encode(value)


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """``2026-11-28T22:09:01.123456Z`` without a datetime per call (the per-second part is cached)."""
    global _second_cache
    sec = int(ts)
    micros = round((ts - sec) * 1_000_000)
    if micros >= 1_000_000:
        sec, micros = sec + 1, micros - 1_000_000
    cached_sec, prefix = _second_cache
    if cached_sec != sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second_cache = (sec, prefix)
    return f"{prefix}.{micros:06d}Z"
