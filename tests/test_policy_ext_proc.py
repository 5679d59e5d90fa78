"""native-ext-proc-flex: config, and a real gateway with a grpcio ExternalProcessor speaking
Envoy's messages: each mode, mutations, body replacement, immediate responses, mode override,
timeouts, stalls and bad processors."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.policies import registry
from flexgw.policies.base import BuildContext, PolicyConfigError
from flexgw.policies.ext_proc import KIND, SCHEMA, ExtProcPolicy, settings_from
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, raw
from tests.extproc_server import ExtProcServer, header_map
from tests.harness import free_port, start_api_gateway
from tests.probes import poll_until, pool_counts

#: Flex's documented Local Mode definition (docs `policies-included-external-processing`), with
#: a value for each key.
FLEX_EXAMPLE = {
    "uri": "h2://processor.example.com:50051",
    "messageTimeout": 1000,
    "requestHeaderMode": "send",
    "responseHeaderMode": "send",
    "requestBodyMode": "none",
    "responseBodyMode": "none",
    "requestTrailerMode": "skip",
    "responseTrailerMode": "skip",
    "failureModeAllow": False,
    "maxMessageTimeout": 0,
    "allowModeOverride": True,
}
#: The upstream's answer: chunked, two pieces, a trailer, a header the processor removes.
UPSTREAM = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-upstream-secret: s\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\none\r\n3\r\ntwo\r\n0\r\nx-trail: t\r\n\r\n"
)


class ConfigTests(SynchronousTestCase):
    """Flex's keys and defaults."""

    def test_flex_example_and_defaults(self) -> None:
        """The kind is registered; Flex's example validates and builds; defaults are Flex's;
        only gRPC URIs are accepted."""
        self.assertIs(registry.lookup("native-ext-proc-flex"), KIND)
        jsonschema.Draft202012Validator(SCHEMA).validate(FLEX_EXAMPLE)
        self.assertIsInstance(KIND.build(dict(FLEX_EXAMPLE), BuildContext("d/p", "d/api")),
                              ExtProcPolicy)
        s = settings_from({"uri": "h2://p:50051"})
        self.assertEqual((s.scheme, s.port, s.timeout, s.max_timeout, s.failure_mode_allow,
                          s.allow_mode_override), ("h2c", 50051, 1.0, 0.0, False, True))
        m = s.modes
        self.assertEqual((m.request_headers, m.response_headers, m.request_body, m.response_body,
                          m.request_trailers, m.response_trailers),
                         (True, True, "none", "none", False, False))
        with self.assertRaises(PolicyConfigError) as caught:
            settings_from({"uri": "http://p"})
        self.assertEqual(caught.exception.field, "uri")
        validator = jsonschema.Draft202012Validator(SCHEMA)
        self.assertFalse(validator.is_valid({"uri": "h2://a", "requestBodyMode": "chunky"}))
        self.assertFalse(validator.is_valid({"uri": "h2://a", "statusOnError": 500}))

    def test_body_buffered_only_when_sent(self) -> None:
        """The request body is buffered before the policy only when a body mode sends it; a
        binding that sends nothing of the response has no response phase."""
        self.assertFalse(KIND.build({"uri": "h2://a"}, BuildContext("d/p", None)).needs_body)
        self.assertTrue(KIND.build({"uri": "h2://a", "requestBodyMode": "buffered"},
                                   BuildContext("d/p", None)).needs_body)
        quiet = KIND.build({"uri": "h2://a", "responseHeaderMode": "skip",
                            "allowModeOverride": False}, BuildContext("d/p", None))
        self.assertFalse(quiet.response_phase)


