"""Leader election on a Lease and the Ingress status writer (flexgw.config.sources.kubestatus),
against the in-test API server: two replicas elect one leader, fail over when it stops renewing
(client-go's 15s/10s/2s on a fake clock), and the leader alone writes and clears
status.loadBalancer.ingress of the Ingresses the gateway serves."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from flexgw.config.sources.kubestatus import (
    IngressStatus,
    LeaderElector,
    address_entries,
    served_ingresses,
    service_addresses,
)
from tests.test_kube_source import KubeSourceCase, ingress, service


class ElectionTests(KubeSourceCase):
    """Two replicas, one Lease, a fake clock for the election's timers."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.started: list[str] = []
        self.stopped: list[str] = []

    def elector(self, identity: str) -> LeaderElector:
        """A candidate with client-go's default durations on the fake clock."""
        elector = LeaderElector(
            self.clock, self.connect(), "flexgw", "flexgw-leader", identity,
            wall=self.clock.seconds,
            on_started=lambda: self.started.append(identity),
            on_stopped=lambda: self.stopped.append(identity),
        )
        self.addCleanup(elector.stop, False)
        return elector

    async def step(self, *electors: LeaderElector, seconds: float = 2.0) -> None:
        """Advance the clock one retry period and wait for each elector's attempt."""
        self.clock.advance(seconds)
        for elector in electors:
            if elector.round is not None:
                await elector.round

    def lease(self) -> dict[str, Any]:
        """The Lease's spec as stored."""
        lease = self.api.get("coordination.k8s.io/v1", "Lease", "flexgw", "flexgw-leader")
        assert lease is not None
        return lease["spec"]  # type: ignore[no-any-return]

    async def test_one_leader_then_failover(self) -> None:
        """A takes the Lease, B follows; A stops renewing (hung): B takes over only once 15s
        passed since it last saw the Lease change, and the transition is counted."""
        a, b = self.elector("a"), self.elector("b")
        a.start()
        await a.round
        b.start()
        await b.round
        for _ in range(3):
            await self.step(a, b)
        self.assertEqual((a.leader, b.leader, b.holder), (True, False, "a"))
        self.assertEqual((self.lease()["holderIdentity"], self.lease()["leaseDurationSeconds"]), ("a", 15))
        a.stop(release=False)  # a hung leader: no renewal, no release
        waited = 0.0
        while not b.leader:
            await self.step(b)
            waited += 2
            self.assertLessEqual(waited, 20)
        self.assertGreaterEqual(waited, 14)
        self.assertEqual((self.lease()["holderIdentity"], self.lease()["leaseTransitions"]), ("b", 1))
        self.assertEqual(self.started, ["a", "b"])

    async def test_leader_that_cannot_renew_steps_down(self) -> None:
        """A leader whose renewals fail (its token revoked) stops leading after the 10s renew
        deadline; a released Lease is taken at the other's next try."""
        a = self.elector("a")
        a.start()
        await a.round
        self.api.revoke("t1")
        for _ in range(4):
            await self.step(a)
        self.assertTrue(a.leader)  # 8s: within the renew deadline
        for _ in range(2):
            await self.step(a)
        self.assertFalse(a.leader)
        self.assertEqual(self.stopped, ["a"])

    async def test_release_on_stop(self) -> None:
        """A leader stopping cleanly releases the Lease: the other takes it at its next try."""
        a, b = self.elector("a"), self.elector("b")
        a.start()
        await a.round
        b.start()
        await b.round
        await a.stop()
        await self.step(b)
        self.assertTrue(b.leader)


class IngressStatusTests(KubeSourceCase):
    """The leader writes and clears Ingress status; a follower writes nothing."""

    async def test_leader_writes_and_clears(self) -> None:
        """Served Ingresses get the published addresses; one switched to another class is cleared;
        another controller's Ingress is never touched; a non-leader never writes."""
        clock = Clock()
        connection = self.connect()
        leader = LeaderElector(clock, connection, "flexgw", "flexgw-leader", "a", wall=clock.seconds)
        follower = LeaderElector(clock, connection, "flexgw", "flexgw-leader", "b", wall=clock.seconds)
        for elector in (leader, follower):
            self.addCleanup(elector.stop, False)
            elector.start()
            await elector.round
        self.api.put(service(self.up))
        self.api.put(ingress("web", "/orders", self.up))
        theirs = ingress("theirs", "/theirs", self.up)
        theirs["spec"]["ingressClassName"] = "nginx"
        self.api.put(theirs)
        gateway = self.start()
        await self.until(self.serves("shop/web"))
        writers = [
            IngressStatus(connection, elector, self.source.ingresses, lambda: served_ingresses(gateway.plan),
                          publish_addresses=["192.0.2.10", "lb.example"])
            for elector in (follower, leader)
        ]
        await writers[0].sync()
        self.assertEqual(writers[0].writes, 0)
        self.assertEqual(self.api.get("networking.k8s.io/v1", "Ingress", "shop", "web")["status"], {})
        await writers[1].sync()
        want = [{"ip": "192.0.2.10"}, {"hostname": "lb.example"}]
        web = self.api.get("networking.k8s.io/v1", "Ingress", "shop", "web")
        self.assertEqual(web["status"], {"loadBalancer": {"ingress": want}})
        self.assertEqual(self.api.get("networking.k8s.io/v1", "Ingress", "shop", "theirs")["status"], {})
        moved = ingress("web", "/orders", self.up)
        moved["spec"]["ingressClassName"] = "nginx"
        self.api.put(moved)
        await self.until(lambda: not self.serves("shop/web")()
                         and self.source.ingresses() and all(
                             o["metadata"]["resourceVersion"] == self.api.get(
                                 "networking.k8s.io/v1", "Ingress", "shop", o["metadata"]["name"]
                             )["metadata"]["resourceVersion"] for o in self.source.ingresses()))
        await writers[1].sync()
        web = self.api.get("networking.k8s.io/v1", "Ingress", "shop", "web")
        self.assertEqual(web["status"], {"loadBalancer": {}})
        puts = [p for m, p in self.api.requests if m == "PUT" and p.endswith("/status")]
        self.assertEqual(len(puts), 2)

    def test_publish_service_addresses(self) -> None:
        """A Service's load-balancer ingress first, else external IPs, else cluster IPs."""
        lb = {"spec": {"clusterIP": "10.0.0.1"}, "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}}
        self.assertEqual(service_addresses(lb), [{"ip": "203.0.113.7"}])
        self.assertEqual(service_addresses({"spec": {"clusterIPs": ["10.0.0.1", "fd00::1"]}}),
                         [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}])
        self.assertEqual(service_addresses({"spec": {"type": "ExternalName", "externalName": "x.example"}}),
                         [{"hostname": "x.example"}])
        self.assertEqual(address_entries(["", " 10.1.1.1 ", "a.example"]),
                         [{"ip": "10.1.1.1"}, {"hostname": "a.example"}])

