"""A simulated device served on its own thread and event loop, for the demo and the tests.

Subclasses implement :meth:`ThreadedDevice._serve`: start listening, then call
:meth:`ThreadedDevice._serving` (which marks the device ready and ticks the simulation every
``interval_s`` until :meth:`stop`), then shut down. ``start`` returns once the device listens,
or raises RuntimeError saying why it cannot.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Awaitable, Callable

START_TIMEOUT_S = 30.0


class ThreadedDevice(abc.ABC):
    kind = "device"
    """What the device is, for messages (``the OPC UA server``)."""

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the device listens, for messages."""

    def start(self) -> None:
        """Start serving; raises RuntimeError when the device does not come up."""
        if self._thread is not None:
            return
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._main, name=f"demo-{type(self).__name__}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"{self.kind} did not start within {START_TIMEOUT_S:g} s")
        if self._error is not None:
            thread, self._thread = self._thread, None
            thread.join(timeout=5)
            raise RuntimeError(f"{self.kind} cannot serve {self.where}: "
                               f"{self._error}") from self._error

    def stop(self) -> None:
        """Stop serving (within a few seconds)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
        finally:
            self._loop = None
            self._ready.set()

    @abc.abstractmethod
    async def _serve(self) -> None:
        """Listen, run :meth:`_serving`, shut down."""

    async def _serving(self, tick: Callable[[float], Awaitable[None] | None]) -> None:
        """Ready: call ``tick(interval_s)`` every ``interval_s`` (skipping ahead when behind)
        until :meth:`stop`."""
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        next_tick = time.monotonic() + self.interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(),
                                       max(0.0, next_tick - time.monotonic()))
            if self._stopping.is_set():
                return
            next_tick += self.interval_s
            if next_tick < time.monotonic():  # fell behind: skip ahead
                next_tick = time.monotonic() + self.interval_s
            result = tick(self.interval_s)
            if result is not None:
                await result


def wait_for_interrupt() -> None:
    """For the devices' command lines: block until Ctrl-C or SIGTERM."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
