"""Kafka forwarder (aiokafka): buffered events out, deleted from the buffer only once acknowledged.

Design
------

The forwarder is the buffer's only reader. It loops: read up to ``max_in_flight_events``
records after a cursor, turn them into Kafka records (the CloudEvents Kafka protocol binding),
hand them to the producer as whole record batches, await every batch's acknowledgement, delete
the acknowledged seqs from the buffer, advance. With nothing to read it awaits the buffer's
"appended" signal (no polling).

Binding (CloudEvents 1.0 Kafka protocol binding):

- key = the event ``subject`` (UTF-8): one asset's events land in one partition, in order;
- topic = ``topic_template`` with ``{type}``, ``{domain}``, ``{name}``, ``{version}``,
  ``{gateway_id}`` (``production.MachineStateChanged.v1`` -> domain ``production``, name
  ``MachineStateChanged``, version ``v1``; a domain may contain dots);
- binary mode: every attribute as a ``ce_<name>`` header, ``content-type`` = the event's
  ``datacontenttype``, value = the JSON of ``data`` alone;
- structured mode: value = the buffered envelope as is, ``content-type:
  application/cloudevents+json``.
- The Kafka record timestamp is the send time, not the event time: events replayed after a
  long outage must not fall behind the topic's retention the moment they arrive.

Invariants:

- At-least-once: a record is deleted from the buffer only after Kafka acknowledged it (per
  ``acks``), or after Kafka rejected it permanently (counted, logged, dropped). A crash or an
  outage between send and delete re-sends it, with the same CloudEvent ``id``; consumers
  deduplicate on ``source`` + ``id``.
- Per-key order: records are partitioned here (aiokafka's murmur2 partitioner, as the Java
  client), batched per partition in seq order, and aiokafka keeps one request in flight per
  partition. When a batch fails, the partition's later records are not deleted even if they were
  acknowledged: the whole tail from the first failure is re-sent in order, so the last record a
  consumer sees for a key is the newest event (duplicates allowed, reordering not).
- A permanently rejected record (too large, invalid topic name, broker-side
  ``MessageSizeTooLarge``/``InvalidTopic``/...) never blocks the queue: a rejected multi-record
  batch is re-sent one record per batch to find the culprit, which is then dropped
  (``events_dropped_total{reason="kafka_rejected"}``) and logged with its id and type.
- An outage never raises out of :meth:`KafkaForwarder.run`: it closes the producer (failing
  whatever it still holds, so a late delivery by the old producer cannot overtake the re-send),
  backs off exponentially (``retry_min_s`` .. ``retry_max_s``, with jitter), creates a fresh
  producer and re-reads from the oldest buffered record. ``kafka.unreachable`` is logged once
  per outage and ``kafka.connected`` once when Kafka is back. aiokafka errors become
  :class:`~gateway.errors.SinkUnavailable` where they enter this module.
- ``connected`` is true once Kafka acknowledged a batch or, with nothing to send, answered; an
  idle forwarder asks for metadata every ``IDLE_CHECK_S`` so health does not report a Kafka
  that went away at night as connected.
- ``drain`` (shutdown) forwards until the buffer reads empty or its deadline; on the deadline
  in-flight batches are abandoned (they stay buffered) and it returns, it never raises.
- Only a broken buffer (``BufferError``) ends ``run``: that is the daemon's to handle.

Throughput: records are appended straight into aiokafka ``BatchBuilder`` objects and submitted
with ``send_batch`` (one future per batch, not per record); partitions are computed once per
distinct key; binary mode decodes the envelope with a typed decoder and slices ``data`` out
as is (a quarter of the cost of a dict decode plus re-encode); the buffer delete of one round
runs on the buffer's thread while the next round is encoded and sent. ``bench/bench_buffer.py``
measures it: about 110 000 events/s from a ``sync=full`` buffer into a local Tansu on a
2-core VM, broker included.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import string
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from pydantic import Field, SecretStr, field_validator, model_validator

from gateway import logs
from gateway.buffer.disk import BufferedRecord, DiskBuffer
from gateway.configbase import Strict
from gateway.errors import SinkUnavailable
from gateway.metrics import Metrics
from gateway.model import JSON, decode_envelope, encode_json


class KafkaConfig(Strict):
    """The central Kafka cluster and how events are written to it."""

    bootstrap_servers: list[str] = Field(
        default=["127.0.0.1:9092"], min_length=1, examples=[["kafka1.central:9092"]]
    )
    """``host:port`` of one or more brokers."""
    topic_template: str = Field(
        default="digispine.{type}",
        examples=["digispine.{type}", "plant1.{domain}.{name}.{version}"],
    )
    """Topic per event; placeholders: ``{type}`` (``production.MachineStateChanged.v1``),
    ``{domain}``, ``{name}``, ``{version}`` (``v1``) and ``{gateway_id}``."""
    content_mode: Literal["binary", "structured"] = "binary"
    """CloudEvents Kafka binding: ``binary`` puts attributes in ``ce_*`` headers and the data as
    the value; ``structured`` sends the whole CloudEvent as JSON."""
    acks: Literal["all", "1", "0"] = "all"
    """``all``: an event counts as delivered only once every in-sync replica has it."""
    enable_idempotence: bool = True
    """Idempotent producer (no broker-side duplicates on retry). Turn off only for brokers that
    refuse it (the Tansu test broker)."""
    linger_ms: int = Field(default=5, ge=0, le=10_000)
    """How long the producer waits to fill a batch."""
    max_batch_bytes: int = Field(default=262_144, ge=1024)
    """Largest producer batch per partition (aiokafka's 16 KiB default costs 30-40% throughput)."""
    compression: Literal["none", "gzip", "lz4", "zstd"] = "zstd"
    """Batch compression; zstd is as cheap as none on the measured machine."""
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    """How long one produce request may take before it is retried."""
    max_in_flight_events: int = Field(default=10_000, ge=1)
    """Events read from the buffer and sent but not yet acknowledged."""
    retry_min_s: float = Field(default=0.5, gt=0)
    """First delay after Kafka failed; doubles up to ``retry_max_s``."""
    retry_max_s: float = Field(default=30.0, gt=0)
    """Longest delay between attempts while Kafka is unreachable."""
    client_id: str | None = None
    """Kafka client id; default ``digispine-gateway-<gateway id>``."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How to talk to the brokers."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism when ``security_protocol`` is SASL_*."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: SecretStr | None = None
    """SASL password; from the environment or a credentials file."""
    ssl_cafile: str | None = None
    """CA bundle for SSL."""
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest produce request (aiokafka ``max_request_size``); keep it at or below the
    brokers' ``message.max.bytes``. An event whose record alone is larger is dropped (counted as
    ``kafka_rejected``) instead of blocking the queue."""

    @field_validator("topic_template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        names = {f[1] for f in string.Formatter().parse(value) if f[1] is not None}
        unknown = names - set(_TOPIC_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {list(_TOPIC_FIELDS)}")
        return value

    @model_validator(mode="after")
    def _request_holds_a_batch(self) -> KafkaConfig:
        if self.max_request_bytes < self.max_batch_bytes:
            raise ValueError("max_request_bytes must be at least max_batch_bytes")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be at least retry_min_s")
        return self


_TOPIC_FIELDS = ("type", "domain", "name", "version", "gateway_id")
_ACKS: dict[str, int | str] = {"all": "all", "1": 1, "0": 0}
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_PERMANENT: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError, InvalidTopicError,
    CorruptRecordException, InvalidTimestampError, UnsupportedForMessageFormatError,
)
"""Broker answers that re-sending the same record cannot change."""
_RECORD_OVERHEAD = 96
"""Generous per-record framing estimate (batch header share, varints, header names)."""
_CLOSE_TIMEOUT_S = 5.0
IDLE_CHECK_S = 15.0
"""With nothing to send for this long, the forwarder checks that Kafka still answers."""
_PARTITION_CACHE_MAX = 100_000

Message = tuple[str, bytes, bytes, list[tuple[str, bytes]]]
"""topic, key, value, headers."""


class _ReconnectNoise(logging.Filter):
    """Drops aiokafka's per-attempt connection complaints (dozens a second while a broker is
    away: every metadata refresh and produce retry logs at ERROR/WARNING). The forwarder
    reports connectivity itself, once per outage (``kafka.unreachable``, ``kafka.connected``,
    with the error); anything else aiokafka logs passes. With the root logger at DEBUG nothing
    is dropped."""

    PREFIXES = ("Unable connect to", "Unable to update metadata", "Got error produce response",
                "Cannot send ")

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


_NOISY_LOGGERS = ("aiokafka", "aiokafka.producer.sender")


def _quiet_aiokafka() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ReconnectNoise) for f in logger.filters):
            logger.addFilter(_ReconnectNoise())


