"""What this gateway publishes, for the central platform: the catalog and its AsyncAPI document.

Three views of the same facts (the event types the loaded mapping files emit, their topics,
subjects, contracts and the JSON Schemas of their data):

- :func:`catalog_entries`: one JSON object per event type (``digispine-gateway catalog``);
- :func:`asyncapi_document`: an AsyncAPI 3.0.0 document (``digispine-gateway catalog --format
  asyncapi``): one channel per Kafka topic, one message per event type with its CloudEvents
  headers (binary mode) or envelope (structured mode) and its data schema as payload, the Kafka
  key (the subject) as a message binding, one ``send`` operation per channel;
- :class:`CatalogPublisher`: the catalog as ``gateway.CatalogEntry.v1`` events, one per event
  type, which the daemon appends to the buffer at start and after a reload that changed them,
  so they reach the catalog topic (``kafka.catalog_topic``) like any event: durably, in order,
  after an outage. Key (subject) ``gateways/<gateway id>/types/<event type>``: on a compacted
  topic the latest entry of every type of every gateway stays. The id is a hash of the entry's
  content, so publishing an unchanged entry again (every start) is a duplicate a consumer may
  drop. A type the mappings no longer emit gets a last entry with ``status: withdrawn``.

See docs/data-products.md for the lifecycle of a data product.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.mapping.contracts import (
    PROVENANCE_ATTRIBUTES,
    VIOLATION_CONTRACT,
    VIOLATION_TYPE,
    Contract,
    mapping_hash,
    split_type,
)
from gateway.model import DomainEvent, encode_json, event_id
from gateway.sinks.kafka import (
    CATALOG_TYPE,
    DEAD_LETTER_TYPE,
    SEQUENCE_DIGITS,
    STRUCTURED_CONTENT_TYPE,
    topic_for,
)

if TYPE_CHECKING:
    from gateway.mapping.loader import MappingFile
    from gateway.settings import GatewaySettings

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"

GATEWAY_TYPES: dict[str, str] = {
    "gateway.Heartbeat.v1": "The gateway's periodic status (buffer, Kafka, connections, "
                            "mapping and config hashes).",
    "gateway.ConnectionStateChanged.v1": "A connection of the gateway went up or down.",
    "gateway.EventsDropped.v1": "Events the buffer had to drop (full, expired, corrupt), "
                                "counted per type.",
    DEAD_LETTER_TYPE: "Stands in for an event Kafka can never take (its attributes, size and "
                      "the reason, never its data).",
    CATALOG_TYPE: "One event type this gateway publishes: topic, subjects, contract and the "
                  "JSON Schema of its data.",
}
"""The gateway's own event types without a contract (besides the dead-letter type of
contract violations, which has one): in the AsyncAPI document with an object payload."""


def catalog_subject(gateway_id: str, event_type: str) -> str:
    """The subject (Kafka key) of a catalog entry."""
    return f"gateways/{gateway_id}/types/{event_type}"


def _contracts_and_subjects(files: Sequence[MappingFile], hashes: Mapping[str, str] | None = None,
                            ) -> tuple[dict[str, list[str]], dict[str, Contract],
                                       dict[str, list[dict[str, str]]]]:
    known = dict(hashes or {})
    for f in files:
        if f.path.name not in known:
            known[f.path.name] = mapping_hash(f.path, f.spec)
    subjects: dict[str, list[str]] = {}
    contracts: dict[str, Contract] = {VIOLATION_TYPE: VIOLATION_CONTRACT}
    mapping_files: dict[str, list[dict[str, str]]] = {}
    for f in files:
        digest = known[f.path.name]
        for event in f.spec.events.values():
            subjects.setdefault(event.type, [])
            if f.subject not in subjects[event.type]:
                subjects[event.type].append(f.subject)
            listed = mapping_files.setdefault(event.type, [])
            entry = {"file": f.path.name, "hash": digest}
            if entry not in listed:
                listed.append(entry)
        contracts.update(f.contracts)
    subjects[VIOLATION_TYPE] = [f.subject for f in files]  # any asset's event may break its contract
    mapping_files[VIOLATION_TYPE] = [{"file": f.path.name, "hash": known[f.path.name]}
                                     for f in files]
    return subjects, contracts, mapping_files


def catalog_entries(settings: GatewaySettings, files: Sequence[MappingFile],
                    hashes: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every event type the mapping files can emit (and the contract violation dead letter),
    sorted by type: topic, subjects, the mapping files (with their ``mappinghash``; from
    ``hashes``, file name -> hash, as :attr:`gateway.mapping.engine.Mapper.mapping_hashes` has
    them, else hashed now) and what its contract says (null fields without a contract)."""
    subjects, contracts, mapping_files = _contracts_and_subjects(files, hashes)
    gateway_id = settings.gateway.id
    out = []
    for event_type in sorted(subjects):
        domain, name, major = split_type(event_type)
        contract = contracts.get(event_type)
        c = contract.spec if contract else None
        out.append({
            "type": event_type,
            "domain": domain,
            "name": name,
            "major": major,
            "minor": c.minor if c else None,
            "version": contract.version if contract else None,
            "subjects": sorted(subjects[event_type]),
            "topic": topic_for(settings.kafka.topic_template, event_type, gateway_id),
            "key": "the event's subject (the asset path)",
            "owner": c.owner if c else None,
            "description": c.description if c else None,
            "asset_types": list(c.asset_types) if c else [],
            "expected_rate": c.expected_rate if c else None,
            "deprecated": c.deprecated if c else False,
            "mapping_files": sorted(mapping_files.get(event_type, []), key=lambda m: m["file"]),
            "contract_file": contract.path.name if contract and contract.path else None,
            "data_schema": contract.data_schema() if contract else None,
        })
    return out


