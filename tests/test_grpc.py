"""gRPC through the gateway with real grpcio clients and servers: every call shape, every status
(before and after the first message), trailing metadata, deadlines, cancellation, and the
gateway's own answers as trailers-only gRPC statuses."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

from h2.errors import ErrorCodes
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import SkipTest, TestCase

from flexgw.testing import h2
from flexgw.testing.upstream import RecordingUpstream, Responder
from tests.harness import Gateway, free_port

try:
    import grpc
except ImportError:  # pragma: no cover (a test dependency: setup.cfg's test extra)
    grpc = None

SERVICE = "flexgw.test.Echo"
MIB = 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * MIB),
    ("grpc.max_send_message_length", 32 * MIB),
]


def code_of(number: int) -> Any:
    """The grpc.StatusCode with wire value `number`."""
    return next(code for code in grpc.StatusCode if code.value[0] == number)


class EchoService:
    """The upstream gRPC service (bytes in, bytes out), driven by what the request says:
    `status:N[:after]` aborts with code N (before any message, or after the first),
    `trailers` answers with trailing metadata, `size:N` answers N bytes, `wait` blocks until
    the call is cancelled (recorded in `cancelled`)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.waiting = threading.Event()
        self.metadata: list[dict[str, Any]] = []
        self.remaining: list[float | None] = []

    def _act(self, request: bytes, context: Any) -> bytes:
        self.metadata.append(dict(context.invocation_metadata()))
        self.remaining.append(context.time_remaining())
        if request.startswith(b"status:"):
            parts = request.split(b":")
            code = code_of(int(parts[1]))
            if len(parts) > 2 and parts[2] == b"details":
                context.set_trailing_metadata(
                    (("grpc-status-details-bin", b"\x08\x05\x12\x04gone"), ("x-why", "absent"))
                )
            context.abort(code, f"said {code.name.lower()}")
        if request == b"trailers":
            context.set_trailing_metadata(
                (("x-trail", "t1"), ("x-bin-bin", b"\x00\x01\xff"))
            )
            return b"with trailers"
        if request.startswith(b"size:"):
            return b"x" * int(request[5:])
        if request == b"wait":
            context.add_callback(self.cancelled.set)
            self.waiting.set()
            self.cancelled.wait(10)
            return b"late"
        return request

    def unary(self, request: bytes, context: Any) -> bytes:
        """Unary: one answer (or status) per request."""
        return self._act(request, context)

    def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        """Server streaming: three messages, or a status after the first (`status:N:after`)."""
        if request.startswith(b"status:") and request.endswith(b":after"):
            yield b"first"
            context.abort(code_of(int(request.split(b":")[1])), "after the first")
        answer = self._act(request, context)
        for i in range(3):
            yield answer + b"#%d" % i

    def client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        """Client streaming: the requests joined."""
        return b"|".join(requests)

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        """Bidirectional streaming: each request echoed as it arrives."""
        for request in requests:
            yield b"echo:" + request

    def handler(self) -> Any:
        """A generic handler for SERVICE (bytes serializers: no code generation)."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


def start_grpc_server(case: TestCase, service: EchoService, credentials: Any = None) -> int:
    """A grpcio server for `service` on a loopback port (TLS with `credentials`); stopped when
    the test ends."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    case.addCleanup(lambda: server.stop(None).wait(5))
    return port


def grpc_api(port: int, service_url: str, documents: str = "") -> str:
    """One API on 127.0.0.1:port whose Service is `service_url`."""
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
        "metadata: {name: grpc-api}\n"
        f"spec:\n  address: http://127.0.0.1:{port}\n"
        f"  services:\n    b:\n      address: {service_url}\n"
        + documents
    )


class GrpcCase(TestCase):
    """Runs blocking grpcio calls off the reactor thread (the gateway runs on the reactor)."""

    def setUp(self) -> None:
        """grpcio is a test dependency; skip clearly without it."""
        if grpc is None:
            raise SkipTest("grpcio is not installed (pip install '.[test]')")

    def channel(self, port: int, credentials: Any = None, options: list[Any] | None = None) -> Any:
        """A grpcio channel to 127.0.0.1:port (h2c, or TLS with `credentials`)."""
        target = f"127.0.0.1:{port}"
        opts = _OPTIONS + (options or [])
        if credentials is None:
            channel = grpc.insecure_channel(target, options=opts)
        else:
            channel = grpc.secure_channel(target, credentials, options=opts)
        self.addCleanup(channel.close)
        return channel

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`function(*args, **kwargs)` in a thread; a Deferred of its result."""
        return threads.deferToThread(function, *args, **kwargs)

    async def failure(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The grpc.RpcError `function(...)` raises (the test fails if it does not)."""
        try:
            await self.call(function, *args, **kwargs)
        except grpc.RpcError as exc:
            return exc
        self.fail("the call succeeded")

    def gateway(self, files: dict[str, str]) -> Gateway:
        """A started gateway on `files`, with no configuration error."""
        gateway = Gateway(self, files)
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        return gateway


def _list(iterator: Iterator[bytes]) -> list[bytes]:
    return list(iterator)


