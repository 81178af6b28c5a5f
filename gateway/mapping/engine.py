"""The Mapper: Signals in, DomainEvents out, by the rules of the mapping files.

Everything that can be decided from the files is decided once, at construction: an index
``(connection, tag) -> bindings``, one value converter per signal (type, scale, offset, enum),
one evaluator object per event (a :class:`_Rule` subclass per trigger kind, its options
precomputed), one data extractor per event field, the ``source`` string per connection.
:meth:`Mapper.map` then does dictionary lookups, comparisons and one
:class:`~gateway.model.DomainEvent` per fired event: no pydantic, no uuid, no datetime. It is
synchronous and never raises on a reading; call it, and :meth:`Mapper.tick`, from one thread
(the daemon's event loop).

State is explicit and plain, so that it can be saved and restored (:meth:`Mapper.take_dirty_state`
gives what changed since the last call, which the pipeline writes to the buffer in the same
transaction as the events; :meth:`Mapper.restore_state` loads it at start-up): one :class:`SignalState` per
signal per file (:attr:`Mapper.signal_states`) and one state dataclass per event
(:attr:`Mapper.trigger_states`: :class:`OnChangeState`, :class:`TransitionState`,
:class:`EdgeState`, :class:`CounterState`, :class:`ThresholdState`, :class:`QualityState`,
:class:`PeriodicState`, :class:`WindowState`, :class:`ConditionState`), holding only numbers, strings, booleans and None.
Everything else in the Mapper is derived from the files (the counts of dropped or skipped
things for the metrics, e.g. :attr:`Mapper.window_late`, live on the rules and start at 0).

A signal's state (two files reading one tag keep separate state):

- ``value``: the last good converted value (kept through bad readings), null until one arrives;
  for a signal with ``enum`` codes, the label;
- ``previous``: the last good value that differed from ``value`` (null until there is one);
- ``quality``: ``good``, ``uncertain`` or ``bad`` of the latest reading (a value that cannot be
  converted, or is not in the signal's ``enum``, makes the reading bad;
  :attr:`Mapper.conversion_errors` counts those).

Triggers (``docs/mapping.md`` has the user's view):

- ``on_change``: fires when the value differs from the last emitted one (its baseline), for
  numbers with a deadband by strictly more than ``absolute`` or ``|baseline| * percent / 100``;
- ``transition``: fires when the state differs from the trigger's current state and passes
  the ``from``/``to`` filters;
- ``edge``: fires when a boolean's level changes (after ``min_duration_ms`` of holding the new
  level, if set: confirmed by a later reading or by :meth:`Mapper.tick`);
- ``counter``: fires with the increment when a counter rose (rollover, reset and implausible
  jumps handled as documented on :class:`_CounterRule`);
- ``threshold``: fires ``enter`` when a number goes beyond its limit, ``leave`` when it is back
  past the limit minus the hysteresis;
- ``quality``: fires when a signal goes bad (a bad reading or a conversion failure), goes
  stale (no reading for ``stale_after_s`` by the gateway's clock, checked by :meth:`Mapper.tick`)
  and when it is good again;
- ``periodic``: a snapshot of the data fields at each multiple of ``every_s`` (Unix time),
  fired by :meth:`Mapper.tick`;
- ``window``: aggregates of a number's good readings per tumbling window of signal time, fired
  when a reading at or after the window's end arrives, or by :meth:`Mapper.tick` once the
  window's end plus ``grace_s`` has passed;
- ``condition``: fires on the rising edge of a boolean expression (``when``) over several
  signals, evaluated when one of them gets a reading; unknown (a signal without a value, or
  with a bad latest reading) fires nothing and keeps the last known result.

Expressions (``when`` and ``{expr: ...}`` fields) are compiled when the Mapper is built;
evaluations without a result are counted (:attr:`Mapper.expression_errors`,
:attr:`Mapper.expressions_without_value`).

Durations (``state_duration_s``) are in signal time: the reading's source timestamp (its
receive time when it has none), never the wall clock. A bad reading never fires a trigger and
never moves its state; it cancels an edge that is waiting out its ``min_duration_ms``. When one
reading updates several signals of a file (the same tag bound twice), all of them are updated
before any trigger is evaluated, so data fields see the whole reading.

Event ids are deterministic (:func:`gateway.model.event_id`): each rule hashes the gateway id,
its subject and event id, the event time, the firing reading's tag and raw value, and the number
of events it already fired at that time (kept in its state: ``last_event_time``,
``events_at_last_time``).
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgspec

from gateway.mapping.contracts import Contract, mapping_hash, provenance
from gateway.mapping.expr import CompiledExpr, EvalError
from gateway.mapping.loader import MappingFile, compile_expression
from gateway.mapping.spec import (
    AttributeSource,
    ConditionTrigger,
    ConstSource,
    CounterTrigger,
    DataSource,
    EdgeTrigger,
    EventSpec,
    ExprSource,
    OnChangeTrigger,
    PeriodicTrigger,
    PreviousSource,
    QualitySource,
    QualityTrigger,
    SignalSource,
    SignalSpec,
    ThresholdTrigger,
    TransitionTrigger,
    TriggerSource,
    WindowTrigger,
    trigger_signal,
)
from gateway.model import (
    JSON,
    DomainEvent,
    EventIdFunction,
    EventIds,
    Quality,
    Signal,
    event_ids_of,
    rfc3339,
)

Converter = Callable[[Any], Any]
"""Raw value -> converted value; raises :class:`ConversionError` when it cannot."""

_QUALITY_TEXT: dict[Any, str] = {q: q.value for q in Quality}
_QUALITY_TEXT.update({q.value: q.value for q in Quality})
_BAD = Quality.BAD.value  # an enum member's .value is a descriptor call: not on the hot path

STATE_FORMAT = 1
"""Version of the persisted state records (:meth:`Mapper.take_dirty_state`); part of every
fingerprint, so a gateway that changes a state dataclass starts those states fresh."""

StateRecord = tuple[str, str, bytes]
"""A persisted state: key (``signal\t<subject>\t<name>`` or ``event\t<subject>\t<event id>``),
fingerprint of the definition it belongs to, the state dataclass as JSON."""

_STATE_ENCODER = msgspec.json.Encoder()


class ConversionError(ValueError):
    """A raw value does not convert to its signal's type; the message says why."""


# --- state: plain data, one object per signal and per event --------------------------------


@dataclass(slots=True)
class SignalState:
    """What a file knows of one of its signals."""

    value: Any = None
    """The last good converted value (the label, for enum codes); None until one arrives."""
    previous: Any = None
    """The last good value that differed from ``value``; None until there is one."""
    quality: str | None = None
    """Quality of the latest reading: ``good``, ``uncertain`` or ``bad``; None until one."""
    reason: str | None = None
    """Why the latest reading is bad: the conversion failure, or ``bad quality`` (with the
    reading's protocol status, if it has one); None when it is not bad."""


@dataclass(slots=True)
class _EventIdState:
    """What every trigger state keeps for its event ids (keyword-only fields, after the
    trigger's own)."""

    last_event_time: float | None = field(default=None, kw_only=True)
    """The time of the trigger's latest event; None before its first."""
    events_at_last_time: int = field(default=0, kw_only=True)
    """How many events the trigger fired at ``last_event_time``: the next one at that time has
    this number in its id (see :func:`gateway.model.event_id`)."""


@dataclass(slots=True)
class OnChangeState(_EventIdState):
    """An on_change trigger's baseline: the value of its last emitted event."""

    baseline: Any = None
    has_baseline: bool = False


@dataclass(slots=True)
class TransitionState(_EventIdState):
    """A transition trigger's current state and when it was entered (signal time)."""

    state: Any = None
    """The current state; None until the first good reading."""
    since: float | None = None
    """When ``state`` was entered; None when it began before the first reading."""


