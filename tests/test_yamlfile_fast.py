"""The fast YAML path (libyaml, YAML 1.2 core schema) gives exactly ruamel's data, or steps
aside; the shipped files all take it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import yamlfile
from gateway.errors import ConfigError
from tests.test_mapping_fuzz import spliced_shipped, yamlish

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*REPO.glob("mappings/**/*.yaml"), *REPO.glob("config/*.yaml")])


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def ruamel_data(text: str) -> Any:
    return yamlfile._plain(yamlfile._ruamel(text, "t.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_files_take_the_fast_path_with_ruamels_data(path: Path) -> None:
    text = path.read_text()
    assert same(yamlfile.fast_load(text), ruamel_data(text))


SCALARS = ["on", "yes", "010", "0o17", "0x1F", "1_000", "1:30", "2001-12-14", "1e3", "-.5e+3",
           ".inf", "-.INF", ".NaN", "~", "null", "", "True", "FALSE", "'1'", '"x"', "1.", "+1",
           "!!str 5", "!!int '7'", "!custom x", "&a 1", "*a", "<<: {k: 1}", "[1, 2]", "{a: b}"]


@st.composite
def scalar_documents(draw: st.DrawFn) -> str:
    keys = draw(st.lists(st.sampled_from(["a", "b", "c", "on", "1", "true"]), min_size=1, max_size=4))
    return "\n".join(f"{k}: {draw(st.sampled_from(SCALARS))}" for k in keys) + "\n"


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(scalar_documents(), yamlish(), spliced_shipped(), st.text(max_size=40)))
def test_the_fast_path_agrees_with_ruamel_or_steps_aside(text: str) -> None:
    try:
        fast = yamlfile.fast_load(text)
    except yamlfile._NotPlain:
        return  # ruamel decides
    try:
        slow = ruamel_data(text)
    except (ConfigError, RecursionError) as exc:
        raise AssertionError(f"fast path took {text!r}, ruamel refuses it: {exc}") from None
    assert same(fast, slow), (text, fast, slow)


def test_a_finding_on_a_fast_loaded_file_is_still_located(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\nasset:\n  subject: x\n  colour: red\n")
    data, located = yamlfile.load(path)
    assert data["asset"]["colour"] == "red"
    assert located.finding(["asset", "colour"], "unknown key").line == 4


def test_duplicate_keys_still_fail_with_their_location(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError) as err:
        yamlfile.load(path)
    (finding,) = err.value.findings
    assert finding.line == 3 and "duplicate" in finding.message
