"""The Mapper: Signals in, DomainEvents out, by the rules of the mapping files.

Everything that can be decided from the files is decided once, at construction: an index
``(connection, tag) -> bindings``, one value converter per signal, one data extractor per event
field, the ``source`` string per connection. :meth:`Mapper.map` then does dictionary lookups,
comparisons and one :class:`~gateway.model.DomainEvent` per fired event: no pydantic, no uuid,
no datetime. It is synchronous and never raises on a reading; call it from one thread (the
daemon's event loop).

State, per signal per file (two files reading one tag keep separate state):

- ``value``: the last good converted value (kept through bad readings), null until one arrives;
- ``previous``: the last good value that differed from ``value`` (null until there is one);
- ``quality``: ``good``, ``uncertain`` or ``bad`` of the latest reading (a value that cannot be
  converted makes the reading bad; :attr:`Mapper.conversion_errors` counts those).

Per event, the on_change trigger keeps the last emitted value of its signal (its baseline).
A good or uncertain reading fires the event when its value differs from the baseline, for
numbers with a deadband by strictly more than ``absolute`` or ``|baseline| * percent / 100``.
The first value fires with ``on_first_value: emit`` and only sets the baseline with ``skip``.
A bad reading never fires. When one reading updates several signals of a file (the same tag
bound twice), all of them are updated before any trigger is evaluated, so data fields see the
whole reading.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from gateway.mapping.loader import MappingFile
from gateway.mapping.spec import (
    AttributeSource,
    ConstSource,
    DataSource,
    EventSpec,
    MappingSpec,
    PreviousSource,
    QualitySource,
    SignalSource,
    SignalSpec,
)
from gateway.model import DomainEvent, EventIds, Quality, Signal

Converter = Callable[[Any], Any]
"""Raw value -> converted value; raises :class:`ConversionError` when it cannot."""

_QUALITY_TEXT: dict[Any, str] = {q: q.value for q in Quality}
_QUALITY_TEXT.update({q.value: q.value for q in Quality})


class ConversionError(ValueError):
    """A raw value does not convert to its signal's type; the message says why."""


class _SignalState:
    """What a file knows of one of its signals."""

    __slots__ = ("convert", "name", "previous", "quality", "reason", "subject", "value")

    def __init__(self, subject: str, name: str, convert: Converter) -> None:
        self.subject = subject
        self.name = name
        self.convert = convert
        self.value: Any = None
        self.previous: Any = None
        self.quality: str | None = None
        self.reason: str | None = None
        """Why the latest reading is bad, when the mapping decided so (conversion failure)."""


class _Rule:
    """One event of one file: its on_change trigger, baseline and data extractors."""

    __slots__ = (
        "absolute",
        "baseline",
        "dataschema",
        "fields",
        "has_baseline",
        "ratio",
        "skip_first",
        "state",
        "subject",
        "type",
    )

    def __init__(
        self,
        event: EventSpec,
        subject: str,
        states: dict[str, _SignalState],
        attributes: dict[str, Any],
    ) -> None:
        trigger = event.trigger
        self.type = event.type
        self.subject = subject
        self.dataschema = event.dataschema
        self.state = states[trigger.signal]
        self.fields = tuple(
            (name, _extractor(src, states, attributes)) for name, src in event.data.items()
        )
        deadband = trigger.deadband
        self.absolute = deadband.absolute if deadband is not None else None
        self.ratio = deadband.percent / 100.0 if deadband and deadband.percent is not None else None
        self.skip_first = trigger.on_first_value == "skip"
        self.baseline: Any = None
        self.has_baseline = False

    def fires(self, value: Any) -> bool:
        """Whether ``value`` (good, converted) is a change; moves the baseline when it is."""
        if not self.has_baseline:
            self.baseline, self.has_baseline = value, True
            return not self.skip_first
        base = self.baseline
        changed: bool
        if self.absolute is not None:
            changed = abs(value - base) > self.absolute
        elif self.ratio is not None:
            changed = abs(value - base) > abs(base) * self.ratio
        else:
            changed = value != base
        if changed:
            self.baseline = value
        return changed

    def data(self) -> dict[str, Any]:
        """The event's data object, built from the current state."""
        return {name: get() for name, get in self.fields}


