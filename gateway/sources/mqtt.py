"""MQTT source (paho-mqtt): JSON payloads from wildcard subscriptions, acknowledged after the buffer.

Connection settings (:class:`MqttConnectionConfig`) live in ``config/gateway.yaml`` under
``connections``; what to read (:class:`MqttAddress`) lives in the mapping files.

Acknowledgement contract
    The client runs with paho's ``manual_ack``: a QoS 1/2 PUBLISH is acknowledged to the broker
    (PUBACK / PUBCOMP) only when the pipeline calls the :class:`Delivery`'s ``ack``, i.e. after
    the events made from it are durably in the buffer. Every PUBLISH becomes exactly one
    Delivery, in receive order, even when it yields no signal (a malformed payload, a topic no
    address matches), so that it is acknowledged in order and never redelivered forever. On a
    clean stop (``run`` cancelled) the source first stops taking messages and gives the pipeline
    :attr:`MqttSource.stop_ack_timeout_s` to acknowledge those it already took (the daemon
    drains the pipeline meanwhile), so a restart does not duplicate them. After that ``ack``
    does nothing: a message not yet acknowledged stays with the broker (persistent session) and
    comes again on the next connect; delivery is at-least-once.

Threading model
    paho's network loop runs on its own thread (``loop_start``). ``on_message`` parses the
    message there and appends the Delivery to a hand-off of at most
    :attr:`MqttSource.handoff_window` deliveries; a pump task on the asyncio loop takes them in
    order and awaits ``emit`` for each. When the window is full (``emit`` waits: the pipeline is
    behind) the paho thread *blocks*, reads nothing more, and the broker queues for us: that is
    the backpressure. (The window, rather than a blocking round trip per message, is what lets
    one connection carry ~20k messages/s.) Counters and logs are updated by the pump on the
    asyncio loop (:class:`~gateway.metrics.Metrics` is not thread-safe). Stopping releases a
    waiting paho thread before joining it, so shutdown cannot deadlock. A stall longer than 1.5x
    ``keepalive_s`` makes the broker drop the link (a blocked paho thread sends no PINGREQ);
    that is a lost connection like any other.

Reconnect story
    One ``run`` is one connection. A broker that cannot be reached, refuses the CONNECT or is
    lost later makes ``run`` raise :class:`~gateway.errors.SourceUnavailable`; paho never
    reconnects by itself (``reconnect_on_failure=False``). The daemon's supervisor owns the
    backoff, logs once down and once back, and calls ``run`` again, which connects a fresh client
    and subscribes again (a broker restarted without persistence has forgotten the
    subscriptions). With ``session: persistent`` and QoS >= 1 the broker keeps what is published
    while the gateway is away, and what was delivered but not acknowledged, and sends it on the
    next connect with the same client id. Since the supervisor, not paho, retries,
    ``reconnect_min_s`` / ``reconnect_max_s`` are not read here.

Malformed payloads
    A payload that is not JSON (for an address with a ``value_path``), a missing value path or
    an unparsable timestamp never stops the stream: the signals that could be extracted are
    emitted (possibly none), the message is acknowledged, and the problem is counted in
    ``mqtt_malformed_payloads_total{connection, topic=<subscription filter>}`` and logged as
    ``mqtt.malformed_payload`` at most once per filter per :attr:`MqttSource.malformed_log_interval_s`
    (with the number of occurrences suppressed since the previous line). A missing timestamp
    alone still yields the signal, timed at receive time. A JSON ``null`` at the value path is a
    signal with ``value=None`` and ``Quality.BAD``. With no ``value_path`` the whole payload is
    the value: JSON when it parses (``21.5``, ``true``, ``"Running"``), else its UTF-8 text.
    A message no address matches (a subscription an older mapping left in the persistent
    session) is acknowledged and counted in ``mqtt_unmatched_messages_total``.

Throughput note
    With QoS 1 the broker sends at most its ``max_inflight_messages`` (mosquitto: 20) messages
    not yet acknowledged; since acknowledgements wait for the buffer's commit, a connection
    carries at most about that many messages per commit. Raise it on the broker for high rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from paho.mqtt.client import (
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    MQTTv311,
    topic_matches_sub,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, SecretStr, field_validator

from gateway import logs
from gateway.configbase import Strict
from gateway.errors import SourceUnavailable
from gateway.metrics import Metrics
from gateway.model import Quality, Signal, representable
from gateway.sources.base import Delivery, Emit


class MqttConnectionConfig(Strict):
    """A plant MQTT broker."""

    protocol: Literal["mqtt"]
    host: str = Field(examples=["broker.plant1.local", "127.0.0.1"])
    """Host name or address of the broker."""
    port: int = Field(default=1883, ge=1, le=65535)
    """TCP port of the broker (1883 plain, 8883 TLS by convention)."""
    client_id: str | None = Field(default=None, examples=["edge-press-hall-01-plant_mqtt"])
    """MQTT client id; default ``<gateway id>-<connection name>``, stable so that a persistent
    session survives restarts."""
    username: str | None = None
    """User name, if the broker requires one."""
    password: SecretStr | None = None
    """Password; set it from the environment or a credentials file, never in the YAML."""
    session: Literal["persistent", "clean"] = "persistent"
    """``persistent``: the broker keeps QoS 1 messages while the gateway is away (no loss across
    restarts); ``clean``: start fresh on every connect."""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    """Seconds between keep-alive pings."""
    reconnect_min_s: float = Field(default=0.5, gt=0)
    """First reconnect delay after a lost connection; doubles up to ``reconnect_max_s``."""
    reconnect_max_s: float = Field(default=30.0, gt=0)
    """Longest reconnect delay."""
    qos: Literal[0, 1, 2] = 1
    """Subscription QoS. With 1 (the default) a message is acknowledged to the broker only after
    its events are durably buffered."""


def topic_filter_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid MQTT 3.1.1 topic filter, or None when it is."""
    if not topic:
        return "a topic filter cannot be empty"
    if "\0" in topic or len(topic.encode("utf-8")) > 65535:
        return "a topic filter has no NUL character and at most 65535 bytes"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level, the last one (a/b/#)"
        if "+" in level and level != "+":
            return "'+' must be a whole level (a/+/c)"
    return None


class MqttAddress(Strict):
    """Where a signal's value is in an MQTT message."""

    topic: str = Field(examples=["acme/plant1/line2/press07/telemetry", "acme/plant1/+/+/state"])
    """Topic filter to subscribe to; ``+`` and ``#`` wildcards allowed."""
    value_path: str | None = Field(default=None, examples=["temperature_c", "spindle.speed_rpm"])
    """Dotted path to the value in a JSON object payload (``a.b.0.c``; digits index lists).
    Omit it when the whole payload is the value (a plain number, string or boolean)."""
    timestamp_path: str | None = Field(default=None, examples=["ts", "header.timestamp"])
    """Dotted path to the source timestamp: Unix seconds or milliseconds (a number) or an
    RFC 3339 string. Without it the receive time is the event time."""

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, topic: str) -> str:
        problem = topic_filter_problem(topic)
        if problem:
            raise ValueError(problem)
        return topic

    @property
    def tag(self) -> str:
        """The canonical address: ``topic`` or ``topic#value_path``."""
        return self.topic if self.value_path is None else f"{self.topic}#{self.value_path}"


