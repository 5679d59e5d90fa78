"""Test support for Services of several addresses: recording upstreams on 127.0.0.2,
127.0.0.3 ... (all loopback on Linux) sharing one port, the name that resolves to them, and a
bounded client loop that counts outcomes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, error

from flexgw.testing import client
from flexgw.testing.client import ResponseParseError
from flexgw.testing.upstream import RecordingUpstream, Responder


class UpstreamSet:
    """`n` recording upstreams, the k-th on 127.0.0.(k+2):port, each with its own responder
    (speaking HTTP/2 with prior knowledge with `h2c`)."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        responders: Sequence[Responder | None],
        first: int = 2,
        h2c: bool = False,
        tls: Any = None,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.tls = tls  # a server TLS context for every upstream (flexgw.testing.certs)
        self.hosts = [f"127.0.0.{first + i}" for i in range(len(responders))]
        self.upstreams = [RecordingUpstream(r, reactor=reactor, h2c=h2c) for r in responders]
        for host, upstream in zip(self.hosts, self.upstreams):
            upstream.listen(reactor, host=host, port=port, tls=tls)

    def counts(self) -> list[int]:
        """Requests each upstream has received (heads)."""
        return [len(u.received) for u in self.upstreams]

    async def kill(self, index: int) -> None:
        """Stop the index-th upstream listening and reset its connections (a crashed process)."""
        await self.upstreams[index].stop()

    def restart(self, index: int) -> None:
        """Listen again on the index-th address (a restarted process)."""
        upstream = self.upstreams[index]
        upstream.listen(self.reactor, host=self.hosts[index], port=self.port, tls=self.tls)

    async def stop(self) -> None:
        """Stop every upstream (a trial cleanup)."""
        await defer.gatherResults(
            [defer.ensureDeferred(self.kill(i)) for i in range(len(self.upstreams))]
        )


async def load(
    reactor: Any,
    port: int,
    requests: int,
    concurrency: int,
    head: bytes = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n",
    on_response: Any = None,
) -> Counter[int]:
    """Send `requests` requests (one connection each) to 127.0.0.1:port, `concurrency` at a
    time; the count of each response status (0: no response, the connection failed)."""
    statuses: Counter[int] = Counter()
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            n = sent
            try:
                response = await client.request(reactor, "127.0.0.1", port, head)
                status = response.status
            except (ResponseParseError, error.ConnectionClosed, error.ConnectError):
                status = 0  # the connection failed or closed without a response
            statuses[status] += 1
            if on_response is not None:
                on_response(n, status)

    await defer.gatherResults(
        [defer.ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True
    )
    return statuses