class CallShapesMixin:
    """The call shapes and statuses (before and after the first message) through one gateway
    path; `setUp` of the class using it sets
    `self.port` (the gateway's), `self.service` and `self.credentials` (client side).
    AllCallsMixin adds the rest (run on the h2c path only, to keep the suite short)."""

    port: int
    service: EchoService
    credentials: Any = None
    client_options: list[Any] | None = None

    def stub(self, kind: str, method: str) -> Any:
        """A grpcio multicallable for SERVICE/method through the gateway."""
        channel = self.channel(self.port, self.credentials, self.client_options)  # type: ignore[attr-defined]
        return getattr(channel, kind)(f"/{SERVICE}/{method}")

    async def test_unary(self) -> None:
        """A unary call and its answer."""
        answer = await self.call(self.stub("unary_unary", "Unary"), b"hello", timeout=10)  # type: ignore[attr-defined]
        self.assertEqual(answer, b"hello")  # type: ignore[attr-defined]

    async def test_server_streaming(self) -> None:
        """Server streaming: every message, in order."""
        call = self.stub("unary_stream", "ServerStream")
        answer = await self.call(lambda: _list(call(b"m", timeout=10)))  # type: ignore[attr-defined]
        self.assertEqual(answer, [b"m#0", b"m#1", b"m#2"])  # type: ignore[attr-defined]

    async def test_bidi_streaming(self) -> None:
        """Bidirectional streaming: each request answered."""
        call = self.stub("stream_stream", "Bidi")
        answer = await self.call(lambda: _list(call(iter([b"1", b"2", b"3"]), timeout=10)))  # type: ignore[attr-defined]
        self.assertEqual(answer, [b"echo:1", b"echo:2", b"echo:3"])  # type: ignore[attr-defined]

    async def test_statuses_before_the_first_message(self) -> None:
        """A status given before any message (trailers-only) reaches the client with its code
        and message: NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED..."""
        unary = self.stub("unary_unary", "Unary")
        for number in (3, 5, 7, 8, 14, 16):
            error = await self.failure(unary, b"status:%d" % number, timeout=10)  # type: ignore[attr-defined]
            self.assertEqual(  # type: ignore[attr-defined]
                (error.code(), error.details()),
                (code_of(number), f"said {code_of(number).name.lower()}"),
            )

    async def test_statuses_after_the_first_message(self) -> None:
        """A status after the first message (in trailers) reaches the client, message kept."""
        call = self.stub("unary_stream", "ServerStream")
        for number in (5, 12, 16):
            got: list[bytes] = []

            def run(request: bytes, got: list[bytes] = got) -> None:
                got.extend(call(request, timeout=10))  # (kept up to the failure)

            error = await self.failure(run, b"status:%d:after" % number)  # type: ignore[attr-defined]
            self.assertEqual(  # type: ignore[attr-defined]
                (got, error.code(), error.details()), ([b"first"], code_of(number), "after the first")
            )

    async def test_trailing_metadata(self) -> None:
        """Trailing metadata (text and binary) passes, on success and with a status, where
        `grpc-status-details-bin` passes byte-exact."""
        unary = self.stub("unary_unary", "Unary")
        answer, call = await self.call(unary.with_call, b"trailers", timeout=10)  # type: ignore[attr-defined]
        trailing = dict(call.trailing_metadata())
        self.assertEqual(  # type: ignore[attr-defined]
            (answer, trailing.get("x-trail"), trailing.get("x-bin-bin")),
            (b"with trailers", "t1", b"\x00\x01\xff"),
        )
        error = await self.failure(unary, b"status:5:details", timeout=10)  # type: ignore[attr-defined]
        trailing = dict(error.trailing_metadata())
        self.assertEqual(  # type: ignore[attr-defined]
            (error.code(), trailing.get("grpc-status-details-bin"), trailing.get("x-why")),
            (grpc.StatusCode.NOT_FOUND, b"\x08\x05\x12\x04gone", "absent"),
        )

    async def test_cancellation_reaches_the_server(self) -> None:
        """A client cancelling (RST_STREAM CANCEL) cancels the server's call."""
        future = self.stub("unary_unary", "Unary").future(b"wait", timeout=20)
        await self.call(self.service.waiting.wait, 10)  # type: ignore[attr-defined]
        future.cancel()
        ended = await self.call(self.service.cancelled.wait, 10)  # type: ignore[attr-defined]
        self.assertTrue(ended)  # type: ignore[attr-defined]


