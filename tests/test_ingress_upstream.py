"""Upstream behaviour over real sockets: pooling, retry, timeouts, resets, malformed responses, aborts."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from flexgw.testing.resolver import StaticResolver
from flexgw.testing.upstream import (
    Exchange,
    Responder,
    close_connection,
    fixed,
    function,
    malformed,
    never,
    raw,
    sequence,
    stream,
)
from tests.harness import Gateway, free_port, gateway_with_upstream, simple_api
from tests.probes import idle_upstream, pool_counts

GET = b"GET /items HTTP/1.1\r\nHost: example.test\r\n\r\n"


def timeouts(**values: float) -> str:
    """A Configuration document setting `spec.timeouts`."""
    lines = "".join(f"    {name}: {value}\n" for name, value in values.items())
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\n"
        "kind: Configuration\n"
        "metadata:\n  name: timeouts\n"
        "spec:\n  timeouts:\n" + lines
    )


class Held:
    """A responder that keeps each request waiting until the test answers it."""

    def __init__(self) -> None:
        """No request yet."""
        self.waiting: list[Exchange] = []
        self.arrived = 0
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []
        self.responder = function(self._hold)

    def _hold(self, ex: Exchange) -> None:
        self.waiting.append(ex)
        self.arrived += 1
        for entry in list(self._waiters):
            if self.arrived >= entry[0]:
                self._waiters.remove(entry)
                reactor.callLater(0, entry[1].callback, None)  # type: ignore[attr-defined]

    def wait(self, n: int) -> defer.Deferred[None]:
        """Fires once `n` requests in all have arrived."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.arrived >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d

    def answer_all(self, body: bytes = b"done") -> None:
        """Answer every waiting request with a 200."""
        waiting, self.waiting = self.waiting, []
        for ex in waiting:
            ex.respond(200, [(b"Content-Length", b"%d" % len(body))], body)


class UpstreamTestCase(TestCase):
    """Shared assertions."""

    timeout = 20

    def assert_gateway_error(
        self, gateway: Gateway, response: client.Response, status: int, cause: str
    ) -> None:
        """A gateway-made error: status, cause header, JSON body, and an access-log record."""
        self.assertEqual(response.status, status)
        self.assertEqual(response.header("x-flexgw-error"), [cause.encode()])
        self.assertEqual(response.header("content-type"), [b"application/json"])
        self.assertIn("error", json.loads(response.body))
        record = gateway.records()[-1]
        self.assertEqual((record["status"], record["error"]), (status, cause))

    async def settled(self, gateway: Gateway, idle: int) -> None:
        """No upstream connection is in use or connecting, and `idle` are pooled."""
        self.assertEqual(pool_counts(gateway), [(idle, 0, 0)])


class PoolingTests(UpstreamTestCase):
    """Keep-alive upstream connections are pooled and reused."""

    async def test_sequential_requests_reuse_one_connection(self) -> None:
        """Requests from separate client connections, one after another, share one upstream connection."""
        gateway, upstream, port = await gateway_with_upstream(self)
        for _ in range(4):
            response = await client.request(reactor, "127.0.0.1", port, GET)
            self.assertEqual(response.status, 200)
        self.assertEqual([r.connection for r in upstream.received], [0, 0, 0, 0])
        self.assertEqual(len(upstream.connections), 1)
        await self.settled(gateway, idle=1)

    async def test_keepalive_client_reuses_upstream_connection(self) -> None:
        """Several requests on one keep-alive client connection go over one upstream connection."""
        _gateway, upstream, port = await gateway_with_upstream(self)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        for _ in range(3):
            conn.send(GET)
            response = await conn.read_final_response()
            self.assertEqual(response.status, 200)
        self.assertEqual([r.connection for r in upstream.received], [0, 0, 0])

    async def test_busy_connection_means_a_new_one(self) -> None:
        """While one upstream connection is busy, a concurrent request opens a second; both pool."""
        held = Held()
        gateway, upstream, port = await gateway_with_upstream(self, held.responder)
        first = client.request(reactor, "127.0.0.1", port, GET)
        await held.wait(1)
        second = client.request(reactor, "127.0.0.1", port, GET)
        await held.wait(2)
        self.assertEqual(sorted(r.connection for r in upstream.received), [0, 1])
        held.answer_all()
        self.assertEqual([(await first).status, (await second).status], [200, 200])
        await self.settled(gateway, idle=2)
        # The next request reuses one of them: no third connection.
        third = client.request(reactor, "127.0.0.1", port, GET)
        await held.wait(3)
        held.answer_all()
        self.assertEqual((await third).status, 200)
        self.assertEqual(len(upstream.connections), 2)

    async def test_idle_connection_expires(self) -> None:
        """A pooled connection idle past upstreamConnectionIdleSeconds is closed by the gateway."""
        gateway, upstream, port = await gateway_with_upstream(
            self, config=timeouts(upstreamConnectionIdleSeconds=0.05)
        )
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        await upstream.wait_for_disconnections(1)  # the periodic reaper closes it
        self.assertEqual(idle_upstream(gateway), [])
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        self.assertEqual([r.connection for r in upstream.received], [0, 1])

    async def test_connection_close_from_upstream_is_not_pooled(self) -> None:
        """An upstream response with `Connection: close` leaves nothing in the pool."""
        gateway, upstream, port = await gateway_with_upstream(
            self, fixed(headers=[(b"Connection", b"close")])
        )
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        await upstream.wait_for_disconnections(1)
        await self.settled(gateway, idle=0)
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        self.assertEqual([r.connection for r in upstream.received], [0, 1])


