"""structlog set-up: human console lines on a terminal, one JSON object per line otherwise.

Every line carries ``component`` (and ``source`` where there is one): get loggers with
:func:`get`. Values under secret-looking keys are masked before rendering, whatever the caller
passed.
"""

from __future__ import annotations

import logging
import sys
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
    if as_json:
        shared.append(structlog.processors.format_exc_info)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


def _as_component(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("component", event.pop("logger", "library"))
    return event
