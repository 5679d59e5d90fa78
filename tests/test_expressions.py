"""Tests for flexgw.policies.expressions: the #[...] DataWeave subset, its context and its errors."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from flexgw.policies.expressions import (
    Authentication,
    EvaluationError,
    Expression,
    ExpressionContext,
    ExpressionError,
    compile_expression,
    compile_value,
    to_text,
)

HEADERS = [
    (b"Host", b"api.example.com"),
    (b"X-User", b"alice"),
    (b"client_id", b"c-123"),
    (b"Accept", b"text/html"),
    (b"accept", b"application/json"),
    (b"Cookie", b"a=1"),
    (b"cookie", b"b=2"),
    (b"X-Forwarded-For", b"203.0.113.7, 10.0.0.1"),
    (b"jwt", b"tok.en.sig"),
]


def make_ctx(
    method: bytes = b"GET",
    target: bytes = b"/orders/42?q=shoes&debug=true&q=boots&name=a%20b+c&empty=",
    version: bytes = b"1.1",
    headers: Any = None,
    scheme: str = "https",
    local: str = "127.0.0.1:8081",
    remote: str = "192.0.2.10:51234",
    **kw: Any,
) -> ExpressionContext:
    """A context over a typical request, with any part overridden."""
    return ExpressionContext.from_request(
        method,
        target,
        version,
        HEADERS if headers is None else headers,
        scheme,
        local,
        remote,
        **kw,
    )


def ev(source: str, ctx: ExpressionContext | None = None) -> Any:
    """Compile a body and evaluate it against ctx (the typical request by default)."""
    return compile_expression(source).evaluate(make_ctx() if ctx is None else ctx)


def ev_vars(source: str, **variables: Any) -> Any:
    """Evaluate a body with the given `vars`."""
    return ev(source, make_ctx(vars=variables))


def quote(text: str) -> str:
    """A double-quoted DataWeave string literal whose value is text."""
    out = []
    for ch in text:
        if ch in '"\\$':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class SyntaxErrorMixin:
    """Assertions about compile-time errors."""

    def assert_error(self, source: str, offset: int, pattern: str) -> ExpressionError:
        """compile_expression(source) fails at offset with a message matching pattern."""
        case: Any = self
        e = case.assertRaises(ExpressionError, compile_expression, source)
        case.assertEqual((e.offset, bool(re.search(pattern, e.message))), (offset, True), e.message)
        return e


class CompileValueTests(SynchronousTestCase):
    """compile_value: which config values are expressions, and where errors point."""

    def test_whole_value_is_an_expression(self) -> None:
        """A value that is exactly #[...] compiles to an Expression with the body as source."""
        e = compile_value("#[attributes.method]")
        assert isinstance(e, Expression)
        self.assertEqual((e.source, e.evaluate(make_ctx())), ("attributes.method", "GET"))

    def test_surrounding_whitespace_allowed(self) -> None:
        """Whitespace around #[...] and inside the brackets is allowed."""
        e = compile_value("  \t#[ attributes.method ]\n")
        assert isinstance(e, Expression)
        self.assertEqual(e.evaluate(make_ctx()), "GET")

    def test_plain_strings_stay_strings(self) -> None:
        """Values without #[ at the start are returned unchanged, mixed text included."""
        for text in ("flex", "", "Bearer #[vars.token]", "#notanexpression", "[1]", " # [x]"):
            self.assertIs(compile_value(text), text)

    def test_nested_brackets_in_body(self) -> None:
        """The last ] closes the value; brackets inside the body belong to the expression."""
        e = compile_value("#[[1, 2][0]]")
        assert isinstance(e, Expression)
        self.assertEqual(e.evaluate(make_ctx()), 1)

    def test_unterminated_value_is_an_error(self) -> None:
        """A value starting with #[ without a closing ] is an error at its end."""
        e = self.assertRaises(ExpressionError, compile_value, "#[attributes.method  ")
        self.assertEqual(e.offset, 19)

    def test_empty_expression(self) -> None:
        """#[] and #[  ] are errors pointing inside the brackets."""
        self.assertEqual(self.assertRaises(ExpressionError, compile_value, "#[]").offset, 2)
        self.assertEqual(self.assertRaises(ExpressionError, compile_value, "#[  ]").offset, 4)

    def test_error_offsets_are_in_the_whole_value(self) -> None:
        """Errors inside the body are reported at their position in the config value."""
        e = self.assertRaises(ExpressionError, compile_value, "  #[ 1 + 2]")
        self.assertEqual(e.offset, 7)
        self.assertIn("arithmetic", e.message)

    def test_error_carries_message_and_offset(self) -> None:
        """ExpressionError exposes message and offset and names the offset in str()."""
        e = self.assertRaises(ExpressionError, compile_expression, "1 +")
        self.assertEqual(e.offset, 2)
        self.assertIn("at offset 2", str(e))
        self.assertIsInstance(e, ValueError)

    def test_references(self) -> None:
        """references names the root variables used, and nothing else."""
        cases = {
            "attributes.headers['x']": {"attributes"},
            "vars.claimSet.sub ++ authentication.principal": {"vars", "authentication"},
            "payload.a default 'x'": {"payload"},
            "lower('A') ++ uuid()": set(),
            "attributes['headers'] default vars": {"attributes", "vars"},
        }
        for source, refs in cases.items():
            self.assertEqual(compile_expression(source).references, frozenset(refs), source)

    def test_expression_equality_and_repr(self) -> None:
        """Expressions compare and hash by source; repr shows the #[...] form."""
        a, b = compile_expression("vars.a"), compile_expression("vars.a")
        self.assertEqual((a == b, hash(a) == hash(b)), (True, True))
        self.assertNotEqual(a, compile_expression("vars.b"))
        self.assertEqual(repr(a), "<Expression #[vars.a]>")