class RetryTests(UpstreamTestCase):
    """A dead pooled connection is retried once, only when that is safe."""

    async def test_upstream_closes_idle_connection_after_response(self) -> None:
        """The upstream closes after a response without saying so; the next GET still succeeds."""

        def respond_then_close(ex: Exchange) -> None:
            ex.respond(200, [(b"Content-Length", b"2")], b"ok")
            ex.close()

        _gateway, upstream, port = await gateway_with_upstream(self, function(respond_then_close))
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assertEqual((response.status, response.body), (200, b"ok"))
        self.assertEqual([r.connection for r in upstream.received], [0, 1])

    async def test_get_on_dead_pooled_connection_is_retried_once(self) -> None:
        """A reused connection closed before any response byte: the GET is retried on a fresh one."""
        gateway, upstream, port = await gateway_with_upstream(
            self, sequence(fixed(), close_connection("before_status"), fixed(body=b"retried"))
        )
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assertEqual((response.status, response.body), (200, b"retried"))
        self.assertEqual([r.connection for r in upstream.received], [0, 0, 1])
        await self.settled(gateway, idle=1)

    async def test_retry_happens_only_once(self) -> None:
        """When the fresh connection dies too, the client gets a 502, not a second retry."""
        gateway, upstream, port = await gateway_with_upstream(
            self, sequence(fixed(), close_connection("before_status"))
        )
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assert_gateway_error(gateway, response, 502, "upstream_reset")
        self.assertEqual([r.connection for r in upstream.received], [0, 0, 1])
        await self.settled(gateway, idle=0)

    async def test_post_with_body_is_not_retried(self) -> None:
        """A POST whose body went out on a dead pooled connection answers 502, never resent."""
        gateway, upstream, port = await gateway_with_upstream(
            self, sequence(fixed(), close_connection("before_status"), fixed(body=b"resent!"))
        )
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).status, 200)
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"POST /orders HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello",
        )
        self.assert_gateway_error(gateway, response, 502, "upstream_reset")
        self.assertEqual([r.method for r in upstream.received], [b"GET", b"POST"])
        await self.settled(gateway, idle=0)


