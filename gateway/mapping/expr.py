"""Expressions of mapping files: a typed subset of CEL, checked at load, evaluated without eval.

Mapping files use expressions for trigger conditions (``when: "part_present == false &&
cycle_time_s > 0.0"``) and computed data fields (``{expr: "temperature_c * 1.8 + 32.0"}``).
The language is CEL, Google's Common Expression Language (the one of Kubernetes and Envoy):
side-effect free, not Turing complete, specified at https://github.com/google/cel-spec.
``docs/expressions.md`` is the user's view; this module is the engine's:

- :func:`compile_expr` parses the text with CEL's grammar (the ``cel.lark`` grammar that
  ``cel-python`` ships, run by ``lark``), checks names and types against the declared
  :class:`Variable` s, and builds a tree of small closures. Every problem is an
  :class:`ExprError` with a human message and a column, raised when the file is loaded.
- :meth:`CompiledExpr.evaluate` runs the closures: no parsing, no ``eval``, no dispatch on
  node kinds; a condition such as ``a > 1.0 && b < 2.0`` costs well under a microsecond. It
  returns a value of :attr:`CompiledExpr.result_type` or raises :class:`EvalError` (a signal
  without a value, division by zero, overflow, a value of the wrong type), nothing else.

Why not the candidates' own evaluators: ``cel-python`` interprets its parse tree (100-160 µs
per evaluation, the engine maps ~800k signals/s); ``common-expression-language`` (Rust) is
fast but has no type checker nor parse tree, so load-time errors would come at run time;
``cel-expr-python`` (Google's C++ CEL) checks types but answers ``temperature_c > 80`` with
"found no matching overload for '_>_' applied to '(double, int)'", gives no parse tree to
improve on that, and weighs 50 MB. Figures and the comparison: ``docs/expressions.md``.

The subset (CEL semantics unless said otherwise):

- types: ``float`` signals are CEL ``double``, ``integer`` signals CEL ``int`` (64-bit),
  ``boolean`` is ``bool``, ``string`` is ``string``; list literals only after ``in``;
- literals: integers (decimal, ``0x`` hex), floats, strings (with CEL escapes, raw and
  triple-quoted), ``true``, ``false``, ``null`` (only in ``x == null`` / ``x != null``);
- operators: ``! - * / % + - < <= > >= == != in && || ? :`` with CEL precedence;
  ``//`` comments;
- functions: ``abs(x)``, ``min(a, b, ...)``, ``max(a, b, ...)`` (environment functions, as
  CEL allows; CEL's own spelling is ``math.abs``/``math.least``/``math.greatest``),
  ``int(x)``, ``double(x)`` (CEL's conversions, numbers only).

Deliberate differences from CEL (apart from these, an expression both accept gives the same
result; checked once, not in the test suite, by a differential fuzz against the Rust CEL):

- an integer *literal* next to a float reads as a float (``t * 2`` is ``t * 2.0``); CEL
  refuses ``double * int``. Integer *signals* still need ``double(count)`` to mix with floats;
- ``x / 0.0`` is an error (CEL: infinity), and so is any non-finite float result;
- parts made of literals only are computed at load, so ``1 / 0`` is a load error even
  where CEL would skip it (``true || 1 / 0 > 0``);
- ordering booleans (``false < true``) and comparing a non-nullable variable with null are
  refused at load, as mistakes.

Errors at evaluation follow CEL: an error is absorbed by ``&&``/``||`` when the other side
decides the result (``false && <error>`` is false, in either order), and by ``? :`` when it
is in the branch not taken; otherwise the whole evaluation is that error.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

import lark
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedToken

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "CompiledExpr",
    "EvalError",
    "EvalReason",
    "ExprError",
    "ResultKind",
    "ValueType",
    "Variable",
    "compile_expr",
]

ValueType = Literal["float", "integer", "boolean", "string"]
"""The type of a variable and of a result, in the words of mapping files (``signals.<s>.type``)."""

ResultKind = Literal["boolean", "number", "any"]
"""What the caller needs: ``boolean`` for conditions, ``number`` (integer or float), ``any``."""

EvalReason = Literal["no_value", "bad_value", "division_by_zero", "overflow"]
"""Why an evaluation failed (:attr:`EvalError.reason`)."""

MAX_LENGTH = 2000
"""Longest expression text accepted, in characters."""

MAX_DEPTH = 100
"""Deepest nesting of operations accepted (``a + b + c`` is 2 deep)."""

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

FUNCTIONS = ("abs", "min", "max", "int", "double")
"""The functions expressions may call."""

_VALUE_TYPES = frozenset({"float", "integer", "boolean", "string"})


class ExprError(ValueError):
    """An expression that cannot be compiled: bad syntax, unknown name, wrong types.

    ``message`` is for the person who wrote the expression. ``column`` is the 1-based
    position of the offending character within the expression text (a newline counts as one
    character), or None when the problem is the whole text.
    """

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


class EvalError(Exception):
    """An evaluation that has no result; the only exception :meth:`CompiledExpr.evaluate` raises.

    ``reason`` says why, for counting:

    - ``no_value``: a variable the result needs is None or missing from the values (a signal
      that has not reported yet: expected after start, not a fault);
    - ``bad_value``: a value is not of its variable's declared type (a bug in the caller);
    - ``division_by_zero``: ``/`` or ``%`` by zero;
    - ``overflow``: an integer outside the 64-bit range, or a float result that is not finite.

    ``name`` is the variable concerned, for ``no_value`` and ``bad_value``.
    """

    def __init__(self, reason: EvalReason, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.reason: EvalReason = reason
        self.message = message
        self.name = name


@dataclass(frozen=True, slots=True)
class Variable:
    """A name an expression may read, with the type its values have.

    ``nullable`` variables may be compared with null (``x != null``); a signal is nullable
    (it has no value until its first good reading). Whatever ``nullable`` says, evaluating
    with a None value for a variable the result needs raises ``EvalError("no_value")``.
    """

    name: str
    type: ValueType
    nullable: bool = True


_Fn = Callable[[Mapping[str, Any]], Any]


class CompiledExpr:
    """A checked expression, ready to evaluate many times.

    ``names``: the variables it reads; ``result_type``: the type of what :meth:`evaluate`
    returns (``float`` results are Python floats, ``integer`` results ints, and so on);
    ``text``: the source.
    """

    __slots__ = ("_fn", "names", "result_type", "text")

    def __init__(self, text: str, fn: _Fn, names: frozenset[str], result_type: ValueType) -> None:
        self.text = text
        self.names = names
        self.result_type: ValueType = result_type
        self._fn = fn

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """The value of the expression for these variable values (name -> value).

        Returns a ``bool``, ``int``, ``float`` or ``str`` as :attr:`result_type` says, never
        None. Raises :class:`EvalError`, and nothing else, when there is no such value.
        Names the expression does not read are ignored; a name it reads may be missing (it
        then counts as None).
        """
        try:
            return self._fn(values)
        except EvalError:
            raise
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as exc:
            # Unreachable with a dict of declared values; a caller passing an odd mapping
            # still gets the documented exception.
            raise EvalError("bad_value", f"cannot evaluate with these values: {exc}") from exc
        except RecursionError as exc:
            raise EvalError("bad_value", "no stack left to evaluate the expression") from exc

    def __repr__(self) -> str:
        return f"CompiledExpr({self.text!r}, result_type={self.result_type!r})"


def compile_expr(
    text: str, variables: Mapping[str, Variable], *, result: ResultKind = "any"
) -> CompiledExpr:
    """Parse and check ``text``; the result evaluates fast and never raises but EvalError.

    ``variables`` maps each name the expression may use to its :class:`Variable` (the key
    is the name). ``result`` is what the caller needs: ``boolean`` for a condition,
    ``number`` for a numeric field, ``any`` for a field of any type.

    Raises :class:`ExprError` for anything wrong in ``text``: syntax, unknown names (with a
    suggestion), operands of the wrong type, a result of the wrong type.
    """
    for key, variable in variables.items():
        if key != variable.name:
            raise ValueError(f"variables[{key!r}] is Variable {variable.name!r}")
        if variable.type not in _VALUE_TYPES:
            raise ValueError(f"variable {key!r} has the unknown type {variable.type!r}")
    if len(text) > MAX_LENGTH:
        raise ExprError(
            f"the expression is too long ({len(text)} characters; at most {MAX_LENGTH})"
        )
    try:
        try:
            tree = _parser().parse(text)
        except LarkError as exc:
            raise _syntax_error(text, exc) from None
        node = _Converter(text).node(tree)
        checker = _Checker(text, variables)
        typed = checker.check(node, 0)
    except RecursionError:
        raise ExprError(
            f"the expression is nested too deeply (more than {MAX_DEPTH} levels)"
        ) from None
    result_type = _result_type(text, node, typed, result)
    fn = typed.fn
    if result_type == "float":
        fn = _finite(fn)
    return CompiledExpr(text, fn, frozenset(checker.names), result_type)


# --------------------------------------------------------------------------------------------
# Parsing: CEL's grammar, run by lark, turned into a small tree of our own


@cache
def _parser() -> lark.Lark:
    """The LALR parser of CEL's grammar (built once, ~0.1 s; parsing is then ~0.1 ms)."""
    grammar = importlib.metadata.distribution("cel-python").locate_file("celpy/cel.lark")
    return lark.Lark(
        Path(str(grammar)).read_text(encoding="utf-8"),
        parser="lalr",
        start="expr",
        propagate_positions=True,
        maybe_placeholders=False,
        priority="invert",
        g_regex_flags=re.M,
        lexer_callbacks={"IDENT": _bool_literal},
    )