class LiteralTests(SynchronousTestCase, SyntaxErrorMixin):
    """Strings, numbers, booleans, null and arrays."""

    def test_strings_in_either_quote(self) -> None:
        """Single- and double-quoted strings evaluate to their text."""
        self.assertEqual((ev("'abc'"), ev('"abc"'), ev("''")), ("abc", "abc", ""))

    def test_escapes(self) -> None:
        """Every documented escape decodes to its character."""
        self.assertEqual(
            ev(r'"\\ \" \' \/ \b \f \n \r \t \$ \` \u00e9\u20AC"'),
            "\\ \" ' / \b \f \n \r \t $ ` é€",
        )
        self.assertEqual(ev(r"'it\'s'"), "it's")

    def test_other_quote_needs_no_escape(self) -> None:
        """A double quote inside single quotes (and vice versa) is literal."""
        self.assertEqual((ev("'say \"hi\"'"), ev('"it\'s"')), ('say "hi"', "it's"))

    def test_bad_escapes(self) -> None:
        """Unknown escapes and short \\u escapes are errors at the backslash."""
        self.assert_error(r'"ab\qc"', 3, r"unknown escape \\q")
        self.assert_error(r'"\u12"', 1, "four hex digits")

    def test_unterminated_string(self) -> None:
        """An unterminated string is an error at its opening quote."""
        self.assert_error("vars.a == 'abc", 10, "unterminated string")
        self.assert_error('"abc\\', 0, "unterminated string")

    def test_interpolation_rejected(self) -> None:
        """$(...) and $name inside strings are rejected; a lone or escaped $ is literal."""
        self.assert_error('"id: $(vars.id)"', 5, "interpolation")
        self.assert_error("'x $name'", 3, "interpolation")
        self.assertEqual((ev('"costs $5"'), ev('"$"'), ev(r'"\$(x)"')), ("costs $5", "$", "$(x)"))

    def test_numbers(self) -> None:
        """Integers, decimals, exponents and negative literals."""
        self.assertEqual(
            [ev("42"), ev("1.5"), ev("2e3"), ev("-7"), ev("-0.5")], [42, 1.5, 2000.0, -7, -0.5]
        )
        self.assertIs(type(ev("42")), int)

    def test_bad_numbers(self) -> None:
        """A letter glued to a number and an overflowing number are errors."""
        self.assert_error("12abc", 2, "after a number")
        self.assert_error("1e999", 0, "out of range")

    def test_booleans_and_null(self) -> None:
        """true, false and null literals."""
        self.assertEqual((ev("true"), ev("false"), ev("null")), (True, False, None))

    def test_arrays(self) -> None:
        """Array literals, nested and empty, with computed items."""
        self.assertEqual(ev("[1, 'a', true, [2, []]]"), [1, "a", True, [2, []]])
        self.assertEqual(ev("[]"), [])
        self.assertEqual(ev("[attributes.method, lower('X')]"), ["GET", "x"])

    def test_array_syntax_errors(self) -> None:
        """Unclosed arrays and trailing commas are errors at the right place."""
        self.assert_error("[1, 2", 5, "',' or ']'")
        self.assert_error("[1, ]", 4, "expected a value")


class SelectorTests(SynchronousTestCase, SyntaxErrorMixin):
    """Selectors: keys, indexes, null-safety and the selector table Flex documents."""

    def test_key_selectors(self) -> None:
        """.k, ."k", ['k'] and ["k"] select the same field."""
        data = {"a-b": 1, "k": {"n": 2}}
        for source in ("vars.d.k.n", 'vars.d."k".n', "vars.d['k']['n']", 'vars["d"]["k"].n'):
            self.assertEqual(ev_vars(source, d=data), 2, source)
        self.assertEqual(ev_vars("vars.d.'a-b'", d=data), 1)

    def test_keywords_as_field_names(self) -> None:
        """After '.', keywords are plain field names."""
        self.assertEqual(ev_vars("vars.default.if.not", default={"if": {"not": 3}}), 3)

    def test_dynamic_key(self) -> None:
        """A computed key selects from an object."""
        self.assertEqual(ev_vars("vars.m[vars.k ++ '2']", m={"a2": "hit"}, k="a"), "hit")

    def test_indexes(self) -> None:
        """Array and String indexes, negative from the end, out of range is null."""
        arr = [10, 20, 30]
        self.assertEqual(
            [ev_vars(f"vars.a[{i}]", a=arr) for i in ("0", "2", "-1", "-3", "3", "-4")],
            [10, 30, 30, 10, None, None],
        )
        self.assertEqual([ev("'hello'[1]"), ev("'hello'[-1]"), ev("'hello'[9]")], ["e", "o", None])
        self.assertEqual(ev_vars("vars.a[1.0]", a=arr), 20)

    def test_fractional_index_is_an_error(self) -> None:
        """A non-integral index fails at evaluation."""
        self.assertRaises(EvaluationError, ev_vars, "vars.a[vars.i]", a=[1], i=0.5)

    def test_array_key_selection(self) -> None:
        """arr.key collects the key from every object in the array (Array[String])."""
        items = [{"id": 1}, {"x": 0}, "str", {"id": 2}]
        self.assertEqual(ev_vars("vars.items.id", items=items), [1, 2])
        self.assertEqual(ev_vars("vars.items['id']", items=items), [1, 2])

    def test_null_safety(self) -> None:
        """Selecting anything on null yields null, however deep."""
        self.assertIsNone(ev_vars("vars.missing.a.b[0]['c']"))
        self.assertIsNone(ev("attributes.headers['absent'].x"))
        self.assertIsNone(ev("authentication.properties.claims.sub"))
        self.assertIsNone(ev("null[0]"))

    def test_object_by_index_is_unsupported(self) -> None:
        """Object[Number] is not in Flex's selector table: an evaluation error."""
        e = self.assertRaises(EvaluationError, ev, "attributes.headers[0]")
        self.assertIn("Object[Number]", str(e))

    def test_key_on_scalar_is_an_error(self) -> None:
        """Selecting a key from a String, Number or Boolean fails."""
        for source in ("'abc'.length", "vars.n.x", "true['a']"):
            self.assertRaises(EvaluationError, ev_vars, source, n=3)

    def test_bad_selector_types(self) -> None:
        """Selectors must be Strings or Numbers; Numbers index only arrays and strings."""
        self.assertRaises(EvaluationError, ev_vars, "vars.m[true]", m={})
        self.assertRaises(EvaluationError, ev_vars, "vars.m[null]", m={})
        self.assertRaises(EvaluationError, ev, "true[0]")

    def test_no_python_attribute_access(self) -> None:
        """Dunder-looking keys are plain keys: no Python attribute is ever read."""
        self.assertIsNone(ev_vars("vars.d.__class__", d={}))
        self.assertRaises(EvaluationError, ev_vars, "vars.s.__class__", s="x")
        self.assertRaises(EvaluationError, ev_vars, "vars.o.__dict__", o=object())

    def test_selector_syntax_errors(self) -> None:
        """Missing keys, unclosed brackets and calls on values are errors."""
        self.assert_error("attributes.", 11, "field name after '.'")
        self.assert_error("vars.5", 5, "field name after '.'")
        self.assert_error("attributes.headers['x'", 22, "expected ']'")
        self.assert_error("vars.f(1)", 6, "only functions can be called")


