"""YAML files with line and column marks, for errors that point at the offending key.

ruamel.yaml keeps the position of every mapping key and sequence item and refuses duplicate
keys (PyYAML silently keeps the last one). :func:`load` returns plain Python data plus a
:class:`Located` view used to turn a pydantic error location (``("events", "x", "trigger")``)
into ``file:line:col``.

ruamel's pure-Python round-trip parser costs about 50-100 ms per mapping file (a plant with a
thousand files would wait a minute at every start and reload), and the marks are needed only
when something is wrong. So :func:`load` first parses with PyYAML's libyaml (C) parser under
YAML 1.2 core-schema rules (ruamel's: ``on``/``yes`` are strings, ``010`` is ten), building
plain data itself; anything it does not handle plainly (a duplicate key, a merge key, a custom
tag, a timestamp, an integer with a base prefix, a leading zero or an underscore, a tab, a
syntax error) goes to ruamel, whose result and errors are authoritative. On the fast path the ruamel
parse for the marks happens only when a finding needs a position. A test checks both paths
give the same data for every shipped file and for generated YAML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError

from gateway.errors import ConfigError, Finding


class Located:
    """A loaded YAML document that can say where a path of keys is in its file."""

    def __init__(self, file: str, root: Any, parse: Callable[[], Any] | None = None) -> None:
        self.file = file
        self._root = root
        self._parse = parse

    @property
    def root(self) -> Any:
        """The ruamel document (parsed on first use when the fast path loaded the file)."""
        if self._parse is not None:
            parse, self._parse = self._parse, None
            try:
                self._root = parse()
            except ConfigError:  # ruamel refuses what libyaml took: no marks, no crash
                self._root = None
        return self._root

    def position(self, path: Sequence[str | int]) -> tuple[int | None, int | None]:
        """1-based line and column of the deepest existing node on ``path``."""
        node = self.root
        line: int | None = 1 if node is not None else None
        col: int | None = 1 if node is not None else None
        for key in path:
            if isinstance(node, CommentedMap) and key in node:
                ln, cl = node.lc.key(key)
                line, col = ln + 1, cl + 1
                node = node[key]
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
                ln, cl = node.lc.item(key)
                line, col = ln + 1, cl + 1
                node = node[key]
            else:
                break
        return line, col

    def value_position(self, path: Sequence[str | int]) -> tuple[int | None, int | None]:
        """Like :meth:`position`, but of the value when the last key is a mapping key."""
        parent_path, last = path[:-1], path[-1] if path else None
        node = self.root
        for key in parent_path:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return self.position(path)
        if isinstance(node, CommentedMap) and last in node:
            ln, cl = node.lc.value(last)
            return ln + 1, cl + 1
        return self.position(path)

    def finding(self, path: Sequence[str | int], message: str, *, at_value: bool = False) -> Finding:
        line, col = self.value_position(path) if at_value else self.position(path)
        return Finding(self.file, line, col, dotted(path), message)


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def load(path: Path, display: str | None = None) -> tuple[Any, Located]:
    """Parse ``path``; raise :class:`ConfigError` (located) on syntax errors or duplicate keys."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Finding(name, None, None, "", f"cannot read file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Finding(name, None, None, "", f"not UTF-8 text: {exc.reason}")]) from None
    try:
        data = fast_load(text)
    except _NotPlain:
        pass
    else:
        return data, Located(name, None, lambda: _ruamel(text, name))
    root = _ruamel(text, name)
    try:
        return _plain(root), Located(name, root)
    except RecursionError:
        raise ConfigError([Finding(name, None, None, "", "YAML: an alias refers to itself "
                                   "(recursive anchor), or the document is nested too deeply")]) from None


def _ruamel(text: str, name: str) -> Any:
    """The round-trip document of ``text`` (with marks); located ``ConfigError`` on errors."""
    yaml = YAML(typ="rt")
    try:
        root = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        problem = problem.replace("\n", " ")
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        raise ConfigError([Finding(name, line, col, "", f"YAML syntax: {problem}")]) from None
    except Exception as exc:  # noqa: BLE001 - ruamel raises a few unmarked error types
        raise ConfigError([Finding(name, None, None, "", f"YAML syntax: {exc}")]) from None
    return root


# -- the fast path: libyaml's parser, YAML 1.2 core schema, plain cases only ------------------


class _NotPlain(Exception):
    """The fast path leaves this text to ruamel."""


