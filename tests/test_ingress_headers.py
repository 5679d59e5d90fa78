"""Header handling and message framing end to end over loopback: what each side receives."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import client, h2
from flexgw.testing.client import Response
from flexgw.testing.upstream import (
    Exchange,
    RecordedRequest,
    RecordingUpstream,
    Responder,
    continue_then,
    echo,
    fixed,
    function,
    raw,
)
from tests.harness import Gateway, free_port, gateway_with_upstream
from tests.test_ingress_strict import http_config

#: Headers the gateway adds to every forwarded request.
ADDED = {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"content-length"}


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers of a forwarded request, minus those the gateway sets itself."""
    return [(n, v) for n, v in headers if n.lower() not in ADDED]


def path_responder() -> Responder:
    """Answers each request with its own target as the body."""

    def respond(ex: Exchange) -> None:
        ex.respond(200, [(b"Content-Length", b"%d" % len(ex.request.target))], ex.request.target)

    return function(respond)


class HeaderTestCase(TestCase):
    """Helpers to run one request through a fresh gateway."""

    timeout = 15

    async def through(
        self,
        raw_request: bytes,
        responder: Responder | None = None,
        config: str = "",
        head: bool = False,
    ) -> tuple[Response, RecordedRequest, Gateway, RecordingUpstream]:
        """Send one request; return the client's response and what the upstream received."""
        gateway, upstream, port = await gateway_with_upstream(
            self, responder or fixed(), config=config
        )
        response = await client.request(reactor, "127.0.0.1", port, raw_request, head=head)
        self.assertEqual(len(upstream.received), 1)
        return response, upstream.received[0], gateway, upstream


class PreservationTests(HeaderTestCase):
    """Header names keep their case, order and duplicates, both ways."""

    async def test_request_headers_case_order_duplicates(self) -> None:
        """The upstream receives the client's headers exactly, in order, duplicates apart."""
        sent = [
            (b"X-Mixed-Case", b"1"),
            (b"x-lower", b"2"),
            (b"X-Dup", b"a"),
            (b"ACCEPT", b"text/plain"),
            (b"X-Dup", b"b"),
            (b"Cookie", b"a=1"),
            (b"Cookie", b"b=2"),
            (b"X-Spaces", b"inner  value"),
            (b"X-Obs-Text", b"caf\xe9"),
        ]
        head = b"GET / HTTP/1.1\r\nHost: a.test\r\n" + b"".join(
            n + b": " + v + b"\r\n" for n, v in sent
        )
        _, seen, _, _ = await self.through(head + b"\r\n")
        self.assertEqual(end_to_end(seen.headers), sent)

    async def test_response_headers_case_order_duplicates(self) -> None:
        """The client receives the upstream's headers exactly, in order, duplicates apart."""
        sent = [
            (b"X-Resp-B", b"1"),
            (b"x-resp-a", b"2"),
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"SET-COOKIE", b"b=2"),
            (b"X-Dup", b"one"),
            (b"Vary", b"Accept"),
            (b"X-Dup", b"two"),
        ]
        response, _, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", fixed(headers=sent, body=b"hi")
        )
        kept = [(n, v) for n, v in response.headers if n.lower() not in (b"content-length",)]
        self.assertEqual(kept, sent)
        self.assertEqual(response.body, b"hi")


