"""The expression language of mapping files (gateway.mapping.expr): CEL conditions and
computed fields, checked at load with located messages, evaluated without ever raising
anything but EvalError."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mapping.expr import (
    MAX_DEPTH,
    MAX_LENGTH,
    CompiledExpr,
    EvalError,
    ExprError,
    ResultKind,
    Variable,
    compile_expr,
)

VARIABLES = {
    v.name: v
    for v in (
        Variable("part_present", "boolean"),
        Variable("cycle_time_s", "float"),
        Variable("temperature_c", "float"),
        Variable("pressure_bar", "float"),
        Variable("part_counter", "integer"),
        Variable("scrap_counter", "integer"),
        Variable("state", "string"),
        Variable("door_open", "boolean"),
        Variable("line_speed", "integer", nullable=False),
    )
}


def compiled(text: str, result: ResultKind = "any") -> CompiledExpr:
    return compile_expr(text, VARIABLES, result=result)


def evaluate(text: str, **values: Any) -> Any:
    return compiled(text).evaluate(values)


def load_error(text: str, result: ResultKind = "any") -> ExprError:
    with pytest.raises(ExprError) as caught:
        compiled(text, result)
    return caught.value


def eval_error(text: str, **values: Any) -> EvalError:
    expression = compiled(text)
    with pytest.raises(EvalError) as caught:
        expression.evaluate(values)
    return caught.value


# --- valid conditions and computed fields ------------------------------------------------


@pytest.mark.parametrize(
    ("part_present", "cycle_time_s", "expected"),
    [(False, 12.5, True), (False, 0.0, False), (True, 12.5, False), (True, 0.0, False)],
)
def test_a_condition_over_two_signals_is_true_only_when_both_parts_hold(
    part_present: bool, cycle_time_s: float, expected: bool
) -> None:
    """The brief's trigger condition evaluates as an OT engineer reads it."""
    condition = compiled("part_present == false && cycle_time_s > 0.0", result="boolean")
    assert condition.result_type == "boolean"
    assert condition.names == frozenset({"part_present", "cycle_time_s"})
    values = {"part_present": part_present, "cycle_time_s": cycle_time_s}
    assert condition.evaluate(values) is expected


def test_a_computed_field_converts_celsius_to_fahrenheit() -> None:
    """A numeric field gives a float of the expected value."""
    field = compiled("temperature_c * 1.8 + 32.0", result="number")
    assert field.result_type == "float"
    assert field.evaluate({"temperature_c": 21.5}) == pytest.approx(70.7)
    assert field.evaluate({"temperature_c": -40.0}) == pytest.approx(-40.0)


def test_whole_number_literals_next_to_floats_read_as_floats() -> None:
    """``temperature_c > 80`` works on a float signal (CEL alone would refuse int vs double
    arithmetic; comparisons across int and double are standard CEL)."""
    assert evaluate("temperature_c > 80", temperature_c=80.5) is True
    assert evaluate("temperature_c > 80", temperature_c=79.9) is False
    assert evaluate("temperature_c * 2 - 1", temperature_c=1.5) == 2.0
    assert evaluate("max(temperature_c, 0)", temperature_c=-3.0) == 0.0
    assert compiled("cycle_time_s > 0 ? cycle_time_s : 0").result_type == "float"


def test_integer_signals_compute_with_cel_integer_rules() -> None:
    """Integer arithmetic stays integer; division truncates toward zero and the remainder
    takes the dividend's sign, as in CEL (and C, Go, Structured Text)."""
    assert evaluate("part_counter - scrap_counter", part_counter=10, scrap_counter=3) == 7
    assert evaluate("part_counter / 2", part_counter=-7) == -3
    assert evaluate("part_counter % 3", part_counter=-7) == -1
    assert evaluate("part_counter % 2 == 0", part_counter=12) is True
    assert compiled("part_counter * 2").result_type == "integer"


def test_integer_and_float_signals_mix_through_double() -> None:
    """``double(n)`` turns an integer into a float; ``int(x)`` truncates toward zero."""
    assert evaluate("double(part_counter) * 1.5", part_counter=3) == 4.5
    assert evaluate("double(part_counter) / 4.0", part_counter=3) == 0.75
    assert evaluate("int(temperature_c)", temperature_c=-2.7) == -2
    assert compiled("int(temperature_c)").result_type == "integer"


