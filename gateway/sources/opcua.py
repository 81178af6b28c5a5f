"""OPC UA source (asyncua): subscriptions and polled reads, addressed by namespace URI.

Connection settings (:class:`OpcUaConnectionConfig`) live in ``config/gateway.yaml`` under
``connections``; what to read (:class:`OpcUaAddress`) lives in the mapping files.

Addressing
    A signal names its variable by ``node`` (a node id whose namespace is a URI:
    ``nsu=urn:acme:machines;s=Machine1.State``, also ``;i=``, ``;g=``, ``;b=``; standard nodes
    without a namespace: ``i=2258``) or by ``path`` (browse names from the Objects folder:
    ``Objects/Machines/CNC-101/State``; a segment matches a browse name in any namespace unless
    qualified as ``<urn:acme:machines>:State``). Namespace *indexes* are the server's
    numbering of its NamespaceArray and may change when the server restarts or is
    reconfigured, so URIs are resolved against the NamespaceArray, and paths are browsed, at
    every (re)connect. A raw ``ns=<index>;...`` id is refused by ``validate`` unless the address
    sets ``allow_namespace_index: true``. The canonical form of the address is the Signal's
    ``tag`` (:attr:`OpcUaAddress.tag`).

Subscriptions and polling
    ``mode: subscribe`` (the default) creates one monitored item per address in the
    connection's one subscription (``publishing_interval_ms``), in calls of at most the
    server's MaxMonitoredItemsPerCall (capped by ``max_items_per_call``; a call the server
    still refuses as too large is retried in halves). Every Publish response that carries data
    changes becomes one :class:`~gateway.sources.base.Delivery` (``ack`` is None: OPC UA has
    no redelivery to defer). ``mode: poll`` reads the addresses of each ``poll_interval_ms``
    group cyclically, in reads of at most MaxNodesPerRead (capped by ``max_nodes_per_read``);
    each cycle is one Delivery; a cycle that overruns its interval skips the missed ticks and
    is counted in ``opcua_poll_overruns_total``. The publish callback and the poll tasks hand
    deliveries to ``run`` through a bounded queue (:attr:`OpcUaSource.handoff_window`): while
    the pipeline is behind, no new Publish request is sent (the server queues, up to each
    item's ``queue_size``) and polling waits. (A pipeline held up for longer than the
    subscription's lifetime, about ``session_timeout_s``, makes the server drop the
    subscription; the session then ends and is rebuilt.) What is still in that queue when the
    source is stopped is dropped: OPC UA has no redelivery.

Events and alarms
    An address with ``event_field`` reads a field of the events its node (a notifier: the
    Server object or a machine) reports, of ``event_type`` and its subtypes (default
    BaseEventType). The fields of one notifier and type share one monitored item whose
    EventFilter selects each once, plus ``Time``; every event becomes signals of one Delivery,
    stamped with the event's Time, ``EventId`` last (an ``on_change`` trigger on it fires once
    per event and sees that event's other fields). Counted in ``opcua_events_total``.

Quality, status and time
    A value's StatusCode gives its quality by its severity bits (good, uncertain, bad); the raw
    code is the Signal's ``status``. An item's queue overflowing on the server (the Overflow
    info bit) is counted in ``opcua_queue_overflows_total``. ``timestamp_source: source`` (the
    default) uses the SourceTimestamp as the signal's ``source_time`` (the server timestamp
    when the server gives none); ``server`` uses the ServerTimestamp.

Isolation of bad addresses
    An address that cannot be read (unknown namespace URI, a path with no such child, a node
    that does not exist, a node that is not a variable, a filter the server refuses) does not
    stop the others: its signal is emitted once per connect with ``Quality.BAD`` and no value,
    and the reason is logged once (``opcua.address_unusable``, with a hint what to check).

Reconnect story
    One ``run`` is one session. An endpoint that cannot be reached, refuses the security or the
    user, or is lost later makes ``run`` raise :class:`~gateway.errors.SourceUnavailable` with one
    line naming the connection and what to check; asyncua's own reconnect is off: the daemon's
    supervisor owns the backoff (``reconnect_min_s`` .. ``reconnect_max_s``) and calls ``run``
    again, which connects, resolves namespaces and paths again and re-creates the subscription.
    A lost session is detected by the transport closing, by a failed probe of the server state
    every ``keepalive_s`` (asyncua's watchdog), by the subscription going quiet (no Publish
    response, not even a keep-alive, for three keep-alive periods plus ``request_timeout_s``),
    or by a failed poll. Before
    raising, ``run`` emits one Delivery marking every signal of the connection BAD
    (BadCommunicationError, no value) so quality triggers fire; it does so once per outage, not
    per failed retry. ``opcua.connected`` and ``opcua.connection_lost`` are logged once per
    transition; the gauge ``opcua_connected{connection}`` is 1 while the session is live.

Out-of-order values
    After a reconnect the server sends each item's current value, which may carry a source
    time older than the last one seen for that tag (a device whose clock was set back, a
    server restored from a backup, a value queued on another path). Such values are still
    emitted, with their own source time (the mapper takes the signal's time as the event
    time), and counted in ``opcua_out_of_order_total{connection}``; nothing is reordered or
    dropped. The last source time per tag is kept for the life of the source object (across
    reconnects, not across a gateway restart).

Security
    ``security_policy`` ``Basic256Sha256`` (default), ``Aes128_Sha256_RsaOaep`` or
    ``Aes256_Sha256_RsaPss`` with ``security_mode`` ``SignAndEncrypt`` (default) or ``Sign``.
    ``None`` needs ``allow_insecure: true`` and logs a warning. The PKI directory
    (``pki_dir``; relative to ``buffer.directory``) holds ``own/cert.der`` and
    ``own/private/key.pem``: generated once on first use (RSA 2048, ten years) and kept; the
    certificate's application URI is the gateway's (trust ``own/cert.der`` on the server). A
    server certificate is accepted when ``trusted/`` holds it or the certificate that issued it
    (``.der``, ``.pem``, ``.crt``); an unknown one is saved to ``rejected/`` and the connection
    fails with the file to move into ``trusted/``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import importlib
import logging
import math
import os
import re
import socket
import time
import uuid
import weakref
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ConfigDict as _ConfigDict
from pydantic import Field, SecretStr, field_validator, model_validator

from gateway import logs
from gateway.configbase import Strict, exactly_one_of
from gateway.errors import SourceUnavailable
from gateway.metrics import Metrics
from gateway.model import Quality, Signal, representable
from gateway.sources.base import Delivery, Emit

_T = TypeVar("_T")

SecurityPolicyName = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]


class OpcUaConnectionConfig(Strict):
    """An OPC UA server."""

    protocol: Literal["opcua"]
    endpoint: str = Field(pattern=r"^opc\.tcp://", examples=["opc.tcp://10.0.3.21:4840"])
    """Endpoint URL of the server."""
    security_policy: SecurityPolicyName = "Basic256Sha256"
    """Security policy of the secure channel. ``None`` (no signing, no encryption, any server
    accepted) needs ``allow_insecure: true``."""
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    """Message security mode with a security policy other than ``None``."""
    allow_insecure: bool = False
    """Allow ``security_policy: None``; a warning is logged when the source starts."""
    username: str | None = None
    """User name for user-token authentication (anonymous when absent)."""
    password: SecretStr | None = None
    """Password; from the environment or a credentials file."""
    user_certificate: Path | None = Field(default=None, examples=["user/operator.der"])
    """X.509 user token: the user's certificate (DER or PEM), relative to ``pki_dir``; needs
    ``user_private_key`` and a security policy other than ``None``. Not with ``username``."""
    user_private_key: Path | None = Field(default=None, examples=["user/operator.pem"])
    """The private key (PEM or DER) of ``user_certificate``, relative to ``pki_dir``."""
    user_private_key_password: SecretStr | None = None
    """Password of an encrypted ``user_private_key``; from the environment or a credentials
    file."""
    pki_dir: Path = Field(default=Path("pki"), examples=["pki", "/var/lib/digispine-gateway/pki"])
    """Certificate directory: ``own/`` (the gateway's certificate and key, generated once and
    kept), ``trusted/`` (server certificates, or their issuers, to accept) and ``rejected/``
    (unknown server certificates land here). Relative to ``buffer.directory``."""
    publishing_interval_ms: int = Field(default=1000, ge=10, le=3_600_000)
    """How often the server sends the data changes of the subscription."""
    timestamp_source: Literal["source", "server"] = "source"
    """Event time of a value: the device's SourceTimestamp (the ServerTimestamp when the server
    gives none) or the server's ServerTimestamp."""
    max_items_per_call: int = Field(default=1000, ge=1)
    """Most monitored items created per call; the server's MaxMonitoredItemsPerCall lowers it."""
    max_nodes_per_read: int = Field(default=1000, ge=1)
    """Most nodes per Read (polling) and per Browse (paths); the server's MaxNodesPerRead and
    MaxNodesPerBrowse lower it."""
    request_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """How long to wait for the server's answer to one request (connecting included)."""
    session_timeout_s: float = Field(default=60.0, ge=1, le=3600)
    """Requested session timeout: how long the server keeps the session (and its subscription)
    when the gateway goes silent."""
    keepalive_s: float = Field(default=5.0, gt=0, le=600)
    """How often the session is probed (a read of the server state), and the keep-alive period
    of the subscription; a server silent for longer counts as lost."""
    reconnect_min_s: float = Field(default=1.0, gt=0)
    """First reconnect delay after a lost connection; doubles up to ``reconnect_max_s``."""
    reconnect_max_s: float = Field(default=60.0, gt=0)
    """Longest reconnect delay."""

    @model_validator(mode="after")
    def _insecure_needs_consent(self) -> OpcUaConnectionConfig:
        if self.security_policy == "None" and not self.allow_insecure:
            raise ValueError(
                "security_policy None sends everything (the password too) in clear text and "
                "accepts any server; set allow_insecure: true to allow it, or use Basic256Sha256"
            )
        if (self.user_certificate is None) != (self.user_private_key is None):
            raise ValueError("an X.509 user token needs both user_certificate and "
                             "user_private_key")
        if self.user_certificate is not None:
            if self.username is not None:
                raise ValueError("a session has one user token: username/password or "
                                 "user_certificate, not both")
            if self.security_policy == "None":
                raise ValueError("an X.509 user token signs with the secure channel's policy: "
                                 "it needs a security_policy other than None")
        return self

    @property
    def user(self) -> str | None:
        """Who the session authenticates as, for messages: ``user 'name'``, ``the user
        certificate <file>`` or None (anonymous)."""
        if self.username is not None:
            return f"user '{self.username}'"
        if self.user_certificate is not None:
            return f"the user certificate {self.user_certificate}"
        return None