class OperatorTests(SynchronousTestCase):
    """Equality, relations, logic, default, ++, --, contains and if/else."""

    def test_equality(self) -> None:
        """== and != compare by value and type, arrays and objects structurally."""
        true_cases = [
            "1 == 1.0",
            "'a' == 'a'",
            "[1, [2]] == [1, [2]]",
            "null == null",
            "vars.o == vars.p",
            "'1' != 1",
            "true != 1",
            "[1] != [1, 2]",
            "vars.o != vars.q",
            "null != false",
        ]
        false_cases = ["'a' == 'b'", "'1' == 1", "true == 1", "0 == false", "vars.o == vars.r"]
        variables = {"o": {"a": [1]}, "p": {"a": [1.0]}, "q": {"a": [2]}, "r": {"b": [1]}}
        for source in true_cases:
            self.assertIs(ev_vars(source, **variables), True, source)
        for source in false_cases:
            self.assertIs(ev_vars(source, **variables), False, source)

    def test_relations(self) -> None:
        """>, <, >=, <= on numbers, strings and booleans."""
        cases = {
            "2 > 1": True,
            "1 > 2": False,
            "1 < 2": True,
            "2 <= 2": True,
            "3 >= 4": False,
            "'b' > 'a'": True,
            "'B' < 'a'": True,
            "true > false": True,
        }
        for source, expected in cases.items():
            self.assertIs(ev(source), expected, source)

    def test_relation_coerces_right_to_left(self) -> None:
        """The right operand is coerced to the left's type, as DataWeave documents."""
        # "123" > 12 compares "123" with "12" as strings; 123 > "12" compares numbers.
        self.assertEqual(
            (ev("'123' > 12"), ev("'100' > 12"), ev("123 > '12'")), (True, False, True)
        )

    def test_incomparable_values(self) -> None:
        """Comparing incompatible types is an evaluation error."""
        for source in ("1 > 'x'", "null < 1", "[1] > [0]", "true > 1", "vars.m >= 1"):
            self.assertRaises(EvaluationError, ev_vars, source, m={})

    def test_and_or(self) -> None:
        """and/or truth tables."""
        for a in (True, False):
            for b in (True, False):
                self.assertIs(ev_vars("vars.a and vars.b", a=a, b=b), a and b)
                self.assertIs(ev_vars("vars.a or vars.b", a=a, b=b), a or b)

    def test_short_circuit(self) -> None:
        """The right side of and/or is not evaluated when the left decides."""
        self.assertIs(ev_vars("vars.f and (1 > vars.x)", f=False, x="x"), False)
        self.assertIs(ev_vars("vars.t or (1 > vars.x)", t=True, x="x"), True)
        self.assertRaises(EvaluationError, ev_vars, "vars.t and (1 > vars.x)", t=True, x="x")

    def test_logic_needs_booleans(self) -> None:
        """and/or/not/if on non-Booleans are evaluation errors (no truthiness)."""
        for source in ("vars.s and true", "true and vars.s", "vars.n or false", "false or vars.n"):
            self.assertRaises(EvaluationError, ev_vars, source, s="yes", n=None)
        self.assertRaises(EvaluationError, ev_vars, "not vars.s", s="")
        self.assertRaises(EvaluationError, ev_vars, "if (vars.s) 1 else 2", s="true")

    def test_not(self) -> None:
        """not negates a Boolean."""
        self.assertEqual((ev("not true"), ev("not false"), ev("not (1 == 2)")), (False, True, True))

    def test_default(self) -> None:
        """default replaces null only (not false or '')."""
        self.assertEqual(ev_vars("vars.missing default 'd'"), "d")
        self.assertEqual(ev_vars("vars.v default 'd'", v="set"), "set")
        self.assertIs(ev_vars("vars.v default true", v=False), False)
        self.assertEqual(ev_vars("vars.v default 'd'", v=""), "")
        self.assertEqual(ev("attributes.headers['absent'] default 'none'"), "none")
        self.assertEqual(ev_vars("vars.a default vars.b default 'c'"), "c")

    def test_concat(self) -> None:
        """++ joins strings and arrays, coercing scalars to strings."""
        self.assertEqual(ev("'ab' ++ 'cd'"), "abcd")
        self.assertEqual(ev("[1] ++ [2, 3]"), [1, 2, 3])
        self.assertEqual(ev("'n=' ++ 5 ++ ',' ++ 1.5 ++ ',' ++ true"), "n=5,1.5,true")
        self.assertEqual(ev("attributes.method ++ ' ' ++ attributes.requestPath"), "GET /orders/42")

    def test_concat_errors(self) -> None:
        """++ with null, objects, or an array and a scalar fails."""
        for source in ("vars.missing ++ 'x'", "'x' ++ null", "[1] ++ 'x'", "vars.m ++ 'x'"):
            self.assertRaises(EvaluationError, ev_vars, source, m={"a": 1})

    def test_remove(self) -> None:
        """-- removes array items, or object keys."""
        self.assertEqual(ev("[1, 2, 3, 2] -- [2]"), [1, 3])
        self.assertEqual(ev_vars("vars.m -- ['a']", m={"a": 1, "b": 2}), {"b": 2})
        self.assertEqual(ev_vars("vars.m -- vars.n", m={"a": 1, "b": 2}, n={"b": 0}), {"a": 1})
        self.assertIsNone(ev_vars("vars.missing -- [1]"))
        self.assertRaises(EvaluationError, ev, "'abc' -- 'a'")

    def test_contains(self) -> None:
        """contains on strings (substring) and arrays (element equality), infix or called."""
        self.assertEqual(
            [
                ev("'hello' contains 'ell'"),
                ev("'hello' contains 'xyz'"),
                ev("contains('hello', 'h')"),
                ev("[1, 'a', [2]] contains [2]"),
                ev("[1, 2] contains '1'"),
                ev("'v1' contains 1"),
            ],
            [True, False, True, True, False, True],
        )

    def test_contains_errors(self) -> None:
        """contains on null or an object is an evaluation error (no such overload in Flex)."""
        self.assertRaises(EvaluationError, ev, "attributes.headers['absent'] contains 'x'")
        self.assertRaises(EvaluationError, ev, "attributes.headers contains 'x'")

    def test_if_else(self) -> None:
        """if/else picks a branch; else-if chains work."""
        source = "if (vars.n == 1) 'one' else if (vars.n == 2) 'two' else 'many'"
        self.assertEqual([ev_vars(source, n=n) for n in (1, 2, 3)], ["one", "two", "many"])

    def test_if_only_evaluates_the_chosen_branch(self) -> None:
        """The branch not taken is not evaluated."""
        self.assertEqual(ev_vars("if (vars.t) 'ok' else (1 > vars.x)", t=True, x="x"), "ok")