DISCONNECT_FLUSH_S = 2.0
"""On a clean stop, how long to let paho send the acknowledgements still queued before it
closes the socket (stopping its thread at once would drop them: the broker would redeliver)."""
CONNACK_TIMEOUT_S = 10.0
"""How long ``run`` waits for the broker's CONNACK once the TCP connection is up."""
MATCH_CACHE_SIZE = 10_000
"""Concrete topics whose matching addresses are remembered; the cache starts over when full."""
MILLISECONDS_ABOVE = 1e11
"""A numeric timestamp above this is Unix milliseconds (1e11 s is the year 5138)."""

_decoder = msgspec.json.Decoder()
_MISSING: Any = object()

_Part = tuple[str, int | None]
"""One step of a dotted path: the key, and the list index when the key is all digits."""


def _compile(path: str | None) -> tuple[_Part, ...] | None:
    if path is None:
        return None
    return tuple((p, int(p) if p.isascii() and p.isdigit() else None) for p in path.split("."))


def _lookup(doc: Any, parts: tuple[_Part, ...]) -> Any:
    """The value at ``parts`` in a decoded JSON document, or ``_MISSING``."""
    node = doc
    for key, index in parts:
        if isinstance(node, dict):
            node = node.get(key, _MISSING)
        elif isinstance(node, list) and index is not None and index < len(node):
            node = node[index]
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def unix_time(raw: Any) -> float | None:
    """Unix seconds from seconds, milliseconds (> 1e11) or an RFC 3339 string; None if neither.

    A string without a UTC offset is read as UTC.
    """
    if isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(raw)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            stamp = parsed.timestamp()
            return stamp if stamp > 0 and representable(stamp) else None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    ts = float(raw)
    if not math.isfinite(ts) or ts <= 0:
        return None
    ts = ts / 1000.0 if ts > MILLISECONDS_ABOVE else ts
    return ts if representable(ts) else None


