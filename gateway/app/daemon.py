"""``digispine-gateway run``: wire sources -> mapper -> buffer -> forwarder and supervise them.

Start order (Telegraf's agent, Vector's topology): settings and mappings are validated before
anything starts (exit 78 on any finding); the buffer opens (events left from the last run are
forwarded first) and the mapping state saved with it is restored where the mapping files did not
change the definition; the forwarder starts (it waits for Kafka on its own); the pipeline starts;
the sources start last. Then systemd hears ``READY=1``.

Stop order (SIGTERM, SIGINT): sources stop (nothing new is accepted), the pipeline drains what
is queued into the buffer and acknowledges it upstream, the forwarder gets a bounded deadline to
hand what it can to Kafka, the buffer closes. What Kafka did not take stays on disk for the next
start. Exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from gateway import __version__, logs
from gateway.app import status
from gateway.app.health import HealthServer, sd_notify
from gateway.app.pipeline import Pipeline
from gateway.app.supervisor import Component, State, Supervisor
from gateway.buffer.disk import DiskBuffer
from gateway.catalog import CatalogPublisher
from gateway.errors import BufferError, ConfigError, Finding
from gateway.mapping.engine import Mapper
from gateway.mapping.loader import MappingFile, load_mappings
from gateway.metrics import Metrics
from gateway.model import DomainEvent
from gateway.settings import GatewaySettings
from gateway.sinks.kafka import KafkaForwarder
from gateway.sources.base import Source
from gateway.sources.modbus import ModbusConnectionConfig, ModbusSource
from gateway.sources.mqtt import MqttConnectionConfig, MqttSource
from gateway.sources.opcua import OpcUaConnectionConfig, OpcUaSource
from gateway.trace import Recorder

SHUTDOWN_FLUSH_S = 10.0
STATUS_BACKLOG = 1000
"""Most status events (connection state changes) held while the buffer cannot take them."""
MAINTENANCE_S = 5.0
"""How often the buffer expires old events (``max_age_s``) and reports its drops."""
STALL_S = 120.0
"""Unhealthy (503, no watchdog ping) when Kafka is connected and the backlog has not moved for
this long, or the pipeline holds deliveries it has not buffered for this long."""


def build_sources(settings: GatewaySettings, mapper: Mapper, metrics: Metrics) -> list[Source]:
    """One source per connection that mapping files read from."""
    sources: list[Source] = []
    for name, addresses in sorted(mapper.bindings().items()):
        conn = settings.connections[name]
        if isinstance(conn, MqttConnectionConfig):
            client_id = conn.client_id or f"{settings.gateway.id}-{name}"
            sources.append(MqttSource(name, conn, addresses, client_id, metrics))
        elif isinstance(conn, OpcUaConnectionConfig):
            # The PKI (the gateway's own certificate, generated once) is state: it lives under
            # the buffer's state directory unless pki_dir is absolute.
            pki = (conn.pki_dir if conn.pki_dir.is_absolute()
                   else settings.buffer.directory / conn.pki_dir)
            sources.append(OpcUaSource(
                name, conn, addresses, metrics, pki_dir=pki,
                application_uri=f"urn:digispine:edge-gateway:{settings.gateway.id}"))
        elif isinstance(conn, ModbusConnectionConfig):
            sources.append(ModbusSource(name, conn, addresses, metrics))
        else:  # the mapping loader refuses these already; keep the daemon honest regardless
            raise ConfigError([Finding("config", None, None, f"connections.{name}",
                                       f"protocol {conn.protocol} has no source in this version")])
    return sources


class Daemon:
    """The running gateway."""

    def __init__(self, settings: GatewaySettings, mapping_files: list[MappingFile]) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.mapper = Mapper(mapping_files, settings.gateway.id)
        self.buffer = DiskBuffer(settings.buffer, self.metrics)
        self.forwarder = KafkaForwarder(settings.kafka, self.buffer, settings.gateway.id, self.metrics,
                                        provenance=True)
        self.catalog = CatalogPublisher(settings) if settings.kafka.catalog_publish else None
        self.pipeline = Pipeline(self.mapper, self.buffer, self.metrics,
                                 max_batch_events=settings.buffer.max_batch_events)
        self.sources = build_sources(settings, self.mapper, self.metrics)
        self.supervisor = Supervisor(self.metrics)
        self.metrics.gauge("mapping_conversion_errors", lambda: float(self.mapper.conversion_errors),
                           "Readings whose value did not convert to the signal's type (since start)")
        self.metrics.gauge("mapping_unmatched_signals", lambda: float(self.mapper.unmatched),
                           "Readings no mapping file binds (since start)")
        self.metrics.gauge("mapping_counter_resets", lambda: float(self.mapper.counter_resets),
                           "Counter decreases that were resets, not rollovers (since start)")
        self.metrics.gauge("mapping_counter_jumps", lambda: float(self.mapper.counter_jumps),
                           "Counter increases above max_delta, dropped as implausible")
        self.metrics.gauge("mapping_window_late_readings", lambda: float(self.mapper.window_late),
                           "Readings for an already closed window, dropped")
        self.metrics.gauge("mapping_snapshots_skipped", lambda: float(self.mapper.snapshots_skipped),
                           "Periodic snapshot boundaries missed (the latest one is sent)")
        self.metrics.gauge("mapping_expression_errors",
                           lambda: float(sum(self.mapper.expression_errors.values())),
                           "Expression evaluations that failed (division by zero, overflow, bad value)")
        self.metrics.gauge("mapping_events_guarded", lambda: float(self.mapper.events_guarded),
                           "Events dropped because their when: guard was false or unknown")
        self.metrics.gauge("mapping_empty_windows_skipped",
                           lambda: float(self.mapper.windows_skipped),
                           "Empty windows not emitted beyond the 1000 after a gap")
        self.started = time.time()
        self._config_sha256 = status.config_hash(settings)
        self._mappings = status.mappings_summary(self.mapper)
        self._status_events: list[DomainEvent] = []
        self._status_wake = asyncio.Event()
        self._kafka_down_since: float | None = self.started
        self._buffer_oldest: float | None = None
        if settings.health.connection_events:
            self.supervisor.on_transition = self._on_transition
        self.metrics.gauge("buffer_oldest_age_seconds",
                           lambda: max(0.0, time.time() - self._buffer_oldest)
                           if self._buffer_oldest is not None else 0.0,
                           "Age of the oldest buffered event (0: empty; updated every 5 s)")
        self.metrics.gauge("process_resident_memory_bytes", _rss_bytes,
                           "Resident memory of the gateway process")
        self.metrics.gauge("process_cpu_seconds_total", time.process_time,
                           "CPU time used by the gateway process (user + system)")
        self.metrics.gauge("gateway_uptime_seconds", lambda: time.time() - self.started,
                           "Seconds since the daemon started")
        self._core: list[asyncio.Task[None]] = []
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_lock = asyncio.Lock()
        self._log = logs.get("daemon")
        for name in settings.connections:
            if name not in {s.name for s in self.sources}:
                self._log.warning("connection.unused", connection=name)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in order."""
        await self.buffer.open()
        await self._restore_state()
        self._log.info("daemon.starting", version=__version__, gateway_id=self.settings.gateway.id,
                       sources=[s.name for s in self.sources], buffered=self.buffer.pending_events)
        forwarder = asyncio.create_task(self.forwarder.run(), name="forwarder")
        pipeline = asyncio.create_task(self.pipeline.run(), name="pipeline")
        self._core = [forwarder, pipeline]
        for source in self.sources:
            self._start_source(source)
        health = await self._start_health()
        helpers = [asyncio.create_task(self._stats_loop()), asyncio.create_task(self._watchdog_loop()),
                   asyncio.create_task(self._maintenance_loop()),
                   asyncio.create_task(self._watch_mappings()),
                   asyncio.create_task(self._status_loop())]
        sd_notify(f"READY=1\nSTATUS=forwarding; {len(self.sources)} source(s)")
        self._log.info("daemon.ready")
        await self._publish_catalog()
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *self._core], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in self._core if t.done()]
        sd_notify("STOPPING=1")
        self._log.info("daemon.stopping")
        await _cancel([*self._source_tasks.values(), *helpers, stopper])
        drained = await self.pipeline.drain() if not pipeline.done() else 0
        await _cancel([pipeline, forwarder])
        delivered = await self.forwarder.drain(SHUTDOWN_FLUSH_S)
        if health is not None:
            await health.stop()
        await self.buffer.close()
        self._log.info("daemon.stopped", drained_deliveries=drained, delivered_at_stop=delivered,
                       left_in_buffer=self.buffer.pending_events)
        for task in crashed:
            task.result()  # re-raise a core component's crash: exit non-zero, systemd restarts

    async def _restore_state(self) -> None:
        """Continue the mapping state saved with the buffer (counters, states, windows...)."""
        saved = await self.buffer.load_state()
        restored, discarded = self.mapper.restore_state(saved)
        pruned = await self.buffer.prune_state(self.mapper.state_fingerprints())
        self.metrics.inc("mapping_states_restored_total", restored)
        self.metrics.inc("mapping_states_discarded_total", discarded)
        self._log.info("mapping.state_restored", restored=restored, discarded=discarded,
                       pruned=pruned, states=len(self.mapper.state_fingerprints()))

    def _start_source(self, source: Source) -> None:
        self._source_tasks[source.name] = asyncio.create_task(
            self._supervise_source(source), name=f"source:{source.name}")

    async def reload(self) -> bool:
        """SIGHUP: validate the mapping files again and swap them in, or keep the running ones.

        The new mapper takes over between two pipeline batches (nothing is lost or mapped
        twice); sources whose addresses changed are restarted (an MQTT source acknowledges what
        the pipeline took before it reconnects); the buffer and the forwarder are untouched.
        """
        async with self._reload_lock:
            log = logs.get("daemon")
            protocols = {name: c.protocol for name, c in self.settings.connections.items()}

            def prepare() -> tuple[list[MappingFile], Mapper, dict[str, Any]]:
                files = load_mappings(self.settings.mappings.directory, protocols)
                mapper = Mapper(files, self.settings.gateway.id)
                mapper.state_fingerprints()  # hashes every definition: here, not on the loop
                return files, mapper, status.mappings_summary(mapper)

            try:  # off the event loop: a thousand files must not stall the sources
                files, mapper, summary = await asyncio.to_thread(prepare)
                sources = build_sources(self.settings, mapper, self.metrics)
            except ConfigError as exc:
                self.metrics.inc("mapping_reloads_total", result="rejected")
                log.error("mappings.reload_rejected", errors=[str(f) for f in exc.findings],
                          kept_files=len(self.mapper.files))
                return False
            changed = _changed_bindings(self.mapper.bindings(), mapper.bindings())
            carried = mapper.adopt_state(self.mapper)
            self.mapper = self.pipeline.mapper = mapper
            self._mappings = summary
            # Queued behind any append of the old mapper's state, so nothing stale survives.
            await self.buffer.prune_state(mapper.state_fingerprints())
            restarted = []
            for source in sources:
                if source.name in changed or source.name not in self._source_tasks:
                    old = self._source_tasks.pop(source.name, None)
                    if old is not None:
                        await _cancel([old])
                    self._start_source(source)
                    restarted.append(source.name)
            for name in set(self._source_tasks) - {s.name for s in sources}:
                await _cancel([self._source_tasks.pop(name)])
                self.supervisor.components.pop(name, None)
                restarted.append(name)
            self.sources = sources
            self.metrics.inc("mapping_reloads_total", result="applied")
            log.info("mappings.reloaded", files=len(files), restarted_sources=sorted(restarted),
                     states_carried_over=carried)
            await self._publish_catalog()
            return True

    async def _publish_catalog(self) -> None:
        """Append the catalog entries that changed (all of them at start) for the catalog
        topic; a buffer that cannot take them is logged, the next start or reload retries."""
        if self.catalog is None:
            return
        # Off the event loop: it hashes every mapping file.
        events = await asyncio.to_thread(self.catalog.changes, self.mapper.files, time.time(),
                                         self.mapper.mapping_hashes)
        if not events:
            return
        try:
            await self.buffer.append(events)
        except BufferError as exc:
            self.catalog.published.clear()  # publish everything again next time
            self._log.warning("catalog.append_failed", error=str(exc), entries=len(events))
            return
        self._log.info("catalog.published", entries=len(events))

    async def _supervise_source(self, source: Source) -> None:
        conn = self.settings.connections[source.name]
        await self.supervisor.supervise(
            source.name, conn.protocol, lambda: source.run(self.pipeline.emit),
            min_backoff_s=getattr(conn, "reconnect_min_s", None),
            max_backoff_s=getattr(conn, "reconnect_max_s", None),
        )

    async def _start_health(self) -> HealthServer | None:
        if not self.settings.health.listen:
            return None
        server = HealthServer(self.settings.health.listen, self.status, self.metrics,
                              ready=self.ready)
        try:
            await server.start()
        except OSError as exc:
            self._log.error("health.listen_failed", address=self.settings.health.listen, error=str(exc))
            return None
        return server

    def problems(self) -> tuple[list[str], list[str]]:
        """What is wrong now: (fatal, degraded) problem names.

        Fatal (HTTP 503, no watchdog ping, so systemd restarts the service): a core task ended;
        ``forwarding_stalled``: Kafka answers but the backlog has not moved for ``STALL_S``;
        ``ingest_stalled``: deliveries wait in the pipeline and no batch finished for
        ``STALL_S``. Degraded (HTTP 200: the buffer absorbs it, a restart would not help):
        ``kafka_unreachable``, ``source_down``, ``buffer_full`` (events are being dropped),
        ``buffer_failing`` (appends fail: disk full or I/O errors; acknowledgements are held).
        """
        now = time.time()
        fatal: list[str] = []
        degraded: list[str] = []
        if not self._core or any(t.done() for t in self._core):
            fatal.append("core_stopped")
        last_ack = self.forwarder.last_ack_time or self.started
        if (self.forwarder.connected and self.buffer.pending_events
                and now - max(last_ack, self.started) > STALL_S):
            fatal.append("forwarding_stalled")
        if (self.pipeline.queued and self.pipeline.failing_since is None
                and now - max(self.pipeline.last_batch_time or 0.0, self.started) > STALL_S):
            fatal.append("ingest_stalled")
        if not self.forwarder.connected:
            degraded.append("kafka_unreachable")
        if any(c.state != State.RUNNING for c in self.supervisor.components.values()):
            degraded.append("source_down")
        if self.buffer.full:
            degraded.append("buffer_full")
        if self.pipeline.failing_since is not None:
            degraded.append("buffer_failing")
        return fatal, degraded

    def status(self) -> tuple[bool, dict[str, Any]]:
        """Health: healthy unless :meth:`problems` finds a fatal one; ``degraded`` names what
        the buffer absorbs (Kafka or a source away, the buffer full or failing)."""
        fatal, degraded = self.problems()
        sources = {
            name: {"state": c.state.value, "since": c.since, "last_error": c.last_error,
                   "restarts": c.restarts}
            for name, c in self.supervisor.components.items()
        }
        status = "down" if fatal else ("degraded" if degraded else "ok")
        return not fatal, {
            "status": status,
            "problems": fatal + degraded,
            "gateway_id": self.settings.gateway.id,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "sources": sources,
            "kafka": {"connected": self.forwarder.connected,
                      "last_ack_time": self.forwarder.last_ack_time},
            "buffer": {"pending_events": self.buffer.pending_events,
                       "pending_bytes": self.buffer.pending_bytes,
                       "full": self.buffer.full},
            "counters": self.metrics.snapshot(),
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness (``/readyz``): every source connected, the buffer taking events (not
        failing, not full), Kafka reachable or away for less than
        ``health.ready_kafka_grace_s``, and nothing fatal; a JSON body per component."""
        now = time.time()
        fatal, _ = self.problems()
        self._track_kafka(now)
        grace = self.settings.health.ready_kafka_grace_s
        kafka_down_s = None if self._kafka_down_since is None else now - self._kafka_down_since
        sources = {
            name: {"ready": c.state == State.RUNNING, "state": c.state.value,
                   "since": status.since_iso(c.since), "last_error": c.last_error}
            for name, c in sorted(self.supervisor.components.items())
        }
        components: dict[str, Any] = {
            "core": {"ready": not fatal, "problems": fatal},
            "buffer": {"ready": self.pipeline.failing_since is None and not self.buffer.full,
                       "failing": self.pipeline.failing_since is not None,
                       "full": self.buffer.full,
                       "pending_events": self.buffer.pending_events,
                       "oldest_age_s": status.age(self._buffer_oldest, now)},
            "kafka": {"ready": kafka_down_s is None or kafka_down_s < grace,
                      "connected": self.forwarder.connected,
                      "down_s": None if kafka_down_s is None else round(kafka_down_s, 1)},
            "sources": sources,
        }
        ready = (components["core"]["ready"] and components["buffer"]["ready"]
                 and components["kafka"]["ready"] and all(s["ready"] for s in sources.values()))
        return ready, {"ready": ready, "gateway_id": self.settings.gateway.id,
                       "components": components}

    def _track_kafka(self, now: float) -> None:
        if self.forwarder.connected:
            self._kafka_down_since = None
        elif self._kafka_down_since is None:
            self._kafka_down_since = now

    def _on_transition(self, comp: Component, up: bool, down_s: float | None) -> None:
        """The supervisor saw a connection come up or go down: queue a status event."""
        if len(self._status_events) >= STATUS_BACKLOG:
            self.metrics.inc("status_events_dropped_total")
            return
        self._status_events.append(status.connection_state(
            self.settings.gateway.id, time.time(), connection=comp.name, protocol=comp.kind,
            up=up, error=None if up else comp.last_error, down_s=down_s,
            restarts=comp.restarts))
        self._status_wake.set()

    def heartbeat(self, now: float | None = None) -> DomainEvent:
        """The ``gateway.Heartbeat.v1`` event of this moment."""
        now = time.time() if now is None else now
        fatal, degraded = self.problems()
        last_ack = self.forwarder.last_ack_time
        return status.heartbeat(
            self.settings.gateway.id, now, started=self.started,
            interval_s=self.settings.health.heartbeat_interval_s,
            buffer={"pending_events": self.buffer.pending_events,
                    "pending_bytes": self.buffer.pending_bytes,
                    "oldest_age_s": status.age(self._buffer_oldest, now),
                    "full": self.buffer.full},
            kafka={"connected": self.forwarder.connected,
                   "last_ack_age_s": status.age(last_ack, now)},
            connections={name: {"protocol": c.kind, "state": c.state.value,
                                "since": status.since_iso(c.since), "restarts": c.restarts,
                                "last_error": c.last_error}
                         for name, c in self.supervisor.components.items()},
            config_sha256=self._config_sha256, mappings=self._mappings,
            problems=fatal + degraded)

    async def _status_loop(self) -> None:
        """Append the queued connection state events at once, and a heartbeat every
        ``health.heartbeat_interval_s`` (the first one right after start)."""
        interval = self.settings.health.heartbeat_interval_s
        next_beat = time.monotonic() if interval > 0 else math.inf
        log = logs.get("status")
        while True:
            timeout = max(0.0, next_beat - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_wake.wait(),
                                       None if math.isinf(timeout) else timeout)
            self._status_wake.clear()
            events, self._status_events = self._status_events, []
            if time.monotonic() >= next_beat:
                events.append(self.heartbeat())
                next_beat = time.monotonic() + interval
            if not events:
                continue
            try:
                await self.buffer.append(events)
                self.metrics.inc("status_events_total", len(events))
            except BufferError as exc:  # disk full: the pipeline reports it; retry with the next
                log.warning("status.append_failed", error=str(exc), events=len(events))
                self._status_events = (events + self._status_events)[-STATUS_BACKLOG:]

    async def _stats_loop(self) -> None:
        interval = self.settings.logging.stats_interval_s
        if interval <= 0:
            return
        log = logs.get("stats")
        last = self.metrics.snapshot()
        while True:
            await asyncio.sleep(interval)
            now = self.metrics.snapshot()
            log.info("gateway.stats", interval_s=interval,
                     signals_per_s=_rate(now, last, "signals_mapped_total", interval),
                     events_per_s=_rate(now, last, "events_mapped_total", interval),
                     forwarded_per_s=_rate(now, last, "events_forwarded_total", interval),
                     buffered=self.buffer.pending_events,
                     dropped_total=now.get("events_dropped_total", 0))
            last = now

    async def _maintenance_loop(self) -> None:
        """Expire events past ``buffer.max_age_s`` and, outside a buffer-full episode, report
        what was dropped (``gateway.EventsDropped.v1``)."""
        log = logs.get("buffer")
        while True:
            await asyncio.sleep(MAINTENANCE_S)
            self._track_kafka(time.time())
            try:
                self._buffer_oldest = await self.buffer.oldest_appended()
                await self.buffer.expire()
                if not self.buffer.full:
                    await self.buffer.report_drops(self.settings.gateway.id)
            except BufferError as exc:  # disk full or I/O: the pipeline reports it too
                log.warning("buffer.maintenance_failed", error=str(exc))

    async def _watch_mappings(self) -> None:
        """``mappings.watch_interval_s``: reload when the mapping files changed and then held
        still for one interval (a copy in progress is not loaded half-written)."""
        interval = self.settings.mappings.watch_interval_s
        if interval <= 0:
            return
        directory = Path(self.settings.mappings.directory)
        applied = await asyncio.to_thread(_files_signature, directory)
        seen = applied
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(_files_signature, directory)
            if now != seen:  # still changing: wait until it holds still
                seen = now
                continue
            if now != applied:
                applied = now
                self._log.info("mappings.changed", directory=str(directory))
                await self.reload()

    async def _watchdog_loop(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec:
            return
        period = int(usec) / 1_000_000 / 2
        while True:
            if self.status()[0]:
                sd_notify("WATCHDOG=1")
            await asyncio.sleep(period)


def _rss_bytes() -> float:
    """Resident set size from /proc/self/statm (0 where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _files_signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime ns, size) of every YAML file in ``directory`` and its ``contracts/``."""
    out = []
    for folder in (directory, directory / "contracts"):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith((".yaml", ".yml")) and not entry.name.startswith("."):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                out.append((entry.path, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


def _changed_bindings(old: dict[str, list[Any]], new: dict[str, list[Any]]) -> set[str]:
    """Connections whose set of addresses differs between two mappers."""
    def shape(addresses: list[Any]) -> list[Any]:
        return sorted(a.model_dump_json() for a in addresses)

    return {name for name in old.keys() | new.keys()
            if shape(old.get(name, [])) != shape(new.get(name, []))}


def _rate(now: dict[str, float], last: dict[str, float], key: str, interval: float) -> float:
    return round((now.get(key, 0) - last.get(key, 0)) / interval, 1)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


async def serve(settings: GatewaySettings, mapping_files: list[MappingFile],
                *, record: Path | None = None) -> None:
    """Run the daemon with SIGTERM/SIGINT wired to a clean stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(settings, mapping_files)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(daemon.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    recorder = Recorder(record) if record is not None else None
    daemon.pipeline.recorder = recorder
    try:
        await daemon.run(stop)
    finally:
        if recorder is not None:
            recorder.close()


def run_loop(main: Any) -> None:
    """uvloop when available, the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