# --- addresses --------------------------------------------------------------------------------

STANDARD_NAMESPACE = "http://opcfoundation.org/UA/"
"""Namespace index 0 in every server."""
_NODE_ID = re.compile(r"(?:nsu=(?P<uri>[^;]*);|ns=(?P<ns>[0-9]+);)?(?P<kind>[isgb])=(?P<ident>.*)",
                      re.DOTALL)


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A parsed ``node``: identifier kind and text, and the namespace by URI or by index."""

    kind: Literal["i", "s", "g", "b"]
    identifier: str
    namespace_uri: str | None
    namespace_index: int | None

    @property
    def canonical(self) -> str:
        if self.namespace_uri is not None:
            return f"nsu={self.namespace_uri};{self.kind}={self.identifier}"
        if self.namespace_index:
            return f"ns={self.namespace_index};{self.kind}={self.identifier}"
        return f"{self.kind}={self.identifier}"

    @property
    def fragile(self) -> bool:
        """Whether it names its namespace by a server-assigned index (other than 0)."""
        return self.namespace_uri is None and bool(self.namespace_index)


def parse_node_id(text: str) -> NodeRef:
    """Parse ``nsu=<uri>;s=...``, ``ns=<index>;i=...``, ``i=2258``...; ValueError says why not."""
    match = _NODE_ID.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a node id; expected nsu=<namespace URI>;<i|s|g|b>=<identifier>, "
            f"e.g. nsu=urn:acme:machines;s=Machine1.State"
        )
    uri, ns, kind, ident = match["uri"], match["ns"], match["kind"], match["ident"]
    if uri is not None and not uri:
        raise ValueError("nsu= needs a namespace URI, e.g. nsu=urn:acme:machines;s=Machine1.State")
    index = int(ns) if ns is not None else 0
    if index > 65535:
        raise ValueError(f"namespace index {index} is out of range (0..65535)")
    if uri == STANDARD_NAMESPACE:
        uri, index = None, 0
    if kind == "i":
        if not ident.isascii() or not ident.isdigit() or int(ident) > 0xFFFFFFFF:
            raise ValueError(f"i= takes a whole number 0..4294967295, got {ident!r}")
        ident = str(int(ident))
    elif kind == "s":
        if not ident:
            raise ValueError("s= needs a string identifier")
    elif kind == "g":
        try:
            ident = str(uuid.UUID(ident))
        except ValueError:
            raise ValueError(f"g= takes a GUID such as 72962b91-fa75-4ae6-8d28-b404dc7daf63, "
                             f"got {ident!r}") from None
    else:
        try:
            base64.b64decode(ident, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"b= takes base64 text, got {ident!r}") from None
        if not ident:
            raise ValueError("b= needs a base64 identifier")
    return NodeRef(kind, ident, uri, None if uri is not None else index)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class PathSegment:
    """One browse name of a path, optionally qualified by its namespace URI."""

    name: str
    namespace_uri: str | None = None

    def __str__(self) -> str:
        return self.name if self.namespace_uri is None else f"<{self.namespace_uri}>:{self.name}"


PATH_ROOT = "Objects"


def parse_browse_path(text: str) -> tuple[PathSegment, ...]:
    """Parse ``Objects/Machines/<urn:x>:CNC-101/State``; ValueError says why not."""
    if not text.startswith(PATH_ROOT + "/"):
        raise ValueError(
            f"a browse path starts at the Objects folder, e.g. Objects/Machines/CNC-101/State; "
            f"got {text!r}"
        )
    rest = text[len(PATH_ROOT) + 1:]
    segments: list[PathSegment] = []
    i = 0
    while True:
        uri = None
        if rest.startswith("<", i):
            end = rest.find(">:", i)
            if end < 0:
                raise ValueError("a qualified segment is <namespace URI>:Name, "
                                 "e.g. Objects/<urn:acme:machines>:CNC-101/State")
            uri = rest[i + 1:end]
            if not uri:
                raise ValueError("<>: needs a namespace URI between the brackets")
            i = end + 2
        j = rest.find("/", i)
        name = rest[i:] if j < 0 else rest[i:j]
        if not name:
            raise ValueError(f"empty segment in browse path {text!r} (a doubled or trailing /)")
        segments.append(PathSegment(name, uri))
        if j < 0:
            return tuple(segments)
        i = j + 1


def parse_field_path(text: str) -> tuple[PathSegment, ...]:
    """Parse an event field's browse path, ``Message`` or ``ActiveState/Id`` (segments may be
    qualified as in :func:`parse_browse_path`); ValueError says why not."""
    try:
        return parse_browse_path(f"{PATH_ROOT}/{text}")
    except ValueError as exc:
        raise ValueError(f"event_field: {exc}".replace(f"{PATH_ROOT}/", "")) from None


class OpcUaDeadband(Strict):
    """A server-side deadband: changes smaller than this are not reported."""

    model_config = _ConfigDict(json_schema_extra=exactly_one_of(("absolute", "percent")))

    absolute: float | None = Field(default=None, gt=0, allow_inf_nan=False, examples=[0.5])
    """Report a change only when it exceeds this amount, in the variable's unit."""
    percent: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False, examples=[1.0])
    """Report a change only when it exceeds this percentage of the variable's EURange (the
    server needs an EURange property on the variable; without one it refuses the item, and
    the signal is reported BAD)."""

    @model_validator(mode="after")
    def _one(self) -> OpcUaDeadband:
        if (self.absolute is None) == (self.percent is None):
            raise ValueError("a deadband has exactly one of absolute or percent")
        return self


SUBSCRIPTION_ONLY = ("sampling_interval_ms", "queue_size", "discard_oldest", "deadband", "trigger")
"""The keys that apply to ``mode: subscribe`` only."""
EVENT_UNUSED = ("sampling_interval_ms", "deadband", "trigger", "poll_interval_ms")
"""The keys that have no meaning for an event field."""
BASE_EVENT_TYPE = "i=2041"
EVENT_QUEUE_SIZE = 1000
"""The queue size of an event monitored item when no signal of it sets ``queue_size``."""


