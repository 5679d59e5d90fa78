"""Unit tests of the request path rule (flexgw.http.path): every spelling, and its properties."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http.errors import GatewayError
from flexgw.http.path import (
    BACKSLASH,
    DOT_PARAMETERS,
    DOT_SEGMENT,
    ENCODED_NUL,
    ESCAPED_FORWARD,
    ESCAPED_KEEP,
    ESCAPED_REDIRECT,
    ESCAPED_SLASH,
    ESCAPED_SLASH_ACTIONS,
    MALFORMED_ESCAPE,
    OVERLONG_UTF8,
    PathRules,
    Redirect,
    needs_work,
    normalize_path,
)

SLOW = [HealthCheck.too_slow]

#: The spellings of the attack run (issue 19 item 5) under the default rules.
DEFAULT_OUTCOMES: list[tuple[bytes, bytes | GatewayError]] = [
    (b"/api/..;/admin", DOT_PARAMETERS),
    (b"/api/.;/admin", DOT_PARAMETERS),
    (b"/api/..;jsessionid=x/admin", DOT_PARAMETERS),
    (b"/api/%2e%2e;/admin", DOT_PARAMETERS),
    (b"/api/..%3b/admin", DOT_PARAMETERS),
    (b"/api/..%3Bx/admin", DOT_PARAMETERS),
    (b"/api/%2E%2E%2Fadmin", ESCAPED_SLASH),
    (b"/api/..%2fadmin", ESCAPED_SLASH),
    (b"/api/..%5cadmin", ESCAPED_SLASH),
    (b"/api/..%00/admin", ENCODED_NUL),
    (b"/api/%c0%ae%c0%ae/admin", OVERLONG_UTF8),
    (b"/api/%e0%80%ae/admin", OVERLONG_UTF8),
    (b"/api/%f0%80%80%ae/admin", OVERLONG_UTF8),
    (b"/api\\..\\admin", BACKSLASH),
    (b"/api/%zz", MALFORMED_ESCAPE),
    (b"/api/%4", MALFORMED_ESCAPE),
    (b"//admin", b"/admin"),
    (b"/api//..//admin", b"/admin"),
    (b"/api/../admin", b"/admin"),
    (b"/api/%2e%2e/admin", b"/admin"),
    (b"/api/%2E%2e/admin", b"/admin"),
    (b"/api/./admin/.", b"/api/admin/"),
    (b"/../../admin", b"/admin"),
    (b"/api/%61dmin", b"/api/admin"),
    (b"/api/a%3bb", b"/api/a%3Bb"),
    (b"/api/a;b=1/c", b"/api/a;b=1/c"),
    (b"/api/%25%32%65", b"/api/%252e"),
    (b"/caf%C3%A9", b"/caf%C3%A9"),
]


def is_error(result: object) -> bool:
    """True for a refusal."""
    return isinstance(result, GatewayError)


def dot_segments(path: bytes) -> list[bytes]:
    """The segments of `path` that some upstream would read as `.` or `..` (escapes of `.`,
    `/`, `\\` and `;` resolved, `;` parameters cut)."""
    view = path
    for escape, char in ((b"%2E", b"."), (b"%2F", b"/"), (b"%5C", b"/"), (b"%3B", b";")):
        view = view.replace(escape, char).replace(escape.lower(), char)
    return [s for s in view.split(b"/") if s.split(b";")[0] in (b".", b"..")]


#: Paths made of the characters that matter to the rule.
paths = st.lists(
    st.sampled_from(
        [b"a", b"b", b".", b"..", b"/", b"//", b";", b"%2e", b"%2E", b"%2f", b"%5C", b"%3b",
         b"%41", b"%25", b"%c0", b"%ae", b"%00", b"%", b"%g", b"\\", b"~", b"%7e"]
    ),
    max_size=14,
).map(lambda parts: b"/" + b"".join(parts))
rules = st.builds(
    PathRules, st.booleans(), st.booleans(), st.sampled_from(ESCAPED_SLASH_ACTIONS)
)


class SpellingTests(SynchronousTestCase):
    """Each spelling the attack run used gets the documented outcome."""

    def test_default_outcomes(self) -> None:
        """Under the defaults: refused (400) or normalised, as the table says."""
        for path, expected in DEFAULT_OUTCOMES:
            result = normalize_path(path)
            self.assertEqual(result, expected, path)
            if isinstance(expected, GatewayError):
                self.assertEqual(expected.status, 400)

    def test_unchanged_path_is_the_same_object(self) -> None:
        """A path the rule leaves alone comes back as itself (no copy)."""
        path = b"/api/a;b=1/.well-known"
        self.assertIs(normalize_path(path), path)

    def test_hot_path_check(self) -> None:
        """Paths without `%`, `;`, `\\`, `//` or `/.` skip the rule; the others do not."""
        for path in (b"/", b"/api/v1/orders/12345", b"/a.b/c..d/e-f_g~h", b"/x:y@z!$&'()*+,="):
            self.assertIsNone(needs_work(path), path)
        for path, _ in DEFAULT_OUTCOMES:
            self.assertIsNotNone(needs_work(path), path)

    def test_unescape_and_forward(self) -> None:
        """unescapeAndForward: %2F and %5C become `/`, then dot segments are removed."""
        forward = PathRules(escaped_slashes=ESCAPED_FORWARD)
        self.assertEqual(normalize_path(b"/api/%2E%2E%2Fadmin", forward), b"/admin")
        self.assertEqual(normalize_path(b"/api/..%2fadmin", forward), b"/admin")
        self.assertEqual(normalize_path(b"/api/..%5cadmin", forward), b"/admin")
        self.assertEqual(normalize_path(b"/a%2Fb", forward), b"/a/b")
        self.assertEqual(normalize_path(b"/a%2F%2Fb", forward), b"/a/b")

    def test_unescape_and_redirect(self) -> None:
        """unescapeAndRedirect: a path with an encoded slash is redirected to its normal form."""
        redirect = PathRules(escaped_slashes=ESCAPED_REDIRECT)
        self.assertEqual(normalize_path(b"/a/..%2Fb%2fc", redirect), Redirect(b"/b/c"))
        self.assertEqual(normalize_path(b"/a/../b", redirect), b"/b")

    def test_keep_unchanged(self) -> None:
        """keepUnchanged: encoded slashes stay (upper-cased), unless reading them as `/` would
        give a dot segment."""
        keep = PathRules(escaped_slashes=ESCAPED_KEEP)
        self.assertEqual(normalize_path(b"/group%2fproject/x", keep), b"/group%2Fproject/x")
        for path in (b"/api/..%2Fadmin", b"/api/%2e%2e%2fadmin", b"/api%2F..%2Fadmin", b"/x/.%5C"):
            self.assertIs(normalize_path(path, keep), DOT_SEGMENT, path)

    def test_without_normalisation(self) -> None:
        """normalizePath false: the path is kept as received, dot segments are refused."""
        strict = PathRules(normalize_path=False)
        self.assertEqual(normalize_path(b"/a/%7e%41", strict), b"/a/%7e%41")
        for path in (b"/a/../b", b"/a/%2e%2E/b", b"/a/.%2e", b"/./x"):
            self.assertIs(normalize_path(path, strict), DOT_SEGMENT, path)
        self.assertIs(normalize_path(b"/a/%2e%2e;x/b", strict), DOT_PARAMETERS)

    def test_without_merging(self) -> None:
        """mergeSlashes false: `//` is kept; dot segments are still removed (RFC 3986)."""
        keep = PathRules(merge_slashes=False)
        self.assertEqual(normalize_path(b"//admin", keep), b"//admin")
        self.assertEqual(normalize_path(b"/a//../b", keep), b"/a/b")


class PropertyTests(SynchronousTestCase):
    """Properties of the rule over generated paths and settings."""

    @settings(max_examples=500, suppress_health_check=SLOW)
    @given(paths, rules)
    def test_idempotent(self, path: bytes, path_rules: PathRules) -> None:
        """A normalised path is normal: normalising it again changes nothing."""
        result = normalize_path(path, path_rules)
        if isinstance(result, Redirect):
            result = result.path
        if isinstance(result, bytes):
            self.assertEqual(normalize_path(result, path_rules), result)

    @settings(max_examples=500, suppress_health_check=SLOW)
    @given(paths, rules)
    def test_no_dot_segment_survives(self, path: bytes, path_rules: PathRules) -> None:
        """Whatever the settings, no accepted path has a segment any upstream reads as `.` or
        `..` (escaped dots, slashes, backslashes and `;` parameters included), nor NUL, nor a
        backslash; with mergeSlashes, no `//`."""
        result = normalize_path(path, path_rules)
        if isinstance(result, Redirect):
            result = result.path
        if isinstance(result, GatewayError):
            self.assertEqual(result.status, 400)
            return
        self.assertEqual(dot_segments(result), [], (path, result))
        self.assertNotIn(b"\\", result)
        self.assertNotIn(b"%00", result)
        self.assertTrue(result.startswith(b"/"))
        if path_rules.merge_slashes and path_rules.escaped_slashes != ESCAPED_KEEP:
            self.assertNotIn(b"//", result)

    @settings(max_examples=300, suppress_health_check=SLOW)
    @given(st.binary(max_size=40).map(lambda b: b"/" + b), rules)
    def test_never_raises(self, path: bytes, path_rules: PathRules) -> None:
        """Any bytes give a path, a redirect or a 400, never an exception."""
        result = normalize_path(path, path_rules)
        self.assertIsInstance(result, bytes | Redirect | GatewayError)