class AllCallsMixin(CallShapesMixin):
    """The rest of the call shapes and statuses: client streaming, 16 MiB messages, an unknown
    method, deadlines."""

    async def test_client_streaming(self) -> None:
        """Client streaming: every request message reaches the server."""
        call = self.stub("stream_unary", "ClientStream")
        answer = await self.call(call, iter([b"a", b"b", b"c"]), timeout=10)  # type: ignore[attr-defined]
        self.assertEqual(answer, b"a|b|c")  # type: ignore[attr-defined]

    async def test_16_mib_messages(self) -> None:
        """16 MiB each way, byte-exact."""
        big = bytes(range(256)) * (16 * MIB // 256)
        answer = await self.call(self.stub("unary_unary", "Unary"), big, timeout=30)  # type: ignore[attr-defined]
        self.assertEqual(answer == big, True)  # type: ignore[attr-defined]
        answer = await self.call(self.stub("unary_unary", "Unary"), b"size:%d" % (16 * MIB), timeout=30)  # type: ignore[attr-defined]
        self.assertEqual(len(answer), 16 * MIB)  # type: ignore[attr-defined]

    async def test_unknown_method_is_unimplemented(self) -> None:
        """The server's UNIMPLEMENTED for an unknown method (trailers-only) reaches the client."""
        error = await self.failure(self.stub("unary_unary", "Nope"), b"x", timeout=10)  # type: ignore[attr-defined]
        self.assertEqual(error.code(), grpc.StatusCode.UNIMPLEMENTED)  # type: ignore[attr-defined]

    async def test_deadline(self) -> None:
        """A client deadline ends the call with DEADLINE_EXCEEDED, and the server's call ends."""
        error = await self.failure(self.stub("unary_unary", "Unary"), b"wait", timeout=0.5)  # type: ignore[attr-defined]
        self.assertEqual(error.code(), grpc.StatusCode.DEADLINE_EXCEEDED)  # type: ignore[attr-defined]
        ended = await self.call(self.service.cancelled.wait, 10)  # type: ignore[attr-defined]
        self.assertTrue(ended)  # type: ignore[attr-defined]
        # grpc-timeout reached the server: it knew the call's deadline.
        self.assertIsNotNone(self.service.remaining[-1])  # type: ignore[attr-defined]


class H2cToH2cTests(AllCallsMixin, GrpcCase):
    """grpcio client → gateway (h2c) → `h2c://` grpcio server."""

    def setUp(self) -> None:
        """A grpcio server and a gateway in front of it."""
        super().setUp()
        self.service = EchoService()
        upstream = start_grpc_server(self, self.service)
        self.port = free_port()
        self.gateway({"api.yaml": grpc_api(self.port, f"h2c://127.0.0.1:{upstream}")})


class _TlsCase(GrpcCase):
    """A CA, a certificate for 127.0.0.1 and api.test, and a grpcio TLS server (ALPN h2)."""

    def setUp(self) -> None:
        """The certificates and the TLS grpcio server."""
        super().setUp()
        from flexgw.testing.certs import CertificateAuthority

        self.dir = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority("grpc CA")
        self.ca_path = self.ca.write(self.dir, "ca")
        self.issued = self.ca.issue("upstream", ips=["127.0.0.1"], dns=["api.test"])
        self.service = EchoService()
        self.tls_upstream = start_grpc_server(
            self, self.service,
            grpc.ssl_server_credentials([(self.issued.key_pem, self.issued.cert_pem)]),
        )
        self.port = free_port()


class H2cToH2Tests(CallShapesMixin, _TlsCase):
    """grpcio client → gateway (h2c) → `h2://` grpcio TLS server (ALPN h2)."""

    def setUp(self) -> None:
        """A gateway whose Service is h2:// (trusting the test CA)."""
        super().setUp()
        from tests.test_tls_upstream import documents

        url = f"h2://127.0.0.1:{self.tls_upstream}"
        self.gateway({"api.yaml": documents(self.port, url, f'trustedCA: "file://{self.ca_path}"\n')})


class H2cToAlpnTests(CallShapesMixin, _TlsCase):
    """grpcio client → gateway (h2c) → `https://` grpcio TLS server, HTTP/2 chosen by ALPN
    (the tls-outbound binding's alpn lists h2)."""

    def setUp(self) -> None:
        """A gateway whose Service is https:// with alpn [h2, http/1.1]."""
        super().setUp()
        from tests.test_tls_upstream import documents

        url = f"https://127.0.0.1:{self.tls_upstream}"
        binding = f'trustedCA: "file://{self.ca_path}"\nalpn: [h2, http/1.1]\n'
        self.gateway_ = self.gateway({"api.yaml": documents(self.port, url, binding)})

    async def test_spoken_in_http2(self) -> None:
        """The upstream picked h2: calls go over one HTTP/2 connection."""
        stub = self.stub("unary_unary", "Unary")
        for _ in range(3):
            self.assertEqual(await self.call(stub, b"a", timeout=10), b"a")
        (pool,) = self.gateway_.service.pools.pools.values()
        self.assertEqual((pool.protocol, len(pool.h2.connections), pool.h1.idle), ("h2", 1, []))


class TlsToH2cTests(CallShapesMixin, _TlsCase):
    """grpcio TLS client → gateway TLS listener (ALPN h2) → `h2c://` grpcio server."""

    credentials: Any = None

    def setUp(self) -> None:
        """A gateway with a `tls` binding (certificate for api.test) in front of an h2c server."""
        super().setUp()
        from tests.test_tls_ingress import tls_binding

        upstream = start_grpc_server(self, self.service)
        crt, key = self.issued.write(self.dir, "server")
        api = grpc_api(self.port, f"h2c://127.0.0.1:{upstream}").replace("http://127.0.0.1", "https://127.0.0.1", 1)
        self.gateway({"api.yaml": api + "---\n" + tls_binding("t", "grpc-api", crt, key)})
        self.credentials = grpc.ssl_channel_credentials(root_certificates=self.ca.pem)
        self.client_options = [("grpc.ssl_target_name_override", "api.test")]


class AlpnFallbackTests(GrpcCase):
    """An https:// Service whose alpn lists h2, in front of upstreams that do not pick it:
    HTTP/1.1 is spoken, no request fails."""

    async def _check(self, alpn: list[bytes] | None) -> None:
        from flexgw.testing import client
        from flexgw.testing.certs import CertificateAuthority, server_options
        from flexgw.testing.upstream import echo
        from tests.test_tls_upstream import documents

        directory = os.path.abspath(self.mktemp())
        ca = CertificateAuthority("upstream CA")
        ca_path = ca.write(directory, "ca")
        upstream = RecordingUpstream(echo(), reactor=reactor)
        options = {"acceptableProtocols": alpn} if alpn else {}
        upstream.listen(reactor, tls=server_options(ca.issue("u", ips=["127.0.0.1"]), **options))
        self.addCleanup(upstream.stop)
        port = free_port()
        url = f"https://127.0.0.1:{upstream.address[1]}"
        binding = f'trustedCA: "file://{ca_path}"\nalpn: [h2, http/1.1]\n'
        gateway = self.gateway({"api.yaml": documents(port, url, binding)})
        for path in (b"/one", b"/two"):
            response = await client.request(
                reactor, "127.0.0.1", port, b"GET " + path + b" HTTP/1.1\r\nHost: api\r\n\r\n"
            )
            self.assertEqual(response.status, 200)
        self.assertEqual([r.version for r in upstream.received], ["1.1", "1.1"])
        (pool,) = gateway.service.pools.pools.values()
        self.assertEqual(pool.protocol, "http/1.1")

    async def test_upstream_picks_http1(self) -> None:
        """The upstream picks http/1.1: the waiting request and the next go over HTTP/1.1."""
        await self._check([b"http/1.1"])

    async def test_upstream_without_alpn(self) -> None:
        """The upstream does no ALPN: HTTP/1.1."""
        await self._check(None)


class _Silent(Responder):
    """An h2c upstream that never answers (the gateway's timers decide); `reset` fires with
    the RST_STREAM code the gateway sends it."""

    def __init__(self) -> None:
        self.reset: defer.Deferred[int] = defer.Deferred()

    def on_headers(self, ex: Any) -> None:
        """No answer."""

    def on_complete(self, ex: Any) -> None:
        """Still no answer."""

    def on_reset(self, ex: Any, code: int) -> None:
        """The gateway reset the stream."""
        if not self.reset.called:
            self.reset.callback(code)


class GatewayStatusTests(GrpcCase):
    """What the gateway itself answers a gRPC request: trailers-only, HTTP 200, the mapped
    grpc-status and grpc-message, with `x-flexgw-error`."""

    def start(self, service_url: str, documents: str = "") -> int:
        """A gateway whose Service is `service_url`; its port."""
        port = free_port()
        self.gateway({"api.yaml": grpc_api(port, service_url, documents)})
        return port

    async def _error(self, port: int, method: str = "Unary", **kwargs: Any) -> Any:
        channel = self.channel(port)
        return await self.failure(channel.unary_unary(f"/{SERVICE}/{method}"), b"x", **kwargs)

    async def test_upstream_connect_failure_is_unavailable(self) -> None:
        """No upstream listening: UNAVAILABLE with the gateway's message."""
        port = self.start(f"h2c://127.0.0.1:{free_port()}")
        error = await self._error(port, timeout=10)
        self.assertEqual(
            (error.code(), error.details()),
            (grpc.StatusCode.UNAVAILABLE, "Could not connect to the upstream service"),
        )
        self.assertEqual(
            dict(error.trailing_metadata()).get("x-flexgw-error"), "upstream_connect_failure"
        )

    async def test_no_route_is_unimplemented(self) -> None:
        """No route for the path: UNIMPLEMENTED."""
        port = free_port()
        documents = grpc_api(port, "h2c://127.0.0.1:1").replace(
            f"127.0.0.1:{port}\n", f"127.0.0.1:{port}/only\n", 1
        )
        self.gateway({"api.yaml": documents})
        error = await self._error(port, timeout=10)
        self.assertEqual(error.code(), grpc.StatusCode.UNIMPLEMENTED)
        self.assertEqual(dict(error.trailing_metadata()).get("x-flexgw-error"), "no_route")

    async def test_policy_rejection_is_unauthenticated(self) -> None:
        """A basic-auth policy's 401: UNAUTHENTICATED, WWW-Authenticate kept."""
        port = self.start(f"h2c://127.0.0.1:{free_port()}", _basic_auth_binding())
        error = await self._error(port, timeout=10)
        self.assertEqual(error.code(), grpc.StatusCode.UNAUTHENTICATED)
        metadata = dict(error.trailing_metadata())
        self.assertIn("www-authenticate", metadata)

    async def test_rate_limit_is_resource_exhausted(self) -> None:
        """A rate-limiting 429: RESOURCE_EXHAUSTED; a call within the limit passes."""
        service = EchoService()
        upstream = start_grpc_server(self, service)
        port = self.start(f"h2c://127.0.0.1:{upstream}", _rate_limit_binding())
        unary = self.channel(port).unary_unary(f"/{SERVICE}/Unary")
        self.assertEqual(await self.call(unary, b"one", timeout=10), b"one")
        error = await self.failure(unary, b"two", timeout=10)
        self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(dict(error.trailing_metadata()), {"retry-after": "60"})

    async def test_grpc_timeout_is_a_per_request_deadline(self) -> None:
        """`grpc-timeout` bounds the request (below the route's 15 s response timeout): the
        gateway answers DEADLINE_EXCEEDED (x-flexgw-error upstream_timeout) and resets the
        upstream stream."""
        silent = _Silent()
        upstream = RecordingUpstream(silent, reactor=reactor, h2c=True)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = self.start(f"h2c://127.0.0.1:{upstream.address[1]}")
        conn = await h2.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.transport.abortConnection)
        response = conn.request(
            b"POST", b"/" + SERVICE.encode() + b"/Unary",
            [(b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"200m")],
            body=b"\x00\x00\x00\x00\x01x",
        )
        await response.done
        self.assertEqual(
            (response.status, response.header(b"grpc-status"), response.header(b"x-flexgw-error")),
            (200, [b"4"], [b"upstream_timeout"]),
        )
        self.assertEqual(bytes(response.body), b"")
        self.assertEqual(await silent.reset, ErrorCodes.CANCEL)

    async def test_grpc_timeout_bounds_an_http1_upstream(self) -> None:
        """`grpc-timeout` still runs once the exchange connects to an HTTP/1.1 upstream that
        takes the request and never answers (connecting used to cancel it, leaving only the
        route's 15 s response timeout): DEADLINE_EXCEEDED with upstream_timeout."""
        upstream = RecordingUpstream(_Silent(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = self.start(f"http://127.0.0.1:{upstream.address[1]}")
        conn = await h2.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.transport.abortConnection)
        started = reactor.seconds()
        response = conn.request(
            b"POST", b"/" + SERVICE.encode() + b"/Unary",
            [(b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"200m")],
            body=b"\x00\x00\x00\x00\x01x",
        )
        (request,) = await upstream.wait_for_requests(1)
        await response.done
        self.assertEqual(
            (response.status, response.header(b"grpc-status"), response.header(b"x-flexgw-error")),
            (200, [b"4"], [b"upstream_timeout"]),
        )
        self.assertTrue(request.complete)
        # The 200 ms deadline answered, not the route's 15 s response timeout.
        self.assertLess(reactor.seconds() - started, 10)
        await upstream.wait_for_disconnections(1)  # the upstream request is abandoned


def _basic_auth_binding() -> str:
    """A basic-auth PolicyBinding on grpc-api."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: auth}\n"
        "spec:\n  targetRef: {kind: ApiInstance, name: grpc-api}\n  policyRef: {name: http-basic-authentication-flex}\n"
        "  config:\n    username: u\n    password: p\n"
    )


def _rate_limit_binding() -> str:
    """A rate-limiting PolicyBinding on grpc-api: one request a minute."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: rl}\n"
        "spec:\n  targetRef: {kind: ApiInstance, name: grpc-api}\n  policyRef: {name: rate-limiting-flex}\n"
        "  config:\n    rateLimits:\n      - maximumRequests: 1\n        timePeriodInMilliseconds: 60000\n"
    )


