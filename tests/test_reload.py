"""Reloading a running gateway: requests in flight, listeners kept or rebound, bad files survived."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import Gateway, free_port
from tests.probes import pool_counts
from tests.test_ingress_upstream import Held

HEADER = "apiVersion: gateway.mulesoft.com/v1alpha1\n"


def api(name: str, port: int, upstream_port: int, path_rule: str = "") -> str:
    """An inline ApiInstance on 127.0.0.1:`port` proxying to 127.0.0.1:`upstream_port`."""
    routes = ""
    if path_rule:
        routes = f"      routes:\n        - rules:\n            - path: {path_rule}\n"
    return (
        f"{HEADER}kind: ApiInstance\nmetadata:\n  name: {name}\nspec:\n"
        f"  address: http://127.0.0.1:{port}\n"
        f"  services:\n    backend:\n      address: http://127.0.0.1:{upstream_port}\n" + routes
    )


def get(path: str = "/items") -> bytes:
    """A GET request for `path`."""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: example.test\r\n\r\n"


class ReloadTestCase(TestCase):
    """Upstreams and a gateway per test."""

    timeout = 20

    def upstream(self, responder: object = None) -> RecordingUpstream:
        """A recording upstream, stopped at the end of the test."""
        server = RecordingUpstream(responder, reactor=reactor)  # type: ignore[arg-type]
        server.listen(reactor)
        self.addCleanup(server.stop)
        return server

    def gateway(self, files: dict[str, str]) -> Gateway:
        """A started gateway serving `files`."""
        gateway = Gateway(self, files)
        gateway.start()
        return gateway

    async def body(self, port: int, path: str = "/items") -> bytes:
        """The status and body of one GET through the gateway."""
        response = await client.request(reactor, "127.0.0.1", port, get(path))
        return b"%d %s" % (response.status, response.body)


class InFlightTests(ReloadTestCase):
    """Requests in flight finish on the plan they started with."""

    async def test_reload_loses_no_request_in_flight(self) -> None:
        """20 requests held at the old upstream complete after a reload that moves the route."""
        held = Held()
        old = self.upstream(held.responder)
        new = self.upstream(fixed(body=b"new"))
        port = free_port()
        gateway = self.gateway({"api.yaml": api("shop", port, old.address[1])})
        pending = [client.request(reactor, "127.0.0.1", port, get()) for _ in range(20)]
        await held.wait(20)
        gateway.write({"api.yaml": api("shop", port, new.address[1])})
        self.assertTrue(gateway.service.reload())
        self.assertEqual(await self.body(port), b"200 new")
        held.answer_all(b"old")
        responses = await defer.gatherResults(pending)
        self.assertEqual([(r.status, r.body) for r in responses], [(200, b"old")] * 20)
        self.assertEqual(len(old.received), 20)
        self.assertEqual(len(new.received), 1)
        statuses = [r["status"] for r in gateway.records()]
        self.assertEqual(statuses.count(200), 21)

    async def test_retired_upstream_connections_are_closed(self) -> None:
        """Connections to an upstream removed by a reload close once their requests finish."""
        held = Held()
        old = self.upstream(held.responder)
        new = self.upstream(fixed(body=b"new"))
        port = free_port()
        gateway = self.gateway({"api.yaml": api("shop", port, old.address[1])})
        pending = [client.request(reactor, "127.0.0.1", port, get()) for _ in range(3)]
        await held.wait(3)
        gateway.write({"api.yaml": api("shop", port, new.address[1])})
        self.assertTrue(gateway.service.reload())
        held.answer_all(b"old")
        await defer.gatherResults(pending)
        await old.wait_for_disconnections(3)
        self.assertEqual(old.open_connections(), [])

    async def test_open_client_connection_uses_new_routing(self) -> None:
        """A keep-alive client connection opened before the reload gets the new routing after it."""
        one = self.upstream(fixed(body=b"one"))
        two = self.upstream(fixed(body=b"two"))
        port = free_port()
        gateway = self.gateway({"api.yaml": api("shop", port, one.address[1])})
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(get())
        self.assertEqual((await conn.read_final_response()).body, b"one")
        gateway.write({"api.yaml": api("shop", port, two.address[1])})
        self.assertTrue(gateway.service.reload())
        conn.send(get())
        self.assertEqual((await conn.read_final_response()).body, b"two")

    async def test_new_route_added_by_reload(self) -> None:
        """A route added by a reload serves at once; the old one keeps serving."""
        orders = self.upstream(fixed(body=b"orders"))
        users = self.upstream(fixed(body=b"users"))
        port, port2 = free_port(), free_port()
        gateway = self.gateway({"orders.yaml": api("orders", port, orders.address[1])})
        self.assertEqual(await self.body(port), b"200 orders")
        gateway.write({"users.yaml": api("users", port2, users.address[1])})
        self.assertTrue(gateway.service.reload())
        self.assertEqual(await self.body(port), b"200 orders")
        self.assertEqual(await self.body(port2), b"200 users")


class ListenerTests(ReloadTestCase):
    """Listeners are kept, bound and closed as the configuration says."""

    async def test_unchanged_listener_kept_changed_one_rebound(self) -> None:
        """Same address: the same listening port object; a changed address: old closed, new bound."""
        up = self.upstream()
        keep, moved, moved_to = free_port(), free_port(), free_port()
        gateway = self.gateway(
            {"a.yaml": api("a", keep, up.address[1]), "b.yaml": api("b", moved, up.address[1])}
        )
        ports = dict(gateway.service.ports)
        gateway.write({"b.yaml": api("b", moved_to, up.address[1])})
        self.assertTrue(gateway.service.reload())
        self.assertIs(gateway.service.ports[("127.0.0.1", keep)], ports[("127.0.0.1", keep)])
        self.assertNotIn(("127.0.0.1", moved), gateway.service.ports)
        self.assertEqual(await self.body(keep), b"200 ok\n")
        self.assertEqual(await self.body(moved_to), b"200 ok\n")
        await self.assertFailure(client.connect(reactor, "127.0.0.1", moved), ConnectionRefusedError)

    async def test_kept_listener_keeps_its_connections(self) -> None:
        """A client connected to an unchanged listener stays connected across a reload."""
        up = self.upstream()
        port = free_port()
        gateway = self.gateway({"api.yaml": api("a", port, up.address[1])})
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        gateway.write({"api.yaml": api("a", port, up.address[1], path_rule="/items")})
        self.assertTrue(gateway.service.reload())
        conn.send(get())
        self.assertEqual((await conn.read_final_response()).status, 200)
        conn.send(get("/other"))
        self.assertEqual((await conn.read_final_response()).status, 404)

    async def test_removed_api_listener_closes(self) -> None:
        """Deleting an ApiInstance closes its listener; the other API keeps serving."""
        up = self.upstream()
        port_a, port_b = free_port(), free_port()
        gateway = self.gateway(
            {"a.yaml": api("a", port_a, up.address[1]), "b.yaml": api("b", port_b, up.address[1])}
        )
        self.assertEqual(await self.body(port_b), b"200 ok\n")
        gateway.write({"b.yaml": None})  # type: ignore[dict-item]
        self.assertTrue(gateway.service.reload())
        await self.assertFailure(client.connect(reactor, "127.0.0.1", port_b), ConnectionRefusedError)
        self.assertEqual(await self.body(port_a), b"200 ok\n")
        self.assertEqual(sorted(gateway.service.ports), [("127.0.0.1", port_a)])


class BadConfigurationTests(ReloadTestCase):
    """A bad new configuration is reported and never stops or breaks what is served."""

    async def test_invalid_resource_reported_and_last_good_serves(self) -> None:
        """An invalid ApiInstance edit: reload is not ok, the problem has file:line:column, old serves."""
        one = self.upstream(fixed(body=b"one"))
        port = free_port()
        gateway = self.gateway({"api.yaml": api("shop", port, one.address[1])})
        good = api("shop", port, one.address[1])
        bad = good.replace(f"address: http://127.0.0.1:{one.address[1]}\n", "address: 42\n")
        self.assertNotEqual(bad, good)
        gateway.write({"api.yaml": bad})
        self.assertFalse(gateway.service.reload())
        self.assertFalse(gateway.service.last_reload_ok)
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(errors)
        problem = errors[0]
        self.assertTrue(problem.file.endswith("api.yaml"))
        self.assertIsNotNone(problem.line)
        self.assertIsNotNone(problem.column)
        self.assertRegex(str(problem), r"api\.yaml:\d+:\d+: error:")
        self.assertEqual(await self.body(port), b"200 one")
        self.flushLoggedErrors()

    async def test_broken_yaml_never_stops_the_gateway(self) -> None:
        """Unparseable YAML: reload is not ok, the gateway keeps serving; fixing it reloads fine."""
        one = self.upstream(fixed(body=b"one"))
        two = self.upstream(fixed(body=b"two"))
        port = free_port()
        gateway = self.gateway({"api.yaml": api("shop", port, one.address[1])})
        for broken in ("kind: [unclosed\n", "\x00\x01 not yaml: : :\n", "- [a\n  b: }\n"):
            gateway.write({"api.yaml": broken})
            gateway.service.reload()
            self.assertEqual(await self.body(port), b"200 one")
        gateway.write({"api.yaml": "kind: [unclosed\n"})
        self.assertFalse(gateway.service.reload())
        syntax = [p for p in gateway.service.state.problems if p.line is not None]
        self.assertTrue(any(p.file.endswith("api.yaml") for p in syntax))
        gateway.write({"api.yaml": api("shop", port, two.address[1])})
        self.assertTrue(gateway.service.reload())
        self.assertEqual(await self.body(port), b"200 two")
        self.assertEqual(pool_counts(gateway)[-1][1:], (0, 0))


class BindFailureTests(ReloadTestCase):
    """A listener that cannot be bound makes the reload not ok; the rest keeps serving."""

    async def test_port_in_use_reported_and_retried(self) -> None:
        """Reload adding an API on a busy port returns False; a later reload binds it once free."""
        from twisted.internet.protocol import Factory

        up = self.upstream(fixed(body=b"up"))
        port, busy = free_port(), free_port()
        occupier = reactor.listenTCP(busy, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(lambda: occupier.stopListening() if occupier.connected else None)
        gateway = self.gateway({"a.yaml": api("a", port, up.address[1])})
        gateway.write({"b.yaml": api("b", busy, up.address[1])})
        self.assertFalse(gateway.service.reload())
        self.assertFalse(gateway.service.last_reload_ok)
        self.assertEqual(await self.body(port), b"200 up")
        self.flushLoggedErrors()
        await occupier.stopListening()
        self.assertTrue(gateway.service.reload())
        self.assertEqual(await self.body(busy), b"200 up")