class PrecedenceTests(SynchronousTestCase):
    """Operator precedence as DataWeave's precedence table and operator docs define it."""

    def test_not_takes_the_rest(self) -> None:
        """`not true or true` is `not (true or true)` (DataWeave operator docs)."""
        self.assertIs(ev("not true or true"), False)
        self.assertIs(ev("false or not true or true"), False)
        self.assertIs(ev("2 == 4 or not 1 == 2"), True)
        self.assertIs(ev("true and not false or false"), True)

    def test_and_binds_tighter_than_or(self) -> None:
        """and is level 7, or level 8."""
        self.assertIs(ev("true or false and false"), True)
        self.assertIs(ev("false and false or true"), True)

    def test_comparison_binds_tighter_than_logic(self) -> None:
        """== and relations bind tighter than and/or; relations tighter than ==."""
        self.assertIs(ev("1 == 1 and 2 == 2"), True)
        self.assertIs(ev("1 < 2 == true"), True)
        self.assertIs(ev("2 > 1 == 3 > 2"), True)

    def test_infix_functions_are_loosest(self) -> None:
        """++, contains and splitBy sit at level 9, below or/and/==."""
        self.assertEqual(ev("'a' ++ 'b' == 'ab'"), "afalse")  # 'a' ++ ('b' == 'ab')
        self.assertRaises(EvaluationError, ev, "'abc' contains 'b' and true")
        self.assertIs(ev("('abc' contains 'b') and true"), True)

    def test_default_and_infix_are_left_associative_at_one_level(self) -> None:
        """`a default b ++ c` is `(a default b) ++ c`."""
        self.assertEqual(ev_vars("vars.missing default 'x' ++ '!'"), "x!")
        self.assertEqual(ev_vars("vars.v default 'x' ++ '!'", v="v"), "v!")
        self.assertEqual(ev("'a,b' splitBy ',' ++ ['c']"), ["a", "b", "c"])

    def test_if_else_branch_extends_right(self) -> None:
        """if/else is level 10: the else branch takes the rest."""
        self.assertEqual(ev("if (true) 'a' else 'b' ++ 'c'"), "a")
        self.assertEqual(ev("if (false) 'a' else 'b' ++ 'c'"), "bc")
        self.assertEqual(ev("(if (false) 'a' else 'b') ++ 'c'"), "bc")

    def test_selectors_bind_tightest(self) -> None:
        """Selectors apply to the nearest operand, parentheses to the whole."""
        self.assertEqual(ev("'a,b' splitBy ','[0]"), ["a", "b"])  # ','[0] is ','
        self.assertEqual(ev("('a,b' splitBy ',')[1]"), "b")
        self.assertEqual(ev("('192.88.99.0' splitBy('.'))[0]"), "192")