def test_comparisons_across_integers_and_floats_are_numeric() -> None:
    """An integer signal compares with a float literal by value (CEL heterogeneous
    comparison and equality)."""
    assert evaluate("part_counter < 2.5", part_counter=2) is True
    assert evaluate("part_counter == 2.0", part_counter=2) is True
    assert evaluate("part_counter in [1, 2.0, 3]", part_counter=2) is True


def test_strings_compare_and_match_lists_of_states() -> None:
    """Named states compare with ``==`` and ``in``; strings join with ``+``."""
    assert evaluate('state == "Running"', state="Running") is True
    assert evaluate("state in ['Setup', 'Running']", state="Idle") is False
    assert evaluate('state + "/" + state', state="Idle") == "Idle/Idle"
    assert evaluate(r'"tab\there" == state', state="tab\there") is True
    assert evaluate(r"r'C:\temp' == state", state="C:\\temp") is True


def test_choice_functions_and_negation_evaluate_as_documented() -> None:
    """``? :``, ``abs``, ``min``, ``max``, ``!`` and unary minus."""
    assert evaluate("door_open ? 'open' : 'closed'", door_open=True) == "open"
    assert evaluate("abs(pressure_bar - 2.0)", pressure_bar=1.5) == 0.5
    assert evaluate("min(temperature_c, pressure_bar, 5.0)", temperature_c=7.0, pressure_bar=6.0)
    assert evaluate("max(part_counter, scrap_counter)", part_counter=4, scrap_counter=9) == 9
    assert evaluate("!door_open || -pressure_bar > 0.0", door_open=True, pressure_bar=-1.0)


def test_operator_precedence_follows_cel() -> None:
    """``*`` before ``+``, comparisons before ``&&``, ``&&`` before ``||``, ``? :`` last."""
    assert evaluate("1 + 2 * 3 == 7") is True
    assert evaluate("true || false && false") is True
    assert evaluate("door_open || part_present ? 1 : 2", door_open=False, part_present=True) == 1


def test_comments_and_line_breaks_are_allowed() -> None:
    """Long conditions may span lines (YAML block scalars) with ``//`` comments."""
    text = "temperature_c > 80.0  // too hot\n  || pressure_bar > 6.0  // or too much pressure"
    assert compiled(text).evaluate({"temperature_c": 20.0, "pressure_bar": 7.0}) is True


def test_names_lists_every_variable_read_including_null_checks() -> None:
    """The engine learns from ``names`` which values an expression needs."""
    expression = compiled("state != null ? state : 'unknown'")
    assert expression.names == frozenset({"state"})
    assert compiled("1 + 2").names == frozenset()


# --- load-time errors: syntax ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("temperature_c >", 15, "a value is missing"),
        ("temperature_c > 80 and door_open", 20, "write &&"),
        ("temperature_c > 80 or door_open", 20, "write ||"),
        ("temperature_c = 80.0", 15, "write '=='"),
        ("door_open & part_present", 11, "'&&'"),
        ("state <> 'Idle'", 7, "write !="),
        ("(temperature_c > 1.0", 1, "')' is missing"),
        ("temperature_c > 1.0)", 20, "without a matching"),
        ("state == 'Idle", 10, "not closed"),
        ("door_open ? 1.0", 11, "condition ? value_if_true : value_if_false"),
        ("temperature_c 80", 15, "operator"),
        ("if door_open", 1, "condition ? value_if_true"),
        ("temperature_c := 1", 15, "write =="),
        ("temperature_c ≥ 80.0", 15, "write >="),
        ('state == "bad \\q escape"', 15, "invalid escape"),
        ("", None, "empty"),
        ("   // only a comment", None, "empty"),
    ],
)
def test_syntax_errors_say_what_is_wrong_and_where(
    text: str, column: int | None, words: str
) -> None:
    """Each syntax error has a message for people (with the usual fixes) and a column."""
    error = load_error(text)
    assert words in error.message
    assert error.column == column
    assert str(error) == error.message


def test_a_column_counts_characters_from_the_start_of_a_multi_line_text() -> None:
    """Newlines count as one character, so the engine can map the column into the file."""
    text = "temperature_c > 80.0 &&\n  pressur_bar > 1.0"
    error = load_error(text)
    assert error.column == text.index("pressur_bar") + 1


# --- load-time errors: names and types --------------------------------------------------------


