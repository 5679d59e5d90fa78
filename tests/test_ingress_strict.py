"""Strict request parsing over real loopback sockets: refused requests never reach the upstream."""

from __future__ import annotations

import json
import random
from typing import Any, ClassVar

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import client, h2
from flexgw.testing.client import IncompleteResponse, Response, ResponseParseError
from flexgw.testing.upstream import Exchange, RecordingUpstream, Responder, echo, fixed
from tests.harness import Gateway, free_port, gateway_with_upstream, simple_api

SENTINEL = b"GET /sentinel HTTP/1.1\r\nHost: sentinel.test\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n"


def http_config(**settings: Any) -> str:
    """A Configuration resource setting `spec.http` fields."""
    lines = "".join(f"    {name}: {value}\n" for name, value in settings.items())
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\n"
        "kind: Configuration\n"
        "metadata:\n  name: http\n"
        "spec:\n  http:\n" + lines
    )


class StrictTestCase(TestCase):
    """Helpers: send raw bytes, check the refusal, prove the upstream saw nothing."""

    timeout = 15

    async def start(
        self, config: str = "", **options: Any
    ) -> tuple[Gateway, RecordingUpstream, int]:
        """A gateway in front of a recording upstream answering 200."""
        return await gateway_with_upstream(self, fixed(), config=config, **options)

    async def refused(
        self,
        raw: bytes,
        status: int = 400,
        cause: str = "bad_request",
        config: str = "",
        setup: tuple[Gateway, RecordingUpstream, int] | None = None,
    ) -> Response:
        """Send `raw` on a fresh connection; assert the refusal, the close and an untouched upstream."""
        gateway, upstream, port = setup or await self.start(config)
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(raw)
        response = await conn.read_response()
        await conn.wait_closed()
        self.assert_refusal(response, status, cause)
        self.assertEqual(upstream.received, [])
        self.assertEqual(upstream.connections, [])
        await self.assert_only_sentinel_reaches(upstream, port)
        records = gateway.records()
        self.assertEqual([(r["status"], r["error"]) for r in records[:1]], [(status, cause)])
        return response

    def assert_refusal(self, response: Response, status: int, cause: str) -> None:
        """A gateway-made JSON error with its cause header that closes the connection."""
        self.assertEqual(response.status, status)
        self.assertEqual(response.header("x-flexgw-error"), [cause.encode()])
        self.assertEqual(response.header("content-type"), [b"application/json"])
        self.assertEqual(response.header("connection"), [b"close"])
        self.assertFalse(response.keep_alive)
        message = json.loads(response.body)["error"]
        self.assertIsInstance(message, str)
        self.assertTrue(message)

    async def assert_only_sentinel_reaches(self, upstream: RecordingUpstream, port: int) -> None:
        """The gateway still serves, and the upstream has seen nothing but the sentinel request."""
        response = await client.request(reactor, "127.0.0.1", port, SENTINEL)
        self.assertEqual(response.status, 200)
        self.assertEqual([r.target for r in upstream.received], [b"/sentinel"])
        self.assertEqual(len(upstream.connections), 1)


