"""Signal traces: record live readings to JSON lines, replay them through the mappings offline.

One reading per line, exactly the fields of :class:`~gateway.model.Signal`::

    {"connection":"plant_mqtt","tag":"acme/plant1/stamping/line2/press07/state#state",
     "value":"Running","quality":"good","status":null,"source_time":1795903771.25,
     "receive_time":1795903771.31}

``digispine-gateway run --record FILE`` appends every reading the sources deliver (before
mapping); ``digispine-gateway replay FILE`` feeds a trace through the configured mappings and
prints the events that would be sent, as structured CloudEvents (one JSON object per line),
without Kafka. Event ids are deterministic (see :func:`gateway.model.event_id`): a replay gives
the ids the live gateway gave the same readings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import msgspec

from gateway.errors import ConfigError, Finding
from gateway.model import Quality, Signal


class TraceLine(msgspec.Struct, forbid_unknown_fields=True):
    connection: str
    tag: str
    value: Any
    quality: Quality = Quality.GOOD
    status: int | str | None = None
    source_time: float | None = None
    receive_time: float = 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TraceLine)


class Recorder:
    """Appends readings to a trace file; one write per delivered batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: IO[bytes] = path.open("ab")

    def write(self, signals: Iterable[Signal]) -> None:
        lines = [
            _encoder.encode(TraceLine(s.connection, s.tag, s.value, s.quality, s.status,
                                      s.source_time, s.receive_time))
            for s in signals
        ]
        if lines:
            self._out.write(b"\n".join(lines) + b"\n")
            self._out.flush()

    def close(self) -> None:
        self._out.close()


def read(path: Path) -> Iterator[Signal]:
    """The readings of a trace, in order; a malformed line is a located error."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ConfigError([Finding(str(path), None, None, "", f"cannot read trace: {exc.strerror}")]) from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = _decoder.decode(raw)
            except msgspec.DecodeError as exc:
                raise ConfigError([Finding(str(path), number, None, "", f"not a trace line: {exc}")]) from None
            yield Signal(line.connection, line.tag, line.value, line.quality, line.status,
                         line.source_time, line.receive_time or (line.source_time or 0.0))


def replay(signals: Iterable[Signal], mapper: Any) -> Iterator[bytes]:
    """Structured CloudEvent JSON of every event the mapper makes of ``signals``, ticking the
    mapper at each reading's receive time, so debounced edges fire as they would have live."""
    for signal in signals:
        for event in (*mapper.tick(signal.receive_time), *mapper.map(signal)):
            yield event.encode()


def summary(signals: int, events: int, unmatched: int, errors: Sequence[str] = ()) -> str:
    text = f"replayed {signals} readings: {events} events, {unmatched} readings no mapping binds"
    return text + "".join(f"\n{e}" for e in errors)
