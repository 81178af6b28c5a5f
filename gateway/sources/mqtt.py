"""MQTT source (paho-mqtt): MQTT 5 or 3.1.1, TLS, JSON/plain/binary payloads, acknowledged after
the buffer.

Connection settings (:class:`MqttConnectionConfig`) live in ``config/gateway.yaml`` under
``connections``; what to read (:class:`MqttAddress`) lives in the mapping files. The user's view
of both is ``docs/mqtt.md``.

Acknowledgement contract
    The client runs with paho's ``manual_ack``: a QoS 1/2 PUBLISH is acknowledged to the broker
    (PUBACK / PUBCOMP) only when the pipeline calls the :class:`Delivery`'s ``ack``, i.e. after
    the events made from it are durably in the buffer. Every PUBLISH becomes exactly one
    Delivery, in receive order, even when it yields no signal (a malformed payload, a topic no
    address matches), so that it is acknowledged in order and never redelivered forever. On a
    clean stop (``run`` cancelled) the source first stops taking messages and gives the pipeline
    :attr:`MqttSource.stop_ack_timeout_s` to acknowledge those it already took (the daemon
    drains the pipeline meanwhile), so a restart does not duplicate them (unless the same client
    id connects again before the broker has read the old connection to its end: it may then
    take the session over first and redeliver). After that ``ack``
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
    One ``run`` is one connection. A broker that cannot be reached, refuses the CONNECT (the
    reason code, with a hint, is in the message), fails the TLS handshake or is lost later makes
    ``run`` raise :class:`~gateway.errors.SourceUnavailable`; paho never reconnects by itself
    (``reconnect_on_failure=False``). The daemon's supervisor owns the backoff, logs once down
    and once back, and calls ``run`` again, which connects a fresh client (the TLS files are read
    again, so a renewed certificate is picked up) and subscribes again (a broker restarted
    without persistence has forgotten the subscriptions). With ``session: persistent`` and QoS
    >= 1 the broker keeps what is published while the gateway is away (MQTT 5: for
    ``session_expiry_s``), and what was delivered but not acknowledged, and sends it on the next
    connect with the same client id. A reconnect that finds no session although this source
    had one logs ``mqtt.session_lost`` (what was published meanwhile is lost). Since the
    supervisor, not paho, retries, ``reconnect_min_s`` / ``reconnect_max_s`` are not read here.

Payload decoders (per address)
    ``value_path`` (JSON, with optional ``timestamp_path`` and ``quality_path``), the whole
    payload (JSON scalar or text), ``binary`` (a struct layout: :class:`MqttBinary`) or
    ``capture`` (a ``+name`` level of the topic, e.g. ``plant1/+line/+machine/telemetry``).
    The signals of one message are emitted in one Delivery, captures first, so that a mapping
    reading a capture as a data field sees the capture of the same message.

Malformed payloads
    A payload that is not JSON (for an address with a ``value_path``), a missing value path, an
    unparsable timestamp, an unknown quality indicator or a binary payload too short for its
    layout never stops the stream: the signals that could be extracted are emitted (possibly
    none), the message is acknowledged, and the problem is counted in
    ``mqtt_malformed_payloads_total{connection, topic=<subscription filter>}`` and logged as
    ``mqtt.malformed_payload`` at most once per filter per :attr:`MqttSource.malformed_log_interval_s`
    (with the number of occurrences suppressed since the previous line). A missing timestamp
    alone still yields the signal, timed at receive time; a missing or unknown quality yields it
    with ``Quality.BAD``. A JSON ``null`` at the value path is a signal with ``value=None`` and
    ``Quality.BAD``. With no ``value_path`` the whole payload is the value: JSON when it parses
    (``21.5``, ``true``, ``"Running"``), else its UTF-8 text. A message no address matches (a
    subscription an older mapping left in the persistent session) is acknowledged and counted in
    ``mqtt_unmatched_messages_total``.

Sparkplug B
    Signals with a ``sparkplug`` address block (:class:`~gateway.sources.sparkplug.SparkplugAddress`)
    make the source a Sparkplug B host application as well: one
    :class:`~gateway.sources.sparkplug.SparkplugHost` per source, built from those addresses,
    subscribes to ``spBv1.0/<group>/#`` per group (never as a ``shared_group`` member: a host
    follows every message of a node) and, with ``sparkplug_host_id``, to its own STATE topic.
    The host is not thread-safe and is called from one thread at a time: during a connection
    only from the paho thread (``on_message``, and the STATE messages in ``on_connect``), between
    two connections from the asyncio loop. A Sparkplug PUBLISH is one Delivery like any other,
    acknowledged after the buffer even when it yields no signal; the commands the host returns
    (the NCMD ``Node Control/Rebirth``, its STATE) are published from the paho thread. With a
    ``sparkplug_host_id`` the CONNECT carries the offline STATE as its will, the online STATE
    (QoS 1, retained) follows the CONNACK and the offline one is published on a clean stop. A
    lost connection turns every born metric BAD: ``run`` emits those signals as one Delivery
    (nothing to acknowledge) before raising. The host's counts are turned into metrics by the
    pump (``sparkplug_*_total``), from a snapshot taken after each message on the paho thread;
    a payload the host cannot use counts as a malformed payload of its group's filter.

Throughput note
    With QoS 1 the broker sends at most its ``max_inflight_messages`` (mosquitto: 20) messages
    not yet acknowledged; since acknowledgements wait for the buffer's commit, a connection
    carries at most about that many messages per commit. Raise it on the broker for high rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
from paho.mqtt.client import (
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    MQTTv5,
    MQTTv311,
    topic_matches_sub,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import (
    Field,
    SecretStr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from gateway import logs
from gateway.configbase import Strict
from gateway.errors import SourceUnavailable
from gateway.metrics import Metrics
from gateway.model import Quality, Signal, representable
from gateway.sources.base import Delivery, Emit
from gateway.sources.sparkplug import (
    NAMESPACE as SPARKPLUG_NAMESPACE,
)
from gateway.sources.sparkplug import (
    REBIRTH_INTERVAL_S,
    SparkplugAddress,
    SparkplugHost,
    id_problem,
    publish_options,
)

SESSION_EXPIRY_DEFAULT_S = 7 * 24 * 3600
"""MQTT 5 session expiry by default: a week, longer than any planned outage of a gateway."""
SESSION_EXPIRY_MAX_S = 0xFFFFFFFF
"""MQTT 5's largest session expiry interval, which means "never expires"."""


def _absolute_file(path: Path | None) -> Path | None:
    """A TLS file must be an absolute path to an existing file (checked when the config loads;
    the messages get the path appended as ", got '...'")."""
    if path is None:
        return None
    if not path.is_absolute():
        raise ValueError(f"expected an absolute path (e.g. /etc/digispine-gateway/tls/"
                         f"{path.name})")
    if not path.is_file():
        raise ValueError("expected a file, found a directory" if path.is_dir()
                         else "no such file")
    return path


def _tls_schema(schema: dict[str, Any]) -> None:
    """``tls: true`` is valid too: say so in the JSON Schema."""
    alternatives = schema.get("anyOf")
    if isinstance(alternatives, list):
        alternatives.insert(1, {"type": "boolean"})


