"""OpenTelemetry export of traced exchanges: an exchange observer that queues finished traces, and
batches sent to the collector off the request path as OTLP (the official `opentelemetry-proto`
messages) over gRPC (unary, on flexgw's own HTTP/2 client) or over HTTP (treq).

The queue is bounded: while the collector is slow or down, spans past `max_queue` are dropped
and counted (`flexgw_tracing_spans_dropped_total`); a request never waits for an export. One
export is in flight at a time, bounded by the provider's `timeout`; the spans of an export that
fails are dropped and counted too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import flexgw
from flexgw.http.tracecontext import ChildSpan, Trace
from flexgw.ingress.contract import IExchangeObserver
from flexgw.plan import TracingSettings
from flexgw.sidecalls.bounded import post_bounded
from flexgw.upstream.grpccall import UnaryCall, h2_pool

if TYPE_CHECKING:
    from flexgw.http.errors import GatewayError
    from flexgw.ingress.exchange import ProxyExchange

_log = Logger(namespace="flexgw.tracing")

#: The gRPC method OTLP exports traces with.
GRPC_PATH = b"/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: Bytes of a collector's answer read at most (an OTLP answer is a few bytes).
ANSWER_LIMIT = 64 * 1024
_SERVER = Span.SpanKind.SPAN_KIND_SERVER
_CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
_INTERNAL = Span.SpanKind.SPAN_KIND_INTERNAL
_ERROR = Status.StatusCode.STATUS_CODE_ERROR


class ExportError(Exception):
    """An OTLP/HTTP collector refused an export (an HTTP status) or sent too much (OTLP/gRPC
    failures are flexgw.upstream.grpccall.GrpcCallError)."""


@implementer(IExchangeObserver)
class Tracer:
    """Queues the trace of each traced exchange as it ends (a tuple: the spans are built at export)."""

    def __init__(self, clock: Any, exporter: SpanExporter) -> None:
        self.clock = clock
        self.exporter = exporter

    def exchange_finished(self, exchange: ProxyExchange, listener: Any) -> None:
        """Close the exchange's trace, if it has one, and offer it for export."""
        trace = exchange.trace
        if trace is None:
            return
        now = self.clock.seconds()
        elapsed = exchange.upstream_elapsed
        first_byte = None if elapsed is None else exchange.upstream_started + elapsed
        destination = exchange.destination
        trace.close(
            now, first_byte, exchange.error_cause, exchange.upstream_started,
            destination.upstream.authority if destination is not None else None,
        )
        route = exchange.route
        record = (
            trace, now, exchange.head, exchange.api_key, route.name if route is not None else None,
            exchange.response_status, exchange.error_cause, exchange.front.peer,
            getattr(listener, "port", 0),
        )
        self.exporter.offer(record, 1 + len(trace.children))

    def tunnel_opened(self, exchange: ProxyExchange, listener: Any) -> None:
        """A tunnel's span ends at the switch."""
        self.exchange_finished(exchange, listener)

    def tunnel_closed(self, exchange: ProxyExchange, listener: Any) -> None:
        """Its span was sent when it opened."""

    def request_refused(self, peer: Any, error: GatewayError, listener: Any) -> None:
        """A refused request has no trace (it reached no API)."""


def _value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    return AnyValue(string_value=str(value))


def _attributes(pairs: Any) -> list[KeyValue]:
    return [KeyValue(key=key, value=_value(value)) for key, value in pairs]