class UpstreamErrorTests(UpstreamTestCase):
    """Each upstream failure has its status, cause header, JSON body and access-log record."""

    async def test_connect_refused_is_503(self) -> None:
        """Nothing listening upstream: 503 upstream_connect_failure."""
        port = free_port()
        gateway = Gateway(self, {"api.yaml": simple_api(port, free_port())})
        gateway.start()
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assert_gateway_error(gateway, response, 503, "upstream_connect_failure")
        await self.settled(gateway, idle=0)

    async def test_unresolvable_name_is_502_dns_failure(self) -> None:
        """A Service whose name does not resolve (the reactor's name resolver replaced by a
        StaticResolver that knows no name: no DNS query leaves the test): 502 dns_failure on
        every request, in the access log and the metrics; one warning naming the name and the
        resolver's error, not one per request."""
        resolver = StaticResolver({})
        previous = reactor.installNameResolver(resolver)
        self.addCleanup(reactor.installNameResolver, previous)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port, upstream_port = free_port(), free_port()
        conf = simple_api(port, upstream_port).replace(
            f"127.0.0.1:{upstream_port}", "backend.invalid:8080"
        )
        gateway = Gateway(self, {"api.yaml": conf})
        gateway.start()
        for _ in range(3):
            response = await client.request(reactor, "127.0.0.1", port, GET)
            self.assert_gateway_error(gateway, response, 502, "dns_failure")
        self.assertEqual([r["error"] for r in gateway.records()], ["dns_failure"] * 3)
        self.assertEqual(resolver.lookups, ["backend.invalid"] * 3)
        self.assertEqual(
            {key[2:]: n for key, n in gateway.service.metrics.requests.items()},
            {(502, "dns_failure"): 3},
        )
        logged = [formatEvent(e) for e in events if "Name lookup" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("backend.invalid", logged[0])
        self.assertIn("DNS lookup failed", logged[0])
        self.assertEqual(pool_counts(gateway), [])  # a name never resolved has no address

    async def test_keepalive_survives_connect_failure(self) -> None:
        """A 503 for a body-less request keeps the client connection usable."""
        port = free_port()
        gateway = Gateway(self, {"api.yaml": simple_api(port, free_port())})
        gateway.start()
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        for _ in range(2):
            conn.send(GET)
            response = await conn.read_final_response()
            self.assertEqual(response.status, 503)
        self.assertFalse(conn.closed)

    async def test_upstream_response_timeout_is_504(self) -> None:
        """No response within upstreamResponseSeconds: 504 upstream_timeout; the upstream is dropped."""
        gateway, upstream, port = await gateway_with_upstream(
            self, never(), config=timeouts(upstreamResponseSeconds=0.3)
        )
        started = reactor.seconds()  # type: ignore[attr-defined]
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assert_gateway_error(gateway, response, 504, "upstream_timeout")
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)  # type: ignore[attr-defined]
        await upstream.wait_for_disconnections(1)
        await self.settled(gateway, idle=0)

    async def test_stream_idle_mid_body_aborts_client(self) -> None:
        """The upstream stalls mid-body: after streamIdleSeconds the client connection is cut."""

        def stall(ex: Exchange) -> None:
            ex.send_head(200, [(b"Content-Length", b"100")])
            ex.write(b"x" * 10)

        gateway, upstream, port = await gateway_with_upstream(
            self, function(stall), config=timeouts(streamIdleSeconds=0.3)
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(GET)
        failure = await self.assertFailure(conn.read_final_response(), client.IncompleteResponse)
        self.assertEqual(failure.partial.status, 200)
        self.assertEqual(failure.partial.body_length, 10)
        await upstream.wait_for_disconnections(1)
        self.assertEqual(gateway.records()[-1]["error"], "stream_idle_timeout")
        await self.settled(gateway, idle=0)

    async def test_upstream_reset_before_response_is_502(self) -> None:
        """The upstream resets a fresh connection before answering: 502 upstream_reset."""
        gateway, upstream, port = await gateway_with_upstream(
            self, close_connection("before_status", abort=True)
        )
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assert_gateway_error(gateway, response, 502, "upstream_reset")
        self.assertEqual(len(upstream.connections), 1)  # a fresh connection is not retried
        await self.settled(gateway, idle=0)

    async def test_upstream_close_after_status_line_is_502(self) -> None:
        """The upstream closes after a partial head: 502 upstream_reset, nothing half-forwarded."""
        gateway, _upstream, port = await gateway_with_upstream(self, close_connection("after_status"))
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assert_gateway_error(gateway, response, 502, "upstream_reset")

    async def test_malformed_response_is_502(self) -> None:
        """Each malformed upstream response yields 502 upstream_bad_response."""
        for kind in ("garbage", "bad_version", "duplicate_content_length", "cl_and_te", "obs_fold"):
            gateway, _upstream, port = await gateway_with_upstream(self, malformed(kind))
            response = await client.request(reactor, "127.0.0.1", port, GET)
            self.assert_gateway_error(gateway, response, 502, "upstream_bad_response")
            await self.settled(gateway, idle=0)

    async def test_oversized_response_head_is_502(self) -> None:
        """An upstream head that never ends is cut at 64 KiB: 502, not unbounded buffering."""
        sent = [0]

        def flood(ex: Exchange) -> None:
            ex.write_raw(b"HTTP/1.1 200 OK\r\n")

            def more() -> None:
                if sent[0] < 200 and ex.connection.connected:
                    sent[0] += 1
                    ex.write_raw(b"X-Flood-%d: %s\r\n" % (sent[0], b"a" * 8000))
                    reactor.callLater(0, more)  # type: ignore[attr-defined]

            more()

        gateway, upstream, port = await gateway_with_upstream(self, function(flood))
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assert_gateway_error(gateway, response, 502, "upstream_bad_response")
        await upstream.wait_for_disconnections(1)
        self.assertLess(sent[0], 20)

    async def test_large_response_head_within_limit(self) -> None:
        """A 40 KiB response head is forwarded whole."""
        headers = [(b"X-Big-%d" % i, b"b" * 4000) for i in range(10)]
        _gateway, _upstream, port = await gateway_with_upstream(self, fixed(headers=headers))
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("x-big-9"), [b"b" * 4000])

    async def test_malformed_body_in_the_head_read_is_a_502(self) -> None:
        """A bad chunk in the same read as the head: the head never left, so the client gets a
        clean 502 (not the upstream's status line followed by a cut)."""
        gateway, _upstream, port = await gateway_with_upstream(self, malformed("bad_chunk"))
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(GET)
        response = await conn.read_final_response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_bad_response"])
        self.assertEqual(conn.received_raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(gateway.records()[-1]["error"], "upstream_bad_response")
        await self.settled(gateway, idle=0)

    async def test_upstream_close_mid_body_cuts_client(self) -> None:
        """A Content-Length body cut short upstream: the client connection is cut, not completed."""
        gateway, _upstream, port = await gateway_with_upstream(self, close_connection("mid_body"))
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(GET)
        failure = await self.assertFailure(conn.read_final_response(), client.IncompleteResponse)
        if failure.partial is not None:  # the cut may also drop what was still buffered
            self.assertEqual(failure.partial.status, 200)
            self.assertLess(failure.partial.body_length, 100)
        self.assertEqual(gateway.records()[-1]["error"], "upstream_reset")
        await self.settled(gateway, idle=0)

    async def test_upstream_close_mid_chunked_body_has_no_final_chunk(self) -> None:
        """A chunked body cut short upstream: the client never sees a terminating chunk."""

        def cut(ex: Exchange) -> None:
            ex.send_head(200, [(b"Transfer-Encoding", b"chunked")])
            ex.write(b"partial")
            ex.close()

        gateway, _upstream, port = await gateway_with_upstream(self, function(cut))
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(GET)
        await self.assertFailure(conn.read_final_response(), client.IncompleteResponse)
        self.assertNotIn(b"0\r\n\r\n", conn.received_raw)
        self.assertEqual(gateway.records()[-1]["error"], "upstream_reset")

    async def test_close_delimited_body_completes(self) -> None:
        """An upstream body delimited by close is complete, re-framed chunked for HTTP/1.1."""

        def until_close(ex: Exchange) -> None:
            ex.write_raw(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
            ex.close()

        gateway, _upstream, port = await gateway_with_upstream(self, function(until_close))
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assertEqual((response.status, response.body, response.chunked), (200, b"all of it", True))
        self.assertIsNone(gateway.records()[-1]["error"])
        await self.settled(gateway, idle=0)


class DownstreamAbortTests(UpstreamTestCase):
    """A client that goes away takes its upstream connection with it."""

    async def test_client_disconnects_mid_request_body(self) -> None:
        """Client gone mid-body: the upstream connection is closed, not returned to the pool."""
        gateway, upstream, port = await gateway_with_upstream(self)
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        await upstream.wait_for_heads(1)
        await conn.abort()
        await upstream.wait_for_disconnections(1)
        self.assertFalse(upstream.received[0].complete)
        await self.settled(gateway, idle=0)
        self.assertEqual(gateway.records()[-1]["error"], "downstream_reset")

    async def test_client_disconnects_while_waiting_for_response(self) -> None:
        """Client gone while the upstream thinks: the upstream connection is closed."""
        held = Held()
        gateway, upstream, port = await gateway_with_upstream(self, held.responder)
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(GET)
        await held.wait(1)
        await conn.abort()
        await upstream.wait_for_disconnections(1)
        await self.settled(gateway, idle=0)

    async def test_client_disconnects_mid_response_body(self) -> None:
        """Client gone while a large response streams: the upstream connection is closed."""
        gateway, upstream, port = await gateway_with_upstream(
            self, stream(64 << 20), retain_bodies=False
        )
        conn = await client.connect(reactor, "127.0.0.1", port, retain_body=False)
        conn.send(GET)
        await upstream.wait_for_requests(1)
        await conn.abort()
        await upstream.wait_for_disconnections(1)
        await self.settled(gateway, idle=0)


class ResponseFramingTests(UpstreamTestCase):
    """Responses without bodies, interim responses and early answers keep both sides in step."""

    async def test_head_response_then_reuse(self) -> None:
        """HEAD with Content-Length: no body forwarded, and the pooled connection stays in step."""
        gateway, upstream, port = await gateway_with_upstream(self, fixed(body=b"0123456789"))
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"HEAD /items HTTP/1.1\r\nHost: example.test\r\n\r\n")
        head = await conn.read_final_response(head=True)
        self.assertEqual((head.status, head.header("content-length"), head.body), (200, [b"10"], b""))
        conn.send(GET)
        response = await conn.read_final_response()
        self.assertEqual(response.body, b"0123456789")
        self.assertEqual([r.connection for r in upstream.received], [0, 0])
        await self.settled(gateway, idle=1)

    async def test_204_and_304_then_reuse(self) -> None:
        """Bodiless statuses end at their head; the next response on the connection is intact."""
        _gateway, upstream, port = await gateway_with_upstream(
            self, sequence(fixed(204, body=b""), fixed(304, body=b""), fixed(body=b"third"))
        )
        statuses = []
        for _ in range(3):
            response = await client.request(reactor, "127.0.0.1", port, GET)
            statuses.append((response.status, response.body))
        self.assertEqual(statuses, [(204, b""), (304, b""), (200, b"third")])
        self.assertEqual([r.connection for r in upstream.received], [0, 0, 0])

    async def test_100_continue_relayed(self) -> None:
        """Expect: 100-continue: the upstream's 100 reaches the client, then the body flows."""
        from flexgw.testing.upstream import continue_then, echo

        gateway, _upstream, port = await gateway_with_upstream(self, continue_then(echo()))
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(
            b"PUT /doc HTTP/1.1\r\nHost: example.test\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        interim = await conn.read_response()
        self.assertEqual(interim.status, 100)
        conn.send(b"hello")
        response = await conn.read_final_response()
        self.assertEqual((response.status, response.body), (200, b"hello"))
        await self.settled(gateway, idle=1)

    async def test_early_response_during_upload(self) -> None:
        """The upstream answers 413 before the body ends: the client gets it, nothing is reused."""

        class Refuse(Responder):
            """Answers 413 as soon as the head arrives."""

            def on_headers(self, ex: Exchange) -> None:
                """Refuse before reading the body."""
                ex.respond(413, [(b"Content-Length", b"0")])

        gateway, upstream, port = await gateway_with_upstream(self, Refuse(), retain_bodies=False)
        size = 32 << 20
        result = await client.stream_exchange(
            reactor, "127.0.0.1", port,
            b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % size, size,
        )
        self.assertEqual(result.response.status, 413)
        self.assertFalse(result.response.keep_alive)
        self.assertLess(result.sent, size)
        await upstream.wait_for_disconnections(1)
        await self.settled(gateway, idle=0)

    async def test_http10_client_gets_close_delimited_body(self) -> None:
        """A chunked upstream body reaches an HTTP/1.0 client de-chunked, ended by close."""
        gateway, _upstream, port = await gateway_with_upstream(self, fixed(body=b"chunky", chunked=True))
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /items HTTP/1.0\r\nHost: example.test\r\n\r\n"
        )
        self.assertEqual((response.status, response.body, response.chunked), (200, b"chunky", False))
        self.assertTrue(response.close_delimited)
        await self.settled(gateway, idle=1)


class UnsolicitedBytesTests(UpstreamTestCase):
    """Bytes an upstream sends beyond its response never answer a later request."""

    EXTRA = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    )

    async def test_extra_response_not_given_to_pipelined_request(self) -> None:
        """A second, unsolicited response in the same read is not the answer to the next request."""
        _gateway, upstream, port = await gateway_with_upstream(
            self, sequence(raw(self.EXTRA, close=False), fixed(body=b"good"))
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET + GET)
        bodies = [(await conn.read_final_response()).body for _ in range(2)]
        self.assertEqual(bodies, [b"ok", b"good"])
        self.assertEqual([r.connection for r in upstream.received], [0, 1])

    async def test_connection_with_extra_bytes_not_reused(self) -> None:
        """The upstream connection that sent bytes beyond its response is closed, not pooled."""
        _gateway, upstream, port = await gateway_with_upstream(
            self, sequence(raw(self.EXTRA, close=False), fixed(body=b"good"))
        )
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).body, b"ok")
        await upstream.wait_for_disconnections(1)
        self.assertEqual((await client.request(reactor, "127.0.0.1", port, GET)).body, b"good")
        self.assertEqual([r.connection for r in upstream.received], [0, 1])

    async def test_body_after_head_response_not_forwarded(self) -> None:
        """A body wrongly sent for HEAD reaches no one, and the connection is not reused."""
        _gateway, upstream, port = await gateway_with_upstream(
            self,
            sequence(
                raw(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nHTTP/1.1", close=False),
                fixed(body=b"good"),
            ),
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"HEAD /items HTTP/1.1\r\nHost: example.test\r\n\r\n" + GET)
        head = await conn.read_final_response(head=True)
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual((await conn.read_final_response()).body, b"good")
        self.assertEqual([r.connection for r in upstream.received], [0, 1])


class RetryFreshTests(UpstreamTestCase):
    """The one retry goes to a new connection, never to another pooled one."""

    async def test_retry_skips_other_pooled_connections(self) -> None:
        """Two pooled connections both dead (upstream restarted): the retry still succeeds."""
        held = Held()
        seen = [0]

        def respond(ex: Exchange) -> None:
            seen[0] += 1
            if seen[0] <= 2:
                held.responder.respond(ex)
            elif ex.request.connection < 2:
                ex.close()  # a pooled connection the upstream has dropped
            else:
                ex.respond(200, [(b"Content-Length", b"5")], b"fresh")

        gateway, upstream, port = await gateway_with_upstream(self, function(respond))
        first = client.request(reactor, "127.0.0.1", port, GET)
        second = client.request(reactor, "127.0.0.1", port, GET)
        await held.wait(2)
        held.answer_all()
        await defer.gatherResults([first, second])
        await self.settled(gateway, idle=2)
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assertEqual((response.status, response.body), (200, b"fresh"))
        self.assertEqual(len(upstream.connections), 3)


class UpstreamTrailerBoundTests(TestCase):
    """Response trailers are bounded like a head: httptools would buffer a huge one whole."""

    async def test_huge_response_trailer_cuts_the_exchange(self) -> None:
        """A 1 MiB trailer field after the last chunk is refused, not buffered: the client is
        cut (its head already left) and the cause is logged."""
        trailer = b"X-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
        body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        responder = raw(body + b"0\r\n" + trailer, close=False)
        gateway, _upstream, port = await gateway_with_upstream(self, responder)
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(GET)
        await self.assertFailure(conn.read_final_response(), client.IncompleteResponse)
        self.assertNotIn(b"0\r\n\r\n", conn.received_raw)
        self.assertEqual(gateway.records()[-1]["error"], "upstream_bad_response")


class UnsentHeadTests(TestCase):
    """An upstream failure before any byte reached the client is a clean 502, not a cut."""

    async def test_body_then_bad_chunk_in_one_read_is_a_502(self) -> None:
        """Head, a good chunk and then a malformed chunk size arrive together: nothing had been
        sent to the client yet, so it gets a 502 instead of a truncated 200."""
        data = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nxx\r\n"
        )
        gateway, _upstream, port = await gateway_with_upstream(self, raw(data, close=False))
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(GET)
        response = await conn.read_final_response()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_bad_response"])
        self.assertNotIn(b"hello", conn.received_raw)
        self.assertEqual(gateway.records()[-1]["error"], "upstream_bad_response")