def binding(config: dict[str, Any], name: str = "proc") -> str:
    """A native-ext-proc-flex binding on test-api (its config as a YAML flow mapping)."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
        "  policyRef: {name: native-ext-proc-flex}\n"
        f"  config: {json.dumps(config)}\n"
    )


class _Garbage(protocol.Protocol):
    """Answers an HTTP/2 preface with bytes that are not HTTP/2."""

    def dataReceived(self, data: bytes) -> None:
        """Garbage back."""
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\xff" * 64)


class _Gateway(TestCase):
    """A grpcio ExternalProcessor, a recording upstream, gateways with the policy."""

    def setUp(self) -> None:
        """The processor and the upstream."""
        self.server = ExtProcServer().start()
        self.addCleanup(self.server.stop)
        self.upstream = RecordingUpstream(raw(UPSTREAM, close=False), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)

    def gateway(self, uri: str | None = None, documents: str = "", clock: Any = None,
                **config: Any) -> int:
        """A gateway with the policy (uri: the test server's) on test-api, and `documents`;
        its port. `clock` runs the policy's timeouts; messageTimeout is 30 s unless given (the
        tests wait for answers, or advance a clock to time one out: 1 s ran out on a loaded
        machine)."""
        port = free_port()
        config.setdefault("messageTimeout", 30000)
        self.started = start_api_gateway(
            self, port, self.upstream.address[1],
            binding({"uri": uri or self.server.uri, **config}) + documents, clock=clock)
        self.assertEqual([str(p) for p in self.started.service.state.errors], [])
        return port

    async def send(self, port: int, proc: str = "mutate", body: bytes | None = None,
                   extra: bytes = b"") -> client.Response:
        """GET (or POST `body`) /x with `x-proc: proc`."""
        head = b"POST" if body is not None else b"GET"
        framing = b"Content-Length: %d\r\n" % len(body) if body is not None else b""
        data = (head + b" /x HTTP/1.1\r\nHost: t\r\nx-proc: " + proc.encode() + b"\r\n"
                + framing + extra + b"\r\n" + (body or b""))
        return await client.request(reactor, "127.0.0.1", port, data)

    async def held(self, port: int, proc: str, clock: Clock, holding: int = 1) -> client.Response:
        """Send with `x-proc: proc`; once the processor holds its answer (the reactor ran on
        meanwhile), let messageTimeout (0.3 s) pass on `clock`, not before; the response."""
        pending = defer.ensureDeferred(self.send(port, proc))
        await poll_until(lambda: self.server.holding == holding)
        clock.advance(0.298)
        self.assertNoResult(pending)
        clock.advance(0.004)
        return await pending

    def assertFailed(self, response: client.Response, status: int, cause: str) -> None:
        """A failure answer: status and cause, and the upstream never reached."""
        self.assertEqual((response.status, response.header("x-flexgw-error")),
                         (status, [cause.encode()]))
        self.assertEqual(self.upstream.received, [])


class GatewayTests(_Gateway):
    """Through a real gateway, a recording upstream and a grpcio ExternalProcessor."""

    async def test_default_modes_mutate_headers(self) -> None:
        """Flex's defaults: request and response headers go to the processor; its header
        mutations reach the upstream and the client, except on Host and pseudo-headers."""
        port = self.gateway()
        response = await self.send(port, extra=b"x-replace: old\r\nx-secret: s\r\n")
        self.assertEqual((response.status, response.body), (200, b"onetwo"))
        self.assertEqual(response.header("x-resp-added"), [b"yes"])
        self.assertEqual(response.header("x-upstream-secret"), [])
        received = self.upstream.received[0]
        self.assertEqual(received.header("x-proc-added"), [b"1"])
        self.assertEqual(received.header("x-replace"), [b"new"])
        self.assertEqual(received.header("x-secret"), [])
        self.assertNotIn(b"evil.example", received.header("host"))
        self.assertEqual(received.target, b"/x")
        self.assertEqual(self.server.kinds(), ["request_headers", "response_headers"])
        first, second = self.server.streams[-1]
        sent = header_map(first.request_headers.headers)
        self.assertEqual((sent[":method"], sent[":path"], sent[":authority"], sent["x-replace"]),
                         (b"GET", b"/x", b"t", b"old"))
        self.assertTrue(first.request_headers.end_of_stream)
        self.assertEqual(header_map(second.response_headers.headers)[":status"], b"200")

    async def test_request_body_buffered(self) -> None:
        """requestBodyMode buffered: the whole body goes to the processor, its replacement to
        the upstream with the Content-Length fixed up."""
        port = self.gateway(requestBodyMode="buffered", responseHeaderMode="skip")
        response = await self.send(port, body=b"hello")
        self.assertEqual(response.status, 200)
        received = self.upstream.received[0]
        self.assertEqual(received.body, b"REPLACED:hello")
        self.assertEqual(received.header("content-length"), [b"14"])
        self.assertEqual(self.server.kinds(), ["request_headers", "request_body"])
        self.assertFalse(self.server.streams[-1][0].request_headers.end_of_stream)
        self.assertTrue(self.server.streams[-1][1].request_body.end_of_stream)

    async def test_response_body_buffered_and_trailers(self) -> None:
        """responseBodyMode buffered: the client gets the processor's body, re-framed with a
        Content-Length; responseTrailerMode send: the trailers went to the processor too."""
        port = self.gateway(responseBodyMode="buffered", responseTrailerMode="send")
        response = await self.send(port)
        self.assertEqual((response.status, response.body), (200, b"<onetwo>"))
        self.assertEqual(response.header("content-length"), [b"8"])
        self.assertEqual(self.server.kinds(), ["request_headers", "response_headers",
                                               "response_body", "response_trailers"])
        trailers = header_map(self.server.streams[-1][3].response_trailers.trailers)
        self.assertEqual(trailers["x-trail"], b"t")

    async def test_response_body_streamed(self) -> None:
        """responseBodyMode streamed: one message per piece as it came, the last one ending
        the stream; each answer replaces its piece."""
        port = self.gateway(responseBodyMode="streamed", responseHeaderMode="skip")
        response = await self.send(port)
        self.assertEqual(response.body, b"<one><two>")
        stream = self.server.streams[-1]
        self.assertEqual(self.server.kinds(), ["request_headers", "response_body", "response_body"])
        self.assertEqual([m.response_body.body for m in stream[1:]], [b"one", b"two"])
        self.assertEqual([m.response_body.end_of_stream for m in stream[1:]], [False, True])

    async def test_other_modes(self) -> None:
        """requestHeaderMode skip (the body goes first), requestBodyMode streamed and
        bufferedPartial (sent whole, see the module's differences), responseBodyMode
        bufferedPartial (one message), all headers skipped (no stream at all)."""
        for config, kinds, upstream_body, client_body in (
            ({"requestHeaderMode": "skip", "requestBodyMode": "streamed",
              "responseHeaderMode": "skip"}, ["request_body"], b"REPLACED:abc", b"onetwo"),
            ({"requestBodyMode": "bufferedPartial", "responseHeaderMode": "skip",
              "responseBodyMode": "bufferedPartial"},
             ["request_headers", "request_body", "response_body"], b"REPLACED:abc", b"<onetwo>"),
        ):
            port = self.gateway(**config)
            response = await self.send(port, body=b"abc")
            self.assertEqual((response.status, response.body), (200, client_body))
            self.assertEqual(self.upstream.received[-1].body, upstream_body)
            self.assertEqual(self.server.kinds(), kinds)
        streams = len(self.server.streams)
        quiet = self.gateway(requestHeaderMode="skip", responseHeaderMode="skip")
        self.assertEqual((await self.send(quiet)).body, b"onetwo")
        self.assertEqual(len(self.server.streams), streams)

    async def test_continue_and_replace(self) -> None:
        """CONTINUE_AND_REPLACE on the request headers: its body goes upstream, and the body
        phase is skipped."""
        port = self.gateway(requestBodyMode="buffered", responseHeaderMode="skip")
        await self.send(port, "replace", body=b"original")
        self.assertEqual(self.upstream.received[0].body, b"whole new")
        self.assertEqual(self.server.kinds(), ["request_headers"])

    async def test_immediate_responses(self) -> None:
        """An immediate_response answers the client (request phase: the upstream is never
        asked; response phase: instead of the upstream's response)."""
        port = self.gateway()
        response = await self.send(port, "immediate")
        self.assertEqual((response.status, response.body), (418, b"short and stout"))
        self.assertEqual(response.header("x-why"), [b"teapot"])
        self.assertEqual(self.upstream.received, [])
        later = await self.send(port, "immediate-response")
        self.assertEqual((later.status, later.body), (503, b"processor says no"))
        self.assertEqual(len(self.upstream.received), 1)

    async def test_mode_override(self) -> None:
        """mode_override turns the response body on when allowModeOverride (the default), and
        is ignored when it is false."""
        port = self.gateway()
        self.assertEqual((await self.send(port, "override")).body, b"<onetwo>")
        strict = self.gateway(allowModeOverride=False)
        self.assertEqual((await self.send(strict, "override")).body, b"onetwo")

    async def test_message_timeout_and_stall(self) -> None:
        """A stalled processor: 504 ext_proc_timeout after messageTimeout; with
        failureModeAllow the request goes on unprocessed. (Clocks the test advances: no race
        between the timeout and a loaded machine.)"""
        clock = Clock()
        port = self.gateway(messageTimeout=300, clock=clock)
        self.assertFailed(await self.held(port, "hold", clock), 504, "ext_proc_timeout")
        clock = Clock()
        allowing = self.gateway(messageTimeout=300, failureModeAllow=True, clock=clock)
        passed = await self.held(allowing, "hold", clock, holding=2)
        self.assertEqual((passed.status, passed.body), (200, b"onetwo"))
        self.assertEqual(self.upstream.received[0].header("x-proc-added"), [])
        self.server.release()

    async def test_override_message_timeout(self) -> None:
        """A processor asking for more time (override_message_timeout, 1.5 s) gets it up to
        maxMessageTimeout: once the longer wait is armed, 1 s passing (over messageTimeout) does
        not end it; with the default maximum 0 the request ends at messageTimeout."""
        clock = Clock()
        port = self.gateway(messageTimeout=300, maxMessageTimeout=2000, clock=clock)
        pending = defer.ensureDeferred(self.send(port, "slow"))
        await poll_until(lambda: 1.5 in [c.getTime() for c in clock.getDelayedCalls()])
        clock.advance(1.0)
        self.assertEqual((await pending).header("x-resp-added"), [b"yes"])
        clock = Clock()
        strict = self.gateway(messageTimeout=300, clock=clock)
        pending = defer.ensureDeferred(self.send(strict, "slow"))
        await poll_until(lambda: len(self.server.streams) == 2)
        clock.advance(0.302)
        self.assertEqual((await pending).status, 504)

    async def test_bad_processors(self) -> None:
        """An early end, an error status, garbage, an oversized or a spurious answer, nobody
        listening, a server that is not HTTP/2: 500 with the cause, never let through."""
        port = self.gateway()
        for proc, cause in (("close", "ext_proc_reset"), ("abort", "ext_proc_unavailable"),
                            ("garbage", "ext_proc_bad_response"),
                            ("huge", "ext_proc_bad_response"),
                            ("spurious", "ext_proc_bad_response")):
            self.assertFailed(await self.send(port, proc), 500, cause)
        gone = self.gateway(uri=f"h2://127.0.0.1:{free_port()}")
        self.assertFailed(await self.send(gone), 500, "ext_proc_unavailable")
        listening = reactor.listenTCP(0, protocol.Factory.forProtocol(_Garbage),
                                      interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        garbage = self.gateway(uri=f"h2://127.0.0.1:{listening.getHost().port}")
        response = await self.send(garbage)
        self.assertEqual(response.status, 500)
        self.assertEqual(self.upstream.received, [])
        allowing = self.gateway(uri=f"h2://127.0.0.1:{free_port()}", failureModeAllow=True)
        self.assertEqual((await self.send(allowing)).status, 200)


class ExchangeHoldTests(_Gateway):
    """The exchange's asynchronous response phase under ext_proc: HTTP/2 clients, the body
    bound, local answers, a client that goes away while the response is held."""

    async def test_h2_client_gets_processed_body_and_trailers(self) -> None:
        """An HTTP/2 client: the processed body with its new length, and the response trailers
        as the processor changed them."""
        from flexgw.testing import h2

        port = self.gateway(responseBodyMode="buffered", responseTrailerMode="send")
        conn = await h2.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.transport.abortConnection)
        response = conn.request(b"GET", b"/x", [(b"x-proc", b"mutate")])
        await response.done
        self.assertEqual((response.status, bytes(response.body)), (200, b"<onetwo>"))
        self.assertEqual(response.header(b"content-length"), [b"8"])
        self.assertEqual(response.header(b"x-resp-added"), [b"yes"])
        trailers = dict(response.trailers or [])
        self.assertEqual((trailers.get(b"x-trail"), trailers.get(b"x-trailer-added")),
                         (b"t", b"1"))

    async def test_response_body_over_the_buffer_limit(self) -> None:
        """A response body larger than the body buffer limit, for a policy that reads it
        whole: 500 response_too_large (Envoy's buffer limit on a response)."""
        settings = ("---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
                    "metadata: {name: s}\nspec:\n  http: {bodyBufferLimitBytes: 4}\n")
        port = self.gateway(documents=settings, responseBodyMode="buffered")
        response = await self.send(port)
        self.assertEqual((response.status, response.header("x-flexgw-error")),
                         (500, [b"response_too_large"]))

    async def test_local_answers_skip_the_processor(self) -> None:
        """A later policy's answer (here an IP blocklist's 403) is not sent to the processor:
        it saw the request headers only."""
        blocklist = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: block}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n  order: 90\n"
            "  policyRef: {name: ip-blocklist-flex}\n  config: {ips: [127.0.0.1]}\n")
        port = self.gateway(documents=blocklist)
        response = await self.send(port)
        self.assertEqual(response.status, 403)
        self.assertEqual(self.server.kinds(), ["request_headers"])

    async def test_processor_stalls_on_the_response(self) -> None:
        """The processor stalls on the response headers: 504 ext_proc_timeout instead of the
        upstream's response (its head was held), and the reactor stayed responsive."""
        clock = Clock()
        port = self.gateway(messageTimeout=300, clock=clock)
        response = await self.held(port, "hold-response", clock)
        self.assertEqual((response.status, response.header("x-flexgw-error")),
                         (504, [b"ext_proc_timeout"]))
        self.assertEqual(response.header("x-upstream-secret"), [])
        self.assertEqual(len(self.upstream.received), 1)
        self.server.release()

    async def test_client_gone_while_held(self) -> None:
        """The client goes away while the processor works on the response: the upstream
        connection is dropped, and the gateway serves the next request."""
        port = self.gateway()
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(b"GET /x HTTP/1.1\r\nHost: t\r\nx-proc: hold-response\r\n\r\n")
        await poll_until(lambda: bool(self.server.streams)
                         and "response_headers" in self.server.kinds())
        self.assertEqual(pool_counts(self.started), [(0, 1, 0)])
        conn.abort()
        await poll_until(lambda: pool_counts(self.started) == [(0, 0, 0)])
        self.server.release()
        self.assertEqual((await self.send(port)).body, b"onetwo")


class ConfigErrorTests(TestCase):
    """A bad binding is reported at its file:line:column; the gateway keeps serving."""

    def test_located(self) -> None:
        """An unknown body mode and a non-gRPC URI are errors naming api.yaml's line and
        column; the API is not served (fail closed)."""
        from tests.harness import Gateway, api_document

        for config, where in (({"uri": "h2://127.0.0.1:1", "requestBodyMode": "chunky"},
                               ("api.yaml:16:58: error: PolicyBinding default/proc: "
                                "spec.config.requestBodyMode")),
                              ({"uri": "http://127.0.0.1:1"}, "api.yaml:16:")):
            text = api_document(free_port(), free_port()) + binding(config)
            gateway = Gateway(self, {"api.yaml": text})
            gateway.start()
            errors = [str(p) for p in gateway.service.state.errors]
            self.assertTrue(any(where in e for e in errors), errors)
            self.assertTrue(any("not served" in e for e in errors), errors)
