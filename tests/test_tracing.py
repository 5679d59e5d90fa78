"""OpenTelemetry tracing: W3C trace context, Flex's sampling, spans exported over OTLP/gRPC (a real
grpcio receiver) and OTLP/HTTP, propagation through two chained gateways, drop on overload."""

from __future__ import annotations

import os
import random
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.config.tracing import duration
from flexgw.http.request import RequestHead
from flexgw.http.tracecontext import Sampler, TraceLabel, parse_traceparent, traceparent
from flexgw.plan import BoundPolicy, TracingSettings
from flexgw.policies.base import PolicyContext
from flexgw.policies.chain import ChainRun
from flexgw.service.metrics import make_registry, render
from flexgw.service.tracing import SpanExporter, encode
from flexgw.testing import client
from flexgw.testing.otlp import OtlpGrpcReceiver, OtlpHttpReceiver, attributes
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port
from tests.keyserver import JsonServer

CLIENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7
SAMPLED = traceparent(CLIENT_TRACE, CLIENT_SPAN)


def _sampler(client: float = 100, random_: float = 100, overall: float = 100,
             draws: list[float] | None = None) -> Sampler:
    """A Sampler whose random draws come from `draws` (0.5 each when not given)."""
    values = iter(draws or [0.5] * 8)
    return Sampler(client=client, random=random_, overall=overall, rng=lambda: next(values),
                   ids=random.Random(7).getrandbits)


