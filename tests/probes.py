"""Probes into a running in-process gateway for data-path tests: buffers, pauses, polling waits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall

from flexgw.ingress.front import IngressProtocol
from tests.harness import Gateway


class NotReached(AssertionError):
    """A polled condition did not become true before its deadline."""


def poll_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005
) -> defer.Deferred[None]:
    """Fire once `predicate()` is true (checked every `interval`); fail after `timeout` seconds."""
    done: defer.Deferred[None] = defer.Deferred()
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]

    def check() -> None:
        if predicate():
            loop.stop()
            done.callback(None)
        elif reactor.seconds() > deadline:  # type: ignore[attr-defined]
            loop.stop()
            done.errback(NotReached(f"condition not reached within {timeout}s"))

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(interval, now=True)
    return done


class Conditions:
    """Event-driven waits: `until(predicate)` fires once the predicate holds, checked now and at
    every `check()` (called by the test from the callbacks it observes; no polling)."""

    def __init__(self) -> None:
        self.waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def check(self) -> None:
        """Fire the waiters whose predicate holds."""
        for predicate, waiter in list(self.waiters):
            if predicate():
                self.waiters.remove((predicate, waiter))
                waiter.callback(None)

    def until(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        """Fire once `predicate()` holds (now, or at a later `check()`)."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiters.append((predicate, waiter))
        self.check()
        return waiter


def buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in user space, not yet written to its socket."""
    if transport is None:
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def reading(transport: Any) -> bool:
    """True while the reactor reads from `transport` (False when it is paused)."""
    return transport in reactor.getReaders()  # type: ignore[attr-defined]


def fronts(gateway: Gateway) -> list[IngressProtocol]:
    """The gateway's open downstream connections, across all listeners."""
    return [c for f in gateway.service.factories.values() for c in f.connections]


def only_front(gateway: Gateway) -> IngressProtocol:
    """The gateway's single open downstream connection."""
    found = fronts(gateway)
    assert len(found) == 1, f"expected one downstream connection, got {len(found)}"
    return found[0]


def idle_upstream(gateway: Gateway) -> list[Any]:
    """Every idle pooled upstream connection of the gateway."""
    return [c for _, _, p in gateway.service.pools.all_pools() for c in p.idle]


def pool_counts(gateway: Gateway) -> list[tuple[int, int, int]]:
    """(idle, active, connecting) per upstream pool."""
    return [(len(p.idle), p.active, p.connecting) for _, _, p in gateway.service.pools.all_pools()]
