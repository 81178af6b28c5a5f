"""YAML files with line and column marks, for errors that point at the offending key.

ruamel.yaml keeps the position of every mapping key and sequence item and refuses duplicate
keys (PyYAML silently keeps the last one). :func:`load` returns plain Python data plus a
:class:`Located` view used to turn a pydantic error location (``("events", "x", "trigger")``)
into ``file:line:col``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from gateway.errors import ConfigError, Finding


class Located:
    """A loaded YAML document that can say where a path of keys is in its file."""

    def __init__(self, file: str, root: Any) -> None:
        self.file = file
        self.root = root

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
    yaml = YAML(typ="rt")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Finding(name, None, None, "", f"cannot read file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Finding(name, None, None, "", f"not UTF-8 text: {exc.reason}")]) from None
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
    try:
        return _plain(root), Located(name, root)
    except RecursionError:
        raise ConfigError([Finding(name, None, None, "", "YAML: an alias refers to itself "
                                   "(recursive anchor), or the document is nested too deeply")]) from None


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
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
