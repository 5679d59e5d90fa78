"""message-logging-flex: items, levels, categories, sections, conditionals, payload, failures, end to end."""

from __future__ import annotations

import json
from typing import Any

import attrs
import jsonschema
from twisted.internet import reactor
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import message_logging, registry
from flexgw.policies.base import BuildContext, PolicyConfigError, PolicyContext, PolicyServices
from flexgw.policies.message_logging import NAMESPACE, MessageLoggingKind
from flexgw.service.accesslog import MessageLog
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, MemoryStream, PolicyGatewayCase, api_document, free_port

KIND = MessageLoggingKind()


def item(message: str, level: str = "INFO", name: str = "item", **data: Any) -> dict[str, Any]:
    """One loggingConfiguration entry."""
    return {"itemName": name, "itemData": {"message": message, "level": level, **data}}


def context(
    target: bytes = b"/orders?debug=true",
    method: bytes = b"GET",
    body: bytes | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> PolicyContext:
    """A PolicyContext for a request (with `body` handed over as the exchange would)."""
    raw = [(b"Host", b"t"), *(headers or [])]
    if body is not None:
        raw.append((b"Content-Length", b"%d" % len(body)))
    head = analyze_head(method, target, "1.1", raw, True)
    assert isinstance(head, RequestHead)
    ctx = PolicyContext(head, "10.0.0.7", "http", "default/api")
    ctx.body = body
    return ctx


class Recorder:
    """Builds policies whose log events land in a list."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def build(self, *items: dict[str, Any]) -> Any:
        """A policy for `items`, logging into self.events."""
        policy = KIND.build(
            {"loggingConfiguration": list(items)}, BuildContext("default/ml", "default/api")
        )
        return attrs.evolve(policy, log=Logger(namespace=NAMESPACE, observer=self.events.append))

    def lines(self) -> list[tuple[LogLevel, str]]:
        """(level, formatted text) of every event so far."""
        return [(e["log_level"], formatEvent(e)) for e in self.events]


class MessageLoggingUnitTests(TestCase):
    """The policy object on hand-made requests."""

    def setUp(self) -> None:
        """A recorder for log events."""
        self.recorder = Recorder()

    def test_registered(self) -> None:
        """Registered under Flex's name."""
        self.assertIsInstance(registry.lookup("message-logging-flex"), MessageLoggingKind)

    def test_first_section_logs_at_level_with_category(self) -> None:
        """The message is evaluated on the request and logged at its level, after the category."""
        policy = self.recorder.build(
            item("#[attributes.method ++ ' ' ++ attributes.requestPath]", "WARN", category="audit"),
            item("#[attributes.queryParams]", "ERROR", name="params"),
        )
        self.assertIsNone(policy.on_request(context()))
        self.assertEqual(
            self.recorder.lines(),
            [
                (LogLevel.warn, "[default/ml] audit: GET /orders"),
                (LogLevel.error, '[default/ml] {"debug":"true"}'),
            ],
        )
        event = self.recorder.events[0]
        self.assertEqual(event["log_namespace"], "flexgw.messagelogging")
        self.assertEqual(
            {k: event[k] for k in ("binding", "api", "item", "category", "section", "text")},
            {
                "binding": "default/ml",
                "api": "default/api",
                "item": "item",
                "category": "audit",
                "section": "first",
                "text": "GET /orders",
            },
        )

    def test_levels(self) -> None:
        """INFO, WARN, ERROR, DEBUG as documented; TRACE is logged as debug."""
        policy = self.recorder.build(
            *(item(level, level, name=level) for level in ("INFO", "WARN", "ERROR", "DEBUG", "TRACE"))
        )
        policy.on_request(context())
        self.assertEqual(
            [level for level, _ in self.recorder.lines()],
            [LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.debug, LogLevel.debug],
        )

    def test_plain_message_logged_as_written(self) -> None:
        """A message without #[...] is logged literally, braces and all."""
        policy = self.recorder.build(item("hello {world}"))
        policy.on_request(context())
        self.assertEqual(self.recorder.lines(), [(LogLevel.info, "[default/ml] hello {world}")])

    def test_conditional(self) -> None:
        """Logged only when the conditional yields true (or "true"); plain true/false allowed."""
        policy = self.recorder.build(
            item("yes", conditional="#[attributes.queryParams['debug'] == 'true']", name="a"),
            item("no", conditional="#[attributes.method == 'POST']", name="b"),
            item("string", conditional="#[attributes.queryParams['debug']]", name="c"),
            item("off", conditional="false", name="d"),
            item("on", conditional=True, name="e"),
            item("null", conditional="#[attributes.headers['missing']]", name="f"),
        )
        policy.on_request(context())
        self.assertEqual([e["item"] for e in self.recorder.events], ["a", "c", "e"])

    def test_sections(self) -> None:
        """firstSection defaults to true and secondSection to false; second-section items run in
        the response phase with the status code and the response's headers."""
        policy = self.recorder.build(
            item("#['request ' ++ attributes.method]", name="default"),
            item(
                "#['status ' ++ attributes.statusCode ++ ' ' ++ attributes.headers['x-resp']]",
                name="after",
                firstSection=False,
                secondSection=True,
            ),
            item("both", name="both", secondSection=True),
            item("never", name="never", firstSection=False),
        )
        ctx = context(headers=[(b"X-Resp", b"request-value")])
        policy.on_request(ctx)
        self.assertEqual([e["item"] for e in self.recorder.events], ["default", "both"])
        ctx.begin_response(201, [(b"X-Resp", b"response-value")])
        policy.on_response(ctx)
        self.assertEqual(
            [(e["item"], e["section"], e["text"]) for e in self.recorder.events[2:]],
            [("after", "second", "status 201 response-value"), ("both", "second", "both")],
        )
        self.assertEqual(ctx.response_status, 201)
        self.assertEqual(ctx.response_headers, [(b"X-Resp", b"response-value")])

    def test_needs_body_only_when_a_first_section_item_reads_payload(self) -> None:
        """`needs_body` follows Expression.references, for the request phase only."""
        self.assertFalse(self.recorder.build(item("#[attributes.headers]")).needs_body)
        self.assertTrue(self.recorder.build(item("#['got ' ++ payload]")).needs_body)
        self.assertTrue(
            self.recorder.build(item("x", conditional="#[payload contains 'a']")).needs_body
        )
        self.assertFalse(
            self.recorder.build(
                item("#[payload]", firstSection=False, secondSection=True)
            ).needs_body
        )

    def test_payload_is_the_request_body_text(self) -> None:
        """`payload` is the buffered body as text."""
        policy = self.recorder.build(item("#['body: ' ++ payload]"))
        policy.on_request(context(method=b"POST", body=b'{"a": "\xc3\xa9"}'))
        self.assertEqual(self.recorder.events[0]["text"], 'body: {"a": "é"}')
        self.assertEqual(formatEvent(self.recorder.events[0]), '[default/ml] body: {"a": "é"}')

    def test_payload_of_bodyless_request_is_empty(self) -> None:
        """A request without a body has an empty payload."""
        policy = self.recorder.build(item("#['[' ++ payload ++ ']']"))
        policy.on_request(context())
        self.assertEqual(self.recorder.events[0]["text"], "[]")

    def test_failing_item_is_logged_not_raised(self) -> None:
        """An item whose expression fails logs an error naming it; the request goes on and the
        other items are still logged."""
        policy = self.recorder.build(
            item("#[upper(attributes.queryParams)]", name="broken"),
            item("after", name="fine"),
            item("x", name="broken-cond", conditional="#[attributes.queryParams[0]]"),
        )
        self.assertIsNone(policy.on_request(context()))
        levels_and_items = [(e["log_level"], e["item"]) for e in self.recorder.events]
        self.assertEqual(
            levels_and_items,
            [(LogLevel.error, "broken"), (LogLevel.info, "fine"), (LogLevel.error, "broken-cond")],
        )
        message = formatEvent(self.recorder.events[0])
        self.assertIn("message logging item 'broken' (first section) failed", message)
        self.assertIn("upper expects a String", message)

    def test_failing_second_section_item_does_not_raise(self) -> None:
        """The response phase is protected the same way."""
        policy = self.recorder.build(
            item("#[upper(attributes.headers)]", name="broken", firstSection=False, secondSection=True)
        )
        ctx = context()
        ctx.begin_response(200, [])
        policy.on_response(ctx)
        self.assertEqual(self.recorder.events[0]["log_level"], LogLevel.error)

    def test_expression_syntax_errors_name_their_field(self) -> None:
        """A bad message or conditional is a config error on that item's field."""
        with self.assertRaises(PolicyConfigError) as caught:
            self.recorder.build(item("ok"), item("#[attributes.method ==]"))
        self.assertEqual(caught.exception.field, "loggingConfiguration.1.itemData.message")
        with self.assertRaises(PolicyConfigError) as caught:
            self.recorder.build(item("ok", conditional="#[(]"))
        self.assertEqual(caught.exception.field, "loggingConfiguration.0.itemData.conditional")
        with self.assertRaises(PolicyConfigError) as caught:
            self.recorder.build(item("ok", conditional="sometimes"))
        self.assertEqual(caught.exception.field, "loggingConfiguration.0.itemData.conditional")

    def test_schema(self) -> None:
        """Flex's keys; required itemName/itemData/message/level; the level list; no others."""
        validator = jsonschema.Draft202012Validator(message_logging.SCHEMA)

        def errors(config: dict[str, Any]) -> int:
            return len(list(validator.iter_errors(config)))

        good = {"loggingConfiguration": [item("#[attributes.headers]", "DEBUG", category="c",
                                              conditional="#[true]", firstSection=True,
                                              secondSection=False)]}
        self.assertEqual(errors(good), 0)
        self.assertEqual(errors({}), 1)
        self.assertEqual(errors({"loggingConfiguration": [{"itemData": {"message": "m", "level": "INFO"}}]}), 1)
        self.assertEqual(errors({"loggingConfiguration": [{"itemName": "n"}]}), 1)
        self.assertEqual(errors({"loggingConfiguration": [item("m", "VERBOSE")]}), 1)
        self.assertEqual(errors({"loggingConfiguration": [item("m", color="red")]}), 1)
        self.assertEqual(errors({"loggingConfiguration": [{"itemName": "n", "itemData": {"level": "INFO"}}]}), 1)


BINDING = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: logs}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: message-logging-flex}
  config:
    loggingConfiguration:
      - itemName: request
        itemData:
          message: "#[attributes.method ++ ' ' ++ attributes.requestPath]"
          category: audit
          level: INFO
      - itemName: body
        itemData:
          message: "#['body=' ++ payload]"
          conditional: "#[attributes.method == 'POST']"
          level: DEBUG
      - itemName: response
        itemData:
          message: "#['status=' ++ attributes.statusCode]"
          level: WARN
          firstSection: false
          secondSection: true
      - itemName: broken
        itemData:
          message: "#[upper(attributes.queryParams)]"
          level: ERROR