def test_an_unknown_name_suggests_the_closest_declared_one() -> None:
    """Did-you-mean by difflib, plus the names that can be used."""
    error = load_error("temprature_c > 80.0")
    assert error.column == 1
    assert "unknown name 'temprature_c' (did you mean 'temperature_c'?)" in error.message
    assert "names you can use: cycle_time_s, door_open" in error.message


def test_an_unknown_function_suggests_a_supported_one() -> None:
    """Functions are few; a typo gets the closest, and the list."""
    error = load_error("maxx(temperature_c, 1.0)")
    assert error.column == 1
    assert "unknown function 'maxx' (did you mean 'max'?)" in error.message
    assert "functions: abs, min, max, int, double" in error.message


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("True", "write true in lower case"),
        ("NULL == state", "write null"),
        ("door_open AND part_present", "write &&"),
    ],
)
def test_words_from_other_languages_get_the_cel_spelling(text: str, hint: str) -> None:
    """Structured Text / Python habits are answered with the CEL spelling."""
    assert hint in load_error(text).message


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("state > 5", 7, "cannot compare a string with an integer"),
        ('temperature_c > "80"', 15, "write the number without quotes: 80"),
        ("temperature_c && door_open", 1, "'&&' needs true/false on both sides"),
        ("!temperature_c", 1, "'!' needs true/false"),
        ("temperature_c ? 1 : 2", 1, "the condition before '?' must be true or false"),
        ("door_open ? 1.0 : 'x'", 11, "both results of '? :' must have the same type"),
        ("part_counter * 1.5", 14, "convert it with double(part_counter)"),
        ("max(part_counter, 1.5)", 1, "convert it with double(part_counter)"),
        ("temperature_c % 2", 15, "'%' (remainder) works on integers only"),
        ("door_open < part_present", 11, "compare booleans with == or !="),
        ("state + 1", 7, "'+' joins two strings or adds two numbers"),
        ("-state", 1, "'-' needs a number"),
        ("state in [1, 2]", 11, "can never match"),
        ("state in []", 10, "empty"),
        ("state in state", 10, "a list written in brackets"),
        ("[1, 2]", 1, "can only follow 'in'"),
        ("temperature_c + 1.0 == null", 21, "null can only be compared with a name"),
        ("line_speed == null", 1, "always has a value"),
        ("abs(state)", 1, "abs() needs a number"),
        ("abs(1.0, 2.0)", 1, "takes one value"),
        ("min(1.0)", 1, "at least two values"),
    ],
)
def test_type_errors_are_found_at_load_with_a_column(text: str, column: int, words: str) -> None:
    """Operands of the wrong type never reach evaluation."""
    error = load_error(text)
    assert words in error.message
    assert error.column == column


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("state.size()", "method calls"),
        ("math.greatest(temperature_c, 1.0)", "write max(...)"),
        ("state.name", "field selection"),
        ("state[0]", "indexing"),
        ("{'a': 1}", "maps"),
        ("size(state)", "unknown function 'size'"),
        ("1u", "write 1"),
        ("b'bytes'", "byte strings"),
        ("9223372036854775808", "out of range"),
        ("1e999", "too large"),
    ],
)
def test_cel_features_outside_the_subset_are_refused_clearly(text: str, words: str) -> None:
    """Valid CEL that mapping files do not support gets its own message, not a crash."""
    assert words in load_error(text).message


def test_constant_mistakes_are_found_at_load() -> None:
    """Parts made of literals only are computed at load: their errors are load errors."""
    assert "division by zero" in load_error("temperature_c / (2.0 - 2.0)").message
    assert "integer overflow" in load_error("9223372036854775807 + 1").message
    assert load_error("part_counter / 0").message.startswith("division by zero")
    assert "too large" in load_error("temperature_c > 1e300 * 1e300").message


def test_too_long_or_too_deep_expressions_are_refused() -> None:
    """Limits keep compile time and the evaluation stack bounded."""
    assert "too long" in load_error("1 + " * MAX_LENGTH + "1").message
    assert "nested too deeply" in load_error("1.0 + " * (MAX_DEPTH + 1) + "1.0").message
    assert "nested too deeply" in load_error("-" * 1500 + "1").message


# --- result types ---------------------------------------------------------------------------


def test_a_condition_must_give_a_boolean() -> None:
    """``result="boolean"`` refuses a number, and suggests a comparison."""
    error = load_error("temperature_c * 2.0", result="boolean")
    assert error.column == 1
    assert "a condition must give true or false, but this expression gives a float" in (
        error.message
    )
    assert "temperature_c * 2.0 > 0" in error.message