@dataclass(frozen=True, slots=True)
class _Binding:
    """An :class:`MqttAddress` compiled for the per-message path."""

    filter: str
    tag: str
    value_path: str | None
    value_parts: tuple[_Part, ...] | None
    timestamp_path: str | None
    timestamp_parts: tuple[_Part, ...] | None

    @classmethod
    def of(cls, address: MqttAddress) -> _Binding:
        return cls(address.topic, address.tag, address.value_path, _compile(address.value_path),
                   address.timestamp_path, _compile(address.timestamp_path))


class _Body:
    """One PUBLISH payload, decoded at most once, timestamps parsed at most once per path."""

    __slots__ = ("_doc", "_error", "_times", "raw")

    def __init__(self, raw: bytes | bytearray) -> None:
        self.raw = raw
        self._doc: Any = _MISSING
        self._error: str | None = None
        self._times: dict[str, tuple[float | None, str | None]] = {}

    def json(self) -> tuple[Any, str | None]:
        """The decoded document, or ``_MISSING`` and why not."""
        if self._doc is _MISSING and self._error is None:
            if not self.raw:
                self._error = "empty payload"
            else:
                try:
                    self._doc = _decoder.decode(self.raw)
                except msgspec.DecodeError as exc:
                    self._error = f"payload is not JSON: {exc}"
        return self._doc, self._error

    def whole(self) -> tuple[Any, str | None]:
        """The payload as one value: JSON if it parses, else its UTF-8 text."""
        doc, error = self.json()
        if error is None or not self.raw:
            return doc, error
        try:
            return self.raw.decode("utf-8").strip(), None
        except UnicodeDecodeError:
            return _MISSING, "payload is neither JSON nor UTF-8 text"

    def time(self, path: str, parts: tuple[_Part, ...]) -> tuple[float | None, str | None]:
        """The source timestamp at ``path``, or None and why not."""
        if path not in self._times:
            doc, error = self.json()
            raw = _lookup(doc, parts) if error is None else _MISSING
            if raw is _MISSING:
                self._times[path] = (None, f"no timestamp at {path!r}")
            elif (ts := unix_time(raw)) is None:
                reason = (f"timestamp at {path!r} is not Unix seconds, milliseconds or "
                          f"RFC 3339: {str(raw)[:40]!r}")
                self._times[path] = (None, reason)
            else:
                self._times[path] = (ts, None)
        return self._times[path]


@dataclass(slots=True)
class _Parsed:
    """What one PUBLISH gave: signals, and per subscription filter the first problem seen."""

    topic: str
    signals: list[Signal]
    problems: dict[str, str]
    matched: bool


@dataclass(slots=True)
class _Throttle:
    last: float = -math.inf
    suppressed: int = 0


