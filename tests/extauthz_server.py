"""External authorization servers for tests: a grpcio `envoy.service.auth.v3.Authorization`
server using Envoy's own messages (xds-protos), and an HTTP one on twisted.web; both decide
from the request's `x-decision` header and record what they were asked."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

from twisted.trial.unittest import SkipTest
from twisted.web.resource import Resource
from twisted.web.server import Site

#: How long a held gRPC call waits for release at most (a bound for the stall tests).
HOLD_LIMIT = 10.0


def grpc_modules(*names: str) -> tuple[Any, ...]:
    """grpc and the named generated modules (Envoy's messages and services from xds-protos);
    the test is skipped when they are not installed."""
    import importlib

    try:
        import grpc

        return (grpc, *(importlib.import_module(name) for name in names))
    except ImportError as e:  # pragma: no cover
        raise SkipTest(f"grpcio / xds-protos not installed: {e}") from None


def headers_of(request: Any) -> dict[str, bytes]:
    """The CheckRequest's headers, whichever way they were sent (raw header_map or map)."""
    http = request.attributes.request.http
    out = {h.key: h.raw_value or h.value.encode() for h in http.header_map.headers}
    out.update({k: v.encode() for k, v in http.headers.items()})
    return out


class GrpcTestServer:
    """A grpcio server on 127.0.0.1 (`self.server`, `self.port`, set by the subclass) whose
    handlers may hold a call until `release()`."""

    server: Any
    port: int

    def __init__(self) -> None:
        self.released = threading.Event()
        self.holding = 0  # calls held so far (a test polls it: the call has arrived)

    def start(self) -> Any:
        """Serve (grpcio's own threads)."""
        self.server.start()
        return self

    def hold(self) -> None:
        """On a grpcio thread: count the held call, then wait for release()."""
        self.holding += 1
        self.released.wait(HOLD_LIMIT)

    def release(self) -> None:
        """Let held calls answer."""
        self.released.set()

    def stop(self) -> None:
        """Stop at once."""
        self.released.set()
        self.server.stop(0).wait(HOLD_LIMIT)

    @property
    def uri(self) -> str:
        """The policy's `uri`."""
        return f"h2://127.0.0.1:{self.port}"


class GrpcAuthzServer(GrpcTestServer):
    """A grpcio ext_authz server on 127.0.0.1. `x-decision`: `allow` (OK, adds `x-user: alice`
    upstream, replaces `x-replace`, removes `x-secret`, adds `x-from-authz` to the response),
    `deny` (401 with a body and a header), `deny-plain` (PERMISSION_DENIED, no response),
    `hold` (waits for `release()`), `huge` (a 2 MiB denial body), `error` (gRPC UNAVAILABLE)."""

    def __init__(self) -> None:
        grpc, pb, pb_grpc = grpc_modules("envoy.service.auth.v3.external_auth_pb2",
                                         "envoy.service.auth.v3.external_auth_pb2_grpc")
        super().__init__()
        self.pb = pb
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []  # each call's gRPC metadata
        server = self

        class Servicer(pb_grpc.AuthorizationServicer):  # type: ignore[misc, name-defined]
            def Check(self, request: Any, context: Any) -> Any:
                """Decide from x-decision."""
                server.requests.append(request)
                server.metadata.append(dict(context.invocation_metadata()))
                return server.decide(request, context)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_AuthorizationServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def decide(self, request: Any, context: Any) -> Any:
        """The answer for one CheckRequest."""
        import grpc
        from envoy.config.core.v3 import base_pb2
        from envoy.type.v3 import http_status_pb2
        from google.protobuf import wrappers_pb2

        pb = self.pb
        decision = headers_of(request).get("x-decision", b"allow")
        if decision == b"hold":
            self.hold()
            decision = b"allow"
        if decision == b"error":
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
        reply = pb.CheckResponse()
        if decision == b"allow":
            ok = reply.ok_response
            ok.headers.add(header=base_pb2.HeaderValue(key="x-user", value="alice"))
            ok.headers.add(header=base_pb2.HeaderValue(key="x-replace", value="new"),
                           append=wrappers_pb2.BoolValue(value=False))
            ok.headers_to_remove.append("x-secret")
            ok.response_headers_to_add.add(header=base_pb2.HeaderValue(key="x-from-authz", value="1"))
            return reply
        reply.status.code = 7  # PERMISSION_DENIED
        if decision == b"deny":
            denied = reply.denied_response
            denied.status.code = http_status_pb2.Unauthorized
            denied.headers.add(header=base_pb2.HeaderValue(key="www-authenticate", value="Custom"))
            denied.body = '{"error":"who are you"}'
        elif decision == b"huge":
            reply.denied_response.body = "x" * (2 << 20)
        return reply


class HttpAuthzServer(Resource):
    """An HTTP authorization server on twisted.web: 200 with `x-user`/`x-extra`/`x-client`
    headers unless the request has `x-decision: deny` (401 with a body, `WWW-Authenticate`,
    `x-reason` and `x-other`); records (method, path, headers) of each request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []
        self.port: Any = None

    def render(self, request: Any) -> bytes:
        """Decide."""
        headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method, request.uri, headers))
        if headers.get(b"x-decision") == [b"deny"]:
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="authz"')
            request.setHeader(b"x-reason", b"no token")
            request.setHeader(b"x-other", b"hidden")
            return b'{"error":"denied by authz"}'
        request.setHeader(b"x-user", b"alice")
        request.setHeader(b"x-extra", b"appended")
        request.setHeader(b"x-client", b"seen")
        return b""

    def listen(self, reactor: Any) -> None:
        """Listen on an ephemeral loopback port."""
        site = Site(self)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")

    @property
    def uri(self) -> str:
        """The policy's `uri` (with a path prefix)."""
        return f"http://127.0.0.1:{self.port.getHost().port}/authz"

    def stop(self) -> Any:
        """Stop listening."""
        return self.port.stopListening()