@dataclass(slots=True)
class EdgeState(_EventIdState):
    """An edge trigger's confirmed level, and the level waiting out its debounce."""

    level: bool | None = None
    """The confirmed level; None until the first one."""
    since: float | None = None
    """Signal time the confirmed level began; None when it began before the first reading."""
    pending: bool | None = None
    """A new level not yet held for ``min_duration_ms``; None when there is none."""
    pending_since: float | None = None
    """Signal time of the first reading at the pending level."""
    pending_received: float | None = None
    """Receive time (gateway clock) of that reading, which :meth:`Mapper.tick` compares with."""


@dataclass(slots=True)
class CounterState(_EventIdState):
    """A counter trigger's baseline: the counter value of the last good reading."""

    last: int | None = None


@dataclass(slots=True)
class ThresholdState(_EventIdState):
    """A threshold trigger's side of the limit and since when (signal time)."""

    inside: bool | None = None
    """Whether the value is in the band; None until the first good reading."""
    since: float | None = None
    """When the current side was entered; None when before the first reading."""


@dataclass(slots=True)
class QualityState(_EventIdState):
    """A quality trigger's view of its signal: good, bad or stale, since when, and when the
    latest reading came."""

    quality: str | None = None
    """``good`` (good or uncertain), ``bad`` or ``stale``; None until the first reading (or the
    first stale check)."""
    since: float | None = None
    """When ``quality`` began (signal time; for stale, the latest reading's time plus
    ``stale_after_s``); None when it began before the gateway saw it."""
    last_time: float | None = None
    """Signal time of the latest reading, good or bad; None until one."""
    last_received: float | None = None
    """Receive time (gateway clock) of the latest reading, which :meth:`Mapper.tick` compares
    with; before any reading, the time of the first tick (the gateway began waiting then)."""


@dataclass(slots=True)
class ConditionState(_EventIdState):
    """A condition trigger's last known result and since when (signal time)."""

    value: bool | None = None
    """The last known result of ``when``; None until one (an unknown result leaves it)."""
    since: float | None = None
    """When ``value`` began; None when it began before the first known result."""


@dataclass(slots=True)
class PeriodicState(_EventIdState):
    """A periodic trigger's next boundary."""

    due: float | None = None
    """The next snapshot time (a multiple of ``every_s``); None until the first tick."""


@dataclass(slots=True)
class WindowState(_EventIdState):
    """A window trigger's open window, its running aggregates and the stream's clock."""

    start: float | None = None
    """Start of the open window; None when no window is open."""
    count: int = 0
    """Good readings in the open window."""
    total: float = 0.0
    """Their sum (for the mean)."""
    low: Any = None
    """Their minimum; None while the window is empty."""
    high: Any = None
    """Their maximum; None while the window is empty."""
    first: Any = None
    """The value of the earliest reading (by signal time); None while the window is empty."""
    first_time: float | None = None
    """The signal time of ``first``."""
    last: Any = None
    """The value of the latest reading (by signal time); None while the window is empty."""
    last_time: float | None = None
    """The signal time of ``last``."""
    accept_from: float | None = None
    """Readings with a signal time before this are late (their window is closed): the open
    window's start, or the end of the last closed one; None before the first reading."""
    clock: float | None = None
    """The latest signal time seen, and ..."""
    clock_received: float | None = None
    """... its receive time: :meth:`Mapper.tick` estimates the signal time now as
    ``clock + (now - clock_received)``, so a device clock that is off does not matter."""


TriggerState = (
    OnChangeState
    | TransitionState
    | EdgeState
    | CounterState
    | ThresholdState
    | QualityState
    | PeriodicState
    | WindowState
    | ConditionState
)


# --- signals and rules ----------------------------------------------------------------------


class _Signal:
    """One signal of one file: its identity, its converter and its state."""

    __slots__ = ("convert", "name", "spec", "st", "subject")

    def __init__(
        self, subject: str, name: str, convert: Converter, spec: SignalSpec | None = None
    ) -> None:
        self.subject = subject
        self.name = name
        self.convert = convert
        self.spec = spec
        self.st = SignalState()


def _copy_state(source: Any, target: Any) -> None:
    """Copy a state dataclass field by field (rules hold references to ``target``)."""
    for f in fields(target):
        setattr(target, f.name, getattr(source, f.name))


def _duration(start: float | None, end: float) -> float | None:
    """``end - start`` in seconds; None when the start is unknown or after the end (clock
    jumped back)."""
    if start is None or end < start:
        return None
    return end - start


class _Rule(abc.ABC):
    """One event of one file: its trigger evaluator, state and data extractors.

    Subclasses implement :meth:`fires` for their trigger kind (and :meth:`interrupt` and
    :meth:`tick` when bad readings or the clock fire them) and keep the trigger's state in
    ``st`` (a state dataclass). Values a trigger computes for ``{trigger: <attribute>}`` data
    fields live in slots named by :attr:`OUTPUTS`. :meth:`emit` makes the event.
    """

    __slots__ = (
        "dataschema", "event_id", "expr_errors", "ext", "fields", "guard", "guard_reads",
        "guarded", "ids", "provenance", "signal", "source", "subject", "type",
    )

    OUTPUTS: ClassVar[dict[str, str]] = {}
    """Trigger attribute (``{trigger: x}``) -> the slot holding its latest value."""
    st: TriggerState
    """The trigger's state (each subclass has a slot of its own state class)."""

    def __init__(
        self,
        trigger: Any,
        event_id: str,
        event: EventSpec,
        subject: str,
        signals: dict[str, _Signal],
        attributes: dict[str, Any],
        source: str,
        ids: EventIdFunction,
    ) -> None:
        self.event_id = event_id
        self.type = event.type
        self.subject = subject
        self.dataschema = event.dataschema
        self.source = source
        self.ids = ids
        self.ext: dict[str, str] | None = None
        """The provenance attributes of events no single reading fired (set by the Mapper)."""
        self.provenance: dict[str, dict[str, str]] = {}
        """Tag of a reading this rule watches -> the provenance attributes of the events it
        fires (set by the Mapper, once: events share these dicts)."""
        self.expr_errors: Counter[str] = Counter()
        self.guarded = 0
        self.guard: CompiledExpr | None = None
        self.guard_reads: tuple[tuple[str, SignalState], ...] = ()
        if event.when is not None:
            self.guard = compile_expression(event.when, _specs(signals), "boolean")
            self.guard_reads = _reads(self.guard, signals)
        name = trigger_signal(trigger)
        # A periodic trigger watches no signal: a state of its own that no reading updates.
        self.signal = signals[name].st if name is not None else SignalState()
        self.fields = tuple(
            (name, _extractor(src, signals, attributes, self)) for name, src in event.data.items()
        )

    @property
    def timed(self) -> bool:
        """Whether :meth:`Mapper.tick` must call :meth:`tick` (the clock may fire the event)."""
        return False

    @abc.abstractmethod
    def fires(self, value: Any, t: float, received: float) -> bool:
        """Whether a good reading (converted ``value``, signal time ``t``, gateway receive time
        ``received``) fires the event; updates the trigger's state either way."""

    def interrupt(self, t: float, received: float) -> bool:
        """A bad reading of the signal arrived: whether it fires the event (only quality
        triggers fire on one; state triggers do not move)."""
        return False

    def tick(self, now: float, out: list[DomainEvent]) -> None:  # noqa: B027 - no-op default
        """Append the events the gateway's clock (``now``, Unix seconds) fires."""

    def watched(self) -> tuple[SignalState, ...]:
        """The states of the signals whose readings :meth:`fires` evaluates."""
        return (self.signal,)

    def evaluate(self, expr: CompiledExpr, reads: tuple[tuple[str, SignalState], ...]) -> Any:
        """``expr`` over the current values (None for a signal without a value or with a bad
        latest reading); None when it has no value, the reason counted in ``expr_errors``."""
        try:
            return expr.evaluate(
                {name: (st.value if st.quality != "bad" else None) for name, st in reads}
            )
        except EvalError as exc:
            self.expr_errors[exc.reason] += 1
            return None

    def emit(self, out: list[DomainEvent], t: float, tag: str, value: Any) -> None:
        """Append the event fired at time ``t`` by the reading of ``tag`` with raw ``value``
        (``""`` and None when no single reading fired it), with its deterministic id; nothing
        (counted in ``guarded``) when the event's ``when`` guard is not true."""
        guard = self.guard
        if guard is not None and self.evaluate(guard, self.guard_reads) is not True:
            self.guarded += 1
            return
        st = self.st
        if st.last_event_time == t:
            n = st.events_at_last_time
            st.events_at_last_time = n + 1
        else:
            st.last_event_time, st.events_at_last_time, n = t, 1, 0
        out.append(
            DomainEvent(
                self.ids(t, tag, value, n),
                self.source,
                self.type,
                self.subject,
                t,
                {name: get() for name, get in self.fields},
                self.dataschema,
                JSON,
                self.provenance.get(tag, self.ext),
            )
        )


