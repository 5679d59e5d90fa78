"""Unit tests of request-head analysis, the header rules, and IngressProtocol in memory."""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http import errors
from flexgw.http.errors import GatewayError
from flexgw.http.headers import (
    HOP_BY_HOP,
    PROTECTED_FROM_CONNECTION,
    connection_tokens,
    response_headers_for_downstream,
    serialize_headers,
)
from flexgw.http.path import PathRules
from flexgw.http.request import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    UNDERSCORES_ALLOW,
    UNDERSCORES_DROP,
    UNDERSCORES_REJECT,
    RequestHead,
    analyze_head,
    error_for_parser_message,
)
from flexgw.ingress.front import HEAD, IngressFactory, IngressProtocol
from flexgw.plan import (
    Api,
    Destination,
    HttpSettings,
    Listener,
    Route,
    Timeouts,
    Upstream,
)
from flexgw.upstream.manager import PoolManager

HOST = [(b"Host", b"a.test")]
#: Hypothesis settings that keep these tests steady on a loaded machine.
SLOW = [HealthCheck.too_slow]


def analyze(
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: bytes = b"GET",
    version: str = "1.1",
    keep_alive: bool = True,
) -> RequestHead | GatewayError:
    """analyze_head with defaults for a plain GET."""
    return analyze_head(method, target, version, HOST if headers is None else headers, keep_alive)