class TraceContextTests(SynchronousTestCase):
    """traceparent parsing and the sampling decision, in memory."""

    def test_parse_traceparent(self) -> None:
        """A valid header gives ids and the sampled flag; invalid forms give None."""
        self.assertEqual(parse_traceparent(SAMPLED), (CLIENT_TRACE, CLIENT_SPAN, True))
        self.assertEqual(parse_traceparent(traceparent(5, 6, False)), (5, 6, False))
        for bad in (b"ff-" + SAMPLED[3:], SAMPLED[:-2] + b"0", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
                    b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01", SAMPLED + b"-x", b"junk"):
            self.assertIsNone(parse_traceparent(bad), bad)
        self.assertEqual(parse_traceparent(b"01-" + SAMPLED[3:] + b"-future"), (CLIENT_TRACE, CLIENT_SPAN, True))

    def test_overall_zero_never_traces(self) -> None:
        """overall 0: no trace, whatever the request says (and no random draw)."""
        sampler = Sampler(overall=0, rng=lambda: self.fail("drew"))
        self.assertIsNone(sampler.begin([(b"traceparent", SAMPLED)], 0.0, Clock()))

    def test_continue_sampled_parent(self) -> None:
        """A sampled traceparent is continued: same trace id, the client's span as parent."""
        trace = _sampler().begin([(b"Traceparent", SAMPLED), (b"tracestate", b"a=1")], 1.0, Clock())
        assert trace is not None
        self.assertEqual((trace.trace_id, trace.parent_id, trace.tracestate),
                         (CLIENT_TRACE, CLIENT_SPAN.to_bytes(8, "big"), b"a=1"))
        self.assertNotEqual(trace.span_id, CLIENT_SPAN)

    def test_client_percentage_applies_to_parents(self) -> None:
        """client: 40 traces a sampled parent on a draw under 40%, not on one over."""
        headers = [(b"traceparent", SAMPLED)]
        self.assertIsNotNone(_sampler(client=40, draws=[0.39]).begin(headers, 0.0, Clock()))
        self.assertIsNone(_sampler(client=40, draws=[0.41]).begin(headers, 0.0, Clock()))

    def test_unsampled_parent_is_honoured(self) -> None:
        """A traceparent whose sampled flag is off is not traced."""
        headers = [(b"traceparent", traceparent(CLIENT_TRACE, CLIENT_SPAN, False))]
        self.assertIsNone(_sampler(draws=[0.0]).begin(headers, 0.0, Clock()))

    def test_client_trace_header_uses_client_rate(self) -> None:
        """x-client-trace-id is traced at the client rate even when random is 0."""
        sampler = _sampler(client=100, random_=0, draws=[0.9])
        self.assertIsNotNone(sampler.begin([(b"X-Client-Trace-Id", b"abc")], 0.0, Clock()))
        self.assertIsNone(_sampler(client=100, random_=0, draws=[0.1]).begin([], 0.0, Clock()))

    def test_overall_applies_after(self) -> None:
        """overall 50: a request random selects is kept on a draw under 50% only (random at 100%
        selects without a draw)."""
        self.assertIsNotNone(_sampler(random_=60, overall=50, draws=[0.1, 0.49]).begin([], 0.0, Clock()))
        self.assertIsNone(_sampler(random_=60, overall=50, draws=[0.1, 0.51]).begin([], 0.0, Clock()))
        self.assertIsNone(_sampler(overall=50, draws=[0.51]).begin([], 0.0, Clock()))

    def test_new_trace_is_a_root(self) -> None:
        """Without a parent a new trace id is drawn and the span has no parent."""
        trace = _sampler().begin([], 0.0, Clock())
        assert trace is not None
        self.assertTrue(trace.trace_id and trace.span_id and trace.parent_id is None)

    def test_times_of_zero(self) -> None:
        """On a clock at 0 (a test clock), a span that ended at 0 stays ended then (the exchange's
        end does not move it), and an upstream asked for at 0 that never connected still gets
        its failed attempt span."""
        clock = Clock()
        trace = _sampler().begin([], clock.seconds(), clock)
        assert trace is not None
        span, _ = trace.side_call("jwks")
        span.ended(clock)
        clock.advance(1)
        trace.close(clock.seconds(), None, "upstream_connect_failure", 0.0, "10.0.0.1:80")
        self.assertEqual(span.end, 0.0)
        self.assertEqual((trace.spans(), trace.attempt_start, trace.attempt_end, trace.attempt_error),
                         (3, 0.0, 1.0, "upstream_connect_failure"))

    def test_labels(self) -> None:
        """literal, requestHeader (default when absent) and environment labels."""
        sampler = Sampler(labels=(TraceLabel("a", "literal", "", "x"), TraceLabel("b", "requestHeader", "X-T", "d"),
                                  TraceLabel("c", "environment", "E", "none")), environ={"E": "prod"})
        self.assertEqual(sampler.label_values([(b"x-t", b"v")]), [("a", "x"), ("b", "v"), ("c", "prod")])
        self.assertEqual(sampler.label_values([])[1], ("b", "d"))

    def test_duration(self) -> None:
        """Flex's timeout forms."""
        self.assertEqual([duration(v) for v in ("10s", "500ms", "1m", 3, "x", 0)], [10.0, 0.5, 60.0, 3.0, None, None])


class _Waits:
    """A policy whose request phase takes half a second (by `clock`), then waits for a Deferred."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: defer.Deferred[Any] = defer.Deferred()

    def on_request(self, ctx: PolicyContext) -> defer.Deferred[Any]:
        self.clock.advance(0.5)
        return self.pending

    def on_response(self, ctx: PolicyContext) -> None:
        pass


class PolicySpanTests(SynchronousTestCase):
    """A policy the request waits for gets a child span with the wait's time."""

    def test_async_policy_span(self) -> None:
        """The span starts when the policy starts (not when it returns its Deferred) and ends
        when the Deferred fires."""
        clock = Clock()
        trace = _sampler().begin([], 0.0, clock)
        assert trace is not None
        head = RequestHead(b"GET", b"/", b"1.1", [], "/", b"", "h", True, 0, 0, [], False)
        ctx = PolicyContext(head, "127.0.0.1", "http", "api")
        ctx.trace = trace
        policy = _Waits(clock)
        run = ChainRun([BoundPolicy("ns/slow", "slow-kind", 1, (), policy)], ctx)
        clock.advance(1)
        result = run.run()
        clock.advance(2)
        policy.pending.callback(None)
        self.assertIsNone(self.successResultOf(result))
        [span] = trace.children
        self.assertEqual((span.name, span.start, span.end, span.error), ("policy slow-kind", 1, 3.5, None))


class _Placeholders:
    """An encoder for the placeholder traces of ExporterTests."""

    def request(self, traces: list[bytes]) -> bytes:
        return b"".join(traces)


class ExporterTests(SynchronousTestCase):
    """The bounded queue: drops counted, one export in flight, failures and timeouts dropped."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[defer.Deferred[Any]] = []
        settings = TracingSettings("h2c://127.0.0.1:1", "grpc", max_queue=4, max_batch=2, delay=0.5, timeout=3)
        self.exporter = SpanExporter(self.clock, settings, self._send)
        self.exporter.encoder = _Placeholders()  # type: ignore[assignment]

    def _send(self, body: bytes) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.sent.append(d)
        return d

    def test_full_queue_drops_and_counts(self) -> None:
        """Past max_queue spans, offers are dropped and counted; nothing is sent before the delay."""
        for _ in range(3):
            self.exporter.offer(b"trace", 2)
        self.assertEqual((self.exporter.queued, self.exporter.dropped, self.sent), (4, 2, []))
        self.clock.advance(0.5)
        self.assertEqual((len(self.sent), self.exporter.queued), (1, 2))
        self.exporter.offer(b"trace", 2)
        self.exporter.offer(b"trace", 2)  # the queue is full again while the export waits
        self.assertEqual(self.exporter.dropped, 4)
        self.sent[0].callback(b"")
        self.assertEqual(self.exporter.exported, 2)
        self.clock.advance(0)  # a full batch waits: sent at once
        self.assertEqual(len(self.sent), 2)

    def test_timeout_drops_the_batch(self) -> None:
        """An export that does not answer within the timeout is cancelled; its spans count as dropped."""
        self.exporter.offer(b"trace", 2)
        self.clock.advance(0.5)
        self.clock.advance(3)
        self.assertEqual((self.exporter.failures, self.exporter.dropped, self.exporter.inflight), (1, 2, None))


def tracing_config(address: str, extra: str = "", sampling: str = "{client: 100, random: 100, overall: 100}") -> str:
    """A v1beta1 Configuration enabling tracing to `address`."""
    return (
        "apiVersion: gateway.mulesoft.com/v1beta1\nkind: Configuration\nmetadata: {name: tracing}\n"
        "spec:\n  tracing:\n    provider:\n      type: opentelemetry\n      properties:\n"
        f"        address: {address}\n        serviceName: edge\n        timeout: 5s\n"
        "        scheduleDelay: 10ms\n        resourceAttributes: {deployment.environment: test}\n"
        f"{extra}"
        f"    sampling: {sampling}\n"
        "    labels:\n"
        "      - {name: team, type: literal, defaultValue: payments}\n"
        "      - {name: tenant, type: requestHeader, keyName: x-tenant, defaultValue: none}\n"
        "      - {name: region, type: environment, keyName: FLEX_REGION, defaultValue: unknown}\n"
    )


def api(port: int, upstream: str, name: str = "orders", policies: str = "") -> str:
    """An inline ApiInstance on 127.0.0.1:port to `upstream` (an address)."""
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
        f"metadata: {{name: {name}}}\nspec:\n  address: http://127.0.0.1:{port}\n"
        f"  services:\n    b:\n      address: {upstream}\n{policies}"
    )


def get(path: str, *headers: bytes) -> bytes:
    """A GET closing the connection, with extra header lines."""
    lines = b"".join(h + b"\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n".encode() + lines + b"\r\n"


def by_id(spans: list[Span]) -> dict[bytes, Span]:
    """Spans by span id."""
    return {span.span_id: span for span in spans}


class _TracingCase(TestCase):
    """A recording upstream and gateways exporting to a receiver."""

    timeout = 30
    receiver: Any

    def setUp(self) -> None:
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)

    def gateway(self, address: str, upstream: str, **options: Any) -> tuple[Gateway, int]:
        """A started gateway serving one API to `upstream`, tracing to `address`."""
        port = free_port()
        policies = options.pop("policies", "")
        gateway = Gateway(self, {"api.yaml": api(port, upstream, policies=policies) + "---\n"
                                 + tracing_config(address, **options)}, environ={"FLEX_REGION": "eu"})
        gateway.start()
        return gateway, port

    @property
    def upstream_address(self) -> str:
        return f"http://127.0.0.1:{self.upstream.address[1]}"


class ExportChecks:
    """The gateway tests, run against each kind of collector (`receiver`, `address`)."""

    receiver: Any
    address: str
    upstream: RecordingUpstream
    upstream_address: str
    gateway: Any

    @defer.inlineCallbacks
    def test_spans_attributes_and_propagation(self) -> Any:
        """A continued trace: the server span (HTTP semantic conventions, labels, the client's span
        as parent), the upstream attempt under it, whose id the upstream gets in traceparent."""
        gateway, port = self.gateway(self.address, self.upstream_address)
        response = yield client.request(reactor, "127.0.0.1", port, get(
            "/items/7?secret=1", b"traceparent: " + SAMPLED, b"tracestate: vendor=1", b"x-tenant: acme"))
        self.assertEqual(response.status, 200)
        [arrived] = self.upstream.completed
        [sent] = arrived.header(b"traceparent")
        trace_id, parent_id, sampled = parse_traceparent(sent)  # type: ignore[misc]
        self.assertEqual((trace_id, sampled), (CLIENT_TRACE, True))
        self.assertEqual(arrived.header(b"tracestate"), [b"vendor=1"])
        spans = yield self.receiver.wait_for_spans(2)
        [server] = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
        [attempt] = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_CLIENT]
        self.assertEqual(server.trace_id, CLIENT_TRACE.to_bytes(16, "big"))
        self.assertEqual(server.parent_span_id, CLIENT_SPAN.to_bytes(8, "big"))
        self.assertEqual(server.trace_state, "vendor=1")
        self.assertEqual(attempt.parent_span_id, server.span_id)
        self.assertEqual(attempt.span_id, parent_id.to_bytes(8, "big"))
        self.assertEqual([e.name for e in attempt.events], ["connected", "first_byte"])
        self.assertLessEqual(server.start_time_unix_nano, attempt.start_time_unix_nano)
        self.assertLessEqual(attempt.end_time_unix_nano, server.end_time_unix_nano)
        values = attributes(server)
        self.assertEqual(values["http.request.method"], "GET")
        self.assertEqual(values["url.path"], "/items/7")
        self.assertEqual(values["http.response.status_code"], 200)
        self.assertEqual(values["client.address"], "127.0.0.1")
        self.assertEqual(values["server.address"], "gw.test")
        self.assertEqual(values["server.port"], port)
        self.assertEqual(values["flexgw.api"], "default/orders")
        self.assertIn("http.route", values)
        self.assertEqual((values["team"], values["tenant"], values["region"]), ("payments", "acme", "eu"))
        self.assertNotIn("secret", str(values))
        resource = {a.key: a.value.string_value for a in self.receiver.requests[0].resource_spans[0].resource.attributes}
        self.assertEqual((resource["service.name"], resource["deployment.environment"]), ("edge", "test"))
        [record] = gateway.records()
        self.assertEqual((record["trace_id"], record["span_id"]), (f"{CLIENT_TRACE:032x}", server.span_id.hex()))

    @defer.inlineCallbacks
    def test_error_cause_is_the_span_status(self) -> Any:
        """A gateway error: the server span's status is an error described by x-flexgw-error's cause."""
        _, port = self.gateway(self.address, f"http://127.0.0.1:{free_port()}")
        response = yield client.request(reactor, "127.0.0.1", port, get("/"))
        self.assertEqual(response.status, 503)
        spans = yield self.receiver.wait_for_spans(2)
        [server] = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
        self.assertEqual((server.status.code, server.status.message), (2, "upstream_connect_failure"))
        self.assertEqual(attributes(server)["error.type"], "upstream_connect_failure")

    @defer.inlineCallbacks
    def test_two_chained_gateways(self) -> Any:
        """Client -> gateway A -> gateway B -> upstream: one trace; B's server span is a child of A's
        upstream attempt; the upstream's parent is B's attempt."""
        _, port_b = self.gateway(self.address, self.upstream_address)
        _, port_a = self.gateway(self.address, f"http://127.0.0.1:{port_b}")
        response = yield client.request(reactor, "127.0.0.1", port_a, get("/chained"))
        self.assertEqual(response.status, 200)
        spans = yield self.receiver.wait_for_spans(4)
        self.assertEqual(len({s.trace_id for s in spans}), 1)
        servers = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
        attempts = by_id([s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_CLIENT])
        [root] = [s for s in servers if not s.parent_span_id]
        [inner] = [s for s in servers if s.parent_span_id]
        self.assertEqual(attempts[inner.parent_span_id].parent_span_id, root.span_id)
        _, parent, _ = parse_traceparent(self.upstream.completed[0].header(b"traceparent")[0])  # type: ignore[misc]
        self.assertEqual(attempts[parent.to_bytes(8, "big")].parent_span_id, inner.span_id)

    @defer.inlineCallbacks
    def test_not_sampled_requests_are_left_alone(self) -> Any:
        """overall 0, an unsampled parent, and a tracing-flex override at 0%: nothing is queued, and
        the client's traceparent reaches the upstream unchanged."""
        _, zero = self.gateway(self.address, self.upstream_address, sampling="{client: 100, random: 100, overall: 0}")
        override = ("  policies:\n    - policyRef: {name: tracing-flex}\n"
                    "      config: {sampling: {client: 0, random: 0, overall: 0}, spanName: x}\n")
        overridden, port = self.gateway(self.address, self.upstream_address, policies=override)
        unsampled = traceparent(CLIENT_TRACE, CLIENT_SPAN, False)
        for target, header in ((zero, SAMPLED), (port, unsampled), (port, SAMPLED)):
            response = yield client.request(reactor, "127.0.0.1", target, get("/", b"traceparent: " + header))
            self.assertEqual(response.status, 200)
            self.assertEqual(self.upstream.completed[-1].header(b"traceparent"), [header])
        _, plain = self.gateway(self.address, self.upstream_address)
        yield client.request(reactor, "127.0.0.1", plain, get("/", b"traceparent: " + unsampled))
        self.assertEqual(self.upstream.completed[-1].header(b"traceparent"), [unsampled])
        self.assertEqual(overridden.service.tracing.tracer.exporter.queued, 0)  # type: ignore[union-attr]
        self.assertNotIn("trace_id", overridden.records()[-1])

    @defer.inlineCallbacks
    def test_side_call_and_policy_wait_spans(self) -> Any:
        """A token introspection made for a traced request: the IdP gets a traceparent naming the
        side call's span, a child of the server span; the policy wait has its own span."""
        idp = JsonServer(lambda request: (200, {"active": True, "client_id": "app"}))
        idp.listen(reactor)
        self.addCleanup(idp.stop)
        policies = ("  policies:\n    - policyRef: {name: oauth2-token-introspection-flex}\n"
                    f"      config: {{introspectionURL: '{idp.url}/introspect', authorizationValue: 'Basic eDp5'}}\n")
        _, port = self.gateway(self.address, self.upstream_address, policies=policies)
        response = yield client.request(reactor, "127.0.0.1", port, get("/", b"Authorization: Bearer tok"))
        self.assertEqual(response.status, 200)
        spans = yield self.receiver.wait_for_spans(4)
        [server] = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
        named = {s.name: s for s in spans}
        side, wait = named["introspection"], named["policy oauth2-token-introspection-flex"]
        self.assertEqual((side.parent_span_id, wait.parent_span_id), (server.span_id, server.span_id))
        [sent] = idp.requests[0]["headers"][b"traceparent"]
        self.assertEqual(parse_traceparent(sent), (int.from_bytes(server.trace_id, "big"),
                                                   int.from_bytes(side.span_id, "big"), True))
        self.assertLessEqual(side.end_time_unix_nano, wait.end_time_unix_nano)
        self.assertLess(wait.start_time_unix_nano, wait.end_time_unix_nano)

    @defer.inlineCallbacks
    def test_h2_upstream_gets_traceparent(self) -> Any:
        """An h2c upstream gets the attempt's traceparent in its HTTP/2 HEADERS."""
        upstream = RecordingUpstream(reactor=reactor, h2c=True)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        _, port = self.gateway(self.address, f"h2c://127.0.0.1:{upstream.address[1]}")
        response = yield client.request(reactor, "127.0.0.1", port, get("/h2"))
        self.assertEqual(response.status, 200)
        spans = yield self.receiver.wait_for_spans(2)
        [attempt] = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_CLIENT]
        [sent] = upstream.completed[0].header(b"traceparent")
        self.assertEqual(parse_traceparent(sent)[1].to_bytes(8, "big"), attempt.span_id)  # type: ignore[index]

    @defer.inlineCallbacks
    def test_slow_collector_drops_never_delays(self) -> Any:
        """A collector that does not answer: requests are answered, spans past the queue are dropped
        and counted in /metrics; once it answers, the queued spans arrive."""
        self.receiver.hold()
        gateway, port = self.gateway(self.address, self.upstream_address,
                                     extra="        maxQueueSize: 4\n        maxExportBatchSize: 2\n")
        exporter = gateway.service.tracing.tracer.exporter  # type: ignore[union-attr]
        for n in range(12):
            response = yield client.request(reactor, "127.0.0.1", port, get(f"/{n}"))
            self.assertEqual(response.status, 200)
        self.assertGreaterEqual(exporter.dropped, 24 - 4 - 2)
        text = render(make_registry(gateway.service, process=False)).decode()
        self.assertIn(f"flexgw_tracing_spans_dropped_total {float(exporter.dropped)}", text)
        dropped = exporter.dropped
        self.receiver.release()
        spans = yield self.receiver.wait_for_spans(24 - dropped)
        self.assertEqual(len(spans), 24 - dropped)



