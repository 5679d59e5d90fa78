"""Ingress status for the Kubernetes source: leader election on a Lease, and the writer of
`status.loadBalancer.ingress`.

`LeaderElector` follows client-go's leaderelection: a `coordination.k8s.io/v1` Lease named by
`--election-id` in the controller's namespace; every `retry_period` a candidate reads it and takes
it when it is free or its holder has not renewed for `lease_duration` (timed by the candidate's own
clock from when it last saw the record change, so clock skew does not matter); the holder renews
every `retry_period` and steps down when no renewal succeeded for `renew_deadline`. Updates
carry the Lease's `resourceVersion`: of two candidates, the API server lets one win (409 for the
other). Defaults are client-go's: 15s / 10s / 2s.

`IngressStatus` writes, while its elector leads, the published addresses (`--publish-address`, or
the load-balancer or cluster addresses of `--publish-service NS/NAME`) into the status of each
Ingress the gateway serves, and clears the addresses it wrote from an Ingress it no longer serves.
It reads the Ingresses from the Kubernetes source's watch (no extra list), writes through the
`status` subresource with the object's `resourceVersion` (a 409 retries at the next round).
"""

from __future__ import annotations

import ipaddress
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger()

LEASE_DURATION = 15.0  # client-go's defaults
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0
Obj = dict[str, Any]


def _micro_time(seconds: float) -> str:
    """A MicroTime (RFC 3339 with microseconds), as Lease spec times are written."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1e6):06d}Z"


def default_identity() -> str:
    """hostname_uuid, as client-go's examples build it (the pod name is the hostname)."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