class _Binding:
    """What one reading of one ``(connection, tag)`` touches in one file."""

    __slots__ = ("rules", "source", "states")

    def __init__(
        self, states: tuple[_SignalState, ...], rules: tuple[_Rule, ...], source: str
    ) -> None:
        self.states = states
        self.rules = rules
        self.source = source


class Mapper:
    """Turns Signals into DomainEvents by the rules of a set of mapping files.

    Attributes:
        files: The mapping files, as given.
        gateway_id: This gateway's id (part of every event's ``source``).
        ids: The event id generator.
        conversion_errors: Readings whose value did not convert to the signal's type (in total).
        conversion_errors_by_signal: The same, per ``(subject, signal name)``.
        last_conversion_error: A sentence on the latest conversion failure, for logs.
        unmatched: Readings that no mapping file binds.
    """

    def __init__(
        self, files: Sequence[MappingFile], gateway_id: str, ids: EventIds | None = None
    ) -> None:
        """Index the files.

        Args:
            files: Validated mapping files (from :func:`gateway.mapping.loader.load_mappings`).
            gateway_id: This gateway's id.
            ids: Event id generator; a fresh one (random prefix) by default.
        """
        self.files = list(files)
        self.gateway_id = gateway_id
        self.ids = ids if ids is not None else EventIds()
        self.conversion_errors = 0
        self.conversion_errors_by_signal: Counter[tuple[str, str]] = Counter()
        self.last_conversion_error: str | None = None
        self.unmatched = 0
        self._next_id = self.ids.next
        self._index: dict[tuple[str, str], tuple[_Binding, ...]] = {}
        self._bindings: dict[str, dict[str, Any]] = {}
        for file in self.files:
            self._add_file(file.spec)

    def _add_file(self, spec: MappingSpec) -> None:
        subject = spec.asset.subject
        states = {
            name: _SignalState(subject, name, converter(sig)) for name, sig in spec.signals.items()
        }
        attributes = dict(spec.asset.attributes)
        rules = [_Rule(ev, subject, states, attributes) for ev in spec.events.values()]
        by_key: dict[tuple[str, str], list[_SignalState]] = {}
        for name, sig in spec.signals.items():
            address = sig.address
            by_key.setdefault((sig.connection, address.tag), []).append(states[name])
            self._bindings.setdefault(sig.connection, {}).setdefault(address.tag, address)
        for key, bound in by_key.items():
            fired = tuple(rule for rule in rules if rule.state in bound)
            source = f"/gateways/{self.gateway_id}/connections/{key[0]}"
            binding = _Binding(tuple(bound), fired, source)
            self._index[key] = (*self._index.get(key, ()), binding)

    def bindings(self) -> dict[str, list[Any]]:
        """Connection name -> the distinct address models to read on it (one per tag).

        Returns:
            For each connection used by a file, its address models (e.g.
            :class:`~gateway.sources.mqtt.MqttAddress`) in first-use order, deduplicated by
            ``.tag``.
        """
        return {conn: list(by_tag.values()) for conn, by_tag in self._bindings.items()}

    def map(self, signal: Signal) -> list[DomainEvent]:
        """The events one reading fires (often none). Never raises on a reading's content.

        Args:
            signal: One reading.

        Returns:
            The fired events, in file order, then event declaration order within a file.
        """
        bound = self._index.get((signal.connection, signal.tag))
        if bound is None:
            self.unmatched += 1
            return []
        out: list[DomainEvent] = []
        quality = _QUALITY_TEXT.get(signal.quality, Quality.BAD.value)
        raw = signal.value
        for binding in bound:
            for state in binding.states:
                self._update(state, raw, quality)
            for rule in binding.rules:
                state = rule.state
                if state.quality != "bad" and rule.fires(state.value):
                    out.append(
                        DomainEvent(
                            self._next_id(),
                            binding.source,
                            rule.type,
                            rule.subject,
                            signal.time,
                            rule.data(),
                            rule.dataschema,
                        )
                    )
        return out

    def _update(self, state: _SignalState, raw: Any, quality: str) -> None:
        if quality == "bad":
            state.quality, state.reason = quality, None
            return
        try:
            value = state.convert(raw)
        except ConversionError as exc:
            self._conversion_failed(state, str(exc))
            return
        if state.value is not None and value != state.value:
            state.previous = state.value
        state.value, state.quality, state.reason = value, quality, None

    def _conversion_failed(self, state: _SignalState, reason: str) -> None:
        state.quality, state.reason = "bad", reason
        self.conversion_errors += 1
        self.conversion_errors_by_signal[(state.subject, state.name)] += 1
        self.last_conversion_error = f"{state.subject} signal {state.name}: {reason}"