def connections_to(port: int) -> list[Any]:
    """This process's open TCP client connections to `port` on loopback."""
    from twisted.internet import tcp

    selectables = set(reactor.getReaders()) | set(reactor.getWriters())  # type: ignore[attr-defined]
    return [s for s in selectables if isinstance(s, tcp.Client) and s.getPeer().port == port]


class GrpcTracingTests(ExportChecks, _TracingCase):
    """Spans over OTLP/gRPC (unary calls on flexgw's HTTP/2 client) to a grpcio receiver."""

    def setUp(self) -> None:
        super().setUp()
        self.receiver = OtlpGrpcReceiver(reactor)
        self.address = f"h2://127.0.0.1:{self.receiver.start()}"
        self.addCleanup(self.receiver.stop)

    @defer.inlineCallbacks
    def test_stop_closes_an_export_in_flight(self) -> Any:
        """The gateway stopping while an export waits on a slow collector closes that export's
        connection before the stop completes (it was left open, busy, past the stop)."""
        self.receiver.hold()
        gateway, port = self.gateway(self.address, self.upstream_address,
                                     extra="        maxExportBatchSize: 2\n")
        exporter = gateway.service.tracing.tracer.exporter  # type: ignore[union-attr]
        response = yield client.request(reactor, "127.0.0.1", port, get("/held"))
        self.assertEqual(response.status, 200)
        while exporter.inflight is None or not connections_to(self.receiver.port):
            yield deferLater(reactor, 0.01, lambda: None)
        yield gateway.stop()
        self.assertEqual(connections_to(self.receiver.port), [])
        self.assertEqual((exporter.inflight, exporter.failures), (None, 1))  # failed, counted