class LeaderElector:
    """One candidate for the Lease `namespace/name` (see the module docstring)."""

    def __init__(
        self,
        clock: Any,  # callLater and seconds (the reactor, or a Clock in tests)
        connection: Any,  # flexgw.config.sources.kubeconnect.Connection
        namespace: str,
        name: str,
        identity: str | None = None,
        lease_duration: float = LEASE_DURATION,
        renew_deadline: float = RENEW_DEADLINE,
        retry_period: float = RETRY_PERIOD,
        wall: Callable[[], float] = time.time,
        on_started: Callable[[], Any] = lambda: None,
        on_stopped: Callable[[], Any] = lambda: None,
    ) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("lease duration > renew deadline > retry period > 0 is required")
        self.clock = clock
        self.connection = connection
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.wall = wall
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.leader = False
        self.holder: str | None = None  # the holder last seen
        self.running = False
        self.round: Deferred[None] | None = None  # the attempt under way (tests wait on it)
        self._observed: tuple[Any, float] | None = None  # (the record seen, when it last changed)
        self._renewed = 0.0  # clock time of the last successful renewal
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        """Try now, then every retry period."""
        if not self.running:
            self.running = True
            self._attempt()

    def stop(self, release: bool = True) -> Deferred[None] | None:
        """Stop competing; a leader gives the Lease up (`release`) so another takes over at once."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        was_leader = self.leader
        self._step_down()
        if release and was_leader:
            return Deferred.fromCoroutine(self._release())
        return None

    def _attempt(self) -> None:
        self._timer = None
        if not self.running:
            return
        self.round = Deferred.fromCoroutine(self._try()).addErrback(self._failed)
        self.round.addBoth(self._next)

    def _next(self, _: object) -> None:
        if self.running:
            self._timer = self.clock.callLater(self.retry_period, self._attempt)

    def _failed(self, failure: Any) -> None:
        log.warn("Leader election {lease}: {error}", lease=self.path, error=failure.getErrorMessage())  # noqa: G010
        self._check_deadline()

    def _check_deadline(self) -> None:
        if self.leader and self.clock.seconds() - self._renewed > self.renew_deadline:
            log.warn(  # noqa: G010
                "Leader election {lease}: no renewal for {deadline:g}s; stepping down",
                lease=self.path,
                deadline=self.renew_deadline,
            )
            self._step_down()

    async def _try(self) -> None:
        now = self.clock.seconds()
        code, lease = await self.connection.request("GET", self.path)
        if not self.running:
            return
        if code == 404:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None, 0),
            }
            code, created = await self.connection.request("POST", self.collection, body)
            if code in (200, 201):
                self._won(created, now)
            else:
                self._check_deadline()
            return
        if code != 200 or not isinstance(lease, dict):
            raise RuntimeError(f"{code} reading the Lease")
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        self.holder = holder
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and now < self._observed[1] + duration:
            self._check_deadline()  # another holds it and renews
            return
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder != self.identity:
            transitions += 1 if holder else 0
        new = dict(lease)
        new["spec"] = self._spec(spec if holder == self.identity else None, transitions)
        code, updated = await self.connection.request("PUT", self.path, new)
        if code == 200:
            self._won(updated, now)
        else:  # 409: someone else wrote first; try again next round
            self._check_deadline()

    def _spec(self, current: Obj | None, transitions: int) -> Obj:
        now = _micro_time(self.wall())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "acquireTime": (current or {}).get("acquireTime") or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _won(self, lease: Any, now: float) -> None:
        self._renewed = now
        self.holder = self.identity
        if isinstance(lease, dict):
            spec = lease.get("spec") or {}
            self._observed = ((self.identity, spec.get("renewTime"), spec.get("leaseTransitions")), now)
        if not self.leader:
            self.leader = True
            log.info("Leader election {lease}: {me} is the leader", lease=self.path, me=self.identity)
            _call(self.on_started)

    def _step_down(self) -> None:
        if self.leader:
            self.leader = False
            log.info("Leader election {lease}: {me} stopped leading", lease=self.path, me=self.identity)
            _call(self.on_stopped)

    async def _release(self) -> None:
        code, lease = await self.connection.request("GET", self.path)
        if code != 200 or not isinstance(lease, dict):
            return
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return
        lease = dict(lease)
        lease["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1,
                         "renewTime": _micro_time(self.wall())}
        await self.connection.request("PUT", self.path, lease)


def _call(callback: Callable[[], Any]) -> None:
    try:
        callback()
    except Exception:  # noqa: BLE001 - an observer must not stop the election
        log.failure("leader election callback failed")


def address_entries(addresses: Iterable[str]) -> list[Obj]:
    """`status.loadBalancer.ingress` entries: {"ip": ...} for an IP, {"hostname": ...} otherwise."""
    entries = []
    for address in addresses:
        address = address.strip()
        if not address:
            continue
        try:
            ipaddress.ip_address(address)
        except ValueError:
            entries.append({"hostname": address})
        else:
            entries.append({"ip": address})
    return entries


def service_addresses(service: Obj) -> list[Obj]:
    """A Service's published addresses: its load-balancer ingress, else its external IPs, else
    its cluster IPs (an ExternalName Service: that name)."""
    status = (service.get("status") or {}).get("loadBalancer") or {}
    if status.get("ingress"):
        return [{k: v for k, v in entry.items() if k in ("ip", "hostname")} for entry in status["ingress"]]
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName" and spec.get("externalName"):
        return [{"hostname": spec["externalName"]}]
    ips = spec.get("externalIPs") or spec.get("clusterIPs") or [spec.get("clusterIP")]
    return address_entries(ip for ip in ips if ip and ip != "None")


class IngressStatus:
    """Writes `status.loadBalancer.ingress` of the served Ingresses while `elector` leads."""

    def __init__(
        self,
        connection: Any,
        elector: LeaderElector,
        ingresses: Callable[[], Iterable[Obj]],  # the Ingress objects the source watches
        served: Callable[[], Iterable[str]],  # "namespace/name" of the Ingresses the plan serves
        publish_addresses: Sequence[str] = (),
        publish_service: str | None = None,  # "namespace/name"
    ) -> None:
        self.connection = connection
        self.elector = elector
        self.ingresses = ingresses
        self.served = served
        self.publish_addresses = address_entries(publish_addresses)
        self.publish_service = publish_service
        self.writes = 0
        self.conflicts = 0
        self._syncing: Deferred[None] | None = None
        self._again = False

    def sync(self) -> Deferred[None]:
        """Bring every Ingress's status in line (now, or once the sync under way ends)."""
        if self._syncing is not None:
            self._again = True
            return self._syncing
        self._syncing = Deferred.fromCoroutine(self._sync())
        self._syncing.addErrback(lambda f: log.warn("Ingress status: {error}", error=f.getErrorMessage()))  # noqa: G010

        def done(_: object) -> Deferred[None] | None:
            self._syncing = None
            if self._again:
                self._again = False
                return self.sync()
            return None

        return self._syncing.addBoth(done)

    async def addresses(self) -> list[Obj] | None:
        """The entries to publish (None: the publish Service cannot be read now)."""
        if self.publish_service is None:
            return self.publish_addresses
        namespace, _, name = self.publish_service.partition("/")
        code, service = await self.connection.request("GET", f"/api/v1/namespaces/{namespace}/services/{name}")
        if code != 200 or not isinstance(service, dict):
            log.warn("Ingress status: cannot read --publish-service {name} ({code})",  # noqa: G010
                     name=self.publish_service, code=code)
            return None
        return service_addresses(service)

    async def _sync(self) -> None:
        if not self.elector.leader:
            return
        desired = await self.addresses()
        if desired is None:
            return
        served = set(self.served())
        for obj in list(self.ingresses()):
            metadata = obj.get("metadata") or {}
            key = f"{metadata.get('namespace')}/{metadata.get('name')}"
            current = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if key in served:
                want = desired
            elif current and current == desired:
                want = []  # ours, and no longer served: clear it
            else:
                continue  # another controller's
            if current == want or not self.elector.leader:
                continue
            body = {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "Ingress",
                "metadata": {"name": metadata.get("name"), "namespace": metadata.get("namespace"),
                             "resourceVersion": metadata.get("resourceVersion")},
                "status": {"loadBalancer": {"ingress": want} if want else {}},
            }
            path = (f"/apis/networking.k8s.io/v1/namespaces/{metadata.get('namespace')}"
                    f"/ingresses/{metadata.get('name')}/status")
            code, _ = await self.connection.request("PUT", path, body)
            if code == 200:
                self.writes += 1
            elif code == 409:
                self.conflicts += 1  # a newer version is on its way through the watch
            else:
                log.warn("Ingress status of {key}: {code} from the API server", key=key, code=code)  # noqa: G010


def served_ingresses(plan: Any) -> set[str]:
    """"namespace/name" of every Ingress a plan serves (its routes are named "ns/name:...")."""
    served = set()
    for listener in plan.listeners:
        for api in listener.apis:
            for route in api.routes:
                owner, colon, _ = route.name.partition(":")
                if colon and "/" in owner:
                    served.add(owner)
    return served
