"""The upstream request of an exchange as HTTP/2 fields (flexgw.ingress.h2request) is the
request its HTTP/1.1 head (ProxyExchange._upstream_head) gives, read back as HTTP/2 fields."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httptools
from hpack import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http.errors import GatewayError
from flexgw.http.request import analyze_head
from flexgw.ingress.exchange import ProxyExchange
from flexgw.ingress.h2request import send_request, upstream_fields
from flexgw.ingress.peer import Peer
from flexgw.plan import HttpSettings, Upstream
from flexgw.policies.base import PolicyContext
from flexgw.policies.chain import ChainRun

_NAMES = [
    b"Accept", b"x-custom", b"X-Forwarded-For", b"x-forwarded-for",
    b"X-Forwarded-Proto", b"x-forwarded-host", b"X-Forwarded-Client-Cert", b"X-Forwarded-Port",
    b"Forwarded", b"Connection", b"Keep-Alive", b"TE", b"te", b"Upgrade", b"HTTP2-Settings",
    b"Authorization", b"Proxy-Authorization", b"Cookie", b"traceparent", b"tracestate",
    b"Trailer", b"Proxy-Connection",
]
#: The body's framing: none, a length (zero or not), chunked.
_FRAMING = st.sampled_from(
    [[], [(b"Content-Length", b"0")], [(b"Content-Length", b"8")], [(b"Transfer-Encoding", b"chunked")]]
)
_VALUES = st.sampled_from(
    [b"a", b"trailers", b"x-custom", b"close", b"keep-alive", b"Accept, x-custom", b"10.0.0.1",
     b"https", b"a=b", b"session=0123456789abcdef0123", b"gzip, trailers", b"upgrade"]
)
_PEERS = [
    Peer.of(SimpleNamespace(getPeer=lambda: SimpleNamespace(host="192.0.2.1")), "http"),
    Peer.of(SimpleNamespace(getPeer=lambda: SimpleNamespace(host="192.0.2.1")), "https", ()),
]
_TRACEPARENT = b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"


def _old_fields(h1: bytes, scheme: bytes, te_trailers: bool) -> tuple[list, bool]:
    """The HTTP/2 request the HTTP/2 upstream stream made of an HTTP/1.1 head before
    flexgw.ingress.h2request (httptools, then its on_headers_complete), as the reference."""
    parsed: dict[str, Any] = {"headers": [], "url": b""}

    class Reader:
        def on_url(self, url: bytes) -> None:
            parsed["url"] += url

        def on_header(self, name: bytes, value: bytes) -> None:
            parsed["headers"].append((name, value))

    parser = httptools.HttpRequestParser(Reader())
    parser.feed_data(h1)
    drop = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
            b"transfer-encoding", b"upgrade", b"host", b"content-length", b"http2-settings"}
    authority = b""
    fields = []
    has_body = False
    for name, value in parsed["headers"]:
        lname = name.lower()
        if lname == b"host":
            authority = value
        elif lname == b"content-length":
            has_body = value != b"0"
            fields.append((lname, value))
        elif lname == b"transfer-encoding":
            has_body = True
        elif lname in (b"authorization", b"proxy-authorization") or (
            lname == b"cookie" and len(value) < 20
        ):
            fields.append(NeverIndexedHeaderTuple(lname, value))
        elif lname not in drop:
            fields.append((lname, value))
    if te_trailers:
        fields.append((b"te", b"trailers"))
    head = [
        (b":method", parser.get_method()), (b":scheme", scheme), (b":authority", authority),
        (b":path", parsed["url"]), *fields,
    ]
    return head, has_body


def _exchange(
    headers: list, trusted: bool, mtls: bool, rewrite_host: bool, egress: bool,
    policy_headers: list | None, replaced: bytes | None,
) -> ProxyExchange:
    """An exchange routed to an HTTP/2 upstream, with the request head `headers` make."""
    head = analyze_head(b"POST", b"/items?q=1", "1.1", headers, True)
    assert not isinstance(head, GatewayError)
    peer = Peer.of(SimpleNamespace(getPeer=lambda: SimpleNamespace(host="192.0.2.1")), "https")
    if trusted:
        peer = Peer(
            address=peer.address, address_bytes=peer.address_bytes, trusted=True,
            scheme=peer.scheme, proto_line=peer.proto_line, proto=peer.proto,
        )
    if mtls:
        peer = peer.with_client_cert(b"Hash=abc;Subject=\"CN=client\"")
    front = SimpleNamespace(peer=peer, http=HttpSettings(rewrite_host=rewrite_host))
    exchange = (_Egress if egress else ProxyExchange)(front, head, 0.0)  # type: ignore[arg-type]
    upstream = Upstream(key="up", scheme="h2c", host="backend.internal", port=8443)
    exchange.destination = SimpleNamespace(upstream=upstream)  # type: ignore[assignment]
    exchange.upstream_target = head.target
    if policy_headers is not None or replaced is not None:
        ctx = PolicyContext(head, peer.address, peer.scheme, "api")
        if policy_headers is not None:
            ctx.request_headers[:] = policy_headers
        if replaced is not None:
            ctx.body = replaced
            ctx.body_replaced = True
        exchange.chain = ChainRun((), ctx)
    return exchange


class _Egress(ProxyExchange):
    """An exchange that relays no X-Forwarded-* (as the forward proxy's)."""

    __slots__ = ()
    relay_forwarded = False


_HEADERS = st.lists(st.tuples(st.sampled_from(_NAMES), _VALUES), max_size=12)
#: The client's one Host line, and where it goes among the others.
_HOST = st.tuples(
    st.sampled_from([(b"Host", b"gw.example"), (b"host", b"gw.example:8080")]), st.integers(0, 12)
)
#: Headers a policy leaves (it may add Host lines, several even).
_POLICY_HEADERS = st.lists(
    st.tuples(st.sampled_from([*_NAMES, b"Host", b"host"]), _VALUES), max_size=12
)


class EquivalenceTests(SynchronousTestCase):
    """The fields are what the HTTP/1.1 head read back gives, whatever the head holds."""

    @settings(max_examples=400, deadline=None)
    @given(
        headers=_HEADERS,
        host=_HOST,
        framing=_FRAMING,
        trusted=st.booleans(),
        mtls=st.booleans(),
        rewrite_host=st.booleans(),
        egress=st.booleans(),
        traced=st.booleans(),
        policy_headers=st.none() | _POLICY_HEADERS,
        replaced=st.none() | st.sampled_from([b"", b"new body"]),
    )
    def test_same_request_as_the_http1_head(
        self, headers: list, host: tuple, framing: list, trusted: bool, mtls: bool, rewrite_host: bool, egress: bool,
        traced: bool, policy_headers: list | None, replaced: bytes | None,
    ) -> None:
        """Forwarded fields, Host, hop-by-hop, framing, traceparent, te and never-indexed
        credentials come out the same both ways."""
        line, at = host
        headers = [*headers[:at], line, *headers[at:], *framing]
        exchange = _exchange(headers, trusted, mtls, rewrite_host, egress, policy_headers, replaced)
        traceparent = _TRACEPARENT if traced else None
        te = any(n.lower() == b"te" and b"trailers" in v.lower() for n, v in exchange.head.headers)
        expected, expected_body = _old_fields(exchange._upstream_head(traceparent), b"http", te)
        authority, fields, has_body = upstream_fields(exchange, traceparent)
        got = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", authority),
               (b":path", exchange.upstream_target), *fields]
        self.assertEqual(got, expected)
        self.assertEqual(
            [type(f) is NeverIndexedHeaderTuple for f in got],
            [type(f) is NeverIndexedHeaderTuple for f in expected],
        )
        self.assertEqual(has_body, expected_body)


