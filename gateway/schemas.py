"""JSON Schemas of mapping files and of the config, generated from the models, for editors.

The schemas are limited to JSON Schema draft-07 keywords, because the YAML language server
(VS Code's YAML extension) validates with draft-07: pydantic's ``$defs`` become ``definitions``
and its OpenAPI-only ``discriminator`` hint is dropped (``oneOf`` with ``const`` tags carries the
same rule). The committed copies (``mappings/mapping.schema.json``, ``config/config.schema.json``)
are checked against these functions by a test; ``digispine-gateway schema mapping|config`` prints
them.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

DRAFT_07 = "http://json-schema.org/draft-07/schema#"

# Every keyword of JSON Schema draft-07 (validation, annotation, structure).
DRAFT_07_KEYWORDS = frozenset({
    "$schema", "$id", "$ref", "$comment", "title", "description", "default", "examples",
    "readOnly", "writeOnly", "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum",
    "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern", "items", "additionalItems",
    "maxItems", "minItems", "uniqueItems", "contains", "maxProperties", "minProperties",
    "required", "properties", "patternProperties", "additionalProperties", "dependencies",
    "propertyNames", "if", "then", "else", "allOf", "anyOf", "oneOf", "not", "format",
    "contentMediaType", "contentEncoding", "definitions",
})


def _draft07(node: Any) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "discriminator":
                continue
            if key == "$defs":
                key = "definitions"
            if key == "$ref" and isinstance(value, str):
                value = value.replace("#/$defs/", "#/definitions/")
            if key in ("properties", "patternProperties", "$defs", "definitions"):
                out[key] = {name: _draft07(sub) for name, sub in value.items()}
            elif key in ("examples", "default", "const", "enum"):
                out[key] = value  # data, not schema
            else:
                out[key] = _draft07(value)
        return out
    if isinstance(node, list):
        return [_draft07(v) for v in node]
    return node


def schema_of(model: type[BaseModel], title: str, schema_id: str) -> dict[str, Any]:
    raw = model.model_json_schema()
    body = _draft07(raw)
    return {"$schema": DRAFT_07, "$id": schema_id, **body, "title": title}


def mapping_schema() -> dict[str, Any]:
    from gateway.mapping.spec import MappingSpec

    return schema_of(MappingSpec, "DigiSpine gateway mapping file",
                     "https://digispine.example/schemas/gateway/mapping.schema.json")


def config_schema() -> dict[str, Any]:
    from gateway.settings import GatewaySettings

    return schema_of(GatewaySettings, "DigiSpine gateway configuration",
                     "https://digispine.example/schemas/gateway/config.schema.json")


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


SCHEMAS = {"mapping": mapping_schema, "config": config_schema}