class MqttSource:
    """Subscribes to the topic filters of its addresses and emits one Delivery per PUBLISH."""

    handoff_window: int = 256
    """Deliveries parsed on the paho thread and not yet accepted by ``emit``; while that many
    wait, the paho thread waits too and the broker queues (backpressure)."""
    stop_ack_timeout_s: float = 5.0
    """On a clean stop, how long to wait for the pipeline to acknowledge the messages it has
    already taken before disconnecting (what is not acknowledged by then is redelivered)."""
    malformed_log_interval_s: float = 60.0
    """At most one ``mqtt.malformed_payload`` warning per subscription filter per this many
    seconds (every occurrence is counted regardless)."""

    def __init__(self, name: str, config: MqttConnectionConfig, addresses: Sequence[MqttAddress],
                 client_id: str, metrics: Metrics) -> None:
        if not addresses:
            raise ValueError(f"MQTT connection {name} has no address to subscribe to")
        if not client_id and config.session == "persistent":
            raise ValueError(f"MQTT connection {name}: a persistent session needs a client id")
        self.name = name
        self.config = config
        self.client_id = client_id
        self._metrics = metrics
        self._log = logs.get("mqtt", source=name)
        by_filter: dict[str, list[_Binding]] = {}
        for address in addresses:
            by_filter.setdefault(address.topic, []).append(_Binding.of(address))
        self._by_filter = {f: tuple(bs) for f, bs in by_filter.items()}
        self.topic_filters: tuple[str, ...] = tuple(self._by_filter)
        """The distinct subscription filters, in address order."""
        self._matches: dict[str, tuple[_Binding, ...]] = {}
        self._throttles: dict[str, _Throttle] = {}
        self._link: _Link | None = None

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def ready(self) -> bool:
        """Connected, and the broker has answered the subscriptions (SUBACK)."""
        return self._link is not None and self._link.subscribed

    async def run(self, emit: Emit) -> None:
        """Connect, subscribe and stream until cancelled; raise SourceUnavailable on loss."""
        link = _Link(self, asyncio.get_running_loop(), emit)
        self._link = link
        reason = "stopped"
        try:
            await link.open()
            await link.ended
        except asyncio.CancelledError:
            await link.quiesce(self.stop_ack_timeout_s)
            raise
        except BaseException as exc:
            reason = str(exc)
            raise
        finally:
            self._link = None
            await link.close()
            if link.connected:
                self._log.info("mqtt.disconnected", broker=self.where, reason=reason)

    # -- per message, on the paho thread ------------------------------------------------------

    def _match(self, topic: str) -> tuple[_Binding, ...]:
        found = self._matches.get(topic)
        if found is None:
            if len(self._matches) >= MATCH_CACHE_SIZE:
                self._matches.clear()
            found = tuple(b for f, bs in self._by_filter.items() if topic_matches_sub(f, topic)
                          for b in bs)
            self._matches[topic] = found
        return found

    def _parse(self, msg: MQTTMessage, receive_time: float) -> _Parsed:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers refuse these; nothing can match one
            return _Parsed("", [], {}, matched=False)
        bindings = self._match(topic)
        body = _Body(msg.payload)
        signals: list[Signal] = []
        problems: dict[str, str] = {}
        for b in bindings:
            if b.value_parts is None:
                value, error = body.whole()
            else:
                doc, error = body.json()
                value = _MISSING if error else _lookup(doc, b.value_parts)
                if value is _MISSING and error is None:
                    error = f"no value at {b.value_path!r}"
            if error is not None:
                problems.setdefault(b.filter, error)
                continue
            source_time = None
            if b.timestamp_path is not None and b.timestamp_parts is not None:
                source_time, error = body.time(b.timestamp_path, b.timestamp_parts)
                if error is not None:
                    problems.setdefault(b.filter, error)
            signals.append(Signal(
                connection=self.name, tag=b.tag, value=value,
                quality=Quality.BAD if value is None else Quality.GOOD,
                source_time=source_time, receive_time=receive_time,
            ))
        return _Parsed(topic, signals, problems, matched=bool(bindings))

    # -- accounting, on the asyncio loop ------------------------------------------------------

    def _account(self, parsed: _Parsed) -> None:
        self._metrics.inc("mqtt_messages_received_total", connection=self.name)
        if parsed.signals:
            self._metrics.inc("signals_received_total", len(parsed.signals), connection=self.name)
        if not parsed.matched:
            self._metrics.inc("mqtt_unmatched_messages_total", connection=self.name)
        for topic_filter, reason in parsed.problems.items():
            self._metrics.inc("mqtt_malformed_payloads_total", connection=self.name,
                              topic=topic_filter)
            self._warn_malformed(topic_filter, parsed.topic, reason)

    def _warn_malformed(self, topic_filter: str, topic: str, reason: str) -> None:
        throttle = self._throttles.setdefault(topic_filter, _Throttle())
        now = time.monotonic()
        if now - throttle.last < self.malformed_log_interval_s:
            throttle.suppressed += 1
            return
        self._log.warning("mqtt.malformed_payload", topic=topic_filter, message_topic=topic,
                          reason=reason, suppressed=throttle.suppressed,
                          interval_s=self.malformed_log_interval_s)
        throttle.last, throttle.suppressed = now, 0

    def _report_subscriptions(self, refused: list[tuple[str, str]],
                              downgraded: list[tuple[str, int]]) -> None:
        for topic_filter, reason in refused:
            self._metrics.inc("mqtt_subscriptions_refused_total", connection=self.name)
            self._log.error("mqtt.subscription_refused", topic=topic_filter, reason=reason)
        for topic_filter, granted in downgraded:
            self._log.warning("mqtt.subscription_downgraded", topic=topic_filter,
                              requested_qos=self.config.qos, granted_qos=granted)


