"""The two values that cross every seam: :class:`Signal` and :class:`DomainEvent`.

A Source emits Signals (one raw reading of one address); the mapping engine turns them into
DomainEvents, shaped as CloudEvents 1.0 events. Times are Unix seconds (UTC) as floats: cheap
to take, compare and subtract; they are rendered as RFC 3339 only when an event is encoded.

The buffer stores an event as its structured-mode CloudEvent JSON (:meth:`DomainEvent.encode`),
so an event replayed after a crash is byte-for-byte what was accepted, same ``id`` included.

Event ids are deterministic (:func:`event_id`): the same readings give the same ids, in a replay
or when MQTT redelivers messages to a restarted gateway, so consumers can deduplicate.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import os
import time
from collections.abc import Callable
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
    """Unique, cheap counter ids: a random per-run prefix and a counter.

    Mapped events have deterministic ids (:func:`event_id`); a Mapper uses an ``EventIds`` only
    when given one, as an opt-in for tests and tools that want short per-run ids. It also
    serves code that builds events by hand (tests, benchmarks).
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self._counter):x}"


EventIdFunction = Callable[[float, str, Any, int], str]
"""``(time, tag, value, n) -> id``: the ids of one event of one mapping file (see
:func:`event_id`)."""


def event_ids_of(gateway_id: str, subject: str, local_id: str) -> EventIdFunction:
    """:func:`event_id` with the first three parts fixed, for the mapping engine: their part of
    the work (the personalisation) is done once, so an id costs one hash block for most
    readings. The returned function never raises (a value that is not JSON-encodable is hashed
    as its ``repr``, or, when even that fails, as ``<type name>``)."""
    person = hashlib.blake2b(
        _encoder.encode((gateway_id, subject, local_id)), digest_size=16
    ).digest()
    base = hashlib.blake2b(digest_size=16, person=person)
    encode = _encoder.encode

    def ids(time: float, tag: str, value: Any, n: int) -> str:
        try:
            message = encode((time + 0.0, tag, value, n))
        except (TypeError, ValueError, OverflowError):
            message = encode((time + 0.0, tag, _repr(value), n))
        h = base.copy()
        h.update(message)
        return h.hexdigest()

    return ids


def _repr(value: Any) -> str:
    """``repr(value)``, or its type's name when even that fails (an int of more digits than
    Python prints)."""
    try:
        return repr(value)
    except ValueError:
        return f"<{type(value).__name__}>"


def event_id(
    gateway_id: str, subject: str, local_id: str, time: float, tag: str, value: Any, n: int = 0
) -> str:
    """The id of a mapped event: a deterministic function of what produced it.

    The 32 lower-case hex digits of a BLAKE2b hash with a 16-byte digest of the compact JSON
    array ``[time, tag, value, n]`` (as :func:`encode_json` writes it: no blanks, UTF-8;
    ``time`` as a float, so ``5`` and ``5.0`` agree), personalised with the 16-byte BLAKE2b
    digest of the JSON array ``[gateway_id, subject, local_id]`` (BLAKE2's ``person``
    parameter: it separates the events without costing a hash block). The parts:

    - ``gateway_id``: the gateway's id (``gateway.id`` of the config);
    - ``subject``, ``local_id``: the event's asset subject and its id in the mapping file
      (``events.<local_id>``);
    - ``time``: the event's time, Unix seconds;
    - ``tag``, ``value``: the address and raw value of the reading that fired the event; ``""``
      and null for events no single reading fired (fired by the gateway's clock: a debounced
      edge confirmed by the periodic check, a signal gone stale, periodic snapshots; and window
      aggregates, whose window end identifies them whether a reading or the clock closed them);
    - ``n``: how many events the same trigger already fired at the same ``time`` (0 nearly
      always; it tells apart, say, two transitions with one timestamp).

    Replaying the same readings, or a broker redelivering them to a restarted gateway, yields
    the same ids; consumers deduplicate on ``source`` + ``id`` as CloudEvents prescribes.
    """
    return event_ids_of(gateway_id, subject, local_id)(time, tag, value, n)


@dataclass(slots=True)
class DomainEvent:
    """A business event in the domain's language, as a CloudEvents 1.0 event.

    ``type`` is ``<domain>.<EventName>.v<major>``, e.g. ``production.MachineStateChanged.v1``;
    ``subject`` is the asset path (the Kafka key, so per-asset order holds); ``source`` names the
    gateway and connection (``/gateways/<gateway id>/connections/<connection>``).

    ``id`` of a mapped event is deterministic (:func:`event_id`, unless the Mapper was given
    an :class:`EventIds`): a hash of the gateway id, the subject, the event's id in its mapping
    file, its time, the tag and raw value of the reading that fired it (none for events the
    clock fires, nor for window aggregates) and a count of earlier events of the same trigger
    at the same time. The same readings give the same ids, so consumers can deduplicate a
    replay or a redelivery.

    ``extensions``: CloudEvents extension attributes (lower-case alphanumeric names, string
    values), written into the envelope after the standard ones. The mapping engine gives every
    mapped event the provenance attributes of :data:`gateway.mapping.contracts.PROVENANCE_ATTRIBUTES`
    as one dict shared by the events of the same mapping event and address (never mutate it).
    """

    id: str
    source: str
    type: str
    subject: str
    time: float
    data: dict[str, Any]
    dataschema: str | None = None
    datacontenttype: str = JSON
    extensions: dict[str, str] | None = None

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
        if self.extensions:
            out.update(self.extensions)
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


LATEST_TIME = 253_402_300_800.0
"""10000-01-01T00:00:00Z: the first instant RFC 3339 (four-digit years) cannot write."""


def representable(ts: float) -> bool:
    """Whether ``ts`` (Unix seconds) can be an event time: 1970 up to the end of 9999."""
    return 0.0 <= ts < LATEST_TIME  # False for NaN too


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """``2026-11-28T22:09:01.123456Z`` without a datetime per call (the per-second part is cached)."""
    global _second_cache
    if not representable(ts):
        raise ValueError(f"event time {ts!r} is outside 1970-01-01 .. 9999-12-31")
    sec = int(ts)
    micros = round((ts - sec) * 1_000_000)
    if micros >= 1_000_000:
        sec, micros = sec + 1, micros - 1_000_000
    cached_sec, prefix = _second_cache
    if cached_sec != sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second_cache = (sec, prefix)
    return f"{prefix}.{micros:06d}Z"
