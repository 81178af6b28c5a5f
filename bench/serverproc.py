"""A benchmark's simulated server as a subprocess, and the STATS lines it prints.

The server module prints ``READY ...`` once it listens, then once a second
``STATS <monotonic> <counter> ... <cpu seconds>``: cumulative figures that
:meth:`ServerProcess.window` turns into rates over a client's measured window.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path


class ServerProcess:
    """``python -m <module> <args>`` in the repository, started and stopped by the bench."""

    def __init__(self, module: str, args: list[str], what: str, *, cpu_column: int) -> None:
        self.cpu_column = cpu_column
        self.stats: list[tuple[float, ...]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.ready_line = self.proc.stdout.readline()
        if not self.ready_line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{what} did not start: {self.ready_line!r}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts and parts[0] == "STATS":
                self.stats.append(tuple(float(p) for p in parts[1:]))

    def window(self, m0: float, m1: float) -> tuple[float, float]:
        """(count/s, CPU share of one core) of the server between two monotonic times, its
        cumulative counters interpolated linearly between the STATS samples (one a second)."""
        stats = list(self.stats)
        if len(stats) < 2 or m1 <= m0:
            return 0.0, 0.0

        def at(m: float, column: int) -> float:
            before = max((s for s in stats if s[0] <= m), default=stats[0], key=lambda s: s[0])
            after = min((s for s in stats if s[0] >= m), default=stats[-1], key=lambda s: s[0])
            if after[0] <= before[0]:
                return float(before[column])
            share = (m - before[0]) / (after[0] - before[0])
            return float(before[column] + share * (after[column] - before[column]))

        return ((at(m1, 1) - at(m0, 1)) / (m1 - m0),
                (at(m1, self.cpu_column) - at(m0, self.cpu_column)) / (m1 - m0))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