class RequestLineTests(StrictTestCase):
    """The request line: only HTTP/1.0 and HTTP/1.1, exactly method SP target SP version."""

    async def test_http09_request_line(self) -> None:
        """An HTTP/0.9 simple request line (no version) is refused."""
        await self.refused(b"GET /\r\n\r\n")

    async def test_http09_version(self) -> None:
        """An explicit HTTP/0.9 version is refused."""
        await self.refused(b"GET / HTTP/0.9\r\nHost: a.test\r\n\r\n")

    async def test_http20_version(self) -> None:
        """HTTP/2.0 in an HTTP/1 request line is refused."""
        await self.refused(b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n")

    async def test_http12_version(self) -> None:
        """HTTP/1.2 is refused."""
        await self.refused(b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n")

    async def test_h2_preface(self) -> None:
        """Bytes that start like the HTTP/2 connection preface but are not it are read (and
        refused) as HTTP/1 (the whole preface starts HTTP/2: tests/test_h2_front.py)."""
        await self.refused(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")

    async def test_lower_case_protocol(self) -> None:
        """`http/1.1` is not a valid protocol name."""
        await self.refused(b"GET / http/1.1\r\nHost: a.test\r\n\r\n")

    async def test_double_space_in_request_line_is_normalised(self) -> None:
        """llhttp tolerates two spaces after the method (RFC 9112 §3 allows it); the upstream gets one."""
        _gateway, upstream, port = await self.start()
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET  /x HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        self.assertTrue(upstream.received[0].raw_head.startswith(b"GET /x HTTP/1.1\r\n"))

    async def test_space_in_target(self) -> None:
        """A raw space inside the target is refused."""
        await self.refused(b"GET /a b HTTP/1.1\r\nHost: a.test\r\n\r\n")

    async def test_control_character_in_target(self) -> None:
        """A control character inside the target is refused."""
        await self.refused(b"GET /a\x01b HTTP/1.1\r\nHost: a.test\r\n\r\n")

    async def test_fragment_in_target(self) -> None:
        """A `#fragment` in the target is refused (an upstream may drop it and serve another path)."""
        await self.refused(b"GET /admin#/../public HTTP/1.1\r\nHost: a.test\r\n\r\n")

    async def test_fragment_in_query(self) -> None:
        """A `#` after the query is refused too."""
        await self.refused(b"GET /a?b=1#c HTTP/1.1\r\nHost: a.test\r\n\r\n")

    async def test_backslash_in_path(self) -> None:
        """A backslash (a separator to some upstreams) in the path is refused."""
        await self.refused(b"GET /api\\..\\admin HTTP/1.1\r\nHost: a.test\r\n\r\n")

    async def test_dots_inside_segments_are_fine(self) -> None:
        """Dots that are not whole segments (`.well-known`, `v1.2`, `...`) and `..` in the query pass."""
        _, upstream, port = await self.start()
        target = b"/.well-known/v1.2/a..b/.../x%20y?p=/../z"
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.received[0].target, target)

    async def test_asterisk_form(self) -> None:
        """`OPTIONS *` (asterisk form) is refused rather than routed."""
        await self.refused(b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n")

    async def test_connect_is_not_allowed(self) -> None:
        """CONNECT on an ingress listener is answered 405."""
        await self.refused(
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
            status=405,
            cause="method_not_allowed",
        )

    async def test_connect_with_origin_form_target(self) -> None:
        """CONNECT is refused 405 whatever its target looks like (never proxied as a request)."""
        await self.refused(
            b"CONNECT /x HTTP/1.1\r\nHost: a.test\r\n\r\n", status=405, cause="method_not_allowed"
        )


class HeaderSyntaxTests(StrictTestCase):
    """Header lines: no folding, no bare CR/LF, no NUL, no whitespace before the colon."""

    async def test_obs_fold(self) -> None:
        """A folded header continuation line is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: one\r\n two\r\n\r\n")

    async def test_obs_fold_with_tab(self) -> None:
        """A continuation line starting with a tab is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: one\r\n\ttwo\r\n\r\n")

    async def test_bare_lf_line_endings(self) -> None:
        """A head with LF-only line endings is refused."""
        await self.refused(b"GET / HTTP/1.1\nHost: a.test\n\n")

    async def test_bare_lf_after_header(self) -> None:
        """A bare LF ending one header line is refused (it could hide a second header)."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\nContent-Length: 5\r\n\r\n")

    async def test_bare_cr(self) -> None:
        """A bare CR inside the head is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\rX-A: b\r\n\r\n")

    async def test_nul_in_header_value(self) -> None:
        """A NUL byte in a header value is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\x00b\r\n\r\n")

    async def test_control_character_in_header_value(self) -> None:
        """Other control characters (DEL) in a header value are refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\x7fb\r\n\r\n")

    async def test_whitespace_before_colon(self) -> None:
        """`Name : value` is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A : b\r\n\r\n")

    async def test_tab_before_colon(self) -> None:
        """`Name<TAB>: value` is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A\t: b\r\n\r\n")

    async def test_invalid_header_name(self) -> None:
        """A header name with a non-token character is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nX@A: b\r\n\r\n")

    async def test_empty_header_name(self) -> None:
        """A header line with an empty name is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\n: b\r\n\r\n")


class FramingTests(StrictTestCase):
    """Body framing: one unambiguous length, or a final chunked coding, nothing else."""

    async def test_content_length_and_transfer_encoding(self) -> None:
        """Content-Length together with Transfer-Encoding is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )

    async def test_duplicate_content_length(self) -> None:
        """Two Content-Length headers, even equal, are refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
        )

    async def test_content_length_with_plus(self) -> None:
        """`Content-Length: +3` is refused."""
        await self.refused(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +3\r\n\r\nabc")

    async def test_content_length_list(self) -> None:
        """`Content-Length: 3, 3` is refused."""
        await self.refused(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3, 3\r\n\r\nabc")

    async def test_content_length_empty(self) -> None:
        """An empty Content-Length is refused."""
        await self.refused(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: \r\n\r\nabc")

    async def test_content_length_negative(self) -> None:
        """A negative Content-Length is refused."""
        await self.refused(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n")

    async def test_content_length_hex(self) -> None:
        """A hexadecimal Content-Length is refused."""
        await self.refused(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0x3\r\n\r\nabc")

    async def test_content_length_overflow(self) -> None:
        """A Content-Length beyond 64 bits is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999999\r\n\r\n"
        )

    async def test_transfer_encoding_gzip(self) -> None:
        """`Transfer-Encoding: gzip` (not chunked) is refused."""
        await self.refused(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\nabc")

    async def test_transfer_encoding_gzip_chunked(self) -> None:
        """`gzip, chunked` is refused: flexgw accepts only exactly `chunked`."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
        )

    async def test_transfer_encoding_chunked_gzip(self) -> None:
        """`chunked, gzip` (chunked not final) is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
        )

    async def test_transfer_encoding_identity(self) -> None:
        """`Transfer-Encoding: identity` (dropped by RFC 9112) is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: identity\r\n\r\n"
        )

    async def test_transfer_encoding_empty(self) -> None:
        """An empty Transfer-Encoding is refused."""
        await self.refused(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: \r\n\r\n")

    async def test_duplicate_transfer_encoding(self) -> None:
        """Two `Transfer-Encoding: chunked` headers are refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )

    async def test_split_transfer_encoding(self) -> None:
        """`Transfer-Encoding: gzip` then `Transfer-Encoding: chunked` on two lines is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )

    async def test_transfer_encoding_in_http10(self) -> None:
        """An HTTP/1.0 request with Transfer-Encoding has faulty framing (RFC 9112 §6.1): refused."""
        await self.refused(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )

    async def test_bad_chunk_size(self) -> None:
        """A chunk size that is not plain hex is refused, and nothing reaches the upstream."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0x3\r\nabc\r\n0\r\n\r\n"
        )

    async def test_chunk_size_with_trailing_space(self) -> None:
        """A chunk size followed by a space is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3 \r\nabc\r\n0\r\n\r\n"
        )

    async def test_chunk_extension_with_bare_lf(self) -> None:
        """A chunk extension ended by a bare LF is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext\nabc\r\n0\r\n\r\n"
        )

    async def test_chunk_size_line_with_bare_lf(self) -> None:
        """A chunk size line ended by a bare LF is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\nabc\r\n0\r\n\r\n"
        )

    async def test_chunk_data_overrun(self) -> None:
        """Chunk data longer than its size is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabcd\r\n0\r\n\r\n"
        )

    async def test_chunk_size_overflow(self) -> None:
        """A chunk size beyond 64 bits is refused."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"FFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n"
        )


class ChunkLineBoundTests(StrictTestCase):
    """Over-long chunk-size lines are refused as they arrive, before the head goes upstream."""

    CHUNKED = b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def test_huge_chunk_extension_in_the_head_write(self) -> None:
        """A 100 KiB chunk extension sent with the head: 400, and the upstream sees nothing."""
        await self.refused(self.CHUNKED + b"3;" + b"e" * 100 * 1024 + b"\r\nabc\r\n0\r\n\r\n")

    async def test_unterminated_chunk_extension(self) -> None:
        """An extension that never ends is refused without waiting for its end."""
        await self.refused(self.CHUNKED + b"3;ext=" + b"v" * 8192)

    async def test_long_extension_after_good_chunks(self) -> None:
        """A long extension on a later chunk of the same read: still nothing upstream."""
        await self.refused(self.CHUNKED + b"3\r\nabc\r\n" * 50 + b"1;" + b"x" * 5000 + b"\r\nz\r\n")

    async def test_pipelined_request_with_long_extension(self) -> None:
        """A GET then a chunked POST with a long extension in one read: the GET is answered,
        then the 400; the upstream saw only the GET."""
        _gateway, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(
            b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n"
            + self.CHUNKED
            + b"3;"
            + b"e" * 20000
            + b"\r\nabc\r\n0\r\n\r\n"
        )
        first = await conn.read_response()
        self.assertEqual(first.status, 200)
        second = await conn.read_response()
        await conn.wait_closed()
        self.assert_refusal(second, 400, "bad_request")
        self.assertEqual([r.target for r in upstream.received], [b"/first"])

    async def test_extensions_within_the_bound_pass(self) -> None:
        """Extensions under the bound, cut across reads, are accepted (and not forwarded)."""
        _gateway, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(self.CHUNKED + b"3;a=" + b"b" * 2000)
        conn.send(b"b" * 2000 + b"\r\nabc\r\n0;z\r\n\r\n")
        response = await conn.read_response()
        self.assertEqual(response.status, 200)
        (seen,) = upstream.received
        self.assertEqual(seen.body, b"abc")
        self.assertNotIn(b"bbbb", seen.raw_head)


class BodyErrorTests(StrictTestCase):
    """A body that turns malformed after its head went upstream: the upstream never gets it whole."""

    async def test_bad_chunk_after_head_was_forwarded(self) -> None:
        """A bad chunk after the head reached the upstream: 400, and the upstream request is cut."""
        gateway, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(
            b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        (seen,) = await upstream.wait_for_heads(1)
        conn.send(b"zz\r\nabc\r\n0\r\n\r\n" + SMUGGLED)
        response = await conn.read_response()
        await conn.wait_closed()
        self.assert_refusal(response, 400, "bad_request")
        await upstream.wait_for_disconnections(1)
        self.assertEqual(seen.target, b"/up")
        self.assertFalse(seen.complete)
        self.assertEqual([r.target for r in upstream.received], [b"/up"])
        self.assertEqual(gateway.records()[0]["error"], "bad_request")

    async def test_oversized_trailer(self) -> None:
        """Trailer fields beyond the head limit: 431, and the upstream request is cut, not completed."""
        body_arrived: defer.Deferred[bytes] = defer.Deferred()

        class BodyWatcher(Responder):
            """Fires `body_arrived` with the first request body piece."""

            def on_body(self, ex: Exchange, data: bytes) -> None:
                if not body_arrived.called:
                    body_arrived.callback(data)

        gateway, upstream, port = await gateway_with_upstream(
            self, BodyWatcher(), config=http_config(maxHeaderBytes=2048)
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b"3\r\nabc\r\n")
        self.assertEqual(await body_arrived, b"abc")
        # No body from here on: the last chunk and an endless trailer field.
        conn.send(b"0\r\nX-Trailer: " + b"t" * 4096)
        response = await conn.read_response()
        await conn.wait_closed()
        self.assert_refusal(response, 431, "headers_too_large")
        await upstream.wait_for_disconnections(1)
        self.assertFalse(upstream.received[0].complete)
        self.assertEqual(gateway.records()[0]["error"], "headers_too_large")

    async def test_bad_chunk_while_the_response_streams(self) -> None:
        """A bad chunk after the upstream started answering: both sides are cut, nothing completes."""
        gateway, upstream, port = await gateway_with_upstream(self, echo())
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(
            b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        # Parsed as if answering HEAD: fires once the response head is through the gateway.
        head = await conn.read_response(head=True)
        self.assertEqual(head.status, 200)
        conn.send(b"zz\r\n")
        await conn.wait_closed()
        # The response head is already out: no error response can follow, only the cut.
        self.assertNotIn(b"HTTP/1.1 400", conn.received_raw)
        await upstream.wait_for_disconnections(1)
        self.assertFalse(upstream.received[0].complete)
        self.assertEqual(gateway.records()[0]["error"], "bad_request")

    async def test_content_length_body_cut_short(self) -> None:
        """A client closing mid-body: the upstream connection is dropped, its request incomplete."""
        _gateway, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nabc")
        (seen,) = await upstream.wait_for_heads(1)
        await conn.abort()
        await upstream.wait_for_disconnections(1)
        self.assertFalse(seen.complete)
        self.assertEqual(upstream.completed, [])


class PathNormalisationTests(StrictTestCase):
    """The one path rule (flexgw.http.path) end to end: every spelling of the attack run is
    refused before the upstream, or reaches it normalised."""

    #: (target sent, what the upstream receives; None: refused with a 400)
    DEFAULTS: ClassVar[list[tuple[bytes, bytes | None]]] = [
        (b"/api/..;/admin", None),
        (b"/api/.;/admin", None),
        (b"/api/%2e%2e;/admin", None),
        (b"/api/..%3b/admin", None),
        (b"/api/%2E%2E%2Fadmin", None),
        (b"/api/..%2fadmin", None),
        (b"/api/..%5cadmin", None),
        (b"/api/..%00/admin", None),
        (b"/api/%c0%ae%c0%ae/admin", None),
        (b"/api\\..\\admin", None),
        (b"//admin", b"/admin"),
        (b"/api/../admin", b"/admin"),
        (b"/api/%2e%2e/admin", b"/admin"),
        (b"/api/./x/%2E/y?q=/../z", b"/api/x/y?q=/../z"),
        (b"/.well-known/v1.2/a..b/.../x%20y?p=/../z", b"/.well-known/v1.2/a..b/.../x%20y?p=/../z"),
    ]

    async def send(self, port: int, target: bytes) -> Response:
        """One GET of `target` on a fresh connection."""
        raw = b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
        return await client.request(reactor, "127.0.0.1", port, raw)

    async def check(self, cases: list[tuple[bytes, bytes | None]], config: str = "") -> None:
        """Send each case; a refusal leaves the upstream untouched, else it gets the expected target."""
        gateway, upstream, port = await self.start(config)
        for target, expected in cases:
            before = len(upstream.received)
            response = await self.send(port, target)
            if expected is None:
                self.assert_refusal(response, 400, "bad_request")
                self.assertEqual(len(upstream.received), before, target)
            else:
                self.assertEqual(response.status, 200, target)
                self.assertEqual(upstream.received[-1].target, expected, target)
        self.assertEqual(
            [r["status"] for r in gateway.records()],
            [400 if expected is None else 200 for _, expected in cases],
        )

    async def test_default_rule(self) -> None:
        """Defaults: `;` on dot segments, encoded slashes/backslashes, NUL and overlong UTF-8
        are refused; `//` merged, dot segments removed; the query is left alone."""
        await self.check(self.DEFAULTS)

    async def test_unescape_and_forward(self) -> None:
        """pathWithEscapedSlashesAction unescapeAndForward: %2F/%5C become `/`, then normalised."""
        await self.check(
            [
                (b"/api/%2E%2E%2Fadmin", b"/admin"),
                (b"/api/..%2fadmin", b"/admin"),
                (b"/api/..%5cadmin", b"/admin"),
                (b"/a%2fb?x=%2f", b"/a/b?x=%2f"),
                (b"/api/..;/admin", None),
            ],
            http_config(pathWithEscapedSlashesAction="unescapeAndForward"),
        )

    async def test_keep_unchanged(self) -> None:
        """keepUnchanged: an encoded slash passes, unless reading it as `/` gives a dot segment."""
        await self.check(
            [(b"/group%2fproject", b"/group%2Fproject"), (b"/api/..%2fadmin", None)],
            http_config(pathWithEscapedSlashesAction="keepUnchanged"),
        )

    async def test_unescape_and_redirect(self) -> None:
        """unescapeAndRedirect: a 307 to the normalised path (query kept); nothing upstream."""
        _gateway, upstream, port = await self.start(
            http_config(pathWithEscapedSlashesAction="unescapeAndRedirect")
        )
        response = await self.send(port, b"/api/..%2Fadmin%2fx?q=1")
        self.assertEqual(response.status, 307)
        self.assertEqual(response.header("location"), [b"/admin/x?q=1"])
        self.assertEqual(upstream.received, [])

    async def test_without_normalisation_or_merging(self) -> None:
        """normalizePath false refuses dot segments; mergeSlashes false forwards `//`."""
        await self.check(
            [(b"/api/../admin", None), (b"/api/%2e%2e/admin", None), (b"//admin", b"//admin")],
            http_config(normalizePath="false", mergeSlashes="false"),
        )

    async def test_h2_paths_follow_the_rule(self) -> None:
        """Over HTTP/2 the same rule: `..;` refused, `/../` and `//` normalised."""
        _gateway, upstream, port = await self.start()
        conn = await h2.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.transport.abortConnection)
        refused = conn.request(b"GET", b"/api/..;/admin")
        await refused.done
        self.assertEqual(refused.status, 400)
        self.assertEqual(upstream.received, [])
        normalised = conn.request(b"GET", b"/api/..//x/../admin?q")
        await normalised.done
        self.assertEqual(normalised.status, 200)
        self.assertEqual([r.target for r in upstream.received], [b"/admin?q"])

    async def test_routing_and_policies_see_the_normalised_path(self) -> None:
        """A policy bound to /admin paths applies to every spelling that reaches /admin; routing
        strips the base path of the normalised path."""
        binding = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: ip}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
            "  policyRef: {name: ip-blocklist-flex}\n"
            "  config:\n    ips: ['127.0.0.1']\n"
            "  rules:\n    - path: /admin(/.*)?\n"
        )
        upstream = RecordingUpstream(fixed(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        Gateway(self, {"api.yaml": simple_api(port, upstream.address[1], "/v1") + binding}).start()
        for target, status in (
            (b"/v1/admin", 403),
            (b"/v1/public/../admin", 403),
            (b"/v1/public/%2e%2e/admin/x", 403),
            (b"/v1//admin", 403),
            (b"/v1/public/..;/admin", 400),
            (b"/v1/public/..%2fadmin", 400),
            (b"/v1/public/./x", 200),
            (b"/v1/../v1/public", 200),
            (b"/v2/../v1/public", 200),
        ):
            response = await self.send(port, target)
            self.assertEqual(response.status, status, target)
        self.assertEqual([r.target for r in upstream.received], [b"/public/x", b"/public", b"/public"])


class HostTests(StrictTestCase):
    """Host: exactly one, well formed, in HTTP/1.1; consistent with an absolute-form target."""

    async def test_missing_host_in_http11(self) -> None:
        """An HTTP/1.1 request without Host is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n")

    async def test_duplicate_host(self) -> None:
        """Two Host headers are refused, even with equal values."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n")

    async def test_duplicate_host_in_http10(self) -> None:
        """Two Host headers are refused in HTTP/1.0 too."""
        await self.refused(b"GET / HTTP/1.0\r\nHost: a.test\r\nHost: b.test\r\n\r\n")

    async def test_malformed_host_with_space(self) -> None:
        """A Host with a space inside is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test b.test\r\n\r\n")

    async def test_malformed_host_with_userinfo(self) -> None:
        """A Host carrying userinfo (`user@host`) is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n")

    async def test_malformed_host_with_path(self) -> None:
        """A Host with a path is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test/x\r\n\r\n")

    async def test_malformed_host_port(self) -> None:
        """A Host with a non-numeric port is refused."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: a.test:8o\r\n\r\n")

    async def test_empty_host(self) -> None:
        """An empty Host is refused for an origin-form request."""
        await self.refused(b"GET / HTTP/1.1\r\nHost: \r\n\r\n")

    async def test_absolute_form_disagreeing_with_host(self) -> None:
        """An absolute-form target whose authority differs from Host is refused."""
        await self.refused(b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n")

    async def test_absolute_form_with_malformed_authority(self) -> None:
        """An absolute-form target with userinfo in its authority is refused."""
        await self.refused(b"GET http://u@a.test/x HTTP/1.1\r\nHost: u@a.test\r\n\r\n")

    async def test_absolute_form_without_host_in_http11(self) -> None:
        """HTTP/1.1 requires Host even with an absolute-form target."""
        await self.refused(b"GET http://a.test/x HTTP/1.1\r\n\r\n")

    async def test_absolute_form_agreeing_is_routed_on_its_path(self) -> None:
        """An absolute-form target agreeing with Host is proxied and routed on the target's path."""
        _gateway, upstream, port = await self.start(
            rules="- path: /api(/.*)", destination_path="/v1"
        )
        response = await client.request(
            reactor,
            "127.0.0.1",
            port,
            b"GET http://A.Test:8080/api/items?q=1 HTTP/1.1\r\nHost: a.test:8080\r\n\r\n",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(len(upstream.received), 1)
        seen = upstream.received[0]
        self.assertEqual(seen.target, b"/v1/items?q=1")
        self.assertEqual(seen.header("x-forwarded-host"), [b"A.Test:8080"])

    async def test_absolute_form_not_matching_route_is_404(self) -> None:
        """Routing uses the absolute target's path: a path no rule matches is a 404."""
        _gateway, upstream, port = await self.start(rules="- path: /api(/.*)")
        response = await client.request(
            reactor,
            "127.0.0.1",
            port,
            b"GET http://a.test/other HTTP/1.1\r\nHost: a.test\r\n\r\n",
        )
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("x-flexgw-error"), [b"no_route"])
        self.assertEqual(upstream.received, [])

    async def test_http10_without_host_is_accepted(self) -> None:
        """HTTP/1.0 does not require Host: the request is proxied, Host set to the upstream."""
        _gateway, upstream, port = await self.start()
        response = await client.request(reactor, "127.0.0.1", port, b"GET /ten HTTP/1.0\r\n\r\n")
        self.assertEqual(response.status, 200)
        self.assertEqual(len(upstream.received), 1)
        seen = upstream.received[0]
        self.assertEqual(seen.target, b"/ten")
        self.assertEqual(seen.header("host"), [f"127.0.0.1:{upstream.address[1]}".encode()])
        self.assertEqual(seen.header("x-forwarded-host"), [])


class HeadLimitTests(StrictTestCase):
    """Request line + headers over the size limit → 431; not complete in time → 408."""

    async def test_default_limit_is_60_kib(self) -> None:
        """A head over 60 KiB is refused with 431 under the default settings."""
        big = b"X-Big: " + b"a" * (61 * 1024) + b"\r\n"
        await self.refused(
            b"GET / HTTP/1.1\r\nHost: a.test\r\n" + big + b"\r\n",
            status=431,
            cause="headers_too_large",
        )

    async def test_default_limit_allows_a_large_head(self) -> None:
        """A head of 50 KiB is under the default limit and is proxied whole."""
        _gateway, upstream, port = await self.start()
        value = b"a" * (50 * 1024)
        response = await client.request(
            reactor,
            "127.0.0.1",
            port,
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + value + b"\r\n\r\n",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.received[0].header("x-big"), [value])

    async def test_configured_limit_over(self) -> None:
        """With maxHeaderBytes 2048, a 2.1 KiB head is refused with 431."""
        head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"a" * 2100 + b"\r\n\r\n"
        await self.refused(
            head, status=431, cause="headers_too_large", config=http_config(maxHeaderBytes=2048)
        )

    async def test_configured_limit_many_headers(self) -> None:
        """Many small headers adding up over the limit are refused with 431."""
        head = b"GET / HTTP/1.1\r\nHost: a.test\r\n" + b"X-N: 1234567890\r\n" * 200 + b"\r\n"
        await self.refused(
            head, status=431, cause="headers_too_large", config=http_config(maxHeaderBytes=2048)
        )

    async def test_configured_limit_long_target(self) -> None:
        """A request target over the limit is refused with 431."""
        head = b"GET /" + b"p" * 3000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
        await self.refused(
            head, status=431, cause="headers_too_large", config=http_config(maxHeaderBytes=2048)
        )

    async def test_configured_limit_incomplete_head(self) -> None:
        """An oversized head is refused before it is complete (not buffered until its end)."""
        head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"a" * 3000
        await self.refused(
            head, status=431, cause="headers_too_large", config=http_config(maxHeaderBytes=2048)
        )

    async def test_configured_limit_under(self) -> None:
        """With maxHeaderBytes 2048, a 1.5 KiB head is proxied."""
        _gateway, upstream, port = await self.start(http_config(maxHeaderBytes=2048))
        head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"a" * 1500 + b"\r\n\r\n"
        response = await client.request(reactor, "127.0.0.1", port, head)
        self.assertEqual(response.status, 200)
        self.assertEqual(len(upstream.received), 1)

    async def test_body_before_a_pipelined_head_does_not_count(self) -> None:
        """Body bytes arriving with the start of the next request do not count toward its head limit."""
        _gateway, upstream, port = await gateway_with_upstream(
            self, echo(), config=http_config(maxHeaderBytes=1024)
        )
        body = b"b" * 3000
        first = b"POST /one HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % len(body)
        second = b"GET /two HTTP/1.1\r\nHost: a.test\r\n\r\n"
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        # The body and the first half of the next head in one write, the rest after.
        conn.send(first + body + second[:10])
        one = await conn.read_response()
        conn.send(second[10:])
        two = await conn.read_response()
        self.assertEqual((one.status, one.body), (200, body))
        self.assertEqual(two.status, 200)
        self.assertEqual([r.target for r in upstream.received], [b"/one", b"/two"])

    async def test_header_deadline(self) -> None:
        """A head not complete within headerTimeoutSeconds is answered 408 and closed."""
        await self.refused(
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: ",
            status=408,
            cause="request_timeout",
            config=http_config(headerTimeoutSeconds=0.2),
        )

    async def test_header_deadline_on_a_second_request(self) -> None:
        """The deadline also applies to a later request on a kept-alive connection."""
        _gateway, upstream, port = await self.start(http_config(headerTimeoutSeconds=0.2))
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n")
        first = await conn.read_response()
        self.assertEqual(first.status, 200)
        conn.send(b"GET /second HTTP/1.1\r\nHost: a.test\r\n")
        second = await conn.read_response()
        await conn.wait_closed()
        self.assert_refusal(second, 408, "request_timeout")
        self.assertEqual([r.target for r in upstream.received], [b"/first"])


class SmugglingCorpusTests(StrictTestCase):
    """Classic CL.TE / TE.CL / TE.TE desync payloads: the upstream never sees a second request."""

    CORPUS: ClassVar[dict[str, bytes]] = {
        "cl_te": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 6\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_cl": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 4\r\n\r\n%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n"
        ),
        "te_space_before_colon": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_xchunked": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_chunked_then_garbage": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: x\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_garbage_then_chunked_with_cl": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_obs_fold": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n"
            b" chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_leading_space_line": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
            b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_bare_lf_hidden": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nX: y\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "cl_bare_lf_hidden": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nX: y\nContent-Length: 41\r\n\r\n" + SMUGGLED
        ),
        "te_vertical_tab": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_chunked_identity": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
            b"0\r\n\r\n" + SMUGGLED
        ),
        "te_quoted": (
            b'POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: "chunked"\r\n'
            b"\r\n0\r\n\r\n" + SMUGGLED
        ),
        "te_nul": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "cl_cl": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\nContent-Length: 41\r\n\r\n"
            + SMUGGLED
        ),
        "http10_te_chunked": (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 41\r\n\r\n"
            b"0\r\n\r\n" + SMUGGLED
        ),
        "http10_te_only": (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        ),
        "chunk_ext_lf": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2;\n\r\nxx\r\n0\r\n\r\n" + SMUGGLED
        ),
        "chunk_size_prefix": (
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"+0\r\n\r\n" + SMUGGLED
        ),
    }

    def test_corpus_is_not_trivially_empty(self) -> None:
        """The corpus carries a smuggled request in every payload (guards against edits)."""
        self.assertTrue(all(b"/smuggled" in payload for payload in self.CORPUS.values()))

    async def test_corpus(self) -> None:
        """Every payload is refused with a 400, and the upstream sees no request at all."""
        _gateway, upstream, port = await self.start()
        for name, payload in self.CORPUS.items():
            conn = await client.connect(reactor, "127.0.0.1", port)
            conn.send(payload)
            response = await conn.read_response()
            await conn.wait_closed()
            self.assertEqual(
                (name, response.status, response.header("x-flexgw-error")),
                (name, 400, [b"bad_request"]),
            )
        self.assertEqual(upstream.received, [])
        await self.assert_only_sentinel_reaches(upstream, port)

    async def test_upgrade_with_body_does_not_smuggle(self) -> None:
        """An Upgrade request with a body is refused: its body is never parsed as a request."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
        )

    async def test_chunked_upgrade_does_not_smuggle(self) -> None:
        """A chunked Upgrade request is refused too."""
        await self.refused(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        )

    async def test_valid_request_then_garbage(self) -> None:
        """A valid request followed by garbage is answered, then the garbage gets a 400 and a close."""
        _gateway, upstream, port = await self.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /ok HTTP/1.1\r\nHost: a.test\r\n\r\n\x00garbage\r\n\r\n")
        first = await conn.read_response()
        second = await conn.read_response()
        await conn.wait_closed()
        self.assertEqual(first.status, 200)
        self.assert_refusal(second, 400, "bad_request")
        self.assertEqual([r.target for r in upstream.received], [b"/ok"])

    async def test_chunked_body_carrying_a_request_is_one_request(self) -> None:
        """A chunked body that looks like a request reaches the upstream as one request's body."""
        _gateway, upstream, port = await gateway_with_upstream(self, echo())
        payload = (
            b"POST /outer HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n"
        )
        response = await client.request(reactor, "127.0.0.1", port, payload)
        self.assertEqual((response.status, response.body), (200, SMUGGLED))
        self.assertEqual([r.target for r in upstream.received], [b"/outer"])
        self.assertEqual(upstream.received[0].body, SMUGGLED)
        self.assertTrue(upstream.received[0].chunked)

    async def test_content_length_body_carrying_a_request_is_one_request(self) -> None:
        """A Content-Length body that looks like a request reaches the upstream as one body."""
        _gateway, upstream, port = await gateway_with_upstream(self, echo())
        payload = (
            b"POST /outer HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
            + SMUGGLED
        )
        response = await client.request(reactor, "127.0.0.1", port, payload)
        self.assertEqual((response.status, response.body), (200, SMUGGLED))
        self.assertEqual([r.target for r in upstream.received], [b"/outer"])
        self.assertEqual(upstream.received[0].header("content-length"), [b"%d" % len(SMUGGLED)])