class FunctionTests(SynchronousTestCase, SyntaxErrorMixin):
    """lower, upper, trim, splitBy, sizeOf, uuid, the Strings module and Binaries."""

    def test_lower_upper_trim(self) -> None:
        """Case and whitespace functions on strings, null passes through."""
        self.assertEqual(
            [ev("lower('AbC')"), ev("upper('AbC')"), ev("trim('  a b \\t\\n')")],
            ["abc", "ABC", "a b"],
        )
        for fn in ("lower", "upper", "trim"):
            self.assertIsNone(ev_vars(f"{fn}(vars.missing)"), fn)

    def test_scalar_coercion(self) -> None:
        """Numbers and Booleans are coerced where a String is expected."""
        self.assertEqual(
            (ev("upper(true)"), ev("lower(12)"), ev("trim(1.5)")), ("TRUE", "12", "1.5")
        )

    def test_string_functions_reject_structures(self) -> None:
        """lower of an array or object fails."""
        self.assertRaises(EvaluationError, ev, "lower([1])")
        self.assertRaises(EvaluationError, ev, "upper(attributes.headers)")

    def test_split_by(self) -> None:
        """splitBy: infix or called, no match, empty separator, trailing parts kept."""
        self.assertEqual(ev("'a-b-c' splitBy '-'"), ["a", "b", "c"])
        self.assertEqual(ev("splitBy('first,middle,last', ',')"), ["first", "middle", "last"])
        self.assertEqual(ev("'no split' splitBy 'NO'"), ["no split"])
        self.assertEqual(ev("'abc' splitBy ''"), ["a", "b", "c"])
        self.assertEqual(ev("'a,b,' splitBy ','"), ["a", "b", ""])
        self.assertRaises(EvaluationError, ev, "vars.missing splitBy ','")

    def test_size_of(self) -> None:
        """sizeOf counts array items, object keys and string characters."""
        self.assertEqual(
            [ev("sizeOf([1, 2, 3])"), ev("sizeOf('héllo')"), ev("sizeOf(attributes.headers)")],
            [3, 5, 7],
        )
        self.assertRaises(EvaluationError, ev, "sizeOf(null)")
        self.assertRaises(EvaluationError, ev, "sizeOf(1)")

    def test_uuid(self) -> None:
        """uuid() is a fresh version-4 UUID on every evaluation (never folded)."""
        e = compile_expression("uuid()")
        ctx = make_ctx()
        a, b = e.evaluate(ctx), e.evaluate(ctx)
        pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
        self.assertRegex(a, pattern)
        self.assertNotEqual(a, b)

    def test_substring_functions_match_dataweave_docs(self) -> None:
        """The four dw::core::Strings functions reproduce their documented example tables."""
        docs = {
            "substringAfter": [None, "", "c", "cba", "", "bc"],
            "substringAfterLast": [None, "", "c", "a", "", None],
            "substringBefore": [None, "", "a", "ab", "", ""],
            "substringBeforeLast": [None, "", "a", "abc", "", "ab"],
        }
        args = [("null", '"\'"'), ("''", "'-'"), ("'abc'", "'b'")]
        for name, expected in docs.items():
            third = "'abc'" if name == "substringBefore" else "'abcba'"
            third_sep = "'c'" if name == "substringBefore" else "'b'"
            rows = [*args, (third, third_sep), ("'abc'", "'d'"), ("'abc'", "''")]
            got = [ev(f"dw::core::Strings::{name}({t}, {s})") for t, s in rows]
            self.assertEqual(got, expected, name)

    def test_substring_infix_and_multichar(self) -> None:
        """Module functions work infix and with multi-character separators."""
        self.assertEqual(
            ev("attributes.headers['x-forwarded-for'] dw::core::Strings::substringBefore ', '"),
            "203.0.113.7",
        )
        self.assertEqual(ev("dw::core::Strings::substringAfter('Bearer abc', 'Bearer ')"), "abc")

    def test_core_module_alias(self) -> None:
        """dw::Core::lower is the same function as lower."""
        self.assertEqual(ev("dw::Core::lower('X')"), "x")

    def test_binaries(self) -> None:
        """fromBase64 with toString or splitBy, as Flex's page shows."""
        self.assertEqual(
            ev(
                "dw::util::Coercions::toString(dw::core::Binaries::fromBase64('dXNlcjpwYXNz'), 'UTF-8')"
            ),
            "user:pass",
        )
        self.assertEqual(
            ev("splitBy(dw::core::Binaries::fromBase64('dXNlcjpwYXNz'), ':')"), ["user", "pass"]
        )
        self.assertEqual(ev("dw::core::Binaries::fromBase64('YQ') contains 'a'"), True)

    def test_binary_result_rejected(self) -> None:
        """A Binary final result is an evaluation error (Flex supports none)."""
        e = self.assertRaises(EvaluationError, ev, "dw::core::Binaries::fromBase64('YQ==')")
        self.assertIn("Binary", str(e))

    def test_binary_errors(self) -> None:
        """Bad base64 and unknown encodings fail at evaluation."""
        self.assertRaises(
            EvaluationError, ev_vars, "dw::core::Binaries::fromBase64(vars.s)", s="!!"
        )
        self.assertRaises(
            EvaluationError,
            ev,
            "dw::util::Coercions::toString(dw::core::Binaries::fromBase64('YQ=='), 'nope')",
        )

    def test_function_syntax_errors(self) -> None:
        """Wrong arity, uncalled functions, unary functions infix, unknown functions."""
        self.assert_error("lower('a', 'b')", 5, r"lower takes 1 argument\(s\), got 2")
        self.assert_error("uuid(1)", 4, "uuid takes 0")
        self.assert_error("lower", 5, "must be called")
        self.assert_error("'A' lower", 4, "lower takes 1 argument")
        self.assert_error("substringAfter('a', 'b')", 0, "dw::core::Strings::substringAfter")
        self.assert_error("now()", 0, "'now' is not in Flex's DataWeave subset")
        self.assert_error("lower('a'", 9, "',' or '\\)'")