class GrpcWebTests(GrpcCase):
    """gRPC-Web (binary and text, over HTTP/1.1 and HTTP/2) to an `h2c://` grpcio server,
    encoded and decoded by the protocol text (flexgw.testing.grpcweb)."""

    def setUp(self) -> None:
        """A grpcio server and a gateway in front of it."""
        super().setUp()
        self.service = EchoService()
        upstream = start_grpc_server(self, self.service)
        self.port = free_port()
        self.gateway({"api.yaml": grpc_api(self.port, f"h2c://127.0.0.1:{upstream}")})

    async def h1(self, method: str, body: bytes, content_type: bytes, extra: bytes = b"") -> Any:
        """A gRPC-Web call over HTTP/1.1 (Content-Length framed)."""
        from flexgw.testing import client

        head = (
            b"POST /" + SERVICE.encode() + b"/" + method.encode() + b" HTTP/1.1\r\nHost: api\r\n"
            b"Content-Type: " + content_type + b"\r\nX-Grpc-Web: 1\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body)
        )
        return await client.request(reactor, "127.0.0.1", self.port, head + body)

    async def h2(self, method: str, body: bytes, content_type: bytes) -> Any:
        """A gRPC-Web call over HTTP/2 (no content-length: the body ends with the stream)."""
        from flexgw.testing.grpcweb import CLIENT_HEADERS

        conn = await h2.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.transport.abortConnection)
        response = conn.request(
            b"POST", b"/" + SERVICE.encode() + b"/" + method.encode(),
            [(b"content-type", content_type), *CLIENT_HEADERS], body=body,
        )
        return await response.done

    async def test_binary_over_http1(self) -> None:
        """application/grpc-web+proto over HTTP/1.1: the message and the trailer frame come
        back in the (chunked) body."""
        from flexgw.testing.grpcweb import decode_body, encode_messages

        response = await self.h1("Unary", encode_messages([b"hello"]), b"application/grpc-web+proto")
        self.assertEqual(
            (response.status, response.header("content-type"), response.header("content-length")),
            (200, [b"application/grpc-web"], []),  # (grpcio answers application/grpc)
        )
        messages, trailers = decode_body(response.body)
        self.assertEqual((messages, trailers.get("grpc-status")), ([b"hello"], "0"))
        self.assertEqual(self.service.metadata[-1].get("te"), None)  # (grpcio hides te: it was sent)

    async def test_text_over_http1_and_http2(self) -> None:
        """application/grpc-web-text: the base64 request (Content-Length over HTTP/1.1, none
        over HTTP/2) is decoded for the upstream; the answer is one base64 text."""
        from flexgw.testing.grpcweb import decode_body, encode_messages

        body = encode_messages([b"m"], text=True)
        response = await self.h1("ServerStream", body, b"application/grpc-web-text")
        self.assertEqual(response.header("content-type"), [b"application/grpc-web-text"])
        self.assertEqual(
            decode_body(response.body, text=True),
            ([b"m#0", b"m#1", b"m#2"], {"grpc-status": "0", "grpc-message": ""}),
        )
        answer = await self.h2("ServerStream", body, b"application/grpc-web-text+proto")
        self.assertEqual(answer.header(b"content-type"), [b"application/grpc-web-text"])
        self.assertEqual(decode_body(bytes(answer.body), text=True)[0], [b"m#0", b"m#1", b"m#2"])

    async def test_statuses_and_trailing_metadata(self) -> None:
        """A status after the first message (over HTTP/2 and HTTP/1.1) and trailing metadata
        are in the trailer frame; a trailers-only status is in the headers, with an empty
        body."""
        from flexgw.testing.grpcweb import decode_body, encode_messages

        response = await self.h2("ServerStream", encode_messages([b"status:5:after"]), b"application/grpc-web")
        self.assertEqual(
            decode_body(bytes(response.body)),
            ([b"first"], {"grpc-status": "5", "grpc-message": "after the first"}),
        )
        response = await self.h1("ServerStream", encode_messages([b"status:12:after"]), b"application/grpc-web")
        self.assertEqual(
            decode_body(response.body),
            ([b"first"], {"grpc-status": "12", "grpc-message": "after the first"}),
        )
        response = await self.h2("Unary", encode_messages([b"trailers"]), b"application/grpc-web")
        messages, trailers = decode_body(bytes(response.body))
        self.assertEqual((messages, trailers["x-trail"]), ([b"with trailers"], "t1"))
        response = await self.h1("Unary", encode_messages([b"status:16"]), b"application/grpc-web")
        self.assertEqual(
            (response.status, response.header("grpc-status"), response.body),
            (200, [b"16"], b""),
        )

    async def test_cors_exposes_grpc_headers(self) -> None:
        """A request with an Origin gets grpc-status and grpc-message exposed to scripts."""
        from flexgw.testing.grpcweb import encode_messages

        response = await self.h1(
            "Unary", encode_messages([b"x"]), b"application/grpc-web", b"Origin: https://app.test\r\n"
        )
        self.assertEqual(
            response.header("access-control-expose-headers"),
            [b"grpc-status, grpc-message, grpc-status-details-bin"],
        )

    async def test_gateway_answer_is_grpc_web(self) -> None:
        """The gateway's own answer to a gRPC-Web request (its upstream down) is a gRPC-Web
        trailers-only answer: HTTP 200, its content-type, grpc-status UNAVAILABLE."""
        from flexgw.testing import client

        port = free_port()
        self.gateway({"api.yaml": grpc_api(port, f"h2c://127.0.0.1:{free_port()}")})
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"POST /x HTTP/1.1\r\nHost: api\r\nContent-Type: application/grpc-web-text\r\n"
            b"Content-Length: 0\r\n\r\n",
        )
        self.assertEqual(
            (response.status, response.header("content-type"), response.header("grpc-status")),
            (200, [b"application/grpc-web-text"], [b"14"]),
        )


