"""The gateway's own DomainEvents: a periodic heartbeat and connection state changes.

The central platform sees every gateway's health next to its data without reaching into the
plant network: the daemon appends these events to the buffer like mapped ones, so they reach
Kafka (topic per ``kafka.topic_template``, e.g. ``digispine.gateway.Heartbeat.v1``) in order
after any backlog, and survive an outage. Subject ``gateways/<gateway id>``, source
``/gateways/<gateway id>``; the Kafka key is the subject, so one gateway's status stays in
order.

``gateway.Heartbeat.v1`` (every ``health.heartbeat_interval_s``)::

    {"gateway_id", "version", "started_at", "uptime_s", "interval_s",
     "buffer": {"pending_events", "pending_bytes", "oldest_age_s", "full"},
     "kafka": {"connected", "last_ack_age_s"},
     "connections": {<name>: {"protocol", "state", "since", "restarts", "last_error"}},
     "config_sha256", "mappings": {"files", "signals", "events", "sha256"},
     "problems": [...]}

``gateway.ConnectionStateChanged.v1`` (on every up/down transition of a connection, once per
episode as the logs: not per failed retry)::

    {"connection", "protocol", "state": "up" | "down", "error", "down_s", "restarts"}

Ids are deterministic hashes of the gateway, the type, the time and the content, so a
redelivered status event deduplicates like any other.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.model import DomainEvent, encode_json, event_id, rfc3339

if TYPE_CHECKING:
    from gateway.mapping.engine import Mapper
    from gateway.settings import GatewaySettings

HEARTBEAT_TYPE = "gateway.Heartbeat.v1"
CONNECTION_STATE_TYPE = "gateway.ConnectionStateChanged.v1"


def subject_of(gateway_id: str) -> str:
    return f"gateways/{gateway_id}"


def _event(gateway_id: str, event_type: str, local_id: str, now: float,
           data: dict[str, Any]) -> DomainEvent:
    return DomainEvent(
        id=event_id(gateway_id, subject_of(gateway_id), local_id, now, "", data),
        source=f"/gateways/{gateway_id}",
        type=event_type,
        subject=subject_of(gateway_id),
        time=now,
        data=data,
    )


def config_hash(settings: GatewaySettings) -> str:
    """SHA-256 of the effective configuration (file and environment overrides), secrets masked
    (pydantic dumps a SecretStr as ``**********``): the same settings give the same hash."""
    dumped = settings.model_dump(mode="json")
    return hashlib.sha256(encode_json(dumped)).hexdigest()


def mappings_summary(mapper: Mapper) -> dict[str, Any]:
    """Counts, and one SHA-256 over the mapping files' names and ``mappinghash`` values (the
    hashes the Mapper took of their bytes when it loaded them: no file is read again)."""
    files = mapper.files
    digest = hashlib.sha256()
    for name, file_hash in sorted(mapper.mapping_hashes.items()):
        digest.update(f"{name}\0{file_hash}\0".encode())
    return {
        "files": len(files),
        "signals": sum(len(f.spec.signals) for f in files),
        "events": sum(len(f.spec.events) for f in files),
        "sha256": digest.hexdigest(),
    }


def heartbeat(gateway_id: str, now: float, *, started: float, interval_s: float,
              buffer: Mapping[str, Any], kafka: Mapping[str, Any],
              connections: Mapping[str, Mapping[str, Any]], config_sha256: str,
              mappings: Mapping[str, Any], problems: Sequence[str]) -> DomainEvent:
    data = {
        "gateway_id": gateway_id,
        "version": __version__,
        "started_at": rfc3339(started),
        "uptime_s": round(now - started, 1),
        "interval_s": interval_s,
        "buffer": dict(buffer),
        "kafka": dict(kafka),
        "connections": {name: dict(c) for name, c in sorted(connections.items())},
        "config_sha256": config_sha256,
        "mappings": dict(mappings),
        "problems": list(problems),
    }
    return _event(gateway_id, HEARTBEAT_TYPE, "heartbeat", now, data)


def connection_state(gateway_id: str, now: float, *, connection: str, protocol: str, up: bool,
                     error: str | None, down_s: float | None, restarts: int) -> DomainEvent:
    data = {
        "connection": connection,
        "protocol": protocol,
        "state": "up" if up else "down",
        "error": error,
        "down_s": None if down_s is None else round(down_s, 1),
        "restarts": restarts,
    }
    return _event(gateway_id, CONNECTION_STATE_TYPE, f"connection:{connection}", now, data)


def since_iso(t: float | None) -> str | None:
    return rfc3339(t) if t is not None else None


def age(t: float | None, now: float | None = None) -> float | None:
    if t is None:
        return None
    return round((now if now is not None else time.time()) - t, 1)