class OpcUaAddress(Strict):
    """Which OPC UA variable a signal reads, and how."""

    model_config = _ConfigDict(json_schema_extra=exactly_one_of(("node", "path")))

    node: str | None = Field(
        default=None,
        examples=["nsu=urn:acme:machines;s=Machine1.State", "nsu=urn:acme:machines;i=6012",
                  "i=2258"])
    """Node id with its namespace as a URI: ``nsu=<uri>;i=<number>``, ``;s=<string>``,
    ``;g=<guid>`` or ``;b=<base64>``; standard nodes without namespace (``i=2258``). The URI is
    resolved against the server's NamespaceArray at every connect. ``ns=<index>;...`` needs
    ``allow_namespace_index: true``."""
    path: str | None = Field(default=None, examples=["Objects/Machines/CNC-101/State"])
    """Browse path from the Objects folder, ``/``-separated browse names. A name matches in any
    namespace unless qualified as ``<namespace URI>:Name``. Browsed at every connect."""
    allow_namespace_index: bool = False
    """Accept a ``node`` with a raw namespace index (``ns=2;s=...``). Indexes are numbered by the
    server and can change when it restarts or its configuration changes; prefer ``nsu=``."""
    mode: Literal["subscribe", "poll"] = "subscribe"
    """``subscribe``: the server reports changes (monitored item); ``poll``: the gateway reads
    the value every ``poll_interval_ms``."""
    sampling_interval_ms: float | None = Field(default=None, ge=0, examples=[100, 500])
    """How often the server samples the value (subscribe); default: the connection's
    publishing interval; 0: as fast as the server can."""
    queue_size: int = Field(default=1, ge=1, le=100_000)
    """Values the server keeps for this item between two publishes (subscribe); more than one
    keeps every change of a fast value."""
    discard_oldest: bool = True
    """When the item's queue is full, drop the oldest value (else the newest); either way the
    overflow is counted (subscribe)."""
    deadband: OpcUaDeadband | None = None
    """Server-side deadband (subscribe; numeric variables)."""
    trigger: Literal["status", "status_value", "status_value_timestamp"] = "status_value"
    """Which change is reported (subscribe): of the status only, of status or value, or also of
    the source timestamp alone."""
    poll_interval_ms: int | None = Field(default=None, ge=10, examples=[1000])
    """Read period with ``mode: poll`` (required there)."""
    event_field: str | None = Field(default=None,
                                    examples=["Message", "Severity", "ActiveState/Id", "EventId"])
    """Read a field of the OPC UA *events* that ``node``/``path`` (an Object whose
    EventNotifier allows subscribing, e.g. the Server object ``i=2253`` or a machine) reports,
    instead of a variable's value: the field's browse path relative to the event type
    (``Message``, ``Severity``, ``SourceName``, ``ActiveState/Id``; a name outside the standard
    namespace as ``<namespace URI>:Name``). Each event delivers all selected fields of the
    same node and type together; ``EventId`` last, so an ``on_change`` trigger on an
    ``EventId`` signal fires once per event and its data fields see that event's other
    fields. A field the event does not carry is not delivered."""
    event_type: str | None = Field(default=None,
                                   examples=["i=2915", "nsu=urn:acme:machines;i=1002"])
    """With ``event_field``: only events of this type (a node id, ``nsu=`` form; ``i=2915`` is
    AlarmConditionType) or its subtypes, and the type whose fields ``event_field`` names.
    Default: BaseEventType (``i=2041``), every event."""

    @field_validator("node")
    @classmethod
    def _valid_node(cls, node: str | None) -> str | None:
        if node is not None:
            parse_node_id(node)
        return node

    @field_validator("path")
    @classmethod
    def _valid_path(cls, path: str | None) -> str | None:
        if path is not None:
            parse_browse_path(path)
        return path

    @field_validator("event_field")
    @classmethod
    def _valid_field(cls, field: str | None) -> str | None:
        if field is not None:
            parse_field_path(field)
        return field

    @field_validator("event_type")
    @classmethod
    def _valid_event_type(cls, event_type: str | None) -> str | None:
        if event_type is not None:
            parse_node_id(event_type)
        return event_type

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaAddress:
        if (self.node is None) == (self.path is None):
            raise ValueError("an opcua address has exactly one of node (a node id) or path "
                             "(a browse path from Objects)")
        if self.event_field is not None:
            if self.mode == "poll":
                raise ValueError("events are subscribed, never polled: event_field needs "
                                 "mode: subscribe")
            misplaced = [key for key in EVENT_UNUSED if key in self.model_fields_set]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} apply to variable values, not to "
                                 f"event fields")
        elif self.event_type is not None:
            raise ValueError("event_type needs event_field (which field of the events to read)")
        if self.mode == "poll":
            if self.poll_interval_ms is None:
                raise ValueError("mode: poll needs poll_interval_ms")
            misplaced = [key for key in SUBSCRIPTION_ONLY if key in self.model_fields_set]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} apply to mode: subscribe only")
        elif self.poll_interval_ms is not None:
            raise ValueError("poll_interval_ms applies to mode: poll only")
        if self.deadband is not None and self.trigger == "status":
            raise ValueError("a deadband filters value changes; trigger: status reports status "
                             "changes only")
        return self

    @property
    def node_ref(self) -> NodeRef | None:
        """The parsed ``node`` (None for a path address)."""
        return parse_node_id(self.node) if self.node is not None else None

    @property
    def segments(self) -> tuple[PathSegment, ...] | None:
        """The parsed ``path`` (None for a node address)."""
        return parse_browse_path(self.path) if self.path is not None else None

    @property
    def event_type_ref(self) -> NodeRef:
        """The parsed ``event_type`` (BaseEventType when not given)."""
        return parse_node_id(self.event_type or BASE_EVENT_TYPE)

    @property
    def notifier_tag(self) -> str:
        """The canonical node or path alone: ``nsu=<uri>;s=...`` (``i=2258``, ``ns=2;s=...``)
        or ``Objects/<seg>/<seg>``."""
        ref = self.node_ref
        if ref is not None:
            return ref.canonical
        return "/".join([PATH_ROOT, *(str(s) for s in self.segments or ())])

    @property
    def tag(self) -> str:
        """The canonical address: the node or path (:attr:`notifier_tag`); for an event field
        followed by ``#event:<field>`` (``#event(<type>):<field>`` with an ``event_type``)."""
        base = self.notifier_tag
        if self.event_field is None:
            return base
        field = "/".join(str(s) for s in parse_field_path(self.event_field))
        if self.event_type is None:
            return f"{base}#event:{field}"
        return f"{base}#event({self.event_type_ref.canonical}):{field}"


# --- status codes -----------------------------------------------------------------------------

_SEVERITY = (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD, Quality.BAD)
_INFO_TYPE_MASK = 0x00000C00
_INFO_TYPE_DATAVALUE = 0x00000400
_OVERFLOW = 0x00000080
BAD_COMMUNICATION_ERROR = 0x80050000
"""The status of the signals marked BAD when the connection is lost."""
BAD_NODE_ID_UNKNOWN = 0x80340000


def quality_of(code: int) -> Quality:
    """The quality of a StatusCode, by its two severity bits."""
    return _SEVERITY[(code >> 30) & 0x3]


def overflowed(code: int) -> bool:
    """Whether the Overflow info bit is set (valid only with InfoType DataValue)."""
    return (code & _INFO_TYPE_MASK) == _INFO_TYPE_DATAVALUE and bool(code & _OVERFLOW)


def status_name(code: int) -> str:
    """``BadNodeIdUnknown`` (info bits ignored), or the hex code when asyncua does not know it."""
    names = _mod("asyncua.ua.status_codes").code_to_name_doc
    known = names.get(code & 0xFFFF0000)
    return str(known[0]) if known else f"0x{code:08X}"


_HINTS: dict[str, str] = {
    "BadNodeIdUnknown": "the server has no such node (check the identifier and namespace URI; "
                        "the server's address space may have changed)",
    "BadNodeIdInvalid": "the server calls this node id invalid (check its syntax and type)",
    "BadAttributeIdInvalid": "the node has no value: it is not a Variable (address a Variable, "
                             "e.g. a child of this object)",
    "BadNotReadable": "the variable is not readable (check its access level)",
    "BadUserAccessDenied": "this user may not read it (check the user's rights on the server)",
    "BadMonitoredItemFilterUnsupported": "the server refuses the deadband filter (a percent "
                                         "deadband needs an EURange property on the variable)",
    "BadFilterNotAllowed": "the server refuses a filter on this variable (a percent deadband "
                           "needs an EURange property on the variable; deadbands need numbers)",
    "BadDeadbandFilterInvalid": "the server refuses the deadband (a percent deadband needs an "
                                "EURange property on the variable; deadbands need numbers)",
    "BadTooManyMonitoredItems": "the server's limit of monitored items is reached",
}


def _hint(code: int) -> str:
    name = status_name(code)
    return f"{name}: {_HINTS[name]}" if name in _HINTS else name


# --- values -----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """An asyncua value as JSON-friendly Python: texts, numbers, booleans, lists, ISO times."""
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, Enum):
            return value.value
        return value
    if isinstance(value, datetime):
        stamp = _unix(value)
        return datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z") if stamp else None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    text = getattr(value, "Text", None)  # LocalizedText
    if isinstance(text, str) or (text is None and hasattr(value, "Locale")):
        return text
    name = getattr(value, "Name", None)  # QualifiedName
    if isinstance(name, str) and hasattr(value, "NamespaceIndex"):
        return name
    to_string = getattr(value, "to_string", None)  # NodeId
    if callable(to_string):
        return str(to_string())
    return str(value)


def _event_value(raw: Any, namespaces: Sequence[str]) -> Any:
    """An event field's value: node ids (EventType, SourceNode) with their namespace URI, the
    rest as :func:`_plain`."""
    index = getattr(raw, "NamespaceIndex", None)
    identifier = getattr(raw, "Identifier", None)
    if isinstance(index, int) and identifier is not None and hasattr(raw, "NodeIdType"):
        text = str(raw.to_string())
        if 0 < index < len(namespaces):
            return f"nsu={namespaces[index]};" + text.split(";", 1)[1]
        return text
    return _plain(raw)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _unix(stamp: datetime | None) -> float | None:
    if stamp is None:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    try:
        ts = stamp.timestamp()
    except (OverflowError, ValueError, OSError):
        return None
    return ts if ts > 0 and representable(ts) else None


# --- the source -------------------------------------------------------------------------------

_CONNECTED: weakref.WeakKeyDictionary[Metrics, dict[str, bool]] = weakref.WeakKeyDictionary()
"""Per Metrics: OPC UA connection name -> whether it has a live session (the gauge's data)."""

_PKI_LOCKS: dict[Path, asyncio.Lock] = {}


@dataclass(slots=True)
class _Item:
    """One address, and what the current session made of it."""

    address: OpcUaAddress
    tag: str
    handle: int
    node_id: Any = None
    """The resolved ``ua.NodeId`` of this session (None: unusable, see ``problem``); of the
    notifier for an event field."""
    problem: str | None = None
    event: tuple[Any, tuple[Any, ...]] | None = None
    """An event field's resolved event type ``ua.NodeId`` and field path (QualifiedNames)."""