class _Link:
    """One connection: a paho client, its network thread, and the hand-off to asyncio."""

    def __init__(self, source: MqttSource, loop: asyncio.AbstractEventLoop, emit: Emit) -> None:
        self.source = source
        self.loop = loop
        self.emit = emit
        self.connack: asyncio.Future[bool] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.connected = False
        self.subscribed = False
        # The hand-off: the paho thread appends, the pump task takes, both under ``_handoff``.
        self._handoff = threading.Condition()
        self._backlog: deque[tuple[_Parsed, Delivery]] = deque()
        self._waiting = 0
        """Deliveries handed over and not yet through ``emit`` (at most ``handoff_window``)."""
        self._wake_pending = False
        self._has_work = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._closing = False
        self._acks_closed = False
        self._unacked = 0
        """Deliveries through ``emit`` whose ``ack`` has not been called yet."""
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._subscribe_mids: dict[int, list[str]] = {}
        self._open_started = False
        self._open_done = threading.Event()
        self._disconnected = threading.Event()
        """Set by paho once the socket is closed, after what was queued (acks, DISCONNECT)."""
        self.client = self._new_client()

    def _new_client(self) -> Client:
        cfg = self.source.config
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.source.client_id,
            protocol=MQTTv311, clean_session=(cfg.session == "clean"), manual_ack=True,
            reconnect_on_failure=False,
        )
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    # -- asyncio side -------------------------------------------------------------------------

    async def open(self) -> None:
        src = self.source
        self._pump = asyncio.create_task(self._run_pump(), name=f"mqtt-{src.name}-pump")
        self._open_started = True
        try:
            await asyncio.shield(_quiet(self.loop.run_in_executor(None, self._connect_blocking)))
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise SourceUnavailable(
                f"Cannot reach MQTT broker {src.name} at {src.where}: {reason}") from exc
        try:
            session_present = await asyncio.wait_for(asyncio.shield(self.connack), CONNACK_TIMEOUT_S)
        except TimeoutError:
            raise SourceUnavailable(
                f"MQTT broker {src.name} at {src.where} did not answer the CONNECT within "
                f"{CONNACK_TIMEOUT_S:g} s") from None
        self.connected = True
        src._log.info("mqtt.connected", broker=src.where, client_id=src.client_id,
                      session=src.config.session, session_present=session_present,
                      topics=len(src.topic_filters))

    async def close(self) -> None:
        """Stop handing over, unblock the paho thread, disconnect, join the thread."""
        self._halt()
        self._acks_closed = True
        self.subscribed = False
        if self._pump is not None:
            self._pump.cancel()  # an emit in progress is abandoned: not acknowledged
            await asyncio.gather(self._pump, return_exceptions=True)
        for fut in (self.connack, self.ended):
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning
        # A second cancellation leaves the (short) shutdown to finish in the background.
        await asyncio.shield(_quiet(self.loop.run_in_executor(None, self._close_blocking)))

    def _resolve(self, fut: asyncio.Future[Any], value: Any = None,
                 error: BaseException | None = None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def _fail(self, error: BaseException) -> None:
        """From any thread: end ``run`` with ``error`` (before or after the CONNACK)."""
        self._call(self._resolve, self.connack, None, error)
        self._call(self._resolve, self.ended, None, error)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _halt(self) -> None:
        """From any thread: hand nothing over any more, and release a waiting paho thread."""
        with self._handoff:
            self._closing = True
            self._handoff.notify_all()

    async def _run_pump(self) -> None:
        """Pass handed-over deliveries to ``emit``, in order, one at a time."""
        while True:
            await self._has_work.wait()
            self._has_work.clear()
            with self._handoff:
                batch, self._backlog = self._backlog, deque()
                self._wake_pending = False
            for parsed, delivery in batch:
                self.source._account(parsed)
                ack = delivery.ack
                if isinstance(ack, _Ack):
                    self._unacked += 1
                    self._all_acked.clear()
                try:
                    await self.emit(delivery)
                except BaseException as exc:
                    if isinstance(ack, _Ack) and not ack.done:  # not taken: nobody will ack it
                        self._settled()
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    self._halt()  # hold everything after it unacknowledged
                    self._resolve(self.ended, error=exc)
                    return
                with self._handoff:
                    self._waiting -= 1
                    self._handoff.notify()

    def _ack(self, mid: int, qos: int) -> None:
        if not self._acks_closed:
            self.client.ack(mid, qos)
        self._settled()

    def _settled(self) -> None:
        self._unacked -= 1
        if self._unacked <= 0:
            self._all_acked.set()

    async def quiesce(self, timeout_s: float) -> None:
        """Stop taking messages, then give the pipeline ``timeout_s`` to acknowledge what it
        already has, so that a clean stop does not make the broker redeliver it."""
        self._halt()
        if self._pump is not None:
            self._pump.cancel()  # an emit in progress is abandoned: not acknowledged
            await asyncio.gather(self._pump, return_exceptions=True)
        if self.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_acked.wait(), timeout_s)

    # -- worker threads -----------------------------------------------------------------------

    def _connect_blocking(self) -> None:
        cfg = self.source.config
        try:
            self.client.connect(cfg.host, cfg.port, cfg.keepalive_s)
            self.client.loop_start()
        finally:
            self._open_done.set()

    def _close_blocking(self) -> None:
        if self._open_started:
            self._open_done.wait()
        self.client.disconnect()
        if self.connected:  # let the network thread write the queued PUBACKs and DISCONNECT;
            self._disconnected.wait(DISCONNECT_FLUSH_S)  # loop_stop would drop them
        self.client.loop_stop()

    # -- paho callbacks, on the paho thread ---------------------------------------------------

    def _on_connect(self, client: Client, _userdata: Any, flags: ConnectFlags,
                    reason_code: ReasonCode, _properties: Properties | None) -> None:
        src = self.source
        if reason_code.is_failure:
            self._fail(SourceUnavailable(
                f"MQTT broker {src.name} at {src.where} refused the connection: {reason_code}"))
            return
        filters = list(src.topic_filters)
        wanted: list[tuple[str, int]] = [(f, src.config.qos) for f in filters]
        _, mid = client.subscribe(wanted)
        if mid is not None:
            self._subscribe_mids[mid] = filters
        self._call(self._resolve, self.connack, flags.session_present)

    def _on_subscribe(self, _client: Client, _userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], _properties: Properties | None) -> None:
        filters = self._subscribe_mids.pop(mid, [])
        refused = [(f, str(rc)) for f, rc in zip(filters, reason_codes, strict=False) if rc.is_failure]
        downgraded = [(f, rc.value) for f, rc in zip(filters, reason_codes, strict=False)
                      if not rc.is_failure and rc.value < self.source.config.qos]
        self._call(self._on_suback, refused, downgraded)

    def _on_suback(self, refused: list[tuple[str, str]], downgraded: list[tuple[str, int]]) -> None:
        """On the asyncio loop: report refusals, then count as ready."""
        self.source._report_subscriptions(refused, downgraded)
        if not self._closing:
            self.subscribed = True

    def _on_message(self, _client: Client, _userdata: Any, msg: MQTTMessage) -> None:
        try:
            parsed = self.source._parse(msg, time.time())
        except Exception:  # noqa: BLE001 - a bug must neither kill the paho thread nor wedge the message
            self.source._log.exception("mqtt.parse_failed", message_topic=_topic_text(msg))
            parsed = _Parsed(_topic_text(msg), [], {}, matched=True)
        ack = _Ack(self, msg.mid, msg.qos) if msg.qos > 0 else None
        with self._handoff:
            while self._waiting >= self.source.handoff_window and not self._closing:
                self._handoff.wait()  # backpressure: the broker queues meanwhile
            if self._closing:
                return  # not acknowledged: the broker delivers it again next time
            self._waiting += 1
            self._backlog.append((parsed, Delivery(parsed.signals, ack)))
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            self._call(self._has_work.set)

    def _on_disconnect(self, _client: Client, _userdata: Any, _flags: DisconnectFlags,
                       reason_code: ReasonCode, _properties: Properties | None) -> None:
        self.subscribed = False
        self._disconnected.set()
        if self._closing:
            return
        reason = str(reason_code)
        if reason in ("Unspecified error", "Success"):
            reason = "connection lost"
        src = self.source
        self._fail(SourceUnavailable(
            f"Lost connection to MQTT broker {src.name} at {src.where}: {reason}"))


class _Ack:
    """A Delivery's ``ack``: acknowledges one PUBLISH once, and tells the link it is settled."""

    __slots__ = ("done", "link", "mid", "qos")

    def __init__(self, link: _Link, mid: int, qos: int) -> None:
        self.link, self.mid, self.qos, self.done = link, mid, qos, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.link._ack(self.mid, self.qos)


def _quiet(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Mark the outcome of ``fut`` as retrieved even if nobody awaits it any more."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def _topic_text(msg: MQTTMessage) -> str:
    try:
        return msg.topic
    except UnicodeDecodeError:
        return repr(msg._topic)  # the raw bytes are all there is
