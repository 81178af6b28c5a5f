"""structlog set-up: human console lines on a terminal, one JSON object per line otherwise.

Every line carries ``component`` (and ``source`` where there is one): get loggers with
:func:`get`. Values under secret-looking keys are masked before rendering, whatever the caller
passed.

Log volume is bounded: each kind of line (component, source and event name; a library's logger
and message) is written at most :data:`BURST` times per :data:`WINDOW_S` seconds; the rest are
dropped and counted, and the next line of that kind written carries ``suppressed=<n>``. A
device that fails a thousand times a minute costs a few lines, not a full disk.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_WORDS = ("password", "secret", "token", "credential", "private_key")


def get(component: str, **context: Any) -> Any:
    """A logger bound to a component (``daemon``, ``mqtt``, ``buffer``, ``kafka``, ...)."""
    return structlog.get_logger().bind(component=component, **context)


def _mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "**********"
    return event


BURST = 20
"""Lines of one kind written per window before the rest are suppressed."""
WINDOW_S = 60.0


class RateLimit:
    """A structlog processor: at most ``burst`` lines per kind per ``window_s``."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S,
                 clock: Any = time.monotonic) -> None:
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._kinds: dict[tuple[Any, ...], list[float]] = {}
        """kind -> [window start, lines written in it, lines suppressed since last written]"""

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        kind = (event.get("component"), event.get("source"), str(event.get("event"))[:200])
        now = self.clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window_s:
            if len(self._kinds) > 10_000:  # unbounded kinds (messages with numbers): start over
                self._kinds.clear()
            suppressed = state[2] if state is not None else 0
            state = self._kinds[kind] = [now, 0, suppressed]
        if state[1] >= self.burst:
            state[2] += 1
            raise structlog.DropEvent
        state[1] += 1
        if state[2]:
            event["suppressed"] = int(state[2])
            state[2] = 0
        return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog and route the libraries' stdlib logging (aiokafka, asyncua) through it."""
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_secrets,
    ]
    limit = RateLimit()
    if as_json:
        shared.append(structlog.processors.format_exc_info)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, limit, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through stdlib logging: render them the same way, one level up
    # (aiokafka is chatty at INFO about every reconnect attempt).
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _as_component],
        )
    )
    handler.addFilter(_LibraryLimit(limit))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


class _LibraryLimit(logging.Filter):
    """The same bound for the libraries' stdlib log records (by logger and message)."""

    def __init__(self, limit: RateLimit) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        event = {"component": record.name, "source": None, "event": record.getMessage()}
        try:
            self.limit(None, record.levelname.lower(), event)
        except structlog.DropEvent:
            return False
        if event.get("suppressed"):
            record.msg = f"{record.getMessage()} ({event['suppressed']} similar lines suppressed)"
            record.args = ()
        return True


def _as_component(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("component", event.pop("logger", "library"))
    return event
