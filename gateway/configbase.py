"""The base of every config and mapping model: unknown keys are errors, fields are documented."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are rejected (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