class _OnChangeRule(_Rule):
    __slots__ = ("absolute", "ratio", "skip_first", "st")

    st: OnChangeState

    def __init__(self, trigger: OnChangeTrigger, *args: Any) -> None:
        super().__init__(trigger, *args)
        deadband = trigger.deadband
        self.absolute = deadband.absolute if deadband is not None else None
        self.ratio = deadband.percent / 100.0 if deadband and deadband.percent is not None else None
        self.skip_first = trigger.on_first_value == "skip"
        self.st = OnChangeState()

    def fires(self, value: Any, t: float, received: float) -> bool:
        """A change from the baseline (beyond the deadband) fires and moves the baseline."""
        st = self.st
        if not st.has_baseline:
            st.baseline, st.has_baseline = value, True
            return not self.skip_first
        base = st.baseline
        changed: bool
        if self.absolute is not None:
            changed = abs(value - base) > self.absolute
        elif self.ratio is not None:
            changed = abs(value - base) > abs(base) * self.ratio
        else:
            changed = value != base
        if changed:
            st.baseline = value
        return changed


class _TransitionRule(_Rule):
    __slots__ = ("duration", "emit_first", "sources", "st", "targets")

    OUTPUTS: ClassVar[dict[str, str]] = {"state_duration_s": "duration"}

    st: TransitionState

    def __init__(self, trigger: TransitionTrigger, *args: Any) -> None:
        super().__init__(trigger, *args)
        self.sources = frozenset(trigger.from_) if trigger.from_ is not None else None
        self.targets = frozenset(trigger.to) if trigger.to is not None else None
        self.emit_first = trigger.on_first_value == "emit"
        self.duration: float | None = None
        self.st = TransitionState()

    def fires(self, value: Any, t: float, received: float) -> bool:
        """A state other than the current one is a transition; the filters decide if it fires.

        The first state has no previous state: with ``emit`` it fires unless a ``from``
        filter is set (an unknown state is in no list).
        """
        st = self.st
        before = st.state
        if value == before:
            return False
        targets = self.targets
        if before is None:
            st.state = value
            self.duration = None
            return (
                self.emit_first and self.sources is None and (targets is None or value in targets)
            )
        self.duration = _duration(st.since, t)
        st.state, st.since = value, t
        sources = self.sources
        return (sources is None or before in sources) and (targets is None or value in targets)


class _EdgeRule(_Rule):
    __slots__ = ("duration", "edge", "emit_first", "min_s", "on_falling", "on_rising", "st")

    OUTPUTS: ClassVar[dict[str, str]] = {"edge": "edge", "state_duration_s": "duration"}

    st: EdgeState

    def __init__(self, trigger: EdgeTrigger, *args: Any) -> None:
        super().__init__(trigger, *args)
        self.on_rising = trigger.edge in ("rising", "both")
        self.on_falling = trigger.edge in ("falling", "both")
        ms = trigger.min_duration_ms
        self.min_s = ms / 1000.0 if ms is not None else 0.0
        self.emit_first = trigger.on_first_value == "emit"
        self.duration: float | None = None
        self.edge: str | None = None
        self.st = EdgeState()

    @property
    def timed(self) -> bool:
        return self.min_s > 0

    def tick(self, now: float, out: list[DomainEvent]) -> None:
        """Confirm the pending level once it has held ``min_s`` by the gateway's clock."""
        at = self.held(now)
        if at is not None and self.confirm():
            self.emit(out, at, "", None)

    def fires(self, value: Any, t: float, received: float) -> bool:
        """A level other than the confirmed one becomes pending; it is confirmed (and may fire)
        once it has held ``min_s`` seconds of signal time. The confirmed level again cancels
        the pending one (a bounce)."""
        st = self.st
        if value == st.level:
            st.pending = None
            return False
        if st.level is None and not self.emit_first:
            st.level = value
            return False
        if st.pending != value:
            st.pending, st.pending_since, st.pending_received = value, t, received
        pending_since = st.pending_since
        if pending_since is not None and t - pending_since >= self.min_s:
            return self.confirm()
        return False

    def held(self, now: float) -> float | None:
        """For :meth:`Mapper.tick`: the signal time at which the pending level completed its
        ``min_s`` if the gateway clock says it has (``now`` minus its receive time), else None."""
        st = self.st
        if st.pending is None or st.pending_received is None or st.pending_since is None:
            return None
        if now - st.pending_received < self.min_s:
            return None
        return st.pending_since + self.min_s

    def confirm(self) -> bool:
        """The pending level becomes the level; whether that edge fires."""
        st = self.st
        level, start = bool(st.pending), st.pending_since
        assert start is not None
        self.duration = _duration(st.since, start)
        st.level, st.since = level, start
        st.pending = st.pending_since = st.pending_received = None
        self.edge = "rising" if level else "falling"
        return self.on_rising if level else self.on_falling

    def interrupt(self, t: float, received: float) -> bool:
        """A bad reading: the pending level did not demonstrably hold; it starts over."""
        st = self.st
        st.pending = st.pending_since = st.pending_received = None
        return False


class _CounterRule(_Rule):
    """Counter increments.

    - First good value: the baseline (no event, no delta).
    - Increase by ``d``: fires with ``delta = d``; above ``max_delta`` it is a jump: counted in
      ``jumps``, no event, the value becomes the baseline (the counter was evidently set).
    - Decrease with ``rollover_at``: if the wrapped increment ``rollover_at - last + value + 1``
      is at most ``max_delta`` it is a rollover and fires with that delta.
    - Any other decrease is a reset, counted in ``resets``: the value becomes the baseline;
      ``count_from_zero`` fires with ``delta = value`` (if positive and within ``max_delta``),
      ``ignore`` fires nothing.
    """

    __slots__ = ("count_from_zero", "delta", "jumps", "max_delta", "resets", "rollover_at", "st")

    OUTPUTS: ClassVar[dict[str, str]] = {"delta": "delta"}

    st: CounterState

    def __init__(self, trigger: CounterTrigger, *args: Any) -> None:
        super().__init__(trigger, *args)
        self.rollover_at = trigger.rollover_at
        self.max_delta = trigger.max_delta
        self.count_from_zero = trigger.on_reset == "count_from_zero"
        self.delta: int | None = None
        self.resets = 0
        self.jumps = 0
        self.st = CounterState()

    def fires(self, value: Any, t: float, received: float) -> bool:
        st = self.st
        last = st.last
        st.last = value
        if last is None or value == last:
            return False
        limit = self.max_delta
        if value > last:
            delta = value - last
        else:
            top = self.rollover_at
            wrapped = top - last + value + 1 if top is not None and 0 <= value <= last <= top else 0
            if wrapped > 0 and limit is not None and wrapped <= limit:
                self.delta = wrapped
                return True
            self.resets += 1
            if not self.count_from_zero or value <= 0:
                return False
            delta = value
        if limit is not None and delta > limit:
            self.jumps += 1
            return False
        self.delta = delta
        return True


