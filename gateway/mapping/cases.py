"""Inline test cases of mapping files, and the runner behind ``digispine-gateway test``.

A mapping file may end with ``tests:``, a list of cases. Each case feeds a sequence of raw
readings (``given``) through a fresh engine that knows only that file, and expects exactly the
listed events, in order (``expect``; an empty list means "no event"). Readings are given by
signal name; their raw value goes through the signal's conversion (type, scale, offset) as a
live reading would. Times are seconds from the start of the case (``at_s``; by default one
second after the previous reading), so durations in event data are deterministic.

Example::

    tests:
      - name: a state change carries the previous state
        given:
          - {signal: state, value: Idle}
          - {signal: state, value: Running, at_s: 90}
        expect:
          - {type: production.MachineStateChanged.v1, data: {state: Idle, previous_state: null}}
          - type: production.MachineStateChanged.v1
            data: {state: Running, previous_state: Idle}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from gateway.configbase import Strict

if TYPE_CHECKING:
    from gateway.mapping.loader import MappingFile
    from gateway.model import DomainEvent

CASE_EPOCH = 1_767_225_600.0
"""2026-01-01T00:00:00Z: the time of ``at_s: 0`` in every case, so event times are stable."""


class GivenReading(Strict):
    """One raw reading fed to the engine."""

    signal: str = Field(examples=["state", "temperature"])
    """Name of a signal of this file."""
    value: Any = Field(default=None, examples=["Running", 61.5, 1234, True])
    """The raw value, as the source would deliver it (before type conversion and scaling)."""
    quality: Literal["good", "uncertain", "bad"] = "good"
    """The reading's quality."""
    at_s: float | None = Field(default=None, ge=0, examples=[0, 2.5, 3600])
    """Seconds from the start of the case; default: one second after the previous reading."""


class ExpectedEvent(Strict):
    """One event the case expects, compared exactly (type and the whole ``data`` object)."""

    type: str = Field(examples=["production.MachineStateChanged.v1"])
    """The event type."""
    data: dict[str, Any] = Field(default_factory=dict, examples=[{"state": "Running"}])
    """The complete expected ``data`` object."""
    at_s: float | None = Field(default=None, ge=0)
    """If given, the event's time must be this many seconds from the start of the case."""


class MappingTest(Strict):
    """A test case: readings in, exactly these events out."""

    name: str = Field(min_length=1, examples=["a stroke emits one event"])
    """What the case shows, in one sentence."""
    given: list[GivenReading] = Field(min_length=1)
    """Readings, in order."""
    expect: list[ExpectedEvent] = Field(default_factory=list)
    """The events expected, in order; empty: no event at all."""


@dataclass(slots=True)
class CaseResult:
    file: Path
    name: str
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def run_cases(files: Sequence[MappingFile]) -> list[CaseResult]:
    """Run every inline case of every file, each on a fresh engine."""
    results: list[CaseResult] = []
    for mf in files:
        for case in mf.spec.tests:
            results.append(run_case(mf, case))
    return results


def run_case(mf: MappingFile, case: MappingTest) -> CaseResult:
    from gateway.mapping.engine import Mapper
    from gateway.model import Quality, Signal

    mapper = Mapper([mf], "test")
    result = CaseResult(mf.path, case.name)
    now = CASE_EPOCH - 1.0
    got: list[DomainEvent] = []
    for i, step in enumerate(case.given):
        spec = mf.spec.signals.get(step.signal)
        if spec is None:
            known = ", ".join(mf.spec.signals)
            result.problems.append(f"given[{i}]: unknown signal {step.signal!r} (signals: {known})")
            return result
        now = CASE_EPOCH + step.at_s if step.at_s is not None else now + 1.0
        signal = Signal(connection=spec.connection, tag=spec.address.tag, value=step.value,
                        quality=Quality(step.quality), source_time=now, receive_time=now)
        got.extend(mapper.tick(now))
        got.extend(mapper.map(signal))
    result.problems.extend(_compare(case.expect, got))
    return result


def _compare(expected: Sequence[ExpectedEvent], got: Sequence[DomainEvent]) -> list[str]:
    problems: list[str] = []
    for i, (want, have) in enumerate(zip(expected, got, strict=False), start=1):
        problems.extend(_diff(i, want, have))
    for i, have in enumerate(got[len(expected):], start=len(expected) + 1):
        problems.append(f"event {i}: unexpected {have.type} {_show(have.data)}")
    for i, want in enumerate(expected[len(got):], start=len(got) + 1):
        problems.append(f"event {i}: missing {want.type} {_show(want.data)}")
    return problems


def _diff(n: int, want: ExpectedEvent, have: DomainEvent) -> list[str]:
    out = []
    if want.type != have.type:
        out.append(f"event {n}: type {have.type}, expected {want.type}")
    for key in sorted(set(want.data) | set(have.data)):
        if key not in have.data:
            out.append(f"event {n}: data.{key} missing, expected {_show(want.data[key])}")
        elif key not in want.data:
            out.append(f"event {n}: data.{key} = {_show(have.data[key])} not expected")
        elif not _equal(want.data[key], have.data[key]):
            out.append(f"event {n}: data.{key} = {_show(have.data[key])}, "
                       f"expected {_show(want.data[key])}")
    if want.at_s is not None and abs(have.time - (CASE_EPOCH + want.at_s)) > 1e-6:
        out.append(f"event {n}: at_s = {have.time - CASE_EPOCH:g}, expected {want.at_s:g}")
    return out


def _equal(want: Any, have: Any) -> bool:
    """Equal values of equal kinds; numbers within rounding (12 == 12.0, True != 1)."""
    if isinstance(want, bool) or isinstance(have, bool):
        return type(want) is type(have) and want == have
    if isinstance(want, int | float) and isinstance(have, int | float):
        return math.isclose(want, have, rel_tol=1e-9, abs_tol=1e-12)
    return bool(want == have)


def _show(value: Any) -> str:
    from gateway.model import encode_json

    try:
        return encode_json(value).decode()
    except TypeError:
        return repr(value)