def _bool_literal(token: lark.Token) -> lark.Token:
    # The grammar's lexer sees ``true``/``false`` as identifiers; cel-python retypes them the
    # same way, but this keeps the token's position.
    if token.value in ("true", "false"):
        return lark.Token.new_borrow_pos("BOOL_LIT", token.value, token)
    return token


@dataclass(frozen=True, slots=True)
class _Node:
    start: int  # offset of the first character (its parentheses included)
    end: int  # offset after the last character


@dataclass(frozen=True, slots=True)
class _Lit(_Node):
    value: Any
    type: str  # a ValueType, or "null"
    int_literal: bool  # a whole number written without a decimal point: may read as a float


@dataclass(frozen=True, slots=True)
class _Name(_Node):
    name: str


@dataclass(frozen=True, slots=True)
class _Unary(_Node):
    op: str
    arg: _Node


@dataclass(frozen=True, slots=True)
class _Binary(_Node):
    op: str
    op_pos: int
    left: _Node
    right: _Node


@dataclass(frozen=True, slots=True)
class _Cond(_Node):
    op_pos: int  # the '?'
    test: _Node
    then: _Node
    other: _Node


@dataclass(frozen=True, slots=True)
class _Call(_Node):
    func: str
    args: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _List(_Node):
    items: tuple[_Node, ...]


_PASS_THROUGH = frozenset(
    {
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
    }
)
_LOGIC = {"conditionalor": "||", "conditionaland": "&&"}
_OPERATOR_RULES = {
    "relation_lt": "<", "relation_le": "<=", "relation_gt": ">", "relation_ge": ">=",
    "relation_eq": "==", "relation_ne": "!=", "relation_in": "in",
    "addition_add": "+", "addition_sub": "-",
    "multiplication_mul": "*", "multiplication_div": "/", "multiplication_mod": "%",
}  # fmt: skip
_UNSUPPORTED = {
    "member_dot": "field selection ('a.b') is not supported: use a signal's name, "
    "e.g. temperature_c",
    "member_dot_arg": "method calls ('x.f()') are not supported; functions: "
    + ", ".join(FUNCTIONS),
    "member_index": "indexing ('a[i]') is not supported",
    "member_object": "messages ('Type{field: value}') are not supported",
    "dot_ident": "a leading '.' is not supported: use the plain name",
    "dot_ident_arg": "a leading '.' is not supported: use the plain name",
    "map_lit": "maps ('{key: value}') are not supported",
}
_METHOD_HINTS = {"abs": "abs", "least": "min", "greatest": "max"}