class _ThresholdRule(_Rule):
    """In the band: ``sign * value > enter_at``; it stays in while ``sign * value > stay_at``.

    ``above: a`` is ``sign = 1, enter_at = a, stay_at = a - h``; ``below: b`` is
    ``sign = -1, enter_at = -b, stay_at = -(b + h)``.
    """

    __slots__ = (
        "crossing",
        "duration",
        "emit_first",
        "enter_at",
        "on_enter",
        "on_leave",
        "sign",
        "st",
        "stay_at",
    )

    OUTPUTS: ClassVar[dict[str, str]] = {"crossing": "crossing", "state_duration_s": "duration"}

    st: ThresholdState

    def __init__(self, trigger: ThresholdTrigger, *args: Any) -> None:
        super().__init__(trigger, *args)
        h = trigger.hysteresis
        if trigger.above is not None:
            self.sign, self.enter_at, self.stay_at = 1, trigger.above, trigger.above - h
        else:
            assert trigger.below is not None
            self.sign, self.enter_at, self.stay_at = -1, -trigger.below, -(trigger.below + h)
        self.on_enter = "enter" in trigger.crossings
        self.on_leave = "leave" in trigger.crossings
        self.emit_first = trigger.on_first_value == "emit"
        self.crossing: str | None = None
        self.duration: float | None = None
        self.st = ThresholdState()

    def fires(self, value: Any, t: float, received: float) -> bool:
        st = self.st
        was = st.inside
        v = self.sign * value
        inside = v > self.stay_at if was else v > self.enter_at
        if inside == was:
            return False
        if was is None:
            st.inside = inside
            if inside and self.emit_first and self.on_enter:
                self.crossing, self.duration = "enter", None
                return True
            return False
        self.duration = _duration(st.since, t)
        st.inside, st.since = inside, t
        if inside:
            self.crossing = "enter"
            return self.on_enter
        self.crossing = "leave"
        return self.on_leave


class _QualityRule(_Rule):
    """Good (good or uncertain readings), bad (a bad reading or a conversion failure) or stale
    (no reading for ``stale_after_s`` by the gateway's clock, see :meth:`tick`); a change fires
    if ``on`` lists the new quality. The first reading after start fires only if it is bad.
    """

    __slots__ = (
        "duration",
        "on_bad",
        "on_good",
        "on_stale",
        "previous",
        "quality",
        "reason",
        "st",
        "stale_after",
    )

    OUTPUTS: ClassVar[dict[str, str]] = {
        "quality": "quality",
        "previous_quality": "previous",
        "reason": "reason",
        "state_duration_s": "duration",
    }

    st: QualityState

    def __init__(self, trigger: QualityTrigger, *args: Any) -> None:
        super().__init__(trigger, *args)
        self.stale_after = trigger.stale_after_s
        self.on_bad = "bad" in trigger.on
        self.on_stale = "stale" in trigger.on
        self.on_good = "good" in trigger.on
        self.quality: str | None = None
        self.previous: str | None = None
        self.reason: str | None = None
        self.duration: float | None = None
        self.st = QualityState()

    @property
    def timed(self) -> bool:
        return self.stale_after is not None

    def _change(self, quality: str, reason: str | None, t: float) -> None:
        st = self.st
        was = st.quality
        self.previous, self.quality, self.reason = was, quality, reason
        self.duration = _duration(st.since, t) if was is not None else None
        st.quality, st.since = quality, (t if was is not None else None)

    def fires(self, value: Any, t: float, received: float) -> bool:
        st = self.st
        st.last_time, st.last_received = t, received
        was = st.quality
        if was == "good":
            return False
        self._change("good", None, t)
        return was is not None and self.on_good

    def interrupt(self, t: float, received: float) -> bool:
        st = self.st
        st.last_time, st.last_received = t, received
        if st.quality == "bad":
            return False
        self._change("bad", self.signal.reason or "bad quality", t)
        return self.on_bad

    def tick(self, now: float, out: list[DomainEvent]) -> None:
        """Stale once no reading came for ``stale_after_s`` (gateway clock); the event's time
        is the latest reading's time plus ``stale_after_s``. A signal never read since start
        is stale ``stale_after_s`` after the first tick."""
        st = self.st
        after = self.stale_after
        if after is None or st.quality == "stale":
            return
        if st.last_received is None:
            st.last_received = now  # nothing read yet: wait from now on
            return
        if now - st.last_received < after:
            return
        at = (st.last_time if st.last_time is not None else st.last_received) + after
        was = st.quality
        self._change("stale", f"no reading for {after:g} s", at)
        if was is None:
            st.since = at  # stale since now: a known start, unlike a first reading's quality
        if self.on_stale:
            self.emit(out, at, "", None)


def _first_read_signal(event: EventSpec) -> str | None:
    """The first signal the event's data reads (``signal``, ``previous`` or ``quality``)."""
    return next(iter(_read_signals(event)), None)


def _read_signals(event: EventSpec) -> list[str]:
    """The signals the event's data reads, each once, in field order."""
    out: list[str] = []
    for src in event.data.values():
        if isinstance(src, SignalSource):
            out.append(src.signal)
        elif isinstance(src, PreviousSource):
            out.append(src.previous)
        elif isinstance(src, QualitySource):
            out.append(src.quality)
    return list(dict.fromkeys(out))


class _PeriodicRule(_Rule):
    """A snapshot at every multiple of ``every_s`` (Unix time) that the gateway's clock passes.

    The first tick only sets the next boundary. A tick past several boundaries (the gateway was
    busy or suspended) emits one snapshot, for the latest, and counts the others in ``skipped``.
    A boundary is passed without a snapshot while none of the signals the data reads has a value.
    """

    __slots__ = ("every", "reads", "skipped", "st")

    st: PeriodicState

    def __init__(
        self, trigger: PeriodicTrigger, event_id: str, event: EventSpec, subject: str,
        signals: dict[str, _Signal], *args: Any,
    ) -> None:
        super().__init__(trigger, event_id, event, subject, signals, *args)
        self.every = trigger.every_s
        self.reads = tuple(signals[name].st for name in _read_signals(event) if name in signals)
        self.skipped = 0
        self.st = PeriodicState()

    @property
    def timed(self) -> bool:
        return True

    def fires(self, value: Any, t: float, received: float) -> bool:
        return False  # no reading fires a snapshot (and none is bound to this rule)

    def tick(self, now: float, out: list[DomainEvent]) -> None:
        st = self.st
        every = self.every
        boundary = math.floor(now / every) * every
        due = st.due
        if due is None or now < due - every:  # first tick, or the clock went back a period
            st.due = boundary + every
            return
        if now < due:
            return
        self.skipped += round((boundary - due) / every)
        st.due = boundary + every
        if any(state.value is not None for state in self.reads):
            self.emit(out, boundary, "", None)


def _reads(expr: CompiledExpr, signals: dict[str, _Signal]) -> tuple[tuple[str, SignalState], ...]:
    """The signals an expression reads, as ``(name, state)`` in file order."""
    return tuple((name, sig.st) for name, sig in signals.items() if name in expr.names)