class HttpTracingTests(ExportChecks, _TracingCase):
    """The same over OTLP/HTTP (protobuf POSTs with treq) to a twisted.web receiver."""

    def setUp(self) -> None:
        super().setUp()
        self.receiver = OtlpHttpReceiver(reactor)
        self.address = f"http://127.0.0.1:{self.receiver.start()}"
        self.addCleanup(self.receiver.stop)


class EncodeTests(SynchronousTestCase):
    """The OTLP message itself."""

    def test_empty_batch_encodes(self) -> None:
        """An empty batch is a valid ExportTraceServiceRequest with the resource."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = encode(TracingSettings("h2c://h:1", "grpc", service_name="s"), [])
        request = ExportTraceServiceRequest.FromString(body)
        self.assertEqual(request.resource_spans[0].resource.attributes[0].value.string_value, "s")


def _layout(package: str, group: str, scope: str) -> Any:
    """An ExportTraceServiceRequest class whose ResourceSpans field 2 holds `group` messages with
    the instrumentation scope in field 1 named `scope` (and the installed Span in field 2): the
    layout of opentelemetry-proto's current files (ScopeSpans, scope) or of the older copies
    xds-protos ships under the same module names (InstrumentationLibrarySpans,
    instrumentation_library)."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf.message_factory import GetMessageClass
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated, message = field.LABEL_OPTIONAL, field.LABEL_REPEATED, field.TYPE_MESSAGE
    proto = descriptor_pb2.FileDescriptorProto(
        name=f"{package}.proto", package=package, syntax="proto3",
        dependency=[trace_pb2.DESCRIPTOR.name, resource_pb2.DESCRIPTOR.name])
    kind = proto.message_type.add(name="Scope")
    kind.field.add(name="name", number=1, type=field.TYPE_STRING, label=optional)
    kind.field.add(name="version", number=2, type=field.TYPE_STRING, label=optional)
    spans = proto.message_type.add(name=group)
    spans.field.add(name=scope, number=1, type=message, label=optional, type_name=f".{package}.Scope")
    spans.field.add(name="spans", number=2, type=message, label=repeated,
                    type_name=".opentelemetry.proto.trace.v1.Span")
    resource = proto.message_type.add(name="ResourceSpans")
    resource.field.add(name="resource", number=1, type=message, label=optional,
                       type_name=".opentelemetry.proto.resource.v1.Resource")
    resource.field.add(name="spans", number=2, type=message, label=repeated, type_name=f".{package}.{group}")
    request = proto.message_type.add(name="ExportTraceServiceRequest")
    request.field.add(name="resource_spans", number=1, type=message, label=repeated,
                      type_name=f".{package}.ResourceSpans")
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(proto.name)
    except KeyError:
        pool.Add(proto)
    return GetMessageClass(pool.FindMessageTypeByName(f"{package}.ExportTraceServiceRequest"))