class HopByHopTests(HeaderTestCase):
    """Connection-scoped headers are removed in both directions; protected ones survive."""

    REQUEST_HOP = (
        b"Connection: keep-alive, X-Custom-Hop\r\n"
        b"X-Custom-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: something/1\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        b"Proxy-Authenticate: Basic\r\n"
    )

    async def test_request_hop_by_hop_removed(self) -> None:
        """Connection, the headers it lists, Keep-Alive, TE, Trailer, Upgrade, Proxy-* never go upstream."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Before: 1\r\n"
            + self.REQUEST_HOP
            + b"X-After: 2\r\n\r\n"
        )
        self.assertEqual(end_to_end(seen.headers), [(b"X-Before", b"1"), (b"X-After", b"2")])

    async def test_connection_tokens_are_case_insensitive(self) -> None:
        """`Connection: x-CUSTOM-hop` removes `X-Custom-Hop`, across several Connection headers."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: x-CUSTOM-hop\r\nX-Custom-Hop: 1\r\n"
            b"Connection: ,, X-Other ,\r\nX-Other: 2\r\nX-Kept: 3\r\n\r\n"
        )
        self.assertEqual(end_to_end(seen.headers), [(b"X-Kept", b"3")])

    async def test_response_hop_by_hop_removed(self) -> None:
        """The client never sees the upstream's connection-scoped headers."""
        response, _, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            fixed(
                headers=[
                    (b"X-Before", b"1"),
                    (b"Connection", b"X-Resp-Hop"),
                    (b"X-Resp-Hop", b"internal"),
                    (b"Keep-Alive", b"timeout=5"),
                    (b"Trailer", b"X-Checksum"),
                    (b"Upgrade", b"h2c"),
                    (b"Proxy-Connection", b"keep-alive"),
                    (b"Proxy-Authenticate", b"Basic"),
                    (b"Proxy-Authorization", b"Basic eA=="),
                    (b"TE", b"trailers"),
                    (b"X-After", b"2"),
                ],
                body=b"ok",
            ),
        )
        names = [n.lower() for n, _ in response.headers]
        for hop in (
            b"connection",
            b"x-resp-hop",
            b"keep-alive",
            b"trailer",
            b"upgrade",
            b"proxy-connection",
            b"proxy-authenticate",
            b"proxy-authorization",
            b"te",
        ):
            self.assertNotIn(hop, names)
        self.assertEqual(
            [(n, v) for n, v in response.headers if n.startswith(b"X-")],
            [(b"X-Before", b"1"), (b"X-After", b"2")],
        )
        self.assertEqual(response.body, b"ok")

    async def test_connection_cannot_strip_protected_headers(self) -> None:
        """`Connection: X-Forwarded-For, Host, Content-Length, ...` strips none of them."""
        body = b"payload"
        response, seen, _, upstream = await self.through(
            b"POST / HTTP/1.1\r\nHost: a.test\r\n"
            b"Connection: X-Forwarded-For, Host, X-Forwarded-Proto, X-Forwarded-Host, "
            b"Content-Length, Transfer-Encoding\r\nContent-Length: 7\r\n\r\n" + body,
            echo(),
        )
        self.assertEqual(response.body, body)
        self.assertEqual(seen.header("host"), [f"127.0.0.1:{upstream.address[1]}".encode()])
        self.assertEqual(seen.header("x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header("x-forwarded-proto"), [b"http"])
        self.assertEqual(seen.header("x-forwarded-host"), [b"a.test"])
        self.assertEqual(seen.header("content-length"), [b"7"])
        self.assertEqual(seen.body, body)
        self.assertEqual(seen.header("connection"), [])

    async def test_connection_cannot_strip_host_with_host_kept(self) -> None:
        """With the client's Host kept, `Connection: Host` still leaves exactly one Host."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Host\r\n\r\n",
            config=http_config(rewriteHostHeader="false"),
        )
        self.assertEqual(seen.header("host"), [b"a.test"])

    async def test_connection_cannot_strip_policy_injected_headers(self) -> None:
        """A header a policy injects reaches the upstream even if the client lists it in Connection."""
        binding = (
            "apiVersion: gateway.mulesoft.com/v1alpha1\n"
            "kind: PolicyBinding\n"
            "metadata: {name: inject}\n"
            "spec:\n"
            "  targetRef: {kind: ApiInstance, name: test-api}\n"
            "  policyRef: {name: header-injection-flex}\n"
            "  config:\n"
            "    inboundHeaders:\n"
            "      - {key: X-Verified-By, value: gateway}\n"
        )
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: X-Verified-By\r\n"
            b"X-Verified-By: client\r\n\r\n",
            config=binding,
        )
        # The client's own X-Verified-By is connection-scoped and goes; the injected one stays.
        self.assertEqual(seen.header("x-verified-by"), [b"gateway"])

    async def test_upgrade_without_body_keeps_its_upgrade(self) -> None:
        """A body-less Upgrade request goes upstream with `Connection: Upgrade` and its Upgrade
        (and no other Connection token); a non-101 answer is an ordinary response."""
        response, seen, _, _ = await self.through(
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade, X-Private\r\nX-Private: 1\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(seen.target, b"/ws")
        self.assertEqual(seen.header("upgrade"), [b"websocket"])
        self.assertEqual(seen.header("connection"), [b"Upgrade"])
        self.assertEqual(seen.header("x-private"), [])
        self.assertEqual(seen.header("sec-websocket-version"), [b"13"])


class ForwardingTests(HeaderTestCase):
    """Host rewriting and the X-Forwarded-* policy."""

    async def test_host_rewritten_by_default(self) -> None:
        """The upstream's Host is its own authority; the client's Host goes in X-Forwarded-Host."""
        _, seen, _, upstream = await self.through(b"GET / HTTP/1.1\r\nhost: a.test:8080\r\n\r\n")
        self.assertEqual(seen.header("host"), [f"127.0.0.1:{upstream.address[1]}".encode()])
        self.assertEqual(seen.header("x-forwarded-host"), [b"a.test:8080"])
        # The Host line keeps its place and the client's spelling of the name.
        self.assertEqual(seen.headers[0][0], b"host")

    async def test_host_kept_when_rewrite_disabled(self) -> None:
        """With `rewriteHostHeader: false` the upstream receives the client's Host."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test:8080\r\n\r\n",
            config=http_config(rewriteHostHeader="false"),
        )
        self.assertEqual(seen.header("host"), [b"a.test:8080"])

    async def test_host_for_http10_without_host_when_kept(self) -> None:
        """An HTTP/1.0 request without Host, Host not rewritten: the upstream still gets a Host."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.0\r\n\r\n", config=http_config(rewriteHostHeader="false")
        )
        self.assertEqual(len(seen.header("host")), 1)

    async def test_forwarded_headers_set(self) -> None:
        """X-Forwarded-For is the client address, X-Forwarded-Proto the scheme, -Host the Host."""
        _, seen, _, _ = await self.through(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertEqual(seen.header("x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header("x-forwarded-proto"), [b"http"])
        self.assertEqual(seen.header("x-forwarded-host"), [b"a.test"])

    async def test_untrusted_forwarded_headers_replaced(self) -> None:
        """A peer not in trustedProxies cannot inject X-Forwarded-* values."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"x-forwarded-proto: https\r\nX-Forwarded-Host: evil.test\r\n"
            b"X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\n\r\n"
        )
        self.assertEqual(seen.header("x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header("x-forwarded-proto"), [b"http"])
        self.assertEqual(seen.header("x-forwarded-host"), [b"a.test"])
        self.assertEqual(seen.header("x-forwarded-port"), [])
        self.assertEqual(seen.header("x-forwarded-prefix"), [])

    async def test_trusted_forwarded_headers_kept_and_appended(self) -> None:
        """From a trusted proxy, X-Forwarded-For is appended to and -Proto/-Host are kept."""
        config = http_config(trustedProxies="[127.0.0.1/32]")
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 203.0.113.7\r\n"
            b"X-Forwarded-For: 198.51.100.1, 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: public.test\r\nX-Forwarded-Port: 443\r\n\r\n",
            config=config,
        )
        self.assertEqual(
            seen.header("x-forwarded-for"), [b"203.0.113.7, 198.51.100.1, 10.0.0.1, 127.0.0.1"]
        )
        self.assertEqual(seen.header("x-forwarded-proto"), [b"https"])
        self.assertEqual(seen.header("x-forwarded-host"), [b"public.test"])
        self.assertEqual(seen.header("x-forwarded-port"), [b"443"])

    async def test_trusted_network_not_matching_is_untrusted(self) -> None:
        """A trustedProxies list that does not contain the peer does not trust it."""
        config = http_config(trustedProxies="[10.0.0.0/8]")
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n", config=config
        )
        self.assertEqual(seen.header("x-forwarded-for"), [b"127.0.0.1"])