def _specs(signals: dict[str, _Signal]) -> dict[str, SignalSpec]:
    out: dict[str, SignalSpec] = {}
    for name, sig in signals.items():
        if sig.spec is None:  # pragma: no cover - the Mapper always gives the spec
            raise ValueError(f"signal {name!r} has no spec to compile expressions against")
        out[name] = sig.spec
    return out


class _ConditionRule(_Rule):
    """The rising edge of a boolean expression over several signals.

    Evaluated whenever one of the signals it reads gets a reading (good or bad). A result that
    differs from the last known one moves the state; false (or nothing known) -> true fires.
    No result (a signal it needs has no value or a bad latest reading, or an evaluation error)
    is unknown: nothing fires and the last known result stands, so true, unknown, true is no
    edge, and false, unknown, true is one (``state_duration_s`` from the start of false).
    """

    __slots__ = ("condition", "duration", "emit_first", "reads", "st")

    OUTPUTS: ClassVar[dict[str, str]] = {"state_duration_s": "duration"}

    st: ConditionState

    def __init__(
        self, trigger: ConditionTrigger, event_id: str, event: EventSpec, subject: str,
        signals: dict[str, _Signal], *args: Any,
    ) -> None:
        super().__init__(trigger, event_id, event, subject, signals, *args)
        self.condition = compile_expression(trigger.when, _specs(signals), "boolean")
        self.reads = _reads(self.condition, signals)
        self.emit_first = trigger.on_first_value == "emit"
        self.duration: float | None = None
        self.st = ConditionState()

    def watched(self) -> tuple[SignalState, ...]:
        return tuple(st for _, st in self.reads)

    def fires(self, value: Any, t: float, received: float) -> bool:
        now = self.evaluate(self.condition, self.reads)
        st = self.st
        before = st.value
        if now is None or now == before:
            return False
        if before is None:
            st.value = now
            self.duration = None
            return bool(now) and self.emit_first
        self.duration = _duration(st.since, t)
        st.value, st.since = now, t
        return bool(now)


_MAX_EMPTY_WINDOWS = 1000
"""Most empty windows emitted at once (``emit_empty``), after a gap in the readings; the
earlier ones are skipped and counted."""


class _WindowRule(_Rule):
    """Aggregates of the good readings per tumbling window ``[start, start + every)`` of signal
    time (``start`` a multiple of ``every``).

    One window is open at a time: the first reading opens the one it falls in. A reading at or
    after its end closes it (and, with ``emit_empty``, the empty windows up to the reading's),
    then opens its own; :meth:`tick` closes it once the stream's clock (the latest signal time
    plus the gateway time elapsed since it was received) passes its end by ``grace``. A reading
    before the open window (its window is closed) is late: counted in ``late``, dropped.
    Closed windows queue in ``closed`` and :meth:`emit` turns each into an event timed at its
    end (no firing reading: a window's id is the same whichever way it closed).
    """

    __slots__ = (
        "closed",
        "count",
        "emit_empty",
        "every",
        "first",
        "grace",
        "high",
        "last",
        "late",
        "low",
        "mean",
        "skipped",
        "st",
        "window_start",
    )

    OUTPUTS: ClassVar[dict[str, str]] = {
        "count": "count",
        "min": "low",
        "max": "high",
        "mean": "mean",
        "first": "first",
        "last": "last",
        "window_start": "window_start",
    }

    st: WindowState

    def __init__(self, trigger: WindowTrigger, *args: Any) -> None:
        super().__init__(trigger, *args)
        self.every = trigger.every_s
        self.grace = trigger.grace_s
        self.emit_empty = trigger.emit_empty
        self.closed: list[tuple[float, int, float, Any, Any, Any, Any]] = []
        self.count = 0
        self.low: Any = None
        self.high: Any = None
        self.mean: float | None = None
        self.first: Any = None
        self.last: Any = None
        self.window_start: str | None = None
        self.late = 0
        self.skipped = 0
        self.st = WindowState()

    @property
    def timed(self) -> bool:
        return True

    def fires(self, value: Any, t: float, received: float) -> bool:
        st = self.st
        if st.accept_from is not None and t < st.accept_from:
            self.late += 1
            return False
        if not math.isfinite(t):
            return False  # a window of no time: nothing to aggregate it in
        if st.clock is None or t >= st.clock:
            st.clock, st.clock_received = t, received
        start = st.start
        if start is not None and t >= start + self.every:
            self._close_through(t)
            start = st.start
        if start is None:
            st.start = st.accept_from = math.floor(t / self.every) * self.every
        if st.count == 0:
            st.low = st.high = st.first = st.last = value
            st.first_time = st.last_time = t
            st.total = value
        else:
            st.total += value
            if value < st.low:
                st.low = value
            if value > st.high:
                st.high = value
            if st.first_time is not None and t < st.first_time:
                st.first, st.first_time = value, t
            if st.last_time is None or t >= st.last_time:
                st.last, st.last_time = value, t
        st.count += 1
        return bool(self.closed)

    def _close_through(self, limit: float) -> None:
        """Close the open window and, with ``emit_empty``, the empty ones after it that end at
        or before ``limit``; queue what they emit."""
        st = self.st
        start = st.start
        if start is None:
            return
        every = self.every
        end = start + every
        if st.count or self.emit_empty:
            self.closed.append((start, st.count, st.total, st.low, st.high, st.first, st.last))
        st.count, st.total = 0, 0.0
        st.low = st.high = st.first = st.last = st.first_time = st.last_time = None
        st.accept_from = end
        if not self.emit_empty:
            st.start = None
            return
        current = max(end, math.floor(limit / every) * every)  # the window ``limit`` is in
        empty = round((current - end) / every)
        if empty > _MAX_EMPTY_WINDOWS:
            self.skipped += empty - _MAX_EMPTY_WINDOWS
        for i in range(max(0, empty - _MAX_EMPTY_WINDOWS), empty):
            self.closed.append((end + i * every, 0, 0.0, None, None, None, None))
        st.start = st.accept_from = current

    def tick(self, now: float, out: list[DomainEvent]) -> None:
        st = self.st
        if st.start is None or st.clock is None or st.clock_received is None:
            return
        limit = st.clock + (now - st.clock_received) - self.grace
        if limit >= st.start + self.every and math.isfinite(limit):
            self._close_through(limit)
            self.emit(out, limit, "", None)  # each closed window is timed at its own end

    def emit(self, out: list[DomainEvent], t: float, tag: str, value: Any) -> None:
        """One event per closed window, timed at its end, with no firing reading."""
        closed, self.closed = self.closed, []
        every = self.every
        for start, count, total, low, high, first, last in closed:
            self.count, self.low, self.high, self.first, self.last = count, low, high, first, last
            try:
                self.mean = total / count if count else None
            except OverflowError:  # integers beyond a float's range
                self.mean = None
            try:
                self.window_start = rfc3339(start)
            except (OverflowError, OSError, ValueError):  # a date beyond the calendar's range
                self.window_start = None
            _Rule.emit(self, out, start + every, "", None)


_RULES: dict[type[Any], type[_Rule]] = {
    OnChangeTrigger: _OnChangeRule,
    TransitionTrigger: _TransitionRule,
    EdgeTrigger: _EdgeRule,
    CounterTrigger: _CounterRule,
    ThresholdTrigger: _ThresholdRule,
    QualityTrigger: _QualityRule,
    PeriodicTrigger: _PeriodicRule,
    WindowTrigger: _WindowRule,
    ConditionTrigger: _ConditionRule,
}