class _Converter:
    """lark's parse tree (one level per precedence rule) to :class:`_Node` s."""

    def __init__(self, text: str) -> None:
        self.text = text

    def node(self, tree: lark.Tree[lark.Token] | lark.Token) -> _Node:
        while (
            isinstance(tree, lark.Tree) and tree.data in _PASS_THROUGH and len(tree.children) == 1
        ):
            tree = tree.children[0]
        if isinstance(tree, lark.Token):  # pragma: no cover - the grammar wraps every token
            raise ExprError(f"unexpected {tree.value!r}", _column(tree.start_pos))
        data, kids = str(tree.data), tree.children
        if data == "expr" and len(kids) == 3:
            test, then, other = (self.node(k) for k in kids)
            return _Cond(test.start, other.end, self._op_at(test.end), test, then, other)
        if data in _LOGIC and len(kids) == 2:
            return self._binary(_LOGIC[data], kids[0], kids[1])
        if data in ("relation", "addition", "multiplication") and len(kids) == 2:
            op_tree = kids[0]
            assert isinstance(op_tree, lark.Tree)
            return self._binary(_OPERATOR_RULES[str(op_tree.data)], op_tree.children[0], kids[1])
        if data == "unary" and len(kids) == 2:
            op_tree, arg = kids[0], self.node(kids[1])
            assert isinstance(op_tree, lark.Tree)
            start = _meta_start(op_tree, arg.start - 1)
            return _Unary(start, arg.end, "!" if op_tree.data == "unary_not" else "-", arg)
        if data == "literal":
            token = kids[0]
            assert isinstance(token, lark.Token)
            return _literal(token)
        if data == "ident":
            token = kids[0]
            assert isinstance(token, lark.Token)
            return _Name(_start(token), _end(token), token.value)
        if data == "ident_arg":
            token = kids[0]
            assert isinstance(token, lark.Token)
            args = self._list(kids[1:])
            return _Call(_start(token), _meta_end(tree, _end(token)), token.value, args)
        if data == "paren_expr":
            inner = self.node(kids[0])
            return replace(
                inner, start=_meta_start(tree, inner.start), end=_meta_end(tree, inner.end)
            )
        if data == "list_lit":
            start = _meta_start(tree, 0)
            return _List(start, _meta_end(tree, start + 1), self._list(kids))
        start = _meta_start(tree, 0)
        message = _UNSUPPORTED.get(data, "this is not supported in mapping expressions")
        method = kids[1] if data == "member_dot_arg" and len(kids) >= 2 else None
        if isinstance(method, lark.Token):
            hint = _METHOD_HINTS.get(method.value)
            if hint and self.text[start : start + 5] == "math.":
                message = f"write {hint}(...) for CEL's math.{method.value}(...)"
            else:
                start = _start(method)
                message = (
                    f"method calls ('.{method.value}()') are not supported; functions: "
                    + ", ".join(FUNCTIONS)
                )
        raise ExprError(message, _column(start))

    def _binary(
        self,
        op: str,
        left_tree: lark.Tree[lark.Token] | lark.Token,
        right_tree: lark.Tree[lark.Token] | lark.Token,
    ) -> _Binary:
        left, right = self.node(left_tree), self.node(right_tree)
        return _Binary(left.start, right.end, op, self._op_at(left.end), left, right)

    def _list(self, kids: list[lark.Tree[lark.Token] | lark.Token]) -> tuple[_Node, ...]:
        if not kids:
            return ()
        exprlist = kids[0]
        assert isinstance(exprlist, lark.Tree)
        return tuple(self.node(k) for k in exprlist.children)

    def _op_at(self, offset: int) -> int:
        """The offset of the operator that follows ``offset`` (past blanks and comments)."""
        text, n = self.text, len(self.text)
        while offset < n:
            if text[offset].isspace():
                offset += 1
            elif text.startswith("//", offset):
                newline = text.find("\n", offset)
                offset = n if newline < 0 else newline + 1
            else:
                break
        return offset


def _start(token: lark.Token) -> int:
    return token.start_pos if token.start_pos is not None else 0


def _end(token: lark.Token) -> int:
    return token.end_pos if token.end_pos is not None else _start(token) + len(token.value)


def _meta_start(tree: lark.Tree[lark.Token], default: int) -> int:
    start = getattr(tree.meta, "start_pos", None)
    return start if isinstance(start, int) else default


def _meta_end(tree: lark.Tree[lark.Token], default: int) -> int:
    end = getattr(tree.meta, "end_pos", None)
    return end if isinstance(end, int) else default


def _column(offset: int | None) -> int | None:
    return None if offset is None else offset + 1


def _literal(token: lark.Token) -> _Lit:
    start, end, text, kind = _start(token), _end(token), token.value, token.type
    if kind == "INT_LIT":
        digits = text.lstrip("-")
        value = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits, 10)
        value = -value if text.startswith("-") else value
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ExprError(
                f"the integer {text} is out of range ({_INT64_MIN} to {_INT64_MAX}); "
                f"write {text}.0 for a float",
                _column(start),
            )
        return _Lit(start, end, value, "integer", True)
    if kind == "FLOAT_LIT":
        number = float(text)
        if not math.isfinite(number):
            raise ExprError(f"the number {text} is too large", _column(start))
        return _Lit(start, end, number, "float", False)
    if kind in ("STRING_LIT", "MLSTRING_LIT"):
        return _Lit(start, end, _decode_string(text, start), "string", False)
    if kind == "BOOL_LIT":
        return _Lit(start, end, text == "true", "boolean", False)
    if kind == "NULL_LIT":
        return _Lit(start, end, None, "null", False)
    if kind == "UINT_LIT":
        raise ExprError(
            f"unsigned integers ({text}) are not supported: write {text[:-1]}", _column(start)
        )
    if kind == "BYTES_LIT":
        raise ExprError('byte strings (b"...") are not supported: write a string', _column(start))
    raise ExprError(f"unexpected {text!r}", _column(start))  # pragma: no cover


_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    '"': '"', "'": "'", "\\": "\\", "?": "?", "`": "`",
}  # fmt: skip
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|([0-3][0-7]{2}))")