class RequestFramingTests(HeaderTestCase):
    """Request bodies are re-framed for the upstream, never forwarded with the client's framing."""

    async def test_chunked_in_chunked_out(self) -> None:
        """A chunked request reaches the upstream chunked, with the same body (extensions dropped)."""
        response, seen, _, _ = await self.through(
            b"POST / HTTP/1.1\r\nHost: a.test\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n",
            echo(),
        )
        self.assertEqual(response.body, b"hello world")
        self.assertTrue(seen.chunked)
        self.assertEqual(seen.body, b"hello world")
        self.assertEqual(seen.header("transfer-encoding"), [b"chunked"])
        self.assertEqual(seen.header("content-length"), [])
        self.assertNotIn(b"ext=1", seen.raw or b"")

    async def test_chunked_trailers_are_not_forwarded(self) -> None:
        """Trailer fields of a chunked request do not reach the upstream (as headers or trailers)."""
        _, seen, _, _ = await self.through(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
            echo(),
        )
        self.assertEqual(seen.body, b"abc")
        self.assertNotIn(b"X-Trailer", seen.raw or b"")

    async def test_content_length_preserved(self) -> None:
        """A Content-Length request reaches the upstream with the same length and body."""
        body = bytes(range(256)) * 4
        _, seen, _, _ = await self.through(
            b"PUT /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1024\r\n\r\n" + body, echo()
        )
        self.assertEqual(seen.header("content-length"), [b"1024"])
        self.assertFalse(seen.chunked)
        self.assertEqual(seen.body, body)

    async def test_content_length_zero(self) -> None:
        """`Content-Length: 0` is forwarded as such."""
        _, seen, _, _ = await self.through(
            b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(seen.header("content-length"), [b"0"])
        self.assertEqual(seen.body, b"")

    async def test_bodyless_request_has_no_framing(self) -> None:
        """A GET without a body gets neither Content-Length nor Transfer-Encoding upstream."""
        _, seen, _, _ = await self.through(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertEqual(seen.header("content-length"), [])
        self.assertEqual(seen.header("transfer-encoding"), [])

    async def test_http10_request_goes_upstream_as_http11(self) -> None:
        """An HTTP/1.0 request is forwarded as HTTP/1.1 with its body length."""
        _, seen, _, _ = await self.through(
            b"POST /old HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", echo()
        )
        self.assertEqual(seen.version, "1.1")
        self.assertEqual(seen.body, b"abc")


class ResponseFramingTests(HeaderTestCase):
    """Response framing is decided for the client; HEAD, 204 and 304 carry no body."""

    async def test_chunked_response_rechunked(self) -> None:
        """A chunked upstream response reaches an HTTP/1.1 client chunked, same body."""
        response, _, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", fixed(body=b"chunked body", chunked=True)
        )
        self.assertTrue(response.chunked)
        self.assertEqual(response.header("transfer-encoding"), [b"chunked"])
        self.assertEqual(response.header("content-length"), [])
        self.assertEqual(response.body, b"chunked body")

    async def test_chunked_response_to_http10_is_close_delimited(self) -> None:
        """A chunked upstream response reaches an HTTP/1.0 client unchunked, ended by the close."""
        response, _, _, _ = await self.through(
            b"GET / HTTP/1.0\r\n\r\n", fixed(body=b"chunked body", chunked=True)
        )
        self.assertFalse(response.chunked)
        self.assertEqual(response.header("transfer-encoding"), [])
        self.assertTrue(response.close_delimited)
        self.assertEqual(response.body, b"chunked body")

    async def test_content_length_kept(self) -> None:
        """A Content-Length response keeps its length and is not chunked."""
        response, _, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", fixed(body=b"twelve bytes")
        )
        self.assertEqual(response.header("content-length"), [b"12"])
        self.assertFalse(response.chunked)
        self.assertEqual(response.body, b"twelve bytes")

    async def test_close_delimited_to_http11_is_chunked(self) -> None:
        """An upstream body ended by its close reaches an HTTP/1.1 client chunked, kept alive."""
        response, _, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close=True),
        )
        self.assertTrue(response.chunked)
        self.assertEqual(response.body, b"until the end")
        self.assertTrue(response.keep_alive)

    async def test_close_delimited_to_http10_is_close_delimited(self) -> None:
        """An upstream body ended by its close reaches an HTTP/1.0 client the same way."""
        response, _, _, _ = await self.through(
            b"GET / HTTP/1.0\r\n\r\n",
            raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close=True),
        )
        self.assertFalse(response.chunked)
        self.assertTrue(response.close_delimited)
        self.assertEqual(response.header("connection"), [b"close"])
        self.assertEqual(response.body, b"until the end")

    async def test_http10_keep_alive_with_unknown_length_closes(self) -> None:
        """HTTP/1.0 keep-alive cannot survive a body of unknown length: it is delimited by the close."""
        _gateway, _upstream, port = await gateway_with_upstream(
            self, fixed(body=b"chunked upstream", chunked=True)
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = await conn.read_response()
        await conn.wait_closed()
        self.assertEqual(response.header("connection"), [b"close"])
        self.assertTrue(response.close_delimited)
        self.assertEqual(response.body, b"chunked upstream")

    async def test_304_with_content_length(self) -> None:
        """A 304 carrying Content-Length keeps it, sends no body, and the connection goes on."""
        _gateway, upstream, port = await gateway_with_upstream(
            self, fixed(status=304, headers=[(b"Content-Length", b"100")], body=b"")
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /a HTTP/1.1\r\nHost: a.test\r\n\r\nGET /b HTTP/1.1\r\nHost: a.test\r\n\r\n")
        first = await conn.read_response()
        second = await conn.read_response()
        self.assertEqual(
            (first.status, first.header("content-length"), first.body), (304, [b"100"], b"")
        )
        self.assertEqual(second.status, 304)
        self.assertEqual(len(upstream.received), 2)

    async def test_head_keeps_content_length_without_body(self) -> None:
        """HEAD: the upstream's Content-Length reaches the client, no body bytes follow."""
        _gateway, upstream, port = await gateway_with_upstream(self, fixed(body=b"0123456789"))
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"HEAD /h HTTP/1.1\r\nHost: a.test\r\n\r\n")
        head = await conn.read_response(head=True)
        conn.send(b"GET /g HTTP/1.1\r\nHost: a.test\r\n\r\n")
        get = await conn.read_response()
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("content-length"), [b"10"])
        self.assertEqual(head.body, b"")
        # Had any body bytes followed the HEAD response, this response would be garbled.
        self.assertEqual(get.body, b"0123456789")
        self.assertEqual(upstream.received[0].method, b"HEAD")

    async def test_gateway_error_to_head_has_no_body(self) -> None:
        """A gateway-made 404 answering HEAD has no body, so the next response is read intact."""
        _, upstream, port = await gateway_with_upstream(
            self, fixed(body=b"fine"), rules="- path: /ok"
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"HEAD /missing HTTP/1.1\r\nHost: a.test\r\n\r\n")
        head = await conn.read_response(head=True)
        conn.send(b"GET /ok HTTP/1.1\r\nHost: a.test\r\n\r\n")
        get = await conn.read_response()
        self.assertEqual(head.status, 404)
        self.assertEqual(head.header("x-flexgw-error"), [b"no_route"])
        self.assertNotEqual(head.header("content-length"), [b"0"])
        self.assertEqual((get.status, get.body), (200, b"fine"))
        self.assertTrue(conn.received_raw.split(b"\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 200 "))
        self.assertEqual(len(upstream.received), 1)

    async def test_head_with_chunked_upstream(self) -> None:
        """HEAD answered with `Transfer-Encoding: chunked` and no body: no body and no chunk to the client."""
        _gateway, _upstream, port = await gateway_with_upstream(
            self, fixed(body=b"x", chunked=True)
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"HEAD /h HTTP/1.1\r\nHost: a.test\r\n\r\n")
        head = await conn.read_response(head=True)
        conn.send(b"GET /g HTTP/1.1\r\nHost: a.test\r\n\r\n")
        get = await conn.read_response()
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertEqual((get.status, get.body), (200, b"x"))

    async def test_204_and_304_have_no_body(self) -> None:
        """204 and 304 reach the client without a body or chunked framing; the connection goes on."""
        for status in (204, 304):
            _gateway, _upstream, port = await gateway_with_upstream(
                self, fixed(status=status, headers=[(b"ETag", b'"v1"')], body=b"")
            )
            conn = await client.connect(reactor, "127.0.0.1", port)
            self.addCleanup(conn.abort)
            conn.send(
                b"GET /a HTTP/1.1\r\nHost: a.test\r\n\r\nGET /b HTTP/1.1\r\nHost: a.test\r\n\r\n"
            )
            first = await conn.read_response()
            second = await conn.read_response()
            for response in (first, second):
                self.assertEqual(response.status, status)
                self.assertEqual(response.header("transfer-encoding"), [])
                self.assertEqual(response.header("etag"), [b'"v1"'])
                self.assertEqual(response.body, b"")
            self.assertIn(conn.received_raw.count(b"HTTP/1.1 %d" % status), (2,))
            self.assertNotIn(b"0\r\n\r\n", conn.received_raw)

    async def test_100_continue_relayed(self) -> None:
        """An upstream 100 Continue reaches the client before it sends the body; then the final response."""
        _gateway, upstream, port = await gateway_with_upstream(self, continue_then(echo()))
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(
            b"POST /up HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        interim = await conn.read_response()
        self.assertEqual(interim.status, 100)
        self.assertEqual(upstream.received[0].header("expect"), [b"100-continue"])
        self.assertEqual(upstream.received[0].body_length, 0)
        conn.send(b"hello")
        final = await conn.read_response()
        self.assertEqual((final.status, final.body), (200, b"hello"))

    async def test_100_continue_not_sent_to_http10(self) -> None:
        """An HTTP/1.0 client never receives a 1xx response."""
        response, _, _, _ = await self.through(
            b"POST /up HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello",
            continue_then(echo(), always=True),
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.interim, [])
        self.assertEqual(response.body, b"hello")


class ConnectionReuseTests(HeaderTestCase):
    """Keep-alive and pipelining downstream."""

    async def start(self, responder: Responder | None = None, config: str = "") -> tuple[Any, ...]:
        """A gateway before an upstream answering each request with its target."""
        return await gateway_with_upstream(self, responder or path_responder(), config=config)

    async def test_keep_alive_serves_several_requests(self) -> None:
        """One HTTP/1.1 connection carries several requests in turn."""
        _, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        for n in range(5):
            conn.send(b"GET /r%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % n)
            response = await conn.read_response()
            self.assertEqual((response.status, response.body), (200, b"/r%d" % n))
            self.assertTrue(response.keep_alive)
        self.assertFalse(conn.closed)
        self.assertEqual(len(upstream.received), 5)

    async def test_http10_keep_alive(self) -> None:
        """`Connection: keep-alive` from an HTTP/1.0 client keeps the connection, said so in the response."""
        _, _upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        for n in range(3):
            conn.send(b"GET /k%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % n)
            response = await conn.read_response()
            self.assertEqual((response.status, response.body), (200, b"/k%d" % n))
            self.assertEqual(response.header("connection"), [b"keep-alive"])
        self.assertFalse(conn.closed)

    async def test_http10_keep_alive_after_gateway_error(self) -> None:
        """A gateway 404 to an HTTP/1.0 keep-alive request says keep-alive and keeps the connection."""
        _, upstream, port = await gateway_with_upstream(
            self, path_responder(), rules="- path: /ok(/.*)?"
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /missing HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        missing = await conn.read_response()
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.header("connection"), [b"keep-alive"])
        conn.send(b"GET /ok/1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        found = await conn.read_response()
        self.assertEqual((found.status, found.body), (200, b"/1"))
        self.assertFalse(conn.closed)
        self.assertEqual(len(upstream.received), 1)

    async def test_http10_without_keep_alive_closes(self) -> None:
        """A plain HTTP/1.0 request is answered with `Connection: close` and the connection closes."""
        _, _upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(b"GET /once HTTP/1.0\r\n\r\n")
        response = await conn.read_response()
        await conn.wait_closed()
        self.assertEqual(response.header("connection"), [b"close"])
        self.assertEqual(response.body, b"/once")

    async def test_connection_close_request(self) -> None:
        """`Connection: close` from the client: the response says close and the gateway closes."""
        _, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(b"GET /bye HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        response = await conn.read_response()
        await conn.wait_closed()
        self.assertEqual(response.header("connection"), [b"close"])
        self.assertEqual(upstream.received[0].header("connection"), [])

    async def test_nothing_after_a_closing_response(self) -> None:
        """Requests pipelined after `Connection: close` are not run, and nothing follows the response."""
        _, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(
            b"GET /last HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
            b"GET /never HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        response = await conn.read_response()
        await conn.wait_closed()
        self.assertEqual((response.status, response.body), (200, b"/last"))
        self.assertTrue(conn.received_raw.endswith(b"\r\n\r\n/last"))
        self.assertEqual([r.target for r in upstream.received], [b"/last"])

    async def test_pipelined_requests_answered_in_order(self) -> None:
        """Requests sent back to back without waiting are answered in their order."""
        _, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(
            b"GET /p0 HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"POST /p1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /p2 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n"
            b"HEAD /p3 HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"GET /p4 HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        bodies = []
        for n in range(5):
            response = await conn.read_response(head=(n == 3))
            bodies.append(response.body)
        self.assertEqual(bodies, [b"/p0", b"/p1", b"/p2", b"", b"/p4"])
        self.assertEqual(
            [r.target for r in upstream.received], [b"/p0", b"/p1", b"/p2", b"/p3", b"/p4"]
        )
        self.assertEqual(upstream.received[1].body, b"abc")
        self.assertEqual(upstream.received[2].body, b"z")

    async def test_pipelined_error_keeps_order(self) -> None:
        """A gateway-made 404 in a pipeline is answered in its place, and later requests still run."""
        _, upstream, port = await gateway_with_upstream(
            self, path_responder(), rules="- path: /ok(/.*)?"
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(
            b"GET /ok/1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"GET /missing HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"GET /ok/3 HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        statuses = []
        for _ in range(3):
            statuses.append((await conn.read_response()).status)
        self.assertEqual(statuses, [200, 404, 200])
        self.assertEqual([r.target for r in upstream.received], [b"/1", b"/3"])


class ForwardedAndDualStackTests(HeaderTestCase):
    """RFC 7239 `Forwarded` follows the X-Forwarded-* trust rule; IPv4 peers on `[::]` are IPv4."""

    async def test_untrusted_forwarded_header_dropped(self) -> None:
        """A client that is not a trusted proxy cannot pass `Forwarded: for=...` claims on."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nForwarded: for=6.6.6.6;proto=https\r\n\r\n"
        )
        self.assertEqual(seen.header("forwarded"), [])

    async def test_trusted_forwarded_header_kept(self) -> None:
        """From a trusted proxy, `Forwarded` passes unchanged."""
        _, seen, _, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nForwarded: for=203.0.113.7\r\n\r\n",
            config=http_config(trustedProxies="[127.0.0.1/32]"),
        )
        self.assertEqual(seen.header("forwarded"), [b"for=203.0.113.7"])

    async def test_ipv4_client_on_dual_stack_listener(self) -> None:
        """On a `[::]` listener an IPv4 client is seen as 127.0.0.1: X-Forwarded-For, the access
        log and the IPv4 trustedProxies entry all use the IPv4 form."""
        upstream = RecordingUpstream(fixed(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        text = (
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
            "metadata: {name: dual}\n"
            f"spec:\n  address: http://[::]:{port}\n"
            f"  services:\n    b:\n      address: http://127.0.0.1:{upstream.address[1]}\n---\n"
        ) + http_config(trustedProxies="[127.0.0.1/32]")
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(
            upstream.received[0].header("x-forwarded-for"), [b"203.0.113.7, 127.0.0.1"]
        )
        self.assertEqual(gateway.records()[-1]["client"], "127.0.0.1")


class ResponseTransferCodingTests(HeaderTestCase):
    """Upstream responses with a transfer coding other than chunked are refused, not mangled."""

    async def test_gzip_chunked_response_is_a_502(self) -> None:
        """`Transfer-Encoding: gzip, chunked` would lose its gzip coding when re-chunked: 502."""
        raw_response = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        response, _, gateway, _ = await self.through(
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", responder=raw(raw_response, close=False)
        )
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_bad_response"])
        self.assertEqual(gateway.records()[-1]["error"], "upstream_bad_response")


class UnderscoreHeaderTests(HeaderTestCase):
    """Header names with `_` (read as `-` by CGI/WSGI-style upstreams): Envoy's
    headersWithUnderscoresAction, and the risky ones dropped whatever it says."""

    def request(self, *headers: tuple[bytes, bytes]) -> bytes:
        """A POST with a 3-byte Content-Length body and the given extra headers."""
        lines = b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        return b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n" + lines + b"\r\nabc"

    async def test_risky_underscored_headers_dropped_by_default(self) -> None:
        """Under the default (allow), the underscore forms of framing, hop-by-hop, Host and
        X-Forwarded-* headers never reach the upstream; other underscored headers do."""
        sent = [
            (b"Transfer_Encoding", b"chunked"),
            (b"content_LENGTH", b"999"),
            (b"Connection_Extra", b"kept"),
            (b"Keep_Alive", b"timeout=5"),
            (b"Proxy_Connection", b"keep-alive"),
            (b"Upgrade_Insecure_Requests", b"1"),
            (b"UP_GRADE", b"x"),  # not a hop-by-hop name read either way: kept
            (b"Trailer", b"x"),  # no underscore: the hop-by-hop rule drops it
            (b"HOST_", b"x"),  # a trailing `_` reads as no known name: kept
            (b"X_Forwarded_For", b"6.6.6.6"),
            (b"x_forwarded-host", b"evil.test"),
            (b"X-Forwarded_Proto", b"https"),
            (b"X_Real_IP", b"6.6.6.6"),
            (b"proxy_authorization", b"Basic eDp5"),
            (b"X_Custom", b"kept"),
        ]
        response, seen, _gateway, _upstream = await self.through(self.request(*sent))
        self.assertEqual(response.status, 200)
        names = [n for n, _ in seen.headers if b"_" in n]
        self.assertEqual(names, [b"Connection_Extra", b"Upgrade_Insecure_Requests", b"UP_GRADE", b"HOST_", b"X_Custom"])
        self.assertEqual(seen.body, b"abc")
        self.assertEqual(seen.header("content-length"), [b"3"])

    async def test_drop_header_action(self) -> None:
        """dropHeader: no header with `_` reaches the upstream."""
        config = http_config(headersWithUnderscoresAction="dropHeader")
        response, seen, _gateway, _upstream = await self.through(
            self.request((b"X_Custom", b"1"), (b"Transfer_Encoding", b"chunked"), (b"X-Ok", b"2")),
            config=config,
        )
        self.assertEqual(response.status, 200)
        self.assertEqual([n for n, _ in seen.headers if b"_" in n], [])
        self.assertEqual(seen.header("x-ok"), [b"2"])

    async def test_reject_request_action(self) -> None:
        """rejectRequest: a 400, and the upstream sees nothing."""
        _gateway, upstream, port = await gateway_with_upstream(
            self, fixed(), config=http_config(headersWithUnderscoresAction="rejectRequest")
        )
        response = await client.request(
            reactor, "127.0.0.1", port, self.request((b"X_Custom", b"1"))
        )
        self.assertEqual(response.status, 400)
        self.assertEqual(response.header("x-flexgw-error"), [b"bad_request"])
        self.assertEqual(upstream.received, [])
        ok = await client.request(reactor, "127.0.0.1", port, self.request((b"X-Ok", b"1")))
        self.assertEqual(ok.status, 200)
        self.assertEqual(len(upstream.received), 1)

    async def test_h2_risky_underscored_headers_dropped(self) -> None:
        """Over HTTP/2 the same rule applies: transfer_encoding and x_forwarded_for are dropped."""
        _gateway, upstream, port = await gateway_with_upstream(self, fixed())
        conn = await h2.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.transport.abortConnection)
        response = conn.request(
            b"POST",
            b"/u",
            [
                (b"content-length", b"3"),
                (b"transfer_encoding", b"chunked"),
                (b"x_forwarded_for", b"6.6.6.6"),
                (b"x_custom", b"kept"),
            ],
            body=b"abc",
        )
        await response.done
        self.assertEqual(response.status, 200)
        (seen,) = upstream.received
        self.assertEqual([n for n, _ in seen.headers if b"_" in n], [b"x_custom"])
        self.assertEqual(seen.body, b"abc")

    async def test_h2_reject_request_action(self) -> None:
        """Over HTTP/2, rejectRequest answers the stream with a 400; the upstream sees nothing."""
        _gateway, upstream, port = await gateway_with_upstream(
            self, fixed(), config=http_config(headersWithUnderscoresAction="rejectRequest")
        )
        conn = await h2.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.transport.abortConnection)
        response = conn.request(b"GET", b"/u", [(b"x_custom", b"1")])
        await response.done
        self.assertEqual(response.status, 400)
        self.assertEqual(upstream.received, [])