class MqttTlsConfig(Strict):
    """TLS towards the broker; with ``cert_file`` the gateway also authenticates itself (mutual
    TLS). ``tls: true`` is the same as ``tls: {}``: the system's CA store, hostname checked."""

    ca_file: Path | None = Field(default=None, examples=["/etc/digispine-gateway/tls/plant-ca.pem"])
    """PEM file of the CA certificate(s) that issued the broker's certificate (absolute path).
    Omitted: the operating system's trusted CAs."""
    cert_file: Path | None = Field(default=None,
                                   examples=["/etc/digispine-gateway/tls/gateway.pem"])
    """The gateway's client certificate (PEM, absolute path), for brokers that require one
    (mosquitto ``require_certificate true``). May hold the private key too."""
    key_file: Path | None = Field(default=None, examples=["/etc/digispine-gateway/tls/gateway.key"])
    """The private key of ``cert_file`` (PEM, absolute path), unless ``cert_file`` holds it."""
    key_password: SecretStr | None = None
    """Password of an encrypted private key; set it from the environment or a credentials file
    (``DIGISPINE_CONNECTIONS__<NAME>__TLS__KEY_PASSWORD``), never in the YAML."""
    insecure_skip_verify: bool = False
    """Accept any broker certificate and host name (encryption without authentication: a
    man in the middle goes unnoticed). For commissioning only; logged as a warning."""
    server_name: str | None = Field(default=None, examples=["broker.plant1.local"])
    """The name the broker's certificate must carry (and the SNI sent), when it differs from
    ``host`` (e.g. connecting by IP address to a certificate issued for a DNS name)."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version accepted."""

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _existing(cls, value: Path | None) -> Path | None:
        return _absolute_file(value)

    @model_validator(mode="after")
    def _pairs(self) -> MqttTlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file needs tls.cert_file (the certificate of that key)")
        if self.key_password is not None and self.cert_file is None:
            raise ValueError("tls.key_password needs tls.cert_file (and tls.key_file)")
        return self


