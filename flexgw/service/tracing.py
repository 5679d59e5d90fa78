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

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.ingress.contract import IExchangeObserver
from flexgw.plan import TracingSettings
from flexgw.service.otlpwire import SpanEncoder, encode
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
__all__ = ["SpanExporter", "TracingService", "encode"]


class ExportError(Exception):
    """An OTLP/HTTP collector refused an export (an HTTP status) or sent too much (OTLP/gRPC
    failures are flexgw.upstream.grpccall.GrpcCallError)."""


@implementer(IExchangeObserver)
class Tracer:
    """Encodes the trace of each traced exchange as it ends, and queues it for export."""

    def __init__(self, clock: Any, exporter: SpanExporter) -> None:
        self.clock = clock
        self.exporter = exporter
        self.encoder = exporter.encoder

    def exchange_finished(self, exchange: ProxyExchange, listener: Any) -> None:
        """Close the exchange's trace, if it has one, and queue its spans (unless the queue is
        full: then they are dropped and counted, and not even encoded)."""
        trace = exchange.trace
        if trace is None:
            return
        exporter = self.exporter
        if exporter.queued >= exporter.max_queue or exporter.stopped:
            exporter.dropped += trace.spans()
            return
        now = self.clock.seconds()
        cause = exchange.error_cause
        elapsed = exchange.upstream_elapsed
        port = getattr(listener, "port", 0)
        if (cause is None and elapsed is not None and trace.attempt is not None
                and trace.attempt_end is None and trace.children is None and trace.policy is None
                and trace.tracestate is None):
            # The common case (Trace.close's work, inline): one upstream attempt, answered.
            trace.attempt_end = now
            trace.first_byte = exchange.upstream_started + elapsed
            spans = self.encoder.answered(trace, exchange, port, now)
            if spans is not None:
                exporter.offer(spans, 2)
                return
        else:
            pool = exchange.pool  # (set once the upstream was asked for a connection)
            trace.close(
                now, None if elapsed is None else exchange.upstream_started + elapsed, cause,
                None if pool is None else exchange.upstream_started,
                None if pool is None else pool.upstream,
            )
        route = exchange.route
        exporter.offer(self.encoder.trace(
            trace, now, exchange.head, exchange.api_key, route.name if route is not None else None,
            exchange.response_status, cause, exchange.front.peer, port,
        ), trace.spans())

    def tunnel_opened(self, exchange: ProxyExchange, listener: Any) -> None:
        """A tunnel's span ends at the switch."""
        self.exchange_finished(exchange, listener)

    def tunnel_closed(self, exchange: ProxyExchange, listener: Any) -> None:
        """Its span was sent when it opened."""

    def request_refused(self, peer: Any, error: GatewayError, listener: Any) -> None:
        """A refused request has no trace (it reached no API)."""


class SpanExporter:
    """The bounded queue of finished traces (their spans' OTLP bytes) and the batches sent
    from it."""

    def __init__(
        self, clock: Any, settings: TracingSettings, send: Callable[[bytes], Deferred[Any]]
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.max_queue = settings.max_queue
        self.send = send
        self.encoder = SpanEncoder(settings)
        self.queue: list[bytes] = []  # each trace's spans, encoded
        self.counts: list[int] = []  # the number of spans of each
        self.queued = 0  # spans in the queue
        self.dropped = 0
        self.exported = 0
        self.failures = 0  # exports that failed
        self.timer: Any = None
        self.urgent = False  # the timer sends a full batch in the next turn
        self.inflight: Deferred[Any] | None = None
        self.stopped = False

    def offer(self, spans_bytes: bytes, spans: int) -> None:
        """Queue a finished trace (`spans` spans, encoded), or drop it when the queue is full."""
        queued = self.queued + spans
        if queued > self.max_queue or self.stopped:
            self.dropped += spans
            return
        self.queue.append(spans_bytes)
        self.counts.append(spans)
        self.queued = queued
        if self.inflight is None:
            # A batch waits at most `delay`; a full one is sent at once (in the next turn).
            full = queued >= self.settings.max_batch
            if self.timer is None:
                self.timer = self.clock.callLater(0 if full else self.settings.delay, self.flush)
                self.urgent = full
            elif full and not self.urgent:
                self.timer.reset(0)
                self.urgent = True

    def flush(self) -> Deferred[Any] | None:
        """Send the next batch now (unless one is in flight); its Deferred, or None."""
        timer, self.timer = self.timer, None
        self.urgent = False
        if timer is not None and timer.active():
            timer.cancel()
        if self.inflight is not None or not self.queue:
            return None
        count = 0
        limit = self.settings.max_batch
        counts = self.counts
        taken = 0
        for spans in counts:
            if taken and count + spans > limit:
                break
            count += spans
            taken += 1
        batch = self.queue[:taken]
        del self.queue[:taken], counts[:taken]
        self.queued -= count
        try:
            d = self.send(self.encoder.request(batch))
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
                self.urgent = full

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
        self.counts.clear()
        self.queued = 0


def grpc_sender(reactor: Any, clock: Any, settings: TracingSettings) -> tuple[Callable[[bytes], Deferred[Any]], Any]:
    """(send, close) for OTLP/gRPC to `settings.address` (`h2c://host:port`, or `h2s://` over
    TLS with `settings.tls`, else the system trust store): unary calls on a pool of HTTP/2
    connections of its own."""
    scheme, _, rest = settings.address.partition("://")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    tls = None
    if scheme == "h2s":
        from flexgw.tls.contexts import build_client_tls
        from flexgw.tls.settings import TLSSettings

        tls = build_client_tls(settings.tls or TLSSettings(), host, http2=True)
    pool = h2_pool(reactor, clock, "h2" if tls is not None else "h2c", host, int(port),
                   settings.timeout, tls, key="tracing")

    def send(body: bytes) -> Deferred[Any]:
        return UnaryCall(pool, GRPC_PATH, body, limit=ANSWER_LIMIT).start()

    return send, pool.abort_all


def http_sender(reactor: Any, settings: TracingSettings, agent: Any = None) -> tuple[Callable[[bytes], Deferred[Any]], Any]:
    """(send, close) for OTLP/HTTP: a protobuf POST to `settings.address` with treq (over
    https with `settings.tls` when set, else the system trust store)."""
    url = settings.address
    if agent is None and settings.tls is not None and url.startswith("https:"):
        from twisted.web.client import Agent

        from flexgw.tls.contexts import SideCallTLSPolicy

        agent = Agent(reactor, contextFactory=SideCallTLSPolicy(settings.tls))

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

    def stop(self) -> Deferred[None] | None:
        """Stop the exporter in use (its queued spans are dropped and counted) and close its
        connections (an export in flight fails); a Deferred firing once they are closed."""
        tracer, self.tracer = self.tracer, None
        self.settings = None
        if tracer is not None:
            exporter = tracer.exporter
            exporter.stop()
            self.dropped_before += exporter.dropped
            self.exported_before += exporter.exported
            self.failures_before += exporter.failures
        close, self._close = self._close, None
        return close() if close is not None else None

    def counts(self) -> tuple[int, int, int]:
        """(spans exported, spans dropped, failed exports) since the gateway started."""
        exported, dropped, failures = self.exported_before, self.dropped_before, self.failures_before
        if self.tracer is not None:
            exporter = self.tracer.exporter
            exported += exporter.exported
            dropped += exporter.dropped
            failures += exporter.failures
        return exported, dropped, failures