# --- the catalog topic --------------------------------------------------------------------------


class CatalogPublisher:
    """The catalog as events, and what changed since the last publication.

    :meth:`changes` returns the entries that are new or differ from the ones it returned
    before, and a ``withdrawn`` entry per type that is gone; the first call returns them all
    (the daemon publishes the whole catalog at every start).
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.published: dict[str, str] = {}
        """Event type -> content hash of the entry last returned."""

    def changes(self, files: Sequence[MappingFile], now: float,
                hashes: Mapping[str, str] | None = None) -> list[DomainEvent]:
        gateway_id = self.settings.gateway.id
        entries = {e["type"]: {"gateway_id": gateway_id, "status": "active", **e}
                   for e in catalog_entries(self.settings, files, hashes)}
        for gone in sorted(set(self.published) - set(entries)):
            entries[gone] = {"gateway_id": gateway_id, "status": "withdrawn", "type": gone}
        out = []
        for event_type, entry in entries.items():
            digest = hashlib.sha256(encode_json(entry)).hexdigest()
            if self.published.get(event_type) == digest:
                continue
            out.append(_entry_event(gateway_id, entry, digest, now))
            self.published[event_type] = digest
        for event_type, entry in entries.items():
            if entry["status"] == "withdrawn":
                del self.published[event_type]
        return out


def _entry_event(gateway_id: str, entry: dict[str, Any], digest: str, now: float) -> DomainEvent:
    subject = catalog_subject(gateway_id, entry["type"])
    return DomainEvent(
        # The id depends on the content only: an unchanged entry published again is a duplicate.
        id=event_id(gateway_id, subject, "catalog", 0.0, "", digest),
        source=f"/gateways/{gateway_id}",
        type=CATALOG_TYPE,
        subject=subject,
        time=now,
        data=entry,
    )


# --- AsyncAPI --------------------------------------------------------------------------------------

_STRING = {"type": "string"}


def _attributes_schema(event_type: str, *, contract: Contract | None, mapped: str,
                       gateway_id: str, provenance: bool) -> tuple[dict[str, Any], list[str]]:
    """The CloudEvents attributes of one event type (without the ``ce_`` prefix) and the
    required ones. ``mapped``: ``required`` (a mapped event type: the mapping provenance
    attributes are always there), ``optional`` (a contract violation dead letter: there when the
    event it replaces had them) or ``none``."""
    props: dict[str, Any] = {
        "specversion": {"type": "string", "const": "1.0"},
        "id": {"type": "string", "description": "deterministic: the same readings give the same "
                                                "id; deduplicate on source + id"},
        "source": {"type": "string", "description": "/gateways/<gateway id>[/connections/<name>]"},
        "type": {"type": "string", "const": event_type},
        "subject": {"type": "string", "description": "the asset path; also the Kafka key"},
        "time": {"type": "string", "format": "date-time"},
        "dataschema": {"type": "string", "format": "uri"},
    }
    required = ["specversion", "id", "source", "type", "subject", "time"]
    if provenance:
        props["gatewayid"] = {"type": "string", "const": gateway_id,
                              "description": "the gateway that sent the event"}
        props["sequence"] = {"type": "string", "pattern": f"^[0-9]{{{SEQUENCE_DIGITS}}}$",
                             "description": "per-gateway send sequence (the buffer seq, "
                                            "zero-padded): strictly increasing over all topics "
                                            "of the gateway; a gap is a lost event"}
        required += ["gatewayid", "sequence"]
    if mapped != "none":
        descriptions = {
            "mappingfile": "the mapping file that produced the event",
            "mappingversion": "the format version of that mapping file",
            "mappinghash": "hash of the mapping file's content (see `digispine-gateway catalog`)",
            "contractversion": "<major>.<minor> of the event type's contract",
            "sourceconnection": "the connection of the reading that fired the event",
            "sourceaddress": "the address (tag) of the reading that fired the event",
        }
        for name in PROVENANCE_ATTRIBUTES:
            props[name] = {"type": "string", "description": descriptions[name]}
        props["mappinghash"]["pattern"] = "^[0-9a-f]{16}$"
        if contract is not None:
            props["contractversion"]["const"] = contract.version
        if mapped == "required":
            required += [n for n in PROVENANCE_ATTRIBUTES
                         if n != "contractversion" or contract is not None]
    return props, required


def _payload_schema(contract: Contract | None, description: str | None) -> dict[str, Any]:
    if contract is None:
        schema: dict[str, Any] = {"type": "object"}
        if description:
            schema["description"] = description
        return schema
    schema = dict(contract.data_schema())
    schema.pop("$schema", None)  # an AsyncAPI schema object is JSON Schema draft 07 already
    return schema


def _message(event_type: str, *, contract: Contract | None, mapped: str, description: str | None,
             settings: GatewaySettings, provenance: bool) -> dict[str, Any]:
    gateway_id = settings.gateway.id
    attrs, required = _attributes_schema(event_type, contract=contract, mapped=mapped,
                                         gateway_id=gateway_id, provenance=provenance)
    payload = _payload_schema(contract, description)
    message: dict[str, Any] = {
        "name": event_type,
        "title": event_type,
    }
    summary = (contract.spec.description if contract else None) or description
    if summary:
        message["summary"] = summary
    if settings.kafka.content_mode == "binary":
        headers = {f"ce_{name}": schema for name, schema in attrs.items()}
        headers["content-type"] = {"type": "string", "const": "application/json"}
        message["contentType"] = "application/json"
        message["headers"] = {"type": "object", "properties": headers,
                              "required": [f"ce_{n}" for n in required] + ["content-type"]}
        message["payload"] = payload
    else:
        message["contentType"] = STRUCTURED_CONTENT_TYPE
        message["headers"] = {"type": "object", "required": ["content-type"], "properties": {
            "content-type": {"type": "string", "const": STRUCTURED_CONTENT_TYPE}}}
        envelope = {**attrs, "datacontenttype": {"type": "string", "const": "application/json"},
                    "data": payload}
        message["payload"] = {"type": "object", "properties": envelope,
                              "required": [*required, "data"]}
    message["correlationId"] = {
        "description": "The CloudEvents id: deduplicate on source + id",
        "location": "$message.header#/ce_id" if settings.kafka.content_mode == "binary"
        else "$message.payload#/id"}
    message["bindings"] = {"kafka": {
        "key": {"type": "string", "description": "the event's subject" + (
            " (gateways/<gateway id>/types/<event type>)" if event_type == CATALOG_TYPE
            else " (the asset path): one asset's events stay in one partition, in order")},
        "bindingVersion": KAFKA_BINDING_VERSION}}
    if contract is not None:
        extensions = {"x-contract-version": contract.version, "x-owner": contract.spec.owner,
                      "x-asset-types": list(contract.spec.asset_types),
                      "x-expected-rate": contract.spec.expected_rate}
        message.update({k: v for k, v in extensions.items() if v not in (None, [])})
        if contract.spec.deprecated:
            message["deprecated"] = True
    return message


def _safe_id(text: str) -> str:
    """A component key AsyncAPI accepts (``^[\\w\\d.\\-_]+$``)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def asyncapi_document(settings: GatewaySettings, files: Sequence[MappingFile], *,
                      provenance: bool = True) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of what this gateway publishes (``provenance``: the records
    carry ``gatewayid`` and ``sequence``, as the daemon sends them)."""
    gateway_id = settings.gateway.id
    kafka = settings.kafka
    entries = catalog_entries(settings, files)
    _, contracts, _ = _contracts_and_subjects(files)
    types: dict[str, tuple[Contract | None, str, str | None]] = {
        e["type"]: (contracts.get(e["type"]), "required", None) for e in entries}
    # A contract violation dead letter keeps the provenance attributes of the event it replaces.
    types[VIOLATION_TYPE] = (VIOLATION_CONTRACT, "optional", None)
    for event_type, about in GATEWAY_TYPES.items():
        types.setdefault(event_type, (None, "none", about))
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event_type in sorted(types):
        contract, mapped, description = types[event_type]
        topic = topic_for(kafka.topic_template, event_type, gateway_id)
        if event_type == CATALOG_TYPE and kafka.catalog_topic:
            topic = kafka.catalog_topic
        elif event_type == DEAD_LETTER_TYPE and kafka.dead_letter_topic:
            topic = kafka.dead_letter_topic
        message_id = _safe_id(event_type)
        messages[message_id] = _message(event_type, contract=contract, mapped=mapped,
                                        description=description, settings=settings,
                                        provenance=provenance)
        channel_id = _safe_id(topic)
        channel = channels.setdefault(channel_id, {
            "address": topic,
            "title": topic,
            "messages": {},
            "bindings": {"kafka": {"topic": topic, "bindingVersion": KAFKA_BINDING_VERSION}},
        })
        channel["messages"][message_id] = {"$ref": f"#/components/messages/{message_id}"}
    for channel_id, channel in channels.items():
        operations[_safe_id(f"send.{channel_id}")] = {
            "action": "send",
            "title": f"publish to {channel['address']}",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{m}"}
                         for m in channel["messages"]],
        }
    secure = kafka.security_protocol in ("SSL", "SASL_SSL")
    servers = {
        _safe_id(f"kafka{i}" if len(kafka.bootstrap_servers) > 1 else "kafka"): {
            "host": server,
            "protocol": "kafka-secure" if secure else "kafka",
            "description": f"bootstrap server ({kafka.security_protocol})",
        }
        for i, server in enumerate(kafka.bootstrap_servers, 1)
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"DigiSpine Edge Gateway {gateway_id}",
            "version": __version__,
            "description": (
                "The events this gateway publishes to Kafka, as CloudEvents 1.0 ("
                f"{kafka.content_mode} content mode of the Kafka protocol binding). Each "
                "message's payload is its data (binary mode) or its whole envelope (structured "
                "mode); its schema is the event type's contract. Deduplicate on source + id; "
                "detect lost events by gaps in the per-gateway sequence across all its topics "
                "(docs/data-products.md)."),
        },
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }

