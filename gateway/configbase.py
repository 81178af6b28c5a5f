"""The base of every config and mapping model: unknown keys are errors, fields are documented."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are rejected (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def exactly_one_of(keys: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` for "exactly one of these optional keys": ``oneOf`` of
    ``required``, and the keys shown without their ``null`` alternative (null means absent,
    never a useful value). ``keys`` is read when the schema is built."""
    def extra(schema: dict[str, Any]) -> None:
        schema["oneOf"] = [{"required": [key]} for key in keys]
        properties = schema.get("properties")
        for key in keys:
            prop = properties.get(key) if isinstance(properties, dict) else None
            if not isinstance(prop, dict) or not isinstance(prop.get("anyOf"), list):
                continue
            kept = [alt for alt in prop.pop("anyOf") if alt != {"type": "null"}]
            prop.pop("default", None)
            prop.update(kept[0] if len(kept) == 1 and isinstance(kept[0], dict) else {"anyOf": kept})
    return extra
