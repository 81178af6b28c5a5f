"""Fault tests report their figures: one line per test, printed as it ends (visible with ``-s``)
and again in a "fault figures" section at the end of the run."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

_FIGURES: list[str] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., str]:
    """``figures(key=value, ...)``: records the test's one-line summary and returns it."""

    def record(**values: Any) -> str:
        parts = []
        for k, v in values.items():
            if isinstance(v, float):
                v = round(v, 4)
            parts.append(f"{k}={v}" if not isinstance(v, dict | list) else
                         f"{k}={json.dumps(v, separators=(',', ':'))}")
        line = f"{request.node.name}: " + " ".join(parts)
        _FIGURES.append(line)
        print(f"\n[faults] {line}")
        return line

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("fault figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
