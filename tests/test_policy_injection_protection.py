"""injection-protection-flex: decoding, signatures, corpus rates, config errors, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from twisted.trial.unittest import TestCase

from flexgw.policies import registry
from flexgw.policies.base import BuildContext, PolicyConfigError
from flexgw.policies.injection_protection import (
    KIND,
    InjectionProtectionKind,
    body_pieces,
    detect,
    percent_decode,
)
from tests.harness import PolicyGatewayCase, assert_loads_cleanly

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "injection_corpus"

FLEX_EXAMPLE = """\
    builtInProtections: ["sql", "xss"]
    customProtections:
      - name: no-path-traversal
        regex: "\\\\.\\\\./"
    protectPathAndQuery: true
    protectHeaders: true
    headersToProtect: ["x-search"]
    protectBody: true
    rejectRequests: true
"""


def binding(config: str = FLEX_EXAMPLE) -> str:
    """A PolicyBinding document for injection-protection-flex on `test-api`."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: injection}\n"
        "spec:\n  targetRef: {name: test-api}\n  policyRef: {name: injection-protection-flex}\n"
        "  config:\n" + config
    )


def query_value(payload: str, rounds: int = 1) -> str:
    """What the policy scans for a query value sent encoded `rounds` times."""
    for _ in range(rounds):
        payload = quote(payload, safe="")
    return percent_decode(payload.encode(), plus=True)


class DetectionTests(TestCase):
    """The signatures on decoded text."""

    def test_sql_and_evasions(self) -> None:
        """Tautologies, UNION SELECT through comments, double encoding, mixed case, overlong
        UTF-8, typographic quotes and MySQL version comments are all SQL injection."""
        for payload in (
            "' or 1=1--", "admin'--", "1 UnIoN/**/SeLeCt password FROM users",
            "1/*!50000union*/ /*!50000select*/ 1", "1; DROP TABLE users",
            "\u2019 or \u20181\u2019=\u20191", "x' AND sleep(5)#",
        ):
            self.assertEqual(detect(query_value(payload), True, False), "sql", payload)
            self.assertEqual(detect(query_value(payload, 2), True, False), "sql", payload)
        self.assertEqual(detect(percent_decode(b"%C0%A7 or 1=1--"), True, False), "sql")

    def test_xss_and_evasions(self) -> None:
        """Tags, handlers, javascript: URLs through entities, tabs, full-width and JSON escapes."""
        for payload in (
            "<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
            '<a href="jav&#x09;ascript:alert(1)">x</a>', "\uff1cscript\uff1e",
            "\\u003cscript\\u003e", "&lt;svg onload=alert(1)&gt;", '"><iframe src=//x>',
        ):
            self.assertEqual(detect(query_value(payload), False, True), "xss", payload)

    def test_benign_values_pass(self) -> None:
        """Names with apostrophes, prose with SQL words, markdown and math are not attacks."""
        for text in (
            "O'Brien", "D'Angelo & O'Neil", "Please select the items and update your order.",
            "Meet at Union Station; lunch after.", "Is x < y and y > z?", "**bold** `code`",
            "He's 5' 11\" tall", "rock 'n' roll",
        ):
            self.assertIsNone(detect(text, True, True), text)

    def test_json_bodies_are_scanned_after_unescaping(self) -> None:
        """A JSON string's \\u escapes are undone before matching; keys count too."""
        body = json.dumps({"q": "\u003cscript\u003ealert(1)\u003c/script\u003e"}).encode()
        self.assertIn("<script>alert(1)</script>", list(body_pieces(body, b"application/json")))
        pieces = list(body_pieces(b'{"<img src=x onerror=alert(1)>": 1}', b"application/json"))
        self.assertEqual(detect(pieces[0], False, True), "xss")

    def test_binary_and_multipart_bodies(self) -> None:
        """Binary types and non-UTF-8 bytes are skipped; multipart parts are inspected."""
        self.assertEqual(list(body_pieces(b"<script>", b"image/png")), [])
        self.assertEqual(list(body_pieces(b"\xff<script>", b"text/plain")), [])
        multipart = (
            b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nhello\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"c\"\r\nContent-Type: application/json\r\n\r\n"
            b'{"x": "\' or 1=1--"}\r\n--b--\r\n'
        )
        multipart = multipart.replace(b"--b", b"--Bq")
        pieces = list(body_pieces(multipart, b"Multipart/Form-Data; boundary=Bq"))
        self.assertIn("hello", pieces)
        self.assertIn("' or 1=1--", pieces)

    def test_custom_regex_is_linear(self) -> None:
        """A custom regex that would backtrack exponentially in a backtracking engine returns
        at once (RE2)."""
        policy = KIND.build(
            {"builtInProtections": [], "customProtections": [{"name": "evil", "regex": "(a+)+$"}],
             "protectPathAndQuery": True, "protectHeaders": False, "protectBody": False,
             "rejectRequests": True},
            BuildContext("default/i", "default/api"),
        )
        self.assertIsNone(detect("a" * 200_000 + "!", False, False, policy.config.custom[:0]))
        self.assertEqual(detect("a" * 200_000 + "!" + "a", False, False, policy.config.custom), "evil")