class AnalyzeHeadTests(SynchronousTestCase):
    """analyze_head accepts well-formed heads and derives routing and framing facts."""

    def ok(self, *args: object, **kwargs: object) -> RequestHead:
        """Analyze and assert the head was accepted."""
        head = analyze(*args, **kwargs)  # type: ignore[arg-type]
        self.assertIsInstance(head, RequestHead)
        assert isinstance(head, RequestHead)
        return head

    def refused(self, *args: object, status: int = 400, **kwargs: object) -> GatewayError:
        """Analyze and assert the head was refused with `status`."""
        error = analyze(*args, **kwargs)  # type: ignore[arg-type]
        self.assertIsInstance(error, GatewayError)
        assert isinstance(error, GatewayError)
        self.assertEqual(error.status, status)
        return error

    def test_origin_form(self) -> None:
        """Path and query are split; the authority is the Host; no body."""
        head = self.ok(b"/a/b%20c?x=1&y", [(b"host", b"A.test:8080"), (b"X", b"y")])
        self.assertEqual(
            (head.path, head.query, head.authority), ("/a/b%20c", b"?x=1&y", "A.test:8080")
        )
        self.assertEqual((head.body, head.content_length), (BODY_NONE, 0))
        self.assertEqual(head.version, b"1.1")
        self.assertEqual(head.headers, [(b"host", b"A.test:8080"), (b"X", b"y")])

    def test_empty_query_kept(self) -> None:
        """A bare `?` is kept as the query so the upstream target is unchanged."""
        head = self.ok(b"/p?")
        self.assertEqual((head.path, head.query), ("/p", b"?"))

    def test_content_length(self) -> None:
        """Content-Length sets a length body."""
        head = self.ok(b"/", [*HOST, (b"Content-Length", b"42")], method=b"POST")
        self.assertEqual((head.body, head.content_length), (BODY_LENGTH, 42))

    def test_chunked(self) -> None:
        """`Transfer-Encoding: chunked`, any case, sets a chunked body."""
        for value in (b"chunked", b"CHUNKED", b"Chunked"):
            head = self.ok(b"/", [*HOST, (b"Transfer-Encoding", value)], method=b"POST")
            self.assertEqual(head.body, BODY_CHUNKED)

    def test_transfer_encodings_refused(self) -> None:
        """Any Transfer-Encoding other than exactly chunked is refused."""
        for value in (
            b"gzip",
            b"gzip, chunked",
            b"chunked, gzip",
            b"identity",
            b"chunked;x=1",
            b"",
        ):
            self.refused(b"/", [*HOST, (b"Transfer-Encoding", value)], method=b"POST")

    def test_transfer_encoding_in_http10_refused(self) -> None:
        """Transfer-Encoding in an HTTP/1.0 request is refused (RFC 9112 §6.1)."""
        self.refused(b"/", [(b"Transfer-Encoding", b"chunked")], method=b"POST", version="1.0")

    def test_versions(self) -> None:
        """Only HTTP/1.0 and HTTP/1.1 are accepted."""
        self.assertEqual(self.ok(version="1.0").version, b"1.0")
        for version in ("0.9", "1.2", "2.0", "3.0"):
            self.refused(version=version)

    def test_connect_is_405(self) -> None:
        """CONNECT is refused with 405 whatever its target."""
        for target in (b"a.test:443", b"/x", b"http://a.test/"):
            error = self.refused(target, method=b"CONNECT", status=405)
            self.assertEqual(error, errors.METHOD_NOT_ALLOWED)

    def test_host_rules(self) -> None:
        """Host: required and single in HTTP/1.1, optional in HTTP/1.0, always well formed."""
        self.refused(b"/", [])
        self.refused(b"/", [(b"Host", b"a"), (b"Host", b"a")])
        self.refused(b"/", [(b"Host", b"a"), (b"host", b"b")], version="1.0")
        self.assertEqual(self.ok(b"/", [], version="1.0").authority, "")

    def test_valid_hosts(self) -> None:
        """Names, IPv4, bracketed IPv6, ports and percent-encoded names are accepted."""
        for host in (
            b"a",
            b"a.test:80",
            b"127.0.0.1",
            b"[::1]",
            b"[::1]:8443",
            b"xn--bcher-kva.test",
            b"a-b_c~d",
            b"a:",
        ):
            self.assertEqual(self.ok(b"/", [(b"Host", host)]).authority, host.decode())

    def test_malformed_hosts(self) -> None:
        """Hosts with spaces, userinfo, paths, bad ports or bad brackets are refused."""
        for host in (
            b"",
            b"a b",
            b"u@a",
            b"a/b",
            b"a:8o",
            b"a:123456",
            b"[::1",
            b"::1",
            b"a?b",
            b"a#b",
            b"[zz::1]",
        ):
            self.refused(b"/", [(b"Host", host)])

    def test_absolute_form(self) -> None:
        """An absolute target's authority is used; its path and query are split out."""
        head = self.ok(b"http://a.test/x/y?q=1", [(b"Host", b"A.TEST")])
        self.assertEqual((head.path, head.query, head.authority), ("/x/y", b"?q=1", "a.test"))
        head = self.ok(b"HTTPS://a.test", HOST)
        self.assertEqual((head.path, head.query), ("/", b""))
        head = self.ok(b"http://a.test?q", HOST)
        self.assertEqual((head.path, head.query), ("/", b"?q"))

    def test_absolute_form_http10_without_host(self) -> None:
        """HTTP/1.0 with an absolute target and no Host uses the target's authority."""
        self.assertEqual(self.ok(b"http://b.test/", [], version="1.0").authority, "b.test")

    def test_absolute_form_refusals(self) -> None:
        """Disagreeing Host, bad schemes, userinfo and fragments-only forms are refused."""
        self.refused(b"http://a.test/", [(b"Host", b"b.test")])
        self.refused(b"http://a.test:8080/", [(b"Host", b"a.test")])
        self.refused(b"ftp://a.test/", HOST)
        self.refused(b"http://u@a.test/", [(b"Host", b"u@a.test")])
        self.refused(b"http:///x", HOST)
        self.refused(b"a.test/x", HOST)

    def test_fragment_refused(self) -> None:
        """A `#` anywhere in the target is refused, origin or absolute form."""
        for target in (b"/a#b", b"/a?x#y", b"/#", b"http://a.test/x#y"):
            self.refused(target)

    def test_dot_segments_normalised(self) -> None:
        """Whole `.`/`..` segments, literal or %2e-encoded, are removed by default (the head's
        path and target both carry the result); a backslash is refused."""
        for target, path in (
            (b"/..", "/"),
            (b"/.", "/"),
            (b"/a/./b", "/a/b"),
            (b"/a/../b", "/b"),
            (b"/a/..", "/"),
            (b"/%2e%2e/x", "/x"),
            (b"/%2E/x", "/x"),
            (b"/.%2e/x", "/x"),
        ):
            head = self.ok(target + b"?q=/../")
            self.assertEqual((head.path, head.target), (path, path.encode() + b"?q=/../"))
        absolute = self.ok(b"http://a.test/x/../y?z")
        self.assertEqual((absolute.path, absolute.target), ("/y", b"http://a.test/y?z"))
        self.refused(b"/a\\b")

    def test_dot_segments_refused_without_normalisation(self) -> None:
        """With normalizePath false, dot segments (literal or encoded) are refused instead."""
        for target in (b"/..", b"/a/./b", b"/a/..", b"/%2e%2e/x", b"/.%2E/x", b"http://a.test/x/../y"):
            error = analyze_head(b"GET", target, "1.1", HOST, True, path_rules=PathRules(False))
            self.assertIsInstance(error, GatewayError, target)

    def test_dots_inside_segments_accepted(self) -> None:
        """Dots inside segments and dot segments in the query are accepted unchanged."""
        for target in (
            b"/.well-known/x",
            b"/v1.2/a..b",
            b"/...",
            b"/..a",
            b"/a.",
            b"/x?y=/../z",
            b"/a%20b",
        ):
            self.assertEqual(self.ok(target).target, target)

    def test_asterisk_form(self) -> None:
        """`OPTIONS *` and a bare `*` on other methods are refused."""
        self.refused(b"*", method=b"OPTIONS")
        self.refused(b"*")

    def test_connection_and_expect(self) -> None:
        """Connection values are kept raw; `Expect: 100-continue` is recognised in any case."""
        head = self.ok(
            b"/",
            [
                *HOST,
                (b"Connection", b"keep-alive, X-A"),
                (b"CONNECTION", b"X-B"),
                (b"Expect", b" 100-Continue "),
            ],
        )
        self.assertEqual(head.connection_values, [b"keep-alive, X-A", b"X-B"])
        self.assertTrue(head.expect_continue)
        self.assertFalse(self.ok(b"/", [*HOST, (b"Expect", b"something")]).expect_continue)

    def test_keep_alive_passed_through(self) -> None:
        """The parser's keep-alive decision is kept."""
        self.assertFalse(self.ok(keep_alive=False).keep_alive)

    def test_error_messages_are_plain(self) -> None:
        """Parser messages become a 400 whose JSON body carries the message, JSON-escaped."""
        error = error_for_parser_message('Invalid "char" <x>')
        self.assertEqual((error.status, error.cause), (400, "bad_request"))
        body = error.render(close=True).split(b"\r\n\r\n", 1)[1]
        self.assertEqual(json.loads(body), {"error": 'Malformed request: Invalid "char" <x>'})

    @settings(deadline=None, suppress_health_check=SLOW)
    @given(
        segments=st.lists(
            st.text("abcXYZ019-._~!$&'()*+,=:@", min_size=1, max_size=8).filter(
                lambda seg: re.fullmatch(r"(?:\.|%2[eE]){1,2}", seg) is None
            ),
            max_size=5,
        ),
        query=st.one_of(st.none(), st.text("abc=&/?%+", max_size=10)),
    )
    def test_origin_form_round_trip(self, segments: list[str], query: str | None) -> None:
        """For any origin-form target with nothing to normalise (no dot segment, escape, `;` or
        `//`), path + query reproduce it exactly."""
        target = ("/" + "/".join(segments)).encode()
        if query is not None:
            target += b"?" + query.encode()
        head = self.ok(target)
        self.assertEqual(head.path.encode("latin-1") + head.query, target)
        self.assertNotIn("?", head.path)

    @settings(max_examples=300, deadline=None, suppress_health_check=SLOW)
    @given(
        method=st.sampled_from([b"GET", b"POST", b"CONNECT", b"OPTIONS", b"X"]),
        target=st.binary(max_size=30),
        version=st.sampled_from(["0.9", "1.0", "1.1", "2.0"]),
        headers=st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        b"Host",
                        b"host",
                        b"Content-Length",
                        b"Transfer-Encoding",
                        b"Connection",
                        b"Expect",
                        b"X-A",
                    ]
                ),
                st.binary(max_size=12),
            ),
            max_size=6,
        ),
    )
    def test_never_raises(
        self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Whatever the parser hands over, analyze_head returns a head or a 4xx, never raises."""
        # llhttp guarantees Content-Length is digits and single; respect that precondition.
        headers = [(n, v) for n, v in headers if n != b"Content-Length"]
        result = analyze_head(method, target, version, headers, True)
        if isinstance(result, GatewayError):
            self.assertIn(result.status, (400, 405))
        else:
            self.assertIn(result.version, (b"1.0", b"1.1"))
            self.assertNotEqual(method, b"CONNECT")
            self.assertEqual(result.path[:1], "/")


class HeaderRuleTests(SynchronousTestCase):
    """connection_tokens, response_headers_for_downstream and serialize_headers."""

    def test_connection_tokens(self) -> None:
        """Tokens are lower-cased and trimmed; empty ones ignored; several values combined."""
        self.assertEqual(
            connection_tokens([b" Keep-Alive ,X-A,, ", b"x-B\t"]),
            frozenset({b"keep-alive", b"x-a", b"x-b"}),
        )

    def test_connection_tokens_cannot_name_protected_headers(self) -> None:
        """Host, Content-Length, X-Forwarded-* and Forwarded are never connection tokens."""
        values = [b", ".join(name.upper() for name in PROTECTED_FROM_CONNECTION)]
        self.assertEqual(connection_tokens(values), frozenset())

    def test_response_headers_for_downstream(self) -> None:
        """Hop-by-hop, listed and framing headers go; the rest keep order, case and duplicates."""
        headers = [
            (b"X-A", b"1"),
            (b"Connection", b"X-Listed, close"),
            (b"X-Listed", b"2"),
            (b"Content-Length", b"10"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Keep-Alive", b"timeout=1"),
            (b"set-cookie", b"a"),
            (b"Set-Cookie", b"b"),
            (b"Proxy-Authenticate", b"Basic"),
        ]
        kept = response_headers_for_downstream(headers, [b"X-Listed, close"])
        self.assertEqual(kept, [(b"X-A", b"1"), (b"set-cookie", b"a"), (b"Set-Cookie", b"b")])

    def test_hop_by_hop_set(self) -> None:
        """The hop-by-hop set names exactly the RFC 9110 §7.6.1 headers plus the proxy ones."""
        self.assertEqual(
            HOP_BY_HOP,
            {
                b"connection",
                b"keep-alive",
                b"proxy-connection",
                b"te",
                b"trailer",
                b"transfer-encoding",
                b"upgrade",
                b"proxy-authorization",
                b"proxy-authenticate",
            },
        )

    def test_serialize(self) -> None:
        """Header lines are written in order, as given."""
        self.assertEqual(serialize_headers([(b"A", b"1"), (b"a", b"2")]), b"A: 1\r\na: 2\r\n")
        self.assertEqual(serialize_headers([]), b"")

    @settings(deadline=None, suppress_health_check=SLOW)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        b"X-A",
                        b"x-b",
                        b"Connection",
                        b"TE",
                        b"Upgrade",
                        b"Content-Length",
                        b"Set-Cookie",
                        b"Keep-Alive",
                        b"X-Listed",
                        b"HOST",
                    ]
                ),
                st.binary(max_size=6),
            ),
            max_size=12,
        ),
        st.lists(st.sampled_from([b"x-listed", b"X-A", b"host", b"close", b""]), max_size=3),
    )
    def test_filter_is_an_order_preserving_subsequence(
        self, headers: list[tuple[bytes, bytes]], listed: list[bytes]
    ) -> None:
        """The kept headers are a subsequence of the input with nothing hop-by-hop or listed."""
        connection_values = [b", ".join(listed)] if listed else []
        kept = response_headers_for_downstream(headers, connection_values)
        extra = connection_tokens(connection_values)
        iterator = iter(headers)
        self.assertTrue(all(pair in iterator for pair in kept))
        for name, _ in kept:
            lname = name.lower()
            self.assertNotIn(lname, HOP_BY_HOP)
            self.assertNotEqual(lname, b"content-length")
            self.assertNotIn(lname, extra)
        dropped = [p for p in headers if p not in kept]
        for name, _ in dropped:
            lname = name.lower()
            self.assertTrue(lname in HOP_BY_HOP or lname == b"content-length" or lname in extra)


class UnderscoreHeaderRuleTests(SynchronousTestCase):
    """analyze_head applies headersWithUnderscoresAction; risky `_` names never survive."""

    def names(self, headers: list[tuple[bytes, bytes]], action: str) -> list[bytes] | int:
        """The header names kept (or the error status) under `action`."""
        head = analyze_head(b"GET", b"/", "1.1", [*HOST, *headers], True, action)
        if isinstance(head, GatewayError):
            return head.status
        return [n for n, _ in head.headers]

    def test_actions(self) -> None:
        """allow keeps the harmless ones, dropHeader drops all, rejectRequest is a 400."""
        sent = [(b"X_A", b"1"), (b"TRANSFER_ENCODING", b"chunked"), (b"X-B", b"2")]
        self.assertEqual(self.names(sent, UNDERSCORES_ALLOW), [b"Host", b"X_A", b"X-B"])
        self.assertEqual(self.names(sent, UNDERSCORES_DROP), [b"Host", b"X-B"])
        self.assertEqual(self.names(sent, UNDERSCORES_REJECT), 400)
        self.assertEqual(self.names([(b"X-B", b"2")], UNDERSCORES_REJECT), [b"Host", b"X-B"])

    def test_same_list_without_underscores(self) -> None:
        """No underscore: the parser's list is used as is (no copy on the hot path)."""
        headers = [*HOST, (b"X-B", b"2")]
        head = analyze_head(b"GET", b"/", "1.1", headers, True, UNDERSCORES_DROP)
        assert isinstance(head, RequestHead)
        self.assertIs(head.headers, headers)

    @settings(suppress_health_check=SLOW)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    sorted(HOP_BY_HOP | PROTECTED_FROM_CONNECTION | {b"x-forwarded-x", b"x-ok"})
                ),
                st.lists(st.booleans(), min_size=20, max_size=20),
                st.lists(st.booleans(), min_size=20, max_size=20),
            ),
            max_size=8,
        )
    )
    def test_no_risky_underscored_name_survives(
        self, spec: list[tuple[bytes, list[bool], list[bool]]]
    ) -> None:
        """Whatever the case and whichever `-` became `_`, under allow only x_ok forms remain."""
        headers = []
        for name, upper, under in spec:
            spelled = bytes(
                (c - 32 if upper[i] and 97 <= c <= 122 else c) for i, c in enumerate(name)
            )
            spelled = b"".join(
                b"_" if c == b"-"[0] and under[i] else bytes([c]) for i, c in enumerate(spelled)
            )
            if b"_" in spelled:
                headers.append((spelled, b"v"))
        kept = self.names(headers, UNDERSCORES_ALLOW)
        assert isinstance(kept, list)
        for name in kept[1:]:
            self.assertEqual(name.lower().replace(b"_", b"-"), b"x-ok")