def test_a_numeric_field_must_give_a_number() -> None:
    """``result="number"`` accepts integers and floats only."""
    assert "must give a number, but it gives a string" in load_error("state", "number").message
    assert compiled("part_counter", result="number").result_type == "integer"
    assert compiled("cycle_time_s", result="number").result_type == "float"


def test_any_result_accepts_every_value_type_but_null() -> None:
    """``result="any"`` gives the expression's own type."""
    assert compiled("state").result_type == "string"
    assert compiled("door_open").result_type == "boolean"
    assert "null alone is not a value" in load_error("null").message


# --- evaluation never crashes ----------------------------------------------------------------


def test_a_missing_or_none_value_is_a_no_value_error_naming_the_signal() -> None:
    """A signal without a value yet: EvalError(no_value), never a TypeError."""
    for values in ({}, {"temperature_c": None}):
        error = eval_error("temperature_c * 1.8 + 32.0", **values)
        assert error.reason == "no_value"
        assert error.name == "temperature_c"


def test_and_or_ignore_an_error_when_the_other_side_decides() -> None:
    """CEL's rule: ``false && <error>`` is false and ``true || <error>`` is true, in either
    order; otherwise the error stands."""
    condition = compiled("temperature_c > 80.0 && door_open")
    assert condition.evaluate({"door_open": False}) is False
    assert compiled("door_open || temperature_c > 80.0").evaluate({"door_open": True}) is True
    assert compiled("temperature_c > 80.0 || door_open").evaluate({"door_open": True}) is True
    with pytest.raises(EvalError) as caught:
        condition.evaluate({"door_open": True})
    assert caught.value.reason == "no_value"
    with pytest.raises(EvalError) as both_missing:
        condition.evaluate({})
    assert both_missing.value.name == "temperature_c"


def test_null_checks_guard_signals_without_a_value() -> None:
    """``x != null`` is how an expression handles a signal that has not reported."""
    field = compiled("cycle_time_s != null ? cycle_time_s : 0.0")
    assert field.evaluate({}) == 0.0
    assert field.evaluate({"cycle_time_s": 4.5}) == 4.5
    assert compiled("state == null").evaluate({"state": None}) is True


def test_a_choice_evaluates_only_the_branch_it_takes() -> None:
    """An error in the branch not taken does not matter."""
    field = compiled("door_open ? temperature_c : 0.0")
    assert field.evaluate({"door_open": False}) == 0.0


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("temperature_c / pressure_bar", {"temperature_c": 1.0, "pressure_bar": 0.0}),
        ("temperature_c / pressure_bar", {"temperature_c": 1.0, "pressure_bar": -0.0}),
        ("part_counter / scrap_counter", {"part_counter": 1, "scrap_counter": 0}),
        ("part_counter % scrap_counter", {"part_counter": 1, "scrap_counter": 0}),
    ],
)
def test_division_by_zero_is_an_error_not_infinity(text: str, values: dict[str, Any]) -> None:
    """Integer and float division by zero raise EvalError(division_by_zero)."""
    error = eval_error(text, **values)
    assert error.reason == "division_by_zero"
    assert text in error.message


def test_a_division_error_names_the_division_that_failed() -> None:
    """The message quotes the failing part, not the whole expression around it."""
    error = eval_error("(part_counter / scrap_counter) + 1", part_counter=4, scrap_counter=0)
    assert error.message == "division by zero in '(part_counter / scrap_counter)'"


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("part_counter * scrap_counter", {"part_counter": 2**62, "scrap_counter": 4}),
        ("part_counter / scrap_counter", {"part_counter": -(2**63), "scrap_counter": -1}),
        ("-part_counter", {"part_counter": -(2**63)}),
        ("abs(part_counter)", {"part_counter": -(2**63)}),
        ("temperature_c * temperature_c", {"temperature_c": 1e200}),
        ("int(temperature_c)", {"temperature_c": 1e19}),
    ],
)
def test_overflow_is_an_error(text: str, values: dict[str, Any]) -> None:
    """64-bit integer overflow, non-finite float results and out-of-range int() raise
    EvalError(overflow)."""
    assert eval_error(text, **values).reason == "overflow"


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("temperature_c > 1.0", {"temperature_c": "hot"}),
        ("temperature_c > 1.0", {"temperature_c": True}),
        ("part_counter > 1", {"part_counter": 1.5}),
        ("door_open", {"door_open": 1}),
        ("state == 'x'", {"state": 3}),
        ("temperature_c > 1.0", {"temperature_c": 10**400}),
    ],
)
def test_a_value_of_the_wrong_type_is_a_bad_value_error(text: str, values: dict[str, Any]) -> None:
    """A caller passing a value that does not match the declared type gets EvalError."""
    error = eval_error(text, **values)
    assert error.reason == "bad_value"
    assert error.name == next(iter(values))