class _Binding:
    """What one reading of one ``(connection, tag)`` touches in one file."""

    __slots__ = ("rules", "signals", "states")

    def __init__(self, signals: tuple[_Signal, ...], rules: tuple[_Rule, ...]) -> None:
        self.signals = signals
        self.rules = rules
        self.states: tuple[tuple[str, Any], ...] = (
            *((_signal_key(s.subject, s.name), s.st) for s in signals),
            *((_event_key(r.subject, r.event_id), r.st) for r in rules),
        )
        """Persistence key -> state object of everything a reading here may change."""


def _signal_key(subject: str, name: str) -> str:
    return f"signal\t{subject}\t{name}"


def _event_key(subject: str, event_id: str) -> str:
    return f"event\t{subject}\t{event_id}"


def _fingerprint(kind: str, *specs: Any) -> str:
    """A short hash of a state's class and the definitions its meaning depends on."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{STATE_FORMAT}\t{kind}".encode())
    for spec in specs:
        if isinstance(spec, tuple):
            for part in spec:
                h.update(b"\x1e" + part.model_dump_json().encode())
        elif spec is None:
            h.update(b"\x1enull")
        else:
            h.update(b"\x1e" + spec.model_dump_json().encode())
    return h.hexdigest()


class Mapper:
    """Turns Signals into DomainEvents by the rules of a set of mapping files.

    Attributes:
        files: The mapping files, as given.
        gateway_id: This gateway's id (part of every event's ``source`` and ``id``).
        ids: The counter id generator passed as ``ids``, or None (deterministic ids).
        conversion_errors: Readings whose value did not convert to the signal's type, or was
            not one of its ``enum`` values (in total).
        conversion_errors_by_signal: The same, per ``(subject, signal name)``.
        last_conversion_error: A sentence on the latest conversion failure, for logs.
        unmatched: Readings that no mapping file binds.
        signal_states: ``(subject, signal name)`` -> its :class:`SignalState`.
        trigger_states: ``(subject, event id)`` -> its trigger's state dataclass.
    """

    def __init__(
        self, files: Sequence[MappingFile], gateway_id: str, ids: EventIds | None = None
    ) -> None:
        """Index the files.

        Args:
            files: Validated mapping files (from :func:`gateway.mapping.loader.load_mappings`).
            gateway_id: This gateway's id.
            ids: Omit it (the default, and what the daemon wants): event ids are a
                deterministic function of the readings (:func:`gateway.model.event_id`), so a
                replay or a redelivery yields the same ids and consumers can deduplicate.
                Given, an opt-in for tests and tools that want short per-run ids: every event
                gets ``ids.next()`` (``<prefix>-1``, ``<prefix>-2``, ...), unique but not
                reproducible.
        """
        self.files = list(files)
        self.contracts: dict[str, Contract] = {
            t: c for file in self.files for t, c in file.contracts.items()
        }
        """Event type -> contract, for the event types of the files that have one."""
        self.gateway_id = gateway_id
        self.ids = ids
        self.conversion_errors = 0
        self.conversion_errors_by_signal: Counter[tuple[str, str]] = Counter()
        self.last_conversion_error: str | None = None
        self.unmatched = 0
        self.signal_states: dict[tuple[str, str], SignalState] = {}
        self.trigger_states: dict[tuple[str, str], TriggerState] = {}
        self._index: dict[tuple[str, str], tuple[_Binding, ...]] = {}
        self._bindings: dict[str, dict[str, Any]] = {}
        self._counters: list[_CounterRule] = []
        self._periodics: list[_PeriodicRule] = []
        self._windows: list[_WindowRule] = []
        self._timed: list[_Rule] = []
        self._rules: list[_Rule] = []
        self._signal_specs: dict[tuple[str, str], Any] = {}
        self._event_specs: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._dirty: set[_Binding] = set()
        self._ticked = False
        self._written: dict[str, bytes] = {}
        self._fingerprints: dict[str, str] | None = None
        self.mapping_hashes: dict[str, str] = {}
        """Mapping file name -> its ``mappinghash`` (as its events carry it)."""
        for file in self.files:
            self._add_file(file)

    def _add_file(self, file: MappingFile) -> None:
        spec = file.spec
        subject = spec.asset.subject
        digest = self.mapping_hashes[file.path.name] = mapping_hash(file.path, spec)
        signals = {
            name: _Signal(subject, name, converter(sig), sig) for name, sig in spec.signals.items()
        }
        attributes = dict(spec.asset.attributes)
        rules: list[_Rule] = []
        for event_id, event in spec.events.items():
            trigger = event.trigger
            watched = trigger_signal(trigger)
            # A periodic snapshot's source is the connection of the first signal it reads.
            named = watched or _first_read_signal(event) or next(iter(spec.signals))
            source = self._source(spec.signals[named].connection)
            ids = self._ids_of(subject, event_id)
            rule_class = _RULES[type(trigger)]
            rule = rule_class(trigger, event_id, event, subject, signals, attributes, source, ids)
            rules.append(rule)
            self._rules.append(rule)
            self.trigger_states[(subject, event_id)] = rule.st
            self._event_specs[(subject, event_id)] = (
                event,
                spec.signals[watched] if watched is not None else None,
            )
            if isinstance(rule, _ConditionRule):
                # The source is the connection of the first signal it reads; its state
                # depends on the definitions of all of them.
                read = [name for name, _ in rule.reads]
                if read:
                    rule.source = self._source(spec.signals[read[0]].connection)
                self._event_specs[(subject, event_id)] = (
                    event,
                    tuple(spec.signals[name] for name in read),
                )
            if isinstance(rule, _CounterRule):
                self._counters.append(rule)
            if isinstance(rule, _PeriodicRule):
                self._periodics.append(rule)
            if isinstance(rule, _WindowRule):
                self._windows.append(rule)
            if rule.timed:
                self._timed.append(rule)
            contract = file.contracts.get(event.type)

            def provenance_of(name: str, contract: Contract | None = contract) -> dict[str, str]:
                sig = spec.signals[name]
                return provenance(file.path.name, spec, digest, contract, sig.connection,
                                  sig.address.tag)

            primary = named
            watched_names = [named] if watched is not None else []
            if isinstance(rule, _ConditionRule):
                watched_names = [name for name, _ in rule.reads]
                primary = watched_names[0] if watched_names else named
            rule.ext = provenance_of(primary)
            rule.provenance = {spec.signals[name].address.tag: provenance_of(name)
                               for name in watched_names}
            rule.provenance[spec.signals[primary].address.tag] = rule.ext
        by_key: dict[tuple[str, str], list[_Signal]] = {}
        for name, sig in spec.signals.items():
            self.signal_states[(subject, name)] = signals[name].st
            self._signal_specs[(subject, name)] = sig
            address = sig.address
            by_key.setdefault((sig.connection, address.tag), []).append(signals[name])
            self._bindings.setdefault(sig.connection, {}).setdefault(address.tag, address)
        for key, bound in by_key.items():
            states = [s.st for s in bound]
            fired = tuple(
                rule for rule in rules if any(w is st for w in rule.watched() for st in states)
            )
            binding = _Binding(tuple(bound), fired)
            self._index[key] = (*self._index.get(key, ()), binding)

    def _ids_of(self, subject: str, event_id: str) -> EventIdFunction:
        """The id function of one event: deterministic, or the opt-in counter."""
        if self.ids is None:
            return event_ids_of(self.gateway_id, subject, event_id)
        next_id = self.ids.next
        return lambda time, tag, value, n: next_id()

    def _source(self, connection: str) -> str:
        return f"/gateways/{self.gateway_id}/connections/{connection}"

    @property
    def counter_resets(self) -> int:
        """Counter decreases that were not rollovers (resets), over all counter triggers."""
        return sum(rule.resets for rule in self._counters)

    @property
    def counter_resets_by_event(self) -> Counter[tuple[str, str]]:
        """The same, per ``(subject, event id)`` (events without resets omitted)."""
        return Counter({(r.subject, r.event_id): r.resets for r in self._counters if r.resets})

    @property
    def counter_jumps(self) -> int:
        """Counter increases above ``max_delta``, dropped as implausible, over all triggers."""
        return sum(rule.jumps for rule in self._counters)

    @property
    def counter_jumps_by_event(self) -> Counter[tuple[str, str]]:
        """The same, per ``(subject, event id)`` (events without jumps omitted)."""
        return Counter({(r.subject, r.event_id): r.jumps for r in self._counters if r.jumps})

    @property
    def window_late(self) -> int:
        """Readings dropped by window triggers because their window was already closed."""
        return sum(rule.late for rule in self._windows)

    @property
    def window_late_by_event(self) -> Counter[tuple[str, str]]:
        """The same, per ``(subject, event id)`` (events without late readings omitted)."""
        return Counter({(r.subject, r.event_id): r.late for r in self._windows if r.late})

    @property
    def windows_skipped(self) -> int:
        """Empty windows not emitted (``emit_empty``) because a gap in the readings spanned
        more than 1000 windows at once (only the latest 1000 are emitted)."""
        return sum(rule.skipped for rule in self._windows)

    @property
    def snapshots_skipped(self) -> int:
        """Periodic boundaries passed without a snapshot because the gateway missed them (it
        was busy, suspended, or its clock jumped): one snapshot is taken for the latest."""
        return sum(rule.skipped for rule in self._periodics)

    @property
    def snapshots_skipped_by_event(self) -> Counter[tuple[str, str]]:
        """The same, per ``(subject, event id)`` (events without skipped boundaries omitted)."""
        return Counter({(r.subject, r.event_id): r.skipped for r in self._periodics if r.skipped})

    @property
    def expression_errors(self) -> Counter[str]:
        """Expression evaluations (``when`` conditions and ``{expr: ...}`` fields) without a
        result, by reason: ``bad_value``, ``division_by_zero``, ``overflow``. A field is then
        null, a condition unknown. ``no_value`` (a signal the expression needs has no value
        yet, or a bad latest reading: normal after start) is counted apart, in
        :attr:`expressions_without_value`."""
        out: Counter[str] = Counter()
        for rule in self._rules:
            out.update(rule.expr_errors)
        del out["no_value"]
        return out

    @property
    def expression_errors_by_event(self) -> Counter[tuple[str, str]]:
        """The same, in total per ``(subject, event id)`` (events without errors omitted)."""
        out: Counter[tuple[str, str]] = Counter()
        for rule in self._rules:
            n = sum(rule.expr_errors.values()) - rule.expr_errors["no_value"]
            if n:
                out[(rule.subject, rule.event_id)] = n
        return out

    @property
    def events_guarded(self) -> int:
        """Events whose trigger fired but whose ``when`` guard was false or unknown (dropped)."""
        return sum(rule.guarded for rule in self._rules)

    @property
    def events_guarded_by_event(self) -> Counter[tuple[str, str]]:
        """The same, per ``(subject, event id)`` (events without dropped ones omitted)."""
        return Counter({(r.subject, r.event_id): r.guarded for r in self._rules if r.guarded})

    @property
    def expressions_without_value(self) -> int:
        """Expression evaluations that had no result because a signal they need had no value
        (none yet, or a bad latest reading): the ``no_value`` reason, expected after start."""
        return sum(rule.expr_errors["no_value"] for rule in self._rules)

    @property
    def needs_tick(self) -> bool:
        """Whether any event depends on the clock, so :meth:`tick` must be called about once
        per second: a debounced edge, a quality trigger with ``stale_after_s``, a periodic
        or a window trigger."""
        return bool(self._timed)

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
        quality = _QUALITY_TEXT.get(signal.quality, _BAD)
        raw = signal.value
        received = signal.receive_time
        t = signal.source_time
        if t is None:
            t = received
        good = quality != "bad"
        dirty = self._dirty.add
        for binding in bound:
            dirty(binding)
            for sig in binding.signals:  # update the state (inlined: the hot path)
                st = sig.st
                if not good:
                    st.quality = quality
                    status = signal.status
                    st.reason = "bad quality" if status is None else f"bad quality, status {status}"
                    continue
                try:
                    value = sig.convert(raw)
                except ConversionError as exc:
                    self._conversion_failed(sig, str(exc))
                    continue
                before = st.value
                if before is not None and value != before:
                    st.previous = before
                st.value = value
                st.quality = quality
                st.reason = None
            for rule in binding.rules:
                state = rule.signal
                if state.quality == "bad":
                    if rule.interrupt(t, received):
                        rule.emit(out, t, signal.tag, raw)
                elif rule.fires(state.value, t, received):
                    rule.emit(out, t, signal.tag, raw)
        return out

    def adopt_state(self, old: Mapper) -> int:
        """Take over ``old``'s state where nothing changed (hot reload).

        A signal keeps its last value, previous value and quality when its definition (address,
        type, conversion, labels) is the same in both mappers; an event keeps its trigger state
        (current state and since when, counter baseline, threshold side, pending edge, quality
        and latest reading times, next periodic boundary, open window and its aggregates, a
        condition's last known result, and the id disambiguator) when the event and its
        trigger signal (for a condition: every signal its ``when`` reads) are unchanged. Everything
        else starts fresh, as at start-up. The counts for the metrics (late readings, skipped
        snapshots, counter resets, expression errors) start at 0.

        Returns:
            How many signal and trigger states were carried over.
        """
        carried = 0
        for key, state in self.signal_states.items():
            before = old.signal_states.get(key)
            if before is not None and old._signal_specs.get(key) == self._signal_specs[key]:
                _copy_state(before, state)
                self._carry_written(old, _signal_key(*key))
                carried += 1
        for key, tstate in self.trigger_states.items():
            previous = old.trigger_states.get(key)
            if (previous is not None and type(previous) is type(tstate)
                    and old._event_specs.get(key) == self._event_specs[key]):
                _copy_state(previous, tstate)
                self._carry_written(old, _event_key(*key))
                carried += 1
        return carried

    def _carry_written(self, old: Mapper, key: str) -> None:
        blob = old._written.get(key)
        if blob is not None:
            self._written[key] = blob

    def tick(self, now: float) -> list[DomainEvent]:
        """The events the gateway's clock fires. Call it about once per second when
        :attr:`needs_tick`, with the gateway's time (the pipeline does; the test cases and the
        replay call it with each reading's time before mapping the reading).

        - a debounced edge whose new level has held ``min_duration_ms`` since the gateway
          received its first reading (a signal read only on change may send no further
          reading to confirm it); time: that reading's time plus ``min_duration_ms``;
        - a quality trigger's signal without a reading for ``stale_after_s`` since the
          gateway received the latest; time: the latest reading's time plus ``stale_after_s``;
        - a periodic snapshot per boundary (multiple of ``every_s``) ``now`` has passed; time:
          the boundary;
        - a window whose end plus ``grace_s`` the stream's clock has passed (the latest signal
          time plus the gateway time elapsed since its reading came); time: the window's end.

        Comparing the gateway's clock with receive times keeps a skewed device clock out of
        it; event times stay in signal time, consistent with the events readings fire.

        Args:
            now: The gateway's current time, Unix seconds (``time.time()``).

        Returns:
            The fired events, in file order, then event declaration order within a file.
        """
        out: list[DomainEvent] = []
        for rule in self._timed:
            rule.tick(now, out)
        self._ticked = bool(self._timed)
        return out

    # -- persistence ------------------------------------------------------------------------

    def state_fingerprints(self) -> dict[str, str]:
        """Persistence key -> fingerprint of every state of this mapper.

        A fingerprint hashes the state's class, :data:`STATE_FORMAT` and the definitions the
        state's meaning depends on (as :meth:`adopt_state` compares them): a saved state is
        restored only into the same definition. Computed once, on first use.
        """
        if self._fingerprints is None:
            fps: dict[str, str] = {}
            for (subject, name), sig in self._signal_specs.items():
                fps[_signal_key(subject, name)] = _fingerprint("SignalState", sig)
            for (subject, event_id), (event, watched) in self._event_specs.items():
                kind = type(self.trigger_states[(subject, event_id)]).__name__
                fps[_event_key(subject, event_id)] = _fingerprint(kind, event, watched)
            self._fingerprints = fps
        return self._fingerprints

    def _state_objects(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            _signal_key(subject, name): st for (subject, name), st in self.signal_states.items()
        }
        for (subject, event_id), tst in self.trigger_states.items():
            out[_event_key(subject, event_id)] = tst
        return out

    def take_dirty_state(self) -> list[StateRecord]:
        """The states changed since the last call, as records to persist (and forget them).

        Every reading marks what it may have changed (its signals and the rules they fire),
        every :meth:`tick` the clock-driven rules; a state whose JSON equals the one last taken
        (or restored) is left out. The pipeline writes the records in the same buffer
        transaction as the events of the same readings, so the saved state always matches the
        buffered events and the acknowledged readings.
        """
        if not self._dirty and not self._ticked:
            return []
        changed: dict[str, Any] = {}
        for binding in self._dirty:
            changed.update(binding.states)
        self._dirty.clear()
        if self._ticked:
            for rule in self._timed:
                changed[_event_key(rule.subject, rule.event_id)] = rule.st
            self._ticked = False
        fps = self.state_fingerprints()
        written = self._written
        encode = _STATE_ENCODER.encode
        out: list[StateRecord] = []
        for key, st in changed.items():
            blob = encode(st)
            if written.get(key) != blob:
                written[key] = blob
                out.append((key, fps[key], blob))
        return out

    def restore_state(self, records: Sequence[StateRecord]) -> tuple[int, int]:
        """Load persisted states (at start-up) where their definition is unchanged.

        A record whose key this mapper does not have, whose fingerprint differs (the signal or
        event was edited) or that does not decode starts fresh, as on a first start.

        Returns:
            (restored, discarded) counts.
        """
        fps = self.state_fingerprints()
        states = self._state_objects()
        restored = discarded = 0
        for key, fingerprint, blob in records:
            st = states.get(key)
            if st is None or fps.get(key) != fingerprint:
                discarded += 1
                continue
            try:
                saved = msgspec.json.decode(blob, type=type(st))
            except msgspec.MsgspecError:
                discarded += 1
                continue
            _copy_state(saved, st)
            self._written[key] = blob
            restored += 1
        return restored, discarded

    def _conversion_failed(self, sig: _Signal, reason: str) -> None:
        sig.st.quality, sig.st.reason = "bad", reason
        self.conversion_errors += 1
        self.conversion_errors_by_signal[(sig.subject, sig.name)] += 1
        self.last_conversion_error = f"{sig.subject} signal {sig.name}: {reason}"


# --- data extractors -----------------------------------------------------------------------


def _extractor(
    source: DataSource, signals: dict[str, _Signal], attributes: dict[str, Any], rule: _Rule
) -> Callable[[], Any]:
    """A no-argument function returning the field's current value (names already linted)."""
    if isinstance(source, SignalSource):
        state = signals[source.signal].st
        return lambda: state.value
    if isinstance(source, PreviousSource):
        state = signals[source.previous].st
        return lambda: state.previous
    if isinstance(source, QualitySource):
        state = signals[source.quality].st
        return lambda: state.quality
    if isinstance(source, AttributeSource):
        return _constant(attributes[source.attribute])
    if isinstance(source, ConstSource):
        return _constant(source.const)
    if isinstance(source, ExprSource):
        expr = compile_expression(source.expr, _specs(signals), "any")
        reads = _reads(expr, signals)
        evaluate = rule.evaluate
        return lambda: evaluate(expr, reads)
    if isinstance(source, TriggerSource):
        slot = type(rule).OUTPUTS.get(source.trigger)
        if slot is None:  # the loader refuses this; a hand-built spec may not
            raise ValueError(f"{type(rule).__name__} has no attribute {source.trigger!r}")
        return lambda: getattr(rule, slot)
    raise TypeError(f"unknown data source {source!r}")  # pragma: no cover - the union is closed


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