# -- IngressProtocol in memory -------------------------------------------------------------------

UPSTREAM = Upstream("default/u", "http", "127.0.0.1", 9)
LISTENER = Listener(
    "http",
    "127.0.0.1",
    8081,
    (Api("default/a", "", (Route("r", 0, (), (Destination(UPSTREAM),)),)),),
)


class InMemoryFront:
    """One IngressProtocol on a StringTransport, with a fake clock and a memory reactor."""

    def __init__(self, **http: object) -> None:
        self.reactor = MemoryReactorClock()
        self.pools = PoolManager(self.reactor, self.reactor)
        self.factory = IngressFactory(
            self.reactor,
            self.reactor,
            LISTENER,
            HttpSettings(**http),  # type: ignore[arg-type]
            Timeouts(),
            self.pools,
            None,
        )
        self.protocol = IngressProtocol(self.factory)
        self.transport = StringTransport(peerAddress=None)
        self.protocol.makeConnection(self.transport)

    def feed(self, *pieces: bytes) -> None:
        """Deliver bytes as separate reads."""
        for piece in pieces:
            self.protocol.dataReceived(piece)

    @property
    def written(self) -> bytes:
        """Everything the gateway wrote to the client."""
        return self.transport.value()

    @property
    def connects(self) -> int:
        """Upstream connection attempts made."""
        return len(self.reactor.tcpClients)

    @property
    def closing(self) -> bool:
        """True once the gateway asked to close the connection."""
        return bool(self.transport.disconnecting)


