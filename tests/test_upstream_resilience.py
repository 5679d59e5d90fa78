"""Retries, outlier ejection and active health checks over real sockets: three recording
upstreams on 127.0.0.2-4 behind one name, one killed, slow, answering 503s or brought back
under a bounded client loop."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet import defer, reactor

from flexgw.service.admin import admin_site
from flexgw.testing import client
from flexgw.testing.cluster import load
from flexgw.testing.upstream import (
    Exchange,
    close_connection,
    delayed,
    fixed,
    function,
    never,
)
from tests.conftools import HEADER
from tests.test_admin import samples
from tests.test_upstream_cluster import NAME, ClusterCase


def service_policy(kind: str, config: str, name: str = "") -> str:
    """A PolicyBinding of `kind` on the `orders` Service; `config` is YAML lines (indent 4)."""
    return (
        f"{HEADER}kind: PolicyBinding\nmetadata:\n  name: {name or kind}\nspec:\n"
        f"  targetRef:\n    kind: Service\n    name: orders\n"
        f"  policyRef:\n    name: {kind}\n  config:\n{config}"
    )


RETRY = "    retries: 2\n    retryOn: [connect-failure, reset, timeout]\n"


def gather(*policies: str) -> str:
    """Several YAML documents in one file."""
    return "---\n".join(policies)


class RetryTests(ClusterCase):
    """`upstream-retry`: failed tries go to another address; the client sees none of them."""

    async def test_kill_one_of_three_under_load(self) -> None:
        """300 GETs, 6 at a time; one of three upstreams is killed after the 60th answer: every
        request gets a 200 (connect failures and resets are retried on another address), and
        outlier detection takes the dead one out of rotation."""
        config = gather(
            service_policy("upstream-retry", RETRY),
            service_policy(
                "upstream-outlier-detection", "    consecutiveErrors: 2\n    maxEjectionPercent: 50\n"
            ),
        )
        gateway, upstreams, port = self.start(config=config)
        killed: list[defer.Deferred[None]] = []

        def on_response(n: int, status: int) -> None:
            if n == 60:
                killed.append(defer.ensureDeferred(upstreams.kill(1)))

        statuses = await load(reactor, port, 300, 6, on_response=on_response)
        await killed[0]
        self.assertEqual(statuses, {200: 300})
        records = gateway.records()
        self.assertEqual(len(records), 300)
        retried = [r for r in records if "x-flexgw-attempts" in r]
        self.assertTrue(all(r["x-flexgw-attempts"] >= 2 for r in retried))
        [cluster] = gateway.service.pools.clusters.values()
        dead = cluster.members[(upstreams.hosts[1], upstreams.port)]
        self.assertEqual(dead.state(), "ejected")
        self.assertGreaterEqual(dead.failures, 2)

    async def test_503_retried_elsewhere(self) -> None:
        """One upstream answers 503: its requests are retried on the others; no client sees a
        503, and the access log counts two tries for each of those requests."""
        gateway, upstreams, port = self.start(
            responders=(None, fixed(503, body=b"busy"), None),
            config=service_policy("upstream-retry", RETRY),
        )
        statuses = await load(reactor, port, 30, 3)
        self.assertEqual(statuses, {200: 30})
        self.assertGreaterEqual(upstreams.counts()[1], 9)  # round robin still sent it its share
        attempts = [r.get("x-flexgw-attempts", 1) for r in gateway.records()]
        self.assertEqual(attempts.count(2), upstreams.counts()[1])

    async def test_retry_bound_to_the_api(self) -> None:
        """upstream-retry bound to the ApiInstance applies to the Services it routes to: one
        upstream answering 503, no client sees it; it does not run as a chain policy."""
        binding = service_policy("upstream-retry", RETRY).replace(
            "kind: Service\n    name: orders", "kind: ApiInstance\n    name: shop"
        )
        gateway, upstreams, port = self.start(
            responders=(None, fixed(503, body=b"busy"), None), config=binding
        )
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        self.assertEqual(await load(reactor, port, 30, 3), {200: 30})
        [api] = gateway.service.plan.listeners[0].apis
        self.assertEqual(api.policies, ())
        attempts = [r.get("x-flexgw-attempts", 1) for r in gateway.records()]
        self.assertEqual(attempts.count(2), upstreams.counts()[1])

    async def test_retry_after_too_long_is_not_waited_for(self) -> None:
        """A 503 with `Retry-After: 5` beyond retryAfterMaxSeconds (0): no retry, the client
        gets the 503."""
        responder = fixed(503, headers=((b"Retry-After", b"5"),), body=b"later")
        _, upstreams, port = self.start(
            responders=(responder, responder, responder),
            config=service_policy("upstream-retry", RETRY),
        )
        self.assertEqual(await load(reactor, port, 3, 1), {503: 3})
        self.assertEqual(sum(upstreams.counts()), 3)

    async def test_no_retry_after_response_bytes(self) -> None:
        """An upstream that sends a 200 head and part of the body, then resets: the client is
        cut off (a response byte went out), and nothing is retried."""
        responder = close_connection("mid_body")
        gateway, upstreams, port = self.start(
            responders=(responder, responder, responder),
            config=service_policy("upstream-retry", RETRY),
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        await self.assertFailure(conn.read_final_response(), client.IncompleteResponse)
        self.assertEqual(sum(upstreams.counts()), 1)
        self.assertEqual(gateway.records()[0]["error"], "upstream_reset")
        self.assertNotIn("x-flexgw-attempts", gateway.records()[0])

    async def test_post_not_retried_after_reset(self) -> None:
        """A POST whose connection is reset before the response is not retried (it may have
        been processed): 502 upstream_reset after one try."""
        responder = close_connection("before_status", abort=True)
        _gateway, upstreams, port = self.start(
            responders=(responder, responder, responder),
            config=service_policy("upstream-retry", RETRY),
        )
        post = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
        response = await client.request(reactor, "127.0.0.1", port, post)
        self.assertEqual(response.status, 502)
        self.assertEqual(sum(upstreams.counts()), 1)

    async def test_put_body_replayed(self) -> None:
        """A small PUT body received whole is replayed on the retry, unchanged."""
        tries: list[bytes] = []

        def first_busy(ex: Exchange) -> None:
            tries.append(ex.request.body or b"")
            status, body = (503, b"busy") if len(tries) == 1 else (200, b"stored")
            ex.respond(status, [(b"Content-Length", b"%d" % len(body))], body)

        _gateway, _upstreams, port = self.start(
            responders=(function(first_busy),) * 3,
            config=service_policy("upstream-retry", RETRY),
        )
        put = b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        response = await client.request(reactor, "127.0.0.1", port, put)
        self.assertEqual((response.status, response.body), (200, b"stored"))
        self.assertEqual(tries, [b"hello", b"hello"])

    async def test_per_try_timeout(self) -> None:
        """An upstream that never answers: after perTryTimeoutSeconds the request is retried on
        another address and answered."""
        gateway, upstreams, port = self.start(
            responders=(never(), None, None),
            config=service_policy("upstream-retry", RETRY + "    perTryTimeoutSeconds: 0.2\n"),
        )
        statuses = await load(reactor, port, 6, 2)
        self.assertEqual(statuses, {200: 6})
        self.assertGreaterEqual(upstreams.counts()[0], 1)
        attempts = [r.get("x-flexgw-attempts", 1) for r in gateway.records()]
        self.assertEqual(attempts.count(2), upstreams.counts()[0])

    async def test_budget_stops_retry_storm(self) -> None:
        """Every upstream down: 60 requests, 10 at a time, retries: 3. Without a budget that is
        180 retries; the budget (20 % of requests in flight, at least 1 at once) admits far
        fewer, counts the refusals, and every client gets 503 upstream_connect_failure."""
        config = service_policy(
            "upstream-retry",
            "    retries: 3\n    retryOn: [connect-failure]\n"
            "    backoff: {baseMilliseconds: 20, maxMilliseconds: 40}\n"
            "    budget: {percent: 20, minConcurrency: 1}\n",
        )
        gateway, upstreams, port = self.start(config=config)
        await upstreams.stop()
        statuses = await load(reactor, port, 60, 10)
        self.assertEqual(statuses, {503: 60})
        [cluster] = gateway.service.pools.clusters.values()
        retries = sum(m.retries for m in cluster.members.values())
        self.assertLess(retries, 60)
        self.assertGreater(cluster.budget.exhausted, 0)
        self.assertEqual(cluster.budget.active, 0)
        self.assertEqual({r["error"] for r in gateway.records()}, {"upstream_connect_failure"})
        listening = reactor.listenTCP(0, admin_site(gateway.service), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        page = await client.request(
            reactor, "127.0.0.1", listening.getHost().port, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        got = samples(page.body)
        self.assertEqual(
            got[("flexgw_upstream_retry_budget_exhausted_total", (("upstream", "default/orders"),))],
            cluster.budget.exhausted,
        )


class BalanceTests(ClusterCase):
    """leastRequest against a slow address."""

    async def test_least_request_sends_less_to_slow(self) -> None:
        """One of three answers after 200 ms: with leastRequest it gets well under its third of
        150 requests sent 6 at a time (round robin would give it 50)."""
        slow = delayed(fixed(), 0.2, reactor)
        _, upstreams, port = self.start(
            "  loadBalancer:\n    algorithm: leastRequest\n", responders=(None, slow, None)
        )
        self.assertEqual(await load(reactor, port, 150, 6), {200: 150})
        counts = upstreams.counts()
        self.assertLess(counts[1], 25, counts)


class HealthTests(ClusterCase):
    """`upstream-health-check`: addresses leave and rejoin the rotation."""

    def watch(self, gateway: Any) -> tuple[Any, list[tuple[float, Any, bool]]]:
        """The cluster, and a list of (time, member, healthy) its checker's verdicts fill."""
        [cluster] = gateway.service.pools.clusters.values()
        seen: list[tuple[float, Any, bool]] = []
        verdict = cluster.health.verdict

        def spy(member: Any, ok: bool) -> None:
            verdict(member, ok)
            seen.append((reactor.seconds(), member, member.healthy))
            for entry in list(self.waiting):
                if entry[0](member):
                    self.waiting.remove(entry)
                    entry[1].callback(reactor.seconds())

        cluster.health.verdict = spy
        return cluster, seen

    def until(self, predicate: Any) -> defer.Deferred[float]:
        """Fires (with the time) after the first verdict for which `predicate(member)` holds."""
        d: defer.Deferred[float] = defer.Deferred()
        self.waiting.append((predicate, d))
        return d

    def setUp(self) -> None:
        """No waits yet."""
        self.waiting: list[tuple[Any, defer.Deferred[float]]] = []

    async def test_dead_leaves_rotation_and_comes_back(self) -> None:
        """Checks every 0.25 s, unhealthy after 2 failures: a killed upstream is out of rotation
        after exactly 2 failed checks, within about two check rounds, gets no request
        after that, and is back in rotation after it restarts. (The killed one fails by a
        refused connection; the check timeout, at most the interval, only has to let the live
        ones answer: at 0.1 s a loaded machine timed two of them out, and with one address of
        three healthy, panic mode sent a request to the dead one.)"""
        config = service_policy(
            "upstream-health-check",
            "    path: /health\n    intervalSeconds: 0.25\n    jitterPercent: 10\n"
            "    timeoutSeconds: 0.25\n    unhealthyThreshold: 2\n    healthyThreshold: 1\n",
        )
        gateway, upstreams, port = self.start(config=config)
        cluster, seen = self.watch(gateway)
        await self.until(
            lambda m: len(cluster.members) == 3
            and all(x.health_successes for x in cluster.members.values())
        )
        self.assertEqual(upstreams.upstreams[0].received[0].target, b"/health")
        self.assertEqual(
            upstreams.upstreams[0].received[0].header("host"), [f"{NAME}:{upstreams.port}".encode()]
        )
        dead = cluster.members[(upstreams.hosts[1], upstreams.port)]
        gone = self.until(lambda m: m is dead and not m.healthy)
        await upstreams.kill(1)
        killed = len(seen)
        await gone
        # Out after exactly unhealthyThreshold (2) failed checks, within about two intervals
        # counted in the checks of the live addresses (at most three each): the checker's own
        # time, which a loaded machine's late reactor stretches for every address alike
        # (the wheel keeps to wall-clock time: HealthWheelTests in test_upstream_balancing).
        after = seen[killed:]
        self.assertEqual([healthy for _, m, healthy in after if m is dead], [True, False])
        live = Counter(m for _, m, _ in after if m is not dead)
        self.assertLessEqual(max(live.values(), default=0), 3, after)
        before = upstreams.counts()[1]
        self.assertEqual(await load(reactor, port, 30, 3), {200: 30})
        self.assertEqual(upstreams.counts()[1], before)
        back = self.until(lambda m: m is dead and m.healthy)
        upstreams.restart(1)
        await back
        self.assertEqual(await load(reactor, port, 30, 3), {200: 30})
        self.assertGreater(upstreams.counts()[1], before)

    async def test_all_unhealthy_fail_open_or_503(self) -> None:
        """Every address failing its check (404 on the check path): requests still go to all
        of them (fail open, panic mode) by default; with whenNoneHealthy: reject they get
        503 no_healthy_upstream."""

        def answer(ex: Exchange) -> None:
            status = 404 if ex.request.target == b"/health" else 200
            ex.respond(status, [(b"Content-Length", b"2")], b"ok")

        responders = (function(answer),) * 3
        config = service_policy(
            "upstream-health-check",
            "    path: /health\n    intervalSeconds: 0.05\n    unhealthyThreshold: 1\n"
            "    timeoutSeconds: 0.05\n",
        )
        for extra, expected in (("", {200: 6}), ("    whenNoneHealthy: reject\n", {503: 6})):
            gateway, upstreams, port = self.start(
                "  loadBalancer:\n" + (extra or "    algorithm: roundRobin\n"),
                responders=responders,
                config=config,
            )
            cluster, _ = self.watch(gateway)
            await self.until(
                lambda m, c=cluster: len(c.members) == 3
                and not any(x.healthy for x in c.members.values())
            )
            self.assertEqual(await load(reactor, port, 6, 2), expected)
            if expected == {503: 6}:
                self.assertEqual({r["error"] for r in gateway.records()}, {"no_healthy_upstream"})
            await gateway.stop()
            await upstreams.stop()

    async def test_h2c_and_tcp_checks(self) -> None:
        """An h2c Service is checked over HTTP/2 (`:path` /health, `:authority` the Service's);
        a `type: tcp` check passes on a connect alone and fails when the address is gone."""
        config = service_policy(
            "upstream-health-check", "    path: /health\n    intervalSeconds: 0.1\n"
        )
        gateway, upstreams, port = self.start(config=config, scheme="h2c")
        cluster, _ = self.watch(gateway)
        await self.until(
            lambda m: len(cluster.members) == 3
            and all(x.health_successes for x in cluster.members.values())
        )
        first = upstreams.upstreams[0].received[0]
        self.assertEqual(first.target, b"/health")
        self.assertEqual(first.header(":authority"), [f"{NAME}:{upstreams.port}".encode()])
        self.assertEqual(await load(reactor, port, 3, 1), {200: 3})
        await gateway.stop()
        await upstreams.stop()

        config = service_policy(
            "upstream-health-check",
            "    type: tcp\n    intervalSeconds: 0.1\n    unhealthyThreshold: 1\n",
        )
        gateway, upstreams, port = self.start(config=config)
        cluster, _ = self.watch(gateway)
        await self.until(
            lambda m: len(cluster.members) == 3
            and all(x.health_successes for x in cluster.members.values())
        )
        self.assertEqual(upstreams.counts(), [0, 0, 0])  # no HTTP request, only connects
        dead = cluster.members[(upstreams.hosts[2], upstreams.port)]
        gone = self.until(lambda m: m is dead and not m.healthy)
        await upstreams.kill(2)
        await gone

    async def test_tls_check_with_service_tls_settings(self) -> None:
        """An https Service with a tls-outbound binding (its own CA): the checks speak TLS with
        those settings (the certificate is checked for the Service's name) and pass."""
        import os

        from flexgw.testing.certs import CertificateAuthority, server_options
        from tests.outbound import outbound_binding

        ca = CertificateAuthority("upstream CA")
        ca_path = ca.write(os.path.abspath(self.mktemp()), "ca")
        issued = ca.issue("orders", dns=[NAME])
        tls_binding = outbound_binding(
            "orders-tls", "tls-outbound", f'trustedCA: "file://{ca_path}"', target="orders"
        )
        config = (
            service_policy("upstream-health-check", "    path: /health\n    intervalSeconds: 0.1\n")
            + tls_binding
        )
        gateway, upstreams, port = self.start(
            config=config, scheme="https", tls=server_options(issued)
        )
        cluster, _ = self.watch(gateway)
        await self.until(
            lambda m: len(cluster.members) == 3
            and all(x.health_successes for x in cluster.members.values())
        )
        self.assertEqual(upstreams.upstreams[1].received[0].target, b"/health")
        self.assertEqual(await load(reactor, port, 3, 1), {200: 3})