# --- value conversion ----------------------------------------------------------------------


def converter(signal: SignalSpec) -> Converter:
    """The function converting raw readings of ``signal`` to its value: ``type``, then
    ``scale``/``offset``, then ``enum`` (a code becomes its label; a value not listed is
    refused).

    Raises (the returned function):
        ConversionError: when a raw value does not convert.
    """
    base = _typed_converter(signal)
    enum = signal.enum
    if enum is None:
        return base
    if isinstance(enum, dict):
        labels = dict(enum)
        known = _listing(f"{code!r}: {label}" for code, label in labels.items())

        def to_label(raw: Any) -> Any:
            value = base(raw)
            try:
                return labels[value]
            except (KeyError, TypeError):
                raise ConversionError(
                    f"expected one of the enum codes {{{known}}}, got {_show(value)}"
                ) from None

        return to_label
    allowed = frozenset(enum)
    listed = _listing(enum)

    def check(raw: Any) -> Any:
        value = base(raw)
        if value in allowed:
            return value
        raise ConversionError(f"expected one of the enum states {listed}, got {_show(value)}")

    return check


def _typed_converter(signal: SignalSpec) -> Converter:
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


def _listing(items: Any, limit: int = 12) -> str:
    shown = list(items)
    more = len(shown) - limit
    return ", ".join(shown[:limit]) + (f", ... ({more} more)" if more > 0 else "")


