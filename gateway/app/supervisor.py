"""One place for retry policy: backoff with jitter, component state, "log once" transitions.

Sources and the forwarder report trouble by raising (``SourceUnavailable`` for a lost peer,
anything else for a bug); the supervisor restarts them with exponential backoff and logs a
state change once when a component goes down and once when it is back, never per retry
(Home Assistant's "log when unavailable" rule).
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway import logs
from gateway.errors import SourceUnavailable
from gateway.metrics import Metrics


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(slots=True)
class Component:
    """What the health endpoint shows of one supervised task."""

    name: str
    kind: str
    state: State = State.STARTING
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    restarts: int = 0
    down_since: float | None = None


class Supervisor:
    """Runs components as tasks and restarts them with backoff until stopped."""

    def __init__(self, metrics: Metrics, *, min_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 healthy_after_s: float = 10.0) -> None:
        self.metrics = metrics
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.components: dict[str, Component] = {}
        self.on_transition: Callable[[Component, bool, float | None], None] | None = None
        """Called with (component, up, seconds it was down) when a component comes up (first
        run, or back after an outage) or goes down (first failure of an episode)."""
        self._log = logs.get("supervisor")

    def set_state(self, name: str, state: State, error: str | None = None) -> None:
        """Record a state change; log only the first failure of an episode and the recovery."""
        comp = self.components[name]
        previous, comp.state, comp.since = comp.state, state, time.time()
        if error is not None:
            comp.last_error = error
        log = self._log.bind(component=comp.kind, source=name)
        if state == State.BACKOFF:
            if comp.down_since is None:
                comp.down_since = time.time()
                log.warning("component.unavailable", error=error)
                self._notify(comp, False, None)
            else:
                log.debug("component.retry_failed", error=error, restarts=comp.restarts)
        elif state == State.RUNNING and comp.down_since is not None:
            down_s = time.time() - comp.down_since
            log.info("component.recovered", down_s=round(down_s, 1), restarts=comp.restarts)
            comp.down_since = None
            self._notify(comp, True, down_s)
        elif state == State.RUNNING and previous != State.RUNNING:
            log.info("component.running")
            self._notify(comp, True, None)

    def _notify(self, comp: Component, up: bool, down_s: float | None) -> None:
        if self.on_transition is not None:
            try:
                self.on_transition(comp, up, down_s)
            except Exception:  # noqa: BLE001 - a status report must not break supervision
                self._log.exception("component.transition_report_failed", source=comp.name)

    def _mark_running(self, name: str, task: asyncio.Future[None]) -> None:
        if not task.done():
            self.set_state(name, State.RUNNING)

    async def supervise(self, name: str, kind: str, run: Callable[[], Awaitable[None]],
                        *, running_after_s: float = 2.0, min_backoff_s: float | None = None,
                        max_backoff_s: float | None = None) -> None:
        """Run ``run()`` until cancelled, restarting it after failures with backoff.

        ``run`` counts as running once it has lasted ``running_after_s``; the backoff starts at
        ``min_backoff_s``, doubles per failure up to ``max_backoff_s`` (the supervisor's
        defaults when not given), and resets after a run that lasted ``healthy_after_s``.
        """
        self.components[name] = comp = Component(name, kind)
        lowest = min_backoff_s if min_backoff_s is not None else self.min_backoff_s
        highest = max_backoff_s if max_backoff_s is not None else self.max_backoff_s
        delay = lowest
        while True:
            started = time.monotonic()
            comp.state = State.STARTING
            task = asyncio.ensure_future(run())
            mark = asyncio.get_running_loop().call_later(
                running_after_s, self._mark_running, name, task)
            try:
                await task
                error = "stopped unexpectedly"
            except asyncio.CancelledError:
                mark.cancel()
                task.cancel()
                comp.state = State.STOPPED
                raise
            except SourceUnavailable as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a bug: restart this one, keep the others
                error = f"{type(exc).__name__}: {exc}"
                self._log.bind(component=kind, source=name).exception("component.crashed")
            mark.cancel()
            if time.monotonic() - started > self.healthy_after_s:
                delay = lowest
            comp.restarts += 1
            self.metrics.inc("component_restarts_total", component=name)
            self.set_state(name, State.BACKOFF, error)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, highest)
