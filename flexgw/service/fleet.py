"""Fleet status: each gateway following etcd keeps `<prefix>/gateways/<gateway-id>` under a lease
(the key disappears when the gateway dies), and `flexgw fleet` prints them as a table.

`FleetReporter` grants a lease of `ttl` seconds, renews it every `ttl / 3`, and puts its key
whenever what it says changes (checked every `check_interval`): the flexgw version, the etcd
revision the gateway applied, its configuration generation, readiness and reasons, whether etcd
answers, and its current errors. When etcd is away nothing is written; the lease is renewed (or
granted again, the key rewritten) once it answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from flexgw import __version__
from flexgw.config.sources.etcd import gateways_prefix
from flexgw.config.sources.etcd_client import EtcdClient, KeyValue
from flexgw.service.admin import readiness

log = Logger()

DEFAULT_TTL = 15
MAX_PROBLEMS = 20


def gateway_status(gateway: Any, source: Any, gateway_id: str) -> dict[str, Any]:
    """What a gateway says about itself in its fleet key."""
    ready, reasons = readiness(gateway)
    state = gateway.state
    errors = [str(p) for p in state.errors] if state is not None else []
    return {
        "id": gateway_id,
        "version": __version__,
        "pid": os.getpid(),
        "revision": source.applied_revision,
        "generation": gateway.plan.generation,
        "ready": ready,
        "notReadyReasons": reasons,
        "connected": source.status.connected,
        "errors": len(errors),
        "problems": errors[:MAX_PROBLEMS],
    }


class FleetReporter(Service):
    """Keeps this gateway's fleet key under a lease while the service runs."""

    def __init__(
        self,
        reactor: Any,
        client: EtcdClient,
        prefix: str,
        gateway_id: str,
        gateway: Any,
        source: Any,
        ttl: int = DEFAULT_TTL,
        check_interval: float = 1.0,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.key = (gateways_prefix(prefix) + gateway_id).encode("utf-8")
        self.gateway_id = gateway_id
        self.gateway = gateway
        self.source = source
        self.ttl = ttl
        self.check_interval = check_interval
        self.lease = 0
        self.renewed = 0.0
        self.written: dict[str, Any] | None = None
        self.puts = 0
        self.observers: list[Callable[[dict[str, Any]], Any]] = []  # told of each status written
        self._loop: LoopingCall | None = None
        self._busy: defer.Deferred[None] | None = None

    def startService(self) -> None:
        """Report now, then every `check_interval`."""
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.check_interval, now=True)

    def stopService(self) -> defer.Deferred[Any]:
        """Stop reporting and revoke the lease (the key goes at once; bounded by the client's
        timeout)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        busy = self._busy if self._busy is not None else defer.succeed(None)

        def revoke(_: object) -> Any:
            lease, self.lease = self.lease, 0
            if not lease:
                return None
            return self.client.lease_revoke(lease).addErrback(lambda _: None)

        return busy.addBoth(revoke)

    def _tick(self) -> None:
        if self._busy is not None:
            return
        self._busy = defer.Deferred.fromCoroutine(self._report())
        self._busy.addErrback(self._failed).addBoth(self._idle)

    def _idle(self, _: object) -> None:
        self._busy = None

    def _failed(self, failure: Any) -> None:
        log.debug("fleet status not written: {error}", error=failure.getErrorMessage())
        self.renewed = 0.0  # etcd was away: renew (or grant again) at the next tick

    async def _report(self) -> None:
        now = self.reactor.seconds()
        if self.lease and now - self.renewed >= self.ttl / 3:
            if await self.client.lease_keepalive(self.lease) <= 0:
                self.lease = 0  # expired while etcd was away: the key went with it
            self.renewed = now
        if not self.lease:
            self.lease, _ = await self.client.lease_grant(self.ttl)
            self.renewed = now
            self.written = None
        status = gateway_status(self.gateway, self.source, self.gateway_id)
        if status != self.written:
            await self.client.put(self.key, json.dumps(status).encode("utf-8"), lease=self.lease)
            self.written = status
            self.puts += 1
            for observer in list(self.observers):
                observer(status)


def fleet_table(kvs: Iterable[KeyValue], latest: int) -> str:
    """The fleet as a text table: one row per gateway key, then each gateway's errors; a gateway
    whose applied revision is below `latest` (the last resource change) is "behind"."""
    rows = [("GATEWAY", "VERSION", "REVISION", "GENERATION", "READY", "ETCD", "ERRORS", "STATE")]
    details: list[str] = []
    for kv in kvs:
        name = kv.key.decode("utf-8", "replace").rsplit("/", 1)[-1]
        try:
            status = json.loads(kv.value)
            revision = int(status.get("revision", 0))
        except (ValueError, TypeError, AttributeError):
            rows.append((name, "?", "?", "?", "?", "?", "?", "unreadable status"))
            continue
        state = "up to date" if revision >= latest else f"behind (latest {latest})"
        rows.append((
            name,
            str(status.get("version", "?")),
            str(revision),
            str(status.get("generation", "?")),
            "yes" if status.get("ready") else "no",
            "connected" if status.get("connected") else "disconnected",
            str(status.get("errors", 0)),
            state,
        ))
        details.extend(f"  {name}: {problem}" for problem in status.get("problems", ()))
        details.extend(f"  {name}: not ready: {reason}" for reason in status.get("notReadyReasons", ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no gateway reports under this prefix)")
    return "\n".join(lines + details) + "\n"