class SpanEncoder:
    """Fills OTLP messages from finished traces, off the request path and cheaply: the spans are
    filled in place inside the export request, and the attributes that are the same for every
    request of one API, route, method and listener (and the literal labels) are serialized once
    and merged into each span (protobuf merges repeated fields by appending)."""

    def __init__(self, settings: TracingSettings) -> None:
        self.settings = settings
        self.resource = Resource(attributes=_attributes(
            [("service.name", settings.service_name), ("service.type", settings.service_type),
             *settings.resource_attributes]
        ))
        # opentelemetry-proto >= 0.19 names it InstrumentationScope (ScopeSpans); older copies of
        # the same files (xds-protos ships some) InstrumentationLibrary: the wire format is the
        # same (fields 1 and 2), so either serializes a request every collector reads.
        scope = getattr(common_pb2, "InstrumentationScope", None) or common_pb2.InstrumentationLibrary
        self.scope = scope(name="flexgw", version=flexgw.__version__)
        self._fixed: dict[tuple[Any, ...], bytes] = {}

    def fixed(self, key: tuple[Any, ...], sampler: Any, api: str | None, route: str | None,
              method: str, scheme: str, version: str, port: int) -> bytes:
        """The serialized constant attributes of a server span (a Span holding only them)."""
        cached = self._fixed.get(key)
        if cached is None:
            pairs: list[tuple[str, Any]] = [
                ("http.request.method", method), ("url.scheme", scheme), ("server.port", port),
                ("network.protocol.version", version), ("flexgw.api", api or ""),
            ]
            if route is not None:
                pairs += [("http.route", route), ("flexgw.route", route)]
            pairs += [(label.name, label.default) for label in sampler.labels if label.type == "literal"]
            if len(self._fixed) > 10_000:  # keys come from the configuration: a bound anyway
                self._fixed.clear()
            cached = self._fixed[key] = Span(attributes=_attributes(pairs)).SerializeToString()
        return cached

    def server_span(self, span: Span, record: tuple[Any, ...]) -> None:
        """Fill `span` as the server span of one exchange, with the OpenTelemetry HTTP semantic-
        convention attributes, the API and route, the labels, the error cause as the status."""
        trace, end, head, api, route, status, cause, peer, port = record
        sampler = trace.sampler
        method = head.method.decode("latin-1")
        span.MergeFromString(self.fixed(
            (sampler, api, route, head.method, peer.scheme, head.version, port),
            sampler, api, route, method, peer.scheme, head.version.decode("latin-1"), port,
        ))
        span.trace_id = trace.trace_id.to_bytes(16, "big")
        span.span_id = trace.span_id.to_bytes(8, "big")
        span.name = sampler.span_name or (f"{method} {route}" if route else method)
        span.kind = _SERVER
        span.start_time_unix_nano = int(trace.start * 1e9)
        span.end_time_unix_nano = int(end * 1e9)
        if trace.parent_id:
            span.parent_span_id = trace.parent_id.to_bytes(8, "big")
        if trace.tracestate:
            span.trace_state = trace.tracestate.decode("latin-1")
        add = span.attributes.add
        authority = head.authority
        host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
        item = add()
        item.key = "url.path"
        item.value.string_value = head.path
        item = add()
        item.key = "server.address"
        item.value.string_value = host.strip("[]")
        item = add()
        item.key = "client.address"
        item.value.string_value = peer.address
        if status:
            item = add()
            item.key = "http.response.status_code"
            item.value.int_value = status
        if cause is not None:
            item = add()
            item.key = "error.type"
            item.value.string_value = cause
        if sampler.labels:
            for name, value in sampler.label_values(head.headers, variable=True):
                item = add()
                item.key = name
                item.value.string_value = value
        if cause is not None or status >= 500 or not status:
            span.status.code = _ERROR
            span.status.message = cause or ""

    @staticmethod
    def child_span(span: Span, trace: Trace, child: ChildSpan) -> None:
        """Fill `span` as a child span (an upstream attempt, a policy wait, a side call)."""
        span.trace_id = trace.trace_id.to_bytes(16, "big")
        span.span_id = child.span_id.to_bytes(8, "big")
        span.parent_span_id = trace.span_id.to_bytes(8, "big")
        span.name = child.name
        span.kind = _INTERNAL if child.kind == "policy" else _CLIENT
        span.start_time_unix_nano = int(child.start * 1e9)
        span.end_time_unix_nano = int(child.end * 1e9)
        attributes = span.attributes
        for key, value in child.attributes:
            item = attributes.add()
            item.key = key
            if isinstance(value, bool):
                item.value.bool_value = value
            else:
                item.value.string_value = value
        events = span.events
        for name, when in child.events:
            event = events.add()
            event.name = name
            event.time_unix_nano = int(when * 1e9)
        if child.error is not None:
            span.status.code = _ERROR
            span.status.message = child.error

    def encode(self, records: list[tuple[Any, ...]]) -> bytes:
        """An ExportTraceServiceRequest holding the spans of `records`, serialized."""
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(self.resource)
        if hasattr(resource_spans, "scope_spans"):
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.CopyFrom(self.scope)
        else:  # the older files (see __init__)
            scope_spans = resource_spans.instrumentation_library_spans.add()
            scope_spans.instrumentation_library.CopyFrom(self.scope)
        spans = scope_spans.spans
        child_span = self.child_span
        for record in records:
            self.server_span(spans.add(), record)
            trace = record[0]
            for child in trace.children:
                child_span(spans.add(), trace, child)
        return request.SerializeToString()


def encode(settings: TracingSettings, records: list[tuple[Any, ...]]) -> bytes:
    """An ExportTraceServiceRequest holding the spans of `records`, serialized (one-off)."""
    return SpanEncoder(settings).encode(records)


