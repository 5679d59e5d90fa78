"""The access log's hand-assembled JSON lines: always valid JSON, same values as the exchange."""

from __future__ import annotations

import io
import json

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.http.errors import bad_request
from flexgw.http.request import analyze_head
from flexgw.http.tracecontext import Sampler, Trace
from flexgw.ingress.peer import NOBODY
from flexgw.plan import Destination, Listener, Route, Upstream
from flexgw.service.accesslog import AccessLog, MessageLog, _ms


class _Front:
    """The one attribute of the front the access log reads."""

    def __init__(self, client_ip: str) -> None:
        self.peer = attrs.evolve(NOBODY, address=client_ip)


class _Exchange:
    """The attributes of a ProxyExchange the access log reads."""

    def __init__(self, path: bytes, client: str, name: str, error: str | None) -> None:
        self.head = analyze_head(b"GET", path, "1.1", [(b"Host", b"h")], True)
        self.front = _Front(client)
        upstream = Upstream(key=name, scheme="http", host="127.0.0.1", port=80)
        self.destination = Destination(upstream=upstream)
        self.route = Route(name=name, order=50, rules=(), destinations=(self.destination,))
        self.api_key = name
        self.response_status = 200
        self.bytes_in = 12
        self.bytes_out = 345
        self.started = 10.0
        self.upstream_elapsed = 0.0012345
        self.error_cause = error
        self.trace: Trace | None = None
        self.attempts = 1


class AccessLogLineTests(TestCase):
    """Each line parses as JSON and carries exactly the exchange's values."""

    def line(self, exchange: _Exchange) -> dict[str, object]:
        """Log one exchange at t=10.25 and parse the line back."""
        clock = Clock()
        clock.advance(10.25)
        stream = io.BytesIO()
        log = AccessLog(clock, stream)
        log.exchange_finished(exchange, Listener(scheme="http", host="0.0.0.0", port=8080, apis=()))
        log.flush()
        text = stream.getvalue().decode("ascii")
        self.assertTrue(text.endswith("\n") and text.count("\n") == 1)
        return json.loads(text)

    def test_attempts_of_a_retried_request(self) -> None:
        """A retried request's line says how many tries it took; a request of one try has no
        such field."""
        exchange = _Exchange(b"/a", "127.0.0.1", "default/api", None)
        self.assertNotIn("x-flexgw-attempts", self.line(exchange))
        exchange.attempts = 3
        self.assertEqual(self.line(exchange)["x-flexgw-attempts"], 3)

    def test_fields(self) -> None:
        """Every field, in its JSON type."""
        record = self.line(_Exchange(b"/a/b?q=1", "127.0.0.1", "default/api", None))
        self.assertEqual(
            record,
            {
                "time": "1970-01-01T00:00:10.250Z",
                "client": "127.0.0.1",
                "listener": "0.0.0.0:8080",
                "method": "GET",
                "path": "/a/b",
                "version": "1.1",
                "api": "default/api",
                "route": "default/api",
                "upstream": "default/api",
                "status": 200,
                "bytes_in": 12,
                "bytes_out": 345,
                "duration_ms": 250.0,
                "upstream_ms": 1.234,
                "error": None,
            },
        )

    def test_trace_ids(self) -> None:
        """A traced exchange's line ends with its trace_id and span_id (hex, W3C widths)."""
        exchange = _Exchange(b"/t", "127.0.0.1", "default/api", None)
        ids = (0xABC).to_bytes(16, "big") + (0x34).to_bytes(8, "big") + (0x12).to_bytes(8, "big")
        exchange.trace = Trace(Sampler(), ids, None, None, 10.0, Clock())
        record = self.line(exchange)
        self.assertEqual((record["trace_id"], record["span_id"]), (f"{0xABC:032x}", f"{0x12:016x}"))
        self.assertNotIn("trace_id", self.line(_Exchange(b"/t", "127.0.0.1", "default/api", None)))

    @settings(max_examples=200, deadline=None)
    @given(
        path=st.text(min_size=0, max_size=30).map(lambda t: "/" + t),
        name=st.text(min_size=1, max_size=20),
        error=st.one_of(st.none(), st.text(max_size=10)),
    )
    def test_any_strings_stay_valid_json(self, path: str, name: str, error: str | None) -> None:
        """Quotes, backslashes, control and non-ASCII characters never break the line."""
        exchange = _Exchange(b"/", "::1", name, error)
        exchange.head.path = path
        record = self.line(exchange)
        self.assertEqual((record["path"], record["api"], record["error"]), (path, name, error))


class AccessLogBatchTests(TestCase):
    """Lines are formatted when the log is flushed, a batch at a time, in order."""

    def test_formatted_at_flush_with_the_values_at_finish(self) -> None:
        """A finished exchange is only recorded (no line made yet); its line, made at flush,
        has the values it had when it finished; refused requests keep their place in order."""
        clock = Clock()
        clock.advance(10.25)
        stream = io.BytesIO()
        log = AccessLog(clock, stream)
        listener = Listener(scheme="http", host="0.0.0.0", port=8080, apis=())
        exchange = _Exchange(b"/first", "127.0.0.1", "default/api", None)
        log.exchange_finished(exchange, listener)
        self.assertEqual(log._lines, [])
        exchange.response_status = 502
        exchange.head.path = "/changed"
        log.request_refused(NOBODY, bad_request("x"), listener)
        log.exchange_finished(_Exchange(b"/third", "::1", "default/api", "upstream_reset"), listener)
        log.flush()
        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual([r["path"] for r in records], ["/first", None, "/third"])
        self.assertEqual([r["status"] for r in records], [200, 400, 200])
        self.assertEqual(records[2]["error"], "upstream_reset")

    def test_durations(self) -> None:
        """Milliseconds to the microsecond; a duration below zero (the clock went back) stays a
        number."""
        self.assertEqual(_ms(0.25), "250.000")
        self.assertEqual(_ms(0.0012345), "1.234")
        self.assertEqual(_ms(12.0000009), "12000.000")
        self.assertEqual(json.loads(_ms(-0.0015)), -1.5)


class MessageLogLineTests(TestCase):
    """message-logging-flex lines stay valid JSON whatever the message holds."""

    @settings(max_examples=200, deadline=None)
    @given(text=st.text(max_size=40), category=st.one_of(st.none(), st.text(max_size=8)))
    def test_any_message_is_valid_json(self, text: str, category: str | None) -> None:
        """The parsed line gives back exactly the message and the item's fields."""
        clock = Clock()
        stream = io.BytesIO()
        log = MessageLog(clock, stream)
        log.emit("INFO", category, "default/b", "default/a", "item", "first", text)
        log.emit("INFO", category, "default/b", "default/a", "item", "first", text)
        log.flush()
        lines = stream.getvalue().decode("ascii").splitlines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            record = json.loads(line)
            self.assertEqual(record["message"], text)
            self.assertEqual(record["category"], category)
            self.assertEqual((record["binding"], record["section"]), ("default/b", "first"))
