"""OpenTelemetry collectors for tests: an OTLP/gRPC receiver (a real grpcio server decoding
`ExportTraceServiceRequest`) and an OTLP/HTTP one (twisted.web), both keeping the spans they got.

The gRPC receiver runs in grpcio's threads; what it receives is handed to the reactor thread, where
tests wait for it (`wait_for_spans`). `hold()` makes it a slow collector: exports wait until
`release()`.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


class _Collected:
    """The export requests and spans a receiver got, with waits on their number."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.requests: list[ExportTraceServiceRequest] = []
        self.spans: list[Any] = []  # opentelemetry.proto.trace.v1.trace_pb2.Span
        self._waiters: list[tuple[int, defer.Deferred[list[Any]]]] = []

    def received(self, request: ExportTraceServiceRequest) -> None:
        """Keep an export request (in the reactor thread)."""
        self.requests.append(request)
        for resource in request.resource_spans:
            # ScopeSpans, or InstrumentationLibrarySpans in older copies of the OTLP files
            scopes = getattr(resource, "scope_spans", None)
            for scope in scopes if scopes is not None else resource.instrumentation_library_spans:
                self.spans.extend(scope.spans)
        waiting = self._waiters
        self._waiters = []
        for n, d in waiting:
            if len(self.spans) >= n:
                d.callback(self.spans)
            else:
                self._waiters.append((n, d))

    def wait_for_spans(self, n: int) -> defer.Deferred[list[Any]]:
        """Fires with every span received once there are at least `n`."""
        if len(self.spans) >= n:
            return defer.succeed(self.spans)
        d: defer.Deferred[list[Any]] = defer.Deferred()
        self._waiters.append((n, d))
        return d


class OtlpGrpcReceiver(_Collected):
    """A grpcio TraceService on 127.0.0.1 (an ephemeral port)."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self._open = threading.Event()
        self._open.set()
        self.calls = 0  # exports that reached the servicer (counted in its thread)
        self.server: Any = None
        self.port = 0

    def start(self, address: str = "127.0.0.1:0", tls: Any = None) -> int:
        """Serve on `address` (host:port), over TLS with `tls` (a flexgw.testing.certs.Issued:
        the certificate and key to present); returns the port."""
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:
                receiver.calls += 1
                receiver._open.wait(30)
                receiver.reactor.callFromThread(receiver.received, request)
                return ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
            self.port = self.server.add_secure_port(address, credentials)
        self.server.start()
        return self.port

    def hold(self) -> None:
        """Make exports wait (a slow collector) until `release()`."""
        self._open.clear()

    def release(self) -> None:
        """Answer the exports that wait, and the next ones at once."""
        self._open.set()

    def stop(self) -> None:
        """Stop serving (waiting exports are released first)."""
        self.release()
        if self.server is not None:
            self.server.stop(0).wait(5)


class _TracesResource(Resource):
    isLeaf = True

    def __init__(self, collected: _Collected) -> None:
        super().__init__()
        self.collected = collected

    def render_POST(self, request: Any) -> Any:
        """Decode one OTLP/HTTP export (protobuf); answered later while the receiver is held."""
        message = ExportTraceServiceRequest.FromString(request.content.read())
        request.setHeader(b"Content-Type", b"application/x-protobuf")
        held = self.collected.held  # type: ignore[attr-defined]
        if held is not None:
            held.append((request, message))
            return NOT_DONE_YET
        self.collected.received(message)
        return ExportTraceServiceResponse().SerializeToString()


class OtlpHttpReceiver(_Collected):
    """An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on 127.0.0.1."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.listening: Any = None
        self.held: list[tuple[Any, ExportTraceServiceRequest]] | None = None

    def hold(self) -> None:
        """Leave exports unanswered (a slow collector) until `release()`."""
        self.held = []

    def release(self) -> None:
        """Answer the exports that wait, and the next ones at once."""
        held, self.held = self.held or [], None
        for request, message in held:
            self.received(message)
            request.write(ExportTraceServiceResponse().SerializeToString())
            request.finish()

    def start(self) -> int:
        """Serve; returns the port."""
        self.listening = self.reactor.listenTCP(0, Site(_TracesResource(self)), interface="127.0.0.1")
        return int(self.listening.getHost().port)

    def stop(self) -> defer.Deferred[Any]:
        """Stop serving (waiting exports are answered first)."""
        self.release()
        return defer.maybeDeferred(self.listening.stopListening)


class _Discard:
    """A stand-in reactor for the command line: received requests are answered, not kept."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        """Drop it."""


def main(argv: list[str] | None = None) -> None:
    """`python -m flexgw.testing.otlp --listen HOST:PORT`: an OTLP/gRPC receiver that answers every
    export (the benchmark's collector) until it is killed."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--listen", default="127.0.0.1:4317")
    args = parser.parse_args(argv)
    receiver = OtlpGrpcReceiver(_Discard())
    receiver.start(args.listen)
    receiver.server.wait_for_termination()


def attributes(span: Any) -> dict[str, Any]:
    """A span's attributes as a dict of plain values."""
    out = {}
    for item in span.attributes:
        value = item.value
        out[item.key] = getattr(value, value.WhichOneof("value"))
    return out


if __name__ == "__main__":
    main()