class MqttConnectionConfig(Strict):
    """A plant MQTT broker."""

    protocol: Literal["mqtt"]
    host: str = Field(examples=["broker.plant1.local", "127.0.0.1"])
    """Host name or address of the broker."""
    port: int = Field(default=1883, ge=1, le=65535)
    """TCP port of the broker (1883 plain, 8883 TLS by convention)."""
    protocol_version: Literal["5", "3.1.1"] = "5"
    """MQTT protocol version: ``5`` (the default; session expiry, reason codes in errors) or
    ``3.1.1`` for brokers that do not speak MQTT 5 (a broker refusing version 5 says
    "Unsupported protocol version")."""
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
    session_expiry_s: int = Field(default=SESSION_EXPIRY_DEFAULT_S, ge=1, le=SESSION_EXPIRY_MAX_S)
    """MQTT 5, persistent sessions: how long the broker keeps the session (subscriptions and
    queued messages) after the gateway disconnects; 4294967295 is never. MQTT 3.1.1 has no
    such setting: the broker's own policy applies (mosquitto ``persistent_client_expiration``)."""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    """Seconds between keep-alive pings."""
    reconnect_min_s: float = Field(default=0.5, gt=0)
    """First reconnect delay after a lost connection; doubles up to ``reconnect_max_s``."""
    reconnect_max_s: float = Field(default=30.0, gt=0)
    """Longest reconnect delay."""
    max_payload_bytes: int = Field(default=1_048_576, ge=64, le=268_435_455)
    """Largest payload decoded; a larger message is acknowledged, yields no signal and counts
    as malformed (``payload of N bytes exceeds max_payload_bytes``): one runaway publisher
    cannot exhaust the edge PC's memory."""
    qos: Literal[0, 1, 2] = 1
    """Subscription QoS of addresses that do not set their own ``qos``. With 1 (the default) a
    message is acknowledged to the broker only after its events are durably buffered
    (at-least-once, across crashes too). 0: at most once. 2 is accepted, but gives less than
    1 here: the client keeps the QoS 2 handshake in memory, so messages in flight when the
    gateway is killed are lost."""
    shared_group: str | None = Field(default=None, pattern=r"^[^/+#\s]+$", examples=["edge-hall1"])
    """Subscribe as a member of this shared subscription group (``$share/<group>/<filter>``):
    the broker hands each message to one member of the group only, so several gateways can
    share the load of the same topics. Offline delivery to a persistent session of a member is
    broker-specific."""
    tls: MqttTlsConfig | None = Field(default=None, json_schema_extra=_tls_schema)
    """TLS settings (``ca_file``, ``cert_file``, ``key_file``, ``key_password``,
    ``insecure_skip_verify``, ``server_name``, ``min_version``; see ``docs/mqtt.md``), or
    ``true`` for TLS with the system's CAs; omitted, null or ``false``: plain TCP, which to
    a broker not on this machine needs ``allow_plaintext: true``."""
    allow_plaintext: bool = False
    """Accept plain TCP to a broker on another machine (readings, and the password, cross the
    network in clear); still warned about at every start."""
    sparkplug_host_id: str | None = Field(default=None, examples=["digispine-edge-demo-01"])
    """Sparkplug B only (signals with a ``sparkplug`` block): the host application id. With it
    the gateway publishes its STATE on ``spBv1.0/STATE/<id>`` (QoS 1, retained; online after
    connecting, offline on a clean stop and as the will of the connection), so that edge nodes
    configured for this primary host wait for it. Omitted: no STATE (see
    ``docs/sparkplug.md``)."""
    sparkplug_rebirth: bool = True
    """Sparkplug B only: ask an edge node for a rebirth (an NCMD ``Node Control/Rebirth``) when
    its messages cannot be resolved (data before its birth, an unknown alias, a ``seq`` gap).
    ``false`` makes a read-only host that publishes no command and waits for the births."""
    sparkplug_rebirth_on_gap: bool = True
    """Sparkplug B only: a ``seq`` gap (a lost or reordered message) asks for a rebirth too;
    ``false``: gaps are only counted (``sparkplug_sequence_gaps_total``)."""
    sparkplug_rebirth_interval_s: float = Field(default=REBIRTH_INTERVAL_S, gt=0, le=3600)
    """Sparkplug B only: after a rebirth request, how long the edge node has to answer with its
    NBIRTH before another request may be sent."""
    sparkplug_include_historical: bool = False
    """Sparkplug B only: pass on metrics flagged ``is_historical`` (an edge node's
    store-and-forward) with their own timestamps; by default they are dropped and counted, as
    the mapping would take an old reading for the current one."""

    @field_validator("sparkplug_host_id")
    @classmethod
    def _valid_host_id(cls, value: str | None) -> str | None:
        problem = None if value is None else id_problem(value)
        if problem:
            raise ValueError(f"a Sparkplug host id {problem}")
        return value

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"  # from an environment variable
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @field_validator("protocol_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # YAML reads `protocol_version: 5` as a number.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return value

    @property
    def tls_settings(self) -> MqttTlsConfig | None:
        """The TLS settings (``tls: true`` is an empty block); None for plain TCP."""
        return self.tls


CAPTURE_NAME = r"[a-z][a-z0-9_]*"
"""A topic capture's name (``+line``): lower-case snake_case, like signal names."""
_CAPTURE_LEVEL = re.compile(rf"\+({CAPTURE_NAME})")


def topic_filter_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid MQTT topic filter, or None when it is."""
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


def split_captures(topic: str) -> tuple[str, dict[str, int]]:
    """The subscription filter of a topic with captures (``+name`` levels become ``+``) and
    capture name -> level index. Raises ValueError when the topic is not a valid filter."""
    levels = topic.split("/")
    captures: dict[str, int] = {}
    for i, level in enumerate(levels):
        found = _CAPTURE_LEVEL.fullmatch(level)
        if found is None:
            continue
        name = found.group(1)
        if name in captures:
            raise ValueError(f"capture '+{name}' appears twice in the topic; name each level "
                             f"once")
        captures[name] = i
        levels[i] = "+"
    plain = "/".join(levels)
    problem = topic_filter_problem(plain)
    if problem is not None:
        if "+" in problem:
            problem += "; a capture is '+' and a lower-case name, a whole level (a/+line/c)"
        raise ValueError(problem)
    if plain.startswith("$share/"):
        raise ValueError("write the topic without $share/<group>/ and set shared_group on the "
                         "connection in the gateway config")
    return plain, captures


BinaryType = Literal["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                     "float32", "float64", "bool", "string"]
_STRUCT_CODES: dict[str, str] = {
    "int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
    "int64": "q", "uint64": "Q", "float32": "f", "float64": "d", "bool": "?",
}


class MqttBinary(Strict):
    """Where a value is in a binary payload: a struct layout of one field."""

    offset: int = Field(default=0, ge=0, examples=[0, 4])
    """Position of the first byte of the value in the payload (0 is the first byte)."""
    type: BinaryType = Field(examples=["float32", "uint16", "string"])
    """``int8`` ... ``uint64``, ``float32``, ``float64``, ``bool`` (one byte, non-zero is true)
    or ``string`` (``length`` bytes of UTF-8, trailing NUL bytes removed)."""
    byte_order: Literal["big", "little"] = "big"
    """Byte order of multi-byte numbers: ``big`` (network order, most significant byte first;
    the default) or ``little``."""
    length: int | None = Field(default=None, ge=1, le=65535, examples=[16])
    """Strings only: the number of bytes the string occupies."""

    @model_validator(mode="after")
    def _length_for_strings(self) -> MqttBinary:
        if self.type == "string" and self.length is None:
            raise ValueError("a string needs length: the number of bytes it occupies")
        if self.type != "string" and self.length is not None:
            raise ValueError(f"length applies to strings only; a {self.type} has a fixed size")
        return self

    @property
    def size(self) -> int:
        """Bytes the value occupies."""
        if self.length is not None:
            return self.length
        return struct.calcsize(_STRUCT_CODES[self.type])

    @property
    def tag(self) -> str:
        """The layout's part of a signal tag: ``@<offset>:<type>`` (``:<length>`` for strings,
        ``:le`` for little-endian numbers)."""
        out = f"@{self.offset}:{self.type}"
        if self.length is not None:
            out += f":{self.length}"
        elif self.byte_order == "little" and self.size > 1:
            out += ":le"
        return out

    def decoder(self) -> Callable[[bytes | bytearray], tuple[Any, str | None]]:
        """``payload -> (value, None)`` or ``(None, why not)``; compiled once per address."""
        offset, end, kind = self.offset, self.offset + self.size, self.type
        described = f"{self.type} at offset {self.offset}"
        if self.type == "string":
            def string(raw: bytes | bytearray) -> tuple[Any, str | None]:
                if len(raw) < end:
                    return None, _short(raw, described, end)
                try:
                    return bytes(raw[offset:end]).rstrip(b"\0").decode("utf-8"), None
                except UnicodeDecodeError:
                    return None, f"the {described} is not UTF-8 text"
            return string
        layout = struct.Struct((">" if self.byte_order == "big" else "<") + _STRUCT_CODES[kind])

        def number(raw: bytes | bytearray) -> tuple[Any, str | None]:
            if len(raw) < end:
                return None, _short(raw, described, end)
            return layout.unpack_from(raw, offset)[0], None
        return number


def _short(raw: bytes | bytearray, described: str, end: int) -> str:
    return f"payload has {len(raw)} bytes, the {described} needs {end}"


def decode_binary(layout: MqttBinary, payload: bytes | bytearray) -> tuple[Any, str | None]:
    """The value ``layout`` describes in ``payload``, or None and why not."""
    return layout.decoder()(payload)


QualityCodes = Literal["opcua", "opcda"]
_QUALITY_WORDS = {q.value: q for q in Quality}


def payload_quality(raw: Any, codes: QualityCodes = "opcua") -> Quality | None:
    """The quality a payload's quality indicator stands for; None when it is not one.

    - ``"good"``, ``"uncertain"``, ``"bad"`` (any case, blanks around ignored);
    - ``true`` (good), ``false`` (bad);
    - a whole number, read as an OPC UA StatusCode with ``codes: opcua`` (the two top bits of
      the 32-bit code: ``0`` good, ``0x40000000`` uncertain, ``0x80000000`` and above bad; so
      ``0`` is good) or as an OPC Classic (DA) quality byte with ``codes: opcda`` (bits 7-6:
      ``192``-``255`` good, ``64``-``127`` uncertain, ``0``-``63`` and ``128``-``191`` bad).
    """
    if isinstance(raw, bool):
        return Quality.GOOD if raw else Quality.BAD
    if isinstance(raw, str):
        return _QUALITY_WORDS.get(raw.strip().lower())
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int):
        return None
    if codes == "opcda":
        if not 0 <= raw <= 0xFFFF:
            return None
        bits = raw & 0xC0
        return {0xC0: Quality.GOOD, 0x40: Quality.UNCERTAIN}.get(bits, Quality.BAD)
    if not 0 <= raw <= 0xFFFFFFFF:
        return None
    severity = raw >> 30
    return Quality.GOOD if severity == 0 else Quality.UNCERTAIN if severity == 1 else Quality.BAD


_NEW_ADDRESS_KEYS = {"qos": None, "quality_path": None, "quality_codes": "opcua",
                     "binary": None, "capture": None}
"""Address keys added after the first release, with their defaults: left out of the JSON form
when at the default, so that the state fingerprints of existing mapping files (which hash it)
do not change with the upgrade and persisted trigger state is kept."""


class MqttAddress(Strict):
    """Where a signal's value is in an MQTT message: the topic, and a JSON path, a binary
    layout, a topic capture, or nothing (the whole payload is the value)."""

    topic: str = Field(examples=["acme/plant1/line2/press07/telemetry", "acme/plant1/+/+/state",
                                 "acme/plant1/+line/+machine/telemetry"])
    """Topic filter to subscribe to; ``+`` and ``#`` wildcards allowed. A level ``+name`` is a
    ``+`` wildcard whose value an address can read with ``capture: name``."""
    value_path: str | None = Field(default=None, examples=["temperature_c", "spindle.speed_rpm"])
    """Dotted path to the value in a JSON object payload (``a.b.0.c``; digits index lists).
    Omit it when the whole payload is the value (a plain number, string or boolean)."""
    timestamp_path: str | None = Field(default=None, examples=["ts", "header.timestamp"])
    """Dotted path to the source timestamp: Unix seconds or milliseconds (a number) or an
    RFC 3339 string. Without it the receive time is the event time."""
    quality_path: str | None = Field(default=None, examples=["q", "status.quality"])
    """Dotted path to a quality indicator next to the value: ``good``/``uncertain``/``bad``
    (any case), a boolean (true is good) or a numeric code (see ``quality_codes``). Missing or
    unknown: the reading is bad, and counted as a malformed payload. Needs ``value_path``."""
    quality_codes: QualityCodes = "opcua"
    """How a numeric quality is read: ``opcua`` (an OPC UA StatusCode: 0 is good, severity in
    the two top bits) or ``opcda`` (an OPC Classic quality byte: 192 is good)."""
    binary: MqttBinary | None = Field(
        default=None, examples=[{"offset": 4, "type": "float32", "byte_order": "little"}])
    """The value is a field of a binary payload (a struct layout: ``offset``, ``type``,
    ``byte_order``, ``length`` for strings). Not with the JSON paths."""
    capture: str | None = Field(default=None, pattern=rf"^{CAPTURE_NAME}$", examples=["machine"])
    """The value is the topic level captured by ``+<capture>`` in ``topic`` (a string, e.g.
    ``press07``), not the payload."""
    qos: Literal[0, 1, 2] | None = None
    """Subscription QoS of this topic; default: the connection's ``qos``. Addresses sharing a
    subscription filter subscribe once, with the highest QoS any of them asks for."""

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, topic: str) -> str:
        split_captures(topic)
        return topic

    @model_validator(mode="after")
    def _one_decoder(self) -> MqttAddress:
        if self.capture is not None:
            _, captures = split_captures(self.topic)
            if self.capture not in captures:
                known = ", ".join(f"+{c}" for c in captures) or "none"
                raise ValueError(f"capture '{self.capture}' is not a level of the topic "
                                 f"(write it as +{self.capture}); captures of the topic: {known}")
            clash = [k for k in ("value_path", "quality_path", "binary")
                     if getattr(self, k) is not None]
            if clash:
                raise ValueError(f"capture reads the topic, not the payload: remove "
                                 f"{' and '.join(clash)}")
        if self.binary is not None:
            clash = [k for k in ("value_path", "timestamp_path", "quality_path")
                     if getattr(self, k) is not None]
            if clash:
                raise ValueError(f"binary reads a binary payload: JSON paths do not apply "
                                 f"(remove {' and '.join(clash)})")
        if self.quality_path is not None and self.value_path is None:
            raise ValueError("quality_path needs value_path: the quality sits next to the value "
                             "in a JSON object")
        if "quality_codes" in self.model_fields_set and self.quality_path is None:
            raise ValueError("quality_codes applies to a quality_path")
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler,
                 info: SerializationInfo) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if info.mode_is_json():
            for key, default in _NEW_ADDRESS_KEYS.items():
                if key in out and out[key] == default:
                    del out[key]
        return out

    @property
    def subscription(self) -> str:
        """The filter subscribed to: ``topic`` with its captures as ``+``."""
        return split_captures(self.topic)[0]

    @property
    def tag(self) -> str:
        """The canonical address: ``topic``, ``topic#value_path``, ``topic#+capture`` or
        ``topic#@offset:type`` (a binary layout, see :attr:`MqttBinary.tag`)."""
        if self.capture is not None:
            return f"{self.topic}#+{self.capture}"
        if self.binary is not None:
            return f"{self.topic}#{self.binary.tag}"
        return self.topic if self.value_path is None else f"{self.topic}#{self.value_path}"