def topic_for(template: str, event_type: str, gateway_id: str) -> str:
    """The topic of an event type under ``template`` (see :class:`KafkaConfig`)."""
    domain, name, version = (["", "", *event_type.rsplit(".", 2)])[-3:]
    return template.format(type=event_type, domain=domain, name=name, version=version,
                           gateway_id=gateway_id)


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """The envelope :meth:`gateway.model.DomainEvent.envelope` writes, decoded without building a
    dict, ``data`` kept as its raw JSON bytes (no re-encoding). Anything else in a body (an
    extension attribute, a missing attribute) fails validation and takes the generic path."""

    specversion: str
    id: str
    source: str
    type: str
    subject: str
    time: str
    datacontenttype: str = JSON
    dataschema: str | None = None
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def binary_message(body: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Binary content mode: ``(value, headers)`` of one buffered structured CloudEvent.

    The fast path (typed decode, ``data`` sliced out as is) gives the same bytes as the generic
    one (:func:`gateway.model.decode_envelope`, then :func:`gateway.model.encode_json` of
    ``data``) at a quarter of the cost; bodies it does not recognise take the generic path.
    """
    try:
        env = _envelope_decoder.decode(body)
    except msgspec.ValidationError:
        return _binary_message_generic(body)
    headers = [
        ("ce_specversion", env.specversion.encode()),
        ("ce_id", env.id.encode()),
        ("ce_source", env.source.encode()),
        ("ce_type", env.type.encode()),
        ("ce_subject", env.subject.encode()),
        ("ce_time", env.time.encode()),
    ]
    if env.dataschema is not None:
        headers.append(("ce_dataschema", env.dataschema.encode()))
    headers.append(("content-type", env.datacontenttype.encode()))
    return (b"" if env.data is msgspec.UNSET else bytes(env.data)), headers


def _binary_message_generic(body: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    envelope = decode_envelope(body)
    value = b""
    content_type = JSON
    headers: list[tuple[str, bytes]] = []
    for name, attr in envelope.items():
        if name == "data":
            value = encode_json(attr)
        elif name == "data_base64":
            value = base64.b64decode(attr)
        elif name == "datacontenttype":
            content_type = attr
        elif attr is not None:
            headers.append(("ce_" + name, attr.encode() if isinstance(attr, str) else encode_json(attr)))
    headers.append(("content-type", content_type.encode()))
    return value, headers


@dataclass(slots=True)
class _Batch:
    """One record batch for one topic-partition, in seq order."""

    topic: str
    partition: int
    builder: BatchBuilder
    seqs: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Outcome:
    """What became of one round of records."""

    done: list[int] = field(default_factory=list)
    """Seqs to delete: acknowledged (and not behind a failure) or dropped."""
    acked: int = 0
    failed_batches: int = 0
    error: BaseException | None = None
    """The first retriable failure, if any: the round ends the connection."""
    resume_after: int = 0
    """The cursor for the next read."""
    probe_until: int = 0
    """Seqs up to this one go out one record per batch (isolating a permanent rejection)."""
    rejected: list[tuple[int, BaseException]] = field(default_factory=list)
    """Single records the broker refused for good (dropped; in ``done``)."""


class _NotSent(KafkaError):  # type: ignore[misc]
    """A batch not submitted because an earlier submission failed."""

    retriable = True


class _Backoff:
    """Exponential delays from ``low`` to ``high`` seconds, each with +-20% jitter."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.attempt = 0

    def next(self) -> float:
        base = min(self.high, self.low * 2.0 ** min(self.attempt, 30))
        self.attempt += 1
        return max(self.low, min(self.high, base * random.uniform(0.8, 1.2)))

    def reset(self) -> None:
        self.attempt = 0


class KafkaForwarder:
    """Moves buffered events to Kafka; see the module docstring for the guarantees."""

    def __init__(self, config: KafkaConfig, buffer: DiskBuffer, gateway_id: str,
                 metrics: Metrics) -> None:
        self._config = config
        self._buffer = buffer
        self._gateway_id = gateway_id
        self._metrics = metrics
        self._log = logs.get("kafka")
        self._client_id = config.client_id or f"digispine-gateway-{gateway_id}"
        self._backoff = _Backoff(config.retry_min_s, config.retry_max_s)
        self._producer: AIOKafkaProducer | None = None
        self._topics: dict[str, str | None] = {}
        self._partitions: dict[tuple[bytes, int], int] = {}
        self._structured_headers = [("content-type", STRUCTURED_CONTENT_TYPE.encode())]
        self._connected = False
        self._ever_connected = False
        self._down_since: float | None = None
        self._running = False
        self._probe_until = 0
        self._delivered = 0
        self.last_ack_time: float | None = None
        """Unix time of the last acknowledgement from Kafka (``None`` before the first)."""
        _quiet_aiokafka()
        metrics.gauge("kafka_connected", lambda: float(self._connected),
                      "1 while the forwarder reaches Kafka, 0 while it retries")
        metrics.describe("events_forwarded_total", "Events acknowledged by Kafka")
        metrics.describe("kafka_send_errors_total", "Failed attempts to connect or send to Kafka")

    @property
    def connected(self) -> bool:
        """Kafka answered the last attempt (start, send or an idle check) of this forwarder."""
        return self._connected

    @property
    def delivered(self) -> int:
        """Events acknowledged by Kafka since this forwarder was created."""
        return self._delivered

    # -- the two entry points ---------------------------------------------------------

    async def run(self) -> None:
        """Forward until cancelled; outages are waited out, never raised."""
        if self._running:
            raise RuntimeError("KafkaForwarder.run is already running")
        self._running = True
        try:
            while True:
                try:
                    producer = await self._ensure_producer()
                    await self._pump(producer, until_empty=False)
                except SinkUnavailable as exc:
                    await self._close_producer()
                    await asyncio.sleep(self._went_down(exc))
        finally:
            self._running = False
            self._connected = False
            await self._close_producer()

    async def drain(self, timeout_s: float) -> int:
        """At shutdown (after ``run`` was cancelled): forward what is buffered until the buffer
        is empty or ``timeout_s`` passed. Returns the events delivered; never raises."""
        if self._running:
            self._log.warning("kafka.drain_while_running")
            return 0
        before, started = self._delivered, time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                await self._drain_loop()
        except TimeoutError:
            self._log.warning("kafka.drain_deadline", timeout_s=timeout_s,
                              pending_events=self._buffer.pending_events)
        except Exception as exc:  # noqa: BLE001 - shutdown goes on; the rest stays buffered
            self._log.error("kafka.drain_failed", error=repr(exc))
        finally:
            await self._close_producer()
            self._connected = False
        delivered = self._delivered - before
        self._log.info("kafka.drained", delivered=delivered,
                       pending_events=self._buffer.pending_events,
                       elapsed_s=round(time.monotonic() - started, 2))
        return delivered

    async def _drain_loop(self) -> None:
        while True:
            try:
                producer = await self._ensure_producer()
                await self._pump(producer, until_empty=True)
                return
            except SinkUnavailable as exc:
                await self._close_producer()
                await asyncio.sleep(self._went_down(exc))

    # -- connection state ---------------------------------------------------------------

    def _went_down(self, exc: SinkUnavailable) -> float:
        """Record a failure; returns the delay before the next attempt."""
        delay = self._backoff.next()
        self._connected = False
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._log.warning("kafka.unreachable", error=str(exc), retry_in_s=round(delay, 2),
                              bootstrap_servers=self._config.bootstrap_servers,
                              pending_events=self._buffer.pending_events)
        else:
            self._log.debug("kafka.retry", error=str(exc), retry_in_s=round(delay, 2))
        return delay

    def _came_up(self) -> None:
        """Kafka acknowledged, or was reachable with nothing to send."""
        self._backoff.reset()
        if self._connected:
            return
        self._connected = True
        if self._down_since is not None:
            self._log.info("kafka.connected", bootstrap_servers=self._config.bootstrap_servers,
                           outage_s=round(time.monotonic() - self._down_since, 1),
                           pending_events=self._buffer.pending_events)
            self._down_since = None
        elif not self._ever_connected:
            self._log.info("kafka.connected", bootstrap_servers=self._config.bootstrap_servers,
                           client_id=self._client_id)
        self._ever_connected = True

    # -- producer lifecycle -------------------------------------------------------------

    def _new_producer(self) -> AIOKafkaProducer:
        c = self._config
        options: dict[str, Any] = {
            "bootstrap_servers": c.bootstrap_servers,
            "client_id": self._client_id,
            "acks": _ACKS[c.acks],
            "enable_idempotence": c.enable_idempotence,
            "linger_ms": c.linger_ms,
            "max_batch_size": c.max_batch_bytes,
            "max_request_size": c.max_request_bytes,
            "compression_type": None if c.compression == "none" else c.compression,
            "request_timeout_ms": c.request_timeout_ms,
            "security_protocol": c.security_protocol,
        }
        if c.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context(cafile=c.ssl_cafile)
        if c.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = c.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = c.sasl_username
            if c.sasl_password is not None:
                options["sasl_plain_password"] = c.sasl_password.get_secret_value()
        return AIOKafkaProducer(**options)

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        producer = self._new_producer()
        try:
            async with asyncio.timeout(self._config.request_timeout_ms / 1000):
                await producer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            await self._stop(producer)
            self._metrics.inc("kafka_send_errors_total", stage="connect")
            raise SinkUnavailable(f"cannot reach Kafka: {exc!r}") from exc
        except BaseException:  # cancelled (shutdown, drain deadline): do not leak it
            await self._stop(producer)
            raise
        self._producer = producer
        return producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop(producer)

    @staticmethod
    async def _stop(producer: AIOKafkaProducer) -> None:
        """Close now. Batches still in flight are abandoned: the buffer still holds them."""
        _abandon_batches(producer)
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await producer.stop()
        except (KafkaError, OSError, TimeoutError):
            pass

    # -- the forwarding loop ------------------------------------------------------------

    async def _pump(self, producer: AIOKafkaProducer, *, until_empty: bool) -> None:
        """Forward rounds until the buffer reads empty (``until_empty``) or forever.

        A round's delete runs on the buffer's thread while the next round is encoded and sent
        (the next read does not need it: it starts after the cursor; and a re-read after a
        failure is queued behind it). Raises SinkUnavailable on a retriable failure, after
        deleting what was acknowledged.
        """
        cursor = 0
        deleting: asyncio.Future[None] | None = None
        try:
            while True:
                newest = self._buffer.last_seq
                records = await self._buffer.read(cursor, self._config.max_in_flight_events)
                if not records:
                    self._came_up()
                    if until_empty:
                        return
                    cursor = max(cursor, newest)  # nothing after cursor: all up to newest is gone
                    if not await self._buffer.wait_for_records(cursor, IDLE_CHECK_S):
                        await self._check_reachable(producer)
                    continue
                outcome = await self._forward(producer, records)
                if deleting is not None:
                    await deleting
                self._account(outcome)
                deleting = asyncio.ensure_future(self._buffer.delete(outcome.done))
                if outcome.error is not None:
                    raise SinkUnavailable(f"send failed: {outcome.error!r}") from outcome.error
                cursor = outcome.resume_after
                self._probe_until = outcome.probe_until
        finally:
            if deleting is not None:
                await deleting

    async def _check_reachable(self, producer: AIOKafkaProducer) -> None:
        """While idle, ask for cluster metadata so ``connected`` does not go stale."""
        try:
            async with asyncio.timeout(self._config.request_timeout_ms / 1000):
                ok = await producer.client.force_metadata_update()
        except (KafkaError, OSError, TimeoutError) as exc:
            raise SinkUnavailable(f"idle check failed: {exc!r}") from exc
        if not ok:
            raise SinkUnavailable("idle check: no broker answered a metadata request")

    def _account(self, outcome: _Outcome) -> None:
        if outcome.acked:
            self._metrics.inc("events_forwarded_total", outcome.acked)
            self._delivered += outcome.acked
            self.last_ack_time = time.time()
            self._came_up()
        if outcome.failed_batches:
            self._metrics.inc("kafka_send_errors_total", outcome.failed_batches, stage="send")

    async def _forward(self, producer: AIOKafkaProducer,
                       records: Sequence[BufferedRecord]) -> _Outcome:
        """Send one round and settle it: every record ends acknowledged, dropped or failed."""
        partitions = await self._partitions_of(producer, self._topics_of(records))
        batches, rejected = self._build(producer, records, partitions)
        futures, submit_error = await self._submit(producer, batches)
        results: list[Any] = list(await asyncio.gather(*futures, return_exceptions=True))
        if submit_error is not None:
            results.append(submit_error)
            results.extend([_NotSent()] * (len(batches) - len(results)))
        outcome = self._settle(batches, results, records[-1].seq)
        outcome.done.extend(rejected)
        if outcome.rejected:
            by_seq = {r.seq: r for r in records}
            for seq, error in outcome.rejected:
                self._reject(by_seq[seq], "kafka_rejected", repr(error))
        return outcome

    def _topics_of(self, records: Iterable[BufferedRecord]) -> set[str]:
        topics = (self._topic(t) for t in {r.type for r in records})
        return {t for t in topics if t is not None}

    def _topic(self, event_type: str) -> str | None:
        """The topic of a type (cached); ``None`` when the template makes an illegal name."""
        if event_type in self._topics:
            return self._topics[event_type]
        topic: str | None = topic_for(self._config.topic_template, event_type, self._gateway_id)
        if topic is not None and (not _LEGAL_TOPIC.fullmatch(topic) or topic in (".", "..")):
            topic = None
        self._topics[event_type] = topic
        return topic

    async def _partitions_of(self, producer: AIOKafkaProducer,
                             topics: Iterable[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for topic in topics:
            try:
                parts = sorted(await producer.partitions_for(topic))
            except (KafkaError, OSError) as exc:
                self._metrics.inc("kafka_send_errors_total", stage="metadata")
                raise SinkUnavailable(f"no metadata for topic {topic}: {exc!r}") from exc
            if not parts:  # a topic being created can report no partitions yet
                raise SinkUnavailable(f"topic {topic} has no partitions yet")
            out[topic] = parts
        return out

    def _partition(self, key: bytes, partitions: list[int]) -> int:
        """murmur2 partitioning, as aiokafka's and the Java client's default; cached per key."""
        n = len(partitions)
        index = self._partitions.get((key, n))
        if index is None:
            if len(self._partitions) >= _PARTITION_CACHE_MAX:
                self._partitions.clear()
            index = self._partitions[(key, n)] = (murmur2(key) & 0x7FFFFFFF) % n
        return partitions[index]

    def _build(self, producer: AIOKafkaProducer, records: Iterable[BufferedRecord],
               partitions: dict[str, list[int]]) -> tuple[list[_Batch], list[int]]:
        """Record batches per topic-partition, each in seq order, in the order to submit, and
        the seqs of records dropped because they can never be sent.

        One pass, straight into the batch builders: per-record objects die young (holding a
        round's worth of header lists alive costs more in garbage collection than encoding)."""
        open_batches: dict[tuple[str, int], _Batch] = {}
        ready: list[_Batch] = []
        rejected: list[int] = []
        probe_until = self._probe_until
        for record in records:
            message = self._message(record)
            if message is None:
                rejected.append(record.seq)
                continue
            topic, key, value, headers = message
            tp = (topic, self._partition(key, partitions[topic]))
            batch = open_batches.get(tp)
            if batch is None:
                batch = open_batches[tp] = _Batch(topic, tp[1], producer.create_batch())
            if batch.builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                ready.append(batch)  # full: close it, start the next one for this partition
                batch = open_batches[tp] = _Batch(topic, tp[1], producer.create_batch())
                batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
            batch.seqs.append(record.seq)
            if record.seq <= probe_until:
                ready.append(open_batches.pop(tp))
        ready.extend(open_batches.values())
        return ready, rejected

    def _message(self, r: BufferedRecord) -> Message | None:
        """``(topic, key, value, headers)`` of a record; ``None`` (logged, counted) when the
        record can never be sent."""
        topic = self._topics[r.type] if r.type in self._topics else self._topic(r.type)
        if topic is None:
            self._reject(r, "kafka_rejected", "illegal topic name")
            return None
        key = r.subject.encode()
        if self._config.content_mode == "structured":
            value, headers = r.body, self._structured_headers
        else:
            try:
                value, headers = binary_message(r.body)
            except (ValueError, TypeError, AttributeError, msgspec.DecodeError) as exc:
                self._reject(r, "invalid_record", f"undecodable body: {exc}")
                return None
        # A binary record is never larger than its structured body plus header names: the exact
        # size is only worth computing near the limit.
        limit = self._config.max_request_bytes
        if len(r.body) + len(key) + _RECORD_OVERHEAD > limit:
            size = _record_size(key, value, headers)
            if size > limit:
                self._reject(r, "kafka_rejected",
                             f"record of {size} bytes exceeds max_request_bytes {limit}")
                return None
        return topic, key, value, headers

    async def _submit(self, producer: AIOKafkaProducer, batches: Sequence[_Batch]
                      ) -> tuple[list[asyncio.Future[Any]], BaseException | None]:
        """Hand the batches to the producer; stops at the first one it refuses."""
        futures: list[asyncio.Future[Any]] = []
        for b in batches:
            try:
                futures.append(await producer.send_batch(b.builder, b.topic, partition=b.partition))
            except (KafkaError, OSError, AssertionError) as exc:  # assert: partitions changed
                return futures, exc
        return futures, None

    def _settle(self, batches: Sequence[_Batch], results: Sequence[Any], last_seq: int) -> _Outcome:
        out = _Outcome(resume_after=last_seq)
        first_failure: dict[tuple[str, int], int] = {}
        suspects: list[int] = []
        for batch, result in zip(batches, results, strict=True):
            if not isinstance(result, BaseException):
                out.acked += len(batch.seqs)
                continue
            out.failed_batches += 1
            if isinstance(result, _PERMANENT) and len(batch.seqs) == 1:
                out.rejected.append((batch.seqs[0], result))
                out.done.extend(batch.seqs)
                continue
            if isinstance(result, _PERMANENT):
                suspects.extend(batch.seqs)
            elif out.error is None:
                out.error = result
            tp = (batch.topic, batch.partition)
            first_failure[tp] = min(first_failure.get(tp, batch.seqs[0]), batch.seqs[0])
        for batch, result in zip(batches, results, strict=True):
            if not isinstance(result, BaseException):
                limit = first_failure.get((batch.topic, batch.partition))
                if limit is None or batch.seqs[-1] < limit:
                    out.done.extend(batch.seqs)
        if first_failure:
            out.resume_after = min(first_failure.values()) - 1
        out.probe_until = max(suspects, default=0)
        return out

    def _reject(self, record: BufferedRecord, reason: str, why: str) -> None:
        self._metrics.inc("events_dropped_total", reason=reason)
        self._log.warning("kafka.rejected", seq=record.seq, id=_event_id(record),
                          type=record.type, subject=record.subject, reason=reason, error=why)


def _abandon_batches(producer: AIOKafkaProducer) -> None:
    """Fail every batch the producer still holds, so that ``stop()`` returns at once.

    Without this, aiokafka's ``stop()`` waits until each pending batch is delivered or expired
    (up to ``request_timeout_ms`` while Kafka is away), and a batch that a closing producer
    delivers late could land after the same events re-sent by its successor (per-key order).
    aiokafka has no public call for it: this reaches into the accumulator, and does nothing if
    a future aiokafka changes those internals (``stop()`` is then merely slower).
    """
    accumulator = getattr(producer, "_message_accumulator", None)
    try:
        batches = [b for queue in accumulator._batches.values() for b in queue]  # type: ignore[union-attr]
        batches += list(accumulator._pending_batches)  # type: ignore[union-attr]
        accumulator.fail_all(KafkaTimeoutError("forwarder closed the producer"))  # type: ignore[union-attr]
    except AttributeError:
        return
    for batch in batches:  # nobody awaits these any more: mark their errors as seen
        for future in (getattr(batch, "future", None), getattr(batch, "_drain_waiter", None)):
            if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
                future.exception()


def _record_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    return len(key) + len(value) + _RECORD_OVERHEAD + sum(len(k) + len(v) for k, v in headers)


def _event_id(record: BufferedRecord) -> str | None:
    try:
        value = decode_envelope(record.body).get("id")
    except (ValueError, msgspec.DecodeError):
        return None
    return value if isinstance(value, str) else None