class ContextTests(SynchronousTestCase):
    """ExpressionContext: every attribute, authentication, vars, payload, laziness."""

    def test_request_attributes(self) -> None:
        """method, paths, query, addresses, scheme and version as Flex names them."""
        ctx = make_ctx()
        cases = {
            "attributes.method": "GET",
            "attributes.requestPath": "/orders/42",
            "attributes.requestUri": "/orders/42?q=shoes&debug=true&q=boots&name=a%20b+c&empty=",
            "attributes.queryString": "q=shoes&debug=true&q=boots&name=a%20b+c&empty=",
            "attributes.localAddress": "127.0.0.1:8081",
            "attributes.remoteAddress": "192.0.2.10:51234",
            "attributes.scheme": "https",
            "attributes.version": "HTTP/1.1",
            "attributes.statusCode": None,
        }
        for source, expected in cases.items():
            self.assertEqual(ev(source, ctx), expected, source)

    def test_query_params(self) -> None:
        """queryParams are decoded, the first value of a repeated name wins, blanks kept."""
        self.assertEqual(
            ev("attributes.queryParams"),
            {"q": "shoes", "debug": "true", "name": "a b c", "empty": ""},
        )

    def test_no_query(self) -> None:
        """Without '?' the query string is empty and queryParams is {}."""
        ctx = make_ctx(target=b"/plain")
        self.assertEqual(
            [ev(s, ctx) for s in ("attributes.queryString", "attributes.queryParams")], ["", {}]
        )
        self.assertEqual(ev("attributes.requestUri", ctx), "/plain")

    def test_absolute_form_target(self) -> None:
        """An absolute-form target loses scheme and authority in path and URI."""
        ctx = make_ctx(target=b"http://upstream:8080/a/b?x=1")
        self.assertEqual(
            [ev(s, ctx) for s in ("attributes.requestPath", "attributes.requestUri")],
            ["/a/b", "/a/b?x=1"],
        )
        bare = make_ctx(target=b"http://upstream?x=1")
        self.assertEqual(ev("attributes.requestPath", bare), "/")

    def test_headers(self) -> None:
        """Header keys are lower-case; repeats joined with ',' (cookie with '; ')."""
        headers = ev("attributes.headers")
        self.assertEqual(headers["accept"], "text/html,application/json")
        self.assertEqual(headers["cookie"], "a=1; b=2")
        self.assertEqual(headers["x-user"], "alice")
        self.assertNotIn("X-User", headers)
        self.assertEqual(ev("attributes.headers['X-User']"), None)

    def test_version_forms(self) -> None:
        """Version given as b'1.0' or b'HTTP/2' both read as HTTP/x."""
        self.assertEqual(ev("attributes.version", make_ctx(version=b"1.0")), "HTTP/1.0")
        self.assertEqual(ev("attributes.version", make_ctx(version=b"HTTP/2")), "HTTP/2")

    def test_status_code(self) -> None:
        """statusCode is the response status in the response phase."""
        self.assertIs(ev("attributes.statusCode == 201", make_ctx(status=201)), True)

    def test_whole_attributes_object(self) -> None:
        """attributes as an object: dynamic keys, sizeOf, and null fields left out."""
        ctx = make_ctx()
        self.assertEqual(ev("attributes['method']", ctx), "GET")
        self.assertIsNone(ev("attributes['nope']", ctx))
        self.assertEqual(ev("sizeOf(attributes)", ctx), 10)
        self.assertEqual(ev("sizeOf(attributes)", make_ctx(status=200)), 11)
        rendered = to_text(ev("attributes", ctx))
        self.assertIn('"method":"GET"', rendered)
        self.assertNotIn("statusCode", rendered)

    def test_authentication(self) -> None:
        """authentication.* from an Authentication value, a mapping, or nobody (null)."""
        auth = Authentication(
            principal="alice", client_id="cid", client_name="app", properties={"claims": {"a": 1}}
        )
        ctx = make_ctx(authentication=auth)
        self.assertEqual(
            [
                ev(s, ctx)
                for s in (
                    "authentication.principal",
                    "authentication.clientId",
                    "authentication.clientName",
                    "authentication.properties.claims.a",
                    "authentication['principal']",
                )
            ],
            ["alice", "cid", "app", 1, "alice"],
        )
        mapping = make_ctx(authentication={"principal": "bob"})
        self.assertEqual(ev("authentication.principal", mapping), "bob")
        self.assertIsNone(ev("authentication.principal"))
        self.assertIsNone(ev("authentication"))

    def test_vars_and_payload(self) -> None:
        """vars and payload are what the caller supplied; vars defaults to an empty object."""
        self.assertEqual(ev_vars("vars.claimSet.sub", claimSet={"sub": "u1"}), "u1")
        self.assertEqual(ev("sizeOf(vars)"), 0)
        self.assertEqual(ev("payload.items[0]", make_ctx(payload={"items": ["x"]})), "x")
        self.assertIsNone(ev("payload"))

    def test_views_are_lazy(self) -> None:
        """The header list is not read unless an expression reads headers; the whole view is
        built once and then serves every header lookup."""

        class CountingHeaders(list[tuple[bytes, bytes]]):
            """A header list that counts how often it is iterated."""

            reads = 0

            def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
                type(self).reads += 1
                return super().__iter__()

        ctx = make_ctx(headers=CountingHeaders(HEADERS))
        ev("attributes.method ++ attributes.requestPath ++ attributes.remoteAddress", ctx)
        self.assertEqual(CountingHeaders.reads, 0)
        self.assertEqual(ev("attributes.headers['x-user']", ctx), "alice")
        self.assertEqual(CountingHeaders.reads, 1)
        ev("sizeOf(attributes.headers)", ctx)
        self.assertEqual(CountingHeaders.reads, 2)
        self.assertEqual(ev("attributes.headers['accept']", ctx), "text/html,application/json")
        ev("attributes.headers", ctx)
        self.assertEqual(CountingHeaders.reads, 2)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from([b"A", b"a", b"X-Y", b"x-y", b"Cookie", b"cookie", b"\xc0"]),
                st.binary(max_size=5),
            ),
            max_size=8,
        ),
        st.sampled_from(["a", "A", "x-y", "cookie", "\xc0", "\xe0", "z", "\u20ac"]),
    )
    def test_header_lookup_agrees_with_view(self, raw: list[tuple[bytes, bytes]], key: str) -> None:
        """A single-header lookup before and after the view exists gives the same value."""
        ctx = make_ctx(headers=raw)
        source = f"attributes.headers[{quote(key)}]"
        before = ev(source, ctx)
        whole = ev("attributes.headers", ctx)
        self.assertEqual((before, ev(source, ctx)), (whole.get(key), whole.get(key)))

    def test_unknown_attribute_fields_rejected(self) -> None:
        """attributes.<unknown> and authentication.<unknown> are compile errors (typos)."""
        e = self.assertRaises(ExpressionError, compile_expression, "attributes.header['x']")
        self.assertEqual(e.offset, 11)
        self.assertIn("headers", e.message)
        e = self.assertRaises(ExpressionError, compile_expression, "authentication.user")
        self.assertEqual(e.offset, 15)

    def test_bad_authentication_value(self) -> None:
        """An authentication that is not a mapping is an evaluation error, not a crash."""
        self.assertRaises(
            EvaluationError, ev, "authentication.principal", make_ctx(authentication=42)
        )


class FlexDocExampleTests(SynchronousTestCase):
    """The expressions quoted in Flex's policy docs and the reference notes."""

    def test_policy_examples(self) -> None:
        """Rate limiting, JWT, IP, header injection, logging and caching expressions."""
        claims = {"sub": "user-1", "client_id": "cid-9", "scope": "read write"}
        ctx = make_ctx(
            vars={"claimSet": claims},
            authentication=Authentication(principal="alice"),
        )
        cases: dict[str, Any] = {
            "#[attributes.method]": "GET",
            "#[attributes.headers['client_id']]": "c-123",
            "#[attributes.headers['authorization']]": None,
            "#[attributes.queryParams['q']]": "shoes",
            "#[attributes.headers['jwt']]": "tok.en.sig",
            "#[vars.claimSet.client_id]": "cid-9",
            "#[vars.claimSet.sub]": "user-1",
            "#[vars.claimSet.scope contains 'read']": True,
            "#[authentication.principal]": "alice",
            "#[attributes.headers['x-forwarded-for']]": "203.0.113.7, 10.0.0.1",
            "#[attributes.remoteAddress]": "192.0.2.10:51234",
            "#[attributes.requestPath]": "/orders/42",
            "#[attributes.queryParams['debug'] == 'true']": True,
            "#[attributes.method == 'GET' or attributes.method == 'HEAD']": True,
        }
        for text, expected in cases.items():
            e = compile_value(text)
            assert isinstance(e, Expression), text
            self.assertEqual(e.evaluate(ctx), expected, text)

    def test_caching_response_expression(self) -> None:
        """The HTTP caching policy's default responseExpression on a few statuses."""
        e = compile_value(
            "#[[200,203,204,206,300,301,404,405,410,414,501] contains attributes.statusCode]"
        )
        assert isinstance(e, Expression)
        self.assertEqual(
            [e.evaluate(make_ctx(status=s)) for s in (200, 404, 500, 302)],
            [True, True, False, False],
        )

    def test_logging_message_of_all_headers(self) -> None:
        """message: #[attributes.headers] renders as a JSON object."""
        e = compile_value("#[attributes.headers]")
        assert isinstance(e, Expression)
        text = to_text(e.evaluate(make_ctx()))
        self.assertIn('"x-user":"alice"', text)