class _TrailersOnlyThenBody(Responder):
    """An h2c upstream answering a gRPC-looking head (grpc-status, no END_STREAM); the test
    then makes it send a body (`exchanges` keeps each stream's exchange)."""

    def __init__(self) -> None:
        self.exchanges: list[Any] = []

    def on_complete(self, ex: Any) -> None:
        """The head only, unless the request asks for a plain answer."""
        if ex.request.target.endswith(b"/Plain"):
            ex.send_head(200, [(b"content-type", b"application/grpc")])
            ex.send_trailers([(b"grpc-status", b"0")])
            return
        ex.send_head(200, [(b"content-type", b"application/grpc"), (b"grpc-status", b"5")])
        self.exchanges.append(ex)


class MalformedGrpcTests(GrpcCase):
    """Bad gRPC framing from the upstream is a stream error, not a connection error."""

    async def test_trailers_only_with_a_body_is_a_stream_error(self) -> None:
        """A body after a head that carried grpc-status (a trailers-only answer without
        END_STREAM): the client's stream is reset with PROTOCOL_ERROR, the access log names
        upstream_bad_response, and another stream on the same connection is answered."""
        responder = _TrailersOnlyThenBody()
        upstream = RecordingUpstream(responder, reactor=reactor, h2c=True)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = self.gateway({"api.yaml": grpc_api(port, f"h2c://127.0.0.1:{upstream.address[1]}")})
        conn = await h2.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.transport.abortConnection)
        grpc_headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        bad = conn.request(b"POST", b"/" + SERVICE.encode() + b"/Bad", grpc_headers, body=b"\x00\x00\x00\x00\x00")
        await bad.head
        (ex,) = responder.exchanges
        ex.write(b"\x00\x00\x00\x00\x01x")
        ex.connection.flush()
        await bad.done
        self.assertEqual(bad.reset_code, ErrorCodes.PROTOCOL_ERROR)
        good = conn.request(b"POST", b"/" + SERVICE.encode() + b"/Plain", grpc_headers, body=b"\x00\x00\x00\x00\x00")
        await good.done
        self.assertEqual((good.status, good.trailers), (200, [(b"grpc-status", b"0")]))
        causes = [r.get("error") for r in gateway.records()]
        self.assertIn("upstream_bad_response", causes)