"""


class MessageLoggingEndToEndTests(PolicyGatewayCase):
    """Through a real gateway and upstream, observing the global log."""

    documents = BINDING

    def setUp(self) -> None:
        """A recording upstream, a gateway port, and an observer of the policy's namespace."""
        super().setUp()
        self.events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == NAMESPACE:
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def texts(self) -> list[tuple[str, str]]:
        """(item, text-or-error) of the policy's events so far."""
        return [(e["item"], e.get("text", "FAILED")) for e in self.events]

    async def test_request_and_response_sections(self) -> None:
        """A GET logs its first-section items, then the status; the failing item does not
        fail the request."""
        self.start()
        response = await self.send(b"GET /orders HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual(response.status, 200)
        self.assertEqual(
            self.texts(),
            [("request", "GET /orders"), ("broken", "FAILED"), ("response", "status=200")],
        )
        self.assertEqual(formatEvent(self.events[0]), "[default/logs] audit: GET /orders")
        self.assertEqual(self.events[2]["log_level"], LogLevel.warn)

    async def test_payload_logged_and_forwarded(self) -> None:
        """A POST body is buffered for the payload item, logged, and still reaches the upstream."""
        self.start()
        body = json.dumps({"order": 42}).encode()
        raw = (
            b"POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        ) + body
        response = await self.send(raw)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[0].body, body)
        self.assertIn(("body", 'body={"order": 42}'), self.texts())

    async def test_bad_expression_is_a_located_error(self) -> None:
        """A syntax error in a message fails the binding at its field (fail closed)."""
        gateway = self.start(BINDING.replace("'status=' ++ attributes.statusCode", "'status=' ++"))
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any(p.field == "spec.config.loggingConfiguration[2].itemData.message" for p in errors),
            [str(p) for p in errors],
        )
        self.assertEqual(gateway.service.plan.listeners, ())