class SpanExporter:
    """The bounded queue of finished traces and the batches sent from it."""

    def __init__(
        self, clock: Any, settings: TracingSettings, send: Callable[[bytes], Deferred[Any]]
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.send = send
        self.encoder = SpanEncoder(settings)
        self.queue: list[tuple[tuple[Any, ...], int]] = []  # (record, its span count)
        self.queued = 0  # spans in the queue
        self.dropped = 0
        self.exported = 0
        self.failures = 0  # exports that failed
        self.timer: Any = None
        self.inflight: Deferred[Any] | None = None
        self.stopped = False

    def offer(self, record: tuple[Any, ...], spans: int) -> None:
        """Queue a finished trace of `spans` spans, or drop it when the queue is full."""
        if self.queued + spans > self.settings.max_queue or self.stopped:
            self.dropped += spans
            return
        self.queue.append((record, spans))
        self.queued += spans
        if self.timer is None and self.inflight is None:
            self.timer = self.clock.callLater(self.settings.delay, self.flush)

    def flush(self) -> Deferred[Any] | None:
        """Send the next batch now (unless one is in flight); its Deferred, or None."""
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.inflight is not None or not self.queue:
            return None
        batch: list[tuple[Any, ...]] = []
        count = 0
        limit = self.settings.max_batch
        queue = self.queue
        taken = 0
        for record, spans in queue:
            if batch and count + spans > limit:
                break
            batch.append(record)
            count += spans
            taken += 1
        del queue[:taken]
        self.queued -= count
        try:
            body = self.encoder.encode(batch)
            d = self.send(body)
        except Exception:  # noqa: BLE001 (an export must never break the gateway)
            d = fail(Failure())
        d.addTimeout(self.settings.timeout, self.clock)
        self.inflight = d

        def _sent(_: object) -> None:
            self.exported += count

        def _failed(failure: Failure) -> None:
            self.failures += 1
            self.dropped += count
            if self.failures == 1 or self.failures % 100 == 0:
                _log.warn(
                    "Trace export to {address} failed ({failures} so far): {why}",
                    address=self.settings.address, failures=self.failures,
                    why=failure.getErrorMessage(),
                )

        def _next(_: object) -> None:
            self.inflight = None
            if self.queue and self.timer is None and not self.stopped:
                full = self.queued >= self.settings.max_batch
                self.timer = self.clock.callLater(0 if full else self.settings.delay, self.flush)

        d.addCallbacks(_sent, _failed).addBoth(_next)
        return d

    def stop(self) -> None:
        """Send no more (the gateway stops, or tracing was switched off or changed)."""
        self.stopped = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.dropped += self.queued
        self.queue.clear()
        self.queued = 0


def grpc_sender(reactor: Any, clock: Any, settings: TracingSettings) -> tuple[Callable[[bytes], Deferred[Any]], Any]:
    """(send, close) for OTLP/gRPC to `settings.address` (`h2c://host:port`): unary calls on a
    pool of HTTP/2 connections of its own."""
    host, _, port = settings.address.removeprefix("h2c://").rpartition(":")
    pool = h2_pool(reactor, clock, "h2c", host.strip("[]"), int(port), settings.timeout, key="tracing")

    def send(body: bytes) -> Deferred[Any]:
        return UnaryCall(pool, GRPC_PATH, body, limit=ANSWER_LIMIT).start()

    return send, pool.close_all


def http_sender(reactor: Any, settings: TracingSettings, agent: Any = None) -> tuple[Callable[[bytes], Deferred[Any]], Any]:
    """(send, close) for OTLP/HTTP: a protobuf POST to `settings.address` with treq."""
    url = settings.address

    def send(body: bytes) -> Deferred[Any]:
        d = post_bounded(
            reactor, agent, url, body, {b"Content-Type": [b"application/x-protobuf"]},
            settings.timeout, ANSWER_LIMIT, lambda: ExportError("answer too large"),
        )

        def check(answer: tuple[int, bytes]) -> bytes:
            status, content = answer
            if not 200 <= status < 300:
                raise ExportError(f"HTTP {status}")
            return content

        return d.addCallback(check)

    return send, lambda: None


class TracingService:
    """The gateway's tracing: a Tracer and its exporter for the plan's `tracing` settings,
    replaced when they change on reload, dropped when tracing is switched off."""

    def __init__(self, reactor: Any, clock: Any) -> None:
        self.reactor = reactor
        self.clock = clock
        self.settings: TracingSettings | None = None
        self.tracer: Tracer | None = None
        self._close: Any = None
        # Counts of exporters replaced before (so the metrics never go back).
        self.dropped_before = 0
        self.exported_before = 0
        self.failures_before = 0

    def configure(self, settings: TracingSettings | None) -> Tracer | None:
        """Apply a plan's settings; the Tracer to observe exchanges with (None: tracing off)."""
        if settings == self.settings:
            return self.tracer
        self.stop()
        self.settings = settings
        if settings is None:
            return None
        if settings.protocol == "grpc":
            send, self._close = grpc_sender(self.reactor, self.clock, settings)
        else:
            send, self._close = http_sender(self.reactor, settings)
        self.tracer = Tracer(self.clock, SpanExporter(self.clock, settings, send))
        _log.info("Tracing: OTLP/{protocol} to {address}", protocol=settings.protocol,
                  address=settings.address)
        return self.tracer

    def stop(self) -> None:
        """Stop the exporter in use (its queued spans are dropped and counted)."""
        tracer, self.tracer = self.tracer, None
        self.settings = None
        if tracer is not None:
            exporter = tracer.exporter
            exporter.stop()
            self.dropped_before += exporter.dropped
            self.exported_before += exporter.exported
            self.failures_before += exporter.failures
        if self._close is not None:
            self._close()
            self._close = None

    def counts(self) -> tuple[int, int, int]:
        """(spans exported, spans dropped, failed exports) since the gateway started."""
        exported, dropped, failures = self.exported_before, self.dropped_before, self.failures_before
        if self.tracer is not None:
            exporter = self.tracer.exporter
            exported += exporter.exported
            dropped += exporter.dropped
            failures += exporter.failures
        return exported, dropped, failures
