"""Bounded log volume: a line repeated a thousand times costs BURST lines per window, and the
next one written says how many were suppressed; other kinds of lines are not affected."""

from __future__ import annotations

import io
import json
import logging

import structlog

from gateway import logs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_processor_counts_and_reports_suppressed_lines() -> None:
    clock = Clock()
    limit = logs.RateLimit(burst=3, window_s=60, clock=clock)
    written = []
    for _ in range(10):
        try:
            written.append(limit(None, "warning", {"component": "modbus", "source": "plc",
                                                   "event": "modbus.unit_down"}))
        except structlog.DropEvent:
            pass
    other = limit(None, "info", {"component": "modbus", "source": "plc2", "event": "modbus.unit_down"})
    assert len(written) == 3 and "suppressed" not in other
    clock.now = 61
    again = limit(None, "warning", {"component": "modbus", "source": "plc", "event": "modbus.unit_down"})
    assert again["suppressed"] == 7
    clock.now = 130
    quiet = limit(None, "warning", {"component": "modbus", "source": "plc", "event": "modbus.unit_down"})
    assert "suppressed" not in quiet


def test_configured_logging_bounds_our_lines_and_library_lines() -> None:
    out = io.StringIO()
    saved = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    logs.configure("info", "json", stream=out)
    try:
        log = logs.get("test", source="s1")
        for i in range(logs.BURST + 30):
            log.warning("test.flood", n=i)
        log.info("test.other")
        library = logging.getLogger("asyncua.client")
        for _ in range(logs.BURST + 5):
            library.warning("library complaint")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
    finally:  # later tests capture logs at every level: leave logging as it was
        structlog.configure(**saved)
        root.handlers[:], root.level = saved_handlers, saved_level
    flood = [e for e in lines if e["event"] == "test.flood"]
    assert [e["n"] for e in flood] == list(range(logs.BURST))
    assert any(e["event"] == "test.other" for e in lines)
    assert sum(1 for e in lines if e["event"] == "library complaint") == logs.BURST