def _decode_string(text: str, start: int) -> str:
    """A CEL string literal's value: quotes removed, escapes (unless raw) decoded."""
    raw = text[0] in "rR"
    prefix = 1 if raw else 0
    quote = text[prefix : prefix + 3]
    if quote not in ('"""', "'''"):
        quote = text[prefix]
    body = text[prefix + len(quote) : len(text) - len(quote)]
    if raw or "\\" not in body:
        return body
    offset = start + prefix + len(quote)
    out: list[str] = []
    i = 0
    while (j := body.find("\\", i)) >= 0:
        out.append(body[i:j])
        following = body[j + 1 : j + 2]
        if following in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[following])
            i = j + 2
            continue
        match = _ESCAPE.match(body, j)
        if match is None:
            shown = body[j : j + 2]
            raise ExprError(
                f"invalid escape {shown!r} in a string (write \\\\ for a backslash)",
                _column(offset + j),
            )
        hexa = match.group(1) or match.group(2) or match.group(3)
        code = int(hexa, 16) if hexa else int(match.group(4), 8)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ExprError(f"{match.group(0)!r} is not a valid character", _column(offset + j))
        out.append(chr(code))
        i = match.end()
    out.append(body[i:])
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Syntax errors: lark's exceptions to messages for people


_OPERAND_TERMINALS = frozenset({"INT_LIT", "FLOAT_LIT", "STRING_LIT", "BOOL_LIT"})
_WORD_HINTS = {
    "and": "write && for 'and'",
    "or": "write || for 'or'",
    "not": "write ! for 'not'",
    "xor": "write != between two booleans for 'exclusive or'",
    "mod": "write % for the remainder",
    "div": "write / to divide",
    "if": "write a choice as: condition ? value_if_true : value_if_false",
    "then": "write a choice as: condition ? value_if_true : value_if_false",
    "else": "write a choice as: condition ? value_if_true : value_if_false",
    "elif": "write a choice as: condition ? value_if_true : value_if_false",
    "true": "write true in lower case",
    "false": "write false in lower case",
    "null": "write null in lower case",
    "none": "write null",
    "nil": "write null",
}
_CHAR_HINTS = {
    "=": "a single '=' does not compare: write '=='",
    "&": "write '&&' for 'and'",
    "|": "write '||' for 'or'",
    ";": "an expression is one formula, without ';'",
    "#": "comments start with //",
    "≤": "write <=",
    "≥": "write >=",
    "≠": "write !=",
    "\u00d7": "write * to multiply",  # multiplication sign
    "\u00f7": "write / to divide",  # division sign
    "\u2212": "write - (the ASCII minus)",  # minus sign
    "\u201c": 'write strings in straight quotes: "..."',  # curly quotes
    "\u201d": 'write strings in straight quotes: "..."',
    "\u2018": "write strings in straight quotes: '...'",
    "\u2019": "write strings in straight quotes: '...'",
}


def _word_hint(word: str) -> str | None:
    hint = _WORD_HINTS.get(word.lower())
    if hint is None or word in ("true", "false", "null"):
        return None
    return hint


def _syntax_error(text: str, exc: LarkError) -> ExprError:
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        char = text[pos] if 0 <= pos < len(text) else ""
        pair = text[pos : pos + 2]
        if pair in ("=<", "=>"):
            hint: str = f"write {pair[::-1]}"
        elif char in ('"', "'"):
            return ExprError("this string is not closed (on the same line)", _column(pos))
        else:
            hint = _CHAR_HINTS.get(char) or ""
        shown = repr(char) if char.isprintable() else f"U+{ord(char):04X}" if char else "end"
        return ExprError(
            f"unexpected character {shown}" + (f": {hint}" if hint else ""), _column(pos)
        )
    if isinstance(exc, UnexpectedToken):
        token, expected = exc.token, set(exc.expected)
        if token.type == "$END":
            return _early_end(text, expected)
        pos = _start(token)
        value = str(token.value)
        word_hint = _word_hint(value) if token.type == "IDENT" else None
        if word_hint:
            return ExprError(f"unexpected {value!r}: {word_hint}", _column(pos))
        previous = re.search(r"(\w+)\s*$", text[:pos])
        previous_hint = _word_hint(previous.group(1)) if previous else None
        if previous and previous_hint:
            return ExprError(
                f"unexpected {previous.group(1)!r}: {previous_hint}", _column(previous.start(1))
            )
        if value == ">" and text[pos - 1 : pos] == "<":
            return ExprError("unexpected '<>': write != for 'not equal'", _column(pos - 1))
        if value == ":" and text[pos : pos + 2] == ":=":
            return ExprError("unexpected ':=': write == to compare", _column(pos))
        if token.type in ("RPAR", "RSQB") and not _has_opener(text, pos):
            return ExprError(f"{value!r} without a matching opening bracket", _column(pos))
        if expected & _OPERAND_TERMINALS:
            return ExprError(f"a value is missing before {value!r}", _column(pos))
        if "IDENT" in expected:
            return ExprError(f"unexpected {value!r}", _column(pos))
        return ExprError(
            f"unexpected {value!r}: an operator (such as &&, ||, ==, >, +) is missing before it",
            _column(pos),
        )
    return ExprError(f"syntax error: {exc}")  # pragma: no cover - lark raises the two above


_LAST_TOKEN = re.compile(r"(&&|\|\||[<>=!]=|[-+*/%<>!?:,(\[]|\w+|\S)\s*$")


def _early_end(text: str, expected: set[str]) -> ExprError:
    body = _strip_comments(text)
    if not body.strip():
        return ExprError("the expression is empty")
    opened = _bracket_scan(body, len(body))
    if opened:
        bracket, at = opened[-1]
        return ExprError(
            f"{bracket!r} is never closed: a {_CLOSING[bracket]!r} is missing", _column(at)
        )
    if "COLON" in expected and "?" in body:
        return ExprError(
            "'?' needs both results: condition ? value_if_true : value_if_false",
            _column(body.rfind("?")),
        )
    last = _LAST_TOKEN.search(body)
    if last:
        return ExprError(
            f"the expression ends after {last.group(1)!r}: a value is missing",
            _column(last.start(1)),
        )
    return ExprError("the expression ends too early")  # pragma: no cover


