"""One proxied request: downstream request → upstream connection → response back, streamed.

The exchange owns the timing of a request once its head is parsed: the upstream response
timeout (from the end of the request to the response head) and the stream idle timeout (no
bytes either way). Bodies are never buffered whole: the transport on the sending side is
registered as the producer of the receiving side, so a slow reader pauses the fast writer.
"""

from __future__ import annotations

import enum
import json

from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http import errors
from flexgw.http.errors import GatewayError
from flexgw.http.fastwrite import send_now
from flexgw.http.gate import BACKPRESSURE, HELD, HELD_OR_BACKPRESSURE
from flexgw.http.grpc import (
    EXPOSE_GRPC,
    GRPC_WEB,
    encode_message,
    status_for_http,
    web_content_type,
)
from flexgw.http.headers import (
    HOP_BY_HOP,
    HeaderList,
    connection_tokens,
    response_headers_for_downstream,
)
from flexgw.http.request import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, RequestHead
from flexgw.http.tracecontext import Trace
from flexgw.http.tunnel import IDLE_TIMEOUT, Tunnel
from flexgw.ingress.contract import IExchangeFront, IExchangeObserver
from flexgw.ingress.grpcweb import GrpcWebSink
from flexgw.ingress.h2request import send_request
from flexgw.ingress.routing import remaining_path, rules_match
from flexgw.plan import Api, BoundPolicy, Destination, Route
from flexgw.policies.base import LocalResponse, PolicyContext
from flexgw.policies.chain import ChainRun
from flexgw.policies.expressions import EvaluationError, to_text
from flexgw.upstream.connection import UpstreamConnection
from flexgw.upstream.pool import UpstreamTLSError
from flexgw.upstream.retry import CONNECT_FAILURE, IDEMPOTENT, RESET, TIMEOUT

_CONNECTION_OPTIONS = HOP_BY_HOP | {b"close"}  # Connection tokens that name no end-to-end header
#: Trailer fields never forwarded (framing, routing and hop-by-hop fields: RFC 9110 §6.5.1).
NOT_TRAILERS = HOP_BY_HOP | {b"content-length", b"host", b"content-type", b"content-encoding"}
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
#: Request header names _upstream_head never copies as they are (one set test per header).
_NOT_COPIED = HOP_BY_HOP | {b"content-length", b"host", b"forwarded"}
#: Response header names never forwarded as they are (the framing is decided again).
_NOT_FORWARDED = HOP_BY_HOP | {b"content-length"}
#: The header a traced request's own `traceparent` line replaces upstream.
_TRACEPARENT = frozenset({b"traceparent"})



class ExchangeState(enum.Enum):
    """Where an exchange is. States have no order: compare them by identity only. Only the
    exchange's own methods (ProxyExchange's, in this module) change an exchange's state."""

    WAITING = "waiting"  # head parsed, not started (pipelined behind another exchange)
    POLICIES = "policies"  # waiting for I/O before the upstream (a policy's, a name lookup)
    BUFFERING = "buffering"  # receiving the whole body for a policy that reads it
    CONNECTING = "connecting"  # waiting for an upstream connection
    SENDING = "sending"  # upstream connected; request head (and maybe body) being sent
    RESPONDING = "responding"  # response head forwarded; body streaming back
    HOLDING = "holding"  # response head held while a response-phase policy does I/O
    TUNNEL = "tunnel"  # the two connections became a byte tunnel (an upgrade, a CONNECT)
    DONE = "done"


# Module-level names for the per-request paths (a global is cheaper than a class attribute).
WAITING = ExchangeState.WAITING
POLICIES = ExchangeState.POLICIES
BUFFERING = ExchangeState.BUFFERING
CONNECTING = ExchangeState.CONNECTING
SENDING = ExchangeState.SENDING
RESPONDING = ExchangeState.RESPONDING
HOLDING = ExchangeState.HOLDING
TUNNEL = ExchangeState.TUNNEL
DONE = ExchangeState.DONE
_BEFORE_UPSTREAM = (WAITING, CONNECTING, POLICIES, BUFFERING)  # request body is kept aside


def grpc_answer(
    response: GatewayError | LocalResponse, extra: HeaderList | None, content_type: bytes
) -> LocalResponse:
    """What the gateway answers a gRPC request instead of `response` (its own error or a
    policy's answer), as Envoy does: trailers-only, HTTP 200, the mapped `grpc-status` and a
    `grpc-message`, keeping `x-flexgw-error` and the policies' headers (WWW-Authenticate, rate
    limit headers, ...). The response status stays the HTTP one in the access log. A gRPC-Web
    request gets its own content-type back, and the gRPC headers exposed to scripts (CORS)."""
    if isinstance(response, GatewayError):
        message = response.message
        headers: list[tuple[bytes, bytes]] = [(b"x-flexgw-error", response.cause.encode("ascii"))]
        headers.extend(response.headers)
    else:
        message = _local_message(response)
        headers = [(n, v) for n, v in response.headers if n.lower() not in _NOT_IN_GRPC_ANSWER]
    if extra:
        headers.extend((n, v) for n, v in extra if n.lower() not in _NOT_IN_GRPC_ANSWER)
    if content_type.startswith(GRPC_WEB):
        headers.append(EXPOSE_GRPC)
    return LocalResponse(
        200,
        (
            (b"content-type", web_content_type(content_type)),
            (b"grpc-status", b"%d" % status_for_http(response.status)),
            (b"grpc-message", encode_message(message)),
            *headers,
        ),
        b"",
        response.cause if isinstance(response, LocalResponse) else None,
    )


_NOT_IN_GRPC_ANSWER = frozenset({b"content-type", b"content-length", b"grpc-status", b"grpc-message"})


def _local_message(response: LocalResponse) -> str:
    """A policy answer's message: its JSON `error` (or `message`), else the reason phrase."""
    body = response.body
    if body[:1] == b"{":
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            for key in ("error", "message"):
                if isinstance(parsed.get(key), str):
                    return str(parsed[key])[:512]
    return errors.REASONS.get(response.status, b"Error").decode("ascii")


@implementer(IExchangeObserver)
class ChainFinish:
    """The observer that tells the policies that asked (`on_done`) how their exchange ended."""

    def exchange_finished(self, exchange: ProxyExchange, listener: object) -> None:
        """An exchange ended: its policies hear the status and the error cause."""
        chain = exchange.chain
        if chain is not None and chain.finishers is not None:
            chain.finish(exchange.response_status, exchange.error_cause)

    def tunnel_opened(self, exchange: ProxyExchange, listener: object) -> None:
        """A tunnel is no end: the policies hear when it closes."""

    tunnel_closed = exchange_finished

    def request_refused(self, peer: object, error: GatewayError, listener: object) -> None:
        """A refused request ran no policy."""


