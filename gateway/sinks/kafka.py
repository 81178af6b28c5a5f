"""Kafka forwarder (aiokafka): buffered events out, deleted from the buffer only once acknowledged.

Design
------

The forwarder is the buffer's only reader. It loops in rounds: read up to
``max_in_flight_events`` records (and ``max_in_flight_bytes`` of them) after a cursor, turn them
into Kafka records (the CloudEvents Kafka protocol binding), hand them to the producer as whole
record batches, await every batch's acknowledgement, dead-letter what Kafka can never take,
delete the acknowledged and dead-lettered seqs from the buffer, advance. With nothing to read it
awaits the buffer's "appended" signal (no polling).

Binding (CloudEvents 1.0 Kafka protocol binding):

- key = the event ``subject`` (UTF-8): one asset's events land in one partition, in order;
- topic = ``topic_template`` with ``{type}``, ``{domain}``, ``{name}``, ``{version}``,
  ``{gateway_id}`` (``production.MachineStateChanged.v1`` -> domain ``production``, name
  ``MachineStateChanged``, version ``v1``; a domain may contain dots);
- binary mode: every attribute as a ``ce_<name>`` header, ``content-type`` = the event's
  ``datacontenttype``, value = the JSON of ``data`` alone;
- structured mode: value = the buffered envelope as is, ``content-type:
  application/cloudevents+json``.
- Provenance (a forwarder created with ``provenance=True``, as the daemon does): every record
  also carries the extension attributes ``gatewayid`` (this gateway's id) and ``sequence`` (the
  event's buffer seq, zero-padded to 20 digits: per gateway, strictly increasing, never reused,
  so a consumer reading every topic of the gateway sees a gap only where an event was lost;
  docs/data-products.md). Binary mode: ``ce_gatewayid`` and ``ce_sequence`` headers; structured
  mode: both spliced in front of the buffered envelope's attributes (no re-encoding). A
  dead-letter record carries the seq of the event it stands in for. The mapping engine's
  provenance attributes (``mappingfile``, ``mappinghash``, ...) are in the buffered envelope
  and become ``ce_*`` headers like any attribute.
- The catalog (``gateway.CatalogEntry.v1`` events, :mod:`gateway.catalog`) goes to
  ``catalog_topic`` when it is set.
- The Kafka record timestamp is the send time, not the event time: events replayed after a
  long outage must not fall behind the topic's retention the moment they arrive.

Invariants:

- At-least-once: a record is deleted from the buffer only after Kafka acknowledged it (per
  ``acks``; ``all`` by default), or after the dead-letter record that stands in for it was
  acknowledged (or refused for good, below). A crash or an outage between send and delete
  re-sends it, with the same CloudEvent ``id``; consumers deduplicate on ``source`` + ``id``.
  Nothing is counted as delivered (``events_forwarded_total``, ``delivered``) before Kafka
  acknowledged it.
- Per-key order: records are partitioned here (aiokafka's murmur2 partitioner, as the Java
  client), batched per partition in seq order, and aiokafka keeps one request in flight per
  partition. When a batch fails, the partition's later records are not deleted even if they were
  acknowledged: the whole tail from the first failure is re-sent in order, so the last record a
  consumer sees for a key is the newest event (duplicates allowed, reordering not).
- Dead letters: an event Kafka can never take never blocks the queue nor is retried forever.
  Found here: larger than ``max_record_bytes`` (reason ``too_large``, no round trip: the size
  is ``len`` of body and key, computed exactly only near the limit), a topic name the template
  makes illegal (``invalid_topic``), a body that is not a CloudEvent (``invalid_record``).
  Found by the broker (``MessageSizeTooLarge``, ``RecordListTooLarge``, ``RecordTooLarge`` ->
  ``too_large``; ``InvalidTopic`` -> ``invalid_topic``; ``CorruptRecord``,
  ``InvalidTimestamp``, ``UnsupportedForMessageFormat`` -> ``invalid_record``): a rejected
  multi-record batch is re-sent one record per batch to find the culprit. Each such event is
  replaced by a dead-letter record, a CloudEvent of type ``gateway.DeadLetter.v1`` on
  ``dead_letter_topic`` (default: ``topic_template`` applied to that type), key = the event's
  subject, with the same subject, source and time, id = the event's id + ``-dead-letter``,
  and as data the reason, the Kafka error's name and message, the intended topic, the
  gateway id, the body's size and the event's id, type, subject, source and time, never its
  data. The event is deleted once that record is acknowledged, counted
  (``events_dead_lettered_total{reason}``) and logged (``kafka.dead_lettered``); a retriable
  failure keeps it buffered. A dead-letter record refused for good is not dead-lettered in
  turn: counted (``events_dropped_total{reason="dead_letter_refused"}``), logged
  (``kafka.dead_letter_refused``) and dropped. Either way the whole event is appended as one
  JSON line to ``deadletter.jsonl`` in the buffer's directory, which is capped at
  ``dead_letter_file_max_bytes`` (then renamed ``deadletter.jsonl.1``, replacing the older).
- Bounded memory: one round at a time is in the producer (at most ``max_in_flight_events``
  events and ``max_in_flight_bytes`` of buffered bodies, or one larger event), and the read
  that feeds a round is sized from the average event size just read.
- An outage never raises out of :meth:`KafkaForwarder.run`: it closes the producer (failing
  whatever it still holds, so a late delivery by the old producer cannot overtake the re-send),
  backs off exponentially (``retry_min_s`` .. ``retry_max_s``, with jitter), creates a fresh
  producer and re-reads from the oldest buffered record. A round not acknowledged within two
  ``request_timeout_ms`` counts as an outage too (aiokafka's idempotent producer retries a lost
  connection forever). ``kafka.unreachable`` is logged once per outage and ``kafka.connected``
  once when Kafka is back. aiokafka errors become :class:`~gateway.errors.SinkUnavailable`
  where they enter this module.
- ``connected`` is true once Kafka acknowledged a batch or, with nothing to send, answered; an
  idle forwarder asks for metadata every ``IDLE_CHECK_S`` so health does not report a Kafka
  that went away at night as connected.
- ``drain`` (shutdown) forwards until the buffer reads empty or its deadline; on the deadline
  in-flight batches are abandoned (they stay buffered) and it returns, it never raises.
- A delete that fails (the disk is full: SQLite needs room even to delete) is logged once
  (``kafka.delete_failed``), counted (``buffer_delete_errors_total``) and retried with every
  later delete and while idle; the events stay buffered meanwhile (a restart would re-send
  them: duplicates, never loss). Any other broken buffer (``BufferError`` from a read) ends
  ``run``: that is the daemon's to handle.

Producer: ``acks`` (``all`` by default), the idempotent producer (``enable_idempotence``, on by
default; it needs ``acks: all``; off for the Tansu test broker, which refuses it),
``compression``, TLS (``security_protocol`` ``SSL``/``SASL_SSL``, ``ssl_cafile``) and SASL
(``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``) come from :class:`KafkaConfig`. Leader and
metadata changes are aiokafka's: a ``NotLeaderForPartition`` or a lost connection refreshes the
metadata and retries the batch (until it expires after ``request_timeout_ms``; the idempotent
producer until the round's deadline above); partitions are looked up each round, so a topic
that gained partitions is used after the next metadata refresh; what still fails is re-sent
from the buffer as above.

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
import hashlib
import logging
import os
import random
import re
import ssl
import string
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import Field, SecretStr, field_validator, model_validator

from gateway import errors, logs
from gateway.buffer.disk import BufferedRecord, DiskBuffer
from gateway.configbase import Strict
from gateway.errors import SinkUnavailable
from gateway.metrics import Metrics
from gateway.model import JSON, SPECVERSION, decode_envelope, encode_json, rfc3339


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
    """How long one produce request may take before it is retried. Batches not acknowledged
    within twice this count as failed: the forwarder reconnects and re-sends them from the
    buffer (the idempotent producer would otherwise retry a lost connection forever)."""
    max_in_flight_events: int = Field(default=10_000, ge=1)
    """Most events in one round: read from the buffer, handed to the producer and not yet
    acknowledged. The forwarder awaits a whole round before it reads the next one."""
    max_in_flight_bytes: int = Field(default=16_777_216, ge=1024)
    """Most buffered event bytes in one round (a round holds at least one event, however
    large). With ``max_in_flight_events`` this bounds the producer's memory: aiokafka never holds
    more than one round, about this many bytes plus one larger event. The next read from the
    buffer is sized from the events just read, so it stays near this bound too."""
    retry_min_s: float = Field(default=0.5, gt=0)
    """First delay after Kafka failed; doubles up to ``retry_max_s``."""
    retry_max_s: float = Field(default=30.0, gt=0)
    """Longest delay between attempts while Kafka is unreachable."""
    client_id: str | None = None
    """Kafka client id; default ``digispine-gateway-<gateway id>``."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How to talk to the brokers. ``PLAINTEXT``/``SASL_PLAINTEXT`` to brokers that are not on
    this machine are refused unless ``allow_plaintext`` is true: use ``SSL`` or ``SASL_SSL``."""
    allow_plaintext: bool = False
    """Accept ``PLAINTEXT``/``SASL_PLAINTEXT`` to brokers on other machines (events, and a
    SASL password, cross the network in clear); still warned about at every start."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism when ``security_protocol`` is SASL_*."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: SecretStr | None = None
    """SASL password; from the environment or a credentials file."""
    ssl_cafile: str | None = None
    """CA bundle (PEM) that issued the brokers' certificates (SSL, SASL_SSL); default: the
    operating system's trusted CAs."""
    ssl_certfile: str | None = None
    """The gateway's client certificate (PEM), for brokers that authenticate clients by
    certificate (mutual TLS); may hold the key too."""
    ssl_keyfile: str | None = None
    """The private key (PEM) of ``ssl_certfile``, unless that file holds it."""
    ssl_password: SecretStr | None = None
    """Password of an encrypted ``ssl_keyfile``; from the environment or a credentials file."""
    max_record_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest Kafka record sent: its size as a batch of one, before compression (aiokafka's
    upper-bound estimate; also aiokafka's ``max_request_size``). Keep it at or below the topics'
    ``max.message.bytes`` (brokers' ``message.max.bytes``, 1048588 by default). A larger event
    is not sent: it goes to the dead-letter path with reason ``too_large``."""
    dead_letter_topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$",
                                          examples=["digispine.gateway.DeadLetter.v1"])
    """Topic of the dead-letter records (type ``gateway.DeadLetter.v1``) that stand in for events
    Kafka can never take (too large, illegal topic, refused by the broker for good); default:
    ``topic_template`` applied to that type, ``digispine.gateway.DeadLetter.v1`` with the default
    template. A dead-letter record carries the event's attributes, size and the reason, never
    its data."""
    catalog_topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$",
                                      examples=["digispine.catalog"])
    """Topic of the gateway's catalog (type ``gateway.CatalogEntry.v1``: one record per event
    type it emits, key ``gateways/<gateway id>/types/<event type>``, value the contract and the
    JSON Schema of its data; see docs/data-products.md), published at start and after a mapping
    reload that changed it. Default: ``topic_template`` applied to that type
    (``digispine.gateway.CatalogEntry.v1`` with the default template). Fit for a compacted topic."""
    catalog_publish: bool = True
    """Publish the catalog (through the buffer, like every event). ``false``: never."""
    dead_letter_file_max_bytes: int = Field(default=67_108_864, ge=0)
    """Cap of ``deadletter.jsonl`` in the buffer directory, which keeps each dead-lettered
    event whole (one JSON line with the reason); when the next line would pass the cap the file
    becomes ``deadletter.jsonl.1`` (replacing the previous one), so both take at most twice this.
    A line larger than the cap is written without the event. 0: no file."""

    @field_validator("topic_template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        names = {f[1] for f in string.Formatter().parse(value) if f[1] is not None}
        unknown = names - set(_TOPIC_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {list(_TOPIC_FIELDS)}")
        return value

    @field_validator("dead_letter_topic", "catalog_topic")
    @classmethod
    def _not_dots(cls, value: str | None) -> str | None:
        if value in (".", ".."):
            raise ValueError("'.' and '..' are not topic names")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> KafkaConfig:
        if self.max_record_bytes < self.max_batch_bytes:
            raise ValueError("max_record_bytes must be at least max_batch_bytes")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be at least retry_min_s")
        if self.enable_idempotence and self.acks != "all":
            raise ValueError("enable_idempotence needs acks: all (or enable_idempotence: false)")
        if self.security_protocol.startswith("SASL") and (
                self.sasl_username is None or self.sasl_password is None):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username "
                             "and sasl_password")
        files = {k: getattr(self, k) for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
                 if getattr(self, k)}
        if files and self.security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"{', '.join(files)} apply to security_protocol SSL or SASL_SSL, "
                             f"not {self.security_protocol}")
        for key, name in files.items():
            if not os.access(name, os.R_OK):
                raise ValueError(f"{key} {name} does not exist or cannot be read (use an "
                                 f"absolute path)")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate it belongs to)")
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
_REASONS: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError), "too_large"),
    ((InvalidTopicError,), "invalid_topic"),
)
"""The ``reason`` of a permanent broker rejection; any other is ``invalid_record``."""
_SIZE_SLACK = 1024
"""A record's exact size is computed only when its buffered body and key come this close to
``max_record_bytes``: the binary encoding is at most the body plus a few bytes per attribute,
and the batch framing (82 bytes) and the length varints fit well within this."""
DEAD_LETTER_TYPE = "gateway.DeadLetter.v1"
"""CloudEvent type of the record that stands in for an event Kafka can never take."""
CATALOG_TYPE = "gateway.CatalogEntry.v1"
"""CloudEvent type of the catalog records (:mod:`gateway.catalog`)."""
SEQUENCE_DIGITS = 20
"""The ``sequence`` attribute is the buffer seq zero-padded to this many digits, so that its
lexicographic order is its numeric order (as the CloudEvents sequence extension asks)."""
DEAD_LETTER_ID_SUFFIX = "-dead-letter"
"""Appended to the original event's id to make its dead-letter record's id."""
DEAD_LETTER_FILE = "deadletter.jsonl"
"""The local dead-letter file, in the buffer's directory."""
_MESSAGE_MAX = 1000
"""Longest error message copied into a dead-letter record."""
_CLOSE_TIMEOUT_S = 5.0
_ROUND_TIMEOUTS = 2
"""A round not acknowledged within this many ``request_timeout_ms`` fails and is re-sent."""
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
    mappingfile: str | None = None
    mappingversion: str | None = None
    mappinghash: str | None = None
    contractversion: str | None = None
    sourceconnection: str | None = None
    sourceaddress: str | None = None
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
    if env.mappinghash is not None:  # a mapped event: the provenance attributes, as written
        for name in _PROVENANCE:
            attr = getattr(env, name)
            if attr is not None:
                headers.append(("ce_" + name, attr.encode()))
    headers.append(("content-type", env.datacontenttype.encode()))
    return (b"" if env.data is msgspec.UNSET else bytes(env.data)), headers


_PROVENANCE = ("mappingfile", "mappingversion", "mappinghash", "contractversion",
               "sourceconnection", "sourceaddress")
"""The mapping engine's provenance attributes, in envelope order
(:data:`gateway.mapping.contracts.PROVENANCE_ATTRIBUTES`)."""


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
    """Seqs to delete: acknowledged (and not behind a failure) or dead-lettered."""
    acked: int = 0
    acked_by_topic: dict[str, int] = field(default_factory=dict)
    failed_batches: int = 0
    error: BaseException | None = None
    """The first retriable failure, if any: the round ends the connection."""
    resume_after: int = 0
    """The cursor for the next read."""
    probe_until: int = 0
    """Seqs up to this one go out one record per batch (isolating a permanent rejection)."""
    rejected: list[tuple[int, BaseException]] = field(default_factory=list)
    """Single records the broker refused for good (not in ``done`` until dead-lettered)."""


@dataclass(slots=True)
class _Rejection:
    """An event Kafka can never take, on its way to the dead-letter path."""

    record: BufferedRecord
    topic: str | None
    """The topic it was meant for (``None``: the template made an illegal name)."""
    reason: str
    """``too_large``, ``invalid_topic`` or ``invalid_record`` (the metric label)."""
    error: str
    """The Kafka error's name (``MessageSizeTooLargeError``...) or the decoder's."""
    message: str


class _NotSent(KafkaError):  # type: ignore[misc]
    """A batch not submitted because an earlier submission failed."""

    retriable = True


class DeadLetterFile:
    """``deadletter.jsonl``: one JSON line per dead-lettered event, the event whole, bounded.

    When the next line would take the file past ``max_bytes`` it is renamed to
    ``deadletter.jsonl.1`` (replacing the older one) and a new file begins; a line alone larger
    than ``max_bytes`` is written without its event (``"event_omitted": true``). Blocking: call
    it off the event loop. Only the forwarder writes it.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def write(self, entries: Sequence[tuple[dict[str, Any], bytes]]) -> None:
        """Append one line per ``(fields, event body)``; the body is embedded as JSON when it
        is JSON (``event``), else base64 (``event_base64``)."""
        for fields, body in entries:
            line = _dead_letter_line(fields, body)
            if len(line) > self.max_bytes:
                line = encode_json({**fields, "event_omitted": True}) + b"\n"
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(line) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with self.path.open("ab") as f:
                f.write(line)


def _dead_letter_line(fields: dict[str, Any], body: bytes) -> bytes:
    try:
        msgspec.json.decode(body)  # valid JSON: embedded as is
        event: dict[str, Any] = {"event": msgspec.Raw(body)}
    except msgspec.DecodeError:
        event = {"event_base64": base64.b64encode(body).decode()}
    return encode_json({**fields, **event}) + b"\n"


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
                 metrics: Metrics, *, provenance: bool = False) -> None:
        """``provenance``: add ``gatewayid`` and ``sequence`` to every record (the daemon
        does; off by default so that a bare forwarder sends the buffered events unchanged)."""
        self._config = config
        self._provenance = provenance
        self._gateway_header = ("ce_gatewayid", gateway_id.encode())
        self._gateway_json = encode_json(gateway_id)
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
        self._read_limit = config.max_in_flight_events
        self._undeleted: list[int] = []
        """Acknowledged seqs whose delete failed; retried with the next delete."""
        self._delivered = 0
        self.dead_letter_topic = self._legal(
            config.dead_letter_topic or topic_for(config.topic_template, DEAD_LETTER_TYPE, gateway_id))
        """Where dead-letter records go (``None``: the template makes an illegal name; they are
        then dropped, counted and logged)."""
        self.dead_letter_file = (
            DeadLetterFile(buffer.path.parent / DEAD_LETTER_FILE, config.dead_letter_file_max_bytes)
            if config.dead_letter_file_max_bytes else None)
        self.last_ack_time: float | None = None
        """Unix time of the last acknowledgement from Kafka (``None`` before the first)."""
        _quiet_aiokafka()
        metrics.gauge("kafka_connected", lambda: float(self._connected),
                      "1 while the forwarder reaches Kafka, 0 while it retries")
        metrics.describe("events_forwarded_total", "Events acknowledged by Kafka")
        metrics.describe("kafka_send_errors_total", "Failed attempts to connect or send to Kafka")
        metrics.describe("kafka_records_acked_total",
                         "Records Kafka acknowledged, per topic (with the default topic "
                         "template: per event type)")
        metrics.describe("kafka_round_seconds_sum",
                         "Time from sending a round of records to all its acknowledgements")
        metrics.describe("kafka_round_seconds_count", "Rounds of records sent to Kafka")
        metrics.describe("events_dead_lettered_total",
                         "Events Kafka can never take, replaced by a dead-letter record, by reason")

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
            "max_request_size": c.max_record_bytes,
            "compression_type": None if c.compression == "none" else c.compression,
            "request_timeout_ms": c.request_timeout_ms,
            "security_protocol": c.security_protocol,
        }
        if c.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = create_ssl_context(
                cafile=c.ssl_cafile, certfile=c.ssl_certfile, keyfile=c.ssl_keyfile,
                password=c.ssl_password.get_secret_value() if c.ssl_password else None)
        if c.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = c.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = c.sasl_username
            if c.sasl_password is not None:
                options["sasl_plain_password"] = c.sasl_password.get_secret_value()
        return AIOKafkaProducer(**options)

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        try:
            producer = self._new_producer()
        except (ssl.SSLError, OSError) as exc:  # a key that does not match, a wrong password
            self._metrics.inc("kafka_send_errors_total", stage="connect")
            raise SinkUnavailable(
                f"cannot set up TLS with ssl_certfile/ssl_keyfile: {exc} (check that the key "
                f"belongs to the certificate and ssl_password)") from exc
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
                records = self._within_bytes(await self._buffer.read(cursor, self._read_limit))
                if not records:
                    self._came_up()
                    if until_empty:
                        return
                    cursor = max(cursor, newest)  # nothing after cursor: all up to newest is gone
                    if self._undeleted:
                        await self._delete_acked([])
                    if not await self._buffer.wait_for_records(cursor, IDLE_CHECK_S):
                        await self._check_reachable(producer)
                    continue
                sent_at = time.monotonic()
                outcome = await self._forward(producer, records)
                self._metrics.inc("kafka_round_seconds_sum", time.monotonic() - sent_at)
                self._metrics.inc("kafka_round_seconds_count")
                if deleting is not None:
                    await deleting
                self._account(outcome)
                deleting = asyncio.ensure_future(self._delete_acked(outcome.done))
                if outcome.error is not None:
                    raise SinkUnavailable(f"send failed: {outcome.error!r}") from outcome.error
                cursor = outcome.resume_after
                self._probe_until = outcome.probe_until
        finally:
            if deleting is not None:
                await deleting

    async def _delete_acked(self, seqs: Sequence[int]) -> None:
        """Delete acknowledged records, and those whose delete failed before; a failure keeps
        them for the next call instead of ending the forwarder."""
        if self._undeleted:
            seqs = [*self._undeleted, *seqs]
        if not seqs:
            return
        try:
            await self._buffer.delete(seqs)
        except errors.BufferError as exc:
            if not self._undeleted:
                self._log.error("kafka.delete_failed", error=str(exc), events=len(seqs))
            self._metrics.inc("buffer_delete_errors_total")
            self._undeleted = list(seqs)
            return
        if self._undeleted:
            self._log.info("kafka.delete_recovered", events=len(seqs))
            self._undeleted = []

    def _within_bytes(self, records: list[BufferedRecord]) -> list[BufferedRecord]:
        """The leading records that fit in ``max_in_flight_bytes`` (at least one); sizes the
        next read from the average event read (between 1 and ``max_in_flight_events``)."""
        if not records:
            return records
        bound = self._config.max_in_flight_bytes
        sizes = [len(r.body) for r in records]
        total = sum(sizes)
        self._read_limit = max(1, min(self._config.max_in_flight_events,
                                      bound * len(records) // max(total, 1)))
        if total <= bound:
            return records
        taken = 0
        for count, size in enumerate(sizes):
            taken += size
            if taken > bound:
                return records[:max(count, 1)]
        return records  # pragma: no cover - total > bound: the loop returned

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
            for topic, n in outcome.acked_by_topic.items():
                self._metrics.inc("kafka_records_acked_total", n, topic=topic)
            self._delivered += outcome.acked
            self.last_ack_time = time.time()
            self._came_up()
        if outcome.failed_batches:
            self._metrics.inc("kafka_send_errors_total", outcome.failed_batches, stage="send")

    async def _forward(self, producer: AIOKafkaProducer,
                       records: Sequence[BufferedRecord]) -> _Outcome:
        """Send one round and settle it: every record ends acknowledged, dead-lettered or
        failed (then it stays buffered)."""
        partitions = await self._partitions_of(producer, self._topics_of(records))
        batches, rejections = self._build(producer, records, partitions)
        futures, submit_error = await self._submit(producer, batches)
        results = await self._settled(futures)
        if submit_error is not None:
            results.append(submit_error)
            results.extend([_NotSent()] * (len(batches) - len(results)))
        outcome = self._settle(batches, results, records[-1].seq)
        if outcome.rejected:
            by_seq = {r.seq: r for r in records}
            rejections += [self._refused(by_seq[seq], error) for seq, error in outcome.rejected]
        if rejections and outcome.error is None:  # else they stay buffered for the next try
            await self._dead_letter(producer, rejections, outcome)
        return outcome

    def _topics_of(self, records: Iterable[BufferedRecord]) -> set[str]:
        topics = (self._topic(t) for t in {r.type for r in records})
        return {t for t in topics if t is not None}

    def _topic(self, event_type: str) -> str | None:
        """The topic of a type (cached); ``None`` when the template makes an illegal name."""
        if event_type in self._topics:
            return self._topics[event_type]
        if event_type == CATALOG_TYPE and self._config.catalog_topic:
            topic = self._topics[event_type] = self._legal(self._config.catalog_topic)
            return topic
        topic = self._topics[event_type] = self._legal(
            topic_for(self._config.topic_template, event_type, self._gateway_id))
        return topic

    @staticmethod
    def _legal(topic: str) -> str | None:
        return topic if _LEGAL_TOPIC.fullmatch(topic) and topic not in (".", "..") else None

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
               partitions: dict[str, list[int]]) -> tuple[list[_Batch], list[_Rejection]]:
        """Record batches per topic-partition, each in seq order, in the order to submit, and
        the records that can never be sent (for the dead-letter path).

        One pass, straight into the batch builders: per-record objects die young (holding a
        round's worth of header lists alive costs more in garbage collection than encoding)."""
        open_batches: dict[tuple[str, int], _Batch] = {}
        ready: list[_Batch] = []
        rejected: list[_Rejection] = []
        probe_until = self._probe_until
        for record in records:
            message = self._message(record)
            if isinstance(message, _Rejection):
                rejected.append(message)
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

    def _message(self, r: BufferedRecord) -> Message | _Rejection:
        """``(topic, key, value, headers)`` of a record, or why it can never be sent."""
        topic = self._topics[r.type] if r.type in self._topics else self._topic(r.type)
        if topic is None:
            return _Rejection(r, None, "invalid_topic", "InvalidTopicError",
                              f"topic_template makes an illegal topic name of type {r.type!r}")
        key = r.subject.encode()
        if self._config.content_mode == "structured":
            value, headers = r.body, self._structured_headers
        else:
            try:
                value, headers = binary_message(r.body)
            except (ValueError, TypeError, AttributeError, msgspec.DecodeError) as exc:
                return _Rejection(r, topic, "invalid_record", type(exc).__name__,
                                  f"undecodable body: {exc}")
        if self._provenance:
            value = self._stamp(value, headers, r.seq)
        # The exact size is only worth computing near the limit (see _SIZE_SLACK).
        limit = self._config.max_record_bytes
        if len(r.body) + len(key) + _SIZE_SLACK > limit:
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
            if size > limit:
                return _Rejection(r, topic, "too_large", "MessageSizeTooLargeError",
                                  f"the record takes {size} bytes, more than max_record_bytes "
                                  f"({limit}); not sent")
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

    async def _settled(self, futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
        """Each submitted batch's result or exception. A batch not settled within
        ``_ROUND_TIMEOUTS`` request timeouts fails (``KafkaTimeoutError``): the idempotent
        producer retries a lost connection forever, and the forwarder must notice the outage
        (report it, back off, re-send from the buffer with a fresh producer)."""
        if not futures:
            return []
        timeout = _ROUND_TIMEOUTS * self._config.request_timeout_ms / 1000
        try:
            _, pending = await asyncio.wait(futures, timeout=timeout)
        except asyncio.CancelledError:
            for f in futures:  # our wrappers only: the batches stay with the producer
                f.cancel()
            raise
        for f in pending:
            f.cancel()
        return [KafkaTimeoutError(f"no acknowledgement within {timeout:g} s") if f.cancelled()
                else f.exception() or f.result() for f in futures]

    def _settle(self, batches: Sequence[_Batch], results: Sequence[Any], last_seq: int) -> _Outcome:
        out = _Outcome(resume_after=last_seq)
        first_failure: dict[tuple[str, int], int] = {}
        suspects: list[int] = []
        for batch, result in zip(batches, results, strict=True):
            if not isinstance(result, BaseException):
                out.acked += len(batch.seqs)
                out.acked_by_topic[batch.topic] = (out.acked_by_topic.get(batch.topic, 0)
                                                   + len(batch.seqs))
                continue
            out.failed_batches += 1
            if isinstance(result, _PERMANENT) and len(batch.seqs) == 1:
                out.rejected.append((batch.seqs[0], result))  # not a failure: no tail to keep
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

    # -- the dead-letter path -------------------------------------------------------------

    def _refused(self, record: BufferedRecord, error: BaseException) -> _Rejection:
        """A broker's permanent rejection of one record."""
        reason = next((r for kinds, r in _REASONS if isinstance(error, kinds)), "invalid_record")
        return _Rejection(record, self._topic(record.type), reason, type(error).__name__,
                          str(error))

    async def _dead_letter(self, producer: AIOKafkaProducer, rejections: Sequence[_Rejection],
                           out: _Outcome) -> None:
        """Send one dead-letter record per rejection (a batch each), then settle them: acknowledged
        -> the event is done (deleted) and counted; refused for good -> dropped, counted, logged
        (a dead letter never gets a dead letter of its own); a retriable failure -> the event
        stays buffered and the round ends (``out.error``), it is dead-lettered on the next try.
        Every settled event is appended, whole, to the dead-letter file."""
        topic = self.dead_letter_topic
        results: list[Any]
        letters = [self._dead_letter_event(rej) for rej in rejections]
        if topic is None:
            results = [InvalidTopicError("the dead-letter topic name is illegal")] * len(letters)
        else:
            try:
                partitions = (await self._partitions_of(producer, [topic]))[topic]
            except SinkUnavailable as exc:
                out.error = exc
                return
            batches = []
            for rej, letter in zip(rejections, letters, strict=True):
                key = rej.record.subject.encode()
                value, headers = self._encode(encode_json(letter))
                if self._provenance:  # the sequence of the event it stands in for
                    headers = list(headers)
                    value = self._stamp(value, headers, rej.record.seq)
                batch = _Batch(topic, self._partition(key, partitions), producer.create_batch(),
                               [rej.record.seq])
                batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
                batches.append(batch)
            futures, submit_error = await self._submit(producer, batches)
            results = await self._settled(futures)
            if submit_error is not None:
                results.append(submit_error)
                results.extend([_NotSent()] * (len(batches) - len(results)))
        settled: list[tuple[dict[str, Any], bytes]] = []
        for rej, letter, result in zip(rejections, letters, results, strict=True):
            r, data = rej.record, letter["data"]
            fields = {"rejected_at": rfc3339(time.time()), "seq": r.seq,
                      "dead_letter_topic": topic, **data}
            if isinstance(result, BaseException):
                out.failed_batches += 1
                if not isinstance(result, _PERMANENT):
                    out.error = out.error or result
                    continue
                self._metrics.inc("events_dropped_total", reason="dead_letter_refused")
                self._log.error("kafka.dead_letter_refused", seq=r.seq, id=data["event_id"],
                                type=r.type, subject=r.subject, reason=rej.reason,
                                error=rej.error, message=rej.message, size=data["size"],
                                dead_letter_topic=topic, dead_letter_error=repr(result))
                fields["dead_letter_error"] = repr(result)
            else:
                self.last_ack_time = time.time()  # Kafka took it: the backlog moves
                self._came_up()
                self._metrics.inc("events_dead_lettered_total", reason=rej.reason)
                self._log.warning("kafka.dead_lettered", seq=r.seq, id=data["event_id"],
                                  type=r.type, subject=r.subject, reason=rej.reason,
                                  error=rej.error, message=rej.message, size=data["size"],
                                  dead_letter_topic=topic)
            out.done.append(r.seq)
            settled.append((fields, r.body))
        if settled and self.dead_letter_file is not None:
            try:
                await asyncio.to_thread(self.dead_letter_file.write, settled)
            except OSError as exc:
                self._log.error("kafka.dead_letter_file_failed",
                                path=str(self.dead_letter_file.path), error=repr(exc))

    def _dead_letter_event(self, rej: _Rejection) -> dict[str, Any]:
        """The structured CloudEvent of a rejection: the event's attributes, size and the
        reason, never its data. Same subject, source and time as the event, id = its id +
        :data:`DEAD_LETTER_ID_SUFFIX`, so a re-sent dead letter is the same record."""
        r = rej.record
        attrs = _attributes(r.body)
        event_id, source, when = (attrs.get(k) for k in ("id", "source", "time"))
        data = {
            "reason": rej.reason,
            "error": rej.error,
            "message": rej.message[:_MESSAGE_MAX],
            "gateway_id": self._gateway_id,
            "topic": rej.topic,
            "size": len(r.body),
            "event_id": event_id,
            "event_type": r.type,
            "event_subject": r.subject,
            "event_source": source,
            "event_time": when,
        }
        return {
            "specversion": SPECVERSION,
            "id": (event_id or hashlib.sha256(r.body).hexdigest()[:32]) + DEAD_LETTER_ID_SUFFIX,
            "source": source or f"/gateways/{self._gateway_id}",
            "type": DEAD_LETTER_TYPE,
            "subject": r.subject,
            "time": when or rfc3339(time.time()),
            "datacontenttype": JSON,
            "data": data,
        }

    def _stamp(self, value: bytes, headers: list[tuple[str, bytes]], seq: int) -> bytes:
        """Add ``gatewayid`` and ``sequence`` to a record: binary mode as headers (``headers`` is
        the record's own list), structured mode spliced into the JSON object ``value``."""
        if self._config.content_mode == "structured":
            if value[:1] != b"{" or value[1:2] == b"}":
                return value  # not an attribute object: leave it as it is
            return (b'{"gatewayid":' + self._gateway_json + b',"sequence":"'
                    + str(seq).zfill(SEQUENCE_DIGITS).encode() + b'",' + value[1:])
        headers.insert(-1, self._gateway_header)
        headers.insert(-1, ("ce_sequence", str(seq).zfill(SEQUENCE_DIGITS).encode()))
        return value

    def _encode(self, body: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
        """``(value, headers)`` of a structured CloudEvent in the configured content mode."""
        if self._config.content_mode == "structured":
            return body, self._structured_headers
        return binary_message(body)


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


def _attributes(body: bytes) -> dict[str, Any]:
    """The string attributes of a buffered CloudEvent (``id``, ``source``, ``time``...) without
    its data; empty when the body is not one."""
    try:
        env = _envelope_decoder.decode(body)
        return {"id": env.id, "source": env.source, "time": env.time}
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    try:
        envelope = decode_envelope(body)
    except (ValueError, msgspec.DecodeError):
        return {}
    return {k: v for k, v in envelope.items()
            if isinstance(v, str) and k not in ("data", "data_base64")}