class SinkWriterTests(TestCase):
    """A sink with `writer` (the gateway's MessageLog) is asked once per item and section, when
    the policy is built; a line is then one call of that writer."""

    def test_writers_asked_at_build(self) -> None:
        """Three writers for two items (one in both sections), none asked per request, and
        the sink's `emit` never called."""
        asked: list[tuple[Any, ...]] = []
        lines: list[tuple[str, str]] = []

        class Sink:
            def writer(self, *key: Any) -> Any:
                asked.append(key)
                return lambda text: lines.append((key[4], text))

            def emit(self, *args: Any) -> None:
                raise AssertionError("emit called for a line")

        policy = KIND.build(
            {
                "loggingConfiguration": [
                    item("#[attributes.method]", name="a", category="audit"),
                    item("plain", "WARN", name="b", secondSection=True),
                ]
            },
            BuildContext("default/ml", "default/api", services=PolicyServices(message_log=Sink())),
        )
        self.assertEqual(
            asked,
            [
                ("INFO", "audit", "default/ml", "default/api", "a", "first"),
                ("WARN", None, "default/ml", "default/api", "b", "first"),
                ("WARN", None, "default/ml", "default/api", "b", "second"),
            ],
        )
        for _ in range(2):
            policy.on_request(context())
        ctx = context()
        ctx.begin_response(200, [])
        policy.on_response(ctx)
        self.assertEqual(lines, [("a", "GET"), ("b", "plain")] * 2 + [("b", "plain")])
        self.assertEqual(len(asked), 3)


class MessageLogSinkTests(TestCase):
    """With the gateway's MessageLog (as `twistd flexgw` wires it), items are JSON lines."""

    async def test_items_written_as_json_lines(self) -> None:
        """The first- and second-section items land on the sink's stream, not the Twisted log."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        stream = MemoryStream()
        sink = MessageLog(reactor, stream)
        api = api_document(port, upstream.address[1])
        gateway = Gateway(self, {"api.yaml": api + BINDING})
        gateway.service.runtime.message_log = sink
        gateway.start()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /orders HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        sink.flush()
        lines = stream.records()
        self.assertEqual(
            [(line["item"], line["message"], line["level"]) for line in lines],
            [("request", "GET /orders", "INFO"), ("response", "status=200", "WARN")],
        )
        self.assertEqual(lines[0]["category"], "audit")
        self.assertEqual(lines[0]["binding"], "default/logs")
        # The failing item still goes to the runtime log as an error; the good ones do not.
        ours = [e for e in events if e.get("log_namespace") == NAMESPACE]
        self.assertEqual([e.get("item") for e in ours], ["broken"])