_STRING_OR_COMMENT = re.compile(r""""(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|//[^\n]*""")


def _strip_comments(text: str) -> str:
    """``text`` with its ``//`` comments blanked (for messages: strings are kept)."""
    return _STRING_OR_COMMENT.sub(
        lambda m: " " * len(m.group(0)) if m.group(0).startswith("//") else m.group(0), text
    )


_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _bracket_scan(text: str, upto: int) -> list[tuple[str, int]]:
    """The brackets still open at offset ``upto`` (strings skipped), with their offsets."""
    stack: list[tuple[str, int]] = []
    i = 0
    while i < min(upto, len(text)):
        char = text[i]
        if char in "\"'":
            end = text.find(char, i + 1)
            while end > 0 and text[end - 1] == "\\":
                end = text.find(char, end + 1)
            i = len(text) if end < 0 else end + 1
            continue
        if char in _CLOSING:
            stack.append((char, i))
        elif char in ")]}" and stack:
            stack.pop()
        i += 1
    return stack


def _has_opener(text: str, closer_at: int) -> bool:
    """Whether the bracket at ``closer_at`` closes one that is open there."""
    opened = _bracket_scan(_strip_comments(text), closer_at)
    return bool(opened) and _CLOSING[opened[-1][0]] == text[closer_at]


# --------------------------------------------------------------------------------------------
# Checking and building the closures


_NUMERIC = frozenset({"integer", "float"})
_ARTICLE = {
    "float": "a float",
    "integer": "an integer",
    "boolean": "a boolean (true/false)",
    "string": "a string",
    "null": "null",
}
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}  # fmt: skip
_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Typed:
    """A checked sub-expression: its type and the closure that computes it."""

    type: str  # a ValueType, or "null"
    fn: _Fn
    const: bool = False  # a constant (folded at load), whose value is ``value``
    value: Any = None
    int_literal: bool = False  # an integer literal, which reads as a float next to a float
    var: str | None = None  # the variable, when this is a plain reference to one


def _constant(value: Any, type_: str, int_literal: bool = False) -> _Typed:
    def constant(values: Mapping[str, Any]) -> Any:
        return value

    return _Typed(type_, constant, True, value, int_literal)


def _as_float(typed: _Typed) -> _Typed:
    """An integer literal read as a float (the one place where types bend, for ``t > 80``)."""
    return _constant(float(typed.value), "float")