DISCONNECT_FLUSH_S = 2.0
"""On a clean stop, how long to let paho send the acknowledgements still queued before it
closes the socket (stopping its thread at once would drop them: the broker would redeliver)."""
CONNACK_TIMEOUT_S = 10.0
"""How long ``run`` waits for the broker's CONNACK once the TCP connection is up."""
MATCH_CACHE_SIZE = 10_000
SUBSCRIPTION_ID_MAX = 268_435_455
"""MQTT 5's largest subscription identifier."""
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
    """The subscription filter (captures as ``+``)."""
    tag: str
    value_path: str | None
    value_parts: tuple[_Part, ...] | None
    timestamp_path: str | None
    timestamp_parts: tuple[_Part, ...] | None
    quality_path: str | None
    quality_parts: tuple[_Part, ...] | None
    quality_codes: QualityCodes
    capture_level: int | None
    """The topic level read by ``capture``; None for payload addresses."""
    binary: Callable[[bytes | bytearray], tuple[Any, str | None]] | None

    @classmethod
    def of(cls, address: MqttAddress) -> _Binding:
        subscription, captures = split_captures(address.topic)
        return cls(
            subscription, address.tag, address.value_path, _compile(address.value_path),
            address.timestamp_path, _compile(address.timestamp_path),
            address.quality_path, _compile(address.quality_path), address.quality_codes,
            captures[address.capture] if address.capture is not None else None,
            address.binary.decoder() if address.binary is not None else None,
        )


class _Body:
    """One PUBLISH payload, decoded at most once, timestamps parsed at most once per path."""

    __slots__ = ("_doc", "_error", "_qualities", "_times", "raw")

    def __init__(self, raw: bytes | bytearray) -> None:
        self.raw = raw
        self._doc: Any = _MISSING
        self._error: str | None = None
        self._times: dict[str, tuple[float | None, str | None]] = {}
        self._qualities: dict[str, tuple[Quality, int | str | None, str | None]] = {}

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

    def quality(self, path: str, parts: tuple[_Part, ...], codes: QualityCodes,
                ) -> tuple[Quality, int | str | None, str | None]:
        """The quality at ``path``, the raw indicator (as the signal's status), and why it is
        not a known indicator (then the quality is bad)."""
        key = f"{codes}:{path}"
        if key not in self._qualities:
            doc, error = self.json()
            raw = _lookup(doc, parts) if error is None else _MISSING
            status = raw if isinstance(raw, int | str) and not isinstance(raw, bool) else None
            if raw is _MISSING:
                self._qualities[key] = (Quality.BAD, None, f"no quality at {path!r}")
            elif (quality := payload_quality(raw, codes)) is None:
                self._qualities[key] = (Quality.BAD, status, f"unknown quality at {path!r}: "
                                                            f"{str(raw)[:40]!r}")
            else:
                self._qualities[key] = (quality, status, None)
        return self._qualities[key]

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


_NO_COMMANDS: list[tuple[str, bytes]] = []
_NCMD = "NCMD"


@dataclass(slots=True)
class _Parsed:
    """What one PUBLISH gave: signals, and per subscription filter the first problem seen."""

    topic: str
    signals: list[Signal]
    problems: dict[str, str]
    matched: bool
    commands: list[tuple[str, bytes]] = field(default_factory=lambda: _NO_COMMANDS)
    """Sparkplug: what the host asks to publish (published on the paho thread)."""
    sparkplug: tuple[int, ...] | None = None
    """Sparkplug: the host's counts after this message (:func:`_sparkplug_counts`); None when
    the host did not read the message."""