class FuzzTests(StrictTestCase):
    """Random bytes in a request head never crash the gateway or reach the upstream malformed."""

    async def test_random_heads(self) -> None:
        """Each mutated head yields a well-formed response or a clean close; serving goes on."""
        _gateway, upstream, port = await self.start()
        rng = random.Random(20261127)
        base = b"POST /f HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc"
        alphabet = b"\x00\t\n\r :;,\x0b\x7f\x80\xff-0aA/?"
        statuses: set[int] = set()
        closes = 0
        for _ in range(60):
            data = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                op = rng.random()
                if op < 0.4:
                    data[at] = rng.choice(alphabet)
                elif op < 0.7:
                    data.insert(at, rng.choice(alphabet))
                else:
                    del data[at]
            conn = await client.connect(reactor, "127.0.0.1", port)
            conn.send(bytes(data))
            conn.half_close()
            try:
                response = await conn.read_response()
            except IncompleteResponse as exc:
                # A clean close with nothing sent back (the head or body never completed).
                self.assertEqual((exc.partial, conn.bytes_received), (None, 0), bytes(data))
                closes += 1
                continue
            except ResponseParseError as exc:
                self.fail(f"malformed response to {bytes(data)!r}: {exc!r}")
            statuses.add(response.status)
            self.assertIn(response.status, (200, 400, 404, 405, 431), bytes(data))
            if response.status != 200:
                self.assertTrue(response.header("x-flexgw-error"), bytes(data))
            await conn.abort()
        self.assertIn(400, statuses)
        for seen in upstream.received:
            # Whatever got through is a well-formed request the upstream parsed without error.
            self.assertTrue(seen.complete)
        self.assertEqual(upstream.errors, [])
        response = await client.request(reactor, "127.0.0.1", port, SENTINEL)
        self.assertEqual(response.status, 200)