@dataclass(slots=True)
class _EventGroup:
    """The event fields of one notifier and event type: one monitored item with an
    EventFilter selecting each field once (and the event's Time)."""

    handle: int
    items: list[_Item]
    """Delivery order: the ``EventId`` items last."""
    fields: list[tuple[Any, ...]]
    """The select clauses' browse paths (QualifiedNames), Time first."""
    slots: list[int]
    """Per item: the index of its field in ``fields``."""
    namespaces: list[str]


@dataclass(slots=True)
class _Limits:
    items_per_call: int
    nodes_per_read: int
    nodes_per_browse: int


class OpcUaSource:
    """Reads its addresses from one OPC UA server; see the module docstring."""

    handoff_window: int = 64
    """Deliveries made by the publish callback and the poll tasks that ``run`` has not passed
    to ``emit`` yet; while that many wait, no Publish request is sent and polling waits."""

    def __init__(self, name: str, config: OpcUaConnectionConfig, addresses: Sequence[OpcUaAddress],
                 metrics: Metrics, *, pki_dir: Path | None = None,
                 application_uri: str | None = None) -> None:
        if not addresses:
            raise ValueError(f"OPC UA connection {name} has no address to read")
        self.name = name
        self.config = config
        self.pki_dir = pki_dir if pki_dir is not None else config.pki_dir
        self.application_uri = application_uri or f"urn:digispine:edge-gateway:{name}"
        by_tag: dict[str, OpcUaAddress] = {}
        for address in addresses:
            by_tag.setdefault(address.tag, address)
        self.items = [_Item(a, tag, i + 1) for i, (tag, a) in enumerate(by_tag.items())]
        self._metrics = metrics
        self._log = logs.get("opcua", source=name)
        self._reported: set[tuple[str, str]] = set()
        """(tag, reason) already logged as unusable: each is logged once per source."""
        self._last_time: dict[str, float] = {}
        self._marked_bad = False
        self._warned_insecure = False
        states = _CONNECTED.setdefault(metrics, {})
        states.setdefault(name, False)
        self._states = states
        metrics.gauge("opcua_connected", lambda: float(states.get(name, False)),
                      "1 while the OPC UA connection has a live session", connection=name)
        metrics.describe("opcua_queue_overflows_total",
                         "Values the server dropped because an item's queue overflowed")
        metrics.describe("opcua_out_of_order_total",
                         "Values whose source time is older than the last one of their tag")
        metrics.describe("opcua_unusable_addresses_total",
                         "Addresses found unusable at a connect (reported BAD), per connect")
        metrics.describe("opcua_events_total", "OPC UA events received (alarms, messages)")
        metrics.describe("opcua_malformed_events_total",
                         "OPC UA events dropped: the server sent fewer fields than selected")
        metrics.describe("opcua_poll_overruns_total",
                         "Poll ticks skipped because a poll cycle outlasted its interval")
        _quiet_asyncua()

    @property
    def where(self) -> str:
        return self.config.endpoint

    @property
    def connected(self) -> bool:
        """Whether a session is up and the addresses are subscribed or polled."""
        return self._states.get(self.name, False)

    async def run(self, emit: Emit) -> None:
        """Connect, subscribe and poll, and stream deliveries into ``emit`` until cancelled."""
        session = _Session(self, emit)
        try:
            await session.open()
            self._set_connected(True)
            await session.stream()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await session.wind_down()
            if not self._marked_bad:
                await emit(Delivery(self._all_bad()))
                self._marked_bad = True
            if isinstance(exc, SourceUnavailable) and self.connected:
                self._log.info("opcua.connection_lost", endpoint=self.where, error=str(exc))
            raise
        finally:
            self._set_connected(False)
            await session.close()

    # -- helpers used by the session ---------------------------------------------------------

    def _set_connected(self, up: bool) -> None:
        if up:
            self._marked_bad = False
        self._states[self.name] = up

    def _all_bad(self) -> list[Signal]:
        now = time.time()
        return [Signal(self.name, item.tag, None, Quality.BAD, BAD_COMMUNICATION_ERROR,
                       receive_time=now) for item in self.items]

    def _signal(self, item: _Item, dv: Any, now: float) -> Signal:
        status = dv.StatusCode
        code = int(status.value) if status is not None else 0
        if overflowed(code):
            self._metrics.inc("opcua_queue_overflows_total", connection=self.name)
        variant = dv.Value
        value = _plain(variant.Value) if variant is not None else None
        if self.config.timestamp_source == "source":
            source_time = _unix(dv.SourceTimestamp) or _unix(dv.ServerTimestamp)
        else:
            source_time = _unix(dv.ServerTimestamp) or _unix(dv.SourceTimestamp)
        if source_time is not None:
            last = self._last_time.get(item.tag)
            if last is not None and source_time < last:
                self._metrics.inc("opcua_out_of_order_total", connection=self.name)
            else:
                self._last_time[item.tag] = source_time
        return Signal(self.name, item.tag, value, quality_of(code), code, source_time, now)

    def _event_signals(self, group: _EventGroup, fields: Sequence[Any], now: float) -> list[Signal]:
        """The selected fields of one event, as signals stamped with the event's Time."""
        if len(fields) != len(group.fields):
            self._metrics.inc("opcua_malformed_events_total", connection=self.name)
            return []
        stamp = fields[0].Value if fields[0] is not None else None
        source_time = _unix(stamp) if isinstance(stamp, datetime) else None
        out = []
        for item, slot in zip(group.items, group.slots, strict=True):
            variant = fields[slot]
            raw = variant.Value if variant is not None else None
            value = _event_value(raw, group.namespaces)
            if value is not None:
                out.append(Signal(self.name, item.tag, value, Quality.GOOD, 0,
                                  source_time or now, now))
        if out:
            self._metrics.inc("opcua_events_total", connection=self.name)
        return out

    def _unusable(self, item: _Item, reason: str, code: int = BAD_NODE_ID_UNKNOWN) -> Signal:
        """Mark an item unusable for this session; log it once per source."""
        item.node_id, item.problem = None, reason
        if (item.tag, reason) not in self._reported:
            self._reported.add((item.tag, reason))
            self._log.warning("opcua.address_unusable", endpoint=self.where, tag=item.tag,
                              reason=reason)
        self._metrics.inc("opcua_unusable_addresses_total", connection=self.name)
        return Signal(self.name, item.tag, None, Quality.BAD, code, receive_time=time.time())

    def _warn_insecure(self) -> None:
        if not self._warned_insecure:
            self._warned_insecure = True
            self._log.warning("opcua.insecure", endpoint=self.where,
                              reason="security_policy None: no signing, no encryption, any "
                                     "server accepted (allow_insecure: true)")


class _Lost(Exception):
    """Internal: the session ended; carries the SourceUnavailable message."""