_SPARKPLUG_COUNTERS: tuple[tuple[str, str], ...] = (
    ("seq_gaps", "sparkplug_sequence_gaps_total"),
    ("unknown_aliases", "sparkplug_unknown_aliases_total"),
    ("rebirths_requested", "sparkplug_rebirths_requested_total"),
    ("dropped_values", "sparkplug_dropped_values_total"),
    ("stale_deaths", "sparkplug_stale_deaths_total"),
    ("historical_dropped", "sparkplug_historical_dropped_total"),
    ("ignored", "sparkplug_ignored_messages_total"),
)
"""``SparkplugStats`` attribute -> the counter it feeds (labels: ``connection``)."""


def _sparkplug_counts(host: SparkplugHost) -> tuple[int, ...]:
    stats = host.stats
    return (stats.seq_gaps, stats.unknown_aliases, stats.rebirths_requested,
            stats.dropped_values, stats.stale_deaths, stats.historical_dropped, stats.ignored)


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

    def __init__(self, name: str, config: MqttConnectionConfig,
                 addresses: Sequence[MqttAddress | SparkplugAddress], client_id: str,
                 metrics: Metrics) -> None:
        if not addresses:
            raise ValueError(f"MQTT connection {name} has no address to subscribe to")
        if not client_id and config.session == "persistent":
            raise ValueError(f"MQTT connection {name}: a persistent session needs a client id")
        self.name = name
        self.config = config
        self.client_id = client_id
        self._metrics = metrics
        self._log = logs.get("mqtt", source=name)
        plain: list[MqttAddress] = []
        sparkplug: list[SparkplugAddress] = []
        for address in addresses:
            if isinstance(address, SparkplugAddress):
                sparkplug.append(address)
            elif isinstance(address, MqttAddress):
                plain.append(address)
            else:
                raise TypeError(f"MQTT connection {name} cannot read a "
                                f"{type(address).__name__}")
        self.sparkplug: SparkplugHost | None = None
        """The Sparkplug B host of the ``sparkplug`` addresses, if any (see the module doc)."""
        if sparkplug:
            self.sparkplug = SparkplugHost(
                sparkplug, connection=name, host_id=config.sparkplug_host_id,
                request_rebirth=config.sparkplug_rebirth,
                rebirth_on_gap=config.sparkplug_rebirth_on_gap,
                rebirth_interval_s=config.sparkplug_rebirth_interval_s,
                include_historical=config.sparkplug_include_historical)
        by_filter: dict[str, list[_Binding]] = {}
        qos: dict[str, int] = {}
        for address in plain:
            binding = _Binding.of(address)
            by_filter.setdefault(binding.filter, []).append(binding)
            wanted = config.qos if address.qos is None else address.qos
            qos[binding.filter] = max(qos.get(binding.filter, 0), wanted)
        self._by_filter = {f: tuple(bs) for f, bs in by_filter.items()}
        group = config.shared_group
        self.topic_filters: tuple[str, ...] = tuple(self._by_filter)
        """The distinct subscription filters, in address order."""
        self.subscriptions: tuple[tuple[str, int], ...] = tuple(
            (self.subscribed_filter(f), qos[f]) for f in self.topic_filters)
        """What is subscribed: (filter, QoS) per distinct filter, the filter with
        ``$share/<group>/`` when the connection has a ``shared_group``."""
        self._by_id: dict[int, tuple[str, ...]] = {}
        """MQTT 5 subscription identifier -> the filters subscribed with it."""
        for topic_filter, (subscribed, _) in zip(self.topic_filters, self.subscriptions,
                                                  strict=True):
            sid = subscription_id(subscribed)
            self._by_id[sid] = (*self._by_id.get(sid, ()), topic_filter)
        self.sparkplug_filters: tuple[str, ...] = ()
        """The Sparkplug host's filters (``spBv1.0/<group>/#``, its STATE topic), subscribed
        as they are: never in a shared group."""
        self._sparkplug_ids: frozenset[int] = frozenset()
        self._sparkplug_counted: tuple[int, ...] = (0,) * len(_SPARKPLUG_COUNTERS)
        """The host's counts already turned into metrics (by the pump)."""
        if self.sparkplug is not None:
            self.sparkplug_filters = tuple(self.sparkplug.subscriptions())
            self.subscriptions += tuple((f, config.qos) for f in self.sparkplug_filters
                                        if f not in self.topic_filters or group is not None)
            self._sparkplug_ids = frozenset(subscription_id(f) for f in self.sparkplug_filters)
        self.tls = config.tls_settings
        self._matches: dict[tuple[str, tuple[int, ...] | None], tuple[_Binding, ...]] = {}
        self._throttles: dict[str, _Throttle] = {}
        self._link: _Link | None = None
        self._had_session = False
        """A persistent session was established by an earlier ``run`` of this source."""
        self._warned_config = False

    def subscribed_filter(self, topic_filter: str) -> str:
        """``topic_filter`` as subscribed: with ``$share/<group>/`` in a shared group."""
        group = self.config.shared_group
        return topic_filter if group is None else f"$share/{group}/{topic_filter}"

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def ready(self) -> bool:
        """Connected, and the broker has answered the subscriptions (SUBACK)."""
        return self._link is not None and self._link.subscribed

    async def run(self, emit: Emit) -> None:
        """Connect, subscribe and stream until cancelled; raise SourceUnavailable on loss."""
        if not self._warned_config:
            self._warned_config = True
            self._warn_config()
        link = _Link(self, asyncio.get_running_loop(), emit)
        self._link = link
        reason = "stopped"
        lost = False
        try:
            await link.open()
            await link.ended
        except asyncio.CancelledError:
            await link.quiesce(self.stop_ack_timeout_s)
            raise
        except BaseException as exc:
            reason, lost = str(exc), True
            raise
        finally:
            self._link = None
            await link.close()
            if link.connected:
                self._log.info("mqtt.disconnected", broker=self.where, reason=reason)
            # The paho thread is joined: the Sparkplug host is the loop's until the next link.
            await self._sparkplug_link_ended(emit, lost)

    def _warn_config(self) -> None:
        """Settings that work but deserve a line in the log, once per source."""
        cfg = self.config
        if self.tls is not None and self.tls.insecure_skip_verify:
            self._log.warning("mqtt.tls_insecure", broker=self.where,
                              hint="tls.insecure_skip_verify accepts any broker certificate: "
                                   "encrypted, but a man in the middle goes unnoticed")
        if any(qos == 2 for _, qos in self.subscriptions):
            self._log.warning("mqtt.qos2_not_durable", broker=self.where,
                              hint="with QoS 2 the broker hands a message over at PUBREC; the "
                                   "MQTT client keeps that state in memory only, so messages in "
                                   "flight when the gateway is killed are lost. QoS 1 is "
                                   "at-least-once across crashes")
        if self.sparkplug is not None and cfg.shared_group is not None:
            self._log.warning("mqtt.sparkplug_not_shared", broker=self.where,
                              topics=list(self.sparkplug_filters),
                              hint="a Sparkplug B host must see every message of an edge node "
                                   "(seq, births): its topics are subscribed without "
                                   "shared_group, so every gateway of the group reads them")
        if self.tls is None and cfg.port == 8883:
            self._log.warning("mqtt.plain_on_tls_port", broker=self.where,
                              hint="port 8883 is the MQTT-over-TLS port by convention, but tls "
                                   "is not set: the connection is plain TCP")

    # -- per message, on the paho thread ------------------------------------------------------

    def _match(self, topic: str, ids: tuple[int, ...] | None = None) -> tuple[_Binding, ...]:
        """The bindings a message on ``topic`` feeds. With MQTT 5 subscription identifiers
        (``ids``) only those of the subscriptions the copy was sent for: a broker sends one copy
        per matching subscription when filters overlap, and each must yield its signals once."""
        key = (topic, ids)
        found = self._matches.get(key)
        if found is None:
            if len(self._matches) >= MATCH_CACHE_SIZE:
                self._matches.clear()
            if ids is None:
                filters: Sequence[str] = self.topic_filters
            else:
                filters = list(dict.fromkeys(f for i in ids for f in self._by_id.get(i, ())))
            found = tuple(b for f in filters if topic_matches_sub(f, topic)
                          for b in self._by_filter[f])
            # Captures first: a mapping reading a capture sees the one of this message.
            found = tuple(sorted(found, key=lambda b: b.capture_level is None))
            self._matches[key] = found
        return found

    def _parse(self, msg: MQTTMessage, receive_time: float) -> _Parsed:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers refuse these; nothing can match one
            return _Parsed("", [], {}, matched=False)
        properties = getattr(msg, "properties", None)
        sids = (getattr(properties, "SubscriptionIdentifier", None) if properties is not None
                else None)
        size = len(msg.payload)
        if size > self.config.max_payload_bytes:
            bindings = self._match(topic, tuple(sids) if sids else None) if self._by_filter else ()
            where = (bindings[0].filter if bindings else
                     self._sparkplug_filter(topic) if self.sparkplug is not None else topic)
            return _Parsed(topic, [], {where: f"payload of {size} bytes exceeds "
                                              f"max_payload_bytes ({self.config.max_payload_bytes})"},
                           matched=True)
        parsed = self._parse_plain(msg, topic, tuple(sids) if sids else None, receive_time)
        host = self.sparkplug
        if host is not None and self._for_sparkplug(topic, sids):
            out = host.on_message(topic, bytes(msg.payload), receive_time)
            parsed.matched = True
            parsed.signals += out.signals
            if out.commands:
                parsed.commands = out.commands
            if out.malformed is not None:
                parsed.problems.setdefault(self._sparkplug_filter(topic), out.malformed)
            parsed.sparkplug = _sparkplug_counts(host)
        return parsed

    def _for_sparkplug(self, topic: str, sids: Sequence[int] | None) -> bool:
        """Whether a message is one for the Sparkplug host: by the subscription identifiers
        the broker sent with it (MQTT 5), else by its topic."""
        if sids:
            return any(i in self._sparkplug_ids for i in sids)
        return topic.startswith(SPARKPLUG_NAMESPACE) and any(
            topic_matches_sub(f, topic) for f in self.sparkplug_filters)

    def _sparkplug_filter(self, topic: str) -> str:
        """The Sparkplug filter a topic came through (for the malformed-payload counter)."""
        return next((f for f in self.sparkplug_filters if topic_matches_sub(f, topic)),
                    self.sparkplug_filters[0] if self.sparkplug_filters else topic)

    def _parse_plain(self, msg: MQTTMessage, topic: str, sids: tuple[int, ...] | None,
                     receive_time: float) -> _Parsed:
        """The signals of the plain (``mqtt``) addresses a message feeds."""
        bindings = self._match(topic, sids) if self._by_filter else ()
        body = _Body(msg.payload)
        signals: list[Signal] = []
        problems: dict[str, str] = {}
        levels: list[str] | None = None
        for b in bindings:
            if b.capture_level is not None:
                if levels is None:
                    levels = topic.split("/")
                value, error = levels[b.capture_level], None
            elif b.binary is not None:
                value, error = b.binary(body.raw)
            elif b.value_parts is None:
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
            quality, status = Quality.GOOD, None
            if b.quality_path is not None and b.quality_parts is not None:
                quality, status, error = body.quality(b.quality_path, b.quality_parts,
                                                      b.quality_codes)
                if error is not None:
                    problems.setdefault(b.filter, error)
                if quality is Quality.GOOD:
                    status = None
            if value is None:
                quality = Quality.BAD
            signals.append(Signal(
                connection=self.name, tag=b.tag, value=value, quality=quality, status=status,
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
        if parsed.sparkplug is not None:
            self._account_sparkplug(parsed)
        for topic_filter, reason in parsed.problems.items():
            self._metrics.inc("mqtt_malformed_payloads_total", connection=self.name,
                              topic=topic_filter)
            self._warn_malformed(topic_filter, parsed.topic, reason)

    def _account_sparkplug(self, parsed: _Parsed) -> None:
        counts = parsed.sparkplug
        if counts is None or counts == self._sparkplug_counted:
            return
        for (_, metric), now, before in zip(_SPARKPLUG_COUNTERS, counts,
                                            self._sparkplug_counted, strict=True):
            if now > before:
                self._metrics.inc(metric, now - before, connection=self.name)
        self._sparkplug_counted = counts
        for topic, _ in parsed.commands:
            if f"/{_NCMD}/" in topic:
                self._log.info("mqtt.sparkplug_rebirth_requested", message_topic=parsed.topic,
                               command_topic=topic)

    async def _sparkplug_link_ended(self, emit: Emit, lost: bool) -> None:
        """Between two connections, on the asyncio loop: the host forgets every session; when
        the connection was lost, the metrics it had born are emitted BAD (nothing to ack)."""
        if self.sparkplug is None:
            return
        signals = self.sparkplug.on_connection_lost(time.time())
        if signals and lost:
            self._metrics.inc("signals_received_total", len(signals), connection=self.name)
            with contextlib.suppress(Exception):  # the loss is what `run` reports
                await emit(Delivery(signals))

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
                              downgraded: list[tuple[str, int, int]]) -> None:
        for topic_filter, reason in refused:
            self._metrics.inc("mqtt_subscriptions_refused_total", connection=self.name)
            self._log.error("mqtt.subscription_refused", topic=topic_filter, reason=reason)
        for topic_filter, requested, granted in downgraded:
            self._log.warning("mqtt.subscription_downgraded", topic=topic_filter,
                              requested_qos=requested, granted_qos=granted)


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
        self._subscribe_mids: dict[int, list[tuple[str, int]]] = {}
        self._connack_seen = False
        """Set on the paho thread once the broker answered the CONNECT."""
        self._pending_subacks = 0
        """SUBSCRIBEs sent and not answered yet; ready when none is left."""
        self._open_started = False
        self._open_done = threading.Event()
        self._disconnected = threading.Event()
        """Set by paho once the socket is closed, after what was queued (acks, DISCONNECT)."""
        self._state_offline: tuple[str, bytes] | None = None
        """Sparkplug: the host's offline STATE of this connection (the will, and what a clean
        stop publishes); None without ``sparkplug_host_id``."""
        self.client = self._new_client()

    def _new_client(self) -> Client:
        cfg = self.source.config
        v5 = cfg.protocol_version == "5"
        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.source.client_id,
            protocol=MQTTv5 if v5 else MQTTv311,
            clean_session=None if v5 else (cfg.session == "clean"), manual_ack=True,
            reconnect_on_failure=False,
        )
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        self._socket_errors = _LastError(f"mqtt.{self.source.name}")
        client.enable_logger(self._socket_errors)
        host = self.source.sparkplug
        if host is not None and host.host_id is not None:
            # Before the paho thread exists: the host is still the asyncio loop's.
            self._state_offline = host.state_message(False)
            topic, payload = self._state_offline
            client.will_set(topic, payload, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    # -- asyncio side -------------------------------------------------------------------------

    async def open(self) -> None:
        src = self.source
        if src.tls is not None:
            self.client.tls_set_context(tls_context(src.name, src.tls))
        self._pump = asyncio.create_task(self._run_pump(), name=f"mqtt-{src.name}-pump")
        self._open_started = True
        try:
            await asyncio.shield(_quiet(self.loop.run_in_executor(None, self._connect_blocking)))
        except ssl.SSLError as exc:
            raise SourceUnavailable(tls_failure(src, exc)) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if src.tls is None:
                raise SourceUnavailable(
                    f"Cannot reach MQTT broker {src.name} at {src.where}: "
                    f"{exc.strerror or exc}") from exc
            raise SourceUnavailable(tls_failure(src, exc)) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise SourceUnavailable(
                f"Cannot reach MQTT broker {src.name} at {src.where}: {reason}") from exc
        try:
            session_present = await asyncio.wait_for(asyncio.shield(self.connack), CONNACK_TIMEOUT_S)
        except TimeoutError:
            raise SourceUnavailable(
                f"MQTT broker {src.name} at {src.where} did not answer the CONNECT within "
                f"{CONNACK_TIMEOUT_S:g} s{_plain_hint(src)}") from None
        self.connected = True
        cfg = src.config
        src._log.info("mqtt.connected", broker=src.where, client_id=src.client_id,
                      protocol_version=cfg.protocol_version, tls=src.tls is not None,
                      session=cfg.session, session_present=session_present,
                      topics=len(src.subscriptions))
        if cfg.session == "persistent":
            if src._had_session and not session_present:
                src._metrics.inc("mqtt_sessions_lost_total", connection=src.name)
                src._log.warning(
                    "mqtt.session_lost", broker=src.where, client_id=src.client_id,
                    hint="the broker had no session for this client id: messages published "
                         "while the gateway was away are lost (session expired, see "
                         "session_expiry_s; broker restarted without persistence; or another "
                         "client used the same client id)")
            src._had_session = True

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
            if cfg.protocol_version == "5":
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                clean = cfg.session == "clean"
                if not clean:
                    properties.SessionExpiryInterval = cfg.session_expiry_s
                self.client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=clean,
                                    properties=properties)
            else:
                self.client.connect(cfg.host, cfg.port, cfg.keepalive_s)
            self.client.loop_start()
        finally:
            self._open_done.set()

    def _close_blocking(self) -> None:
        if self._open_started:
            self._open_done.wait()
        if (self._state_offline is not None and self.connected and self._closing
                and not self._disconnected.is_set() and self.client.is_connected()):
            # A clean stop: the broker does not publish the will, so say offline ourselves.
            topic, payload = self._state_offline
            info = self.client.publish(topic, payload, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(DISCONNECT_FLUSH_S)
        self.client.disconnect()
        if self.connected:  # let the network thread write the queued PUBACKs and DISCONNECT;
            self._disconnected.wait(DISCONNECT_FLUSH_S)  # loop_stop would drop them
        self.client.loop_stop()

    # -- paho callbacks, on the paho thread ---------------------------------------------------

    def _on_connect(self, client: Client, _userdata: Any, flags: ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        src = self.source
        self._connack_seen = True
        if reason_code.is_failure:
            self._fail(SourceUnavailable(
                f"MQTT broker {src.name} at {src.where} refused the connection: "
                f"{_reason(reason_code, properties)}{_refusal_hint(src, str(reason_code))}"))
            return
        wanted = list(src.subscriptions)
        # MQTT 5: one SUBSCRIBE per filter, each with its subscription identifier, so that the
        # copies a broker sends for overlapping filters can be told apart (see _match).
        use_ids = src.config.protocol_version == "5" and getattr(
            properties, "SubscriptionIdentifierAvailable", 1) != 0
        batches = [[w] for w in wanted] if use_ids else [wanted]
        self._pending_subacks = len(batches)
        for batch in batches:
            options: Properties | None = None
            if use_ids:
                options = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                options.SubscriptionIdentifier = subscription_id(batch[0][0])
            _, mid = client.subscribe(batch, properties=options)
            if mid is not None:
                self._subscribe_mids[mid] = batch
        host = src.sparkplug
        if host is not None and host.host_id is not None:
            # After the SUBSCRIBEs (Sparkplug 3.0: subscribe, then say online), same timestamp
            # as the will.
            self._publish([host.state_message(True)])
        self._call(self._resolve, self.connack, flags.session_present)

    def _on_subscribe(self, _client: Client, _userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], _properties: Properties | None) -> None:
        wanted = self._subscribe_mids.pop(mid, [])
        answers = list(zip(wanted, reason_codes, strict=False))
        refused = [(f, str(rc)) for (f, _), rc in answers if rc.is_failure]
        downgraded = [(f, qos, rc.value) for (f, qos), rc in answers
                      if not rc.is_failure and rc.value < qos]
        self._call(self._on_suback, refused, downgraded)

    def _on_suback(self, refused: list[tuple[str, str]],
                   downgraded: list[tuple[str, int, int]]) -> None:
        """On the asyncio loop: report refusals, then count as ready."""
        self.source._report_subscriptions(refused, downgraded)
        self._pending_subacks -= 1
        if not self._closing and self._pending_subacks <= 0:
            self.subscribed = True

    def _on_message(self, _client: Client, _userdata: Any, msg: MQTTMessage) -> None:
        try:
            parsed = self.source._parse(msg, time.time())
        except Exception:  # noqa: BLE001 - a bug must neither kill the paho thread nor wedge the message
            self.source._log.exception("mqtt.parse_failed", message_topic=_topic_text(msg))
            parsed = _Parsed(_topic_text(msg), [], {}, matched=True)
        if parsed.commands and not self._closing:  # stopping: our own offline STATE comes
            self._publish(parsed.commands)           # back, and is no takeover to answer
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

    def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        """On the paho thread: publish what the Sparkplug host asks for (a rebirth request,
        its STATE); QoS and retain per :func:`~gateway.sources.sparkplug.publish_options`."""
        for topic, payload in messages:
            qos, retain = publish_options(topic)
            self.client.publish(topic, payload, qos=qos, retain=retain)

    def _on_disconnect(self, _client: Client, _userdata: Any, _flags: DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self.subscribed = False
        self._disconnected.set()
        if self._closing:
            return
        reason = _reason(reason_code, properties)
        src = self.source
        error = self._socket_errors.last
        unexplained = str(reason_code) in ("Unspecified error", "Success")
        if isinstance(error, ssl.SSLError) and unexplained:
            # e.g. TLS 1.3: the broker rejects the client certificate after the handshake
            self._fail(SourceUnavailable(tls_failure(src, error)))
            return
        if unexplained:
            reason = "connection lost" if error is None else f"connection lost ({error})"
        if not self._connack_seen:
            self._fail(SourceUnavailable(
                f"MQTT broker {src.name} at {src.where} closed the connection before answering "
                f"the CONNECT: {reason}{_plain_hint(src)}"))
            return
        self._fail(SourceUnavailable(
            f"Lost connection to MQTT broker {src.name} at {src.where}: {reason}"))


class _LastError(logging.Logger):
    """paho's logger of one link: keeps the exception of the latest socket error (paho logs
    it, then reports only "connection lost"), drops everything else. Below ERROR, paho's
    per-message debug lines cost one level check."""

    def __init__(self, name: str) -> None:
        super().__init__(name, logging.ERROR)
        self.last: BaseException | None = None

    def log(self, level: int, msg: object, *args: object, **_kwargs: Any) -> None:
        if level >= logging.ERROR:
            self.last = next((a for a in args if isinstance(a, BaseException)), self.last)


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


def subscription_id(subscribed_filter: str) -> int:
    """The MQTT 5 subscription identifier of a filter: derived from the filter itself, so that
    it is the same on every run (messages queued in a persistent session carry the identifier
    of the subscription they were queued for)."""
    digest = hashlib.blake2b(subscribed_filter.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % SUBSCRIPTION_ID_MAX + 1


def _reason(reason_code: ReasonCode, properties: Properties | None) -> str:
    """A reason code's name, with the broker's reason string (MQTT 5) when it sent one."""
    text = str(reason_code)
    extra = getattr(properties, "ReasonString", None) if properties is not None else None
    return f"{text} ({extra})" if extra else text


_REFUSAL_HINTS: dict[str, str] = {
    "Unsupported protocol version": "the broker does not speak MQTT 5: set "
                                    "protocol_version: 3.1.1 on the connection",
    "Client identifier not valid": "the broker does not accept the client id {client_id!r}: "
                                   "set client_id on the connection",
    "Bad user name or password": "check username and the password "
                                 "(DIGISPINE_CONNECTIONS__{upper}__PASSWORD)",
    "Not authorized": "check username and the password "
                      "(DIGISPINE_CONNECTIONS__{upper}__PASSWORD), or the broker's access rules "
                      "for this user or client certificate",
    "Server unavailable": "the broker is up but not accepting clients; it is retried",
    "Server busy": "the broker is up but not accepting clients; it is retried",
    "Banned": "the broker has banned this client",
    "Bad authentication method": "the broker wants an authentication method this gateway "
                                 "does not offer; use username and password or a client "
                                 "certificate",
}


def _refusal_hint(src: MqttSource, reason: str) -> str:
    hint = _REFUSAL_HINTS.get(reason)
    if hint is None or (reason == "Unsupported protocol version"
                        and src.config.protocol_version != "5"):
        return ""
    return "; " + hint.format(client_id=src.client_id, upper=src.name.upper())


def _plain_hint(src: MqttSource) -> str:
    """For a broker that closed or ignored a plain CONNECT: perhaps the port wants TLS."""
    if src.tls is None:
        return " (if this port expects TLS, set tls on the connection)"
    return ""


class _TlsContext(ssl.SSLContext):
    """An SSLContext that checks (and sends as SNI) ``server_name`` instead of the host paho
    connects to, when one is set."""

    server_name: str | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name or server_hostname, session=session)


def tls_context(name: str, tls: MqttTlsConfig) -> ssl.SSLContext:
    """The client TLS context of connection ``name``; raises SourceUnavailable naming the file
    that cannot be used (missing, unreadable, not PEM, key not matching, wrong password)."""
    ctx = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.server_name = tls.server_name
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3"
                           else ssl.TLSVersion.TLSv1_2)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif tls.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
        except (OSError, ValueError) as exc:
            raise SourceUnavailable(
                f"TLS settings of MQTT connection {name} are unusable: tls.ca_file "
                f"{str(tls.ca_file)!r} cannot be read as PEM CA certificates: "
                f"{_ssl_reason(exc)}") from None
    else:
        ctx.load_default_certs()
    if tls.cert_file is not None:
        secret = tls.key_password.get_secret_value() if tls.key_password is not None else ""
        try:
            # A callable, never None: OpenSSL would ask for the password on the terminal.
            ctx.load_cert_chain(str(tls.cert_file),
                                str(tls.key_file) if tls.key_file is not None else None,
                                password=lambda: secret)
        except (OSError, ValueError) as exc:
            files = " and ".join(f"{k} {str(v)!r}" for k, v in
                                 (("tls.cert_file", tls.cert_file), ("tls.key_file", tls.key_file))
                                 if v is not None)
            raise SourceUnavailable(
                f"TLS settings of MQTT connection {name} are unusable: {files}: "
                f"{_ssl_reason(exc)}; check that the key belongs to the certificate, both are "
                f"PEM, and tls.key_password if the key is encrypted") from None
    return ctx


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or exc.reason or exc)
    if isinstance(exc, ssl.SSLError) and "PEM lib" in str(exc):
        return "not PEM, or an encrypted key without the right tls.key_password"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        return reason.lower().replace("_", " ") if reason else str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE",
                       "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED")