class _Checker:
    def __init__(self, text: str, variables: Mapping[str, Variable]) -> None:
        self.text = text
        self.variables = variables
        self.names: set[str] = set()

    # --- messages

    def snippet(self, node: _Node) -> str:
        shown = " ".join(_strip_comments(self.text[node.start : node.end]).split())
        return shown if len(shown) <= 40 else shown[:39] + "…"

    def what(self, node: _Node, typed: _Typed) -> str:
        return f"{self.snippet(node)!r} is {_ARTICLE[typed.type]}"

    def fold(self, typed: _Typed, at: int, *operands: _Typed) -> _Typed:
        """``typed`` computed now when all operands are constants (errors become load errors)."""
        if not all(o.const for o in operands):
            return typed
        try:
            value = typed.fn({})
        except EvalError as err:
            raise ExprError(err.message, _column(at)) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ExprError("this number is too large for a float", _column(at))
        return _constant(value, typed.type)

    # --- the tree

    def check(self, node: _Node, depth: int) -> _Typed:
        if depth > MAX_DEPTH:
            raise ExprError(
                f"the expression is nested too deeply (more than {MAX_DEPTH} levels)",
                _column(node.start),
            )
        if isinstance(node, _Lit):
            return _constant(node.value, node.type, node.int_literal)
        if isinstance(node, _Name):
            return self.name(node)
        if isinstance(node, _Unary):
            return self.unary(node, depth)
        if isinstance(node, _Binary):
            return self.binary(node, depth)
        if isinstance(node, _Cond):
            return self.cond(node, depth)
        if isinstance(node, _Call):
            return self.call(node, depth)
        assert isinstance(node, _List)
        raise ExprError(
            'a list [...] can only follow \'in\', as in state in ["Idle", "Setup"]',
            _column(node.start),
        )

    def name(self, node: _Name) -> _Typed:
        variable = self.variables.get(node.name)
        if variable is None:
            raise ExprError(self.unknown_name(node.name), _column(node.start))
        self.names.add(node.name)
        return _Typed(variable.type, _loader(node.name, variable.type), var=node.name)

    def unknown_name(self, name: str) -> str:
        if name in FUNCTIONS:
            return f"{name} is a function: write {name}(...)"
        hint = _word_hint(name)
        if hint:
            return f"unknown name {name!r}: {hint}"
        close = difflib.get_close_matches(name, list(self.variables), n=1, cutoff=0.6)
        message = f"unknown name {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        known = sorted(self.variables)
        if not known:
            return message + "; no names can be used here"
        listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        return f"{message}; names you can use: {listed}"

    def unary(self, node: _Unary, depth: int) -> _Typed:
        arg = self.check(node.arg, depth + 1)
        f = arg.fn
        if node.op == "!":
            if arg.type != "boolean":
                raise ExprError(
                    f"'!' needs true/false, but {self.what(node.arg, arg)}", _column(node.start)
                )

            def not_(values: Mapping[str, Any]) -> Any:
                return not f(values)

            return self.fold(_Typed("boolean", not_), node.start, arg)
        if arg.type not in _NUMERIC:
            raise ExprError(
                f"'-' needs a number, but {self.what(node.arg, arg)}", _column(node.start)
            )
        if arg.type == "float":

            def negate(values: Mapping[str, Any]) -> Any:
                return -f(values)

            return self.fold(_Typed("float", negate), node.start, arg)
        snippet = self.snippet(node)

        def negate_int(values: Mapping[str, Any]) -> Any:
            result = -f(values)
            if result > _INT64_MAX:
                raise EvalError("overflow", f"integer overflow in {snippet!r}")
            return result

        folded = self.fold(_Typed("integer", negate_int), node.start, arg)
        return replace(folded, int_literal=arg.int_literal)

    def binary(self, node: _Binary, depth: int) -> _Typed:
        op = node.op
        if op == "in":
            return self.membership(node, depth)
        left = self.check(node.left, depth + 1)
        right = self.check(node.right, depth + 1)
        if op in ("&&", "||"):
            return self.logic(node, left, right)
        if op in ("==", "!="):
            return self.equality(node, left, right)
        if op in _COMPARE:
            return self.ordering(node, left, right)
        return self.arithmetic(node, left, right)

    def logic(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        for side, typed in ((node.left, left), (node.right, right)):
            if typed.type != "boolean":
                hint = (
                    f" (compare it, e.g. {self.snippet(side)} > 0)"
                    if typed.type in _NUMERIC
                    else ""
                )
                raise ExprError(
                    f"{node.op!r} needs true/false on both sides, but "
                    f"{self.what(side, typed)}{hint}",
                    _column(side.start),
                )
        fn = _and(left.fn, right.fn) if node.op == "&&" else _or(left.fn, right.fn)
        return self.fold(_Typed("boolean", fn), node.op_pos, left, right)

    def equality(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        if left.type == "null" or right.type == "null":
            return self.null_check(node, left, right)
        self.require_comparable(node, node.left, left, node.right, right)
        fn = _binary_fn(_COMPARE[node.op], left, right)
        return self.fold(_Typed("boolean", fn), node.op_pos, left, right)

    def null_check(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        other, other_node = (right, node.right) if left.type == "null" else (left, node.left)
        if other.var is None:
            raise ExprError(
                "null can only be compared with a name, as in x == null or x != null",
                _column(node.op_pos),
            )
        if not self.variables[other.var].nullable:
            raise ExprError(
                f"{other.var!r} always has a value: comparing it with null is always "
                f"{'false' if node.op == '==' else 'true'}",
                _column(other_node.start),
            )
        name = other.var
        if node.op == "==":

            def is_null(values: Mapping[str, Any]) -> Any:
                return values.get(name) is None

            return _Typed("boolean", is_null)

        def is_not_null(values: Mapping[str, Any]) -> Any:
            return values.get(name) is not None

        return _Typed("boolean", is_not_null)

    def require_comparable(
        self, node: _Binary, left_node: _Node, left: _Typed, right_node: _Node, right: _Typed
    ) -> None:
        if left.type == right.type or (left.type in _NUMERIC and right.type in _NUMERIC):
            return
        if "null" in (left.type, right.type):
            raise ExprError(
                "null can only be compared with a name, as in x == null or x != null",
                _column(node.op_pos),
            )
        message = (
            f"cannot compare {_ARTICLE[left.type]} with {_ARTICLE[right.type]}: "
            f"{self.what(left_node, left)} and {self.what(right_node, right)}"
        )
        for typed in (left, right):
            if typed.const and typed.type == "string" and _looks_numeric(typed.value):
                message += f" (write the number without quotes: {typed.value.strip()})"
        raise ExprError(message, _column(node.op_pos))

    def ordering(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        if left.type == "boolean" and right.type == "boolean":
            raise ExprError(
                f"{node.op!r} does not order true and false: compare booleans with == or !=",
                _column(node.op_pos),
            )
        if not (
            (left.type in _NUMERIC and right.type in _NUMERIC)
            or (left.type == "string" and right.type == "string")
        ):
            self.require_comparable(node, node.left, left, node.right, right)
            raise ExprError(  # two booleans or two nulls
                f"{node.op!r} compares numbers or strings, but {self.what(node.left, left)}",
                _column(node.op_pos),
            )
        fn = _binary_fn(_COMPARE[node.op], left, right)
        return self.fold(_Typed("boolean", fn), node.op_pos, left, right)

    def membership(self, node: _Binary, depth: int) -> _Typed:
        left = self.check(node.left, depth + 1)
        if not isinstance(node.right, _List):
            raise ExprError(
                '\'in\' needs a list written in brackets, as in state in ["Idle", "Setup"]',
                _column(node.right.start),
            )
        if left.type == "null":
            raise ExprError(
                "null can only be compared with a name, as in x == null or x != null",
                _column(node.left.start),
            )
        items = [self.check(item, depth + 1) for item in node.right.items]
        if not items:
            raise ExprError("the list after 'in' is empty", _column(node.right.start))
        for item_node, item in zip(node.right.items, items, strict=True):
            if not (item.type == left.type or (item.type in _NUMERIC and left.type in _NUMERIC)):
                raise ExprError(
                    f"the list holds {_ARTICLE[item.type]} but {self.what(node.left, left)}: "
                    f"{self.snippet(item_node)!r} can never match",
                    _column(item_node.start),
                )
        f = left.fn
        if all(item.const for item in items):
            members = frozenset(item.value for item in items)

            def in_set(values: Mapping[str, Any]) -> Any:
                return f(values) in members

            return self.fold(_Typed("boolean", in_set), node.op_pos, left)
        item_fns = tuple(item.fn for item in items)

        def in_list(values: Mapping[str, Any]) -> Any:
            value = f(values)
            return value in [g(values) for g in item_fns]

        return _Typed("boolean", in_list)

    def numeric_pair(
        self, what: str, at: int, nodes: tuple[_Node, ...], operands: tuple[_Typed, ...]
    ) -> tuple[str, tuple[_Typed, ...]]:
        """The common numeric type of ``operands`` (integer literals read as floats if needed)."""
        for node, typed in zip(nodes, operands, strict=True):
            if typed.type not in _NUMERIC:
                raise ExprError(f"{what} needs numbers, but {self.what(node, typed)}", _column(at))
        if all(t.type == "integer" for t in operands):
            return "integer", operands
        for node, typed in zip(nodes, operands, strict=True):
            if typed.type == "integer" and not typed.int_literal:
                snippet = self.snippet(node)
                raise ExprError(
                    f"{what} cannot mix an integer and a float: {snippet!r} is an integer; "
                    f"convert it with double({snippet})",
                    _column(at),
                )
        return "float", tuple(_as_float(t) if t.type == "integer" else t for t in operands)

    def arithmetic(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        op, nodes = node.op, (node.left, node.right)
        if op == "+" and left.type == "string" and right.type == "string":
            return self.fold(
                _Typed("string", _binary_fn(operator.add, left, right)), node.op_pos, left, right
            )
        if op == "+" and "string" in (left.type, right.type):
            side = (node.left, left) if left.type != "string" else (node.right, right)
            raise ExprError(
                f"'+' joins two strings or adds two numbers, but {self.what(*side)}",
                _column(node.op_pos),
            )
        if op == "%" and "float" in (left.type, right.type):
            side = (node.left, left) if left.type == "float" else (node.right, right)
            raise ExprError(
                f"'%' (remainder) works on integers only, but {self.what(*side)}",
                _column(node.op_pos),
            )
        type_, (left, right) = self.numeric_pair(f"{op!r}", node.op_pos, nodes, (left, right))
        snippet = self.snippet(node)
        if op in ("/", "%") and right.const and right.value == 0:
            raise ExprError(f"division by zero in {snippet!r}", _column(node.op_pos))
        fn: _Fn
        if type_ == "float":
            fn = (
                _float_div(left.fn, right.fn, snippet)
                if op == "/"
                else _binary_fn(_ARITHMETIC[op], left, right)
            )
        elif op in ("/", "%"):
            fn = _int_divide(_int_div if op == "/" else _int_mod, left.fn, right.fn, snippet)
        else:
            fn = _int_checked(_ARITHMETIC[op], left.fn, right.fn, snippet)
        return self.fold(_Typed(type_, fn), node.op_pos, left, right)

    def cond(self, node: _Cond, depth: int) -> _Typed:
        test = self.check(node.test, depth + 1)
        if test.type != "boolean":
            raise ExprError(
                f"the condition before '?' must be true or false, but {self.what(node.test, test)}",
                _column(node.test.start),
            )
        then = self.check(node.then, depth + 1)
        other = self.check(node.other, depth + 1)
        for branch_node, branch in ((node.then, then), (node.other, other)):
            if branch.type == "null":
                raise ExprError(
                    "null can only be compared with a name, as in x == null or x != null",
                    _column(branch_node.start),
                )
        if then.type in _NUMERIC and other.type in _NUMERIC:
            type_, (then, other) = self.numeric_pair(
                "'? :'", node.op_pos, (node.then, node.other), (then, other)
            )
        elif then.type != other.type:
            raise ExprError(
                f"both results of '? :' must have the same type, but "
                f"{self.what(node.then, then)} and {self.what(node.other, other)}",
                _column(node.op_pos),
            )
        else:
            type_ = then.type
        if test.const:
            return then if test.value else other
        test_fn, then_fn, other_fn = test.fn, then.fn, other.fn

        def choose(values: Mapping[str, Any]) -> Any:
            return then_fn(values) if test_fn(values) else other_fn(values)

        return _Typed(type_, choose)

    def call(self, node: _Call, depth: int) -> _Typed:
        name, nodes = node.func, node.args
        if name not in FUNCTIONS:
            close = difflib.get_close_matches(name, FUNCTIONS, n=1, cutoff=0.6)
            suggestion = f" (did you mean {close[0]!r}?)" if close else ""
            raise ExprError(
                f"unknown function {name!r}{suggestion}; functions: {', '.join(FUNCTIONS)}",
                _column(node.start),
            )
        args = tuple(self.check(arg, depth + 1) for arg in nodes)
        if name in ("min", "max"):
            if len(args) < 2:
                raise ExprError(
                    f"{name}() needs at least two values, as in {name}(a, b)", _column(node.start)
                )
            type_, args = self.numeric_pair(f"{name}()", node.start, nodes, args)
            return self.fold(
                _Typed(type_, _pick(min if name == "min" else max, args)), node.start, *args
            )
        if len(args) != 1:
            raise ExprError(f"{name}() takes one value, got {len(args)}", _column(node.start))
        (arg,) = args
        if arg.type not in _NUMERIC:
            raise ExprError(
                f"{name}() needs a number, but {self.what(nodes[0], arg)}", _column(node.start)
            )
        snippet = self.snippet(node)
        if name == "abs":
            fn = _abs(arg.fn, snippet) if arg.type == "integer" else _float_abs(arg.fn)
            return self.fold(_Typed(arg.type, fn), node.start, arg)
        if name == "double":
            if arg.type == "float":
                return replace(arg, var=None)
            return self.fold(_Typed("float", _to_float(arg.fn)), node.start, arg)
        if arg.type == "integer":  # int()
            return replace(arg, int_literal=False, var=None)
        return self.fold(_Typed("integer", _to_int(arg.fn, snippet)), node.start, arg)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _result_type(text: str, node: _Node, typed: _Typed, result: ResultKind) -> ValueType:
    at = _column(node.start)
    kind = typed.type
    if kind == "null":
        raise ExprError(
            "null alone is not a value; it can only be compared with a name, as in x == null", at
        )
    if result == "boolean" and kind != "boolean":
        hint = ""
        if kind in _NUMERIC:
            shown = " ".join(_strip_comments(text[node.start : node.end]).split())
            hint = f" (compare it, e.g. {shown[:40]} > 0)"
        raise ExprError(
            f"a condition must give true or false, but this expression gives "
            f"{_ARTICLE[kind]}{hint}",
            at,
        )
    if result == "number" and kind not in _NUMERIC:
        raise ExprError(f"this expression must give a number, but it gives {_ARTICLE[kind]}", at)
    assert kind in ("float", "integer", "boolean", "string")
    return kind  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The closures. Each takes the values mapping and returns a Python value, or raises EvalError.


def _loader(name: str, type_: str) -> _Fn:
    """Reads variable ``name``: the fast path is one dict lookup and one type check."""
    if type_ == "float":

        def load_float(values: Mapping[str, Any]) -> Any:
            value = values.get(name)
            if type(value) is float:
                return value
            return _convert_slowly(name, type_, value)

        return load_float
    if type_ == "integer":

        def load_integer(values: Mapping[str, Any]) -> Any:
            value = values.get(name)
            if type(value) is int:
                return value
            return _convert_slowly(name, type_, value)

        return load_integer
    if type_ == "boolean":

        def load_boolean(values: Mapping[str, Any]) -> Any:
            value = values.get(name)
            if value is True or value is False:
                return value
            return _convert_slowly(name, type_, value)

        return load_boolean

    def load_string(values: Mapping[str, Any]) -> Any:
        value = values.get(name)
        if type(value) is str:
            return value
        return _convert_slowly(name, type_, value)

    return load_string


def _convert_slowly(name: str, type_: str, value: Any) -> Any:
    """The rare paths of a variable read: None, an int for a float, subclasses, wrong types."""
    if value is None:
        raise EvalError("no_value", f"{name!r} has no value", name)
    if not isinstance(value, bool):
        if type_ == "float" and isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:
                pass
        elif type_ == "integer" and isinstance(value, int):
            return int(value)
        elif type_ == "string" and isinstance(value, str):
            return str(value)
    raise EvalError(
        "bad_value",
        f"{name!r} should be {_ARTICLE[type_]}, not a {type(value).__name__}",
        name,
    )


def _binary_fn(op: Callable[[Any, Any], Any], left: _Typed, right: _Typed) -> _Fn:
    lf, rf = left.fn, right.fn
    if right.const:
        constant = right.value

        def with_constant_right(values: Mapping[str, Any]) -> Any:
            return op(lf(values), constant)

        return with_constant_right
    if left.const:
        constant = left.value

        def with_constant_left(values: Mapping[str, Any]) -> Any:
            return op(constant, rf(values))

        return with_constant_left

    def both(values: Mapping[str, Any]) -> Any:
        return op(lf(values), rf(values))

    return both


def _and(lf: _Fn, rf: _Fn) -> _Fn:
    def and_(values: Mapping[str, Any]) -> Any:
        try:
            left = lf(values)
        except EvalError as error:
            try:
                right = rf(values)
            except EvalError:
                raise error from None
            if right is False:
                return False  # CEL: <error> && false is false
            raise
        if left is False:
            return False
        return rf(values)

    return and_


def _or(lf: _Fn, rf: _Fn) -> _Fn:
    def or_(values: Mapping[str, Any]) -> Any:
        try:
            left = lf(values)
        except EvalError as error:
            try:
                right = rf(values)
            except EvalError:
                raise error from None
            if right is True:
                return True  # CEL: <error> || true is true
            raise
        if left is True:
            return True
        return rf(values)

    return or_


def _float_div(lf: _Fn, rf: _Fn, snippet: str) -> _Fn:
    def divide(values: Mapping[str, Any]) -> Any:
        dividend = lf(values)
        divisor = rf(values)
        if divisor == 0.0:
            raise EvalError("division_by_zero", f"division by zero in {snippet!r}")
        return dividend / divisor

    return divide


def _int_div(a: int, b: int) -> int:
    """CEL's integer division: truncates toward zero (-7 / 2 == -3); ``b`` is not 0."""
    quotient = abs(a) // abs(b)
    return -quotient if (a < 0) != (b < 0) else quotient


def _int_mod(a: int, b: int) -> int:
    """CEL's remainder: the sign of the dividend (-7 % 3 == -1); ``b`` is not 0."""
    remainder = abs(a) % abs(b)
    return -remainder if a < 0 else remainder


def _int_checked(op: Callable[[Any, Any], Any], lf: _Fn, rf: _Fn, snippet: str) -> _Fn:
    def int_op(values: Mapping[str, Any]) -> Any:
        result = op(lf(values), rf(values))
        if _INT64_MIN <= result <= _INT64_MAX:
            return result
        raise EvalError("overflow", f"integer overflow in {snippet!r}")

    return int_op


def _int_divide(op: Callable[[int, int], int], lf: _Fn, rf: _Fn, snippet: str) -> _Fn:
    def int_divide(values: Mapping[str, Any]) -> Any:
        dividend = lf(values)
        divisor = rf(values)
        if divisor == 0:
            raise EvalError("division_by_zero", f"division by zero in {snippet!r}")
        result = op(dividend, divisor)
        if result <= _INT64_MAX:  # only INT64_MIN / -1 leaves the range
            return result
        raise EvalError("overflow", f"integer overflow in {snippet!r}")

    return int_divide


def _pick(choose: Callable[..., Any], args: tuple[_Typed, ...]) -> _Fn:
    fns = tuple(arg.fn for arg in args)
    if len(fns) == 2:
        first, second = fns

        def pick_of_two(values: Mapping[str, Any]) -> Any:
            return choose(first(values), second(values))

        return pick_of_two

    def pick(values: Mapping[str, Any]) -> Any:
        return choose([f(values) for f in fns])

    return pick


def _abs(f: _Fn, snippet: str) -> _Fn:
    def abs_int(values: Mapping[str, Any]) -> Any:
        result = abs(f(values))
        if result > _INT64_MAX:
            raise EvalError("overflow", f"integer overflow in {snippet!r}")
        return result

    return abs_int


def _float_abs(f: _Fn) -> _Fn:
    def abs_float(values: Mapping[str, Any]) -> Any:
        return abs(f(values))

    return abs_float


def _to_float(f: _Fn) -> _Fn:
    def to_float(values: Mapping[str, Any]) -> Any:
        return float(f(values))

    return to_float


def _to_int(f: _Fn, snippet: str) -> _Fn:
    def to_int(values: Mapping[str, Any]) -> Any:
        value = f(values)
        if -9.223372036854775808e18 < value < 9.223372036854775808e18:  # as cel-go, cel-rust
            return int(value)  # truncates toward zero, as CEL's int(double)
        raise EvalError("overflow", f"{snippet!r}: the value is outside the integer range")

    return to_int


def _finite(f: _Fn) -> _Fn:
    isfinite = math.isfinite

    def finite(values: Mapping[str, Any]) -> Any:
        result = f(values)
        if isfinite(result):
            return result
        raise EvalError("overflow", "the result is not a finite number")

    return finite