_TAG = "tag:yaml.org,2002:"
_RESOLVERS = (  # ruamel's YAML 1.2 implicit resolvers
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("float", r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", "-+0123456789."),
    ("int", r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0o?[0-7_]+
        |[-+]?[0-9_]+
        |[-+]?0x[0-9a-fA-F_]+)$""", "-+0123456789"),
    ("merge", r"^(?:<<)$", "<"),
    ("null", r"^(?: ~ |null|Null|NULL | )$", "~nN"),
    ("timestamp", r"""^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
        |[0-9][0-9][0-9][0-9] -[0-9][0-9]? -[0-9][0-9]?
        (?:[Tt]|[ \t]+)[0-9][0-9]?
        :[0-9][0-9] :[0-9][0-9] (?:\.[0-9]*)?
        (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$""", "0123456789"),
)
_PLAIN_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
_PLAIN_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+"
                          r"|\.[0-9]+(?:[eE][-+][0-9]+)?)$")
_SPECIAL_FLOAT = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}

try:
    import yaml as _pyyaml

    class _FastLoader(getattr(_pyyaml, "CSafeLoader", _pyyaml.SafeLoader)):  # type: ignore[misc]
        yaml_implicit_resolvers: ClassVar[dict[Any, Any]] = {}

    for _kind, _regexp, _first in _RESOLVERS:
        _FastLoader.add_implicit_resolver(_TAG + _kind, re.compile(_regexp, re.X), list(_first))
    _FastLoader.add_implicit_resolver(_TAG + "null", re.compile("^$"), [""])
except ImportError:  # pragma: no cover - PyYAML is a dependency; ruamel alone still works
    _pyyaml = None  # type: ignore[assignment]


def fast_load(text: str) -> Any:
    """Plain data of a single-document YAML ``text`` by the fast path, or :class:`_NotPlain`
    when ruamel must decide (see the module docstring)."""
    if _pyyaml is None or "\t" in text:  # libyaml takes tabs where ruamel refuses them
        raise _NotPlain
    try:
        node = _pyyaml.compose(text, Loader=_FastLoader)
        return None if node is None else _construct(node)
    except (_pyyaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
        raise _NotPlain from exc


def _construct(node: Any) -> Any:
    tag = node.tag
    if tag == _TAG + "map":
        out: dict[str, Any] = {}
        raw_keys: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                raise _NotPlain
            raw = _construct(key_node)
            if isinstance(raw, (dict, list)):
                raise _NotPlain
            key = raw if isinstance(raw, str) else str(raw)
            if key in out or raw in raw_keys:  # 1 and true are one key to ruamel
                raise _NotPlain  # a duplicate key: ruamel reports it, located
            raw_keys.add(raw)
            out[key] = _construct(value_node)
        return out
    if tag == _TAG + "seq":
        return [_construct(item) for item in node.value]
    value = node.value
    if tag == _TAG + "str":
        return value
    if tag == _TAG + "null":
        return None
    if tag == _TAG + "bool":
        if value in ("true", "True", "TRUE"):
            return True
        if value in ("false", "False", "FALSE"):
            return False
    elif tag == _TAG + "int":
        if _PLAIN_INT.match(value):
            return int(value)
    elif tag == _TAG + "float":
        special = _SPECIAL_FLOAT.get(value.lower())
        if special is not None:
            return special
        if _PLAIN_FLOAT.match(value):
            return float(value)
    raise _NotPlain  # anything else (timestamps, custom tags, 0x10, 1_000, 010, .NaN forms)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, TaggedScalar) and getattr(node.tag, "value", node.tag) == _TAG + "str":
        return str(node.value)  # an explicit !!str: the string, as any other
    if node is not None and type(node).__module__.startswith("ruamel"):
        # ScalarFloat, ScalarBoolean, TaggedScalar...: hand pydantic the builtin value.
        for base in (bool, int, float, str):
            if isinstance(node, base):
                return base(node)
    return node


def findings_from_validation(
    error: ValidationError, located: Located, *, prefix: Sequence[str | int] = ()
) -> list[Finding]:
    """Turn every pydantic error into a located, human-worded finding."""
    out: list[Finding] = []
    for err in error.errors(include_url=False):
        loc, message, at_value = normalize(err)
        out.append(located.finding([*prefix, *loc], message, at_value=at_value))
    return out


def normalize(err: Any) -> tuple[list[str | int], str, bool]:
    """(YAML path, message, whether to point at the value rather than the key) of one error."""
    loc = _clean_loc(err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "union_tag_invalid":
        key = str(ctx.get("discriminator", "")).strip("'")
        return [*loc, key], f"expected one of {ctx.get('expected_tags')}, got {ctx.get('tag')!r}", True
    if kind == "union_tag_not_found":
        key = str(ctx.get("discriminator", "")).strip("'")
        return [*loc, key], "required key is missing", False
    return loc, describe(err), kind not in ("extra_forbidden", "missing")


def _clean_loc(loc: Sequence[Any]) -> list[str | int]:
    # pydantic adds union-member and tagged-union tags to the location; they are not YAML keys.
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        out.append(part)
    return out


def describe(err: Any) -> str:
    """A short 'expected X, got Y' sentence for one pydantic error."""
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see the schema for the allowed keys)"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    if kind.startswith("value_error"):
        msg = msg.removeprefix("Value error, ")
    if isinstance(got, (dict, list)) or got is None:
        return msg
    return f"{msg}, got {got!r}"