# --- data extractors -----------------------------------------------------------------------


def _extractor(
    source: DataSource, states: dict[str, _SignalState], attributes: dict[str, Any]
) -> Callable[[], Any]:
    """A no-argument function returning the field's current value (names already linted)."""
    if isinstance(source, SignalSource):
        state = states[source.signal]
        return lambda: state.value
    if isinstance(source, PreviousSource):
        state = states[source.previous]
        return lambda: state.previous
    if isinstance(source, QualitySource):
        state = states[source.quality]
        return lambda: state.quality
    if isinstance(source, AttributeSource):
        return _constant(attributes[source.attribute])
    if isinstance(source, ConstSource):
        return _constant(source.const)
    raise TypeError(f"unknown data source {source!r}")  # pragma: no cover - the union is closed


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


# --- value conversion ----------------------------------------------------------------------


def converter(signal: SignalSpec) -> Converter:
    """The function converting raw readings of ``signal`` to its ``type`` (scale/offset applied).

    Raises (the returned function):
        ConversionError: when a raw value does not convert.
    """
    if signal.type == "string":
        return _to_string
    if signal.type == "boolean":
        return _to_boolean
    base = _to_float if signal.type == "float" else _to_integer
    if signal.scale == 1 and signal.offset == 0:
        return base
    scale, offset = signal.scale, signal.offset
    if signal.type == "integer":
        scale, offset = int(scale), int(offset)
    return lambda raw: base(raw) * scale + offset


def _to_string(raw: Any) -> str:
    if type(raw) is str:
        return raw
    if isinstance(raw, (str, int, float, bool)):
        return str(raw)
    raise ConversionError(f"expected a scalar for a string signal, got {_show(raw)}")


_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


def _to_boolean(raw: Any) -> bool:
    if type(raw) is bool:
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ConversionError(f"expected true/false or 0/1 for a boolean signal, got {_show(raw)}")


def _to_float(raw: Any) -> float:
    if type(raw) is float:
        value = raw
    elif isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except (ValueError, OverflowError):
            raise ConversionError(
                f"expected a number for a float signal, got {_show(raw)}"
            ) from None
    else:
        raise ConversionError(f"expected a number for a float signal, got {_show(raw)}")
    if not math.isfinite(value):
        raise ConversionError(f"expected a finite number for a float signal, got {_show(raw)}")
    return value


def _to_integer(raw: Any) -> int:
    if type(raw) is int:
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConversionError(f"expected a whole number for an integer signal, got {_show(raw)}")
    if isinstance(raw, int):
        return int(raw)
    try:
        value = float(raw)
    except ValueError:
        raise ConversionError(
            f"expected a whole number for an integer signal, got {_show(raw)}"
        ) from None
    if not value.is_integer():
        raise ConversionError(f"expected a whole number for an integer signal, got {_show(raw)}")
    return int(value)


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."