class _Session:
    """One session of an :class:`OpcUaSource`: connect, resolve, subscribe, poll, stream."""

    def __init__(self, source: OpcUaSource, emit: Emit) -> None:
        self.src = source
        self.cfg = source.config
        self.emit = emit
        self.loop = asyncio.get_running_loop()
        self.client: Any = None
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(source.handoff_window)
        self.lost: asyncio.Future[str] = self.loop.create_future()
        self.tasks: list[asyncio.Task[None]] = []
        self.by_handle: dict[int, _Item] = {}
        self.event_groups: dict[int, _EventGroup] = {}
        """Event monitored items by client handle (after the items' handles)."""
        self.namespaces: list[str] = []
        self.subscription_id: int | None = None
        self.last_publish = time.monotonic()
        self.quiet_after_s = math.inf
        self.blocked = 0
        self.initial: list[Signal] = []
        """BAD signals of the addresses found unusable while opening; ``stream`` emits them
        first (not queued: the publish callback may fill the queue before streaming starts)."""
        self.limits = _Limits(self.cfg.max_items_per_call, self.cfg.max_nodes_per_read,
                              self.cfg.max_nodes_per_read)

    # -- errors ------------------------------------------------------------------------------

    def fail(self, message: str) -> SourceUnavailable:
        return SourceUnavailable(f"OPC UA connection {self.src.name} ({self.src.where}): {message}")

    def explain(self, exc: BaseException, doing: str) -> str:
        """One line: what went wrong while ``doing``, and what to check."""
        ua = _mod("asyncua.ua")
        UaStatusCodeError = _mod("asyncua.ua.uaerrors").UaStatusCodeError

        if isinstance(exc, UaStatusCodeError):
            code = int(exc.code)
            name = status_name(code)
            if name in ("BadUserAccessDenied", "BadIdentityTokenInvalid",
                        "BadIdentityTokenRejected", "BadUserSignatureInvalid"):
                if self.cfg.user_certificate is not None:
                    return (f"the server refused {self.cfg.user} ({name}) while {doing}: check "
                            f"that the server trusts this user certificate and maps it to a "
                            f"user")
                who = self.cfg.user or "anonymous access"
                return (f"the server refused {who} ({name}) while {doing}: check username and "
                        f"password (and that the server allows this user)")
            if name.startswith("BadCertificate") or name in ("BadSecurityChecksFailed",
                                                            "BadNoValidCertificates"):
                own = self.src.pki_dir / "own" / "cert.der"
                return (f"the server rejected the secure channel ({name}) while {doing}: trust "
                        f"the gateway's certificate {own} on the server, and check the "
                        f"security policy and mode")
            if name in ("BadSecurityPolicyRejected", "BadSecurityModeRejected"):
                return (f"the server refuses security {self.cfg.security_policy}/"
                        f"{self.cfg.security_mode} ({name}) while {doing}: check the server's "
                        f"endpoints")
            return f"the server answered {name} while {doing}"
        if isinstance(exc, TimeoutError):
            return (f"no answer within {self.cfg.request_timeout_s:g} s while {doing} (check "
                    f"that the server runs and the network path)")
        if isinstance(exc, ConnectionRefusedError):
            return (f"connection refused while {doing} (check the endpoint's host and port, "
                    f"and that the server runs)")
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve the host while {doing}: {exc.strerror} (check the endpoint)"
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            reason = exc.strerror or str(exc) or type(exc).__name__
            return f"{reason} while {doing} (check the endpoint and the network path)"
        if isinstance(exc, ConnectionError):
            return f"connection lost while {doing}: {str(exc) or 'transport closed'}"
        if isinstance(exc, ua.UaError) and str(exc).startswith("No matching endpoints"):
            wanted = ("None" if self.cfg.security_policy == "None"
                      else f"{self.cfg.security_policy}/{self.cfg.security_mode}")
            return (f"the server offers no endpoint with security {wanted} (set security_policy "
                    f"and security_mode to one the server offers)")
        if isinstance(exc, ua.UaError):
            return f"{exc} while {doing}"
        return f"{type(exc).__name__}: {exc} while {doing}"

    def lose(self, message: str) -> None:
        if not self.lost.done():
            self.lost.set_result(message)

    # -- connecting --------------------------------------------------------------------------

    async def open(self) -> None:
        Client = _mod("asyncua").Client

        cfg = self.cfg
        client = Client(cfg.endpoint, timeout=cfg.request_timeout_s,
                        watchdog_intervall=cfg.keepalive_s)
        client.name = f"DigiSpine Edge Gateway ({self.src.name})"
        client.description = client.name
        client.product_uri = "urn:digispine:edge-gateway"
        client.application_uri = self.src.application_uri
        client.session_timeout = int(cfg.session_timeout_s * 1000)
        if cfg.username is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password.get_secret_value() if cfg.password else "")
        self.client = client
        if cfg.security_policy == "None":
            self.src._warn_insecure()
        else:
            await self._secure(client)
        if cfg.user_certificate is not None and cfg.user_private_key is not None:
            await self._user_certificate(client, cfg.user_certificate, cfg.user_private_key)
        client.connection_lost_callback = self._connection_lost
        try:
            await _within(client.connect(), cfg.request_timeout_s * 3)
        except (OSError, TimeoutError, ValueError) as exc:
            raise self.fail(self.explain(exc, "connecting")) from None
        except Exception as exc:
            if _is_ua_error(exc):
                raise self.fail(self.explain(exc, "opening the session")) from None
            raise
        started = time.monotonic()
        try:
            namespaces = await self._call(client.get_namespace_array(), "reading the NamespaceArray")
            await self._read_limits()
            unusable = await self._resolve([str(n) for n in namespaces])
            subscribed = await self._subscribe()
            polled = self._start_polls()
        except _Lost as exc:
            raise self.fail(str(exc)) from None
        self.initial += unusable
        self.src._log.info(
            "opcua.connected", endpoint=self.src.where,
            security=f"{cfg.security_policy}/{cfg.security_mode}" if cfg.security_policy != "None"
            else "None", subscribed=subscribed, polled=polled,
            unusable=sum(1 for i in self.src.items if i.problem is not None),
            items_per_call=self.limits.items_per_call, nodes_per_read=self.limits.nodes_per_read,
            setup_s=round(time.monotonic() - started, 3))

    async def _call(self, coro: Any, doing: str) -> Any:
        """Await one request; a failure ends the session (:class:`_Lost`) with one line."""
        try:
            return await _within(coro, self.cfg.request_timeout_s * 2)
        except (OSError, TimeoutError) as exc:
            raise _Lost(self.explain(exc, doing)) from None
        except Exception as exc:
            if _is_ua_error(exc):
                raise _Lost(self.explain(exc, doing)) from None
            raise

    async def _connection_lost(self, exc: Exception) -> None:
        """asyncua's watchdog saw the transport close or a keep-alive probe fail."""
        if isinstance(exc, ConnectionError):
            self.lose("connection lost (the server stopped or the network failed)")
        elif isinstance(exc, TimeoutError):
            self.lose(f"the server did not answer the keep-alive probe within "
                      f"{self.cfg.keepalive_s:g} s")
        else:
            self.lose(self.explain(exc, "probing the session"))

    async def _secure(self, client: Any) -> None:
        ua = _mod("asyncua.ua")
        security_policies = _mod("asyncua.crypto.security_policies")

        cfg = self.cfg
        policy = {
            "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
            "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
            "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
        }[cfg.security_policy]
        mode = getattr(ua.MessageSecurityMode, cfg.security_mode)
        pki = self.src.pki_dir
        try:
            cert_file, key_file, app_uri = await _own_certificate(pki, self.src.application_uri)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self.fail(f"cannot use the gateway's certificate in {pki / 'own'}: {reason} "
                            f"(check the directory's permissions; delete a damaged certificate "
                            f"to generate a new one)") from None
        client.application_uri = app_uri
        try:
            endpoints = await _within(client.connect_and_get_server_endpoints(),
                                      cfg.request_timeout_s * 2)
        except (OSError, TimeoutError) as exc:
            raise self.fail(self.explain(exc, "asking for the server's endpoints")) from None
        except Exception as exc:
            if _is_ua_error(exc):
                raise self.fail(self.explain(exc, "asking for the server's endpoints")) from None
            raise
        chosen = next((ep for ep in endpoints if ep.SecurityPolicyUri == policy.URI
                       and ep.SecurityMode == mode), None)
        if chosen is None:
            offered = sorted({f"{ep.SecurityPolicyUri.rsplit('#', 1)[-1]}/{ep.SecurityMode.name}"
                              for ep in endpoints})
            raise self.fail(
                f"the server offers no endpoint with security {cfg.security_policy}/"
                f"{cfg.security_mode}; it offers {', '.join(offered) or 'none'} (set "
                f"security_policy and security_mode accordingly)")
        server_der = _first_certificate(chosen.ServerCertificate)
        if not server_der:
            raise self.fail("the server's endpoint has no certificate; a secure channel needs one")
        try:
            problem = await asyncio.to_thread(_check_trust, pki, server_der)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self.fail(f"cannot check the server's certificate against {pki}: {reason}") \
                from None
        if problem is not None:
            raise self.fail(problem)
        try:
            await client.set_security(policy, str(cert_file), str(key_file),
                                      server_certificate=server_der, mode=mode)
        except Exception as exc:
            if _is_ua_error(exc) or isinstance(exc, ValueError | OSError):
                raise self.fail(f"cannot set up security {cfg.security_policy}: {exc} (check "
                                f"{self.src.pki_dir / 'own'})") from None
            raise

    async def _user_certificate(self, client: Any, cert: Path, key: Path) -> None:
        """Load the X.509 user token's certificate and key (paths relative to the PKI dir)."""
        cert_path, key_path = self.src.pki_dir / cert, self.src.pki_dir / key
        secret = self.cfg.user_private_key_password
        try:
            await client.load_client_certificate(str(cert_path))
        except Exception as exc:  # noqa: BLE001 - any failure to read it is the same advice
            raise self.fail(f"cannot load the user certificate {cert_path}: "
                            f"{_reason(exc)} (a DER or PEM certificate)") from None
        try:
            await client.load_private_key(key_path, secret.get_secret_value() if secret else None)
        except Exception as exc:  # noqa: BLE001
            raise self.fail(f"cannot load the user private key {key_path}: {_reason(exc)} "
                            f"(a PEM or DER key; user_private_key_password if it is "
                            f"encrypted)") from None

    async def _read_limits(self) -> None:
        """Lower the ceilings to the server's OperationLimits (0 or missing: no limit)."""
        ua = _mod("asyncua.ua")

        ids = (ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
               ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
               ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse)
        params = ua.ReadParameters()
        params.NodesToRead = [ua.ReadValueId(NodeId=ua.NodeId(i), AttributeId=ua.AttributeIds.Value)
                              for i in ids]
        results = await self._call(self.client.uaclient.read(params), "reading OperationLimits")
        server: list[int] = []
        for dv in results:
            value = dv.Value.Value if dv.Value is not None else None
            ok = dv.StatusCode is None or dv.StatusCode.is_good()
            server.append(int(value) if ok and isinstance(value, int) and value > 0 else 0)

        def cap(ceiling: int, limit: int) -> int:
            return min(ceiling, limit) if limit else ceiling

        self.limits = _Limits(cap(self.cfg.max_items_per_call, server[0]),
                              cap(self.cfg.max_nodes_per_read, server[1]),
                              cap(self.cfg.max_nodes_per_read, server[2]))

    # -- resolving addresses -----------------------------------------------------------------

    async def _resolve(self, namespaces: list[str]) -> list[Signal]:
        """Node ids against the NamespaceArray, paths by browsing; the unusable as BAD signals."""
        ua = _mod("asyncua.ua")

        index = {uri: i for i, uri in enumerate(namespaces)}
        bad: list[Signal] = []
        paths: list[tuple[_Item, tuple[PathSegment, ...]]] = []
        for item in self.src.items:
            item.node_id, item.problem = None, None
            ref = item.address.node_ref
            if ref is None:
                paths.append((item, item.address.segments or ()))
                continue
            if ref.namespace_uri is not None:
                ns = index.get(ref.namespace_uri)
                if ns is None:
                    bad.append(self.src._unusable(
                        item, f"namespace {ref.namespace_uri} is not in the server's "
                              f"NamespaceArray ({', '.join(namespaces)})"))
                    continue
            else:
                ns = ref.namespace_index or 0
            item.node_id = _node_id(ua, ref, ns)
        if paths:
            bad += await self._browse_paths(paths, index, namespaces)
        for item in self.src.items:
            if item.node_id is not None and item.address.event_field is not None:
                problem = self._resolve_event(ua, item, index)
                if problem is not None:
                    bad.append(self.src._unusable(item, problem))
        self.namespaces = namespaces
        self.by_handle = {i.handle: i for i in self.src.items if i.node_id is not None}
        return bad

    def _resolve_event(self, ua: Any, item: _Item, index: Mapping[str, int]) -> str | None:
        """The event type's node id and the field's QualifiedNames of an event item (kept on
        the item as ``event``); the problem when a namespace URI is unknown."""
        address = item.address
        type_ref = address.event_type_ref
        type_ns = type_ref.namespace_index or 0
        if type_ref.namespace_uri is not None:
            if type_ref.namespace_uri not in index:
                return (f"event_type's namespace {type_ref.namespace_uri} is not in the "
                        f"server's NamespaceArray")
            type_ns = index[type_ref.namespace_uri]
        names = []
        for segment in parse_field_path(address.event_field or ""):
            ns = 0
            if segment.namespace_uri is not None:
                if segment.namespace_uri not in index:
                    return (f"event_field's namespace {segment.namespace_uri} is not in the "
                            f"server's NamespaceArray")
                ns = index[segment.namespace_uri]
            names.append(ua.QualifiedName(segment.name, ns))
        item.event = (_node_id(ua, type_ref, type_ns), tuple(names))
        return None

    async def _browse_paths(self, paths: list[tuple[_Item, tuple[PathSegment, ...]]],
                            index: Mapping[str, int], namespaces: list[str]) -> list[Signal]:
        """Walk all paths level by level from Objects, browsing each parent once."""
        ua = _mod("asyncua.ua")

        children: dict[Any, list[Any]] = {}
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        current: dict[int, tuple[Any, int]] = {}  # handle -> (node id, node class) reached
        for item, _ in paths:
            current[item.handle] = (objects, int(ua.NodeClass.Object))
        bad: list[Signal] = []
        pending = list(paths)
        depth = 0
        while pending:
            parents = list(dict.fromkeys(current[item.handle][0] for item, _ in pending
                                         if current[item.handle][0] not in children))
            for chunk in _chunks(parents, self.limits.nodes_per_browse):
                refs = await self._browse(chunk)
                children.update(zip(chunk, refs, strict=True))
            still: list[tuple[_Item, tuple[PathSegment, ...]]] = []
            for item, segments in pending:
                parent = current[item.handle][0]
                segment = segments[depth]
                where = "/".join([PATH_ROOT, *(str(s) for s in segments[:depth])])
                ns = None
                if segment.namespace_uri is not None:
                    ns = index.get(segment.namespace_uri)
                    if ns is None:
                        bad.append(self.src._unusable(
                            item, f"namespace {segment.namespace_uri} is not in the server's "
                                  f"NamespaceArray ({', '.join(namespaces)})"))
                        continue
                matches = [r for r in children.get(parent, []) if r.BrowseName.Name == segment.name
                           and (ns is None or r.BrowseName.NamespaceIndex == ns)]
                distinct = list(dict.fromkeys(_plain_node_id(r.NodeId) for r in matches))
                if not distinct:
                    names = sorted({r.BrowseName.Name for r in children.get(parent, [])})
                    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                    bad.append(self.src._unusable(
                        item, f"{where} has no child '{segment}' (its children: "
                              f"{shown or 'none'})"))
                    continue
                if len(distinct) > 1:
                    uris = sorted({namespaces[r.BrowseName.NamespaceIndex]
                                   for r in matches if r.BrowseName.NamespaceIndex < len(namespaces)})
                    bad.append(self.src._unusable(
                        item, f"{where} has several children '{segment.name}' (namespaces "
                              f"{', '.join(uris)}); qualify the segment as <uri>:{segment.name}"))
                    continue
                current[item.handle] = (distinct[0], int(matches[0].NodeClass))
                if depth + 1 < len(segments):
                    still.append((item, segments))
                elif item.address.event_field is not None:
                    item.node_id = distinct[0]  # a notifier: the server checks EventNotifier
                elif int(matches[0].NodeClass) != int(ua.NodeClass.Variable):
                    kind = ua.NodeClass(int(matches[0].NodeClass)).name
                    bad.append(self.src._unusable(
                        item, f"{item.tag} is an {kind}, not a Variable: address a Variable "
                              f"(e.g. one of its children)", 0x80350000))
                else:
                    item.node_id = distinct[0]
            pending = still
            depth += 1
        return bad

    async def _browse(self, nodes: list[Any]) -> list[list[Any]]:
        """The hierarchical forward references of each node (continuation points followed)."""
        ua = _mod("asyncua.ua")

        params = ua.BrowseParameters()
        params.RequestedMaxReferencesPerNode = 0
        for node in nodes:
            desc = ua.BrowseDescription()
            desc.NodeId = node
            desc.BrowseDirection = ua.BrowseDirection.Forward
            desc.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
            desc.IncludeSubtypes = True
            desc.NodeClassMask = 0
            desc.ResultMask = int(ua.BrowseResultMask.BrowseName | ua.BrowseResultMask.NodeClass)
            params.NodesToBrowse.append(desc)
        results = await self._call(self.client.uaclient.browse(params), "browsing paths")
        out: list[list[Any]] = []
        for result in results:
            refs = list(result.References or [])
            point = result.ContinuationPoint
            while point:
                more = ua.BrowseNextParameters()
                more.ReleaseContinuationPoints = False
                more.ContinuationPoints = [point]
                (nxt,) = await self._call(self.client.uaclient.browse_next(more), "browsing paths")
                refs += list(nxt.References or [])
                point = nxt.ContinuationPoint
            out.append(refs if result.StatusCode is None or result.StatusCode.is_good() else [])
        return out

    # -- subscription ------------------------------------------------------------------------

    async def _subscribe(self) -> int:
        ua = _mod("asyncua.ua")

        items = [i for i in self.by_handle.values() if i.address.mode == "subscribe"]
        if not items:
            return 0
        cfg = self.cfg
        keepalive = max(1, math.ceil(cfg.keepalive_s * 1000 / cfg.publishing_interval_ms))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = float(cfg.publishing_interval_ms)
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = max(3 * keepalive, math.ceil(
            cfg.session_timeout_s * 1000 / cfg.publishing_interval_ms))
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        result = await self._call(self.client.uaclient.create_subscription(params, self._on_publish),
                                  "creating the subscription")
        self.subscription_id = int(result.SubscriptionId)
        period_s = float(result.RevisedPublishingInterval) * int(result.RevisedMaxKeepAliveCount) / 1000
        self.quiet_after_s = 3 * max(period_s, cfg.publishing_interval_ms / 1000) + cfg.request_timeout_s
        self.last_publish = time.monotonic()
        bad: list[Signal] = []
        size = self.limits.items_per_call
        queue: list[tuple[Any, list[_Item]]] = [
            (self._request(ua, i), [i]) for i in items if i.address.event_field is None]
        queue += [(self._event_request(ua, g), g.items) for g in self._event_groups(ua, items)]
        while queue:
            batch, queue = queue[:size], queue[size:]
            requests = [request for request, _ in batch]
            create = ua.CreateMonitoredItemsParameters()
            create.SubscriptionId = self.subscription_id
            create.TimestampsToReturn = ua.TimestampsToReturn.Both
            create.ItemsToCreate = requests
            try:
                results = await _within(
                    self.client.uaclient.create_monitored_items(create), cfg.request_timeout_s * 2)
            except Exception as exc:
                if _status_of(exc) == "BadTooManyOperations" and len(batch) > 1:
                    size = len(batch) // 2  # the server's real limit is lower than it says
                    queue = batch + queue
                    continue
                if isinstance(exc, (OSError, TimeoutError)) or _is_ua_error(exc):
                    raise _Lost(self.explain(exc, "creating monitored items")) from None
                raise
            self.limits.items_per_call = size
            for (_, unit), res in zip(batch, results, strict=True):
                code = int(res.StatusCode.value)
                if quality_of(code) == Quality.BAD:
                    bad += [self.src._unusable(item, _hint(code), code) for item in unit]
        if bad:
            self.by_handle = {h: i for h, i in self.by_handle.items() if i.node_id is not None}
            self.event_groups = {h: g for h, g in self.event_groups.items()
                                 if g.items[0].node_id is not None}
            self.initial += bad
        return len(items) - len(bad)

    def _event_groups(self, ua: Any, items: list[_Item]) -> list[_EventGroup]:
        """One group per notifier node and event type; handles after the items'."""
        grouped: dict[tuple[Any, Any], list[_Item]] = {}
        for item in items:
            if item.address.event_field is not None and item.event is not None:
                grouped.setdefault((item.node_id, item.event[0]), []).append(item)
        self.event_groups = {}
        handle = max((i.handle for i in self.src.items), default=0)
        time_field = (ua.QualifiedName("Time", 0),)
        for members in grouped.values():
            handle += 1
            members.sort(key=lambda i: i.address.event_field == "EventId")  # stable: last
            fields: list[tuple[Any, ...]] = [time_field]
            slots = []
            for item in members:
                assert item.event is not None
                path = item.event[1]
                if path not in fields:
                    fields.append(path)
                slots.append(fields.index(path))
            group = _EventGroup(handle, members, fields, slots, self.namespaces)
            self.event_groups[handle] = group
        return list(self.event_groups.values())

    def _event_request(self, ua: Any, group: _EventGroup) -> Any:
        first = group.items[0]
        assert first.event is not None
        event_type = first.event[0]
        flt = ua.EventFilter()
        for path in group.fields:
            op = ua.SimpleAttributeOperand()
            op.TypeDefinitionId = event_type
            op.BrowsePath = list(path)
            op.AttributeId = ua.AttributeIds.Value
            flt.SelectClauses.append(op)
        if event_type != ua.NodeId(ua.ObjectIds.BaseEventType):
            element = ua.ContentFilterElement()
            element.FilterOperator = ua.FilterOperator.OfType
            element.FilterOperands = [ua.LiteralOperand(Value=ua.Variant(event_type))]
            flt.WhereClause.Elements.append(element)
        sized = [i.address for i in group.items if "queue_size" in i.address.model_fields_set]
        req = ua.MonitoredItemCreateRequest()
        req.ItemToMonitor = ua.ReadValueId(NodeId=first.node_id,
                                           AttributeId=ua.AttributeIds.EventNotifier)
        req.MonitoringMode = ua.MonitoringMode.Reporting
        mp = ua.MonitoringParameters()
        mp.ClientHandle = group.handle
        mp.SamplingInterval = 0.0
        mp.QueueSize = max((a.queue_size for a in sized), default=EVENT_QUEUE_SIZE)
        mp.DiscardOldest = all(i.address.discard_oldest for i in group.items)
        mp.Filter = flt
        req.RequestedParameters = mp
        return req

    def _request(self, ua: Any, item: _Item) -> Any:
        address = item.address
        req = ua.MonitoredItemCreateRequest()
        req.ItemToMonitor = ua.ReadValueId(NodeId=item.node_id, AttributeId=ua.AttributeIds.Value)
        req.MonitoringMode = ua.MonitoringMode.Reporting
        mp = ua.MonitoringParameters()
        mp.ClientHandle = item.handle
        mp.SamplingInterval = (float(address.sampling_interval_ms)
                               if address.sampling_interval_ms is not None else -1.0)
        mp.QueueSize = address.queue_size
        mp.DiscardOldest = address.discard_oldest
        if address.deadband is not None or address.trigger != "status_value":
            flt = ua.DataChangeFilter()
            flt.Trigger = {"status": ua.DataChangeTrigger.Status,
                           "status_value": ua.DataChangeTrigger.StatusValue,
                           "status_value_timestamp": ua.DataChangeTrigger.StatusValueTimestamp,
                           }[address.trigger]
            if address.deadband is not None:
                if address.deadband.absolute is not None:
                    flt.DeadbandType = int(ua.DeadbandType.Absolute)
                    flt.DeadbandValue = float(address.deadband.absolute)
                else:
                    flt.DeadbandType = int(ua.DeadbandType.Percent)
                    flt.DeadbandValue = float(address.deadband.percent or 0.0)
            mp.Filter = flt
        req.RequestedParameters = mp
        return req

    async def _on_publish(self, result: Any) -> None:
        """asyncua's publish loop calls this per PublishResult (awaiting it: backpressure)."""
        self.last_publish = time.monotonic()
        message = result.NotificationMessage
        if not message.NotificationData or self.lost.done():
            return  # a keep-alive, or a session that is over
        try:
            signals = self._notifications(message.NotificationData)
        except Exception:  # noqa: BLE001 - a bug must not end the session: log it, keep going
            self.src._log.exception("opcua.publish_failed", endpoint=self.src.where)
            return
        if signals:
            self.src._metrics.inc("signals_received_total", len(signals),
                                  connection=self.src.name)
            await self._put(Delivery(signals))

    def _notifications(self, data: Iterable[Any]) -> list[Signal]:
        ua = _mod("asyncua.ua")
        now = time.time()
        signals: list[Signal] = []
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                for mi in notification.MonitoredItems:
                    item = self.by_handle.get(mi.ClientHandle)
                    if item is not None and mi.Value is not None:
                        signals.append(self.src._signal(item, mi.Value, now))
            elif isinstance(notification, ua.EventNotificationList):
                for fields in notification.Events:
                    group = self.event_groups.get(fields.ClientHandle)
                    if group is not None:
                        signals += self.src._event_signals(group, fields.EventFields, now)
            elif isinstance(notification, ua.StatusChangeNotification):
                code = int(notification.Status.value)
                if quality_of(code) == Quality.BAD:
                    name = status_name(code)
                    self.lose("connection lost (the server stopped or the network failed)"
                              if name == "BadShutdown" else
                              f"the server ended the subscription ({name})")
        return signals

    async def _put(self, delivery: Delivery) -> None:
        """Hand a delivery to ``stream``; waits while the queue is full (backpressure), gives
        up when the session ends (nobody would take it)."""
        if self.lost.done():
            return
        self.blocked += 1
        put = asyncio.ensure_future(self.queue.put(delivery))
        waiting: list[asyncio.Future[Any]] = [put, self.lost]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
            self.blocked -= 1
            self.last_publish = time.monotonic()

    async def _watch_subscription(self) -> None:
        """A subscription without Publish responses, not even keep-alives, is dead."""
        while not self.lost.done():
            await asyncio.sleep(min(self.cfg.keepalive_s, 1.0))
            if self.blocked:
                continue
            quiet = time.monotonic() - self.last_publish
            if quiet > self.quiet_after_s:
                self.lose(f"no publish response or keep-alive for {quiet:.0f} s")
                return

    # -- polling -----------------------------------------------------------------------------

    def _start_polls(self) -> int:
        groups: dict[int, list[_Item]] = {}
        for item in self.by_handle.values():
            if item.address.mode == "poll" and item.address.poll_interval_ms is not None:
                groups.setdefault(item.address.poll_interval_ms, []).append(item)
        for interval_ms, items in sorted(groups.items()):
            self.tasks.append(asyncio.create_task(
                self._poll(interval_ms, items), name=f"opcua-{self.src.name}-poll-{interval_ms}"))
        if self.subscription_id is not None:
            self.tasks.append(asyncio.create_task(self._watch_subscription(),
                                                  name=f"opcua-{self.src.name}-watch"))
        return sum(len(items) for items in groups.values())

    async def _poll(self, interval_ms: int, items: list[_Item]) -> None:
        interval = interval_ms / 1000
        next_at = time.monotonic()
        while not self.lost.done():
            now = time.time()
            try:
                values = await self._read(items, float(interval_ms))
            except _Lost as exc:
                self.lose(str(exc))
                return
            signals: list[Signal] = []
            for item, dv in zip(items, values, strict=True):
                code = int(dv.StatusCode.value) if dv.StatusCode is not None else 0
                if quality_of(code) == Quality.BAD and status_name(code) in _HINTS:
                    key = (item.tag, _hint(code))
                    if key not in self.src._reported:
                        self.src._reported.add(key)
                        self.src._log.warning("opcua.address_unusable", endpoint=self.src.where,
                                              tag=item.tag, reason=key[1])
                signals.append(self.src._signal(item, dv, now))
            self.src._metrics.inc("signals_received_total", len(signals), connection=self.src.name)
            await self._put(Delivery(signals))
            next_at += interval
            late = time.monotonic() - next_at
            if late > 0:
                skipped = math.floor(late / interval) + 1
                self.src._metrics.inc("opcua_poll_overruns_total", skipped,
                                      connection=self.src.name)
                next_at += skipped * interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _read(self, items: list[_Item], max_age_ms: float) -> list[Any]:
        """The values of ``items``, in reads of at most ``nodes_per_read`` (halved while the
        server refuses a read as too large)."""
        ua = _mod("asyncua.ua")
        out: list[Any] = []
        start = 0
        while start < len(items):
            batch = items[start:start + self.limits.nodes_per_read]
            params = ua.ReadParameters()
            params.MaxAge = max_age_ms
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            params.NodesToRead = [ua.ReadValueId(NodeId=i.node_id, AttributeId=ua.AttributeIds.Value)
                                  for i in batch]
            try:
                results = await _within(self.client.uaclient.read(params),
                                                 self.cfg.request_timeout_s * 2)
            except Exception as exc:
                if _status_of(exc) == "BadTooManyOperations" and len(batch) > 1:
                    self.limits.nodes_per_read = len(batch) // 2
                    continue
                if isinstance(exc, (OSError, TimeoutError)) or _is_ua_error(exc):
                    raise _Lost(self.explain(exc, "polling")) from None
                raise
            out += results
            start += len(batch)
        return out

    # -- streaming and closing ---------------------------------------------------------------

    async def stream(self) -> None:
        """Pass queued deliveries to ``emit`` until the session is lost."""
        if self.initial:
            initial, self.initial = self.initial, []
            await self.emit(Delivery(initial))
        while True:
            getter = asyncio.ensure_future(self.queue.get())
            waiting: list[asyncio.Future[Any]] = [getter, self.lost]
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                getter.cancel()
                raise
            if getter.done():
                await self.emit(getter.result())
                continue
            getter.cancel()
            raise self.fail(self.lost.result())

    async def wind_down(self) -> None:
        """After a failure: stop the producers, pass on what they had queued."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        while not self.queue.empty():
            await self.emit(self.queue.get_nowait())

    async def close(self) -> None:
        UaClientState = _mod("asyncua.client.ua_client").UaClientState

        client, self.client = self.client, None
        healthy = (client is not None and not self.lost.done()
                   and client.uaclient.state is UaClientState.CONNECTED)
        self.lose("closed")  # the producers stop handing over
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if client is not None:
            await asyncio.shield(_quiet(asyncio.ensure_future(self._disconnect(client, healthy))))

    async def _disconnect(self, client: Any, healthy: bool) -> None:
        """Close the session (deleting its subscription) when it is healthy; after a loss, drop
        the socket first (a hung link would hold a CloseSession for the request timeout), then
        stop asyncua's tasks. The server drops the session after ``session_timeout_s``."""
        with contextlib.suppress(Exception):
            if healthy:
                await _within(client.disconnect(), self.cfg.request_timeout_s)
                return
        with contextlib.suppress(Exception):
            client.disconnect_socket()
        with contextlib.suppress(Exception):
            await _within(client.close_session(), self.cfg.request_timeout_s)