class _Stream:
    """Records what send_request hands an HTTP/2 upstream stream."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def send_head(self, *args: Any) -> None:
        self.calls.append(("head", args[0], args[1], args[2], args[4]))

    def write(self, data: bytes) -> None:
        self.calls.append(("data", data))

    def end_request(self, trailers: Any = None) -> None:
        self.calls.append(("end", trailers))


class SendTests(SynchronousTestCase):
    """send_request gives the stream its head, the body so far and the end, no HTTP/1.1."""

    def test_no_body_ends_with_the_head(self) -> None:
        """A request without a body is one HEADERS with END_STREAM."""
        exchange = _exchange([(b"Host", b"gw")], False, False, True, False, None, None)
        exchange.request_complete = True
        stream = _Stream()
        send_request(exchange, stream, None, None)
        self.assertEqual(stream.calls, [("head", b"POST", b"backend.internal:8443", b"/items?q=1", True)])

    def test_body_received_so_far_then_end(self) -> None:
        """The pieces received before the stream go as one write; the end follows when the
        request is complete."""
        exchange = _exchange(
            [(b"Host", b"gw"), (b"Content-Length", b"6")], False, False, False, False, None, None
        )
        exchange.request_complete = True
        stream = _Stream()
        send_request(exchange, stream, None, [b"abc", b"def"])
        self.assertEqual(
            stream.calls,
            [("head", b"POST", b"gw", b"/items?q=1", False), ("data", b"abcdef"), ("end", None)],
        )

    def test_incomplete_body_left_open(self) -> None:
        """A chunked request still arriving leaves the stream open for the rest."""
        exchange = _exchange(
            [(b"Host", b"gw"), (b"Transfer-Encoding", b"chunked")], False, False, True, False,
            None, None,
        )
        stream = _Stream()
        send_request(exchange, stream, None, [b"abc"])
        self.assertEqual(
            stream.calls,
            [("head", b"POST", b"backend.internal:8443", b"/items?q=1", False), ("data", b"abc")],
        )