class WireTests(SynchronousTestCase):
    """flexgw's OTLP bytes (flexgw.service.otlpwire) against the official messages."""

    def records(self) -> list[Any]:
        """Two finished traces: a continued one with trace state, a request-header label, a
        retried attempt, a policy wait, a failed side call, an error and a 200-byte path; and a
        new root trace with one attempt that answered on a reused connection."""
        from types import SimpleNamespace

        clock = Clock()
        clock.advance(1_700_000_000)
        sampler = Sampler(labels=(TraceLabel("team", "literal", "", "pay"), TraceLabel("tenant", "requestHeader", "x-t", "-")),
                          ids=random.Random(3).getrandbits)
        peer = SimpleNamespace(scheme="http", address="10.0.0.9")
        long_path = "/" + "p" * 199
        headers = [(b"traceparent", SAMPLED), (b"tracestate", b"v=1"), (b"x-t", b"acme")]
        head = SimpleNamespace(method=b"POST", version=b"1.1", authority="gw.test:8080", path=long_path, headers=headers)
        first = sampler.begin(headers, clock.seconds(), clock)
        assert first is not None
        clock.advance(0.001)
        first.upstream_attempt(first.start, clock.seconds(), "10.1.1.1:80", False)
        clock.advance(0.002)
        first.upstream_attempt(first.start, clock.seconds(), "10.1.1.2:80", False)
        first.policy_waiting("ns/p", "slow-kind", clock.seconds())
        first.policy_done("rejected")
        span, _ = first.side_call("jwks")
        span.set_attribute("url.full", "http://idp/keys")
        span.ended(clock, "jwks_unreachable")
        clock.advance(0.003)
        first.close(clock.seconds(), clock.seconds() - 0.001, "upstream_reset")
        second = Sampler(ids=random.Random(4).getrandbits).begin([], clock.seconds(), clock)
        assert second is not None
        second.upstream_attempt(second.start, clock.seconds() + 0.001, "10.1.1.1:80", True)
        second.close(clock.seconds() + 0.002, clock.seconds() + 0.0015, None)
        plain = SimpleNamespace(method=b"GET", version=b"1.1", authority="gw.test", path="/x", headers=[])
        return [(first, clock.seconds(), head, "ns/api", "r1", 502, "upstream_reset", peer, 8080),
                (second, clock.seconds() + 0.002, plain, "ns/api", "r1", 200, None, peer, 8080)]

    def test_spans_decode_with_the_official_messages(self) -> None:
        """Every field flexgw writes decodes as the OTLP message says, long values included."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        records = self.records()
        request = ExportTraceServiceRequest.FromString(encode(TracingSettings("h2c://h:1", "grpc"), records))
        [group] = request.resource_spans[0].ListFields()[1][1]  # scope_spans or its older name
        spans = list(group.spans)
        self.assertEqual([s.name for s in spans], ["POST r1", "upstream", "upstream", "policy slow-kind", "jwks",
                                                   "GET r1", "upstream"])
        first, second = records[0][0], records[1][0]
        server, attempt, retried, policy, side, root, last = spans
        self.assertEqual((server.trace_id, server.span_id, server.parent_span_id, server.trace_state),
                         (CLIENT_TRACE.to_bytes(16, "big"), first.span_id.to_bytes(8, "big"),
                          CLIENT_SPAN.to_bytes(8, "big"), "v=1"))
        self.assertEqual((server.start_time_unix_nano, server.end_time_unix_nano),
                         (int(first.start * 1e9), int(records[0][1] * 1e9)))
        self.assertEqual((server.status.code, server.status.message), (2, "upstream_reset"))
        values = attributes(server)
        self.assertEqual((values["url.path"], values["server.address"], values["client.address"]),
                         ("/" + "p" * 199, "gw.test", "10.0.0.9"))
        self.assertEqual((values["http.response.status_code"], values["server.port"], values["team"],
                          values["tenant"], values["error.type"]), (502, 8080, "pay", "acme", "upstream_reset"))
        for child in (retried, attempt, policy, side):
            self.assertEqual((child.trace_id, child.parent_span_id), (server.trace_id, server.span_id))
        self.assertEqual((retried.status.message, attributes(retried)["server.address"]), ("retried", "10.1.1.1:80"))
        self.assertEqual(attributes(attempt), {"server.address": "10.1.1.2:80",
                                               "flexgw.upstream.connection_reused": False})
        self.assertEqual([(e.name, e.time_unix_nano) for e in attempt.events],
                         [("connected", int(first.connected * 1e9)), ("first_byte", int(first.first_byte * 1e9))])
        self.assertEqual((attempt.status.code, attempt.status.message), (2, "upstream_reset"))
        self.assertEqual((policy.kind, policy.status.message, attributes(policy)),
                         (Span.SpanKind.SPAN_KIND_INTERNAL, "rejected", {"flexgw.policy.binding": "ns/p"}))
        self.assertEqual((side.status.message, attributes(side)), ("jwks_unreachable", {"url.full": "http://idp/keys"}))
        self.assertEqual((root.parent_span_id, root.trace_id, root.status.code), (b"", second.trace_id.to_bytes(16, "big"), 0))
        # (a reused connection was there before the attempt: no `connected` event)
        self.assertEqual((last.parent_span_id, [e.name for e in last.events]), (root.span_id, ["first_byte"]))
        self.assertTrue(attributes(last)["flexgw.upstream.connection_reused"])

    def test_the_common_case_the_fast_way(self) -> None:
        """SpanEncoder.answered, the fast way for a trace whose one upstream attempt answered,
        writes the spans the general way does (new and reused connections, new and continued
        traces, literal and environment labels; twice, the second time from its cache), and
        declines what is not that case (a request-header label, an error status, a long path)."""
        from types import SimpleNamespace

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        from flexgw.service.otlpwire import SpanEncoder

        encoder = SpanEncoder(TracingSettings("h2c://h:1", "grpc"))
        clock = Clock()
        clock.advance(1_700_000_000)
        labelled = Sampler(labels=(TraceLabel("team", "literal", "", "pay"), TraceLabel("region", "environment", "R", "-")),
                           environ={"R": "eu"}, ids=random.Random(5).getrandbits)
        peer = SimpleNamespace(scheme="http", address="10.0.0.9")
        route = SimpleNamespace(name="r1")

        def finished(sampler: Sampler, headers: list[Any], reused: bool, status: int = 200,
                     path: str = "/items") -> tuple[Any, Any, float]:
            trace = sampler.begin(headers, clock.seconds(), clock)
            assert trace is not None
            trace.upstream_attempt(trace.start + 0.001, trace.start + 0.002, "10.1.1.1:80", reused)
            end = trace.start + 0.004
            trace.close(end, trace.start + 0.003, None)
            head = SimpleNamespace(method=b"GET", version=b"1.1", authority="gw.test", path=path, headers=headers)
            exchange = SimpleNamespace(head=head, api_key="ns/api", route=route, response_status=status,
                                       front=SimpleNamespace(peer=peer))
            return trace, exchange, end

        def spans(data: bytes) -> list[Any]:
            request = ExportTraceServiceRequest.FromString(encoder.request([data]))
            [group] = request.resource_spans[0].ListFields()[1][1]
            return sorted((s.span_id, s.name, s.kind, s.trace_id, s.parent_span_id, s.start_time_unix_nano,
                           s.end_time_unix_nano, s.status.code, attributes(s),
                           [(e.name, e.time_unix_nano) for e in s.events]) for s in group.spans)

        for headers in ([], [(b"traceparent", SAMPLED)]):
            for reused in (False, True):
                trace, exchange, end = finished(labelled, headers, reused)
                fast = encoder.answered(trace, exchange, 8080, end)
                assert fast is not None
                general = encoder.trace(trace, end, exchange.head, "ns/api", "r1", 200, None, peer, 8080)
                self.assertEqual(spans(fast), spans(general))
                self.assertEqual(len(spans(fast)), 2)
                self.assertEqual(encoder.answered(trace, exchange, 8080, end), fast)
        header_labelled = Sampler(labels=(TraceLabel("tenant", "requestHeader", "x-t", "-"),))
        for declined in (finished(header_labelled, [], False), finished(labelled, [], False, status=503),
                         finished(labelled, [], True, path="/" + "p" * 120)):
            self.assertIsNone(encoder.answered(declined[0], declined[1], 8080, declined[2]))

    def test_both_published_layouts_read_the_same_spans(self) -> None:
        """Whichever copy of the OTLP modules an installation has (opentelemetry-proto's, or the
        older one xds-protos ships under the same names), flexgw writes the same bytes, and a
        collector reading either layout gets the same spans and scope."""
        body = encode(TracingSettings("h2c://h:1", "grpc"), self.records())
        decoded = []
        for package, group, scope in (("flexgwtest.current", "ScopeSpans", "scope"),
                                      ("flexgwtest.older", "InstrumentationLibrarySpans", "instrumentation_library")):
            request = _layout(package, group, scope).FromString(body)
            [spans] = request.resource_spans[0].spans
            self.assertEqual(getattr(spans, scope).name, "flexgw")
            decoded.append([s.SerializeToString() for s in spans.spans])
        self.assertEqual(len(decoded[0]), 7)
        self.assertEqual(decoded[0], decoded[1])


class ConfigTests(TestCase):
    """Configuration spec.tracing and tracing-flex as the config pipeline reads them."""

    def load(self, *documents: str) -> Any:
        """The ConfigState for these documents (one file), with FLEX_REGION=eu."""
        from flexgw.config.pipeline import as_source, load_config

        root = self.mktemp()
        os.makedirs(root)
        with open(os.path.join(root, "conf.yaml"), "w") as handle:
            handle.write("---\n".join(documents))
        return load_config(as_source([root]), {"FLEX_REGION": "eu"})

    def test_settings_and_override(self) -> None:
        """The export settings are on the plan; an API with tracing-flex gets its sampling, its
        span name and the gateway's labels plus its own; another API the gateway's sampler."""
        override = ("  policies:\n    - policyRef: {name: tracing-flex}\n      config:\n"
                    "        sampling: {client: 5, random: 6, overall: 7}\n        spanName: orders\n"
                    "        labels: [{name: team, type: literal, defaultValue: orders-team}]\n")
        state = self.load(tracing_config("h2://collector:4317"), api(8081, "http://127.0.0.1:9", policies=override),
                          api(8082, "http://127.0.0.1:9", name="other"))
        self.assertEqual([p for p in state.problems if p.severity != "info"], [])
        settings = state.plan.tracing
        self.assertEqual((settings.address, settings.protocol, settings.service_name, settings.timeout, settings.delay),
                         ("h2c://collector:4317", "grpc", "edge", 5.0, 0.01))
        self.assertEqual(settings.resource_attributes, (("deployment.environment", "test"),))
        apis = {a.key: a for listener in state.plan.listeners for a in listener.apis}
        orders, other = apis["default/orders"].tracing, apis["default/other"].tracing
        self.assertEqual((orders.client, orders.random, orders.overall, orders.span_name), (5, 6, 7, "orders"))
        self.assertEqual([(label.name, label.default) for label in orders.labels],
                         [("tenant", "none"), ("region", "eu"), ("team", "orders-team")])
        self.assertEqual((other.client, other.random, other.overall), (100, 100, 100))
        self.assertEqual(apis["default/orders"].policies, ())  # compile-time only: not in the chain

    def test_no_tracing_costs_nothing(self) -> None:
        """Without spec.tracing no API has a sampler (tracing-flex alone does nothing)."""
        override = "  policies:\n    - policyRef: {name: tracing-flex}\n      config: {sampling: {client: 1}}\n"
        state = self.load(api(8081, "http://127.0.0.1:9", policies=override))
        self.assertIsNone(state.plan.tracing)
        self.assertIsNone(state.plan.listeners[0].apis[0].tracing)

    def test_collector_address_forms(self) -> None:
        """h2:// (Flex's form) is OTLP/gRPC in plaintext; h2s://, grpcs:// and https:// with
        serviceType grpc are OTLP/gRPC over TLS (with defaultTLS.outboundPolicyCalls);
        http(s):// otherwise is OTLP/HTTP."""
        side = ("---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\nmetadata: {name: t}\n"
                "spec:\n  defaultTLS:\n    outboundPolicyCalls: {skipValidation: true}\n")
        for address, extra, expected in (
            ("h2://c:4317", "", ("h2c://c:4317", "grpc")),
            ("h2s://c", "", ("h2s://c:4317", "grpc")),
            ("grpcs://c:9", "", ("h2s://c:9", "grpc")),
            ("https://c:4317", "        serviceType: grpc\n", ("h2s://c:4317", "grpc")),
            ("https://c:4318", "", ("https://c:4318/v1/traces", "http")),
        ):
            state = self.load(tracing_config(address, extra) + side, api(8081, "http://127.0.0.1:9"))
            settings = state.plan.tracing
            self.assertEqual((settings.address, settings.protocol), expected, address)
            self.assertTrue(settings.tls.skip_validation)

    def test_bad_settings_are_reported(self) -> None:
        """An anypoint provider is a warning, an address that is no collector an error with its
        position, a percentage over 100 a schema error; tracing stays off."""
        anypoint = tracing_config("h2://c:1").replace("type: opentelemetry", "type: anypoint")
        state = self.load(anypoint, api(8081, "http://127.0.0.1:9"))
        self.assertIsNone(state.plan.tracing)
        self.assertIn("Local Mode", " ".join(p.message for p in state.problems if p.severity == "warning"))
        state = self.load(tracing_config("ftp://c:1"), api(8081, "http://127.0.0.1:9"))
        [error] = [p for p in state.problems if p.severity == "error"]
        self.assertEqual((error.line, error.field), (9, "spec.tracing.provider.properties.address"))
        state = self.load(tracing_config("h2://c:1", sampling="{client: 101}"), api(8081, "http://127.0.0.1:9"))
        self.assertTrue(any(p.severity == "error" and "sampling" in (p.field or "") for p in state.problems))