# --- helpers ----------------------------------------------------------------------------------


def _mod(name: str) -> Any:
    """An asyncua module, imported on first use (asyncua takes about a second to import, and
    ``validate`` never needs it), typed Any: its dynamic parts (ObjectIds, StatusCodes, the
    dataclass fields) are not described by its annotations."""
    return importlib.import_module(name)


def _node_id(ua: Any, ref: NodeRef, ns: int) -> Any:
    if ref.kind == "i":
        return ua.NodeId(int(ref.identifier), ns, ua.NodeIdType.Numeric)
    if ref.kind == "s":
        return ua.NodeId(ref.identifier, ns, ua.NodeIdType.String)
    if ref.kind == "g":
        return ua.NodeId(uuid.UUID(ref.identifier), ns, ua.NodeIdType.Guid)
    return ua.NodeId(base64.b64decode(ref.identifier), ns, ua.NodeIdType.ByteString)


def _plain_node_id(node: Any) -> Any:
    """A browse result's (expanded) node id as a plain NodeId, usable as a dict key."""
    ua = _mod("asyncua.ua")

    return ua.NodeId(node.Identifier, node.NamespaceIndex, node.NodeIdType)


async def _within(aw: Awaitable[_T], timeout_s: float) -> _T:
    """``asyncio.wait_for`` without its Python 3.11 flaw: a cancellation that arrives as the
    awaited request completes is not swallowed (cpython #86296; ``asyncio.timeout`` counts
    cancellations). A swallowed cancel would leave a poll task running after ``close``."""
    async with asyncio.timeout(timeout_s):
        return await aw


