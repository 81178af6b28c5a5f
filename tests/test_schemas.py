"""The JSON Schemas for editors: generated from the models, draft-07 only, committed, in sync."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from gateway import schemas

REPO = Path(__file__).resolve().parent.parent
COMMITTED = {
    "mapping": REPO / "mappings" / "mapping.schema.json",
    "config": REPO / "config" / "config.schema.json",
}
REGENERATE = ("python -c \"from gateway import schemas; "
              "open('{path}','w').write(schemas.render(schemas.{which}_schema()))\"")


@pytest.mark.parametrize("which", ["mapping", "config"])
def test_committed_schema_matches_the_models(which: str) -> None:
    """Change a model, regenerate the committed schema (the message says how)."""
    committed = COMMITTED[which].read_text()
    generated = schemas.render(schemas.SCHEMAS[which]())
    rel = COMMITTED[which].relative_to(REPO)
    assert committed == generated, "schema drifted; run: " + REGENERATE.format(path=rel, which=which)


def _keywords(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("properties", "patternProperties", "definitions"):
                for sub in value.values():
                    _keywords(sub, out)
            elif key not in ("examples", "default", "const", "enum"):
                out.add(key)
                _keywords(value, out)
            else:
                out.add(key)
    elif isinstance(node, list):
        for item in node:
            _keywords(item, out)
    return out


@pytest.mark.parametrize("which", ["mapping", "config"])
def test_schema_uses_draft_07_keywords_only(which: str) -> None:
    """yaml-language-server validates with draft-07: $defs, discriminator and friends break it."""
    schema = schemas.SCHEMAS[which]()
    jsonschema.Draft7Validator.check_schema(schema)
    assert _keywords(schema, set()) <= schemas.DRAFT_07_KEYWORDS


def _described(node: Any, path: str, missing: list[str]) -> None:
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            if "description" not in sub:
                missing.append(f"{path}.{name}")
            _described(sub, f"{path}.{name}", missing)
        for name, sub in node.get("definitions", {}).items():
            _described(sub, name, missing)


def test_every_mapping_field_is_described() -> None:
    missing: list[str] = []
    _described(schemas.mapping_schema(), "", missing)
    assert not missing


def test_shipped_examples_validate_and_a_typo_does_not() -> None:
    """What the editor will say: the examples are clean, an unknown key is flagged."""
    validator = jsonschema.Draft7Validator(schemas.mapping_schema())
    yaml = YAML(typ="safe")
    examples = sorted((REPO / "mappings").glob("*.yaml"))
    assert examples
    for path in examples:
        assert list(validator.iter_errors(yaml.load(path))) == [], path
        assert path.read_text().startswith("# yaml-language-server: $schema=./mapping.schema.json")
    doc = yaml.load(examples[0])
    doc["signals"][next(iter(doc["signals"]))]["unti"] = "degC"
    errors = list(validator.iter_errors(doc))
    assert errors and "unti" in errors[0].message
    config = yaml.load(REPO / "config" / "gateway.yaml")
    assert list(jsonschema.Draft7Validator(schemas.config_schema()).iter_errors(config)) == []


def test_schema_command_prints_the_committed_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "schema", "mapping"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out) == json.loads(COMMITTED["mapping"].read_text())