class RejectedConstructTests(SynchronousTestCase, SyntaxErrorMixin):
    """Constructs outside Flex's subset are refused with a message and position."""

    def test_rejections(self) -> None:
        """Each construct fails at the offending token with a message naming it."""
        cases = [
            ("1 + 2", 2, "arithmetic operator '\\+'"),
            ("3 - 1", 2, "arithmetic operator '-'"),
            ("2 * 3", 2, "arithmetic operator '\\*'"),
            ("4 / 2", 2, "division or a regex"),
            ("vars.a map (x) -> x", 7, "'map' is not in"),
            ("vars.a filter $ > 1", 7, "'filter' is not in"),
            ("(x) -> x", 0, "lambdas"),
            ("(a, b) -> a", 0, "lambdas"),
            ("() -> 1", 0, "lambdas"),
            ("do { 1 }", 0, "'do' blocks"),
            ("using (x = 1) x", 0, "'using'"),
            ("{a: 1}", 0, "object literals"),
            ("!true", 0, "use 'not'"),
            ("1 ~= 1", 2, "'~='"),
            ("$.a", 0, "lambda parameters"),
            ("vars.a..b", 6, "descendants"),
            ("vars.*a", 4, "multi-value"),
            ("vars.@a", 4, "attribute selector"),
            ("vars.a!", 6, "use 'not'"),
            ("vars[?($ > 1)]", 5, "existence or filter"),
            ("vars.a as String", 7, "'as' is not in"),
            ("vars.a is String", 7, "'is' is not in"),
            ("vars.a match { case 1 -> 2 }", 7, "'match' is not in"),
            ("|2020-01-01|", 0, "date/time"),
            ("1 >> [2]", 2, "prepend"),
            ("[1] << 2", 4, "append"),
            ("fun f() = 1", 0, "function declarations"),
            ("var x = 1", 0, "variable declarations"),
            ("unless (true) 1 else 2", 0, "'unless'"),
            ("vars.a = 1", 7, "compare with '=='"),
            ("vars[1 to 2]", 7, "'to' is not in"),
            ("`x`", 0, "backtick"),
            ("foo", 0, "unknown name 'foo'"),
            ("attributes(1)", 10, "is a variable, not a function"),
            ("1 2", 2, "expected an operator or the end"),
            ("if (true) 1", 11, "'else'"),
            ("if true 1 else 2", 3, "'\\(' after 'if'"),
            ("else 1", 0, "'else' without 'if'"),
            ("and true", 0, "needs a left operand"),
            ("not", 3, "operand for 'not'"),
            ("'a' ++", 6, "expected a value"),
            ("(1 == 1", 7, "expected '\\)'"),
            ("ä", 0, "unexpected character"),
        ]
        for source, offset, pattern in cases:
            self.assert_error(source, offset, pattern)

    def test_deep_nesting_is_bounded(self) -> None:
        """Absurd nesting is an ExpressionError, not a RecursionError."""
        for source in ("(" * 5000 + "1" + ")" * 5000, "[" * 5000, "not " * 5000 + "true"):
            self.assertRaises(ExpressionError, compile_expression, source)
        self.assertEqual(ev("(" * 30 + "1" + ")" * 30), 1)


class EvaluationErrorTests(SynchronousTestCase):
    """Evaluation failures are EvaluationErrors naming the expression."""

    def test_message_names_the_expression(self) -> None:
        """The error message includes the expression source."""
        e = self.assertRaises(EvaluationError, ev, "sizeOf(attributes.statusCode)")
        self.assertIn("#[sizeOf(attributes.statusCode)]", str(e))

    def test_unexpected_python_values_become_evaluation_errors(self) -> None:
        """Odd values in vars (sets, objects) never leak Python exceptions."""
        for source in ("vars.s contains 1", "vars.o ++ 'x'", "sizeOf(vars.o)", "vars.o > 1"):
            self.assertRaises(EvaluationError, ev_vars, source, s={1, 2}, o=object())


class ToTextTests(SynchronousTestCase):
    """to_text: how results become header or log text."""

    def test_rendering(self) -> None:
        """Strings as-is, scalars as DataWeave prints them, null empty, structures as JSON."""
        self.assertEqual(
            [
                to_text("x"),
                to_text(None),
                to_text(True),
                to_text(3),
                to_text(2.0),
                to_text(2.5),
                to_text([1, "a", None]),
                to_text({"k": [True]}),
            ],
            ["x", "", "true", "3", "2", "2.5", '[1,"a",null]', '{"k":[true]}'],
        )


_TOKENS = [
    "attributes", "headers", "vars", "authentication", "payload", ".", "[", "]", "(", ")",
    "'x'", '"y"', "1", "-2", "2.5", "true", "false", "null", "==", "!=", ">", "<", ">=", "<=",
    "and", "or", "not", "++", "--", "default", "contains", "splitBy", "lower", "upper", "trim",
    "sizeOf", "uuid", "if", "else", ",", "method", "queryParams", "statusCode", "principal",
    "dw::core::Strings::substringAfter", "dw::core::Binaries::fromBase64", "map", "->", "$",
    "{", "}", "+", "#[", "'", '"', "\\", "@", "?", "!", "..", "*", "|", "`",
]  # fmt: skip
_VARS = {"a": [1, "x", {"k": None}], "m": {"x": "1"}, "s": "text", "n": 3.5, "b": True}