def tls_failure(src: MqttSource, exc: OSError) -> str:
    """One line on a failed TLS handshake: what failed and what to check."""
    where = f"TLS handshake with MQTT broker {src.name} at {src.where} failed"
    tls = src.tls
    if not isinstance(exc, ssl.SSLError) or isinstance(exc, ssl.SSLEOFError):
        # The broker hung up without a TLS alert: mosquitto does that to a client without the
        # certificate it requires, and a plain listener to a TLS hello.
        check = ("does the broker trust the CA of tls.cert_file?"
                 if tls is not None and tls.cert_file is not None else
                 "does the broker require a client certificate (tls.cert_file, tls.key_file)?")
        return (f"{where}: the broker closed the connection during the handshake; {check} "
                f"does the port speak TLS (a plain MQTT listener? TLS is usually on 8883)?")
    if isinstance(exc, ssl.SSLCertVerificationError):
        name = (tls.server_name if tls is not None else None) or src.config.host
        return (f"{where}: the broker's certificate is not trusted ({_ssl_reason(exc)}); check "
                f"that tls.ca_file is the CA that issued it and that the certificate is valid "
                f"for {name!r} (tls.server_name)")
    reason = exc.reason or ""
    if any(alert in reason for alert in _CLIENT_CERT_ALERTS):
        has_cert = tls is not None and tls.cert_file is not None
        check = ("check that the broker trusts the CA of tls.cert_file" if has_cert
                 else "the broker requires a client certificate: set tls.cert_file and "
                      "tls.key_file")
        return f"{where}: the broker refused the gateway's certificate ({_ssl_reason(exc)}); {check}"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return (f"{where}: {_ssl_reason(exc)}; does the port speak TLS (a plain MQTT "
                f"listener? TLS is usually on 8883)?")
    if "VERSION" in reason or "PROTOCOL" in reason:
        return (f"{where}: {_ssl_reason(exc)}; the broker and tls.min_version "
                f"({tls.min_version if tls is not None else '1.2'}) share no TLS version")
    return f"{where}: {_ssl_reason(exc)}"