def _chunks(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start:start + size])


def _is_ua_error(exc: BaseException) -> bool:
    ua = _mod("asyncua.ua")

    return isinstance(exc, ua.UaError)


def _status_of(exc: BaseException) -> str | None:
    UaStatusCodeError = _mod("asyncua.ua.uaerrors").UaStatusCodeError

    return status_name(int(exc.code)) if isinstance(exc, UaStatusCodeError) else None


def _quiet(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Mark the outcome of ``fut`` as retrieved even if nobody awaits it any more."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


# --- certificates -----------------------------------------------------------------------------

CERT_DAYS = 3650
"""Validity of the generated application instance certificate."""


async def _own_certificate(pki: Path, application_uri: str) -> tuple[Path, Path, str]:
    """The gateway's certificate and key under ``pki/own``, generated once; and the application
    URI to use (the one in the certificate, so a kept certificate keeps matching)."""
    lock = _PKI_LOCKS.setdefault(pki, asyncio.Lock())
    async with lock:
        return await asyncio.to_thread(_own_certificate_blocking, pki, application_uri)


def _own_certificate_blocking(pki: Path, application_uri: str) -> tuple[Path, Path, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_file = pki / "own" / "cert.der"
    key_file = pki / "own" / "private" / "key.pem"
    for sub in ("own/private", "trusted", "rejected"):
        (pki / sub).mkdir(parents=True, exist_ok=True)
    if cert_file.is_file() and key_file.is_file():
        cert = x509.load_der_x509_certificate(cert_file.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if cert.not_valid_after_utc < datetime.now(UTC):
            logs.get("opcua").error(
                "opcua.certificate_expired", certificate=str(cert_file),
                expired=cert.not_valid_after_utc.isoformat(),
                hint=f"delete {pki / 'own'} to generate a new one, then trust it on the servers")
        return cert_file, key_file, uris[0] if uris else application_uri
    cert_gen = _mod("asyncua.crypto.cert_gen")
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = cert_gen.generate_private_key()
    host = socket.gethostname()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, f"DigiSpine Edge Gateway@{host}", {"organizationName": "DigiSpine"},
        [x509.UniformResourceIdentifier(application_uri), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=CERT_DAYS)
    _write_atomic(key_file, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    _write_atomic(cert_file, cert.public_bytes(serialization.Encoding.DER), 0o644)
    logs.get("opcua").info("opcua.certificate_created", certificate=str(cert_file),
                           application_uri=application_uri,
                           hint="trust this certificate on the OPC UA servers")
    return cert_file, key_file, application_uri


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _first_certificate(data: bytes | None) -> bytes:
    """The first DER certificate of a chain (servers may send theirs with its issuers)."""
    if not data:
        return b""
    if len(data) < 4 or data[0] != 0x30:
        return bytes(data)
    length = data[1]
    if length < 0x80:
        return bytes(data[:2 + length])
    n = length & 0x7F
    return bytes(data[:2 + n + int.from_bytes(data[2:2 + n], "big")])


def _load_certificates(directory: Path) -> list[Any]:
    from cryptography import x509

    out = []
    for entry in sorted(directory.iterdir()) if directory.is_dir() else ():
        if entry.suffix.lower() not in (".der", ".pem", ".crt", ".cer") or not entry.is_file():
            continue
        raw = entry.read_bytes()
        with contextlib.suppress(ValueError):
            out.append(x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw
                       else x509.load_der_x509_certificate(raw))
    return out


def _check_trust(pki: Path, server_der: bytes) -> str | None:
    """None when ``trusted/`` holds the server certificate or its issuer; else why not (and
    the certificate is saved to ``rejected/``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(server_der)
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return (f"the server's certificate is valid only from {cert.not_valid_before_utc:%Y-%m-%d} "
                f"to {cert.not_valid_after_utc:%Y-%m-%d} (check the server's and the gateway's "
                f"clocks, or renew the server certificate)")
    for trusted in _load_certificates(pki / "trusted"):
        if trusted.public_bytes(serialization.Encoding.DER) == server_der:
            return None
        with contextlib.suppress(Exception):
            if trusted.subject == cert.issuer and trusted.subject != cert.subject:
                cert.verify_directly_issued_by(trusted)
                return None
    thumb = hashlib.sha1(server_der, usedforsecurity=False).hexdigest()
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common = str(names[0].value) if names else "server"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", common).strip("_") or "server"
    rejected = pki / "rejected" / f"{safe}_{thumb[:16]}.der"
    rejected.parent.mkdir(parents=True, exist_ok=True)
    if not rejected.exists():
        _write_atomic(rejected, server_der, 0o644)
    return (f"the server's certificate (CN={common}, SHA-1 {thumb}) is not trusted; it was saved "
            f"as {rejected}: move it to {pki / 'trusted'} to trust this server")


# --- asyncua's logging ------------------------------------------------------------------------


class _AsyncuaNoise(logging.Filter):
    """Drops asyncua's complaints about a connection going away or being closed while down
    (with tracebacks, at WARNING/ERROR); the source reports those itself, once per
    transition, as one line. With the root logger at DEBUG nothing is dropped."""

    PREFIXES = (
        "Publish iteration crashed", "close_session raised", "close_secure_channel raised",
        "close_session was called but", "close_session but connection", "Error while renewing",
        "connection error  in watchdog", "Connection supervisor iteration crashed",
        "Requested session timeout", "Sending plain-text password",
        "close_secure_channel was called but", "create_session fault response",
        "ServiceFault", "Error parsing notification",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


_NOISY = ("asyncua.client.client", "asyncua.client.ua_session",
          "asyncua.client.ua_session.UaSession", "asyncua.client.ua_client.UaClient",
          "asyncua.client.ua_client.UASocketProtocol", "asyncua.crypto.uacrypto",
          "asyncua.crypto.security_policies")


def _quiet_asyncua() -> None:
    for name in _NOISY:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _AsyncuaNoise) for f in logger.filters):
            logger.addFilter(_AsyncuaNoise())


__all__ = [
    "OpcUaAddress",
    "OpcUaConnectionConfig",
    "OpcUaDeadband",
    "OpcUaSource",
    "parse_browse_path",
    "parse_node_id",
    "quality_of",
]
