"""WebSocket and other HTTP/1.1 upgrades: the request goes upstream with its Upgrade, and after
the upstream's 101 the two connections become a byte tunnel (flexgw.http.tunnel).

Only body-less upgrade requests get here (one with a body is refused by the front: its body
would be parsed as upgraded bytes, a smuggling vector). `Upgrade: h2c` is never tunnelled (the
front proxies such a request as an ordinary one, without the Upgrade). The request runs the
policy chain like any other; a local answer or an upstream answer other than 101 is an ordinary
response, after which the connection closes (the client may already have sent bytes of the
protocol it asked for, which must never be read as a request). The upstream connection of a
tunnel leaves its pool for good.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from flexgw.http import errors
from flexgw.http.fastwrite import send_now
from flexgw.http.headers import HeaderList, response_headers_for_downstream
from flexgw.http.request import RequestHead
from flexgw.http.tunnel import Tunnel
from flexgw.ingress.exchange import DONE, ProxyExchange

if TYPE_CHECKING:
    from flexgw.ingress.front import IngressProtocol

#: Client bytes accepted between an upgrade request and the upstream's 101 (a WebSocket client
#: may send frames before the handshake completes); more is refused.
MAX_EARLY_BYTES = 64 * 1024


def upgrade_protocol(head: RequestHead) -> bytes | None:
    """The `Upgrade` value to forward, or None when the request must not be tunnelled
    (not HTTP/1.1, no Upgrade header, several, or h2c among the offered protocols)."""
    if head.version != b"1.1":
        return None  # Upgrade is an HTTP/1.1 mechanism (RFC 9110 §7.8)
    found = None
    for name, value in head.headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            if found is not None:
                return None
            found = value.strip()
    if not found:
        return None
    for token in found.split(b","):
        if token.strip().lower().startswith(b"h2c"):
            return None
    return found


class UpgradeExchange(ProxyExchange):
    """A proxied upgrade request: an ordinary exchange until the upstream's 101, then a tunnel."""

    __slots__ = ("early", "hop_lines", "protocol", "switch_headers", "tunnel")

    def __init__(
        self, front: IngressProtocol, head: RequestHead, started: float, protocol: bytes
    ) -> None:
        # Whatever the answer, the connection closes after it unless it becomes a tunnel.
        super().__init__(front, attrs.evolve(head, keep_alive=False), started)
        self.protocol = protocol
        # The upstream head asks for the upgrade (Connection/Upgrade are hop-by-hop: the
        # client's were dropped with the others).
        self.hop_lines = b"Connection: Upgrade\r\nUpgrade: " + protocol + b"\r\n"
        self.early = b""
        self.switch_headers: HeaderList | None = None
        self.tunnel: Tunnel | None = None

    # -- before the switch: the front hands over what the client sends ------------------------

    def from_downstream(self, data: bytes) -> None:
        """Client bytes after the upgrade request, before the 101: kept for the tunnel."""
        if self.state == DONE:
            return
        self.early += data
        if len(self.early) > MAX_EARLY_BYTES:
            self.fail(errors.bad_request("Too many bytes sent before the upgrade completed"))

    # -- the upstream's answer ---------------------------------------------------------------

    def response_interim(self, status: int, headers: HeaderList) -> None:
        """A 101 is the switch (completed by response_switched); other 1xx as usual."""
        if status != 101:
            super().response_interim(status, headers)
            return
        self.switch_headers = headers

    def response_switched(self, rest: bytes) -> None:
        """The upstream switched protocols: answer the client's 101 and join the connections."""
        headers = self.switch_headers
        conn = self.conn
        if headers is None or conn is None:
            self.response_malformed("Protocol switch without a 101")
            return
        upgrade = [v.strip() for n, v in headers if n.lower() == b"upgrade"]
        if len(upgrade) != 1 or not upgrade[0]:
            self.response_malformed("101 without one Upgrade header")
            return
        front = self.front
        now = front.clock.seconds()
        self.upstream_elapsed = now - self.upstream_started
        kept = response_headers_for_downstream(headers, [])
        chain = self.chain
        if chain is not None:
            ctx = chain.ctx
            ctx.begin_response(101, kept)
            failed = chain.respond_sync()
            if failed is not None:
                self._upstream_failed_with_response(failed)
                return
            kept = ctx.response_headers or []
            if ctx.response_extra:
                kept = kept + ctx.response_extra
        self._tunnelled(101)
        # The connection leaves its pool: it is the tunnel's now, never reused.
        conn.sink = None
        conn.reusable = False
        self.conn = None
        self.pool.detach(conn)  # type: ignore[union-attr]
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        lines.extend(name + b": " + value + b"\r\n" for name, value in kept)
        lines.append(b"Connection: Upgrade\r\nUpgrade: " + upgrade[0] + b"\r\n\r\n")
        send_now(front.transport, b"".join(lines))
        tunnel = self.tunnel = Tunnel(
            front.clock,
            self._stream_idle_timeout(),
            front.transport,
            front.gate,
            conn.transport,
            conn.gate,  # type: ignore[arg-type]
            self._tunnel_ended,
        )
        conn.tunnel = tunnel
        front.tunnel_opened(self, tunnel)
        early, self.early = self.early, b""
        tunnel.start(early_up=early, early_down=rest)

    def downstream_lost(self) -> None:
        """The client went away before the switch."""
        self.early = b""
        super().downstream_lost()
