"""Counters and gauges with labels, rendered in the Prometheus text format.

Small on purpose: the daemon needs a handful of numbers (events in, out, dropped by reason,
buffer depth) that the health endpoint, the periodic stats log and the tests all read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[Labels, Callable[[], float]]] = defaultdict(dict)
        self._help: dict[str, str] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._counters[name][tuple(sorted(labels.items()))] += amount

    def value(self, name: str, **labels: str) -> float:
        """A counter's value for exactly these labels (0 when never incremented)."""
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def total(self, name: str) -> float:
        """A counter summed over all its labels."""
        return sum(self._counters.get(name, {}).values())

    def gauge(self, name: str, read: Callable[[], float], help_text: str = "",
              **labels: str) -> None:
        """Register ``read`` as the gauge ``name`` with these labels (replacing an earlier
        registration of the same series)."""
        self._gauges[name][tuple(sorted(labels.items()))] = read
        if help_text:
            self._help[name] = help_text

    def gauge_value(self, name: str, **labels: str) -> float | None:
        """A gauge's current value for exactly these labels (None when not registered)."""
        read = self._gauges.get(name, {}).get(tuple(sorted(labels.items())))
        return None if read is None else read()

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def snapshot(self) -> dict[str, float]:
        """Totals per counter and current gauge values (summed over labels), for logs and
        health."""
        out = {name: self.total(name) for name in self._counters}
        for name, series in self._gauges.items():
            out[name] = sum(read() for read in series.values())
        return out

    def render(self) -> str:
        lines: list[str] = []
        for name, series in sorted(self._counters.items()):
            if name in self._help:
                lines.append(f"# HELP {name} {self._help[name]}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in sorted(series.items()):
                lines.append(f"{name}{_fmt(labels)} {value:g}")
        for name, gauges in sorted(self._gauges.items()):
            if name in self._help:
                lines.append(f"# HELP {name} {self._help[name]}")
            lines.append(f"# TYPE {name} gauge")
            for labels, read in sorted(gauges.items()):
                lines.append(f"{name}{_fmt(labels)} {read():g}")
        return "\n".join(lines) + "\n"


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return "{" + inner + "}"