class InMemoryFrontTests(SynchronousTestCase):
    """IngressProtocol timing and limits on a fake clock: deadline, idle close, head size."""

    def test_header_deadline_is_not_reset_by_trickling(self) -> None:
        """Bytes trickling in do not extend the header deadline: 408 when it passes."""
        front = InMemoryFront(header_timeout=2.0)
        front.feed(b"GET / HTTP/1.1\r\n")
        for _ in range(19):
            front.reactor.advance(0.1)
            front.feed(b"X")
        self.assertEqual(front.written, b"")
        front.reactor.advance(0.1)
        self.assertTrue(front.written.startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertIn(b"x-flexgw-error: request_timeout\r\n", front.written)
        self.assertTrue(front.closing)
        self.assertEqual(front.connects, 0)

    def test_idle_connection_closed_silently(self) -> None:
        """A connection that never starts a request is closed after the keep-alive timeout, no 408."""
        front = InMemoryFront(header_timeout=1.0, keepalive_timeout=5.0)
        front.reactor.advance(4.9)
        self.assertFalse(front.closing)
        front.reactor.advance(0.1)
        self.assertTrue(front.closing)
        self.assertEqual(front.written, b"")

    def test_complete_head_stops_the_deadline(self) -> None:
        """Once the head is complete the header deadline no longer applies."""
        front = InMemoryFront(header_timeout=1.0)
        front.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertEqual(front.connects, 1)
        front.reactor.advance(5)
        self.assertEqual(front.written, b"")
        self.assertFalse(front.closing)

    def test_no_timers_left_after_close(self) -> None:
        """A refused connection leaves no pending timer behind."""
        front = InMemoryFront()
        front.feed(b"GET / HTTP/9.9\r\n\r\n")
        front.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(front.reactor.getDelayedCalls(), [])

    def test_head_limit_across_reads(self) -> None:
        """A head growing over the limit in small reads is refused as soon as it passes it."""
        front = InMemoryFront(max_header_bytes=1024)
        front.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
        for _ in range(9):
            front.feed(b"X-Pad: " + b"p" * 93 + b"\r\n")
        self.assertEqual(front.written, b"")
        front.feed(b"X-Pad: " + b"p" * 93 + b"\r\n")
        self.assertTrue(front.written.startswith(b"HTTP/1.1 431 "))
        self.assertTrue(front.closing)
        self.assertEqual(front.connects, 0)

    def test_previous_body_does_not_count_toward_next_head(self) -> None:
        """Body bytes in the same read as the start of the next head are not counted as head bytes."""
        front = InMemoryFront(max_header_bytes=1024)
        front.feed(
            b"POST /1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3000\r\n\r\n"
            + b"b" * 3000
            + b"GET /2 HTTP/1.1\r\nHo"
        )
        self.assertNotIn(b"431", front.written)
        self.assertFalse(front.closing)
        # A refusal would wait for the first response: make sure none is pending either.
        self.assertIsNone(front.protocol.pending_refusal)
        self.assertEqual(front.protocol.state, HEAD)

    def test_huge_trailer_refused(self) -> None:
        """A trailer field growing without end is refused at the head limit, not buffered."""
        front = InMemoryFront(max_header_bytes=4096)
        front.feed(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        front.feed(b"3\r\nabc\r\n0\r\nX-Trailer: ")
        for _ in range(4):
            front.feed(b"t" * 1000)
        self.assertEqual(front.written, b"")
        front.feed(b"t" * 1000)
        self.assertTrue(front.written.startswith(b"HTTP/1.1 431 "))
        self.assertTrue(front.closing)

    def test_many_trailers_refused(self) -> None:
        """Many small trailer fields add up to the limit too."""
        front = InMemoryFront(max_header_bytes=4096)
        front.feed(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
        for _ in range(300):
            front.feed(b"X-T: 1234567\r\n")
        self.assertTrue(front.written.startswith(b"HTTP/1.1 431 "))

    def test_head_end_split_then_long_extension(self) -> None:
        """A head whose empty line spans two or three reads, then an over-long chunk line in
        the last read: refused with a 400 before any upstream connect; a short line passes."""
        head = b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        for cuts in ((1,), (2,), (3,), (2, 1), (3, 2), (3, 1), (4, 2)):
            reads = []
            end = len(head)
            for cut in sorted(cuts):
                reads.insert(0, head[end - cut : end])
                end -= cut
            reads.insert(0, head[:end])
            pieces = [*reads[:-1], reads[-1] + b"3;" + b"e" * 5000 + b"\r\nabc\r\n0\r\n\r\n"]
            front = InMemoryFront()
            front.feed(*pieces)
            self.assertTrue(front.written.startswith(b"HTTP/1.1 400 "), cuts)
            self.assertTrue(front.closing)
            self.assertEqual(front.connects, 0)
            front = InMemoryFront()
            front.feed(*reads[:-1], reads[-1] + b"3;e\r\nabc\r\n0\r\n\r\n")
            self.assertEqual(front.written, b"", cuts)
            self.assertEqual(front.connects, 1)

    def test_tiny_chunks_are_not_framing_abuse(self) -> None:
        """A long body in one-byte chunks, fed piecewise, is never refused: body resets the count."""
        front = InMemoryFront(max_header_bytes=1024)
        front.feed(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(200):
            front.feed(b"1\r\nx\r\n" * 50)
        self.assertEqual(front.written, b"")
        self.assertFalse(front.closing)

    def test_bad_body_in_the_same_read_never_connects(self) -> None:
        """A malformed chunk in the read that completed the head: refused before any upstream connect."""
        front = InMemoryFront()
        front.feed(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertTrue(front.written.startswith(b"HTTP/1.1 400 "))
        self.assertTrue(front.closing)
        self.assertEqual(front.connects, 0)

    def test_bad_body_in_a_later_read_fails_the_exchange(self) -> None:
        """A malformed chunk after the exchange started: 400, closed, the connect abandoned."""
        front = InMemoryFront()
        front.feed(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(front.connects, 1)
        front.feed(b"3\r\nabc\r\nzz\r\n")
        self.assertTrue(front.written.startswith(b"HTTP/1.1 400 "))
        self.assertTrue(front.closing)
        self.assertIsNone(front.protocol.active)

    def test_connect_refused_without_connecting(self) -> None:
        """CONNECT is answered 405 in memory, with no upstream connection attempt."""
        front = InMemoryFront()
        front.feed(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n")
        self.assertTrue(front.written.startswith(b"HTTP/1.1 405 "))
        self.assertEqual(front.connects, 0)

    @settings(max_examples=200, deadline=None, suppress_health_check=SLOW)
    @given(
        data=st.binary(max_size=200).map(
            lambda tail: (
                b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n" + tail
            )
        )
        | st.binary(max_size=120),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    )
    def test_split_invariance(self, data: bytes, cuts: list[int]) -> None:
        """Any input gives the same client-visible bytes however it is split into reads; never raises."""
        whole = InMemoryFront()
        whole.feed(data)
        split = InMemoryFront()
        points = sorted({c for c in cuts if 0 < c < len(data)})
        pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
        split.feed(*pieces)
        self.assertEqual(whole.written, split.written)
        self.assertEqual(whole.closing, split.closing)
        if whole.written:
            status = int(whole.written[9:12])
            self.assertIn(status, (400, 405, 431))
            self.assertTrue(whole.closing)