def _to_string(raw: Any) -> str:
    if type(raw) is str:
        return raw
    if isinstance(raw, (str, int, float, bool)):
        try:
            return str(raw)
        except ValueError:  # an integer of more than 4,300 digits
            raise ConversionError("number too long for a string signal") from None
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


INTEGER_LIMIT = 2**64
"""Integers a device can send fit 64 bits (int64 or uint64); larger ones are bad readings."""


def _to_integer(raw: Any) -> int:
    if type(raw) is int:
        if -INTEGER_LIMIT < raw < INTEGER_LIMIT:
            return raw
        raise ConversionError("integer reading outside the 64-bit range")
    if isinstance(raw, str) and len(raw) <= 40:
        try:
            return int(raw.strip())
        except ValueError:
            pass
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConversionError(f"expected a whole number for an integer signal, got {_show(raw)}")
    if isinstance(raw, int):
        if -INTEGER_LIMIT < raw < INTEGER_LIMIT:
            return int(raw)
        raise ConversionError("integer reading outside the 64-bit range")
    try:
        value = float(raw)
    except ValueError:
        raise ConversionError(
            f"expected a whole number for an integer signal, got {_show(raw)}"
        ) from None
    if not value.is_integer() or not -INTEGER_LIMIT < value < INTEGER_LIMIT:
        raise ConversionError(f"expected a whole number for an integer signal, got {_show(raw)}")
    return int(value)


def _show(raw: Any) -> str:
    try:
        text = repr(raw)
    except ValueError:  # an integer of more than 4,300 digits
        return f"a {type(raw).__name__} too long to show"
    return text if len(text) <= 60 else text[:57] + "..."