def _message(payload: bytes, flag: int = 0) -> bytes:
    """One gRPC length-prefixed message."""
    return bytes((flag,)) + len(payload).to_bytes(4, "big") + payload


class _H1Grpc(Responder):
    """An HTTP/1.1 upstream answering in gRPC's shape: `.../After` one message, then
    grpc-status 5 in the chunked trailers; anything else a trailers-only PERMISSION_DENIED (the
    status in the head, no body)."""

    def on_complete(self, ex: Any) -> None:
        """The answer for the request's path."""
        if ex.request.target.endswith(b"/After"):
            ex.send_head(200, [(b"Content-Type", b"application/grpc"), (b"Transfer-Encoding", b"chunked")])
            ex.write(_message(b"first"))
            ex.write_raw(b"0\r\ngrpc-status: 5\r\ngrpc-message: after the first\r\n\r\n")
            ex.finished = True
            return
        ex.send_head(200, [
            (b"Content-Type", b"application/grpc"), (b"grpc-status", b"7"),
            (b"grpc-message", b"said permission_denied"), (b"Content-Length", b"0"),
        ])
        ex.finish()


class H2cToH1Tests(GrpcCase):
    """grpcio client → gateway (h2c) → an HTTP/1.1 upstream (the gateway's HTTP/1.1 client)
    answering in gRPC's shape, statuses in chunked trailers or in the head."""

    def setUp(self) -> None:
        """The HTTP/1.1 upstream and a gateway in front of it."""
        super().setUp()
        upstream = RecordingUpstream(_H1Grpc(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        self.port = free_port()
        self.gateway({"api.yaml": grpc_api(self.port, f"http://127.0.0.1:{upstream.address[1]}")})

    async def test_status_after_the_first_message(self) -> None:
        """The message, then the status of the HTTP/1.1 trailers, reach the client."""
        call = self.channel(self.port).unary_stream(f"/{SERVICE}/After")
        got: list[bytes] = []

        def run() -> None:
            got.extend(call(b"x", timeout=10))

        error = await self.failure(run)
        self.assertEqual(
            (got, error.code(), error.details()),
            ([b"first"], grpc.StatusCode.NOT_FOUND, "after the first"),
        )

    async def test_status_before_the_first_message(self) -> None:
        """A status in the HTTP/1.1 head (no body) reaches the client as trailers-only."""
        error = await self.failure(self.channel(self.port).unary_unary(f"/{SERVICE}/Before"), b"x", timeout=10)
        self.assertEqual(
            (error.code(), error.details()),
            (grpc.StatusCode.PERMISSION_DENIED, "said permission_denied"),
        )


class CircuitOpenTests(GrpcCase):
    """A circuit-breaker-flex binding on an `h2c://` Service that cannot be reached."""

    async def test_circuit_open_is_unavailable(self) -> None:
        """The first call's connect failure opens the circuit; the second gets the gateway's
        circuit_open answer as UNAVAILABLE (x-flexgw-error kept)."""
        from tests.outbound import outbound_binding, service_api

        port = free_port()
        self.gateway({"api.yaml": service_api(port, free_port(), scheme="h2c") + outbound_binding(
            "cb", "circuit-breaker-flex", "consecutiveErrors: 1\nopenSeconds: 60\n",
        )})
        unary = self.channel(port).unary_unary(f"/{SERVICE}/Unary")
        causes = []
        for _ in range(2):
            error = await self.failure(unary, b"x", timeout=10)
            self.assertEqual(error.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertTrue(error.details())
            causes.append(dict(error.trailing_metadata()).get("x-flexgw-error"))
        self.assertEqual(causes, ["upstream_connect_failure", "circuit_open"])


class _DataAfterTrailers:
    """A scripted h2c upstream (flexgw.testing.h2raw): `.../Good` is held; `.../Bad`, arriving
    on the same connection, gets a head and a message at once; `misbehave()` then sends its
    trailers (with END_STREAM when `ended`, without otherwise) followed by a DATA frame, and
    answers `.../Good`."""

    def __new__(cls, ended: bool) -> Any:
        from flexgw.testing import h2raw

        class Script(h2raw.Script):
            def __init__(self) -> None:
                self.good: int | None = None
                self.bad: int | None = None
                self.conn: Any = None
                self.good_seen: defer.Deferred[None] = defer.Deferred()
                self.resets: list[int] = []

            def frame(self, conn: Any, received: Any) -> None:
                if received.kind == h2raw.RST_STREAM:
                    self.resets.append(received.error_code)
                super().frame(conn, received)

            def request(self, conn: Any, stream_id: int, fields: Any) -> None:
                grpc_head = [(b"content-type", b"application/grpc")]
                if dict(fields)[b":path"].endswith(b"/Good"):
                    self.good = stream_id
                    self.good_seen.callback(None)
                    return
                self.bad, self.conn = stream_id, conn
                conn.send(conn.response_headers(stream_id, extra=grpc_head), h2raw.data(stream_id, _message(b"bad")))

            def misbehave(self) -> None:
                conn, bad, good = self.conn, self.bad, self.good
                assert bad is not None and good is not None
                trailers = h2raw.frame(
                    h2raw.HEADERS, h2raw.END_HEADERS | (h2raw.END_STREAM if ended else 0), bad,
                    conn.block([(b"grpc-status", b"0")]),
                )
                conn.send(trailers, h2raw.data(bad, _message(b"after the trailers"), end_stream=True))
                head = conn.response_headers(good, extra=[(b"content-type", b"application/grpc")])
                conn.send(
                    head,
                    h2raw.data(good, _message(b"good")),
                    h2raw.frame(h2raw.HEADERS, h2raw.END_HEADERS | h2raw.END_STREAM, good,
                                conn.block([(b"grpc-status", b"0")])),
                )

        return Script()


class MalformedFramingTests(GrpcCase):
    """The issue's Bad input: DATA after the upstream's trailers, and malformed gRPC framing
    (forwarded byte-exact: the gateway does not parse messages)."""

    async def _data_after_trailers(self, ended: bool) -> tuple[Any, Any, Any, Gateway]:
        """`.../Good` then `.../Bad` on one downstream connection (raw frames), multiplexed on
        one upstream connection; once Bad's message reached the client, the upstream
        misbehaves; returns the client connection, Good's response, the script, the gateway."""
        from flexgw.testing import h2raw

        script = _DataAfterTrailers(ended)
        upstream = h2raw.ScriptedUpstream(script)
        upstream_port = upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = self.gateway({"api.yaml": grpc_api(port, f"h2c://127.0.0.1:{upstream_port}")})
        conn = await h2raw.connect(reactor, "127.0.0.1", port)
        self.addCleanup(lambda: conn.closed or conn.transport.abortConnection())
        fields = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        for stream_id, method in ((1, b"Good"), (3, b"Bad")):
            path = b"/" + SERVICE.encode() + b"/" + method
            conn.send(
                conn.headers(stream_id, conn.request_fields(b"POST", path, extra=fields), end_stream=False),
                h2raw.data(stream_id, _message(b"x"), end_stream=True),
            )
            if stream_id == 1:
                await script.good_seen
        while not any(f.kind == h2raw.DATA and f.stream_id == 3 for f in conn.received):
            await conn.next()  # (frames stay in `received`)
        self.assertEqual(upstream.connections[0].received[-1].stream_id, 3)  # one upstream connection
        script.misbehave()
        good = await conn.response(1)
        return conn, good, script, gateway

    async def test_data_after_trailers_without_end_stream(self) -> None:
        """Trailers without END_STREAM (a malformed response, RFC 9113 §8.1.1), then DATA: the
        client's stream is reset with PROTOCOL_ERROR (its head and first message were out),
        the access log names upstream_bad_response, the upstream stream is reset
        PROTOCOL_ERROR, and the other stream on the same connections (downstream and
        upstream) is answered whole."""
        from flexgw.testing import h2raw

        conn, good, script, gateway = await self._data_after_trailers(ended=False)
        self.assertEqual((good.status, good.body, good.trailers), (200, _message(b"good"), [(b"grpc-status", b"0")]))
        # (the upstream sent Bad's misbehaviour before Good's answer: its frames are all in)
        self.assertEqual([f.error_code for f in conn.frames_of(h2raw.RST_STREAM, 3)], [h2raw.PROTOCOL_ERROR])
        self.assertNotIn(b"after the trailers", b"".join(f.payload for f in conn.frames_of(h2raw.DATA)))
        self.assertIn(h2raw.PROTOCOL_ERROR, script.resets)
        self.assertEqual(
            sorted((r["path"].rsplit("/", 1)[-1], r["error"]) for r in gateway.records()),
            [("Bad", "upstream_bad_response"), ("Good", None)],
        )

    async def test_data_after_trailers_with_end_stream(self) -> None:
        """Trailers with END_STREAM, then DATA on the closed stream: the client's response is
        the one that ended (the stray DATA is not forwarded), the upstream stream is reset
        STREAM_CLOSED, and the other stream is answered whole."""
        from flexgw.testing import h2raw

        conn, good, script, _gateway = await self._data_after_trailers(ended=True)
        self.assertEqual((good.status, good.body, good.trailers), (200, _message(b"good"), [(b"grpc-status", b"0")]))
        # (the upstream sent Bad's misbehaviour before Good's answer: its frames are all in)
        bad = [f for f in conn.received if f.stream_id == 3]
        self.assertEqual(
            [(f.kind, f.flags & h2raw.END_STREAM, f.fields) for f in bad],
            [
                (h2raw.HEADERS, 0, [(b":status", b"200"), (b"content-type", b"application/grpc")]),
                (h2raw.DATA, 0, None),
                (h2raw.HEADERS, h2raw.END_STREAM, [(b"grpc-status", b"0")]),
            ],
        )
        self.assertEqual(bad[1].payload, _message(b"bad"))
        self.assertNotIn(b"after the trailers", b"".join(f.payload for f in conn.frames_of(h2raw.DATA)))
        self.assertIn(h2raw.STREAM_CLOSED, script.resets)

    async def test_malformed_length_prefixes_forwarded_byte_exact(self) -> None:
        """A length prefix past the end of the stream, and the compressed flag without
        grpc-encoding, reach the upstream byte-exact and come back (echoed) byte-exact."""
        from flexgw.testing import h2raw
        from flexgw.testing.upstream import echo

        upstream = RecordingUpstream(echo(), reactor=reactor, h2c=True, retain_bodies=True)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        self.gateway({"api.yaml": grpc_api(port, f"h2c://127.0.0.1:{upstream.address[1]}")})
        conn = await h2raw.connect(reactor, "127.0.0.1", port)
        self.addCleanup(lambda: conn.closed or conn.transport.abortConnection())
        bodies = [b"\x00\x00\x00\x00\x10abc", _message(b"squeezed?", flag=1), b"\x00\x00"]
        fields = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        for i, body in enumerate(bodies):
            stream_id = 1 + 2 * i
            path = b"/" + SERVICE.encode() + b"/Unary"
            conn.send(
                conn.headers(stream_id, conn.request_fields(b"POST", path, extra=fields), end_stream=False),
                h2raw.data(stream_id, body, end_stream=True),
            )
            response = await conn.response(stream_id)
            self.assertEqual((response.status, response.body), (200, body))
        self.assertEqual([r.body for r in upstream.received], bodies)