class PropertyTests(SynchronousTestCase):
    """Hypothesis properties: the parser's total behaviour and agreement with Python."""

    @settings(max_examples=400, deadline=None)
    @given(st.text(max_size=80))
    def test_parser_only_raises_expression_error(self, text: str) -> None:
        """Arbitrary text compiles or raises ExpressionError with an in-range offset."""
        for compile_ in (compile_expression, compile_value):
            try:
                compile_(text)
            except ExpressionError as e:
                self.assertTrue(0 <= e.offset <= len(text), (text, e.offset))

    @settings(max_examples=600, deadline=None)
    @given(st.lists(st.sampled_from(_TOKENS), max_size=14))
    def test_token_soup_compiles_or_errors_and_evaluates_or_errors(self, tokens: list[str]) -> None:
        """Random token sequences: ExpressionError or an Expression whose evaluation returns a
        value or raises EvaluationError, never anything else."""
        source = " ".join(tokens)
        try:
            e = compile_expression(source)
        except ExpressionError as err:
            self.assertTrue(0 <= err.offset <= len(source))
            return
        try:
            e.evaluate(make_ctx(vars=_VARS, status=200))
        except EvaluationError:
            pass

    @given(st.text(), st.text())
    def test_concat_agrees_with_python(self, a: str, b: str) -> None:
        """++ on strings is Python concatenation, via vars and via literals."""
        self.assertEqual(ev_vars("vars.a ++ vars.b", a=a, b=b), a + b)
        self.assertEqual(ev(f"{quote(a)} ++ {quote(b)}"), a + b)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.sampled_from(
                    ["attributes.method", "attributes.requestPath", "attributes.requestUri",
                     "attributes.queryString", "attributes.version", "attributes.scheme",
                     "attributes.headers.host", "vars.s", "1", "true"]
                ),
                st.text(max_size=5).map(quote),
            ),
            min_size=2,
            max_size=7,
        ),
        st.text(max_size=5),
    )
    def test_concat_chains_agree_with_python(self, pieces: list[str], s: str) -> None:
        """A chain of `++` over attributes (the String ones compile into one joining closure),
        literals and other values gives what joining each piece's own text gives."""
        ctx = make_ctx(vars={"s": s})
        expected = "".join(to_text(ev(piece, ctx)) for piece in pieces)
        self.assertEqual(ev(" ++ ".join(pieces), ctx), expected)

    def test_string_concat_compiles_into_one_closure(self) -> None:
        """`++` between Strings known at compile time (String attributes, literals) is joined
        by the compiled closure: the generic `++` function is not called when evaluating."""
        from flexgw.policies import expressions

        def refuse(a: object, b: object) -> Any:
            raise AssertionError("the generic ++ ran")

        functions = dict(expressions._OPERATOR_FUNCTIONS)
        functions["++"] = attrs.evolve(functions["++"], impl=refuse)
        self.patch(expressions, "_OPERATOR_FUNCTIONS", functions)
        source = "attributes.method ++ ' ' ++ attributes.requestPath ++ '?' ++ attributes.queryString"
        self.assertEqual(ev(source), "GET /orders/42?q=shoes&debug=true&q=boots&name=a%20b+c&empty=")
        with self.assertRaises(EvaluationError):  # a header is no String known at compile time
            ev("attributes.method ++ attributes.headers.host")

    @given(st.text())
    def test_string_literals_round_trip(self, s: str) -> None:
        """Any string, quoted with escapes, evaluates back to itself."""
        self.assertEqual(ev(quote(s)), s)

    @given(st.text())
    def test_case_and_trim_agree_with_python(self, s: str) -> None:
        """lower, upper, trim and sizeOf agree with str.lower, str.upper, str.strip, len."""
        got = ev_vars("[lower(vars.s), upper(vars.s), trim(vars.s), sizeOf(vars.s)]", s=s)
        self.assertEqual(got, [s.lower(), s.upper(), s.strip(), len(s)])

    @given(st.text(), st.text(min_size=1))
    def test_split_and_contains_agree_with_python(self, s: str, sep: str) -> None:
        """splitBy with a non-empty separator is str.split; contains is `in`."""
        self.assertEqual(ev_vars("vars.s splitBy vars.sep", s=s, sep=sep), s.split(sep))
        self.assertIs(ev_vars("vars.s contains vars.sep", s=s, sep=sep), sep in s)

    @given(
        st.one_of(
            st.tuples(st.text(), st.text()),
            st.tuples(
                st.one_of(st.integers(), st.floats(allow_nan=False)),
                st.one_of(st.integers(), st.floats(allow_nan=False)),
            ),
        )
    )
    def test_comparisons_are_consistent(self, pair: tuple[Any, Any]) -> None:
        """For two Numbers or two Strings, exactly one of <, ==, > holds and the others follow."""
        a, b = pair
        r = ev_vars("[vars.a < vars.b, vars.a == vars.b, vars.a > vars.b, vars.a <= vars.b, "
                    "vars.a >= vars.b, vars.a != vars.b, vars.b < vars.a]", a=a, b=b)  # fmt: skip
        lt, eq, gt, le, ge, ne, b_lt_a = r
        self.assertEqual([lt, eq, gt].count(True), 1, (a, b, r))
        self.assertEqual((le, ge, ne, b_lt_a), (lt or eq, gt or eq, not eq, gt))
        self.assertEqual((lt, eq, gt), (a < b, a == b, a > b))


class MappingValueTests(SynchronousTestCase):
    """Values from custom Mapping types behave as objects."""

    def test_custom_mapping(self) -> None:
        """Any Mapping in vars selects, sizes and compares like a dict."""

        class Frozen(Mapping[str, Any]):
            """A minimal read-only mapping."""

            def __init__(self, d: dict[str, Any]) -> None:
                self._d = d

            def __getitem__(self, k: str) -> Any:
                return self._d[k]

            def __iter__(self) -> Iterator[str]:
                return iter(self._d)

            def __len__(self) -> int:
                return len(self._d)

        f = Frozen({"a": 1})
        self.assertEqual(
            [
                ev_vars(s, f=f)
                for s in ("vars.f.a", "sizeOf(vars.f)", "vars.f == vars.f", "vars.f.b")
            ],
            [1, 1, True, None],
        )