class CorpusTests(TestCase):
    """The published figures hold: public payload lists detected, benign traffic passes."""

    def rate(self, name: str) -> float:
        """Share of `name`.txt detected as a query value."""
        payloads = (CORPUS / f"{name}.txt").read_text().splitlines()
        return sum(detect(query_value(p), True, True) is not None for p in payloads) / len(payloads)

    def test_detection_and_false_positive_rates(self) -> None:
        """SQL and XSS lists at least 97% detected; at most 1% of benign values flagged."""
        self.assertGreaterEqual(self.rate("sql"), 0.97)
        self.assertGreaterEqual(self.rate("xss"), 0.97)
        benign = [json.loads(line) for line in (CORPUS / "benign.jsonl").read_text().splitlines()]
        flagged = 0
        for value in benign:
            pieces = (
                list(body_pieces(value.encode(), b"application/json"))
                if value.lstrip().startswith("{") else [value]
            )
            flagged += any(detect(p, True, True) is not None for p in pieces)
        self.assertLessEqual(flagged / len(benign), 0.01)


class ConfigTests(TestCase):
    """Schema, located errors, Flex's example."""

    def test_registered(self) -> None:
        """Registered under Flex's name with Flex's required keys."""
        self.assertIsInstance(registry.lookup("injection-protection-flex"), InjectionProtectionKind)
        self.assertIn("protectBody", KIND.schema["required"])

    def test_bad_custom_regexes_are_located(self) -> None:
        """Look-ahead (not RE2) and a broken regex are errors at customProtections.N.regex."""
        base = {"builtInProtections": ["sql"], "protectPathAndQuery": True,
                "protectHeaders": False, "protectBody": False, "rejectRequests": True}
        for regex in ("(?=x)y", "a(b"):
            config = {**base, "customProtections": [{"name": "ok", "regex": "x"},
                                                     {"name": "bad", "regex": regex}]}
            with self.assertRaises(PolicyConfigError) as caught:
                KIND.build(config, BuildContext("default/i", "default/api"))
            self.assertEqual(caught.exception.field, "customProtections.1.regex")
        with self.assertRaises(PolicyConfigError):
            KIND.build({**base, "builtInProtections": []}, BuildContext("default/i", "default/api"))

    def test_flex_example_validates(self) -> None:
        """The pipeline behind `flexgw validate` accepts Flex's documented keys."""
        assert_loads_cleanly(self, binding())


class EndToEndTests(PolicyGatewayCase):
    """Through a real gateway and a recording upstream."""

    async def test_blocked_where_flex_blocks(self) -> None:
        """Query, protected header, JSON body and a custom regex: 400 with the Flex header and
        a JSON error; benign requests (and unprotected headers) reach the upstream."""
        gateway = self.start(binding())
        body = json.dumps({"name": "O'Brien", "note": "<script>alert(1)</script>"}).encode()
        attacks = (
            b"GET /items?id=1%2527%2520or%25201%253D1-- HTTP/1.1\r\nHost: t\r\n\r\n",
            b"GET /items HTTP/1.1\r\nHost: t\r\nX-Search: <svg onload=alert(1)>\r\n\r\n",
            b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            b"GET /files?name=..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        for raw in attacks:
            response = await self.send(raw)
            self.assertEqual(response.status, 400, (raw, response.body))
            self.assertEqual(response.header("x-injection-protection"), [b"blocked"])
            self.assertIn(b"Injection detected", response.body)
        fine = json.dumps({"name": "O'Brien", "note": "Meet at Union Station; select a seat"}).encode()
        for raw in (
            b"GET /items?q=O%27Brien&sort=-name HTTP/1.1\r\nHost: t\r\nX-Other: ' or 1=1--\r\n\r\n",
            b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(fine), fine),
        ):
            self.assertEqual((await self.send(raw)).status, 200)
        self.assertEqual(len(self.upstream.received), 2)
        self.assertEqual([r["status"] for r in gateway.records()], [400, 400, 400, 400, 200, 200])

    async def test_log_only_and_body_not_read_without_protect_body(self) -> None:
        """rejectRequests false forwards the attack; protectBody false streams a 2 MiB body
        (no 413) and ignores what is in it."""
        config = FLEX_EXAMPLE.replace("rejectRequests: true", "rejectRequests: false").replace(
            "protectBody: true", "protectBody: false"
        )
        self.start(binding(config))
        response = await self.send(b"GET /?q=%3Cscript%3E HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual(response.status, 200)
        big = b"<script>" + b"x" * (2 * 1024 * 1024)
        response = await self.send(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[-1].body_length, len(big))

    async def test_body_over_the_buffer_limit_is_413(self) -> None:
        """With protectBody, a body over 1 MiB cannot be checked: 413, nothing forwarded."""
        self.start(binding())
        big = b"y" * (1024 * 1024 + 10)
        response = await self.send(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
        )
        self.assertEqual(response.status, 413)
        self.assertEqual(self.upstream.received, [])