CHAIN_FINISH = ChainFinish()


class ProxyExchange:
    """Moves one request to its upstream and the response back."""

    __slots__ = (
        "api_key",
        "attempts",
        "body_sent",
        "bytes_in",
        "bytes_out",
        "chain",
        "conn",
        "deadline",
        "destination",
        "error_cause",
        "flushed",
        "front",
        "grpc_web",
        "head",
        "hold",
        "last_activity",
        "out",
        "pending",
        "pool",
        "request_complete",
        "response_chunked",
        "response_close",
        "response_status",
        "retried",
        "retry_body",
        "retrying",
        "reused",
        "route",
        "started",
        "state",
        "tap",
        "timer",
        "trace",
        "unproduced",
        "until_close",
        "upstream_elapsed",
        "upstream_started",
        "upstream_target",
    )

    def __init__(self, front: IExchangeFront, head: RequestHead, started: float) -> None:
        self.front = front
        self.head = head
        self.route: Route | None = None
        self.destination: Destination | None = None
        self.upstream_target = b""
        self.api_key: str | None = None
        self.state: ExchangeState = WAITING
        self.conn: UpstreamConnection | None = None
        self.pool = None
        self.request_complete = False
        self.pending: list[bytes] | None = None  # body pieces received before the upstream
        self.response_status = 0
        self.response_chunked = False
        self.response_close = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = started
        self.upstream_started = 0.0
        self.upstream_elapsed: float | None = None
        # The response and stream idle timeouts are the front's watchdog's deadline (set by
        # _watch); `timer` is a retry's backoff.
        self.timer = None
        self.deadline = None  # a gRPC request's `grpc-timeout` timer
        self.grpc_web: GrpcWebSink | None = None  # a gRPC-Web request's translation
        self.last_activity = started
        self.error_cause: str | None = None
        self.retried = False
        self.attempts = 1  # tries sent to the upstream (retries: flexgw.upstream.retry)
        self.retry_body: bytes | None = None  # the whole body, kept to replay it on a retry
        self.retrying = False  # this try is a retry counted in its Service's retry budget
        self.reused = False
        self.body_sent = False
        self.until_close = False  # the upstream body ends when the upstream closes
        self.chain: ChainRun | None = None  # the policies applied to this request
        self.out: list[bytes] | None = None  # response bytes produced by the current upstream read
        self.flushed = False  # some of the response (its head first) went to the client
        # The HTTP/1.1 response head is queued and the upstream connection is not registered
        # as the client transport's producer yet (_send_head, flush_response).
        self.unproduced = False
        self.trace: Trace | None = None  # the request's trace, when it is traced
        # A response-phase policy's body tap (`PolicyContext.response_tap`): fed every piece of
        # the response body as it goes downstream (the HTTP cache); None for nearly every request.
        self.tap = None
        # While a response-phase policy does I/O (HOLDING): what the upstream sent meanwhile.
        self.hold: ResponseHold | None = None
        if head.grpc:
            self._grpc_start()

    # -- request side, driven by the front ---------------------------------------------------------

    def start(self) -> None:
        """Route the request and ask for an upstream connection (or answer an error)."""
        front = self.front
        head = self.head
        match = front.route(head)
        if match is None:
            self.fail(errors.NO_ROUTE)
            return
        api = match.api
        self.api_key = api.key
        if api.tracing is not None:
            self.trace = api.tracing.begin(head.headers, self.started, front.clock)
        self.route = match.route
        self.destination = match.destination
        # (request_prefix is b"" unless the upstream is reached through a forward proxy)
        self.upstream_target = (
            match.destination.upstream.request_prefix
            + match.upstream_path.encode("latin-1")
            + head.query
        )
        if match.destination.chain and self._select_policies(api, match.destination):
            self._start_chain()
            return
        self._connect()

    def _grpc_start(self) -> None:
        """A gRPC request: its deadline (`grpc-timeout`) starts; a gRPC-Web one is translated
        to gRPC for the upstream (GrpcWebSink)."""
        head = self.head
        if head.grpc_timeout is not None:
            self.deadline = self.front.clock.callLater(head.grpc_timeout, self._deadline_passed)
        if head.grpc.startswith(GRPC_WEB):
            self.grpc_web = GrpcWebSink(self)

    def _start_chain(self) -> None:
        """Run the selected policies; when one reads the body, receive it whole (bounded) first."""
        assert self.chain is not None
        if self.head.body != BODY_NONE and any(b.needs_body for b in self.chain.policies):
            self.state = BUFFERING
            self._watch(self._stream_idle_timeout())
            if self.request_complete:
                self._body_buffered()
            return
        self._run_chain()

    def _select_policies(self, api: Api, destination: Destination) -> bool:
        """Prepare the chain of the policies whose rules select this request (False: none)."""
        head = self.head
        front = self.front
        selected: tuple[BoundPolicy, ...] | list[BoundPolicy] = destination.chain
        if destination.chain_has_rules:
            method = head.method.decode("ascii")
            rest = remaining_path(api, head.path)
            selected = [
                bound
                for bound in selected
                if not bound.rules
                or rules_match(bound.rules, method, rest, head.authority, head.headers)
            ]
            if not selected:
                return False
        peer = front.peer
        ctx = PolicyContext(head, peer.address, peer.scheme, api.key)
        if peer.trusted:
            ctx.trusted_proxies = front.http.trusted_proxies
        if peer.certificate is not None:
            ctx.peer_certificate = peer.certificate
        if head.connection_values:
            # Connection-listed headers are removed before the policies run, so that a client
            # cannot name (and strip) a header a policy injects.
            drop = connection_tokens(head.connection_values)
            if not drop <= _CONNECTION_OPTIONS:  # not just "keep-alive" / "close"
                ctx.request_headers[:] = [(n, v) for n, v in head.headers if n.lower() not in drop]
        ctx.trace = self.trace
        self.chain = ChainRun(selected, ctx)
        return True

    def _run_chain(self) -> None:
        """Run the request phase; then answer locally, wait for a policy's I/O, or connect."""
        assert self.chain is not None
        outcome = self.chain.run()
        if outcome is None:
            self._connect()
        elif isinstance(outcome, LocalResponse):
            self.respond_locally(outcome)
        else:
            self._await_io()
            outcome.addCallback(self._policies_done)

    def _await_io(self) -> None:
        """Wait for I/O before the upstream (a policy's, a name lookup): a body is held
        meanwhile, and downstream_lost cancels the wait."""
        self.state = POLICIES
        if self.head.body != BODY_NONE and not self.request_complete:
            self.front.gate.hold(HELD)

    def _body_buffered(self) -> None:
        """The body a policy needs is complete: hand it to the chain, then run the chain."""
        assert self.chain is not None
        if self.bytes_in > self.front.http.body_buffer_limit:
            self.fail(errors.PAYLOAD_TOO_LARGE)
            return
        pending = self.pending or []
        body = pending[0] if len(pending) == 1 else b"".join(pending)
        self.pending = [body] if body else None
        self.chain.ctx.body = body
        self._run_chain()

    def _policies_done(self, outcome: LocalResponse | None) -> None:
        """A policy that did I/O has finished: answer locally or go on to the upstream."""
        if self.state != POLICIES:
            return  # the client went away meanwhile
        if outcome is not None:
            self.front.gate.release(HELD)
            self.respond_locally(outcome)
            return
        self._connect()

    def respond_locally(self, response: LocalResponse, response_phase: bool = True) -> None:
        """Answer with a policy's response. As for an upstream response, the policies that ran
        get their response phase (in reverse) and their extra headers are added."""
        chain = self.chain
        extra = None
        if chain is not None:
            ctx = chain.ctx
            if response_phase:
                ctx.begin_response(response.status, list(response.headers))
                failed = chain.respond_sync()
                if failed is not None:
                    response = failed
                else:
                    assert ctx.response_headers is not None
                    response = LocalResponse(
                        ctx.response_status,
                        tuple(ctx.response_headers),
                        response.body,
                        response.cause,
                    )
            extra = ctx.response_extra
        self.response_status = response.status
        self.state = DONE
        self._end_timers()
        self.front.gate.release(HELD_OR_BACKPRESSURE)
        if self.error_cause is None:
            if response.cause is not None:
                self.error_cause = response.cause
            elif response.status >= 400:
                self.error_cause = "policy_rejected"
        if response.status >= 300 and self.head.grpc:
            response, extra = grpc_answer(response, extra, self.head.grpc), None
        self.front.answer(self, response, extra)

    def _connect(self) -> None:
        """Ask the upstream pool for a connection."""
        front = self.front
        head = self.head
        self.state = CONNECTING  # (as _connecting(), without the call on the per-request path)
        chain = self.chain
        if chain is not None and chain.ctx.body_replaced:
            body = chain.ctx.body
            self.pending = [body] if body else None  # a policy's replacement body goes instead
        self.upstream_started = front.clock.seconds()
        self._stop_timer()
        if not self.request_complete:
            # While the body streams, the stream idle timeout applies. A complete request needs
            # no timer yet: connecting is bounded by the connect timeout, and the response
            # timeout starts when the request has been sent.
            self.last_activity = self.upstream_started
            self._watch(self._stream_idle_timeout())
        assert self.destination is not None
        upstream = self.destination.upstream
        balancing = upstream.balancing
        key = None
        if balancing is not None and balancing.hash_on is not None:
            key = self._hash_key(balancing.hash_on)
        pool = self.pool = front.pools.pick(upstream, key)
        if pool is None:
            self.fail(errors.NO_HEALTHY_UPSTREAM)
            return
        if head.body != BODY_NONE and not self.request_complete:
            front.gate.hold(HELD)  # until the upstream can take the body
        pool.acquire(self)

    def _hash_key(self, hash_on: object) -> str | None:
        """The key a ringHash/maglev Service hashes for this request: the client's address,
        or the value of the Service's `hashOn` expression (None when it has none)."""
        if hash_on == "clientAddress":
            return self.front.peer.address
        chain = self.chain
        if chain is None:
            peer = self.front.peer
            ctx = PolicyContext(self.head, peer.address, peer.scheme, self.api_key)
        else:
            ctx = chain.ctx
        try:
            value = hash_on.evaluate(ctx.expression_context())  # type: ignore[attr-defined]
        except EvaluationError:
            return None
        return None if value is None else to_text(value)

    def _connecting(self) -> None:
        """Waiting for a connection to the upstream (or a tunnel's destination) from now."""
        self.state = CONNECTING
        self.upstream_started = self.front.clock.seconds()

    def request_body(self, data: bytes) -> None:
        """A piece of the request body (already de-chunked by the parser)."""
        self.bytes_in += len(data)
        if self.grpc_web is not None and self.grpc_web.text:
            try:
                data = self.grpc_web.request_data(data)
            except ValueError:
                self._upstream_failed(errors.bad_request("The grpc-web-text body is not base64"))
                return
        if self.state == SENDING or self.state == RESPONDING:
            # After the response head the upstream may still be reading the body (an early
            # answer, or full-duplex streaming): keep forwarding it.
            self.last_activity = self.front.clock.seconds()
            self._send_body(data)
        elif self.state in _BEFORE_UPSTREAM:
            if self.pending is None:
                self.pending = [data]
            else:
                self.pending.append(data)
            if self.state == BUFFERING:
                self.last_activity = self.front.clock.seconds()
                if self.bytes_in > self.front.http.body_buffer_limit:
                    self.fail(errors.PAYLOAD_TOO_LARGE)

    def request_done(self) -> None:
        """The whole request has been received."""
        self.request_complete = True
        if self.state == SENDING or self.state == RESPONDING:
            self._finish_request()
        elif self.state == BUFFERING:
            self._body_buffered()

    def _send_body(self, data: bytes) -> None:
        self.body_sent = True
        conn = self.conn
        if self.head.body == BODY_CHUNKED and not conn.http2:  # type: ignore[union-attr]
            data = b"%x\r\n" % len(data) + data + b"\r\n"
        send_now(conn.transport, data)  # type: ignore[union-attr]

    def _finish_request(self, terminated: bool = False) -> None:
        conn = self.conn
        assert conn is not None
        if not terminated:
            if conn.http2:
                conn.end_request()  # type: ignore[attr-defined]
            elif self.head.body == BODY_CHUNKED:
                send_now(conn.transport, b"0\r\n\r\n")
        if self.head.body != BODY_NONE:
            conn.transport.unregisterProducer()
            self.front.gate.release(BACKPRESSURE)
        if self.response_status == 0:
            if self.timer is not None:
                self._stop_timer()  # (the watchdog's deadline is replaced below)
            chain = self.chain
            timeout = self.front.timeouts.upstream_response
            if chain is not None and chain.ctx.response_timeout is not None:
                timeout = chain.ctx.response_timeout
            retry = self.destination.upstream.retry  # type: ignore[union-attr]
            if retry is not None and retry.per_try_timeout is not None:
                timeout = min(timeout, retry.per_try_timeout)
            self._watch(timeout)

    # -- the pool's callbacks --------------------------------------------------------------------

    def upstream_ready(self, conn: UpstreamConnection, reused: bool) -> None:
        """Connected (or reusing a pooled connection): send the head and what body we have."""
        if self.state != CONNECTING:
            # The client went away while we were connecting: give the connection back.
            conn.sink = None
            self.pool.release(conn)  # type: ignore[union-attr]
            return
        self.conn = conn
        self.reused = reused
        self.state = SENDING
        head = self.head
        conn.begin(self.grpc_web or self, head.method == b"HEAD")
        transport = conn.transport
        trace = self.trace
        traceparent = None
        if trace is not None:
            traceparent = trace.upstream_attempt(
                self.upstream_started, self.front.clock.seconds(), self.pool.upstream, reused,  # type: ignore[union-attr]
            )
        pending = self.pending
        if pending:
            if (
                self.request_complete
                and self.destination.upstream.retry is not None  # type: ignore[union-attr]
                and self.bytes_in <= self.destination.upstream.retry.body_limit  # type: ignore[union-attr]
            ):
                self.retry_body = pending[0] if len(pending) == 1 else b"".join(pending)
            self.pending = None
            self.body_sent = True
        if conn.http2:
            # An HTTP/2 stream takes the request as fields and body bytes, not as HTTP/1.1.
            send_request(self, conn, traceparent, pending)
        else:
            # The head, the body received so far and (if complete) the chunked terminator go
            # out in one send.
            out = [self._upstream_head(traceparent)]
            if pending:
                chunked = head.body == BODY_CHUNKED
                for data in pending:
                    if chunked:
                        out.append(b"%x\r\n" % len(data))
                        out.append(data)
                        out.append(b"\r\n")
                    else:
                        out.append(data)
            if self.request_complete and head.body == BODY_CHUNKED:
                out.append(b"0\r\n\r\n")
            send_now(transport, out[0] if len(out) == 1 else b"".join(out))
        if head.body != BODY_NONE and not self.request_complete:
            transport.registerProducer(self.front.gate, True)
        gate = self.front.gate
        if gate.reasons:
            gate.release(HELD)
        if self.request_complete:
            self._finish_request(terminated=True)

    def upstream_connect_failed(self, reason: Failure) -> None:
        """The upstream could not be reached (its name not resolved: `dns_failed`)."""
        if self.state == CONNECTING:
            if reason.check(UpstreamTLSError):
                self.fail(errors.UPSTREAM_TLS)
            elif reason.check(DNSLookupError):
                self.dns_failed(reason)
            else:
                self._try_failed(CONNECT_FAILURE)
                if not self._retry(CONNECT_FAILURE):
                    self.fail(errors.UPSTREAM_CONNECT_FAILURE)

    def dns_failed(self, reason: Failure) -> None:
        """The upstream's name (or its Configuration.spec.forwardProxy's) did not resolve: 502
        `dns_failure`, logged (rate-limited) with the name and the resolver's error; the same
        cause on the reverse-proxy path and the forward proxy."""
        destination = self.destination
        assert destination is not None
        upstream = destination.upstream
        name = upstream.proxy.host if upstream.proxy is not None else upstream.host
        self.front.pools.dns_failed(name, upstream.key, reason)
        self.fail(errors.DNS_FAILURE)

    # How this kind of exchange builds its upstream head (_upstream_head), step by step:
    #: the X-Forwarded-* step: relay a trusted client's claims and add the gateway's lines
    #: (True), or carry none at all (False: an egress proxy tells outside APIs nothing about its
    #: clients' internal addresses and names).
    relay_forwarded = True
    #: the hop-by-hop step: lines added after the framing (an upgrade's Connection/Upgrade).
    hop_lines = b""

    def _upstream_head(self, traceparent: bytes | None = None) -> bytes:
        """The request head as the upstream receives it: the request line, the client's header
        lines less hop-by-hop ones (and X-Forwarded-* claims unless relayed), Host, the
        X-Forwarded-* lines (when relayed), the framing, this kind's hop-by-hop lines; when the
        request is traced, the `traceparent` line of its upstream attempt replaces the client's."""
        head = self.head
        front = self.front
        destination = self.destination
        assert destination is not None
        drop = connection_tokens(head.connection_values) if head.connection_values else None
        peer = front.peer
        relay = self.relay_forwarded
        trusted = relay and peer.trusted  # claims kept only from a trusted proxy, and relayed
        rewrite_host = front.http.rewrite_host
        prior_xff = None
        has_xfh = has_xfp = False
        # The line end carries Proxy-Authorization for a forward proxy (precomputed).
        lines = [head.method, b" ", self.upstream_target, destination.upstream.request_line_end]
        append = lines.append
        extend = lines.extend
        host_line_done = False
        chain = self.chain
        headers = head.headers
        if chain is not None and chain.ctx.changed_headers is not None:
            headers = chain.ctx.changed_headers
            drop = None  # already removed before the policies ran (see _select_policies)
        if traceparent is not None:
            drop = _TRACEPARENT if drop is None else drop | _TRACEPARENT
        for name, value in headers:
            lname = name.lower()
            if lname in _NOT_COPIED:
                if lname == b"host":
                    if host_line_done:
                        continue
                    host_line_done = True
                    if rewrite_host:
                        value = destination.upstream.host_value
                elif lname != b"forwarded" or not trusted:
                    # Hop-by-hop and framing fields; RFC 7239's form of the X-Forwarded-* claims
                    # only from a trusted proxy. (Neither Host nor Forwarded is ever in `drop`.)
                    continue
            elif drop is not None and lname in drop:
                continue
            elif lname[:12] == b"x-forwarded-":
                if not trusted or lname == b"x-forwarded-client-cert":
                    continue  # XFCC comes only from the gateway (the verified client certificate)
                if lname == b"x-forwarded-for":
                    prior_xff = value if prior_xff is None else prior_xff + b", " + value
                    continue
                if lname == b"x-forwarded-host":
                    has_xfh = True
                elif lname == b"x-forwarded-proto":
                    has_xfp = True
            extend((name, b": ", value, b"\r\n"))
        if not host_line_done:
            authority = (
                destination.upstream.authority if rewrite_host else (head.authority or "")
            )
            append(b"Host: " + authority.encode("latin-1") + b"\r\n")
        if relay:
            client = peer.address_bytes
            extend((
                b"X-Forwarded-For: ",
                client if prior_xff is None else prior_xff + b", " + client,
                b"\r\n",
            ))
            if not has_xfp:
                append(peer.proto_line)  # with the XFCC line on mTLS connections
            elif peer.xfcc_line:
                append(peer.xfcc_line)
            if not has_xfh and head.authority:
                append(b"X-Forwarded-Host: " + head.authority.encode("latin-1") + b"\r\n")
        if head.body == BODY_LENGTH:
            length = head.content_length
            if chain is not None and chain.ctx.body_replaced:
                length = len(chain.ctx.body or b"")
            append(b"Content-Length: %d\r\n" % length)
        elif head.body == BODY_CHUNKED:
            append(b"Transfer-Encoding: chunked\r\n")
        hop_lines = self.hop_lines
        if hop_lines:
            append(hop_lines)
        if traceparent is not None:
            append(traceparent)
        append(b"\r\n")
        return b"".join(lines)

    # -- the upstream connection's callbacks -----------------------------------------------------

    def response_interim(self, status: int, headers: HeaderList) -> None:
        """A 1xx from upstream: relay 100 Continue (and other 1xx) to HTTP/1.1 clients."""
        if status == 101:
            self.response_malformed("Unexpected 101 Switching Protocols")
            return
        if self.head.version == b"1.1" and self.response_status == 0:
            kept = response_headers_for_downstream(headers, ())
            line = b"HTTP/1.1 %d %s\r\n" % (status, b"Continue" if status == 100 else b"Info")
            send_now(
                self.front.transport,
                line + b"".join(n + b": " + v + b"\r\n" for n, v in kept) + b"\r\n"
            )

    def response_switched(self, rest: bytes) -> None:
        """The upstream switched protocols though this request asked for no upgrade."""
        self.response_malformed("Unexpected protocol upgrade from upstream")

    def response_head(
        self, status: int, reason: bytes, headers: HeaderList, keep_alive: bool
    ) -> None:
        """The final response head: forward it with framing re-decided for the client."""
        accepted = self._accept_response_head(status, headers)
        if accepted is None:
            return
        status, kept, content_length, chunked = accepted
        self._send_head(status, reason, kept, content_length, chunked)

    def _send_head(
        self, status: int, reason: bytes, kept: HeaderList, content_length: bytes | None,
        chunked: bool,
    ) -> None:
        """Queue the response head for the client, with framing re-decided for it."""
        front = self.front
        head = self.head
        close = not head.keep_alive or front.draining or not self.request_complete
        no_body = head.method == b"HEAD" or status in (204, 304)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        append = lines.append
        for name, value in kept:
            append(name + b": " + value + b"\r\n")
        if content_length is not None and not chunked:
            append(b"Content-Length: " + content_length + b"\r\n")
        if not chunked and content_length is None and not no_body:
            self.until_close = True
        if (content_length is not None and not chunked) or no_body:
            pass
        elif head.version == b"1.1":
            self.response_chunked = True
            append(b"Transfer-Encoding: chunked\r\n")
        else:
            close = True  # HTTP/1.0 client, unknown length: delimit by closing
        if close:
            append(b"Connection: close\r\n")
        elif head.version == b"1.0":
            append(b"Connection: keep-alive\r\n")
        append(b"\r\n")
        self.response_close = close
        # Not written yet: the head goes out with the body that came in the same read. The
        # upstream connection becomes the client transport's producer only if the response
        # outlives this read (flush_response): most end in it (_complete).
        self.out = [b"".join(lines)]
        self.unproduced = True

    def _accept_response_head(
        self, status: int, headers: HeaderList
    ) -> tuple[int, HeaderList, bytes | None, bool] | None:
        """What every front does first with the upstream's final response head (HTTP/1.1 and
        HTTP/2 alike): scan its framing, start responding (the stream idle timeout applies from
        now), drop hop-by-hop fields, run the policies' response phase.

        Returns (status, fields to forward, the Content-Length value, chunked), or None when
        the exchange failed instead (a bad Transfer-Encoding, a failing response policy).
        """
        member = self.pool.member  # type: ignore[union-attr]
        if member is not None:
            # A Service of several addresses: the try's outcome (outlier detection), a retry.
            if self.retrying:
                self._end_retry()
            if status >= 500:
                member.cluster.try_failed(member, "5xx")
                if self._retry("", status, headers):
                    return None
            elif member.errors:
                member.errors = 0
        connection_values = []
        content_length = None
        chunked = False
        # The fields to forward (response_headers_for_downstream's, in the same pass): hop-by-hop
        # and framing fields dropped here, Connection-listed ones after it.
        kept: HeaderList = []
        keep = kept.append
        for field in headers:
            lname = field[0].lower()
            if lname not in _NOT_FORWARDED:
                keep(field)
            elif lname == b"content-length":
                content_length = field[1]
            elif lname == b"transfer-encoding":
                if field[1].strip().lower() != b"chunked":
                    # llhttp accepts e.g. `gzip, chunked`; re-chunking would silently drop the
                    # gzip coding and hand the client bytes it cannot decode.
                    self.response_malformed("Transfer-Encoding other than chunked")
                    return None
                chunked = True
            elif lname == b"connection":
                connection_values.append(field[1])
        if connection_values:
            listed = connection_tokens(connection_values)
            if not listed <= HOP_BY_HOP:  # (nearly always just `keep-alive`, dropped already)
                kept = [field for field in kept if field[0].lower() not in listed]
        self.response_status = status
        self.last_activity = now = self.front.clock.seconds()
        self.upstream_elapsed = now - self.upstream_started
        watchdog = self.front.watchdog
        if watchdog.owner is self:
            # From now the stream idle timeout applies. A deadline sooner than it would expire
            # stays: when it passes, _on_timer measures the idle time and sets the next.
            idle = self._stream_idle_timeout()
            if watchdog.due - now > idle:
                watchdog.watch(self, now + idle, self._on_timer)
        self.state = RESPONDING
        chain = self.chain
        if chain is not None and not chain.ran:
            # No policy that ran has a response phase: only headers policies added go on.
            extra = chain.ctx.response_extra
            if extra:
                kept = kept + extra
        elif chain is not None:
            ctx = chain.ctx
            ctx.begin_response(status, kept)
            failed = chain.respond()
            if failed is not None:
                if isinstance(failed, Deferred):
                    self._hold_response(failed, content_length, chunked)
                else:
                    self._upstream_failed_with_response(failed)  # type: ignore[arg-type]
                return None
            status = self.response_status = ctx.response_status
            kept = ctx.response_headers  # type: ignore[assignment]
            self.tap = ctx.response_tap
            if ctx.response_extra:
                kept = kept + ctx.response_extra
        return status, kept, content_length, chunked

    def _tunnelled(self, status: int) -> None:
        """The exchange became a byte tunnel (answered `status`): no exchange timer any more
        (the tunnel has its own idle timeout)."""
        self._end_timers()
        self.response_status = status
        self.state = TUNNEL

    def response_body(self, data: bytes) -> None:
        """A piece of the response body: queue it (chunk-framed if needed) for this read's send
        (flush_response marks the stream active, once per read)."""
        self.bytes_out += len(data)
        if self.tap is not None:
            self.tap.feed(data)
        out = self.out
        if out is None:
            out = self.out = []
        if self.response_chunked:
            out.append(b"%x\r\n" % len(data))
            out.append(data)
            out.append(b"\r\n")
        else:
            out.append(data)

    def response_trailers(self, trailers: HeaderList) -> None:
        """Trailer fields of the upstream response: sent in the last chunk to a chunked client
        (a length-delimited or HTTP/1.0 response has no place for them: dropped)."""
        if self.tap is not None:
            self.tap.abandon()  # a response with trailers is not kept whole (never cached)
        if not self.response_chunked:
            return
        lines = [b"0\r\n"]
        for name, value in trailers:
            if name.lower() not in NOT_TRAILERS:
                lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        if self.out is None:
            self.out = []
        self.out.append(b"".join(lines))
        self.response_chunked = False  # the last chunk is written

    def flush_response(self) -> None:
        """Send what this upstream read produced for the client, in one send. While the
        response goes on (the upstream connection is still this exchange's), the connection's
        reading is first registered as the client transport's producer: backpressure from
        here on."""
        if self.conn is not None:
            # The response goes on: the stream idle timeout counts from this read.
            self.last_activity = self.front.clock.seconds()
            if self.unproduced:
                self.unproduced = False
                self.front.transport.registerProducer(self.conn.gate, True)
        out = self.out
        if out:
            self.out = None
            self.flushed = True
            send_now(self.front.transport, out[0] if len(out) == 1 else b"".join(out))

    def response_complete(self) -> None:
        """The response is complete: release the upstream and let the front go on."""
        conn = self.conn
        self.conn = None
        self._complete(conn)

    def _complete(self, conn: UpstreamConnection | None) -> None:
        front = self.front
        if self.response_chunked:
            if self.out is None:
                self.out = []
            self.out.append(b"0\r\n\r\n")
        self.flush_response()  # (`conn` is no longer the exchange's: nothing is registered)
        if not self.unproduced:
            front.transport.unregisterProducer()
        self.state = DONE
        self._end_timers()
        if conn is not None:
            if not self.request_complete:
                # The upstream answered before reading the whole request: never reuse either side.
                conn.reusable = False
                if self.head.body != BODY_NONE:
                    conn.transport.unregisterProducer()
                    front.gate.release(BACKPRESSURE)
            conn.finish()
        front.finish(self, self.response_close)

    def response_malformed(self, message: str) -> None:
        """The upstream sent something that is not a valid HTTP/1.1 response."""
        self._upstream_failed(errors.UPSTREAM_BAD_RESPONSE)

    def upstream_lost(self, got_response_bytes: bool) -> None:
        """The upstream connection closed before the response completed."""
        conn = self.conn
        self.conn = None
        if self.state == RESPONDING and self.until_close and conn is not None:
            # A close-delimited body ends with the connection; anything else is a truncation.
            self.pool.detach(conn)  # type: ignore[union-attr]
            self._complete(None)
            return
        if (
            self.state == SENDING
            and self.reused
            and not got_response_bytes
            and not self.retried
            and not self.body_sent
            and self.head.body == BODY_NONE
            and self.head.method in _IDEMPOTENT
        ):
            # A pooled connection the upstream had already closed: retry once on a fresh one.
            self.retried = True
            self.state = CONNECTING
            if conn is not None:
                self.pool.detach(conn)  # type: ignore[union-attr]
            self.pool.acquire(self, fresh=True)  # type: ignore[union-attr]
            return
        if conn is not None:
            self.pool.detach(conn)  # type: ignore[union-attr]
        if self.state == SENDING:
            self._try_failed(RESET)
            if not got_response_bytes and self._retry(RESET):
                return
        self._upstream_failed(errors.UPSTREAM_RESET, conn_gone=True)

    def _upstream_failed_with_response(self, response: LocalResponse) -> None:
        """A response-phase policy failed: drop the upstream connection, answer its 500."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            self.pool.discard(conn)  # type: ignore[union-attr]
        self.respond_locally(response, response_phase=False)

    # -- an asynchronous response phase (policies with `response_async`) ------------------------

    def _hold_response(
        self, waiting: Deferred[LocalResponse | None], content_length: bytes | None,
        chunked: bool,
    ) -> None:
        """A response-phase policy waits for I/O: hold the response head, and keep what the
        upstream sends meanwhile in a ResponseHold (the connection's sink until then); the
        upstream's reading is paused."""
        conn = self.conn
        assert conn is not None
        self.state = HOLDING
        hold = self.hold = ResponseHold(self, conn, content_length, chunked)
        conn.sink = hold
        conn.gate.pauseProducing()  # type: ignore[union-attr]
        waiting.addCallback(self._response_policies_done)

    def _response_policies_done(self, outcome: LocalResponse | None) -> None:
        """The asynchronous response phase is over (or a body hook answered): answer the
        policy's response, read the whole body for a hook that asked, or send the response."""
        hold = self.hold
        if self.state != HOLDING or hold is None:
            return  # the exchange ended meanwhile (client gone, timeout)
        chain = self.chain
        assert chain is not None
        chain.waiting = None
        if outcome is not None:
            self.hold = None
            hold.conn.sink = None
            self._upstream_failed_with_response(outcome)
            return
        ctx = chain.ctx
        hooks = ctx.response_body_hooks
        if hooks:
            if not hold.complete:
                hold.wanted = True  # read on: body_complete() comes back here
                hold.conn.gate.resumeProducing()
                return
            hook = hooks.pop(0)
            try:
                result = hook(hold.pieces, hold.trailers)
            except Exception:  # noqa: BLE001 (any policy failure is a 500, never a crash)
                from flexgw.policies.chain import policy_error

                result = policy_error("response body hook", Failure())
            if isinstance(result, Deferred):
                chain.waiting = result  # cancelled if the exchange ends meanwhile
                result.addErrback(self._hook_failed).addCallback(self._response_policies_done)
            else:
                self._response_policies_done(result)
            return
        self._release_response(hold, ctx)

    def _hook_failed(self, failure: Failure) -> LocalResponse | None:
        """A body hook's Deferred failed: a 500 (nothing when it was cancelled)."""
        if self.chain is None or self.chain.cancelled:
            return None
        from flexgw.policies.chain import policy_error

        return policy_error("response body hook", failure)

    def _release_response(self, hold: ResponseHold, ctx: PolicyContext) -> None:
        """Send the held response as the policies left it (a replaced body re-framed), then
        what the upstream sent meanwhile; the upstream is read on."""
        conn = hold.conn
        self.hold = None
        conn.sink = hold.sink
        self.state = RESPONDING
        status = self.response_status = ctx.response_status
        kept: HeaderList = ctx.response_headers  # type: ignore[assignment]
        self.tap = ctx.response_tap
        if ctx.response_extra:
            kept = kept + ctx.response_extra
        content_length, chunked = hold.content_length, hold.chunked
        pieces = hold.pieces
        if ctx.response_body_replaced:
            body = ctx.response_body or b""
            pieces = [body] if body else []
            content_length, chunked = b"%d" % len(body), False
            kept = [(n, v) for n, v in kept if n.lower() != b"transfer-encoding"]
        self._send_head(status, errors.REASONS.get(status, b"Status"), kept, content_length, chunked)
        sink = hold.sink  # this exchange, or its gRPC-Web translation
        for piece in pieces:
            sink.response_body(piece)
        if hold.trailers is not None:
            sink.response_trailers(hold.trailers)
        if hold.complete:
            sink.response_complete()
            return
        self.flush_response()
        conn.gate.resumeProducing()

    def _hold_failed(self, error: GatewayError, conn_gone: bool) -> None:
        """The upstream failed while its response was held: the client gets a clean error."""
        if self.hold is None:
            return
        self.hold = None
        self.state = SENDING  # nothing of the response went out
        if self.chain is not None:
            self.chain.cancel()  # (its callbacks find the hold gone)
        if conn_gone:
            self.conn = None
        self._upstream_failed(error, conn_gone)

    def _drop_hold(self) -> None:
        """The exchange ends while its response is held: cancel the waiting policy; the
        upstream connection is the caller's to discard."""
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.conn.sink = None
            if self.chain is not None:
                self.chain.cancel()

    # -- failure and timing ----------------------------------------------------------------------

    def _upstream_failed(self, error: GatewayError, conn_gone: bool = False) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None and not conn_gone:
            if self.state == SENDING and self.head.body != BODY_NONE and not self.request_complete:
                conn.transport.unregisterProducer()
            self.pool.discard(conn)  # type: ignore[union-attr]
        if self.state == RESPONDING and not self.flushed:
            # The head was produced but never sent: the client can still get a clean error.
            self.out = None
            self.front.transport.unregisterProducer()
            self.state = SENDING
            self.response_status = 0
        if self.state == RESPONDING:
            # The head is already on the wire: all we can do is cut the client off.
            self.out = None
            self.error_cause = error.cause
            self.state = DONE
            self._end_timers()
            self.front.transport.unregisterProducer()
            self.front.cut_off(self)
            return
        self.fail(error)

    def fail(self, error: GatewayError) -> None:
        """Answer the client with a gateway error (the connection closes unless safe to keep)."""
        if self.state == DONE:
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            if self.head.body != BODY_NONE and not self.request_complete:
                conn.transport.unregisterProducer()
            self.pool.discard(conn)  # type: ignore[union-attr]
        if self.state == CONNECTING and self.pool is not None:
            self.pool.cancel(self)  # nothing waits for the connection any more
        elif self.state == HOLDING:
            self._drop_hold()
        if self.retrying:
            self._end_retry()
        self.state = DONE
        self._end_timers()
        self.error_cause = error.cause
        self.response_status = error.status
        self.front.gate.release(HELD_OR_BACKPRESSURE)
        if self.head.grpc:
            self.front.answer(self, grpc_answer(error, None, self.head.grpc), None)
            return
        self.front.answer(self, error, None)

    # -- retries (flexgw.upstream.retry) and outlier detection (flexgw.upstream.outlier) ------------

    def _try_failed(self, kind: str) -> None:
        """This try failed (connect failure, reset, timeout): tell its address's cluster."""
        if self.retrying:
            self._end_retry()
        pool = self.pool
        member = pool.member if pool is not None else None  # type: ignore[attr-defined]
        if member is not None:
            member.cluster.try_failed(member, kind)

    def _end_retry(self) -> None:
        """The retry this try was has ended: it leaves its Service's retry budget."""
        self.retrying = False
        member = self.pool.member if self.pool is not None else None  # type: ignore[attr-defined]
        cluster = member.cluster if member is not None else None
        if cluster is not None and cluster.budget is not None:
            cluster.budget.done()

    def _retry(self, kind: str, status: int = 0, headers: HeaderList | None = None) -> bool:
        """Try again (True), on another address when there is one, after a backoff: when the
        Service has a retry policy that covers this failure, nothing of the response went to
        the client, the request can be sent again (idempotent; a body only when kept whole; a
        non-idempotent request only when it never reached the upstream) and the retry budget
        allows it."""
        destination = self.destination
        if destination is None or self.flushed:
            return False
        upstream = destination.upstream
        policy = upstream.retry
        if policy is None or self.attempts > policy.retries or not self.request_complete:
            return False
        if status:
            if status not in policy.statuses:
                return False
        elif kind not in policy.on:
            return False
        head = self.head
        if head.method not in IDEMPOTENT and kind != CONNECT_FAILURE:
            return False
        if head.body != BODY_NONE and self.retry_body is None and self.body_sent:
            return False
        delay = policy.delay(self.attempts)
        if headers is not None:
            wait = policy.retry_after(headers)
            if wait is None:
                return False
            delay = max(delay, wait)
        pool = self.pool
        member = pool.member if pool is not None else None  # type: ignore[attr-defined]
        cluster = member.cluster if member is not None else None
        if cluster is not None and cluster.budget is not None:
            if not cluster.budget.admit(cluster.requests_in_flight()):
                return False
            self.retrying = True
        balancing = upstream.balancing
        key = None
        if balancing is not None and balancing.hash_on is not None:
            key = self._hash_key(balancing.hash_on)
        next_pool = self.front.pools.pick(upstream, key, pool)
        if next_pool is None:
            if self.retrying:
                self._end_retry()
            return False
        conn = self.conn
        self.conn = None
        if conn is not None:
            self.pool.discard(conn)  # type: ignore[union-attr]
        self._stop_timer()
        self.attempts += 1
        self.state = CONNECTING
        self.response_status = 0
        self.body_sent = False
        self.pool = next_pool
        next_member = next_pool.member
        if next_member is not None:
            next_member.retries += 1
        self.timer = self.front.clock.callLater(delay, self._send_retry)
        return True

    def _send_retry(self) -> None:
        """The backoff is over: ask for a connection for the next try."""
        self.timer = None
        if self.state != CONNECTING:
            return
        if self.retry_body:
            self.pending = [self.retry_body]
        self.upstream_started = self.front.clock.seconds()
        self.pool.acquire(self)  # type: ignore[union-attr]

    def _watch(self, delay: float) -> None:
        """The response or stream idle deadline: `delay` seconds from now (the front's watchdog,
        at the wheel's granularity), replacing the one set before."""
        front = self.front
        front.watchdog.watch(self, front.clock.seconds() + delay, self._on_timer)

    def _on_timer(self) -> None:
        """The response or stream idle deadline passed (the front's watchdog)."""
        front = self.front
        if (
            self.state in (CONNECTING, SENDING)
            and self.response_status == 0
            and self.request_complete
        ):
            if self.state == SENDING:
                self._try_failed(TIMEOUT)
                if self._retry(TIMEOUT):
                    return
            self.fail(errors.UPSTREAM_TIMEOUT)
            return
        now = front.clock.seconds()
        idle = now - self.last_activity
        limit = self._stream_idle_timeout()
        if idle < limit:
            front.watchdog.watch(self, now + limit - idle, self._on_timer)
            return
        if self.state == RESPONDING:
            self._upstream_failed(errors.STREAM_IDLE_TIMEOUT)
        else:
            self.fail(errors.STREAM_IDLE_TIMEOUT)

    def _tunnel_ended(self, tunnel: Tunnel) -> None:
        """For exchanges that became a byte tunnel (an upgrade, a CONNECT): either side closed,
        or the tunnel idled out; the access log line, with the tunnel's byte counts."""
        self.state = DONE
        self.bytes_in = tunnel.bytes_up
        self.bytes_out = tunnel.bytes_down
        if tunnel.ended_by == IDLE_TIMEOUT:
            self.error_cause = IDLE_TIMEOUT
        self.front.tunnel_closed(self)

    def _stream_idle_timeout(self) -> float:
        """The stream idle timeout for this request (a policy may override the gateway's)."""
        chain = self.chain
        if chain is not None and chain.ctx.stream_idle_timeout is not None:
            return chain.ctx.stream_idle_timeout
        return self.front.timeouts.stream_idle

    def _stop_timer(self) -> None:
        """Stop the response/stream idle deadline and a retry's backoff timer. A gRPC
        request's `grpc-timeout` deadline keeps running: it bounds the whole call, across
        connecting, retries and the response (see `_end_timers`)."""
        watchdog = self.front.watchdog
        if watchdog.owner is self:
            watchdog.stop(self)
        timer = self.timer
        if timer is not None:
            self.timer = None
            if timer.active():
                timer.cancel()

    def _end_timers(self) -> None:
        """The exchange is over (answered, failed, tunnelled or abandoned): stop every timer,
        the gRPC deadline included."""
        self._stop_timer()
        if self.deadline is not None:
            deadline, self.deadline = self.deadline, None
            if deadline.active():
                deadline.cancel()

    def _deadline_passed(self) -> None:
        """A gRPC request's `grpc-timeout` passed (Envoy's max_grpc_timeout: the smaller of it
        and the gateway's own timeouts applies): DEADLINE_EXCEEDED before the response head,
        the stream cut off after it; the upstream stream is reset either way."""
        self.deadline = None
        if self.state == DONE or self.state == TUNNEL:
            return
        if self.state == POLICIES and self.chain is not None:
            self.chain.cancel()
        if self.state == RESPONDING:
            self._upstream_failed(errors.UPSTREAM_TIMEOUT)
        else:
            self.fail(errors.UPSTREAM_TIMEOUT)

    def downstream_lost(self) -> None:
        """The client went away: abandon the upstream side."""
        if self.state == DONE:
            return
        state = self.state
        self.state = DONE
        if state == CONNECTING and self.pool is not None:
            # Not connected yet: no upstream connection is opened (or kept) for it.
            self.pool.cancel(self)
        elif state == POLICIES and self.chain is not None:
            self.chain.cancel()  # free what a waiting policy holds (queue slot, timer)
        elif state == HOLDING:
            self._drop_hold()
        if self.retrying:
            self._end_retry()
        self._end_timers()
        self.error_cause = self.error_cause or "downstream_reset"
        conn = self.conn
        if conn is not None:
            self.conn = None
            self.pool.discard(conn)  # type: ignore[union-attr]


class ResponseHold:
    """An upstream connection's sink while a response-phase policy does I/O: keeps the body
    pieces, trailers and end the upstream sends meanwhile (bounded by the gateway's body buffer
    limit: over it, a 500 as Envoy's buffer limit on a response), and reports failures."""

    __slots__ = (
        "chunked", "complete", "conn", "content_length", "exchange", "pieces", "sink", "size",
        "trailers", "wanted",
    )

    def __init__(
        self, exchange: ProxyExchange, conn: UpstreamConnection, content_length: bytes | None,
        chunked: bool,
    ) -> None:
        self.exchange = exchange
        self.conn = conn
        self.sink = conn.sink  # given back when the response is released
        self.content_length = content_length
        self.chunked = chunked
        self.pieces: list[bytes] = []
        self.size = 0
        self.trailers: HeaderList | None = None
        self.complete = False
        self.wanted = False  # a policy asked for the whole body: read on until complete

    def response_body(self, data: bytes) -> None:
        """A piece of the body, kept."""
        self.pieces.append(data)
        self.size += len(data)
        exchange = self.exchange
        if self.size > exchange.front.http.body_buffer_limit:
            exchange._hold_failed(RESPONSE_TOO_LARGE, False)

    def response_trailers(self, trailers: HeaderList) -> None:
        """The response's trailer fields, kept."""
        self.trailers = trailers

    def flush_response(self) -> None:
        """Nothing goes to the client yet."""

    def response_complete(self) -> None:
        """The whole response is here: a policy that asked for the body gets it."""
        self.complete = True
        if self.wanted:
            self.conn.gate.pauseProducing()
            self.exchange._response_policies_done(None)

    def response_interim(self, status: int, headers: HeaderList) -> None:
        """No 1xx comes after a final head."""

    def response_switched(self, rest: bytes) -> None:
        """Cannot happen after a final head."""
        self.response_malformed("protocol switch")

    def response_head(self, *args: object) -> None:
        """Cannot happen: the head is held."""
        self.response_malformed("a second response head")

    def response_malformed(self, message: str) -> None:
        """A broken body: the client gets 502 (nothing of the response went out)."""
        self.exchange._hold_failed(errors.UPSTREAM_BAD_RESPONSE, False)

    def upstream_lost(self, got_response_bytes: bool, *args: object) -> None:
        """The upstream went away before the end: 502."""
        self.exchange.pool.detach(self.conn)  # type: ignore[union-attr]
        self.exchange._hold_failed(errors.UPSTREAM_RESET, True)


#: A response body over the buffer limit of a policy that reads it whole (Envoy: 500).
RESPONSE_TOO_LARGE = GatewayError(
    500, "response_too_large", "The response body is larger than the gateway buffers for a policy"
)