class GrpcTlsTracingTests(_TracingCase):
    """OTLP/gRPC over TLS (h2s://) to a grpcio receiver presenting a test CA's certificate."""

    def setUp(self) -> None:
        super().setUp()
        from flexgw.testing.certs import CertificateAuthority

        ca = CertificateAuthority()
        self.ca_path = ca.write(self.mktemp())
        self.receiver = OtlpGrpcReceiver(reactor)
        port = self.receiver.start(tls=ca.issue("collector", ips=["127.0.0.1"]))
        self.address = f"h2s://127.0.0.1:{port}"
        self.addCleanup(self.receiver.stop)

    def trusting(self) -> str:
        """The Configuration that trusts the test CA for the gateway's side calls."""
        return ("---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
                "metadata: {name: side-tls}\nspec:\n  defaultTLS:\n    outboundPolicyCalls:\n"
                f'      trustedCA: "file://{self.ca_path}"\n')

    @defer.inlineCallbacks
    def test_spans_over_tls(self) -> Any:
        """With defaultTLS.outboundPolicyCalls trusting the CA, the spans arrive over TLS."""
        port = free_port()
        Gateway(self, {"api.yaml": api(port, self.upstream_address) + "---\n" + tracing_config(self.address)
                       + self.trusting()}).start()
        response = yield client.request(reactor, "127.0.0.1", port, get("/tls"))
        self.assertEqual(response.status, 200)
        spans = yield self.receiver.wait_for_spans(2)
        self.assertEqual(len({s.trace_id for s in spans}), 1)

    @defer.inlineCallbacks
    def test_untrusted_collector_fails_the_export_only(self) -> Any:
        """Without that CA (the system trust store), the export fails and is counted; the
        request is served as usual."""
        gateway, port = self.gateway(self.address, self.upstream_address)
        response = yield client.request(reactor, "127.0.0.1", port, get("/tls"))
        self.assertEqual(response.status, 200)
        exporter = gateway.service.tracing.tracer.exporter  # type: ignore[union-attr]
        while not exporter.failures:
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((exporter.dropped, self.receiver.calls), (2, 0))
