"""Mapping files and the engine that applies them: shop-floor Signals to business DomainEvents.

- :mod:`gateway.mapping.spec`: the file format (pydantic models; the JSON Schema comes from them);
- :mod:`gateway.mapping.loader`: :func:`load_mappings` reads a directory, validates and
  cross-checks every file, and reports every located problem at once;
- :mod:`gateway.mapping.engine`: :class:`Mapper` turns each Signal into zero or more events.

The format is documented for users in ``docs/mapping.md``.
"""

from gateway.mapping.engine import ConversionError, Mapper
from gateway.mapping.loader import MappingFile, load_mappings
from gateway.mapping.spec import MappingSpec

__all__ = ["ConversionError", "Mapper", "MappingFile", "MappingSpec", "load_mappings"]