def test_ints_are_accepted_for_float_variables() -> None:
    """A float signal holding a whole number as an int still evaluates as a float."""
    assert evaluate("temperature_c * 1.8 + 32.0", temperature_c=100) == pytest.approx(212.0)
    assert type(evaluate("temperature_c", temperature_c=3)) is float


def test_a_values_object_that_is_not_a_mapping_gives_eval_error() -> None:
    """Even a caller bug surfaces as the one documented exception."""
    with pytest.raises(EvalError) as caught:
        compiled("temperature_c > 1.0").evaluate(None)  # type: ignore[arg-type]
    assert caught.value.reason == "bad_value"


def test_variables_must_be_keyed_by_their_name_and_of_a_known_type() -> None:
    """A wrong variables mapping is the caller's bug, reported as such (a ValueError that is
    not an ExprError)."""
    with pytest.raises(ValueError, match="is Variable"):
        compile_expr("a", {"a": Variable("b", "float")})
    with pytest.raises(ValueError, match="unknown type 'double'"):
        compile_expr("a", {"a": Variable("a", "double")})  # type: ignore[arg-type]


# --- properties --------------------------------------------------------------------------------

_TOKENS = [
    "temperature_c", "part_counter", "state", "door_open", "line_speed", "unknown",
    "0", "1", "-1", "2.5", "1e3", "0x1F", "9223372036854775807", '"Running"', "'x'", "r'\\d'",
    "true", "false", "null", "(", ")", "[", "]", ",", "!", "-", "+", "*", "/", "%",
    "==", "!=", "<", "<=", ">", ">=", "&&", "||", "?", ":", "in", ".", "abs(", "min(",
    "max(", "int(", "double(", "size(", "{", "}", "//", "\n", "and", "=", "'",
]  # fmt: skip

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=60))
def test_random_text_only_ever_raises_expr_error(text: str) -> None:
    """compile_expr on arbitrary text returns a CompiledExpr or raises ExprError."""
    try:
        compiled(text)
    except ExprError as error:
        assert error.message
        assert error.column is None or 1 <= error.column <= len(text) + 1


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=14),
    values=st.dictionaries(st.sampled_from(sorted(VARIABLES)), _values),
)
def test_token_soup_compiles_or_fails_cleanly_and_evaluates_or_fails_cleanly(
    tokens: list[str], values: dict[str, Any]
) -> None:
    """Expressions built from CEL tokens (many of them valid) only raise ExprError at load,
    and whatever compiled only raises EvalError on any values, or returns its result type."""
    text = " ".join(tokens)
    try:
        expression = compiled(text)
    except ExprError as error:
        assert error.column is None or 1 <= error.column <= len(text) + 1
        return
    try:
        result = expression.evaluate(values)
    except EvalError as error:
        assert error.reason in ("no_value", "bad_value", "division_by_zero", "overflow")
        return
    expected: dict[str, type] = {"boolean": bool, "integer": int, "float": float, "string": str}
    assert type(result) is expected[expression.result_type]
    if isinstance(result, float):
        assert math.isfinite(result)


_numbers = st.one_of(st.none(), st.floats(), st.integers(), st.just(0.0), st.just(0))


@settings(max_examples=500, deadline=None)
@given(temperature_c=_numbers, pressure_bar=_numbers, part_counter=_numbers)
def test_arithmetic_on_any_numbers_only_raises_eval_error(
    temperature_c: Any, pressure_bar: Any, part_counter: Any
) -> None:
    """Division, remainder, conversions and comparisons on extreme, zero, NaN or missing
    values return a finite result or raise EvalError."""
    field = compiled(
        "(temperature_c / pressure_bar + double(part_counter % 7)) * 1e300"
        " + abs(double(int(pressure_bar)))"
    )
    values = {
        "temperature_c": temperature_c,
        "pressure_bar": pressure_bar,
        "part_counter": part_counter,
    }
    try:
        result = field.evaluate(values)
    except EvalError:
        return
    assert math.isfinite(result)
